//! KVM's side of the MMU-notifier protocol: the invalidation retry
//! protocol (seed `004_*`) and the fault-in of a host page.
//!
//! The host ([`HostAddressSpace`]) tells every subscribed [`MmuNotifier`](crate::host::MmuNotifier)
//! before it changes or removes a mapping (`invalidate_range_start`) and
//! after (`invalidate_range_end`). The KVM side keeps an
//! [`InvalidateState`]: an in-progress count with the union of the ranges
//! being invalidated, and `mmu_invalidate_seq`, bumped at the end of every
//! invalidation. A page fault samples the sequence *before* it looks the
//! host mapping up ([`faultin_pfn`]) and may install what it found only if,
//! under `mmu_lock`, no invalidation of that address is in progress and none
//! ended since the sample ([`HostMapping::validate`]).
//!
//! # Using the host mapping level safely
//!
//! The level of a host mapping ([`HostAddressSpace::host_pfn_mapping_level`])
//! can change at any moment (a THP split or collapse). Its lookup reads each
//! host page-table entry exactly once, but the result may be stale by the
//! time it is used. There are three safe ways to use it:
//!
//! 1. Check the retry protocol *after* grabbing the level and *before*
//!    consuming it, holding `mmu_lock` while checking: that is what
//!    [`faultin_pfn`] + [`HostMapping::validate`] enforce in the types (the
//!    level and pfn are only readable from the [`ValidatedMapping`]).
//! 2. Hold `mmu_lock` and make sure no invalidation of the hva is in
//!    progress, e.g. because a valid leaf SPTE already covers it:
//!    [`stable_host_level`] checks the in-progress range under the guard.
//! 3. Use the level only to decide whether to *zap* (never to install), for
//!    which no lock is needed: call `host_pfn_mapping_level` directly.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::{Bug, MmuLockHeld, MmuWriteLockHeld, bug, sched_point};

use crate::addr::{Gfn, Hva, Level, Pfn};
use crate::host::{HostAddressSpace, HvaRange};
use crate::mem::error::FaultinError;
use crate::mem::memslot::Memslot;

/// "No range": the in-progress range before any `range_add`.
const INVALID_HVA: u64 = u64::MAX;

/// KVM's invalidation bookkeeping (`mmu_invalidate_seq`,
/// `mmu_invalidate_in_progress`, `mmu_invalidate_range_start/end`), which
/// every MMU embeds next to its `mmu_lock`.
///
/// The range is tracked in host virtual addresses, as KVM did before it
/// moved to gfns for guest_memfd: the host mapping was looked up by hva,
/// and an hva range is immune to memslot aliasing.
///
/// Updates need the write lock; checks need the lock (either mode), except
/// the sampling of the sequence and the lock-free early check.
#[derive(Debug)]
pub struct InvalidateState {
    seq: AtomicU64,
    in_progress: AtomicU64,
    range_start: AtomicU64,
    range_end: AtomicU64,
    /// Starts since `in_progress` last left 0: the range is the union of
    /// their ranges until it returns to 0.
    episode_begins: AtomicU64,
    /// Seed 004's unsafe policy: [`HostMappingUse::Unchecked`].
    unchecked: std::sync::atomic::AtomicBool,
}

/// Whether a fault consumes the host mapping it looked up only after the
/// retry check (rule 1 of the host level, above): seed 004's question, a
/// runtime policy of the MMU's invalidation state
/// ([`InvalidateState::set_host_mapping_use`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HostMappingUse {
    /// [`HostMapping::validate`] refuses a mapping an invalidation may
    /// have changed since it was looked up (KVM).
    #[default]
    RetryChecked,
    /// Unsafe: `validate` always succeeds, so the level and frame are
    /// consumed even when an invalidation of the hva ran or runs: the
    /// SPTE may map a frame the host has moved, or a level the host has
    /// split.
    Unchecked,
}

impl Default for InvalidateState {
    fn default() -> Self {
        Self::new()
    }
}

impl InvalidateState {
    /// No invalidation seen yet.
    pub const fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            in_progress: AtomicU64::new(0),
            range_start: AtomicU64::new(INVALID_HVA),
            range_end: AtomicU64::new(INVALID_HVA),
            episode_begins: AtomicU64::new(0),
            unchecked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Seed 004: whether faults consume host mappings only after the retry
    /// check ([`HostMappingUse`]).
    pub fn set_host_mapping_use(&self, how: HostMappingUse) {
        self.unchecked
            .store(how == HostMappingUse::Unchecked, Ordering::Relaxed);
    }

    /// `kvm_mmu_invalidate_begin`: one more invalidation in progress; the
    /// first resets the range.
    pub fn begin(&self, _lock: &impl MmuWriteLockHeld) {
        if self.in_progress.fetch_add(1, Ordering::AcqRel) == 0 {
            self.range_start.store(INVALID_HVA, Ordering::Relaxed);
            self.range_end.store(INVALID_HVA, Ordering::Relaxed);
            self.episode_begins.store(1, Ordering::Relaxed);
        } else {
            self.episode_begins.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `kvm_mmu_invalidate_range_add`: widens the in-progress range to
    /// cover `range`.
    ///
    /// # Panics
    /// If no invalidation is in progress (`begin` was not called).
    pub fn range_add(&self, _lock: &impl MmuWriteLockHeld, range: HvaRange) {
        assert!(
            self.in_progress.load(Ordering::Relaxed) > 0,
            "mmu_invalidate_range_add without mmu_invalidate_begin"
        );
        let start = self.range_start.load(Ordering::Relaxed);
        if start == INVALID_HVA {
            self.range_start.store(range.start.raw(), Ordering::Relaxed);
            self.range_end.store(range.end.raw(), Ordering::Relaxed);
        } else {
            let end = self.range_end.load(Ordering::Relaxed);
            self.range_start.store(start.min(range.start.raw()), Ordering::Relaxed);
            self.range_end.store(end.max(range.end.raw()), Ordering::Relaxed);
        }
    }

    /// `kvm_mmu_invalidate_end`: bumps `mmu_invalidate_seq` *then* drops the
    /// in-progress count, so a checker never sees neither.
    ///
    /// # Panics
    /// If no invalidation is in progress.
    pub fn end(&self, _lock: &impl MmuWriteLockHeld) {
        self.seq.fetch_add(1, Ordering::Release);
        let prev = self.in_progress.fetch_sub(1, Ordering::Release);
        assert!(prev > 0, "mmu_invalidate_end without mmu_invalidate_begin");
    }

    /// Samples `mmu_invalidate_seq` (acquire: host page-table reads after it
    /// cannot move before it). Take it before looking the host mapping up.
    #[inline]
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// `mmu_invalidate_in_progress`.
    pub fn in_progress(&self) -> u64 {
        self.in_progress.load(Ordering::Acquire)
    }

    /// The union of the in-progress ranges, if any was added.
    pub fn range(&self) -> Option<HvaRange> {
        let start = self.range_start.load(Ordering::Acquire);
        (start != INVALID_HVA).then(|| HvaRange {
            start: Hva::new(start),
            end: Hva::new(self.range_end.load(Ordering::Acquire)),
        })
    }

    /// Whether an invalidation in progress covers `hva`.
    pub fn in_progress_covers(&self, hva: Hva) -> bool {
        if self.in_progress.load(Ordering::Acquire) == 0 {
            return false;
        }
        let start = self.range_start.load(Ordering::Acquire);
        // An invalidation that has not added its range yet covers everything.
        start == INVALID_HVA || (start <= hva.raw() && hva.raw() < self.range_end.load(Ordering::Acquire))
    }

    /// Whether the in-progress range covers `hva` and is exactly the range
    /// one start zapped: one invalidation began since none was in progress
    /// (and it has not ended). An SPTE there was installed since: what an
    /// audit may flag. After several starts (a KSM merge's two pages, or
    /// overlapping invalidations) the range is their union until every one
    /// has ended, and covers SPTEs between them that stand rightly. Exact
    /// under `mmu_lock` (starts and ends take it for writing).
    pub fn sole_invalidation_covers(&self, hva: Hva) -> bool {
        self.in_progress.load(Ordering::Acquire) == 1
            && self.episode_begins.load(Ordering::Relaxed) == 1
            && self.in_progress_covers(hva)
    }

    /// `mmu_invalidate_retry_hva`: whether a fault that sampled `mmu_seq`
    /// must retry for `hva`, because an invalidation covering it is in
    /// progress or one ended since the sample. Needs `mmu_lock`.
    pub fn retry_hva(&self, _lock: &impl MmuLockHeld, mmu_seq: u64, hva: Hva) -> bool {
        self.in_progress_covers(hva) || self.seq.load(Ordering::Acquire) != mmu_seq
    }

    /// `mmu_invalidate_retry_gfn_unsafe`: the same check without the lock,
    /// to bail out early before taking it. A false "no retry" is harmless
    /// because [`HostMapping::validate`] checks again under the lock; a
    /// false "retry" only costs a retry.
    pub fn retry_hva_unlocked(&self, mmu_seq: u64, hva: Hva) -> bool {
        self.in_progress_covers(hva) || self.seq.load(Ordering::Acquire) != mmu_seq
    }
}

/// What a fault found in the host address space, not yet safe to install.
///
/// The frame and level can only be read from the [`ValidatedMapping`] that
/// [`HostMapping::validate`] returns under `mmu_lock` (seed `004_*`).
#[derive(Debug)]
#[must_use = "a host mapping must be validated under mmu_lock before use"]
pub struct HostMapping {
    pfn: Pfn,
    level: Level,
    writable: bool,
    seq: u64,
    hva: Hva,
}

/// A fault must be retried: the host mapping may have changed since it was
/// looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Retry {
    /// The sequence the fault sampled.
    pub sampled_seq: u64,
    /// The sequence at validation.
    pub current_seq: u64,
    /// Whether an invalidation covering the hva was in progress.
    pub in_progress: bool,
}

impl HostMapping {
    /// The host virtual address that was looked up.
    pub fn hva(&self) -> Hva {
        self.hva
    }

    /// The `mmu_invalidate_seq` sampled before the lookup.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether the host mapping was writable (KVM's `map_writable`).
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Re-checks, under `mmu_lock`, that no invalidation covering the hva is
    /// in progress and none ended since the sample (`mmu_invalidate_retry`).
    /// Only then are the frame and level usable, for as long as the guard.
    pub fn validate<'g, G: MmuLockHeld>(
        self,
        guard: &'g G,
        state: &InvalidateState,
    ) -> Result<ValidatedMapping<'g>, Retry> {
        if state.retry_hva(guard, self.seq, self.hva)
            && !state.unchecked.load(Ordering::Relaxed)
            && !crate::sync::take_bug(crate::sync::Bug::SkipNotifierRetry)
        {
            return Err(Retry {
                sampled_seq: self.seq,
                current_seq: state.seq(),
                in_progress: state.in_progress_covers(self.hva),
            });
        }
        Ok(ValidatedMapping {
            pfn: self.pfn,
            level: self.level,
            writable: self.writable,
            hva: self.hva,
            _lock: PhantomData,
        })
    }
}

/// A host mapping checked against the invalidation protocol under
/// `mmu_lock`; valid only while the guard it borrows is held.
#[derive(Clone, Copy, Debug)]
pub struct ValidatedMapping<'g> {
    pfn: Pfn,
    level: Level,
    writable: bool,
    hva: Hva,
    _lock: PhantomData<&'g ()>,
}

impl ValidatedMapping<'_> {
    /// The host frame of the 4 KiB page holding the hva (for a huge host
    /// mapping, the frame inside the huge run, not its head).
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }

    /// The host mapping level: 4K, 2M or 1G.
    pub fn host_level(&self) -> Level {
        self.level
    }

    /// Whether the host mapping is writable.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The host virtual address.
    pub fn hva(&self) -> Hva {
        self.hva
    }

    /// The level to map at: the smaller of the host level and `max` (the
    /// memslot's limit from [`Memslot::max_mapping_level`]).
    pub fn mapping_level(&self, max: Level) -> Level {
        self.level.min(max)
    }

    /// The frame a leaf at `level` (≤ the host level) must point at: the
    /// pfn aligned down to the level's size.
    pub fn pfn_at(&self, level: Level) -> Pfn {
        assert!(
            level <= self.level,
            "a {level:?} leaf cannot map a {:?} host mapping",
            self.level
        );
        self.pfn.align_down(level.pages())
    }
}

/// `kvm_faultin_pfn`: samples `mmu_invalidate_seq`, then finds (faulting in
/// if needed, like `get_user_pages`) the host frame backing `hva`, writable
/// if `write`. The result must be validated under `mmu_lock`.
pub fn faultin_pfn(
    host: &HostAddressSpace,
    state: &InvalidateState,
    hva: Hva,
    write: bool,
) -> Result<HostMapping, FaultinError> {
    // Sample before the lookup (acquire orders the walk after it).
    let early = !bug(Bug::SeqSampledAfterLookup);
    let mut seq = if early { state.seq() } else { 0 };
    loop {
        // Model tests: an invalidation may run between the sample and the
        // lookup, and between the lookup and the validation.
        sched_point();
        if let Some(leaf) = host.lookup(hva)
            && (!write || leaf.writable)
        {
            sched_point();
            if !early {
                // Injected bug (model tests only): sampled too late, an
                // invalidation that ended since the lookup goes unseen.
                seq = state.seq();
            }
            return Ok(HostMapping {
                pfn: leaf.pfn,
                level: leaf.level,
                writable: leaf.writable,
                seq,
                hva,
            });
        }
        host.fault_in(hva, write)?;
    }
}

/// [`faultin_pfn`] for a gfn of a memslot: refuses writes to read-only
/// memslots and gfns outside the slot.
pub fn faultin_gfn(
    host: &HostAddressSpace,
    state: &InvalidateState,
    slot: &Memslot,
    gfn: Gfn,
    write: bool,
) -> Result<HostMapping, FaultinError> {
    let hva = slot.gfn_to_hva(gfn).ok_or(FaultinError::GfnOutsideSlot {
        gfn,
        slot_id: slot.id(),
    })?;
    if write && slot.is_readonly() {
        return Err(FaultinError::ReadOnlyMemslot {
            gfn,
            slot_id: slot.id(),
        });
    }
    faultin_pfn(host, state, hva, write)
}

/// Rule 2 of the host level: under `mmu_lock`, with no invalidation of
/// `hva` in progress, the host level can be read and used (e.g. to promote
/// an existing valid leaf). `Err(Retry)` when an invalidation covers it;
/// `Ok(None)` when the hva is not mapped.
pub fn stable_host_level(
    host: &HostAddressSpace,
    state: &InvalidateState,
    guard: &impl MmuLockHeld,
    hva: Hva,
) -> Result<Option<Level>, Retry> {
    let _ = guard.held();
    if state.in_progress_covers(hva) {
        let seq = state.seq();
        return Err(Retry {
            sampled_seq: seq,
            current_seq: seq,
            in_progress: true,
        });
    }
    Ok(host.host_pfn_mapping_level(hva))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::MmuLock;

    #[test]
    fn retry_protocol_follows_kvm() {
        let lock = MmuLock::new(());
        let st = InvalidateState::new();
        let seq = st.seq();
        let hva = Hva::new(0x20_0000);
        {
            let r = lock.read();
            assert!(!st.retry_hva(&r, seq, hva));
        }
        {
            let w = lock.write();
            st.begin(&w);
            // Before range_add, the invalidation covers everything.
            assert!(st.retry_hva(&w, seq, Hva::new(0x9999_0000)));
            st.range_add(&w, HvaRange::new(Hva::new(0x20_0000), 0x1000));
            st.range_add(&w, HvaRange::new(Hva::new(0x40_0000), 0x1000));
            assert_eq!(
                st.range(),
                Some(HvaRange {
                    start: Hva::new(0x20_0000),
                    end: Hva::new(0x40_1000)
                })
            );
            assert!(st.retry_hva(&w, seq, Hva::new(0x30_0000)));
            assert!(!st.retry_hva(&w, seq, Hva::new(0x50_0000)));
            st.end(&w.held_write());
        }
        let r = lock.read();
        assert_eq!(st.in_progress(), 0);
        assert_eq!(st.seq(), seq + 1);
        assert!(st.retry_hva(&r, seq, Hva::new(0x50_0000)), "seq moved");
        assert!(!st.retry_hva(&r.held(), seq + 1, hva));
    }

    /// Regression: the audit flagged SPTEs between the two pages of a KSM
    /// merge (two starts, one union range) as standing in an invalidated
    /// range, also after the first of the two ended.
    #[test]
    fn only_a_single_start_s_range_is_what_it_zapped() {
        let lock = MmuLock::new(());
        let st = InvalidateState::new();
        let (a, b, between) = (Hva::new(0x20_0000), Hva::new(0x80_0000), Hva::new(0x40_0000));
        let w = lock.write();
        st.begin(&w);
        st.range_add(&w, HvaRange::new(a, 0x1000));
        assert!(st.sole_invalidation_covers(a));
        assert!(!st.sole_invalidation_covers(between));
        st.begin(&w);
        st.range_add(&w, HvaRange::new(b, 0x1000));
        assert!(
            st.in_progress_covers(between),
            "the union covers what neither start zapped"
        );
        assert!(!st.sole_invalidation_covers(between));
        st.end(&w.held_write());
        assert_eq!(st.in_progress(), 1);
        assert!(
            !st.sole_invalidation_covers(between),
            "the union outlives the first end"
        );
        st.end(&w.held_write());
        st.begin(&w);
        st.range_add(&w, HvaRange::new(b, 0x1000));
        assert!(st.sole_invalidation_covers(b) && !st.sole_invalidation_covers(between));
        st.end(&w.held_write());
    }
}
