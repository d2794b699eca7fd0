//! The conformance case formats (single-access and multi-step), parsed and
//! validated. Unknown keys are ignored, as the format requires.

use serde::{Deserialize, Deserializer, Serialize};

use vmmu::arch::control::PagingMode;
use vmmu::arch::perm::AccessKind;

/// A number written as a `"0x…"` hex string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Hex(pub u64);

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Hex, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let digits = s
            .strip_prefix("0x")
            .ok_or_else(|| serde::de::Error::custom(format!("expected a \"0x…\" hex string, found {s:?}")))?;
        u64::from_str_radix(digits, 16)
            .map(Hex)
            .map_err(|e| serde::de::Error::custom(format!("bad hex number {s:?}: {e}")))
    }
}

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

/// The paging mode of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseMode {
    /// 4-level paging.
    Lm4,
    /// 5-level paging.
    Lm5,
    /// PAE paging.
    Pae,
    /// 32-bit paging.
    Ia32,
}

impl CaseMode {
    /// The architectural paging mode.
    pub fn paging_mode(self) -> PagingMode {
        match self {
            CaseMode::Lm4 => PagingMode::Level4,
            CaseMode::Lm5 => PagingMode::Level5,
            CaseMode::Pae => PagingMode::Pae,
            CaseMode::Ia32 => PagingMode::Bits32,
        }
    }

    /// Width of paging entries and of every test access, in bytes.
    pub fn access_size(self) -> usize {
        match self {
            CaseMode::Lm4 | CaseMode::Lm5 => 8,
            CaseMode::Pae | CaseMode::Ia32 => 4,
        }
    }

    /// Width of one paging entry in bytes.
    pub fn entry_size(self) -> usize {
        match self {
            CaseMode::Ia32 => 4,
            _ => 8,
        }
    }
}

/// The kind of a test access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseAccess {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

impl From<CaseAccess> for AccessKind {
    fn from(a: CaseAccess) -> AccessKind {
        match a {
            CaseAccess::Read => AccessKind::Read,
            CaseAccess::Write => AccessKind::Write,
            CaseAccess::Fetch => AccessKind::Fetch,
        }
    }
}

/// One memory entry of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct MemEntry {
    /// Its physical address.
    pub pa: Hex,
    /// Its value.
    pub value: Hex,
    /// Part of the harness's identity map (step cases).
    #[serde(default)]
    pub harness: bool,
}

/// An entry to compare at the end of a step case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct FinalEntry {
    /// Its physical address.
    pub pa: Hex,
    /// The expected value, already masked.
    pub value: Hex,
    /// The bits that must match.
    pub mask: Hex,
}

/// What an access does, as recorded or as observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Outcome {
    /// Whether it faulted.
    pub fault: bool,
    /// The exception vector of a fault (14 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector: Option<u8>,
    /// The error code of a fault.
    pub error_code: Option<u32>,
    /// The physical address reached on success.
    pub pa: Option<Hex>,
}

impl Outcome {
    /// The vector, defaulting to #PF for a fault.
    pub fn effective_vector(&self) -> Option<u8> {
        if self.fault {
            Some(self.vector.unwrap_or(14))
        } else {
            None
        }
    }

    /// Whether two outcomes are the same result.
    pub fn matches(&self, other: &Outcome) -> bool {
        self.fault == other.fault
            && self.effective_vector() == other.effective_vector()
            && self.error_code == other.error_code
            && self.pa == other.pa
    }
}

/// Control state common to both case kinds.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct CaseControl {
    /// Paging mode.
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
    /// CR4.PGE (TLB cases).
    #[serde(default)]
    pub cr4_pge: bool,
    /// CR4.PCIDE (TLB cases).
    #[serde(default)]
    pub cr4_pcide: bool,
    /// PKRU.
    pub pkru: Hex,
    /// MAXPHYADDR.
    pub maxphyaddr: u8,
    /// CR3.
    pub cr3: Hex,
}

/// A single-access case (`public-<mode>.jsonl`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct SingleCase {
    /// Case id.
    pub id: u64,
    /// Control state.
    #[serde(flatten)]
    pub control: CaseControl,
    /// CPL of the access.
    pub cpl: u8,
    /// RFLAGS.AC.
    pub rflags_ac: bool,
    /// The access.
    pub access: CaseAccess,
    /// Its linear address.
    pub va: Hex,
    /// Initial paging entries.
    pub memory: Vec<MemEntry>,
    /// The recorded result.
    pub result: Outcome,
    /// The entries after the access.
    pub after: Vec<MemEntry>,
}

/// One step of a multi-step case.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    /// An access at `va`.
    Access {
        /// CPL.
        cpl: u8,
        /// RFLAGS.AC.
        rflags_ac: bool,
        /// Read, write or fetch.
        access: CaseAccess,
        /// Linear address.
        va: Hex,
        /// Value stored by a write.
        #[serde(default)]
        value: Option<Hex>,
        /// The recorded result.
        expect: Outcome,
    },
    /// A kernel store of `size` bytes at `va` (identity-mapped).
    Store {
        /// Linear (= physical) address.
        va: Hex,
        /// Value.
        value: Hex,
        /// 4 or 8.
        size: u8,
    },
    /// INVLPG `va`.
    Invlpg {
        /// Linear address.
        va: Hex,
    },
    /// MOV to CR3.
    MovCr3 {
        /// The operand.
        value: Hex,
    },
    /// Change CR0.WP only.
    SetCr0Wp {
        /// New CR0.WP.
        value: bool,
    },
    /// Change CR4.SMEP/SMAP/PGE (a missing key leaves the bit unchanged).
    SetCr4 {
        /// New CR4.SMEP.
        #[serde(default)]
        smep: Option<bool>,
        /// New CR4.SMAP.
        #[serde(default)]
        smap: Option<bool>,
        /// New CR4.PGE.
        #[serde(default)]
        pge: Option<bool>,
    },
    /// INVPCID.
    Invpcid {
        /// Type 0..=3.
        #[serde(rename = "type")]
        kind: u8,
        /// PCID of the descriptor.
        pcid: u16,
        /// Linear address of the descriptor.
        va: Hex,
    },
}

/// A multi-step case (`public-steps-*.jsonl`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct StepCase {
    /// Case id.
    pub id: u64,
    /// Initial control state.
    #[serde(flatten)]
    pub control: CaseControl,
    /// Initial paging entries.
    pub memory: Vec<MemEntry>,
    /// The steps.
    pub steps: Vec<Step>,
    /// Entries to compare at the end.
    #[serde(rename = "final")]
    pub final_entries: Vec<FinalEntry>,
}

/// A case of either kind.
#[derive(Clone, Debug)]
pub enum Case {
    /// A single-access case.
    Single(SingleCase),
    /// A multi-step case.
    Steps(StepCase),
    /// An AMD nested-paging case.
    Npt(Box<super::nested::NptCase>),
    /// An Intel EPT case.
    Ept(Box<super::nested::EptCase>),
}

impl Case {
    /// The case id.
    pub fn id(&self) -> u64 {
        match self {
            Case::Single(c) => c.id,
            Case::Steps(c) => c.id,
            Case::Npt(c) => c.id,
            Case::Ept(c) => c.id,
        }
    }

    /// Whether this is a nested-paging case (NPT or EPT), replayed by the
    /// two-dimensional walk.
    pub fn is_nested(&self) -> bool {
        matches!(self, Case::Npt(_) | Case::Ept(_))
    }

    /// Parses one line, telling the kinds apart by the presence of `steps`,
    /// and validates the values the format constrains.
    pub fn parse(line: &str) -> Result<Case, String> {
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
        let obj = value.as_object().ok_or("a case must be a JSON object")?;
        // Name the offending field: "steps[3].va: bad hex number ...".
        fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value, what: &str) -> Result<T, String> {
            // The control fields are flattened into the case, which hides
            // their names from the path: check them on their own first.
            serde_path_to_error::deserialize::<_, CaseControl>(&value)
                .map_err(|e| format!("bad {what}: {}: {}", e.path(), e.inner()))?;
            serde_path_to_error::deserialize(value).map_err(|e| {
                let path = e.path().to_string();
                if path == "." {
                    format!("bad {what}: {}", e.inner())
                } else {
                    format!("bad {what}: {path}: {}", e.inner())
                }
            })
        }
        fn nested<T: serde::de::DeserializeOwned>(value: serde_json::Value, what: &str) -> Result<T, String> {
            serde_path_to_error::deserialize(value).map_err(|e| format!("bad {what}: {}: {}", e.path(), e.inner()))
        }
        if obj.contains_key("npt") {
            let c: super::nested::NptCase = nested(value, "NPT case")?;
            c.validate()?;
            return Ok(Case::Npt(Box::new(c)));
        }
        if obj.contains_key("eptp") {
            let c: super::nested::EptCase = nested(value, "EPT case")?;
            c.validate()?;
            return Ok(Case::Ept(Box::new(c)));
        }
        let case = if obj.contains_key("steps") {
            Case::Steps(typed(value, "step case")?)
        } else {
            Case::Single(typed(value, "case")?)
        };
        case.validate()?;
        Ok(case)
    }

    fn validate(&self) -> Result<(), String> {
        let control = match self {
            Case::Single(c) => &c.control,
            Case::Steps(c) => &c.control,
            Case::Npt(c) => return c.validate(),
            Case::Ept(c) => return c.validate(),
        };
        if !(32..=52).contains(&control.maxphyaddr) {
            return Err(format!("maxphyaddr {} is outside 32..=52", control.maxphyaddr));
        }
        if control.pkru.0 > u32::MAX as u64 {
            return Err(format!("pkru {:#x} does not fit in 32 bits", control.pkru.0));
        }
        let entry = control.mode.entry_size();
        let check_entries = |entries: &mut dyn Iterator<Item = (u64, u64)>| -> Result<(), String> {
            for (pa, value) in entries {
                if pa % entry as u64 != 0 {
                    return Err(format!("memory entry at {pa:#x} is not {entry}-byte aligned"));
                }
                if entry == 4 && value > u32::MAX as u64 {
                    return Err(format!("4-byte entry at {pa:#x} has value {value:#x}"));
                }
            }
            Ok(())
        };
        let check_cpl = |cpl: u8| {
            if cpl > 3 {
                Err(format!("cpl {cpl} is outside 0..=3"))
            } else {
                Ok(())
            }
        };
        match self {
            Case::Single(c) => {
                check_cpl(c.cpl)?;
                check_entries(&mut c.memory.iter().chain(&c.after).map(|e| (e.pa.0, e.value.0)))?;
            }
            Case::Steps(c) => {
                check_entries(&mut c.memory.iter().map(|e| (e.pa.0, e.value.0)))?;
                for (i, step) in c.steps.iter().enumerate() {
                    match step {
                        Step::Access { cpl, .. } => check_cpl(*cpl).map_err(|e| format!("step {i}: {e}"))?,
                        Step::Store { size, .. } if *size != 4 && *size != 8 => {
                            return Err(format!("step {i}: store size {size} is not 4 or 8"));
                        }
                        Step::Invpcid { kind, .. } if *kind > 3 => {
                            return Err(format!("step {i}: INVPCID type {kind} is outside 0..=3"));
                        }
                        _ => {}
                    }
                }
            }
            Case::Npt(_) | Case::Ept(_) => unreachable!("validated by their own rules above"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_steps() {
        let single = r#"{"id": 3, "mode": "lm4", "cr0_wp": true, "cr4_pse": true, "cr4_smep": false, "cr4_smap": false, "cr4_pke": false, "efer_nxe": true, "pkru": "0x0", "cpl": 0, "rflags_ac": false, "access": "read", "maxphyaddr": 40, "cr3": "0x1000", "va": "0x0", "memory": [], "result": {"fault": true, "error_code": 0, "pa": null}, "after": [], "extra": 1}"#;
        assert!(matches!(Case::parse(single), Ok(Case::Single(c)) if c.id == 3));
        let steps = r#"{"id": 4, "mode": "pae", "maxphyaddr": 40, "cr0_wp": true, "cr4_pse": true, "cr4_smep": false, "cr4_smap": false, "cr4_pke": false, "efer_nxe": true, "pkru": "0x0", "cr3": "0x1000", "memory": [], "steps": [{"op": "invlpg", "va": "0x0"}, {"op": "set_cr4", "smep": true, "smap": false}], "final": []}"#;
        assert!(matches!(Case::parse(steps), Ok(Case::Steps(c)) if c.steps.len() == 2));
    }

    #[test]
    fn rejects_bad_values_with_a_reason() {
        let bad_hex = r#"{"id": 3, "mode": "lm4", "cr0_wp": true, "cr4_pse": true, "cr4_smep": false, "cr4_smap": false, "cr4_pke": false, "efer_nxe": true, "pkru": "0x0", "cpl": 0, "rflags_ac": false, "access": "read", "maxphyaddr": 40, "cr3": "1000", "va": "0x0", "memory": [], "result": {"fault": true, "error_code": 0, "pa": null}, "after": []}"#;
        assert!(Case::parse(bad_hex).unwrap_err().contains("hex"));
        let bad_mode = bad_hex.replace("\"lm4\"", "\"lm3\"").replace("\"1000\"", "\"0x1000\"");
        assert!(Case::parse(&bad_mode).unwrap_err().contains("lm3"));
        let bad_cpl = bad_hex
            .replace("\"cpl\": 0", "\"cpl\": 7")
            .replace("\"1000\"", "\"0x1000\"");
        assert!(Case::parse(&bad_cpl).unwrap_err().contains("cpl 7"));
        let missing = r#"{"id": 3, "mode": "lm4"}"#;
        assert!(Case::parse(missing).unwrap_err().contains("missing field"));
        assert!(Case::parse("[1,2]").unwrap_err().contains("object"));
        assert!(Case::parse("{\"id\": ").unwrap_err().contains("invalid JSON"));
    }
}
