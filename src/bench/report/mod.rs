//! The report: every figure as JSON, the same as Markdown tables, SVG charts, the targets and
//! whether each was met, and the summary printed on stdout.
//!
//! # Layout
//! * `targets`: the published [`Target`]s, [`Report::evaluate`] and [`Report::targets_table`].
//! * `markdown`: [`Report::markdown`] and its per-scenario sections.
//! * `charts`: the SVG charts.
//! * this module: the [`Report`] and its [`Meta`], and [`write()`].

mod charts;
mod markdown;
mod targets;

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};

use serde::Serialize;

use super::catchup::CatchupReport;
use super::cold::ColdReport;
use super::harness::{sql, Harness};
use super::helpers::HelpersReport;
use super::propagation::PropagationReport;
use super::read::ReadReport;
use super::scale::ScaleReport;
use super::write::WriteReport;
use super::{BenchError, BenchResult, Scenario, Sizes};

pub use markdown::read_md;
pub use targets::Target;

use charts::charts;

/// Where and how the run was made.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    /// openfhir-cache version.
    pub version: String,
    /// Start of the run, RFC 3339 UTC.
    pub started_utc: String,
    /// `--quick`.
    pub quick: bool,
    /// CPUs available to this process.
    pub cpus: usize,
    /// `uname`-like description of the OS.
    pub os: String,
    /// `SELECT version()`.
    pub postgres_version: String,
    /// `server_version_num`.
    pub postgres_version_num: i32,
    /// Server settings that shape the figures.
    pub postgres_settings: BTreeMap<String, String>,
    /// A throwaway database, or the given one.
    pub database: String,
    /// The Redis URL of the pub/sub baseline, if any.
    pub redis: Option<String>,
    /// Scenarios run.
    pub scenarios: Vec<&'static str>,
    /// Seconds per scenario.
    pub scenario_secs: BTreeMap<String, f64>,
    /// Seconds for the whole run, cleanup included.
    pub duration_secs: f64,
    /// The run's sizes.
    pub sizes: Sizes,
    /// How the nodes ran.
    pub setup: String,
    /// `/proc/loadavg` when the run started: other work on the machine shows here.
    pub loadavg_start: Option<String>,
    /// `/proc/loadavg` when it ended.
    pub loadavg_end: Option<String>,
}

/// `/proc/loadavg` (1, 5 and 15 minute load averages, runnable/all tasks), if readable.
pub fn loadavg() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where and how.
    pub meta: Meta,
    /// The targets.
    pub targets: Vec<Target>,
    /// Scenario 1.
    pub read: Option<ReadReport>,
    /// Scenario 2.
    pub cold_start: Option<ColdReport>,
    /// Scenario 3.
    pub propagation: Option<PropagationReport>,
    /// Scenario 4.
    pub scale: Option<ScaleReport>,
    /// Scenario 5.
    pub write: Option<WriteReport>,
    /// Scenario 6.
    pub catchup: Option<CatchupReport>,
    /// Scenario 7.
    pub helpers: Option<HelpersReport>,
}

impl Report {
    /// An empty report with the run's metadata.
    pub async fn new(h: &Harness, scenarios: &[Scenario]) -> BenchResult<Report> {
        let db = h.sql().await?;
        let row = db
            .query_one(
                "SELECT version(), current_setting('server_version_num')::int, \
                 current_setting('fsync'), current_setting('synchronous_commit'), \
                 current_setting('max_connections'), current_setting('shared_buffers')",
                &[],
            )
            .await
            .map_err(sql("read the server version".into()))?;
        let mut settings = BTreeMap::new();
        for (i, name) in [
            (2, "fsync"),
            (3, "synchronous_commit"),
            (4, "max_connections"),
            (5, "shared_buffers"),
        ] {
            settings.insert(name.to_string(), row.get::<_, String>(i));
        }
        let os = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| format!("{} {}", std::env::consts::OS, r.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.to_string());
        Ok(Report {
            meta: Meta {
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_utc: time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                quick: h.sizes.read_cell < std::time::Duration::from_millis(500),
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
                os,
                postgres_version: row.get(0),
                postgres_version_num: row.get(1),
                postgres_settings: settings,
                database: if h.in_place {
                    "the given database (--in-place)".into()
                } else {
                    "a throwaway database, dropped at the end".into()
                },
                redis: h.redis_url.clone(),
                scenarios: scenarios.iter().map(|s| s.name()).collect(),
                scenario_secs: BTreeMap::new(),
                duration_secs: 0.0,
                sizes: h.sizes.clone(),
                setup: "every node in the harness process (one tokio runtime, one worker per \
                        CPU), each on its own loopback address, peer channel encrypted (a \
                        CLUSTER_SECRET is set, as in production); HTTP clients in the same \
                        process; PostgreSQL on the same machine"
                    .into(),
                loadavg_start: loadavg(),
                loadavg_end: None,
            },
            targets: Vec::new(),
            read: None,
            cold_start: None,
            propagation: None,
            scale: None,
            write: None,
            catchup: None,
            helpers: None,
        })
    }
}

/// Writes `report.json`, `report.md` and the SVG charts into `out`.
pub fn write(report: &Report, out: &FsPath) -> BenchResult<()> {
    let fail = |path: PathBuf| {
        move |e: std::io::Error| BenchError::Report {
            path,
            message: e.to_string(),
        }
    };
    std::fs::create_dir_all(out).map_err(fail(out.to_path_buf()))?;
    let json = serde_json::to_string_pretty(report).map_err(|e| BenchError::Report {
        path: out.join("report.json"),
        message: e.to_string(),
    })?;
    std::fs::write(out.join("report.json"), json).map_err(fail(out.join("report.json")))?;
    std::fs::write(out.join("report.md"), report.markdown())
        .map_err(fail(out.join("report.md")))?;
    charts(report, out)
}
