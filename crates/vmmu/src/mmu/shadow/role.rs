//! Shadow page roles (KVM's `union kvm_mmu_page_role`).
//!
//! A shadow page table is found by (gfn, role): two guest contexts may share
//! a shadow page exactly when they would fill it with the same SPTEs. So a
//! role holds exactly what changes the translation, and every bit that means
//! nothing for a page is normalised to one value, in one place
//! (`Role::normalise`), called by every constructor. The lesson of seed
//! `001_*`: KVM cleared `cr4_pae` for direct pages at one call site and not
//! at another, so equal translations got different roles (a `prev_roots` miss,
//! a duplicate tree) and code that read the bit had to guess which convention
//! applied. Here a [`Role`] cannot be built un-normalised, its fields are
//! private, and a test checks every constructor against the normal form.
//!
//! Inherited access uses [`AccessRights`](crate::arch::perm::AccessRights),
//! whose bits are KVM's `ACC_EXEC_MASK`, `ACC_WRITE_MASK`, `ACC_USER_MASK`.
//!
//! What shapes the translation of a shadow page:
//! - `level` and whether the page is `direct` (it shadows no guest table:
//!   paging off, or the pieces of a guest huge page);
//! - for an indirect page, whether the guest table has 4-byte entries (32-bit
//!   paging) and then which `quadrant` of the guest table the 512-entry shadow
//!   page covers;
//! - the `access` inherited from the guest entries above (user, write, exec);
//! - CR0.WP (with WP = 0 supervisor writes to read-only pages are emulated by
//!   writable, user-inaccessible SPTEs), and SMEP/SMAP/PKE only when WP = 0
//!   (they change how that emulation must restrict the SPTE; PKE only in
//!   IA-32e paging, the only paging with protection keys);
//! - EFER.NX, only for guest tables with 8-byte entries (4-byte entries have
//!   no XD bit);
//! - the address space (SMM) and guest mode (nested), and `invalid` (a zapped
//!   root still referenced by vCPUs);
//! - for an indirect page, whether the guest table is an L1 hypervisor's
//!   EPT, and then whether its A/D flags are on (KVM's `role.ad_disabled`;
//!   KVM needs no EPT bit because an MMU context shadows one format, vmmu
//!   keeps it so a page says how to read its own guest entries).
//!
//! With paging off the guest has no protections at all: every bit but
//! level, direct, access and the address space is meaningless and zero.

use crate::addr::Level;
use crate::arch::control::{Cr0, Cr4, Efer, PagingMode};
use crate::arch::perm::AccessRights as Acc;
use crate::walker::ControlRegs;

/// The guest paging state that shapes shadow pages (the base of KVM's
/// `cpu_role`), read from the vCPU's control registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestContext {
    mode: PagingMode,
    cr0_wp: bool,
    smep: bool,
    smap: bool,
    efer_nx: bool,
    /// CR4.PKE in IA-32e paging (protection keys apply).
    pke: bool,
    smm: bool,
    /// The tables shadowed are an L1 hypervisor's nested tables for its L2
    /// guest (KVM's `role.guest_mode`): their pages never share a hash
    /// entry with the pages of L1's own tables.
    guest_mode: bool,
    /// The tables shadowed are EPT (an L1 hypervisor's EPT12).
    ept: bool,
    /// EPT without accessed and dirty flags (EPTP bit 6 clear).
    ad_disabled: bool,
}

impl GuestContext {
    /// The context of a vCPU with `regs`, in SMM or not.
    pub fn new(regs: &ControlRegs, smm: bool) -> GuestContext {
        if crate::sync::bug(crate::sync::Bug::RoleIgnoresControls) {
            return GuestContext {
                mode: regs.mode(),
                cr0_wp: true,
                smep: false,
                smap: regs.cr4.contains(Cr4::SMAP),
                efer_nx: true,
                pke: false,
                smm,
                guest_mode: false,
                ept: false,
                ad_disabled: false,
            };
        }
        GuestContext {
            mode: regs.mode(),
            cr0_wp: regs.cr0.contains(Cr0::WP),
            smep: regs.cr4.contains(Cr4::SMEP),
            smap: regs.cr4.contains(Cr4::SMAP),
            efer_nx: regs.efer.contains(Efer::NXE),
            pke: regs.mode().is_long() && regs.cr4.contains(Cr4::PKE),
            smm,
            guest_mode: false,
            ept: false,
            ad_disabled: false,
        }
    }

    /// The context of an L1 hypervisor's NPT for its L2 guest (KVM's
    /// `kvm_init_shadow_npt_mmu`): the x86-64 format with `levels` (4 or 5)
    /// levels, the host's EFER.NXE as `nxe`, and nothing else of the
    /// guest's: NPT accesses are user accesses, so CR0.WP, SMEP, SMAP and
    /// protection keys play no part (CR0.WP is set, the form in which it
    /// changes nothing).
    pub fn nested_npt(levels: u8, nxe: bool) -> GuestContext {
        GuestContext {
            mode: if levels == 5 {
                PagingMode::Level5
            } else {
                PagingMode::Level4
            },
            cr0_wp: true,
            smep: false,
            smap: false,
            efer_nx: nxe,
            pke: false,
            smm: false,
            guest_mode: true,
            ept: false,
            ad_disabled: false,
        }
    }

    /// The context of an L1 hypervisor's EPT for its L2 guest (KVM's
    /// `kvm_init_shadow_ept_mmu`): `levels` (4 or 5) levels, A/D flags as
    /// `ad`. EPT accesses are checked as user accesses with readable for
    /// user; EPT has no XD, CR0.WP, SMEP, SMAP or protection keys (CR0.WP
    /// is set, the form in which it changes nothing).
    pub fn nested_ept(levels: u8, ad: bool) -> GuestContext {
        GuestContext {
            ept: true,
            ad_disabled: !ad,
            efer_nx: false,
            ..GuestContext::nested_npt(levels, false)
        }
    }

    /// Whether the tables are an L1 hypervisor's nested tables.
    pub fn guest_mode(&self) -> bool {
        self.guest_mode
    }

    /// The guest paging mode.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// Levels of the shadow tree: 5 or 4 for 5- and 4-level guests, 3 for
    /// PAE and 32-bit guests (shadowed with PAE-format tables under a
    /// 4-entry root table) and for paging off (identity map of 4 GiB).
    pub fn root_level(&self) -> Level {
        match self.mode {
            PagingMode::Level5 => Level::L5,
            PagingMode::Level4 => Level::L4,
            PagingMode::Pae | PagingMode::Bits32 | PagingMode::None => Level::L3,
        }
    }

    /// The level of the shadow page at the root of a tree: the root level,
    /// or 2 for each of the four PAE roots below the 3-level tree's top.
    pub fn root_page_level(&self) -> Level {
        match self.root_level() {
            Level::L3 => Level::L2,
            l => l,
        }
    }

    /// Whether the guest's paging-structure entries are 4 bytes.
    pub fn has_4_byte_gpte(&self) -> bool {
        self.mode == PagingMode::Bits32
    }
}

/// How a cached root (`prev_roots`) is matched to the context that wants
/// it: seed 001's question, a runtime policy of the MMU
/// ([`crate::mmu::shadow::ShadowMmu::set_prev_roots_match`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PrevRootsMatch {
    /// The root page's role against the context's normalised root role
    /// (KVM since the thread: the bits a root does not use are equal on
    /// both sides, so an equal translation always matches).
    #[default]
    Normalised,
    /// The root page's (normalised) role against the context's raw bits,
    /// as KVM compared before the thread: a direct root's page has
    /// `cr4_pae` (here EFER.NX, the 4-byte-entry bit) cleared and the
    /// MMU's role does not, so a direct root is never reused.
    Unnormalised,
}

/// The role of a shadow page: with its gfn, the key of the page hash.
/// Always normalised; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Role {
    level: Level,
    direct: bool,
    has_4_byte_gpte: bool,
    quadrant: u8,
    access: Acc,
    cr0_wp: bool,
    smep_andnot_wp: bool,
    smap_andnot_wp: bool,
    pke_andnot_wp: bool,
    efer_nx: bool,
    smm: bool,
    guest_mode: bool,
    ept: bool,
    ad_disabled: bool,
    invalid: bool,
}

impl Role {
    /// The role of a root for `ctx` at `level` (the root level, or 2 for
    /// each of the four PAE roots, with `quadrant` = the PDPTE index for a
    /// 32-bit guest). Direct when paging is off.
    pub fn root(ctx: &GuestContext, level: Level, quadrant: u8) -> Role {
        Role::new(ctx, level, ctx.mode == PagingMode::None, quadrant, Acc::all())
    }

    /// The role of the page linked below an SPTE of `self` at entry `index`:
    /// one level down, `direct` when it shadows the pieces of a guest huge
    /// page, with the inherited `access` (KVM's `kvm_mmu_child_role`). The
    /// quadrant of a 4-byte-gpte page table is which half of the guest's
    /// 1024-entry table it covers: the parity of the parent's entry (two
    /// 2 MiB shadow PDEs per 4 MiB guest PDE).
    pub fn child(self, index: usize, direct: bool, access: Acc) -> Role {
        let quadrant = if self.has_4_byte_gpte { (index & 1) as u8 } else { 0 };
        Role {
            level: self.level.down().expect("a 4K page has no children"),
            direct: self.direct || direct,
            quadrant,
            access,
            ..self
        }
        .normalise()
    }

    fn new(ctx: &GuestContext, level: Level, direct: bool, quadrant: u8, access: Acc) -> Role {
        Role::raw(ctx, level, direct, quadrant, access).normalise()
    }

    /// The fields as `ctx` gives them, before normalisation: never a page's
    /// role (every constructor normalises), only what the un-normalised
    /// comparison of [`PrevRootsMatch::Unnormalised`] compares with.
    fn raw(ctx: &GuestContext, level: Level, direct: bool, quadrant: u8, access: Acc) -> Role {
        Role {
            level,
            direct,
            has_4_byte_gpte: ctx.has_4_byte_gpte(),
            quadrant,
            access,
            cr0_wp: ctx.cr0_wp,
            smep_andnot_wp: ctx.smep && !ctx.cr0_wp,
            smap_andnot_wp: ctx.smap && !ctx.cr0_wp,
            pke_andnot_wp: ctx.pke && !ctx.cr0_wp,
            efer_nx: ctx.efer_nx,
            smm: ctx.smm,
            guest_mode: ctx.guest_mode,
            ept: ctx.ept,
            ad_disabled: ctx.ad_disabled,
            invalid: false,
        }
    }

    /// Whether this role, a root page's, is the role `ctx` wants for its
    /// root, compared as `how` says (KVM's `is_root_usable`: the cached
    /// root's page role against the MMU's root role). The quadrant of a
    /// 32-bit guest's PAE roots is the root's own.
    pub fn is_root_role_of(&self, ctx: &GuestContext, how: PrevRootsMatch) -> bool {
        let (level, direct) = (ctx.root_page_level(), ctx.mode == PagingMode::None);
        let want = Role::raw(ctx, level, direct, self.quadrant, Acc::all());
        match how {
            PrevRootsMatch::Normalised => *self == want.normalise(),
            PrevRootsMatch::Unnormalised => *self == want,
        }
    }

    /// The one normal form: clears every bit that means nothing for this
    /// page. Idempotent.
    fn normalise(mut self) -> Role {
        if self.direct {
            // A direct page's SPTEs are computed from the gfn and `access`,
            // never read from guest entries: entry size and quadrant are
            // meaningless, and `access` already carries the guest's XD.
            self.has_4_byte_gpte = false;
            self.efer_nx = false;
            self.ept = false;
        }
        if !self.ept {
            self.ad_disabled = false;
        }
        if self.has_4_byte_gpte {
            // 4-byte guest entries have no XD bit.
            self.efer_nx = false;
            // Quadrants exist for the 4K table (2 halves) and the page
            // directory (4 quarters, one per PAE root); not above.
            let quadrants = match self.level {
                Level::L1 => 2,
                Level::L2 => 4,
                _ => 1,
            };
            self.quadrant %= quadrants;
        } else {
            self.quadrant = 0;
        }
        if self.cr0_wp {
            self.smep_andnot_wp = false;
            self.smap_andnot_wp = false;
            self.pke_andnot_wp = false;
        }
        if self.pke_andnot_wp {
            // Under protection keys no user page is served by a supervisor
            // SPTE (those writes are emulated), and SMEP/SMAP only shape
            // that conversion.
            self.smep_andnot_wp = false;
            self.smap_andnot_wp = false;
        }
        self
    }

    /// Whether the role is in normal form (for assertions).
    pub fn is_normalised(&self) -> bool {
        self.normalise() == *self
    }

    /// The same role marked invalid (a zapped root that vCPUs still hold).
    pub fn invalidated(self) -> Role {
        Role { invalid: true, ..self }
    }

    /// Level, 1 = 4K.
    pub fn level(&self) -> Level {
        self.level
    }
    /// Shadows no guest table.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
    /// The shadowed guest table has 4-byte entries.
    pub fn has_4_byte_gpte(&self) -> bool {
        self.has_4_byte_gpte
    }
    /// Which part of a 4-byte-entry guest table this page covers.
    pub fn quadrant(&self) -> u8 {
        self.quadrant
    }
    /// Access inherited from the guest entries above.
    pub fn access(&self) -> Acc {
        self.access
    }
    /// CR0.WP.
    pub fn cr0_wp(&self) -> bool {
        self.cr0_wp
    }
    /// CR4.SMEP with CR0.WP = 0.
    pub fn smep_andnot_wp(&self) -> bool {
        self.smep_andnot_wp
    }
    /// CR4.SMAP with CR0.WP = 0.
    pub fn smap_andnot_wp(&self) -> bool {
        self.smap_andnot_wp
    }
    /// CR4.PKE (IA-32e paging) with CR0.WP = 0.
    pub fn pke_andnot_wp(&self) -> bool {
        self.pke_andnot_wp
    }
    /// EFER.NX, for 8-byte guest entries.
    pub fn efer_nx(&self) -> bool {
        self.efer_nx
    }
    /// The SMM address space.
    pub fn smm(&self) -> bool {
        self.smm
    }
    /// Zapped while still a root.
    pub fn is_invalid(&self) -> bool {
        self.invalid
    }
    /// The shadowed guest table is EPT.
    pub fn is_ept(&self) -> bool {
        self.ept
    }
    /// Where the shadowed guest table's entries keep present, A and D.
    pub fn gpte_bits(&self) -> crate::walker::GpteBits {
        if self.ept {
            crate::walker::GpteBits::ept(!self.ad_disabled)
        } else {
            crate::walker::GpteBits::X86
        }
    }
    /// Bytes per guest entry of the shadowed table (0 for direct pages).
    pub fn gpte_size(&self) -> usize {
        match (self.direct, self.has_4_byte_gpte) {
            (true, _) => 0,
            (false, true) => 4,
            (false, false) => 8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(mode: PagingMode, wp: bool, smep: bool, smap: bool, nx: bool) -> ControlRegs {
        let mut cr0 = Cr0::PE;
        let mut cr4 = Cr4::empty();
        let mut efer = Efer::empty();
        if mode != PagingMode::None {
            cr0 |= Cr0::PG;
        }
        match mode {
            PagingMode::None | PagingMode::Bits32 => {}
            PagingMode::Pae => cr4 |= Cr4::PAE,
            PagingMode::Level4 => {
                cr4 |= Cr4::PAE;
                efer |= Efer::LME | Efer::LMA;
            }
            PagingMode::Level5 => {
                cr4 |= Cr4::PAE | Cr4::LA57;
                efer |= Efer::LME | Efer::LMA;
            }
        }
        cr0.set(Cr0::WP, wp);
        cr4.set(Cr4::SMEP, smep);
        cr4.set(Cr4::SMAP, smap);
        efer.set(Efer::NXE, nx);
        ControlRegs { cr0, cr4, efer }
    }

    const MODES: [PagingMode; 5] = [
        PagingMode::None,
        PagingMode::Bits32,
        PagingMode::Pae,
        PagingMode::Level4,
        PagingMode::Level5,
    ];

    /// Every context × every constructor path.
    fn all_roles() -> Vec<(GuestContext, Role)> {
        let mut out = Vec::new();
        let mut contexts = Vec::new();
        for mode in MODES {
            for bits in 0..16u8 {
                let ctx = GuestContext::new(
                    &regs(mode, bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0),
                    false,
                );
                assert_eq!(ctx.mode(), mode);
                contexts.push(ctx);
            }
        }
        for levels in [4, 5] {
            for flag in [false, true] {
                contexts.push(GuestContext::nested_npt(levels, flag));
                contexts.push(GuestContext::nested_ept(levels, flag));
            }
        }
        for ctx in contexts {
            {
                for q in 0..4 {
                    let root = Role::root(&ctx, ctx.root_page_level(), q);
                    out.push((ctx, root));
                    let mut r = root;
                    while r.level() > Level::L1 {
                        for (index, direct, access) in
                            [(0, false, Acc::all()), (1, true, Acc::USER), (3, false, Acc::WRITE)]
                        {
                            out.push((ctx, r.child(index, direct, access)));
                        }
                        r = r.child(1, false, Acc::all());
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_constructor_yields_the_normal_form() {
        for (ctx, r) in all_roles() {
            assert!(r.is_normalised(), "{ctx:?} → {r:?}");
            assert!(
                !r.is_direct() || (!r.has_4_byte_gpte() && r.quadrant() == 0 && !r.efer_nx()),
                "{r:?}"
            );
            assert!(r.has_4_byte_gpte() || r.quadrant() == 0, "{r:?}");
            assert!(!r.is_direct() || !r.is_ept(), "{r:?}");
            assert!(r.is_ept() || r.gpte_bits() == crate::walker::GpteBits::X86, "{r:?}");
            assert!(
                !r.cr0_wp() || (!r.smep_andnot_wp() && !r.smap_andnot_wp() && !r.pke_andnot_wp()),
                "{r:?}"
            );
        }
    }

    /// Seed 001: a direct page must not depend on how the guest's tables
    /// are laid out; a 32-bit guest's and a PAE guest's direct pages for
    /// the same access are the same page.
    #[test]
    fn direct_pages_are_shared_across_guest_entry_sizes() {
        let c32 = GuestContext::new(&regs(PagingMode::Bits32, true, false, false, true), false);
        let cpae = GuestContext::new(&regs(PagingMode::Pae, true, false, false, true), false);
        let d32 = Role::root(&c32, Level::L2, 1).child(0, true, Acc::all());
        let dpae = Role::root(&cpae, Level::L2, 0).child(0, true, Acc::all());
        assert_eq!(d32, dpae);
        assert_eq!(d32.gpte_size(), 0);
        // …while their indirect pages differ (4- vs 8-byte entries).
        assert_ne!(Role::root(&c32, Level::L2, 0), Role::root(&cpae, Level::L2, 0));
    }

    #[test]
    fn smep_and_smap_matter_only_without_wp() {
        let with_wp = |smep, smap| GuestContext::new(&regs(PagingMode::Level4, true, smep, smap, true), false);
        let r = |c: GuestContext| Role::root(&c, Level::L4, 0);
        assert_eq!(r(with_wp(false, false)), r(with_wp(true, true)));
        let no_wp = |smep, smap| GuestContext::new(&regs(PagingMode::Level4, false, smep, smap, true), false);
        assert_ne!(r(no_wp(false, false)), r(no_wp(true, false)));
        assert_ne!(r(no_wp(false, false)), r(no_wp(false, true)));
        assert_ne!(
            r(with_wp(false, false)),
            r(no_wp(false, false)),
            "CR0.WP itself always matters"
        );
    }

    #[test]
    fn pke_matters_only_without_wp_in_ia32e_paging() {
        let ctx = |mode, wp, pke| {
            let mut r = regs(mode, wp, false, false, true);
            r.cr4.set(Cr4::PKE, pke);
            GuestContext::new(&r, false)
        };
        let r = |c: GuestContext| Role::root(&c, c.root_level().min(Level::L4), 0);
        assert_eq!(
            r(ctx(PagingMode::Level4, true, false)),
            r(ctx(PagingMode::Level4, true, true))
        );
        assert_ne!(
            r(ctx(PagingMode::Level4, false, false)),
            r(ctx(PagingMode::Level4, false, true))
        );
        assert_ne!(
            r(ctx(PagingMode::Level5, false, false)),
            r(ctx(PagingMode::Level5, false, true))
        );
        assert_eq!(
            r(ctx(PagingMode::Pae, false, false)),
            r(ctx(PagingMode::Pae, false, true)),
            "no protection keys in PAE paging"
        );
    }

    #[test]
    fn efer_nx_matters_only_for_8_byte_entries() {
        let ctx = |mode, nx| GuestContext::new(&regs(mode, true, false, false, nx), false);
        let r = |c: GuestContext| Role::root(&c, Level::L2, 0);
        assert_eq!(r(ctx(PagingMode::Bits32, false)), r(ctx(PagingMode::Bits32, true)));
        assert_ne!(r(ctx(PagingMode::Pae, false)), r(ctx(PagingMode::Pae, true)));
        assert_eq!(
            r(ctx(PagingMode::None, false)),
            r(ctx(PagingMode::None, true)),
            "paging off"
        );
    }

    #[test]
    fn quadrants_follow_the_32_bit_table_halves() {
        let c32 = GuestContext::new(&regs(PagingMode::Bits32, true, false, false, false), false);
        let pd = Role::root(&c32, Level::L2, 3);
        assert_eq!(pd.quadrant(), 3);
        assert_eq!(pd.child(6, false, Acc::all()).quadrant(), 0);
        assert_eq!(pd.child(7, false, Acc::all()).quadrant(), 1);
        let cpae = GuestContext::new(&regs(PagingMode::Pae, true, false, false, false), false);
        assert_eq!(
            Role::root(&cpae, Level::L2, 3).quadrant(),
            0,
            "PAE tables have no quadrants"
        );
        assert_eq!(
            Role::root(&cpae, Level::L2, 3).child(7, false, Acc::all()).quadrant(),
            0
        );
    }

    #[test]
    fn invalid_and_smm_roles_are_distinct() {
        let ctx = GuestContext::new(&regs(PagingMode::Level4, true, false, false, true), false);
        let smm = GuestContext::new(&regs(PagingMode::Level4, true, false, false, true), true);
        let r = Role::root(&ctx, Level::L4, 0);
        assert_ne!(r, r.invalidated());
        assert_ne!(r, Role::root(&smm, Level::L4, 0));
        assert!(r.invalidated().is_invalid());
    }
}
