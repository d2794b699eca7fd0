//! A vCPU's context on the shadow MMU: its current shadow roots and the
//! `prev_roots` cache, the syncs the guest's TLB flushes ask for, the
//! one-dimensional walk the hardware makes of the shadow tables, and the
//! #PF exits handed to the shadow MMU's page fault (with the choice
//! between unprotect-and-retry and emulation).

use std::sync::Arc;

use super::roots::{RootCache, Switch};
use super::{Attempt, Exit, ExitAnswer, GuestFlush, VcpuMmu};
use crate::addr::{Gpa, Gva, Hpa, PageSize, Pfn};
use crate::arch::control::{CR3_PCID_MASK, CpuFeatures, Cr0, Cr4, Efer, PagingMode};
use crate::arch::perm::Access;
use crate::arch::pte::{PT_GLOBAL, Pte64};
use crate::cpu::hw::HostPhys;
use crate::cpu::state::{AccessResult, CpuState, GuestFault, VcpuError};
use crate::cpu::tlb::{Flush, TlbEntry};
use crate::host::FrameArena;
use crate::mem::DirtyRing;
use crate::mmu::cache::MmuMemoryCache;
use crate::mmu::flush::RemoteTlb;
use crate::mmu::shadow::page::SptePtr;
use crate::mmu::shadow::role::GuestContext;
use crate::mmu::shadow::roots::ShadowRoots;
use crate::mmu::shadow::{ShadowMmu, ShadowOutcome};
use crate::mmu::tdp::RootRef;
use crate::walker::{ControlRegs, CountingMemory, Paging, Root, WalkError};

/// Roots kept besides the current ones (KVM's `KVM_MMU_NUM_PREV_ROOTS`).
pub const PREV_ROOTS: usize = 3;

/// Address syncs kept before they become one sync of everything.
const MAX_PENDING_ADDRS: usize = 64;

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
    addrs: Vec<(Gva, Option<u16>)>,
}

/// A vCPU's view of the shadow MMU: its current roots and the
/// `prev_roots` cache, most recently used first.
pub(crate) struct ShadowContext {
    mmu: Arc<ShadowMmu>,
    roots: RootCache<RootKey>,
    seen_root_gen: u64,
    requests: SyncRequests,
    /// The store being made is a string instruction's (`rep stos`), which
    /// KVM does not consider a page-table write.
    string_op: bool,
    /// Where the last unprotect-and-retry happened (KVM's
    /// `last_retry_addr`): a second fault there is emulated.
    last_retry: Option<Gva>,
    /// The hardware's paging configuration for walking the shadow tables.
    hw: Paging<Pte64>,
    /// Frames for the shadow pages its faults and root loads create,
    /// topped up before `mmu_lock`.
    tables: MmuMemoryCache,
}

impl ShadowContext {
    /// A context on `mmu`, address space 0, for a vCPU with `features`.
    /// Roots are loaded at the first access.
    pub(crate) fn new(mmu: Arc<ShadowMmu>, features: &CpuFeatures) -> ShadowContext {
        let tables = MmuMemoryCache::new(mmu.arena().clone());
        ShadowContext {
            seen_root_gen: mmu.root_generation(),
            mmu,
            roots: RootCache::new(PREV_ROOTS),
            requests: SyncRequests::default(),
            string_op: false,
            last_retry: None,
            hw: hw_paging(&ControlRegs::default(), features, 4),
            tables,
        }
    }

    fn roots(&self) -> Option<&ShadowRoots> {
        self.roots.current().map(|(_, r)| r)
    }

    /// Answers the guest's TLB flushes since the last access with syncs of
    /// the unsync pages they cover.
    fn process_sync_requests(&mut self) {
        let r = std::mem::take(&mut self.requests);
        if !r.current && !r.all && r.pcids.is_empty() && r.addrs.is_empty() {
            return;
        }
        for ((key, roots), is_current) in self.roots.all() {
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
}

impl VcpuMmu for ShadowContext {
    fn name(&self) -> &'static str {
        "shadow"
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

    /// Shadow paging has no EPTP: translations follow the guest's PCIDs,
    /// and the MMU's zaps flush them remotely.
    #[inline]
    fn eptp(&self) -> u64 {
        0
    }

    #[inline]
    fn roots_changed(&self) -> bool {
        self.mmu.root_generation() != self.seen_root_gen
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

    fn guest_flush(&mut self, flush: GuestFlush) {
        let r = &mut self.requests;
        match flush {
            GuestFlush::Cr3 => r.current = true,
            GuestFlush::Addr { va, pcid } => {
                if r.addrs.len() < MAX_PENDING_ADDRS {
                    r.addrs.push((va, pcid));
                } else {
                    r.all = true;
                }
            }
            GuestFlush::Pcid(pcid) => r.pcids.push(pcid),
            GuestFlush::All => r.all = true,
        }
    }

    /// A sync the last instruction asked for of the current root is done
    /// before a MOV CR3 runs: KVM processes KVM_REQ_MMU_SYNC at the VM
    /// entry between two intercepted MOV CR3s. Left pending, it would apply
    /// to the next CR3's root, and a return to this one without a flush
    /// (PCID no-flush) would find its unsync pages stale.
    fn before_cr3_load(&mut self, cpu: &mut CpuState) -> Result<(), VcpuError> {
        if self.requests.current {
            self.reload(cpu)?;
        }
        Ok(())
    }

    /// Read from guest memory (with no memslot, as zeros): the MMU
    /// intercepts the MOV CR3.
    fn load_pdptes(&mut self, cpu: &mut CpuState, base: u64) -> Result<(), VcpuError> {
        for (i, p) in cpu.pdptes.iter_mut().enumerate() {
            *p = self.mmu.memory().read_u64(Gpa::new(base + 8 * i as u64)).unwrap_or(0);
        }
        Ok(())
    }

    /// Drops obsolete roots, (re)loads the roots when the guest context,
    /// CR3 or the PDPTEs changed (from `prev_roots` when it can), and
    /// answers the pending syncs.
    fn reload(&mut self, cpu: &mut CpuState) -> Result<(), VcpuError> {
        let ctx = GuestContext::new(&cpu.regs, false);
        let pcide = cpu.regs.cr4.contains(Cr4::PCIDE);
        let key = RootKey {
            ctx,
            pgd: if pcide { cpu.cr3 } else { cpu.cr3 & !CR3_PCID_MASK },
            pdptes: cpu.pdptes,
            pcid: if pcide { (cpu.cr3 & CR3_PCID_MASK) as u16 } else { 0 },
        };
        let generation = self.mmu.root_generation();
        if generation != self.seen_root_gen {
            // Some root was zapped: drop every obsolete one, the current
            // roots and the cached ones alike.
            self.seen_root_gen = generation;
            let (current, cached) = self.roots.drop_obsolete(&self.mmu);
            cpu.stats.cached_roots_dropped += cached;
            if current {
                cpu.tlb.flush(Flush::Vpid(cpu.vpid));
                cpu.stats.root_reloads += 1;
            }
        }
        let current_key = self.roots.current().map(|(k, _)| *k);
        if current_key != Some(key) {
            // A new guest context (CR0.WP, SMEP, SMAP, EFER.NX, mode) means
            // new roles: translations cached from the old shadow pages may
            // grant more than the new context allows (the CR0.WP = 0
            // emulation), so they go, as KVM flushes when it loads a new
            // root. A CR3 change alone keeps the PCID semantics `mov_cr3`
            // applied.
            //
            // KVM unloads every root on a context change and syncs at the
            // reload; here cached roots of the old context stay, so
            // returning to one syncs it: its unsync pages may hold what a
            // flush in the other context (or a #PF there) removed.
            if current_key.is_some_and(|old| old.ctx != ctx) {
                cpu.tlb.flush(Flush::Vpid(cpu.vpid));
                self.requests.current = true;
            }
            // KVM's fast_pgd_switch: a recent address space's roots are
            // reused without rebuilding (KVM keeps prev_roots for 4- and
            // 5-level guests only; here the PDPTEs are part of the key, so
            // PAE and 32-bit guests get them too).
            let (mmu, tables) = (&self.mmu, &mut self.tables);
            // KVM's `is_root_usable`: the same tables, and a root role that
            // matches the context's (seed 001: compared normalised, roots
            // of contexts that differ only in bits the root does not use
            // are reused).
            let policy = mmu.prev_roots_match();
            let usable = |k: &RootKey, r: &ShadowRoots| {
                k.pgd == key.pgd
                    && k.pdptes == key.pdptes
                    && k.pcid == key.pcid
                    && r.role().is_root_role_of(&ctx, policy)
            };
            let how = self.roots.switch(mmu, key, usable, || {
                mmu.load_roots(&ctx, 0, key.pgd, cpu.pdptes, tables)
            })?;
            if how == Switch::Loaded {
                // A root load syncs what it links (KVM's `kvm_mmu_load`).
                self.requests.current = true;
            }
            let levels = self.roots().expect("switched to current roots").levels();
            self.hw = hw_paging(&cpu.regs, &cpu.features, levels);
            cpu.tlb.clear_l1();
        }
        self.process_sync_requests();
        Ok(())
    }

    /// One try: TLB, else the hardware walk of the shadow tables; a fault
    /// of that walk ends it.
    fn attempt(&mut self, cpu: &mut CpuState, gva: Gva, access: Access, size: usize, value: u64) -> Attempt {
        let gva = cpu.linear(gva);
        let tag = cpu.tag(0);
        let write = access.is_write();
        // Without an epoch on a hit, as on the TDP MMU.
        if let Some(done) = cpu.tlb_hit(gva, tag, access, size, value, |cpu, e| self.check(cpu, access, e)) {
            return Attempt::Done(done);
        }
        let _epoch = crossbeam_epoch::pin();
        let Some(roots) = self.roots() else {
            return Attempt::Exit(Exit::ShadowPageFault);
        };
        if self.mmu.roots_obsolete_by_acknowledged_zap(roots, self.seen_root_gen) {
            cpu.stats.invalid_root_uses += 1;
        }
        let root = Root::Table(Gpa::new(roots.hw_root().raw() << 12));
        let host = CountingMemory::new(HostPhys(self.mmu.arena()));
        let walk = self.hw.walk(&host, &root, gva, access, cpu.pkru);
        // A TLB miss: the hardware walk of the shadow tables and its memory
        // references.
        cpu.stats.walks += 1;
        cpu.stats.walk_refs += host.reads();
        let walk = match walk {
            Ok(w) => w,
            Err(WalkError::NonCanonical) => {
                cpu.stats.guest_faults += 1;
                return Attempt::Done(AccessResult::Fault(GuestFault::GeneralProtection));
            }
            Err(_) => return Attempt::Exit(Exit::ShadowPageFault),
        };
        // The guest-physical address: the gfn the leaf was installed for.
        let leaf = walk.entries[walk.level as usize - 1];
        let ptr = SptePtr {
            table: Pfn::new(leaf.pte_gpa.raw() >> 12),
            index: ((leaf.pte_gpa.raw() & 0xfff) / 8) as u16,
        };
        let Some(gfn) = self.mmu.translation_of(ptr) else {
            return Attempt::Exit(Exit::ShadowPageFault); // zapped under the walk
        };
        let gpa = Gpa::new(gfn.raw() << 12 | gva.page_offset());
        let global = cpu.regs.cr4.contains(Cr4::PGE) && leaf.pte & PT_GLOBAL != 0;
        cpu.tlb.insert(TlbEntry {
            va_base: gva.align_down(4096).raw(),
            size: PageSize::Size4K,
            tag,
            global,
            hpa_base: Hpa::new(walk.gpa.raw() & !0xfff),
            gpa_base: gfn.raw() << 12,
            rights: walk.rights,
            pkey: walk.pkey,
            dirty: walk.dirty,
        });
        Attempt::Done(cpu.touch(Hpa::new(walk.gpa.raw()), gpa, write, size, value))
    }

    /// A #PF of the shadow walk, handed to the shadow MMU: the access ends
    /// (a fault for the guest, MMIO, or an emulated write), or is retried
    /// after a fix or a race.
    fn handle_exit(
        &mut self,
        cpu: &mut CpuState,
        exit: Exit,
        gva: Gva,
        access: Access,
        size: usize,
        value: u64,
    ) -> Result<ExitAnswer, VcpuError> {
        debug_assert_eq!(exit, Exit::ShadowPageFault, "an EPT exit on the shadow MMU");
        cpu.stats.shadow_exits += 1;
        let groot = cpu.paging.root(cpu.cr3, cpu.pdptes);
        let linear = cpu.linear(gva);
        let Some((_, roots)) = self.roots.current() else {
            return Ok(ExitAnswer::Retry);
        };
        let outcome = self
            .mmu
            .page_fault(roots, &cpu.paging, &groot, gva, access, cpu.pkru, &mut self.tables)?;
        Ok(match outcome {
            ShadowOutcome::Fixed => ExitAnswer::Fixed,
            ShadowOutcome::Retry => ExitAnswer::Retry,
            ShadowOutcome::GuestPageFault(error_code) => {
                // A #PF invalidates the address's translations (SDM
                // 4.10.4.1): a stale SPTE of an unsync page goes too (KVM's
                // `kvm_inject_emulated_page_fault`).
                self.mmu.sync_addr(roots, linear);
                cpu.stats.guest_faults += 1;
                ExitAnswer::Done(AccessResult::Fault(GuestFault::PageFault { error_code, gva }))
            }
            ShadowOutcome::GuestGeneralProtection => {
                cpu.stats.guest_faults += 1;
                ExitAnswer::Done(AccessResult::Fault(GuestFault::GeneralProtection))
            }
            ShadowOutcome::Mmio(gpa) | ShadowOutcome::ReadOnlySlot(gpa) => ExitAnswer::Done(AccessResult::Done {
                gpa,
                value: 0,
                mmio: true,
            }),
            ShadowOutcome::EmulateWrite(gpa)
                if self.string_op && self.last_retry != Some(gva) && self.mmu.unprotect_gfn_and_retry(gpa) =>
            {
                self.last_retry = Some(gva);
                ExitAnswer::Retry
            }
            ShadowOutcome::EmulateWrite(gpa) => {
                self.mmu.emulate_write(gpa, size, value)?;
                ExitAnswer::Done(AccessResult::Done {
                    gpa,
                    value: 0,
                    mmio: false,
                })
            }
        })
    }

    /// The entry holds the shadow SPTE's rights: the hardware's rules
    /// apply (CR0.WP forced on), not the guest's.
    #[inline]
    fn check(&self, cpu: &CpuState, access: Access, e: &TlbEntry) -> bool {
        self.hw.check_access(access, e.rights, e.pkey, cpu.pkru).is_none() && (!access.is_write() || e.dirty)
    }

    fn set_string_op(&mut self, on: bool) {
        self.string_op = on;
    }

    fn release(&mut self) {
        self.roots.release(&self.mmu);
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
