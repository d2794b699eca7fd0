//! The TDP MMU: EPT tables mapping gpa → hpa, built on EPT violations.
//!
//! The tree is *direct*: it depends only on memslots and host mappings,
//! never on the guest's page tables. Faults run under `mmu_lock` held for
//! **read**, many at once, installing tables and leaves with
//! compare-exchange through [`SpteIter`]; a lost race retries. Invalidations
//! from MMU notifiers run under the write lock and flush TLBs before the
//! lock is released. Page tables unlinked from the tree are freed only after
//! an epoch grace period (`crossbeam-epoch`), because the hardware model may
//! still be walking them.
//!
//! Roots are per address space, reference-counted by [`RootRef`]; a root is
//! valid until invalidated, and no new reference can be taken to an invalid
//! root (seed `003_*`).

mod age;
mod audit;
mod dirty;
mod ring;

pub use audit::AuditViolation;
pub use ring::DirtyRingError;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

use super::flush::{PendingFlush, RemoteTlb};
use super::iter::{Geometry, SpteIter};
use super::spte::{FROZEN_SPTE, Spte, SpteAccess, SpteFormat};
use super::stats::MmuStats;
use crate::addr::{Gfn, Gpa, Level, PageSize, Pfn};
use crate::mem::{
    DirtyRing, FaultinError, FrameArena, FrameError, HostAddressSpace, HvaRange, InvalidateState, MemslotTable,
    MmuLock, MmuLockReadGuard, MmuNotifier, MmuWriteLockHeld, NotifierRange, SlotCache, faultin_gfn,
};
use crate::sync;

/// Configuration of a TDP MMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdpConfig {
    /// Tree shape (4-level EPT by default).
    pub geometry: Geometry,
    /// Whether the EPTP enables accessed/dirty flags.
    pub ad: bool,
    /// The largest leaf the MMU installs (1 = 4K only, 2 = 2M, 3 = 1G).
    pub max_level: u8,
    /// The NX huge page mitigation (KVM's `nx_huge_pages`): huge SPTEs are
    /// not executable; an instruction fetch maps the page at 4K.
    pub nx_huge_pages: bool,
    /// How dirty logging finds written pages.
    pub dirty_log: DirtyLogMode,
}

/// How dirty logging finds written pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DirtyLogMode {
    /// Write-protect SPTEs; the first write faults and logs the page.
    #[default]
    WriteProtect,
    /// Clear EPT Dirty bits and read them back at each harvest (KVM with
    /// PML): no faults on writes. Needs EPT A/D (`ad`).
    DirtyBit,
}

impl Default for TdpConfig {
    fn default() -> Self {
        TdpConfig {
            geometry: Geometry::X86_4LEVEL,
            ad: true,
            max_level: 3,
            nx_huge_pages: false,
            dirty_log: DirtyLogMode::WriteProtect,
        }
    }
}

/// One root of the tree, shared by the vCPUs of an address space.
#[derive(Debug)]
pub struct TdpRoot {
    pfn: Pfn,
    as_id: u16,
    refs: AtomicU32,
    valid: AtomicBool,
    /// The root generation that announced its invalidation (`u64::MAX`
    /// while valid).
    invalidated_at: AtomicU64,
}

impl TdpRoot {
    /// The root table's frame (what the EPTP points at).
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }
    /// The address space.
    pub fn as_id(&self) -> u16 {
        self.as_id
    }
    /// Whether the root is still valid (not invalidated by a zap-all).
    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }
    /// The root generation whose change asked vCPUs to drop this root
    /// (`u64::MAX` while it is valid): a vCPU that has seen that
    /// generation must not walk it any more.
    pub fn invalidated_at(&self) -> u64 {
        self.invalidated_at.load(Ordering::Acquire)
    }
}

/// A counted reference to a valid root. It can only be taken while the
/// root is valid; dropping the last reference to an invalidated root frees
/// its tree.
#[derive(Debug)]
pub struct RootRef {
    root: Arc<TdpRoot>,
    arena: Arc<FrameArena>,
    geometry: Geometry,
    stats: Arc<MmuStats>,
}

impl RootRef {
    /// Takes a reference, failing on an invalid root or one whose count
    /// already dropped to zero (KVM's `kvm_tdp_mmu_get_root`). Only called
    /// with the MMU's root list locked, which invalidation also holds: so a
    /// root seen valid here cannot be invalidated before the reference is
    /// taken (seed `003_*`).
    ///
    /// No schedule point for model tests here ([`crate::sync`]): the root
    /// list is a `parking_lot` mutex, and nothing can interleave with this
    /// check anyway while it is held.
    fn try_get(
        root: &Arc<TdpRoot>,
        arena: &Arc<FrameArena>,
        geometry: Geometry,
        stats: &Arc<MmuStats>,
    ) -> Option<RootRef> {
        if !root.is_valid() {
            return None;
        }
        let mut n = root.refs.load(Ordering::Acquire);
        loop {
            if n == 0 {
                return None;
            }
            match root
                .refs
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(cur) => n = cur,
            }
        }
        Some(RootRef {
            root: root.clone(),
            arena: arena.clone(),
            geometry,
            stats: stats.clone(),
        })
    }

    /// The root.
    pub fn root(&self) -> &Arc<TdpRoot> {
        &self.root
    }
}

impl Clone for RootRef {
    fn clone(&self) -> Self {
        self.root.refs.fetch_add(1, Ordering::AcqRel);
        RootRef {
            root: self.root.clone(),
            arena: self.arena.clone(),
            geometry: self.geometry,
            stats: self.stats.clone(),
        }
    }
}

impl Drop for RootRef {
    fn drop(&mut self) {
        put_root(&self.root, &self.arena, self.geometry, &self.stats);
    }
}

/// Drops one reference; the last one frees the tree after a grace period.
/// Only an invalid root reaches zero: the MMU's list holds a reference
/// from creation until the root has been invalidated and zapped.
fn put_root(root: &Arc<TdpRoot>, arena: &Arc<FrameArena>, geometry: Geometry, stats: &MmuStats) {
    if root.refs.fetch_sub(1, Ordering::AcqRel) == 1 {
        assert!(!root.is_valid(), "the last reference to a valid root was dropped");
        // Nothing links into an invalid, unreferenced tree any more: its
        // tables can be counted now and freed after the grace period.
        let tables = count_tables(arena, geometry, root.pfn, geometry.levels);
        stats.account_tables(-(tables as i64));
        defer_free_tree(arena, geometry, root.pfn, geometry.levels);
    }
}

/// The tables of a tree (the root included).
fn count_tables(arena: &FrameArena, geometry: Geometry, table: Pfn, level: u8) -> u64 {
    let mut n = 1;
    if level > 1 {
        for slot in arena.table(table).iter().take(geometry.entries() as usize) {
            let spte = Spte(slot.load(Ordering::Acquire));
            if spte.is_mmu_present() && !spte.is_leaf(level) {
                n += count_tables(arena, geometry, spte.pfn(), level - 1);
            }
        }
    }
    n
}

/// Regions split by instruction fetches (NX huge pages): the queue the
/// recovery worker takes from, oldest first, and the set faults consult.
#[derive(Debug, Default)]
struct NxSplit {
    queue: std::collections::VecDeque<(u16, Gfn, u8)>,
    members: std::collections::HashSet<(u16, Gfn, u8)>,
}

/// The MMU's roots.
#[derive(Debug, Default)]
struct RootList {
    valid: Vec<Arc<TdpRoot>>,
    invalidated: Vec<Arc<TdpRoot>>,
}

impl RootList {
    fn all(&self) -> impl Iterator<Item = &Arc<TdpRoot>> {
        self.valid.iter().chain(&self.invalidated)
    }
}

/// What a fault came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// An SPTE was installed or changed; the access can be retried.
    Fixed,
    /// The SPTE was already right (another vCPU won); retry the access.
    Spurious,
    /// A race (lost compare-exchange, MMU-notifier invalidation): retry.
    Retry,
    /// No memslot: the access is MMIO, to be emulated by the VMM.
    Mmio,
    /// A write to a read-only memslot: exit to the VMM.
    ReadOnlySlot,
}

/// Why a fault could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum TdpError {
    /// The host could not provide the page (e.g. no mapping at the hva).
    #[error("host fault for {gpa}: {source}")]
    Host {
        /// The guest-physical address.
        gpa: Gpa,
        /// The host's answer.
        source: FaultinError,
    },
    /// No frame for a page table.
    #[error("out of frames for MMU page tables: {0}")]
    OutOfFrames(#[from] FrameError),
    /// `TdpConfig::max_level` is not a leaf level (1, 2 or 3).
    #[error("TDP max_level {max_level} is not 1 (4K), 2 (2M) or 3 (1G)")]
    InvalidMaxLevel {
        /// The configured value.
        max_level: u8,
    },
    /// The tree's geometry cannot be walked as EPT by a vCPU (EPT is 4 or
    /// 5 levels of 512-entry tables).
    #[error("a vCPU needs 4- or 5-level EPT with 512-entry tables, not {geometry:?}")]
    NotEptGeometry {
        /// The configured geometry.
        geometry: Geometry,
    },
    /// A fault at a guest-physical address the tree cannot map: above the
    /// reach of its levels (e.g. MAXPHYADDR 52 with 4-level EPT, which
    /// KVM never configures: it caps the guest's MAXPHYADDR at 48).
    #[error("{gpa} is beyond the {levels}-level TDP tree")]
    GpaBeyondTree {
        /// The guest-physical address.
        gpa: Gpa,
        /// Levels of the tree.
        levels: u8,
    },
    /// The dirty ring is enabled but the fault came without the vCPU's ring.
    #[error("the dirty ring is enabled: a fault must bring the faulting vCPU's ring")]
    DirtyRingRequired,
}

/// An EPT violation or misconfiguration, as the MMU needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdpFault {
    /// The faulting guest-physical address.
    pub gpa: Gpa,
    /// Whether the access was a write.
    pub write: bool,
    /// Whether it was an instruction fetch.
    pub exec: bool,
    /// Whether hardware found a translation (the exit qualification's
    /// readable/writable/executable bits, KVM's `fault->present`). With
    /// EPT A/D on, a fault on no translation cannot be fixed by the
    /// lockless fast path, which is then skipped (KVM's
    /// `page_fault_can_be_fast`); pass `true` when unsure.
    pub present: bool,
}

/// The TDP MMU of one VM.
pub struct TdpMmu {
    arena: Arc<FrameArena>,
    host: Arc<HostAddressSpace>,
    slots: Arc<MemslotTable>,
    config: TdpConfig,
    fmt: SpteFormat,
    lock: MmuLock<()>,
    invalidate: InvalidateState,
    /// Roots (KVM's `tdp_mmu_roots`, guarded by `tdp_mmu_pages_lock`):
    /// the valid ones, and the invalidated ones still to be zapped. The
    /// list holds one reference to each.
    roots: Mutex<RootList>,
    /// Bumped, under the write lock, whenever roots are invalidated: vCPUs
    /// reload their root when it changes (KVM's
    /// `KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`).
    root_generation: AtomicU64,
    /// Remote TLB flushes: the generation vCPUs check, and their modes.
    remote_tlb: RemoteTlb,
    /// Huge regions split by an instruction fetch under the NX huge page
    /// mitigation, oldest first (KVM's `possible_nx_huge_pages`):
    /// (address space, first gfn of the region, its level).
    nx_split: Mutex<NxSplit>,
    /// The per-vCPU dirty ring size, once enabled (`KVM_CAP_DIRTY_LOG_RING`).
    dirty_ring: std::sync::OnceLock<u32>,
    stats: Arc<MmuStats>,
}

impl std::fmt::Debug for TdpMmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TdpMmu")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TdpMmu {
    /// A TDP MMU over `host` memory and `slots`, registered as an MMU
    /// notifier of `host`.
    pub fn new(host: Arc<HostAddressSpace>, slots: Arc<MemslotTable>, config: TdpConfig) -> Arc<TdpMmu> {
        let mmu = Arc::new(TdpMmu {
            arena: host.arena().clone(),
            host: host.clone(),
            slots,
            config,
            fmt: SpteFormat::Ept { ad: config.ad },
            lock: MmuLock::new(()),
            invalidate: InvalidateState::default(),
            roots: Mutex::new(RootList::default()),
            root_generation: AtomicU64::new(0),
            remote_tlb: RemoteTlb::default(),
            nx_split: Mutex::new(NxSplit::default()),
            dirty_ring: std::sync::OnceLock::new(),
            stats: Arc::new(MmuStats::default()),
        });
        host.register_notifier(Arc::new(Notifier(Arc::downgrade(&mmu))));
        mmu.slots
            .register_observer(Arc::new(dirty::SlotObserver(Arc::downgrade(&mmu))));
        mmu
    }

    /// The SPTE format.
    pub fn format(&self) -> SpteFormat {
        self.fmt
    }

    /// The configuration.
    pub fn config(&self) -> TdpConfig {
        self.config
    }

    /// The frame arena holding the tables.
    pub fn arena(&self) -> &Arc<FrameArena> {
        &self.arena
    }

    /// The counters.
    pub fn stats(&self) -> &MmuStats {
        &self.stats
    }

    /// The invalidation state (`mmu_invalidate_seq` and friends).
    pub fn invalidate_state(&self) -> &InvalidateState {
        &self.invalidate
    }

    /// Remote TLB flushes: vCPUs register here and enter/leave guest mode.
    pub fn remote_tlb(&self) -> &RemoteTlb {
        &self.remote_tlb
    }

    /// Flushes every vCPU's translations made through this MMU and waits
    /// until none can use one (KVM's `kvm_flush_remote_tlbs`).
    fn flush_remote_tlbs(&self) {
        self.remote_tlb.flush();
        MmuStats::inc(&self.stats.local().remote_tlb_flush);
    }

    /// Discharges a flush obligation.
    pub fn discharge(&self, pending: PendingFlush) {
        if pending.discharge(&self.remote_tlb) {
            MmuStats::inc(&self.stats.local().remote_tlb_flush);
        }
    }

    /// A reference to the valid root of `as_id`, allocating it on first use
    /// (KVM's `kvm_tdp_mmu_get_vcpu_root_hpa`).
    pub fn get_root(&self, as_id: u16) -> Result<RootRef, TdpError> {
        sync::sched_point();
        if sync::bug(sync::Bug::UncheckedRootRef) {
            // Injected bug (model tests only): the reference is taken
            // after the list lock is dropped, without `try_get`'s checks.
            let found = self.roots.lock().valid.iter().find(|r| r.as_id == as_id).cloned();
            if let Some(root) = found {
                sync::sched_point();
                root.refs.fetch_add(1, Ordering::AcqRel);
                return Ok(RootRef {
                    root,
                    arena: self.arena.clone(),
                    geometry: self.config.geometry,
                    stats: self.stats.clone(),
                });
            }
        }
        let mut roots = self.roots.lock();
        for r in roots.valid.iter() {
            if r.as_id == as_id
                && let Some(rr) = RootRef::try_get(r, &self.arena, self.config.geometry, &self.stats)
            {
                return Ok(rr);
            }
        }
        let pfn = self.arena.alloc_4k()?;
        self.stats.account_tables(1);
        let root = Arc::new(TdpRoot {
            pfn,
            as_id,
            // The list's own reference.
            refs: AtomicU32::new(1),
            valid: AtomicBool::new(true),
            invalidated_at: AtomicU64::new(u64::MAX),
        });
        roots.valid.push(root.clone());
        Ok(RootRef::try_get(&root, &self.arena, self.config.geometry, &self.stats).expect("a new root is valid"))
    }

    /// The root generation: when it changes, a vCPU whose root is no longer
    /// valid must drop it and load a new one.
    pub fn root_generation(&self) -> u64 {
        self.root_generation.load(Ordering::Acquire)
    }

    /// Fast zap of everything (KVM's `kvm_mmu_zap_all_fast`): in one critical
    /// section under the write lock, every valid root is marked invalid,
    /// moved to the invalidated queue (its list reference with it), and the
    /// vCPUs are asked to drop it. Nothing can take a new reference to an
    /// invalid root afterwards. The trees are zapped later by
    /// [`TdpMmu::zap_invalidated_roots`] and freed when their last
    /// reference goes; the caller waits only for the invalidation, whatever
    /// the amount of memory mapped.
    pub fn zap_all_fast(&self) {
        let _guard = self.lock.write();
        // Model tests: `get_root` does not take `mmu_lock` and may run here.
        sync::sched_point();
        let mut roots = self.roots.lock();
        let valid = std::mem::take(&mut roots.valid);
        let announced = self.root_generation.load(Ordering::Acquire) + 1;
        for r in &valid {
            r.invalidated_at.store(announced, Ordering::Release);
            r.valid.store(false, Ordering::Release);
        }
        roots.invalidated.extend(valid);
        // The request to vCPUs, in the same critical section (seed 003_*):
        // no yield between invalidating and asking vCPUs to drop.
        self.root_generation.fetch_add(1, Ordering::AcqRel);
        drop(roots);
        sync::sched_point();
        // vCPUs still running on the old roots must not keep translations.
        self.flush_remote_tlbs();
    }

    /// Zaps the leaves of every invalidated root under the read lock, while
    /// still holding the list's reference (so no tree is freed mid-zap),
    /// then drops that reference (KVM's
    /// `kvm_tdp_mmu_zap_invalidated_roots`). Returns the leaves zapped.
    pub fn zap_invalidated_roots(&self) -> u64 {
        let queued = std::mem::take(&mut self.roots.lock().invalidated);
        sync::sched_point();
        let guard = self.lock.read();
        let mut zapped = 0;
        for root in &queued {
            zapped += self.zap_root_leaves(&guard, root);
        }
        drop(guard);
        if zapped > 0 {
            self.flush_remote_tlbs();
        }
        for root in &queued {
            // Model tests: a vCPU may drop its reference at the same time.
            sync::sched_point();
            put_root(root, &self.arena, self.config.geometry, &self.stats);
        }
        zapped
    }

    /// Zaps every leaf of one root with atomic exchanges (the read lock
    /// allows concurrent faults, which fail on an invalid root).
    fn zap_root_leaves(&self, _guard: &MmuLockReadGuard<'_, ()>, root: &TdpRoot) -> u64 {
        let mut zapped = 0;
        let mut it = SpteIter::new(&self.arena, self.config.geometry, root.pfn, 1, 0);
        while it.valid() {
            let spte = it.old_spte();
            let level = it.level();
            if spte.is_mmu_present() && spte.is_leaf(level) {
                let old = Spte(it.sptep().swap(0, Ordering::AcqRel));
                if old.is_mmu_present() {
                    self.log_dirty_leaf(root.as_id, it.gfn(), level, old);
                    self.stats.account_leaf(level, -1);
                    MmuStats::inc(&self.stats.local().mmu_zapped);
                    zapped += 1;
                }
                it.refresh();
                it.skip_subtree();
                continue;
            }
            it.next();
        }
        zapped
    }

    /// Handles an EPT violation or misconfiguration at `fault.gpa` for the
    /// vCPU's root (KVM's `kvm_tdp_mmu_page_fault`): memslot → host page
    /// with the MMU-notifier retry protocol → install under the read lock.
    ///
    /// `ring` is the faulting vCPU's dirty ring when the dirty ring is
    /// enabled ([`TdpMmu::enable_dirty_ring`]): pages it dirties go there
    /// instead of the memslot's bitmap.
    pub fn page_fault(
        &self,
        root: &RootRef,
        fault: TdpFault,
        cache: &mut SlotCache,
        ring: Option<&DirtyRing>,
    ) -> Result<FaultOutcome, TdpError> {
        MmuStats::inc(&self.stats.local().pf_taken);
        self.check_ring(ring)?;
        // One epoch pin for the whole fault: the host lookup's, the fast
        // path's and the install's pins nest in it (a nested pin is a
        // counter increment; a fresh one is a full fence).
        let _epoch = crossbeam_epoch::pin();
        tracing::trace!(target: "kvm_page_fault", gpa = fault.gpa.raw(), write = fault.write, exec = fault.exec);
        let gfn = fault.gpa.frame();
        if gfn.raw() >= self.config.geometry.span() {
            // Installing it would alias the gfn modulo the tree's span and
            // overwrite another gfn's SPTE.
            return Err(TdpError::GpaBeyondTree {
                gpa: fault.gpa,
                levels: self.config.geometry.levels,
            });
        }
        // The snapshot stays held for the whole fault, as KVM holds
        // `kvm->srcu`: a memslot update waits for it, and no reference
        // count on the slot is touched (a shared cache line per fault).
        let slots = self.slots.load(root.root.as_id);
        let Some(slot) = slots.lookup_cached(gfn, cache) else {
            let generation = slots.generation();
            drop(slots);
            return self.mmio_fault(root, gfn, generation);
        };
        if slot.is_invalid() {
            // Being deleted or moved (KVM's `KVM_MEMSLOT_INVALID`): retry
            // until the change is done, so the access sees the new layout
            // (an MMIO answer now would drop a write to memory that is
            // merely moving).
            MmuStats::inc(&self.stats.local().pf_retry);
            return Ok(FaultOutcome::Retry);
        }
        if fault.write && slot.is_readonly() {
            return Ok(FaultOutcome::ReadOnlySlot);
        }
        let logging = slot.logs_dirty_pages();
        // Without A/D, access-tracked SPTEs look absent to hardware: the
        // fast path must be tried for them.
        if (fault.present || !self.config.ad)
            && let Some(outcome) = self.fast_page_fault(root, gfn, &fault, slot, ring)
        {
            return Ok(outcome);
        }
        let mapping = match faultin_gfn(&self.host, &self.invalidate, slot, gfn, fault.write) {
            Ok(m) => m,
            Err(source) => return Err(TdpError::Host { gpa: fault.gpa, source }),
        };
        let guard = self.lock.read();
        let Ok(valid) = mapping.validate(&guard, &self.invalidate) else {
            MmuStats::inc(&self.stats.local().pf_retry);
            return Ok(FaultOutcome::Retry);
        };
        // Dirty logging tracks 4K pages (KVM's hugepage adjust).
        let max = if logging {
            Level::L1
        } else {
            Level::new(self.config.max_level)
                .filter(|&l| l <= Level::L3)
                .ok_or(TdpError::InvalidMaxLevel {
                    max_level: self.config.max_level,
                })?
        };
        let mut level = valid.mapping_level(slot.max_mapping_level(gfn, max));
        let mut exec = true;
        if self.config.nx_huge_pages && level > Level::L1 {
            let region = (root.root.as_id, gfn.align_down(level.pages()), level.get());
            let mut split = self.nx_split.lock();
            if fault.exec {
                // Executable pages are mapped 4K: remember the huge region
                // so the recovery worker can make it huge again later.
                if split.members.insert(region) {
                    split.queue.push_back(region);
                    MmuStats::inc(&self.stats.local().nx_lpage_splits);
                }
                level = Level::L1;
            } else if split.members.contains(&region) {
                // KVM's disallowed_hugepage_adjust: the region stays 4K
                // until recovery, or every data access would undo the split.
                level = Level::L1;
            } else {
                exec = false;
            }
        }
        let pfn = valid.pfn_at(level);
        let access = SpteAccess {
            read: true,
            write: !slot.is_readonly(),
            exec,
            user: true,
        };
        let mut leaf = self
            .fmt
            .make_leaf(level.get(), pfn, access, valid.writable(), true, false);
        if logging && !fault.write {
            leaf = if self.dirty_bit_logging() {
                // Writable and clean: the hardware's D bit logs the write.
                Spte(leaf.0 & !self.fmt.dirty_mask())
            } else {
                // Writable only on the first write, which logs the page.
                leaf.clear_writable(self.fmt)
            };
        }
        let outcome = self.install(&guard, root, gfn.align_down(level.pages()), level.get(), leaf)?;
        if logging && leaf.is_writable(self.fmt) && outcome == FaultOutcome::Fixed {
            // Still under the read lock: no harvest can run between the
            // install and the mark.
            self.mark_dirty(slot, gfn, ring);
        }
        Ok(outcome)
    }

    fn mmio_fault(&self, root: &RootRef, gfn: Gfn, generation: u64) -> Result<FaultOutcome, TdpError> {
        MmuStats::inc(&self.stats.local().pf_emulate);
        if generation & crate::mem::memslot::MEMSLOT_GEN_UPDATE_IN_PROGRESS != 0 {
            // Never cache "no memslot" while memslots are changing.
            return Ok(FaultOutcome::Mmio);
        }
        let guard = self.lock.read();
        let mmio = self.fmt.make_mmio(gfn.raw(), generation);
        match self.install(&guard, root, gfn, 1, mmio)? {
            FaultOutcome::Fixed => {
                tracing::trace!(target: "mark_mmio_spte", gfn = gfn.raw(), generation);
                MmuStats::inc(&self.stats.local().pf_mmio_spte_created);
                Ok(FaultOutcome::Mmio)
            }
            FaultOutcome::Spurious => Ok(FaultOutcome::Mmio),
            other => Ok(other),
        }
    }

    /// Installs `leaf` for `gfn` at `level` (KVM's `kvm_tdp_mmu_map`):
    /// walks down from the root, linking new tables with compare-exchange
    /// and splitting a huge leaf that is in the way, then sets the leaf.
    fn install(
        &self,
        _guard: &MmuLockReadGuard<'_, ()>,
        root: &RootRef,
        gfn: Gfn,
        level: u8,
        leaf: Spte,
    ) -> Result<FaultOutcome, TdpError> {
        // Checked under the lock (KVM's `is_page_fault_stale`): roots are
        // invalidated only under the write lock, so a root valid here stays
        // valid until this fault is done, and the zapper of invalidated
        // roots never races with an install into one. The vCPU must reload
        // its root first.
        sync::sched_point();
        if !root.root.is_valid() && !sync::bug(sync::Bug::InstallIntoInvalidRoot) {
            MmuStats::inc(&self.stats.local().pf_retry);
            return Ok(FaultOutcome::Retry);
        }
        let g = self.config.geometry;
        let mut it = SpteIter::new(&self.arena, g, root.root.pfn, level, gfn.raw());
        while it.level() > level {
            let spte = it.old_spte();
            if spte.is_frozen() {
                MmuStats::inc(&self.stats.local().pf_retry);
                return Ok(FaultOutcome::Retry);
            }
            if spte.is_mmu_present() && spte.is_leaf(it.level()) {
                // A huge leaf above the level we need: replace it by an
                // empty table (its 4K translations fault back in).
                if !it.try_set(Spte(FROZEN_SPTE)) {
                    MmuStats::inc(&self.stats.local().pf_retry);
                    return Ok(FaultOutcome::Retry);
                }
                self.stats.account_leaf(it.level(), -1);
                MmuStats::inc(&self.stats.local().huge_pages_split);
                tracing::trace!(target: "kvm_mmu_split_huge_page", gfn = it.gfn(), level = it.level());
                self.flush_remote_tlbs();
                let table = self.alloc_table()?;
                it.sptep().store(self.fmt.make_nonleaf(table).0, Ordering::Release);
                it.refresh();
            } else if !spte.is_mmu_present() {
                let table = self.alloc_table()?;
                if !it.try_set(self.fmt.make_nonleaf(table)) {
                    // Another fault linked a table first; ours was never
                    // visible, so it can be freed at once.
                    self.free_table_now(table);
                    if it.old_spte().is_frozen() {
                        return Ok(FaultOutcome::Retry);
                    }
                    continue;
                }
            }
            if !it.step_down() {
                // Zapped under us between the link and the step.
                MmuStats::inc(&self.stats.local().pf_retry);
                return Ok(FaultOutcome::Retry);
            }
        }
        let old = it.old_spte();
        if old.is_frozen() {
            MmuStats::inc(&self.stats.local().pf_retry);
            return Ok(FaultOutcome::Retry);
        }
        // The same translation, whatever hardware did to A/D since.
        if (old.0 | self.ad_bits()) == (leaf.0 | self.ad_bits()) {
            MmuStats::inc(&self.stats.local().pf_spurious);
            return Ok(FaultOutcome::Spurious);
        }
        let replaced_table = old.is_mmu_present() && !old.is_leaf(level);
        if replaced_table {
            // A table where a huge leaf now fits (e.g. after THP collapse):
            // freeze the entry, then free the subtree after a grace period.
            if !it.try_set(Spte(FROZEN_SPTE)) {
                return Ok(FaultOutcome::Retry);
            }
            self.zap_subtree_leaves(old.pfn(), level - 1);
            self.flush_remote_tlbs();
            self.stats.account_tables(-1);
            defer_free_tree(&self.arena, self.config.geometry, old.pfn(), level - 1);
            it.sptep().store(leaf.0, Ordering::Release);
        } else if !it.try_set(leaf) {
            MmuStats::inc(&self.stats.local().pf_retry);
            return Ok(FaultOutcome::Retry);
        }
        if old.is_mmu_present() && !replaced_table {
            self.stats.account_leaf(level, -1);
            self.flush_remote_tlbs();
        }
        if leaf.is_mmu_present() {
            self.stats.account_leaf(level, 1);
            leaf.check_leaf_writable_invariants(self.fmt);
            tracing::trace!(target: "kvm_mmu_set_spte", gfn = gfn.raw(), level, spte = leaf.0, old = old.0);
        }
        MmuStats::inc(&self.stats.local().pf_fixed);
        Ok(FaultOutcome::Fixed)
    }

    fn ad_bits(&self) -> u64 {
        self.fmt.accessed_mask() | self.fmt.dirty_mask()
    }

    fn alloc_table(&self) -> Result<Pfn, TdpError> {
        let pfn = self.arena.alloc_4k()?;
        self.stats.account_tables(1);
        Ok(pfn)
    }

    fn free_table_now(&self, pfn: Pfn) {
        self.stats.account_tables(-1);
        self.arena
            .free(pfn, PageSize::Size4K)
            .expect("a table this fault allocated and never published is live");
    }

    /// Zaps a subtree being dropped: counts its leaves, and unlinks, counts
    /// and frees (after a grace period) every table below `table`; the
    /// caller frees `table` itself.
    fn zap_subtree_leaves(&self, table: Pfn, level: u8) {
        for slot in self
            .arena
            .table(table)
            .iter()
            .take(self.config.geometry.entries() as usize)
        {
            let spte = Spte(slot.swap(0, Ordering::AcqRel));
            if !spte.is_mmu_present() {
                continue;
            }
            if spte.is_leaf(level) {
                self.stats.account_leaf(level, -1);
                MmuStats::inc(&self.stats.local().mmu_zapped);
            } else {
                self.zap_subtree_leaves(spte.pfn(), level - 1);
                self.stats.account_tables(-1);
                defer_free_tree(&self.arena, self.config.geometry, spte.pfn(), level - 1);
            }
        }
    }

    /// Zaps every leaf SPTE mapping a gfn in `start..end` of address space
    /// `as_id`, in every root (KVM's `kvm_tdp_mmu_zap_leafs` under the write
    /// lock). The caller owes the returned TLB flush before it releases the
    /// lock.
    pub fn zap_gfn_range(&self, _guard: &impl MmuWriteLockHeld, as_id: u16, start: Gfn, end: Gfn) -> PendingFlush {
        let roots: Vec<Arc<TdpRoot>> = self.roots.lock().all().filter(|r| r.as_id == as_id).cloned().collect();
        let mut zapped = false;
        for root in roots {
            let mut it = SpteIter::new(&self.arena, self.config.geometry, root.pfn, 1, start.raw());
            while it.valid() && it.gfn() < end.raw() {
                let spte = it.old_spte();
                let level = it.level();
                let covered = it.gfn() >= start.raw() && it.gfn() + self.config.geometry.pages(level) <= end.raw();
                if spte.is_mmu_present() && spte.is_leaf(level) {
                    // A huge leaf only partly in the range is zapped whole.
                    let old = Spte(it.sptep().swap(0, Ordering::AcqRel));
                    tracing::trace!(target: "kvm_tdp_mmu_spte_changed", as_id, gfn = it.gfn(), level, old = old.0, new = 0u64);
                    if old.is_mmu_present() {
                        self.log_dirty_leaf(as_id, it.gfn(), level, old);
                        self.stats.account_leaf(level, -1);
                        MmuStats::inc(&self.stats.local().mmu_zapped);
                        zapped = true;
                    }
                    it.refresh();
                    it.skip_subtree();
                    continue;
                }
                if spte.is_mmio(self.fmt) && covered {
                    it.sptep().store(0, Ordering::Release);
                }
                it.next();
            }
        }
        PendingFlush::new(zapped)
    }

    /// Zaps every MMIO SPTE of every root (a memslot was created, which may
    /// turn "no memslot" into memory).
    pub fn zap_mmio(&self, _guard: &impl MmuWriteLockHeld) {
        let roots: Vec<Arc<TdpRoot>> = self.roots.lock().all().cloned().collect();
        for root in roots {
            let mut it = SpteIter::new(&self.arena, self.config.geometry, root.pfn, 1, 0);
            while it.valid() {
                if it.old_spte().is_mmio(self.fmt) {
                    it.sptep().store(0, Ordering::Release);
                }
                it.next();
            }
        }
    }

    /// NX huge page recovery (KVM's `kvm_recover_nx_huge_pages`, run
    /// periodically by a worker): zaps a `1/ratio` share (at least one) of
    /// the regions split by instruction fetches, oldest first, so they fault
    /// back in as huge, non-executable pages. Returns the regions zapped.
    pub fn recover_nx_huge_pages(&self, ratio: u32) -> usize {
        let guard = self.lock.write();
        let batch: Vec<(u16, Gfn, u8)> = {
            let mut split = self.nx_split.lock();
            let n = split.queue.len().div_ceil(ratio.max(1) as usize);
            let batch: Vec<_> = split.queue.drain(..n).collect();
            for region in &batch {
                split.members.remove(region);
            }
            batch
        };
        let mut owed = PendingFlush::none();
        for &(as_id, gfn, level) in &batch {
            let pages = self.config.geometry.pages(level);
            owed = owed.merge(self.zap_gfn_range(&guard, as_id, gfn, gfn.add(pages)));
        }
        self.discharge(owed);
        batch.len()
    }

    /// Whether dirty logging reads EPT Dirty bits.
    fn dirty_bit_logging(&self) -> bool {
        self.config.dirty_log == DirtyLogMode::DirtyBit && self.config.ad
    }

    /// The roots of `as_id`, valid or invalidated (the list's snapshot).
    fn roots_of(&self, as_id: u16) -> Vec<Arc<TdpRoot>> {
        self.roots.lock().all().filter(|r| r.as_id == as_id).cloned().collect()
    }

    /// Takes `mmu_lock` for write.
    pub fn write_lock(&self) -> crate::mem::MmuLockWriteGuard<'_, ()> {
        self.lock.write()
    }

    fn on_invalidate_start(&self, range: &NotifierRange) {
        let guard = self.lock.write();
        self.invalidate.begin(&guard);
        self.invalidate.range_add(&guard, range.range);
        for as_id in 0..2u16 {
            let slots = self.slots.load(as_id);
            let spans: Vec<(Gfn, Gfn)> = slots
                .overlapping_hva(range.range)
                .filter_map(|s| s.hva_range_to_gfns(range.range))
                .map(|r| (r.start, r.end))
                .collect();
            drop(slots);
            for (start, end) in spans {
                let flush = self.zap_gfn_range(&guard, as_id, start, end);
                // Before the lock is released, so no vCPU keeps a
                // translation to a frame the host is about to free.
                self.discharge(flush);
            }
        }
    }

    fn on_invalidate_end(&self) {
        let guard = self.lock.write();
        self.invalidate.end(&guard);
    }
}

/// The MMU's subscription to host mapping changes.
struct Notifier(std::sync::Weak<TdpMmu>);

impl MmuNotifier for Notifier {
    fn invalidate_range_start(&self, range: &NotifierRange) {
        if let Some(mmu) = self.0.upgrade() {
            mmu.on_invalidate_start(range);
        }
    }
    fn invalidate_range_end(&self, _range: &NotifierRange) {
        if let Some(mmu) = self.0.upgrade() {
            mmu.on_invalidate_end();
        }
    }
    fn clear_flush_young(&self, range: HvaRange) -> bool {
        self.0.upgrade().is_some_and(|mmu| mmu.age_hva_range(range, true))
    }
    fn clear_young(&self, range: HvaRange) -> bool {
        self.0.upgrade().is_some_and(|mmu| mmu.age_hva_range(range, false))
    }
    fn test_young(&self, range: HvaRange) -> bool {
        self.0.upgrade().is_some_and(|mmu| mmu.test_age_hva_range(range))
    }
}

/// Frees a page-table tree after an epoch grace period: the hardware model
/// pins an epoch while it walks, so no walker can still be inside it.
fn defer_free_tree(arena: &Arc<FrameArena>, geometry: Geometry, table: Pfn, level: u8) {
    let arena = arena.clone();
    let guard = crossbeam_epoch::pin();
    guard.defer(move || free_tree(&arena, geometry, table, level));
    guard.flush();
}

fn free_tree(arena: &FrameArena, geometry: Geometry, table: Pfn, level: u8) {
    if level > 1 {
        for slot in arena.table(table).iter().take(geometry.entries() as usize) {
            let spte = Spte(slot.load(Ordering::Acquire));
            if spte.is_mmu_present() && !spte.is_leaf(level) {
                free_tree(arena, geometry, spte.pfn(), level - 1);
            }
        }
    }
    // A double free would be an MMU bug; the arena reports it and nothing is freed.
    let _ = arena.free(table, PageSize::Size4K);
}
