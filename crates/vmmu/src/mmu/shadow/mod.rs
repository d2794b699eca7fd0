//! The shadow-paging MMU (KVM's shadow MMU, `mmu.c` and `paging_tmpl.h`):
//! shadow page tables built from the guest's own, write-protected guest
//! tables.
//!
//! - [`role`]: the key of the page hash, normalised in one place.
//! - [`access`]: the rights of a leaf SPTE, with the CR0.WP = 0 emulation.
//! - [`page`]: shadow pages, the page hash, parent pointers, rmaps, gfn
//!   write tracking.
//! - `change`: every write of an SPTE, and the one handler that keeps
//!   rmaps, parent pointers, unsync-children bits, counts and dirty logging
//!   in step with it.
//! - [`roots`]: a vCPU's roots for its guest context and CR3.
//! - this module: the MMU, its page fault, write emulation and zaps.
//!
//! The flow of a fault (KVM's `FNAME(page_fault)`): the hardware model's
//! walk of the shadow tables faults; the vCPU passes the access here; the
//! guest's tables are walked with the foundation walker (setting the
//! guest's A/D bits as hardware would; a guest #PF is injected with the
//! walker's error code); the host page is found with the MMU-notifier retry
//! protocol; then under the lock the guest entries used are re-read (a
//! change means retry), the shadow tree is descended from the root, finding
//! or creating one shadow page per guest table by (gfn, role) (creating an
//! indirect page write-protects its gfn), direct pages below a guest huge
//! page, and the 4K leaf is installed. A write to a write-tracked gfn is not
//! mapped but emulated ([`ShadowMmu::emulate_write`]): the guest memory is
//! written and the SPTEs shadowing the written guest entry are zapped, or
//! the whole page on a misaligned write or write flooding.
//!
//! - `sync`: unsync 4K pages and their sync on the guest's flushes.
//! - [`prefetch`]: neighbouring entries installed with a fault.
//! - `dirty`: dirty logging through the rmaps.
//! - [`audit`]: the self-check.
//!
//! Not built: MMIO SPTEs, huge SPTEs (every shadow leaf is 4K).

pub mod access;
pub mod audit;
mod change;
mod dirty;
pub mod page;
pub mod prefetch;
pub mod role;
pub mod roots;
pub mod sync;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use self::access::{Leaf, leaf_rights, spte_access};
use self::change::NewSpte;
use self::page::{ENTRIES, PageId, Pages, SptePtr, Translations};
use self::role::Role;
use self::roots::ShadowRoots;
use crate::addr::{Gfn, Gpa, Gva, Level};
use crate::arch::perm::{Access, AccessRights};
use crate::arch::pfec::PfErrorCode;
use crate::host::{FrameArena, FrameError, HostAddressSpace, MmuNotifier, NotifierRange};
use crate::mem::{
    FaultinError, GuestMemory, InvalidateState, Memslot, MemslotChange, MemslotObserver, MemslotTable, faultin_gfn,
};
use crate::mmu::cache::MmuMemoryCache;
use crate::mmu::flush::{PendingFlush, RemoteTlb};
use crate::mmu::spte::SpteFormat;
use crate::mmu::stats::MmuStats;
use crate::sync::MmuLock;
use crate::walker::{EntrySize, GuestPaging, PtMemory, Root, WalkError};

/// Why the shadow MMU could not handle a fault.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The host could not provide the page.
    #[error("host fault for {gpa}: {source}")]
    Host {
        /// The guest-physical address.
        gpa: Gpa,
        /// The host's answer.
        source: FaultinError,
    },
    /// No frame for a shadow page.
    #[error("out of frames for shadow pages: {0}")]
    OutOfFrames(#[from] FrameError),
}

/// What the vCPU does after a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowOutcome {
    /// An SPTE was installed: retry the access.
    Fixed,
    /// A race (guest entry changed, notifier invalidation, obsolete roots):
    /// retry.
    Retry,
    /// The guest's own walk faults: inject #PF with this error code.
    GuestPageFault(PfErrorCode),
    /// The address is not canonical: inject #GP(0).
    GuestGeneralProtection,
    /// No memslot at `gpa`: emulated MMIO.
    Mmio(Gpa),
    /// A write to a read-only memslot at `gpa`: exit to the VMM.
    ReadOnlySlot(Gpa),
    /// The write must be emulated ([`ShadowMmu::emulate_write`]): the
    /// target is a guest page table, or no SPTE can serve it safely.
    EmulateWrite(Gpa),
}

/// The guest memory as the MMU's walker reads it: a gpa with no memslot
/// reads as zero (like MMIO with nothing behind it) and A/D updates to it
/// are dropped.
pub(crate) struct WalkerMemory<'a>(pub(crate) &'a GuestMemory);

/// The guest memory as the MMU reads it under `mmu_lock`: never faulting a
/// page in (KVM's `kvm_vcpu_read_guest_atomic`), since a fault-in takes
/// the host's mm lock, which an MMU-notifier callback holds while it waits
/// for `mmu_lock`. A page that is not resident reads as zero: a not-present
/// guest entry, so the caller retries the fault, skips the prefetch or
/// drops the SPTE.
pub(super) struct LockedMemory<'a>(pub(super) &'a GuestMemory);

impl PtMemory for LockedMemory<'_> {
    type Error = std::convert::Infallible;
    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        let n = size.bytes() as usize;
        Ok(match self.0.read_atomic(gpa, &mut b[..n]) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        })
    }
    fn cmpxchg_entry(&self, _gpa: Gpa, _size: EntrySize, _old: u64, _new: u64) -> Result<Result<(), u64>, Self::Error> {
        // Only peeks run under the lock: nothing is written.
        Ok(Ok(()))
    }
}

impl PtMemory for WalkerMemory<'_> {
    type Error = std::convert::Infallible;
    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, Self::Error> {
        Ok(self.0.read_entry(gpa, size).unwrap_or(0))
    }
    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, Self::Error> {
        Ok(self.0.cmpxchg_entry(gpa, size, old, new).unwrap_or(Ok(())))
    }
}

/// Whether the guest's table holding `gpa` is in memory the guest may
/// write: else (a read-only memslot, no memslot) no walk can set the A/D
/// bits of its entries.
pub(crate) fn table_writable(slots: &crate::mem::Memslots, gpa: Gpa) -> bool {
    slots.lookup(gpa.frame()).is_some_and(|s| !s.is_readonly())
}

/// Leaf SPTEs one gfn may have before they are all dropped (KVM's
/// `RMAP_RECYCLE_THRESHOLD`).
pub const RMAP_RECYCLE_THRESHOLD: usize = 1000;

/// The smallest page limit (KVM's `KVM_MIN_ALLOC_MMU_PAGES`).
pub const MIN_MMU_PAGES: u64 = 64;
/// Pages kept free for one fault (KVM's `KVM_MIN_FREE_MMU_PAGES`).
pub const FREE_MMU_PAGES: u64 = 5;
/// Pages reclaimed at least at once, so a full MMU does not scan for
/// victims on every fault.
const RECLAIM_BATCH: usize = 16;

/// KVM's default limit: 2% of the guest's pages (`KVM_PERMILLE_MMU_PAGES`
/// = 20), at least [`MIN_MMU_PAGES`].
fn default_max_pages(slots: &MemslotTable) -> u64 {
    let pages: u64 = (0..crate::mem::memslot::ADDRESS_SPACE_NUM)
        .map(|as_id| slots.load(as_id).iter().map(|s| s.npages()).sum::<u64>())
        .sum();
    (pages * 20 / 1000).max(MIN_MMU_PAGES)
}

/// The shadow MMU of one VM.
pub struct ShadowMmu {
    arena: Arc<FrameArena>,
    host: Arc<HostAddressSpace>,
    slots: Arc<MemslotTable>,
    memory: GuestMemory,
    lock: MmuLock<Pages>,
    translations: Translations,
    invalidate: InvalidateState,
    remote_tlb: RemoteTlb,
    /// Bumped by a fast zap of everything: roots of older generations are
    /// obsolete.
    valid_gen: AtomicU64,
    /// The last completed [`ShadowMmu::zap_all`]: the valid generation it
    /// made (high 32 bits) and the root generation that announced it (low
    /// 32 bits).
    zap_all_done: AtomicU64,
    /// Bumped whenever a root page is invalidated: vCPUs recheck theirs.
    root_generation: AtomicU64,
    /// Indirect shadow pages, readable without the lock (seed 002).
    indirect_shadow_pages: AtomicU64,
    /// Unsync pages, readable without the lock: a sync finding none skips
    /// the lock (see [`sync`]).
    unsync_pages: AtomicU64,
    /// Emulated writes between their store to guest memory and their zap
    /// under the lock: while one is, a guest entry may differ from the SPTE
    /// built from it, and the audit does not compare them.
    emulating: AtomicU64,
    /// The page limit (KVM's `n_max_mmu_pages`).
    max_pages: AtomicU64,
    stats: MmuStats,
    /// The format of its SPTEs (KVM's `shadow_*_mask`): the IA-32e format,
    /// which the hardware walks for a guest's shadow tables and as AMD NPT
    /// for the nested MMU's NPT02, or EPT for an Intel nested MMU's EPT02.
    fmt: SpteFormat,
    /// The gfns its indirect pages shadow, for the other MMUs of the VM
    /// (a leaf lock: never held while taking another).
    tracked: parking_lot::Mutex<std::collections::HashSet<Gfn>>,
    /// Tracked gfns the other MMUs may map writable: every shadow page of
    /// the gfn is an unsync 4K page (KVM's `mmu_try_to_unsync_pages` called
    /// from the TDP MMU's `make_spte`: an L1 hypervisor writes its EPT12 or
    /// NPT12 leaf tables without a trap, and makes them coherent with
    /// INVEPT or a flushing VMRUN, which sync). Leaves the set, with those
    /// mappings write-protected, before a sync reads the gfn or another
    /// page starts to shadow it (a leaf lock, as `tracked`).
    writable_elsewhere: parking_lot::Mutex<std::collections::HashSet<Gfn>>,
    /// How the vCPUs match cached roots to a context (seed 001): 0 =
    /// normalised roles, 1 = the old un-normalised comparison.
    prev_roots_match: std::sync::atomic::AtomicU8,
    /// Seed 000's policies (`sync::SyncRootsCheck` in bit 0,
    /// `sync::UnsyncLevels` in bit 1).
    unsync_policy: std::sync::atomic::AtomicU8,
    /// Seed 003: whether vCPUs answer a zap's request by dropping every
    /// root ([`crate::mmu::ZapRequest::ReloadAll`]) or the obsolete ones.
    reload_all: std::sync::atomic::AtomicBool,
    /// The MMUs that map those gfns for someone else (the TDP MMU, for L1).
    protectors: parking_lot::Mutex<Vec<std::sync::Weak<dyn crate::mmu::track::WriteProtector>>>,
}

impl std::fmt::Debug for ShadowMmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowMmu").finish_non_exhaustive()
    }
}

impl ShadowMmu {
    /// A shadow MMU over `host` memory and `slots`, registered as MMU
    /// notifier and memslot observer.
    pub fn new(host: Arc<HostAddressSpace>, slots: Arc<MemslotTable>) -> Arc<ShadowMmu> {
        ShadowMmu::with_format(host, slots, SpteFormat::Legacy)
    }

    /// A shadow MMU building SPTEs of format `fmt`: IA-32e for a guest's
    /// shadow tables and for AMD's NPT02, EPT for Intel's EPT02 (with A/D
    /// bits, which an EPTP without A/D ignores: KVM's EPT02 follows L1's
    /// A/D setting and so does the hardware model's walk of it).
    pub fn with_format(host: Arc<HostAddressSpace>, slots: Arc<MemslotTable>, fmt: SpteFormat) -> Arc<ShadowMmu> {
        let mmu = Arc::new(ShadowMmu {
            arena: host.arena().clone(),
            memory: GuestMemory::new(host.clone(), slots.clone()),
            host: host.clone(),
            slots: slots.clone(),
            lock: MmuLock::new(Pages::default()),
            translations: Translations::default(),
            invalidate: InvalidateState::default(),
            remote_tlb: RemoteTlb::default(),
            valid_gen: AtomicU64::new(0),
            prev_roots_match: std::sync::atomic::AtomicU8::new(0),
            unsync_policy: std::sync::atomic::AtomicU8::new(0),
            reload_all: std::sync::atomic::AtomicBool::new(false),
            zap_all_done: AtomicU64::new(0),
            root_generation: AtomicU64::new(0),
            indirect_shadow_pages: AtomicU64::new(0),
            unsync_pages: AtomicU64::new(0),
            emulating: AtomicU64::new(0),
            max_pages: AtomicU64::new(default_max_pages(&slots)),
            stats: MmuStats::default(),
            fmt,
            tracked: parking_lot::Mutex::new(std::collections::HashSet::new()),
            writable_elsewhere: parking_lot::Mutex::new(std::collections::HashSet::new()),
            protectors: parking_lot::Mutex::new(Vec::new()),
        });
        host.register_notifier(Arc::new(Notifier(Arc::downgrade(&mmu))));
        slots.register_observer(Arc::new(Notifier(Arc::downgrade(&mmu))));
        mmu
    }

    /// Registers `protector`, an MMU mapping gfns this one may shadow (the
    /// TDP MMU of a VM with a nested MMU): it write-protects each gfn as
    /// this MMU starts to shadow it ([`crate::mmu::track`]).
    pub fn add_write_protector(&self, protector: std::sync::Weak<dyn crate::mmu::track::WriteProtector>) {
        self.protectors.lock().push(protector);
    }

    /// How its vCPUs match a cached root (`prev_roots`) to the context
    /// that wants it: seed 001's policy, normalised by default; the
    /// un-normalised comparison is KVM's before the thread, for measuring
    /// what it cost.
    pub fn set_prev_roots_match(&self, how: role::PrevRootsMatch) {
        let v = match how {
            role::PrevRootsMatch::Normalised => 0,
            role::PrevRootsMatch::Unnormalised => 1,
        };
        self.prev_roots_match.store(v, Ordering::Relaxed);
    }

    /// The policy [`ShadowMmu::set_prev_roots_match`] set.
    pub fn prev_roots_match(&self) -> role::PrevRootsMatch {
        match self.prev_roots_match.load(Ordering::Relaxed) {
            0 => role::PrevRootsMatch::Normalised,
            _ => role::PrevRootsMatch::Unnormalised,
        }
    }

    /// What its vCPUs drop when a root was zapped (seed 003's policy): the
    /// obsolete roots by default; every root is KVM's before the thread.
    pub fn set_zap_request(&self, request: crate::mmu::ZapRequest) {
        self.reload_all
            .store(request == crate::mmu::ZapRequest::ReloadAll, Ordering::Relaxed);
    }

    /// The invalidation state (`mmu_invalidate_seq` and friends).
    pub fn invalidate_state(&self) -> &InvalidateState {
        &self.invalidate
    }

    /// The policy [`ShadowMmu::set_zap_request`] set.
    pub fn zap_request(&self) -> crate::mmu::ZapRequest {
        if self.reload_all.load(Ordering::Relaxed) {
            crate::mmu::ZapRequest::ReloadAll
        } else {
            crate::mmu::ZapRequest::FreeObsolete
        }
    }

    /// The format of its SPTEs.
    pub fn format(&self) -> SpteFormat {
        self.fmt
    }

    /// The frame arena (SPTE tables and guest memory).
    pub fn arena(&self) -> &Arc<FrameArena> {
        &self.arena
    }

    /// Counters.
    pub fn stats(&self) -> &MmuStats {
        &self.stats
    }

    /// The remote TLB flush protocol of this MMU's vCPUs.
    // The vCPU's fast path reads it before every TLB hit.
    #[inline]
    pub fn remote_tlb(&self) -> &RemoteTlb {
        &self.remote_tlb
    }

    /// The guest memory, as the MMU reads and writes it.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Changes whenever a root may have become invalid.
    // The vCPU's fast path checks it before every TLB hit.
    #[inline]
    pub fn root_generation(&self) -> u64 {
        self.root_generation.load(Ordering::Acquire)
    }

    /// The guest-physical frame the leaf SPTE at `ptr` translates (for the
    /// hardware model's reports).
    pub fn translation_of(&self, ptr: SptePtr) -> Option<Gfn> {
        self.translations.get(ptr)
    }

    /// Shadow pages live now.
    pub fn page_count(&self) -> usize {
        self.lock.read().len()
    }

    /// The most shadow pages live at once so far.
    pub fn peak_page_count(&self) -> usize {
        self.lock.read().peak()
    }

    /// The page limit (KVM's `n_max_mmu_pages`).
    pub fn max_pages(&self) -> u64 {
        self.max_pages.load(Ordering::Relaxed)
    }

    /// Sets the page limit (`KVM_SET_NR_MMU_PAGES`), at least
    /// [`MIN_MMU_PAGES`]; pages above it are reclaimed at once, oldest
    /// first. Returns the limit set.
    pub fn set_max_pages(&self, n: u64) -> u64 {
        let n = n.max(MIN_MMU_PAGES);
        self.max_pages.store(n, Ordering::Relaxed);
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        let flush = self.reclaim(pages, 0);
        self.discharge(flush);
        n
    }

    /// KVM's `make_mmu_pages_available`: before a fault or a root load may
    /// create pages, zap the oldest pages not used as roots until
    /// [`FREE_MMU_PAGES`] more fit under the limit. Returns whether a flush
    /// is owed. Roots in use cannot be reclaimed, so with very many vCPUs
    /// the count can pass the limit by their roots, as in KVM.
    fn reclaim(&self, pages: &mut Pages, headroom: u64) -> PendingFlush {
        let max = self.max_pages.load(Ordering::Relaxed);
        let mut flush = PendingFlush::none();
        while pages.len() as u64 + headroom > max {
            let excess = (pages.len() as u64 + headroom - max) as usize;
            let victims = pages.oldest_reclaimable(excess.max(RECLAIM_BATCH));
            if victims.is_empty() {
                break;
            }
            let before = pages.len();
            for id in victims {
                // A zap can take children with it: skip the ones gone.
                if pages.is_live(id) && !pages.page(id).invalid && pages.page(id).root_count == 0 {
                    flush |= self.zap_page(pages, id);
                }
            }
            // Counted as KVM counts it: every page the reclaim zapped,
            // children included.
            let zapped = before.saturating_sub(pages.len()) as u64;
            self.stats.local().mmu_recycled.fetch_add(zapped, Ordering::Relaxed);
        }
        flush
    }

    /// Handles a fault of the hardware walk of `roots` at `gva` for
    /// `access` (KVM's `FNAME(page_fault)`).
    ///
    /// `tables` is the faulting vCPU's cache of table frames, topped up
    /// here before `mmu_lock` (nothing allocates under it): frames running
    /// out is [`ShadowError::OutOfFrames`] with nothing changed.
    #[allow(clippy::too_many_arguments)]
    pub fn page_fault(
        &self,
        roots: &ShadowRoots,
        paging: &GuestPaging,
        groot: &Root,
        gva: Gva,
        access: Access,
        pkru: u32,
        tables: &mut MmuMemoryCache,
    ) -> Result<ShadowOutcome, ShadowError> {
        MmuStats::inc(&self.stats.local().pf_taken);
        tracing::trace!(target: "kvm_page_fault", gva = gva.raw(), write = access.is_write(), fetch = access.is_fetch());
        let walk = match paging.walk(&WalkerMemory(&self.memory), groot, gva, access, pkru) {
            Ok(w) => w,
            Err(WalkError::PageFault(pf)) => return Ok(ShadowOutcome::GuestPageFault(pf.error_code)),
            Err(WalkError::NonCanonical) => return Ok(ShadowOutcome::GuestGeneralProtection),
        };
        // The linear address as the walk used it (32 bits in legacy modes).
        let gva = walk.va;
        let gfn = walk.gfn();
        let slots = self.slots.load(roots.as_id());
        let Some(slot) = slots.lookup(gfn) else {
            MmuStats::inc(&self.stats.local().pf_emulate);
            return Ok(ShadowOutcome::Mmio(walk.gpa));
        };
        if slot.is_invalid() {
            MmuStats::inc(&self.stats.local().pf_retry);
            return Ok(ShadowOutcome::Retry);
        }
        if access.is_write() && slot.is_readonly() {
            return Ok(ShadowOutcome::ReadOnlySlot(walk.gpa));
        }
        // A page for every level below the root, set aside before the lock.
        tables.topup(usize::from(roots.levels()))?;
        let mapping = faultin_gfn(&self.host, &self.invalidate, slot, gfn, access.is_write())
            .map_err(|source| ShadowError::Host { gpa: walk.gpa, source })?;
        let mut guard = self.lock.write();
        let (held, pages) = guard.split();
        let Ok(valid) = mapping.validate(&held, &self.invalidate) else {
            MmuStats::inc(&self.stats.local().pf_retry);
            return Ok(ShadowOutcome::Retry);
        };
        if !self.roots_valid(pages, roots) {
            MmuStats::inc(&self.stats.local().pf_retry);
            return Ok(ShadowOutcome::Retry);
        }
        // Room for the pages this fault may create (one per level).
        let mut flush = self.reclaim(pages, FREE_MMU_PAGES);
        // KVM's FNAME(gpte_changed): the guest entries the walk used must
        // still hold (their writes are trapped, so under the lock they
        // cannot change until we are done), A/D included: the walk set A
        // at every level and D at a dirty leaf, and a guest write that
        // cleared one since (an emulated write that ran between the walk
        // and the lock found no SPTE to zap yet) must not leave an SPTE
        // recorded with the bit the guest took away. Another walk may
        // have set more.
        let gpte = paging.gpte_bits();
        for level in walk.level..=walk.root_level {
            let Some(e) = walk.entry(level) else { continue };
            if matches!(groot, Root::PaeRegs { .. }) && level == 3 {
                continue; // PDPTE registers, not memory
            }
            let size = if paging.mode() == crate::arch::control::PagingMode::Bits32 {
                EntrySize::Four
            } else {
                EntrySize::Eight
            };
            let Ok(now) = LockedMemory(&self.memory).read_entry(e.pte_gpa, size);
            let seen = gpte.as_walked(e.pte, level == walk.level && walk.dirty);
            // A table the guest cannot write (ROM, no memory): the walk could
            // not set its A/D bits (KVM's `pte_writable`); it counts as
            // having set them. (Asked only of an entry that looks changed.)
            let now = if gpte.still_valid(seen, now) || table_writable(&slots, e.pte_gpa) {
                now
            } else {
                now | (seen & gpte.ad())
            };
            if !gpte.still_valid(seen, now) && !crate::sync::bug(crate::sync::Bug::GpteChangeIgnoresAd) {
                MmuStats::inc(&self.stats.local().pf_retry);
                return Ok(ShadowOutcome::Retry);
            }
            if (now ^ e.pte) & !gpte.ad() != 0 {
                MmuStats::inc(&self.stats.local().pf_retry);
                return Ok(ShadowOutcome::Retry);
            }
        }

        // Descend from the root that covers `gva`.
        let mut sp = roots.root_for(gva);
        loop {
            let page = pages.page(sp);
            let lvl = page.role.level();
            if lvl == Level::L1 {
                break;
            }
            let level = lvl.get();
            let role = page.role;
            let table = page.pfn;
            let index = lvl.table_index(gva.raw()) as u16;
            let ptr = SptePtr { table, index };
            let (child_gfn, child_role) = if !role.is_direct() && level > walk.level {
                let e = walk.entry(level - 1).expect("the walk visited the guest table below");
                let parent_rights = walk.entry(level).map_or(AccessRights::all(), |p| p.rights);
                (e.table_gfn, role.child(index as usize, false, parent_rights))
            } else {
                // Below a guest huge page: a direct page for the part this
                // entry covers.
                let covered = 1u64 << (12 + 9 * (u32::from(level) - 1));
                (
                    walk.gpa.align_down(covered).frame(),
                    role.child(index as usize, true, walk.rights),
                )
            };
            let spte = Pages::spte(&self.arena, ptr);
            let existing = spte
                .is_mmu_present()
                .then(|| pages.by_pfn(spte.pfn()))
                .flatten()
                .filter(|&c| {
                    let c = pages.page(c);
                    c.gfn == child_gfn && c.role == child_role && !c.invalid
                });
            let child = match existing {
                Some(c) => c,
                None => {
                    if spte.is_mmu_present() {
                        flush |= self.drop_spte(pages, ptr, lvl);
                    }
                    let (c, wp) = self.get_page(pages, child_gfn, child_role, tables);
                    flush |= wp;
                    // A new path to a page must not expose stale SPTEs:
                    // an unsync child is synced before it is linked.
                    if pages.page(c).has_unsync() {
                        flush |= self.sync_before_link(pages, c);
                    }
                    flush |= self.link(pages, ptr, lvl, c);
                    c
                }
            };
            pages.page_mut(child).write_flooding = 0;
            sp = child;
        }

        // The 4K leaf.
        let page = pages.page(sp);
        let ptr = SptePtr {
            table: page.pfn,
            index: Level::L1.table_index(gva.raw()) as u16,
        };
        let role = page.role;
        // PKRU write-disables the translation's key now: the hardware
        // (CR0.WP forced on) applies it to supervisor writes.
        let pkru_wd = paging.pkeys()
            && crate::arch::perm::pkru_write_disabled(pkru, walk.pkey)
            && !crate::sync::bug(crate::sync::Bug::IgnorePkruWriteDisable);
        let mut rights = match leaf_rights(&role, walk.rights, walk.dirty, access, pkru_wd) {
            Leaf::Map(r) => r,
            Leaf::Emulate => {
                self.discharge(flush);
                MmuStats::inc(&self.stats.local().pf_emulate);
                return Ok(ShadowOutcome::EmulateWrite(walk.gpa));
            }
        };
        if slot.is_readonly() {
            // Never writable, even on a read of a dirty guest entry: a
            // write must exit to the VMM (KVM's `make_spte` with
            // `host_writable` false).
            rights.remove(AccessRights::WRITE);
        }
        let tracked = pages.is_write_tracked(gfn);
        let mut mmu_writable = !tracked;
        if tracked && rights.contains(AccessRights::WRITE) {
            if self.try_unsync(pages, gfn) {
                // Every shadow page of the guest table is a 4K page, now
                // unsync: the guest writes its table without trapping.
                mmu_writable = true;
            } else if access.is_write() {
                // A write to a guest page table: emulate it.
                self.discharge(flush);
                MmuStats::inc(&self.stats.local().pf_emulate);
                return Ok(ShadowOutcome::EmulateWrite(walk.gpa));
            } else {
                rights.remove(AccessRights::WRITE);
            }
        }
        let pfn = valid.pfn_at(crate::addr::Level::L1);
        let mut leaf = self.fmt.make_leaf(
            Level::L1,
            pfn,
            spte_access(&role, rights),
            valid.writable() && !slot.is_readonly(),
            mmu_writable && !slot.is_readonly(),
            false,
        );
        leaf = leaf.with_pkey(walk.pkey);
        if pages.rmap_len(gfn) >= RMAP_RECYCLE_THRESHOLD {
            // A gfn mapped by very many SPTEs (a guest mapping one page
            // everywhere): drop them all rather than let the chain grow
            // (KVM's `rmap_recycle`); they fault back in on use.
            tracing::trace!(target: "kvm_mmu_rmap_recycle", gfn = gfn.raw());
            flush |= self.zap_gfn_range(pages, gfn, gfn.add(1));
        }
        flush |= self.set_spte(pages, ptr, Level::L1, NewSpte::Leaf { spte: leaf, gfn, slot });
        if let Some(e) = walk.entry(1).filter(|_| !role.is_direct()) {
            // What the SPTE assumed of the guest entry, for sync.
            debug_assert_eq!(role.gpte_bits(), gpte, "a page reads its guest entries as the walk did");
            pages.record_gpte(sp, ptr.index as usize, gpte.as_walked(e.pte, walk.dirty));
        }
        self.prefetch(pages, sp, ptr.index as usize, gva, paging, groot, roots.as_id());
        self.discharge(flush);
        MmuStats::inc(&self.stats.local().pf_fixed);
        Ok(ShadowOutcome::Fixed)
    }

    /// Finds or creates the page for (gfn, role); returns it and whether a
    /// flush is owed (creating an indirect page write-protected its gfn).
    fn get_page(&self, pages: &mut Pages, gfn: Gfn, role: Role, tables: &mut MmuMemoryCache) -> (PageId, PendingFlush) {
        // The hash is exact on (gfn, role); what KVM counts as hash
        // collisions is here the other roles of the same guest table.
        if !role.is_direct() {
            let others = pages
                .indirect_of(gfn)
                .iter()
                .filter(|&&id| pages.page(id).role != role)
                .count();
            self.stats
                .global()
                .max_mmu_page_hash_collisions
                .fetch_max(others as u64, Ordering::Relaxed);
        }
        if let Some(id) = pages.find(gfn, role) {
            tracing::trace!(target: "kvm_mmu_get_page", gfn = gfn.raw(), level = role.level().get(), direct = role.is_direct(), created = false);
            return (id, PendingFlush::none());
        }
        MmuStats::inc(&self.stats.local().mmu_cache_miss);
        let mut flush = PendingFlush::none();
        if !role.is_direct() && role.level() > Level::L1 {
            // The guest table becomes an upper-level table: it must be
            // write-protected, so its unsync 4K pages go (KVM's
            // `kvm_mmu_find_shadow_page`; only 4K pages may be unsync).
            for id in pages.indirect_of(gfn).to_vec() {
                if pages.is_live(id) && pages.page(id).is_unsync() {
                    flush |= self.zap_page(pages, id);
                }
            }
        }
        let pfn = tables
            .pop()
            .expect("the cache was topped up with a page for every level a fault or a root load may create");
        let id = pages.create(&self.translations, pfn, gfn, role);
        self.stats.account_tables(1);
        tracing::trace!(target: "kvm_mmu_get_page", gfn = gfn.raw(), level = role.level().get(), direct = role.is_direct(), created = true);
        if !role.is_direct() {
            // Counted first: the other MMUs' lockless "anything tracked?"
            // must not say no once the gfn is (seed 002).
            let count_late = crate::sync::bug(crate::sync::Bug::CountAfterProtect);
            if !count_late {
                self.indirect_shadow_pages.fetch_add(1, Ordering::Relaxed);
            }
            let protect = || self.protect_in_others(gfn);
            let protect_first = crate::sync::bug(crate::sync::Bug::ProtectBeforeTrack);
            if protect_first {
                protect();
                crate::sync::sched_point();
            }
            let first = self.tracked.lock().insert(gfn);
            // Shadowed by a new page: no other MMU may map it writable
            // from now on, unsync pages or not (tracked first, so a racing
            // fault there maps it read-only or is zapped by this).
            let was_writable = self.writable_elsewhere.lock().remove(&gfn);
            if (first || was_writable) && !protect_first {
                protect();
            }
            if count_late {
                crate::sync::sched_point();
                self.indirect_shadow_pages.fetch_add(1, Ordering::Relaxed);
            }
            // Write-protect every mapping of the guest table's gfn (also
            // when other pages of it exist: they may be unsync, and it
            // writable).
            flush |= self.write_protect_gfn(pages, gfn);
        }
        (id, flush)
    }

    /// Takes back another MMU's permission to map `gfn` writable (a sync
    /// is about to read it): out of the set first, then every writable
    /// mapping there goes, with its TLB entries, before this returns.
    pub(super) fn protect_elsewhere(&self, gfn: Gfn) {
        if crate::sync::bug(crate::sync::Bug::SyncLeavesWritableElsewhere) {
            return;
        }
        if self.writable_elsewhere.lock().remove(&gfn) {
            self.protect_in_others(gfn);
        }
    }

    /// Removes every writable mapping of `gfn` in the MMUs that map it
    /// for someone else ([`crate::mmu::track::WriteProtector`]), with
    /// their TLB entries, before it returns.
    fn protect_in_others(&self, gfn: Gfn) {
        let protectors: Vec<_> = self
            .protectors
            .lock()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        for p in protectors {
            p.write_protect_gfn(gfn);
        }
    }

    /// Write-protects every leaf SPTE mapping `gfn`. Returns whether one
    /// changed (a flush is owed).
    fn write_protect_gfn(&self, pages: &Pages, gfn: Gfn) -> PendingFlush {
        let mut flush = PendingFlush::none();
        for ptr in pages.rmap_of(gfn) {
            flush |= self.clear_leaf_bits(ptr, |s| s.write_protect(self.fmt));
        }
        flush
    }

    /// Zaps a shadow page (KVM's `kvm_mmu_prepare_zap_page` and commit):
    /// every entry dropped, every parent SPTE cleared, out of the hash; a
    /// page still used as a root is kept, invalid, until released. Returns
    /// the flush the caller owes (always: translations through the page are
    /// gone).
    fn zap_page(&self, pages: &mut Pages, id: PageId) -> PendingFlush {
        let mut flush = PendingFlush::new(true);
        let (pfn, level, gfn) = {
            let p = pages.page(id);
            (p.pfn, p.role.level(), p.gfn)
        };
        tracing::trace!(target: "kvm_mmu_prepare_zap_page", gfn = gfn.raw(), level = level.get());
        MmuStats::inc(&self.stats.local().mmu_shadow_zapped);
        let was_indirect = !pages.page(id).role.is_direct();
        if pages.page(id).is_unsync() {
            self.unsync_pages.fetch_sub(1, Ordering::Relaxed);
        }
        let last = pages.unhash(id);
        if was_indirect {
            self.indirect_shadow_pages.fetch_sub(1, Ordering::Relaxed);
            if last {
                self.tracked.lock().remove(&gfn);
                self.writable_elsewhere.lock().remove(&gfn);
            }
        }
        for index in 0..ENTRIES {
            let ptr = SptePtr {
                table: pfn,
                index: index as u16,
            };
            flush |= self.drop_spte(pages, ptr, level);
        }
        self.unlink_parents(pages, id);
        if pages.page(id).root_count > 0 {
            pages.page_mut(id).invalid = true;
            self.root_generation.fetch_add(1, Ordering::AcqRel);
        } else {
            self.free_page(pages, id);
        }
        flush
    }

    fn free_page(&self, pages: &mut Pages, id: PageId) {
        let pfn = pages.remove(id, &self.translations);
        self.stats.account_tables(-1);
        self.defer_free(vec![pfn]);
    }

    /// Frees table frames after an epoch grace period: hardware walks in
    /// flight may still read them.
    fn defer_free(&self, frames: Vec<crate::addr::Pfn>) {
        let arena = self.arena.clone();
        crossbeam_epoch::pin().defer(move || {
            for pfn in frames {
                // A double free would be an MMU bug; the arena refuses it.
                let _ = arena.free(pfn, crate::addr::PageSize::Size4K);
            }
        });
    }

    /// Flushes every vCPU's TLB if `flush` is owed (before the lock is
    /// dropped).
    fn discharge(&self, flush: PendingFlush) {
        if flush.discharge(&self.remote_tlb) {
            MmuStats::inc(&self.stats.local().remote_tlb_flush);
        }
    }

    /// Takes `mmu_lock` for write, until the value returned is dropped
    /// (for tests that hold it while a fault waits).
    #[doc(hidden)]
    pub fn write_lock(&self) -> impl Sized + '_ {
        self.lock.write()
    }

    /// A guest write the MMU emulates (KVM's `emulator_write_phys` then
    /// `kvm_mmu_track_write`): writes `size` bytes of `value` at `gpa`,
    /// then zaps the SPTEs shadowing the written guest entries, or whole
    /// pages on a misaligned write or write flooding.
    pub fn emulate_write(&self, gpa: Gpa, size: usize, value: u64) -> Result<(), ShadowError> {
        // The write first, outside the lock (it may fault the page in, which
        // takes the host's mm lock; KVM's `emulator_write_phys` also writes
        // before `kvm_mmu_track_write` takes `mmu_lock`). A fault racing in
        // between builds its SPTE from the new entry or is zapped below. A
        // write to memory with no memslot (or a read-only one) is dropped.
        self.emulating.fetch_add(1, Ordering::AcqRel);
        let _ = self.memory.write_value(gpa, size, value);
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        let flush = self.track_write(pages, gpa, size);
        self.discharge(flush);
        self.emulating.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }

    /// An emulated locked compare-exchange of a guest entry (KVM's
    /// `emulator_cmpxchg_emulated`, as an emulated page walk sets A/D
    /// flags): exchanges `size` bytes at `gpa` if they hold `old`, then,
    /// if it did, zaps what shadowed the entry as [`ShadowMmu::emulate_write`]
    /// does. `Err(current)` if the entry changed; memory with no memslot
    /// reads as `old` and drops the write.
    pub fn emulate_cmpxchg(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<(), u64> {
        self.emulating.fetch_add(1, Ordering::AcqRel);
        let done = self.memory.cmpxchg_entry(gpa, size, old, new).unwrap_or(Ok(()));
        if done.is_ok() {
            let mut guard = self.lock.write();
            let pages = &mut *guard;
            let flush = self.track_write(pages, gpa, size.bytes() as usize);
            self.discharge(flush);
        }
        self.emulating.fetch_sub(1, Ordering::AcqRel);
        done
    }

    /// KVM's `kvm_mmu_unprotect_gfn_and_retry`: instead of emulating a
    /// write to the write-protected guest table at `gpa`, zaps every shadow
    /// page of that table so that the guest's retried instruction writes
    /// it directly. For writes by instructions that do not write page
    /// tables (a `rep stos` clearing a freed table page for reuse as data):
    /// the guest has stopped using the page as a table. Returns whether
    /// anything was unprotected (if not, emulate).
    pub fn unprotect_gfn_and_retry(&self, gpa: Gpa) -> bool {
        // Read without the lock, as a heuristic (seed 002): taking the
        // lock to read one counter costs the whole VM more than a needless
        // hash walk. A false positive walks the hash for nothing; a false
        // negative (a page created just now) emulates this write instead,
        // which is always correct.
        if self.indirect_shadow_pages.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        let ids = pages.indirect_of(gpa.frame()).to_vec();
        let mut flush = PendingFlush::none();
        for &id in &ids {
            // An earlier zap may have taken this page with it (a table
            // that links itself is its own child).
            if pages.is_live(id) {
                flush |= self.zap_page(pages, id);
            }
        }
        self.discharge(flush);
        if !ids.is_empty() {
            MmuStats::inc(&self.stats.local().mmu_unprotect_retry);
        }
        !ids.is_empty()
    }

    /// The number of leaf SPTEs mapping `gfn` (its rmap's length).
    pub fn rmap_count(&self, gfn: Gfn) -> usize {
        self.lock.read().rmap_len(gfn)
    }

    /// KVM's `kvm_mmu_track_write`. Returns whether a flush is owed.
    fn track_write(&self, pages: &mut Pages, gpa: Gpa, size: usize) -> PendingFlush {
        let gfn = gpa.frame();
        let mut flush = PendingFlush::none();
        for id in pages.indirect_of(gfn).to_vec() {
            // A zap below can take later pages of this list with it: a
            // guest table that links itself has pages of the same gfn as
            // its own children (KVM keeps zapped pages on an invalid list
            // until the loop ends; here they are gone at once).
            if !pages.is_live(id) {
                continue;
            }
            let role = pages.page(id).role;
            let misaligned = detect_write_misaligned(&role, gpa, size);
            let flooded = role.level() > Level::L1 && {
                let p = pages.page_mut(id);
                p.write_flooding = p.write_flooding.saturating_add(1);
                p.write_flooding >= 3
            };
            if misaligned || flooded {
                MmuStats::inc(&self.stats.local().mmu_flooded);
                flush |= self.zap_page(pages, id);
                continue;
            }
            MmuStats::inc(&self.stats.local().mmu_pte_write);
            let pfn = pages.page(id).pfn;
            for index in written_sptes(&role, gpa) {
                let ptr = SptePtr { table: pfn, index };
                if Pages::spte(&self.arena, ptr).is_mmu_present() {
                    if role.level() > Level::L1 {
                        MmuStats::inc(&self.stats.local().mmu_pde_zapped);
                    }
                    flush |= self.drop_spte(pages, ptr, role.level());
                }
            }
        }
        flush
    }

    /// Zaps every shadow page (KVM's `kvm_mmu_zap_all_fast`): roots in use
    /// become invalid and vCPUs reload.
    pub fn zap_all(&self) {
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        self.valid_gen.fetch_add(1, Ordering::AcqRel);
        let mut flush = self.zap_everything(pages);
        // Every vCPU flushes, pages or none (KVM's zap-all requests a
        // reload and a flush of every vCPU).
        flush.require();
        let announced = self.root_generation.fetch_add(1, Ordering::AcqRel) + 1;
        let valid = self.valid_gen.load(Ordering::Acquire);
        // One word, so a reader sees a zap's two numbers together.
        self.zap_all_done
            .store(valid << 32 | (announced & 0xffff_ffff), Ordering::Release);
        self.discharge(flush);
    }

    /// Zaps every page; returns the flush owed.
    fn zap_everything(&self, pages: &mut Pages) -> PendingFlush {
        let mut flush = PendingFlush::none();
        // Roots first (top-down zaps unlink and free children).
        let mut ids = pages.ids();
        ids.sort_by_key(|&id| std::cmp::Reverse(pages.page(id).role.level()));
        for id in ids {
            if pages.is_live(id) && !pages.page(id).invalid {
                flush |= self.zap_page(pages, id);
            }
        }
        flush
    }

    /// Zaps the leaf SPTEs mapping gfns `start..end`. Returns whether a
    /// flush is owed.
    fn zap_gfn_range(&self, pages: &mut Pages, start: Gfn, end: Gfn) -> PendingFlush {
        let mut flush = PendingFlush::none();
        for (_, ptr) in pages.rmap_range(start, end) {
            flush |= self.drop_spte(pages, ptr, Level::L1);
        }
        flush
    }

    fn roots_valid(&self, pages: &Pages, roots: &ShadowRoots) -> bool {
        roots.generation() == self.valid_gen.load(Ordering::Acquire) && roots.pages().all(|id| !pages.page(id).invalid)
    }
}

/// KVM's `detect_write_misaligned`: a write that does not fall within one
/// guest entry (a byte write at an entry's start is the common `clear_bit`
/// and is allowed).
fn detect_write_misaligned(role: &Role, gpa: Gpa, size: usize) -> bool {
    let offset = gpa.raw() & 0xfff;
    let pte_size = role.gpte_size() as u64;
    if offset & (pte_size - 1) == 0 && size == 1 {
        return false;
    }
    let last = offset + size as u64 - 1;
    (offset ^ last) & !(pte_size - 1) != 0 || size < 4
}

/// The SPTE indexes of a page that shadow the guest entry written at `gpa`
/// (KVM's `get_written_sptes`): for 4-byte guest entries, only in the page
/// of the right quadrant, and a 32-bit PDE (4 MiB) is two shadow PDEs.
fn written_sptes(role: &Role, gpa: Gpa) -> Vec<u16> {
    let mut offset = gpa.raw() & 0xfff;
    let mut n = 1;
    if role.has_4_byte_gpte() {
        offset <<= 1;
        if role.level() == Level::L2 {
            offset &= !7;
            offset <<= 1;
            n = 2;
        }
        let quadrant = (offset >> 12) as u8;
        offset &= 0xfff;
        if quadrant != role.quadrant() {
            return Vec::new();
        }
    }
    let first = (offset / 8) as u16;
    (first..first + n).collect()
}

/// The MMU-notifier and memslot-observer subscriptions.
struct Notifier(std::sync::Weak<ShadowMmu>);

impl MmuNotifier for Notifier {
    fn invalidate_range_start(&self, range: &NotifierRange) {
        let Some(mmu) = self.0.upgrade() else { return };
        let mut guard = mmu.lock.write();
        mmu.invalidate.begin(&guard);
        mmu.invalidate.range_add(&guard, range.range);
        let pages = &mut *guard;
        let mut flush = PendingFlush::none();
        for as_id in 0..2u16 {
            let slots = mmu.slots.load(as_id);
            let spans: Vec<_> = slots
                .overlapping_hva(range.range)
                .filter_map(|s| s.hva_range_to_gfns(range.range))
                .collect();
            drop(slots);
            for r in spans {
                flush |= mmu.zap_gfn_range(pages, r.start, r.end);
            }
        }
        mmu.discharge(flush);
    }

    fn invalidate_range_end(&self, _range: &NotifierRange) {
        let Some(mmu) = self.0.upgrade() else { return };
        let guard = mmu.lock.write();
        mmu.invalidate.end(&guard);
    }
}

impl MemslotObserver for Notifier {
    fn flush_memslot(&self, _slot: &Memslot) {
        // KVM's default for shadow paging: zap everything on delete/move.
        if let Some(mmu) = self.0.upgrade() {
            mmu.zap_all();
        }
    }

    fn commit(&self, change: MemslotChange, old: Option<&Memslot>, new: Option<&Memslot>, _generation: u64) {
        let Some(mmu) = self.0.upgrade() else { return };
        if let (MemslotChange::FlagsOnly, Some(old), Some(new)) = (change, old, new)
            && !old.logs_dirty_pages()
            && new.logs_dirty_pages()
        {
            mmu.start_dirty_logging(new);
        }
    }
}

impl crate::mmu::track::WriteTracker for ShadowMmu {
    fn any_tracked(&self) -> bool {
        // Seed 002: a heuristic read without the lock.
        self.indirect_shadow_pages.load(Ordering::Relaxed) != 0
    }

    fn is_tracked(&self, start: Gfn, end: Gfn) -> bool {
        let tracked = self.tracked.lock();
        if end.raw() - start.raw() == 1 {
            return tracked.contains(&start);
        }
        tracked.iter().any(|g| (start..end).contains(g))
    }

    fn write_allowed(&self, gfn: Gfn) -> bool {
        !self.tracked.lock().contains(&gfn) || self.writable_elsewhere.lock().contains(&gfn)
    }

    fn try_unsync(&self, gfn: Gfn) -> bool {
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        if !pages.is_write_tracked(gfn) {
            // Not shadowed (any more): nothing to unsync, the other MMU
            // maps it as it likes.
            return true;
        }
        if !self.try_unsync(pages, gfn) {
            return false;
        }
        // Under the lock: a sync, which takes it, removes the gfn before
        // it reads the guest table.
        self.writable_elsewhere.lock().insert(gfn);
        true
    }

    fn track_write(&self, gpa: Gpa, size: usize, value: u64) {
        if let Err(e) = self.emulate_write(gpa, size, value) {
            tracing::warn!(target: "kvm_mmu", gpa = gpa.raw(), %e, "an emulated write to a tracked gfn failed");
        }
    }

    fn unprotect(&self, gpa: Gpa) -> bool {
        self.unprotect_gfn_and_retry(gpa)
    }

    fn protect_logged(&self, as_id: u16, slot_id: u16, first_page: u64, bits: &[u64]) {
        self.protect_logged_pages(as_id, slot_id, first_page, bits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::control::{Cr0, Cr4, Efer};
    use crate::mmu::shadow::role::GuestContext;
    use crate::walker::ControlRegs;

    #[test]
    fn written_sptes_follow_kvm_for_32_bit_tables() {
        let regs = ControlRegs {
            cr0: Cr0::PE | Cr0::PG | Cr0::WP,
            cr4: Cr4::empty(),
            efer: Efer::empty(),
        };
        let ctx = GuestContext::new(&regs, false);
        let pd_q1 = Role::root(&ctx, Level::L2, 1);
        // Guest PDE 256 (the first of the second GiB) at offset 0x400.
        assert_eq!(written_sptes(&pd_q1, Gpa::new(0x5400)), vec![0, 1]);
        assert!(written_sptes(&pd_q1, Gpa::new(0x5000)).is_empty(), "quadrant 0's PDE");
        let pt_q1 = pd_q1.child(1, false, AccessRights::all());
        // Guest PTE 512 (second half of the 4 MiB) at offset 0x800.
        assert_eq!(written_sptes(&pt_q1, Gpa::new(0x7800)), vec![0]);
        assert!(written_sptes(&pt_q1, Gpa::new(0x77fc)).is_empty());
        assert!(detect_write_misaligned(&pt_q1, Gpa::new(0x7802), 4));
        assert!(!detect_write_misaligned(&pt_q1, Gpa::new(0x7804), 4));
        assert!(
            !detect_write_misaligned(&pt_q1, Gpa::new(0x7804), 1),
            "clear_bit on the low byte"
        );
    }
}
