//! Scenario 2, cold start: K concurrent first requests for one template's helper tree (which
//! needs the context, the models, the OPT, a mapper compile and a helper build). Counts the loads
//! and compiles each cache ran (with the cache: exactly one per key, whatever K) and times the
//! first and the last answer; against TTL 0, where every request does all of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::harness::{node_err, Harness};
use super::read::{api_read, http_read, Artifact, Path};
use super::{BenchError, BenchResult};
use crate::cache::Change;
use crate::node::Node;

/// Loads run by each cache during one trial.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Loads {
    /// OPT loads (each a read and a parse of the XML).
    pub opt: u64,
    /// Context loads.
    pub context: u64,
    /// Mapper compiles.
    pub mapper_compiles: u64,
    /// Helper-tree builds.
    pub helper_builds: u64,
    /// Tenant record loads (HTTP checks the tenant on every request).
    pub tenant: u64,
}

impl Loads {
    async fn of(node: &Node) -> Loads {
        let c = node.caches();
        Loads {
            opt: c.opt.stats().await.loads,
            context: c.context.stats().await.loads,
            mapper_compiles: c.mapper.stats().await.loads,
            helper_builds: c.helpers.stats().await.loads,
            tenant: c.tenant.stats().await.loads,
        }
    }

    fn minus(self, before: Loads) -> Loads {
        Loads {
            opt: self.opt - before.opt,
            context: self.context - before.context,
            mapper_compiles: self.mapper_compiles - before.mapper_compiles,
            helper_builds: self.helper_builds - before.helper_builds,
            tenant: self.tenant - before.tenant,
        }
    }

    fn max(self, o: Loads) -> Loads {
        Loads {
            opt: self.opt.max(o.opt),
            context: self.context.max(o.context),
            mapper_compiles: self.mapper_compiles.max(o.mapper_compiles),
            helper_builds: self.helper_builds.max(o.helper_builds),
            tenant: self.tenant.max(o.tenant),
        }
    }

    /// Exactly one load of the OPT and the context, one compile and one build.
    pub fn exactly_once(&self) -> bool {
        self.opt == 1 && self.context == 1 && self.mapper_compiles == 1 && self.helper_builds == 1
    }
}

/// One (K, mode, path) cell over its trials.
#[derive(Debug, Clone, Serialize)]
pub struct ColdCell {
    /// Concurrent first requests.
    pub k: usize,
    /// True for the cached node, false for TTL 0.
    pub cached: bool,
    /// In-process API or HTTP.
    pub path: Path,
    /// Trials run (caches emptied before each).
    pub trials: usize,
    /// Median over trials of the time to the first answer, µs.
    pub first_us: f64,
    /// Median over trials of the time to the last answer, µs.
    pub last_us: f64,
    /// Largest time to the last answer, µs.
    pub last_max_us: f64,
    /// The most loads any trial ran, per cache.
    pub loads_max: Loads,
    /// The fewest loads any trial ran, per cache.
    pub loads_min: Loads,
}

/// The cold-start results.
#[derive(Debug, Clone, Serialize)]
pub struct ColdReport {
    /// Every cell.
    pub cells: Vec<ColdCell>,
    /// True when every cached trial loaded the OPT and the context once, compiled once and built
    /// once, whatever K.
    pub exactly_once: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the scenario.
pub async fn run(h: &Harness) -> BenchResult<ColdReport> {
    let (cached, uncached) = h.cached_and_uncached().await?;
    let client = reqwest::Client::new();
    let ks = h.sizes.cold_ks.clone();
    let bar = h.progress.bar("cold-start", (ks.len() * 4) as u64);
    let mut cells = Vec::new();
    for &k in &ks {
        for path in [Path::Api, Path::Http] {
            for is_cached in [true, false] {
                let t = if is_cached { &cached } else { &uncached };
                bar.set_message(format!(
                    "K={k} {path:?} {}",
                    if is_cached { "cached" } else { "TTL 0" }
                ));
                let node = t.fleet().node(0).clone();
                let base = t.fleet().base(0);
                // Open the HTTP connections first: the measurement is the cold cache, not TCP.
                if path == Path::Http {
                    futures_util::future::join_all(
                        (0..k).map(|_| http_read(&client, &base, &h.tenant, Artifact::Opt)),
                    )
                    .await
                    .into_iter()
                    .collect::<BenchResult<Vec<()>>>()?;
                }
                let mut firsts = Vec::new();
                let mut lasts = Vec::new();
                let mut loads_max = Loads::default();
                let mut loads_min: Option<Loads> = None;
                for _ in 0..h.sizes.cold_trials {
                    node.caches()
                        .apply(&Change::Evict {
                            group: None,
                            tenant: None,
                            key: None,
                        })
                        .await;
                    let before = Loads::of(&node).await;
                    let (first, last) = trial(&node, &client, &base, &h.tenant, k, path).await?;
                    let loads = Loads::of(&node).await.minus(before);
                    firsts.push(first.as_secs_f64() * 1e6);
                    lasts.push(last.as_secs_f64() * 1e6);
                    loads_max = loads_max.max(loads);
                    loads_min = Some(match loads_min {
                        None => loads,
                        Some(m) => Loads {
                            opt: m.opt.min(loads.opt),
                            context: m.context.min(loads.context),
                            mapper_compiles: m.mapper_compiles.min(loads.mapper_compiles),
                            helper_builds: m.helper_builds.min(loads.helper_builds),
                            tenant: m.tenant.min(loads.tenant),
                        },
                    });
                }
                let last_max_us = lasts.iter().copied().fold(0.0, f64::max);
                cells.push(ColdCell {
                    k,
                    cached: is_cached,
                    path,
                    trials: h.sizes.cold_trials,
                    first_us: median(&mut firsts),
                    last_us: median(&mut lasts),
                    last_max_us,
                    loads_max,
                    loads_min: loads_min.unwrap_or_default(),
                });
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    cached.stop().await;
    uncached.stop().await;
    let exactly_once = cells
        .iter()
        .filter(|c| c.cached)
        .all(|c| c.loads_max.exactly_once() && c.loads_min.exactly_once());
    Ok(ColdReport {
        cells,
        exactly_once,
    })
}

/// K concurrent helper requests released together; the times to the first and last answer.
async fn trial(
    node: &Arc<Node>,
    client: &reqwest::Client,
    base: &str,
    tenant: &str,
    k: usize,
    path: Path,
) -> BenchResult<(Duration, Duration)> {
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = (0..k)
        .map(|_| {
            let node = node.clone();
            let client = client.clone();
            let base = base.to_string();
            let tenant = tenant.to_string();
            let mut go = go_rx.clone();
            tokio::spawn(async move {
                let _ = go.wait_for(|g| *g).await;
                match path {
                    Path::Api => api_read(&node, &tenant, Artifact::Helpers)
                        .await
                        .map_err(node_err("cold helper request"))?,
                    Path::Http => http_read(&client, &base, &tenant, Artifact::Helpers).await?,
                }
                Ok::<_, BenchError>(Instant::now())
            })
        })
        .collect();
    // Let every task reach the gate.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let t0 = Instant::now();
    let _ = go_tx.send(true);
    let mut first: Option<Instant> = None;
    let mut last = t0;
    for t in tasks {
        let done = t
            .await
            .map_err(|e| BenchError::Setup(format!("a cold-start task failed: {e}")))??;
        first = Some(first.map_or(done, |f| f.min(done)));
        last = last.max(done);
    }
    Ok((
        first.unwrap_or(t0).saturating_duration_since(t0),
        last.saturating_duration_since(t0),
    ))
}
