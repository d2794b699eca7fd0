//! `vmmu run`: boots a machine under one MMU, boots the guest OS on it,
//! and runs a workload on N vCPU threads, with a host churn thread and a
//! VMM thread (timeline, audits, zap-all, live migration) beside them and
//! the checker on. [`replay`] runs a recorded trace on one thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Distribution, Zipf};

use crate::checker::{CheckLevel, Checker};
use crate::guest::{FaultFix, GuestCpu, Leaf, Mm, MmState, Os, OsError, PagingFormat, Vma};
use crate::report::{LatencyHistogram, MigrationReport, MmuRunReport, Sample};
use crate::trace::{Actor, Op, OpKind, Trace, TraceHeader};
use crate::workload::{Pattern, Workload};
use vmmu::addr::{Gpa, Hva};
use vmmu::arch::perm::AccessKind;
use vmmu::arch::pfec::PfErrorCode;
use vmmu::cpu::vcpu::{AccessResult, GuestFault};
use vmmu::mem::{GuestMemory, MemslotFlags};
#[doc(hidden)]
pub use vmmu::sync::Bug;
use vmmu::vm::{Machine, MmuKind, RAM_HVA};
use vmmu::walker::ControlRegs;

/// What to run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The MMU.
    pub mmu: MmuKind,
    /// The workload.
    pub workload: Workload,
    /// The guest's paging mode.
    pub paging: PagingFormat,
    /// vCPU threads, 1..=64.
    pub vcpus: usize,
    /// Guest RAM in bytes, a multiple of 2 MiB.
    pub memory: u64,
    /// Guest operations (default: the workload's).
    pub ops: Option<u64>,
    /// Run for this long instead of a number of operations.
    pub seconds: Option<f64>,
    /// Seed of every choice.
    pub seed: u64,
    /// Run the host churn thread (or the workload asks for it).
    pub host_churn: bool,
    /// Run live migrations (or the workload asks for it).
    pub migrate: bool,
    /// The checker's level.
    pub check: CheckLevel,
    /// Keep the operations for a trace.
    pub record: bool,
    /// 0, or the L2 VMs (2..=4) of an L1 hypervisor that the guest is
    /// (`--nested`, [`crate::nested`]): the workload runs in each L2 VM.
    pub nested: usize,
    /// The seed threads' decisions (KVM's today unless an experiment
    /// says otherwise, [`crate::experiment`]).
    pub policies: vmmu::vm::Policies,
}

mod injection {
    use super::Bug;

    /// Test-only: [`Bug`]s armed on the simulator's threads (with the
    /// `shuttle` feature, as every injected bug; [`super::run_injected`]).
    #[derive(Clone, Debug, Default)]
    pub struct Injection {
        /// Armed on every vCPU thread.
        pub vcpu: Vec<Bug>,
        /// Armed on the VMM thread.
        pub vmm: Vec<Bug>,
        /// Armed on the host churn thread.
        pub host: Vec<Bug>,
    }
}
#[cfg(feature = "shuttle")]
pub use injection::Injection;
#[cfg(not(feature = "shuttle"))]
use injection::Injection;

impl RunConfig {
    /// The default run of `workload` under `mmu`: 4 vCPUs, 128 MiB,
    /// 4-level paging, checker full.
    pub fn new(mmu: MmuKind, workload: Workload) -> RunConfig {
        RunConfig {
            mmu,
            workload,
            paging: PagingFormat::parse("4-level").expect("a known mode"),
            vcpus: 4,
            memory: 128 << 20,
            ops: None,
            seconds: None,
            seed: 1,
            host_churn: false,
            migrate: false,
            check: CheckLevel::Full,
            record: false,
            nested: 0,
            policies: vmmu::vm::Policies::default(),
        }
    }

    /// The memory of the guest OS the workload runs on: the VM's, or each
    /// L2 VM's under `--nested`.
    pub fn guest_memory(&self) -> u64 {
        if self.nested == 0 {
            self.memory
        } else {
            crate::nested::l2_memory(self.memory, self.nested).unwrap_or(0)
        }
    }

    fn churn(&self) -> bool {
        self.host_churn || self.workload.host_churn
    }

    /// The guest's paging, with the SMEP, SMAP and protection keys the
    /// configured CPU offers turned on.
    pub fn guest_format(&self) -> PagingFormat {
        let vm = &self.workload.vm;
        self.paging.with_cpuid(vm.smep, vm.smap, vm.pku)
    }

    fn migrates(&self) -> bool {
        self.migrate || self.workload.migrate
    }
}

/// Why a run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// An impossible configuration.
    #[error("{0}")]
    Config(String),
    /// The machine or the OS could not be set up.
    #[error("setting up the run: {0}")]
    Setup(String),
    /// A vCPU failed: the MMU returned an error or made no progress.
    #[error("vCPU {vcpu}: {error}")]
    Vcpu {
        /// Which.
        vcpu: usize,
        /// What.
        error: String,
    },
}

/// A run's result.
#[derive(Debug)]
pub struct RunOutcome {
    /// The report.
    pub report: MmuRunReport,
    /// The operations, when recorded (always kept when a violation was
    /// found, to be written beside the report).
    pub trace: Option<Trace>,
}

/// Progress of a run, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Fraction done, 0..=1.
    pub fraction: f64,
    /// Accesses so far.
    pub accesses: u64,
    /// Violations so far.
    pub violations: u64,
}

/// A thread of a process, as a vCPU runs it.
#[derive(Debug, Clone)]
struct Task {
    mm: Arc<Mm>,
    thread: u32,
    cursor: u64,
}

/// A vCPU of one guest OS and what it runs there. Under `--nested` a run
/// vCPU has one per L2 VM, and runs one at a time ([`Seat`]).
struct Cpu {
    /// Which guest ([`Shared::guests`]).
    vm: usize,
    /// The L2 vCPU state L1 keeps while it runs another L2 VM here
    /// (VMCS12's guest state: registers, CR3, PDPTEs, PKRU).
    saved: Option<(ControlRegs, u64, [u64; 4], u32)>,
    g: GuestCpu,
    tasks: Vec<Task>,
    cur: usize,
    hist: [u64; BOUNDS.len() + 1],
    ops: u64,
    /// The vCPU's isolation counters at the last check.
    isolation: (u64, u64),
    /// Zipf tables by mapping size (the `zipfian` pattern).
    zipf: ZipfTables,
}

/// Zipf-distributed page numbers, `P(k) ∝ (k + 1)^-theta` for `k` in
/// `0..pages`: the cumulative distribution of each mapping size, built once
/// per vCPU thread, sampled with one uniform draw and a binary search
/// (a rejection sampler costs a few `pow`s per access). Sizes past
/// [`ZipfTables::MAX_TABLE`] pages use `rand_distr::Zipf`.
#[derive(Default)]
struct ZipfTables {
    /// By (pages, theta's bits).
    tables: std::collections::HashMap<(u64, u64), Vec<f64>>,
}

impl ZipfTables {
    /// The largest mapping with a table (512 KiB of `f64`).
    const MAX_TABLE: u64 = 1 << 16;

    fn sample(&mut self, pages: u64, theta: f64, rng: &mut SmallRng) -> u64 {
        if pages > Self::MAX_TABLE {
            return Zipf::new(pages as f64, theta)
                .map_or(0, |z| z.sample(rng) as u64 - 1)
                .min(pages - 1);
        }
        let cdf = self.tables.entry((pages, theta.to_bits())).or_insert_with(|| {
            let mut sum = 0.0;
            let mut cdf: Vec<f64> = (1..=pages)
                .map(|k| {
                    sum += (k as f64).powf(-theta);
                    sum
                })
                .collect();
            for c in &mut cdf {
                *c /= sum;
            }
            cdf
        });
        let u: f64 = rng.random();
        (cdf.partition_point(|&c| c <= u) as u64).min(pages - 1)
    }
}

/// Fault-latency bucket bounds (ns).
const BOUNDS: [u64; 12] = [
    250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 1_000_000,
];
/// One user access in this many is timed for the latency histogram.
const TIME_EVERY: u64 = 64;

/// What the threads share.
/// A guest OS the run drives: the VM's own, or under `--nested` one of
/// the L1 hypervisor's L2 VMs.
struct Guest {
    os: Os,
    /// Its checker (for an L2 VM, a view of the run's at its base).
    ck: Checker,
    /// Its physical memory, as its VMM reaches it.
    memory: GuestMemory,
    /// Where its physical memory is in the VM's (an L2 VM's base in L1).
    base: u64,
}

struct Shared<'a> {
    cfg: &'a RunConfig,
    m: &'a Machine,
    guests: &'a [Guest],
    /// The run's checker (the VM's, and every guest's record).
    ck: &'a Checker,
    /// The L1 hypervisor, under `--nested`.
    l1: Option<&'a crate::nested::L1Hypervisor>,
    stop: AtomicBool,
    next_op: AtomicU64,
    max_ops: u64,
    trace_seq: AtomicU64,
    log: Mutex<Vec<Op>>,
    accesses: Vec<AtomicU64>,
    pause: AtomicBool,
    paused: AtomicUsize,
    running: AtomicUsize,
    host_ops: AtomicU64,
    audits: AtomicU64,
    /// Bumped before and after every dirty-log change (logging on or off, a
    /// harvest): odd while one runs. A write made entirely within one even
    /// value while logging is on must find its page's bit set.
    dirty_epoch: AtomicU64,
    logging: AtomicBool,
    /// Writes made while logging whose bit was not set yet.
    suspects: Mutex<Vec<Suspect>>,
    /// How long each of the VMM's zaps of everything took its caller, ns.
    zap_ns: Mutex<Vec<u64>>,
}

impl<'a> Shared<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: &'a RunConfig,
        m: &'a Machine,
        guests: &'a [Guest],
        ck: &'a Checker,
        l1: Option<&'a crate::nested::L1Hypervisor>,
        max_ops: u64,
        running: usize,
    ) -> Self {
        Shared {
            cfg,
            m,
            guests,
            ck,
            l1,
            stop: AtomicBool::new(false),
            next_op: AtomicU64::new(0),
            max_ops,
            trace_seq: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            accesses: (0..cfg.vcpus).map(|_| AtomicU64::new(0)).collect(),
            pause: AtomicBool::new(false),
            paused: AtomicUsize::new(0),
            running: AtomicUsize::new(running),
            host_ops: AtomicU64::new(0),
            audits: AtomicU64::new(0),
            dirty_epoch: AtomicU64::new(0),
            logging: AtomicBool::new(false),
            suspects: Mutex::new(Vec::new()),
            zap_ns: Mutex::new(Vec::new()),
        }
    }

    /// The guest `c` runs.
    fn guest(&self, c: &Cpu) -> &'a Guest {
        &self.guests[c.vm]
    }

    fn log(&self, actor: Actor, kind: OpKind, seed: u64) -> u64 {
        let seq = self.trace_seq.fetch_add(1, Ordering::Relaxed);
        self.ck.op.store(seq, Ordering::Relaxed);
        // Always kept: a violation writes the trace that led to it.
        self.log.lock().push(Op { seq, actor, kind, seed });
        seq
    }

    fn audit(&self, when: &str) {
        self.audits.fetch_add(1, Ordering::Relaxed);
        for v in self.m.audit() {
            self.ck
                .record(format!("{} MMU audit {when}: {v}", self.m.kind().name()));
        }
    }
}

/// Checks the configuration.
fn validate(cfg: &RunConfig) -> Result<(), RunError> {
    let bad = |s: String| Err(RunError::Config(s));
    if !(1..=64).contains(&cfg.vcpus) {
        return bad(format!("--vcpus must be 1..=64, not {}", cfg.vcpus));
    }
    if cfg.memory < (16 << 20) || !cfg.memory.is_multiple_of(2 << 20) || cfg.memory > (16 << 30) {
        return bad(format!(
            "--memory must be a multiple of 2 MiB from 16 MiB to 16 GiB, not {} bytes",
            cfg.memory
        ));
    }
    if cfg.nested != 0 {
        if !(2..=4).contains(&cfg.nested) {
            return bad(format!("--nested runs 2..=4 L2 VMs, not {}", cfg.nested));
        }
        if cfg.mmu != MmuKind::Tdp {
            return bad(format!(
                "--nested needs --mmu tdp: the L1 hypervisor's nested tables are shadowed on a TDP host (KVM's nested MMU), and the {} MMU is not one",
                cfg.mmu.name()
            ));
        }
        if cfg.workload.vm.dirty_ring != 0 {
            return bad(
                "--nested with --dirty-ring: the nested MMU logs L2's writes into the memslot bitmap only".into(),
            );
        }
        if cfg.record {
            return bad("--nested with --record: traces of nested runs cannot be replayed yet".into());
        }
        if cfg.guest_memory() == 0 {
            return bad(format!(
                "--memory {} MiB is too small for {} L2 VMs of at least {} MiB each (plus 4 MiB of L1's own)",
                cfg.memory >> 20,
                cfg.nested,
                crate::nested::MIN_L2_MEMORY >> 20
            ));
        }
    }
    if cfg.guest_memory() > cfg.paging.max_ram() {
        return bad(format!(
            "--memory {} MiB is more than {} paging's kernel map covers ({} MiB)",
            cfg.guest_memory() >> 20,
            cfg.paging.name(),
            cfg.paging.max_ram() >> 20
        ));
    }
    if let Some(s) = cfg.seconds
        && !(s > 0.0 && s <= 86_400.0)
    {
        return bad(format!("--seconds must be in (0, 86400], not {s}"));
    }
    if cfg.ops == Some(0) {
        return bad("--ops must be at least 1".into());
    }
    if let Err((key, m)) = cfg.workload.validate() {
        return bad(format!("workload {}: {key}: {m}", cfg.workload.name));
    }
    if let Err((knob, m)) = cfg.workload.vm.validate(cfg.mmu, cfg.paging.mode()) {
        return bad(format!("--{knob}: {m}"));
    }
    Ok(())
}

/// What [`boot`] makes: the machine, its guests (the VM's own OS, or the
/// L2 VMs' under `--nested`), the run's checker, the L1 hypervisor, and
/// each run vCPU's seat.
type Booted = (
    Machine,
    Vec<Guest>,
    Checker,
    Option<Arc<crate::nested::L1Hypervisor>>,
    Vec<Seat>,
);

/// A run vCPU: its vCPU of each guest (one, or one per L2 VM), and which
/// it runs. Under `--nested` one vCPU object runs them all in turn (the
/// others are parked), so L1's switches go through its nested MMU
/// context's `prev_roots`, as KVM's do.
struct Seat {
    cpus: Vec<Cpu>,
    active: usize,
}

/// Boots the machine and the OS (each L2 VM's, under `--nested`), and each
/// vCPU's boot processes.
fn boot(cfg: &RunConfig) -> Result<Booted, RunError> {
    validate(cfg)?;
    let setup = |e: &dyn std::fmt::Display| RunError::Setup(e.to_string());
    let m = Machine::with_config(cfg.mmu, cfg.memory, cfg.workload.vm).map_err(|e| setup(&e))?;
    m.set_policies(cfg.policies);
    let format = cfg.guest_format();
    let ck = Checker::new(cfg.check, cfg.mmu.name(), cfg.memory);
    let l1 = match cfg.nested {
        0 => None,
        n => Some(Arc::new(
            crate::nested::L1Hypervisor::new(&m, cfg.vcpus, n).map_err(|e| setup(&e))?,
        )),
    };
    let mut guests = Vec::new();
    match &l1 {
        None => guests.push(Guest {
            os: Os::boot(format, &m.memory(), cfg.memory, cfg.vcpus).map_err(|e| setup(&e))?,
            ck: ck.for_guest(0, cfg.mmu.name()),
            memory: m.memory(),
            base: 0,
        }),
        Some(l1) => {
            for (i, vm) in l1.vms.iter().enumerate() {
                let memory = l1.l2_memory(&m, i).map_err(|e| setup(&e))?;
                guests.push(Guest {
                    os: Os::boot(format, &memory, vm.size, cfg.vcpus).map_err(|e| setup(&e))?,
                    ck: ck.for_guest(vm.base, "nested"),
                    memory,
                    base: vm.base,
                });
            }
        }
    }
    let mut seats = Vec::new();
    for id in 0..cfg.vcpus {
        let mut cpus = Vec::new();
        for (vm, g) in guests.iter().enumerate() {
            let v = match &l1 {
                None => m.vcpu(id as u16 + 1, format.regs(), g.os.kernel_cr3()),
                Some(l1) => {
                    let mut v = m
                        .nested_vcpu(id as u16 + 1, l1.l1_nested(vm))
                        .ok_or_else(|| setup(&"a TDP machine without a nested MMU"))?;
                    // VM entry into the L2 guest in its boot state.
                    v.vm_entry(format.regs(), g.os.kernel_cr3(), [0; 4], 0);
                    Ok(v)
                }
            }
            .map_err(|e| setup(&e))?;
            let mut gc = GuestCpu::new(id, v).with_dirty_rings(m.dirty_rings());
            if let Some(l1) = &l1 {
                gc = gc.with_l1(l1.clone(), vm);
                // PAE: the PDPTEs of the kernel's root, through L1's tables.
                gc.mov_cr3(g.os.kernel_cr3()).map_err(|e| setup(&e))?;
            }
            cpus.push(Cpu {
                vm,
                saved: None,
                g: gc,
                tasks: Vec::new(),
                cur: 0,
                hist: [0; BOUNDS.len() + 1],
                ops: 0,
                isolation: (0, 0),
                zipf: ZipfTables::default(),
            });
        }
        seats.push(Seat {
            cpus,
            active: id % guests.len(),
        });
    }
    let w = &cfg.workload;
    let threads = (w.threads as usize).min(cfg.vcpus) as u32;
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let fail = |id: usize, e: OsError| match e {
        // Not a failure of the MMU: the configuration does not fit.
        OsError::Oom => RunError::Config(format!(
            "--memory {} MiB is too small for the workload's boot processes on {} vCPUs \
             (vCPU {id} ran out of guest memory booting them)",
            cfg.memory >> 20,
            cfg.vcpus
        )),
        e => RunError::Vcpu {
            vcpu: id,
            error: format!("booting processes: {e}"),
        },
    };
    for (vm, g) in guests.iter().enumerate() {
        let os = &g.os;
        for id in 0..cfg.vcpus {
            for _ in 0..w.processes {
                let c = &mut seats[id].cpus[vm];
                let mm = os.create_mm(&mut c.g, &g.ck, threads).map_err(|e| fail(id, e))?;
                for _ in 0..w.mappings {
                    let huge = rng.random_bool(w.huge);
                    os.mmap(&mm, w.mapping_pages, true, huge, w.spread, rng.random());
                }
                for t in 0..threads {
                    let on = (id + t as usize) % cfg.vcpus;
                    seats[on].cpus[vm].tasks.push(Task {
                        mm: mm.clone(),
                        thread: t,
                        cursor: 0,
                    });
                }
            }
        }
    }
    for seat in &mut seats {
        for c in &mut seat.cpus {
            let first = c.tasks[0].mm.clone();
            let os = &guests[c.vm].os;
            c.g.switch_to(os, Some(&first)).map_err(|e| fail(c.g.id, e))?;
        }
        // Under --nested: park all but the active VM's vCPU state (L1's
        // VMCS12 guest state), and run them all on the active one's vCPU.
        if seat.cpus.len() > 1 {
            for c in &mut seat.cpus {
                let v = &c.g.vcpu;
                c.saved = Some((v.regs(), v.cr3(), v.pdptes(), v.pkru()));
            }
            let a = seat.active;
            seat.cpus[a].saved = None;
        }
    }
    Ok((m, guests, ck, l1, seats))
}

/// L1 switches seat `seat`'s vCPU to L2 VM `to` (a VM entry with VM
/// `to`'s nested paging and VMCS12 guest state, from `prev_roots` when the
/// nested MMU can).
fn l2_switch(l1: &crate::nested::L1Hypervisor, seat: &mut Seat, to: usize) {
    let from = seat.active;
    if from == to {
        return;
    }
    let v = &seat.cpus[from].g.vcpu;
    seat.cpus[from].saved = Some((v.regs(), v.cr3(), v.pdptes(), v.pkru()));
    let (a, b) = if from < to {
        let (lo, hi) = seat.cpus.split_at_mut(to);
        (&mut lo[from], &mut hi[0])
    } else {
        let (lo, hi) = seat.cpus.split_at_mut(from);
        (&mut hi[0], &mut lo[to])
    };
    std::mem::swap(&mut a.g.vcpu, &mut b.g.vcpu);
    let (regs, cr3, pdptes, pkru) = b.saved.take().expect("a parked VM's state is saved");
    b.g.vcpu.set_l1_nested(l1.l1_nested(to));
    b.g.vcpu.vm_entry(regs, cr3, pdptes, pkru);
    seat.active = to;
    l1.stats.switches.fetch_add(1, Ordering::Relaxed);
}

/// Runs `cfg`; `progress` is called about every 50 ms.
pub fn run(cfg: &RunConfig, progress: &(dyn Fn(Progress) + Sync)) -> Result<RunOutcome, RunError> {
    run_with(cfg, &Injection::default(), progress)
}

/// Test-only: [`run`] with `inject`'s bugs armed on the simulator's
/// threads, to prove the checker catches them.
#[cfg(feature = "shuttle")]
#[doc(hidden)]
pub fn run_injected(
    cfg: &RunConfig,
    inject: &Injection,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RunOutcome, RunError> {
    run_with(cfg, inject, progress)
}

fn run_with(cfg: &RunConfig, inject: &Injection, progress: &(dyn Fn(Progress) + Sync)) -> Result<RunOutcome, RunError> {
    let (m, guests, ck, l1, seats) = boot(cfg)?;
    let (os, ck) = (&guests, &ck);
    let max_ops = if cfg.seconds.is_some() {
        u64::MAX
    } else {
        cfg.ops.unwrap_or(cfg.workload.ops)
    };
    let sh = Shared::new(cfg, &m, os, ck, l1.as_deref(), max_ops, cfg.vcpus);
    let start = Instant::now();
    let deadline = cfg.seconds.map(Duration::from_secs_f64);
    let fraction = |sh: &Shared| match deadline {
        Some(d) => (start.elapsed().as_secs_f64() / d.as_secs_f64()).min(1.0),
        None => (sh.next_op.load(Ordering::Relaxed) as f64 / max_ops as f64).min(1.0),
    };
    let mut timeline = Vec::new();
    let mut peak = 0u64;
    let mut migration: Option<MigrationReport> = None;
    let results: Vec<Result<Seat, RunError>> = std::thread::scope(|s| {
        let handles: Vec<_> = seats
            .into_iter()
            .map(|c| {
                let sh = &sh;
                s.spawn(move || {
                    // Counted out on every exit, a panic's unwinding too:
                    // the VMM loop and a migration's pause wait for it.
                    let _out = Running(&sh.running);
                    vmmu::sync::with_bugs(&inject.vcpu, || vcpu_thread(sh, c))
                })
            })
            .collect();
        let host = cfg.churn().then(|| {
            let sh = &sh;
            s.spawn(move || vmmu::sync::with_bugs(&inject.host, || host_thread(sh)))
        });
        // The VMM: timeline, audits, zap-all, live migration.
        vmmu::sync::with_bugs(&inject.vmm, || {
            let mut last_audit = Instant::now();
            let mut last_zap = Instant::now();
            let mut migrations = 0u64;
            while sh.running.load(Ordering::Acquire) > 0 {
                if deadline.is_some_and(|d| start.elapsed() >= d) {
                    sh.stop.store(true, Ordering::Relaxed);
                }
                let bytes = m.mmu_bytes();
                peak = peak.max(bytes);
                timeline.push(Sample {
                    t: start.elapsed().as_secs_f64(),
                    accesses: sh.accesses.iter().map(|a| a.load(Ordering::Relaxed)).sum(),
                    faults: m.stats().pf_taken.max(0) as u64,
                    mmu_bytes: bytes,
                });
                progress(Progress {
                    fraction: fraction(&sh),
                    accesses: timeline.last().map_or(0, |s| s.accesses),
                    violations: ck.violations(),
                });
                let f = fraction(&sh);
                // One migration per run (per 5 s in a timed run), started
                // a third of the way in.
                let due = match deadline {
                    Some(d) => {
                        start.elapsed().as_secs_f64() >= 5.0 * migrations as f64 + d.as_secs_f64().min(5.0) / 3.0
                    }
                    None => migrations == 0 && f >= 0.33,
                };
                // (A short run on a busy machine may pass 95% between two
                // looks: its one migration is still owed.)
                if cfg.migrates() && due && (f < 0.95 || (deadline.is_none() && migrations == 0)) {
                    migrations += 1;
                    add_migration(&mut migration, migrate(&sh));
                }
                if cfg.check != CheckLevel::Off && last_audit.elapsed() >= Duration::from_millis(100) {
                    sh.audit("during the run");
                    last_audit = Instant::now();
                }
                if cfg.churn() && last_zap.elapsed() >= Duration::from_millis(400) {
                    sh.log(Actor::Vmm, OpKind::ZapAll, 0);
                    let t = Instant::now();
                    m.zap_all();
                    sh.zap_ns.lock().push(t.elapsed().as_nanos() as u64);
                    last_zap = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // Every vCPU finished before a look saw the run a third done:
            // the owed migration runs now, over the memory they left.
            if cfg.migrates() && deadline.is_none() && migrations == 0 {
                add_migration(&mut migration, migrate(&sh));
            }
            sh.stop.store(true, Ordering::Relaxed);
        });
        let cpus = handles
            .into_iter()
            .enumerate()
            .map(|(vcpu, h)| {
                h.join().unwrap_or_else(|p| {
                    Err(RunError::Vcpu {
                        vcpu,
                        error: format!("panicked: {}", panic_message(&*p)),
                    })
                })
            })
            .collect();
        // The host model checks its own invariants (a frame freed twice, a
        // table it cannot walk): one broken by the MMU (a guest write through
        // a stale SPTE into a frame the host reused) is a violation.
        if let Some(Err(p)) = host.map(|h| h.join()) {
            ck.record(format!(
                "{} MMU: the host model failed ({}): host memory corrupted, e.g. through a stale SPTE",
                cfg.mmu.name(),
                panic_message(&*p)
            ));
        }
        cpus
    });
    let cpus: Vec<Cpu> = results
        .into_iter()
        .collect::<Result<Vec<Seat>, RunError>>()?
        .into_iter()
        .flat_map(|s| s.cpus)
        .collect();
    let seconds = start.elapsed().as_secs_f64();
    finish(&sh, cpus, seconds, timeline, peak, migration)
}

/// Adds one migration's figures to the run's.
fn add_migration(total: &mut Option<MigrationReport>, r: MigrationReport) {
    let total = total.get_or_insert_with(MigrationReport::default);
    total.migrations += 1;
    total.rounds += r.rounds;
    total.pages_copied += r.pages_copied;
    total.downtime_pages += r.downtime_pages;
    total.bytes_compared += r.bytes_compared;
    total.mismatched_pages += r.mismatched_pages;
}

/// The end of a run: final audit, the record checked against the
/// tables, the report.
fn finish(
    sh: &Shared,
    cpus: Vec<Cpu>,
    seconds: f64,
    mut timeline: Vec<Sample>,
    peak: u64,
    migration: Option<MigrationReport>,
) -> Result<RunOutcome, RunError> {
    let (m, ck, cfg) = (sh.m, sh.ck, sh.cfg);
    sh.audit("at the end");
    // Every leaf the OS recorded is what the tables in memory say.
    if ck.level == CheckLevel::Full {
        let regs = cfg.guest_format().regs();
        let mut seen = std::collections::HashSet::new();
        for c in &cpus {
            let g = sh.guest(c);
            for t in &c.tasks {
                if !seen.insert((c.vm, t.mm.id)) {
                    continue;
                }
                let st = t.mm.state.read();
                for (vpn, l) in st.leaves() {
                    let va = vpn << 12;
                    if let Err(e) = g.ck.walk_matches(&g.memory, &regs, t.mm.root, va, Some(l.gfn << 12)) {
                        g.ck.record(format!("at the end, process {}: {e}", t.mm.id));
                    }
                }
            }
        }
    }
    let os_stat = |f: fn(&crate::guest::OsStats) -> &AtomicU64| -> u64 {
        sh.guests.iter().map(|g| f(&g.os.stats).load(Ordering::Relaxed)).sum()
    };
    let stats = m.stats();
    let (shadow_pages, unsync_pages) = m.shadow_pages();
    let mut vs = vmmu::cpu::vcpu::VcpuStats::default();
    let mut hist = [0u64; BOUNDS.len() + 1];
    let mut accesses = 0;
    let mut operations = 0;
    for c in &cpus {
        let s = c.g.vcpu.stats();
        vs.tlb_hits += s.tlb_hits;
        vs.walks += s.walks;
        vs.walk_refs += s.walk_refs;
        vs.ept_violations += s.ept_violations;
        vs.ept_misconfigs += s.ept_misconfigs;
        vs.shadow_exits += s.shadow_exits;
        vs.root_reloads += s.root_reloads;
        vs.cached_roots_dropped += s.cached_roots_dropped;
        accesses += c.g.accesses;
        operations += c.ops;
        for (h, x) in hist.iter_mut().zip(c.hist) {
            *h += x;
        }
    }
    let bytes = m.mmu_bytes();
    let (peak, limit) = (
        peak.max(bytes).max(m.mmu_peak_bytes()),
        m.mmu_limit_bytes(cfg.vcpus as u64),
    );
    if peak > limit {
        ck.record(format!(
            "{} MMU: page-table memory peaked at {peak} bytes, above its limit of {limit}",
            m.kind().name()
        ));
    }
    timeline.push(Sample {
        t: seconds,
        accesses,
        faults: stats.pf_taken.max(0) as u64,
        mmu_bytes: bytes,
    });
    let roots = stats.prev_roots_hit + stats.prev_roots_miss;
    let host = m.host.stats();
    if host.walks_astray > 0 {
        ck.record(format!(
            "host: {} checked walk(s) read a frame as a page table that was none, or returned a page table as a leaf's frame",
            host.walks_astray
        ));
    }
    let mut zap_ns = std::mem::take(&mut *sh.zap_ns.lock());
    zap_ns.sort_unstable();
    let report = MmuRunReport {
        mmu: m.kind().name().into(),
        workload: cfg.workload.name.clone(),
        paging: cfg.paging.name().into(),
        config: if cfg.policies.flags().is_empty() {
            cfg.workload.vm.flags()
        } else {
            format!("{} {}", cfg.workload.vm.flags(), cfg.policies.flags())
        },
        vcpus: cfg.vcpus as u64,
        memory: cfg.memory,
        operations,
        accesses,
        seconds,
        accesses_per_sec: if seconds > 0.0 { accesses as f64 / seconds } else { 0.0 },
        tlb_hits: vs.tlb_hits,
        walks: vs.walks,
        walk_refs: vs.walk_refs,
        exits: vs.ept_violations + vs.ept_misconfigs + vs.shadow_exits,
        guest_faults: os_stat(|s| &s.guest_faults),
        guest_tlb_flushes: os_stat(|s| &s.flushes),
        shootdowns: os_stat(|s| &s.shootdowns),
        processes: os_stat(|s| &s.processes),
        shadow_pages,
        unsync_pages,
        prev_roots_hit_rate: if roots > 0 {
            stats.prev_roots_hit as f64 / roots as f64
        } else {
            0.0
        },
        mmu_memory_bytes: bytes,
        mmu_memory_peak_bytes: peak,
        mmu_memory_limit_bytes: limit,
        adversarial_ops: os_stat(|s| &s.adversarial),
        notifier_events: host.invalidations,
        host_operations: sh.host_ops.load(Ordering::Relaxed),
        audits: sh.audits.load(Ordering::Relaxed),
        root_reloads: vs.root_reloads,
        cached_roots_dropped: vs.cached_roots_dropped,
        zaps: zap_ns.len() as u64,
        zap_p50_us: zap_ns.get(zap_ns.len() / 2).map_or(0.0, |&n| n as f64 / 1e3),
        zap_max_us: zap_ns.last().map_or(0.0, |&n| n as f64 / 1e3),
        stats,
        migration,
        violations: ck.violations(),
        violation_details: ck.details(),
        timeline,
        fault_latency: LatencyHistogram {
            bounds_ns: BOUNDS.to_vec(),
            counts: hist.to_vec(),
        },
        nested: sh.l1.map(|l1| {
            let stats = m.nested_stats().unwrap_or_default();
            let roots = stats.prev_roots_hit + stats.prev_roots_miss;
            crate::report::NestedRunReport {
                vendor: match l1.vendor() {
                    vmmu::arch::control::Vendor::Intel => "intel".into(),
                    vmmu::arch::control::Vendor::Amd => "amd".into(),
                },
                vms: l1.vms.len() as u64,
                vm_memory: l1.vms[0].size,
                l1_exits: l1.stats.exits.load(Ordering::Relaxed),
                l1_mapped: l1.stats.mapped.load(Ordering::Relaxed),
                l1_unmapped: l1.stats.unmapped.load(Ordering::Relaxed),
                switches: l1.stats.switches.load(Ordering::Relaxed),
                invalidations: l1.stats.invalidations.load(Ordering::Relaxed),
                prev_roots_hit_rate: if roots > 0 {
                    stats.prev_roots_hit as f64 / roots as f64
                } else {
                    0.0
                },
                stats,
            }
        }),
    };
    // (A nested run's operations do not replay: --record refuses it.)
    let trace = ((cfg.record || ck.violations() > 0) && cfg.nested == 0).then(|| {
        let mut ops = std::mem::take(&mut *sh.log.lock());
        ops.sort_by_key(|o| o.seq);
        Trace {
            header: TraceHeader {
                paging: cfg.paging.name().into(),
                vcpus: cfg.vcpus,
                memory: cfg.memory,
                seed: cfg.seed,
                host_churn: cfg.churn(),
                migrate: cfg.migrates(),
                workload: cfg.workload.clone(),
                policies: cfg.policies.assignments(),
            },
            ops,
        }
    });
    Ok(RunOutcome { report, trace })
}

fn vcpu_thread(sh: &Shared, mut seat: Seat) -> Result<Seat, RunError> {
    let w = &sh.cfg.workload;
    let id = seat.cpus[seat.active].g.id;
    let mut rng = SmallRng::seed_from_u64(sh.cfg.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(id as u64 + 1)));
    let weights = weights(w);
    let total: u64 = weights.iter().map(|(_, w)| *w).sum();
    while !sh.stop.load(Ordering::Relaxed) {
        if sh.pause.load(Ordering::Acquire) {
            sh.paused.fetch_add(1, Ordering::AcqRel);
            while sh.pause.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_micros(100));
            }
            sh.paused.fetch_sub(1, Ordering::AcqRel);
        }
        if sh.next_op.fetch_add(1, Ordering::Relaxed) >= sh.max_ops {
            break;
        }
        let mut pick = rng.random_range(0..total);
        let kind = weights
            .iter()
            .find(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
            .map_or(OpKind::Touch, |(k, _)| *k);
        let seed = rng.random();
        if let Some(l1) = sh.l1 {
            // L1's own work on this vCPU, between its L2's operations: a
            // switch to another L2 VM (1 in 16), or taking memory back
            // from one (1 in 32).
            match rng.random_range(0..32) {
                0 | 1 => {
                    let to = rng.random_range(0..seat.cpus.len());
                    sh.log(Actor::Vcpu(id as u32), OpKind::L2Switch, to as u64);
                    l2_switch(l1, &mut seat, to);
                }
                2 => {
                    let vm = rng.random_range(0..l1.vms.len());
                    sh.log(Actor::Vcpu(id as u32), OpKind::L1Unmap, seed);
                    if let Err(e) = l1.unmap(id, vm, seed) {
                        return Err(RunError::Vcpu {
                            vcpu: id,
                            error: format!("L1 taking back memory of L2 VM {vm}: {e}"),
                        });
                    }
                }
                _ => {}
            }
        }
        let c = &mut seat.cpus[seat.active];
        if let Some(l1) = sh.l1 {
            // L1's invalidations this vCPU owes (its IPIs).
            l1.run_pending(id, seat.active, &mut c.g.vcpu);
        }
        sh.log(Actor::Vcpu(c.g.id as u32), kind, seed);
        if let Err(e) = guest_op(sh, c, kind, seed) {
            // What the checker saw explains a vCPU that failed (e.g. a
            // walk of an invalid root makes no progress).
            check_isolation(sh, c, kind);
            if let OsError::Vcpu(
                v @ (vmmu::cpu::vcpu::VcpuError::Livelock { .. } | vmmu::cpu::vcpu::VcpuError::NoProgress { .. }),
            ) = &e
            {
                // An access that cannot complete is the MMU's failure, not
                // the run's: a violation with the state that caused it,
                // and this vCPU stops (the others go on).
                sh.ck.record(format!(
                    "{} MMU, vCPU {} ({} operation): an access made no progress: {v}",
                    sh.m.kind().name(),
                    c.g.id,
                    kind.name()
                ));
                return Ok(seat);
            }
            let mut error = e.to_string();
            if let Some(first) = sh.ck.details().first() {
                error.push_str(&format!(
                    " (the checker found {} violation(s), first: {first})",
                    sh.ck.violations()
                ));
            }
            return Err(RunError::Vcpu { vcpu: c.g.id, error });
        }
        let total: u64 = seat.cpus.iter().map(|c| c.g.accesses).sum();
        sh.accesses[id].store(total, Ordering::Relaxed);
    }
    Ok(seat)
}

fn weights(w: &Workload) -> [(OpKind, u64); 12] {
    let m = w.mix;
    [
        (OpKind::Touch, m.touch),
        (OpKind::Mmap, m.mmap),
        (OpKind::Munmap, m.munmap),
        (OpKind::Mprotect, m.mprotect),
        (OpKind::Fork, m.fork),
        (OpKind::Exit, m.exit),
        (OpKind::Switch, m.switch),
        (OpKind::Remap, m.remap),
        (OpKind::Spawn, m.spawn),
        (OpKind::SelfMap, m.self_map),
        (OpKind::RecursiveMap, m.recursive_map),
        (OpKind::CrToggle, m.cr_toggle),
    ]
    .map(|(k, w)| (k, u64::from(w)))
}

/// A random mapping of `mm` and a sub-range of it: `(vma, start, end)`.
fn pick_range(mm: &Mm, rng: &mut SmallRng) -> Option<(Vma, u64, u64)> {
    let st = mm.state.read();
    let n = st.vmas().count();
    if n == 0 {
        return None;
    }
    let v = *st.vmas().nth(rng.random_range(0..n))?;
    let pages = v.pages();
    if rng.random_bool(0.5) {
        return Some((v, v.start, v.end));
    }
    let a = rng.random_range(0..pages);
    let b = rng.random_range(a + 1..=pages.min(a + 1 + pages / 2));
    Some((v, v.start + (a << 12), v.start + (b << 12)))
}

/// One guest operation on vCPU `c`.
fn guest_op(sh: &Shared, c: &mut Cpu, kind: OpKind, seed: u64) -> Result<(), OsError> {
    let g = sh.guest(c);
    let (os, ck, w) = (&g.os, &g.ck, &sh.cfg.workload);
    let mut rng = SmallRng::seed_from_u64(seed);
    tracing::debug!(target: "vmmu_guest_op", vcpu = c.g.id, kind = kind.name(), cr3 = c.tasks[c.cur].mm.root);
    c.ops += 1;
    c.g.process_mailbox(os)?;
    let mm = c.tasks[c.cur].mm.clone();
    let r = match kind {
        OpKind::Touch => touch(sh, c, &mut rng),
        OpKind::Mmap => {
            if mm.state.read().vmas().count() < 4 * w.mappings as usize {
                let pages = (w.mapping_pages / 2 + rng.random_range(0..=w.mapping_pages)).max(1);
                let huge = rng.random_bool(w.huge);
                os.mmap(&mm, pages, true, huge, w.spread, rng.random());
            }
            Ok(())
        }
        OpKind::Munmap => match pick_range(&mm, &mut rng) {
            // Keep at least one mapping to touch.
            Some((_, a, b)) if mm.state.read().vmas().count() > 1 => os.munmap(&mut c.g, ck, &mm, a, b).map(|_| ()),
            _ => Ok(()),
        },
        OpKind::Mprotect => match pick_range(&mm, &mut rng) {
            Some((v, a, b)) => os.mprotect(&mut c.g, ck, &mm, a, b, !v.writable),
            None => Ok(()),
        },
        OpKind::Remap => match pick_range(&mm, &mut rng) {
            Some((v, a, _)) => os.remap(&mut c.g, ck, &mm, v.id, (a - v.start) >> 12, 8).map(|_| ()),
            None => Ok(()),
        },
        OpKind::Fork => {
            if os.live_processes() < w.max_processes && os.free_frames() > 4096 {
                let child = os.fork(&mut c.g, ck, &mm)?;
                c.tasks.push(Task {
                    mm: child,
                    thread: 0,
                    cursor: 0,
                });
            }
            Ok(())
        }
        OpKind::Exit => {
            if c.tasks.len() > 1 {
                let gone = c.tasks.remove(c.cur);
                c.cur = rng.random_range(0..c.tasks.len());
                let next = c.tasks[c.cur].mm.clone();
                c.g.switch_to(os, Some(&next))?;
                os.exit(&gone.mm);
            }
            Ok(())
        }
        OpKind::Switch => {
            if c.tasks.len() > 1 {
                c.cur = rng.random_range(0..c.tasks.len());
                let next = c.tasks[c.cur].mm.clone();
                c.g.switch_to(os, Some(&next))?;
            }
            Ok(())
        }
        OpKind::Spawn => spawn(sh, c, &mut rng),
        OpKind::SelfMap => os.self_map(&mut c.g, ck, &g.memory, &mm, &mut rng, w.touches.min(4096)),
        OpKind::RecursiveMap => os.recursive_map(&mut c.g, ck, &g.memory, &mm, &mut rng, w.touches.min(4096)),
        OpKind::CrToggle => os.toggle_controls(&mut c.g, ck, &g.memory, &mm, &mut rng, w.touches.min(4096)),
        _ => Ok(()),
    };
    match r {
        Err(OsError::Oom) | Err(OsError::Kernel) => {}
        other => other?,
    }
    if ck.level == CheckLevel::Full {
        check_tables(sh, g, &c.tasks[c.cur].mm, &mut rng);
    }
    check_isolation(sh, c, kind);
    Ok(())
}

/// The hardware model's isolation counters: an access that reached a
/// frame the host had freed, or a walk of a root the vCPU had been told
/// to drop, is a violation.
fn check_isolation(sh: &Shared, c: &mut Cpu, kind: OpKind) {
    let s = c.g.vcpu.stats();
    let now = (s.freed_frame_accesses, s.invalid_root_uses);
    if now.0 > c.isolation.0 {
        sh.ck.record(format!(
            "vCPU {}, {} MMU: {} access(es) during a {} reached a frame the host had freed",
            c.g.id,
            sh.m.kind().name(),
            now.0 - c.isolation.0,
            kind.name()
        ));
    }
    if now.1 > c.isolation.1 {
        sh.ck.record(format!(
            "vCPU {}, {} MMU: {} walk(s) during a {} used an invalid root after the vCPU had acknowledged \
             the request to drop it",
            c.g.id,
            sh.m.kind().name(),
            now.1 - c.isolation.1,
            kind.name()
        ));
    }
    c.isolation = now;
}

/// A fresh single-threaded process with one mapping, run here at once;
/// past this vCPU's share of `max_processes`, its oldest other process
/// ends (a shell running short commands).
fn spawn(sh: &Shared, c: &mut Cpu, rng: &mut SmallRng) -> Result<(), OsError> {
    let g = sh.guest(c);
    let (os, ck, w) = (&g.os, &g.ck, &sh.cfg.workload);
    let share = (w.max_processes as usize / sh.cfg.vcpus).max(2);
    if c.tasks.len() >= share {
        // Make room: the oldest single-threaded process not running ends.
        if let Some(i) = (0..c.tasks.len()).find(|&i| i != c.cur && c.tasks[i].mm.nthreads == 1) {
            let gone = c.tasks.remove(i);
            if i < c.cur {
                c.cur -= 1;
            }
            os.exit(&gone.mm);
        }
    }
    if os.live_processes() < w.max_processes && os.free_frames() > 4096 {
        let mm = os.create_mm(&mut c.g, ck, 1)?;
        os.mmap(&mm, w.mapping_pages, true, false, w.spread, rng.random());
        c.tasks.push(Task {
            mm: mm.clone(),
            thread: 0,
            cursor: 0,
        });
        c.cur = c.tasks.len() - 1;
        c.g.switch_to(os, Some(&mm))?;
    }
    Ok(())
}

/// Checks a few addresses of `mm` in the tables in memory against the
/// OS's record.
fn check_tables(sh: &Shared, g: &Guest, mm: &Mm, rng: &mut SmallRng) {
    let st = mm.state.read();
    let vmas: Vec<Vma> = st.vmas().copied().collect();
    if vmas.is_empty() {
        return;
    }
    let regs = sh.cfg.guest_format().regs();
    for _ in 0..4 {
        let v = vmas[rng.random_range(0..vmas.len())];
        let va = v.start + (rng.random_range(0..v.pages()) << 12);
        let want = st.translate(&g.os.format, va).map(|(g, _)| g);
        if let Err(e) = g.ck.walk_matches(&g.memory, &regs, mm.root, va, want) {
            g.ck.record(format!("process {}: {e}", mm.id));
        }
    }
}

/// The OS's record of recently touched pages, for the checker: valid while
/// the process's mm lock is held without a break (the record only changes
/// under the lock held for writing), so `touch` empties it whenever it
/// lets the lock go.
struct RecordCache {
    /// By 4 KiB page number: (page number, gpa of the page, leaf).
    pages: [Option<(u64, u64, Leaf)>; 64],
}

impl Default for RecordCache {
    fn default() -> RecordCache {
        RecordCache { pages: [None; 64] }
    }
}

impl RecordCache {
    /// [`MmState::translate`], remembered per 4 KiB page.
    #[inline]
    fn translate(&mut self, st: &MmState, format: &PagingFormat, va: u64) -> Option<(u64, Leaf)> {
        let vpn = va >> 12;
        let slot = &mut self.pages[vpn as usize % 64];
        if let Some((v, gpa, leaf)) = *slot
            && v == vpn
        {
            return Some((gpa | (va & 0xfff), leaf));
        }
        let (gpa, leaf) = st.translate(format, va)?;
        *slot = Some((vpn, gpa & !0xfff, leaf));
        Some((gpa, leaf))
    }
}

/// User accesses to one mapping of the current process (kept out of line:
/// its loop is the simulator's hot path, and compiles better alone).
#[inline(never)]
fn touch(sh: &Shared, c: &mut Cpu, rng: &mut SmallRng) -> Result<(), OsError> {
    let g = sh.guest(c);
    let (os, ck, w) = (&g.os, &g.ck, &sh.cfg.workload);
    let mut l1_exits = 0u32;
    let nested = c.g.l1().is_some();
    let task = c.tasks[c.cur].clone();
    let mm = &task.mm;
    let mut st = mm.state.read();
    c.g.process_mailbox(os)?;
    let n = st.vmas().count();
    if n == 0 {
        drop(st);
        os.mmap(mm, w.mapping_pages, true, false, w.spread, rng.random());
        return Ok(());
    }
    let mut vma = *st.vmas().nth(rng.random_range(0..n)).expect("n > 0");
    let pages = vma.pages();
    let stripes = mm.nthreads.clamp(1, 64) as u64;
    let lines = 64 / stripes;
    // This thread's lane of each page: the lines it alone writes.
    let lane = u64::from(task.thread) % stripes;
    // One 64-bit draw per access: bits 0..32 pick the page (uniform),
    // 32..48 the line, 48..64 whether it writes.
    let write_below = (w.write_ratio * 65536.0) as u64;
    let mut cursor = task.cursor;
    let id = c.g.id;
    // Guest mode is held from one access to the next; the run ends before
    // the guest's fault handler, which takes locks.
    let mut run = c.g.user_run();
    let mut records = RecordCache::default();
    'touches: for i in 0..u64::from(w.touches) {
        let r = rng.next_u64();
        let page = match w.pattern {
            Pattern::Sequential => (cursor + i) % pages,
            Pattern::Uniform => ((r & 0xffff_ffff) * pages) >> 32,
            Pattern::Zipfian => c.zipf.sample(pages, w.zipf_theta, rng),
            Pattern::Strided => (cursor + i * w.stride_pages) % pages,
        };
        let line = if w.pattern == Pattern::Sequential {
            (((cursor + i) / pages) % lines) * stripes + lane
        } else {
            ((((r >> 32) & 0xffff) * lines) >> 16) * stripes + lane
        };
        let va = vma.start + (page << 12) + line * 64;
        let write = vma.writable && (r >> 48) < write_below;
        let stamp = if write { run.next_stamp() } else { 0 };
        let kind = if write { AccessKind::Write } else { AccessKind::Read };
        let mut faults = 0;
        loop {
            let n = *run.accesses();
            let timed = n.is_multiple_of(TIME_EVERY);
            let exits_before = if timed { exits(run.vcpu()) } else { 0 };
            let t0 = timed.then(Instant::now);
            let epoch = if write {
                sh.dirty_epoch.load(Ordering::SeqCst)
            } else {
                1
            };
            let r = run.access(va, kind, 3, 8, stamp)?;
            if let Some(t0) = t0
                && exits(run.vcpu()) != exits_before
            {
                let ns = t0.elapsed().as_nanos() as u64;
                let b = BOUNDS.iter().position(|&b| ns < b).unwrap_or(BOUNDS.len());
                c.hist[b] += 1;
            }
            *run.accesses() += 1;
            let checked = ck.checks(n);
            // The OS's record, read only when something needs it.
            let needs = checked || (write && ck.level != CheckLevel::Off) || !matches!(r, AccessResult::Done { .. });
            let expect = if needs {
                records.translate(&st, &os.format, va)
            } else {
                None
            };
            match r {
                AccessResult::Done { gpa, value, mmio } => {
                    if checked {
                        match expect {
                            None => ck.violation(
                                id,
                                va,
                                gpa.raw(),
                                "#PF (not mapped)",
                                &format!("an access to gpa {:#x}", gpa.raw()),
                            ),
                            Some((e, l)) => {
                                if e != gpa.raw() || mmio {
                                    ck.violation(
                                        id,
                                        va,
                                        gpa.raw(),
                                        &format!("gpa {e:#x}"),
                                        &format!("gpa {:#x} (mmio {mmio})", gpa.raw()),
                                    );
                                } else if write && !l.writable {
                                    ck.violation(id, va, e, "#PF (write to a read-only page)", "the write completed");
                                } else if !write {
                                    let want = ck.oracle().get(e);
                                    if value != want {
                                        ck.violation(
                                            id,
                                            va,
                                            e,
                                            &format!("{want:#x} (the last value written)"),
                                            &format!("{value:#x}"),
                                        );
                                    }
                                }
                            }
                        }
                    }
                    if write
                        && ck.level != CheckLevel::Off
                        && let Some((e, _)) = expect
                    {
                        ck.oracle().set(e, stamp);
                        // The log is L1's (the VM's): the page at the guest's base.
                        check_logged(sh, id, run.vcpu(), va, g.base + gpa.raw(), epoch);
                    }
                    break;
                }
                AccessResult::Fault(GuestFault::PageFault { error_code, .. }) => {
                    let want = match expect {
                        None => Some(
                            PfErrorCode::USER
                                | if write {
                                    PfErrorCode::WRITE
                                } else {
                                    PfErrorCode::empty()
                                },
                        ),
                        Some((_, l)) if write && !l.writable => {
                            Some(PfErrorCode::USER | PfErrorCode::WRITE | PfErrorCode::PRESENT)
                        }
                        Some(_) => None,
                    };
                    if want != Some(error_code) {
                        ck.violation(
                            id,
                            va,
                            expect.map_or(0, |e| e.0),
                            &format!("{want:?}"),
                            &format!("#PF {error_code:?}"),
                        );
                        break;
                    }
                    faults += 1;
                    if faults > 4 {
                        ck.violation(
                            id,
                            va,
                            0,
                            "progress after the guest's fault handler",
                            "the same #PF again and again",
                        );
                        break;
                    }
                    drop(run);
                    drop(st);
                    let fix = os.page_fault(&mut c.g, ck, mm, va, write);
                    st = mm.state.read();
                    // The record may have changed while the lock was free.
                    records = RecordCache::default();
                    c.g.process_mailbox(os)?;
                    run = c.g.user_run();
                    match fix {
                        Ok(FaultFix::Fixed | FaultFix::Spurious) => {}
                        Ok(FaultFix::Segv) | Err(OsError::Oom) | Err(OsError::Kernel) => break 'touches,
                        Err(e) => return Err(e),
                    }
                    // The mapping may have changed while the lock was free.
                    match st.vma(vma.id) {
                        Some(v) if v == vma => {}
                        Some(v) => {
                            vma = v;
                            if !(v.start..v.end).contains(&va) || (write && !v.writable) {
                                break;
                            }
                        }
                        None => break 'touches,
                    }
                }
                // An exit to L1 (under --nested): L1 maps the memory and
                // re-enters, outside guest mode (L1's table writes may wait
                // for other vCPUs' flushes).
                AccessResult::VmExit(f) if nested => {
                    drop(run);
                    let handled = c.g.exit_to_l1(&f)?;
                    run = c.g.user_run();
                    l1_exits += 1;
                    if !handled || l1_exits > crate::nested::MAX_L1_EXITS {
                        ck.violation(
                            id,
                            va,
                            expect.map_or(0, |e| e.0),
                            "an exit L1's tables call for (a page of the L2 VM L1 has not mapped yet)",
                            &format!("{f:x?} (exit {l1_exits} of this access)"),
                        );
                        break;
                    }
                }
                other => {
                    ck.violation(id, va, 0, "a completed access or a #PF", &format!("{other:?}"));
                    break;
                }
            }
        }
    }
    drop(run);
    cursor += u64::from(w.touches);
    drop(st);
    c.tasks[c.cur].cursor = cursor;
    Ok(())
}

/// A write that completed while dirty logging was on, with no harvest
/// during it, is in the dirty log by the end of the next harvest but one
/// (KVM's contract: every write after `KVM_GET_DIRTY_LOG` returns is
/// reported by a later harvest). Not at once: the TDP MMU's lockless fast
/// path marks the page just after it makes the SPTE writable (KVM's
/// order), so another vCPU's write can complete in between, and a harvest
/// can run there too (it then misses the page, which the late mark leaves
/// for the next one; the copy after it holds the write). So a write whose
/// bit is not set yet is a suspect ([`Suspect`]), and only a suspect that
/// two harvests do not report is a violation ([`resolve_suspects`]).
fn check_logged(sh: &Shared, vcpu: usize, cpu: &vmmu::cpu::vcpu::Vcpu, va: u64, gpa: u64, epoch: u64) {
    // The bitmap holds every logged write only in write-protect logging:
    // with D-bit logging the EPT dirty bits hold them until the harvest,
    // with the dirty ring the rings do (the end-of-migration comparison
    // checks those).
    let vm = &sh.cfg.workload.vm;
    if epoch % 2 == 1 || !sh.logging.load(Ordering::SeqCst) || vm.dirty_ring != 0 || vm.pml {
        return;
    }
    let slots = sh.m.slots.load(0);
    let logged = slots
        .by_id(0)
        .and_then(|s| s.dirty_bitmap())
        .is_none_or(|b| b.is_dirty(gpa >> 12));
    if !logged && sh.dirty_epoch.load(Ordering::SeqCst) == epoch {
        let tlb: Vec<String> = cpu
            .tlb()
            .entries()
            .filter(|e| va >= e.va_base && va - e.va_base < e.size.bytes())
            .map(|e| {
                format!(
                    "{:?} at {:#x} -> {:#x} dirty {}",
                    e.size, e.va_base, e.gpa_base, e.dirty
                )
            })
            .collect();
        let state = format!(
            "the MMU maps the gfn with {}; the TLB holds {tlb:?}",
            sh.m.describe_gfn(vmmu::addr::Gfn::new(gpa >> 12))
        );
        sh.suspects.lock().push(Suspect {
            vcpu,
            va,
            gpa,
            op: sh.ck.op.load(Ordering::Relaxed),
            harvests: 0,
            state,
        });
    }
}

/// A write completed while logging whose page's bit was not set when it
/// completed (see [`check_logged`]).
#[derive(Debug)]
struct Suspect {
    vcpu: usize,
    va: u64,
    gpa: u64,
    op: u64,
    /// Harvests since, none of which reported the page.
    harvests: u32,
    /// The MMU's and the TLB's state when the write completed.
    state: String,
}

/// A harvest reported `pages`: the suspects among them are cleared; a
/// suspect that two harvests (or the final one, with every vCPU stopped
/// and so every fast path done) have not reported is a write the dirty log
/// lost.
fn resolve_suspects(sh: &Shared, pages: &[u64], last: bool) {
    let mut suspects = sh.suspects.lock();
    let reported: std::collections::HashSet<u64> = pages.iter().copied().collect();
    suspects.retain_mut(|s| {
        if reported.contains(&(s.gpa >> 12)) {
            return false;
        }
        s.harvests += 1;
        if s.harvests < 2 && !last {
            return true;
        }
        sh.ck.record(format!(
            "op {}: vCPU {}, {} MMU: gva {:#x} gpa {:#x}: expected the page in the dirty log (the write completed \
             while logging was on), got a write no harvest reported ({} harvests since; {})",
            s.op,
            s.vcpu,
            sh.m.kind().name(),
            s.va,
            s.gpa,
            s.harvests,
            s.state
        ));
        false
    });
}

/// A running vCPU thread, counted out when dropped.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn exits(v: &vmmu::cpu::vcpu::Vcpu) -> u64 {
    let s = v.stats();
    s.ept_violations + s.ept_misconfigs + s.shadow_exits
}

/// The host churn thread.
fn host_thread(sh: &Shared) {
    let mut rng = SmallRng::seed_from_u64(sh.cfg.seed ^ 0x5eed_0fc0_ffee);
    let kinds = [
        OpKind::Collapse,
        OpKind::Split,
        OpKind::Migrate,
        OpKind::SwapOut,
        OpKind::SwapIn,
        OpKind::Ksm,
        OpKind::HostMprotect,
        OpKind::Age,
    ];
    while !sh.stop.load(Ordering::Relaxed) && sh.running.load(Ordering::Acquire) > 0 {
        let kind = kinds[rng.random_range(0..kinds.len())];
        let seed = rng.random();
        sh.log(Actor::Host, kind, seed);
        host_op(sh.m, kind, seed);
        sh.host_ops.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// One host operation on a page picked by `seed`. An error is the host
/// saying "not applicable now" (collapsing a region not fully mapped).
fn host_op(m: &Machine, kind: OpKind, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let pages = m.ram() >> 12;
    let page = rng.random_range(0..pages);
    let hva = Hva::new(RAM_HVA + (page << 12));
    let huge = Hva::new(RAM_HVA + ((page << 12) & !((2 << 20) - 1)));
    let h = &m.host;
    let _applied = match kind {
        OpKind::Collapse => h.collapse_thp(huge).is_ok(),
        OpKind::Split => h.split_thp(huge).is_ok(),
        OpKind::Migrate => h.migrate(hva).is_ok(),
        OpKind::SwapOut => h.swap_out(hva).is_ok(),
        OpKind::SwapIn => h.swap_in(hva).is_ok(),
        OpKind::Ksm => {
            let other = Hva::new(RAM_HVA + (rng.random_range(0..pages) << 12));
            h.ksm_merge(hva, other).is_ok()
        }
        OpKind::Age => {
            // Page reclaim's aging without a flush (`clear_young`) of a
            // 256 KiB range, as kswapd scans.
            let start = Hva::new(RAM_HVA + ((page << 12) & !((256 << 10) - 1)));
            h.clear_young(vmmu::host::HvaRange::new(start, 256 << 10))
        }
        OpKind::HostMprotect => {
            h.mprotect(hva, 4096, false).is_ok() && {
                std::thread::sleep(Duration::from_micros(50));
                h.mprotect(hva, 4096, true).is_ok()
            }
        }
        _ => false,
    };
}

/// A live migration: dirty logging on, copy everything, copy what was
/// dirtied until little is left, stop the vCPUs, copy the rest, compare
/// the destination with the source byte for byte, resume. Each round
/// harvests by the configuration's protocol ([`Machine::harvest_dirty`]:
/// get, get and clear, or the dirty rings) before it copies.
fn migrate(sh: &Shared) -> MigrationReport {
    let (m, ck) = (sh.m, sh.ck);
    let memory = m.memory();
    let ram = m.ram();
    let pages = ram >> 12;
    let mut dest = vec![0u8; ram as usize];
    let mut r = MigrationReport::default();
    let copy = |dest: &mut [u8], page: u64| {
        let at = (page << 12) as usize;
        if let Err(e) = memory.read(Gpa::new(page << 12), &mut dest[at..at + 4096]) {
            ck.record(format!("migration: reading gfn {page:#x} from the source failed: {e}"));
        }
    };
    let harvest = || {
        sh.dirty_epoch.fetch_add(1, Ordering::SeqCst);
        let b = m.harvest_dirty();
        sh.dirty_epoch.fetch_add(1, Ordering::SeqCst);
        b
    };
    sh.dirty_epoch.fetch_add(1, Ordering::SeqCst);
    let on = m.slots.update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES);
    sh.logging.store(on.is_ok(), Ordering::SeqCst);
    sh.dirty_epoch.fetch_add(1, Ordering::SeqCst);
    if let Err(e) = on {
        ck.record(format!("migration: enabling dirty logging failed: {e}"));
        return r;
    }
    for p in 0..pages {
        copy(&mut dest, p);
    }
    r.rounds = 1;
    r.pages_copied = pages;
    for _ in 0..8 {
        let d = match harvest() {
            Ok(d) => d,
            Err(e) => {
                ck.record(format!("migration: harvesting the dirty log failed: {e}"));
                break;
            }
        };
        resolve_suspects(sh, &d, false);
        for &p in &d {
            copy(&mut dest, p);
        }
        r.rounds += 1;
        r.pages_copied += d.len() as u64;
        if d.len() < 64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Stop and copy.
    sh.pause.store(true, Ordering::Release);
    while sh.paused.load(Ordering::Acquire) < sh.running.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_micros(100));
    }
    match harvest() {
        Ok(d) => {
            resolve_suspects(sh, &d, true);
            for &p in &d {
                copy(&mut dest, p);
            }
            r.downtime_pages = d.len() as u64;
        }
        Err(e) => ck.record(format!("migration: the final harvest of the dirty log failed: {e}")),
    }
    let mut src = vec![0u8; 4096];
    for p in 0..pages {
        let at = (p << 12) as usize;
        if memory.read(Gpa::new(p << 12), &mut src).is_err() {
            continue;
        }
        r.bytes_compared += 4096;
        if src[..] != dest[at..at + 4096] {
            r.mismatched_pages += 1;
            let off = src.iter().zip(&dest[at..]).position(|(a, b)| a != b).unwrap_or(0);
            ck.record(format!(
                "{} MMU: migration: the destination differs from the source at gpa {:#x} (source {:#04x}, destination {:#04x}): a write the dirty log did not report",
                m.kind().name(),
                (p << 12) + off as u64,
                src[off],
                dest[at + off]
            ));
        }
    }
    sh.dirty_epoch.fetch_add(1, Ordering::SeqCst);
    sh.logging.store(false, Ordering::SeqCst);
    let off = m.slots.update_flags(0, 0, MemslotFlags::empty());
    sh.dirty_epoch.fetch_add(1, Ordering::SeqCst);
    if let Err(e) = off {
        ck.record(format!("migration: disabling dirty logging failed: {e}"));
    }
    sh.pause.store(false, Ordering::Release);
    r
}

/// Replays `trace` under `mmu` on one thread, with the checker at
/// `check`.
pub fn replay(trace: &Trace, mmu: MmuKind, check: CheckLevel) -> Result<RunOutcome, RunError> {
    let h = &trace.header;
    let paging = PagingFormat::parse(&h.paging)
        .ok_or_else(|| RunError::Config(format!("unknown paging mode `{}` in the trace", h.paging)))?;
    let mut policies = vmmu::vm::Policies::default();
    for p in &h.policies {
        policies
            .set_from_str(p)
            .map_err(|e| RunError::Config(format!("policy `{p}` in the trace: {e}")))?;
    }
    let cfg = RunConfig {
        mmu,
        workload: h.workload.clone(),
        paging,
        vcpus: h.vcpus,
        memory: h.memory,
        ops: Some(trace.ops.len().max(1) as u64),
        seconds: None,
        seed: h.seed,
        host_churn: h.host_churn,
        migrate: false,
        check,
        record: false,
        nested: 0,
        policies,
    };
    let (m, guests, ck, _, seats) = boot(&cfg)?;
    let mut cpus: Vec<Cpu> = seats.into_iter().flat_map(|s| s.cpus).collect();
    let sh = Shared::new(&cfg, &m, &guests, &ck, None, u64::MAX, 0);
    let start = Instant::now();
    for op in &trace.ops {
        ck.op.store(op.seq, Ordering::Relaxed);
        match op.actor {
            Actor::Vcpu(v) => {
                let c = &mut cpus[v as usize];
                guest_op(&sh, c, op.kind, op.seed).map_err(|e| RunError::Vcpu {
                    vcpu: v as usize,
                    error: e.to_string(),
                })?;
            }
            Actor::Host => {
                host_op(&m, op.kind, op.seed);
                sh.host_ops.fetch_add(1, Ordering::Relaxed);
            }
            Actor::Vmm => m.zap_all(),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    finish(&sh, cpus, seconds, Vec::new(), 0, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table sampler draws page `k` with probability ∝ (k + 1)^-theta,
    /// over the whole mapping and nothing outside it.
    #[test]
    fn zipf_tables_sample_the_zipf_law() {
        let mut z = ZipfTables::default();
        let mut rng = SmallRng::seed_from_u64(7);
        for (pages, theta) in [(16u64, 0.99), (64, 0.5), (1, 0.99)] {
            let n = 200_000;
            let mut counts = vec![0u64; pages as usize];
            for _ in 0..n {
                counts[z.sample(pages, theta, &mut rng) as usize] += 1;
            }
            let norm: f64 = (1..=pages).map(|k| (k as f64).powf(-theta)).sum();
            for (k, &c) in counts.iter().enumerate() {
                let want = ((k + 1) as f64).powf(-theta) / norm;
                let got = c as f64 / n as f64;
                assert!(
                    (got - want).abs() < 0.01,
                    "pages {pages}, theta {theta}: page {k} drawn {got:.4} of the time, the law gives {want:.4}"
                );
            }
        }
    }
}
