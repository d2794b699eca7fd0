//! The nested-paging cases: AMD NPT (`public-npt-<mode>.jsonl`, recorded
//! from QEMU's SVM; `FORMAT-npt.md`) and Intel EPT (`public-ept.jsonl`,
//! recorded from Bochs's VMX; `FORMAT-ept.md`), parsed, and replayed
//! through the engine's two-dimensional walk ([`vmmu::walker::nested`]).
//!
//! Both give host-physical memory (the nested tables, and the guest's
//! tables at the host addresses the nested tables map them to), the L2
//! guest's control state and one access; the outcome is how the access
//! ends (done, a guest exception, or the nested fault's exit information)
//! and every entry afterwards.

use serde::{Deserialize, Serialize};
use vmmu::addr::{Gpa, Gva, Hpa};
use vmmu::arch::control::{CR3_PAE_PDPT_MASK, CpuFeatures, Cr0, Cr4, Efer, PagingMode};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::arch::pte::EntrySize;
use vmmu::walker::nested::{NestedError, NestedFault, NestedMemory, NestedPaging, NestedStage, Walk2dError, walk_2d};
use vmmu::walker::{ControlRegs, GuestPaging, PtMemory, Root, SparseMemory, WalkError, load_pdptes};

use super::Failure;
use super::case::{CaseAccess, CaseMode, Hex};

/// The nested tables of an NPT case.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct NptControl {
    /// 4 or 5 levels (the host's paging mode).
    pub levels: u8,
    /// The VMCB's N_CR3.
    pub ncr3: Hex,
    /// Host EFER.NXE at VMRUN.
    pub host_nxe: bool,
}

/// One entry an NPT case writes.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct NptMemEntry {
    /// `npt` (a nested entry) or `l2` (a guest entry).
    pub table: String,
    /// Its host-physical address.
    pub hpa: Hex,
    /// Its value.
    pub value: Hex,
}

/// The recorded outcome of an NPT case.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct NptResult {
    /// `none`, `pf` or `npf`.
    pub exit: String,
    /// The guest #PF error code.
    pub error_code: Option<u32>,
    /// EXITINFO1.
    pub exitinfo1: Option<Hex>,
    /// EXITINFO2.
    pub exitinfo2: Option<Hex>,
    /// The final guest-physical address.
    pub gpa: Option<Hex>,
    /// The host-physical address reached.
    pub pa: Option<Hex>,
}

/// An entry to compare after an NPT case, under its mask.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub struct MaskedEntry {
    /// Its host-physical address.
    pub hpa: Hex,
    /// The expected value, masked.
    pub value: Hex,
    /// The bits that must match.
    pub mask: Hex,
}

/// An AMD nested-paging case (`public-npt-<mode>.jsonl`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct NptCase {
    /// Case id.
    pub id: u64,
    /// The guest's paging mode.
    pub mode: CaseMode,
    /// CR0.WP.
    pub cr0_wp: bool,
    /// CR4.PSE.
    pub cr4_pse: bool,
    /// CR4.SMEP.
    pub cr4_smep: bool,
    /// CR4.SMAP.
    pub cr4_smap: bool,
    /// CR4.PKE.
    pub cr4_pke: bool,
    /// EFER.NXE.
    pub efer_nxe: bool,
    /// PKRU.
    pub pkru: Hex,
    /// CPL of the access.
    pub cpl: u8,
    /// RFLAGS.AC.
    pub rflags_ac: bool,
    /// The access.
    pub access: CaseAccess,
    /// MAXPHYADDR.
    pub maxphyaddr: u8,
    /// The guest's CR3 (guest-physical).
    pub cr3: Hex,
    /// The linear address accessed.
    pub va: Hex,
    /// The nested tables.
    pub npt: NptControl,
    /// Every entry the case wrote.
    pub memory: Vec<NptMemEntry>,
    /// The recorded outcome.
    pub result: NptResult,
    /// The entries afterwards.
    pub after: Vec<MaskedEntry>,
}

/// The guest state of an EPT case.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct EptGuest {
    /// CR0.
    pub cr0: Hex,
    /// CR3 (guest-physical).
    pub cr3: Hex,
    /// CR4.
    pub cr4: Hex,
    /// IA32_EFER.
    pub efer: Hex,
    /// RFLAGS.AC.
    pub rflags_ac: bool,
    /// The VMCS guest-PDPTE fields (PAE).
    #[serde(default)]
    pub pdptes: Option<Vec<Hex>>,
    /// Whether the first instruction reloads CR3 (and the PDPTEs).
    #[serde(default)]
    pub pdpte_reload: bool,
}

/// One entry an EPT case writes.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub struct EptMemEntry {
    /// Its host-physical address.
    pub hpa: Hex,
    /// Its value.
    pub value: Hex,
    /// 8 or 4 bytes.
    pub size: u8,
}

/// The recorded outcome of an EPT case.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct EptResult {
    /// `vmcall`, `exception`, `ept_violation`, `ept_misconfig` or
    /// `entry_fail_guest_state`.
    pub exit: String,
    /// The bytes a read read, or a fetched stub's immediate.
    #[serde(default)]
    pub value_read: Option<Hex>,
    /// The exception vector.
    #[serde(default)]
    pub vector: Option<u8>,
    /// The exception error code.
    #[serde(default)]
    pub error_code: Option<u32>,
    /// The exit qualification.
    #[serde(default)]
    pub qualification: Option<Hex>,
    /// Qualification bits the SDM leaves open.
    #[serde(default)]
    pub qualification_dont_care: Option<Hex>,
    /// The guest-physical address of an EPT exit.
    #[serde(default)]
    pub gpa: Option<Hex>,
    /// The guest-linear address of an EPT violation.
    #[serde(default)]
    pub gla: Option<Hex>,
}

/// An entry to compare after an EPT case.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub struct EptAfter {
    /// Its host-physical address.
    pub hpa: Hex,
    /// The expected value.
    pub value: Hex,
    /// Bits the SDM leaves open.
    #[serde(default)]
    pub dont_care: Option<Hex>,
}

/// The target slot after a write case.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub struct EptProbe {
    /// Its host-physical address.
    pub hpa: Hex,
    /// Its size.
    pub size: u8,
    /// The expected value.
    pub value: Hex,
}

/// An Intel EPT case (`public-ept.jsonl`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct EptCase {
    /// Case id.
    pub id: u64,
    /// `lm4`, `pae`, `ia32` or `nopg`.
    pub mode: String,
    /// The access.
    pub access: CaseAccess,
    /// Its size in bytes.
    pub access_size: u8,
    /// CPL of the access.
    pub cpl: u8,
    /// MAXPHYADDR.
    pub maxphyaddr: u8,
    /// The EPT pointer.
    pub eptp: Hex,
    /// EPT accessed and dirty flags.
    pub ept_ad: bool,
    /// The guest state.
    pub guest: EptGuest,
    /// The linear address accessed.
    pub va: Hex,
    /// The value a write stores.
    #[serde(default)]
    pub write_value: Option<Hex>,
    /// Entries written, in order, over zeroed pages.
    pub memory: Vec<EptMemEntry>,
    /// The recorded outcome.
    pub result: EptResult,
    /// The entries afterwards.
    pub after: Vec<EptAfter>,
    /// The target slot after a write.
    #[serde(default)]
    pub probe_after: Option<Vec<EptProbe>>,
}

impl NptCase {
    /// The L2 guest's control state, as a single-level case's (the same
    /// fields, with `cr3` guest-physical).
    pub fn control(&self) -> super::CaseControl {
        super::CaseControl {
            mode: self.mode,
            cr0_wp: self.cr0_wp,
            cr4_pse: self.cr4_pse,
            cr4_smep: self.cr4_smep,
            cr4_smap: self.cr4_smap,
            cr4_pke: self.cr4_pke,
            efer_nxe: self.efer_nxe,
            cr4_pge: false,
            cr4_pcide: false,
            pkru: self.pkru,
            maxphyaddr: self.maxphyaddr,
            cr3: self.cr3,
        }
    }

    /// The recorded outcome, for a failure line.
    fn expected(&self) -> String {
        let r = &self.result;
        match r.exit.as_str() {
            "none" => format!(
                "done at gpa {:#x}, pa {:#x}",
                r.gpa.map_or(0, |h| h.0),
                r.pa.map_or(0, |h| h.0)
            ),
            "pf" => format!("#PF error code {:#x}", r.error_code.unwrap_or(0)),
            _ => format!(
                "#NPF exitinfo1 {:#x} exitinfo2 {:#x}",
                r.exitinfo1.map_or(0, |h| h.0),
                r.exitinfo2.map_or(0, |h| h.0)
            ),
        }
    }

    /// Checks the values the format constrains.
    pub fn validate(&self) -> Result<(), String> {
        if !(32..=52).contains(&self.maxphyaddr) {
            return Err(format!("maxphyaddr {} is outside 32..=52", self.maxphyaddr));
        }
        if !matches!(self.npt.levels, 4 | 5) {
            return Err(format!("npt.levels {} is not 4 or 5", self.npt.levels));
        }
        if self.cpl > 3 {
            return Err(format!("cpl {} is outside 0..=3", self.cpl));
        }
        if let Some(e) = self.memory.iter().find(|e| !matches!(e.table.as_str(), "npt" | "l2")) {
            return Err(format!(
                "memory entry at {:#x}: table {:?} is not npt or l2",
                e.hpa.0, e.table
            ));
        }
        if !matches!(self.result.exit.as_str(), "none" | "pf" | "npf") {
            return Err(format!("result.exit {:?} is not none, pf or npf", self.result.exit));
        }
        Ok(())
    }
}

impl EptCase {
    /// Checks the values the format constrains.
    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.mode.as_str(), "lm4" | "pae" | "ia32" | "nopg") {
            return Err(format!("mode {:?} is not lm4, pae, ia32 or nopg", self.mode));
        }
        if !(32..=52).contains(&self.maxphyaddr) {
            return Err(format!("maxphyaddr {} is outside 32..=52", self.maxphyaddr));
        }
        if self.cpl > 3 {
            return Err(format!("cpl {} is outside 0..=3", self.cpl));
        }
        if !matches!(self.access_size, 4 | 8) {
            return Err(format!("access_size {} is not 4 or 8", self.access_size));
        }
        if let Some(e) = self.memory.iter().find(|e| !matches!(e.size, 4 | 8)) {
            return Err(format!("memory entry at {:#x}: size {} is not 4 or 8", e.hpa.0, e.size));
        }
        if !matches!((self.eptp.0 >> 3) & 7, 3 | 4) {
            return Err(format!("eptp {:#x}: the walk length is not 4 or 5", self.eptp.0));
        }
        Ok(())
    }
}

/// How a replayed nested access ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// Completed at guest-physical `gpa`, host-physical `hpa`.
    Done { gpa: u64, hpa: u64 },
    /// A guest exception.
    Exception { vector: u8, error_code: u32 },
    /// A nested fault.
    Nested(NestedFault),
    /// VM entry failed on a VMCS PDPTE with a reserved bit.
    EntryFail,
}

fn guest_fault(e: WalkError<std::convert::Infallible>) -> Ended {
    match e {
        WalkError::PageFault(pf) => Ended::Exception {
            vector: 14,
            error_code: pf.error_code.bits(),
        },
        WalkError::NonCanonical => Ended::Exception {
            vector: 13,
            error_code: 0,
        },
        WalkError::Memory { error, .. } => match error {},
    }
}

fn walk_2d_ended(r: Result<vmmu::walker::nested::Walk2d, Walk2dError<std::convert::Infallible>>) -> Ended {
    match r {
        Ok(w) => Ended::Done {
            gpa: w.guest.gpa.raw(),
            hpa: w.hpa.raw(),
        },
        Err(Walk2dError::Guest(e)) => guest_fault(e),
        Err(Walk2dError::Nested(e)) => nested_ended(e),
    }
}

fn nested_ended(e: NestedError<std::convert::Infallible>) -> Ended {
    match e {
        NestedError::Fault(f) => Ended::Nested(f),
        NestedError::Host { error, .. } => match error {},
    }
}

fn case_access(access: CaseAccess, cpl: u8, ac: bool) -> Access {
    Access::new(AccessKind::from(access), cpl, ac)
}

/// Replays an NPT case through the two-dimensional walk.
pub fn replay_npt(c: &NptCase) -> Result<(), Failure> {
    let fail = |expected: String, got: String| Failure {
        id: c.id,
        expected,
        got,
    };
    let host = SparseMemory::new();
    for e in &c.memory {
        let size = if e.table == "l2" { c.mode.entry_size() } else { 8 };
        host.write_uint(Gpa::new(e.hpa.0), size, e.value.0);
    }
    let features = CpuFeatures::default().with_maxphyaddr(c.maxphyaddr);
    let nested = NestedPaging::npt(Hpa::new(c.npt.ncr3.0), c.npt.levels, c.npt.host_nxe, &features);
    let mode = c.mode.paging_mode();
    let regs = super::case_regs(&c.control());
    let paging = GuestPaging::new(&regs, &features);
    let va = Gva::new(c.va.0);
    let access = case_access(c.access, c.cpl, c.rflags_ac);
    let ended = (|| {
        let root = if mode == PagingMode::Pae {
            // No PDPTE registers under NPT: the walk reads the PDPTE it
            // needs through the nested tables, as every other level.
            let mem = NestedMemory {
                nested: &nested,
                host: &host,
                stage: NestedStage::GuestPagingStructure { gla: va },
            };
            let pdpt = c.cr3.0 & CR3_PAE_PDPT_MASK;
            let index = ((va.raw() >> 30) & 3) as usize;
            let mut pdptes = [0u64; 4];
            match mem.read_entry(Gpa::new(pdpt + 8 * index as u64), EntrySize::Eight) {
                Ok(v) => pdptes[index] = v,
                Err(e) => return nested_ended(e),
            }
            Root::PaeRegs {
                pdpt: Gpa::new(pdpt),
                pdptes,
            }
        } else {
            paging.root(c.cr3.0, [0; 4])
        };
        walk_2d_ended(walk_2d(&paging, &root, va, access, c.pkru.0 as u32, &nested, &host))
    })();
    let r = &c.result;
    let expected = c.expected();
    let matches = match (r.exit.as_str(), ended) {
        ("none", Ended::Done { gpa, hpa }) => r.gpa == Some(Hex(gpa)) && r.pa == Some(Hex(hpa)),
        ("pf", Ended::Exception { vector: 14, error_code }) => {
            r.error_code == Some(error_code)
                && r.exitinfo1 == Some(Hex(u64::from(error_code)))
                && r.exitinfo2 == Some(Hex(va.raw()))
        }
        ("npf", Ended::Nested(NestedFault::Npf { exitinfo1, exitinfo2 })) => {
            r.exitinfo1 == Some(Hex(exitinfo1)) && r.exitinfo2 == Some(Hex(exitinfo2))
        }
        _ => false,
    };
    if !matches {
        return Err(fail(expected, describe(&ended)));
    }
    // `after` holds the `memory` entries in order: the size of each is the
    // size of its `memory` twin.
    for (i, e) in c.after.iter().enumerate() {
        let size = c
            .memory
            .get(i)
            .filter(|m| m.hpa == e.hpa && m.table == "l2")
            .map_or(8, |_| c.mode.entry_size());
        let got = host.read_uint(Gpa::new(e.hpa.0), size);
        if got & e.mask.0 != e.value.0 {
            return Err(fail(
                format!("entry {:#x} = {:#x} under mask {:#x}", e.hpa.0, e.value.0, e.mask.0),
                format!("{:#x}", got & e.mask.0),
            ));
        }
    }
    Ok(())
}

/// Replays an EPT case through the two-dimensional walk.
pub fn replay_ept(c: &EptCase) -> Result<(), Failure> {
    let host = SparseMemory::new();
    for e in &c.memory {
        host.write_uint(Gpa::new(e.hpa.0), usize::from(e.size), e.value.0);
    }
    let features = CpuFeatures::default().with_maxphyaddr(c.maxphyaddr);
    let levels = ((c.eptp.0 >> 3) & 7) as u8 + 1;
    let nested = NestedPaging::ept(Hpa::new(c.eptp.0), levels, c.ept_ad, &features);
    let regs = ControlRegs {
        cr0: Cr0::from_bits_truncate(c.guest.cr0.0),
        cr4: Cr4::from_bits_truncate(c.guest.cr4.0),
        efer: Efer::from_bits_truncate(c.guest.efer.0),
    };
    let paging = GuestPaging::new(&regs, &features);
    let va = Gva::new(c.va.0);
    let access = case_access(c.access, c.cpl, c.guest.rflags_ac);
    let size = usize::from(c.access_size);
    let ended = (|| {
        let mut pdptes = [0u64; 4];
        if paging.mode() == PagingMode::Pae {
            // VM entry loads the PDPTE registers from the VMCS and checks
            // them; a MOV to CR3 loads them from memory (through EPT, on
            // behalf of no linear address) and a reserved bit is #GP(0).
            let rsvd = vmmu::arch::rsvd::RsvdBits::guest(PagingMode::Pae, &features, true, false);
            for (slot, v) in pdptes.iter_mut().zip(c.guest.pdptes.iter().flatten()) {
                *slot = v.0;
            }
            if pdptes.iter().any(|&p| p & 1 != 0 && rsvd.is_reserved(p, 3, false)) {
                return Ended::EntryFail;
            }
            if c.guest.pdpte_reload {
                let mem = NestedMemory {
                    nested: &nested,
                    host: &host,
                    stage: NestedStage::NoLinearAddress,
                };
                pdptes = match load_pdptes(&mem, c.guest.cr3.0, &features) {
                    Ok(p) => p,
                    Err(vmmu::walker::PdpteLoadError::Reserved { .. }) => {
                        return Ended::Exception {
                            vector: 13,
                            error_code: 0,
                        };
                    }
                    Err(vmmu::walker::PdpteLoadError::Memory(e)) => return nested_ended(e),
                };
            }
        }
        let root = paging.root(c.guest.cr3.0, pdptes);
        walk_2d_ended(walk_2d(&paging, &root, va, access, 0, &nested, &host))
    })();
    // The access itself.
    let mut value_read = None;
    if let Ended::Done { hpa, .. } = ended {
        match c.access {
            CaseAccess::Read => value_read = Some(host.read_uint(Gpa::new(hpa), size)),
            // `mov $imm32,%ebx; vmcall`: the immediate follows the opcode.
            CaseAccess::Fetch => value_read = Some(host.read_uint(Gpa::new(hpa + 1), 4)),
            CaseAccess::Write => {
                host.write_uint(Gpa::new(hpa), size, c.write_value.map_or(0, |v| v.0));
            }
        }
    }
    check_ept(c, ended, value_read, |hpa, size| host.read_uint(Gpa::new(hpa), size))
}

/// Compares how an EPT case ended (and what the access read) with the
/// recording, then the entries afterwards as `read` reads them.
fn check_ept(
    c: &EptCase,
    ended: Ended,
    value_read: Option<u64>,
    read: impl Fn(u64, usize) -> u64,
) -> Result<(), Failure> {
    let fail = |expected: String, got: String| Failure {
        id: c.id,
        expected,
        got,
    };
    let va = Gva::new(c.va.0);
    let r = &c.result;
    let hex = |h: Option<Hex>| h.map_or("-".to_string(), |h| format!("{:#x}", h.0));
    let expected = format!(
        "{} (qualification {}, gpa {}, gla {}, vector {:?}, error code {:?}, value {})",
        r.exit,
        hex(r.qualification),
        hex(r.gpa),
        hex(r.gla),
        r.vector,
        r.error_code,
        hex(r.value_read)
    );
    let matches = match (r.exit.as_str(), ended) {
        ("vmcall", Ended::Done { .. }) => r.value_read.is_none() || r.value_read.map(|v| v.0) == value_read,
        ("exception", Ended::Exception { vector, error_code }) => {
            r.vector == Some(vector)
                && r.error_code == Some(error_code)
                && (vector != 14 || r.qualification == Some(Hex(va.raw())))
        }
        ("ept_violation", Ended::Nested(NestedFault::EptViolation { gpa, qual, gla })) => {
            let dont_care = r.qualification_dont_care.map_or(0, |h| h.0);
            r.qualification.is_some_and(|q| (q.0 ^ qual.bits()) & !dont_care == 0)
                && r.gpa == Some(Hex(gpa.raw()))
                && r.gla.is_none_or(|g| Some(Gva::new(g.0)) == gla)
        }
        ("ept_misconfig", Ended::Nested(NestedFault::EptMisconfig { gpa })) => r.gpa == Some(Hex(gpa.raw())),
        ("entry_fail_guest_state", Ended::EntryFail) => r.qualification == Some(Hex(2)),
        _ => false,
    };
    if !matches {
        let got = match (ended, value_read) {
            (Ended::Done { .. }, Some(v)) => format!("{}, value {v:#x}", describe(&ended)),
            _ => describe(&ended),
        };
        return Err(fail(expected, got));
    }
    for (i, e) in c.after.iter().enumerate() {
        let size = c
            .memory
            .get(i)
            .filter(|m| m.hpa == e.hpa)
            .map_or(8, |m| usize::from(m.size));
        let got = read(e.hpa.0, size);
        let dont_care = e.dont_care.map_or(0, |h| h.0);
        if (got ^ e.value.0) & !dont_care != 0 {
            return Err(fail(
                format!("entry {:#x} = {:#x} (don't care {dont_care:#x})", e.hpa.0, e.value.0),
                format!("{got:#x}"),
            ));
        }
    }
    for p in c.probe_after.iter().flatten() {
        let got = read(p.hpa.0, usize::from(p.size));
        if got != p.value.0 {
            return Err(fail(
                format!("target {:#x} = {:#x} after the access", p.hpa.0, p.value.0),
                format!("{got:#x}"),
            ));
        }
    }
    Ok(())
}

fn describe(e: &Ended) -> String {
    match e {
        Ended::Done { gpa, hpa } => format!("done at gpa {gpa:#x}, pa {hpa:#x}"),
        Ended::Exception { vector: 14, error_code } => format!("#PF error code {error_code:#x}"),
        Ended::Exception { vector, error_code } => format!("exception {vector} error code {error_code:#x}"),
        Ended::Nested(NestedFault::Npf { exitinfo1, exitinfo2 }) => {
            format!("#NPF exitinfo1 {exitinfo1:#x} exitinfo2 {exitinfo2:#x}")
        }
        Ended::Nested(NestedFault::EptViolation { gpa, qual, gla }) => format!(
            "ept_violation (qualification {:#x}, gpa {:#x}, gla {})",
            qual.bits(),
            gpa.raw(),
            gla.map_or("-".to_string(), |g| format!("{:#x}", g.raw()))
        ),
        Ended::Nested(NestedFault::EptMisconfig { gpa }) => format!("ept_misconfig (gpa {:#x})", gpa.raw()),
        Ended::EntryFail => "VM-entry failure (PDPTE)".to_string(),
    }
}

/// Replays the NPT cases on the nested MMU (`--mmu nested`): L1's memory
/// is the case's host memory, given to a VM as one memslot covering every
/// L1-physical address (what the case calls host-physical); the L2 guest's
/// vCPU runs on the nested MMU, which shadows the case's NPT12, and its
/// access goes through the hardware model's two-dimensional walk over
/// NPT02. A #NPF the nested MMU reflects to L1 is compared with the case's;
/// an access that completes must reach the case's `pa` (a marker placed
/// there is what a read returns, a write's value is what lands there).
/// The EPT cases run the same way on an Intel nested MMU shadowing the
/// case's EPT12 with EPT02; VM entry's checks of the VMCS PDPTEs are made
/// here, as L0 makes them for a nested VM entry.
#[derive(Debug, Default)]
pub struct NestedReplayer;

impl super::Replayer for NestedReplayer {
    fn name(&self) -> &'static str {
        "nested"
    }

    fn replay(&mut self, case: &super::Case) -> Result<(), Failure> {
        match case {
            super::Case::Npt(c) => replay_npt_nested(c),
            super::Case::Ept(c) => replay_ept_nested(c),
            other => Err(Failure {
                id: other.id(),
                expected: "an NPT or EPT case".to_string(),
                got: "a single-level case: it has no L1 whose tables the nested MMU could shadow".to_string(),
            }),
        }
    }
}

/// The memslots that give L1 its memory, 2 MiB each.
const SLOT: u64 = 2 << 20;

/// Where L1's memory is mapped in the host.
const L1_HVA: u64 = 0x1000_0000_0000;

/// The value placed at the case's `pa` before a read or fetch that
/// completes there: the access must return it.
const MARKER: u64 = 0x5a5a_c0de_0bad_f00d;

/// L1's memory for a nested replay: the case's host memory, given to a VM
/// as 2 MiB memslots added where the case writes and wherever an access
/// finds none (the nested MMU reports the L1-physical address of an access
/// without a memslot), so that every L1-physical address is memory.
struct L1Host {
    host: std::sync::Arc<vmmu::host::HostAddressSpace>,
    slots: std::sync::Arc<vmmu::mem::MemslotTable>,
    mem: vmmu::mem::GuestMemory,
    regions: std::cell::RefCell<Vec<u64>>,
}

impl L1Host {
    fn new() -> Result<L1Host, String> {
        use std::sync::Arc;
        let arena = Arc::new(vmmu::host::FrameArena::with_reserve(256 << 20).map_err(|e| e.to_string())?);
        let host = Arc::new(vmmu::host::HostAddressSpace::new(arena).map_err(|e| e.to_string())?);
        let slots = Arc::new(vmmu::mem::MemslotTable::new(Default::default()));
        Ok(L1Host {
            mem: vmmu::mem::GuestMemory::new(host.clone(), slots.clone()),
            host,
            slots,
            regions: std::cell::RefCell::new(Vec::new()),
        })
    }

    /// A memslot covering `l1_gpa`.
    fn ensure_slot(&self, l1_gpa: u64) -> Result<(), String> {
        let base = l1_gpa & !(SLOT - 1);
        let mut regions = self.regions.borrow_mut();
        if regions.contains(&base) {
            return Ok(());
        }
        let hva = vmmu::addr::Hva::new(L1_HVA + SLOT * regions.len() as u64);
        self.host
            .mmap(hva, SLOT, vmmu::host::VmaFlags::WRITE)
            .map_err(|e| e.to_string())?;
        self.slots
            .create(vmmu::mem::MemoryRegion {
                as_id: 0,
                id: regions.len() as u16,
                flags: vmmu::mem::MemslotFlags::empty(),
                guest_phys_addr: Gpa::new(base),
                memory_size: SLOT,
                userspace_addr: hva,
            })
            .map_err(|e| e.to_string())?;
        regions.push(base);
        Ok(())
    }

    /// Writes `size` bytes of `value` at `l1_gpa`.
    fn write(&self, l1_gpa: u64, size: usize, value: u64) -> Result<(), String> {
        self.ensure_slot(l1_gpa)?;
        self.mem
            .write_value(Gpa::new(l1_gpa), size, value)
            .map_err(|e| e.to_string())
    }

    /// Reads `size` bytes at `l1_gpa`: zero where no memslot was needed
    /// (the case's memory is zeroed pages).
    fn read(&self, l1_gpa: u64, size: usize) -> u64 {
        self.mem.read_value(Gpa::new(l1_gpa), size).unwrap_or(0)
    }

    /// A nested MMU over this memory in format `fmt`.
    fn nested_mmu(&self, fmt: vmmu::mmu::spte::SpteFormat) -> std::sync::Arc<vmmu::mmu::shadow::ShadowMmu> {
        vmmu::mmu::shadow::ShadowMmu::with_format(self.host.clone(), self.slots.clone(), fmt)
    }
}

fn replay_npt_nested(c: &NptCase) -> Result<(), Failure> {
    use vmmu::cpu::vcpu::{AccessResult, GuestFault, L1Npt, Vcpu};

    let id = c.id;
    let fail = |expected: String, got: String| Failure { id, expected, got };
    let setup = |e: &dyn std::fmt::Display| fail("the replay to run".to_string(), e.to_string());
    let l1 = L1Host::new().map_err(|e| setup(&e))?;
    for e in &c.memory {
        let size = if e.table == "l2" { c.mode.entry_size() } else { 8 };
        l1.write(e.hpa.0, size, e.value.0).map_err(|e| setup(&e))?;
    }
    let mmu = l1.nested_mmu(vmmu::mmu::spte::SpteFormat::Legacy);
    let (slots, mem) = (&l1.slots, &l1.mem);
    let size = c.mode.access_size();
    let done = c.result.exit == "none";
    // The marker goes where the access should land, unless that is one of
    // the case's entries (a read of a live paging entry): then the read
    // must return that entry as it is afterwards.
    let pa = c.result.pa.map_or(0, |h| h.0);
    let pa_is_entry = c.memory.iter().any(|e| e.hpa.0 & !7 == pa & !7);
    let marked = done && c.access != CaseAccess::Write && !pa_is_entry;
    if marked {
        l1.write(pa, size, MARKER).map_err(|e| setup(&e))?;
    }
    let features = CpuFeatures::default().with_maxphyaddr(c.maxphyaddr);
    let npt = L1Npt {
        ncr3: c.npt.ncr3.0,
        levels: c.npt.levels,
        nxe: c.npt.host_nxe,
    };
    let mut vcpu = Vcpu::new_nested(mmu, slots.clone(), features, 1, npt);
    vcpu.set_state(super::case_regs(&c.control()), c.cr3.0, c.pkru.0 as u32)
        .map_err(|e| setup(&e))?;
    let value = if c.access == CaseAccess::Write { MARKER } else { 0 };
    let mut got;
    let mut tries = 0;
    loop {
        got = vcpu
            .access(
                Gva::new(c.va.0),
                case_access(c.access, c.cpl, c.rflags_ac),
                size,
                value & (u64::MAX >> (64 - 8 * size)),
            )
            .map_err(|e| setup(&e))?;
        match got {
            // Memory there too: a slot, and the access again.
            AccessResult::Done { gpa, mmio: true, .. } if tries < 16 => {
                l1.ensure_slot(gpa.raw()).map_err(|e| setup(&e))?;
                tries += 1;
            }
            _ => break,
        }
    }
    let r = &c.result;
    let marker = MARKER & (u64::MAX >> (64 - 8 * size));
    let ok = match (r.exit.as_str(), got) {
        (
            "none",
            AccessResult::Done {
                gpa,
                value,
                mmio: false,
            },
        ) => {
            let there = mem.read_value(Gpa::new(pa), size).unwrap_or(0);
            let landed = match c.access {
                // The write's value is at `pa`.
                CaseAccess::Write => there == marker,
                // The read (or the fetch) returned what is at `pa`: the
                // marker, or the live entry it read.
                CaseAccess::Read | CaseAccess::Fetch => value == there && (!marked || there == marker),
            };
            r.gpa == Some(Hex(gpa.raw())) && landed
        }
        // The #PF is intercepted by L1: EXITINFO1 is the error code,
        // EXITINFO2 the linear address.
        ("pf", AccessResult::Fault(GuestFault::PageFault { error_code, gva })) => {
            r.error_code == Some(error_code.bits())
                && r.exitinfo1 == Some(Hex(u64::from(error_code.bits())))
                && r.exitinfo2 == Some(Hex(gva.raw()))
        }
        ("npf", AccessResult::VmExit(NestedFault::Npf { exitinfo1, exitinfo2 })) => {
            r.exitinfo1 == Some(Hex(exitinfo1)) && r.exitinfo2 == Some(Hex(exitinfo2))
        }
        _ => false,
    };
    if !ok {
        let expected = c.expected();
        return Err(fail(expected, format!("{got:?}")));
    }
    for (i, e) in c.after.iter().enumerate() {
        let esize = c
            .memory
            .get(i)
            .filter(|m| m.hpa == e.hpa && m.table == "l2")
            .map_or(8, |_| c.mode.entry_size());
        let now = mem.read_value(Gpa::new(e.hpa.0), esize).unwrap_or(u64::MAX);
        if now & e.mask.0 != e.value.0 {
            return Err(fail(
                format!("entry {:#x} = {:#x} under mask {:#x}", e.hpa.0, e.value.0, e.mask.0),
                format!("{:#x}", now & e.mask.0),
            ));
        }
    }
    Ok(())
}

fn replay_ept_nested(c: &EptCase) -> Result<(), Failure> {
    use vmmu::arch::ept::Eptp;
    use vmmu::cpu::vcpu::{AccessResult, GuestFault, Vcpu, VcpuError};

    let id = c.id;
    let fail = |expected: String, got: String| Failure { id, expected, got };
    let setup = |e: &dyn std::fmt::Display| fail("the replay to run".to_string(), e.to_string());
    let l1 = L1Host::new().map_err(|e| setup(&e))?;
    for e in &c.memory {
        l1.write(e.hpa.0, usize::from(e.size), e.value.0)
            .map_err(|e| setup(&e))?;
    }
    let features = CpuFeatures::default().with_maxphyaddr(c.maxphyaddr);
    let mmu = l1.nested_mmu(vmmu::mmu::spte::SpteFormat::Ept { ad: true });
    let mut vcpu = Vcpu::new_nested(mmu, l1.slots.clone(), features, 1, Eptp(c.eptp.0));
    let regs = ControlRegs {
        cr0: Cr0::from_bits_truncate(c.guest.cr0.0),
        cr4: Cr4::from_bits_truncate(c.guest.cr4.0),
        efer: Efer::from_bits_truncate(c.guest.efer.0),
    };
    let va = Gva::new(c.va.0);
    let size = usize::from(c.access_size);
    let access = case_access(c.access, c.cpl, c.guest.rflags_ac);
    let ended = (|| -> Result<(Ended, Option<u64>), Failure> {
        let mut pdptes = [0u64; 4];
        let pae = regs.mode() == PagingMode::Pae;
        let rsvd = vmmu::arch::rsvd::RsvdBits::guest(PagingMode::Pae, &features, true, false);
        let reserved = |p: &[u64; 4]| p.iter().any(|&p| p & 1 != 0 && rsvd.is_reserved(p, 3, false));
        if pae {
            for (slot, v) in pdptes.iter_mut().zip(c.guest.pdptes.iter().flatten()) {
                *slot = v.0;
            }
            if reserved(&pdptes) {
                return Ok((Ended::EntryFail, None));
            }
        }
        vcpu.vm_entry(regs, c.guest.cr3.0, pdptes, 0);
        if pae && c.guest.pdpte_reload {
            // MOV to CR3: the PDPTEs from memory, through EPT.
            match vcpu.mov_cr3(c.guest.cr3.0) {
                Ok(()) => {}
                Err(VcpuError::ExitToL1(f)) => return Ok((Ended::Nested(f), None)),
                Err(e) => return Err(setup(&e)),
            }
            if reserved(&vcpu.pdptes()) {
                return Ok((
                    Ended::Exception {
                        vector: 13,
                        error_code: 0,
                    },
                    None,
                ));
            }
        }
        // A fetch runs the 8-byte stub; a write stores the case's value.
        let (asize, value) = match c.access {
            CaseAccess::Fetch => (8, 0),
            CaseAccess::Write => (size, c.write_value.map_or(0, |v| v.0) & (u64::MAX >> (64 - 8 * size))),
            CaseAccess::Read => (size, 0),
        };
        let mut tries = 0;
        loop {
            let got = vcpu.access(va, access, asize, value).map_err(|e| setup(&e))?;
            return Ok(match got {
                AccessResult::Done { gpa, mmio: true, .. } if tries < 16 => {
                    l1.ensure_slot(gpa.raw()).map_err(|e| setup(&e))?;
                    tries += 1;
                    continue;
                }
                AccessResult::Done {
                    gpa,
                    value,
                    mmio: false,
                } => {
                    let read = match c.access {
                        // `mov $imm32,%ebx; vmcall`: the immediate follows the opcode.
                        CaseAccess::Fetch => Some((value >> 8) & 0xffff_ffff),
                        CaseAccess::Read => Some(value),
                        CaseAccess::Write => None,
                    };
                    (Ended::Done { gpa: gpa.raw(), hpa: 0 }, read)
                }
                AccessResult::Fault(GuestFault::PageFault { error_code, .. }) => (
                    Ended::Exception {
                        vector: 14,
                        error_code: error_code.bits(),
                    },
                    None,
                ),
                AccessResult::Fault(GuestFault::GeneralProtection) => (
                    Ended::Exception {
                        vector: 13,
                        error_code: 0,
                    },
                    None,
                ),
                AccessResult::VmExit(f) => (Ended::Nested(f), None),
                other => return Err(fail("an outcome the case records".to_string(), format!("{other:?}"))),
            });
        }
    })()?;
    check_ept(c, ended.0, ended.1, |hpa, size| l1.read(hpa, size))
}
