//! Reserved-bit masks, precomputed per level as KVM's `rsvd_bits_mask`.
//!
//! `mask[ps][level - 1]` holds the bits that must be 0 in a present entry at
//! `level` whose bit 7 is `ps`. For EPT, `bad_mt_xwr` additionally marks the
//! illegal combinations of memory type (bits 5:3) and R/W/X (bits 2:0).

use super::bits;
use super::control::{CpuFeatures, PagingMode};

/// Reserved bits of paging entries for one paging configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RsvdBits {
    flat: [u64; 16],
    bad_mt_xwr: u64,
}

impl RsvdBits {
    /// Masks for the guest's own paging in `mode`, with EFER.NXE = `nx` and
    /// CR4.PSE = `pse` (32-bit paging only).
    pub fn guest(mode: PagingMode, features: &CpuFeatures, nx: bool, pse: bool) -> RsvdBits {
        let maxphy = features.maxphyaddr as u32;
        let mut m = [[0u64; 5]; 2];
        let nx_rsvd = if nx { 0 } else { 1 << 63 };
        match mode {
            PagingMode::None => {}
            PagingMode::Bits32 => {
                // No reserved bits in 4 KiB PTEs or in PDEs that point to
                // tables. A 4 MiB PDE: bit 21, and PSE-36 address bits at
                // or above MAXPHYADDR (all of bits 20:13 without PSE-36).
                if pse {
                    // Clamped: a MAXPHYADDR below 32 (outside the
                    // documented 32..=52) must not underflow below.
                    let addr_bits = if features.pse36 { maxphy.clamp(32, 40) } else { 32 };
                    m[1][1] = bits(21, 21) | bits(13 + (addr_bits - 32), 20);
                }
            }
            PagingMode::Pae => {
                let high = bits(maxphy, 62) | nx_rsvd;
                m[0][0] = high;
                m[1][0] = high;
                m[0][1] = high;
                m[1][1] = high | bits(13, 20);
                // PDPTEs: bits 63:MAXPHYADDR, 8:5, 2:1.
                let pdpte = bits(maxphy, 63) | bits(5, 8) | bits(1, 2);
                m[0][2] = pdpte;
                m[1][2] = pdpte;
            }
            PagingMode::Level4 | PagingMode::Level5 => {
                let high = bits(maxphy, 51) | nx_rsvd;
                let no_gb = if features.gbpages { 0 } else { bits(7, 7) };
                m[0][0] = high;
                m[1][0] = high;
                m[0][1] = high;
                m[1][1] = high | bits(13, 20);
                m[0][2] = high;
                m[1][2] = high | bits(13, 29) | no_gb;
                // PML4E and PML5E: bit 7 is reserved.
                m[0][3] = high;
                m[1][3] = high | bits(7, 7);
                m[0][4] = high;
                m[1][4] = high | bits(7, 7);
            }
        }
        RsvdBits {
            flat: flatten(&m),
            bad_mt_xwr: 0,
        }
    }

    /// Masks for EPT entries (SDM vol. 3C 29.3.3.1).
    pub fn ept(features: &CpuFeatures) -> RsvdBits {
        let maxphy = features.maxphyaddr as u32;
        let high = bits(maxphy, 51);
        let mut m = [[0u64; 5]; 2];
        let no_gb = if features.ept_1g { 0 } else { bits(7, 7) };
        // Non-leaf entries: bits 7:3 reserved at levels 4/5; 6:3 at 3 and 2.
        m[0][4] = high | bits(3, 7);
        m[1][4] = m[0][4];
        m[0][3] = high | bits(3, 7);
        m[1][3] = m[0][3];
        m[0][2] = high | bits(3, 6);
        m[1][2] = high | bits(12, 29) | no_gb;
        m[0][1] = high | bits(3, 6);
        m[1][1] = high | bits(12, 20);
        m[0][0] = high;
        m[1][0] = high;
        let mut bad = 0u64;
        for mt_xwr in 0..64u32 {
            let mt = mt_xwr >> 3;
            let xwr = mt_xwr & 7;
            let bad_mt = matches!(mt, 2 | 3 | 7);
            let write_without_read = xwr & 0b011 == 0b010;
            let exec_only = xwr == 0b100 && !features.ept_exec_only;
            // A non-present entry (xwr == 0) is never a misconfiguration.
            if xwr != 0 && (bad_mt || write_without_read || exec_only) {
                bad |= 1 << mt_xwr;
            }
        }
        RsvdBits {
            flat: flatten(&m),
            bad_mt_xwr: bad,
        }
    }

    /// The reserved bits for an entry at `level` whose bit 7 is `ps`.
    #[inline(always)]
    pub fn mask(&self, level: u8, ps: bool) -> u64 {
        self.flat[((level as usize) << 1 | ps as usize) & 15]
    }

    /// Whether a present `pte` at `level` has a reserved bit set (or, for
    /// EPT, an illegal memory-type / permission combination). Memory type
    /// only counts in leaves; callers pass `leaf` accordingly.
    #[inline(always)]
    pub fn is_reserved(&self, pte: u64, level: u8, leaf: bool) -> bool {
        self.has_reserved_bits(pte, level) || self.is_bad_mt_xwr(pte, leaf)
    }

    /// Whether `pte` at `level` has a bit set that its reserved mask names.
    #[inline(always)]
    pub fn has_reserved_bits(&self, pte: u64, level: u8) -> bool {
        let index = ((level as usize) << 1 | ((pte >> 7) & 1) as usize) & 15;
        pte & self.flat[index] != 0
    }

    /// EPT only: whether the memory type (of a leaf) or the R/W/X
    /// combination is illegal.
    #[inline(always)]
    pub fn is_bad_mt_xwr(&self, pte: u64, leaf: bool) -> bool {
        let index = if leaf { pte & 0x3f } else { pte & 0x7 };
        (self.bad_mt_xwr >> index) & 1 != 0
    }
}

/// `[ps][level - 1]` → `[level << 1 | ps]`.
fn flatten(m: &[[u64; 5]; 2]) -> [u64; 16] {
    let mut flat = [0u64; 16];
    for level in 1..=5usize {
        for ps in 0..2usize {
            flat[level << 1 | ps] = m[ps][level - 1];
        }
    }
    flat
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f40() -> CpuFeatures {
        CpuFeatures::default().with_maxphyaddr(40)
    }

    #[test]
    fn long_mode_masks() {
        let r = RsvdBits::guest(PagingMode::Level4, &f40(), true, true);
        assert!(r.is_reserved(1 << 40 | 1, 1, true));
        assert!(!r.is_reserved(1 << 39 | 1, 1, true));
        assert!(!r.is_reserved(1 << 52 | 1, 1, true)); // ignored bits 62:52
        assert!(!r.is_reserved(1 << 63 | 1, 1, true));
        assert!(r.is_reserved(0x83 | 1 << 13, 2, true)); // 2 MiB with bit 13
        assert!(!r.is_reserved(0x83 | 1 << 21, 2, true));
        assert!(r.is_reserved(0x83 | 1 << 29, 3, true));
        assert!(r.is_reserved(0x83, 4, false)); // PS in PML4E
        let r = RsvdBits::guest(PagingMode::Level4, &f40(), false, true);
        assert!(r.is_reserved(1 << 63 | 1, 2, false));
        let no_gb = CpuFeatures {
            gbpages: false,
            ..f40()
        };
        let r = RsvdBits::guest(PagingMode::Level4, &no_gb, true, true);
        assert!(r.is_reserved(0x83, 3, true));
    }

    #[test]
    fn pae_masks() {
        let r = RsvdBits::guest(PagingMode::Pae, &f40(), true, false);
        assert!(r.is_reserved(1 << 52 | 1, 1, true)); // PAE has no ignored high bits
        assert!(r.is_reserved(0x3, 3, false)); // R/W in a PDPTE
        assert!(r.is_reserved(1 << 63 | 1, 3, false));
        assert!(!r.is_reserved(0x19, 3, false)); // PWT, PCD allowed
    }

    #[test]
    fn pse36_masks() {
        let r = RsvdBits::guest(PagingMode::Bits32, &f40(), false, true);
        assert!(r.is_reserved(0x83 | 1 << 21, 2, true));
        assert!(!r.is_reserved(0x83 | 0xff << 13, 2, true));
        let r36 = RsvdBits::guest(
            PagingMode::Bits32,
            &CpuFeatures::default().with_maxphyaddr(36),
            false,
            true,
        );
        assert!(r36.is_reserved(0x83 | 1 << 17, 2, true));
        assert!(!r36.is_reserved(0x83 | 1 << 16, 2, true));
        let nopse = RsvdBits::guest(PagingMode::Bits32, &f40(), false, false);
        assert!(!nopse.is_reserved(0x83 | 1 << 21, 2, false));
    }

    #[test]
    fn ept_misconfigurations() {
        let r = RsvdBits::ept(&f40());
        assert!(r.is_reserved(0b010, 1, true)); // write-only
        assert!(r.is_reserved(0b110, 1, true)); // write+exec without read
        assert!(!r.is_reserved(0b100, 1, true)); // exec-only supported
        assert!(r.is_reserved(0b111 | 2 << 3, 1, true)); // memtype 2
        assert!(!r.is_reserved(0b111 | 6 << 3, 1, true)); // WB
        assert!(!r.is_reserved(0, 1, true));
        let no_xo = CpuFeatures {
            ept_exec_only: false,
            ..f40()
        };
        assert!(RsvdBits::ept(&no_xo).is_reserved(0b100, 1, true));
        assert!(r.is_reserved(0b111 | 1 << 3, 4, false)); // memtype bits in PML4E
    }
}
