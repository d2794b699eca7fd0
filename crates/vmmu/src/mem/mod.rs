//! The KVM-side memory layer, on top of the host ([`crate::host`]):
//! memslots, dirty logging structures, guest memory, and KVM's half of the
//! MMU-notifier protocol.
//!
//! - [`memslot`]: [`MemslotTable`] of `ArcSwap`-published [`Memslots`]
//!   snapshots with generations, lpage_info and a per-vCPU [`SlotCache`];
//!   [`mark_page_dirty_in_slot`].
//! - [`dirty`]: [`DirtyBitmap`] per slot and [`DirtyRing`] per vCPU.
//! - [`invalidate`]: KVM's [`InvalidateState`] (`mmu_invalidate_seq` and
//!   friends) and [`faultin_pfn`], whose [`HostMapping`] can only be
//!   consumed through [`HostMapping::validate`] under `mmu_lock` (seed
//!   `004_*`).
//! - [`guest`]: [`GuestMemory`], gpa-level reads, writes and
//!   compare-exchanges; implements the walker's `PtMemory` and rust-vmm's
//!   `Bytes<GuestAddress>`.
//! - [`error`]: the typed errors of all of the above.
//!
//! Lock order, outermost first: memslot update lock → host mm lock →
//! (notifier callbacks: the MMU's `mmu_lock`) → host access lock. A vCPU
//! fault calls [`faultin_pfn`] before taking `mmu_lock`, as KVM does.

pub mod dirty;
pub mod error;
pub mod guest;
pub mod invalidate;
pub mod memslot;

pub use dirty::{DirtyBitmap, DirtyGfn, DirtyRing, RingFull};
pub use error::{FaultinError, GuestMemoryError, MemslotError};
pub use guest::GuestMemory;
pub use invalidate::{
    HostMapping, HostMappingUse, InvalidateState, Retry, ValidatedMapping, faultin_gfn, faultin_pfn, stable_host_level,
};
pub use memslot::{
    MemoryRegion, Memslot, MemslotChange, MemslotConfig, MemslotFlags, MemslotObserver, MemslotTable, Memslots,
    SlotCache, mark_page_dirty_in_slot, max_mapping_level,
};
