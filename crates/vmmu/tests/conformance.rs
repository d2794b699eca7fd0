//! Every vendored conformance case through the guest walker.

use std::path::PathBuf;

use vmmu::conform::{Report, WalkerReplayer, read_cases, run_cases};

fn corpus() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/conformance");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus is vendored at {}: {e}", dir.display()))
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
}

#[test]
fn walker_passes_every_vendored_case() {
    let files = corpus();
    assert_eq!(files.len(), 12, "4 single-access, 4 step and 4 TLB-step files");
    let mut total = 0;
    for file in files {
        let cases = read_cases(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cases.is_empty(), "{} has cases", file.display());
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
    assert_eq!(total, 7667);
}

/// The replayer can fail: a case whose recorded result is altered is reported.
#[test]
fn an_altered_case_fails() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/conformance/public-lm4.jsonl");
    let mut cases = read_cases(&file).unwrap();
    cases.truncate(50);
    let mut altered = 0;
    for case in &mut cases {
        if let vmmu::conform::Case::Single(c) = case {
            if let Some(pa) = c.result.pa.as_mut() {
                pa.0 ^= 0x1000;
                altered += 1;
            } else if let Some(ec) = c.result.error_code.as_mut() {
                *ec ^= 1;
                altered += 1;
            }
        }
    }
    let mut report = Report::default();
    run_cases(&mut WalkerReplayer, &cases, &mut report);
    assert_eq!(report.failed, altered);
}
