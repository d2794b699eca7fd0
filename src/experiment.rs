//! `vmmu experiment`: the seed threads' design decisions, each run in its
//! variants side by side ([`vmmu_sim::experiment`]), as a table, JSON, or
//! a report directory (Markdown with one SVG plot per experiment).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use vmmu_sim::experiment::{ExperimentConfig, ExperimentResult};

/// `vmmu experiment`.
#[derive(clap::Args)]
pub struct ExperimentArgs {
    /// The seed thread whose decision to run (000..004), or all.
    which: String,
    /// Seconds of simulator runs per variant.
    #[arg(long, default_value_t = 4.0, allow_hyphen_values = true, value_parser = parse_seconds)]
    seconds: f64,
    /// The seed of every run.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    seed: u64,
    /// Print one JSON array of the experiments instead of the tables.
    #[arg(long)]
    json: bool,
    /// Write the report (report.md, experiments.json, one SVG per
    /// experiment) into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(v > 0.0 && v <= 3600.0) {
        return Err(format!("--seconds must be in (0, 3600], not {s}"));
    }
    Ok(v)
}

/// Runs `vmmu experiment`: exit 0 when every safe variant was clean and
/// every unsafe one caught, 1 otherwise, 2 for bad usage.
pub fn run(args: ExperimentArgs) -> ExitCode {
    if let Some(dir) = &args.report
        && let Err(e) = crate::input::check_writable_dir(dir, "--report")
    {
        eprintln!("vmmu experiment: {e}");
        return ExitCode::from(2);
    }
    let cfg = ExperimentConfig {
        seconds: args.seconds,
        seed: args.seed,
    };
    let results = match vmmu_sim::experiment::run(&args.which, &cfg) {
        Ok(r) => r,
        Err(e) if e.starts_with("no experiment") => {
            eprintln!("vmmu experiment: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("vmmu experiment: an experiment failed to run: {e}");
            return ExitCode::from(1);
        }
    };
    let text = text(&results);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results).expect("experiment results serialize")
        );
    } else {
        print!("{text}");
    }
    if let Some(dir) = &args.report {
        match write_report(dir, &results) {
            Ok(files) if !args.json => {
                for f in files {
                    eprintln!("wrote {}", f.display());
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("vmmu experiment: writing the report into {}: {e}", dir.display());
                return ExitCode::from(2);
            }
        }
    }
    if results.iter().all(ExperimentResult::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// One experiment's variants as rows (the metrics as columns, then the
/// checker's findings), as Markdown table lines. A variant that does not
/// measure a metric (its runs do not reach the code that counts it) shows
/// a dash.
fn table_lines(r: &ExperimentResult) -> Vec<String> {
    let mut metrics: Vec<(&str, &str)> = Vec::new();
    for m in r.variants.iter().flat_map(|v| &v.metrics) {
        if !metrics.iter().any(|(n, _)| *n == m.name) {
            metrics.push((&m.name, m.unit));
        }
    }
    let names: Vec<String> = metrics.iter().map(|(n, u)| format!("{n} ({u})")).collect();
    let mut lines = vec![
        format!(
            "| variant | safe | runs | {} | violations | as it must |",
            names.join(" | ")
        ),
        format!("|---|---|---|{}---|---|", "---|".repeat(names.len())),
    ];
    for v in &r.variants {
        let cells: Vec<String> = metrics
            .iter()
            .map(|(n, _)| v.metric(n).map_or("-".to_string(), |x| format!("{x:.1}")))
            .collect();
        lines.push(format!(
            "| {} | {} | {} | {} | {} | {} |",
            v.name,
            if v.safe { "yes" } else { "no" },
            v.runs,
            cells.join(" | "),
            v.violations,
            if v.as_expected() {
                "yes"
            } else if v.safe {
                "NO: violations"
            } else {
                "NO: not caught"
            }
        ));
    }
    lines
}

/// The plain-text report: per experiment its title, table and verdict;
/// then a summary line per experiment and the final count.
fn text(results: &[ExperimentResult]) -> String {
    let mut s = String::new();
    for r in results {
        let _ = writeln!(s, "experiment {}: {}", r.seed, r.title);
        for v in &r.variants {
            let _ = writeln!(
                s,
                "  {} ({}): {}",
                v.name,
                if v.safe { "safe" } else { "unsafe" },
                v.what
            );
        }
        for l in table_lines(r) {
            let _ = writeln!(s, "{l}");
        }
        for v in &r.variants {
            for d in v.details.iter().take(3) {
                let _ = writeln!(s, "  {}: {d}", v.name);
            }
        }
        let _ = writeln!(s, "verdict: {}\n", r.verdict);
    }
    let _ = writeln!(
        s,
        "seed  experiment                                                    result"
    );
    for r in results {
        let _ = writeln!(
            s,
            "{:<5} {:<61} {}",
            r.seed,
            r.title.chars().take(61).collect::<String>(),
            if r.passed() { "ok" } else { "FAILED" }
        );
    }
    let passed = results.iter().filter(|r| r.passed()).count();
    let _ = writeln!(s, "experiments: {passed} passed, {} failed", results.len() - passed);
    s
}

/// Writes `report.md` (a section per experiment: the question, the
/// variants, the table, the plot, the verdict), `experiments.json` and
/// `experiment-NNN.svg` into `dir`.
fn write_report(dir: &std::path::Path, results: &[ExperimentResult]) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    let mut md = String::from("# vmmu experiments: the seed threads' decisions, measured\n\n");
    for r in results {
        let svg_name = format!("experiment-{}.svg", r.seed);
        // The variants that measure the plotted metric (the others' runs do
        // not reach what it counts).
        let plotted: Vec<_> = r
            .variants
            .iter()
            .filter(|v| v.metric(r.plot_metric).is_some())
            .collect();
        let values: Vec<f64> = plotted.iter().filter_map(|v| v.metric(r.plot_metric)).collect();
        let unit = r
            .variants
            .iter()
            .flat_map(|v| &v.metrics)
            .find(|m| m.name == r.plot_metric)
            .map_or("", |m| m.unit);
        let categories: Vec<String> = plotted.iter().map(|v| v.name.to_string()).collect();
        let svg = crate::report::bar_chart(
            &format!("{}: {}", r.seed, r.plot_metric),
            "variant",
            unit,
            &categories,
            &[(r.plot_metric.to_string(), values)],
        );
        let path = dir.join(&svg_name);
        std::fs::write(&path, svg)?;
        files.push(path);
        let _ = writeln!(md, "## {}: {}\n\n{}\n", r.seed, r.title, r.question);
        for v in &r.variants {
            let _ = writeln!(
                md,
                "- **{}** ({}): {}",
                v.name,
                if v.safe {
                    "safe"
                } else {
                    "unsafe: the checker must catch it"
                },
                v.what
            );
        }
        md.push('\n');
        for l in table_lines(r) {
            let _ = writeln!(md, "{l}");
        }
        let _ = writeln!(
            md,
            "\n![{}]({svg_name})\n\n**Verdict** ({}): {}\n",
            r.plot_metric,
            if r.passed() { "as it must" } else { "FAILED" },
            r.verdict
        );
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md)?;
    files.push(path);
    let path = dir.join("experiments.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(results).expect("experiment results serialize"),
    )?;
    files.push(path);
    Ok(files)
}
