//! Rendering of the simulator's run report ([`MmuRunReport`], one per MMU):
//! a plain-text table, JSON, and a report directory with SVG plots.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vmmu_sim::report::{MigrationReport, MmuRunReport};

/// Renders the reports as plain text: a header line (workload, paging mode,
/// vCPUs, memory) then one table with a row per metric and a column per MMU.
///
/// Does not print the final `check: N violations` line: that is the caller's.
pub fn table(reports: &[MmuRunReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "workload: {}  paging: {}  vCPUs: {}  memory: {}",
        distinct(reports, |r| r.workload.clone()),
        distinct(reports, |r| r.paging.clone()),
        distinct(reports, |r| r.vcpus.to_string()),
        distinct(reports, |r| human_bytes(r.memory)),
    );
    if reports.is_empty() {
        return out;
    }

    type Cell = fn(&MmuRunReport) -> String;
    let head: &[(&str, Cell)] = &[
        ("operations", |r| num(r.operations)),
        ("accesses", |r| num(r.accesses)),
        ("accesses/s", |r| rate(r.accesses_per_sec)),
        ("seconds", |r| {
            if r.seconds.is_finite() {
                format!("{:.2}", r.seconds)
            } else {
                "-".into()
            }
        }),
        ("TLB hits", |r| {
            format!(
                "{} ({})",
                num(r.tlb_hits),
                percent(r.tlb_hits as f64, r.accesses as f64)
            )
        }),
        ("hardware walks", |r| num(r.walks)),
        ("references per walk", |r| {
            if r.walks > 0 {
                format!("{:.1}", r.walk_refs as f64 / r.walks as f64)
            } else {
                "-".into()
            }
        }),
        ("exits", |r| num(r.exits)),
        ("guest #PF", |r| num(r.guest_faults)),
        ("pf_taken", |r| inum(r.stats.pf_taken)),
        ("pf_fixed", |r| inum(r.stats.pf_fixed)),
        ("pf_spurious", |r| inum(r.stats.pf_spurious)),
        ("pf_emulate", |r| inum(r.stats.pf_emulate)),
        ("pf_fast", |r| inum(r.stats.pf_fast)),
        ("pf_retry", |r| inum(r.stats.pf_retry)),
        ("shadow pages", |r| num(r.shadow_pages)),
        ("unsync pages (now)", |r| num(r.unsync_pages)),
        ("mmu_unsync", |r| inum(r.stats.mmu_unsync)),
        ("mmu_synced", |r| inum(r.stats.mmu_synced)),
        ("mmu_cache_miss", |r| inum(r.stats.mmu_cache_miss)),
        ("mmu_shadow_zapped", |r| inum(r.stats.mmu_shadow_zapped)),
        ("mmu_flooded", |r| inum(r.stats.mmu_flooded)),
        ("mmu_zapped", |r| inum(r.stats.mmu_zapped)),
        ("prev_roots hit rate", |r| {
            if r.stats.prev_roots_hit == 0 && r.stats.prev_roots_miss == 0 && r.prev_roots_hit_rate == 0.0 {
                "-".into()
            } else {
                percent(r.prev_roots_hit_rate, 1.0)
            }
        }),
        ("remote_tlb_flush", |r| inum(r.stats.remote_tlb_flush)),
        ("guest TLB flushes", |r| num(r.guest_tlb_flushes)),
        ("shootdowns", |r| num(r.shootdowns)),
        ("pages_4k", |r| inum(r.stats.pages_4k)),
        ("pages_2m", |r| inum(r.stats.pages_2m)),
        ("pages_1g", |r| inum(r.stats.pages_1g)),
        ("MMU memory (final / peak / limit)", |r| {
            format!(
                "{} / {} / {}",
                human_bytes(r.mmu_memory_bytes),
                human_bytes(r.mmu_memory_peak_bytes),
                human_bytes(r.mmu_memory_limit_bytes)
            )
        }),
        ("notifier events", |r| num(r.notifier_events)),
        ("host operations", |r| num(r.host_operations)),
        ("audits", |r| num(r.audits)),
    ];
    let migration: &[(&str, Cell)] = &[
        ("migrations", |r| mig(r, |m| num(m.migrations))),
        ("migration rounds", |r| mig(r, |m| num(m.rounds))),
        ("pages copied", |r| mig(r, |m| num(m.pages_copied))),
        ("downtime pages", |r| mig(r, |m| num(m.downtime_pages))),
        ("bytes compared", |r| mig(r, |m| human_bytes(m.bytes_compared))),
        ("mismatched pages", |r| mig(r, |m| num(m.mismatched_pages))),
    ];
    let nested: &[(&str, Cell)] = &[
        ("nested: vendor, L2 VMs × memory", |r| {
            nest(r, |n| format!("{} {} × {}", n.vendor, n.vms, human_bytes(n.vm_memory)))
        }),
        ("nested: exits to L1 / leaves mapped", |r| {
            nest(r, |n| format!("{} / {}", num(n.l1_exits), num(n.l1_mapped)))
        }),
        ("nested: leaves taken back / invalidations", |r| {
            nest(r, |n| format!("{} / {}", num(n.l1_unmapped), num(n.invalidations)))
        }),
        ("nested: L2 switches", |r| nest(r, |n| num(n.switches))),
        ("nested: prev_roots hit rate", |r| {
            nest(r, |n| {
                if n.stats.prev_roots_hit + n.stats.prev_roots_miss == 0 {
                    "-".into()
                } else {
                    percent(n.prev_roots_hit_rate, 1.0)
                }
            })
        }),
        ("nested: pf_fixed / pf_emulate", |r| {
            nest(r, |n| {
                format!("{} / {}", inum(n.stats.pf_fixed), inum(n.stats.pf_emulate))
            })
        }),
        ("nested: mmu_pte_write / mmu_unsync / mmu_synced", |r| {
            nest(r, |n| {
                format!(
                    "{} / {} / {}",
                    inum(n.stats.mmu_pte_write),
                    inum(n.stats.mmu_unsync),
                    inum(n.stats.mmu_synced)
                )
            })
        }),
        ("nested: indirect heuristic hits / tracked", |r| {
            format!(
                "{} / {}",
                inum(r.stats.indirect_heuristic_hits),
                inum(r.stats.indirect_tracked_gfns)
            )
        }),
    ];
    let tail: &[(&str, Cell)] = &[
        ("processes", |r| num(r.processes)),
        ("adversarial operations", |r| num(r.adversarial_ops)),
        ("violations", |r| num(r.violations)),
    ];
    let any_migration = reports.iter().any(|r| r.migration.is_some());
    let any_nested = reports.iter().any(|r| r.nested.is_some());
    let rows: Vec<(&str, Vec<String>)> = head
        .iter()
        .chain(migration.iter().filter(|_| any_migration))
        .chain(nested.iter().filter(|_| any_nested))
        .chain(tail)
        .map(|(name, cell)| (*name, reports.iter().map(cell).collect()))
        .collect();

    let names: Vec<String> = reports.iter().enumerate().map(|(i, r)| series_name(i, r)).collect();
    let name_width = rows.iter().map(|(n, _)| n.chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..reports.len())
        .map(|c| {
            rows.iter()
                .map(|(_, cells)| cells[c].chars().count())
                .chain([names[c].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut line = format!("{:name_width$}", "");
    for (name, w) in names.iter().zip(&widths) {
        let _ = write!(line, "  {name:>w$}");
    }
    let _ = writeln!(out, "{}", line.trim_end());
    let total = name_width + widths.iter().map(|w| w + 2).sum::<usize>();
    let _ = writeln!(out, "{}", "-".repeat(total));
    for (name, cells) in &rows {
        let mut line = format!("{name:name_width$}");
        for (cell, w) in cells.iter().zip(&widths) {
            let _ = write!(line, "  {cell:>w$}");
        }
        let _ = writeln!(out, "{line}");
    }
    let config = distinct(reports, |r| r.config.clone());
    if config != "-" {
        let _ = writeln!(out, "configuration: {config}");
    }
    out
}

/// The reports as JSON: one object when there is one report, an array
/// otherwise. Each object is the report's serialization without the bulky
/// `timeline` and `fault_latency` (those go only to [`write_dir`]'s
/// `report.json`).
pub fn json(reports: &[MmuRunReport]) -> Value {
    shape(
        reports
            .iter()
            .map(|r| {
                let mut v = full_value(r);
                if let Value::Object(map) = &mut v {
                    map.remove("timeline");
                    map.remove("fault_latency");
                }
                v
            })
            .collect(),
    )
}

/// Writes a report directory: creates `dir`, then writes `report.txt`
/// (`text`, normally [`table`]'s output plus the verdict), `report.json`
/// (the full serialization, timeline and latency histogram included;
/// shaped like [`json`]: an object for one report, an array otherwise),
/// and three SVG plots with one series per MMU: `fault-rate.svg`,
/// `mmu-memory.svg` and `fault-latency.svg`. Returns the paths written.
pub fn write_dir(dir: &Path, reports: &[MmuRunReport], text: &str) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let full = shape(reports.iter().map(full_value).collect());
    let mut json_text = serde_json::to_string_pretty(&full).map_err(io::Error::other)?;
    json_text.push('\n');
    let files = [
        ("report.txt", text.to_string()),
        ("report.json", json_text),
        ("fault-rate.svg", fault_rate_svg(reports)),
        ("mmu-memory.svg", mmu_memory_svg(reports)),
        ("fault-latency.svg", fault_latency_svg(reports)),
    ];
    let mut written = Vec::with_capacity(files.len());
    for (name, contents) in files {
        let path = dir.join(name);
        fs::write(&path, contents)?;
        written.push(path);
    }
    Ok(written)
}

/// A report's full serialization (`Null` if it cannot be encoded, which
/// serde_json's `Value` serializer never does for these types).
fn full_value(report: &MmuRunReport) -> Value {
    serde_json::to_value(report).unwrap_or(Value::Null)
}

/// One value alone, several as an array.
fn shape(mut values: Vec<Value>) -> Value {
    if values.len() == 1 {
        values.pop().unwrap_or(Value::Null)
    } else {
        Value::Array(values)
    }
}

/// The distinct values of a field over the reports, joined by ` / `
/// (`-` when there are none).
fn distinct(reports: &[MmuRunReport], f: impl Fn(&MmuRunReport) -> String) -> String {
    let mut seen: Vec<String> = Vec::new();
    for v in reports.iter().map(f) {
        if !seen.contains(&v) {
            seen.push(v);
        }
    }
    let seen: Vec<String> = seen.into_iter().filter(|v| !v.is_empty()).collect();
    if seen.is_empty() { "-".into() } else { seen.join(" / ") }
}

/// A report's column or series name: the MMU, or `mmu<i>` if unnamed.
fn series_name(i: usize, r: &MmuRunReport) -> String {
    if r.mmu.is_empty() {
        format!("mmu{i}")
    } else {
        r.mmu.clone()
    }
}

/// A migration figure, or `-` when the run had no migration.
/// A nested-run cell, or `-` for a run without `--nested`.
fn nest(r: &MmuRunReport, f: impl Fn(&vmmu_sim::report::NestedRunReport) -> String) -> String {
    r.nested.as_ref().map_or_else(|| "-".into(), f)
}

fn mig(r: &MmuRunReport, f: fn(&MigrationReport) -> String) -> String {
    r.migration.as_ref().map_or_else(|| "-".into(), f)
}

/// `1234567` as `1,234,567`.
fn num(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A signed counter with thousands separators.
fn inum(v: i64) -> String {
    if v < 0 {
        format!("-{}", num(v.unsigned_abs()))
    } else {
        num(v.unsigned_abs())
    }
}

/// `part / whole` as a percentage with one decimal, or `-`.
fn percent(part: f64, whole: f64) -> String {
    let p = 100.0 * part / whole;
    if whole > 0.0 && p.is_finite() {
        format!("{p:.1}%")
    } else {
        "-".into()
    }
}

/// A rate per second: `950 /s`, `12.3 k/s`, `12.3 M/s`, `1.2 G/s`, or `-`.
fn rate(v: f64) -> String {
    if !v.is_finite() || v < 0.0 {
        return "-".into();
    }
    match v {
        v if v >= 1e9 => format!("{:.1} G/s", v / 1e9),
        v if v >= 1e6 => format!("{:.1} M/s", v / 1e6),
        v if v >= 1e3 => format!("{:.1} k/s", v / 1e3),
        v => format!("{v:.0} /s"),
    }
}

/// Bytes in binary units: `512 B`, `64 MiB`, `1.5 GiB`.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && b >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if b.is_multiple_of(scale) {
        format!("{} {}", b / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", b as f64 / scale as f64, UNITS[unit])
    }
}

/// A latency in the shortest unit: `500ns`, `1.5µs`, `20ms`, `2s`.
fn human_ns(ns: u64) -> String {
    let (v, unit) = match ns {
        n if n < 1_000 => return format!("{n}ns"),
        n if n < 1_000_000 => (n as f64 / 1e3, "µs"),
        n if n < 1_000_000_000 => (n as f64 / 1e6, "ms"),
        n => (n as f64 / 1e9, "s"),
    };
    let s = if v < 10.0 { format!("{v:.1}") } else { format!("{v:.0}") };
    format!("{}{unit}", s.strip_suffix(".0").unwrap_or(&s))
}

/// MMU faults per second over time, from consecutive samples' `faults`.
fn fault_rate_svg(reports: &[MmuRunReport]) -> String {
    let series: Vec<(String, Vec<(f64, f64)>)> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let points = r
                .timeline
                .windows(2)
                .filter_map(|w| {
                    let dt = w[1].t - w[0].t;
                    let rate = w[1].faults.saturating_sub(w[0].faults) as f64 / dt;
                    (dt > 0.0 && rate.is_finite()).then_some((w[1].t, rate))
                })
                .collect();
            (series_name(i, r), points)
        })
        .collect();
    line_chart("MMU faults per second", "seconds", "faults/s", &series)
}

/// MMU page-table memory over time, in MiB.
fn mmu_memory_svg(reports: &[MmuRunReport]) -> String {
    let series: Vec<(String, Vec<(f64, f64)>)> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let points = r
                .timeline
                .iter()
                .map(|s| (s.t, s.mmu_bytes as f64 / (1u64 << 20) as f64))
                .collect();
            (series_name(i, r), points)
        })
        .collect();
    line_chart("MMU page-table memory", "seconds", "MiB", &series)
}

/// The fault-latency histograms, bars side by side per MMU. Buckets are the
/// union of the reports' bounds; counts past the last bound (if any) go to
/// a final `≥` bucket.
fn fault_latency_svg(reports: &[MmuRunReport]) -> String {
    let bounds: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.fault_latency.bounds_ns.iter().copied())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let overflow = reports
        .iter()
        .any(|r| r.fault_latency.counts.len() > r.fault_latency.bounds_ns.len());
    let mut categories: Vec<String> = bounds.iter().map(|&b| format!("<{}", human_ns(b))).collect();
    if overflow {
        categories.push(
            bounds
                .last()
                .map_or_else(|| "all".into(), |&b| format!("≥{}", human_ns(b))),
        );
    }
    let series: Vec<(String, Vec<f64>)> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut values = vec![0.0; categories.len()];
            for (j, &count) in r.fault_latency.counts.iter().enumerate() {
                let slot = match r.fault_latency.bounds_ns.get(j) {
                    Some(b) => bounds.binary_search(b).unwrap_or(0),
                    None => categories.len() - 1,
                };
                values[slot] += count as f64;
            }
            (series_name(i, r), values)
        })
        .collect();
    bar_chart("MMU fault latency (sampled)", "latency", "faults", &categories, &series)
}

// ---- A minimal SVG chart writer ------------------------------------------

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 52.0;
const PLOT_W: f64 = WIDTH - LEFT - RIGHT;
const PLOT_H: f64 = HEIGHT - TOP - BOTTOM;
const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

/// The colour of series `i`.
fn color(i: usize) -> &'static str {
    COLORS[i % COLORS.len()]
}

/// `v`, or 0 if it is NaN or infinite: no coordinate may be either.
fn fin(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

/// Text escaped for XML content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A round axis for values in `0..=max`: `(top, step)` with `step` 1, 2 or
/// 5 times a power of ten and about five steps up to `top >= max`.
fn nice_axis(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    let top = (max / step - 1e-9).ceil().max(1.0) * step;
    (top, step)
}

/// A tick label: `v` with as many decimals as `step` needs, and a `k`, `M`
/// or `G` suffix for large axes.
fn tick_label(v: f64, step: f64, top: f64) -> String {
    let (div, suffix) = match top {
        t if t >= 1e9 => (1e9, "G"),
        t if t >= 1e6 => (1e6, "M"),
        t if t >= 1e4 => (1e3, "k"),
        _ => (1.0, ""),
    };
    if v == 0.0 {
        return "0".into();
    }
    let decimals = (-((step / div).log10() + 1e-9).floor()).clamp(0.0, 6.0) as usize;
    format!("{:.*}{suffix}", decimals, fin(v / div))
}

/// An SVG document being drawn, 800x400 with a plot area inside margins.
struct Chart {
    out: String,
}

impl Chart {
    /// Starts a chart: white background, title, legend (one entry per
    /// series, in the title row) and axis labels.
    fn new(title: &str, x_label: &str, y_label: &str, names: &[&str]) -> Chart {
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
             viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n"
        );
        out.push_str("<rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
        let mut chart = Chart { out };
        chart.text(LEFT, 26.0, "start", " font-size=\"16\" font-weight=\"bold\"", title);
        let mut x = WIDTH - RIGHT;
        for (i, name) in names.iter().enumerate().rev() {
            x -= 18.0 + 7.0 * name.chars().count() as f64;
            chart.rect(x, 16.0, 12.0, 12.0, color(i));
            chart.text(x + 16.0, 26.0, "start", "", name);
            x -= 14.0;
        }
        chart.text(LEFT + PLOT_W / 2.0, HEIGHT - 10.0, "middle", "", x_label);
        let cy = TOP + PLOT_H / 2.0;
        chart.text(
            18.0,
            cy,
            "middle",
            &format!(" transform=\"rotate(-90 18 {cy:.1})\""),
            y_label,
        );
        chart
    }

    /// Text at `(x, y)`; `extra` holds further attributes, with a leading space.
    fn text(&mut self, x: f64, y: f64, anchor: &str, extra: &str, s: &str) {
        let (x, y, s) = (fin(x), fin(y), escape(s));
        let _ = writeln!(
            self.out,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\"{extra}>{s}</text>"
        );
    }

    /// A filled rectangle.
    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str) {
        let (x, y, w, h) = (fin(x), fin(y), fin(w).max(0.0), fin(h).max(0.0));
        let _ = writeln!(
            self.out,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{fill}\"/>"
        );
    }

    /// A straight line.
    fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), stroke: &str) {
        let (x1, y1, x2, y2) = (fin(x1), fin(y1), fin(x2), fin(y2));
        let _ = writeln!(
            self.out,
            "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{stroke}\"/>"
        );
    }

    /// The y axis from 0 to `top`: grid lines, ticks and labels.
    fn y_axis(&mut self, top: f64, step: f64) {
        let ticks = ((top / step).round() as usize).min(20);
        for k in 0..=ticks {
            let v = k as f64 * step;
            let y = TOP + PLOT_H - v / top * PLOT_H;
            self.line((LEFT, y), (LEFT + PLOT_W, y), "#e0e0e0");
            self.line((LEFT - 4.0, y), (LEFT, y), "black");
            self.text(LEFT - 7.0, y + 4.0, "end", "", &tick_label(v, step, top));
        }
    }

    /// A numeric x axis from 0 to `top`: ticks and labels.
    fn x_axis(&mut self, top: f64, step: f64) {
        let ticks = ((top / step).round() as usize).min(20);
        for k in 0..=ticks {
            let v = k as f64 * step;
            let x = LEFT + v / top * PLOT_W;
            self.line((x, TOP + PLOT_H), (x, TOP + PLOT_H + 4.0), "black");
            self.text(x, TOP + PLOT_H + 17.0, "middle", "", &tick_label(v, step, top));
        }
    }

    /// The frame's left and bottom axis lines.
    fn axes(&mut self) {
        self.line((LEFT, TOP), (LEFT, TOP + PLOT_H), "black");
        self.line((LEFT, TOP + PLOT_H), (LEFT + PLOT_W, TOP + PLOT_H), "black");
    }

    /// A grey "no data" in the middle of the plot area.
    fn no_data(&mut self) {
        self.text(
            LEFT + PLOT_W / 2.0,
            TOP + PLOT_H / 2.0,
            "middle",
            " fill=\"#888888\"",
            "no data",
        );
    }

    /// Closes the document.
    fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }
}

/// A line chart of `(x, y)` series, both axes from 0.
fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let finite = |&&(x, y): &&(f64, f64)| x.is_finite() && y.is_finite();
    let all = || series.iter().flat_map(|(_, pts)| pts.iter().filter(finite));
    let (x_top, x_step) = nice_axis(all().map(|p| p.0).fold(0.0, f64::max));
    let (y_top, y_step) = nice_axis(all().map(|p| p.1).fold(0.0, f64::max));
    let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
    let mut chart = Chart::new(title, x_label, y_label, &names);
    chart.y_axis(y_top, y_step);
    chart.x_axis(x_top, x_step);
    chart.axes();
    if all().next().is_none() {
        chart.no_data();
    }
    for (i, (_, pts)) in series.iter().enumerate() {
        let coords: Vec<(f64, f64)> = pts
            .iter()
            .filter(finite)
            .map(|&(x, y)| {
                (
                    fin(LEFT + x.max(0.0) / x_top * PLOT_W),
                    fin(TOP + PLOT_H - y.max(0.0) / y_top * PLOT_H),
                )
            })
            .collect();
        if let [(x, y)] = coords[..] {
            let _ = writeln!(
                chart.out,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{}\"/>",
                color(i)
            );
        } else if !coords.is_empty() {
            let points: Vec<String> = coords.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                chart.out,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" stroke-linejoin=\"round\"/>",
                points.join(" "),
                color(i)
            );
        }
    }
    chart.finish()
}

/// A bar chart: one group per category, one bar per series in each group.
pub(crate) fn bar_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> String {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    // Counts: at least 0..5, so that the ticks are whole numbers.
    let (y_top, y_step) = nice_axis(max.max(5.0));
    let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
    let mut chart = Chart::new(title, x_label, y_label, &names);
    chart.y_axis(y_top, y_step);
    chart.axes();
    if max == 0.0 {
        chart.no_data();
    }
    if categories.is_empty() || series.is_empty() {
        return chart.finish();
    }
    let group = PLOT_W / categories.len() as f64;
    let bar = group * 0.8 / series.len() as f64;
    let gap = if bar > 4.0 { 1.0 } else { 0.0 };
    // Label every category that fits: about 7 px a character, 8 px apart.
    let widest = categories.iter().map(|c| c.chars().count()).max().unwrap_or(0) as f64 * 7.0 + 8.0;
    let every = ((widest / group).ceil() as usize).max(1);
    for (j, label) in categories.iter().enumerate() {
        let cx = LEFT + (j as f64 + 0.5) * group;
        chart.line((cx, TOP + PLOT_H), (cx, TOP + PLOT_H + 4.0), "black");
        if j.is_multiple_of(every) {
            chart.text(cx, TOP + PLOT_H + 17.0, "middle", "", label);
        }
    }
    for (i, (_, values)) in series.iter().enumerate() {
        for (j, &v) in values.iter().enumerate().take(categories.len()) {
            let h = fin(v).max(0.0) / y_top * PLOT_H;
            if h > 0.0 {
                let x = LEFT + j as f64 * group + group * 0.1 + i as f64 * bar;
                chart.rect(x, TOP + PLOT_H - h, bar - gap, h, color(i));
            }
        }
    }
    chart.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmu_sim::report::{LatencyHistogram, Sample};

    fn report(mmu: &str, pf_taken: i64) -> MmuRunReport {
        let mut r = MmuRunReport {
            mmu: mmu.into(),
            workload: "fork-touch".into(),
            paging: "4-level".into(),
            vcpus: 2,
            memory: 64 << 20,
            accesses: 1_000_000,
            tlb_hits: 900_000,
            seconds: 0.5,
            accesses_per_sec: 2_000_000.0,
            mmu_memory_bytes: 3 << 19,
            mmu_memory_peak_bytes: 2 << 20,
            mmu_memory_limit_bytes: 4 << 20,
            timeline: (0..5)
                .map(|k| Sample {
                    t: k as f64 * 0.05,
                    accesses: k * 1000,
                    faults: k * k * 10,
                    mmu_bytes: k << 20,
                })
                .collect(),
            fault_latency: LatencyHistogram {
                bounds_ns: vec![500, 1000, 2000, 4000],
                counts: vec![1, 5, 3, 0, 2],
            },
            ..Default::default()
        };
        r.stats.pf_taken = pf_taken;
        r
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!("vmmu-report-{tag}-{}-{nanos}", std::process::id()))
    }

    fn check_dir(reports: &[MmuRunReport], tag: &str) {
        let dir = temp_dir(tag);
        let text = table(reports);
        let paths = write_dir(&dir, reports, &text).unwrap();
        assert_eq!(paths.len(), 5);
        for path in &paths {
            let contents = fs::read_to_string(path).unwrap();
            assert!(
                !contents.contains("NaN") && !contents.contains("inf"),
                "{}",
                path.display()
            );
            if path.extension().is_some_and(|e| e == "svg") {
                assert!(contents.starts_with("<svg"), "{}", path.display());
                assert!(contents.trim_end().ends_with("</svg>"), "{}", path.display());
            }
        }
        let full: Value = serde_json::from_str(&fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
        let first = if reports.len() == 1 { &full } else { &full[0] };
        assert!(reports.is_empty() || (first.get("timeline").is_some() && first.get("fault_latency").is_some()));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn table_has_columns_and_rows() {
        let text = table(&[report("shadow", 1234), report("tdp", 5678)]);
        assert!(
            text.starts_with("workload: fork-touch  paging: 4-level  vCPUs: 2  memory: 64 MiB\n"),
            "{text}"
        );
        let header = text.lines().nth(1).unwrap();
        assert!(header.contains("shadow") && header.contains("tdp"), "{text}");
        let row = text.lines().find(|l| l.starts_with("pf_taken")).unwrap();
        assert!(row.contains("1,234") && row.contains("5,678"), "{row}");
        assert!(
            text.contains("2.0 M/s") && text.contains("90.0%") && text.contains("1.5 MiB / 2 MiB"),
            "{text}"
        );
        assert!(!text.contains("migration rounds") && !text.contains("check:"), "{text}");
        let width = text.lines().nth(1).unwrap().len();
        assert!(text.lines().skip(3).all(|l| l.len() == width), "{text}");
    }

    #[test]
    fn table_shows_migration_rows() {
        let mut with = report("shadow", 1);
        with.migration = Some(MigrationReport {
            rounds: 3,
            ..Default::default()
        });
        let text = table(&[with, report("tdp", 2)]);
        let row = text.lines().find(|l| l.starts_with("migration rounds")).unwrap();
        assert!(row.contains('3') && row.trim_end().ends_with('-'), "{row}");
    }

    #[test]
    fn table_of_empty_reports() {
        let text = table(&[MmuRunReport::default()]);
        assert!(!text.contains("NaN") && !text.contains("inf"), "{text}");
        assert!(table(&[]).starts_with("workload: -"));
    }

    #[test]
    fn json_shapes() {
        let one = json(&[report("shadow", 1)]);
        assert!(one.is_object());
        for key in ["mmu", "vcpus", "accesses", "violations", "stats"] {
            assert!(one.get(key).is_some(), "{key}");
        }
        assert!(one.get("timeline").is_none() && one.get("fault_latency").is_none());
        let two = json(&[report("shadow", 1), report("tdp", 2)]);
        let array = two.as_array().unwrap();
        assert_eq!(array.len(), 2);
        assert!(
            array
                .iter()
                .all(|v| v.get("timeline").is_none() && v["mmu"].is_string())
        );
        assert_eq!(array[1]["stats"]["pf_taken"], 2);
    }

    #[test]
    fn write_dir_one_and_two_reports() {
        check_dir(&[report("shadow", 1)], "one");
        check_dir(&[report("shadow", 1), report("tdp", 2)], "two");
    }

    #[test]
    fn write_dir_edge_cases() {
        let empty = MmuRunReport {
            mmu: "shadow".into(),
            ..Default::default()
        };
        let mut single = MmuRunReport {
            mmu: "tdp".into(),
            ..Default::default()
        };
        single.timeline.push(Sample {
            t: 0.0,
            ..Default::default()
        });
        single.fault_latency = LatencyHistogram {
            bounds_ns: vec![1000, 2000],
            counts: vec![0, 0],
        };
        check_dir(&[empty.clone(), single.clone()], "edge");
        check_dir(&[empty], "empty");
        let mut same_time = single;
        same_time.timeline.push(Sample {
            t: 0.0,
            faults: 5,
            mmu_bytes: 1,
            accesses: 1,
        });
        check_dir(&[same_time], "same-time");
        check_dir(&[], "none");
    }

    #[test]
    fn svg_escapes_and_ticks() {
        let svg = line_chart(
            "a <b> & \"c\"",
            "x",
            "y",
            &[("s&t".into(), vec![(0.0, 1.0), (2.0, 3.5)])],
        );
        assert!(svg.contains("a &lt;b&gt; &amp; &quot;c&quot;") && svg.contains("s&amp;t"));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        assert_eq!(nice_axis(7.0), (8.0, 2.0));
        assert_eq!(nice_axis(100.0), (100.0, 20.0));
        assert_eq!(tick_label(25_000.0, 5_000.0, 50_000.0), "25k");
        assert_eq!(tick_label(0.4, 0.2, 1.0), "0.4");
        assert_eq!(human_ns(1500), "1.5µs");
        assert_eq!(human_ns(2000), "2µs");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
    }
}
