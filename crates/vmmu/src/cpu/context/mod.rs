//! The per-vCPU MMU context (KVM's `struct kvm_mmu`): what a vCPU keeps of
//! the MMU it runs on, and the one interface its access loop calls.
//!
//! A context owns the vCPU's roots (the TDP root, or the shadow roots with
//! `prev_roots` and the pending syncs), its memory caches, and the entry
//! points of everything the guest and the hardware hand to the MMU: the
//! guest's TLB invalidations (MOV CR3, INVLPG, INVPCID, a CR4.PGE toggle,
//! [`GuestFlush`]), the root reload after a register change or a zap, one
//! try of an access by the hardware that MMU programs (the two-dimensional
//! walk through EPT, or the one-dimensional walk of the shadow tables), and
//! the exit that try may end in. The vCPU ([`super::vcpu`]) keeps the
//! architectural state, the TLB and the access loop ([`CpuState`]), and
//! knows no MMU by name.
//!
//! [`VcpuMmu`] is the interface; [`MmuContext`] dispatches it statically
//! over the MMUs there are (an enum, not a trait object: the access loop's
//! fast path asks the context whether anything is pending before every TLB
//! hit, and one inlined match on a two-variant enum is cheaper there than a
//! virtual call). Another MMU kind is another variant here and an implementation of
//! [`VcpuMmu`]; the access loop does not change.

use std::sync::Arc;

use super::state::{AccessResult, CpuState, VcpuError};
use super::tlb::{Flush, TlbEntry};
use crate::addr::{Gpa, Gva, Pfn};
use crate::arch::perm::Access;
use crate::host::FrameArena;
use crate::mem::DirtyRing;
use crate::mmu::flush::RemoteTlb;
use crate::mmu::tdp::RootRef;
use crate::walker::nested::NestedFault;

mod nested;
mod roots;
mod shadow;
mod tdp;

pub(crate) use nested::NestedContext;
pub use nested::{L1Invalidation, L1Nested, L1Npt, NESTED_PREV_ROOTS};
pub use shadow::PREV_ROOTS;
pub(crate) use shadow::ShadowContext;
pub(crate) use tdp::TdpContext;

/// A guest TLB invalidation the MMU may have to answer (on the shadow MMU,
/// with a sync of the unsync pages it covers: KVM's `KVM_REQ_MMU_SYNC`,
/// `KVM_REQ_TLB_FLUSH_GUEST` and `kvm_mmu_invalidate_addr`). The TLB itself
/// has been flushed by the vCPU already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GuestFlush {
    /// A MOV CR3 that flushes (no PCID no-flush bit): the current roots.
    Cr3,
    /// One address (INVLPG: in every root; INVPCID type 0: in the roots of
    /// one PCID).
    Addr {
        /// The linear address.
        va: Gva,
        /// The PCID whose roots, or every root.
        pcid: Option<u16>,
    },
    /// Everything of one PCID (INVPCID type 1).
    Pcid(u16),
    /// Everything, cached roots too (INVPCID types 2 and 3, a CR4.PGE
    /// toggle).
    All,
}

/// Why one try of an access left guest mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// A TDP exit (an EPT violation or misconfiguration, or a #NPF);
    /// `final_gpa` is set when the final translation exited.
    Tdp {
        /// The exit.
        exit: NestedFault,
        /// The guest-physical address of the access, when the walk of the
        /// guest's tables completed.
        final_gpa: Option<Gpa>,
    },
    /// The hardware walk of the shadow tables faulted: a #PF the shadow
    /// MMU intercepts.
    ShadowPageFault,
}

impl Exit {
    /// The TDP exit, if it is one.
    pub(crate) fn tdp(&self) -> Option<NestedFault> {
        match self {
            Exit::Tdp { exit, .. } => Some(*exit),
            Exit::ShadowPageFault => None,
        }
    }
}

/// How one try of an access ended.
pub(crate) enum Attempt {
    /// The access completed or the guest takes a fault.
    Done(AccessResult),
    /// The vCPU exited to the MMU.
    Exit(Exit),
}

/// What the MMU made of an exit.
pub(crate) enum ExitAnswer {
    /// The access ends (a fault for the guest, MMIO, an emulated write).
    Done(AccessResult),
    /// The MMU fixed what the hardware faulted on (or found it right
    /// already): the access is retried, and should now complete.
    Fixed,
    /// A race, an invalidation, a write-protected table unprotected: the
    /// access is retried.
    Retry,
}

/// What the vCPU's access loop asks of the MMU it runs on (see the module
/// documentation). Methods that take a [`CpuState`] may read the
/// registers and flush the TLB; outside [`VcpuMmu::attempt`] they run
/// outside guest mode (and may take `mmu_lock`).
pub(crate) trait VcpuMmu {
    /// The MMU's name in reports (`"TDP"`, `"shadow"`).
    fn name(&self) -> &'static str;
    /// The host frames the MMU's tables and the guest's memory live in.
    fn arena(&self) -> &Arc<FrameArena>;
    /// The MMU's remote-flush protocol, which the vCPU takes part in.
    fn remote_tlb(&self) -> &RemoteTlb;
    /// What a remote flush of this MMU removes from the vCPU's TLB.
    fn remote_flush(&self, vpid: u16) -> Flush;
    /// The EPTP part of the TLB tag (0 without EPT).
    fn eptp(&self) -> u64;
    /// Whether the MMU dropped roots since the vCPU last reloaded.
    fn roots_changed(&self) -> bool;
    /// The address the TLB is looked up with for `gva`, if the access may
    /// take the fast path: nothing pending for the MMU's sake (no root
    /// dropped, no full dirty ring to exit for) and no remote flush the
    /// vCPU has not seen. One call, so that the fast path dispatches once.
    fn fast_path_va(&self, cpu: &CpuState, gva: Gva) -> Option<u64>;
    /// The vCPU's dirty ring, when the MMU logs into rings.
    fn dirty_ring(&self) -> Option<&Arc<DirtyRing>>;
    /// The TDP root the vCPU runs on, on the TDP MMU.
    fn tdp_root(&self) -> Option<&RootRef>;
    /// The frame the hardware's shadow walk starts from, on the shadow
    /// MMU once roots are loaded.
    fn shadow_root(&self) -> Option<Pfn>;
    /// Records a guest TLB invalidation to answer before the next access.
    fn guest_flush(&mut self, flush: GuestFlush);
    /// Runs before a MOV CR3 changes CR3: answers what the previous
    /// instruction asked of the current roots.
    fn before_cr3_load(&mut self, cpu: &mut CpuState) -> Result<(), VcpuError>;
    /// Loads the PAE PDPTE registers from guest memory at `base`, as the
    /// hardware does at a MOV CR3 in PAE paging.
    fn load_pdptes(&mut self, cpu: &mut CpuState, base: u64) -> Result<(), VcpuError>;
    /// Processes what is pending before an access, outside guest mode:
    /// drops obsolete roots and loads the ones the registers name (KVM's
    /// `kvm_mmu_reload`, `kvm_mmu_new_pgd`), and answers guest flushes.
    fn reload(&mut self, cpu: &mut CpuState) -> Result<(), VcpuError>;
    /// One try of a one-page access in guest mode: the TLB, else the
    /// hardware walk of this MMU's tables. `gva` is as the instruction
    /// gave it.
    fn attempt(&mut self, cpu: &mut CpuState, gva: Gva, access: Access, size: usize, value: u64) -> Attempt;
    /// Handles an exit of [`VcpuMmu::attempt`], outside guest mode.
    fn handle_exit(
        &mut self,
        cpu: &mut CpuState,
        exit: Exit,
        gva: Gva,
        access: Access,
        size: usize,
        value: u64,
    ) -> Result<ExitAnswer, VcpuError>;
    /// Whether the cached translation `e` serves `access` now.
    fn check(&self, cpu: &CpuState, access: Access, e: &TlbEntry) -> bool;
    /// A string instruction's stores are being made (`rep stos`), which
    /// KVM does not consider page-table writes.
    fn set_string_op(&mut self, on: bool);
    /// Gives back the vCPU's roots (the vCPU is going away).
    fn release(&mut self);
}

/// The context of the MMU a vCPU runs on.
// One per vCPU, built once and never moved on a hot path: the size
// difference costs nothing, a box would cost an indirection per access.
#[allow(clippy::large_enum_variant)]
pub(crate) enum MmuContext {
    /// On the TDP MMU.
    Tdp(TdpContext),
    /// On the shadow MMU.
    Shadow(ShadowContext),
    /// An L2 guest's vCPU on the nested MMU.
    Nested(NestedContext),
}

/// Calls `$call` on the context, whichever MMU it is.
macro_rules! dispatch {
    ($self:expr, $c:ident => $call:expr) => {
        match $self {
            MmuContext::Tdp($c) => $call,
            MmuContext::Shadow($c) => $call,
            MmuContext::Nested($c) => $call,
        }
    };
}

impl VcpuMmu for MmuContext {
    #[inline]
    fn name(&self) -> &'static str {
        dispatch!(self, c => c.name())
    }
    #[inline]
    fn arena(&self) -> &Arc<FrameArena> {
        dispatch!(self, c => c.arena())
    }
    #[inline]
    fn remote_tlb(&self) -> &RemoteTlb {
        dispatch!(self, c => c.remote_tlb())
    }
    #[inline]
    fn remote_flush(&self, vpid: u16) -> Flush {
        dispatch!(self, c => c.remote_flush(vpid))
    }
    #[inline]
    fn eptp(&self) -> u64 {
        dispatch!(self, c => c.eptp())
    }
    #[inline]
    fn roots_changed(&self) -> bool {
        dispatch!(self, c => c.roots_changed())
    }
    #[inline]
    fn fast_path_va(&self, cpu: &CpuState, gva: Gva) -> Option<u64> {
        dispatch!(self, c => c.fast_path_va(cpu, gva))
    }
    #[inline]
    fn dirty_ring(&self) -> Option<&Arc<DirtyRing>> {
        dispatch!(self, c => c.dirty_ring())
    }
    fn tdp_root(&self) -> Option<&RootRef> {
        dispatch!(self, c => c.tdp_root())
    }
    fn shadow_root(&self) -> Option<Pfn> {
        dispatch!(self, c => c.shadow_root())
    }
    fn guest_flush(&mut self, flush: GuestFlush) {
        dispatch!(self, c => c.guest_flush(flush))
    }
    fn before_cr3_load(&mut self, cpu: &mut CpuState) -> Result<(), VcpuError> {
        dispatch!(self, c => c.before_cr3_load(cpu))
    }
    fn load_pdptes(&mut self, cpu: &mut CpuState, base: u64) -> Result<(), VcpuError> {
        dispatch!(self, c => c.load_pdptes(cpu, base))
    }
    fn reload(&mut self, cpu: &mut CpuState) -> Result<(), VcpuError> {
        dispatch!(self, c => c.reload(cpu))
    }
    #[inline]
    fn attempt(&mut self, cpu: &mut CpuState, gva: Gva, access: Access, size: usize, value: u64) -> Attempt {
        dispatch!(self, c => c.attempt(cpu, gva, access, size, value))
    }
    fn handle_exit(
        &mut self,
        cpu: &mut CpuState,
        exit: Exit,
        gva: Gva,
        access: Access,
        size: usize,
        value: u64,
    ) -> Result<ExitAnswer, VcpuError> {
        dispatch!(self, c => c.handle_exit(cpu, exit, gva, access, size, value))
    }
    #[inline]
    fn check(&self, cpu: &CpuState, access: Access, e: &TlbEntry) -> bool {
        dispatch!(self, c => c.check(cpu, access, e))
    }
    fn set_string_op(&mut self, on: bool) {
        dispatch!(self, c => c.set_string_op(on))
    }
    fn release(&mut self) {
        dispatch!(self, c => c.release())
    }
}

/// Whether the translation `e` a two-dimensional walk cached (TDP, or L2
/// on the nested MMU) serves `access` now: the guest's paging rules, with
/// the second dimension's execute right folded into the entry's rights
/// and its write right (and D bit) into `dirty`.
#[inline]
pub(crate) fn check_2d(cpu: &CpuState, access: Access, e: &TlbEntry) -> bool {
    // Without guest paging the second dimension still applies (EXEC).
    let allowed = cpu.paging.check_access(access, e.rights, e.pkey, cpu.pkru).is_none();
    allowed && (!access.is_write() || e.dirty)
}
