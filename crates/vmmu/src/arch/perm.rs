//! Access rights, the permission bitmap, and protection keys.
//!
//! As KVM's `update_permission_bitmask()`, the whole rule table of SDM vol.
//! 3A 4.6 is evaluated once per control state into 16 bytes: one byte per
//! kind of access (write, user, fetch, SMAP-applies), one bit per
//! combination of effective rights (exec, write, user). A permission check
//! on the fault path is then one load and one shift.

use bitflags::bitflags;

bitflags! {
    /// Effective access rights of a translation, combined over all levels
    /// (KVM's `ACC_*`). For EPT, `USER` stands for "readable".
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct AccessRights: u8 {
        /// Instructions may be fetched (no XD on any level).
        const EXEC = 1 << 0;
        /// Writable (R/W set on every level).
        const WRITE = 1 << 1;
        /// User-mode address (U/S set on every level).
        const USER = 1 << 2;
    }
}

/// The kind of access: what the instruction does with the memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// Who makes the access (SDM vol. 3A 4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Privilege {
    /// An access at CPL 3.
    User,
    /// An explicit access at CPL < 3.
    Supervisor,
    /// An implicit supervisor-mode access (descriptor tables, the TSS, ...)
    /// at any CPL: SMAP applies regardless of RFLAGS.AC.
    ImplicitSupervisor,
}

/// One access, as the permission check sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// User, supervisor or implicit supervisor.
    pub privilege: Privilege,
    /// RFLAGS.AC at the time of the access.
    pub rflags_ac: bool,
}

impl Access {
    /// An explicit access at `cpl` with RFLAGS.AC = `ac`.
    pub fn new(kind: AccessKind, cpl: u8, ac: bool) -> Access {
        let privilege = if cpl == 3 {
            Privilege::User
        } else {
            Privilege::Supervisor
        };
        Access {
            kind,
            privilege,
            rflags_ac: ac,
        }
    }

    /// A user-mode read.
    pub fn user_read() -> Access {
        Access::new(AccessKind::Read, 3, false)
    }

    /// A supervisor read with RFLAGS.AC clear.
    pub fn supervisor_read() -> Access {
        Access::new(AccessKind::Read, 0, false)
    }

    /// Whether this is a write.
    #[inline(always)]
    pub fn is_write(&self) -> bool {
        self.kind == AccessKind::Write
    }

    /// Whether this is an instruction fetch.
    #[inline(always)]
    pub fn is_fetch(&self) -> bool {
        self.kind == AccessKind::Fetch
    }

    /// Whether this is a user-mode access.
    #[inline(always)]
    pub fn is_user(&self) -> bool {
        self.privilege == Privilege::User
    }

    /// Whether SMAP, if enabled, applies to this access: supervisor data
    /// accesses that are implicit, or explicit with RFLAGS.AC = 0.
    #[inline(always)]
    pub fn smap_applies(&self) -> bool {
        match self.privilege {
            Privilege::User => false,
            Privilege::Supervisor => !self.rflags_ac,
            Privilege::ImplicitSupervisor => true,
        }
    }

    /// Index into [`Permissions`]: bit 0 write, 1 user, 2 fetch, 3 SMAP applies.
    #[inline(always)]
    pub fn perm_index(&self) -> usize {
        (self.is_write() as usize)
            | (self.is_user() as usize) << 1
            | (self.is_fetch() as usize) << 2
            | (self.smap_applies() as usize) << 3
    }
}

/// The permission bitmap: for each kind of access, which combinations of
/// effective rights fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Permissions {
    table: [u8; 16],
}

impl Permissions {
    /// The rules for ordinary paging with the given CR0.WP, CR4.SMEP and
    /// CR4.SMAP (SDM vol. 3A 4.6.1). Execute-disable is already folded into
    /// the rights ([`AccessRights::EXEC`] is clear only where XD applies).
    pub fn guest(cr0_wp: bool, smep: bool, smap: bool) -> Permissions {
        let mut table = [0u8; 16];
        for (index, byte) in table.iter_mut().enumerate() {
            let write = index & 1 != 0;
            let user = index & 2 != 0;
            let fetch = index & 4 != 0;
            let smap_applies = index & 8 != 0;
            for rights in 0u8..8 {
                let r = AccessRights::from_bits_truncate(rights);
                let u = r.contains(AccessRights::USER);
                let w = r.contains(AccessRights::WRITE);
                let x = r.contains(AccessRights::EXEC);
                let fault = if fetch {
                    // Fetch: XD; user fetch from supervisor page; SMEP.
                    !x || (user && !u) || (!user && smep && u)
                } else if user {
                    !u || (write && !w)
                } else {
                    // Supervisor data access.
                    (write && !w && cr0_wp) || (smap && smap_applies && u)
                };
                if fault {
                    *byte |= 1 << rights;
                }
            }
        }
        Permissions { table }
    }

    /// The rules for EPT: reads need R (carried as `USER`), writes W,
    /// fetches X. Callers present every access as a user access.
    pub fn ept() -> Permissions {
        let mut table = [0u8; 16];
        for (index, byte) in table.iter_mut().enumerate() {
            let write = index & 1 != 0;
            let fetch = index & 4 != 0;
            for rights in 0u8..8 {
                let r = AccessRights::from_bits_truncate(rights);
                let fault = if fetch {
                    !r.contains(AccessRights::EXEC)
                } else if write {
                    !r.contains(AccessRights::WRITE)
                } else {
                    !r.contains(AccessRights::USER)
                };
                if fault {
                    *byte |= 1 << rights;
                }
            }
        }
        Permissions { table }
    }

    /// Whether an access with index `perm_index` (see [`Access::perm_index`])
    /// to a translation with `rights` faults.
    #[inline(always)]
    pub fn faults(&self, perm_index: usize, rights: AccessRights) -> bool {
        (self.table[perm_index & 15] >> rights.bits()) & 1 != 0
    }
}

/// Whether PKRU denies a data access to a user-mode page with key `pkey`
/// (SDM vol. 3A 4.6.2): access-disable, or write-disable for a write that is
/// user-mode or made with CR0.WP = 1. Only meaningful in IA-32e paging with
/// CR4.PKE = 1, for data accesses to user-mode addresses.
#[inline]
pub fn pkru_denies(pkru: u32, pkey: u8, write: bool, user: bool, cr0_wp: bool) -> bool {
    // Keys are 4 bits: masked, so no caller's value can shift past bit 31.
    let shift = 2 * u32::from(pkey & 0xf);
    let ad = (pkru >> shift) & 1 != 0;
    let wd = (pkru >> (shift + 1)) & 1 != 0;
    ad || (wd && write && (user || cr0_wp))
}

/// Whether PKRU's write-disable bit is set for key `pkey`.
#[inline]
pub fn pkru_write_disabled(pkru: u32, pkey: u8) -> bool {
    (pkru >> (2 * u32::from(pkey & 0xf) + 1)) & 1 != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use AccessKind::*;

    const U: AccessRights = AccessRights::USER;
    const W: AccessRights = AccessRights::WRITE;
    const X: AccessRights = AccessRights::EXEC;

    fn faults(p: &Permissions, a: Access, r: AccessRights) -> bool {
        p.faults(a.perm_index(), r)
    }

    fn sup(kind: AccessKind, ac: bool) -> Access {
        Access::new(kind, 0, ac)
    }
    fn usr(kind: AccessKind) -> Access {
        Access::new(kind, 3, false)
    }
    fn implicit(kind: AccessKind) -> Access {
        Access {
            kind,
            privilege: Privilege::ImplicitSupervisor,
            rflags_ac: true,
        }
    }

    // One test per row of SDM vol. 3A 4.6.1 ("Determination of Access Rights").

    #[test]
    fn supervisor_read_of_supervisor_page_is_allowed() {
        let p = Permissions::guest(true, true, true);
        assert!(!faults(&p, sup(Read, false), AccessRights::empty()));
    }

    #[test]
    fn supervisor_read_of_user_page_without_smap_is_allowed() {
        let p = Permissions::guest(true, true, false);
        assert!(!faults(&p, sup(Read, false), U));
    }

    #[test]
    fn supervisor_read_of_user_page_with_smap_and_ac_clear_faults() {
        let p = Permissions::guest(true, false, true);
        assert!(faults(&p, sup(Read, false), U | W | X));
    }

    #[test]
    fn supervisor_read_of_user_page_with_smap_and_ac_set_is_allowed() {
        let p = Permissions::guest(true, false, true);
        assert!(!faults(&p, sup(Read, true), U));
    }

    #[test]
    fn implicit_supervisor_read_of_user_page_with_smap_faults_whatever_ac() {
        let p = Permissions::guest(false, false, true);
        assert!(faults(&p, implicit(Read), U | W));
        let p = Permissions::guest(false, false, false);
        assert!(!faults(&p, implicit(Read), U | W));
    }

    #[test]
    fn supervisor_write_to_read_only_page_depends_on_wp() {
        assert!(faults(&Permissions::guest(true, false, false), sup(Write, false), X));
        assert!(!faults(&Permissions::guest(false, false, false), sup(Write, false), X));
        // WP=0 also lets supervisor write read-only user pages (SMAP off).
        assert!(!faults(&Permissions::guest(false, false, false), sup(Write, false), U));
    }

    #[test]
    fn supervisor_write_to_user_page_with_smap() {
        let p = Permissions::guest(true, false, true);
        assert!(faults(&p, sup(Write, false), U | W));
        assert!(!faults(&p, sup(Write, true), U | W));
        // AC=1 does not override WP for a read-only user page.
        assert!(faults(&p, sup(Write, true), U));
        let p = Permissions::guest(false, false, true);
        assert!(!faults(&p, sup(Write, true), U));
        assert!(faults(&p, implicit(Write), U | W));
    }

    #[test]
    fn user_access_to_supervisor_page_faults() {
        let p = Permissions::guest(false, false, false);
        assert!(faults(&p, usr(Read), W | X));
        assert!(faults(&p, usr(Write), W | X));
        assert!(faults(&p, usr(Fetch), W | X));
    }

    #[test]
    fn user_write_needs_rw_whatever_wp() {
        assert!(faults(&Permissions::guest(false, false, false), usr(Write), U | X));
        assert!(!faults(&Permissions::guest(false, false, false), usr(Write), U | W));
        assert!(!faults(&Permissions::guest(true, false, false), usr(Read), U));
    }

    #[test]
    fn fetch_from_execute_disabled_page_faults() {
        let p = Permissions::guest(false, false, false);
        assert!(faults(&p, usr(Fetch), U | W));
        assert!(faults(&p, sup(Fetch, false), W));
        assert!(!faults(&p, sup(Fetch, false), X));
    }

    #[test]
    fn supervisor_fetch_from_user_page_depends_on_smep() {
        assert!(faults(
            &Permissions::guest(false, true, false),
            sup(Fetch, false),
            U | X
        ));
        assert!(!faults(
            &Permissions::guest(false, false, false),
            sup(Fetch, false),
            U | X
        ));
        // SMAP does not restrict fetches.
        assert!(!faults(
            &Permissions::guest(false, false, true),
            sup(Fetch, false),
            U | X
        ));
        assert!(!faults(&Permissions::guest(false, true, false), usr(Fetch), U | X));
    }

    #[test]
    fn ept_rights() {
        let p = Permissions::ept();
        let read = usr(Read);
        assert!(faults(&p, read, W | X));
        assert!(!faults(&p, read, U));
        assert!(faults(&p, usr(Write), U | X));
        assert!(!faults(&p, usr(Fetch), X));
        assert!(faults(&p, usr(Fetch), U | W));
    }

    #[test]
    fn pkru_rules() {
        // Key 1: AD.
        assert!(pkru_denies(0b0100, 1, false, true, false));
        // Key 1: WD only: reads allowed, user writes denied,
        // supervisor writes denied only with WP.
        let wd = 0b1000;
        assert!(!pkru_denies(wd, 1, false, true, true));
        assert!(pkru_denies(wd, 1, true, true, false));
        assert!(!pkru_denies(wd, 1, true, false, false));
        assert!(pkru_denies(wd, 1, true, false, true));
        assert!(!pkru_denies(wd, 0, true, true, true));
    }

    /// The bitmap agrees with a direct statement of the rules for every
    /// combination of control bits, access and rights.
    #[test]
    fn bitmap_matches_direct_rules_exhaustively() {
        for cfg in 0..8u8 {
            let (wp, smep, smap) = (cfg & 1 != 0, cfg & 2 != 0, cfg & 4 != 0);
            let p = Permissions::guest(wp, smep, smap);
            for kind in [Read, Write, Fetch] {
                for privilege in [Privilege::User, Privilege::Supervisor, Privilege::ImplicitSupervisor] {
                    for ac in [false, true] {
                        let a = Access {
                            kind,
                            privilege,
                            rflags_ac: ac,
                        };
                        for rights in 0..8u8 {
                            let r = AccessRights::from_bits_truncate(rights);
                            let user_page = r.contains(U);
                            let sup_mode = privilege != Privilege::User;
                            let expected = match kind {
                                Fetch => !r.contains(X) || (!sup_mode && !user_page) || (sup_mode && smep && user_page),
                                Read => {
                                    (!sup_mode && !user_page)
                                        || (sup_mode
                                            && smap
                                            && user_page
                                            && (privilege == Privilege::ImplicitSupervisor || !ac))
                                }
                                Write => {
                                    (!sup_mode && (!user_page || !r.contains(W)))
                                        || (sup_mode && wp && !r.contains(W))
                                        || (sup_mode
                                            && smap
                                            && user_page
                                            && (privilege == Privilege::ImplicitSupervisor || !ac))
                                }
                            };
                            assert_eq!(
                                p.faults(a.perm_index(), r),
                                expected,
                                "wp={wp} smep={smep} smap={smap} {a:?} {r:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}
