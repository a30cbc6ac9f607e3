//! `GET /metrics`: every series encoded by `prometheus-client` (the Prometheus org's client), so
//! every label value is escaped, whatever a peer or a tenant put into it.
//!
//! * The counters and gauges kept as atomics by the node (caches, invalidation, cluster, HTTP
//!   front, pool) are read at scrape time by `Snapshot`, a custom collector: the hot paths do
//!   not change.
//! * Histograms are recorded where things happen: HTTP requests here (`record_http`), cache
//!   loads in [`crate::cache`], invalidation delays in [`crate::invalidation`].
//! * `process_*` from `/proc/self` (module `process`) and `openfhir_cache_build_info`.
//!
//! The format follows the scraper's `Accept` header: OpenMetrics 1.0 when it asks for it (as
//! Prometheus does), else the classic text format 0.0.4, which the route always served.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::AppState;
use crate::cache::CacheReport;
use crate::cluster::{ClusterReport, PeerState};
use crate::invalidation::{InvalidationReport, ListenerState};

/// Upper bounds, in seconds, of the HTTP latency histogram's buckets: a cached read takes well
/// under a millisecond, a write a few, a cold mapper compile or a consistency wait much longer.
pub const HTTP_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `route` label of a request that matched no route: the raw path is never a label value,
/// so a client cannot create series at will.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// `method`, `route` (the route template, e.g. `/opt/{id}`) and `status`.
type HttpLabels = [(&'static str, String); 3];

fn http_histogram() -> Histogram {
    Histogram::new(HTTP_BUCKETS)
}

/// The HTTP front's own histograms.
#[derive(Debug)]
pub struct HttpMetrics {
    requests: Family<HttpLabels, Histogram, fn() -> Histogram>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Family::new_with_constructor(http_histogram),
        }
    }
}

/// A bounded `method` label: the methods the API knows, every other one as `other`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: times every request, from when the router sees it until its response head is
/// ready (a streamed body is not waited for), by method, matched route and status.
pub(super) async fn record_http(
    State(metrics): State<Arc<HttpMetrics>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED_ROUTE.to_string(), |p| p.as_str().to_string());
    let method = method_label(req.method());
    let started = Instant::now();
    let response = next.run(req).await;
    let labels = [
        ("method", method.to_string()),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics
        .requests
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The OpenMetrics content type, served when the scraper accepts it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// True when the `Accept` header asks for OpenMetrics (Prometheus sends it first).
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            let mut parts = v.split(';').map(str::trim);
            parts
                .next()
                .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
                // `q=0` means "not this one".
                && !parts.any(|p| matches!(p, "q=0" | "q=0.0" | "q=0.00" | "q=0.000"))
        })
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let snapshot = Snapshot {
        caches: state.caches().report().await,
        invalidation: state.invalidation_report(),
        cluster: state.cluster().report(),
        http: {
            let h = &state.http_stats;
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            [load(&h.accepted), load(&h.refused), load(&h.shed)]
        },
        pool: state.db().pool_status(),
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    registry.register(
        "openfhir_http_request_duration_seconds",
        "Time from receiving a request to its response head, by method, route template and status",
        state.http_metrics.requests.clone(),
    );
    registry.register(
        "openfhir_cache_load_duration_seconds",
        "Time each cache load took (database read, parse or compile), by cache",
        state.caches().load_histograms().clone(),
    );
    registry.register(
        "openfhir_invalidation_delay_seconds",
        "Time from a change's write to its eviction here, by the channel that applied it; \
         measured with the sender's or the database's clock, so skew between machines shifts it, \
         and a negative delay counts as 0",
        state.invalidation().delay_histograms().clone(),
    );
    registry.register_collector(Box::new(super::process::ProcessCollector));
    registry.register_collector(Box::new(BuildInfo));

    let mut out = String::new();
    let (encoded, content_type) = if wants_openmetrics(&headers) {
        (
            prometheus_client::encoding::text::encode(&mut out, &registry),
            OPENMETRICS,
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    if let Err(e) = encoded {
        // Writing to a String fails only if an encoder refuses a value; say so, never half a page.
        tracing::error!(error = %e, "encoding /metrics failed");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, content_type)], out).into_response()
}

/// `openfhir_cache_build_info{version="..."} 1`.
#[derive(Debug)]
struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        // An info metric: the encoders add the `_info` suffix.
        let mut m = enc.encode_descriptor(
            "openfhir_cache_build",
            "The running release of openfhir-cache.",
            None,
            MetricType::Info,
        )?;
        m.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])
    }
}

/// One series: its label pairs (names fixed here, values from anywhere) and its value.
type Sample = (Vec<(&'static str, String)>, u64);

fn sample(v: u64) -> Sample {
    (Vec::new(), v)
}

fn labelled(name: &'static str, value: impl Into<String>, v: u64) -> Sample {
    (vec![(name, value.into())], v)
}

/// Writes a counter family; `name` is the series name with its `_total`, as in the docs (the
/// encoders add the suffix themselves).
fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[Sample],
) -> std::fmt::Result {
    let family = name.strip_suffix("_total").unwrap_or(name);
    let mut m = enc.encode_descriptor(family, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// Writes a gauge family.
fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(impl EncodeLabelSet, V)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// The node's counters and gauges, copied when the scrape began.
#[derive(Debug)]
struct Snapshot {
    caches: Vec<CacheReport>,
    invalidation: InvalidationReport,
    cluster: ClusterReport,
    /// HTTP connections accepted, refused; requests shed.
    http: [u64; 3],
    /// Pooled database connections: open, idle.
    pool: (usize, usize),
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        self.encode_caches(&mut enc)?;
        self.encode_invalidation(&mut enc)?;
        encode_cluster(&mut enc, &self.cluster)?;
        let [accepted, refused, shed] = self.http;
        counter(
            &mut enc,
            "openfhir_http_connections_total",
            "HTTP connections accepted, and refused at OPENFHIR_MAX_CONNECTIONS.",
            &[
                labelled("result", "accepted", accepted),
                labelled("result", "refused", refused),
            ],
        )?;
        counter(
            &mut enc,
            "openfhir_http_shed_total",
            "Requests answered 503 at OPENFHIR_MAX_CONCURRENT_REQUESTS.",
            &[sample(shed)],
        )?;
        self.encode_invalidation_gauges(&mut enc)?;
        let (open, idle) = self.pool;
        gauge(
            &mut enc,
            "openfhir_db_pool_connections",
            "Pooled database connections.",
            &[
                ([("state", "open")], open as u64),
                ([("state", "idle")], idle as u64),
            ],
        )
    }
}

impl Snapshot {
    fn encode_caches(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        type Figure = fn(&crate::cache::StatsSnapshot) -> u64;
        let per_cache = |f: Figure| -> Vec<Sample> {
            self.caches
                .iter()
                .map(|r| labelled("cache", r.cache.as_str(), f(&r.stats)))
                .collect()
        };
        gauge(
            enc,
            "openfhir_cache_entries",
            "Entries held.",
            &per_cache(|s| s.entries),
        )?;
        let counters: [(&str, &str, Figure); 6] = [
            (
                "openfhir_cache_hits_total",
                "Reads answered from memory.",
                |s| s.hits,
            ),
            (
                "openfhir_cache_misses_total",
                "Reads that needed a load.",
                |s| s.misses,
            ),
            ("openfhir_cache_loads_total", "Database loads run.", |s| {
                s.loads
            }),
            (
                "openfhir_cache_load_failures_total",
                "Loads that failed.",
                |s| s.load_failures,
            ),
            (
                "openfhir_cache_evictions_total",
                "Explicit evictions.",
                |s| s.evictions,
            ),
            (
                "openfhir_cache_expirations_total",
                "Entries expired by TTL.",
                |s| s.expirations,
            ),
        ];
        for (name, help, f) in counters {
            counter(enc, name, help, &per_cache(f))?;
        }
        let ttls: Vec<_> = self
            .caches
            .iter()
            .map(|r| ([("cache", r.cache.as_str())], r.ttl))
            .collect();
        gauge(
            enc,
            "openfhir_cache_ttl_seconds",
            "Configured TTL (-1 infinite, 0 disabled).",
            &ttls,
        )
    }

    fn encode_invalidation(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let inv = &self.invalidation;
        let counters = [
            ("openfhir_invalidation_notifications_total", "NOTIFY payloads received.", inv.notifications),
            ("openfhir_invalidation_bad_notifications_total", "NOTIFY payloads that could not be parsed.", inv.bad_notifications),
            ("openfhir_invalidation_catchup_steps_total", "Catch-up steps run.", inv.catchup_steps),
            ("openfhir_invalidation_catchup_failures_total", "Catch-up steps that failed.", inv.catchup_failures),
            ("openfhir_invalidation_duplicates_total", "Invalidations delivered again by another channel.", inv.duplicates),
            ("openfhir_invalidation_horizon_flushes_total", "Flushes because the cursor fell behind retention.", inv.horizon_flushes),
            ("openfhir_invalidation_xid_rewinds_total", "Flushes because the database's transaction ids went backwards (lost commits, failover, restore).", inv.xid_rewinds),
            ("openfhir_invalidation_listener_reconnects_total", "Listener reconnections.", inv.listener_reconnects),
            ("openfhir_invalidation_pruned_rows_total", "Log rows pruned by this node.", inv.pruned_rows),
            ("openfhir_invalidation_own_writes_total", "Invalidations of this node's own writes (already applied by its write path).", inv.own_writes),
            ("openfhir_invalidation_deferred_notifications_total", "NOTIFY of this node's own writes sent after COMMIT (one per log row).", inv.deferred_notify.sent),
            ("openfhir_invalidation_deferred_notify_failures_total", "Own writes whose NOTIFY could not be sent (peer channel and catch-up cover them).", inv.deferred_notify.failed + inv.deferred_notify.dropped),
        ];
        for (name, help, v) in counters {
            counter(enc, name, help, &[sample(v)])?;
        }
        counter(
            enc,
            "openfhir_invalidation_first_total",
            "Invalidations by the channel that delivered them first.",
            &[
                labelled("channel", "notify", inv.first_by_notify),
                labelled("channel", "catchup", inv.first_by_catchup),
                labelled("channel", "peer", inv.first_by_peer),
            ],
        )
    }

    fn encode_invalidation_gauges(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let inv = &self.invalidation;
        let none: [(&'static str, &'static str); 0] = [];
        let one = |v: u64| [(none, v)];
        gauge(
            enc,
            "openfhir_invalidation_log_head",
            "Highest invalidation log position seen.",
            &one(inv.log_head),
        )?;
        gauge(
            enc,
            "openfhir_invalidation_last_step_repaired",
            "Rows the last catch-up step applied itself (missed by NOTIFY).",
            &one(inv.last_step_repaired),
        )?;
        gauge(
            enc,
            "openfhir_invalidation_catchup_lag_seconds",
            "Age of the oldest row the last catch-up step had to apply itself, by the database's clock (0 when it repaired nothing).",
            &[(none, inv.last_step_lag_ms as f64 / 1000.0)],
        )?;
        if let Some(w) = inv.watermark {
            gauge(
                enc,
                "openfhir_invalidation_watermark",
                "This node's cursor: every transaction below it is applied.",
                &one(w),
            )?;
        }
        let listening = u64::from(inv.listener == ListenerState::Listening);
        gauge(
            enc,
            "openfhir_invalidation_listener_up",
            "1 while the LISTEN connection is up.",
            &one(listening),
        )?;
        if let Some(ms) = inv.ms_since_last_catchup {
            gauge(
                enc,
                "openfhir_invalidation_catchup_age_ms",
                "Milliseconds since the last successful catch-up.",
                &one(ms),
            )?;
        }
        Ok(())
    }
}

/// The peer channel's part of `/metrics`. Node ids and addresses come from the wire: the encoder
/// escapes them (and the handshake already refused any id outside `A-Z a-z 0-9 - _ .`).
fn encode_cluster(enc: &mut DescriptorEncoder, c: &ClusterReport) -> std::fmt::Result {
    let peers: Vec<_> = [
        (PeerState::Alive, "alive"),
        (PeerState::Suspect, "suspect"),
        (PeerState::Gone, "gone"),
        (PeerState::Left, "left"),
    ]
    .into_iter()
    .map(|(state, name)| {
        let n = c.peers.iter().filter(|p| p.state == state).count() as u64;
        ([("state", name)], n)
    })
    .collect();
    gauge(
        enc,
        "openfhir_cluster_peers",
        "Known cluster peers by state.",
        &peers,
    )?;
    let k = &c.counters;
    counter(
        enc,
        "openfhir_cluster_broadcasts_total",
        "Invalidations this node sent to its peers.",
        &[sample(k.broadcasts)],
    )?;
    counter(
        enc,
        "openfhir_cluster_applied_total",
        "Invalidations received from peers and applied.",
        &[sample(k.applied)],
    )?;
    counter(
        enc,
        "openfhir_cluster_gap_catchups_total",
        "Catch-up steps run because a peer's sequence numbers had a gap.",
        &[sample(k.gap_catchups)],
    )?;
    counter(
        enc,
        "openfhir_cluster_frames_rejected_total",
        "Cluster connections closed for a bad frame, by reason.",
        &[
            labelled("reason", "malformed", k.frames_malformed),
            labelled("reason", "oversized", k.frames_oversized),
            labelled("reason", "unauthenticated", k.frames_unauthenticated),
            labelled("reason", "protocol", k.frames_protocol),
        ],
    )?;
    counter(
        enc,
        "openfhir_cluster_handshakes_failed_total",
        "Cluster handshakes refused, broken or timed out.",
        &[sample(k.handshakes_failed)],
    )?;
    counter(
        enc,
        "openfhir_cluster_connections_shed_total",
        "Cluster connections closed because too many handshakes were running.",
        &[sample(k.connections_shed)],
    )?;
    let none: [(&'static str, &'static str); 0] = [];
    gauge(
        enc,
        "openfhir_cluster_rejected_peers",
        "Addresses refused (other version, cluster name or secret).",
        &[(none, c.rejected.len() as u64)],
    )?;
    type PeerFigure = fn(&crate::cluster::PeerReport) -> u64;
    let per_peer: [(&str, &str, PeerFigure); 5] = [
        (
            "openfhir_cluster_peer_sent_total",
            "Messages sent to the peer.",
            |p| p.sent,
        ),
        (
            "openfhir_cluster_peer_received_total",
            "Messages received from the peer.",
            |p| p.received,
        ),
        (
            "openfhir_cluster_peer_dropped_total",
            "Messages dropped for the peer (queue full).",
            |p| p.dropped,
        ),
        (
            "openfhir_cluster_peer_gaps_total",
            "Sequence gaps seen from the peer.",
            |p| p.gaps,
        ),
        (
            "openfhir_cluster_peer_last_heard_ms",
            "Milliseconds since the peer was last heard.",
            |p| p.last_heard_ms_ago,
        ),
    ];
    for (name, help, f) in per_peer {
        let samples: Vec<Sample> = c
            .peers
            .iter()
            .map(|p| {
                (
                    vec![("peer", p.node_id.clone()), ("addr", p.addr.to_string())],
                    f(p),
                )
            })
            .collect();
        if name.ends_with("_total") {
            counter(enc, name, help, &samples)?;
        } else {
            gauge(enc, name, help, &samples)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_is_chosen_only_when_accepted() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, v.parse().unwrap());
            wants_openmetrics(&h)
        };
        assert!(!wants_openmetrics(&HeaderMap::new()));
        assert!(!with("text/plain;version=0.0.4"));
        assert!(!with("*/*"));
        assert!(with(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(!with("application/openmetrics-text;q=0, text/plain"));
    }
}
