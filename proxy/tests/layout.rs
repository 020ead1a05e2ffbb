//! The proxy crate's layout rule: no module imports one that imports it back (directly or
//! through others). Read from the sources: every `crate::a::b` path (and `super::x`) outside
//! comments and test modules is an edge from the module that writes it to the module it names;
//! a parent's reach into its own children is containment, not an import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every module of `proxy/src` by its path (`service::exchange`), with its source.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read proxy/src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    let mut mods = BTreeMap::new();
    for file in files {
        let rel = file
            .strip_prefix(&root)
            .expect("under src")
            .with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        if parts == ["lib"] || parts == ["main"] {
            continue;
        }
        let source = std::fs::read_to_string(&file).expect("read a module");
        mods.insert(parts.join("::"), source);
    }
    mods
}

/// The module paths a source names, comments and `#[cfg(test)] mod tests` left out.
fn named(source: &str, this: &str) -> BTreeSet<String> {
    let code = source
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or_default();
        for (prefix, base) in [("crate::", String::new()), ("super::", parent(this))] {
            for (at, _) in line.match_indices(prefix) {
                let rest = &line[at + prefix.len()..];
                let path: String = rest
                    .chars()
                    .take_while(|c| {
                        c.is_ascii_lowercase() || *c == '_' || *c == ':' || c.is_ascii_digit()
                    })
                    .collect();
                let path = path.trim_end_matches(':');
                if path.is_empty() {
                    continue;
                }
                out.insert(if base.is_empty() {
                    path.to_string()
                } else {
                    format!("{base}::{path}")
                });
            }
        }
    }
    out
}

fn parent(module: &str) -> String {
    module
        .rsplit_once("::")
        .map(|(p, _)| p.to_string())
        .unwrap_or_default()
}

/// Every chain of imports that leads a module back to itself, as `a -> b -> a`.
fn cycles(mods: &BTreeMap<String, String>) -> Vec<String> {
    // Edges: a named path resolves to the longest module prefix it has.
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (name, source) in mods {
        let to = edges.entry(name).or_default();
        for path in named(source, name) {
            let parts: Vec<&str> = path.split("::").collect();
            let target = (1..=parts.len())
                .rev()
                .map(|k| parts[..k].join("::"))
                .find_map(|m| mods.get_key_value(&m).map(|(k, _)| k.as_str()));
            if let Some(target) = target {
                if target != name && !target.starts_with(&format!("{name}::")) {
                    to.insert(target);
                }
            }
        }
    }
    let mut cycles = Vec::new();
    for start in edges.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(&str, Vec<&str>)> = vec![(start, vec![start])];
        while let Some((at, trail)) = stack.pop() {
            for &next in edges.get(at).into_iter().flatten() {
                if next == *start {
                    cycles.push(trail.join(" -> ") + " -> " + start);
                } else if seen.insert(next) {
                    let mut t = trail.clone();
                    t.push(next);
                    stack.push((next, t));
                }
            }
        }
    }
    cycles
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let mods = modules();
    assert!(mods.contains_key("service::exchange"), "{:?}", mods.keys());
    // The reader follows one path per `crate::`; a grouped import would hide edges from it.
    for (name, source) in &mods {
        assert!(
            !source.contains("crate::{"),
            "{name}: write one `use crate::a::b;` per module, not `use crate::{{..}}`"
        );
    }
    let cycles = cycles(&mods);
    assert!(
        cycles.is_empty(),
        "modules that import each other back:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_check_sees_cycles_and_only_in_code() {
    let m = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    // Through a third module.
    let found = cycles(&m(&[
        ("a", "use crate::b::Thing;"),
        ("b", "fn f() { crate::c::g() }"),
        ("c", "use crate::a;"),
    ]));
    assert!(found.contains(&"a -> b -> c -> a".to_string()), "{found:?}");
    let found = cycles(&m(&[
        ("p", "use crate::q::kid;"),
        ("q::kid", "use crate::p;"),
        ("q", ""),
    ]));
    assert_eq!(
        found.len(),
        2,
        "p -> q::kid -> p, from both ends: {found:?}"
    );
    // A parent reaching into its own child is containment; a child's `super::` is an import.
    let found = cycles(&m(&[
        ("p", "use crate::p::kid;"),
        ("p::kid", "use super::X;"),
    ]));
    assert!(found.is_empty(), "{found:?}");
    let found = cycles(&m(&[
        ("p", "use crate::r;"),
        ("p::kid", ""),
        ("r", "use crate::p::kid;"),
        ("x", ""),
    ]));
    assert!(found.is_empty(), "r imports p's child, not p: {found:?}");
    // Comments and test modules are not imports.
    let found = cycles(&m(&[
        ("a", "use crate::b; // crate::b"),
        (
            "b",
            "// use crate::a;\nfn f() {}\n#[cfg(test)]\nmod tests {\n use crate::a;\n}\n",
        ),
    ]));
    assert!(found.is_empty(), "{found:?}");
}
