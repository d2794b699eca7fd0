//! The engine's layering, checked on its source: the top-level modules use
//! only the ones below them (ARCHITECTURE.md, "Layout"), and no two source
//! files import each other, directly or around a longer loop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top: a module may use the ones before it, never the ones
/// after.
const LAYERS: &[&str] = &[
    "addr", "arch", "walker", "percpu", "sync", "host", "mem", "mmu", "cpu", "vm",
];

/// Every source file as its module path (`mem::memslot`), with its text
/// minus comments and unit tests.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read src") {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
            parts.pop();
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let code: String = code
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        out.insert(parts.join("::"), code);
    }
    out
}

/// The longest module that `path` names or is inside of.
fn resolve<'a>(mods: &'a BTreeMap<String, String>, path: &str) -> Option<&'a str> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segs.len())
        .rev()
        .map(|i| segs[..i].join("::"))
        .find_map(|m| mods.get_key_value(&m).map(|(k, _)| k.as_str()))
}

/// Which modules each module uses through `crate::` and `super::` paths (a `{...}` group
/// one level deep is looked into), leaving out its own ancestors (the
/// `mod.rs` hubs that declare it).
fn edges(mods: &BTreeMap<String, String>) -> BTreeMap<&str, BTreeSet<&str>> {
    let mut out = BTreeMap::new();
    for (m, code) in mods {
        let mut deps = BTreeSet::new();
        // `super::` is the parent module, for a `mod.rs` file as for any.
        let parent = m.rsplit_once("::").map_or("", |(p, _)| p);
        let uses = code
            .match_indices("crate::")
            .map(|(i, _)| (i + "crate::".len(), String::new()))
            .chain(
                code.match_indices("super::")
                    .filter(|(i, _)| {
                        // Not the tail of a longer path (`a::super::`).
                        !code[..*i].ends_with("::")
                    })
                    .map(|(i, _)| (i + "super::".len(), parent.to_string())),
            );
        for (at, prefix) in uses {
            let rest = &code[at..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let path = rest[..end].trim_end_matches(':');
            let path = if prefix.is_empty() {
                path.to_string()
            } else {
                format!("{prefix}::{path}")
            };
            let path = path.as_str();
            if rest[end..].starts_with('{') && rest[..end].ends_with("::") {
                let group = &rest[end + 1..rest[end..].find('}').map_or(end + 1, |j| end + j)];
                for item in group.split(',') {
                    let item = item.split(" as ").next().unwrap_or("").trim();
                    if let Some(d) = resolve(mods, &format!("{path}::{item}")) {
                        deps.insert(d);
                    }
                }
            }
            if let Some(d) = resolve(mods, path) {
                deps.insert(d);
            }
        }
        deps.retain(|d| *d != m && !m.starts_with(&format!("{d}::")) && !d.is_empty());
        out.insert(m.as_str(), deps);
    }
    out
}

#[test]
fn top_level_modules_use_only_the_layers_below() {
    let mods = modules();
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m.split("::").next().unwrap_or(""));
    let mut wrong = Vec::new();
    for (m, deps) in edges(&mods) {
        let Some(from) = rank(m) else { continue };
        for d in deps {
            if let Some(to) = rank(d)
                && to > from
            {
                wrong.push(format!("{m} uses {d}"));
            }
        }
    }
    assert!(wrong.is_empty(), "upward uses: {wrong:#?}");
    assert!(
        LAYERS.iter().all(|l| mods.contains_key(*l)),
        "a layer is missing from the source: {LAYERS:?}"
    );
}

#[test]
fn no_two_files_import_each_other() {
    let mods = modules();
    let g = edges(&mods);
    // A depth-first search for a back edge.
    fn visit<'a>(
        v: &'a str,
        g: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(v, 1);
        path.push(v);
        for &w in g.get(v).into_iter().flatten() {
            match state.get(w) {
                Some(1) => {
                    let from = path.iter().position(|p| *p == w).unwrap();
                    return Some(
                        path[from..]
                            .iter()
                            .map(|s| s.to_string())
                            .chain([w.to_string()])
                            .collect(),
                    );
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(w, g, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(v, 2);
        None
    }
    let mut state = BTreeMap::new();
    for &v in g.keys() {
        if !state.contains_key(v)
            && let Some(cycle) = visit(v, &g, &mut state, &mut Vec::new())
        {
            panic!("an import cycle: {}", cycle.join(" -> "));
        }
    }
    // The check sees imports at all: the walker uses arch.
    assert!(g["walker"].iter().any(|d| d.starts_with("arch")), "{:?}", g["walker"]);
}

/// Each MMU writes its SPTEs in one file, `change.rs`, which routes every
/// change through its change handler (ARCHITECTURE.md, "One home for SPTE
/// changes"): no other file of `mmu::tdp` or `mmu::shadow` exchanges,
/// clears bits of, or compare-exchanges an SPTE, or reaches one for
/// writing (the cursor's slot, a shadow SPTE pointer's entry).
#[test]
fn spte_writes_live_in_each_mmus_change_module() {
    let mods = modules();
    let writes = [
        ".swap(",
        "fetch_and(",
        "fetch_or(",
        ".try_set(",
        ".sptep()",
        "ptr.get(&self.arena)",
    ];
    let mut wrong = Vec::new();
    let mut seen_in_change = 0;
    for (m, code) in &mods {
        if !(m.starts_with("mmu::tdp") || m.starts_with("mmu::shadow")) {
            continue;
        }
        for w in writes {
            let n = code.matches(w).count();
            if m.ends_with("::change") {
                seen_in_change += n;
            } else if n > 0 {
                wrong.push(format!("{m}: {n} × `{w}`"));
            }
        }
    }
    assert!(wrong.is_empty(), "SPTE writes outside change.rs: {wrong:#?}");
    // The check sees writes at all: the change modules make them.
    assert!(seen_in_change >= 6, "{seen_in_change}");
}
