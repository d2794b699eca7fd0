//! Per-thread sharding, vmmu's stand-in for Linux's per-CPU data.
//!
//! A value touched on every fault by every vCPU thread (a statistics
//! counter, the reader side of `mmu_lock`) is split into [`SHARDS`]
//! cache-line-sized shards; each thread uses the shard [`shard_index`]
//! gives it. With more threads than shards, threads share a shard: still
//! correct, the cache line is just shared again.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Shards per sharded value.
pub const SHARDS: usize = 16;

/// The current thread's shard, assigned round-robin on first use and
/// fixed for the thread's lifetime.
#[inline]
pub fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_shard_and_threads_spread() {
        let mine = shard_index();
        assert_eq!(shard_index(), mine);
        let others: std::collections::HashSet<usize> = (0..4)
            .map(|_| std::thread::spawn(shard_index).join().unwrap())
            .collect();
        assert!(others.iter().all(|&i| i < SHARDS));
        assert!(others.len() > 1, "consecutive threads get different shards: {others:?}");
    }
}
