//! Stress: vCPUs fault and access while the host churns its mappings (THP
//! collapse and split, migration, swap) and the VMM zaps all roots and
//! cycles dirty logging. The checker: every byte a vCPU reads is the last
//! byte it wrote (each page has one writer), and `TdpMmu::audit` finds no
//! SPTE that grants more than memslot and host allow or maps a stale or
//! freed frame, between operations and at the end.
//!
//! `VMMU_STRESS_MS` sets the duration (default 1500 ms).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmmu::addr::{Gpa, Hva};
use vmmu::arch::control::CpuFeatures;
use vmmu::arch::perm::AccessKind;
use vmmu::cpu::vcpu::{AccessResult, Vcpu};
use vmmu::mem::{FrameArena, HostAddressSpace, MemoryRegion, MemslotConfig, MemslotFlags, MemslotTable, VmaFlags};
use vmmu::mmu::tdp::{TdpConfig, TdpMmu};
use vmmu::walker::ControlRegs;

const MB: u64 = 1 << 20;
const SIZE: u64 = 16 * MB;
const HVA: u64 = 0x4000_0000;
const VCPUS: u64 = 2;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn assert_clean(mmu: &TdpMmu, when: &str) {
    let violations = mmu.audit();
    assert!(
        violations.is_empty(),
        "{when}: {} violations, first {:?}",
        violations.len(),
        &violations[..violations.len().min(3)]
    );
}

#[test]
fn vcpus_host_churn_zap_all_and_dirty_logging() {
    let ms: u64 = std::env::var("VMMU_STRESS_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let arena = Arc::new(FrameArena::with_reserve(1 << 30).unwrap());
    let host = Arc::new(HostAddressSpace::new(arena).unwrap());
    host.mmap(Hva::new(HVA), SIZE, VmaFlags::WRITE | VmaFlags::THP).unwrap();
    let slots = Arc::new(MemslotTable::new(MemslotConfig::default()));
    slots
        .create(MemoryRegion {
            as_id: 0,
            id: 0,
            flags: MemslotFlags::empty(),
            guest_phys_addr: Gpa::new(0),
            memory_size: SIZE,
            userspace_addr: Hva::new(HVA),
        })
        .unwrap();
    let mmu = TdpMmu::new(host.clone(), slots.clone(), TdpConfig::default());
    let stop = AtomicBool::new(false);
    let accesses = AtomicU64::new(0);
    let churn_ops = AtomicU64::new(0);
    let vmm_ops = AtomicU64::new(0);
    let pages = SIZE >> 12;
    let finals: Vec<HashMap<u64, u64>> = std::thread::scope(|s| {
        let vcpus: Vec<_> = (0..VCPUS)
            .map(|t| {
                let (mmu, slots, stop, accesses) = (&mmu, &slots, &stop, &accesses);
                s.spawn(move || {
                    let mut v = Vcpu::new(mmu.clone(), slots.clone(), CpuFeatures::default(), t as u16 + 1).unwrap();
                    v.set_state(ControlRegs::default(), 0, 0).unwrap();
                    let mut rng = Rng(0x9e37_79b9 + t);
                    let mut expected: HashMap<u64, u64> = HashMap::new();
                    let mut stamp = t << 48;
                    while !stop.load(Ordering::Relaxed) {
                        // Pages t, t + VCPUS, ...: one writer per page, all
                        // over the slot (so every 2M region is shared).
                        let page = (rng.next() % (pages / VCPUS)) * VCPUS + t;
                        let gpa = page << 12 | (rng.next() & 0xff8);
                        if rng.next() & 1 == 0 {
                            stamp += 1;
                            let r = v.access(gpa, AccessKind::Write, 0, false, 8, stamp).unwrap();
                            assert!(matches!(r, AccessResult::Done { mmio: false, .. }));
                            expected.insert(gpa, stamp);
                        } else {
                            let r = v.access(gpa, AccessKind::Read, 0, false, 8, 0).unwrap();
                            let AccessResult::Done { value, mmio: false, .. } = r else {
                                panic!("read of {gpa:#x}: {r:?}")
                            };
                            let want = expected.get(&gpa).copied().unwrap_or(0);
                            assert_eq!(
                                value, want,
                                "vCPU {t} read {value:#x} at gpa {gpa:#x}, last wrote {want:#x}"
                            );
                        }
                        accesses.fetch_add(1, Ordering::Relaxed);
                    }
                    expected
                })
            })
            .collect();
        // Host churn.
        s.spawn(|| {
            let mut rng = Rng(0x1234_5678);
            while !stop.load(Ordering::Relaxed) {
                let page = rng.next() % pages;
                let hva = Hva::new(HVA + (page << 12));
                let huge = Hva::new(HVA + ((page << 12) & !(2 * MB - 1)));
                // Errors are "not applicable now" (e.g. collapse of a
                // region that is not fully mapped): the host said no.
                let _ = match rng.next() % 5 {
                    0 => host.collapse_thp(huge).map(|_| ()),
                    1 => host.split_thp(huge).map(|_| ()),
                    2 => host.migrate(hva).map(|_| ()),
                    3 => host.swap_out(hva).map(|_| ()),
                    _ => host.swap_in(hva).map(|_| ()).map_err(|_| ()).or(Ok(())),
                };
                churn_ops.fetch_add(1, Ordering::Relaxed);
                if churn_ops.load(Ordering::Relaxed).is_multiple_of(64) {
                    assert_clean(&mmu, "during host churn");
                }
                std::thread::yield_now();
            }
        });
        // The VMM: zap-all and dirty logging cycles.
        s.spawn(|| {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                match round % 4 {
                    0 => {
                        mmu.zap_all_fast();
                        mmu.zap_invalidated_roots();
                    }
                    1 => {
                        slots.update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES).unwrap();
                    }
                    2 => {
                        mmu.get_dirty_log(0, 0).unwrap();
                    }
                    _ => {
                        slots.update_flags(0, 0, MemslotFlags::empty()).unwrap();
                    }
                }
                vmm_ops.fetch_add(1, Ordering::Relaxed);
                assert_clean(&mmu, "after a VMM operation");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(ms));
        stop.store(true, Ordering::Relaxed);
        vcpus.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_clean(&mmu, "at the end");
    // Every byte is the last one written, through a fresh vCPU.
    let mut v = Vcpu::new(mmu.clone(), slots.clone(), CpuFeatures::default(), 9).unwrap();
    v.set_state(ControlRegs::default(), 0, 0).unwrap();
    for expected in &finals {
        for (&gpa, &want) in expected {
            let r = v.access(gpa, AccessKind::Read, 0, false, 8, 0).unwrap();
            assert_eq!(
                r,
                AccessResult::Done {
                    gpa: Gpa::new(gpa),
                    value: want,
                    mmio: false
                }
            );
        }
    }
    let (a, c, m) = (
        accesses.load(Ordering::Relaxed),
        churn_ops.load(Ordering::Relaxed),
        vmm_ops.load(Ordering::Relaxed),
    );
    eprintln!("stress: {a} accesses, {c} host operations, {m} VMM operations, 0 violations");
    assert!(a > 1000 && c > 50 && m > 10, "every thread made progress: {a} {c} {m}");
}
