//! Live migration under every dirty-log configuration a KVM user can choose
//! (write-protect, D-bit and ring logging × manual protect × initially set
//! × EPT A/D on the TDP MMU; manual protect × initially set on the shadow
//! MMU), with host churn that includes aging without a flush, and the
//! destination compared with the source byte for byte after each
//! migration (`vmmu_sim::migration`). `vmmu migrate` runs the same matrix
//! for as long as asked.
//!
//! The checker is shown to fail: each injected bug below brings back one
//! of the classes of lost writes the matrix found, and only the
//! configurations that class hits lose pages.

use vmmu::vm::MmuKind;
use vmmu::vm::config::VmConfig;
use vmmu_sim::migration::{MatrixRow, MatrixSpec, run_matrix};

/// Seeds a configuration runs in the test suite.
const SEEDS: u64 = 3;
/// Operations of a run.
const OPS: u64 = 2500;

fn spec(mmus: &[MmuKind], base: VmConfig) -> MatrixSpec {
    MatrixSpec {
        mmus: mmus.to_vec(),
        base,
        only: Vec::new(),
        first_seed: 0,
        seeds: SEEDS,
        ops: OPS,
        deadline: None,
    }
}

fn matrix(base: VmConfig) -> Vec<MatrixRow> {
    run_matrix(&spec(&[MmuKind::Tdp, MmuKind::Shadow], base), &|_, _| {}).unwrap_or_else(|e| panic!("{e}"))
}

fn show(rows: &[MatrixRow]) {
    for r in rows {
        eprintln!(
            "{:6} {:20} migrations {:4} compared {:7} lost {}",
            r.mmu, r.name, r.tally.migrations, r.tally.pages_compared, r.tally.pages_lost
        );
    }
}

/// Every configuration, with the defaults for the other knobs, with the
/// NX huge page mitigation (instruction fetches split huge pages; its
/// recovery worker is off: the checker runs on one thread), and with eager
/// splitting off (huge leaves survive into logging).
#[test]
fn no_page_is_lost_in_any_dirty_log_configuration() {
    for base in [
        VmConfig::default(),
        VmConfig {
            nx_huge_pages: true,
            nx_recovery_ratio: 0,
            ..VmConfig::default()
        },
        VmConfig {
            eager_split: false,
            ..VmConfig::default()
        },
    ] {
        let rows = matrix(base);
        show(&rows);
        assert_eq!(rows.len(), 21, "18 TDP (13 Intel, 5 AMD) and 3 shadow configurations");
        for r in &rows {
            assert!(r.tally.migrations >= SEEDS, "{} {}: {:?}", r.mmu, r.name, r.tally);
            assert_eq!(
                r.tally.pages_lost, 0,
                "{} {} ({}): {:?}",
                r.mmu, r.name, r.config, r.tally.losses
            );
        }
    }
}

/// Runs the matrix with `bug` injected; returns the rows that lost pages.
#[cfg(feature = "shuttle")]
fn lossy_with(bug: vmmu::sync::Bug, base: VmConfig) -> Vec<String> {
    let rows = vmmu::sync::with_bugs(&[bug], || {
        run_matrix(&spec(&[MmuKind::Tdp], base), &|_, _| {}).unwrap_or_else(|e| panic!("{e}"))
    });
    show(&rows);
    rows.iter()
        .filter(|r| r.tally.pages_lost > 0)
        .map(|r| r.name.clone())
        .collect()
}

/// Class 2 comes back: a harvest that flushes only when it changed an SPTE
/// loses writes wherever aging leaves a writable translation behind a
/// non-writable SPTE, i.e. with EPT A/D off (bitmap, clear and ring alike).
#[cfg(feature = "shuttle")]
#[test]
fn the_matrix_catches_a_harvest_that_flushes_only_on_change() {
    let lossy = lossy_with(vmmu::sync::Bug::HarvestFlushByChange, VmConfig::default());
    assert!(!lossy.is_empty(), "the bug went unnoticed");
    assert!(lossy.iter().all(|n| n.ends_with("noad")), "{lossy:?}");
    assert!(lossy.iter().any(|n| n.starts_with("ring")), "{lossy:?}");
}

/// Class 1 comes back: a fast path that makes a huge SPTE writable in a
/// logging slot loses writes wherever write-protected huge leaves live on
/// in logging, which they do with eager splitting off (write-protect and
/// ring logging; D-bit logging does not write-protect).
#[cfg(feature = "shuttle")]
#[test]
fn the_matrix_catches_a_fast_path_that_makes_a_huge_spte_writable() {
    let base = VmConfig {
        eager_split: false,
        ..VmConfig::default()
    };
    let lossy = lossy_with(vmmu::sync::Bug::FastPathHugeWritable, base);
    assert!(lossy.iter().any(|n| n.contains("+init")), "{lossy:?}");
    assert!(lossy.iter().any(|n| n.starts_with("ring")), "{lossy:?}");
    assert!(lossy.iter().all(|n| !n.starts_with("dbit")), "{lossy:?}");
}

/// Class 3 comes back: in D-bit logging, a dirty leaf that goes away (a
/// zap, a split) without logging its D bit loses the writes it recorded.
#[cfg(feature = "shuttle")]
#[test]
fn the_matrix_catches_a_zap_that_forgets_the_dirty_bit() {
    let lossy = lossy_with(vmmu::sync::Bug::ZapForgetsDirtyBit, VmConfig::default());
    assert!(!lossy.is_empty(), "the bug went unnoticed");
    assert!(lossy.iter().all(|n| n.starts_with("dbit")), "{lossy:?}");
}
