//! `vmmu run` and `vmmu replay`: argument handling, the progress bar, the
//! report and the exit code over `vmmu_sim::run`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use vmmu::vm::MmuKind;
use vmmu::vm::config::VmConfig;
use vmmu_sim::checker::CheckLevel;
use vmmu_sim::guest::PagingFormat;
use vmmu_sim::report::MmuRunReport;
use vmmu_sim::run::{Progress, RunConfig, RunError, RunOutcome};
use vmmu_sim::trace::Trace;
use vmmu_sim::workload::{NAMED, Workload};

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
    /// The MMUs, in report order.
    pub fn kinds(self) -> Vec<MmuKind> {
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

/// The most `--ops`: a workload file's own limit.
const MAX_OPS: u64 = 1 << 40;

/// The most regions the guest maps at boot (vCPUs × processes ×
/// mappings): booting takes tens of microseconds a region, so beyond this
/// a run would spend minutes before its first operation.
const MAX_BOOT_MAPPINGS: u64 = 1 << 16;

/// `vmmu run --seconds`: positive, at most a day.
fn parse_run_seconds(s: &str) -> Result<f64, String> {
    crate::input::parse_seconds(s, 86_400.0)
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
    #[arg(long, default_value_t = 4, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..=64))]
    vcpus: u64,
    /// Guest RAM (a multiple of 2M, 16M..16G; at most 1G in 32-bit and PAE paging).
    #[arg(long, default_value = "128M", allow_negative_numbers = true, value_parser = crate::parse_size)]
    memory: u64,
    /// A named workload (default, populate, fork-storm, context-switch,
    /// mmap-churn, thp, dirty, pt-flood, many-mm, self-map, recursive-map,
    /// cr-toggle, dirty-storm, mixed) or a workload TOML file.
    #[arg(long, default_value = "default")]
    workload: String,
    /// Guest operations over all vCPUs, 1..=2^40 (default: the workload's).
    #[arg(long, conflicts_with = "seconds", allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..=MAX_OPS))]
    ops: Option<u64>,
    /// Run for this many seconds instead (at most 86400).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_run_seconds)]
    seconds: Option<f64>,
    /// Seed of every choice.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    seed: u64,
    /// The guest's paging mode: 32-bit, pae, 4-level, 5-level [default:
    /// 4-level, or drawn with --config random].
    #[arg(long, value_parser = parse_paging)]
    paging: Option<PagingFormat>,
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
    /// The guest is an L1 hypervisor running this many L2 VMs (2..=4;
    /// default 2) with nested paging (EPT12 on --vendor intel, NPT12 on
    /// amd), each running the workload; the TDP MMU's nested MMU shadows
    /// L1's tables. Implies --mmu tdp.
    #[arg(long, num_args = 0..=1, default_missing_value = "2", value_parser = clap::value_parser!(u64).range(2..=4))]
    nested: Option<u64>,
    /// A seed thread's design decision run another way, as NAME=VALUE
    /// (repeatable; e.g. zap-request=reload-all): the runtime policies of
    /// `vmmu experiment`, listed with their values in docs/EXPERIMENTS.md.
    /// An unsafe value is the checker's to catch.
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_policy)]
    policy: Vec<String>,
    #[command(flatten)]
    vm: VmArgs,
}

/// `--policy NAME=VALUE`, checked against the policies' table.
fn parse_policy(s: &str) -> Result<String, String> {
    vmmu::vm::Policies::default()
        .set_from_str(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// A knob that is on or off.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

impl Switch {
    fn on(self) -> bool {
        self == Switch::On
    }
}

/// `--config`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ConfigSource {
    /// The workload's `[vm]` table and the flags (the default).
    Given,
    /// Every knob drawn from --seed, then the flags given on top; printed
    /// before the run.
    Random,
}

/// The host's vendor, as the command line names it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VendorArg {
    /// Intel VMX with EPT.
    Intel,
    /// AMD SVM with NPT.
    Amd,
}

impl From<VendorArg> for vmmu::arch::control::Vendor {
    fn from(v: VendorArg) -> Self {
        match v {
            VendorArg::Intel => vmmu::arch::control::Vendor::Intel,
            VendorArg::Amd => vmmu::arch::control::Vendor::Amd,
        }
    }
}

/// The VM's configuration: every MMU, memslot and CPU knob (see
/// docs/SIMULATOR.md). Each overrides the workload's `[vm]` table.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "VM configuration (each overrides the workload's [vm] table)")]
pub struct VmArgs {
    /// Where the configuration comes from: the workload and flags, or drawn from --seed.
    #[arg(long, value_enum, default_value = "given")]
    config: ConfigSource,
    /// The host: intel (the TDP MMU builds EPT) or amd (NPT, kvm_amd) [default: intel].
    #[arg(long, value_enum)]
    vendor: Option<VendorArg>,
    /// EPT accessed/dirty flags (kvm_intel.eptad; NPT always has them) [default: on].
    #[arg(long, value_enum)]
    ept_ad: Option<Switch>,
    /// Dirty logging by EPT dirty bits (kvm_intel.pml; needs --ept-ad on) [default: off].
    #[arg(long, value_enum)]
    pml: Option<Switch>,
    /// Per-vCPU dirty rings of N entries, a power of two (KVM_CAP_DIRTY_LOG_RING; TDP MMU); 0 = the bitmap [default: 0].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    dirty_ring: Option<u32>,
    /// KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: harvests are get, then clear [default: off].
    #[arg(long, value_enum)]
    manual_protect: Option<Switch>,
    /// KVM_DIRTY_LOG_INITIALLY_SET (needs --manual-protect on) [default: off].
    #[arg(long, value_enum)]
    initially_set: Option<Switch>,
    /// Eager page splitting (kvm.eager_page_split) [default: on].
    #[arg(long, value_enum)]
    eager_split: Option<Switch>,
    /// The NX huge page mitigation (kvm.nx_huge_pages) [default: off].
    #[arg(long, value_enum)]
    nx_huge_pages: Option<Switch>,
    /// NX recovery: 1/N of the split regions per run, 0 = no recovery (kvm.nx_huge_pages_recovery_ratio) [default: 60].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    nx_recovery_ratio: Option<u32>,
    /// NX recovery period in ms, 0 = an hour / ratio (kvm.nx_huge_pages_recovery_period_ms) [default: 0].
    #[arg(long, value_name = "MS", allow_negative_numbers = true)]
    nx_recovery_period_ms: Option<u32>,
    /// The largest TDP leaf: 4K, 2M or 1G [default: 1G].
    #[arg(long, value_name = "SIZE", value_parser = vmmu::vm::config::parse_page_size)]
    max_page_size: Option<u64>,
    /// EPT levels: 4 or 5 [default: 4].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    ept_levels: Option<u8>,
    /// The shadow MMU's page limit (KVM_SET_NR_MMU_PAGES), 0 = 2% of RAM [default: 0].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    mmu_pages: Option<u64>,
    /// CPUID.PKU: the guest uses protection keys (IA-32e paging) [default: off].
    #[arg(long, value_enum)]
    pku: Option<Switch>,
    /// CPUID.SMEP: the guest turns SMEP on [default: off].
    #[arg(long, value_enum)]
    smep: Option<Switch>,
    /// CPUID.SMAP: the guest turns SMAP on [default: off].
    #[arg(long, value_enum)]
    smap: Option<Switch>,
    /// CPUID.LA57: 5-level paging is allowed [default: on].
    #[arg(long, value_enum)]
    la57: Option<Switch>,
}

impl VmArgs {
    /// The flags given, on top of `base`.
    fn apply(&self, base: VmConfig) -> VmConfig {
        let mut c = base;
        let set = |v: &mut bool, s: Option<Switch>| {
            if let Some(s) = s {
                *v = s.on();
            }
        };
        if let Some(v) = self.vendor {
            c.vendor = v.into();
        }
        set(&mut c.ept_ad, self.ept_ad);
        set(&mut c.pml, self.pml);
        set(&mut c.manual_protect, self.manual_protect);
        set(&mut c.initially_set, self.initially_set);
        set(&mut c.eager_split, self.eager_split);
        set(&mut c.nx_huge_pages, self.nx_huge_pages);
        set(&mut c.pku, self.pku);
        set(&mut c.smep, self.smep);
        set(&mut c.smap, self.smap);
        set(&mut c.la57, self.la57);
        if let Some(v) = self.dirty_ring {
            c.dirty_ring = v;
        }
        if let Some(v) = self.nx_recovery_ratio {
            c.nx_recovery_ratio = v;
        }
        if let Some(v) = self.nx_recovery_period_ms {
            c.nx_recovery_period_ms = v;
        }
        if let Some(v) = self.max_page_size {
            c.max_page_size = v;
        }
        if let Some(v) = self.ept_levels {
            c.ept_levels = v;
        }
        if let Some(v) = self.mmu_pages {
            c.mmu_pages = v;
        }
        c
    }
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
            .expect("the progress template is a constant that indicatif accepts")
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

/// Prints a failed run's error; its exit code.
fn report_error(what: &str, kind: MmuKind, e: &RunError) -> ExitCode {
    eprintln!("vmmu {what} ({} MMU): {e}", kind.name());
    exit_for(e)
}

/// The workload `name`: a named one, or a workload file (which must not be
/// empty: an empty file is more likely a mistake than a wish for the
/// defaults).
fn load_workload(name: &str) -> Result<Workload, String> {
    if NAMED.iter().any(|(n, _)| *n == name) {
        return Workload::load(name).map_err(|e| e.to_string());
    }
    if name.is_empty() {
        return Err(format!(
            "--workload \"\": give a named workload ({}) or a workload file",
            NAMED.map(|n| n.0).join(", ")
        ));
    }
    let path = Path::new(name);
    if !path.exists() {
        return Err(format!(
            "--workload {name}: not a named workload ({}) and no such file",
            NAMED.map(|n| n.0).join(", ")
        ));
    }
    let text = crate::input::read_text(path)?;
    if text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    }) {
        return Err(format!(
            "{name}:1: the workload file is empty: it sets no key (see docs/SIMULATOR.md)"
        ));
    }
    Workload::parse(&text, name).map_err(|e| e.to_string())
}

/// What the CLI checks of a run before starting it, beyond the library's
/// own checks: the size of the boot.
fn check_boot(workload: &Workload, vcpus: u64, source: &str) -> Result<(), String> {
    let boot = vcpus
        .saturating_mul(workload.processes.into())
        .saturating_mul(workload.mappings.into());
    if boot > MAX_BOOT_MAPPINGS {
        return Err(format!(
            "{source}: {vcpus} vCPUs x {} processes x {} mappings = {boot} regions mapped at boot, \
             more than the {MAX_BOOT_MAPPINGS} the simulator boots in reasonable time; \
             lower processes or mappings, or use fewer vCPUs",
            workload.processes, workload.mappings
        ));
    }
    Ok(())
}

/// `vmmu run`.
pub fn run(args: RunArgs) -> ExitCode {
    let usage = |msg: String| {
        eprintln!("vmmu run: {msg}");
        ExitCode::from(2)
    };
    let workload = match load_workload(&args.workload) {
        Ok(w) => w,
        Err(e) => return usage(e),
    };
    if let Err(e) = check_boot(&workload, args.vcpus, &format!("workload {}", args.workload)) {
        return usage(e);
    }
    // Where the results go must be writable before the run starts, not
    // found out after it.
    if let Some(path) = &args.record
        && let Err(e) = crate::input::check_writable_file(path, "--record")
    {
        return usage(e);
    }
    if let Some(dir) = &args.report
        && let Err(e) = crate::input::check_writable_dir(dir, "--report")
    {
        return usage(e);
    }
    // The configuration: the workload's, or drawn from the seed (valid
    // for every MMU of the run), then the flags given.
    let kinds = match (args.mmu, args.nested) {
        // The nested MMU shadows L1's tables on a TDP host.
        (RunMmu::Both, Some(_)) => vec![MmuKind::Tdp],
        (mmu, _) => mmu.kinds(),
    };
    let only = (kinds.len() == 1).then(|| kinds[0]);
    let (base, drawn_paging) = match args.vm.config {
        ConfigSource::Given => (workload.vm, None),
        ConfigSource::Random => {
            let (c, p) = vmmu_sim::config::from_seed(args.seed, only);
            (c, Some(p))
        }
    };
    let vm = args.vm.apply(base);
    let paging = args
        .paging
        .or(drawn_paging)
        .unwrap_or_else(|| PagingFormat::parse("4-level").expect("a known mode"));
    for &kind in &kinds {
        if let Err((knob, m)) = vm.validate(kind, paging.mode()) {
            return usage(format!(
                "--{knob}: {m}{}",
                if kinds.len() > 1 {
                    format!(" (with the {} MMU)", kind.name())
                } else {
                    String::new()
                }
            ));
        }
    }
    let nested = match (args.nested, args.vm.config) {
        (Some(n), _) => n as usize,
        (None, ConfigSource::Random) => vmmu_sim::config::nested_from_seed(args.seed, only, &vm, args.memory),
        (None, ConfigSource::Given) => 0,
    };
    // The policies: drawn from the seed under --config random, then the
    // flags given.
    let mut policies = match args.vm.config {
        ConfigSource::Random => vmmu_sim::config::policies_from_seed(args.seed),
        ConfigSource::Given => vmmu::vm::Policies::default(),
    };
    for p in &args.policy {
        policies.set_from_str(p).expect("checked when parsed");
    }
    if args.vm.config == ConfigSource::Random {
        // Before anything runs, so a failing run can be repeated without
        // the draw.
        let nested = if nested > 0 {
            format!(" --nested {nested}")
        } else {
            String::new()
        };
        let policy = if policies.flags().is_empty() {
            String::new()
        } else {
            format!(" {}", policies.flags())
        };
        eprintln!(
            "configuration: --paging {} {}{nested}{policy}",
            paging.name(),
            vm.flags()
        );
    }
    let unsafe_ones = policies.unsafe_ones();
    if !unsafe_ones.is_empty() && !args.json {
        eprintln!(
            "note: unsafe policy {}: the checker must catch this run",
            unsafe_ones.join(", ")
        );
    }
    let workload = Workload { vm, ..workload };
    let mut outcomes = Vec::new();
    for kind in kinds {
        let cfg = RunConfig {
            workload: workload.clone(),
            paging,
            vcpus: args.vcpus as usize,
            memory: args.memory,
            ops: args.ops,
            seconds: args.seconds,
            seed: args.seed,
            host_churn: args.host_churn,
            migrate: args.dirty_log,
            check: args.check.into(),
            record: args.record.is_some() && outcomes.is_empty(),
            nested,
            policies,
            ..RunConfig::new(kind, workload.clone())
        };
        let b = bar(kind.name());
        let progress = |p: Progress| {
            if let Some(b) = &b {
                b.set_position((p.fraction * 1000.0) as u64);
                b.set_message(format!("{} accesses, {} violations", p.accesses, p.violations));
            }
        };
        let r = vmmu_sim::run::run(&cfg, &progress);
        if let Some(b) = b {
            b.finish_and_clear();
        }
        match r {
            Ok(o) => outcomes.push(o),
            Err(e) => return report_error("run", kind, &e),
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

/// Checks a trace's header the way `vmmu run` checks its flags, naming
/// the trace's line: the replay would otherwise report a bad value as a
/// flag that was never given.
fn check_trace_header(trace: &Trace, text: &str, file: &str) -> Result<(), String> {
    let h = &trace.header;
    let at = |key: &str, msg: String| format!("{file}:{}: {key}: {msg}", crate::input::key_line(text, key));
    let Some(paging) = PagingFormat::parse(&h.paging) else {
        return Err(at(
            "paging",
            format!("unknown paging mode `{}` (32-bit, pae, 4-level, 5-level)", h.paging),
        ));
    };
    if h.memory < (16 << 20) || !h.memory.is_multiple_of(2 << 20) || h.memory > (16 << 30) {
        return Err(at(
            "memory",
            format!(
                "must be a multiple of 2 MiB from 16 MiB to 16 GiB, not {} bytes",
                h.memory
            ),
        ));
    }
    if h.memory > paging.max_ram() {
        return Err(at(
            "memory",
            format!(
                "{} MiB is more than {} paging's kernel map covers ({} MiB)",
                h.memory >> 20,
                paging.name(),
                paging.max_ram() >> 20
            ),
        ));
    }
    check_boot(&h.workload, h.vcpus as u64, file)
}

/// `vmmu replay`.
pub fn replay(args: ReplayArgs) -> ExitCode {
    let usage = |msg: String| {
        eprintln!("vmmu replay: {msg}");
        ExitCode::from(2)
    };
    let file = args.file.display().to_string();
    let text = match crate::input::read_text(&args.file) {
        Ok(t) => t,
        Err(e) => return usage(e),
    };
    let trace = match Trace::parse(&text, &file) {
        Ok(t) => t,
        Err(mut e) => {
            // The library names line 1 for a bad header value: name the
            // line that sets it.
            let key = e
                .message
                .strip_prefix("workload: ")
                .unwrap_or(&e.message)
                .split([' ', ':'])
                .next()
                .unwrap_or_default();
            if e.line == 1 && !key.is_empty() && key != "not" {
                e.line = crate::input::key_line(&text, key);
            }
            return usage(e.to_string());
        }
    };
    if let Err(e) = check_trace_header(&trace, &text, &file) {
        return usage(e);
    }
    if let Some(dir) = &args.report
        && let Err(e) = crate::input::check_writable_dir(dir, "--report")
    {
        return usage(e);
    }
    let mut outcomes = Vec::new();
    for kind in args.mmu.kinds() {
        match vmmu_sim::run::replay(&trace, kind, args.check.into()) {
            Ok(o) => outcomes.push(o),
            Err(e) => return report_error("replay", kind, &e),
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
