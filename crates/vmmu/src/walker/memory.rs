//! The walker's view of guest-physical memory.
//!
//! The walker reads paging entries and sets Accessed/Dirty bits with
//! compare-exchange, exactly as a CPU does: another vCPU (or the hardware
//! model) may be changing the same entry concurrently, so entries are never
//! read-modify-written. Implementations: the memory layer's guest memory,
//! the sparse memory the conformance runner builds from a case, and the
//! hardware model's EPT-translated view for two-dimensional walks (whose
//! error is an EPT exit).

use crate::addr::Gpa;

pub use crate::arch::pte::EntrySize;

/// Guest-physical memory as the page walker sees it.
///
/// `gpa` is always aligned to the entry size.
pub trait PtMemory {
    /// Why an entry could not be reached (e.g. no memslot, or an EPT
    /// violation during a two-dimensional walk).
    type Error;

    /// Reads one paging entry.
    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, Self::Error>;

    /// Atomically replaces the entry at `gpa` with `new` if it still holds
    /// `old`. Returns `Ok(Ok(()))` on success and `Ok(Err(current))` when the
    /// entry changed under the caller.
    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, Self::Error>;
}

impl<M: PtMemory + ?Sized> PtMemory for &M {
    type Error = M::Error;
    #[inline(always)]
    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, Self::Error> {
        (**self).read_entry(gpa, size)
    }
    #[inline(always)]
    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, Self::Error> {
        (**self).cmpxchg_entry(gpa, size, old, new)
    }
}
