//! Every vendored conformance case through the guest walker, the shadow
//! MMU and the TDP MMU; the nested-paging cases (AMD NPT, Intel EPT)
//! through the two-dimensional walk.

use std::path::PathBuf;

use vmmu_sim::conform::{
    Case, NestedReplayer, Replayer, Report, ShadowReplayer, TdpReplayer, WalkerReplayer, read_cases, run_cases,
};

/// Whether a vendored file holds nested-paging cases.
fn is_nested_file(p: &std::path::Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.starts_with("public-npt-") || name.starts_with("public-ept")
}

/// The single-level files (single-access, steps, TLB steps).
fn corpus() -> Vec<PathBuf> {
    all_files().into_iter().filter(|p| !is_nested_file(p)).collect()
}

/// The nested-paging files.
fn nested_corpus() -> Vec<PathBuf> {
    all_files().into_iter().filter(|p| is_nested_file(p)).collect()
}

fn all_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/conformance");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus is vendored at {}: {e}", dir.display()))
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
}

/// Replays every vendored file through `replayer`; all 7,667 cases pass.
fn assert_every_case_passes(replayer: &mut dyn Replayer) {
    let files = corpus();
    assert_eq!(files.len(), 12, "4 single-access, 4 step and 4 TLB-step files");
    let mut total = 0;
    for file in files {
        let cases = read_cases(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cases.is_empty(), "{} has cases", file.display());
        let mut report = Report::default();
        run_cases(replayer, &cases, &mut report);
        assert_eq!(
            report.failed,
            0,
            "{}: {:?}",
            file.display(),
            &report.failures[..report.failures.len().min(5)]
        );
        total += report.passed;
    }
    assert_eq!(total, 7667);
}

/// The nested-paging cases through the two-dimensional walk: 3,973 NPT
/// cases (QEMU's SVM) and 988 EPT cases (Bochs's VMX).
#[test]
fn the_2d_walk_passes_every_nested_case() {
    let files = nested_corpus();
    assert_eq!(files.len(), 5, "4 NPT files (one per guest mode) and the EPT file");
    let mut total = 0;
    for file in files {
        let cases = read_cases(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(cases.iter().all(Case::is_nested), "{}", file.display());
        let mut report = Report::default();
        run_cases(&mut WalkerReplayer, &cases, &mut report);
        assert_eq!(
            report.failed,
            0,
            "{}: {:?}",
            file.display(),
            &report.failures[..report.failures.len().min(5)]
        );
        total += report.passed;
    }
    assert_eq!(total, 4961);
}

/// The NPT and EPT cases on the nested MMU: an L2 vCPU whose accesses go
/// through NPT02/EPT02, the shadow of the case's NPT12/EPT12; every #NPF,
/// EPT violation and misconfiguration the nested MMU reflects to L1, every
/// address reached, every value read and every entry afterwards as the
/// case recorded.
#[test]
fn the_nested_mmu_passes_every_nested_case() {
    let files: Vec<_> = nested_corpus()
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("public-npt-") || n.starts_with("public-ept"))
        })
        .collect();
    assert_eq!(files.len(), 5);
    let mut total = 0;
    for file in files {
        let cases = read_cases(&file).unwrap_or_else(|e| panic!("{e}"));
        let mut report = Report::default();
        run_cases(&mut NestedReplayer, &cases, &mut report);
        assert_eq!(
            report.failed,
            0,
            "{}: {:?}",
            file.display(),
            &report.failures[..report.failures.len().min(5)]
        );
        total += report.passed;
    }
    assert_eq!(total, 3973 + 988);
}

/// The nested replay can fail: an altered exit, address or entry
/// afterwards is reported, for both vendors.
#[test]
fn an_altered_nested_case_fails() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/conformance");
    let mut cases = read_cases(&dir.join("public-npt-lm4.jsonl")).unwrap();
    cases.truncate(60);
    let mut ept = read_cases(&dir.join("public-ept.jsonl")).unwrap();
    ept.truncate(60);
    cases.extend(ept);
    let mut altered = 0;
    for (i, case) in cases.iter_mut().enumerate() {
        match case {
            // Every third case: an entry afterwards (a D bit that must, or
            // must not, be there).
            Case::Npt(c) if i % 3 == 0 => {
                let e = c
                    .after
                    .iter_mut()
                    .find(|e| e.mask.0 & (1 << 6) != 0)
                    .expect("a D bit compared");
                e.value.0 ^= 1 << 6;
                altered += 1;
            }
            Case::Npt(c) => {
                let r = &mut c.result;
                if let Some(pa) = r.pa.as_mut() {
                    pa.0 ^= 0x1000;
                } else if let Some(x) = r.exitinfo1.as_mut() {
                    // bit 32 <-> bit 33: which stage faulted
                    x.0 ^= 3 << 32;
                }
                altered += 1;
            }
            Case::Ept(c) if i % 3 == 0 => {
                let e = c
                    .after
                    .iter_mut()
                    .find(|e| e.dont_care.is_none())
                    .expect("an exact entry");
                e.value.0 ^= 1 << 9;
                altered += 1;
            }
            Case::Ept(c) => {
                let r = &mut c.result;
                if let Some(q) = r.qualification.as_mut() {
                    q.0 ^= 1 << 8;
                } else if let Some(g) = r.gpa.as_mut() {
                    g.0 ^= 0x1000;
                } else if let Some(v) = r.value_read.as_mut() {
                    v.0 ^= 1;
                } else {
                    r.exit = "ept_misconfig".to_string();
                }
                altered += 1;
            }
            _ => unreachable!("nested files"),
        }
    }
    let mut report = Report::default();
    run_cases(&mut WalkerReplayer, &cases, &mut report);
    assert_eq!((report.failed, report.passed), (altered, 0));
    // On the nested MMU too, both vendors.
    let mut report = Report::default();
    run_cases(&mut NestedReplayer, &cases, &mut report);
    assert_eq!((report.failed, report.passed), (cases.len() as u64, 0));
}

#[test]
fn walker_passes_every_vendored_case() {
    assert_every_case_passes(&mut WalkerReplayer);
}

#[test]
fn shadow_mmu_passes_every_vendored_case() {
    assert_every_case_passes(&mut ShadowReplayer);
}

#[test]
fn tdp_mmu_passes_every_vendored_case() {
    assert_every_case_passes(&mut TdpReplayer::default());
}

/// The TDP MMU on an AMD host: NPT-format tables walked as NPT.
#[test]
fn tdp_mmu_on_amd_passes_every_vendored_case() {
    assert_every_case_passes(&mut TdpReplayer {
        vendor: vmmu::arch::control::Vendor::Amd,
    });
}

/// The replayer can fail: a case whose recorded result is altered is reported.
#[test]
fn an_altered_case_fails() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/conformance/public-lm4.jsonl");
    let mut cases = read_cases(&file).unwrap();
    cases.truncate(50);
    let mut altered = 0;
    for case in &mut cases {
        if let vmmu_sim::conform::Case::Single(c) = case {
            if let Some(pa) = c.result.pa.as_mut() {
                pa.0 ^= 0x1000;
                altered += 1;
            } else if let Some(ec) = c.result.error_code.as_mut() {
                *ec ^= 1;
                altered += 1;
            }
        }
    }
    for replayer in [
        &mut WalkerReplayer as &mut dyn Replayer,
        &mut TdpReplayer::default(),
        &mut TdpReplayer {
            vendor: vmmu::arch::control::Vendor::Amd,
        },
        &mut ShadowReplayer,
    ] {
        let mut report = Report::default();
        run_cases(replayer, &cases, &mut report);
        assert_eq!(report.failed, altered, "{}", replayer.name());
    }
}

/// The walker over the memory layer's `GuestMemory` (gpa → memslot → hva →
/// host frame) agrees with every single-access case, as over the plain
/// sparse memory.
#[test]
fn walker_over_guest_memory_passes_the_single_access_cases() {
    use vmmu::addr::{Gpa, Gva, Hva};
    use vmmu::arch::perm::Access;
    use vmmu::host::VmaFlags;
    use vmmu::walker::{GuestPaging, load_pdptes};
    use vmmu_sim::conform::{Case, case_features, case_regs, check_after, check_outcome, outcome_of};

    let vm = vmmu::vm::Vm::new(64 << 20, Hva::new(0x7000_0000), VmaFlags::WRITE, Default::default()).unwrap();
    let mem = vm.memory();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/conformance");
    let mut passed = 0;
    for mode in ["lm4", "lm5", "pae", "ia32"] {
        for case in read_cases(&dir.join(format!("public-{mode}.jsonl"))).unwrap() {
            let Case::Single(c) = case else {
                unreachable!("single-access file")
            };
            let esize = c.control.mode.entry_size();
            for e in &c.memory {
                mem.write_value(Gpa::new(e.pa.0), esize, e.value.0).unwrap();
            }
            let regs = case_regs(&c.control);
            let features = case_features(&c.control);
            let paging = GuestPaging::new(&regs, &features);
            let pdptes = load_pdptes(&mem, c.control.cr3.0, &features).unwrap_or([0; 4]);
            let root = paging.root(c.control.cr3.0, pdptes);
            let access = Access::new(c.access.into(), c.cpl, c.rflags_ac);
            let got = outcome_of(&paging.walk(&mem, &root, Gva::new(c.va.0), access, c.control.pkru.0 as u32));
            check_outcome(c.id, None, &c.result, &got).unwrap_or_else(|f| panic!("{mode}: {f:?}"));
            check_after(&c, |pa| mem.read_value(Gpa::new(pa), esize).unwrap())
                .unwrap_or_else(|f| panic!("{mode}: {f:?}"));
            for e in &c.memory {
                mem.write_value(Gpa::new(e.pa.0), esize, 0).unwrap();
            }
            passed += 1;
        }
    }
    assert_eq!(passed, 5467);
}
