//! `vmmu`: the command line. A thin layer over the library: argument
//! parsing, output formatting and exit codes; every decision lives below.
//!
//! Exit codes, for every command: 0 success; 1 the run worked but found a
//! failure; 2 bad usage or bad input.

mod experiment;
mod input;
mod migrate;
mod report;
mod run;
mod soak;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use vmmu::vm::MmuKind;
use vmmu_bench::Benchmark;
use vmmu_sim::conform::{self, Replayer};

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
    /// Run a guest workload on N vCPUs under the shadow MMU, the TDP MMU or
    /// both, with host churn, live migration and the checker; exit 1 on any
    /// violation.
    Run(run::RunArgs),
    /// Replay a trace recorded by `vmmu run --record`, deterministically.
    Replay(run::ReplayArgs),
    /// Live migration under every dirty-log configuration, with host churn,
    /// the destination compared byte for byte; exit 1 on any page lost.
    Migrate(migrate::MigrateArgs),
    /// Simulator runs back to back for as long as asked, each with a random
    /// configuration, host churn and live migrations; exit 1 on any violation.
    Soak(soak::SoakArgs),
    /// Replay x86 paging conformance cases and compare with the recorded results.
    Conform(ConformArgs),
    /// Run a benchmark against its reference, measured in the same run.
    Bench(BenchArgs),
    /// Stress the TDP MMU: vCPUs against host churn, zap-all and dirty
    /// logging, with the checker on; exit 1 on any violation.
    Stress(StressArgs),
    /// Run a seed thread's design decision in its variants side by side and
    /// report what differs; exit 1 unless every safe variant is clean and
    /// every unsafe one caught.
    Experiment(experiment::ExperimentArgs),
}

#[derive(clap::Args)]
struct StressArgs {
    /// How long to run, in seconds (at most a week).
    #[arg(long, default_value = "10", allow_hyphen_values = true, value_parser = parse_stress_seconds)]
    seconds: f64,
    /// vCPU threads.
    #[arg(long, default_value_t = 2, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..=64))]
    vcpus: u64,
    /// Guest memory (a multiple of 2M, at most 4G), e.g. 64M.
    #[arg(long, default_value = "16M", allow_negative_numbers = true, value_parser = parse_size)]
    memory: u64,
    /// Seed of the pseudo-random choices.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    seed: u64,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
}

/// Turns on the MMU's tracepoints (`kvm_mmu_get_page`, `kvm_mmu_sync_page`,
/// …) when `VMMU_LOG` is set, e.g. `VMMU_LOG=kvm_mmu_sync_page=trace` or
/// `VMMU_LOG=trace` for all of them; they go to stderr.
fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let Ok(spec) = std::env::var("VMMU_LOG") else {
        return;
    };
    match spec.parse::<tracing_subscriber::filter::Targets>() {
        Ok(targets) => {
            let _ = tracing_subscriber::registry()
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .without_time(),
                )
                .with(targets)
                .try_init();
        }
        Err(e) => eprintln!("vmmu: ignoring VMMU_LOG={spec:?}: {e}"),
    }
}

/// Parses a size: a number with an optional K, M or G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 4K, 2M, 1G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large (more than 2^64 bytes)"))
}

/// `vmmu stress --seconds`: positive, at most a week.
fn parse_stress_seconds(s: &str) -> Result<f64, String> {
    input::parse_seconds(s, 7.0 * 86_400.0)
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConformMmu {
    /// The guest page-table walker alone (a fresh walk at every access).
    Walker,
    /// A one-vCPU VM on the shadow MMU: TLB, walk of the shadow tables,
    /// #PF exits, write-protected guest tables.
    Shadow,
    /// A one-vCPU VM on the TDP MMU: TLB, two-dimensional walk, EPT exits.
    Tdp,
    /// An L2 guest's vCPU on the nested MMU, which shadows L1's nested
    /// tables (NPT cases): TLB, walk over the shadow NPT02, #NPF reflected
    /// to L1.
    Nested,
}

#[derive(clap::Args)]
struct ConformArgs {
    /// The path under test.
    #[arg(long, value_enum, default_value = "walker")]
    mmu: ConformMmu,
    /// The TDP MMU's host: intel (EPT) or amd (NPT); --mmu tdp only.
    #[arg(long, value_enum, default_value = "intel")]
    vendor: run::VendorArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Failing cases to print.
    #[arg(long, default_value_t = 20, allow_negative_numbers = true)]
    max_failures: usize,
    /// Case files (JSON lines, single-access or multi-step).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BenchName {
    /// vCPUs faulting in their memory with 4K writes (KVM's demand_paging_test).
    Populate,
    /// Enable dirty logging, dirty every page, harvest (KVM's dirty_log_perf_test).
    #[value(name = "dirty-log")]
    DirtyLog,
    /// The wait of zap_all_fast with 1 GiB and 16 GiB mapped.
    #[value(name = "zap-all")]
    ZapAll,
    /// Guest CR3 switches on the shadow MMU: prev_roots hits against misses and rebuilds.
    #[value(name = "cr3-switch")]
    Cr3Switch,
    /// A guest store to its own page table on the shadow MMU (write-protection fault, emulated).
    #[value(name = "wp-emulate")]
    WpEmulate,
    /// Age every page, then re-access it, with EPT A/D on and off (KVM's access_tracking_perf_test).
    #[value(name = "access-tracking")]
    AccessTracking,
    /// 4-level guest walks against four dependent loads.
    Walk,
    /// Guest accesses served by the vCPU's TLB, per second per vCPU thread, on both MMUs, against the bare memory access.
    #[value(name = "tlb-hit")]
    TlbHit,
    /// TLB misses refilled by the 1-D (shadow) and 2-D (TDP) walks, per page.
    #[value(name = "tlb-miss")]
    TlbMiss,
    /// An L2 guest's fault on the nested MMU against its L1 hypervisor's on the TDP MMU (AMD), with memory references per TLB miss.
    #[value(name = "nested-fault")]
    NestedFault,
    /// Every benchmark: walk, tlb-hit, tlb-miss, populate, dirty-log, zap-all, access-tracking, cr3-switch, wp-emulate, nested-fault.
    All,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BackingArg {
    /// Anonymous memory, THP off (4K SPTEs).
    Anon,
    /// Transparent huge pages (2M SPTEs).
    Thp,
    /// 2M hugetlb (modelled as THP in 2M-aligned regions).
    #[value(name = "hugetlb-2m")]
    Hugetlb2m,
    /// 1G hugetlb (1G SPTEs; sizes must be multiples of 1G).
    #[value(name = "hugetlb-1g")]
    Hugetlb1g,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BenchMmu {
    /// The shadow MMU (cr3-switch).
    Shadow,
    /// The TDP MMU.
    Tdp,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum)]
    name: BenchName,
    /// vCPU threads (populate, dirty-log, access-tracking) [default: 1].
    #[arg(short = 'v', long, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..=64))]
    vcpus: Option<u32>,
    /// Guest memory each vCPU touches (populate, dirty-log, access-tracking),
    /// e.g. 64M, 1G [default: 64M].
    #[arg(short = 'b', long, allow_negative_numbers = true, value_parser = parse_size)]
    bytes_per_vcpu: Option<u64>,
    /// walk: walks per measured round (default 2000000, at most
    /// 100000000); cr3-switch, wp-emulate: switches or stores (default
    /// 200000, at most 20000000); populate, zap-all: rounds, the best
    /// reported (default 3; zap-all with huge pages 10); dirty-log: dirty +
    /// get iterations (default 2); access-tracking: access + age +
    /// re-access iterations, the best reported (default 3); rounds and
    /// iterations at most 100.
    #[arg(short = 'i', long, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    iterations: Option<u64>,
    /// Host memory backing guest memory (populate, dirty-log, zap-all,
    /// access-tracking) [default: anon].
    #[arg(short = 's', long, value_enum)]
    backing: Option<BackingArg>,
    /// The MMU measured (default: the one the benchmark measures: shadow
    /// for cr3-switch, TDP for the others).
    #[arg(long = "mmu", value_enum)]
    mmu_given: Option<BenchMmu>,
    /// Print one JSON object per benchmark instead of a table.
    #[arg(long)]
    json: bool,
}

/// Replaces Rust's panic message, which is for programmers, with one for
/// users: a panic is a bug of vmmu (every bad input has its own message
/// and exit code 2), reported as such, with the place to look. A closed
/// stdout (`vmmu ... | head`) is not a bug: the reader has what it wanted,
/// and vmmu exits quietly, as Unix tools do.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        if msg.starts_with("failed printing to stdout") {
            if msg.contains("Broken pipe") {
                std::process::exit(0);
            }
            eprintln!("vmmu: cannot write the output: {msg}");
            std::process::exit(1);
        }
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        eprintln!(
            "vmmu: internal error (a bug in vmmu, please report it) in thread {}{place}: {msg}",
            thread.name().unwrap_or("unnamed")
        );
    }));
}

fn main() -> ExitCode {
    install_panic_hook();
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
    init_tracing();
    match cli.command {
        Command::Conform(args) => run_conform(args),
        Command::Bench(args) => run_bench(args),
        Command::Stress(args) => run_stress(args),
        Command::Run(args) => run::run(args),
        Command::Replay(args) => run::replay(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Soak(args) => soak::run(args),
        Command::Experiment(args) => experiment::run(args),
    }
}

fn run_stress(args: StressArgs) -> ExitCode {
    use std::io::{IsTerminal, Write};
    use vmmu_sim::stress::{StressConfig, StressError, run};
    // --seconds is positive, finite and at most a week: parse_stress_seconds.
    let config = StressConfig {
        duration: std::time::Duration::from_secs_f64(args.seconds),
        vcpus: args.vcpus,
        memory: args.memory,
        seed: args.seed,
        ..StressConfig::default()
    };
    let tty = std::io::stderr().is_terminal();
    let progress = move |f: f64| {
        if tty {
            let done = (f * 40.0) as usize;
            eprint!(
                "\r[{}{}] {:3.0}%",
                "#".repeat(done),
                " ".repeat(40 - done.min(40)),
                f * 100.0
            );
            let _ = std::io::stderr().flush();
        }
    };
    let report = match run(config, &progress) {
        Ok(r) => r,
        Err(e @ StressError::Config(_)) => {
            eprintln!("vmmu stress: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("vmmu stress: {e}");
            return ExitCode::from(1);
        }
    };
    if tty {
        eprintln!();
    }
    if args.json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("vmmu stress: cannot encode the report: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        let s = &report.stats;
        println!("mmu                tdp");
        println!("vcpus              {}", args.vcpus);
        println!("seconds            {}", args.seconds);
        println!("accesses           {}", report.accesses);
        println!("host operations    {}", report.host_operations);
        println!("vmm operations     {}", report.vmm_operations);
        println!("dirty-log sessions {}", report.dirty_log_sessions);
        println!("audits             {}", report.audits);
        println!("pf_taken           {}", s.pf_taken);
        println!("pf_fixed           {}", s.pf_fixed);
        println!("pf_fast            {}", s.pf_fast);
        println!("pf_spurious        {}", s.pf_spurious);
        println!("pf_retry           {}", s.pf_retry);
        println!("remote_tlb_flush   {}", s.remote_tlb_flush);
        println!("mmu_zapped         {}", s.mmu_zapped);
        println!("huge_pages_split   {}", s.huge_pages_split);
        println!("pages_4k/2m/1g     {}/{}/{}", s.pages_4k, s.pages_2m, s.pages_1g);
        for v in report.data_violations.iter().chain(&report.spte_violations) {
            println!("VIOLATION {v}");
        }
        println!("check: {} violations", report.violations);
    }
    if report.violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn run_conform(args: ConformArgs) -> ExitCode {
    // Parse every file before replaying anything: a malformed file is bad
    // input (exit 2), never a partial result.
    let mut files = Vec::new();
    for path in &args.files {
        match input::read_cases(path) {
            Ok(cases) => files.push((path.display().to_string(), cases)),
            Err(e) => {
                eprintln!("vmmu conform: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if matches!(args.mmu, ConformMmu::Shadow | ConformMmu::Tdp)
        && let Some((file, _)) = files.iter().find(|(_, cases)| cases.iter().any(|c| c.is_nested()))
    {
        eprintln!(
            "vmmu conform: {file} holds nested-paging cases (NPT/EPT), which replay through the two-dimensional walk (--mmu walker) or the nested MMU (--mmu nested)"
        );
        return ExitCode::from(2);
    }
    if matches!(args.mmu, ConformMmu::Nested)
        && let Some((file, _)) = files.iter().find(|(_, cases)| cases.iter().any(|c| !c.is_nested()))
    {
        eprintln!(
            "vmmu conform: {file} holds single-level cases: the nested MMU replays the nested-paging cases (public-npt-*.jsonl, public-ept.jsonl), which have an L1 whose tables it shadows"
        );
        return ExitCode::from(2);
    }
    if args.vendor != run::VendorArg::Intel && !matches!(args.mmu, ConformMmu::Tdp) {
        eprintln!("vmmu conform: --vendor chooses the TDP MMU's table format: it needs --mmu tdp");
        return ExitCode::from(2);
    }
    let mut replayer: Box<dyn Replayer> = match args.mmu {
        ConformMmu::Walker => Box::new(conform::WalkerReplayer),
        ConformMmu::Shadow => Box::new(conform::ShadowReplayer),
        ConformMmu::Tdp => Box::new(conform::TdpReplayer {
            vendor: args.vendor.into(),
        }),
        ConformMmu::Nested => Box::new(conform::NestedReplayer),
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
    use std::io::IsTerminal;
    use vmmu_bench::Report;
    use vmmu_bench::tdp::{Backing, BenchError, TdpBenchConfig};

    let usage = |msg: String| {
        eprintln!("vmmu bench: {msg}");
        ExitCode::from(2)
    };
    let mmu = args.mmu_given.map(|m| match m {
        BenchMmu::Tdp => MmuKind::Tdp,
        BenchMmu::Shadow => MmuKind::Shadow,
    });
    if let Some(b) = args.name.benchmark()
        && let Err(msg) = b.check_mmu(mmu)
    {
        return usage(msg);
    }
    if let Err(msg) = check_bench_flags(&args) {
        return usage(msg);
    }
    let cfg = TdpBenchConfig {
        vcpus: args.vcpus.unwrap_or(1),
        bytes_per_vcpu: args.bytes_per_vcpu.unwrap_or(64 << 20),
        iterations: args.iterations,
        backing: match args.backing.unwrap_or(BackingArg::Anon) {
            BackingArg::Anon => Backing::Anon,
            BackingArg::Thp => Backing::Thp,
            BackingArg::Hugetlb2m => Backing::Hugetlb2M,
            BackingArg::Hugetlb1g => Backing::Hugetlb1G,
        },
    };
    let names: Vec<Benchmark> = match (args.name.benchmark(), mmu) {
        (Some(b), _) => vec![b],
        (None, Some(mmu)) => Benchmark::on(mmu),
        (None, None) => Benchmark::ALL.to_vec(),
    };
    // Check every size before running anything (a size given for `all`
    // is checked even if only some of the benchmarks use it).
    if (args.bytes_per_vcpu.is_some() || names.iter().any(|n| n.sized()))
        && let Err(e) = cfg.validate()
    {
        return usage(e.to_string());
    }
    if names.contains(&Benchmark::ZapAll) && cfg.backing == Backing::Hugetlb1G {
        // 1G leaves: 16 GiB are 16 SPTEs, nothing to measure a growth on.
        eprintln!("vmmu bench: zap-all with hugetlb-1g maps 16 SPTEs only; use anon or thp for a meaningful figure");
    }
    let tty = std::io::stderr().is_terminal();
    let progress = move |msg: &str| {
        if tty {
            eprintln!("[vmmu bench] {msg}");
        }
    };
    let mut header = false;
    for name in &names {
        let result: Result<Report, BenchError> = name.run(mmu, &cfg, args.iterations, &progress);
        let r = match result {
            Ok(r) => r,
            Err(BenchError::Config(e)) => return usage(e),
            Err(e) => {
                eprintln!("vmmu bench: {e}");
                return ExitCode::from(1);
            }
        };
        if args.json {
            match serde_json::to_string(&r) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("vmmu bench: cannot encode the result: {e}");
                    return ExitCode::from(1);
                }
            }
        } else {
            print_report(&r, !header);
            header = true;
        }
    }
    ExitCode::SUCCESS
}

impl BenchName {
    /// The benchmark it names (`None` for `all`).
    fn benchmark(self) -> Option<Benchmark> {
        Some(match self {
            BenchName::Populate => Benchmark::Populate,
            BenchName::DirtyLog => Benchmark::DirtyLog,
            BenchName::ZapAll => Benchmark::ZapAll,
            BenchName::Cr3Switch => Benchmark::Cr3Switch,
            BenchName::WpEmulate => Benchmark::WpEmulate,
            BenchName::AccessTracking => Benchmark::AccessTracking,
            BenchName::Walk => Benchmark::Walk,
            BenchName::TlbHit => Benchmark::TlbHit,
            BenchName::TlbMiss => Benchmark::TlbMiss,
            BenchName::NestedFault => Benchmark::NestedFault,
            BenchName::All => return None,
        })
    }

    /// The most `--iterations` it takes (`all`: the least of its
    /// benchmarks' most, those on guest memory).
    fn max_iterations(self) -> u64 {
        self.benchmark().map_or(100, Benchmark::max_iterations)
    }
}

/// Rejects flags the chosen benchmark does not use (a typo or a
/// misunderstanding: the figure would not be what was asked for) and
/// iterations beyond [`BenchName::max_iterations`].
fn check_bench_flags(args: &BenchArgs) -> Result<(), String> {
    let name = args.name;
    let label = BenchName::to_possible_value(&name).map_or_else(|| format!("{name:?}"), |v| v.get_name().to_string());
    let sized = name.benchmark().is_none_or(Benchmark::sized);
    let backed = name.benchmark().is_none_or(Benchmark::backed);
    let unused = [
        (
            "-v/--vcpus",
            args.vcpus.is_some() && !sized,
            "populate, dirty-log and access-tracking",
        ),
        (
            "-b/--bytes-per-vcpu",
            args.bytes_per_vcpu.is_some() && !sized,
            "populate, dirty-log and access-tracking",
        ),
        (
            "-s/--backing",
            args.backing.is_some() && !backed,
            "populate, dirty-log, zap-all and access-tracking",
        ),
    ];
    if let Some((flag, _, users)) = unused.iter().find(|u| u.1) {
        return Err(format!("{flag} has no effect on {label}: only {users} use it"));
    }
    if let Some(i) = args.iterations
        && i > name.max_iterations()
    {
        return Err(format!(
            "-i/--iterations {i}: {label} takes at most {}",
            name.max_iterations()
        ));
    }
    Ok(())
}

/// The human table: one row per phase, then the other figures and notes.
fn print_report(r: &vmmu_bench::Report, header: bool) {
    let b = &r.result;
    if header {
        println!(
            "{:<38} {:>6} {:>12} {:>14} {:>8} {:>6}  reference",
            "bench", "mmu", "per_op_ns", "reference_ns", "ratio", "goal"
        );
    }
    for (i, p) in b.phases.iter().enumerate() {
        println!(
            "{:<38} {:>6} {:>12.2} {:>14.2} {:>8.2} {:>6}  {}",
            format!("{}/{}", b.bench, p.phase),
            b.mmu,
            p.per_op_ns,
            p.reference_ns,
            p.ratio,
            if i == 0 {
                b.goal_ratio.map(|g| format!("<={g}")).unwrap_or_default()
            } else {
                String::new()
            },
            if i == 0 { b.reference } else { "" }
        );
    }
    for f in &r.figures {
        let reference = f.reference.map(|x| format!(" (reference {x:.3})")).unwrap_or_default();
        let goal = f.goal.map(|g| format!(" [goal {g}]")).unwrap_or_default();
        println!("  {}: {}: {:.3} {}{reference}{goal}", b.bench, f.name, f.value, f.unit);
    }
    for n in &r.notes {
        println!("  {}: note: {n}", b.bench);
    }
}
