//! Prefetch of neighbouring guest entries (KVM's `FNAME(pte_prefetch)`).
//!
//! After a fault installs a 4K SPTE, the other entries of its aligned group
//! of [`PTE_PREFETCH_NUM`] are installed too when the guest has already
//! used them (Accessed set) and the host page is mapped now: a guest that
//! touches one page of a region usually touches its neighbours next.
//! Prefetch never faults a host page in, never sets a guest A/D bit, never
//! makes a page table unsync, skips slots that log dirty pages, and skips a
//! host range whose invalidation is in progress (an invalidation that
//! starts later takes the MMU lock, held here, and zaps what this installs).

use super::access::{Leaf, leaf_rights, spte_access};
use super::change::NewSpte;
use super::page::{PageId, Pages, SptePtr};
use super::{LockedMemory, RMAP_RECYCLE_THRESHOLD, ShadowMmu};
use crate::addr::{Gva, Level};
use crate::arch::perm::{Access, AccessKind, AccessRights};
use crate::walker::{GuestPaging, Root};

/// Entries looked at around a fault (KVM's `PTE_PREFETCH_NUM`).
pub const PTE_PREFETCH_NUM: usize = 8;

impl ShadowMmu {
    /// Prefetches the neighbours of entry `index` of the 4K page `sp`,
    /// which the fault at `gva` just filled.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn prefetch(
        &self,
        pages: &mut Pages,
        sp: PageId,
        index: usize,
        gva: Gva,
        paging: &GuestPaging,
        groot: &Root,
        as_id: u16,
    ) {
        let page = pages.page(sp);
        if page.role.is_direct() || page.role.level() != Level::L1 {
            return;
        }
        let (table, role, table_gfn) = (page.pfn, page.role, page.gfn);
        let gpte = role.gpte_bits();
        let first = index & !(PTE_PREFETCH_NUM - 1);
        // The group's guest entries in one read: most groups of a fresh
        // mapping have none accessed, and need no walk at all.
        let guest_table = super::sync::GuestTable::of(page);
        let size = guest_table.entry_size();
        let mut buf = [0u8; 8 * PTE_PREFETCH_NUM];
        let raw = &mut buf[..size * PTE_PREFETCH_NUM];
        if self.memory.read_atomic(guest_table.gpa(first), raw).is_err() {
            return;
        }
        let used = |k: usize| -> bool {
            let b = &raw[k * size..(k + 1) * size];
            let v = b.iter().rev().fold(0u64, |v, &x| v << 8 | u64::from(x));
            gpte.is_used(v)
        };
        if !(0..PTE_PREFETCH_NUM).any(|k| first + k != index && used(k)) {
            return;
        }
        let slots = self.slots.load(as_id);
        for j in first..first + PTE_PREFETCH_NUM {
            let ptr = SptePtr { table, index: j as u16 };
            if j == index || !used(j - first) || Pages::spte(&self.arena, ptr).is_mmu_present() {
                continue;
            }
            let va = Gva::new((gva.raw() & !(0x1ff << 12)) | (j as u64) << 12);
            // A read as the kernel with AC set: the walk's rights are what
            // the guest's entries grant; nothing is written.
            let read = Access::new(AccessKind::Read, 0, true);
            let Ok(walk) = paging.peek(&LockedMemory(&self.memory), groot, va, read, 0) else {
                continue;
            };
            let Some(e) = walk.entry(1).filter(|e| walk.level == 1 && e.table_gfn == table_gfn) else {
                continue;
            };
            if !gpte.is_used(e.pte) {
                continue; // never used by the guest: leave it to a fault
            }
            // A read: no protection key changes what it may build.
            let Leaf::Map(mut rights) = leaf_rights(&role, walk.rights, walk.dirty, read, false) else {
                continue;
            };
            let gfn = walk.gfn();
            let Some(slot) = slots.lookup(gfn).filter(|s| !s.is_invalid() && !s.logs_dirty_pages()) else {
                continue;
            };
            let Some(hva) = slot.gfn_to_hva(gfn) else { continue };
            if self.invalidate.in_progress_covers(hva) || pages.rmap_len(gfn) >= RMAP_RECYCLE_THRESHOLD {
                continue;
            }
            let Some(host) = self.host.lookup(hva) else { continue };
            let tracked = pages.is_write_tracked(gfn);
            if tracked || slot.is_readonly() {
                rights.remove(AccessRights::WRITE);
            }
            let leaf = self.fmt.make_leaf(
                Level::L1,
                host.pfn,
                spte_access(&role, rights),
                host.writable,
                !tracked,
                true,
            );
            let leaf = leaf.with_pkey(walk.pkey);
            let new = NewSpte::Leaf { spte: leaf, gfn, slot };
            // Only empty entries are prefetched: nothing to flush.
            self.set_spte(pages, ptr, Level::L1, new)
                .waive("a prefetch fills an empty entry");
            pages.record_gpte(sp, j, gpte.as_walked(e.pte, walk.dirty));
            tracing::trace!(target: "kvm_mmu_prefetch", gfn = gfn.raw(), index = j);
        }
    }
}
