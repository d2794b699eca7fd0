//! The checker: what every guest access must give, and the record of what
//! did not.
//!
//! - **Translations.** Each user access is compared with the guest OS's
//!   record of what it wrote into its page tables ([`MmState::translate`](
//!   crate::guest::MmState::translate)), taken under the address
//!   space's lock, after the guest's flushes: the gpa must be the one the
//!   leaf maps, a #PF must be one the tables call for (not present, or a
//!   write to a read-only page), with its error code. With `full`, the
//!   record itself is checked against the tables in guest memory by the
//!   foundation walker ([`Checker::walk_matches`]) after every operation,
//!   and for every leaf at the end.
//! - **Data.** Every user write stamps a unique value at the start of a
//!   64-byte line; the [`Oracle`] keeps the last value written to each
//!   line of guest RAM, and every read of a line must return it.
//! - **Frames.** The MMU's audit (no SPTE maps a frame outside the
//!   memslots, or one the host freed or moved, or grants more than memslot
//!   and host allow) runs during the run and at the end.
//! - **Migration.** The destination equals the source, byte for byte.
//!
//! A violation is counted, described (vCPU, MMU, gva, gpa, expected,
//! actual) and makes the run exit 1.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use vmmu::addr::{Gpa, Gva};
use vmmu::arch::control::CpuFeatures;
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::arch::pfec::PfErrorCode;
use vmmu::mem::GuestMemory;
use vmmu::walker::{ControlRegs, GuestPaging, Root};

/// How much the checker checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckLevel {
    /// Every access, the page-table record against guest memory after
    /// every operation, audits every few operations.
    Full,
    /// One access in [`SAMPLE_EVERY`], audits now and then.
    Sample,
    /// Nothing but the final audit and migration compare.
    Off,
}

/// With `sample`, one access in this many is checked.
pub const SAMPLE_EVERY: u64 = 16;
/// Violations described in the report (the count is exact).
const KEEP: usize = 20;

/// The last value written to the first word of every 64-byte line of
/// guest RAM.
#[derive(Debug)]
pub struct Oracle {
    lines: Vec<AtomicU64>,
}

impl Oracle {
    /// An oracle for `ram` bytes, all zero.
    pub fn new(ram: u64) -> Oracle {
        Oracle {
            lines: (0..ram / 64).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The value expected at `gpa` (a line start).
    pub fn get(&self, gpa: u64) -> u64 {
        self.lines[(gpa / 64) as usize].load(Ordering::Relaxed)
    }

    /// Records a write of `v` at `gpa` (a line start).
    pub fn set(&self, gpa: u64, v: u64) {
        self.lines[(gpa / 64) as usize].store(v, Ordering::Relaxed);
    }

    /// Records `len` bytes from `gpa` zeroed.
    pub fn zero(&self, gpa: u64, len: u64) {
        for l in &self.lines[(gpa / 64) as usize..((gpa + len) / 64) as usize] {
            l.store(0, Ordering::Relaxed);
        }
    }
}

/// The run's checker, shared by every thread.
#[derive(Debug)]
pub struct Checker {
    /// How much is checked.
    pub level: CheckLevel,
    mmu: &'static str,
    oracle: Arc<Oracle>,
    /// Where this checker's guest-physical addresses start in the
    /// oracle's (0, or an L2 guest's base in L1's memory).
    base: u64,
    log: Arc<Log>,
    /// The operation running (for the record of a violation).
    pub op: Arc<AtomicU64>,
}

/// The violations of a run, shared by its checkers.
#[derive(Debug)]
struct Log {
    violations: AtomicU64,
    details: Mutex<Vec<String>>,
    first_op: AtomicU64,
}

/// The oracle as one guest sees it: its guest-physical addresses offset to
/// where its memory is in the oracle's.
#[derive(Debug, Clone, Copy)]
pub struct OracleView<'a> {
    oracle: &'a Oracle,
    base: u64,
}

impl OracleView<'_> {
    /// The last value written to the line of `gpa`.
    pub fn get(&self, gpa: u64) -> u64 {
        self.oracle.get(self.base + gpa)
    }

    /// Records `v` as written to the line of `gpa`.
    pub fn set(&self, gpa: u64, v: u64) {
        self.oracle.set(self.base + gpa, v)
    }

    /// Records `len` bytes from `gpa` as zeroed.
    pub fn zero(&self, gpa: u64, len: u64) {
        self.oracle.zero(self.base + gpa, len)
    }
}

impl Checker {
    /// A checker of a run under `mmu` with `ram` bytes.
    pub fn new(level: CheckLevel, mmu: &'static str, ram: u64) -> Checker {
        Checker {
            level,
            mmu,
            oracle: Arc::new(Oracle::new(ram)),
            base: 0,
            log: Arc::new(Log {
                violations: AtomicU64::new(0),
                details: Mutex::new(Vec::new()),
                first_op: AtomicU64::new(u64::MAX),
            }),
            op: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The checker of an L2 guest whose physical memory is at `base` in
    /// this checker's (L1's memory, as L1's nested tables map it), under
    /// `mmu`: the same oracle, the same record of violations.
    pub fn for_guest(&self, base: u64, mmu: &'static str) -> Checker {
        Checker {
            level: self.level,
            mmu,
            oracle: self.oracle.clone(),
            base: self.base + base,
            log: self.log.clone(),
            op: self.op.clone(),
        }
    }

    /// The data oracle, at this checker's guest-physical addresses.
    pub fn oracle(&self) -> OracleView<'_> {
        OracleView {
            oracle: &self.oracle,
            base: self.base,
        }
    }

    /// Whether access number `n` of a vCPU is checked.
    #[inline]
    pub fn checks(&self, n: u64) -> bool {
        match self.level {
            CheckLevel::Full => true,
            CheckLevel::Sample => n.is_multiple_of(SAMPLE_EVERY),
            CheckLevel::Off => false,
        }
    }

    /// Records a violation by vCPU `vcpu` at `gva`/`gpa`.
    pub fn violation(&self, vcpu: usize, gva: u64, gpa: u64, expected: &str, actual: &str) {
        self.record(format!(
            "vCPU {vcpu}, {} MMU: gva {gva:#x} gpa {gpa:#x}: expected {expected}, got {actual}",
            self.mmu
        ));
    }

    /// Records a violation described by `what`.
    pub fn record(&self, what: String) {
        let op = self.op.load(Ordering::Relaxed);
        self.log.first_op.fetch_min(op, Ordering::Relaxed);
        self.log.violations.fetch_add(1, Ordering::Relaxed);
        tracing::error!(target: "vmmu_sim", violation = %what, op);
        let mut d = self.log.details.lock();
        if d.len() < KEEP {
            d.push(format!("op {op}: {what}"));
        }
    }

    /// Violations so far.
    pub fn violations(&self) -> u64 {
        self.log.violations.load(Ordering::Relaxed)
    }

    /// The first violations, described.
    pub fn details(&self) -> Vec<String> {
        self.log.details.lock().clone()
    }

    /// The operation of the first violation, if any.
    pub fn first_violation_op(&self) -> Option<u64> {
        Some(self.log.first_op.load(Ordering::Relaxed)).filter(|&o| o != u64::MAX)
    }

    /// Whether the guest's tables in memory translate `va` (at CPL 3, a
    /// read) to `expected` (gpa), as the OS's record says, by the
    /// foundation walker (a peek: no A/D bits set).
    pub fn walk_matches(
        &self,
        memory: &GuestMemory,
        regs: &ControlRegs,
        root: u64,
        va: u64,
        expected: Option<u64>,
    ) -> Result<(), String> {
        let access = Access::new(AccessKind::Read, 3, false);
        let got = reference(memory, regs, &CpuFeatures::default(), root, va, access, 0).ok();
        if got == expected {
            Ok(())
        } else {
            Err(format!(
                "the guest's page tables in memory translate {va:#x} to {got:x?}, the OS wrote {expected:x?}"
            ))
        }
    }
}

/// What x86 does for `access` at `va` with the tables in `memory` under
/// `root` (CR3's table) and `regs`: the gpa, or the #PF error code (`None`
/// for a #GP or an unreadable table). By the foundation walker, as a peek
/// (no A/D bits set), with protection keys checked against `pkru`; PAE
/// PDPTEs are read from memory as a CR3 load would.
pub fn reference(
    memory: &GuestMemory,
    regs: &ControlRegs,
    features: &CpuFeatures,
    root: u64,
    va: u64,
    access: Access,
    pkru: u32,
) -> Result<u64, Option<PfErrorCode>> {
    {
        let paging = GuestPaging::new(regs, features);
        let root = match paging.mode() {
            vmmu::arch::control::PagingMode::Pae => {
                let mut pdptes = [0u64; 4];
                for (i, p) in pdptes.iter_mut().enumerate() {
                    *p = memory.read_u64(Gpa::new(root + 8 * i as u64)).unwrap_or(0);
                }
                Root::PaeRegs {
                    pdpt: Gpa::new(root),
                    pdptes,
                }
            }
            _ => Root::Table(Gpa::new(root)),
        };
        paging
            .peek(memory, &root, Gva::new(va), access, pkru)
            .map(|w| w.gpa.raw())
            .map_err(|e| e.error_code())
    }
}
