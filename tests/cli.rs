//! The command line contract: exit codes, last lines, JSON, bad input.

use std::io::Write;
use std::process::{Command, Output};

fn vmmu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(args)
        .output()
        .expect("run vmmu")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/conformance");

fn temp_file(name: &str, content: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmmu-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(content.as_bytes())
        .unwrap();
    path
}

fn first_lines(file: &str, n: usize) -> String {
    let text = std::fs::read_to_string(format!("{CORPUS}/{file}")).unwrap();
    text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n"
}

#[test]
fn conform_passes_and_ends_with_the_count() {
    let o = vmmu(&[
        "conform",
        &format!("{CORPUS}/public-pae.jsonl"),
        &format!("{CORPUS}/public-steps-tlb-lm5.jsonl"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().last(), Some("1267 passed, 0 failed"));
}

#[test]
fn conform_json_has_the_contract_fields() {
    let o = vmmu(&[
        "conform",
        "--json",
        "--mmu",
        "walker",
        &format!("{CORPUS}/public-ia32.jsonl"),
    ]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON object");
    assert_eq!(v["passed"], 1000);
    assert_eq!(v["failed"], 0);
    assert_eq!(v["mmu"], "walker");
    assert!(v["failures"].as_array().unwrap().is_empty());
}

#[test]
fn conform_reports_a_failing_case_with_exit_1() {
    let good = first_lines("public-lm4.jsonl", 3);
    let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
    let mut case: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    case["result"]["error_code"] = serde_json::json!(case["result"]["error_code"].as_u64().unwrap_or(0) ^ 2);
    case["result"]["fault"] = serde_json::json!(true);
    case["result"]["pa"] = serde_json::Value::Null;
    lines[1] = case.to_string();
    let path = temp_file("one-bad.jsonl", &(lines.join("\n") + "\n"));
    let o = vmmu(&["conform", "--max-failures", "1", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains(&format!("id {}", case["id"])), "{out}");
    assert_eq!(out.lines().last(), Some("2 passed, 1 failed"));
}

#[test]
fn malformed_files_exit_2_naming_file_line_and_reason() {
    let good = first_lines("public-lm4.jsonl", 2);
    let cases = [
        (
            "truncated.jsonl",
            format!("{good}{{\"id\": 9, \"mode\": \"lm4\""),
            "line 3",
            "invalid JSON",
        ),
        (
            "wrongtype.jsonl",
            good.replacen("\"cpl\": 0", "\"cpl\": \"zero\"", 1),
            "line 1",
            "cpl",
        ),
        ("badmode.jsonl", good.replacen("\"lm4\"", "\"lm6\"", 1), "line 1", "lm6"),
        ("badhex.jsonl", good.replacen("\"0x", "\"1x", 1), "line 1", "hex"),
        (
            "huge.jsonl",
            good.replacen("\"maxphyaddr\": 40", "\"maxphyaddr\": 99999", 1),
            "line 1",
            "maxphyaddr",
        ),
        ("array.jsonl", "[]\n".to_string(), "line 1", "object"),
    ];
    for (name, content, line, reason) in cases {
        let path = temp_file(name, &content);
        let o = vmmu(&["conform", path.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{name}: {}", stderr(&o));
        let err = stderr(&o);
        let line_tag = format!("{}:{}", name, &line[5..]);
        assert!(err.contains(&line_tag), "{name}: {err}");
        assert!(err.contains(reason), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(stdout(&o).is_empty(), "nothing replayed from a malformed input");
    }
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        vec!["conform"],
        vec!["conform", "/nonexistent/cases.jsonl"],
        vec!["conform", "--mmu", "nonsense", "x.jsonl"],
        vec!["conform", "--max-failures", "-3", "x.jsonl"],
        vec!["bench", "nosuchbench"],
        vec!["bench", "walk", "-i", "0"],
        vec!["frobnicate"],
    ] {
        let o = vmmu(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty(), "{args:?} explains itself");
        assert!(!stderr(&o).contains("panicked"));
    }
    let o = vmmu(&["conform", "/nonexistent/cases.jsonl"]);
    assert!(stderr(&o).contains("/nonexistent/cases.jsonl"));
}

#[test]
fn help_exits_0() {
    for args in [vec!["--help"], vec!["conform", "--help"], vec!["bench", "--help"]] {
        assert_eq!(vmmu(&args).status.code(), Some(0), "{args:?}");
    }
}

#[test]
fn bench_walk_json() {
    let o = vmmu(&["bench", "walk", "-i", "20000", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    for key in [
        "bench",
        "mmu",
        "vcpus",
        "pages",
        "seconds",
        "per_op_ns",
        "reference_ns",
        "ratio",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["bench"], "walk");
}

#[test]
fn stress_runs_and_ends_with_the_check_line() {
    let o = vmmu(&["stress", "--seconds", "0.5", "--memory", "4M"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().last(), Some("check: 0 violations"));
    let o = vmmu(&["stress", "--seconds", "0.3", "--memory", "4M", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["violations"], 0);
    assert!(v["stats"]["pf_taken"].as_i64().unwrap() > 0);
}

#[test]
fn stress_bad_input_exits_2() {
    for args in [
        vec!["stress", "--seconds", "-1"],
        vec!["stress", "--seconds", "nan"],
        vec!["stress", "--memory", "3M"],
        vec!["stress", "--memory", "lots"],
        vec!["stress", "--memory", "99999999999G"],
        vec!["stress", "--vcpus", "0"],
    ] {
        let o = vmmu(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{args:?}");
    }
}

#[test]
fn migrate_runs_the_matrix_and_ends_with_the_check_line() {
    let o = vmmu(&["migrate", "--mmu", "tdp", "--seeds", "1", "--ops", "1500"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().last(), Some("check: 0 violations"), "{out}");
    // One row per TDP configuration, each migrating and comparing.
    for name in [
        "wp/ad",
        "wp+manual+init/noad",
        "dbit+manual/ad",
        "ring4096/noad",
        "ring128/ad",
        "wp/npt",
        "wp+manual+init/npt",
        "ring128/npt",
    ] {
        let row = out
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no row {name}: {out}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols.last(), Some(&"0"), "{row}");
    }
    assert!(out.contains("18 configurations, 18 runs"), "{out}");
    // One configuration, replayed by name, in JSON: the same figures.
    let o = vmmu(&[
        "migrate",
        "--mmu",
        "tdp",
        "--log",
        "ring128/ad",
        "--seeds",
        "1",
        "--ops",
        "1500",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["configurations"], 1);
    assert_eq!(v["pages_lost"], 0);
    let t = &v["rows"][0]["tally"];
    assert_eq!(v["rows"][0]["name"], "ring128/ad");
    assert!(t["migrations"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(
        t["pages_compared"].as_u64().unwrap(),
        t["migrations"].as_u64().unwrap() * 2048
    );
}

#[test]
fn soak_runs_random_configurations_and_ends_with_the_check_line() {
    let o = vmmu(&[
        "soak",
        "--seconds",
        "4",
        "--run-seconds",
        "2",
        "--memory",
        "32M",
        "--first-seed",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().last(), Some("check: 0 violations"), "{out}");
    for mmu in ["shadow", "tdp"] {
        let row = out
            .lines()
            .find(|l| l.starts_with(mmu) && l.contains("all runs"))
            .unwrap_or_else(|| panic!("no {mmu} row: {out}"));
        let cols: Vec<u64> = row.split_whitespace().skip(3).map(|c| c.parse().unwrap()).collect();
        // runs, seconds, accesses, operations, host ops, migrations, pages
        // compared, violations
        assert!(cols[0] >= 1 && cols[2] > 0 && cols[3] > 0, "{row}");
        assert_eq!(cols[7], 0, "{row}");
    }
    assert!(
        out.contains("dirty log") && out.contains("paging") && out.contains("workload"),
        "{out}"
    );
    let o = vmmu(&[
        "soak",
        "--mmu",
        "tdp",
        "--seconds",
        "2",
        "--run-seconds",
        "2",
        "--memory",
        "32M",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["violations"], 0);
    assert_eq!(v["mmus"][0]["mmu"], "tdp");
    assert_eq!(v["mmus"][0]["totals"]["runs"], 1);
}

/// Runs a benchmark with `--json`: exit 0, one line, one object with every
/// field of the CLI contract.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let o = vmmu(args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    for key in [
        "bench",
        "mmu",
        "vcpus",
        "pages",
        "seconds",
        "per_op_ns",
        "reference_ns",
        "ratio",
        "phases",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    v
}

/// The phases of a benchmark's JSON report, by name.
fn phase_names(v: &serde_json::Value) -> Vec<&str> {
    v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect()
}

#[test]
fn bench_populate_json_has_the_contract_fields() {
    let v = bench_json(&["bench", "populate", "-b", "4M", "-i", "1", "--json"]);
    assert_eq!(v["bench"], "populate");
    assert_eq!(v["mmu"], "tdp");
    assert_eq!(v["vcpus"], 1);
    assert_eq!(v["pages"], 1024, "4M of 4K pages");
    assert!(v["per_op_ns"].as_f64().unwrap() > 0.0);
    let phases = phase_names(&v);
    assert_eq!(
        phases,
        ["page_fault", "vcpu", "page_fault/store", "pre_fault", "2-vcpus"]
    );
}

#[test]
fn bench_dirty_log_json_one_line_per_bench() {
    let o = vmmu(&["bench", "dirty-log", "-v", "2", "-b", "2M", "-i", "1", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["bench"], "dirty-log");
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["pages"], 1024);
    assert_eq!(v["phases"][0]["phase"], "get");
}

#[test]
fn bench_bad_sizes_and_backings_exit_2_naming_the_problem() {
    for (args, needle) in [
        (vec!["bench", "populate", "-b", "lots"], "lots"),
        (vec!["bench", "populate", "-b", "3X"], "3X"),
        (vec!["bench", "populate", "-b", "0"], "--bytes-per-vcpu 0"),
        (vec!["bench", "populate", "-b", "6K"], "--bytes-per-vcpu 6K"),
        (
            vec!["bench", "populate", "-b", "3M", "-s", "thp"],
            "--bytes-per-vcpu 3M",
        ),
        (vec!["bench", "dirty-log", "-b", "512M", "-s", "hugetlb-1g"], "1G"),
        (vec!["bench", "populate", "-b", "99999999999G"], "too large"),
        (vec!["bench", "populate", "-v", "4", "-b", "8G"], "32G"),
        (vec!["bench", "populate", "-s", "hugetlb-4m"], "hugetlb-4m"),
        (vec!["bench", "populate", "--mmu", "ept"], "ept"),
        (vec!["bench", "populate", "-v", "0"], "0"),
        (vec!["bench", "all", "-b", "6K"], "--bytes-per-vcpu 6K"),
    ] {
        let o = vmmu(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(stdout(&o).is_empty(), "{args:?}: nothing measured");
    }
}

#[test]
fn bench_mmu_mismatches_exit_2_and_print_no_numbers() {
    for (args, needle) in [
        (vec!["bench", "cr3-switch", "--mmu", "tdp"], "prev_roots"),
        (
            vec!["bench", "dirty-log", "--mmu", "shadow"],
            "only populate, cr3-switch",
        ),
        (
            vec!["bench", "populate", "--mmu", "shadow", "-s", "thp"],
            "maps 4K pages only",
        ),
    ] {
        let o = vmmu(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?}");
    }
}

#[test]
fn bench_populate_shadow_json() {
    let v = bench_json(&["bench", "populate", "--mmu", "shadow", "-b", "4M", "-i", "1", "--json"]);
    assert_eq!(v["bench"], "populate");
    assert_eq!(v["mmu"], "shadow");
    assert_eq!(v["pages"], 1024);
    assert!(v["ratio"].as_f64().is_some_and(|r| r.is_finite() && r > 1.0), "{v}");
}

#[test]
fn bench_tlb_miss_counts_the_references_of_each_walk() {
    let v = bench_json(&["bench", "tlb-miss", "-i", "2", "--json"]);
    assert_eq!(v["bench"], "tlb-miss");
    assert_eq!(v["mmu"], "both");
    let phases = phase_names(&v);
    assert_eq!(phases, ["tdp (2-D walk)", "shadow (1-D walk)"]);
    let refs: Vec<f64> = v["figures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["value"].as_f64().unwrap())
        .collect();
    assert_eq!(refs, [24.0, 4.0], "a 4-level 2-D walk and a 4-level 1-D walk");
}

#[test]
fn bench_tlb_hit_json_measures_both_mmus() {
    let v = bench_json(&["bench", "tlb-hit", "-i", "2000", "--json"]);
    assert_eq!(v["bench"], "tlb-hit");
    assert_eq!(v["mmu"], "both");
    let phases = phase_names(&v);
    assert_eq!(
        phases,
        [
            "tdp session",
            "tdp entry per access",
            "shadow session",
            "shadow entry per access"
        ]
    );
    assert!(v["ratio"].as_f64().is_some_and(|r| r.is_finite() && r > 0.0), "{v}");
}

#[test]
fn bench_wp_emulate_json() {
    let v = bench_json(&["bench", "wp-emulate", "-i", "500", "--json"]);
    assert_eq!(v["bench"], "wp-emulate");
    assert_eq!(v["mmu"], "shadow");
    assert!(v["ratio"].as_f64().is_some_and(|r| r.is_finite() && r > 1.0), "{v}");
}

#[test]
fn bench_cr3_switch_json_hits_beat_misses() {
    let v = bench_json(&["bench", "cr3-switch", "-i", "2000", "--json"]);
    assert_eq!(v["bench"], "cr3-switch");
    assert_eq!(v["mmu"], "shadow");
    let phases = phase_names(&v);
    assert_eq!(phases, ["hit", "miss", "rebuild"]);
    let ratio = v["ratio"].as_f64().unwrap();
    assert!(ratio.is_finite() && ratio > 0.0, "{v}");
}

#[test]
fn bench_access_tracking_json_both_ad_modes_against_the_reference() {
    let v = bench_json(&["bench", "access-tracking", "-b", "8M", "-i", "1", "--json"]);
    assert_eq!(v["bench"], "access-tracking");
    assert_eq!(v["mmu"], "tdp");
    assert_eq!(v["vcpus"], 1);
    assert_eq!(v["pages"], 2048, "8M of 4K pages");
    assert_eq!(v["backing"], "anon");
    let sane = |x: &serde_json::Value, what: &str| {
        let x = x.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"));
        assert!(x.is_finite() && x > 0.0, "{what} = {x}: {v}");
        x
    };
    let per_op = sane(&v["per_op_ns"], "per_op_ns");
    let reference = sane(&v["reference_ns"], "reference_ns");
    let ratio = sane(&v["ratio"], "ratio");
    assert!((ratio - per_op / reference).abs() < 1e-9 * ratio, "{v}");
    // Aging does more than the bare scan, within reason (an unoptimised
    // build, a busy machine).
    assert!(ratio > 0.5 && ratio < 1000.0, "age / reference = {ratio}: {v}");
    let phases = v["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["phase"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "ad-on/age",
            "ad-on/access",
            "ad-on/test_young",
            "ad-on/age-per-page",
            "ad-off/age",
            "ad-off/access",
            "ad-off/test_young",
            "ad-off/age-per-page",
        ]
    );
    for p in phases {
        let name = p["phase"].as_str().unwrap();
        let r = sane(&p["ratio"], name);
        sane(&p["per_op_ns"], name);
        sane(&p["reference_ns"], name);
        assert!(r < 10_000.0, "{name}: ratio {r}: {v}");
    }
    assert_eq!(phases[0]["per_op_ns"], v["per_op_ns"], "the headline is ad-on/age");
    let exits = |mode: &str| {
        v["figures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == format!("EPT exits re-accessing aged memory, {mode}"))
            .unwrap_or_else(|| panic!("no exit figure for {mode}: {v}"))["value"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(exits("A/D on"), 0.0, "the walker sets A without exits");
    assert_eq!(exits("A/D off"), 1.0, "one fast-path fix per access-tracked SPTE");
}

#[test]
fn run_with_no_flags_runs_both_mmus_and_ends_with_the_check_line() {
    // The default run, as a newcomer types it (the debug build takes a
    // few tens of seconds).
    let o = vmmu(&["run"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert_eq!(out.lines().last(), Some("check: 0 violations"), "{out}");
    let header = out.lines().nth(1).unwrap_or_default();
    assert!(header.contains("shadow") && header.contains("tdp"), "{out}");
    for row in [
        "pf_taken",
        "mmu_unsync",
        "prev_roots hit rate",
        "migration rounds",
        "notifier events",
    ] {
        assert!(out.contains(row), "no {row} row: {out}");
    }
}

#[test]
fn run_config_random_prints_its_configuration_first_and_repeats_it() {
    let args = [
        "run", "--mmu", "tdp", "--ops", "300", "--memory", "32M", "--config", "random", "--seed", "5",
    ];
    let o = vmmu(&args);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    let line = err
        .lines()
        .find(|l| l.starts_with("configuration: --paging "))
        .unwrap_or_else(|| panic!("no configuration line: {err}"));
    assert!(
        line.contains("--dirty-ring ") && line.contains("--nx-huge-pages "),
        "{line}"
    );
    assert_eq!(stdout(&o).lines().last(), Some("check: 0 violations"));
    // The same seed draws the same configuration, and its flags run it.
    assert!(stderr(&vmmu(&args)).contains(line), "not repeatable");
    let mut again: Vec<&str> = vec!["run", "--mmu", "tdp", "--ops", "300", "--memory", "32M", "--seed", "5"];
    again.extend(line.trim_start_matches("configuration: ").split(' '));
    let o = vmmu(&again);
    assert_eq!(o.status.code(), Some(0), "{:?}: {}", again, stderr(&o));
    // Different seeds draw different configurations.
    let others: std::collections::BTreeSet<String> = (1..=6)
        .map(|seed| {
            let seed = seed.to_string();
            let o = vmmu(&[
                "run", "--mmu", "shadow", "--ops", "50", "--memory", "32M", "--config", "random", "--seed", &seed,
            ]);
            assert_eq!(o.status.code(), Some(0), "seed {seed}: {}{}", stdout(&o), stderr(&o));
            stderr(&o)
                .lines()
                .find(|l| l.starts_with("configuration:"))
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(others.len() > 3, "{others:?}");
}

#[test]
fn run_json_has_the_contract_fields_per_mmu() {
    let o = vmmu(&["run", "--ops", "300", "--memory", "32M", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("one JSON value");
    let runs = v.as_array().expect("an array with --mmu both");
    assert_eq!(runs.len(), 2);
    for (r, mmu) in runs.iter().zip(["shadow", "tdp"]) {
        assert_eq!(r["mmu"], mmu);
        assert_eq!(r["vcpus"], 4);
        assert_eq!(r["violations"], 0);
        assert!(r["accesses"].as_u64().unwrap() > 0);
        assert!(r["stats"]["pf_taken"].as_i64().unwrap() > 0);
    }
    let o = vmmu(&["run", "--mmu", "tdp", "--ops", "100", "--memory", "32M", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["mmu"], "tdp", "one object with one MMU");
}

#[test]
fn run_records_a_trace_that_replays_under_either_mmu_and_writes_a_report_dir() {
    let trace = temp_file("run.trace", "");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmmu-cli-report-{}", std::process::id()));
    let o = vmmu(&[
        "run",
        "--mmu",
        "shadow",
        "--vcpus",
        "2",
        "--ops",
        "200",
        "--memory",
        "32M",
        "--workload",
        "fork-storm",
        "--record",
        trace.to_str().unwrap(),
        "--report",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for f in [
        "report.txt",
        "report.json",
        "fault-rate.svg",
        "mmu-memory.svg",
        "fault-latency.svg",
    ] {
        assert!(dir.join(f).exists(), "no {f}");
    }
    let o = vmmu(&["replay", trace.to_str().unwrap()]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert_eq!(out.lines().last(), Some("check: 0 violations"));
}

/// `--policy` runs a seed's decision another way: the report's
/// configuration line names it, the trace keeps it, and the replay runs
/// under it.
#[test]
fn run_under_policies_records_them_for_the_replay() {
    let trace = temp_file("policy.trace", "");
    let o = vmmu(&[
        "run",
        "--mmu",
        "tdp",
        "--vcpus",
        "2",
        "--ops",
        "300",
        "--memory",
        "32M",
        "--policy",
        "zap-request=reload-all",
        "--policy",
        "huge-recovery=zap-collapsible",
        "--record",
        trace.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(
        out.contains("--policy zap-request=reload-all --policy huge-recovery=zap-collapsible"),
        "{out}"
    );
    let text = std::fs::read_to_string(&trace).unwrap();
    assert!(text.contains("zap-request=reload-all"), "{text}");
    let o = vmmu(&["replay", trace.to_str().unwrap(), "--mmu", "tdp"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("--policy zap-request=reload-all"), "{out}");
    // A policy the trace names wrong is the trace's error, named.
    let bad = temp_file(
        "policy-bad.trace",
        &text.replace("zap-request=reload-all", "zap-request=never"),
    );
    let o = vmmu(&["replay", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("zap-request=never"), "{}", stderr(&o));
}

#[test]
fn run_and_replay_bad_input_exits_2_naming_the_problem() {
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--workload".into(), "no-such-workload".into()],
            "not a named workload",
        ),
        (vec!["--paging".into(), "64-bit".into()], "not a paging mode"),
        (vec!["--vcpus".into(), "0".into()], "--vcpus"),
        (vec!["--memory".into(), "3M".into()], "--memory"),
        (vec!["--memory".into(), "lots".into()], "not a size"),
        (
            vec!["--paging".into(), "32-bit".into(), "--memory".into(), "2G".into()],
            "32-bit",
        ),
        (vec!["--seconds=-1".into()], "--seconds"),
        (vec!["--seconds".into(), "nan".into()], "--seconds"),
        (vec!["--ops".into(), "0".into()], "--ops"),
        (
            vec!["--ops".into(), "5".into(), "--seconds".into(), "1".into()],
            "cannot be used with",
        ),
        (vec!["--check".into(), "some".into()], "--check"),
        (vec!["--mmu".into(), "ept".into()], "--mmu"),
    ];
    for (args, want) in cases {
        let mut a = vec!["run".to_string()];
        a.extend(args.iter().cloned());
        let o = vmmu(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    for (name, text, want) in [
        ("empty-mix.toml", "[mix]\ntouch = 0\n", "empty-mix.toml:1: mix"),
        ("bad-type.toml", "name = \"x\"\nops = \"many\"\n", "bad-type.toml:2:"),
        ("unknown.toml", "opz = 3\n", "unknown.toml:1:"),
        ("range.toml", "huge = 7\n", "range.toml:1: huge"),
    ] {
        let f = temp_file(name, text);
        let o = vmmu(&["run", "--workload", f.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{name}");
        assert!(stderr(&o).contains(want), "{name}: {}", stderr(&o));
    }
    for (name, text, want) in [
        ("empty.trace", "", "empty.trace:1: not a vmmu trace"),
        ("truncated.trace", "# vmmu trace v1\npaging = \"pae\"\n", "truncated"),
        (
            "badop.trace",
            "# vmmu trace v1\npaging = \"pae\"\nvcpus = 1\nmemory = 33554432\nseed = 1\nhost_churn = false\nmigrate = false\n\n[workload]\n--- ops\n0 v0 jump 1\n",
            "badop.trace:11: unknown operation `jump`",
        ),
        (
            "badmode.trace",
            "# vmmu trace v1\npaging = \"flat\"\nvcpus = 1\nmemory = 33554432\nseed = 1\nhost_churn = false\nmigrate = false\n\n[workload]\n--- ops\n",
            "unknown paging mode `flat`",
        ),
    ] {
        let f = temp_file(name, text);
        let o = vmmu(&["replay", f.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{name}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{name}: {}", stderr(&o));
    }
    let o = vmmu(&["replay", "/nonexistent/x.trace"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read /nonexistent/x.trace"));
}
