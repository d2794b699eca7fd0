//! Model-checked races of the TDP MMU, with shuttle (`vmmu::sync`).
//!
//! Each test runs a small scenario (a VM of 16 pages, 4-entry tables, 3
//! levels) under many thread schedules; the threads switch at the MMU's
//! schedule points (every SPTE access through the walk cursor, root
//! reference counting, the host lookup in `faultin_pfn`) and at `mmu_lock`.
//! After the threads are joined, the end state is checked: SPTEs against
//! the host (`TdpMmu::audit`), `pages_4k` against the leaves present,
//! `mmu_pages` and the frame arena against the tables reachable.
//!
//! Every race has a deliberately broken variant (a test-only injected bug,
//! `vmmu::sync::Bug`) and a test that the same scenario finds it, so none
//! of these tests passes merely because it cannot fail.
//!
//! Rules for scenarios: build everything inside the model run (the
//! `mmu_lock` of a VM built there is a shuttle lock); keep every check that
//! can fail in the main thread after the joins (a failed execution leaks
//! the stacks of the threads still running, and with them any epoch pin);
//! never let a thread fault a host page in (`HostAddressSpace::fault_in`
//! takes the host's mm lock, a `parking_lot` mutex that a host operation
//! holds across the MMU-notifier callbacks, which take `mmu_lock`): pages
//! are faulted in on the host before the threads start.

#[cfg(not(feature = "shuttle"))]
#[test]
#[ignore = "needs vmmu's `shuttle` feature: run `cargo test --workspace` (the root package turns it on) or `cargo test -p vmmu --features shuttle`"]
fn races_need_the_shuttle_feature() {}

#[cfg(feature = "shuttle")]
mod model {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use shuttle::scheduler::{PctScheduler, RandomScheduler};
    use shuttle::thread;
    use vmmu::addr::{Gfn, Gpa, Gva, Hva, Level, Pfn};
    use vmmu::arch::control::CpuFeatures;
    use vmmu::arch::perm::{Access, AccessKind};
    use vmmu::cpu::vcpu::{AccessResult, Vcpu};
    use vmmu::host::{HvaRange, VmaFlags};
    use vmmu::mmu::iter::{Geometry, SpteIter};
    use vmmu::mmu::tdp::{FaultOutcome, RootRef, TdpConfig, TdpFault, TdpMmu};
    use vmmu::sync::model::{Exploration, check_pct, check_random, explore};
    use vmmu::sync::{Bug, sched_point};
    use vmmu::vm::Vm;
    use vmmu::walker::ControlRegs;

    /// Where the guest's memory is mapped in the host.
    const BASE: u64 = 0x4000_0000;
    /// Guest pages (one memslot at gpa 0).
    const PAGES: u64 = 16;
    /// Schedules explored per scenario and scheduler (random, then PCT).
    const ITERATIONS: usize = 10_000;
    /// Schedules a run with an injected bug may take to find it (they take
    /// at most a few hundred: see `schedules_to_find_each_injected_bug`).
    const BUG_LIMIT: usize = 2_000;
    /// 4-entry tables, 3 levels: 64 gfns.
    const TINY: Geometry = Geometry {
        bits_per_level: 2,
        levels: 3,
    };

    fn hva(gfn: u64) -> Hva {
        Hva::new(BASE + (gfn << 12))
    }

    /// A VM on the tiny geometry, 4K leaves only, with the host pages of
    /// `prefault` faulted in (writable).
    fn tiny_vm(ad: bool, prefault: &[u64]) -> Vm {
        let config = TdpConfig {
            geometry: TINY,
            ad,
            max_level: 1,
            ..TdpConfig::default()
        };
        let vm = Vm::new(PAGES << 12, Hva::new(BASE), VmaFlags::WRITE, config).expect("a tiny VM");
        for &gfn in prefault {
            vm.host.fault_in(hva(gfn), true).expect("a host page");
        }
        vm
    }

    fn fault(gfn: u64, write: bool) -> TdpFault {
        TdpFault {
            gpa: Gpa::new(gfn << 12),
            write,
            exec: false,
            // Not known: the fast path is tried (it races with zaps).
            present: true,
        }
    }

    /// A vCPU's fault, retried while the MMU asks for a retry (at most a
    /// few times: each retry means another thread made progress). Returns
    /// the last outcome.
    fn fault_in(mmu: &TdpMmu, root: &RootRef, gfn: u64, write: bool) -> FaultOutcome {
        let mut cache = mmu.vcpu_caches();
        for _ in 0..4 {
            let outcome = mmu
                .page_fault(root, fault(gfn, write), &mut cache, None)
                .expect("a fault");
            if outcome != FaultOutcome::Retry || !root.root().is_valid() {
                return outcome;
            }
        }
        FaultOutcome::Retry
    }

    /// What a tree holds: tables (the root included) and leaves by gfn.
    struct Tree {
        tables: i64,
        leaves: BTreeMap<u64, Pfn>,
    }

    fn walk(mmu: &TdpMmu, root: Pfn) -> Tree {
        let mut tree = Tree {
            tables: 1,
            leaves: BTreeMap::new(),
        };
        let epoch = crossbeam_epoch::pin();
        let mut it = SpteIter::new(&epoch, mmu.arena(), mmu.config().geometry, root, Level::L1, Gfn::new(0));
        while it.valid() {
            let spte = it.old_spte();
            if spte.is_mmu_present() {
                if spte.is_leaf(it.level()) {
                    tree.leaves.insert(it.gfn().raw(), spte.pfn());
                } else {
                    tree.tables += 1;
                }
            }
            it.next();
        }
        tree
    }

    fn host_pfn(vm: &Vm, gfn: u64) -> Pfn {
        vm.host.lookup(hva(gfn)).expect("mapped by the host").pfn
    }

    /// The end-state checks every scenario shares, on the valid root
    /// `root`: the audit is clean (no SPTE maps a stale or freed frame),
    /// every leaf maps the frame the host maps now, and `pages_4k` counts
    /// exactly the leaves present.
    fn check_consistent(vm: &Vm, root: Pfn) -> Tree {
        let audit = vm.mmu.audit();
        assert!(audit.is_empty(), "audit: {audit:?}");
        let tree = walk(&vm.mmu, root);
        for (&gfn, &pfn) in &tree.leaves {
            assert_eq!(pfn, host_pfn(vm, gfn), "the leaf of gfn {gfn} maps the host's frame");
        }
        let stats = vm.mmu.stats().snapshot();
        assert_eq!(
            stats.pages_4k,
            tree.leaves.len() as i64,
            "pages_4k counts the leaves present {:?}",
            tree.leaves.keys()
        );
        tree
    }

    /// Asserts that a run with an injected bug failed, and reports after
    /// how many schedules.
    fn assert_found(name: &str, run: Exploration) {
        let failure = run
            .failure
            .unwrap_or_else(|| panic!("{name}: no schedule of {} found the injected bug", run.executions));
        eprintln!("{name}: found in schedule {}: {failure}", run.executions);
    }

    // ---- 1. Two faults race to link the same missing page tables -------

    /// Two faults on gfns 0 and 1 of an empty tree: both need the same two
    /// tables below the root and race to link them with compare-exchange.
    /// Exactly one table wins at each level, the loser's is freed at once,
    /// and both leaves end up installed.
    fn two_faults_link_the_same_tables() {
        let vm = tiny_vm(true, &[0, 1]);
        let root = Arc::new(vm.mmu.get_root(0).expect("a root"));
        let frames_before = vm.mmu.arena().allocated_frames();
        assert_eq!(vm.mmu.stats().snapshot().mmu_pages, 1, "the root alone");
        let faults: Vec<_> = [0u64, 1]
            .into_iter()
            .map(|gfn| {
                let (mmu, root) = (vm.mmu.clone(), root.clone());
                thread::spawn(move || fault_in(&mmu, &root, gfn, true))
            })
            .collect();
        for f in faults {
            let outcome = f.join().expect("a fault thread");
            assert!(
                matches!(outcome, FaultOutcome::Fixed | FaultOutcome::Spurious),
                "{outcome:?}"
            );
        }
        let tree = check_consistent(&vm, root.root().pfn());
        assert_eq!(tree.leaves.len(), 2, "both faults installed their leaf");
        assert_eq!(tree.tables, 3, "one table won at each level");
        let stats = vm.mmu.stats().snapshot();
        assert_eq!(stats.mmu_pages, tree.tables, "mmu_pages counts the tables linked");
        assert_eq!(
            vm.mmu.arena().allocated_frames() - frames_before,
            (tree.tables - 1) as u64,
            "the losers' tables were freed"
        );
    }

    #[test]
    fn two_faults_linking_the_same_table() {
        check_random(1, ITERATIONS, two_faults_link_the_same_tables);
        check_pct(2, ITERATIONS, 3, two_faults_link_the_same_tables);
    }

    #[test]
    fn a_blind_table_link_is_caught() {
        let run = explore(
            RandomScheduler::new_from_seed(11, BUG_LIMIT),
            &[Bug::BlindSpteSet],
            false,
            two_faults_link_the_same_tables,
        );
        assert_found("blind table link", run);
    }

    // ---- 2. A fault against a zap of the same range ---------------------

    /// gfn 1 is mapped and access-tracked (EPT A/D off, aged), so its
    /// fault takes the lockless fast path (one compare-exchange); gfn 2 is
    /// not mapped, so its fault takes the slow path under the read lock.
    /// A third thread zaps gfns 0..4 under the write lock.
    fn faults_against_a_write_locked_zap() {
        let vm = tiny_vm(false, &[0, 1, 2, 3]);
        let root = Arc::new(vm.mmu.get_root(0).expect("a root"));
        assert_eq!(fault_in(&vm.mmu, &root, 1, false), FaultOutcome::Fixed);
        vm.mmu.age_hva_range(HvaRange::new(hva(1), 0x1000), false);
        let fast = {
            let (mmu, root) = (vm.mmu.clone(), root.clone());
            thread::spawn(move || fault_in(&mmu, &root, 1, false))
        };
        let slow = {
            let (mmu, root) = (vm.mmu.clone(), root.clone());
            thread::spawn(move || fault_in(&mmu, &root, 2, true))
        };
        let zap = {
            let mmu = vm.mmu.clone();
            thread::spawn(move || {
                let guard = mmu.write_lock();
                let flush = mmu.zap_gfn_range(&guard, 0, Gfn::new(0), Gfn::new(4));
                mmu.discharge(flush);
            })
        };
        for t in [fast, slow] {
            t.join().expect("a fault thread");
        }
        zap.join().expect("the zapper");
        check_consistent(&vm, root.root().pfn());
    }

    #[test]
    fn faults_against_a_zap_under_the_write_lock() {
        check_random(3, ITERATIONS, faults_against_a_write_locked_zap);
        check_pct(4, ITERATIONS, 3, faults_against_a_write_locked_zap);
    }

    #[test]
    fn a_fast_path_store_that_resurrects_a_zapped_spte_is_caught() {
        let run = explore(
            RandomScheduler::new_from_seed(13, BUG_LIMIT),
            &[Bug::BlindSpteSet],
            false,
            faults_against_a_write_locked_zap,
        );
        assert_found("blind fast-path store", run);
    }

    /// The zap under the read lock: `zap_all_fast` invalidates the root a
    /// fault holds, and `zap_invalidated_roots` zaps its leaves under the
    /// read lock while the fault may be installing (it must see the root
    /// invalid and retry; the vCPU then reloads its root).
    fn a_fault_against_a_read_locked_zap() {
        let vm = tiny_vm(true, &[0, 1, 2]);
        let root = Arc::new(vm.mmu.get_root(0).expect("a root"));
        assert_eq!(fault_in(&vm.mmu, &root, 0, true), FaultOutcome::Fixed);
        let faulting = {
            let (mmu, root) = (vm.mmu.clone(), root.clone());
            thread::spawn(move || {
                fault_in(&mmu, &root, 1, true);
            })
        };
        let zap = {
            let mmu = vm.mmu.clone();
            thread::spawn(move || {
                mmu.zap_all_fast();
                mmu.zap_invalidated_roots();
            })
        };
        faulting.join().expect("the fault thread");
        zap.join().expect("the zapper");
        assert!(!root.root().is_valid());
        drop(root);
        // Every leaf of the old root was zapped: only the new root counts.
        let new_root = vm.mmu.get_root(0).expect("a new root");
        let tree = check_consistent(&vm, new_root.root().pfn());
        assert!(tree.leaves.is_empty());
    }

    #[test]
    fn a_fault_against_a_zap_under_the_read_lock() {
        check_random(5, ITERATIONS, a_fault_against_a_read_locked_zap);
        check_pct(6, ITERATIONS, 3, a_fault_against_a_read_locked_zap);
    }

    #[test]
    fn an_install_into_an_invalidated_root_is_caught() {
        let run = explore(
            RandomScheduler::new_from_seed(15, BUG_LIMIT),
            &[Bug::InstallIntoInvalidRoot],
            false,
            a_fault_against_a_read_locked_zap,
        );
        assert_found("install into an invalid root", run);
    }

    // ---- 3. A fault against a notifier invalidation ---------------------

    /// The host migrates gfn 1's page while a fault on it is between the
    /// host lookup and the install. After the invalidation ends, no SPTE
    /// may map the old frame (which the host freed).
    fn a_fault_against_a_migration() {
        let vm = tiny_vm(true, &[1]);
        let old = host_pfn(&vm, 1);
        let root = Arc::new(vm.mmu.get_root(0).expect("a root"));
        let faulting = {
            let (mmu, root) = (vm.mmu.clone(), root.clone());
            thread::spawn(move || fault_in(&mmu, &root, 1, true))
        };
        let host = vm.host.clone();
        let migrate = thread::spawn(move || host.migrate(hva(1)).expect("a migration"));
        faulting.join().expect("the fault thread");
        let new = migrate.join().expect("the host thread");
        assert_ne!(old, new);
        assert_eq!(host_pfn(&vm, 1), new);
        let tree = check_consistent(&vm, root.root().pfn());
        assert!(
            tree.leaves.values().all(|&pfn| pfn != old),
            "an SPTE maps the migrated-away frame"
        );
    }

    #[test]
    fn a_fault_against_a_notifier_invalidation() {
        check_random(7, ITERATIONS, a_fault_against_a_migration);
        check_pct(8, ITERATIONS, 3, a_fault_against_a_migration);
    }

    #[test]
    fn a_sequence_sampled_after_the_lookup_is_caught() {
        let run = explore(
            RandomScheduler::new_from_seed(17, BUG_LIMIT),
            &[Bug::SeqSampledAfterLookup],
            false,
            a_fault_against_a_migration,
        );
        assert_found("mmu_invalidate_seq sampled late", run);
    }

    // ---- 4. zap_all_fast against vCPUs taking root references -----------

    /// A vCPU takes root references while the VM zaps everything fast and
    /// another vCPU drops the last reference it held to the old root. Every
    /// reference handed out is to a valid root whose tables are live while
    /// it is held; at the end, the invalidated root has been freed once
    /// (the arena holds exactly the host's frames and the valid root).
    fn root_references_against_zap_all_fast() {
        let vm = tiny_vm(true, &[]);
        let arena = vm.mmu.arena().clone();
        let frames_before = arena.allocated_frames();
        let held = vm.mmu.get_root(0).expect("a root");
        let taker = {
            let (mmu, arena) = (vm.mmu.clone(), arena.clone());
            thread::spawn(move || {
                let mut violations = Vec::new();
                for _ in 0..2 {
                    let r = mmu.get_root(0).expect("a root");
                    let pfn = r.root().pfn();
                    if !r.root().is_valid() || arena.is_freed(pfn) {
                        violations.push(format!("got a reference to an invalid root at {pfn:?}"));
                        // Do not drop it: that would free its tree a
                        // second time, in whatever thread collects next.
                        std::mem::forget(r);
                        continue;
                    }
                    sched_point();
                    if arena.is_freed(pfn) {
                        violations.push(format!("the root at {pfn:?} was freed while referenced"));
                    }
                }
                violations
            })
        };
        let dropper = thread::spawn(move || drop(held));
        let zap = {
            let mmu = vm.mmu.clone();
            thread::spawn(move || {
                mmu.zap_all_fast();
                mmu.zap_invalidated_roots();
            })
        };
        let violations = taker.join().expect("the vCPU thread");
        dropper.join().expect("the dropping thread");
        zap.join().expect("the zapper");
        assert!(violations.is_empty(), "{violations:?}");
        let current = vm.mmu.get_root(0).expect("the valid root");
        assert!(current.root().is_valid());
        // Invalidated roots are freed after an epoch grace period.
        let mut waited = 0;
        while arena.allocated_frames() != frames_before + 1 && waited < 100_000 {
            crossbeam_epoch::pin().flush();
            std::thread::yield_now();
            waited += 1;
        }
        assert_eq!(
            arena.allocated_frames(),
            frames_before + 1,
            "every invalidated root freed, exactly once (only the valid root is left)"
        );
    }

    #[test]
    fn zap_all_fast_against_root_references() {
        check_random(9, ITERATIONS, root_references_against_zap_all_fast);
        check_pct(10, ITERATIONS, 3, root_references_against_zap_all_fast);
    }

    #[test]
    fn an_unchecked_root_reference_is_caught() {
        let run = explore(
            PctScheduler::new_from_seed(19, 3, BUG_LIMIT),
            &[Bug::UncheckedRootRef],
            false,
            root_references_against_zap_all_fast,
        );
        assert_found("unchecked root reference", run);
    }

    // ---- 5. A vCPU session against a migration -----------------------------

    /// A vCPU writes a page three times in one guest-mode session (no exit
    /// between TLB hits) while the host migrates the page. The migration's
    /// MMU-notifier flush must wait for the session's next access, which
    /// must drop the old translation: no write may reach the old frame (the
    /// host freed it), and the last write must be in memory.
    fn a_session_against_a_migration() {
        let vm = Vm::new(PAGES << 12, Hva::new(BASE), VmaFlags::WRITE, TdpConfig::default()).expect("a VM");
        vm.host.fault_in(hva(1), true).expect("a host page");
        let mut v = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), 1).expect("a vCPU");
        v.set_state(ControlRegs::default(), 0, 0).expect("paging off");
        let vcpu = thread::spawn(move || {
            let mut session = v.session();
            for n in 1..=3u64 {
                let r = session.access(Gva::new(1 << 12), Access::new(AccessKind::Write, 0, false), 8, n);
                assert!(matches!(r, Ok(AccessResult::Done { mmio: false, .. })), "{r:?}");
                sched_point();
            }
            drop(session);
            v.stats()
        });
        let host = vm.host.clone();
        let migrate = thread::spawn(move || host.migrate(hva(1)).expect("a migration"));
        let stats = vcpu.join().expect("the vCPU thread");
        migrate.join().expect("the host thread");
        assert_eq!(stats.freed_frame_accesses, 0, "a write reached the migrated-away frame");
        assert_eq!(
            vm.memory().read_u64(Gpa::new(1 << 12)).expect("guest memory"),
            3,
            "the last write is in memory"
        );
    }

    #[test]
    fn a_guest_mode_session_against_a_migration() {
        check_random(11, ITERATIONS / 10, a_session_against_a_migration);
        check_pct(12, ITERATIONS / 10, 3, a_session_against_a_migration);
    }

    #[test]
    fn a_session_acknowledging_a_flush_without_flushing_is_caught() {
        let run = explore(
            PctScheduler::new_from_seed(21, 3, BUG_LIMIT),
            &[Bug::AckWithoutFlush],
            false,
            a_session_against_a_migration,
        );
        assert_found("acknowledge without flush", run);
    }

    // ---- 7. L1 writes a table the nested MMU starts to shadow ----------------

    /// An L1 vCPU (TDP MMU, AMD) writes an unused entry of its NPT12 root
    /// table (gfn 8, the first table the nested MMU tracks), which its TDP
    /// MMU maps writable, while an L2 vCPU's first access makes the nested
    /// MMU shadow that table (and the three below it). Whatever the order, a gfn the nested MMU tracks is never left
    /// writable in the TDP MMU (else L1 writes its table unseen and NPT02
    /// goes stale), and L2 reads what NPT12 maps.
    fn l1_writes_a_table_the_nested_mmu_starts_to_shadow() {
        l1_writes_a_table_while_it_is_shadowed(true);
    }

    /// The same with the table not mapped for L1 yet: L1's write is a TDP
    /// fault racing with the tracking.
    fn l1_faults_on_a_table_the_nested_mmu_starts_to_shadow() {
        l1_writes_a_table_while_it_is_shadowed(false);
    }

    fn l1_writes_a_table_while_it_is_shadowed(premapped: bool) {
        let (vm, mut l1) = npt12_vm(&[(12, 0x1234)]);
        if premapped {
            // L1 maps its table page writable before the race.
            let w = l1.access(Gva::new((8 << 12) + 16), Access::new(AccessKind::Write, 0, false), 8, 0);
            assert!(matches!(w, Ok(AccessResult::Done { .. })), "{w:?}");
        }
        let mut l2 = l2_on_npt12(&vm);
        let l1_thread = thread::spawn(move || {
            for n in 0..2u64 {
                let w = l1.access(Gva::new((8 << 12) + 24), Access::new(AccessKind::Write, 0, false), 8, n);
                assert!(matches!(w, Ok(AccessResult::Done { mmio: false, .. })), "{w:?}");
            }
        });
        let l2_thread = thread::spawn(move || l2.access(Gva::new(0), Access::new(AccessKind::Read, 0, false), 8, 0));
        l1_thread.join().expect("the L1 thread");
        let read = l2_thread.join().expect("the L2 thread");
        assert!(matches!(read, Ok(AccessResult::Done { value: 0x1234, .. })), "{read:?}");
        let tracker = vm.mmu.write_tracker().expect("the nested MMU tracks");
        for gfn in 8..=11u64 {
            let g = vmmu::addr::Gfn::new(gfn);
            assert!(tracker.is_tracked(g, g.add(1)), "gfn {gfn} is shadowed");
            for (_, _, spte) in vm.mmu.leaves_of(0, g) {
                assert!(
                    !spte.is_mmu_present() || !spte.is_writable(vm.mmu.format()),
                    "gfn {gfn}, tracked by the nested MMU, is writable in the TDP MMU: {spte:?}"
                );
            }
        }
    }

    #[test]
    fn l1_writing_a_table_the_nested_mmu_starts_to_shadow() {
        check_random(13, ITERATIONS / 10, l1_writes_a_table_the_nested_mmu_starts_to_shadow);
        check_pct(
            14,
            ITERATIONS / 10,
            3,
            l1_writes_a_table_the_nested_mmu_starts_to_shadow,
        );
        check_random(
            15,
            ITERATIONS / 10,
            l1_faults_on_a_table_the_nested_mmu_starts_to_shadow,
        );
        check_pct(
            16,
            ITERATIONS / 10,
            3,
            l1_faults_on_a_table_the_nested_mmu_starts_to_shadow,
        );
    }

    #[test]
    fn counting_after_protecting_is_caught() {
        let run = explore(
            PctScheduler::new_from_seed(25, 3, BUG_LIMIT),
            &[Bug::CountAfterProtect],
            false,
            l1_faults_on_a_table_the_nested_mmu_starts_to_shadow,
        );
        assert_found("count after protect", run);
    }

    #[test]
    fn protecting_before_tracking_is_caught() {
        let run = explore(
            PctScheduler::new_from_seed(23, 3, BUG_LIMIT),
            &[Bug::ProtectBeforeTrack],
            false,
            l1_writes_a_table_the_nested_mmu_starts_to_shadow,
        );
        assert_found("protect before track", run);
    }

    /// An AMD VM (4K TDP leaves) whose L1 keeps NPT12 at gfns 8 (PML4) ..
    /// 11 (PT), L2's page 0 mapped to L1's gfn 12, and `data` (gfn,
    /// value) written; with L1's vCPU, paging off. The gfns used are
    /// resident in the host.
    fn npt12_vm(data: &[(u64, u64)]) -> (Vm, Vcpu) {
        let config = TdpConfig {
            vendor: vmmu::arch::control::Vendor::Amd,
            max_level: 1,
            ..TdpConfig::default()
        };
        let vm = Vm::new(PAGES << 12, Hva::new(BASE), VmaFlags::WRITE, config).expect("a VM");
        for gfn in (8..=11).chain(data.iter().map(|&(g, _)| g)) {
            vm.host.fault_in(hva(gfn), true).expect("a host page");
        }
        let mem = vm.memory();
        for (table, next) in [(8u64, 9u64), (9, 10), (10, 11), (11, 12)] {
            mem.write_value(Gpa::new(table << 12), 8, (next << 12) | 0x7)
                .expect("NPT12");
        }
        for &(gfn, v) in data {
            mem.write_value(Gpa::new(gfn << 12), 8, v).expect("L2's data");
        }
        let mut l1 = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), 1).expect("L1");
        l1.set_state(ControlRegs::default(), 0, 0).expect("paging off");
        (vm, l1)
    }

    /// An L2 vCPU (paging off) on the nested MMU of `vm`, under its NPT12.
    fn l2_on_npt12(vm: &Vm) -> Vcpu {
        let npt = vmmu::cpu::vcpu::L1Npt {
            ncr3: 8 << 12,
            levels: 4,
            nxe: true,
        };
        let nested = vm.nested_mmu().expect("a nested MMU");
        let mut l2 = Vcpu::new_nested(nested, vm.slots.clone(), CpuFeatures::default(), 2, npt);
        l2.set_state(ControlRegs::default(), 0, 0).expect("paging off");
        l2
    }

    // ---- 8. L1 writes a leaf table that is unsync while L2 syncs it -------

    /// An L1 vCPU (TDP MMU, AMD) stores twice into its NPT12 leaf table
    /// (gfn 11, shadowed by a 4K page only: the first store makes the page
    /// unsync and maps the gfn writable for L1), remapping L2's page 1 to
    /// gfn 13, then 14; an L2 vCPU meanwhile makes a flushing VMRUN (a
    /// sync) and reads page 1. Whatever the order: a tracked gfn is
    /// writable in the TDP MMU only while the nested MMU allows it (a sync
    /// takes the permission back before it reads the table), and after
    /// both, one more flushing VMRUN makes L2 read what L1 stored last.
    fn l1_writes_an_unsync_table_while_l2_syncs() {
        let (vm, mut l1) = npt12_vm(&[(12, 0x1234), (13, 0x5678), (14, 0x9abc)]);
        // L2's page 1 is L1's gfn 13.
        vm.memory()
            .write_value(Gpa::new((11 << 12) + 8), 8, (13 << 12) | 0x7)
            .expect("NPT12");
        let mut l2 = l2_on_npt12(&vm);
        let read =
            |l2: &mut Vcpu, page: u64| l2.access(Gva::new(page << 12), Access::new(AccessKind::Read, 0, false), 8, 0);
        // L2 has run: NPT12's tables are shadowed.
        assert!(matches!(read(&mut l2, 1), Ok(AccessResult::Done { value: 0x5678, .. })));
        let l1_thread = thread::spawn(move || {
            for gfn in [14u64, 13, 14] {
                let w = l1.access(
                    Gva::new((11 << 12) + 8),
                    Access::new(AccessKind::Write, 0, false),
                    8,
                    (gfn << 12) | 0x7,
                );
                assert!(matches!(w, Ok(AccessResult::Done { mmio: false, .. })), "{w:?}");
            }
        });
        let l2_thread = thread::spawn(move || {
            l2.l1_invalidate(vmmu::cpu::vcpu::L1Invalidation::TlbControlFlush);
            let r = read(&mut l2, 1);
            assert!(
                matches!(
                    r,
                    Ok(AccessResult::Done {
                        value: 0x5678 | 0x9abc,
                        ..
                    })
                ),
                "{r:?}"
            );
            l2
        });
        l1_thread.join().expect("the L1 thread");
        let mut l2 = l2_thread.join().expect("the L2 thread");
        let tracker = vm.mmu.write_tracker().expect("the nested MMU tracks");
        for gfn in 8..=11u64 {
            let g = vmmu::addr::Gfn::new(gfn);
            for (_, _, spte) in vm.mmu.leaves_of(0, g) {
                assert!(
                    !spte.is_mmu_present() || !spte.is_writable(vm.mmu.format()) || tracker.write_allowed(g),
                    "gfn {gfn} is writable in the TDP MMU without the nested MMU's leave: {spte:?}"
                );
            }
        }
        l2.l1_invalidate(vmmu::cpu::vcpu::L1Invalidation::TlbControlFlush);
        let r = read(&mut l2, 1);
        assert!(
            matches!(r, Ok(AccessResult::Done { value: 0x9abc, .. })),
            "after L1's last store and a flushing VMRUN, L2 reads {r:?}"
        );
    }

    #[test]
    fn l1_writing_an_unsync_table_while_l2_syncs() {
        check_random(17, ITERATIONS / 10, l1_writes_an_unsync_table_while_l2_syncs);
        check_pct(18, ITERATIONS / 10, 3, l1_writes_an_unsync_table_while_l2_syncs);
    }

    #[test]
    fn a_sync_leaving_l1_writing_is_caught() {
        let run = explore(
            PctScheduler::new_from_seed(27, 3, BUG_LIMIT),
            &[Bug::SyncLeavesWritableElsewhere],
            false,
            l1_writes_an_unsync_table_while_l2_syncs,
        );
        assert_found("sync leaves writable elsewhere", run);
    }

    // ---- How fast each injected bug is found ------------------------------

    /// For every injected bug and both schedulers: over 40 seeds, how many
    /// schedules it takes to find the bug (at most [`BUG_LIMIT`] per seed).
    /// Fails if a seed never finds it; prints a table with `--nocapture`.
    #[test]
    fn schedules_to_find_each_injected_bug() {
        type Scenario = fn();
        let cases: [(&str, Bug, Scenario, usize); 5] = [
            (
                "1 blind table link",
                Bug::BlindSpteSet,
                two_faults_link_the_same_tables,
                2,
            ),
            (
                "2 blind fast-path store",
                Bug::BlindSpteSet,
                faults_against_a_write_locked_zap,
                3,
            ),
            (
                "2 install into invalid root",
                Bug::InstallIntoInvalidRoot,
                a_fault_against_a_read_locked_zap,
                3,
            ),
            (
                "3 seq sampled late",
                Bug::SeqSampledAfterLookup,
                a_fault_against_a_migration,
                2,
            ),
            (
                "4 unchecked root ref",
                Bug::UncheckedRootRef,
                root_references_against_zap_all_fast,
                3,
            ),
        ];
        const SEEDS: u64 = 40;
        let mut never = Vec::new();
        for (name, bug, scenario, depth) in cases {
            for pct in [false, true] {
                let mut found: Vec<usize> = (0..SEEDS)
                    .filter_map(|seed| {
                        let run = if pct {
                            explore(
                                PctScheduler::new_from_seed(seed, depth, BUG_LIMIT),
                                &[bug],
                                false,
                                scenario,
                            )
                        } else {
                            explore(RandomScheduler::new_from_seed(seed, BUG_LIMIT), &[bug], false, scenario)
                        };
                        run.failure.map(|_| run.executions)
                    })
                    .collect();
                found.sort_unstable();
                let scheduler = if pct {
                    format!("pct(depth {depth})")
                } else {
                    "random".to_string()
                };
                if found.len() < SEEDS as usize {
                    never.push(format!("{name} / {scheduler}"));
                }
                let mean = found.iter().sum::<usize>() as f64 / found.len().max(1) as f64;
                println!(
                    "{name:30} {scheduler:14} found by {:2}/{SEEDS} seeds; schedules: min {} median {} mean {mean:.1} max {}",
                    found.len(),
                    found.first().copied().unwrap_or(0),
                    found.get(found.len() / 2).copied().unwrap_or(0),
                    found.last().copied().unwrap_or(0),
                );
            }
        }
        assert!(never.is_empty(), "some seed never found the bug: {never:?}");
    }
}
