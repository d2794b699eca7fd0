//! The simulator end to end: every named workload under each MMU and each
//! paging mode finds 0 violations; a replay is deterministic; and an MMU
//! broken on purpose (a skipped TLB flush, a skipped notifier retry, a
//! dropped dirty bit) is caught within a bounded run.

use vmmu::vm::MmuKind;
use vmmu_sim::checker::CheckLevel;
use vmmu_sim::guest::PagingFormat;
use vmmu_sim::run::{RunConfig, RunOutcome, replay, run};
use vmmu_sim::trace::Trace;
use vmmu_sim::workload::{NAMED, Workload};

fn small(mmu: MmuKind, workload: &str, paging: &str, ops: u64) -> RunConfig {
    let w = Workload::load(workload).expect("a named workload");
    RunConfig {
        paging: PagingFormat::parse(paging).expect("a mode"),
        vcpus: 2,
        memory: 48 << 20,
        ops: Some(ops),
        ..RunConfig::new(mmu, w)
    }
}

fn go(cfg: &RunConfig) -> RunOutcome {
    let o = run(cfg, &|_| {}).unwrap_or_else(|e| panic!("{} {:?}: {e}", cfg.workload.name, cfg.mmu));
    assert_eq!(
        o.report.violations,
        0,
        "{} under {:?} in {}: {:#?}",
        cfg.workload.name,
        cfg.mmu,
        cfg.paging.name(),
        o.report.violation_details
    );
    o
}

#[test]
fn every_workload_under_each_mmu_and_paging_mode_finds_no_violation() {
    for paging in ["32-bit", "pae", "4-level", "5-level"] {
        for (name, _) in NAMED {
            for mmu in [MmuKind::Shadow, MmuKind::Tdp] {
                let o = go(&small(mmu, name, paging, 120));
                assert!(o.report.accesses > 0, "{name} {paging} {mmu:?} made no access");
            }
        }
    }
}

#[test]
fn the_workloads_do_what_they_are_named_for() {
    let fork = go(&small(MmuKind::Shadow, "fork-storm", "4-level", 400)).report;
    assert!(fork.processes > 4 && fork.guest_faults > 0, "{fork:#?}");
    let thp = go(&small(MmuKind::Tdp, "thp", "4-level", 60)).report;
    assert!(thp.accesses > 0);
    let flood = go(&small(MmuKind::Shadow, "pt-flood", "4-level", 400)).report;
    assert!(
        flood.stats.mmu_unsync + flood.stats.mmu_flooded + flood.stats.mmu_pte_write > 0,
        "{flood:#?}"
    );
    let mut dirty = small(MmuKind::Tdp, "dirty", "4-level", 300);
    dirty.migrate = true;
    let m = go(&dirty).report.migration.expect("a migration ran");
    assert!(
        m.rounds >= 2 && m.bytes_compared == 48 << 20 && m.mismatched_pages == 0,
        "{m:#?}"
    );
}

#[test]
fn the_default_run_with_churn_and_migration_finds_no_violation_under_both_mmus() {
    for mmu in [MmuKind::Shadow, MmuKind::Tdp] {
        let mut cfg = RunConfig::new(mmu, Workload::load("default").unwrap());
        cfg.ops = Some(2000);
        cfg.memory = 64 << 20;
        let r = go(&cfg).report;
        assert!(r.migration.is_some() && r.host_operations > 0 && r.audits > 0, "{r:#?}");
    }
}

/// Regression: a MOV CR3 that flushes, then another MOV CR3 before any
/// access, lost the first one's sync; a later no-flush return (PCID) to
/// the first address space found its unsync page stale (a write through a
/// PTE the guest had made read-only at fork). One vCPU, 4-level paging
/// with PCIDs: was 44 violations.
#[test]
fn fork_storm_with_pcid_switches_on_one_vcpu_keeps_the_shadow_mmu_in_sync() {
    for seed in 1..=3 {
        let mut cfg = small(MmuKind::Shadow, "fork-storm", "4-level", 2500);
        cfg.vcpus = 1;
        cfg.seed = seed;
        go(&cfg);
    }
}

/// The adversarial guests, each long enough to do its trick many times,
/// under both MMUs: 0 violations, the MMU's page-table memory within its
/// limit.
#[test]
fn adversarial_guests_find_no_violation_and_stay_within_the_mmu_memory_limit() {
    for (name, ops) in [
        ("many-mm", 3000),
        ("self-map", 300),
        ("recursive-map", 300),
        ("pt-flood", 400),
        ("cr-toggle", 300),
        ("dirty-storm", 40),
    ] {
        for mmu in [MmuKind::Shadow, MmuKind::Tdp] {
            let mut cfg = small(mmu, name, "4-level", ops);
            cfg.migrate = name == "dirty-storm";
            let r = go(&cfg).report;
            assert!(
                r.mmu_memory_peak_bytes <= r.mmu_memory_limit_bytes,
                "{name} {mmu:?}: peak {} > limit {}",
                r.mmu_memory_peak_bytes,
                r.mmu_memory_limit_bytes
            );
            match name {
                "many-mm" => assert!(r.processes > 1000, "{name} {mmu:?}: {} processes", r.processes),
                "self-map" | "recursive-map" | "cr-toggle" => assert!(r.adversarial_ops > 20, "{r:#?}"),
                _ => {}
            }
            if name == "many-mm" && mmu == MmuKind::Shadow {
                assert!(r.stats.mmu_recycled > 0, "the page limit was never reached: {r:#?}");
            }
        }
    }
}

/// The soak's short version: every workload's operations at once (the
/// `mixed` workload, adversarial ones included) for 15 s under each MMU,
/// with host churn, zap-all and live migrations.
#[test]
fn a_short_soak_of_every_workload_mixed_finds_no_violation() {
    for mmu in [MmuKind::Shadow, MmuKind::Tdp] {
        let mut cfg = RunConfig::new(mmu, Workload::load("mixed").expect("named"));
        cfg.seconds = Some(15.0);
        cfg.host_churn = true;
        cfg.migrate = true;
        let r = go(&cfg).report;
        let m = r.migration.as_ref().expect("a migration ran");
        assert!(
            r.operations > 100 && r.host_operations > 0 && r.adversarial_ops > 0 && m.mismatched_pages == 0,
            "{r:#?}"
        );
        assert!(r.mmu_memory_peak_bytes <= r.mmu_memory_limit_bytes, "{r:#?}");
    }
}

/// `vmmu run --config random` (and `vmmu soak`) in short: configurations,
/// paging modes and workloads drawn from seeds, under both MMUs, with host
/// churn and a live migration each; every knob of the VM configuration
/// takes each of its values across the seeds.
#[test]
fn random_configurations_with_churn_and_migration_find_no_violation() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..20u64 {
        for mmu in [MmuKind::Shadow, MmuKind::Tdp] {
            let (vm, paging) = vmmu_sim::config::from_seed(seed, Some(mmu));
            let (name, _) = NAMED[(seed % NAMED.len() as u64) as usize];
            let w = Workload {
                vm,
                ..Workload::load(name).expect("a named workload")
            };
            let cfg = RunConfig {
                paging,
                vcpus: 2,
                memory: 32 << 20,
                seconds: Some(0.4),
                seed,
                host_churn: true,
                migrate: true,
                ..RunConfig::new(mmu, w)
            };
            let r = go(&cfg).report;
            let m = r.migration.as_ref().expect("a migration ran");
            assert_eq!(m.mismatched_pages, 0, "seed {seed} {mmu:?}: {}", vm.flags());
            if mmu == MmuKind::Tdp {
                seen.insert(vm.dirty_log_name(mmu));
            }
        }
    }
    // The draws reach the dirty-log modes (write-protect, D-bit, ring).
    for mode in ["wp", "dbit", "ring"] {
        assert!(seen.iter().any(|n| n.starts_with(mode)), "{mode} never drawn: {seen:?}");
    }
}

/// Regression: a guest table whose entries point at itself is shadowed at
/// every level, each page of it a child of the one above; a flooding write
/// to it zapped the top page, which took the others with it, and the
/// write-tracking loop then looked up a page it had just freed (a panic a
/// guest could cause at will).
#[test]
fn writes_to_a_table_that_maps_itself_do_not_crash_the_shadow_mmu() {
    for seed in 1..=3 {
        let mut cfg = small(MmuKind::Shadow, "self-map", "4-level", 300);
        cfg.seed = seed;
        go(&cfg);
    }
}

#[test]
fn a_replay_is_deterministic_and_a_one_vcpu_replay_is_the_run() {
    let mut cfg = small(MmuKind::Shadow, "default", "4-level", 300);
    cfg.vcpus = 1;
    cfg.record = true;
    cfg.workload.host_churn = false;
    cfg.workload.migrate = false;
    let o = go(&cfg);
    let trace = o.trace.expect("recorded");
    let text = trace.to_text();
    let back = Trace::parse(&text, "t").expect("a trace reads back");
    let a = replay(&back, MmuKind::Shadow, CheckLevel::Full).unwrap().report;
    let b = replay(&back, MmuKind::Shadow, CheckLevel::Full).unwrap().report;
    assert_eq!(
        (a.accesses, a.stats, a.guest_faults),
        (b.accesses, b.stats, b.guest_faults)
    );
    assert_eq!(
        (a.accesses, a.guest_faults, a.processes),
        (o.report.accesses, o.report.guest_faults, o.report.processes)
    );
    let t = replay(&back, MmuKind::Tdp, CheckLevel::Full).unwrap().report;
    assert_eq!(
        (t.violations, t.accesses, t.guest_faults),
        (0, a.accesses, a.guest_faults)
    );
}

#[test]
fn bad_configurations_are_refused_with_the_reason() {
    let mut cfg = small(MmuKind::Tdp, "default", "32-bit", 10);
    cfg.memory = 2 << 30;
    let e = run(&cfg, &|_| {}).unwrap_err().to_string();
    assert!(e.contains("32-bit") && e.contains("1024 MiB"), "{e}");
    cfg.memory = 3 << 20;
    assert!(run(&cfg, &|_| {}).unwrap_err().to_string().contains("--memory"));
    cfg.memory = 32 << 20;
    cfg.vcpus = 0;
    assert!(run(&cfg, &|_| {}).unwrap_err().to_string().contains("--vcpus"));
}

/// A small `--nested` run: an L1 hypervisor with `vms` L2 VMs on `vendor`,
/// with host churn and a live migration.
fn nested(vendor: vmmu::arch::control::Vendor, paging: &str, vms: usize, ops: u64) -> RunConfig {
    let mut cfg = small(MmuKind::Tdp, "default", paging, ops);
    cfg.memory = 96 << 20;
    cfg.nested = vms;
    cfg.workload.vm.vendor = vendor;
    cfg.host_churn = true;
    cfg.migrate = true;
    cfg
}

/// `vmmu run --nested` on both vendors, every paging mode of the L2
/// guests, 2 and 4 L2 VMs, with host churn and a migration: no
/// violation, and every part of the model exercised (L1 mapping on exits,
/// taking memory back, switching its vCPUs between L2 VMs through the
/// nested MMU's `prev_roots`, the migration copying L1's memory that the
/// L2 VMs wrote).
#[test]
fn nested_runs_are_clean_on_both_vendors() {
    use vmmu::arch::control::Vendor;
    for vendor in [Vendor::Intel, Vendor::Amd] {
        for (paging, vms) in [("4-level", 2), ("pae", 4), ("32-bit", 2), ("5-level", 3)] {
            let o = go(&nested(vendor, paging, vms, 3000));
            let n = o.report.nested.as_ref().expect("a nested report");
            let what = format!("{vendor:?} {paging} {vms}: {n:?}");
            assert_eq!(n.vms, vms as u64, "{what}");
            assert!(n.l1_exits > 100 && n.l1_mapped > 100, "{what}");
            assert!(n.switches > 10 && n.l1_unmapped > 0 && n.invalidations > 0, "{what}");
            // L1's leaf tables went unsync for its stores, and were synced
            // at its invalidations.
            assert!(n.stats.mmu_unsync > 0 && n.stats.mmu_synced > 0, "{what}");
            assert!(n.stats.prev_roots_hit > 0 && n.stats.pf_fixed > 0, "{what}");
            assert!(
                o.report.migration.as_ref().is_some_and(|m| m.bytes_compared > 0),
                "{what}"
            );
        }
    }
}

#[test]
fn impossible_nested_configurations_are_refused_with_the_reason() {
    use vmmu::arch::control::Vendor;
    let mut cfg = nested(Vendor::Intel, "4-level", 2, 10);
    cfg.mmu = MmuKind::Shadow;
    assert!(run(&cfg, &|_| {}).unwrap_err().to_string().contains("--mmu tdp"));
    let mut cfg = nested(Vendor::Intel, "4-level", 5, 10);
    assert!(run(&cfg, &|_| {}).unwrap_err().to_string().contains("2..=4"));
    cfg.nested = 4;
    cfg.memory = 48 << 20;
    assert!(run(&cfg, &|_| {}).unwrap_err().to_string().contains("too small"));
    let mut cfg = nested(Vendor::Intel, "4-level", 2, 10);
    cfg.workload.vm.dirty_ring = 64;
    assert!(run(&cfg, &|_| {}).unwrap_err().to_string().contains("--dirty-ring"));
}

#[cfg(feature = "shuttle")]
mod injected {
    use super::*;
    use vmmu_sim::run::{Bug, Injection, run_injected};

    fn caught(cfg: RunConfig, inject: Injection) -> u64 {
        // A guest write through a stale SPTE can corrupt a frame the host
        // model reused for its own page tables; the host model's checks
        // then fail on a vCPU thread (an error) or when the VM is torn down
        // (a panic). Either is the bug caught.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_injected(&cfg, &inject, &|_| {}))) {
            Ok(Ok(o)) => o.report.violations,
            Ok(Err(e)) => {
                eprintln!("caught as a failed run: {e}");
                1
            }
            Err(_) => {
                eprintln!("caught as a host-model check failing at teardown");
                1
            }
        }
    }

    /// A run with a live migration in its middle. Timed, not counted in
    /// operations: on a busy machine 3000 operations could end before the
    /// VMM's first look, and the migration owed would then run after the
    /// vCPUs stopped, with no write during logging for a bug to lose (the
    /// "dropped dirty bit" went unnoticed that way under a loaded CI).
    fn migrating(mmu: MmuKind) -> RunConfig {
        let mut cfg = small(mmu, "dirty", "4-level", 3000);
        cfg.ops = None;
        cfg.seconds = Some(1.5);
        cfg.migrate = true;
        cfg
    }

    /// The remote TLB flushes after dirty logging write-protects pages
    /// (enabling, harvests) are skipped on the VMM thread: a vCPU keeps
    /// writing through writable translations and the writes are not
    /// logged. The checker's dirty-log check sees such writes (no later
    /// harvest reports them), and so does the migration's compare. (A
    /// single skipped flush shows only where the page is not written again
    /// after the next flush: a later write logs the page and its copy then
    /// holds the unlogged write too, which the checker rightly accepts.) (On the shadow MMU the
    /// vCPUs' own faults flush every TLB within microseconds in this
    /// workload, which hides a skipped flush; the TDP MMU's faults do not
    /// flush.)
    #[test]
    fn a_skipped_tlb_flush_is_caught() {
        let n = caught(
            migrating(MmuKind::Tdp),
            Injection {
                vmm: vec![Bug::SkipDirtyLogFlush],
                ..Injection::default()
            },
        );
        assert!(n > 0, "a skipped flush went unnoticed");
    }

    /// The shadow MMU's roles ignore CR0.WP, CR4.SMEP and EFER.NXE: pages
    /// built with NX on serve the guest after it turned NX off, where the
    /// XD bits of its entries are reserved and x86 faults with RSVD. The
    /// adversarial guest's checked accesses see it.
    #[test]
    fn a_role_that_ignores_control_bits_is_caught() {
        let n = caught(
            small(MmuKind::Shadow, "cr-toggle", "4-level", 600),
            Injection {
                vcpu: vec![Bug::RoleIgnoresControls],
                ..Injection::default()
            },
        );
        assert!(n > 0, "a role ignoring CR0.WP/SMEP/NXE went unnoticed");
    }

    /// vCPUs see the request to drop obsolete roots after a zap-all and
    /// keep theirs: the hardware model counts each walk of such a root,
    /// and the checker reports it.
    #[test]
    fn a_vcpu_that_keeps_an_obsolete_root_is_caught() {
        for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
            let mut cfg = small(mmu, "default", "4-level", 100_000);
            cfg.ops = None;
            cfg.seconds = Some(1.5);
            let inject = Injection {
                vcpu: vec![Bug::KeepObsoleteRoot],
                ..Injection::default()
            };
            let details = match run_injected(&cfg, &inject, &|_| {}) {
                Ok(o) => o.report.violation_details.join("\n"),
                Err(e) => e.to_string(),
            };
            assert!(
                details.contains("invalid root"),
                "{mmu:?}: a kept obsolete root went unnoticed: {details}"
            );
        }
    }

    /// Under `--nested`, the TDP MMU ignores the nested MMU's write
    /// tracking, or a sync leaves L1 its writable mapping of the tables it
    /// syncs: L1's edits of its nested tables (taking memory back) leave
    /// EPT02/NPT02 stale in pages that count as in sync. The nested MMU's
    /// audit (every shadow SPTE of a page in sync against L1's entry) finds
    /// it.
    #[test]
    fn stale_nested_tables_are_caught_in_a_nested_run() {
        for bug in [Bug::UntrackedNestedTables, Bug::SyncLeavesWritableElsewhere] {
            for vendor in [vmmu::arch::control::Vendor::Intel, vmmu::arch::control::Vendor::Amd] {
                let mut cfg = super::nested(vendor, "4-level", 2, 4000);
                cfg.host_churn = false;
                let n = caught(
                    cfg,
                    Injection {
                        vcpu: vec![bug],
                        ..Injection::default()
                    },
                );
                assert!(n > 0, "{vendor:?}: {bug:?} went unnoticed");
            }
        }
    }

    /// One page's dirty bit is dropped: the destination keeps a stale copy.
    #[test]
    fn a_dropped_dirty_bit_is_caught() {
        for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
            let n = caught(
                migrating(mmu),
                Injection {
                    vcpu: vec![Bug::DropDirtyBit],
                    ..Injection::default()
                },
            );
            assert!(n > 0, "{mmu:?}: a dropped dirty bit went unnoticed");
        }
    }

    /// The first MMU-notifier retry check that should say "retry" says
    /// "go on": an SPTE maps the frame the host just moved or freed. The
    /// audit, the data check or the host model (a guest write through the
    /// stale SPTE corrupts a frame the host reused) finds it. The bug fires
    /// only when a fault races an invalidation, so a run catches it with
    /// some chance: up to 20 runs of 2,000 operations.
    #[test]
    fn a_skipped_notifier_retry_is_caught() {
        let mut total = 0;
        for seed in 1..=20 {
            let mut cfg = small(MmuKind::Tdp, "populate", "4-level", 2000);
            cfg.seed = seed;
            cfg.host_churn = true;
            total += caught(
                cfg,
                Injection {
                    vcpu: vec![Bug::SkipNotifierRetry],
                    ..Injection::default()
                },
            );
            if total > 0 {
                break;
            }
        }
        assert!(total > 0, "a skipped notifier retry went unnoticed in 20 runs");
    }
}
