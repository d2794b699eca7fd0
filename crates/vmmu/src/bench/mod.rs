//! Benchmarks shared by `cargo bench` and `vmmu bench`. Each measures its
//! reference in the same run and reports the ratio, so results are
//! comparable across noisy machines.

pub mod walk;

use serde::Serialize;

/// One benchmark's result.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Benchmark name.
    pub bench: &'static str,
    /// MMU measured (`none` for the walker).
    pub mmu: &'static str,
    /// vCPU threads.
    pub vcpus: u32,
    /// Pages touched.
    pub pages: u64,
    /// Seconds measured (the benchmark itself, not the reference).
    pub seconds: f64,
    /// Nanoseconds per operation.
    pub per_op_ns: f64,
    /// Nanoseconds per operation of the reference.
    pub reference_ns: f64,
    /// `per_op_ns / reference_ns`.
    pub ratio: f64,
    /// What the reference is.
    pub reference: &'static str,
    /// The goal for `ratio`, if the issue sets one.
    pub goal_ratio: Option<f64>,
    /// Phases measured, each against its own reference (the top-level
    /// figures are the first phase's).
    pub phases: Vec<Phase>,
}

/// One phase of a benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    /// Phase name.
    pub phase: &'static str,
    /// Nanoseconds per operation.
    pub per_op_ns: f64,
    /// Nanoseconds per operation of the reference.
    pub reference_ns: f64,
    /// `per_op_ns / reference_ns`.
    pub ratio: f64,
}

/// Runs `f` `iters` times and returns the best of `rounds` rounds in
/// nanoseconds per iteration (best-of filters out scheduling noise).
pub fn best_ns_per_iter(rounds: u32, iters: u64, mut f: impl FnMut(u64) -> u64) -> (f64, f64, u64) {
    let mut best = f64::INFINITY;
    let mut total = 0.0;
    let mut sink = 0u64;
    for _ in 0..rounds {
        let start = std::time::Instant::now();
        sink = sink.wrapping_add(f(iters));
        let secs = start.elapsed().as_secs_f64();
        total += secs;
        best = best.min(secs * 1e9 / iters as f64);
    }
    (best, total, sink)
}
