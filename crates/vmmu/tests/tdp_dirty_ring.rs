//! The dirty ring through the TDP MMU: enabling rules, the soft-full exit,
//! exact logging, re-protection at reset, and the live-migration property
//! with vCPUs running while the VMM harvests (a copy of guest memory made
//! by copying each harvested page after its reset ends up identical).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::CpuFeatures;
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, Vcpu};
use vmmu::host::VmaFlags;
use vmmu::mem::{DirtyRing, GuestMemory, MemslotError, MemslotFlags};
use vmmu::mmu::tdp::{DirtyLogMode, DirtyRingError, TdpConfig, TdpError, TdpFault};
use vmmu::vm::Vm;
use vmmu::walker::ControlRegs;

const MB: u64 = 1 << 20;
const RING: u32 = 128;

fn vm() -> Vm {
    Vm::new(
        4 * MB,
        Hva::new(0x4000_0000),
        VmaFlags::WRITE | VmaFlags::THP,
        TdpConfig::default(),
    )
    .unwrap()
}

fn vcpu(vm: &Vm, vpid: u16) -> Vcpu {
    let mut v = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), vpid).unwrap();
    v.set_state(ControlRegs::default(), 0, 0).unwrap();
    v
}

fn logging(vm: &Vm) {
    vm.slots.update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES).unwrap();
}

/// The VMM's view of one ring: its fetch index and what it collected.
struct Collector {
    fetch: u32,
}

impl Collector {
    fn harvest(&mut self, ring: &DirtyRing, into: &mut Vec<u64>) {
        for e in ring.harvest(&mut self.fetch) {
            assert_eq!(e.slot, 0, "as_id 0, slot 0");
            into.push(e.offset);
        }
    }
}

/// Writes `value` at `gpa`; on a dirty-ring-full exit the VMM harvests
/// and resets, then the write is issued again. Returns the exits taken.
fn write(vm: &Vm, v: &mut Vcpu, c: &mut Collector, log: &mut Vec<u64>, gpa: u64, value: u64) -> u32 {
    let mut exits = 0;
    loop {
        match v
            .access(Gva::new(gpa), Access::new(AccessKind::Write, 0, false), 8, value)
            .unwrap()
        {
            AccessResult::Done { mmio: false, .. } => return exits,
            AccessResult::DirtyRingFull => {
                exits += 1;
                let ring = v.dirty_ring().unwrap().clone();
                c.harvest(&ring, log);
                vm.mmu.reset_dirty_rings([&*ring]);
                assert!(!ring.soft_full());
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn enabling_follows_kvm_rules() {
    let vm = vm();
    for bad in [0, 64, 100, 1 << 17] {
        assert_eq!(vm.mmu.enable_dirty_ring(bad), Err(DirtyRingError::BadSize(bad)));
    }
    let dbit = vm.with_mmu(TdpConfig {
        dirty_log: DirtyLogMode::DirtyBit,
        ..TdpConfig::default()
    });
    assert_eq!(dbit.mmu.enable_dirty_ring(RING), Err(DirtyRingError::DirtyBitMode));

    let vm = self::vm();
    let v = vcpu(&vm, 1);
    assert_eq!(vm.mmu.enable_dirty_ring(RING), Err(DirtyRingError::VcpusExist(1)));
    drop(v);
    vm.mmu.enable_dirty_ring(RING).unwrap();
    assert_eq!(
        vm.mmu.enable_dirty_ring(RING),
        Err(DirtyRingError::AlreadyEnabled(RING))
    );
    assert_eq!(vm.mmu.dirty_ring_size(), Some(RING));
    logging(&vm);
    assert!(matches!(
        vm.mmu.get_dirty_log(0, 0),
        Err(MemslotError::DirtyRingEnabled)
    ));
    assert!(matches!(
        vm.mmu.clear_dirty_log(0, 0, 0, &[1]),
        Err(MemslotError::DirtyRingEnabled)
    ));
    // A fault that does not bring the vCPU's ring is refused.
    let root = vm.mmu.get_root(0).unwrap();
    let fault = TdpFault {
        gpa: Gpa::new(0x1000),
        write: true,
        exec: false,
        present: false,
    };
    assert!(matches!(
        vm.mmu.page_fault(&root, fault, &mut vm.mmu.vcpu_caches(), None),
        Err(TdpError::DirtyRingRequired)
    ));
    assert_eq!(vcpu(&vm, 2).dirty_ring().unwrap().size(), RING);
}

#[test]
fn the_ring_logs_each_page_once_exits_when_soft_full_and_reset_reprotects() {
    let vm = vm();
    vm.mmu.enable_dirty_ring(RING).unwrap();
    logging(&vm);
    let mut v = vcpu(&vm, 1);
    let mut c = Collector { fetch: 0 };
    let mut log = Vec::new();
    let pages: Vec<u64> = (0..300).map(|i| (i * 7) % 1024).collect();
    let (mut exits, mut relogged) = (0, 0);
    for (i, &p) in pages.iter().enumerate() {
        exits += write(&vm, &mut v, &mut c, &mut log, p << 12, i as u64 + 1);
        // Writing the page again logs nothing more, unless the VMM reset
        // the ring in between (the exit came just before this write): the
        // reset write-protected the page again.
        let second = write(&vm, &mut v, &mut c, &mut log, (p << 12) + 8, 1);
        exits += second;
        relogged += second;
    }
    let ring = v.dirty_ring().unwrap().clone();
    c.harvest(&ring, &mut log);
    vm.mmu.reset_dirty_rings([&*ring]);
    let distinct: BTreeSet<u64> = pages.iter().copied().collect();
    assert_eq!(
        log.len(),
        distinct.len() + relogged as usize,
        "each page logged once, again only after a reset"
    );
    assert_eq!(log.iter().copied().collect::<BTreeSet<_>>(), distinct);
    // The soft limit is RING - 64 = 64 entries: one exit per 64 pages.
    assert_eq!(exits as usize, (distinct.len() - 1) / 64, "an exit at each soft limit");
    assert_eq!(ring.used_entries(), 0);

    // After the reset every page is write-protected again: the same writes
    // log the same pages again, and nothing else.
    log.clear();
    for &p in &pages {
        write(&vm, &mut v, &mut c, &mut log, p << 12, 9);
    }
    c.harvest(&ring, &mut log);
    assert_eq!(log.iter().copied().collect::<BTreeSet<_>>(), distinct);
    assert_eq!(log.len(), distinct.len());
}

/// Two vCPUs write random pages while the VMM harvests both rings, resets
/// them and copies each harvested page after the reset (QEMU's order). At
/// the end (vCPUs stopped, a last harvest) the copy equals guest memory:
/// no write was lost to the ring protocol.
#[test]
fn a_copy_made_from_the_rings_equals_guest_memory() {
    const PAGES: u64 = 1024;
    let vm = vm();
    vm.mmu.enable_dirty_ring(RING).unwrap();
    let mem = GuestMemory::new(vm.host.clone(), vm.slots.clone());
    // The initial copy, taken when logging starts.
    logging(&vm);
    let copy_page = |copy: &mut Vec<[u64; 2]>, p: u64| {
        copy[p as usize] = [
            mem.read_u64(Gpa::new(p << 12)).unwrap(),
            mem.read_u64(Gpa::new((p << 12) + 8)).unwrap(),
        ];
    };
    let mut copy = vec![[0u64; 2]; PAGES as usize];
    for p in 0..PAGES {
        copy_page(&mut copy, p);
    }
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let rings: Vec<_> = {
        let (a, b) = (vcpu(&vm, 1), vcpu(&vm, 2));
        let rings = vec![a.dirty_ring().unwrap().clone(), b.dirty_ring().unwrap().clone()];
        let vcpus = std::sync::Mutex::new(vec![a, b]);
        let mut fetch = [0u32; 2];
        // One migration pass, in QEMU's order: harvest every ring, reset
        // (re-protect), then copy the harvested pages.
        let migrate = |fetch: &mut [u32; 2], copy: &mut Vec<[u64; 2]>| {
            let mut harvested = Vec::new();
            for (r, f) in rings.iter().zip(fetch.iter_mut()) {
                harvested.extend(r.harvest(f).into_iter().map(|e| e.offset));
            }
            vm.mmu.reset_dirty_rings(rings.iter().map(|r| &**r));
            for p in harvested {
                copy_page(copy, p);
            }
        };
        let mut rounds = 0u64;
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (vcpus, stop, writes) = (&vcpus, &stop, &writes);
                s.spawn(move || {
                    let mut v = vcpus.lock().unwrap().pop().unwrap();
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        n += 1;
                        let gpa = (x % PAGES) << 12 | (t * 8);
                        match v
                            .access(Gva::new(gpa), Access::new(AccessKind::Write, 0, false), 8, n)
                            .unwrap()
                        {
                            AccessResult::Done { .. } => {
                                writes.fetch_add(1, Ordering::Relaxed);
                            }
                            // Wait for the VMM's reset, then write again.
                            AccessResult::DirtyRingFull => std::thread::yield_now(),
                            other => panic!("{other:?}"),
                        }
                    }
                });
            }
            let start = std::time::Instant::now();
            while start.elapsed() < std::time::Duration::from_millis(300) || rounds < 20 {
                rounds += 1;
                migrate(&mut fetch, &mut copy);
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
            stop.store(true, Ordering::Relaxed);
        });
        // The final pass, with the vCPUs stopped.
        migrate(&mut fetch, &mut copy);
        rings
    };
    assert!(writes.load(Ordering::Relaxed) > 2 * PAGES, "the vCPUs kept writing");
    for p in 0..PAGES {
        let live = [
            mem.read_u64(Gpa::new(p << 12)).unwrap(),
            mem.read_u64(Gpa::new((p << 12) + 8)).unwrap(),
        ];
        assert_eq!(copy[p as usize], live, "page {p}: a write was not logged");
    }
    assert!(rings.iter().all(|r| r.used_entries() == 0));
}

/// One `rep stosq` over more pages than the ring holds (2 MiB, 512 pages,
/// a ring of 128 entries) exits each time the ring is soft-full and, re-
/// entered after the VMM reaped it, resumes where it stopped (RDI and RCX
/// say where): it completes after a bounded number of exits and every page
/// it wrote is in the rings. A string instruction restarted from its first
/// store instead refilled the ring with its first pages every time, and a
/// guest zeroing a huge page looped forever (found by the random
/// configurations of the simulator's tests).
#[test]
fn a_string_store_larger_than_the_ring_resumes_after_each_exit() {
    use vmmu::cpu::vcpu::StringRegs;
    let vm = vm();
    vm.mmu.enable_dirty_ring(RING).unwrap();
    let mut v = vcpu(&vm, 1);
    logging(&vm);
    let mut c = Collector { fetch: 0 };
    let mut log = Vec::new();
    let mut regs = StringRegs {
        rdi: 2 * MB,
        rcx: 2 * MB / 8,
    };
    let mut exits = 0;
    loop {
        match v.rep_stos(&mut regs, 0x77).unwrap() {
            AccessResult::Done { .. } => break,
            AccessResult::DirtyRingFull => {
                exits += 1;
                assert!(
                    exits <= 512 / 64 + 1,
                    "{exits} exits: the instruction does not make progress"
                );
                let ring = v.dirty_ring().unwrap().clone();
                c.harvest(&ring, &mut log);
                vm.mmu.reset_dirty_rings([&*ring]);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(regs, StringRegs { rdi: 4 * MB, rcx: 0 });
    assert!(exits >= 512 / (RING - 64), "{exits} exits: the ring never filled");
    c.harvest(v.dirty_ring().unwrap(), &mut log);
    let pages: BTreeSet<u64> = log.into_iter().collect();
    assert_eq!(pages, (512..1024).collect::<BTreeSet<u64>>());
    let mem = vm.memory();
    assert_eq!(mem.read_u64(Gpa::new(4 * MB - 8)).unwrap(), 0x77);
}
