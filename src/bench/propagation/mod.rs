//! Scenario 3, propagation: from a write on one node until no other node can serve the old
//! value, per channel, on three nodes. Every peer's [`Node::set_apply_hook`] records the instant
//! the eviction was applied; a write's propagation time is the slowest peer's.
//!
//! Channels, each alone: the peer channel (the writer's broadcast, and an HTTP PUT end to end),
//! NOTIFY (`pg_notify` sent directly, a trigger's NOTIFY during an UPDATE, and an HTTP PUT end to
//! end), catch-up (at a fixed interval), and as baselines the same invalidation over Redis
//! pub/sub and a raw TCP message between two tasks (the floor).

mod cpu;
mod probes;
mod receipts;

use std::time::{Duration, Instant};

use serde::Serialize;

use super::harness::{node_err, sql, Harness, Linking, NodeSpec};
use super::stats::{Recorder, Summary};
use super::{data, BenchResult};
use crate::cache::Change;
use crate::node::Put;
use probes::{put, RedisProbe, TcpProbe};
use receipts::drain;

pub use cpu::{PeerCpu, BASELINE_RECEIVER_US, BASELINE_SENDER_US};
pub use receipts::{await_all, hook, unhook};

/// Nodes in the propagation clusters.
pub const NODES: usize = 3;
/// Pause between two writes.
const GAP: Duration = Duration::from_millis(1);

/// Latencies of one channel.
#[derive(Debug, Default)]
struct Samples {
    all: Recorder,
    per_peer: Vec<Recorder>,
    write: Recorder,
    lost: usize,
    writes: usize,
}

impl Samples {
    fn new(peers: usize) -> Samples {
        Samples {
            per_peer: vec![Recorder::new(); peers],
            ..Samples::default()
        }
    }

    fn add_put(&mut self, (took, lat): (Duration, Option<Vec<Duration>>)) {
        self.write.record(took);
        self.add(lat);
    }

    fn add(&mut self, lat: Option<Vec<Duration>>) {
        self.writes += 1;
        match lat {
            Some(v) => {
                if let Some(m) = v.iter().max() {
                    self.all.record(*m);
                }
                for (r, d) in self.per_peer.iter_mut().zip(v) {
                    r.record(d);
                }
            }
            None => self.lost += 1,
        }
    }
}

/// One channel's result.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelResult {
    /// Stable id (`tcp_floor`, `peer`, `peer_put`, `redis`, `notify_direct`, `notify_trigger`,
    /// `notify_put`, `catchup`).
    pub id: &'static str,
    /// What it is, for tables.
    pub label: String,
    /// From what instant to what instant.
    pub measured: String,
    /// Writes (or messages) sent.
    pub writes: usize,
    /// Writes some peer never applied within 3 s.
    pub lost: usize,
    /// Until every peer applied it (the slowest peer per write).
    pub latency: Summary,
    /// Median of each peer separately, µs.
    pub per_peer_p50_us: Vec<f64>,
    /// Median / the raw TCP floor's median.
    pub ratio_to_tcp_p50: f64,
    /// p99 / the raw TCP floor's p99.
    pub ratio_to_tcp_p99: f64,
    /// For end-to-end rows: how long the write itself took (the HTTP PUT), µs.
    pub write_latency: Option<Summary>,
    /// Why it was not measured, when it was not.
    pub skipped: Option<String>,
}

impl ChannelResult {
    fn new(id: &'static str, label: &str, measured: &str, s: &Samples, write: bool) -> Self {
        ChannelResult {
            id,
            label: label.to_string(),
            measured: measured.to_string(),
            writes: s.writes,
            lost: s.lost,
            latency: s.all.summary(),
            per_peer_p50_us: s.per_peer.iter().map(|r| r.summary().p50_us).collect(),
            ratio_to_tcp_p50: f64::NAN,
            ratio_to_tcp_p99: f64::NAN,
            write_latency: write.then(|| s.write.summary()),
            skipped: None,
        }
    }

    fn skipped(id: &'static str, label: &str, reason: String) -> Self {
        ChannelResult {
            id,
            label: label.to_string(),
            measured: String::new(),
            writes: 0,
            lost: 0,
            latency: Summary::default(),
            per_peer_p50_us: Vec::new(),
            ratio_to_tcp_p50: f64::NAN,
            ratio_to_tcp_p99: f64::NAN,
            write_latency: None,
            skipped: Some(reason),
        }
    }
}

/// The propagation results.
#[derive(Debug, Clone, Serialize)]
pub struct PropagationReport {
    /// Nodes per cluster (one writer, the others measured).
    pub nodes: usize,
    /// Pause between writes, ms.
    pub gap_ms: f64,
    /// The catch-up interval of the catch-up row, ms.
    pub catchup_interval_ms: u64,
    /// Every channel.
    pub channels: Vec<ChannelResult>,
    /// The CPU cost of one peer invalidation (`None` when the receiver could not run as its own
    /// process).
    pub cpu: Option<PeerCpu>,
}

impl PropagationReport {
    /// The channel with this id, if measured.
    pub fn channel(&self, id: &str) -> Option<&ChannelResult> {
        self.channels
            .iter()
            .find(|c| c.id == id && c.skipped.is_none())
    }
}

/// Runs the scenario. The fast channels are measured interleaved, one write of each in turn,
/// so that whatever else happens on the machine meanwhile affects them alike; catch-up (up to
/// one interval per write) runs after them.
pub async fn run(h: &Harness) -> BenchResult<PropagationReport> {
    let n = h.sizes.prop_writes;
    let puts = h.sizes.prop_put_writes;
    let bar = h
        .progress
        .bar("propagation", (n + h.sizes.catchup_writes) as u64);
    let peers: Vec<usize> = (1..NODES).collect();
    bar.set_message("starting the clusters");

    // The peer channel alone: one cluster, NOTIFY and catch-up off.
    let peer = h.track(
        h.start_fleet(NODES, Linking::Cluster, NodeSpec::peer_only())
            .await?,
    );
    let pf = peer.fleet();
    data::seed(pf.node(0), &h.tenant).await?;
    // NOTIFY alone: three single-node clusters that LISTEN, catch-up off.
    let notify = h.track(
        h.start_fleet(
            NODES,
            Linking::Separate,
            NodeSpec {
                notify: true,
                ..NodeSpec::peer_only()
            },
        )
        .await?,
    );
    let nf = notify.fleet();
    nf.node(0)
        .put_opt(&h.tenant, &data::small_opt("pn", "v0"), Put::Upsert)
        .await
        .map_err(node_err("seed the NOTIFY row"))?;
    let mut prx = hook(pf, &peers);
    let mut nrx = hook(nf, &peers);
    let mut tcp = TcpProbe::start(false).await?;
    let mut hop = TcpProbe::start(true).await?;
    let mut redis = match &h.redis_url {
        None => Err("--no-redis".to_string()),
        Some(url) => RedisProbe::start(url, pf, &peers).await,
    };
    let db = h.sql().await?;
    let notify_stmt = db
        .prepare("SELECT pg_notify('openfhir_invalidation', $1)")
        .await
        .map_err(sql("prepare pg_notify".into()))?;
    let update_stmt = db
        .prepare("UPDATE opt SET updated = now() WHERE tenant = $1 AND template_id = $2")
        .await
        .map_err(sql("prepare the UPDATE".into()))?;
    let client = reqwest::Client::new();
    drain(&mut prx).await;
    drain(&mut nrx).await;

    let mut s_tcp = Samples::new(1);
    let mut s_hop = Samples::new(1);
    let mut s_peer = Samples::new(peers.len());
    let mut s_local = Samples::new(1);
    let mut s_redis = Samples::new(peers.len());
    let mut s_direct = Samples::new(peers.len());
    let mut s_trigger = Samples::new(peers.len());
    let mut s_peer_put = Samples::new(peers.len());
    let mut s_notify_put = Samples::new(peers.len());
    bar.set_message("all channels, interleaved");
    for k in 0..n {
        s_tcp.add(tcp.one(k as u64).await?);
        tokio::time::sleep(GAP).await;
        s_hop.add(hop.one(k as u64).await?);
        tokio::time::sleep(GAP).await;

        let key = format!("pb{k}");
        let change = Change::Opt {
            tenant: h.tenant.clone(),
            template_id: key.clone(),
        };
        let t0 = Instant::now();
        pf.node(0).cluster().broadcast(&change, None);
        s_peer.add(await_all(&mut prx, &key, &peers, t0).await);
        tokio::time::sleep(GAP).await;

        // Diagnostic: the eviction itself on a node, without any channel.
        let key = format!("la{k}");
        let change = Change::Opt {
            tenant: h.tenant.clone(),
            template_id: key.clone(),
        };
        let t0 = Instant::now();
        pf.node(1).apply(&change).await;
        s_local.add(await_all(&mut prx, &key, &[1], t0).await);

        if let Ok(r) = &mut redis {
            match r.one(&h.tenant, k, &mut prx, &peers).await {
                Ok(lat) => s_redis.add(lat),
                Err(e) => redis = Err(e),
            }
            tokio::time::sleep(GAP).await;
        }

        let key = format!("nd{k}");
        // A payload as the triggers send it; a position and xid no real row has.
        let payload = serde_json::json!({
            "p": 1_000_000_000_000i64 + k as i64,
            "x": (1u64 << 60).wrapping_add(k as u64).to_string(),
            "g": "opt", "t": h.tenant, "k": key, "o": "UPDATE", "n": null,
        })
        .to_string();
        let t0 = Instant::now();
        db.execute(&notify_stmt, &[&payload])
            .await
            .map_err(sql("pg_notify".into()))?;
        s_direct.add(await_all(&mut nrx, &key, &peers, t0).await);
        tokio::time::sleep(GAP).await;

        let t0 = Instant::now();
        db.execute(&update_stmt, &[&h.tenant, &"pn"])
            .await
            .map_err(sql("UPDATE opt".into()))?;
        s_trigger.add(await_all(&mut nrx, "pn", &peers, t0).await);
        tokio::time::sleep(GAP).await;

        if k < puts {
            let key = format!("pp{k}");
            s_peer_put.add_put(put(h, &client, &pf.base(0), &key, &mut prx, &peers).await?);
            tokio::time::sleep(GAP).await;
            let key = format!("np{k}");
            s_notify_put.add_put(put(h, &client, &nf.base(0), &key, &mut nrx, &peers).await?);
            tokio::time::sleep(GAP).await;
        }
        bar.inc(1);
    }
    tcp.stop();
    hop.stop();
    let mut channels = vec![
        ChannelResult::new(
            "tcp_floor",
            "raw TCP floor (two tasks, loopback)",
            "write of a 16-byte message until the reading task has it",
            &s_tcp,
            false,
        ),
        ChannelResult::new(
            "tcp_hop_floor",
            "raw TCP through a writer task (the peer channel's shape)",
            "send into a queue; a writer task writes 16 bytes; until the reading task has them",
            &s_hop,
            false,
        ),
        ChannelResult::new(
            "peer",
            "peer channel",
            "the writer's broadcast until the eviction is applied on every peer",
            &s_peer,
            false,
        ),
        ChannelResult::new(
            "local_apply",
            "eviction applied locally (no channel; diagnostic)",
            "Node::apply called on the peer itself until its hook ran",
            &s_local,
            false,
        ),
        match redis {
            Ok(r) => {
                r.stop();
                ChannelResult::new(
                    "redis",
                    "Redis pub/sub (same invalidation)",
                    "PUBLISH until every subscriber applied the eviction",
                    &s_redis,
                    false,
                )
            }
            Err(reason) => ChannelResult::skipped("redis", "Redis pub/sub", reason),
        },
        ChannelResult::new(
            "notify_direct",
            "NOTIFY, pg_notify() sent directly",
            "SELECT pg_notify(...) sent until every listening node applied the eviction",
            &s_direct,
            false,
        ),
        ChannelResult::new(
            "notify_trigger",
            "NOTIFY from the trigger",
            "UPDATE opt sent (autocommit) until every listening node applied the eviction",
            &s_trigger,
            false,
        ),
        ChannelResult::new(
            "peer_put",
            "peer channel, end to end",
            "HTTP PUT /opt sent until every peer applied the eviction",
            &s_peer_put,
            true,
        ),
        ChannelResult::new(
            "notify_put",
            "NOTIFY, end to end",
            "HTTP PUT /opt sent until every other node applied the eviction",
            &s_notify_put,
            true,
        ),
    ];
    unhook(pf);
    unhook(nf);
    peer.stop().await;
    notify.stop().await;

    // ---- catch-up alone ----
    let interval = h.sizes.catchup_interval_ms;
    let fleet = h.track(
        h.start_fleet(
            NODES,
            Linking::Separate,
            NodeSpec {
                catchup_ms: interval,
                ..NodeSpec::peer_only()
            },
        )
        .await?,
    );
    let f = fleet.fleet();
    f.node(0)
        .put_opt(&h.tenant, &data::small_opt("pc", "v0"), Put::Upsert)
        .await
        .map_err(node_err("seed the catch-up row"))?;
    let mut rx = hook(f, &peers);
    tokio::time::sleep(Duration::from_millis(interval * 2)).await;
    drain(&mut rx).await;
    bar.set_message(format!("catch-up, interval {interval} ms"));
    let mut s = Samples::new(peers.len());
    for _ in 0..h.sizes.catchup_writes {
        // Land at a random moment of the catch-up cycle.
        tokio::time::sleep(Duration::from_millis(interval).mul_f64(random_fraction())).await;
        let t0 = Instant::now();
        db.execute(&update_stmt, &[&h.tenant, &"pc"])
            .await
            .map_err(sql("UPDATE opt".into()))?;
        s.add(await_all(&mut rx, "pc", &peers, t0).await);
        bar.inc(1);
    }
    channels.push(ChannelResult::new(
        "catchup",
        &format!("catch-up alone, interval {interval} ms"),
        "UPDATE opt at a random moment until every node's next catch-up step applied it",
        &s,
        false,
    ));
    unhook(f);
    fleet.stop().await;

    bar.set_message("peer message CPU");
    let cpu = cpu::run(h, h.sizes.peer_cpu_messages).await?;
    bar.finish_and_clear();

    let (fp50, fp99) = channels.first().map_or((f64::NAN, f64::NAN), |c| {
        (c.latency.p50_us, c.latency.p99_us)
    });
    for c in channels.iter_mut().filter(|c| c.skipped.is_none()) {
        c.ratio_to_tcp_p50 = c.latency.p50_us / fp50;
        c.ratio_to_tcp_p99 = c.latency.p99_us / fp99;
    }
    Ok(PropagationReport {
        nodes: NODES,
        gap_ms: GAP.as_secs_f64() * 1e3,
        catchup_interval_ms: interval,
        channels,
        cpu,
    })
}

fn random_fraction() -> f64 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}
