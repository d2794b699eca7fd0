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
mod change;
mod dirty;
mod fast;
mod nx;
mod prefault;
mod ring;

pub use audit::AuditViolation;
pub use dirty::HugeRecovery;
pub use nx::{NX_HUGE_PAGES_RECOVERY_RATIO, NxRecoveryWorker};
pub use prefault::{PreFaultStop, PreFaulted};
pub use ring::{DIRTY_RING_MAX_ENTRIES, DirtyRingError};

use change::DirtyBit;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

use super::cache::{MmuCaches, MmuMemoryCache};
use super::flush::{PendingFlush, RemoteTlb};
use super::iter::{Geometry, SpteIter};
use super::spte::{Spte, SpteAccess, SpteFormat};
use super::stats::MmuStats;
use crate::addr::{Gfn, Gpa, Level, PageSize, Pfn};
use crate::arch::control::Vendor;
use crate::host::{FrameArena, FrameError, HostAddressSpace, HvaRange, MmuNotifier, NotifierRange};
use crate::mem::{DirtyRing, FaultinError, InvalidateState, MemslotTable, faultin_gfn};
use crate::sync;
use crate::sync::{MmuLock, MmuLockHeld, MmuLockReadGuard, MmuWriteLockHeld};

/// Configuration of a TDP MMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdpConfig {
    /// Whose tables: Intel EPT, or AMD NPT (the x86-64 entry format, as
    /// KVM's TDP MMU builds them on AMD hosts).
    pub vendor: Vendor,
    /// Tree shape (4-level by default).
    pub geometry: Geometry,
    /// Whether the EPTP enables accessed/dirty flags. NPT always has them:
    /// on AMD this must be true (a vCPU refuses the MMU otherwise).
    pub ad: bool,
    /// The largest leaf the MMU installs (1 = 4K only, 2 = 2M, 3 = 1G).
    pub max_level: u8,
    /// The NX huge page mitigation (KVM's `nx_huge_pages`): huge SPTEs are
    /// not executable; an instruction fetch maps the page at 4K.
    pub nx_huge_pages: bool,
    /// KVM's `nx_huge_pages_recovery_ratio`: each run of the recovery
    /// worker zaps 1/ratio of the regions split by instruction fetches, so
    /// they fault back in huge; 0 turns the worker off.
    pub nx_recovery_ratio: u32,
    /// KVM's `nx_huge_pages_recovery_period_ms`: how often the worker runs;
    /// 0 means an hour divided by the ratio (every 60 s at ratio 60).
    pub nx_recovery_period_ms: u32,
    /// How dirty logging finds written pages.
    pub dirty_log: DirtyLogMode,
    /// Eager page splitting (KVM's `eager_page_split`): huge SPTEs are
    /// split when logging starts, or with manual protect and an
    /// initially-set bitmap when their pages' bits are cleared, instead
    /// of on the first write to each.
    pub eager_page_split: bool,
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
            vendor: Vendor::Intel,
            geometry: Geometry::X86_4LEVEL,
            ad: true,
            max_level: 3,
            nx_huge_pages: false,
            nx_recovery_ratio: NX_HUGE_PAGES_RECOVERY_RATIO,
            nx_recovery_period_ms: 0,
            dirty_log: DirtyLogMode::WriteProtect,
            eager_page_split: true,
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
        let top = Level::from_known(geometry.levels);
        let tables = count_tables(arena, geometry, root.pfn, top);
        stats.account_tables(-(tables as i64));
        defer_free_tree(&crossbeam_epoch::pin(), arena, geometry, root.pfn, top);
    }
}

/// The tables of a tree (the root included).
fn count_tables(arena: &FrameArena, geometry: Geometry, table: Pfn, level: Level) -> u64 {
    let mut n = 1;
    if let Some(below) = level.down() {
        for slot in arena.table(table).iter().take(geometry.entries() as usize) {
            let spte = Spte::from_raw(slot.load(Ordering::Acquire));
            if spte.is_mmu_present() && !spte.is_leaf(level) {
                n += count_tables(arena, geometry, spte.pfn(), below);
            }
        }
    }
    n
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
    /// A write to a gfn the nested MMU tracks (one of an L1 hypervisor's
    /// nested tables): not mapped; the write is emulated through the
    /// tracker ([`TdpMmu::write_tracker`]).
    WriteTracked,
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
    /// The tree's geometry cannot be walked by a vCPU (EPT and NPT are 4
    /// or 5 levels of 512-entry tables).
    #[error("a vCPU needs 4- or 5-level EPT/NPT with 512-entry tables, not {geometry:?}")]
    NotEptGeometry {
        /// The configured geometry.
        geometry: Geometry,
    },
    /// AMD NPT has no switch for accessed and dirty flags: `ad` must be on.
    #[error("AMD NPT always has accessed and dirty flags: `ad` cannot be off on AMD")]
    NptWithoutAd,
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
    nx_split: Mutex<nx::NxSplit>,
    /// The per-vCPU dirty ring size, once enabled (`KVM_CAP_DIRTY_LOG_RING`).
    dirty_ring: std::sync::OnceLock<u32>,
    /// Tables for eager splitting, which runs under the write lock and
    /// gives it up to refill this (KVM allocates its split tables with
    /// `mmu_lock` dropped).
    split_cache: Mutex<MmuMemoryCache>,
    /// The NX recovery worker, when the mitigation and recovery are on.
    nx_worker: Mutex<Option<NxRecoveryWorker>>,
    /// The nested MMU's gfn write tracking, when the VM has one.
    tracker: std::sync::OnceLock<Arc<dyn crate::mmu::track::WriteTracker>>,
    /// How the fault path reads the tracker's "anything tracked?" (seed
    /// 002): 0 lockless, 1 under the write lock; bit 1: count the gate's
    /// false negatives too.
    indirect_gate: std::sync::atomic::AtomicU8,
    /// Seed 003: whether vCPUs drop a valid root too on the request
    /// ([`crate::mmu::ZapRequest::ReloadAll`]).
    reload_all: AtomicBool,
    /// Seed 003: how [`TdpMmu::zap_all_fast`] orders invalidation and
    /// request ([`ZapAllFastOrder`], as its index).
    zap_order: std::sync::atomic::AtomicU8,
    /// Seed 004: how huge pages come back after dirty logging
    /// ([`HugeRecovery`], as its index).
    huge_recovery: std::sync::atomic::AtomicU8,
    stats: Arc<MmuStats>,
}

/// How [`TdpMmu::zap_all_fast`] orders invalidating the roots and asking
/// the vCPUs to drop them: seed 003's comment ("there cannot be any yield
/// between kvm_tdp_mmu_invalidate_all_roots and the free request"), a
/// runtime policy of the TDP MMU ([`TdpMmu::set_zap_all_fast_order`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ZapAllFastOrder {
    /// Both in one critical section under `mmu_lock` held for write (KVM).
    #[default]
    OneCriticalSection,
    /// The roots invalidated, `mmu_lock` dropped for a yield
    /// ([`ZAP_YIELD`]), then the request. Safe here: a reference is only
    /// taken to a root seen valid under the root list's lock, and a fault
    /// checks its root under `mmu_lock`, so nobody gets into an invalid
    /// root in the window; a vCPU faulting there retries until the
    /// request comes.
    InvalidateYieldRequest,
    /// Unsafe: the request, `mmu_lock` dropped for a yield, then the roots
    /// invalidated (the invalidation moved below a yielding
    /// `kvm_zap_obsolete_pages`, which KVM's comment forbids): a vCPU that
    /// answers the request in the window keeps its root, still valid, or
    /// takes a new reference to it, and nothing asks it again once the
    /// root is invalid. Its faults retry forever; the hardware model counts
    /// its walks of the root it was told to drop.
    RequestYieldInvalidate,
}

/// How long [`TdpMmu::zap_all_fast`] leaves `mmu_lock` dropped between
/// invalidation and request under the yielding [`ZapAllFastOrder`]s: a
/// reschedule while KVM's `kvm_zap_obsolete_pages` yields.
pub const ZAP_YIELD: std::time::Duration = std::time::Duration::from_millis(1);

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
            fmt: match config.vendor {
                Vendor::Intel => SpteFormat::Ept { ad: config.ad },
                Vendor::Amd => SpteFormat::Legacy,
            },
            lock: MmuLock::new(()),
            invalidate: InvalidateState::default(),
            roots: Mutex::new(RootList::default()),
            root_generation: AtomicU64::new(0),
            remote_tlb: RemoteTlb::default(),
            nx_split: Mutex::new(nx::NxSplit::default()),
            dirty_ring: std::sync::OnceLock::new(),
            split_cache: Mutex::new(MmuMemoryCache::new(host.arena().clone())),
            nx_worker: Mutex::new(None),
            tracker: std::sync::OnceLock::new(),
            indirect_gate: std::sync::atomic::AtomicU8::new(0),
            reload_all: AtomicBool::new(false),
            zap_order: std::sync::atomic::AtomicU8::new(0),
            huge_recovery: std::sync::atomic::AtomicU8::new(0),
            stats: Arc::new(MmuStats::default()),
        });
        host.register_notifier(Arc::new(Notifier(Arc::downgrade(&mmu))));
        mmu.slots
            .register_observer(Arc::new(dirty::SlotObserver(Arc::downgrade(&mmu))));
        if config.nx_huge_pages && config.nx_recovery_ratio > 0 {
            *mmu.nx_worker.lock() = Some(NxRecoveryWorker::start(&mmu));
        }
        mmu
    }

    /// Caches for a vCPU of this MMU ([`TdpMmu::page_fault`] takes them).
    pub fn vcpu_caches(&self) -> MmuCaches {
        MmuCaches::new(self.arena.clone())
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
    // The vCPU's fast path reads it before every TLB hit.
    #[inline]
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
    // The vCPU's fast path checks it before every TLB hit.
    #[inline]
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
    ///
    /// The order of invalidation and request is seed 003's policy
    /// ([`TdpMmu::set_zap_all_fast_order`]); the default is the one above.
    pub fn zap_all_fast(&self) {
        let order = self.zap_all_fast_order();
        let mut guard = self.lock.write();
        // Model tests: `get_root` does not take `mmu_lock` and may run here.
        sync::sched_point();
        match order {
            ZapAllFastOrder::OneCriticalSection => {
                // The request to vCPUs in the same critical section (seed
                // 003_*): no yield between invalidating and asking vCPUs
                // to drop.
                self.invalidate_all_roots(&guard, self.root_generation() + 1);
                self.root_generation.fetch_add(1, Ordering::AcqRel);
            }
            ZapAllFastOrder::InvalidateYieldRequest => {
                self.invalidate_all_roots(&guard, self.root_generation() + 1);
                drop(guard);
                std::thread::sleep(ZAP_YIELD);
                guard = self.lock.write();
                self.root_generation.fetch_add(1, Ordering::AcqRel);
            }
            ZapAllFastOrder::RequestYieldInvalidate => {
                let announced = self.root_generation.fetch_add(1, Ordering::AcqRel) + 1;
                drop(guard);
                std::thread::sleep(ZAP_YIELD);
                guard = self.lock.write();
                // Invalidated "for" the request already made: a vCPU that
                // answered it in the window has acknowledged these roots'
                // invalidation without seeing it.
                self.invalidate_all_roots(&guard, announced);
            }
        }
        sync::sched_point();
        // vCPUs still running on the old roots must not keep translations.
        self.flush_remote_tlbs();
        drop(guard);
    }

    /// Marks every valid root invalid and queues it for
    /// [`TdpMmu::zap_invalidated_roots`] with its list reference (KVM's
    /// `kvm_tdp_mmu_invalidate_all_roots`); `announced` is the root
    /// generation of the request that asks vCPUs to drop them.
    fn invalidate_all_roots(&self, _guard: &impl MmuWriteLockHeld, announced: u64) {
        let mut roots = self.roots.lock();
        let valid = std::mem::take(&mut roots.valid);
        for r in &valid {
            r.invalidated_at.store(announced, Ordering::Release);
            r.valid.store(false, Ordering::Release);
        }
        roots.invalidated.extend(valid);
    }

    /// Seed 003's policies: what vCPUs drop on the request after a zap,
    /// and how [`TdpMmu::zap_all_fast`] orders invalidation and request.
    pub fn set_zap_request(&self, request: crate::mmu::ZapRequest, order: ZapAllFastOrder) {
        self.reload_all
            .store(request == crate::mmu::ZapRequest::ReloadAll, Ordering::Relaxed);
        self.zap_order.store(order as u8, Ordering::Relaxed);
    }

    /// What vCPUs drop on the request after a zap (seed 003).
    pub fn zap_request(&self) -> crate::mmu::ZapRequest {
        if self.reload_all.load(Ordering::Relaxed) {
            crate::mmu::ZapRequest::ReloadAll
        } else {
            crate::mmu::ZapRequest::FreeObsolete
        }
    }

    /// How [`TdpMmu::zap_all_fast`] orders invalidation and request (seed
    /// 003).
    pub fn zap_all_fast_order(&self) -> ZapAllFastOrder {
        match self.zap_order.load(Ordering::Relaxed) {
            0 => ZapAllFastOrder::OneCriticalSection,
            1 => ZapAllFastOrder::InvalidateYieldRequest,
            _ => ZapAllFastOrder::RequestYieldInvalidate,
        }
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
    fn zap_root_leaves(&self, guard: &MmuLockReadGuard<'_, ()>, root: &TdpRoot) -> u64 {
        debug_assert!(
            !root.is_valid(),
            "only an invalidated root is zapped under the read lock"
        );
        let mut zapped = 0;
        let epoch = crossbeam_epoch::pin();
        let mut it = self.cursor(&epoch, root.pfn, Level::L1, Gfn::new(0));
        while it.valid() {
            let spte = it.old_spte();
            let level = it.level();
            if spte.is_mmu_present() && spte.is_leaf(level) {
                if self.zap_spte(guard, &mut it, root.as_id).is_mmu_present() {
                    zapped += 1;
                }
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
    /// `caches` are the faulting vCPU's: its memslot cache, and the frames
    /// the install may link, topped up here before `mmu_lock` is taken (an
    /// allocation failure is [`TdpError::OutOfFrames`], with nothing
    /// changed; the access can be retried once memory returns).
    ///
    /// `ring` is the faulting vCPU's dirty ring when the dirty ring is
    /// enabled ([`TdpMmu::enable_dirty_ring`]): pages it dirties go there
    /// instead of the memslot's bitmap.
    pub fn page_fault(
        &self,
        root: &RootRef,
        fault: TdpFault,
        caches: &mut MmuCaches,
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
        let Some(slot) = slots.lookup_cached(gfn, &mut caches.slots) else {
            let generation = slots.generation();
            drop(slots);
            return self.mmio_fault(root, gfn, generation, &mut caches.pages);
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
        // Every table the install may link, set aside before the lock
        // (KVM's `mmu_topup_memory_caches`): nothing allocates under it.
        caches.pages.topup(self.tables_per_fault())?;
        let mapping = match faultin_gfn(&self.host, &self.invalidate, slot, gfn, fault.write) {
            Ok(m) => m,
            Err(source) => return Err(TdpError::Host { gpa: fault.gpa, source }),
        };
        let gate = self.indirect_gate.load(std::sync::atomic::Ordering::Relaxed);
        // Seed 002's old gate: the count read under the write lock, taken
        // and dropped around the read (a fault holds no lock here yet).
        let counted = (gate & 1 != 0).then(|| self.tracker.get()).flatten().map(|t| {
            let _w = self.lock.write();
            t.any_tracked()
        });
        let guard = self.lock.read();
        let Ok(valid) = mapping.validate(&guard, &self.invalidate) else {
            MmuStats::inc(&self.stats.local().pf_retry);
            return Ok(FaultOutcome::Retry);
        };
        // A gfn the nested MMU shadows as a table: never writable here.
        // Asked under the lock: the nested MMU marks a gfn tracked before
        // it zaps the gfn's mappings under the write lock, so a fault that
        // saw it untracked installs before that zap, which removes it. The
        // gate (seed 002) is a lockless read of the nested MMU's count of
        // indirect shadow pages, unless the policy says otherwise.
        let tracker = self
            .tracker
            .get()
            .filter(|t| counted.unwrap_or_else(|| t.any_tracked()) && !sync::bug(sync::Bug::UntrackedNestedTables));
        if gate & 2 != 0 && tracker.is_none() && self.tracker.get().is_some_and(|t| t.is_tracked(gfn, gfn.add(1))) {
            MmuStats::inc(&self.stats.local().indirect_heuristic_misses);
        }
        let tracked = tracker.is_some_and(|t| t.is_tracked(gfn, gfn.add(1)));
        // Unless its shadow pages went unsync for L1's writes (KVM's
        // `mmu_try_to_unsync_pages` in `make_spte`): then writable, until a
        // sync takes it back (out of the set, then a zap under the write
        // lock, which waits for this fault's read lock).
        let write_protected = tracked && !tracker.is_some_and(|t| t.write_allowed(gfn));
        if tracker.is_some() {
            MmuStats::inc(&self.stats.local().indirect_heuristic_hits);
            if tracked {
                MmuStats::inc(&self.stats.local().indirect_tracked_gfns);
            }
        }
        if write_protected && fault.write {
            return Ok(FaultOutcome::WriteTracked);
        }
        let (level, leaf) = self.fault_leaf(root.root.as_id, gfn, slot, &valid, &fault, tracker, write_protected)?;
        let outcome = self.install(
            &guard,
            root,
            gfn.align_down(level.pages()),
            level,
            leaf,
            &mut caches.pages,
        );
        // A leaf that lets hardware write without recording it: logged
        // now, still under the read lock, so no harvest runs between the
        // install and the mark (KVM's `make_spte`). A clean writable leaf
        // in D-bit mode records its first write in its D bit.
        if logging
            && leaf.is_writable(self.fmt)
            && (leaf.is_dirty(self.fmt) || !self.dirty_bit_logging())
            && outcome == FaultOutcome::Fixed
        {
            self.mark_dirty(slot, gfn, ring);
        }
        Ok(outcome)
    }

    /// The level and the leaf SPTE a fault maps `gfn` of `slot` with, from
    /// its validated host mapping (KVM's hugepage adjust and `make_spte`):
    /// as large as the host mapping, the memslot and the configuration
    /// allow; 4K while the slot logs dirty pages, over a gfn the nested MMU
    /// tracks, and for an instruction fetch (or in a region split by one)
    /// under the NX huge page mitigation; write-protected where `tracker`
    /// says so; made to log its first write while the slot logs dirty
    /// pages and the fault is not a write.
    #[allow(clippy::too_many_arguments)]
    fn fault_leaf(
        &self,
        as_id: u16,
        gfn: Gfn,
        slot: &crate::mem::Memslot,
        valid: &crate::mem::ValidatedMapping<'_>,
        fault: &TdpFault,
        tracker: Option<&Arc<dyn crate::mmu::track::WriteTracker>>,
        write_protected: bool,
    ) -> Result<(Level, Spte), TdpError> {
        let logging = slot.logs_dirty_pages();
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
        // The memslot's lpage_info is asked only about levels the host
        // mapping reaches (a 4K host page asks nothing).
        let mut level = valid.mapping_level(slot.max_mapping_level(gfn, max.min(valid.host_level())));
        // No huge leaf over a tracked gfn (KVM's `kvm_mmu_gfn_disallow_lpage`).
        while level > Level::L1
            && let Some(t) = tracker
            && t.is_tracked(
                gfn.align_down(level.pages()),
                gfn.align_down(level.pages()).add(level.pages()),
            )
        {
            level = level.down().expect("above level 1");
        }
        if self.config.nx_huge_pages && level > Level::L1 {
            let region = (as_id, gfn.align_down(level.pages()), level);
            let mut split = self.nx_split.lock();
            if fault.exec {
                // Executable pages are mapped 4K: remember the huge region
                // so the recovery worker can make it huge again later.
                if split.track(region) {
                    self.stats.account_nx_lpage_splits(1);
                }
                level = Level::L1;
            } else if split.contains(&region) {
                // KVM's disallowed_hugepage_adjust: the region stays 4K
                // until recovery, or every data access would undo the split.
                level = Level::L1;
            }
        }
        let pfn = valid.pfn_at(level);
        let access = SpteAccess {
            read: true,
            write: !slot.is_readonly(),
            exec: true,
            user: true,
        };
        let mut leaf = self.make_leaf(level, pfn, access, valid.writable());
        if write_protected {
            // Read-only, and not MMU-writable: the fast path must not make
            // it writable either.
            leaf = leaf.write_protect(self.fmt);
        }
        if logging && !fault.write {
            leaf = if self.dirty_bit_logging() {
                // Writable and clean: the hardware's D bit logs the write.
                leaf.clear_dirty(self.fmt)
            } else {
                // Writable only on the first write, which logs the page.
                leaf.clear_writable(self.fmt)
            };
        }
        Ok((level, leaf))
    }

    /// Tables one fault may need: one per level below the root (a path
    /// built from nothing, or huge leaves split down to 4K).
    fn tables_per_fault(&self) -> usize {
        usize::from(self.config.geometry.levels) - 1
    }

    /// A leaf SPTE of this MMU (KVM's `make_spte`): at a huge level under
    /// the NX huge page mitigation, never executable.
    pub(super) fn make_leaf(&self, level: Level, pfn: Pfn, access: SpteAccess, host_writable: bool) -> Spte {
        let exec = access.exec && !(level > Level::L1 && self.config.nx_huge_pages);
        self.fmt
            .make_leaf(level, pfn, SpteAccess { exec, ..access }, host_writable, true, false)
    }

    fn mmio_fault(
        &self,
        root: &RootRef,
        gfn: Gfn,
        generation: u64,
        tables: &mut MmuMemoryCache,
    ) -> Result<FaultOutcome, TdpError> {
        MmuStats::inc(&self.stats.local().pf_emulate);
        if generation & crate::mem::memslot::MEMSLOT_GEN_UPDATE_IN_PROGRESS != 0 {
            // Never cache "no memslot" while memslots are changing.
            return Ok(FaultOutcome::Mmio);
        }
        tables.topup(self.tables_per_fault())?;
        let guard = self.lock.read();
        let mmio = self.fmt.make_mmio(gfn.raw(), generation);
        match self.install(&guard, root, gfn, Level::L1, mmio, tables) {
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
    /// and splitting in place a huge leaf that is in the way, then sets the
    /// leaf. Tables come from `tables`, topped up before the lock.
    fn install(
        &self,
        guard: &MmuLockReadGuard<'_, ()>,
        root: &RootRef,
        gfn: Gfn,
        level: Level,
        leaf: Spte,
        tables: &mut MmuMemoryCache,
    ) -> FaultOutcome {
        // Checked under the lock (KVM's `is_page_fault_stale`): roots are
        // invalidated only under the write lock, so a root valid here stays
        // valid until this fault is done, and the zapper of invalidated
        // roots never races with an install into one. The vCPU must reload
        // its root first.
        sync::sched_point();
        if !root.root.is_valid() && !sync::bug(sync::Bug::InstallIntoInvalidRoot) {
            MmuStats::inc(&self.stats.local().pf_retry);
            return FaultOutcome::Retry;
        }
        let as_id = root.root.as_id;
        let epoch = crossbeam_epoch::pin();
        let mut it = self.cursor(&epoch, root.root.pfn, level, gfn);
        if let Err(outcome) = self.descend(guard, &mut it, as_id, level, tables) {
            return outcome;
        }
        self.set_leaf(&mut it, as_id, leaf)
    }

    /// Walks the cursor down to `level`, linking tables from `tables` where
    /// none is and splitting a huge leaf in the way; `Err` is the fault's
    /// answer when a race stops it.
    fn descend(
        &self,
        guard: &MmuLockReadGuard<'_, ()>,
        it: &mut SpteIter<'_>,
        as_id: u16,
        level: Level,
        tables: &mut MmuMemoryCache,
    ) -> Result<(), FaultOutcome> {
        // The level where this fault linked a table or split a leaf last.
        let mut changed_at = None;
        loop {
            // Through the tables that are there, in one go.
            if it.step_down_to(level) == level {
                return Ok(());
            }
            if changed_at == Some(it.level()) {
                // Zapped under us between the link (or split) and the step.
                MmuStats::inc(&self.stats.local().pf_retry);
                return Err(FaultOutcome::Retry);
            }
            let spte = it.old_spte();
            if spte.is_frozen() {
                MmuStats::inc(&self.stats.local().pf_retry);
                return Err(FaultOutcome::Retry);
            }
            if spte.is_mmu_present() && spte.is_leaf(it.level()) {
                // A huge leaf above the level we need: split it in place
                // (its other pages stay mapped).
                if !self.split_huge_spte(guard, it, as_id, tables) {
                    MmuStats::inc(&self.stats.local().pf_retry);
                    return Err(FaultOutcome::Retry);
                }
            } else {
                let table = self.take_table(tables);
                if !self.set_spte_atomic(it, as_id, self.fmt.make_nonleaf(table), DirtyBit::Log) {
                    // Another fault linked a table first; ours was never
                    // visible, so it goes back to the cache.
                    self.give_back_table(tables, table);
                    if it.old_spte().is_frozen() {
                        return Err(FaultOutcome::Retry);
                    }
                    continue;
                }
            }
            changed_at = Some(it.level());
        }
    }

    /// Sets the cursor's SPTE, at the level the leaf is for, to `leaf`
    /// (the end of KVM's `tdp_mmu_map_handle_target_level`).
    fn set_leaf(&self, it: &mut SpteIter<'_>, as_id: u16, leaf: Spte) -> FaultOutcome {
        let (gfn, level) = (it.gfn(), it.level());
        let old = it.old_spte();
        if old.is_frozen() {
            MmuStats::inc(&self.stats.local().pf_retry);
            return FaultOutcome::Retry;
        }
        // The same translation, whatever hardware did to A/D since.
        if old.same_but_ad(leaf, self.fmt) {
            MmuStats::inc(&self.stats.local().pf_spurious);
            return FaultOutcome::Spurious;
        }
        if !self.set_spte_atomic(it, as_id, leaf, DirtyBit::Log) {
            MmuStats::inc(&self.stats.local().pf_retry);
            return FaultOutcome::Retry;
        }
        if old.is_mmu_present() {
            // A leaf replaced (rights or frame changed), or a table where a
            // huge leaf now fits (e.g. after a THP collapse), whose subtree
            // the change handler tore down: no vCPU may keep a translation
            // made through the old entry.
            self.flush_remote_tlbs();
        }
        if leaf.is_mmu_present() {
            tracing::trace!(target: "kvm_mmu_set_spte", gfn = gfn.raw(), level = level.get(), spte = leaf.raw(), old = old.raw());
        }
        MmuStats::inc(&self.stats.local().pf_fixed);
        FaultOutcome::Fixed
    }

    /// A table for the tree, from a cache topped up before the lock.
    fn take_table(&self, tables: &mut MmuMemoryCache) -> Pfn {
        let pfn = tables
            .pop()
            .expect("the cache was topped up with a table for every level a fault or split may link");
        self.stats.account_tables(1);
        pfn
    }

    /// A table taken with [`TdpMmu::take_table`] that was never published.
    fn give_back_table(&self, tables: &mut MmuMemoryCache, pfn: Pfn) {
        self.stats.account_tables(-1);
        tables.give_back(pfn);
    }

    /// Splits the huge leaf at the cursor in place (KVM's
    /// `tdp_mmu_split_huge_page`): a table of leaves one level down, each
    /// inheriting the huge leaf's bits ([`Spte::split_child`]), replaces
    /// it with one compare-exchange, so no translation or right changes
    /// and no flush is owed. Under the NX huge page mitigation 4K children
    /// are executable (the mitigation concerns huge pages only). Returns
    /// false if the SPTE changed meanwhile (the cursor then holds the value
    /// found); on success the cursor holds the new table.
    pub(super) fn split_huge_spte(
        &self,
        _guard: &impl MmuLockHeld,
        it: &mut SpteIter<'_>,
        as_id: u16,
        tables: &mut MmuMemoryCache,
    ) -> bool {
        let level = it.level();
        let huge = it.old_spte();
        debug_assert!(huge.is_large(level));
        let table = self.take_table(tables);
        let g = self.config.geometry;
        for (i, slot) in self.arena.table(table).iter().take(g.entries() as usize).enumerate() {
            let mut child = huge.split_child(
                level,
                i as u64,
                g.pages(level.down().expect("a huge leaf is above level 1")),
            );
            if level == Level::L2 && self.config.nx_huge_pages {
                child = child.make_executable(self.fmt);
            }
            slot.store(child.raw(), Ordering::Relaxed);
        }
        if !self.set_spte_atomic(it, as_id, self.fmt.make_nonleaf(table), DirtyBit::Keep) {
            self.give_back_table(tables, table);
            return false;
        }
        self.stats
            .account_leaf(level.down().expect("a huge leaf is above level 1"), g.entries() as i64);
        MmuStats::inc(&self.stats.local().huge_pages_split);
        tracing::trace!(target: "kvm_mmu_split_huge_page", gfn = it.gfn().raw(), level = level.get());
        true
    }

    /// Zaps every leaf SPTE mapping a gfn in `start..end` of address space
    /// `as_id`, in every root (KVM's `kvm_tdp_mmu_zap_leafs` under the write
    /// lock), and the MMIO SPTEs the range covers. The caller owes the
    /// returned TLB flush before it releases the lock.
    pub fn zap_gfn_range(&self, guard: &impl MmuWriteLockHeld, as_id: u16, start: Gfn, end: Gfn) -> PendingFlush {
        let mut zapped = false;
        for root in self.roots_of(as_id) {
            let epoch = crossbeam_epoch::pin();
            let mut it = self.cursor(&epoch, root.pfn, Level::L1, start);
            while it.valid() && it.gfn() < end {
                let spte = it.old_spte();
                let level = it.level();
                let covered = it.gfn() >= start && it.gfn().add(self.config.geometry.pages(level)) <= end;
                if spte.is_mmu_present() && spte.is_leaf(level) {
                    // A huge leaf only partly in the range is zapped whole.
                    zapped |= self.zap_spte(guard, &mut it, as_id).is_mmu_present();
                    it.skip_subtree();
                    continue;
                }
                if spte.is_mmio(self.fmt) && covered {
                    self.zap_spte(guard, &mut it, as_id);
                }
                it.next();
            }
        }
        PendingFlush::new(zapped)
    }

    /// Zaps every MMIO SPTE of every root (a memslot was created, which may
    /// turn "no memslot" into memory).
    pub fn zap_mmio(&self, guard: &impl MmuWriteLockHeld) {
        let roots: Vec<Arc<TdpRoot>> = self.roots.lock().all().cloned().collect();
        for root in roots {
            let epoch = crossbeam_epoch::pin();
            let mut it = self.cursor(&epoch, root.pfn, Level::L1, Gfn::new(0));
            while it.valid() {
                if it.old_spte().is_mmio(self.fmt) {
                    self.zap_spte(guard, &mut it, root.as_id);
                }
                it.next();
            }
        }
    }

    /// The leaf mapping `gfn` of `as_id` in each root, with its level (for
    /// diagnostics: what a checker reports beside a violation).
    pub fn leaves_of(&self, as_id: u16, gfn: Gfn) -> Vec<(bool, Level, Spte)> {
        let epoch = crossbeam_epoch::pin();
        let mut out = Vec::new();
        for root in self.roots_of(as_id) {
            let mut it = self.cursor(&epoch, root.pfn(), Level::L1, gfn);
            while it.step_down() {}
            out.push((root.is_valid(), it.level(), it.old_spte()));
        }
        out
    }

    /// Whether dirty logging reads EPT Dirty bits.
    fn dirty_bit_logging(&self) -> bool {
        self.config.dirty_log == DirtyLogMode::DirtyBit && self.config.ad
    }

    /// The roots of `as_id`, valid or invalidated (the list's snapshot).
    fn roots_of(&self, as_id: u16) -> Vec<Arc<TdpRoot>> {
        self.roots.lock().all().filter(|r| r.as_id == as_id).cloned().collect()
    }

    /// A walk cursor over this MMU's tree at `root` (its frames, its
    /// geometry), from `gfn`, down to `min_level`, under `epoch` (KVM's
    /// `for_each_tdp_pte` start).
    #[inline]
    pub(super) fn cursor<'a>(
        &'a self,
        epoch: &'a crossbeam_epoch::Guard,
        root: Pfn,
        min_level: Level,
        gfn: Gfn,
    ) -> SpteIter<'a> {
        SpteIter::new(epoch, &self.arena, self.config.geometry, root, min_level, gfn)
    }

    /// How the fault path reads the nested MMU's count of indirect shadow
    /// pages (seed 002's policy; lockless by default), and whether it
    /// counts the gate's false negatives (`indirect_heuristic_misses`: a
    /// tracked-set lookup on every fault the gate lets through, for
    /// measuring only).
    pub fn set_indirect_gate(&self, gate: crate::mmu::track::IndirectGate, count_misses: bool) {
        let g = match gate {
            crate::mmu::track::IndirectGate::Lockless => 0,
            crate::mmu::track::IndirectGate::UnderMmuLock => 1,
        };
        self.indirect_gate
            .store(g | u8::from(count_misses) << 1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes the nested MMU's gfn write tracking this MMU's: tracked gfns
    /// are mapped read-only at 4K and their writes emulated through it
    /// ([`crate::mmu::track`]). Set once, when the VM gets a nested MMU.
    pub fn set_write_tracker(&self, tracker: Arc<dyn crate::mmu::track::WriteTracker>) {
        let _ = self.tracker.set(tracker);
    }

    /// The nested MMU's gfn write tracking, if the VM has one.
    pub fn write_tracker(&self) -> Option<&Arc<dyn crate::mmu::track::WriteTracker>> {
        self.tracker.get()
    }

    /// The guest's memory as the VMM accesses it.
    pub fn memory(&self) -> crate::mem::GuestMemory {
        crate::mem::GuestMemory::new(self.host.clone(), self.slots.clone())
    }

    /// A vCPU's write the VMM makes for it (an emulated access, KVM's
    /// `kvm_vcpu_write_guest`), logged as the vCPU's write: into its dirty
    /// `ring` when the ring is on. `false` when nothing writable is there
    /// (MMIO, a read-only memslot): the write is dropped.
    pub(crate) fn emulated_write(&self, gpa: Gpa, size: usize, value: u64, ring: Option<&DirtyRing>) -> bool {
        if self
            .memory()
            .write_unlogged(gpa, &value.to_le_bytes()[..size.min(8)])
            .is_err()
        {
            return false;
        }
        // The vCPU splits an access at page boundaries: one page.
        let gfn = gpa.frame();
        if let Some(slot) = self.slots.load(0).lookup(gfn) {
            self.mark_dirty(slot, gfn, ring);
        }
        true
    }

    /// Takes `mmu_lock` for write.
    pub fn write_lock(&self) -> crate::sync::MmuLockWriteGuard<'_, ()> {
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

/// Frees a page-table tree after the grace period of `epoch`: the
/// hardware model pins an epoch while it walks, so no walker can still be
/// inside it.
fn defer_free_tree(
    epoch: &crossbeam_epoch::Guard,
    arena: &Arc<FrameArena>,
    geometry: Geometry,
    table: Pfn,
    level: Level,
) {
    let arena = arena.clone();
    epoch.defer(move || free_tree(&arena, geometry, table, level));
    epoch.flush();
}

fn free_tree(arena: &FrameArena, geometry: Geometry, table: Pfn, level: Level) {
    if let Some(below) = level.down() {
        for slot in arena.table(table).iter().take(geometry.entries() as usize) {
            let spte = Spte::from_raw(slot.load(Ordering::Acquire));
            if spte.is_mmu_present() && !spte.is_leaf(level) {
                free_tree(arena, geometry, spte.pfn(), below);
            }
        }
    }
    // A double free would be an MMU bug; the arena reports it and nothing is freed.
    let _ = arena.free(table, PageSize::Size4K);
}

impl crate::mmu::track::WriteProtector for TdpMmu {
    /// Zaps every mapping of `gfn` in address space 0 under the write lock,
    /// and flushes: the next access faults and maps it read-only, at 4K.
    fn write_protect_gfn(&self, gfn: Gfn) {
        let guard = self.lock.write();
        let flush = self.zap_gfn_range(&guard, 0, gfn, gfn.add(1));
        self.discharge(flush);
    }
}
