//! Gfn write tracking across the MMUs (KVM's `page_track.c` and the
//! `indirect_shadow_pages` heuristic of `reexecute_instruction`).
//!
//! When the VM's nested MMU shadows an L1 hypervisor's nested tables, the
//! gfns of those tables hold entries that L1 writes through the TDP MMU,
//! which would otherwise map them writable: the shadow pages would go
//! stale without anyone noticing. So the shadow MMU, which knows which
//! gfns it shadows, is the [`WriteTracker`] of the TDP MMU, and the TDP MMU,
//! which maps them for L1, is a [`WriteProtector`] of the shadow MMU:
//!
//! - a gfn becomes tracked when the shadow MMU creates its first indirect
//!   page: the set is updated first, then every TDP mapping of the gfn goes
//!   (with its TLB entries) before the shadow page is used;
//! - a TDP fault on a tracked gfn maps it read-only and at 4K (KVM's
//!   `kvm_mmu_gfn_disallow_lpage`: no huge leaf covers a tracked gfn);
//!   a write is not mapped but emulated by the tracker, which writes the
//!   memory and zaps the shadow SPTEs built from the old entry (KVM's
//!   `kvm_mmu_track_write`); a page walk's A/D update there unprotects the
//!   gfn instead (KVM's `kvm_mmu_unprotect_gfn_and_retry`);
//! - unless the gfn's shadow pages may all go unsync (4K pages, KVM allows
//!   it for shadowed EPT12 and NPT12 as for a guest's tables): then the
//!   first write makes them unsync and the TDP MMU maps the gfn writable
//!   ([`WriteTracker::try_unsync`], [`WriteTracker::write_allowed`]); L1
//!   writes its leaf tables freely and makes L0 sync with INVEPT (or a
//!   VMRUN that flushes), and a sync takes the permission back (out of the
//!   set, then the TDP mappings write-protected) before it reads them;
//! - the TDP fault path asks first whether anything is tracked at all, a
//!   lockless read of the count of indirect shadow pages (seed 002: a
//!   false answer either way is harmless, the tracked set itself is what
//!   decides).
//!
//! Dirty logging of L1's memory: L2 writes it through NPT02 too, so a
//! harvest of the TDP MMU (`KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`)
//! write-protects the harvested pages in the nested MMU as well
//! ([`WriteTracker::protect_logged`], KVM's
//! `kvm_arch_mmu_enable_log_dirty_pt_masked` over both MMUs) before it
//! returns, so an L2 write after it faults and is logged (KVM's
//! `nested_dirty_log_test`). The dirty ring has no path from the nested
//! MMU yet: a VM with a nested MMU refuses it.
//!
//! Lock order: the shadow MMU's `mmu_lock` may be held while a
//! [`WriteProtector`] takes the TDP MMU's; the TDP MMU never holds its own
//! while it calls the tracker (its queries take only the tracked set's
//! leaf lock).

use crate::addr::{Gfn, Gpa};

/// How the TDP fault path reads the nested MMU's count of indirect shadow
/// pages (`WriteTracker::any_tracked`) before it asks whether its gfn is
/// tracked: seed 002's question, a runtime policy of the TDP MMU
/// ([`crate::mmu::tdp::TdpMmu::set_indirect_gate`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IndirectGate {
    /// A plain load (KVM since the thread: the heuristic is wrong either
    /// way only for a moment, and the tracked set decides).
    #[default]
    Lockless,
    /// Read with `mmu_lock` held for write, taken and dropped around the
    /// read (KVM before the thread: the answer is as stale once the lock
    /// is dropped, and every fault of a VM with a nested MMU serializes on
    /// the lock).
    UnderMmuLock,
}

/// Which gfns must not be written without a trap, and what a trapped
/// write does (the shadow MMU).
pub trait WriteTracker: Send + Sync {
    /// Whether anything may be tracked: a lockless heuristic, true when in
    /// doubt is not needed (a false negative is a race the protector
    /// closes).
    fn any_tracked(&self) -> bool;
    /// Whether a gfn in `start..end` is tracked.
    fn is_tracked(&self, start: Gfn, end: Gfn) -> bool;
    /// Whether the other MMU may map `gfn` writable: untracked, or every
    /// page shadowing it unsync ([`WriteTracker::try_unsync`]). Asked
    /// under the other MMU's lock, as `is_tracked`.
    fn write_allowed(&self, gfn: Gfn) -> bool;
    /// A write to tracked `gfn` by the other MMU's guest (L1): if every
    /// page shadowing it is a 4K page, marks them unsync and lets the other
    /// MMU map it writable until the next sync (KVM's
    /// `mmu_try_to_unsync_pages` from the TDP MMU's `make_spte`); false if
    /// the write must be emulated. Called without the other MMU's lock.
    fn try_unsync(&self, gfn: Gfn) -> bool;
    /// A write of `size` bytes of `value` at `gpa`, trapped: the tracker
    /// writes it and zaps what shadowed the old contents.
    fn track_write(&self, gpa: Gpa, size: usize, value: u64);
    /// The page-walk update of an entry at `gpa` trapped: stop tracking
    /// the gfn (its shadow pages go); whether anything was unprotected.
    fn unprotect(&self, gpa: Gpa) -> bool;
    /// A dirty-log harvest took the bits `bits` of memslot `slot_id` (bit
    /// 0 is page `first_page` of the slot): write-protects those pages in
    /// the tracker's own tables, with TLBs flushed before it returns.
    fn protect_logged(&self, as_id: u16, slot_id: u16, first_page: u64, bits: &[u64]);
}

/// An MMU that maps gfns another MMU tracks (the TDP MMU).
pub trait WriteProtector: Send + Sync {
    /// Removes every writable mapping of `gfn` (address space 0), and the
    /// TLB entries made from them, before it returns.
    fn write_protect_gfn(&self, gfn: Gfn);
}
