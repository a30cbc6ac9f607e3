//! `GET /metrics`: every series encoded by `prometheus-client` (the Prometheus org's client), so
//! every label value is escaped, whatever a peer or a tenant put into it.
//!
//! * The counters and gauges kept as atomics by the node (caches, invalidation, cluster, HTTP
//!   front, pool) are read at scrape time by `Snapshot` (module `snapshot`), a custom collector: the hot paths do
//!   not change.
//! * Histograms are recorded where things happen: HTTP requests here (`record_http`), cache
//!   loads in [`crate::cache`], invalidation delays in [`crate::invalidation`].
//! * `process_*` from `/proc/self` (module `process`) and `openfhir_cache_build_info`.
//! * The supervised background tasks' restarts and states (module `tasks`).
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
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::AppState;
use snapshot::Snapshot;

mod process;
mod snapshot;
mod tasks;

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

/// The classic text format's content type, exactly as the route always served it.
const TEXT: &str = "text/plain; version=0.0.4";

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
    registry.register_collector(Box::new(tasks::Tasks(state.tasks().report())));
    registry.register_collector(Box::new(process::ProcessCollector));
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
            TEXT,
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
