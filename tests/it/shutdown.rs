//! Graceful shutdown of the real binary: `serve` on SIGTERM stops accepting, finishes the
//! requests in flight, says goodbye to its peers (they mark it "left" at once instead of
//! waiting for its heartbeats to stop), closes its pool and exits 0.
//!
//! The two-node test binds 127.0.30.2:7800 and 127.0.30.3:7800, addresses no other test uses.

use crate::common;

use std::time::{Duration, Instant};

use common::pg::TestDb;
use common::proc::{free_port_on, http, start_serve, ChildGuard};
use common::{isolated_cluster_env, opt_xml, unique_tag};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

async fn cluster(base: &str) -> Value {
    let r = http().get(format!("{base}/cluster")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The state `base` reports for peer `id` in `GET /cluster` (`.cluster.peers[].state`).
async fn peer_state(base: &str, id: &str) -> Option<String> {
    let c = cluster(base).await;
    c["cluster"]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["nodeId"] == id)
        .and_then(|p| p["state"].as_str())
        .map(str::to_string)
}

/// Polls `GET /cluster` on `base` every 20 ms, for at most `limit`, until peer `id` is in
/// `state`; returns the last state seen.
async fn wait_for_state(base: &str, id: &str, state: &str, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    loop {
        let now = peer_state(base, id).await;
        if now.as_deref() == Some(state) || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn node_id(base: &str) -> String {
    cluster(base).await["node"]["id"]
        .as_str()
        .expect("node.id")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_makes_the_peer_see_left_at_once_and_exits_0() {
    let db = TestDb::new().await;
    let dir = tempdir();
    let name = format!("shutdown-{:x}", unique_tag());
    let hosts = "127.0.30.2[7800],127.0.30.3[7800]";
    let mut nodes: Vec<(ChildGuard, String)> = Vec::new();
    for (i, ip) in ["127.0.30.2", "127.0.30.3"].into_iter().enumerate() {
        let addr = format!("{ip}:{}", free_port_on(ip));
        let env = [
            ("DATABASE_URL", db.url.as_str()),
            ("OPENFHIR_HTTP_ADDR", &addr),
            ("OPENFHIR_DB_POOL_SIZE", "2"),
            ("CLUSTER_NAME", &name),
            ("CLUSTER_BIND_ADDR", ip),
            ("CLUSTER_PORT", "7800"),
            ("CLUSTER_DISCOVERY", "TCP"),
            ("CLUSTER_INITIAL_HOSTS", hosts),
            // A silent peer is suspect after 3 s and gone after 10 s: "left" within the wait
            // below can only come from its Leave message.
            ("CLUSTER_HEARTBEAT_MS", "1000"),
        ];
        nodes.push(start_serve(dir.path(), &format!("node-{}", i + 1), &addr, &env).await);
    }
    let (a, a_base) = &mut nodes[0];
    let a_base = a_base.clone();
    a.assert_running();
    let (b, b_base) = &mut nodes[1];
    let b_base = b_base.clone();
    let a_id = node_id(&a_base).await;
    let b_id = node_id(&b_base).await;

    // Each sees the other alive.
    for (base, peer) in [(&a_base, &b_id), (&b_base, &a_id)] {
        let state = wait_for_state(base, peer, "alive", Duration::from_secs(15)).await;
        assert_eq!(
            state.as_deref(),
            Some("alive"),
            "{base} does not see {peer} alive: {:#}",
            cluster(base).await["cluster"]
        );
    }

    b.sigterm().await;
    let state = wait_for_state(&a_base, &b_id, "left", Duration::from_secs(3)).await;
    assert_eq!(
        state.as_deref(),
        Some("left"),
        "{:#}\n--- node 2 stderr\n{}",
        cluster(&a_base).await["cluster"]["peers"],
        b.stderr()
    );
    let status = b
        .wait_for_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("node 2 still running 15 s after SIGTERM:\n{}", b.stderr()));
    assert!(status.success(), "node 2 exited {status}:\n{}", b.stderr());
    let err = b.stderr();
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("shutdown requested"), "{err}");

    // The remaining node keeps serving, and stops the same way.
    let (a, _) = &mut nodes[0];
    a.assert_running();
    let r = http().get(format!("{a_base}/opt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    a.sigterm().await;
    let status = a
        .wait_for_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("node 1 still running 15 s after SIGTERM:\n{}", a.stderr()));
    assert!(status.success(), "node 1 exited {status}:\n{}", a.stderr());
}

/// Reads from `s` until `end` has been seen (or EOF, or 10 s); returns what was read.
async fn read_until(s: &mut TcpStream, end: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).contains(end) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("read: {e}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_request_in_flight_finish() {
    let db = TestDb::new().await;
    let dir = tempdir();
    let addr = format!("127.0.0.1:{}", free_port_on("127.0.0.1"));
    let mut env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db.url.clone()),
        ("OPENFHIR_HTTP_ADDR".into(), addr.clone()),
        ("OPENFHIR_DB_POOL_SIZE".into(), "2".into()),
    ];
    env.extend(isolated_cluster_env());
    let (mut node, _base) = start_serve(dir.path(), "node", &addr, &env).await;

    // An upload whose body arrives slowly: the head, then (once the handler reads the body, which
    // hyper signals with "100 Continue") half the body, then nothing until after the SIGTERM.
    let body = opt_xml("in_flight", "sent-across-the-shutdown");
    let (first, second) = body.as_bytes().split_at(body.len() / 2);
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "PUT /opt/in_flight HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/xml\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let cont = read_until(&mut s, "\r\n\r\n").await;
    assert!(cont.starts_with("HTTP/1.1 100"), "{cont:?}");
    s.write_all(first).await.unwrap();

    node.sigterm().await;
    // Shutdown has begun once the listener is closed: new connections are refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting 10 s after SIGTERM:\n{}",
            node.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and the process waits for the request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        node.is_running(),
        "exited with a request in flight:\n{}",
        node.stderr()
    );

    s.write_all(second).await.unwrap();
    let response = read_until(&mut s, "\"templateId\"").await;
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "{response}\n--- stderr\n{}",
        node.stderr()
    );
    let status = node
        .wait_for_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("still running 15 s after SIGTERM:\n{}", node.stderr()));
    assert!(status.success(), "exited {status}:\n{}", node.stderr());

    // The write committed.
    let n: i64 = db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM opt WHERE template_id = 'in_flight' AND content LIKE '%sent-across-the-shutdown%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}
