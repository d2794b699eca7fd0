//! Seed 001 (`prev_roots` for the NPT case): a cached root is reusable
//! only if its role compares equal to the role the MMU wants, so the bits
//! a root does not use must be normalised the same way on both sides.
//! Variants ([`PrevRootsMatch`]): roles compared normalised (KVM since the
//! thread) and the old comparison of the root page's normalised role with
//! the context's raw bits. Both are safe (a miss only costs a reload), so
//! the metric is reuse: the `prev_roots` hit rate and the loads of a vCPU
//! switching back and forth, and what a switch costs.

use std::time::Instant;

use vmmu::addr::{Gva, Hva};
use vmmu::arch::control::{CpuFeatures, Cr0, Cr4, Efer, Vendor};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, L1Nested, Vcpu};
use vmmu::host::VmaFlags;
use vmmu::mmu::shadow::role::PrevRootsMatch;
use vmmu::mmu::tdp::TdpConfig;
use vmmu::vm::{Machine, Mmu, MmuKind, Policies, Vm};
use vmmu::walker::ControlRegs;

use super::{ExperimentConfig, ExperimentResult, VariantResult, metric, nested_runs};

const MB: u64 = 1 << 20;

/// Round trips of the switching scenarios.
pub const ROUNDS: u64 = 200;

fn read(v: &mut Vcpu, va: u64) -> Result<u64, String> {
    match v.access(Gva::new(va), Access::new(AccessKind::Read, 0, false), 8, 0) {
        Ok(AccessResult::Done { value, .. }) => Ok(value),
        other => Err(format!("a read of {va:#x} gave {other:?}")),
    }
}

fn write(v: &mut Vcpu, va: u64, value: u64) -> Result<(), String> {
    match v.access(Gva::new(va), Access::new(AccessKind::Write, 0, false), 8, value) {
        Ok(AccessResult::Done { mmio: false, .. }) => Ok(()),
        other => Err(format!("a write of {va:#x} gave {other:?}")),
    }
}

/// What a switching scenario measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Switching {
    /// `prev_roots` hits.
    pub hits: i64,
    /// Roots loaded instead.
    pub misses: i64,
    /// Nanoseconds per switch and the access after it.
    pub ns_per_switch: f64,
}

/// The thread's case on the shadow MMU: a guest that turns paging off (a
/// direct root) and on again (4-level), `rounds` round trips, with
/// EFER.NXE and CR0.WP set throughout (bits a direct root's role clears).
pub fn paging_on_and_off(how: PrevRootsMatch, rounds: u64) -> Result<Switching, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let m = Machine::new(MmuKind::Shadow, 16 * MB).map_err(|x| e(&x))?;
    let Mmu::Shadow(mmu) = m.mmu() else {
        return Err("a shadow machine without the shadow MMU".into());
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
    let mut v = m.vcpu(1, off, 0).map_err(|x| e(&x))?;
    // 4-level tables at 0x1000..0x4000 identity-mapping the first 2 MiB.
    for (at, next) in [(0x1000u64, 0x2000u64), (0x2000, 0x3000), (0x3000, 0x4000)] {
        write(&mut v, at, next | 0x7)?;
    }
    for p in 0..512u64 {
        write(&mut v, 0x4000 + 8 * p, (p << 12) | 0x7)?;
    }
    write(&mut v, 0x10_0000, 0xabcd)?;
    let before = mmu.stats().snapshot();
    let t = Instant::now();
    for _ in 0..rounds {
        for (regs, cr3) in [(on, 0x1000), (off, 0)] {
            v.set_state(regs, cr3, 0).map_err(|x| e(&x))?;
            if read(&mut v, 0x10_0000)? != 0xabcd {
                return Err("the switched-to address space read something else".into());
            }
        }
    }
    let ns = t.elapsed().as_secs_f64() * 1e9 / (2 * rounds) as f64;
    let after = mmu.stats().snapshot();
    Ok(Switching {
        hits: after.prev_roots_hit - before.prev_roots_hit,
        misses: after.prev_roots_miss - before.prev_roots_miss,
        ns_per_switch: ns,
    })
}

/// An L1 hypervisor (AMD) running its three L2 guests in turn on the
/// nested MMU, `rounds` rounds.
pub fn l1_switching_among_three_l2s(how: PrevRootsMatch, rounds: u64) -> Result<Switching, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let config = TdpConfig {
        vendor: Vendor::Amd,
        ..TdpConfig::default()
    };
    let vm = Vm::new(8 * MB, Hva::new(0x4000_0000), VmaFlags::WRITE, config).map_err(|x| e(&x))?;
    let mut l1 = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), 1).map_err(|x| e(&x))?;
    l1.set_state(ControlRegs::default(), 0, 0).map_err(|x| e(&x))?;
    // NPT12 of guest i: PML4..PT at 0x10000 + 0x10000 * i; L2's page 0 at
    // L1's 1 MiB + 4K * i.
    let root = |i: u64| 0x10000 + 0x10000 * i;
    for i in 0..3u64 {
        for l in 0..3 {
            write(&mut l1, root(i) + 0x1000 * l, (root(i) + 0x1000 * (l + 1)) | 0x7)?;
        }
        write(&mut l1, root(i) + 0x3000, (MB + 0x1000 * i) | 0x7)?;
        write(&mut l1, MB + 0x1000 * i, 0x100 + i)?;
    }
    let nested = vm.nested_mmu().map_err(|x| e(&x))?;
    nested.set_prev_roots_match(how);
    let npt = |i: u64| L1Nested::four_level(Vendor::Amd, root(i));
    let mut l2 = Vcpu::new_nested(nested.clone(), vm.slots.clone(), CpuFeatures::default(), 2, npt(0));
    l2.set_state(ControlRegs::default(), 0, 0).map_err(|x| e(&x))?;
    let before = nested.stats().snapshot();
    let t = Instant::now();
    for _ in 0..rounds {
        for i in 0..3 {
            l2.set_l1_nested(npt(i));
            if read(&mut l2, 0)? != 0x100 + i {
                return Err(format!("L2 guest {i} read another guest's page"));
            }
        }
    }
    let ns = t.elapsed().as_secs_f64() * 1e9 / (3 * rounds) as f64;
    let after = nested.stats().snapshot();
    Ok(Switching {
        hits: after.prev_roots_hit - before.prev_roots_hit,
        misses: after.prev_roots_miss - before.prev_roots_miss,
        ns_per_switch: ns,
    })
}

fn rate(s: &Switching) -> f64 {
    100.0 * s.hits as f64 / (s.hits + s.misses).max(1) as f64
}

/// Runs the experiment.
pub fn run(cfg: &ExperimentConfig) -> Result<ExperimentResult, String> {
    let mut variants = Vec::new();
    let policies = [
        (
            "normalised",
            "the root page's role against the context's normalised root role (KVM since the thread)",
            PrevRootsMatch::Normalised,
        ),
        (
            "un-normalised",
            "the root page's role against the context's raw bits (KVM before the thread)",
            PrevRootsMatch::Unnormalised,
        ),
    ];
    // The focused measurements first, all variants in a fresh process
    // state (the simulator runs leave deferred frees and threads behind
    // that would slow whichever variant came after them).
    // Best of three, the variants interleaved, so that neither pays for
    // the other's leftovers.
    let mut measured: Vec<Option<(Switching, Switching)>> = vec![None; policies.len()];
    for _ in 0..3 {
        for (i, &(_, _, how)) in policies.iter().enumerate() {
            let (d, n) = (
                paging_on_and_off(how, ROUNDS)?,
                l1_switching_among_three_l2s(how, ROUNDS)?,
            );
            measured[i] = Some(match measured[i] {
                None => (d, n),
                Some((bd, bn)) => (
                    Switching {
                        ns_per_switch: bd.ns_per_switch.min(d.ns_per_switch),
                        ..d
                    },
                    Switching {
                        ns_per_switch: bn.ns_per_switch.min(n.ns_per_switch),
                        ..n
                    },
                ),
            });
        }
    }
    let measured = measured.into_iter().map(|m| m.expect("measured three times"));
    for ((name, what, how), (direct, nested)) in policies.into_iter().zip(measured) {
        // The checker over a nested run: L1 switching among its L2 VMs
        // under host churn and a migration, on each vendor.
        let policies = Policies {
            prev_roots_match: how,
            ..Policies::default()
        };
        let (violations, details, reports) = nested_runs(cfg, 3, policies)?;
        let (mut sim_hits, mut sim_total) = (0i64, 0i64);
        for n in reports.into_iter().filter_map(|r| r.nested) {
            sim_hits += n.stats.prev_roots_hit;
            sim_total += n.stats.prev_roots_hit + n.stats.prev_roots_miss;
        }
        variants.push(VariantResult {
            name,
            what,
            safe: true,
            runs: 4,
            violations,
            details,
            metrics: vec![
                metric("paging on/off: prev_roots hit rate", "%", rate(&direct)),
                metric("paging on/off: roots loaded", "roots", direct.misses as f64),
                metric("paging on/off: ns per switch and access", "ns", direct.ns_per_switch),
                metric("L1 among 3 L2s: prev_roots hit rate", "%", rate(&nested)),
                metric("L1 among 3 L2s: ns per switch and access", "ns", nested.ns_per_switch),
                metric(
                    "vmmu run --nested 3: prev_roots hit rate",
                    "%",
                    100.0 * sim_hits as f64 / sim_total.max(1) as f64,
                ),
            ],
        });
    }
    let (n, u) = (&variants[0], &variants[1]);
    let get = |v: &VariantResult, m: &str| v.metric(m).unwrap_or(0.0);
    let verdict = format!(
        "Normalised, the direct root of a guest that turns paging off and on is reused: {:.1}% of {} switches hit, {} roots loaded, {:.0} ns a switch. Compared un-normalised, as before the thread, the direct root never is: {:.1}% hit (the 4-level root's switches only), {} roots loaded, {:.0} ns a switch ({:.1}x). The roots of an L2 guest shadow L1's tables and are never direct: L1 switching among three of them hits {:.1}% either way (the timed nested runs, whose mix of switches and L1 invalidations differs run to run, {:.1}% and {:.1}%). The normalisation is what makes a direct root reusable, and nothing else depends on it; both variants are clean under the checker ({} and {} violations).",
        get(n, "paging on/off: prev_roots hit rate"),
        2 * ROUNDS,
        get(n, "paging on/off: roots loaded"),
        get(n, "paging on/off: ns per switch and access"),
        get(u, "paging on/off: prev_roots hit rate"),
        get(u, "paging on/off: roots loaded"),
        get(u, "paging on/off: ns per switch and access"),
        get(u, "paging on/off: ns per switch and access") / get(n, "paging on/off: ns per switch and access").max(1e-9),
        get(n, "L1 among 3 L2s: prev_roots hit rate"),
        get(n, "vmmu run --nested 3: prev_roots hit rate"),
        get(u, "vmmu run --nested 3: prev_roots hit rate"),
        n.violations,
        u.violations,
    );
    Ok(ExperimentResult {
        seed: "001",
        title: "prev_roots for the NPT case: which role bits make a cached root reusable",
        question: "KVM keeps a vCPU's recent roots (prev_roots) and reuses one when its role compares equal to the role the MMU wants. KVM cleared cr4_pae in the role of a direct page when it made the page, but not in the MMU's own role, so a cached direct root never compared equal again: every switch back to it rebuilt or looked it up. The thread asks where the bits a root does not use should be normalised; vmmu normalises them in one place, for every role, and compares roles as KVM does now.",
        variants,
        plot_metric: "paging on/off: prev_roots hit rate",
        verdict,
    })
}
