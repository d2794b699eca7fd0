//! x86 paging conformance: the recorded case formats and their replay.
//!
//! A case builds a guest memory from its entries, sets the control state,
//! replays an access (or a sequence of steps), and compares what the guest
//! observes with what x86 did. [`Replayer`] is what a path under test
//! implements; [`WalkerReplayer`] replays through the guest walker alone,
//! with a fresh walk at every access and stores written straight to memory.

pub mod case;
pub mod tdp;

use std::fmt;
use std::io::BufRead;
use std::path::Path;

use serde::Serialize;

use crate::addr::Gpa;
use crate::arch::control::{CR3_NOFLUSH, CpuFeatures, Cr0, Cr4, Efer, PagingMode};
use crate::arch::perm::Access;
use crate::arch::pfec::GP_VECTOR;
use crate::walker::{ControlRegs, GuestPaging, Root, SparseMemory, WalkError, load_pdptes};
pub use case::{Case, CaseControl, Hex, Outcome, SingleCase, Step, StepCase};
pub use tdp::TdpReplayer;

/// The verdict on one case.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// Case id.
    pub id: u64,
    /// What x86 did.
    pub expected: String,
    /// What was observed.
    pub got: String,
}

/// A path under test: replays a case and reports any mismatch.
pub trait Replayer {
    /// The name of the path (`walker`, `shadow`, `tdp`).
    fn name(&self) -> &'static str;
    /// Replays one case; `Ok` if every observation matches.
    fn replay(&mut self, case: &Case) -> Result<(), Failure>;
}

/// The control registers a case's control state sets.
pub fn case_regs(c: &CaseControl) -> ControlRegs {
    let mut cr0 = Cr0::PE | Cr0::PG;
    if c.cr0_wp {
        cr0 |= Cr0::WP;
    }
    let mut cr4 = Cr4::empty();
    let mode = c.mode.paging_mode();
    if mode.has_pae() {
        cr4 |= Cr4::PAE;
    }
    if mode == PagingMode::Level5 {
        cr4 |= Cr4::LA57;
    }
    for (on, bit) in [
        (c.cr4_pse, Cr4::PSE),
        (c.cr4_smep, Cr4::SMEP),
        (c.cr4_smap, Cr4::SMAP),
        (c.cr4_pke, Cr4::PKE),
        (c.cr4_pge, Cr4::PGE),
        (c.cr4_pcide, Cr4::PCIDE),
    ] {
        if on {
            cr4 |= bit;
        }
    }
    let mut efer = Efer::empty();
    if mode.is_long() {
        efer |= Efer::LME | Efer::LMA;
    }
    if c.efer_nxe {
        efer |= Efer::NXE;
    }
    ControlRegs { cr0, cr4, efer }
}

/// The features a case was recorded with.
pub fn case_features(c: &CaseControl) -> CpuFeatures {
    CpuFeatures::default().with_maxphyaddr(c.maxphyaddr)
}

/// Loads a case's memory entries into `mem`.
pub fn load_memory(mem: &SparseMemory, entries: &[case::MemEntry], entry_size: usize) {
    for e in entries {
        mem.write_uint(Gpa::new(e.pa.0), entry_size, e.value.0);
    }
}

/// Describes an outcome for a failure line.
pub fn describe(o: &Outcome) -> String {
    if !o.fault {
        match o.pa {
            Some(pa) => format!("pa {:#x}", pa.0),
            None => "no fault, no pa".to_string(),
        }
    } else if o.effective_vector() == Some(GP_VECTOR) {
        "#GP(0)".to_string()
    } else {
        format!("#PF error code {:#x}", o.error_code.unwrap_or(0))
    }
}

/// Compares a single case's `after` entries with memory: exact on success;
/// on a fault every bit but Accessed (bit 5) must match.
pub fn check_after(c: &SingleCase, read: impl Fn(u64) -> u64) -> Result<(), Failure> {
    let mask = if c.result.fault { !(1u64 << 5) } else { u64::MAX };
    for e in &c.after {
        let got = read(e.pa.0);
        if (got ^ e.value.0) & mask != 0 {
            return Err(Failure {
                id: c.id,
                expected: format!("entry {:#x} = {:#x} after the access", e.pa.0, e.value.0),
                got: format!("{got:#x}"),
            });
        }
    }
    Ok(())
}

/// Compares a step case's `final` entries with memory, under their masks.
pub fn check_final(c: &StepCase, read: impl Fn(u64) -> u64) -> Result<(), Failure> {
    for e in &c.final_entries {
        let got = read(e.pa.0);
        if got & e.mask.0 != e.value.0 {
            return Err(Failure {
                id: c.id,
                expected: format!(
                    "final entry {:#x} = {:#x} under mask {:#x}",
                    e.pa.0, e.value.0, e.mask.0
                ),
                got: format!("{:#x}", got & e.mask.0),
            });
        }
    }
    Ok(())
}

/// Compares one access's outcome with the recorded one.
pub fn check_outcome(id: u64, step: Option<usize>, expected: &Outcome, got: &Outcome) -> Result<(), Failure> {
    if expected.matches(got) {
        return Ok(());
    }
    let at = step.map(|s| format!("step {s}: ")).unwrap_or_default();
    Err(Failure {
        id,
        expected: format!("{at}{}", describe(expected)),
        got: describe(got),
    })
}

/// The outcome of a walk, as the conformance format writes it.
pub fn outcome_of<E: fmt::Debug>(r: &Result<crate::walker::Walk, WalkError<E>>) -> Outcome {
    match r {
        Ok(walk) => Outcome {
            fault: false,
            vector: None,
            error_code: None,
            pa: Some(Hex(walk.gpa.raw())),
        },
        Err(WalkError::PageFault(pf)) => Outcome {
            fault: true,
            vector: Some(14),
            error_code: Some(pf.error_code.bits()),
            pa: None,
        },
        Err(WalkError::NonCanonical) => Outcome {
            fault: true,
            vector: Some(GP_VECTOR),
            error_code: Some(0),
            pa: None,
        },
        Err(WalkError::Memory { .. }) => Outcome {
            fault: true,
            vector: Some(255),
            error_code: None,
            pa: None,
        },
    }
}

/// Replays cases through the guest walker alone: a fresh walk at every
/// access (no TLB), stores written straight to guest memory.
#[derive(Debug, Default)]
pub struct WalkerReplayer;

/// The walker's view of a case's CPU while it replays.
struct WalkerCpu {
    regs: ControlRegs,
    features: CpuFeatures,
    paging: GuestPaging,
    cr3: u64,
    pdptes: [u64; 4],
    pkru: u32,
}

impl WalkerCpu {
    fn new(c: &CaseControl, mem: &SparseMemory) -> WalkerCpu {
        let regs = case_regs(c);
        let features = case_features(c);
        let mut cpu = WalkerCpu {
            regs,
            features,
            paging: GuestPaging::new(&regs, &features),
            cr3: c.cr3.0,
            pdptes: [0; 4],
            pkru: c.pkru.0 as u32,
        };
        cpu.load_cr3(c.cr3.0, mem);
        cpu
    }

    fn load_cr3(&mut self, value: u64, mem: &SparseMemory) {
        self.cr3 = if self.regs.cr4.contains(Cr4::PCIDE) {
            value & !CR3_NOFLUSH
        } else {
            value
        };
        if self.paging.mode() == PagingMode::Pae {
            // The corpus never loads a PDPTE with reserved bits (that is a
            // #GP at MOV to CR3); if one appears, the walk reports it as a
            // reserved-bit #PF.
            self.pdptes = match load_pdptes(mem, self.cr3, &self.features) {
                Ok(p) => p,
                Err(_) => {
                    let base = self.cr3 & crate::arch::control::CR3_PAE_PDPT_MASK;
                    std::array::from_fn(|i| mem.read_uint(Gpa::new(base + 8 * i as u64), 8))
                }
            };
        }
    }

    fn set_regs(&mut self, regs: ControlRegs) {
        self.regs = regs;
        self.paging = GuestPaging::new(&regs, &self.features);
    }

    fn root(&self) -> Root {
        self.paging.root(self.cr3, self.pdptes)
    }

    fn access(&self, mem: &SparseMemory, va: u64, access: Access) -> Outcome {
        let r = self.paging.walk(mem, &self.root(), va, access, self.pkru);
        outcome_of(&r)
    }
}

impl Replayer for WalkerReplayer {
    fn name(&self) -> &'static str {
        "walker"
    }

    fn replay(&mut self, case: &Case) -> Result<(), Failure> {
        match case {
            Case::Single(c) => {
                let mem = SparseMemory::new();
                let esize = c.control.mode.entry_size();
                load_memory(&mem, &c.memory, esize);
                let cpu = WalkerCpu::new(&c.control, &mem);
                let got = cpu.access(&mem, c.va.0, Access::new(c.access.into(), c.cpl, c.rflags_ac));
                check_outcome(c.id, None, &c.result, &got)?;
                check_after(c, |pa| mem.read_uint(Gpa::new(pa), esize))
            }
            Case::Steps(c) => {
                let mem = SparseMemory::new();
                let esize = c.control.mode.entry_size();
                let asize = c.control.mode.access_size();
                load_memory(&mem, &c.memory, esize);
                let mut cpu = WalkerCpu::new(&c.control, &mem);
                for (i, step) in c.steps.iter().enumerate() {
                    match step {
                        Step::Access {
                            cpl,
                            rflags_ac,
                            access,
                            va,
                            value,
                            expect,
                        } => {
                            let got = cpu.access(&mem, va.0, Access::new((*access).into(), *cpl, *rflags_ac));
                            if let (false, Some(pa), Some(v)) = (got.fault, got.pa, value) {
                                mem.write_uint(Gpa::new(pa.0), asize, v.0);
                            }
                            check_outcome(c.id, Some(i), expect, &got)?;
                        }
                        Step::Store { va, value, size } => mem.write_uint(Gpa::new(va.0), *size as usize, value.0),
                        Step::Invlpg { .. } | Step::Invpcid { .. } => {}
                        Step::MovCr3 { value } => cpu.load_cr3(value.0, &mem),
                        Step::SetCr0Wp { value } => {
                            let mut regs = cpu.regs;
                            regs.cr0.set(Cr0::WP, *value);
                            cpu.set_regs(regs);
                        }
                        Step::SetCr4 { smep, smap, pge } => {
                            let mut regs = cpu.regs;
                            for (v, bit) in [(smep, Cr4::SMEP), (smap, Cr4::SMAP), (pge, Cr4::PGE)] {
                                if let Some(v) = v {
                                    regs.cr4.set(bit, *v);
                                }
                            }
                            cpu.set_regs(regs);
                        }
                    }
                }
                check_final(c, |pa| mem.read_uint(Gpa::new(pa), esize))
            }
        }
    }
}

/// A malformed case file.
#[derive(Debug, thiserror::Error)]
pub enum ConformError {
    /// The file could not be opened or read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The error.
        source: std::io::Error,
    },
    /// A line is not a valid case.
    #[error("{file}:{line}: {reason}")]
    Parse {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Parses every case of a file; blank lines are skipped.
pub fn read_cases(path: &Path) -> Result<Vec<Case>, ConformError> {
    let file = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|source| ConformError::Io {
        file: file.clone(),
        source,
    })?;
    let mut cases = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|source| ConformError::Io {
            file: file.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let case = Case::parse(&line).map_err(|reason| ConformError::Parse {
            file: file.clone(),
            line: n + 1,
            reason,
        })?;
        cases.push(case);
    }
    Ok(cases)
}

/// The result of replaying a set of cases.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Cases whose every observation matched.
    pub passed: u64,
    /// Cases with a mismatch.
    pub failed: u64,
    /// The failures (all of them; callers truncate for display).
    pub failures: Vec<Failure>,
}

/// Replays `cases` through `replayer`.
pub fn run_cases(replayer: &mut dyn Replayer, cases: &[Case], report: &mut Report) {
    for case in cases {
        match replayer.replay(case) {
            Ok(()) => report.passed += 1,
            Err(f) => {
                report.failed += 1;
                report.failures.push(f);
            }
        }
    }
}
