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

/// A memory that counts the entry reads made through it: the memory
/// references of a page walk (a TLB miss's cost as the hardware pays it;
/// A/D updates are not counted, as the classic figures do not count them).
#[derive(Debug)]
pub struct CountingMemory<M> {
    inner: M,
    reads: std::cell::Cell<u64>,
}

impl<M> CountingMemory<M> {
    /// Counts the reads made of `inner`.
    pub fn new(inner: M) -> CountingMemory<M> {
        CountingMemory {
            inner,
            reads: std::cell::Cell::new(0),
        }
    }

    /// Entry reads so far.
    pub fn reads(&self) -> u64 {
        self.reads.get()
    }
}

impl<M: PtMemory> PtMemory for CountingMemory<M> {
    type Error = M::Error;

    #[inline(always)]
    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, Self::Error> {
        self.reads.set(self.reads.get() + 1);
        self.inner.read_entry(gpa, size)
    }

    #[inline(always)]
    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, Self::Error> {
        self.inner.cmpxchg_entry(gpa, size, old, new)
    }
}
