//! The report: every figure as JSON, the same as Markdown tables, SVG charts, the targets and
//! whether each was met, and the summary printed on stdout.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path as FsPath, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use super::catchup::CatchupReport;
use super::cold::ColdReport;
use super::harness::{sql, Harness};
use super::propagation::PropagationReport;
use super::read::{Artifact, Path, ReadReport};
use super::scale::ScaleReport;
use super::stats::{fmt_rate, fmt_ratio, fmt_us, Summary};
use super::write::WriteReport;
use super::{BenchError, BenchResult, Scenario, Sizes};

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

/// A published target and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// Stable id.
    pub id: &'static str,
    /// Scenario it belongs to.
    pub scenario: &'static str,
    /// The target, in words.
    pub target: String,
    /// What this run measured.
    pub measured: String,
    /// `Some(true)` met, `Some(false)` missed, `None` not evaluated (scenario not run, baseline
    /// skipped, or a figure that is only reported).
    pub met: Option<bool>,
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
                        CPU), each on its own loopback address; HTTP clients in the same process; \
                        PostgreSQL on the same machine"
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
        })
    }

    /// Compares the figures with the published targets.
    pub fn evaluate(&mut self) {
        let mut t = Vec::new();
        let not_run = |id, scenario, target: &str| Target {
            id,
            scenario,
            target: target.to_string(),
            measured: "not run".into(),
            met: None,
        };

        // ---- read ----
        const READ_P50: &str = "in-process cached read: p50 <= 1 µs";
        const READ_RATIO: &str = "in-process cached read >= 100x faster than TTL 0 (p50)";
        const HTTP_TP: &str = "HTTP cached GET >= 10x the throughput of TTL 0 at concurrency 64";
        match &self.read {
            Some(r) => {
                let worst = Artifact::ALL
                    .iter()
                    .filter_map(|&a| r.cell(a, Path::Api, true, 1).map(|c| (a, c.latency.p50_us)))
                    .max_by(|x, y| x.1.total_cmp(&y.1));
                if let Some((a, p50)) = worst {
                    t.push(Target {
                        id: "read_api_p50",
                        scenario: "read",
                        target: READ_P50.into(),
                        measured: format!(
                            "slowest artifact ({}) p50 {} at concurrency 1",
                            a.label(),
                            fmt_us(p50)
                        ),
                        met: Some(p50 <= 1.0),
                    });
                }
                let ratio = |p: Path, c: usize, f: fn(&super::read::ReadRatio) -> f64| {
                    r.ratios
                        .iter()
                        .filter(|x| x.path == p && x.concurrency == c)
                        .map(|x| (x.artifact, f(x)))
                        .min_by(|x, y| x.1.total_cmp(&y.1))
                };
                if let Some((a, v)) = ratio(Path::Api, 1, |x| x.p50_speedup) {
                    t.push(Target {
                        id: "read_api_ratio",
                        scenario: "read",
                        target: READ_RATIO.into(),
                        measured: format!("smallest speedup {} ({})", fmt_ratio(v), a.label()),
                        met: Some(v >= 100.0),
                    });
                }
                if let Some((a, v)) = ratio(Path::Http, 64, |x| x.throughput_ratio) {
                    t.push(Target {
                        id: "read_http_throughput",
                        scenario: "read",
                        target: HTTP_TP.into(),
                        measured: format!("smallest ratio {} ({})", fmt_ratio(v), a.label()),
                        met: Some(v >= 10.0),
                    });
                }
            }
            None => {
                t.push(not_run("read_api_p50", "read", READ_P50));
                t.push(not_run("read_api_ratio", "read", READ_RATIO));
                t.push(not_run("read_http_throughput", "read", HTTP_TP));
            }
        }

        // ---- cold start ----
        const COLD: &str = "cold start: exactly one load and one compile per key at every K";
        match &self.cold_start {
            Some(c) => {
                let ks: Vec<String> = c
                    .cells
                    .iter()
                    .filter(|x| x.cached && x.path == Path::Api)
                    .map(|x| x.k.to_string())
                    .collect();
                let worst = c
                    .cells
                    .iter()
                    .filter(|x| x.cached)
                    .map(|x| {
                        x.loads_max
                            .opt
                            .max(x.loads_max.context)
                            .max(x.loads_max.mapper_compiles)
                            .max(x.loads_max.helper_builds)
                    })
                    .max()
                    .unwrap_or(0);
                t.push(Target {
                    id: "cold_exactly_once",
                    scenario: "cold-start",
                    target: COLD.into(),
                    measured: format!(
                        "K = {}: at most {worst} load(s) of any cache per trial",
                        ks.join(", ")
                    ),
                    met: Some(c.exactly_once),
                });
            }
            None => t.push(not_run("cold_exactly_once", "cold-start", COLD)),
        }

        // ---- propagation ----
        const PEER_P50: &str = "peer channel, 3 nodes: p50 <= 60 µs";
        const PEER_P99: &str = "peer channel, 3 nodes: p99 <= 200 µs";
        const PEER_FASTEST: &str =
            "peer channel faster than NOTIFY and Redis pub/sub (p50 and p99)";
        const FLOOR: &str =
            "raw TCP floor reported (every propagation figure is also a ratio to it)";
        match &self.propagation {
            Some(p) => {
                if let Some(peer) = p.channel("peer") {
                    let l = &peer.latency;
                    t.push(Target {
                        id: "peer_p50",
                        scenario: "propagation",
                        target: PEER_P50.into(),
                        measured: format!(
                            "{} ({} the TCP floor)",
                            fmt_us(l.p50_us),
                            fmt_ratio(peer.ratio_to_tcp_p50)
                        ),
                        met: Some(l.p50_us <= 60.0),
                    });
                    t.push(Target {
                        id: "peer_p99",
                        scenario: "propagation",
                        target: PEER_P99.into(),
                        measured: format!(
                            "{} ({} the TCP floor)",
                            fmt_us(l.p99_us),
                            fmt_ratio(peer.ratio_to_tcp_p99)
                        ),
                        met: Some(l.p99_us <= 200.0),
                    });
                    let others: Vec<_> = ["notify_direct", "notify_trigger", "redis"]
                        .iter()
                        .filter_map(|id| p.channel(id))
                        .collect();
                    let redis_skipped = p
                        .channels
                        .iter()
                        .find(|c| c.id == "redis")
                        .and_then(|c| c.skipped.clone());
                    let mut measured = others
                        .iter()
                        .map(|o| {
                            format!(
                                "{}: p50 {} p99 {}",
                                o.id,
                                fmt_us(o.latency.p50_us),
                                fmt_us(o.latency.p99_us)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                    if let Some(r) = &redis_skipped {
                        measured.push_str(&format!("; Redis skipped: {r}"));
                    }
                    let faster = others
                        .iter()
                        .all(|o| l.p50_us < o.latency.p50_us && l.p99_us < o.latency.p99_us);
                    t.push(Target {
                        id: "peer_fastest",
                        scenario: "propagation",
                        target: PEER_FASTEST.into(),
                        measured,
                        met: if redis_skipped.is_some() && faster {
                            None
                        } else {
                            Some(faster)
                        },
                    });
                }
                if let Some(f) = p.channel("tcp_floor") {
                    t.push(Target {
                        id: "tcp_floor",
                        scenario: "propagation",
                        target: FLOOR.into(),
                        measured: format!(
                            "p50 {} p99 {}",
                            fmt_us(f.latency.p50_us),
                            fmt_us(f.latency.p99_us)
                        ),
                        met: Some(true),
                    });
                }
            }
            None => {
                t.push(not_run("peer_p50", "propagation", PEER_P50));
                t.push(not_run("peer_p99", "propagation", PEER_P99));
                t.push(not_run("peer_fastest", "propagation", PEER_FASTEST));
                t.push(not_run("tcp_floor", "propagation", FLOOR));
            }
        }

        // ---- scale ----
        const SCALE: &str = "peer channel, 32 nodes: p99 < 2 ms";
        match self
            .scale
            .as_ref()
            .and_then(|s| s.rows.iter().max_by_key(|r| r.nodes))
        {
            Some(r) => t.push(Target {
                id: "scale_p99",
                scenario: "scale",
                target: SCALE.into(),
                measured: format!(
                    "{} nodes: p50 {} p99 {}",
                    r.nodes,
                    fmt_us(r.latency.p50_us),
                    fmt_us(r.latency.p99_us)
                ),
                met: (r.nodes >= 32).then_some(r.latency.p99_us < 2000.0 && r.lost == 0),
            }),
            None => t.push(not_run("scale_p99", "scale", SCALE)),
        }

        // ---- write ----
        const WRITE: &str =
            "trigger + NOTIFY overhead on upserts <= 20% (p50 latency and throughput)";
        match &self.write {
            Some(w) => {
                let worst = w
                    .overhead
                    .iter()
                    .filter(|o| o.variant == super::write::Variant::LogAndNotify)
                    .map(|o| (o, o.p50_pct.max(o.throughput_pct)))
                    .max_by(|x, y| x.1.total_cmp(&y.1));
                if let Some((o, v)) = worst {
                    t.push(Target {
                        id: "write_overhead",
                        scenario: "write",
                        target: WRITE.into(),
                        measured: format!(
                            "worst: {:+.0}% ({} B OPT, {} writer(s): p50 {:+.0}%, throughput {:+.0}%)",
                            v, o.payload_bytes, o.writers, o.p50_pct, o.throughput_pct
                        ),
                        met: Some(v <= 20.0),
                    });
                }
            }
            None => t.push(not_run("write_overhead", "write", WRITE)),
        }

        // ---- catch-up ----
        const CATCHUP: &str = "catch-up of 100,000 log rows < 1 s";
        match self
            .catchup
            .as_ref()
            .and_then(|c| c.rows.iter().find(|r| r.rows == 100_000))
        {
            Some(r) => t.push(Target {
                id: "catchup_100k",
                scenario: "catchup",
                target: CATCHUP.into(),
                measured: format!(
                    "{} median, {} slowest ({} rows/s)",
                    fmt_us(r.step_ms * 1e3),
                    fmt_us(r.step_max_ms * 1e3),
                    fmt_rate(r.rows_per_sec)
                ),
                met: Some(r.step_ms < 1000.0),
            }),
            None => t.push(not_run("catchup_100k", "catchup", CATCHUP)),
        }
        self.targets = t;
    }

    /// The targets as a Markdown table (also the summary printed on stdout).
    pub fn targets_table(&self) -> String {
        let mut s = String::from("| scenario | target | measured | met |\n|---|---|---|---|\n");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**NO**",
                None => "-",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {met} |",
                t.scenario, t.target, t.measured
            );
        }
        s
    }

    /// The whole report as Markdown.
    pub fn markdown(&self) -> String {
        let m = &self.meta;
        let mut s = String::new();
        let _ = writeln!(s, "# openfhir-cache benchmark report\n");
        let _ = writeln!(
            s,
            "openfhir-cache {} · {} · {} run · {} CPUs · {} · PostgreSQL {} (fsync {}, \
             synchronous_commit {}) · {:.0} s\n",
            m.version,
            m.started_utc,
            if m.quick { "quick" } else { "full" },
            m.cpus,
            m.os,
            m.postgres_version_num,
            m.postgres_settings.get("fsync").map_or("?", String::as_str),
            m.postgres_settings
                .get("synchronous_commit")
                .map_or("?", String::as_str),
            m.duration_secs
        );
        let _ = writeln!(s, "Setup: {}.\n", m.setup);
        let _ = writeln!(
            s,
            "Load average (1, 5, 15 min, tasks) at the start: {}; at the end: {}. Other work on \
             the machine inflates every tail figure.\n",
            m.loadavg_start.as_deref().unwrap_or("?"),
            m.loadavg_end.as_deref().unwrap_or("?")
        );
        let _ = writeln!(s, "## Targets\n\n{}", self.targets_table());
        if let Some(r) = &self.read {
            s.push_str(&read_md(r));
        }
        if let Some(c) = &self.cold_start {
            s.push_str(&cold_md(c));
        }
        if let Some(p) = &self.propagation {
            s.push_str(&propagation_md(p));
        }
        if let Some(sc) = &self.scale {
            s.push_str(&scale_md(sc));
        }
        if let Some(w) = &self.write {
            s.push_str(&write_md(w));
        }
        if let Some(c) = &self.catchup {
            s.push_str(&catchup_md(c));
        }
        s
    }
}

/// The read-path headline table: per artifact, in-process p50 and HTTP throughput at 64.
pub fn read_md(r: &ReadReport) -> String {
    let mut s = format!(
        "## Read path\n\nCached (TTL -1) against TTL 0 (every read goes to PostgreSQL), {:.1} s per \
         cell.\n\n| artifact | in-process p50, cached | TTL 0 | speedup | HTTP c=64, cached | TTL 0 | ratio |\n\
         |---|---|---|---|---|---|---|\n",
        r.cell_secs
    );
    for a in Artifact::ALL {
        let api = (
            r.cell(a, Path::Api, true, 1),
            r.cell(a, Path::Api, false, 1),
        );
        let http = (
            r.cell(a, Path::Http, true, 64),
            r.cell(a, Path::Http, false, 64),
        );
        if let ((Some(ac), Some(au)), (Some(hc), Some(hu))) = (api, http) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                a.label(),
                fmt_us(ac.latency.p50_us),
                fmt_us(au.latency.p50_us),
                fmt_ratio(au.latency.p50_us / ac.latency.p50_us),
                fmt_rate(hc.throughput),
                fmt_rate(hu.throughput),
                fmt_ratio(hc.throughput / hu.throughput)
            );
        }
    }
    s.push_str(
        "\nEvery cell (p50 / p99 / throughput):\n\n| artifact | path | c | cached p50 | cached p99 | \
         cached rate | TTL 0 p50 | TTL 0 p99 | TTL 0 rate |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for a in Artifact::ALL {
        for p in [Path::Api, Path::Http] {
            for c in super::read::CONCURRENCY {
                if let (Some(x), Some(y)) = (r.cell(a, p, true, c), r.cell(a, p, false, c)) {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {c} | {} | {} | {} | {} | {} | {} |",
                        a.label(),
                        if p == Path::Api { "API" } else { "HTTP" },
                        fmt_us(x.latency.p50_us),
                        fmt_us(x.latency.p99_us),
                        fmt_rate(x.throughput),
                        fmt_us(y.latency.p50_us),
                        fmt_us(y.latency.p99_us),
                        fmt_rate(y.throughput)
                    );
                }
            }
        }
    }
    s.push_str(
        "\n![read latency, in-process](read_api.svg)\n![read latency, HTTP](read_http.svg)\n\n",
    );
    s
}

fn cold_md(c: &ColdReport) -> String {
    let mut s = String::from(
        "## Cold start\n\nK concurrent first requests for one template's helper tree (context, \
         models, OPT parse, mapper compile, helper build); caches emptied before each trial; \
         medians over trials.\n\n| K | path | cached: first / last | loads (OPT, context, compile, build) | \
         TTL 0: first / last | loads |\n|---|---|---|---|---|---|\n",
    );
    let loads = |l: &super::cold::Loads| {
        format!(
            "{}, {}, {}, {}",
            l.opt, l.context, l.mapper_compiles, l.helper_builds
        )
    };
    for x in c.cells.iter().filter(|x| x.cached) {
        if let Some(y) = c
            .cells
            .iter()
            .find(|y| !y.cached && y.k == x.k && y.path == x.path)
        {
            let _ = writeln!(
                s,
                "| {} | {} | {} / {} | {} | {} / {} | {} |",
                x.k,
                if x.path == Path::Api { "API" } else { "HTTP" },
                fmt_us(x.first_us),
                fmt_us(x.last_us),
                loads(&x.loads_max),
                fmt_us(y.first_us),
                fmt_us(y.last_us),
                loads(&y.loads_max)
            );
        }
    }
    s.push('\n');
    s
}

fn propagation_md(p: &PropagationReport) -> String {
    let mut s = format!(
        "## Propagation\n\n{} nodes: one writes, the time is until the slowest of the other {} \
         applied the eviction (per-peer medians in the last column); {} ms between writes.\n\n\
         | channel | measured from / to | writes | p50 | p99 | max | p50 / TCP floor | per-peer p50 |\n\
         |---|---|---|---|---|---|---|---|\n",
        p.nodes,
        p.nodes - 1,
        p.gap_ms
    );
    for c in &p.channels {
        if let Some(r) = &c.skipped {
            let _ = writeln!(s, "| {} | skipped: {r} | | | | | | |", c.label);
            continue;
        }
        let lost = if c.lost > 0 {
            format!(" ({} lost)", c.lost)
        } else {
            String::new()
        };
        let peers = c
            .per_peer_p50_us
            .iter()
            .map(|&v| fmt_us(v))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            s,
            "| {} | {} | {}{lost} | {} | {} | {} | {} | {peers} |",
            c.label,
            c.measured,
            c.writes,
            fmt_us(c.latency.p50_us),
            fmt_us(c.latency.p99_us),
            fmt_us(c.latency.max_us),
            fmt_ratio(c.ratio_to_tcp_p50)
        );
        if let Some(w) = &c.write_latency {
            let _ = writeln!(
                s,
                "| ↳ the PUT itself | request until response | {} | {} | {} | {} | | |",
                w.count,
                fmt_us(w.p50_us),
                fmt_us(w.p99_us),
                fmt_us(w.max_us)
            );
        }
    }
    s.push_str("\n![propagation latency](propagation.svg)\n\n");
    s
}

fn scale_md(sc: &ScaleReport) -> String {
    let mut s = String::from(
        "## Scale\n\nPeer channel alone (NOTIFY and periodic catch-up off, pool of 2); the \
         writer's broadcast until every peer applied it. Memory and sockets: one member of a \
         cluster of that size run as its own process (`openfhir-cache serve`), after 100 \
         invalidations, caches empty.\n\n| nodes | writes | p50 | p99 | max | any peer p50 | start-up | RSS / node | peak RSS | sockets / node | PG conns / node | peer conns / node |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &sc.rows {
        let lost = if r.lost > 0 {
            format!(" ({} lost)", r.lost)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "| {} | {}{lost} | {} | {} | {} | {} | {:.2} s | {} | {} | {} | {:.1} | {} |",
            r.nodes,
            r.writes,
            fmt_us(r.latency.p50_us),
            fmt_us(r.latency.p99_us),
            fmt_us(r.latency.max_us),
            fmt_us(r.any_peer_p50_us),
            r.startup_secs,
            r.node_rss_mib.map_or("-".into(), |m| format!("{m:.1} MiB")),
            r.node_peak_rss_mib
                .map_or("-".into(), |m| format!("{m:.1} MiB")),
            r.node_sockets.map_or("-".into(), |f| f.to_string()),
            r.db_connections_per_node,
            r.peer_connections_per_node
        );
    }
    s.push_str("\n![propagation against cluster size](scale.svg)\n\n");
    s
}

fn write_md(w: &WriteReport) -> String {
    let mut s = format!(
        "## Write path\n\nThe node's OPT upsert (autocommit) on two identical copies of `opt`, \
         one without triggers and one under invalidation: no triggers; the log row only (NOTIFY \
         deferred and never sent); a node's write as in production (log row, NOTIFY sent after \
         COMMIT by the node's notifier task); a plain-SQL write (log row, NOTIFY from the trigger \
         inside the transaction). One node LISTENs. {:.1} s per cell in two halves; \
         fsync {}, synchronous_commit {}. Overheads are against no triggers.\n\n| OPT size | writers | \
         variant | p50 | p99 | rate | p50 overhead | p99 overhead | throughput overhead |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        w.cell_secs, w.fsync, w.synchronous_commit
    );
    for c in &w.cells {
        let o = w.overhead.iter().find(|o| {
            o.variant == c.variant && o.writers == c.writers && o.payload_bytes == c.payload_bytes
        });
        let pct = |f: fn(&super::write::WriteOverhead) -> f64| {
            o.map_or(String::new(), |o| format!("{:+.0}%", f(o)))
        };
        let _ = writeln!(
            s,
            "| {:.0} KB | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.payload_bytes as f64 / 1024.0,
            c.writers,
            c.variant.label(),
            fmt_us(c.latency.p50_us),
            fmt_us(c.latency.p99_us),
            fmt_rate(c.throughput),
            pct(|o| o.p50_pct),
            pct(|o| o.p99_pct),
            pct(|o| o.throughput_pct)
        );
    }
    s.push_str("\n![upsert latency](write.svg)\n\n");
    s
}

fn catchup_md(c: &CatchupReport) -> String {
    let mut s = String::from(
        "## Catch-up\n\nOne node replays a backlog of log rows (each a different key, written in \
         one transaction) in one step.\n\n| rows | step (median) | slowest | rows/s | peak RSS growth | \
         insert of the rows |\n|---|---|---|---|---|---|\n",
    );
    for r in &c.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            r.rows,
            fmt_us(r.step_ms * 1e3),
            fmt_us(r.step_max_ms * 1e3),
            fmt_rate(r.rows_per_sec),
            r.peak_rss_growth_mib
                .map_or("-".into(), |m| format!("{m:.1} MiB")),
            fmt_us(r.insert_ms * 1e3)
        );
    }
    s.push('\n');
    s
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

fn chart_err(path: &FsPath) -> impl Fn(String) -> BenchError + '_ {
    move |message| BenchError::Report {
        path: path.to_path_buf(),
        message,
    }
}

fn charts(report: &Report, out: &FsPath) -> BenchResult<()> {
    if let Some(r) = &report.read {
        for (path, file, what) in [
            (Path::Api, "read_api.svg", "in-process API"),
            (Path::Http, "read_http.svg", "HTTP"),
        ] {
            let series: Vec<(String, &Summary, bool)> = Artifact::ALL
                .iter()
                .flat_map(|&a| {
                    [true, false].into_iter().filter_map(move |cached| {
                        r.cell(a, path, cached, 1).map(|c| {
                            (
                                format!(
                                    "{} {}",
                                    a.label(),
                                    if cached { "cached" } else { "TTL 0" }
                                ),
                                &c.latency,
                                cached,
                            )
                        })
                    })
                })
                .collect();
            let f = out.join(file);
            cdf_chart(&f, &format!("Read latency, {what}, concurrency 1"), &series)
                .map_err(chart_err(&f))?;
        }
    }
    if let Some(p) = &report.propagation {
        let series: Vec<(String, &Summary, bool)> = p
            .channels
            .iter()
            .filter(|c| c.skipped.is_none())
            .map(|c| {
                (
                    c.label.clone(),
                    &c.latency,
                    c.id == "peer" || c.id == "tcp_floor",
                )
            })
            .collect();
        let f = out.join("propagation.svg");
        cdf_chart(
            &f,
            &format!(
                "Propagation, {} nodes: write until every peer evicted",
                p.nodes
            ),
            &series,
        )
        .map_err(chart_err(&f))?;
    }
    if let Some(sc) = &report.scale {
        let floor = report
            .propagation
            .as_ref()
            .and_then(|p| p.channel("tcp_floor"))
            .map(|c| c.latency.p50_us);
        let f = out.join("scale.svg");
        scale_chart(&f, sc, floor).map_err(chart_err(&f))?;
    }
    if let Some(w) = &report.write {
        let series: Vec<(String, &Summary, bool)> = w
            .cells
            .iter()
            .filter(|c| c.payload_bytes > 4096)
            .map(|c| {
                (
                    format!("{} writer(s), {}", c.writers, c.variant.label()),
                    &c.latency,
                    c.variant == super::write::Variant::LogAndNotify,
                )
            })
            .collect();
        let f = out.join("write.svg");
        cdf_chart(&f, "Upsert latency, 33 KB OPT", &series).map_err(chart_err(&f))?;
    }
    Ok(())
}

/// A latency CDF (x: µs on a log scale, y: percentile) with one line per series; `bold` series
/// are drawn thicker.
fn cdf_chart(
    path: &FsPath,
    title: &str,
    series: &[(String, &Summary, bool)],
) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let values = series
        .iter()
        .flat_map(|(_, s, _)| s.cdf.iter().map(|p| p.us))
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi <= 0.0 {
        return Ok(());
    }
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil());
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..100f64)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("latency, µs (log scale)")
        .y_desc("percentile")
        .x_label_formatter(&|v| format_axis(*v))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (name, s, bold)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let width = if *bold { 3 } else { 1 };
        let points: Vec<(f64, f64)> = s
            .cdf
            .iter()
            .filter(|p| p.us > 0.0)
            .map(|p| (p.us, p.percentile))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(width)))
            .map_err(|x| e(&x))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

fn format_axis(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.0} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.0} ms", us / 1e3)
    } else if us >= 1.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us} µs")
    }
}

/// Propagation p50, p99 and max against cluster size (both axes log scale), with the raw TCP
/// floor's median for scale.
fn scale_chart(path: &FsPath, sc: &ScaleReport, floor: Option<f64>) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    if sc.rows.is_empty() {
        return Ok(());
    }
    let max_n = sc.rows.iter().map(|r| r.nodes).max().unwrap_or(2) as f64;
    let hi = sc.rows.iter().map(|r| r.latency.max_us).fold(1.0, f64::max);
    let lo = sc
        .rows
        .iter()
        .map(|r| r.latency.p50_us)
        .chain(floor)
        .fold(f64::MAX, f64::min)
        .max(0.1);
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil());
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Peer-channel propagation against cluster size (loopback)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((1.8f64..max_n * 1.1).log_scale(), (lo..hi).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("nodes")
        .y_desc("until every peer evicted, µs")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format_axis(*v))
        .draw()
        .map_err(|x| e(&x))?;
    type Line = (&'static str, fn(&super::scale::ScaleRow) -> f64);
    let lines: [Line; 3] = [
        ("p50", |r| r.latency.p50_us),
        ("p99", |r| r.latency.p99_us),
        ("max", |r| r.latency.max_us),
    ];
    for (i, (name, f)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = sc.rows.iter().map(|r| (r.nodes as f64, f(r))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|x| e(&x))?;
    }
    if let Some(fl) = floor {
        let color = BLACK.mix(0.5);
        chart
            .draw_series(LineSeries::new(
                vec![(1.8, fl), (max_n * 1.1, fl)],
                color.stroke_width(1),
            ))
            .map_err(|x| e(&x))?
            .label("raw TCP floor, p50")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
