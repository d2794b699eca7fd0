//! One simulated machine under either MMU: what the simulator needs of a
//! VM (vCPUs, guest memory, dirty logging, zap-all, the audit, the
//! counters) behind one type, so that a workload runs unchanged under
//! the shadow MMU and the TDP MMU.

use std::sync::Arc;

use crate::addr::Hva;
use crate::arch::control::CpuFeatures;
use crate::cpu::vcpu::{Vcpu, VcpuError};
use crate::mem::{GuestMemory, HostAddressSpace, MemslotError, MemslotTable, VmaFlags};
use crate::mmu::shadow::ShadowMmu;
use crate::mmu::stats::MmuStatsSnapshot;
use crate::mmu::tdp::{TdpConfig, TdpMmu};
use crate::sim::vm::{ShadowVm, Vm, VmError};
use crate::walker::ControlRegs;

/// Which MMU a machine runs.
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

#[derive(Debug)]
enum Backend {
    Tdp(Arc<TdpMmu>),
    Shadow(Arc<ShadowMmu>),
}

/// Where guest RAM is in the VMM's address space.
pub const RAM_HVA: u64 = 0x4000_0000;

/// A VM: host memory, memslot 0 = guest RAM `0..ram`, and one MMU.
#[derive(Debug)]
pub struct Machine {
    kind: MmuKind,
    /// The host (the VMM process's address space).
    pub host: Arc<HostAddressSpace>,
    /// The memslots.
    pub slots: Arc<MemslotTable>,
    ram: u64,
    features: CpuFeatures,
    backend: Backend,
}

impl Machine {
    /// A machine with `ram` bytes of guest RAM (a multiple of 2 MiB)
    /// backed by transparent huge pages, under `kind`.
    pub fn new(kind: MmuKind, ram: u64) -> Result<Machine, VmError> {
        let flags = VmaFlags::WRITE | VmaFlags::THP;
        let hva = Hva::new(RAM_HVA);
        let (host, slots, backend) = match kind {
            MmuKind::Tdp => {
                let Vm { host, slots, mmu } = Vm::new(ram, hva, flags, TdpConfig::default())?;
                (host, slots, Backend::Tdp(mmu))
            }
            MmuKind::Shadow => {
                let ShadowVm { host, slots, mmu } = ShadowVm::new(ram, hva, flags)?;
                (host, slots, Backend::Shadow(mmu))
            }
        };
        Ok(Machine {
            kind,
            host,
            slots,
            ram,
            features: CpuFeatures::default(),
            backend,
        })
    }

    /// The MMU.
    pub fn kind(&self) -> MmuKind {
        self.kind
    }

    /// Guest RAM in bytes.
    pub fn ram(&self) -> u64 {
        self.ram
    }

    /// The VMM's access to guest memory.
    pub fn memory(&self) -> GuestMemory {
        GuestMemory::new(self.host.clone(), self.slots.clone())
    }

    /// A vCPU tagged `vpid` in the state `regs`/`cr3`.
    pub fn vcpu(&self, vpid: u16, regs: ControlRegs, cr3: u64) -> Result<Vcpu, VcpuError> {
        let mut v = match &self.backend {
            Backend::Tdp(m) => Vcpu::new(m.clone(), self.slots.clone(), self.features, vpid)?,
            Backend::Shadow(m) => Vcpu::new_shadow(m.clone(), self.slots.clone(), self.features, vpid),
        };
        v.set_state(regs, cr3, 0)?;
        Ok(v)
    }

    /// The MMU's counters.
    pub fn stats(&self) -> MmuStatsSnapshot {
        match &self.backend {
            Backend::Tdp(m) => m.stats().snapshot(),
            Backend::Shadow(m) => m.stats().snapshot(),
        }
    }

    /// Bytes of page-table memory the MMU holds now.
    pub fn mmu_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Tdp(m) => m.stats().snapshot().mmu_pages.max(0) as u64 * 4096,
            Backend::Shadow(m) => m.page_count() as u64 * 4096,
        }
    }

    /// The most page-table memory the MMU held at once, in bytes (exact:
    /// a high-water mark kept at every allocation).
    pub fn mmu_peak_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Tdp(m) => m.stats().mmu_pages_peak().max(0) as u64 * 4096,
            Backend::Shadow(m) => m.peak_page_count() as u64 * 4096,
        }
    }

    /// Sets the shadow MMU's page limit (KVM's `KVM_SET_NR_MMU_PAGES`);
    /// returns the limit set. The TDP MMU has no such limit.
    pub fn set_mmu_pages(&self, pages: u64) -> Option<u64> {
        match &self.backend {
            Backend::Tdp(_) => None,
            Backend::Shadow(m) => Some(m.set_max_pages(pages)),
        }
    }

    /// The page-table memory the MMU may hold, in bytes, with `vcpus`
    /// vCPUs.
    ///
    /// - Shadow MMU: its page limit (`n_max_mmu_pages`), plus the roots
    ///   in use, which reclaim cannot take: at most the current root and
    ///   `prev_roots` of each vCPU, 4 PAE roots and their PDPT page each
    ///   (the audit checks the exact form: pages <= limit + pinned).
    /// - TDP MMU: it has no configured limit (nor has KVM's); its memory is
    ///   bounded by the guest's memslots: one full tree over them per root
    ///   a vCPU can hold, plus the valid one.
    pub fn mmu_limit_bytes(&self, vcpus: u64) -> u64 {
        match &self.backend {
            Backend::Shadow(m) => {
                let roots = vcpus * (1 + crate::cpu::vcpu::PREV_ROOTS as u64) * 5;
                (m.max_pages() + roots) * 4096
            }
            Backend::Tdp(m) => {
                let g = m.config().geometry;
                let mut tree = 1u64;
                for s in self.slots.load(0).iter() {
                    let (a, b) = (s.base_gfn().raw(), s.base_gfn().raw() + s.npages());
                    for level in 1..g.levels {
                        let span = g.pages(level + 1);
                        tree += (b - 1) / span - a / span + 1;
                    }
                }
                tree * (vcpus + 1) * 4096
            }
        }
    }

    /// Shadow pages and unsync shadow pages now (0 on the TDP MMU).
    pub fn shadow_pages(&self) -> (u64, u64) {
        match &self.backend {
            Backend::Tdp(_) => (0, 0),
            Backend::Shadow(m) => (m.page_count() as u64, m.unsync_page_count()),
        }
    }

    /// `KVM_GET_DIRTY_LOG` of guest RAM (memslot 0): the pages written
    /// since the last call, write-protected again.
    pub fn get_dirty_log(&self) -> Result<Vec<u64>, MemslotError> {
        match &self.backend {
            Backend::Tdp(m) => m.get_dirty_log(0, 0),
            Backend::Shadow(m) => m.get_dirty_log(0, 0),
        }
    }

    /// Zaps every SPTE (KVM's `kvm_mmu_zap_all_fast`, or the shadow MMU's
    /// zap of every page).
    pub fn zap_all(&self) {
        match &self.backend {
            Backend::Tdp(m) => {
                m.zap_all_fast();
                m.zap_invalidated_roots();
            }
            Backend::Shadow(m) => m.zap_all(),
        }
    }

    /// The MMU's audit: every SPTE against memslots, host and (shadow)
    /// the guest's tables. Empty when all is right.
    pub fn audit(&self) -> Vec<String> {
        match &self.backend {
            Backend::Tdp(m) => m.audit().into_iter().map(|v| v.to_string()).collect(),
            Backend::Shadow(m) => m.audit().into_iter().map(|v| v.to_string()).collect(),
        }
    }
}
