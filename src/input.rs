//! Reading the CLI's input files and checking its flag values: every
//! failure is a message that names the file (and the line) or the flag,
//! and the reason, for an exit 2 before any work starts.

use std::fs;
use std::io::Write;
use std::path::Path;

use vmmu_sim::conform::Case;

/// The largest file read whole: far beyond any case file, workload or
/// trace, and small enough to hold in memory.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// Reads `path` as UTF-8 text. A missing or unreadable file, a directory,
/// a file of more than [`MAX_FILE_BYTES`] and bytes that are not UTF-8
/// (named by line) are errors.
pub fn read_text(path: &Path) -> Result<String, String> {
    let file = path.display();
    let meta = fs::metadata(path).map_err(|e| format!("cannot read {file}: {e}"))?;
    if meta.is_dir() {
        return Err(format!("{file}: is a directory, not a file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{file}: {} bytes, more than the {MAX_FILE_BYTES} an input file may hold",
            meta.len()
        ));
    }
    let bytes = fs::read(path).map_err(|e| format!("cannot read {file}: {e}"))?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..valid].iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = bytes[..valid].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        format!(
            "{file}:{line}: not UTF-8 text (an invalid byte {:#04x} at column {}): not a text file?",
            bytes[valid],
            valid - line_start + 1
        )
    })
}

/// The 1-based line where `key` is set (`key = ...`) in TOML `text`, or 1.
pub fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(1, |i| i + 1)
}

/// Parses a conformance case file: one case per line (JSON), blank lines
/// skipped. An empty file, a line that is not a case and a physical
/// address at or above the case's MAXPHYADDR are errors naming the line.
pub fn read_cases(path: &Path) -> Result<Vec<Case>, String> {
    let text = read_text(path)?;
    let file = path.display();
    if text.trim().is_empty() {
        return Err(format!(
            "{file}:1: the file is empty: a case file holds one JSON case per line"
        ));
    }
    let mut cases = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case = Case::parse(line)
            .and_then(|c| check_addresses(&c).map(|()| c))
            .map_err(|reason| format!("{file}:{}: {reason}", n + 1))?;
        cases.push(case);
    }
    Ok(cases)
}

/// Every physical address of `case`'s memory (initial, after and final
/// entries) must be below 2^MAXPHYADDR: no entry can live above it.
fn check_addresses(case: &Case) -> Result<(), String> {
    let (maxphyaddr, pas): (u8, Vec<u64>) = match case {
        Case::Npt(c) => (c.maxphyaddr, c.memory.iter().map(|e| e.hpa.0).collect()),
        Case::Ept(c) => (c.maxphyaddr, c.memory.iter().map(|e| e.hpa.0).collect()),
        _ => (0, Vec::new()),
    };
    if maxphyaddr != 0 {
        let limit = 1u64 << maxphyaddr;
        return match pas.into_iter().find(|&pa| pa >= limit) {
            Some(pa) => Err(format!(
                "memory entry at host-physical {pa:#x} is above MAXPHYADDR ({maxphyaddr} bits: addresses below {limit:#x})"
            )),
            None => Ok(()),
        };
    }
    let (control, pas): (_, Vec<u64>) = match case {
        Case::Single(c) => (&c.control, c.memory.iter().chain(&c.after).map(|e| e.pa.0).collect()),
        Case::Steps(c) => (
            &c.control,
            c.memory
                .iter()
                .map(|e| e.pa.0)
                .chain(c.final_entries.iter().map(|e| e.pa.0))
                .collect(),
        ),
        Case::Npt(_) | Case::Ept(_) => unreachable!("checked above"),
    };
    // Case::parse checked maxphyaddr is in 32..=52, so the shift fits.
    let limit = 1u64 << control.maxphyaddr;
    match pas.into_iter().find(|&pa| pa >= limit) {
        Some(pa) => Err(format!(
            "memory entry at {pa:#x} is above MAXPHYADDR ({} bits: addresses below {limit:#x})",
            control.maxphyaddr
        )),
        None => Ok(()),
    }
}

/// Checks, before a run, that `path` can be written as a file: its
/// directory exists and it is not a directory. Opens it for writing (a
/// file it creates for the check is removed again), so that the check is
/// the one the write will meet.
pub fn check_writable_file(path: &Path, flag: &str) -> Result<(), String> {
    let file = path.display();
    if path.as_os_str().is_empty() {
        return Err(format!("{flag} \"\": an empty path"));
    }
    if path.is_dir() {
        return Err(format!("{flag} {file}: is a directory, not a file"));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(format!(
            "{flag} {file}: the directory {} does not exist",
            parent.display()
        ));
    }
    let existed = path.exists();
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{flag} {file}: cannot write: {e}"))?;
    if !existed {
        let _ = fs::remove_file(path);
    }
    Ok(())
}

/// Checks, before a run, that `dir` is (or can be made) a writable
/// directory: creates it and a probe file in it.
pub fn check_writable_dir(dir: &Path, flag: &str) -> Result<(), String> {
    let name = dir.display();
    if dir.as_os_str().is_empty() {
        return Err(format!("{flag} \"\": an empty path"));
    }
    if dir.exists() && !dir.is_dir() {
        return Err(format!("{flag} {name}: exists and is not a directory"));
    }
    fs::create_dir_all(dir).map_err(|e| format!("{flag} {name}: cannot create the directory: {e}"))?;
    let probe = dir.join(format!(".vmmu-probe-{}", std::process::id()));
    let written = fs::File::create(&probe).and_then(|mut f| f.write_all(b"probe"));
    let _ = fs::remove_file(&probe);
    written.map_err(|e| format!("{flag} {name}: cannot write into the directory: {e}"))
}

/// A `--seconds` value: a positive, finite number of seconds, at most `max`.
pub fn parse_seconds(s: &str, max: f64) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (examples: 10, 0.5)"))?;
    if v.is_finite() && v > 0.0 && v <= max {
        Ok(v)
    } else {
        Err(format!("{s:?} must be a positive number of seconds, at most {max}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("0.5", 10.0), Ok(0.5));
        for bad in ["", "-1", "0", "nan", "inf", "1e300", "11", "x"] {
            assert!(parse_seconds(bad, 10.0).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_lines() {
        assert_eq!(key_line("a = 1\nmemory = 3\n", "memory"), 2);
        assert_eq!(key_line("memoryx = 3\n", "memory"), 1);
    }
}
