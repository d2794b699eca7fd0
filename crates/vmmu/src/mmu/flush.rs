//! Remote TLB flushes (KVM's `kvm_flush_remote_tlbs` with `vcpu->mode`).
//!
//! A vCPU is *in guest mode* while it translates and touches memory (TLB
//! lookup, hardware walk, the access itself), never while it is in the MMU.
//! A flush bumps the generation and then waits until every vCPU that
//! entered guest mode under an older generation has left it; a vCPU that
//! enters afterwards sees the new generation and flushes its TLB before it
//! translates anything. So when [`RemoteTlb::flush`] returns, no vCPU can
//! still use a translation made before it: the "IPI and wait" of KVM.
//!
//! The store of the vCPU's mode and the load of the generation (and the
//! flusher's bump and its load of each mode) are sequentially consistent,
//! so at least one side sees the other (Dekker's pattern).
//!
//! Operations that reduce permissions return a [`PendingFlush`], which must
//! be discharged (flushed) before `mmu_lock` is released.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

/// How long a remote flush waits for one vCPU before it warns (once).
const STUCK_FLUSH_WARNING: std::time::Duration = std::time::Duration::from_secs(10);

/// The flush generation and the vCPUs it must wait for.
#[derive(Debug, Default)]
pub struct RemoteTlb {
    generation: AtomicU64,
    vcpus: Mutex<Vec<Arc<VcpuMode>>>,
    flushes: AtomicU64,
}

/// One vCPU's mode: 0 outside guest mode, else `generation << 1 | 1`.
/// Written twice per access, so padded to its own cache line: two vCPUs'
/// modes allocated side by side would otherwise share one.
#[derive(Debug, Default)]
pub struct VcpuMode {
    state: CachePadded<AtomicU64>,
}

impl RemoteTlb {
    /// Registers a vCPU; it starts outside guest mode.
    pub fn register(&self) -> Arc<VcpuMode> {
        let mode = Arc::new(VcpuMode::default());
        self.vcpus.lock().push(mode.clone());
        mode
    }

    /// Unregisters a vCPU (when it is destroyed).
    pub fn unregister(&self, mode: &Arc<VcpuMode>) {
        self.vcpus.lock().retain(|m| !Arc::ptr_eq(m, mode));
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The generation flushers asked for, as a vCPU already in guest mode
    /// reads it before each access ([`VcpuMode::acknowledge`]). Acquire:
    /// seeing a flusher's generation, the vCPU sees the SPTE changes made
    /// before that flush, so its walks after the TLB flush find them.
    #[inline]
    pub fn requested(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Flushes translations on every vCPU: returns once no vCPU can still
    /// use a translation made before the call.
    pub fn flush(&self) {
        if crate::sync::take_bug(crate::sync::Bug::SkipRemoteFlush) {
            return;
        }
        let target = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let vcpus: Vec<Arc<VcpuMode>> = self.vcpus.lock().clone();
        for v in vcpus {
            let mut spins = 0u64;
            let mut waiting_since = None;
            let mut warned = false;
            loop {
                let s = v.state.load(Ordering::SeqCst);
                if s & 1 == 0 || (s >> 1) >= target {
                    break;
                }
                spins += 1;
                if spins < 64 && !crate::sync::in_model() {
                    std::hint::spin_loop();
                } else {
                    // Shuttle's yield inside a model test (the vCPU being
                    // waited for runs on the same OS thread).
                    crate::sync::yield_now();
                }
                if !warned && spins.is_multiple_of(1 << 16) && !crate::sync::in_model() {
                    let since = *waiting_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= STUCK_FLUSH_WARNING {
                        warned = true;
                        // Once per wait: a vCPU held in guest mode without
                        // accessing (a `GuestSession` kept across a wait
                        // for another thread) stalls every flusher.
                        tracing::warn!(
                            target: "kvm_mmu",
                            generation = target,
                            "a remote TLB flush has waited {} s for a vCPU in guest mode that makes no access: is a GuestSession held across a wait for another thread?",
                            STUCK_FLUSH_WARNING.as_secs()
                        );
                    }
                }
            }
        }
    }

    /// vCPUs registered now.
    pub fn registered(&self) -> usize {
        self.vcpus.lock().len()
    }

    /// Flushes performed.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

impl VcpuMode {
    /// Enters guest mode; returns the generation to compare with the last
    /// one this vCPU flushed for (if it differs, flush the TLB first).
    pub fn enter(&self, tlb: &RemoteTlb) -> u64 {
        loop {
            let g = tlb.generation.load(Ordering::SeqCst);
            self.state.store(g << 1 | 1, Ordering::SeqCst);
            if tlb.generation.load(Ordering::SeqCst) == g {
                return g;
            }
        }
    }

    /// Acknowledges flush generation `generation` without leaving guest
    /// mode: the vCPU flushed its TLB after reading it with
    /// [`RemoteTlb::requested`]. A release store: the flusher that reads it
    /// sees every access the vCPU made through the old translations as
    /// done.
    #[inline]
    pub fn acknowledge(&self, generation: u64) {
        self.state.store(generation << 1 | 1, Ordering::Release);
    }

    /// Leaves guest mode (an exit). A release store is enough: a flusher
    /// that reads 0 synchronizes with it, so every access made in guest
    /// mode happens before the flush returns; only entering needs the
    /// store-load order (the full barrier KVM has after setting
    /// `IN_GUEST_MODE`). A sequentially consistent store here would drain
    /// the store buffer on every exit, waiting out the guest's last write.
    pub fn exit(&self) {
        self.state.store(0, Ordering::Release);
    }
}

/// A TLB flush the caller owes: dropping it undischarged is an MMU bug and
/// panics in debug builds.
#[must_use = "a TLB flush obligation must be discharged before mmu_lock is released"]
#[derive(Debug)]
pub struct PendingFlush {
    needed: bool,
}

impl PendingFlush {
    /// An obligation: `needed` if translations were removed or reduced.
    pub fn new(needed: bool) -> PendingFlush {
        PendingFlush { needed }
    }

    /// No flush owed.
    pub fn none() -> PendingFlush {
        PendingFlush { needed: false }
    }

    /// Whether a flush is owed.
    pub fn is_needed(&self) -> bool {
        self.needed
    }

    /// Records that a flush is owed (translations were removed or
    /// reduced).
    pub fn require(&mut self) {
        self.needed = true;
    }

    /// Combines two obligations.
    pub fn merge(mut self, mut other: PendingFlush) -> PendingFlush {
        self.needed |= std::mem::take(&mut other.needed);
        self
    }

    /// Gives up the flush on purpose; `reason` says why that is correct
    /// (e.g. `clear_young`, where a stale TLB entry only hides an access).
    pub fn waive(mut self, reason: &'static str) {
        debug_assert!(!reason.is_empty(), "a waived TLB flush needs a reason");
        self.needed = false;
    }

    /// Flushes if needed; returns whether it did.
    pub fn discharge(mut self, tlb: &RemoteTlb) -> bool {
        let needed = std::mem::take(&mut self.needed);
        if needed {
            tlb.flush();
        }
        needed
    }
}

/// `flush |= other`: one obligation that covers both.
impl std::ops::BitOrAssign for PendingFlush {
    fn bitor_assign(&mut self, mut other: PendingFlush) {
        self.needed |= std::mem::take(&mut other.needed);
    }
}

impl Drop for PendingFlush {
    fn drop(&mut self) {
        debug_assert!(
            !self.needed || std::thread::panicking(),
            "a needed TLB flush was dropped undischarged"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn flush_waits_for_a_vcpu_in_guest_mode() {
        let tlb = Arc::new(RemoteTlb::default());
        let mode = tlb.register();
        let g = mode.enter(&tlb);
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (tlb, done) = (tlb.clone(), done.clone());
            std::thread::spawn(move || {
                tlb.flush();
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "the flush waits while the vCPU is in guest mode"
        );
        mode.exit();
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        // Re-entering sees the new generation.
        assert_eq!(mode.enter(&tlb), g + 1);
        mode.exit();
    }

    #[test]
    fn flush_does_not_wait_for_vcpus_outside_guest_mode_or_entered_later() {
        let tlb = RemoteTlb::default();
        let _idle = tlb.register();
        tlb.flush();
        let m = tlb.register();
        let g = m.enter(&tlb);
        assert_eq!(g, 1);
        // A vCPU that entered at the current generation has seen the last
        // flush; only later flushes wait for it.
        assert_eq!(tlb.flushes(), 1);
        m.exit();
        tlb.flush();
        assert_eq!(tlb.flushes(), 2);
    }

    #[test]
    fn obligations_merge_and_discharge() {
        let tlb = RemoteTlb::default();
        let p = PendingFlush::none().merge(PendingFlush::new(true));
        assert!(p.is_needed());
        assert!(p.discharge(&tlb));
        assert!(!PendingFlush::none().discharge(&tlb));
        assert_eq!(tlb.flushes(), 1);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped undischarged")]
    fn an_undischarged_flush_is_caught() {
        let _p = PendingFlush::new(true);
    }
}
