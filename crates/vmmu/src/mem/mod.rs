//! The memory layer: host frames, the host address space and its MMU
//! notifiers, memslots, dirty logging structures, and guest memory.
//!
//! Bottom to top:
//!
//! - [`frames`]: the [`FrameArena`], host physical memory addressed by
//!   [`Pfn`](crate::addr::Pfn); page tables (the host's and, later, the
//!   MMUs' SPTE tables) and data frames come from it. The only module of
//!   the layer with `unsafe` code.
//! - [`host`]: the [`HostAddressSpace`], hva → frame at 4K/2M/1G, with the
//!   kernel's operations (demand faults, munmap, THP collapse/split,
//!   migration, swap, KSM, mprotect, aging), each delivering MMU-notifier
//!   events.
//! - [`notifier`]: the [`MmuNotifier`] trait, KVM's [`InvalidateState`]
//!   (`mmu_invalidate_seq` and friends), the [`MmuLock`] whose guards prove
//!   `mmu_lock` is held, and [`faultin_pfn`], whose [`HostMapping`] can only
//!   be consumed through [`HostMapping::validate`] (seed `004_*`).
//! - [`memslot`]: [`MemslotTable`] of `ArcSwap`-published [`Memslots`]
//!   snapshots with generations, lpage_info and a per-vCPU [`SlotCache`].
//! - [`dirty`]: [`DirtyBitmap`] per slot and [`DirtyRing`] per vCPU.
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
pub mod frames;
pub mod guest;
pub mod host;
pub mod memslot;
pub mod notifier;

pub use dirty::{DirtyBitmap, DirtyGfn, DirtyRing, RingFull, mark_page_dirty_in_slot};
pub use error::{FaultinError, FrameError, GuestMemoryError, HostError, HostFault, MemslotError};
pub use frames::{FrameArena, FrameArenaConfig, FrameState, FrameTable, poison_word};
pub use guest::GuestMemory;
pub use host::{HostAddressSpace, HostLeaf, HostStats, VmaFlags};
pub use memslot::{
    MemoryRegion, Memslot, MemslotChange, MemslotConfig, MemslotFlags, MemslotObserver, MemslotTable, Memslots,
    SlotCache, max_mapping_level,
};
pub use notifier::{
    HeldMmuLock, HostMapping, HvaRange, InvalidateState, MmuLock, MmuLockHeld, MmuLockReadGuard, MmuLockWriteGuard,
    MmuNotifier, MmuWriteLockHeld, NotifierEvent, NotifierId, NotifierRange, Retry, ValidatedMapping, faultin_gfn,
    faultin_pfn, stable_host_level,
};
