//! The two-dimensional walk: a guest's paging over nested tables (Intel
//! EPT, AMD NPT), as the processor does it and as KVM's `walk_addr_nested`
//! emulates it for an L1 hypervisor's tables.
//!
//! Every guest paging-structure access is a guest-physical access,
//! translated through the nested tables before the entry is read or its
//! A/D bits are set; then the final guest-physical address is translated
//! for the access itself. [`NestedPaging`] is one set of nested tables
//! (EPT with its A/D setting, or NPT in the x86-64 long-mode format);
//! [`NestedMemory`] is the guest-physical memory the guest walker sees
//! through it; [`walk_2d`] is the whole walk. A nested translation that
//! fails ends the walk with what the hardware reports ([`NestedFault`]):
//!
//! - **EPT** (SDM vol. 3C 29.3.3): an EPT violation with its exit
//!   qualification (the access's R/W/X bits, the AND of the entries'
//!   R/W/X, whether the guest-linear address is valid and whether the
//!   access was to the final translation), or an EPT misconfiguration (a
//!   reserved bit, W without R, a reserved memory type). With EPT A/D
//!   flags on, every guest paging-structure access counts as a write (it
//!   needs W, reports read and write, and sets D in the EPT leaf); with
//!   them off, a guest paging-structure read is a read and the setting of
//!   a guest A/D flag a write.
//! - **NPT** (AMD APM vol. 2 15.25): a #NPF with EXITINFO1 = a #PF-style
//!   error code (nested accesses are user accesses; a guest
//!   paging-structure access is a write) | bit 32 (the final translation)
//!   or bit 33 (a guest paging-structure access), and EXITINFO2 = the
//!   guest-physical address.

use super::memory::{EntrySize, PtMemory};
use super::{GuestPaging, Paging, Root, Walk, WalkError};
use crate::addr::{Gpa, Gva, Hpa};
use crate::arch::control::{CpuFeatures, Cr0, Cr4, Efer, PagingMode};
use crate::arch::ept::{EptViolationQual, PteEpt};
use crate::arch::perm::{Access, AccessKind, AccessRights, Privilege};
use crate::arch::pfec::PfErrorCode;
use crate::arch::pte::Pte64;

/// EXITINFO1 bit 32 of a #NPF: the fault was on the final guest-physical
/// address.
pub const NPF_FINAL_TRANSLATION: u64 = 1 << 32;
/// EXITINFO1 bit 33 of a #NPF: the fault was on a guest paging-structure
/// access.
pub const NPF_GUEST_PAGE_TABLE: u64 = 1 << 33;

/// The vendor's nested paging: which format the nested tables have and
/// how a failed translation is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NestedVendor {
    /// Intel EPT.
    Ept,
    /// AMD NPT.
    Npt,
}

/// One set of nested tables: their format, configuration and root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NestedPaging {
    kind: NestedKind,
    root: Root,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NestedKind {
    Ept { paging: Paging<PteEpt>, ad: bool },
    Npt { paging: Paging<Pte64> },
}

/// On whose behalf a nested translation is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedStage {
    /// A guest paging-structure access of the walk of `gla`.
    GuestPagingStructure {
        /// The linear address being translated.
        gla: Gva,
    },
    /// The final guest-physical address of the access to `gla`.
    Final {
        /// The linear address accessed.
        gla: Gva,
    },
    /// Not on behalf of a linear address (loading PAE PDPTEs on MOV CR3).
    NoLinearAddress,
}

/// Why a nested translation failed, as the hardware reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedFault {
    /// An EPT violation (exit reason 48).
    EptViolation {
        /// The guest-physical address whose translation failed.
        gpa: Gpa,
        /// The exit qualification.
        qual: EptViolationQual,
        /// The guest-linear address, when the qualification says it is valid.
        gla: Option<Gva>,
    },
    /// An EPT misconfiguration (exit reason 49).
    EptMisconfig {
        /// The guest-physical address whose translation failed.
        gpa: Gpa,
    },
    /// A nested page fault (#VMEXIT code 0x400).
    Npf {
        /// The error code with bit 32 or 33.
        exitinfo1: u64,
        /// The guest-physical address.
        exitinfo2: u64,
    },
}

impl NestedFault {
    /// The guest-physical address whose translation failed.
    pub fn gpa(&self) -> Gpa {
        match *self {
            NestedFault::EptViolation { gpa, .. } | NestedFault::EptMisconfig { gpa } => gpa,
            NestedFault::Npf { exitinfo2, .. } => Gpa::new(exitinfo2),
        }
    }

    /// Whether a reserved bit caused it: an EPT misconfiguration, or a
    /// #NPF with RSVD (how an MMIO SPTE exits, on either vendor).
    pub fn is_reserved_bit(&self) -> bool {
        match *self {
            NestedFault::EptMisconfig { .. } => true,
            NestedFault::EptViolation { .. } => false,
            NestedFault::Npf { exitinfo1, .. } => exitinfo1 & u64::from(PfErrorCode::RSVD.bits()) != 0,
        }
    }

    /// The access that faulted, as the MMU's fault handler reads it:
    /// whether it was a write, an instruction fetch, and whether the
    /// translation existed (a protection fault rather than a missing
    /// entry).
    pub fn access_bits(&self) -> (bool, bool, bool) {
        match *self {
            NestedFault::EptViolation { qual, .. } => (
                qual.contains(EptViolationQual::WRITE),
                qual.contains(EptViolationQual::FETCH),
                qual.intersects(EptViolationQual::READABLE | EptViolationQual::WRITABLE | EptViolationQual::EXECUTABLE),
            ),
            NestedFault::EptMisconfig { .. } => (false, false, true),
            NestedFault::Npf { exitinfo1, .. } => {
                let ec = PfErrorCode::from_bits_truncate(exitinfo1 as u32);
                (
                    ec.contains(PfErrorCode::WRITE),
                    ec.contains(PfErrorCode::FETCH),
                    ec.contains(PfErrorCode::PRESENT),
                )
            }
        }
    }
}

/// A nested translation that did not complete: a fault the hardware
/// reports, or host memory the walk could not reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedError<E> {
    /// The nested tables refused the access.
    Fault(NestedFault),
    /// A nested entry could not be read from host memory.
    Host {
        /// The host-physical address of the entry.
        hpa: Hpa,
        /// The host memory's error.
        error: E,
    },
}

/// One nested access: the kind its permissions are checked for, and the
/// kind bits an EPT violation reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NestedAccess {
    need: AccessKind,
    qual: EptViolationQual,
}

impl NestedPaging {
    /// EPT tables at host-physical `root` with `levels` (4 or 5) levels and
    /// A/D flags as `ad` (EPTP bit 6).
    pub fn ept(root: Hpa, levels: u8, ad: bool, features: &CpuFeatures) -> NestedPaging {
        NestedPaging {
            kind: NestedKind::Ept {
                paging: Paging::ept(levels, ad, features),
                ad,
            },
            root: Root::Table(Gpa::new(root.raw() & crate::arch::pte::PT64_ADDR_MASK)),
        }
    }

    /// NPT tables at host-physical `ncr3` (the VMCB's N_CR3; PWT/PCD
    /// ignored) in the host's long-mode format with `levels` (4 or 5),
    /// with host EFER.NXE as `host_nxe` (without it, bit 63 of a nested
    /// entry is reserved). The host's CR0.WP, SMEP, SMAP and protection
    /// keys play no part: nested accesses are user accesses.
    ///
    /// # Panics
    /// If `levels` is not 4 or 5 (the host's paging mode; the L1 hypervisor
    /// chose it, the guest cannot).
    pub fn npt(ncr3: Hpa, levels: u8, host_nxe: bool, features: &CpuFeatures) -> NestedPaging {
        let mode = match levels {
            4 => PagingMode::Level4,
            5 => PagingMode::Level5,
            _ => panic!("nested page tables have 4 or 5 levels, not {levels}"),
        };
        let mut cr4 = Cr4::PAE;
        if levels == 5 {
            cr4 |= Cr4::LA57;
        }
        let mut efer = Efer::LME | Efer::LMA;
        if host_nxe {
            efer |= Efer::NXE;
        }
        let regs = super::ControlRegs {
            cr0: Cr0::PE | Cr0::PG | Cr0::WP,
            cr4,
            efer,
        };
        let mut paging = Paging::long_or_pae(mode, &regs, features);
        // A guest-physical address has no canonical form.
        paging.canonical_bits = 0;
        NestedPaging {
            kind: NestedKind::Npt { paging },
            root: Root::Table(Gpa::new(ncr3.raw() & crate::arch::pte::PT64_ADDR_MASK)),
        }
    }

    /// The same tables rooted at `root` (host-physical).
    pub fn with_root(self, root: Hpa) -> NestedPaging {
        NestedPaging {
            root: Root::Table(Gpa::new(root.raw() & crate::arch::pte::PT64_ADDR_MASK)),
            ..self
        }
    }

    /// The nested tables as guest paging, for a shadow MMU that shadows
    /// them (KVM's nested MMU): NPT's long-mode format with its own
    /// configuration (user accesses, no canonical form), or EPT.
    pub fn guest_paging(&self) -> GuestPaging {
        match self.kind {
            NestedKind::Npt { paging } => {
                let mode = if paging.root_level() == 5 {
                    PagingMode::Level5
                } else {
                    PagingMode::Level4
                };
                GuestPaging::Pae64(paging, mode)
            }
            NestedKind::Ept { paging, .. } => GuestPaging::Ept(paging),
        }
    }

    /// The root (host-physical, or L1-physical for an L1 hypervisor's tables).
    pub fn root(&self) -> Root {
        self.root
    }

    /// The vendor.
    pub fn vendor(&self) -> NestedVendor {
        match self.kind {
            NestedKind::Ept { .. } => NestedVendor::Ept,
            NestedKind::Npt { .. } => NestedVendor::Npt,
        }
    }

    /// The levels of the nested tables.
    pub fn levels(&self) -> u8 {
        match &self.kind {
            NestedKind::Ept { paging, .. } => paging.root_level(),
            NestedKind::Npt { paging } => paging.root_level(),
        }
    }

    /// The access a guest paging-structure read (`set_ad` false) or the
    /// setting of a guest A/D flag (`set_ad` true) makes of the nested
    /// tables.
    fn structure_access(&self, set_ad: bool) -> NestedAccess {
        match self.kind {
            NestedKind::Ept { ad: true, .. } => NestedAccess {
                need: AccessKind::Write,
                qual: EptViolationQual::READ | EptViolationQual::WRITE,
            },
            NestedKind::Ept { ad: false, .. } if set_ad => NestedAccess {
                need: AccessKind::Write,
                qual: EptViolationQual::WRITE,
            },
            NestedKind::Ept { ad: false, .. } => NestedAccess {
                need: AccessKind::Read,
                qual: EptViolationQual::READ,
            },
            NestedKind::Npt { .. } => NestedAccess {
                need: AccessKind::Write,
                qual: EptViolationQual::WRITE,
            },
        }
    }

    /// Translates `gpa` for an access of `kind` made at `stage`, setting
    /// the nested tables' A/D bits as the hardware does. The returned
    /// walk's `gpa` is the host-physical address.
    pub fn translate<M: PtMemory>(
        &self,
        host: &M,
        gpa: Gpa,
        kind: AccessKind,
        stage: NestedStage,
    ) -> Result<Walk, NestedError<M::Error>> {
        let qual = match kind {
            AccessKind::Read => EptViolationQual::READ,
            AccessKind::Write => EptViolationQual::WRITE,
            AccessKind::Fetch => EptViolationQual::FETCH,
        };
        self.translate_as(host, gpa, NestedAccess { need: kind, qual }, stage)
    }

    /// Translates the address of `fault`, which other nested tables
    /// reported, for the same access at the same stage: the fault these
    /// tables give, or the translation if they allow it. This is how a
    /// nested MMU builds the exit it reflects to L1 (KVM re-walks EPT12 or
    /// NPT12 and injects what that walk found): the hardware faulted on
    /// EPT02/NPT02, these are L1's EPT12/NPT12 over L1's memory `host`,
    /// and the kind of access, the linear address and the stage come from
    /// the hardware's report. An EPT misconfiguration says none of them: it
    /// is retranslated as a read on behalf of no linear address.
    pub fn retranslate<M: PtMemory>(&self, host: &M, fault: &NestedFault) -> Result<Walk, NestedError<M::Error>> {
        let kinds = EptViolationQual::READ | EptViolationQual::WRITE | EptViolationQual::FETCH;
        let (access, stage) = match *fault {
            NestedFault::EptViolation { qual, gla, .. } => {
                let need = if qual.contains(EptViolationQual::FETCH) {
                    AccessKind::Fetch
                } else if qual.contains(EptViolationQual::WRITE) {
                    AccessKind::Write
                } else {
                    AccessKind::Read
                };
                let stage = match gla {
                    Some(gla) if qual.contains(EptViolationQual::GLA_TRANSLATION) => NestedStage::Final { gla },
                    Some(gla) => NestedStage::GuestPagingStructure { gla },
                    None => NestedStage::NoLinearAddress,
                };
                (
                    NestedAccess {
                        need,
                        qual: qual & kinds,
                    },
                    stage,
                )
            }
            NestedFault::EptMisconfig { .. } => (
                NestedAccess {
                    need: AccessKind::Read,
                    qual: EptViolationQual::READ,
                },
                NestedStage::NoLinearAddress,
            ),
            NestedFault::Npf { exitinfo1, .. } => {
                let (write, fetch, _) = fault.access_bits();
                let need = if fetch {
                    AccessKind::Fetch
                } else if write {
                    AccessKind::Write
                } else {
                    AccessKind::Read
                };
                // Only the stage bit matters to NPT's report.
                let stage = if exitinfo1 & NPF_FINAL_TRANSLATION != 0 {
                    NestedStage::Final { gla: Gva::new(0) }
                } else {
                    NestedStage::GuestPagingStructure { gla: Gva::new(0) }
                };
                let qual = match need {
                    AccessKind::Read => EptViolationQual::READ,
                    AccessKind::Write => EptViolationQual::WRITE,
                    AccessKind::Fetch => EptViolationQual::FETCH,
                };
                (NestedAccess { need, qual }, stage)
            }
        };
        self.translate_as(host, fault.gpa(), access, stage)
    }

    /// The access a nested walk checks (user: for EPT, USER stands for
    /// readable), and the fault of a gpa above what the nested levels
    /// translate (the walk would otherwise index with its low bits and
    /// alias another).
    fn nested_access<E>(&self, gpa: Gpa, access: NestedAccess) -> (Access, Option<WalkError<E>>) {
        let user = Access {
            kind: access.need,
            privilege: Privilege::User,
            rflags_ac: false,
        };
        let reach = 12 + 9 * u32::from(self.levels());
        let beyond = (reach < 64 && gpa.raw() >> reach != 0).then(|| {
            WalkError::PageFault(super::PageFault {
                error_code: PfErrorCode::USER,
                level: self.levels(),
                pte: 0,
                pte_gpa: Gpa::new(0),
                rights: AccessRights::empty(),
            })
        });
        (user, beyond)
    }

    fn translate_as<M: PtMemory>(
        &self,
        host: &M,
        gpa: Gpa,
        access: NestedAccess,
        stage: NestedStage,
    ) -> Result<Walk, NestedError<M::Error>> {
        let (user, beyond) = self.nested_access(gpa, access);
        let va = Gva::new(gpa.raw());
        let walk = match (beyond, &self.kind) {
            (Some(e), _) => Err(e),
            (None, NestedKind::Ept { paging, .. }) => paging.walk(host, &self.root, va, user, 0),
            (None, NestedKind::Npt { paging }) => paging.walk(host, &self.root, va, user, 0),
        };
        walk.map_err(|e| self.nested_error(gpa, access, stage, e))
    }

    /// [`NestedPaging::translate_as`] for the address alone (a guest
    /// table's, read or written through these tables): the walk's record
    /// of each level is not copied out.
    fn translate_addr_as<M: PtMemory>(
        &self,
        host: &M,
        gpa: Gpa,
        access: NestedAccess,
        stage: NestedStage,
    ) -> Result<Gpa, NestedError<M::Error>> {
        let (user, beyond) = self.nested_access(gpa, access);
        let va = Gva::new(gpa.raw());
        let walk = match (beyond, &self.kind) {
            (Some(e), _) => Err(e),
            (None, NestedKind::Ept { paging, .. }) => paging.walk_outcome(host, &self.root, va, user, 0),
            (None, NestedKind::Npt { paging }) => paging.walk_outcome(host, &self.root, va, user, 0),
        };
        walk.map(|o| o.gpa)
            .map_err(|e| self.nested_error(gpa, access, stage, e))
    }

    /// The exit a failed nested walk of `gpa` makes, or the host's error.
    fn nested_error<E>(
        &self,
        gpa: Gpa,
        access: NestedAccess,
        stage: NestedStage,
        walk: WalkError<E>,
    ) -> NestedError<E> {
        let pf = match walk {
            WalkError::Memory { gpa: hpa, error, .. } => {
                return NestedError::Host {
                    hpa: Hpa::new(hpa.raw()),
                    error,
                };
            }
            // Nested walks make no canonicality check.
            WalkError::NonCanonical => unreachable!("a nested walk has no canonical form"),
            WalkError::PageFault(pf) => pf,
        };
        NestedError::Fault(match self.kind {
            NestedKind::Ept { .. } if pf.error_code.contains(PfErrorCode::RSVD) => NestedFault::EptMisconfig { gpa },
            NestedKind::Ept { .. } => {
                let mut qual = access.qual;
                if pf.error_code.contains(PfErrorCode::PRESENT) {
                    for (r, q) in [
                        (AccessRights::USER, EptViolationQual::READABLE),
                        (AccessRights::WRITE, EptViolationQual::WRITABLE),
                        (AccessRights::EXEC, EptViolationQual::EXECUTABLE),
                    ] {
                        if pf.rights.contains(r) {
                            qual |= q;
                        }
                    }
                }
                let gla = match stage {
                    NestedStage::GuestPagingStructure { gla } => {
                        qual |= EptViolationQual::GLA_VALID;
                        Some(gla)
                    }
                    NestedStage::Final { gla } => {
                        qual |= EptViolationQual::GLA_VALID | EptViolationQual::GLA_TRANSLATION;
                        Some(gla)
                    }
                    NestedStage::NoLinearAddress => None,
                };
                NestedFault::EptViolation { gpa, qual, gla }
            }
            NestedKind::Npt { .. } => {
                let bit = match stage {
                    NestedStage::Final { .. } => NPF_FINAL_TRANSLATION,
                    _ => NPF_GUEST_PAGE_TABLE,
                };
                NestedFault::Npf {
                    exitinfo1: u64::from(pf.error_code.bits()) | bit,
                    exitinfo2: gpa.raw(),
                }
            }
        })
    }
}

/// Guest-physical memory as the guest's walker sees it over nested tables:
/// each entry access is translated through `nested` (as a guest
/// paging-structure access of `stage`), then host memory is accessed.
pub struct NestedMemory<'a, M> {
    /// The nested tables.
    pub nested: &'a NestedPaging,
    /// Host-physical memory (the nested tables and everything they map).
    pub host: &'a M,
    /// On whose behalf the entries are accessed.
    pub stage: NestedStage,
}

impl<M: PtMemory> NestedMemory<'_, M> {
    fn access(&self, set_ad: bool) -> NestedAccess {
        match self.stage {
            // Loading PDPTEs on MOV CR3 reads them (no A/D).
            NestedStage::NoLinearAddress => NestedAccess {
                need: AccessKind::Read,
                qual: EptViolationQual::READ,
            },
            _ => self.nested.structure_access(set_ad),
        }
    }
}

impl<M: PtMemory> PtMemory for NestedMemory<'_, M> {
    type Error = NestedError<M::Error>;

    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, Self::Error> {
        let w = self
            .nested
            .translate_addr_as(self.host, gpa, self.access(false), self.stage)?;
        self.host.read_entry(w, size).map_err(|error| NestedError::Host {
            hpa: Hpa::new(w.raw()),
            error,
        })
    }

    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, Self::Error> {
        let w = self
            .nested
            .translate_addr_as(self.host, gpa, self.access(true), self.stage)?;
        self.host
            .cmpxchg_entry(w, size, old, new)
            .map_err(|error| NestedError::Host {
                hpa: Hpa::new(w.raw()),
                error,
            })
    }
}

/// A completed two-dimensional walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk2d {
    /// The guest's walk (its `gpa` is the final guest-physical address).
    pub guest: Walk,
    /// The nested walk of the final guest-physical address.
    pub nested: Walk,
    /// The host-physical address reached.
    pub hpa: Hpa,
}

/// Why a two-dimensional walk did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk2dError<E> {
    /// The guest's own walk faulted: a #PF for the guest (with its error
    /// code), or #GP for a non-canonical address.
    Guest(WalkError<std::convert::Infallible>),
    /// A nested translation failed.
    Nested(NestedError<E>),
}

/// Translates `va` for `access` through the guest's `paging` from `root`
/// (guest-physical) over `nested`, in `host` memory: the guest walk with
/// every entry access translated, A/D set at both levels, then the final
/// translation (KVM's `walk_addr_nested`; the hardware's 2-D walk).
pub fn walk_2d<M: PtMemory>(
    paging: &GuestPaging,
    root: &Root,
    va: Gva,
    access: Access,
    pkru: u32,
    nested: &NestedPaging,
    host: &M,
) -> Result<Walk2d, Walk2dError<M::Error>> {
    let mem = NestedMemory {
        nested,
        host,
        stage: NestedStage::GuestPagingStructure { gla: va },
    };
    let guest = paging.walk(&mem, root, va, access, pkru).map_err(|e| match e {
        WalkError::PageFault(pf) => Walk2dError::Guest(WalkError::PageFault(pf)),
        WalkError::NonCanonical => Walk2dError::Guest(WalkError::NonCanonical),
        WalkError::Memory { error, .. } => Walk2dError::Nested(error),
    })?;
    let nested_walk = nested
        .translate(host, guest.gpa, access.kind, NestedStage::Final { gla: guest.va })
        .map_err(Walk2dError::Nested)?;
    Ok(Walk2d {
        guest,
        nested: nested_walk,
        hpa: Hpa::new(nested_walk.gpa.raw()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ept::{EPT_ACCESSED, EPT_DIRTY, EPT_EXEC, EPT_READ, EPT_WRITE};
    use crate::arch::pte::{PT_ACCESSED, PT_DIRTY, PT_PRESENT, PT_USER, PT_WRITABLE};
    use crate::walker::SparseMemory;

    /// Guest-physical memory sits at host-physical `gpa + HOST_OFFSET`.
    const HOST_OFFSET: u64 = 0x1000_0000;
    /// The nested tables: PML4, PDPT, PD, PT at these host addresses.
    const NESTED: [u64; 4] = [0x100_0000, 0x100_1000, 0x100_2000, 0x100_3000];
    /// The guest's tables at gpa 0x1000..0x4000 (PML4, PDPT, PD, PT); the
    /// guest maps va 0x5000 to gpa 0x5000.
    const GUEST: [u64; 4] = [0x1000, 0x2000, 0x3000, 0x4000];
    const VA: u64 = 0x5000;

    /// Nested tables mapping gpas 0..2 MiB with 4K leaves of rights `rights(gfn)`
    /// (in the format's own bits), and the guest's 4-level tables.
    fn setup(ept: bool, rights: impl Fn(u64) -> u64) -> SparseMemory {
        let host = SparseMemory::new();
        let table = if ept {
            EPT_READ | EPT_WRITE | EPT_EXEC
        } else {
            PT_PRESENT | PT_WRITABLE | PT_USER
        };
        for l in 0..3 {
            host.write_uint(Gpa::new(NESTED[l]), 8, NESTED[l + 1] | table);
        }
        for gfn in 0..512 {
            host.write_uint(
                Gpa::new(NESTED[3] + 8 * gfn),
                8,
                ((gfn << 12) + HOST_OFFSET) | rights(gfn),
            );
        }
        let g = PT_PRESENT | PT_WRITABLE | PT_USER;
        for l in 0..3 {
            host.write_uint(Gpa::new(GUEST[l] + HOST_OFFSET), 8, GUEST[l + 1] | g);
        }
        host.write_uint(Gpa::new(GUEST[3] + HOST_OFFSET + 8 * 5), 8, VA | g);
        host
    }

    fn guest() -> GuestPaging {
        let regs = super::super::ControlRegs {
            cr0: Cr0::PE | Cr0::PG | Cr0::WP,
            cr4: Cr4::PAE,
            efer: Efer::LME | Efer::LMA | Efer::NXE,
        };
        GuestPaging::new(&regs, &CpuFeatures::default())
    }

    fn walk(
        nested: &NestedPaging,
        host: &SparseMemory,
        kind: AccessKind,
    ) -> Result<Walk2d, Walk2dError<std::convert::Infallible>> {
        walk_2d(
            &guest(),
            &Root::Table(Gpa::new(GUEST[0])),
            Gva::new(VA),
            Access::new(kind, 3, false),
            0,
            nested,
            host,
        )
    }

    fn ept(ad: bool) -> NestedPaging {
        NestedPaging::ept(Hpa::new(NESTED[0]), 4, ad, &CpuFeatures::default())
    }

    fn npt() -> NestedPaging {
        NestedPaging::npt(Hpa::new(NESTED[0]), 4, true, &CpuFeatures::default())
    }

    const RWX: u64 = EPT_READ | EPT_WRITE | EPT_EXEC | (6 << 3);
    const URW: u64 = PT_PRESENT | PT_WRITABLE | PT_USER;

    #[test]
    fn a_2d_walk_sets_a_d_at_both_levels() {
        for ad in [false, true] {
            let host = setup(true, |_| RWX);
            let w = walk(&ept(ad), &host, AccessKind::Write).unwrap();
            assert_eq!((w.guest.gpa, w.hpa), (Gpa::new(VA), Hpa::new(VA + HOST_OFFSET)));
            let leaf = host.read_uint(Gpa::new(GUEST[3] + HOST_OFFSET + 8 * 5), 8);
            assert_eq!(leaf & (PT_ACCESSED | PT_DIRTY), PT_ACCESSED | PT_DIRTY);
            // With EPT A/D on, the guest's table pages count as written too.
            let table_leaf = host.read_uint(Gpa::new(NESTED[3] + 8 * (GUEST[2] >> 12)), 8);
            let want = if ad { EPT_ACCESSED | EPT_DIRTY } else { 0 };
            assert_eq!(table_leaf & (EPT_ACCESSED | EPT_DIRTY), want, "ad {ad}");
        }
        let host = setup(false, |_| URW);
        walk(&npt(), &host, AccessKind::Read).unwrap();
        // NPT: every guest table page is written (D), the data page only read.
        let d = |gfn: u64| host.read_uint(Gpa::new(NESTED[3] + 8 * gfn), 8) & PT_DIRTY != 0;
        assert!(GUEST.iter().all(|&g| d(g >> 12)));
        assert!(!d(VA >> 12));
    }

    #[test]
    fn a_read_only_guest_table_is_an_ept_violation_on_the_walk() {
        let table = GUEST[2] >> 12;
        let ro = |gfn: u64| if gfn == table { EPT_READ | (6 << 3) } else { RWX };
        let gla = Some(Gva::new(VA));
        let entry = Gpa::new(GUEST[2]);
        // A/D on: the read of the entry is a write for EPT (bits 0 and 1).
        let e = walk(&ept(true), &setup(true, ro), AccessKind::Read).unwrap_err();
        let qual =
            EptViolationQual::READ | EptViolationQual::WRITE | EptViolationQual::READABLE | EptViolationQual::GLA_VALID;
        assert_eq!(
            e,
            Walk2dError::Nested(NestedError::Fault(NestedFault::EptViolation { gpa: entry, qual, gla }))
        );
        // A/D off: the read passes; setting the A flag is the write that fails.
        let e = walk(&ept(false), &setup(true, ro), AccessKind::Read).unwrap_err();
        let qual = EptViolationQual::WRITE | EptViolationQual::READABLE | EptViolationQual::GLA_VALID;
        assert_eq!(
            e,
            Walk2dError::Nested(NestedError::Fault(NestedFault::EptViolation { gpa: entry, qual, gla }))
        );
    }

    #[test]
    fn the_final_translation_faults_with_its_own_exit_information() {
        let data = VA >> 12;
        // EPT: a write to a read/execute page.
        let rx = |gfn: u64| {
            if gfn == data {
                EPT_READ | EPT_EXEC | (6 << 3)
            } else {
                RWX
            }
        };
        let e = walk(&ept(true), &setup(true, rx), AccessKind::Write).unwrap_err();
        let qual = EptViolationQual::WRITE
            | EptViolationQual::READABLE
            | EptViolationQual::EXECUTABLE
            | EptViolationQual::GLA_VALID
            | EptViolationQual::GLA_TRANSLATION;
        let f = NestedFault::EptViolation {
            gpa: Gpa::new(VA),
            qual,
            gla: Some(Gva::new(VA)),
        };
        assert_eq!(e, Walk2dError::Nested(NestedError::Fault(f)));
        // NPT: a not-present page (U, no P, bit 32).
        let np = |gfn: u64| if gfn == data { 0 } else { URW };
        let e = walk(&npt(), &setup(false, np), AccessKind::Read).unwrap_err();
        let f = NestedFault::Npf {
            exitinfo1: 0x4 | NPF_FINAL_TRANSLATION,
            exitinfo2: VA,
        };
        assert_eq!(e, Walk2dError::Nested(NestedError::Fault(f)));
        // NPT: a guest table page not writable: P|W|U, bit 33, the entry's gpa.
        let table = GUEST[1] >> 12;
        let ro = |gfn: u64| if gfn == table { PT_PRESENT | PT_USER } else { URW };
        let e = walk(&npt(), &setup(false, ro), AccessKind::Read).unwrap_err();
        let f = NestedFault::Npf {
            exitinfo1: 0x7 | NPF_GUEST_PAGE_TABLE,
            exitinfo2: GUEST[1],
        };
        assert_eq!(e, Walk2dError::Nested(NestedError::Fault(f)));
    }

    /// The classic cost of a two-dimensional TLB miss (Bhargava et al.,
    /// ASPLOS 2008): a 4-level guest walk over 4-level nested tables makes
    /// 4 x (4 + 1) + 4 = 24 memory references (each guest entry's gpa is
    /// translated, then read; then the final gpa is translated). Counted
    /// with every A/D bit already set, so no update is made.
    #[test]
    fn a_4_on_4_level_2d_walk_makes_24_references() {
        let host = setup(false, |_| URW | PT_ACCESSED | PT_DIRTY);
        for l in 0..3 {
            let a = Gpa::new(NESTED[l]);
            host.write_uint(a, 8, host.read_uint(a, 8) | PT_ACCESSED);
            let g = Gpa::new(GUEST[l] + HOST_OFFSET);
            host.write_uint(g, 8, host.read_uint(g, 8) | PT_ACCESSED);
        }
        let leaf = Gpa::new(GUEST[3] + HOST_OFFSET + 8 * 5);
        host.write_uint(leaf, 8, host.read_uint(leaf, 8) | PT_ACCESSED);
        let counted = crate::walker::CountingMemory::new(&host);
        let w = walk_2d(
            &guest(),
            &Root::Table(Gpa::new(GUEST[0])),
            Gva::new(VA),
            Access::new(AccessKind::Read, 3, false),
            0,
            &npt(),
            &counted,
        );
        assert!(w.is_ok(), "{w:?}");
        assert_eq!(counted.reads(), 24);
    }

    #[test]
    fn a_reserved_bit_is_a_misconfiguration_or_an_rsvd_npf() {
        let data = VA >> 12;
        // EPT: write without read.
        let w = |gfn: u64| if gfn == data { EPT_WRITE | (6 << 3) } else { RWX };
        let e = walk(&ept(false), &setup(true, w), AccessKind::Read).unwrap_err();
        assert_eq!(
            e,
            Walk2dError::Nested(NestedError::Fault(NestedFault::EptMisconfig { gpa: Gpa::new(VA) }))
        );
        // NPT: an address bit above MAXPHYADDR: P|U|RSVD.
        let high = |gfn: u64| if gfn == data { URW | 1 << 50 } else { URW };
        let e = walk(&npt(), &setup(false, high), AccessKind::Read).unwrap_err();
        let f = NestedFault::Npf {
            exitinfo1: 0xd | NPF_FINAL_TRANSLATION,
            exitinfo2: VA,
        };
        assert_eq!(e, Walk2dError::Nested(NestedError::Fault(f)));
    }
}
