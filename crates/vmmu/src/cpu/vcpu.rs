//! A vCPU: architectural state, its TLB, and the access loop, on any MMU.
//!
//! The loop is the same on every MMU: the TLB, else the hardware walk the
//! MMU programs, else an exit handed to the MMU, then a retry. What differs
//! is the vCPU's MMU context (`cpu::context`, KVM's `struct kvm_mmu`):
//!
//! - On the TDP MMU: TLB → two-dimensional walk (the guest's tables through
//!   EPT) → EPT exit to the MMU → retry.
//! - On the shadow MMU: TLB → one-dimensional walk of the shadow tables (as
//!   hardware runs a guest under shadow paging: CR0.WP and EFER.NX forced
//!   on, the guest's SMEP/SMAP/PKE) → #PF exit to the MMU, which walks the
//!   guest's tables and fixes the shadow, injects the guest's #PF, or asks
//!   for the write to be emulated → retry.

use std::sync::Arc;

use super::context::{Attempt, ExitAnswer, GuestFlush, MmuContext, NestedContext, ShadowContext, TdpContext, VcpuMmu};
use super::state::{CpuState, MAX_RETRIES, YIELD_AFTER};
use super::tlb::{Flush, Tlb, TlbConfig, TlbTag, access_class};
use crate::addr::{Gpa, Gva, Pfn};
use crate::arch::control::is_canonical;
use crate::arch::control::{CR3_NOFLUSH, CR3_PAE_PDPT_MASK, CpuFeatures, Cr0, Cr4, PagingMode};
use crate::arch::ept::Eptp;
use crate::arch::perm::{Access, AccessKind};
use crate::mem::{DirtyRing, MemslotTable};
use crate::mmu::shadow::ShadowMmu;
use crate::mmu::tdp::{RootRef, TdpError, TdpMmu};
use crate::walker::nested::NestedFault;
use crate::walker::{ControlRegs, GuestPaging};

pub use super::context::{L1Invalidation, L1Nested, L1Npt, NESTED_PREV_ROOTS, PREV_ROOTS};
pub use super::state::{AccessResult, GuestFault, LIVELOCK_EXITS, VcpuError, VcpuStats};

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
    pub fn access(&mut self, gva: Gva, access: Access, size: usize, value: u64) -> Result<AccessResult, VcpuError> {
        self.vcpu.access(gva, access, size, value)
    }

    /// The vCPU, to read (its counters, registers, TLB).
    pub fn vcpu(&self) -> &Vcpu {
        self.vcpu
    }
}

impl Drop for GuestSession<'_> {
    fn drop(&mut self) {
        self.vcpu.cpu.session = false;
        self.vcpu.cpu.exit_guest();
    }
}

/// A vCPU on the TDP or the shadow MMU.
pub struct Vcpu {
    ctx: MmuContext,
    cpu: CpuState,
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.cpu.exit_guest();
        self.ctx.remote_tlb().unregister(&self.cpu.mode);
        self.ctx.release();
    }
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("mmu", &self.ctx.name())
            .field("regs", &self.cpu.regs)
            .field("cr3", &self.cpu.cr3)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// A vCPU with paging off, on address space 0 of `mmu`.
    pub fn new(mmu: Arc<TdpMmu>, slots: Arc<MemslotTable>, features: CpuFeatures, vpid: u16) -> Result<Vcpu, TdpError> {
        Ok(Vcpu::with_context(
            MmuContext::Tdp(TdpContext::new(mmu)?),
            slots,
            features,
            vpid,
        ))
    }

    /// A vCPU with paging off on the shadow MMU `mmu`, address space 0.
    /// Its roots are loaded at the first access.
    pub fn new_shadow(mmu: Arc<ShadowMmu>, slots: Arc<MemslotTable>, features: CpuFeatures, vpid: u16) -> Vcpu {
        Vcpu::with_context(
            MmuContext::Shadow(ShadowContext::new(mmu, &features)),
            slots,
            features,
            vpid,
        )
    }

    /// A vCPU of an L2 guest whose L1 hypervisor gives it nested paging
    /// `l1` (NPT12 or EPT12 in L1's memory), on the nested MMU `mmu`: a
    /// shadow MMU over L1's memslots `slots`, address space 0, in the
    /// vendor's format ([`crate::vm::Vm::nested_mmu`]). Paging off; the
    /// shadow's roots are loaded at the first access.
    pub fn new_nested(
        mmu: Arc<ShadowMmu>,
        slots: Arc<MemslotTable>,
        features: CpuFeatures,
        asid: u16,
        l1: impl Into<L1Nested>,
    ) -> Vcpu {
        Vcpu::with_context(
            MmuContext::Nested(NestedContext::new(mmu, l1.into(), &features)),
            slots,
            features,
            asid,
        )
    }

    /// A VM entry with other nested paging (L1 switching to another L2
    /// guest, or changing its nCR3 or EPTP): the nested MMU switches roots
    /// before the next access, from its `prev_roots` when it can. Ignored
    /// on a vCPU that is not an L2 guest's.
    pub fn set_l1_nested(&mut self, l1: impl Into<L1Nested>) {
        if let MmuContext::Nested(c) = &mut self.ctx {
            c.set_l1(l1.into(), &self.cpu.features);
            self.cpu.settled = false;
        }
    }

    /// An invalidation L1 makes for this L2 guest (INVEPT, INVVPID, INVLPGA,
    /// a flushing VMRUN; [`L1Invalidation`]), emulated by L0 as KVM does.
    /// Ignored on a vCPU that is not an L2 guest's.
    pub fn l1_invalidate(&mut self, what: L1Invalidation) {
        if let MmuContext::Nested(c) = &mut self.ctx {
            c.l1_invalidate(&mut self.cpu, what);
        }
    }

    /// The PDPTE registers (PAE paging).
    pub fn pdptes(&self) -> [u64; 4] {
        self.cpu.pdptes
    }

    fn with_context(ctx: MmuContext, slots: Arc<MemslotTable>, features: CpuFeatures, vpid: u16) -> Vcpu {
        let regs = ControlRegs::default();
        let mode = ctx.remote_tlb().register();
        let seen_flush_gen = ctx.remote_tlb().generation();
        let cpu = CpuState {
            arena: ctx.arena().clone(),
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
        };
        Vcpu { ctx, cpu }
    }

    /// The counters.
    pub fn stats(&self) -> VcpuStats {
        self.cpu.stats
    }

    /// The TDP root this vCPU runs on (`None` on the shadow MMU).
    pub fn root(&self) -> Option<&RootRef> {
        self.ctx.tdp_root()
    }

    /// The frame of the shadow table the hardware walk starts from (`None`
    /// on the TDP MMU, or before the first access).
    pub fn shadow_root(&self) -> Option<Pfn> {
        self.ctx.shadow_root()
    }

    /// The TLB.
    pub fn tlb(&self) -> &Tlb {
        &self.cpu.tlb
    }

    /// The control registers.
    pub fn regs(&self) -> ControlRegs {
        self.cpu.regs
    }

    /// CR3.
    pub fn cr3(&self) -> u64 {
        self.cpu.cr3
    }

    /// PKRU.
    pub fn pkru(&self) -> u32 {
        self.cpu.pkru
    }

    /// The processor's paging features.
    pub fn features(&self) -> CpuFeatures {
        self.cpu.features
    }

    /// Sets CR0, CR4 and EFER together (as at VM entry), and CR3 and PKRU,
    /// flushing everything (KVM's `kvm_mmu_reset_context`).
    pub fn set_state(&mut self, regs: ControlRegs, cr3: u64, pkru: u32) -> Result<(), VcpuError> {
        self.cpu.regs = regs;
        self.cpu.pkru = pkru;
        self.cpu.paging = GuestPaging::new(&regs, &self.cpu.features);
        self.cpu.tlb.flush(Flush::Everything);
        self.cpu.settled = false;
        self.mov_cr3(cr3)
    }

    /// A VM entry into an L2 guest with the VMCS guest state `regs`, `cr3`
    /// and `pkru`, and, for PAE paging under EPT, the PDPTE registers
    /// `pdptes` from the VMCS (not read from memory; their reserved-bit
    /// check is VM entry's, before this). Nothing is read, nothing exits.
    pub fn vm_entry(&mut self, regs: ControlRegs, cr3: u64, pdptes: [u64; 4], pkru: u32) {
        self.cpu.regs = regs;
        self.cpu.pkru = pkru;
        self.cpu.paging = GuestPaging::new(&regs, &self.cpu.features);
        self.cpu.tlb.flush(Flush::Everything);
        self.cpu.cr3 = cr3;
        self.cpu.pdptes = pdptes;
        self.cpu.settled = false;
        self.ctx.guest_flush(GuestFlush::Cr3);
    }

    /// MOV to CR0 changing only CR0.WP: no invalidation (rights are
    /// re-checked at every access; SDM 4.10.4.1).
    pub fn set_cr0_wp(&mut self, wp: bool) {
        self.cpu.regs.cr0.set(Cr0::WP, wp);
        self.cpu.paging = GuestPaging::new(&self.cpu.regs, &self.cpu.features);
        self.unsettle();
    }

    /// The registers changed: the first-level TLB's decisions go, and the
    /// next access checks the roots (and on the shadow MMU, its syncs).
    fn unsettle(&mut self) {
        self.cpu.settled = false;
        self.cpu.tlb.clear_l1();
    }

    /// WRPKRU: the protection-key rights register. Nothing is invalidated
    /// (the TLB caches rights and keys, and every access is checked
    /// against the current PKRU; SDM 4.10.2.2), and nothing exits: the MMU
    /// never learns of it.
    pub fn set_pkru(&mut self, pkru: u32) {
        self.cpu.pkru = pkru;
        self.unsettle();
    }

    /// MOV to CR4 of SMEP/SMAP/PGE. A change of PGE flushes everything,
    /// global translations included.
    pub fn set_cr4_bits(&mut self, smep: Option<bool>, smap: Option<bool>, pge: Option<bool>) {
        let old_pge = self.cpu.regs.cr4.contains(Cr4::PGE);
        for (v, bit) in [(smep, Cr4::SMEP), (smap, Cr4::SMAP), (pge, Cr4::PGE)] {
            if let Some(v) = v {
                self.cpu.regs.cr4.set(bit, v);
            }
        }
        if self.cpu.regs.cr4.contains(Cr4::PGE) != old_pge {
            self.cpu.tlb.flush(Flush::All(self.tag()));
            self.ctx.guest_flush(GuestFlush::All);
        }
        self.cpu.paging = GuestPaging::new(&self.cpu.regs, &self.cpu.features);
        self.unsettle();
    }

    fn tag(&self) -> TlbTag {
        self.cpu.tag(self.ctx.eptp())
    }

    /// MOV to CR3 (KVM's `kvm_mmu_new_pgd`): with PCIDE, bit 63 means no
    /// flush; otherwise the new PCID's non-global translations go. In PAE
    /// paging the PDPTE registers are loaded here.
    pub fn mov_cr3(&mut self, value: u64) -> Result<(), VcpuError> {
        self.ctx.before_cr3_load(&mut self.cpu)?;
        let pcide = self.cpu.regs.cr4.contains(Cr4::PCIDE);
        let noflush = pcide && value & CR3_NOFLUSH != 0;
        self.cpu.cr3 = if pcide { value & !CR3_NOFLUSH } else { value };
        self.cpu.settled = false;
        if !noflush {
            self.cpu.tlb.flush(Flush::Pcid(self.tag()));
            self.ctx.guest_flush(GuestFlush::Cr3);
        }
        if self.cpu.paging.mode() == PagingMode::Pae {
            let base = self.cpu.cr3 & CR3_PAE_PDPT_MASK;
            self.ctx.load_pdptes(&mut self.cpu, base)?;
        }
        Ok(())
    }

    /// INVLPG.
    pub fn invlpg(&mut self, va: Gva) {
        let va = self.cpu.linear(va);
        self.cpu.tlb.flush(Flush::Page {
            va: va.raw(),
            tag: self.tag(),
        });
        // KVM syncs the address in every root of the vCPU
        // (`KVM_MMU_ROOTS_ALL`).
        self.ctx.guest_flush(GuestFlush::Addr { va, pcid: None });
        self.cpu.settled = false;
    }

    /// INVPCID of `kind` 0..=3 with descriptor (`pcid`, `va`).
    pub fn invpcid(&mut self, kind: u8, pcid: u16, va: Gva) {
        let tag = TlbTag { pcid, ..self.tag() };
        let (flush, guest) = match kind {
            0 => (
                Flush::PcidPage { va: va.raw(), tag },
                GuestFlush::Addr { va, pcid: Some(pcid) },
            ),
            1 => (Flush::Pcid(tag), GuestFlush::Pcid(pcid)),
            2 => (Flush::All(tag), GuestFlush::All),
            _ => (Flush::AllNonGlobal(tag), GuestFlush::All),
        };
        self.cpu.tlb.flush(flush);
        self.ctx.guest_flush(guest);
        self.cpu.settled = false;
    }

    /// INVEPT executed by the VMM on this (physical) CPU: drops the
    /// combined mappings the type names. The MMU's own flushes already
    /// reach every vCPU through the remote-flush protocol; this is for a
    /// VMM that manages EPTPs itself (e.g. when it changes the EPTP).
    pub fn invept(&mut self, kind: Invept) {
        match kind {
            Invept::SingleContext(eptp) => self.cpu.tlb.flush(Flush::Eptp(eptp.root() >> 12)),
            Invept::AllContext => self.cpu.tlb.flush(Flush::Everything),
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
                self.cpu.tlb.flush(Flush::Everything);
                return Ok(());
            }
        };
        self.cpu.tlb.flush(flush);
        Ok(())
    }

    /// This vCPU's dirty ring, when the MMU has the dirty ring enabled: the
    /// VMM harvests it.
    pub fn dirty_ring(&self) -> Option<&Arc<DirtyRing>> {
        self.ctx.dirty_ring()
    }

    /// This vCPU's VPID.
    pub fn vpid(&self) -> u16 {
        self.cpu.vpid
    }

    /// Enters guest mode, doing the flush the MMU asked for since the last
    /// entry (see `CpuState::enter_guest`).
    #[inline]
    fn enter_guest(&mut self) {
        let flush = self.ctx.remote_flush(self.cpu.vpid);
        self.cpu.enter_guest(self.ctx.remote_tlb(), flush);
    }

    /// Opens a run of accesses in guest mode (see [`GuestSession`]).
    pub fn session(&mut self) -> GuestSession<'_> {
        self.cpu.session = true;
        GuestSession { vcpu: self }
    }

    /// One access of `size` (1..=8) bytes at `gva`, as the instruction at
    /// `cpl` with RFLAGS.AC = `ac` makes it; a write stores the low `size`
    /// bytes of `value`. An access that crosses a page is split in two.
    ///
    /// With the dirty ring enabled, a vCPU whose ring reached its soft
    /// limit does not run: the access returns
    /// [`AccessResult::DirtyRingFull`] without touching anything.
    #[inline]
    pub fn access(&mut self, gva: Gva, access: Access, size: usize, value: u64) -> Result<AccessResult, VcpuError> {
        if self.cpu.in_guest
            && self.cpu.session
            && (1..=8).contains(&size)
            && gva.page_offset() as usize + size <= 0x1000
            && let Some(done) = self.fast_access(gva, access, size, value)
        {
            return Ok(done);
        }
        self.access_slow(gva, access, size, value)
    }

    /// The access of a vCPU already in guest mode (in a [`GuestSession`])
    /// that the first-level TLB serves, with nothing to process first: no
    /// register change, nothing the MMU context has pending (a root it
    /// dropped, a full dirty ring) and no remote flush in the way (a flush
    /// is acknowledged by the slow path, which empties the TLB).
    #[inline]
    fn fast_access(&mut self, gva: Gva, access: Access, size: usize, value: u64) -> Option<AccessResult> {
        if !self.cpu.settled {
            return None;
        }
        let va = self.ctx.fast_path_va(&self.cpu, gva)?;
        let hit = self
            .cpu
            .tlb
            .lookup_l1(va, self.cpu.settled_tag, access_class(access)?)?;
        self.cpu.stats.accesses += 1;
        self.cpu.stats.tlb_hits += 1;
        Some(
            self.cpu
                .touch(hit.hpa, Gpa::new(hit.gpa), access.is_write(), size, value),
        )
    }

    #[inline(never)]
    fn access_slow(&mut self, gva: Gva, access: Access, size: usize, value: u64) -> Result<AccessResult, VcpuError> {
        if !(1..=8).contains(&size) {
            return Err(VcpuError::InvalidAccessSize { gva, size });
        }
        if self.dirty_ring().is_some_and(|r| r.soft_full()) {
            // An exit to the VMM.
            self.cpu.exit_guest();
            return Ok(AccessResult::DirtyRingFull);
        }
        self.access_split(gva, access, size, value)
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
        self.ctx.set_string_op(true);
        // One instruction: the vCPU stays in guest mode from one store to
        // the next (a store that exits leaves it, as any exit does).
        let in_session = std::mem::replace(&mut self.cpu.session, true);
        let mut result = Ok(AccessResult::Done {
            gpa: Gpa::new(0),
            value: 0,
            mmio: false,
        });
        while regs.rcx > 0 {
            result = self.access(Gva::new(regs.rdi), Access::new(AccessKind::Write, 0, false), 8, value);
            if !matches!(result, Ok(AccessResult::Done { .. })) {
                break;
            }
            regs.rdi = regs.rdi.wrapping_add(8);
            regs.rcx -= 1;
        }
        self.cpu.session = in_session;
        if !in_session {
            self.cpu.exit_guest();
        }
        self.ctx.set_string_op(false);
        result
    }

    fn access_split(&mut self, gva: Gva, access: Access, size: usize, value: u64) -> Result<AccessResult, VcpuError> {
        debug_assert!((1..=8).contains(&size), "`access` checked the size");
        let in_page = (0x1000 - gva.page_offset()) as usize;
        if size > in_page {
            let low = self.access_split(gva, access, in_page, value)?;
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
            let high = self.access_split(gva.add(in_page as u64), access, size - in_page, value >> (8 * in_page))?;
            return Ok(match high {
                AccessResult::Done { value: v1, mmio, .. } => AccessResult::Done {
                    gpa: gpa0,
                    value: v0 | v1 << (8 * in_page),
                    mmio,
                },
                fault => fault,
            });
        }
        self.cpu.stats.accesses += 1;
        let mut last = None;
        // Consecutive exits the MMU answered as fixed, the same exit again.
        let mut stuck = 0u32;
        let mut fixed = None;
        for retry in 0..MAX_RETRIES {
            if retry >= YIELD_AFTER {
                self.cpu.exit_guest();
                crate::sync::yield_now();
            }
            if !self.cpu.settled || self.ctx.roots_changed() {
                // A request to process first: outside guest mode (it may
                // take `mmu_lock`, which a flusher waiting for this vCPU
                // may hold).
                self.cpu.exit_guest();
                self.ctx.reload(&mut self.cpu)?;
                self.cpu.settled = true;
                self.cpu.settled_tag = self.tag();
            }
            self.enter_guest();
            let attempt = self.ctx.attempt(&mut self.cpu, gva, access, size, value);
            if !matches!(attempt, Attempt::Done(_)) || !self.cpu.session {
                self.cpu.exit_guest();
            }
            let exit = match attempt {
                Attempt::Done(result) => return Ok(result),
                Attempt::Exit(exit) => exit,
            };
            if fixed == Some(exit) {
                stuck += 1;
                if stuck >= LIVELOCK_EXITS {
                    return Err(self.livelock(gva, access, stuck, exit.tdp()));
                }
            } else {
                stuck = 0;
            }
            if let Some(e) = exit.tdp() {
                last = Some(e);
            }
            let answered_fixed = match self.ctx.handle_exit(&mut self.cpu, exit, gva, access, size, value)? {
                ExitAnswer::Done(result) => return Ok(result),
                ExitAnswer::Fixed => true,
                ExitAnswer::Retry => false,
            };
            fixed = answered_fixed.then_some(exit);
        }
        Err(VcpuError::NoProgress { gva, last })
    }

    /// The error of an access the MMU keeps answering as fixed while the
    /// hardware keeps exiting, with the state that caused it.
    #[cold]
    fn livelock(&self, gva: Gva, access: Access, exits: u32, exit: Option<NestedFault>) -> VcpuError {
        let state = format!(
            "CR0 {:?}, CR4 {:?}, EFER {:?}, CR3 {:#x}, PKRU {:#x}, paging {:?}, {} MMU, last exit {}",
            self.cpu.regs.cr0,
            self.cpu.regs.cr4,
            self.cpu.regs.efer,
            self.cpu.cr3,
            self.cpu.pkru,
            self.cpu.paging.mode(),
            self.ctx.name(),
            exit.map_or_else(|| "a #PF of the shadow walk".to_string(), |e| format!("{e:?}"))
        );
        tracing::error!(target: "kvm_mmu", gva = gva.raw(), ?access, exits, %state, "livelock");
        VcpuError::Livelock {
            gva,
            access,
            exits,
            state,
        }
    }
}
