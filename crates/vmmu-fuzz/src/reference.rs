//! A slow reference x86 page walker, written straight from the Intel SDM
//! vol. 3A chapter 4, as an independent check of [`vmmu::walker`].
//!
//! Nothing here comes from the production walker: no masks from
//! `arch::rsvd`, no permission bitmap from `arch::perm`, no entry format
//! from `arch::pte`. Control registers are raw `u64`s decoded with the bit
//! positions of SDM vol. 3A 2.5 and 2.2.1; every paging mode has its own
//! straight-line function following its tables:
//!
//! - 32-bit paging (4.3, Tables 4-4 to 4-6), with CR4.PSE and PSE-36;
//! - PAE paging (4.4, Tables 4-7 to 4-11), with the PDPTE registers loaded
//!   at CR3 load ([`load_pdptes`], 4.4.1);
//! - 4-level and 5-level paging (4.5, Tables 4-12 to 4-20), with the
//!   canonical-address check (#GP) and protection keys;
//! - access rights (4.6: U/S, R/W, CR0.WP, XD with EFER.NXE, SMEP, SMAP
//!   with RFLAGS.AC and implicit supervisor accesses, PKRU);
//! - the #PF error code (4.7: P, W/R, U/S, RSVD, I/D, PK);
//! - Accessed and Dirty flags (4.8): on a successful access A is set in
//!   every paging-structure entry used (not in the PAE PDPTE registers) and
//!   D in the entry that maps the page, for a write. A faulting access sets
//!   nothing (x86 may set A there; vmmu chooses not to, and so does this).
//!
//! The walker is a pure function: it reads entries through a closure and
//! returns the A/D updates it would make, which the caller applies.

/// CR0.PG (bit 31): paging.
const CR0_PG: u64 = 1 << 31;
/// CR0.WP (bit 16): supervisor writes honour R/W.
const CR0_WP: u64 = 1 << 16;
/// CR4.PSE (bit 4): 4-MByte pages in 32-bit paging.
const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE (bit 5).
const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57 (bit 12): 5-level paging.
const CR4_LA57: u64 = 1 << 12;
/// CR4.SMEP (bit 20).
const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP (bit 21).
const CR4_SMAP: u64 = 1 << 21;
/// CR4.PKE (bit 22).
const CR4_PKE: u64 = 1 << 22;
/// IA32_EFER.LMA (bit 10).
const EFER_LMA: u64 = 1 << 10;
/// IA32_EFER.NXE (bit 11).
const EFER_NXE: u64 = 1 << 11;

/// #PF error code bits (SDM 4.7, Figure 4-12).
const PF_P: u32 = 1 << 0;
const PF_W: u32 = 1 << 1;
const PF_U: u32 = 1 << 2;
const PF_RSVD: u32 = 1 << 3;
const PF_I: u32 = 1 << 4;
const PF_PK: u32 = 1 << 5;

/// A rule the reference deliberately gets wrong, so that tests can show
/// the comparison with the production walker detects a difference (a
/// negative control). [`Deviation::None`] is the SDM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Deviation {
    /// Follow the SDM.
    #[default]
    None,
    /// Ignore CR0.WP: supervisor writes to read-only pages always succeed.
    IgnoreCr0Wp,
    /// Never set the Dirty flag.
    NoDirty,
}

/// The registers and processor features the reference walker depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefCpu {
    /// CR0, raw.
    pub cr0: u64,
    /// CR3, raw.
    pub cr3: u64,
    /// CR4, raw.
    pub cr4: u64,
    /// IA32_EFER, raw.
    pub efer: u64,
    /// PKRU.
    pub pkru: u32,
    /// MAXPHYADDR (CPUID.80000008H:EAX\[7:0\]), 32..=52.
    pub maxphyaddr: u8,
    /// 1-GByte pages (CPUID.80000001H:EDX.Page1GB\[bit 26\]).
    pub gbpages: bool,
    /// PSE-36 (CPUID.01H:EDX.PSE-36\[bit 17\]).
    pub pse36: bool,
    /// The PAE PDPTE registers (PAE paging only).
    pub pdptes: [u64; 4],
}

/// The kind of an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefKind {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Fetch,
}

/// One access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefAccess {
    /// Read, write or fetch.
    pub kind: RefKind,
    /// The CPL (an explicit access at CPL 3 is a user-mode access).
    pub cpl: u8,
    /// An implicit supervisor-mode access (descriptor tables, ...),
    /// whatever the CPL.
    pub implicit: bool,
    /// RFLAGS.AC.
    pub rflags_ac: bool,
}

/// What an access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefOutcome {
    /// The access reaches `gpa` through a page of `page_size` bytes mapped
    /// by an entry at `level` (1 = 4 KiB page; 1 also without paging).
    Translation {
        /// The physical address.
        gpa: u64,
        /// Bytes the page maps.
        page_size: u64,
        /// Level of the entry that maps the page.
        level: u8,
    },
    /// #PF with `error_code`, raised at the entry at `level` (the leaf for
    /// an access-rights violation).
    PageFault {
        /// The error code.
        error_code: u32,
        /// Level of the faulting entry.
        level: u8,
    },
    /// #GP(0): a non-canonical address in IA-32e paging.
    GeneralProtection,
}

/// The outcome of one reference walk and the A/D updates it makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefWalk {
    /// What the access does.
    pub outcome: RefOutcome,
    /// A/D updates: `(entry address, entry size in bytes, bits to set)`.
    pub updates: Vec<(u64, usize, u64)>,
}

/// Why loading the PDPTE registers fails: #GP at the MOV to CR3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PdpteGp {
    /// The first PDPTE with a reserved bit set.
    pub index: usize,
    /// Its value.
    pub value: u64,
}

/// Bits `lo..=hi` set (empty if `lo > hi`).
fn mask(lo: u32, hi: u32) -> u64 {
    let mut m = 0u64;
    let mut b = lo;
    while b <= hi && b < 64 {
        m |= 1u64 << b;
        b += 1;
    }
    m
}

fn bit(value: u64, n: u32) -> bool {
    (value >> n) & 1 != 0
}

/// Loads the four PDPTE registers from the PDPT that `cr3` names (CR3 bits
/// 31:5), checking each present PDPTE's reserved bits (SDM 4.4.1, Table
/// 4-8: bits 2:1, 8:5 and 63:MAXPHYADDR).
pub fn load_pdptes(read: &dyn Fn(u64, usize) -> u64, cr3: u64, maxphyaddr: u8) -> Result<[u64; 4], PdpteGp> {
    let base = cr3 & mask(5, 31);
    let reserved = mask(1, 2) | mask(5, 8) | mask(maxphyaddr as u32, 63);
    let mut regs = [0u64; 4];
    for (index, reg) in regs.iter_mut().enumerate() {
        let value = read(base + 8 * index as u64, 8);
        if bit(value, 0) && value & reserved != 0 {
            return Err(PdpteGp { index, value });
        }
        *reg = value;
    }
    Ok(regs)
}

/// Rights collected over the entries of a walk.
struct Rights {
    /// U/S = 1 in every entry that controls access: a user-mode address.
    user: bool,
    /// R/W = 1 in every such entry.
    writable: bool,
    /// XD = 1 in some entry (only counted with EFER.NXE = 1).
    xd: bool,
}

impl Rights {
    fn all() -> Rights {
        Rights {
            user: true,
            writable: true,
            xd: false,
        }
    }
    fn and(&mut self, entry: u64, nxe: bool) {
        self.user &= bit(entry, 2);
        self.writable &= bit(entry, 1);
        self.xd |= nxe && bit(entry, 63);
    }
}

/// The access and control state, decoded once.
struct Ctx {
    cpu: RefCpu,
    access: RefAccess,
    deviation: Deviation,
}

impl Ctx {
    fn user_mode(&self) -> bool {
        self.access.cpl == 3 && !self.access.implicit
    }

    /// W/R, U/S and I/D bits of the error code (SDM 4.7).
    fn access_bits(&self) -> u32 {
        let mut ec = 0;
        if self.access.kind == RefKind::Write {
            ec |= PF_W;
        }
        if self.user_mode() {
            ec |= PF_U;
        }
        // I/D: an instruction fetch, and either CR4.SMEP = 1 or both
        // CR4.PAE = 1 and IA32_EFER.NXE = 1.
        let smep = self.cpu.cr4 & CR4_SMEP != 0;
        let pae_nxe = self.cpu.cr4 & CR4_PAE != 0 && self.cpu.efer & EFER_NXE != 0;
        if self.access.kind == RefKind::Fetch && (smep || pae_nxe) {
            ec |= PF_I;
        }
        ec
    }

    fn not_present(&self, level: u8) -> RefWalk {
        RefWalk {
            outcome: RefOutcome::PageFault {
                error_code: self.access_bits(),
                level,
            },
            updates: Vec::new(),
        }
    }

    fn reserved(&self, level: u8) -> RefWalk {
        RefWalk {
            outcome: RefOutcome::PageFault {
                error_code: self.access_bits() | PF_P | PF_RSVD,
                level,
            },
            updates: Vec::new(),
        }
    }

    /// The access-rights check of SDM 4.6 for a translation with `rights`
    /// whose leaf has protection key `pkey`. `None` if allowed, else the
    /// error code.
    fn check(&self, rights: &Rights, pkey: u8) -> Option<u32> {
        let cr0 = self.cpu.cr0;
        let cr4 = self.cpu.cr4;
        // Protection keys exist in IA-32e paging only (IA32_EFER.LMA = 1).
        let ia32e = self.cpu.efer & EFER_LMA != 0;
        let wp = cr0 & CR0_WP != 0 && self.deviation != Deviation::IgnoreCr0Wp;
        let smep = cr4 & CR4_SMEP != 0;
        let smap = cr4 & CR4_SMAP != 0;
        let user_mode = self.user_mode();
        // SMAP restricts supervisor data accesses to user-mode addresses if
        // the access is implicit or RFLAGS.AC = 0 (4.6.1).
        let smap_blocks = smap && rights.user && (self.access.implicit || !self.access.rflags_ac);
        let violation = match (self.access.kind, user_mode) {
            // User-mode data read: the address must be a user-mode address.
            (RefKind::Read, true) => !rights.user,
            // Supervisor-mode data read: any address, but SMAP.
            (RefKind::Read, false) => smap_blocks,
            // User-mode data write: user-mode address, R/W = 1 everywhere.
            (RefKind::Write, true) => !rights.user || !rights.writable,
            // Supervisor-mode data write: SMAP, then R/W only with CR0.WP.
            (RefKind::Write, false) => smap_blocks || (wp && !rights.writable),
            // User-mode fetch: user-mode address, no XD.
            (RefKind::Fetch, true) => !rights.user || rights.xd,
            // Supervisor-mode fetch: no XD; SMEP forbids user-mode addresses.
            (RefKind::Fetch, false) => rights.xd || (smep && rights.user),
        };
        // Protection keys (4.6.2): IA-32e paging with CR4.PKE = 1, data
        // accesses to user-mode addresses.
        let pk = ia32e && cr4 & CR4_PKE != 0 && self.access.kind != RefKind::Fetch && rights.user && {
            let ad = (self.cpu.pkru >> (2 * pkey as u32)) & 1 != 0;
            let wd = (self.cpu.pkru >> (2 * pkey as u32 + 1)) & 1 != 0;
            ad || (wd && self.access.kind == RefKind::Write && (user_mode || wp))
        };
        if violation || pk {
            Some(self.access_bits() | PF_P | if pk { PF_PK } else { 0 })
        } else {
            None
        }
    }

    /// Finishes a walk that reached a leaf at `level`: the rights check,
    /// then A on every entry in `used` and D on the leaf for a write.
    fn finish(&self, level: u8, gpa: u64, page_size: u64, rights: &Rights, pkey: u8, used: &[(u64, usize)]) -> RefWalk {
        if let Some(error_code) = self.check(rights, pkey) {
            return RefWalk {
                outcome: RefOutcome::PageFault { error_code, level },
                updates: Vec::new(),
            };
        }
        let mut updates = Vec::new();
        let last = used.len().saturating_sub(1);
        for (i, &(addr, size)) in used.iter().enumerate() {
            let mut bits = 1u64 << 5;
            if i == last && self.access.kind == RefKind::Write && self.deviation != Deviation::NoDirty {
                bits |= 1 << 6;
            }
            updates.push((addr, size, bits));
        }
        RefWalk {
            outcome: RefOutcome::Translation { gpa, page_size, level },
            updates,
        }
    }
}

/// Translates `va` for `access` as the SDM says, reading paging entries of
/// 4 or 8 bytes through `read(address, size)`.
pub fn walk(cpu: &RefCpu, access: RefAccess, va: u64, read: &dyn Fn(u64, usize) -> u64) -> RefWalk {
    walk_with(cpu, access, va, read, Deviation::None)
}

/// [`walk`], with one rule deliberately changed (see [`Deviation`]).
pub fn walk_with(
    cpu: &RefCpu,
    access: RefAccess,
    va: u64,
    read: &dyn Fn(u64, usize) -> u64,
    deviation: Deviation,
) -> RefWalk {
    let ctx = Ctx {
        cpu: *cpu,
        access,
        deviation,
    };
    // SDM 4.1.1, Table 4-1: the paging mode.
    if cpu.cr0 & CR0_PG == 0 {
        return RefWalk {
            outcome: RefOutcome::Translation {
                gpa: va & 0xffff_ffff,
                page_size: 4096,
                level: 1,
            },
            updates: Vec::new(),
        };
    }
    if cpu.cr4 & CR4_PAE == 0 {
        walk_32bit(&ctx, va & 0xffff_ffff, read)
    } else if cpu.efer & EFER_LMA == 0 {
        walk_pae(&ctx, va & 0xffff_ffff, read)
    } else {
        walk_ia32e(&ctx, va, read)
    }
}

/// 32-bit paging (SDM 4.3).
fn walk_32bit(ctx: &Ctx, va: u64, read: &dyn Fn(u64, usize) -> u64) -> RefWalk {
    let cpu = &ctx.cpu;
    let mut rights = Rights::all();
    // Table 4-3: CR3 bits 31:12 locate the page directory; a PDE is
    // selected by linear-address bits 31:22.
    let pde_addr = (cpu.cr3 & mask(12, 31)) | ((va >> 22) & 0x3ff) << 2;
    let pde = read(pde_addr, 4);
    if !bit(pde, 0) {
        return ctx.not_present(2);
    }
    if cpu.cr4 & CR4_PSE != 0 && bit(pde, 7) {
        // Table 4-4: a PDE that maps a 4-MByte page. Bits 20:13 hold bits
        // (M-1):32 of the address, M = min(MAXPHYADDR, 40) with PSE-36 and
        // 32 without; bit 21 and bits 20:(M-19) are reserved.
        let m = if cpu.pse36 { cpu.maxphyaddr.min(40) as u32 } else { 32 };
        let reserved = mask(21, 21) | mask(13 + (m - 32), 20);
        if pde & reserved != 0 {
            return ctx.reserved(2);
        }
        rights.and(pde, false);
        let high = (pde >> 13) & ((1u64 << (m - 32)) - 1);
        let gpa = (pde & mask(22, 31)) | high << 32 | (va & mask(0, 21));
        return ctx.finish(2, gpa, 4 << 20, &rights, 0, &[(pde_addr, 4)]);
    }
    // Table 4-5: a PDE that references a page table (bit 7 ignored when
    // CR4.PSE = 0). No reserved bits.
    rights.and(pde, false);
    // Table 4-6: a PTE, selected by linear-address bits 21:12. Bit 7 is
    // PAT; no reserved bits.
    let pte_addr = (pde & mask(12, 31)) | ((va >> 12) & 0x3ff) << 2;
    let pte = read(pte_addr, 4);
    if !bit(pte, 0) {
        return ctx.not_present(1);
    }
    rights.and(pte, false);
    let gpa = (pte & mask(12, 31)) | (va & mask(0, 11));
    ctx.finish(1, gpa, 4096, &rights, 0, &[(pde_addr, 4), (pte_addr, 4)])
}

/// PAE paging (SDM 4.4).
fn walk_pae(ctx: &Ctx, va: u64, read: &dyn Fn(u64, usize) -> u64) -> RefWalk {
    let cpu = &ctx.cpu;
    let m = cpu.maxphyaddr as u32;
    let nxe = cpu.efer & EFER_NXE != 0;
    // Bit 63 is XD with EFER.NXE = 1, else reserved; bits 62:M are
    // reserved in every PAE PDE and PTE (Tables 4-9 to 4-11).
    let high_reserved = mask(m, 62) | if nxe { 0 } else { 1 << 63 };
    let mut rights = Rights::all();
    // 4.4.1: the PDPTE register selected by linear-address bits 31:30. Its
    // reserved bits were checked when it was loaded; it carries no rights.
    let pdpte = cpu.pdptes[((va >> 30) & 3) as usize];
    if !bit(pdpte, 0) {
        return ctx.not_present(3);
    }
    // Table 4-8: bits (M-1):12 locate the page directory; a PDE is selected
    // by linear-address bits 29:21.
    let pde_addr = (pdpte & mask(12, m - 1)) | ((va >> 21) & 0x1ff) << 3;
    let pde = read(pde_addr, 8);
    if !bit(pde, 0) {
        return ctx.not_present(2);
    }
    if bit(pde, 7) {
        // Table 4-9: a 2-MByte page; bits 20:13 are reserved.
        if pde & (high_reserved | mask(13, 20)) != 0 {
            return ctx.reserved(2);
        }
        rights.and(pde, nxe);
        let gpa = (pde & mask(21, m - 1)) | (va & mask(0, 20));
        return ctx.finish(2, gpa, 2 << 20, &rights, 0, &[(pde_addr, 8)]);
    }
    // Table 4-10: a PDE that references a page table.
    if pde & high_reserved != 0 {
        return ctx.reserved(2);
    }
    rights.and(pde, nxe);
    // Table 4-11: a PTE, selected by linear-address bits 20:12.
    let pte_addr = (pde & mask(12, m - 1)) | ((va >> 12) & 0x1ff) << 3;
    let pte = read(pte_addr, 8);
    if !bit(pte, 0) {
        return ctx.not_present(1);
    }
    if pte & high_reserved != 0 {
        return ctx.reserved(1);
    }
    rights.and(pte, nxe);
    let gpa = (pte & mask(12, m - 1)) | (va & mask(0, 11));
    ctx.finish(1, gpa, 4096, &rights, 0, &[(pde_addr, 8), (pte_addr, 8)])
}

/// 4-level and 5-level paging (SDM 4.5).
fn walk_ia32e(ctx: &Ctx, va: u64, read: &dyn Fn(u64, usize) -> u64) -> RefWalk {
    let cpu = &ctx.cpu;
    let m = cpu.maxphyaddr as u32;
    let nxe = cpu.efer & EFER_NXE != 0;
    let five = cpu.cr4 & CR4_LA57 != 0;
    // 4.5.1 and 3.3.7.1: bits 63:47 (63:56 with LA57) of a linear address
    // must all equal; otherwise #GP, before any paging structure is read.
    let top = if five { 56 } else { 47 };
    let sign = mask(top, 63);
    if va & sign != 0 && va & sign != sign {
        return RefWalk {
            outcome: RefOutcome::GeneralProtection,
            updates: Vec::new(),
        };
    }
    // Tables 4-14 to 4-20: bits 51:M are reserved in every entry; bit 63 is
    // XD with EFER.NXE = 1, else reserved. Bits 62:52 are ignored (62:59
    // are the protection key of a leaf with CR4.PKE = 1).
    let high_reserved = mask(m, 51) | if nxe { 0 } else { 1 << 63 };
    let mut rights = Rights::all();
    let mut used: Vec<(u64, usize)> = Vec::new();
    // Table 4-12: CR3 bits (M-1):12 locate the root table.
    let mut table = cpu.cr3 & mask(12, m - 1);
    let mut level: u8 = if five { 5 } else { 4 };
    loop {
        let shift = 12 + 9 * (level as u32 - 1);
        let addr = table | ((va >> shift) & 0x1ff) << 3;
        let entry = read(addr, 8);
        if !bit(entry, 0) {
            return ctx.not_present(level);
        }
        let ps = bit(entry, 7);
        let reserved = high_reserved
            | match (level, ps) {
                // Tables 4-14, 4-15: bit 7 of a PML5E or PML4E is reserved.
                (5 | 4, true) => 1 << 7,
                // Table 4-16: a 1-GByte page; bits 29:13 reserved, and bit 7
                // itself if 1-GByte pages are not supported.
                (3, true) => {
                    if cpu.gbpages {
                        mask(13, 29)
                    } else {
                        1 << 7
                    }
                }
                // Table 4-18: a 2-MByte page; bits 20:13 reserved.
                (2, true) => mask(13, 20),
                // Tables 4-17, 4-19, 4-20 (bit 7 of a PTE is PAT).
                _ => 0,
            };
        if entry & reserved != 0 {
            return ctx.reserved(level);
        }
        rights.and(entry, nxe);
        used.push((addr, 8));
        let leaf = level == 1 || (ps && (level == 2 || level == 3));
        if leaf {
            let size = 1u64 << shift;
            let gpa = (entry & mask(shift, m - 1)) | (va & (size - 1));
            let pkey = ((entry >> 59) & 0xf) as u8;
            return ctx.finish(level, gpa, size, &rights, pkey, &used);
        }
        table = entry & mask(12, m - 1);
        level -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(mask(0, 0), 1);
        assert_eq!(mask(13, 20), 0x1f_e000);
        assert_eq!(mask(21, 20), 0);
        assert_eq!(mask(40, 51), 0x000f_ff00_0000_0000);
        assert_eq!(mask(52, 63), 0xfff0_0000_0000_0000);
    }
}
