//! Replay through a one-vCPU VM on the TDP MMU: every access goes through
//! the vCPU's TLB and the hardware model's two-dimensional walk; EPT exits
//! go to the MMU; the guest's stores to its page tables are guest writes.

use super::{
    Case, Failure, Hex, Outcome, Replayer, Step, case_features, case_regs, check_after, check_final, check_outcome,
};
use crate::addr::{Gpa, Hva};
use crate::arch::perm::AccessKind;
use crate::arch::pfec::GP_VECTOR;
use crate::cpu::vcpu::{AccessResult, GuestFault, Vcpu};
use crate::mem::{GuestMemory, VmaFlags};
use crate::mmu::tdp::TdpConfig;

/// Guest memory backed by a memslot: the cases' paging structures all lie
/// below it; every other gpa is MMIO (reads as zero).
const RAM: u64 = 64 << 20;
const RAM_HVA: u64 = 0x7000_0000;

/// Replays cases on the TDP MMU.
#[derive(Debug, Default)]
pub struct TdpReplayer;

struct Vm {
    mem: GuestMemory,
    vcpu: Vcpu,
}

fn vm(case: &Case) -> Result<Vm, String> {
    let control = match case {
        Case::Single(c) => &c.control,
        Case::Steps(c) => &c.control,
    };
    let vm = crate::sim::vm::Vm::new(RAM, Hva::new(RAM_HVA), VmaFlags::WRITE, TdpConfig::default())
        .map_err(|e| e.to_string())?;
    let vcpu = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), case_features(control), 1).map_err(|e| e.to_string())?;
    Ok(Vm { mem: vm.memory(), vcpu })
}

fn outcome(r: AccessResult) -> Outcome {
    match r {
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
    }
}

fn fail(id: u64, what: impl std::fmt::Display) -> Failure {
    Failure {
        id,
        expected: "the replay to run".to_string(),
        got: what.to_string(),
    }
}

impl Replayer for TdpReplayer {
    fn name(&self) -> &'static str {
        "tdp"
    }

    fn replay(&mut self, case: &Case) -> Result<(), Failure> {
        let id = case.id();
        let mut vm = vm(case).map_err(|e| fail(id, e))?;
        let (control, memory) = match case {
            Case::Single(c) => (&c.control, &c.memory),
            Case::Steps(c) => (&c.control, &c.memory),
        };
        let esize = control.mode.entry_size();
        let asize = control.mode.access_size();
        for e in memory {
            vm.mem
                .write_value(Gpa::new(e.pa.0), esize, e.value.0)
                .map_err(|e| fail(id, e))?;
        }
        vm.vcpu
            .set_state(case_regs(control), control.cr3.0, control.pkru.0 as u32)
            .map_err(|e| fail(id, e))?;
        let read = |mem: &GuestMemory, pa: u64| mem.read_value(Gpa::new(pa), esize).unwrap_or(u64::MAX);
        match case {
            Case::Single(c) => {
                let r = vm
                    .vcpu
                    .access(c.va.0, c.access.into(), c.cpl, c.rflags_ac, asize, 0)
                    .map_err(|e| fail(id, e))?;
                check_outcome(id, None, &c.result, &outcome(r))?;
                check_after(c, |pa| read(&vm.mem, pa))
            }
            Case::Steps(c) => {
                for (i, step) in c.steps.iter().enumerate() {
                    match step {
                        Step::Access {
                            cpl,
                            rflags_ac,
                            access,
                            va,
                            value,
                            expect,
                        } => {
                            let v = value.map_or(0, |v| v.0);
                            let r = vm
                                .vcpu
                                .access(va.0, (*access).into(), *cpl, *rflags_ac, asize, v)
                                .map_err(|e| fail(id, format!("step {i}: {e}")))?;
                            check_outcome(id, Some(i), expect, &outcome(r))?;
                        }
                        Step::Store { va, value, size } => {
                            let r = vm
                                .vcpu
                                .access(va.0, AccessKind::Write, 0, false, *size as usize, value.0)
                                .map_err(|e| fail(id, format!("step {i}: {e}")))?;
                            if let AccessResult::Fault(f) = r {
                                return Err(fail(id, format!("step {i}: the kernel's store faulted: {f:?}")));
                            }
                        }
                        Step::Invlpg { va } => vm.vcpu.invlpg(va.0),
                        Step::MovCr3 { value } => vm.vcpu.mov_cr3(value.0).map_err(|e| fail(id, e))?,
                        Step::SetCr0Wp { value } => vm.vcpu.set_cr0_wp(*value),
                        Step::SetCr4 { smep, smap, pge } => vm.vcpu.set_cr4_bits(*smep, *smap, *pge),
                        Step::Invpcid { kind, pcid, va } => vm.vcpu.invpcid(*kind, *pcid, va.0),
                    }
                }
                check_final(c, |pa| read(&vm.mem, pa))
            }
        }
    }
}
