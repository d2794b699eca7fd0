//! `nested-fault`: what a fault costs an L2 guest on the nested MMU against
//! what it costs its L1 hypervisor on the TDP MMU, in one run, on an AMD
//! host (NPT) and on an Intel host (EPT). L1 (paging off) writes fresh
//! pages of its own memory: each a TDP fault (#NPF or EPT violation,
//! `kvm_tdp_mmu_page_fault`, retry). L2 (paging off) writes fresh pages of
//! its memory, which NPT12/EPT12 maps to other L1 pages: each a nested
//! fault (the exit of NPT02/EPT02, L1's table walked in L1's memory, shadow
//! pages found or made, the leaf installed, retry). Both touch host pages
//! that are resident, so neither pays a host fault; every round starts from
//! empty tables (both MMUs zapped). The memory references of each TLB miss
//! are reported beside: a 1-D NPT walk for L1, and for L2 (paging off) a
//! 1-D walk of NPT02. A third phase repeats L1's faults while the nested
//! MMU's pages exist: each then asks whether its gfn is tracked (seed
//! 002's `indirect_shadow_pages` gate says "maybe"), which is what the
//! lockless gate saves every fault of a VM without nested pages.

use std::time::Instant;

use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::{CpuFeatures, Vendor};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, L1Nested, Vcpu};
use vmmu::host::VmaFlags;
use vmmu::mmu::tdp::TdpConfig;
use vmmu::vm::Vm;
use vmmu::walker::ControlRegs;

use crate::tdp::BenchError;
use crate::{BenchResult, Figure, Phase, Report};

const MB: u64 = 1 << 20;
/// Pages each phase faults in per round.
const PAGES: u64 = 4096;
/// L1's memory.
const RAM: u64 = 64 * MB;
/// NPT12: PML4, PDPT, PD at these L1 addresses, then the PTs.
const NPT12: u64 = 0x10000;
/// L2's pages map to L1's from here.
const L2_BACKING: u64 = 16 * MB;
/// L1's own fresh pages, from here.
const L1_PAGES: u64 = 32 * MB;
/// P | R/W | U (NPT); R | W | X (EPT, memory type UC).
const URW: u64 = 0x7;

fn write(v: &mut Vcpu, gpa: u64) -> Result<(), BenchError> {
    match v.access(Gva::new(gpa), Access::new(AccessKind::Write, 0, false), 8, gpa) {
        Ok(AccessResult::Done { mmio: false, .. }) => Ok(()),
        other => Err(BenchError::Run(format!("a write to {gpa:#x} gave {other:?}"))),
    }
}

/// One vendor's figures: best ns per nested fault, per L1 fault, per L1
/// fault with nested pages present; references per miss (L2, L1); the
/// heuristic's answers; the seconds of nested faulting.
struct VendorRun {
    nested_ns: f64,
    l1_ns: f64,
    l1_nested_ns: f64,
    refs: (f64, f64),
    heuristic: (i64, i64),
    seconds: f64,
}

/// Runs the benchmark: the best of `rounds` (3 unless given) per phase,
/// on each vendor.
pub fn run(rounds: Option<u64>) -> Result<Report, BenchError> {
    let rounds = rounds.unwrap_or(3).max(1);
    let amd = run_vendor(Vendor::Amd, rounds)?;
    let intel = run_vendor(Vendor::Intel, rounds)?;
    let phase = Phase::new;
    let result = BenchResult {
        bench: "nested-fault",
        mmu: "nested",
        vcpus: 1,
        pages: PAGES,
        seconds: amd.seconds + intel.seconds,
        per_op_ns: amd.nested_ns,
        reference_ns: amd.l1_ns,
        ratio: amd.nested_ns / amd.l1_ns,
        reference: "per 4K write fault: the same write fault of the L1 hypervisor on the TDP MMU (AMD, NPT; then Intel, EPT)",
        goal_ratio: None,
        phases: vec![
            phase("nested fault/npt", amd.nested_ns, amd.l1_ns),
            phase("L1 fault/npt", amd.l1_ns, amd.l1_ns),
            phase("L1 fault, nested pages present/npt", amd.l1_nested_ns, amd.l1_ns),
            phase("nested fault/ept", intel.nested_ns, intel.l1_ns),
            phase("L1 fault/ept", intel.l1_ns, intel.l1_ns),
            phase("L1 fault, nested pages present/ept", intel.l1_nested_ns, intel.l1_ns),
        ],
    };
    let mut figures = Vec::new();
    for (v, r) in [("NPT", &amd), ("EPT", &intel)] {
        figures.push(Figure {
            name: format!("memory references per TLB miss, L2 on {v}02 (L1 on {v})"),
            unit: "refs",
            value: r.refs.0,
            reference: Some(r.refs.1),
            goal: None,
        });
        figures.push(Figure {
            name: format!(
                "{v}: L1 faults, nested pages present: indirect_shadow_pages said maybe (seed 002); the gfn was tracked"
            ),
            unit: "faults",
            value: r.heuristic.0 as f64,
            reference: Some(r.heuristic.1 as f64),
            goal: None,
        });
    }
    Ok(Report {
        result,
        backing: Some("anon"),
        figures,
        notes: vec![format!(
            "{PAGES} pages per phase, best of {rounds} rounds, both MMUs zapped before each; paging off in L1 and L2 (each TLB miss is one walk of the MMU's 4-level tables)"
        )],
    })
}

fn run_vendor(vendor: Vendor, rounds: u64) -> Result<VendorRun, BenchError> {
    let config = TdpConfig {
        vendor,
        // 4K leaves for L1 too, so both phases install one leaf per page.
        max_level: 1,
        ..TdpConfig::default()
    };
    let vm =
        Vm::new(RAM, Hva::new(0x4000_0000), VmaFlags::WRITE, config).map_err(|e| BenchError::Run(e.to_string()))?;
    let mem = vm.memory();
    let run = |e: &dyn std::fmt::Display| BenchError::Run(e.to_string());
    // Every host page resident; NPT12 written by the VMM on L1's behalf.
    for off in (0..RAM).step_by(4096) {
        mem.write_value(Gpa::new(off), 8, 0).map_err(|e| run(&e))?;
    }
    let pts = PAGES.div_ceil(512);
    let (pml4, pdpt, pd) = (NPT12, NPT12 + 0x1000, NPT12 + 0x2000);
    let pt = |i: u64| NPT12 + 0x3000 + 0x1000 * i;
    mem.write_value(Gpa::new(pml4), 8, pdpt | URW).map_err(|e| run(&e))?;
    mem.write_value(Gpa::new(pdpt), 8, pd | URW).map_err(|e| run(&e))?;
    for i in 0..pts {
        mem.write_value(Gpa::new(pd + 8 * i), 8, pt(i) | URW)
            .map_err(|e| run(&e))?;
    }
    // NPT12's leaves, Accessed clear: the nested MMU prefetches only
    // entries the guest has used, so every page is a fault of its own.
    let write_leaves = || -> Result<(), BenchError> {
        for p in 0..PAGES {
            mem.write_value(Gpa::new(pt(p / 512) + 8 * (p % 512)), 8, (L2_BACKING + 4096 * p) | URW)
                .map_err(|e| run(&e))?;
        }
        Ok(())
    };
    let features = CpuFeatures::default();
    let mut l1 = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), features, 1).map_err(|e| run(&e))?;
    l1.set_state(ControlRegs::default(), 0, 0).map_err(|e| run(&e))?;
    let nested = vm.nested_mmu().map_err(|e| BenchError::Run(e.to_string()))?;
    let l1_tables = L1Nested::four_level(vendor, NPT12);
    let mut l2 = Vcpu::new_nested(nested.clone(), vm.slots.clone(), features, 2, l1_tables);
    l2.set_state(ControlRegs::default(), 0, 0).map_err(|e| run(&e))?;
    let (mut best_l1, mut best_l2, mut best_l1_nested) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let mut heuristic = (0i64, 0i64);
    let mut seconds = 0.0;
    let (mut l1_faults, mut l2_faults) = (0i64, 0i64);
    let (mut l1_refs, mut l2_refs) = ((0u64, 0u64), (0u64, 0u64));
    for _ in 0..rounds {
        // Empty tables for both, NPT12 as new.
        vm.mmu.zap_all_fast();
        nested.zap_all();
        write_leaves()?;
        let (s1, w1) = (vm.mmu.stats().snapshot().pf_fixed, l1.stats());
        let t = Instant::now();
        for p in 0..PAGES {
            write(&mut l1, L1_PAGES + 4096 * p)?;
        }
        let l1_ns = t.elapsed().as_secs_f64() * 1e9 / PAGES as f64;
        let (e1, x1) = (vm.mmu.stats().snapshot().pf_fixed, l1.stats());
        let (s2, w2) = (nested.stats().snapshot().pf_fixed, l2.stats());
        let t = Instant::now();
        for p in 0..PAGES {
            write(&mut l2, 4096 * p)?;
        }
        let l2_elapsed = t.elapsed().as_secs_f64();
        let l2_ns = l2_elapsed * 1e9 / PAGES as f64;
        let (e2, x2) = (nested.stats().snapshot().pf_fixed, l2.stats());
        seconds += l2_elapsed;
        // L1 faults again, now with the nested MMU's pages present: each
        // asks the nested MMU whether its gfn is tracked (the lockless
        // `indirect_shadow_pages` says "maybe"), none is.
        vm.mmu.zap_all_fast();
        let h0 = vm.mmu.stats().snapshot();
        let t = Instant::now();
        for p in 0..PAGES {
            write(&mut l1, L1_PAGES + 4096 * p)?;
        }
        let l1_nested_ns = t.elapsed().as_secs_f64() * 1e9 / PAGES as f64;
        let h1 = vm.mmu.stats().snapshot();
        heuristic = (
            h1.indirect_heuristic_hits - h0.indirect_heuristic_hits,
            h1.indirect_tracked_gfns - h0.indirect_tracked_gfns,
        );
        best_l1_nested = best_l1_nested.min(l1_nested_ns);
        best_l1 = best_l1.min(l1_ns);
        best_l2 = best_l2.min(l2_ns);
        l1_faults = e1 - s1;
        l2_faults = e2 - s2;
        l1_refs = (x1.walk_refs - w1.walk_refs, x1.walks - w1.walks);
        l2_refs = (x2.walk_refs - w2.walk_refs, x2.walks - w2.walks);
    }
    // The phases measured faults, one per page.
    if l1_faults < PAGES as i64 || l2_faults < PAGES as i64 {
        return Err(BenchError::Run(format!(
            "expected a fault per page: {l1_faults} L1 faults, {l2_faults} nested faults for {PAGES} pages"
        )));
    }
    let per = |(refs, walks): (u64, u64)| refs as f64 / walks.max(1) as f64;
    Ok(VendorRun {
        nested_ns: best_l2,
        l1_ns: best_l1,
        l1_nested_ns: best_l1_nested,
        refs: (per(l2_refs), per(l1_refs)),
        heuristic,
        seconds,
    })
}
