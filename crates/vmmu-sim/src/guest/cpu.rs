//! The guest's side of a vCPU: its PCIDs, its shootdown mailbox, the
//! accesses it makes (one by one, or back to back in guest mode), and the
//! VMM's retry of an access the host refused for a moment.

use super::*;
use vmmu::addr::Gva;
use vmmu::arch::perm::Access;

impl UserRun<'_> {
    /// [`GuestCpu::access`] in the run.
    #[inline]
    pub fn access(
        &mut self,
        va: u64,
        kind: AccessKind,
        cpl: u8,
        size: usize,
        value: u64,
    ) -> Result<AccessResult, VcpuError> {
        let session = &mut self.session;
        retrying_efault(self.rings, || {
            session.access(Gva::new(va), Access::new(kind, cpl, false), size, value)
        })
    }

    /// [`GuestCpu::next_stamp`].
    #[inline]
    pub fn next_stamp(&mut self) -> u64 {
        *self.stamp += 1;
        *self.stamp
    }

    /// The CPU's access count ([`GuestCpu::accesses`]).
    #[inline]
    pub fn accesses(&mut self) -> &mut u64 {
        self.accesses
    }

    /// The vCPU, to read.
    pub fn vcpu(&self) -> &Vcpu {
        self.session.vcpu()
    }
}

/// Runs `op` again while the host refuses it (EFAULT: a page the host
/// churn thread made inaccessible for a moment), yielding in between.
#[inline]
/// The VMM's loop around an access: an `EFAULT` (the host refused the
/// page for a moment) is retried after a yield, and a full dirty ring is
/// reaped (by this vCPU's thread, as QEMU's vCPU threads do) before the
/// access is issued again.
pub(super) fn retrying_efault(
    rings: Option<&DirtyRings>,
    mut op: impl FnMut() -> Result<AccessResult, VcpuError>,
) -> Result<AccessResult, VcpuError> {
    for _ in 0..EFAULT_RETRIES {
        match op() {
            Err(e) if is_efault(&e) => std::thread::yield_now(),
            Ok(AccessResult::DirtyRingFull) if rings.is_some() => {
                rings.map(DirtyRings::reap);
            }
            r => return r,
        }
    }
    op()
}

/// Host refusals retried before an access gives up (the host churn
/// thread restores a page it made read-only within microseconds).
const EFAULT_RETRIES: u32 = 1_000_000;

pub(crate) fn is_efault(e: &VcpuError) -> bool {
    matches!(
        e,
        VcpuError::Mmu(vmmu::mmu::tdp::TdpError::Host { .. })
            | VcpuError::Shadow(vmmu::mmu::shadow::ShadowError::Host { .. })
    )
}

impl GuestCpu {
    /// vCPU `id` of the OS, idle on the kernel's root.
    pub fn new(id: usize, vcpu: Vcpu) -> GuestCpu {
        GuestCpu {
            id,
            vcpu,
            current: None,
            slots: [(0, 0, 0); PCID_SLOTS],
            clock: 0,
            stamp: (id as u64 + 1) << 48,
            accesses: 0,
            rings: None,
            l1: None,
        }
    }

    /// This OS is L2 VM `vm` of the L1 hypervisor `l1`: the exits to L1
    /// of its accesses and its MOVs to CR3 go to it, and are retried once
    /// it has handled them.
    pub fn with_l1(mut self, l1: Arc<crate::nested::L1Hypervisor>, vm: usize) -> GuestCpu {
        self.l1 = Some((l1, vm));
        self
    }

    /// The L1 hypervisor and this OS's VM in it, under `--nested`.
    pub fn l1(&self) -> Option<&(Arc<crate::nested::L1Hypervisor>, usize)> {
        self.l1.as_ref()
    }

    /// Hands an exit to L1 (`Ok(false)`: no L1, or one it does not
    /// expect, which the caller reports).
    pub fn exit_to_l1(&self, exit: &vmmu::walker::nested::NestedFault) -> Result<bool, VcpuError> {
        match &self.l1 {
            Some((l1, vm)) => l1.handle_exit(self.id, *vm, exit),
            None => Ok(false),
        }
    }

    /// MOV to CR3, with an exit to L1 (a PAE PDPTE load through EPT that
    /// EPT12 does not map yet) handled by L1 and the instruction retried.
    pub fn mov_cr3(&mut self, cr3: u64) -> Result<(), VcpuError> {
        for _ in 0..crate::nested::MAX_L1_EXITS {
            match self.vcpu.mov_cr3(cr3) {
                Err(VcpuError::ExitToL1(f)) if self.exit_to_l1(&f)? => {}
                r => return r,
            }
        }
        self.vcpu.mov_cr3(cr3)
    }

    /// [`Vcpu::set_state`], with exits to L1 handled as [`GuestCpu::mov_cr3`].
    pub fn set_state(&mut self, regs: vmmu::walker::ControlRegs, cr3: u64, pkru: u32) -> Result<(), VcpuError> {
        match self.vcpu.set_state(regs, cr3, pkru) {
            Err(VcpuError::ExitToL1(f)) if self.exit_to_l1(&f)? => self.mov_cr3(cr3),
            r => r,
        }
    }

    /// The VMM's dirty-ring reaper this vCPU calls when its ring is full
    /// (`KVM_EXIT_DIRTY_RING_FULL`), when the dirty ring is on.
    pub fn with_dirty_rings(mut self, rings: Option<Arc<DirtyRings>>) -> GuestCpu {
        self.rings = rings;
        self
    }

    /// An access at `cpl`, retried while the host refuses the page
    /// (`EFAULT` from `KVM_RUN`: the host made it read-only for a moment;
    /// the VMM waits for the protection to come back and re-enters) and
    /// after the VMM reaped a full dirty ring.
    pub fn access(
        &mut self,
        va: u64,
        kind: AccessKind,
        cpl: u8,
        size: usize,
        value: u64,
    ) -> Result<AccessResult, VcpuError> {
        self.retrying_efault(|v| v.access(Gva::new(va), Access::new(kind, cpl, false), size, value))
    }

    /// `rep stosq` of zeros over `count` quadwords, retried as
    /// [`GuestCpu::access`] (from where it stopped: a 2 MiB page zeroed
    /// under a dirty ring smaller than its 512 pages fills the ring more
    /// than once, and an instruction restarted from its first store would
    /// fill it again forever).
    pub fn rep_stos(&mut self, va: u64, count: u64) -> Result<AccessResult, VcpuError> {
        // Re-entered after an exit, the instruction resumes at RDI/RCX.
        let mut regs = StringRegs { rdi: va, rcx: count };
        self.retrying_efault(|v| v.rep_stos(&mut regs, 0))
    }

    pub(super) fn retrying_efault(
        &mut self,
        mut op: impl FnMut(&mut Vcpu) -> Result<AccessResult, VcpuError>,
    ) -> Result<AccessResult, VcpuError> {
        // Exits to L1 in a row for one address: a string instruction
        // exits once per page it reaches, an access that L1 cannot make
        // progress on exits at the same address again and again.
        let (mut last, mut same) = (None, 0);
        loop {
            let rings = self.rings.as_deref();
            let r = retrying_efault(rings, || op(&mut self.vcpu));
            // An exit to L1 (under --nested): L1 maps, the access again.
            match &r {
                Ok(AccessResult::VmExit(f)) if same < crate::nested::MAX_L1_EXITS && self.exit_to_l1(f)? => {
                    if last == Some(f.gpa()) {
                        same += 1;
                    } else {
                        (last, same) = (Some(f.gpa()), 0);
                    }
                }
                _ => return r,
            }
        }
    }

    /// Opens a run of accesses that stays in guest mode between them (a
    /// [`GuestSession`]): the fast path of a loop of user accesses. It
    /// borrows the CPU: end it before anything that may wait for another
    /// thread (the guest's fault handler, the mailbox, an mm lock).
    pub fn user_run(&mut self) -> UserRun<'_> {
        UserRun {
            session: self.vcpu.session(),
            stamp: &mut self.stamp,
            accesses: &mut self.accesses,
            rings: self.rings.as_deref(),
        }
    }

    /// The mm running here.
    pub fn current(&self) -> Option<&Arc<Mm>> {
        self.current.as_ref()
    }

    /// A fresh nonzero value for a write.
    pub fn next_stamp(&mut self) -> u64 {
        self.stamp += 1;
        self.stamp
    }

    /// Applies a flush of `mm` here: INVLPG of `pages`, or a full flush
    /// of the address space (a CR3 reload of its PCID).
    pub(super) fn apply(
        &mut self,
        os: &Os,
        mm: u64,
        tlb_gen: u64,
        pages: Option<&[u64]>,
        root: u64,
    ) -> Result<(), OsError> {
        tracing::debug!(target: "vmmu_guest_flush", mm, tlb_gen, pages = ?pages, root);
        let running = self.current.as_ref().is_some_and(|c| c.id == mm);
        let slot = self.slots.iter().position(|s| s.0 == mm);
        if !running {
            // Not running it: forget the PCID's generation, so the next
            // switch to it flushes (Linux's lazy flush).
            if let Some(i) = slot {
                self.slots[i].1 = 0;
            }
            return Ok(());
        }
        match pages {
            Some(pages) => {
                for &va in pages {
                    self.vcpu.invlpg(Gva::new(va));
                }
                os.stats.flushes.fetch_add(pages.len() as u64, Ordering::Relaxed);
            }
            None => {
                let pcid = slot.map_or(0, |i| i as u64 + 1);
                let cr3 = if os.format.has_pcid() { root | pcid } else { root };
                self.mov_cr3(cr3)?;
                os.stats.flushes.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(i) = slot {
            self.slots[i].1 = self.slots[i].1.max(tlb_gen);
        }
        Ok(())
    }

    /// Processes the shootdowns posted here (the IPI handler).
    pub fn process_mailbox(&mut self, os: &Os) -> Result<(), OsError> {
        let posted = std::mem::take(&mut *os.mailboxes[self.id].lock());
        for s in posted {
            let root = self.current.as_ref().filter(|c| c.id == s.mm).map(|c| c.root);
            let root = match root {
                Some(r) => r,
                None => {
                    if let Some(i) = self.slots.iter().position(|x| x.0 == s.mm) {
                        self.slots[i].1 = 0;
                    }
                    continue;
                }
            };
            self.apply(os, s.mm, s.tlb_gen, s.pages.as_deref(), root)?;
        }
        Ok(())
    }

    /// Switches to `mm` (or to the kernel's root with `None`): a CR3 load
    /// that keeps the new PCID's translations when the address space has
    /// not changed since this vCPU last flushed it.
    pub fn switch_to(&mut self, os: &Os, mm: Option<&Arc<Mm>>) -> Result<(), OsError> {
        if let Some(old) = self.current.take() {
            old.cpumask.fetch_and(!(1 << self.id), Ordering::AcqRel);
        }
        self.clock += 1;
        let Some(mm) = mm else {
            let cr3 = os.kernel_root | if os.format.has_pcid() { CR3_NOFLUSH } else { 0 };
            self.mov_cr3(cr3)?;
            return Ok(());
        };
        let st = mm.state.read();
        mm.cpumask.fetch_or(1 << self.id, Ordering::AcqRel);
        self.current = Some(mm.clone());
        let tlb_gen = mm.tlb_gen.load(Ordering::Acquire);
        if !os.format.has_pcid() || !self.vcpu.regs().cr4.contains(Cr4::PCIDE) {
            os.stats.flushes.fetch_add(1, Ordering::Relaxed);
            self.mov_cr3(mm.root)?;
            return Ok(());
        }
        let (i, fresh) = match self.slots.iter().position(|s| s.0 == mm.id) {
            Some(i) => (i, self.slots[i].1 >= tlb_gen),
            None => {
                let lru = (0..PCID_SLOTS)
                    .min_by_key(|&i| self.slots[i].2)
                    .expect("PCID_SLOTS > 0");
                self.slots[lru] = (mm.id, 0, 0);
                (lru, false)
            }
        };
        self.slots[i].2 = self.clock;
        let pcid = i as u64 + 1;
        tracing::debug!(target: "vmmu_guest_switch", root = mm.root, pcid, fresh);
        if fresh {
            self.mov_cr3(mm.root | pcid | CR3_NOFLUSH)?;
        } else {
            os.stats.flushes.fetch_add(1, Ordering::Relaxed);
            self.mov_cr3(mm.root | pcid)?;
            self.slots[i].1 = tlb_gen;
        }
        drop(st);
        Ok(())
    }
}
