//! x86 formats: pure data and pure functions, no memory access, no state.
//!
//! - [`control`]: CR0, CR4, EFER, the paging mode they select, CPU features
//!   (MAXPHYADDR, 1 GiB pages, PSE-36, ...) and canonical addresses.
//! - [`pfec`]: the page-fault error code and the exception vectors.
//! - [`pte`]: guest paging-entry formats (32-bit, PAE/4-level/5-level, EPT)
//!   behind one trait, [`pte::PteFormat`], that the walker is generic over.
//! - [`rsvd`]: reserved-bit masks precomputed per level, as KVM's
//!   `rsvd_bits_mask` and `bad_mt_xwr`.
//! - [`perm`]: the permission bitmap (KVM's `permissions[]`) and protection
//!   keys.
//! - [`ept`]: EPT entry bits, memory types, misconfigurations, the EPTP and
//!   the EPT-violation exit qualification.

pub mod control;
pub mod ept;
pub mod perm;
pub mod pfec;
pub mod pte;
pub mod rsvd;

/// A mask of bits `lo..=hi` (inclusive), as KVM's `rsvd_bits()`. Empty when
/// `lo > hi`.
#[inline]
pub const fn bits(lo: u32, hi: u32) -> u64 {
    if lo > hi || lo > 63 {
        0
    } else {
        let hi = if hi > 63 { 63 } else { hi };
        (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bit_ranges() {
        assert_eq!(super::bits(0, 0), 1);
        assert_eq!(super::bits(1, 2), 0b110);
        assert_eq!(super::bits(40, 51), 0x000f_ff00_0000_0000);
        assert_eq!(super::bits(63, 63), 1 << 63);
        assert_eq!(super::bits(0, 63), u64::MAX);
        assert_eq!(super::bits(52, 51), 0);
    }
}
