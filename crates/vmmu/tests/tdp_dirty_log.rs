//! Dirty logging on the TDP MMU outside the default configuration:
//! manual protect with an initially-set bitmap, EPT A/D off with page
//! aging, D-bit logging with huge leaves, NX huge pages across a logging
//! session, and frames running out under splits. Each test is the
//! regression test of a class of lost writes or hangs found by running a
//! live-migration checker over the whole configuration matrix; each failed
//! before its fix.

use vmmu::addr::{Gva, Hva, Pfn};
use vmmu::arch::control::CpuFeatures;
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, Vcpu};
use vmmu::host::{HvaRange, VmaFlags};
use vmmu::mem::{DirtyGfn, MemslotConfig, MemslotFlags};
use vmmu::mmu::tdp::{DirtyLogMode, TdpConfig};
use vmmu::vm::Vm;
use vmmu::walker::ControlRegs;

const MB: u64 = 1 << 20;
const RAM_HVA: u64 = 0x4000_0000;

fn vm(tdp: TdpConfig, slots: MemslotConfig) -> Vm {
    Vm::with_memslots(8 * MB, Hva::new(RAM_HVA), VmaFlags::WRITE | VmaFlags::THP, tdp, slots).unwrap()
}

fn manual(initially_set: bool) -> MemslotConfig {
    MemslotConfig {
        manual_dirty_log_protect: true,
        dirty_log_initially_set: initially_set,
        ..MemslotConfig::default()
    }
}

fn vcpu(vm: &Vm) -> Vcpu {
    let mut v = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), 1).unwrap();
    v.set_state(ControlRegs::default(), 0, 0).unwrap();
    v
}

fn access(v: &mut Vcpu, gpa: u64, kind: AccessKind, value: u64) -> u64 {
    match v.access(Gva::new(gpa), Access::new(kind, 0, false), 8, value) {
        Ok(AccessResult::Done { value, mmio: false, .. }) => value,
        other => panic!("{kind:?} at gpa {gpa:#x}: {other:?}"),
    }
}

fn write(v: &mut Vcpu, gpa: u64, value: u64) {
    access(v, gpa, AccessKind::Write, value);
}

fn read(v: &mut Vcpu, gpa: u64) -> u64 {
    access(v, gpa, AccessKind::Read, 0)
}

fn fetch(v: &mut Vcpu, gpa: u64) {
    access(v, gpa, AccessKind::Fetch, 0);
}

fn set_logging(vm: &Vm, on: bool) {
    let flags = if on {
        MemslotFlags::LOG_DIRTY_PAGES
    } else {
        MemslotFlags::empty()
    };
    vm.slots.update_flags(0, 0, flags).unwrap();
}

fn pages(bitmap: &[u64]) -> Vec<u64> {
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

/// The harvest protocols a VMM uses, as each configuration offers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Harvest {
    /// `KVM_GET_DIRTY_LOG` (clears and protects).
    Get,
    /// `KVM_GET_DIRTY_LOG` then `KVM_CLEAR_DIRTY_LOG` of what it returned.
    GetClear,
    /// The dirty ring: collect the vCPU's entries, `KVM_RESET_DIRTY_RINGS`.
    Ring,
}

/// One harvest: the pages reported, write-protected again when this
/// returns (the order a VMM copies in). `fetch` is the VMM's cursor in
/// the vCPU's dirty ring.
fn harvest_ring(vm: &Vm, v: &Vcpu, how: Harvest, fetch: &mut u32) -> Vec<u64> {
    match how {
        Harvest::Get => pages(&vm.mmu.get_dirty_log(0, 0).unwrap()),
        Harvest::GetClear => {
            let bits = vm.mmu.get_dirty_log(0, 0).unwrap();
            vm.mmu.clear_dirty_log(0, 0, 0, &bits).unwrap();
            pages(&bits)
        }
        Harvest::Ring => {
            let ring = v.dirty_ring().expect("the vCPU's ring");
            let mut got: Vec<u64> = ring.harvest(fetch).iter().map(|e: &DirtyGfn| e.offset).collect();
            vm.mmu.reset_dirty_rings([&**ring]);
            got.sort_unstable();
            got.dedup();
            got
        }
    }
}

/// A harvest by bitmap (no ring cursor needed).
fn harvest(vm: &Vm, v: &Vcpu, how: Harvest) -> Vec<u64> {
    assert_ne!(how, Harvest::Ring, "a ring harvest needs the VMM's cursor");
    harvest_ring(vm, v, how, &mut 0)
}

/// Class 1. With manual protect and an initially-set bitmap (QEMU's choice
/// when KVM offers it), enabling logging leaves huge leaves mapped; the
/// first CLEAR of a page inside one must make every later write to any of
/// its 512 pages visible. The lockless fast path used to give the whole
/// write-protected 2M leaf its W bit back and log only the faulting gfn.
#[test]
fn a_clear_inside_a_huge_leaf_logs_later_writes_to_all_its_pages() {
    for mode in [DirtyLogMode::WriteProtect, DirtyLogMode::DirtyBit] {
        for eager_split in [true, false] {
            let vm = vm(
                TdpConfig {
                    dirty_log: mode,
                    eager_page_split: eager_split,
                    ..TdpConfig::default()
                },
                manual(true),
            );
            let mut v = vcpu(&vm);
            write(&mut v, 0x1000, 1);
            assert_eq!(vm.mmu.stats().snapshot().pages_2m, 1);
            set_logging(&vm, true);
            assert_eq!(
                vm.mmu.stats().snapshot().pages_2m,
                1,
                "initially set: enabling logging splits nothing"
            );
            // The first round: every page reported, every bit cleared.
            assert_eq!(harvest(&vm, &v, Harvest::GetClear).len(), 2048);
            for gfn in [5u64, 7, 300, 511] {
                write(&mut v, gfn << 12, gfn);
            }
            let got = harvest(&vm, &v, Harvest::GetClear);
            for gfn in [5u64, 7, 300, 511] {
                assert!(
                    got.contains(&gfn),
                    "{mode:?}, eager split {eager_split}: gfn {gfn} written after the CLEAR is not in the next harvest ({got:?})"
                );
            }
        }
    }
}

/// Class 2. With EPT A/D off, aging without a flush (`clear_young`) makes a
/// writable SPTE access-tracked (not writable) while the vCPU keeps its
/// writable translation. A harvest that takes the page's bit must flush
/// even though it finds no SPTE to change, or the next write goes through
/// the stale translation unlogged.
#[test]
fn a_harvest_that_took_bits_flushes_even_when_no_spte_changed() {
    for how in [Harvest::Get, Harvest::GetClear, Harvest::Ring] {
        let cfg = TdpConfig {
            ad: false,
            ..TdpConfig::default()
        };
        let vm = match how {
            Harvest::GetClear => vm(cfg, manual(false)),
            _ => vm(cfg, MemslotConfig::default()),
        };
        if how == Harvest::Ring {
            vm.mmu.enable_dirty_ring(4096).unwrap();
        }
        let mut v = vcpu(&vm);
        let mut fetch = 0;
        set_logging(&vm, true);
        let page = 0x42u64;
        write(&mut v, page << 12, 1);
        assert_eq!(harvest_ring(&vm, &v, how, &mut fetch), [page]);
        // Logged again, and writable again, by the fast path.
        write(&mut v, page << 12, 2);
        // The host ages its memory without a flush.
        vm.host.clear_young(HvaRange::new(Hva::new(RAM_HVA), 8 * MB));
        assert_eq!(harvest_ring(&vm, &v, how, &mut fetch), [page], "{how:?}");
        // The VMM copies the page now; this write comes after.
        write(&mut v, page << 12, 3);
        assert_eq!(
            harvest_ring(&vm, &v, how, &mut fetch),
            [page],
            "{how:?}: a write after the harvest is missing from the next one"
        );
        assert_eq!(read(&mut v, page << 12), 3);
    }
}

/// Class 3. In D-bit mode the EPT Dirty bit of a leaf is the log of its
/// pages until the next harvest: a fault that replaces a dirty huge leaf by
/// a table (here an instruction fetch under NX huge pages) must log it.
#[test]
fn d_bit_mode_logs_a_dirty_huge_leaf_that_a_fault_splits() {
    let vm = vm(
        TdpConfig {
            dirty_log: DirtyLogMode::DirtyBit,
            nx_huge_pages: true,
            ..TdpConfig::default()
        },
        manual(true),
    );
    let mut v = vcpu(&vm);
    write(&mut v, 0x3000, 1);
    assert_eq!(vm.mmu.stats().snapshot().pages_2m, 1);
    set_logging(&vm, true);
    harvest(&vm, &v, Harvest::GetClear);
    write(&mut v, 5 << 12, 5);
    // An instruction fetch maps its page 4K: the huge leaf becomes a table.
    fetch(&mut v, 9 << 12);
    let got = harvest(&vm, &v, Harvest::GetClear);
    assert!(
        got.contains(&5),
        "a write recorded only in the split leaf's D bit is lost: {got:?}"
    );
}

/// Class 3, the zap side: every way a dirty leaf leaves the tree logs it
/// in D-bit mode (zap-all, an MMU-notifier zap), and a leaf a read
/// installs is not logged (it is writable but clean: its D bit will
/// record the first write).
#[test]
fn d_bit_mode_logs_dirty_leaves_that_any_zap_removes() {
    let vm = vm(
        TdpConfig {
            dirty_log: DirtyLogMode::DirtyBit,
            ..TdpConfig::default()
        },
        MemslotConfig::default(),
    );
    let mut v = vcpu(&vm);
    set_logging(&vm, true);
    read(&mut v, 0x20_0000);
    write(&mut v, 0x20_1000, 1);
    write(&mut v, 0x30_0000, 2);
    vm.mmu.zap_all_fast();
    vm.mmu.zap_invalidated_roots();
    let got = pages(&vm.mmu.get_dirty_log(0, 0).unwrap());
    assert_eq!(got, [0x201, 0x300], "zap-all");
    write(&mut v, 0x40_2000, 3);
    vm.host.migrate(Hva::new(RAM_HVA + 0x40_2000)).unwrap();
    let got = pages(&vm.mmu.get_dirty_log(0, 0).unwrap());
    assert_eq!(got, [0x402], "a notifier zap");
}

/// Class 4. Under the NX huge page mitigation a huge SPTE is never
/// executable, whatever installs it: huge pages recovered when dirty
/// logging ends used to come back executable.
#[test]
fn huge_pages_recovered_after_logging_stay_non_executable() {
    let vm = vm(
        TdpConfig {
            nx_huge_pages: true,
            ..TdpConfig::default()
        },
        MemslotConfig::default(),
    );
    let mut v = vcpu(&vm);
    read(&mut v, 0x1000);
    assert_eq!(vm.mmu.stats().snapshot().pages_2m, 1);
    set_logging(&vm, true);
    set_logging(&vm, false);
    let s = vm.mmu.stats().snapshot();
    assert_eq!((s.pages_2m, s.nx_lpage_splits), (1, 0), "recovered: {s:?}");
    // A fetch from the recovered huge page must exit and map its page 4K.
    fetch(&mut v, 0x2000);
    let s = vm.mmu.stats().snapshot();
    assert_eq!(
        (s.pages_2m, s.nx_lpage_splits),
        (0, 1),
        "the recovered huge page was executable: {s:?}"
    );
}

/// Takes every free frame of the arena (memory "runs out"); returns them.
fn exhaust(vm: &Vm) -> Vec<Pfn> {
    let arena = vm.host.arena();
    let mut taken = Vec::new();
    while let Ok(pfn) = arena.alloc_4k() {
        taken.push(pfn);
    }
    taken
}

fn give_back(vm: &Vm, frames: Vec<Pfn>) {
    for pfn in frames {
        vm.host.arena().free(pfn, vmmu::addr::PageSize::Size4K).unwrap();
    }
}

/// Class 5a. A fault that must split a huge SPTE when no frame is left
/// for the table fails cleanly before it changes anything, and the region
/// works once memory returns: the split used to freeze the huge SPTE, find
/// no frame, and leave it frozen, so every access to its 2M region looped.
/// (A vCPU's faults take their tables from its cache, topped up before
/// `mmu_lock`; a vCPU created after memory ran out has none.)
#[test]
fn a_split_that_finds_no_frame_leaves_the_region_usable() {
    let vm = vm(
        TdpConfig {
            nx_huge_pages: true,
            nx_recovery_ratio: 0,
            ..TdpConfig::default()
        },
        MemslotConfig::default(),
    );
    let mut v = vcpu(&vm);
    write(&mut v, 0x1000, 7);
    let frames = exhaust(&vm);
    let mut late = vcpu(&vm);
    let r = late.access(Gva::new(0x2000), Access::new(AccessKind::Fetch, 0, false), 1, 0);
    assert!(
        matches!(
            r,
            Err(vmmu::cpu::vcpu::VcpuError::Mmu(vmmu::mmu::tdp::TdpError::OutOfFrames(
                _
            )))
        ),
        "no frame for the split: an error, got {r:?}"
    );
    assert_eq!(read(&mut late, 0x1000), 7, "the huge SPTE still maps its region");
    give_back(&vm, frames);
    fetch(&mut late, 0x2000);
    assert_eq!(read(&mut v, 0x1000), 7);
    write(&mut v, 0x1f_f000, 8);
    assert_eq!(read(&mut late, 0x1f_f000), 8);
    assert!(vm.mmu.audit().is_empty(), "{:?}", vm.mmu.audit());
}

/// Class 5b. Enabling dirty logging when the eager split finds no frame
/// must finish (best effort: what it cannot split it write-protects) and
/// log every later write; it used to retry the same SPTE forever holding
/// `mmu_lock` for write.
#[test]
fn enabling_logging_without_frames_for_the_split_finishes_and_logs() {
    let vm = std::sync::Arc::new(vm(TdpConfig::default(), MemslotConfig::default()));
    let mut v = vcpu(&vm);
    write(&mut v, 0x1000, 7);
    write(&mut v, 0x20_1000, 7);
    let frames = exhaust(&vm);
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let vm = vm.clone();
        std::thread::spawn(move || {
            set_logging(&vm, true);
            let _ = tx.send(());
        });
    }
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(20)).is_ok(),
        "enabling dirty logging with no frame for the eager split never returned"
    );
    give_back(&vm, frames);
    write(&mut v, 0x5000, 1);
    write(&mut v, 0x20_3000, 2);
    assert_eq!(pages(&vm.mmu.get_dirty_log(0, 0).unwrap()), [5, 0x203]);
    assert!(vm.mmu.audit().is_empty(), "{:?}", vm.mmu.audit());
}

/// Seed 004: an invalidation of block 0 is in progress as the host's
/// `invalidate_range_start` leaves it (its leaves zapped, its table still
/// linked) when dirty logging ends. Promoting in place with the notifier
/// checked, or only where a leaf SPTE exists, leaves block 0 alone and
/// makes block 1 huge; zapping collapsible tables (rule 3) zaps both, for
/// faults to map them huge; promoting wherever a table is present installs
/// a huge SPTE inside the range being invalidated, which the audit names.
#[test]
fn recovery_consumes_the_host_level_only_as_its_rule_allows() {
    use vmmu::addr::Gfn;
    use vmmu::mmu::tdp::HugeRecovery;
    for policy in [
        HugeRecovery::InPlaceNotifierChecked,
        HugeRecovery::InPlaceExistingLeaf,
        HugeRecovery::ZapCollapsible,
        HugeRecovery::InPlaceNonLeaf,
    ] {
        let vm = vm(
            TdpConfig {
                eager_page_split: true,
                ..TdpConfig::default()
            },
            MemslotConfig::default(),
        );
        vm.mmu.set_huge_recovery(policy);
        assert_eq!(vm.mmu.huge_recovery(), policy);
        let mut v = vcpu(&vm);
        write(&mut v, 0x1000, 1);
        write(&mut v, 0x20_1000, 2);
        assert_eq!(vm.mmu.stats().snapshot().pages_2m, 2);
        set_logging(&vm, true);
        assert_eq!(vm.mmu.stats().snapshot().pages_2m, 0, "eagerly split");
        let state = vm.mmu.invalidate_state();
        {
            let g = vm.mmu.write_lock();
            state.begin(&g);
            state.range_add(&g, HvaRange::new(Hva::new(RAM_HVA), 2 * MB));
            let flush = vm.mmu.zap_gfn_range(&g, 0, Gfn::new(0), Gfn::new(512));
            vm.mmu.discharge(flush);
        }
        set_logging(&vm, false);
        let huge = |gfn: u64| {
            vm.mmu
                .leaves_of(0, Gfn::new(gfn))
                .iter()
                .any(|(valid, level, spte)| *valid && level.get() == 2 && spte.is_mmu_present())
        };
        let audit = vm.mmu.audit();
        match policy {
            HugeRecovery::InPlaceNotifierChecked | HugeRecovery::InPlaceExistingLeaf => {
                assert_eq!((huge(0), huge(512)), (false, true), "{policy:?}");
                assert!(audit.is_empty(), "{policy:?}: {audit:?}");
            }
            HugeRecovery::ZapCollapsible => {
                assert_eq!((huge(0), huge(512)), (false, false), "{policy:?}");
                assert_eq!(vm.mmu.stats().snapshot().huge_pages_zapped_collapsible, 2);
                assert!(audit.is_empty(), "{policy:?}: {audit:?}");
            }
            HugeRecovery::InPlaceNonLeaf => {
                assert!(huge(0), "{policy:?}");
                assert!(
                    audit
                        .iter()
                        .any(|a| matches!(a, vmmu::mmu::tdp::AuditViolation::InInvalidatedRange { .. })),
                    "{audit:?}"
                );
            }
        }
        {
            let g = vm.mmu.write_lock();
            state.end(&g);
        }
        // The vCPU's data is where it was, and a fault maps huge again.
        assert_eq!(read(&mut v, 0x20_1000), 2);
        if policy != HugeRecovery::InPlaceNonLeaf {
            assert_eq!(read(&mut v, 0x1000), 1);
            assert!(huge(0) && huge(512), "{policy:?}");
        }
    }
}

/// Seed 004, rule 1: a host mapping looked up before an invalidation (a
/// page migration) is refused at validation, so its frame, freed by the
/// migration, is never installed; consumed unchecked
/// (`HostMappingUse::Unchecked`), the freed frame is what a fault would
/// map.
#[test]
fn the_retry_check_refuses_a_mapping_an_invalidation_changed() {
    use vmmu::mem::{HostMappingUse, faultin_pfn};
    for how in [HostMappingUse::RetryChecked, HostMappingUse::Unchecked] {
        let vm = vm(TdpConfig::default(), MemslotConfig::default());
        let state = vm.mmu.invalidate_state();
        state.set_host_mapping_use(how);
        let hva = Hva::new(RAM_HVA + 0x1000);
        let mapping = faultin_pfn(&vm.host, state, hva, true).unwrap();
        vm.host.migrate(hva).unwrap();
        let g = vm.mmu.write_lock();
        match (how, mapping.validate(&g, state)) {
            (HostMappingUse::RetryChecked, Err(retry)) => assert!(retry.current_seq > retry.sampled_seq),
            (HostMappingUse::Unchecked, Ok(m)) => assert!(vm.host.arena().is_freed(m.pfn()), "{m:?}"),
            (how, other) => panic!("{how:?}: {other:?}"),
        }
    }
}
