//! Size-bounded caches (`OPENFHIR_CACHE_OPT_MAX_BYTES`): a node serves many times its bound in
//! OPTs, read over and over, and its resident memory stays bounded while every read is right.
//!
//! Two real `serve` processes read the same database: one with an 8 MiB OPT bound, one unbounded
//! (`-1`), as the control that shows the measurement sees what a cache keeps (without it, a
//! bounded node's small growth could just as well mean the OPTs were never cached). Resident
//! memory is `VmRSS` from `/proc/PID/status`.

use std::time::Duration;

use crate::common::pg::TestDb;
use crate::common::proc::{free_port, http, start_serve, ChildGuard};

/// OPTs uploaded: 64 of about 1 MiB each, eight times the bounded node's bound.
const OPTS: usize = 64;
/// Padding per OPT (an XML comment), so each weighs about a MiB of text.
const PAD: usize = 1 << 20;
/// The bounded node's `OPENFHIR_CACHE_OPT_MAX_BYTES`.
const BOUND: u64 = 8 << 20;

/// The growth-chart OPT under a template id of its own, `marker` as its concept, padded to about
/// [`PAD`] bytes.
fn big_opt(n: usize, marker: &str) -> String {
    let id = format!("Big {n}");
    let xml = openfhir_cache::bench::data::OPT.replacen(
        "<template_id><value>Growth chart</value></template_id>\n  <concept>Growth chart</concept>",
        &format!("<template_id><value>{id}</value></template_id>\n  <concept>{marker}</concept>"),
        1,
    );
    assert!(xml.contains(marker), "the fixture's header changed");
    let pad = format!("<!-- {} -->\n  ", "p".repeat(PAD));
    xml.replacen("<language>", &format!("{pad}<language>"), 1)
}

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

async fn node(dir: &std::path::Path, name: &str, db: &str, bound: &str) -> (ChildGuard, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db.into()),
        ("OPENFHIR_HTTP_ADDR".into(), addr.clone()),
        ("OPENFHIR_DB_POOL_SIZE".into(), "4".into()),
        ("OPENFHIR_CACHE_OPT_MAX_BYTES".into(), bound.into()),
    ];
    env.extend(crate::common::isolated_cluster_env());
    start_serve(dir, name, &addr, &env).await
}

/// Reads every OPT once in order, checking each body; returns the node's RSS afterwards.
async fn read_all(client: &reqwest::Client, base: &str, pid: u32, round: usize) -> u64 {
    for n in 0..OPTS {
        let r = client
            .get(format!("{base}/opt/big_{n}"))
            .send()
            .await
            .expect("GET /opt");
        assert_eq!(r.status(), 200, "round {round}, OPT {n}");
        let body = r.text().await.expect("body");
        assert!(
            body.contains(&format!("<concept>marker-{n}</concept>")) && body.len() > PAD,
            "round {round}: OPT {n} came back wrong ({} bytes)",
            body.len()
        );
    }
    rss(pid)
}

async fn opt_cache(client: &reqwest::Client, base: &str) -> serde_json::Value {
    let caches: serde_json::Value = client
        .get(format!("{base}/caches"))
        .send()
        .await
        .expect("GET /caches")
        .json()
        .await
        .expect("JSON");
    caches["caches"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["cache"] == "opt"))
        .cloned()
        .expect("the opt cache in /caches")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_node_serves_eight_times_its_bound_in_bounded_memory() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut bounded, b_base) = node(dir.path(), "bounded", &db.url, &BOUND.to_string()).await;
    let (mut unbounded, u_base) = node(dir.path(), "unbounded", &db.url, "-1").await;
    let client = http();
    let upload = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    for n in 0..OPTS {
        let r = upload
            .post(format!("{b_base}/opt"))
            .header("content-type", "application/xml")
            .body(big_opt(n, &format!("marker-{n}")))
            .send()
            .await
            .expect("POST /opt");
        assert!(r.status().is_success(), "upload {n}: {}", r.status());
    }

    // Round 1 fills the caches; later rounds must not grow the bounded node any further.
    let (b0, u0) = (rss(bounded.pid()), rss(unbounded.pid()));
    let mut b_peak = 0;
    let mut u_last = 0;
    for round in 1..=3 {
        b_peak = b_peak.max(read_all(&client, &b_base, bounded.pid(), round).await);
        u_last = read_all(&client, &u_base, unbounded.pid(), round).await;
    }
    bounded.assert_running();
    unbounded.assert_running();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let (b_growth, u_growth) = (b_peak.saturating_sub(b0), u_last.saturating_sub(u0));
    eprintln!(
        "RSS growth over 3 rounds of {OPTS} OPTs of {:.1} MiB: bounded ({:.0} MiB bound) {:.1} MiB, \
         unbounded {:.1} MiB",
        mib(PAD as u64),
        mib(BOUND),
        mib(b_growth),
        mib(u_growth)
    );

    // The control: an unbounded cache keeps every OPT, at least their text.
    let u_opt = opt_cache(&client, &u_base).await;
    assert_eq!(u_opt["entries"], OPTS, "unbounded: {u_opt}");
    assert!(
        u_growth > (OPTS * PAD) as u64 * 3 / 4,
        "the unbounded node grew by only {:.1} MiB: the measurement does not see what a cache keeps",
        mib(u_growth)
    );

    // The bounded node: within its bound plus working room (a request's body, a parse, the
    // allocator's spare), far below what it served.
    let b_opt = opt_cache(&client, &b_base).await;
    let held = b_opt["weight"].as_u64().expect("weight");
    assert!(held <= BOUND, "bounded cache holds {held} bytes: {b_opt}");
    assert!(
        b_opt["size_evictions"].as_u64().unwrap_or(0) > 0,
        "nothing was evicted for size: {b_opt}"
    );
    assert_eq!(b_opt["bound"]["max_bytes"], BOUND, "{b_opt}");
    assert!(
        b_growth < BOUND + (24 << 20),
        "the bounded node grew by {:.1} MiB with an {:.0} MiB bound",
        mib(b_growth),
        mib(BOUND)
    );
    let metrics = client
        .get(format!("{b_base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let evicted = metrics
        .lines()
        .find(|l| l.starts_with("openfhir_cache_size_evictions_total{cache=\"opt\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("openfhir_cache_size_evictions_total for opt in /metrics");
    assert!(evicted > 0, "{evicted}");
    assert!(
        metrics.contains(&format!(
            "openfhir_cache_max_bytes{{cache=\"opt\"}} {BOUND}"
        )),
        "openfhir_cache_max_bytes for opt missing"
    );
}
