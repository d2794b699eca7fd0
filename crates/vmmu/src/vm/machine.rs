//! One simulated machine under either MMU: what the simulator needs of a
//! VM (vCPUs, guest memory, dirty logging, zap-all, the audit, the
//! counters) behind one type, so that a workload runs unchanged under
//! the shadow MMU and the TDP MMU.

use std::sync::Arc;

use crate::addr::Hva;
use crate::arch::control::CpuFeatures;
use crate::cpu::vcpu::{Vcpu, VcpuError};
use parking_lot::Mutex;

use crate::mem::{DirtyRing, GuestMemory, HostAddressSpace, MemslotError, MemslotTable, VmaFlags};
use crate::mmu::shadow::ShadowMmu;
use crate::mmu::stats::MmuStatsSnapshot;
use crate::mmu::tdp::TdpMmu;
use crate::vm::config::{DirtyProtocol, VmConfig};
use crate::vm::{ShadowVm, Vm, VmError};
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

/// A VM: host memory, memslot 0 = guest RAM `0..ram`, and one MMU, built
/// from a [`VmConfig`].
#[derive(Debug)]
pub struct Machine {
    kind: MmuKind,
    /// The host (the VMM process's address space).
    pub host: Arc<HostAddressSpace>,
    /// The memslots.
    pub slots: Arc<MemslotTable>,
    ram: u64,
    features: CpuFeatures,
    config: VmConfig,
    backend: Backend,
    /// The vCPUs' dirty rings, when the dirty ring is on.
    rings: Arc<DirtyRings>,
}

/// The VMM's side of the dirty ring (QEMU's reaper): every vCPU's ring
/// with the VMM's cursor in it, and the pages collected from them that no
/// migration round has taken yet. Shared by the VMM and the vCPU threads:
/// a vCPU whose ring is full reaps every ring before it runs again
/// (`KVM_EXIT_DIRTY_RING_FULL`).
#[derive(Debug, Default)]
pub struct DirtyRings {
    mmu: Option<Arc<TdpMmu>>,
    state: Mutex<RingsState>,
}

#[derive(Debug, Default)]
struct RingsState {
    rings: Vec<(Arc<DirtyRing>, u32)>,
    collected: std::collections::BTreeSet<u64>,
}

impl DirtyRings {
    /// Collects every ring's dirty entries (gfns of memslot 0) and resets
    /// the rings (`KVM_RESET_DIRTY_RINGS`, which write-protects their pages
    /// again and flushes before it returns). Returns the entries reset.
    pub fn reap(&self) -> u64 {
        let Some(mmu) = &self.mmu else { return 0 };
        let mut st = self.state.lock();
        let RingsState { rings, collected } = &mut *st;
        for (ring, fetch) in rings.iter_mut() {
            for e in ring.harvest(fetch) {
                if e.slot == 0 {
                    collected.insert(e.offset);
                }
            }
        }
        mmu.reset_dirty_rings(rings.iter().map(|(r, _)| &**r))
    }

    /// Reaps, and takes every page collected so far.
    fn take(&self) -> Vec<u64> {
        self.reap();
        std::mem::take(&mut self.state.lock().collected).into_iter().collect()
    }
}

impl Machine {
    /// A machine with `ram` bytes of guest RAM (a multiple of 2 MiB)
    /// backed by transparent huge pages, under `kind`, in the default
    /// configuration.
    pub fn new(kind: MmuKind, ram: u64) -> Result<Machine, VmError> {
        Machine::with_config(kind, ram, VmConfig::default())
    }

    /// As [`Machine::new`], in `config` (checked by the caller with
    /// [`VmConfig::validate`]).
    pub fn with_config(kind: MmuKind, ram: u64, config: VmConfig) -> Result<Machine, VmError> {
        let flags = VmaFlags::WRITE | VmaFlags::THP;
        let hva = Hva::new(RAM_HVA);
        let (host, slots, backend) = match kind {
            MmuKind::Tdp => {
                let Vm { host, slots, mmu } = Vm::with_memslots(ram, hva, flags, config.tdp(), config.memslots())?;
                if config.dirty_ring != 0 {
                    mmu.enable_dirty_ring(config.dirty_ring)
                        .map_err(|e| VmError::new(format!("--dirty-ring: {e}")))?;
                }
                (host, slots, Backend::Tdp(mmu))
            }
            MmuKind::Shadow => {
                let ShadowVm { host, slots, mmu } = ShadowVm::with_memslots(ram, hva, flags, config.memslots())?;
                if config.mmu_pages != 0 {
                    mmu.set_max_pages(config.mmu_pages);
                }
                (host, slots, Backend::Shadow(mmu))
            }
        };
        let rings = Arc::new(DirtyRings {
            mmu: match &backend {
                Backend::Tdp(m) if config.dirty_ring != 0 => Some(m.clone()),
                _ => None,
            },
            state: Mutex::default(),
        });
        Ok(Machine {
            kind,
            host,
            slots,
            ram,
            features: CpuFeatures::default(),
            config,
            backend,
            rings,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The dirty rings' reaper (`None` without the dirty ring): a vCPU
    /// whose ring is full calls it before it runs again.
    pub fn dirty_rings(&self) -> Option<Arc<DirtyRings>> {
        self.rings.mmu.is_some().then(|| self.rings.clone())
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

    /// A vCPU tagged `vpid` in the state `regs`/`cr3`. With the dirty
    /// ring on, its ring joins the reaper's.
    pub fn vcpu(&self, vpid: u16, regs: ControlRegs, cr3: u64) -> Result<Vcpu, VcpuError> {
        let mut v = match &self.backend {
            Backend::Tdp(m) => Vcpu::new(m.clone(), self.slots.clone(), self.features, vpid)?,
            Backend::Shadow(m) => Vcpu::new_shadow(m.clone(), self.slots.clone(), self.features, vpid),
        };
        if let Some(ring) = v.dirty_ring() {
            self.rings.state.lock().rings.push((ring.clone(), 0));
        }
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

    /// One harvest of guest RAM's (memslot 0's) dirty pages, by the
    /// protocol of the configuration ([`DirtyProtocol`]): the gfns written
    /// since the last harvest, protected again when this returns, so a
    /// copy made afterwards holds every write made before.
    pub fn harvest_dirty(&self) -> Result<Vec<u64>, MemslotError> {
        let get = || match &self.backend {
            Backend::Tdp(m) => m.get_dirty_log(0, 0),
            Backend::Shadow(m) => m.get_dirty_log(0, 0),
        };
        Ok(match self.config.dirty_protocol() {
            DirtyProtocol::Get => bitmap_pages(&get()?),
            DirtyProtocol::GetClear => {
                let bits = get()?;
                match &self.backend {
                    Backend::Tdp(m) => m.clear_dirty_log(0, 0, 0, &bits)?,
                    Backend::Shadow(m) => m.clear_dirty_log(0, 0, 0, &bits)?,
                }
                bitmap_pages(&bits)
            }
            DirtyProtocol::Ring => self.rings.take(),
        })
    }

    /// What the MMU maps `gfn` with now (for a violation's report).
    pub fn describe_gfn(&self, gfn: crate::addr::Gfn) -> String {
        match &self.backend {
            Backend::Tdp(m) => m
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
            Backend::Shadow(_) => String::new(),
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

/// The page numbers whose bits are set.
pub fn bitmap_pages(bitmap: &[u64]) -> Vec<u64> {
    let mut v = Vec::new();
    for (i, &w) in bitmap.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            v.push(i as u64 * 64 + u64::from(w.trailing_zeros()));
            w &= w - 1;
        }
    }
    v
}
