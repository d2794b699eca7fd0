//! A VM assembled from the layers: host memory, memslots and an MMU (TDP or
//! shadow), with vCPUs on top, and its configuration ([`config`]): what an
//! embedder, the simulator, the benchmarks and the tests build.
//!
//! [`VmBuilder`] is the one place that assembles a VM: the frame arena, the
//! host address space with guest RAM mapped in it, the memslot table with
//! RAM's memslots, and the MMU. It builds a VM on either MMU
//! ([`VmBuilder::build`], a [`Machine`], whose [`Mmu`] names both), or one
//! on a given MMU, to use that MMU's own interface ([`VmBuilder::tdp`], a
//! [`Vm`]; [`VmBuilder::shadow`], a [`ShadowVm`]).

pub mod config;
pub mod machine;
mod mmu;
pub mod policy;

pub use config::{DirtyProtocol, VmConfig};
pub use machine::{DirtyRings, Machine, bitmap_pages};
pub use mmu::{Mmu, MmuKind};
pub use policy::{POLICY_KNOBS, Policies, PolicyError, PolicyKnob};

use std::sync::Arc;

use crate::addr::{Gpa, Hva};
use crate::arch::control::CpuFeatures;
use crate::cpu::vcpu::{Vcpu, VcpuError};
use crate::host::{FrameArena, HostAddressSpace, VmaFlags};
use crate::mem::{GuestMemory, MemoryRegion, MemslotConfig, MemslotFlags, MemslotTable};
use crate::mmu::shadow::ShadowMmu;
use crate::mmu::tdp::{TdpConfig, TdpMmu};
use crate::walker::ControlRegs;

/// Where guest RAM is in the VMM's address space unless the builder is
/// told otherwise.
pub const RAM_HVA: u64 = 0x4000_0000;

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the VM: {0}")]
pub struct VmError(String);

impl VmError {
    /// An error with this message.
    pub fn new(message: String) -> VmError {
        VmError(message)
    }
}

/// Assembles a VM (see the module documentation). Guest RAM is
/// guest-physical `0..ram`, memslot 0, backed by an anonymous host mapping
/// at [`RAM_HVA`] with transparent huge pages, unless told otherwise.
#[derive(Clone, Debug)]
pub struct VmBuilder {
    ram: u64,
    hva: Hva,
    flags: VmaFlags,
    memslots: Option<MemslotConfig>,
    aliases: u64,
    reserve: Option<u64>,
}

impl VmBuilder {
    /// A VM with `ram` bytes of guest RAM.
    pub fn new(ram: u64) -> VmBuilder {
        VmBuilder {
            ram,
            hva: Hva::new(RAM_HVA),
            flags: VmaFlags::WRITE | VmaFlags::THP,
            memslots: None,
            aliases: 1,
            reserve: None,
        }
    }

    /// Guest RAM's host mapping starts at `hva`.
    pub fn hva(mut self, hva: Hva) -> VmBuilder {
        self.hva = hva;
        self
    }

    /// Guest RAM's host mapping has `flags` (backing, write permission).
    pub fn flags(mut self, flags: VmaFlags) -> VmBuilder {
        self.flags = flags;
        self
    }

    /// VM-wide memslot settings (by default those of the configuration
    /// [`VmBuilder::build`] is given, else KVM's defaults).
    pub fn memslots(mut self, memslots: MemslotConfig) -> VmBuilder {
        self.memslots = Some(memslots);
        self
    }

    /// `n` memslots (ids `0..n`), memslot `k` at guest-physical
    /// `k * ram`, all backed by the same host range (aliases, as KVM
    /// allows): a large guest-physical space over little host memory.
    pub fn aliases(mut self, n: u64) -> VmBuilder {
        self.aliases = n.max(1);
        self
    }

    /// The frame arena reserves `bytes` of address space (by default room
    /// for twice the RAM and the MMU's tables).
    pub fn reserve(mut self, bytes: u64) -> VmBuilder {
        self.reserve = Some(bytes);
        self
    }

    /// Guest RAM in bytes.
    pub fn ram(&self) -> u64 {
        self.ram
    }

    /// The host memory and memslots.
    fn memory(&self, memslots: MemslotConfig) -> Result<(Arc<HostAddressSpace>, Arc<MemslotTable>), VmError> {
        let err = |e: &dyn std::fmt::Display| VmError(e.to_string());
        let reserve = self.reserve.unwrap_or(2 * self.ram + (64 << 20));
        let arena = Arc::new(FrameArena::with_reserve(reserve).map_err(|e| err(&e))?);
        let host = Arc::new(HostAddressSpace::new(arena).map_err(|e| err(&e))?);
        host.mmap(self.hva, self.ram, self.flags).map_err(|e| err(&e))?;
        let slots = Arc::new(MemslotTable::new(memslots));
        for k in 0..self.aliases {
            slots
                .create(MemoryRegion {
                    as_id: 0,
                    id: k as u16,
                    flags: MemslotFlags::empty(),
                    guest_phys_addr: Gpa::new(k * self.ram),
                    memory_size: self.ram,
                    userspace_addr: self.hva,
                })
                .map_err(|e| VmError(format!("memslot {k}: {e}")))?;
        }
        Ok((host, slots))
    }

    /// A VM on the TDP MMU configured by `config`.
    pub fn tdp(self, config: TdpConfig) -> Result<Vm, VmError> {
        let (host, slots) = self.memory(self.memslots.unwrap_or_default())?;
        let mmu = TdpMmu::new(host.clone(), slots.clone(), config);
        Ok(Vm {
            host,
            slots,
            mmu,
            nested: std::sync::OnceLock::new(),
        })
    }

    /// A VM on the shadow MMU.
    pub fn shadow(self) -> Result<ShadowVm, VmError> {
        let (host, slots) = self.memory(self.memslots.unwrap_or_default())?;
        let mmu = ShadowMmu::new(host.clone(), slots.clone());
        Ok(ShadowVm { host, slots, mmu })
    }

    /// A VM on the MMU `kind`, with every knob of `config` applied (which
    /// the caller checked with [`VmConfig::validate`]): the TDP MMU's
    /// configuration and dirty ring, the shadow MMU's page limit, the
    /// memslot settings.
    pub fn build(self, kind: MmuKind, config: VmConfig) -> Result<Machine, VmError> {
        let ram = self.ram;
        let memslots = self.memslots.unwrap_or(config.memslots());
        let (host, slots) = self.memory(memslots)?;
        let mmu = Mmu::new(kind, &host, &slots, &config)?;
        Ok(Machine::new_from_parts(host, slots, mmu, ram, config))
    }
}

/// One VM on the TDP MMU: a host address space, memslots, and the MMU
/// over them.
#[derive(Debug)]
pub struct Vm {
    /// The host's view (the VMM process's address space).
    pub host: Arc<HostAddressSpace>,
    /// The memslots.
    pub slots: Arc<MemslotTable>,
    /// The MMU.
    pub mmu: Arc<TdpMmu>,
    /// The nested MMU, once an L1 hypervisor runs a guest with nested
    /// paging ([`Vm::nested_mmu`]).
    nested: std::sync::OnceLock<Arc<ShadowMmu>>,
}

/// A nested MMU for the TDP VM of `tdp` over `host` and `slots`, in the
/// vendor's format, linked with the TDP MMU by gfn write tracking.
pub(crate) fn nested_mmu_of(
    host: &Arc<HostAddressSpace>,
    slots: &Arc<MemslotTable>,
    tdp: &Arc<TdpMmu>,
) -> Arc<ShadowMmu> {
    // L0's nested tables are in the vendor's format: EPT02 on Intel,
    // NPT02 (the IA-32e format) on AMD.
    let fmt = match tdp.config().vendor {
        crate::arch::control::Vendor::Intel => crate::mmu::spte::SpteFormat::Ept { ad: true },
        crate::arch::control::Vendor::Amd => crate::mmu::spte::SpteFormat::Legacy,
    };
    let nested = ShadowMmu::with_format(host.clone(), slots.clone(), fmt);
    let protector: Arc<dyn crate::mmu::track::WriteProtector> = tdp.clone();
    nested.add_write_protector(Arc::downgrade(&protector));
    tdp.set_write_tracker(nested.clone());
    nested
}

impl Vm {
    /// The nested MMU (KVM's shadow MMU for an L1 hypervisor's nested
    /// tables), created at the first call: a shadow MMU over the same host
    /// memory and memslots (L1's physical memory), linked with the TDP MMU
    /// by gfn write tracking ([`crate::mmu::track`]) so that L1's writes
    /// to the tables it shadows are trapped. L2 vCPUs run on it
    /// ([`Vcpu::new_nested`]).
    ///
    /// A VM with the dirty ring enabled has no nested MMU yet (its dirty
    /// pages reach the memslot bitmap only): an error says so.
    pub fn nested_mmu(&self) -> Result<Arc<ShadowMmu>, VmError> {
        if let Some(size) = self.mmu.dirty_ring_size() {
            return Err(VmError(format!(
                "the dirty ring ({size} entries) is enabled: a nested MMU logs into the memslot bitmap only, and is not built for the ring"
            )));
        }
        Ok(self
            .nested
            .get_or_init(|| nested_mmu_of(&self.host, &self.slots, &self.mmu))
            .clone())
    }

    /// A VM whose guest-physical `0..ram` is memslot 0, backed by an
    /// anonymous host mapping at `hva` with `flags`, and a TDP MMU with
    /// `config` ([`VmBuilder`] in one line).
    pub fn new(ram: u64, hva: Hva, flags: VmaFlags, config: TdpConfig) -> Result<Vm, VmError> {
        VmBuilder::new(ram).hva(hva).flags(flags).tdp(config)
    }

    /// As [`Vm::new`], with VM-wide memslot settings (manual dirty-log
    /// protection, an initially-set dirty bitmap).
    pub fn with_memslots(
        ram: u64,
        hva: Hva,
        flags: VmaFlags,
        config: TdpConfig,
        memslots: MemslotConfig,
    ) -> Result<Vm, VmError> {
        VmBuilder::new(ram).hva(hva).flags(flags).memslots(memslots).tdp(config)
    }

    /// The same host and memslots with another TDP MMU (the old one stops
    /// receiving events once dropped).
    pub fn with_mmu(self, config: TdpConfig) -> Vm {
        let mmu = TdpMmu::new(self.host.clone(), self.slots.clone(), config);
        Vm {
            mmu,
            nested: std::sync::OnceLock::new(),
            ..self
        }
    }

    /// The VMM's access to guest memory.
    pub fn memory(&self) -> GuestMemory {
        GuestMemory::new(self.host.clone(), self.slots.clone())
    }

    /// A vCPU with `features`, tagged `vpid`, in the state `regs`/`cr3`
    /// (paging off with `ControlRegs::default()`).
    pub fn vcpu(&self, features: CpuFeatures, vpid: u16, regs: ControlRegs, cr3: u64) -> Result<Vcpu, VcpuError> {
        let mut v = Vcpu::new(self.mmu.clone(), self.slots.clone(), features, vpid)?;
        v.set_state(regs, cr3, 0)?;
        Ok(v)
    }
}

/// One VM on the shadow MMU.
#[derive(Debug)]
pub struct ShadowVm {
    /// The host's view.
    pub host: Arc<HostAddressSpace>,
    /// The memslots.
    pub slots: Arc<MemslotTable>,
    /// The MMU.
    pub mmu: Arc<ShadowMmu>,
}

impl ShadowVm {
    /// As [`Vm::new`], with the shadow MMU.
    pub fn new(ram: u64, hva: Hva, flags: VmaFlags) -> Result<ShadowVm, VmError> {
        VmBuilder::new(ram).hva(hva).flags(flags).shadow()
    }

    /// As [`ShadowVm::new`], with VM-wide memslot settings.
    pub fn with_memslots(ram: u64, hva: Hva, flags: VmaFlags, memslots: MemslotConfig) -> Result<ShadowVm, VmError> {
        VmBuilder::new(ram).hva(hva).flags(flags).memslots(memslots).shadow()
    }

    /// The VMM's access to guest memory.
    pub fn memory(&self) -> GuestMemory {
        GuestMemory::new(self.host.clone(), self.slots.clone())
    }

    /// A vCPU with `features`, tagged `vpid`, in the state `regs`/`cr3`.
    pub fn vcpu(&self, features: CpuFeatures, vpid: u16, regs: ControlRegs, cr3: u64) -> Result<Vcpu, VcpuError> {
        let mut v = Vcpu::new_shadow(self.mmu.clone(), self.slots.clone(), features, vpid);
        v.set_state(regs, cr3, 0)?;
        Ok(v)
    }
}
