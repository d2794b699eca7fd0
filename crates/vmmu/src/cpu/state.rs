//! What a vCPU is apart from the MMU it runs on: the architectural state
//! (control registers, CR3, the PAE PDPTE registers, PKRU), the TLB, the
//! guest-mode protocol with the MMU's remote flushes, and the results of an
//! access. The access loop ([`super::vcpu`]) and each MMU's per-vCPU
//! context ([`super::context`]) both work on it.

use std::sync::Arc;

use super::tlb::{Flush, Tlb, TlbEntry, TlbTag, access_class};
use crate::addr::{Gpa, Gva, Hpa, Pfn};
use crate::arch::control::{CR3_PCID_MASK, CpuFeatures, Cr4, PagingMode};
use crate::arch::perm::Access;
use crate::arch::pfec::PfErrorCode;
use crate::host::FrameArena;
use crate::mem::MemslotTable;
use crate::mmu::flush::{RemoteTlb, VcpuMode};
use crate::mmu::shadow::ShadowError;
use crate::mmu::tdp::TdpError;
use crate::walker::{ControlRegs, GuestPaging};

use crate::walker::nested::NestedFault;

/// A fault the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestFault {
    /// #PF with its error code (CR2 = the linear address).
    PageFault {
        /// The error code.
        error_code: PfErrorCode,
        /// The faulting linear address.
        gva: Gva,
    },
    /// #GP(0): a non-canonical address.
    GeneralProtection,
}

/// The result of one guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessResult {
    /// The access completed.
    Done {
        /// The guest-physical address reached.
        gpa: Gpa,
        /// The value read (0 for writes and for MMIO reads).
        value: u64,
        /// Whether the gpa had no memslot and the VMM emulated it.
        mmio: bool,
    },
    /// The guest takes an exception.
    Fault(GuestFault),
    /// The vCPU exited to the VMM before the access
    /// (`KVM_EXIT_DIRTY_RING_FULL`): harvest its ring, reset the rings
    /// ([`crate::mmu::tdp::TdpMmu::reset_dirty_rings`]) and issue the
    /// access again.
    DirtyRingFull,
    /// An L2 vCPU's access exits to its L1 hypervisor: L1's nested tables
    /// do not allow it (a #NPF with L1's EXITINFO1/2, or an EPT violation
    /// or misconfiguration), as the hardware would report it to L1.
    VmExit(crate::walker::nested::NestedFault),
}

/// Counters of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VcpuStats {
    /// Accesses made.
    pub accesses: u64,
    /// Accesses served by a TLB hit.
    pub tlb_hits: u64,
    /// Hardware page walks (TLB misses that walked the MMU's tables).
    pub walks: u64,
    /// Memory references those walks made: entry reads at every level of
    /// both dimensions (the guest's tables and the MMU's), A/D updates not
    /// counted.
    pub walk_refs: u64,
    /// EPT-violation exits.
    pub ept_violations: u64,
    /// EPT-misconfiguration exits.
    pub ept_misconfigs: u64,
    /// #PF exits intercepted by the shadow MMU.
    pub shadow_exits: u64,
    /// Exceptions delivered to the guest.
    pub guest_faults: u64,
    /// Full TLB flushes requested by the MMU.
    pub remote_flushes: u64,
    /// Current roots dropped on the MMU's request after a zap, and
    /// reloaded.
    pub root_reloads: u64,
    /// Cached roots (`prev_roots`) dropped on the MMU's request after a
    /// zap (seed 003: only obsolete ones, unless every root is reloaded).
    pub cached_roots_dropped: u64,
    /// Isolation: accesses that reached a frame the host had freed (a
    /// translation that outlived its frame). Always 0 on a correct MMU.
    pub freed_frame_accesses: u64,
    /// Isolation: walks of a root invalidated by a zap the vCPU had
    /// already acknowledged (it saw the request and kept the root). Always
    /// 0 on a correct MMU.
    pub invalid_root_uses: u64,
}

/// Retries of one access before the vCPU reports that the MMU made no
/// progress. Each retry follows an MMU fix, a lost race or an MMU-notifier
/// invalidation; a correct MMU converges in a few unless the host keeps
/// invalidating the same page, so after [`YIELD_AFTER`] retries the vCPU
/// yields to let the invalidating thread finish.
pub(crate) const MAX_RETRIES: u32 = 100_000;
/// Retries after which a vCPU yields its core between attempts.
pub(crate) const YIELD_AFTER: u32 = 8;
/// Exits in a row that the MMU answered "fixed" (or "already right") and
/// that the hardware then took again, the same exit: a livelock, the MMU
/// and the hardware disagreeing about what the SPTE allows. A race (a
/// notifier zap between the fix and the retry) repeats this a few times
/// at most; a correct MMU never comes near the bound.
pub const LIVELOCK_EXITS: u32 = 1000;

/// Why an access could not complete.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The MMU failed.
    #[error(transparent)]
    Mmu(#[from] TdpError),
    /// The shadow MMU failed.
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    /// An access of a size other than 1..=8 bytes (no x86 data access
    /// the model makes is wider than a quadword).
    #[error("access of {size} bytes at {gva:#x}: the size must be 1..=8")]
    InvalidAccessSize {
        /// The linear address.
        gva: Gva,
        /// The size asked for.
        size: usize,
    },
    /// The MMU kept answering "retry".
    #[error("no progress on {gva:#x} after {MAX_RETRIES} retries (last exit {last:?})")]
    NoProgress {
        /// The linear address.
        gva: Gva,
        /// The last exit.
        last: Option<NestedFault>,
    },
    /// The MMU answered the same exit as fixed [`LIVELOCK_EXITS`] times in
    /// a row and the hardware took it again every time: an access that can
    /// never complete (an MMU bug; never the guest's doing).
    #[error("livelock: {exits} identical exits on a {access:?} at {gva:#x}, each answered as fixed ({state})")]
    Livelock {
        /// The linear address.
        gva: Gva,
        /// The access.
        access: Access,
        /// The exits taken.
        exits: u32,
        /// The vCPU state that caused it: registers, PKRU, the last exit.
        state: String,
    },
    /// An L2 guest's instruction exited to its L1 hypervisor: a MOV to
    /// CR3 loading PAE PDPTEs through EPT whose EPT12 refuses the read.
    /// Not a failure of the vCPU: the exit L1 handles (an access's exits
    /// to L1 are [`AccessResult::VmExit`]).
    #[error("exit to L1: {0:?}")]
    ExitToL1(NestedFault),
}

/// A vCPU's architectural state, TLB and guest-mode bookkeeping: all of
/// the vCPU but its MMU context.
pub(crate) struct CpuState {
    pub(crate) slots: Arc<MemslotTable>,
    pub(crate) features: CpuFeatures,
    pub(crate) regs: ControlRegs,
    pub(crate) cr3: u64,
    pub(crate) pdptes: [u64; 4],
    pub(crate) pkru: u32,
    pub(crate) paging: GuestPaging,
    pub(crate) tlb: Tlb,
    pub(crate) vpid: u16,
    pub(crate) mode: Arc<VcpuMode>,
    /// The host memory the MMU maps (the MMU's arena).
    pub(crate) arena: Arc<FrameArena>,
    pub(crate) seen_flush_gen: u64,
    /// In guest mode now (between the entry and the exit of an access, or
    /// between accesses of a [`super::vcpu::GuestSession`]).
    pub(crate) in_guest: bool,
    /// A [`super::vcpu::GuestSession`] is open: accesses stay in guest
    /// mode.
    pub(crate) session: bool,
    /// The roots match the registers and no sync is pending: until the
    /// MMU's root generation moves, an access needs no reload.
    pub(crate) settled: bool,
    /// The TLB tag while settled (it names the root and the PCID, which
    /// only change while unsettled).
    pub(crate) settled_tag: TlbTag,
    pub(crate) stats: VcpuStats,
}

impl CpuState {
    /// The current PCID (0 without CR4.PCIDE).
    pub(crate) fn pcid(&self) -> u16 {
        if self.regs.cr4.contains(Cr4::PCIDE) {
            (self.cr3 & CR3_PCID_MASK) as u16
        } else {
            0
        }
    }

    /// The TLB tag of translations made now through the root `eptp`
    /// names (0 under shadow paging, which has no EPTP).
    pub(crate) fn tag(&self, eptp: u64) -> TlbTag {
        TlbTag {
            vpid: self.vpid,
            eptp,
            pcid: self.pcid(),
        }
    }

    /// The linear address: 32 bits wide outside IA-32e paging.
    pub(crate) fn linear(&self, gva: Gva) -> Gva {
        match self.paging.mode() {
            PagingMode::Level4 | PagingMode::Level5 => gva,
            _ => Gva::new(gva.raw() & 0xffff_ffff),
        }
    }

    /// Enters guest mode, first doing `flush` if the MMU (`remote`) asked
    /// for a remote flush since the last entry (KVM's `KVM_REQ_TLB_FLUSH`
    /// processed at VM entry). Already in guest mode (a session between
    /// accesses), it answers a flush asked for since its last access
    /// instead, as a processor answers the flush IPI between two
    /// instructions.
    #[inline]
    pub(crate) fn enter_guest(&mut self, remote: &RemoteTlb, flush: Flush) {
        if self.in_guest {
            let generation = remote.requested();
            if generation != self.seen_flush_gen {
                self.seen_flush_gen = generation;
                if !crate::sync::bug(crate::sync::Bug::AckWithoutFlush) {
                    self.tlb.flush(flush);
                }
                self.stats.remote_flushes += 1;
                self.mode.acknowledge(generation);
            }
            return;
        }
        let generation = self.mode.enter(remote);
        self.in_guest = true;
        if generation != self.seen_flush_gen {
            self.seen_flush_gen = generation;
            self.tlb.flush(flush);
            self.stats.remote_flushes += 1;
        }
    }

    /// Leaves guest mode (a VM exit) if in it: from here the vCPU may wait
    /// for `mmu_lock`, and flushes need not wait for it.
    #[inline]
    pub(crate) fn exit_guest(&mut self) {
        if self.in_guest {
            self.in_guest = false;
            self.mode.exit();
        }
    }

    /// The access served by a cached translation, if one serves it now
    /// (`check` says whether an entry's cached rights allow the access, by
    /// the rules of the MMU's hardware mode). Rights are cached, not
    /// decisions: a hit that would fault, or a write through a clean
    /// entry, drops the entry and walks again.
    #[inline]
    pub(crate) fn tlb_hit(
        &mut self,
        gva: Gva,
        tag: TlbTag,
        access: Access,
        size: usize,
        value: u64,
        check: impl FnOnce(&CpuState, &TlbEntry) -> bool,
    ) -> Option<AccessResult> {
        let gva = gva.raw();
        let class = access_class(access);
        if let Some(class) = class
            && let Some(hit) = self.tlb.lookup_l1(gva, tag, class)
        {
            self.stats.tlb_hits += 1;
            return Some(self.touch(hit.hpa, Gpa::new(hit.gpa), access.is_write(), size, value));
        }
        let e = self.tlb.lookup(gva, tag)?;
        if check(self, &e) {
            if let Some(class) = class {
                self.tlb.fill_l1(gva, tag, &e, class);
            }
            self.stats.tlb_hits += 1;
            return Some(self.touch(e.hpa(gva), Gpa::new(e.gpa(gva)), access.is_write(), size, value));
        }
        self.tlb.remove(gva, tag);
        None
    }

    /// Reads or writes host memory at `hpa`.
    #[inline]
    pub(crate) fn touch(&mut self, hpa: Hpa, gpa: Gpa, write: bool, size: usize, value: u64) -> AccessResult {
        let (value, freed) = self.arena.data_access(
            Pfn::new(hpa.raw() >> 12),
            hpa.page_offset() as usize,
            size,
            write,
            value,
        );
        if freed {
            self.stats.freed_frame_accesses += 1;
        }
        AccessResult::Done {
            gpa,
            value,
            mmio: false,
        }
    }
}
