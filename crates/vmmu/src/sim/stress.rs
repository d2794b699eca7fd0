//! The TDP stress scenario: vCPUs fault and access while the host churns
//! its mappings (THP collapse and split, migration, swap-out and swap-in)
//! and the VMM zaps all roots and cycles dirty logging.
//!
//! The checker: every byte a vCPU reads is the last byte it wrote (each
//! page has one writer vCPU), and [`TdpMmu::audit`] finds no SPTE that
//! grants more than memslot and host allow, or maps a stale or freed frame,
//! between operations and at the end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::addr::Hva;
use crate::arch::control::CpuFeatures;
use crate::arch::perm::AccessKind;
use crate::cpu::vcpu::{AccessResult, Vcpu};
use crate::mem::{MemslotFlags, VmaFlags};
use crate::mmu::stats::MmuStatsSnapshot;
use crate::mmu::tdp::{AuditViolation, TdpConfig, TdpMmu};
use crate::sim::vm::Vm;
use crate::walker::ControlRegs;

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
    let Vm { host, slots, mmu } = Vm::new(
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
    };
    let pages = config.memory >> 12;
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
                        // Pages t, t + vcpus, ...: one writer per page, spread
                        // over every 2 MiB region.
                        let page = (rng.next() % (pages / config.vcpus)) * config.vcpus + t;
                        let gpa = page << 12 | (rng.next() & 0xff8);
                        if rng.next() & 1 == 0 {
                            stamp += 1;
                            match v
                                .access(gpa, AccessKind::Write, 0, false, 8, stamp)
                                .map_err(|e| fail(&e))?
                            {
                                AccessResult::Done { mmio: false, .. } => {
                                    expected.insert(gpa, stamp);
                                }
                                other => shared.data_violation(format!("vCPU {t} write at {gpa:#x}: {other:?}")),
                            }
                        } else {
                            let want = expected.get(&gpa).copied().unwrap_or(0);
                            match v.access(gpa, AccessKind::Read, 0, false, 8, 0).map_err(|e| fail(&e))? {
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
        // The VMM: zap-all and dirty logging cycles.
        s.spawn(|| {
            let mut round = 0u64;
            while !shared.stop.load(Ordering::Relaxed) {
                round += 1;
                let done = match round % 4 {
                    0 => {
                        mmu.zap_all_fast();
                        mmu.zap_invalidated_roots();
                        Ok(())
                    }
                    1 => slots.update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES).map(|_| ()),
                    2 => mmu.get_dirty_log(0, 0).map(|_| ()),
                    _ => slots.update_flags(0, 0, MemslotFlags::empty()).map(|_| ()),
                };
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
            let got = v.access(gpa, AccessKind::Read, 0, false, 8, 0).map_err(|e| setup(&e))?;
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
        violations: shared.violations.load(Ordering::Relaxed),
        data_violations: shared.data_violations.into_inner(),
        spte_violations: shared.spte_violations.into_inner(),
        stats: mmu.stats().snapshot(),
    })
}
