//! The SPTE format: the one place that knows the bits of the entries the
//! MMUs build and the hardware model walks (KVM's `spte.h`).
//!
//! Two hardware formats share one set of software bits:
//!
//! - **EPT** (the TDP MMU): R/W/X in bits 2:0, memory type 5:3, ignore-PAT 6,
//!   large 7, A 8, D 9.
//! - **IA-32e** (the shadow MMU, walked as the guest's own paging): P 0,
//!   R/W 1, U/S 2, A 5, D 6, PS 7, XD 63.
//!
//! Software bits, in bits both formats ignore:
//!
//! | bit(s) | meaning |
//! |---|---|
//! | 11 | MMU-present: backed by memory (MMIO and frozen SPTEs are not) |
//! | 52-53 | EPT only: A/D mode of this SPTE (enabled, or access-tracked) |
//! | 54, 56 | EPT only: R and X saved while access-tracked |
//! | 57 | host-writable: the host mapping allowed writes when installed |
//! | 58 | MMU-writable: the MMU allows writes (not write-protected for dirty logging or write tracking) |
//!
//! The legal states of a leaf, checked by [`Spte::check_leaf_writable_invariants`] (KVM's
//! `check_spte_writable_invariants`): a hardware-writable SPTE is
//! MMU-writable, and an MMU-writable SPTE is host-writable.
//!
//! A **frozen** SPTE ([`FROZEN_SPTE`]) is what a thread installs to own an
//! entry while it replaces the table below it: not present in either
//! hardware format, not MMIO, and distinct from every value the MMU writes
//! otherwise. **MMIO** SPTEs cache "this gfn has no memslot": in EPT an
//! illegal write-without-read combination (so the hardware exits with an EPT
//! misconfiguration), in IA-32e a reserved bit (a #PF with RSVD); both carry
//! the memslot generation so a memslot change invalidates them all at once.

use crate::addr::{Level, Pfn};
use crate::arch::bits;
use crate::arch::ept::{EPT_ACCESSED, EPT_DIRTY, EPT_EXEC, EPT_LARGE, EPT_MT_SHIFT, EPT_READ, EPT_WRITE, MemType};
use crate::arch::pte::{
    PT_ACCESSED, PT_DIRTY, PT_PAGE_SIZE, PT_PRESENT, PT_USER, PT_WRITABLE, PT64_ADDR_MASK, PT64_NX,
};

/// MMU-present (bit 11).
pub const SPTE_MMU_PRESENT: u64 = 1 << 11;
/// Shift of the EPT A/D mode bits (52-53).
pub const SPTE_TDP_AD_SHIFT: u32 = 52;
/// Mask of the EPT A/D mode bits.
pub const SPTE_TDP_AD_MASK: u64 = 3 << SPTE_TDP_AD_SHIFT;
/// A/D mode: hardware maintains A/D (0, so it is the default).
pub const SPTE_TDP_AD_ENABLED: u64 = 0;
/// A/D mode: no hardware A/D; aging uses access tracking.
pub const SPTE_TDP_AD_DISABLED: u64 = 1 << SPTE_TDP_AD_SHIFT;
/// Saved EPT read bit of an access-tracked SPTE (bit 54).
pub const SPTE_SAVED_R: u64 = 1 << 54;
/// Saved EPT execute bit of an access-tracked SPTE (bit 56).
pub const SPTE_SAVED_X: u64 = 1 << 56;
/// Host-writable (bit 57).
pub const SPTE_HOST_WRITABLE: u64 = 1 << 57;
/// MMU-writable (bit 58).
pub const SPTE_MMU_WRITABLE: u64 = 1 << 58;
/// The frozen value: bits 5, 7, 8, 10. Not present for EPT (R/W/X clear) nor
/// IA-32e (P clear), not MMIO, never MMU-present.
pub const FROZEN_SPTE: u64 = 0x5a0;

/// Bits 51:12: the host frame.
pub const SPTE_ADDR_MASK: u64 = PT64_ADDR_MASK;

/// MMIO generation bits: 8 low (3..=10) and 11 high (52..=62) = 19 bits.
const MMIO_GEN_LOW_SHIFT: u32 = 3;
const MMIO_GEN_LOW_BITS: u32 = 8;
const MMIO_GEN_HIGH_SHIFT: u32 = 52;
const MMIO_GEN_HIGH_BITS: u32 = 11;
/// Memslot generations are compared modulo 2¹⁹ in MMIO SPTEs.
pub const MMIO_GEN_MASK: u64 = (1 << (MMIO_GEN_LOW_BITS + MMIO_GEN_HIGH_BITS)) - 1;
/// The gfn of an MMIO SPTE sits in bits 51:12 like a frame.
const MMIO_GFN_MASK: u64 = SPTE_ADDR_MASK;
/// EPT MMIO marker: write+execute without read, an EPT misconfiguration.
const EPT_MMIO_VALUE: u64 = EPT_WRITE | EPT_EXEC;
/// IA-32e MMIO marker: present with reserved bit 51 (MAXPHYADDR ≤ 51 required).
const LEGACY_MMIO_VALUE: u64 = PT_PRESENT | (1 << 51);
const MMIO_MARKER_MASK_EPT: u64 = 0x7;
const MMIO_MARKER_MASK_LEGACY: u64 = PT_PRESENT | (1 << 51);

/// The hardware format of the SPTEs an MMU builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpteFormat {
    /// EPT entries (TDP). `ad` = EPTP enables accessed/dirty flags.
    Ept {
        /// Whether hardware maintains A/D bits.
        ad: bool,
    },
    /// IA-32e paging entries (shadow paging).
    Legacy,
}

/// Access the MMU grants in an SPTE (KVM's `ACC_*` for SPTEs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SpteAccess {
    /// Readable (EPT; an IA-32e SPTE that is present is readable).
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// User-accessible (IA-32e only; ignored for EPT).
    pub user: bool,
}

impl SpteAccess {
    /// Everything.
    pub const ALL: SpteAccess = SpteAccess {
        read: true,
        write: true,
        exec: true,
        user: true,
    };
}

/// One SPTE value. SPTEs live in `AtomicU64`s in host frames; this is a
/// snapshot of one, with the format's meaning attached by the caller. Its
/// bits are read and changed only through the named methods here (this
/// module is the one place that knows them, as KVM's `spte.h`); the raw
/// value goes in and out of the atomic entries only.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Spte(u64);

impl Spte {
    /// The SPTE whose raw value is `raw` (as loaded from its entry).
    #[inline(always)]
    pub const fn from_raw(raw: u64) -> Spte {
        Spte(raw)
    }

    /// The raw value (to store into, or compare-exchange, an entry).
    #[inline(always)]
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl std::fmt::Debug for Spte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spte({:#x})", self.0)
    }
}

impl SpteFormat {
    /// The bits that make an SPTE writable in hardware.
    #[inline(always)]
    pub const fn writable_mask(self) -> u64 {
        match self {
            SpteFormat::Ept { .. } => EPT_WRITE,
            SpteFormat::Legacy => PT_WRITABLE,
        }
    }

    /// The hardware Accessed bit (0 when EPT A/D are off).
    #[inline(always)]
    pub const fn accessed_mask(self) -> u64 {
        match self {
            SpteFormat::Ept { ad: true } => EPT_ACCESSED,
            SpteFormat::Ept { ad: false } => 0,
            SpteFormat::Legacy => PT_ACCESSED,
        }
    }

    /// The hardware Dirty bit (0 when EPT A/D are off).
    #[inline(always)]
    pub const fn dirty_mask(self) -> u64 {
        match self {
            SpteFormat::Ept { ad: true } => EPT_DIRTY,
            SpteFormat::Ept { ad: false } => 0,
            SpteFormat::Legacy => PT_DIRTY,
        }
    }

    /// A non-leaf SPTE pointing at the table in frame `table` (full access:
    /// permissions are enforced at the leaf).
    pub fn make_nonleaf(self, table: Pfn) -> Spte {
        let addr = (table.raw() << 12) & SPTE_ADDR_MASK;
        let hw = match self {
            SpteFormat::Ept { .. } => EPT_READ | EPT_WRITE | EPT_EXEC,
            SpteFormat::Legacy => PT_PRESENT | PT_WRITABLE | PT_USER,
        };
        Spte(addr | hw | SPTE_MMU_PRESENT | self.accessed_mask())
    }

    /// A leaf SPTE at `level` mapping host frame `pfn` with `access`.
    ///
    /// `host_writable` says the host mapping allows writes; `mmu_writable`
    /// that the MMU does (not write-tracked, not write-protected for dirty
    /// logging). Hardware write permission is granted only if `access.write`
    /// and both are set; `prefault` leaves Accessed clear (a speculative
    /// mapping the guest has not used).
    pub fn make_leaf(
        self,
        level: Level,
        pfn: Pfn,
        access: SpteAccess,
        host_writable: bool,
        mmu_writable: bool,
        prefault: bool,
    ) -> Spte {
        debug_assert!(level <= Level::L3);
        let mut v = ((pfn.raw() << 12) & SPTE_ADDR_MASK) | SPTE_MMU_PRESENT;
        let writable = access.write && host_writable && mmu_writable;
        match self {
            SpteFormat::Ept { ad } => {
                // Write without read is a misconfiguration, never built.
                debug_assert!(access.read || !access.write, "an EPT leaf writable but not readable");
                v |= (MemType::Wb as u64) << EPT_MT_SHIFT;
                if access.read {
                    v |= EPT_READ;
                }
                if access.exec {
                    v |= EPT_EXEC;
                }
                if level > Level::L1 {
                    v |= EPT_LARGE;
                }
                if !ad {
                    v |= SPTE_TDP_AD_DISABLED;
                }
            }
            SpteFormat::Legacy => {
                v |= PT_PRESENT;
                if access.user {
                    v |= PT_USER;
                }
                if !access.exec {
                    v |= PT64_NX;
                }
                if level > Level::L1 {
                    v |= PT_PAGE_SIZE;
                }
            }
        }
        if host_writable {
            v |= SPTE_HOST_WRITABLE;
        }
        if host_writable && mmu_writable && access.write {
            v |= SPTE_MMU_WRITABLE;
        }
        if writable {
            v |= self.writable_mask() | self.dirty_mask();
        }
        if !prefault {
            v |= self.accessed_mask();
        }
        let spte = Spte(v);
        spte.check_leaf_writable_invariants(self);
        spte
    }

    /// An MMIO SPTE caching "no memslot for `gfn`" at memslot generation `generation`.
    pub fn make_mmio(self, gfn: u64, generation: u64) -> Spte {
        let g = generation & MMIO_GEN_MASK;
        let gen_bits = ((g & bits(0, MMIO_GEN_LOW_BITS - 1)) << MMIO_GEN_LOW_SHIFT)
            | ((g >> MMIO_GEN_LOW_BITS) << MMIO_GEN_HIGH_SHIFT);
        let marker = match self {
            SpteFormat::Ept { .. } => EPT_MMIO_VALUE,
            SpteFormat::Legacy => LEGACY_MMIO_VALUE,
        };
        Spte(marker | gen_bits | ((gfn << 12) & MMIO_GFN_MASK & !(1 << 51)))
    }
}

impl Spte {
    /// The empty SPTE.
    pub const EMPTY: Spte = Spte(0);

    /// Whether the MMU considers the SPTE present (backed by memory). MMIO
    /// and frozen SPTEs are not.
    #[inline(always)]
    pub fn is_mmu_present(self) -> bool {
        self.0 & SPTE_MMU_PRESENT != 0
    }

    /// Whether this is the frozen value.
    #[inline(always)]
    pub fn is_frozen(self) -> bool {
        self.0 == FROZEN_SPTE
    }

    /// Whether this is an MMIO SPTE in `fmt`.
    #[inline(always)]
    pub fn is_mmio(self, fmt: SpteFormat) -> bool {
        match fmt {
            SpteFormat::Ept { .. } => self.0 & MMIO_MARKER_MASK_EPT == EPT_MMIO_VALUE,
            SpteFormat::Legacy => self.0 & MMIO_MARKER_MASK_LEGACY == LEGACY_MMIO_VALUE,
        }
    }

    /// The memslot generation an MMIO SPTE was made at.
    pub fn mmio_generation(self) -> u64 {
        let low = (self.0 >> MMIO_GEN_LOW_SHIFT) & bits(0, MMIO_GEN_LOW_BITS - 1);
        let high = (self.0 >> MMIO_GEN_HIGH_SHIFT) & bits(0, MMIO_GEN_HIGH_BITS - 1);
        low | (high << MMIO_GEN_LOW_BITS)
    }

    /// The gfn an MMIO SPTE caches.
    pub fn mmio_gfn(self) -> u64 {
        (self.0 & MMIO_GFN_MASK & !(1 << 51)) >> 12
    }

    /// Whether a present SPTE at `level` is a leaf.
    #[inline(always)]
    pub fn is_leaf(self, level: Level) -> bool {
        level == Level::L1 || self.0 & PT_PAGE_SIZE != 0
    }

    /// Whether this is a present huge leaf at `level` > 1.
    #[inline(always)]
    pub fn is_large(self, level: Level) -> bool {
        level > Level::L1 && self.is_mmu_present() && self.0 & PT_PAGE_SIZE != 0
    }

    /// The host frame (a leaf's page base, or a non-leaf's table).
    #[inline(always)]
    pub fn pfn(self) -> Pfn {
        Pfn::new((self.0 & SPTE_ADDR_MASK) >> 12)
    }

    /// Whether hardware may write through this SPTE.
    #[inline(always)]
    pub fn is_writable(self, fmt: SpteFormat) -> bool {
        self.0 & fmt.writable_mask() != 0
    }

    /// Whether hardware may fetch instructions through this SPTE.
    #[inline(always)]
    pub fn is_executable(self, fmt: SpteFormat) -> bool {
        match fmt {
            SpteFormat::Ept { .. } => self.0 & EPT_EXEC != 0,
            SpteFormat::Legacy => self.0 & PT64_NX == 0,
        }
    }

    /// Whether the SPTE was installed from a writable host mapping.
    #[inline(always)]
    pub fn is_host_writable(self) -> bool {
        self.0 & SPTE_HOST_WRITABLE != 0
    }

    /// Whether the MMU allows writes (so a write fault can be fixed locklessly).
    #[inline(always)]
    pub fn is_mmu_writable(self) -> bool {
        self.0 & SPTE_MMU_WRITABLE != 0
    }

    /// Whether hardware has marked the SPTE accessed (or, for an EPT SPTE
    /// without A/D, whether it is not access-tracked).
    pub fn is_accessed(self, fmt: SpteFormat) -> bool {
        match fmt {
            SpteFormat::Ept { ad: false } => !self.is_access_tracked(fmt),
            _ => self.0 & fmt.accessed_mask() != 0,
        }
    }

    /// Whether hardware has marked the SPTE dirty.
    pub fn is_dirty(self, fmt: SpteFormat) -> bool {
        self.0 & fmt.dirty_mask() != 0
    }

    /// Whether an EPT SPTE without A/D has been made not-present to catch
    /// the next access (its R/X saved in the software bits).
    pub fn is_access_tracked(self, fmt: SpteFormat) -> bool {
        matches!(fmt, SpteFormat::Ept { ad: false }) && self.is_mmu_present() && self.0 & 0x7 == 0
    }

    /// The SPTE made access-tracked: R/W/X cleared (R and X saved), so the
    /// next access faults. Only for EPT without A/D.
    pub fn mark_access_tracked(self) -> Spte {
        let mut v = self.0 & !(EPT_READ | EPT_WRITE | EPT_EXEC);
        if self.0 & EPT_READ != 0 {
            v |= SPTE_SAVED_R;
        }
        if self.0 & EPT_EXEC != 0 {
            v |= SPTE_SAVED_X;
        }
        Spte(v)
    }

    /// Undoes [`Spte::mark_access_tracked`]: R/X restored, W not (it comes
    /// back through the MMU-writable path on the next write).
    pub fn restore_access_tracked(self) -> Spte {
        let mut v = self.0 & !(SPTE_SAVED_R | SPTE_SAVED_X);
        if self.0 & SPTE_SAVED_R != 0 {
            v |= EPT_READ;
        }
        if self.0 & SPTE_SAVED_X != 0 {
            v |= EPT_EXEC;
        }
        Spte(v)
    }

    /// The SPTE with hardware write permission removed (it stays
    /// MMU-writable, so a write fault can restore it without the lock).
    pub fn clear_writable(self, fmt: SpteFormat) -> Spte {
        Spte(self.0 & !fmt.writable_mask())
    }

    /// The SPTE write-protected by the MMU: neither writable nor MMU-writable.
    pub fn write_protect(self, fmt: SpteFormat) -> Spte {
        Spte(self.0 & !(fmt.writable_mask() | SPTE_MMU_WRITABLE))
    }

    /// The SPTE made writable again (for an MMU-writable SPTE: the lockless
    /// fast path of a write fault), marked dirty where hardware keeps D.
    pub fn make_writable(self, fmt: SpteFormat) -> Spte {
        debug_assert!(self.is_mmu_writable());
        Spte(self.0 | fmt.writable_mask() | fmt.dirty_mask() | fmt.accessed_mask())
    }

    /// The SPTE with its hardware Dirty bit cleared (nothing where the
    /// format keeps none).
    #[inline(always)]
    pub fn clear_dirty(self, fmt: SpteFormat) -> Spte {
        Spte(self.0 & !fmt.dirty_mask())
    }

    /// The SPTE with its hardware Accessed bit cleared (nothing where the
    /// format keeps none: aging then makes it access-tracked instead).
    #[inline(always)]
    pub fn clear_accessed(self, fmt: SpteFormat) -> Spte {
        Spte(self.0 & !fmt.accessed_mask())
    }

    /// Whether the two SPTEs differ at most in their hardware Accessed and
    /// Dirty bits (a fault that finds such an SPTE has nothing to do).
    #[inline(always)]
    pub fn same_but_ad(self, other: Spte, fmt: SpteFormat) -> bool {
        let ad = fmt.accessed_mask() | fmt.dirty_mask();
        self.0 | ad == other.0 | ad
    }

    /// A legacy-format leaf with protection key `pkey` (bits 62:59), which
    /// the shadow MMU copies from the guest's leaf: the hardware checks it
    /// against PKRU as it would the guest's.
    #[inline(always)]
    pub fn with_pkey(self, pkey: u8) -> Spte {
        Spte(self.0 & !(0xf << 59) | u64::from(pkey & 0xf) << 59)
    }

    /// The SPTE made executable (KVM's `make_spte_executable`); for an
    /// access-tracked EPT SPTE, its saved X bit is set instead.
    pub fn make_executable(self, fmt: SpteFormat) -> Spte {
        match fmt {
            SpteFormat::Ept { .. } if self.is_access_tracked(fmt) => Spte(self.0 | SPTE_SAVED_X),
            SpteFormat::Ept { .. } => Spte(self.0 | EPT_EXEC),
            SpteFormat::Legacy => Spte(self.0 & !PT64_NX),
        }
    }

    /// The SPTE made non-executable (KVM's `make_spte_nonexecutable`), the
    /// saved X bit of an access-tracked EPT SPTE included.
    pub fn make_nonexecutable(self, fmt: SpteFormat) -> Spte {
        match fmt {
            SpteFormat::Ept { .. } => Spte(self.0 & !(EPT_EXEC | SPTE_SAVED_X)),
            SpteFormat::Legacy => Spte(self.0 | PT64_NX),
        }
    }

    /// Child `index` of this huge leaf at `level` split into a table of
    /// leaves one level down, each covering `child_pages` frames (KVM's
    /// `make_small_spte`): every bit is inherited (W, D, A, MMU- and
    /// host-writable, access tracking, memory type), the frame advances,
    /// and a 4K child loses the large bit. So a split changes no
    /// translation and no right: it needs no TLB flush and loses no D bit.
    pub fn split_child(self, level: Level, index: u64, child_pages: u64) -> Spte {
        debug_assert!(self.is_large(level));
        let pfn = self.pfn().raw() + index * child_pages;
        let mut v = (self.0 & !SPTE_ADDR_MASK) | ((pfn << 12) & SPTE_ADDR_MASK);
        if level == Level::L2 {
            v &= !PT_PAGE_SIZE;
        }
        Spte(v)
    }

    /// Asserts the legal combinations of writable bits of a **leaf**:
    /// hardware-writable ⇒ MMU-writable ⇒ host-writable. (Non-leaf SPTEs
    /// grant everything and leave permissions to the leaves.) A violation is
    /// an MMU bug, never guest input, so it panics.
    #[inline]
    pub fn check_leaf_writable_invariants(self, fmt: SpteFormat) {
        if !self.is_mmu_present() {
            return;
        }
        assert!(
            !self.is_mmu_writable() || self.is_host_writable(),
            "SPTE {self:?} is MMU-writable but not host-writable"
        );
        assert!(
            !self.is_writable(fmt) || self.is_mmu_writable(),
            "SPTE {self:?} is writable but not MMU-writable"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FMTS: [SpteFormat; 3] = [
        SpteFormat::Ept { ad: true },
        SpteFormat::Ept { ad: false },
        SpteFormat::Legacy,
    ];

    #[test]
    fn frozen_is_not_present_in_any_format() {
        for fmt in FMTS {
            let f = Spte(FROZEN_SPTE);
            assert!(!f.is_mmu_present());
            assert!(!f.is_mmio(fmt));
            assert!(f.is_frozen());
        }
        assert_eq!(FROZEN_SPTE & 7, 0, "EPT: no R/W/X");
        assert_eq!(FROZEN_SPTE & PT_PRESENT, 0, "IA-32e: not present");
    }

    #[test]
    fn leaves_round_trip_their_frame_and_rights() {
        for fmt in FMTS {
            for level in [Level::L1, Level::L2, Level::L3] {
                let pfn = Pfn::new(0x12_3400 & !(level.pages() - 1));
                let s = fmt.make_leaf(level, pfn, SpteAccess::ALL, true, true, false);
                assert!(s.is_mmu_present() && !s.is_mmio(fmt) && !s.is_frozen());
                assert_eq!(s.pfn(), pfn);
                assert!(s.is_leaf(level));
                assert_eq!(s.is_large(level), level > Level::L1);
                assert!(s.is_writable(fmt) && s.is_mmu_writable() && s.is_host_writable());
                assert!(s.is_accessed(fmt));
            }
        }
    }

    #[test]
    fn write_permission_needs_host_and_mmu() {
        for fmt in FMTS {
            let s = fmt.make_leaf(Level::L1, Pfn::new(5), SpteAccess::ALL, false, true, false);
            assert!(!s.is_writable(fmt) && !s.is_mmu_writable() && !s.is_host_writable());
            let s = fmt.make_leaf(Level::L1, Pfn::new(5), SpteAccess::ALL, true, false, false);
            assert!(!s.is_writable(fmt) && !s.is_mmu_writable() && s.is_host_writable());
            let ro = SpteAccess {
                write: false,
                ..SpteAccess::ALL
            };
            let s = fmt.make_leaf(Level::L1, Pfn::new(5), ro, true, true, false);
            assert!(!s.is_writable(fmt));
        }
    }

    #[test]
    fn write_protect_and_fast_path_restore() {
        for fmt in FMTS {
            let s = fmt.make_leaf(Level::L1, Pfn::new(5), SpteAccess::ALL, true, true, false);
            let cleared = s.clear_writable(fmt);
            assert!(!cleared.is_writable(fmt) && cleared.is_mmu_writable());
            let back = cleared.make_writable(fmt);
            assert!(back.is_writable(fmt));
            back.check_leaf_writable_invariants(fmt);
            let wp = s.write_protect(fmt);
            assert!(!wp.is_writable(fmt) && !wp.is_mmu_writable());
            wp.check_leaf_writable_invariants(fmt);
        }
    }

    #[test]
    #[should_panic(expected = "writable but not MMU-writable")]
    fn writable_without_mmu_writable_is_caught() {
        let fmt = SpteFormat::Legacy;
        let s = fmt.make_leaf(Level::L1, Pfn::new(5), SpteAccess::ALL, true, false, false);
        Spte(s.0 | PT_WRITABLE).check_leaf_writable_invariants(fmt);
    }

    #[test]
    #[should_panic(expected = "MMU-writable but not host-writable")]
    fn mmu_writable_without_host_writable_is_caught() {
        let fmt = SpteFormat::Ept { ad: true };
        let s = fmt.make_leaf(Level::L1, Pfn::new(5), SpteAccess::ALL, true, true, false);
        Spte(s.0 & !SPTE_HOST_WRITABLE).check_leaf_writable_invariants(fmt);
    }

    #[test]
    fn access_tracking_saves_and_restores_rx() {
        let fmt = SpteFormat::Ept { ad: false };
        let s = fmt.make_leaf(Level::L1, Pfn::new(9), SpteAccess::ALL, true, true, false);
        let t = s.mark_access_tracked();
        assert!(t.is_access_tracked(fmt) && !t.is_accessed(fmt));
        assert!(t.is_mmu_present() && t.0 & 7 == 0, "not present to hardware");
        let r = t.restore_access_tracked();
        assert_eq!(r.0 & (EPT_READ | EPT_EXEC), EPT_READ | EPT_EXEC);
        assert!(!r.is_writable(fmt) && r.is_mmu_writable());
        assert!(r.is_accessed(fmt));
    }

    #[test]
    fn mmio_sptes_carry_gfn_and_generation() {
        for fmt in FMTS {
            for (gfn, generation) in [(0u64, 0u64), (0x7_ffff_ffff, MMIO_GEN_MASK), (0x1234, 0x4_5678)] {
                let s = fmt.make_mmio(gfn, generation);
                assert!(s.is_mmio(fmt), "{fmt:?} {s:?}");
                assert!(!s.is_mmu_present());
                assert_eq!(s.mmio_generation(), generation & MMIO_GEN_MASK);
                assert_eq!(s.mmio_gfn(), gfn & 0x7_ffff_ffff);
            }
            // Ordinary SPTEs are never MMIO.
            assert!(
                !fmt.make_leaf(Level::L1, Pfn::new(3), SpteAccess::ALL, true, true, false)
                    .is_mmio(fmt)
            );
            assert!(!fmt.make_nonleaf(Pfn::new(3)).is_mmio(fmt));
        }
        // EPT MMIO SPTEs are misconfigurations to the hardware walker.
        let r = crate::arch::rsvd::RsvdBits::ept(&crate::arch::control::CpuFeatures::default());
        assert!(r.is_reserved(SpteFormat::Ept { ad: true }.make_mmio(0x55, 7).0, 1, true));
    }
}
