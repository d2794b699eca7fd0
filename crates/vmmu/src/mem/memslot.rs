//! Memslots: gfn ranges → hva ranges, per address space (0 normal, 1 SMM).
//!
//! The set of memslots of an address space is an immutable snapshot
//! ([`Memslots`], sorted by gfn, looked up by binary search) published
//! through `ArcSwap`, as KVM publishes its SRCU-protected memslots: vCPUs
//! load the current snapshot without locking while the VMM replaces it.
//! An update publishes the new snapshot with the generation's
//! [`MEMSLOT_GEN_UPDATE_IN_PROGRESS`] bit set, waits for every reader of
//! the old snapshot to let go (the SRCU grace period: a reader must not
//! hold a snapshot across an update it waits for), then sets the new
//! generation, which MMIO SPTEs are tagged with.
//!
//! Deleting or moving a slot first publishes a copy of it marked invalid
//! (faults on it must retry), lets every [`MemslotObserver`] zap the slot's
//! mappings, and only then publishes the final set (KVM's
//! `KVM_MEMSLOT_INVALID` dance).
//!
//! Each slot carries KVM's `lpage_info`: per 2 MiB and 1 GiB region a
//! `disallow_lpage` count, non-zero where a huge mapping is not allowed
//! (unaligned head and tail regions; the whole slot if gfn and hva disagree
//! modulo the huge page size; regions the MMU write-tracks).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use bitflags::bitflags;
use parking_lot::{Mutex, RwLock};

use crate::addr::{Gfn, Gpa, Hva, Level, PAGE_SHIFT, PAGE_SIZE};
use crate::host::HvaRange;
use crate::host::mm::HVA_LIMIT;
use crate::mem::dirty::{DirtyBitmap, DirtyRing, RingFull};
use crate::mem::error::MemslotError;

bitflags! {
    /// Memslot flags (`KVM_MEM_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MemslotFlags: u32 {
        /// Track written pages (`KVM_MEM_LOG_DIRTY_PAGES`).
        const LOG_DIRTY_PAGES = 1 << 0;
        /// The guest may not write (`KVM_MEM_READONLY`): writes exit as MMIO.
        const READONLY = 1 << 1;
    }
}

/// Number of address spaces (normal and SMM), `KVM_ADDRESS_SPACE_NUM`.
pub const ADDRESS_SPACE_NUM: u16 = 2;

/// Generation bit set while an update is being published
/// (`KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS`): an MMIO SPTE must not be
/// created, nor a cached one trusted, with such a generation.
pub const MEMSLOT_GEN_UPDATE_IN_PROGRESS: u64 = 1 << 63;

/// How long an update waits for the readers of the old snapshot before it
/// declares a reader stuck (holding a snapshot across the update, which
/// would otherwise deadlock silently, as `synchronize_srcu` inside an SRCU
/// read section does).
const GRACE_PERIOD_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Default guest physical address width.
pub const DEFAULT_GPA_BITS: u8 = 52;

/// VM-wide memslot settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemslotConfig {
    /// Guest physical address width (MAXPHYADDR); slots must end below it.
    pub gpa_bits: u8,
    /// `KVM_DIRTY_LOG_INITIALLY_SET`: a new dirty bitmap starts all set.
    pub dirty_log_initially_set: bool,
    /// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: get-dirty-log does not clear,
    /// clear-dirty-log does.
    pub manual_dirty_log_protect: bool,
}

impl Default for MemslotConfig {
    fn default() -> Self {
        Self {
            gpa_bits: DEFAULT_GPA_BITS,
            dirty_log_initially_set: false,
            manual_dirty_log_protect: false,
        }
    }
}

/// A memslot request (`struct kvm_userspace_memory_region`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Address space: 0 normal, 1 SMM.
    pub as_id: u16,
    /// Slot id, unique within the address space.
    pub id: u16,
    /// Flags.
    pub flags: MemslotFlags,
    /// First guest physical address, 4 KiB aligned.
    pub guest_phys_addr: Gpa,
    /// Size in bytes, 4 KiB aligned, non-zero.
    pub memory_size: u64,
    /// Host virtual address of the first byte, 4 KiB aligned.
    pub userspace_addr: Hva,
}

/// Kinds of memslot change (`enum kvm_mr_change`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemslotChange {
    /// A new slot.
    Create,
    /// A slot removed.
    Delete,
    /// A slot moved to another gfn.
    Move,
    /// Only flags changed (dirty logging on or off).
    FlagsOnly,
}

/// The huge page levels lpage_info covers: 2 MiB and 1 GiB.
const LPAGE_LEVELS: [Level; 2] = [Level::L2, Level::L3];

/// KVM's `kvm_lpage_info` arrays: one `disallow_lpage` count per 2 MiB and
/// per 1 GiB region the slot touches.
#[derive(Debug)]
pub struct LpageInfo {
    disallow: [Box<[AtomicU32]>; 2],
}

#[inline]
fn lpage_index(gfn: Gfn, base: Gfn, level: Level) -> usize {
    let shift = 9 * (u32::from(level.get()) - 1);
    ((gfn.raw() >> shift) - (base.raw() >> shift)) as usize
}

impl LpageInfo {
    fn new(base_gfn: Gfn, npages: u64, userspace_addr: Hva) -> Self {
        let disallow = LPAGE_LEVELS.map(|level| {
            let pages = level.pages();
            let n = lpage_index(base_gfn.add(npages - 1), base_gfn, level) + 1;
            let info: Box<[AtomicU32]> = (0..n).map(|_| AtomicU32::new(0)).collect();
            if !base_gfn.raw().is_multiple_of(pages) {
                info[0].store(1, Ordering::Relaxed);
            }
            if !(base_gfn.raw() + npages).is_multiple_of(pages) {
                info[n - 1].store(1, Ordering::Relaxed);
            }
            let ugfn = userspace_addr.raw() >> PAGE_SHIFT;
            if !(base_gfn.raw() ^ ugfn).is_multiple_of(pages) {
                for i in info.iter() {
                    i.store(1, Ordering::Relaxed);
                }
            }
            info
        });
        Self { disallow }
    }
}

/// One memslot. Immutable but for its atomics (dirty bitmap,
/// `disallow_lpage` counts), shared by the snapshots that contain it.
#[derive(Debug)]
pub struct Memslot {
    as_id: u16,
    id: u16,
    base_gfn: Gfn,
    npages: u64,
    userspace_addr: Hva,
    flags: MemslotFlags,
    invalid: bool,
    lpage_info: Arc<LpageInfo>,
    dirty_bitmap: Option<Arc<DirtyBitmap>>,
}

impl Memslot {
    /// Address space: 0 normal, 1 SMM.
    pub fn as_id(&self) -> u16 {
        self.as_id
    }
    /// Slot id.
    pub fn id(&self) -> u16 {
        self.id
    }
    /// First gfn.
    pub fn base_gfn(&self) -> Gfn {
        self.base_gfn
    }
    /// Number of 4 KiB pages.
    pub fn npages(&self) -> u64 {
        self.npages
    }
    /// One past the last gfn.
    pub fn end_gfn(&self) -> Gfn {
        self.base_gfn.add(self.npages)
    }
    /// Host virtual address of the first page.
    pub fn userspace_addr(&self) -> Hva {
        self.userspace_addr
    }
    /// The host range backing the slot.
    pub fn hva_range(&self) -> HvaRange {
        HvaRange::new(self.userspace_addr, self.npages * PAGE_SIZE)
    }
    /// Flags.
    pub fn flags(&self) -> MemslotFlags {
        self.flags
    }
    /// Guest writes are refused.
    pub fn is_readonly(&self) -> bool {
        self.flags.contains(MemslotFlags::READONLY)
    }
    /// Written pages are logged.
    pub fn logs_dirty_pages(&self) -> bool {
        self.flags.contains(MemslotFlags::LOG_DIRTY_PAGES)
    }
    /// Being deleted or moved (`KVM_MEMSLOT_INVALID`): a fault on it retries.
    pub fn is_invalid(&self) -> bool {
        self.invalid
    }
    /// Whether `gfn` is in the slot.
    #[inline]
    pub fn contains(&self, gfn: Gfn) -> bool {
        gfn.raw().wrapping_sub(self.base_gfn.raw()) < self.npages
    }
    /// `__gfn_to_hva_memslot`, `None` outside the slot.
    #[inline]
    pub fn gfn_to_hva(&self, gfn: Gfn) -> Option<Hva> {
        self.contains(gfn)
            .then(|| self.userspace_addr.add((gfn.raw() - self.base_gfn.raw()) << PAGE_SHIFT))
    }
    /// The hva of a gpa, `None` outside the slot.
    pub fn gpa_to_hva(&self, gpa: Gpa) -> Option<Hva> {
        self.gfn_to_hva(gpa.frame()).map(|h| h.add(gpa.page_offset()))
    }
    /// The gfn an hva of the slot maps, `None` outside the slot.
    pub fn hva_to_gfn(&self, hva: Hva) -> Option<Gfn> {
        let off = hva.raw().checked_sub(self.userspace_addr.raw())? >> PAGE_SHIFT;
        (off < self.npages).then(|| self.base_gfn.add(off))
    }
    /// The gfns whose hvas intersect `r` (how an MMU turns a notifier's hva
    /// range into the gfn range to zap), `None` if none do.
    pub fn hva_range_to_gfns(&self, r: HvaRange) -> Option<Range<Gfn>> {
        let mine = self.hva_range();
        let start = r.start.max(mine.start);
        let end = r.end.min(mine.end);
        if start >= end {
            return None;
        }
        let first = self.base_gfn.add((start.raw() - mine.start.raw()) >> PAGE_SHIFT);
        let last = self.base_gfn.add((end.raw() - mine.start.raw()).div_ceil(PAGE_SIZE));
        Some(first..last)
    }
    /// The dirty bitmap, if the slot logs dirty pages.
    pub fn dirty_bitmap(&self) -> Option<&DirtyBitmap> {
        self.dirty_bitmap.as_deref()
    }
    /// Marks `gfn` dirty in the bitmap if the slot logs dirty pages.
    #[inline]
    pub fn mark_page_dirty(&self, gfn: Gfn) {
        if let Some(b) = &self.dirty_bitmap
            && self.contains(gfn)
        {
            b.mark(gfn.raw() - self.base_gfn.raw());
        }
    }

    /// The `disallow_lpage` count of the `level` (2M or 1G) region holding
    /// `gfn`; `None` for other levels or a gfn outside the slot.
    pub fn disallow_lpage(&self, gfn: Gfn, level: Level) -> Option<u32> {
        let i = LPAGE_LEVELS.iter().position(|&l| l == level)?;
        if !self.contains(gfn) {
            return None;
        }
        Some(self.lpage_info.disallow[i][lpage_index(gfn, self.base_gfn, level)].load(Ordering::Acquire))
    }

    /// `update_gfn_disallow_lpage_count`: adds `delta` (+1 when the MMU
    /// starts write-tracking `gfn`, -1 when it stops) to the count of every
    /// huge region holding `gfn`.
    ///
    /// # Panics
    /// If `gfn` is outside the slot or a count would go below zero (an
    /// unbalanced caller).
    pub fn account_disallow_lpage(&self, gfn: Gfn, delta: i32) {
        assert!(self.contains(gfn), "{gfn:?} outside memslot {}", self.id);
        for (i, &level) in LPAGE_LEVELS.iter().enumerate() {
            let c = &self.lpage_info.disallow[i][lpage_index(gfn, self.base_gfn, level)];
            c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_add_signed(delta))
                .unwrap_or_else(|v| panic!("disallow_lpage {v} + {delta} underflows at {gfn:?}"));
        }
    }

    /// The largest level ≤ `max` at which `gfn` may be mapped as far as the
    /// slot is concerned (KVM's `kvm_mmu_max_mapping_level` without the
    /// host level, which comes from [`crate::mem::ValidatedMapping`]).
    pub fn max_mapping_level(&self, gfn: Gfn, max: Level) -> Level {
        let mut level = max.min(Level::L3);
        while level > Level::L1 {
            if self.disallow_lpage(gfn, level) == Some(0) {
                break;
            }
            level = level.down().expect("level is above 1 here");
        }
        level
    }

    fn copy_with(&self, f: impl FnOnce(&mut Memslot)) -> Memslot {
        let mut s = Memslot {
            lpage_info: self.lpage_info.clone(),
            dirty_bitmap: self.dirty_bitmap.clone(),
            ..*self
        };
        f(&mut s);
        s
    }
}

/// See [`Memslot::max_mapping_level`].
pub fn max_mapping_level(slot: &Memslot, gfn: Gfn, max: Level) -> Level {
    slot.max_mapping_level(gfn, max)
}

/// An immutable snapshot of an address space's memslots, sorted by gfn.
#[derive(Debug)]
pub struct Memslots {
    as_id: u16,
    generation: AtomicU64,
    slots: Vec<Arc<Memslot>>,
    /// `slots[i].base_gfn`, contiguous so the binary search stays in cache.
    bases: Vec<Gfn>,
}

/// A vCPU's last-used memslot, valid for one snapshot generation.
#[derive(Clone, Copy, Debug)]
pub struct SlotCache {
    generation: u64,
    index: usize,
}

impl Default for SlotCache {
    fn default() -> Self {
        Self {
            generation: u64::MAX,
            index: usize::MAX,
        }
    }
}

impl Memslots {
    /// The address space.
    pub fn as_id(&self) -> u16 {
        self.as_id
    }

    /// The generation, with [`MEMSLOT_GEN_UPDATE_IN_PROGRESS`] set while
    /// this snapshot is being published.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slots by ascending gfn.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Memslot>> {
        self.slots.iter()
    }

    /// The slot with id `id`.
    pub fn by_id(&self, id: u16) -> Option<&Arc<Memslot>> {
        self.slots.iter().find(|s| s.id == id)
    }

    fn search(&self, gfn: Gfn) -> Option<usize> {
        let i = self.bases.partition_point(|&b| b <= gfn).checked_sub(1)?;
        self.slots[i].contains(gfn).then_some(i)
    }

    /// The slot holding `gfn`, by binary search (O(log n)).
    #[inline]
    pub fn lookup(&self, gfn: Gfn) -> Option<&Arc<Memslot>> {
        self.search(gfn).map(|i| &self.slots[i])
    }

    /// Like [`Memslots::lookup`], trying the vCPU's last-used slot first
    /// (`kvm_vcpu_gfn_to_memslot`).
    #[inline]
    pub fn lookup_cached(&self, gfn: Gfn, cache: &mut SlotCache) -> Option<&Arc<Memslot>> {
        let generation = self.generation();
        if cache.generation == generation
            && let Some(s) = self.slots.get(cache.index)
            && s.contains(gfn)
        {
            return Some(s);
        }
        let i = self.search(gfn)?;
        *cache = SlotCache { generation, index: i };
        Some(&self.slots[i])
    }

    /// The slots whose host range intersects `r`, for notifier handling.
    pub fn overlapping_hva(&self, r: HvaRange) -> impl Iterator<Item = &Arc<Memslot>> {
        self.slots.iter().filter(move |s| s.hva_range().overlaps(&r))
    }
}

/// Told about memslot changes (the MMU: `kvm_arch_flush_shadow_memslot`,
/// `kvm_arch_commit_memory_region`). Called with the update lock held.
pub trait MemslotObserver: Send + Sync {
    /// A slot being deleted or moved has been published invalid and no
    /// reader of the old snapshot remains: drop every mapping of it.
    fn flush_memslot(&self, slot: &Memslot);

    /// The change is published with its final `generation`.
    fn commit(&self, change: MemslotChange, old: Option<&Memslot>, new: Option<&Memslot>, generation: u64);
}

/// A loaded snapshot; hold it only for the duration of a lookup or a
/// fault, never across a memslot update.
pub type MemslotsGuard = arc_swap::Guard<Arc<Memslots>>;

/// The VM's memslots: one published snapshot per address space.
pub struct MemslotTable {
    config: MemslotConfig,
    spaces: [ArcSwap<Memslots>; ADDRESS_SPACE_NUM as usize],
    update: Mutex<()>,
    observers: RwLock<Vec<Arc<dyn MemslotObserver>>>,
}

impl std::fmt::Debug for MemslotTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemslotTable")
            .field("config", &self.config)
            .field("spaces", &self.spaces)
            .finish()
    }
}

impl Default for MemslotTable {
    fn default() -> Self {
        Self::new(MemslotConfig::default())
    }
}

impl MemslotTable {
    /// No slots, generations 0 (normal) and 1 (SMM).
    pub fn new(config: MemslotConfig) -> Self {
        let space = |as_id: u16| {
            ArcSwap::from_pointee(Memslots {
                as_id,
                generation: AtomicU64::new(u64::from(as_id)),
                slots: Vec::new(),
                bases: Vec::new(),
            })
        };
        Self {
            config,
            spaces: [space(0), space(1)],
            update: Mutex::new(()),
            observers: RwLock::new(Vec::new()),
        }
    }

    /// The settings.
    pub fn config(&self) -> MemslotConfig {
        self.config
    }

    /// Subscribes an observer to changes.
    pub fn register_observer(&self, observer: Arc<dyn MemslotObserver>) {
        self.observers.write().push(observer);
    }

    fn space(&self, as_id: u16) -> Result<&ArcSwap<Memslots>, MemslotError> {
        self.spaces
            .get(usize::from(as_id))
            .ok_or(MemslotError::InvalidAddressSpace { as_id })
    }

    /// The current snapshot of address space `as_id` (lock-free).
    ///
    /// # Panics
    /// If `as_id` is not 0 or 1.
    #[inline]
    pub fn load(&self, as_id: u16) -> MemslotsGuard {
        self.spaces[usize::from(as_id)].load()
    }

    /// The current generation of address space `as_id`.
    pub fn generation(&self, as_id: u16) -> u64 {
        self.load(as_id).generation()
    }

    /// Holds off memslot updates (KVM's `slots_lock`): while the guard
    /// lives, no update is between publishing its snapshot and its
    /// observers' commit (which is where the MMUs write-protect a slot
    /// that starts logging, and recover huge pages of one that stops). A
    /// checker that compares SPTEs with memslots takes it first, so that it
    /// sees only committed states. Never take it while holding a memslot
    /// snapshot or `mmu_lock`: an update holds it across both.
    pub fn slots_lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.update.lock()
    }

    fn validate_new(&self, cur: &Memslots, r: &MemoryRegion, ignore_id: Option<u16>) -> Result<(), MemslotError> {
        let id = r.id;
        if !MemslotFlags::all().contains(r.flags) {
            return Err(MemslotError::InvalidFlags {
                id,
                bits: r.flags.bits() & !MemslotFlags::all().bits(),
            });
        }
        if r.memory_size == 0 {
            return Err(MemslotError::ZeroSize { id });
        }
        for (what, value) in [
            ("guest_phys_addr", r.guest_phys_addr.raw()),
            ("userspace_addr", r.userspace_addr.raw()),
            ("memory_size", r.memory_size),
        ] {
            if !value.is_multiple_of(PAGE_SIZE) {
                return Err(MemslotError::Unaligned { id, what, value });
            }
        }
        let end = r.guest_phys_addr.raw().checked_add(r.memory_size);
        let bits = self.config.gpa_bits;
        match end {
            Some(end) if bits >= 64 || end <= 1u64 << bits => {}
            _ => {
                return Err(MemslotError::GpaBeyondWidth {
                    id,
                    end: end.unwrap_or(u64::MAX),
                    bits,
                });
            }
        }
        if r.userspace_addr
            .raw()
            .checked_add(r.memory_size)
            .is_none_or(|e| e > HVA_LIMIT)
        {
            return Err(MemslotError::HvaOutOfRange {
                id,
                start: r.userspace_addr,
                size: r.memory_size,
            });
        }
        let start = r.guest_phys_addr.frame();
        let end = start.add(r.memory_size >> PAGE_SHIFT);
        if let Some(o) = cur
            .slots
            .iter()
            .filter(|s| Some(s.id) != ignore_id)
            .find(|s| s.base_gfn < end && start < s.end_gfn())
        {
            return Err(MemslotError::Overlap {
                id,
                start,
                end,
                other: o.id,
                other_start: o.base_gfn,
                other_end: o.end_gfn(),
            });
        }
        Ok(())
    }

    /// Publishes `slots` for `as_id` and waits out the readers of the old
    /// snapshot (`kvm_swap_active_memslots`). Returns the new generation.
    fn publish(&self, as_id: u16, mut slots: Vec<Arc<Memslot>>) -> u64 {
        slots.sort_by_key(|s| s.base_gfn);
        let space = &self.spaces[usize::from(as_id)];
        let generation = space.load().generation();
        debug_assert_eq!(generation & MEMSLOT_GEN_UPDATE_IN_PROGRESS, 0);
        let next = Arc::new(Memslots {
            as_id,
            generation: AtomicU64::new(generation | MEMSLOT_GEN_UPDATE_IN_PROGRESS),
            bases: slots.iter().map(|s| s.base_gfn).collect(),
            slots,
        });
        let old = space.swap(next.clone());
        // The grace period: `swap` turned every outstanding guard of the old
        // snapshot into a counted reference; wait until they are all gone.
        let mut spins = 0u32;
        let started = std::time::Instant::now();
        while Arc::strong_count(&old) > 1 {
            spins += 1;
            if spins < 64 && !crate::sync::in_model() {
                std::hint::spin_loop();
            } else {
                // Shuttle's yield inside a model test (the reader being
                // waited for runs on the same OS thread).
                crate::sync::yield_now();
                assert!(
                    started.elapsed() < GRACE_PERIOD_LIMIT,
                    "memslot update waited {GRACE_PERIOD_LIMIT:?} for readers of the old \
                     snapshot: some thread holds a Memslots snapshot across an update"
                );
            }
        }
        let generation = generation + u64::from(ADDRESS_SPACE_NUM);
        next.generation.store(generation, Ordering::Release);
        generation
    }

    fn commit(&self, change: MemslotChange, old: Option<&Memslot>, new: Option<&Memslot>, generation: u64) {
        for o in self.observers.read().iter() {
            o.commit(change, old, new, generation);
        }
    }

    fn existing(&self, cur: &Memslots, as_id: u16, id: u16) -> Result<Arc<Memslot>, MemslotError> {
        cur.by_id(id).cloned().ok_or(MemslotError::UnknownSlot { as_id, id })
    }

    fn new_bitmap(&self, flags: MemslotFlags, npages: u64) -> Option<Arc<DirtyBitmap>> {
        flags
            .contains(MemslotFlags::LOG_DIRTY_PAGES)
            .then(|| Arc::new(DirtyBitmap::new(npages, self.config.dirty_log_initially_set)))
    }

    /// KVM_MR_CREATE: adds a slot. Returns the new generation.
    pub fn create(&self, r: MemoryRegion) -> Result<u64, MemslotError> {
        let _u = self.update.lock();
        let cur = self.space(r.as_id)?.load_full();
        if cur.by_id(r.id).is_some() {
            return Err(MemslotError::SlotExists {
                as_id: r.as_id,
                id: r.id,
            });
        }
        self.validate_new(&cur, &r, None)?;
        let npages = r.memory_size >> PAGE_SHIFT;
        let base_gfn = r.guest_phys_addr.frame();
        let slot = Arc::new(Memslot {
            as_id: r.as_id,
            id: r.id,
            base_gfn,
            npages,
            userspace_addr: r.userspace_addr,
            flags: r.flags,
            invalid: false,
            lpage_info: Arc::new(LpageInfo::new(base_gfn, npages, r.userspace_addr)),
            dirty_bitmap: self.new_bitmap(r.flags, npages),
        });
        let mut slots = cur.slots.clone();
        drop(cur);
        slots.push(slot.clone());
        let generation = self.publish(r.as_id, slots);
        self.commit(MemslotChange::Create, None, Some(&slot), generation);
        Ok(generation)
    }

    /// Publishes the slot invalid, waits out readers, lets observers flush it.
    /// The caller must not hold a snapshot (the publication waits for all).
    fn invalidate_slot(&self, as_id: u16, others: Vec<Arc<Memslot>>, old: &Arc<Memslot>) -> Vec<Arc<Memslot>> {
        let mut slots = others;
        let invalid = Arc::new(old.copy_with(|s| s.invalid = true));
        let mut with_invalid = slots.clone();
        with_invalid.push(invalid.clone());
        self.publish(as_id, with_invalid);
        for o in self.observers.read().iter() {
            o.flush_memslot(&invalid);
        }
        slots.shrink_to_fit();
        slots
    }

    /// KVM_MR_DELETE: removes slot `id`. Returns the new generation.
    pub fn delete(&self, as_id: u16, id: u16) -> Result<u64, MemslotError> {
        let _u = self.update.lock();
        let cur = self.space(as_id)?.load_full();
        let old = self.existing(&cur, as_id, id)?;
        let others = cur.slots.iter().filter(|s| s.id != id).cloned().collect();
        drop(cur);
        let slots = self.invalidate_slot(as_id, others, &old);
        let generation = self.publish(as_id, slots);
        self.commit(MemslotChange::Delete, Some(&old), None, generation);
        Ok(generation)
    }

    /// KVM_MR_MOVE: slot `id` now starts at `gpa` (same size, same host
    /// memory, same flags and dirty bitmap). Returns the new generation.
    pub fn move_slot(&self, as_id: u16, id: u16, gpa: Gpa) -> Result<u64, MemslotError> {
        let _u = self.update.lock();
        let cur = self.space(as_id)?.load_full();
        let old = self.existing(&cur, as_id, id)?;
        let r = MemoryRegion {
            as_id,
            id,
            flags: old.flags,
            guest_phys_addr: gpa,
            memory_size: old.npages << PAGE_SHIFT,
            userspace_addr: old.userspace_addr,
        };
        self.validate_new(&cur, &r, Some(id))?;
        let base_gfn = gpa.frame();
        let new = Arc::new(old.copy_with(|s| {
            s.base_gfn = base_gfn;
            s.lpage_info = Arc::new(LpageInfo::new(base_gfn, old.npages, old.userspace_addr));
        }));
        let others = cur.slots.iter().filter(|s| s.id != id).cloned().collect();
        drop(cur);
        let mut slots = self.invalidate_slot(as_id, others, &old);
        slots.push(new.clone());
        let generation = self.publish(as_id, slots);
        self.commit(MemslotChange::Move, Some(&old), Some(&new), generation);
        Ok(generation)
    }

    /// KVM_MR_FLAGS_ONLY: changes slot `id`'s flags (dirty logging on or
    /// off; READONLY cannot change). Returns the new generation.
    pub fn update_flags(&self, as_id: u16, id: u16, flags: MemslotFlags) -> Result<u64, MemslotError> {
        let _u = self.update.lock();
        let cur = self.space(as_id)?.load_full();
        let old = self.existing(&cur, as_id, id)?;
        if !MemslotFlags::all().contains(flags) {
            return Err(MemslotError::InvalidFlags {
                id,
                bits: flags.bits() & !MemslotFlags::all().bits(),
            });
        }
        if (flags ^ old.flags).contains(MemslotFlags::READONLY) {
            return Err(MemslotError::ReadOnlyFlagChange { id });
        }
        let bitmap = match (old.logs_dirty_pages(), flags.contains(MemslotFlags::LOG_DIRTY_PAGES)) {
            (true, true) => old.dirty_bitmap.clone(),
            (_, logs) => logs.then(|| self.new_bitmap(flags, old.npages)).flatten(),
        };
        let new = Arc::new(old.copy_with(|s| {
            s.flags = flags;
            s.dirty_bitmap = bitmap;
        }));
        let mut slots: Vec<_> = cur.slots.iter().filter(|s| s.id != id).cloned().collect();
        drop(cur);
        slots.push(new.clone());
        let generation = self.publish(as_id, slots);
        self.commit(MemslotChange::FlagsOnly, Some(&old), Some(&new), generation);
        Ok(generation)
    }

    /// `KVM_SET_USER_MEMORY_REGION`: create, delete (size 0), move (new
    /// gpa) or flags-only, decided as KVM does. Returns the change made and
    /// the new generation, or `None` when nothing changes.
    pub fn set_memory_region(&self, r: MemoryRegion) -> Result<Option<(MemslotChange, u64)>, MemslotError> {
        let old = self.space(r.as_id)?.load().by_id(r.id).cloned();
        let Some(old) = old else {
            if r.memory_size == 0 {
                return Ok(None);
            }
            return self.create(r).map(|g| Some((MemslotChange::Create, g)));
        };
        if r.memory_size == 0 {
            return self.delete(r.as_id, r.id).map(|g| Some((MemslotChange::Delete, g)));
        }
        if r.memory_size != old.npages << PAGE_SHIFT || r.userspace_addr != old.userspace_addr {
            // KVM returns EINVAL; report it as the overlap with itself it is.
            return Err(MemslotError::Overlap {
                id: r.id,
                start: r.guest_phys_addr.frame(),
                end: r.guest_phys_addr.frame().add(r.memory_size >> PAGE_SHIFT),
                other: old.id,
                other_start: old.base_gfn,
                other_end: old.end_gfn(),
            });
        }
        if r.guest_phys_addr.frame() != old.base_gfn {
            if r.flags != old.flags {
                return Err(MemslotError::InvalidFlags {
                    id: r.id,
                    bits: (r.flags ^ old.flags).bits(),
                });
            }
            return self
                .move_slot(r.as_id, r.id, r.guest_phys_addr)
                .map(|g| Some((MemslotChange::Move, g)));
        }
        if r.flags != old.flags {
            return self
                .update_flags(r.as_id, r.id, r.flags)
                .map(|g| Some((MemslotChange::FlagsOnly, g)));
        }
        Ok(None)
    }

    fn logging_slot(&self, as_id: u16, id: u16) -> Result<Arc<Memslot>, MemslotError> {
        let cur = self.space(as_id)?.load();
        let slot = self.existing(&cur, as_id, id)?;
        if slot.dirty_bitmap.is_none() {
            return Err(MemslotError::DirtyLogDisabled { as_id, id });
        }
        Ok(slot)
    }

    /// `KVM_GET_DIRTY_LOG`: the slot's bitmap; cleared as it is read unless
    /// manual protection is enabled. The MMU must write-protect the pages
    /// returned (without manual protection).
    pub fn get_dirty_log(&self, as_id: u16, id: u16) -> Result<Vec<u64>, MemslotError> {
        let slot = self.logging_slot(as_id, id)?;
        let b = slot.dirty_bitmap().expect("logging_slot checked the bitmap");
        Ok(if self.config.manual_dirty_log_protect {
            b.snapshot()
        } else {
            b.get_and_clear()
        })
    }

    /// `KVM_CLEAR_DIRTY_LOG`: clears the bits of `mask` for the pages from
    /// `first_page` (a multiple of 64); returns the bits actually cleared,
    /// whose pages the MMU must write-protect.
    pub fn clear_dirty_log(
        &self,
        as_id: u16,
        id: u16,
        first_page: u64,
        mask: &[u64],
    ) -> Result<Vec<u64>, MemslotError> {
        if !self.config.manual_dirty_log_protect {
            return Err(MemslotError::ManualProtectDisabled);
        }
        let slot = self.logging_slot(as_id, id)?;
        let num_pages = mask.len() as u64 * 64;
        let b = slot.dirty_bitmap().expect("logging_slot checked the bitmap");
        if !first_page.is_multiple_of(64) || first_page / 64 + mask.len() as u64 > b.nwords() as u64 {
            return Err(MemslotError::BadClearRange {
                id,
                first_page,
                num_pages,
                npages: slot.npages,
            });
        }
        Ok(b.clear(first_page, mask))
    }
}

/// KVM's `mark_page_dirty_in_slot`: if the slot logs dirty pages, records
/// `gfn` in `ring` when one is given (a running vCPU with the dirty ring
/// enabled), else in the slot's bitmap. Returns `Ok(true)` when the ring
/// reached its soft limit.
pub fn mark_page_dirty_in_slot(slot: &Memslot, gfn: Gfn, ring: Option<&DirtyRing>) -> Result<bool, RingFull> {
    let Some(bitmap) = slot.dirty_bitmap() else {
        return Ok(false);
    };
    let Some(rel) = gfn
        .raw()
        .checked_sub(slot.base_gfn().raw())
        .filter(|&r| r < slot.npages())
    else {
        return Ok(false);
    };
    match ring {
        Some(ring) => ring.push(u32::from(slot.as_id()) << 16 | u32::from(slot.id()), rel),
        None => {
            bitmap.mark(rel);
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: u16, gpa: u64, size: u64, hva: u64) -> MemoryRegion {
        MemoryRegion {
            as_id: 0,
            id,
            flags: MemslotFlags::empty(),
            guest_phys_addr: Gpa::new(gpa),
            memory_size: size,
            userspace_addr: Hva::new(hva),
        }
    }

    #[test]
    fn lpage_info_follows_kvm() {
        let t = MemslotTable::default();
        // Starts 4K into a 2M region, hva congruent with gpa mod 2M.
        t.create(region(1, 0x1000, 0x40_0000, 0x7000_1000)).unwrap();
        let s = t.load(0).by_id(1).unwrap().clone();
        assert_eq!(s.disallow_lpage(Gfn::new(1), Level::L2), Some(1), "unaligned head");
        assert_eq!(s.disallow_lpage(Gfn::new(0x200), Level::L2), Some(0));
        assert_eq!(s.disallow_lpage(Gfn::new(0x400), Level::L2), Some(1), "unaligned tail");
        assert_eq!(s.max_mapping_level(Gfn::new(0x250), Level::L3), Level::L2);
        assert_eq!(s.max_mapping_level(Gfn::new(0x5), Level::L3), Level::L1);
        s.account_disallow_lpage(Gfn::new(0x250), 1);
        assert_eq!(s.max_mapping_level(Gfn::new(0x250), Level::L3), Level::L1);
        s.account_disallow_lpage(Gfn::new(0x250), -1);
        assert_eq!(s.max_mapping_level(Gfn::new(0x250), Level::L3), Level::L2);
        // gfn and hva disagree mod 2M: no huge pages anywhere.
        t.create(region(2, 0x4000_0000, 0x40_0000, 0x9000_1000)).unwrap();
        let s2 = t.load(0).by_id(2).unwrap().clone();
        assert_eq!(s2.max_mapping_level(Gfn::new(0x4_0200), Level::L3), Level::L1);
    }

    #[test]
    fn generations_and_cache() {
        let t = MemslotTable::default();
        assert_eq!(t.generation(0), 0);
        assert_eq!(t.generation(1), 1);
        let g = t.create(region(0, 0, 0x10_0000, 0x1000_0000)).unwrap();
        assert_eq!(g, 2);
        assert_eq!(t.generation(0), 2);
        let mut cache = SlotCache::default();
        let m = t.load(0);
        assert_eq!(m.lookup_cached(Gfn::new(5), &mut cache).map(|s| s.id()), Some(0));
        assert_eq!(m.lookup_cached(Gfn::new(6), &mut cache).map(|s| s.id()), Some(0));
        assert!(m.lookup(Gfn::new(0x100)).is_none());
        drop(m);
        // Delete publishes twice (invalid copy, then final).
        assert_eq!(t.delete(0, 0).unwrap(), 6);
        let m = t.load(0);
        assert!(
            m.lookup_cached(Gfn::new(5), &mut cache).is_none(),
            "stale cache not used"
        );
    }
}
