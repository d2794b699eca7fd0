//! A vCPU running an L2 guest for an L1 hypervisor that uses nested
//! paging: the nested MMU (KVM's `kvm_init_shadow_npt_mmu`).
//!
//! L1 gives its L2 guest NPT12 (the VMCB's nCR3: tables in L1's memory
//! that translate L2-physical to L1-physical addresses). The hardware needs
//! tables that translate L2-physical to host-physical addresses, so L0
//! shadows NPT12 with the shadow MMU: NPT02, shadow pages in the same
//! long-mode format, with `role.guest_mode` set, built by the same
//! `ShadowMmu::page_fault` with the L2-physical address where a guest
//! shadow MMU has a linear address, NPT12's root where it has CR3, and
//! L1's memslots where it has the guest's. The L2 guest's own paging is
//! walked by the hardware model over NPT02 (two-dimensional, as on the TDP
//! MMU). A #NPF of that walk goes to the nested MMU: it fixes NPT02 from
//! NPT12, or, when NPT12 itself does not allow the access, reflects a #NPF
//! to L1 with the error code NPT12's walk gives and the stage the
//! hardware reported (KVM's `nested_svm_inject_npf_exit`):
//! [`AccessResult::VmExit`].
//!
//! NPT02's roots are cached by NPT12 root, 3 besides the current (KVM's
//! `prev_roots` across L1's switches between its L2 guests, seed 001).

use std::sync::Arc;

use super::roots::{RootCache, Switch};
use super::{Attempt, Exit, ExitAnswer, GuestFlush, VcpuMmu};
use crate::addr::{Gpa, Gva, Hpa, Pfn};
use crate::arch::control::{CpuFeatures, Cr4, PagingMode};
use crate::arch::perm::{Access, AccessKind, AccessRights, Privilege};
use crate::arch::pfec::PfErrorCode;
use crate::arch::pte::PT_GLOBAL;
use crate::cpu::hw::HostPhys;
use crate::cpu::state::{AccessResult, CpuState, GuestFault, VcpuError};
use crate::cpu::tlb::{Flush, TlbEntry};
use crate::host::FrameArena;
use crate::mem::DirtyRing;
use crate::mmu::cache::MmuMemoryCache;
use crate::mmu::flush::RemoteTlb;
use crate::mmu::shadow::role::GuestContext;
use crate::mmu::shadow::roots::ShadowRoots;
use crate::mmu::shadow::{ShadowMmu, ShadowOutcome};
use crate::mmu::tdp::RootRef;
use crate::walker::nested::{
    NPF_FINAL_TRANSLATION, NPF_GUEST_PAGE_TABLE, NestedError, NestedFault, NestedMemory, NestedPaging, NestedStage,
};
use crate::walker::{CountingMemory, EntrySize, GuestPaging, PtMemory, Root, WalkError};

/// Roots kept besides the current ones (KVM's `KVM_MMU_NUM_PREV_ROOTS`).
pub const NESTED_PREV_ROOTS: usize = 3;

/// L1's nested paging for its L2 guest, as L1 programs it in the VMCB.
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

impl L1Npt {
    fn context(&self) -> GuestContext {
        GuestContext::nested_npt(self.levels, self.nxe)
    }

    fn root(&self) -> u64 {
        self.ncr3 & crate::arch::pte::PT64_ADDR_MASK
    }
}

/// A vCPU's view of the nested MMU.
pub(crate) struct NestedContext {
    mmu: Arc<ShadowMmu>,
    /// What L1 programmed.
    npt: L1Npt,
    /// NPT12 as the shadow MMU walks it (`npt`'s paging).
    npt12: GuestPaging,
    /// How the hardware walks NPT02, at the current root.
    hw: NestedPaging,
    roots: RootCache<L1Npt>,
    seen_root_gen: u64,
    /// Frames for the shadow pages its faults and root loads create.
    tables: MmuMemoryCache,
}

impl NestedContext {
    /// A context on `mmu` (address space 0) running L2 under `npt`.
    ///
    /// # Panics
    /// If `npt.levels` is not 4 or 5 (L1's paging mode; the L1 model
    /// chose it).
    pub(crate) fn new(mmu: Arc<ShadowMmu>, npt: L1Npt, features: &CpuFeatures) -> NestedContext {
        let hw = NestedPaging::npt(Hpa::new(0), npt.levels, true, features);
        let npt12 = NestedPaging::npt(Hpa::new(npt.ncr3), npt.levels, npt.nxe, features)
            .guest_paging()
            .expect("NPT is a guest paging format");
        NestedContext {
            tables: MmuMemoryCache::new(mmu.arena().clone()),
            seen_root_gen: mmu.root_generation(),
            mmu,
            npt,
            npt12,
            hw,
            roots: RootCache::new(NESTED_PREV_ROOTS),
        }
    }

    /// L1 changes its nested paging (a VMRUN with another nCR3, for
    /// another L2 or the same one): the roots switch at the next access.
    pub(crate) fn set_npt(&mut self, npt: L1Npt, features: &CpuFeatures) {
        if npt.levels != self.npt.levels || npt.nxe != self.npt.nxe {
            self.npt12 = NestedPaging::npt(Hpa::new(npt.ncr3), npt.levels, npt.nxe, features)
                .guest_paging()
                .expect("NPT is a guest paging format");
            self.hw = NestedPaging::npt(Hpa::new(0), npt.levels, true, features);
        }
        self.npt = npt;
    }

    fn roots(&self) -> Option<&ShadowRoots> {
        self.roots.current().map(|(_, r)| r)
    }

    /// The hardware's view of NPT02 at the current root.
    fn npt02(&self) -> Option<NestedPaging> {
        self.roots()
            .map(|r| self.hw.with_root(Hpa::new(r.hw_root().raw() << 12)))
    }

    /// Hands a #NPF of NPT02 to the nested MMU (outside guest mode).
    fn page_fault(&mut self, cpu: &mut CpuState, exitinfo1: u64, l2_gpa: u64) -> Result<ShadowOutcome, VcpuError> {
        let Some((_, roots)) = self.roots.current() else {
            return Ok(ShadowOutcome::Retry);
        };
        cpu.stats.shadow_exits += 1;
        let ec = PfErrorCode::from_bits_truncate(exitinfo1 as u32);
        let kind = if ec.contains(PfErrorCode::FETCH) {
            AccessKind::Fetch
        } else if ec.contains(PfErrorCode::WRITE) {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        // NPT accesses are user accesses.
        let access = Access {
            kind,
            privilege: Privilege::User,
            rflags_ac: false,
        };
        let groot = Root::Table(Gpa::new(self.npt.root()));
        Ok(self.mmu.page_fault(
            roots,
            &self.npt12,
            &groot,
            Gva::new(l2_gpa),
            access,
            0,
            &mut self.tables,
        )?)
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
        self.mmu.root_generation() != self.seen_root_gen || self.roots.current().is_none_or(|(k, _)| *k != self.npt)
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
    /// loads nothing.
    fn load_pdptes(&mut self, _cpu: &mut CpuState, _base: u64) -> Result<(), VcpuError> {
        Ok(())
    }

    /// Drops obsolete roots, and switches to the roots of L1's current
    /// NPT12 (from `prev_roots` when it can: KVM's `kvm_mmu_new_pgd` on a
    /// nested VMRUN).
    fn reload(&mut self, cpu: &mut CpuState) -> Result<(), VcpuError> {
        let generation = self.mmu.root_generation();
        if generation != self.seen_root_gen {
            self.seen_root_gen = generation;
            if self.roots.drop_obsolete(&self.mmu) {
                cpu.tlb.flush(Flush::Vpid(cpu.vpid));
                cpu.stats.root_reloads += 1;
            }
        }
        let key = self.npt;
        let (mmu, tables) = (&self.mmu, &mut self.tables);
        let how = self.roots.switch(mmu, key, || {
            mmu.load_roots(&key.context(), 0, key.root(), [0; 4], tables)
        })?;
        if how != Switch::Current {
            cpu.tlb.clear_l1();
        }
        Ok(())
    }

    /// One try: TLB, else L2's walk over NPT02 (two-dimensional); a #NPF
    /// of NPT02 ends it.
    fn attempt(&mut self, cpu: &mut CpuState, gva: Gva, access: Access, size: usize, value: u64) -> Attempt {
        let Some(npt02) = self.npt02() else {
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
            let root = if cpu.paging.mode() == PagingMode::Pae {
                // Under NPT a PAE guest's walk reads its PDPTE through the
                // nested tables like every other entry (no PDPTE registers).
                let pdpt = cpu.cr3 & crate::arch::control::CR3_PAE_PDPT_MASK;
                let index = ((cpu.linear(gva).raw() >> 30) & 3) as usize;
                let mut pdptes = [0u64; 4];
                match mem.read_entry(Gpa::new(pdpt + 8 * index as u64), EntrySize::Eight) {
                    Ok(v) => pdptes[index] = v,
                    Err(e) => {
                        return Attempt::Exit(Exit::Tdp {
                            exit: fault_of(e),
                            final_gpa: None,
                        });
                    }
                }
                Root::PaeRegs {
                    pdpt: Gpa::new(pdpt),
                    pdptes,
                }
            } else {
                cpu.paging.root(cpu.cr3, cpu.pdptes)
            };
            cpu.paging.walk(&mem, &root, gva, access, cpu.pkru)
        };
        let last = walk.as_ref().ok().map(|w| {
            npt02
                .translate(&host, w.gpa, access.kind, NestedStage::Final { gla: w.va })
                .map_err(fault_of)
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
                    exit: fault_of(error),
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
        // NPT02 maps 4K pages only: the TLB caches 4K.
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

    /// A #NPF of NPT02: fixed from NPT12, reflected to L1, emulated.
    fn handle_exit(
        &mut self,
        cpu: &mut CpuState,
        exit: Exit,
        _gva: Gva,
        _access: Access,
        size: usize,
        value: u64,
    ) -> Result<ExitAnswer, VcpuError> {
        let Exit::Tdp { exit, final_gpa } = exit else {
            // No roots yet: load them.
            return Ok(ExitAnswer::Retry);
        };
        let NestedFault::Npf { exitinfo1, exitinfo2 } = exit else {
            unreachable!("NPT02 exits with #NPF")
        };
        let stage = exitinfo1 & (NPF_FINAL_TRANSLATION | NPF_GUEST_PAGE_TABLE);
        Ok(match self.page_fault(cpu, exitinfo1, exitinfo2)? {
            ShadowOutcome::Fixed => ExitAnswer::Fixed,
            ShadowOutcome::Retry => ExitAnswer::Retry,
            ShadowOutcome::GuestPageFault(ec) => {
                // NPT12 refuses: L1 takes the #NPF (KVM's
                // `nested_svm_inject_npf_exit`), with NPT12's error code
                // and the stage the hardware reported.
                ExitAnswer::Done(AccessResult::VmExit(NestedFault::Npf {
                    exitinfo1: u64::from(ec.bits()) | stage,
                    exitinfo2,
                }))
            }
            ShadowOutcome::GuestGeneralProtection => {
                unreachable!("an L2-physical address has no canonical form")
            }
            // No memslot at the L1-physical address NPT12 gives: the VMM
            // emulates the access there (KVM reports the L1 gpa, in the
            // address space the VMM owns).
            ShadowOutcome::Mmio(l1_gpa) | ShadowOutcome::ReadOnlySlot(l1_gpa) => ExitAnswer::Done(AccessResult::Done {
                gpa: l1_gpa,
                value: 0,
                mmio: true,
            }),
            // L2 writes a page that is one of L1's NPT12 tables. A page
            // walk's A/D update unprotects it and retries (KVM, for a
            // #NPF with the guest-page bit); a store is emulated.
            ShadowOutcome::EmulateWrite(gpa) if final_gpa.is_none() => {
                self.mmu.unprotect_gfn_and_retry(gpa);
                ExitAnswer::Retry
            }
            ShadowOutcome::EmulateWrite(gpa) => {
                self.mmu.emulate_write(gpa, size, value)?;
                ExitAnswer::Done(AccessResult::Done {
                    gpa: final_gpa.unwrap_or(Gpa::new(exitinfo2)),
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

/// NPT02 points only into the arena; an entry that does not is an MMU bug,
/// reported as the reserved-bit #NPF the hardware would take.
fn fault_of<E>(e: NestedError<E>) -> NestedFault {
    match e {
        NestedError::Fault(f) => f,
        NestedError::Host { hpa, .. } => NestedFault::Npf {
            exitinfo1: u64::from((PfErrorCode::PRESENT | PfErrorCode::RSVD | PfErrorCode::USER).bits())
                | NPF_GUEST_PAGE_TABLE,
            exitinfo2: hpa.raw(),
        },
    }
}
