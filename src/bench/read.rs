//! Scenario 1, the read path: a cached read against TTL 0 (every read straight to PostgreSQL),
//! for the OPT, one context, all contexts, the compiled mapper and the helper tree, through the
//! in-process API and through HTTP, at concurrency 1, 8 and 64.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::harness::{node_err, Harness};
use super::stats::{Recorder, Summary};
use super::{data, BenchError, BenchResult};
use crate::node::Node;

/// The concurrencies of the read path.
pub const CONCURRENCY: [usize; 3] = [1, 8, 64];

/// What is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Artifact {
    /// `Node::opt` / `GET /opt/{id}`.
    Opt,
    /// `Node::context` / `GET /fc/context/{id}`.
    Context,
    /// `Node::contexts` / `GET /fc/context`.
    AllContexts,
    /// `Node::mapper` / `GET /fc/mapper/{id}`.
    Mapper,
    /// `Node::helpers` / `GET /fc/helpers/{id}`.
    Helpers,
}

impl Artifact {
    /// Every artifact, in report order.
    pub const ALL: [Artifact; 5] = [
        Artifact::Opt,
        Artifact::Context,
        Artifact::AllContexts,
        Artifact::Mapper,
        Artifact::Helpers,
    ];

    /// Display name.
    pub fn label(self) -> &'static str {
        match self {
            Artifact::Opt => "OPT",
            Artifact::Context => "context",
            Artifact::AllContexts => "all contexts",
            Artifact::Mapper => "mapper",
            Artifact::Helpers => "helpers",
        }
    }

    fn path(self) -> String {
        let id = data::TEMPLATE;
        match self {
            Artifact::Opt => format!("/opt/{id}"),
            Artifact::Context => format!("/fc/context/{id}"),
            Artifact::AllContexts => "/fc/context".to_string(),
            Artifact::Mapper => format!("/fc/mapper/{id}"),
            Artifact::Helpers => format!("/fc/helpers/{id}"),
        }
    }
}

/// One in-process read of `a`.
pub async fn api_read(node: &Node, tenant: &str, a: Artifact) -> crate::Result<()> {
    let id = data::TEMPLATE;
    match a {
        Artifact::Opt => node.opt(tenant, id).await.map(drop),
        Artifact::Context => node.context(tenant, id).await.map(drop),
        Artifact::AllContexts => node.contexts(tenant).await.map(drop),
        Artifact::Mapper => node.mapper(tenant, id).await.map(drop),
        Artifact::Helpers => node.helpers(tenant, id).await.map(drop),
    }
}

/// One HTTP read of `a` from the node at `base`; the body is read in full.
pub async fn http_read(
    client: &reqwest::Client,
    base: &str,
    tenant: &str,
    a: Artifact,
) -> BenchResult<()> {
    let url = format!("{base}{}", a.path());
    let fail = |message: String| BenchError::Http {
        what: format!("GET {url}"),
        message,
    };
    let r = client
        .get(&url)
        .header("x-tenant-id", tenant)
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = r.status();
    let body = r.bytes().await.map_err(|e| fail(e.to_string()))?;
    if status != reqwest::StatusCode::OK {
        return Err(fail(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )));
    }
    Ok(())
}

/// How a read was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// The in-process API (`Node`).
    Api,
    /// HTTP on loopback (client in the same process).
    Http,
}

/// One measured cell.
#[derive(Debug, Clone, Serialize)]
pub struct ReadCell {
    /// What was read.
    pub artifact: Artifact,
    /// How.
    pub path: Path,
    /// True for the cached node (TTL -1), false for TTL 0.
    pub cached: bool,
    /// Tasks reading at once.
    pub concurrency: usize,
    /// Reads completed.
    pub ops: u64,
    /// Reads per second.
    pub throughput: f64,
    /// Latency of one read.
    pub latency: Summary,
}

/// Cached against TTL 0 for one artifact, path and concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct ReadRatio {
    /// What was read.
    pub artifact: Artifact,
    /// How.
    pub path: Path,
    /// Tasks reading at once.
    pub concurrency: usize,
    /// TTL 0 median latency / cached median latency.
    pub p50_speedup: f64,
    /// Cached throughput / TTL 0 throughput.
    pub throughput_ratio: f64,
}

/// The read-path results.
#[derive(Debug, Clone, Serialize)]
pub struct ReadReport {
    /// Least seconds each cell measured (after a warm-up of a tenth of that).
    pub cell_secs: f64,
    /// Fewest reads per reading task each cell measured (a slow cell runs past `cell_secs` to
    /// reach them, up to ten times as long).
    pub cell_ops_per_task: u64,
    /// Every cell.
    pub cells: Vec<ReadCell>,
    /// The comparisons.
    pub ratios: Vec<ReadRatio>,
}

impl ReadReport {
    /// The cell for these coordinates.
    pub fn cell(&self, a: Artifact, p: Path, cached: bool, c: usize) -> Option<&ReadCell> {
        self.cells
            .iter()
            .find(|x| x.artifact == a && x.path == p && x.cached == cached && x.concurrency == c)
    }
}

/// How long a cell measures: at least `time` and at least `ops` calls in all, but never longer
/// than `cap`. A time alone is not enough: a slow cell (TTL 0 at concurrency 64) would hold a
/// few calls per task, most of them paying for the tasks' start, and its figure would be noise;
/// a floor of calls per task gives every cell a comparable sample.
#[derive(Debug, Clone, Copy)]
pub struct Extent {
    /// The least time measured.
    pub time: Duration,
    /// The fewest calls measured, over all tasks.
    pub ops: u64,
    /// The longest a cell may take, whatever it has counted.
    pub cap: Duration,
}

impl Extent {
    /// A tenth of this extent, for the warm-up.
    fn warmup(self) -> Extent {
        Extent {
            time: self.time / 10,
            ops: self.ops / 10,
            cap: self.cap / 10,
        }
    }
}

/// Runs `op` from `concurrency` tasks for `measure` (after a warm-up of a tenth of it), recording
/// each call's latency. Returns the latencies, the number of calls and the seconds taken.
pub async fn drive<F, Fut>(
    concurrency: usize,
    measure: Extent,
    op: F,
) -> BenchResult<(Recorder, u64, f64)>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BenchResult<()>> + Send + 'static,
{
    let op = Arc::new(op);
    phase(concurrency, measure.warmup(), op.clone()).await?;
    phase(concurrency, measure, op).await
}

async fn phase<F, Fut>(
    concurrency: usize,
    extent: Extent,
    op: Arc<F>,
) -> BenchResult<(Recorder, u64, f64)>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BenchResult<()>> + Send + 'static,
{
    let start = Instant::now();
    let deadline = start + extent.time;
    let cap = start + extent.cap.max(extent.time);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let op = op.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut r = Recorder::new();
                let mut n = 0u64;
                loop {
                    let t = Instant::now();
                    let enough = done.load(std::sync::atomic::Ordering::Relaxed) >= extent.ops;
                    if n > 0 && ((t >= deadline && enough) || t >= cap) {
                        break;
                    }
                    op().await?;
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    r.record(t.elapsed());
                    n += 1;
                    // A cached read never waits, so without this one task would run its whole
                    // loop before the next one starts: yield (outside the timed part) to keep
                    // the tasks interleaved as concurrent callers are.
                    if n.is_multiple_of(8) {
                        tokio::task::yield_now().await;
                    }
                }
                Ok::<_, BenchError>((r, n))
            })
        })
        .collect();
    let (all, ops) = Recorder::join(tasks, "a load task").await?;
    Ok((all, ops, start.elapsed().as_secs_f64()))
}

/// Runs the scenario.
pub async fn run(h: &Harness) -> BenchResult<ReadReport> {
    let (cached, uncached) = h.cached_and_uncached().await?;
    let client = reqwest::Client::builder()
        .build()
        .map_err(|e| BenchError::Setup(format!("HTTP client: {e}")))?;
    let extent = |c: usize| Extent {
        time: h.sizes.read_cell,
        ops: h.sizes.read_cell_ops_per_task * c as u64,
        cap: h.sizes.read_cell * 10,
    };
    let total = Artifact::ALL.len() * 2 * CONCURRENCY.len() * 2;
    let bar = h.progress.bar("read", total as u64);
    let mut cells = Vec::with_capacity(total);
    for a in Artifact::ALL {
        for path in [Path::Api, Path::Http] {
            for c in CONCURRENCY {
                for is_cached in [true, false] {
                    let t = if is_cached { &cached } else { &uncached };
                    bar.set_message(format!(
                        "{} {:?} c={c} {}",
                        a.label(),
                        path,
                        if is_cached { "cached" } else { "TTL 0" }
                    ));
                    let node = t.fleet().node(0).clone();
                    let tenant = h.tenant.clone();
                    // Load once outside the measurement (the cached node then serves from memory).
                    api_read(&node, &tenant, a)
                        .await
                        .map_err(node_err("read a seeded artifact"))?;
                    let (rec, ops, secs) = match path {
                        Path::Api => {
                            drive(c, extent(c), move || {
                                let node = node.clone();
                                let tenant = tenant.clone();
                                async move {
                                    api_read(&node, &tenant, a)
                                        .await
                                        .map_err(node_err("read through the API"))
                                }
                            })
                            .await?
                        }
                        Path::Http => {
                            let base = t.fleet().base(0);
                            let client = client.clone();
                            drive(c, extent(c), move || {
                                let client = client.clone();
                                let base = base.clone();
                                let tenant = tenant.clone();
                                async move { http_read(&client, &base, &tenant, a).await }
                            })
                            .await?
                        }
                    };
                    cells.push(ReadCell {
                        artifact: a,
                        path,
                        cached: is_cached,
                        concurrency: c,
                        ops,
                        throughput: ops as f64 / secs,
                        latency: rec.summary(),
                    });
                    bar.inc(1);
                }
            }
        }
    }
    bar.finish_and_clear();
    cached.stop().await;
    uncached.stop().await;
    let mut report = ReadReport {
        cell_secs: h.sizes.read_cell.as_secs_f64(),
        cell_ops_per_task: h.sizes.read_cell_ops_per_task,
        cells,
        ratios: Vec::new(),
    };
    for a in Artifact::ALL {
        for path in [Path::Api, Path::Http] {
            for c in CONCURRENCY {
                if let (Some(x), Some(y)) = (
                    report.cell(a, path, true, c),
                    report.cell(a, path, false, c),
                ) {
                    let r = ReadRatio {
                        artifact: a,
                        path,
                        concurrency: c,
                        p50_speedup: y.latency.p50_us / x.latency.p50_us,
                        throughput_ratio: x.throughput / y.throughput,
                    };
                    report.ratios.push(r);
                }
            }
        }
    }
    Ok(report)
}
