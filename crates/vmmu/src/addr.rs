//! Address and frame newtypes, page sizes and paging levels.
//!
//! Every address kind of the two-stage translation has its own type:
//!
//! | type  | what it is                          | translated by          |
//! |-------|-------------------------------------|------------------------|
//! | [`Gva`] | guest virtual address             | the guest's page tables |
//! | [`Gpa`] / [`Gfn`] | guest physical address / frame | memslots       |
//! | [`Hva`] | host virtual address (VMM process) | the host's page tables  |
//! | [`Hpa`] / [`Pfn`] | host physical address / frame  | (what an SPTE holds) |
//!
//! Conversions are explicit methods; there is no `From` between kinds, so
//! passing a gva where a gpa is expected does not compile:
//!
//! ```compile_fail
//! use vmmu::addr::{Gpa, Gva};
//! fn needs_gpa(_: Gpa) {}
//! needs_gpa(Gva::new(0x1000));
//! ```
//!
//! [`Gpa`] interoperates with rust-vmm's [`vm_memory::GuestAddress`] through
//! `From` in both directions: they are the same kind of address.

use std::fmt;

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size, 4 KiB.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Mask of the offset within a 4 KiB page.
pub const PAGE_OFFSET_MASK: u64 = PAGE_SIZE - 1;

macro_rules! address_newtype {
    ($(#[$doc:meta])* $name:ident, $short:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw value.
            #[inline(always)]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }
            /// The raw value.
            #[inline(always)]
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// Adds a byte or frame offset, wrapping.
            #[inline(always)]
            #[must_use]
            pub const fn add(self, delta: u64) -> Self {
                Self(self.0.wrapping_add(delta))
            }
            /// Subtracts another value of the same kind, giving the distance.
            #[inline(always)]
            pub const fn offset_from(self, base: Self) -> u64 {
                self.0.wrapping_sub(base.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($short, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

macro_rules! byte_address {
    ($name:ident, $frame:ident) => {
        impl $name {
            /// The frame holding this address.
            #[inline(always)]
            pub const fn frame(self) -> $frame {
                $frame::new(self.0 >> PAGE_SHIFT)
            }
            /// The offset within its 4 KiB page.
            #[inline(always)]
            pub const fn page_offset(self) -> u64 {
                self.0 & PAGE_OFFSET_MASK
            }
            /// This address rounded down to `size`, a power of two.
            #[inline(always)]
            pub const fn align_down(self, size: u64) -> Self {
                Self(self.0 & !(size - 1))
            }
            /// Whether the address is a multiple of `size`, a power of two.
            #[inline(always)]
            pub const fn is_aligned(self, size: u64) -> bool {
                self.0 & (size - 1) == 0
            }
        }

        impl $frame {
            /// The first byte of the frame.
            #[inline(always)]
            pub const fn addr(self) -> $name {
                $name::new(self.0 << PAGE_SHIFT)
            }
            /// This frame rounded down to a multiple of `frames`, a power of two.
            #[inline(always)]
            pub const fn align_down(self, frames: u64) -> Self {
                Self(self.0 & !(frames - 1))
            }
        }
    };
}

address_newtype!(
    /// A guest virtual (linear) address.
    Gva,
    "Gva"
);
address_newtype!(
    /// A guest physical address.
    Gpa,
    "Gpa"
);
address_newtype!(
    /// A guest physical frame number (gpa >> 12).
    Gfn,
    "Gfn"
);
address_newtype!(
    /// A host virtual address, in the VMM process's address space.
    Hva,
    "Hva"
);
address_newtype!(
    /// A host physical address.
    Hpa,
    "Hpa"
);
address_newtype!(
    /// A host physical frame number (hpa >> 12), what an SPTE points at.
    Pfn,
    "Pfn"
);

byte_address!(Gpa, Gfn);
byte_address!(Hpa, Pfn);

impl Gva {
    /// The offset within its 4 KiB page.
    #[inline(always)]
    pub const fn page_offset(self) -> u64 {
        self.0 & PAGE_OFFSET_MASK
    }
    /// The virtual page number (gva >> 12), for TLB tags.
    #[inline(always)]
    pub const fn vpn(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
    /// This address rounded down to `size`, a power of two.
    #[inline(always)]
    pub const fn align_down(self, size: u64) -> Self {
        Self(self.0 & !(size - 1))
    }
}

impl Hva {
    /// The offset within its 4 KiB page.
    #[inline(always)]
    pub const fn page_offset(self) -> u64 {
        self.0 & PAGE_OFFSET_MASK
    }
    /// This address rounded down to `size`, a power of two.
    #[inline(always)]
    pub const fn align_down(self, size: u64) -> Self {
        Self(self.0 & !(size - 1))
    }
    /// Whether the address is a multiple of `size`, a power of two.
    #[inline(always)]
    pub const fn is_aligned(self, size: u64) -> bool {
        self.0 & (size - 1) == 0
    }
}

impl From<vm_memory::GuestAddress> for Gpa {
    #[inline(always)]
    fn from(a: vm_memory::GuestAddress) -> Self {
        Gpa(a.0)
    }
}

impl From<Gpa> for vm_memory::GuestAddress {
    #[inline(always)]
    fn from(a: Gpa) -> Self {
        vm_memory::GuestAddress(a.0)
    }
}

/// A paging level counted as x86 does: 1 is the level whose entries map
/// 4 KiB pages, 2 maps 2 MiB (or 4 MiB in 32-bit paging), 3 maps 1 GiB,
/// 4 and 5 are the PML4 and PML5.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Level(u8);

impl Level {
    /// Level 1: entries map 4 KiB pages.
    pub const L1: Level = Level(1);
    /// Level 2: entries map 2 MiB pages (4 MiB with 32-bit paging) or level-1 tables.
    pub const L2: Level = Level(2);
    /// Level 3: entries map 1 GiB pages or level-2 tables.
    pub const L3: Level = Level(3);
    /// Level 4: the PML4.
    pub const L4: Level = Level(4);
    /// Level 5: the PML5.
    pub const L5: Level = Level(5);

    /// The highest level x86 defines.
    pub const MAX: Level = Level::L5;

    /// A level from its number; `None` outside 1..=5.
    #[inline(always)]
    pub const fn new(n: u8) -> Option<Level> {
        if n >= 1 && n <= 5 { Some(Level(n)) } else { None }
    }

    /// A level from a number the caller knows is in 1..=5 (a cursor's or
    /// a role's own level): no check in release builds, for hot paths.
    #[inline(always)]
    pub(crate) const fn from_known(n: u8) -> Level {
        debug_assert!(n >= 1 && n <= 5);
        Level(n)
    }

    /// The level number, 1..=5.
    #[inline(always)]
    pub const fn get(self) -> u8 {
        self.0
    }

    /// Zero-based index, for arrays indexed by level.
    #[inline(always)]
    pub const fn index(self) -> usize {
        (self.0 - 1) as usize
    }

    /// The level below, `None` at level 1.
    #[inline(always)]
    pub const fn down(self) -> Option<Level> {
        if self.0 > 1 { Some(Level(self.0 - 1)) } else { None }
    }

    /// The level above, `None` at level 5.
    #[inline(always)]
    pub const fn up(self) -> Option<Level> {
        if self.0 < 5 { Some(Level(self.0 + 1)) } else { None }
    }

    /// The index of the entry at this level that translates `addr` (an
    /// address of 9-bit-table paging: a linear address, or a guest-physical
    /// one under EPT/NPT).
    #[inline(always)]
    pub const fn table_index(self, addr: u64) -> usize {
        ((addr >> (PAGE_SHIFT + 9 * (self.0 as u32 - 1))) & 511) as usize
    }

    /// Number of 4 KiB frames a leaf at this level maps with 9-bit tables
    /// (1, 512, 512², ...).
    #[inline(always)]
    pub const fn pages(self) -> u64 {
        1u64 << (9 * (self.0 as u32 - 1))
    }

    /// Bytes a leaf at this level maps with 9-bit tables.
    #[inline(always)]
    pub const fn size(self) -> u64 {
        PAGE_SIZE << (9 * (self.0 as u32 - 1))
    }

    /// The page size of a leaf at this level with 9-bit tables, if x86 has one.
    pub const fn page_size(self) -> Option<PageSize> {
        match self.0 {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

impl fmt::Debug for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{}", self.0)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The size of a page a leaf entry maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB.
    Size4K,
    /// 2 MiB (PAE, 4-level and 5-level paging, EPT).
    Size2M,
    /// 4 MiB (32-bit paging with CR4.PSE).
    Size4M,
    /// 1 GiB.
    Size1G,
}

impl PageSize {
    /// Size in bytes.
    #[inline(always)]
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size4M => 1 << 22,
            PageSize::Size1G => 1 << 30,
        }
    }

    /// Size in 4 KiB frames.
    #[inline(always)]
    pub const fn frames(self) -> u64 {
        self.bytes() >> PAGE_SHIFT
    }

    /// A short name: "4K", "2M", "4M", "1G".
    pub const fn name(self) -> &'static str {
        match self {
            PageSize::Size4K => "4K",
            PageSize::Size2M => "2M",
            PageSize::Size4M => "4M",
            PageSize::Size1G => "1G",
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_offsets_round_trip() {
        let gpa = Gpa::new(0x1234_5678);
        assert_eq!(gpa.frame(), Gfn::new(0x12345));
        assert_eq!(gpa.page_offset(), 0x678);
        assert_eq!(gpa.frame().addr().add(gpa.page_offset()), gpa);
        let hpa = Hpa::new(0xdead_b000);
        assert_eq!(hpa.frame().addr(), hpa);
        assert_eq!(Gfn::new(0x3ff).align_down(512), Gfn::new(0x200));
    }

    #[test]
    fn levels_count_as_x86() {
        assert_eq!(Level::L1.size(), 4096);
        assert_eq!(Level::L2.size(), 2 << 20);
        assert_eq!(Level::L3.size(), 1 << 30);
        assert_eq!(Level::L3.pages(), 512 * 512);
        assert_eq!(Level::new(0), None);
        assert_eq!(Level::new(6), None);
        assert_eq!(Level::L1.down(), None);
        assert_eq!(Level::L5.up(), None);
        assert_eq!(Level::L4.down(), Some(Level::L3));
        assert_eq!(Level::L2.page_size(), Some(PageSize::Size2M));
        assert_eq!(Level::L4.page_size(), None);
    }

    #[test]
    fn gpa_interoperates_with_vm_memory() {
        let ga = vm_memory::GuestAddress(0x5000);
        let gpa: Gpa = ga.into();
        assert_eq!(gpa.raw(), 0x5000);
        let back: vm_memory::GuestAddress = gpa.into();
        assert_eq!(back, ga);
    }
}
