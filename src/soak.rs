//! `vmmu soak`: simulator runs back to back for as long as asked, each with
//! a configuration, a paging mode and a workload drawn from its seed, with
//! host churn and live migrations, under the full checker; the totals per
//! MMU and per dirty-logging mode, and every violation with the command
//! that repeats its run.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use serde::Serialize;
use vmmu::vm::MmuKind;
use vmmu_sim::checker::CheckLevel;
use vmmu_sim::run::RunConfig;
use vmmu_sim::workload::{NAMED, Workload};

use crate::run::RunMmu;

/// `vmmu soak`.
#[derive(clap::Args)]
pub struct SoakArgs {
    /// The MMU: shadow, tdp, or both (one after the other, each for
    /// --seconds).
    #[arg(long, value_enum, default_value = "both")]
    mmu: RunMmu,
    /// Seconds per MMU (at most a week).
    #[arg(long, default_value = "600", allow_hyphen_values = true, value_parser = parse_seconds)]
    seconds: f64,
    /// Seconds per run: each run draws a new configuration (at most an hour).
    #[arg(long, default_value = "20", allow_hyphen_values = true, value_parser = parse_run_seconds)]
    run_seconds: f64,
    /// vCPU threads per run.
    #[arg(long, default_value_t = 2, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..=64))]
    vcpus: u64,
    /// Guest RAM per run (a multiple of 2M, 16M..1G: every paging mode
    /// must fit it).
    #[arg(long, default_value = "64M", allow_negative_numbers = true, value_parser = crate::parse_size)]
    memory: u64,
    /// The first run's seed; each run takes the next.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    first_seed: u64,
    /// Where a failing run's operations go, as a trace for `vmmu replay`
    /// (`vmmu-soak-<mmu>-seed<N>.trace`) [default: the current directory].
    #[arg(long, value_name = "DIR")]
    traces: Option<std::path::PathBuf>,
    /// Print one JSON object instead of the tables.
    #[arg(long)]
    json: bool,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    crate::input::parse_seconds(s, 7.0 * 86_400.0)
}

fn parse_run_seconds(s: &str) -> Result<f64, String> {
    crate::input::parse_seconds(s, 3600.0)
}

/// Totals over runs.
#[derive(Clone, Debug, Default, Serialize)]
struct Totals {
    runs: u64,
    seconds: f64,
    accesses: u64,
    operations: u64,
    host_operations: u64,
    migrations: u64,
    pages_compared: u64,
    violations: u64,
}

impl Totals {
    fn add(&mut self, r: &vmmu_sim::report::MmuRunReport) {
        self.runs += 1;
        self.seconds += r.seconds;
        self.accesses += r.accesses;
        self.operations += r.operations;
        self.host_operations += r.host_operations;
        if let Some(m) = &r.migration {
            self.migrations += m.migrations;
            self.pages_compared += m.bytes_compared / 4096;
        }
        self.violations += r.violations;
    }
}

/// One MMU's soak.
#[derive(Debug, Default, Serialize)]
struct MmuSoak {
    mmu: &'static str,
    totals: Totals,
    /// By dirty-logging mode (`wp+manual/noad`, `ring4096/ad`, ...).
    by_dirty_log: BTreeMap<String, Totals>,
    /// By paging mode.
    by_paging: BTreeMap<String, Totals>,
    /// By workload.
    by_workload: BTreeMap<String, Totals>,
    /// By guest: the VM's own OS, or an L1 hypervisor's N L2 VMs
    /// (`--nested N`, drawn for a quarter of the TDP seeds).
    by_guest: BTreeMap<String, Totals>,
    /// Runs that found violations: the command that repeats each, and its
    /// first violations.
    failures: Vec<Failure>,
}

#[derive(Debug, Serialize)]
struct Failure {
    command: String,
    /// The run's operations, for `vmmu replay`.
    trace: Option<String>,
    violations: Vec<String>,
}

/// `vmmu soak`.
pub fn run(args: SoakArgs) -> ExitCode {
    if args.memory < (16 << 20) || !args.memory.is_multiple_of(2 << 20) || args.memory > (1 << 30) {
        eprintln!(
            "vmmu soak: --memory {}: must be a multiple of 2M from 16M to 1G (every paging mode a run may draw must fit it)",
            args.memory
        );
        return ExitCode::from(2);
    }
    if args.run_seconds > args.seconds {
        eprintln!(
            "vmmu soak: --run-seconds {} is longer than --seconds {}: no run would fit",
            args.run_seconds, args.seconds
        );
        return ExitCode::from(2);
    }
    let traces = args.traces.clone().unwrap_or_else(|| std::path::PathBuf::from("."));
    if let Err(e) = crate::input::check_writable_dir(&traces, "--traces") {
        eprintln!("vmmu soak: {e}");
        return ExitCode::from(2);
    }
    let tty = std::io::stderr().is_terminal();
    let mut seed = args.first_seed;
    let mut soaks = Vec::new();
    for kind in args.mmu.kinds() {
        let mut s = MmuSoak {
            mmu: kind.name(),
            ..MmuSoak::default()
        };
        let start = Instant::now();
        loop {
            let left = args.seconds - start.elapsed().as_secs_f64();
            if left < args.run_seconds.min(1.0) {
                break;
            }
            match soak_run(&args, kind, seed, args.run_seconds.min(left)) {
                Ok(outcome) => {
                    let r = &outcome.report;
                    s.totals.add(r);
                    s.by_dirty_log.entry(outcome.dirty_log.clone()).or_default().add(r);
                    s.by_paging.entry(r.paging.clone()).or_default().add(r);
                    s.by_workload.entry(r.workload.clone()).or_default().add(r);
                    let guest = r.nested.as_ref().map_or_else(
                        || "single-level".to_string(),
                        |n| format!("nested {} x {} MiB ({})", n.vms, n.vm_memory >> 20, n.vendor),
                    );
                    s.by_guest.entry(guest).or_default().add(r);
                    if r.violations > 0 {
                        let trace = outcome.trace.as_ref().and_then(|t| {
                            let path = traces.join(format!("vmmu-soak-{}-seed{seed}.trace", kind.name()));
                            let _ = std::fs::create_dir_all(&traces);
                            match std::fs::write(&path, t.to_text()) {
                                Ok(()) => Some(path.display().to_string()),
                                Err(e) => {
                                    eprintln!("vmmu soak: cannot write the trace {}: {e}", path.display());
                                    None
                                }
                            }
                        });
                        let f = Failure {
                            command: outcome.command.clone(),
                            trace,
                            violations: r.violation_details.clone(),
                        };
                        if !args.json {
                            eprintln!("{}violation: {}", if tty { "\n" } else { "" }, f.command);
                            if let Some(t) = &f.trace {
                                eprintln!("  the run's operations: {t} (vmmu replay {t} --mmu {})", kind.name());
                            }
                            for v in &f.violations {
                                eprintln!("  {v}");
                            }
                        }
                        s.failures.push(f);
                    }
                }
                Err(e) => {
                    // A run that cannot be done (it does not boot in this
                    // configuration) is a failure of the soak too.
                    let command = command(kind, seed, &args, args.run_seconds.min(left), "default");
                    eprintln!("vmmu soak: {command}: {e}");
                    s.totals.violations += 1;
                    s.failures.push(Failure {
                        command,
                        trace: None,
                        violations: vec![e],
                    });
                }
            }
            if tty {
                eprint!(
                    "\r{:>6}: {:>4.0}/{:.0} s, {} runs, {} accesses, {} migrations, {} violations   ",
                    kind.name(),
                    start.elapsed().as_secs_f64(),
                    args.seconds,
                    s.totals.runs,
                    s.totals.accesses,
                    s.totals.migrations,
                    s.totals.violations
                );
            }
            seed += 1;
        }
        if tty {
            eprintln!();
        }
        soaks.push(s);
    }
    let violations: u64 = soaks.iter().map(|s| s.totals.violations).sum();
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "mmus": soaks, "violations": violations, "first_seed": args.first_seed, "last_seed": seed.saturating_sub(1) })
        );
    } else {
        print!("{}", tables(&soaks));
        println!("check: {violations} violations");
    }
    if violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

struct SoakOutcome {
    report: vmmu_sim::report::MmuRunReport,
    trace: Option<vmmu_sim::trace::Trace>,
    dirty_log: String,
    command: String,
}

/// The `vmmu run` command that repeats a soak run (the configuration and
/// the paging mode are drawn from the seed by `--config random`).
fn command(kind: MmuKind, seed: u64, args: &SoakArgs, seconds: f64, workload: &str) -> String {
    format!(
        "vmmu run --mmu {} --config random --seed {seed} --workload {workload} --vcpus {} --memory {}M --seconds {seconds:.0} --host-churn --dirty-log",
        kind.name(),
        args.vcpus,
        args.memory >> 20
    )
}

/// One run: configuration, paging mode and workload drawn from `seed`.
fn soak_run(args: &SoakArgs, kind: MmuKind, seed: u64, seconds: f64) -> Result<SoakOutcome, String> {
    let (vm, paging) = vmmu_sim::config::from_seed(seed, Some(kind));
    let (name, _) = NAMED[(seed % NAMED.len() as u64) as usize];
    let workload = Workload::load(name).map_err(|e| e.to_string())?;
    let workload = Workload { vm, ..workload };
    let cfg = RunConfig {
        paging,
        vcpus: args.vcpus as usize,
        memory: args.memory,
        seconds: Some(seconds.max(1.0)),
        seed,
        host_churn: true,
        migrate: true,
        check: CheckLevel::Full,
        nested: vmmu_sim::config::nested_from_seed(seed, Some(kind), &vm, args.memory),
        policies: vmmu_sim::config::policies_from_seed(seed),
        ..RunConfig::new(kind, workload)
    };
    let outcome = vmmu_sim::run::run(&cfg, &|_| {}).map_err(|e| e.to_string())?;
    Ok(SoakOutcome {
        report: outcome.report,
        trace: outcome.trace,
        dirty_log: vm.dirty_log_name(kind),
        command: command(kind, seed, args, seconds.max(1.0), name),
    })
}

fn tables(soaks: &[MmuSoak]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let header = |s: &mut String, what: &str| {
        let _ = writeln!(
            s,
            "{:<6}  {:<22}  {:>5}  {:>7}  {:>13}  {:>10}  {:>9}  {:>10}  {:>14}  {:>10}",
            "mmu",
            what,
            "runs",
            "seconds",
            "accesses",
            "operations",
            "host ops",
            "migrations",
            "pages compared",
            "violations"
        );
    };
    let row = |s: &mut String, mmu: &str, what: &str, t: &Totals| {
        let _ = writeln!(
            s,
            "{:<6}  {:<22}  {:>5}  {:>7.0}  {:>13}  {:>10}  {:>9}  {:>10}  {:>14}  {:>10}",
            mmu,
            what,
            t.runs,
            t.seconds,
            t.accesses,
            t.operations,
            t.host_operations,
            t.migrations,
            t.pages_compared,
            t.violations
        );
    };
    header(&mut s, "");
    for m in soaks {
        row(&mut s, m.mmu, "all runs", &m.totals);
    }
    for (title, pick) in [
        (
            "dirty log",
            (|m: &MmuSoak| &m.by_dirty_log) as fn(&MmuSoak) -> &BTreeMap<String, Totals>,
        ),
        ("paging", |m| &m.by_paging),
        ("workload", |m| &m.by_workload),
        ("guest", |m| &m.by_guest),
    ] {
        s.push('\n');
        header(&mut s, title);
        for m in soaks {
            for (k, t) in pick(m) {
                row(&mut s, m.mmu, k, t);
            }
        }
    }
    s
}
