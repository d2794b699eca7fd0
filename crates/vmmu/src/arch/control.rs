//! Control registers, the paging mode they select, and CPU features.

use bitflags::bitflags;

bitflags! {
    /// CR0 bits that matter to paging.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Cr0: u64 {
        /// Protected mode enable.
        const PE = 1 << 0;
        /// Write protect: supervisor writes honour R/W.
        const WP = 1 << 16;
        /// Paging.
        const PG = 1 << 31;
    }
}

bitflags! {
    /// CR4 bits that matter to paging.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Cr4: u64 {
        /// 4 MiB pages in 32-bit paging.
        const PSE = 1 << 4;
        /// Physical address extension (PAE, 4-level and 5-level paging).
        const PAE = 1 << 5;
        /// Global pages.
        const PGE = 1 << 7;
        /// 57-bit linear addresses (5-level paging).
        const LA57 = 1 << 12;
        /// Process-context identifiers.
        const PCIDE = 1 << 17;
        /// Supervisor-mode execution prevention.
        const SMEP = 1 << 20;
        /// Supervisor-mode access prevention.
        const SMAP = 1 << 21;
        /// Protection keys for user-mode pages.
        const PKE = 1 << 22;
        /// Protection keys for supervisor-mode pages.
        const PKS = 1 << 24;
    }
}

bitflags! {
    /// IA32_EFER bits that matter to paging.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Efer: u64 {
        /// Long mode enable.
        const LME = 1 << 8;
        /// Long mode active.
        const LMA = 1 << 10;
        /// Execute-disable bit enable.
        const NXE = 1 << 11;
    }
}

/// The paging mode, derived from CR0.PG, CR4.PAE, EFER.LMA and CR4.LA57
/// (SDM vol. 3A 4.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PagingMode {
    /// CR0.PG = 0: linear addresses are physical addresses.
    None,
    /// 32-bit paging: two levels of 4-byte entries.
    Bits32,
    /// PAE paging: four PDPTE registers and two levels of 8-byte entries.
    Pae,
    /// 4-level paging (IA-32e).
    Level4,
    /// 5-level paging (IA-32e with CR4.LA57).
    Level5,
}

impl PagingMode {
    /// The mode the control registers select.
    pub fn from_regs(cr0: Cr0, cr4: Cr4, efer: Efer) -> PagingMode {
        if !cr0.contains(Cr0::PG) {
            PagingMode::None
        } else if !cr4.contains(Cr4::PAE) {
            PagingMode::Bits32
        } else if !efer.contains(Efer::LMA) {
            PagingMode::Pae
        } else if cr4.contains(Cr4::LA57) {
            PagingMode::Level5
        } else {
            PagingMode::Level4
        }
    }

    /// The level of the root table (2 for 32-bit, 3 for PAE's PDPT).
    pub fn root_level(self) -> u8 {
        match self {
            PagingMode::None => 0,
            PagingMode::Bits32 => 2,
            PagingMode::Pae => 3,
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        }
    }

    /// Whether this is IA-32e (long) mode paging.
    pub fn is_long(self) -> bool {
        matches!(self, PagingMode::Level4 | PagingMode::Level5)
    }

    /// Whether entries are 8 bytes wide (PAE and long modes).
    pub fn has_pae(self) -> bool {
        matches!(self, PagingMode::Pae | PagingMode::Level4 | PagingMode::Level5)
    }

    /// Width in bits of a linear address (32, 48 or 57).
    pub fn va_bits(self) -> u32 {
        match self {
            PagingMode::Level4 => 48,
            PagingMode::Level5 => 57,
            _ => 32,
        }
    }

    /// Short name as the conformance files spell it.
    pub fn name(self) -> &'static str {
        match self {
            PagingMode::None => "none",
            PagingMode::Bits32 => "ia32",
            PagingMode::Pae => "pae",
            PagingMode::Level4 => "lm4",
            PagingMode::Level5 => "lm5",
        }
    }

    /// Whether `va` is canonical in this mode. Legacy modes have no
    /// canonicality rule (their linear addresses are 32 bits).
    #[inline]
    pub fn is_canonical(self, va: u64) -> bool {
        match self {
            PagingMode::Level4 => is_canonical(va, 48),
            PagingMode::Level5 => is_canonical(va, 57),
            _ => true,
        }
    }
}

/// Whether `va` is the sign extension of its low `bits` bits.
#[inline]
pub fn is_canonical(va: u64, bits: u32) -> bool {
    let shift = 64 - bits;
    (((va << shift) as i64) >> shift) as u64 == va
}

/// The processor vendor, which decides the virtualization extension and
/// with it the format of the TDP MMU's tables and its exits: Intel VMX with
/// EPT (EPT violations and misconfigurations, VPIDs) or AMD SVM with NPT
/// (tables in the x86-64 long-mode format, #NPF with EXITINFO1/2, ASIDs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    /// Intel: VMX, EPT.
    #[default]
    Intel,
    /// AMD: SVM, NPT.
    Amd,
}

impl Vendor {
    /// The name the command line uses (`intel`, `amd`).
    pub fn name(self) -> &'static str {
        match self {
            Vendor::Intel => "intel",
            Vendor::Amd => "amd",
        }
    }
}

/// The processor features that change paging (CPUID), with MAXPHYADDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuFeatures {
    /// Physical-address width, 32..=52.
    pub maxphyaddr: u8,
    /// 1 GiB pages (CPUID.80000001H:EDX.Page1GB).
    pub gbpages: bool,
    /// PSE-36: 4 MiB pages may map above 4 GiB in 32-bit paging.
    pub pse36: bool,
    /// EPT execute-only translations.
    pub ept_exec_only: bool,
    /// EPT 1 GiB pages.
    pub ept_1g: bool,
}

impl Default for CpuFeatures {
    /// A modern processor with MAXPHYADDR 46, as the conformance corpus's
    /// `-cpu max`: 1 GiB pages, PSE-36, EPT execute-only and 1 GiB pages.
    fn default() -> Self {
        CpuFeatures {
            maxphyaddr: 46,
            gbpages: true,
            pse36: true,
            ept_exec_only: true,
            ept_1g: true,
        }
    }
}

impl CpuFeatures {
    /// The features with another MAXPHYADDR.
    pub fn with_maxphyaddr(mut self, maxphyaddr: u8) -> Self {
        self.maxphyaddr = maxphyaddr;
        self
    }
}

/// CR3 bits 11:0 hold the PCID when CR4.PCIDE = 1.
pub const CR3_PCID_MASK: u64 = 0xfff;
/// MOV to CR3 bit 63: do not invalidate the PCID's translations (not stored in CR3).
pub const CR3_NOFLUSH: u64 = 1 << 63;
/// CR3 bits of the PAE PDPT address (32-byte aligned).
pub const CR3_PAE_PDPT_MASK: u64 = 0xffff_ffe0;
/// CR3 bits of the root table in 32-bit paging.
pub const CR3_32_ROOT_MASK: u64 = 0xffff_f000;
/// CR3 bits of the root table in IA-32e paging (bits 51:12).
pub const CR3_LM_ROOT_MASK: u64 = 0x000f_ffff_ffff_f000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_mode_from_registers() {
        let pg = Cr0::PG | Cr0::PE;
        assert_eq!(PagingMode::from_regs(Cr0::PE, Cr4::PAE, Efer::LMA), PagingMode::None);
        assert_eq!(
            PagingMode::from_regs(pg, Cr4::empty(), Efer::empty()),
            PagingMode::Bits32
        );
        assert_eq!(PagingMode::from_regs(pg, Cr4::PSE, Efer::LME), PagingMode::Bits32);
        assert_eq!(PagingMode::from_regs(pg, Cr4::PAE, Efer::LME), PagingMode::Pae);
        assert_eq!(PagingMode::from_regs(pg, Cr4::PAE, Efer::LMA), PagingMode::Level4);
        assert_eq!(
            PagingMode::from_regs(pg, Cr4::PAE | Cr4::LA57, Efer::LMA),
            PagingMode::Level5
        );
        // LA57 without long mode is PAE.
        assert_eq!(
            PagingMode::from_regs(pg, Cr4::PAE | Cr4::LA57, Efer::empty()),
            PagingMode::Pae
        );
    }

    #[test]
    fn canonical_addresses() {
        assert!(is_canonical(0x0000_7fff_ffff_ffff, 48));
        assert!(!is_canonical(0x0000_8000_0000_0000, 48));
        assert!(is_canonical(0xffff_8000_0000_0000, 48));
        assert!(!is_canonical(0xfff7_8000_0000_0000, 48));
        assert!(!is_canonical(0x01ff_ffff_ffff_ffff, 57));
        assert!(is_canonical(0x00ff_ffff_ffff_ffff >> 1, 57));
        assert!(is_canonical(0xff00_0000_0000_0000, 57));
        assert!(PagingMode::Pae.is_canonical(0xdead_beef_0000_0000));
    }
}
