//! A vCPU's shadow roots: the current ones and the recently used ones by
//! key (KVM's `mmu->root` and `mmu->prev_roots`), shared by the contexts
//! that run on shadow pages (the shadow MMU's, keyed by guest context, CR3
//! and PDPTEs; the nested MMU's, keyed by L1's nested paging).

use std::collections::VecDeque;

use crate::mmu::ZapRequest;
use crate::mmu::shadow::ShadowMmu;
use crate::mmu::shadow::roots::ShadowRoots;
use crate::mmu::stats::MmuStats;

/// The current roots and up to `max` cached ones, most recent first.
pub(crate) struct RootCache<K> {
    current: Option<(K, ShadowRoots)>,
    prev: VecDeque<(K, ShadowRoots)>,
    max: usize,
}

/// What [`RootCache::switch`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Switch {
    /// The roots were already current.
    Current,
    /// Taken from the cache (`prev_roots_hit`).
    Hit,
    /// Loaded (`prev_roots_miss`, counted by the load).
    Loaded,
}

impl<K: Copy + PartialEq> RootCache<K> {
    /// Empty, keeping up to `max` roots besides the current ones.
    pub(crate) fn new(max: usize) -> RootCache<K> {
        RootCache {
            current: None,
            prev: VecDeque::new(),
            max,
        }
    }

    /// The current roots and their key.
    pub(crate) fn current(&self) -> Option<&(K, ShadowRoots)> {
        self.current.as_ref()
    }

    /// Every root held, current first, with whether it is current.
    pub(crate) fn all(&self) -> impl Iterator<Item = (&(K, ShadowRoots), bool)> {
        self.current
            .iter()
            .map(|c| (c, true))
            .chain(self.prev.iter().map(|c| (c, false)))
    }

    /// Answers the MMU's request after a zap (seed 003): gives back every
    /// root the MMU made obsolete, or under [`ZapRequest::ReloadAll`] every
    /// root held. Returns whether the current ones went, and how many
    /// cached ones did.
    pub(crate) fn drop_obsolete(&mut self, mmu: &ShadowMmu) -> (bool, u64) {
        let all = mmu.zap_request() == ZapRequest::ReloadAll;
        let current = self.current.as_ref().is_some_and(|(_, r)| all || mmu.roots_obsolete(r))
            && !crate::sync::bug(crate::sync::Bug::KeepObsoleteRoot);
        if current {
            let (_, r) = self.current.take().expect("current roots were just seen");
            mmu.release_roots(r);
        }
        let (keep, drop): (Vec<_>, Vec<_>) = self.prev.drain(..).partition(|(_, r)| !all && !mmu.roots_obsolete(r));
        self.prev = keep.into();
        let dropped = drop.len() as u64;
        for (_, r) in drop {
            mmu.release_roots(r);
        }
        (current, dropped)
    }

    /// Makes the roots of `key` current (KVM's `fast_pgd_switch`): the
    /// cached ones that are `usable` for it if there are (KVM's
    /// `is_root_usable`: the same tables, and a root role that matches),
    /// else `load`'s; the roots they replace go to the cache, and what
    /// falls off its end is given back.
    pub(crate) fn switch<E>(
        &mut self,
        mmu: &ShadowMmu,
        key: K,
        usable: impl Fn(&K, &ShadowRoots) -> bool,
        load: impl FnOnce() -> Result<ShadowRoots, E>,
    ) -> Result<Switch, E> {
        if self.current.as_ref().is_some_and(|(k, _)| *k == key) {
            return Ok(Switch::Current);
        }
        let hit = self
            .prev
            .iter()
            .position(|(k, r)| usable(k, r))
            .and_then(|i| self.prev.remove(i));
        let (next, how) = match hit {
            Some((_, cached)) => {
                MmuStats::inc(&mmu.stats().local().prev_roots_hit);
                ((key, cached), Switch::Hit)
            }
            // On error nothing changed.
            None => ((key, load()?), Switch::Loaded),
        };
        if let Some(cur) = self.current.replace(next) {
            self.prev.push_front(cur);
        }
        while self.prev.len() > self.max {
            let (_, r) = self.prev.pop_back().expect("more roots cached than kept");
            mmu.release_roots(r);
        }
        Ok(how)
    }

    /// Gives back the roots whose key `drop` selects (an L1 hypervisor's
    /// INVEPT: KVM's `kvm_mmu_free_roots` of the matching roots); returns
    /// whether the current ones went.
    pub(crate) fn drop_where(&mut self, mmu: &ShadowMmu, drop: impl Fn(&K) -> bool) -> bool {
        let current = self.current.as_ref().is_some_and(|(k, _)| drop(k));
        if current {
            let (_, r) = self.current.take().expect("current roots were just seen");
            mmu.release_roots(r);
        }
        let (gone, keep): (Vec<_>, Vec<_>) = self.prev.drain(..).partition(|(k, _)| drop(k));
        self.prev = keep.into();
        for (_, r) in gone {
            mmu.release_roots(r);
        }
        current
    }

    /// Gives back every root (the vCPU is going away).
    pub(crate) fn release(&mut self, mmu: &ShadowMmu) {
        for (_, r) in self.current.take().into_iter().chain(self.prev.drain(..)) {
            mmu.release_roots(r);
        }
    }
}
