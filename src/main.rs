//! `vmmu`: the command line. A thin layer over the library: argument
//! parsing, output formatting and exit codes; every decision lives below.
//!
//! Exit codes, for every command: 0 success; 1 the run worked but found a
//! failure; 2 bad usage or bad input.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use vmmu::conform::{self, Replayer};

#[derive(Parser)]
#[command(
    name = "vmmu",
    version,
    about = "x86 memory virtualization the way KVM does it, in user space"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay x86 paging conformance cases and compare with the recorded results.
    Conform(ConformArgs),
    /// Run a benchmark against its reference, measured in the same run.
    Bench(BenchArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConformMmu {
    /// The guest page-table walker alone (a fresh walk at every access).
    Walker,
    /// A one-vCPU VM on the TDP MMU: TLB, two-dimensional walk, EPT exits.
    Tdp,
}

#[derive(clap::Args)]
struct ConformArgs {
    /// The path under test.
    #[arg(long, value_enum, default_value = "walker")]
    mmu: ConformMmu,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Failing cases to print.
    #[arg(long, default_value_t = 20)]
    max_failures: usize,
    /// Case files (JSON lines, single-access or multi-step).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BenchName {
    /// 4-level guest walks against four dependent loads.
    Walk,
    /// Every benchmark.
    All,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum)]
    name: BenchName,
    /// Operations per measured round.
    #[arg(short = 'i', long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    iterations: u64,
    /// Print one JSON object per benchmark instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Conform(args) => run_conform(args),
        Command::Bench(args) => run_bench(args),
    }
}

fn run_conform(args: ConformArgs) -> ExitCode {
    // Parse every file before replaying anything: a malformed file is bad
    // input (exit 2), never a partial result.
    let mut files = Vec::new();
    for path in &args.files {
        match conform::read_cases(path) {
            Ok(cases) => files.push((path.display().to_string(), cases)),
            Err(e) => {
                eprintln!("vmmu conform: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let mut replayer: Box<dyn Replayer> = match args.mmu {
        ConformMmu::Walker => Box::new(conform::WalkerReplayer),
        ConformMmu::Tdp => Box::new(conform::TdpReplayer),
    };
    let mut total = conform::Report::default();
    let mut per_file = Vec::new();
    let mut failures = Vec::new();
    for (file, cases) in &files {
        let mut report = conform::Report::default();
        conform::run_cases(replayer.as_mut(), cases, &mut report);
        total.passed += report.passed;
        total.failed += report.failed;
        per_file.push(serde_json::json!({"file": file, "passed": report.passed, "failed": report.failed}));
        failures.extend(report.failures.into_iter().map(|f| (file.clone(), f)));
    }
    if args.json {
        let failures: Vec<_> = failures
            .iter()
            .take(args.max_failures)
            .map(|(file, f)| serde_json::json!({"id": f.id, "file": file, "expected": f.expected, "got": f.got}))
            .collect();
        let out = serde_json::json!({
            "passed": total.passed,
            "failed": total.failed,
            "mmu": replayer.name(),
            "failures": failures,
            "files": per_file,
        });
        println!("{out}");
    } else {
        for (file, f) in failures.iter().take(args.max_failures) {
            println!("FAIL {file} id {}: expected {}, got {}", f.id, f.expected, f.got);
        }
        if failures.len() > args.max_failures {
            println!("... {} more failures not shown", failures.len() - args.max_failures);
        }
        if files.len() > 1 {
            for f in &per_file {
                println!(
                    "{}: {} passed, {} failed",
                    f["file"].as_str().unwrap_or(""),
                    f["passed"],
                    f["failed"]
                );
            }
        }
        println!("{} passed, {} failed", total.passed, total.failed);
    }
    if total.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn run_bench(args: BenchArgs) -> ExitCode {
    let mut results = Vec::new();
    if matches!(args.name, BenchName::Walk | BenchName::All) {
        results.push(vmmu::bench::walk::run(args.iterations));
    }
    if args.json {
        for r in &results {
            match serde_json::to_string(r) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("vmmu bench: cannot encode the result: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    } else {
        println!(
            "{:<22} {:>6} {:>12} {:>14} {:>8} {:>6}  reference",
            "bench", "mmu", "per_op_ns", "reference_ns", "ratio", "goal"
        );
        for r in &results {
            for p in &r.phases {
                println!(
                    "{:<22} {:>6} {:>12.2} {:>14.2} {:>8.2} {:>6}  {}",
                    format!("{}/{}", r.bench, p.phase),
                    r.mmu,
                    p.per_op_ns,
                    p.reference_ns,
                    p.ratio,
                    r.goal_ratio.map(|g| format!("<={g}")).unwrap_or_default(),
                    r.reference
                );
            }
        }
    }
    ExitCode::SUCCESS
}
