//! Keeps README.md honest: the configuration table matches `config::VARS`, every route in
//! `src/api/mod.rs` is documented with each of its methods, the quick start runs what CI runs.
//! And keeps the documentation in one piece: README stays short and links every page of `docs/`,
//! and every relative link of the Markdown pages names a file (and heading) that exists.
//! No database needed.

use openfhir_cache::config::VARS;

fn read(rel: &str) -> String {
    let path = format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn readme() -> String {
    read("README.md")
}

/// The text of the `## {title}` section, up to the next `## ` heading.
fn section(text: &str, title: &str) -> String {
    let heading = format!("## {title}");
    let mut lines = text.lines().skip_while(|l| l.trim_end() != heading);
    assert!(
        lines.next().is_some(),
        "README.md has no `{heading}` section"
    );
    lines
        .take_while(|l| !l.starts_with("## "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The cells of a Markdown table row (`| a | b |` -> `["a", "b"]`), or `None` if not a row.
/// Escaped pipes (`\|`) stay inside their cell.
fn cells(line: &str) -> Option<Vec<String>> {
    let row = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    let mut out = vec![String::new()];
    let mut chars = row.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    Some(out.into_iter().map(|c| c.trim().to_string()).collect())
}

#[test]
fn configuration_table_matches_vars() {
    let text = readme();
    let config = section(&text, "Configuration");
    for var in VARS {
        let prefix = format!("| `{}`", var.env);
        let rows: Vec<&str> = config
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{prefix} ")) || l.starts_with(&format!("{prefix}|"))
            })
            .collect();
        assert_eq!(
            rows.len(),
            1,
            "README configuration table needs exactly one row starting with {prefix:?}"
        );
        let row = rows[0];
        let c = cells(row).unwrap();
        assert_eq!(
            c.len(),
            3,
            "row must have 3 cells (Variable | Default | Meaning): {row}"
        );
        let shown = c[1].trim_matches('`');
        let want = if var.default.is_empty() {
            "(empty)"
        } else {
            var.default
        };
        assert_eq!(
            shown, want,
            "{}: README default is {:?}, VARS says {:?}",
            var.env, c[1], var.default
        );
        assert!(
            row.contains(&format!("`{}`", var.key)),
            "{}: row must name its file key `{}`: {row}",
            var.env,
            var.key
        );
    }
    // And no row documents a variable that does not exist.
    for line in config.lines() {
        let Some(c) = cells(line) else { continue };
        let name = c[0].trim_matches('`');
        let looks_like_var = c[0].starts_with('`')
            && !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if looks_like_var {
            assert!(
                VARS.iter().any(|v| v.env == name),
                "README documents {name}, which is not in config::VARS"
            );
        }
    }
}

/// Every `.route("path", ...)` of `src/api/mod.rs` with the HTTP methods registered on it.
fn routes(src: &str) -> Vec<(String, Vec<String>)> {
    const METHODS: [&str; 7] = ["get", "post", "put", "delete", "patch", "head", "options"];
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find(".route(") {
        let args_start = i + ".route(".len();
        let args = &rest[args_start..];
        // The arguments, up to the parenthesis that closes `.route(`.
        let mut depth = 1;
        let mut end = args.len();
        for (j, ch) in args.char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let args = &args[..end];
        rest = &rest[args_start + end..];
        let Some(lit) = args.trim_start().strip_prefix('"') else {
            continue;
        };
        let path = lit[..lit.find('"').expect("closing quote")].to_string();
        let bytes = args.as_bytes();
        let mut methods = Vec::new();
        for m in METHODS {
            let call = format!("{m}(");
            let mut from = 0;
            while let Some(k) = args[from..].find(&call) {
                let at = from + k;
                let before = if at == 0 { b' ' } else { bytes[at - 1] };
                if !(before.is_ascii_alphanumeric() || before == b'_' || before == b':') {
                    methods.push(m.to_ascii_uppercase());
                }
                from = at + call.len();
            }
        }
        out.push((path, methods));
    }
    out
}

#[test]
fn every_route_is_documented() {
    let text = readme();
    let found = routes(&read("src/api/mod.rs"));
    assert!(
        found.len() >= 10,
        "parsed only {} routes from src/api/mod.rs; has the router moved?",
        found.len()
    );
    let rows: Vec<Vec<String>> = text.lines().filter_map(cells).collect();
    for (path, methods) in &found {
        assert!(
            text.contains(&format!("`{path}`")),
            "route `{path}` is not mentioned in README.md"
        );
        assert!(!methods.is_empty(), "no method parsed for route {path}");
        for m in methods {
            let documented = rows
                .iter()
                .any(|c| c.len() >= 2 && c[0] == format!("`{m}`") && c[1] == format!("`{path}`"));
            assert!(
                documented,
                "README HTTP API table has no row `| `{m}` | `{path}` | ...`"
            );
        }
    }
}

#[test]
fn quick_start_runs_a_node_and_the_tests() {
    let quick = section(&readme(), "Quick start");
    for cmd in ["cargo run --release -- serve", "cargo test"] {
        assert!(
            quick.contains(cmd),
            "README quick start must contain `{cmd}`"
        );
    }
}

#[test]
fn ci_runs_the_same_cargo_test() {
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == "cargo test"),
        ".ci/run must contain the line `cargo test` (the command README tells people to run)"
    );
}

/// README is the entry point, not the manual: the rest lives in `docs/`.
const README_MAX_LINES: usize = 300;

#[test]
fn readme_stays_short() {
    let n = readme().lines().count();
    assert!(
        n <= README_MAX_LINES,
        "README.md has {n} lines, more than {README_MAX_LINES}: move the detail to a page of docs/ and link it"
    );
}

/// The Markdown pages whose links are checked: README, SECURITY, fuzz/README and every `docs/*.md`.
fn markdown_pages() -> Vec<String> {
    let mut pages = vec![
        "README.md".to_string(),
        "SECURITY.md".to_string(),
        "fuzz/README.md".to_string(),
    ];
    let dir = format!("{}/docs", env!("CARGO_MANIFEST_DIR"));
    let mut docs: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .map(|e| {
            e.expect("docs/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The lines of a Markdown text outside fenced code blocks.
fn prose_lines(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push(line);
        }
    }
    out
}

/// The targets of the inline links and images (`[text](target)`) of a Markdown text, outside
/// fenced code blocks.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose_lines(text) {
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].trim().to_string());
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor of a Markdown text's headings (repeated headings get `-1`, `-2`, ... as on GitHub).
fn anchors(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in prose_lines(text) {
        let hashes = line.bytes().take_while(|b| *b == b'#').count();
        if hashes == 0 || hashes > 6 || line.as_bytes().get(hashes) != Some(&b' ') {
            continue;
        }
        let base = slug(&line[hashes..]);
        let mut anchor = base.clone();
        let mut n = 0;
        while out.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        out.push(anchor);
    }
    out
}

#[test]
fn readme_links_every_docs_page_and_they_exist() {
    let text = readme();
    let linked: Vec<String> = link_targets(&text)
        .into_iter()
        .map(|t| t.split('#').next().unwrap_or_default().to_string())
        .filter(|t| t.starts_with("docs/") && t.ends_with(".md"))
        .collect();
    for page in &linked {
        let path = format!("{}/{page}", env!("CARGO_MANIFEST_DIR"));
        assert!(
            std::path::Path::new(&path).is_file(),
            "README.md links {page}, which does not exist"
        );
    }
    for page in markdown_pages()
        .into_iter()
        .filter(|p| p.starts_with("docs/"))
    {
        assert!(
            linked.contains(&page),
            "{page} is not linked from README.md (the README is the table of contents)"
        );
    }
}

#[test]
fn relative_links_name_existing_files_and_headings() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    for page in markdown_pages() {
        let text = read(&page);
        let dir = root
            .join(&page)
            .parent()
            .expect("page has a directory")
            .to_path_buf();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let (path, linked_text) = if file.is_empty() {
                (root.join(&page), text.clone())
            } else {
                let path = dir.join(file);
                if !path.exists() {
                    broken.push(format!("{page}: ({target}): no such file"));
                    continue;
                }
                let linked_text = if file.ends_with(".md") {
                    std::fs::read_to_string(&path).unwrap_or_default()
                } else {
                    String::new()
                };
                (path, linked_text)
            };
            if let Some(anchor) = anchor {
                if path.extension().is_some_and(|e| e == "md")
                    && !anchors(&linked_text).iter().any(|a| a == anchor)
                {
                    broken.push(format!("{page}: ({target}): no heading with that anchor"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn slugs_are_githubs() {
    assert_eq!(slug(" `GET /cluster`"), "get-cluster");
    assert_eq!(
        slug(" Discovery (`CLUSTER_DISCOVERY`)"),
        "discovery-cluster_discovery"
    );
    assert_eq!(slug(" openFHIR's state API"), "openfhirs-state-api");
    assert_eq!(slug(" Chaos (`tests/chaos.rs`)"), "chaos-testschaosrs");
}
