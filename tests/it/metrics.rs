//! `/metrics` as a scraper sees it: two real nodes on loopback addresses (127.0.91.x) serve
//! requests, load their caches and receive invalidations over the peer channel, NOTIFY and
//! catch-up; hosts with hostile node ids try to join; then both formats of every node's scrape
//! are parsed by the official Prometheus Python client's parsers.
//!
//! Why those parsers: they are the Prometheus project's own reference implementations of both
//! exposition formats (`prometheus_client.parser` for text 0.0.4, and
//! `prometheus_client.openmetrics.parser`, which rejects anything outside the OpenMetrics 1.0
//! grammar: unescaped or unknown label syntax, a missing `# EOF`, a counter without `_total`,
//! histogram buckets out of order, clashing families). They are packaged by Debian
//! (`python3-prometheus-client`, which `.ci/run` installs), so the test needs no network and no
//! Go toolchain. A line a label value broke open shows up as a parse error or as a family of its
//! own, and the test fails on both.
//!
//! The interpreter is `$TEST_PYTHON`, else the first of `/usr/bin/python3` and `python3` that
//! can import the parsers; without one the test fails and says how to install it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::common::pg::TestDb;
use crate::common::{opt_xml, spawn_url, unique_tag, wait_for, TestApp};
use openfhir_cache::cluster::{self, Identity, RejectReason};
use openfhir_cache::invalidation::ListenerState;
use serde::Deserialize;
use tokio::net::TcpStream;

/// A metric family as the Python parsers return it.
#[derive(Debug, Deserialize)]
struct Family {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    samples: Vec<Sample>,
}

#[derive(Debug, Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Which parser: the classic text format or OpenMetrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    OpenMetrics,
}

const PARSE: &str = r#"
import json, sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
text = sys.stdin.read()
out = [
    {"name": f.name, "type": f.type,
     "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
    for f in text_string_to_metric_families(text)
]
json.dump(out, sys.stdout)
"#;

fn python() -> String {
    let candidates: Vec<String> = match std::env::var("TEST_PYTHON") {
        Ok(p) if !p.is_empty() => vec![p],
        _ => vec!["/usr/bin/python3".into(), "python3".into()],
    };
    for p in &candidates {
        let ok = Command::new(p)
            .args([
                "-c",
                "import prometheus_client.openmetrics.parser, prometheus_client.parser",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return p.clone();
        }
    }
    panic!(
        "no Python with the Prometheus client's parsers among {candidates:?}: install them with \
         `apt-get install python3-prometheus-client` (as .ci/run does) or \
         `pip install prometheus-client`, or set TEST_PYTHON"
    );
}

/// Parses `text` with the official parser of `format`; panics with the parser's error.
fn parse(text: &str, format: Format) -> Vec<Family> {
    use std::io::Write;
    let arg = match format {
        Format::Text => "text",
        Format::OpenMetrics => "openmetrics",
    };
    let mut child = Command::new(python())
        .args(["-c", PARSE, arg])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write the scrape to the parser");
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "the {arg} parser refused the scrape: {}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser JSON")
}

/// One scrape of `app` in `format`, checked for its content type, and parsed.
async fn scrape(app: &TestApp, format: Format) -> (String, Vec<Family>) {
    let mut req = app.client.get(app.url("/metrics"));
    if format == Format::OpenMetrics {
        // What Prometheus sends.
        req = req.header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        );
    }
    let r = req.send().await.expect("scrape");
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    let want = match format {
        Format::Text => "text/plain; version=0.0.4",
        Format::OpenMetrics => "application/openmetrics-text; version=1.0.0",
    };
    assert!(ct.starts_with(want), "content type {ct} for {format:?}");
    let text = r.text().await.unwrap();
    let families = parse(&text, format);
    (text, families)
}

/// The value of the sample `name` whose labels include `labels`.
fn value(fams: &[Family], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    fams.iter()
        .flat_map(|f| &f.samples)
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn family<'a>(fams: &'a [Family], name: &str) -> &'a Family {
    fams.iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no family {name} in {:?}", names(fams)))
}

fn names(fams: &[Family]) -> Vec<&str> {
    fams.iter().map(|f| f.name.as_str()).collect()
}

/// Settings of a node of the two-node cluster at `ip:7800`.
fn node_env(name: &str, ip: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("CLUSTER_NAME".into(), name.into()),
        ("CLUSTER_BIND_ADDR".into(), ip.into()),
        ("CLUSTER_PORT".into(), "7800".into()),
        ("CLUSTER_DISCOVERY".into(), "TCP".into()),
        (
            "CLUSTER_INITIAL_HOSTS".into(),
            "127.0.91.2[7800],127.0.91.3[7800]".into(),
        ),
        ("CLUSTER_HEARTBEAT_MS".into(), "100".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

async fn start(db_url: &str, env: &[(String, String)]) -> TestApp {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    spawn_url(db_url, &env).await
}

fn linked(app: &TestApp) -> bool {
    app.node
        .cluster()
        .peers()
        .iter()
        .any(|p| p.state == cluster::PeerState::Alive && p.inbound && p.outbound)
}

/// The histogram series of `name` with `labels`: its `_count`, after checking that its buckets
/// end with `+Inf` equal to the count.
fn histogram_count(fams: &[Family], name: &str, labels: &[(&str, &str)]) -> f64 {
    let f = family(fams, name);
    assert_eq!(f.kind, "histogram", "{name}");
    let count = value(fams, &format!("{name}_count"), labels)
        .unwrap_or_else(|| panic!("no {name}_count with {labels:?}"));
    let mut inf = labels.to_vec();
    inf.push(("le", "+Inf"));
    assert_eq!(
        value(fams, &format!("{name}_bucket"), &inf),
        Some(count),
        "{name} {labels:?}: the +Inf bucket is not the count"
    );
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_with_the_official_parsers_after_hostile_peers_tried_to_join() {
    let db = TestDb::new().await;
    let name = format!("m{:x}", unique_tag());
    // `a` listens for NOTIFY; `b` does not, and catches up every 200 ms: a plain SQL write
    // reaches `a` by NOTIFY and `b` by catch-up, a write through `a` reaches `b` by the peer
    // channel.
    let a = start(&db.url, &node_env(&name, "127.0.91.2", &[])).await;
    let b = start(
        &db.url,
        &node_env(
            &name,
            "127.0.91.3",
            &[
                ("OPENFHIR_PG_NOTIFY", "false"),
                ("OPENFHIR_CATCHUP_INTERVAL_MS", "200"),
            ],
        ),
    )
    .await;
    assert!(
        wait_for(10, || linked(&a) && linked(&b)).await,
        "the nodes never linked"
    );

    // HTTP requests and cold loads on both nodes.
    assert_eq!(a.put_opt("growth", &opt_xml("growth", "one")).await, 200);
    for n in [&a, &b] {
        assert!(n.get_text("/opt/growth").await.contains("one"));
        let r = n.client.get(n.url("/no/such/route")).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
    // Over the peer channel: `b` holds the OPT and must drop it.
    let applied = b.node.cluster().counters().applied;
    assert_eq!(a.put_opt("growth", &opt_xml("growth", "two")).await, 200);
    assert!(
        wait_for(10, || b.node.cluster().counters().applied > applied).await,
        "the peer channel never delivered"
    );
    // In plain SQL: NOTIFY on `a`, catch-up on `b`. `a` must be listening by then, or its own
    // catch-up could deliver the write first.
    assert!(
        wait_for(10, || a.node.invalidation_report().listener
            == ListenerState::Listening)
        .await,
        "a never listened"
    );
    let (notified, caught_up) = (
        a.node.invalidation_report().first_by_notify,
        b.node.invalidation_report().first_by_catchup,
    );
    a.sql()
        .await
        .execute(
            "UPDATE opt SET updated = now() WHERE tenant = 'default' AND template_id = 'growth'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        wait_for(10, || a.node.invalidation_report().first_by_notify
            > notified)
        .await,
        "NOTIFY never delivered the SQL write to a"
    );
    assert!(
        wait_for(10, || b.node.invalidation_report().first_by_catchup
            > caught_up)
        .await,
        "catch-up never delivered the SQL write to b"
    );

    // Hosts that reach the cluster port try to join with node ids that would break a
    // hand-written exposition, or bloat it.
    let failed = a.node.cluster().counters().handshakes_failed;
    let a_addr: SocketAddr = a.node.cluster().local_addr().unwrap();
    let hostile = [
        "evil\"} 1\nopenfhir_forged 1\n#".to_string(),
        "x".repeat(65),
        String::new(),
        "nœud-é".to_string(),
        "back\\slash".to_string(),
    ];
    for (i, id) in hostile.iter().enumerate() {
        let identity = Identity {
            cluster: name.clone(),
            node_id: id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            // Each its own address, so none would replace another in membership.
            advertised_addr: format!("127.0.91.9:{}", 7801 + i),
        };
        let mut s = TcpStream::connect(a_addr).await.unwrap();
        let e = cluster::connect(&mut s, &identity, None)
            .await
            .expect_err("a hostile node id must be refused");
        assert_eq!(e.reason(), Some(&RejectReason::Protocol), "{id:?}: {e}");
    }
    let want = failed + hostile.len() as u64;
    assert!(
        wait_for(5, || a.node.cluster().counters().handshakes_failed >= want).await,
        "the refusals were not counted"
    );

    for format in [Format::Text, Format::OpenMetrics] {
        let (text, fa) = scrape(&a, format).await;
        let (_, fb) = scrape(&b, format).await;
        for (node, fams) in [("a", &fa), ("b", &fb)] {
            // Nothing a hostile peer sent became a family, a sample or a label value.
            for f in fams.iter() {
                assert!(!f.name.contains("forged"), "{node} {format:?}: {}", f.name);
                for s in &f.samples {
                    assert!(
                        s.labels.values().all(|v| !v.contains("evil")),
                        "{node} {format:?}: {s:?}"
                    );
                }
            }
            // Build info and the process series.
            assert_eq!(
                value(
                    fams,
                    "openfhir_cache_build_info",
                    &[("version", env!("CARGO_PKG_VERSION"))]
                ),
                Some(1.0),
                "{node} {format:?}"
            );
            for p in [
                "process_cpu_seconds_total",
                "process_resident_memory_bytes",
                "process_virtual_memory_bytes",
                "process_open_fds",
                "process_max_fds",
                "process_start_time_seconds",
            ] {
                assert!(
                    value(fams, p, &[]).is_some_and(|v| v > 0.0),
                    "{node} {format:?}: {p} missing or 0"
                );
            }
            // HTTP latency by route template (never the raw path) and status.
            let route = [("method", "GET"), ("route", "/opt/{id}"), ("status", "200")];
            assert!(
                histogram_count(fams, "openfhir_http_request_duration_seconds", &route) >= 1.0,
                "{node} {format:?}"
            );
            let unmatched = [("route", "unmatched"), ("status", "404")];
            assert!(
                histogram_count(fams, "openfhir_http_request_duration_seconds", &unmatched) >= 1.0,
                "{node} {format:?}"
            );
            assert!(
                value(
                    fams,
                    "openfhir_http_request_duration_seconds_count",
                    &[("route", "/no/such/route")]
                )
                .is_none(),
                "{node} {format:?}: a raw path became a label"
            );
            // Cache loads.
            assert!(
                histogram_count(
                    fams,
                    "openfhir_cache_load_duration_seconds",
                    &[("cache", "opt")]
                ) >= 1.0,
                "{node} {format:?}"
            );
            // Existing series keep their names and labels.
            assert!(
                value(fams, "openfhir_cache_misses_total", &[("cache", "opt")])
                    .is_some_and(|v| v >= 1.0),
                "{node} {format:?}"
            );
            assert_eq!(
                value(fams, "openfhir_cluster_peers", &[("state", "alive")]),
                Some(1.0),
                "{node} {format:?}"
            );
            // Both parsers name a counter family without its `_total`.
            assert_eq!(
                family(fams, "openfhir_cache_hits").kind,
                "counter",
                "{node} {format:?}"
            );
        }
        // Invalidation delay by the channel that applied the change.
        let delay = "openfhir_invalidation_delay_seconds";
        assert!(
            histogram_count(&fa, delay, &[("channel", "notify")]) >= 1.0,
            "{format:?}"
        );
        assert!(
            histogram_count(&fb, delay, &[("channel", "peer")]) >= 1.0,
            "{format:?}"
        );
        assert!(
            histogram_count(&fb, delay, &[("channel", "catchup")]) >= 1.0,
            "{format:?}"
        );
        assert!(
            value(&fb, "openfhir_invalidation_catchup_lag_seconds", &[]).is_some(),
            "{format:?}"
        );
        // The refusals are counted, and the real peer is labelled by its id.
        assert!(
            value(&fa, "openfhir_cluster_handshakes_failed_total", &[])
                .is_some_and(|v| v >= want as f64),
            "{format:?}"
        );
        let b_id = b.node.id().to_string();
        assert!(
            value(&fa, "openfhir_cluster_peer_sent_total", &[("peer", &b_id)]).is_some(),
            "{format:?}: no per-peer series for {b_id}"
        );
        if format == Format::OpenMetrics {
            assert!(text.ends_with("# EOF\n"), "{text}");
        }
    }
    a.stop().await;
    b.stop().await;
}
