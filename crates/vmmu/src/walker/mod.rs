//! The guest page-table walker: one implementation, generic over the entry
//! format, as KVM's `paging_tmpl.h`.
//!
//! [`Paging<F>`] holds what one paging configuration precomputes (root level,
//! reserved-bit masks, the permission bitmap, which levels may map large
//! pages); [`Paging::walk`] translates one address for one access over any
//! [`PtMemory`]. [`GuestPaging`] picks the format from the control registers.
//!
//! Architectural behaviour implemented (SDM vol. 3A ch. 4):
//! - non-canonical addresses in IA-32e paging are reported as #GP, before
//!   any paging structure is read;
//! - not-present entries, reserved bits (RSVD implies P), U/S, R/W with
//!   CR0.WP, XD with EFER.NXE, SMEP, SMAP with RFLAGS.AC and implicit
//!   supervisor accesses, protection keys with PKRU;
//! - PAE PDPTEs come from registers loaded at CR3 load, and are never
//!   written back;
//! - on success, Accessed is set on every entry of the walk and Dirty on the
//!   leaf of a write, each with compare-exchange; if an entry changed under
//!   the walker, the walk restarts from the root;
//! - a faulting walk changes nothing (x86 permits either for A bits, and
//!   never sets D on a faulting access).
//!
//! The walk visits at most one entry per level, so a table that points at
//! itself, or the same table used at every level, cannot make it loop.

mod memory;
pub mod nested;
pub mod sparse;

pub use memory::{CountingMemory, EntrySize, PtMemory};
pub use sparse::SparseMemory;

use std::marker::PhantomData;

use crate::addr::{Gfn, Gpa, Gva, PAGE_SHIFT, PageSize};
use crate::arch::control::{
    CR3_32_ROOT_MASK, CR3_LM_ROOT_MASK, CR3_PAE_PDPT_MASK, CpuFeatures, Cr0, Cr4, Efer, PagingMode,
};
use crate::arch::ept::PteEpt;
use crate::arch::perm::{Access, AccessRights, Permissions, pkru_denies};
use crate::arch::pfec::PfErrorCode;
use crate::arch::pte::{Pte32, Pte64, PteFormat};
use crate::arch::rsvd::RsvdBits;

/// One entry visited by a walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkEntry {
    /// The frame of the table holding the entry.
    pub table_gfn: Gfn,
    /// Where the entry is.
    pub pte_gpa: Gpa,
    /// The entry's value as the walk used it (before A/D were set).
    pub pte: u64,
    /// The rights granted by this entry and every entry above it.
    pub rights: AccessRights,
}

/// Where a walk led, without its per-level record ([`Walk`] less its
/// entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WalkOutcome {
    pub(crate) va: Gva,
    pub(crate) level: u8,
    pub(crate) page_size: PageSize,
    pub(crate) gpa: Gpa,
    pub(crate) rights: AccessRights,
    pub(crate) pkey: u8,
    pub(crate) dirty: bool,
}

/// A completed walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// The address translated (truncated to 32 bits in legacy modes).
    pub va: Gva,
    /// The level of the root table.
    pub root_level: u8,
    /// The level of the leaf (1 for a 4 KiB page).
    pub level: u8,
    /// The size of the page the leaf maps.
    pub page_size: PageSize,
    /// The physical address `va` translates to.
    pub gpa: Gpa,
    /// The effective rights, combined over all levels.
    pub rights: AccessRights,
    /// The protection key of the leaf (0 outside IA-32e paging).
    pub pkey: u8,
    /// Whether the leaf is (now) dirty.
    pub dirty: bool,
    /// Entries by level (`entries[level - 1]`), valid for `level..=root_level`.
    pub entries: [WalkEntry; 5],
}

impl Walk {
    /// The 4 KiB frame the access reaches.
    #[inline]
    pub fn gfn(&self) -> Gfn {
        self.gpa.frame()
    }

    /// The entry the walk used at `level`, if it visited that level.
    #[inline]
    pub fn entry(&self, level: u8) -> Option<&WalkEntry> {
        if level >= self.level && level <= self.root_level && level >= 1 {
            Some(&self.entries[level as usize - 1])
        } else {
            None
        }
    }

    /// The leaf entry (`None` without paging).
    #[inline]
    pub fn leaf(&self) -> Option<&WalkEntry> {
        self.entry(self.level)
    }

    /// The first frame of the (possibly large) page the leaf maps.
    #[inline]
    pub fn page_base_gfn(&self) -> Gfn {
        self.gpa.align_down(self.page_size.bytes()).frame()
    }
}

/// A page fault found by a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// The architectural error code.
    pub error_code: PfErrorCode,
    /// The level of the entry that faulted (the leaf for a permission fault).
    pub level: u8,
    /// That entry's value.
    pub pte: u64,
    /// Where that entry is.
    pub pte_gpa: Gpa,
    /// Rights combined over the entries above and including the faulting one.
    pub rights: AccessRights,
}

/// Why a walk did not produce a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError<E> {
    /// A #PF with its error code.
    PageFault(PageFault),
    /// A non-canonical address: #GP(0), no paging structure was read.
    NonCanonical,
    /// A paging-structure entry could not be reached.
    Memory {
        /// The entry's address.
        gpa: Gpa,
        /// The level of the table holding it.
        level: u8,
        /// The memory's error.
        error: E,
    },
}

impl<E> WalkError<E> {
    /// The #PF error code, if this is a page fault.
    pub fn error_code(&self) -> Option<PfErrorCode> {
        match self {
            WalkError::PageFault(pf) => Some(pf.error_code),
            _ => None,
        }
    }
}

/// The root of a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Root {
    /// A root table in memory.
    Table(Gpa),
    /// PAE paging: the PDPT's address and the four PDPTE registers loaded at
    /// CR3 load.
    PaeRegs {
        /// The PDPT's address (CR3 bits 31:5).
        pdpt: Gpa,
        /// The PDPTE registers.
        pdptes: [u64; 4],
    },
}

/// Whether a walk sets Accessed/Dirty bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AdMode {
    Update,
    Peek,
}

/// One paging configuration, precomputed (KVM's `struct kvm_mmu` cpu role).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging<F: PteFormat> {
    root_level: u8,
    rsvd: RsvdBits,
    perm: Permissions,
    /// Bit `l` set: a leaf may sit at level `l` (bit 7 = page size).
    large_levels: u8,
    /// Whether A/D bits are maintained (always for x86 paging; EPTP bit 6).
    ad: bool,
    /// Whether a fetch fault reports the I/D bit (NX in PAE/IA-32e, or SMEP).
    fetch_reports_id: bool,
    /// CR4.PKE in IA-32e paging.
    pkeys: bool,
    cr0_wp: bool,
    /// 0 = no canonicality rule; else the linear-address width.
    canonical_bits: u32,
    va_mask: u64,
    _format: PhantomData<F>,
}

/// The guest's control state a walk depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ControlRegs {
    /// CR0.
    pub cr0: Cr0,
    /// CR4.
    pub cr4: Cr4,
    /// IA32_EFER.
    pub efer: Efer,
}

impl ControlRegs {
    /// The paging mode these registers select.
    pub fn mode(&self) -> PagingMode {
        PagingMode::from_regs(self.cr0, self.cr4, self.efer)
    }
}

impl Paging<Pte32> {
    /// 32-bit paging with the given control registers.
    pub fn bits32(regs: &ControlRegs, features: &CpuFeatures) -> Self {
        let pse = regs.cr4.contains(Cr4::PSE);
        Self::guest_common(PagingMode::Bits32, regs, features, if pse { 1 << 2 } else { 0 })
    }
}

impl Paging<Pte64> {
    /// PAE, 4-level or 5-level paging (as `mode`) with the given registers.
    pub fn long_or_pae(mode: PagingMode, regs: &ControlRegs, features: &CpuFeatures) -> Self {
        debug_assert!(mode.has_pae());
        let large = if mode == PagingMode::Pae {
            1 << 2
        } else {
            (1 << 2) | (1 << 3)
        };
        Self::guest_common(mode, regs, features, large)
    }
}

impl Paging<PteEpt> {
    /// EPT with `levels` (4 or 5) levels and A/D flags as `ad` (EPTP bit 6).
    ///
    /// # Panics
    /// If `levels` is not 4 or 5 (the page-walk lengths EPT has; the caller
    /// chose it, the guest cannot).
    pub fn ept(levels: u8, ad: bool, features: &CpuFeatures) -> Self {
        assert!(
            matches!(levels, 4 | 5),
            "an EPT page walk has 4 or 5 levels, not {levels}"
        );
        Paging {
            root_level: levels,
            rsvd: RsvdBits::ept(features),
            perm: Permissions::ept(),
            large_levels: (1 << 2) | (1 << 3),
            ad,
            fetch_reports_id: true,
            pkeys: false,
            cr0_wp: false,
            canonical_bits: 0,
            va_mask: u64::MAX,
            _format: PhantomData,
        }
    }
}

impl<F: PteFormat> Paging<F> {
    fn guest_common(mode: PagingMode, regs: &ControlRegs, features: &CpuFeatures, large_levels: u8) -> Self {
        let nx = regs.efer.contains(Efer::NXE) && mode.has_pae();
        let smep = regs.cr4.contains(Cr4::SMEP);
        let cr0_wp = regs.cr0.contains(Cr0::WP);
        Paging {
            root_level: mode.root_level(),
            rsvd: RsvdBits::guest(mode, features, nx, regs.cr4.contains(Cr4::PSE)),
            perm: Permissions::guest(cr0_wp, smep, regs.cr4.contains(Cr4::SMAP)),
            large_levels,
            ad: true,
            fetch_reports_id: nx || smep,
            pkeys: mode.is_long() && regs.cr4.contains(Cr4::PKE),
            cr0_wp,
            canonical_bits: if mode.is_long() { mode.va_bits() } else { 0 },
            va_mask: if mode.is_long() { u64::MAX } else { 0xffff_ffff },
            _format: PhantomData,
        }
    }

    /// The level of the root table.
    pub fn root_level(&self) -> u8 {
        self.root_level
    }

    /// The reserved-bit masks in force.
    pub fn rsvd(&self) -> &RsvdBits {
        &self.rsvd
    }

    /// The permission bitmap in force.
    pub fn permissions(&self) -> &Permissions {
        &self.perm
    }

    /// Whether a leaf may sit at `level`.
    #[inline(always)]
    pub fn allows_large(&self, level: u8) -> bool {
        (self.large_levels >> level) & 1 != 0
    }

    /// The error-code bits that describe `access` (W, U, I/D).
    #[inline(always)]
    pub fn access_error_code(&self, access: Access) -> PfErrorCode {
        let mut pfec = PfErrorCode::empty();
        if access.is_write() {
            pfec |= PfErrorCode::WRITE;
        }
        if access.is_user() {
            pfec |= PfErrorCode::USER;
        }
        if access.is_fetch() && self.fetch_reports_id {
            pfec |= PfErrorCode::FETCH;
        }
        pfec
    }

    /// Whether `rights` (with protection key `pkey`) permit `access` under
    /// `pkru`; `None` if they do, else the error code of the #PF.
    #[inline(always)]
    pub fn check_access(&self, access: Access, rights: AccessRights, pkey: u8, pkru: u32) -> Option<PfErrorCode> {
        let mut pfec = self.access_error_code(access) | PfErrorCode::PRESENT;
        let mut fault = self.perm.faults(access.perm_index(), rights);
        if self.pkeys
            && !access.is_fetch()
            && rights.contains(AccessRights::USER)
            && pkru_denies(pkru, pkey, access.is_write(), access.is_user(), self.cr0_wp)
        {
            pfec |= PfErrorCode::PK;
            fault = true;
        }
        fault.then_some(pfec)
    }

    /// Translates `va` for `access`, setting Accessed/Dirty bits as the
    /// processor does on success.
    #[inline]
    pub fn walk<M: PtMemory>(
        &self,
        mem: &M,
        root: &Root,
        va: Gva,
        access: Access,
        pkru: u32,
    ) -> Result<Walk, WalkError<M::Error>> {
        self.walk_inner(mem, root, va, access, pkru, AdMode::Update)
    }

    /// Translates `va` for `access` without changing any entry (for checks
    /// and for the VMM's own lookups).
    #[inline]
    pub fn peek<M: PtMemory>(
        &self,
        mem: &M,
        root: &Root,
        va: Gva,
        access: Access,
        pkru: u32,
    ) -> Result<Walk, WalkError<M::Error>> {
        self.walk_inner(mem, root, va, access, pkru, AdMode::Peek)
    }

    /// [`Paging::walk`] for a caller that needs only where the walk led
    /// (the translation of a table's address through nested tables, five
    /// per two-dimensional walk): the per-level record stays on this
    /// frame instead of being copied out with the result.
    #[inline]
    pub(crate) fn walk_outcome<M: PtMemory>(
        &self,
        mem: &M,
        root: &Root,
        va: Gva,
        access: Access,
        pkru: u32,
    ) -> Result<WalkOutcome, WalkError<M::Error>> {
        let mut entries = [WalkEntry::default(); 5];
        self.walk_into(mem, root, va, access, pkru, AdMode::Update, &mut entries)
    }

    #[inline(always)]
    fn walk_inner<M: PtMemory>(
        &self,
        mem: &M,
        root: &Root,
        va: Gva,
        access: Access,
        pkru: u32,
        ad: AdMode,
    ) -> Result<Walk, WalkError<M::Error>> {
        let mut entries = [WalkEntry::default(); 5];
        let o = self.walk_into(mem, root, va, access, pkru, ad, &mut entries)?;
        Ok(Walk {
            va: o.va,
            root_level: self.root_level,
            level: o.level,
            page_size: o.page_size,
            gpa: o.gpa,
            rights: o.rights,
            pkey: o.pkey,
            dirty: o.dirty,
            entries,
        })
    }

    /// The walk, recording each level's entry into `entries`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn walk_into<M: PtMemory>(
        &self,
        mem: &M,
        root: &Root,
        va: Gva,
        access: Access,
        pkru: u32,
        ad: AdMode,
        entries: &mut [WalkEntry; 5],
    ) -> Result<WalkOutcome, WalkError<M::Error>> {
        if self.canonical_bits != 0 && !crate::arch::control::is_canonical(va.raw(), self.canonical_bits) {
            return Err(WalkError::NonCanonical);
        }
        let va = va.raw() & self.va_mask;
        'restart: loop {
            *entries = [WalkEntry::default(); 5];
            let mut rights = AccessRights::all();
            let mut level = self.root_level;
            let mut table = match root {
                Root::Table(gpa) => gpa.raw(),
                Root::PaeRegs { pdpt, .. } => pdpt.raw(),
            };
            let leaf_pte = loop {
                let index = F::index(va, level);
                let pte_gpa;
                let pte;
                let pdpte_reg = matches!(root, Root::PaeRegs { .. }) && level == 3;
                if let (true, Root::PaeRegs { pdpt, pdptes }) = (pdpte_reg, root) {
                    pte_gpa = Gpa::new(pdpt.raw() + 8 * index);
                    pte = pdptes[index as usize & 3];
                } else {
                    pte_gpa = Gpa::new(table + index * F::SIZE.bytes());
                    pte = mem.read_entry(pte_gpa, F::SIZE).map_err(|error| WalkError::Memory {
                        gpa: pte_gpa,
                        level,
                        error,
                    })?;
                }
                let fault = |error_code: PfErrorCode, rights: AccessRights| {
                    WalkError::PageFault(PageFault {
                        error_code,
                        level,
                        pte,
                        pte_gpa,
                        rights,
                    })
                };
                if !F::is_present(pte) {
                    return Err(fault(self.access_error_code(access), rights));
                }
                // Bit 7 makes a leaf only at levels that may hold one.
                let leaf = level == 1 || ((self.large_levels as u64 >> level) & (pte >> 7) & 1) != 0;
                let reserved =
                    self.rsvd.has_reserved_bits(pte, level) || (F::HAS_MEMTYPE && self.rsvd.is_bad_mt_xwr(pte, leaf));
                if reserved {
                    return Err(fault(
                        self.access_error_code(access) | PfErrorCode::PRESENT | PfErrorCode::RSVD,
                        rights,
                    ));
                }
                if !pdpte_reg {
                    rights &= F::rights(pte);
                }
                entries[level as usize - 1] = WalkEntry {
                    table_gfn: Gpa::new(table).frame(),
                    pte_gpa,
                    pte,
                    rights,
                };
                if leaf {
                    break pte;
                }
                table = F::table_addr(pte);
                level -= 1;
            };

            let pkey = F::pkey(leaf_pte);
            if let Some(error_code) = self.check_access(access, rights, pkey, pkru) {
                return Err(WalkError::PageFault(PageFault {
                    error_code,
                    level,
                    pte: leaf_pte,
                    pte_gpa: entries[level as usize - 1].pte_gpa,
                    rights,
                }));
            }

            let set_dirty = access.is_write();
            if ad == AdMode::Update && self.ad {
                for l in (level..=self.root_level).rev() {
                    if l == 3 && matches!(root, Root::PaeRegs { .. }) {
                        continue;
                    }
                    let e = &entries[l as usize - 1];
                    let want = F::ACCESSED | if l == level && set_dirty { F::DIRTY } else { 0 };
                    if e.pte & want != want {
                        match mem.cmpxchg_entry(e.pte_gpa, F::SIZE, e.pte, e.pte | want) {
                            Ok(Ok(())) => {}
                            Ok(Err(_changed)) => continue 'restart,
                            Err(error) => {
                                return Err(WalkError::Memory {
                                    gpa: e.pte_gpa,
                                    level: l,
                                    error,
                                });
                            }
                        }
                    }
                }
            }

            let size = F::leaf_size(level);
            let page_size = match (F::INDEX_BITS, level) {
                (10, 2) => PageSize::Size4M,
                (_, 3) => PageSize::Size1G,
                (_, 2) => PageSize::Size2M,
                _ => PageSize::Size4K,
            };
            let gpa = F::leaf_addr(leaf_pte, level) | (va & (size - 1));
            return Ok(WalkOutcome {
                va: Gva::new(va),
                level,
                page_size,
                gpa: Gpa::new(gpa),
                rights,
                pkey,
                // Without A/D flags there is no D to set: a write needs no
                // walk to mark the page dirty.
                dirty: !self.ad || (leaf_pte & F::DIRTY != 0) || (set_dirty && ad == AdMode::Update),
            });
        }
    }
}

/// The guest's paging, with the format chosen by the control registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestPaging {
    /// CR0.PG = 0: linear addresses are physical.
    None,
    /// 32-bit paging.
    Bits32(Paging<Pte32>),
    /// PAE, 4-level or 5-level paging.
    Pae64(Paging<Pte64>, PagingMode),
    /// An L1 hypervisor's EPT, walked as the tables a shadow MMU shadows
    /// (KVM's `PTTYPE_EPT` instance of `paging_tmpl.h`): addresses are
    /// L2-physical, accesses user accesses (readable stands for user).
    Ept(Paging<PteEpt>),
}

/// Where a guest paging format keeps the bits a shadow MMU compares when it
/// checks that a guest entry still says what an SPTE was built from (KVM's
/// `is_present_gpte`, `PT_GUEST_ACCESSED_MASK`, `PT_GUEST_DIRTY_MASK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpteBits {
    /// Any of these set: present (P; EPT: R, W or X).
    pub present: u64,
    /// Accessed (0: the format keeps none, every entry counts as used).
    pub accessed: u64,
    /// Dirty (0: the format keeps none, every leaf counts as dirty).
    pub dirty: u64,
}

impl GpteBits {
    /// The x86 paging formats (32-bit, PAE, IA-32e, and AMD NPT).
    pub const X86: GpteBits = GpteBits {
        present: crate::arch::pte::PT_PRESENT,
        accessed: crate::arch::pte::PT_ACCESSED,
        dirty: crate::arch::pte::PT_DIRTY,
    };

    /// EPT, with accessed and dirty flags as `ad` (EPTP bit 6).
    pub const fn ept(ad: bool) -> GpteBits {
        GpteBits {
            present: crate::arch::ept::EPT_RWX,
            accessed: if ad { crate::arch::ept::EPT_ACCESSED } else { 0 },
            dirty: if ad { crate::arch::ept::EPT_DIRTY } else { 0 },
        }
    }

    /// Both A and D.
    pub const fn ad(&self) -> u64 {
        self.accessed | self.dirty
    }

    /// Whether the entry is present and used (accessed, where the format
    /// says).
    pub const fn is_used(&self, pte: u64) -> bool {
        pte & self.present != 0 && pte & self.accessed == self.accessed
    }

    /// The entry as a successful walk left it: accessed, and dirty when
    /// `dirty`.
    pub const fn as_walked(&self, pte: u64, dirty: bool) -> u64 {
        pte | self.accessed | if dirty { self.dirty } else { 0 }
    }

    /// Whether an SPTE built from `recorded` (as walked) still translates
    /// as the guest entry `now` does: present and used, the same but for
    /// A/D, and dirty if it was recorded dirty (a clean entry's SPTE is
    /// read-only, so a D set since changes nothing it allows).
    pub const fn still_valid(&self, recorded: u64, now: u64) -> bool {
        self.is_used(now) && (now ^ recorded) & !self.ad() == 0 && (recorded & self.dirty == 0 || now & self.dirty != 0)
    }
}

impl GuestPaging {
    /// The configuration the control registers select.
    pub fn new(regs: &ControlRegs, features: &CpuFeatures) -> GuestPaging {
        match regs.mode() {
            PagingMode::None => GuestPaging::None,
            PagingMode::Bits32 => GuestPaging::Bits32(Paging::bits32(regs, features)),
            mode => GuestPaging::Pae64(Paging::long_or_pae(mode, regs, features), mode),
        }
    }

    /// The paging mode.
    pub fn mode(&self) -> PagingMode {
        match self {
            GuestPaging::None => PagingMode::None,
            GuestPaging::Bits32(_) => PagingMode::Bits32,
            GuestPaging::Pae64(_, mode) => *mode,
            GuestPaging::Ept(p) if p.root_level() == 5 => PagingMode::Level5,
            GuestPaging::Ept(_) => PagingMode::Level4,
        }
    }

    /// Where its entries keep present, accessed and dirty.
    pub fn gpte_bits(&self) -> GpteBits {
        match self {
            GuestPaging::Ept(p) => GpteBits::ept(p.ad),
            _ => GpteBits::X86,
        }
    }

    /// Whether protection keys apply (CR4.PKE in IA-32e paging).
    pub fn pkeys(&self) -> bool {
        match self {
            GuestPaging::Pae64(p, _) => p.pkeys,
            _ => false,
        }
    }

    /// The root for `cr3` (for EPT, the EPTP): the table it names, or for PAE the PDPT and the
    /// PDPTE registers `pdptes` (see [`load_pdptes`]).
    pub fn root(&self, cr3: u64, pdptes: [u64; 4]) -> Root {
        if let GuestPaging::Ept(_) = self {
            return Root::Table(Gpa::new(cr3 & crate::arch::pte::PT64_ADDR_MASK));
        }
        match self.mode() {
            PagingMode::None => Root::Table(Gpa::new(0)),
            PagingMode::Bits32 => Root::Table(Gpa::new(cr3 & CR3_32_ROOT_MASK)),
            PagingMode::Pae => Root::PaeRegs {
                pdpt: Gpa::new(cr3 & CR3_PAE_PDPT_MASK),
                pdptes,
            },
            PagingMode::Level4 | PagingMode::Level5 => Root::Table(Gpa::new(cr3 & CR3_LM_ROOT_MASK)),
        }
    }

    /// The fault (an error code) these paging rules give an access with
    /// cached `rights` and protection key `pkey` under `pkru`, if any
    /// (none without paging but a fetch the rights forbid).
    #[inline]
    pub fn check_access(&self, access: Access, rights: AccessRights, pkey: u8, pkru: u32) -> Option<PfErrorCode> {
        match self {
            GuestPaging::None => {
                (access.is_fetch() && !rights.contains(AccessRights::EXEC)).then_some(PfErrorCode::FETCH)
            }
            GuestPaging::Bits32(p) => p.check_access(access, rights, pkey, pkru),
            GuestPaging::Pae64(p, _) => p.check_access(access, rights, pkey, pkru),
            GuestPaging::Ept(p) => p.check_access(access, rights, pkey, pkru),
        }
    }

    /// Translates `va` for `access`, setting A/D bits on success.
    pub fn walk<M: PtMemory>(
        &self,
        mem: &M,
        root: &Root,
        va: Gva,
        access: Access,
        pkru: u32,
    ) -> Result<Walk, WalkError<M::Error>> {
        match self {
            GuestPaging::None => Ok(identity_walk(va)),
            GuestPaging::Bits32(p) => p.walk(mem, root, va, access, pkru),
            GuestPaging::Pae64(p, _) => p.walk(mem, root, va, access, pkru),
            GuestPaging::Ept(p) => p.walk(mem, root, va, access, pkru),
        }
    }

    /// Translates `va` for `access` without side effects.
    pub fn peek<M: PtMemory>(
        &self,
        mem: &M,
        root: &Root,
        va: Gva,
        access: Access,
        pkru: u32,
    ) -> Result<Walk, WalkError<M::Error>> {
        match self {
            GuestPaging::None => Ok(identity_walk(va)),
            GuestPaging::Bits32(p) => p.peek(mem, root, va, access, pkru),
            GuestPaging::Pae64(p, _) => p.peek(mem, root, va, access, pkru),
            GuestPaging::Ept(p) => p.peek(mem, root, va, access, pkru),
        }
    }
}

fn identity_walk(va: Gva) -> Walk {
    let va = va.raw() & 0xffff_ffff;
    Walk {
        va: Gva::new(va),
        root_level: 0,
        level: 1,
        page_size: PageSize::Size4K,
        gpa: Gpa::new(va),
        rights: AccessRights::all(),
        pkey: 0,
        // No leaf whose D bit a write must set: a cached translation serves
        // writes at once.
        dirty: true,
        entries: [WalkEntry::default(); 5],
    }
}

/// Why PDPTEs could not be loaded: MOV to CR3 (or to CR0/CR4 entering PAE
/// paging) raises #GP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdpteLoadError<E> {
    /// PDPTE `index` is present and has a reserved bit set.
    Reserved {
        /// Which PDPTE.
        index: usize,
        /// Its value.
        value: u64,
    },
    /// The PDPT could not be read.
    Memory(E),
}

/// Loads the four PDPTE registers for PAE paging from the PDPT `cr3` names,
/// checking their reserved bits as MOV to CR3 does.
pub fn load_pdptes<M: PtMemory>(
    mem: &M,
    cr3: u64,
    features: &CpuFeatures,
) -> Result<[u64; 4], PdpteLoadError<M::Error>> {
    let base = cr3 & CR3_PAE_PDPT_MASK;
    let rsvd = RsvdBits::guest(PagingMode::Pae, features, true, false);
    let mut pdptes = [0u64; 4];
    for (index, slot) in pdptes.iter_mut().enumerate() {
        let value = mem
            .read_entry(Gpa::new(base + 8 * index as u64), EntrySize::Eight)
            .map_err(PdpteLoadError::Memory)?;
        if Pte64::is_present(value) && rsvd.is_reserved(value, 3, false) {
            return Err(PdpteLoadError::Reserved { index, value });
        }
        *slot = value;
    }
    Ok(pdptes)
}

/// Frame number of a byte address, for callers holding raw values.
#[inline(always)]
pub fn gfn_of(addr: u64) -> Gfn {
    Gfn::new(addr >> PAGE_SHIFT)
}

#[cfg(test)]
mod tests;
