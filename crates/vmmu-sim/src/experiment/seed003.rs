//! Seed 003 (zap only obsolete roots): when a root is zapped, KVM asks
//! every vCPU to act. Before the thread the request was
//! `KVM_REQ_MMU_RELOAD`: every vCPU unloaded every root it held, current
//! and cached, valid or not; the thread makes it
//! `KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`: only the obsolete ones go. Its
//! comment adds a rule for the fast zap: no yield between invalidating
//! the TDP MMU's roots and the request.
//!
//! Variants: the two requests ([`ZapRequest`], both safe; the metric is
//! what each makes the vCPUs redo: roots reloaded, cached roots dropped,
//! `prev_roots` hits, shadow pages rebuilt, exits), measured where roots
//! are zapped one at a time: the shadow MMU under a guest that ends
//! processes, and the nested MMU under an L1 that recycles its L2s' tables.
//! Then the fast zap's order ([`ZapAllFastOrder`]) on TDP VMs whose VMM
//! zaps everything while vCPUs run: one critical section (KVM), a yield
//! after invalidating (safe here, and why: the answer to the thread's "who
//! could grab a reference?"), and a yield after the request (unsafe: a
//! vCPU answers the request before its root is invalid, keeps it, and is
//! never asked again). Metrics there: the caller's latency, faults
//! retried, roots reloaded; the checker's violations.

use vmmu::arch::control::Vendor;
use vmmu::mmu::ZapRequest;
use vmmu::mmu::tdp::ZapAllFastOrder;
use vmmu::vm::{MmuKind, Policies};

use super::{ExperimentConfig, ExperimentResult, Metric, VariantResult, default_run, metric, sim_run};
use crate::report::MmuRunReport;
use crate::run::RunConfig;

/// Guest operations of each run of the request pair (about a second's
/// worth per `--seconds` on 2 cores, split over the runs): the same work
/// for both requests, so their counts compare one to one.
const OPS_PER_SECOND: f64 = 2500.0;

/// L2 VMs of the nested runs.
const L2_VMS: usize = 3;

/// What a variant's runs added up to.
#[derive(Default)]
struct Totals {
    violations: u64,
    details: Vec<String>,
    runs: u64,
    reports: Vec<MmuRunReport>,
}

impl Totals {
    fn add(&mut self, rc: &RunConfig) {
        let (v, d, r) = sim_run(rc);
        self.violations += v;
        self.details.extend(d.into_iter().take(3));
        self.runs += 1;
        self.reports.extend(r);
    }

    fn sum(&self, f: impl Fn(&MmuRunReport) -> f64) -> f64 {
        self.reports.iter().map(f).sum()
    }
}

/// The runs where roots are zapped one at a time: the shadow MMU under the
/// default workload (processes end, their top-level tables are freed and
/// reused), and a TDP VM whose L1 runs [`L2_VMS`] L2 VMs on each vendor.
fn root_zap_runs(cfg: &ExperimentConfig, policies: Policies, t: &mut Totals) -> Result<(), String> {
    let ops = ((cfg.seconds * OPS_PER_SECOND / 3.0) as u64).max(200);
    let mut rc = default_run(cfg, MmuKind::Shadow, Vendor::Intel, policies)?;
    rc.ops = Some(ops);
    t.add(&rc);
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let mut rc = default_run(cfg, MmuKind::Tdp, vendor, policies)?;
        rc.ops = Some(ops);
        rc.nested = L2_VMS;
        t.add(&rc);
    }
    Ok(())
}

/// Seconds of each zap-all run at the least: the VMM zaps every 400 ms,
/// and each zap is one chance for a vCPU to answer inside its window.
const ZAP_RUN_MIN_SECONDS: f64 = 1.3;

/// TDP runs whose VMM zaps everything every 400 ms while the vCPUs run
/// (`--host-churn`), `cfg.seconds / 2` on each vendor (at least
/// [`ZAP_RUN_MIN_SECONDS`]).
fn zap_all_runs(cfg: &ExperimentConfig, policies: Policies, t: &mut Totals) -> Result<(), String> {
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let mut rc = default_run(cfg, MmuKind::Tdp, vendor, policies)?;
        rc.seconds = Some((cfg.seconds / 2.0).max(ZAP_RUN_MIN_SECONDS));
        rc.host_churn = true;
        t.add(&rc);
    }
    Ok(())
}

/// The request pair's metrics over the root-zap runs (shadow and nested
/// MMUs together: both answer a zapped root the same way).
fn request_metrics(t: &Totals) -> Vec<Metric> {
    let nested_or_own = |r: &MmuRunReport| r.nested.as_ref().map_or(r.stats, |n| n.stats);
    let hits = t.sum(|r| nested_or_own(r).prev_roots_hit as f64);
    let misses = t.sum(|r| nested_or_own(r).prev_roots_miss as f64);
    let ops = t.sum(|r| r.operations as f64).max(1.0);
    let accesses = t.sum(|r| r.accesses as f64).max(1.0);
    vec![
        metric(
            "shadow pages zapped",
            "pages",
            t.sum(|r| nested_or_own(r).mmu_shadow_zapped as f64),
        ),
        metric("current roots reloaded", "roots", t.sum(|r| r.root_reloads as f64)),
        metric(
            "cached roots dropped",
            "roots",
            t.sum(|r| r.cached_roots_dropped as f64),
        ),
        metric("prev_roots hit rate", "%", 100.0 * hits / (hits + misses).max(1.0)),
        metric(
            "shadow pages built per 1k operations",
            "pages",
            1000.0 * t.sum(|r| nested_or_own(r).mmu_cache_miss as f64) / ops,
        ),
        metric(
            "exits per 1M accesses",
            "exits",
            1e6 * t.sum(|r| r.exits as f64) / accesses,
        ),
    ]
}

/// The fast zap's metrics over the zap-all runs.
fn zap_all_metrics(t: &Totals) -> Vec<Metric> {
    let n = t.reports.len().max(1) as f64;
    vec![
        metric("zaps of everything", "zaps", t.sum(|r| r.zaps as f64)),
        metric("zap latency for the caller, p50", "us", t.sum(|r| r.zap_p50_us) / n),
        metric(
            "zap latency for the caller, max",
            "us",
            t.reports.iter().map(|r| r.zap_max_us).fold(0.0, f64::max),
        ),
        metric(
            "TDP roots reloaded (zap-all runs)",
            "roots",
            t.sum(|r| r.root_reloads as f64),
        ),
        metric(
            "faults retried (zap-all runs)",
            "faults",
            t.sum(|r| r.stats.pf_retry as f64),
        ),
    ]
}

/// Runs the experiment.
pub fn run(cfg: &ExperimentConfig) -> Result<ExperimentResult, String> {
    let mut variants = Vec::new();
    for (name, what, safe, request, order) in [
        (
            "free obsolete",
            "vCPUs drop only obsolete roots, current or cached (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, the patch)",
            true,
            ZapRequest::FreeObsolete,
            ZapAllFastOrder::OneCriticalSection,
        ),
        (
            "reload all",
            "vCPUs drop every root they hold, valid or not (KVM_REQ_MMU_RELOAD, before the patch)",
            true,
            ZapRequest::ReloadAll,
            ZapAllFastOrder::OneCriticalSection,
        ),
        (
            "invalidate, yield, request",
            "the fast zap drops mmu_lock for a yield between invalidating the TDP roots and the request",
            true,
            ZapRequest::FreeObsolete,
            ZapAllFastOrder::InvalidateYieldRequest,
        ),
        (
            "request, yield, invalidate",
            "the request first, a yield, then the roots invalidated: a vCPU answers before its root is invalid and keeps it",
            false,
            ZapRequest::FreeObsolete,
            ZapAllFastOrder::RequestYieldInvalidate,
        ),
    ] {
        let policies = Policies {
            zap_request: request,
            zap_all_fast_order: order,
            ..Policies::default()
        };
        let mut metrics = Vec::new();
        let mut t = Totals::default();
        // The request pair on roots zapped one at a time; the order of the
        // fast zap matters only to the TDP MMU's zap of everything.
        if order == ZapAllFastOrder::OneCriticalSection {
            root_zap_runs(cfg, policies, &mut t)?;
            metrics.extend(request_metrics(&t));
        }
        let mut z = Totals::default();
        zap_all_runs(cfg, policies, &mut z)?;
        metrics.extend(zap_all_metrics(&z));
        variants.push(VariantResult {
            name,
            what,
            safe,
            runs: t.runs + z.runs,
            violations: t.violations + z.violations,
            details: t.details.into_iter().chain(z.details).take(3).collect(),
            metrics,
        });
    }
    let get = |v: &VariantResult, m: &str| v.metric(m).unwrap_or(0.0);
    let (f, a, iy, ry) = (&variants[0], &variants[1], &variants[2], &variants[3]);
    let verdict = format!(
        "Over the same guest operations, with roots zapped one at a time ({:.0} and {:.0} shadow pages zapped, roots among them): freeing only obsolete roots, the vCPUs reloaded {:.0} current roots and dropped {:.0} cached ones, prev_roots hit {:.1}% of switches and {:.1} shadow pages were built per 1k operations; reloading everything, {:.0}, {:.0}, {:.1}% and {:.1} (the shadow pages built are dominated by what the guest's own writes zap, so they differ by less than the roots do). The fast zap's caller waits {:.0} us (p50) in one critical section; with a yield between invalidation and request, {:.0} us, and still no violation ({}): here a reference is taken only to a root seen valid under the root list's lock and a fault checks its root under mmu_lock, so in the window nobody gets into an invalid root, and a vCPU that faults there retries until the request comes ({:.0} faults retried against {:.0}: the window's retries are lost among the host churn's). With the request before the yield and the invalidation after it, the checker found {} violation(s){}: a vCPU answered the request while its root was still valid, kept it, and nothing asked it again.",
        get(f, "shadow pages zapped"),
        get(a, "shadow pages zapped"),
        get(f, "current roots reloaded"),
        get(f, "cached roots dropped"),
        get(f, "prev_roots hit rate"),
        get(f, "shadow pages built per 1k operations"),
        get(a, "current roots reloaded"),
        get(a, "cached roots dropped"),
        get(a, "prev_roots hit rate"),
        get(a, "shadow pages built per 1k operations"),
        get(f, "zap latency for the caller, p50"),
        get(iy, "zap latency for the caller, p50"),
        iy.violations,
        get(iy, "faults retried (zap-all runs)"),
        get(f, "faults retried (zap-all runs)"),
        ry.violations,
        ry.details.first().map_or(String::new(), |d| format!(
            ", the first: {}",
            d.chars().take(200).collect::<String>()
        )),
    );
    Ok(ExperimentResult {
        seed: "003",
        title: "zap only obsolete roots: what vCPUs drop, and no yield before the request",
        question: "When a root shadow page is zapped, KVM asks every vCPU to act. KVM_REQ_MMU_RELOAD made each unload all its roots, current and cached, though only the zapped ones were obsolete; the patch sends KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, which frees only those. Its comment on the fast zap adds that the TDP MMU's roots must be invalidated in the same mmu_lock critical section as the request, with no yield between, \"otherwise somebody could grab a reference to the root\"; Paolo asks who could. The questions: what the old request cost the vCPUs, and which yield breaks what.",
        variants,
        plot_metric: "cached roots dropped",
        verdict,
    })
}
