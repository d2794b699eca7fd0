//! The rights of a shadow leaf SPTE (KVM's `FNAME(gpte_access)`,
//! `FNAME(protect_clean_gpte)` and the CR0.WP = 0 emulation of `mmu.rst`).
//!
//! The hardware model walks shadow tables the way KVM runs a guest under
//! shadow paging: with CR0.WP = 1 (so write protection of guest page tables
//! works against the guest kernel too), EFER.NX = 1 (so SPTEs can forbid
//! execution) and the guest's own CR4.SMEP/SMAP. A leaf SPTE must never let
//! that hardware allow an access the guest's architecture forbids, in any
//! context whose role finds this page; and it must allow the access it was
//! built for, so the fault makes progress.
//!
//! With the guest's CR0.WP = 0 a supervisor write to a read-only page is
//! allowed, which no single SPTE can express next to "user may read": the
//! SPTE follows the fault. A supervisor write gets W = 1, U = 0 (a kernel
//! page; with SMEP also NX, or the kernel could now execute it); any other
//! access gets the guest's rights, read-only. The role keeps `cr0_wp`,
//! `smep_andnot_wp` and `smap_andnot_wp` so such pages are never found from
//! a context where they would grant too much.
//!
//! Some cases have no safe SPTE at all; vmmu emulates those writes
//! ([`Leaf::Emulate`]):
//!
//! - With SMAP on, a supervisor write with RFLAGS.AC = 1 to a read-only
//!   *user* page. As a kernel page (U = 0) the SPTE would let a later
//!   supervisor read with AC = 0 through, which SMAP forbids; as a user
//!   page it cannot be writable (user writes must fault). KVM maps it as a
//!   kernel page and lets that later read through (its `mmu.rst` assumes
//!   the write itself would fail the SMAP check, which it does not with
//!   AC = 1). The exhaustive test below found this case.
//! - With protection keys (CR4.PKE in IA-32e paging), a supervisor write
//!   to a read-only user page: as a kernel page the SPTE would escape the
//!   key's access-disable, which PKRU may set at any time without an exit
//!   (WRPKRU is not intercepted), and which applies to supervisor accesses
//!   to user pages whatever CR0.WP says (SDM 4.6.2).
//! - With protection keys, a supervisor write to a *writable* user page
//!   whose key PKRU write-disables now: the guest (CR0.WP = 0) ignores
//!   write-disable for supervisor writes, the hardware (CR0.WP = 1) does
//!   not, so the SPTE the guest's rights give faults again forever. (KVM
//!   exposes protection keys to guests only with TDP, and never meets it.)
use super::role::Role;
use crate::arch::perm::{Access, AccessRights};
use crate::mmu::spte::SpteAccess;

/// The SPTE access for a leaf with `rights` in a shadow page of `role`.
/// In an IA-32e SPTE a present entry is readable and USER is the U/S bit;
/// a page shadowing EPT reads USER as the EPT read bit (as the walker does
/// for EPT), so an execute-only EPT12 page stays execute-only in EPT02.
pub fn spte_access(role: &Role, rights: AccessRights) -> SpteAccess {
    let user = rights.contains(AccessRights::USER);
    SpteAccess {
        read: !role.is_ept() || user,
        write: rights.contains(AccessRights::WRITE),
        exec: rights.contains(AccessRights::EXEC),
        user,
    }
}

/// How a fault the guest allows is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leaf {
    /// Install a leaf SPTE with these hardware rights.
    Map(AccessRights),
    /// No SPTE is safe for this access in this context: emulate it.
    Emulate,
}

/// How to serve `fault` (which the guest allows) on a guest translation
/// whose effective rights are `pte_access` (every level combined, XD
/// folded into EXEC). `guest_dirty`: the guest leaf's D bit (after the walk
/// that served this fault, which sets it on a write): a clean guest page is
/// mapped read-only, so the first write faults and the walker sets D.
/// `pkru_wd`: PKRU write-disables the translation's protection key now.
pub fn leaf_rights(role: &Role, pte_access: AccessRights, guest_dirty: bool, fault: Access, pkru_wd: bool) -> Leaf {
    let mut rights = pte_access;
    let wp0_supervisor_write = !role.cr0_wp() && fault.is_write() && !fault.is_user();
    if wp0_supervisor_write
        && role.pke_andnot_wp()
        && pte_access.contains(AccessRights::USER)
        && (pkru_wd || !pte_access.contains(AccessRights::WRITE))
    {
        // Protection keys on a user page: see the module documentation.
        return Leaf::Emulate;
    }
    if wp0_supervisor_write && !pte_access.contains(AccessRights::WRITE) {
        // A supervisor write the guest allows only because CR0.WP = 0.
        if role.smap_andnot_wp() && pte_access.contains(AccessRights::USER) {
            return Leaf::Emulate;
        }
        rights.insert(AccessRights::WRITE);
        rights.remove(AccessRights::USER);
        if role.smep_andnot_wp() {
            rights.remove(AccessRights::EXEC);
        }
    }
    if !guest_dirty {
        rights.remove(AccessRights::WRITE);
    }
    Leaf::Map(rights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Level;
    use crate::arch::control::{Cr0, Cr4, Efer, PagingMode};
    use crate::arch::perm::{AccessKind, Permissions, pkru_denies};
    use crate::mmu::shadow::role::GuestContext;
    use crate::walker::ControlRegs;

    /// A guest context: mode and the control bits that matter.
    #[derive(Clone, Copy, Debug)]
    struct Ctx {
        mode: PagingMode,
        wp: bool,
        smep: bool,
        smap: bool,
        nx: bool,
        pke: bool,
    }

    /// The protection-key rights of the translation's key (key 0): PKRU's
    /// access-disable and write-disable bits.
    const PKRUS: [u32; 4] = [0, 1, 2, 3];

    impl Ctx {
        fn regs(&self) -> ControlRegs {
            let mut cr0 = Cr0::PE | Cr0::PG;
            cr0.set(Cr0::WP, self.wp);
            let mut cr4 = Cr4::empty();
            cr4.set(Cr4::SMEP, self.smep);
            cr4.set(Cr4::SMAP, self.smap);
            cr4.set(Cr4::PKE, self.pke);
            let mut efer = Efer::empty();
            efer.set(Efer::NXE, self.nx);
            match self.mode {
                PagingMode::Pae => cr4 |= Cr4::PAE,
                PagingMode::Level4 => {
                    cr4 |= Cr4::PAE;
                    efer |= Efer::LME | Efer::LMA;
                }
                _ => {}
            }
            ControlRegs { cr0, cr4, efer }
        }
        fn leaf_role(&self) -> Role {
            let ctx = GuestContext::new(&self.regs(), false);
            let mut r = Role::root(&ctx, ctx.root_page_level(), 0);
            while r.level() > Level::L1 {
                r = r.child(0, false, AccessRights::all());
            }
            r
        }
        /// Protection keys apply (IA-32e paging only).
        fn pkeys(&self) -> bool {
            self.pke && self.mode == PagingMode::Level4
        }
        /// The guest's effective rights for raw U/W/XD bits.
        fn rights(&self, user: bool, write: bool, xd: bool) -> AccessRights {
            let mut r = AccessRights::empty();
            r.set(AccessRights::USER, user);
            r.set(AccessRights::WRITE, write);
            let xd_applies = self.nx && self.mode != PagingMode::Bits32;
            r.set(AccessRights::EXEC, !(xd && xd_applies));
            r
        }
        /// PKRU denies `a` to a translation with `rights` with CR0.WP = `wp`.
        fn pkru_faults(&self, a: Access, rights: AccessRights, pkru: u32, wp: bool) -> bool {
            self.pkeys()
                && !a.is_fetch()
                && rights.contains(AccessRights::USER)
                && pkru_denies(pkru, 0, a.is_write(), a.is_user(), wp)
        }
        fn guest_faults(&self, a: Access, rights: AccessRights, pkru: u32) -> bool {
            Permissions::guest(self.wp, self.smep, self.smap).faults(a.perm_index(), rights)
                || self.pkru_faults(a, rights, pkru, self.wp)
        }
        /// The hardware running the shadow tables: WP = 1, NX = 1, the
        /// guest's SMEP/SMAP/PKE.
        fn hw_faults(&self, a: Access, spte: AccessRights, pkru: u32) -> bool {
            Permissions::guest(true, self.smep, self.smap).faults(a.perm_index(), spte)
                || self.pkru_faults(a, spte, pkru, true)
        }
    }

    fn contexts() -> Vec<Ctx> {
        let mut out = Vec::new();
        for mode in [PagingMode::Bits32, PagingMode::Pae, PagingMode::Level4] {
            for b in 0..32u8 {
                out.push(Ctx {
                    mode,
                    wp: b & 1 != 0,
                    smep: b & 2 != 0,
                    smap: b & 4 != 0,
                    nx: b & 8 != 0,
                    pke: b & 16 != 0,
                });
            }
        }
        out
    }

    fn accesses() -> Vec<Access> {
        let mut out = Vec::new();
        for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
            for cpl in [0, 3] {
                for ac in [false, true] {
                    out.push(Access::new(kind, cpl, ac));
                }
            }
        }
        out
    }

    /// Exhaustive over contexts, PKRU values, guest U/W/XD/D bits and pairs
    /// of accesses: an SPTE built for an allowed access (1) lets that
    /// access through under the PKRU it was built under (progress), and
    /// (2) in every context that finds the same page (same role), under
    /// every PKRU (WRPKRU does not exit), lets through only what that
    /// context's guest allows. Emulation happens only in the documented
    /// cases.
    #[test]
    fn a_leaf_never_grants_what_the_guest_forbids_in_any_context_sharing_its_role() {
        let ctxs = contexts();
        let accesses = accesses();
        let (mut checked, mut emulated) = (0u64, 0u64);
        for c1 in &ctxs {
            let role = c1.leaf_role();
            let sharing: Vec<&Ctx> = ctxs.iter().filter(|c2| c2.leaf_role() == role).collect();
            for bits in 0..16u8 {
                let (user, write, xd, dirty) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0);
                let rights = c1.rights(user, write, xd);
                for pkru1 in PKRUS {
                    for &f1 in &accesses {
                        if c1.guest_faults(f1, rights, pkru1) {
                            continue; // the guest takes the #PF; no SPTE is built
                        }
                        let wd = c1.pkeys() && pkru1 & 2 != 0;
                        let Leaf::Map(spte) = leaf_rights(&role, rights, dirty || f1.is_write(), f1, wd) else {
                            emulated += 1;
                            assert!(
                                !c1.wp && f1.is_write() && !f1.is_user() && user && (c1.smap || c1.pkeys()),
                                "{c1:?} {rights:?} {f1:?} PKRU {pkru1}: emulated outside the documented cases"
                            );
                            continue; // served without an SPTE
                        };
                        assert!(
                            !c1.hw_faults(f1, spte, pkru1),
                            "{c1:?} {rights:?} {f1:?} PKRU {pkru1}: the SPTE {spte:?} does not serve its own fault"
                        );
                        for c2 in &sharing {
                            let rights2 = c2.rights(user, write, xd);
                            for pkru2 in PKRUS {
                                for &f2 in &accesses {
                                    checked += 1;
                                    assert!(
                                        c2.hw_faults(f2, spte, pkru2) || !c2.guest_faults(f2, rights2, pkru2),
                                        "built in {c1:?} under PKRU {pkru1} for {f1:?} ({rights:?}): SPTE \
                                         {spte:?} lets {f2:?} through in {c2:?} under PKRU {pkru2}, whose \
                                         guest forbids it ({rights2:?})"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 1_000_000, "{checked}");
        assert!(emulated > 0, "{emulated}");
    }

    /// The other direction of seed 001: contexts with the same guest table
    /// layout (mode) but different roles must need different SPTEs
    /// somewhere, or the role splits pages for nothing. (Entry size and
    /// quadrant are about layout: which gfn each SPTE shadows.)
    #[test]
    fn roles_differ_only_where_the_spte_or_its_safety_differs() {
        let ctxs = contexts();
        let accesses = accesses();
        for (i, c1) in ctxs.iter().enumerate() {
            for c2 in &ctxs[i + 1..] {
                if c1.mode != c2.mode || c1.leaf_role() == c2.leaf_role() {
                    continue;
                }
                // Differ: some guest bits, PKRU and access give a different
                // SPTE, or an SPTE of one would be unsafe in the other.
                let differs = (0..16u8).any(|bits| {
                    let (user, write, xd, dirty) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0);
                    let (r1, r2) = (c1.rights(user, write, xd), c2.rights(user, write, xd));
                    PKRUS.iter().any(|&pkru| {
                        accesses.iter().any(|&f| {
                            let ok1 = !c1.guest_faults(f, r1, pkru);
                            let ok2 = !c2.guest_faults(f, r2, pkru);
                            let wd = |c: &Ctx| c.pkeys() && pkru & 2 != 0;
                            let s1 = ok1.then(|| leaf_rights(&c1.leaf_role(), r1, dirty || f.is_write(), f, wd(c1)));
                            let s2 = ok2.then(|| leaf_rights(&c2.leaf_role(), r2, dirty || f.is_write(), f, wd(c2)));
                            let unsafe_in = |s: Option<Leaf>, c: &Ctx, r: AccessRights| match s {
                                Some(Leaf::Map(s)) => PKRUS.iter().any(|&p| {
                                    accesses
                                        .iter()
                                        .any(|&g| !c.hw_faults(g, s, p) && c.guest_faults(g, r, p))
                                }),
                                _ => false,
                            };
                            (s1.is_some() && s2.is_some() && s1 != s2) || unsafe_in(s1, c2, r2) || unsafe_in(s2, c1, r1)
                        })
                    })
                });
                assert!(differs, "{c1:?} and {c2:?} get different roles but need the same SPTEs");
            }
        }
    }
}
