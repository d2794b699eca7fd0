//! Bad input, everywhere: every flag of every command and every input file
//! format, given malformed values (empty, wrong type, negative, zero,
//! out of range, huge, conflicting) and malformed files (missing, a
//! directory, empty, binary garbage, not UTF-8, truncated, wrong JSON or
//! TOML types, huge numbers, a good line followed by a bad one).
//!
//! Every case must exit 2 fast (before doing any work), print nothing on
//! stdout, name the problem on stderr (the flag, or the file and line, and
//! the reason) and never show a panic. Cases are tables; a failing test
//! lists every failing case.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A bad-input invocation must fail before doing any work: far below this.
const TIMEOUT: Duration = Duration::from_secs(20);

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/conformance");

/// One bad-input case: the arguments, and the texts stderr must contain.
struct Case {
    args: Vec<String>,
    needles: Vec<String>,
}

fn case(args: &[&str], needles: &[&str]) -> Case {
    Case {
        args: args.iter().map(|s| s.to_string()).collect(),
        needles: needles.iter().map(|s| s.to_string()).collect(),
    }
}

/// Runs vmmu with `args`: (exit code, stdout, stderr), or an error if it
/// took longer than [`TIMEOUT`] (and was killed).
fn vmmu(args: &[String]) -> Result<(Option<i32>, String, String), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(args)
        .env_remove("VMMU_LOG")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start vmmu: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {TIMEOUT:?}: bad input must fail fast"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("cannot wait for vmmu: {e}")),
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs every case; panics listing the failing ones. Returns the number
/// of cases run.
fn check_all(table: &str, cases: &[Case]) -> usize {
    eprintln!("{table}: {} bad-input cases", cases.len());
    let mut failures = Vec::new();
    for c in cases {
        let what = format!("vmmu {}", c.args.join(" "));
        let (code, out, err) = match vmmu(&c.args) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{what}: {e}"));
                continue;
            }
        };
        let mut problems = Vec::new();
        if code != Some(2) {
            problems.push(format!("exit code {code:?}, not 2"));
        }
        for needle in &c.needles {
            if !err.contains(needle.as_str()) {
                problems.push(format!("stderr does not name {needle:?}"));
            }
        }
        if err.contains("panicked") || err.contains("RUST_BACKTRACE") || err.contains("internal error") {
            problems.push("a panic reached the user".into());
        }
        if !out.is_empty() {
            problems.push(format!(
                "stdout is not empty: {:?}",
                out.chars().take(200).collect::<String>()
            ));
        }
        if err.trim().is_empty() {
            problems.push("stderr is empty".into());
        }
        if !problems.is_empty() {
            failures.push(format!("{what}: {}\n    stderr: {}", problems.join("; "), err.trim()));
        }
    }
    assert!(
        failures.is_empty(),
        "{table}: {} of {} bad-input cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
    cases.len()
}

/// This test process's scratch directory.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d =
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmmu-bad-input-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the scratch directory");
        d
    })
}

/// Writes `bytes` to the scratch file `name`; its path as a string.
fn file(name: &str, bytes: impl AsRef<[u8]>) -> String {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).expect("write a scratch file");
    path.to_str().expect("the scratch path is UTF-8").to_string()
}

/// Deterministic binary garbage (an LCG), not valid UTF-8.
fn garbage(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut v: Vec<u8> = (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    v[0] = 0xff;
    v
}

/// Flag cases for `cmd`: `flag` given each of `values`, every one bad;
/// stderr must name the flag.
fn flag_cases(prefix: &[&str], flag: &str, values: &[&str], needle: &str) -> Vec<Case> {
    values
        .iter()
        .map(|v| {
            let mut args: Vec<&str> = prefix.to_vec();
            args.extend([flag, v]);
            case(&args, &[needle])
        })
        .collect()
}

const EMPTY: &str = "";
/// Bad values every unsigned-integer flag rejects.
const BAD_UINTS: [&str; 6] = [
    EMPTY,
    "abc",
    "-1",
    "1.5",
    "18446744073709551616",
    "99999999999999999999999999",
];
/// Bad values every size flag rejects.
const BAD_SIZES: [&str; 10] = [
    EMPTY,
    "lots",
    "-1",
    "1P",
    "1T",
    "99999999999G",
    "1.5G",
    "G",
    "18446744073709551616",
    "4 K",
];
/// Bad values every --seconds rejects.
const BAD_SECONDS: [&str; 8] = [EMPTY, "abc", "-1", "0", "nan", "inf", "-inf", "1e300"];

#[test]
fn run_flags() {
    let r = ["run"];
    let mut cases = Vec::new();
    cases.extend(flag_cases(&r, "--mmu", &[EMPTY, "ept", "SHADOW2"], "--mmu"));
    cases.extend(flag_cases(&r, "--vcpus", &BAD_UINTS, "--vcpus"));
    cases.extend(flag_cases(&r, "--vcpus", &["0", "65", "100000"], "--vcpus"));
    cases.extend(flag_cases(&r, "--memory", &BAD_SIZES, "--memory"));
    // Out of range or not a multiple of 2 MiB (checked before the boot).
    cases.extend(flag_cases(
        &r,
        "--memory",
        &["0", "1", "4K", "3M", "8M", "17M", "17G", "1024G"],
        "--memory",
    ));
    cases.extend(flag_cases(&r, "--workload", &[EMPTY], "--workload"));
    cases.extend(flag_cases(
        &r,
        "--workload",
        &["no-such-workload"],
        "not a named workload",
    ));
    cases.extend(flag_cases(&r, "--ops", &BAD_UINTS, "--ops"));
    cases.extend(flag_cases(
        &r,
        "--ops",
        &["0", "1099511627777", "18446744073709551615"],
        "--ops",
    ));
    cases.extend(flag_cases(&r, "--seconds", &BAD_SECONDS, "--seconds"));
    cases.extend(flag_cases(&r, "--seconds", &["86401"], "--seconds"));
    cases.extend(flag_cases(&r, "--seed", &BAD_UINTS, "--seed"));
    cases.extend(flag_cases(
        &r,
        "--paging",
        &[EMPTY, "64-bit", "flat", "6-level"],
        "--paging",
    ));
    cases.extend(flag_cases(&r, "--check", &[EMPTY, "some", "FULL2"], "--check"));
    cases.extend(flag_cases(&r, "--policy", &[EMPTY, "zap-request"], "name=value"));
    cases.extend(flag_cases(&r, "--policy", &["frob=1", "=reload-all"], "no policy"));
    cases.extend(flag_cases(
        &r,
        "--policy",
        &["zap-request=sometimes", "zap-request=", "host-walk=RE-READ"],
        "not a value of policy",
    ));
    // The VM configuration: switches, numbers and sizes.
    for switch in [
        "--ept-ad",
        "--pml",
        "--manual-protect",
        "--initially-set",
        "--eager-split",
        "--nx-huge-pages",
        "--pku",
        "--smep",
        "--smap",
        "--la57",
    ] {
        cases.extend(flag_cases(&r, switch, &[EMPTY, "yes", "1", "true", "ON2"], switch));
    }
    cases.extend(flag_cases(&r, "--vendor", &[EMPTY, "arm", "AMD64", "via"], "--vendor"));
    for number in ["--dirty-ring", "--nx-recovery-ratio", "--nx-recovery-period-ms"] {
        cases.extend(flag_cases(&r, number, &BAD_UINTS[..5], number));
    }
    cases.extend(flag_cases(
        &r,
        "--ept-levels",
        &[EMPTY, "abc", "-1", "256"],
        "--ept-levels",
    ));
    cases.extend(flag_cases(&r, "--mmu-pages", &BAD_UINTS, "--mmu-pages"));
    cases.extend(flag_cases(
        &r,
        "--max-page-size",
        &[EMPTY, "8K", "4M", "2G", "huge"],
        "--max-page-size",
    ));
    cases.extend(flag_cases(&r, "--config", &[EMPTY, "randomly", "all"], "--config"));
    cases.extend([
        case(
            &["run", "--ops", "5", "--seconds", "1"],
            &["--ops", "--seconds", "cannot be used with"],
        ),
        case(&["run", "--vcpus", "2", "--vcpus", "3"], &["--vcpus"]),
        case(&["run", "--vcpus"], &["--vcpus"]),
        case(&["run", "--host-churn=yes"], &["--host-churn"]),
        case(&["run", "--dirty-log=1"], &["--dirty-log"]),
        case(&["run", "--json=true"], &["--json"]),
        case(&["run", "--frobnicate"], &["--frobnicate"]),
        case(&["run", "extra"], &["extra"]),
        // Memory beyond what the paging mode's kernel map covers.
        case(
            &["run", "--paging", "32-bit", "--memory", "2G"],
            &["--memory", "32-bit"],
        ),
        case(&["run", "--paging", "pae", "--memory", "4G"], &["--memory", "pae"]),
    ]);
    check_all("run flags", &cases);
}

/// Configurations KVM refuses, or vmmu cannot run, each named by its flag
/// before anything runs.
#[test]
fn run_impossible_vm_configurations() {
    let cases = vec![
        case(&["run", "--pml", "on", "--ept-ad", "off"], &["--pml", "--ept-ad on"]),
        case(
            &["run", "--initially-set", "on"],
            &["--initially-set", "manual protect"],
        ),
        case(
            &["run", "--mmu", "tdp", "--dirty-ring", "100"],
            &["--dirty-ring", "power of two"],
        ),
        case(&["run", "--mmu", "tdp", "--dirty-ring", "64"], &["--dirty-ring"]),
        case(&["run", "--mmu", "tdp", "--dirty-ring", "131072"], &["--dirty-ring"]),
        case(
            &["run", "--mmu", "shadow", "--dirty-ring", "4096"],
            &["--dirty-ring", "shadow"],
        ),
        case(&["run", "--dirty-ring", "4096"], &["--dirty-ring", "shadow MMU"]),
        case(
            &["run", "--mmu", "tdp", "--dirty-ring", "4096", "--manual-protect", "on"],
            &["--manual-protect", "ring"],
        ),
        case(
            &["run", "--mmu", "tdp", "--dirty-ring", "4096", "--pml", "on"],
            &["--pml", "ring"],
        ),
        case(&["run", "--ept-levels", "3"], &["--ept-levels", "4 or 5"]),
        case(&["run", "--vendor", "amd", "--ept-ad", "off"], &["--ept-ad", "AMD"]),
        case(&["run", "--vendor", "amd", "--pml", "on"], &["--pml", "AMD"]),
        case(
            &[
                "conform",
                "--mmu",
                "shadow",
                "--vendor",
                "amd",
                "tests/data/conformance/public-lm4.jsonl",
            ],
            &["--vendor", "--mmu tdp"],
        ),
        case(
            &["conform", "--mmu", "nested", "tests/data/conformance/public-lm4.jsonl"],
            &["public-lm4.jsonl", "single-level"],
        ),
        case(
            &["conform", "--mmu", "tdp", "tests/data/conformance/public-npt-lm4.jsonl"],
            &["public-npt-lm4.jsonl", "--mmu nested"],
        ),
        case(&["run", "--mmu-pages", "10"], &["--mmu-pages", "64"]),
        case(&["run", "--paging", "5-level", "--la57", "off"], &["--la57", "5-level"]),
        // A random configuration with an impossible flag on top.
        case(
            &["run", "--config", "random", "--pml", "on", "--ept-ad", "off"],
            &["--pml"],
        ),
    ];
    check_all("impossible VM configurations", &cases);
}

#[test]
fn run_output_paths() {
    let a_file = file("not-a-dir", "x");
    let under_file = format!("{a_file}/sub");
    let dir = scratch().to_str().expect("UTF-8").to_string();
    let missing = format!("{dir}/no/such/dir/x.trace");
    let run = |extra: &[&str]| {
        let mut v = vec!["run", "--mmu", "tdp", "--ops", "1", "--memory", "16M", "--vcpus", "1"];
        v.extend(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let cases = vec![
        Case {
            args: run(&["--report", &a_file]),
            needles: vec!["--report".into(), a_file.clone(), "not a directory".into()],
        },
        Case {
            args: run(&["--report", &under_file]),
            needles: vec!["--report".into(), under_file.clone()],
        },
        Case {
            args: run(&["--report", "/proc/vmmu-no-such-dir"]),
            needles: vec!["--report".into(), "/proc/vmmu-no-such-dir".into()],
        },
        Case {
            args: run(&["--report", ""]),
            needles: vec!["--report".into()],
        },
        Case {
            args: run(&["--record", &missing]),
            needles: vec!["--record".into(), missing.clone(), "does not exist".into()],
        },
        Case {
            args: run(&["--record", &dir]),
            needles: vec!["--record".into(), "is a directory".into()],
        },
        Case {
            args: run(&["--record", &format!("{a_file}/x.trace")]),
            needles: vec!["--record".into(), a_file.clone()],
        },
        Case {
            args: run(&["--record", ""]),
            needles: vec!["--record".into()],
        },
        Case {
            args: vec!["replay".into(), good_trace().into(), "--report".into(), a_file.clone()],
            needles: vec!["--report".into(), a_file.clone()],
        },
    ];
    check_all("run output paths", &cases);
    assert!(!Path::new(&missing).exists());
}

#[test]
fn run_impossible_configurations() {
    // Boot processes that do not fit in guest memory: found at boot.
    let oom = file("oom.toml", "processes = 1000\nmappings = 1\n");
    // Too many regions to map at boot: refused before booting.
    let vast = file("vast.toml", "processes = 4096\nmappings = 4096\n");
    let vast_vcpus = file("vast-vcpus.toml", "processes = 2048\nmappings = 1\n");
    let cases = vec![
        case(
            &[
                "run",
                "--mmu",
                "tdp",
                "--vcpus",
                "64",
                "--memory",
                "16M",
                "--workload",
                &oom,
            ],
            &["--memory", "too small"],
        ),
        case(&["run", "--workload", &vast], &[&vast, "regions mapped at boot"]),
        case(
            &["run", "--vcpus", "64", "--workload", &vast_vcpus],
            &[&vast_vcpus, "64 vCPUs"],
        ),
    ];
    check_all("impossible run configurations", &cases);
}

#[test]
fn stress_flags() {
    let s = ["stress"];
    let mut cases = Vec::new();
    cases.extend(flag_cases(&s, "--seconds", &BAD_SECONDS, "--seconds"));
    cases.extend(flag_cases(&s, "--seconds", &["604801"], "--seconds"));
    cases.extend(flag_cases(&s, "--vcpus", &BAD_UINTS, "--vcpus"));
    cases.extend(flag_cases(&s, "--vcpus", &["0", "65", "100000"], "--vcpus"));
    cases.extend(flag_cases(&s, "--memory", &BAD_SIZES, "--memory"));
    cases.extend(flag_cases(&s, "--memory", &["0", "1", "3M", "8G"], "memory"));
    cases.extend(flag_cases(&s, "--seed", &BAD_UINTS, "--seed"));
    cases.extend([
        case(&["stress", "--json=1"], &["--json"]),
        case(&["stress", "--ops", "1"], &["--ops"]),
        case(&["stress", "extra"], &["extra"]),
    ]);
    check_all("stress flags", &cases);
}

#[test]
fn migrate_flags() {
    let s = ["migrate"];
    let mut cases = Vec::new();
    cases.extend(flag_cases(&s, "--seconds", &BAD_SECONDS, "--seconds"));
    cases.extend(flag_cases(&s, "--seconds", &["604801"], "--seconds"));
    cases.extend(flag_cases(&s, "--seeds", &BAD_UINTS, "--seeds"));
    cases.extend(flag_cases(&s, "--seeds", &["0"], "--seeds"));
    cases.extend(flag_cases(&s, "--first-seed", &BAD_UINTS, "--first-seed"));
    cases.extend(flag_cases(&s, "--ops", &BAD_UINTS, "--ops"));
    cases.extend(flag_cases(&s, "--ops", &["0", "100000001"], "--ops"));
    cases.extend(flag_cases(&s, "--mmu", &[EMPTY, "ept"], "--mmu"));
    cases.extend(flag_cases(
        &s,
        "--max-page-size",
        &["3K", "4M", EMPTY],
        "--max-page-size",
    ));
    cases.extend(flag_cases(&s, "--ept-levels", &["3", "6", "x"], "--ept-levels"));
    cases.extend(flag_cases(&s, "--nx-huge-pages", &["yes", EMPTY], "--nx-huge-pages"));
    cases.extend(flag_cases(&s, "--eager-split", &["1"], "--eager-split"));
    cases.extend([
        // A configuration the MMU does not have: named, with the list.
        case(
            &["migrate", "--log", "wp+init/ad"],
            &["--log", "wp+init/ad", "wp+manual+init/ad"],
        ),
        case(
            &["migrate", "--mmu", "shadow", "--log", "ring128/ad"],
            &["--log", "ring128/ad", "shadow"],
        ),
        case(&["migrate", "--log", EMPTY], &["--log"]),
        case(&["migrate", "--json=1"], &["--json"]),
        case(&["migrate", "extra"], &["extra"]),
    ]);
    check_all("migrate flags", &cases);
}

#[test]
fn soak_flags() {
    let s = ["soak"];
    let mut cases = Vec::new();
    cases.extend(flag_cases(&s, "--seconds", &BAD_SECONDS, "--seconds"));
    cases.extend(flag_cases(&s, "--seconds", &["604801"], "--seconds"));
    cases.extend(flag_cases(&s, "--run-seconds", &BAD_SECONDS, "--run-seconds"));
    cases.extend(flag_cases(&s, "--run-seconds", &["3601"], "--run-seconds"));
    cases.extend(flag_cases(&s, "--vcpus", &BAD_UINTS, "--vcpus"));
    cases.extend(flag_cases(&s, "--vcpus", &["0", "65"], "--vcpus"));
    cases.extend(flag_cases(&s, "--memory", &BAD_SIZES, "--memory"));
    cases.extend(flag_cases(&s, "--memory", &["0", "1", "3M", "2G"], "--memory"));
    cases.extend(flag_cases(&s, "--first-seed", &BAD_UINTS, "--first-seed"));
    cases.extend(flag_cases(&s, "--mmu", &[EMPTY, "ept"], "--mmu"));
    cases.extend([
        case(
            &["soak", "--seconds", "5", "--run-seconds", "10"],
            &["--run-seconds", "--seconds"],
        ),
        case(&["soak", "--json=1"], &["--json"]),
        case(&["soak", "extra"], &["extra"]),
    ]);
    check_all("soak flags", &cases);
}

#[test]
fn experiment_flags() {
    let e = ["experiment", "001"];
    let mut cases = Vec::new();
    cases.extend(flag_cases(&e, "--seconds", &BAD_SECONDS, "--seconds"));
    cases.extend(flag_cases(&e, "--seconds", &["3601"], "--seconds"));
    cases.extend(flag_cases(&e, "--seed", &BAD_UINTS, "--seed"));
    let not_a_dir = file("experiment-report-file", b"a file");
    cases.extend([
        case(&["experiment"], &["<WHICH>"]),
        case(&["experiment", "005"], &["005", "000", "all"]),
        case(&["experiment", "frobnicate"], &["frobnicate"]),
        case(
            &["experiment", "001", "--report", &not_a_dir],
            &["--report", &not_a_dir],
        ),
        case(&["experiment", "001", "--json=1"], &["--json"]),
        case(&["experiment", "001", "extra"], &["extra"]),
    ]);
    check_all("experiment flags", &cases);
}

#[test]
fn bench_flags() {
    let p = ["bench", "populate"];
    let mut cases = Vec::new();
    cases.extend([
        case(&["bench"], &["<NAME>"]),
        case(&["bench", ""], &["<NAME>"]),
        case(&["bench", "nosuchbench"], &["nosuchbench"]),
        case(&["bench", "populate", "extra"], &["extra"]),
    ]);
    for flag in ["-v", "--vcpus"] {
        cases.extend(flag_cases(&p, flag, &BAD_UINTS, "--vcpus"));
        cases.extend(flag_cases(&p, flag, &["0", "65", "100000"], "--vcpus"));
    }
    for flag in ["-b", "--bytes-per-vcpu"] {
        cases.extend(flag_cases(&p, flag, &BAD_SIZES, "--bytes-per-vcpu"));
        // Zero, and not a multiple of the 4K page.
        cases.extend(flag_cases(&p, flag, &["0", "1", "4097", "6K"], "--bytes-per-vcpu"));
    }
    for flag in ["-i", "--iterations"] {
        cases.extend(flag_cases(&p, flag, &BAD_UINTS, "--iterations"));
        cases.extend(flag_cases(
            &p,
            flag,
            &["0", "101", "1000000000", "1000000001"],
            "--iterations",
        ));
    }
    for flag in ["-s", "--backing"] {
        cases.extend(flag_cases(&p, flag, &[EMPTY, "hugetlb-4m", "ANON2"], "--backing"));
    }
    cases.extend(flag_cases(&p, "--mmu", &[EMPTY, "ept", "both"], "--mmu"));
    cases.extend([
        // Sizes against backings and vCPUs.
        case(
            &["bench", "populate", "-b", "3M", "-s", "thp"],
            &["--bytes-per-vcpu 3M", "thp"],
        ),
        case(
            &["bench", "populate", "-b", "3M", "-s", "hugetlb-2m"],
            &["--bytes-per-vcpu 3M"],
        ),
        case(
            &["bench", "dirty-log", "-b", "512M", "-s", "hugetlb-1g"],
            &["--bytes-per-vcpu", "1G"],
        ),
        case(
            &["bench", "populate", "-v", "4", "-b", "8G"],
            &["--bytes-per-vcpu", "32G"],
        ),
        case(
            &["bench", "access-tracking", "-v", "64", "-b", "1G"],
            &["--bytes-per-vcpu", "--vcpus"],
        ),
        case(&["bench", "all", "-b", "6K"], &["--bytes-per-vcpu 6K"]),
        // Iterations past what each benchmark takes.
        case(&["bench", "walk", "-i", "100000001"], &["--iterations", "walk"]),
        case(&["bench", "tlb-hit", "-i", "100000001"], &["--iterations", "tlb-hit"]),
        case(&["bench", "tlb-miss", "-i", "1000001"], &["--iterations", "tlb-miss"]),
        case(
            &["bench", "tlb-miss", "--mmu", "shadow"],
            &["--mmu", "tlb-miss", "both MMUs"],
        ),
        case(
            &["bench", "cr3-switch", "-i", "20000001"],
            &["--iterations", "cr3-switch"],
        ),
        case(
            &["bench", "wp-emulate", "-i", "1000000000"],
            &["--iterations", "wp-emulate"],
        ),
        case(&["bench", "zap-all", "-i", "101"], &["--iterations", "zap-all"]),
        case(&["bench", "dirty-log", "-i", "101"], &["--iterations", "dirty-log"]),
        case(&["bench", "all", "-i", "101"], &["--iterations", "all"]),
        // Flags the benchmark does not use.
        case(&["bench", "walk", "-b", "4K"], &["--bytes-per-vcpu", "walk"]),
        case(&["bench", "walk", "-b", "1"], &["--bytes-per-vcpu", "walk"]),
        case(&["bench", "walk", "-v", "2"], &["--vcpus", "walk"]),
        case(&["bench", "tlb-hit", "-v", "2"], &["--vcpus", "tlb-hit"]),
        case(&["bench", "tlb-hit", "-s", "thp"], &["--backing", "tlb-hit"]),
        case(&["bench", "cr3-switch", "-s", "thp"], &["--backing", "cr3-switch"]),
        case(&["bench", "wp-emulate", "-v", "2"], &["--vcpus", "wp-emulate"]),
        case(&["bench", "zap-all", "-b", "1G"], &["--bytes-per-vcpu", "zap-all"]),
        // The MMU against the benchmark.
        case(&["bench", "cr3-switch", "--mmu", "tdp"], &["prev_roots"]),
        case(&["bench", "wp-emulate", "--mmu", "tdp"], &["shadow MMU"]),
        case(&["bench", "dirty-log", "--mmu", "shadow"], &["--mmu shadow"]),
        case(&["bench", "walk", "--mmu", "shadow"], &["--mmu shadow"]),
        case(&["bench", "tlb-hit", "--mmu", "tdp"], &["--mmu", "both MMUs"]),
        case(&["bench", "nested-fault", "--mmu", "shadow"], &["--mmu", "nested MMU"]),
        case(
            &["bench", "populate", "--mmu", "shadow", "-s", "thp"],
            &["4K pages only"],
        ),
        case(&["bench", "walk", "--json=1"], &["--json"]),
        case(&["bench", "walk", "-i", "5", "-i", "6"], &["--iterations"]),
    ]);
    check_all("bench flags", &cases);
}

#[test]
fn conform_flags() {
    let good = format!("{CORPUS}/public-lm4.jsonl");
    let mut cases = vec![
        case(&["conform"], &["FILE"]),
        case(&["conform", "--json=1", &good], &["--json"]),
        case(&["conform", "--frobnicate", &good], &["--frobnicate"]),
    ];
    cases.extend(flag_cases(
        &["conform", &good],
        "--mmu",
        &[EMPTY, "nonsense", "both"],
        "--mmu",
    ));
    cases.extend(flag_cases(
        &["conform", &good],
        "--max-failures",
        &BAD_UINTS,
        "--max-failures",
    ));
    check_all("conform flags", &cases);
}

/// Every command of the CLI.
const COMMANDS: [&str; 8] = [
    "run",
    "replay",
    "migrate",
    "soak",
    "conform",
    "bench",
    "stress",
    "experiment",
];

#[test]
fn every_command_rejects_unknown_commands_and_flags() {
    let mut cases = vec![
        case(&[], &["Usage"]),
        case(&["frobnicate"], &["frobnicate"]),
        case(&["--frobnicate"], &["--frobnicate"]),
        case(&["replay"], &["<FILE>"]),
    ];
    for cmd in COMMANDS {
        cases.push(case(&[cmd, "--no-such-flag"], &["--no-such-flag"]));
    }
    check_all("unknown commands and flags", &cases);
}

/// The common malformed files, each with the texts the message must hold
/// (after the file's name).
fn common_file_cases(cmd: &[&str], tag: &str) -> Vec<Case> {
    let with = |path: &str, needles: &[&str]| {
        let mut args = cmd.to_vec();
        args.push(path);
        let mut n = vec![path];
        n.extend(needles);
        case(&args, &n)
    };
    let missing = scratch()
        .join(format!("{tag}-missing"))
        .to_str()
        .expect("UTF-8")
        .to_string();
    let dir = scratch().join(format!("{tag}-dir"));
    std::fs::create_dir_all(&dir).expect("create a directory");
    let dir = dir.to_str().expect("UTF-8").to_string();
    vec![
        with(&missing, &["such file"]),
        with(&dir, &["directory"]),
        with(&file(&format!("{tag}-garbage"), garbage(4096)), &[":1:", "UTF-8"]),
        with(&file(&format!("{tag}-nul"), [0u8; 64]), &[":1:"]),
    ]
}

#[test]
fn conform_files() {
    let text = std::fs::read_to_string(format!("{CORPUS}/public-lm4.jsonl")).expect("the corpus");
    let single = text.lines().next().expect("a first case").to_string();
    let text = std::fs::read_to_string(format!("{CORPUS}/public-steps-lm4.jsonl")).expect("the corpus");
    let steps = text.lines().next().expect("a first case").to_string();
    assert!(single.contains("\"cpl\": 0") && single.contains("\"maxphyaddr\": 40"));
    let edit = |line: &str, from: &str, to: &str| {
        assert!(line.contains(from), "{from} is not in the case");
        line.replacen(from, to, 1)
    };
    let va = single
        .split("\"va\": ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .expect("a va")
        .to_string();
    let first_pa = single
        .split("\"pa\": ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .map(|pa| format!("\"pa\": {pa}"))
        .expect("a pa");
    // (name, content, needles after the file name and line)
    let bad: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("empty.jsonl", vec![], ":1:", "empty"),
        ("blank.jsonl", b"\n  \n\n".to_vec(), ":1:", "empty"),
        ("notutf8.jsonl", [format!("{single}\n{{\"id\": ").as_bytes(), b"\xff\xfe}\n"].concat(), ":2:", "UTF-8"),
        (
            "truncated.jsonl",
            format!("{single}\n{}", &single[..single.len() / 2]).into_bytes(),
            ":2:",
            "invalid JSON",
        ),
        ("brace.jsonl", format!("{single}\n{{\n").into_bytes(), ":2:", "invalid JSON"),
        ("null.jsonl", format!("{single}\nnull\n").into_bytes(), ":2:", "object"),
        ("array.jsonl", b"[]\n".to_vec(), ":1:", "object"),
        ("string.jsonl", b"\"case\"\n".to_vec(), ":1:", "object"),
        ("number.jsonl", b"7\n".to_vec(), ":1:", "object"),
        ("missing.jsonl", b"{\"id\": 1, \"mode\": \"lm4\"}\n".to_vec(), ":1:", "missing field"),
        (
            "cpl-type.jsonl",
            edit(&single, "\"cpl\": 0", "\"cpl\": \"zero\"").into_bytes(),
            ":1:",
            "cpl",
        ),
        ("id-type.jsonl", edit(&single, "\"id\": 0", "\"id\": \"x\"").into_bytes(), ":1:", "id"),
        ("id-float.jsonl", edit(&single, "\"id\": 0", "\"id\": 1.5").into_bytes(), ":1:", "id"),
        ("id-neg.jsonl", edit(&single, "\"id\": 0", "\"id\": -1").into_bytes(), ":1:", "id"),
        ("id-huge.jsonl", edit(&single, "\"id\": 0", "\"id\": 1e30").into_bytes(), ":1:", "id"),
        (
            "id-big.jsonl",
            edit(&single, "\"id\": 0", "\"id\": 18446744073709551616").into_bytes(),
            ":1:",
            "id",
        ),
        ("va-type.jsonl", edit(&single, &va, "5").into_bytes(), ":1:", "va"),
        ("va-hex.jsonl", edit(&single, &va, "\"1x5\"").into_bytes(), ":1:", "hex"),
        (
            "va-huge.jsonl",
            edit(&single, &va, "\"0x1ffffffffffffffff\"").into_bytes(),
            ":1:",
            "va",
        ),
        ("memory-type.jsonl", edit(&single, "\"memory\": [", "\"memory\": 5, \"x\": [").into_bytes(), ":1:", "memory"),
        ("result-type.jsonl", edit(&single, "\"result\": {", "\"result\": [], \"x\": {").into_bytes(), ":1:", "result"),
        ("mode.jsonl", edit(&single, "\"lm4\"", "\"lm6\"").into_bytes(), ":1:", "lm6"),
        ("access.jsonl", edit(&single, "\"fetch\"", "\"jump\"").into_bytes(), ":1:", "jump"),
        ("cpl-range.jsonl", edit(&single, "\"cpl\": 0", "\"cpl\": 4").into_bytes(), ":1:", "cpl"),
        (
            "cpl-huge.jsonl",
            edit(&single, "\"cpl\": 0", "\"cpl\": 99999999999").into_bytes(),
            ":1:",
            "cpl",
        ),
        (
            "maxphyaddr-0.jsonl",
            edit(&single, "\"maxphyaddr\": 40", "\"maxphyaddr\": 0").into_bytes(),
            ":1:",
            "maxphyaddr",
        ),
        (
            "maxphyaddr-64.jsonl",
            edit(&single, "\"maxphyaddr\": 40", "\"maxphyaddr\": 64").into_bytes(),
            ":1:",
            "maxphyaddr",
        ),
        (
            "maxphyaddr-huge.jsonl",
            edit(&single, "\"maxphyaddr\": 40", "\"maxphyaddr\": 99999").into_bytes(),
            ":1:",
            "maxphyaddr",
        ),
        (
            "pa-above.jsonl",
            edit(&single, &first_pa, "\"pa\": \"0x7ffffffffff8\"").into_bytes(),
            ":1:",
            "MAXPHYADDR",
        ),
        (
            "pa-huge.jsonl",
            edit(&single, &first_pa, "\"pa\": \"0xfffffffffffffff8\"").into_bytes(),
            ":1:",
            "MAXPHYADDR",
        ),
        ("pa-unaligned.jsonl", edit(&single, &first_pa, "\"pa\": \"0x1003\"").into_bytes(), ":1:", "aligned"),
        (
            "pkru.jsonl",
            edit(&single, "\"pkru\": \"0x", "\"pkru\": \"0x1ffffffff").into_bytes(),
            ":1:",
            "pkru",
        ),
        (
            "then-bad.jsonl",
            format!("{single}\n\n{}\n", edit(&single, "\"cpl\": 0", "\"cpl\": true")).into_bytes(),
            ":3:",
            "cpl",
        ),
        ("steps-type.jsonl", format!("{steps}\n{}\n", edit(&steps, "\"steps\": [", "\"steps\": 5, \"x\": [")).into_bytes(), ":2:", "steps"),
        (
            "steps-op.jsonl",
            edit(&steps, "\"steps\": [", "\"steps\": [{\"op\": \"reboot\"}, ").into_bytes(),
            ":1:",
            "reboot",
        ),
        (
            "steps-store.jsonl",
            edit(&steps, "\"steps\": [", "\"steps\": [{\"op\": \"store\", \"va\": \"0x0\", \"value\": \"0x0\", \"size\": 3}, ").into_bytes(),
            ":1:",
            "size 3",
        ),
        (
            "steps-invpcid.jsonl",
            edit(&steps, "\"steps\": [", "\"steps\": [{\"op\": \"invpcid\", \"type\": 9, \"pcid\": 0, \"va\": \"0x0\"}, ").into_bytes(),
            ":1:",
            "INVPCID",
        ),
        (
            "steps-pcid.jsonl",
            edit(&steps, "\"steps\": [", "\"steps\": [{\"op\": \"invpcid\", \"type\": 0, \"pcid\": 70000, \"va\": \"0x0\"}, ").into_bytes(),
            ":1:",
            "pcid",
        ),
        (
            "steps-cpl.jsonl",
            edit(&steps, "\"steps\": [", "\"steps\": [{\"op\": \"access\", \"cpl\": 9, \"rflags_ac\": false, \"access\": \"read\", \"va\": \"0x0\", \"expect\": {\"fault\": true, \"error_code\": 0, \"pa\": null}}, ").into_bytes(),
            ":1:",
            "cpl",
        ),
    ];
    let mut cases = common_file_cases(&["conform"], "conform");
    for (name, content, line, reason) in bad {
        let path = file(name, content);
        let at = format!("{path}{line}");
        for mmu in ["walker", "tdp"] {
            cases.push(case(&["conform", "--mmu", mmu, &path], &[&at, reason]));
        }
    }
    // A good file then a bad one: nothing replayed, the bad one named.
    let bad_path = scratch().join("then-bad.jsonl").to_str().expect("UTF-8").to_string();
    cases.push(case(
        &["conform", &format!("{CORPUS}/public-pae.jsonl"), &bad_path],
        &[&format!("{bad_path}:3:")],
    ));
    check_all("conform files", &cases);
}

#[test]
fn workload_files() {
    let bad: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("empty.toml", vec![], ":1:", "empty"),
        ("comments.toml", b"# nothing here\n\n".to_vec(), ":1:", "empty"),
        (
            "notutf8.toml",
            b"name = \"x\"\nops = \"\xff\"\n".to_vec(),
            ":2:",
            "UTF-8",
        ),
        ("truncated.toml", b"name = \"x\"\nops = ".to_vec(), ":2:", ""),
        (
            "truncated-string.toml",
            b"name = \"x\"\ndescription = \"abc".to_vec(),
            ":2:",
            "",
        ),
        ("truncated-table.toml", b"name = \"x\"\n[mix".to_vec(), ":2:", ""),
        ("ops-type.toml", b"name = \"x\"\nops = \"many\"\n".to_vec(), ":2:", ""),
        ("huge-type.toml", b"huge = \"yes\"\n".to_vec(), ":1:", ""),
        ("pattern-type.toml", b"pattern = 3\n".to_vec(), ":1:", ""),
        ("mix-type.toml", b"mix = 5\n".to_vec(), ":1:", ""),
        ("spread-type.toml", b"spread = 1\n".to_vec(), ":1:", ""),
        ("unknown.toml", b"name = \"x\"\nopz = 3\n".to_vec(), ":2:", "opz"),
        (
            "unknown-mix.toml",
            b"[mix]\ntouch = 1\njump = 1\n".to_vec(),
            ":3:",
            "jump",
        ),
        ("pattern.toml", b"pattern = \"spiral\"\n".to_vec(), ":1:", "spiral"),
        ("ops-neg.toml", b"ops = -1\n".to_vec(), ":1:", ""),
        ("ops-zero.toml", b"name = \"x\"\nops = 0\n".to_vec(), ":2:", "ops"),
        ("ops-huge.toml", b"ops = 1099511627777\n".to_vec(), ":1:", "ops"),
        (
            "ops-overflow.toml",
            b"ops = 99999999999999999999999\n".to_vec(),
            ":1:",
            "",
        ),
        ("processes-u32.toml", b"processes = 4294967296\n".to_vec(), ":1:", ""),
        ("processes.toml", b"processes = 0\n".to_vec(), ":1:", "processes"),
        ("threads.toml", b"threads = 65\n".to_vec(), ":1:", "threads"),
        (
            "mapping-pages.toml",
            b"mapping_pages = 0\n".to_vec(),
            ":1:",
            "mapping_pages",
        ),
        ("touches.toml", b"touches = 0\n".to_vec(), ":1:", "touches"),
        (
            "ratio.toml",
            b"name = \"x\"\nwrite_ratio = 1.5\n".to_vec(),
            ":2:",
            "write_ratio",
        ),
        ("huge-neg.toml", b"huge = -0.1\n".to_vec(), ":1:", "huge"),
        ("huge-nan.toml", b"huge = nan\n".to_vec(), ":1:", "huge"),
        ("zipf.toml", b"zipf_theta = 0.0\n".to_vec(), ":1:", "zipf_theta"),
        ("zipf-inf.toml", b"zipf_theta = inf\n".to_vec(), ":1:", "zipf_theta"),
        ("mix-zero.toml", b"[mix]\ntouch = 0\n".to_vec(), ":1:", "mix"),
        (
            "mix-no-touch.toml",
            b"[mix]\ntouch = 0\nmmap = 3\n".to_vec(),
            ":1:",
            "touch",
        ),
        (
            "then-bad.toml",
            b"name = \"x\"\nops = 10\nthreads = 0\n".to_vec(),
            ":3:",
            "threads",
        ),
        (
            "vm-unknown.toml",
            b"[vm]\ndirty_rings = 4\n".to_vec(),
            ":2:",
            "dirty_rings",
        ),
        ("vm-type.toml", b"[vm]\npml = \"on\"\n".to_vec(), ":2:", ""),
        (
            "vm-page-size.toml",
            b"[vm]\nmax_page_size = \"3M\"\n".to_vec(),
            ":2:",
            "3M",
        ),
        (
            "vm-pml.toml",
            b"ops = 5\n[vm]\nept_ad = false\npml = true\n".to_vec(),
            ":4:",
            "vm.pml",
        ),
        (
            "vm-ring.toml",
            b"[vm]\ndirty_ring = 1000\n".to_vec(),
            ":2:",
            "vm.dirty_ring",
        ),
        (
            "vm-init.toml",
            b"[vm]\ninitially_set = true\n".to_vec(),
            ":2:",
            "vm.initially_set",
        ),
        (
            "vm-pages.toml",
            b"[vm]\nmmu_pages = 1\n".to_vec(),
            ":2:",
            "vm.mmu_pages",
        ),
        (
            "legacy-mmu-pages.toml",
            b"name = \"x\"\nmmu_pages = 256\n".to_vec(),
            ":2:",
            "mmu_pages",
        ),
    ];
    let mut cases = common_file_cases(&["run", "--workload"], "workload");
    for (name, content, line, reason) in bad {
        let path = file(name, content);
        let at = format!("{path}{line}");
        cases.push(case(&["run", "--workload", &path], &[&at, reason]));
    }
    check_all("workload files", &cases);
}

/// A good trace, recorded once by a short run.
fn good_trace() -> &'static str {
    static TRACE: OnceLock<String> = OnceLock::new();
    TRACE.get_or_init(|| {
        let path = scratch().join("good.trace").to_str().expect("UTF-8").to_string();
        let args: Vec<String> = [
            "run", "--mmu", "tdp", "--vcpus", "2", "--memory", "16M", "--ops", "20", "--record", &path,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (code, _, err) = vmmu(&args).expect("record a trace");
        assert_eq!(code, Some(0), "recording a trace: {err}");
        path
    })
}

#[test]
fn trace_files() {
    let good = std::fs::read_to_string(good_trace()).expect("the recorded trace");
    let lines: Vec<&str> = good.lines().collect();
    let ops_at = lines.iter().position(|l| *l == "--- ops").expect("an ops line") + 1;
    let n = lines.len();
    let line_of = |key: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in the trace"))
            + 1
    };
    let set = |key: &str, value: &str| {
        let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        out[line_of(key) - 1] = format!("{key} = {value}");
        out.join("\n") + "\n"
    };
    let append = |extra: &str| format!("{good}{extra}");
    let at = |line: usize| format!(":{line}:");
    let bad: Vec<(&str, Vec<u8>, String, &str)> = vec![
        ("empty.trace", vec![], at(1), "not a vmmu trace"),
        ("magic.trace", b"# vmmu trace v9\n".to_vec(), at(1), "not a vmmu trace"),
        ("json.trace", b"{\"ops\": []}\n".to_vec(), at(1), "not a vmmu trace"),
        (
            "notutf8.trace",
            [good.as_bytes(), b"21 v0 touch \xff\n"].concat(),
            at(n + 1),
            "UTF-8",
        ),
        (
            "no-ops.trace",
            lines[..ops_at - 1].join("\n").into_bytes(),
            String::new(),
            "truncated",
        ),
        ("mid-line.trace", append("21 v0 tou").into_bytes(), at(n + 1), ""),
        (
            "short-op.trace",
            append("21 v0 touch\n").into_bytes(),
            at(n + 1),
            "SEQ ACTOR KIND SEED",
        ),
        (
            "op-kind.trace",
            append("21 v0 jump 1\n").into_bytes(),
            at(n + 1),
            "jump",
        ),
        (
            "op-actor.trace",
            append("21 v9 touch 1\n").into_bytes(),
            at(n + 1),
            "v9",
        ),
        (
            "op-owner.trace",
            append("21 host touch 1\n").into_bytes(),
            at(n + 1),
            "touch",
        ),
        (
            "op-seed.trace",
            append("21 v0 touch 18446744073709551616\n").into_bytes(),
            at(n + 1),
            "seed",
        ),
        (
            "op-seq.trace",
            append("-1 v0 touch 1\n").into_bytes(),
            at(n + 1),
            "sequence",
        ),
        (
            "then-bad.trace",
            append("21 v0 touch 1\n22 v1 touch 2\nbad line here\n").into_bytes(),
            at(n + 3),
            "",
        ),
        (
            "vcpus-type.trace",
            set("vcpus", "\"two\"").into_bytes(),
            at(line_of("vcpus")),
            "",
        ),
        (
            "vcpus-zero.trace",
            set("vcpus", "0").into_bytes(),
            at(line_of("vcpus")),
            "vcpus",
        ),
        (
            "vcpus-huge.trace",
            set("vcpus", "100000").into_bytes(),
            at(line_of("vcpus")),
            "vcpus",
        ),
        (
            "vcpus-neg.trace",
            set("vcpus", "-1").into_bytes(),
            at(line_of("vcpus")),
            "",
        ),
        (
            "memory-small.trace",
            set("memory", "3").into_bytes(),
            at(line_of("memory")),
            "memory",
        ),
        (
            "memory-odd.trace",
            set("memory", "16777217").into_bytes(),
            at(line_of("memory")),
            "memory",
        ),
        (
            "memory-big.trace",
            set("memory", "18253611008").into_bytes(),
            at(line_of("memory")),
            "memory",
        ),
        (
            "memory-overflow.trace",
            set("memory", "99999999999999999999999").into_bytes(),
            at(line_of("memory")),
            "",
        ),
        (
            "memory-float.trace",
            set("memory", "1.5e9").into_bytes(),
            at(line_of("memory")),
            "",
        ),
        (
            "paging.trace",
            set("paging", "\"flat\"").into_bytes(),
            at(line_of("paging")),
            "flat",
        ),
        (
            "paging-ram.trace",
            set("paging", "\"32-bit\"")
                .replace("memory = 16777216", "memory = 2147483648")
                .into_bytes(),
            at(line_of("memory")),
            "32-bit",
        ),
        (
            "seed-type.trace",
            set("seed", "\"x\"").into_bytes(),
            at(line_of("seed")),
            "",
        ),
        (
            "churn-type.trace",
            set("host_churn", "3").into_bytes(),
            at(line_of("host_churn")),
            "",
        ),
        (
            "unknown-key.trace",
            good.replacen("seed = ", "colour = 1\nseed = ", 1).into_bytes(),
            at(line_of("seed")),
            "colour",
        ),
        (
            "touches.trace",
            set("touches", "0").into_bytes(),
            at(line_of("touches")),
            "touches",
        ),
    ];
    let mut cases = common_file_cases(&["replay"], "trace");
    for (name, content, line, reason) in bad {
        let path = file(name, content);
        let at = format!("{path}{line}");
        cases.push(case(&["replay", &path], &[&at, reason]));
    }
    let t = good_trace();
    cases.extend(flag_cases(&["replay", t], "--mmu", &[EMPTY, "ept"], "--mmu"));
    cases.extend(flag_cases(&["replay", t], "--check", &[EMPTY, "some"], "--check"));
    cases.extend([
        case(&["replay", t, t], &["unexpected argument"]),
        case(&["replay", t, "--json=1"], &["--json"]),
        case(&["replay", ""], &["<FILE>"]),
    ]);
    check_all("trace files", &cases);
}

#[test]
fn help_exits_0_for_every_command() {
    for cmd in COMMANDS {
        let (code, out, _) = vmmu(&[cmd.to_string(), "--help".to_string()]).expect("vmmu --help");
        assert_eq!(code, Some(0), "{cmd} --help");
        assert!(out.contains("Usage"), "{cmd} --help: {out}");
    }
}
