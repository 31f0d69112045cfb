//! The module layers of lib.rs, checked from the source: imports point down only.
//! Reads every file under src/, takes the `crate::…` paths its non-test code names,
//! and checks the graph of top-level modules against the rules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/store/memory.rs` → `store`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let first = file.strip_prefix(src).ok()?.components().next()?;
    let name = first.as_os_str().to_str()?.trim_end_matches(".rs");
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The top-level modules named by `crate::` paths in `code`, including grouped
/// imports such as `use crate::{body::full, domain::Outcome};`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name = ident(item);
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// Code without comments and without the test module at the end of the file.
fn production_code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("source is UTF-8");
        let deps = graph.entry(module.clone()).or_default();
        for named in named_modules(&production_code(&text)) {
            if named != module {
                deps.insert(named);
            }
        }
    }
    graph
}

fn reaches(graph: &Graph, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_owned()];
    while let Some(m) = stack.pop() {
        for next in graph.get(&m).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next.clone()) {
                stack.push(next.clone());
            }
        }
    }
    false
}

#[test]
fn the_parser_sees_plain_and_grouped_paths() {
    let code = "use crate::domain::Endpoint;\nuse crate::{body::full, store::Store};\nlet x = crate::metrics::Metrics::default();";
    let found: Vec<_> = named_modules(code).into_iter().collect();
    assert_eq!(found, ["body", "domain", "metrics", "store"]);
    assert!(
        production_code("use crate::a::X;\n// crate::b\n#[cfg(test)]\nuse crate::c::Y;")
            .contains("crate::a")
    );
    assert!(!production_code("// crate::b\n").contains("crate::b"));
}

#[test]
fn the_graph_covers_the_whole_crate() {
    let graph = graph();
    for module in [
        "app", "body", "config", "demo", "domain", "edge", "error", "metrics", "pipeline", "retry",
        "store", "upstream",
    ] {
        assert!(
            graph.contains_key(module),
            "no module {module} found in src/"
        );
    }
}

#[test]
fn no_cycle_among_top_level_modules() {
    let graph = graph();
    for module in graph.keys() {
        assert!(
            !reaches(&graph, module, module),
            "{module} imports itself through a cycle: {graph:#?}"
        );
    }
}

#[test]
fn imports_point_down() {
    let graph = graph();
    let deps = |m: &str| graph.get(m).cloned().unwrap_or_default();
    assert!(
        deps("domain").is_empty(),
        "domain imports nothing of the crate: {:?}",
        deps("domain")
    );
    assert!(
        deps("sync").is_empty(),
        "sync imports nothing of the crate: {:?}",
        deps("sync")
    );
    for lower in ["store", "config", "metrics", "retry", "upstream", "error"] {
        for higher in ["pipeline", "edge", "app"] {
            assert!(
                !reaches(&graph, lower, higher),
                "{lower} must not import {higher}: {:?}",
                deps(lower)
            );
        }
    }
    let store: Vec<_> = deps("store").into_iter().collect();
    assert!(
        store
            .iter()
            .all(|d| d == "domain" || d == "body" || d == "sync"),
        "the store knows the domain only: {store:?}"
    );
    for higher in ["edge", "app", "admin_client"] {
        assert!(
            !reaches(&graph, "pipeline", higher),
            "the pipeline must not import {higher}"
        );
    }
    // Composition roots: `app`, and `demo`, which starts an app as `main` does. Only
    // `demo` may use `app`, and nothing uses `demo`.
    for (module, deps) in &graph {
        assert!(
            module == "demo" || !deps.contains("app"),
            "{module} imports the composition root"
        );
        assert!(!deps.contains("demo"), "{module} imports the demo");
    }
}

/// The sibling files a file names, by `super::x` or by its full path
/// `crate::<module path>::x`: `src/edge/connect.rs` naming `super::serve` → `serve`.
/// A module's `mod.rs` is the parent its files build on, not a sibling.
fn named_siblings(code: &str, module_path: &str, siblings: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let full = format!("crate::{module_path}::");
    for prefix in ["super::", full.as_str()] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            // `super::super::x` names the grandparent's files, not a sibling.
            let before = &rest[..at];
            rest = &rest[at + prefix.len()..];
            if prefix == "super::" && before.ends_with("super::") {
                continue;
            }
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group[..group.find('}').unwrap_or(group.len())]
                    .split(',')
                    .collect(),
                None => vec![rest],
            };
            for name in names {
                let name: String = name
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if siblings.contains(&name) {
                    found.insert(name);
                }
            }
        }
    }
    found
}

/// Per directory of src/ (a module with files of its own), the graph of its files.
fn file_graphs() -> BTreeMap<PathBuf, Graph> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut dirs: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for file in files {
        let dir = file.parent().expect("a file has a folder").to_path_buf();
        if dir != src {
            dirs.entry(dir).or_default().push(file);
        }
    }
    let mut graphs = BTreeMap::new();
    for (dir, files) in dirs {
        let stem = |f: &Path| f.file_stem().and_then(|s| s.to_str()).map(str::to_owned);
        let siblings: BTreeSet<String> = files
            .iter()
            .filter_map(|f| stem(f))
            .filter(|s| s != "mod")
            .collect();
        let module_path = dir
            .strip_prefix(&src)
            .expect("under src/")
            .components()
            .filter_map(|c| c.as_os_str().to_str())
            .collect::<Vec<_>>()
            .join("::");
        let mut graph = Graph::new();
        for file in &files {
            let Some(name) = stem(file).filter(|s| s != "mod") else {
                continue;
            };
            let text = std::fs::read_to_string(file).expect("source is UTF-8");
            let mut deps = named_siblings(&production_code(&text), &module_path, &siblings);
            deps.remove(&name);
            graph.insert(name, deps);
        }
        graphs.insert(dir, graph);
    }
    graphs
}

#[test]
fn the_parser_sees_sibling_files() {
    let siblings: BTreeSet<String> = ["connect", "serve", "slot"].map(String::from).into();
    let code = "use super::serve::{serve_connection, Front};\nuse super::{slot::ConnectionSlot, Edge};\nuse crate::edge::connect;\nuse super::super::serve::X;";
    let found: Vec<_> = named_siblings(code, "edge", &siblings)
        .into_iter()
        .collect();
    assert_eq!(found, ["connect", "serve", "slot"]);
    assert!(named_siblings("use super::Edge;", "edge", &siblings).is_empty());
}

#[test]
fn no_cycle_among_the_files_of_a_module() {
    let graphs = file_graphs();
    assert!(
        graphs.keys().any(|d| d.ends_with("edge")),
        "the edge's files are among those checked"
    );
    for (dir, graph) in graphs {
        for file in graph.keys() {
            assert!(
                !reaches(&graph, file, file),
                "{}/{file}.rs imports itself through a cycle of its module's files: {graph:#?}",
                dir.display()
            );
        }
    }
}
