//! One place reacts to every SPTE change (KVM's `handle_changed_spte`).
//!
//! Every write of an SPTE in a TDP tree goes through
//! [`TdpMmu::set_spte_atomic`] (compare-exchange through the cursor, under
//! `mmu_lock` in either mode) or [`TdpMmu::zap_spte`] (an exchange, where
//! nothing else installs: the write lock, or an invalid root), and both
//! hand the old and the new value to [`TdpMmu::handle_changed_spte`], which
//! does what every change implies:
//!
//! - counts leaves by level (`pages_4k/2m/1g`) and zapped leaves
//!   (`mmu_zapped`), and checks a new leaf's writable bits;
//! - in D-bit dirty logging, logs the pages of a dirty leaf whose D bit
//!   goes away (zapped, replaced, or cleaned by a harvest), unless the
//!   caller says the record is kept or discarded on purpose ([`DirtyBit`]);
//! - tears down a table that was unlinked (KVM's `handle_removed_pt`): its
//!   entries are frozen, so a fault still walking it fails its
//!   compare-exchange there instead of installing into a table nobody
//!   reaches, each of their changes is handled in turn, and the table is
//!   freed after an epoch grace period;
//! - emits the `kvm_tdp_mmu_spte_changed` tracepoint.
//!
//! One kind of change needs none of this, and skips the handler as KVM's
//! `tdp_mmu_clear_spte_bits` and fast path do: a present leaf that stays a
//! present leaf of the same frame, only its permission or A/D bits
//! changing, with no D bit that D-bit logging still needs cleared
//! (write-protection, aging, access tracking, the fast path's fixes).
//! [`TdpMmu::bits_only`] says which changes those are, and
//! [`TdpMmu::set_leaf_bits`] (one leaf, through the cursor) and
//! [`TdpMmu::write_protect_table`] (every leaf of a table) make them
//! (checked in debug builds). These are the only writes of a live SPTE;
//! the one other store fills a split's table before it is published.
//!
//! TLB flushes stay with the callers, who know whether rights shrank (as in
//! KVM); they return a [`crate::mmu::flush::PendingFlush`].

use std::sync::atomic::Ordering;

use crossbeam_epoch::Guard;

use super::TdpMmu;
use crate::addr::{Gfn, Level, PageSize, Pfn};
use crate::mmu::iter::SpteIter;
use crate::mmu::spte::{FROZEN_SPTE, Spte};
use crate::mmu::stats::MmuStats;
use crate::sync;
use crate::sync::MmuLockHeld;

/// What becomes of the record a dirty leaf's D bit holds when a change
/// clears it. Only D-bit logging reads D bits; in write-protect logging
/// this is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DirtyBit {
    /// The D bit is the only record of the writes to the leaf's pages since
    /// the last harvest: log them (a zap, a replacement, a harvest).
    Log,
    /// The record lives on or is dropped on purpose: a split's children
    /// inherit the D bit; dirty logging starts (earlier writes do not
    /// count); a `KVM_CLEAR_DIRTY_LOG` of the page (the VMM copies it
    /// afterwards).
    Keep,
}

impl TdpMmu {
    /// Replaces the cursor's SPTE with `new` if it still holds the value
    /// the cursor read (KVM's `tdp_mmu_set_spte_atomic`), and handles the
    /// change. On failure the cursor holds the value found.
    #[inline]
    pub(super) fn set_spte_atomic(&self, it: &mut SpteIter<'_>, as_id: u16, new: Spte, dirty: DirtyBit) -> bool {
        let old = it.old_spte();
        if !it.try_set(new) {
            return false;
        }
        self.handle_changed_spte(it.epoch(), as_id, it.gfn(), it.level(), old, new, dirty);
        true
    }

    /// Whether changing the leaf of `level` from `old` to `new` is a change
    /// the handler has nothing to react to (see the module documentation):
    /// both present leaves of the same frame, and no D bit cleared that
    /// D-bit logging still needs (`dirty` says whether it does).
    pub(super) fn bits_only(&self, level: Level, old: Spte, new: Spte, dirty: DirtyBit) -> bool {
        old.is_mmu_present()
            && old.is_leaf(level)
            && new.is_mmu_present()
            && new.is_leaf(level)
            && old.pfn() == new.pfn()
            && !(dirty == DirtyBit::Log
                && self.dirty_bit_logging()
                && old.is_dirty(self.fmt)
                && !new.is_dirty(self.fmt))
    }

    /// Changes only the bits of the cursor's leaf ([`TdpMmu::bits_only`])
    /// with a compare-exchange, without the handler (KVM's
    /// `tdp_mmu_clear_spte_bits`). On failure the cursor holds the value
    /// found.
    #[inline]
    pub(super) fn set_leaf_bits(&self, it: &mut SpteIter<'_>, new: Spte, dirty: DirtyBit) -> bool {
        debug_assert!(
            self.bits_only(it.level(), it.old_spte(), new, dirty),
            "not a bits-only change at level {}: {:?} -> {new:?}",
            it.level(),
            it.old_spte()
        );
        if cfg!(debug_assertions) {
            new.check_leaf_writable_invariants(self.fmt);
        }
        it.try_set(new)
    }

    /// Clears hardware W on every present leaf of a 4K table, with
    /// compare-exchange (hardware may set A/D meanwhile): a bits-only change
    /// ([`TdpMmu::bits_only`]) made table-wide without a cursor, for dirty
    /// logging's protection of a whole table. Returns whether any was
    /// writable.
    pub(super) fn write_protect_table(&self, table: Pfn) -> bool {
        let mut protected = false;
        for slot in self
            .arena
            .table(table)
            .iter()
            .take(self.config.geometry.entries() as usize)
        {
            let mut cur = slot.load(Ordering::Acquire);
            loop {
                let spte = Spte::from_raw(cur);
                if !(spte.is_mmu_present() && spte.is_writable(self.fmt)) {
                    break;
                }
                let new = spte.clear_writable(self.fmt);
                match slot.compare_exchange(cur, new.raw(), Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        // Write-protection: nothing for the change handler.
                        debug_assert!(self.bits_only(Level::L1, spte, new, DirtyBit::Keep));
                        protected = true;
                        break;
                    }
                    Err(now) => cur = now,
                }
            }
        }
        protected
    }

    /// Zaps the cursor's SPTE with an exchange (hardware A/D updates racing
    /// with it are kept in the old value it returns) and handles the
    /// change. Only where no fault can install concurrently: under the
    /// write lock, or in an invalidated root (faults refuse those).
    pub(super) fn zap_spte(&self, _guard: &impl MmuLockHeld, it: &mut SpteIter<'_>, as_id: u16) -> Spte {
        let old = Spte::from_raw(it.sptep().swap(0, Ordering::AcqRel));
        self.handle_changed_spte(it.epoch(), as_id, it.gfn(), it.level(), old, Spte::EMPTY, DirtyBit::Log);
        it.refresh();
        old
    }

    /// Reacts to the SPTE of `gfn` at `level` changing from `old` to `new`
    /// (KVM's `handle_changed_spte`; see the module documentation).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn handle_changed_spte(
        &self,
        epoch: &Guard,
        as_id: u16,
        gfn: Gfn,
        level: Level,
        old: Spte,
        new: Spte,
        dirty: DirtyBit,
    ) {
        if old == new {
            return;
        }
        let was_present = old.is_mmu_present();
        let is_present = new.is_mmu_present();
        if !was_present && !is_present {
            // Empty, MMIO or frozen to one another: nothing is mapped.
            return;
        }
        tracing::trace!(target: "kvm_tdp_mmu_spte_changed", as_id, gfn = gfn.raw(), level = level.get(), old = old.raw(), new = new.raw());
        let was_leaf = was_present && old.is_leaf(level);
        let is_leaf = is_present && new.is_leaf(level);
        if is_leaf {
            new.check_leaf_writable_invariants(self.fmt);
        }
        if was_leaf != is_leaf {
            self.stats.account_leaf(level, if is_leaf { 1 } else { -1 });
        }
        if was_leaf && !is_present {
            MmuStats::inc(&self.stats.local().mmu_zapped);
        }
        let gone = !(is_leaf && new.pfn() == old.pfn());
        if was_leaf
            && dirty == DirtyBit::Log
            && self.dirty_bit_logging()
            && !(gone && crate::sync::bug(crate::sync::Bug::ZapForgetsDirtyBit))
            && old.is_dirty(self.fmt)
            && !(is_leaf && new.is_dirty(self.fmt) && new.pfn() == old.pfn())
        {
            self.log_dirty_pages(as_id, gfn, self.config.geometry.pages(level));
        }
        if was_present && !was_leaf && (!is_present || is_leaf || new.pfn() != old.pfn()) {
            self.handle_removed_table(
                epoch,
                as_id,
                gfn,
                level.down().expect("a table is above level 1"),
                old.pfn(),
            );
        }
    }

    /// A table at `level` covering from `gfn` was unlinked from its tree
    /// (KVM's `handle_removed_pt`): every entry is frozen and its change
    /// handled (leaves counted and logged, tables below torn down the same
    /// way), then the table is freed once no walker can be inside it.
    fn handle_removed_table(&self, epoch: &Guard, as_id: u16, gfn: Gfn, level: Level, table: Pfn) {
        let g = self.config.geometry;
        for (i, slot) in self.arena.table(table).iter().take(g.entries() as usize).enumerate() {
            // A fault that walked in before the unlink may still try to
            // install here: the frozen value fails its compare-exchange.
            sync::sched_point();
            let old = Spte::from_raw(slot.swap(FROZEN_SPTE, Ordering::AcqRel));
            let child_gfn = gfn.add(i as u64 * g.pages(level));
            self.handle_changed_spte(
                epoch,
                as_id,
                child_gfn,
                level,
                old,
                Spte::from_raw(FROZEN_SPTE),
                DirtyBit::Log,
            );
        }
        self.stats.account_tables(-1);
        if self.config.nx_huge_pages {
            self.nx_untrack_table(as_id, gfn, level);
        }
        defer_free_table(epoch, &self.arena, table);
    }

    /// D-bit logging: marks `pages` gfns from `gfn` dirty in every slot of
    /// `as_id` that logs dirty pages (a huge leaf may span slots).
    pub(super) fn log_dirty_pages(&self, as_id: u16, gfn: Gfn, pages: u64) {
        let (start, end) = (gfn.raw(), gfn.raw() + pages);
        let slots = self.slots.load(as_id);
        for slot in slots.iter().filter(|s| s.logs_dirty_pages()) {
            let from = start.max(slot.base_gfn().raw());
            let to = end.min(slot.base_gfn().raw() + slot.npages());
            for g in from..to {
                slot.mark_page_dirty(Gfn::new(g));
            }
        }
    }
}

/// Frees one table frame after the grace period of `epoch` (the epoch of
/// the walk that unlinked it: the hardware model and lockless walkers pin
/// an epoch while they walk).
pub(super) fn defer_free_table(epoch: &Guard, arena: &std::sync::Arc<crate::host::FrameArena>, table: Pfn) {
    let arena = arena.clone();
    epoch.defer(move || {
        // A double free would be an MMU bug; the arena reports it and frees nothing.
        let _ = arena.free(table, PageSize::Size4K);
    });
    epoch.flush();
}
