//! Shadow MMU benchmarks: `cr3-switch` (a guest switching between address
//! spaces, served by `prev_roots` or by loading roots again) and the cost
//! of an emulated write to a write-protected guest page table.

use super::tdp::{Backing, BenchError, TdpBenchConfig};
use super::{BenchResult, Figure, Phase, Report, best_ns_per_iter};
use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::{CpuFeatures, Cr0, Cr4, Efer};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, PREV_ROOTS, Vcpu};
use vmmu::host::VmaFlags;
use vmmu::mem::GuestMemory;
use vmmu::vm::ShadowVm;
use vmmu::walker::ControlRegs;

const TABLE: u64 = 0x7;
/// Where each address space maps its own page table (its last 4K page).
const PT_VA: u64 = 0x1f_f000;

/// Address space `i` (4-level): its tables at `(1 + 4i)` pages, mapping
/// `pages` data pages from va 0, and its PT at [`PT_VA`] (supervisor RW).
pub(super) fn space(mem: &GuestMemory, i: u64, pages: u64) -> Result<u64, BenchError> {
    let base = (1 + 4 * i) * 0x1000;
    let (pml4, pdpt, pd, pt) = (base, base + 0x1000, base + 0x2000, base + 0x3000);
    let w = |gpa: u64, v: u64| {
        mem.write_u64(Gpa::new(gpa), v)
            .map_err(|e| BenchError::Run(format!("building the guest tables: {e}")))
    };
    w(pml4, pdpt | TABLE)?;
    w(pdpt, pd | TABLE)?;
    w(pd, pt | TABLE)?;
    w(pt + 8 * (PT_VA >> 12), pt | 0x3)?; // the PT itself
    for p in 0..pages {
        w(pt + 8 * p, ((0x400 + 64 * i + p) << 12) | TABLE)?;
    }
    Ok(pml4)
}

/// A 4-level guest kernel's registers (CR0.WP, NX, no SMEP/SMAP).
pub(super) fn regs() -> ControlRegs {
    ControlRegs {
        cr0: Cr0::PE | Cr0::PG | Cr0::WP,
        cr4: Cr4::PAE,
        efer: Efer::LME | Efer::LMA | Efer::NXE,
    }
}

/// A shadow VM with `spaces` address spaces and a vCPU running the first;
/// the iterations (default 200,000, at least 1).
fn setup(bench: &str, iterations: Option<u64>, spaces: u64) -> Result<(u64, ShadowVm, Vec<u64>, Vcpu), BenchError> {
    let iters = iterations.unwrap_or(200_000);
    if iters == 0 {
        return Err(BenchError::Config(format!("{bench}: --iterations must be at least 1")));
    }
    let run = |e: &dyn std::fmt::Display| BenchError::Run(e.to_string());
    let vm = ShadowVm::new(16 << 20, Hva::new(0x4000_0000), VmaFlags::WRITE).map_err(|e| run(&e))?;
    let mem = vm.memory();
    let cr3s: Vec<u64> = (0..spaces).map(|i| space(&mem, i, 4)).collect::<Result<_, _>>()?;
    let mut v = Vcpu::new_shadow(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), 1);
    v.set_state(regs(), cr3s[0], 0).map_err(|e| run(&e))?;
    Ok((iters, vm, cr3s, v))
}

fn read(v: &mut Vcpu, va: u64) -> Result<u64, BenchError> {
    match v.access(Gva::new(va), Access::new(AccessKind::Read, 0, false), 8, 0) {
        Ok(AccessResult::Done { gpa, .. }) => Ok(gpa.raw()),
        other => Err(BenchError::Run(format!("read at {va:#x}: {other:?}"))),
    }
}

/// `cr3-switch`: MOV to CR3 between address spaces (no PCID, so each switch
/// also empties the TLB) followed by one access, in three settings:
/// - `hit`: a cycle of 4 address spaces, each switch served by
///   `prev_roots` (the current roots plus 3 cached);
/// - `miss`: a cycle of 5, so the least recently used is always the one
///   evicted: every switch releases and loads roots (KVM's slow path: the
///   root pages are found in the page hash, not built);
/// - `rebuild`: a cycle of 4 after a zap of everything each time: the
///   roots and the shadow tables below them are built from the guest's.
///
/// The headline is `hit` against `miss` (the reference).
pub fn cr3_switch(iterations: Option<u64>) -> Result<Report, BenchError> {
    let spaces = PREV_ROOTS as u64 + 2;
    let (iters, vm, cr3s, mut v) = setup("cr3-switch", iterations, spaces)?;
    for &cr3 in &cr3s {
        v.mov_cr3(cr3).map_err(|e| BenchError::Run(e.to_string()))?;
        read(&mut v, 0)?;
    }
    let mut failed = None;
    let mut cycle = |v: &mut Vcpu, n: u64, count: u64, zap: bool| -> u64 {
        let mut sink = 0;
        for k in 0..n {
            let i = (k % count) as usize;
            if zap {
                vm.mmu.zap_all();
            }
            if let Err(e) = v.mov_cr3(cr3s[i]) {
                failed.get_or_insert(e.to_string());
            }
            match read(v, 0) {
                Ok(gpa) if gpa == (0x400 + 64 * i as u64) << 12 => sink += gpa,
                other => {
                    failed.get_or_insert(format!("address space {i}: read gave {other:?}"));
                }
            }
        }
        sink
    };
    let stats = |vm: &ShadowVm| vm.mmu.stats().snapshot();
    // Warm the hit phase's cache: its 4 address spaces, in order.
    cycle(&mut v, PREV_ROOTS as u64 + 1, PREV_ROOTS as u64 + 1, false);
    let s0 = stats(&vm);
    let (hit, hit_secs, _) = best_ns_per_iter(3, iters, |n| cycle(&mut v, n, PREV_ROOTS as u64 + 1, false));
    let s1 = stats(&vm);
    let (miss, _, _) = best_ns_per_iter(3, iters, |n| cycle(&mut v, n, PREV_ROOTS as u64 + 2, false));
    let s2 = stats(&vm);
    let rebuild_iters = (iters / 20).max(1);
    let (rebuild, _, _) = best_ns_per_iter(3, rebuild_iters, |n| cycle(&mut v, n, PREV_ROOTS as u64 + 1, true));
    if let Some(e) = failed {
        return Err(BenchError::Run(e));
    }
    // The phases measured what they claim.
    let hits = (s1.prev_roots_hit - s0.prev_roots_hit) as u64;
    let misses = (s2.prev_roots_miss - s1.prev_roots_miss) as u64;
    if hits < 3 * iters - 4 || s1.prev_roots_miss != s0.prev_roots_miss {
        return Err(BenchError::Run(format!(
            "the hit phase missed prev_roots ({hits} hits, {} misses)",
            s1.prev_roots_miss - s0.prev_roots_miss
        )));
    }
    if misses < 3 * iters - 5 || s2.prev_roots_hit - s1.prev_roots_hit > 5 {
        return Err(BenchError::Run(format!(
            "the miss phase hit prev_roots ({misses} misses, {} hits)",
            s2.prev_roots_hit - s1.prev_roots_hit
        )));
    }
    let phase = Phase::new;
    let result = BenchResult {
        bench: "cr3-switch",
        mmu: "shadow",
        vcpus: 1,
        pages: spaces,
        seconds: hit_secs,
        per_op_ns: hit,
        reference_ns: miss,
        ratio: hit / miss,
        reference: "per switch + one access: the same switch when prev_roots misses (roots released and loaded again from the page hash)",
        goal_ratio: None,
        phases: vec![
            phase("hit", hit, miss),
            phase("miss", miss, miss),
            phase("rebuild", rebuild, miss),
        ],
    };
    Ok(Report {
        result,
        backing: Some("anon"),
        figures: vec![
            Figure {
                name: "hit".into(),
                unit: "ns/switch",
                value: hit,
                reference: Some(miss),
                goal: None,
            },
            Figure {
                name: "rebuild after zap-all".into(),
                unit: "ns/switch",
                value: rebuild,
                reference: Some(miss),
                goal: None,
            },
        ],
        notes: vec![
            format!(
                "{iters} switches per round (best of 3), 4-level guest, no PCID: every switch also empties the TLB, so each is followed by a hardware walk of the shadow tables"
            ),
            format!(
                "prev_roots: {} entries; the hit phase cycles through {} address spaces, the miss phase through {}",
                PREV_ROOTS,
                PREV_ROOTS + 1,
                PREV_ROOTS + 2
            ),
            "rebuild: zap_all before each switch, so the access faults in a root and 3 shadow tables (the zap is timed too)"
                .into(),
        ],
    })
}

/// `wp-emulate`: the cost of a write to a write-protected guest page
/// table. A guest stores to an unused entry of its page directory (an
/// upper-level table, never unsync: every store is a #PF exit, a guest
/// walk, an emulated write and a `track_write` that zaps the SPTE it
/// shadows) and then touches the 2 MiB region that entry maps (a shadow
/// fault through the directory, which also clears its write-flooding
/// count, as a guest mapping a new table does). The reference is the same
/// store and load to data pages (TLB hits). A second phase stores to the
/// guest's 4K page table: its shadow page is unsync after the first store,
/// so these are plain stores.
pub fn wp_emulate(iterations: Option<u64>) -> Result<Report, BenchError> {
    let (iters, vm, cr3s, mut v) = setup("wp-emulate", iterations, 1)?;
    let run = |e: &dyn std::fmt::Display| BenchError::Run(e.to_string());
    // The PD mapped at PD_VA; its entry 1 points at a second PT that maps
    // va 2 MiB to a data page.
    const PD_VA: u64 = PT_VA - 0x1000;
    const PT2: u64 = 0xf000;
    let (pd, pt) = (cr3s[0] + 0x2000, cr3s[0] + 0x3000);
    let mem = vm.memory();
    let w = |gpa: u64, val: u64| mem.write_u64(Gpa::new(gpa), val).map_err(|e| run(&e));
    w(pt + 8 * (PD_VA >> 12), pd | 0x3)?;
    w(PT2, (0x500 << 12) | TABLE)?;
    w(pd + 8, PT2 | TABLE)?;
    // Entry 100 of the PT is unused.
    const PTE_VA: u64 = PT_VA + 8 * 100;
    for va in [0, 0x1000, PD_VA, PT_VA, 0x20_0000] {
        read(&mut v, va)?;
    }
    let mut failed = None;
    let mut pairs = |v: &mut Vcpu, store_va: u64, value: u64, load_va: u64, n: u64| -> u64 {
        let mut sink = 0;
        for k in 0..n {
            match v.access(
                Gva::new(store_va),
                Access::new(AccessKind::Write, 0, false),
                8,
                value | (k & 1) << 3,
            ) {
                Ok(AccessResult::Done { mmio: false, .. }) => {}
                other => {
                    failed.get_or_insert(format!("store at {store_va:#x}: {other:?}"));
                }
            }
            match read(v, load_va) {
                Ok(gpa) => sink += gpa,
                Err(e) => {
                    failed.get_or_insert(e.to_string());
                }
            }
        }
        sink
    };
    let before = vm.mmu.stats().snapshot();
    // The PDE's value stays the table (bit 3, PWT, toggles so each store
    // changes it).
    let (emulated, secs, _) = best_ns_per_iter(3, iters, |n| pairs(&mut v, PD_VA + 8, PT2 | TABLE, 0x20_0000, n));
    let after = vm.mmu.stats().snapshot();
    let (unsync, _, _) = best_ns_per_iter(3, iters, |n| pairs(&mut v, PTE_VA, 0, 0x1000, n));
    let end = vm.mmu.stats().snapshot();
    let (plain, _, _) = best_ns_per_iter(3, iters, |n| pairs(&mut v, 0, 0, 0x1000, n));
    if let Some(e) = failed {
        return Err(BenchError::Run(e));
    }
    let emulations = (after.mmu_pte_write - before.mmu_pte_write) as u64;
    if emulations != 3 * iters || after.mmu_flooded != before.mmu_flooded {
        return Err(BenchError::Run(format!(
            "{emulations} emulated page-table writes for {} stores, {} pages flooded",
            3 * iters,
            after.mmu_flooded - before.mmu_flooded
        )));
    }
    if end.mmu_pte_write != after.mmu_pte_write || end.mmu_unsync != after.mmu_unsync + 1 {
        return Err(BenchError::Run(format!(
            "stores to the 4K page table: {} emulated, {} unsync (expected 0 and 1)",
            end.mmu_pte_write - after.mmu_pte_write,
            end.mmu_unsync - after.mmu_unsync
        )));
    }
    let result = BenchResult {
        bench: "wp-emulate",
        mmu: "shadow",
        vcpus: 1,
        pages: 1,
        seconds: secs,
        per_op_ns: emulated,
        reference_ns: plain,
        ratio: emulated / plain,
        reference: "the same 8-byte store and load to data pages (TLB hits)",
        goal_ratio: None,
        phases: vec![
            Phase {
                phase: "pde-store",
                per_op_ns: emulated,
                reference_ns: plain,
                ratio: emulated / plain,
            },
            Phase {
                phase: "pte-store-unsync",
                per_op_ns: unsync,
                reference_ns: plain,
                ratio: unsync / plain,
            },
        ],
    };
    Ok(Report {
        result,
        backing: Some("anon"),
        figures: Vec::new(),
        notes: vec![
            format!(
                "{iters} store+load pairs per round (best of 3); pde-store: every store emulated (verified: mmu_pte_write counted each, none flooded), then a shadow fault through the directory"
            ),
            "pte-store-unsync: the 4K page table went unsync at the first store (verified: mmu_unsync +1, nothing emulated)".into(),
        ],
    })
}

/// `populate --mmu shadow` (KVM's `demand_paging_test` with `ept=0`): the
/// guest's 4-level tables map each vCPU's region (`bytes_per_vcpu`, 4K
/// pages, Accessed clear as in fresh mappings, so nothing is prefetched);
/// each vCPU thread writes 8 bytes to every 4K page of its region once.
/// Every first touch is a shadow page fault: a guest walk (setting A and
/// D), the host page, the write lock, shadow pages found or built down to
/// the leaf. Phases, best of `iterations` rounds (default 3) on a fresh VM,
/// in ns per 4K page per vCPU thread: `vcpu`, and (with one vCPU)
/// `2-vcpus` for the scaling. The reference is the TDP populate's: one
/// walk and atomic store per page in preallocated tables.
pub fn populate(cfg: &TdpBenchConfig, progress: &dyn Fn(&str)) -> Result<Report, BenchError> {
    cfg.validate()?;
    if cfg.backing != Backing::Anon {
        return Err(BenchError::Config(format!(
            "populate --mmu shadow: the shadow MMU maps 4K pages only; -s {} needs the TDP MMU",
            cfg.backing.name()
        )));
    }
    let rounds = cfg.iterations.unwrap_or(3);
    let (vcpus, bytes) = (cfg.vcpus, cfg.bytes_per_vcpu);
    let ppt = bytes / 4096;
    progress(&format!(
        "populate --mmu shadow: {vcpus} vCPU(s) x {} MiB, {rounds} round(s)",
        bytes >> 20
    ));
    let pass = |threads: u32| -> Result<(f64, f64), BenchError> {
        let mut best = f64::INFINITY;
        let mut secs = 0.0;
        for _ in 0..rounds {
            let (vm, cr3) = populate_vm(ppt * u64::from(threads))?;
            let failed = std::sync::Mutex::new(None);
            let d = super::tdp::parallel(threads as usize, |t| {
                let mut v = Vcpu::new_shadow(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), t as u16 + 1);
                v.set_state(regs(), cr3, 0)
                    .map_err(|e| BenchError::Run(e.to_string()))?;
                let base = DATA_VA + t as u64 * ppt * 4096;
                for p in 0..ppt {
                    let va = base + p * 4096;
                    match v.access(Gva::new(va), Access::new(AccessKind::Write, 0, false), 8, va) {
                        Ok(AccessResult::Done { mmio: false, .. }) => {}
                        other => {
                            failed
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .get_or_insert(format!("store at {va:#x}: {other:?}"));
                        }
                    }
                }
                Ok(())
            })?;
            if let Some(e) = failed.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
                return Err(BenchError::Run(e));
            }
            let mapped = vm.mmu.stats().snapshot().pages_4k as u64;
            if mapped < ppt * u64::from(threads) {
                return Err(BenchError::Run(format!(
                    "populate --mmu shadow: {mapped} pages mapped, expected {}",
                    ppt * u64::from(threads)
                )));
            }
            secs += d.as_secs_f64();
            best = best.min(super::tdp::ns(d) / ppt as f64);
        }
        Ok((best, secs))
    };
    let tree = super::tdp::RefTree::new(ppt * u64::from(vcpus.max(2)), 1)?;
    let reference = |threads: u32| tree.populate_ns(threads, ppt, rounds);
    let (vcpu_ns, mut seconds) = pass(vcpus)?;
    let ref_ns = reference(vcpus)?;
    let mut phases = vec![super::tdp::phase("vcpu", vcpu_ns, ref_ns)];
    let mut figures = vec![super::tdp::figure(
        "vcpu",
        "pages/s/thread",
        1e9 / vcpu_ns,
        Some(1e9 / ref_ns),
        None,
    )];
    if vcpus == 1 {
        progress("populate --mmu shadow: the same on 2 threads, for the scaling");
        let (two_ns, secs) = pass(2)?;
        seconds += secs;
        let ref2_ns = reference(2)?;
        phases.push(super::tdp::phase("2-vcpus", two_ns, ref2_ns));
        figures.push(super::tdp::figure(
            "2-thread scaling (aggregate pages/s, 2 threads / 1)",
            "x",
            2.0 * vcpu_ns / two_ns,
            Some(2.0 * ref_ns / ref2_ns),
            None,
        ));
    }
    Ok(Report {
        result: BenchResult {
            bench: "populate",
            mmu: "shadow",
            vcpus,
            pages: ppt * u64::from(vcpus),
            seconds,
            per_op_ns: vcpu_ns,
            reference_ns: ref_ns,
            ratio: vcpu_ns / ref_ns,
            reference: "per 4K page, a walk from the root to its leaf in preallocated tables and one atomic store of the leaf, as many threads",
            goal_ratio: None,
            phases,
        },
        backing: Some("anon"),
        figures,
        notes: vec![
            super::tdp::load_note(),
            super::tdp::prefault_note(),
            "every shadow fault takes mmu_lock for writing (as KVM's shadow MMU): the scaling shows the cost of that design against the TDP MMU's read-locked faults".into(),
            format!("per_op_ns: wall time of the pass / pages per vCPU thread ({ppt}); best of {rounds} round(s), a fresh VM each"),
        ],
    })
}

/// Where the data the populate guest writes starts (after its tables).
const DATA_VA: u64 = 1 << 30;

/// A shadow VM whose 4-level tables map `pages` 4K data pages at
/// [`DATA_VA`] (gpa = va), host memory resident; returns it and the CR3.
fn populate_vm(pages: u64) -> Result<(ShadowVm, u64), BenchError> {
    let run = |e: &dyn std::fmt::Display| BenchError::Run(e.to_string());
    let pts = pages.div_ceil(512);
    let pds = pts.div_ceil(512);
    let vm = ShadowVm::new(DATA_VA + pages * 4096, Hva::new(0x40_0000_0000), VmaFlags::WRITE).map_err(|e| run(&e))?;
    // Room for every page table, and more.
    vm.mmu.set_max_pages(pts + pds + 64);
    let mem = vm.memory();
    let w = |gpa: u64, val: u64| mem.write_u64(Gpa::new(gpa), val).map_err(|e| run(&e));
    // Tables from gpa 0x1000: PML4, PDPT, then the PDs, then the PTs.
    let (pml4, pdpt) = (0x1000u64, 0x2000u64);
    let pd0 = 0x3000u64;
    let pt0 = pd0 + pds * 0x1000;
    if pt0 + pts * 0x1000 > DATA_VA {
        return Err(BenchError::Config(
            "populate --mmu shadow: too many pages for the table area".into(),
        ));
    }
    w(pml4, pdpt | TABLE)?;
    for d in 0..pds {
        // DATA_VA is 1 GiB: PDPT entry 1 onwards.
        w(pdpt + 8 * (1 + d), (pd0 + d * 0x1000) | TABLE)?;
    }
    for t in 0..pts {
        w(pd0 + 8 * t, (pt0 + t * 0x1000) | TABLE)?;
    }
    for p in 0..pages {
        let gpa = DATA_VA + p * 4096;
        w(pt0 + 8 * p, gpa | TABLE)?;
        // Resident on the host: the timed part is the MMU's.
        w(gpa, 0)?;
    }
    Ok((vm, pml4))
}
