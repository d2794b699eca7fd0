//! The MMU of a VM, either kind: outside the vCPU's MMU context, the one
//! place that names both MMUs. What a VMM asks of its MMU whichever it is
//! (vCPUs, counters, memory used, zap-all, dirty logs, the audit) is a
//! method here.

use std::sync::Arc;

use crate::addr::{Gfn, Level};
use crate::arch::control::CpuFeatures;
use crate::cpu::vcpu::{PREV_ROOTS, Vcpu, VcpuError};
use crate::host::HostAddressSpace;
use crate::mem::{MemslotError, MemslotTable};
use crate::mmu::shadow::ShadowMmu;
use crate::mmu::stats::MmuStatsSnapshot;
use crate::mmu::tdp::TdpMmu;

use super::{VmConfig, VmError};

/// Which MMU a VM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MmuKind {
    /// Shadow paging: the MMU shadows the guest's page tables.
    Shadow,
    /// Two-dimensional paging with EPT.
    Tdp,
}

impl MmuKind {
    /// `"shadow"` or `"tdp"`.
    pub fn name(self) -> &'static str {
        match self {
            MmuKind::Shadow => "shadow",
            MmuKind::Tdp => "tdp",
        }
    }
}

/// A VM's MMU.
#[derive(Clone, Debug)]
pub enum Mmu {
    /// The TDP MMU.
    Tdp(Arc<TdpMmu>),
    /// The shadow MMU.
    Shadow(Arc<ShadowMmu>),
}

impl Mmu {
    /// An MMU of `kind` over `host` and `slots`, with the knobs of
    /// `config` that concern it: the TDP MMU's configuration and dirty
    /// ring, the shadow MMU's page limit.
    pub fn new(
        kind: MmuKind,
        host: &Arc<HostAddressSpace>,
        slots: &Arc<MemslotTable>,
        config: &VmConfig,
    ) -> Result<Mmu, VmError> {
        Ok(match kind {
            MmuKind::Tdp => {
                let mmu = TdpMmu::new(host.clone(), slots.clone(), config.tdp());
                if config.dirty_ring != 0 {
                    mmu.enable_dirty_ring(config.dirty_ring)
                        .map_err(|e| VmError::new(format!("--dirty-ring: {e}")))?;
                }
                Mmu::Tdp(mmu)
            }
            MmuKind::Shadow => {
                let mmu = ShadowMmu::new(host.clone(), slots.clone());
                if config.mmu_pages != 0 {
                    mmu.set_max_pages(config.mmu_pages);
                }
                Mmu::Shadow(mmu)
            }
        })
    }

    /// Which MMU it is.
    pub fn kind(&self) -> MmuKind {
        match self {
            Mmu::Tdp(_) => MmuKind::Tdp,
            Mmu::Shadow(_) => MmuKind::Shadow,
        }
    }

    /// The TDP MMU, if it is one.
    pub fn tdp(&self) -> Option<&Arc<TdpMmu>> {
        match self {
            Mmu::Tdp(m) => Some(m),
            Mmu::Shadow(_) => None,
        }
    }

    /// The shadow MMU, if it is one.
    pub fn shadow(&self) -> Option<&Arc<ShadowMmu>> {
        match self {
            Mmu::Shadow(m) => Some(m),
            Mmu::Tdp(_) => None,
        }
    }

    /// A vCPU on this MMU with paging off, tagged `vpid`.
    pub fn vcpu(&self, slots: &Arc<MemslotTable>, features: CpuFeatures, vpid: u16) -> Result<Vcpu, VcpuError> {
        Ok(match self {
            Mmu::Tdp(m) => Vcpu::new(m.clone(), slots.clone(), features, vpid)?,
            Mmu::Shadow(m) => Vcpu::new_shadow(m.clone(), slots.clone(), features, vpid),
        })
    }

    /// The MMU's counters.
    pub fn stats(&self) -> MmuStatsSnapshot {
        match self {
            Mmu::Tdp(m) => m.stats().snapshot(),
            Mmu::Shadow(m) => m.stats().snapshot(),
        }
    }

    /// Bytes of page-table memory the MMU holds now.
    pub fn bytes(&self) -> u64 {
        match self {
            Mmu::Tdp(m) => m.stats().snapshot().mmu_pages.max(0) as u64 * 4096,
            Mmu::Shadow(m) => m.page_count() as u64 * 4096,
        }
    }

    /// The most page-table memory the MMU held at once, in bytes (exact:
    /// a high-water mark kept at every allocation).
    pub fn peak_bytes(&self) -> u64 {
        match self {
            Mmu::Tdp(m) => m.stats().mmu_pages_peak().max(0) as u64 * 4096,
            Mmu::Shadow(m) => m.peak_page_count() as u64 * 4096,
        }
    }

    /// Sets the shadow MMU's page limit (KVM's `KVM_SET_NR_MMU_PAGES`);
    /// returns the limit set. The TDP MMU has no such limit.
    pub fn set_max_pages(&self, pages: u64) -> Option<u64> {
        match self {
            Mmu::Tdp(_) => None,
            Mmu::Shadow(m) => Some(m.set_max_pages(pages)),
        }
    }

    /// The page-table memory the MMU may hold, in bytes, with `vcpus`
    /// vCPUs over `slots`.
    ///
    /// - Shadow MMU: its page limit (`n_max_mmu_pages`), plus the roots
    ///   in use, which reclaim cannot take: at most the current root and
    ///   `prev_roots` of each vCPU, 4 PAE roots and their PDPT page each
    ///   (the audit checks the exact form: pages <= limit + pinned).
    /// - TDP MMU: it has no configured limit (nor has KVM's); its memory is
    ///   bounded by the guest's memslots: one full tree over them per root
    ///   a vCPU can hold, plus the valid one.
    pub fn limit_bytes(&self, slots: &MemslotTable, vcpus: u64) -> u64 {
        match self {
            Mmu::Shadow(m) => {
                let roots = vcpus * (1 + PREV_ROOTS as u64) * 5;
                (m.max_pages() + roots) * 4096
            }
            Mmu::Tdp(m) => {
                let g = m.config().geometry;
                let mut tree = 1u64;
                for s in slots.load(0).iter() {
                    let (a, b) = (s.base_gfn().raw(), s.base_gfn().raw() + s.npages());
                    for level in 2..=g.levels {
                        let span = g.pages(Level::new(level).expect("a tree level"));
                        tree += (b - 1) / span - a / span + 1;
                    }
                }
                tree * (vcpus + 1) * 4096
            }
        }
    }

    /// Shadow pages and unsync shadow pages now (0 on the TDP MMU).
    pub fn shadow_pages(&self) -> (u64, u64) {
        match self {
            Mmu::Tdp(_) => (0, 0),
            Mmu::Shadow(m) => (m.page_count() as u64, m.unsync_page_count()),
        }
    }

    /// `KVM_GET_DIRTY_LOG` of memslot `id` in address space `as_id`.
    pub fn get_dirty_log(&self, as_id: u16, id: u16) -> Result<Vec<u64>, MemslotError> {
        match self {
            Mmu::Tdp(m) => m.get_dirty_log(as_id, id),
            Mmu::Shadow(m) => m.get_dirty_log(as_id, id),
        }
    }

    /// `KVM_CLEAR_DIRTY_LOG` of `bitmap` from page `first` of memslot `id`.
    pub fn clear_dirty_log(&self, as_id: u16, id: u16, first: u64, bitmap: &[u64]) -> Result<(), MemslotError> {
        match self {
            Mmu::Tdp(m) => m.clear_dirty_log(as_id, id, first, bitmap),
            Mmu::Shadow(m) => m.clear_dirty_log(as_id, id, first, bitmap),
        }
    }

    /// What the MMU maps `gfn` with now (for a violation's report; the
    /// TDP MMU's leaves in every root, nothing on the shadow MMU).
    pub fn describe_gfn(&self, gfn: Gfn) -> String {
        match self {
            Mmu::Tdp(m) => m
                .leaves_of(0, gfn)
                .iter()
                .map(|(valid, level, spte)| {
                    format!(
                        "{} root: level {level} {spte:?}",
                        if *valid { "valid" } else { "invalid" }
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            Mmu::Shadow(_) => String::new(),
        }
    }

    /// Zaps every SPTE (KVM's `kvm_mmu_zap_all_fast` and the zap of the
    /// invalidated roots, or the shadow MMU's zap of every page).
    pub fn zap_all(&self) {
        match self {
            Mmu::Tdp(m) => {
                m.zap_all_fast();
                m.zap_invalidated_roots();
            }
            Mmu::Shadow(m) => m.zap_all(),
        }
    }

    /// The MMU's audit: every SPTE against memslots, host and (shadow)
    /// the guest's tables. Empty when all is right.
    pub fn audit(&self) -> Vec<String> {
        match self {
            Mmu::Tdp(m) => m.audit().into_iter().map(|v| v.to_string()).collect(),
            Mmu::Shadow(m) => m.audit().into_iter().map(|v| v.to_string()).collect(),
        }
    }
}
