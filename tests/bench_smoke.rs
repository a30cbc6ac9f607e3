//! `openfhir-cache bench --quick` as a smoke run: it must finish, exit 0 and write a complete
//! report (JSON with every scenario, Markdown, SVG charts). The figures are not asserted: this
//! build is unoptimised and shares the machine with the rest of the suite.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(480);

#[test]
fn bench_quick_writes_a_complete_report() {
    let admin = common::pg::admin_url();
    let out = tempfile::tempdir().expect("temporary directory");
    let stdout = out.path().join("stdout.txt");
    let stderr = out.path().join("stderr.txt");
    let report = out.path().join("report");
    let mut child = Command::new(env!("CARGO_BIN_EXE_openfhir-cache"))
        .args(["bench", "--quick", "--out"])
        .arg(&report)
        .args(["--database-url", &admin])
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("start openfhir-cache bench");
    let started = Instant::now();
    let pid = child.id();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for bench") {
            break s;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "bench --quick still running after {} s\nstderr:\n{}",
                LIMIT.as_secs(),
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out_text = std::fs::read_to_string(&stdout).unwrap_or_default();
    let err_text = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(
        status.success(),
        "bench --quick failed ({status})\nstdout:\n{out_text}\nstderr:\n{err_text}"
    );
    eprintln!(
        "bench --quick took {:.0} s\n{out_text}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out_text.contains("| scenario | target | measured | met |"),
        "{out_text}"
    );

    for f in [
        "report.json",
        "report.md",
        "read_api.svg",
        "read_http.svg",
        "propagation.svg",
        "scale.svg",
        "write.svg",
    ] {
        let p = report.join(f);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{} is missing or empty", p.display());
    }
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(report.join("report.json")).expect("report.json"),
    )
    .expect("report.json is JSON");
    for scenario in [
        "read",
        "cold_start",
        "propagation",
        "scale",
        "write",
        "catchup",
        "helpers",
    ] {
        assert!(
            json[scenario].is_object(),
            "report.json has no {scenario} results"
        );
    }
    assert!(json["meta"]["cpus"].as_u64().is_some_and(|n| n > 0));
    assert!(json["meta"]["postgres_version"]
        .as_str()
        .is_some_and(|v| v.contains("PostgreSQL")));
    let targets = json["targets"].as_array().expect("targets");
    assert!(targets.len() >= 10, "{targets:?}");
    assert!(
        targets
            .iter()
            .any(|t| t["id"] == "helpers_copy" && t["met"].is_boolean()),
        "{targets:?}"
    );
    let svg = std::fs::read_to_string(report.join("scale.svg")).expect("scale.svg");
    assert!(svg.contains("<svg"), "scale.svg is not SVG");

    // Its throwaway database is gone.
    let name = format!("openfhir_bench_{pid}");
    let left: i64 = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .expect("connect to the test server");
            tokio::spawn(conn);
            client
                .query_one(
                    "SELECT count(*) FROM pg_database WHERE datname = $1",
                    &[&name],
                )
                .await
                .expect("query pg_database")
                .get(0)
        });
    assert_eq!(left, 0, "the throwaway database {name} was left behind");
}
