//! A vCPU's context on the TDP MMU: its root, its memory caches and dirty
//! ring, the two-dimensional walk the hardware makes through the MMU's
//! tables (EPT on Intel, NPT on AMD), and the exits (EPT violations and
//! misconfigurations, #NPFs) handed to `kvm_tdp_mmu_page_fault`.

use std::sync::Arc;

use super::{Attempt, Exit, ExitAnswer, GuestFlush, VcpuMmu};
use crate::addr::{Gpa, Gva, Hpa, Pfn};
use crate::arch::control::{CpuFeatures, Cr4, PagingMode, Vendor};
use crate::arch::perm::{Access, AccessRights};
use crate::arch::pte::PT_GLOBAL;
use crate::cpu::hw::{HostPhys, TdpGuestMemory, TdpTranslator};
use crate::cpu::state::{AccessResult, CpuState, GuestFault, MAX_RETRIES, VcpuError};
use crate::cpu::tlb::{Flush, TlbEntry};
use crate::host::FrameArena;
use crate::mem::DirtyRing;
use crate::mmu::cache::MmuCaches;
use crate::mmu::flush::RemoteTlb;
use crate::mmu::shadow::WalkerMemory;
use crate::mmu::tdp::{FaultOutcome, RootRef, TdpError, TdpFault, TdpMmu};
use crate::walker::nested::{NestedFault, NestedPaging, NestedStage};
use crate::walker::{CountingMemory, EntrySize, PtMemory, WalkError};

/// A vCPU's view of the TDP MMU.
pub(crate) struct TdpContext {
    mmu: Arc<TdpMmu>,
    root: RootRef,
    /// How the hardware walks the tree (the vendor's format, precomputed
    /// once: it only depends on the MMU's configuration), at the root.
    nested: NestedPaging,
    seen_root_gen: u64,
    /// Its memslot cache and the frames its faults link as tables.
    caches: MmuCaches,
    dirty_ring: Option<Arc<DirtyRing>>,
}

impl TdpContext {
    /// A context on address space 0 of `mmu`.
    pub(crate) fn new(mmu: Arc<TdpMmu>) -> Result<TdpContext, TdpError> {
        let geometry = mmu.config().geometry;
        if geometry.bits_per_level != 9 || !matches!(geometry.levels, 4 | 5) {
            // The hardware model walks the tree as EPT or NPT.
            return Err(TdpError::NotEptGeometry { geometry });
        }
        let c = mmu.config();
        let features = CpuFeatures::default();
        let root = mmu.get_root(0)?;
        let at = Hpa::new(root.root().pfn().raw() << 12);
        let nested = match c.vendor {
            Vendor::Intel => NestedPaging::ept(at, geometry.levels, c.ad, &features),
            Vendor::Amd if !c.ad => return Err(TdpError::NptWithoutAd),
            Vendor::Amd => NestedPaging::npt(at, geometry.levels, true, &features),
        };
        Ok(TdpContext {
            root,
            nested,
            dirty_ring: mmu.dirty_ring_size().map(|size| Arc::new(DirtyRing::new(size))),
            seen_root_gen: mmu.root_generation(),
            caches: mmu.vcpu_caches(),
            mmu,
        })
    }

    fn tdp(&self) -> TdpTranslator<'_> {
        TdpTranslator::new(self.mmu.arena(), self.nested)
    }

    fn guest_memory<'a>(&'a self, cpu: &'a CpuState, stage: NestedStage) -> TdpGuestMemory<'a> {
        TdpGuestMemory {
            tdp: self.tdp(),
            host: CountingMemory::new(HostPhys(self.mmu.arena())),
            slots: &cpu.slots,
            as_id: self.root.root().as_id(),
            stage,
        }
    }

    /// Hands a TDP exit to the MMU (outside guest mode): KVM's
    /// `handle_ept_violation`, `handle_ept_misconfig` and
    /// `npf_interception`, each reduced to the fault's gpa and access.
    fn page_fault(&mut self, cpu: &mut CpuState, exit: NestedFault) -> Result<FaultOutcome, VcpuError> {
        // Counted as the exit a VMX host would take (a #NPF with RSVD is
        // the AMD host's MMIO exit, as a misconfiguration is Intel's).
        if exit.is_reserved_bit() {
            cpu.stats.ept_misconfigs += 1;
        } else {
            cpu.stats.ept_violations += 1;
        }
        let (write, exec, present) = exit.access_bits();
        let fault = TdpFault {
            gpa: exit.gpa(),
            write,
            exec,
            present,
        };
        Ok(self
            .mmu
            .page_fault(&self.root, fault, &mut self.caches, self.dirty_ring.as_deref())?)
    }
}

impl VcpuMmu for TdpContext {
    fn name(&self) -> &'static str {
        "TDP"
    }

    fn arena(&self) -> &Arc<FrameArena> {
        self.mmu.arena()
    }

    #[inline]
    fn remote_tlb(&self) -> &RemoteTlb {
        self.mmu.remote_tlb()
    }

    #[inline]
    fn remote_flush(&self, _vpid: u16) -> Flush {
        Flush::Eptp(self.eptp())
    }

    #[inline]
    fn eptp(&self) -> u64 {
        self.root.root().pfn().raw()
    }

    #[inline]
    fn roots_changed(&self) -> bool {
        self.mmu.root_generation() != self.seen_root_gen
    }

    #[inline]
    fn fast_path_va(&self, cpu: &CpuState, gva: Gva) -> Option<u64> {
        let pending = self.roots_changed()
            || self.dirty_ring.as_ref().is_some_and(|r| r.soft_full())
            || self.mmu.remote_tlb().requested() != cpu.seen_flush_gen;
        (!pending).then_some(gva.raw())
    }

    fn dirty_ring(&self) -> Option<&Arc<DirtyRing>> {
        self.dirty_ring.as_ref()
    }

    fn tdp_root(&self) -> Option<&RootRef> {
        Some(&self.root)
    }

    fn shadow_root(&self) -> Option<Pfn> {
        None
    }

    /// The TDP MMU does not shadow the guest's tables: a guest flush is the
    /// TLB's business alone.
    fn guest_flush(&mut self, _flush: GuestFlush) {}

    fn before_cr3_load(&mut self, _cpu: &mut CpuState) -> Result<(), VcpuError> {
        Ok(())
    }

    /// The PDPTEs are read through EPT, as the hardware does: a read that
    /// exits is handed to the MMU and tried again.
    fn load_pdptes(&mut self, cpu: &mut CpuState, base: u64) -> Result<(), VcpuError> {
        let mut last = None;
        for _ in 0..MAX_RETRIES {
            self.reload(cpu)?;
            cpu.enter_guest(self.mmu.remote_tlb(), Flush::Eptp(self.eptp()));
            let _epoch = crossbeam_epoch::pin();
            let mut pdptes = [0u64; 4];
            let exit = {
                let mem = self.guest_memory(cpu, NestedStage::NoLinearAddress);
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
            cpu.exit_guest();
            match exit {
                None => {
                    cpu.pdptes = pdptes;
                    return Ok(());
                }
                Some(e) => {
                    last = Some(e);
                    self.page_fault(cpu, e)?;
                }
            }
        }
        Err(VcpuError::NoProgress {
            gva: Gva::new(base),
            last,
        })
    }

    /// Processes the obsolete-root request: drops an invalidated root and
    /// loads the address space's valid one.
    fn reload(&mut self, cpu: &mut CpuState) -> Result<(), VcpuError> {
        let generation = self.mmu.root_generation();
        if generation != self.seen_root_gen {
            // Seed 003: an obsolete root goes; under `ReloadAll` a valid
            // one too (`get_root` hands the same root back: a reload and a
            // flushed TLB for nothing).
            let all = self.mmu.zap_request() == crate::mmu::ZapRequest::ReloadAll;
            if (all || !self.root.root().is_valid()) && !crate::sync::bug(crate::sync::Bug::KeepObsoleteRoot) {
                let old = self.root.root().pfn().raw();
                // Out of frames for the new root: the request stays pending
                // (the generation unseen) and the next entry tries again,
                // rather than running on the invalid root, whose faults
                // retry forever.
                self.root = self.mmu.get_root(self.root.root().as_id())?;
                self.nested = self.nested.with_root(Hpa::new(self.root.root().pfn().raw() << 12));
                cpu.tlb.flush(Flush::Eptp(old));
                cpu.stats.root_reloads += 1;
            }
            self.seen_root_gen = generation;
        }
        Ok(())
    }

    /// One try: TLB, else the two-dimensional walk; an EPT exit ends it.
    fn attempt(&mut self, cpu: &mut CpuState, gva: Gva, access: Access, size: usize, value: u64) -> Attempt {
        let tag = cpu.tag(self.eptp());
        let write = access.is_write();
        // A TLB hit reads the data frame without an epoch: no frame a
        // translation in this TLB points at is freed before the flush that
        // removes it, and that flush waits for this vCPU to leave guest mode.
        if let Some(done) = cpu.tlb_hit(gva, tag, access, size, value, |cpu, e| self.check(cpu, access, e)) {
            return Attempt::Done(done);
        }
        // Pinned for the rest of the attempt: tables the MMU unlinks
        // meanwhile are not freed under the walk.
        let _epoch = crossbeam_epoch::pin();
        let r = self.root.root();
        if !r.is_valid() && r.invalidated_at() <= self.seen_root_gen {
            cpu.stats.invalid_root_uses += 1;
        }
        let root = cpu.paging.root(cpu.cr3, cpu.pdptes);
        let (walk, last, refs) = {
            let mem = self.guest_memory(cpu, NestedStage::GuestPagingStructure { gla: gva });
            let walk = cpu.paging.walk(&mem, &root, gva, access, cpu.pkru);
            let last = walk
                .as_ref()
                .ok()
                .map(|w| mem.translate_final(w.gpa, access.kind, w.va));
            (walk, last, mem.references())
        };
        // A TLB miss: the hardware walk and its memory references.
        cpu.stats.walks += 1;
        cpu.stats.walk_refs += refs;
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
                    exit: error,
                    final_gpa: None,
                });
            }
        };
        let ept_walk = match last.expect("the guest walk completed") {
            Ok(w) => w,
            Err(exit) => {
                return Attempt::Exit(Exit::Tdp {
                    exit,
                    final_gpa: Some(walk.gpa),
                });
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
                cpu.regs.cr4.contains(Cr4::PGE) && leaf & PT_GLOBAL != 0 && cpu.paging.mode() != PagingMode::None;
            cpu.tlb.insert(TlbEntry {
                va_base: walk.va.raw() & !mask,
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
        Attempt::Done(cpu.touch(Hpa::new(ept_walk.gpa.raw()), walk.gpa, write, size, value))
    }

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
            unreachable!("a shadow page fault on the TDP MMU")
        };
        let outcome = self.page_fault(cpu, exit)?;
        if matches!(outcome, FaultOutcome::Mmio | FaultOutcome::ReadOnlySlot) && final_gpa.is_none() {
            // The hardware's walk reached a guest page table it cannot use
            // as it must: one in a read-only memslot whose A/D bits the
            // walk sets, or one with no memory behind it. Retrying would
            // fault the same way forever; the VMM does the access in
            // software, as KVM's emulator does.
            return Ok(ExitAnswer::Done(self.emulate_access(cpu, gva, access, size, value)));
        }
        if outcome == FaultOutcome::WriteTracked {
            let tracker = self
                .mmu
                .write_tracker()
                .expect("only a tracker makes a gfn write-tracked");
            return Ok(match final_gpa {
                // L1 writes one of its nested tables: its shadow pages go
                // unsync and the write is made again through a writable
                // mapping, if they may (4K pages only); else the nested MMU
                // emulates the write (and zaps what it shadowed).
                Some(gpa) if tracker.try_unsync(gpa.frame()) => ExitAnswer::Retry,
                Some(gpa) => {
                    tracker.track_write(gpa, size, value);
                    ExitAnswer::Done(AccessResult::Done {
                        gpa,
                        value: 0,
                        mmio: false,
                    })
                }
                // A page walk's A/D update there: unprotect and retry.
                None => {
                    tracker.unprotect(exit.gpa());
                    ExitAnswer::Retry
                }
            });
        }
        if let (FaultOutcome::Mmio | FaultOutcome::ReadOnlySlot, Some(gpa)) = (outcome, final_gpa) {
            // The VMM emulates the access: reads see 0, writes are dropped.
            return Ok(ExitAnswer::Done(AccessResult::Done {
                gpa,
                value: 0,
                mmio: true,
            }));
        }
        Ok(if matches!(outcome, FaultOutcome::Fixed | FaultOutcome::Spurious) {
            ExitAnswer::Fixed
        } else {
            ExitAnswer::Retry
        })
    }

    #[inline]
    fn check(&self, cpu: &CpuState, access: Access, e: &TlbEntry) -> bool {
        super::check_2d(cpu, access, e)
    }

    fn set_string_op(&mut self, _on: bool) {}

    fn release(&mut self) {}
}

impl TdpContext {
    /// The access made in software (KVM's emulator): the guest's walk over
    /// its tables as the VMM reads them (no memory behind one: zeros),
    /// their A/D bits set where the memory is writable and left alone
    /// where it is not (KVM's `pte_writable`: a table in a read-only
    /// memslot is never written), then the access itself to memory,
    /// logged as the vCPU's write, or to MMIO (reads see 0, writes are
    /// dropped). Nothing is cached in the TLB.
    fn emulate_access(&self, cpu: &CpuState, gva: Gva, access: Access, size: usize, value: u64) -> AccessResult {
        let memory = self.mmu.memory();
        let root = cpu.paging.root(cpu.cr3, cpu.pdptes);
        let walk = match cpu.paging.walk(&WalkerMemory(&memory), &root, gva, access, cpu.pkru) {
            Ok(w) => w,
            Err(WalkError::PageFault(pf)) => {
                return AccessResult::Fault(GuestFault::PageFault {
                    error_code: pf.error_code,
                    gva,
                });
            }
            Err(WalkError::NonCanonical) => return AccessResult::Fault(GuestFault::GeneralProtection),
            Err(WalkError::Memory { error, .. }) => match error {},
        };
        let gpa = walk.gpa;
        if access.is_write() {
            let written = self.mmu.emulated_write(gpa, size, value, self.dirty_ring.as_deref());
            AccessResult::Done {
                gpa,
                value: 0,
                mmio: !written,
            }
        } else {
            match memory.read_value(gpa, size) {
                Ok(value) => AccessResult::Done {
                    gpa,
                    value,
                    mmio: false,
                },
                Err(_) => AccessResult::Done {
                    gpa,
                    value: 0,
                    mmio: true,
                },
            }
        }
    }
}
