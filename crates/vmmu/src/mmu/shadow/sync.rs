//! Unsync shadow pages and their sync (KVM's `mmu_try_to_unsync_pages`,
//! `kvm_mmu_sync_roots`, `mmu_sync_children`, `FNAME(sync_spte)`,
//! `kvm_mmu_invalidate_addr`).
//!
//! A guest page table is write-protected so that the MMU sees every change
//! to it. For a table that the guest rewrites often (a process's page table
//! while it maps and unmaps), trapping every write costs more than it
//! saves: when a fault wants a writable mapping of a guest table whose
//! every shadow page is a 4K page table, those pages go **unsync** instead.
//! The guest then writes its table freely; its SPTEs may lag behind it,
//! which x86 allows until the guest flushes its TLB for the address. So the
//! MMU syncs on the guest's flushes:
//!
//! - MOV to CR3 that flushes, a root load, INVPCID of all contexts or of
//!   the current PCID, a CR4.PGE toggle: every unsync page below the roots
//!   ([`ShadowMmu::sync_roots`]): write-protect their guest tables, flush
//!   every vCPU's TLB (so no write can slip in unseen), then compare each
//!   SPTE with its guest entry now and drop the ones that differ;
//! - INVLPG, INVPCID of one address, an injected #PF: the one SPTE of the
//!   address ([`ShadowMmu::sync_addr`]), leaving its page unsync;
//! - a page found in the hash to be linked at a new place: synced first,
//!   so that a fresh path never shows stale SPTEs.
//!
//! **Only 4K shadow pages may be unsync** (seed 000): an upper-level SPTE
//! that lagged behind its guest entry would map whole tables wrongly, and a
//! root is where every sync starts. [`Pages::mark_unsync`] takes a
//! [`LeafPage`](super::page::LeafPage), which only a level-1 indirect page
//! can be; [`ShadowMmu::sync_roots`] asserts that no root is unsync; when a
//! guest table becomes an upper-level table, its unsync pages are zapped.
//!
//! A sync compares each present SPTE with the guest entry it was built
//! from (recorded at install, with A set and D as the SPTE assumed): the
//! SPTE stays if the entry is still present and accessed, differs in no bit
//! but A/D, and is still dirty if the SPTE assumed so (a writable SPTE for
//! a clean entry would skip the guest's D update). Otherwise it is dropped
//! and the next access faults it back in from the guest's table.

use std::sync::atomic::Ordering;

use super::ShadowMmu;
use super::page::{ENTRIES, LeafPage, PageId, Pages, SptePtr};
use super::roots::ShadowRoots;
use crate::addr::{Gpa, Gva, Level};
use crate::mmu::flush::PendingFlush;
use crate::mmu::stats::MmuStats;

/// Seed 000: what the sync of a vCPU's roots checks of a root before it
/// walks the root's unsync children (KVM's `kvm_mmu_sync_roots`). A
/// runtime policy of the shadow MMU ([`ShadowMmu::set_unsync_policy`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SyncRootsCheck {
    /// `unsync_children` only (the thread's patch): only 4K pages may be
    /// unsync, so a root never is.
    #[default]
    UnsyncChildren,
    /// `unsync || unsync_children` (before the patch): the root's own
    /// `unsync`, always false, read too.
    UnsyncOrUnsyncChildren,
}

/// Seed 000's rule: which shadow pages may go unsync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum UnsyncLevels {
    /// 4K pages only (KVM's `WARN_ON(sp->role.level != PG_LEVEL_4K)` in
    /// `kvm_unsync_page`; here also a type, `LeafPage`).
    #[default]
    FourK,
    /// **Unsafe**, for the experiment: a guest table that upper-level
    /// shadow pages shadow too is let written without a trap (its 4K
    /// pages go unsync; the upper-level pages, which the type does not
    /// let be marked unsync and no sync visits, go stale, as a non-4K
    /// unsync page would).
    AnyLevel,
}

impl ShadowMmu {
    /// Seed 000's policies: what a sync of roots checks, and which pages
    /// may go unsync (the unsafe [`UnsyncLevels::AnyLevel`] is for the
    /// experiment that shows the checker catching it).
    pub fn set_unsync_policy(&self, check: SyncRootsCheck, levels: UnsyncLevels) {
        let v =
            u8::from(check == SyncRootsCheck::UnsyncOrUnsyncChildren) | u8::from(levels == UnsyncLevels::AnyLevel) << 1;
        self.unsync_policy.store(v, Ordering::Relaxed);
    }

    /// KVM's `mmu_try_to_unsync_pages`: if every shadow page of the guest
    /// table `gfn` is a 4K page, marks them unsync and returns true (the
    /// caller maps `gfn` writable); otherwise the table stays
    /// write-protected.
    pub(super) fn try_unsync(&self, pages: &mut Pages, gfn: crate::addr::Gfn) -> bool {
        let ids = pages.indirect_of(gfn).to_vec();
        let leaves: Vec<LeafPage> = ids.iter().filter_map(|&id| pages.leaf(id)).collect();
        let any_level = self.unsync_policy.load(Ordering::Relaxed) & 2 != 0;
        if leaves.len() != ids.len() && !any_level {
            return false;
        }
        for leaf in leaves {
            if pages.mark_unsync(leaf) {
                // Counted before the writable SPTE is stored (release): a
                // guest write through that SPTE, then its flush, finds the
                // count non-zero (KVM's ordering argument in
                // `mmu_try_to_unsync_pages`).
                self.unsync_pages.fetch_add(1, Ordering::AcqRel);
                MmuStats::inc(&self.stats.local().mmu_unsync);
                tracing::trace!(target: "kvm_mmu_unsync_page", gfn = gfn.raw(), level = 1u8);
            }
        }
        true
    }

    /// Syncs a page found in the hash before it is linked at a new place:
    /// an unsync 4K page's SPTEs are brought up to date (it stays unsync,
    /// as in KVM's `kvm_mmu_find_shadow_page`); a page with unsync pages
    /// below is synced whole. Returns whether a flush is owed.
    pub(super) fn sync_before_link(&self, pages: &mut Pages, id: PageId) -> PendingFlush {
        match pages.leaf(id) {
            Some(leaf) if pages.page(id).is_unsync() => self.sync_leaf_entries(pages, leaf),
            _ => self.sync_children(pages, id),
        }
    }

    /// KVM's `mmu_sync_children`: syncs every unsync page below `id`.
    /// Returns whether a flush is owed.
    fn sync_children(&self, pages: &mut Pages, id: PageId) -> PendingFlush {
        let mut leaves = Vec::new();
        self.collect_unsync(pages, id, &mut leaves);
        if leaves.is_empty() {
            return PendingFlush::none();
        }
        // Write-protect the guest tables and flush before reading them: a
        // vCPU holding a writable translation could otherwise write an
        // entry after it was compared, and the page, marked sync, would
        // never see it.
        let mut protected = PendingFlush::none();
        for leaf in &leaves {
            let gfn = pages.page(leaf.id()).gfn;
            protected |= self.write_protect_gfn(pages, gfn);
            // And in the other MMUs that were let map it writable (their
            // flush is done when this returns).
            self.protect_elsewhere(gfn);
        }
        self.discharge(protected);
        let mut flush = PendingFlush::none();
        for leaf in leaves {
            // Reachable by several paths: sync once.
            if !pages.page(leaf.id()).is_unsync() {
                continue;
            }
            flush |= self.sync_leaf_entries(pages, leaf);
            pages.mark_sync(leaf);
            self.unsync_pages.fetch_sub(1, Ordering::AcqRel);
            MmuStats::inc(&self.stats.local().mmu_synced);
            tracing::trace!(target: "kvm_mmu_sync_page", gfn = pages.page(leaf.id()).gfn.raw(), level = 1u8);
        }
        flush
    }

    /// The unsync 4K pages below `id`, found through the unsync-children
    /// bitmaps (KVM's `mmu_unsync_walk`).
    fn collect_unsync(&self, pages: &Pages, id: PageId, out: &mut Vec<LeafPage>) {
        let page = pages.page(id);
        for index in page.unsync_child_indexes() {
            let spte = Pages::spte(
                &self.arena,
                SptePtr {
                    table: page.pfn,
                    index: index as u16,
                },
            );
            let child = spte.is_mmu_present().then(|| pages.by_pfn(spte.pfn())).flatten();
            let Some(child) = child else {
                debug_assert!(false, "an unsync-children bit for an empty entry");
                continue;
            };
            match pages.leaf(child) {
                Some(leaf) if pages.page(child).is_unsync() => out.push(leaf),
                _ => self.collect_unsync(pages, child, out),
            }
        }
    }

    /// Brings every present SPTE of an unsync 4K page up to date with its
    /// guest table (KVM's `kvm_sync_page`). Returns whether a flush is owed.
    fn sync_leaf_entries(&self, pages: &mut Pages, leaf: LeafPage) -> PendingFlush {
        let page = pages.page(leaf.id());
        let (pfn, table) = (page.pfn, GuestTable::of(page));
        let mut buf = vec![0u8; 4096];
        // Guest tables with no memslot behind them, or not resident (read
        // without faulting under the lock), read as zeros: every SPTE of
        // the page is dropped.
        if self
            .memory
            .read_atomic(table.gpa(0).align_down(4096), &mut buf)
            .is_err()
        {
            buf.fill(0);
        }
        let mut flush = PendingFlush::none();
        for index in 0..ENTRIES {
            let ptr = SptePtr {
                table: pfn,
                index: index as u16,
            };
            if !Pages::spte(&self.arena, ptr).is_mmu_present() {
                continue;
            }
            let now = table.entry(&buf, index);
            let recorded = pages.page(leaf.id()).gpte(index).unwrap_or(0);
            if !pages.page(leaf.id()).role.gpte_bits().still_valid(recorded, now) {
                flush |= self.drop_spte(pages, ptr, Level::L1);
            }
        }
        flush
    }

    /// Syncs the one SPTE at `index` of an unsync 4K page (KVM's
    /// `FNAME(sync_spte)` from INVLPG). Returns whether a flush is owed.
    fn sync_leaf_entry(&self, pages: &mut Pages, leaf: LeafPage, index: usize) -> PendingFlush {
        let page = pages.page(leaf.id());
        let ptr = SptePtr {
            table: page.pfn,
            index: index as u16,
        };
        if !Pages::spte(&self.arena, ptr).is_mmu_present() {
            return PendingFlush::none();
        }
        let table = GuestTable::of(page);
        // Read without faulting (the lock is held): an entry not resident
        // reads as not present, and the SPTE is dropped.
        let mut b = [0u8; 8];
        let now = match self.memory.read_atomic(table.gpa(index), &mut b[..table.entry_size()]) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        };
        let recorded = page.gpte(index).unwrap_or(0);
        if page.role.gpte_bits().still_valid(recorded, now) {
            return PendingFlush::none();
        }
        self.drop_spte(pages, ptr, Level::L1)
    }

    /// Runs `sync` under the lock when some page is unsync and `roots` are
    /// still valid (if not, the vCPU reloads them), then discharges the
    /// flush it owes.
    fn sync_under_lock(&self, roots: &ShadowRoots, sync: impl FnOnce(&mut Pages) -> PendingFlush) {
        if crate::sync::bug(crate::sync::Bug::SkipUnsyncSync) {
            return;
        }
        // The lockless check of seed 000: a guest write through an unsync
        // mapping happens after the count went up (see `try_unsync`), and
        // the flush asking for this sync after that write.
        if self.unsync_pages.load(Ordering::Acquire) == 0 {
            MmuStats::inc(&self.stats.local().mmu_sync_roots_lockless_skip);
            return;
        }
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        if !self.roots_valid(pages, roots) {
            return;
        }
        let flush = sync(pages);
        self.discharge(flush);
    }

    /// Syncs every unsync page below `roots` (KVM's `kvm_mmu_sync_roots`),
    /// for a guest TLB flush that covers the whole address space.
    pub fn sync_roots(&self, roots: &ShadowRoots) {
        self.sync_under_lock(roots, |pages| {
            let mut flush = PendingFlush::none();
            let check_unsync = self.unsync_policy.load(Ordering::Relaxed) & 1 != 0;
            for id in roots.pages() {
                let root = pages.page(id);
                // Only 4K pages may be unsync; a root never is (seed 000).
                assert!(!root.is_unsync(), "a root shadow page is unsync");
                MmuStats::inc(&self.stats.local().mmu_sync_roots_checked);
                let walk = if check_unsync {
                    root.is_unsync() || root.unsync_child_count() > 0
                } else {
                    root.unsync_child_count() > 0
                };
                if walk {
                    MmuStats::inc(&self.stats.local().mmu_sync_roots_walked);
                    flush |= self.sync_children(pages, id);
                }
            }
            flush
        });
    }

    /// Syncs the SPTE translating `gva` below `roots`, if its page is
    /// unsync (KVM's `__kvm_mmu_invalidate_addr`), for INVLPG and friends.
    /// `gva` is the linear address (32 bits in legacy modes).
    pub fn sync_addr(&self, roots: &ShadowRoots, gva: Gva) {
        self.sync_under_lock(roots, |pages| {
            let Some(mut id) = roots.try_root_for(gva) else {
                return PendingFlush::none();
            };
            loop {
                let page = pages.page(id);
                let level = page.role.level();
                let index = level.table_index(gva.raw());
                if level == Level::L1 {
                    return match pages.leaf(id).filter(|_| page.is_unsync()) {
                        Some(leaf) => self.sync_leaf_entry(pages, leaf, index),
                        None => PendingFlush::none(),
                    };
                }
                if !page.unsync_child(index) {
                    return PendingFlush::none();
                }
                let ptr = SptePtr {
                    table: page.pfn,
                    index: index as u16,
                };
                let spte = Pages::spte(&self.arena, ptr);
                match spte.is_mmu_present().then(|| pages.by_pfn(spte.pfn())).flatten() {
                    Some(child) => id = child,
                    None => return PendingFlush::none(),
                }
            }
        });
    }

    /// Unsync pages now.
    pub fn unsync_page_count(&self) -> u64 {
        self.unsync_pages.load(Ordering::Acquire)
    }
}

/// The guest table a 4K shadow page shadows: its gfn, and for 4-byte
/// entries the half (quadrant) of the 1024-entry table. Where the guest
/// entry behind each SPTE index lives (for sync, prefetch and the audit).
pub(super) struct GuestTable(crate::addr::Gfn, Option<u8>);

impl GuestTable {
    /// The guest table of a 4K shadow page.
    pub(super) fn of(page: &super::page::ShadowPage) -> GuestTable {
        let role = page.role;
        GuestTable(page.gfn, role.has_4_byte_gpte().then_some(role.quadrant()))
    }

    /// The size of its entries in bytes.
    pub(super) fn entry_size(&self) -> usize {
        if self.1.is_some() { 4 } else { 8 }
    }

    /// The byte offset of the guest entry shadowed by SPTE `index`.
    fn offset(&self, index: usize) -> usize {
        match self.1 {
            Some(q) => 4 * (usize::from(q) * ENTRIES + index),
            None => 8 * index,
        }
    }

    /// The guest-physical address of the entry shadowed by SPTE `index`.
    pub(super) fn gpa(&self, index: usize) -> Gpa {
        Gpa::new((self.0.raw() << 12) + self.offset(index) as u64)
    }

    /// The entry shadowed by SPTE `index`, from the table's bytes.
    fn entry(&self, page: &[u8], index: usize) -> u64 {
        let o = self.offset(index);
        match self.1 {
            Some(_) => u64::from(u32::from_le_bytes(
                page[o..o + 4].try_into().expect("a 4-byte range converts to [u8; 4]"),
            )),
            None => u64::from_le_bytes(page[o..o + 8].try_into().expect("an 8-byte range converts to [u8; 8]")),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::walker::GpteBits;

    #[test]
    fn a_synced_spte_stays_only_while_its_guest_entry_translates_the_same() {
        let x86 = GpteBits::X86;
        let (a, d) = (x86.accessed, x86.dirty);
        let valid = |rec, now| x86.still_valid(rec, now);
        let rec = 0x5000 | 0x7 | a; // clean: the SPTE was made read-only
        assert!(valid(rec, rec));
        assert!(valid(rec, rec | d), "dirtied since");
        assert!(!valid(rec, rec & !a), "accessed cleared: the walk must set it again");
        assert!(!valid(rec, rec & !1), "not present");
        assert!(!valid(rec, rec ^ 0x1000), "another frame");
        assert!(!valid(rec, rec & !2), "write removed");
        assert!(!valid(rec, rec | 1 << 63), "XD set");
        let dirty = rec | d; // the SPTE is writable
        assert!(!valid(dirty, rec), "cleaned: writes must set D again");
    }

    /// EPT: present is any of R/W/X (execute-only too), A/D at bits 8/9;
    /// without A/D flags nothing is compared but the entry itself.
    #[test]
    fn ept_guest_entries_are_read_by_their_own_bits() {
        let ept = GpteBits::ept(true);
        let rec = 0x5000 | 0x4 | ept.accessed; // execute-only, used
        assert!(ept.still_valid(rec, rec));
        assert!(!ept.still_valid(rec, rec & !ept.accessed), "accessed cleared");
        assert!(!ept.still_valid(rec, rec & !0x4), "not present");
        assert!(!ept.still_valid(rec, rec | 0x1), "readable now: another translation");
        assert!(
            !GpteBits::X86.still_valid(rec, rec),
            "bit 0 clear is not present in x86"
        );
        let no_ad = GpteBits::ept(false);
        assert!(no_ad.is_used(0x5000 | 0x1), "no A bit: present is used");
        assert!(no_ad.still_valid(0x5007, 0x5007));
        assert!(
            !no_ad.still_valid(0x5007 | 1 << 8, 0x5007),
            "bit 8 is no A bit: compared"
        );
    }
}
