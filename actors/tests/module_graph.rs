//! The modules of this crate that hold actors depend on each other in one
//! direction only: a parent actor's module may name its children's, never the
//! reverse (a child reports through a `Recipient`). The test reads the
//! sources, collects each top-level module's `crate::X` references, and fails
//! on any cycle among the actor modules, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules that define actors (`Node`, `VolumeManager`,
/// `ShardManager`, `Shard`, `MetadataStore`).
const ACTOR_MODULES: &[&str] = &["node", "volume", "shard_manager", "shard", "meta"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`node/lease.rs` -> `node`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// Every top-level module named as `crate::X` in `text`, including inside
/// `use crate::{X, Y::z}` groups. Comment lines are skipped.
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.insert(name);
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let from = module_of(&src, &f);
        if !ACTOR_MODULES.contains(&from.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for to in references(&text) {
            if to != from && ACTOR_MODULES.contains(&to.as_str()) {
                g.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    g
}

/// A cycle through `start`, if any (depth-first search).
fn cycle_from(g: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(g, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn references_are_parsed_from_paths_and_groups() {
    let refs = references(
        "use crate::{node::Node, volume};\nuse crate::meta::x;\n// crate::shard\nlet a = crate::lease::f();",
    );
    assert_eq!(refs, ["lease", "meta", "node", "volume"].into_iter().map(String::from).collect());
}

#[test]
fn a_cycle_is_found() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("node".into()).or_default().insert("volume".into());
    g.entry("volume".into()).or_default().insert("node".into());
    assert_eq!(cycle_from(&g, "node"), Some(vec!["node".into(), "volume".into(), "node".into()]));
}

#[test]
fn actor_modules_form_no_cycle() {
    let g = graph();
    assert!(g.get("node").is_some_and(|to| to.contains("volume")), "the graph was read: node uses volume ({g:?})");
    for m in ACTOR_MODULES {
        if let Some(cycle) = cycle_from(&g, m) {
            panic!("actor modules import each other in a circle: {} (graph {g:?})", cycle.join(" -> "));
        }
    }
}
