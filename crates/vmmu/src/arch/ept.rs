//! EPT entries, the EPT pointer, and the EPT-violation exit qualification
//! (SDM vol. 3C 29.3).

use bitflags::bitflags;

use super::perm::AccessRights;
use super::pte::{EntrySize, PT64_ADDR_MASK, Pte64, PteFormat};

/// Read access (bit 0).
pub const EPT_READ: u64 = 1 << 0;
/// Write access (bit 1).
pub const EPT_WRITE: u64 = 1 << 1;
/// Execute access (bit 2; supervisor-mode execute with MBEC).
pub const EPT_EXEC: u64 = 1 << 2;
/// Bits 2:0.
pub const EPT_RWX: u64 = EPT_READ | EPT_WRITE | EPT_EXEC;
/// Shift of the memory type (bits 5:3) of a leaf.
pub const EPT_MT_SHIFT: u32 = 3;
/// Mask of the memory type.
pub const EPT_MT_MASK: u64 = 7 << EPT_MT_SHIFT;
/// Ignore PAT (bit 6) of a leaf.
pub const EPT_IGNORE_PAT: u64 = 1 << 6;
/// Large page (bit 7) at levels 2 and 3.
pub const EPT_LARGE: u64 = 1 << 7;
/// Accessed (bit 8), when the EPTP enables A/D.
pub const EPT_ACCESSED: u64 = 1 << 8;
/// Dirty (bit 9) of a leaf, when the EPTP enables A/D.
pub const EPT_DIRTY: u64 = 1 << 9;
/// User-mode execute (bit 10) with mode-based execute control.
pub const EPT_USER_EXEC: u64 = 1 << 10;
/// Suppress #VE (bit 63).
pub const EPT_SUPPRESS_VE: u64 = 1 << 63;

/// EPT memory types (bits 5:3 of a leaf, and of the EPTP's bits 2:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MemType {
    /// Uncacheable.
    Uc = 0,
    /// Write combining.
    Wc = 1,
    /// Write through.
    Wt = 4,
    /// Write protected.
    Wp = 5,
    /// Write back.
    Wb = 6,
}

impl MemType {
    /// The memory type encoded by `bits`, `None` for the reserved 2, 3, 7.
    pub fn from_bits(bits: u8) -> Option<MemType> {
        match bits {
            0 => Some(MemType::Uc),
            1 => Some(MemType::Wc),
            4 => Some(MemType::Wt),
            5 => Some(MemType::Wp),
            6 => Some(MemType::Wb),
            _ => None,
        }
    }
}

/// The EPT pointer (VMCS field): root, walk length, A/D enable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Eptp(pub u64);

impl Eptp {
    /// An EPTP for a root at `root` with `levels` (4 or 5), write-back
    /// paging-structure memory type, and A/D flags as `ad`.
    ///
    /// # Panics
    /// If `levels` is not 4 or 5, the only page-walk lengths EPT has (a
    /// VMM bug: the EPTP's 3-bit field would hold a length the processor
    /// rejects at VM entry).
    pub fn new(root: u64, levels: u8, ad: bool) -> Eptp {
        assert!(
            matches!(levels, 4 | 5),
            "an EPT page walk has 4 or 5 levels, not {levels}"
        );
        Eptp((root & PT64_ADDR_MASK) | ((levels as u64 - 1) << 3) | (MemType::Wb as u64) | ((ad as u64) << 6))
    }
    /// Physical address of the root table.
    pub fn root(self) -> u64 {
        self.0 & PT64_ADDR_MASK
    }
    /// Page-walk length (4 or 5 levels).
    pub fn levels(self) -> u8 {
        (((self.0 >> 3) & 7) + 1) as u8
    }
    /// Whether accessed and dirty flags are enabled.
    pub fn ad_enabled(self) -> bool {
        self.0 & (1 << 6) != 0
    }
}

bitflags! {
    /// Exit qualification of an EPT violation (SDM vol. 3C table 28-7).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct EptViolationQual: u64 {
        /// The access was a data read.
        const READ = 1 << 0;
        /// The access was a data write.
        const WRITE = 1 << 1;
        /// The access was an instruction fetch.
        const FETCH = 1 << 2;
        /// The gpa was readable (AND of R over the EPT walk).
        const READABLE = 1 << 3;
        /// The gpa was writable.
        const WRITABLE = 1 << 4;
        /// The gpa was executable.
        const EXECUTABLE = 1 << 5;
        /// The gpa was user-executable (MBEC).
        const USER_EXECUTABLE = 1 << 6;
        /// The guest linear address field is valid.
        const GLA_VALID = 1 << 7;
        /// With GLA_VALID: 1 = the access was to the final translation of the
        /// linear address, 0 = to a guest paging-structure entry.
        const GLA_TRANSLATION = 1 << 8;
    }
}

/// EPT: 8-byte entries, 9 bits per level, R/W/X permissions and A/D at
/// bits 8/9.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PteEpt;

impl PteFormat for PteEpt {
    const NAME: &'static str = "EPT";
    const SIZE: EntrySize = EntrySize::Eight;
    const INDEX_BITS: u32 = 9;
    const ACCESSED: u64 = EPT_ACCESSED;
    const DIRTY: u64 = EPT_DIRTY;
    const HAS_MEMTYPE: bool = true;

    #[inline(always)]
    fn is_present(pte: u64) -> bool {
        pte & EPT_RWX != 0
    }
    #[inline(always)]
    fn rights(pte: u64) -> AccessRights {
        let mut r = AccessRights::empty();
        if pte & EPT_READ != 0 {
            r |= AccessRights::USER;
        }
        if pte & EPT_WRITE != 0 {
            r |= AccessRights::WRITE;
        }
        if pte & EPT_EXEC != 0 {
            r |= AccessRights::EXEC;
        }
        r
    }
    #[inline(always)]
    fn table_addr(pte: u64) -> u64 {
        pte & PT64_ADDR_MASK
    }
    #[inline(always)]
    fn leaf_addr(pte: u64, level: u8) -> u64 {
        Pte64::leaf_addr(pte, level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eptp_holds_its_root_walk_length_and_ad_flag() {
        for (levels, ad) in [(4, false), (4, true), (5, false), (5, true)] {
            let e = Eptp::new(0x12_3000, levels, ad);
            assert_eq!((e.root(), e.levels(), e.ad_enabled()), (0x12_3000, levels, ad));
            assert_eq!(e.0 & 7, MemType::Wb as u64);
        }
    }

    #[test]
    #[should_panic(expected = "4 or 5 levels, not 0")]
    fn an_eptp_of_no_levels_is_refused() {
        let _ = Eptp::new(0x1000, 0, false);
    }

    #[test]
    fn ept_rights() {
        assert!(!PteEpt::is_present(0x1000));
        assert!(PteEpt::is_present(0x4)); // execute-only
        assert_eq!(PteEpt::rights(0x7), AccessRights::all());
        assert_eq!(PteEpt::rights(0x1), AccessRights::USER);
    }
}
