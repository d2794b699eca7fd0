//! Errors of the KVM-side memory layer, one enum per component. Each
//! variant names the problem and carries the values involved; an operation
//! that returns an error has changed nothing (except where a variant says
//! otherwise).

use thiserror::Error;

use crate::addr::{Gfn, Gpa, Hva};
use crate::host::HostFault;

/// Why [`crate::mem::faultin_pfn`] could not produce a host mapping.
#[derive(Debug, Error)]
pub enum FaultinError {
    /// The gfn is not in the memslot given.
    #[error("{gfn:?} is outside memslot {slot_id}")]
    GfnOutsideSlot {
        /// The gfn.
        gfn: Gfn,
        /// The slot id.
        slot_id: u16,
    },
    /// A write fault on a read-only memslot (KVM exits to the VMM as MMIO).
    #[error("write to {gfn:?} in read-only memslot {slot_id}")]
    ReadOnlyMemslot {
        /// The gfn.
        gfn: Gfn,
        /// The slot id.
        slot_id: u16,
    },
    /// The host could not map the page.
    #[error(transparent)]
    Host(#[from] HostFault),
}

/// Errors of memslot updates and dirty-log requests. Nothing changes on error.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum MemslotError {
    /// A memslot of zero pages (KVM deletes on size 0; here delete is explicit).
    #[error("memslot {id} has zero size")]
    ZeroSize {
        /// The slot id.
        id: u16,
    },
    /// An address or size not aligned to 4 KiB.
    #[error("memslot {id}: {what} {value:#x} is not 4 KiB aligned")]
    Unaligned {
        /// The slot id.
        id: u16,
        /// Which field: "guest_phys_addr", "userspace_addr" or "memory_size".
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The slot's gpa range ends beyond the guest physical address width.
    #[error("memslot {id}: gpa end {end:#x} exceeds the {bits}-bit guest physical address width")]
    GpaBeyondWidth {
        /// The slot id.
        id: u16,
        /// The end (exclusive) gpa.
        end: u64,
        /// The width in bits.
        bits: u8,
    },
    /// The slot's hva range wraps or leaves the 47-bit user address space.
    #[error("memslot {id}: hva range {start:?}+{size:#x} leaves the user address space")]
    HvaOutOfRange {
        /// The slot id.
        id: u16,
        /// The start hva.
        start: Hva,
        /// The size in bytes.
        size: u64,
    },
    /// The slot's gfn range overlaps another slot of the same address space.
    #[error("memslot {id} ({start:?}..{end:?}) overlaps memslot {other} ({other_start:?}..{other_end:?})")]
    Overlap {
        /// The slot id.
        id: u16,
        /// Its first gfn.
        start: Gfn,
        /// Its end gfn (exclusive).
        end: Gfn,
        /// The slot it overlaps.
        other: u16,
        /// That slot's first gfn.
        other_start: Gfn,
        /// That slot's end gfn (exclusive).
        other_end: Gfn,
    },
    /// The bitmap interfaces while the dirty ring is enabled (KVM: ENXIO).
    #[error("dirty pages are reported through the dirty ring: the dirty bitmap interfaces are disabled")]
    DirtyRingEnabled,
    /// No slot has this id in this address space.
    #[error("no memslot {id} in address space {as_id}")]
    UnknownSlot {
        /// The address space.
        as_id: u16,
        /// The slot id.
        id: u16,
    },
    /// Creating a slot with an id already in use.
    #[error("memslot {id} already exists in address space {as_id}")]
    SlotExists {
        /// The address space.
        as_id: u16,
        /// The slot id.
        id: u16,
    },
    /// Address space ids are 0 (normal) and 1 (SMM).
    #[error("address space {as_id} does not exist (0: normal, 1: SMM)")]
    InvalidAddressSpace {
        /// The address space given.
        as_id: u16,
    },
    /// Unknown flag bits.
    #[error("memslot {id}: unknown flag bits {bits:#x}")]
    InvalidFlags {
        /// The slot id.
        id: u16,
        /// The unknown bits.
        bits: u32,
    },
    /// KVM refuses to toggle READONLY on an existing slot.
    #[error("memslot {id}: the READONLY flag cannot change on an existing slot")]
    ReadOnlyFlagChange {
        /// The slot id.
        id: u16,
    },
    /// Dirty-log request on a slot that does not log dirty pages.
    #[error("memslot {id} in address space {as_id} does not log dirty pages")]
    DirtyLogDisabled {
        /// The address space.
        as_id: u16,
        /// The slot id.
        id: u16,
    },
    /// KVM_CLEAR_DIRTY_LOG needs manual dirty-log protection enabled.
    #[error("clearing the dirty log needs manual dirty-log protection")]
    ManualProtectDisabled,
    /// A clear-dirty-log range that is misaligned or leaves the slot.
    #[error(
        "memslot {id}: clear range first_page {first_page} + {num_pages} pages is not 64-aligned or leaves the slot of {npages} pages"
    )]
    BadClearRange {
        /// The slot id.
        id: u16,
        /// First page given.
        first_page: u64,
        /// Number of pages given.
        num_pages: u64,
        /// The slot size.
        npages: u64,
    },
}

/// Errors of the guest-memory API.
#[derive(Debug, Error)]
pub enum GuestMemoryError {
    /// A non-faulting read ([`GuestMemory::read_atomic`](crate::mem::GuestMemory::read_atomic))
    /// found the page not resident in the host.
    #[error("{gpa:?} is not resident in the host (a non-faulting read)")]
    NotResident {
        /// The gpa.
        gpa: Gpa,
    },
    /// No memslot maps the gpa (or its slot is being deleted or moved).
    #[error("no memslot maps {gpa:?}")]
    GpaNotMapped {
        /// The first unmapped gpa of the access.
        gpa: Gpa,
    },
    /// A write to a read-only memslot.
    #[error("write to read-only memslot {slot_id} at {gpa:?}")]
    ReadOnlyMemslot {
        /// The gpa.
        gpa: Gpa,
        /// The slot id.
        slot_id: u16,
    },
    /// The access wraps around the end of the guest physical address space.
    #[error("access of {len} bytes at {gpa:?} wraps around")]
    Overflow {
        /// The gpa.
        gpa: Gpa,
        /// The length.
        len: usize,
    },
    /// A value access of a size other than 1..=8 bytes.
    #[error("{size}-byte value access at {gpa:?}: the size must be 1..=8")]
    InvalidSize {
        /// The gpa.
        gpa: Gpa,
        /// The size asked for.
        size: usize,
    },
    /// A compare-exchange or atomic access that is not naturally aligned.
    #[error("{size}-byte atomic access at {gpa:?} is not naturally aligned")]
    Misaligned {
        /// The gpa.
        gpa: Gpa,
        /// The access size.
        size: usize,
    },
    /// The host could not back the page (a partial write may have happened
    /// to the pages before it).
    #[error("host fault at {gpa:?}: {source}")]
    Host {
        /// The gpa.
        gpa: Gpa,
        /// The host's fault.
        source: HostFault,
    },
}
