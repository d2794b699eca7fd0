//! The page-fault error code and the exception vectors the walker reports.

use bitflags::bitflags;

bitflags! {
    /// The #PF error code (SDM vol. 3A 4.7).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct PfErrorCode: u32 {
        /// 1: protection violation; 0: not-present page.
        const PRESENT = 1 << 0;
        /// The access was a write.
        const WRITE = 1 << 1;
        /// The access was a user-mode access (CPL 3, not implicit).
        const USER = 1 << 2;
        /// A reserved bit was set in a paging-structure entry.
        const RSVD = 1 << 3;
        /// The access was an instruction fetch (reported only with NX or SMEP).
        const FETCH = 1 << 4;
        /// A protection-key violation.
        const PK = 1 << 5;
        /// A shadow-stack access.
        const SS = 1 << 6;
    }
}

/// Vector of the general-protection exception (#GP).
pub const GP_VECTOR: u8 = 13;
/// Vector of the page-fault exception (#PF).
pub const PF_VECTOR: u8 = 14;
