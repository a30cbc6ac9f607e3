//! `openfhir-cache bench`: the end-to-end benchmark harness.
//!
//! Every scenario compares this cache with the alternative a user would otherwise pick, in the
//! same run, against a real PostgreSQL:
//!
//! * [`Scenario::Read`]: a cached read against TTL 0 (every read goes to PostgreSQL), for the OPT,
//!   one context, all contexts, the compiled mapper and the helper tree, through the in-process
//!   API and through HTTP, at concurrency 1, 8 and 64.
//! * [`Scenario::ColdStart`]: K concurrent first requests for one template: loads and compiles
//!   counted, time to the first and last answer; against TTL 0.
//! * [`Scenario::Propagation`]: a write on one node until no other node can serve the old value,
//!   over the peer channel, NOTIFY and catch-up alone, against Redis pub/sub and the raw TCP floor.
//! * [`Scenario::Scale`]: peer-channel propagation, memory and connections for 2 to 32 nodes.
//! * [`Scenario::Write`]: upserts with the invalidation triggers and NOTIFY against without them.
//! * [`Scenario::Catchup`]: replaying 10,000 and 100,000 invalidation-log rows.
//! * [`Scenario::Helpers`]: an isolated copy of a helper tree (what each use gets) against a
//!   rebuild, in-process.
//!
//! The harness creates a throwaway database (or uses the given one with `--in-place`), starts
//! the nodes it needs in this process on loopback addresses, writes a report directory (JSON,
//! Markdown, SVG charts) and cleans up after itself, also on Ctrl-C and SIGTERM.

mod catchup;
mod cold;
pub mod data;
mod harness;
mod helpers;
mod propagation;
mod read;
pub mod report;
mod scale;
pub mod stats;
mod write;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use harness::Harness;
pub use report::{Report, Target};

/// A benchmark scenario, selectable by name with `--scenario`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Cached reads against TTL 0, in-process and over HTTP, at concurrency 1, 8 and 64.
    Read,
    /// K concurrent first requests for one template: loads and compiles, first and last answer.
    ColdStart,
    /// Invalidation propagation per channel (peer, NOTIFY, catch-up, Redis, raw TCP).
    Propagation,
    /// Propagation, memory and connections for clusters of 2 to 32 nodes.
    Scale,
    /// Upsert cost with and without the invalidation triggers and NOTIFY.
    Write,
    /// Replaying 10,000 and 100,000 invalidation-log rows.
    Catchup,
    /// An isolated helper-tree copy (and one with a deep write) against a rebuild, in-process.
    Helpers,
}

impl Scenario {
    /// Every scenario, in run order.
    pub const ALL: [Scenario; 7] = [
        Scenario::Read,
        Scenario::ColdStart,
        Scenario::Propagation,
        Scenario::Scale,
        Scenario::Write,
        Scenario::Catchup,
        Scenario::Helpers,
    ];

    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Read => "read",
            Scenario::ColdStart => "cold-start",
            Scenario::Propagation => "propagation",
            Scenario::Scale => "scale",
            Scenario::Write => "write",
            Scenario::Catchup => "catchup",
            Scenario::Helpers => "helpers",
        }
    }
}

/// What to run and where.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The short run (about three minutes) instead of the full one (under ten minutes).
    pub quick: bool,
    /// Scenarios to run; empty means all.
    pub scenarios: Vec<Scenario>,
    /// Report directory (created if missing).
    pub out: PathBuf,
    /// The PostgreSQL server (its database is the admin database for the throwaway one).
    pub database_url: String,
    /// Run in `database_url`'s database itself instead of a throwaway database.
    pub in_place: bool,
    /// Redis for the pub/sub baseline; `None` skips it.
    pub redis_url: Option<String>,
}

/// How much of everything to do: the quick or the full run.
#[derive(Debug, Clone, Serialize)]
pub struct Sizes {
    /// Measuring time of one read-path cell (artifact, mode, path, concurrency).
    pub read_cell: Duration,
    /// Fewest reads per reading task of one read-path cell (a slow cell runs longer than
    /// `read_cell`, up to 10x).
    pub read_cell_ops_per_task: u64,
    /// Cold-start concurrencies K.
    pub cold_ks: Vec<usize>,
    /// Cold-start trials per K.
    pub cold_trials: usize,
    /// Messages or writes per fast propagation channel.
    pub prop_writes: usize,
    /// Writes through HTTP PUT (they include an OPT parse and a database write).
    pub prop_put_writes: usize,
    /// Invalidations of the peer message CPU measurement.
    pub peer_cpu_messages: usize,
    /// Writes for catch-up alone (each waits up to one interval).
    pub catchup_writes: usize,
    /// The catch-up interval used for "catch-up alone", in milliseconds.
    pub catchup_interval_ms: u64,
    /// Cluster sizes of the scale scenario.
    pub scale_sizes: Vec<usize>,
    /// Writes per cluster size.
    pub scale_writes: usize,
    /// Measuring time of one write-path cell.
    pub write_cell: Duration,
    /// Catch-up backlogs, in log rows.
    pub catchup_rows: Vec<usize>,
    /// Repeats per backlog.
    pub catchup_repeats: usize,
    /// Samples of each helper-tree operation (build, copy, copy and write).
    pub helper_samples: usize,
    /// Helper-tree builds per sample.
    pub helper_builds: usize,
    /// Helper-tree copies (and copies with a write) per sample.
    pub helper_copies: usize,
}

impl Sizes {
    /// The sizes of the quick or the full run.
    pub fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                read_cell: Duration::from_millis(300),
                read_cell_ops_per_task: 40,
                cold_ks: vec![1, 8, 64],
                cold_trials: 2,
                prop_writes: 300,
                prop_put_writes: 100,
                peer_cpu_messages: 2_000,
                catchup_writes: 10,
                catchup_interval_ms: 100,
                scale_sizes: vec![2, 4, 8, 16, 32],
                scale_writes: 60,
                write_cell: Duration::from_millis(800),
                catchup_rows: vec![10_000, 100_000],
                catchup_repeats: 1,
                helper_samples: 15,
                helper_builds: 200,
                helper_copies: 2_000,
            }
        } else {
            Sizes {
                read_cell: Duration::from_millis(1500),
                read_cell_ops_per_task: 100,
                cold_ks: vec![1, 8, 64, 256],
                cold_trials: 5,
                prop_writes: 2000,
                prop_put_writes: 500,
                peer_cpu_messages: 10_000,
                catchup_writes: 50,
                catchup_interval_ms: 100,
                scale_sizes: vec![2, 4, 8, 16, 32],
                scale_writes: 500,
                write_cell: Duration::from_secs(5),
                catchup_rows: vec![10_000, 100_000],
                catchup_repeats: 3,
                helper_samples: 51,
                helper_builds: 1_000,
                helper_copies: 10_000,
            }
        }
    }
}

/// What can stop a benchmark run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// A SQL statement of the harness failed.
    #[error("{what}: {source}")]
    Sql {
        /// What the harness was doing.
        what: String,
        /// The database error.
        source: tokio_postgres::Error,
    },
    /// A node operation failed.
    #[error("{what}: {source}")]
    Node {
        /// What the harness was doing.
        what: &'static str,
        /// The library error.
        source: crate::Error,
    },
    /// A node's configuration was refused (a harness bug: it builds the configuration).
    #[error("bench node configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// An HTTP request to a node failed or answered an unexpected status.
    #[error("HTTP {what}: {message}")]
    Http {
        /// The request.
        what: String,
        /// What went wrong.
        message: String,
    },
    /// Setting up the run failed (addresses, cluster formation, a measurement that never ended).
    #[error("{0}")]
    Setup(String),
    /// Writing the report failed.
    #[error("writing {path}: {message}")]
    Report {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Ctrl-C or SIGTERM.
    #[error("interrupted")]
    Interrupted,
}

/// The harness's result type.
pub type BenchResult<T> = std::result::Result<T, BenchError>;

/// Runs the selected scenarios, writes the report and returns it. The throwaway database is
/// dropped and every node stopped before this returns, whether the run succeeded, failed or was
/// interrupted by Ctrl-C or SIGTERM.
pub async fn run(opts: BenchOptions) -> BenchResult<Report> {
    let started = Instant::now();
    let mut scenarios = if opts.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        opts.scenarios.clone()
    };
    scenarios.sort();
    scenarios.dedup();
    let sizes = Sizes::new(opts.quick);
    let harness = Harness::setup(&opts, sizes).await?;
    let outcome = tokio::select! {
        r = run_scenarios(&harness, &scenarios) => r,
        _ = crate::app::shutdown_signal() => Err(BenchError::Interrupted),
    };
    // Whatever happened: stop what is still running and drop the throwaway database.
    let cleaned = harness.cleanup().await;
    let mut report = outcome?;
    cleaned?;
    report.meta.duration_secs = started.elapsed().as_secs_f64();
    report.meta.loadavg_end = report::loadavg();
    report::write(&report, &opts.out)?;
    Ok(report)
}

async fn run_scenarios(h: &Harness, scenarios: &[Scenario]) -> BenchResult<Report> {
    let mut report = Report::new(h, scenarios).await?;
    for &s in scenarios {
        h.progress.section(s.name());
        let t = Instant::now();
        match s {
            Scenario::Read => report.read = Some(read::run(h).await?),
            Scenario::ColdStart => report.cold_start = Some(cold::run(h).await?),
            Scenario::Propagation => report.propagation = Some(propagation::run(h).await?),
            Scenario::Scale => report.scale = Some(scale::run(h).await?),
            Scenario::Write => report.write = Some(write::run(h).await?),
            Scenario::Catchup => report.catchup = Some(catchup::run(h).await?),
            Scenario::Helpers => report.helpers = Some(helpers::run(h).await?),
        }
        report
            .meta
            .scenario_secs
            .insert(s.name().to_string(), t.elapsed().as_secs_f64());
        h.progress.done(s.name(), t.elapsed());
    }
    report.evaluate();
    Ok(report)
}
