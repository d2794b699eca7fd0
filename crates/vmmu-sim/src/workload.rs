//! Workloads: what the guest processes do, named or read from a TOML
//! file. The named ones are TOML files embedded in the binary
//! (`crates/vmmu-sim/src/workloads/*.toml`); `docs/WORKLOADS.md` documents the keys.

use std::path::Path;

use serde::Deserialize;

use vmmu::vm::config::VmConfig;

/// How a touch picks the pages it accesses in a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Page after page, wrapping around.
    Sequential,
    /// Uniformly random pages.
    Uniform,
    /// Zipf-distributed pages (exponent `zipf_theta`): a few hot pages.
    Zipfian,
    /// Every `stride_pages`-th page, wrapping around.
    Strided,
}

/// Relative weights of the guest operations a vCPU picks from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mix {
    /// Access `touches` words of one mapping (user code).
    pub touch: u32,
    /// Map a new region (`mmap`).
    pub mmap: u32,
    /// Unmap part or all of a region (`munmap`).
    pub munmap: u32,
    /// Change part of a region's protection (`mprotect`).
    pub mprotect: u32,
    /// Fork the current process (copy-on-write).
    pub fork: u32,
    /// End the current process (never the last one of a vCPU).
    pub exit: u32,
    /// Switch to another process of this vCPU.
    pub switch: u32,
    /// Rewrite the page-table entries of a few pages to fresh frames
    /// (the guest migrating its own pages: page-table writes to live
    /// tables).
    pub remap: u32,
    /// Start a fresh process with one mapping and switch to it, ending
    /// this vCPU's oldest process past its share of `max_processes`
    /// (address spaces by the ten thousand).
    pub spawn: u32,
    /// Adversarial: link a table whose every entry points at itself and
    /// access through it.
    pub self_map: u32,
    /// Adversarial: point an entry of the top table at the table itself
    /// (the same table at every level) and read through it.
    pub recursive_map: u32,
    /// Adversarial: flip CR0.WP, CR4.SMEP and EFER.NXE, access, restore.
    pub cr_toggle: u32,
}

/// A workload.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Its name.
    pub name: String,
    /// One line on what it stresses.
    pub description: String,
    /// Guest operations in a run, over all vCPUs (`--ops` overrides).
    pub ops: u64,
    /// Processes each vCPU starts with.
    pub processes: u32,
    /// Threads of each boot process, on consecutive vCPUs (1: single
    /// threaded). Threads of one process share its address space, so its
    /// changes need TLB shootdowns.
    pub threads: u32,
    /// Mappings each boot process starts with.
    pub mappings: u32,
    /// Pages (4 KiB) per mapping.
    pub mapping_pages: u64,
    /// The share of mappings backed by guest huge pages, 0..=1.
    pub huge: f64,
    /// Place mappings at random addresses across the whole user window
    /// (many page-table pages) instead of packed.
    pub spread: bool,
    /// How touches pick pages.
    pub pattern: Pattern,
    /// The Zipf exponent for `zipfian`.
    pub zipf_theta: f64,
    /// The stride for `strided`, in pages.
    pub stride_pages: u64,
    /// The share of accesses that write, 0..=1.
    pub write_ratio: f64,
    /// Accesses per touch.
    pub touches: u32,
    /// The most processes at once, over all vCPUs.
    pub max_processes: u32,
    /// Run the host churn thread (THP collapse/split, migration, swap,
    /// KSM, mprotect).
    pub host_churn: bool,
    /// Run live migrations (dirty logging) during the run.
    pub migrate: bool,
    /// Operation weights.
    pub mix: Mix,
    /// The VM's configuration (the `[vm]` table): MMU, memslot and CPU
    /// knobs, e.g. the shadow MMU's page limit `mmu_pages`.
    pub vm: VmConfig,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            name: "custom".into(),
            description: String::new(),
            ops: 20_000,
            processes: 2,
            threads: 1,
            mappings: 4,
            mapping_pages: 64,
            huge: 0.0,
            spread: false,
            pattern: Pattern::Uniform,
            zipf_theta: 0.99,
            stride_pages: 7,
            write_ratio: 0.5,
            touches: 256,
            max_processes: 64,
            host_churn: false,
            migrate: false,
            mix: Mix {
                touch: 1,
                ..Mix::default()
            },
            vm: VmConfig::default(),
        }
    }
}

/// The named workloads, as embedded TOML.
pub const NAMED: [(&str, &str); 14] = [
    ("default", include_str!("workloads/default.toml")),
    ("populate", include_str!("workloads/populate.toml")),
    ("fork-storm", include_str!("workloads/fork-storm.toml")),
    ("context-switch", include_str!("workloads/context-switch.toml")),
    ("mmap-churn", include_str!("workloads/mmap-churn.toml")),
    ("thp", include_str!("workloads/thp.toml")),
    ("dirty", include_str!("workloads/dirty.toml")),
    ("pt-flood", include_str!("workloads/pt-flood.toml")),
    ("many-mm", include_str!("workloads/many-mm.toml")),
    ("self-map", include_str!("workloads/self-map.toml")),
    ("recursive-map", include_str!("workloads/recursive-map.toml")),
    ("cr-toggle", include_str!("workloads/cr-toggle.toml")),
    ("dirty-storm", include_str!("workloads/dirty-storm.toml")),
    ("mixed", include_str!("workloads/mixed.toml")),
];

/// Why a workload could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// Neither a named workload nor a readable file.
    #[error("{name}: not a named workload ({}) and not a readable file: {error}", NAMED.map(|n| n.0).join(", "))]
    Unknown {
        /// What was asked for.
        name: String,
        /// Why the file could not be read.
        error: std::io::Error,
    },
    /// The file is not a valid workload.
    #[error("{file}:{line}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// The 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl Workload {
    /// The named workload `name`, or the workload in the file `name`.
    pub fn load(name: &str) -> Result<Workload, WorkloadError> {
        if let Some((_, text)) = NAMED.iter().find(|(n, _)| *n == name) {
            return Workload::parse(text, name);
        }
        let text = std::fs::read_to_string(Path::new(name)).map_err(|error| WorkloadError::Unknown {
            name: name.to_string(),
            error,
        })?;
        Workload::parse(&text, name)
    }

    /// Parses and checks the TOML `text` (from `file`, for messages).
    pub fn parse(text: &str, file: &str) -> Result<Workload, WorkloadError> {
        let w: Workload = toml::from_str(text).map_err(|e| WorkloadError::Invalid {
            file: file.to_string(),
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            message: e.message().trim_end().to_string(),
        })?;
        w.validate().map_err(|(key, message)| WorkloadError::Invalid {
            file: file.to_string(),
            line: key_line(text, key),
            message: format!("{key}: {message}"),
        })?;
        Ok(w)
    }

    /// Checks ranges; on error, the key and what is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let ratio = |key: &'static str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err((key, format!("must be between 0 and 1, not {v}")))
            }
        };
        let range = |key: &'static str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err((key, format!("must be between {lo} and {hi}, not {v}")))
            }
        };
        ratio("huge", self.huge)?;
        ratio("write_ratio", self.write_ratio)?;
        range("ops", self.ops, 1, 1 << 40)?;
        range("processes", self.processes.into(), 1, 4096)?;
        range("threads", self.threads.into(), 1, 64)?;
        range("mappings", self.mappings.into(), 1, 4096)?;
        range("mapping_pages", self.mapping_pages, 1, 1 << 20)?;
        range("stride_pages", self.stride_pages, 1, 1 << 20)?;
        range("touches", self.touches.into(), 1, 1 << 24)?;
        range("max_processes", self.max_processes.into(), 1, 1 << 16)?;
        if !(self.zipf_theta > 0.0 && self.zipf_theta <= 10.0) {
            return Err(("zipf_theta", format!("must be in (0, 10], not {}", self.zipf_theta)));
        }
        let m = self.mix;
        self.vm.check().map_err(|(knob, message)| (vm_key(knob), message))?;
        let total = [
            m.touch,
            m.mmap,
            m.munmap,
            m.mprotect,
            m.fork,
            m.exit,
            m.switch,
            m.remap,
            m.spawn,
            m.self_map,
            m.recursive_map,
            m.cr_toggle,
        ]
        .iter()
        .map(|&w| u64::from(w))
        .sum::<u64>();
        if total == 0 {
            return Err(("mix", "every weight is 0: the guest would do nothing".into()));
        }
        if m.touch == 0 {
            return Err((
                "mix",
                "touch must have a weight: a workload that never accesses memory checks nothing".into(),
            ));
        }
        Ok(())
    }
}

/// The `[vm]` key of a knob named by its flag (`dirty-ring` → `vm.dirty_ring`).
fn vm_key(knob: &str) -> &'static str {
    match knob {
        "ept-ad" => "vm.ept_ad",
        "pml" => "vm.pml",
        "dirty-ring" => "vm.dirty_ring",
        "manual-protect" => "vm.manual_protect",
        "initially-set" => "vm.initially_set",
        "max-page-size" => "vm.max_page_size",
        "ept-levels" => "vm.ept_levels",
        "mmu-pages" => "vm.mmu_pages",
        "la57" => "vm.la57",
        _ => "vm",
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line where `key` is set, or 1 (`vm.x` is key `x` after `[vm]`).
fn key_line(text: &str, key: &str) -> usize {
    if let Some(inner) = key.strip_prefix("vm.") {
        let table = text.lines().position(|l| l.trim_start().starts_with("[vm]"));
        return table
            .and_then(|t| {
                text.lines()
                    .skip(t + 1)
                    .position(|l| {
                        let l = l.trim_start();
                        l.strip_prefix(inner).is_some_and(|r| r.trim_start().starts_with('='))
                    })
                    .map(|i| t + i + 2)
            })
            .or(table.map(|t| t + 1))
            .unwrap_or(1);
    }
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('=') || (key == "mix" && rest.starts_with(']')))
                || (key == "mix" && l.starts_with("[mix"))
        })
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_workload_parses_and_names_itself() {
        for (name, text) in NAMED {
            let w = Workload::parse(text, name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(w.name, name);
            assert!(!w.description.is_empty(), "{name} has no description");
        }
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let e = Workload::parse("name = \"x\"\n\nops = = 3\n", "w.toml").unwrap_err();
        assert!(e.to_string().starts_with("w.toml:3:"), "{e}");
    }

    #[test]
    fn an_unknown_key_and_a_wrong_type_name_their_line() {
        let e = Workload::parse("name = \"x\"\nopz = 3\n", "w.toml").unwrap_err();
        assert!(
            e.to_string().starts_with("w.toml:2:") && e.to_string().contains("opz"),
            "{e}"
        );
        let e = Workload::parse("ops = \"many\"\n", "w.toml").unwrap_err();
        assert!(e.to_string().starts_with("w.toml:1:"), "{e}");
        let e = Workload::parse("pattern = \"spiral\"\n", "w.toml").unwrap_err();
        assert!(
            e.to_string().contains("spiral") || e.to_string().contains("variant"),
            "{e}"
        );
    }

    #[test]
    fn an_out_of_range_value_names_its_key_and_line() {
        let e = Workload::parse("name = \"x\"\nwrite_ratio = 1.5\n", "w.toml").unwrap_err();
        assert_eq!(e.to_string(), "w.toml:2: write_ratio: must be between 0 and 1, not 1.5");
        let e = Workload::parse("[mix]\ntouch = 0\n", "w.toml").unwrap_err();
        assert!(e.to_string().starts_with("w.toml:1: mix:"), "{e}");
        let e = Workload::parse("ops = -1\n", "w.toml").unwrap_err();
        assert!(e.to_string().starts_with("w.toml:1:"), "{e}");
    }

    #[test]
    fn the_vm_table_sets_the_configuration_and_its_errors_name_the_key() {
        let w = Workload::parse("[vm]\ndirty_ring = 4096\nmax_page_size = \"2M\"\n", "w.toml").unwrap();
        assert_eq!((w.vm.dirty_ring, w.vm.max_page_size), (4096, 2 << 20));
        let e = Workload::parse("ops = 3\n[vm]\npml = true\nept_ad = false\n", "w.toml").unwrap_err();
        assert!(e.to_string().starts_with("w.toml:3: vm.pml:"), "{e}");
        let e = Workload::parse("[vm]\ndirty_ring = 100\n", "w.toml").unwrap_err();
        assert!(e.to_string().starts_with("w.toml:2: vm.dirty_ring:"), "{e}");
        let e = Workload::parse("[vm]\nmmu_pagez = 100\n", "w.toml").unwrap_err();
        assert!(
            e.to_string().starts_with("w.toml:2:") && e.to_string().contains("mmu_pagez"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_file_is_the_default_workload() {
        assert_eq!(Workload::parse("", "w.toml").unwrap(), Workload::default());
    }

    #[test]
    fn a_missing_file_is_an_error_that_lists_the_names() {
        let e = Workload::load("/nonexistent/w.toml").unwrap_err();
        assert!(e.to_string().contains("fork-storm"), "{e}");
    }
}
