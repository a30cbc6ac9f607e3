//! Logs of the real binary on stderr: `OPENFHIR_LOG_FORMAT=json` gives one JSON object per line
//! (timestamp, level, target, fields), `RUST_LOG` filters by level and target (default `info`),
//! and the text format carries no colour codes when stderr is not a terminal (here: a file).

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::isolated_cluster_env;
use common::pg::TestDb;
use common::proc::{command, free_port_on, start_serve, ChildGuard};
use serde_json::Value;

const LEVELS: [&str; 5] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Runs `migrate` with `env` plus the database; returns its stderr, asserting success.
fn migrate(dir: &Path, db: &TestDb, env: &[(&str, &str)]) -> String {
    let mut all = vec![("DATABASE_URL", db.url.as_str())];
    all.extend_from_slice(env);
    let out = command(dir, &["migrate"], &all)
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("applied migrations:"),
        "stdout is not for logs: {stdout}"
    );
    stderr
}

/// Starts `serve` with `env` plus the database, a free HTTP port and an isolated cluster,
/// stops it with SIGTERM and returns its stderr, asserting it exited 0.
async fn serve_and_stop(dir: &Path, db: &TestDb, env: &[(&str, &str)]) -> String {
    let addr = format!("127.0.0.1:{}", free_port_on("127.0.0.1"));
    let mut all: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db.url.clone()),
        ("OPENFHIR_HTTP_ADDR".into(), addr.clone()),
        ("OPENFHIR_DB_POOL_SIZE".into(), "2".into()),
    ];
    all.extend(isolated_cluster_env());
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let (mut node, _base): (ChildGuard, String) = start_serve(dir, "serve", &addr, &all).await;
    node.sigterm().await;
    let status = node
        .wait_for_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", node.stderr()));
    assert!(status.success(), "{status}\n{}", node.stderr());
    node.stderr()
}

/// Every line of `stderr` as a JSON log record, checking its shape.
fn json_lines(stderr: &str) -> Vec<Value> {
    assert!(!stderr.trim().is_empty(), "no log lines at all");
    stderr
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\n--- all\n{stderr}"));
            assert!(v["timestamp"].is_string(), "{line}");
            assert!(
                LEVELS.contains(&v["level"].as_str().unwrap_or_default()),
                "{line}"
            );
            assert!(
                !v["target"].as_str().unwrap_or_default().is_empty(),
                "{line}"
            );
            assert!(v["fields"]["message"].is_string(), "{line}");
            v
        })
        .collect()
}

fn levels(lines: &[Value]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l["level"].as_str().unwrap_or_default())
        .collect()
}

fn has_message(lines: &[Value], level: &str, text: &str) -> bool {
    lines.iter().any(|l| {
        l["level"] == level
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(text))
    })
}

#[tokio::test]
async fn json_format_writes_one_object_per_line() {
    let db = TestDb::new().await;
    let dir = tempdir();
    let err = migrate(
        dir.path(),
        &db,
        &[("OPENFHIR_LOG_FORMAT", "json"), ("RUST_LOG", "debug")],
    );
    let lines = json_lines(&err);
    let levels = levels(&lines);
    assert!(
        levels.contains(&"DEBUG"),
        "RUST_LOG=debug shows DEBUG: {err}"
    );
    // The node's own structured fields are JSON fields, not text in the message.
    let applied = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "applied migration"
                && l["target"] == "openfhir_cache::store::migrate"
        })
        .unwrap_or_else(|| panic!("no 'applied migration' record: {err}"));
    assert_eq!(applied["level"], "INFO", "{applied}");
    assert_eq!(applied["fields"]["version"], 1, "{applied}");
    assert!(
        !err.contains('\u{1b}'),
        "escape codes in JSON logs: {err:?}"
    );
}

#[tokio::test]
async fn rust_log_filters_by_level_and_by_target() {
    let db = TestDb::new().await;
    let dir = tempdir();

    // warn: only the warnings of a node without a token and a cluster secret, none of the
    // startup and shutdown INFO lines.
    let err = serve_and_stop(
        dir.path(),
        &db,
        &[("OPENFHIR_LOG_FORMAT", "json"), ("RUST_LOG", "warn")],
    )
    .await;
    let lines = json_lines(&err);
    assert!(
        levels(&lines).iter().all(|l| *l == "WARN" || *l == "ERROR"),
        "RUST_LOG=warn let through: {err}"
    );
    assert!(
        has_message(&lines, "WARN", "OPENFHIR_API_TOKEN is not set"),
        "{err}"
    );
    assert!(
        has_message(&lines, "WARN", "CLUSTER_SECRET is not set"),
        "{err}"
    );

    // The same node at the default level (info) logs its start and its shutdown.
    let err = serve_and_stop(dir.path(), &db, &[("OPENFHIR_LOG_FORMAT", "json")]).await;
    let lines = json_lines(&err);
    assert!(
        has_message(&lines, "INFO", "openfhir-cache node started"),
        "{err}"
    );
    assert!(has_message(&lines, "INFO", "shutdown requested"), "{err}");
    assert!(!levels(&lines).contains(&"DEBUG"), "default is info: {err}");

    // A target directive: debug for this crate, warn for the libraries (whose INFO lines, such
    // as PostgreSQL's NOTICEs during the migration, disappear). A fresh database, so there is
    // something to migrate.
    let fresh = TestDb::new().await;
    let err = migrate(
        dir.path(),
        &fresh,
        &[
            ("OPENFHIR_LOG_FORMAT", "json"),
            ("RUST_LOG", "warn,openfhir_cache=debug"),
        ],
    );
    let lines = json_lines(&err);
    assert!(has_message(&lines, "INFO", "applied migration"), "{err}");
    for l in lines {
        let target = l["target"].as_str().unwrap_or_default();
        assert!(
            target.starts_with("openfhir_cache")
                || matches!(l["level"].as_str(), Some("WARN" | "ERROR")),
            "RUST_LOG=warn,openfhir_cache=debug let through: {l}"
        );
    }
}

#[tokio::test]
async fn text_format_has_no_colour_codes_when_stderr_is_not_a_terminal() {
    let db = TestDb::new().await;
    let dir = tempdir();
    // No OPENFHIR_LOG_FORMAT: text. stderr is a file.
    let err = serve_and_stop(dir.path(), &db, &[("RUST_LOG", "info")]).await;
    assert!(!err.contains('\u{1b}'), "escape codes: {err:?}");
    let started = err
        .lines()
        .find(|l| l.contains("openfhir-cache node started"))
        .unwrap_or_else(|| panic!("no start line: {err}"));
    // "<timestamp>  INFO openfhir_cache::app: openfhir-cache node started http=127.0.0.1:..."
    assert!(started.contains(" INFO openfhir_cache::app: "), "{started}");
    assert!(started.contains(" http=127.0.0.1:"), "{started}");
    assert!(
        err.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_err()),
        "JSON in text format: {err}"
    );
}
