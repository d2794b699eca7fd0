//! The guest OS model: an operating system that keeps real x86 page
//! tables in guest memory and changes them only through its vCPUs' memory
//! accesses, as Linux does.
//!
//! - **Kernel half.** The VMM builds a direct map of all RAM at boot
//!   (global 1 GiB pages in IA-32e paging, 2 MiB in PAE, 4 MiB in 32-bit
//!   paging). Every process's root table links the same kernel entries,
//!   and the kernel reaches every page table and data page through the
//!   direct map: a PTE store is a CPL 0 store of 4 or 8 bytes at
//!   `page_offset + gpa`, so the shadow MMU sees it as the processor
//!   would make it (trapped and emulated, or unsync).
//! - **Processes** ([`Mm`]): mappings, demand paging, fork with
//!   copy-on-write (private pages write-protected in parent and child,
//!   broken on the guest's own #PF), munmap, mprotect, and "remap" (moving
//!   pages to fresh frames: writes to live tables).
//! - **TLB maintenance as a correct OS does it**: INVLPG for up to
//!   [`FLUSH_CEILING`] pages, a full flush above; shootdowns to the other
//!   vCPUs running the address space; PCIDs with a per-address-space
//!   generation (Linux's `tlb_gen`), so a vCPU flushes a PCID it used
//!   earlier only if the address space changed since.
//! - **Page-table pages** come from the same LIFO allocator as data and
//!   are freed when empty (after the flush), so a freed table is reused
//!   at once as data or as another table, zeroed with `rep stosq`.
//!
//! Concurrency is the mm's lock, like Linux's `mmap_lock`: user code runs
//! a quantum of accesses under the read side; every change of an address
//! space takes the write side. A change posts its shootdowns to the
//! mailboxes of the vCPUs running the address space before it releases
//! the lock, and a vCPU processes its mailbox each time it takes the read
//! side, before its next user access: the model of an IPI delivered at
//! the next instruction boundary, with the initiator waiting for it.

mod adversary;
pub mod alloc;
pub mod format;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::checker::Checker;
pub use alloc::FrameAllocator;
pub use format::PagingFormat;
use vmmu::addr::Gpa;
use vmmu::arch::control::{CR3_NOFLUSH, Cr4};
use vmmu::arch::perm::AccessKind;
use vmmu::cpu::vcpu::{AccessResult, GuestSession, StringRegs, Vcpu, VcpuError};
use vmmu::mem::GuestMemory;
use vmmu::vm::DirtyRings;

/// Pages up to which a change is flushed page by page with INVLPG; above
/// it, a full flush (Linux's `tlb_single_page_flush_ceiling`).
pub const FLUSH_CEILING: u64 = 33;
/// PCIDs a vCPU cycles through (Linux's `TLB_NR_DYN_ASIDS`).
pub const PCID_SLOTS: usize = 6;
/// Frames below this gfn are left alone (the first MiB).
const FIRST_GFN: u64 = 256;

/// A mapping of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    /// A unique id.
    pub id: u64,
    /// First linear address.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// Whether user writes are allowed.
    pub writable: bool,
    /// Backed by huge pages where aligned.
    pub huge: bool,
}

impl Vma {
    /// Pages in the mapping.
    pub fn pages(&self) -> u64 {
        (self.end - self.start) >> 12
    }
}

/// A leaf the OS installed: what the guest's tables say for the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The first frame mapped.
    pub gfn: u64,
    /// The entry's R/W bit.
    pub writable: bool,
    /// Shared copy-on-write.
    pub cow: bool,
    /// 1 for 4 KiB, 2 for a huge page.
    pub level: u8,
}

#[derive(Clone, Copy, Debug)]
struct Table {
    gpa: u64,
    used: u32,
    pinned: bool,
}

/// An address space's state, under its lock.
#[derive(Debug)]
pub struct MmState {
    root: u64,
    vmas: BTreeMap<u64, Vma>,
    /// Leaves by the page number of their first page.
    leaves: BTreeMap<u64, Leaf>,
    /// Tables by (level, va >> shift(level + 1)).
    tables: BTreeMap<(u8, u64), Table>,
    dead: bool,
}

impl MmState {
    /// The mappings.
    pub fn vmas(&self) -> impl Iterator<Item = &Vma> {
        self.vmas.values()
    }

    /// The mapping with `id`.
    pub fn vma(&self, id: u64) -> Option<Vma> {
        self.vmas.values().find(|v| v.id == id).copied()
    }

    /// The leaf mapping `va` and its first page's address, if any.
    pub fn leaf(&self, format: &PagingFormat, va: u64) -> Option<(u64, Leaf)> {
        if let Some(l) = self.leaves.get(&(va >> 12)) {
            return Some((va & !0xfff, *l));
        }
        let base = va & !(format.huge_size() - 1);
        self.leaves
            .get(&(base >> 12))
            .filter(|l| l.level == 2)
            .map(|l| (base, *l))
    }

    /// The guest-physical address `va` translates to, with the leaf.
    pub fn translate(&self, format: &PagingFormat, va: u64) -> Option<(u64, Leaf)> {
        self.leaf(format, va).map(|(base, l)| ((l.gfn << 12) + (va - base), l))
    }

    /// The first page numbers of the leaves that start in `[start, end)`,
    /// in order.
    fn leaf_pages(&self, start: u64, end: u64) -> Vec<u64> {
        self.leaves.range(start >> 12..end >> 12).map(|(vpn, _)| *vpn).collect()
    }

    /// Every leaf, by first page number.
    pub fn leaves(&self) -> impl Iterator<Item = (u64, &Leaf)> {
        self.leaves.iter().map(|(vpn, l)| (*vpn, l))
    }

    /// The root table's address (CR3 without PCID).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Whether the process has exited.
    pub fn is_dead(&self) -> bool {
        self.dead
    }
}

/// An address space (Linux's `mm_struct`).
#[derive(Debug)]
pub struct Mm {
    /// A unique id.
    pub id: u64,
    /// The root table's address (fixed for the address space's life).
    pub root: u64,
    /// The state, under the mm lock.
    pub state: RwLock<MmState>,
    /// vCPUs running it now, one bit each.
    cpumask: AtomicU64,
    /// Bumped by every change that needs a flush.
    tlb_gen: AtomicU64,
    /// Threads alive.
    threads: AtomicU32,
    /// Threads it was created with (the stripe count of its data).
    pub nthreads: u32,
}

/// A TLB shootdown posted to a vCPU.
#[derive(Clone, Debug)]
struct Shootdown {
    mm: u64,
    tlb_gen: u64,
    /// Pages to INVLPG, or `None` for a full flush.
    pages: Option<Vec<u64>>,
}

/// The OS's counters.
#[derive(Debug, Default)]
pub struct OsStats {
    /// Processes created (boot and fork).
    pub processes: AtomicU64,
    /// #PF the guest took and handled.
    pub guest_faults: AtomicU64,
    /// Copy-on-write breaks.
    pub cow_breaks: AtomicU64,
    /// TLB flush instructions (INVLPG, flushing CR3 loads, INVPCID).
    pub flushes: AtomicU64,
    /// Shootdowns sent.
    pub shootdowns: AtomicU64,
    /// Page-table pages allocated.
    pub tables_allocated: AtomicU64,
    /// Page-table pages freed.
    pub tables_freed: AtomicU64,
    /// Huge mappings split.
    pub huge_splits: AtomicU64,
    /// Allocations that failed (guest out of memory).
    pub oom: AtomicU64,
    /// Adversarial operations done (self maps, recursive maps, control
    /// bit toggles).
    pub adversarial: AtomicU64,
}

/// The OS: memory, the kernel map, the address spaces' shared services.
#[derive(Debug)]
pub struct Os {
    /// The paging mode.
    pub format: PagingFormat,
    alloc: Mutex<FrameAllocator>,
    /// The kernel's root (init_mm): what idle vCPUs run on.
    kernel_root: u64,
    /// The top-level entries every root copies (index, entry).
    kernel_entries: Vec<(u64, u64)>,
    next_id: AtomicU64,
    live: AtomicU32,
    mailboxes: Vec<Mutex<Vec<Shootdown>>>,
    /// Counters.
    pub stats: OsStats,
}

/// Why a guest operation could not complete.
#[derive(Debug, thiserror::Error)]
pub enum OsError {
    /// A vCPU failed (the MMU returned an error).
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The guest ran out of memory.
    #[error("guest out of memory")]
    Oom,
    /// The kernel's own access through the direct map failed: checked,
    /// and reported by the checker; the operation stops.
    #[error("kernel access through the direct map failed")]
    Kernel,
}

/// How a guest #PF was handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultFix {
    /// A page was mapped (demand paging) or copied (COW): retry.
    Fixed,
    /// Nothing to do: another thread fixed it meanwhile; retry.
    Spurious,
    /// No mapping allows the access (the program would get SIGSEGV).
    Segv,
}

/// The per-vCPU part of the OS: the vCPU, its PCIDs and what it runs.
#[derive(Debug)]
pub struct GuestCpu {
    /// Index of the vCPU.
    pub id: usize,
    /// The vCPU.
    pub vcpu: Vcpu,
    /// The mm running, if any.
    current: Option<Arc<Mm>>,
    /// (mm id, tlb_gen flushed up to, last use) per PCID slot.
    slots: [(u64, u64, u64); PCID_SLOTS],
    clock: u64,
    /// The next write's stamp.
    stamp: u64,
    /// Accesses made (kernel and user).
    pub accesses: u64,
    /// The VMM's dirty-ring reaper, with the dirty ring on.
    rings: Option<Arc<DirtyRings>>,
}

/// Accesses made in guest mode back to back (see [`GuestCpu::user_run`]).
pub struct UserRun<'a> {
    session: GuestSession<'a>,
    stamp: &'a mut u64,
    accesses: &'a mut u64,
    rings: Option<&'a DirtyRings>,
}

impl UserRun<'_> {
    /// [`GuestCpu::access`] in the run.
    #[inline]
    pub fn access(
        &mut self,
        va: u64,
        kind: AccessKind,
        cpl: u8,
        size: usize,
        value: u64,
    ) -> Result<AccessResult, VcpuError> {
        let session = &mut self.session;
        retrying_efault(self.rings, || session.access(va, kind, cpl, false, size, value))
    }

    /// [`GuestCpu::next_stamp`].
    #[inline]
    pub fn next_stamp(&mut self) -> u64 {
        *self.stamp += 1;
        *self.stamp
    }

    /// The CPU's access count ([`GuestCpu::accesses`]).
    #[inline]
    pub fn accesses(&mut self) -> &mut u64 {
        self.accesses
    }

    /// The vCPU, to read.
    pub fn vcpu(&self) -> &Vcpu {
        self.session.vcpu()
    }
}

/// Runs `op` again while the host refuses it (EFAULT: a page the host
/// churn thread made inaccessible for a moment), yielding in between.
#[inline]
/// The VMM's loop around an access: an `EFAULT` (the host refused the
/// page for a moment) is retried after a yield, and a full dirty ring is
/// reaped (by this vCPU's thread, as QEMU's vCPU threads do) before the
/// access is issued again.
fn retrying_efault(
    rings: Option<&DirtyRings>,
    mut op: impl FnMut() -> Result<AccessResult, VcpuError>,
) -> Result<AccessResult, VcpuError> {
    for _ in 0..EFAULT_RETRIES {
        match op() {
            Err(e) if is_efault(&e) => std::thread::yield_now(),
            Ok(AccessResult::DirtyRingFull) if rings.is_some() => {
                rings.map(DirtyRings::reap);
            }
            r => return r,
        }
    }
    op()
}

/// Host refusals retried before an access gives up (the host churn
/// thread restores a page it made read-only within microseconds).
const EFAULT_RETRIES: u32 = 1_000_000;

fn is_efault(e: &VcpuError) -> bool {
    matches!(
        e,
        VcpuError::Mmu(vmmu::mmu::tdp::TdpError::Host { .. })
            | VcpuError::Shadow(vmmu::mmu::shadow::ShadowError::Host { .. })
    )
}

impl Os {
    /// Boots the OS on `memory` of `ram` bytes: builds the kernel's direct
    /// map (as a VMM writes boot page tables) and the allocator.
    pub fn boot(format: PagingFormat, memory: &GuestMemory, ram: u64, vcpus: usize) -> Result<Os, String> {
        if ram > format.max_ram() {
            return Err(format!(
                "{} paging maps at most {} MiB of RAM in the kernel's direct map; asked for {} MiB",
                format.name(),
                format.max_ram() >> 20,
                ram >> 20
            ));
        }
        let mut alloc = FrameAllocator::new(FIRST_GFN, ram >> 12);
        let mut take = || {
            alloc
                .alloc()
                .map(|g| g << 12)
                .ok_or("no memory for the kernel's tables")
        };
        let w = |gpa: u64, v: u64| -> Result<(), String> {
            let r = if format.entry_size() == 4 {
                memory.write_u32(Gpa::new(gpa), v as u32)
            } else {
                memory.write_u64(Gpa::new(gpa), v)
            };
            r.map_err(|e| format!("writing the boot page tables: {e}"))
        };
        let es = format.entry_size();
        let top = format.levels();
        let po = format.page_offset();
        let kernel_root = take()?;
        // The direct map's leaves, and the chain of tables above them.
        let leaf_level = format.direct_map_level();
        let leaf_size = 1u64 << format.shift(leaf_level);
        let leaves = ram.div_ceil(leaf_size);
        let mut table = kernel_root;
        let mut kernel_entries = Vec::new();
        for level in (leaf_level + 1..=top).rev() {
            let next = take()?;
            let e = format.table_entry(next, level);
            let i = format.index(po, level);
            w(table + i * es, e)?;
            if level == top {
                kernel_entries.push((i, e));
            }
            table = next;
        }
        for n in 0..leaves {
            let va = po + n * leaf_size;
            let e = format.leaf_entry(n * leaf_size, leaf_level, true, false);
            let i = format.index(va, leaf_level);
            w(table + i * es, e)?;
            if leaf_level == top {
                kernel_entries.push((i, e));
            }
        }
        Ok(Os {
            format,
            alloc: Mutex::new(alloc),
            kernel_root,
            kernel_entries,
            next_id: AtomicU64::new(1),
            live: AtomicU32::new(0),
            mailboxes: (0..vcpus).map(|_| Mutex::new(Vec::new())).collect(),
            stats: OsStats::default(),
        })
    }

    /// The root idle vCPUs run on (CR3 at boot).
    pub fn kernel_cr3(&self) -> u64 {
        self.kernel_root
    }

    /// Live processes.
    pub fn live_processes(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }

    /// Free guest frames.
    pub fn free_frames(&self) -> u64 {
        self.alloc.lock().free_frames()
    }

    fn alloc_frame(&self) -> Result<u64, OsError> {
        self.alloc.lock().alloc().ok_or_else(|| {
            self.stats.oom.fetch_add(1, Ordering::Relaxed);
            OsError::Oom
        })
    }

    // ---- kernel memory access through the direct map ----

    /// A kernel store of one entry (4 or 8 bytes) at `gpa`.
    fn store(&self, cpu: &mut GuestCpu, ck: &Checker, gpa: u64, value: u64) -> Result<(), OsError> {
        let size = self.format.entry_size() as usize;
        self.kernel_access(cpu, ck, gpa, AccessKind::Write, size, value)
            .map(|_| ())
    }

    fn kernel_access(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        gpa: u64,
        kind: AccessKind,
        size: usize,
        value: u64,
    ) -> Result<u64, OsError> {
        let va = self.format.page_offset() + gpa;
        tracing::trace!(target: "vmmu_guest_store", gpa, value, write = kind == AccessKind::Write);
        let r = cpu.access(va, kind, 0, size, value)?;
        cpu.accesses += 1;
        match r {
            AccessResult::Done { gpa: got, value, mmio } if got.raw() == gpa && !mmio => Ok(value),
            other => {
                ck.violation(
                    cpu.id,
                    va,
                    gpa,
                    "a kernel access through the direct map to complete at this gpa",
                    &format!("{other:?}"),
                );
                Err(OsError::Kernel)
            }
        }
    }

    /// Zeroes the frame at `gpa` with `rep stosq` (Linux's `clear_page`).
    fn zero(&self, cpu: &mut GuestCpu, ck: &Checker, gpa: u64, frames: u64) -> Result<(), OsError> {
        let va = self.format.page_offset() + gpa;
        let n = frames * 512;
        match cpu.rep_stos(va, n)? {
            AccessResult::Done { .. } => {
                cpu.accesses += n;
                ck.oracle().zero(gpa, frames << 12);
                Ok(())
            }
            other => {
                ck.violation(
                    cpu.id,
                    va,
                    gpa,
                    "rep stosq through the direct map to complete",
                    &format!("{other:?}"),
                );
                Err(OsError::Kernel)
            }
        }
    }

    /// Copies the stamped words of a page (the first word of each 64-byte
    /// line, the only ones user code writes) from `src` to `dst`, checking
    /// what it reads against the oracle.
    fn copy_page(&self, cpu: &mut GuestCpu, ck: &Checker, src: u64, dst: u64) -> Result<(), OsError> {
        for line in 0..64 {
            let (s, d) = (src + line * 64, dst + line * 64);
            let v = self.kernel_access(cpu, ck, s, AccessKind::Read, 8, 0)?;
            let want = ck.oracle().get(s);
            if ck.level != crate::checker::CheckLevel::Off && v != want {
                ck.violation(
                    cpu.id,
                    self.format.page_offset() + s,
                    s,
                    &format!("{want:#x} (the last value written)"),
                    &format!("{v:#x}"),
                );
            }
            self.kernel_access(cpu, ck, d, AccessKind::Write, 8, v)?;
            ck.oracle().set(d, v);
        }
        Ok(())
    }

    // ---- page tables ----

    fn key(&self, level: u8, va: u64) -> (u8, u64) {
        let top = self.format.levels();
        if level == top {
            (level, 0)
        } else {
            (level, va >> self.format.shift(level + 1))
        }
    }

    /// The table at `level` covering `va`, created (with the tables above
    /// it) if missing.
    fn table(&self, cpu: &mut GuestCpu, ck: &Checker, st: &mut MmState, va: u64, level: u8) -> Result<u64, OsError> {
        let top = self.format.levels();
        let mut parent = st.root;
        for l in (level..top).rev() {
            let key = self.key(l, va);
            if let Some(t) = st.tables.get(&key) {
                parent = t.gpa;
                continue;
            }
            let gpa = self.alloc_frame()? << 12;
            self.zero(cpu, ck, gpa, 1)?;
            self.store(
                cpu,
                ck,
                parent + self.format.index(va, l + 1) * self.format.entry_size(),
                self.format.table_entry(gpa, l + 1),
            )?;
            self.stats.tables_allocated.fetch_add(1, Ordering::Relaxed);
            st.tables
                .get_mut(&self.key(l + 1, va))
                .expect("every table's parent is in the table map")
                .used += 1;
            st.tables.insert(
                key,
                Table {
                    gpa,
                    used: 0,
                    pinned: false,
                },
            );
            parent = gpa;
        }
        Ok(parent)
    }

    /// Writes the leaf for `va` at `level`.
    fn set_leaf(&self, cpu: &mut GuestCpu, ck: &Checker, st: &mut MmState, va: u64, leaf: Leaf) -> Result<(), OsError> {
        let t = self.table(cpu, ck, st, va, leaf.level)?;
        let e = self.format.leaf_entry(leaf.gfn << 12, leaf.level, leaf.writable, true);
        self.store(
            cpu,
            ck,
            t + self.format.index(va, leaf.level) * self.format.entry_size(),
            e,
        )?;
        if st.leaves.insert(va >> 12, leaf).is_none() {
            st.tables
                .get_mut(&self.key(leaf.level, va))
                .expect("the leaf's table exists")
                .used += 1;
        }
        Ok(())
    }

    /// Clears the leaf at `va`; empty tables are unlinked and returned in
    /// `freed` (to be freed after the flush).
    fn clear_leaf(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        st: &mut MmState,
        va: u64,
        freed: &mut Vec<u64>,
    ) -> Result<Option<Leaf>, OsError> {
        let Some(leaf) = st.leaves.remove(&(va >> 12)) else {
            return Ok(None);
        };
        let mut level = leaf.level;
        loop {
            let key = self.key(level, va);
            let t = st.tables.get_mut(&key).expect("a leaf's tables exist");
            self.store(
                cpu,
                ck,
                t.gpa + self.format.index(va, level) * self.format.entry_size(),
                0,
            )?;
            t.used -= 1;
            if t.used > 0 || t.pinned || level == self.format.levels() {
                break;
            }
            let t = st.tables.remove(&key).expect("just seen");
            freed.push(t.gpa);
            level += 1;
        }
        Ok(Some(leaf))
    }

    /// Splits the huge leaf at `base` into a table of 4 KiB leaves.
    fn split_huge(&self, cpu: &mut GuestCpu, ck: &Checker, st: &mut MmState, base: u64) -> Result<(), OsError> {
        let leaf = st.leaves[&(base >> 12)];
        let gpa = self.alloc_frame()? << 12;
        self.zero(cpu, ck, gpa, 1)?;
        self.stats.tables_allocated.fetch_add(1, Ordering::Relaxed);
        let es = self.format.entry_size();
        for i in 0..512 {
            let e = self.format.leaf_entry((leaf.gfn + i) << 12, 1, leaf.writable, true);
            self.store(cpu, ck, gpa + i * es, e)?;
        }
        let pd = st.tables[&self.key(2, base)].gpa;
        self.store(
            cpu,
            ck,
            pd + self.format.index(base, 2) * es,
            self.format.table_entry(gpa, 2),
        )?;
        st.tables.insert(
            self.key(1, base),
            Table {
                gpa,
                used: 512,
                pinned: false,
            },
        );
        st.leaves.remove(&(base >> 12));
        for i in 0..512 {
            st.leaves.insert(
                (base >> 12) + i,
                Leaf {
                    gfn: leaf.gfn + i,
                    level: 1,
                    ..leaf
                },
            );
        }
        self.stats.huge_splits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Splits every huge leaf that `[start, end)` covers only in part.
    fn split_partial(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        st: &mut MmState,
        start: u64,
        end: u64,
        flush: &mut Flush,
    ) -> Result<(), OsError> {
        let hs = self.format.huge_size();
        for edge in [start, end] {
            if edge % hs == 0 {
                continue;
            }
            let base = edge & !(hs - 1);
            if st.leaves.get(&(base >> 12)).is_some_and(|l| l.level == 2) {
                self.split_huge(cpu, ck, st, base)?;
                flush.huge(base, hs);
            }
        }
        Ok(())
    }

    // ---- processes ----

    /// Creates an address space with the kernel half and no mappings.
    pub fn create_mm(&self, cpu: &mut GuestCpu, ck: &Checker, nthreads: u32) -> Result<Arc<Mm>, OsError> {
        let root = self.alloc_frame()? << 12;
        self.zero(cpu, ck, root, 1)?;
        let es = self.format.entry_size();
        for &(i, e) in &self.kernel_entries {
            self.store(cpu, ck, root + i * es, e)?;
        }
        let top = self.format.levels();
        let mut st = MmState {
            root,
            vmas: BTreeMap::new(),
            leaves: BTreeMap::new(),
            tables: BTreeMap::from([(
                (top, 0),
                Table {
                    gpa: root,
                    used: 0,
                    pinned: true,
                },
            )]),
            dead: false,
        };
        if self.format.mode() == vmmu::arch::control::PagingMode::Pae {
            // The user PDPTEs are fixed for the process's life: PDPTEs are
            // loaded at CR3 load, so Linux never changes them either.
            for i in 0..3u64 {
                let va = i << 30;
                self.table(cpu, ck, &mut st, va, 2)?;
                st.tables.get_mut(&self.key(2, va)).expect("just made").pinned = true;
            }
        }
        self.stats.processes.fetch_add(1, Ordering::Relaxed);
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Mm {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            root,
            state: RwLock::new(st),
            cpumask: AtomicU64::new(0),
            tlb_gen: AtomicU64::new(1),
            threads: AtomicU32::new(nthreads),
            nthreads,
        }))
    }

    /// A free place for `len` bytes (aligned to `align`) in `st`, picked
    /// by `pick` (a random number) when `spread`, else the lowest.
    fn place(&self, st: &MmState, len: u64, align: u64, spread: bool, pick: u64) -> Option<u64> {
        let (lo, hi) = self.format.user_window();
        let free =
            |s: u64| s >= lo && s + len <= hi && st.vmas.range(..s + len).next_back().is_none_or(|(_, v)| v.end <= s);
        if spread {
            for k in 0..16u64 {
                let slots = (hi - lo - len) / align;
                let s = lo + (pick.wrapping_add(k.wrapping_mul(0x9e37_79b9)) % slots) * align;
                if free(s) {
                    return Some(s);
                }
            }
        }
        let mut s = lo;
        for v in st.vmas.values() {
            if v.start >= s + len {
                break;
            }
            s = s.max(v.end.next_multiple_of(align));
        }
        free(s).then_some(s)
    }

    /// `mmap`: a new mapping of `pages` pages; none are mapped yet.
    pub fn mmap(&self, mm: &Mm, pages: u64, writable: bool, huge: bool, spread: bool, pick: u64) -> Option<Vma> {
        let mut st = mm.state.write();
        let hs = self.format.huge_size();
        let huge = huge && self.format.mode() != vmmu::arch::control::PagingMode::Bits32;
        let len = if huge {
            (pages << 12).next_multiple_of(hs)
        } else {
            pages << 12
        };
        let align = if huge { hs } else { 2 << 20 };
        let start = self.place(&st, len, align, spread, pick)?;
        let vma = Vma {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            start,
            end: start + len,
            writable,
            huge,
        };
        st.vmas.insert(start, vma);
        Some(vma)
    }

    /// Removes `[start, end)` from the mappings (splitting them).
    fn carve(&self, st: &mut MmState, start: u64, end: u64, change: Option<bool>) {
        let hit: Vec<Vma> = st
            .vmas
            .values()
            .filter(|v| v.start < end && v.end > start)
            .copied()
            .collect();
        for v in hit {
            st.vmas.remove(&v.start);
            if v.start < start {
                st.vmas.insert(v.start, Vma { end: start, ..v });
            }
            if v.end > end {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                st.vmas.insert(end, Vma { id, start: end, ..v });
            }
            if let Some(w) = change {
                let (s, e) = (v.start.max(start), v.end.min(end));
                let id = if v.start < start {
                    self.next_id.fetch_add(1, Ordering::Relaxed)
                } else {
                    v.id
                };
                st.vmas.insert(
                    s,
                    Vma {
                        id,
                        start: s,
                        end: e,
                        writable: w,
                        ..v
                    },
                );
            }
        }
    }

    /// `munmap` of `[start, end)` in `mm`, which runs on `cpu`.
    pub fn munmap(&self, cpu: &mut GuestCpu, ck: &Checker, mm: &Mm, start: u64, end: u64) -> Result<u64, OsError> {
        let mut st = mm.state.write();
        let mut freed_tables = Vec::new();
        let mut frames = Vec::new();
        self.changing(cpu, mm, &mut st, |os, cpu, st, flush| {
            os.split_partial(cpu, ck, st, start, end, flush)?;
            let vpns = st.leaf_pages(start, end);
            for vpn in vpns {
                let va = vpn << 12;
                if let Some(l) = os.clear_leaf(cpu, ck, st, va, &mut freed_tables)? {
                    let size = if l.level == 2 { os.format.huge_size() } else { 4096 };
                    flush.huge(va, size);
                    frames.push(l);
                }
            }
            os.carve(st, start, end, None);
            if !freed_tables.is_empty() {
                flush.full = true;
            }
            Ok(())
        })?;
        let mut a = self.alloc.lock();
        for l in &frames {
            if l.level == 2 {
                a.put_block(l.gfn);
            } else {
                a.put(l.gfn);
            }
        }
        for t in &freed_tables {
            a.put(t >> 12);
        }
        self.stats
            .tables_freed
            .fetch_add(freed_tables.len() as u64, Ordering::Relaxed);
        Ok(frames.len() as u64)
    }

    /// `mprotect` of `[start, end)` to `writable`.
    pub fn mprotect(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        mm: &Mm,
        start: u64,
        end: u64,
        writable: bool,
    ) -> Result<(), OsError> {
        let mut st = mm.state.write();
        self.changing(cpu, mm, &mut st, |os, cpu, st, flush| {
            os.split_partial(cpu, ck, st, start, end, flush)?;
            let vpns = st.leaf_pages(start, end);
            for vpn in vpns {
                let l = st.leaves[&vpn];
                let w = writable && !l.cow;
                if l.writable != w {
                    os.set_leaf(cpu, ck, st, vpn << 12, Leaf { writable: w, ..l })?;
                    flush.huge(vpn << 12, if l.level == 2 { os.format.huge_size() } else { 4096 });
                }
            }
            os.carve(st, start, end, Some(writable));
            Ok(())
        })
    }

    /// Moves up to `max` mapped private 4 KiB pages of `vma` from page
    /// `first` on to fresh frames (copying them): live PTE rewrites.
    pub fn remap(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        mm: &Mm,
        vma_id: u64,
        first: u64,
        max: u64,
    ) -> Result<u64, OsError> {
        let mut st = mm.state.write();
        let Some(vma) = st.vma(vma_id) else { return Ok(0) };
        let mut old = Vec::new();
        let moved = self.changing(cpu, mm, &mut st, |os, cpu, st, flush| {
            for p in 0..vma.pages() {
                if old.len() as u64 >= max {
                    break;
                }
                let va = vma.start + (((first + p) % vma.pages()) << 12);
                let Some(&l) = st.leaves.get(&(va >> 12)) else { continue };
                if l.level != 1 || l.cow {
                    continue;
                }
                let new = os.alloc_frame()?;
                os.copy_page(cpu, ck, l.gfn << 12, new << 12)?;
                os.set_leaf(cpu, ck, st, va, Leaf { gfn: new, ..l })?;
                flush.huge(va, 4096);
                old.push(l.gfn);
            }
            Ok(())
        });
        // The frames moved from are free once flushed, also when the
        // remap stopped early (out of memory).
        let mut a = self.alloc.lock();
        for g in &old {
            a.put(*g);
        }
        drop(a);
        moved?;
        Ok(old.len() as u64)
    }

    /// The guest's #PF handler for a user access of `kind` at `va`.
    pub fn page_fault(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        mm: &Mm,
        va: u64,
        write: bool,
    ) -> Result<FaultFix, OsError> {
        self.stats.guest_faults.fetch_add(1, Ordering::Relaxed);
        let mut st = mm.state.write();
        let Some(vma) = st.vmas.range(..=va).next_back().map(|(_, v)| *v).filter(|v| va < v.end) else {
            return Ok(FaultFix::Segv);
        };
        if write && !vma.writable {
            return Ok(FaultFix::Segv);
        }
        if let Some((base, l)) = st.leaf(&self.format, va) {
            if !write || l.writable {
                return Ok(FaultFix::Spurious);
            }
            // Copy-on-write.
            self.stats.cow_breaks.fetch_add(1, Ordering::Relaxed);
            let sole = self.alloc.lock().refs(l.gfn) == 1;
            let gfn = if sole {
                l.gfn
            } else {
                let new = self.alloc_frame()?;
                self.copy_page(cpu, ck, l.gfn << 12, new << 12)?;
                new
            };
            self.set_leaf(
                cpu,
                ck,
                &mut st,
                base,
                Leaf {
                    gfn,
                    writable: true,
                    cow: false,
                    level: 1,
                },
            )?;
            let mut flush = Flush::default();
            flush.huge(base, 4096);
            self.flush(cpu, mm, &st, flush)?;
            if !sole {
                self.alloc.lock().put(l.gfn);
            }
            return Ok(FaultFix::Fixed);
        }
        // Demand paging: a huge page where the mapping covers it whole.
        let hs = self.format.huge_size();
        let base = va & !(hs - 1);
        if vma.huge && base >= vma.start && base + hs <= vma.end && !st.tables.contains_key(&self.key(1, base)) {
            let block = self.alloc.lock().alloc_block();
            if let Some(block) = block {
                self.zero(cpu, ck, block << 12, hs >> 12)?;
                self.set_leaf(
                    cpu,
                    ck,
                    &mut st,
                    base,
                    Leaf {
                        gfn: block,
                        writable: vma.writable,
                        cow: false,
                        level: 2,
                    },
                )?;
                return Ok(FaultFix::Fixed);
            }
        }
        let gfn = self.alloc_frame()?;
        self.zero(cpu, ck, gfn << 12, 1)?;
        self.set_leaf(
            cpu,
            ck,
            &mut st,
            va & !0xfff,
            Leaf {
                gfn,
                writable: vma.writable,
                cow: false,
                level: 1,
            },
        )?;
        Ok(FaultFix::Fixed)
    }

    /// `fork`: a child with a copy of `parent`'s mappings; private pages
    /// shared copy-on-write (huge mappings are not inherited, as with
    /// `MADV_DONTFORK`).
    pub fn fork(&self, cpu: &mut GuestCpu, ck: &Checker, parent: &Mm) -> Result<Arc<Mm>, OsError> {
        let child = self.create_mm(cpu, ck, 1)?;
        let mut ps = parent.state.write();
        let mut cs = child.state.write();
        let vpns = ps.leaf_pages(0, u64::MAX);
        for v in ps.vmas.values().filter(|v| !v.huge) {
            cs.vmas.insert(v.start, *v);
        }
        // The parent's PTEs become read-only: flushed even if the copy
        // stops early (out of memory for the child's tables), so no vCPU
        // keeps writing a frame that is now shared.
        let copied = self.changing(cpu, parent, &mut ps, |os, cpu, ps, flush| {
            flush.full = true;
            for vpn in vpns {
                let l = ps.leaves[&vpn];
                let va = vpn << 12;
                if l.level != 1 || cs.vmas.range(..=va).next_back().is_none_or(|(_, v)| va >= v.end) {
                    continue;
                }
                // Shared from now on: read-only and copy-on-write in both,
                // whatever the protection (a later mprotect must not make a
                // shared frame writable).
                let shared = Leaf {
                    writable: false,
                    cow: true,
                    ..l
                };
                if l.writable {
                    os.set_leaf(cpu, ck, ps, va, shared)?;
                } else {
                    ps.leaves.insert(vpn, shared);
                }
                os.set_leaf(cpu, ck, &mut cs, va, shared)?;
                os.alloc.lock().get(l.gfn);
            }
            Ok(())
        });
        if let Err(e) = copied {
            // The half-built child goes; what it shares stays shared.
            drop((cs, ps));
            self.exit(&child);
            return Err(e);
        }
        Ok(child.clone())
    }

    /// One thread of `mm` exits; the last one tears the address space
    /// down. `cpu` must not be running `mm`.
    pub fn exit(&self, mm: &Mm) {
        if mm.threads.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let mut st = mm.state.write();
        let mut a = self.alloc.lock();
        for l in st.leaves.values() {
            if l.level == 2 {
                a.put_block(l.gfn);
            } else {
                a.put(l.gfn);
            }
        }
        for t in st.tables.values() {
            a.put(t.gpa >> 12);
        }
        self.stats
            .tables_freed
            .fetch_add(st.tables.len() as u64, Ordering::Relaxed);
        st.leaves.clear();
        st.tables.clear();
        st.vmas.clear();
        st.dead = true;
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    // ---- TLB maintenance ----

    /// Runs `work`, which changes `mm`'s live page tables and records in
    /// its [`Flush`] what the change must flush, then flushes that,
    /// whether `work` finished or stopped early (out of guest memory, a
    /// kernel access the checker refused): an entry changed is an entry
    /// flushed, or another vCPU keeps using the old translation.
    fn changing<T>(
        &self,
        cpu: &mut GuestCpu,
        mm: &Mm,
        st: &mut MmState,
        work: impl FnOnce(&Os, &mut GuestCpu, &mut MmState, &mut Flush) -> Result<T, OsError>,
    ) -> Result<T, OsError> {
        let mut flush = Flush::default();
        let r = work(self, cpu, st, &mut flush);
        let flushed = self.flush(cpu, mm, st, flush);
        let r = r?;
        flushed?;
        Ok(r)
    }

    /// Flushes `flush` of `mm` here (if it runs here) and on every other
    /// vCPU running it; called with the mm's lock held for writing.
    fn flush(&self, cpu: &mut GuestCpu, mm: &Mm, st: &MmState, flush: Flush) -> Result<(), OsError> {
        if flush.is_empty() {
            return Ok(());
        }
        let tlb_gen = mm.tlb_gen.fetch_add(1, Ordering::AcqRel) + 1;
        let pages = (!flush.full && flush.pages.len() as u64 <= FLUSH_CEILING).then_some(flush.pages);
        if cpu.current.as_ref().is_some_and(|c| c.id == mm.id) {
            cpu.apply(self, mm.id, tlb_gen, pages.as_deref(), st.root)?;
        }
        let mask = mm.cpumask.load(Ordering::Acquire) & !(1 << cpu.id);
        for other in 0..self.mailboxes.len() {
            if mask & (1 << other) != 0 {
                self.mailboxes[other].lock().push(Shootdown {
                    mm: mm.id,
                    tlb_gen,
                    pages: pages.clone(),
                });
                self.stats.shootdowns.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// What a change must flush.
#[derive(Debug, Default)]
struct Flush {
    pages: Vec<u64>,
    full: bool,
}

impl Flush {
    fn huge(&mut self, va: u64, size: u64) {
        if size > 4096 {
            self.full = true;
        } else {
            self.pages.push(va);
        }
    }

    fn is_empty(&self) -> bool {
        !self.full && self.pages.is_empty()
    }
}

impl GuestCpu {
    /// vCPU `id` of the OS, idle on the kernel's root.
    pub fn new(id: usize, vcpu: Vcpu) -> GuestCpu {
        GuestCpu {
            id,
            vcpu,
            current: None,
            slots: [(0, 0, 0); PCID_SLOTS],
            clock: 0,
            stamp: (id as u64 + 1) << 48,
            accesses: 0,
            rings: None,
        }
    }

    /// The VMM's dirty-ring reaper this vCPU calls when its ring is full
    /// (`KVM_EXIT_DIRTY_RING_FULL`), when the dirty ring is on.
    pub fn with_dirty_rings(mut self, rings: Option<Arc<DirtyRings>>) -> GuestCpu {
        self.rings = rings;
        self
    }

    /// An access at `cpl`, retried while the host refuses the page
    /// (`EFAULT` from `KVM_RUN`: the host made it read-only for a moment;
    /// the VMM waits for the protection to come back and re-enters) and
    /// after the VMM reaped a full dirty ring.
    pub fn access(
        &mut self,
        va: u64,
        kind: AccessKind,
        cpl: u8,
        size: usize,
        value: u64,
    ) -> Result<AccessResult, VcpuError> {
        self.retrying_efault(|v| v.access(va, kind, cpl, false, size, value))
    }

    /// `rep stosq` of zeros over `count` quadwords, retried as
    /// [`GuestCpu::access`] (from where it stopped: a 2 MiB page zeroed
    /// under a dirty ring smaller than its 512 pages fills the ring more
    /// than once, and an instruction restarted from its first store would
    /// fill it again forever).
    pub fn rep_stos(&mut self, va: u64, count: u64) -> Result<AccessResult, VcpuError> {
        // Re-entered after an exit, the instruction resumes at RDI/RCX.
        let mut regs = StringRegs { rdi: va, rcx: count };
        self.retrying_efault(|v| v.rep_stos(&mut regs, 0))
    }

    fn retrying_efault(
        &mut self,
        mut op: impl FnMut(&mut Vcpu) -> Result<AccessResult, VcpuError>,
    ) -> Result<AccessResult, VcpuError> {
        let rings = self.rings.as_deref();
        retrying_efault(rings, || op(&mut self.vcpu))
    }

    /// Opens a run of accesses that stays in guest mode between them (a
    /// [`GuestSession`]): the fast path of a loop of user accesses. It
    /// borrows the CPU: end it before anything that may wait for another
    /// thread (the guest's fault handler, the mailbox, an mm lock).
    pub fn user_run(&mut self) -> UserRun<'_> {
        UserRun {
            session: self.vcpu.session(),
            stamp: &mut self.stamp,
            accesses: &mut self.accesses,
            rings: self.rings.as_deref(),
        }
    }

    /// The mm running here.
    pub fn current(&self) -> Option<&Arc<Mm>> {
        self.current.as_ref()
    }

    /// A fresh nonzero value for a write.
    pub fn next_stamp(&mut self) -> u64 {
        self.stamp += 1;
        self.stamp
    }

    /// Applies a flush of `mm` here: INVLPG of `pages`, or a full flush
    /// of the address space (a CR3 reload of its PCID).
    fn apply(&mut self, os: &Os, mm: u64, tlb_gen: u64, pages: Option<&[u64]>, root: u64) -> Result<(), OsError> {
        tracing::debug!(target: "vmmu_guest_flush", mm, tlb_gen, pages = ?pages, root);
        let running = self.current.as_ref().is_some_and(|c| c.id == mm);
        let slot = self.slots.iter().position(|s| s.0 == mm);
        if !running {
            // Not running it: forget the PCID's generation, so the next
            // switch to it flushes (Linux's lazy flush).
            if let Some(i) = slot {
                self.slots[i].1 = 0;
            }
            return Ok(());
        }
        match pages {
            Some(pages) => {
                for &va in pages {
                    self.vcpu.invlpg(va);
                }
                os.stats.flushes.fetch_add(pages.len() as u64, Ordering::Relaxed);
            }
            None => {
                let pcid = slot.map_or(0, |i| i as u64 + 1);
                let cr3 = if os.format.has_pcid() { root | pcid } else { root };
                self.vcpu.mov_cr3(cr3)?;
                os.stats.flushes.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(i) = slot {
            self.slots[i].1 = self.slots[i].1.max(tlb_gen);
        }
        Ok(())
    }

    /// Processes the shootdowns posted here (the IPI handler).
    pub fn process_mailbox(&mut self, os: &Os) -> Result<(), OsError> {
        let posted = std::mem::take(&mut *os.mailboxes[self.id].lock());
        for s in posted {
            let root = self.current.as_ref().filter(|c| c.id == s.mm).map(|c| c.root);
            let root = match root {
                Some(r) => r,
                None => {
                    if let Some(i) = self.slots.iter().position(|x| x.0 == s.mm) {
                        self.slots[i].1 = 0;
                    }
                    continue;
                }
            };
            self.apply(os, s.mm, s.tlb_gen, s.pages.as_deref(), root)?;
        }
        Ok(())
    }

    /// Switches to `mm` (or to the kernel's root with `None`): a CR3 load
    /// that keeps the new PCID's translations when the address space has
    /// not changed since this vCPU last flushed it.
    pub fn switch_to(&mut self, os: &Os, mm: Option<&Arc<Mm>>) -> Result<(), OsError> {
        if let Some(old) = self.current.take() {
            old.cpumask.fetch_and(!(1 << self.id), Ordering::AcqRel);
        }
        self.clock += 1;
        let Some(mm) = mm else {
            let cr3 = os.kernel_root | if os.format.has_pcid() { CR3_NOFLUSH } else { 0 };
            self.vcpu.mov_cr3(cr3)?;
            return Ok(());
        };
        let st = mm.state.read();
        mm.cpumask.fetch_or(1 << self.id, Ordering::AcqRel);
        self.current = Some(mm.clone());
        let tlb_gen = mm.tlb_gen.load(Ordering::Acquire);
        if !os.format.has_pcid() || !self.vcpu.regs().cr4.contains(Cr4::PCIDE) {
            os.stats.flushes.fetch_add(1, Ordering::Relaxed);
            self.vcpu.mov_cr3(mm.root)?;
            return Ok(());
        }
        let (i, fresh) = match self.slots.iter().position(|s| s.0 == mm.id) {
            Some(i) => (i, self.slots[i].1 >= tlb_gen),
            None => {
                let lru = (0..PCID_SLOTS)
                    .min_by_key(|&i| self.slots[i].2)
                    .expect("PCID_SLOTS > 0");
                self.slots[lru] = (mm.id, 0, 0);
                (lru, false)
            }
        };
        self.slots[i].2 = self.clock;
        let pcid = i as u64 + 1;
        tracing::debug!(target: "vmmu_guest_switch", root = mm.root, pcid, fresh);
        if fresh {
            self.vcpu.mov_cr3(mm.root | pcid | CR3_NOFLUSH)?;
        } else {
            os.stats.flushes.fetch_add(1, Ordering::Relaxed);
            self.vcpu.mov_cr3(mm.root | pcid)?;
            self.slots[i].1 = tlb_gen;
        }
        drop(st);
        Ok(())
    }
}
