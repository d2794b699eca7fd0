//! `vmmu migrate`: the live-migration checker over every dirty-log
//! configuration (`vmmu_sim::migration`), for a number of seeds or for as
//! long as asked; a table (or JSON) of what each configuration did and the
//! pages it lost.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vmmu::vm::config::VmConfig;
use vmmu_sim::migration::{MatrixRow, MatrixSpec, names, run_matrix};

use crate::run::{RunMmu, Switch};

/// `vmmu migrate`.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The MMU: shadow, tdp, or both.
    #[arg(long, value_enum, default_value = "both")]
    mmu: RunMmu,
    /// Seeds per configuration (a pass of the matrix).
    #[arg(long, default_value_t = 16, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    first_seed: u64,
    /// Operations per run (guest accesses, host churn, migrations).
    #[arg(long, default_value_t = 6000, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    ops: u64,
    /// Keep running passes of the matrix, with new seeds, for this many
    /// seconds (at most a week); --seeds is then the seeds of one pass.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_seconds)]
    seconds: Option<f64>,
    /// Only this dirty-log configuration (repeatable), by its name in the
    /// table, e.g. `wp+manual+init/noad`, `dbit/ad`, `ring128/noad`, `wp+manual`
    /// (shadow) [default: all].
    #[arg(long, value_name = "NAME")]
    log: Vec<String>,
    /// The NX huge page mitigation (instruction fetches split huge pages) [default: off].
    #[arg(long, value_enum)]
    nx_huge_pages: Option<Switch>,
    /// Eager page splitting [default: on].
    #[arg(long, value_enum)]
    eager_split: Option<Switch>,
    /// The largest TDP leaf: 4K, 2M or 1G [default: 1G].
    #[arg(long, value_name = "SIZE", value_parser = vmmu::vm::config::parse_page_size)]
    max_page_size: Option<u64>,
    /// EPT levels: 4 or 5 [default: 4].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(u8).range(4..=5))]
    ept_levels: Option<u8>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    crate::input::parse_seconds(s, 7.0 * 86_400.0)
}

/// `vmmu migrate`.
pub fn run(args: MigrateArgs) -> ExitCode {
    let mut base = VmConfig {
        // One thread runs everything: the program recovers NX pages never
        // (the worker's own thread would make a run unrepeatable).
        nx_recovery_ratio: 0,
        ..VmConfig::default()
    };
    if let Some(s) = args.nx_huge_pages {
        base.nx_huge_pages = s == Switch::On;
    }
    if let Some(s) = args.eager_split {
        base.eager_split = s == Switch::On;
    }
    if let Some(v) = args.max_page_size {
        base.max_page_size = v;
    }
    if let Some(v) = args.ept_levels {
        base.ept_levels = v;
    }
    let kinds = args.mmu.kinds();
    let known: Vec<String> = kinds.iter().flat_map(|&k| names(k)).collect();
    for l in &args.log {
        if !known.contains(l) {
            eprintln!(
                "vmmu migrate: --log {l}: no such dirty-log configuration for --mmu {}; the configurations are: {}",
                clap::ValueEnum::to_possible_value(&args.mmu).map_or_else(String::new, |v| v.get_name().to_string()),
                known.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    let start = Instant::now();
    let deadline = args.seconds.map(|s| start + Duration::from_secs_f64(s));
    let tty = std::io::stderr().is_terminal();
    let mut rows: Vec<MatrixRow> = Vec::new();
    let mut first = args.first_seed;
    loop {
        let progress = |row: &MatrixRow, seed: u64| {
            if tty {
                eprint!(
                    "\r{:>6} {:<20} seed {seed:<8} migrations {:<6} lost {:<4} ({:.0} s)   ",
                    row.mmu,
                    row.name,
                    row.tally.migrations,
                    row.tally.pages_lost,
                    start.elapsed().as_secs_f64()
                );
            }
        };
        let spec = MatrixSpec {
            mmus: kinds.clone(),
            base,
            only: args.log.clone(),
            first_seed: first,
            seeds: args.seeds,
            ops: args.ops,
            deadline,
        };
        let pass = match run_matrix(&spec, &progress) {
            Ok(p) => p,
            Err(e) => {
                if tty {
                    eprintln!();
                }
                eprintln!("vmmu migrate: {e}");
                return ExitCode::from(1);
            }
        };
        merge(&mut rows, pass);
        first += args.seeds;
        if deadline.is_none_or(|d| Instant::now() >= d) {
            break;
        }
    }
    if tty {
        eprintln!();
    }
    let lost: u64 = rows.iter().map(|r| r.tally.pages_lost).sum();
    if args.json {
        let out = serde_json::json!({
            "rows": rows,
            "configurations": rows.len(),
            "seconds": start.elapsed().as_secs_f64(),
            "pages_lost": lost,
        });
        println!("{out}");
    } else {
        print!("{}", table(&rows));
        for r in &rows {
            for l in &r.tally.losses {
                println!("lost: {l}");
            }
        }
        println!(
            "{} configurations, {} runs, {:.0} s",
            rows.len(),
            rows.iter().map(|r| r.tally.runs).sum::<u64>(),
            start.elapsed().as_secs_f64()
        );
        println!("check: {lost} violations");
    }
    if lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Adds a pass's rows to the rows so far (same configuration, same row).
fn merge(rows: &mut Vec<MatrixRow>, pass: Vec<MatrixRow>) {
    for p in pass {
        match rows.iter_mut().find(|r| r.mmu == p.mmu && r.config == p.config) {
            Some(r) => r.tally.add(&p.tally),
            None => rows.push(p),
        }
    }
}

/// The rows as a table.
fn table(rows: &[MatrixRow]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<6}  {:<20}  {:>6}  {:>10}  {:>10}  {:>10}  {:>9}  {:>10}  {:>14}  {:>10}",
        "mmu",
        "dirty log",
        "runs",
        "writes",
        "host ops",
        "migrations",
        "harvests",
        "ring full",
        "pages compared",
        "pages lost"
    );
    for r in rows {
        let t = &r.tally;
        let _ = writeln!(
            s,
            "{:<6}  {:<20}  {:>6}  {:>10}  {:>10}  {:>10}  {:>9}  {:>10}  {:>14}  {:>10}",
            r.mmu,
            r.name,
            t.runs,
            t.writes,
            t.host_ops,
            t.migrations,
            t.harvests,
            t.ring_full_exits,
            t.pages_compared,
            t.pages_lost
        );
    }
    s
}
