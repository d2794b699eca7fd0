//! The TDP stress scenario: vCPUs fault and access while the host churns
//! its mappings (THP collapse and split, migration, swap-out and swap-in)
//! and the VMM zaps all roots, runs dirty-logging sessions and moves,
//! deletes and recreates a second memslot.
//!
//! The checker:
//! - every byte a vCPU reads in RAM is the last byte it wrote (each page
//!   has one writer vCPU);
//! - [`TdpMmu::audit`] finds no SPTE that grants more than memslot and
//!   host allow, or maps a stale or freed frame, between operations and at
//!   the end;
//! - dirty logging loses no write (KVM's `dirty_log_test` method): a vCPU
//!   writing during a session records the harvest iteration it started in,
//!   and once the session ends every written page must be in a harvest
//!   taken at or after that iteration (within the two-iteration window the
//!   races allow);
//! - the moving memslot never shows a stale mapping: values written there
//!   carry their offset within the slot, and a read made while the slot
//!   did not change must find the offset the current slot maps it to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::CpuFeatures;
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, Vcpu};
use vmmu::host::VmaFlags;
use vmmu::mem::{MemoryRegion, MemslotFlags, MemslotTable};
use vmmu::mmu::stats::MmuStatsSnapshot;
use vmmu::mmu::tdp::{AuditViolation, TdpConfig, TdpMmu};
use vmmu::vm::Vm;
use vmmu::walker::ControlRegs;

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct StressConfig {
    /// How long.
    pub duration: Duration,
    /// vCPU threads.
    pub vcpus: u64,
    /// Guest memory in bytes (a multiple of 2 MiB).
    pub memory: u64,
    /// Seed of the pseudo-random choices.
    pub seed: u64,
    /// The TDP MMU's configuration.
    pub mmu: TdpConfig,
}

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            duration: Duration::from_millis(1500),
            vcpus: 2,
            memory: 16 << 20,
            seed: 1,
            mmu: TdpConfig::default(),
        }
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Serialize)]
pub struct StressReport {
    /// Guest accesses made.
    pub accesses: u64,
    /// Host operations attempted (collapse, split, migrate, swap).
    pub host_operations: u64,
    /// VMM operations (zap-all, dirty logging on/get/off).
    pub vmm_operations: u64,
    /// Audits run.
    pub audits: u64,
    /// Dirty-logging sessions run and checked.
    pub dirty_log_sessions: u64,
    /// Data mismatches: a read that did not return the last write.
    pub data_violations: Vec<String>,
    /// SPTE violations found by the audits (the first few).
    pub spte_violations: Vec<String>,
    /// Total violations.
    pub violations: u64,
    /// The MMU's counters at the end.
    pub stats: MmuStatsSnapshot,
}

/// Why a run could not be set up or a vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    /// Bad configuration.
    #[error("bad stress configuration: {0}")]
    Config(String),
    /// Setting up the VM failed.
    #[error("setting up the VM: {0}")]
    Setup(String),
    /// A vCPU could not complete an access (MMU error or no progress).
    #[error("vCPU {vcpu}: {error}")]
    Vcpu {
        /// Which vCPU.
        vcpu: u64,
        /// What failed.
        error: String,
    },
}

const HVA: u64 = 0x4000_0000;
/// The moving memslot (id 1): 2 MiB of host memory, placed at
/// [`MOVING_GPA_A`] or [`MOVING_GPA_B`] (overlapping by 1 MiB) or absent.
const MOVING_SIZE: u64 = 2 << 20;
/// Below 4 GiB: with paging off, linear (= guest-physical) addresses are
/// 32 bits wide.
const MOVING_GPA_A: u64 = 0x8000_0000;
const MOVING_GPA_B: u64 = MOVING_GPA_A + (1 << 20);
/// A value in the moving slot whose low bits are its offset in the slot.
const TAGGED: u64 = 1 << 63;
/// Harvest rounds per dirty-logging session.
const HARVESTS: u64 = 6;
/// Violations kept in the report (the count is exact).
const KEEP: usize = 10;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Shared {
    stop: AtomicBool,
    accesses: AtomicU64,
    host_ops: AtomicU64,
    vmm_ops: AtomicU64,
    audits: AtomicU64,
    violations: AtomicU64,
    spte_violations: parking_lot::Mutex<Vec<String>>,
    data_violations: parking_lot::Mutex<Vec<String>>,
    /// The dirty-log iteration writes start in: 0 outside a session.
    iteration: AtomicU64,
    /// Per vCPU: the iteration its in-flight write loaded (0: none).
    inflight: Vec<AtomicU64>,
    /// Per RAM page: `session << 32 | iteration` of its last logged write.
    logged_write: Vec<AtomicU64>,
    /// Dirty-logging sessions checked.
    sessions: AtomicU64,
    /// Ids of moving-slot writes known to have landed where their tag says.
    confirmed: Vec<AtomicU64>,
}

impl Shared {
    fn audit(&self, mmu: &TdpMmu, when: &str) {
        let found: Vec<AuditViolation> = mmu.audit();
        self.audits.fetch_add(1, Ordering::Relaxed);
        if !found.is_empty() {
            self.violations.fetch_add(found.len() as u64, Ordering::Relaxed);
            let mut kept = self.spte_violations.lock();
            for v in found.into_iter().take(KEEP.saturating_sub(kept.len())) {
                kept.push(format!("{when}: {v}"));
            }
        }
    }

    fn data_violation(&self, what: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let mut kept = self.data_violations.lock();
        if kept.len() < KEEP {
            kept.push(what);
        }
    }
}

/// Runs the scenario and reports; `progress` is called about every 100 ms
/// with the fraction done.
pub fn run(config: StressConfig, progress: &(dyn Fn(f64) + Sync)) -> Result<StressReport, StressError> {
    if config.vcpus == 0 || config.vcpus > 64 {
        return Err(StressError::Config(format!(
            "vcpus must be 1..=64, not {}",
            config.vcpus
        )));
    }
    if config.memory < (2 << 20) || !config.memory.is_multiple_of(2 << 20) || config.memory > (4 << 30) {
        return Err(StressError::Config(format!(
            "memory must be a multiple of 2 MiB between 2 MiB and 4 GiB, not {}",
            config.memory
        )));
    }
    let setup = |e: &dyn std::fmt::Display| StressError::Setup(e.to_string());
    let Vm { host, slots, mmu, .. } = Vm::new(
        config.memory,
        Hva::new(HVA),
        VmaFlags::WRITE | VmaFlags::THP,
        config.mmu,
    )
    .map_err(|e| setup(&e))?;
    let shared = Shared {
        stop: AtomicBool::new(false),
        accesses: AtomicU64::new(0),
        host_ops: AtomicU64::new(0),
        vmm_ops: AtomicU64::new(0),
        audits: AtomicU64::new(0),
        violations: AtomicU64::new(0),
        spte_violations: parking_lot::Mutex::new(Vec::new()),
        data_violations: parking_lot::Mutex::new(Vec::new()),
        iteration: AtomicU64::new(0),
        inflight: (0..config.vcpus).map(|_| AtomicU64::new(0)).collect(),
        logged_write: (0..config.memory >> 12).map(|_| AtomicU64::new(0)).collect(),
        sessions: AtomicU64::new(0),
        confirmed: (0..CONFIRMED).map(|_| AtomicU64::new(u64::MAX)).collect(),
    };
    let pages = config.memory >> 12;
    let moving_hva = Hva::new(HVA + config.memory + (64 << 20));
    host.mmap(moving_hva, MOVING_SIZE, VmaFlags::WRITE | VmaFlags::THP)
        .map_err(|e| setup(&e))?;
    let moving = |gpa: u64| MemoryRegion {
        as_id: 0,
        id: 1,
        flags: MemslotFlags::empty(),
        guest_phys_addr: Gpa::new(gpa),
        memory_size: MOVING_SIZE,
        userspace_addr: moving_hva,
    };
    slots.create(moving(MOVING_GPA_A)).map_err(|e| setup(&e))?;
    // Where the moving slot is, read with the generation so a caller can
    // tell whether it changed meanwhile.
    let moving_base = || {
        let s = slots.load(0);
        (s.generation(), s.by_id(1).map(|m| m.base_gfn().raw() << 12))
    };
    let start = Instant::now();
    let finals: Vec<Result<HashMap<u64, u64>, StressError>> = std::thread::scope(|s| {
        let vcpus: Vec<_> = (0..config.vcpus)
            .map(|t| {
                let (mmu, slots, shared) = (&mmu, &slots, &shared);
                s.spawn(move || {
                    let fail = |e: &dyn std::fmt::Display| StressError::Vcpu {
                        vcpu: t,
                        error: e.to_string(),
                    };
                    let mut v = Vcpu::new(mmu.clone(), slots.clone(), CpuFeatures::default(), t as u16 + 1)
                        .map_err(|e| fail(&e))?;
                    v.set_state(ControlRegs::default(), 0, 0).map_err(|e| fail(&e))?;
                    let mut rng = Rng(config.seed ^ (0x9e37_79b9_7f4a_7c15 + t));
                    let mut expected: HashMap<u64, u64> = HashMap::new();
                    let mut stamp = t << 48;
                    while !shared.stop.load(Ordering::Relaxed) {
                        if rng.next().is_multiple_of(8) {
                            stamp += 1;
                            let id = t << 36 | (stamp & ((1 << 36) - 1));
                            moving_access(&mut v, &mut rng, &moving_base, shared, id).map_err(|e| fail(&e))?;
                            shared.accesses.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        // Pages t, t + vcpus, ...: one writer per page, spread
                        // over every 2 MiB region.
                        let page = (rng.next() % (pages / config.vcpus)) * config.vcpus + t;
                        let gpa = page << 12 | (rng.next() & 0xff8);
                        if rng.next() & 1 == 0 {
                            stamp += 1;
                            // The dirty-log iteration this write starts in.
                            let inflight = &shared.inflight[t as usize];
                            inflight.store(u64::MAX, Ordering::SeqCst);
                            let iteration = shared.iteration.load(Ordering::SeqCst);
                            inflight.store(iteration, Ordering::SeqCst);
                            let done = v
                                .access(Gva::new(gpa), Access::new(AccessKind::Write, 0, false), 8, stamp)
                                .map_err(|e| fail(&e))?;
                            if iteration != 0 {
                                let session = shared.sessions.load(Ordering::SeqCst);
                                shared.logged_write[page as usize].store(session << 32 | iteration, Ordering::SeqCst);
                            }
                            inflight.store(0, Ordering::SeqCst);
                            match done {
                                AccessResult::Done { mmio: false, .. } => {
                                    expected.insert(gpa, stamp);
                                }
                                other => shared.data_violation(format!("vCPU {t} write at {gpa:#x}: {other:?}")),
                            }
                        } else {
                            let want = expected.get(&gpa).copied().unwrap_or(0);
                            match v
                                .access(Gva::new(gpa), Access::new(AccessKind::Read, 0, false), 8, 0)
                                .map_err(|e| fail(&e))?
                            {
                                AccessResult::Done { value, mmio: false, .. } if value == want => {}
                                other => shared.data_violation(format!(
                                    "vCPU {t} read at gpa {gpa:#x}: {other:?}, last wrote {want:#x}"
                                )),
                            }
                        }
                        shared.accesses.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(expected)
                })
            })
            .collect();
        // The host: churn.
        s.spawn(|| {
            let mut rng = Rng(config.seed ^ 0x1234_5678);
            while !shared.stop.load(Ordering::Relaxed) {
                let page = rng.next() % pages;
                let hva = Hva::new(HVA + (page << 12));
                let huge = Hva::new(HVA + ((page << 12) & !((2 << 20) - 1)));
                // An error is the host saying "not applicable now" (e.g.
                // collapsing a region that is not fully mapped).
                let _applied = match rng.next() % 5 {
                    0 => host.collapse_thp(huge).is_ok(),
                    1 => host.split_thp(huge).is_ok(),
                    2 => host.migrate(hva).is_ok(),
                    3 => host.swap_out(hva).is_ok(),
                    _ => host.swap_in(hva).is_ok(),
                };
                if shared.host_ops.fetch_add(1, Ordering::Relaxed) % 64 == 63 {
                    shared.audit(&mmu, "during host churn");
                }
                std::thread::yield_now();
            }
        });
        // The VMM: zap-all, dirty-logging sessions, memslot changes.
        s.spawn(|| {
            let mut round = 0u64;
            while !shared.stop.load(Ordering::Relaxed) {
                round += 1;
                let done = match round % 6 {
                    0 => {
                        mmu.zap_all_fast();
                        mmu.zap_invalidated_roots();
                        Ok(())
                    }
                    1 => dirty_log_session(&mmu, &slots, &shared),
                    2 => slots.move_slot(0, 1, Gpa::new(MOVING_GPA_B)).map(|_| ()),
                    3 => slots.move_slot(0, 1, Gpa::new(MOVING_GPA_A)).map(|_| ()),
                    4 => slots.delete(0, 1).map(|_| ()),
                    _ => slots.create(moving(MOVING_GPA_A)).map(|_| ()),
                }
                .map_err(|e| e.to_string());
                if let Err(e) = done {
                    shared.data_violation(format!("VMM operation failed: {e}"));
                }
                shared.vmm_ops.fetch_add(1, Ordering::Relaxed);
                shared.audit(&mmu, "after a VMM operation");
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        while start.elapsed() < config.duration {
            progress(start.elapsed().as_secs_f64() / config.duration.as_secs_f64());
            std::thread::sleep(config.duration.min(Duration::from_millis(100)));
        }
        shared.stop.store(true, Ordering::Relaxed);
        vcpus
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(StressError::Vcpu {
                        vcpu: u64::MAX,
                        error: "panicked".into(),
                    })
                })
            })
            .collect()
    });
    progress(1.0);
    shared.audit(&mmu, "at the end");
    // Every byte is the last one written, read through a fresh vCPU.
    let mut v = Vcpu::new(mmu.clone(), slots.clone(), CpuFeatures::default(), 999).map_err(|e| setup(&e))?;
    v.set_state(ControlRegs::default(), 0, 0).map_err(|e| setup(&e))?;
    for expected in finals {
        for (gpa, want) in expected? {
            let got = v
                .access(Gva::new(gpa), Access::new(AccessKind::Read, 0, false), 8, 0)
                .map_err(|e| setup(&e))?;
            if !matches!(got, AccessResult::Done { value, mmio: false, .. } if value == want) {
                shared.data_violation(format!("final read at gpa {gpa:#x}: {got:?}, last written {want:#x}"));
            }
        }
    }
    Ok(StressReport {
        accesses: shared.accesses.load(Ordering::Relaxed),
        host_operations: shared.host_ops.load(Ordering::Relaxed),
        vmm_operations: shared.vmm_ops.load(Ordering::Relaxed),
        audits: shared.audits.load(Ordering::Relaxed),
        dirty_log_sessions: shared.sessions.load(Ordering::Relaxed),
        violations: shared.violations.load(Ordering::Relaxed),
        data_violations: shared.data_violations.into_inner(),
        spte_violations: shared.spte_violations.into_inner(),
        stats: mmu.stats().snapshot(),
    })
}

/// One access to the moving memslot's window (both placements).
///
/// A write stores a tagged value: a unique id and the offset in the slot
/// the write goes to by the memslot table read just before it. If the
/// table did not change during the write, the write certainly landed
/// there, and the id is recorded as confirmed. A read made while the table
/// did not change that finds a confirmed value whose offset is not the one
/// the table maps the read to has been served by a stale mapping. MMIO
/// where no slot is, and untagged or unconfirmed values, pass.
fn moving_access(
    v: &mut Vcpu,
    rng: &mut Rng,
    moving_base: &dyn Fn() -> (u64, Option<u64>),
    shared: &Shared,
    id: u64,
) -> Result<(), vmmu::cpu::vcpu::VcpuError> {
    let window = MOVING_GPA_B + MOVING_SIZE - MOVING_GPA_A;
    let gpa = MOVING_GPA_A + ((rng.next() % window) & !7);
    let (gen_before, base) = moving_base();
    let offset = base.and_then(|b| gpa.checked_sub(b)).filter(|&o| o < MOVING_SIZE);
    let stable = |gen_after: u64| {
        gen_after == gen_before && gen_before & vmmu::mem::memslot::MEMSLOT_GEN_UPDATE_IN_PROGRESS == 0
    };
    if rng.next() & 1 == 0 {
        let Some(o) = offset else {
            // No slot there (by the table): an MMIO write, dropped.
            let r = v.access(Gva::new(gpa), Access::new(AccessKind::Write, 0, false), 8, 0)?;
            if let AccessResult::Fault(f) = r {
                shared.data_violation(format!("moving slot: write at {gpa:#x} faulted: {f:?}"));
            }
            return Ok(());
        };
        let value = tag(id, o);
        let r = v.access(Gva::new(gpa), Access::new(AccessKind::Write, 0, false), 8, value)?;
        match r {
            AccessResult::Done { mmio: false, .. } if stable(moving_base().0) => {
                shared.confirmed[(id % CONFIRMED as u64) as usize].store(id, Ordering::SeqCst);
            }
            AccessResult::Done { .. } => {}
            other => shared.data_violation(format!("moving slot: write at {gpa:#x}: {other:?}")),
        }
    } else {
        let r = v.access(Gva::new(gpa), Access::new(AccessKind::Read, 0, false), 8, 0)?;
        match r {
            AccessResult::Done { value, mmio, .. } if stable(moving_base().0) => {
                let bad = match offset {
                    None => !mmio,
                    Some(o) => {
                        mmio || (value & TAGGED != 0 && {
                            let (wid, wo) = untag(value);
                            shared.confirmed[(wid % CONFIRMED as u64) as usize].load(Ordering::SeqCst) == wid && wo != o
                        })
                    }
                };
                if bad {
                    shared.data_violation(format!(
                        "moving slot: read at {gpa:#x} (slot at {base:x?}) gave {value:#x} (mmio {mmio}): \
                         a mapping the memslot change should have removed"
                    ));
                }
            }
            AccessResult::Done { .. } => {}
            other => shared.data_violation(format!("moving slot: read at {gpa:#x}: {other:?}")),
        }
    }
    Ok(())
}

/// Confirmed-write slots (a lossy table: an evicted id is just not checked).
const CONFIRMED: usize = 4096;

/// A moving-slot value: the write's id and its offset in the slot.
fn tag(id: u64, offset: u64) -> u64 {
    debug_assert!(offset < MOVING_SIZE && id < 1 << 44);
    TAGGED | id << 18 | offset >> 3
}

fn untag(value: u64) -> (u64, u64) {
    ((value & !TAGGED) >> 18, (value & ((1 << 18) - 1)) << 3)
}

/// One dirty-logging session (KVM's `dirty_log_test` method): enable
/// logging, harvest [`HARVESTS`] times while the vCPUs write, end the
/// session, wait for writes in flight, take the final harvest, and check
/// that every page written during the session is in a harvest taken at or
/// after two iterations before the one its last write started in.
fn dirty_log_session(mmu: &TdpMmu, slots: &MemslotTable, shared: &Shared) -> Result<(), vmmu::mem::MemslotError> {
    slots.update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES)?;
    let session = shared.sessions.load(Ordering::SeqCst) + 1;
    shared.sessions.store(session, Ordering::SeqCst);
    shared.iteration.store(1, Ordering::SeqCst);
    let mut harvests: Vec<Vec<u64>> = Vec::new();
    for j in 0..HARVESTS {
        std::thread::sleep(Duration::from_micros(300));
        shared.iteration.store(j + 2, Ordering::SeqCst);
        harvests.push(mmu.get_dirty_log(0, 0)?);
    }
    // End the session and wait out the writes that started in it.
    shared.iteration.store(0, Ordering::SeqCst);
    let waited = Instant::now();
    for f in &shared.inflight {
        while f.load(Ordering::SeqCst) != 0 && waited.elapsed() < Duration::from_secs(10) {
            std::thread::yield_now();
        }
    }
    harvests.push(mmu.get_dirty_log(0, 0)?);
    slots.update_flags(0, 0, MemslotFlags::empty())?;
    let in_harvest = |h: &[u64], page: u64| h.get((page / 64) as usize).is_some_and(|w| w >> (page % 64) & 1 != 0);
    for (page, logged) in shared.logged_write.iter().enumerate() {
        let logged = logged.load(Ordering::SeqCst);
        if logged >> 32 != session {
            continue;
        }
        let iteration = logged & 0xffff_ffff;
        let first = iteration.saturating_sub(2) as usize;
        if !harvests[first.min(harvests.len() - 1)..]
            .iter()
            .any(|h| in_harvest(h, page as u64))
        {
            shared.data_violation(format!(
                "dirty log: page {page} written in iteration {iteration} of session {session} is in no harvest from {first} on"
            ));
        }
    }
    Ok(())
}
