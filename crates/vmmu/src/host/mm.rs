//! The host address space: the VMM process's view, hva → host frame.
//!
//! A 4-level radix like x86-64's (PML4 → PDPT → PD → PT), whose tables are
//! frames of the [`FrameArena`] holding atomic entries: present, writable,
//! young (accessed), dirty, huge, a software "shared (KSM)" bit, and the
//! frame number; a non-present entry may hold a swap slot. Leaves map 4 KiB,
//! 2 MiB (THP) or 1 GiB (hugetlb) pages.
//!
//! # Concurrency
//!
//! - Lookups ([`HostAddressSpace::lookup`],
//!   [`HostAddressSpace::host_pfn_mapping_level`]) are lock-free: they read
//!   each level's entry exactly once into a local (seed `004_*`: a huge-page
//!   promotion can happen during the walk, re-reading an entry could walk
//!   into the huge page as if it were a table), inside a crossbeam-epoch
//!   critical section.
//! - Host page-table pages that a collapse or munmap unlinks are freed
//!   through crossbeam-epoch (`defer`): never while a lookup may still be
//!   inside them. Their frames go back to the arena after the grace period.
//! - Every operation that changes mappings (the kernel's side) holds the mm
//!   lock (the `mmap_lock` analogue), and delivers
//!   `invalidate_range_start` to every notifier *before* the change and
//!   `invalidate_range_end` after; old frames are freed after the end, as
//!   the kernel frees pages after its TLB flush.
//! - Data accesses through an hva ([`HostAddressSpace::read`], the guest
//!   memory API) hold the `access` lock shared while they translate and
//!   touch the frame; an operation that moves data (migration, collapse,
//!   swap-out, KSM merge, COW) or takes a mapping away takes it exclusively
//!   around the change: the model of the kernel's TLB shootdown, after which
//!   no CPU writes through the old translation. Lookups do not take it.
//!
//! # Operations
//!
//! Demand faults ([`HostAddressSpace::fault_in`]: a zeroed frame on first
//! touch, a 2 MiB frame in an aligned THP region, a 1 GiB frame in a
//! hugetlb region, swap-in with a new frame, write-upgrade, KSM copy on
//! write), munmap, THP collapse and split, migration, swap-out, KSM merge,
//! mprotect, aging. A THP split keeps the data in place: the 2 MiB run
//! becomes 512 independently freeable 4 KiB frames (as the kernel's
//! `split_huge_pmd`); 1 GiB hugetlb pages are never split.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bitflags::bitflags;
use crossbeam_epoch as epoch;
use parking_lot::{Mutex, RwLock};

use crate::addr::{Hva, Level, PAGE_SIZE, PageSize, Pfn};
use crate::host::frames::FrameArena;
use crate::host::{FrameError, HostError, HostFault};
use crate::host::{HvaRange, MmuNotifier, NotifierEvent, NotifierId, NotifierRange};

/// One past the highest user address (47-bit user half, like x86-64 Linux).
pub const HVA_LIMIT: u64 = 1 << 47;

const SIZE_2M: u64 = PageSize::Size2M.bytes();
const SIZE_1G: u64 = PageSize::Size1G.bytes();

bitflags! {
    /// Properties of a host mapping (a VMA).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct VmaFlags: u32 {
        /// Writable (`PROT_WRITE`).
        const WRITE = 1 << 0;
        /// Transparent huge pages enabled (`MADV_HUGEPAGE`): aligned 2 MiB
        /// blocks are faulted in as one huge page and can be collapsed.
        const THP = 1 << 1;
        /// Backed by 1 GiB hugetlb pages; start and length 1 GiB aligned.
        const HUGETLB_1G = 1 << 2;
    }
}

/// A host page-table entry.
#[derive(Clone, Copy, PartialEq, Eq)]
struct HostPte(u64);

impl HostPte {
    const PRESENT: u64 = 1 << 0;
    const WRITABLE: u64 = 1 << 1;
    const YOUNG: u64 = 1 << 5;
    const DIRTY: u64 = 1 << 6;
    const HUGE: u64 = 1 << 7;
    /// Software: a KSM page shared read-only by several mappings.
    const SHARED: u64 = 1 << 9;
    /// Software, non-present entries: bits 63..12 hold a swap slot.
    const SWAP: u64 = 1 << 10;
    const PFN_MASK: u64 = ((1 << 52) - 1) & !0xFFF;
    const NONE: HostPte = HostPte(0);

    fn table(pfn: Pfn) -> Self {
        Self(Self::PRESENT | Self::WRITABLE | (pfn.raw() << 12))
    }
    fn leaf(pfn: Pfn, level: Level, bits: u64) -> Self {
        let huge = if level > Level::L1 { Self::HUGE } else { 0 };
        Self(Self::PRESENT | huge | bits | (pfn.raw() << 12))
    }
    fn swap(slot: u64) -> Self {
        Self(Self::SWAP | (slot << 12))
    }
    fn present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }
    fn is_swap(self) -> bool {
        !self.present() && self.0 & Self::SWAP != 0
    }
    fn swap_slot(self) -> u64 {
        self.0 >> 12
    }
    fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }
    fn pfn(self) -> Pfn {
        Pfn::new((self.0 & Self::PFN_MASK) >> 12)
    }
    fn with_pfn(self, pfn: Pfn) -> Self {
        Self((self.0 & !Self::PFN_MASK) | (pfn.raw() << 12))
    }
}

#[inline]
fn index(hva: u64, level: Level) -> usize {
    ((hva >> (12 + 9 * (level.get() as u64 - 1))) & 511) as usize
}

/// A leaf of the host address space, as a lookup saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLeaf {
    /// The frame of the 4 KiB page holding the hva.
    pub pfn: Pfn,
    /// The first frame of the leaf's run.
    pub base_pfn: Pfn,
    /// The mapping level: 4K, 2M or 1G.
    pub level: Level,
    /// Writes are allowed without a fault.
    pub writable: bool,
    /// Accessed since the last aging.
    pub young: bool,
    /// Written since mapped.
    pub dirty: bool,
    /// A KSM page shared read-only; a write breaks it with copy on write.
    pub shared: bool,
}

/// Counts of what the host did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Faults that installed a mapping (first touch, swap-in, COW).
    pub faults: u64,
    /// Faults that installed a THP.
    pub thp_faults: u64,
    /// THP collapses.
    pub collapses: u64,
    /// THP splits.
    pub splits: u64,
    /// Page migrations.
    pub migrations: u64,
    /// Pages swapped out.
    pub swap_outs: u64,
    /// Pages swapped in.
    pub swap_ins: u64,
    /// Successful KSM merges.
    pub ksm_merges: u64,
    /// KSM copy-on-write breaks.
    pub cow_breaks: u64,
    /// invalidate_range_start/end pairs delivered.
    pub invalidations: u64,
    /// Checked lock-free walks that read a frame as a page table that was
    /// none, or returned a page table as a leaf's frame (seed 004's
    /// re-reading walk; always 0 when each entry is read once).
    pub walks_astray: u64,
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    thp_faults: AtomicU64,
    collapses: AtomicU64,
    splits: AtomicU64,
    migrations: AtomicU64,
    swap_outs: AtomicU64,
    swap_ins: AtomicU64,
    ksm_merges: AtomicU64,
    cow_breaks: AtomicU64,
    invalidations: AtomicU64,
    walks_astray: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug)]
struct Vma {
    end: u64,
    flags: VmaFlags,
}

/// What the mm lock protects.
#[derive(Default)]
struct Mm {
    vmas: BTreeMap<u64, Vma>,
    swap: HashMap<u64, Box<[u8; PAGE_SIZE as usize]>>,
    next_swap_slot: u64,
    /// Number of mappings of each KSM frame.
    ksm_refs: HashMap<Pfn, u32>,
}

impl Mm {
    fn find_vma(&self, hva: u64) -> Option<(u64, Vma)> {
        let (&start, &vma) = self.vmas.range(..=hva).next_back()?;
        (hva < vma.end).then_some((start, vma))
    }

    /// Splits the VMA containing `at` strictly inside it into two.
    fn split_vma_at(&mut self, at: u64) {
        if let Some((start, vma)) = self.find_vma(at)
            && start < at
        {
            self.vmas.insert(start, Vma { end: at, ..vma });
            self.vmas.insert(at, vma);
        }
    }

    /// The first address of `[start, end)` no VMA covers.
    fn first_hole(&self, start: u64, end: u64) -> Option<u64> {
        let mut at = start;
        while at < end {
            match self.find_vma(at) {
                Some((_, vma)) => at = vma.end,
                None => return Some(at),
            }
        }
        None
    }
}

/// Frames and swap slots an operation releases after its invalidation.
#[derive(Default)]
struct Released {
    frames: Vec<(Pfn, PageSize, bool)>,
    swap_slots: Vec<u64>,
    tables: Vec<Pfn>,
}

/// The VMM process's address space. Shared (`Arc`) between the VMM, the
/// vCPUs and the host's own threads (reclaim, khugepaged, compaction).
pub struct HostAddressSpace {
    arena: Arc<FrameArena>,
    root: Pfn,
    mm: Mutex<Mm>,
    access: RwLock<()>,
    notifiers: RwLock<Vec<(NotifierId, Arc<dyn MmuNotifier>)>>,
    next_notifier: AtomicU64,
    released: AtomicBool,
    table_frames: AtomicU64,
    /// The frames that are page tables of this address space, linked or
    /// retired but not yet freed: what a checked walk may read as a table
    /// ([`HostAddressSpace::set_walk_policy`]).
    tables: Arc<Mutex<std::collections::HashSet<Pfn>>>,
    /// Seed 004's walk policy: bit 0 [`HostWalk::ReRead`], bit 1 checked.
    walk_policy: std::sync::atomic::AtomicU8,
    counters: Counters,
}

/// How the lock-free host walk ([`HostAddressSpace::lookup`]) reads each
/// entry: seed 004's comment on `host_pfn_mapping_level`, a runtime policy
/// of the host model ([`HostAddressSpace::set_walk_policy`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HostWalk {
    /// Each entry read once (the kernel's `READ_ONCE`): whether it is a
    /// leaf, and the table or frame it points at, come from one value.
    /// A promotion or a split during the walk leaves it on the old or the
    /// new tables, never between.
    #[default]
    ReadOnce,
    /// Unsafe: the entry read again for each use (`p*d_large(*pmd)`, then
    /// `pte_offset(pmd)` dereferencing it anew): a table promoted to a huge
    /// page between the reads sends the walk into the huge page's data as
    /// if it were a page table ("into the weeds"), and a huge page split
    /// between them returns a page table as the leaf's frame.
    ReRead,
}

impl std::fmt::Debug for HostAddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAddressSpace")
            .field("root", &self.root)
            .field("stats", &self.stats())
            .finish()
    }
}

impl HostAddressSpace {
    /// An empty address space whose frames (data and page tables) come
    /// from `arena`.
    pub fn new(arena: Arc<FrameArena>) -> Result<Self, HostError> {
        let root = arena.alloc_4k()?;
        Ok(Self {
            arena,
            root,
            mm: Mutex::new(Mm::default()),
            access: RwLock::new(()),
            notifiers: RwLock::new(Vec::new()),
            next_notifier: AtomicU64::new(0),
            released: AtomicBool::new(false),
            table_frames: AtomicU64::new(1),
            tables: Arc::new(Mutex::new(std::collections::HashSet::from([root]))),
            walk_policy: std::sync::atomic::AtomicU8::new(0),
            counters: Counters::default(),
        })
    }

    /// The frame arena backing this address space.
    pub fn arena(&self) -> &Arc<FrameArena> {
        &self.arena
    }

    /// What the host did so far.
    pub fn stats(&self) -> HostStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HostStats {
            faults: l(&c.faults),
            thp_faults: l(&c.thp_faults),
            collapses: l(&c.collapses),
            splits: l(&c.splits),
            migrations: l(&c.migrations),
            swap_outs: l(&c.swap_outs),
            swap_ins: l(&c.swap_ins),
            ksm_merges: l(&c.ksm_merges),
            cow_breaks: l(&c.cow_breaks),
            invalidations: l(&c.invalidations),
            walks_astray: l(&c.walks_astray),
        }
    }

    /// Frames holding this address space's page tables (not yet retired).
    pub fn table_frames(&self) -> u64 {
        self.table_frames.load(Ordering::Relaxed)
    }

    /// Pages currently in the swap store.
    pub fn swapped_pages(&self) -> usize {
        self.mm.lock().swap.len()
    }

    // ---- notifiers ------------------------------------------------------

    /// Subscribes `notifier` to this address space's events. Taken under
    /// the mm lock, so it never sees an `invalidate_range_end` without its
    /// start.
    pub fn register_notifier(&self, notifier: Arc<dyn MmuNotifier>) -> NotifierId {
        let _mm = self.mm.lock();
        let id = NotifierId(self.next_notifier.fetch_add(1, Ordering::Relaxed));
        self.notifiers.write().push((id, notifier));
        id
    }

    /// Removes a subscription; false if `id` was not registered.
    pub fn unregister_notifier(&self, id: NotifierId) -> bool {
        let _mm = self.mm.lock();
        let mut n = self.notifiers.write();
        let before = n.len();
        n.retain(|(i, _)| *i != id);
        n.len() != before
    }

    fn subscribers(&self) -> Vec<Arc<dyn MmuNotifier>> {
        self.notifiers.read().iter().map(|(_, n)| n.clone()).collect()
    }

    /// Delivers start for each range, runs `change` with data accesses
    /// excluded, then delivers end for each range.
    fn invalidate<R>(&self, ranges: &[HvaRange], event: NotifierEvent, change: impl FnOnce() -> R) -> R {
        let subs = self.subscribers();
        let events: Vec<NotifierRange> = ranges.iter().map(|&range| NotifierRange { range, event }).collect();
        for e in &events {
            for s in &subs {
                s.invalidate_range_start(e);
            }
        }
        let out = {
            let _shootdown = self.access.write();
            change()
        };
        for e in &events {
            for s in &subs {
                s.invalidate_range_end(e);
            }
            bump(&self.counters.invalidations);
        }
        out
    }

    /// Tells every notifier the address space is going away (Linux's
    /// `mmu_notifier_release` in `exit_mmap`), unsubscribes them, and tears
    /// every mapping down without further events. Idempotent; also done on
    /// drop.
    pub fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut mm = self.mm.lock();
        let subs: Vec<_> = std::mem::take(&mut *self.notifiers.write());
        for (_, s) in &subs {
            s.release();
        }
        let mut rel = Released::default();
        {
            let _shootdown = self.access.write();
            self.clear_range(self.root, Level::L4, HvaRange::new(Hva::new(0), HVA_LIMIT), &mut rel);
        }
        mm.vmas.clear();
        self.finish(&mut mm, rel);
    }

    // ---- lock-free lookups ----------------------------------------------

    /// Walks the host page tables for `hva`, reading each level's entry
    /// exactly once. Lock-free; the result may be stale as soon as it is
    /// returned (see [`crate::mem::invalidate`] for how to use it safely).
    pub fn lookup(&self, hva: Hva) -> Option<HostLeaf> {
        if hva.raw() >= HVA_LIMIT {
            return None;
        }
        // Tables unlinked concurrently are freed only after this guard.
        let _epoch = epoch::pin();
        let policy = self.walk_policy.load(Ordering::Relaxed);
        if policy != 0 {
            return self.lookup_by_policy(hva, policy);
        }
        let mut table = self.root;
        let mut level = Level::L4;
        loop {
            // The one read of this level's entry; everything below uses `pte`.
            let pte = HostPte(self.arena.table(table)[index(hva.raw(), level)].load(Ordering::Acquire));
            if !pte.present() {
                return None;
            }
            if level == Level::L1 || pte.has(HostPte::HUGE) {
                return Some(Self::leaf_of(hva, level, pte));
            }
            table = pte.pfn();
            level = level.down()?;
        }
    }

    /// Seed 004's walk policy: whether the lock-free walk reads each entry
    /// once or again for each use ([`HostWalk`]), and whether walks are
    /// `checked`: a re-reading walk is slowed by a yield between its two
    /// reads of an entry (another CPU's progress, so that a promotion
    /// lands between them), and every frame read as a table must be one of
    /// this address space's
    /// page tables, linked or retired, and a leaf must not point at one. A
    /// step that fails counts in [`HostStats::walks_astray`] and ends the
    /// walk with no result (the kernel would read on through garbage).
    pub fn set_walk_policy(&self, walk: HostWalk, checked: bool) {
        let v = u8::from(walk == HostWalk::ReRead) | u8::from(checked) << 1;
        self.walk_policy.store(v, Ordering::Relaxed);
    }

    /// [`HostAddressSpace::lookup`] under a non-default walk policy.
    fn lookup_by_policy(&self, hva: Hva, policy: u8) -> Option<HostLeaf> {
        let (reread, checked) = (policy & 1 != 0, policy & 2 != 0);
        let astray = || {
            bump(&self.counters.walks_astray);
            None
        };
        let mut table = self.root;
        let mut level = Level::L4;
        loop {
            if checked && !self.tables.lock().contains(&table) {
                return astray();
            }
            let slot = &self.arena.try_table(table)?[index(hva.raw(), level)];
            let pte = HostPte(slot.load(Ordering::Acquire));
            if !pte.present() {
                return None;
            }
            // What the rest of this step uses: the value judged, or (the
            // unsafe walk) the entry read again, after a yield that stands
            // for another CPU's progress between the two reads (read once,
            // there is no "between" to widen).
            let used = if reread {
                if checked {
                    std::thread::yield_now();
                }
                HostPte(slot.load(Ordering::Acquire))
            } else {
                pte
            };
            if level == Level::L1 || pte.has(HostPte::HUGE) {
                if checked && self.tables.lock().contains(&used.pfn()) {
                    return astray();
                }
                return Some(Self::leaf_of(hva, level, used));
            }
            table = used.pfn();
            level = level.down()?;
        }
    }

    fn leaf_of(hva: Hva, level: Level, pte: HostPte) -> HostLeaf {
        let base = pte.pfn();
        let within = (hva.raw() & (level.size() - 1)) >> 12;
        HostLeaf {
            pfn: base.add(within),
            base_pfn: base,
            level,
            writable: pte.has(HostPte::WRITABLE),
            young: pte.has(HostPte::YOUNG),
            dirty: pte.has(HostPte::DIRTY),
            shared: pte.has(HostPte::SHARED),
        }
    }

    /// The level of the host mapping of `hva` (4K, 2M or 1G), `None` if not
    /// mapped. Reads each host entry exactly once.
    ///
    /// **Only** for the three uses in [`crate::mem::invalidate`]: to install
    /// a mapping, go through [`crate::mem::faultin_pfn`] and
    /// [`crate::mem::HostMapping::validate`]; calling this directly is for
    /// zap decisions.
    pub fn host_pfn_mapping_level(&self, hva: Hva) -> Option<Level> {
        self.lookup(hva).map(|l| l.level)
    }

    // ---- walking under the mm lock --------------------------------------

    /// The deepest entry slot reached for `hva` and its level and value:
    /// a leaf, a non-present entry, or a swap entry. Callers hold the mm
    /// lock or the access lock, so the tables they see stay linked.
    fn walk_slot(&self, hva: u64) -> (&AtomicU64, Level, HostPte) {
        self.walk_to(hva, Level::L1)
    }

    /// Like `walk_slot`, stopping at `target` at the latest.
    fn walk_to(&self, hva: u64, target: Level) -> (&AtomicU64, Level, HostPte) {
        let mut table = self.root;
        let mut level = Level::L4;
        loop {
            let slot = &self.arena.table(table)[index(hva, level)];
            let pte = HostPte(slot.load(Ordering::Acquire));
            if !pte.present() || level == target || pte.has(HostPte::HUGE) {
                return (slot, level, pte);
            }
            table = pte.pfn();
            level = level.down().expect("a non-leaf entry above level 1");
        }
    }

    /// The entry slot for `hva` at `level`, allocating tables on the way.
    /// Callers hold the mm lock and know no huge leaf sits above `level`.
    fn slot_at(&self, hva: u64, level: Level) -> Result<&AtomicU64, HostFault> {
        let mut table = self.root;
        let mut at = Level::L4;
        loop {
            let slot = &self.arena.table(table)[index(hva, at)];
            if at == level {
                return Ok(slot);
            }
            let pte = HostPte(slot.load(Ordering::Acquire));
            debug_assert!(!pte.has(HostPte::HUGE), "huge leaf above the target level");
            table = if pte.present() {
                pte.pfn()
            } else {
                let t = self.new_table().map_err(|source| HostFault::OutOfMemory {
                    hva: Hva::new(hva),
                    source,
                })?;
                slot.store(HostPte::table(t).0, Ordering::Release);
                t
            };
            at = at.down().expect("target level is at least 1");
        }
    }

    // ---- faults -----------------------------------------------------------

    /// Faults `hva` in as a CPU access would (`handle_mm_fault`): allocates
    /// a zeroed frame on first touch (a 2 MiB one in an aligned THP region,
    /// 1 GiB in a hugetlb region), swaps a swapped-out page back in with a
    /// new frame, and on a write makes the mapping writable (breaking a KSM
    /// page with copy on write). Returns the leaf.
    pub fn fault_in(&self, hva: Hva, write: bool) -> Result<HostLeaf, HostFault> {
        let mut mm = self.mm.lock();
        self.fault_locked(&mut mm, hva, write)
    }

    fn fault_locked(&self, mm: &mut Mm, hva: Hva, write: bool) -> Result<HostLeaf, HostFault> {
        let (_, vma) = mm.find_vma(hva.raw()).ok_or(HostFault::NotMapped { hva })?;
        if write && !vma.flags.contains(VmaFlags::WRITE) {
            return Err(HostFault::WriteProtected { hva });
        }
        let oom = |source| HostFault::OutOfMemory { hva, source };
        let writable_bit = if vma.flags.contains(VmaFlags::WRITE) {
            HostPte::WRITABLE
        } else {
            0
        };
        let dirty_bit = if write { HostPte::DIRTY } else { 0 };
        let (slot, level, pte) = self.walk_slot(hva.raw());
        if pte.present() {
            if !write || pte.has(HostPte::WRITABLE) {
                return Ok(Self::leaf_of(hva, level, pte));
            }
            if pte.has(HostPte::SHARED) {
                self.cow_break(mm, hva, slot, pte)?;
            } else {
                // Permission upgrade after mprotect(RW): no invalidation,
                // permissions only grow.
                slot.fetch_or(HostPte::WRITABLE | HostPte::DIRTY, Ordering::AcqRel);
            }
            let (_, level, pte) = self.walk_slot(hva.raw());
            return Ok(Self::leaf_of(hva, level, pte));
        }
        if pte.is_swap() {
            // The frame first: out of memory, the page stays in swap.
            let pfn = self.arena.alloc_4k().map_err(oom)?;
            let data = mm
                .swap
                .remove(&pte.swap_slot())
                .expect("every swap entry has its data in the swap store");
            self.arena.write(pfn, 0, &data[..]);
            let new = HostPte::leaf(pfn, Level::L1, writable_bit | dirty_bit | HostPte::YOUNG);
            slot.store(new.0, Ordering::Release);
            bump(&self.counters.swap_ins);
            bump(&self.counters.faults);
            return Ok(Self::leaf_of(hva, Level::L1, new));
        }
        // Not present: pick the page size.
        let base_2m = hva.raw() & !(SIZE_2M - 1);
        let in_vma = |start: u64, size: u64| {
            mm.find_vma(start)
                .is_some_and(|(s, v)| s <= start && start + size <= v.end && v.flags == vma.flags)
        };
        let (size, leaf_level) = if vma.flags.contains(VmaFlags::HUGETLB_1G) {
            (PageSize::Size1G, Level::L3)
        } else if vma.flags.contains(VmaFlags::THP) && level >= Level::L2 && in_vma(base_2m, SIZE_2M) {
            (PageSize::Size2M, Level::L2)
        } else {
            (PageSize::Size4K, Level::L1)
        };
        let pfn = match self.arena.alloc(size) {
            Ok(p) => p,
            // THP allocation failure falls back to a small page.
            Err(_) if size == PageSize::Size2M => return self.fault_small(hva, writable_bit | dirty_bit),
            Err(e) => return Err(oom(e)),
        };
        let slot = self.slot_at(hva.raw(), leaf_level).inspect_err(|_| {
            // No frame for a host page table: the data frame goes back.
            let _ = self.arena.free(pfn, size);
        })?;
        let new = HostPte::leaf(pfn, leaf_level, writable_bit | dirty_bit | HostPte::YOUNG);
        slot.store(new.0, Ordering::Release);
        bump(&self.counters.faults);
        if size == PageSize::Size2M {
            bump(&self.counters.thp_faults);
        }
        Ok(Self::leaf_of(hva, leaf_level, new))
    }

    fn fault_small(&self, hva: Hva, bits: u64) -> Result<HostLeaf, HostFault> {
        let pfn = self
            .arena
            .alloc_4k()
            .map_err(|source| HostFault::OutOfMemory { hva, source })?;
        let slot = self.slot_at(hva.raw(), Level::L1).inspect_err(|_| {
            let _ = self.arena.free(pfn, PageSize::Size4K);
        })?;
        let new = HostPte::leaf(pfn, Level::L1, bits | HostPte::YOUNG);
        slot.store(new.0, Ordering::Release);
        bump(&self.counters.faults);
        Ok(Self::leaf_of(hva, Level::L1, new))
    }

    /// Copy on write of a shared KSM page (`wp_page_copy`).
    fn cow_break(&self, mm: &mut Mm, hva: Hva, slot: &AtomicU64, pte: HostPte) -> Result<(), HostFault> {
        let new_pfn = self
            .arena
            .alloc_4k()
            .map_err(|source| HostFault::OutOfMemory { hva, source })?;
        let old = pte.pfn();
        let page = HvaRange::new(hva.align_down(PAGE_SIZE), PAGE_SIZE);
        self.invalidate(&[page], NotifierEvent::CowBreak, || {
            self.arena.copy_frame(new_pfn, old);
            let new = HostPte::leaf(new_pfn, Level::L1, HostPte::WRITABLE | HostPte::DIRTY | HostPte::YOUNG);
            slot.store(new.0, Ordering::Release);
        });
        self.ksm_put(mm, old);
        bump(&self.counters.cow_breaks);
        bump(&self.counters.faults);
        Ok(())
    }

    fn ksm_put(&self, mm: &mut Mm, pfn: Pfn) {
        let refs = mm
            .ksm_refs
            .get_mut(&pfn)
            .expect("a shared host page has a KSM reference count");
        *refs -= 1;
        if *refs == 0 {
            mm.ksm_refs.remove(&pfn);
            self.arena
                .free(pfn, PageSize::Size4K)
                .expect("the last reference to a KSM frame frees an allocated frame");
        }
    }

    // ---- data access through an hva ---------------------------------------

    /// Runs `f` on the frame backing the page of `hva`, faulting it in if
    /// needed, with the translation pinned (the access lock held shared)
    /// so the frame is not moved or freed during `f`. Sets young (and dirty
    /// on a write).
    /// As `with_frame` for a read, but never faults the page in: `None`
    /// when `hva` is not resident now. For readers that hold `mmu_lock`
    /// (KVM's `__copy_from_user_inatomic` under `pagefault_disable`): a
    /// fault-in takes the mm lock, which the MMU-notifier callbacks hold
    /// while they wait for `mmu_lock`.
    pub(crate) fn with_resident_frame<R>(&self, hva: Hva, f: impl FnOnce(&FrameArena, Pfn) -> R) -> Option<R> {
        if hva.raw() >= HVA_LIMIT {
            return None;
        }
        let _pinned = self.access.read();
        let (_, level, pte) = self.walk_slot(hva.raw());
        pte.present()
            .then(|| f(&self.arena, Self::leaf_of(hva, level, pte).pfn))
    }

    pub(crate) fn with_frame<R>(
        &self,
        hva: Hva,
        write: bool,
        f: impl FnOnce(&FrameArena, Pfn) -> R,
    ) -> Result<R, HostFault> {
        if hva.raw() >= HVA_LIMIT {
            return Err(HostFault::NotMapped { hva });
        }
        loop {
            {
                let _pinned = self.access.read();
                let (slot, level, pte) = self.walk_slot(hva.raw());
                if pte.present() && (!write || pte.has(HostPte::WRITABLE)) {
                    let bits = HostPte::YOUNG | if write { HostPte::DIRTY } else { 0 };
                    if pte.0 & bits != bits {
                        slot.fetch_or(bits, Ordering::AcqRel);
                    }
                    return Ok(f(&self.arena, Self::leaf_of(hva, level, pte).pfn));
                }
            }
            self.fault_in(hva, write)?;
        }
    }

    /// Reads `buf.len()` bytes at `hva`, faulting pages in as needed.
    pub fn read(&self, hva: Hva, buf: &mut [u8]) -> Result<(), HostFault> {
        let mut done = 0;
        while done < buf.len() {
            let at = hva.add(done as u64);
            let off = at.page_offset() as usize;
            let n = (PAGE_SIZE as usize - off).min(buf.len() - done);
            self.with_frame(at, false, |a, pfn| a.read(pfn, off, &mut buf[done..done + n]))?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `hva`, faulting pages in (and breaking COW) as needed.
    pub fn write(&self, hva: Hva, buf: &[u8]) -> Result<(), HostFault> {
        let mut done = 0;
        while done < buf.len() {
            let at = hva.add(done as u64);
            let off = at.page_offset() as usize;
            let n = (PAGE_SIZE as usize - off).min(buf.len() - done);
            self.with_frame(at, true, |a, pfn| a.write(pfn, off, &buf[done..done + n]))?;
            done += n;
        }
        Ok(())
    }

    // ---- mapping operations -----------------------------------------------

    fn check_range(start: Hva, len: u64, align: u64) -> Result<HvaRange, HostError> {
        if len == 0 {
            return Err(HostError::EmptyRange { hva: start });
        }
        if !start.is_aligned(align) {
            return Err(HostError::Unaligned {
                what: "address",
                value: start.raw(),
                align,
            });
        }
        if !len.is_multiple_of(align) {
            return Err(HostError::Unaligned {
                what: "length",
                value: len,
                align,
            });
        }
        match start.raw().checked_add(len) {
            Some(end) if end <= HVA_LIMIT => Ok(HvaRange::new(start, len)),
            _ => Err(HostError::OutOfAddressSpace {
                start,
                end: start.raw().wrapping_add(len),
            }),
        }
    }

    /// `mmap(MAP_ANONYMOUS)`: a new mapping of `len` bytes at `hva`, faulted
    /// in on demand. Does not overlap an existing mapping.
    pub fn mmap(&self, hva: Hva, len: u64, flags: VmaFlags) -> Result<(), HostError> {
        let align = if flags.contains(VmaFlags::HUGETLB_1G) {
            SIZE_1G
        } else {
            PAGE_SIZE
        };
        let r = Self::check_range(hva, len, align)?;
        let mut mm = self.mm.lock();
        if let Some((&start, _)) = mm
            .vmas
            .range(..r.end.raw())
            .next_back()
            .filter(|(_, v)| v.end > r.start.raw())
        {
            return Err(HostError::Overlap {
                start: hva,
                end: r.end.raw(),
                existing: Hva::new(start),
            });
        }
        mm.vmas.insert(
            hva.raw(),
            Vma {
                end: r.end.raw(),
                flags,
            },
        );
        Ok(())
    }

    /// Checks a range operation on huge leaves: 1 GiB pages partially
    /// covered are refused (hugetlb pages are not split).
    fn check_no_partial_1g(&self, op: &'static str, r: HvaRange) -> Result<(), HostError> {
        for edge in [r.start.raw(), r.end.raw()] {
            if !edge.is_multiple_of(SIZE_1G)
                && let Some(l) = self.lookup(Hva::new(edge))
                && l.level == Level::L3
            {
                return Err(HostError::NotApplicable {
                    op,
                    hva: Hva::new(edge),
                    reason: "a 1 GiB hugetlb page is only handled whole",
                });
            }
        }
        Ok(())
    }

    /// Splits the THPs straddling the edges of `r`.
    fn split_edges(&self, mm: &mut Mm, r: HvaRange) -> Result<(), HostError> {
        for edge in [r.start.raw(), r.end.raw()] {
            if !edge.is_multiple_of(SIZE_2M)
                && let Some(l) = self.lookup(Hva::new(edge))
                && l.level == Level::L2
            {
                self.split_locked(mm, Hva::new(edge))?;
            }
        }
        Ok(())
    }

    /// `munmap`: removes every mapping in the range (holes are fine),
    /// frees its frames and swap slots, and the page tables it empties.
    pub fn munmap(&self, hva: Hva, len: u64) -> Result<(), HostError> {
        let r = Self::check_range(hva, len, PAGE_SIZE)?;
        let mut mm = self.mm.lock();
        self.check_no_partial_1g("munmap", r)?;
        self.split_edges(&mut mm, r)?;
        let mut rel = Released::default();
        self.invalidate(&[r], NotifierEvent::Unmap, || {
            self.clear_range(self.root, Level::L4, r, &mut rel);
        });
        mm.split_vma_at(r.start.raw());
        mm.split_vma_at(r.end.raw());
        let doomed: Vec<u64> = mm.vmas.range(r.start.raw()..r.end.raw()).map(|(&s, _)| s).collect();
        for s in doomed {
            mm.vmas.remove(&s);
        }
        self.finish(&mut mm, rel);
        Ok(())
    }

    /// Clears every entry of `table` (at `level`) in `r`, collecting what
    /// to free. Whole sub-tables inside `r` are unlinked and retired.
    fn clear_range(&self, table: Pfn, level: Level, r: HvaRange, rel: &mut Released) {
        let size = level.size();
        let t = self.arena.table(table);
        let first = r.start.raw() / size * size;
        let mut span = first;
        while span < r.end.raw() && span < HVA_LIMIT {
            let slot = &t[index(span, level)];
            let pte = HostPte(slot.load(Ordering::Acquire));
            let whole = span >= r.start.raw() && span + size <= r.end.raw();
            if pte.is_swap() {
                rel.swap_slots.push(pte.swap_slot());
                slot.store(HostPte::NONE.0, Ordering::Release);
            } else if pte.present() {
                if level == Level::L1 || pte.has(HostPte::HUGE) {
                    debug_assert!(whole, "huge leaves straddling the range were split");
                    let ps = level.page_size().expect("leaves are 4K, 2M or 1G");
                    rel.frames.push((pte.pfn(), ps, pte.has(HostPte::SHARED)));
                    slot.store(HostPte::NONE.0, Ordering::Release);
                } else {
                    let below = level.down().expect("tables are above level 1");
                    let sub = HvaRange {
                        start: Hva::new(span.max(r.start.raw())),
                        end: Hva::new((span + size).min(r.end.raw())),
                    };
                    self.clear_range(pte.pfn(), below, sub, rel);
                    if whole {
                        slot.store(HostPte::NONE.0, Ordering::Release);
                        rel.tables.push(pte.pfn());
                    }
                }
            }
            span += size;
        }
    }

    /// Frees what an operation released, after its invalidation ended.
    fn finish(&self, mm: &mut Mm, rel: Released) {
        for (pfn, size, shared) in rel.frames {
            if shared {
                self.ksm_put(mm, pfn);
            } else {
                self.arena
                    .free(pfn, size)
                    .expect("an unmapped host leaf frees an allocated run");
            }
        }
        for s in rel.swap_slots {
            mm.swap.remove(&s);
        }
        self.retire_tables(rel.tables);
    }

    /// A zeroed frame for a page table, counted and registered.
    fn new_table(&self) -> Result<Pfn, FrameError> {
        let t = self.arena.alloc_4k()?;
        self.table_frames.fetch_add(1, Ordering::Relaxed);
        self.tables.lock().insert(t);
        Ok(t)
    }

    /// Frees unlinked host page tables after every lock-free lookup that
    /// might be inside them has finished (crossbeam-epoch grace period).
    fn retire_tables(&self, tables: Vec<Pfn>) {
        if tables.is_empty() {
            return;
        }
        self.table_frames.fetch_sub(tables.len() as u64, Ordering::Relaxed);
        let arena = self.arena.clone();
        let registry = self.tables.clone();
        let guard = epoch::pin();
        guard.defer(move || {
            let mut registry = registry.lock();
            for t in tables {
                registry.remove(&t);
                arena
                    .free(t, PageSize::Size4K)
                    .expect("a retired host page table is freed once");
            }
        });
        guard.flush();
    }

    /// THP collapse (khugepaged): the 2 MiB block holding `hva`, mapped by a
    /// page table of small pages, becomes one huge mapping of a new 2 MiB
    /// frame holding the same data (absent pages read as zero, swapped ones
    /// are read back). The old frames are freed and the page table retired.
    pub fn collapse_thp(&self, hva: Hva) -> Result<(), HostError> {
        let base = hva.align_down(SIZE_2M);
        let mut mm = self.mm.lock();
        let na = |reason| HostError::NotApplicable {
            op: "collapse",
            hva,
            reason,
        };
        match mm.find_vma(base.raw()) {
            Some((s, v)) if s <= base.raw() && base.raw() + SIZE_2M <= v.end && v.flags.contains(VmaFlags::THP) => {}
            _ => return Err(na("the 2 MiB block is not inside one THP-enabled mapping")),
        }
        let (pmd, level, pte) = self.walk_to(base.raw(), Level::L2);
        if level != Level::L2 || !pte.present() {
            return Err(na("no page table of small pages maps the block"));
        }
        if pte.has(HostPte::HUGE) {
            return Err(na("the block is already a huge page"));
        }
        let table = pte.pfn();
        let writable = mm
            .find_vma(base.raw())
            .is_some_and(|(_, v)| v.flags.contains(VmaFlags::WRITE));
        let huge = self.arena.alloc(PageSize::Size2M)?;
        let mut rel = Released::default();
        self.invalidate(&[HvaRange::new(base, SIZE_2M)], NotifierEvent::Collapse, || {
            let mut bits = if writable { HostPte::WRITABLE } else { 0 };
            for (i, e) in self.arena.table(table).iter().enumerate() {
                // Read with accesses excluded: young/dirty bits are final.
                let p = HostPte(e.load(Ordering::Acquire));
                let dst = huge.add(i as u64);
                if p.present() {
                    self.arena.copy_frame(dst, p.pfn());
                    bits |= p.0 & (HostPte::YOUNG | HostPte::DIRTY);
                    rel.frames.push((p.pfn(), PageSize::Size4K, p.has(HostPte::SHARED)));
                } else if p.is_swap() {
                    let data = &mm.swap[&p.swap_slot()];
                    self.arena.write(dst, 0, &data[..]);
                    rel.swap_slots.push(p.swap_slot());
                }
            }
            pmd.store(HostPte::leaf(huge, Level::L2, bits).0, Ordering::Release);
        });
        rel.tables.push(table);
        self.finish(&mut mm, rel);
        bump(&self.counters.collapses);
        Ok(())
    }

    /// THP split: the 2 MiB huge mapping holding `hva` becomes a page table
    /// of 512 small mappings of the same frames (data stays in place).
    pub fn split_thp(&self, hva: Hva) -> Result<(), HostError> {
        let mut mm = self.mm.lock();
        self.split_locked(&mut mm, hva)
    }

    fn split_locked(&self, _mm: &mut Mm, hva: Hva) -> Result<(), HostError> {
        let base = hva.align_down(SIZE_2M);
        let (pmd, level, pte) = self.walk_to(base.raw(), Level::L2);
        if !pte.present() || !pte.has(HostPte::HUGE) || level != Level::L2 {
            return Err(HostError::NotApplicable {
                op: "split",
                hva,
                reason: "not mapped by a 2 MiB huge page",
            });
        }
        let table = self.new_table()?;
        let keep = pte.0 & (HostPte::WRITABLE | HostPte::YOUNG | HostPte::DIRTY);
        for (i, e) in self.arena.table(table).iter().enumerate() {
            e.store(
                HostPte::leaf(pte.pfn().add(i as u64), Level::L1, keep).0,
                Ordering::Relaxed,
            );
        }
        self.invalidate(&[HvaRange::new(base, SIZE_2M)], NotifierEvent::Split, || {
            // Young/dirty set since the copy above are carried over.
            let now = HostPte(pmd.load(Ordering::Acquire));
            let extra = now.0 & (HostPte::YOUNG | HostPte::DIRTY);
            if extra != keep & (HostPte::YOUNG | HostPte::DIRTY) {
                for e in self.arena.table(table) {
                    e.fetch_or(extra, Ordering::Relaxed);
                }
            }
            pmd.store(HostPte::table(table).0, Ordering::Release);
        });
        bump(&self.counters.splits);
        Ok(())
    }

    /// Page migration (compaction, NUMA balancing): the 4 KiB or 2 MiB page
    /// holding `hva` moves to a new frame; the old one is freed. Returns the
    /// new frame of the page holding `hva`.
    pub fn migrate(&self, hva: Hva) -> Result<Pfn, HostError> {
        let mut mm = self.mm.lock();
        let (slot, level, pte) = self.walk_slot(hva.raw());
        let na = |reason| HostError::NotApplicable {
            op: "migrate",
            hva,
            reason,
        };
        if !pte.present() {
            return Err(na("not mapped"));
        }
        if pte.has(HostPte::SHARED) {
            return Err(na("KSM pages are not migrated"));
        }
        let size = match level {
            Level::L1 => PageSize::Size4K,
            Level::L2 => PageSize::Size2M,
            _ => return Err(na("1 GiB hugetlb pages are not migrated")),
        };
        let new = self.arena.alloc(size)?;
        let range = HvaRange::new(hva.align_down(size.bytes()), size.bytes());
        self.invalidate(&[range], NotifierEvent::Migrate, || {
            let now = HostPte(slot.load(Ordering::Acquire));
            self.arena.copy_frames(new, now.pfn(), size.frames());
            slot.store(now.with_pfn(new).0, Ordering::Release);
        });
        self.finish(
            &mut mm,
            Released {
                frames: vec![(pte.pfn(), size, false)],
                ..Released::default()
            },
        );
        bump(&self.counters.migrations);
        Ok(new.add((hva.raw() & (size.bytes() - 1)) >> 12))
    }

    /// Swap-out of the 4 KiB page holding `hva` (a THP is split first): the
    /// data goes to the swap store, the entry becomes a swap entry, the
    /// frame is freed. The next touch faults it in with a new frame.
    pub fn swap_out(&self, hva: Hva) -> Result<(), HostError> {
        let mut mm = self.mm.lock();
        let (_, level, pte) = self.walk_slot(hva.raw());
        if !pte.present() {
            return Err(HostError::NotApplicable {
                op: "swap out",
                hva,
                reason: "not mapped",
            });
        }
        match level {
            Level::L1 => {}
            Level::L2 => self.split_locked(&mut mm, hva)?,
            _ => {
                return Err(HostError::NotApplicable {
                    op: "swap out",
                    hva,
                    reason: "1 GiB hugetlb pages are not swapped",
                });
            }
        }
        let (slot, _, pte) = self.walk_slot(hva.raw());
        let swap_slot = mm.next_swap_slot;
        mm.next_swap_slot += 1;
        let page = HvaRange::new(hva.align_down(PAGE_SIZE), PAGE_SIZE);
        let data = self.invalidate(&[page], NotifierEvent::SwapOut, || {
            let data = self.arena.frame_bytes(pte.pfn());
            slot.store(HostPte::swap(swap_slot).0, Ordering::Release);
            data
        });
        mm.swap.insert(swap_slot, data);
        self.finish(
            &mut mm,
            Released {
                frames: vec![(pte.pfn(), PageSize::Size4K, pte.has(HostPte::SHARED))],
                ..Released::default()
            },
        );
        bump(&self.counters.swap_outs);
        Ok(())
    }

    /// Brings a swapped-out page back (a read fault): a new frame.
    pub fn swap_in(&self, hva: Hva) -> Result<HostLeaf, HostFault> {
        self.fault_in(hva, false)
    }

    /// KSM merge of the 4 KiB pages holding `a` and `b`: if their contents
    /// are identical, both map one read-only shared frame and the other
    /// frame is freed; a later write breaks the sharing with copy on write.
    /// Returns whether they were merged. Huge pages must be split first.
    pub fn ksm_merge(&self, a: Hva, b: Hva) -> Result<bool, HostError> {
        let mut mm = self.mm.lock();
        let (a, b) = (a.align_down(PAGE_SIZE), b.align_down(PAGE_SIZE));
        let mut leaves = [(a, None), (b, None)];
        for (hva, leaf) in &mut leaves {
            let (slot, level, pte) = self.walk_slot(hva.raw());
            if !pte.present() || level != Level::L1 {
                return Err(HostError::NotApplicable {
                    op: "KSM merge",
                    hva: *hva,
                    reason: "not mapped by a present 4 KiB page",
                });
            }
            *leaf = Some((slot, pte));
        }
        if a == b {
            return Err(HostError::NotApplicable {
                op: "KSM merge",
                hva: a,
                reason: "a page cannot be merged with itself",
            });
        }
        let [(_, Some((slot_a, pa))), (_, Some((slot_b, pb)))] = leaves else {
            unreachable!("both leaves were filled above");
        };
        if pa.pfn() == pb.pfn() {
            return Ok(true);
        }
        // Cheap rejection before bothering the notifiers.
        if !self.arena.frames_equal(pa.pfn(), pb.pfn()) {
            return Ok(false);
        }
        let ranges = [HvaRange::new(a, PAGE_SIZE), HvaRange::new(b, PAGE_SIZE)];
        let merged = self.invalidate(&ranges, NotifierEvent::KsmMerge, || {
            // Writers are excluded now; compare again for the final word.
            if !self.arena.frames_equal(pa.pfn(), pb.pfn()) {
                return None;
            }
            let (keep, drop) = if pb.has(HostPte::SHARED) && !pa.has(HostPte::SHARED) {
                (pb, pa)
            } else {
                (pa, pb)
            };
            for slot in [slot_a, slot_b] {
                let young = HostPte(slot.load(Ordering::Acquire)).0 & HostPte::YOUNG;
                slot.store(
                    HostPte::leaf(keep.pfn(), Level::L1, HostPte::SHARED | young).0,
                    Ordering::Release,
                );
            }
            Some((keep, drop))
        });
        let Some((keep, drop)) = merged else {
            return Ok(false);
        };
        if !keep.has(HostPte::SHARED) {
            mm.ksm_refs.insert(keep.pfn(), 1);
        }
        *mm.ksm_refs
            .get_mut(&keep.pfn())
            .expect("the kept KSM frame has a count") += 1;
        self.finish(
            &mut mm,
            Released {
                frames: vec![(drop.pfn(), PageSize::Size4K, drop.has(HostPte::SHARED))],
                ..Released::default()
            },
        );
        bump(&self.counters.ksm_merges);
        Ok(true)
    }

    /// `mprotect`: makes `[hva, hva + len)` read-only (existing mappings lose
    /// write permission, with an invalidation) or writable again (mappings
    /// gain it on the next write fault). The whole range must be mapped.
    pub fn mprotect(&self, hva: Hva, len: u64, writable: bool) -> Result<(), HostError> {
        let r = Self::check_range(hva, len, PAGE_SIZE)?;
        let mut mm = self.mm.lock();
        if let Some(hole) = mm.first_hole(r.start.raw(), r.end.raw()) {
            return Err(HostError::NotMapped { hva: Hva::new(hole) });
        }
        self.check_no_partial_1g("mprotect", r)?;
        mm.split_vma_at(r.start.raw());
        mm.split_vma_at(r.end.raw());
        for (_, v) in mm.vmas.range_mut(r.start.raw()..r.end.raw()) {
            v.flags.set(VmaFlags::WRITE, writable);
        }
        if !writable {
            self.split_edges(&mut mm, r)?;
            self.invalidate(&[r], NotifierEvent::Protection, || {
                self.for_each_leaf(r, |slot, _, _| {
                    slot.fetch_and(!HostPte::WRITABLE, Ordering::AcqRel);
                });
            });
        }
        Ok(())
    }

    /// Calls `f(slot, hva, level)` for every present leaf in `r` (under
    /// the mm lock).
    fn for_each_leaf(&self, r: HvaRange, mut f: impl FnMut(&AtomicU64, u64, Level)) {
        self.visit(self.root, Level::L4, r, &mut f);
    }

    fn visit(&self, table: Pfn, level: Level, r: HvaRange, f: &mut impl FnMut(&AtomicU64, u64, Level)) {
        let size = level.size();
        let t = self.arena.table(table);
        let mut span = r.start.raw() / size * size;
        while span < r.end.raw() && span < HVA_LIMIT {
            let slot = &t[index(span, level)];
            let pte = HostPte(slot.load(Ordering::Acquire));
            if pte.present() {
                if level == Level::L1 || pte.has(HostPte::HUGE) {
                    f(slot, span, level);
                } else {
                    let below = level.down().expect("tables are above level 1");
                    let sub = HvaRange {
                        start: Hva::new(span.max(r.start.raw())),
                        end: Hva::new((span + size).min(r.end.raw())),
                    };
                    self.visit(pte.pfn(), below, sub, f);
                }
            }
            span += size;
        }
    }

    // ---- aging -------------------------------------------------------------

    fn age(&self, r: HvaRange, clear: bool) -> bool {
        let _mm = self.mm.lock();
        let mut young = false;
        self.for_each_leaf(r, |slot, _, _| {
            let was = if clear {
                slot.fetch_and(!HostPte::YOUNG, Ordering::AcqRel)
            } else {
                slot.load(Ordering::Acquire)
            };
            young |= was & HostPte::YOUNG != 0;
        });
        young
    }

    /// Reclaim's `ptep_clear_flush_young` + `mmu_notifier_clear_flush_young`:
    /// clears the young bits in `r`, asks every notifier to do the same
    /// with a flush, and returns whether anything was young.
    pub fn clear_flush_young(&self, r: HvaRange) -> bool {
        let mut young = self.age(r, true);
        for s in self.subscribers() {
            young |= s.clear_flush_young(r);
        }
        young
    }

    /// Like [`HostAddressSpace::clear_flush_young`] without TLB flushes
    /// (`mmu_notifier_clear_young`).
    pub fn clear_young(&self, r: HvaRange) -> bool {
        let mut young = self.age(r, true);
        for s in self.subscribers() {
            young |= s.clear_young(r);
        }
        young
    }

    /// Whether anything in `r` is young, in the host or any notifier
    /// (`mmu_notifier_test_young`); clears nothing.
    pub fn test_young(&self, r: HvaRange) -> bool {
        let mut young = self.age(r, false);
        for s in self.subscribers() {
            young |= s.test_young(r);
        }
        young
    }
}

/// Nudges crossbeam-epoch to run pending frees of retired host page tables
/// (they run eventually anyway; tests that count frames call this).
pub fn reclaim_retired_tables() {
    for _ in 0..8 {
        epoch::pin().flush();
    }
}

impl Drop for HostAddressSpace {
    fn drop(&mut self) {
        self.release();
        // Every mapping is gone; free the remaining (empty) tables.
        fn free_tables(arena: &FrameArena, table: Pfn, level: Level) {
            if let Some(below) = level.down() {
                for e in arena.table(table) {
                    let pte = HostPte(e.load(Ordering::Acquire));
                    if pte.present() && !pte.has(HostPte::HUGE) {
                        free_tables(arena, pte.pfn(), below);
                    }
                }
            }
            let _ = arena.free(table, PageSize::Size4K);
        }
        free_tables(&self.arena, self.root, Level::L4);
    }
}
