//! The TDP stress scenario (`vmmu_sim::stress`) in the test suite: a short
//! run must find 0 violations and show every thread made progress.
//! `VMMU_STRESS_MS` sets the duration (default 1500 ms); `vmmu stress`
//! runs it for as long as asked.

use std::time::Duration;

use vmmu_sim::stress::{StressConfig, run};

#[test]
fn vcpus_host_churn_zap_all_and_dirty_logging() {
    let ms: u64 = std::env::var("VMMU_STRESS_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let report = run(
        StressConfig {
            duration: Duration::from_millis(ms),
            ..StressConfig::default()
        },
        &|_| {},
    )
    .unwrap();
    eprintln!(
        "stress: {} accesses, {} host operations, {} VMM operations, {} dirty-log sessions, {} audits, {} violations",
        report.accesses,
        report.host_operations,
        report.vmm_operations,
        report.dirty_log_sessions,
        report.audits,
        report.violations
    );
    assert_eq!(
        report.violations, 0,
        "{:?} {:?}",
        report.data_violations, report.spte_violations
    );
    assert!(
        report.accesses > 1000
            && report.host_operations > 50
            && report.vmm_operations > 10
            && report.dirty_log_sessions > 0,
        "every thread made progress: {report:?}"
    );
}

#[test]
fn bad_configurations_are_refused() {
    for config in [
        StressConfig {
            vcpus: 0,
            ..StressConfig::default()
        },
        StressConfig {
            memory: 3 << 20,
            ..StressConfig::default()
        },
        StressConfig {
            memory: 64 << 30,
            ..StressConfig::default()
        },
    ] {
        assert!(run(config, &|_| {}).is_err());
    }
}
