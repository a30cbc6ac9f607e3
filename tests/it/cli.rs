//! The real `openfhir-cache` binary: `config`, `migrate` and `serve`, run as child processes
//! with a cleared environment (only `PATH` plus what each test sets) in an empty working
//! directory (so no stray `openfhir-cache.toml` is picked up).

use crate::common;

use std::path::Path;
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use common::pg::TestDb;
use common::proc::{
    catches_sigterm, command, free_port as closed_port, http, wait_live, ChildGuard,
};
use openfhir_cache::store::migrate::MIGRATIONS;
use serde_json::Value;

/// Runs to completion (for commands that end by themselves: `config`, `migrate`).
fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    command(dir, args, env).output().expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn describe(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        stdout(o),
        stderr(o)
    )
}

/// `config` output parsed as JSON, asserting success.
fn config_json(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut all = vec!["config"];
    all.extend_from_slice(args);
    let o = run(dir, &all, env);
    assert!(o.status.success(), "{}", describe(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&o)))
}

/// `config` that must fail with exit code 2; returns stderr.
fn config_fails(dir: &Path, env: &[(&str, &str)]) -> String {
    let o = run(dir, &["config"], env);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(o.stdout.is_empty(), "nothing on stdout: {}", describe(&o));
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// A port nothing listens on (bound, then released).
/// Starts `serve` on a free local port; returns the guard and the base URL once
/// `/health/live` answers.
async fn start_serve(
    dir: &Path,
    extra_args: &[&str],
    db_url: &str,
    name: &str,
) -> (ChildGuard, String) {
    let addr = format!("127.0.0.1:{}", closed_port());
    let mut env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db_url.into()),
        ("OPENFHIR_HTTP_ADDR".into(), addr.clone()),
        ("OPENFHIR_DB_POOL_SIZE".into(), "2".into()),
    ];
    env.extend(common::isolated_cluster_env());
    let mut args = vec!["serve"];
    args.extend_from_slice(extra_args);
    let guard = ChildGuard::spawn(command(dir, &args, &env), dir, name);
    let base = format!("http://{addr}");
    wait_live(guard, base).await
}

async fn migration_rows(db: &TestDb) -> Vec<(i32, i64)> {
    db.connect()
        .await
        .query(
            "SELECT version, count(*) FROM openfhir_schema_migrations GROUP BY version ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn expected_migration_rows() -> Vec<(i32, i64)> {
    MIGRATIONS.iter().map(|m| (m.version, 1)).collect()
}

// ---------------------------------------------------------------------------
// config
// ---------------------------------------------------------------------------

#[test]
fn config_with_nothing_set_prints_the_defaults() {
    let dir = tempdir();
    let c = config_json(dir.path(), &[], &[]);
    assert_eq!(c["cache"]["opt_ttl"], -1, "{c}");
    assert_eq!(c["cache"]["fhir_connect_ttl"], -1, "{c}");
    assert_eq!(c["cache"]["tenant_ttl"], -1, "{c}");
    assert_eq!(c["cluster"]["discovery"], "MULTICAST", "{c}");
    assert_eq!(c["cluster"]["port"], 7800, "{c}");
    assert_eq!(c["cluster"]["initial_hosts"], serde_json::json!([]), "{c}");
    assert_eq!(c["http"]["addr"], "0.0.0.0:8080", "{c}");
    assert_eq!(c["http"]["max_body_bytes"], 16 * 1024 * 1024, "{c}");
    assert!(c["http"]["api_token"].is_null(), "{c}");
    assert_eq!(
        c["database"]["url"], "postgres://postgres@127.0.0.1:5432/postgres",
        "{c}"
    );
    assert_eq!(c["log"]["format"], "text", "{c}");
}

#[test]
fn config_masks_secrets() {
    let dir = tempdir();
    let o = run(
        dir.path(),
        &["config"],
        &[
            ("OPENFHIR_API_TOKEN", "tok-Zq8-secret"),
            ("DATABASE_URL", "postgres://app:hunter2pw@db.example:5432/x"),
        ],
    );
    assert!(o.status.success(), "{}", describe(&o));
    let out = stdout(&o);
    assert!(!out.contains("tok-Zq8-secret"), "{out}");
    assert!(!out.contains("hunter2pw"), "{out}");
    let c: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(c["http"]["api_token"], "***", "{c}");
    assert_eq!(
        c["database"]["url"], "postgres://app:***@db.example:5432/x",
        "{c}"
    );
    assert!(!stderr(&o).contains("hunter2pw") && !stderr(&o).contains("tok-Zq8-secret"));
}

#[test]
fn config_masks_passwords_in_every_url_form() {
    let dir = tempdir();
    for url in [
        "postgres://app@db.example:5432/x?password=hunter2pw",
        "postgresql:///x?host=db.example&user=app&password=hunter2pw",
        "host=db.example user=app password = hunter2pw",
        "host=db.example user=app password='hunter2pw and more'",
    ] {
        let o = run(dir.path(), &["config"], &[("DATABASE_URL", url)]);
        assert!(o.status.success(), "{url}: {}", describe(&o));
        let out = stdout(&o);
        assert!(
            !out.contains("hunter2pw") && !out.contains("and more"),
            "{url}: {out}"
        );
    }
}

#[test]
fn invalid_database_url_error_masks_the_password() {
    let dir = tempdir();
    for url in [
        "postgres://app:hunter2pw@db.example:99999/x",
        "postgres://app:hunter2pw@db.example:5432/x?sslmode=bogus",
    ] {
        let err = config_fails(dir.path(), &[("DATABASE_URL", url)]);
        assert!(err.contains("DATABASE_URL"), "{err}");
        assert!(!err.contains("hunter2pw"), "{url}: {err}");
    }
}

#[test]
fn config_rejects_invalid_values_naming_the_variable() {
    let dir = tempdir();
    let err = config_fails(dir.path(), &[("OPENFHIR_CACHE_OPT_TTL", "5m")]);
    assert!(
        err.contains("OPENFHIR_CACHE_OPT_TTL") && err.contains("5m"),
        "{err}"
    );

    let err = config_fails(dir.path(), &[("CLUSTER_DISCOVERY", "DNS")]);
    assert!(err.contains("CLUSTER_DNS_QUERY"), "{err}");

    let err = config_fails(dir.path(), &[("CLUSTER_DISCOVERY", "TCP")]);
    assert!(err.contains("CLUSTER_INITIAL_HOSTS"), "{err}");

    let err = config_fails(
        dir.path(),
        &[
            ("CLUSTER_DISCOVERY", "TCP"),
            ("CLUSTER_INITIAL_HOSTS", "node-1[7800],node-2:7800"),
        ],
    );
    assert!(
        err.contains("CLUSTER_INITIAL_HOSTS") && err.contains("node-2:7800"),
        "{err}"
    );

    let err = config_fails(dir.path(), &[("CLUSTER_DISCOVERY", "gossip")]);
    assert!(
        err.contains("CLUSTER_DISCOVERY") && err.contains("gossip"),
        "{err}"
    );

    // Valid settings together.
    let c = config_json(
        dir.path(),
        &[],
        &[
            ("CLUSTER_DISCOVERY", "tcp"),
            (
                "CLUSTER_INITIAL_HOSTS",
                "node-1[7800], 10.0.0.2[7801],[::1][7802]",
            ),
            ("OPENFHIR_CACHE_OPT_TTL", "300"),
            ("OPENFHIR_CACHE_TENANT_TTL", "0"),
        ],
    );
    assert_eq!(c["cluster"]["discovery"], "TCP", "{c}");
    assert_eq!(
        c["cluster"]["initial_hosts"],
        serde_json::json!(["node-1[7800]", "10.0.0.2[7801]", "[::1][7802]"]),
        "{c}"
    );
    assert_eq!(c["cache"]["opt_ttl"], 300, "{c}");
    assert_eq!(c["cache"]["tenant_ttl"], 0, "{c}");
}

#[test]
fn config_file_then_environment() {
    let dir = tempdir();
    let file = dir.path().join("custom.toml");
    std::fs::write(
        &file,
        "[cache]\nopt_ttl = 300\ntenant_ttl = 60\n\n[cluster]\ndiscovery = \"TCP\"\nport = 7900\ninitial_hosts = [\"a[1]\", \"b[2]\"]\n\n[http]\naddr = \"127.0.0.1:9999\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();

    let c = config_json(dir.path(), &["--config", path], &[]);
    assert_eq!(c["cache"]["opt_ttl"], 300, "{c}");
    assert_eq!(c["cache"]["tenant_ttl"], 60, "{c}");
    assert_eq!(
        c["cache"]["fhir_connect_ttl"], -1,
        "defaults fill the rest: {c}"
    );
    assert_eq!(c["cluster"]["discovery"], "TCP", "{c}");
    assert_eq!(c["cluster"]["port"], 7900, "{c}");
    assert_eq!(
        c["cluster"]["initial_hosts"],
        serde_json::json!(["a[1]", "b[2]"]),
        "{c}"
    );
    assert_eq!(c["http"]["addr"], "127.0.0.1:9999", "{c}");

    // The environment overrides the file.
    let c = config_json(
        dir.path(),
        &["--config", path],
        &[("OPENFHIR_CACHE_OPT_TTL", "5"), ("CLUSTER_PORT", "7901")],
    );
    assert_eq!(c["cache"]["opt_ttl"], 5, "{c}");
    assert_eq!(c["cluster"]["port"], 7901, "{c}");
    assert_eq!(c["cache"]["tenant_ttl"], 60, "{c}");

    // --config also works after the subcommand (global flag).
    let c = config_json(dir.path(), &[], &[]);
    assert_eq!(c["cache"]["opt_ttl"], -1, "no file without --config: {c}");
    let o = run(dir.path(), &["config", "--config", path], &[]);
    assert!(o.status.success(), "{}", describe(&o));

    // ./openfhir-cache.toml is read when present.
    std::fs::copy(&file, dir.path().join("openfhir-cache.toml")).unwrap();
    let c = config_json(dir.path(), &[], &[]);
    assert_eq!(c["cache"]["opt_ttl"], 300, "{c}");

    // A bad value in the file names the key and the file.
    std::fs::write(&file, "[cache]\nopt_ttl = \"5m\"\n").unwrap();
    let o = run(dir.path(), &["--config", path, "config"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    let err = stderr(&o);
    assert!(
        err.contains("cache.opt_ttl") && err.contains("5m") && err.contains("custom.toml"),
        "{err}"
    );

    // A malformed file fails naming it.
    std::fs::write(&file, "[cache\n").unwrap();
    let o = run(dir.path(), &["--config", path, "config"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(stderr(&o).contains("custom.toml"), "{}", describe(&o));
}

#[test]
fn missing_config_file_fails_naming_it() {
    let dir = tempdir();
    let missing = dir.path().join("nope.toml");
    let o = run(
        dir.path(),
        &["--config", missing.to_str().unwrap(), "config"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(o.stdout.is_empty(), "{}", describe(&o));
    let err = stderr(&o);
    assert!(err.contains("nope.toml"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

// ---------------------------------------------------------------------------
// Unreachable database
// ---------------------------------------------------------------------------

/// Runs `args` against a database URL on a closed port; returns the output. Fails the test if
/// the process does not exit by itself in time.
fn run_against_closed_port(
    dir: &Path,
    args: &[&str],
    url: &str,
    name: &str,
) -> (ExitStatus, String) {
    let cmd = command(
        dir,
        args,
        &[("DATABASE_URL", url), ("OPENFHIR_HTTP_ADDR", "127.0.0.1:0")],
    );
    let mut child = ChildGuard::spawn(cmd, dir, name);
    let status = child
        .wait_for_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("{args:?} did not exit within 15 s:\n{}", child.stderr()));
    (status, child.stderr())
}

#[test]
fn serve_with_an_unreachable_database_says_so_and_exits() {
    let dir = tempdir();
    let port = closed_port();
    let url = format!("postgres://u:pw@127.0.0.1:{port}/x");
    let masked = format!("postgres://u:***@127.0.0.1:{port}/x");
    for (args, name) in [(&["serve"][..], "serve"), (&["migrate"][..], "migrate")] {
        let (status, err) = run_against_closed_port(dir.path(), args, &url, name);
        assert!(!status.success(), "{name} exits non-zero: {status}\n{err}");
        assert!(
            status.code().is_some(),
            "{name} exited, was not killed: {status}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("pw"), "password shown: {err}");
        let line = err
            .lines()
            .find(|l| l.contains("cannot reach the database at"))
            .unwrap_or_else(|| panic!("{name}: no clear message:\n{err}"));
        assert!(line.contains(&masked), "{line}");
        if name == "serve" {
            // The same line tells how to fix it.
            assert!(line.contains("DATABASE_URL"), "{line}");
        }
    }
}

#[test]
fn unreachable_database_message_masks_a_query_password() {
    let dir = tempdir();
    let port = closed_port();
    let url = format!("postgres://u@127.0.0.1:{port}/x?password=hunter2pw");
    let (status, err) = run_against_closed_port(dir.path(), &["serve"], &url, "serve");
    assert!(!status.success(), "{err}");
    assert!(err.contains("cannot reach the database at"), "{err}");
    assert!(!err.contains("hunter2pw"), "{err}");
}

// ---------------------------------------------------------------------------
// migrate
// ---------------------------------------------------------------------------

#[tokio::test]
async fn migrate_applies_once_then_is_a_no_op() {
    let db = TestDb::new().await;
    let dir = tempdir();
    let env = [("DATABASE_URL", db.url.as_str())];
    let o = run(dir.path(), &["migrate"], &env);
    assert!(o.status.success(), "{}", describe(&o));
    let versions: Vec<String> = MIGRATIONS.iter().map(|m| m.version.to_string()).collect();
    assert!(
        stdout(&o).contains(&format!("applied migrations: [{}]", versions.join(", "))),
        "{}",
        describe(&o)
    );
    assert_eq!(migration_rows(&db).await, expected_migration_rows());

    let o = run(dir.path(), &["migrate"], &env);
    assert!(o.status.success(), "{}", describe(&o));
    assert!(
        stdout(&o).contains("applied migrations: []"),
        "{}",
        describe(&o)
    );
    assert_eq!(migration_rows(&db).await, expected_migration_rows());
    let tenants: i64 = db
        .connect()
        .await
        .query_one("SELECT count(*) FROM tenant WHERE id = 'default'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tenants, 1);
}

#[tokio::test]
async fn concurrent_migrations_apply_each_version_once() {
    let db = TestDb::new().await;
    let dir = tempdir();
    let env = [("DATABASE_URL", db.url.as_str())];
    let mut children: Vec<ChildGuard> = (0..4)
        .map(|i| {
            ChildGuard::spawn(
                command(dir.path(), &["migrate"], &env),
                dir.path(),
                &format!("migrate-{i}"),
            )
        })
        .collect();
    for (i, c) in children.iter_mut().enumerate() {
        let status = c
            .wait_for_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("migrate {i} did not finish:\n{}", c.stderr()));
        assert!(status.success(), "migrate {i}: {status}\n{}", c.stderr());
    }
    assert_eq!(migration_rows(&db).await, expected_migration_rows());
    let tenants: i64 = db
        .connect()
        .await
        .query_one("SELECT count(*) FROM tenant", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tenants, 1, "the default tenant once");
}

// ---------------------------------------------------------------------------
// serve
// ---------------------------------------------------------------------------

#[tokio::test]
async fn serve_no_migrate_is_not_ready_until_migrated() {
    let db = TestDb::new().await;
    let dir = tempdir();
    let (mut node, base) = start_serve(dir.path(), &["--no-migrate"], &db.url, "serve").await;
    let client = http();

    let r = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "not ready", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("migrate"),
        "{body}"
    );
    assert!(
        migration_rows_table_missing(&db).await,
        "--no-migrate applied nothing"
    );

    let o = run(
        dir.path(),
        &["migrate"],
        &[("DATABASE_URL", db.url.as_str())],
    );
    assert!(o.status.success(), "{}", describe(&o));

    let r = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, serde_json::json!({ "status": "ready" }));
    // And it serves.
    let r = client.get(format!("{base}/opt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    node.assert_running();
}

async fn migration_rows_table_missing(db: &TestDb) -> bool {
    db.connect()
        .await
        .query_one(
            "SELECT to_regclass('openfhir_schema_migrations') IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn serve_migrates_and_stops_cleanly_on_sigterm() {
    let db = TestDb::new().await;
    let dir = tempdir();
    let (mut node, base) = start_serve(dir.path(), &[], &db.url, "serve").await;
    let client = http();
    // `serve` applied the migrations itself.
    let r = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(migration_rows(&db).await, expected_migration_rows());

    // `health` (the container HEALTHCHECK) probes /health/live: 0 when up, non-zero when not.
    let up = run(dir.path(), &["health", "--url", &base], &[]);
    assert!(up.status.success(), "{}", describe(&up));
    let down_url = format!("http://127.0.0.1:{}", closed_port());
    let down = run(dir.path(), &["health", "--url", &down_url], &[]);
    assert!(!down.status.success(), "{}", describe(&down));
    assert!(
        stderr(&down).contains("/health/live"),
        "{}",
        describe(&down)
    );

    // Wait until the SIGTERM handler is installed (bounded), then send SIGTERM.
    let pid = node.pid();
    for _ in 0..100 {
        if catches_sigterm(pid) {
            break;
        }
        node.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        catches_sigterm(pid),
        "no SIGTERM handler:\n{}",
        node.stderr()
    );
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let status = node
        .wait_for_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no exit within 15 s after SIGTERM:\n{}", node.stderr()));
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        node.stderr()
    );
    assert!(!node.stderr().contains("panicked"), "{}", node.stderr());
}

#[test]
fn a_server_that_refuses_the_login_gets_its_own_hint() {
    let dir = tempdir();
    let admin = common::pg::admin_url();
    let port = admin
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let url = format!("postgres://no_such_role@127.0.0.1:{port}/postgres");
    let out = run(dir.path(), &["migrate"], &[("DATABASE_URL", &url)]);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = stderr(&out);
    assert!(err.contains("refused the login"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The crates only the benchmark harness needs: what `default-features = false` must leave out.
const BENCH_CRATES: [&str; 5] = ["indicatif", "plotters", "redis", "hdrhistogram", "reqwest"];

/// The names of the crates the library depends on (normal edges only), with or without the
/// default features.
fn dependency_names(default_features: bool) -> Vec<String> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let mut args = vec![
        "tree",
        "--manifest-path",
        manifest,
        "--edges",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
        "--locked",
        "--offline",
    ];
    if !default_features {
        args.push("--no-default-features");
    }
    let out = Command::new(env!("CARGO"))
        .args(&args)
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree: {}", describe(&out));
    stdout(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn embedding_without_default_features_leaves_the_bench_crates_out() {
    let with = dependency_names(true);
    for krate in BENCH_CRATES {
        assert!(
            with.iter().any(|n| n == krate),
            "{krate} is no longer a dependency of the bench feature: update BENCH_CRATES"
        );
    }
    let without = dependency_names(false);
    let pulled: Vec<_> = BENCH_CRATES
        .iter()
        .filter(|k| without.iter().any(|n| n == *k))
        .collect();
    assert!(
        pulled.is_empty(),
        "`default-features = false` still pulls {pulled:?}"
    );
}
