//! Measures how long a node serves a value after it changed in PostgreSQL, per channel.
//! Not part of the regular suite (it asserts nothing about time); run by hand:
//!
//! ```sh
//! cargo test --release --test it stale_window:: -- --ignored --nocapture
//! ```

use crate::common;

use std::time::{Duration, Instant};

use common::{opt_xml, spawn_with, TestApp};

const WRITES: usize = 40;

/// Time from COMMIT of a plain-SQL UPDATE until the node stops serving the old value.
async fn measure(app: &TestApp, label: &str) -> Vec<Duration> {
    let sql = app.sql().await;
    let mut windows = Vec::with_capacity(WRITES);
    for i in 0..WRITES {
        let marker = format!("{label}-{i}");
        app.node.opt("default", "t1").await.unwrap();
        sql.execute(
            "UPDATE opt SET content = $1 WHERE tenant = 'default' AND template_id = 't1'",
            &[&opt_xml("t1", &marker)],
        )
        .await
        .unwrap();
        let committed = Instant::now();
        loop {
            let o = app.node.opt("default", "t1").await.unwrap();
            if o.template.concept.as_deref() == Some(marker.as_str()) {
                windows.push(committed.elapsed());
                break;
            }
            assert!(
                committed.elapsed() < Duration::from_secs(30),
                "{label}: never converged"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    windows.sort();
    windows
}

fn row(label: &str, w: &[Duration]) {
    let pct = |p: f64| w[((w.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "| {label} | {:.1} ms | {:.1} ms | {:.1} ms |",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        w[w.len() - 1].as_secs_f64() * 1e3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn stale_windows() {
    let mut table = Vec::new();
    for (label, env) in [
        (
            "NOTIFY (catch-up off)",
            [
                ("OPENFHIR_PG_NOTIFY", "true"),
                ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
            ],
        ),
        (
            "NOTIFY lost: catch-up alone, interval 1000 ms",
            [
                ("OPENFHIR_PG_NOTIFY", "false"),
                ("OPENFHIR_CATCHUP_INTERVAL_MS", "1000"),
            ],
        ),
        (
            "NOTIFY lost: catch-up alone, interval 100 ms",
            [
                ("OPENFHIR_PG_NOTIFY", "false"),
                ("OPENFHIR_CATCHUP_INTERVAL_MS", "100"),
            ],
        ),
    ] {
        let app = spawn_with(&env).await;
        assert_eq!(app.put_opt("t1", &opt_xml("t1", "v0")).await, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
        table.push((label, measure(&app, label).await));
        app.stop().await;
    }

    // Database down: the server restarts; a change made right after it is back.
    let server = common::pg::PrivateServer::new();
    let app = common::spawn_url(&server.url(), &[]).await;
    assert_eq!(app.put_opt("t1", &opt_xml("t1", "v0")).await, 200);
    let mut after_restart = Vec::new();
    for i in 0..5 {
        app.node.opt("default", "t1").await.unwrap();
        server.restart();
        let sql = app.sql().await;
        let marker = format!("restart-{i}");
        sql.execute(
            "UPDATE opt SET content = $1 WHERE template_id = 't1'",
            &[&opt_xml("t1", &marker)],
        )
        .await
        .unwrap();
        let t = Instant::now();
        loop {
            if let Ok(o) = app.node.opt("default", "t1").await {
                if o.template.concept.as_deref() == Some(marker.as_str()) {
                    after_restart.push(t.elapsed());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    after_restart.sort();
    table.push((
        "database restarted, change right after (defaults)",
        after_restart,
    ));

    println!("\n| failure / channel | p50 | p99 | max |\n|---|---|---|---|");
    for (label, w) in &table {
        row(label, w);
    }
}
