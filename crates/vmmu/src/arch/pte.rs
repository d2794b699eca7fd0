//! Guest paging-entry formats.
//!
//! One trait, [`PteFormat`], says what the walker needs to know about an
//! entry format; [`Pte32`] (32-bit paging), [`Pte64`] (PAE, 4-level and
//! 5-level paging) and [`PteEpt`](super::ept::PteEpt) (EPT, for nested TDP, beside the EPT bits) implement it. This is
//! the job `paging_tmpl.h`'s `PTTYPE` does in KVM.

use super::perm::AccessRights;

/// The width of a paging-structure entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntrySize {
    /// 4 bytes: 32-bit paging.
    Four,
    /// 8 bytes: PAE, 4-level, 5-level paging and EPT.
    Eight,
}

impl EntrySize {
    /// Width in bytes.
    #[inline(always)]
    pub const fn bytes(self) -> u64 {
        match self {
            EntrySize::Four => 4,
            EntrySize::Eight => 8,
        }
    }
}

/// Present (bit 0) in 32-bit, PAE and IA-32e entries.
pub const PT_PRESENT: u64 = 1 << 0;
/// Read/write (bit 1).
pub const PT_WRITABLE: u64 = 1 << 1;
/// User/supervisor (bit 2).
pub const PT_USER: u64 = 1 << 2;
/// Page-level write-through (bit 3).
pub const PT_PWT: u64 = 1 << 3;
/// Page-level cache disable (bit 4).
pub const PT_PCD: u64 = 1 << 4;
/// Accessed (bit 5).
pub const PT_ACCESSED: u64 = 1 << 5;
/// Dirty (bit 6), leaf entries only.
pub const PT_DIRTY: u64 = 1 << 6;
/// Page size (bit 7): the entry maps a large page. PAT in a level-1 entry.
pub const PT_PAGE_SIZE: u64 = 1 << 7;
/// Global (bit 8), leaf entries only.
pub const PT_GLOBAL: u64 = 1 << 8;
/// PAT bit of a large-page entry (bit 12).
pub const PT_LARGE_PAT: u64 = 1 << 12;
/// Execute-disable (bit 63) in PAE and IA-32e entries.
pub const PT64_NX: u64 = 1 << 63;
/// Shift of the protection key (bits 62:59) in IA-32e leaf entries.
pub const PT64_PKEY_SHIFT: u32 = 59;

/// What the walker needs to know about one entry format.
pub trait PteFormat: Copy + Send + Sync + 'static {
    /// Name, for messages.
    const NAME: &'static str;
    /// Entry width.
    const SIZE: EntrySize;
    /// Linear-address bits each level indexes (10 for 32-bit paging, else 9).
    const INDEX_BITS: u32;
    /// The Accessed bit.
    const ACCESSED: u64;
    /// The Dirty bit.
    const DIRTY: u64;
    /// Whether leaves carry a memory type whose illegal values (and illegal
    /// R/W/X combinations) are misconfigurations: EPT only.
    const HAS_MEMTYPE: bool = false;

    /// Whether the entry is present (for EPT: readable, writable or executable).
    fn is_present(pte: u64) -> bool;
    /// Whether bit 7 (page size) is set.
    #[inline(always)]
    fn has_page_size(pte: u64) -> bool {
        pte & PT_PAGE_SIZE != 0
    }
    /// The rights this one entry grants (for EPT: USER stands for readable).
    fn rights(pte: u64) -> AccessRights;
    /// Physical address of the table a non-leaf entry points to.
    fn table_addr(pte: u64) -> u64;
    /// Physical base address of the page a leaf entry at `level` maps.
    fn leaf_addr(pte: u64, level: u8) -> u64;
    /// The protection key of a leaf entry (0 where the format has none).
    #[inline(always)]
    fn pkey(_pte: u64) -> u8 {
        0
    }
    /// Bytes a leaf at `level` maps.
    #[inline(always)]
    fn leaf_size(level: u8) -> u64 {
        1u64 << (12 + Self::INDEX_BITS * (level as u32 - 1))
    }
    /// Index into the table at `level` for linear address `va`.
    #[inline(always)]
    fn index(va: u64, level: u8) -> u64 {
        (va >> (12 + Self::INDEX_BITS * (level as u32 - 1))) & ((1 << Self::INDEX_BITS) - 1)
    }
}

/// 32-bit paging: 4-byte entries, 10 bits per level, 4 MiB pages with
/// CR4.PSE (PSE-36 address bits 39:32 in bits 20:13).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pte32;

impl PteFormat for Pte32 {
    const NAME: &'static str = "32-bit";
    const SIZE: EntrySize = EntrySize::Four;
    const INDEX_BITS: u32 = 10;
    const ACCESSED: u64 = PT_ACCESSED;
    const DIRTY: u64 = PT_DIRTY;

    #[inline(always)]
    fn is_present(pte: u64) -> bool {
        pte & PT_PRESENT != 0
    }
    #[inline(always)]
    fn rights(pte: u64) -> AccessRights {
        AccessRights::from_bits_truncate((pte & (PT_WRITABLE | PT_USER)) as u8 | AccessRights::EXEC.bits())
    }
    #[inline(always)]
    fn table_addr(pte: u64) -> u64 {
        pte & 0xffff_f000
    }
    #[inline(always)]
    fn leaf_addr(pte: u64, level: u8) -> u64 {
        if level == 1 {
            pte & 0xffff_f000
        } else {
            (pte & 0xffc0_0000) | (((pte >> 13) & 0xff) << 32)
        }
    }
}

/// PAE, 4-level and 5-level paging: 8-byte entries, 9 bits per level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pte64;

/// Address bits 51:12 of an 8-byte entry.
pub const PT64_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

impl PteFormat for Pte64 {
    const NAME: &'static str = "64-bit";
    const SIZE: EntrySize = EntrySize::Eight;
    const INDEX_BITS: u32 = 9;
    const ACCESSED: u64 = PT_ACCESSED;
    const DIRTY: u64 = PT_DIRTY;

    #[inline(always)]
    fn is_present(pte: u64) -> bool {
        pte & PT_PRESENT != 0
    }
    #[inline(always)]
    fn rights(pte: u64) -> AccessRights {
        let exec = ((!pte >> 63) as u8) & AccessRights::EXEC.bits();
        AccessRights::from_bits_truncate((pte & (PT_WRITABLE | PT_USER)) as u8 | exec)
    }
    #[inline(always)]
    fn table_addr(pte: u64) -> u64 {
        pte & PT64_ADDR_MASK
    }
    #[inline(always)]
    fn leaf_addr(pte: u64, level: u8) -> u64 {
        const MASKS: [u64; 4] = [
            PT64_ADDR_MASK,
            PT64_ADDR_MASK & !((1 << 21) - 1),
            PT64_ADDR_MASK & !((1 << 30) - 1),
            PT64_ADDR_MASK & !((1 << 39) - 1),
        ];
        pte & MASKS[(level as usize - 1) & 3]
    }
    #[inline(always)]
    fn pkey(pte: u64) -> u8 {
        ((pte >> PT64_PKEY_SHIFT) & 0xf) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pse36_address_bits() {
        // 4 MiB page at 0x12_3440_0000: bits 39:32 = 0x12 in PDE bits 20:13.
        let pde = 0x3440_0000 | (0x12 << 13) | PT_PAGE_SIZE | PT_PRESENT;
        assert_eq!(Pte32::leaf_addr(pde, 2), 0x12_3440_0000);
        assert_eq!(Pte32::leaf_size(2), 4 << 20);
        assert_eq!(Pte32::index(0xffc0_0000, 2), 0x3ff);
    }

    #[test]
    fn pte64_addresses_and_rights() {
        let pte = 0x8000_0012_3456_7867u64; // NX, D, A, U, W, P, PS
        assert_eq!(Pte64::leaf_addr(pte, 1), 0x12_3456_7000);
        assert_eq!(Pte64::leaf_addr(pte, 2), 0x12_3440_0000);
        assert_eq!(Pte64::leaf_addr(pte, 3), 0x12_0000_0000);
        assert_eq!(Pte64::rights(pte), AccessRights::WRITE | AccessRights::USER);
        assert_eq!(Pte64::rights(0x1), AccessRights::EXEC);
        assert_eq!(Pte64::pkey(0x7800_0000_0000_0001), 0xf);
        assert_eq!(Pte64::index(0xffff_8000_0000_0000, 4), 256);
    }
}
