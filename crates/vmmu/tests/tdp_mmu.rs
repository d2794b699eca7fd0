//! The TDP MMU through a vCPU with paging off (gva = gpa), so each test is
//! about EPT alone: huge pages sized by the host mapping, memslot alignment,
//! MMU-notifier zaps (migration, THP split), MMIO, and concurrent faults.

use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::CpuFeatures;
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, Vcpu};
use vmmu::host::VmaFlags;
use vmmu::mem::MemslotFlags;
use vmmu::mmu::tdp::{DirtyLogMode, TdpConfig};
use vmmu::vm::Vm;
use vmmu::walker::ControlRegs;

const MB: u64 = 1 << 20;

/// A VM with one memslot of `size` at gpa 0, backed at `hva`.
fn vm(size: u64, hva: u64, flags: VmaFlags) -> Vm {
    Vm::new(size, Hva::new(hva), flags, TdpConfig::default()).unwrap()
}

fn vcpu(vm: &Vm, vpid: u16) -> Vcpu {
    let mut v = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), vpid).unwrap();
    v.set_state(ControlRegs::default(), 0, 0).unwrap();
    v
}

fn read(v: &mut Vcpu, gpa: u64) -> (u64, bool) {
    match v
        .access(Gva::new(gpa), Access::new(AccessKind::Read, 0, false), 8, 0)
        .unwrap()
    {
        AccessResult::Done { value, mmio, .. } => (value, mmio),
        other => panic!("paging is off and no dirty ring, yet {other:?}"),
    }
}

fn write(v: &mut Vcpu, gpa: u64, value: u64) {
    assert!(matches!(
        v.access(Gva::new(gpa), Access::new(AccessKind::Write, 0, false), 8, value)
            .unwrap(),
        AccessResult::Done { mmio: false, .. }
    ));
}

#[test]
fn huge_pages_follow_the_host_mapping_level() {
    let thp = vm(8 * MB, 0x4000_0000, VmaFlags::WRITE | VmaFlags::THP);
    let mut v = vcpu(&thp, 1);
    write(&mut v, 0x20_0008, 7);
    let s = thp.mmu.stats().snapshot();
    assert_eq!((s.pages_2m, s.pages_4k), (1, 0), "a THP-backed, aligned slot maps 2M");
    assert_eq!(read(&mut v, 0x20_0008).0, 7);
    // The rest of the 2M page is mapped by the same SPTE: no new fault.
    let taken = thp.mmu.stats().snapshot().pf_taken;
    read(&mut v, 0x3f_f000);
    assert_eq!(thp.mmu.stats().snapshot().pf_taken, taken);

    let small = vm(8 * MB, 0x4000_0000, VmaFlags::WRITE);
    let mut v = vcpu(&small, 1);
    write(&mut v, 0x20_0008, 7);
    let s = small.mmu.stats().snapshot();
    assert_eq!((s.pages_2m, s.pages_4k), (0, 1), "4K host pages give 4K SPTEs");
}

#[test]
fn a_misaligned_slot_gets_only_4k_sptes() {
    // gpa 0 backed at an hva 4K past a 2M boundary: huge pages impossible.
    let vm = vm(8 * MB, 0x4000_1000, VmaFlags::WRITE | VmaFlags::THP);
    let mut v = vcpu(&vm, 1);
    write(&mut v, 0x20_0000, 1);
    let s = vm.mmu.stats().snapshot();
    assert_eq!((s.pages_2m, s.pages_4k), (0, 1));
}

#[test]
fn migration_zaps_the_spte_and_the_data_follows() {
    let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE);
    let mut v = vcpu(&vm, 1);
    write(&mut v, 0x5008, 0xdead_beef);
    let old_pfn = vm.host.lookup(Hva::new(0x4000_5000)).unwrap().pfn;
    let flushes = vm.mmu.stats().snapshot().remote_tlb_flush;
    let new_pfn = vm.host.migrate(Hva::new(0x4000_5000)).unwrap();
    assert_ne!(old_pfn, new_pfn);
    let s = vm.mmu.stats().snapshot();
    assert_eq!(s.pages_4k, 0, "the notifier zapped the SPTE");
    assert!(s.remote_tlb_flush > flushes, "and flushed TLBs");
    assert!(vm.host.arena().is_freed(old_pfn), "the host freed the old frame");
    // The vCPU reads the value through the new frame, after a new fault.
    assert_eq!(read(&mut v, 0x5008), (0xdead_beef, false));
    let e = v.tlb().entries().next().expect("the translation is cached again");
    assert_eq!(e.hpa_base.raw() >> 12, new_pfn.raw());
}

#[test]
fn thp_split_refaults_at_4k() {
    let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE | VmaFlags::THP);
    let mut v = vcpu(&vm, 1);
    write(&mut v, 0x1234, 5);
    assert_eq!(vm.mmu.stats().snapshot().pages_2m, 1);
    vm.host.split_thp(Hva::new(0x4000_0000)).unwrap();
    assert_eq!(vm.mmu.stats().snapshot().pages_2m, 0, "the split zapped the huge SPTE");
    assert_eq!(read(&mut v, 0x1234).0, 5);
    let s = vm.mmu.stats().snapshot();
    assert_eq!((s.pages_2m, s.pages_4k), (0, 1), "re-faulted at the host's new level");
}

#[test]
fn mmio_is_emulated_and_cached_as_an_mmio_spte() {
    let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE);
    let mut v = vcpu(&vm, 1);
    assert_eq!(read(&mut v, 0x1000_0000), (0, true));
    assert_eq!(vm.mmu.stats().snapshot().pf_mmio_spte_created, 1);
    // The second access exits with a misconfiguration (the cached MMIO
    // SPTE) instead of a violation.
    let before = v.stats();
    assert_eq!(read(&mut v, 0x1000_0008), (0, true));
    let after = v.stats();
    assert_eq!(after.ept_misconfigs, before.ept_misconfigs + 1);
    assert_eq!(after.ept_violations, before.ept_violations);
}

#[test]
fn concurrent_faults_install_each_page_once() {
    let vm = vm(8 * MB, 0x4000_0000, VmaFlags::WRITE);
    let pages = 1024u64;
    std::thread::scope(|s| {
        for t in 0..2u16 {
            let vm = &vm;
            s.spawn(move || {
                let mut v = vcpu(vm, t + 1);
                for i in 0..pages {
                    // Both threads touch every page, in opposite orders.
                    let page = if t == 0 { i } else { pages - 1 - i };
                    let gpa = page << 12;
                    v.access(
                        Gva::new(gpa + 8 * t as u64),
                        Access::new(AccessKind::Write, 0, false),
                        8,
                        page,
                    )
                    .unwrap();
                }
            });
        }
    });
    let s = vm.mmu.stats().snapshot();
    assert_eq!(s.pages_4k, pages as i64, "every page mapped once, none twice");
    assert!(s.pf_fixed >= pages as i64);
    // Every byte each thread wrote is there.
    let mut v = vcpu(&vm, 9);
    for page in 0..pages {
        assert_eq!(read(&mut v, page << 12).0, page);
        assert_eq!(read(&mut v, (page << 12) + 8).0, page);
    }
    // Every SPTE maps the frame the host maps now.
    for page in [0u64, 1, 511, 512, 1023] {
        let host_pfn = vm.host.lookup(Hva::new(0x4000_0000 + (page << 12))).unwrap().pfn;
        read(&mut v, page << 12);
        let e = v.tlb().entries().find(|e| e.gpa_base == page << 12).unwrap();
        assert_eq!(e.hpa_base.raw() >> 12, host_pfn.raw());
    }
}

/// A writer vCPU increments a counter, a reader vCPU checks it never goes
/// backwards, while the host migrates the page over and over: a vCPU that
/// kept a translation to the old frame after the MMU-notifier zap would
/// write into a freed frame (the write is lost) or read its poison.
#[test]
fn migration_under_running_vcpus_loses_no_write() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE);
    let stop = AtomicBool::new(false);
    let last_written = AtomicU64::new(0);
    let migrations = AtomicU64::new(0);
    let gpa = 0x3000u64;
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut v = vcpu(&vm, 1);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                write(&mut v, gpa, n);
                last_written.store(n, Ordering::SeqCst);
            }
        });
        s.spawn(|| {
            let mut v = vcpu(&vm, 2);
            let mut prev = 0;
            while !stop.load(Ordering::Relaxed) {
                let floor = last_written.load(Ordering::SeqCst);
                let (got, mmio) = read(&mut v, gpa);
                assert!(!mmio);
                assert!(
                    got >= floor && got >= prev,
                    "read {got:#x} after {floor} was written (previous read {prev})"
                );
                prev = got;
            }
        });
        s.spawn(|| {
            // 800 ms, or longer on a loaded machine until both sides made
            // progress (at most 30 s).
            let start = std::time::Instant::now();
            let elapsed = || start.elapsed();
            let progressed = || migrations.load(Ordering::Relaxed) > 10 && last_written.load(Ordering::Relaxed) > 10;
            while (elapsed() < std::time::Duration::from_millis(800) || !progressed())
                && elapsed() < std::time::Duration::from_secs(30)
            {
                if vm.host.lookup(Hva::new(0x4000_3000)).is_some() {
                    vm.host.migrate(Hva::new(0x4000_3000)).unwrap();
                    migrations.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
    assert!(migrations.load(Ordering::Relaxed) > 10, "the page moved many times");
    assert!(last_written.load(Ordering::Relaxed) > 10, "the writer made progress");
}

/// Runs deferred frees until `done` holds (epoch reclamation is lazy, and
/// other tests' threads pinning the epoch can delay it), for up to 10 s.
fn reclaim_until(done: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        crossbeam_epoch::pin().flush();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    done()
}

#[test]
fn fast_zap_invalidates_roots_and_vcpus_reload() {
    let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE);
    let mut v = vcpu(&vm, 1);
    for page in 0..16u64 {
        write(&mut v, page << 12, page + 100);
    }
    let old_root = v.root().unwrap().root().clone();
    assert_eq!(vm.mmu.stats().snapshot().pages_4k, 16);
    vm.mmu.zap_all_fast();
    assert!(!old_root.is_valid(), "zap-all invalidates the root");
    // The caller did not wait for the tree: its leaves are still there.
    assert_eq!(vm.mmu.stats().snapshot().pages_4k, 16);
    // The vCPU drops the obsolete root at its next entry and loads a new one.
    assert_eq!(read(&mut v, 5 << 12).0, 105);
    assert_eq!(v.stats().root_reloads, 1);
    assert_ne!(v.root().unwrap().root().pfn(), old_root.pfn());
    assert!(v.root().unwrap().root().is_valid());
    // The invalidated tree is zapped under the read lock, then freed once
    // its last reference is gone.
    assert_eq!(vm.mmu.zap_invalidated_roots(), 16);
    assert_eq!(vm.mmu.stats().snapshot().pages_4k, 1, "only the new root's page");
    let arena = vm.host.arena().clone();
    assert!(
        reclaim_until(|| arena.is_freed(old_root.pfn())),
        "the old root's table is freed"
    );
}

#[test]
fn nothing_hands_out_an_invalid_root() {
    let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE);
    let held = vm.mmu.get_root(0).unwrap();
    vm.mmu.zap_all_fast();
    let fresh = vm.mmu.get_root(0).unwrap();
    assert!(fresh.root().is_valid());
    assert_ne!(fresh.root().pfn(), held.root().pfn());
    // A fault on the invalid root installs nothing: the vCPU must reload.
    let mut cache = vm.mmu.vcpu_caches();
    let fault = vmmu::mmu::tdp::TdpFault {
        gpa: Gpa::new(0x1000),
        write: false,
        exec: false,
        present: false,
    };
    assert_eq!(
        vm.mmu.page_fault(&held, fault, &mut cache, None).unwrap(),
        vmmu::mmu::tdp::FaultOutcome::Retry
    );
    assert_eq!(vm.mmu.stats().snapshot().pages_4k, 0);
    // The held reference keeps the invalid tree alive through its zap.
    vm.mmu.zap_invalidated_roots();
    let arena = vm.host.arena().clone();
    let pfn = held.root().pfn();
    assert!(!arena.is_freed(pfn), "still referenced");
    drop(held);
    assert!(reclaim_until(|| arena.is_freed(pfn)));
}

#[test]
fn zap_all_races_with_faulting_vcpus() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let vm = vm(8 * MB, 0x4000_0000, VmaFlags::WRITE);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (vm, stop) = (&vm, &stop);
            s.spawn(move || {
                let mut v = vcpu(vm, t as u16 + 1);
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    for page in 0..64u64 {
                        let gpa = (page << 12) + 8 * t;
                        write(&mut v, gpa, round << 16 | page);
                        assert_eq!(read(&mut v, gpa).0, round << 16 | page);
                    }
                }
            });
        }
        s.spawn(|| {
            for _ in 0..200 {
                vm.mmu.zap_all_fast();
                vm.mmu.zap_invalidated_roots();
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
    // Only the live root's pages are still counted; every invalidated tree
    // was zapped.
    vm.mmu.zap_invalidated_roots();
    let s = vm.mmu.stats().snapshot();
    assert!(s.pages_4k <= 64, "{s:?}");
}

fn set_logging(vm: &Vm, on: bool) {
    let flags = if on {
        MemslotFlags::LOG_DIRTY_PAGES
    } else {
        MemslotFlags::empty()
    };
    vm.slots.update_flags(0, 0, flags).unwrap();
}

fn dirty_pages(bitmap: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (w, word) in bitmap.iter().enumerate() {
        for b in 0..64 {
            if word >> b & 1 != 0 {
                out.push(w as u64 * 64 + b);
            }
        }
    }
    out
}

#[test]
fn dirty_logging_splits_logs_exactly_and_recovers_huge_pages() {
    logs_exactly(DirtyLogMode::WriteProtect);
}

#[test]
fn dirty_bit_logging_logs_exactly_without_write_faults() {
    logs_exactly(DirtyLogMode::DirtyBit);
}

fn logs_exactly(mode: DirtyLogMode) {
    let vm = vm_with_mode(mode, VmaFlags::WRITE | VmaFlags::THP);
    let mut v = vcpu(&vm, 1);
    write(&mut v, 0x1000, 1);
    write(&mut v, 0x20_1000, 2);
    assert_eq!(vm.mmu.stats().snapshot().pages_2m, 2);

    set_logging(&vm, true);
    let s = vm.mmu.stats().snapshot();
    assert_eq!((s.pages_2m, s.pages_4k), (0, 1024), "eager split to 4K");
    assert!(dirty_pages(&vm.mmu.get_dirty_log(0, 0).unwrap()).is_empty());

    for gfn in [3u64, 7, 600] {
        write(&mut v, gfn << 12, gfn);
    }
    read(&mut v, 9 << 12); // reads are not writes
    if mode == DirtyLogMode::WriteProtect {
        assert!(vm.mmu.stats().snapshot().pf_fast >= 3, "writes fixed on the fast path");
    } else {
        assert_eq!(vm.mmu.stats().snapshot().pf_fast, 0, "D-bit mode: writes do not fault");
    }
    assert_eq!(dirty_pages(&vm.mmu.get_dirty_log(0, 0).unwrap()), [3, 7, 600]);
    assert!(
        dirty_pages(&vm.mmu.get_dirty_log(0, 0).unwrap()).is_empty(),
        "harvest clears"
    );
    // Harvested pages were write-protected again: the next write is logged.
    write(&mut v, 7 << 12, 70);
    write(&mut v, 1000 << 12, 1000); // never mapped before: slow path, logged
    assert_eq!(dirty_pages(&vm.mmu.get_dirty_log(0, 0).unwrap()), [7, 1000]);
    // While logging, new mappings are 4K.
    assert_eq!(vm.mmu.stats().snapshot().pages_2m, 0);

    set_logging(&vm, false);
    let s = vm.mmu.stats().snapshot();
    assert_eq!(s.pages_2m, 2, "huge pages recovered in place: {s:?}");
    assert_eq!(s.pages_4k, 0);
    assert_eq!(read(&mut v, 7 << 12).0, 70);
    assert_eq!(read(&mut v, 600 << 12).0, 600);
}

/// D-bit mode (KVM with PML) logs a write when hardware sets the EPT Dirty
/// bit: a zap of the dirty SPTE before the harvest (zap-all, an MMU-notifier
/// invalidation) must not lose it. Found by the `vm` fuzz target
/// (`tests/fuzz.rs`): write while logging, zap-all, harvest.
#[test]
fn dirty_bit_mode_keeps_writes_across_zaps() {
    let vm = vm_with_mode(DirtyLogMode::DirtyBit, VmaFlags::WRITE | VmaFlags::THP);
    let mut v = vcpu(&vm, 1);
    read(&mut v, 0x1000);
    set_logging(&vm, true);
    write(&mut v, 0x15000, 1);
    vm.mmu.zap_all_fast();
    vm.mmu.zap_invalidated_roots();
    assert_eq!(dirty_pages(&vm.mmu.get_dirty_log(0, 0).unwrap()), [0x15], "zap-all");

    write(&mut v, 0x16000, 2);
    vm.host.migrate(Hva::new(0x4000_0000 + 0x16000)).unwrap();
    assert_eq!(
        dirty_pages(&vm.mmu.get_dirty_log(0, 0).unwrap()),
        [0x16],
        "host migration"
    );
}

/// KVM's dirty_log_test method: a vCPU writes the current iteration number
/// into random pages while the VMM harvests. A write of value `v` starts
/// after iteration `v` began, so a page whose final value is `v` must be in
/// harvest `v - 1` or a later one (the last harvest runs after the vCPU
/// stopped): no dirty page may be lost.
#[test]
fn every_write_during_logging_shows_up_in_a_harvest() {
    every_write_is_harvested(DirtyLogMode::WriteProtect);
}

#[test]
fn every_write_is_harvested_in_dirty_bit_mode() {
    every_write_is_harvested(DirtyLogMode::DirtyBit);
}

fn vm_with_mode(mode: DirtyLogMode, flags: VmaFlags) -> Vm {
    vm(4 * MB, 0x4000_0000, flags).with_mmu(TdpConfig {
        dirty_log: mode,
        ..TdpConfig::default()
    })
}

fn every_write_is_harvested(mode: DirtyLogMode) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const PAGES: u64 = 512;
    const ROUNDS: u64 = 40;
    let vm = vm_with_mode(mode, VmaFlags::WRITE | VmaFlags::THP);
    set_logging(&vm, true);
    let iteration = AtomicU64::new(1);
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    /// Stops the writer however the harvesting loop ends.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    // harvests[k] was collected after iteration k + 1 began.
    let mut harvests: Vec<Vec<u64>> = vec![Vec::new()];
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut v = vcpu(&vm, 1);
            let mut x = 0x2545_f491_4f6c_dd1du64;
            while !stop.load(Ordering::SeqCst) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let it = iteration.load(Ordering::SeqCst);
                write(&mut v, (x % PAGES) << 12, it);
                writes.fetch_add(1, Ordering::Relaxed);
            }
        });
        let _stop = StopOnDrop(&stop);
        for round in 1..=ROUNDS {
            std::thread::sleep(std::time::Duration::from_millis(2));
            iteration.store(round + 1, Ordering::SeqCst);
            harvests.push(dirty_pages(&vm.mmu.get_dirty_log(0, 0).unwrap()));
        }
    });
    harvests.push(dirty_pages(&vm.mmu.get_dirty_log(0, 0).unwrap()));
    assert!(writes.load(Ordering::Relaxed) > PAGES, "the vCPU kept writing");
    let mem = vmmu::mem::GuestMemory::new(vm.host.clone(), vm.slots.clone());
    let mut checked = 0;
    for page in 0..PAGES {
        let value = mem.read_u64(Gpa::new(page << 12)).unwrap();
        if value == 0 {
            continue;
        }
        let first = (value - 1) as usize;
        assert!(
            harvests[first.min(harvests.len() - 1)..]
                .iter()
                .any(|h| h.contains(&page)),
            "page {page}, last written with {value}, is in no harvest from {first} on; \
             it is in harvests {:?}; the last harvests hold {:?} pages",
            harvests
                .iter()
                .enumerate()
                .filter(|(_, h)| h.contains(&page))
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            harvests.iter().rev().take(4).map(Vec::len).collect::<Vec<_>>()
        );
        checked += 1;
    }
    assert!(checked > PAGES / 2, "most pages were written");
}

#[test]
fn a_first_write_after_logging_is_enabled_is_logged() {
    let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE);
    set_logging(&vm, true);
    let mut v = vcpu(&vm, 1);
    write(&mut v, 0x5000, 1);
    assert_eq!(
        dirty_pages(&vm.mmu.get_dirty_log(0, 0).unwrap()),
        [5],
        "{:?}",
        vm.mmu.stats().snapshot()
    );
}

fn vm_with(config: TdpConfig) -> Vm {
    vm(4 * MB, 0x4000_0000, VmaFlags::WRITE).with_mmu(config)
}

#[test]
fn aging_with_ept_accessed_bits() {
    use vmmu::host::HvaRange;
    let vm = vm_with(TdpConfig::default());
    let mut v = vcpu(&vm, 1);
    write(&mut v, 0x3000, 3);
    let page = HvaRange::new(Hva::new(0x4000_3000), 0x1000);
    assert!(vm.mmu.test_age_hva_range(page), "a fresh mapping is young");
    assert!(vm.mmu.age_hva_range(page, true), "aging reports it was young");
    assert!(!vm.mmu.test_age_hva_range(page), "and makes it old");
    assert_eq!(vm.mmu.stats().snapshot().pages_4k, 1, "aging never zaps");
    // The flush made the vCPU walk again: hardware sets A.
    assert_eq!(read(&mut v, 0x3000).0, 3);
    assert!(vm.mmu.test_age_hva_range(page), "young again after a use");
    // A page nobody maps is never young.
    assert!(!vm.mmu.test_age_hva_range(HvaRange::new(Hva::new(0x4010_0000), 0x1000)));
}

#[test]
fn aging_without_ept_accessed_bits_uses_access_tracking() {
    use vmmu::host::HvaRange;
    let vm = vm_with(TdpConfig {
        ad: false,
        ..TdpConfig::default()
    });
    let mut v = vcpu(&vm, 1);
    write(&mut v, 0x3000, 3);
    let page = HvaRange::new(Hva::new(0x4000_3000), 0x1000);
    assert!(vm.mmu.test_age_hva_range(page));
    assert!(vm.mmu.age_hva_range(page, true));
    assert!(!vm.mmu.test_age_hva_range(page), "access-tracked: old");
    let fast = vm.mmu.stats().snapshot().pf_fast;
    let violations = v.stats().ept_violations;
    assert_eq!(read(&mut v, 0x3000).0, 3, "the data is still there");
    assert_eq!(v.stats().ept_violations, violations + 1, "the access exited");
    assert_eq!(
        vm.mmu.stats().snapshot().pf_fast,
        fast + 1,
        "and was fixed on the fast path"
    );
    assert!(vm.mmu.test_age_hva_range(page), "young again");
    // The host's reclaim path reaches the MMU through the notifier.
    assert!(vm.host.clear_flush_young(page));
    assert!(!vm.mmu.test_age_hva_range(page));
}

#[test]
fn nx_huge_pages_split_on_fetch_and_recover() {
    let vm = vm(8 * MB, 0x4000_0000, VmaFlags::WRITE | VmaFlags::THP).with_mmu(TdpConfig {
        nx_huge_pages: true,
        ..TdpConfig::default()
    });
    let mut v = vcpu(&vm, 1);
    write(&mut v, 0x20_0000, 0x90);
    assert_eq!(vm.mmu.stats().snapshot().pages_2m, 1, "data pages stay huge");
    // An instruction fetch in the huge region maps that page 4K, executable.
    let r = v
        .access(Gva::new(0x20_0000), Access::new(AccessKind::Fetch, 0, false), 1, 0)
        .unwrap();
    assert!(matches!(r, AccessResult::Done { value: 0x90, .. }), "{r:?}");
    // The huge SPTE was split in place (KVM's `tdp_mmu_split_huge_page`):
    // its 512 pages stay mapped, at 4K, executable.
    let s = vm.mmu.stats().snapshot();
    assert_eq!((s.pages_2m, s.pages_4k, s.nx_lpage_splits), (0, 512, 1), "{s:?}");
    let faults = s.pf_taken;
    read(&mut v, 0x20_1000);
    let r = v
        .access(Gva::new(0x20_3000), Access::new(AccessKind::Fetch, 0, false), 1, 0)
        .unwrap();
    assert!(matches!(r, AccessResult::Done { .. }), "{r:?}");
    assert_eq!(
        vm.mmu.stats().snapshot().pf_taken,
        faults,
        "no fault for the other pages"
    );
    // The recovery worker zaps the region's table; it faults back in huge.
    assert_eq!(vm.mmu.recover_nx_huge_pages(1), 1);
    let s = vm.mmu.stats().snapshot();
    assert_eq!((s.pages_4k, s.nx_lpage_splits), (0, 0), "{s:?}");
    read(&mut v, 0x20_1000);
    let s = vm.mmu.stats().snapshot();
    assert_eq!((s.pages_2m, s.pages_4k), (1, 0), "{s:?}");
    assert_eq!(vm.mmu.recover_nx_huge_pages(1), 0, "nothing left to recover");
}

/// INVVPID and INVEPT as the VMM issues them: each type drops exactly the
/// translations it names, and the invalid forms are refused.
#[test]
fn invvpid_and_invept_drop_what_they_name() {
    use vmmu::arch::ept::Eptp;
    use vmmu::cpu::vcpu::{InvalidationError, Invept, Invvpid};
    let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE);
    let mut v = vcpu(&vm, 5);
    let fill = |v: &mut Vcpu| {
        write(v, 0x1000, 1);
        write(v, 0x2000, 2);
        assert_eq!(v.tlb().len(), 2);
    };
    fill(&mut v);
    let cached = |v: &Vcpu, gpa: u64| v.tlb().entries().any(|e| e.gpa_base == gpa);

    assert_eq!(v.invvpid(Invvpid::SingleContext(0)), Err(InvalidationError::VpidZero));
    assert_eq!(
        v.invvpid(Invvpid::IndividualAddress {
            vpid: 5,
            va: 0x0001_0000_0000_0000
        }),
        Ok(()),
        "57-bit canonical"
    );
    assert_eq!(
        v.invvpid(Invvpid::IndividualAddress {
            vpid: 5,
            va: 0x0100_0000_0000_0000
        }),
        Err(InvalidationError::NonCanonical(0x0100_0000_0000_0000))
    );
    assert_eq!(v.tlb().len(), 2, "refused or unrelated invalidations drop nothing");

    v.invvpid(Invvpid::IndividualAddress { vpid: 6, va: 0x1000 }).unwrap();
    assert_eq!(v.tlb().len(), 2, "another VPID's address");
    v.invvpid(Invvpid::IndividualAddress { vpid: 5, va: 0x1fff }).unwrap();
    assert!(!cached(&v, 0x1000) && cached(&v, 0x2000));
    v.invvpid(Invvpid::SingleContextRetainingGlobals(5)).unwrap();
    assert!(v.tlb().is_empty(), "paging off: nothing is global");

    fill(&mut v);
    let root = v.root().unwrap().root().pfn().raw() << 12;
    v.invept(Invept::SingleContext(Eptp::new(root + 0x1000, 4, true)));
    assert_eq!(v.tlb().len(), 2, "another EPTP");
    v.invept(Invept::SingleContext(Eptp::new(root, 4, true)));
    assert!(v.tlb().is_empty());
    fill(&mut v);
    v.invept(Invept::AllContext);
    assert!(v.tlb().is_empty());
    // Still correct afterwards: the translations are walked again.
    assert_eq!(read(&mut v, 0x1000).0, 1);
    assert_eq!(read(&mut v, 0x2000).0, 2);
}

/// `mmu_pages` counts the tables linked now: a fast zap's old tree is
/// subtracted when its last reference goes, and a table replaced by a huge
/// leaf takes its subtables with it.
#[test]
fn mmu_pages_counts_live_tables_across_fast_zap() {
    let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE);
    let mut v = vcpu(&vm, 1);
    for page in 0..4u64 {
        write(&mut v, page << 12, page);
    }
    let tables = |vm: &Vm| vm.mmu.stats().snapshot().mmu_pages;
    assert_eq!(tables(&vm), 4, "root, PDPT, PD, PT");
    for round in 0..3 {
        vm.mmu.zap_all_fast();
        vm.mmu.zap_invalidated_roots();
        // The vCPU drops the old root and builds the new tree.
        write(&mut v, 0, round);
        assert!(
            reclaim_until(|| tables(&vm) == 4),
            "round {round}: {} tables counted",
            tables(&vm)
        );
    }
}

/// A guest with MAXPHYADDR 52 on 4-level EPT (which KVM never configures)
/// can name gpas above the 48 bits the tree translates. Such a gpa is an
/// error of the MMU, not an alias of the gpa with bits 51:48 cleared (the
/// EPT walk used to index with the low bits and read that page's data).
#[test]
fn a_gpa_beyond_4_level_ept_is_an_error_not_an_alias() {
    use vmmu::arch::control::{Cr0, Cr4, Efer};
    use vmmu::cpu::vcpu::VcpuError;
    use vmmu::mmu::tdp::TdpError;
    let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE);
    let features = CpuFeatures::default().with_maxphyaddr(52);
    let mut v = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), features, 1).unwrap();
    v.set_state(ControlRegs::default(), 0, 0).unwrap();
    // With paging off: 4-level tables at 0x1000..0x4fff, data at 0x5000.
    write(&mut v, 0x5000, 0xdead_beef);
    write(&mut v, 0x1000, 0x2000 | 7);
    write(&mut v, 0x2000, 0x3000 | 7);
    write(&mut v, 0x3000, 0x4000 | 7);
    write(&mut v, 0x4000, 0x5000 | 7); // va 0 → gpa 0x5000
    let beyond = (1u64 << 48) | 0x5000;
    write(&mut v, 0x4008, beyond | 7); // va 0x1000 → gpa 2^48 + 0x5000
    let long = ControlRegs {
        cr0: Cr0::PE | Cr0::PG | Cr0::WP,
        cr4: Cr4::PAE,
        efer: Efer::LME | Efer::LMA,
    };
    v.set_state(long, 0x1000, 0).unwrap();
    assert_eq!(read(&mut v, 0).0, 0xdead_beef);
    let r = v.access(Gva::new(0x1000), Access::new(AccessKind::Read, 0, false), 8, 0);
    assert!(
        matches!(r, Err(VcpuError::Mmu(TdpError::GpaBeyondTree { gpa, levels: 4 })) if gpa == Gpa::new(beyond)),
        "{r:?}"
    );
    assert_eq!(read(&mut v, 0).0, 0xdead_beef, "gpa 0x5000's mapping is intact");
}

/// A configuration the fault path cannot honour is a typed error.
#[test]
fn an_invalid_max_level_is_an_error_not_a_panic() {
    use vmmu::cpu::vcpu::VcpuError;
    use vmmu::mmu::tdp::TdpError;
    let config = TdpConfig {
        max_level: 0,
        ..TdpConfig::default()
    };
    let vm = Vm::new(4 * MB, Hva::new(0x4000_0000), VmaFlags::WRITE, config).unwrap();
    let mut v = vcpu(&vm, 1);
    let r = v.access(Gva::new(0x1000), Access::new(AccessKind::Read, 0, false), 8, 0);
    assert!(
        matches!(r, Err(VcpuError::Mmu(TdpError::InvalidMaxLevel { max_level: 0 }))),
        "{r:?}"
    );
}

/// On an AMD host the TDP MMU builds NPT: tables in the x86-64 long-mode
/// format (present, writable, user; A at bit 5 and D at bit 6), which the
/// vCPU walks as NPT; a write sets up a writable, dirty 4K leaf.
#[test]
fn an_amd_host_builds_and_walks_npt() {
    use vmmu::arch::control::Vendor;
    use vmmu::mmu::spte::SpteFormat;
    let config = TdpConfig {
        vendor: Vendor::Amd,
        max_level: 1,
        ..TdpConfig::default()
    };
    let vm = Vm::new(4 * MB, Hva::new(0x4000_0000), VmaFlags::WRITE, config).unwrap();
    assert_eq!(vm.mmu.format(), SpteFormat::Legacy);
    let mut v = vcpu(&vm, 1);
    write(&mut v, 0x5008, 9);
    assert_eq!(read(&mut v, 0x5008).0, 9);
    let leaves = vm.mmu.leaves_of(0, vmmu::addr::Gfn::new(5));
    let (_, level, spte) = leaves[0];
    assert_eq!(level, vmmu::addr::Level::L1);
    // P | R/W | U | A | D in the long-mode format; not EPT's bits 8/9.
    assert_eq!(spte.raw() & 0x67, 0x67, "{spte:?}");
    assert_eq!(spte.raw() & 0x300, 0, "{spte:?}");
    // NPT has no A/D switch: a vCPU refuses the configuration.
    let no_ad = TdpConfig { ad: false, ..config };
    let vm = Vm::new(4 * MB, Hva::new(0x4000_0000), VmaFlags::WRITE, no_ad).unwrap();
    assert!(Vcpu::new(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), 1).is_err());
}

/// MMIO on an AMD host: the MMIO SPTE has reserved bits, so the second
/// access exits with a reserved-bit #NPF (counted with the misconfigurations,
/// the same exit on Intel) instead of a violation.
#[test]
fn mmio_on_amd_exits_with_a_reserved_bit_npf() {
    let config = TdpConfig {
        vendor: vmmu::arch::control::Vendor::Amd,
        ..TdpConfig::default()
    };
    let vm = Vm::new(4 * MB, Hva::new(0x4000_0000), VmaFlags::WRITE, config).unwrap();
    let mut v = vcpu(&vm, 1);
    assert_eq!(read(&mut v, 0x1000_0000), (0, true));
    assert_eq!(vm.mmu.stats().snapshot().pf_mmio_spte_created, 1);
    let before = v.stats();
    assert_eq!(read(&mut v, 0x1000_0008), (0, true));
    let after = v.stats();
    assert_eq!(after.ept_misconfigs, before.ept_misconfigs + 1);
    assert_eq!(after.ept_violations, before.ept_violations);
}

/// Seed 003: the fast zap's request and its invalidation of the roots in
/// one critical section (KVM), or invalidation, a yield, then the request
/// (safe here: nobody takes a reference to an invalid root, and a fault
/// on one retries until the request comes), leave no vCPU on an invalid
/// root. With the request first and the invalidation after the yield, a
/// vCPU that answers the request in the window keeps its still-valid root
/// and is never asked again: the hardware model counts its walks of the
/// root it was told to drop, and its access cannot complete.
#[test]
fn a_request_made_before_the_invalidation_leaves_a_vcpu_on_an_invalid_root() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use vmmu::mmu::ZapRequest;
    use vmmu::mmu::tdp::ZapAllFastOrder;
    for order in [
        ZapAllFastOrder::OneCriticalSection,
        ZapAllFastOrder::InvalidateYieldRequest,
        ZapAllFastOrder::RequestYieldInvalidate,
    ] {
        let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE);
        vm.mmu.set_zap_request(ZapRequest::FreeObsolete, order);
        assert_eq!(vm.mmu.zap_all_fast_order(), order);
        let mut v = vcpu(&vm, 1);
        write(&mut v, 0x1000, 7);
        let unsafe_order = order == ZapAllFastOrder::RequestYieldInvalidate;
        // Zaps while the vCPU runs: 10 for the safe orders, for the unsafe
        // one until a zap's window catches the vCPU (one in a few).
        let mut failed = false;
        for _ in 0..if unsafe_order { 200 } else { 10 } {
            let done = AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    vm.mmu.zap_all_fast();
                    vm.mmu.zap_invalidated_roots();
                    done.store(true, Ordering::Release);
                });
                while !done.load(Ordering::Acquire) && !failed {
                    failed = v
                        .access(Gva::new(0x1000), Access::new(AccessKind::Read, 0, false), 8, 0)
                        .is_err();
                }
            });
            if !failed {
                failed = v
                    .access(Gva::new(0x1000), Access::new(AccessKind::Read, 0, false), 8, 0)
                    .is_err();
            }
            if failed {
                break;
            }
        }
        let uses = v.stats().invalid_root_uses;
        if unsafe_order {
            assert!(failed && uses > 0, "{order:?}: not caught ({uses} invalid-root walks)");
        } else {
            assert!(!failed && uses == 0, "{order:?}: {uses} invalid-root walks");
            assert_eq!(read(&mut v, 0x1000).0, 7);
        }
    }
}

/// `KVM_PRE_FAULT_MEMORY`: a pre-faulted range is mapped as read faults
/// would map it (4K on 4K host pages, 2M on THP), the vCPU then reads it
/// without an exit, and the range stops at the first gpa without a
/// memslot, saying so.
#[test]
fn pre_faulted_memory_is_mapped_as_faults_would_map_it() {
    use vmmu::mmu::tdp::PreFaultStop;
    for (flags, pages_4k, pages_2m) in [(VmaFlags::WRITE, 512, 0), (VmaFlags::WRITE | VmaFlags::THP, 0, 1)] {
        let vm = vm(8 * MB, 0x4000_0000, flags);
        let mem = vm.memory();
        for page in 0..512u64 {
            mem.write_value(Gpa::new(0x20_0000 + (page << 12)), 8, page + 1)
                .unwrap();
        }
        let root = vm.mmu.get_root(0).unwrap();
        let mut caches = vm.mmu.vcpu_caches();
        let r = vm
            .mmu
            .pre_fault_memory(&root, Gpa::new(0x20_0000), 2 * MB, &mut caches)
            .unwrap();
        assert_eq!((r.bytes, r.stopped), (2 * MB, None), "{flags:?}");
        let s = vm.mmu.stats().snapshot();
        assert_eq!((s.pages_4k, s.pages_2m), (pages_4k, pages_2m), "{flags:?}");
        let mut v = vcpu(&vm, 1);
        let exits = v.stats().ept_violations;
        for page in 0..512u64 {
            assert_eq!(read(&mut v, 0x20_0000 + (page << 12)).0, page + 1);
        }
        assert_eq!(v.stats().ept_violations, exits, "{flags:?}: a pre-faulted page exited");
        assert!(vm.mmu.audit().is_empty(), "{:?}", vm.mmu.audit());
        // Past the end of RAM: mapped up to it, stopped at the first gpa
        // without a memslot.
        let r = vm
            .mmu
            .pre_fault_memory(&root, Gpa::new(7 * MB + 0x1000), 2 * MB, &mut caches)
            .unwrap();
        assert_eq!(
            (r.bytes, r.stopped),
            (MB - 0x1000, Some((Gpa::new(8 * MB), PreFaultStop::NoMemslot)))
        );
        // An invalidated root: the vCPU must load a new one first.
        vm.mmu.zap_all_fast();
        let r = vm.mmu.pre_fault_memory(&root, Gpa::new(0), MB, &mut caches).unwrap();
        assert_eq!(
            (r.bytes, r.stopped),
            (0, Some((Gpa::new(0), PreFaultStop::RootInvalid)))
        );
    }
}

/// A pre-fault while dirty logging maps what a read fault would: not
/// writable, so the guest's first write exits and logs the page.
#[test]
fn pre_faulted_memory_under_dirty_logging_logs_the_first_write() {
    let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE);
    vm.slots.update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES).unwrap();
    let root = vm.mmu.get_root(0).unwrap();
    let mut caches = vm.mmu.vcpu_caches();
    let r = vm.mmu.pre_fault_memory(&root, Gpa::new(0), MB, &mut caches).unwrap();
    assert_eq!(r.bytes, MB);
    let mut v = vcpu(&vm, 1);
    write(&mut v, 0x5000, 9);
    let bitmap = vm.mmu.get_dirty_log(0, 0).unwrap();
    assert_eq!(vmmu::vm::bitmap_pages(&bitmap), [5]);
}

/// Pre-faults racing host changes (migrations, THP splits and collapses)
/// install only mappings the retry protocol validated: the audit after
/// every pre-fault finds every SPTE pointing at the frame the host maps
/// then. (With the retry check off, `HostMappingUse::Unchecked`, it
/// fails within a few rounds.)
#[test]
fn pre_faults_racing_the_host_leave_no_stale_mapping() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let vm = vm(8 * MB, 0x4000_0000, VmaFlags::WRITE | VmaFlags::THP);
    let mem = vm.memory();
    for off in (0..8 * MB).step_by(4096) {
        mem.write_value(Gpa::new(off), 8, off).unwrap();
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let block = Hva::new(0x4000_0000 + (i % 4) * 2 * MB);
                let _ = match i % 3 {
                    0 => vm.host.split_thp(block).map(|_| ()),
                    1 => vm.host.migrate(Hva::new(block.raw() + 0x3000)).map(|_| ()),
                    _ => vm.host.collapse_thp(block),
                };
                i += 1;
            }
        });
        let mut caches = vm.mmu.vcpu_caches();
        for round in 0..1000 {
            let root = vm.mmu.get_root(0).unwrap();
            let r = vm
                .mmu
                .pre_fault_memory(&root, Gpa::new(0), 8 * MB, &mut caches)
                .unwrap();
            assert!(r.stopped.is_none() || r.bytes < 8 * MB, "{r:?}");
            // The audit runs under the write lock, between the host's
            // changes: what it sees must be right at that moment.
            let audit = vm.mmu.audit();
            if !audit.is_empty() {
                stop.store(true, Ordering::Relaxed);
                panic!("round {round}: {audit:?}");
            }
            if round % 10 == 0 {
                vm.mmu.zap_all_fast();
                vm.mmu.zap_invalidated_roots();
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(vm.mmu.audit().is_empty(), "{:?}", vm.mmu.audit());
    let mut v = vcpu(&vm, 1);
    for off in (0..8 * MB).step_by(0x7000) {
        assert_eq!(read(&mut v, off).0, off);
    }
}

/// A guest whose page tables sit in a read-only memslot (ROM): the
/// hardware's walk must set their Accessed bits, which EPT forbids, so
/// every access exits. The VMM makes the access in software, as KVM's
/// emulator does, leaving the tables in ROM unwritten (KVM's
/// `pte_writable`); retrying the access instead made no progress, ever
/// (found by the vm fuzz target).
#[test]
fn page_tables_in_a_read_only_memslot_do_not_stall_the_guest() {
    use vmmu::arch::control::{Cr0, Cr4, Efer};
    use vmmu::mem::{MemoryRegion, MemslotFlags};
    for vendor in [vmmu::arch::control::Vendor::Intel, vmmu::arch::control::Vendor::Amd] {
        let vm = Vm::new(
            4 * MB,
            Hva::new(0x4000_0000),
            VmaFlags::WRITE,
            TdpConfig {
                vendor,
                ..TdpConfig::default()
            },
        )
        .unwrap();
        let rom_hva = 0x5000_0000u64;
        vm.host.mmap(Hva::new(rom_hva), 2 * MB, VmaFlags::WRITE).unwrap();
        vm.slots
            .create(MemoryRegion {
                as_id: 0,
                id: 1,
                flags: MemslotFlags::READONLY,
                guest_phys_addr: Gpa::new(4 * MB),
                memory_size: 2 * MB,
                userspace_addr: Hva::new(rom_hva),
            })
            .unwrap();
        // PML4, PDPT, PD, PT at the start of the ROM, written by the VMM
        // through the host; va 0 maps gpa 0x1000 in RAM, nothing accessed.
        let rom = |off: u64, v: u64| vm.host.write(Hva::new(rom_hva + off), &v.to_le_bytes()).unwrap();
        let table = 0x7; // P, W, U
        rom(0, (4 * MB + 0x1000) | table);
        rom(0x1000, (4 * MB + 0x2000) | table);
        rom(0x2000, (4 * MB + 0x3000) | table);
        rom(0x3000, 0x1000 | table);
        vm.memory().write_u64(Gpa::new(0x1008), 0x5eed).unwrap();
        let regs = ControlRegs {
            cr0: Cr0::PE | Cr0::PG | Cr0::WP,
            cr4: Cr4::PAE,
            efer: Efer::LME | Efer::LMA,
        };
        let mut v = vm.vcpu(CpuFeatures::default(), 1, regs, 4 * MB).unwrap();
        let read = v
            .access(Gva::new(0x8), Access::new(AccessKind::Read, 3, false), 8, 0)
            .unwrap();
        assert!(
            matches!(
                read,
                AccessResult::Done {
                    value: 0x5eed,
                    mmio: false,
                    ..
                }
            ),
            "{vendor:?}: {read:?}"
        );
        let write = v
            .access(Gva::new(0x10), Access::new(AccessKind::Write, 3, false), 8, 0xfeed)
            .unwrap();
        assert!(
            matches!(write, AccessResult::Done { mmio: false, .. }),
            "{vendor:?}: {write:?}"
        );
        assert_eq!(vm.memory().read_u64(Gpa::new(0x1010)).unwrap(), 0xfeed);
        // The ROM is as the VMM wrote it: no Accessed or Dirty bit set.
        let mut b = [0u8; 8];
        vm.host.read(Hva::new(rom_hva + 0x3000), &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x1000 | table, "{vendor:?}");
    }
}
