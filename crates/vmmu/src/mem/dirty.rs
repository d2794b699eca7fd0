//! Dirty logging structures: per-memslot bitmaps and per-vCPU dirty rings.
//!
//! A [`DirtyBitmap`] has one bit per page of its memslot, in atomic 64-page
//! words, so vCPUs mark pages concurrently with the VMM collecting them:
//! [`DirtyBitmap::get_and_clear`] is `KVM_GET_DIRTY_LOG` (each word is
//! exchanged with zero, so a bit set concurrently lands in this snapshot or
//! the next, never neither); with manual protection
//! ([`DirtyBitmap::snapshot`] + [`DirtyBitmap::clear`]) the VMM clears
//! what it has handled (`KVM_CLEAR_DIRTY_LOG`). Either way the MMU must
//! write-protect the pages whose bits were collected/cleared.
//!
//! A [`DirtyRing`] is KVM's per-vCPU ring of (slot, offset) entries: the
//! vCPU pushes, the VMM harvests (marks entries collected) and asks for a
//! reset, which hands the collected entries back so the MMU re-protects
//! them and frees the ring space.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

/// One bit per page of a memslot.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    npages: u64,
}

impl DirtyBitmap {
    /// A bitmap for `npages` pages, all clear or (KVM_DIRTY_LOG_INITIALLY_SET)
    /// all set.
    pub fn new(npages: u64, initially_set: bool) -> Self {
        let nwords = npages.div_ceil(64) as usize;
        let words = (0..nwords)
            .map(|i| {
                let v = if !initially_set {
                    0
                } else {
                    let left = npages - i as u64 * 64;
                    if left >= 64 { u64::MAX } else { (1 << left) - 1 }
                };
                AtomicU64::new(v)
            })
            .collect();
        Self { words, npages }
    }

    /// Pages covered.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Number of 64-page words.
    pub fn nwords(&self) -> usize {
        self.words.len()
    }

    /// Sets the bit of page `rel` (relative to the slot's first gfn).
    ///
    /// # Panics
    /// If `rel` is outside the slot.
    #[inline]
    pub fn mark(&self, rel: u64) {
        assert!(rel < self.npages, "page {rel} outside a {}-page bitmap", self.npages);
        let bit = 1u64 << (rel % 64);
        let w = &self.words[(rel / 64) as usize];
        if crate::sync::drop_dirty(std::ptr::from_ref(w) as u64 ^ (rel % 64)) {
            return;
        }
        // Test before the RMW: most marks hit pages already dirty.
        if w.load(Ordering::Relaxed) & bit == 0 {
            w.fetch_or(bit, Ordering::Release);
        }
    }

    /// Whether page `rel` is marked.
    pub fn is_dirty(&self, rel: u64) -> bool {
        rel < self.npages && self.words[(rel / 64) as usize].load(Ordering::Acquire) & (1 << (rel % 64)) != 0
    }

    /// KVM_GET_DIRTY_LOG without manual protection: a copy of the bitmap,
    /// each word atomically exchanged with zero.
    pub fn get_and_clear(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect()
    }

    /// KVM_GET_DIRTY_LOG with manual protection: a copy, nothing cleared.
    pub fn snapshot(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.load(Ordering::Acquire)).collect()
    }

    /// KVM_CLEAR_DIRTY_LOG: clears the bits set in `mask` for pages
    /// `first_page..first_page + 64 * mask.len()` (`first_page` a multiple
    /// of 64, inside the slot). Returns, per word, the bits that were set
    /// and are now cleared: those pages must be write-protected again.
    pub fn clear(&self, first_page: u64, mask: &[u64]) -> Vec<u64> {
        assert!(
            first_page.is_multiple_of(64) && first_page / 64 + mask.len() as u64 <= self.words.len() as u64,
            "clear range must be 64-aligned and inside the bitmap (checked by the caller)"
        );
        let first = (first_page / 64) as usize;
        mask.iter()
            .enumerate()
            .map(|(i, &m)| {
                if m == 0 {
                    0
                } else {
                    self.words[first + i].fetch_and(!m, Ordering::AcqRel) & m
                }
            })
            .collect()
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// Flag of a ring entry: dirty, not yet harvested (`KVM_DIRTY_GFN_F_DIRTY`).
pub const DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// Flag of a ring entry: harvested, waiting for reset (`KVM_DIRTY_GFN_F_RESET`).
pub const DIRTY_GFN_F_RESET: u32 = 1 << 1;

/// Entries kept free below the ring size so a vCPU can finish what it is
/// doing after the soft limit (`KVM_DIRTY_RING_RSVD_ENTRIES`, 64 + the
/// largest burst a single exit can push).
pub const DIRTY_RING_RSVD_ENTRIES: u32 = 64;

/// A ring slot (`struct kvm_dirty_gfn`).
#[derive(Debug, Default)]
struct RingEntry {
    flags: AtomicU32,
    slot: AtomicU32,
    offset: AtomicU64,
}

/// A dirty page as the ring reports it: the memslot (`as_id << 16 | id`)
/// and the page offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DirtyGfn {
    /// `as_id << 16 | slot id`, as KVM encodes it.
    pub slot: u32,
    /// Page offset within the memslot.
    pub offset: u64,
}

/// The ring is completely full: the push was dropped (KVM warns; the vCPU
/// should have exited at the soft limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("dirty ring of {size} entries is full")]
pub struct RingFull {
    /// The ring size.
    pub size: u32,
}

/// A per-vCPU dirty ring (`struct kvm_dirty_ring`).
#[derive(Debug)]
pub struct DirtyRing {
    entries: Box<[RingEntry]>,
    /// Producer index (`dirty_index`), owned by the vCPU.
    dirty_index: Mutex<u32>,
    /// Consumer of reset entries (`reset_index`), owned by the reset path.
    reset_index: Mutex<u32>,
    soft_limit: u32,
}

impl DirtyRing {
    /// A ring of `size` entries, a power of two larger than
    /// [`DIRTY_RING_RSVD_ENTRIES`].
    ///
    /// # Panics
    /// On any other size.
    pub fn new(size: u32) -> Self {
        assert!(
            size.is_power_of_two() && size > DIRTY_RING_RSVD_ENTRIES,
            "dirty ring size {size} must be a power of two above {DIRTY_RING_RSVD_ENTRIES}"
        );
        Self {
            entries: (0..size).map(|_| RingEntry::default()).collect(),
            dirty_index: Mutex::new(0),
            reset_index: Mutex::new(0),
            soft_limit: size - DIRTY_RING_RSVD_ENTRIES,
        }
    }

    /// Number of entries.
    pub fn size(&self) -> u32 {
        self.entries.len() as u32
    }

    fn used(&self, dirty_index: u32) -> u32 {
        dirty_index.wrapping_sub(*self.reset_index.lock())
    }

    /// Entries pushed and not yet reset.
    pub fn used_entries(&self) -> u32 {
        self.used(*self.dirty_index.lock())
    }

    /// Whether the ring reached its soft limit: the vCPU must exit to the
    /// VMM (`KVM_EXIT_DIRTY_RING_FULL`) and wait for a reset.
    // The vCPU's fast path checks it before every TLB hit.
    #[inline]
    pub fn soft_full(&self) -> bool {
        self.used_entries() >= self.soft_limit
    }

    /// The vCPU pushes a dirty page. `Ok(true)` when the ring reached its
    /// soft limit with this push.
    pub fn push(&self, slot: u32, offset: u64) -> Result<bool, RingFull> {
        let mut di = self.dirty_index.lock();
        if self.used(*di) >= self.size() {
            return Err(RingFull { size: self.size() });
        }
        let e = &self.entries[(*di & (self.size() - 1)) as usize];
        e.slot.store(slot, Ordering::Relaxed);
        e.offset.store(offset, Ordering::Relaxed);
        // Release: the VMM that sees the flag sees slot and offset.
        e.flags.store(DIRTY_GFN_F_DIRTY, Ordering::Release);
        *di = di.wrapping_add(1);
        Ok(self.used(*di) >= self.soft_limit)
    }

    /// The VMM harvests entries from `*fetch_index` (its own cursor) while
    /// they are dirty, marking each collected (`F_RESET`).
    pub fn harvest(&self, fetch_index: &mut u32) -> Vec<DirtyGfn> {
        let mut out = Vec::new();
        loop {
            let e = &self.entries[(*fetch_index & (self.size() - 1)) as usize];
            if e.flags.load(Ordering::Acquire) != DIRTY_GFN_F_DIRTY {
                return out;
            }
            out.push(DirtyGfn {
                slot: e.slot.load(Ordering::Relaxed),
                offset: e.offset.load(Ordering::Relaxed),
            });
            e.flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
            *fetch_index = fetch_index.wrapping_add(1);
        }
    }

    /// `KVM_RESET_DIRTY_RINGS` for this ring: frees every harvested entry
    /// from the reset index on, returning them so the MMU re-protects the
    /// pages.
    pub fn reset(&self) -> Vec<DirtyGfn> {
        let mut ri = self.reset_index.lock();
        let mut out = Vec::new();
        loop {
            let e = &self.entries[(*ri & (self.size() - 1)) as usize];
            if e.flags.load(Ordering::Acquire) != DIRTY_GFN_F_RESET {
                return out;
            }
            out.push(DirtyGfn {
                slot: e.slot.load(Ordering::Relaxed),
                offset: e.offset.load(Ordering::Relaxed),
            });
            e.flags.store(0, Ordering::Release);
            *ri = ri.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_get_clear_and_initially_set() {
        let b = DirtyBitmap::new(130, false);
        assert_eq!(b.nwords(), 3);
        b.mark(0);
        b.mark(65);
        b.mark(129);
        assert_eq!(b.count(), 3);
        assert_eq!(b.snapshot(), vec![1, 2, 2]);
        assert_eq!(b.clear(64, &[0b110, 0b10]), vec![0b10, 0b10]);
        assert_eq!(b.get_and_clear(), vec![1, 0, 0]);
        assert_eq!(b.count(), 0);
        let s = DirtyBitmap::new(130, true);
        assert_eq!(s.count(), 130);
        assert_eq!(s.snapshot()[2], 0b11);
    }

    #[test]
    fn ring_push_harvest_reset_and_soft_limit() {
        let r = DirtyRing::new(128);
        let mut fetch = 0;
        for i in 0..63 {
            assert_eq!(r.push(1, i), Ok(false));
        }
        assert_eq!(r.push(1, 63), Ok(true), "64 used = 128 - 64 reserved");
        assert!(r.soft_full());
        let got = r.harvest(&mut fetch);
        assert_eq!(got.len(), 64);
        assert_eq!(got[5], DirtyGfn { slot: 1, offset: 5 });
        assert!(r.harvest(&mut fetch).is_empty());
        assert!(r.soft_full(), "harvest alone frees nothing");
        assert_eq!(r.reset().len(), 64);
        assert!(!r.soft_full());
        for i in 0..128 {
            r.push(2, i).unwrap();
        }
        assert_eq!(r.push(2, 999), Err(RingFull { size: 128 }));
        // Only harvested entries are reset.
        assert!(r.reset().is_empty());
        assert_eq!(r.harvest(&mut fetch).len(), 128);
        assert_eq!(r.reset().len(), 128);
    }
}
