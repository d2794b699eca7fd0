//! One place writes shadow SPTEs and reacts to each change (KVM's
//! `mmu_spte_set`, `mmu_spte_clear_track_bits`, `link_shadow_page` and
//! `drop_parent_pte`, with what `mmu_set_spte` does around them).
//!
//! Every write of an SPTE of a shadow page goes through
//! [`ShadowMmu::set_spte`] (a whole new value: a leaf, a link to a child
//! page, or empty) or [`ShadowMmu::clear_leaf_bits`] (permission bits of a
//! present leaf, with hardware's A/D updates kept). `set_spte` hands the
//! old and the new value to [`ShadowMmu::handle_changed_spte`], which does
//! what every change implies:
//!
//! - a leaf going away: out of its gfn's rmap, counted (`pages_4k`,
//!   `mmu_zapped`);
//! - a leaf arriving: into its gfn's rmap, counted, its writable bits
//!   checked, and logged dirty if it is writable in a slot that logs dirty
//!   pages (write-protect dirty logging: the page may be written from now
//!   on without a fault; KVM's `mark_page_dirty_in_slot` from
//!   `mmu_set_spte`);
//! - a link going away: the child page loses the parent, its bit in the
//!   parent's unsync-children bitmap is cleared, and a child left with no
//!   parent and no root use is zapped (child-table teardown);
//! - a link arriving: the child gains the parent, and the parent's
//!   unsync-children bitmap learns of the child's unsync state;
//! - the `kvm_mmu_set_spte` / `kvm_mmu_spte_changed` tracepoints.
//!
//! A flush is owed whenever a present SPTE changed; the callers collect
//! the [`PendingFlush`] and discharge it before they drop `mmu_lock`.
//!
//! Two stores write entries that are not SPTEs of a shadow page, and live
//! here too so that this file holds every write: the zap of a page clearing
//! the parent entries that point at it ([`ShadowMmu::unlink_parents`]), and
//! the entry of the table a PAE root hangs from
//! ([`ShadowMmu::link_pae_table`]).

use std::sync::atomic::Ordering;

use super::ShadowMmu;
use super::page::{PageId, Pages, SptePtr};
use crate::addr::{Gfn, Level, Pfn};
use crate::mem::Memslot;
use crate::mmu::flush::PendingFlush;
use crate::mmu::spte::Spte;
use crate::mmu::stats::MmuStats;

/// The new value of an SPTE, with what the change handler needs to know
/// about it.
#[derive(Clone, Copy)]
pub(super) enum NewSpte<'a> {
    /// Not present.
    Empty,
    /// A 4K leaf translating `gfn` of `slot`.
    Leaf {
        /// The SPTE.
        spte: Spte,
        /// The gfn it translates.
        gfn: Gfn,
        /// The memslot of `gfn`.
        slot: &'a Memslot,
    },
    /// A link to a child shadow page.
    Table(PageId),
}

impl ShadowMmu {
    /// Writes `new` into the SPTE at `ptr` (in a table of `level`) and
    /// handles the change. Returns the flush owed (a present SPTE changed).
    pub(super) fn set_spte(&self, pages: &mut Pages, ptr: SptePtr, level: Level, new: NewSpte<'_>) -> PendingFlush {
        let raw = match new {
            NewSpte::Empty => 0,
            NewSpte::Leaf { spte, .. } => {
                debug_assert_eq!(level, Level::L1, "every shadow leaf is 4K");
                spte.raw()
            }
            NewSpte::Table(child) => self.fmt.make_nonleaf(pages.page(child).pfn).raw(),
        };
        let entry = ptr.get(&self.arena);
        // Only the MMU, under the lock, makes an entry present, and hardware
        // sets A/D only in present ones: an entry found not present is
        // written with a plain store (KVM's `mmu_spte_set`), and clearing
        // one needs no write at all.
        let cur = Spte::from_raw(entry.load(Ordering::Acquire));
        let old = if !cur.is_mmu_present() {
            if raw == 0 {
                return PendingFlush::none();
            }
            entry.store(raw, Ordering::Release);
            cur
        } else {
            // An exchange: hardware A/D updates racing with it stay in `old`
            // (KVM's `mmu_spte_clear_track_bits`).
            Spte::from_raw(entry.swap(raw, Ordering::AcqRel))
        };
        self.handle_changed_spte(pages, ptr, level, old, new)
    }

    /// Clears the SPTE at `ptr`: [`ShadowMmu::set_spte`] with
    /// [`NewSpte::Empty`] (KVM's `drop_spte` and `mmu_page_zap_pte`).
    #[inline]
    pub(super) fn drop_spte(&self, pages: &mut Pages, ptr: SptePtr, level: Level) -> PendingFlush {
        // Most entries of a page being zapped are empty: skip them without
        // a call (the load is `set_spte`'s first step anyway).
        if !Spte::from_raw(ptr.get(&self.arena).load(Ordering::Acquire)).is_mmu_present() {
            return PendingFlush::none();
        }
        self.set_spte(pages, ptr, level, NewSpte::Empty)
    }

    /// Points the SPTE at `ptr` (in a table of `level`) to `child`, whose
    /// level is one below.
    pub(super) fn link(&self, pages: &mut Pages, ptr: SptePtr, level: Level, child: PageId) -> PendingFlush {
        debug_assert_eq!(Some(pages.page(child).role.level()), level.down());
        self.set_spte(pages, ptr, level, NewSpte::Table(child))
    }

    /// Clears in the present leaf at `ptr` the bits `clear` takes away
    /// (write-protection for write tracking, sync and dirty logging): a
    /// bits-only change, made with an atomic AND so hardware A/D updates
    /// racing with it are kept (KVM's `mmu_spte_update` for
    /// `spte_write_protect`). Nothing for the change handler: the leaf
    /// stays a leaf of the same frame. Returns the flush owed (a bit went).
    pub(super) fn clear_leaf_bits(&self, ptr: SptePtr, clear: impl Fn(Spte) -> Spte) -> PendingFlush {
        let entry = ptr.get(&self.arena);
        let old = Spte::from_raw(entry.load(Ordering::Acquire));
        if !old.is_mmu_present() {
            return PendingFlush::none();
        }
        let new = clear(old);
        debug_assert!(
            new.is_mmu_present() && new.pfn() == old.pfn() && new.raw() & !old.raw() == 0,
            "not a bits-only clear: {old:?} -> {new:?}"
        );
        if new == old {
            return PendingFlush::none();
        }
        entry.fetch_and(new.raw() | !old.raw(), Ordering::AcqRel);
        PendingFlush::new(true)
    }

    /// Clears every parent entry pointing at `id`, a page being zapped
    /// (KVM's `kvm_mmu_unlink_parents`): the child side of the unlink is
    /// the zap itself, so only the parents' bitmaps learn of it.
    pub(super) fn unlink_parents(&self, pages: &mut Pages, id: PageId) {
        let parents = std::mem::take(&mut pages.page_mut(id).parents);
        for ptr in parents {
            ptr.get(&self.arena).store(0, Ordering::Release);
            pages.note_unlink(ptr);
        }
    }

    /// Points entry 0 of `pml4`, the table a PAE or 32-bit guest's four
    /// roots hang from in the 4-level shadow format, to `pae`, the table
    /// holding them. Neither is a shadow page: they belong to the vCPU's
    /// roots and are freed with them.
    pub(super) fn link_pae_table(&self, pml4: Pfn, pae: Pfn) {
        self.arena.table(pml4)[0].store(self.fmt.make_nonleaf(pae).raw(), Ordering::Release);
    }

    /// Reacts to the SPTE at `ptr`, in a table of `level`, changing from
    /// `old` to `new` (see the module documentation). Returns the flush
    /// owed.
    fn handle_changed_spte(
        &self,
        pages: &mut Pages,
        ptr: SptePtr,
        level: Level,
        old: Spte,
        new: NewSpte<'_>,
    ) -> PendingFlush {
        let mut flush = PendingFlush::none();
        if old.is_mmu_present() {
            flush.require();
            if old.is_leaf(level) {
                if let Some(gfn) = self.translations.get(ptr) {
                    pages.rmap_remove(gfn, ptr, &self.translations);
                }
                self.stats.account_leaf(Level::L1, -1);
                MmuStats::inc(&self.stats.local().mmu_zapped);
            } else if let Some(child) = pages.by_pfn(old.pfn()) {
                pages.note_unlink(ptr);
                let c = pages.page_mut(child);
                c.parents.retain(|&p| p != ptr);
                // A page being zapped is out of the hash already: only a
                // live page left unreachable is zapped here.
                if c.parents.is_empty() && c.root_count == 0 && pages.is_hashed(child) {
                    flush |= self.zap_page(pages, child);
                }
            }
        }
        match new {
            NewSpte::Empty => {
                tracing::trace!(target: "kvm_mmu_spte_changed", table = ptr.table.raw(), index = ptr.index, level = level.get(), old = old.raw(), new = 0u64);
            }
            NewSpte::Leaf { spte, gfn, slot } => {
                spte.check_leaf_writable_invariants(self.fmt);
                pages.rmap_add(gfn, ptr, &self.translations);
                self.stats.account_leaf(Level::L1, 1);
                if spte.is_writable(self.fmt) && slot.logs_dirty_pages() {
                    // Writable from now on: logged now (KVM's `make_spte`).
                    slot.mark_page_dirty(gfn);
                }
                tracing::trace!(target: "kvm_mmu_set_spte", gfn = gfn.raw(), level = level.get(), spte = spte.raw(), old = old.raw());
            }
            NewSpte::Table(child) => {
                pages.page_mut(child).parents.push(ptr);
                pages.note_link(ptr, child);
                tracing::trace!(target: "kvm_mmu_spte_changed", table = ptr.table.raw(), index = ptr.index, level = level.get(), old = old.raw(), new = pages.page(child).pfn.raw());
            }
        }
        flush
    }
}
