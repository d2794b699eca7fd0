//! The adversarial guest: kernel tricks an untrusted guest may play on the
//! MMU, each done through vCPU stores as the rest of the OS, and each
//! access checked against what x86 does with the tables in memory.
//!
//! - [`Os::self_map`]: a table whose every entry points at the table
//!   itself, linked at the trap slot: the one guest frame is a table at
//!   every level below the slot and the data page at the end of the walk.
//! - [`Os::recursive_map`]: the trap slot of the process's own top table
//!   (the PD in PAE paging) points back at that table (the "recursive
//!   mapping" some kernels use to reach their page tables), so one guest
//!   table is walked at every level.
//! - [`Os::toggle_controls`]: CR0.WP, CR4.SMEP and EFER.NXE flipped at
//!   random, with supervisor and user reads, writes and fetches in
//!   between, then restored.
//!
//! Each runs with the address space's lock held for writing, so no other
//! vCPU changes (or sets A/D bits in) the tables it walks meanwhile, and
//! after the vCPU has taken its pending shootdowns: the TLB then holds no
//! translation the tables in memory do not give, and every access must be
//! exactly what the walker says.

use rand::Rng;
use rand::rngs::SmallRng;

use super::format::{A, D};
use super::{Flush, GuestCpu, Mm, MmState, Os, OsError};
use crate::checker::{Checker, reference};
use vmmu::arch::control::{Cr0, Cr4, Efer, PagingMode};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, GuestFault};
use vmmu::mem::GuestMemory;

/// What the guest saw: a gpa, a #PF error code, or something else.
fn seen(r: &AccessResult) -> Result<u64, Option<vmmu::arch::pfec::PfErrorCode>> {
    match r {
        AccessResult::Done { gpa, .. } => Ok(gpa.raw()),
        AccessResult::Fault(GuestFault::PageFault { error_code, .. }) => Err(Some(*error_code)),
        _ => Err(None),
    }
}

/// The trap slot of one address space, linked for one adversarial op.
struct Trap {
    /// The table holding the slot: the top table, or the PAE PD (pinned
    /// for the process's life either way).
    parent: u64,
    /// The level of that table's entries.
    level: u8,
    /// The slot's gpa.
    slot: u64,
    /// The linear range the slot maps.
    start: u64,
    end: u64,
}

impl Os {
    /// The trap slot of the address space whose state `st` is (locked for
    /// writing), after `cpu` took its pending shootdowns.
    fn trap(&self, cpu: &mut GuestCpu, ck: &Checker, st: &mut MmState) -> Result<Trap, OsError> {
        cpu.process_mailbox(self)?;
        let (start, end) = self.format.trap_region();
        let level = self.format.trap_level();
        let parent = self.table(cpu, ck, st, start, level)?;
        Ok(Trap {
            parent,
            level,
            slot: parent + self.format.index(start, level) * self.format.entry_size(),
            start,
            end,
        })
    }

    /// Clears the trap slot and flushes the address space everywhere.
    fn untrap(&self, cpu: &mut GuestCpu, ck: &Checker, mm: &Mm, st: &MmState, trap: &Trap) -> Result<(), OsError> {
        self.store(cpu, ck, trap.slot, 0)?;
        self.flush(
            cpu,
            mm,
            st,
            Flush {
                pages: Vec::new(),
                full: true,
            },
        )
    }
    /// Checks one access by `cpu` at `va` against the walker on the tables
    /// under `root`; returns the access's result when it agrees.
    #[allow(clippy::too_many_arguments)]
    fn checked_access(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        memory: &GuestMemory,
        root: u64,
        va: u64,
        kind: AccessKind,
        cpl: u8,
        size: usize,
        value: u64,
    ) -> Result<Option<AccessResult>, OsError> {
        let regs = cpu.vcpu.regs();
        let access = Access::new(kind, cpl, false);
        let want = reference(memory, &regs, &cpu.vcpu.features(), root, va, access, cpu.vcpu.pkru());
        let r = cpu.access(va, kind, cpl, size, value)?;
        cpu.accesses += 1;
        let got = seen(&r);
        if got != want {
            ck.violation(
                cpu.id,
                va,
                want.unwrap_or(0),
                &format!("{want:x?} (the walker, {kind:?} at CPL {cpl}, {regs:?})"),
                &format!("{r:?}"),
            );
            return Ok(None);
        }
        Ok(Some(r))
    }

    /// A table whose every entry points at itself, linked at the trap slot
    /// of `mm` (which `cpu` runs); `accesses` user reads and writes through
    /// it, then unlinked, flushed and freed. A write stores the entry it
    /// overwrites (A/D aside), so the walk stays the same: the MMU sees
    /// page-table writes to a table it shadows at several levels.
    pub fn self_map(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        memory: &GuestMemory,
        mm: &Mm,
        rng: &mut SmallRng,
        accesses: u32,
    ) -> Result<(), OsError> {
        let mut st = mm.state.write();
        let trap = self.trap(cpu, ck, &mut st)?;
        let (start, end) = (trap.start, trap.end);
        let t = self.alloc_frame()? << 12;
        self.zero(cpu, ck, t, 1)?;
        let es = self.format.entry_size();
        let entry = self.format.table_entry(t, 1);
        for i in 0..self.format.entries() {
            self.store(cpu, ck, t + i * es, entry)?;
        }
        self.store(cpu, ck, trap.slot, self.format.table_entry(t, trap.level))?;
        self.stats
            .adversarial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ad = A | D;
        for _ in 0..accesses {
            let va = start + (rng.random_range(0..end - start) & !(es - 1));
            let write = rng.random_bool(0.5);
            let kind = if write { AccessKind::Write } else { AccessKind::Read };
            let Some(r) = self.checked_access(cpu, ck, memory, st.root, va, kind, 3, es as usize, entry | A)? else {
                break;
            };
            if let AccessResult::Done { gpa, value, .. } = r {
                if gpa.raw() != t + (va & 0xfff) {
                    ck.violation(
                        cpu.id,
                        va,
                        gpa.raw(),
                        &format!("gpa {:#x}", t + (va & 0xfff)),
                        "another gpa",
                    );
                } else if !write && value & !ad != entry {
                    ck.violation(
                        cpu.id,
                        va,
                        gpa.raw(),
                        &format!("{entry:#x} (the table's entry, A/D aside)"),
                        &format!("{value:#x}"),
                    );
                }
            }
        }
        self.untrap(cpu, ck, mm, &st, &trap)?;
        drop(st);
        self.alloc.lock().put(t >> 12);
        Ok(())
    }

    /// The trap slot of `mm`'s top table (the PD in PAE paging) pointed at
    /// that table itself; `accesses` supervisor reads through it, each
    /// checked against the walker (the data is not: the walk can end in
    /// any frame the kernel maps); then unlinked and flushed.
    pub fn recursive_map(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        memory: &GuestMemory,
        mm: &Mm,
        rng: &mut SmallRng,
        accesses: u32,
    ) -> Result<(), OsError> {
        let mut st = mm.state.write();
        let trap = self.trap(cpu, ck, &mut st)?;
        let (start, end) = (trap.start, trap.end);
        self.store(cpu, ck, trap.slot, self.format.table_entry(trap.parent, trap.level))?;
        self.stats
            .adversarial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..accesses {
            let va = start + (rng.random_range(0..end - start) & !7);
            if self
                .checked_access(cpu, ck, memory, st.root, va, AccessKind::Read, 0, 8, 0)?
                .is_none()
            {
                break;
            }
        }
        self.untrap(cpu, ck, mm, &st, &trap)?;
        Ok(())
    }

    /// Flips CR0.WP, CR4.SMEP and (outside 32-bit paging) EFER.NXE at
    /// random, makes `accesses` reads, writes and fetches at CPL 0 and 3
    /// to pages of `mm`'s mappings, each checked against the walker under
    /// the new control bits (a write only where the walker says it
    /// completes, at CPL 3, stamping the data as any user write), and
    /// restores the bits. With EFER.NXE clear, the XD bit the OS sets in
    /// its leaves is reserved: every access through them faults with RSVD,
    /// the kernel's own too, so nothing else runs meanwhile.
    pub fn toggle_controls(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        memory: &GuestMemory,
        mm: &Mm,
        rng: &mut SmallRng,
        accesses: u32,
    ) -> Result<(), OsError> {
        let st = mm.state.write();
        cpu.process_mailbox(self)?;
        let vmas: Vec<_> = st.vmas().copied().collect();
        if vmas.is_empty() {
            return Ok(());
        }
        self.stats
            .adversarial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = cpu.vcpu.regs();
        let (cr3, pkru) = (cpu.vcpu.cr3(), cpu.vcpu.pkru());
        let mut regs = base;
        regs.cr0.set(Cr0::WP, rng.random_bool(0.5));
        regs.cr4.set(Cr4::SMEP, rng.random_bool(0.5));
        let nx = self.format.mode() != PagingMode::Bits32 && rng.random_bool(0.3);
        if nx {
            regs.efer.toggle(Efer::NXE);
            cpu.set_state(regs, cr3, pkru)?;
        } else {
            cpu.vcpu.set_cr0_wp(regs.cr0.contains(Cr0::WP));
            cpu.vcpu.set_cr4_bits(Some(regs.cr4.contains(Cr4::SMEP)), None, None);
        }
        if self.format.pkeys() && rng.random_bool(0.5) {
            // WRPKRU: some keys access- or write-disabled for the burst
            // (with CR0.WP = 0 write-disable binds user writes only).
            cpu.vcpu.set_pkru(rng.random::<u32>() & rng.random::<u32>());
        }
        let result = (|| {
            for _ in 0..accesses {
                let v = vmas[rng.random_range(0..vmas.len())];
                let va = v.start + (rng.random_range(0..v.pages()) << 12) + rng.random_range(0..64u64) * 64;
                let (kind, cpl) = match rng.random_range(0..6) {
                    0 => (AccessKind::Read, 3),
                    1 => (AccessKind::Read, 0),
                    2 => (AccessKind::Fetch, 0),
                    3 => (AccessKind::Fetch, 3),
                    4 => (AccessKind::Write, 0),
                    _ => (AccessKind::Write, 3),
                };
                let access = Access::new(kind, cpl, false);
                let want = reference(
                    memory,
                    &cpu.vcpu.regs(),
                    &cpu.vcpu.features(),
                    st.root,
                    va,
                    access,
                    cpu.vcpu.pkru(),
                );
                if kind == AccessKind::Write && want.is_ok() {
                    let stamp = cpu.next_stamp();
                    if let Some(AccessResult::Done { gpa, .. }) =
                        self.checked_access(cpu, ck, memory, st.root, va, kind, cpl, 8, stamp)?
                    {
                        ck.oracle().set(gpa.raw(), stamp);
                    }
                } else if kind != AccessKind::Write {
                    let r = self.checked_access(cpu, ck, memory, st.root, va, kind, cpl, 8, 0)?;
                    if let Some(AccessResult::Done { gpa, value, .. }) = r
                        && kind == AccessKind::Read
                        && ck.level != crate::checker::CheckLevel::Off
                    {
                        let want = ck.oracle().get(gpa.raw());
                        if value != want {
                            ck.violation(
                                cpu.id,
                                va,
                                gpa.raw(),
                                &format!("{want:#x} (the last value written)"),
                                &format!("{value:#x}"),
                            );
                        }
                    }
                }
            }
            Ok(())
        })();
        if nx {
            cpu.set_state(base, cr3, pkru)?;
        } else {
            cpu.vcpu.set_cr0_wp(base.cr0.contains(Cr0::WP));
            cpu.vcpu.set_cr4_bits(Some(base.cr4.contains(Cr4::SMEP)), None, None);
            cpu.vcpu.set_pkru(pkru);
        }
        result
    }
}
