//! A vCPU: architectural state, its TLB, and the access path, on either MMU.
//!
//! - On the TDP MMU: TLB → two-dimensional walk (the guest's tables through
//!   EPT) → EPT exit to the MMU → retry.
//! - On the shadow MMU: TLB → one-dimensional walk of the shadow tables (as
//!   hardware runs a guest under shadow paging: CR0.WP and EFER.NX forced
//!   on, the guest's SMEP/SMAP/PKE) → #PF exit to the MMU, which walks the
//!   guest's tables and fixes the shadow, injects the guest's #PF, or asks
//!   for the write to be emulated → retry.

use std::sync::Arc;

use super::hw::{EptExit, EptGuestMemory, EptStage, EptTranslator};
use super::tlb::{Flush, Tlb, TlbConfig, TlbEntry, TlbTag, access_class};
use crate::addr::{Gpa, Hpa, Pfn};
use crate::arch::control::is_canonical;
use crate::arch::control::{CR3_NOFLUSH, CR3_PAE_PDPT_MASK, CR3_PCID_MASK, CpuFeatures, Cr0, Cr4, Efer, PagingMode};
use crate::arch::ept::{EptViolationQual, Eptp};
use crate::arch::perm::{Access, AccessKind, AccessRights};
use crate::arch::pfec::PfErrorCode;
use crate::arch::pte::PT_GLOBAL;
use crate::arch::pte::Pte64;
use crate::arch::pte::PteEpt;
use crate::mem::{DirtyRing, FrameArena, MemslotTable};
use crate::mmu::cache::{MmuCaches, MmuMemoryCache};
use crate::mmu::flush::VcpuMode;
use crate::mmu::shadow::page::SptePtr;
use crate::mmu::shadow::role::GuestContext;
use crate::mmu::shadow::roots::ShadowRoots;
use crate::mmu::shadow::{ShadowError, ShadowMmu, ShadowOutcome};
use crate::mmu::stats::MmuStats;
use crate::mmu::tdp::{FaultOutcome, RootRef, TdpError, TdpFault, TdpMmu};
use crate::walker::{ControlRegs, EntrySize, GuestPaging, Paging, PtMemory, Root, WalkError};

/// A fault the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestFault {
    /// #PF with its error code (CR2 = the linear address).
    PageFault {
        /// The error code.
        error_code: PfErrorCode,
        /// The faulting linear address.
        gva: u64,
    },
    /// #GP(0): a non-canonical address.
    GeneralProtection,
}

/// The result of one guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessResult {
    /// The access completed.
    Done {
        /// The guest-physical address reached.
        gpa: Gpa,
        /// The value read (0 for writes and for MMIO reads).
        value: u64,
        /// Whether the gpa had no memslot and the VMM emulated it.
        mmio: bool,
    },
    /// The guest takes an exception.
    Fault(GuestFault),
    /// The vCPU exited to the VMM before the access
    /// (`KVM_EXIT_DIRTY_RING_FULL`): harvest its ring, reset the rings
    /// ([`TdpMmu::reset_dirty_rings`]) and issue the access again.
    DirtyRingFull,
}

/// Counters of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VcpuStats {
    /// Accesses made.
    pub accesses: u64,
    /// Accesses served by a TLB hit.
    pub tlb_hits: u64,
    /// EPT-violation exits.
    pub ept_violations: u64,
    /// EPT-misconfiguration exits.
    pub ept_misconfigs: u64,
    /// #PF exits intercepted by the shadow MMU.
    pub shadow_exits: u64,
    /// Exceptions delivered to the guest.
    pub guest_faults: u64,
    /// Full TLB flushes requested by the MMU.
    pub remote_flushes: u64,
    /// Roots dropped after a fast zap and reloaded.
    pub root_reloads: u64,
    /// Isolation: accesses that reached a frame the host had freed (a
    /// translation that outlived its frame). Always 0 on a correct MMU.
    pub freed_frame_accesses: u64,
    /// Isolation: walks of a root invalidated by a zap the vCPU had
    /// already acknowledged (it saw the request and kept the root). Always
    /// 0 on a correct MMU.
    pub invalid_root_uses: u64,
}

/// What the shadow MMU made of a #PF of the shadow walk.
enum ShadowAnswer {
    /// The access ends.
    Done(AccessResult),
    /// An SPTE was installed: retry the access.
    Fixed,
    /// A race, or a write-protected table unprotected: retry the access.
    Retry,
}

/// How one try of an access ended.
enum Attempt {
    /// The access completed or the guest takes a fault.
    Done(AccessResult),
    /// An EPT exit; `final_gpa` is set when the final translation exited.
    Exit { exit: EptExit, final_gpa: Option<Gpa> },
    /// The walk of the shadow tables faulted (a #PF intercepted by the
    /// shadow MMU).
    ShadowExit,
}

/// Retries of one access before the vCPU reports that the MMU made no
/// progress. Each retry follows an MMU fix, a lost race or an MMU-notifier
/// invalidation; a correct MMU converges in a few unless the host keeps
/// invalidating the same page, so after [`YIELD_AFTER`] retries the vCPU
/// yields to let the invalidating thread finish.
const MAX_RETRIES: u32 = 100_000;
/// Retries after which a vCPU yields its core between attempts.
const YIELD_AFTER: u32 = 8;
/// Exits in a row that the MMU answered "fixed" (or "already right") and
/// that the hardware then took again, the same exit: a livelock, the MMU
/// and the hardware disagreeing about what the SPTE allows. A race (a
/// notifier zap between the fix and the retry) repeats this a few times
/// at most; a correct MMU never comes near the bound.
pub const LIVELOCK_EXITS: u32 = 1000;

/// Why an access could not complete.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The MMU failed.
    #[error(transparent)]
    Mmu(#[from] TdpError),
    /// The shadow MMU failed.
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    /// An access of a size other than 1..=8 bytes (no x86 data access
    /// the model makes is wider than a quadword).
    #[error("access of {size} bytes at {gva:#x}: the size must be 1..=8")]
    InvalidAccessSize {
        /// The linear address.
        gva: u64,
        /// The size asked for.
        size: usize,
    },
    /// The MMU kept answering "retry".
    #[error("no progress on {gva:#x} after {MAX_RETRIES} retries (last exit {last:?})")]
    NoProgress {
        /// The linear address.
        gva: u64,
        /// The last exit.
        last: Option<EptExit>,
    },
    /// The MMU answered the same exit as fixed [`LIVELOCK_EXITS`] times in
    /// a row and the hardware took it again every time: an access that can
    /// never complete (an MMU bug; never the guest's doing).
    #[error("livelock: {exits} identical exits on a {access:?} at {gva:#x}, each answered as fixed ({state})")]
    Livelock {
        /// The linear address.
        gva: u64,
        /// The access.
        access: Access,
        /// The exits taken.
        exits: u32,
        /// The vCPU state that caused it: registers, PKRU, the last exit.
        state: String,
    },
}

/// The registers of a `rep stosq` ([`Vcpu::rep_stos`]): RDI, the next
/// address, and RCX, the stores left. The instruction updates them store
/// by store, so after an exit it resumes where it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StringRegs {
    /// The linear address of the next store.
    pub rdi: u64,
    /// Stores left.
    pub rcx: u64,
}

/// An INVEPT type (SDM vol. 3C, "INVEPT"), as the VMM issues it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invept {
    /// Type 1: the combined mappings made through one EPTP.
    SingleContext(Eptp),
    /// Type 2: the combined mappings of every EPTP.
    AllContext,
}

/// An INVVPID type (SDM vol. 3C, "INVVPID"), as the VMM issues it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invvpid {
    /// Type 0: one linear address of one VPID.
    IndividualAddress {
        /// The VPID.
        vpid: u16,
        /// The linear address.
        va: u64,
    },
    /// Type 1: everything of one VPID.
    SingleContext(u16),
    /// Type 2: everything of every VPID but 0.
    AllContext,
    /// Type 3: the non-global mappings of one VPID.
    SingleContextRetainingGlobals(u16),
}

/// Why an INVEPT/INVVPID failed (VMfailValid in hardware, a VMM bug here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidationError {
    /// VPID 0 is the host's: INVVPID types 0, 1 and 3 refuse it.
    #[error("INVVPID with VPID 0")]
    VpidZero,
    /// INVVPID type 0 with a non-canonical linear address.
    #[error("INVVPID individual-address with non-canonical address {0:#x}")]
    NonCanonical(u64),
}

/// A vCPU on the TDP MMU.
/// The MMU a vCPU runs on, and what the vCPU keeps of it.
// One per vCPU, built once and never moved on a hot path: the size
// difference costs nothing, a box would cost an indirection per access.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Tdp(TdpState),
    Shadow(ShadowState),
}

/// A vCPU's view of the TDP MMU.
struct TdpState {
    mmu: Arc<TdpMmu>,
    root: RootRef,
    /// The EPT paging configuration (precomputed once: it only depends on
    /// the MMU's configuration).
    ept_paging: Paging<PteEpt>,
    seen_root_gen: u64,
    /// Its memslot cache and the frames its faults link as tables.
    caches: MmuCaches,
    dirty_ring: Option<Arc<DirtyRing>>,
}

/// What a vCPU's shadow roots were loaded for: a change of any of it
/// switches roots (KVM's `kvm_mmu_new_pgd`, `kvm_mmu_reset_context`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RootKey {
    ctx: GuestContext,
    /// CR3 as far as it names the tables (with the PCID under CR4.PCIDE,
    /// as KVM's `pgd`).
    pgd: u64,
    pdptes: [u64; 4],
    /// The PCID (0 without CR4.PCIDE): INVPCID names roots by it.
    pcid: u16,
}

/// Guest TLB flushes the shadow MMU must answer with a sync before the
/// next access (KVM's `KVM_REQ_MMU_SYNC`, `KVM_REQ_TLB_FLUSH_GUEST` and
/// `kvm_mmu_invalidate_addr`).
#[derive(Debug, Default)]
struct SyncRequests {
    /// Sync the current roots (a flushing CR3 load, a root load).
    current: bool,
    /// Sync every root, current and cached (INVPCID of all contexts, a
    /// CR4.PGE toggle).
    all: bool,
    /// Sync the roots of these PCIDs (INVPCID single context).
    pcids: Vec<u16>,
    /// Sync one address in the roots of a PCID, or every root (INVLPG,
    /// INVPCID of one address).
    addrs: Vec<(u64, Option<u16>)>,
}

/// Address syncs kept before they become one sync of everything.
const MAX_PENDING_ADDRS: usize = 64;

/// Roots kept besides the current ones (KVM's `KVM_MMU_NUM_PREV_ROOTS`).
pub const PREV_ROOTS: usize = 3;

/// A vCPU's view of the shadow MMU: its current roots and the
/// `prev_roots` cache, most recently used first.
struct ShadowState {
    mmu: Arc<ShadowMmu>,
    current: Option<(RootKey, ShadowRoots)>,
    prev: std::collections::VecDeque<(RootKey, ShadowRoots)>,
    seen_root_gen: u64,
    requests: SyncRequests,
    /// The store being made is a string instruction's (`rep stos`), which
    /// KVM does not consider a page-table write.
    string_op: bool,
    /// Where the last unprotect-and-retry happened (KVM's
    /// `last_retry_addr`): a second fault there is emulated.
    last_retry: Option<u64>,
    /// The hardware's paging configuration for walking the shadow tables.
    hw: Paging<Pte64>,
    /// Frames for the shadow pages its faults and root loads create,
    /// topped up before `mmu_lock`.
    tables: MmuMemoryCache,
}

impl ShadowState {
    fn roots(&self) -> Option<&ShadowRoots> {
        self.current.as_ref().map(|(_, r)| r)
    }

    /// Answers the guest's TLB flushes since the last access with syncs of
    /// the unsync pages they cover.
    fn process_sync_requests(&mut self) {
        let r = std::mem::take(&mut self.requests);
        if !r.current && !r.all && r.pcids.is_empty() && r.addrs.is_empty() {
            return;
        }
        let current = self.current.iter().map(|c| (c, true));
        for ((key, roots), is_current) in current.chain(self.prev.iter().map(|c| (c, false))) {
            if r.all || (is_current && r.current) || r.pcids.contains(&key.pcid) {
                self.mmu.sync_roots(roots);
                continue;
            }
            for &(va, pcid) in &r.addrs {
                if pcid.is_none_or(|p| p == key.pcid) {
                    self.mmu.sync_addr(roots, va);
                }
            }
        }
    }

    fn release_all(&mut self) {
        for (_, r) in self.current.take().into_iter().chain(self.prev.drain(..)) {
            self.mmu.release_roots(r);
        }
    }
}

/// A run of accesses during which the vCPU stays in guest mode, as a
/// processor stays in VMX non-root operation from one instruction to the
/// next. Outside a session every [`Vcpu::access`] enters guest mode and
/// leaves it again, which costs the entry's full barrier each time; in a
/// session only the first access enters, and the mode is left at an exit
/// (an EPT violation, a shadow #PF, a root reload) or when the session
/// ends.
///
/// A remote TLB flush waits for every vCPU in guest mode to acknowledge
/// it, and a vCPU in a session acknowledges at its next access. So **a
/// session must not be held across a wait for another thread** (a lock, a
/// channel, a sleep): the thread waited for may be a flusher waiting for
/// this vCPU. Only accesses can be made through a session (it borrows the
/// vCPU), which keeps every other vCPU operation, and everything that takes
/// `mmu_lock`, outside guest mode. An access the guest faults on leaves
/// the vCPU in guest mode (a #PF is delivered inside the guest); end the
/// session before the guest's fault handler waits for anything.
#[must_use = "a session leaves guest mode when dropped"]
pub struct GuestSession<'a> {
    vcpu: &'a mut Vcpu,
}

impl GuestSession<'_> {
    /// [`Vcpu::access`], staying in guest mode after it completes.
    #[inline]
    pub fn access(
        &mut self,
        gva: u64,
        kind: AccessKind,
        cpl: u8,
        ac: bool,
        size: usize,
        value: u64,
    ) -> Result<AccessResult, VcpuError> {
        self.vcpu.access(gva, kind, cpl, ac, size, value)
    }

    /// The vCPU, to read (its counters, registers, TLB).
    pub fn vcpu(&self) -> &Vcpu {
        self.vcpu
    }
}

impl Drop for GuestSession<'_> {
    fn drop(&mut self) {
        self.vcpu.session = false;
        self.vcpu.exit_guest();
    }
}

/// A vCPU on the TDP or the shadow MMU.
pub struct Vcpu {
    backend: Backend,
    slots: Arc<MemslotTable>,
    features: CpuFeatures,
    regs: ControlRegs,
    cr3: u64,
    pdptes: [u64; 4],
    pkru: u32,
    paging: GuestPaging,
    tlb: Tlb,
    vpid: u16,
    mode: Arc<VcpuMode>,
    /// The host memory the MMU maps (the MMU's arena).
    arena: Arc<FrameArena>,
    seen_flush_gen: u64,
    /// In guest mode now (between the entry and the exit of an access, or
    /// between accesses of a [`GuestSession`]).
    in_guest: bool,
    /// A [`GuestSession`] is open: accesses stay in guest mode.
    session: bool,
    /// The roots match the registers and no sync is pending: until the
    /// MMU's root generation moves, an access needs no reload.
    settled: bool,
    /// The TLB tag while settled (it names the root and the PCID, which
    /// only change while unsettled).
    settled_tag: TlbTag,
    stats: VcpuStats,
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.exit_guest();
        match &mut self.backend {
            Backend::Tdp(t) => t.mmu.remote_tlb().unregister(&self.mode),
            Backend::Shadow(s) => {
                s.mmu.remote_tlb().unregister(&self.mode);
                s.release_all();
            }
        }
    }
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("regs", &self.regs)
            .field("cr3", &self.cr3)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// A vCPU with paging off, on address space 0 of `mmu`.
    pub fn new(mmu: Arc<TdpMmu>, slots: Arc<MemslotTable>, features: CpuFeatures, vpid: u16) -> Result<Vcpu, TdpError> {
        let geometry = mmu.config().geometry;
        if geometry.bits_per_level != 9 || !matches!(geometry.levels, 4 | 5) {
            // The hardware model walks the tree as EPT.
            return Err(TdpError::NotEptGeometry { geometry });
        }
        let root = mmu.get_root(0)?;
        let ept_paging = Paging::ept(geometry.levels, mmu.config().ad, &CpuFeatures::default());
        let mode = mmu.remote_tlb().register();
        let seen_flush_gen = mmu.remote_tlb().generation();
        let backend = Backend::Tdp(TdpState {
            dirty_ring: mmu.dirty_ring_size().map(|size| Arc::new(DirtyRing::new(size))),
            seen_root_gen: mmu.root_generation(),
            root,
            ept_paging,
            caches: mmu.vcpu_caches(),
            mmu,
        });
        Ok(Vcpu::with_backend(backend, mode, seen_flush_gen, slots, features, vpid))
    }

    /// A vCPU with paging off on the shadow MMU `mmu`, address space 0.
    /// Its roots are loaded at the first access.
    pub fn new_shadow(mmu: Arc<ShadowMmu>, slots: Arc<MemslotTable>, features: CpuFeatures, vpid: u16) -> Vcpu {
        let arena = mmu.arena().clone();
        let mode = mmu.remote_tlb().register();
        let seen_flush_gen = mmu.remote_tlb().generation();
        let regs = ControlRegs::default();
        let backend = Backend::Shadow(ShadowState {
            seen_root_gen: mmu.root_generation(),
            mmu,
            current: None,
            prev: std::collections::VecDeque::new(),
            requests: SyncRequests::default(),
            string_op: false,
            last_retry: None,
            hw: hw_paging(&regs, &features, 4),
            tables: MmuMemoryCache::new(arena),
        });
        Vcpu::with_backend(backend, mode, seen_flush_gen, slots, features, vpid)
    }

    fn with_backend(
        backend: Backend,
        mode: Arc<VcpuMode>,
        seen_flush_gen: u64,
        slots: Arc<MemslotTable>,
        features: CpuFeatures,
        vpid: u16,
    ) -> Vcpu {
        let regs = ControlRegs::default();
        let arena = match &backend {
            Backend::Tdp(t) => t.mmu.arena().clone(),
            Backend::Shadow(s) => s.mmu.arena().clone(),
        };
        Vcpu {
            arena,
            backend,
            mode,
            seen_flush_gen,
            in_guest: false,
            session: false,
            settled: false,
            settled_tag: TlbTag::default(),
            slots,
            features,
            regs,
            cr3: 0,
            pdptes: [0; 4],
            pkru: 0,
            paging: GuestPaging::new(&regs, &features),
            tlb: Tlb::new(TlbConfig::default()),
            vpid,
            stats: VcpuStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> VcpuStats {
        self.stats
    }

    /// The TDP root this vCPU runs on (`None` on the shadow MMU).
    pub fn root(&self) -> Option<&RootRef> {
        match &self.backend {
            Backend::Tdp(t) => Some(&t.root),
            Backend::Shadow(_) => None,
        }
    }

    /// The frame of the shadow table the hardware walk starts from (`None`
    /// on the TDP MMU, or before the first access).
    pub fn shadow_root(&self) -> Option<Pfn> {
        match &self.backend {
            Backend::Shadow(s) => s.roots().map(ShadowRoots::hw_root),
            Backend::Tdp(_) => None,
        }
    }

    /// The TLB.
    pub fn tlb(&self) -> &Tlb {
        &self.tlb
    }

    /// The control registers.
    pub fn regs(&self) -> ControlRegs {
        self.regs
    }

    /// CR3.
    pub fn cr3(&self) -> u64 {
        self.cr3
    }

    /// PKRU.
    pub fn pkru(&self) -> u32 {
        self.pkru
    }

    /// The processor's paging features.
    pub fn features(&self) -> CpuFeatures {
        self.features
    }

    /// Sets CR0, CR4 and EFER together (as at VM entry), and CR3 and PKRU,
    /// flushing everything (KVM's `kvm_mmu_reset_context`).
    pub fn set_state(&mut self, regs: ControlRegs, cr3: u64, pkru: u32) -> Result<(), VcpuError> {
        self.regs = regs;
        self.pkru = pkru;
        self.paging = GuestPaging::new(&regs, &self.features);
        self.tlb.flush(Flush::Everything);
        self.settled = false;
        self.mov_cr3(cr3)
    }

    /// MOV to CR0 changing only CR0.WP: no invalidation (rights are
    /// re-checked at every access; SDM 4.10.4.1).
    pub fn set_cr0_wp(&mut self, wp: bool) {
        self.regs.cr0.set(Cr0::WP, wp);
        self.paging = GuestPaging::new(&self.regs, &self.features);
        self.unsettle();
    }

    /// The registers changed: the first-level TLB's decisions go, and the
    /// next access checks the roots (and on the shadow MMU, its syncs).
    fn unsettle(&mut self) {
        self.settled = false;
        self.tlb.clear_l1();
    }

    /// WRPKRU: the protection-key rights register. Nothing is invalidated
    /// (the TLB caches rights and keys, and every access is checked
    /// against the current PKRU; SDM 4.10.2.2), and nothing exits: the MMU
    /// never learns of it.
    pub fn set_pkru(&mut self, pkru: u32) {
        self.pkru = pkru;
        self.unsettle();
    }

    /// MOV to CR4 of SMEP/SMAP/PGE. A change of PGE flushes everything,
    /// global translations included.
    pub fn set_cr4_bits(&mut self, smep: Option<bool>, smap: Option<bool>, pge: Option<bool>) {
        let old_pge = self.regs.cr4.contains(Cr4::PGE);
        for (v, bit) in [(smep, Cr4::SMEP), (smap, Cr4::SMAP), (pge, Cr4::PGE)] {
            if let Some(v) = v {
                self.regs.cr4.set(bit, v);
            }
        }
        if self.regs.cr4.contains(Cr4::PGE) != old_pge {
            self.tlb.flush(Flush::All(self.tag()));
            if let Backend::Shadow(s) = &mut self.backend {
                s.requests.all = true;
            }
        }
        self.paging = GuestPaging::new(&self.regs, &self.features);
        self.unsettle();
    }

    fn pcid(&self) -> u16 {
        if self.regs.cr4.contains(Cr4::PCIDE) {
            (self.cr3 & CR3_PCID_MASK) as u16
        } else {
            0
        }
    }

    fn tag(&self) -> TlbTag {
        TlbTag {
            vpid: self.vpid,
            // Shadow paging has no EPTP: translations follow the guest's
            // PCIDs, and the MMU's zaps flush them remotely.
            eptp: match &self.backend {
                Backend::Tdp(t) => t.root.root().pfn().raw(),
                Backend::Shadow(_) => 0,
            },
            pcid: self.pcid(),
        }
    }

    /// MOV to CR3 (KVM's `kvm_mmu_new_pgd`): with PCIDE, bit 63 means no
    /// flush; otherwise the new PCID's non-global translations go. In PAE
    /// paging the PDPTE registers are loaded here.
    pub fn mov_cr3(&mut self, value: u64) -> Result<(), VcpuError> {
        // A sync the last instruction asked for of the current root is done
        // before this one runs: KVM processes KVM_REQ_MMU_SYNC at the VM
        // entry between two intercepted MOV CR3s. Left pending, it would
        // apply to the next CR3's root, and a return to this one without a
        // flush (PCID no-flush) would find its unsync pages stale.
        if let Backend::Shadow(s) = &self.backend
            && s.requests.current
        {
            self.reload_root_if_obsolete()?;
        }
        let pcide = self.regs.cr4.contains(Cr4::PCIDE);
        let noflush = pcide && value & CR3_NOFLUSH != 0;
        self.cr3 = if pcide { value & !CR3_NOFLUSH } else { value };
        self.settled = false;
        if !noflush {
            self.tlb.flush(Flush::Pcid(self.tag()));
            if let Backend::Shadow(s) = &mut self.backend {
                s.requests.current = true;
            }
        }
        if self.paging.mode() == PagingMode::Pae {
            self.load_pdptes()?;
        }
        Ok(())
    }

    fn load_pdptes(&mut self) -> Result<(), VcpuError> {
        let base = self.cr3 & CR3_PAE_PDPT_MASK;
        if let Backend::Shadow(s) = &self.backend {
            // Read from guest memory (with no memslot, as zeros).
            for (i, p) in self.pdptes.iter_mut().enumerate() {
                *p = s.mmu.memory().read_u64(Gpa::new(base + 8 * i as u64)).unwrap_or(0);
            }
            return Ok(());
        }
        let mut last = None;
        for _ in 0..MAX_RETRIES {
            self.reload_root_if_obsolete()?;
            self.enter_guest();
            let _epoch = crossbeam_epoch::pin();
            let mut pdptes = [0u64; 4];
            let exit = {
                let mem = self.guest_memory(EptStage::NoLinearAddress);
                pdptes.iter_mut().enumerate().find_map(|(i, p)| {
                    match mem.read_entry(Gpa::new(base + 8 * i as u64), EntrySize::Eight) {
                        Ok(v) => {
                            *p = v;
                            None
                        }
                        Err(e) => Some(e),
                    }
                })
            };
            self.exit_guest();
            match exit {
                None => {
                    self.pdptes = pdptes;
                    return Ok(());
                }
                Some(e) => {
                    last = Some(e);
                    self.handle_exit(e)?;
                }
            }
        }
        Err(VcpuError::NoProgress { gva: base, last })
    }

    /// INVLPG.
    pub fn invlpg(&mut self, va: u64) {
        let va = self.linear(va);
        self.tlb.flush(Flush::Page { va, tag: self.tag() });
        // KVM syncs the address in every root of the vCPU
        // (`KVM_MMU_ROOTS_ALL`).
        self.request_addr_sync(va, None);
    }

    /// INVPCID of `kind` 0..=3 with descriptor (`pcid`, `va`).
    pub fn invpcid(&mut self, kind: u8, pcid: u16, va: u64) {
        let tag = TlbTag { pcid, ..self.tag() };
        let flush = match kind {
            0 => Flush::PcidPage { va, tag },
            1 => Flush::Pcid(tag),
            2 => Flush::All(tag),
            _ => Flush::AllNonGlobal(tag),
        };
        self.tlb.flush(flush);
        match kind {
            0 => self.request_addr_sync(va, Some(pcid)),
            1 => {
                if let Backend::Shadow(s) = &mut self.backend {
                    s.requests.pcids.push(pcid);
                }
            }
            _ => {
                if let Backend::Shadow(s) = &mut self.backend {
                    s.requests.all = true;
                }
            }
        }
        self.settled = false;
    }

    fn request_addr_sync(&mut self, va: u64, pcid: Option<u16>) {
        self.settled = false;
        if let Backend::Shadow(s) = &mut self.backend {
            let r = &mut s.requests;
            if r.addrs.len() < MAX_PENDING_ADDRS {
                r.addrs.push((va, pcid));
            } else {
                r.all = true;
            }
        }
    }

    /// INVEPT executed by the VMM on this (physical) CPU: drops the
    /// combined mappings the type names. The MMU's own flushes already
    /// reach every vCPU through the remote-flush protocol; this is for a
    /// VMM that manages EPTPs itself (e.g. when it changes the EPTP).
    pub fn invept(&mut self, kind: Invept) {
        match kind {
            Invept::SingleContext(eptp) => self.tlb.flush(Flush::Eptp(eptp.root() >> 12)),
            Invept::AllContext => self.tlb.flush(Flush::Everything),
        }
    }

    /// INVVPID executed by the VMM on this CPU (KVM's `vpid_sync_*`).
    pub fn invvpid(&mut self, kind: Invvpid) -> Result<(), InvalidationError> {
        let flush = match kind {
            Invvpid::IndividualAddress { vpid: 0, .. }
            | Invvpid::SingleContext(0)
            | Invvpid::SingleContextRetainingGlobals(0) => return Err(InvalidationError::VpidZero),
            // The modelled processor supports 5-level paging: linear
            // addresses are 57 bits wide.
            Invvpid::IndividualAddress { va, .. } if !is_canonical(va, 57) => {
                return Err(InvalidationError::NonCanonical(va));
            }
            Invvpid::IndividualAddress { vpid, va } => Flush::VpidPage { vpid, va },
            Invvpid::SingleContext(vpid) => Flush::Vpid(vpid),
            Invvpid::SingleContextRetainingGlobals(vpid) => Flush::VpidNonGlobal(vpid),
            Invvpid::AllContext => {
                // Every VPID but 0: this TLB holds this vCPU's VPID (never 0
                // for a guest) and nothing of the host.
                self.tlb.flush(Flush::Everything);
                return Ok(());
            }
        };
        self.tlb.flush(flush);
        Ok(())
    }

    /// This vCPU's dirty ring, when the MMU has the dirty ring enabled: the
    /// VMM harvests it.
    pub fn dirty_ring(&self) -> Option<&Arc<DirtyRing>> {
        match &self.backend {
            Backend::Tdp(t) => t.dirty_ring.as_ref(),
            Backend::Shadow(_) => None,
        }
    }

    /// This vCPU's VPID.
    pub fn vpid(&self) -> u16 {
        self.vpid
    }

    fn tdp(&self) -> &TdpState {
        match &self.backend {
            Backend::Tdp(t) => t,
            Backend::Shadow(_) => unreachable!("a TDP path on a shadow vCPU"),
        }
    }

    fn ept(&self) -> EptTranslator<'_> {
        let t = self.tdp();
        EptTranslator::with_paging(t.mmu.arena(), Hpa::new(t.root.root().pfn().raw() << 12), t.ept_paging)
    }

    fn guest_memory(&self, stage: EptStage) -> EptGuestMemory<'_> {
        EptGuestMemory {
            ept: self.ept(),
            slots: &self.slots,
            as_id: self.tdp().root.root().as_id(),
            stage,
        }
    }

    /// Processes the obsolete-root request (outside guest mode): drops an
    /// invalidated root and loads the address space's valid one. On the
    /// shadow MMU also (re)loads the roots when the guest context, CR3 or
    /// the PDPTEs changed.
    fn reload_root_if_obsolete(&mut self) -> Result<(), VcpuError> {
        match &mut self.backend {
            Backend::Tdp(t) => {
                let generation = t.mmu.root_generation();
                if generation != t.seen_root_gen {
                    if !t.root.root().is_valid() && !crate::sync::bug(crate::sync::Bug::KeepObsoleteRoot) {
                        let old = t.root.root().pfn().raw();
                        // Out of frames for the new root: the request stays
                        // pending (the generation unseen) and the next
                        // entry tries again, rather than running on the
                        // invalid root, whose faults retry forever.
                        t.root = t.mmu.get_root(t.root.root().as_id())?;
                        self.tlb.flush(Flush::Eptp(old));
                        self.stats.root_reloads += 1;
                    }
                    t.seen_root_gen = generation;
                }
            }
            Backend::Shadow(s) => {
                let ctx = GuestContext::new(&self.regs, false);
                let pcide = self.regs.cr4.contains(Cr4::PCIDE);
                let key = RootKey {
                    ctx,
                    pgd: if pcide { self.cr3 } else { self.cr3 & !CR3_PCID_MASK },
                    pdptes: self.pdptes,
                    pcid: if pcide { (self.cr3 & CR3_PCID_MASK) as u16 } else { 0 },
                };
                let generation = s.mmu.root_generation();
                if generation != s.seen_root_gen {
                    // Some root was zapped: drop every obsolete one, the
                    // current roots and the cached ones alike.
                    s.seen_root_gen = generation;
                    if s.roots().is_some_and(|r| s.mmu.roots_obsolete(r))
                        && !crate::sync::bug(crate::sync::Bug::KeepObsoleteRoot)
                    {
                        let (_, r) = s
                            .current
                            .take()
                            .expect("`s.roots().is_some_and(..)` just saw current roots");
                        s.mmu.release_roots(r);
                        self.tlb.flush(Flush::Vpid(self.vpid));
                        self.stats.root_reloads += 1;
                    }
                    let (keep, drop): (Vec<_>, Vec<_>) = s.prev.drain(..).partition(|(_, r)| !s.mmu.roots_obsolete(r));
                    s.prev = keep.into();
                    for (_, r) in drop {
                        s.mmu.release_roots(r);
                    }
                }
                let current_key = s.current.as_ref().map(|(k, _)| *k);
                if current_key != Some(key) {
                    // A new guest context (CR0.WP, SMEP, SMAP, EFER.NX,
                    // mode) means new roles: translations cached from the
                    // old shadow pages may grant more than the new context
                    // allows (the CR0.WP = 0 emulation), so they go, as
                    // KVM flushes when it loads a new root. A CR3 change
                    // alone keeps the PCID semantics `mov_cr3` applied.
                    //
                    // KVM unloads every root on a context change and syncs
                    // at the reload; here cached roots of the old context
                    // stay, so returning to one syncs it: its unsync pages
                    // may hold what a flush in the other context (or a
                    // #PF there) removed.
                    if current_key.is_some_and(|old| old.ctx != ctx) {
                        self.tlb.flush(Flush::Vpid(self.vpid));
                        s.requests.current = true;
                    }
                    // KVM's fast_pgd_switch: a recent address space's roots
                    // are reused without rebuilding (KVM keeps prev_roots
                    // for 4- and 5-level guests only; here the PDPTEs are
                    // part of the key, so PAE and 32-bit guests get them
                    // too).
                    let hit = s
                        .prev
                        .iter()
                        .position(|(k, _)| *k == key)
                        .and_then(|i| s.prev.remove(i));
                    if let Some(cur) = s.current.take() {
                        s.prev.push_front(cur);
                    }
                    let next = match hit {
                        Some(cached) => {
                            MmuStats::inc(&s.mmu.stats().local().prev_roots_hit);
                            cached
                        }
                        None => {
                            // A root load syncs what it links (KVM's
                            // `kvm_mmu_load`).
                            s.requests.current = true;
                            (key, s.mmu.load_roots(&ctx, 0, key.pgd, self.pdptes, &mut s.tables)?)
                        }
                    };
                    while s.prev.len() > PREV_ROOTS {
                        let (_, r) = s
                            .prev
                            .pop_back()
                            .expect("the loop runs only while prev holds more than PREV_ROOTS roots");
                        s.mmu.release_roots(r);
                    }
                    s.hw = hw_paging(&self.regs, &self.features, next.1.levels());
                    self.tlb.clear_l1();
                    s.current = Some(next);
                }
                s.process_sync_requests();
            }
        }
        Ok(())
    }

    /// Enters guest mode, first flushing the translations made through this
    /// MMU if it asked for a remote flush since the last entry (KVM's
    /// `KVM_REQ_TLB_FLUSH` processed at VM entry). Already in guest mode
    /// (a [`GuestSession`] between accesses), it answers a flush asked for
    /// since its last access instead, as a processor answers the flush IPI
    /// between two instructions.
    #[inline]
    fn enter_guest(&mut self) {
        let (remote, flush) = match &self.backend {
            Backend::Tdp(t) => (t.mmu.remote_tlb(), Flush::Eptp(t.root.root().pfn().raw())),
            Backend::Shadow(s) => (s.mmu.remote_tlb(), Flush::Vpid(self.vpid)),
        };
        if self.in_guest {
            let generation = remote.requested();
            if generation != self.seen_flush_gen {
                self.seen_flush_gen = generation;
                if !crate::sync::bug(crate::sync::Bug::AckWithoutFlush) {
                    self.tlb.flush(flush);
                }
                self.stats.remote_flushes += 1;
                self.mode.acknowledge(generation);
            }
            return;
        }
        let generation = self.mode.enter(remote);
        self.in_guest = true;
        if generation != self.seen_flush_gen {
            self.seen_flush_gen = generation;
            self.tlb.flush(flush);
            self.stats.remote_flushes += 1;
        }
    }

    /// Leaves guest mode (a VM exit) if in it: from here the vCPU may wait
    /// for `mmu_lock`, and flushes need not wait for it.
    #[inline]
    fn exit_guest(&mut self) {
        if self.in_guest {
            self.in_guest = false;
            self.mode.exit();
        }
    }

    /// Whether the MMU dropped roots since this vCPU last looked.
    #[inline]
    fn roots_changed(&self) -> bool {
        match &self.backend {
            Backend::Tdp(t) => t.mmu.root_generation() != t.seen_root_gen,
            Backend::Shadow(s) => s.mmu.root_generation() != s.seen_root_gen,
        }
    }

    /// Opens a run of accesses in guest mode (see [`GuestSession`]).
    pub fn session(&mut self) -> GuestSession<'_> {
        self.session = true;
        GuestSession { vcpu: self }
    }

    /// Hands an exit to the MMU (outside guest mode).
    fn handle_exit(&mut self, exit: EptExit) -> Result<FaultOutcome, VcpuError> {
        let (write, exec, present) = match exit {
            EptExit::Violation { qual, .. } => {
                self.stats.ept_violations += 1;
                (
                    qual.contains(EptViolationQual::WRITE),
                    qual.contains(EptViolationQual::FETCH),
                    qual.intersects(
                        EptViolationQual::READABLE | EptViolationQual::WRITABLE | EptViolationQual::EXECUTABLE,
                    ),
                )
            }
            EptExit::Misconfig { .. } => {
                self.stats.ept_misconfigs += 1;
                (false, false, true)
            }
        };
        let fault = TdpFault {
            gpa: exit.gpa(),
            write,
            exec,
            present,
        };
        let Backend::Tdp(t) = &mut self.backend else {
            unreachable!("an EPT exit on a shadow vCPU")
        };
        Ok(t.mmu
            .page_fault(&t.root, fault, &mut t.caches, t.dirty_ring.as_deref())?)
    }

    /// One access of `size` (1..=8) bytes at `gva`, as the instruction at
    /// `cpl` with RFLAGS.AC = `ac` makes it; a write stores the low `size`
    /// bytes of `value`. An access that crosses a page is split in two.
    ///
    /// With the dirty ring enabled, a vCPU whose ring reached its soft
    /// limit does not run: the access returns
    /// [`AccessResult::DirtyRingFull`] without touching anything.
    #[inline]
    pub fn access(
        &mut self,
        gva: u64,
        kind: AccessKind,
        cpl: u8,
        ac: bool,
        size: usize,
        value: u64,
    ) -> Result<AccessResult, VcpuError> {
        if self.in_guest
            && self.session
            && (1..=8).contains(&size)
            && (gva & 0xfff) as usize + size <= 0x1000
            && let Some(done) = self.fast_access(gva, Access::new(kind, cpl, ac), size, value)
        {
            return Ok(done);
        }
        self.access_slow(gva, kind, cpl, ac, size, value)
    }

    /// The access of a vCPU already in guest mode (in a [`GuestSession`])
    /// that the first-level TLB serves, with nothing to process first: no
    /// register change, no root the MMU dropped, a full dirty ring or a
    /// remote flush in the way (a flush is acknowledged here, which empties
    /// the TLB and leaves the access to the slow path).
    #[inline]
    fn fast_access(&mut self, gva: u64, access: Access, size: usize, value: u64) -> Option<AccessResult> {
        let (remote, roots_moved, va) = match &self.backend {
            Backend::Tdp(t) => (
                t.mmu.remote_tlb(),
                t.mmu.root_generation() != t.seen_root_gen || t.dirty_ring.as_ref().is_some_and(|r| r.soft_full()),
                gva,
            ),
            Backend::Shadow(s) => (
                s.mmu.remote_tlb(),
                s.mmu.root_generation() != s.seen_root_gen,
                self.linear(gva),
            ),
        };
        if !self.settled || roots_moved || remote.requested() != self.seen_flush_gen {
            return None;
        }
        let hit = self.tlb.lookup_l1(va, self.settled_tag, access_class(access)?)?;
        self.stats.accesses += 1;
        self.stats.tlb_hits += 1;
        Some(self.touch(hit.hpa, Gpa::new(hit.gpa), access.is_write(), size, value))
    }

    #[inline(never)]
    fn access_slow(
        &mut self,
        gva: u64,
        kind: AccessKind,
        cpl: u8,
        ac: bool,
        size: usize,
        value: u64,
    ) -> Result<AccessResult, VcpuError> {
        if !(1..=8).contains(&size) {
            return Err(VcpuError::InvalidAccessSize { gva, size });
        }
        if self.dirty_ring().is_some_and(|r| r.soft_full()) {
            // An exit to the VMM.
            self.exit_guest();
            return Ok(AccessResult::DirtyRingFull);
        }
        self.access_split(gva, kind, cpl, ac, size, value)
    }

    /// `rep stosq`: stores `value` to quadwords from `regs.rdi`, `regs.rcx`
    /// of them, advancing RDI and counting RCX down store by store as the
    /// processor does, and stopping at the first store that does not
    /// complete (its result is returned; `regs` then say where the
    /// instruction resumes, as after an exit in the middle of a string
    /// instruction: the VMM re-enters and the stores already done are not
    /// done again). On the shadow MMU a string store that hits a
    /// write-protected guest table unprotects the table and retries instead
    /// of being emulated (KVM's `EMULTYPE_ALLOW_RETRY_PF` for instructions
    /// that are not page-table writes): a guest clearing a freed table page
    /// for reuse pays one exit, not one per store.
    pub fn rep_stos(&mut self, regs: &mut StringRegs, value: u64) -> Result<AccessResult, VcpuError> {
        if let Backend::Shadow(s) = &mut self.backend {
            s.string_op = true;
        }
        // One instruction: the vCPU stays in guest mode from one store to
        // the next (a store that exits leaves it, as any exit does).
        let in_session = std::mem::replace(&mut self.session, true);
        let mut result = Ok(AccessResult::Done {
            gpa: Gpa::new(0),
            value: 0,
            mmio: false,
        });
        while regs.rcx > 0 {
            result = self.access(regs.rdi, AccessKind::Write, 0, false, 8, value);
            if !matches!(result, Ok(AccessResult::Done { .. })) {
                break;
            }
            regs.rdi = regs.rdi.wrapping_add(8);
            regs.rcx -= 1;
        }
        self.session = in_session;
        if !in_session {
            self.exit_guest();
        }
        if let Backend::Shadow(s) = &mut self.backend {
            s.string_op = false;
        }
        result
    }

    fn access_split(
        &mut self,
        gva: u64,
        kind: AccessKind,
        cpl: u8,
        ac: bool,
        size: usize,
        value: u64,
    ) -> Result<AccessResult, VcpuError> {
        debug_assert!((1..=8).contains(&size), "`access` checked the size");
        let in_page = (0x1000 - (gva & 0xfff)) as usize;
        if size > in_page {
            let low = self.access_split(gva, kind, cpl, ac, in_page, value)?;
            let AccessResult::Done {
                value: v0, gpa: gpa0, ..
            } = low
            else {
                return Ok(low);
            };
            // The second page: in IA-32e paging the linear address wraps
            // at 2^64 (a canonical access may straddle the top of the
            // address space); in legacy modes `linear`/the walker keep 32
            // bits, so it wraps at 4 GiB.
            let high = self.access_split(
                gva.wrapping_add(in_page as u64),
                kind,
                cpl,
                ac,
                size - in_page,
                value >> (8 * in_page),
            )?;
            return Ok(match high {
                AccessResult::Done { value: v1, mmio, .. } => AccessResult::Done {
                    gpa: gpa0,
                    value: v0 | v1 << (8 * in_page),
                    mmio,
                },
                fault => fault,
            });
        }
        self.stats.accesses += 1;
        let access = Access::new(kind, cpl, ac);
        let mut last = None;
        // Consecutive exits the MMU answered as fixed, the same exit again.
        let mut stuck = 0u32;
        let mut fixed: Option<Option<EptExit>> = None;
        for retry in 0..MAX_RETRIES {
            if retry >= YIELD_AFTER {
                self.exit_guest();
                crate::sync::yield_now();
            }
            if !self.settled || self.roots_changed() {
                // A request to process first: outside guest mode (it may
                // take `mmu_lock`, which a flusher waiting for this vCPU
                // may hold).
                self.exit_guest();
                self.reload_root_if_obsolete()?;
                self.settled = true;
                self.settled_tag = self.tag();
            }
            self.enter_guest();
            let attempt = match self.backend {
                Backend::Tdp(_) => self.attempt(gva, access, size, value),
                Backend::Shadow(_) => self.attempt_shadow(gva, access, size, value),
            };
            if !matches!(attempt, Attempt::Done(_)) || !self.session {
                self.exit_guest();
            }
            let exit = match attempt {
                Attempt::Done(result) => return Ok(result),
                Attempt::ShadowExit => None,
                Attempt::Exit { exit, .. } => Some(exit),
            };
            if fixed == Some(exit) {
                stuck += 1;
                if stuck >= LIVELOCK_EXITS {
                    return Err(self.livelock(gva, access, stuck, exit));
                }
            } else {
                stuck = 0;
            }
            let answered_fixed = match attempt {
                Attempt::Done(_) => unreachable!("returned above"),
                Attempt::ShadowExit => {
                    self.stats.shadow_exits += 1;
                    match self.handle_shadow_fault(gva, access, size, value)? {
                        ShadowAnswer::Done(result) => return Ok(result),
                        ShadowAnswer::Fixed => true,
                        ShadowAnswer::Retry => false,
                    }
                }
                Attempt::Exit { exit, final_gpa } => {
                    last = Some(exit);
                    let outcome = self.handle_exit(exit)?;
                    if let (FaultOutcome::Mmio | FaultOutcome::ReadOnlySlot, Some(gpa)) = (outcome, final_gpa) {
                        // The VMM emulates the access: reads see 0,
                        // writes are dropped.
                        return Ok(AccessResult::Done {
                            gpa,
                            value: 0,
                            mmio: true,
                        });
                    }
                    matches!(outcome, FaultOutcome::Fixed | FaultOutcome::Spurious)
                }
            };
            fixed = answered_fixed.then_some(exit);
        }
        Err(VcpuError::NoProgress { gva, last })
    }

    /// The error of an access the MMU keeps answering as fixed while the
    /// hardware keeps exiting, with the state that caused it.
    #[cold]
    fn livelock(&self, gva: u64, access: Access, exits: u32, exit: Option<EptExit>) -> VcpuError {
        let state = format!(
            "CR0 {:?}, CR4 {:?}, EFER {:?}, CR3 {:#x}, PKRU {:#x}, paging {:?}, {} MMU, last exit {}",
            self.regs.cr0,
            self.regs.cr4,
            self.regs.efer,
            self.cr3,
            self.pkru,
            self.paging.mode(),
            match self.backend {
                Backend::Tdp(_) => "TDP",
                Backend::Shadow(_) => "shadow",
            },
            exit.map_or_else(|| "a #PF of the shadow walk".to_string(), |e| format!("{e:?}"))
        );
        tracing::error!(target: "kvm_mmu", gva, ?access, exits, %state, "livelock");
        VcpuError::Livelock {
            gva,
            access,
            exits,
            state,
        }
    }

    /// One try of a one-page access in guest mode: TLB, else the
    /// two-dimensional walk; an EPT exit ends the try.
    fn attempt(&mut self, gva: u64, access: Access, size: usize, value: u64) -> Attempt {
        let tag = self.tag();
        let write = access.is_write();
        // A TLB hit reads the data frame without an epoch: no frame a
        // translation in this TLB points at is freed before the flush that
        // removes it, and that flush waits for this vCPU to leave guest mode.
        if let Some(done) = self.tlb_hit(gva, tag, access, size, value) {
            return Attempt::Done(done);
        }
        // Pinned for the rest of the attempt: tables the MMU unlinks
        // meanwhile are not freed under the walk.
        let _epoch = crossbeam_epoch::pin();
        {
            let t = self.tdp();
            let r = t.root.root();
            if !r.is_valid() && r.invalidated_at() <= t.seen_root_gen {
                self.stats.invalid_root_uses += 1;
            }
        }
        let root = self.paging.root(self.cr3, self.pdptes);
        let walk = {
            let mem = self.guest_memory(EptStage::GuestPagingStructure);
            self.paging.walk(&mem, &root, gva, access, self.pkru)
        };
        let walk = match walk {
            Ok(w) => w,
            Err(WalkError::PageFault(pf)) => {
                self.stats.guest_faults += 1;
                return Attempt::Done(AccessResult::Fault(GuestFault::PageFault {
                    error_code: pf.error_code,
                    gva,
                }));
            }
            Err(WalkError::NonCanonical) => {
                self.stats.guest_faults += 1;
                return Attempt::Done(AccessResult::Fault(GuestFault::GeneralProtection));
            }
            Err(WalkError::Memory { error, .. }) => {
                return Attempt::Exit {
                    exit: error,
                    final_gpa: None,
                };
            }
        };
        let ept_walk = match self
            .ept()
            .translate(walk.gpa.raw(), access.kind, EptStage::FinalTranslation)
        {
            Ok(w) => w,
            Err(exit) => {
                return Attempt::Exit {
                    exit,
                    final_gpa: Some(walk.gpa),
                };
            }
        };
        // The TLB entry covers the smaller of the guest page and the EPT page.
        let size_cached = if ept_walk.page_size.bytes() < walk.page_size.bytes() {
            ept_walk.page_size
        } else {
            walk.page_size
        };
        let mask = size_cached.bytes() - 1;
        let ept_rights = ept_walk.rights;
        if ept_rights.contains(AccessRights::USER) {
            let mut rights = walk.rights;
            if !ept_rights.contains(AccessRights::EXEC) {
                rights.remove(AccessRights::EXEC);
            }
            let leaf = walk.leaf().map_or(0, |l| l.pte);
            let global =
                self.regs.cr4.contains(Cr4::PGE) && leaf & PT_GLOBAL != 0 && self.paging.mode() != PagingMode::None;
            self.tlb.insert(TlbEntry {
                va_base: walk.va & !mask,
                size: size_cached,
                tag,
                global,
                hpa_base: Hpa::new(ept_walk.gpa.raw() & !mask),
                gpa_base: walk.gpa.raw() & !mask,
                rights,
                pkey: walk.pkey,
                // A write through an entry whose guest leaf was clean, whose
                // EPT mapping is not writable, or whose EPT leaf is clean
                // (with EPT A/D: the write must set D, dirty logging reads
                // it) must walk again.
                dirty: walk.dirty
                    && ept_rights.contains(AccessRights::WRITE)
                    && (ept_walk.dirty || !self.tdp().mmu.config().ad),
            });
        }
        Attempt::Done(self.touch(Hpa::new(ept_walk.gpa.raw()), walk.gpa, write, size, value))
    }

    /// The access served by a cached translation, if one serves it now.
    /// Rights are cached, not decisions: a hit that would fault, or a write
    /// through a clean entry, drops the entry and walks again.
    #[inline]
    fn tlb_hit(&mut self, gva: u64, tag: TlbTag, access: Access, size: usize, value: u64) -> Option<AccessResult> {
        let class = access_class(access);
        if let Some(class) = class
            && let Some(hit) = self.tlb.lookup_l1(gva, tag, class)
        {
            self.stats.tlb_hits += 1;
            return Some(self.touch(hit.hpa, Gpa::new(hit.gpa), access.is_write(), size, value));
        }
        let e = self.tlb.lookup(gva, tag)?;
        if self.check(access, &e) {
            if let Some(class) = class {
                self.tlb.fill_l1(gva, tag, &e, class);
            }
            self.stats.tlb_hits += 1;
            return Some(self.touch(e.hpa(gva), Gpa::new(e.gpa(gva)), access.is_write(), size, value));
        }
        self.tlb.remove(gva, tag);
        None
    }

    /// Whether a cached translation serves `access` now.
    fn check(&self, access: Access, e: &TlbEntry) -> bool {
        if let Backend::Shadow(s) = &self.backend {
            // The entry holds the shadow SPTE's rights: the hardware's
            // rules apply (CR0.WP forced on), not the guest's.
            return s.hw.check_access(access, e.rights, e.pkey, self.pkru).is_none() && (!access.is_write() || e.dirty);
        }
        let allowed = match &self.paging {
            // No guest paging, but EPT still applies: its execute right is
            // folded into the entry's rights (its write right into `dirty`).
            GuestPaging::None => !access.is_fetch() || e.rights.contains(AccessRights::EXEC),
            GuestPaging::Bits32(p) => p.check_access(access, e.rights, e.pkey, self.pkru).is_none(),
            GuestPaging::Pae64(p, _) => p.check_access(access, e.rights, e.pkey, self.pkru).is_none(),
        };
        allowed && (!access.is_write() || e.dirty)
    }

    /// Reads or writes host memory at `hpa`.
    #[inline]
    fn touch(&mut self, hpa: Hpa, gpa: Gpa, write: bool, size: usize, value: u64) -> AccessResult {
        let (value, freed) = self.arena.data_access(
            Pfn::new(hpa.raw() >> 12),
            hpa.page_offset() as usize,
            size,
            write,
            value,
        );
        if freed {
            self.stats.freed_frame_accesses += 1;
        }
        AccessResult::Done {
            gpa,
            value,
            mmio: false,
        }
    }
}

/// The hardware's paging configuration for walking shadow tables of
/// `levels` levels for a guest with `regs` (as KVM programs the hardware
/// under shadow paging: CR0.WP and EFER.NX on, IA-32e paging; the guest's
/// SMEP and SMAP, except with guest paging off, where neither applies; and
/// CR4.PKE only for an IA-32e guest, the only mode with protection keys).
fn hw_paging(regs: &ControlRegs, features: &CpuFeatures, levels: u8) -> Paging<Pte64> {
    let mut cr4 = Cr4::PAE;
    if levels == 5 {
        cr4 |= Cr4::LA57;
    }
    if regs.mode() != PagingMode::None {
        cr4 |= regs.cr4 & (Cr4::SMEP | Cr4::SMAP);
    }
    if matches!(regs.mode(), PagingMode::Level4 | PagingMode::Level5) {
        cr4 |= regs.cr4 & Cr4::PKE;
    }
    let hw = ControlRegs {
        cr0: regs.cr0 | Cr0::PE | Cr0::PG | Cr0::WP,
        cr4,
        efer: Efer::LME | Efer::LMA | Efer::NXE,
    };
    let mode = if levels == 5 {
        PagingMode::Level5
    } else {
        PagingMode::Level4
    };
    Paging::long_or_pae(mode, &hw, features)
}

impl Vcpu {
    /// One try of a one-page access in guest mode on the shadow MMU: TLB,
    /// else the hardware walk of the shadow tables; a fault of that walk
    /// ends the try.
    fn attempt_shadow(&mut self, gva: u64, access: Access, size: usize, value: u64) -> Attempt {
        let gva = self.linear(gva);
        let tag = self.tag();
        let write = access.is_write();
        // Without an epoch on a hit, as in `attempt`.
        if let Some(done) = self.tlb_hit(gva, tag, access, size, value) {
            return Attempt::Done(done);
        }
        let _epoch = crossbeam_epoch::pin();
        let Backend::Shadow(s) = &self.backend else {
            unreachable!("a shadow attempt on a TDP vCPU")
        };
        let Some(roots) = s.roots() else {
            return Attempt::ShadowExit;
        };
        if s.mmu.roots_obsolete_by_acknowledged_zap(roots, s.seen_root_gen) {
            self.stats.invalid_root_uses += 1;
        }
        let root = Root::Table(Gpa::new(roots.hw_root().raw() << 12));
        let walk = match s
            .hw
            .walk(&super::hw::HostPhys(s.mmu.arena()), &root, gva, access, self.pkru)
        {
            Ok(w) => w,
            Err(WalkError::NonCanonical) => {
                self.stats.guest_faults += 1;
                return Attempt::Done(AccessResult::Fault(GuestFault::GeneralProtection));
            }
            Err(_) => return Attempt::ShadowExit,
        };
        // The guest-physical address: the gfn the leaf was installed for.
        let leaf = walk.entries[walk.level as usize - 1];
        let ptr = SptePtr {
            table: Pfn::new(leaf.pte_gpa.raw() >> 12),
            index: ((leaf.pte_gpa.raw() & 0xfff) / 8) as u16,
        };
        let Some(gfn) = s.mmu.translation_of(ptr) else {
            return Attempt::ShadowExit; // zapped under the walk
        };
        let gpa = Gpa::new(gfn.raw() << 12 | (gva & 0xfff));
        let global = self.regs.cr4.contains(Cr4::PGE) && leaf.pte & PT_GLOBAL != 0;
        self.tlb.insert(TlbEntry {
            va_base: gva & !0xfff,
            size: crate::addr::PageSize::Size4K,
            tag,
            global,
            hpa_base: Hpa::new(walk.gpa.raw() & !0xfff),
            gpa_base: gfn.raw() << 12,
            rights: walk.rights,
            pkey: walk.pkey,
            dirty: walk.dirty,
        });
        Attempt::Done(self.touch(Hpa::new(walk.gpa.raw()), gpa, write, size, value))
    }

    /// The linear address: 32 bits wide outside IA-32e paging.
    fn linear(&self, gva: u64) -> u64 {
        match self.paging.mode() {
            PagingMode::Level4 | PagingMode::Level5 => gva,
            _ => gva & 0xffff_ffff,
        }
    }

    /// A #PF of the shadow walk, handed to the shadow MMU (outside guest
    /// mode): the access ends (a fault for the guest, MMIO, or an emulated
    /// write), or is retried after a fix or a race.
    fn handle_shadow_fault(
        &mut self,
        gva: u64,
        access: Access,
        size: usize,
        value: u64,
    ) -> Result<ShadowAnswer, VcpuError> {
        let groot = self.paging.root(self.cr3, self.pdptes);
        let linear = self.linear(gva);
        let outcome = {
            let Backend::Shadow(state) = &mut self.backend else {
                unreachable!("a shadow fault on a TDP vCPU")
            };
            let ShadowState {
                mmu, current, tables, ..
            } = state;
            let Some((_, roots)) = current.as_ref() else {
                return Ok(ShadowAnswer::Retry);
            };
            mmu.page_fault(roots, &self.paging, &groot, gva, access, self.pkru, tables)?
        };
        let Backend::Shadow(s) = &self.backend else {
            unreachable!("a shadow fault on a TDP vCPU")
        };
        let roots = s.roots().expect("the roots the fault was handled for are still loaded");
        Ok(match outcome {
            ShadowOutcome::Fixed => ShadowAnswer::Fixed,
            ShadowOutcome::Retry => ShadowAnswer::Retry,
            ShadowOutcome::GuestPageFault(error_code) => {
                // A #PF invalidates the address's translations (SDM
                // 4.10.4.1): a stale SPTE of an unsync page goes too
                // (KVM's `kvm_inject_emulated_page_fault`).
                s.mmu.sync_addr(roots, linear);
                self.stats.guest_faults += 1;
                ShadowAnswer::Done(AccessResult::Fault(GuestFault::PageFault { error_code, gva }))
            }
            ShadowOutcome::GuestGeneralProtection => {
                self.stats.guest_faults += 1;
                ShadowAnswer::Done(AccessResult::Fault(GuestFault::GeneralProtection))
            }
            ShadowOutcome::Mmio(gpa) | ShadowOutcome::ReadOnlySlot(gpa) => ShadowAnswer::Done(AccessResult::Done {
                gpa,
                value: 0,
                mmio: true,
            }),
            ShadowOutcome::EmulateWrite(gpa)
                if s.string_op && s.last_retry != Some(gva) && s.mmu.unprotect_gfn_and_retry(gpa) =>
            {
                if let Backend::Shadow(s) = &mut self.backend {
                    s.last_retry = Some(gva);
                }
                ShadowAnswer::Retry
            }
            ShadowOutcome::EmulateWrite(gpa) => {
                s.mmu.emulate_write(gpa, size, value)?;
                ShadowAnswer::Done(AccessResult::Done {
                    gpa,
                    value: 0,
                    mmio: false,
                })
            }
        })
    }
}
