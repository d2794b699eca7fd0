//! MMU notifiers and the invalidation retry protocol (seed `004_*`).
//!
//! The host ([`HostAddressSpace`]) tells every subscribed [`MmuNotifier`]
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
//!
//! # The lock
//!
//! `mmu_lock` belongs to the MMU layer, which is above this one. This module
//! defines the primitive it is built on, [`MmuLock`], whose guards are the
//! only values implementing the sealed [`MmuLockHeld`] (read or write) and
//! [`MmuWriteLockHeld`] traits. Functions that must run under the lock take
//! `&impl MmuLockHeld`; a wrapper guard hands out its inner guard's
//! [`HeldMmuLock`] token.

use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::percpu::{SHARDS, shard_index};
use crate::sync::{Bug, bug, sched_point};

use crate::addr::{Gfn, Hva, Level, Pfn};
use crate::mem::error::FaultinError;
use crate::mem::host::HostAddressSpace;
use crate::mem::memslot::Memslot;

/// A half-open range of host virtual addresses `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HvaRange {
    /// First address.
    pub start: Hva,
    /// One past the last address.
    pub end: Hva,
}

impl HvaRange {
    /// The range `[start, start + len)`.
    pub const fn new(start: Hva, len: u64) -> Self {
        Self {
            start,
            end: start.add(len),
        }
    }

    /// Whether `hva` is in the range.
    #[inline]
    pub fn contains(&self, hva: Hva) -> bool {
        self.start <= hva && hva < self.end
    }

    /// Whether the two ranges share an address.
    #[inline]
    pub fn overlaps(&self, other: &HvaRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.offset_from(self.start)
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Why the host invalidates a range (Linux's `enum mmu_notifier_event`,
/// refined so tests and traces can tell the operations apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotifierEvent {
    /// munmap, or teardown of the address space.
    Unmap,
    /// mprotect to read-only.
    Protection,
    /// Page migration to a new frame.
    Migrate,
    /// Swap-out of a page.
    SwapOut,
    /// THP collapse: 512 small mappings become one huge mapping.
    Collapse,
    /// THP split: one huge mapping becomes 512 small ones.
    Split,
    /// KSM merge: a page becomes a read-only shared page.
    KsmMerge,
    /// Copy-on-write break of a shared (KSM) page.
    CowBreak,
}

/// An invalidation as delivered to notifiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NotifierRange {
    /// The addresses whose mapping changes.
    pub range: HvaRange,
    /// Why.
    pub event: NotifierEvent,
}

/// A subscriber to the host's mapping changes (Linux's
/// `struct mmu_notifier_ops`). Callbacks run on the host's thread, holding
/// the host's mm lock: they must not access memory through the host
/// address space (that could need the same lock).
pub trait MmuNotifier: Send + Sync {
    /// Before the mappings in `range` change: drop every secondary mapping
    /// of them (KVM: `kvm_mmu_invalidate_begin`, range add, zap).
    fn invalidate_range_start(&self, range: &NotifierRange);

    /// After the mappings changed (KVM: `kvm_mmu_invalidate_end`).
    fn invalidate_range_end(&self, range: &NotifierRange);

    /// Clear the accessed state of the secondary mappings in `range`, with a
    /// TLB flush; return whether any was young.
    fn clear_flush_young(&self, range: HvaRange) -> bool {
        let _ = range;
        false
    }

    /// Like `clear_flush_young` without the flush.
    fn clear_young(&self, range: HvaRange) -> bool {
        let _ = range;
        false
    }

    /// Whether any secondary mapping in `range` is young; changes nothing.
    fn test_young(&self, range: HvaRange) -> bool {
        let _ = range;
        false
    }

    /// The address space is going away: drop every secondary mapping.
    fn release(&self) {}
}

/// Identifies a registration on a host address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NotifierId(pub(crate) u64);

mod sealed {
    pub trait Sealed {}
}

/// Proof that `mmu_lock` is held, for reading or writing. Implemented only
/// by this module's guards and tokens (sealed).
pub trait MmuLockHeld: sealed::Sealed {
    /// The token for this hold of the lock.
    fn held(&self) -> HeldMmuLock<'_>;
}

/// Proof that `mmu_lock` is held for writing. Sealed.
pub trait MmuWriteLockHeld: MmuLockHeld {}

/// A token proving `mmu_lock` is held (for read or write) for `'a`; it has
/// no public constructor, only [`MmuLockHeld::held`] makes one.
#[derive(Clone, Copy, Debug)]
pub struct HeldMmuLock<'a> {
    write: bool,
    _guard: PhantomData<&'a ()>,
}

impl HeldMmuLock<'_> {
    /// Whether the lock is held for writing.
    pub fn is_write(&self) -> bool {
        self.write
    }
}

impl sealed::Sealed for HeldMmuLock<'_> {}
impl MmuLockHeld for HeldMmuLock<'_> {
    fn held(&self) -> HeldMmuLock<'_> {
        *self
    }
}

/// A token proving `mmu_lock` is held for writing for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct HeldMmuWriteLock<'a> {
    _guard: PhantomData<&'a ()>,
}

impl sealed::Sealed for HeldMmuWriteLock<'_> {}
impl MmuLockHeld for HeldMmuWriteLock<'_> {
    fn held(&self) -> HeldMmuLock<'_> {
        HeldMmuLock {
            write: true,
            _guard: PhantomData,
        }
    }
}
impl MmuWriteLockHeld for HeldMmuWriteLock<'_> {}

/// The reader-writer lock `mmu_lock` is built on: a big-reader lock (the
/// idea of Linux's `percpu_rw_semaphore`). It is sharded per thread
/// ([`crate::percpu`]): a reader locks only its thread's shard, so parallel
/// faults share no cache line; a writer locks every shard, in index order.
/// KVM's `rwlock_t` bounces one cache line per read acquisition, which a
/// kernel fault path amortizes; vmmu's fault path is short enough that the
/// one line halved 2-vCPU throughput. Guards prove the hold in the types.
///
/// The protected data is reached through `&T` from either guard; data a
/// writer changes needs its own interior mutability.
///
/// A lock made inside a shuttle model run ([`crate::sync`], `shuttle`
/// feature) is one shuttle `RwLock` instead, because it is held across
/// schedule points: a model's threads share one OS thread (and so one
/// shard), and a `parking_lot` lock would block that thread for good. Such
/// a lock must be used only inside that run.
#[derive(Debug)]
pub struct MmuLock<T> {
    shards: Box<[CachePadded<RwLock<()>>]>,
    #[cfg(feature = "shuttle")]
    model: Option<shuttle::sync::RwLock<()>>,
    data: T,
}

/// How a read guard holds the lock (the guard is kept for its `Drop`).
#[derive(Debug)]
#[allow(dead_code)]
enum ReadHold<'a> {
    Shard(RwLockReadGuard<'a, ()>),
    #[cfg(feature = "shuttle")]
    Model(shuttle::sync::RwLockReadGuard<'a, ()>),
}

/// How a write guard holds the lock (the guards are kept for their `Drop`).
#[derive(Debug)]
#[allow(dead_code)]
enum WriteHold<'a> {
    Shards([RwLockWriteGuard<'a, ()>; SHARDS]),
    #[cfg(feature = "shuttle")]
    Model(shuttle::sync::RwLockWriteGuard<'a, ()>),
}

impl<T: Default> Default for MmuLock<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> MmuLock<T> {
    /// A lock protecting `data`.
    pub fn new(data: T) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| CachePadded::new(RwLock::new(()))).collect(),
            #[cfg(feature = "shuttle")]
            model: crate::sync::in_model().then(|| shuttle::sync::RwLock::new(())),
            data,
        }
    }

    /// Takes the lock for reading (KVM's `read_lock(&kvm->mmu_lock)`).
    pub fn read(&self) -> MmuLockReadGuard<'_, T> {
        #[cfg(feature = "shuttle")]
        if let Some(model) = &self.model {
            return MmuLockReadGuard {
                _hold: ReadHold::Model(model.read().expect("a model thread panicked holding mmu_lock")),
                data: &self.data,
            };
        }
        MmuLockReadGuard {
            _hold: ReadHold::Shard(self.shards[shard_index()].read()),
            data: &self.data,
        }
    }

    /// Takes the lock for writing: every shard, in index order (the one
    /// lock order, so two writers never deadlock).
    pub fn write(&self) -> MmuLockWriteGuard<'_, T> {
        MmuLockWriteGuard {
            hold: Some(self.write_hold()),
            lock: self,
        }
    }

    fn write_hold(&self) -> WriteHold<'_> {
        #[cfg(feature = "shuttle")]
        if let Some(model) = &self.model {
            return WriteHold::Model(model.write().expect("a model thread panicked holding mmu_lock"));
        }
        WriteHold::Shards(std::array::from_fn(|i| self.shards[i].write()))
    }

    /// The protected data, consuming the lock.
    pub fn into_inner(self) -> T {
        self.data
    }
}

/// `mmu_lock` held for reading.
#[derive(Debug)]
pub struct MmuLockReadGuard<'a, T> {
    _hold: ReadHold<'a>,
    data: &'a T,
}

/// `mmu_lock` held for writing.
#[derive(Debug)]
pub struct MmuLockWriteGuard<'a, T> {
    /// Always `Some` but inside [`MmuLockWriteGuard::unlocked`].
    hold: Option<WriteHold<'a>>,
    lock: &'a MmuLock<T>,
}

impl<T> Deref for MmuLockReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.data
    }
}

impl<T> Deref for MmuLockWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.lock.data
    }
}

impl<T> sealed::Sealed for MmuLockReadGuard<'_, T> {}
impl<T> MmuLockHeld for MmuLockReadGuard<'_, T> {
    fn held(&self) -> HeldMmuLock<'_> {
        HeldMmuLock {
            write: false,
            _guard: PhantomData,
        }
    }
}

impl<T> sealed::Sealed for MmuLockWriteGuard<'_, T> {}
impl<T> MmuLockHeld for MmuLockWriteGuard<'_, T> {
    fn held(&self) -> HeldMmuLock<'_> {
        HeldMmuLock {
            write: true,
            _guard: PhantomData,
        }
    }
}
impl<T> MmuWriteLockHeld for MmuLockWriteGuard<'_, T> {}

impl<T> MmuLockWriteGuard<'_, T> {
    /// The write-hold token.
    pub fn held_write(&self) -> HeldMmuWriteLock<'_> {
        HeldMmuWriteLock { _guard: PhantomData }
    }

    /// Releases the lock, runs `f`, and takes the lock again (KVM drops
    /// `mmu_lock` this way to allocate, or to yield in a long walk). Taking
    /// `&mut self` ends every borrow of the guard first: nothing obtained
    /// under the lock (a token, a validated host mapping) survives into `f`
    /// or past it. The caller must treat what it read under the lock as
    /// stale afterwards (a cursor restarts from the root).
    pub fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        drop(self.hold.take());
        let r = f();
        self.hold = Some(self.lock.write_hold());
        r
    }
}

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
        }
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
        if state.retry_hva(guard, self.seq, self.hva) && !crate::sync::take_bug(crate::sync::Bug::SkipNotifierRetry) {
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
