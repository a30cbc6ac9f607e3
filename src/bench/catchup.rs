//! Scenario 6, catch-up: a node that missed N invalidations (NOTIFY off, no periodic catch-up)
//! replays them from the log in one step; N = 10,000 and 100,000 rows, each a different key,
//! written in one transaction after the node's cursor was set. Memory is sampled meanwhile.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::harness::{node_err, sql, Harness, Linking, NodeSpec};
use super::stats::rss_bytes;
use super::{BenchError, BenchResult};

/// One backlog size.
#[derive(Debug, Clone, Serialize)]
pub struct CatchupRow {
    /// Log rows to replay.
    pub rows: usize,
    /// Repeats.
    pub repeats: usize,
    /// Median time of one catch-up step over them, ms.
    pub step_ms: f64,
    /// Slowest step, ms.
    pub step_max_ms: f64,
    /// Rows applied per second (median step).
    pub rows_per_sec: f64,
    /// Time to insert the rows (one INSERT ... SELECT), ms, for scale.
    pub insert_ms: f64,
    /// Peak growth of this process's resident memory during a step, MiB.
    pub peak_rss_growth_mib: Option<f64>,
    /// True when every step applied every row.
    pub all_applied: bool,
}

/// The catch-up results.
#[derive(Debug, Clone, Serialize)]
pub struct CatchupReport {
    /// Every backlog size.
    pub rows: Vec<CatchupRow>,
}

/// Runs the scenario.
pub async fn run(h: &Harness) -> BenchResult<CatchupReport> {
    let fleet = h.track(
        h.start_fleet(1, Linking::Separate, NodeSpec::peer_only())
            .await?,
    );
    let node = fleet.fleet().node(0).clone();
    node.put_tenant(&h.tenant, "openfhir-cache bench", &serde_json::json!({}))
        .await
        .map_err(node_err("create the bench tenant"))?;
    // Start from an empty backlog.
    node.catch_up()
        .await
        .map_err(node_err("catch up before measuring"))?;
    let db = h.sql().await?;
    let insert = db
        .prepare(
            "INSERT INTO openfhir_invalidation_log (cache_group, tenant, key, operation, origin) \
             SELECT 'opt', $1, 'cu' || $2::bigint || '_' || g, 'UPDATE', 'openfhir-cache-bench' \
             FROM generate_series(1, $3::bigint) AS g",
        )
        .await
        .map_err(sql("prepare the log insert".into()))?;
    let total = h.sizes.catchup_rows.len() * h.sizes.catchup_repeats;
    let bar = h.progress.bar("catchup", total as u64);
    let mut rows = Vec::new();
    let mut batch = 0i64;
    for &n in &h.sizes.catchup_rows {
        let mut steps = Vec::new();
        let mut inserts = Vec::new();
        let mut peak: Option<u64> = None;
        let mut all_applied = true;
        for _ in 0..h.sizes.catchup_repeats {
            bar.set_message(format!("{n} rows"));
            batch += 1;
            let t = Instant::now();
            db.execute(&insert, &[&h.tenant, &batch, &(n as i64)])
                .await
                .map_err(sql("insert log rows".into()))?;
            inserts.push(t.elapsed().as_secs_f64() * 1e3);
            let sampler = Sampler::start();
            let t = Instant::now();
            let report = node.catch_up().await.map_err(node_err("catch up"))?;
            steps.push(t.elapsed().as_secs_f64() * 1e3);
            let growth = sampler.stop();
            peak = match (peak, growth) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            all_applied &= report.applied as usize == n;
            if report.applied as usize != n {
                return Err(BenchError::Setup(format!(
                    "catch-up applied {} of {n} rows (read {})",
                    report.applied, report.read
                )));
            }
            bar.inc(1);
        }
        steps.sort_by(f64::total_cmp);
        inserts.sort_by(f64::total_cmp);
        let step_ms = steps[steps.len() / 2];
        rows.push(CatchupRow {
            rows: n,
            repeats: steps.len(),
            step_ms,
            step_max_ms: steps.last().copied().unwrap_or(f64::NAN),
            rows_per_sec: n as f64 / (step_ms / 1e3),
            insert_ms: inserts[inserts.len() / 2],
            peak_rss_growth_mib: peak.map(|b| b as f64 / (1024.0 * 1024.0)),
            all_applied,
        });
    }
    bar.finish_and_clear();
    fleet.stop().await;
    Ok(CatchupReport { rows })
}

/// Samples the resident set size every 2 ms on its own thread; reports the peak growth.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    base: Option<u64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Returns the allocator's free memory to the system, so that growth during a step shows in
/// the resident set size instead of reusing what earlier scenarios freed (glibc only).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
        unsafe {
            malloc_trim(0);
        }
    }
}

impl Sampler {
    fn start() -> Sampler {
        trim_heap();
        let base = rss_bytes();
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(base.unwrap_or(0)));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::Builder::new()
                .name("bench-rss".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(r) = rss_bytes() {
                            peak.fetch_max(r, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
                .ok()
        };
        Sampler {
            stop,
            peak,
            base,
            thread,
        }
    }

    fn stop(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let peak = self
            .peak
            .load(Ordering::Relaxed)
            .max(rss_bytes().unwrap_or(0));
        self.base.map(|b| peak.saturating_sub(b))
    }
}
