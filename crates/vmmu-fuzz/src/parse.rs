//! The parser targets: the conformance case parser, the workload parser and
//! the trace parser, over arbitrary bytes.
//!
//! Each must return a clear error or a value, never panic; where the format
//! has a writer, what parses must write out and parse back equal. Bytes
//! that are not UTF-8 are read lossily (the files are read as UTF-8 text,
//! so the parsers only ever see strings).

use std::borrow::Cow;

use vmmu_sim::conform::case::Case;
use vmmu_sim::trace::Trace;
use vmmu_sim::workload::Workload;

/// The file name the targets report errors against.
pub const FILE: &str = "fuzz";

fn text(data: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// A case as JSON, the same whatever its kind.
fn case_json(case: &Case) -> serde_json::Value {
    let value = match case {
        Case::Single(c) => serde_json::to_value(c),
        Case::Steps(c) => serde_json::to_value(c),
        Case::Npt(c) => serde_json::to_value(c),
        Case::Ept(c) => serde_json::to_value(c),
    };
    value.unwrap_or_else(|e| panic!("a parsed case does not serialize: {e}"))
}

/// Parses every non-blank line of `data` as a conformance case (as
/// `conform::read_cases` does). A case that parses must serialize and
/// parse back to the same case; an error must say something. Returns how
/// many lines parsed.
pub fn conform_case(data: &[u8]) -> usize {
    let text = text(data);
    let mut parsed = 0;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        match Case::parse(line) {
            Ok(case) => {
                parsed += 1;
                let json = case_json(&case);
                let written = json.to_string();
                let again = Case::parse(&written)
                    .unwrap_or_else(|e| panic!("a written case does not parse back: {e}\ncase: {written}"));
                assert_eq!(case_json(&again), json, "a case changed through a write and a parse");
                assert_eq!(again.id(), case.id());
            }
            Err(e) => assert!(!e.trim().is_empty(), "an empty error for {line:?}"),
        }
    }
    parsed
}

/// Parses `data` as a workload file. A workload that parses validates, and
/// written as TOML parses back equal; an error names the file and a line.
/// Returns whether it parsed.
pub fn workload(data: &[u8]) -> bool {
    let text = text(data);
    match Workload::parse(&text, FILE) {
        Ok(w) => {
            if let Err((key, message)) = w.validate() {
                panic!("a parsed workload does not validate: {key}: {message}");
            }
            let written = toml::to_string(&w).unwrap_or_else(|e| panic!("a parsed workload does not serialize: {e}"));
            let again = Workload::parse(&written, FILE)
                .unwrap_or_else(|e| panic!("a written workload does not parse back: {e}\n{written}"));
            assert_eq!(again, w, "a workload changed through a write and a parse:\n{written}");
            true
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.starts_with(&format!("{FILE}:")) && message.len() > FILE.len() + 3,
                "an unclear error: {message:?}"
            );
            false
        }
    }
}

/// Parses `data` as a trace. A trace that parses writes out
/// ([`Trace::to_text`]) and parses back equal; an error names a line within
/// the text. Returns whether it parsed.
pub fn trace(data: &[u8]) -> bool {
    let text = text(data);
    match Trace::parse(&text, FILE) {
        Ok(t) => {
            let written = t.to_text();
            let again = Trace::parse(&written, FILE)
                .unwrap_or_else(|e| panic!("a written trace does not parse back: {e}\n{written}"));
            assert_eq!(again, t, "a trace changed through a write and a parse:\n{written}");
            true
        }
        Err(e) => {
            assert!(e.file == FILE && e.line >= 1, "an error without a place: {e}");
            assert!(
                e.line <= text.lines().count().max(1) + 1,
                "an error at line {} of a {}-line text: {e}",
                e.line,
                text.lines().count()
            );
            assert!(!e.message.trim().is_empty(), "an empty error message");
            false
        }
    }
}
