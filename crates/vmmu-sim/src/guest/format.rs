//! The guest OS's view of its paging mode: how many levels, how wide an
//! entry is, where the kernel half and its direct map of physical memory
//! live, and how to build an entry. What Linux keeps in its `pgtable_*.h`
//! headers, for the four modes the simulator boots.

use vmmu::arch::control::{Cr0, Cr4, Efer, PagingMode};
use vmmu::walker::ControlRegs;

/// Present.
pub const P: u64 = 1 << 0;
/// Writable.
pub const RW: u64 = 1 << 1;
/// User.
pub const US: u64 = 1 << 2;
/// Accessed.
pub const A: u64 = 1 << 5;
/// Dirty.
pub const D: u64 = 1 << 6;
/// Page size (a leaf above level 1).
pub const PS: u64 = 1 << 7;
/// Global.
pub const G: u64 = 1 << 8;
/// Execute-disable (PAE and IA-32e paging, with EFER.NXE).
pub const XD: u64 = 1 << 63;

/// The paging mode a simulated guest boots, with its layout, and the
/// protections it turns on because the CPU offers them (SMEP, SMAP,
/// protection keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagingFormat {
    mode: PagingMode,
    smep: bool,
    smap: bool,
    /// CR4.PKE (IA-32e paging only): user pages carry protection keys.
    pke: bool,
}

/// Where user mappings go in every mode: above 256 MiB.
const USER_BASE: u64 = 0x1000_0000;

impl PagingFormat {
    /// The format of `mode` (not [`PagingMode::None`]).
    pub fn new(mode: PagingMode) -> Option<PagingFormat> {
        (mode != PagingMode::None).then_some(PagingFormat {
            mode,
            smep: false,
            smap: false,
            pke: false,
        })
    }

    /// The same mode on a CPU with SMEP, SMAP and PKU as given: the guest
    /// enables each it has (protection keys only in IA-32e paging).
    pub fn with_cpuid(self, smep: bool, smap: bool, pku: bool) -> PagingFormat {
        PagingFormat {
            smep,
            smap,
            pke: pku && matches!(self.mode, PagingMode::Level4 | PagingMode::Level5),
            ..self
        }
    }

    /// Whether user pages carry protection keys (CR4.PKE).
    pub fn pkeys(&self) -> bool {
        self.pke
    }

    /// Parses `32-bit`, `pae`, `4-level` or `5-level`.
    pub fn parse(s: &str) -> Option<PagingFormat> {
        let mode = match s {
            "32-bit" | "32bit" | "bits32" => PagingMode::Bits32,
            "pae" => PagingMode::Pae,
            "4-level" | "4level" | "level4" => PagingMode::Level4,
            "5-level" | "5level" | "level5" => PagingMode::Level5,
            _ => return None,
        };
        PagingFormat::new(mode)
    }

    /// Every mode, in the order of [`PagingFormat::name`]s above.
    pub fn all() -> [PagingFormat; 4] {
        [
            PagingMode::Bits32,
            PagingMode::Pae,
            PagingMode::Level4,
            PagingMode::Level5,
        ]
        .map(|mode| PagingFormat::new(mode).expect("a paging mode"))
    }

    /// The mode.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// The name the CLI uses.
    pub fn name(&self) -> &'static str {
        match self.mode {
            PagingMode::Bits32 => "32-bit",
            PagingMode::Pae => "pae",
            PagingMode::Level5 => "5-level",
            _ => "4-level",
        }
    }

    /// The control registers that select this mode: WP, PGE (the kernel
    /// map is global), PSE, NXE, PCIDE where the mode allows it, and the
    /// SMEP, SMAP and PKE the CPU offers ([`PagingFormat::with_cpuid`]).
    pub fn regs(&self) -> ControlRegs {
        let cr0 = Cr0::PE | Cr0::PG | Cr0::WP;
        let (mut cr4, efer) = match self.mode {
            PagingMode::Bits32 => (Cr4::PSE | Cr4::PGE, Efer::empty()),
            PagingMode::Pae => (Cr4::PAE | Cr4::PGE, Efer::NXE),
            PagingMode::Level5 => (
                Cr4::PAE | Cr4::PGE | Cr4::PCIDE | Cr4::LA57,
                Efer::LME | Efer::LMA | Efer::NXE,
            ),
            _ => (Cr4::PAE | Cr4::PGE | Cr4::PCIDE, Efer::LME | Efer::LMA | Efer::NXE),
        };
        cr4.set(Cr4::SMEP, self.smep);
        cr4.set(Cr4::SMAP, self.smap);
        cr4.set(Cr4::PKE, self.pke);
        ControlRegs { cr0, cr4, efer }
    }

    /// Whether context switches tag translations with PCIDs.
    pub fn has_pcid(&self) -> bool {
        matches!(self.mode, PagingMode::Level4 | PagingMode::Level5)
    }

    /// Levels of tables below CR3 (PAE: the PDPT counts, its entries are
    /// the PDPTE registers).
    pub fn levels(&self) -> u8 {
        match self.mode {
            PagingMode::Bits32 => 2,
            PagingMode::Pae => 3,
            PagingMode::Level5 => 5,
            _ => 4,
        }
    }

    /// Bytes per entry.
    pub fn entry_size(&self) -> u64 {
        if self.mode == PagingMode::Bits32 { 4 } else { 8 }
    }

    /// Entries per table (the PAE PDPT uses 4 of them).
    pub fn entries(&self) -> u64 {
        4096 / self.entry_size()
    }

    /// Bits of the linear address a table at `level` indexes.
    fn index_bits(&self) -> u32 {
        if self.mode == PagingMode::Bits32 { 10 } else { 9 }
    }

    /// The shift of the region one entry at `level` maps.
    pub fn shift(&self, level: u8) -> u32 {
        12 + self.index_bits() * u32::from(level - 1)
    }

    /// The index of `va` in a table at `level`.
    pub fn index(&self, va: u64, level: u8) -> u64 {
        let mask = if self.mode == PagingMode::Pae && level == 3 {
            3
        } else {
            self.entries() - 1
        };
        (va >> self.shift(level)) & mask
    }

    /// The size of a huge user page: 4 MiB in 32-bit paging, 2 MiB
    /// otherwise.
    pub fn huge_size(&self) -> u64 {
        1 << self.shift(2)
    }

    /// The kernel's direct map: linear `page_offset() + gpa` is `gpa`.
    pub fn page_offset(&self) -> u64 {
        match self.mode {
            PagingMode::Bits32 | PagingMode::Pae => 0xc000_0000,
            PagingMode::Level5 => 0xff11_0000_0000_0000,
            _ => 0xffff_8880_0000_0000,
        }
    }

    /// The most RAM the direct map can cover.
    pub fn max_ram(&self) -> u64 {
        match self.mode {
            PagingMode::Bits32 | PagingMode::Pae => 1 << 30,
            _ => 64 << 30,
        }
    }

    /// The level of the direct map's leaves: 1 GiB pages in IA-32e
    /// paging, 4 MiB or 2 MiB pages otherwise.
    pub fn direct_map_level(&self) -> u8 {
        if self.has_pcid() { 3 } else { 2 }
    }

    /// The user address window `[start, end)` mappings are placed in. It
    /// ends where the trap region begins.
    pub fn user_window(&self) -> (u64, u64) {
        (USER_BASE, self.trap_region().0)
    }

    /// The level of the entry that links the trap region: the top level,
    /// or the page directory in PAE paging (whose PDPTEs have no rights
    /// bits and live in registers).
    pub fn trap_level(&self) -> u8 {
        if self.mode == PagingMode::Pae { 2 } else { self.levels() }
    }

    /// The trap region `[start, end)`: the last entry at [`trap_level`]
    /// below the kernel half, kept out of the user window for the
    /// adversarial guest's tricks (a table mapping itself, a recursive
    /// map of the root).
    ///
    /// [`trap_level`]: PagingFormat::trap_level
    pub fn trap_region(&self) -> (u64, u64) {
        let size = 1u64 << self.shift(self.trap_level());
        let end = match self.mode {
            PagingMode::Bits32 | PagingMode::Pae => 0xc000_0000,
            PagingMode::Level5 => 1 << 56,
            _ => 1 << 47,
        };
        (end - size, end)
    }

    /// The frame an entry points at (a table or a leaf's page, 4K-aligned
    /// base).
    pub fn entry_addr(&self, entry: u64, level: u8) -> u64 {
        let leaf_huge = level > 1 && entry & PS != 0;
        match (self.mode, leaf_huge) {
            (PagingMode::Bits32, false) => entry & 0xffff_f000,
            (PagingMode::Bits32, true) => entry & 0xffc0_0000,
            (_, false) => entry & 0x000f_ffff_ffff_f000,
            (_, true) => entry & 0x000f_ffff_ffff_f000 & !((1 << self.shift(level)) - 1),
        }
    }

    /// A non-leaf entry pointing at the table at `gpa`. PAE PDPTEs have
    /// no rights bits (they are reserved there).
    pub fn table_entry(&self, gpa: u64, level: u8) -> u64 {
        if self.mode == PagingMode::Pae && level == 3 {
            gpa | P
        } else {
            gpa | P | RW | US
        }
    }

    /// A leaf at `level` mapping `gpa`, writable or not, never executable
    /// where XD exists. A user leaf leaves A and D to the processor; a
    /// kernel leaf is global with A and D preset (as Linux's direct map).
    pub fn leaf_entry(&self, gpa: u64, level: u8, writable: bool, user: bool) -> u64 {
        let mut e = gpa | P;
        if writable {
            e |= RW;
        }
        if user {
            e |= US;
        } else {
            e |= G | A | if writable { D } else { 0 };
        }
        if level > 1 {
            e |= PS;
        }
        if self.mode != PagingMode::Bits32 {
            e |= XD;
        }
        if user && self.pke {
            // A protection key per 2 MiB of guest memory (bits 62:59).
            e |= ((gpa >> 21) & 0xf) << 59;
        }
        e
    }
}
