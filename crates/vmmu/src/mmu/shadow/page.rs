//! Shadow pages and their bookkeeping (KVM's `struct kvm_mmu_page`, the
//! page hash, parent pointers, rmaps and gfn write tracking).
//!
//! Everything here runs under the shadow MMU's lock, held for writing (the
//! shadow MMU, like KVM's, never changes shadow pages under the read
//! lock). The SPTEs themselves live in host frames as `AtomicU64`s: the
//! hardware model walks them concurrently and sets their A/D bits.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::role::Role;
use crate::addr::{Gfn, Level, Pfn};
use crate::host::FrameArena;
use crate::mmu::spte::Spte;

/// Entries per shadow table.
pub const ENTRIES: usize = 512;

/// No translation recorded for an entry.
const NO_GFN: u64 = u64::MAX;

/// Where an SPTE lives: its table's frame and its index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SptePtr {
    /// The frame of the table.
    pub table: Pfn,
    /// The entry's index.
    pub index: u16,
}

impl SptePtr {
    /// The entry.
    pub fn get<'a>(&self, arena: &'a FrameArena) -> &'a AtomicU64 {
        &arena.table(self.table)[self.index as usize]
    }
}

/// Index of a shadow page in [`Pages`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId(usize);

/// A shadow page proven to be a 4K page table shadowing a guest page table
/// (level 1, indirect): the only kind of page that may be unsync (the rule
/// of KVM's `kvm_unsync_page`, seed 000). Only [`Pages::leaf`] makes one,
/// and only [`Pages::mark_unsync`] sets a page unsync, so a root or an
/// upper-level page cannot be made unsync; code outside this module cannot
/// forge one:
///
/// ```compile_fail
/// use vmmu::mmu::shadow::page::{LeafPage, PageId};
/// fn forge(id: PageId) -> LeafPage {
///     LeafPage(id) // the field is private
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafPage(PageId);

impl LeafPage {
    /// The page.
    pub fn id(self) -> PageId {
        self.0
    }
}

/// Words of an unsync-children bitmap (one bit per entry).
const BITMAP_WORDS: usize = ENTRIES / 64;

/// One shadow page table.
#[derive(Debug)]
pub struct ShadowPage {
    /// The frame holding its SPTEs.
    pub pfn: Pfn,
    /// The guest table it shadows, or the first gfn a direct page maps.
    pub gfn: Gfn,
    /// Its role.
    pub role: Role,
    /// SPTEs that point to it.
    pub parents: Vec<SptePtr>,
    /// vCPUs using it as a root.
    pub root_count: u32,
    /// Emulated writes to its guest table since it was last used for a
    /// translation (KVM's `write_flooding_count`).
    pub write_flooding: u8,
    /// Zapped while still a root: out of the hash, freed at the last
    /// release.
    pub invalid: bool,
    /// Creation order: reclaim takes the oldest first (KVM's
    /// `active_mmu_pages`, newest at the head).
    pub created: u64,
    /// Its SPTEs may be out of date with its guest table, which the guest
    /// writes without trapping (KVM's `unsync`). Only ever set through a
    /// [`LeafPage`].
    unsync: bool,
    /// Entries whose child page is unsync or has unsync children (KVM's
    /// `unsync_child_bitmap`), and how many (`unsync_children`).
    unsync_children: [u64; BITMAP_WORDS],
    unsync_child_count: u16,
    /// For an indirect 4K page: the guest entry each present SPTE was built
    /// from, with A set and D as the SPTE's rights assumed (KVM's
    /// `shadowed_translation`, kept whole so sync compares every bit).
    gptes: Option<Box<[u64; ENTRIES]>>,
}

impl ShadowPage {
    /// Whether the page is unsync.
    pub fn is_unsync(&self) -> bool {
        self.unsync
    }

    /// How many entries lead to unsync pages.
    pub fn unsync_child_count(&self) -> u16 {
        self.unsync_child_count
    }

    /// Whether entry `index` leads to unsync pages.
    pub fn unsync_child(&self, index: usize) -> bool {
        self.unsync_children[index / 64] & (1 << (index % 64)) != 0
    }

    /// Entries that lead to unsync pages.
    pub fn unsync_child_indexes(&self) -> Vec<usize> {
        (0..ENTRIES).filter(|&i| self.unsync_child(i)).collect()
    }

    /// Whether anything at or below the page is unsync.
    pub fn has_unsync(&self) -> bool {
        self.unsync || self.unsync_child_count > 0
    }

    /// The guest entry the SPTE at `index` was built from.
    pub fn gpte(&self, index: usize) -> Option<u64> {
        self.gptes.as_ref().map(|g| g[index])
    }
}

/// The shadow MMU's pages and indexes.
#[derive(Debug, Default)]
pub struct Pages {
    slab: Vec<Option<ShadowPage>>,
    created: u64,
    free_ids: Vec<usize>,
    /// The most pages live at once.
    peak: usize,
    hash: HashMap<(Gfn, Role), PageId>,
    by_pfn: HashMap<Pfn, PageId>,
    /// Indirect pages per guest table gfn: the gfn write tracking.
    indirect: HashMap<Gfn, Vec<PageId>>,
    /// Leaf SPTEs per gfn (the rmap).
    rmap: BTreeMap<Gfn, Vec<SptePtr>>,
}

/// The gfn each leaf SPTE of a table translates, readable without the lock
/// by the hardware model (to report the guest-physical address of a walk).
#[derive(Debug, Default)]
pub struct Translations {
    tables: parking_lot::RwLock<HashMap<Pfn, Arc<[AtomicU64]>>>,
}

impl Translations {
    fn add(&self, table: Pfn) {
        let entries: Arc<[AtomicU64]> = (0..ENTRIES).map(|_| AtomicU64::new(NO_GFN)).collect();
        self.tables.write().insert(table, entries);
    }

    fn remove(&self, table: Pfn) {
        self.tables.write().remove(&table);
    }

    fn set(&self, ptr: SptePtr, gfn: Option<Gfn>) {
        if let Some(t) = self.tables.read().get(&ptr.table) {
            t[ptr.index as usize].store(gfn.map_or(NO_GFN, Gfn::raw), Ordering::Release);
        }
    }

    /// The gfn the leaf SPTE at `ptr` was installed for.
    pub fn get(&self, ptr: SptePtr) -> Option<Gfn> {
        let g = self.tables.read().get(&ptr.table)?[ptr.index as usize].load(Ordering::Acquire);
        (g != NO_GFN).then(|| Gfn::new(g))
    }
}

impl Pages {
    /// The page.
    pub fn page(&self, id: PageId) -> &ShadowPage {
        self.slab[id.0].as_ref().expect("a live page id")
    }

    /// The page, mutably.
    pub fn page_mut(&mut self, id: PageId) -> &mut ShadowPage {
        self.slab[id.0].as_mut().expect("a live page id")
    }

    /// The valid page for (gfn, role).
    pub fn find(&self, gfn: Gfn, role: Role) -> Option<PageId> {
        self.hash.get(&(gfn, role)).copied()
    }

    /// The page whose table is `pfn`.
    pub fn by_pfn(&self, pfn: Pfn) -> Option<PageId> {
        self.by_pfn.get(&pfn).copied()
    }

    /// Live pages (including invalid roots).
    pub fn len(&self) -> usize {
        self.slab.len() - self.free_ids.len()
    }

    /// The most pages live at once so far.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// Pages that reclaim cannot take: roots in use and invalid roots
    /// waiting for their last user.
    pub fn pinned(&self) -> usize {
        self.slab
            .iter()
            .flatten()
            .filter(|p| p.invalid || p.root_count > 0)
            .count()
    }

    /// Whether there are no pages.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `n` pages that can be reclaimed (valid and not used as a
    /// root), oldest first.
    pub fn oldest_reclaimable(&self, n: usize) -> Vec<PageId> {
        let mut v: Vec<(u64, PageId)> = (0..self.slab.len())
            .filter_map(|i| {
                let p = self.slab[i].as_ref()?;
                (!p.invalid && p.root_count == 0).then_some((p.created, PageId(i)))
            })
            .collect();
        v.sort_unstable();
        v.into_iter().take(n).map(|(_, id)| id).collect()
    }

    /// Whether `id` is the page the hash finds for its (gfn, role): false
    /// once it is being zapped.
    pub fn is_hashed(&self, id: PageId) -> bool {
        let p = self.page(id);
        self.hash.get(&(p.gfn, p.role)) == Some(&id)
    }

    /// Whether `id` names a live page.
    pub fn is_live(&self, id: PageId) -> bool {
        self.slab.get(id.0).is_some_and(Option::is_some)
    }

    /// Every live page id.
    pub fn ids(&self) -> Vec<PageId> {
        (0..self.slab.len())
            .filter(|&i| self.slab[i].is_some())
            .map(PageId)
            .collect()
    }

    /// Indirect pages shadowing the guest table at `gfn`.
    pub fn indirect_of(&self, gfn: Gfn) -> &[PageId] {
        self.indirect.get(&gfn).map_or(&[], Vec::as_slice)
    }

    /// Whether guest writes to `gfn` must be trapped (a guest page table).
    pub fn is_write_tracked(&self, gfn: Gfn) -> bool {
        self.indirect.contains_key(&gfn)
    }

    /// Creates a page for (gfn, role) over the zeroed table frame `pfn`
    /// (from a cache topped up before `mmu_lock`).
    pub fn create(&mut self, translations: &Translations, pfn: Pfn, gfn: Gfn, role: Role) -> PageId {
        debug_assert!(role.is_normalised());
        let page = ShadowPage {
            pfn,
            gfn,
            role,
            parents: Vec::new(),
            root_count: 0,
            write_flooding: 0,
            invalid: false,
            created: self.created,
            unsync: false,
            unsync_children: [0; BITMAP_WORDS],
            unsync_child_count: 0,
            gptes: (role.level() == Level::L1 && !role.is_direct()).then(|| Box::new([0; ENTRIES])),
        };
        self.created += 1;
        let id = match self.free_ids.pop() {
            Some(i) => {
                self.slab[i] = Some(page);
                PageId(i)
            }
            None => {
                self.slab.push(Some(page));
                PageId(self.slab.len() - 1)
            }
        };
        self.peak = self.peak.max(self.len());
        self.hash.insert((gfn, role), id);
        self.by_pfn.insert(pfn, id);
        if role.level() == Level::L1 {
            translations.add(pfn);
        }
        if !role.is_direct() {
            self.indirect.entry(gfn).or_default().push(id);
        }
        id
    }

    /// Takes the page out of the hash and the write tracking (it is being
    /// zapped). Returns whether it was the last indirect page of its gfn.
    pub fn unhash(&mut self, id: PageId) -> bool {
        let p = self.page(id);
        let (gfn, role) = (p.gfn, p.role);
        if self.hash.get(&(gfn, role)) == Some(&id) {
            self.hash.remove(&(gfn, role));
        }
        if !role.is_direct()
            && let Some(v) = self.indirect.get_mut(&gfn)
        {
            v.retain(|&x| x != id);
            if v.is_empty() {
                self.indirect.remove(&gfn);
                return true;
            }
        }
        false
    }

    /// Forgets a zapped page and returns its frame (to free after a grace
    /// period).
    pub fn remove(&mut self, id: PageId, translations: &Translations) -> Pfn {
        let page = self.slab[id.0].take().expect("a live page id");
        self.free_ids.push(id.0);
        self.by_pfn.remove(&page.pfn);
        if page.role.level() == Level::L1 {
            translations.remove(page.pfn);
        }
        page.pfn
    }

    /// Records a leaf SPTE for `gfn`.
    pub fn rmap_add(&mut self, gfn: Gfn, ptr: SptePtr, translations: &Translations) {
        self.rmap.entry(gfn).or_default().push(ptr);
        translations.set(ptr, Some(gfn));
    }

    /// Forgets a leaf SPTE of `gfn`.
    pub fn rmap_remove(&mut self, gfn: Gfn, ptr: SptePtr, translations: &Translations) {
        if let Some(v) = self.rmap.get_mut(&gfn) {
            v.retain(|&p| p != ptr);
            if v.is_empty() {
                self.rmap.remove(&gfn);
            }
        }
        translations.set(ptr, None);
    }

    /// How many leaf SPTEs map `gfn`.
    pub fn rmap_len(&self, gfn: Gfn) -> usize {
        self.rmap.get(&gfn).map_or(0, Vec::len)
    }

    /// The leaf SPTEs mapping `gfn`.
    pub fn rmap_of(&self, gfn: Gfn) -> Vec<SptePtr> {
        self.rmap.get(&gfn).cloned().unwrap_or_default()
    }

    /// The leaf SPTEs mapping any gfn in `start..end`.
    pub fn rmap_range(&self, start: Gfn, end: Gfn) -> Vec<(Gfn, SptePtr)> {
        self.rmap
            .range(start..end)
            .flat_map(|(&g, v)| v.iter().map(move |&p| (g, p)))
            .collect()
    }

    /// The SPTE at `ptr`, read.
    pub fn spte(arena: &FrameArena, ptr: SptePtr) -> Spte {
        Spte::from_raw(ptr.get(arena).load(Ordering::Acquire))
    }

    /// Records the guest entry the leaf SPTE at `index` of `id` is built
    /// from (indirect 4K pages only).
    pub fn record_gpte(&mut self, id: PageId, index: usize, gpte: u64) {
        if let Some(g) = self.page_mut(id).gptes.as_mut() {
            g[index] = gpte;
        }
    }

    /// The page as a [`LeafPage`], if it is an indirect 4K page.
    pub fn leaf(&self, id: PageId) -> Option<LeafPage> {
        let role = self.page(id).role;
        (role.level() == Level::L1 && !role.is_direct()).then_some(LeafPage(id))
    }

    /// Marks a 4K page unsync and its parents, up to the roots, as having
    /// an unsync child (KVM's `kvm_unsync_page` and
    /// `kvm_mmu_mark_parents_unsync`). Returns false if it already was.
    pub fn mark_unsync(&mut self, leaf: LeafPage) -> bool {
        let p = self.page_mut(leaf.0);
        // The type proves it; the assertion guards this module's own code.
        assert_eq!(p.role.level(), Level::L1, "only 4K shadow pages may be unsync");
        if p.unsync {
            return false;
        }
        p.unsync = true;
        for ptr in p.parents.clone() {
            self.set_child_bit(ptr);
        }
        true
    }

    /// Marks an unsync 4K page in sync again and clears the paths to it
    /// that lead to nothing else unsync (KVM's `kvm_unlink_unsync_page` and
    /// `mmu_pages_clear_parents`). Returns whether it was unsync.
    pub fn mark_sync(&mut self, leaf: LeafPage) -> bool {
        let p = self.page_mut(leaf.0);
        if !p.unsync {
            return false;
        }
        p.unsync = false;
        for ptr in p.parents.clone() {
            self.clear_child_bit(ptr);
        }
        true
    }

    /// Records that the SPTE at `ptr` now links `child`: the bit of `ptr`
    /// is set if `child` has anything unsync (KVM's `mark_unsync` in
    /// `__link_shadow_page`).
    pub fn note_link(&mut self, ptr: SptePtr, child: PageId) {
        if self.page(child).has_unsync() {
            self.set_child_bit(ptr);
        }
    }

    /// Records that the SPTE at `ptr` no longer links a child.
    pub fn note_unlink(&mut self, ptr: SptePtr) {
        self.clear_child_bit(ptr);
    }

    fn set_child_bit(&mut self, ptr: SptePtr) {
        // A parent that is not a shadow page (a vCPU's PAE root table)
        // ends the propagation.
        let Some(parent) = self.by_pfn(ptr.table) else { return };
        let p = self.page_mut(parent);
        assert!(p.role.level() > Level::L1, "an unsync-children bit in a 4K page");
        let (word, bit) = (ptr.index as usize / 64, 1u64 << (ptr.index % 64));
        if p.unsync_children[word] & bit != 0 {
            return;
        }
        p.unsync_children[word] |= bit;
        p.unsync_child_count += 1;
        if p.unsync_child_count == 1 {
            for gp in p.parents.clone() {
                self.set_child_bit(gp);
            }
        }
    }

    fn clear_child_bit(&mut self, ptr: SptePtr) {
        let Some(parent) = self.by_pfn(ptr.table) else { return };
        let p = self.page_mut(parent);
        let (word, bit) = (ptr.index as usize / 64, 1u64 << (ptr.index % 64));
        if p.unsync_children[word] & bit == 0 {
            return;
        }
        p.unsync_children[word] &= !bit;
        p.unsync_child_count -= 1;
        if p.unsync_child_count == 0 {
            for gp in p.parents.clone() {
                self.clear_child_bit(gp);
            }
        }
    }
}
