//! The TDP MMU's self-check: every installed SPTE grants no more than the
//! memslot and the host mapping allow, and points at the frame the host
//! maps now (SYSTEM.md, "against itself").

use std::fmt;

use super::TdpMmu;
use crate::addr::{Gfn, Hva, Level, Pfn};
use crate::mmu::spte::Spte;

/// One way an SPTE is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditViolation {
    /// An SPTE maps a gfn no memslot holds.
    OutsideMemslots {
        /// The address space.
        as_id: u16,
        /// The first gfn the SPTE maps.
        gfn: Gfn,
        /// The SPTE.
        spte: Spte,
    },
    /// A writable SPTE for a read-only memslot or a read-only host mapping.
    WritableNotAllowed {
        /// The gfn.
        gfn: Gfn,
        /// The SPTE.
        spte: Spte,
    },
    /// The SPTE's frame is not the one the host maps at the hva now (moved,
    /// swapped out, unmapped).
    StaleFrame {
        /// The gfn.
        gfn: Gfn,
        /// The hva.
        hva: Hva,
        /// The frame the SPTE maps.
        spte_pfn: Pfn,
        /// The frame the host maps, if any.
        host_pfn: Option<Pfn>,
    },
    /// The SPTE's frame has been freed by the host.
    FreedFrame {
        /// The gfn.
        gfn: Gfn,
        /// The frame.
        pfn: Pfn,
    },
    /// A huge SPTE larger than the host mapping.
    TooLarge {
        /// The gfn.
        gfn: Gfn,
        /// The SPTE's level.
        level: Level,
        /// The host mapping's level.
        host_level: Level,
    },
    /// An SPTE survives inside a range whose invalidation is in progress.
    InInvalidatedRange {
        /// The gfn.
        gfn: Gfn,
        /// The hva.
        hva: Hva,
    },
    /// A writable huge SPTE in a memslot that logs dirty pages by write
    /// protection, over a page whose dirty bit is clear: writes to that
    /// page would go unlogged. (The fast path never makes a huge SPTE
    /// writable in a logging slot; one survives from before logging only
    /// while every page it maps counts as dirty, as with an initially-set
    /// bitmap.)
    WritableHugeNotLogged {
        /// The first gfn the SPTE maps.
        gfn: Gfn,
        /// The page whose bit is clear.
        page: Gfn,
        /// The SPTE's level.
        level: Level,
        /// The SPTE.
        spte: Spte,
    },
}

impl fmt::Display for AuditViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl TdpMmu {
    /// Checks every leaf SPTE of every valid root against the memslots and
    /// the host mapping, under the write lock (so no fault or zap is in
    /// flight) and with memslot updates held off (so none is between its
    /// new snapshot and the MMU's commit: a slot that has just started
    /// logging keeps its writable huge leaves until the commit
    /// write-protects them, as in KVM, and that is no violation). Returns
    /// every violation found.
    pub fn audit(&self) -> Vec<AuditViolation> {
        let _slots_lock = self.slots.slots_lock();
        let _guard = self.lock.write();
        let mut out = Vec::new();
        let roots: Vec<_> = self.roots.lock().valid.clone();
        for root in roots {
            let slots = self.slots.load(root.as_id);
            let epoch = crossbeam_epoch::pin();
            let mut it = self.cursor(&epoch, root.pfn, Level::L1, Gfn::new(0));
            while it.valid() {
                let spte = it.old_spte();
                let level = it.level();
                if !(spte.is_mmu_present() && spte.is_leaf(level)) {
                    it.next();
                    continue;
                }
                let gfn = it.gfn();
                let pages = self.config.geometry.pages(level);
                it.skip_subtree();
                if level > Level::L1 && spte.is_writable(self.fmt) && !self.dirty_bit_logging() {
                    let unlogged = (0..pages).map(|i| gfn.add(i)).find(|&g| {
                        slots.lookup(g).is_some_and(|s| {
                            s.dirty_bitmap().is_some_and(|b| {
                                !b.is_dirty(g.raw() - s.base_gfn().raw()) || self.dirty_ring_size().is_some()
                            })
                        })
                    });
                    if let Some(page) = unlogged {
                        out.push(AuditViolation::WritableHugeNotLogged { gfn, page, level, spte });
                    }
                }
                // Every 4K page the SPTE maps is checked.
                for i in 0..pages {
                    let g = gfn.add(i);
                    let pfn = spte.pfn().add(i);
                    let Some(slot) = slots.lookup(g) else {
                        out.push(AuditViolation::OutsideMemslots {
                            as_id: root.as_id,
                            gfn: g,
                            spte,
                        });
                        break;
                    };
                    let Some(hva) = slot.gfn_to_hva(g) else { continue };
                    if self.invalidate.sole_invalidation_covers(hva) {
                        out.push(AuditViolation::InInvalidatedRange { gfn: g, hva });
                        break;
                    }
                    if self.arena.is_freed(pfn) {
                        out.push(AuditViolation::FreedFrame { gfn: g, pfn });
                        break;
                    }
                    let found = self.host.lookup(hva);
                    let Some(host) = found.filter(|h| h.pfn == pfn) else {
                        out.push(AuditViolation::StaleFrame {
                            gfn: g,
                            hva,
                            spte_pfn: pfn,
                            host_pfn: found.map(|h| h.pfn),
                        });
                        break;
                    };
                    if level > host.level {
                        out.push(AuditViolation::TooLarge {
                            gfn: g,
                            level,
                            host_level: host.level,
                        });
                        break;
                    }
                    if spte.is_writable(self.fmt) && (slot.is_readonly() || !host.writable) {
                        out.push(AuditViolation::WritableNotAllowed { gfn: g, spte });
                        break;
                    }
                }
            }
        }
        out
    }
}
