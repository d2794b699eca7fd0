//! The fuzz targets of `fuzz/` (cargo fuzz, nightly) as seeded random
//! drivers that run in `cargo test` on stable, plus a replay of the
//! committed corpora (`fuzz/corpus/<target>/`).
//!
//! - `walk`: random bytes through `arbitrary::Unstructured` into a
//!   `WalkInput`, checked by `vmmu_fuzz::walk::walk_one` (the walker
//!   against the SDM reference walker);
//! - `conform_case`, `workload`, `trace`: the corpus files mutated at random
//!   (bit flips, byte changes, insertions of format tokens, deletions,
//!   duplications, splices), through the parser entry points.
//!
//! - `vm`: random bytes into a `VmProgram` (guest and host/VMM operations
//!   on either MMU), run by `vmmu_fuzz::vm::run` with its checker on.
//!
//! Also: the reference walker itself against every single-access
//! conformance case, and negative controls showing that the walk
//! comparison, and the whole-VM checker, do catch a difference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arbitrary::{Arbitrary, Unstructured};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vmmu_fuzz::parse;
use vmmu_fuzz::reference::{self, Deviation, RefAccess, RefCpu, RefKind, RefOutcome};
use vmmu_fuzz::vm::{self, VmProgram, VmSummary};
use vmmu_fuzz::walk::{Scenario, WalkInput, WalkSummary, check_scenario, walk_one};
use vmmu_sim::conform::case::{Case, CaseMode};

/// Iterations of each random driver (the walk driver runs `WALK_ITERS`).
const PARSE_ITERS: usize = 10_000;
const WALK_ITERS: usize = 50_000;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every file of `fuzz/corpus/<target>/`, sorted by name.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = repo().join("fuzz/corpus").join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a directory entry").path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: an empty corpus", dir.display());
    files
}

/// Tokens of the three text formats, for insertions.
const TOKENS: &[&str] = &[
    "\n",
    "\r\n",
    " ",
    "\"",
    "'",
    "=",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "#",
    "0x",
    "0",
    "-1",
    "1e309",
    "nan",
    "inf",
    "18446744073709551615",
    "9223372036854775808",
    "true",
    "null",
    "\"\"\"",
    "\\u00e9",
    "é",
    "\u{1f600}",
    "\0",
    "--- ops",
    "# vmmu trace v1\n",
    "[workload]\n",
    "[mix]\n",
    "v0 ",
    "host ",
    "vmm ",
    "touch ",
    "zap-all ",
    "\"steps\": [",
    "\"op\": \"access\"",
    "\"mode\": \"pae\"",
    "\"maxphyaddr\": 99",
    "\"cpl\": 9",
    "\"memory\": [{\"pa\": \"0x7\", \"value\": \"0x100000000\"}]",
];

/// One random mutation of `data` (which may come from `others` too).
fn mutate(rng: &mut SmallRng, data: &mut Vec<u8>, others: &[(PathBuf, Vec<u8>)]) {
    let len = data.len();
    let at = if len == 0 { 0 } else { rng.random_range(0..len) };
    match rng.random_range(0..8) {
        0 if len > 0 => data[at] ^= 1 << rng.random_range(0..8),
        1 if len > 0 => data[at] = rng.random(),
        2 | 3 => {
            let token = TOKENS[rng.random_range(0..TOKENS.len())].as_bytes();
            data.splice(at..at, token.iter().copied());
        }
        4 if len > 0 => {
            let end = (at + rng.random_range(1..=16)).min(len);
            data.drain(at..end);
        }
        5 if len > 0 => {
            let end = (at + rng.random_range(1..=64)).min(len);
            let chunk = data[at..end].to_vec();
            let to = rng.random_range(0..=len);
            data.splice(to..to, chunk);
        }
        6 => {
            let (_, other) = &others[rng.random_range(0..others.len())];
            if !other.is_empty() {
                let from = rng.random_range(0..other.len());
                let end = (from + rng.random_range(1..=256)).min(other.len());
                let cut = rng.random_range(at..=len);
                data.splice(at..cut, other[from..end].iter().copied());
            }
        }
        _ => data.truncate(at),
    }
}

/// Feeds `iters` random mutants of the corpus of `target` to `run`;
/// returns how many were accepted.
fn mutants(target: &str, seed: u64, iters: usize, run: impl Fn(&[u8]) -> bool) -> usize {
    let seeds = corpus(target);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut accepted = 0;
    let start = Instant::now();
    for _ in 0..iters {
        let mut data = seeds[rng.random_range(0..seeds.len())].1.clone();
        for _ in 0..rng.random_range(1..=4) {
            mutate(&mut rng, &mut data, &seeds);
        }
        accepted += run(&data) as usize;
    }
    eprintln!(
        "{target}: {iters} mutants ({accepted} accepted) in {:.2?}",
        start.elapsed()
    );
    accepted
}

// ---- the walker -----------------------------------------------------------

#[test]
fn walk_random_inputs_agree_with_the_reference() {
    let mut rng = SmallRng::seed_from_u64(0x5d4_0001);
    let mut histogram: BTreeMap<WalkSummary, usize> = BTreeMap::new();
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    for _ in 0..WALK_ITERS {
        let len = rng.random_range(16..buf.len());
        rng.fill(&mut buf[..len]);
        let mut u = Unstructured::new(&buf[..len]);
        let Ok(input) = WalkInput::arbitrary(&mut u) else {
            continue;
        };
        *histogram.entry(walk_one(&input)).or_default() += 1;
    }
    eprintln!("walk: {WALK_ITERS} inputs in {:.2?}", start.elapsed());
    for (summary, n) in &histogram {
        eprintln!("  {n:6} {summary:?}");
    }
    // The generator must reach every kind of outcome: translations by a
    // leaf at every level each mode allows, and faults of every kind.
    let translated = |mode: &'static str, level: u8| histogram.contains_key(&WalkSummary::Translation { mode, level });
    for (mode, levels) in [
        ("ia32", &[1u8, 2][..]),
        ("pae", &[1, 2]),
        ("lm4", &[1, 2, 3]),
        ("lm5", &[1, 2, 3]),
    ] {
        for &level in levels {
            assert!(translated(mode, level), "no {mode} translation at level {level}");
        }
    }
    for why in ["not-present", "reserved", "rights"] {
        for mode in ["ia32", "pae", "lm4", "lm5"] {
            if mode == "ia32" && why == "reserved" {
                continue; // checked below: only 4 MiB pages have reserved bits
            }
            assert!(
                histogram
                    .keys()
                    .any(|k| matches!(k, WalkSummary::PageFault { mode: m, why: w, .. } if *m == mode && *w == why)),
                "no {why} fault in {mode}"
            );
        }
    }
    assert!(histogram.contains_key(&WalkSummary::NonCanonical));
    assert!(histogram.contains_key(&WalkSummary::PdpteLoadGp));
}

#[test]
fn walk_corpus_replays() {
    for (path, bytes) in corpus("walk") {
        let mut u = Unstructured::new(&bytes);
        if let Ok(input) = WalkInput::arbitrary(&mut u) {
            walk_one(&input);
        } else {
            panic!("{}: not a walk input", path.display());
        }
    }
}

/// A supervisor write to a read-only 4 KiB page with CR0.WP = 1 in 4-level
/// paging: root at 0x1000, tables at 0x2000 and 0x3000 and 0x4000.
fn read_only_write() -> Scenario {
    let mut pages = Vec::new();
    for (gfn, next) in [(1u64, 2u64), (2, 3), (3, 4)] {
        let mut bytes = vec![0u8; 4096];
        bytes[..8].copy_from_slice(&((next << 12) | 0x7).to_le_bytes());
        pages.push((gfn, bytes));
    }
    let mut pt = vec![0u8; 4096];
    pt[..8].copy_from_slice(&(0x5000u64 | 0x1).to_le_bytes()); // present, read-only
    pages.push((4, pt));
    Scenario {
        cr0: 1 | 1 << 16 | 1 << 31,
        cr3: 0x1000,
        cr4: 1 << 5,
        efer: 1 << 8 | 1 << 10 | 1 << 11,
        pkru: 0,
        maxphyaddr: 40,
        gbpages: true,
        pse36: true,
        access: RefAccess {
            kind: RefKind::Write,
            cpl: 0,
            implicit: false,
            rflags_ac: false,
        },
        va: 0x123,
        stale_pdptes: None,
        pages,
    }
}

/// Negative control: the comparison catches a reference that ignores
/// CR0.WP, on a known input, and a reference that never sets Dirty, on
/// random inputs.
#[test]
fn walk_comparison_detects_a_deliberately_wrong_rule() {
    let s = read_only_write();
    assert_eq!(
        check_scenario(&s, Deviation::None),
        Ok(WalkSummary::PageFault {
            mode: "lm4",
            level: 1,
            why: "rights"
        })
    );
    let e = check_scenario(&s, Deviation::IgnoreCr0Wp).expect_err("ignoring CR0.WP must be caught");
    assert!(
        e.contains("walker PageFault") && e.contains("reference Translation"),
        "{e}"
    );

    let mut rng = SmallRng::seed_from_u64(7);
    let mut buf = vec![0u8; 2048];
    let mut caught = None;
    for i in 0..5_000 {
        rng.fill(&mut buf[..]);
        let Ok(input) = WalkInput::arbitrary(&mut Unstructured::new(&buf)) else {
            continue;
        };
        let s = input.scenario();
        check_scenario(&s, Deviation::None).unwrap_or_else(|e| panic!("{e}"));
        if let Err(e) = check_scenario(&s, Deviation::NoDirty) {
            assert!(e.contains("memory after the access differs"), "{e}");
            caught = Some(i);
            break;
        }
    }
    assert!(
        caught.is_some(),
        "5000 random inputs never caught a reference that forgets Dirty"
    );
}

// ---- the reference against the recorded cases -----------------------------

/// The reference walker agrees with every single-access conformance case
/// (`tests/data/conformance/public-<mode>.jsonl`): this validates the
/// reference itself against an independent x86 implementation.
#[test]
fn reference_agrees_with_every_single_access_conformance_case() {
    let mut checked = 0;
    for mode in ["ia32", "pae", "lm4", "lm5"] {
        let path = repo().join(format!("tests/data/conformance/public-{mode}.jsonl"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Case::Single(c) = Case::parse(line).unwrap_or_else(|e| panic!("{mode}: {e}")) else {
                panic!("{mode}: a step case in a single-access file");
            };
            let esize = c.control.mode.entry_size();
            let mem: BTreeMap<u64, u64> = c.memory.iter().map(|e| (e.pa.0, e.value.0)).collect();
            let read = |pa: u64, _size: usize| mem.get(&pa).copied().unwrap_or(0);
            let ctl = &c.control;
            let (cr4_mode, efer_mode) = match ctl.mode {
                CaseMode::Ia32 => (0, 0),
                CaseMode::Pae => (1 << 5, 0),
                CaseMode::Lm4 => (1 << 5, 1 << 8 | 1 << 10),
                CaseMode::Lm5 => (1 << 5 | 1 << 12, 1 << 8 | 1 << 10),
            };
            let flag = |on: bool, bit: u32| if on { 1u64 << bit } else { 0 };
            let mut cpu = RefCpu {
                cr0: 1 | 1 << 31 | flag(ctl.cr0_wp, 16),
                cr3: ctl.cr3.0,
                cr4: cr4_mode
                    | flag(ctl.cr4_pse, 4)
                    | flag(ctl.cr4_smep, 20)
                    | flag(ctl.cr4_smap, 21)
                    | flag(ctl.cr4_pke, 22),
                efer: efer_mode | flag(ctl.efer_nxe, 11),
                pkru: ctl.pkru.0 as u32,
                maxphyaddr: ctl.maxphyaddr,
                gbpages: true,
                pse36: true,
                pdptes: [0; 4],
            };
            if ctl.mode == CaseMode::Pae {
                cpu.pdptes = reference::load_pdptes(&read, cpu.cr3, cpu.maxphyaddr)
                    .unwrap_or_else(|gp| panic!("{mode} case {}: PDPTE load #GP {gp:x?}", c.id));
            }
            let access = RefAccess {
                kind: match c.access {
                    vmmu_sim::conform::case::CaseAccess::Read => RefKind::Read,
                    vmmu_sim::conform::case::CaseAccess::Write => RefKind::Write,
                    vmmu_sim::conform::case::CaseAccess::Fetch => RefKind::Fetch,
                },
                cpl: c.cpl,
                implicit: false,
                rflags_ac: c.rflags_ac,
            };
            let got = reference::walk(&cpu, access, c.va.0, &read);
            let (fault, error_code, pa) = match got.outcome {
                RefOutcome::Translation { gpa, .. } => (false, None, Some(gpa)),
                RefOutcome::PageFault { error_code, .. } => (true, Some(error_code), None),
                RefOutcome::GeneralProtection => panic!("{mode} case {}: #GP", c.id),
            };
            assert_eq!(
                (fault, error_code, pa),
                (c.result.fault, c.result.error_code, c.result.pa.map(|p| p.0)),
                "{mode} case {}: the reference's (fault, error code, pa) differ from the recorded ones",
                c.id
            );
            let mut after = mem.clone();
            for (addr, size, bits) in &got.updates {
                assert_eq!(*size, esize);
                *after.entry(*addr).or_default() |= bits;
            }
            let care = if c.result.fault { !(1u64 << 5) } else { u64::MAX };
            for e in &c.after {
                let value = after.get(&e.pa.0).copied().unwrap_or(0);
                assert!(
                    (value ^ e.value.0) & care == 0,
                    "{mode} case {}: entry {:#x} is {value:#x} after the access, recorded {:#x}",
                    c.id,
                    e.pa.0,
                    e.value.0
                );
            }
            checked += 1;
        }
    }
    eprintln!("the reference agrees with {checked} recorded cases");
    assert!(checked > 5_000, "only {checked} cases");
}

// ---- the parsers ------------------------------------------------------------

#[test]
fn conform_case_mutants_parse_or_fail_cleanly() {
    let accepted = mutants("conform_case", 0xc0de_0001, PARSE_ITERS, |d| parse::conform_case(d) > 0);
    assert!(
        accepted > 0,
        "no mutant parsed: the mutations are too destructive to test acceptance"
    );
}

#[test]
fn workload_mutants_parse_or_fail_cleanly() {
    let accepted = mutants("workload", 0xc0de_0002, PARSE_ITERS, parse::workload);
    assert!(accepted > 0, "no mutant parsed");
}

#[test]
fn trace_mutants_parse_or_fail_cleanly() {
    let accepted = mutants("trace", 0xc0de_0003, PARSE_ITERS, parse::trace);
    assert!(accepted > 0, "no mutant parsed");
}

#[test]
fn parser_corpora_replay() {
    for (_, bytes) in corpus("conform_case") {
        parse::conform_case(&bytes);
    }
    for (_, bytes) in corpus("workload") {
        parse::workload(&bytes);
    }
    for (_, bytes) in corpus("trace") {
        parse::trace(&bytes);
    }
    // Arbitrary bytes, not only mutants of valid files.
    let mut rng = SmallRng::seed_from_u64(0xb17e5);
    for _ in 0..500 {
        let len = rng.random_range(0..512);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        parse::conform_case(&data);
        parse::workload(&data);
        parse::trace(&data);
    }
}

/// Writes seed inputs for `fuzz/corpus/walk/` into the directory named by
/// `VMMU_WALK_SEEDS`: the first random input reaching each kind of
/// outcome. `VMMU_WALK_SEEDS=fuzz/corpus/walk cargo test -p vmmu --test fuzz
/// -- --ignored write_walk_seeds`.
#[test]
#[ignore = "writes the walk seed corpus"]
fn write_walk_seeds() {
    let dir = PathBuf::from(std::env::var("VMMU_WALK_SEEDS").expect("VMMU_WALK_SEEDS=<dir>"));
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let mut seen = std::collections::BTreeSet::new();
    let mut buf = vec![0u8; 1024];
    for _ in 0..50_000 {
        let len = rng.random_range(64..buf.len());
        rng.fill(&mut buf[..len]);
        let Ok(input) = WalkInput::arbitrary(&mut Unstructured::new(&buf[..len])) else {
            continue;
        };
        let summary = walk_one(&input);
        let keep = match summary {
            WalkSummary::Translation { .. } | WalkSummary::NonCanonical | WalkSummary::PdpteLoadGp => true,
            WalkSummary::PageFault { level, .. } => level == 1,
            WalkSummary::ImpossiblePdptes => false,
        };
        if keep && seen.insert(summary) {
            let name = match summary {
                WalkSummary::Translation { mode, level } => format!("translation-{mode}-l{level}"),
                WalkSummary::PageFault { mode, level, why } => format!("pf-{why}-{mode}-l{level}"),
                other => format!("{other:?}"),
            };
            std::fs::write(dir.join(format!("{name}.bin")), &buf[..len]).expect("writing a seed");
        }
    }
    assert!(seen.len() > 10, "{seen:?}");
}

// ---- the whole VM -----------------------------------------------------------

/// Programs of the seeded `vm` driver (`VMMU_VM_ITERS` overrides it, and
/// `VMMU_VM_SEED` the seed, for longer runs).
const VM_ITERS: usize = 600;

/// A random `VmProgram` from `rng`: `len` random bytes through
/// `arbitrary_take_rest`, as libFuzzer's `fuzz_target!` builds its input
/// (about 5 bytes an op). Used by the negative controls, which need the
/// `shuttle` feature.
#[cfg(feature = "shuttle")]
fn vm_program(rng: &mut SmallRng, len: usize) -> Option<VmProgram> {
    let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    VmProgram::arbitrary_take_rest(Unstructured::new(&bytes)).ok()
}

#[test]
fn vm_random_programs_pass_the_checker() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let iters = env("VMMU_VM_ITERS").map_or(VM_ITERS, |n| n as usize);
    let mut rng = SmallRng::seed_from_u64(env("VMMU_VM_SEED").unwrap_or(0x0005_1a7e));
    let mut total = VmSummary::default();
    let start = Instant::now();
    let mut runs = 0;
    for _ in 0..iters {
        let len = rng.random_range(64..1200);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let Ok(program) = VmProgram::arbitrary_take_rest(Unstructured::new(&bytes)) else {
            continue;
        };
        let s = match std::panic::catch_unwind(|| vm::run(&program)) {
            Ok(s) => s,
            Err(e) => {
                let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-fail.bin");
                std::fs::write(&file, &bytes).expect("writing the failing input");
                std::panic::resume_unwind(e);
            }
        };
        runs += 1;
        total.ops += s.ops;
        total.done += s.done;
        total.mmio += s.mmio;
        total.page_faults += s.page_faults;
        total.general_protection += s.general_protection;
        total.stale += s.stale;
        total.dirty_checked += s.dirty_checked;
        total.slot_changes += s.slot_changes;
        total.host_changes += s.host_changes;
    }
    eprintln!("vm: {runs} programs in {:.2?}: {total:?}", start.elapsed());
    // The generator reaches every kind of outcome.
    assert!(total.done > 0 && total.mmio > 0 && total.page_faults > 0, "{total:?}");
    assert!(total.general_protection > 0, "{total:?}");
    assert!(total.stale > 0, "no stale translation was ever seen: {total:?}");
    assert!(total.dirty_checked > 0, "no harvest was checked: {total:?}");
    assert!(total.slot_changes > 0 && total.host_changes > 0, "{total:?}");
}

#[test]
fn vm_corpus_replays() {
    for (path, bytes) in corpus("vm") {
        let program = VmProgram::arbitrary_take_rest(Unstructured::new(&bytes))
            .unwrap_or_else(|e| panic!("{}: not a vm program: {e}", path.display()));
        vm::run(&program);
    }
}

/// Negative control: with an injected MMU bug, random programs make the
/// checker panic within a bounded number of programs, for each bug.
#[cfg(feature = "shuttle")]
#[test]
fn vm_checker_catches_injected_mmu_bugs() {
    use vmmu::sync::{Bug, with_bugs};
    for (bug, budget) in [
        (Bug::SkipUnsyncSync, 400),
        (Bug::RoleIgnoresControls, 400),
        (Bug::KeepObsoleteRoot, 400),
        (Bug::DropDirtyBit, 400),
    ] {
        let mut rng = SmallRng::seed_from_u64(0xbad_0000 + bug as u64);
        let mut caught = None;
        for i in 0..budget {
            let len = rng.random_range(256..1200);
            let Some(program) = vm_program(&mut rng, len) else {
                continue;
            };
            // The program passes without the bug.
            vm::run(&program);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| with_bugs(&[bug], || vm::run(&program))));
            if let Err(e) = r {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                caught = Some((i, msg));
                break;
            }
        }
        let (i, msg) = caught.unwrap_or_else(|| panic!("{budget} random programs never caught {bug:?}"));
        eprintln!("{bug:?}: caught by program {i}: {msg}");
    }
}

/// The sequence that shows an unsync page's stale SPTE (as in
/// `tests/guest_model.rs`): a translation is made, the guest edits its PTE
/// through the self-map (the leaf table goes unsync), flushes the page and
/// reads it again.
fn vm_edit_then_flush(mmu: vm::MmuChoice, mode: vm::VmMode) -> VmProgram {
    let read = |page| vm::VmOp::Access {
        page,
        offset: 0,
        size: 8,
        kind: vm::Kind::Read,
        user: false,
        ac: false,
        value: 0,
    };
    VmProgram {
        mmu,
        mode,
        pcide: false,
        pge: false,
        wp: true,
        smep: false,
        smap: false,
        nxe: true,
        pke: false,
        config: vmmu::vm::config::VmConfig {
            max_page_size: 2 << 20,
            ..Default::default()
        },
        policies: Default::default(),
        slot1: false,
        log0: false,
        ops: vm::VmOps(vec![
            read(5),
            vm::VmOp::WriteEntry {
                table: 5,
                index: 5,
                value: 0x11000 | 0x7,
            },
            vm::VmOp::Invlpg { page: 5 },
            read(5),
        ]),
    }
}

#[test]
fn vm_edit_then_flush_passes() {
    for mmu in [vm::MmuChoice::Shadow, vm::MmuChoice::Tdp] {
        for mode in [vm::VmMode::Level4, vm::VmMode::Level5, vm::VmMode::Bits32] {
            let s = vm::run(&vm_edit_then_flush(mmu, mode));
            assert_eq!(s.ops, 4);
        }
    }
}

/// Negative control on a known program: the shadow MMU with syncs
/// switched off shows the stale translation after the flush.
#[cfg(feature = "shuttle")]
#[test]
fn vm_checker_catches_a_skipped_sync() {
    use vmmu::sync::{Bug, with_bugs};
    for mode in [vm::VmMode::Level4, vm::VmMode::Level5, vm::VmMode::Bits32] {
        let p = vm_edit_then_flush(vm::MmuChoice::Shadow, mode);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_bugs(&[Bug::SkipUnsyncSync], || vm::run(&p))
        }));
        let e = r.expect_err("a stale translation after INVLPG went unnoticed");
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("op 3") && msg.contains("expected Gpa(11000)"),
            "{mode:?}: {msg}"
        );
    }
}

/// Writes seed inputs for `fuzz/corpus/vm/` into the directory named by
/// `VMMU_VM_SEEDS`: for each MMU and paging mode, the first random program
/// that sees a stale translation and checks a dirty harvest.
/// `VMMU_VM_SEEDS=fuzz/corpus/vm cargo test -p vmmu --test fuzz --
/// --ignored write_vm_seeds`.
#[test]
#[ignore = "writes the vm seed corpus"]
fn write_vm_seeds() {
    let dir = PathBuf::from(std::env::var("VMMU_VM_SEEDS").expect("VMMU_VM_SEEDS=<dir>"));
    let mut rng = SmallRng::seed_from_u64(0x5eed_0002);
    let mut written = std::collections::BTreeSet::new();
    for _ in 0..20_000 {
        let len = rng.random_range(200..700);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let Ok(p) = VmProgram::arbitrary_take_rest(Unstructured::new(&bytes)) else {
            continue;
        };
        let name = format!("{:?}-{:?}", p.mmu, p.mode).to_lowercase();
        if written.contains(&name) {
            continue;
        }
        let s = match std::panic::catch_unwind(|| vm::run(&p)) {
            Ok(s) => s,
            Err(_) => {
                let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-fail.bin");
                std::fs::write(&file, &bytes).expect("writing the failing input");
                panic!("a failing program: {}", file.display());
            }
        };
        if s.stale > 0 && s.dirty_checked > 0 && s.slot_changes > 0 {
            std::fs::write(dir.join(format!("{name}.bin")), &bytes).expect("writing a seed");
            written.insert(name);
        }
    }
    assert_eq!(written.len(), 6, "{written:?}");
}

/// Minimises the program in the file named by `VMMU_VM_INPUT` (a failing
/// input) by removing ops while it still fails, and prints it.
#[test]
#[ignore = "minimises a failing vm input"]
fn minimize_vm_input() {
    let path = std::env::var("VMMU_VM_INPUT").expect("VMMU_VM_INPUT=<file>");
    let bytes = std::fs::read(&path).expect("reading the input");
    let mut p = VmProgram::arbitrary_take_rest(Unstructured::new(&bytes)).expect("a vm program");
    let fails = |p: &VmProgram| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm::run(p))).is_err();
    std::panic::set_hook(Box::new(|_| {}));
    assert!(fails(&p), "the input passes");
    p.ops.0.truncate(vm::MAX_OPS);
    let mut i = p.ops.0.len();
    while i > 0 {
        i -= 1;
        let mut q = p.clone();
        q.ops.0.remove(i);
        if fails(&q) {
            p = q;
        }
    }
    let _ = std::panic::take_hook();
    eprintln!("{p:#?}");
    let msg = std::panic::catch_unwind(|| vm::run(&p)).expect_err("still fails");
    eprintln!("{}", msg.downcast_ref::<String>().cloned().unwrap_or_default());
}
