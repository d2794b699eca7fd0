//! The nested MMU on both vendors: an L1 hypervisor (a vCPU on the TDP
//! MMU, paging off) writes NPT12 (AMD) or EPT12 (Intel) for its L2 guest
//! into its own memory; an L2 vCPU runs on the nested MMU, whose NPT02 or
//! EPT02 shadows them. What L1 changes in its tables the L2 guest sees
//! (L1's writes to the tables are trapped and emulated through the TDP
//! MMU's write tracking), what they refuse goes to L1 as a #NPF or an EPT
//! violation or misconfiguration, and L1 switching between its L2 guests
//! reuses the shadow's roots.
//!
//! The entry value 0x7 is P | R/W | U in NPT and R | W | X in EPT: the
//! tables below are written once for both.

use std::sync::Arc;

use vmmu::addr::{Gfn, Gva, Hva};
use vmmu::arch::control::{CpuFeatures, Vendor};
use vmmu::arch::ept::Eptp;
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, L1Nested, Vcpu};
use vmmu::host::VmaFlags;
use vmmu::mmu::tdp::TdpConfig;
use vmmu::vm::Vm;
use vmmu::walker::ControlRegs;
use vmmu::walker::nested::{NPF_FINAL_TRANSLATION, NestedFault};

const MB: u64 = 1 << 20;
/// NPT12 of the first L2 guest: PML4, PDPT, PD, PT in L1's memory.
const NPT: [u64; 4] = [0x10000, 0x11000, 0x12000, 0x13000];
/// Two L1 pages L2's page 5 is mapped to, in turn.
const PAGE_A: u64 = 0x100000;
const PAGE_B: u64 = 0x101000;
/// P | R/W | U (NPT); R | W | X (EPT).
const URW: u64 = 0x7;
/// Both vendors.
const VENDORS: [Vendor; 2] = [Vendor::Intel, Vendor::Amd];

fn vm_of(vendor: Vendor) -> Vm {
    let config = TdpConfig {
        vendor,
        ..TdpConfig::default()
    };
    Vm::new(8 * MB, Hva::new(0x4000_0000), VmaFlags::WRITE, config).unwrap()
}

fn amd_vm() -> Vm {
    vm_of(Vendor::Amd)
}

/// L1's nested paging rooted at `root`, as the VM's vendor programs it
/// (EPT with A/D flags on).
fn l1_nested(vm: &Vm, root: u64) -> L1Nested {
    L1Nested::four_level(vm.mmu.config().vendor, root)
}

/// L1's invalidation of everything it gave L2 at `root`: INVEPT
/// single-context (Intel), a VMRUN flushing the ASID (AMD).
fn invalidate_all(vm: &Vm, root: u64) -> vmmu::cpu::vcpu::L1Invalidation {
    use vmmu::cpu::vcpu::L1Invalidation;
    match vm.mmu.config().vendor {
        Vendor::Intel => L1Invalidation::InveptSingle(Eptp::new(root, 4, true)),
        Vendor::Amd => L1Invalidation::TlbControlFlush,
    }
}

/// The same tables as the reference walker sees them in L1's memory.
fn reference(vm: &Vm, root: u64) -> vmmu::walker::nested::NestedPaging {
    use vmmu::walker::nested::NestedPaging;
    let f = CpuFeatures::default();
    match vm.mmu.config().vendor {
        Vendor::Amd => NestedPaging::npt(vmmu::addr::Hpa::new(root), 4, true, &f),
        Vendor::Intel => NestedPaging::ept(vmmu::addr::Hpa::new(root), 4, true, &f),
    }
}

fn l1(vm: &Vm) -> Vcpu {
    let mut v = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), 1).unwrap();
    v.set_state(ControlRegs::default(), 0, 0).unwrap();
    v
}

fn l2(vm: &Vm, asid: u16, root: u64) -> Vcpu {
    let mut v = Vcpu::new_nested(
        vm.nested_mmu().unwrap(),
        vm.slots.clone(),
        CpuFeatures::default(),
        asid,
        l1_nested(vm, root),
    );
    v.set_state(ControlRegs::default(), 0, 0).unwrap();
    v
}

fn write(v: &mut Vcpu, gpa: u64, value: u64) {
    let r = v
        .access(Gva::new(gpa), Access::new(AccessKind::Write, 0, false), 8, value)
        .unwrap();
    assert!(matches!(r, AccessResult::Done { mmio: false, .. }), "{r:?}");
}

fn read(v: &mut Vcpu, gpa: u64) -> AccessResult {
    v.access(Gva::new(gpa), Access::new(AccessKind::Read, 0, false), 8, 0)
        .unwrap()
}

fn value(r: AccessResult) -> u64 {
    match r {
        AccessResult::Done { value, mmio: false, .. } => value,
        other => panic!("{other:?}"),
    }
}

/// L1 builds NPT12 mapping L2's page 5 to `PAGE_A`, writing it as any
/// guest writes its memory.
fn build_npt12(l1: &mut Vcpu, tables: [u64; 4]) {
    for l in 0..3 {
        write(l1, tables[l], tables[l + 1] | URW);
    }
    write(l1, tables[3] + 8 * 5, PAGE_A | URW);
    write(l1, PAGE_A, 0xaaaa);
    write(l1, PAGE_B, 0xbbbb);
}

#[test]
fn l2_sees_what_l1_writes_into_its_nested_tables() {
    for vendor in VENDORS {
        l2_sees_what_l1_writes(vendor);
    }
}

fn l2_sees_what_l1_writes(vendor: Vendor) {
    let vm = vm_of(vendor);
    let mut l1 = l1(&vm);
    build_npt12(&mut l1, NPT);
    let mut l2 = l2(&vm, 2, NPT[0]);
    assert_eq!(value(read(&mut l2, 0x5008 - 8)), 0xaaaa);
    let stats = || vm.nested_mmu().unwrap().stats().snapshot();
    // L1 remaps L2's page 5 to B. The leaf table is shadowed by a 4K page
    // only: the store makes it unsync (KVM allows it for shadowed EPT12
    // and NPT12) and goes through a writable mapping, and L2 may go on
    // reading A, as on hardware, until L1 invalidates.
    let (emulated, unsync) = (stats().mmu_pte_write, stats().mmu_unsync);
    write(&mut l1, NPT[3] + 8 * 5, PAGE_B | URW);
    assert_eq!((stats().mmu_pte_write, stats().mmu_unsync), (emulated, unsync + 1));
    assert_eq!(value(read(&mut l2, 0x5000)), 0xaaaa, "no sync before L1's invalidation");
    l2.l1_invalidate(invalidate_all(&vm, NPT[0]));
    assert_eq!(value(read(&mut l2, 0x5000)), 0xbbbb);
    assert_eq!(stats().mmu_synced, 1);
    // A store to an upper-level table (shadowed by a page that may not go
    // unsync) is trapped and emulated, and seen at once: L1 moves page 5
    // under a second PT.
    for p in 0..512 {
        write(&mut l1, 0x14000 + 8 * p, 0);
    }
    write(&mut l1, 0x14000 + 8 * 5, PAGE_A | URW);
    write(&mut l1, NPT[2], 0x14000 | URW);
    assert_eq!(stats().mmu_pte_write, emulated + 1);
    assert_eq!(value(read(&mut l2, 0x5000)), 0xaaaa);
    write(&mut l1, NPT[2], NPT[3] | URW);
    assert_eq!(value(read(&mut l2, 0x5000)), 0xbbbb);
    // L1 still reads and writes its tables (read-only mappings, emulated
    // writes), and its data pages are its own.
    // (with A set: the nested MMU walked the entry as the hardware would;
    // bits 5/6 in NPT, 8/9 in EPT).
    assert_eq!(value(read(&mut l1, NPT[3] + 8 * 5)) & !0x360, PAGE_B | URW);
    write(&mut l1, PAGE_B, 0xbbb2);
    assert_eq!(value(read(&mut l2, 0x5000)), 0xbbb2);
}

/// The negative control: with the TDP MMU ignoring the write tracking, L1's
/// store goes straight to memory and L2 keeps the stale translation.
#[cfg(feature = "shuttle")]
#[test]
fn without_write_tracking_l2_reads_through_a_stale_npt02() {
    use vmmu::sync::{Bug, with_bugs};
    let stale = with_bugs(&[Bug::UntrackedNestedTables], || {
        let vm = amd_vm();
        let mut l1 = l1(&vm);
        build_npt12(&mut l1, NPT);
        let mut l2 = l2(&vm, 2, NPT[0]);
        assert_eq!(value(read(&mut l2, 0x5000)), 0xaaaa);
        write(&mut l1, NPT[3] + 8 * 5, PAGE_B | URW);
        value(read(&mut l2, 0x5000))
    });
    assert_eq!(stale, 0xaaaa, "the control must see the stale translation");
}

#[test]
fn what_npt12_refuses_exits_to_l1_as_a_nested_page_fault() {
    let vm = amd_vm();
    let mut l1 = l1(&vm);
    build_npt12(&mut l1, NPT);
    let mut l2 = l2(&vm, 2, NPT[0]);
    // Page 6 is not present in NPT12: a user read, final translation.
    let r = read(&mut l2, 0x6010);
    assert_eq!(
        r,
        AccessResult::VmExit(NestedFault::Npf {
            exitinfo1: 0x4 | NPF_FINAL_TRANSLATION,
            exitinfo2: 0x6010,
        })
    );
    // L1 maps it read-only: reads complete, a write exits (P | W | U).
    write(&mut l1, NPT[3] + 8 * 6, PAGE_A | 0x5);
    assert_eq!(value(read(&mut l2, 0x6000)), 0xaaaa);
    let w = l2
        .access(Gva::new(0x6000), Access::new(AccessKind::Write, 0, false), 8, 1)
        .unwrap();
    assert_eq!(
        w,
        AccessResult::VmExit(NestedFault::Npf {
            exitinfo1: 0x7 | NPF_FINAL_TRANSLATION,
            exitinfo2: 0x6000,
        })
    );
}

/// On Intel: an EPT violation with the qualification L1's hardware would
/// give (the access, the rights of EPT12's entries, the guest-linear
/// address of the final translation), execute-only pages, and an EPT
/// misconfiguration for W without R.
#[test]
fn what_ept12_refuses_exits_to_l1_as_an_ept_violation_or_misconfiguration() {
    use vmmu::addr::Gpa;
    use vmmu::arch::ept::EptViolationQual as Q;
    let vm = vm_of(Vendor::Intel);
    let mut l1 = l1(&vm);
    build_npt12(&mut l1, NPT);
    let mut l2 = l2(&vm, 2, NPT[0]);
    let access = |l2: &mut Vcpu, kind, gpa| l2.access(Gva::new(gpa), Access::new(kind, 0, false), 8, 1).unwrap();
    // Page 6 not present: a read of the final translation, rights none.
    assert_eq!(
        access(&mut l2, AccessKind::Read, 0x6010),
        AccessResult::VmExit(NestedFault::EptViolation {
            gpa: Gpa::new(0x6010),
            qual: Q::READ | Q::GLA_VALID | Q::GLA_TRANSLATION,
            gla: Some(Gva::new(0x6010)),
        })
    );
    // Read-only: reads complete, a write exits with R in the rights.
    write(&mut l1, NPT[3] + 8 * 6, PAGE_A | 0x1);
    assert_eq!(value(read(&mut l2, 0x6000)), 0xaaaa);
    assert_eq!(
        access(&mut l2, AccessKind::Write, 0x6000),
        AccessResult::VmExit(NestedFault::EptViolation {
            gpa: Gpa::new(0x6000),
            qual: Q::WRITE | Q::READABLE | Q::GLA_VALID | Q::GLA_TRANSLATION,
            gla: Some(Gva::new(0x6000)),
        })
    );
    // Execute-only: a fetch completes, a read exits with X in the rights.
    write(&mut l1, NPT[3] + 8 * 7, PAGE_A | 0x4);
    assert!(matches!(
        access(&mut l2, AccessKind::Fetch, 0x7000),
        AccessResult::Done { mmio: false, .. }
    ));
    assert_eq!(
        access(&mut l2, AccessKind::Read, 0x7000),
        AccessResult::VmExit(NestedFault::EptViolation {
            gpa: Gpa::new(0x7000),
            qual: Q::READ | Q::EXECUTABLE | Q::GLA_VALID | Q::GLA_TRANSLATION,
            gla: Some(Gva::new(0x7000)),
        })
    );
    // Write without read: a misconfiguration, whatever the access.
    write(&mut l1, NPT[3] + 8 * 8, PAGE_A | 0x2);
    assert_eq!(
        access(&mut l2, AccessKind::Read, 0x8000),
        AccessResult::VmExit(NestedFault::EptMisconfig { gpa: Gpa::new(0x8000) })
    );
}

/// L1 switching its vCPU between two L2 guests (two nCR3s) reuses the
/// NPT02 roots from `prev_roots` (seed 001's case) instead of rebuilding.
#[test]
fn switching_between_l2_guests_reuses_the_shadows_roots() {
    for vendor in VENDORS {
        switching_reuses_roots(vendor);
    }
}

fn switching_reuses_roots(vendor: Vendor) {
    let vm = vm_of(vendor);
    let mut l1 = l1(&vm);
    build_npt12(&mut l1, NPT);
    let other = [0x20000, 0x21000, 0x22000, 0x23000];
    build_npt12(&mut l1, other);
    write(&mut l1, other[3] + 8 * 5, PAGE_B | URW);
    let mut l2 = l2(&vm, 2, NPT[0]);
    let stats = || vm.nested_mmu().unwrap().stats().snapshot();
    let npt = |root| l1_nested(&vm, root);
    assert_eq!(value(read(&mut l2, 0x5000)), 0xaaaa);
    let before = stats();
    for _ in 0..10 {
        l2.set_l1_nested(npt(other[0]));
        assert_eq!(value(read(&mut l2, 0x5000)), 0xbbbb);
        l2.set_l1_nested(npt(NPT[0]));
        assert_eq!(value(read(&mut l2, 0x5000)), 0xaaaa);
    }
    let after = stats();
    // One miss (the first switch to the other guest), then only hits.
    assert_eq!(after.prev_roots_hit - before.prev_roots_hit, 19, "{vendor:?}");
    assert_eq!(after.prev_roots_miss - before.prev_roots_miss, 1, "{vendor:?}");
}

/// The nested MMU's pages exist only while L2 runs on them: the TDP MMU
/// maps a tracked gfn read-only at 4K, and once the tables are gone
/// (zapped) L1's writes are plain writes again.
#[test]
fn the_tracked_gfns_follow_the_nested_mmus_pages() {
    for vendor in VENDORS {
        tracked_gfns_follow_pages(vendor);
    }
}

fn tracked_gfns_follow_pages(vendor: Vendor) {
    let vm = vm_of(vendor);
    let mut l1 = l1(&vm);
    build_npt12(&mut l1, NPT);
    let mut l2 = l2(&vm, 2, NPT[0]);
    assert_eq!(value(read(&mut l2, 0x5000)), 0xaaaa);
    let tracker = vm.mmu.write_tracker().expect("the nested MMU tracks").clone();
    for t in NPT {
        assert!(tracker.is_tracked(Gfn::new(t >> 12), Gfn::new((t >> 12) + 1)), "{t:#x}");
    }
    assert!(!tracker.is_tracked(Gfn::new(PAGE_A >> 12), Gfn::new((PAGE_A >> 12) + 1)));
    drop(l2);
    vm.nested_mmu().unwrap().zap_all();
    assert!(!tracker.any_tracked());
    let emulated = vm.nested_mmu().unwrap().stats().snapshot().mmu_pte_write;
    write(&mut l1, NPT[3] + 8 * 5, PAGE_B | URW);
    assert_eq!(vm.nested_mmu().unwrap().stats().snapshot().mmu_pte_write, emulated);
    let _keep: Arc<_> = vm.nested_mmu().unwrap();
}

/// The classic cost of a nested TLB miss: an L2 guest with 4-level paging,
/// over 4-level NPT02, makes 4 x (4 + 1) + 4 = 24 memory references per
/// walk (Bhargava et al., ASPLOS 2008), counted by the hardware model.
#[test]
fn a_4_level_l2_walk_over_4_level_nested_tables_makes_24_references() {
    for vendor in VENDORS {
        l2_walk_references(vendor);
    }
}

fn l2_walk_references(vendor: Vendor) {
    use vmmu::arch::control::{Cr0, Cr4, Efer};
    let vm = vm_of(vendor);
    let mut l1 = l1(&vm);
    // NPT12: L2's first 2 MiB at L1's 4 MiB.
    for l in 0..3 {
        write(&mut l1, NPT[l], NPT[l + 1] | URW);
    }
    for p in 0..512 {
        write(&mut l1, NPT[3] + 8 * p, (4 * MB + 4096 * p) | URW);
    }
    let mut l2 = l2(&vm, 2, NPT[0]);
    // L2's own tables (written by L2 with paging off): PML4 at 0x1000, PDPT
    // 0x2000, PD 0x3000, PT 0x4000; va 0x5000 maps gpa 0x5000.
    for (at, next) in [
        (0x1000, 0x2000),
        (0x2000, 0x3000),
        (0x3000, 0x4000),
        (0x4000 + 8 * 5, 0x5000),
    ] {
        write(&mut l2, at, next | URW);
    }
    let regs = ControlRegs {
        cr0: Cr0::PE | Cr0::PG | Cr0::WP,
        cr4: Cr4::PAE,
        efer: Efer::LME | Efer::LMA | Efer::NXE,
    };
    l2.set_state(regs, 0x1000, 0).unwrap();
    // The first walk faults NPT02 in and sets the A bits of both levels.
    value(read(&mut l2, 0x5000));
    l2.invlpg(Gva::new(0x5000));
    let before = l2.stats();
    value(read(&mut l2, 0x5000));
    let after = l2.stats();
    assert_eq!(after.walks - before.walks, 1);
    assert_eq!(after.walk_refs - before.walk_refs, 24, "{vendor:?}");
}

/// L1 edits its tables at random (remaps, rights, not present), each edit
/// followed by its invalidation (INVEPT, or a VMRUN flushing the ASID), as
/// a correct hypervisor does; it writes its data pages, and either MMU
/// zaps; L2 accesses at random. Every L2 access must end as a fresh walk of
/// L1's tables in L1's memory says, now: done, reading what L1's page
/// holds, or the exit that walk gives (#NPF with its EXITINFO1/2, EPT
/// violation with its qualification, EPT misconfiguration). The leaf
/// tables go unsync on L1's first store, so this is the sync's test.
fn l2_against_a_fresh_l1_walk(vendor: Vendor, seed: u64, steps: usize) -> Result<(u64, u64), String> {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use vmmu::walker::nested::{NestedError, NestedStage};

    let mut rng = SmallRng::seed_from_u64(seed);
    let vm = vm_of(vendor);
    let mem = vm.memory();
    let mut l1 = l1(&vm);
    // NPT12: one PD with two PTs, L2's first 4 MiB.
    let pts = [0x13000u64, 0x14000];
    write(&mut l1, NPT[0], NPT[1] | URW);
    write(&mut l1, NPT[1], NPT[2] | URW);
    for (i, pt) in pts.iter().enumerate() {
        write(&mut l1, NPT[2] + 8 * i as u64, pt | URW);
    }
    // The pool of L1 pages L2 may map, each holding a value at offset 0.
    let pool: Vec<u64> = (0..64).map(|i| MB + 4096 * i).collect();
    for (i, &p) in pool.iter().enumerate() {
        write(&mut l1, p, 0x1000 + i as u64);
    }
    let mut l2 = l2(&vm, 2, NPT[0]);
    let reference = reference(&vm, NPT[0]);
    // Rights: NPT P, P|U, P|W|U, P|W (no user), P|W|U|XD; EPT R, R|X,
    // R|W|X, R|W, execute-only, and W without R (a misconfiguration).
    let rights: &[u64] = match vendor {
        Vendor::Amd => &[0, 0x1, 0x5, 0x7, 0x3, URW | (1 << 63)],
        Vendor::Intel => &[0, 0x1, 0x5, 0x7, 0x3, 0x4, 0x2],
    };
    let (mut done, mut exits) = (0, 0);
    for step in 0..steps {
        let page = rng.random_range(0..64u64);
        let pte = pts[(page / 32) as usize % 2] + 8 * (page % 32 + 480 * (page / 32));
        let l2_gpa = (page / 32) * 2 * MB + (page % 32 + 480 * (page / 32)) * 4096;
        match rng.random_range(0..10) {
            // L1 remaps a page: another pool page, some rights, or none.
            0..=2 => {
                let target = pool[rng.random_range(0..pool.len())];
                let rights = rights[rng.random_range(0..rights.len())];
                write(&mut l1, pte, if rights == 0 { 0 } else { target | rights });
                // As a correct hypervisor does before L2 runs again.
                l2.l1_invalidate(invalidate_all(&vm, NPT[0]));
            }
            // L1 writes one of its pages.
            3 => {
                let p = pool[rng.random_range(0..pool.len())];
                write(&mut l1, p, rng.random::<u32>() as u64);
            }
            // A zap of either MMU now and then.
            4 if rng.random_bool(0.1) => vm.nested_mmu().unwrap().zap_all(),
            4 => vm.mmu.zap_all_fast(),
            // L2 accesses the page.
            _ => {
                let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][rng.random_range(0..3)];
                let value = rng.random::<u32>() as u64;
                let got = l2
                    .access(Gva::new(l2_gpa), Access::new(kind, 0, false), 8, value)
                    .map_err(|e| format!("step {step}: {e}"))?;
                let fresh = reference.translate(
                    &mem,
                    vmmu::addr::Gpa::new(l2_gpa),
                    kind,
                    NestedStage::Final { gla: Gva::new(l2_gpa) },
                );
                let ok = match (&fresh, &got) {
                    (
                        Ok(w),
                        AccessResult::Done {
                            value: v, mmio: false, ..
                        },
                    ) => {
                        done += 1;
                        let there = mem.read_value(w.gpa, 8).unwrap();
                        match kind {
                            AccessKind::Write => there == value,
                            _ => *v == there,
                        }
                    }
                    (Err(NestedError::Fault(f)), AccessResult::VmExit(g)) => {
                        exits += 1;
                        f == g
                    }
                    _ => false,
                };
                if !ok {
                    return Err(format!(
                        "step {step}: {kind:?} of L2 gpa {l2_gpa:#x}: L1's tables say {fresh:x?}, L2 got {got:x?}"
                    ));
                }
            }
        }
    }
    Ok((done, exits))
}

#[test]
fn l2_agrees_with_a_fresh_walk_of_l1s_tables_under_random_l1_edits() {
    let (mut done, mut exits) = (0, 0);
    for vendor in VENDORS {
        for seed in 0..20 {
            let (d, e) =
                l2_against_a_fresh_l1_walk(vendor, seed, 400).unwrap_or_else(|e| panic!("{vendor:?} seed {seed}: {e}"));
            done += d;
            exits += e;
        }
    }
    // Both outcomes were checked, many times.
    assert!(done > 1000 && exits > 1000, "{done} completed, {exits} exits to L1");
}

/// The same check finds the stale NPT02 that untracked NPT12 writes leave.
#[cfg(feature = "shuttle")]
#[test]
fn the_random_check_catches_untracked_nested_table_writes() {
    use vmmu::sync::{Bug, with_bugs};
    for vendor in VENDORS {
        let caught = (0..20).any(|seed| {
            with_bugs(&[Bug::UntrackedNestedTables], || {
                l2_against_a_fresh_l1_walk(vendor, seed, 400)
            })
            .is_err()
        });
        assert!(caught, "{vendor:?}: no seed caught the injected bug");
    }
}

/// The same check finds a sync that leaves L1 its writable mapping of a
/// table it syncs: L1's later stores go unseen, and L2 reads through a
/// stale shadow even after L1 invalidated.
#[cfg(feature = "shuttle")]
#[test]
fn the_random_check_catches_a_sync_that_leaves_l1_writing() {
    use vmmu::sync::{Bug, with_bugs};
    for vendor in VENDORS {
        let caught = (0..20).any(|seed| {
            with_bugs(&[Bug::SyncLeavesWritableElsewhere], || {
                l2_against_a_fresh_l1_walk(vendor, seed, 400)
            })
            .is_err()
        });
        assert!(caught, "{vendor:?}: no seed caught the injected bug");
    }
}

/// L1's memory that L2 writes is dirty-logged (KVM's
/// `nested_dirty_log_test`): each harvest returns the L1 pages L2 wrote
/// through NPT02 since the last one, also after a harvest protected them
/// again, in each bitmap protocol.
#[test]
fn l2_writes_are_logged_in_l1s_dirty_bitmap() {
    use vmmu::mem::{MemslotConfig, MemslotFlags};
    for (vendor, manual) in [
        (Vendor::Amd, false),
        (Vendor::Amd, true),
        (Vendor::Intel, false),
        (Vendor::Intel, true),
    ] {
        let config = TdpConfig {
            vendor,
            ..TdpConfig::default()
        };
        let memslots = MemslotConfig {
            manual_dirty_log_protect: manual,
            ..MemslotConfig::default()
        };
        let vm = Vm::with_memslots(8 * MB, Hva::new(0x4000_0000), VmaFlags::WRITE, config, memslots).unwrap();
        let mut l1 = l1(&vm);
        build_npt12(&mut l1, NPT);
        // L2's pages 0..8 map L1's 2 MiB + page.
        for p in 0..8 {
            write(&mut l1, NPT[3] + 8 * p, (2 * MB + 4096 * p) | URW);
        }
        let mut l2 = l2(&vm, 2, NPT[0]);
        for p in 0..8 {
            write(&mut l2, 4096 * p, 1);
        }
        vm.slots.update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES).unwrap();
        let page = |p: u64| ((2 * MB) >> 12) + p;
        let harvest = |vm: &Vm| -> Vec<u64> {
            let bits = vm.mmu.get_dirty_log(0, 0).unwrap();
            if manual {
                vm.mmu.clear_dirty_log(0, 0, 0, &bits).unwrap();
            }
            (0..bits.len() as u64 * 64)
                .filter(|&i| bits[(i / 64) as usize] >> (i % 64) & 1 != 0)
                .collect()
        };
        let _ = harvest(&vm);
        for round in 0..4u64 {
            // L2 writes pages 1 and 6 every round (after the first, through
            // NPT02 leaves that were writable before the harvest), and one
            // more: exactly those are dirty.
            write(&mut l2, 4096, round);
            write(&mut l2, 4096 * 6, round);
            let more = [0, 2, 3, 7][round as usize];
            write(&mut l2, 4096 * more, round);
            let mut want = vec![page(1), page(6), page(more)];
            want.sort();
            assert_eq!(harvest(&vm), want, "{vendor:?} round {round}, manual protect {manual}");
        }
    }
}

/// L2's page tables in a read-only memslot of L1's memory (ROM): L2's
/// walk must set their Accessed bits, which NPT02/EPT02 forbid, so the
/// access exits, and the nested MMU finds a read-only memslot behind a
/// paging-structure access. The access is then made in software, as KVM's
/// emulator does, the ROM left unwritten: it reads what L1's page holds
/// (it used to complete as an MMIO read of 0).
#[test]
fn l2_page_tables_in_l1_rom_are_walked_not_read_as_mmio() {
    use vmmu::arch::control::{Cr0, Cr4, Efer};
    use vmmu::mem::{MemoryRegion, MemslotFlags};
    for vendor in VENDORS {
        let vm = vm_of(vendor);
        let rom_hva = 0x6000_0000u64;
        vm.host.mmap(Hva::new(rom_hva), 2 * MB, VmaFlags::WRITE).unwrap();
        vm.slots
            .create(MemoryRegion {
                as_id: 0,
                id: 1,
                flags: MemslotFlags::READONLY,
                guest_phys_addr: vmmu::addr::Gpa::new(8 * MB),
                memory_size: 2 * MB,
                userspace_addr: Hva::new(rom_hva),
            })
            .unwrap();
        let mut l1 = l1(&vm);
        // NPT12: L2's pages 1..=4 (its tables) at L1's ROM, page 5 at L1's
        // 4 MiB + 0x5000.
        for l in 0..3 {
            write(&mut l1, NPT[l], NPT[l + 1] | URW);
        }
        for p in 1..=4u64 {
            write(&mut l1, NPT[3] + 8 * p, (8 * MB + 4096 * p) | URW);
        }
        write(&mut l1, NPT[3] + 8 * 5, (4 * MB + 0x5000) | URW);
        write(&mut l1, 4 * MB + 0x5000, 0xc0de);
        // L2's tables, written into the ROM by the VMM: PML4 at L2's
        // 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000; va 0x5000 -> 0x5000.
        let rom = |off: u64, v: u64| vm.host.write(Hva::new(rom_hva + off), &v.to_le_bytes()).unwrap();
        rom(0x1000, 0x2000 | URW);
        rom(0x2000, 0x3000 | URW);
        rom(0x3000, 0x4000 | URW);
        rom(0x4000 + 8 * 5, 0x5000 | URW);
        let mut l2 = l2(&vm, 2, NPT[0]);
        let regs = ControlRegs {
            cr0: Cr0::PE | Cr0::PG | Cr0::WP,
            cr4: Cr4::PAE,
            efer: Efer::LME | Efer::LMA | Efer::NXE,
        };
        l2.set_state(regs, 0x1000, 0).unwrap();
        assert_eq!(value(read(&mut l2, 0x5000)), 0xc0de, "{vendor:?}");
        write(&mut l2, 0x5008, 0xbeef);
        assert_eq!(
            vm.memory().read_u64(vmmu::addr::Gpa::new(4 * MB + 0x5008)).unwrap(),
            0xbeef
        );
        let mut b = [0u8; 8];
        vm.host.read(Hva::new(rom_hva + 0x4000 + 8 * 5), &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x5000 | URW, "{vendor:?}: the ROM was written");
    }
}
