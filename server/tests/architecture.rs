//! The shape of the server's source, checked on every `make test`:
//!
//! - modules depend one way: each imports (`crate::x`) only from modules of a lower
//!   layer, as the table in `src/lib.rs` lists them, so the modules form no cycle;
//! - no source file is over [`MAX_FILE_LINES`] lines, tests included;
//! - no function is over [`MAX_FN_LINES`] lines unless a comment in it or just above it
//!   says why it is kept whole (`Kept whole: <reason>`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 60;
const KEPT_WHOLE: &str = "Kept whole:";

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with its path relative to `src/`.
fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path
                .strip_prefix(src())
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, fs::read_to_string(&path).expect("read source")));
        }
    }
}

fn all_sources() -> Vec<(String, String)> {
    let mut out = Vec::new();
    sources(&src(), &mut out);
    assert!(out.len() > 10, "found the sources: {}", out.len());
    out
}

/// The layer table of `lib.rs`: `//! | N | a, b | ... |` rows.
fn layers(lib: &str) -> BTreeMap<String, u32> {
    let mut layers = BTreeMap::new();
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! |") else {
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Ok(layer) = cells[0].parse::<u32>() else {
            continue; // the header and its rule
        };
        for module in cells[1].split(',').map(str::trim) {
            let before = layers.insert(module.to_owned(), layer);
            assert!(before.is_none(), "{module} is listed twice in lib.rs");
        }
    }
    layers
}

/// The crate modules a source names: every `crate::x`, and each `x` of `crate::{x, ..}`.
fn crate_references(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if item_start && depth == 0 => {
                        names.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            names.insert(ident(rest));
        }
    }
    names.remove("");
    names
}

fn module_of(path: &str) -> String {
    let first = path.split('/').next().expect("a path");
    first.trim_end_matches(".rs").to_owned()
}

#[test]
fn modules_import_only_from_lower_layers() {
    let lib = fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    let layers = layers(&lib);
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_owned())
        .collect();
    let listed: BTreeSet<String> = layers.keys().cloned().collect();
    assert_eq!(
        declared, listed,
        "lib.rs: the layer table lists every module once"
    );

    let mut upward = Vec::new();
    for (path, text) in all_sources() {
        if path == "lib.rs" || path == "main.rs" {
            continue;
        }
        let module = module_of(&path);
        let own = layers[&module];
        for dep in crate_references(&text) {
            if dep == module {
                continue;
            }
            match layers.get(&dep) {
                Some(&layer) if layer < own => {}
                Some(&layer) => upward.push(format!(
                    "{path}: {module} (layer {own}) uses crate::{dep} (layer {layer})"
                )),
                None => upward.push(format!("{path}: crate::{dep} is not a module in lib.rs")),
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that do not point down a layer:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_reference_parser_sees_paths_and_groups() {
    let text = "use crate::a::X;\nuse crate::{b::Y, c};\nlet z = crate::d::f();\n// crate::e\n";
    let found: Vec<String> = crate_references(text).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "d", "e"]);
    let lib =
        "//! | layer | modules |\n//! | --- | --- |\n//! | 2 | x, y | z |\n//! | 0 | w | v |\n";
    let parsed = layers(lib);
    assert_eq!(parsed.get("y"), Some(&2));
    assert_eq!(parsed.get("w"), Some(&0));
    assert_eq!(parsed.len(), 3);
}

#[test]
fn no_source_file_is_over_the_size_limit() {
    let long: Vec<String> = all_sources()
        .into_iter()
        .map(|(path, text)| (path, text.lines().count()))
        .filter(|&(_, n)| n > MAX_FILE_LINES)
        .map(|(path, n)| format!("{path}: {n} lines"))
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_FILE_LINES} lines:\n{}",
        long.join("\n")
    );
}

/// Functions (start line, name, length in lines) and whether each is marked
/// [`KEPT_WHOLE`]: a `fn` line, through the line that closes it at the same indent.
fn functions(text: &str) -> Vec<(usize, String, usize, bool)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let Some(at) = trimmed.find("fn ") else {
            continue;
        };
        let head = &trimmed[..at];
        let is_fn = head.split_whitespace().all(|w| {
            [
                "pub",
                "pub(crate)",
                "pub(super)",
                "async",
                "const",
                "unsafe",
            ]
            .contains(&w)
        });
        if !is_fn || trimmed.starts_with("//") {
            continue;
        }
        let name: String = trimmed[at + 3..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // A declaration without a body (a trait method) ends at its `;`.
        let Some(open) = (i..lines.len()).find(|&j| {
            let l = lines[j].trim_end();
            l.ends_with('{') || l.ends_with(';')
        }) else {
            continue;
        };
        if lines[open].trim_end().ends_with(';') {
            continue;
        }
        let close = format!("{indent}}}");
        let Some(end) = (open + 1..lines.len()).find(|&j| lines[j] == close) else {
            continue;
        };
        let above = i.saturating_sub(6);
        let marked = lines[above..=end].iter().any(|l| l.contains(KEPT_WHOLE));
        found.push((i + 1, name, end - i + 1, marked));
    }
    found
}

#[test]
fn no_function_is_over_the_length_limit_without_a_reason() {
    let mut long = Vec::new();
    for (path, text) in all_sources() {
        for (line, name, n, marked) in functions(&text) {
            if n > MAX_FN_LINES && !marked {
                long.push(format!("{path}:{line}: fn {name} is {n} lines"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines without a `{KEPT_WHOLE}` comment:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_function_scanner_measures_bodies_and_sees_the_mark() {
    let text = "fn short() {\n    1\n}\n\n// Kept whole: a table.\npub(crate) fn marked() {\n    2\n}\ntrait T {\n    fn decl(&self);\n}\n";
    let found = functions(text);
    assert_eq!(
        found,
        vec![
            (1, "short".to_owned(), 3, false),
            (6, "marked".to_owned(), 3, true)
        ]
    );
}
