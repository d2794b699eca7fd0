//! The experiments' switches (`vmmu experiment`): each variant runs the
//! real MMU code under its policy, the checker finds nothing in a safe
//! variant, and the figures the threads argue about move as they must.
//! (No timing is asserted: speeds are the benchmarks' business.)

use vmmu::mmu::shadow::role::PrevRootsMatch;
use vmmu::mmu::track::IndirectGate;
use vmmu_sim::experiment::{ExperimentConfig, seed001, seed002};

/// Seed 001: a guest turning paging off and on reuses its direct root only
/// with roles compared normalised; an L1 switching among its L2 guests
/// reuses their roots either way.
#[test]
fn seed_001_normalised_roles_make_a_direct_root_reusable() {
    let rounds = 20;
    let n = seed001::paging_on_and_off(PrevRootsMatch::Normalised, rounds).unwrap();
    let u = seed001::paging_on_and_off(PrevRootsMatch::Unnormalised, rounds).unwrap();
    assert_eq!((n.hits, n.misses), (2 * rounds as i64 - 1, 1), "{n:?}");
    assert_eq!((u.hits, u.misses), (rounds as i64 - 1, rounds as i64 + 1), "{u:?}");
    let n = seed001::l1_switching_among_three_l2s(PrevRootsMatch::Normalised, rounds).unwrap();
    let u = seed001::l1_switching_among_three_l2s(PrevRootsMatch::Unnormalised, rounds).unwrap();
    assert_eq!((n.hits, n.misses), (3 * rounds as i64 - 3, 3), "{n:?}");
    assert_eq!((u.hits, u.misses), (n.hits, n.misses));
}

/// Seed 002: either gate lets every fault of a VM with nested pages
/// through to the tracked-set lookup, and none of the faulting pages is
/// tracked (the gate's false positives, harmless).
#[test]
fn seed_002_either_gate_lets_the_faults_through() {
    for gate in [IndirectGate::Lockless, IndirectGate::UnderMmuLock] {
        let f = seed002::faults_with_nested_pages(gate).unwrap();
        let faults = (seed002::THREADS * seed002::PAGES) as i64;
        assert!(f.gate_maybe >= 3 * faults, "{gate:?}: {f:?}");
        assert_eq!(f.tracked, 0, "{gate:?}: {f:?}");
    }
}

/// Every experiment ends as it must (each safe variant clean, each unsafe
/// one caught) and reports its plot's metric for every variant; the
/// figures each thread argues about move the way the thread says.
#[test]
fn the_experiments_pass_safe_variants_clean_and_unsafe_ones_caught() {
    let cfg = ExperimentConfig { seconds: 1.0, seed: 3 };
    let results = vmmu_sim::experiment::run("all", &cfg).unwrap();
    assert_eq!(
        results.iter().map(|r| r.seed).collect::<Vec<_>>(),
        ["000", "001", "002", "003", "004"]
    );
    for r in &results {
        assert!(r.passed(), "{}: {:#?}", r.seed, r.variants);
        for v in &r.variants {
            // Safe and clean, or unsafe and caught.
            assert_eq!(v.safe, v.violations == 0, "{}: {v:?}", r.seed);
        }
        // The plot compares at least two variants.
        let plotted = r.variants.iter().filter(|v| v.metric(r.plot_metric).is_some());
        assert!(plotted.count() >= 2, "{}: {:#?}", r.seed, r.variants);
        assert!(!r.verdict.is_empty());
    }
    // Seed 000: the two checks do the same work, and breaking the rule
    // they rest on (only 4K pages unsync) is caught.
    let sync = &results[0];
    assert_eq!(sync.variants.iter().filter(|v| !v.safe).count(), 1);
    let (a, b) = (&sync.variants[0], &sync.variants[1]);
    assert_eq!(
        a.metric("roots checked under mmu_lock"),
        b.metric("roots checked under mmu_lock")
    );
    assert!(a.metric("roots walked").unwrap() > 0.0, "{a:?}");
    let gate = &results[2];
    for v in &gate.variants {
        assert!(v.metric("nested runs: gate said maybe").unwrap() > 0.0, "{v:?}");
    }
    // Seed 003: reloading every root drops cached roots that freeing only
    // the obsolete ones keeps, and loses prev_roots hits for it.
    let zap = &results[3];
    let (f, a) = (&zap.variants[0], &zap.variants[1]);
    let m = |v: &vmmu_sim::experiment::VariantResult, name: &str| v.metric(name).unwrap();
    assert!(
        m(a, "current roots reloaded") > m(f, "current roots reloaded"),
        "{f:?}\n{a:?}"
    );
    assert!(
        m(a, "cached roots dropped") > m(f, "cached roots dropped"),
        "{f:?}\n{a:?}"
    );
    // Seed 004: each safe way brings huge pages back, in place or by
    // zapping for faults to map huge.
    let level = &results[4];
    assert!(m(&level.variants[0], "huge SPTEs recovered in place") > 0.0);
    assert!(m(&level.variants[1], "huge SPTEs recovered in place") > 0.0);
    assert!(m(&level.variants[2], "tables zapped to refault huge") > 0.0);
    assert!(m(&level.variants[5], "host walks astray") > 0.0);
    assert!(
        vmmu_sim::experiment::run("9", &cfg)
            .unwrap_err()
            .contains("no experiment")
    );
}
