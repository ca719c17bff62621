//! The layering of `src/` as a test: every `crate::` path outside a file's unit tests is a
//! dependency between two top-level modules; this fails on a dependency the picture in
//! docs/ARCHITECTURE.md ("Layers") forbids, and on any cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What each module may use, lowest layer first. A module not listed may use nothing of the
/// crate. The faces (`cli`, `mount`, `main`, `lib`) may use everything and are not listed.
const ALLOWED: &[(&str, &[&str])] = &[
    ("durable", &[]),
    ("heap", &[]),
    ("priority", &[]),
    // The fault matrix's failpoints, compiled in only for tests.
    ("fault", &[]),
    // The control socket's client finds the socket through the mount's root xattr.
    ("control", &["fs"]),
    // The Prometheus endpoint and its gauge helper.
    ("metrics", &[]),
    ("testutil", &["chunk"]),
    ("dirty", &["durable", "fault"]),
    // Who may write a namespace: the primary's and the replica's epoch records.
    ("epoch", &["durable"]),
    ("manifest", &["durable"]),
    ("chunk", &["manifest"]),
    ("wire", &["chunk", "manifest", "dirty", "durable"]),
    ("net", &["wire", "durable"]),
    ("fs", &["chunk", "dirty", "durable", "fault", "priority"]),
    ("config", &["chunk", "net"]),
    (
        "sync",
        &[
            "fs", "chunk", "manifest", "wire", "net", "dirty", "durable", "metrics", "epoch",
            "heap", "fault", "priority",
        ],
    ),
    (
        "replica",
        &[
            "wire", "net", "manifest", "chunk", "durable", "metrics", "epoch", "heap", "fault",
            "priority",
        ],
    ),
    ("wan", &[]),
    // Automatic failover: drives the primary's engine and gate, reads the replica's store.
    (
        "failover",
        &["config", "fs", "sync", "replica", "wire", "epoch", "net"],
    ),
];

const FACES: &[&str] = &["cli", "mount", "main", "lib", "bin"];

/// The top-level module a file belongs to (`src/sync/ship.rs` -> `sync`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The top-level modules named by `crate::` paths in `text`, including inside
/// `use crate::{a, b::{c}}` groups.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut at_item = true;
            let mut word = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            if !word.is_empty() {
                                out.insert(std::mem::take(&mut word));
                            }
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        if !word.is_empty() {
                            out.insert(std::mem::take(&mut word));
                        }
                        at_item = true;
                    }
                    c if c.is_alphanumeric() || c == '_' => {
                        if at_item {
                            word.push(c);
                        }
                    }
                    _ => {
                        if at_item && !word.is_empty() {
                            out.insert(std::mem::take(&mut word));
                            at_item = false;
                        }
                    }
                }
            }
        } else {
            let word: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(word);
        }
    }
    out
}

/// A file's text without its unit tests (everything from the first `#[cfg(test)]` on).
fn code(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Files of modules declared under `#[cfg(test)]` (`#[cfg(test)] mod sim;`): test code.
fn test_only_files(all: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for f in all {
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for w in lines.windows(2) {
            if w[0] == "#[cfg(test)]"
                && let Some(name) = w[1]
                    .strip_prefix("mod ")
                    .or_else(|| w[1].strip_prefix("pub mod "))
                    .and_then(|r| r.strip_suffix(';'))
            {
                let dir = if f.ends_with("mod.rs") || f.ends_with("lib.rs") {
                    f.parent().unwrap().to_path_buf()
                } else {
                    f.with_extension("")
                };
                out.insert(dir.join(format!("{name}.rs")));
                out.insert(dir.join(name).join("mod.rs"));
            }
        }
    }
    out
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_uses_a_layer_above_it_and_there_are_no_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let test_only = test_only_files(&all);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut bad = Vec::new();
    for f in all.iter().filter(|f| !test_only.contains(*f)) {
        let m = module_of(&src, f);
        let text = code(f);
        let rel = f.strip_prefix(&src).unwrap().display().to_string();
        // The filesystem core is kernel-agnostic: only its FUSE adapter speaks fuser.
        if m == "fs" && rel != "fs/fuse.rs" && text.contains("fuser::") | text.contains("use fuser")
        {
            bad.push(format!("{rel} uses fuser (only fs/fuse.rs may)"));
        }
        for dep in crate_refs(&text) {
            if dep == m || dep.is_empty() {
                continue;
            }
            graph.entry(m.clone()).or_default().insert(dep.clone());
            if dep == "cli" && m != "main" {
                bad.push(format!("{rel} uses the command line (crate::cli)"));
            }
            if FACES.contains(&m.as_str()) {
                continue;
            }
            match allowed.get(m.as_str()) {
                Some(ok) if ok.contains(&dep.as_str()) => {}
                Some(_) => bad.push(format!("{rel} ({m}) uses crate::{dep}")),
                None => bad.push(format!("{rel}: module {m} is not in the layer list")),
            }
        }
    }
    assert!(
        bad.is_empty(),
        "forbidden dependencies:\n{}",
        bad.join("\n")
    );

    // No cycles between the non-face modules.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(i) = stack.iter().position(|s| s == m) {
            panic!("cycle: {} -> {m}", stack[i..].join(" -> "));
        }
        stack.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            if !FACES.contains(&d.as_str()) {
                visit(d, graph, stack, done);
            }
        }
        stack.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in graph.keys().filter(|m| !FACES.contains(&m.as_str())) {
        visit(m, &graph, &mut vec![], &mut done);
    }
}

#[test]
fn the_reference_parser_sees_grouped_and_inline_paths() {
    let refs = crate_refs(
        "use crate::{a::{b, c}, d, e::f};\nlet x = crate::g::h();\nuse crate::i::{j, k};",
    );
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["a", "d", "e", "g", "i"]
    );
}
