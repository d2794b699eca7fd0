//! A vCPU running an L2 guest for an L1 hypervisor that uses nested
//! paging: the nested MMU (KVM's `kvm_init_shadow_npt_mmu` and
//! `kvm_init_shadow_ept_mmu`).
//!
//! L1 gives its L2 guest nested tables in L1's memory that translate
//! L2-physical to L1-physical addresses: NPT12 (AMD, the VMCB's nCR3) or
//! EPT12 (Intel, VMCS12's EPT pointer). The hardware needs tables that
//! translate L2-physical to host-physical addresses, so L0 shadows L1's
//! with the shadow MMU: NPT02 (the IA-32e format) or EPT02 (EPT format),
//! shadow pages with `role.guest_mode` set, built by the same
//! `ShadowMmu::page_fault` with the L2-physical address where a guest
//! shadow MMU has a linear address, L1's root where it has CR3, and L1's
//! memslots where it has the guest's. The L2 guest's own paging is walked
//! by the hardware model over NPT02/EPT02 (two-dimensional, as on the TDP
//! MMU). A #NPF or EPT violation of that walk goes to the nested MMU: it
//! fixes the shadow from L1's tables, or, when L1's tables do not allow the
//! access, reflects to L1 what L1's tables give for the same access at the
//! same stage (KVM's `nested_svm_inject_npf_exit`, `nested_ept_inject_page_fault`):
//! [`AccessResult::VmExit`], built by re-walking L1's tables
//! ([`NestedPaging::retranslate`]), so the exit qualification, the
//! guest-linear address and EXITINFO1's stage bits are exactly the
//! hardware's.
//!
//! On Intel a PAE L2 guest has PDPTE registers, loaded at VM entry from
//! VMCS12 ([`crate::cpu::vcpu::Vcpu::vm_entry`]) and by MOV to CR3
//! through EPT02 on behalf of no linear address; an EPT violation there is
//! [`VcpuError::ExitToL1`]. On AMD there are none: each walk reads the
//! PDPTE it needs through NPT02.
//!
//! The shadow's roots are cached by L1 root, 3 besides the current (KVM's
//! `prev_roots` across L1's switches between its L2 guests, seed 001).

use std::sync::Arc;

use super::roots::{RootCache, Switch};
use super::{Attempt, Exit, ExitAnswer, GuestFlush, VcpuMmu};
use crate::addr::{Gpa, Gva, Hpa, Pfn};
use crate::arch::control::{CpuFeatures, Cr4, PagingMode};
use crate::arch::ept::Eptp;
use crate::arch::perm::{Access, AccessKind, AccessRights, Privilege};
use crate::arch::pfec::PfErrorCode;
use crate::arch::pte::PT_GLOBAL;
use crate::cpu::hw::HostPhys;
use crate::cpu::state::{AccessResult, CpuState, GuestFault, MAX_RETRIES, VcpuError};
use crate::cpu::tlb::{Flush, TlbEntry};
use crate::host::FrameArena;
use crate::mem::DirtyRing;
use crate::mmu::cache::MmuMemoryCache;
use crate::mmu::flush::RemoteTlb;
use crate::mmu::shadow::role::GuestContext;
use crate::mmu::shadow::roots::ShadowRoots;
use crate::mmu::shadow::{ShadowMmu, ShadowOutcome, WalkerMemory};
use crate::mmu::tdp::RootRef;
use crate::walker::nested::{
    NPF_GUEST_PAGE_TABLE, NestedError, NestedFault, NestedMemory, NestedPaging, NestedStage, NestedVendor,
};
use crate::walker::{CountingMemory, EntrySize, GuestPaging, PtMemory, Root, WalkError};

/// Roots kept besides the current ones (KVM's `KVM_MMU_NUM_PREV_ROOTS`).
pub const NESTED_PREV_ROOTS: usize = 3;

/// L1's nested paging for its L2 guest on AMD, as L1 programs it in the
/// VMCB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct L1Npt {
    /// N_CR3: the L1-physical address of NPT12's top table (PWT/PCD
    /// ignored).
    pub ncr3: u64,
    /// 4 or 5 levels (L1's own paging mode at VMRUN).
    pub levels: u8,
    /// L1's EFER.NXE at VMRUN: without it, bit 63 of an NPT12 entry is
    /// reserved.
    pub nxe: bool,
}

/// A TLB or paging-structure invalidation an L1 hypervisor makes for its
/// L2 guests, intercepted and emulated by L0 on the L2 guest's vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L1Invalidation {
    /// INVEPT single-context: everything derived from the EPTP with this
    /// root (KVM's `handle_invept`: the matching roots are freed, and the
    /// next VM entry loads them again and syncs them).
    InveptSingle(Eptp),
    /// INVEPT all-context: every EPTP's.
    InveptAll,
    /// INVVPID for L2's VPID: its linear translations, one address or all
    /// (EPT-derived structures stay).
    Invvpid(Option<Gva>),
    /// A VMRUN with TLB_CONTROL asking for a flush of L2's ASID: KVM syncs
    /// the nested MMU and flushes (`nested_svm_transition_tlb_flush`;
    /// unlike EPT, SVM's ASID flush invalidates nested-paging mappings).
    TlbControlFlush,
    /// INVLPGA: one L2 linear address of L2's ASID.
    Invlpga(Gva),
}

/// L1's nested paging for its L2 guest: what the nested MMU shadows, and
/// the key of its cached roots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L1Nested {
    /// AMD: NPT12, from the VMCB.
    Npt(L1Npt),
    /// Intel: EPT12, from VMCS12's EPT pointer (root, walk length, A/D).
    Ept(Eptp),
}

impl From<L1Npt> for L1Nested {
    fn from(npt: L1Npt) -> L1Nested {
        L1Nested::Npt(npt)
    }
}

impl From<Eptp> for L1Nested {
    fn from(eptp: Eptp) -> L1Nested {
        L1Nested::Ept(eptp)
    }
}

impl L1Nested {
    /// L1's nested paging at L1-physical `root` as a 4-level hypervisor
    /// (KVM as L1, say) programs it on `vendor`: EPT with accessed and
    /// dirty flags, or NPT with EFER.NXE.
    pub fn four_level(vendor: crate::arch::control::Vendor, root: u64) -> L1Nested {
        match vendor {
            crate::arch::control::Vendor::Intel => Eptp::new(root, 4, true).into(),
            crate::arch::control::Vendor::Amd => L1Npt {
                ncr3: root,
                levels: 4,
                nxe: true,
            }
            .into(),
        }
    }

    /// The shadow MMU's context for L1's tables.
    fn context(&self) -> GuestContext {
        match *self {
            L1Nested::Npt(n) => GuestContext::nested_npt(n.levels, n.nxe),
            L1Nested::Ept(e) => GuestContext::nested_ept(e.levels(), e.ad_enabled()),
        }
    }

    /// The L1-physical address of the top table.
    fn root(&self) -> u64 {
        match *self {
            L1Nested::Npt(n) => n.ncr3 & crate::arch::pte::PT64_ADDR_MASK,
            L1Nested::Ept(e) => e.root(),
        }
    }

    /// L1's tables, rooted in L1's memory.
    fn tables(&self, features: &CpuFeatures) -> NestedPaging {
        match *self {
            L1Nested::Npt(n) => NestedPaging::npt(Hpa::new(n.ncr3), n.levels, n.nxe, features),
            L1Nested::Ept(e) => NestedPaging::ept(Hpa::new(e.root()), e.levels(), e.ad_enabled(), features),
        }
    }

    /// How the hardware walks L0's shadow of them (rooted later): NPT02
    /// with the host's EFER.NXE, or EPT02 with L1's A/D setting (KVM's
    /// `construct_eptp` in guest mode), so that the hardware reports the
    /// accesses L1's own hardware would.
    fn shadow(&self, features: &CpuFeatures) -> NestedPaging {
        match *self {
            L1Nested::Npt(n) => NestedPaging::npt(Hpa::new(0), n.levels, true, features),
            L1Nested::Ept(e) => NestedPaging::ept(Hpa::new(0), e.levels(), e.ad_enabled(), features),
        }
    }
}

/// A vCPU's view of the nested MMU.
pub(crate) struct NestedContext {
    mmu: Arc<ShadowMmu>,
    /// What L1 programmed.
    l1: L1Nested,
    /// L1's tables in L1's memory (for the exits reflected to L1).
    l1_tables: NestedPaging,
    /// L1's tables as the shadow MMU walks them.
    l1_paging: GuestPaging,
    /// How the hardware walks the shadow, at no root yet.
    hw: NestedPaging,
    roots: RootCache<L1Nested>,
    seen_root_gen: u64,
    /// Frames for the shadow pages its faults and root loads create.
    tables: MmuMemoryCache,
    /// The L1 table a guest paging-structure write was last unprotected
    /// for (KVM's `last_retry_addr`): the same write again is emulated.
    last_retry: Option<Gpa>,
    /// The current roots' unsync pages must be synced before the next
    /// access (a flushing VMRUN).
    sync_pending: bool,
}

/// L1's memory as an emulated L2 page walk uses it: reads as the shadow
/// MMU's walker reads (zero where there is no memslot), A/D updates as
/// emulated compare-exchanges that keep the shadow of a written L1 table
/// coherent.
struct EmulatedL1<'a>(&'a ShadowMmu);

impl PtMemory for EmulatedL1<'_> {
    type Error = std::convert::Infallible;
    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, Self::Error> {
        WalkerMemory(self.0.memory()).read_entry(gpa, size)
    }
    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, Self::Error> {
        Ok(self.0.emulate_cmpxchg(gpa, size, old, new))
    }
}

impl NestedContext {
    /// A context on `mmu` (address space 0) running L2 under `l1`.
    ///
    /// # Panics
    /// If L1's tables do not have 4 or 5 levels (L1's paging mode or its
    /// EPTP's walk length; the L1 model chose it, and VM entry would
    /// refuse it).
    pub(crate) fn new(mmu: Arc<ShadowMmu>, l1: L1Nested, features: &CpuFeatures) -> NestedContext {
        let l1_tables = l1.tables(features);
        NestedContext {
            tables: MmuMemoryCache::new(mmu.arena().clone()),
            seen_root_gen: mmu.root_generation(),
            mmu,
            l1,
            l1_paging: l1_tables.guest_paging(),
            l1_tables,
            hw: l1.shadow(features),
            roots: RootCache::new(NESTED_PREV_ROOTS),
            last_retry: None,
            sync_pending: false,
        }
    }

    /// An invalidation L1 made (see [`L1Invalidation`]).
    pub(crate) fn l1_invalidate(&mut self, cpu: &mut CpuState, what: L1Invalidation) {
        let flush = match what {
            L1Invalidation::InveptSingle(eptp) => {
                // KVM's `nested_ept_root_matches`: by the root's address.
                self.roots
                    .drop_where(&self.mmu, |k| matches!(k, L1Nested::Ept(e) if e.root() == eptp.root()));
                Flush::Everything
            }
            L1Invalidation::InveptAll => {
                self.roots.drop_where(&self.mmu, |_| true);
                Flush::Everything
            }
            L1Invalidation::Invvpid(Some(va)) | L1Invalidation::Invlpga(va) => Flush::VpidPage {
                vpid: cpu.vpid,
                va: va.raw(),
            },
            L1Invalidation::Invvpid(None) => Flush::Vpid(cpu.vpid),
            L1Invalidation::TlbControlFlush => {
                self.sync_pending = true;
                Flush::Vpid(cpu.vpid)
            }
        };
        cpu.tlb.flush(flush);
        cpu.tlb.clear_l1();
        cpu.settled = false;
    }

    /// L1 changes its nested paging (a VM entry with another nCR3 or EPTP,
    /// for another L2 or the same one): the roots switch at the next
    /// access.
    pub(crate) fn set_l1(&mut self, l1: L1Nested, features: &CpuFeatures) {
        if let L1Nested::Npt(_) = l1 {
            // KVM syncs the nested MMU on every nested VMRUN
            // (`nested_svm_transition_tlb_flush`): SVM's ASID management
            // can invalidate nested-paging mappings there.
            self.sync_pending = true;
        }
        if l1 != self.l1 {
            self.l1_tables = l1.tables(features);
            self.l1_paging = self.l1_tables.guest_paging();
            self.hw = l1.shadow(features);
            self.l1 = l1;
        }
    }

    fn roots(&self) -> Option<&ShadowRoots> {
        self.roots.current().map(|(_, r)| r)
    }

    /// The hardware's view of the shadow at the current root.
    fn shadow02(&self) -> Option<NestedPaging> {
        self.roots()
            .map(|r| self.hw.with_root(Hpa::new(r.hw_root().raw() << 12)))
    }

    /// Hands a fault of the shadow to the nested MMU (outside guest mode).
    fn page_fault(&mut self, cpu: &mut CpuState, exit: &NestedFault) -> Result<ShadowOutcome, VcpuError> {
        let Some((_, roots)) = self.roots.current() else {
            return Ok(ShadowOutcome::Retry);
        };
        cpu.stats.shadow_exits += 1;
        let (write, fetch, _) = exit.access_bits();
        let kind = if fetch {
            AccessKind::Fetch
        } else if write {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        // Nested accesses are user accesses (for EPT: user is readable).
        let access = Access {
            kind,
            privilege: Privilege::User,
            rflags_ac: false,
        };
        let groot = Root::Table(Gpa::new(self.l1.root()));
        Ok(self.mmu.page_fault(
            roots,
            &self.l1_paging,
            &groot,
            Gva::new(exit.gpa().raw()),
            access,
            0,
            &mut self.tables,
        )?)
    }

    /// The root of L2's walk of `gva`: its table, or in PAE paging the
    /// PDPTE registers (Intel) or, under NPT, which has none, the PDPTE
    /// the walk needs read through `mem` like every other entry.
    fn l2_root<M: PtMemory>(&self, cpu: &CpuState, gva: Gva, mem: &M) -> Result<Root, M::Error> {
        if cpu.paging.mode() != PagingMode::Pae || self.hw.vendor() == NestedVendor::Ept {
            return Ok(cpu.paging.root(cpu.cr3, cpu.pdptes));
        }
        let pdpt = cpu.cr3 & crate::arch::control::CR3_PAE_PDPT_MASK;
        let index = ((cpu.linear(gva).raw() >> 30) & 3) as usize;
        let mut pdptes = [0u64; 4];
        pdptes[index] = mem.read_entry(Gpa::new(pdpt + 8 * index as u64), EntrySize::Eight)?;
        Ok(Root::PaeRegs {
            pdpt: Gpa::new(pdpt),
            pdptes,
        })
    }

    /// Emulates L2's access in software (KVM's emulator with the nested
    /// MMU's `walk_addr_nested`): the two-dimensional walk over L1's own
    /// tables in L1's memory, A/D flags set by emulated compare-exchanges,
    /// then the access on L1's memory. For an access the hardware cannot
    /// make while the shadow write-protects what it writes: L2's page
    /// table in a page that is one of L1's nested tables, which every walk
    /// with A/D updates writes.
    fn emulate_access(
        &self,
        cpu: &CpuState,
        gva: Gva,
        access: Access,
        size: usize,
        value: u64,
    ) -> Result<AccessResult, VcpuError> {
        let l1 = EmulatedL1(&self.mmu);
        let mem = NestedMemory {
            nested: &self.l1_tables,
            host: &l1,
            stage: NestedStage::GuestPagingStructure { gla: gva },
        };
        let nested = |e: NestedError<std::convert::Infallible>| match e {
            NestedError::Fault(f) => AccessResult::VmExit(f),
            NestedError::Host { error, .. } => match error {},
        };
        let root = match self.l2_root(cpu, gva, &mem) {
            Ok(r) => r,
            Err(e) => return Ok(nested(e)),
        };
        let walk = match cpu.paging.walk(&mem, &root, gva, access, cpu.pkru) {
            Ok(w) => w,
            Err(WalkError::PageFault(pf)) => {
                return Ok(AccessResult::Fault(GuestFault::PageFault {
                    error_code: pf.error_code,
                    gva,
                }));
            }
            Err(WalkError::NonCanonical) => return Ok(AccessResult::Fault(GuestFault::GeneralProtection)),
            Err(WalkError::Memory { error, .. }) => return Ok(nested(error)),
        };
        let fin = match self
            .l1_tables
            .translate(&l1, walk.gpa, access.kind, NestedStage::Final { gla: walk.va })
        {
            Ok(w) => w.gpa,
            Err(e) => return Ok(nested(e)),
        };
        let memory = self.mmu.memory();
        Ok(if access.is_write() {
            match self.mmu.emulate_write(fin, size, value) {
                Ok(()) if memory.read_value(fin, 1).is_ok() => AccessResult::Done {
                    gpa: walk.gpa,
                    value: 0,
                    mmio: false,
                },
                Ok(()) => AccessResult::Done {
                    gpa: fin,
                    value: 0,
                    mmio: true,
                },
                Err(e) => return Err(e.into()),
            }
        } else {
            match memory.read_value(fin, size) {
                Ok(value) => AccessResult::Done {
                    gpa: walk.gpa,
                    value,
                    mmio: false,
                },
                Err(_) => AccessResult::Done {
                    gpa: fin,
                    value: 0,
                    mmio: true,
                },
            }
        })
    }

    /// What L1's tables say of the access the hardware reported in `exit`:
    /// the exit to reflect to L1, or `None` if they allow it now (L1
    /// changed them since: the access is retried).
    fn reflect(&self, exit: &NestedFault) -> Option<NestedFault> {
        match self.l1_tables.retranslate(&WalkerMemory(self.mmu.memory()), exit) {
            Ok(_) => None,
            Err(NestedError::Fault(f)) => Some(f),
            Err(NestedError::Host { error, .. }) => match error {},
        }
    }

    /// An exit the hardware model's walk of the shadow took, as that
    /// vendor's hardware reports it; an entry pointing outside the arena
    /// is an MMU bug, reported as the reserved-bit exit.
    fn fault_of<E>(&self, e: NestedError<E>) -> NestedFault {
        match e {
            NestedError::Fault(f) => f,
            NestedError::Host { hpa, .. } => match self.hw.vendor() {
                NestedVendor::Npt => NestedFault::Npf {
                    exitinfo1: u64::from((PfErrorCode::PRESENT | PfErrorCode::RSVD | PfErrorCode::USER).bits())
                        | NPF_GUEST_PAGE_TABLE,
                    exitinfo2: hpa.raw(),
                },
                NestedVendor::Ept => NestedFault::EptMisconfig {
                    gpa: Gpa::new(hpa.raw()),
                },
            },
        }
    }
}

impl VcpuMmu for NestedContext {
    fn name(&self) -> &'static str {
        "nested"
    }

    fn arena(&self) -> &Arc<FrameArena> {
        self.mmu.arena()
    }

    #[inline]
    fn remote_tlb(&self) -> &RemoteTlb {
        self.mmu.remote_tlb()
    }

    #[inline]
    fn remote_flush(&self, vpid: u16) -> Flush {
        Flush::Vpid(vpid)
    }

    /// The NPT02 root tags the TLB, as the EPTP does under EPT.
    #[inline]
    fn eptp(&self) -> u64 {
        self.roots().map_or(0, |r| r.hw_root().raw())
    }

    /// Roots dropped by the MMU, or not yet the ones L1's NPT12 names.
    #[inline]
    fn roots_changed(&self) -> bool {
        self.mmu.root_generation() != self.seen_root_gen || self.roots.current().is_none_or(|(k, _)| *k != self.l1)
    }

    #[inline]
    fn fast_path_va(&self, cpu: &CpuState, gva: Gva) -> Option<u64> {
        let pending = self.roots_changed() || self.mmu.remote_tlb().requested() != cpu.seen_flush_gen;
        (!pending).then(|| cpu.linear(gva).raw())
    }

    fn dirty_ring(&self) -> Option<&Arc<DirtyRing>> {
        None
    }

    fn tdp_root(&self) -> Option<&RootRef> {
        None
    }

    fn shadow_root(&self) -> Option<Pfn> {
        self.roots().map(ShadowRoots::hw_root)
    }

    /// The nested MMU does not shadow L2's own tables: L2's TLB flushes are
    /// the TLB's business alone.
    fn guest_flush(&mut self, _flush: GuestFlush) {}

    fn before_cr3_load(&mut self, _cpu: &mut CpuState) -> Result<(), VcpuError> {
        Ok(())
    }

    /// Under NPT a PAE guest has no PDPTE registers: each walk reads the
    /// PDPTE it needs through NPT02 ([`VcpuMmu::attempt`]), so a MOV to CR3
    /// loads nothing. Under EPT it loads them through EPT02, on behalf of
    /// no linear address; what L1's EPT12 refuses exits to L1.
    fn load_pdptes(&mut self, cpu: &mut CpuState, base: u64) -> Result<(), VcpuError> {
        if self.hw.vendor() == NestedVendor::Npt {
            return Ok(());
        }
        let mut last = None;
        for _ in 0..MAX_RETRIES {
            self.reload(cpu)?;
            let Some(ept02) = self.shadow02() else { continue };
            let _epoch = crossbeam_epoch::pin();
            let host = HostPhys(self.mmu.arena());
            let mem = NestedMemory {
                nested: &ept02,
                host: &host,
                stage: NestedStage::NoLinearAddress,
            };
            let mut pdptes = [0u64; 4];
            let exit = pdptes.iter_mut().enumerate().find_map(|(i, p)| {
                match mem.read_entry(Gpa::new(base + 8 * i as u64), EntrySize::Eight) {
                    Ok(v) => {
                        *p = v;
                        None
                    }
                    Err(e) => Some(self.fault_of(e)),
                }
            });
            let Some(exit) = exit else {
                cpu.pdptes = pdptes;
                return Ok(());
            };
            last = Some(exit);
            match self.page_fault(cpu, &exit)? {
                ShadowOutcome::Fixed | ShadowOutcome::Retry => {}
                ShadowOutcome::GuestPageFault(_) => {
                    if let Some(f) = self.reflect(&exit) {
                        return Err(VcpuError::ExitToL1(f));
                    }
                }
                // No memory behind the PDPT in L1: the VMM would emulate
                // the read; it reads as not-present entries here.
                ShadowOutcome::Mmio(_) | ShadowOutcome::ReadOnlySlot(_) => {
                    cpu.pdptes = [0; 4];
                    return Ok(());
                }
                ShadowOutcome::EmulateWrite(_) | ShadowOutcome::GuestGeneralProtection => {
                    unreachable!("a PDPTE load is a read of an L2-physical address")
                }
            }
        }
        Err(VcpuError::NoProgress {
            gva: Gva::new(base),
            last,
        })
    }

    /// Drops obsolete roots, and switches to the roots of L1's current
    /// NPT12 (from `prev_roots` when it can: KVM's `kvm_mmu_new_pgd` on a
    /// nested VMRUN).
    fn reload(&mut self, cpu: &mut CpuState) -> Result<(), VcpuError> {
        let generation = self.mmu.root_generation();
        if generation != self.seen_root_gen {
            self.seen_root_gen = generation;
            let (current, cached) = self.roots.drop_obsolete(&self.mmu);
            cpu.stats.cached_roots_dropped += cached;
            if current {
                cpu.tlb.flush(Flush::Vpid(cpu.vpid));
                cpu.stats.root_reloads += 1;
            }
        }
        let key = self.l1;
        let (mmu, tables) = (&self.mmu, &mut self.tables);
        let policy = mmu.prev_roots_match();
        let ctx = key.context();
        // KVM's `is_root_usable`: the same L1 tables, and a root role that
        // matches L1's context (seed 001).
        let usable = |k: &L1Nested, r: &ShadowRoots| k.root() == key.root() && r.role().is_root_role_of(&ctx, policy);
        let how = self
            .roots
            .switch(mmu, key, usable, || mmu.load_roots(&ctx, 0, key.root(), [0; 4], tables))?;
        if how != Switch::Current {
            cpu.tlb.clear_l1();
        }
        // Roots loaded (not reused from `prev_roots`) are synced, as KVM's
        // `kvm_mmu_load` does: after an INVEPT freed them, what L1 wrote
        // into its unsync tables shows now. A flushing VMRUN syncs too.
        let sync = std::mem::take(&mut self.sync_pending) || how == Switch::Loaded;
        if sync && let Some((_, roots)) = self.roots.current() {
            self.mmu.sync_roots(roots);
        }
        Ok(())
    }

    /// One try: TLB, else L2's walk over NPT02 (two-dimensional); a #NPF
    /// of NPT02 ends it.
    fn attempt(&mut self, cpu: &mut CpuState, gva: Gva, access: Access, size: usize, value: u64) -> Attempt {
        let Some(npt02) = self.shadow02() else {
            return Attempt::Exit(Exit::ShadowPageFault);
        };
        let tag = cpu.tag(self.eptp());
        if let Some(done) = cpu.tlb_hit(gva, tag, access, size, value, |cpu, e| super::check_2d(cpu, access, e)) {
            return Attempt::Done(done);
        }
        let _epoch = crossbeam_epoch::pin();
        let host = CountingMemory::new(HostPhys(self.mmu.arena()));
        let walk = {
            let mem = NestedMemory {
                nested: &npt02,
                host: &host,
                stage: NestedStage::GuestPagingStructure { gla: gva },
            };
            let root = match self.l2_root(cpu, gva, &mem) {
                Ok(r) => r,
                Err(e) => {
                    return Attempt::Exit(Exit::Tdp {
                        exit: self.fault_of(e),
                        final_gpa: None,
                    });
                }
            };
            cpu.paging.walk(&mem, &root, gva, access, cpu.pkru)
        };
        let last = walk.as_ref().ok().map(|w| {
            npt02
                .translate(&host, w.gpa, access.kind, NestedStage::Final { gla: w.va })
                .map_err(|e| self.fault_of(e))
        });
        cpu.stats.walks += 1;
        cpu.stats.walk_refs += host.reads();
        let walk = match walk {
            Ok(w) => w,
            Err(WalkError::PageFault(pf)) => {
                cpu.stats.guest_faults += 1;
                return Attempt::Done(AccessResult::Fault(GuestFault::PageFault {
                    error_code: pf.error_code,
                    gva,
                }));
            }
            Err(WalkError::NonCanonical) => {
                cpu.stats.guest_faults += 1;
                return Attempt::Done(AccessResult::Fault(GuestFault::GeneralProtection));
            }
            Err(WalkError::Memory { error, .. }) => {
                return Attempt::Exit(Exit::Tdp {
                    exit: self.fault_of(error),
                    final_gpa: None,
                });
            }
        };
        let leaf = match last.expect("the walk completed") {
            Ok(w) => w,
            Err(exit) => {
                return Attempt::Exit(Exit::Tdp {
                    exit,
                    final_gpa: Some(walk.gpa),
                });
            }
        };
        // The shadow maps 4K pages only: the TLB caches 4K. (USER is
        // readable in EPT02: an execute-only page is not cached.)
        let mask = 0xfff;
        if leaf.rights.contains(AccessRights::USER) {
            let mut rights = walk.rights;
            if !leaf.rights.contains(AccessRights::EXEC) {
                rights.remove(AccessRights::EXEC);
            }
            let pte = walk.leaf().map_or(0, |l| l.pte);
            let global =
                cpu.regs.cr4.contains(Cr4::PGE) && pte & PT_GLOBAL != 0 && cpu.paging.mode() != PagingMode::None;
            cpu.tlb.insert(TlbEntry {
                va_base: walk.va.raw() & !mask,
                size: crate::addr::PageSize::Size4K,
                tag,
                global,
                hpa_base: Hpa::new(leaf.gpa.raw() & !mask),
                gpa_base: walk.gpa.raw() & !mask,
                rights,
                pkey: walk.pkey,
                dirty: walk.dirty && leaf.rights.contains(AccessRights::WRITE) && leaf.dirty,
            });
        }
        Attempt::Done(cpu.touch(Hpa::new(leaf.gpa.raw()), walk.gpa, access.is_write(), size, value))
    }

    /// A fault of the shadow: fixed from L1's tables, reflected to L1,
    /// emulated.
    fn handle_exit(
        &mut self,
        cpu: &mut CpuState,
        exit: Exit,
        gva: Gva,
        access: Access,
        size: usize,
        value: u64,
    ) -> Result<ExitAnswer, VcpuError> {
        let Exit::Tdp { exit, final_gpa } = exit else {
            // No roots yet: load them.
            return Ok(ExitAnswer::Retry);
        };
        Ok(match self.page_fault(cpu, &exit)? {
            ShadowOutcome::Fixed => ExitAnswer::Fixed,
            ShadowOutcome::Retry => ExitAnswer::Retry,
            // L1's tables refuse: L1 takes the exit its own hardware would.
            ShadowOutcome::GuestPageFault(_) => match self.reflect(&exit) {
                Some(f) => ExitAnswer::Done(AccessResult::VmExit(f)),
                None => ExitAnswer::Retry,
            },
            ShadowOutcome::GuestGeneralProtection => {
                unreachable!("an L2-physical address has no canonical form")
            }
            // A paging-structure access of L2's walk there (L2's table in
            // L1's ROM, whose A/D bits the walk sets; or with no memory
            // behind it): the access is made in software, as KVM's
            // emulator does, the A/D updates skipped where L1's memory is
            // not writable.
            ShadowOutcome::Mmio(_) | ShadowOutcome::ReadOnlySlot(_) if final_gpa.is_none() => {
                ExitAnswer::Done(self.emulate_access(cpu, gva, access, size, value)?)
            }
            // No memslot at the L1-physical address L1's tables give: the
            // VMM emulates the access there (KVM reports the L1 gpa, in
            // the address space the VMM owns).
            ShadowOutcome::Mmio(l1_gpa) | ShadowOutcome::ReadOnlySlot(l1_gpa) => ExitAnswer::Done(AccessResult::Done {
                gpa: l1_gpa,
                value: 0,
                mmio: true,
            }),
            // L2 writes a page that is one of L1's nested tables. A page
            // walk's A/D update unprotects it and retries (KVM's
            // `retry_instruction`); if the same write faults again (L2's
            // table is in a page L1 uses as a nested table, so the retry
            // shadows and protects it again), the access is emulated; a
            // store is emulated.
            ShadowOutcome::EmulateWrite(gpa) if final_gpa.is_none() => {
                if self.last_retry.replace(gpa) == Some(gpa) {
                    self.last_retry = None;
                    ExitAnswer::Done(self.emulate_access(cpu, gva, access, size, value)?)
                } else {
                    self.mmu.unprotect_gfn_and_retry(gpa);
                    ExitAnswer::Retry
                }
            }
            ShadowOutcome::EmulateWrite(gpa) => {
                self.mmu.emulate_write(gpa, size, value)?;
                ExitAnswer::Done(AccessResult::Done {
                    gpa: final_gpa.unwrap_or(exit.gpa()),
                    value: 0,
                    mmio: false,
                })
            }
        })
    }

    fn check(&self, cpu: &CpuState, access: Access, e: &TlbEntry) -> bool {
        super::check_2d(cpu, access, e)
    }

    fn set_string_op(&mut self, _on: bool) {}

    fn release(&mut self) {
        self.roots.release(&self.mmu);
    }
}
