//! `walk`: 4-level guest walks per second over cache-resident tables,
//! against the reference of the same four dependent 8-byte loads.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BenchResult, Phase, best_ns_per_iter};
use vmmu::addr::{Gpa, Gva};
use vmmu::arch::control::{CpuFeatures, Cr0, Cr4, Efer, PagingMode};
use vmmu::arch::perm::Access;
use vmmu::arch::pte::{PT_ACCESSED, PT_DIRTY, PT_PRESENT, PT_WRITABLE, PT64_ADDR_MASK};
use vmmu::walker::{ControlRegs, EntrySize, Paging, PtMemory, Root};

/// A flat guest-physical memory starting at gpa 0, for benchmarks.
pub struct FlatMemory {
    words: Vec<AtomicU64>,
}

impl FlatMemory {
    /// `pages` zeroed 4 KiB pages.
    pub fn new(pages: usize) -> FlatMemory {
        FlatMemory {
            words: (0..pages * 512).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Stores an 8-byte value.
    pub fn set(&self, gpa: u64, value: u64) {
        self.words[(gpa / 8) as usize].store(value, Ordering::Relaxed);
    }

    /// Loads an 8-byte value.
    #[inline(always)]
    pub fn get(&self, gpa: u64) -> u64 {
        self.words[(gpa / 8) as usize].load(Ordering::Relaxed)
    }
}

/// Access outside the flat memory.
#[derive(Debug, Clone, Copy)]
pub struct OutOfRange;

impl PtMemory for FlatMemory {
    type Error = OutOfRange;

    #[inline(always)]
    fn read_entry(&self, gpa: Gpa, _size: EntrySize) -> Result<u64, OutOfRange> {
        self.words
            .get((gpa.raw() / 8) as usize)
            .map(|w| w.load(Ordering::Acquire))
            .ok_or(OutOfRange)
    }

    fn cmpxchg_entry(&self, gpa: Gpa, _size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, OutOfRange> {
        let w = self.words.get((gpa.raw() / 8) as usize).ok_or(OutOfRange)?;
        Ok(w.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ()))
    }
}

/// A 4-level guest address space of `fanout`⁴ mapped 4 KiB pages in a flat
/// memory, and the addresses to translate.
pub struct WalkSetup {
    /// The memory holding the tables.
    pub mem: FlatMemory,
    /// CR3.
    pub root: u64,
    /// Addresses to translate, in a pseudo-random order.
    pub vas: Vec<u64>,
}

impl WalkSetup {
    /// Builds the tables: each table uses `fanout` entries spread over the
    /// table, so the walks are not a single cached path.
    pub fn new(fanout: u64, n_vas: usize) -> WalkSetup {
        let tables = 1 + fanout + fanout * fanout + fanout * fanout * fanout;
        let mem = FlatMemory::new(tables as usize + 1);
        struct Builder<'a> {
            mem: &'a FlatMemory,
            fanout: u64,
            next_table: u64,
            leaves: Vec<u64>,
        }
        impl Builder<'_> {
            fn build(&mut self, table: u64, level: u32, va: u64) {
                let flags = PT_PRESENT | PT_WRITABLE | PT_ACCESSED; // a kernel mapping
                for i in 0..self.fanout {
                    let span = if level == 4 { 256 } else { 512 }; // lower half only at the PML4
                    let idx = i * (span / self.fanout) + level as u64;
                    let va = va | (idx << (12 + 9 * (level - 1)));
                    if level == 1 {
                        let frame = 0x100_0000 + self.leaves.len() as u64;
                        self.mem.set(table * 4096 + idx * 8, frame << 12 | flags | PT_DIRTY);
                        self.leaves.push(va);
                    } else {
                        let child = self.next_table;
                        self.next_table += 1;
                        self.mem.set(table * 4096 + idx * 8, child << 12 | flags);
                        self.build(child, level - 1, va);
                    }
                }
            }
        }
        let root = 0u64;
        let mut b = Builder {
            mem: &mem,
            fanout,
            next_table: 1,
            leaves: Vec::new(),
        };
        b.build(root, 4, 0);
        let leaves = b.leaves;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let vas = (0..n_vas)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                leaves[(x % leaves.len() as u64) as usize] | (x >> 40) & 0xff8
            })
            .collect();
        WalkSetup { mem, root, vas }
    }
}

/// The reference: the same four dependent 8-byte loads a walk makes, with
/// nothing else. Like [`walker_loop`], each translation waits for the one
/// before it.
///
/// With `serial`, each translation's address depends on the previous result
/// (latency); without, consecutive translations may overlap (throughput).
#[inline(never)]
pub fn reference_loads(mem: &FlatMemory, root: u64, vas: &[u64], n: u64, serial: bool) -> u64 {
    let mut acc = 0u64;
    for i in 0..n {
        // The previous translation's top bit is always 0: adding it creates
        // the dependency without changing the address.
        let dep = if serial { (acc >> 63) as usize } else { 0 };
        let va = vas[(i as usize + dep) & (vas.len() - 1)];
        let mut table = root;
        for level in (1..=4u32).rev() {
            let idx = (va >> (12 + 9 * (level - 1))) & 511;
            table = mem.get(table + idx * 8) & PT64_ADDR_MASK;
        }
        acc = acc.wrapping_add(table);
    }
    acc
}

/// Walks every address with the real walker; `serial` as for
/// [`reference_loads`].
#[inline(never)]
pub fn walker_loop(paging: &Paging<vmmu::arch::pte::Pte64>, setup: &WalkSetup, n: u64, serial: bool) -> u64 {
    let root = Root::Table(Gpa::new(setup.root));
    let access = Access::supervisor_read();
    let mut acc = 0u64;
    for i in 0..n {
        let dep = if serial { (acc >> 63) as usize } else { 0 };
        let va = setup.vas[(i as usize + dep) & (setup.vas.len() - 1)];
        if let Ok(w) = paging.walk(&setup.mem, &root, Gva::new(black_box(va)), access, 0) {
            acc = acc.wrapping_add(w.gpa.raw());
        }
    }
    acc
}

/// A 4-level paging configuration as a 64-bit guest kernel runs.
pub fn lm4_paging() -> Paging<vmmu::arch::pte::Pte64> {
    let regs = ControlRegs {
        cr0: Cr0::PE | Cr0::PG | Cr0::WP,
        cr4: Cr4::PAE | Cr4::PSE | Cr4::SMEP | Cr4::SMAP,
        efer: Efer::LME | Efer::LMA | Efer::NXE,
    };
    Paging::long_or_pae(PagingMode::Level4, &regs, &CpuFeatures::default())
}

/// Entries used per table: 4 keeps every touched line (85 tables x 4
/// entries) in L1, so the walk is compared with four L1 hits.
pub const FANOUT: u64 = 4;

/// Runs the benchmark: `iterations` walks (best of 5 rounds) and as many
/// reference walks, in two phases: `latency` (each walk waits for the one
/// before, the comparison the goal names) and `throughput` (independent
/// walks that the processor may overlap).
pub fn run(iterations: u64) -> BenchResult {
    let setup = WalkSetup::new(FANOUT, 4096);
    let paging = lm4_paging();
    // Warm up: sets every A bit, fills the caches.
    walker_loop(&paging, &setup, 4096, false);
    let mut phases = Vec::new();
    let mut total_secs = 0.0;
    for (name, serial) in [("latency", true), ("throughput", false)] {
        let (walk_ns, secs, s1) = best_ns_per_iter(5, iterations, |n| walker_loop(&paging, &setup, n, serial));
        let (ref_ns, _, s2) = best_ns_per_iter(5, iterations, |n| {
            reference_loads(&setup.mem, setup.root, &setup.vas, n, serial)
        });
        black_box((s1, s2));
        total_secs += secs;
        phases.push(Phase {
            phase: name,
            per_op_ns: walk_ns,
            reference_ns: ref_ns,
            ratio: walk_ns / ref_ns,
        });
    }
    let latency = phases[0].clone();
    BenchResult {
        bench: "walk",
        mmu: "none",
        vcpus: 1,
        pages: FANOUT.pow(4),
        seconds: total_secs,
        per_op_ns: latency.per_op_ns,
        reference_ns: latency.reference_ns,
        ratio: latency.ratio,
        reference: "4 dependent 8-byte loads over the same tables",
        goal_ratio: Some(3.0),
        phases,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_translates_like_the_reference() {
        let setup = WalkSetup::new(4, 64);
        let paging = lm4_paging();
        let root = Root::Table(Gpa::new(setup.root));
        for &va in &setup.vas {
            let w = paging
                .walk(&setup.mem, &root, Gva::new(va), Access::supervisor_read(), 0)
                .unwrap();
            let reference = reference_loads(&setup.mem, setup.root, &[va], 1, true);
            assert_eq!(w.gpa.raw() & !0xfff, reference);
            assert_eq!(w.gpa.page_offset(), va & 0xfff);
        }
    }
}
