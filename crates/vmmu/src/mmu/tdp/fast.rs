//! The lockless fast path of a TDP fault (KVM's `fast_page_fault`): a
//! present leaf whose fix needs no new mapping is fixed with one
//! compare-exchange and no `mmu_lock`.

use super::change::DirtyBit;
use super::{FaultOutcome, RootRef, TdpFault, TdpMmu};
use crate::addr::{Gfn, Level};
use crate::mem::{DirtyRing, Memslot};
use crate::mmu::stats::MmuStats;

impl TdpMmu {
    /// The lockless fast path (KVM's `fast_page_fault`), for a present
    /// leaf whose fix needs no new mapping: an access-tracked SPTE gets its
    /// R/X back, and a write to an SPTE that is MMU-writable but not
    /// writable (write-protected for dirty logging) gets W back and logs
    /// the page; each with one compare-exchange. Never for a huge SPTE in a
    /// logging slot (KVM's check: it would log one page of many). `None`
    /// when the slow path must handle the fault.
    pub(super) fn fast_page_fault(
        &self,
        root: &RootRef,
        gfn: Gfn,
        fault: &TdpFault,
        slot: &Memslot,
        ring: Option<&DirtyRing>,
    ) -> Option<FaultOutcome> {
        let write = fault.write;
        let epoch = crossbeam_epoch::pin();
        let mut it = self.cursor(&epoch, root.root().pfn(), Level::L1, gfn);
        while it.step_down() {}
        let spte = it.old_spte();
        if !spte.is_mmu_present() || !spte.is_leaf(it.level()) {
            return None;
        }
        let mut new = spte;
        if new.is_access_tracked(self.fmt) {
            new = new.restore_access_tracked();
        }
        let made_writable = write && !new.is_writable(self.fmt);
        if made_writable {
            if !new.is_mmu_writable()
                || (it.level() > Level::L1
                    && slot.logs_dirty_pages()
                    && !crate::sync::bug(crate::sync::Bug::FastPathHugeWritable))
            {
                return None;
            }
            new = new.make_writable(self.fmt);
        }
        if fault.exec && !new.is_executable(self.fmt) {
            // Not the fast path's to fix (e.g. NX huge pages: map 4K).
            return None;
        }
        if new == spte {
            MmuStats::inc(&self.stats.local().pf_spurious);
            return Some(FaultOutcome::Spurious);
        }
        // The same frame, more rights (KVM's `fast_pf_fix_direct_spte`):
        // nothing for the change handler.
        if !self.set_leaf_bits(&mut it, new, DirtyBit::Log) {
            return None;
        }
        if made_writable {
            self.mark_dirty(slot, gfn, ring);
        }
        tracing::trace!(target: "fast_page_fault", gfn = gfn.raw(), write, old = spte.raw(), new = new.raw());
        MmuStats::inc(&self.stats.local().pf_fast);
        MmuStats::inc(&self.stats.local().pf_fixed);
        Some(FaultOutcome::Fixed)
    }
}
