//! The hardware page walker over the tables an MMU built, in their real
//! format, read from host frames.
//!
//! For TDP, the walk is two-dimensional: the guest's own walk
//! ([`crate::walker`]) runs over [`TdpGuestMemory`], which translates every
//! guest paging-structure access through the MMU's tables
//! ([`TdpTranslator`]) before it reads or compare-exchanges host memory;
//! then the final gpa is translated. The translation is the foundation's
//! nested walk ([`crate::walker::nested`]) in the vendor's format (Intel
//! EPT, AMD NPT) over [`HostPhys`] (host-physical memory), so a failed
//! translation is the exit that vendor's hardware takes
//! ([`NestedFault`]): an EPT violation with the SDM's exit qualification
//! or an EPT misconfiguration, or a #NPF with EXITINFO1/2.
//!
//! Callers pin a `crossbeam-epoch` guard for the duration of an access, so
//! that page tables the MMU unlinks are not freed while this walker is
//! inside them.

use crate::addr::{Gpa, Hpa};
use crate::arch::perm::AccessKind;
use crate::arch::pfec::PfErrorCode;
use crate::host::FrameArena;
use crate::mem::MemslotTable;
use crate::walker::nested::{
    NPF_FINAL_TRANSLATION, NPF_GUEST_PAGE_TABLE, NestedError, NestedFault, NestedMemory, NestedPaging, NestedStage,
    NestedVendor,
};
use crate::walker::{CountingMemory, EntrySize, PtMemory, Walk};

/// Host-physical memory, for walking SPTE tables: entries are read and
/// compare-exchanged (hardware A/D updates) directly in host frames.
#[derive(Clone, Copy, Debug)]
pub struct HostPhys<'a>(pub &'a FrameArena);

/// A host-physical address outside the arena: an SPTE points nowhere (an
/// MMU bug, reported as an EPT misconfiguration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutsideArena(pub Hpa);

impl PtMemory for HostPhys<'_> {
    type Error = OutsideArena;

    #[inline]
    fn read_entry(&self, hpa: Gpa, size: EntrySize) -> Result<u64, OutsideArena> {
        let table = self
            .0
            .try_table(crate::addr::Pfn::new(hpa.raw() >> 12))
            .ok_or(OutsideArena(Hpa::new(hpa.raw())))?;
        let word = table[(hpa.raw() as usize & 0xfff) / 8].load(std::sync::atomic::Ordering::Acquire);
        Ok(match size {
            EntrySize::Eight => word,
            // A 4-byte guest entry: its half of the 8-byte word.
            EntrySize::Four => (word >> (8 * (hpa.raw() & 4))) & 0xffff_ffff,
        })
    }

    #[inline]
    fn cmpxchg_entry(&self, hpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, OutsideArena> {
        let pfn = crate::addr::Pfn::new(hpa.raw() >> 12);
        if self.0.try_table(pfn).is_none() {
            return Err(OutsideArena(Hpa::new(hpa.raw())));
        }
        Ok(self
            .0
            .cmpxchg_value(pfn, hpa.raw() as usize & 0xfff, size.bytes() as usize, old, new))
    }
}

/// The translation of guest-physical addresses through one tree of the
/// TDP MMU, as the vendor's hardware walks it.
#[derive(Clone, Copy, Debug)]
pub struct TdpTranslator<'a> {
    arena: &'a FrameArena,
    paging: NestedPaging,
}

impl<'a> TdpTranslator<'a> {
    /// A translator for the tree `paging` describes (its format and root),
    /// whose tables and pages are frames of `arena`.
    pub fn new(arena: &'a FrameArena, paging: NestedPaging) -> TdpTranslator<'a> {
        TdpTranslator { arena, paging }
    }

    /// The arena holding the tables and the guest's memory.
    pub fn arena(&self) -> &'a FrameArena {
        self.arena
    }

    /// Translates `gpa` for an access of `kind` at `stage`; the returned
    /// walk's `gpa` is the host-physical address.
    pub fn translate(&self, gpa: Gpa, kind: AccessKind, stage: NestedStage) -> Result<Walk, NestedFault> {
        self.translate_in(&HostPhys(self.arena), gpa, kind, stage)
    }

    /// [`TdpTranslator::translate`] over `host`, a view of this arena (one
    /// that counts the references, say).
    pub fn translate_in<M: PtMemory<Error = OutsideArena>>(
        &self,
        host: &M,
        gpa: Gpa,
        kind: AccessKind,
        stage: NestedStage,
    ) -> Result<Walk, NestedFault> {
        self.paging
            .translate(host, gpa, kind, stage)
            .map_err(|e| self.fault_of(gpa, stage, e))
    }

    /// An SPTE that points outside the arena is an MMU bug; the hardware
    /// reports it as a reserved-bit fault (what the checker then flags).
    fn fault_of(&self, gpa: Gpa, stage: NestedStage, e: NestedError<OutsideArena>) -> NestedFault {
        match e {
            NestedError::Fault(f) => f,
            NestedError::Host { .. } => match self.paging.vendor() {
                NestedVendor::Ept => NestedFault::EptMisconfig { gpa },
                NestedVendor::Npt => NestedFault::Npf {
                    exitinfo1: u64::from((PfErrorCode::PRESENT | PfErrorCode::RSVD | PfErrorCode::USER).bits())
                        | match stage {
                            NestedStage::Final { .. } => NPF_FINAL_TRANSLATION,
                            _ => NPF_GUEST_PAGE_TABLE,
                        },
                    exitinfo2: gpa.raw(),
                },
            },
        }
    }
}

/// Guest-physical memory as the guest's page walk sees it under TDP: each
/// entry's gpa is translated through the MMU's tables (a guest
/// paging-structure access, as the vendor makes it), then host memory is
/// accessed. A paging-structure gpa without a memslot (MMIO) reads as
/// zero, and writes to it are dropped, as the VMM's MMIO emulation would
/// answer. Every entry read of host memory, at either level, is counted:
/// the memory references of the two-dimensional walk.
pub struct TdpGuestMemory<'a> {
    /// The translation.
    pub tdp: TdpTranslator<'a>,
    /// Host memory, counting the references made of it.
    pub host: CountingMemory<HostPhys<'a>>,
    /// The memslots, to tell MMIO from memory on a reserved-bit exit.
    pub slots: &'a MemslotTable,
    /// The address space.
    pub as_id: u16,
    /// On whose behalf the entries are accessed.
    pub stage: NestedStage,
}

impl TdpGuestMemory<'_> {
    /// The final translation of the access to `gla` at `gpa`, counted with
    /// the walk's references.
    pub fn translate_final(&self, gpa: Gpa, kind: AccessKind, gla: crate::addr::Gva) -> Result<Walk, NestedFault> {
        self.tdp.translate_in(&self.host, gpa, kind, NestedStage::Final { gla })
    }

    /// Memory references made so far.
    pub fn references(&self) -> u64 {
        self.host.reads()
    }

    /// Whether `e` is the MMIO exit for a gpa without a memslot.
    fn is_mmio(&self, gpa: Gpa, e: &NestedError<OutsideArena>) -> bool {
        let f = self.tdp.fault_of(gpa, self.stage, *e);
        f.is_reserved_bit() && self.slots.load(self.as_id).lookup(f.gpa().frame()).is_none()
    }
}

impl PtMemory for TdpGuestMemory<'_> {
    type Error = NestedFault;

    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, NestedFault> {
        let mem = NestedMemory {
            nested: &self.tdp.paging,
            host: &self.host,
            stage: self.stage,
        };
        match mem.read_entry(gpa, size) {
            Ok(v) => Ok(v),
            Err(e) if self.is_mmio(gpa, &e) => Ok(0),
            Err(e) => Err(self.tdp.fault_of(gpa, self.stage, e)),
        }
    }

    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, NestedFault> {
        let mem = NestedMemory {
            nested: &self.tdp.paging,
            host: &self.host,
            stage: self.stage,
        };
        match mem.cmpxchg_entry(gpa, size, old, new) {
            Ok(r) => Ok(r),
            Err(e) if self.is_mmio(gpa, &e) => Ok(Ok(())),
            Err(e) => Err(self.tdp.fault_of(gpa, self.stage, e)),
        }
    }
}
