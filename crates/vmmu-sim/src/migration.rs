//! The live-migration checker: one vCPU writes random pages while the host
//! churns its memory and the VMM migrates the VM again and again, each
//! migration harvesting the dirty log by the configuration's protocol and
//! copying what it reports; at the end of each migration the destination
//! is compared with the source byte for byte. A page that differs is a
//! write the dirty log lost. [`run_matrix`] runs it over every dirty-log
//! configuration a KVM user can choose ([`VmConfig::dirty_log_matrix`]).
//!
//! One thread does everything, from one seed: a failure replays exactly
//! (`vmmu migrate --mmu M --log NAME --first-seed S --seeds 1`, with the
//! run's `--ops` and base knobs). What a vCPU's TLB keeps
//! between accesses is real, so a stale translation a harvest forgot to
//! flush writes through unlogged, as it would on a processor.
//!
//! Host churn: THP collapse and split, page migration, swap-out, aging
//! without a flush (`clear_young`), `mprotect` for a moment, KSM merges,
//! zap-all. Guest accesses: writes (most), reads, instruction fetches
//! (which split huge pages under the NX mitigation).

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, Vcpu};
use vmmu::host::HvaRange;
use vmmu::mem::MemslotFlags;
use vmmu::vm::config::VmConfig;
use vmmu::vm::{Machine, MmuKind, RAM_HVA};
use vmmu::walker::ControlRegs;

/// Guest RAM of a checked VM: 8 MiB, four 2 MiB regions (huge pages).
pub const RAM: u64 = 8 << 20;

/// One run of the checker.
#[derive(Clone, Copy, Debug)]
pub struct MigrationCheck {
    /// The MMU.
    pub mmu: MmuKind,
    /// The VM's configuration.
    pub config: VmConfig,
    /// The seed of every choice.
    pub seed: u64,
    /// Operations (guest accesses, host and VMM operations).
    pub ops: u64,
}

/// What a run (or a sum of runs) did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MigrationTally {
    /// Runs.
    pub runs: u64,
    /// Operations done.
    pub ops: u64,
    /// Guest writes completed.
    pub writes: u64,
    /// Host and VMM operations done (churn, aging, zap-all).
    pub host_ops: u64,
    /// Migrations completed (each ends in a byte-for-byte comparison).
    pub migrations: u64,
    /// Harvests of the dirty log.
    pub harvests: u64,
    /// Exits to the VMM for a full dirty ring (reaped, the access retried).
    pub ring_full_exits: u64,
    /// Pages copied to the destination.
    pub pages_copied: u64,
    /// Pages compared at the end of migrations.
    pub pages_compared: u64,
    /// Pages that differed: writes the dirty log lost.
    pub pages_lost: u64,
    /// The first losses, described.
    pub losses: Vec<String>,
}

impl MigrationTally {
    /// Adds `o` to this tally (the first losses of both kept, up to 8).
    pub fn add(&mut self, o: &MigrationTally) {
        self.runs += o.runs;
        self.ops += o.ops;
        self.writes += o.writes;
        self.host_ops += o.host_ops;
        self.migrations += o.migrations;
        self.harvests += o.harvests;
        self.ring_full_exits += o.ring_full_exits;
        self.pages_copied += o.pages_copied;
        self.pages_compared += o.pages_compared;
        self.pages_lost += o.pages_lost;
        for l in &o.losses {
            if self.losses.len() < 8 {
                self.losses.push(l.clone());
            }
        }
    }
}

/// Why a run could not be done (not a lost page: an MMU or host error).
#[derive(Debug, thiserror::Error)]
#[error("{mmu} MMU, {config}, seed {seed}, op {op}: {what}")]
pub struct MigrationError {
    /// The MMU.
    pub mmu: &'static str,
    /// The configuration, as flags.
    pub config: String,
    /// The seed.
    pub seed: u64,
    /// The operation that failed.
    pub op: u64,
    /// What failed.
    pub what: String,
}

/// The migration in progress: the destination's copy of guest RAM.
struct Migration {
    dest: Vec<u8>,
    rounds: u64,
    /// Operations until the VMM stops the vCPU and finishes.
    left: u64,
}

struct Checker {
    m: Machine,
    v: Vcpu,
    rng: SmallRng,
    tally: MigrationTally,
    migration: Option<Migration>,
    check: MigrationCheck,
    op: u64,
}

/// Runs one check; the tally counts the pages it found lost.
pub fn run(check: &MigrationCheck) -> Result<MigrationTally, MigrationError> {
    let err = |op: u64, what: String| MigrationError {
        mmu: check.mmu.name(),
        config: check.config.flags(),
        seed: check.seed,
        op,
        what,
    };
    let m = Machine::with_config(check.mmu, RAM, check.config).map_err(|e| err(0, e.to_string()))?;
    let v = m
        .vcpu(1, ControlRegs::default(), 0)
        .map_err(|e| err(0, format!("creating the vCPU: {e}")))?;
    let mut c = Checker {
        m,
        v,
        rng: SmallRng::seed_from_u64(check.seed),
        tally: MigrationTally {
            runs: 1,
            ..MigrationTally::default()
        },
        migration: None,
        check: *check,
        op: 0,
    };
    while c.op < check.ops {
        c.step().map_err(|what| err(c.op, what))?;
        c.op += 1;
    }
    if c.migration.is_some() {
        c.finish().map_err(|what| err(c.op, what))?;
    }
    c.tally.ops = check.ops;
    Ok(c.tally)
}

impl Checker {
    fn step(&mut self) -> Result<(), String> {
        if self.migration.is_none() && self.rng.random_bool(0.02) {
            return self.start();
        }
        if let Some(mig) = &mut self.migration {
            mig.left = mig.left.saturating_sub(1);
            if mig.left == 0 {
                return self.finish();
            }
            if self.rng.random_bool(0.05) {
                return self.round();
            }
        }
        let pages = RAM >> 12;
        match self.rng.random_range(0..100u32) {
            0..=59 => {
                let gpa = (self.rng.random_range(0..pages) << 12) | (self.rng.random_range(0..512u64) << 3);
                let value = self.rng.random::<u64>();
                self.access(gpa, AccessKind::Write, value)?;
                self.tally.writes += 1;
            }
            60..=69 => {
                let gpa = self.rng.random_range(0..pages) << 12;
                self.access(gpa, AccessKind::Read, 0)?;
            }
            70..=73 => {
                let gpa = self.rng.random_range(0..pages) << 12;
                self.access(gpa, AccessKind::Fetch, 0)?;
            }
            _ => {
                self.host_op();
                self.tally.host_ops += 1;
            }
        }
        Ok(())
    }

    /// One guest access, the VMM reaping a full dirty ring and retrying.
    fn access(&mut self, gpa: u64, kind: AccessKind, value: u64) -> Result<(), String> {
        for _ in 0..4 {
            match self.v.access(Gva::new(gpa), Access::new(kind, 0, false), 8, value) {
                Ok(AccessResult::Done { mmio: false, .. }) => return Ok(()),
                Ok(AccessResult::DirtyRingFull) => {
                    self.tally.ring_full_exits += 1;
                    if let Some(r) = self.m.dirty_rings() {
                        r.reap();
                    }
                }
                Ok(other) => return Err(format!("{kind:?} at gpa {gpa:#x}: {other:?}")),
                Err(e) if is_host_refusal(&e) => {
                    // The host made the page read-only for a moment
                    // (EFAULT): mprotect below restores it at once.
                    return Ok(());
                }
                Err(e) => return Err(format!("{kind:?} at gpa {gpa:#x}: {e}")),
            }
        }
        Err(format!(
            "{kind:?} at gpa {gpa:#x}: the dirty ring stays full after reaping"
        ))
    }

    fn host_op(&mut self) {
        let pages = RAM >> 12;
        let page = self.rng.random_range(0..pages);
        let hva = Hva::new(RAM_HVA + (page << 12));
        let huge = Hva::new(RAM_HVA + ((page << 12) & !((2 << 20) - 1)));
        let h = self.m.host.clone();
        match self.rng.random_range(0..9u32) {
            0 => drop(h.collapse_thp(huge)),
            1 => drop(h.split_thp(huge)),
            2 => drop(h.migrate(hva)),
            3 => drop(h.swap_out(hva)),
            4 | 5 => {
                // Page reclaim's aging, without a flush.
                h.clear_young(HvaRange::new(huge, 2 << 20));
            }
            6 => {
                drop(h.mprotect(hva, 4096, false));
                drop(h.mprotect(hva, 4096, true));
            }
            7 => {
                let other = Hva::new(RAM_HVA + (self.rng.random_range(0..pages) << 12));
                drop(h.ksm_merge(hva, other));
            }
            _ => self.m.zap_all(),
        }
    }

    /// Logging on, then a first copy of everything.
    fn start(&mut self) -> Result<(), String> {
        self.m
            .slots
            .update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES)
            .map_err(|e| format!("enabling dirty logging: {e}"))?;
        let mut dest = vec![0u8; RAM as usize];
        self.m
            .memory()
            .read(Gpa::new(0), &mut dest)
            .map_err(|e| format!("the first copy: {e}"))?;
        self.tally.pages_copied += RAM >> 12;
        self.migration = Some(Migration {
            dest,
            rounds: 0,
            left: self.rng.random_range(20..600),
        });
        Ok(())
    }

    /// One harvest, and a copy of what it reported.
    fn round(&mut self) -> Result<(), String> {
        let pages = self.m.harvest_dirty().map_err(|e| format!("harvesting: {e}"))?;
        self.tally.harvests += 1;
        let mem = self.m.memory();
        let mig = self.migration.as_mut().expect("a round runs within a migration");
        mig.rounds += 1;
        for p in pages {
            let at = (p << 12) as usize;
            mem.read(Gpa::new(p << 12), &mut mig.dest[at..at + 4096])
                .map_err(|e| format!("copying gfn {p:#x}: {e}"))?;
            self.tally.pages_copied += 1;
        }
        Ok(())
    }

    /// The vCPU stopped: the last harvest and copy, the comparison, and
    /// logging off.
    fn finish(&mut self) -> Result<(), String> {
        self.round()?;
        let mig = self.migration.take().expect("finish ends a migration");
        let mut src = vec![0u8; RAM as usize];
        self.m
            .memory()
            .read(Gpa::new(0), &mut src)
            .map_err(|e| format!("reading the source: {e}"))?;
        for p in 0..RAM >> 12 {
            let r = (p << 12) as usize..((p + 1) << 12) as usize;
            self.tally.pages_compared += 1;
            if src[r.clone()] != mig.dest[r.clone()] {
                self.tally.pages_lost += 1;
                if self.tally.losses.len() < 8 {
                    self.tally.losses.push(format!(
                        "{} MMU, {}, seed {}: gfn {p:#x} differs at the end of migration {} (op {}, {} rounds): {}",
                        self.check.mmu.name(),
                        self.check.config.dirty_log_name(self.check.mmu),
                        self.check.seed,
                        self.tally.migrations + 1,
                        self.op,
                        mig.rounds,
                        self.m.describe_gfn(vmmu::addr::Gfn::new(p))
                    ));
                }
            }
        }
        self.tally.migrations += 1;
        self.m
            .slots
            .update_flags(0, 0, MemslotFlags::empty())
            .map_err(|e| format!("disabling dirty logging: {e}"))?;
        Ok(())
    }
}

fn is_host_refusal(e: &vmmu::cpu::vcpu::VcpuError) -> bool {
    use vmmu::cpu::vcpu::VcpuError;
    matches!(
        e,
        VcpuError::Mmu(vmmu::mmu::tdp::TdpError::Host { .. })
            | VcpuError::Shadow(vmmu::mmu::shadow::ShadowError::Host { .. })
    )
}

/// One row of the matrix: a configuration and what its runs did.
#[derive(Clone, Debug, Serialize)]
pub struct MatrixRow {
    /// The MMU.
    pub mmu: &'static str,
    /// The dirty-log configuration, short (`wp+manual+init ad`, ...).
    pub name: String,
    /// The configuration, as `vmmu run` flags.
    pub config: String,
    /// What its runs did.
    pub tally: MigrationTally,
}

/// What [`run_matrix`] runs.
#[derive(Clone, Debug)]
pub struct MatrixSpec {
    /// The MMUs, in order.
    pub mmus: Vec<MmuKind>,
    /// The knobs other than dirty logging.
    pub base: VmConfig,
    /// Only these configurations (by [`VmConfig::dirty_log_name`]); all
    /// when empty.
    pub only: Vec<String>,
    /// The first seed.
    pub first_seed: u64,
    /// Seeds per configuration: `first_seed..first_seed + seeds`.
    pub seeds: u64,
    /// Operations a run.
    pub ops: u64,
    /// Stop early (with the rows so far) when this passes.
    pub deadline: Option<std::time::Instant>,
}

/// Runs the checker over every dirty-log configuration of `spec.mmus`
/// (those named in `spec.only`, if any); `progress` is told each finished
/// run.
pub fn run_matrix(spec: &MatrixSpec, progress: &dyn Fn(&MatrixRow, u64)) -> Result<Vec<MatrixRow>, MigrationError> {
    let mut rows = Vec::new();
    for &mmu in &spec.mmus {
        for c in VmConfig::dirty_log_matrix(mmu) {
            // The matrix's knobs: the dirty-logging ones and the host's
            // vendor (which decides what dirty logging can use).
            let config = VmConfig {
                vendor: c.vendor,
                ept_ad: c.ept_ad,
                pml: c.pml,
                dirty_ring: c.dirty_ring,
                manual_protect: c.manual_protect,
                initially_set: c.initially_set,
                ..spec.base
            };
            let name = config.dirty_log_name(mmu);
            if !spec.only.is_empty() && !spec.only.contains(&name) {
                continue;
            }
            rows.push(MatrixRow {
                mmu: mmu.name(),
                name,
                config: config.flags(),
                tally: MigrationTally::default(),
            });
            let row = rows.len() - 1;
            for seed in spec.first_seed..spec.first_seed + spec.seeds {
                if spec.deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    return Ok(rows);
                }
                let t = run(&MigrationCheck {
                    mmu,
                    config,
                    seed,
                    ops: spec.ops,
                })?;
                rows[row].tally.add(&t);
                progress(&rows[row], seed);
            }
        }
    }
    Ok(rows)
}

/// The names of `mmu`'s dirty-log configurations (for `--log`).
pub fn names(mmu: MmuKind) -> Vec<String> {
    VmConfig::dirty_log_matrix(mmu)
        .iter()
        .map(|c| c.dirty_log_name(mmu))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_migrates_and_compares() {
        let t = run(&MigrationCheck {
            mmu: MmuKind::Tdp,
            config: VmConfig::default(),
            seed: 3,
            ops: 3000,
        })
        .unwrap();
        assert!(t.migrations >= 2 && t.harvests > t.migrations, "{t:?}");
        assert_eq!(t.pages_compared, t.migrations * (RAM >> 12));
        assert_eq!(t.pages_lost, 0, "{:?}", t.losses);
        assert!(t.writes > 1000 && t.host_ops > 100, "{t:?}");
    }
}
