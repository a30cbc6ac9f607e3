//! Limits of the HTTP front under hostile or excessive clients: concurrency, connections,
//! header read time and header size. Each test runs its own node and database.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{opt_xml, spawn_with};
use openfhir_cache::cache::{Change, Group};
use openfhir_cache::node::LoadHook;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Reads until EOF or error; `true` if the server closed the connection within `secs`.
async fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    let mut buf = vec![0u8; 4096];
    let read_to_end = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), read_to_end)
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_over_the_concurrency_limit_get_503_and_health_still_answers() {
    let app = spawn_with(&[("OPENFHIR_MAX_CONCURRENT_REQUESTS", "2")]).await;
    assert_eq!(app.put_opt("slow", &opt_xml("slow", "s1")).await, 200);
    // Evict, then hold every load of it until released: two reads occupy both slots.
    app.node
        .evict(&Change::Evict {
            group: Some(Group::Opt),
            tenant: Some("default".into()),
            key: Some("slow".into()),
        })
        .await
        .expect("eviction recorded");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let hook: LoadHook = Arc::new(move |_, _| {
        let g = g.clone();
        Box::pin(async move {
            let _ = g.acquire().await.map(|p| p.forget());
        })
    });
    app.node.set_load_hook(Some(hook));
    let c1 = app.client.get(app.url("/opt/slow")).send();
    let c2 = app.client.get(app.url("/opt/slow")).send();
    let (h1, h2) = (tokio::spawn(c1), tokio::spawn(c2));
    // Wait until both are inside (the second waits on the first's load: same key, one load).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = app.client.get(app.url("/opt/slow")).send().await.unwrap();
    assert_eq!(third.status(), 503);
    assert_eq!(third.headers()["retry-after"], "1");
    let body: serde_json::Value = third.json().await.unwrap();
    assert!(
        body.to_string()
            .contains("OPENFHIR_MAX_CONCURRENT_REQUESTS"),
        "{body}"
    );
    let live = app
        .client
        .get(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200, "probes are exempt from the limit");
    gate.add_permits(10);
    assert_eq!(h1.await.unwrap().unwrap().status(), 200);
    assert_eq!(h2.await.unwrap().unwrap().status(), 200);
    app.node.set_load_hook(None);
    let metrics = app.get_text("/metrics").await;
    assert!(metrics.contains("openfhir_http_shed_total 1"), "{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let app = spawn_with(&[("OPENFHIR_HEADER_TIMEOUT_SECS", "1")]).await;
    let mut s = TcpStream::connect(addr(&app.base)).await.unwrap();
    s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, 10).await,
        "a trickling client still holds its connection"
    );
    // The node serves everyone else.
    assert_eq!(app.live_status().await, 200);
    app.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    let app = spawn_with(&[("OPENFHIR_MAX_CONNECTIONS", "2")]).await;
    let a = addr(&app.base);
    let _held1 = TcpStream::connect(&a).await.unwrap();
    let _held2 = TcpStream::connect(&a).await.unwrap();
    // Give the server a moment to accept both.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(&a).await.unwrap();
    let _ = third
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(
        closed_within(&mut third, 5).await,
        "the third connection was served"
    );
    drop(_held1);
    drop(_held2);
    // Once the held connections close, new clients are served again.
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(r) = app.client.get(app.url("/health/live")).send().await {
            ok = r.status() == 200;
            if ok {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok);
    let metrics = app.get_text("/metrics").await;
    assert!(
        !metrics.contains("openfhir_http_connections_total{result=\"refused\"} 0"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn oversized_headers_are_refused_and_the_node_keeps_serving() {
    let app = spawn_with(&[]).await;
    let huge = "x".repeat(1 << 20);
    let r = app
        .client
        .get(app.url("/health/live"))
        .header("x-junk", huge)
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 431),
        // hyper may close the connection instead of answering.
        Err(e) => assert!(
            e.is_request() || e.is_connect() || e.to_string().contains("closed"),
            "{e}"
        ),
    }
    assert_eq!(app.live_status().await, 200);
    app.stop().await;
}
