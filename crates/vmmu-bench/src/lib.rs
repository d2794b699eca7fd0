//! Benchmarks shared by `cargo bench` and `vmmu bench`. Each measures its
//! reference in the same run and reports the ratio, so results are
//! comparable across noisy machines.

#![warn(missing_docs)]

pub mod nested;
pub mod registry;
pub mod shadow;
pub mod tdp;
pub mod tlb;
pub mod walk;

pub use registry::{Benchmark, Mmus};
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
    /// figures are the first phase's: the benchmark's headline, which is
    /// not always the first in time).
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

impl Phase {
    /// A phase of `per_op_ns` against `reference_ns`, with their ratio.
    pub fn new(phase: &'static str, per_op_ns: f64, reference_ns: f64) -> Phase {
        Phase {
            phase,
            per_op_ns,
            reference_ns,
            ratio: per_op_ns / reference_ns,
        }
    }
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

/// A benchmark's result with what does not fit [`BenchResult`]: figures in
/// other units, how the run was set up. Serializes flat (the
/// [`BenchResult`] fields first), so every consumer of `BenchResult` JSON
/// reads it unchanged.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The contract fields.
    #[serde(flatten)]
    pub result: BenchResult,
    /// Host memory backing (`anon`, `thp`, ...), for benchmarks on guest memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing: Option<&'static str>,
    /// Figures in other units (per GiB, pages per second, scaling).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub figures: Vec<Figure>,
    /// How the run was set up, what is and is not timed, caveats.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl From<BenchResult> for Report {
    fn from(result: BenchResult) -> Report {
        Report {
            result,
            backing: None,
            figures: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// One figure a benchmark reports besides its phases.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// What it is (e.g. `get`, `2-thread scaling`).
    pub name: String,
    /// Its unit (e.g. `ms/GiB`, `pages/s/thread`, `x`).
    pub unit: &'static str,
    /// The value measured.
    pub value: f64,
    /// The reference's value in the same unit, if there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<f64>,
    /// The goal, as the issue states it (e.g. `>= 1.7`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goal: Option<&'static str>,
}
