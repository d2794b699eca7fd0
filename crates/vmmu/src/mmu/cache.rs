//! Frames set aside for page tables before `mmu_lock` is taken (KVM's
//! `struct kvm_mmu_memory_cache` and `kvm_mmu_topup_memory_cache`).
//!
//! Nothing allocates under `mmu_lock`: an allocation can fail (frames run
//! out) or wait, and a thread holding the lock must do neither. So a fault
//! first tops up its vCPU's cache with as many tables as it can need
//! (one per level below the root), failing cleanly with
//! [`FrameError::OutOfFrames`] if the host has none, and only then takes
//! the lock; under the lock it takes tables from the cache, which cannot
//! fail. A table taken but never published (a lost compare-exchange) goes
//! back into the cache, zeroed. Operations that split many huge pages under
//! the lock (eager splitting) use a cache of their own and give the lock up
//! to refill it.
//!
//! The frames a cache holds are allocated but belong to no tree: they are
//! counted in no MMU statistic and are freed when the cache is dropped.

use std::sync::Arc;

use crate::addr::{PageSize, Pfn};
use crate::host::{FrameArena, FrameError};
use crate::mem::SlotCache;

/// What a vCPU keeps from one MMU fault to the next (KVM keeps them in
/// `kvm_vcpu_arch`): its last memslot, and frames for page tables.
#[derive(Debug)]
pub struct MmuCaches {
    /// The memslot last looked up.
    pub slots: SlotCache,
    /// Frames for the tables a fault may link (KVM's
    /// `mmu_shadow_page_cache`).
    pub pages: MmuMemoryCache,
}

impl MmuCaches {
    /// Empty caches over `arena`, the memory the MMU's tables come from.
    pub fn new(arena: Arc<FrameArena>) -> MmuCaches {
        MmuCaches {
            slots: SlotCache::default(),
            pages: MmuMemoryCache::new(arena),
        }
    }
}

/// A cache of zeroed 4 KiB frames for page tables.
pub struct MmuMemoryCache {
    arena: Arc<FrameArena>,
    frames: Vec<Pfn>,
}

impl std::fmt::Debug for MmuMemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmuMemoryCache")
            .field("frames", &self.frames.len())
            .finish()
    }
}

impl MmuMemoryCache {
    /// The most frames a cache holds (KVM's
    /// `KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE`): a top-up fills it this far, so
    /// most faults find their tables without allocating.
    pub const CAPACITY: usize = 40;

    /// An empty cache over `arena`.
    pub fn new(arena: Arc<FrameArena>) -> MmuMemoryCache {
        MmuMemoryCache {
            arena,
            frames: Vec::with_capacity(Self::CAPACITY),
        }
    }

    /// Frames in the cache.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Fills the cache towards [`MmuMemoryCache::CAPACITY`] (KVM's
    /// `kvm_mmu_topup_memory_cache`). Succeeds if it then holds at least
    /// `min` frames, even if the host ran out before it was full; fails
    /// with the host's error otherwise. Call it without `mmu_lock`.
    pub fn topup(&mut self, min: usize) -> Result<(), FrameError> {
        debug_assert!(min <= Self::CAPACITY);
        if self.frames.len() >= min {
            return Ok(());
        }
        while self.frames.len() < Self::CAPACITY {
            match self.arena.alloc_4k() {
                Ok(pfn) => self.frames.push(pfn),
                Err(e) if self.frames.len() < min => return Err(e),
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// A zeroed frame, if the cache has one.
    pub fn pop(&mut self) -> Option<Pfn> {
        self.frames.pop()
    }

    /// Gives back a frame taken with [`MmuMemoryCache::pop`] that was never
    /// published (nothing else can have seen it), zeroed again.
    pub fn give_back(&mut self, pfn: Pfn) {
        self.arena.zero(pfn);
        self.frames.push(pfn);
    }
}

impl Drop for MmuMemoryCache {
    fn drop(&mut self) {
        for pfn in self.frames.drain(..) {
            // Never published: no walker can be inside it.
            let _ = self.arena.free(pfn, PageSize::Size4K);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topup_fills_to_capacity_and_settles_for_the_minimum_when_memory_runs_out() {
        let arena = Arc::new(FrameArena::with_reserve(16 << 20).unwrap());
        let mut cache = MmuMemoryCache::new(arena.clone());
        cache.topup(4).unwrap();
        assert_eq!(cache.len(), MmuMemoryCache::CAPACITY);
        let mut full = MmuMemoryCache::new(arena.clone());
        // The 3rd allocation fails: 2 frames are enough for a minimum of 2 ...
        arena.fail_nth(3);
        full.topup(2).unwrap();
        assert_eq!(full.len(), 2);
        // ... but not for 5.
        drop(full);
        let mut short = MmuMemoryCache::new(arena.clone());
        arena.fail_nth(3);
        assert!(matches!(short.topup(5), Err(FrameError::OutOfFrames { .. })));
        drop(short);
        drop(cache);
        assert_eq!(arena.allocated_frames(), 0, "a dropped cache frees its frames");
    }

    #[test]
    fn a_frame_given_back_is_zeroed() {
        let arena = Arc::new(FrameArena::with_reserve(16 << 20).unwrap());
        let mut cache = MmuMemoryCache::new(arena.clone());
        cache.topup(1).unwrap();
        let pfn = cache.pop().unwrap();
        arena.table(pfn)[7].store(0x1234, std::sync::atomic::Ordering::Relaxed);
        cache.give_back(pfn);
        assert!(
            arena
                .table(pfn)
                .iter()
                .all(|w| w.load(std::sync::atomic::Ordering::Relaxed) == 0)
        );
    }
}
