//! Dirty logging on the shadow MMU (KVM's `kvm_mmu_slot_remove_write_access`
//! and `kvm_arch_mmu_enable_log_dirty_pt_masked` through the rmaps).
//!
//! Enabling `LOG_DIRTY_PAGES` on a memslot write-protects every leaf SPTE of
//! its gfns. A fault that installs a writable SPTE in a logging slot marks
//! the gfn dirty (as KVM's `make_spte` does, even for a read fault: the
//! SPTE is writable from then on). Harvesting a bitmap write-protects the
//! pages it reports, so their next write faults and is logged again.
//! Dirty-logging write protection clears only the hardware W bit (the SPTE
//! stays MMU-writable, KVM's `spte_write_protect` without `pt_protect`);
//! guest page tables keep their own, stronger protection.

use super::ShadowMmu;
use super::page::Pages;
use crate::addr::Gfn;
use crate::mem::{Memslot, MemslotError};
use crate::mmu::flush::PendingFlush;

impl ShadowMmu {
    /// `KVM_GET_DIRTY_LOG`: the slot's dirty bitmap; without manual protect
    /// the bits are cleared and their pages write-protected, with TLBs
    /// flushed before this returns.
    pub fn get_dirty_log(&self, as_id: u16, slot_id: u16) -> Result<Vec<u64>, MemslotError> {
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        let bitmap = self.slots.get_dirty_log(as_id, slot_id)?;
        let flush = if self.slots.config().manual_dirty_log_protect {
            PendingFlush::none()
        } else {
            self.protect_bitmap(pages, as_id, slot_id, 0, &bitmap)?
        };
        self.discharge(flush);
        Ok(bitmap)
    }

    /// `KVM_CLEAR_DIRTY_LOG` (manual protect): clears the bits of `mask`
    /// from `first_page` and write-protects the pages that were dirty.
    pub fn clear_dirty_log(&self, as_id: u16, slot_id: u16, first_page: u64, mask: &[u64]) -> Result<(), MemslotError> {
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        let cleared = self.slots.clear_dirty_log(as_id, slot_id, first_page, mask)?;
        let flush = self.protect_bitmap(pages, as_id, slot_id, first_page, &cleared)?;
        self.discharge(flush);
        Ok(())
    }

    /// Write-protects the pages another MMU's harvest took (`bits`, bit 0
    /// is page `first_page` of the slot), flushing before it returns (see
    /// [`crate::mmu::track`]). A slot gone meanwhile has nothing to protect.
    pub(crate) fn protect_logged_pages(&self, as_id: u16, slot_id: u16, first_page: u64, bits: &[u64]) {
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        if let Ok(flush) = self.protect_bitmap(pages, as_id, slot_id, first_page, bits) {
            self.discharge(flush);
        }
    }

    /// Write-protects the pages whose bits are set in `bits` (bit 0 is page
    /// `first_page` of the slot). Returns whether a flush is owed: always
    /// when a bit is set.
    fn protect_bitmap(
        &self,
        pages: &Pages,
        as_id: u16,
        slot_id: u16,
        first_page: u64,
        bits: &[u64],
    ) -> Result<PendingFlush, MemslotError> {
        let slots = self.slots.load(as_id);
        let slot = slots
            .by_id(slot_id)
            .ok_or(MemslotError::UnknownSlot { as_id, id: slot_id })?;
        let base = slot.base_gfn().raw() + first_page;
        drop(slots);
        // A flush whenever a bit was taken, whether or not an SPTE changed
        // (KVM's `kvm_get_dirty_log_protect`): the MMU's write protection
        // is the SPTEs', the vCPUs' translations must follow it.
        let mut flush = PendingFlush::new(bits.iter().any(|&w| w != 0));
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                word &= word - 1;
                let gfn = Gfn::new(base + w as u64 * 64 + bit);
                flush |= self.clear_writable_range(pages, gfn, gfn.add(1));
            }
        }
        Ok(flush)
    }

    /// Clears the hardware W bit of every leaf SPTE of gfns `start..end`.
    fn clear_writable_range(&self, pages: &Pages, start: Gfn, end: Gfn) -> PendingFlush {
        let mut flush = PendingFlush::none();
        for (_, ptr) in pages.rmap_range(start, end) {
            flush |= self.clear_leaf_bits(ptr, |s| s.clear_writable(self.fmt));
        }
        flush
    }

    /// Dirty logging switched on for `slot`: every SPTE of it loses write
    /// access, so the next write to each page is seen.
    pub(super) fn start_dirty_logging(&self, slot: &Memslot) {
        let cfg = self.slots.config();
        if cfg.manual_dirty_log_protect && cfg.dirty_log_initially_set {
            return; // every page counts as dirty already
        }
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        let end = slot.base_gfn().add(slot.npages());
        let flush = self.clear_writable_range(pages, slot.base_gfn(), end);
        self.discharge(flush);
    }
}
