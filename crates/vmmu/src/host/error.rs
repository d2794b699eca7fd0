//! Errors of the host model, one enum per component. Each variant names
//! the problem and carries the values involved; an operation that returns
//! an error has changed nothing (except where a variant says otherwise).

use thiserror::Error;

use crate::addr::{Hva, PageSize, Pfn};

/// Errors of the frame arena.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The OS refused to reserve the arena's address space.
    #[error("cannot reserve {bytes:#x} bytes of address space for host frames: {source}")]
    Reserve {
        /// Bytes asked for.
        bytes: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configured first frame is not a multiple of 1 GiB worth of frames.
    #[error("first frame {pfn:?} is not 1 GiB aligned (a multiple of 262144)")]
    MisalignedFirstPfn {
        /// The configured first frame.
        pfn: Pfn,
    },
    /// Every frame of the reservation is in use.
    #[error("out of host frames allocating {size}: {allocated_frames} of {capacity_frames} in use")]
    OutOfFrames {
        /// What was asked for.
        size: PageSize,
        /// Frames the arena holds.
        capacity_frames: u64,
        /// Frames allocated at the time.
        allocated_frames: u64,
    },
    /// Host frames come in 4K, 2M and 1G runs only.
    #[error("host frames cannot be allocated in {size} runs")]
    UnsupportedSize {
        /// The size asked for.
        size: PageSize,
    },
    /// The frame is not part of the arena.
    #[error("{pfn:?} is not a frame of this arena")]
    OutOfRange {
        /// The frame.
        pfn: Pfn,
    },
    /// A run freed as `size` does not start at a multiple of `size`.
    #[error("{pfn:?} is not aligned to {size}")]
    Misaligned {
        /// The first frame given.
        pfn: Pfn,
        /// The run size given.
        size: PageSize,
    },
    /// Freeing a frame that is already free.
    #[error("double free of {pfn:?}")]
    DoubleFree {
        /// The frame that was already free.
        pfn: Pfn,
    },
    /// The frame is free: whoever holds its number holds a stale reference.
    #[error("{pfn:?} is not allocated (generation {generation}): use after free")]
    NotAllocated {
        /// The frame.
        pfn: Pfn,
        /// Its allocation generation (0: never allocated).
        generation: u64,
    },
}

/// Errors of host address-space operations (mmap, munmap, collapse, ...).
#[derive(Debug, Error)]
pub enum HostError {
    /// An address or length is not aligned as the operation needs.
    #[error("{what} {value:#x} is not aligned to {align:#x}")]
    Unaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The alignment needed.
        align: u64,
    },
    /// A zero-length range.
    #[error("empty range at {hva:?}")]
    EmptyRange {
        /// Its start.
        hva: Hva,
    },
    /// The range leaves the 47-bit user half of the host address space.
    #[error("range {start:?}..{end:#x} leaves the 47-bit user address space")]
    OutOfAddressSpace {
        /// Range start.
        start: Hva,
        /// Range end (exclusive).
        end: u64,
    },
    /// mmap over an existing mapping.
    #[error("range {start:?}..{end:#x} overlaps the existing mapping at {existing:?}")]
    Overlap {
        /// Range start.
        start: Hva,
        /// Range end (exclusive).
        end: u64,
        /// Start of the mapping it overlaps.
        existing: Hva,
    },
    /// No mapping (VMA) covers the address.
    #[error("no mapping covers {hva:?}")]
    NotMapped {
        /// The address.
        hva: Hva,
    },
    /// The operation does not apply to what is mapped at `hva`.
    #[error("cannot {op} at {hva:?}: {reason}")]
    NotApplicable {
        /// The operation.
        op: &'static str,
        /// The address.
        hva: Hva,
        /// Why.
        reason: &'static str,
    },
    /// A host fault while the operation brought a page in.
    #[error(transparent)]
    Fault(#[from] HostFault),
    /// No host frame was left.
    #[error(transparent)]
    Frames(#[from] FrameError),
}

/// Why an access through a host virtual address failed (a SIGSEGV or
/// SIGBUS in a real process).
#[derive(Debug, Error)]
pub enum HostFault {
    /// No mapping covers the address.
    #[error("no host mapping covers {hva:?}")]
    NotMapped {
        /// The address.
        hva: Hva,
    },
    /// A write to a read-only (mprotect) mapping.
    #[error("write to read-only host mapping at {hva:?}")]
    WriteProtected {
        /// The address.
        hva: Hva,
    },
    /// No host frame was left to back the page.
    #[error("out of host frames faulting in {hva:?}: {source}")]
    OutOfMemory {
        /// The address.
        hva: Hva,
        /// The allocator's error.
        source: FrameError,
    },
}
