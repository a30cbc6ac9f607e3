//! Scenario 4, scale: peer-channel propagation (the writer's broadcast until every peer applied
//! it), memory and connections per node, for clusters of 2 to 32 nodes on loopback. NOTIFY and
//! periodic catch-up are off and the pools are small, so 32 nodes stay within PostgreSQL's
//! default 100 connections.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::harness::can_spawn_nodes;
use super::harness::{sql, Harness, Linking, NodeSpec};
use super::propagation::{hook, unhook};
use super::stats::{Recorder, Summary};
use super::BenchResult;
use crate::cache::Change;

/// One cluster size.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    /// Nodes.
    pub nodes: usize,
    /// Writes (broadcasts from node 0).
    pub writes: usize,
    /// Writes some peer never applied within 3 s.
    pub lost: usize,
    /// Until every peer applied it.
    pub latency: Summary,
    /// Median over all (write, peer) pairs, µs.
    pub any_peer_p50_us: f64,
    /// Seconds from starting the nodes until every pair was connected.
    pub startup_secs: f64,
    /// Resident memory of one node, measured on a member run as a child process, MiB.
    pub node_rss_mib: Option<f64>,
    /// Its peak resident memory (`VmHWM`), MiB.
    pub node_peak_rss_mib: Option<f64>,
    /// Its open sockets (cluster connections both ways, listeners, database).
    pub node_sockets: Option<usize>,
    /// PostgreSQL connections per node (pool connections opened at start; NOTIFY is off).
    pub db_connections_per_node: f64,
    /// Cluster TCP connections per node (each pair has one per direction): 2 (n - 1).
    pub peer_connections_per_node: usize,
}

/// The scale results.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// Every size.
    pub rows: Vec<ScaleRow>,
}

/// Runs the scenario.
pub async fn run(h: &Harness) -> BenchResult<ScaleReport> {
    let sizes = h.sizes.scale_sizes.clone();
    let bar = h.progress.bar("scale", sizes.len() as u64);
    let db = h.sql().await?;
    let mut rows = Vec::new();
    for &n in &sizes {
        bar.set_message(format!("{n} nodes"));
        // Let the previous fleet's memory and sockets go first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        let spec = NodeSpec {
            pool: 2,
            ..NodeSpec::peer_only()
        };
        let fleet = h.track(h.start_fleet(n, Linking::Cluster, spec).await?);
        let startup_secs = t.elapsed().as_secs_f64();
        let f = fleet.fleet();
        let peers: Vec<usize> = (1..n).collect();
        let mut rx = hook(f, &peers);
        let mut all = Recorder::new();
        let mut any = Recorder::new();
        let mut lost = 0;
        for k in 0..h.sizes.scale_writes {
            let key = format!("s{n}_{k}");
            let change = Change::Opt {
                tenant: h.tenant.clone(),
                template_id: key.clone(),
            };
            let t0 = Instant::now();
            f.node(0).cluster().broadcast(&change, None);
            match super::propagation::await_all(&mut rx, &key, &peers, t0).await {
                Some(v) => {
                    if let Some(m) = v.iter().max() {
                        all.record(*m);
                    }
                    for d in v {
                        any.record(d);
                    }
                }
                None => lost += 1,
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let conns: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name LIKE 'openfhir-cache/%' AND application_name <> 'openfhir-cache/bench'",
                &[],
            )
            .await
            .map_err(sql("count connections".into()))?
            .get(0);
        unhook(f);
        fleet.stop().await;
        let probe = if can_spawn_nodes() {
            bar.set_message(format!("{n} nodes, memory"));
            Some(member_process(h, n).await?)
        } else {
            None
        };
        rows.push(ScaleRow {
            nodes: n,
            writes: h.sizes.scale_writes,
            lost,
            latency: all.summary(),
            any_peer_p50_us: any.summary().p50_us,
            startup_secs,
            node_rss_mib: probe.as_ref().and_then(|p| p.rss_mib),
            node_peak_rss_mib: probe.as_ref().and_then(|p| p.peak_rss_mib),
            node_sockets: probe.as_ref().and_then(|p| p.sockets),
            db_connections_per_node: conns as f64 / n as f64,
            peer_connections_per_node: 2 * (n - 1),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(ScaleReport { rows })
}

/// What `/proc` tells about a node process.
struct Probe {
    rss_mib: Option<f64>,
    peak_rss_mib: Option<f64>,
    sockets: Option<usize>,
}

/// Runs a cluster of `n` whose last member is a child process, sends it some invalidations, and
/// reads its memory and sockets.
async fn member_process(h: &Harness, n: usize) -> BenchResult<Probe> {
    let spec = NodeSpec {
        pool: 2,
        ..NodeSpec::peer_only()
    };
    let fleet = h.track(h.start_fleet_with(n, Linking::Cluster, spec, true).await?);
    let f = fleet.fleet();
    for k in 0..100 {
        let change = Change::Opt {
            tenant: h.tenant.clone(),
            template_id: format!("m{k}"),
        };
        f.node(0).cluster().broadcast(&change, None);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = f.child.as_ref().and_then(|c| c.id());
    let status = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok());
    let field = |name: &str| {
        status.as_deref().and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(name))?;
            let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb / 1024.0)
        })
    };
    let sockets = pid.and_then(|p| {
        let dir = std::fs::read_dir(format!("/proc/{p}/fd")).ok()?;
        Some(
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t.to_string_lossy().starts_with("socket:"))
                .count(),
        )
    });
    let probe = Probe {
        rss_mib: field("VmRSS:"),
        peak_rss_mib: field("VmHWM:"),
        sockets,
    };
    fleet.stop().await;
    Ok(probe)
}
