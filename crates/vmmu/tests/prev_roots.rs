//! Seed 001 measured: how often a vCPU's cached roots (`prev_roots`) are
//! reused, with cached roots matched to the context by normalised roles
//! (KVM since the thread) and by the old un-normalised comparison.
//!
//! The thread's case is a root that is direct (it shadows no guest table)
//! in a context whose raw bits a direct root does not use: KVM filtered
//! `cr4_pae` out of a direct page's role and not out of the MMU's, and the
//! cached root never matched again. Here: a guest on the shadow MMU that
//! turns paging off (a direct root) and on again, with EFER.NXE and CR0.WP
//! set throughout, the bits a direct root's role clears. An L1 hypervisor
//! switching among its L2 guests on the nested MMU is measured the same
//! way: those roots shadow L1's tables (never direct), and the comparison
//! does not matter to them.

use vmmu::addr::{Gva, Hva};
use vmmu::arch::control::{CpuFeatures, Cr0, Cr4, Efer, Vendor};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, L1Npt, Vcpu};
use vmmu::host::VmaFlags;
use vmmu::mmu::shadow::role::PrevRootsMatch;
use vmmu::mmu::tdp::TdpConfig;
use vmmu::vm::{Machine, Mmu, MmuKind, Vm};
use vmmu::walker::ControlRegs;

const MB: u64 = 1 << 20;
const ROUNDS: u64 = 20;

fn read(v: &mut Vcpu, va: u64) -> u64 {
    match v.access(Gva::new(va), Access::new(AccessKind::Read, 0, false), 8, 0) {
        Ok(AccessResult::Done { value, .. }) => value,
        other => panic!("{other:?}"),
    }
}

fn write(v: &mut Vcpu, va: u64, value: u64) {
    let r = v.access(Gva::new(va), Access::new(AccessKind::Write, 0, false), 8, value);
    assert!(matches!(r, Ok(AccessResult::Done { mmio: false, .. })), "{r:?}");
}

/// (hits, misses) of `prev_roots` over [`ROUNDS`] round trips between
/// 4-level paging and paging off, under `how`.
fn paging_on_and_off(how: PrevRootsMatch) -> (i64, i64) {
    let m = Machine::new(MmuKind::Shadow, 16 * MB).unwrap();
    let Mmu::Shadow(mmu) = m.mmu() else {
        unreachable!("a shadow machine")
    };
    mmu.set_prev_roots_match(how);
    let off = ControlRegs {
        cr0: Cr0::PE | Cr0::WP,
        cr4: Cr4::PAE,
        efer: Efer::LME | Efer::NXE,
    };
    let on = ControlRegs {
        cr0: Cr0::PE | Cr0::PG | Cr0::WP,
        cr4: Cr4::PAE,
        efer: Efer::LME | Efer::LMA | Efer::NXE,
    };
    let mut v = m.vcpu(1, off, 0).unwrap();
    // 4-level tables at 0x1000..0x4000 identity-mapping the first 2 MiB.
    for (at, next) in [(0x1000u64, 0x2000u64), (0x2000, 0x3000), (0x3000, 0x4000)] {
        write(&mut v, at, next | 0x7);
    }
    for p in 0..512u64 {
        write(&mut v, 0x4000 + 8 * p, (p << 12) | 0x7);
    }
    write(&mut v, 0x10_0000, 0xabcd);
    let before = mmu.stats().snapshot();
    for _ in 0..ROUNDS {
        v.set_state(on, 0x1000, 0).unwrap();
        assert_eq!(read(&mut v, 0x10_0000), 0xabcd);
        v.set_state(off, 0, 0).unwrap();
        assert_eq!(read(&mut v, 0x10_0000), 0xabcd);
    }
    let after = mmu.stats().snapshot();
    (
        after.prev_roots_hit - before.prev_roots_hit,
        after.prev_roots_miss - before.prev_roots_miss,
    )
}

/// (hits, misses) of the nested MMU's `prev_roots` over [`ROUNDS`] rounds
/// of an L1 hypervisor (AMD) running its three L2 guests in turn, under
/// `how`.
fn l1_switching_among_three_l2s(how: PrevRootsMatch) -> (i64, i64) {
    let config = TdpConfig {
        vendor: Vendor::Amd,
        ..TdpConfig::default()
    };
    let vm = Vm::new(8 * MB, Hva::new(0x4000_0000), VmaFlags::WRITE, config).unwrap();
    let mut l1 = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), 1).unwrap();
    l1.set_state(ControlRegs::default(), 0, 0).unwrap();
    // NPT12 of guest i: PML4..PT at 0x10000 + 0x10000 * i, L2's page 0 at
    // L1's 1 MiB + 4K * i.
    let root = |i: u64| 0x10000 + 0x10000 * i;
    for i in 0..3u64 {
        for l in 0..3 {
            write(&mut l1, root(i) + 0x1000 * l, (root(i) + 0x1000 * (l + 1)) | 0x7);
        }
        write(&mut l1, root(i) + 0x3000, (MB + 0x1000 * i) | 0x7);
        write(&mut l1, MB + 0x1000 * i, 0x100 + i);
    }
    let nested = vm.nested_mmu().unwrap();
    nested.set_prev_roots_match(how);
    let npt = |i: u64| L1Npt {
        ncr3: root(i),
        levels: 4,
        nxe: true,
    };
    let mut l2 = Vcpu::new_nested(nested.clone(), vm.slots.clone(), CpuFeatures::default(), 2, npt(0));
    l2.set_state(ControlRegs::default(), 0, 0).unwrap();
    let before = nested.stats().snapshot();
    for _ in 0..ROUNDS {
        for i in 0..3 {
            l2.set_l1_nested(npt(i));
            assert_eq!(read(&mut l2, 0), 0x100 + i);
        }
    }
    let after = nested.stats().snapshot();
    (
        after.prev_roots_hit - before.prev_roots_hit,
        after.prev_roots_miss - before.prev_roots_miss,
    )
}

#[test]
fn a_direct_root_is_reused_only_when_roles_are_compared_normalised() {
    let normalised = paging_on_and_off(PrevRootsMatch::Normalised);
    let unnormalised = paging_on_and_off(PrevRootsMatch::Unnormalised);
    println!(
        "paging on/off, {ROUNDS} round trips: normalised (hits, misses) {normalised:?}, un-normalised {unnormalised:?}"
    );
    // Normalised: each root loaded once, then only hits (the first switch
    // to paging on loads the 4-level roots).
    assert_eq!(normalised, (2 * ROUNDS as i64 - 1, 1));
    // Un-normalised: the direct root never matches (EFER.NXE and CR0.WP in
    // the context, cleared in the root's role); the 4-level one still does.
    assert_eq!(unnormalised, (ROUNDS as i64 - 1, ROUNDS as i64 + 1));
}

#[test]
fn nested_roots_are_reused_whichever_comparison() {
    let normalised = l1_switching_among_three_l2s(PrevRootsMatch::Normalised);
    let unnormalised = l1_switching_among_three_l2s(PrevRootsMatch::Unnormalised);
    println!(
        "L1 switching among 3 L2s, {ROUNDS} rounds: normalised (hits, misses) {normalised:?}, un-normalised {unnormalised:?}"
    );
    // Three roots loaded once each, then hits.
    assert_eq!(normalised, (3 * ROUNDS as i64 - 3, 3));
    assert_eq!(unnormalised, normalised);
}
