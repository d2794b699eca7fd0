//! Access tracking for the primary MMU's page aging (KVM's
//! `kvm_tdp_mmu_age_gfn_range`, `kvm_tdp_mmu_test_age_gfn`).
//!
//! With EPT A/D enabled, aging clears the Accessed bit of leaf SPTEs; the
//! hardware walker sets it again on the next use. Without A/D, a young SPTE
//! is made access-tracked (R/W/X cleared, R and X saved in software bits):
//! the next access exits, and the fault's lockless fast path restores it.
//! Either way the SPTE keeps mapping its frame: aging never zaps.

use super::TdpMmu;
use super::change::DirtyBit;
use crate::addr::{Gfn, Level};
use crate::host::HvaRange;
use crate::mmu::flush::PendingFlush;
use crate::mmu::spte::{Spte, SpteFormat};
use crate::sync::MmuLockHeld;

/// What to do with each young leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aging {
    /// Report only.
    Test,
    /// Make it old.
    Clear,
}

impl TdpMmu {
    /// Visits the leaves mapping `start..end` of `as_id`; returns whether any
    /// was young, and the flush owed if some were made old.
    fn age_range(
        &self,
        _guard: &impl MmuLockHeld,
        as_id: u16,
        start: Gfn,
        end: Gfn,
        aging: Aging,
    ) -> (bool, PendingFlush) {
        let mut young = false;
        let mut changed = false;
        // Tables unlinked meanwhile (a zap under the read lock, an invalid
        // root's last reference dropped) are freed only after this guard:
        // the walk never reads a freed or reused frame.
        let epoch = crossbeam_epoch::pin();
        for root in self.roots_of(as_id) {
            let mut it = self.cursor(&epoch, root.pfn(), Level::L1, start);
            while it.valid() && it.gfn() < end {
                let spte = it.old_spte();
                let level = it.level();
                if !(spte.is_mmu_present() && spte.is_leaf(level)) {
                    it.next();
                    continue;
                }
                if spte.is_accessed(self.fmt) {
                    young = true;
                    if aging == Aging::Test {
                        // KVM's test_age stops at the first young leaf.
                        return (true, PendingFlush::new(changed));
                    }
                    if aging == Aging::Clear {
                        let old = self.make_old(spte);
                        if !self.set_leaf_bits(&mut it, old, DirtyBit::Log) {
                            continue; // hardware changed it: look again
                        }
                        changed = true;
                    }
                }
                it.skip_subtree();
            }
        }
        (young, PendingFlush::new(changed))
    }

    fn make_old(&self, spte: Spte) -> Spte {
        match self.fmt {
            SpteFormat::Ept { ad: false } => spte.mark_access_tracked(),
            fmt => spte.clear_accessed(fmt),
        }
    }

    /// The gfn ranges of every address space's slots that map `range`.
    fn gfn_spans(&self, range: HvaRange) -> Vec<(u16, Gfn, Gfn)> {
        let mut spans = Vec::new();
        for as_id in 0..2u16 {
            let slots = self.slots.load(as_id);
            spans.extend(
                slots
                    .overlapping_hva(range)
                    .filter_map(|s| s.hva_range_to_gfns(range))
                    .map(|r| (as_id, r.start, r.end)),
            );
        }
        spans
    }

    /// `clear_young` / `clear_flush_young`: makes every leaf mapping `range`
    /// old; returns whether any was young. With `flush`, TLBs are flushed
    /// before returning, so the next access is seen.
    pub fn age_hva_range(&self, range: HvaRange, flush: bool) -> bool {
        let guard = self.lock.read();
        let mut young = false;
        let mut owed = PendingFlush::none();
        for (as_id, start, end) in self.gfn_spans(range) {
            let (y, f) = self.age_range(&guard, as_id, start, end, Aging::Clear);
            young |= y;
            owed = owed.merge(f);
        }
        if flush {
            self.discharge(owed);
        } else {
            owed.waive("clear_young: the primary MMU accepts that a cached translation hides an access");
        }
        young
    }

    /// `test_young`: whether any leaf mapping `range` is young; changes nothing.
    pub fn test_age_hva_range(&self, range: HvaRange) -> bool {
        let guard = self.lock.read();
        self.gfn_spans(range)
            .into_iter()
            .any(|(as_id, start, end)| self.age_range(&guard, as_id, start, end, Aging::Test).0)
    }
}
