//! The vCPU and the hardware model: the TLB ([`tlb`]), the hardware walker
//! over the MMU's tables ([`hw`]), and the vCPU ([`vcpu`]): its
//! architectural state and access loop, and the per-vCPU context of the
//! MMU it runs on (`context`, KVM's `struct kvm_mmu`).

mod context;
pub mod hw;
mod state;
pub mod tlb;
pub mod vcpu;
