//! `vmmu run` and `vmmu replay`: argument handling, the progress bar, the
//! report and the exit code over `vmmu::sim::run`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use vmmu::sim::checker::CheckLevel;
use vmmu::sim::guest::PagingFormat;
use vmmu::sim::machine::MmuKind;
use vmmu::sim::report::MmuRunReport;
use vmmu::sim::run::{Progress, RunConfig, RunError, RunOutcome};
use vmmu::sim::trace::Trace;
use vmmu::sim::workload::Workload;

use crate::report;

/// Which MMUs a run uses.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum RunMmu {
    /// The shadow MMU.
    Shadow,
    /// The TDP MMU.
    Tdp,
    /// Both, one after the other, reported side by side.
    Both,
}

impl RunMmu {
    fn kinds(self) -> Vec<MmuKind> {
        match self {
            RunMmu::Shadow => vec![MmuKind::Shadow],
            RunMmu::Tdp => vec![MmuKind::Tdp],
            RunMmu::Both => vec![MmuKind::Shadow, MmuKind::Tdp],
        }
    }
}

/// The checker's level.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Check {
    /// Every access; the OS's record against the tables after every operation.
    Full,
    /// One access in 16.
    Sample,
    /// Only the final audit and the migration compare.
    Off,
}

impl From<Check> for CheckLevel {
    fn from(c: Check) -> CheckLevel {
        match c {
            Check::Full => CheckLevel::Full,
            Check::Sample => CheckLevel::Sample,
            Check::Off => CheckLevel::Off,
        }
    }
}

fn parse_paging(s: &str) -> Result<PagingFormat, String> {
    PagingFormat::parse(s).ok_or_else(|| format!("{s:?} is not a paging mode (32-bit, pae, 4-level, 5-level)"))
}

/// `vmmu run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The MMU: shadow, tdp, or both side by side.
    #[arg(long, value_enum, default_value = "both")]
    mmu: RunMmu,
    /// vCPU threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    vcpus: u64,
    /// Guest RAM (a multiple of 2M, 16M..16G; at most 1G in 32-bit and PAE paging).
    #[arg(long, default_value = "128M", value_parser = crate::parse_size)]
    memory: u64,
    /// A named workload (default, populate, fork-storm, context-switch,
    /// mmap-churn, thp, dirty, pt-flood) or a workload TOML file.
    #[arg(long, default_value = "default")]
    workload: String,
    /// Guest operations over all vCPUs (default: the workload's).
    #[arg(long, conflicts_with = "seconds", value_parser = clap::value_parser!(u64).range(1..))]
    ops: Option<u64>,
    /// Run for this many seconds instead.
    #[arg(long)]
    seconds: Option<f64>,
    /// Seed of every choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The guest's paging mode: 32-bit, pae, 4-level, 5-level.
    #[arg(long, default_value = "4-level", value_parser = parse_paging)]
    paging: PagingFormat,
    /// Run the host churn thread (THP collapse/split, migration, swap, KSM, mprotect) and zap-all.
    #[arg(long)]
    host_churn: bool,
    /// Run live migrations with dirty logging.
    #[arg(long)]
    dirty_log: bool,
    /// The checker: full, sample or off.
    #[arg(long, value_enum, default_value = "full")]
    check: Check,
    /// Print one JSON object (an array with --mmu both) instead of the report.
    #[arg(long)]
    json: bool,
    /// Write the report, its JSON and plots (SVG) into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the run's operations to this trace file (with --mmu both, the first run's).
    #[arg(long)]
    record: Option<PathBuf>,
}

/// `vmmu replay`.
#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The trace (from `vmmu run --record`).
    file: PathBuf,
    /// The MMU: shadow, tdp, or both side by side.
    #[arg(long, value_enum, default_value = "both")]
    mmu: RunMmu,
    /// The checker: full, sample or off.
    #[arg(long, value_enum, default_value = "full")]
    check: Check,
    /// Print one JSON object (an array with --mmu both) instead of the report.
    #[arg(long)]
    json: bool,
    /// Write the report, its JSON and plots into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn bar(label: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = ProgressBar::new(1000);
    b.set_style(
        ProgressStyle::with_template("{prefix:>7} [{bar:40}] {percent:>3}% {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    b.set_prefix(label.to_string());
    Some(b)
}

fn exit_for(e: &RunError) -> ExitCode {
    match e {
        RunError::Config(_) | RunError::Setup(_) => ExitCode::from(2),
        RunError::Vcpu { .. } => ExitCode::from(1),
    }
}

/// `vmmu run`.
pub fn run(args: RunArgs) -> ExitCode {
    let workload = match Workload::load(&args.workload) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("vmmu run: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(s) = args.seconds
        && !(s.is_finite() && s > 0.0 && s <= 86_400.0)
    {
        eprintln!("vmmu run: --seconds {s} must be a positive number of seconds, at most 86400");
        return ExitCode::from(2);
    }
    let mut outcomes = Vec::new();
    for kind in args.mmu.kinds() {
        let cfg = RunConfig {
            workload: workload.clone(),
            paging: args.paging,
            vcpus: args.vcpus as usize,
            memory: args.memory,
            ops: args.ops,
            seconds: args.seconds,
            seed: args.seed,
            host_churn: args.host_churn,
            migrate: args.dirty_log,
            check: args.check.into(),
            record: args.record.is_some() && outcomes.is_empty(),
            ..RunConfig::new(kind, workload.clone())
        };
        let b = bar(kind.name());
        let progress = |p: Progress| {
            if let Some(b) = &b {
                b.set_position((p.fraction * 1000.0) as u64);
                b.set_message(format!("{} accesses, {} violations", p.accesses, p.violations));
            }
        };
        let r = vmmu::sim::run::run(&cfg, &progress);
        if let Some(b) = b {
            b.finish_and_clear();
        }
        match r {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                eprintln!("vmmu run ({} MMU): {e}", kind.name());
                return exit_for(&e);
            }
        }
    }
    if let (Some(path), Some(t)) = (&args.record, outcomes.first().and_then(|o| o.trace.as_ref())) {
        if let Err(e) = std::fs::write(path, t.to_text()) {
            eprintln!("vmmu run: cannot write the trace {}: {e}", path.display());
            return ExitCode::from(2);
        }
        if !args.json {
            eprintln!(
                "recorded the {} run's {} operations to {}",
                outcomes[0].report.mmu,
                t.ops.len(),
                path.display()
            );
        }
    }
    finish(outcomes, args.json, args.report.as_deref())
}

/// `vmmu replay`.
pub fn replay(args: ReplayArgs) -> ExitCode {
    let text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vmmu replay: cannot read {}: {e}", args.file.display());
            return ExitCode::from(2);
        }
    };
    let trace = match Trace::parse(&text, &args.file.display().to_string()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vmmu replay: {e}");
            return ExitCode::from(2);
        }
    };
    let mut outcomes = Vec::new();
    for kind in args.mmu.kinds() {
        match vmmu::sim::run::replay(&trace, kind, args.check.into()) {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                eprintln!("vmmu replay ({} MMU): {e}", kind.name());
                return exit_for(&e);
            }
        }
    }
    finish(outcomes, args.json, args.report.as_deref())
}

/// Prints the report (or JSON), writes the report directory and the
/// trace of a failing run, and picks the exit code.
fn finish(outcomes: Vec<RunOutcome>, json: bool, dir: Option<&Path>) -> ExitCode {
    let reports: Vec<MmuRunReport> = outcomes.iter().map(|o| o.report.clone()).collect();
    let violations: u64 = reports.iter().map(|r| r.violations).sum();
    let mut text = report::table(&reports);
    for r in &reports {
        for d in &r.violation_details {
            text.push_str(&format!("violation ({} MMU): {d}\n", r.mmu));
        }
    }
    // A failing run leaves its trace beside the report (or here).
    for o in &outcomes {
        if o.report.violations == 0 {
            continue;
        }
        if let Some(t) = &o.trace {
            let name = format!("vmmu-violation-{}.trace", o.report.mmu);
            let path = dir.map_or_else(|| PathBuf::from(&name), |d| d.join(&name));
            if let Some(d) = dir {
                let _ = std::fs::create_dir_all(d);
            }
            match std::fs::write(&path, t.to_text()) {
                Ok(()) => text.push_str(&format!(
                    "the {} run's operations are in {} (replay: vmmu replay {} --mmu {})\n",
                    o.report.mmu,
                    path.display(),
                    path.display(),
                    o.report.mmu
                )),
                Err(e) => eprintln!("vmmu: cannot write the trace {}: {e}", path.display()),
            }
        }
    }
    text.push_str(&format!("check: {violations} violations\n"));
    if json {
        println!("{}", report::json(&reports));
    } else {
        print!("{text}");
    }
    if let Some(d) = dir {
        match report::write_dir(d, &reports, &text) {
            Ok(paths) if !json => {
                eprintln!(
                    "wrote {}",
                    paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("vmmu: cannot write the report into {}: {e}", d.display());
                return ExitCode::from(2);
            }
        }
    }
    if violations > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
