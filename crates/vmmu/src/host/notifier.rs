//! The MMU-notifier interface of the host: a secondary MMU (vmmu's MMUs,
//! as KVM's) subscribes to a host address space ([`crate::host::HostAddressSpace`])
//! and is told before the host changes or removes a mapping
//! (`invalidate_range_start`) and after (`invalidate_range_end`), and asked
//! about and told to clear accessed bits (aging). KVM's side of the
//! protocol (the invalidation sequence a fault checks) is
//! [`crate::mem::invalidate`].

use crate::addr::Hva;

/// A half-open range of host virtual addresses `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HvaRange {
    /// First address.
    pub start: Hva,
    /// One past the last address.
    pub end: Hva,
}

impl HvaRange {
    /// The range `[start, start + len)`.
    pub const fn new(start: Hva, len: u64) -> Self {
        Self {
            start,
            end: start.add(len),
        }
    }

    /// Whether `hva` is in the range.
    #[inline]
    pub fn contains(&self, hva: Hva) -> bool {
        self.start <= hva && hva < self.end
    }

    /// Whether the two ranges share an address.
    #[inline]
    pub fn overlaps(&self, other: &HvaRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.offset_from(self.start)
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Why the host invalidates a range (Linux's `enum mmu_notifier_event`,
/// refined so tests and traces can tell the operations apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotifierEvent {
    /// munmap, or teardown of the address space.
    Unmap,
    /// mprotect to read-only.
    Protection,
    /// Page migration to a new frame.
    Migrate,
    /// Swap-out of a page.
    SwapOut,
    /// THP collapse: 512 small mappings become one huge mapping.
    Collapse,
    /// THP split: one huge mapping becomes 512 small ones.
    Split,
    /// KSM merge: a page becomes a read-only shared page.
    KsmMerge,
    /// Copy-on-write break of a shared (KSM) page.
    CowBreak,
}

/// An invalidation as delivered to notifiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NotifierRange {
    /// The addresses whose mapping changes.
    pub range: HvaRange,
    /// Why.
    pub event: NotifierEvent,
}

/// A subscriber to the host's mapping changes (Linux's
/// `struct mmu_notifier_ops`). Callbacks run on the host's thread, holding
/// the host's mm lock: they must not access memory through the host
/// address space (that could need the same lock).
pub trait MmuNotifier: Send + Sync {
    /// Before the mappings in `range` change: drop every secondary mapping
    /// of them (KVM: `kvm_mmu_invalidate_begin`, range add, zap).
    fn invalidate_range_start(&self, range: &NotifierRange);

    /// After the mappings changed (KVM: `kvm_mmu_invalidate_end`).
    fn invalidate_range_end(&self, range: &NotifierRange);

    /// Clear the accessed state of the secondary mappings in `range`, with a
    /// TLB flush; return whether any was young.
    fn clear_flush_young(&self, range: HvaRange) -> bool {
        let _ = range;
        false
    }

    /// Like `clear_flush_young` without the flush.
    fn clear_young(&self, range: HvaRange) -> bool {
        let _ = range;
        false
    }

    /// Whether any secondary mapping in `range` is young; changes nothing.
    fn test_young(&self, range: HvaRange) -> bool {
        let _ = range;
        false
    }

    /// The address space is going away: drop every secondary mapping.
    fn release(&self) {}
}

/// Identifies a registration on a host address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NotifierId(pub(crate) u64);
