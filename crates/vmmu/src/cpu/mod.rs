//! The vCPU and the hardware model: the TLB ([`tlb`]), the hardware walker
//! over the MMU's tables ([`hw`]), and the vCPU ([`vcpu`]).

pub mod hw;
pub mod tlb;
pub mod vcpu;
