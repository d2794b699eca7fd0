//! The shadow MMU's self-check, under the lock: the rules of write
//! protection and unsync hold, every sync page agrees with its guest table,
//! and every leaf SPTE grants no more than its memslot and host mapping
//! allow, at the frame the host maps now.

use std::collections::HashSet;
use std::fmt;

use super::ShadowMmu;
use super::page::{ENTRIES, Pages, SptePtr};
use super::sync::GuestTable;
use crate::addr::{Gfn, Level};
use crate::mmu::tdp::AuditViolation;

/// One way the shadow MMU's state is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShadowAuditViolation {
    /// A page other than an indirect 4K page is unsync (seed 000).
    UnsyncAboveLeaf {
        /// The guest table.
        gfn: Gfn,
        /// Its level.
        level: Level,
    },
    /// An unsync-children bit disagrees with the child it names, or the
    /// count with the bits.
    UnsyncBitmap {
        /// The guest table of the parent.
        gfn: Gfn,
        /// The parent's level.
        level: Level,
        /// The entry (`None`: the count is wrong).
        index: Option<usize>,
    },
    /// The lockless count of unsync pages is not the number of them.
    UnsyncCount {
        /// The count.
        counted: u64,
        /// Unsync pages found.
        found: u64,
    },
    /// An SPTE of a sync page no longer translates as its guest entry
    /// does: a write to the guest table was missed.
    StaleSyncSpte {
        /// The guest table.
        gfn: Gfn,
        /// The entry.
        index: usize,
        /// The guest entry the SPTE was built from.
        recorded: u64,
        /// The guest entry now.
        now: u64,
    },
    /// A writable SPTE maps a guest page table that has a sync shadow
    /// page: guest writes to it would not be seen.
    WritableGuestTable {
        /// The guest table.
        gfn: Gfn,
    },
    /// A leaf SPTE is wrong against its memslot or the host.
    Frame(AuditViolation),
    /// A writable SPTE maps a page of a slot with dirty logging on whose
    /// bit is clear: the page was harvested (or never logged) and a guest
    /// write through the SPTE would be lost to the next harvest. (The
    /// shadow MMU makes SPTEs writable and logs the page under the lock, so
    /// this holds at every audit; the TDP MMU's lockless fast path logs
    /// just after its compare-exchange, as KVM's does, so there the
    /// simulator checks every write instead.)
    WritableNotLogged {
        /// The page.
        gfn: Gfn,
    },
    /// More shadow pages than the limit (KVM's `n_max_mmu_pages`) allows:
    /// only pages reclaim cannot take (roots in use, invalid roots not yet
    /// released) may pass it.
    OverLimit {
        /// Pages live.
        pages: u64,
        /// The limit.
        max: u64,
        /// Pages reclaim cannot take.
        pinned: u64,
    },
}

impl fmt::Display for ShadowAuditViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl ShadowMmu {
    /// Checks every shadow page, under the lock (no fault, zap or emulated
    /// write in flight). Guest memory written behind the MMU's back (not by
    /// a vCPU) shows as [`ShadowAuditViolation::StaleSyncSpte`], as it
    /// would be a missed write. Memslot updates are held off meanwhile, so
    /// that none is caught between its new snapshot and the MMU's commit.
    /// Returns every violation found.
    pub fn audit(&self) -> Vec<ShadowAuditViolation> {
        let _slots_lock = self.slots.slots_lock();
        let mut guard = self.lock.write();
        let pages = &mut *guard;
        let mut out = Vec::new();
        let mut unsync = 0u64;
        let mut sync_tables = HashSet::new();
        for id in pages.ids() {
            let p = pages.page(id);
            if p.is_unsync() {
                unsync += 1;
                if pages.leaf(id).is_none() {
                    out.push(ShadowAuditViolation::UnsyncAboveLeaf {
                        gfn: p.gfn,
                        level: p.role.level(),
                    });
                }
            } else if !p.role.is_direct() && !p.invalid {
                sync_tables.insert(p.gfn);
            }
            if p.role.level() > Level::L1 {
                self.audit_bitmap(pages, id, &mut out);
            } else if pages.leaf(id).is_some() && !p.is_unsync() {
                self.audit_sync_page(pages, id, &mut out);
            }
        }
        let (live, max, pinned) = (pages.len() as u64, self.max_pages(), pages.pinned() as u64);
        if live > max + pinned {
            out.push(ShadowAuditViolation::OverLimit {
                pages: live,
                max,
                pinned,
            });
        }
        let counted = self.unsync_page_count();
        if counted != unsync {
            out.push(ShadowAuditViolation::UnsyncCount { counted, found: unsync });
        }
        self.audit_leaves(pages, &sync_tables, &mut out);
        out
    }

    fn audit_bitmap(&self, pages: &Pages, id: super::page::PageId, out: &mut Vec<ShadowAuditViolation>) {
        let p = pages.page(id);
        let mut bits = 0;
        for index in 0..ENTRIES {
            let spte = Pages::spte(
                &self.arena,
                SptePtr {
                    table: p.pfn,
                    index: index as u16,
                },
            );
            let child = spte.is_mmu_present().then(|| pages.by_pfn(spte.pfn())).flatten();
            let want = child.is_some_and(|c| pages.page(c).has_unsync());
            if p.unsync_child(index) {
                bits += 1;
            }
            if want != p.unsync_child(index) {
                out.push(ShadowAuditViolation::UnsyncBitmap {
                    gfn: p.gfn,
                    level: p.role.level(),
                    index: Some(index),
                });
            }
        }
        if bits != p.unsync_child_count() {
            out.push(ShadowAuditViolation::UnsyncBitmap {
                gfn: p.gfn,
                level: p.role.level(),
                index: None,
            });
        }
    }

    fn audit_sync_page(&self, pages: &Pages, id: super::page::PageId, out: &mut Vec<ShadowAuditViolation>) {
        let p = pages.page(id);
        let table = GuestTable::of(p);
        for index in 0..ENTRIES {
            let ptr = SptePtr {
                table: p.pfn,
                index: index as u16,
            };
            if !Pages::spte(&self.arena, ptr).is_mmu_present() {
                continue;
            }
            // Read without faulting (the lock is held): an entry the host
            // has not resident now cannot be checked this time.
            let mut b = [0u8; 8];
            let now = match self.memory.read_atomic(table.gpa(index), &mut b[..table.entry_size()]) {
                Ok(()) => u64::from_le_bytes(b),
                Err(crate::mem::GuestMemoryError::NotResident { .. }) => continue,
                Err(_) => 0,
            };
            let recorded = p.gpte(index).unwrap_or(0);
            // A table the guest cannot write: its A/D bits stay as the
            // guest left them, the walk counted them as set.
            let now = if p.role.gpte_bits().still_valid(recorded, now)
                || super::table_writable(&self.slots.load(u16::from(p.role.smm())), table.gpa(index))
            {
                now
            } else {
                now | (recorded & p.role.gpte_bits().ad())
            };
            // Checked after the read: an emulated write in flight has stored
            // the new entry and waits for the lock (held here) to zap the
            // SPTE built from the old one, and counts until it has.
            if !p.role.gpte_bits().still_valid(recorded, now)
                && self.emulating.load(std::sync::atomic::Ordering::Acquire) == 0
            {
                out.push(ShadowAuditViolation::StaleSyncSpte {
                    gfn: p.gfn,
                    index,
                    recorded,
                    now,
                });
            }
        }
    }

    fn audit_leaves(&self, pages: &Pages, sync_tables: &HashSet<Gfn>, out: &mut Vec<ShadowAuditViolation>) {
        let slots = self.slots.load(0);
        for (gfn, ptr) in pages.rmap_range(Gfn::new(0), Gfn::new(u64::MAX)) {
            let spte = Pages::spte(&self.arena, ptr);
            if !spte.is_mmu_present() {
                continue;
            }
            let writable = spte.is_writable(self.fmt);
            if writable && sync_tables.contains(&gfn) {
                out.push(ShadowAuditViolation::WritableGuestTable { gfn });
            }
            let Some(slot) = slots.lookup(gfn) else {
                out.push(ShadowAuditViolation::Frame(AuditViolation::OutsideMemslots {
                    as_id: 0,
                    gfn,
                    spte,
                }));
                continue;
            };
            let Some(hva) = slot.gfn_to_hva(gfn) else { continue };
            if self.invalidate.sole_invalidation_covers(hva) {
                out.push(ShadowAuditViolation::Frame(AuditViolation::InInvalidatedRange {
                    gfn,
                    hva,
                }));
                continue;
            }
            let pfn = spte.pfn();
            if self.arena.is_freed(pfn) {
                out.push(ShadowAuditViolation::Frame(AuditViolation::FreedFrame { gfn, pfn }));
                continue;
            }
            let host = self.host.lookup(hva);
            match host {
                Some(h) if h.pfn == pfn => {
                    if writable && (slot.is_readonly() || !h.writable) {
                        out.push(ShadowAuditViolation::Frame(AuditViolation::WritableNotAllowed {
                            gfn,
                            spte,
                        }));
                    }
                    if writable
                        && let Some(bitmap) = slot.dirty_bitmap()
                        && !bitmap.is_dirty(gfn.raw() - slot.base_gfn().raw())
                    {
                        out.push(ShadowAuditViolation::WritableNotLogged { gfn });
                    }
                }
                _ => out.push(ShadowAuditViolation::Frame(AuditViolation::StaleFrame {
                    gfn,
                    hva,
                    spte_pfn: pfn,
                    host_pfn: host.map(|h| h.pfn),
                })),
            }
        }
    }
}
