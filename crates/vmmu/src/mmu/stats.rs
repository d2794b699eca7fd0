//! MMU statistics, named as KVM's (`/sys/kernel/debug/kvm/*`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::addr::Level;
use crate::percpu::{SHARDS, shard_index};

use serde::Serialize;

macro_rules! stats {
    ($(#[$doc:meta])* $name:ident, $shard:ident, $snap:ident { $($(#[$fdoc:meta])* $field:ident: $ty:ident),* $(,)? }) => {
        /// One shard of the counters: the threads that map to it update
        /// only its cache line(s). Read the totals with `snapshot`.
        #[derive(Debug, Default)]
        pub struct $shard {
            $($(#[$fdoc])* pub $field: $ty,)*
        }

        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name {
            shards: Box<[CachePadded<$shard>]>,
            /// Page-table pages now and at most, exact (one shared line,
            /// updated only when a table is allocated or freed).
            tables: CachePadded<(AtomicI64, AtomicI64)>,
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    shards: (0..SHARDS).map(|_| CachePadded::new($shard::default())).collect(),
                    tables: CachePadded::new((AtomicI64::new(0), AtomicI64::new(0))),
                }
            }
        }

        /// A point-in-time copy of the counters, for reports and `--json`.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
        pub struct $snap {
            $($(#[$fdoc])* pub $field: i64,)*
        }

        impl $name {
            /// Reads every counter: the sum over the shards. Counters that
            /// go up and down (`pages_4k`, …) are exact once the MMU is
            /// quiescent; during updates a sum may mix before and after.
            pub fn snapshot(&self) -> $snap {
                let mut snap = $snap::default();
                for shard in self.shards.iter() {
                    $(snap.$field = snap.$field.wrapping_add(shard.$field.load(Ordering::Relaxed) as i64);)*
                }
                snap
            }

            /// The shard the current thread updates.
            #[inline]
            pub fn local(&self) -> &$shard {
                &self.shards[shard_index()]
            }

            /// The first shard: where counters that are not sums (maxima,
            /// updated with `fetch_max`) live, so that the snapshot's sum
            /// is their value.
            #[inline]
            pub fn global(&self) -> &$shard {
                &self.shards[0]
            }
        }
    };
}

stats!(
    /// Counters of one MMU, updated with relaxed atomics from any thread.
    /// KVM keeps `pf_*` per vCPU and the rest per VM; here every counter is
    /// sharded by thread so that parallel faults never share a counter's
    /// cache line (a shared `pf_taken` alone halved 2-vCPU populate).
    MmuStats, MmuStatsShard, MmuStatsSnapshot {
        /// Faults that reached the MMU.
        pf_taken: AtomicU64,
        /// Faults that installed or changed an SPTE.
        pf_fixed: AtomicU64,
        /// Faults that found the SPTE already right (another vCPU fixed it).
        pf_spurious: AtomicU64,
        /// Faults fixed on the lockless fast path.
        pf_fast: AtomicU64,
        /// Faults retried: a lost race or an MMU-notifier invalidation.
        pf_retry: AtomicU64,
        /// MMIO SPTEs created.
        pf_mmio_spte_created: AtomicU64,
        /// Faults answered by emulation: MMIO, or a write to a
        /// write-protected guest page table (shadow MMU).
        pf_emulate: AtomicU64,
        /// Leaf SPTEs mapping 4 KiB, now.
        pages_4k: AtomicI64,
        /// Leaf SPTEs mapping 2 MiB, now.
        pages_2m: AtomicI64,
        /// Leaf SPTEs mapping 1 GiB, now.
        pages_1g: AtomicI64,
        /// Huge SPTEs split (on demand or for dirty logging).
        huge_pages_split: AtomicU64,
        /// Huge SPTEs recovered in place after dirty logging.
        huge_pages_recovered: AtomicU64,
        /// Tables zapped after dirty logging for faults to map huge again
        /// (KVM's `kvm_mmu_zap_collapsible_sptes`; seed 004's rule 3).
        huge_pages_zapped_collapsible: AtomicU64,
        /// Huge regions mapped 4K because of an instruction fetch (NX huge
        /// pages), now: the regions the recovery worker may make huge again.
        nx_lpage_splits: AtomicI64,
        /// Remote TLB flushes requested.
        remote_tlb_flush: AtomicU64,
        /// Page-table pages allocated for SPTEs, now.
        mmu_pages: AtomicI64,
        /// Leaf SPTEs zapped.
        mmu_zapped: AtomicU64,
        /// Shadow pages zapped (shadow MMU).
        mmu_shadow_zapped: AtomicU64,
        /// Emulated guest writes to write-tracked guest page tables.
        mmu_pte_write: AtomicU64,
        /// Non-leaf SPTEs zapped by such writes.
        mmu_pde_zapped: AtomicU64,
        /// Shadow pages zapped for write flooding or a misaligned write.
        mmu_flooded: AtomicU64,
        /// Shadow pages reclaimed at the page limit.
        mmu_recycled: AtomicU64,
        /// Shadow pages created (a miss in the page hash).
        mmu_cache_miss: AtomicU64,
        /// Shadow pages made unsync.
        mmu_unsync: AtomicU64,
        /// Unsync shadow pages synced (KVM has only the `kvm_mmu_sync_page`
        /// tracepoint for this).
        mmu_synced: AtomicU64,
        /// Faults retried after unprotecting a guest table the guest wrote
        /// with an instruction that does not write page tables (KVM's
        /// `kvm_mmu_unprotect_gfn_and_retry`).
        mmu_unprotect_retry: AtomicU64,
        /// The most shadow pages of one guest table with other roles met
        /// by a lookup (KVM's `max_mmu_page_hash_collisions`; the hash here
        /// is exact on gfn and role, so this counts the other roles).
        max_mmu_page_hash_collisions: AtomicU64,
        /// CR3 loads served from `prev_roots`.
        prev_roots_hit: AtomicU64,
        /// CR3 loads that built or looked up a root.
        prev_roots_miss: AtomicU64,
        /// TDP faults that found `indirect_shadow_pages` non-zero (read
        /// without a lock, seed 002) and so asked the nested MMU whether
        /// their gfn is tracked.
        indirect_heuristic_hits: AtomicU64,
        /// Of those, the faults whose gfn was tracked (the rest are the
        /// heuristic's false positives: a set lookup for nothing).
        indirect_tracked_gfns: AtomicU64,
        /// TDP faults whose gate said "nothing tracked" while their gfn
        /// was (the heuristic's false negatives, harmless: the nested
        /// MMU's zap follows), counted only when asked
        /// ([`crate::mmu::track::IndirectGate`]).
        indirect_heuristic_misses: AtomicU64,
        /// Syncs of a vCPU's roots (CR3 loads, flushes) that found no page
        /// unsync anywhere and returned without `mmu_lock` (seed 000).
        mmu_sync_roots_lockless_skip: AtomicU64,
        /// Root pages a sync of roots checked under the lock.
        mmu_sync_roots_checked: AtomicU64,
        /// Of those, the roots whose unsync children it walked.
        mmu_sync_roots_walked: AtomicU64,
    }
);

impl MmuStats {
    /// Counts a leaf installed (`delta` = 1) or removed (-1) at `level`.
    #[inline]
    pub fn account_leaf(&self, level: Level, delta: i64) {
        let shard = self.local();
        let counter = match level {
            Level::L1 => &shard.pages_4k,
            Level::L2 => &shard.pages_2m,
            _ => &shard.pages_1g,
        };
        counter.fetch_add(delta, Ordering::Relaxed);
    }

    /// Counts huge regions the NX huge page mitigation split (`delta` > 0)
    /// or stopped tracking (recovered, zapped, or in a logging memslot).
    #[inline]
    pub fn account_nx_lpage_splits(&self, delta: i64) {
        self.local().nx_lpage_splits.fetch_add(delta, Ordering::Relaxed);
    }

    /// Counts page-table pages allocated (`delta` > 0) or freed: the
    /// `mmu_pages` counter and the exact high-water mark.
    #[inline]
    pub fn account_tables(&self, delta: i64) {
        self.local().mmu_pages.fetch_add(delta, Ordering::Relaxed);
        let now = self.tables.0.fetch_add(delta, Ordering::Relaxed) + delta;
        if delta > 0 {
            self.tables.1.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// The most page-table pages live at once so far.
    pub fn mmu_pages_peak(&self) -> i64 {
        self.tables.1.load(Ordering::Relaxed)
    }

    /// Increments a counter.
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
