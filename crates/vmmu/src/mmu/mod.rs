//! The MMUs and what they share: the SPTE format ([`spte`]), the walk
//! cursor over SPTE tables in host frames ([`iter`]), remote TLB flushes
//! and flush obligations ([`flush`]), frames set aside for page tables
//! before `mmu_lock` ([`cache`]), KVM-named counters ([`stats`]), the TDP
//! MMU ([`tdp`]), the shadow MMU ([`shadow`]), and the gfn write tracking
//! between them ([`track`]).

pub mod cache;
pub mod flush;
pub mod iter;
pub mod shadow;
pub mod spte;
pub mod stats;
pub mod tdp;
pub mod track;
