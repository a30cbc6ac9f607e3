//! The shape of `src/`, checked: modules depend one way (the layers in `src/lib.rs`), and no
//! source file grows past 600 lines without saying why at its top.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The library's top-level modules, lowest first: each may use only those before it.
const LAYERS: [&str; 14] = [
    "config",
    "error",
    "rendered",
    "supervise",
    "domain",
    "cache",
    "store",
    "invalidation",
    "cluster",
    "node",
    "bootstrap",
    "api",
    "app",
    "bench",
];

/// A longer file must say so in its first lines, with the reason.
const MAX_LINES: usize = 600;
const LONG_FILE_NOTE: &str = "Longer than 600 lines because";

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/cache/change.rs` -> `cache`), or `None` for the
/// crate root and the binary (`lib.rs`, `main.rs`, `cli.rs`).
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main" | "cli")).then(|| name.to_string())
}

/// Code without `//` comments (doc links name modules without depending on them).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string literal ("http://...") is rare in `use` lines; cutting there
            // can only hide a path, and the paths this test looks for are never in strings.
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every top-level module named by a `crate::` path in `code`: `crate::cache::X` and the heads
/// of a group, `crate::{cache::X, store::{Db, Y}}`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 1;
            let mut head = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => head = true,
                    c if head && depth == 1 && (c.is_ascii_alphabetic() || c == '_') => {
                        found.insert(ident_at(&group[j..]).to_string());
                        head = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident_at(after).to_string());
        }
        rest = after;
    }
    found
}

#[test]
fn modules_depend_one_way() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let Some(&own) = rank.get(module.as_str()) else {
            wrong.push(format!(
                "{}: module `{module}` is not in LAYERS (add it where it belongs)",
                file.display()
            ));
            continue;
        };
        seen.insert(module.clone());
        let text = fs::read_to_string(file).expect("read source");
        for used in crate_paths(&code(&text)) {
            match rank.get(used.as_str()) {
                Some(&r) if r > own => wrong.push(format!(
                    "{}: `{module}` uses `crate::{used}`, a layer above it",
                    file.display()
                )),
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let missing: Vec<_> = LAYERS.iter().filter(|m| !seen.contains(**m)).collect();
    assert!(
        missing.is_empty(),
        "LAYERS names modules that do not exist: {missing:?}"
    );
}

#[test]
fn the_dependency_check_sees_both_path_forms() {
    let code = "use crate::cache::Change;\nuse crate::{store::{Db, X}, node::Node};\nlet x = crate::api::router(s);";
    let found: Vec<_> = crate_paths(code).into_iter().collect();
    assert_eq!(found, ["api", "cache", "node", "store"]);
}

#[test]
fn long_files_say_why() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut long = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).expect("read source");
        let lines = text.lines().count();
        let explained = text.lines().take(40).any(|l| l.contains(LONG_FILE_NOTE));
        if lines > MAX_LINES && !explained {
            long.push(format!("{} ({lines} lines)", file.display()));
        }
    }
    assert!(
        long.is_empty(),
        "split these files by concern, or write \"{LONG_FILE_NOTE} ...\" in their first lines:\n{}",
        long.join("\n")
    );
}
