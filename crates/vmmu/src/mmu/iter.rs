//! The SPTE walk cursor (KVM's `tdp_iter`): one struct carries the whole
//! walk of a paging tree in host frames.
//!
//! The cursor visits SPTEs in pre-order over a gfn range: it steps down
//! into the table a present non-leaf SPTE points to, side to the next SPTE
//! of the same table, and up when a table is done. Before stepping down it
//! re-reads the SPTE, because another thread may have zapped or replaced
//! it since the cursor last looked (faults run concurrently under the read
//! lock). After the caller drops the lock to yield, [`SpteIter::restart`]
//! walks again from the root to the first gfn not yet finished, so a yield
//! never revisits finished work (forward progress).
//!
//! The table geometry comes from a [`Geometry`]: 512-entry tables for real
//! paging, and e.g. 4-entry tables for model-checking tests.
//!
//! Every SPTE access through the cursor (the loads of `restart`/`refresh`,
//! the compare-exchange of `try_set`, and whatever a caller does through
//! `sptep`) is preceded by a [`sched_point`]: where a model test
//! (`tests/races.rs`) may switch to another thread.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_epoch::Guard;

use super::spte::Spte;
use crate::addr::{Gfn, Level, Pfn};
use crate::host::FrameArena;
use crate::sync::{Bug, bug, sched_point};

/// The shape of a paging tree: entries per table and the number of levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// log2 of entries per table (9 for x86; at most 9, a table is one frame).
    pub bits_per_level: u32,
    /// Levels of the tree (the root's level).
    pub levels: u8,
}

impl Geometry {
    /// 4-level x86 paging / EPT.
    pub const X86_4LEVEL: Geometry = Geometry {
        bits_per_level: 9,
        levels: 4,
    };
    /// 5-level x86 paging / EPT.
    pub const X86_5LEVEL: Geometry = Geometry {
        bits_per_level: 9,
        levels: 5,
    };

    /// Entries per table.
    #[inline(always)]
    pub const fn entries(self) -> u64 {
        1 << self.bits_per_level
    }

    /// Frames (gfns) one SPTE at `level` covers.
    #[inline(always)]
    pub const fn pages(self, level: Level) -> u64 {
        self.pages_at(level.get())
    }

    #[inline(always)]
    const fn pages_at(self, level: u8) -> u64 {
        1 << (self.bits_per_level * (level as u32 - 1))
    }

    /// Index of `gfn` in the table at `level`.
    #[inline(always)]
    pub const fn index(self, gfn: u64, level: u8) -> u64 {
        (gfn >> (self.bits_per_level * (level as u32 - 1))) & (self.entries() - 1)
    }

    /// Frames the whole tree covers.
    #[inline(always)]
    pub const fn span(self) -> u64 {
        1 << (self.bits_per_level * self.levels as u32)
    }
}

/// A cursor over the SPTEs of one tree.
pub struct SpteIter<'a> {
    /// The epoch the walk runs under: a table unlinked meanwhile is not
    /// freed before the cursor is gone (KVM's RCU read-side section).
    epoch: &'a Guard,
    arena: &'a FrameArena,
    geometry: Geometry,
    root: Pfn,
    root_level: u8,
    min_level: u8,
    /// The first gfn at `min_level` not yet finished: where a restart resumes.
    next_last_level_gfn: u64,
    /// The gfn the cursor was at when the caller last yielded.
    yielded_gfn: u64,
    /// The table at each level on the current path (`[level - 1]`).
    pt_path: [Pfn; 5],
    /// Current level.
    level: u8,
    /// First gfn the current SPTE covers.
    gfn: u64,
    /// The current SPTE as last read.
    old_spte: Spte,
    valid: bool,
}

impl<'a> SpteIter<'a> {
    /// A cursor over the tree at `root` (at `root_level`), visiting levels
    /// down to `min_level`, positioned at the SPTE covering `goal_gfn` at
    /// the root, under `epoch` (the cursor cannot outlive it: tables it
    /// reads are freed only after every epoch pinned while they were
    /// linked).
    #[inline]
    pub fn new(
        epoch: &'a Guard,
        arena: &'a FrameArena,
        geometry: Geometry,
        root: Pfn,
        min_level: Level,
        goal_gfn: Gfn,
    ) -> SpteIter<'a> {
        let (min_level, goal_gfn) = (min_level.get(), goal_gfn.raw());
        let root_level = geometry.levels;
        debug_assert!(min_level >= 1 && min_level <= root_level);
        let mut it = SpteIter {
            epoch,
            arena,
            geometry,
            root,
            root_level,
            min_level,
            next_last_level_gfn: goal_gfn,
            yielded_gfn: goal_gfn,
            pt_path: [Pfn::new(0); 5],
            level: root_level,
            gfn: 0,
            old_spte: Spte::EMPTY,
            valid: false,
        };
        it.restart();
        it
    }

    /// Walks again from the root to the first unfinished gfn (after a yield).
    #[inline]
    pub fn restart(&mut self) {
        self.yielded_gfn = self.next_last_level_gfn;
        self.level = self.root_level;
        self.pt_path[self.root_level as usize - 1] = self.root;
        self.gfn = self.align(self.next_last_level_gfn, self.level);
        self.valid = self.next_last_level_gfn < self.geometry.span();
        if self.valid {
            sched_point();
            self.old_spte = Spte::from_raw(self.slot().load(Ordering::Acquire));
        }
    }

    #[inline(always)]
    fn align(&self, gfn: u64, level: u8) -> u64 {
        gfn & !(self.geometry.pages_at(level) - 1)
    }

    /// Whether the cursor points at an SPTE.
    #[inline(always)]
    pub fn valid(&self) -> bool {
        self.valid
    }

    /// The current level.
    #[inline(always)]
    pub fn level(&self) -> Level {
        Level::from_known(self.level)
    }

    /// The first gfn the current SPTE covers.
    #[inline(always)]
    pub fn gfn(&self) -> Gfn {
        Gfn::new(self.gfn)
    }

    /// The epoch the walk runs under: what the walk unlinks is freed
    /// through it ([`crossbeam_epoch::Guard::defer`]).
    pub fn epoch(&self) -> &'a Guard {
        self.epoch
    }

    /// The current SPTE as last read.
    #[inline(always)]
    pub fn old_spte(&self) -> Spte {
        self.old_spte
    }

    /// The table holding the current SPTE.
    #[inline(always)]
    pub fn table(&self) -> Pfn {
        self.pt_path[self.level as usize - 1]
    }

    /// The current SPTE's slot, for an access the cursor does not offer
    /// (an exchange, a store under the write lock or to a frozen SPTE).
    /// The caller is expected to access it right away: it is a schedule
    /// point for model tests ([`sched_point`]).
    #[inline(always)]
    pub fn sptep(&self) -> &'a AtomicU64 {
        sched_point();
        self.slot()
    }

    #[inline(always)]
    fn slot(&self) -> &'a AtomicU64 {
        let index = self.geometry.index(self.gfn, self.level) as usize;
        &self.arena.table(self.table())[index]
    }

    /// Re-reads the current SPTE.
    #[inline(always)]
    pub fn refresh(&mut self) -> Spte {
        sched_point();
        self.old_spte = Spte::from_raw(self.slot().load(Ordering::Acquire));
        self.old_spte
    }

    /// Replaces the current SPTE with `new` if it still holds `old_spte`.
    /// On failure `old_spte` is updated to the value found, and the caller
    /// decides whether to retry.
    #[inline]
    pub fn try_set(&mut self, new: Spte) -> bool {
        sched_point();
        if bug(Bug::BlindSpteSet) {
            // Injected bug (model tests only): a store, blind to a change
            // made since `old_spte` was read.
            self.slot().store(new.raw(), Ordering::Release);
            self.old_spte = new;
            return true;
        }
        match self
            .slot()
            .compare_exchange(self.old_spte.raw(), new.raw(), Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                self.old_spte = new;
                true
            }
            Err(cur) => {
                self.old_spte = Spte::from_raw(cur);
                false
            }
        }
    }

    /// Steps into the table the current SPTE points to, re-reading it
    /// first. Fails at `min_level`, on a leaf, and on a non-present SPTE.
    #[inline]
    pub fn step_down(&mut self) -> bool {
        if self.level <= self.min_level {
            return false;
        }
        let spte = self.refresh();
        if !spte.is_mmu_present() || spte.is_leaf(self.level()) {
            return false;
        }
        let child = spte.pfn();
        self.level -= 1;
        self.pt_path[self.level as usize - 1] = child;
        self.gfn = self.align(self.next_last_level_gfn, self.level);
        self.refresh();
        true
    }

    /// Steps down through present tables to `level` (not below the
    /// cursor's lowest level), as [`SpteIter::step_down`] would one level
    /// at a time (each SPTE read again before the cursor steps through
    /// it), with the walk kept in registers: the fault path's descent,
    /// whose tables are mostly all there. Stops on the first SPTE that is
    /// not a present table (absent, frozen, a leaf) with the cursor on
    /// it. Returns the level reached.
    #[inline]
    pub fn step_down_to(&mut self, level: Level) -> Level {
        let target = level.get().max(self.min_level);
        let (g, goal) = (self.geometry, self.next_last_level_gfn);
        let mut lvl = self.level;
        let mut table = self.pt_path[lvl as usize - 1];
        let mut spte = self.old_spte;
        while lvl > target {
            sched_point();
            let cur = Spte::from_raw(self.arena.table(table)[g.index(goal, lvl) as usize].load(Ordering::Acquire));
            if !cur.is_mmu_present() || cur.is_leaf(Level::from_known(lvl)) {
                spte = cur;
                break;
            }
            table = cur.pfn();
            lvl -= 1;
            self.pt_path[lvl as usize - 1] = table;
            sched_point();
            spte = Spte::from_raw(self.arena.table(table)[g.index(goal, lvl) as usize].load(Ordering::Acquire));
        }
        self.level = lvl;
        self.gfn = self.align(goal, lvl);
        self.old_spte = spte;
        Level::from_known(lvl)
    }

    /// Steps to the next SPTE of the same table. Fails at the table's end.
    pub fn step_side(&mut self) -> bool {
        if self.geometry.index(self.gfn, self.level) == self.geometry.entries() - 1 {
            return false;
        }
        self.gfn += self.geometry.pages_at(self.level);
        self.next_last_level_gfn = self.gfn;
        self.refresh();
        true
    }

    /// Steps up to the SPTE that points to the current table. Fails at the root.
    pub fn step_up(&mut self) -> bool {
        if self.level == self.root_level {
            return false;
        }
        self.level += 1;
        self.gfn = self.align(self.gfn, self.level);
        self.refresh();
        true
    }

    /// Moves to the next SPTE in pre-order: down if possible, else side,
    /// else up until a side step succeeds; invalid past the tree's end.
    pub fn next(&mut self) {
        if !self.step_down() {
            self.skip_subtree();
        }
    }

    /// Skips the subtree under the current SPTE (e.g. after zapping it) and
    /// moves to the SPTE after it.
    pub fn skip_subtree(&mut self) {
        loop {
            if self.step_side() {
                return;
            }
            if !self.step_up() {
                break;
            }
        }
        self.valid = false;
    }

    /// Whether the cursor has advanced since the last yield (a caller that
    /// yields must make progress first, or it could loop forever).
    pub fn made_progress(&self) -> bool {
        self.next_last_level_gfn != self.yielded_gfn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmu::spte::{SpteAccess, SpteFormat};

    const FMT: SpteFormat = SpteFormat::Ept { ad: true };
    const TINY: Geometry = Geometry {
        bits_per_level: 2,
        levels: 3,
    };

    fn arena() -> FrameArena {
        FrameArena::with_reserve(64 << 20).expect("a small arena")
    }

    /// Builds a full tree of `geometry` with a 4K leaf for every gfn in
    /// `leaves`, and returns its root.
    fn build(arena: &FrameArena, geometry: Geometry, leaves: &[u64]) -> Pfn {
        let root = arena.alloc_4k().unwrap();
        for &gfn in leaves {
            let mut table = root;
            for level in (2..=geometry.levels).rev() {
                let slot = &arena.table(table)[geometry.index(gfn, level) as usize];
                let spte = Spte::from_raw(slot.load(Ordering::Relaxed));
                table = if spte.is_mmu_present() {
                    spte.pfn()
                } else {
                    let child = arena.alloc_4k().unwrap();
                    slot.store(FMT.make_nonleaf(child).raw(), Ordering::Relaxed);
                    child
                };
            }
            let leaf = FMT.make_leaf(Level::L1, Pfn::new(0x1000 + gfn), SpteAccess::ALL, true, true, false);
            arena.table(table)[geometry.index(gfn, 1) as usize].store(leaf.raw(), Ordering::Relaxed);
        }
        root
    }

    fn leaves_visited(it: &mut SpteIter<'_>) -> Vec<u64> {
        let mut out = Vec::new();
        while it.valid() {
            if it.level() == Level::L1 && it.old_spte().is_mmu_present() {
                out.push(it.gfn().raw());
            }
            it.next();
        }
        out
    }

    #[test]
    fn visits_every_leaf_in_order() {
        let a = arena();
        let leaves = [0u64, 1, 5, 17, 18, 63];
        let root = build(&a, TINY, &leaves);
        let epoch = crossbeam_epoch::pin();
        let mut it = SpteIter::new(&epoch, &a, TINY, root, Level::L1, Gfn::new(0));
        assert_eq!(leaves_visited(&mut it), leaves);
    }

    #[test]
    fn starts_at_the_goal_gfn() {
        let a = arena();
        let root = build(&a, TINY, &[0, 1, 5, 17, 18, 63]);
        let epoch = crossbeam_epoch::pin();
        let mut it = SpteIter::new(&epoch, &a, TINY, root, Level::L1, Gfn::new(17));
        assert_eq!(leaves_visited(&mut it), [17, 18, 63]);
    }

    #[test]
    fn min_level_stops_the_descent() {
        let a = arena();
        let root = build(&a, TINY, &[5, 40]);
        let epoch = crossbeam_epoch::pin();
        let mut it = SpteIter::new(&epoch, &a, TINY, root, Level::L2, Gfn::new(0));
        let mut seen = Vec::new();
        while it.valid() {
            assert!(it.level() >= Level::L2);
            if it.level() == Level::L2 && it.old_spte().is_mmu_present() {
                seen.push(it.gfn().raw());
            }
            it.next();
        }
        assert_eq!(seen, [4, 40]);
    }

    #[test]
    fn restart_resumes_without_revisiting() {
        let a = arena();
        let root = build(&a, TINY, &[1, 2, 30, 31, 50]);
        let epoch = crossbeam_epoch::pin();
        let mut it = SpteIter::new(&epoch, &a, TINY, root, Level::L1, Gfn::new(0));
        let mut seen = Vec::new();
        while it.valid() {
            if it.level() == Level::L1 && it.old_spte().is_mmu_present() {
                seen.push(it.gfn().raw());
                // "Yield" after every leaf: restart from the root.
                it.next();
                assert!(it.made_progress() || !it.valid());
                it.restart();
                continue;
            }
            it.next();
        }
        assert_eq!(seen, [1, 2, 30, 31, 50]);
    }

    #[test]
    fn step_down_rereads_a_concurrently_zapped_entry() {
        let a = arena();
        let root = build(&a, TINY, &[21]);
        let epoch = crossbeam_epoch::pin();
        let mut it = SpteIter::new(&epoch, &a, TINY, root, Level::L1, Gfn::new(21));
        assert!(it.old_spte().is_mmu_present());
        // Another thread zaps the root entry after the cursor read it.
        it.sptep().store(0, Ordering::Release);
        assert!(!it.step_down(), "the cursor sees the zap");
        assert_eq!(it.old_spte(), Spte::EMPTY);
    }

    #[test]
    fn try_set_fails_on_a_lost_race_and_reports_the_winner() {
        let a = arena();
        let root = build(&a, TINY, &[3]);
        let epoch = crossbeam_epoch::pin();
        let mut it = SpteIter::new(&epoch, &a, TINY, root, Level::L1, Gfn::new(3));
        while it.level() > Level::L1 {
            assert!(it.step_down());
        }
        let theirs = FMT.make_leaf(Level::L1, Pfn::new(0x9999), SpteAccess::ALL, true, true, false);
        it.sptep().store(theirs.raw(), Ordering::Release);
        assert!(!it.try_set(Spte::EMPTY));
        assert_eq!(it.old_spte(), theirs);
        assert!(it.try_set(Spte::EMPTY));
        assert_eq!(it.refresh(), Spte::EMPTY);
    }

    #[test]
    fn real_geometry_walks_a_sparse_tree() {
        let a = arena();
        let g = Geometry::X86_4LEVEL;
        let leaves = [0u64, 511, 512, 0x4_0000, 0x7ff_ffff];
        let root = build(&a, g, &leaves);
        let epoch = crossbeam_epoch::pin();
        let mut it = SpteIter::new(&epoch, &a, g, root, Level::L1, Gfn::new(0));
        assert_eq!(leaves_visited(&mut it), leaves);
    }
}
