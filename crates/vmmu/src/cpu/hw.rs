//! The hardware page walker over the tables an MMU built, in their real
//! format, read from host frames.
//!
//! For TDP, the walk is two-dimensional: the guest's own walk
//! ([`crate::walker`]) runs over [`EptGuestMemory`], which translates every
//! guest paging-structure access through EPT ([`EptTranslator`]) before it
//! reads or compare-exchanges host memory; then the final gpa is translated.
//! EPT translation is the same generic walker with the EPT entry format,
//! over [`HostPhys`] (host-physical memory). A failed EPT translation is an
//! exit: an EPT violation with the SDM's exit qualification, or an EPT
//! misconfiguration.
//!
//! Callers pin a `crossbeam-epoch` guard for the duration of an access, so
//! that page tables the MMU unlinks are not freed while this walker is
//! inside them.

use crate::addr::{Gpa, Gva, Hpa};
use crate::arch::control::CpuFeatures;
use crate::arch::ept::EptViolationQual;
use crate::arch::ept::PteEpt;
use crate::arch::perm::{Access, AccessKind, AccessRights, Privilege};
use crate::arch::pfec::PfErrorCode;
use crate::host::FrameArena;
use crate::mem::MemslotTable;
use crate::walker::{EntrySize, Paging, PtMemory, Root, Walk, WalkError};

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
        debug_assert_eq!(size, EntrySize::Eight);
        Ok(table[(hpa.raw() as usize & 0xfff) / 8].load(std::sync::atomic::Ordering::Acquire))
    }

    #[inline]
    fn cmpxchg_entry(&self, hpa: Gpa, _size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, OutsideArena> {
        let table = self
            .0
            .try_table(crate::addr::Pfn::new(hpa.raw() >> 12))
            .ok_or(OutsideArena(Hpa::new(hpa.raw())))?;
        Ok(table[(hpa.raw() as usize & 0xfff) / 8]
            .compare_exchange(
                old,
                new,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            )
            .map(|_| ()))
    }
}

/// A TDP exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptExit {
    /// EPT violation at `gpa`.
    Violation {
        /// The guest-physical address.
        gpa: Gpa,
        /// The exit qualification.
        qual: EptViolationQual,
    },
    /// EPT misconfiguration at `gpa` (e.g. an MMIO SPTE).
    Misconfig {
        /// The guest-physical address.
        gpa: Gpa,
    },
}

impl EptExit {
    /// The faulting guest-physical address.
    pub fn gpa(&self) -> Gpa {
        match self {
            EptExit::Violation { gpa, .. } | EptExit::Misconfig { gpa } => *gpa,
        }
    }
}

/// Where in a two-dimensional walk an EPT access happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptStage {
    /// Translating a guest paging-structure entry's address.
    GuestPagingStructure,
    /// Translating the final gpa of the access.
    FinalTranslation,
    /// Not on behalf of a linear address (e.g. loading PAE PDPTEs).
    NoLinearAddress,
}

/// EPT translation of guest-physical addresses through one EPT root.
#[derive(Clone, Copy, Debug)]
pub struct EptTranslator<'a> {
    arena: &'a FrameArena,
    paging: Paging<PteEpt>,
    root: Root,
}

impl<'a> EptTranslator<'a> {
    /// A translator for the EPT tree at `root` (`levels` deep, A/D as `ad`).
    pub fn new(arena: &'a FrameArena, root: Hpa, levels: u8, ad: bool) -> EptTranslator<'a> {
        let features = CpuFeatures::default();
        EptTranslator {
            arena,
            paging: Paging::ept(levels, ad, &features),
            root: Root::Table(Gpa::new(root.raw())),
        }
    }

    /// A translator with a precomputed EPT paging configuration.
    pub fn with_paging(arena: &'a FrameArena, root: Hpa, paging: Paging<PteEpt>) -> EptTranslator<'a> {
        EptTranslator {
            arena,
            paging,
            root: Root::Table(Gpa::new(root.raw())),
        }
    }

    /// The arena holding the tables and the guest's memory.
    pub fn arena(&self) -> &'a FrameArena {
        self.arena
    }

    /// Translates `gpa` for an access of `kind`; the returned walk's `gpa`
    /// is the host-physical address.
    pub fn translate(&self, gpa: u64, kind: AccessKind, stage: EptStage) -> Result<Walk, EptExit> {
        // EPT rights are checked as "user" accesses: USER stands for readable.
        let access = Access {
            kind,
            privilege: Privilege::User,
            rflags_ac: false,
        };
        // A gpa above what the EPT levels translate (bits 63:48 with
        // 4-level EPT) has no translation: the walk would otherwise index
        // with its low bits and alias another gpa.
        let reach = 12 + 9 * u32::from(self.paging.root_level());
        let walk = if reach < 64 && gpa >> reach != 0 {
            Err(WalkError::PageFault(crate::walker::PageFault {
                error_code: PfErrorCode::empty(),
                level: self.paging.root_level(),
                pte: 0,
                pte_gpa: Gpa::new(0),
                rights: AccessRights::empty(),
            }))
        } else {
            self.paging
                .walk(&HostPhys(self.arena), &self.root, Gva::new(gpa), access, 0)
        };
        match walk {
            Ok(w) => Ok(w),
            Err(WalkError::PageFault(pf)) if pf.error_code.contains(PfErrorCode::RSVD) => {
                Err(EptExit::Misconfig { gpa: Gpa::new(gpa) })
            }
            Err(WalkError::PageFault(pf)) => {
                let rights = if pf.error_code.contains(PfErrorCode::PRESENT) {
                    pf.rights
                } else {
                    AccessRights::empty()
                };
                let mut qual = match kind {
                    AccessKind::Read => EptViolationQual::READ,
                    AccessKind::Write => EptViolationQual::WRITE,
                    AccessKind::Fetch => EptViolationQual::FETCH,
                };
                for (r, q) in [
                    (AccessRights::USER, EptViolationQual::READABLE),
                    (AccessRights::WRITE, EptViolationQual::WRITABLE),
                    (AccessRights::EXEC, EptViolationQual::EXECUTABLE),
                ] {
                    if rights.contains(r) {
                        qual |= q;
                    }
                }
                match stage {
                    EptStage::GuestPagingStructure => qual |= EptViolationQual::GLA_VALID,
                    EptStage::FinalTranslation => {
                        qual |= EptViolationQual::GLA_VALID | EptViolationQual::GLA_TRANSLATION;
                    }
                    EptStage::NoLinearAddress => {}
                }
                Err(EptExit::Violation {
                    gpa: Gpa::new(gpa),
                    qual,
                })
            }
            // EPT has no canonicality rule; an SPTE outside the arena is an
            // MMU bug the checker reports as a misconfiguration.
            Err(WalkError::NonCanonical) | Err(WalkError::Memory { .. }) => {
                Err(EptExit::Misconfig { gpa: Gpa::new(gpa) })
            }
        }
    }
}

/// Guest-physical memory as the guest's page walk sees it under TDP: each
/// entry's gpa is translated through EPT, then host memory is accessed.
/// A paging-structure gpa without a memslot (MMIO) reads as zero, and
/// writes to it are dropped, as the VMM's MMIO emulation would answer.
pub struct EptGuestMemory<'a> {
    /// The EPT translation.
    pub ept: EptTranslator<'a>,
    /// The memslots, to tell MMIO from memory on a misconfiguration.
    pub slots: &'a MemslotTable,
    /// The address space.
    pub as_id: u16,
    /// Whether paging-structure reads are on behalf of a linear address.
    pub stage: EptStage,
}

impl EptGuestMemory<'_> {
    fn is_mmio(&self, gpa: Gpa) -> bool {
        self.slots.load(self.as_id).lookup(gpa.frame()).is_none()
    }
}

impl PtMemory for EptGuestMemory<'_> {
    type Error = EptExit;

    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, EptExit> {
        match self.ept.translate(gpa.raw(), AccessKind::Read, self.stage) {
            Ok(w) => {
                Ok(self
                    .ept
                    .arena
                    .read_value(w.gpa.frame_pfn(), w.gpa.page_offset() as usize, size.bytes() as usize))
            }
            Err(EptExit::Misconfig { gpa }) if self.is_mmio(gpa) => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, EptExit> {
        match self.ept.translate(gpa.raw(), AccessKind::Write, self.stage) {
            Ok(w) => Ok(self.ept.arena.cmpxchg_value(
                w.gpa.frame_pfn(),
                w.gpa.page_offset() as usize,
                size.bytes() as usize,
                old,
                new,
            )),
            Err(EptExit::Misconfig { gpa }) if self.is_mmio(gpa) => Ok(Ok(())),
            Err(e) => Err(e),
        }
    }
}

/// Reinterpreting a walk's output address as host-physical.
trait AsHostFrame {
    fn frame_pfn(self) -> crate::addr::Pfn;
}

impl AsHostFrame for Gpa {
    /// An EPT walk's output "gpa" is a host-physical address.
    fn frame_pfn(self) -> crate::addr::Pfn {
        crate::addr::Pfn::new(self.raw() >> 12)
    }
}
