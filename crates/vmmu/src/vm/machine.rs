//! One machine under either MMU: what the simulator needs of a VM (vCPUs,
//! guest memory, dirty logging, zap-all, the audit, the counters) behind
//! one type, so that a workload runs unchanged under the shadow MMU and
//! the TDP MMU. Built by [`super::VmBuilder::build`].

use std::sync::Arc;

use parking_lot::Mutex;

use crate::addr::Gfn;
use crate::arch::control::CpuFeatures;
use crate::cpu::vcpu::{Vcpu, VcpuError};
use crate::host::HostAddressSpace;
use crate::mem::{DirtyRing, GuestMemory, MemslotError, MemslotTable};
use crate::mmu::stats::MmuStatsSnapshot;
use crate::mmu::tdp::TdpMmu;
use crate::vm::config::{DirtyProtocol, VmConfig};
use crate::vm::{Mmu, MmuKind, VmBuilder, VmError};
use crate::walker::ControlRegs;

pub use super::RAM_HVA;

/// A VM: host memory, memslot 0 = guest RAM `0..ram`, and one MMU, built
/// from a [`VmConfig`].
#[derive(Debug)]
pub struct Machine {
    /// The host (the VMM process's address space).
    pub host: Arc<HostAddressSpace>,
    /// The memslots.
    pub slots: Arc<MemslotTable>,
    ram: u64,
    features: CpuFeatures,
    config: VmConfig,
    mmu: Mmu,
    /// The vCPUs' dirty rings, when the dirty ring is on.
    rings: Arc<DirtyRings>,
    /// The nested MMU, once the guest runs L2 guests with nested paging
    /// ([`Machine::nested_mmu`]).
    nested: std::sync::OnceLock<Arc<crate::mmu::shadow::ShadowMmu>>,
    /// The seed threads' decisions, as [`Machine::set_policies`] set them.
    policies: Mutex<super::Policies>,
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
        VmBuilder::new(ram).build(kind, config)
    }

    /// The machine of these parts ([`VmBuilder::build`]).
    pub(super) fn new_from_parts(
        host: Arc<HostAddressSpace>,
        slots: Arc<MemslotTable>,
        mmu: Mmu,
        ram: u64,
        config: VmConfig,
    ) -> Machine {
        let rings = Arc::new(DirtyRings {
            mmu: match &mmu {
                Mmu::Tdp(m) if config.dirty_ring != 0 => Some(m.clone()),
                _ => None,
            },
            state: Mutex::default(),
        });
        Machine {
            host,
            slots,
            ram,
            features: CpuFeatures::default(),
            config,
            mmu,
            rings,
            nested: std::sync::OnceLock::new(),
            policies: Mutex::new(super::Policies::default()),
        }
    }

    /// Runs the seed threads' decisions as `p` says (the default is KVM's
    /// today): on the MMU now, and on the nested MMU, now or when it is
    /// made.
    pub fn set_policies(&self, p: super::Policies) {
        *self.policies.lock() = p;
        match &self.mmu {
            Mmu::Tdp(t) => p.apply_tdp(t, &self.host),
            Mmu::Shadow(s) => {
                set_shadow_policies(s, &p);
                self.host.set_walk_policy(p.host_walk, p.check_host_walks);
            }
        }
        if let Some(n) = self.nested.get() {
            set_shadow_policies(n, &p);
        }
    }

    /// The nested MMU of a TDP machine whose guest is an L1 hypervisor
    /// ([`crate::vm::Vm::nested_mmu`]): created at the first call. `None`
    /// under the shadow MMU (KVM shadows L1's nested tables on a TDP host
    /// only, as vmmu does) or with the dirty ring on (its pages reach the
    /// memslot bitmap only).
    pub fn nested_mmu(&self) -> Option<Arc<crate::mmu::shadow::ShadowMmu>> {
        let Mmu::Tdp(tdp) = &self.mmu else { return None };
        if self.config.dirty_ring != 0 {
            return None;
        }
        Some(
            self.nested
                .get_or_init(|| {
                    let nested = super::nested_mmu_of(&self.host, &self.slots, tdp);
                    // KVM_SET_NR_MMU_PAGES limits every shadow page of the
                    // VM: on a TDP VM, the nested MMU's.
                    if self.config.mmu_pages != 0 {
                        nested.set_max_pages(self.config.mmu_pages);
                    }
                    set_shadow_policies(&nested, &self.policies.lock());
                    nested
                })
                .clone(),
        )
    }

    /// A vCPU of an L2 guest tagged `vpid`, running under L1's nested
    /// paging `l1` on the nested MMU; `None` where there is none
    /// ([`Machine::nested_mmu`]).
    pub fn nested_vcpu(&self, vpid: u16, l1: crate::cpu::vcpu::L1Nested) -> Option<Vcpu> {
        let mmu = self.nested_mmu()?;
        Some(Vcpu::new_nested(mmu, self.slots.clone(), self.features, vpid, l1))
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

    /// Which MMU it runs.
    pub fn kind(&self) -> MmuKind {
        self.mmu.kind()
    }

    /// The MMU.
    pub fn mmu(&self) -> &Mmu {
        &self.mmu
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
        let mut v = self.mmu.vcpu(&self.slots, self.features, vpid)?;
        if let Some(ring) = v.dirty_ring() {
            self.rings.state.lock().rings.push((ring.clone(), 0));
        }
        v.set_state(regs, cr3, 0)?;
        Ok(v)
    }

    /// The MMU's counters.
    pub fn stats(&self) -> MmuStatsSnapshot {
        self.mmu.stats()
    }

    /// The nested MMU's counters, once it exists.
    pub fn nested_stats(&self) -> Option<MmuStatsSnapshot> {
        self.nested.get().map(|n| n.stats().snapshot())
    }

    /// Bytes of page-table memory the MMU (and the nested MMU) hold now.
    pub fn mmu_bytes(&self) -> u64 {
        self.mmu.bytes() + self.nested.get().map_or(0, |n| n.page_count() as u64 * 4096)
    }

    /// The most page-table memory the MMU held at once, in bytes.
    pub fn mmu_peak_bytes(&self) -> u64 {
        self.mmu.peak_bytes() + self.nested.get().map_or(0, |n| n.peak_page_count() as u64 * 4096)
    }

    /// Sets the shadow MMU's page limit (KVM's `KVM_SET_NR_MMU_PAGES`);
    /// returns the limit set. The TDP MMU has no such limit.
    pub fn set_mmu_pages(&self, pages: u64) -> Option<u64> {
        self.mmu.set_max_pages(pages)
    }

    /// The page-table memory the MMU (and the nested MMU) may hold, in
    /// bytes, with `vcpus` vCPUs ([`Mmu::limit_bytes`]).
    pub fn mmu_limit_bytes(&self, vcpus: u64) -> u64 {
        // The nested MMU's own page limit (KVM's, 2% of the memory), with
        // the roots each vCPU may pin on top, as for a shadow MMU.
        let nested = self.nested.get().map_or(0, |n| {
            let roots = vcpus * (1 + crate::cpu::vcpu::NESTED_PREV_ROOTS as u64) * 5;
            (n.max_pages() + roots) * 4096
        });
        self.mmu.limit_bytes(&self.slots, vcpus) + nested
    }

    /// Shadow pages and unsync shadow pages now (0 on the TDP MMU).
    pub fn shadow_pages(&self) -> (u64, u64) {
        self.mmu.shadow_pages()
    }

    /// One harvest of guest RAM's (memslot 0's) dirty pages, by the
    /// protocol of the configuration ([`DirtyProtocol`]): the gfns written
    /// since the last harvest, protected again when this returns, so a
    /// copy made afterwards holds every write made before.
    pub fn harvest_dirty(&self) -> Result<Vec<u64>, MemslotError> {
        Ok(match self.config.dirty_protocol() {
            DirtyProtocol::Get => bitmap_pages(&self.mmu.get_dirty_log(0, 0)?),
            DirtyProtocol::GetClear => {
                let bits = self.mmu.get_dirty_log(0, 0)?;
                self.mmu.clear_dirty_log(0, 0, 0, &bits)?;
                bitmap_pages(&bits)
            }
            DirtyProtocol::Ring => self.rings.take(),
        })
    }

    /// What the MMU maps `gfn` with now (for a violation's report).
    pub fn describe_gfn(&self, gfn: Gfn) -> String {
        self.mmu.describe_gfn(gfn)
    }

    /// Zaps every SPTE ([`Mmu::zap_all`]), the nested MMU's too (KVM's
    /// `kvm_mmu_zap_all_fast` takes the shadow pages of nested guests
    /// with the rest).
    pub fn zap_all(&self) {
        self.mmu.zap_all();
        if let Some(n) = self.nested.get() {
            n.zap_all();
        }
    }

    /// The MMU's audit ([`Mmu::audit`]), and the nested MMU's. Empty when
    /// all is right.
    pub fn audit(&self) -> Vec<String> {
        let mut v = self.mmu.audit();
        if let Some(n) = self.nested.get() {
            v.extend(n.audit().into_iter().map(|v| format!("nested MMU: {v}")));
        }
        v
    }
}

/// The policies of [`super::Policies`] a shadow MMU (the VM's, or a TDP
/// VM's nested MMU) has.
fn set_shadow_policies(s: &crate::mmu::shadow::ShadowMmu, p: &super::Policies) {
    s.set_prev_roots_match(p.prev_roots_match);
    s.set_unsync_policy(p.sync_roots_check, p.unsync_levels);
    s.set_zap_request(p.zap_request);
    s.invalidate_state().set_host_mapping_use(p.host_mapping_use);
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
