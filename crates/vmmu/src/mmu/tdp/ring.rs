//! The dirty ring (KVM's `KVM_CAP_DIRTY_LOG_RING`): instead of one bitmap
//! per memslot, each vCPU pushes the pages it dirties to its own ring.
//!
//! - Enabled once, before any vCPU exists, for every vCPU; the bitmap
//!   interfaces (`get_dirty_log`, `clear_dirty_log`) are then refused, as
//!   KVM refuses them.
//! - A write fault on a logged page pushes (slot, offset) to the faulting
//!   vCPU's ring (the slow path and the lockless fast path alike). A vCPU
//!   whose ring reached its soft limit does not run: its next access
//!   returns `DirtyRingFull` (`KVM_EXIT_DIRTY_RING_FULL`) until the VMM
//!   harvests and resets.
//! - The VMM harvests entries (marking them collected), then calls
//!   [`TdpMmu::reset_dirty_rings`], which frees the collected entries and
//!   write-protects their pages again, coalescing neighbours into 64-page
//!   masks as `kvm_dirty_ring_reset` does, and flushes TLBs before it
//!   returns. A page must be copied after the reset: a write between the
//!   harvest and the reset is not logged again, but lands before the copy.
//! - Only write-protect logging feeds the ring: vmmu's D-bit mode reads
//!   EPT Dirty bits at harvest time and has no PML buffer to push from.

use super::{DirtyLogMode, TdpError, TdpMmu};
use crate::addr::Gfn;
use crate::mem::dirty::DIRTY_RING_RSVD_ENTRIES;
use crate::mem::{DirtyRing, Memslot, mark_page_dirty_in_slot};
use crate::mmu::flush::PendingFlush;
use crate::sync::MmuLockWriteGuard;

/// The largest ring (KVM caps it at 64K entries of 16 bytes).
pub const DIRTY_RING_MAX_ENTRIES: u32 = 1 << 16;

/// Why the dirty ring could not be enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DirtyRingError {
    /// Not a power of two in `DIRTY_RING_RSVD_ENTRIES + 1 ..= 65536`.
    #[error(
        "dirty ring size {0}: must be a power of two above {DIRTY_RING_RSVD_ENTRIES} and at most {DIRTY_RING_MAX_ENTRIES}"
    )]
    BadSize(u32),
    /// vCPUs exist already: they would have no ring.
    #[error("the dirty ring must be enabled before any vCPU is created ({0} exist)")]
    VcpusExist(usize),
    /// Enabled before.
    #[error("the dirty ring is already enabled (size {0})")]
    AlreadyEnabled(u32),
    /// D-bit dirty logging has no path into a ring.
    #[error("the dirty ring needs write-protect dirty logging (D-bit mode has no PML buffer to feed it)")]
    DirtyBitMode,
    /// The VM has a nested MMU, which logs into the memslot bitmap only.
    #[error(
        "the VM has a nested MMU, which logs L2's writes into the memslot bitmap only: the dirty ring is not built for it"
    )]
    NestedMmu,
}

impl TdpMmu {
    /// Enables per-vCPU dirty rings of `size` entries. Call before creating
    /// vCPUs; each vCPU created afterwards gets its ring.
    pub fn enable_dirty_ring(&self, size: u32) -> Result<(), DirtyRingError> {
        if !size.is_power_of_two() || size <= DIRTY_RING_RSVD_ENTRIES || size > DIRTY_RING_MAX_ENTRIES {
            return Err(DirtyRingError::BadSize(size));
        }
        if self.config.dirty_log == DirtyLogMode::DirtyBit {
            return Err(DirtyRingError::DirtyBitMode);
        }
        if self.tracker.get().is_some() {
            return Err(DirtyRingError::NestedMmu);
        }
        let vcpus = self.remote_tlb.registered();
        if vcpus > 0 {
            return Err(DirtyRingError::VcpusExist(vcpus));
        }
        self.dirty_ring.set(size).map_err(DirtyRingError::AlreadyEnabled)
    }

    /// The per-vCPU ring size, if the dirty ring is enabled.
    pub fn dirty_ring_size(&self) -> Option<u32> {
        self.dirty_ring.get().copied()
    }

    /// Faults with the dirty ring enabled must bring the vCPU's ring.
    pub(super) fn check_ring(&self, ring: Option<&DirtyRing>) -> Result<(), TdpError> {
        match (self.dirty_ring.get(), ring) {
            (Some(_), None) => Err(TdpError::DirtyRingRequired),
            _ => Ok(()),
        }
    }

    /// KVM's `mark_page_dirty_in_slot` from a fault: into the vCPU's ring
    /// when the ring is enabled, else into the slot's bitmap.
    pub(super) fn mark_dirty(&self, slot: &Memslot, gfn: Gfn, ring: Option<&DirtyRing>) {
        if let Err(full) = mark_page_dirty_in_slot(slot, gfn, ring) {
            // The vCPU stops at the soft limit, and one access pushes far
            // fewer entries than the reserve: a full ring is a vCPU-model
            // bug (KVM warns here too).
            tracing::error!(target: "kvm_dirty_ring_push", gfn = gfn.raw(), size = full.size, "dirty ring full: page not logged");
            debug_assert!(false, "dirty ring overflow at gfn {gfn}: {full}");
        }
    }

    /// `KVM_RESET_DIRTY_RINGS`: frees every harvested entry of `rings` and
    /// write-protects its page again; TLBs are flushed before this returns.
    /// Returns the number of entries reset. Entries of deleted slots, or
    /// beyond their slot, are dropped (as KVM drops them).
    pub fn reset_dirty_rings<'a>(&self, rings: impl IntoIterator<Item = &'a DirtyRing>) -> u64 {
        let mut guard = self.lock.write();
        let mut flush = PendingFlush::none();
        let mut reset = 0u64;
        for ring in rings {
            let entries = ring.reset();
            reset += entries.len() as u64;
            // Coalesce runs within 64 pages of one slot into one mask.
            let mut cur: Option<(u32, u64, u64)> = None;
            for e in entries {
                if let Some((slot, base, mask)) = &mut cur
                    && *slot == e.slot
                    && e.offset >= *base
                    && e.offset - *base < 64
                {
                    *mask |= 1 << (e.offset - *base);
                    continue;
                }
                if let Some((slot, base, mask)) = cur.take() {
                    flush = flush.merge(self.reprotect(&mut guard, slot, base, mask));
                }
                cur = Some((e.slot, e.offset, 1));
            }
            if let Some((slot, base, mask)) = cur {
                flush = flush.merge(self.reprotect(&mut guard, slot, base, mask));
            }
        }
        // As KVM's `kvm_vm_ioctl_reset_dirty_pages`: a flush whenever an
        // entry was reset, whether or not an SPTE changed (an SPTE aged
        // without a flush is not writable, but a vCPU's translation is).
        let took = reset > 0 && !crate::sync::bug(crate::sync::Bug::HarvestFlushByChange);
        self.discharge_logging(flush.merge(PendingFlush::new(took)));
        tracing::trace!(target: "kvm_dirty_ring_reset", entries = reset);
        reset
    }

    /// Write-protects the pages of `mask` from `base` in the slot encoded
    /// as `as_id << 16 | id`.
    fn reprotect(&self, guard: &mut MmuLockWriteGuard<'_, ()>, slot: u32, base: u64, mask: u64) -> PendingFlush {
        let (as_id, id) = ((slot >> 16) as u16, slot as u16);
        if as_id >= crate::mem::memslot::ADDRESS_SPACE_NUM {
            return PendingFlush::none();
        }
        let npages = match self.slots.load(as_id).by_id(id) {
            Some(s) => s.npages(),
            None => return PendingFlush::none(),
        };
        if base >= npages {
            return PendingFlush::none();
        }
        // Bits past the end of the slot are dropped.
        let left = npages - base;
        let mask = if left < 64 { mask & ((1u64 << left) - 1) } else { mask };
        self.protect_bitmap(guard, as_id, id, base, &[mask])
            .unwrap_or_else(|_| PendingFlush::none())
    }
}
