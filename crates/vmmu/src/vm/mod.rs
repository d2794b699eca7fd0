//! A VM assembled from the layers: host memory, memslots and an MMU (TDP or
//! shadow), with vCPUs on top, and its configuration ([`config`]): what an
//! embedder, the simulator, the benchmarks and the tests build.

pub mod config;
pub mod machine;

pub use config::{DirtyProtocol, VmConfig};
pub use machine::{Machine, MmuKind};

use std::sync::Arc;

use crate::addr::{Gpa, Hva};
use crate::arch::control::CpuFeatures;
use crate::cpu::vcpu::{Vcpu, VcpuError};
use crate::mem::{
    FrameArena, GuestMemory, HostAddressSpace, MemoryRegion, MemslotConfig, MemslotFlags, MemslotTable, VmaFlags,
};
use crate::mmu::shadow::ShadowMmu;
use crate::mmu::tdp::{TdpConfig, TdpMmu};
use crate::walker::ControlRegs;

/// One VM: a host address space, memslots, and a TDP MMU over them.
#[derive(Debug)]
pub struct Vm {
    /// The host's view (the VMM process's address space).
    pub host: Arc<HostAddressSpace>,
    /// The memslots.
    pub slots: Arc<MemslotTable>,
    /// The MMU.
    pub mmu: Arc<TdpMmu>,
}

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

impl Vm {
    /// A VM whose guest-physical `0..ram` is memslot 0, backed by an
    /// anonymous host mapping at `hva` with `flags`, and a TDP MMU with
    /// `config`. The frame arena reserves room for twice the RAM.
    pub fn new(ram: u64, hva: Hva, flags: VmaFlags, config: TdpConfig) -> Result<Vm, VmError> {
        Vm::with_memslots(ram, hva, flags, config, MemslotConfig::default())
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
        let (host, slots) = memory(ram, hva, flags, memslots)?;
        let mmu = TdpMmu::new(host.clone(), slots.clone(), config);
        Ok(Vm { host, slots, mmu })
    }

    /// The same host and memslots with another TDP MMU (the old one stops
    /// receiving events once dropped).
    pub fn with_mmu(self, config: TdpConfig) -> Vm {
        let mmu = TdpMmu::new(self.host.clone(), self.slots.clone(), config);
        Vm { mmu, ..self }
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

/// The host memory and memslots of a VM: guest-physical `0..ram` is
/// memslot 0, backed by an anonymous host mapping at `hva` with `flags`.
/// The frame arena reserves room for twice the RAM plus the MMU's tables.
fn memory(
    ram: u64,
    hva: Hva,
    flags: VmaFlags,
    memslots: MemslotConfig,
) -> Result<(Arc<HostAddressSpace>, Arc<MemslotTable>), VmError> {
    let err = |e: &dyn std::fmt::Display| VmError(e.to_string());
    let arena = Arc::new(FrameArena::with_reserve(2 * ram + (64 << 20)).map_err(|e| err(&e))?);
    let host = Arc::new(HostAddressSpace::new(arena).map_err(|e| err(&e))?);
    host.mmap(hva, ram, flags).map_err(|e| err(&e))?;
    let slots = Arc::new(MemslotTable::new(memslots));
    slots
        .create(MemoryRegion {
            as_id: 0,
            id: 0,
            flags: MemslotFlags::empty(),
            guest_phys_addr: Gpa::new(0),
            memory_size: ram,
            userspace_addr: hva,
        })
        .map_err(|e| err(&e))?;
    Ok((host, slots))
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
        ShadowVm::with_memslots(ram, hva, flags, MemslotConfig::default())
    }

    /// As [`ShadowVm::new`], with VM-wide memslot settings.
    pub fn with_memslots(ram: u64, hva: Hva, flags: VmaFlags, memslots: MemslotConfig) -> Result<ShadowVm, VmError> {
        let (host, slots) = memory(ram, hva, flags, memslots)?;
        let mmu = ShadowMmu::new(host.clone(), slots.clone());
        Ok(ShadowVm { host, slots, mmu })
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
