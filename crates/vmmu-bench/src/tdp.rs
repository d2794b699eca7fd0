//! TDP MMU benchmarks, after KVM's selftests: [`populate`]
//! (`demand_paging_test`), [`dirty_log`] (`dirty_log_perf_test`),
//! [`zap_all`] (the wait of `kvm_mmu_zap_all_fast`) and
//! [`access_tracking`] (`access_tracking_perf_test`). Each measures its
//! reference in the same run.
//!
//! Guest memory is one memslot at gpa 0 (zap-all: aliasing memslots), the
//! vCPUs run with paging off so gva == gpa, and vCPU thread `i` owns the
//! `bytes_per_vcpu` bytes from gpa `i * bytes_per_vcpu`. Host memory is
//! pre-faulted before anything is timed (every 4K page written once through
//! the host address space: frames allocated, zeroed and touched), so the
//! timed part is the MMU's fault path, not host page allocation.
//!
//! References are built on preallocated EPT tables in a separate
//! [`FrameArena`] ([`RefTree`]): what the MMU's work would cost if it were
//! nothing but the SPTE accesses themselves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use super::{BenchResult, Figure, Phase, Report};
use vmmu::addr::{Gfn, Gpa, Gva, Hva, Level, Pfn};
use vmmu::arch::control::CpuFeatures;
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, Vcpu};
use vmmu::host::{FrameArena, HostAddressSpace, HvaRange, VmaFlags};
use vmmu::mem::{MemslotFlags, MemslotTable, SlotCache};
use vmmu::mmu::iter::{Geometry, SpteIter};
use vmmu::mmu::spte::{Spte, SpteAccess, SpteFormat};
use vmmu::mmu::tdp::{FaultOutcome, TdpConfig, TdpFault, TdpMmu};
use vmmu::vm::VmBuilder;
use vmmu::walker::ControlRegs;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGES_PER_GIB: f64 = (GIB / PAGE) as f64;
/// Where guest memory is mapped in the host (1 GiB aligned, for hugetlb-1g).
const HVA_BASE: u64 = 1 << 40;
/// The largest guest memory the benchmarks accept (`vcpus * bytes_per_vcpu`):
/// the vCPUs run with paging off, where addresses are 32 bits, so a gpa at
/// or above 4 GiB would alias one below (and the run would fail its checks).
pub const MAX_GUEST_BYTES: u64 = 4 * GIB;
const GEOMETRY: Geometry = Geometry::X86_4LEVEL;
const FMT: SpteFormat = SpteFormat::Ept { ad: true };

/// Host memory backing guest memory (`-s`, as KVM's selftests spell it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous memory, THP off: 4K host pages, 4K SPTEs.
    Anon,
    /// Anonymous memory with transparent huge pages: 2M SPTEs.
    Thp,
    /// 2M hugetlb pages. The host model has no 2M hugetlb; this is THP in
    /// 2M-aligned regions, which maps the same way (2M SPTEs).
    Hugetlb2M,
    /// 1G hugetlb pages: 1G SPTEs.
    Hugetlb1G,
}

impl Backing {
    /// The name `-s` takes.
    pub fn name(self) -> &'static str {
        match self {
            Backing::Anon => "anon",
            Backing::Thp => "thp",
            Backing::Hugetlb2M => "hugetlb-2m",
            Backing::Hugetlb1G => "hugetlb-1g",
        }
    }

    /// The host page size: sizes must be multiples of it.
    pub fn page_bytes(self) -> u64 {
        self.leaf_pages() * PAGE
    }

    /// 4K pages one SPTE maps with this backing.
    fn leaf_pages(self) -> u64 {
        match self {
            Backing::Anon => 1,
            Backing::Thp | Backing::Hugetlb2M => 512,
            Backing::Hugetlb1G => 512 * 512,
        }
    }

    fn leaf_level(self) -> u8 {
        match self {
            Backing::Anon => 1,
            Backing::Thp | Backing::Hugetlb2M => 2,
            Backing::Hugetlb1G => 3,
        }
    }

    fn vma_flags(self) -> VmaFlags {
        match self {
            Backing::Anon => VmaFlags::WRITE,
            Backing::Thp | Backing::Hugetlb2M => VmaFlags::WRITE | VmaFlags::THP,
            Backing::Hugetlb1G => VmaFlags::WRITE | VmaFlags::HUGETLB_1G,
        }
    }
}

/// What to run (KVM selftests' `-v -b -i -s`).
#[derive(Clone, Copy, Debug)]
pub struct TdpBenchConfig {
    /// vCPU threads.
    pub vcpus: u32,
    /// Guest memory each vCPU touches, in bytes.
    pub bytes_per_vcpu: u64,
    /// `populate` and `zap-all`: rounds, the best reported (default 3);
    /// `dirty-log`: dirty + get iterations (default 2); `access-tracking`:
    /// access + age + re-access iterations, the best reported (default 3).
    pub iterations: Option<u64>,
    /// Host memory backing.
    pub backing: Backing,
}

impl Default for TdpBenchConfig {
    fn default() -> Self {
        TdpBenchConfig {
            vcpus: 1,
            bytes_per_vcpu: 64 * MIB,
            iterations: None,
            backing: Backing::Anon,
        }
    }
}

impl TdpBenchConfig {
    /// Checks the sizes; the message names the flag and the value.
    pub fn validate(&self) -> Result<(), BenchError> {
        let b = self.bytes_per_vcpu;
        let page = self.backing.page_bytes();
        if self.vcpus == 0 || self.vcpus > 64 {
            return Err(BenchError::Config(format!(
                "-v/--vcpus {}: must be 1 to 64",
                self.vcpus
            )));
        }
        if b == 0 {
            return Err(BenchError::Config("-b/--bytes-per-vcpu 0: must not be zero".into()));
        }
        if !b.is_multiple_of(page) {
            return Err(BenchError::Config(format!(
                "-b/--bytes-per-vcpu {}: not a multiple of the {} page size ({})",
                fmt_size(b),
                self.backing.name(),
                fmt_size(page)
            )));
        }
        if b.saturating_mul(u64::from(self.vcpus)) > MAX_GUEST_BYTES {
            return Err(BenchError::Config(format!(
                "-b/--bytes-per-vcpu {} with -v/--vcpus {}: {} of guest memory, more than the {} the vCPUs \
                 address with paging off",
                fmt_size(b),
                self.vcpus,
                fmt_size(b.saturating_mul(u64::from(self.vcpus))),
                fmt_size(MAX_GUEST_BYTES)
            )));
        }
        if self.iterations == Some(0) {
            return Err(BenchError::Config("-i/--iterations 0: must be at least 1".into()));
        }
        Ok(())
    }
}

/// Why a benchmark did not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad configuration (bad usage).
    #[error("{0}")]
    Config(String),
    /// The setup or the run failed.
    #[error("{0}")]
    Run(String),
}

fn run_err(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Run(format!("{what}: {e}"))
}

/// A size as `-b` takes it: `64M`, `1G`, `12K`, or bytes.
pub fn fmt_size(bytes: u64) -> String {
    for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

// ---- the VM ------------------------------------------------------------

/// A VM on the TDP MMU: memslot `k` maps `host_bytes` of gpa from
/// `k * host_bytes`, every memslot backed by the same host range (aliases
/// when there are several, as KVM allows).
struct Vm {
    host: Arc<HostAddressSpace>,
    slots: Arc<MemslotTable>,
    mmu: Arc<TdpMmu>,
    host_bytes: u64,
}

impl Vm {
    fn new(host_bytes: u64, nslots: u64, backing: Backing) -> Result<Vm, BenchError> {
        Vm::with_config(host_bytes, nslots, backing, TdpConfig::default())
    }

    /// [`Vm::new`] with the TDP MMU configured by `config`.
    fn with_config(host_bytes: u64, nslots: u64, backing: Backing, config: TdpConfig) -> Result<Vm, BenchError> {
        // Address space only (nothing is committed until touched): the host
        // frames, the MMU's tables (1/512 of the guest memory at 4K) and
        // room for alignment.
        let reserve = 2 * host_bytes + nslots * host_bytes / 256 + 2 * GIB;
        let vm = VmBuilder::new(host_bytes)
            .hva(Hva::new(HVA_BASE))
            .flags(backing.vma_flags())
            .aliases(nslots)
            .reserve(reserve)
            .tdp(config)
            .map_err(|e| run_err("building the VM", e))?;
        Ok(Vm {
            host: vm.host,
            slots: vm.slots,
            mmu: vm.mmu,
            host_bytes,
        })
    }

    /// Writes one byte in every 4K page of the host range: frames allocated
    /// and touched before anything is timed.
    fn prefault(&self) -> Result<(), BenchError> {
        for off in (0..self.host_bytes).step_by(PAGE as usize) {
            self.host
                .write(Hva::new(HVA_BASE + off), &[0])
                .map_err(|e| run_err("pre-faulting host memory", e))?;
        }
        Ok(())
    }

    /// Leaf SPTEs mapped, in 4K pages.
    fn mapped_pages(&self) -> i64 {
        let s = self.mmu.stats().snapshot();
        s.pages_4k + 512 * s.pages_2m + 512 * 512 * s.pages_1g
    }
}

/// Drops a VM and runs the frees it left to crossbeam-epoch (page tables,
/// and with them the last references to its frame arena) here, untimed:
/// otherwise whichever thread next pins an epoch, a vCPU thread in the
/// middle of a timed pass, would unmap the old arena, with TLB shootdowns
/// stalling the other threads.
fn retire(vm: Vm) {
    drop(vm);
    for _ in 0..64 {
        crossbeam_epoch::pin().flush();
    }
}

/// From the first thread's start to the last one's end.
fn span(results: Vec<Result<(Instant, Instant), BenchError>>) -> Result<Duration, BenchError> {
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    for r in results {
        let (s, e) = r?;
        first = Some(first.map_or(s, |f| f.min(s)));
        last = Some(last.map_or(e, |l| l.max(e)));
    }
    match (first, last) {
        (Some(s), Some(e)) => Ok(e - s),
        _ => Ok(Duration::ZERO),
    }
}

fn joined<T>(h: std::thread::ScopedJoinHandle<'_, Result<T, BenchError>>) -> Result<T, BenchError> {
    h.join()
        .unwrap_or_else(|_| Err(BenchError::Run("a benchmark thread panicked".into())))
}

/// vCPU threads, each owning the [`Vcpu`] it created (as a VMM's vCPU
/// threads do: per-vCPU state is then allocated by its own thread, not
/// side by side by one thread), running write passes on command.
struct VcpuThreads {
    commands: Vec<mpsc::Sender<u64>>,
    results: mpsc::Receiver<Result<(Instant, Instant), BenchError>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl VcpuThreads {
    /// `n` threads; thread `i` writes to the `bytes` from gpa `i * bytes`.
    fn spawn(vm: &Vm, n: u32, bytes: u64) -> Result<VcpuThreads, BenchError> {
        let (result_tx, results) = mpsc::channel();
        let barrier = Arc::new(Barrier::new(n as usize));
        let mut threads = VcpuThreads {
            commands: Vec::new(),
            results,
            handles: Vec::new(),
        };
        for i in 0..n {
            let (tx, rx) = mpsc::channel::<u64>();
            let (mmu, slots, done, barrier) = (vm.mmu.clone(), vm.slots.clone(), result_tx.clone(), barrier.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    let made = Vcpu::new(mmu, slots, CpuFeatures::default(), i as u16 + 1)
                        .map_err(|e| run_err("vCPU", e))
                        .and_then(|mut v| {
                            v.set_state(ControlRegs::default(), 0, 0)
                                .map_err(|e| run_err("vCPU state", e))
                                .map(|()| v)
                        });
                    let mut v = match made {
                        Ok(v) => {
                            let now = Instant::now();
                            let _ = done.send(Ok((now, now)));
                            v
                        }
                        Err(e) => {
                            let _ = done.send(Err(e));
                            return;
                        }
                    };
                    let base = u64::from(i) * bytes;
                    while let Ok(value) = rx.recv() {
                        barrier.wait();
                        let start = Instant::now();
                        let r = write_region(&mut v, i, base, bytes, value).map(|()| (start, Instant::now()));
                        if done.send(r).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| run_err("spawning a vCPU thread", e))?;
            threads.commands.push(tx);
            threads.handles.push(handle);
        }
        // Every vCPU made (or the first failure).
        for _ in 0..n {
            threads.collect_one()?;
        }
        Ok(threads)
    }

    fn collect_one(&self) -> Result<(Instant, Instant), BenchError> {
        self.results
            .recv()
            .unwrap_or_else(|_| Err(BenchError::Run("a vCPU thread died".into())))
    }

    /// One pass: each vCPU writes 8 bytes to every 4K page of its region,
    /// all starting together. The wall time.
    fn write_pass(&self, value: u64) -> Result<Duration, BenchError> {
        for c in &self.commands {
            c.send(value)
                .map_err(|_| BenchError::Run("a vCPU thread died".into()))?;
        }
        let results = (0..self.commands.len()).map(|_| self.collect_one()).collect();
        span(results)
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        self.commands.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn write_region(v: &mut Vcpu, i: u32, base: u64, bytes: u64, value: u64) -> Result<(), BenchError> {
    for gpa in (base..base + bytes).step_by(PAGE as usize) {
        match v.access(Gva::new(gpa), Access::new(AccessKind::Write, 0, false), 8, value ^ gpa) {
            Ok(AccessResult::Done { mmio: false, .. }) => {}
            Ok(other) => {
                return Err(BenchError::Run(format!(
                    "vCPU {i}: the write at gpa {gpa:#x} came to {other:?}"
                )));
            }
            Err(e) => return Err(run_err(&format!("vCPU {i}: the write at gpa {gpa:#x}"), e)),
        }
    }
    Ok(())
}

/// `f(i)` on `threads` threads at once; the wall time.
pub(super) fn parallel(
    threads: usize,
    f: impl Fn(usize) -> Result<(), BenchError> + Sync,
) -> Result<Duration, BenchError> {
    let barrier = Barrier::new(threads);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (barrier, f) = (&barrier, &f);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    f(i)?;
                    Ok((start, Instant::now()))
                })
            })
            .collect();
        handles.into_iter().map(joined).collect::<Vec<_>>()
    });
    span(results)
}

/// Faults `gfns` in with direct [`TdpMmu::page_fault`] calls (write
/// faults, one per leaf), split over `threads` threads. Returns the wall
/// time and the leaves installed.
fn fault_range(vm: &Vm, gfns: u64, leaf_pages: u64, threads: usize) -> Result<(Duration, u64), BenchError> {
    let installed = AtomicU64::new(0);
    let leaves = gfns / leaf_pages;
    let per = leaves.div_ceil(threads as u64);
    let d = parallel(threads, |t| {
        let root = vm.mmu.get_root(0).map_err(|e| run_err("root", e))?;
        let mut cache = vm.mmu.vcpu_caches();
        let mut n = 0;
        for leaf in (t as u64 * per)..((t as u64 + 1) * per).min(leaves) {
            let gpa = Gpa::new(leaf * leaf_pages * PAGE);
            let fault = TdpFault {
                gpa,
                write: true,
                exec: false,
                present: false,
            };
            loop {
                match vm.mmu.page_fault(&root, fault, &mut cache, None) {
                    Ok(FaultOutcome::Fixed) => {
                        n += 1;
                        break;
                    }
                    Ok(FaultOutcome::Spurious) => break,
                    Ok(FaultOutcome::Retry) => continue,
                    Ok(other) => return Err(BenchError::Run(format!("the fault at {gpa} came to {other:?}"))),
                    Err(e) => return Err(run_err(&format!("the fault at {gpa}"), e)),
                }
            }
        }
        installed.fetch_add(n, Ordering::Relaxed);
        Ok(())
    })?;
    Ok((d, installed.into_inner()))
}

// ---- the reference tables -----------------------------------------------

/// The references' tables: a 4-level EPT tree in its own arena with every
/// table for gfns `0..pages` allocated (and touched) up front, leaves at
/// `level`. Leaf values are [`SpteFormat::make_leaf`] values for made-up
/// frames, as the MMU would build them.
pub struct RefTree {
    arena: FrameArena,
    root: Pfn,
    level: u8,
    leaf_tables: Vec<Pfn>,
    leaf_base: u64,
    leaves: u64,
    leaf_pages: u64,
}

impl RefTree {
    /// The tables for `pages` 4K pages mapped by leaves at `level` (1..=3).
    pub fn new(pages: u64, level: u8) -> Result<RefTree, FrameErrorText> {
        let lvl = Level::new(level)
            .filter(|&l| l <= Level::L3)
            .expect("a leaf level 1..=3");
        let leaf_pages = GEOMETRY.pages(lvl);
        let leaves = pages.div_ceil(leaf_pages);
        let tables = leaves.div_ceil(512) * 2 + 16;
        let arena = FrameArena::with_reserve(tables * PAGE + GIB).map_err(|e| FrameErrorText(e.to_string()))?;
        let alloc = |arena: &FrameArena| -> Result<Pfn, FrameErrorText> {
            let t = arena.alloc_4k().map_err(|e| FrameErrorText(e.to_string()))?;
            for e in arena.table(t).iter() {
                e.store(0, Ordering::Relaxed);
            }
            Ok(t)
        };
        let root = alloc(&arena)?;
        let mut leaf_tables = Vec::new();
        let span = GEOMETRY.pages(lvl.up().expect("a leaf level is below 5"));
        for first in (0..leaves * leaf_pages).step_by(span as usize) {
            let mut table = root;
            for l in (level + 1..=GEOMETRY.levels).rev() {
                let e = &arena.table(table)[GEOMETRY.index(first, l) as usize];
                let s = Spte::from_raw(e.load(Ordering::Relaxed));
                table = if s.is_mmu_present() {
                    s.pfn()
                } else {
                    let t = alloc(&arena)?;
                    e.store(FMT.make_nonleaf(t).raw(), Ordering::Relaxed);
                    t
                };
            }
            leaf_tables.push(table);
        }
        // Made-up frames, aligned for any level, far above the gfns.
        let leaf_base = FMT
            .make_leaf(lvl, Pfn::new(1 << 28), SpteAccess::ALL, true, true, false)
            .raw();
        Ok(RefTree {
            arena,
            root,
            level,
            leaf_tables,
            leaf_base,
            leaves,
            leaf_pages,
        })
    }

    /// The leaf entry of `gfn`, found from the root as a fault finds it
    /// (one dependent load per level).
    #[inline(always)]
    fn entry(&self, gfn: u64) -> &AtomicU64 {
        let mut table = self.root;
        let mut l = GEOMETRY.levels;
        while l > self.level {
            table =
                Spte::from_raw(self.arena.table(table)[GEOMETRY.index(gfn, l) as usize].load(Ordering::Acquire)).pfn();
            l -= 1;
        }
        &self.arena.table(table)[GEOMETRY.index(gfn, self.level) as usize]
    }

    /// Stores the leaf of `gfn` (its frame: made up, `gfn` pages above the base).
    #[inline(always)]
    pub fn insert(&self, gfn: u64) {
        self.entry(gfn).store(self.leaf_base + (gfn << 12), Ordering::Release);
    }

    /// Thread `t`'s share, `pages_per_thread` 4K pages: for every 4K page,
    /// the walk to its leaf and a store of the leaf (with huge leaves, the
    /// same value again for each 4K page in it, so the work stays per 4K
    /// page, as the vCPUs' writes are).
    pub fn insert_share(&self, t: usize, pages_per_thread: u64) {
        let start = t as u64 * pages_per_thread;
        let mask = !(self.leaf_pages - 1);
        for gfn in start..start + pages_per_thread {
            self.insert(gfn & mask);
        }
    }

    /// The floor of a fault, thread `t`'s share of `pages_per_thread` 4K
    /// pages in faults of one leaf each, as `populate`'s `page_fault`
    /// phase makes them: per leaf, what no fault can avoid, each step as
    /// the fault does it: the gfn's memslot from the vCPU's cached slot
    /// (the snapshot loaded once, as a vCPU holds it), the host mapping
    /// found by the read-once host walk, the SPTE walk from the root in
    /// these tables, and one compare-exchange of the leaf built from the
    /// host frame. Returns a sink for the values read.
    pub fn floor_share(&self, t: usize, pages_per_thread: u64, slots: &MemslotTable, host: &HostAddressSpace) -> u64 {
        let snapshot = slots.load(0);
        let mut cache = SlotCache::default();
        // One pin for the pass: the host walk's own pin nests in it, as
        // the fault's does in the fault's.
        let _epoch = crossbeam_epoch::pin();
        let start = t as u64 * pages_per_thread;
        let mut sink = 0;
        for gfn in (start..start + pages_per_thread).step_by(self.leaf_pages as usize) {
            let Some(slot) = snapshot.lookup_cached(Gfn::new(gfn), &mut cache) else {
                continue;
            };
            let Some(leaf) = slot.gfn_to_hva(Gfn::new(gfn)).and_then(|hva| host.lookup(hva)) else {
                continue;
            };
            let value = self.leaf_base | (leaf.pfn.align_down(self.leaf_pages).raw() << 12);
            if self
                .entry(gfn)
                .compare_exchange(0, value, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                sink += 1;
            }
        }
        sink
    }

    /// The floor ([`RefTree::floor_share`]) on `threads` threads into the
    /// cleared tree; the best of `rounds` (at least 3) in ns per 4K page
    /// per thread.
    pub fn floor_ns(
        &self,
        threads: u32,
        ppt: u64,
        rounds: u64,
        slots: &MemslotTable,
        host: &HostAddressSpace,
    ) -> Result<f64, BenchError> {
        let mut best = f64::INFINITY;
        for _ in 0..rounds.max(3) {
            self.clear();
            let d = parallel(threads as usize, |t| {
                let n = self.floor_share(t, ppt, slots, host);
                if n == 0 {
                    return Err(BenchError::Run("the floor installed nothing".into()));
                }
                Ok(())
            })?;
            best = best.min(ns(d) / ppt as f64);
        }
        Ok(best)
    }

    /// What fast_page_fault does at minimum for a write to a
    /// write-protected page: find the leaf, set W with a compare-exchange,
    /// set the page's bit in the dirty bitmap.
    #[inline(always)]
    pub fn dirty(&self, gfn: u64, bitmap: &[AtomicU64]) {
        let e = self.entry(gfn);
        let old = e.load(Ordering::Acquire);
        let _ = e.compare_exchange(old, old | FMT.writable_mask(), Ordering::AcqRel, Ordering::Acquire);
        bitmap[(gfn / 64) as usize].fetch_or(1 << (gfn % 64), Ordering::Relaxed);
    }

    /// The linear scan: every leaf of every leaf table, hardware W cleared
    /// with a compare-exchange where set. Returns the leaves changed.
    pub fn scan_clear_writable(&self) -> u64 {
        self.scan_clear(FMT.writable_mask())
    }

    /// The aging reference: every leaf of every leaf table, the Accessed
    /// bit cleared with a compare-exchange where set. Returns the leaves
    /// changed. On a tree with no Accessed bit set it only reads every
    /// leaf: the `test_young` reference.
    pub fn scan_clear_accessed(&self) -> u64 {
        self.scan_clear(FMT.accessed_mask())
    }

    /// Clears `bits` in every leaf where any is set, by compare-exchange.
    #[inline(never)]
    fn scan_clear(&self, bits: u64) -> u64 {
        let mut n = 0;
        for &t in &self.leaf_tables {
            for e in self.arena.table(t).iter() {
                let v = e.load(Ordering::Acquire);
                if v & bits != 0
                    && e.compare_exchange(v, v & !bits, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    n += 1;
                }
            }
        }
        n
    }

    /// Every leaf present, writable and accessed (untimed set-up between rounds).
    pub fn fill(&self) {
        for gfn in (0..self.leaves * self.leaf_pages).step_by(self.leaf_pages as usize) {
            self.insert(gfn);
        }
    }

    /// The populate reference: `threads` threads each storing the leaves
    /// of `ppt` pages into the cleared tree; the best of `rounds` (at
    /// least 3) in ns per page per thread.
    pub fn populate_ns(&self, threads: u32, ppt: u64, rounds: u64) -> Result<f64, BenchError> {
        let mut best = f64::INFINITY;
        for _ in 0..rounds.max(3) {
            self.clear();
            let d = parallel(threads as usize, |t| {
                self.insert_share(t, ppt);
                Ok(())
            })?;
            best = best.min(ns(d) / ppt as f64);
        }
        Ok(best)
    }

    /// Every leaf cleared (untimed set-up between rounds).
    pub fn clear(&self) {
        for &t in &self.leaf_tables {
            for e in self.arena.table(t).iter() {
                e.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// A frame arena error, as text.
#[derive(Debug)]
pub struct FrameErrorText(pub String);

impl From<FrameErrorText> for BenchError {
    fn from(e: FrameErrorText) -> BenchError {
        BenchError::Run(format!("reference tables: {}", e.0))
    }
}

// ---- the benchmarks -------------------------------------------------------

pub(super) fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

pub(super) fn phase(name: &'static str, per_op_ns: f64, reference_ns: f64) -> Phase {
    Phase {
        phase: name,
        per_op_ns,
        reference_ns,
        ratio: per_op_ns / reference_ns,
    }
}

pub(super) fn figure(
    name: &str,
    unit: &'static str,
    value: f64,
    reference: Option<f64>,
    goal: Option<&'static str>,
) -> Figure {
    Figure {
        name: name.to_string(),
        unit,
        value,
        reference,
        goal,
    }
}

/// The 1-minute load average when the benchmark started (Linux), so a
/// reader can tell a busy machine from a slow MMU.
pub(super) fn load_note() -> String {
    match std::fs::read_to_string("/proc/loadavg") {
        Ok(s) => format!(
            "load average at start: {} on {} CPU(s) (other work on the machine skews the figures, most of all the multi-thread ones)",
            s.split_whitespace().next().unwrap_or("?"),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        Err(_) => format!(
            "{} CPU(s) available",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
    }
}

pub(super) fn prefault_note() -> String {
    "host memory pre-faulted before timing: every 4K page written once through HostAddressSpace::write \
     (frames allocated, zeroed, touched), so the timed part is the MMU's fault path, not host page allocation"
        .to_string()
}

/// `populate` (KVM's `demand_paging_test`): `vcpus` threads each fault in
/// `bytes_per_vcpu` of their own region with one 8-byte write per 4K page,
/// through a [`Vcpu`] on the TDP MMU. Phases, each best of `iterations`
/// rounds (default 3) on a fresh VM, in ns per 4K page per vCPU thread:
///
/// - `page_fault` (the headline): the faults as direct
///   [`TdpMmu::page_fault`] calls, one per leaf (the MMU's share of
///   `vcpu`), against the floor of a fault ([`RefTree::floor_share`]: the
///   cached memslot lookup, the read-once host walk, the SPTE walk and one
///   compare-exchange, each as the fault does it); goal 2x;
/// - `vcpu`: the vCPUs' writes (TLB miss, EPT violation, fault, retry),
///   against the store reference: for every 4K page, its leaf found from
///   the root in preallocated tables (one load per level) and written with
///   one atomic store, on as many threads;
/// - `page_fault/store`: `page_fault` against the store reference;
/// - `pre_fault`: the same pages mapped by [`TdpMmu::pre_fault_memory`]
///   (KVM's `KVM_PRE_FAULT_MEMORY`), each thread its region in one call,
///   against the store reference (goal 3x per page);
/// - `2-vcpus` (only when `vcpus` is 1): `vcpu` on two threads, for the
///   scaling figure (two threads' aggregate pages/s over one's).
pub fn populate(cfg: &TdpBenchConfig, progress: &dyn Fn(&str)) -> Result<Report, BenchError> {
    cfg.validate()?;
    let rounds = cfg.iterations.unwrap_or(3);
    let vcpus = cfg.vcpus;
    let bytes = cfg.bytes_per_vcpu;
    let ppt = bytes / PAGE;
    let leaf_pages = cfg.backing.leaf_pages();
    let backing = cfg.backing;
    let max_threads = vcpus.max(2);
    let load = load_note();

    progress(&format!(
        "populate: {vcpus} vCPU(s) x {} ({} backing), {rounds} round(s)",
        fmt_size(bytes),
        backing.name()
    ));
    let tree = RefTree::new(ppt * u64::from(max_threads), backing.leaf_level())?;
    let reference = |threads: u32| tree.populate_ns(threads, ppt, rounds);
    let vcpu_pass = |threads: u32| -> Result<(f64, f64), BenchError> {
        let mut best = f64::INFINITY;
        let mut secs = 0.0;
        for round in 0..rounds {
            let vm = Vm::new(bytes * u64::from(threads), 1, backing)?;
            vm.prefault()?;
            let v = VcpuThreads::spawn(&vm, threads, bytes)?;
            let d = v.write_pass(round)?;
            drop(v);
            let mapped = vm.mapped_pages();
            retire(vm);
            let expected = (ppt * u64::from(threads)) as i64;
            if mapped != expected {
                return Err(BenchError::Run(format!(
                    "populate: {mapped} pages mapped after the pass, expected {expected}"
                )));
            }
            secs += d.as_secs_f64();
            best = best.min(ns(d) / ppt as f64);
        }
        Ok((best, secs))
    };

    let (vcpu_ns, mut seconds) = vcpu_pass(vcpus)?;
    let ref_ns = reference(vcpus)?;

    let mut pf_best = f64::INFINITY;
    for _ in 0..rounds {
        let vm = Vm::new(bytes * u64::from(vcpus), 1, backing)?;
        vm.prefault()?;
        let per = ppt; // each thread its own region, as the vCPUs
        let threads = vcpus as usize;
        let d = parallel(threads, |t| {
            let root = vm.mmu.get_root(0).map_err(|e| run_err("root", e))?;
            let mut cache = vm.mmu.vcpu_caches();
            let start = t as u64 * per;
            for gfn in (start..start + per).step_by(leaf_pages as usize) {
                let fault = TdpFault {
                    gpa: Gpa::new(gfn * PAGE),
                    write: true,
                    exec: false,
                    present: false,
                };
                loop {
                    match vm.mmu.page_fault(&root, fault, &mut cache, None) {
                        Ok(FaultOutcome::Fixed | FaultOutcome::Spurious) => break,
                        Ok(FaultOutcome::Retry) => continue,
                        Ok(other) => return Err(BenchError::Run(format!("fault at gfn {gfn:#x}: {other:?}"))),
                        Err(e) => return Err(run_err(&format!("fault at gfn {gfn:#x}"), e)),
                    }
                }
            }
            Ok(())
        })?;
        retire(vm);
        seconds += d.as_secs_f64();
        pf_best = pf_best.min(ns(d) / ppt as f64);
    }
    // The same pages by `pre_fault_memory` (KVM_PRE_FAULT_MEMORY), each
    // thread its region in one call.
    let mut pre_best = f64::INFINITY;
    for _ in 0..rounds {
        let vm = Vm::new(bytes * u64::from(vcpus), 1, backing)?;
        vm.prefault()?;
        let d = parallel(vcpus as usize, |t| {
            let root = vm.mmu.get_root(0).map_err(|e| run_err("root", e))?;
            let mut cache = vm.mmu.vcpu_caches();
            let start = Gpa::new(t as u64 * bytes);
            let r = vm
                .mmu
                .pre_fault_memory(&root, start, bytes, &mut cache)
                .map_err(|e| run_err("pre-fault", e))?;
            if r.bytes != bytes {
                return Err(BenchError::Run(format!("pre-fault stopped early: {r:?}")));
            }
            Ok(())
        })?;
        let mapped = vm.mapped_pages();
        retire(vm);
        if mapped != (ppt * u64::from(vcpus)) as i64 {
            return Err(BenchError::Run(format!("pre-fault: {mapped} pages mapped")));
        }
        seconds += d.as_secs_f64();
        pre_best = pre_best.min(ns(d) / ppt as f64);
    }
    // The floor, on the memslots and host memory of a VM like the ones
    // the faults ran on.
    let floor_ns = {
        let vm = Vm::new(bytes * u64::from(vcpus), 1, backing)?;
        vm.prefault()?;
        let f = tree.floor_ns(vcpus, ppt, rounds, &vm.slots, &vm.host);
        retire(vm);
        f?
    };
    let mut phases = vec![
        phase("page_fault", pf_best, floor_ns),
        phase("vcpu", vcpu_ns, ref_ns),
        phase("page_fault/store", pf_best, ref_ns),
        phase("pre_fault", pre_best, ref_ns),
    ];

    let mut figures = vec![
        figure(
            "page_fault",
            "pages/s/thread",
            1e9 / pf_best,
            Some(1e9 / floor_ns),
            None,
        ),
        figure("vcpu", "pages/s/thread", 1e9 / vcpu_ns, Some(1e9 / ref_ns), None),
        figure(
            "pre_fault per 4K page / bare insert",
            "x",
            pre_best / ref_ns,
            None,
            Some("<= 3"),
        ),
    ];
    if vcpus == 1 {
        progress("populate: the same on 2 threads, for the scaling");
        let (two_ns, secs) = vcpu_pass(2)?;
        seconds += secs;
        let ref2_ns = reference(2)?;
        phases.push(phase("2-vcpus", two_ns, ref2_ns));
        figures.push(figure(
            "2-thread scaling (aggregate pages/s, 2 threads / 1)",
            "x",
            2.0 * vcpu_ns / two_ns,
            Some(2.0 * ref_ns / ref2_ns),
            Some(">= 1.7"),
        ));
    }
    let mut notes = vec![
        load,
        prefault_note(),
        format!(
            "per_op_ns: wall time of the pass / pages per vCPU thread ({ppt}); best of {rounds} round(s), a fresh VM each"
        ),
    ];
    if leaf_pages > 1 {
        notes.push(format!(
            "{} backing: one SPTE per {} pages; the vCPUs still write every 4K page (the others hit the TLB), \
             and figures stay per 4K page",
            backing.name(),
            leaf_pages
        ));
    }
    Ok(Report {
        result: BenchResult {
            bench: "populate",
            mmu: "tdp",
            vcpus,
            pages: ppt * u64::from(vcpus),
            seconds,
            per_op_ns: pf_best,
            reference_ns: floor_ns,
            ratio: pf_best / floor_ns,
            reference: "the floor of a fault, per leaf: the vCPU's cached memslot lookup, the read-once host walk, the SPTE walk from the root in preallocated tables and one compare-exchange of the leaf, as many threads (vcpu and page_fault/store: per 4K page, the walk and one atomic store)",
            goal_ratio: Some(2.0),
            phases,
        },
        backing: Some(backing.name()),
        figures,
        notes,
    })
}

/// `dirty-log` (KVM's `dirty_log_perf_test`): after populating, enables
/// dirty logging on the slot (`enable`), then `iterations` times (default
/// 2) each vCPU writes every page of its region once (`dirty`) and the VMM
/// harvests and re-protects (`get`, [`TdpMmu::get_dirty_log`]). Figures in
/// ns per 4K page (`dirty`: per page per vCPU thread), best iteration.
///
/// References, on preallocated tables of the same size: for `get` and
/// `enable`, a linear scan of the leaf tables clearing hardware W with a
/// compare-exchange; for `dirty`, per page a walk from the root, a
/// compare-exchange setting W and a bit set in a bitmap (what the fast
/// path must do), on as many threads.
pub fn dirty_log(cfg: &TdpBenchConfig, progress: &dyn Fn(&str)) -> Result<Report, BenchError> {
    cfg.validate()?;
    let iterations = cfg.iterations.unwrap_or(2);
    let vcpus = cfg.vcpus;
    let bytes = cfg.bytes_per_vcpu;
    let ppt = bytes / PAGE;
    let total = ppt * u64::from(vcpus);
    let backing = cfg.backing;
    let load = load_note();

    progress(&format!(
        "dirty-log: populating {} ({vcpus} vCPU(s) x {})",
        fmt_size(bytes * u64::from(vcpus)),
        fmt_size(bytes)
    ));
    let vm = Vm::new(bytes * u64::from(vcpus), 1, backing)?;
    vm.prefault()?;
    let v = VcpuThreads::spawn(&vm, vcpus, bytes)?;
    let populate = v.write_pass(1)?;

    let t = Instant::now();
    vm.slots
        .update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES)
        .map_err(|e| run_err("enabling dirty logging", e))?;
    let enable = t.elapsed();
    let mut seconds = enable.as_secs_f64();

    let mut dirty_best = f64::INFINITY;
    let mut get_best = f64::INFINITY;
    for it in 0..iterations {
        progress(&format!("dirty-log: iteration {}/{iterations}", it + 1));
        let d = v.write_pass(it + 2)?;
        let t = Instant::now();
        let bitmap = vm.mmu.get_dirty_log(0, 0).map_err(|e| run_err("get_dirty_log", e))?;
        let g = t.elapsed();
        let dirty: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        if dirty != total {
            return Err(BenchError::Run(format!(
                "dirty-log: iteration {}: {dirty} pages logged dirty, {total} written",
                it + 1
            )));
        }
        seconds += d.as_secs_f64() + g.as_secs_f64();
        dirty_best = dirty_best.min(ns(d) / ppt as f64);
        get_best = get_best.min(ns(g) / total as f64);
    }
    let enable_ns = ns(enable) / total as f64;

    progress("dirty-log: references");
    let tree = RefTree::new(total, 1)?;
    let mut scan_best = f64::INFINITY;
    let mut ref_dirty_best = f64::INFINITY;
    let bitmap: Vec<AtomicU64> = (0..total.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
    for _ in 0..iterations.max(3) {
        tree.fill();
        let t = Instant::now();
        let n = tree.scan_clear_writable();
        let d = t.elapsed();
        if n != total {
            return Err(BenchError::Run(format!("reference scan changed {n} of {total} leaves")));
        }
        scan_best = scan_best.min(ns(d) / total as f64);
        // The tree is now write-protected: the dirty reference sets W back.
        let d = parallel(vcpus as usize, |i| {
            let start = i as u64 * ppt;
            for gfn in start..start + ppt {
                tree.dirty(gfn, &bitmap);
            }
            Ok(())
        })?;
        ref_dirty_best = ref_dirty_best.min(ns(d) / ppt as f64);
        for w in &bitmap {
            w.store(0, Ordering::Relaxed);
        }
    }

    let phases = vec![
        phase("get", get_best, scan_best),
        phase("dirty", dirty_best, ref_dirty_best),
        phase("enable", enable_ns, scan_best),
    ];
    let per_gib = |x: f64| x * PAGES_PER_GIB / 1e6;
    let figures = vec![
        figure(
            "get",
            "ms/GiB",
            per_gib(get_best),
            Some(per_gib(scan_best)),
            Some("<= 2x reference"),
        ),
        figure(
            "dirty (per vCPU thread)",
            "ms/GiB",
            per_gib(dirty_best),
            Some(per_gib(ref_dirty_best)),
            None,
        ),
        figure("enable", "ms/GiB", per_gib(enable_ns), Some(per_gib(scan_best)), None),
        figure(
            "populate (untimed setup, for information)",
            "ms/GiB",
            ns(populate) / ppt as f64 * PAGES_PER_GIB / 1e6,
            None,
            None,
        ),
    ];
    let mut notes = vec![
        load,
        prefault_note(),
        format!(
            "dirty: wall time / pages per vCPU thread ({ppt}); get, enable: one call / all pages ({total}); \
             dirty and get: best of {iterations} iteration(s); enable: once"
        ),
        "get = KVM_GET_DIRTY_LOG without manual protect: takes the bitmap, write-protects the dirty pages, flushes TLBs"
            .to_string(),
    ];
    if backing.leaf_pages() > 1 {
        notes.push(format!(
            "{} backing: enable also splits the huge SPTEs (the reference does not)",
            backing.name()
        ));
    }
    Ok(Report {
        result: BenchResult {
            bench: "dirty-log",
            mmu: "tdp",
            vcpus,
            pages: total,
            seconds,
            per_op_ns: get_best,
            reference_ns: scan_best,
            ratio: get_best / scan_best,
            reference: "get/enable: linear scan of the leaf tables clearing W by compare-exchange; \
                        dirty: walk + compare-exchange + bitmap bit per page",
            goal_ratio: Some(2.0),
            phases,
        },
        backing: Some(backing.name()),
        figures,
        notes,
    })
}

/// Guest memory mapped by [`zap_all`]'s two sizes.
pub const ZAP_SIZES: [(&str, u64); 2] = [("1GiB", GIB), ("16GiB", 16 * GIB)];

/// `zap-all`: the time the caller of [`TdpMmu::zap_all_fast`] waits with
/// 1 GiB and with 16 GiB mapped, best of `iterations` rounds (default 3
/// with 4K leaves, 10 with huge ones),
/// and, as separate phases, [`TdpMmu::zap_invalidated_roots`] (the deferred
/// work, which grows with memory). The reference is the 1 GiB time; the
/// ratio 16 GiB / 1 GiB should be about 1.
///
/// The 16 GiB are host memory aliased by several memslots (the same hva
/// range behind each, as KVM allows), populated with direct
/// [`TdpMmu::page_fault`] calls on up to 2 threads; leaves are 4K with
/// `anon` backing, 2M with `thp`, 1G with `hugetlb-1g`. `-v` and `-b` do
/// not apply.
pub fn zap_all(cfg: &TdpBenchConfig, progress: &dyn Fn(&str)) -> Result<Report, BenchError> {
    if cfg.iterations == Some(0) {
        return Err(BenchError::Config("-i/--iterations 0: must be at least 1".into()));
    }
    let backing = cfg.backing;
    let leaf_pages = backing.leaf_pages();
    // Huge leaves make a round cheap: more rounds against timer noise.
    let rounds = cfg.iterations.unwrap_or(if leaf_pages > 1 { 10 } else { 3 });
    let alias = if backing == Backing::Hugetlb1G { GIB } else { 256 * MIB };
    let largest = ZAP_SIZES[ZAP_SIZES.len() - 1].1;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(2);
    let load = load_note();
    progress(&format!(
        "zap-all: {} of host memory behind {} aliasing memslots ({} backing)",
        fmt_size(alias),
        largest / alias,
        backing.name()
    ));
    let setup_start = Instant::now();
    let vm = Vm::new(alias, largest / alias, backing)?;
    vm.prefault()?;
    let mut setup = setup_start.elapsed();

    let mut zap = [f64::INFINITY; 2];
    let mut deferred = [f64::INFINITY; 2];
    let mut leaves = [0u64; 2];
    let mut seconds = 0.0;
    for (k, &(name, size)) in ZAP_SIZES.iter().enumerate() {
        for round in 0..rounds {
            progress(&format!(
                "zap-all: mapping {name} ({} SPTEs), round {}/{rounds}",
                size / PAGE / leaf_pages,
                round + 1
            ));
            let (d, installed) = fault_range(&vm, size / PAGE, leaf_pages, threads)?;
            setup += d;
            let mapped = vm.mapped_pages();
            if mapped != (size / PAGE) as i64 {
                return Err(BenchError::Run(format!(
                    "zap-all: {mapped} pages mapped for {name}, expected {}",
                    size / PAGE
                )));
            }
            let t = Instant::now();
            vm.mmu.zap_all_fast();
            let z = t.elapsed();
            let t = Instant::now();
            let zapped = vm.mmu.zap_invalidated_roots();
            let i = t.elapsed();
            if zapped != installed {
                return Err(BenchError::Run(format!(
                    "zap-all: zap_invalidated_roots zapped {zapped} leaves, {installed} installed"
                )));
            }
            seconds += z.as_secs_f64() + i.as_secs_f64();
            zap[k] = zap[k].min(ns(z));
            deferred[k] = deferred[k].min(ns(i));
            leaves[k] = zapped;
        }
    }
    let phases = vec![
        phase("16GiB", zap[1], zap[0]),
        phase("1GiB", zap[0], zap[0]),
        phase("zap_invalidated_roots/16GiB", deferred[1], deferred[0]),
        phase("zap_invalidated_roots/1GiB", deferred[0], deferred[0]),
    ];
    let figures = vec![
        figure("zap_all_fast, 1GiB mapped", "us", zap[0] / 1e3, None, None),
        figure(
            "zap_all_fast, 16GiB mapped",
            "us",
            zap[1] / 1e3,
            Some(zap[0] / 1e3),
            Some("about the 1GiB time"),
        ),
        figure(
            "zap_invalidated_roots/1GiB per leaf",
            "ns/leaf",
            deferred[0] / leaves[0].max(1) as f64,
            None,
            None,
        ),
        figure(
            "zap_invalidated_roots/16GiB per leaf",
            "ns/leaf",
            deferred[1] / leaves[1].max(1) as f64,
            None,
            None,
        ),
        figure("setup (pre-fault, populate)", "s", setup.as_secs_f64(), None, None),
    ];
    let notes = vec![
        load,
        format!(
            "16GiB = {} memslots of {} aliasing one host range (the memslot layer accepts overlapping hvas); \
             pages populated by direct page_fault calls on {threads} thread(s), {} pages per SPTE",
            largest / alias,
            fmt_size(alias),
            leaf_pages
        ),
        format!(
            "per_op_ns of the size phases: one zap_all_fast call (no vCPU running), best of {rounds}; \
             of zap_invalidated_roots: one call, best of {rounds}"
        ),
        "goal_ratio 1.5 stands for 'about 1': the calls take microseconds, where timer and scheduling noise show"
            .to_string(),
    ];
    Ok(Report {
        result: BenchResult {
            bench: "zap-all",
            mmu: "tdp",
            vcpus: 0,
            pages: largest / PAGE,
            seconds,
            per_op_ns: zap[1],
            reference_ns: zap[0],
            ratio: zap[1] / zap[0],
            reference: "zap_all_fast with 1 GiB mapped (ratio = 16 GiB time / 1 GiB time)",
            goal_ratio: Some(1.5),
            phases,
        },
        backing: Some(backing.name()),
        figures,
        notes,
    })
}

// ---- access tracking --------------------------------------------------------

/// Leaf SPTEs of a VM's tree by state, read by walking it.
#[derive(Clone, Copy, Debug)]
struct LeafStates {
    /// Present leaves.
    leaves: u64,
    /// Leaves the MMU considers young ([`Spte::is_accessed`]).
    young: u64,
    /// Leaves access-tracked (EPT without A/D only).
    tracked: u64,
}

/// Walks every root of address space 0 (there is one: nothing zaps in
/// `access-tracking`) and counts its leaves by state.
fn leaf_states(vm: &Vm) -> Result<LeafStates, BenchError> {
    let root = vm.mmu.get_root(0).map_err(|e| run_err("root", e))?;
    let fmt = vm.mmu.format();
    let mut s = LeafStates {
        leaves: 0,
        young: 0,
        tracked: 0,
    };
    // Pinned, as every walker of the tree is: no table is freed under it.
    let epoch = crossbeam_epoch::pin();
    let mut it = SpteIter::new(
        &epoch,
        vm.mmu.arena(),
        vm.mmu.config().geometry,
        root.root().pfn(),
        Level::L1,
        Gfn::new(0),
    );
    while it.valid() {
        let spte = it.old_spte();
        if spte.is_mmu_present() && spte.is_leaf(it.level()) {
            s.leaves += 1;
            s.young += u64::from(spte.is_accessed(fmt));
            s.tracked += u64::from(spte.is_access_tracked(fmt));
            it.skip_subtree();
        } else {
            it.next();
        }
    }
    Ok(s)
}

/// One A/D mode of [`access_tracking`]: ns per 4K page, best iteration.
#[derive(Clone, Copy, Debug)]
struct AgingRun {
    /// One aging call over all guest memory.
    age: f64,
    /// One `test_young` call over all guest memory, right after aging.
    test: f64,
    /// The vCPUs' write pass before aging, per page per vCPU thread.
    before: f64,
    /// The same pass right after aging.
    after: f64,
    /// page_idle-style aging, one call per 4K page (once).
    per_page: f64,
    /// The reference scan clearing A.
    scan: f64,
    /// The reference scan finding nothing to clear.
    scan_test: f64,
    /// The populating pass (untimed setup), per page per vCPU thread.
    populate: f64,
    /// EPT exits per leaf SPTE in the re-access passes.
    exits_per_leaf: f64,
    /// Seconds measured (not the reference, not the setup).
    seconds: f64,
}

/// Populates a VM whose EPT has A/D bits `ad`, then `iterations` times:
/// a write pass (the control), aging, `test_young`, a write pass on the
/// aged memory, each verified; then one page_idle-style aging pass, then
/// the reference on its own tables.
fn aging_run(cfg: &TdpBenchConfig, ad: bool, iterations: u64, progress: &dyn Fn(&str)) -> Result<AgingRun, BenchError> {
    let mode = if ad { "A/D on" } else { "A/D off" };
    let vcpus = cfg.vcpus;
    let bytes = cfg.bytes_per_vcpu;
    let backing = cfg.backing;
    let ppt = bytes / PAGE;
    let total = ppt * u64::from(vcpus);
    let leaf_pages = backing.leaf_pages();
    let leaf_bytes = leaf_pages * PAGE;
    let leaves = total / leaf_pages;
    let guest_bytes = bytes * u64::from(vcpus);
    let fail = |what: String| BenchError::Run(format!("access-tracking ({mode}): {what}"));

    progress(&format!(
        "access-tracking ({mode}): populating {} ({vcpus} vCPU(s) x {}, {} backing)",
        fmt_size(guest_bytes),
        fmt_size(bytes),
        backing.name()
    ));
    let config = TdpConfig {
        ad,
        ..TdpConfig::default()
    };
    let vm = Vm::with_config(guest_bytes, 1, backing, config)?;
    vm.prefault()?;
    let v = VcpuThreads::spawn(&vm, vcpus, bytes)?;
    let populate = v.write_pass(1)?;
    let range = HvaRange::new(Hva::new(HVA_BASE), guest_bytes);

    // Every leaf, by walking the tree: present (aging never zaps), and
    // young or old as expected (without A/D, old is access-tracked).
    let check = |when: &str, young: bool| -> Result<(), BenchError> {
        let s = leaf_states(&vm)?;
        let right = s.leaves == leaves
            && if young {
                s.young == leaves && s.tracked == 0
            } else {
                s.young == 0 && s.tracked == if ad { 0 } else { leaves }
            };
        if right {
            Ok(())
        } else {
            Err(fail(format!(
                "{when}: {} leaf SPTEs ({leaves} expected), {} young, {} access-tracked; expected every one {}",
                s.leaves,
                s.young,
                s.tracked,
                match (young, ad) {
                    (true, _) => "young",
                    (false, true) => "old (A clear)",
                    (false, false) => "access-tracked",
                }
            )))
        }
    };
    check("after populating", true)?;

    let mut r = AgingRun {
        age: f64::INFINITY,
        test: f64::INFINITY,
        before: f64::INFINITY,
        after: f64::INFINITY,
        per_page: f64::INFINITY,
        scan: f64::INFINITY,
        scan_test: f64::INFINITY,
        populate: ns(populate) / ppt as f64,
        exits_per_leaf: 0.0,
        seconds: 0.0,
    };
    let mut exits = 0i64;
    for it in 0..iterations {
        progress(&format!("access-tracking ({mode}): iteration {}/{iterations}", it + 1));
        let before = v.write_pass(2 * it + 2)?;
        check("after the control pass", true)?;

        let t = Instant::now();
        let was_young = vm.mmu.age_hva_range(range, true);
        let age = t.elapsed();
        let t = Instant::now();
        let still_young = vm.mmu.test_age_hva_range(range);
        let test = t.elapsed();
        if !was_young {
            return Err(fail(
                "aging found nothing young after the vCPUs wrote every page".into(),
            ));
        }
        if still_young {
            return Err(fail("test_young reports young memory right after aging".into()));
        }
        check("after aging", false)?;

        let s0 = vm.mmu.stats().snapshot();
        let after = v.write_pass(2 * it + 3)?;
        let s1 = vm.mmu.stats().snapshot();
        let (taken, fast) = (s1.pf_taken - s0.pf_taken, s1.pf_fast - s0.pf_fast);
        if ad && taken != 0 {
            return Err(fail(format!(
                "{taken} EPT violations re-accessing aged memory: with A/D the walker sets A without an exit"
            )));
        }
        if !ad && (taken != leaves as i64 || fast != leaves as i64) {
            return Err(fail(format!(
                "re-accessing aged memory took {taken} EPT violations, {fast} fixed on the fast path: \
                 expected one of each per access-tracked leaf ({leaves})"
            )));
        }
        exits += taken;
        check("after the re-access", true)?;
        if !vm.mmu.test_age_hva_range(range) {
            return Err(fail("test_young reports nothing young after the re-access".into()));
        }
        // And leaf by leaf through the API, at each vCPU region's ends.
        for i in 0..u64::from(vcpus) {
            for off in [i * bytes, (i + 1) * bytes - leaf_bytes] {
                if !vm
                    .mmu
                    .test_age_hva_range(HvaRange::new(Hva::new(HVA_BASE + off), leaf_bytes))
                {
                    return Err(fail(format!(
                        "test_young reports the leaf at gpa {off:#x} old after the re-access"
                    )));
                }
            }
        }

        r.seconds += (before + age + test + after).as_secs_f64();
        r.age = r.age.min(ns(age) / total as f64);
        r.test = r.test.min(ns(test) / total as f64);
        r.before = r.before.min(ns(before) / ppt as f64);
        r.after = r.after.min(ns(after) / ppt as f64);
    }
    r.exits_per_leaf = exits as f64 / (iterations * leaves) as f64;

    // KVM's selftest marks memory idle through page_idle: one clear_young
    // (no flush) per 4K page. A huge leaf is young for the first call only.
    progress(&format!(
        "access-tracking ({mode}): page_idle-style aging, one call per 4K page"
    ));
    let t = Instant::now();
    let mut young = 0u64;
    for off in (0..guest_bytes).step_by(PAGE as usize) {
        young += u64::from(
            vm.mmu
                .age_hva_range(HvaRange::new(Hva::new(HVA_BASE + off), PAGE), false),
        );
    }
    let per_page = t.elapsed();
    if young != leaves {
        return Err(fail(format!(
            "per-page aging found {young} pages young, expected one per leaf SPTE ({leaves})"
        )));
    }
    check("after per-page aging", false)?;
    r.seconds += per_page.as_secs_f64();
    r.per_page = ns(per_page) / total as f64;
    drop(v);
    retire(vm);

    progress(&format!("access-tracking ({mode}): reference"));
    let tree = RefTree::new(total, backing.leaf_level())?;
    for _ in 0..iterations.max(3) {
        tree.fill();
        let t = Instant::now();
        let n = tree.scan_clear_accessed();
        let d = t.elapsed();
        if n != leaves {
            return Err(fail(format!("the reference scan cleared {n} of {leaves} leaves")));
        }
        let t = Instant::now();
        let n = tree.scan_clear_accessed();
        let d_test = t.elapsed();
        if n != 0 {
            return Err(fail(format!("the reference test scan found {n} leaves young")));
        }
        r.scan = r.scan.min(ns(d) / total as f64);
        r.scan_test = r.scan_test.min(ns(d_test) / total as f64);
    }
    Ok(r)
}

/// `access-tracking` (KVM's `access_tracking_perf_test`): `vcpus` threads
/// populate their memory, then `iterations` times (default 3) write every
/// page (the control), the primary MMU ages all of guest memory at once
/// ([`TdpMmu::age_hva_range`] with a flush, `clear_flush_young`), then the
/// vCPUs write every page again. Run twice: with EPT A/D bits (aging
/// clears A; the hardware walker sets it again, no exit) and without
/// (aging makes every SPTE access-tracked; each re-access exits once per
/// leaf and is fixed on the lockless fast path). Every step is verified
/// by walking the SPTEs and through `test_young`; a wrong state fails the
/// run. Phases in ns per 4K page, best iteration, for each mode:
///
/// - `age`: the aging call; reference: a linear scan of as many leaf SPTEs
///   in preallocated tables, clearing A with a compare-exchange;
/// - `access`: the vCPUs' write pass right after aging, per page per vCPU
///   thread; reference: the same pass before aging, in the same iteration;
/// - `test_young`: [`TdpMmu::test_age_hva_range`] over everything right
///   after aging (nothing young: a full scan); reference: the same linear
///   scan with nothing to clear;
/// - `age-per-page`: page_idle-style aging as the selftest does it, one
///   `clear_young` per 4K page (once, not best-of); reference: the scan.
pub fn access_tracking(cfg: &TdpBenchConfig, progress: &dyn Fn(&str)) -> Result<Report, BenchError> {
    cfg.validate()?;
    let iterations = cfg.iterations.unwrap_or(3);
    let vcpus = cfg.vcpus;
    let backing = cfg.backing;
    let ppt = cfg.bytes_per_vcpu / PAGE;
    let total = ppt * u64::from(vcpus);
    let leaf_pages = backing.leaf_pages();
    let load = load_note();

    let on = aging_run(cfg, true, iterations, progress)?;
    let off = aging_run(cfg, false, iterations, progress)?;

    let mut phases = Vec::new();
    for ([age, access, test, per_page], r) in [
        (
            ["ad-on/age", "ad-on/access", "ad-on/test_young", "ad-on/age-per-page"],
            &on,
        ),
        (
            [
                "ad-off/age",
                "ad-off/access",
                "ad-off/test_young",
                "ad-off/age-per-page",
            ],
            &off,
        ),
    ] {
        phases.push(phase(age, r.age, r.scan));
        phases.push(phase(access, r.after, r.before));
        phases.push(phase(test, r.test, r.scan_test));
        phases.push(phase(per_page, r.per_page, r.scan));
    }
    let per_gib = |x: f64| x * PAGES_PER_GIB / 1e6;
    let per_leaf = |x: f64| x * leaf_pages as f64;
    let mut figures = Vec::new();
    for (mode, r) in [("A/D on", &on), ("A/D off", &off)] {
        figures.push(figure(
            &format!("age, {mode}"),
            "ms/GiB",
            per_gib(r.age),
            Some(per_gib(r.scan)),
            None,
        ));
        figures.push(figure(
            &format!("age, {mode}, per leaf SPTE"),
            "ns/SPTE",
            per_leaf(r.age),
            Some(per_leaf(r.scan)),
            None,
        ));
        figures.push(figure(
            &format!("access after aging, {mode} (per vCPU thread; reference: before aging)"),
            "ms/GiB",
            per_gib(r.after),
            Some(per_gib(r.before)),
            None,
        ));
        figures.push(figure(
            &format!("EPT exits re-accessing aged memory, {mode}"),
            "exits/SPTE",
            r.exits_per_leaf,
            None,
            None,
        ));
        figures.push(figure(
            &format!("page_idle-style aging (one call per 4K page), {mode}"),
            "ms/GiB",
            per_gib(r.per_page),
            Some(per_gib(r.scan)),
            None,
        ));
    }
    figures.push(figure(
        "populate (untimed setup, A/D on, for information)",
        "ms/GiB",
        per_gib(on.populate),
        None,
        None,
    ));
    let mut notes = vec![
        load,
        prefault_note(),
        format!(
            "age: one TdpMmu::age_hva_range call over all guest memory with a TLB flush (clear_flush_young, \
             the reclaim path's notifier), called directly: the host's own page-table aging is not included; \
             test_young: one test_age_hva_range call right after; both per 4K page ({total} pages), \
             best of {iterations} iteration(s)"
        ),
        format!(
            "access: wall time of a write pass / pages per vCPU thread ({ppt}); reference: the same pass \
             on the same memory before aging, in the same iteration"
        ),
        "A/D on: aging clears EPT A, the re-access sets it through the hardware walker (no exit); \
         A/D off: aging makes every SPTE access-tracked, the re-access exits once per SPTE and the fast \
         path restores it"
            .to_string(),
        "verified in every iteration by walking the SPTEs: after aging every leaf present and old \
         (A/D off: access-tracked), test_young false; after the re-access every leaf young, test_young \
         true (over everything, and over each vCPU region's first and last SPTE), with no exit (A/D on) or exactly one fast-path fix per \
         SPTE (A/D off)"
            .to_string(),
        "age-per-page: one clear_young (no flush) per 4K page, as page_idle marks pfns in KVM's selftest; \
         run once per mode"
            .to_string(),
    ];
    if leaf_pages > 1 {
        notes.push(format!(
            "{} backing: one SPTE per {leaf_pages} pages, aged as one leaf; the reference scans as many \
             leaves; figures stay per 4K page (see the per leaf SPTE figures)",
            backing.name()
        ));
    }
    Ok(Report {
        result: BenchResult {
            bench: "access-tracking",
            mmu: "tdp",
            vcpus,
            pages: total,
            seconds: on.seconds + off.seconds,
            per_op_ns: on.age,
            reference_ns: on.scan,
            ratio: on.age / on.scan,
            reference: "age, test_young: linear scan of as many leaf SPTEs in preallocated tables, clearing A by \
                        compare-exchange; access: the same vCPU pass before aging",
            goal_ratio: None,
            phases,
        },
        backing: Some(backing.name()),
        figures,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_tree_inserts_and_scans_every_leaf() {
        let tree = RefTree::new(1500, 1).unwrap();
        tree.fill();
        assert_eq!(tree.scan_clear_writable(), 1500);
        assert_eq!(tree.scan_clear_writable(), 0);
        let bitmap: Vec<AtomicU64> = (0..24).map(|_| AtomicU64::new(0)).collect();
        tree.dirty(7, &bitmap);
        assert_eq!(bitmap[0].load(Ordering::Relaxed), 1 << 7);
        assert_eq!(tree.scan_clear_writable(), 1);
    }

    #[test]
    fn reference_tree_clears_every_accessed_bit_once() {
        let tree = RefTree::new(3 * 512, 2).unwrap();
        tree.fill();
        assert_eq!(tree.scan_clear_accessed(), 3, "one 2M leaf per 512 pages");
        assert_eq!(tree.scan_clear_accessed(), 0, "nothing left young");
        tree.insert(512);
        assert_eq!(tree.scan_clear_accessed(), 1);
    }

    /// The checks have teeth: aging without a TLB flush leaves the
    /// translations the vCPU cached, so reading the memory again does not
    /// make every leaf young, and the leaf walk sees it. (Reads: with
    /// paging off the model caches no write permission, so writes always
    /// walk.)
    #[test]
    fn leaf_states_see_what_a_missing_flush_hides() {
        // 256 pages: every translation fits the vCPU's TLB (512 entries).
        let bytes = MIB;
        let read_all = |v: &mut Vcpu| {
            for gpa in (0..bytes).step_by(PAGE as usize) {
                let r = v
                    .access(Gva::new(gpa), Access::new(AccessKind::Read, 0, false), 8, 0)
                    .unwrap();
                assert!(matches!(r, AccessResult::Done { mmio: false, .. }), "{r:?}");
            }
        };
        for ad in [true, false] {
            let config = TdpConfig {
                ad,
                ..TdpConfig::default()
            };
            let vm = Vm::with_config(bytes, 1, Backing::Anon, config).unwrap();
            vm.prefault().unwrap();
            let mut v = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), 1).unwrap();
            v.set_state(ControlRegs::default(), 0, 0).unwrap();
            read_all(&mut v);
            read_all(&mut v);
            let s = leaf_states(&vm).unwrap();
            assert_eq!((s.leaves, s.young, s.tracked), (256, 256, 0));
            assert!(vm.mmu.age_hva_range(HvaRange::new(Hva::new(HVA_BASE), bytes), false));
            read_all(&mut v);
            let s = leaf_states(&vm).unwrap();
            assert_eq!(s.leaves, 256, "aging never zaps");
            assert!(s.young < 256, "ad {ad}: TLB hits set no A bit: {s:?}");
            assert_eq!(s.tracked, if ad { 0 } else { 256 - s.young }, "{s:?}");
            drop(v);
            retire(vm);
        }
    }

    #[test]
    fn access_tracking_verifies_both_ad_modes() {
        for backing in [Backing::Anon, Backing::Thp] {
            let cfg = TdpBenchConfig {
                vcpus: 2,
                bytes_per_vcpu: 4 * MIB,
                iterations: Some(2),
                backing,
            };
            let r = access_tracking(&cfg, &|_| {}).unwrap();
            assert_eq!(r.result.bench, "access-tracking");
            assert_eq!(r.result.pages, 2048);
            assert_eq!(r.result.phases.len(), 8);
            assert_eq!(r.result.phases[0].phase, "ad-on/age");
            assert_eq!(r.result.phases[5].phase, "ad-off/access");
            for p in &r.result.phases {
                assert!(p.per_op_ns > 0.0 && p.reference_ns > 0.0, "{p:?}");
            }
        }
    }

    #[test]
    fn small_runs_report_every_phase() {
        let cfg = TdpBenchConfig {
            vcpus: 1,
            bytes_per_vcpu: 2 * MIB,
            iterations: Some(1),
            backing: Backing::Anon,
        };
        let r = populate(&cfg, &|_| {}).unwrap();
        assert_eq!(r.result.pages, 512);
        assert_eq!(r.result.phases.len(), 5);
        assert_eq!(r.result.phases[0].phase, "page_fault");
        assert!(r.result.reference_ns > 0.0);
        let r = dirty_log(&cfg, &|_| {}).unwrap();
        assert_eq!(r.result.phases[0].phase, "get");
        assert!(r.result.per_op_ns > 0.0);
    }

    #[test]
    fn sizes_are_checked() {
        let bad = TdpBenchConfig {
            bytes_per_vcpu: 3 * MIB,
            backing: Backing::Thp,
            ..TdpBenchConfig::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("--bytes-per-vcpu 3M") && e.contains("2M"), "{e}");
        assert_eq!(fmt_size(64 * MIB), "64M");
        assert_eq!(fmt_size(4097), "4097");
    }
}
