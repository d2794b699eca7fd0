//! Mapping guest memory before the guest touches it (KVM's
//! `KVM_PRE_FAULT_MEMORY`), with the cost of a fault amortized over a
//! 2 MiB region: one epoch pin and one memslot snapshot for the call, one
//! cache top-up and one hold of `mmu_lock` per region, the host mappings
//! of a region looked up before the lock is taken, as a fault does.
//!
//! Each leaf is what a read fault of a vCPU would map ([`TdpMmu::fault_leaf`]
//! with a read): as large as the host mapping, the memslot and the
//! configuration allow, write-protected or clean while the memslot logs
//! dirty pages. Every host mapping is validated against the MMU-notifier
//! retry protocol under the lock before it is installed (seed 004's first
//! rule); one that an invalidation raced is looked up again.

use crate::addr::{Gfn, Gpa, Level};
use crate::mem::{HostMapping, faultin_gfn};
use crate::mmu::cache::MmuCaches;
use crate::mmu::iter::SpteIter;
use crate::mmu::stats::MmuStats;

use super::{FaultOutcome, RootRef, TdpError, TdpFault, TdpMmu};

/// Why [`TdpMmu::pre_fault_memory`] stopped before the end of its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreFaultStop {
    /// No memslot holds the gpa: MMIO, which a pre-fault does not map
    /// (KVM answers `-ENOENT`).
    NoMemslot,
    /// The memslot holding the gpa is being deleted or moved.
    MemslotChanging,
    /// The root was invalidated: the vCPU must load its new root first
    /// (KVM answers `-EAGAIN` after the vCPU's requests).
    RootInvalid,
    /// The host could not provide a page (after some pages were mapped; a
    /// pre-fault that mapped nothing returns the error).
    Host,
    /// Invalidations of the same page kept racing with its mapping.
    Busy,
    /// A gfn the nested MMU tracks: its mapping is the fault path's
    /// business (a read fault maps it; a write is emulated).
    Tracked,
}

/// What a pre-fault did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreFaulted {
    /// Bytes from the start of the range that are now mapped.
    pub bytes: u64,
    /// Where and why it stopped early, if it did.
    pub stopped: Option<(Gpa, PreFaultStop)>,
}

/// Validation races tolerated on one page before a pre-fault gives up on
/// it ([`PreFaultStop::Busy`]).
const MAX_RETRIES: u32 = 1000;

impl TdpMmu {
    /// Maps the `len` bytes of guest-physical memory from `start` (4 KiB
    /// granular: the pages the range touches) as read faults of a vCPU on
    /// `root` would, before the guest touches them (KVM's
    /// `KVM_PRE_FAULT_MEMORY`). Stops at the first page it cannot map (no
    /// memslot, a memslot changing, the root invalidated, a gfn the nested
    /// MMU tracks) and says so; pages already mapped count as mapped.
    ///
    /// `caches` are the calling vCPU's (memslot cache, tables set aside
    /// before the lock). An allocation failure, or a host that cannot
    /// provide the first page, is an error; later, a stop.
    pub fn pre_fault_memory(
        &self,
        root: &RootRef,
        start: Gpa,
        len: u64,
        caches: &mut MmuCaches,
    ) -> Result<PreFaulted, TdpError> {
        let first = start.frame();
        let end = Gfn::new(start.raw().saturating_add(len).div_ceil(4096));
        if end.raw() > self.config.geometry.span() {
            return Err(TdpError::GpaBeyondTree {
                gpa: Gpa::new(end.raw() << 12),
                levels: self.config.geometry.levels,
            });
        }
        let epoch = crossbeam_epoch::pin();
        let slots = self.slots.load(root.root.as_id);
        let mut maps: Vec<(Gfn, HostMapping)> = Vec::with_capacity(512);
        let mut gfn = first;
        let mut retries = 0;
        let done = |gfn: Gfn, stop: Option<PreFaultStop>| PreFaulted {
            bytes: (gfn.raw().min(end.raw()) - first.raw()) << 12,
            stopped: stop.map(|s| (Gpa::new(gfn.raw() << 12), s)),
        };
        while gfn < end {
            if !root.root.is_valid() {
                return Ok(done(gfn, Some(PreFaultStop::RootInvalid)));
            }
            let Some(slot) = slots.lookup_cached(gfn, &mut caches.slots) else {
                return Ok(done(gfn, Some(PreFaultStop::NoMemslot)));
            };
            if slot.is_invalid() {
                return Ok(done(gfn, Some(PreFaultStop::MemslotChanging)));
            }
            if self
                .tracker
                .get()
                .is_some_and(|t| t.any_tracked() && t.is_tracked(gfn, gfn.add(512)))
            {
                return Ok(done(gfn, Some(PreFaultStop::Tracked)));
            }
            // The batch: to the end of gfn's 2 MiB region, the memslot and
            // the range. A huge host mapping is seen at its first page:
            // look that one up alone, the rest only if it maps 4K.
            let region_end = Gfn::new((gfn.raw() | 511) + 1).min(slot.end_gfn()).min(end);
            caches.pages.topup(self.tables_per_fault())?;
            maps.clear();
            let batch_end = if gfn.raw() & 511 == 0 { gfn.add(1) } else { region_end };
            let mut g = gfn;
            while g < batch_end {
                match faultin_gfn(&self.host, &self.invalidate, slot, g, false) {
                    Ok(m) => maps.push((g, m)),
                    Err(source) if g == first => {
                        return Err(TdpError::Host {
                            gpa: Gpa::new(g.raw() << 12),
                            source,
                        });
                    }
                    Err(_) if maps.is_empty() => return Ok(done(g, Some(PreFaultStop::Host))),
                    Err(_) => break,
                }
                g = g.add(1);
            }
            // Under the lock: validate and install, in order, until a race.
            // The root, valid when the lock was taken, stays valid until it
            // is dropped (roots are invalidated under the write lock). One
            // cursor serves a run of 4K leaves of one table: walked down
            // for the first, stepped sideways for each next one.
            let guard = self.lock.read();
            if !root.root.is_valid() {
                return Ok(done(gfn, Some(PreFaultStop::RootInvalid)));
            }
            let as_id = root.root.as_id;
            let mut next = gfn;
            let mut run: Option<SpteIter<'_>> = None;
            for (g, m) in maps.drain(..) {
                if g < next {
                    // Covered by a huge leaf installed from an earlier page.
                    continue;
                }
                let Ok(valid) = m.validate(&guard, &self.invalidate) else {
                    MmuStats::inc(&self.stats.local().pf_retry);
                    break;
                };
                let read = TdpFault {
                    gpa: Gpa::new(g.raw() << 12),
                    write: false,
                    exec: false,
                    present: false,
                };
                let (level, leaf) = self.fault_leaf(as_id, g, slot, &valid, &read, None, false)?;
                let at = g.align_down(level.pages());
                let beside =
                    level == Level::L1 && run.as_mut().is_some_and(|it| it.gfn().add(1) == at && it.step_side());
                if !beside {
                    let mut it = self.cursor(&epoch, root.root.pfn, level, at);
                    if self.descend(&guard, &mut it, as_id, level, &mut caches.pages).is_err() {
                        break;
                    }
                    run = Some(it);
                }
                let it = run.as_mut().expect("the cursor is at the leaf's slot");
                let outcome = self.set_leaf(it, as_id, leaf);
                if level > Level::L1 {
                    // A huge leaf ends the run: the next leaf is walked to.
                    run = None;
                }
                match outcome {
                    FaultOutcome::Fixed | FaultOutcome::Spurious => next = at.add(level.pages()),
                    _ => break,
                }
            }
            drop(guard);
            if next > gfn {
                gfn = next;
                retries = 0;
            } else {
                retries += 1;
                if retries >= MAX_RETRIES {
                    return Ok(done(gfn, Some(PreFaultStop::Busy)));
                }
                std::thread::yield_now();
            }
        }
        Ok(done(end, None))
    }
}
