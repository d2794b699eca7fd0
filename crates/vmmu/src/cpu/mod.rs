//! The vCPU and the hardware model. Today: the TLB ([`tlb`]).

pub mod tlb;
