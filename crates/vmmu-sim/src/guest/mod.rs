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
mod cpu;
pub(crate) use cpu::is_efault;
pub mod format;
mod mm;
mod pt;

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
    /// The L1 hypervisor this OS runs under, and which of its L2 VMs it
    /// is (`vmmu run --nested`): it handles the exits its nested paging
    /// causes.
    l1: Option<(Arc<crate::nested::L1Hypervisor>, usize)>,
}

/// Accesses made in guest mode back to back (see [`GuestCpu::user_run`]).
pub struct UserRun<'a> {
    session: GuestSession<'a>,
    stamp: &'a mut u64,
    accesses: &'a mut u64,
    rings: Option<&'a DirtyRings>,
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
