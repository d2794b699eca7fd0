//! The host: a model of what vmmu's MMUs run on, Linux's memory
//! management as KVM sees it.
//!
//! - [`frames`]: the [`FrameArena`], host physical memory addressed by
//!   [`Pfn`](crate::addr::Pfn); page tables (the host's and the MMUs' SPTE
//!   tables) and data frames come from it. The only module with `unsafe`
//!   code.
//! - [`mm`]: the [`HostAddressSpace`] (a process's `mm`), hva → frame at
//!   4K/2M/1G, with the kernel's operations (demand faults, munmap, THP
//!   collapse/split, migration, swap, KSM, mprotect, aging), each
//!   delivering MMU-notifier events.
//! - [`notifier`]: the [`MmuNotifier`] interface those events reach.
//! - [`error`]: the typed errors of all of the above.
//!
//! Nothing here knows of memslots or MMUs: the KVM side ([`crate::mem`],
//! [`crate::mmu`]) is built on top.

pub mod error;
pub mod frames;
pub mod mm;
pub mod notifier;

pub use error::{FrameError, HostError, HostFault};
pub use frames::{FrameArena, FrameArenaConfig, FrameState, FrameTable, poison_word};
pub use mm::{HVA_LIMIT, HostAddressSpace, HostLeaf, HostStats, HostWalk, VmaFlags};
pub use notifier::{HvaRange, MmuNotifier, NotifierEvent, NotifierId, NotifierRange};
