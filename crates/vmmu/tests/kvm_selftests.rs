//! KVM's own selftests (`tools/testing/selftests/kvm/`), ported: what each
//! asserts is asserted here, on vmmu's MMUs, in every configuration it
//! applies to.
//!
//! - `dirty_log_test` (and `clear_dirty_log_test`, its manual-protect
//!   build): a vCPU thread writes the iteration number to random pages
//!   while the main thread harvests the dirty log by each mode (get, clear
//!   with manual protect, clear with an initially-set bitmap, the dirty
//!   ring at two sizes), stops the vCPU and checks every page against the
//!   bitmap with KVM's rules, over every dirty-log configuration of both
//!   MMUs.
//! - `x86/dirty_log_page_splitting_test`: the page-size counters when
//!   memory is populated, when logging starts (eager split), at each CLEAR
//!   (manual protect), and when memory is touched again after logging, on
//!   2M and 1G backing.
//! - `x86/nx_huge_pages_test`: the counters `pages_2m` and
//!   `nx_lpage_splits` through reads and instruction fetches of three huge
//!   pages, the recovery worker reclaiming the split ones, with the
//!   mitigation on and off.
//! - `access_tracking_perf_test`'s idle-page tracking, with EPT A/D on and
//!   off (its timing part is `vmmu bench access-tracking`).
//! - Frame exhaustion (KVM's `fail-nth` fault injection): every allocation
//!   point of a scenario fails in turn; the VM must answer with an error or
//!   absorb it, never hang, and work once memory returns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::CpuFeatures;
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, Vcpu, VcpuError};
use vmmu::host::{HvaRange, VmaFlags};
use vmmu::mem::{MemslotConfig, MemslotFlags};
use vmmu::mmu::shadow::ShadowError;
use vmmu::mmu::stats::MmuStatsSnapshot;
use vmmu::mmu::tdp::{TdpConfig, TdpError};
use vmmu::vm::Vm;
use vmmu::vm::config::VmConfig;
use vmmu::vm::{Machine, MmuKind, RAM_HVA};
use vmmu::walker::ControlRegs;

const MB: u64 = 1 << 20;

fn set_logging(slots: &vmmu::mem::MemslotTable, on: bool) {
    let flags = if on {
        MemslotFlags::LOG_DIRTY_PAGES
    } else {
        MemslotFlags::empty()
    };
    slots.update_flags(0, 0, flags).unwrap();
}

fn access(v: &mut Vcpu, gpa: u64, kind: AccessKind, value: u64) -> u64 {
    match v.access(Gva::new(gpa), Access::new(kind, 0, false), 8, value) {
        Ok(AccessResult::Done { value, mmio: false, .. }) => value,
        other => panic!("{kind:?} at gpa {gpa:#x}: {other:?}"),
    }
}

// ---------------------------------------------------------------------
// dirty_log_test
// ---------------------------------------------------------------------

/// Guest RAM of a dirty_log_test VM.
const DL_RAM: u64 = 8 * MB;
/// Iterations (KVM's `-i`).
const DL_ITERATIONS: u64 = 10;
/// Writes the vCPU makes between harvests (KVM waits `-I` ms instead;
/// a count does not depend on the machine's speed).
const DL_WRITES: u64 = 1200;

/// What the main thread and the vCPU thread share (KVM's globals
/// `iteration`, `host_quit`, `vcpu_sync_stop_requested`).
#[derive(Default)]
struct DlShared {
    /// The value the guest writes (KVM's `iteration`).
    iteration: AtomicU64,
    /// Stop requests and the vCPU's acknowledgements, by generation.
    stop_req: AtomicU64,
    stop_ack: AtomicU64,
    resume: AtomicU64,
    quit: AtomicBool,
    /// Writes completed.
    writes: AtomicU64,
    /// The vCPU's ring is full: it waits for the next harvest.
    ring_full: AtomicBool,
    ring_full_exits: AtomicU64,
}

/// The vCPU thread: writes the current iteration to random pages.
fn dl_vcpu(v: Vcpu, s: &DlShared, pages: u64, seed: u64, bugs: &[vmmu::sync::Bug]) -> Result<(), String> {
    vmmu::sync::with_bugs(bugs, || dl_vcpu_loop(v, s, pages, seed))
}

fn dl_vcpu_loop(mut v: Vcpu, s: &DlShared, pages: u64, seed: u64) -> Result<(), String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    loop {
        if s.quit.load(Ordering::Acquire) {
            return Ok(());
        }
        let req = s.stop_req.load(Ordering::Acquire);
        if req != s.stop_ack.load(Ordering::Relaxed) {
            s.stop_ack.store(req, Ordering::Release);
            while s.resume.load(Ordering::Acquire) != req && !s.quit.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            continue;
        }
        if s.ring_full.load(Ordering::Acquire) {
            std::thread::yield_now();
            continue;
        }
        let page = rng.random_range(0..pages);
        let it = s.iteration.load(Ordering::Acquire);
        match v.access(Gva::new(page << 12), Access::new(AccessKind::Write, 0, false), 8, it) {
            Ok(AccessResult::Done { mmio: false, .. }) => {
                s.writes.fetch_add(1, Ordering::Release);
            }
            Ok(AccessResult::DirtyRingFull) => {
                s.ring_full_exits.fetch_add(1, Ordering::Relaxed);
                s.ring_full.store(true, Ordering::Release);
            }
            other => return Err(format!("write of {it} to gfn {page:#x}: {other:?}")),
        }
    }
}

/// What a dirty_log_test run saw.
#[derive(Debug, Default)]
struct DlTally {
    dirty: u64,
    clean: u64,
    tracked: u64,
    ring_full_exits: u64,
}

/// One dirty_log_test run on `mmu` in `config`. Errors name the page, the
/// iteration and the rule.
/// `bugs` are injected into the vCPU thread (test-only).
fn dirty_log_test(mmu: MmuKind, config: VmConfig, seed: u64, bugs: &[vmmu::sync::Bug]) -> Result<DlTally, String> {
    let m = Machine::with_config(mmu, DL_RAM, config).map_err(|e| e.to_string())?;
    let v = m.vcpu(1, ControlRegs::default(), 0).map_err(|e| e.to_string())?;
    let pages = DL_RAM >> 12;
    set_logging(&m.slots, true);
    let s = DlShared {
        iteration: AtomicU64::new(1),
        ..DlShared::default()
    };
    let mut tally = DlTally::default();
    std::thread::scope(|sc| {
        let h = sc.spawn(|| dl_vcpu(v, &s, pages, seed, bugs));
        let vcpu_failed = |h: &std::thread::ScopedJoinHandle<'_, Result<(), String>>| h.is_finished();
        let result = (|| {
            // KVM's host_bmap_track: pages written with the current
            // iteration after its harvest, which the next one must report.
            let mut track = vec![false; pages as usize];
            let mut generation = 0u64;
            for iteration in 1..=DL_ITERATIONS {
                // Give the vCPU some pages to dirty.
                let from = s.writes.load(Ordering::Acquire);
                let deadline = Instant::now() + Duration::from_secs(120);
                while s.writes.load(Ordering::Acquire) < from + DL_WRITES && !s.ring_full.load(Ordering::Acquire) {
                    if vcpu_failed(&h) || Instant::now() > deadline {
                        return Err(format!("iteration {iteration}: the vCPU stopped writing"));
                    }
                    std::thread::yield_now();
                }
                let harvested = m.harvest_dirty().map_err(|e| e.to_string())?;
                s.ring_full.store(false, Ordering::Release);
                // Stop the vCPU to check memory against the bitmap.
                generation += 1;
                s.stop_req.store(generation, Ordering::Release);
                while s.stop_ack.load(Ordering::Acquire) != generation {
                    if vcpu_failed(&h) {
                        return Err(format!("iteration {iteration}: the vCPU failed"));
                    }
                    std::thread::yield_now();
                }
                dl_verify(&m, &harvested, iteration, &mut track, &mut tally)?;
                s.iteration.store(iteration + 1, Ordering::Release);
                s.resume.store(generation, Ordering::Release);
            }
            s.quit.store(true, Ordering::Release);
            // The pages written after the last harvest: one more.
            let last = m.harvest_dirty().map_err(|e| e.to_string())?;
            let last: BTreeSet<u64> = last.into_iter().collect();
            for (page, _) in track.iter().enumerate().filter(|(_, t)| **t) {
                if !last.contains(&(page as u64)) {
                    return Err(format!(
                        "gfn {page:#x}, written in the last iteration after its harvest, is missing from the final one"
                    ));
                }
            }
            Ok(())
        })();
        s.quit.store(true, Ordering::Release);
        let vcpu = h.join().expect("the vCPU thread panicked");
        result.and(vcpu)
    })?;
    tally.ring_full_exits = s.ring_full_exits.load(Ordering::Relaxed);
    let audit = m.audit();
    if !audit.is_empty() {
        return Err(format!("audit: {audit:?}"));
    }
    Ok(tally)
}

/// KVM's `vm_dirty_log_verify`, with the vCPU stopped after the harvest of
/// `iteration`:
/// - a page the previous iteration tracked must be in this bitmap;
/// - a page in the bitmap holds this iteration's value or the previous
///   one's (written after the previous harvest);
/// - a page not in the bitmap holds no later value than this iteration's,
///   and if it holds this one's (written after the harvest), the next
///   bitmap must report it.
fn dl_verify(
    m: &Machine,
    harvested: &[u64],
    iteration: u64,
    track: &mut [bool],
    tally: &mut DlTally,
) -> Result<(), String> {
    let mut bitmap = vec![false; track.len()];
    for &p in harvested {
        bitmap[p as usize] = true;
    }
    let mut mem = vec![0u8; DL_RAM as usize];
    m.memory().read(Gpa::new(0), &mut mem).map_err(|e| e.to_string())?;
    let mut dirty_now = 0;
    for page in 0..track.len() {
        let at = page * 4096;
        let val = u64::from_le_bytes(mem[at..at + 8].try_into().unwrap());
        if std::mem::take(&mut track[page]) {
            tally.tracked += 1;
            if !bitmap[page] {
                return Err(format!(
                    "iteration {iteration}: gfn {page:#x} should have its dirty bit set in this iteration but it is \
                     missing (it was written with {} after the last harvest; it holds {val}): {}",
                    iteration - 1,
                    m.describe_gfn(vmmu::addr::Gfn::new(page as u64))
                ));
            }
        }
        if bitmap[page] {
            dirty_now += 1;
            if val != iteration && val + 1 != iteration {
                return Err(format!(
                    "iteration {iteration}: gfn {page:#x} is dirty but holds {val}, neither this iteration's value nor the last"
                ));
            }
        } else {
            tally.clean += 1;
            if val > iteration {
                return Err(format!(
                    "iteration {iteration}: gfn {page:#x} holds {val}, a value from the future"
                ));
            }
            if val == iteration {
                // Written after the harvest: the next one reports it.
                track[page] = true;
            }
        }
    }
    if dirty_now == 0 {
        return Err(format!("iteration {iteration}: no page is dirty after the vCPU wrote"));
    }
    tally.dirty += dirty_now;
    Ok(())
}

/// `dirty_log_test` in each mode (the bitmap, the bitmap with manual
/// protect, with manual protect and an initially-set bitmap, the ring) on
/// both MMUs, over every dirty-log configuration and with eager splitting
/// on and off.
#[test]
fn dirty_log_test_every_mode_every_configuration() {
    let mut ring_full = 0;
    for base in [
        VmConfig::default(),
        VmConfig {
            eager_split: false,
            ..VmConfig::default()
        },
    ] {
        for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
            for c in VmConfig::dirty_log_matrix(mmu) {
                let config = VmConfig {
                    eager_split: base.eager_split,
                    ..c
                };
                let name = format!(
                    "{} {}{}",
                    mmu.name(),
                    config.dirty_log_name(mmu),
                    if config.eager_split { "" } else { " no-eager-split" }
                );
                let t = dirty_log_test(mmu, config, 7, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
                eprintln!("{name}: {t:?}");
                assert!(t.dirty > DL_ITERATIONS, "{name}: {t:?}");
                ring_full += t.ring_full_exits;
            }
        }
    }
    assert!(ring_full > 0, "the small ring never filled up: its exit went untested");
}

/// The checks fail when a write goes unlogged: with one page's dirty mark
/// dropped in the vCPU thread (an injected bug), the page stays writable
/// and unreported, and an iteration finds it written but not dirty.
#[cfg(feature = "shuttle")]
#[test]
fn dirty_log_test_catches_a_dropped_dirty_bit() {
    for (mmu, config) in [
        (MmuKind::Tdp, VmConfig::default()),
        (
            MmuKind::Shadow,
            VmConfig {
                manual_protect: true,
                ..VmConfig::default()
            },
        ),
    ] {
        let e = dirty_log_test(mmu, config, 7, &[vmmu::sync::Bug::DropDirtyBit])
            .expect_err("a page's writes went unlogged and the test passed");
        assert!(e.contains("missing"), "{e}");
    }
}

// ---------------------------------------------------------------------
// x86/dirty_log_page_splitting_test
// ---------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PageStats {
    pages_4k: i64,
    pages_2m: i64,
    pages_1g: i64,
}

fn page_stats(s: MmuStatsSnapshot) -> PageStats {
    PageStats {
        pages_4k: s.pages_4k,
        pages_2m: s.pages_2m,
        pages_1g: s.pages_1g,
    }
}

fn tdp_vcpu(vm: &Vm) -> Vcpu {
    vm.vcpu(CpuFeatures::default(), 1, ControlRegs::default(), 0).unwrap()
}

/// The test's body: populate, enable logging, three dirtying passes (each
/// harvested, and cleared with manual protect), disable logging,
/// repopulate; the counters at each step.
fn page_splitting(ram: u64, flags: VmaFlags, manual: bool, eager_split: bool) {
    let slots = MemslotConfig {
        manual_dirty_log_protect: manual,
        dirty_log_initially_set: manual,
        ..MemslotConfig::default()
    };
    let config = TdpConfig {
        eager_page_split: eager_split,
        max_level: 3,
        ..TdpConfig::default()
    };
    let vm = Vm::with_memslots(ram, Hva::new(RAM_HVA), flags, config, slots).unwrap();
    let mut v = tdp_vcpu(&vm);
    let pages = (ram >> 12) as i64;
    let stats = || page_stats(vm.mmu.stats().snapshot());
    let touch = |v: &mut Vcpu, pass: u64| {
        for p in 0..ram >> 12 {
            access(v, p << 12, AccessKind::Write, pass << 32 | p);
        }
    };
    let what = format!(
        "{} MiB, {}, manual protect {manual}, eager split {eager_split}",
        ram >> 20,
        if flags.contains(VmaFlags::HUGETLB_1G) {
            "1G hugetlb"
        } else {
            "THP"
        }
    );
    touch(&mut v, 0);
    let populated = stats();
    let enabled = {
        set_logging(&vm.slots, true);
        stats()
    };
    let mut dirtied = Vec::new();
    let mut cleared = Vec::new();
    for pass in 1..=3 {
        touch(&mut v, pass);
        dirtied.push(stats());
        let bits = vm.mmu.get_dirty_log(0, 0).unwrap();
        let n: u32 = bits.iter().map(|w| w.count_ones()).sum();
        assert_eq!(i64::from(n), pages, "{what}: pass {pass}: every page written is dirty");
        if manual {
            vm.mmu.clear_dirty_log(0, 0, 0, &bits).unwrap();
            cleared.push(stats());
        }
    }
    set_logging(&vm.slots, false);
    let disabled = stats();
    touch(&mut v, 4);
    let repopulated = stats();
    eprintln!(
        "{what}: populated {populated:?} enabled {enabled:?} dirtied {dirtied:?} cleared {cleared:?} \
         disabled {disabled:?} repopulated {repopulated:?}"
    );
    // All memory is mapped huge at first.
    assert_eq!(
        populated.pages_2m * 512 + populated.pages_1g * 512 * 512,
        pages,
        "{what}"
    );
    assert_eq!(populated.pages_4k, 0, "{what}");
    let all_4k = PageStats {
        pages_4k: pages,
        pages_2m: 0,
        pages_1g: 0,
    };
    if !eager_split {
        // Not KVM's test (it needs eager_page_split): logging maps each
        // page 4K at its first write after its protection instead (at
        // enable; with an initially-set bitmap, at the first CLEAR).
        assert_eq!(enabled, populated, "{what}: enabling logging splits nothing");
        if manual {
            assert_eq!(
                dirtied[0], populated,
                "{what}: nothing is protected before the first CLEAR"
            );
            assert_eq!(cleared[0], populated, "{what}: CLEAR protects, splits nothing");
            assert_eq!(dirtied[1], all_4k, "{what}: the pass after the CLEAR splits by faults");
        } else {
            assert_eq!(dirtied[0], all_4k, "{what}: the first pass splits by faults");
        }
    } else if manual {
        // Initially set: enabling logging splits nothing; the first CLEAR
        // splits what it clears.
        assert_eq!(enabled, populated, "{what}");
        assert_eq!(cleared[0], all_4k, "{what}");
    } else {
        assert_eq!(enabled, all_4k, "{what}");
    }
    for d in &dirtied[1..] {
        assert_eq!(*d, all_4k, "{what}");
    }
    // Logging off and memory touched again: the counts of population.
    assert_eq!(repopulated, populated, "{what}");
    assert!(vm.mmu.audit().is_empty(), "{what}: {:?}", vm.mmu.audit());
}

/// `x86/dirty_log_page_splitting_test` on 2M pages (THP), with and
/// without manual protect (KVM's two runs), and with eager splitting off.
#[test]
fn dirty_log_page_splitting_test_2m() {
    for manual in [false, true] {
        for eager_split in [true, false] {
            page_splitting(8 * MB, VmaFlags::WRITE | VmaFlags::THP, manual, eager_split);
        }
    }
}

/// `x86/dirty_log_page_splitting_test` on a 1G page (hugetlb): the split
/// goes 1G → 2M → 4K, and the recovery brings the 1G leaf back.
#[test]
fn dirty_log_page_splitting_test_1g() {
    for manual in [false, true] {
        page_splitting(1 << 30, VmaFlags::WRITE | VmaFlags::HUGETLB_1G, manual, true);
    }
}

// ---------------------------------------------------------------------
// x86/nx_huge_pages_test
// ---------------------------------------------------------------------

fn check_nx(vm: &Vm, step: &str, pages_2m: i64, splits: i64) {
    let s = vm.mmu.stats().snapshot();
    assert_eq!(
        (s.pages_2m, s.nx_lpage_splits),
        (pages_2m, splits),
        "{step}: (pages_2m, nx_lpage_splits)"
    );
}

/// KVM's test, step by step: three huge pages read and executed; with the
/// mitigation, each fetch splits its page, reads from a split page change
/// nothing, and the recovery worker (ratio 1: every split page each run)
/// zaps the split pages so they fault back huge.
fn nx_huge_pages_test(disable_nx: bool) {
    let config = TdpConfig {
        nx_huge_pages: !disable_nx,
        nx_recovery_ratio: 1,
        nx_recovery_period_ms: 100,
        ..TdpConfig::default()
    };
    let vm = Vm::new(8 * MB, Hva::new(RAM_HVA), VmaFlags::WRITE | VmaFlags::THP, config).unwrap();
    let mut v = tdp_vcpu(&vm);
    let (hpage_1, hpage_2, hpage_3) = (0, 2 * MB, 4 * MB);
    let d = disable_nx;
    check_nx(&vm, "start", 0, 0);
    access(&mut v, hpage_1, AccessKind::Read, 0);
    check_nx(&vm, "read hpage_1", 1, 0);
    access(&mut v, hpage_2, AccessKind::Read, 0);
    check_nx(&vm, "read hpage_2", 2, 0);
    access(&mut v, hpage_1, AccessKind::Fetch, 0);
    check_nx(&vm, "execute hpage_1", if d { 2 } else { 1 }, if d { 0 } else { 1 });
    access(&mut v, hpage_3, AccessKind::Fetch, 0);
    check_nx(&vm, "execute hpage_3", if d { 3 } else { 1 }, if d { 0 } else { 2 });
    // Reading from hpage_1 goes through the split 4K page: no change.
    access(&mut v, hpage_1, AccessKind::Read, 0);
    check_nx(&vm, "read hpage_1 again", if d { 3 } else { 1 }, if d { 0 } else { 2 });
    if !d {
        // Give the recovery worker time to run (KVM sleeps; a count that
        // reaches its value cannot be early).
        let deadline = Instant::now() + Duration::from_secs(60);
        while vm.mmu.stats().snapshot().nx_lpage_splits != 0 {
            assert!(
                Instant::now() < deadline,
                "the recovery worker never reclaimed the split pages"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        check_nx(&vm, "after reclaim", 1, 0);
        assert_eq!(
            vm.mmu.stats().snapshot().pages_4k,
            0,
            "the split pages' 4K leaves are gone"
        );
    }
    // The split pages were reclaimed: a read faults in a new 2M mapping.
    access(&mut v, hpage_3, AccessKind::Read, 0);
    check_nx(&vm, "read hpage_3", if d { 3 } else { 2 }, 0);
    assert!(vm.mmu.audit().is_empty(), "{:?}", vm.mmu.audit());
}

/// `x86/nx_huge_pages_test` with the mitigation (and its recovery worker).
#[test]
fn nx_huge_pages_test_with_the_mitigation() {
    nx_huge_pages_test(false);
}

/// `x86/nx_huge_pages_test` with the mitigation disabled for the VM
/// (`KVM_CAP_VM_DISABLE_NX_HUGE_PAGES`).
#[test]
fn nx_huge_pages_test_without_the_mitigation() {
    nx_huge_pages_test(true);
}

// ---------------------------------------------------------------------
// access_tracking_perf_test (idle page tracking)
// ---------------------------------------------------------------------

/// Marks every page idle (page_idle: `clear_young`, or with `flush` the
/// `clear_flush_young` of page reclaim), checks every page reads idle,
/// then the vCPU accesses every page: each page must be young again,
/// except (without a flush) pages whose translation the vCPU had cached
/// before the aging. Five passes, reads and writes alternating, with EPT
/// A/D on and off, with dirty logging running through them all.
fn access_tracking(ad: bool, flush: bool) {
    let ram = 8 * MB;
    let pages = ram >> 12;
    let config = TdpConfig {
        ad,
        max_level: 1,
        ..TdpConfig::default()
    };
    let vm = Vm::new(ram, Hva::new(RAM_HVA), VmaFlags::WRITE | VmaFlags::THP, config).unwrap();
    let mut v = tdp_vcpu(&vm);
    let what = format!("EPT A/D {ad}, flush {flush}");
    let young = |p: u64| vm.host.test_young(HvaRange::new(Hva::new(RAM_HVA + (p << 12)), 4096));
    let mut expect: Vec<u64> = (0..pages).collect();
    for p in 0..pages {
        access(&mut v, p << 12, AccessKind::Write, p);
    }
    set_logging(&vm.slots, true);
    vm.mmu.get_dirty_log(0, 0).unwrap();
    for pass in 1..=5u64 {
        let all = HvaRange::new(Hva::new(RAM_HVA), ram);
        if flush {
            vm.host.clear_flush_young(all);
        } else {
            vm.host.clear_young(all);
        }
        let idle = (0..pages).filter(|&p| !young(p)).count() as u64;
        assert_eq!(idle, pages, "{what}, pass {pass}: marking idle left young pages");
        let cached: BTreeSet<u64> = v
            .tlb()
            .entries()
            .flat_map(|e| {
                let base = e.gpa_base >> 12;
                base..base + (e.size.bytes() >> 12)
            })
            .collect();
        let write = pass % 2 == 0;
        for p in 0..pages {
            if write {
                expect[p as usize] = pass << 32 | p;
                access(&mut v, p << 12, AccessKind::Write, expect[p as usize]);
            } else {
                assert_eq!(
                    access(&mut v, p << 12, AccessKind::Read, 0),
                    expect[p as usize],
                    "{what}"
                );
            }
        }
        let still_idle: Vec<u64> = (0..pages).filter(|&p| !young(p)).collect();
        if flush {
            assert!(
                still_idle.is_empty(),
                "{what}, pass {pass}: accessed yet idle: {still_idle:?}"
            );
        } else {
            let unexplained: Vec<&u64> = still_idle.iter().filter(|p| !cached.contains(p)).collect();
            assert!(
                unexplained.is_empty(),
                "{what}, pass {pass}: accessed yet idle without a cached translation: {unexplained:?}"
            );
            assert!(
                still_idle.len() < pages as usize / 2,
                "{what}: {} idle",
                still_idle.len()
            );
        }
        // Every page this pass wrote is in the dirty log, whatever aging
        // did to its SPTE in between.
        let bits = vm.mmu.get_dirty_log(0, 0).unwrap();
        let n: u32 = bits.iter().map(|w| w.count_ones()).sum();
        if write {
            assert_eq!(
                u64::from(n),
                pages,
                "{what}, pass {pass}: writes missing from the dirty log"
            );
        }
    }
    let mut mem = vec![0u8; ram as usize];
    vm.memory().read(Gpa::new(0), &mut mem).unwrap();
    for p in 0..pages as usize {
        let val = u64::from_le_bytes(mem[p * 4096..p * 4096 + 8].try_into().unwrap());
        assert_eq!(val, expect[p], "{what}: gfn {p:#x}");
    }
    assert!(vm.mmu.audit().is_empty(), "{what}: {:?}", vm.mmu.audit());
}

/// Idle-page tracking with EPT A/D bits (the aging clears A bits).
#[test]
fn access_tracking_with_ept_ad() {
    access_tracking(true, false);
    access_tracking(true, true);
}

/// Idle-page tracking with EPT A/D off: the aging makes SPTEs
/// access-tracked (no permissions); the next access restores them, and
/// a write restores write access only where logging allows it.
#[test]
fn access_tracking_without_ept_ad() {
    access_tracking(false, false);
    access_tracking(false, true);
}

// ---------------------------------------------------------------------
// Frame exhaustion (fail-nth)
// ---------------------------------------------------------------------

/// Guest RAM of an exhaustion scenario.
const EX_RAM: u64 = 4 * MB;

/// Whether `e` is the host or the MMU running out of memory.
fn out_of_memory(e: &VcpuError) -> bool {
    matches!(
        e,
        VcpuError::Mmu(TdpError::OutOfFrames(_) | TdpError::Host { .. })
            | VcpuError::Shadow(ShadowError::OutOfFrames(_) | ShadowError::Host { .. })
    )
}

/// Guest page tables of a paged scenario: PML4 at gfn 1, PDPT 2, PD 3,
/// page tables 4 and 5 mapping guest-virtual 0..4M to the same
/// guest-physical addresses in 4K pages; a second PML4 at gfn 6 shares the
/// PDPT (another address space for CR3 switches). Data lives from gfn 16.
const EX_PML4: u64 = 0x1000;
const EX_PML4_2: u64 = 0x6000;
const EX_FIRST_DATA: u64 = 16;
const PTE_P: u64 = 1;
const PTE_W: u64 = 2;

fn ex_paging_regs() -> ControlRegs {
    use vmmu::arch::control::{Cr0, Cr4, Efer};
    ControlRegs {
        cr0: Cr0::PE | Cr0::PG | Cr0::WP,
        cr4: Cr4::PAE,
        efer: Efer::LME | Efer::LMA | Efer::NXE,
    }
}

/// Writes the identity-mapping tables (before any fault is injected).
fn ex_build_tables(m: &Machine) {
    let mem = m.memory();
    let w = |gpa: u64, v: u64| mem.write_u64(Gpa::new(gpa), v).unwrap();
    let table = PTE_P | PTE_W;
    w(EX_PML4, 0x2000 | table);
    w(EX_PML4_2, 0x2000 | table);
    w(0x2000, 0x3000 | table);
    w(0x3000, 0x4000 | table);
    w(0x3008, 0x5000 | table);
    for p in 0..EX_RAM >> 12 {
        w(0x4000 + 8 * p, (p << 12) | table);
    }
}

/// A scenario run with one allocation failing: the guest's view of memory
/// and what the failure did.
struct Exhaustion<'a> {
    m: &'a Machine,
    v: Vcpu,
    /// The guest runs with paging (its tables from [`ex_build_tables`]).
    paged: bool,
    /// Guest-virtual pages the guest remapped, to their gfns.
    remapped: BTreeMap<u64, u64>,
    /// What each written gfn holds (at offset 0).
    expect: BTreeMap<u64, u64>,
    /// Operations that failed for want of memory (each then retried).
    errors: u64,
}

impl Exhaustion<'_> {
    /// One vCPU operation; out of memory, it is retried once (the failure
    /// was injected once: memory is back), and must then succeed.
    fn retry<T>(&mut self, what: &str, mut op: impl FnMut(&mut Vcpu) -> Result<T, VcpuError>) -> Result<T, String> {
        match op(&mut self.v) {
            Err(e) if out_of_memory(&e) => {
                self.errors += 1;
                op(&mut self.v).map_err(|e| format!("{what}, after memory returned: {e}"))
            }
            r => r.map_err(|e| format!("{what}: {e}")),
        }
    }

    /// An access to guest page `page` (guest-virtual with paging, which
    /// maps it to itself unless the guest remapped it).
    fn access(&mut self, page: u64, kind: AccessKind, value: u64) -> Result<(), String> {
        let gfn = self.remapped.get(&page).copied().unwrap_or(page);
        for _ in 0..2 {
            let r = self.retry(&format!("{kind:?} at page {page:#x}"), |v| {
                v.access(Gva::new(page << 12), Access::new(kind, 0, false), 8, value)
            });
            match r {
                Ok(AccessResult::Done {
                    mmio: false,
                    value: got,
                    ..
                }) => {
                    match kind {
                        AccessKind::Write => {
                            self.expect.insert(gfn, value);
                        }
                        AccessKind::Read => {
                            let want = self.expect.get(&gfn).copied().unwrap_or(0);
                            if got != want {
                                return Err(format!(
                                    "read of page {page:#x} (gfn {gfn:#x}): {got:#x}, not {want:#x}"
                                ));
                            }
                        }
                        _ => {}
                    }
                    return Ok(());
                }
                Ok(AccessResult::DirtyRingFull) => {
                    if let Some(r) = self.m.dirty_rings() {
                        r.reap();
                    }
                }
                other => {
                    return Err(format!(
                        "{kind:?} at page {page:#x}: {other:?}; the MMU maps gfn {gfn:#x} with {}",
                        self.m.describe_gfn(vmmu::addr::Gfn::new(gfn))
                    ));
                }
            }
        }
        Err(format!("{kind:?} at page {page:#x}: the dirty ring stays full"))
    }

    /// The guest points guest-virtual page `page` at `gfn` (a write to its
    /// own page table, through the identity mapping) and flushes it.
    fn remap(&mut self, page: u64, gfn: u64) -> Result<(), String> {
        let pte = 0x4000 + 8 * page;
        let r = self.retry(&format!("remapping page {page:#x}"), |v| {
            v.access(
                Gva::new(pte),
                Access::new(AccessKind::Write, 0, false),
                8,
                (gfn << 12) | PTE_P | PTE_W,
            )
        })?;
        if !matches!(r, AccessResult::Done { .. }) {
            return Err(format!("remapping page {page:#x}: {r:?}"));
        }
        self.v.invlpg(Gva::new(page << 12));
        self.remapped.insert(page, gfn);
        Ok(())
    }

    fn harvest(&mut self) -> Result<Vec<u64>, String> {
        self.m.harvest_dirty().map_err(|e| format!("harvest: {e}"))
    }

    /// The scenario: faults (huge, 4K, fetches), logging on (eager split),
    /// writes, harvests (CLEAR's eager split), host churn (THP split and
    /// collapse, migration, swap-out and the swap-in of the next touch,
    /// aging), logging off (huge page recovery), zap-all, and accesses
    /// after each; with paging, also writes to the guest's own page tables
    /// (emulated, or unsync and synced at the flush) and CR3 switches.
    fn scenario(&mut self) -> Result<(), String> {
        let pages = EX_RAM >> 12;
        let spread = |k: u64| EX_FIRST_DATA + (k * 37 + 5) % (pages - EX_FIRST_DATA);
        for k in 0..24 {
            self.access(spread(k), AccessKind::Write, 0x100 + k)?;
        }
        for k in 0..4 {
            self.access(spread(k + 100), AccessKind::Fetch, 0)?;
        }
        self.m
            .slots
            .update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES)
            .map_err(|e| format!("logging on: {e}"))?;
        for k in 0..24 {
            self.access(spread(k + 7), AccessKind::Write, 0x200 + k)?;
        }
        self.harvest()?;
        if self.paged {
            // Two pages swap frames; the old address space is left and
            // come back to.
            let (a, b) = (spread(1), spread(2));
            self.remap(a, b)?;
            self.remap(b, a)?;
            self.retry("mov cr3", |v| v.mov_cr3(EX_PML4_2))?;
            self.access(a, AccessKind::Read, 0)?;
            self.retry("mov cr3", |v| v.mov_cr3(EX_PML4))?;
        }
        for k in 0..24 {
            self.access(spread(k + 50), AccessKind::Write, 0x300 + k)?;
            self.access(spread(k), AccessKind::Read, 0)?;
        }
        let host = self.m.host.clone();
        let hva = |gfn: u64| Hva::new(RAM_HVA + (gfn << 12));
        let _ = host.split_thp(hva(0));
        let _ = host.migrate(hva(spread(3)));
        let _ = host.collapse_thp(hva(0));
        let _ = host.swap_out(hva(spread(4)));
        host.clear_young(HvaRange::new(hva(0), EX_RAM));
        for k in 0..24 {
            self.access(spread(k + 9), AccessKind::Write, 0x400 + k)?;
        }
        self.harvest()?;
        self.m
            .slots
            .update_flags(0, 0, MemslotFlags::empty())
            .map_err(|e| format!("logging off: {e}"))?;
        for k in 0..24 {
            self.access(spread(k + 3), AccessKind::Read, 0)?;
            self.access(spread(k + 200), AccessKind::Fetch, 0)?;
        }
        self.m.zap_all();
        for k in 0..24 {
            self.access(spread(k + 11), AccessKind::Write, 0x500 + k)?;
        }
        Ok(())
    }

    /// Memory is back: every page reads what was written, every page can
    /// be written, a logging session reports every write, the audit is
    /// clean.
    fn afterwards(&mut self) -> Result<(), String> {
        let pages = EX_RAM >> 12;
        for p in EX_FIRST_DATA..pages {
            self.access(p, AccessKind::Read, 0)?;
        }
        self.m
            .slots
            .update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES)
            .map_err(|e| format!("logging on: {e}"))?;
        self.harvest()?;
        let written: Vec<u64> = (EX_FIRST_DATA..pages).step_by(3).collect();
        for &p in &written {
            self.access(p, AccessKind::Write, 0x600 + p)?;
        }
        let got: BTreeSet<u64> = self.harvest()?.into_iter().collect();
        for &p in &written {
            let gfn = self.remapped.get(&p).copied().unwrap_or(p);
            if !got.contains(&gfn) {
                return Err(format!("gfn {gfn:#x} written with logging on is not in the harvest"));
            }
        }
        self.m
            .slots
            .update_flags(0, 0, MemslotFlags::empty())
            .map_err(|e| format!("logging off: {e}"))?;
        let audit = self.m.audit();
        if !audit.is_empty() {
            return Err(format!("audit: {audit:?}"));
        }
        Ok(())
    }
}

/// The scenario in `config` (with paging or without) with the `n`-th
/// allocation failing (0: none). Returns the allocations the scenario made
/// and the operations that failed.
fn exhaustion_run(mmu: MmuKind, config: VmConfig, paged: bool, n: u64) -> Result<(u64, u64), String> {
    let m = Machine::with_config(mmu, EX_RAM, config).map_err(|e| e.to_string())?;
    let v = if paged {
        ex_build_tables(&m);
        m.vcpu(1, ex_paging_regs(), EX_PML4)
    } else {
        m.vcpu(1, ControlRegs::default(), 0)
    }
    .map_err(|e| e.to_string())?;
    let arena = m.host.arena().clone();
    let mut x = Exhaustion {
        m: &m,
        v,
        paged,
        remapped: BTreeMap::new(),
        expect: BTreeMap::new(),
        errors: 0,
    };
    let before = arena.allocations();
    arena.fail_nth(n);
    x.scenario()?;
    let made = arena.allocations() - before;
    arena.fail_nth(0);
    x.afterwards()?;
    Ok((made, x.errors))
}

/// Every allocation point of the scenario fails in turn (a fresh VM each
/// time), with paging and without; the VM answers with an error the vCPU
/// retries, or absorbs the failure, and never hangs; once memory is back,
/// everything works.
fn exhaustion(mmu: MmuKind, config: VmConfig) {
    for paged in [false, true] {
        let name = format!(
            "{} {}{}",
            mmu.name(),
            config.flags(),
            if paged { ", paging" } else { "" }
        );
        let (points, errors) =
            exhaustion_run(mmu, config, paged, 0).unwrap_or_else(|e| panic!("{name}, no failure: {e}"));
        assert_eq!(errors, 0, "{name}");
        assert!(points > 4, "{name}: {points} allocations");
        let mut surfaced = 0;
        for n in 1..=points {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(exhaustion_run(mmu, config, paged, n));
            });
            match rx.recv_timeout(Duration::from_secs(300)) {
                Ok(Ok((_, errors))) => surfaced += u64::from(errors > 0),
                Ok(Err(e)) => panic!("{name}, allocation {n} of {points} failing: {e}"),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{name}, allocation {n} of {points} failing: the scenario hangs")
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("{name}, allocation {n} of {points} failing: the scenario panicked (above)")
                }
            }
        }
        eprintln!("{name}: {points} allocation points, {surfaced} surfaced as a vCPU error, the rest absorbed");
        assert!(
            surfaced > 0,
            "{name}: no failure ever reached a vCPU: the injection missed"
        );
    }
}

/// The TDP MMU out of memory at every allocation point, in the
/// configurations that allocate differently: the defaults (eager split at
/// enable), manual protect with an initially-set bitmap (eager split at
/// CLEAR), NX huge pages (fetches split), eager splitting off (faults
/// split), D-bit logging, the dirty ring.
#[test]
fn exhaustion_at_every_allocation_point_tdp() {
    let d = VmConfig::default();
    for config in [
        d,
        VmConfig {
            manual_protect: true,
            initially_set: true,
            ..d
        },
        VmConfig {
            nx_huge_pages: true,
            nx_recovery_ratio: 0,
            ..d
        },
        VmConfig {
            eager_split: false,
            manual_protect: true,
            ..d
        },
        VmConfig { pml: true, ..d },
        VmConfig {
            dirty_ring: 128,
            ept_ad: false,
            ..d
        },
    ] {
        exhaustion(MmuKind::Tdp, config);
    }
}

/// The shadow MMU out of memory at every allocation point, with the
/// default page limit and with a tiny one (reclaim under pressure).
#[test]
fn exhaustion_at_every_allocation_point_shadow() {
    let d = VmConfig::default();
    for config in [
        d,
        VmConfig {
            manual_protect: true,
            initially_set: true,
            mmu_pages: 64,
            ..d
        },
    ] {
        exhaustion(MmuKind::Shadow, config);
    }
}
