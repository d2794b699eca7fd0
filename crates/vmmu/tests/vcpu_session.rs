//! Guest-mode sessions and the first-level TLB, under both MMUs: a vCPU
//! that stays in guest mode between accesses answers remote flushes at its
//! next access (and a flush waits for that), loses no write while the host
//! moves its pages, and the first level's cached decisions never outlive a
//! change of the control registers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::{CpuFeatures, Cr0, Cr4, Efer};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, GuestFault, Vcpu};
use vmmu::host::{HostAddressSpace, VmaFlags};
use vmmu::mem::GuestMemory;
use vmmu::mmu::flush::RemoteTlb;
use vmmu::mmu::tdp::TdpConfig;
use vmmu::vm::{ShadowVm, Vm};
use vmmu::walker::ControlRegs;

const HVA: u64 = 0x4000_0000;
const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const TABLE: u64 = P | W | U;
/// The data page of [`tables`]: va 0 maps it.
const DATA: u64 = 0x100;

/// A VM on either MMU.
enum Machine {
    Tdp(Vm),
    Shadow(ShadowVm),
}

impl Machine {
    fn new(shadow: bool) -> Machine {
        let flags = VmaFlags::WRITE;
        if shadow {
            Machine::Shadow(ShadowVm::new(4 << 20, Hva::new(HVA), flags).unwrap())
        } else {
            Machine::Tdp(Vm::new(4 << 20, Hva::new(HVA), flags, TdpConfig::default()).unwrap())
        }
    }

    fn memory(&self) -> GuestMemory {
        match self {
            Machine::Tdp(vm) => vm.memory(),
            Machine::Shadow(vm) => vm.memory(),
        }
    }

    fn host(&self) -> &HostAddressSpace {
        match self {
            Machine::Tdp(vm) => &vm.host,
            Machine::Shadow(vm) => &vm.host,
        }
    }

    fn remote_tlb(&self) -> &RemoteTlb {
        match self {
            Machine::Tdp(vm) => vm.mmu.remote_tlb(),
            Machine::Shadow(vm) => vm.mmu.remote_tlb(),
        }
    }

    /// A vCPU running on the 4-level tables of [`tables`].
    fn vcpu(&self, vpid: u16, wp: bool) -> Vcpu {
        let cr3 = tables(&self.memory());
        let features = CpuFeatures::default();
        match self {
            Machine::Tdp(vm) => vm.vcpu(features, vpid, regs(wp), cr3).unwrap(),
            Machine::Shadow(vm) => vm.vcpu(features, vpid, regs(wp), cr3).unwrap(),
        }
    }
}

fn regs(wp: bool) -> ControlRegs {
    let mut cr0 = Cr0::PE | Cr0::PG;
    cr0.set(Cr0::WP, wp);
    ControlRegs {
        cr0,
        cr4: Cr4::PAE,
        efer: Efer::LME | Efer::LMA | Efer::NXE,
    }
}

/// 4-level tables at gpa 0x1000..0x5000: va 0 maps data page [`DATA`]
/// user read-only, va 0x1000 maps page `DATA + 1` user read-write.
fn tables(mem: &GuestMemory) -> u64 {
    let (pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000);
    let w = |gpa: u64, v: u64| mem.write_u64(Gpa::new(gpa), v).unwrap();
    w(pml4, pdpt | TABLE);
    w(pdpt, pd | TABLE);
    w(pd, pt | TABLE);
    w(pt, (DATA << 12) | P | U);
    w(pt + 8, ((DATA + 1) << 12) | P | W | U);
    pml4
}

fn done(r: AccessResult) -> u64 {
    match r {
        AccessResult::Done { value, mmio: false, .. } => value,
        other => panic!("expected a completed access, got {other:?}"),
    }
}

fn pf(r: AccessResult) -> u32 {
    match r {
        AccessResult::Fault(GuestFault::PageFault { error_code, .. }) => error_code.bits(),
        other => panic!("expected a #PF, got {other:?}"),
    }
}

/// A flush asked for while a session sits in guest mode between accesses
/// cannot complete until the session's next access acknowledges it (which
/// flushes the TLB), or until the session ends.
#[test]
fn a_remote_flush_waits_for_a_session_until_its_next_access_or_its_end() {
    for shadow in [false, true] {
        for end_session in [false, true] {
            let m = Machine::new(shadow);
            let mut v = m.vcpu(1, true);
            let flushed = AtomicBool::new(false);
            let before = v.stats().remote_flushes;
            std::thread::scope(|s| {
                let mut session = v.session();
                session
                    .access(Gva::new(0x1008), Access::new(AccessKind::Write, 3, false), 8, 5)
                    .unwrap();
                let flusher = s.spawn(|| {
                    m.remote_tlb().flush();
                    flushed.store(true, Ordering::SeqCst);
                });
                // However long this waits, the vCPU is in guest mode with
                // translations made before the flush: it must not return.
                std::thread::sleep(Duration::from_millis(100));
                assert!(
                    !flushed.load(Ordering::SeqCst),
                    "shadow {shadow}: the flush returned while the session held old translations"
                );
                if end_session {
                    drop(session);
                } else {
                    assert_eq!(
                        done(
                            session
                                .access(Gva::new(0x1008), Access::new(AccessKind::Read, 3, false), 8, 0)
                                .unwrap()
                        ),
                        5
                    );
                    // Still in guest mode, with the flush answered.
                    flusher.join().unwrap();
                    drop(session);
                }
            });
            assert!(flushed.load(Ordering::SeqCst));
            let after = v.stats().remote_flushes;
            // Answered in the session by the access, or at the next entry.
            if end_session {
                assert_eq!(
                    done(
                        v.access(Gva::new(0x1008), Access::new(AccessKind::Read, 3, false), 8, 0)
                            .unwrap()
                    ),
                    5
                );
            }
            assert_eq!(
                v.stats().remote_flushes,
                before + 1,
                "shadow {shadow}, end {end_session}: one flush (seen {after} before the last access)"
            );
        }
    }
}

/// The host migrates the data page over and over while one vCPU writes a
/// counter and another reads it, both in long sessions: a session that kept
/// a translation to the old frame past the MMU-notifier flush would write
/// into a freed frame (the write is lost, and the vCPU counts a
/// freed-frame access) or read its poison.
#[test]
fn migration_under_sessions_loses_no_write() {
    for shadow in [false, true] {
        let m = Machine::new(shadow);
        let stop = AtomicBool::new(false);
        let last_written = AtomicU64::new(0);
        let migrations = AtomicU64::new(0);
        let va = 0x1000u64;
        let hva = Hva::new(HVA + ((DATA + 1) << 12));
        let (mut writer, mut reader) = (m.vcpu(1, true), m.vcpu(2, true));
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut session = writer.session();
                    for _ in 0..1000 {
                        n += 1;
                        done(
                            session
                                .access(Gva::new(va), Access::new(AccessKind::Write, 3, false), 8, n)
                                .unwrap(),
                        );
                        last_written.store(n, Ordering::SeqCst);
                    }
                }
            });
            s.spawn(|| {
                let mut prev = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mut session = reader.session();
                    for _ in 0..1000 {
                        let floor = last_written.load(Ordering::SeqCst);
                        let got = done(
                            session
                                .access(Gva::new(va), Access::new(AccessKind::Read, 3, false), 8, 0)
                                .unwrap(),
                        );
                        assert!(
                            got >= floor && got >= prev,
                            "shadow {shadow}: read {got:#x} after {floor} was written (previous read {prev})"
                        );
                        prev = got;
                    }
                }
            });
            s.spawn(|| {
                let start = Instant::now();
                let progressed =
                    || migrations.load(Ordering::Relaxed) > 20 && last_written.load(Ordering::Relaxed) > 20_000;
                while (start.elapsed() < Duration::from_millis(500) || !progressed())
                    && start.elapsed() < Duration::from_secs(30)
                {
                    if m.host().lookup(hva).is_some() {
                        m.host().migrate(hva).unwrap();
                        migrations.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                stop.store(true, Ordering::Relaxed);
            });
        });
        assert!(
            migrations.load(Ordering::Relaxed) > 20,
            "shadow {shadow}: the page moved"
        );
        assert!(
            last_written.load(Ordering::Relaxed) > 20_000,
            "shadow {shadow}: the writer ran"
        );
        for v in [&writer, &reader] {
            assert_eq!(
                v.stats().freed_frame_accesses,
                0,
                "shadow {shadow}: an access reached a freed frame"
            );
            assert!(
                v.stats().tlb_hits > 1000,
                "shadow {shadow}: the sessions ran on TLB hits"
            );
        }
        let mut v = m.vcpu(3, true);
        assert_eq!(
            done(
                v.access(Gva::new(va), Access::new(AccessKind::Read, 3, false), 8, 0)
                    .unwrap()
            ),
            last_written.load(Ordering::SeqCst),
            "shadow {shadow}: the last write is in memory"
        );
    }
}

/// The first-level TLB caches decisions, which depend on CR0.WP, CR4.SMAP
/// and CR4.SMEP: a decision made before a change must not serve an access
/// after it, in a session or not.
#[test]
fn first_level_decisions_do_not_outlive_control_register_changes() {
    for shadow in [false, true] {
        let m = Machine::new(shadow);
        // CR0.WP = 0: the kernel writes the user read-only page.
        let mut v = m.vcpu(1, false);
        for _ in 0..3 {
            let mut session = v.session();
            done(
                session
                    .access(Gva::new(0x10), Access::new(AccessKind::Write, 0, false), 8, 9)
                    .unwrap(),
            );
            assert_eq!(
                done(
                    session
                        .access(Gva::new(0x10), Access::new(AccessKind::Read, 3, false), 8, 0)
                        .unwrap()
                ),
                9
            );
        }
        v.set_cr0_wp(true);
        {
            let mut session = v.session();
            assert_eq!(
                pf(session
                    .access(Gva::new(0x10), Access::new(AccessKind::Write, 0, false), 8, 1)
                    .unwrap()),
                0x3,
                "shadow {shadow}: CR0.WP = 1, the kernel's write faults"
            );
            assert_eq!(
                done(
                    session
                        .access(Gva::new(0x10), Access::new(AccessKind::Read, 3, false), 8, 0)
                        .unwrap()
                ),
                9
            );
        }
        // SMAP: the kernel read a user page; with SMAP and AC = 0 it faults,
        // with AC = 1 it does not.
        for _ in 0..3 {
            assert_eq!(
                done(
                    v.access(Gva::new(0x1000), Access::new(AccessKind::Read, 0, false), 8, 0)
                        .unwrap()
                ),
                0
            );
        }
        v.set_cr4_bits(None, Some(true), None);
        assert_eq!(
            pf(
                v.access(Gva::new(0x1000), Access::new(AccessKind::Read, 0, false), 8, 0)
                    .unwrap()
            ),
            0x1,
            "shadow {shadow}: SMAP, supervisor read of a user page"
        );
        assert_eq!(
            done(
                v.access(Gva::new(0x1000), Access::new(AccessKind::Read, 0, true), 8, 0)
                    .unwrap()
            ),
            0
        );
        v.set_cr4_bits(None, Some(false), None);
        assert_eq!(
            done(
                v.access(Gva::new(0x1000), Access::new(AccessKind::Read, 0, false), 8, 0)
                    .unwrap()
            ),
            0
        );
    }
}

/// `rep stos` holds guest mode from one store to the next (it is one
/// instruction) and leaves it when it ends: a flush asked for afterwards
/// does not wait for another access.
#[test]
fn rep_stos_leaves_guest_mode_when_it_ends() {
    for shadow in [false, true] {
        let m = std::sync::Arc::new(Machine::new(shadow));
        let mut v = m.vcpu(1, true);
        done(
            v.rep_stos(&mut vmmu::cpu::vcpu::StringRegs { rdi: 0x1000, rcx: 64 }, 0x5a)
                .unwrap(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        // Not scoped: on failure the test must not wait for the flusher.
        let flusher = m.clone();
        std::thread::spawn(move || {
            flusher.remote_tlb().flush();
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(20)).is_ok(),
            "shadow {shadow}: the flush waited for a vCPU that finished its rep stos"
        );
        assert_eq!(
            done(
                v.access(Gva::new(0x1000 + 8 * 63), Access::new(AccessKind::Read, 3, false), 8, 0)
                    .unwrap()
            ),
            0x5a
        );
    }
}
