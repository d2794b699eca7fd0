//! The MMUs and what they share: the SPTE format ([`spte`]), the walk
//! cursor over SPTE tables in host frames ([`iter`]), remote TLB flushes
//! and flush obligations ([`flush`]), KVM-named counters ([`stats`]), and
//! the TDP MMU ([`tdp`]).

pub mod flush;
pub mod iter;
pub mod spte;
pub mod stats;
pub mod tdp;
