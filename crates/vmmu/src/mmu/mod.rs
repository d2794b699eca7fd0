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

/// What a vCPU drops when the MMU asks it to because roots were zapped:
/// seed 003's question, a runtime policy of the vCPU's root handling, set
/// on the MMU the vCPU runs on ([`tdp::TdpMmu::set_zap_request`],
/// [`shadow::ShadowMmu::set_zap_request`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ZapRequest {
    /// Only the roots that are obsolete, current or cached (KVM's
    /// `KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`, since the thread): a zapped
    /// root of one address space leaves the others' cached roots alone.
    #[default]
    FreeObsolete,
    /// Every root, current and cached, valid or not (KVM's
    /// `KVM_REQ_MMU_RELOAD` before the thread: `kvm_mmu_unload`); the
    /// next switch to any address space rebuilds its tree.
    ReloadAll,
}
