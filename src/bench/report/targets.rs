//! The published targets: each one's wording, the figure it is checked against, and whether this
//! run met it.

use std::fmt::Write as _;

use serde::Serialize;

use super::markdown::fmt_ns;
use super::Report;
use crate::bench::helpers::COPY_SPEEDUP_TARGET;
use crate::bench::read::{Artifact, Path};
use crate::bench::stats::{fmt_rate, fmt_ratio, fmt_us};

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

impl Report {
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
                let ratio = |p: Path, c: usize, f: fn(&crate::bench::read::ReadRatio) -> f64| {
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
        const PEER_FLOOR: &str = "peer channel, 3 nodes: p50 <= 2.5x the TCP floor of the same run";
        let peer_cpu = format!(
            "peer message CPU: sender per peer and receiver (apply included) each cut >= 2x from \
             the baseline ({} and {} per invalidation)",
            fmt_us(crate::bench::propagation::BASELINE_SENDER_US),
            fmt_us(crate::bench::propagation::BASELINE_RECEIVER_US)
        );
        match &self.propagation {
            Some(p) => {
                if let Some(peer) = p.channel("peer") {
                    let l = &peer.latency;
                    t.push(Target {
                        id: "peer_p50_floor",
                        scenario: "propagation",
                        target: PEER_FLOOR.into(),
                        measured: format!(
                            "{} against a floor of {}: {}",
                            fmt_us(l.p50_us),
                            fmt_us(l.p50_us / peer.ratio_to_tcp_p50),
                            fmt_ratio(peer.ratio_to_tcp_p50)
                        ),
                        met: Some(peer.ratio_to_tcp_p50 <= 2.5),
                    });
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
                t.push(not_run("peer_p50_floor", "propagation", PEER_FLOOR));
                t.push(not_run("peer_p50", "propagation", PEER_P50));
                t.push(not_run("peer_p99", "propagation", PEER_P99));
                t.push(not_run("peer_fastest", "propagation", PEER_FASTEST));
                t.push(not_run("tcp_floor", "propagation", FLOOR));
            }
        }
        match self.propagation.as_ref().and_then(|p| p.cpu.as_ref()) {
            Some(c) => {
                let (bs, br) = (c.baseline_sender_per_peer_us, c.baseline_receiver_us);
                let ratio = |base: f64, now: f64| {
                    if base.is_finite() && now > 0.0 {
                        format!(" ({} cut)", fmt_ratio(base / now))
                    } else {
                        String::new()
                    }
                };
                t.push(Target {
                    id: "peer_cpu",
                    scenario: "propagation",
                    target: peer_cpu,
                    measured: format!(
                        "sender {} per peer{}, receiver {}{} per invalidation ({} invalidations to {} peers; {} and {} per 10,000)",
                        fmt_us(c.sender_per_peer_us),
                        ratio(bs, c.sender_per_peer_us),
                        fmt_us(c.receiver_us),
                        ratio(br, c.receiver_us),
                        c.messages,
                        c.peers,
                        fmt_us(c.sender_per_peer_us * 1e4),
                        fmt_us(c.receiver_us * 1e4),
                    ),
                    met: (bs.is_finite() && br.is_finite()).then_some(
                        c.sender_per_peer_us <= bs / 2.0 && c.receiver_us <= br / 2.0,
                    ),
                });
            }
            None => t.push(not_run("peer_cpu", "propagation", &peer_cpu)),
        }

        // ---- scale ----
        const SCALE: &str = "peer channel, 32 nodes: p99 <= 1.5 ms";
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
                met: (r.nodes >= 32).then_some(r.latency.p99_us <= 1500.0 && r.lost == 0),
            }),
            None => t.push(not_run("scale_p99", "scale", SCALE)),
        }

        // ---- write ----
        for (id, target) in WRITE_TARGETS {
            match &self.write {
                Some(w) => {
                    if let Some(row) = write_target(w, id, target) {
                        t.push(row);
                    }
                }
                None => t.push(not_run(id, "write", target.text)),
            }
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

        // ---- helpers ----
        const HELPERS: &str = "helpers: isolated copy >= 20x cheaper than a rebuild";
        match &self.helpers {
            Some(h) => t.push(Target {
                id: "helpers_copy",
                scenario: "helpers",
                target: HELPERS.into(),
                measured: format!(
                    "copy {} against build {}: {} cheaper (copy and write one deep state {}: {})",
                    fmt_ns(h.copy_ns),
                    fmt_ns(h.build_ns),
                    fmt_ratio(h.copy_speedup),
                    fmt_ns(h.copy_write_ns),
                    fmt_ratio(h.copy_write_speedup)
                ),
                met: Some(h.copy_speedup >= COPY_SPEEDUP_TARGET),
            }),
            None => t.push(not_run("helpers_copy", "helpers", HELPERS)),
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
}

/// One write-path target (issue 17): a variant's worst overhead over no triggers, p50 latency and
/// throughput, over both OPT sizes at one writer count.
#[derive(Debug, Clone, Copy)]
struct WriteTarget {
    text: &'static str,
    variant: crate::bench::write::Variant,
    writers: usize,
    max_pct: f64,
}

/// The write-path targets, by id.
const WRITE_TARGETS: [(&str, WriteTarget); 3] = [
    (
        "write_node_8",
        WriteTarget {
            text: "node write (log row + NOTIFY after COMMIT), 8 writers: <= +30% p50 and \
                   throughput over no triggers",
            variant: crate::bench::write::Variant::LogAndNotify,
            writers: 8,
            max_pct: 30.0,
        },
    ),
    (
        "write_node_1",
        WriteTarget {
            text: "node write (log row + NOTIFY after COMMIT), 1 writer: <= +15% p50 and \
                   throughput over no triggers",
            variant: crate::bench::write::Variant::LogAndNotify,
            writers: 1,
            max_pct: 15.0,
        },
    ),
    (
        "write_sql_8",
        WriteTarget {
            text: "plain-SQL write (log row + NOTIFY in the trigger), 8 writers: <= +100% p50 \
                   and throughput over no triggers",
            variant: crate::bench::write::Variant::SqlNotify,
            writers: 8,
            max_pct: 100.0,
        },
    ),
];

/// The row of write target `id`, or `None` if the run measured no such cell.
fn write_target(
    w: &crate::bench::write::WriteReport,
    id: &'static str,
    target: WriteTarget,
) -> Option<Target> {
    let cells: Vec<_> = w
        .overhead
        .iter()
        .filter(|o| o.variant == target.variant && o.writers == target.writers)
        .collect();
    let worst = cells
        .iter()
        .map(|o| o.p50_pct.max(o.throughput_pct))
        .max_by(f64::total_cmp)?;
    let measured = cells
        .iter()
        .map(|o| {
            format!(
                "{} B OPT: p50 {:+.0}%, throughput {:+.0}%",
                o.payload_bytes, o.p50_pct, o.throughput_pct
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Some(Target {
        id,
        scenario: "write",
        target: target.text.to_string(),
        measured: format!("worst {worst:+.0}% ({measured})"),
        met: Some(worst <= target.max_pct),
    })
}
