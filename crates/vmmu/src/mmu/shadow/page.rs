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
use crate::addr::{Gfn, Pfn};
use crate::mem::{FrameArena, FrameError};
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
}

/// The shadow MMU's pages and indexes.
#[derive(Debug, Default)]
pub struct Pages {
    slab: Vec<Option<ShadowPage>>,
    created: u64,
    free_ids: Vec<usize>,
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

    /// Creates a page for (gfn, role) with a zeroed table.
    pub fn create(
        &mut self,
        arena: &FrameArena,
        translations: &Translations,
        gfn: Gfn,
        role: Role,
    ) -> Result<PageId, FrameError> {
        debug_assert!(role.is_normalised());
        let pfn = arena.alloc_4k()?;
        let page = ShadowPage {
            pfn,
            gfn,
            role,
            parents: Vec::new(),
            root_count: 0,
            write_flooding: 0,
            invalid: false,
            created: self.created,
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
        self.hash.insert((gfn, role), id);
        self.by_pfn.insert(pfn, id);
        if role.level() == 1 {
            translations.add(pfn);
        }
        if !role.is_direct() {
            self.indirect.entry(gfn).or_default().push(id);
        }
        Ok(id)
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
        if page.role.level() == 1 {
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
        Spte(ptr.get(arena).load(Ordering::Acquire))
    }
}
