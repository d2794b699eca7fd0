//! The configuration of a VM: every knob a KVM user can set
//! about the MMUs, the memslots and the CPU the guest sees, in one value.
//! `vmmu run` takes it from flags and from a workload file's `[vm]` table,
//! or draws it from the seed (`--config random`, `vmmu_sim::config`); the
//! `vm` fuzz target draws it from its input; the migration checker runs over its dirty-log
//! matrix. A configuration a user can set is one the tests run.
//!
//! | knob | KVM's name | default |
//! |---|---|---|
//! | `vendor` | the host: `intel` (VMX, EPT) or `amd` (SVM, NPT: `kvm_amd`) | `intel` |
//! | `ept_ad` | `kvm_intel.eptad`: EPT accessed/dirty flags (NPT always has them: on with `amd`) | on |
//! | `pml` | `kvm_intel.pml`: dirty logging by EPT dirty bits (needs `ept_ad`; Intel only) | off |
//! | `dirty_ring` | `KVM_CAP_DIRTY_LOG_RING`: per-vCPU rings of this many entries, 0 = the bitmap | 0 |
//! | `manual_protect` | `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` (bitmap only) | off |
//! | `initially_set` | `KVM_DIRTY_LOG_INITIALLY_SET` (with `manual_protect`) | off |
//! | `eager_split` | `kvm.eager_page_split` | on |
//! | `nx_huge_pages` | `kvm.nx_huge_pages` | off |
//! | `nx_recovery_ratio` | `kvm.nx_huge_pages_recovery_ratio` (0: no recovery) | 60 |
//! | `nx_recovery_period_ms` | `kvm.nx_huge_pages_recovery_period_ms` (0: an hour / ratio) | 0 |
//! | `max_page_size` | the largest TDP leaf (`4K`, `2M`, `1G`) | `1G` |
//! | `ept_levels` | 4- or 5-level EPT (NPT on `amd`: the host's paging levels) | 4 |
//! | `mmu_pages` | `KVM_SET_NR_MMU_PAGES`: the shadow MMU's page limit (on a TDP VM, the nested MMU's), 0 = 2% of RAM | 0 |
//! | `pku`, `smep`, `smap` | CPUID features the guest may use (it enables each it sees) | off |
//! | `la57` | CPUID.LA57: 5-level paging allowed | on |
//!
//! The TDP knobs mean nothing to the shadow MMU and are ignored by it; the
//! shadow MMU has no dirty ring (an error when asked for).

use serde::{Deserialize, Serialize};

use crate::arch::control::{PagingMode, Vendor};
use crate::mem::MemslotConfig;
use crate::mmu::iter::Geometry;
use crate::mmu::tdp::{DirtyLogMode, NX_HUGE_PAGES_RECOVERY_RATIO, TdpConfig};
use crate::vm::MmuKind;

/// The largest ring size (KVM's cap).
pub const MAX_DIRTY_RING: u32 = crate::mmu::tdp::DIRTY_RING_MAX_ENTRIES;

/// A simulated VM's configuration (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// The host's vendor: the TDP MMU builds EPT (Intel) or NPT (AMD).
    pub vendor: Vendor,
    /// EPT accessed/dirty flags.
    pub ept_ad: bool,
    /// D-bit dirty logging (KVM with PML).
    pub pml: bool,
    /// Dirty ring entries per vCPU; 0 logs into the memslot bitmap.
    pub dirty_ring: u32,
    /// Manual dirty-log protection (`KVM_CLEAR_DIRTY_LOG`).
    pub manual_protect: bool,
    /// A new dirty bitmap starts all set.
    pub initially_set: bool,
    /// Eager page splitting.
    pub eager_split: bool,
    /// The NX huge page mitigation.
    pub nx_huge_pages: bool,
    /// NX recovery: 1/ratio of the split regions per run (0: off).
    pub nx_recovery_ratio: u32,
    /// NX recovery period in ms (0: an hour divided by the ratio).
    pub nx_recovery_period_ms: u32,
    /// The largest TDP leaf: 4096, 2 MiB or 1 GiB.
    #[serde(with = "page_size")]
    pub max_page_size: u64,
    /// EPT levels: 4 or 5.
    pub ept_levels: u8,
    /// The shadow MMU's page limit; 0 for KVM's default.
    pub mmu_pages: u64,
    /// CPUID.PKU: the guest enables protection keys (IA-32e paging).
    pub pku: bool,
    /// CPUID.SMEP: the guest enables SMEP.
    pub smep: bool,
    /// CPUID.SMAP: the guest enables SMAP.
    pub smap: bool,
    /// CPUID.LA57: the guest may run 5-level paging.
    pub la57: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vendor: Vendor::Intel,
            ept_ad: true,
            pml: false,
            dirty_ring: 0,
            manual_protect: false,
            initially_set: false,
            eager_split: true,
            nx_huge_pages: false,
            nx_recovery_ratio: NX_HUGE_PAGES_RECOVERY_RATIO,
            nx_recovery_period_ms: 0,
            max_page_size: 1 << 30,
            ept_levels: 4,
            mmu_pages: 0,
            pku: false,
            smep: false,
            smap: false,
            la57: true,
        }
    }
}

/// `max_page_size` as `"4K"`, `"2M"`, `"1G"` in files.
mod page_size {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(super::page_size_name(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_page_size(&s).map_err(D::Error::custom)
    }
}

/// `4K`, `2M` or `1G` (any case); the error names what is allowed.
pub fn parse_page_size(s: &str) -> Result<u64, String> {
    match s.trim().to_ascii_uppercase().as_str() {
        "4K" | "4096" => Ok(4096),
        "2M" => Ok(2 << 20),
        "1G" => Ok(1 << 30),
        _ => Err(format!("{s:?} is not a TDP page size (4K, 2M or 1G)")),
    }
}

/// The name of a page size [`parse_page_size`] accepts.
pub fn page_size_name(v: u64) -> &'static str {
    match v {
        4096 => "4K",
        0x20_0000 => "2M",
        _ => "1G",
    }
}

fn on(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

impl VmConfig {
    /// Checks the configuration for `mmu` and the guest's paging mode; on
    /// error, the knob (its flag name) and what is wrong.
    pub fn validate(&self, mmu: MmuKind, paging: PagingMode) -> Result<(), (&'static str, String)> {
        self.check()?;
        if self.dirty_ring != 0 && mmu == MmuKind::Shadow {
            return Err(("dirty-ring", "the shadow MMU logs into the memslot bitmap only".into()));
        }
        if paging == PagingMode::Level5 && !self.la57 {
            return Err((
                "la57",
                "5-level paging needs LA57: the CPU the guest sees does not have it (--la57 on, or another --paging)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Checks what does not depend on the MMU or the paging mode (a
    /// workload file's `[vm]` table is checked with this).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let err = |k: &'static str, m: &str| Err((k, m.to_string()));
        if self.vendor == Vendor::Amd && !self.ept_ad {
            return err(
                "ept-ad",
                "AMD NPT always has accessed/dirty flags: --ept-ad off is Intel's (kvm_intel.eptad)",
            );
        }
        if self.vendor == Vendor::Amd && self.pml {
            return err(
                "pml",
                "PML is Intel's (kvm_intel.pml): on AMD, dirty logging write-protects (--pml off)",
            );
        }
        if self.pml && !self.ept_ad {
            return err(
                "pml",
                "D-bit dirty logging (PML) needs EPT accessed/dirty flags (--ept-ad on)",
            );
        }
        if self.initially_set && !self.manual_protect {
            return err(
                "initially-set",
                "KVM_DIRTY_LOG_INITIALLY_SET is only valid with manual protect (--manual-protect on)",
            );
        }
        if self.dirty_ring != 0 {
            let n = self.dirty_ring;
            if !n.is_power_of_two() || n <= crate::mem::dirty::DIRTY_RING_RSVD_ENTRIES || n > MAX_DIRTY_RING {
                return Err((
                    "dirty-ring",
                    format!(
                        "{n} entries: a ring is a power of two above {} and at most {MAX_DIRTY_RING} (0 for the bitmap)",
                        crate::mem::dirty::DIRTY_RING_RSVD_ENTRIES
                    ),
                ));
            }
            if self.manual_protect {
                return err(
                    "manual-protect",
                    "manual protect is a bitmap protocol: the dirty ring is harvested and reset instead",
                );
            }
            if self.pml {
                return err(
                    "pml",
                    "D-bit dirty logging has no PML buffer to feed the dirty ring; use the bitmap or --pml off",
                );
            }
        }
        if !matches!(self.max_page_size, 0x1000 | 0x20_0000 | 0x4000_0000) {
            return err("max-page-size", "must be 4K, 2M or 1G");
        }
        if !matches!(self.ept_levels, 4 | 5) {
            return Err(("ept-levels", format!("{}: EPT has 4 or 5 levels", self.ept_levels)));
        }
        if self.mmu_pages != 0 && !(crate::mmu::shadow::MIN_MMU_PAGES..=1 << 24).contains(&self.mmu_pages) {
            return Err((
                "mmu-pages",
                format!(
                    "{}: between {} and {} (0 for KVM's default)",
                    self.mmu_pages,
                    crate::mmu::shadow::MIN_MMU_PAGES,
                    1u64 << 24
                ),
            ));
        }
        Ok(())
    }

    /// The TDP MMU's configuration.
    pub fn tdp(&self) -> TdpConfig {
        TdpConfig {
            vendor: self.vendor,
            geometry: if self.ept_levels == 5 {
                Geometry::X86_5LEVEL
            } else {
                Geometry::X86_4LEVEL
            },
            ad: self.ept_ad,
            max_level: match self.max_page_size {
                0x1000 => 1,
                0x20_0000 => 2,
                _ => 3,
            },
            nx_huge_pages: self.nx_huge_pages,
            nx_recovery_ratio: self.nx_recovery_ratio,
            nx_recovery_period_ms: self.nx_recovery_period_ms,
            dirty_log: if self.pml {
                DirtyLogMode::DirtyBit
            } else {
                DirtyLogMode::WriteProtect
            },
            eager_page_split: self.eager_split,
        }
    }

    /// The VM-wide memslot settings.
    pub fn memslots(&self) -> MemslotConfig {
        MemslotConfig {
            manual_dirty_log_protect: self.manual_protect,
            dirty_log_initially_set: self.initially_set,
            ..MemslotConfig::default()
        }
    }

    /// How the VMM harvests dirty pages in this configuration.
    pub fn dirty_protocol(&self) -> DirtyProtocol {
        match (self.dirty_ring, self.manual_protect) {
            (0, false) => DirtyProtocol::Get,
            (0, true) => DirtyProtocol::GetClear,
            _ => DirtyProtocol::Ring,
        }
    }

    /// The configuration as the `vmmu run` flags that set it: printed
    /// before a run, so any run can be repeated.
    pub fn flags(&self) -> String {
        format!(
            "--vendor {} --ept-ad {} --pml {} --dirty-ring {} --manual-protect {} --initially-set {} --eager-split {} \
             --nx-huge-pages {} --nx-recovery-ratio {} --nx-recovery-period-ms {} --max-page-size {} \
             --ept-levels {} --mmu-pages {} --pku {} --smep {} --smap {} --la57 {}",
            self.vendor.name(),
            on(self.ept_ad),
            on(self.pml),
            self.dirty_ring,
            on(self.manual_protect),
            on(self.initially_set),
            on(self.eager_split),
            on(self.nx_huge_pages),
            self.nx_recovery_ratio,
            self.nx_recovery_period_ms,
            page_size_name(self.max_page_size),
            self.ept_levels,
            self.mmu_pages,
            on(self.pku),
            on(self.smep),
            on(self.smap),
            on(self.la57),
        )
    }

    /// Every dirty-logging configuration a KVM user can choose for `mmu`
    /// (the migration checker's matrix), each once. On the TDP MMU (18),
    /// on Intel (13):
    /// write-protect logging × {no manual protect, manual protect, manual
    /// protect + initially set} × EPT A/D on and off (6); D-bit logging
    /// (PML) × the same three (3; it needs EPT A/D, as KVM's `enable_pml`
    /// does: D-bit logging without A/D *is* write-protect logging); the
    /// dirty ring at KVM's usual 4096 entries and at 128 (a ring that fills
    /// up and exits to the VMM to be reaped) × EPT A/D on and off (4; the
    /// ring has no manual protect); on AMD (5), where NPT always has A/D
    /// and there is no PML: write-protect logging × the three bitmap
    /// protocols, and the two rings. On the shadow MMU (3): the three
    /// bitmap protocols.
    pub fn dirty_log_matrix(mmu: MmuKind) -> Vec<VmConfig> {
        let mut out = Vec::new();
        let protect = [(false, false), (true, false), (true, true)];
        let d = VmConfig::default();
        match mmu {
            MmuKind::Shadow => {
                for (manual_protect, initially_set) in protect {
                    out.push(VmConfig {
                        manual_protect,
                        initially_set,
                        ..d
                    });
                }
            }
            MmuKind::Tdp => {
                for (pml, ept_ad) in [(false, true), (false, false), (true, true)] {
                    for (manual_protect, initially_set) in protect {
                        out.push(VmConfig {
                            ept_ad,
                            pml,
                            manual_protect,
                            initially_set,
                            ..d
                        });
                    }
                }
                for dirty_ring in [4096, 128] {
                    for ept_ad in [true, false] {
                        out.push(VmConfig {
                            ept_ad,
                            dirty_ring,
                            ..d
                        });
                    }
                }
                let amd = VmConfig {
                    vendor: Vendor::Amd,
                    ..d
                };
                for (manual_protect, initially_set) in protect {
                    out.push(VmConfig {
                        manual_protect,
                        initially_set,
                        ..amd
                    });
                }
                for dirty_ring in [4096, 128] {
                    out.push(VmConfig { dirty_ring, ..amd });
                }
            }
        }
        out
    }

    /// A short name of the dirty-logging part, for tables and for
    /// `vmmu migrate --log`: `wp`, `dbit` or `ring<entries>`, then
    /// `+manual`, `+init`, then `/ad` or `/noad` (EPT A/D) or `/npt`
    /// (AMD), e.g. `wp+manual+init/noad`, `ring128/ad`, `wp/npt` (no part
    /// on the shadow MMU, which has no EPT or NPT).
    pub fn dirty_log_name(&self, mmu: MmuKind) -> String {
        let mut s = if self.dirty_ring != 0 {
            format!("ring{}", self.dirty_ring)
        } else if self.pml {
            "dbit".to_string()
        } else {
            "wp".to_string()
        };
        if self.manual_protect {
            s.push_str("+manual");
        }
        if self.initially_set {
            s.push_str("+init");
        }
        if mmu == MmuKind::Tdp {
            s.push_str(match (self.vendor, self.ept_ad) {
                (Vendor::Amd, _) => "/npt",
                (Vendor::Intel, true) => "/ad",
                (Vendor::Intel, false) => "/noad",
            });
        }
        s
    }
}

/// How a VMM harvests dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyProtocol {
    /// `KVM_GET_DIRTY_LOG`, which clears and protects.
    Get,
    /// `KVM_GET_DIRTY_LOG`, then `KVM_CLEAR_DIRTY_LOG` of what it returned,
    /// before the pages are copied (QEMU's order).
    GetClear,
    /// Collect every vCPU's dirty ring, then `KVM_RESET_DIRTY_RINGS`.
    Ring,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_has_every_dirty_log_configuration_once() {
        let tdp = VmConfig::dirty_log_matrix(MmuKind::Tdp);
        assert_eq!(tdp.len(), 18);
        assert_eq!(tdp.iter().filter(|c| c.vendor == Vendor::Amd).count(), 5);
        let shadow = VmConfig::dirty_log_matrix(MmuKind::Shadow);
        assert_eq!(shadow.len(), 3);
        let paging = PagingMode::Level4;
        for (mmu, set) in [(MmuKind::Tdp, &tdp), (MmuKind::Shadow, &shadow)] {
            for c in set.iter() {
                c.validate(mmu, paging).unwrap();
            }
        }
        for (mmu, set) in [(MmuKind::Tdp, &tdp), (MmuKind::Shadow, &shadow)] {
            let mut names: Vec<_> = set.iter().map(|c| c.dirty_log_name(mmu)).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), set.len(), "{names:?}");
            let mut flags: Vec<_> = set.iter().map(VmConfig::flags).collect();
            flags.sort();
            flags.dedup();
            assert_eq!(flags.len(), set.len(), "{flags:?}");
        }
    }

    #[test]
    fn impossible_configurations_name_their_knob() {
        let paging = PagingMode::Level5;
        let bad = |c: VmConfig, mmu| c.validate(mmu, paging).unwrap_err().0;
        let d = VmConfig::default();
        assert_eq!(
            bad(
                VmConfig {
                    pml: true,
                    ept_ad: false,
                    ..d
                },
                MmuKind::Tdp
            ),
            "pml"
        );
        assert_eq!(
            bad(
                VmConfig {
                    initially_set: true,
                    ..d
                },
                MmuKind::Tdp
            ),
            "initially-set"
        );
        assert_eq!(bad(VmConfig { dirty_ring: 100, ..d }, MmuKind::Tdp), "dirty-ring");
        assert_eq!(bad(VmConfig { dirty_ring: 4096, ..d }, MmuKind::Shadow), "dirty-ring");
        assert_eq!(
            bad(
                VmConfig {
                    dirty_ring: 4096,
                    manual_protect: true,
                    ..d
                },
                MmuKind::Tdp
            ),
            "manual-protect"
        );
        assert_eq!(bad(VmConfig { la57: false, ..d }, MmuKind::Tdp), "la57");
        assert_eq!(bad(VmConfig { ept_levels: 3, ..d }, MmuKind::Tdp), "ept-levels");
        assert_eq!(bad(VmConfig { mmu_pages: 3, ..d }, MmuKind::Shadow), "mmu-pages");
    }
}
