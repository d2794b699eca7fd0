//! The MMUs and what they share: the SPTE format ([`spte`]), the walk
//! cursor over SPTE tables in host frames ([`iter`]), remote TLB flushes
//! and flush obligations ([`flush`]), KVM-named counters ([`stats`]), the
//! TDP MMU ([`tdp`]) and the shadow MMU ([`shadow`], being built).

pub mod flush;
pub mod iter;
pub mod shadow;
pub mod spte;
pub mod stats;
pub mod tdp;
