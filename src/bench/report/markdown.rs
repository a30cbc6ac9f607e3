//! The report as Markdown: the run's setup, the targets table and one section per scenario.

use std::fmt::Write as _;

use super::Report;
use crate::bench::catchup::CatchupReport;
use crate::bench::cold::ColdReport;
use crate::bench::helpers::HelpersReport;
use crate::bench::propagation::PropagationReport;
use crate::bench::read::{Artifact, Path, ReadReport};
use crate::bench::scale::ScaleReport;
use crate::bench::stats::{fmt_rate, fmt_ratio, fmt_us};
use crate::bench::write::WriteReport;

impl Report {
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
        if let Some(h) = &self.helpers {
            s.push_str(&helpers_md(h));
        }
        s
    }
}

/// The read-path headline table: per artifact, in-process p50 and HTTP throughput at 64.
pub fn read_md(r: &ReadReport) -> String {
    let mut s = format!(
        "## Read path\n\nCached (TTL -1) against TTL 0 (every read goes to PostgreSQL), each cell at least {:.1} s \
         and {} reads per reading task.\n\n| artifact | in-process p50, cached | TTL 0 | speedup | HTTP c=64, cached | TTL 0 | ratio |\n\
         |---|---|---|---|---|---|---|\n",
        r.cell_secs, r.cell_ops_per_task
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
            for c in crate::bench::read::CONCURRENCY {
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
    let loads = |l: &crate::bench::cold::Loads| {
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
    if let Some(c) = &p.cpu {
        let _ = writeln!(
            s,
            "\nCPU per peer invalidation ({} invalidations from one node to {} peers, one at a \
             time; the receiver a node process of its own): sender {} per peer (thread CPU inside \
             the broadcast), receiver {} including the apply (the process's CPU, less {} per \
             second idle).",
            c.messages,
            c.peers,
            fmt_us(c.sender_per_peer_us),
            fmt_us(c.receiver_us),
            fmt_us(c.receiver_idle_us_per_s)
        );
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
        let pct = |f: fn(&crate::bench::write::WriteOverhead) -> f64| {
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

/// A duration given in nanoseconds: `ns` below a microsecond, else as [`fmt_us`].
pub(super) fn fmt_ns(ns: f64) -> String {
    if ns.is_finite() && ns < 1000.0 {
        format!("{ns:.0} ns")
    } else {
        fmt_us(ns / 1000.0)
    }
}

fn helpers_md(h: &HelpersReport) -> String {
    format!(
        "## Helper trees\n\nWhat one use of a template's helper tree costs against building it \
         again, in-process on the growth chart's tree ({} helpers): an isolated copy (a `clone`, \
         which shares every node with the cached tree), and a copy that then writes the state of \
         the deepest helper (depth {}; the nodes on its path are copied). Medians of {} samples, \
         interleaved; a sample is the mean of {} builds or {} copies.\n\n| operation | per use | \
         rebuild / this |\n|---|---|---|\n| build (`helpers::build`) | {} | 1x |\n\
         | isolated copy | {} | {} |\n| copy, then write one deep state | {} | {} |\n\n",
        h.helpers,
        h.write_depth,
        h.samples,
        h.build_iterations,
        h.copy_iterations,
        fmt_ns(h.build_ns),
        fmt_ns(h.copy_ns),
        fmt_ratio(h.copy_speedup),
        fmt_ns(h.copy_write_ns),
        fmt_ratio(h.copy_write_speedup)
    )
}
