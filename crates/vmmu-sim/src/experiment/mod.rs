//! The seed threads as experiments (`vmmu experiment`): each thread's
//! design decision run in its variants side by side, on the same workload
//! and seed, with the metric the thread argues about and the checker's
//! findings per variant.
//!
//! A variant is a runtime policy of the real MMU code ([`vmmu::vm::Policies`],
//! each switch documented beside the code it switches), never a copy of
//! it. A variant is *safe* (the checker must find nothing) or *unsafe*
//! (the checker must catch it: that is part of the result, and the run
//! goes on to report it). An experiment passes when every safe variant is
//! clean and every unsafe one was caught.
//!
//! Adding one: `docs/EXPERIMENTS.md`.

pub mod seed000;
pub mod seed001;
pub mod seed002;
pub mod seed003;
pub mod seed004;

use serde::Serialize;

/// What every experiment is given.
#[derive(Clone, Copy, Debug)]
pub struct ExperimentConfig {
    /// Seconds of simulator runs per variant (the measurements beside
    /// them take what they take: a fixed amount of work).
    pub seconds: f64,
    /// The seed of every run.
    pub seed: u64,
}

impl Default for ExperimentConfig {
    fn default() -> ExperimentConfig {
        ExperimentConfig { seconds: 4.0, seed: 1 }
    }
}

/// One measured value of a variant.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    /// What it is.
    pub name: String,
    /// Its unit.
    pub unit: &'static str,
    /// The value.
    pub value: f64,
}

/// One variant's results.
#[derive(Clone, Debug, Serialize)]
pub struct VariantResult {
    /// Its name (`normalised`, `lockless`, ...).
    pub name: &'static str,
    /// What it does, in one line.
    pub what: &'static str,
    /// Whether the checker must find nothing (else it must catch it).
    pub safe: bool,
    /// Runs behind the figures (simulator runs and measurement rounds).
    pub runs: u64,
    /// The checker's violations over its runs.
    pub violations: u64,
    /// The first violations, described.
    pub details: Vec<String>,
    /// The metrics the thread argues about.
    pub metrics: Vec<Metric>,
}

impl VariantResult {
    /// Whether the variant came out as it must: clean if safe, caught if
    /// not.
    pub fn as_expected(&self) -> bool {
        if self.safe {
            self.violations == 0
        } else {
            self.violations > 0
        }
    }

    /// The value of metric `name`, if measured.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|m| m.name == name).map(|m| m.value)
    }
}

/// One experiment's results.
#[derive(Clone, Debug, Serialize)]
pub struct ExperimentResult {
    /// The seed thread (`000`..`004`).
    pub seed: &'static str,
    /// Its title.
    pub title: &'static str,
    /// The thread's question, in one paragraph.
    pub question: &'static str,
    /// The variants, side by side.
    pub variants: Vec<VariantResult>,
    /// The metric a plot compares across the variants.
    pub plot_metric: &'static str,
    /// What the figures say, written from them.
    pub verdict: String,
}

impl ExperimentResult {
    /// Whether every safe variant is clean and every unsafe one caught.
    pub fn passed(&self) -> bool {
        self.variants.iter().all(VariantResult::as_expected)
    }
}

/// The experiments by seed, in order.
pub const SEEDS: [&str; 5] = ["000", "001", "002", "003", "004"];

/// Runs experiment `seed` (`000` .. `004`) or every one (`all`).
pub fn run(which: &str, cfg: &ExperimentConfig) -> Result<Vec<ExperimentResult>, String> {
    let seeds: Vec<&str> = match which {
        "all" => SEEDS.to_vec(),
        s if SEEDS.contains(&s) => vec![s],
        s => {
            return Err(format!(
                "no experiment `{s}`: the seeds are {}, or all",
                SEEDS.join(", ")
            ));
        }
    };
    seeds
        .into_iter()
        .map(|s| match s {
            "000" => seed000::run(cfg),
            "001" => seed001::run(cfg),
            "002" => seed002::run(cfg),
            "003" => seed003::run(cfg),
            "004" => seed004::run(cfg),
            _ => unreachable!("listed in SEEDS"),
        })
        .collect()
}

/// A simulator run of `cfg`, as a variant sees it: its violations and
/// report, or the run's failure as one violation (a vCPU that failed is
/// the MMU's failure).
pub(crate) fn sim_run(cfg: &crate::run::RunConfig) -> (u64, Vec<String>, Option<crate::report::MmuRunReport>) {
    match crate::run::run(cfg, &|_| {}) {
        Ok(o) => (o.report.violations, o.report.violation_details.clone(), Some(o.report)),
        Err(e) => (1, vec![format!("the run failed: {e}")], None),
    }
}

/// The checker's runs behind a variant: `vmmu run --mmu tdp --nested
/// vms --host-churn --dirty-log` of the default workload under `policies`,
/// `cfg.seconds / 2` on each vendor. Their violations and details, and the
/// reports of the runs that finished.
pub(crate) fn nested_runs(
    cfg: &ExperimentConfig,
    vms: usize,
    policies: vmmu::vm::Policies,
) -> Result<(u64, Vec<String>, Vec<crate::report::MmuRunReport>), String> {
    let (mut violations, mut details, mut reports) = (0, Vec::new(), Vec::new());
    for vendor in [vmmu::arch::control::Vendor::Intel, vmmu::arch::control::Vendor::Amd] {
        let mut rc = default_run(cfg, vmmu::vm::MmuKind::Tdp, vendor, policies)?;
        rc.seconds = Some(cfg.seconds / 2.0);
        rc.nested = vms;
        rc.host_churn = true;
        rc.migrate = true;
        let (v, d, report) = sim_run(&rc);
        violations += v;
        details.extend(d);
        reports.extend(report);
    }
    Ok((violations, details, reports))
}

/// A `vmmu run` of the default workload on `mmu` (on `vendor`'s host)
/// with `cfg`'s seed under `policies`; the caller sets its length and
/// the rest.
pub(crate) fn default_run(
    cfg: &ExperimentConfig,
    mmu: vmmu::vm::MmuKind,
    vendor: vmmu::arch::control::Vendor,
    policies: vmmu::vm::Policies,
) -> Result<crate::run::RunConfig, String> {
    let workload = crate::workload::Workload::load("default").map_err(|e| e.to_string())?;
    let mut rc = crate::run::RunConfig::new(mmu, workload);
    rc.seed = cfg.seed;
    rc.workload.vm.vendor = vendor;
    rc.policies = policies;
    Ok(rc)
}

/// A metric.
pub(crate) fn metric(name: impl Into<String>, unit: &'static str, value: f64) -> Metric {
    Metric {
        name: name.into(),
        unit,
        value,
    }
}

/// Percentile `p` (0..=100) of sorted `v`.
pub(crate) fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}
