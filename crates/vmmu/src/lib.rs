//! vmmu: x86 memory virtualization the way Linux KVM does it, in user space.
//!
//! The crate is layered bottom to top; a module may use the ones above it in
//! this list, never the ones below (see ARCHITECTURE.md):
//!
//! - [`addr`]: address and frame newtypes, page sizes, levels.
//! - [`arch`]: x86 formats, pure data and pure functions.
//! - [`walker`]: the one guest page-table walker, generic over the format.
//! - [`host`]: the host, a model of Linux's memory management: frames,
//!   the host address space, its MMU notifiers.
//! - [`mem`]: the KVM side of memory: memslots, dirty logging structures,
//!   guest memory, the invalidation-retry protocol and fault-in.
//! - [`mmu`]: the MMUs and what they share (SPTEs, walk cursor, flushes, stats).
//! - [`cpu`]: the vCPU and the hardware model, starting with the TLB.
//! - [`vm`]: a VM assembled from the layers (host memory, memslots, an
//!   MMU, vCPUs) and its configuration.
//!
//! [`sync`] (with `mmu_lock`'s primitive, [`sync::MmuLock`]) and [`percpu`]
//! are the synchronisation primitives every layer uses. What drives the engine lives in other crates: the simulator and
//! conformance replay (`vmmu-sim`), the benchmarks (`vmmu-bench`), the fuzz
//! drivers (`vmmu-fuzz`) and the `vmmu` command line.

#![warn(missing_docs)]

pub mod addr;
pub mod arch;
pub mod cpu;
pub mod host;
pub mod mem;
pub mod mmu;
pub mod percpu;
pub mod sync;
pub mod vm;
pub mod walker;

/// The README's example, compiled and run as a doctest so it stays true.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
