//! What an attacker on the network tried against release nodes (issue "hardening found by an
//! outside test"), each against a real node on real sockets: silent connections, consistency
//! tokens on probes, a forged Hello, error bodies of every status, an oversized Content-Length,
//! and duplicate tenant headers.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::pg::TestDb;
use common::{spawn_url, spawn_with, unique_tag, wait_for, TestApp};
use openfhir_cache::cluster::{self, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn addr(app: &TestApp) -> SocketAddr {
    app.base.trim_start_matches("http://").parse().unwrap()
}

/// Sends raw bytes and reads the answer until the server closes or a full response is in
/// (bounded by `wait`): status, head and body.
async fn raw(to: SocketAddr, request: &[u8], wait: Duration) -> (u16, String, String) {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(wait, read).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

/// `{error, details}` with a non-empty error; returns the text of both.
fn json_error(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    let error = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {v}"));
    assert!(!error.is_empty(), "{v}");
    let details = v["details"]
        .as_array()
        .unwrap_or_else(|| panic!("no details: {v}"));
    format!("{error} {details:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_stalled_connections_do_not_lock_the_node_out() {
    let app = spawn_with(&[
        ("OPENFHIR_MAX_CONNECTIONS", "8"),
        ("OPENFHIR_HEADER_TIMEOUT_SECS", "1"),
    ])
    .await;
    let to = addr(&app);
    // Eight connections that never send a byte, or only the start of the HTTP/2 preface: every
    // slot taken.
    let mut held = Vec::new();
    for i in 0..8 {
        let mut s = TcpStream::connect(to).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"PRI * HT").await.unwrap();
        }
        held.push(s);
    }
    // They are closed by the node (a read sees the end), and new clients get in.
    for s in &mut held {
        let mut b = [0u8; 64];
        let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
        assert!(
            matches!(end, Ok(Ok(0)) | Ok(Err(_))),
            "the node keeps a silent connection open: {end:?}"
        );
    }
    let mut served = false;
    for _ in 0..50 {
        if let Ok(r) = app.client.get(app.url("/health/live")).send().await {
            served = r.status() == 200;
            if served {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "a new client is still locked out");
    // A connection that is used is not cut while its request runs, and keeps working.
    let r = app.client.get(app.url("/opt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn probes_ignore_consistency_tokens_and_impossible_tokens_are_refused() {
    // No periodic catch-up and no listener (whose connect runs one): every step counted is one
    // a token caused.
    let app = spawn_with(&[
        ("OPENFHIR_API_TOKEN", "s3cret-token-value"),
        ("OPENFHIR_CATCHUP_INTERVAL_MS", "0"),
        ("OPENFHIR_PG_NOTIFY", "false"),
    ])
    .await;
    let steps = || app.node.invalidation_report().catchup_steps;
    let before = steps();
    for path in ["/health/live", "/health/ready", "/health"] {
        let r = app
            .client
            .get(app.url(path))
            .header("x-consistency-token", "99999999")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}: {}", r.text().await.unwrap());
    }
    assert_eq!(steps(), before, "a probe ran catch-up steps for a token");
    // Without credentials, a token does nothing either.
    let r = app
        .client
        .get(app.url("/opt"))
        .header("x-consistency-token", "99999999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(steps(), before);
    // A token for a transaction the database has not started: 400 at once, a step or two.
    let r = app
        .client
        .get(app.url("/opt"))
        .bearer_auth("s3cret-token-value")
        .header("x-consistency-token", "999999999999")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = json_error(&r.text().await.unwrap());
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("X-Consistency-Token"), "{text}");
    assert!(
        steps() - before <= 2,
        "{} steps for one token",
        steps() - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hello_cannot_take_another_peers_address() {
    let db = TestDb::new().await;
    let name = format!("h{:x}", unique_tag());
    let hosts = "127.0.71.1[7800],127.0.71.2[7800]";
    let env = |ip: &str| -> Vec<(String, String)> {
        vec![
            ("CLUSTER_NAME".into(), name.clone()),
            ("CLUSTER_BIND_ADDR".into(), ip.into()),
            ("CLUSTER_PORT".into(), "7800".into()),
            ("CLUSTER_DISCOVERY".into(), "TCP".into()),
            ("CLUSTER_INITIAL_HOSTS".into(), hosts.into()),
            ("CLUSTER_HEARTBEAT_MS".into(), "100".into()),
        ]
    };
    let start = |e: Vec<(String, String)>| {
        let url = db.url.clone();
        async move {
            let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            spawn_url(&url, &e).await
        }
    };
    let a = start(env("127.0.71.1")).await;
    let b = start(env("127.0.71.2")).await;
    let b_id = b.node.id().to_string();
    let b_alive = |a: &TestApp| {
        a.node.cluster().peers().iter().any(|p| {
            p.node_id == b_id
                && p.addr == "127.0.71.2:7800".parse::<SocketAddr>().unwrap()
                && p.state == cluster::PeerState::Alive
        })
    };
    assert!(
        wait_for(10, || b_alive(&a)).await,
        "{:?}",
        a.node.cluster().peers()
    );

    // From 127.0.71.3, a Hello with a new node id that advertises B's address.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.71.3:0".parse().unwrap()).unwrap();
    let mut s = socket
        .connect(a.node.cluster().local_addr().unwrap())
        .await
        .unwrap();
    let forged = Identity {
        cluster: name.clone(),
        node_id: "imposter".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        advertised_addr: "127.0.71.2:7800".into(),
    };
    let _session = cluster::connect(&mut s, &forged, None).await.unwrap();
    assert!(
        wait_for(5, || a
            .node
            .cluster()
            .peers()
            .iter()
            .any(|p| p.node_id == "imposter"))
        .await
    );
    let peers = a.node.cluster().peers();
    let imposter = peers.iter().find(|p| p.node_id == "imposter").unwrap();
    assert_eq!(
        imposter.addr,
        "127.0.71.3:7800".parse::<SocketAddr>().unwrap(),
        "the imposter is where it connects from"
    );
    assert!(b_alive(&a), "B's row was replaced: {peers:?}");
    // A dials back only the imposter's own IP, never B's address for it.
    let learned = a.node.cluster().report().learned;
    assert!(
        learned.iter().all(|l| l.ip().to_string() != "127.0.71.2" || *l == "127.0.71.2:7800".parse().unwrap()),
        "{learned:?}"
    );
}

#[tokio::test]
async fn every_error_status_has_a_json_body() {
    let app = spawn_with(&[("OPENFHIR_REQUEST_TIMEOUT_SECS", "1")]).await;
    let to = addr(&app);
    let wait = Duration::from_secs(10);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("invalid bytes in the request line", b"GET /\x01\x02 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        (
            "two different Content-Length headers",
            b"POST /opt HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
            400,
        ),
        ("a NUL in a header", b"GET /opt HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n".to_vec(), 400),
        (
            "headers too large",
            [b"GET /opt HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec(), vec![b'a'; 600_000], b"\r\n\r\n".to_vec()].concat(),
            431,
        ),
        // A body that stalls after one byte: the request timeout (1 s) answers.
        (
            "a request over the timeout",
            b"POST /opt HTTP/1.1\r\nHost: x\r\nContent-Type: application/xml\r\nContent-Length: 10\r\n\r\n<".to_vec(),
            408,
        ),
        ("no such route", b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 404),
        ("wrong method", b"PATCH /opt HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 405),
    ];
    for (what, request, want) in cases {
        let (status, head, body) = raw(to, &request, wait).await;
        assert_eq!(status, want, "{what}: {head}\n{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{what}: {head}"
        );
        json_error(&body);
    }
    // The node still serves.
    assert_eq!(
        app.client
            .get(app.url("/opt"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn an_oversized_content_length_is_413_at_once() {
    let app = spawn_with(&[
        ("OPENFHIR_MAX_CONCURRENT_REQUESTS", "1"),
        ("OPENFHIR_REQUEST_TIMEOUT_SECS", "60"),
    ])
    .await;
    let to = addr(&app);
    for (path, ct, var) in [
        ("/opt", "application/xml", "OPENFHIR_MAX_BODY_BYTES"),
        (
            "/fc/model",
            "application/x-yaml",
            "OPENFHIR_MAX_FC_BODY_BYTES",
        ),
        (
            "/fc/context/abc",
            "application/x-yaml",
            "OPENFHIR_MAX_FC_BODY_BYTES",
        ),
    ] {
        // The headers only: the body never comes. The answer must not wait for it (the request
        // timeout is a minute; the read gives up long before).
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: 100000000000\r\n\r\n"
        );
        let (status, head, body) = raw(to, req.as_bytes(), Duration::from_secs(10)).await;
        assert_eq!(status, 413, "{path}: {head}\n{body}");
        assert!(json_error(&body).contains(var), "{path}: {body}");
    }
    // No concurrency slot is held: the one slot there is serves the next request.
    assert_eq!(
        app.client
            .get(app.url("/opt"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn two_tenant_headers_are_refused() {
    let app = spawn_with(&[]).await;
    app.node
        .put_tenant("acme", "Acme", &serde_json::json!({}))
        .await
        .unwrap();
    let r = app
        .client
        .get(app.url("/opt"))
        .header("x-tenant-id", "acme")
        .header("x-tenant-id", "default")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(json_error(&r.text().await.unwrap()).contains("X-Tenant-Id"));
    let r = app
        .client
        .get(app.url("/opt"))
        .header("x-tenant-id", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
