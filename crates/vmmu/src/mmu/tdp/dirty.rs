//! Dirty logging in the TDP MMU (KVM's `kvm_mmu_slot_apply_flags`,
//! `kvm_get_dirty_log_protect`, `kvm_clear_dirty_log_protect`,
//! `kvm_arch_mmu_enable_log_dirty_pt_masked`, `kvm_mmu_recover_huge_pages`).
//!
//! - **Starting** logging on a slot splits its huge SPTEs (eager page
//!   splitting, when on) and write-protects its leaves (hardware W cleared,
//!   MMU-writable kept), so the first write to each page faults. With
//!   manual protect and an initially-set bitmap nothing happens: every page
//!   counts as dirty until the VMM clears its bit.
//! - Such a write is fixed on the lockless fast path ([`super::fast`]): the
//!   SPTE gets W back with one compare-exchange and the page is marked
//!   dirty. The fast path never makes a **huge** SPTE writable in a logging
//!   slot (it could log only one of its pages): that write takes the slow
//!   path, which maps 4K.
//! - **Harvesting** (`get_dirty_log`, `clear_dirty_log` with manual
//!   protect, a dirty-ring reset) protects the pages whose bits it takes:
//!   huge leaves over them are split (eager splitting) or, where no frame
//!   is left or splitting is off, write-protected whole; 4K leaves are
//!   write-protected. TLBs are flushed before it returns whenever it took
//!   any bit, whether or not an SPTE changed: an SPTE can lose W without a
//!   flush (aging makes it access-tracked, `clear_young` does not flush),
//!   and the vCPU's writable translation must not outlive the harvest.
//! - **Stopping** logging recovers huge pages in place: a table is replaced
//!   by one huge SPTE where the memslot and the host mapping allow it,
//!   reading the host level under `mmu_lock` with no invalidation in
//!   progress (the second safe use of `host_pfn_mapping_level`, seed 004);
//!   under the NX huge page mitigation the huge SPTE is not executable.
//!
//! In D-bit mode ([`super::DirtyLogMode::DirtyBit`], KVM with PML) SPTEs
//! stay writable and are made clean instead, and a leaf's EPT Dirty bit is
//! the record of the writes to its pages since the last harvest: a harvest
//! logs and cleans the D bits (through the change handler, which also logs
//! a dirty leaf that is zapped or replaced), and flushes so the next write
//! sets D again (the vCPU caches a translation as dirty only if the EPT leaf
//! was). A clear (`clear_dirty_log`) cleans the D bits of the pages it
//! clears without logging them: the VMM copies those pages afterwards.

use std::sync::atomic::Ordering;

use super::TdpMmu;
use super::change::DirtyBit;
use crate::addr::{Gfn, Level};
use crate::mem::{Memslot, MemslotChange, MemslotError, MemslotObserver, stable_host_level};
use crate::mmu::flush::PendingFlush;
use crate::mmu::iter::SpteIter;
use crate::mmu::spte::SpteAccess;
use crate::mmu::stats::MmuStats;
use crate::sync;
use crate::sync::{MmuLockHeld, MmuLockWriteGuard};

/// What to do with a huge leaf over pages that must log their next writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Huge {
    /// Split it (eager page splitting), or write-protect it if no frame is
    /// left for the table.
    Split,
    /// Write-protect it whole.
    Protect,
}

impl TdpMmu {
    /// Makes every write to gfns `start..end` of `as_id` log its page from
    /// now on: huge leaves overlapping the range are split or
    /// write-protected (per `huge`), then 4K leaves are write-protected
    /// (write-protect logging) or made clean (D-bit logging, dropping the
    /// record: the caller starts logging or clears the pages' bits). Splits
    /// take tables from the MMU's split cache; when it is empty the lock
    /// is given up to refill it, and a split that still finds no frame
    /// write-protects instead (eager splitting is best effort, as KVM's).
    fn protect_range(
        &self,
        guard: &mut MmuLockWriteGuard<'_, ()>,
        as_id: u16,
        start: Gfn,
        end: Gfn,
        mut huge: Huge,
    ) -> PendingFlush {
        // Tables unlinked meanwhile (an invalidated root's last reference
        // dropped) are freed only after this guard.
        let epoch = crossbeam_epoch::pin();
        let mut protected = false;
        let entries = self.config.geometry.entries();
        for root in self.roots_of(as_id) {
            let mut it = self.cursor(&epoch, root.pfn(), Level::L1, start);
            while it.valid() && it.gfn() < end {
                let level = it.level();
                let spte = it.old_spte();
                if level == Level::L1
                    && !self.dirty_bit_logging()
                    && it.gfn().raw().is_multiple_of(entries)
                    && it.gfn().add(entries) <= end
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
                if !(spte.is_mmu_present() && spte.is_leaf(level)) {
                    it.next();
                    continue;
                }
                if level > Level::L1 {
                    if huge == Huge::Split {
                        if self.split_for_logging(guard, &mut it, as_id, &mut protected) == Split::NoFrame {
                            // Best effort: what cannot be split from here
                            // on is write-protected.
                            huge = Huge::Protect;
                        }
                        // Split (step into the table), changed meanwhile,
                        // or walked again from the root: look again.
                        continue;
                    }
                    // The fast path never gives a huge leaf its W back in a
                    // logging slot: the next write maps 4K on the slow path.
                    // In D-bit mode too: cleaning it would drop the record of
                    // its other pages.
                    if spte.is_writable(self.fmt) {
                        if !self.set_leaf_bits(&mut it, spte.clear_writable(self.fmt), DirtyBit::Log) {
                            continue;
                        }
                        protected = true;
                    }
                    it.skip_subtree();
                    continue;
                }
                let new = if self.dirty_bit_logging() {
                    spte.clear_dirty(self.fmt)
                } else {
                    spte.clear_writable(self.fmt)
                };
                if new != spte {
                    if !self.set_leaf_bits(&mut it, new, DirtyBit::Keep) {
                        continue; // hardware set A/D meanwhile: retry this SPTE
                    }
                    protected = true;
                }
                it.skip_subtree();
            }
        }
        PendingFlush::new(protected)
    }

    /// Splits the huge leaf at the cursor for logging (see
    /// [`TdpMmu::protect_range`]). When the split cache is empty, the lock
    /// is given up to refill it (KVM's `tdp_mmu_alloc_sp_for_split`), and
    /// the cursor restarts from the root, as what it read is stale. Before
    /// the lock goes, the flush owed for what was write-protected so far
    /// (`owed`) is done: no thread may find an SPTE write-protected while a
    /// TLB still holds it writable.
    fn split_for_logging(
        &self,
        guard: &mut MmuLockWriteGuard<'_, ()>,
        it: &mut SpteIter<'_>,
        as_id: u16,
        owed: &mut bool,
    ) -> Split {
        let mut cache = self.split_cache.lock();
        if cache.is_empty() {
            drop(cache);
            self.discharge_logging(PendingFlush::new(std::mem::take(owed)));
            let topped = guard.unlocked(|| self.split_cache.lock().topup(1));
            it.restart();
            return if topped.is_ok() {
                Split::Restarted
            } else {
                tracing::trace!(target: "kvm_mmu_split_huge_page", gfn = it.gfn().raw(), errno = "ENOMEM");
                Split::NoFrame
            };
        }
        if self.split_huge_spte(&*guard, it, as_id, &mut cache) {
            Split::Done
        } else {
            Split::Changed
        }
    }

    /// Discharges a flush owed by dirty logging's protection (enabling,
    /// harvests, ring resets), unless the test-only
    /// [`sync::Bug::SkipDirtyLogFlush`] is armed.
    pub(super) fn discharge_logging(&self, flush: PendingFlush) {
        if sync::bug(sync::Bug::SkipDirtyLogFlush) {
            flush.waive("injected bug: dirty logging's protection skips its flush");
        } else {
            self.discharge(flush);
        }
    }

    /// `KVM_GET_DIRTY_LOG`: the slot's dirty bitmap; without manual
    /// protect the bits are cleared and their pages protected, with TLBs
    /// flushed before this returns.
    pub fn get_dirty_log(&self, as_id: u16, slot_id: u16) -> Result<Vec<u64>, MemslotError> {
        if self.dirty_ring_size().is_some() {
            return Err(MemslotError::DirtyRingEnabled);
        }
        let mut guard = self.lock.write();
        let bitmap = if self.dirty_bit_logging() {
            // Move the hardware's D bits into the bitmap and clean them;
            // the flush makes every later write set D again.
            let flush = self.harvest_dirty_bits(&guard, as_id, slot_id)?;
            self.discharge_logging(flush);
            self.slots.get_dirty_log(as_id, slot_id)?
        } else {
            let bitmap = self.slots.get_dirty_log(as_id, slot_id)?;
            if !self.slots.config().manual_dirty_log_protect {
                let flush = self.protect_bitmap(&mut guard, as_id, slot_id, 0, &bitmap)?;
                self.discharge_logging(flush);
            }
            bitmap
        };
        drop(guard);
        // The nested MMU maps the same pages for L2 (after the lock: the
        // nested MMU's lock comes first in the lock order).
        if !self.slots.config().manual_dirty_log_protect
            && let Some(t) = self.tracker.get()
        {
            t.protect_logged(as_id, slot_id, 0, &bitmap);
        }
        Ok(bitmap)
    }

    /// `KVM_CLEAR_DIRTY_LOG` (manual protect): clears the bits of `mask`
    /// from `first_page` and protects the pages that were dirty.
    pub fn clear_dirty_log(&self, as_id: u16, slot_id: u16, first_page: u64, mask: &[u64]) -> Result<(), MemslotError> {
        if self.dirty_ring_size().is_some() {
            return Err(MemslotError::DirtyRingEnabled);
        }
        let mut guard = self.lock.write();
        let cleared = self.slots.clear_dirty_log(as_id, slot_id, first_page, mask)?;
        let flush = self.protect_bitmap(&mut guard, as_id, slot_id, first_page, &cleared)?;
        self.discharge_logging(flush);
        drop(guard);
        if let Some(t) = self.tracker.get() {
            t.protect_logged(as_id, slot_id, first_page, &cleared);
        }
        Ok(())
    }

    /// D-bit mode: every dirty leaf of the slot made clean, its pages
    /// logged by the change handler.
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
        let epoch = crossbeam_epoch::pin();
        let (start, end) = (slot.base_gfn(), slot.base_gfn().add(slot.npages()));
        let mut cleaned = false;
        for root in self.roots_of(as_id) {
            let mut it = self.cursor(&epoch, root.pfn(), Level::L1, start);
            while it.valid() && it.gfn() < end {
                let spte = it.old_spte();
                let level = it.level();
                if spte.is_mmu_present() && spte.is_leaf(level) {
                    if spte.is_dirty(self.fmt) {
                        if !self.set_spte_atomic(&mut it, as_id, spte.clear_dirty(self.fmt), DirtyBit::Log) {
                            continue;
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

    /// Protects the pages whose bits are set in `bits` (bit 0 is page
    /// `first_page` of the slot), as a harvest that took those bits must
    /// (see the module documentation): the flush is owed if any bit is
    /// set, whatever the SPTEs were.
    pub(super) fn protect_bitmap(
        &self,
        guard: &mut MmuLockWriteGuard<'_, ()>,
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
        let huge = if self.config.eager_page_split {
            Huge::Split
        } else {
            Huge::Protect
        };
        // KVM flushes when it reaped any bit, not when an SPTE changed
        // (`kvm_get_dirty_log_protect`, `kvm_clear_dirty_log_protect`).
        let mut flush = PendingFlush::new(
            bits.iter().any(|&w| w != 0) && !crate::sync::bug(crate::sync::Bug::HarvestFlushByChange),
        );
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
                        flush = flush.merge(self.protect_range(guard, as_id, Gfn::new(s), Gfn::new(e), huge));
                        Some((start, start + len))
                    }
                    None => Some((start, start + len)),
                };
                word &= !(((1u128 << (lo + len)) - 1) as u64);
            }
        }
        if let Some((s, e)) = run {
            flush = flush.merge(self.protect_range(guard, as_id, Gfn::new(s), Gfn::new(e), huge));
        }
        Ok(flush)
    }

    /// Logging starts on `slot` (KVM's `kvm_mmu_slot_apply_flags`): split
    /// and protect it whole, unless every page counts as dirty already
    /// (manual protect with an initially-set bitmap: huge pages are dealt
    /// with at each clear instead).
    fn start_dirty_logging(&self, slot: &Memslot) {
        let cfg = self.slots.config();
        if cfg.manual_dirty_log_protect && cfg.dirty_log_initially_set {
            return;
        }
        let mut guard = self.lock.write();
        let end = slot.base_gfn().add(slot.npages());
        let huge = if self.config.eager_page_split {
            Huge::Split
        } else {
            Huge::Protect
        };
        let flush = self.protect_range(&mut guard, slot.as_id(), slot.base_gfn(), end, huge);
        self.discharge_logging(flush);
    }

    /// Logging was turned off: replace tables by one huge leaf where the
    /// memslot, the configured largest leaf and the host mapping allow it
    /// (in place, largest first; KVM's `kvm_mmu_recover_huge_pages`), or
    /// zap them for faults to map huge again, as the policy says
    /// ([`HugeRecovery`], seed 004).
    fn recover_huge_pages(&self, slot: &Memslot) {
        let policy = self.huge_recovery();
        let guard = self.lock.write();
        let epoch = crossbeam_epoch::pin();
        let start = slot.base_gfn();
        let end = start.add(slot.npages());
        let max = Level::new(self.config.max_level.clamp(1, 3)).expect("clamped to a leaf level");
        let mut flush = false;
        for root in self.roots_of(slot.as_id()) {
            let mut it = self.cursor(&epoch, root.pfn(), Level::L2, start);
            while it.valid() && it.gfn() < end {
                let spte = it.old_spte();
                let level = it.level();
                if level > Level::L3 || !spte.is_mmu_present() || spte.is_leaf(level) {
                    it.next();
                    continue;
                }
                let pages = self.config.geometry.pages(level);
                let gfn = it.gfn();
                let huge = level;
                if gfn.raw() >= start.raw()
                    && gfn.raw() + pages <= end.raw()
                    && slot.max_mapping_level(gfn, max) >= huge
                    // No huge leaf over a gfn the nested MMU tracks.
                    && !self
                        .tracker
                        .get()
                        .is_some_and(|t| t.any_tracked() && t.is_tracked(gfn, gfn.add(pages)))
                    && let Some(hva) = slot.gfn_to_hva(gfn)
                    // What may consume the host level here (seed 004).
                    && match policy {
                        HugeRecovery::InPlaceNotifierChecked => {
                            matches!(stable_host_level(&self.host, &self.invalidate, &guard, hva), Ok(Some(l)) if l >= huge)
                        }
                        HugeRecovery::InPlaceExistingLeaf => self.maps_gfn(&epoch, root.pfn(), gfn),
                        // Rule 3 (a zap decision), and the unsafe check of
                        // the table alone: the lookup below decides.
                        HugeRecovery::ZapCollapsible | HugeRecovery::InPlaceNonLeaf => true,
                    }
                    && let Some(host) = self.host.lookup(hva)
                    && host.level >= huge
                {
                    if policy == HugeRecovery::ZapCollapsible {
                        // KVM's `kvm_mmu_zap_collapsible_sptes`: the next
                        // fault maps the region huge, by the retry protocol.
                        self.zap_spte(&guard, &mut it, slot.as_id());
                        MmuStats::inc(&self.stats.local().huge_pages_zapped_collapsible);
                        flush = true;
                        it.next();
                        continue;
                    }
                    let access = SpteAccess {
                        read: true,
                        write: !slot.is_readonly(),
                        exec: true,
                        user: true,
                    };
                    let leaf = self.make_leaf(level, host.pfn.align_down(pages), access, host.writable);
                    if self.set_spte_atomic(&mut it, slot.as_id(), leaf, DirtyBit::Log) {
                        MmuStats::inc(&self.stats.local().huge_pages_recovered);
                        flush = true;
                        it.skip_subtree();
                    }
                    continue;
                }
                it.next();
            }
        }
        self.discharge(PendingFlush::new(flush));
        drop(guard);
    }
}

impl TdpMmu {
    /// Seed 004's policy: how huge pages come back after dirty logging.
    pub fn set_huge_recovery(&self, how: HugeRecovery) {
        self.huge_recovery.store(how as u8, Ordering::Relaxed);
    }

    /// The policy [`TdpMmu::set_huge_recovery`] set.
    pub fn huge_recovery(&self) -> HugeRecovery {
        match self.huge_recovery.load(Ordering::Relaxed) {
            0 => HugeRecovery::InPlaceNotifierChecked,
            1 => HugeRecovery::InPlaceExistingLeaf,
            2 => HugeRecovery::ZapCollapsible,
            _ => HugeRecovery::InPlaceNonLeaf,
        }
    }

    /// Whether a present leaf SPTE of the tree at `root` maps `gfn`.
    fn maps_gfn(&self, epoch: &crossbeam_epoch::Guard, root: crate::addr::Pfn, gfn: Gfn) -> bool {
        let mut it = self.cursor(epoch, root, Level::L1, gfn);
        while it.step_down() {}
        let spte = it.old_spte();
        spte.is_mmu_present() && spte.is_leaf(it.level())
    }
}

/// How huge pages come back when a memslot stops logging dirty pages, and
/// what a promotion checks before it consumes the host mapping level: seed
/// 004's rules for `host_pfn_mapping_level` ([`crate::mem::invalidate`]),
/// a runtime policy of the TDP MMU ([`TdpMmu::set_huge_recovery`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HugeRecovery {
    /// In place under `mmu_lock`, where no invalidation of the hva is in
    /// progress, checked explicitly (rule 2 by the notifier state).
    #[default]
    InPlaceNotifierChecked,
    /// In place under `mmu_lock`, where a leaf SPTE maps the region's first
    /// gfn (rule 2 by an existing valid mapping: an invalidation in
    /// progress has zapped it, and no fault installs it again before the
    /// invalidation ends; the host changes a huge mapping only as a whole,
    /// so one page's witness covers the region the host level is read
    /// for). What the comment says in-place promotion needs.
    InPlaceExistingLeaf,
    /// Zap each table the host level would allow as a huge page (rule 3:
    /// the level decides a zap, never a mapping); the next fault maps the
    /// region huge under the retry protocol (rule 1). KVM's
    /// `kvm_mmu_zap_collapsible_sptes`, before in-place recovery.
    ZapCollapsible,
    /// Unsafe: in place wherever a non-leaf SPTE is present ("unsafe if
    /// the caller only checks that there's a non-leaf SPTE"): an
    /// invalidation in progress has zapped the leaves below but not the
    /// table, and the level and frame read in the middle of the host's
    /// change are installed.
    InPlaceNonLeaf,
}

/// How an eager split of one huge leaf went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    /// The leaf is a table now; the cursor holds it.
    Done,
    /// The SPTE changed meanwhile; the cursor holds the value found.
    Changed,
    /// The lock was given up to refill the split cache; the cursor walked
    /// again from the root.
    Restarted,
    /// No frame is left for the table (the cursor walked again too).
    NoFrame,
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
            (false, true) => mmu.start_dirty_logging(new),
            (true, false) => mmu.recover_huge_pages(new),
            _ => {}
        }
    }
}
