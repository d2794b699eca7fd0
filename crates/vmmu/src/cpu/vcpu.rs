//! A vCPU running on the TDP MMU: architectural state, its TLB, and the
//! access path (TLB → two-dimensional walk → exit to the MMU → retry).

use std::sync::Arc;

use super::hw::{EptExit, EptGuestMemory, EptStage, EptTranslator};
use super::tlb::{Flush, Tlb, TlbConfig, TlbEntry, TlbTag};
use crate::addr::{Gpa, Hpa, Pfn};
use crate::arch::control::is_canonical;
use crate::arch::control::{CR3_NOFLUSH, CR3_PAE_PDPT_MASK, CR3_PCID_MASK, CpuFeatures, Cr0, Cr4, PagingMode};
use crate::arch::ept::{EptViolationQual, Eptp};
use crate::arch::perm::{Access, AccessKind, AccessRights};
use crate::arch::pfec::PfErrorCode;
use crate::arch::pte::PT_GLOBAL;
use crate::arch::pte::PteEpt;
use crate::mem::{DirtyRing, MemslotTable, SlotCache};
use crate::mmu::flush::VcpuMode;
use crate::mmu::tdp::{FaultOutcome, RootRef, TdpError, TdpFault, TdpMmu};
use crate::walker::{ControlRegs, EntrySize, GuestPaging, Paging, PtMemory, WalkError};

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
    /// Exceptions delivered to the guest.
    pub guest_faults: u64,
    /// Full TLB flushes requested by the MMU.
    pub remote_flushes: u64,
    /// Roots dropped after a fast zap and reloaded.
    pub root_reloads: u64,
}

/// How one try of an access ended.
enum Attempt {
    /// The access completed or the guest takes a fault.
    Done(AccessResult),
    /// An EPT exit; `final_gpa` is set when the final translation exited.
    Exit { exit: EptExit, final_gpa: Option<Gpa> },
}

/// Retries of one access before the vCPU reports that the MMU made no
/// progress. Each retry follows an MMU fix, a lost race or an MMU-notifier
/// invalidation; a correct MMU converges in a few unless the host keeps
/// invalidating the same page, so after [`YIELD_AFTER`] retries the vCPU
/// yields to let the invalidating thread finish.
const MAX_RETRIES: u32 = 100_000;
/// Retries after which a vCPU yields its core between attempts.
const YIELD_AFTER: u32 = 8;

/// Why an access could not complete.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The MMU failed.
    #[error(transparent)]
    Mmu(#[from] TdpError),
    /// The MMU kept answering "retry".
    #[error("no progress on {gva:#x} after {MAX_RETRIES} retries (last exit {last:?})")]
    NoProgress {
        /// The linear address.
        gva: u64,
        /// The last exit.
        last: Option<EptExit>,
    },
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
pub struct Vcpu {
    mmu: Arc<TdpMmu>,
    slots: Arc<MemslotTable>,
    root: RootRef,
    features: CpuFeatures,
    regs: ControlRegs,
    cr3: u64,
    pdptes: [u64; 4],
    pkru: u32,
    paging: GuestPaging,
    /// The EPT paging configuration (precomputed once: it only depends on
    /// the MMU's configuration).
    ept_paging: Paging<PteEpt>,
    tlb: Tlb,
    vpid: u16,
    mode: Arc<VcpuMode>,
    seen_flush_gen: u64,
    seen_root_gen: u64,
    slot_cache: SlotCache,
    dirty_ring: Option<Arc<DirtyRing>>,
    stats: VcpuStats,
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.mmu.remote_tlb().unregister(&self.mode);
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
        let root = mmu.get_root(0)?;
        let regs = ControlRegs::default();
        let ept_paging = Paging::ept(mmu.config().geometry.levels, mmu.config().ad, &CpuFeatures::default());
        Ok(Vcpu {
            dirty_ring: mmu.dirty_ring_size().map(|size| Arc::new(DirtyRing::new(size))),
            mode: mmu.remote_tlb().register(),
            seen_flush_gen: mmu.remote_tlb().generation(),
            seen_root_gen: mmu.root_generation(),
            mmu,
            slots,
            root,
            features,
            regs,
            cr3: 0,
            pdptes: [0; 4],
            pkru: 0,
            paging: GuestPaging::new(&regs, &features),
            ept_paging,
            tlb: Tlb::new(TlbConfig::default()),
            vpid,
            slot_cache: SlotCache::default(),
            stats: VcpuStats::default(),
        })
    }

    /// The counters.
    pub fn stats(&self) -> VcpuStats {
        self.stats
    }

    /// The root this vCPU runs on.
    pub fn root(&self) -> &RootRef {
        &self.root
    }

    /// The TLB.
    pub fn tlb(&self) -> &Tlb {
        &self.tlb
    }

    /// The control registers.
    pub fn regs(&self) -> ControlRegs {
        self.regs
    }

    /// Sets CR0, CR4 and EFER together (as at VM entry), and CR3 and PKRU,
    /// flushing everything (KVM's `kvm_mmu_reset_context`).
    pub fn set_state(&mut self, regs: ControlRegs, cr3: u64, pkru: u32) -> Result<(), VcpuError> {
        self.regs = regs;
        self.pkru = pkru;
        self.paging = GuestPaging::new(&regs, &self.features);
        self.tlb.flush(Flush::Everything);
        self.mov_cr3(cr3)
    }

    /// MOV to CR0 changing only CR0.WP: no invalidation (rights are
    /// re-checked at every access; SDM 4.10.4.1).
    pub fn set_cr0_wp(&mut self, wp: bool) {
        self.regs.cr0.set(Cr0::WP, wp);
        self.paging = GuestPaging::new(&self.regs, &self.features);
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
        }
        self.paging = GuestPaging::new(&self.regs, &self.features);
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
            eptp: self.root.root().pfn().raw(),
            pcid: self.pcid(),
        }
    }

    /// MOV to CR3 (KVM's `kvm_mmu_new_pgd`): with PCIDE, bit 63 means no
    /// flush; otherwise the new PCID's non-global translations go. In PAE
    /// paging the PDPTE registers are loaded here.
    pub fn mov_cr3(&mut self, value: u64) -> Result<(), VcpuError> {
        let pcide = self.regs.cr4.contains(Cr4::PCIDE);
        let noflush = pcide && value & CR3_NOFLUSH != 0;
        self.cr3 = if pcide { value & !CR3_NOFLUSH } else { value };
        if !noflush {
            self.tlb.flush(Flush::Pcid(self.tag()));
        }
        if self.paging.mode() == PagingMode::Pae {
            self.load_pdptes()?;
        }
        Ok(())
    }

    fn load_pdptes(&mut self) -> Result<(), VcpuError> {
        let base = self.cr3 & CR3_PAE_PDPT_MASK;
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
        self.tlb.flush(Flush::Page { va, tag: self.tag() });
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
        self.dirty_ring.as_ref()
    }

    /// This vCPU's VPID.
    pub fn vpid(&self) -> u16 {
        self.vpid
    }

    fn ept(&self) -> EptTranslator<'_> {
        EptTranslator::with_paging(
            self.mmu.arena(),
            Hpa::new(self.root.root().pfn().raw() << 12),
            self.ept_paging,
        )
    }

    fn guest_memory(&self, stage: EptStage) -> EptGuestMemory<'_> {
        EptGuestMemory {
            ept: self.ept(),
            slots: &self.slots,
            as_id: self.root.root().as_id(),
            stage,
        }
    }

    /// Processes the obsolete-root request (outside guest mode): drops an
    /// invalidated root and loads the address space's valid one.
    fn reload_root_if_obsolete(&mut self) -> Result<(), VcpuError> {
        let generation = self.mmu.root_generation();
        if generation != self.seen_root_gen {
            self.seen_root_gen = generation;
            if !self.root.root().is_valid() {
                let old = self.root.root().pfn().raw();
                self.root = self.mmu.get_root(self.root.root().as_id())?;
                self.tlb.flush(Flush::Eptp(old));
                self.stats.root_reloads += 1;
            }
        }
        Ok(())
    }

    /// Enters guest mode, first flushing the translations made through this
    /// MMU if it asked for a remote flush since the last entry (KVM's
    /// `KVM_REQ_TLB_FLUSH` processed at VM entry).
    fn enter_guest(&mut self) {
        let generation = self.mode.enter(self.mmu.remote_tlb());
        if generation != self.seen_flush_gen {
            self.seen_flush_gen = generation;
            self.tlb.flush(Flush::Eptp(self.root.root().pfn().raw()));
            self.stats.remote_flushes += 1;
        }
    }

    /// Leaves guest mode (a VM exit): from here the vCPU may wait for
    /// `mmu_lock`, and flushes need not wait for it.
    fn exit_guest(&self) {
        self.mode.exit();
    }

    /// Hands an exit to the MMU (outside guest mode).
    fn handle_exit(&mut self, exit: EptExit) -> Result<FaultOutcome, VcpuError> {
        let (write, exec) = match exit {
            EptExit::Violation { qual, .. } => {
                self.stats.ept_violations += 1;
                (
                    qual.contains(EptViolationQual::WRITE),
                    qual.contains(EptViolationQual::FETCH),
                )
            }
            EptExit::Misconfig { .. } => {
                self.stats.ept_misconfigs += 1;
                (false, false)
            }
        };
        let fault = TdpFault {
            gpa: exit.gpa(),
            write,
            exec,
        };
        Ok(self
            .mmu
            .page_fault(&self.root, fault, &mut self.slot_cache, self.dirty_ring.as_deref())?)
    }

    /// One access of `size` (1..=8) bytes at `gva`, as the instruction at
    /// `cpl` with RFLAGS.AC = `ac` makes it; a write stores the low `size`
    /// bytes of `value`. An access that crosses a page is split in two.
    ///
    /// With the dirty ring enabled, a vCPU whose ring reached its soft
    /// limit does not run: the access returns
    /// [`AccessResult::DirtyRingFull`] without touching anything.
    pub fn access(
        &mut self,
        gva: u64,
        kind: AccessKind,
        cpl: u8,
        ac: bool,
        size: usize,
        value: u64,
    ) -> Result<AccessResult, VcpuError> {
        if self.dirty_ring.as_ref().is_some_and(|r| r.soft_full()) {
            return Ok(AccessResult::DirtyRingFull);
        }
        self.access_split(gva, kind, cpl, ac, size, value)
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
        debug_assert!((1..=8).contains(&size));
        let in_page = (0x1000 - (gva & 0xfff)) as usize;
        if size > in_page {
            let low = self.access_split(gva, kind, cpl, ac, in_page, value)?;
            let AccessResult::Done {
                value: v0, gpa: gpa0, ..
            } = low
            else {
                return Ok(low);
            };
            let high = self.access_split(
                gva + in_page as u64,
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
        for retry in 0..MAX_RETRIES {
            if retry >= YIELD_AFTER {
                std::thread::yield_now();
            }
            self.reload_root_if_obsolete()?;
            self.enter_guest();
            let attempt = {
                // Pinned for the whole attempt: tables the MMU unlinks
                // meanwhile are not freed under the walk.
                let _epoch = crossbeam_epoch::pin();
                self.attempt(gva, access, size, value)
            };
            self.exit_guest();
            match attempt {
                Attempt::Done(result) => return Ok(result),
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
                }
            }
        }
        Err(VcpuError::NoProgress { gva, last })
    }

    /// One try of a one-page access in guest mode: TLB, else the
    /// two-dimensional walk; an EPT exit ends the try.
    fn attempt(&mut self, gva: u64, access: Access, size: usize, value: u64) -> Attempt {
        let tag = self.tag();
        let write = access.is_write();
        if let Some(e) = self.tlb.lookup(gva, tag) {
            if self.check(access, &e) {
                self.stats.tlb_hits += 1;
                return Attempt::Done(self.touch(e.hpa(gva), Gpa::new(e.gpa(gva)), write, size, value));
            }
            // Rights cached, not decisions: a hit that faults, or a write
            // through a clean entry, walks again.
            self.tlb.remove(gva, tag);
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
                    && (ept_walk.dirty || !self.mmu.config().ad),
            });
        }
        Attempt::Done(self.touch(Hpa::new(ept_walk.gpa.raw()), walk.gpa, write, size, value))
    }

    /// Whether a cached translation serves `access` now.
    fn check(&self, access: Access, e: &TlbEntry) -> bool {
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
    fn touch(&self, hpa: Hpa, gpa: Gpa, write: bool, size: usize, value: u64) -> AccessResult {
        let arena = self.mmu.arena();
        let pfn = Pfn::new(hpa.raw() >> 12);
        let offset = hpa.page_offset() as usize;
        let mut buf = [0u8; 8];
        let value = if write {
            arena.write(pfn, offset, &value.to_le_bytes()[..size]);
            0
        } else {
            arena.read(pfn, offset, &mut buf[..size]);
            u64::from_le_bytes(buf)
        };
        AccessResult::Done {
            gpa,
            value,
            mmio: false,
        }
    }
}
