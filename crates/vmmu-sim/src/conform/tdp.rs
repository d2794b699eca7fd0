//! Replay through a one-vCPU VM on the TDP or the shadow MMU: every access
//! goes through the vCPU's TLB and the hardware model's walk (two-
//! dimensional through EPT, or of the shadow tables); exits go to the MMU;
//! the guest's stores to its page tables are guest writes (trapped and
//! emulated by the shadow MMU).

use super::{Case, Failure, Hex, Outcome, Replayer, StepMachine, case_features, case_regs, replay};
use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::Vendor;
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::arch::pfec::GP_VECTOR;
use vmmu::cpu::vcpu::{AccessResult, GuestFault, Vcpu};
use vmmu::host::VmaFlags;
use vmmu::mem::GuestMemory;
use vmmu::mmu::tdp::TdpConfig;

/// Guest memory backed by a memslot: the cases' paging structures all lie
/// below it; every other gpa is MMIO (reads as zero).
const RAM: u64 = 64 << 20;
const RAM_HVA: u64 = 0x7000_0000;

/// Replays cases on the TDP MMU, building the tables of `vendor` (EPT on
/// Intel, NPT on AMD) and walking them as that vendor's hardware does.
#[derive(Debug, Default)]
pub struct TdpReplayer {
    /// Whose tables.
    pub vendor: Vendor,
}

/// The path each replay takes: the shadow MMU, or the TDP MMU of a vendor.
#[derive(Clone, Copy)]
enum Path {
    Shadow,
    Tdp(Vendor),
}

/// Replays cases on the shadow MMU.
#[derive(Debug, Default)]
pub struct ShadowReplayer;

struct Vm {
    mem: GuestMemory,
    vcpu: Vcpu,
    access_size: usize,
}

fn vm(case: &Case, path: Path) -> Result<Vm, String> {
    let control = match case {
        Case::Single(c) => &c.control,
        Case::Steps(c) => &c.control,
        Case::Npt(_) | Case::Ept(_) => {
            return Err("a nested-paging case, which only the two-dimensional walk replays (--mmu walker)".to_string());
        }
    };
    let (mem, vcpu) = if let Path::Tdp(vendor) = path {
        let config = TdpConfig {
            vendor,
            ..TdpConfig::default()
        };
        let vm = vmmu::vm::Vm::new(RAM, Hva::new(RAM_HVA), VmaFlags::WRITE, config).map_err(|e| e.to_string())?;
        let vcpu = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), case_features(control), 1).map_err(|e| e.to_string())?;
        (vm.memory(), vcpu)
    } else {
        let vm = vmmu::vm::ShadowVm::new(RAM, Hva::new(RAM_HVA), VmaFlags::WRITE).map_err(|e| e.to_string())?;
        let vcpu = Vcpu::new_shadow(vm.mmu.clone(), vm.slots.clone(), case_features(control), 1);
        (vm.memory(), vcpu)
    };
    Ok(Vm {
        mem,
        vcpu,
        access_size: control.mode.access_size(),
    })
}

fn outcome(r: AccessResult) -> Result<Outcome, String> {
    Ok(match r {
        AccessResult::Done { gpa, .. } => Outcome {
            fault: false,
            vector: None,
            error_code: None,
            pa: Some(Hex(gpa.raw())),
        },
        AccessResult::Fault(GuestFault::PageFault { error_code, .. }) => Outcome {
            fault: true,
            vector: Some(14),
            error_code: Some(error_code.bits()),
            pa: None,
        },
        AccessResult::Fault(GuestFault::GeneralProtection) => Outcome {
            fault: true,
            vector: Some(GP_VECTOR),
            error_code: Some(0),
            pa: None,
        },
        AccessResult::DirtyRingFull => return Err(NO_RING.to_string()),
        AccessResult::VmExit(e) => return Err(format!("an exit to an L1 hypervisor, where there is none: {e:?}")),
    })
}

/// Conformance VMs never enable the dirty ring.
const NO_RING: &str = "unexpected dirty-ring-full exit (the dirty ring is not enabled)";

impl StepMachine for Vm {
    fn access(&mut self, va: u64, kind: AccessKind, cpl: u8, ac: bool, value: u64) -> Result<Outcome, String> {
        let r = self
            .vcpu
            .access(Gva::new(va), Access::new(kind, cpl, ac), self.access_size, value)
            .map_err(|e| e.to_string())?;
        outcome(r)
    }
    fn store(&mut self, va: u64, size: usize, value: u64) -> Result<(), String> {
        match self
            .vcpu
            .access(Gva::new(va), Access::new(AccessKind::Write, 0, false), size, value)
        {
            Ok(AccessResult::Done { .. }) => Ok(()),
            Ok(AccessResult::Fault(f)) => Err(format!("the kernel's store faulted: {f:?}")),
            Ok(AccessResult::DirtyRingFull) => Err(NO_RING.to_string()),
            Ok(AccessResult::VmExit(e)) => Err(format!("an exit to an L1 hypervisor, where there is none: {e:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
    fn invlpg(&mut self, va: u64) {
        self.vcpu.invlpg(Gva::new(va));
    }
    fn mov_cr3(&mut self, value: u64) -> Result<(), String> {
        self.vcpu.mov_cr3(value).map_err(|e| e.to_string())
    }
    fn set_cr0_wp(&mut self, wp: bool) {
        self.vcpu.set_cr0_wp(wp);
    }
    fn set_cr4(&mut self, smep: Option<bool>, smap: Option<bool>, pge: Option<bool>) {
        self.vcpu.set_cr4_bits(smep, smap, pge);
    }
    fn invpcid(&mut self, kind: u8, pcid: u16, va: u64) {
        self.vcpu.invpcid(kind, pcid, Gva::new(va));
    }
    fn read_entry(&self, pa: u64, size: usize) -> u64 {
        // An unreadable entry cannot match any expected value.
        self.mem.read_value(Gpa::new(pa), size).unwrap_or(u64::MAX)
    }
}

impl Replayer for TdpReplayer {
    fn name(&self) -> &'static str {
        "tdp"
    }

    fn replay(&mut self, case: &Case) -> Result<(), Failure> {
        replay_on(case, Path::Tdp(self.vendor))
    }
}

impl Replayer for ShadowReplayer {
    fn name(&self) -> &'static str {
        "shadow"
    }

    fn replay(&mut self, case: &Case) -> Result<(), Failure> {
        replay_on(case, Path::Shadow)
    }
}

fn replay_on(case: &Case, path: Path) -> Result<(), Failure> {
    let id = case.id();
    let fail = |what: String| Failure {
        id,
        expected: "the replay to run".to_string(),
        got: what,
    };
    let mut vm = vm(case, path).map_err(fail)?;
    let (control, memory) = match case {
        Case::Single(c) => (&c.control, &c.memory),
        Case::Steps(c) => (&c.control, &c.memory),
        Case::Npt(_) | Case::Ept(_) => unreachable!("vm() refused a nested case"),
    };
    let esize = control.mode.entry_size();
    for e in memory {
        vm.mem
            .write_value(Gpa::new(e.pa.0), esize, e.value.0)
            .map_err(|e| fail(e.to_string()))?;
    }
    vm.vcpu
        .set_state(case_regs(control), control.cr3.0, control.pkru.0 as u32)
        .map_err(|e| fail(e.to_string()))?;
    replay(&mut vm, case)
}
