//! Hooks for model checking the MMU's races with [shuttle](https://docs.rs/shuttle).
//!
//! Shuttle runs every thread of a test as a coroutine on *one* OS thread
//! and switches between them only at its own primitives. So the code under
//! test marks where a thread may be preempted ([`sched_point`]: before each
//! SPTE load or compare-exchange, in root reference counting, between the
//! host lookup and its validation), spin loops yield through [`yield_now`],
//! and a lock held across a schedule point (`mmu_lock`) is a shuttle lock
//! inside a model execution. Locks taken only for short sections with no
//! schedule point inside (the frame arena, the root list, the RemoteTlb
//! registry, the host's mm lock) stay `parking_lot` locks: no thread can
//! be switched out while holding one. (The host's mm lock is held across
//! the MMU-notifier callbacks, which take `mmu_lock`: a model must not let
//! another thread take the mm lock, e.g. through `fault_in`, while a host
//! operation runs; see `tests/races.rs`.)
//!
//! Everything here is gated twice:
//!
//! - without the `shuttle` cargo feature (release builds, `cargo bench`,
//!   `vmmu bench`), [`sched_point`] and [`bug`] compile to nothing and
//!   [`yield_now`] is `std::thread::yield_now`;
//! - with it (`cargo test --workspace` turns it on through the root
//!   package's dev-dependency), the hooks act only on a thread inside one of
//!   this module's `model` runs (a thread-local flag, checked first, then
//!   shuttle's current task); every other test behaves exactly as before.
//!
//! Data is shared through `std` atomics, which shuttle runs sequentially
//! consistent (it does not model weak memory).

mod mmu_lock;
pub use mmu_lock::{
    HeldMmuLock, HeldMmuWriteLock, MmuLock, MmuLockHeld, MmuLockReadGuard, MmuLockWriteGuard, MmuWriteLockHeld,
};

#[cfg(feature = "shuttle")]
use std::cell::Cell;

#[cfg(feature = "shuttle")]
thread_local! {
    /// Set while this OS thread runs a shuttle model (see `model`).
    static IN_MODEL: Cell<bool> = const { Cell::new(false) };
    /// The injected bugs ([`Bug`]) active on this OS thread, one bit each.
    static BUGS: Cell<u32> = const { Cell::new(0) };
    /// The page whose dirty marks [`Bug::DropDirtyBit`] drops.
    static DROPPED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Whether the caller is a thread of a shuttle model run (`model`).
/// Always false without the `shuttle` feature.
#[inline(always)]
pub fn in_model() -> bool {
    #[cfg(feature = "shuttle")]
    {
        IN_MODEL.with(Cell::get) && shuttle::current::try_get_current_task().is_some()
    }
    #[cfg(not(feature = "shuttle"))]
    {
        false
    }
}

/// A point where the model may preempt the current thread: put one right
/// before every access to shared state that another thread may change
/// concurrently. A plain context switch (`shuttle::thread::sleep(0)`), not
/// a yield: shuttle's PCT scheduler lowers a yielding thread's priority,
/// which at every SPTE access would turn PCT into round robin. A no-op
/// outside a model run; nothing at all without the `shuttle` feature.
#[inline(always)]
pub fn sched_point() {
    #[cfg(feature = "shuttle")]
    if in_model() {
        shuttle::thread::sleep(std::time::Duration::ZERO);
    }
}

/// Yields the processor in a spin-wait loop: shuttle's `yield_now` inside a
/// model run (so the thread being waited for gets to run: a model has one
/// OS thread), `std::thread::yield_now` otherwise.
#[inline]
pub fn yield_now() {
    #[cfg(feature = "shuttle")]
    if in_model() {
        shuttle::thread::yield_now();
        return;
    }
    std::thread::yield_now();
}

/// A bug that a model test injects on purpose, to prove the test can find
/// it (**test-only**; see [`bug`]). Each one removes one protection.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Bug {
    /// `SpteIter::try_set` stores without comparing: a lost race is not
    /// noticed (two faults both link a table; the lockless fast path
    /// resurrects an SPTE a zap just cleared).
    BlindSpteSet = 1 << 0,
    /// `faultin_pfn` samples `mmu_invalidate_seq` after the host lookup
    /// instead of before it, so an invalidation that ends in between is
    /// missed by `HostMapping::validate`.
    SeqSampledAfterLookup = 1 << 1,
    /// `install` skips the root validity check: a fault installs into a
    /// root being zapped under the read lock by `zap_invalidated_roots`.
    InstallIntoInvalidRoot = 1 << 2,
    /// `get_root` finds the root under the root-list lock but takes the
    /// reference after dropping the lock, with a plain increment instead of
    /// `RootRef::try_get` (no validity check, no "count already zero" check).
    UncheckedRootRef = 1 << 3,
    /// The shadow MMU's `sync_roots` and `sync_addr` do nothing: a guest
    /// flush leaves unsync pages stale.
    SkipUnsyncSync = 1 << 4,
    /// One-shot ([`take_bug`]): one remote TLB flush the MMU asks for is
    /// not done.
    SkipRemoteFlush = 1 << 5,
    /// One-shot: the first time a fault's MMU-notifier retry check would
    /// say "retry", it says "go on" and installs the stale page.
    SkipNotifierRetry = 1 << 6,
    /// One-shot: one page's dirty bit is dropped (the first page marked
    /// dirty while the bug is armed).
    DropDirtyBit = 1 << 7,
    /// The shadow MMU's guest context (and so its pages' roles) ignores
    /// CR0.WP, CR4.SMEP and EFER.NXE: pages built under one setting are
    /// reused under another.
    RoleIgnoresControls = 1 << 8,
    /// A vCPU acknowledges the request to drop obsolete roots (it sees the
    /// new root generation) but keeps its root.
    KeepObsoleteRoot = 1 << 9,
    /// A vCPU in a guest-mode session acknowledges a remote flush without
    /// flushing its TLB.
    AckWithoutFlush = 1 << 10,
    /// The shadow MMU ignores PKRU's write-disable when it builds a leaf
    /// for a supervisor write with CR0.WP = 0: the SPTE it builds faults
    /// again in the hardware (CR0.WP forced on), forever.
    IgnorePkruWriteDisable = 1 << 11,
    /// A harvest of the TDP MMU flushes only if it changed an SPTE, not
    /// whenever it took a bit (the old rule: an SPTE aged without a flush
    /// keeps its vCPU translation writable past the harvest).
    HarvestFlushByChange = 1 << 12,
    /// The TDP MMU's fast path makes a huge SPTE writable in a logging slot
    /// (it logs one page of 512).
    FastPathHugeWritable = 1 << 13,
    /// The TDP MMU's change handler forgets the D bit of a dirty leaf that
    /// goes away (D-bit logging loses the record).
    ZapForgetsDirtyBit = 1 << 14,
    /// The shadow MMU's re-check of the guest entries a fault walked
    /// ignores A/D: an entry whose A bit the guest cleared between the
    /// walk and the lock is shadowed as if still accessed.
    GpteChangeIgnoresAd = 1 << 15,
    /// The TDP MMU's dirty-logging protection (enabling logging, harvests,
    /// ring resets) flushes no TLB: vCPUs keep writable translations of the
    /// pages it write-protected.
    SkipDirtyLogFlush = 1 << 16,
    /// The TDP MMU ignores the nested MMU's gfn write tracking: L1's
    /// writes to its nested tables are not trapped, and the nested MMU's
    /// shadow of them goes stale.
    UntrackedNestedTables = 1 << 17,
    /// The nested MMU write-protects a gfn in the TDP MMU before it marks
    /// the gfn tracked: a TDP fault in between maps it writable again.
    ProtectBeforeTrack = 1 << 18,
    /// The nested MMU counts a new indirect page (`indirect_shadow_pages`,
    /// the lockless "anything tracked?") only after it zapped the TDP
    /// mappings: a TDP fault in between sees nothing tracked and maps the
    /// gfn writable.
    CountAfterProtect = 1 << 19,
    /// A sync of the nested MMU's unsync pages does not take back the TDP
    /// MMU's permission to map their gfns writable: L1 keeps writing its
    /// tables without a trap while the pages count as in sync.
    SyncLeavesWritableElsewhere = 1 << 20,
}

/// Whether the injected bug `b` is active on this thread (**test-only**
/// fault injection for the model tests). A thread-local load with the
/// `shuttle` feature; a constant `false` without it, so the check costs
/// nothing in release builds and benchmarks.
#[doc(hidden)]
#[inline(always)]
pub fn bug(b: Bug) -> bool {
    #[cfg(feature = "shuttle")]
    {
        BUGS.with(Cell::get) & b as u32 != 0
    }
    #[cfg(not(feature = "shuttle"))]
    {
        let _ = b;
        false
    }
}

/// Without the `shuttle` feature no bug can be injected: runs `f`.
#[cfg(not(feature = "shuttle"))]
#[doc(hidden)]
pub fn with_bugs<R>(bugs: &[Bug], f: impl FnOnce() -> R) -> R {
    let _ = bugs;
    f()
}

/// Whether the one-shot injected bug `b` fires now: true once, then the
/// bug is disarmed on this thread (**test-only**; a constant `false`
/// without the `shuttle` feature).
#[doc(hidden)]
#[inline(always)]
pub fn take_bug(b: Bug) -> bool {
    #[cfg(feature = "shuttle")]
    {
        BUGS.with(|bugs| {
            let armed = bugs.get() & b as u32 != 0;
            bugs.set(bugs.get() & !(b as u32));
            armed
        })
    }
    #[cfg(not(feature = "shuttle"))]
    {
        let _ = b;
        false
    }
}

/// Whether the mark of page `key` in a dirty bitmap is dropped by the
/// injected [`Bug::DropDirtyBit`]: the first key marked while the bug is
/// armed, and that key again on this thread from then on (so that a later
/// write does not hide the lost one). **Test-only**; `false` without the
/// `shuttle` feature.
#[doc(hidden)]
#[inline(always)]
pub fn drop_dirty(key: u64) -> bool {
    #[cfg(feature = "shuttle")]
    {
        if DROPPED.with(Cell::get) == Some(key) {
            return true;
        }
        if BUGS.with(Cell::get) & Bug::DropDirtyBit as u32 != 0 && take_bug(Bug::DropDirtyBit) {
            DROPPED.with(|d| d.set(Some(key)));
            return true;
        }
        false
    }
    #[cfg(not(feature = "shuttle"))]
    {
        let _ = key;
        false
    }
}

/// Runs `f` with `bugs` injected on this thread (outside a shuttle model:
/// for checkers that must catch a broken MMU). Only with the `shuttle`
/// feature.
#[cfg(feature = "shuttle")]
#[doc(hidden)]
pub fn with_bugs<R>(bugs: &[Bug], f: impl FnOnce() -> R) -> R {
    let saved = BUGS.with(|b| b.replace(bugs.iter().fold(0, |m, &x| m | x as u32)));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    BUGS.with(|b| b.set(saved));
    r.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Running model checks: shuttle's runner with the hooks of this module
/// switched on for the calling thread. Only with the `shuttle` feature.
#[cfg(feature = "shuttle")]
pub mod model {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use shuttle::scheduler::{PctScheduler, RandomScheduler, Scheduler};
    use shuttle::{Config, FailurePersistence, Runner};

    use super::{BUGS, Bug, Cell, IN_MODEL};

    /// Coroutine stack size: the MMU's paths are deeper than shuttle's
    /// 60 KiB default allows in a debug build.
    const STACK: usize = 1 << 20;

    /// Restores this thread's hook state when a run ends, even by a panic.
    struct Enter {
        in_model: bool,
        bugs: u32,
    }

    impl Enter {
        fn new(bugs: &[Bug]) -> Enter {
            let saved = Enter {
                in_model: IN_MODEL.with(|f| f.replace(true)),
                bugs: BUGS.with(Cell::get),
            };
            BUGS.with(|b| b.set(bugs.iter().fold(0, |m, &x| m | x as u32)));
            saved
        }
    }

    impl Drop for Enter {
        fn drop(&mut self) {
            IN_MODEL.with(|f| f.set(self.in_model));
            BUGS.with(|b| b.set(self.bugs));
        }
    }

    /// What an `explore` run found.
    #[derive(Debug)]
    pub struct Exploration {
        /// Executions (schedules) run, including the failing one.
        pub executions: usize,
        /// The first failure's panic message, if an execution failed.
        pub failure: Option<String>,
    }

    /// Runs `f` once per schedule that `scheduler` picks, with `bugs`
    /// injected, and reports the first failing schedule instead of
    /// panicking. A failure prints the schedule to replay when
    /// `print_failure` is set.
    pub fn explore<S, F>(scheduler: S, bugs: &[Bug], print_failure: bool, f: F) -> Exploration
    where
        S: Scheduler + 'static,
        F: Fn() + Send + Sync + 'static,
    {
        let mut config = Config::new();
        config.stack_size = STACK;
        if !print_failure {
            config.failure_persistence = FailurePersistence::None;
        }
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        let _enter = Enter::new(bugs);
        let run = catch_unwind(AssertUnwindSafe(|| {
            Runner::new(scheduler, config).run(move || {
                counter.fetch_add(1, Ordering::Relaxed);
                f();
            })
        }));
        match run {
            Ok(executions) => Exploration {
                executions,
                failure: None,
            },
            Err(payload) => Exploration {
                executions: count.load(Ordering::Relaxed),
                failure: Some(panic_message(payload.as_ref())),
            },
        }
    }

    /// `shuttle::check_random` with the hooks on: `iterations` random
    /// schedules of `f`, seeded with `seed` (reproducible); panics with the
    /// failing schedule on a failure.
    pub fn check_random<F>(seed: u64, iterations: usize, f: F)
    where
        F: Fn() + Send + Sync + 'static,
    {
        let run = explore(RandomScheduler::new_from_seed(seed, iterations), &[], true, f);
        if let Some(failure) = run.failure {
            panic!("schedule {} of {iterations} failed: {failure}", run.executions);
        }
    }

    /// `shuttle::check_pct` with the hooks on: `iterations` PCT schedules
    /// with up to `depth` preemptions, seeded with `seed`; panics with the
    /// failing schedule on a failure.
    pub fn check_pct<F>(seed: u64, iterations: usize, depth: usize, f: F)
    where
        F: Fn() + Send + Sync + 'static,
    {
        let run = explore(PctScheduler::new_from_seed(seed, depth, iterations), &[], true, f);
        if let Some(failure) = run.failure {
            panic!("schedule {} of {iterations} failed: {failure}", run.executions);
        }
    }

    fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
        if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "a panic with a non-string payload".to_string()
        }
    }
}
