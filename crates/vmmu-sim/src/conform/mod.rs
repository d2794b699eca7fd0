//! x86 paging conformance: the recorded case formats and their replay.
//!
//! A case builds a guest memory from its entries, sets the control state,
//! replays an access (or a sequence of steps), and compares what the guest
//! observes with what x86 did. [`Replayer`] is what a path under test
//! implements; [`WalkerReplayer`] replays through the guest walker alone,
//! with a fresh walk at every access and stores written straight to memory.

pub mod case;
pub mod nested;
pub mod tdp;

use std::fmt;
use std::io::BufRead;
use std::path::Path;

use serde::Serialize;

pub use case::{Case, CaseControl, Hex, Outcome, SingleCase, Step, StepCase};
pub use nested::NestedReplayer;
pub use tdp::{ShadowReplayer, TdpReplayer};
use vmmu::addr::{Gpa, Gva};
use vmmu::arch::control::{CR3_NOFLUSH, CpuFeatures, Cr0, Cr4, Efer, PagingMode};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::arch::pfec::GP_VECTOR;
use vmmu::walker::{ControlRegs, GuestPaging, Root, SparseMemory, WalkError, load_pdptes};

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
pub fn outcome_of<E: fmt::Debug>(r: &Result<vmmu::walker::Walk, WalkError<E>>) -> Outcome {
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
                    let base = self.cr3 & vmmu::arch::control::CR3_PAE_PDPT_MASK;
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
        let r = self.paging.walk(mem, &self.root(), Gva::new(va), access, self.pkru);
        outcome_of(&r)
    }
}

/// A machine a case drives: what each step does to it. One replay loop
/// ([`replay`]) serves every path under test.
pub trait StepMachine {
    /// One access at `va` (a write stores `value`); the outcome the guest sees.
    fn access(&mut self, va: u64, kind: AccessKind, cpl: u8, ac: bool, value: u64) -> Result<Outcome, String>;
    /// The guest kernel's store of `size` bytes at `va` (identity-mapped).
    fn store(&mut self, va: u64, size: usize, value: u64) -> Result<(), String>;
    /// INVLPG.
    fn invlpg(&mut self, va: u64);
    /// MOV to CR3.
    fn mov_cr3(&mut self, value: u64) -> Result<(), String>;
    /// MOV to CR0 changing only WP.
    fn set_cr0_wp(&mut self, wp: bool);
    /// MOV to CR4 changing SMEP/SMAP/PGE (`None`: unchanged).
    fn set_cr4(&mut self, smep: Option<bool>, smap: Option<bool>, pge: Option<bool>);
    /// INVPCID.
    fn invpcid(&mut self, kind: u8, pcid: u16, va: u64);
    /// Reads a paging entry of `size` bytes at `pa`, as the checks see memory.
    fn read_entry(&self, pa: u64, size: usize) -> u64;
}

/// Replays `case` on `m` and checks every observation.
pub fn replay(m: &mut impl StepMachine, case: &Case) -> Result<(), Failure> {
    let id = case.id();
    let fail = |what: String| Failure {
        id,
        expected: "the replay to run".to_string(),
        got: what,
    };
    match case {
        Case::Single(c) => {
            let esize = c.control.mode.entry_size();
            let got = m.access(c.va.0, c.access.into(), c.cpl, c.rflags_ac, 0).map_err(fail)?;
            check_outcome(id, None, &c.result, &got)?;
            check_after(c, |pa| m.read_entry(pa, esize))
        }
        Case::Steps(c) => {
            let esize = c.control.mode.entry_size();
            for (i, step) in c.steps.iter().enumerate() {
                let at = |e: String| fail(format!("step {i}: {e}"));
                match step {
                    Step::Access {
                        cpl,
                        rflags_ac,
                        access,
                        va,
                        value,
                        expect,
                    } => {
                        let v = value.map_or(0, |v| v.0);
                        let got = m.access(va.0, (*access).into(), *cpl, *rflags_ac, v).map_err(at)?;
                        check_outcome(id, Some(i), expect, &got)?;
                    }
                    Step::Store { va, value, size } => m.store(va.0, *size as usize, value.0).map_err(at)?,
                    Step::Invlpg { va } => m.invlpg(va.0),
                    Step::MovCr3 { value } => m.mov_cr3(value.0).map_err(at)?,
                    Step::SetCr0Wp { value } => m.set_cr0_wp(*value),
                    Step::SetCr4 { smep, smap, pge } => m.set_cr4(*smep, *smap, *pge),
                    Step::Invpcid { kind, pcid, va } => m.invpcid(*kind, *pcid, va.0),
                }
            }
            check_final(c, |pa| m.read_entry(pa, esize))
        }
        Case::Npt(_) | Case::Ept(_) => Err(fail(
            "a nested-paging case, which only the two-dimensional walk replays (--mmu walker)".to_string(),
        )),
    }
}

/// The walker as a [`StepMachine`]: a fresh walk at every access, stores
/// written straight to memory, no TLB (INVLPG and INVPCID do nothing).
struct WalkerMachine {
    mem: SparseMemory,
    cpu: WalkerCpu,
    access_size: usize,
}

impl StepMachine for WalkerMachine {
    fn access(&mut self, va: u64, kind: AccessKind, cpl: u8, ac: bool, value: u64) -> Result<Outcome, String> {
        let got = self.cpu.access(&self.mem, va, Access::new(kind, cpl, ac));
        if let (false, Some(pa), AccessKind::Write) = (got.fault, got.pa, kind) {
            self.mem.write_uint(Gpa::new(pa.0), self.access_size, value);
        }
        Ok(got)
    }
    fn store(&mut self, va: u64, size: usize, value: u64) -> Result<(), String> {
        self.mem.write_uint(Gpa::new(va), size, value);
        Ok(())
    }
    fn invlpg(&mut self, _va: u64) {}
    fn mov_cr3(&mut self, value: u64) -> Result<(), String> {
        self.cpu.load_cr3(value, &self.mem);
        Ok(())
    }
    fn set_cr0_wp(&mut self, wp: bool) {
        let mut regs = self.cpu.regs;
        regs.cr0.set(Cr0::WP, wp);
        self.cpu.set_regs(regs);
    }
    fn set_cr4(&mut self, smep: Option<bool>, smap: Option<bool>, pge: Option<bool>) {
        let mut regs = self.cpu.regs;
        for (v, bit) in [(smep, Cr4::SMEP), (smap, Cr4::SMAP), (pge, Cr4::PGE)] {
            if let Some(v) = v {
                regs.cr4.set(bit, v);
            }
        }
        self.cpu.set_regs(regs);
    }
    fn invpcid(&mut self, _kind: u8, _pcid: u16, _va: u64) {}
    fn read_entry(&self, pa: u64, size: usize) -> u64 {
        self.mem.read_uint(Gpa::new(pa), size)
    }
}

impl Replayer for WalkerReplayer {
    fn name(&self) -> &'static str {
        "walker"
    }

    fn replay(&mut self, case: &Case) -> Result<(), Failure> {
        let (control, memory) = match case {
            Case::Single(c) => (&c.control, &c.memory),
            Case::Steps(c) => (&c.control, &c.memory),
            Case::Npt(c) => return nested::replay_npt(c),
            Case::Ept(c) => return nested::replay_ept(c),
        };
        let mem = SparseMemory::new();
        load_memory(&mem, memory, control.mode.entry_size());
        let cpu = WalkerCpu::new(control, &mem);
        let mut m = WalkerMachine {
            mem,
            cpu,
            access_size: control.mode.access_size(),
        };
        replay(&mut m, case)
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
