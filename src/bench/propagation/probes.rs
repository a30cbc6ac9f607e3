//! The per-channel probes the scenario drives: an HTTP PUT end to end, the raw TCP floor, and
//! Redis pub/sub.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::receipts::{await_all, Receipt};
use crate::bench::harness::{Fleet, Harness};
use crate::bench::{data, BenchError, BenchResult};
use crate::cache::Change;

/// An HTTP PUT of a small OPT `key` to the writer at `base`: how long the PUT took, and the
/// propagation from its start to every peer.
pub(super) async fn put(
    h: &Harness,
    client: &reqwest::Client,
    base: &str,
    key: &str,
    rx: &mut mpsc::UnboundedReceiver<Receipt>,
    peers: &[usize],
) -> BenchResult<(Duration, Option<Vec<Duration>>)> {
    let url = format!("{base}/opt/{key}");
    let body = data::small_opt(key, "v1");
    let t0 = Instant::now();
    let r = client
        .put(&url)
        .header("x-tenant-id", &h.tenant)
        .header("content-type", "application/xml")
        .body(body)
        .send()
        .await
        .map_err(|e| BenchError::Http {
            what: format!("PUT {url}"),
            message: e.to_string(),
        })?;
    let took = t0.elapsed();
    if !r.status().is_success() {
        return Err(BenchError::Http {
            what: format!("PUT {url}"),
            message: format!("status {}", r.status()),
        });
    }
    Ok((took, await_all(rx, key, peers, t0).await))
}

/// One-way latency of a 16-byte message over loopback TCP (`TCP_NODELAY`) between two tasks of
/// this runtime: written by the measuring task itself (the floor), or, with `hop`, put into a
/// bounded queue that a writer task owning the socket drains (the peer channel's shape: one
/// more task wake-up on the way).
pub(super) struct TcpProbe {
    direct: Option<tokio::net::TcpStream>,
    queue: Option<mpsc::Sender<[u8; 16]>>,
    rx: mpsc::UnboundedReceiver<Receipt>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TcpProbe {
    pub(super) async fn start(hop: bool) -> BenchResult<TcpProbe> {
        let io = |e: std::io::Error| BenchError::Setup(format!("raw TCP floor: {e}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        let (tx, rx) = mpsc::unbounded_channel::<Receipt>();
        let reader = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await?;
            s.set_nodelay(true)?;
            let mut buf = [0u8; 16];
            loop {
                s.read_exact(&mut buf).await?;
                let at = Instant::now();
                let (k, _) = buf.split_at(8);
                let k = u64::from_le_bytes(k.try_into().unwrap_or([0; 8]));
                let _ = tx.send((1, at, k.to_string()));
            }
        });
        let mut w = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        w.set_nodelay(true).map_err(io)?;
        let mut probe = TcpProbe {
            direct: None,
            queue: None,
            rx,
            tasks: vec![reader],
        };
        if hop {
            let (qtx, mut qrx) = mpsc::channel::<[u8; 16]>(4096);
            probe.tasks.push(tokio::spawn(async move {
                while let Some(msg) = qrx.recv().await {
                    w.write_all(&msg).await?;
                }
                Ok(())
            }));
            probe.queue = Some(qtx);
        } else {
            probe.direct = Some(w);
        }
        Ok(probe)
    }

    pub(super) async fn one(&mut self, k: u64) -> BenchResult<Option<Vec<Duration>>> {
        let mut msg = [0u8; 16];
        msg[..8].copy_from_slice(&k.to_le_bytes());
        let t0 = Instant::now();
        if let Some(w) = &mut self.direct {
            w.write_all(&msg)
                .await
                .map_err(|e| BenchError::Setup(format!("raw TCP floor: {e}")))?;
        } else if let Some(q) = &self.queue {
            q.try_send(msg)
                .map_err(|_| BenchError::Setup("raw TCP floor: the writer task stopped".into()))?;
        }
        Ok(await_all(&mut self.rx, &k.to_string(), &[1], t0).await)
    }

    pub(super) fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// The same invalidation over Redis pub/sub: the writer publishes the change as JSON; one
/// subscriber per peer node decodes it and applies it to that node.
pub(super) struct RedisProbe {
    publisher: redis::aio::MultiplexedConnection,
    channel: String,
    subscribers: Vec<tokio::task::JoinHandle<()>>,
}

impl RedisProbe {
    /// Connects and subscribes; `Err` is the reason to skip Redis.
    pub(super) async fn start(url: &str, f: &Fleet, peers: &[usize]) -> Result<RedisProbe, String> {
        let limit = Duration::from_secs(2);
        let client = redis::Client::open(url).map_err(|e| format!("{url}: {e}"))?;
        let publisher = tokio::time::timeout(limit, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| format!("{url}: no answer within 2 s"))?
            .map_err(|e| format!("{url}: {e}"))?;
        let channel = format!("openfhir-bench-{}", std::process::id());
        let mut subscribers = Vec::new();
        for &i in peers {
            let mut ps = tokio::time::timeout(limit, client.get_async_pubsub())
                .await
                .map_err(|_| format!("{url}: no answer within 2 s"))?
                .map_err(|e| format!("{url}: {e}"))?;
            ps.subscribe(&channel)
                .await
                .map_err(|e| format!("SUBSCRIBE: {e}"))?;
            let node = f.node(i).clone();
            subscribers.push(tokio::spawn(async move {
                let mut stream = ps.into_on_message();
                while let Some(msg) = stream.next().await {
                    if let Ok(change) = serde_json::from_slice::<Change>(msg.get_payload_bytes()) {
                        node.apply(&change).await;
                    }
                }
            }));
        }
        Ok(RedisProbe {
            publisher,
            channel,
            subscribers,
        })
    }

    /// Publishes one change; `Err` (a reason) when Redis failed.
    pub(super) async fn one(
        &mut self,
        tenant: &str,
        k: usize,
        rx: &mut mpsc::UnboundedReceiver<Receipt>,
        peers: &[usize],
    ) -> Result<Option<Vec<Duration>>, String> {
        let key = format!("rd{k}");
        let change = Change::Opt {
            tenant: tenant.to_string(),
            template_id: key.clone(),
        };
        let t0 = Instant::now();
        let json = serde_json::to_vec(&change).map_err(|e| e.to_string())?;
        let published: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(json)
            .query_async(&mut self.publisher)
            .await;
        published.map_err(|e| format!("PUBLISH: {e}"))?;
        Ok(await_all(rx, &key, peers, t0).await)
    }

    pub(super) fn stop(self) {
        for t in self.subscribers {
            t.abort();
        }
    }
}
