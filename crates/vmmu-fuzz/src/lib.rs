//! Fuzz entry points, shared by the cargo-fuzz targets in `fuzz/` and the
//! seeded drivers of `tests/fuzz.rs` (which run them in `cargo test`).
//!
//! - [`walk`]: the guest walker over arbitrary paging structures and
//!   control state, checked against [`reference`](mod@reference), a slow walker written
//!   independently from the SDM's tables ([`walk::walk_one`]);
//! - [`parse`]: the conformance-case, workload and trace parsers over
//!   arbitrary bytes ([`parse::conform_case`], [`parse::workload`],
//!   [`parse::trace`]);
//! - [`vm`]: the whole VM, an arbitrary program of guest operations (page
//!   table stores, control registers, INVLPG/INVPCID, accesses) and
//!   host/VMM operations (host churn, memslot changes, dirty-log harvests,
//!   zap-all) on the shadow or the TDP MMU, every access judged against the
//!   walker and every op followed by the MMU's audit ([`vm::run`]).
//!
//! Every entry point panics, with a message saying what went wrong, when
//! it finds a bug, and returns normally otherwise.

#![warn(missing_docs)]

pub mod parse;
pub mod reference;
pub mod vm;
pub mod walk;
