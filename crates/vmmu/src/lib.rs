//! vmmu: x86 memory virtualization the way Linux KVM does it, in user space.
//!
//! The crate is layered bottom to top; a module may use the ones above it in
//! this list, never the ones below (see ARCHITECTURE.md):
//!
//! - [`addr`]: address and frame newtypes, page sizes, levels.
//! - [`arch`]: x86 formats, pure data and pure functions.
//! - [`walker`]: the one guest page-table walker, generic over the format.
//! - [`mem`]: host frames, the host address space and its MMU notifiers,
//!   memslots, dirty logging structures, guest memory.
//! - [`mmu`]: the MMUs and what they share (SPTEs, walk cursor, flushes, stats).
//! - [`cpu`]: the vCPU and the hardware model, starting with the TLB.
//! - [`sim`]: what drives the MMUs as a guest, host and VMM would.
//! - [`conform`]: the x86 paging conformance case format and its replay.
//! - [`bench`]: benchmarks shared by `cargo bench` and `vmmu bench`.

#![warn(missing_docs)]

pub mod addr;
pub mod arch;
pub mod bench;
pub mod conform;
pub mod cpu;
pub mod fuzz;
pub mod mem;
pub mod mmu;
pub mod percpu;
pub mod sim;
pub mod sync;
pub mod walker;

/// The README's example, compiled and run as a doctest so it stays true.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
