//! Dirty logging in the TDP MMU (KVM's
//! `kvm_mmu_slot_apply_flags`, `kvm_get_dirty_log_protect`,
//! `fast_page_fault`, `kvm_mmu_recover_huge_pages`).
//!
//! - Enabling logging on a slot write-protects its SPTEs (hardware W
//!   cleared, MMU-writable kept) and splits its huge SPTEs into 4K ones, so
//!   the first write to each page faults.
//! - Such a write is fixed on the lockless fast path: the SPTE gets W back
//!   with one compare-exchange and the page is marked dirty.
//! - Harvesting (`get_dirty_log`, or `clear_dirty_log` with manual
//!   protect) takes the bits, write-protects their pages and flushes TLBs
//!   before returning: a copy of a page made after the harvest includes
//!   every write made before its protection, and every later write faults
//!   and is logged.
//! - Disabling logging recovers huge pages in place: a table of 4K SPTEs is
//!   replaced by one huge SPTE where the memslot and the host mapping allow
//!   it, reading the host level under `mmu_lock` with no invalidation in
//!   progress (the second safe use of `host_pfn_mapping_level`, seed 004).
//!
//! In D-bit mode ([`super::DirtyLogMode::DirtyBit`], KVM with PML) SPTEs
//! stay writable and are made clean instead; a harvest moves the EPT Dirty
//! bits into the bitmap and cleans them, flushing TLBs so the next write
//! sets D again (the vCPU caches a translation as dirty only if the EPT
//! leaf was).

use std::sync::atomic::Ordering;

use super::{TdpMmu, defer_free_tree};
use crate::addr::{Gfn, Level};
use crate::mem::{DirtyRing, Memslot, MemslotChange, MemslotError, MemslotObserver, MmuLockHeld, stable_host_level};
use crate::mmu::flush::PendingFlush;
use crate::mmu::iter::SpteIter;
use crate::mmu::spte::{FROZEN_SPTE, Spte, SpteAccess};
use crate::mmu::stats::MmuStats;

impl TdpMmu {
    /// Clears hardware W on every leaf in `start..end` of `as_id` (MMU-writable
    /// kept), splitting huge leaves first when `split` (KVM's
    /// `kvm_tdp_mmu_wrprot_slot` after eager splitting).
    pub(super) fn write_protect_range(
        &self,
        _guard: &impl MmuLockHeld,
        as_id: u16,
        start: Gfn,
        end: Gfn,
        split: bool,
    ) -> PendingFlush {
        let mut protected = false;
        for root in self.roots_of(as_id) {
            let mut it = SpteIter::new(&self.arena, self.config.geometry, root.pfn(), 1, start.raw());
            let entries = self.config.geometry.entries();
            while it.valid() && it.gfn() < end.raw() {
                let level = it.level();
                let spte = it.old_spte();
                if level == 1
                    && !self.dirty_bit_logging()
                    && it.gfn().is_multiple_of(entries)
                    && it.gfn() + entries <= end.raw()
                {
                    // A whole 4K table in range: one tight pass over its
                    // slots (the cursor's per-entry bookkeeping would cost
                    // as much as the compare-exchange), then past it.
                    protected |= self.write_protect_table(it.table());
                    if !it.step_up() {
                        break;
                    }
                    it.skip_subtree();
                    continue;
                }
                if spte.is_mmu_present() && spte.is_leaf(level) {
                    if level > 1 && split {
                        if self.split_huge(&mut it) {
                            protected = true;
                            continue; // now a table: step into it
                        }
                        continue; // lost a race: re-read
                    }
                    if self.dirty_bit_logging() {
                        // D-bit mode: clean the SPTE instead of protecting it.
                        if spte.is_dirty(self.fmt) {
                            if !it.try_set(Spte(spte.0 & !self.fmt.dirty_mask())) {
                                continue;
                            }
                            protected = true;
                        }
                    } else if spte.is_writable(self.fmt) {
                        if !it.try_set(spte.clear_writable(self.fmt)) {
                            continue; // hardware set A/D meanwhile: retry this SPTE
                        }
                        protected = true;
                    }
                    it.skip_subtree();
                    continue;
                }
                it.next();
            }
        }
        PendingFlush::new(protected)
    }

    /// Clears hardware W on every present leaf of a 4K table, with
    /// compare-exchange (hardware may set A/D meanwhile). Returns whether
    /// any was writable.
    fn write_protect_table(&self, table: crate::addr::Pfn) -> bool {
        let mut protected = false;
        for slot in self
            .arena
            .table(table)
            .iter()
            .take(self.config.geometry.entries() as usize)
        {
            let mut cur = slot.load(Ordering::Acquire);
            loop {
                let spte = Spte(cur);
                if !(spte.is_mmu_present() && spte.is_writable(self.fmt)) {
                    break;
                }
                match slot.compare_exchange(
                    cur,
                    spte.clear_writable(self.fmt).0,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        protected = true;
                        break;
                    }
                    Err(now) => cur = now,
                }
            }
        }
        protected
    }

    /// Replaces the huge leaf at the cursor with a table of next-level
    /// leaves mapping the same frames, write-protected. Returns false if
    /// the SPTE changed under us.
    fn split_huge(&self, it: &mut SpteIter<'_>) -> bool {
        let level = it.level();
        let huge = it.old_spte();
        let Ok(table) = self.alloc_table() else {
            return false;
        };
        let entries = self.config.geometry.entries();
        let child_pages = self.config.geometry.pages(level - 1);
        let access = SpteAccess {
            read: true,
            write: huge.is_mmu_writable(),
            exec: true,
            user: true,
        };
        for i in 0..entries {
            let pfn = huge.pfn().add(i * child_pages);
            let leaf = self
                .fmt
                .make_leaf(level - 1, pfn, access, huge.is_host_writable(), true, false);
            // Write-protected, or in D-bit mode writable and clean.
            let leaf = if self.dirty_bit_logging() {
                Spte(leaf.0 & !self.fmt.dirty_mask())
            } else {
                leaf.clear_writable(self.fmt)
            };
            self.arena.table(table)[i as usize].store(leaf.0, Ordering::Relaxed);
        }
        if !it.try_set(self.fmt.make_nonleaf(table)) {
            self.free_table_now(table);
            return false;
        }
        self.stats.account_leaf(level, -1);
        self.stats.account_leaf(level - 1, entries as i64);
        MmuStats::inc(&self.stats.local().huge_pages_split);
        tracing::trace!(target: "kvm_mmu_split_huge_page", gfn = it.gfn(), level);
        // The cursor now holds the table: the caller steps into it.
        true
    }

    /// The lockless fast path (KVM's `fast_page_fault`), for a present
    /// leaf whose fix needs no new mapping: an access-tracked SPTE gets its
    /// R/X back, and a write to an SPTE that is MMU-writable but not
    /// writable (write-protected for dirty logging) gets W back and logs
    /// the page; each with one compare-exchange. `None` when the slow path
    /// must handle the fault.
    pub(super) fn fast_page_fault(
        &self,
        root: &super::RootRef,
        gfn: Gfn,
        fault: &super::TdpFault,
        slot: &Memslot,
        ring: Option<&DirtyRing>,
    ) -> Option<super::FaultOutcome> {
        let write = fault.write;
        let _epoch = crossbeam_epoch::pin();
        let mut it = SpteIter::new(&self.arena, self.config.geometry, root.root().pfn(), 1, gfn.raw());
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
            if !new.is_mmu_writable() {
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
            return Some(super::FaultOutcome::Spurious);
        }
        if !it.try_set(new) {
            return None;
        }
        if made_writable {
            self.mark_dirty(slot, gfn, ring);
        }
        tracing::trace!(target: "fast_page_fault", gfn = gfn.raw(), write, old = spte.0, new = new.0);
        MmuStats::inc(&self.stats.local().pf_fast);
        MmuStats::inc(&self.stats.local().pf_fixed);
        Some(super::FaultOutcome::Fixed)
    }

    /// `KVM_GET_DIRTY_LOG`: the slot's dirty bitmap; without manual
    /// protect the bits are cleared and their pages write-protected, with
    /// TLBs flushed before this returns.
    pub fn get_dirty_log(&self, as_id: u16, slot_id: u16) -> Result<Vec<u64>, MemslotError> {
        if self.dirty_ring_size().is_some() {
            return Err(MemslotError::DirtyRingEnabled);
        }
        let guard = self.lock.write();
        if self.dirty_bit_logging() {
            // Move the hardware's D bits into the bitmap and clean them;
            // the flush makes every later write set D again.
            let flush = self.harvest_dirty_bits(&guard, as_id, slot_id)?;
            self.discharge(flush);
            return self.slots.get_dirty_log(as_id, slot_id);
        }
        let bitmap = self.slots.get_dirty_log(as_id, slot_id)?;
        if !self.slots.config().manual_dirty_log_protect {
            let flush = self.protect_bitmap(&guard, as_id, slot_id, 0, &bitmap)?;
            self.discharge(flush);
        }
        Ok(bitmap)
    }

    /// `KVM_CLEAR_DIRTY_LOG` (manual protect): clears the bits of `mask`
    /// from `first_page` and write-protects the pages that were dirty.
    pub fn clear_dirty_log(&self, as_id: u16, slot_id: u16, first_page: u64, mask: &[u64]) -> Result<(), MemslotError> {
        if self.dirty_ring_size().is_some() {
            return Err(MemslotError::DirtyRingEnabled);
        }
        let guard = self.lock.write();
        let cleared = self.slots.clear_dirty_log(as_id, slot_id, first_page, mask)?;
        let flush = self.protect_bitmap(&guard, as_id, slot_id, first_page, &cleared)?;
        self.discharge(flush);
        Ok(())
    }

    /// D-bit mode: for every dirty leaf of the slot, logs its pages and
    /// clears D.
    fn harvest_dirty_bits(
        &self,
        _guard: &impl MmuLockHeld,
        as_id: u16,
        slot_id: u16,
    ) -> Result<PendingFlush, MemslotError> {
        let slots = self.slots.load(as_id);
        let slot = slots
            .by_id(slot_id)
            .ok_or(MemslotError::UnknownSlot { as_id, id: slot_id })?
            .clone();
        drop(slots);
        let (start, end) = (slot.base_gfn(), slot.base_gfn().add(slot.npages()));
        let mut cleaned = false;
        for root in self.roots_of(as_id) {
            let mut it = SpteIter::new(&self.arena, self.config.geometry, root.pfn(), 1, start.raw());
            while it.valid() && it.gfn() < end.raw() {
                let spte = it.old_spte();
                let level = it.level();
                if spte.is_mmu_present() && spte.is_leaf(level) {
                    if spte.is_dirty(self.fmt) {
                        if !it.try_set(Spte(spte.0 & !self.fmt.dirty_mask())) {
                            continue;
                        }
                        for i in 0..self.config.geometry.pages(level) {
                            slot.mark_page_dirty(Gfn::new(it.gfn() + i));
                        }
                        cleaned = true;
                    }
                    it.skip_subtree();
                    continue;
                }
                it.next();
            }
        }
        Ok(PendingFlush::new(cleaned))
    }

    /// D-bit mode: a dirty leaf being zapped logs its pages. PML logged
    /// the write when hardware set D; here the harvest reads D, so a zap
    /// before the harvest (zap-all, an MMU-notifier invalidation, a memslot
    /// flush) would lose it.
    pub(super) fn log_dirty_leaf(&self, as_id: u16, gfn: u64, level: u8, old: Spte) {
        if !self.dirty_bit_logging() || !old.is_dirty(self.fmt) {
            return;
        }
        let (start, end) = (gfn, gfn + self.config.geometry.pages(level));
        let slots = self.slots.load(as_id);
        for slot in slots.iter().filter(|s| s.logs_dirty_pages()) {
            let from = start.max(slot.base_gfn().raw());
            let to = end.min(slot.base_gfn().raw() + slot.npages());
            for g in from..to {
                slot.mark_page_dirty(Gfn::new(g));
            }
        }
    }

    pub(super) fn protect_bitmap(
        &self,
        guard: &impl MmuLockHeld,
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
        let mut flush = PendingFlush::none();
        // Runs of set bits become one range each, across word boundaries
        // (a fully dirty slot is one walk, not one per 64 pages).
        let mut run: Option<(u64, u64)> = None;
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let lo = word.trailing_zeros() as u64;
                let len = (word >> lo).trailing_ones() as u64;
                let start = base + w as u64 * 64 + lo;
                run = match run {
                    Some((s, e)) if e == start => Some((s, start + len)),
                    Some((s, e)) => {
                        flush = flush.merge(self.write_protect_range(guard, as_id, Gfn::new(s), Gfn::new(e), false));
                        Some((start, start + len))
                    }
                    None => Some((start, start + len)),
                };
                word &= !(((1u128 << (lo + len)) - 1) as u64);
            }
        }
        if let Some((s, e)) = run {
            flush = flush.merge(self.write_protect_range(guard, as_id, Gfn::new(s), Gfn::new(e), false));
        }
        Ok(flush)
    }

    /// Logging was turned off: replace tables of 4K leaves by one huge leaf
    /// where the memslot and the host mapping allow it (in place, no zap).
    fn recover_huge_pages(&self, slot: &Memslot) {
        let guard = self.lock.write();
        let start = slot.base_gfn();
        let end = start.add(slot.npages());
        let pages = self.config.geometry.pages(2);
        let mut flush = false;
        for root in self.roots_of(slot.as_id()) {
            let mut it = SpteIter::new(&self.arena, self.config.geometry, root.pfn(), 2, start.raw());
            while it.valid() && it.gfn() < end.raw() {
                let spte = it.old_spte();
                if it.level() == 2 && spte.is_mmu_present() && !spte.is_leaf(2) {
                    let gfn = Gfn::new(it.gfn());
                    if gfn.raw() >= start.raw()
                        && gfn.raw() + pages <= end.raw()
                        && slot.max_mapping_level(gfn, Level::L2) >= Level::L2
                        && let Some(hva) = slot.gfn_to_hva(gfn)
                        && matches!(stable_host_level(&self.host, &self.invalidate, &guard, hva), Ok(Some(l)) if l >= Level::L2)
                        && let Some(host) = self.host.lookup(hva)
                    {
                        let leaf = self.fmt.make_leaf(
                            2,
                            host.pfn.align_down(pages),
                            SpteAccess {
                                read: true,
                                write: !slot.is_readonly(),
                                exec: true,
                                user: true,
                            },
                            host.writable,
                            true,
                            false,
                        );
                        if it.try_set(Spte(FROZEN_SPTE)) {
                            self.zap_subtree_leaves(spte.pfn(), 1);
                            self.stats.account_tables(-1);
                            defer_free_tree(&self.arena, self.config.geometry, spte.pfn(), 1);
                            it.sptep().store(leaf.0, Ordering::Release);
                            it.refresh();
                            self.stats.account_leaf(2, 1);
                            MmuStats::inc(&self.stats.local().huge_pages_recovered);
                            flush = true;
                        }
                    }
                }
                it.next();
            }
        }
        self.discharge(PendingFlush::new(flush));
        drop(guard);
    }
}

/// The MMU's subscription to memslot changes.
pub(super) struct SlotObserver(pub(super) std::sync::Weak<TdpMmu>);

impl MemslotObserver for SlotObserver {
    fn flush_memslot(&self, slot: &Memslot) {
        // A slot being deleted or moved: drop every mapping of it.
        if let Some(mmu) = self.0.upgrade() {
            let guard = mmu.lock.write();
            let flush = mmu.zap_gfn_range(
                &guard,
                slot.as_id(),
                slot.base_gfn(),
                slot.base_gfn().add(slot.npages()),
            );
            mmu.discharge(flush);
        }
    }

    fn commit(&self, change: MemslotChange, old: Option<&Memslot>, new: Option<&Memslot>, _generation: u64) {
        let Some(mmu) = self.0.upgrade() else { return };
        // Creation needs nothing: MMIO SPTEs carry the old generation and
        // are replaced at their next use.
        if change != MemslotChange::FlagsOnly {
            return;
        }
        let (Some(old), Some(new)) = (old, new) else { return };
        match (old.logs_dirty_pages(), new.logs_dirty_pages()) {
            (false, true) => {
                // With manual protect and an initially-set bitmap every page
                // counts as dirty already; protection comes with each clear.
                let cfg = mmu.slots.config();
                if cfg.manual_dirty_log_protect && cfg.dirty_log_initially_set {
                    return;
                }
                let guard = mmu.lock.write();
                let end = new.base_gfn().add(new.npages());
                let flush = mmu.write_protect_range(&guard, new.as_id(), new.base_gfn(), end, true);
                mmu.discharge(flush);
            }
            (true, false) => mmu.recover_huge_pages(new),
            _ => {}
        }
    }
}
