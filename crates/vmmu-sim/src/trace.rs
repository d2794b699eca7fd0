//! Traces: the operations of a run, in the order they were taken, so that
//! `vmmu replay` can run them again, deterministically, under either MMU.
//!
//! An operation is its kind, who did it (a vCPU, the host or the VMM) and
//! a seed: every choice the operation makes (which mapping, which pages,
//! which addresses, read or write) comes from a generator seeded with it
//! and from the state the earlier operations left. A replay runs the
//! operations one after another on one thread, so it is deterministic:
//! the same trace gives the same accesses, the same faults and the same
//! report every time. A multi-vCPU run is recorded in the order its
//! operations started; its replay is that interleaving made sequential.
//! An operation whose target no longer exists in the replay (a process
//! that exited) is skipped, the same way every time.
//!
//! The format is text:
//!
//! ```text
//! # vmmu trace v1
//! paging = "4-level"
//! vcpus = 4
//! memory = 134217728
//! seed = 1
//! host_churn = true
//! migrate = false
//!
//! [workload]
//! name = "default"
//! ...                  (the workload, as in a workload file)
//! --- ops
//! 0 v0 touch 1234567   (sequence number, actor, kind, seed)
//! 1 host migrate 987
//! 2 vmm zap-all 0
//! ```

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::workload::Workload;

/// The first line of a trace.
pub const MAGIC: &str = "# vmmu trace v1";
/// The line between the header and the operations.
const OPS: &str = "--- ops";

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// User accesses to one mapping.
    Touch,
    /// `mmap`.
    Mmap,
    /// `munmap`.
    Munmap,
    /// `mprotect`.
    Mprotect,
    /// `fork`.
    Fork,
    /// A thread exits.
    Exit,
    /// A context switch.
    Switch,
    /// Pages moved to fresh frames.
    Remap,
    /// A fresh process.
    Spawn,
    /// A self-mapping table (adversarial).
    SelfMap,
    /// A recursive map of the top table (adversarial).
    RecursiveMap,
    /// Control bits flipped (adversarial).
    CrToggle,
    /// Host: collapse a THP.
    Collapse,
    /// Host: split a THP.
    Split,
    /// Host: migrate a page.
    Migrate,
    /// Host: swap a page out.
    SwapOut,
    /// Host: swap a page in.
    SwapIn,
    /// Host: KSM-merge two pages.
    Ksm,
    /// Host: make a page read-only for a moment (mprotect and back).
    HostMprotect,
    /// Host: age a range without a flush (`clear_young`, page reclaim).
    Age,
    /// L1 (`--nested`): switch a vCPU to another L2 VM.
    L2Switch,
    /// L1 (`--nested`): take back a range of an L2 VM's memory.
    L1Unmap,
    /// VMM: zap every SPTE.
    ZapAll,
}

impl OpKind {
    /// Every kind, with its name in traces.
    pub const ALL: [(OpKind, &'static str); 23] = [
        (OpKind::Touch, "touch"),
        (OpKind::Mmap, "mmap"),
        (OpKind::Munmap, "munmap"),
        (OpKind::Mprotect, "mprotect"),
        (OpKind::Fork, "fork"),
        (OpKind::Exit, "exit"),
        (OpKind::Switch, "switch"),
        (OpKind::Remap, "remap"),
        (OpKind::Spawn, "spawn"),
        (OpKind::SelfMap, "self-map"),
        (OpKind::RecursiveMap, "recursive-map"),
        (OpKind::CrToggle, "cr-toggle"),
        (OpKind::Collapse, "collapse"),
        (OpKind::Split, "split"),
        (OpKind::Migrate, "migrate"),
        (OpKind::SwapOut, "swap-out"),
        (OpKind::SwapIn, "swap-in"),
        (OpKind::Ksm, "ksm"),
        (OpKind::HostMprotect, "host-mprotect"),
        (OpKind::Age, "age"),
        (OpKind::ZapAll, "zap-all"),
        (OpKind::L2Switch, "l2-switch"),
        (OpKind::L1Unmap, "l1-unmap"),
    ];

    /// Its name in traces.
    pub fn name(self) -> &'static str {
        OpKind::ALL
            .iter()
            .find(|(k, _)| *k == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    fn parse(s: &str) -> Option<OpKind> {
        OpKind::ALL.iter().find(|(_, n)| *n == s).map(|(k, _)| *k)
    }

    /// Whether a vCPU does it (the rest are the host's or the VMM's).
    pub fn is_guest(self) -> bool {
        matches!(
            self,
            OpKind::Touch
                | OpKind::Mmap
                | OpKind::Munmap
                | OpKind::Mprotect
                | OpKind::Fork
                | OpKind::Exit
                | OpKind::Switch
                | OpKind::Remap
                | OpKind::Spawn
                | OpKind::SelfMap
                | OpKind::RecursiveMap
                | OpKind::CrToggle
        )
    }
}

/// Who did an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Actor {
    /// vCPU n.
    Vcpu(u32),
    /// The host churn thread.
    Host,
    /// The VMM thread.
    Vmm,
}

/// One operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// Its place in the run.
    pub seq: u64,
    /// Who.
    pub actor: Actor,
    /// What.
    pub kind: OpKind,
    /// The seed of its choices.
    pub seed: u64,
}

/// What a run was, to boot the same machine again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceHeader {
    /// The guest paging mode.
    pub paging: String,
    /// vCPUs.
    pub vcpus: usize,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The run's seed.
    pub seed: u64,
    /// Whether host churn ran.
    pub host_churn: bool,
    /// Whether live migration ran (not replayed: the VMM's copy rounds
    /// are not guest operations).
    pub migrate: bool,
    /// The workload.
    pub workload: Workload,
    /// The seed threads' policies that were not the default, as
    /// `name=value` (`vmmu run --policy`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}

/// A trace: the header and the operations in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// The run.
    pub header: TraceHeader,
    /// The operations, by sequence number.
    pub ops: Vec<Op>,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct TraceError {
    /// The file.
    pub file: String,
    /// The 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl Trace {
    /// The trace as text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let header = toml::to_string(&self.header).expect("a header always serializes to TOML");
        let _ = writeln!(s, "{MAGIC}\n{header}{OPS}");
        for op in &self.ops {
            let actor = match op.actor {
                Actor::Vcpu(n) => format!("v{n}"),
                Actor::Host => "host".into(),
                Actor::Vmm => "vmm".into(),
            };
            let _ = writeln!(s, "{} {actor} {} {}", op.seq, op.kind.name(), op.seed);
        }
        s
    }

    /// Parses `text` (from `file`, for messages).
    pub fn parse(text: &str, file: &str) -> Result<Trace, TraceError> {
        let err = |line: usize, message: String| TraceError {
            file: file.to_string(),
            line,
            message,
        };
        let mut lines = text.lines();
        if lines.next().map(str::trim_end) != Some(MAGIC) {
            return Err(err(1, format!("not a vmmu trace: the first line must be `{MAGIC}`")));
        }
        // A multi-line string of the header (a workload name with a line
        // break: `to_text` writes it as `"""…"""`) may hold a line that
        // starts like the separator. The separator is the first such line
        // before which the header parses: a cut inside a string leaves it
        // unterminated, a cut after the separator leaves operations in it.
        let separator = format!("\n{OPS}");
        let mut splits = text.match_indices(&separator).map(|(i, _)| i);
        let Some(first) = splits.next() else {
            return Err(err(
                text.lines().count().max(1),
                format!("no `{OPS}` line: the trace is truncated or not a trace"),
            ));
        };
        let header_before = |split: usize| toml::from_str::<TraceHeader>(&text[MAGIC.len()..split]);
        let (split, header) = match header_before(first) {
            Ok(header) => (first, header),
            Err(e) => match splits.find_map(|s| header_before(s).ok().map(|h| (s, h))) {
                Some(found) => found,
                None => {
                    let head = &text[MAGIC.len()..first];
                    let at = e.span().map_or(0, |s| s.start);
                    return Err(err(
                        1 + head[..at].matches('\n').count(),
                        e.message().trim_end().to_string(),
                    ));
                }
            },
        };
        let header_lines = text[..split].matches('\n').count() + 2;
        if header.vcpus == 0 || header.vcpus > 64 {
            return Err(err(1, format!("vcpus must be 1..=64, not {}", header.vcpus)));
        }
        if let Err((key, message)) = header.workload.validate() {
            return Err(err(1, format!("workload: {key}: {message}")));
        }
        let mut ops = Vec::new();
        for (i, line) in text[split + OPS.len() + 1..].lines().enumerate().skip(1) {
            let n = header_lines + i;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let [seq, actor, kind, seed] = f[..] else {
                return Err(err(n, format!("an operation is `SEQ ACTOR KIND SEED`, not `{line}`")));
            };
            let num = |s: &str, what: &str| {
                s.parse::<u64>()
                    .map_err(|_| err(n, format!("{what} must be an unsigned integer, not `{s}`")))
            };
            let actor = match actor {
                "host" => Actor::Host,
                "vmm" => Actor::Vmm,
                a => match a.strip_prefix('v').and_then(|v| v.parse::<u32>().ok()) {
                    Some(v) if (v as usize) < header.vcpus => Actor::Vcpu(v),
                    _ => {
                        return Err(err(
                            n,
                            format!("actor must be host, vmm or v0..v{}, not `{a}`", header.vcpus - 1),
                        ));
                    }
                },
            };
            let kind = OpKind::parse(kind).ok_or_else(|| {
                err(
                    n,
                    format!(
                        "unknown operation `{kind}` (one of {})",
                        OpKind::ALL.map(|(_, n)| n).join(", ")
                    ),
                )
            })?;
            if kind.is_guest() != matches!(actor, Actor::Vcpu(_)) {
                return Err(err(n, format!("`{}` is not an operation of this actor", kind.name())));
            }
            ops.push(Op {
                seq: num(seq, "the sequence number")?,
                actor,
                kind,
                seed: num(seed, "the seed")?,
            });
        }
        Ok(Trace { header, ops })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Trace {
        Trace {
            header: TraceHeader {
                paging: "pae".into(),
                vcpus: 2,
                memory: 64 << 20,
                seed: 7,
                host_churn: true,
                migrate: false,
                workload: Workload::default(),
                policies: vec!["zap-request=reload-all".into()],
            },
            ops: vec![
                Op {
                    seq: 0,
                    actor: Actor::Vcpu(1),
                    kind: OpKind::Touch,
                    seed: 42,
                },
                Op {
                    seq: 1,
                    actor: Actor::Host,
                    kind: OpKind::SwapOut,
                    seed: 9,
                },
                Op {
                    seq: 2,
                    actor: Actor::Vmm,
                    kind: OpKind::ZapAll,
                    seed: 0,
                },
            ],
        }
    }

    #[test]
    fn a_trace_reads_back_as_written() {
        let t = sample();
        assert_eq!(Trace::parse(&t.to_text(), "t").unwrap(), t);
    }

    /// Found with the round-trip check of the `trace` fuzz target
    /// (`vmmu_fuzz::parse::trace`): a workload name with a line break is
    /// written as a TOML multi-line string, and a line of it that starts
    /// with `--- ops` was taken for the separator.
    #[test]
    fn a_name_holding_the_separator_reads_back_as_written() {
        let mut t = sample();
        t.header.workload.name = "a\n--- ops\nb".into();
        t.header.workload.description = "\r\n--- ops".into();
        assert_eq!(Trace::parse(&t.to_text(), "t").unwrap(), t);
    }

    #[test]
    fn bad_traces_name_the_line_and_the_problem() {
        let text = sample().to_text();
        let lines = text.lines().count();
        let e = Trace::parse("hello\n", "t").unwrap_err();
        assert_eq!((e.line, e.message.contains("not a vmmu trace")), (1, true));
        let e = Trace::parse(&text.replace("--- ops", "--- opz"), "t").unwrap_err();
        assert!(e.message.contains("truncated"), "{e}");
        let e = Trace::parse(&text.replace("vcpus = 2", "vcpus = \"two\""), "t").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = Trace::parse(&text.replace("1 host swap-out 9", "1 host swap-outt 9"), "t").unwrap_err();
        assert_eq!(e.line, lines - 1, "{e}");
        assert!(e.message.contains("swap-outt"), "{e}");
        let e = Trace::parse(&text.replace("0 v1 touch 42", "0 v2 touch 42"), "t").unwrap_err();
        assert_eq!(e.line, lines - 2, "{e}");
        let e = Trace::parse(&text.replace("0 v1 touch 42", "0 v1 touch -1"), "t").unwrap_err();
        assert!(e.message.contains("seed"), "{e}");
        let e = Trace::parse(&text.replace("0 v1 touch 42", "0 host touch 42"), "t").unwrap_err();
        assert!(e.message.contains("not an operation of this actor"), "{e}");
        let e = Trace::parse(&text.replace("0 v1 touch 42", "0 v1 touch"), "t").unwrap_err();
        assert!(e.message.contains("SEQ ACTOR KIND SEED"), "{e}");
        let e = Trace::parse(&text.replace("write_ratio = 0.5", "write_ratio = 5.0"), "t").unwrap_err();
        assert!(e.message.contains("write_ratio"), "{e}");
    }
}
