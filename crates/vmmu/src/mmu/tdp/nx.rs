//! The NX huge page mitigation (KVM's `nx_huge_pages`) and its recovery
//! worker (`kvm_nx_huge_page_recovery_worker`).
//!
//! Under the mitigation no huge SPTE is executable ([`TdpMmu::make_leaf`]
//! and [`Spte::make_nonexecutable`] where huge pages are recovered). An
//! instruction fetch from a huge region maps its page 4K and *tracks* the
//! region (`nx_lpage_splits` counts them); while tracked, data accesses to
//! it map 4K too (KVM's `disallowed_hugepage_adjust`), or the next read
//! would undo the split. The recovery worker wakes every period and zaps
//! `ceil(tracked / ratio)` of the oldest tracked regions' tables, so their
//! next accesses map huge (non-executable) pages again. A region in a
//! memslot that logs dirty pages is untracked without a zap (it maps 4K
//! for logging anyway). A region whose table goes away otherwise (a
//! notifier zap, zap-all) stops being tracked when the table is removed.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::TdpMmu;
use crate::addr::{Gfn, Level};
use crate::mmu::flush::PendingFlush;

/// KVM's default `nx_huge_pages_recovery_ratio`.
pub const NX_HUGE_PAGES_RECOVERY_RATIO: u32 = 60;

/// A huge region: address space, first gfn, level of the huge page.
pub(super) type Region = (u16, Gfn, Level);

/// The tracked regions, oldest first (KVM's `possible_nx_huge_pages`).
#[derive(Debug, Default)]
pub(super) struct NxSplit {
    queue: VecDeque<Region>,
    members: HashSet<Region>,
}

impl NxSplit {
    /// Tracks `region`; false if it already was.
    pub(super) fn track(&mut self, region: Region) -> bool {
        let new = self.members.insert(region);
        if new {
            self.queue.push_back(region);
        }
        new
    }

    /// Whether `region` is tracked.
    pub(super) fn contains(&self, region: &Region) -> bool {
        self.members.contains(region)
    }

    /// Stops tracking `region`; false if it was not. (The queue keeps a
    /// stale entry, skipped when it comes up.)
    fn untrack(&mut self, region: &Region) -> bool {
        self.members.remove(region)
    }

    /// The oldest tracked region, untracked.
    fn pop_oldest(&mut self) -> Option<Region> {
        while let Some(region) = self.queue.pop_front() {
            if self.members.remove(&region) {
                return Some(region);
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.members.len()
    }
}

impl TdpMmu {
    /// NX huge page recovery (KVM's `kvm_recover_nx_huge_pages`): zaps the
    /// tables of `ceil(tracked / ratio)` tracked regions (all of them at
    /// ratio 1; none at 0), oldest first, so they fault back in as huge,
    /// non-executable pages. Regions in memslots that log dirty pages are
    /// untracked without a zap. Returns the regions untracked.
    pub fn recover_nx_huge_pages(&self, ratio: u32) -> usize {
        if ratio == 0 {
            return 0;
        }
        let guard = self.lock.write();
        let mut split = self.nx_split.lock();
        let to_zap = split.len().div_ceil(ratio as usize);
        let batch: Vec<Region> = (0..to_zap).map_while(|_| split.pop_oldest()).collect();
        drop(split);
        self.stats.account_nx_lpage_splits(-(batch.len() as i64));
        let mut owed = PendingFlush::none();
        for &(as_id, gfn, level) in &batch {
            let logging = self.slots.load(as_id).lookup(gfn).is_some_and(|s| s.logs_dirty_pages());
            if logging {
                continue;
            }
            for root in self.roots_of(as_id) {
                let epoch = crossbeam_epoch::pin();
                let mut it = self.cursor(&epoch, root.pfn(), level, gfn);
                while it.level() > level && it.step_down() {}
                let spte = it.old_spte();
                if it.level() == level && spte.is_mmu_present() && !spte.is_leaf(level) {
                    // The table of 4K (or 2M) pages goes; so do their
                    // translations.
                    self.zap_spte(&guard, &mut it, as_id);
                    owed = owed.merge(PendingFlush::new(true));
                }
            }
        }
        self.discharge(owed);
        tracing::trace!(target: "kvm_nx_huge_page_recovery", regions = batch.len());
        batch.len()
    }

    /// The table at `level` covering `gfn` is gone: its region, if
    /// tracked, no longer is.
    pub(super) fn nx_untrack_table(&self, as_id: u16, gfn: Gfn, level: Level) {
        let Some(region_level) = level.up() else { return };
        if self.nx_split.lock().untrack(&(as_id, gfn, region_level)) {
            self.stats.account_nx_lpage_splits(-1);
        }
    }

    /// How often the recovery worker runs (KVM's
    /// `calc_nx_huge_pages_recovery_period`): the configured period, or an
    /// hour divided by the ratio (at least a second); `None` when recovery
    /// is off (no mitigation, or ratio 0).
    pub fn nx_recovery_period(&self) -> Option<Duration> {
        let c = self.config;
        if !c.nx_huge_pages || c.nx_recovery_ratio == 0 {
            return None;
        }
        let ms = match c.nx_recovery_period_ms {
            0 => 60 * 60 * 1000 / c.nx_recovery_ratio.min(3600),
            ms => ms,
        };
        Some(Duration::from_millis(u64::from(ms)))
    }
}

/// The NX recovery worker of one MMU (KVM's `kvm-nx-lpage-recovery`
/// thread): every [`TdpMmu::nx_recovery_period`] it runs
/// [`TdpMmu::recover_nx_huge_pages`] with the configured ratio. It holds
/// the MMU weakly and stops when the MMU is dropped, or when this handle
/// is.
pub struct NxRecoveryWorker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    running: Arc<AtomicBool>,
}

impl std::fmt::Debug for NxRecoveryWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NxRecoveryWorker")
            .field("running", &self.running.load(Ordering::Relaxed))
            .finish()
    }
}

impl NxRecoveryWorker {
    /// Starts the worker of `mmu` (its configuration must have recovery
    /// on: [`TdpMmu::nx_recovery_period`] is `Some`).
    pub(super) fn start(mmu: &Arc<TdpMmu>) -> NxRecoveryWorker {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let running = Arc::new(AtomicBool::new(true));
        let weak: Weak<TdpMmu> = Arc::downgrade(mmu);
        let (ratio, period) = (
            mmu.config.nx_recovery_ratio,
            mmu.nx_recovery_period().expect("started only with recovery on"),
        );
        {
            let (stop, running) = (stop.clone(), running.clone());
            std::thread::Builder::new()
                .name("kvm-nx-lpage-recovery".into())
                .spawn(move || {
                    loop {
                        let mut stopped = stop.0.lock();
                        if !*stopped {
                            stop.1.wait_for(&mut stopped, period);
                        }
                        if *stopped {
                            break;
                        }
                        drop(stopped);
                        let Some(mmu) = weak.upgrade() else { break };
                        mmu.recover_nx_huge_pages(ratio);
                    }
                    running.store(false, Ordering::Release);
                })
                .expect("spawning the NX recovery worker thread");
        }
        NxRecoveryWorker { stop, running }
    }

    /// Whether the worker thread still runs.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }
}

impl Drop for NxRecoveryWorker {
    fn drop(&mut self) {
        // Not joined: the last reference to the MMU may be dropped by the
        // worker itself, which would then wait for its own end.
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
    }
}
