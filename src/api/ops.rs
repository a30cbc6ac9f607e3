//! Operations: cache statistics and eviction, health, metrics.

use std::fmt::Write;

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::{body, parse_json, ApiError, ApiResult, AppState};
use crate::cache::{Change, Group};
use crate::domain;

/// This node and its invalidation channels.
pub async fn cluster(State(node): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "node": {
            "id": node.id(),
            "version": env!("CARGO_PKG_VERSION"),
        },
        "cluster": node.cluster().report(),
        "invalidation": node.invalidation_report(),
    }))
}

pub async fn caches(State(node): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "caches": node.caches().report().await }))
}

/// Body of `POST /caches/evict`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictBody {
    /// `opt`, `fhir_connect`, `tenant`, or `all` / absent for every group.
    group: Option<String>,
    /// Narrow to one tenant.
    tenant: Option<String>,
    /// Narrow to one key of the tenant (a template id; normalized).
    key: Option<String>,
}

pub async fn evict(
    State(node): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b = body(b)?;
    let req: EvictBody = if b.is_empty() {
        EvictBody {
            group: None,
            tenant: None,
            key: None,
        }
    } else {
        parse_json(&headers, &b)?
    };
    let bad =
        |d: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid eviction request", vec![d]);
    let group = match req.group.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("all") => None,
        Some("opt") => Some(Group::Opt),
        Some("fhir_connect") => Some(Group::FhirConnect),
        Some("tenant") => Some(Group::Tenant),
        Some(other) => {
            return Err(bad(format!(
                "group {other:?}: expected opt, fhir_connect, tenant or all"
            )))
        }
    };
    if let Some(t) = &req.tenant {
        domain::validate_tenant_id(t)?;
    }
    if req.key.is_some() && req.tenant.is_none() {
        return Err(bad("key needs tenant".into()));
    }
    let change = Change::Evict {
        group,
        tenant: req.tenant,
        key: req.key.as_deref().map(domain::normalize_template_id),
    };
    let n = node.evict(&change).await;
    Ok(Json(json!({ "evicted": n, "change": change })).into_response())
}

pub async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "live" }))
}

pub async fn ready(State(node): State<AppState>) -> Response {
    if node.bootstrap.phase() == crate::bootstrap::Phase::Running {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "error": "loading the bootstrap directory" })),
        )
            .into_response();
    }
    match node.db().readiness().await {
        Ok(Ok(())) => Json(json!({ "status": "ready" })).into_response(),
        Ok(Err(reason)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "error": reason })),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            // A TLS failure names settings and the host, never a secret: say which.
            let error =
                match crate::store::tls::tls_failure(&e, node.node.config().database.tls.mode) {
                    Some(tls) => format!("database unreachable: {tls}"),
                    None => "database unreachable".to_string(),
                };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "not ready", "error": error })),
            )
                .into_response()
        }
    }
}

/// Prometheus text exposition format.
pub async fn metrics(State(node): State<AppState>) -> Response {
    let report = node.caches().report().await;
    let mut out = String::new();
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&crate::cache::StatsSnapshot) -> u64,
    );
    let series: [Series; 7] = [
        ("openfhir_cache_entries", "gauge", "Entries held.", |s| {
            s.entries
        }),
        (
            "openfhir_cache_hits_total",
            "counter",
            "Reads answered from memory.",
            |s| s.hits,
        ),
        (
            "openfhir_cache_misses_total",
            "counter",
            "Reads that needed a load.",
            |s| s.misses,
        ),
        (
            "openfhir_cache_loads_total",
            "counter",
            "Database loads run.",
            |s| s.loads,
        ),
        (
            "openfhir_cache_load_failures_total",
            "counter",
            "Loads that failed.",
            |s| s.load_failures,
        ),
        (
            "openfhir_cache_evictions_total",
            "counter",
            "Explicit evictions.",
            |s| s.evictions,
        ),
        (
            "openfhir_cache_expirations_total",
            "counter",
            "Entries expired by TTL.",
            |s| s.expirations,
        ),
    ];
    for (name, kind, help, f) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for r in &report {
            let _ = writeln!(
                out,
                "{name}{{cache=\"{}\"}} {}",
                r.cache.as_str(),
                f(&r.stats)
            );
        }
    }
    let _ = writeln!(out, "# HELP openfhir_cache_ttl_seconds Configured TTL (-1 infinite, 0 disabled).\n# TYPE openfhir_cache_ttl_seconds gauge");
    for r in &report {
        let _ = writeln!(
            out,
            "openfhir_cache_ttl_seconds{{cache=\"{}\"}} {}",
            r.cache.as_str(),
            r.ttl
        );
    }
    let inv = node.invalidation_report();
    let counters = [
        (
            "openfhir_invalidation_notifications_total",
            "NOTIFY payloads received.",
            inv.notifications,
        ),
        (
            "openfhir_invalidation_bad_notifications_total",
            "NOTIFY payloads that could not be parsed.",
            inv.bad_notifications,
        ),
        (
            "openfhir_invalidation_catchup_steps_total",
            "Catch-up steps run.",
            inv.catchup_steps,
        ),
        (
            "openfhir_invalidation_catchup_failures_total",
            "Catch-up steps that failed.",
            inv.catchup_failures,
        ),
        (
            "openfhir_invalidation_duplicates_total",
            "Invalidations delivered again by another channel.",
            inv.duplicates,
        ),
        (
            "openfhir_invalidation_horizon_flushes_total",
            "Flushes because the cursor fell behind retention.",
            inv.horizon_flushes,
        ),
        (
            "openfhir_invalidation_xid_rewinds_total",
            "Flushes because the database's transaction ids went backwards (lost commits, failover, restore).",
            inv.xid_rewinds,
        ),
        (
            "openfhir_invalidation_listener_reconnects_total",
            "Listener reconnections.",
            inv.listener_reconnects,
        ),
        (
            "openfhir_invalidation_pruned_rows_total",
            "Log rows pruned by this node.",
            inv.pruned_rows,
        ),
        (
            "openfhir_invalidation_own_writes_total",
            "Invalidations of this node's own writes (already applied by its write path).",
            inv.own_writes,
        ),
        (
            "openfhir_invalidation_deferred_notifications_total",
            "NOTIFY of this node's own writes sent after COMMIT (one per log row).",
            inv.deferred_notify.sent,
        ),
        (
            "openfhir_invalidation_deferred_notify_failures_total",
            "Own writes whose NOTIFY could not be sent (peer channel and catch-up cover them).",
            inv.deferred_notify.failed + inv.deferred_notify.dropped,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    let _ = writeln!(out, "# HELP openfhir_invalidation_first_total Invalidations by the channel that delivered them first.\n# TYPE openfhir_invalidation_first_total counter");
    let _ = writeln!(
        out,
        "openfhir_invalidation_first_total{{channel=\"notify\"}} {}",
        inv.first_by_notify
    );
    let _ = writeln!(
        out,
        "openfhir_invalidation_first_total{{channel=\"catchup\"}} {}",
        inv.first_by_catchup
    );
    let _ = writeln!(
        out,
        "openfhir_invalidation_first_total{{channel=\"peer\"}} {}",
        inv.first_by_peer
    );
    cluster_metrics(&mut out, &node.cluster().report());
    let h = &node.http_stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(out, "# HELP openfhir_http_connections_total HTTP connections accepted, and refused at OPENFHIR_MAX_CONNECTIONS.\n# TYPE openfhir_http_connections_total counter\nopenfhir_http_connections_total{{result=\"accepted\"}} {}\nopenfhir_http_connections_total{{result=\"refused\"}} {}", load(&h.accepted), load(&h.refused));
    let _ = writeln!(out, "# HELP openfhir_http_shed_total Requests answered 503 at OPENFHIR_MAX_CONCURRENT_REQUESTS.\n# TYPE openfhir_http_shed_total counter\nopenfhir_http_shed_total {}", load(&h.shed));
    let _ = writeln!(out, "# HELP openfhir_invalidation_log_head Highest invalidation log position seen.\n# TYPE openfhir_invalidation_log_head gauge\nopenfhir_invalidation_log_head {}", inv.log_head);
    let _ = writeln!(out, "# HELP openfhir_invalidation_last_step_repaired Rows the last catch-up step applied itself (missed by NOTIFY).\n# TYPE openfhir_invalidation_last_step_repaired gauge\nopenfhir_invalidation_last_step_repaired {}", inv.last_step_repaired);
    if let Some(w) = inv.watermark {
        let _ = writeln!(out, "# HELP openfhir_invalidation_watermark This node's cursor: every transaction below it is applied.\n# TYPE openfhir_invalidation_watermark gauge\nopenfhir_invalidation_watermark {w}");
    }
    let listening = u8::from(inv.listener == crate::invalidation::ListenerState::Listening);
    let _ = writeln!(out, "# HELP openfhir_invalidation_listener_up 1 while the LISTEN connection is up.\n# TYPE openfhir_invalidation_listener_up gauge\nopenfhir_invalidation_listener_up {listening}");
    if let Some(ms) = inv.ms_since_last_catchup {
        let _ = writeln!(out, "# HELP openfhir_invalidation_catchup_age_ms Milliseconds since the last successful catch-up.\n# TYPE openfhir_invalidation_catchup_age_ms gauge\nopenfhir_invalidation_catchup_age_ms {ms}");
    }
    let (size, idle) = node.db().pool_status();
    let _ = writeln!(out, "# HELP openfhir_db_pool_connections Pooled database connections.\n# TYPE openfhir_db_pool_connections gauge");
    let _ = writeln!(out, "openfhir_db_pool_connections{{state=\"open\"}} {size}\nopenfhir_db_pool_connections{{state=\"idle\"}} {idle}");
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// The peer channel's part of `/metrics`.
fn cluster_metrics(out: &mut String, c: &crate::cluster::ClusterReport) {
    use crate::cluster::PeerState;
    let _ = writeln!(out, "# HELP openfhir_cluster_peers Known cluster peers by state.\n# TYPE openfhir_cluster_peers gauge");
    for (state, name) in [
        (PeerState::Alive, "alive"),
        (PeerState::Suspect, "suspect"),
        (PeerState::Gone, "gone"),
        (PeerState::Left, "left"),
    ] {
        let n = c.peers.iter().filter(|p| p.state == state).count();
        let _ = writeln!(out, "openfhir_cluster_peers{{state=\"{name}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP openfhir_cluster_broadcasts_total Invalidations this node sent to its peers.\n# TYPE openfhir_cluster_broadcasts_total counter\nopenfhir_cluster_broadcasts_total {}", c.counters.broadcasts);
    let _ = writeln!(out, "# HELP openfhir_cluster_applied_total Invalidations received from peers and applied.\n# TYPE openfhir_cluster_applied_total counter\nopenfhir_cluster_applied_total {}", c.counters.applied);
    let _ = writeln!(out, "# HELP openfhir_cluster_gap_catchups_total Catch-up steps run because a peer's sequence numbers had a gap.\n# TYPE openfhir_cluster_gap_catchups_total counter\nopenfhir_cluster_gap_catchups_total {}", c.counters.gap_catchups);
    let _ = writeln!(out, "# HELP openfhir_cluster_frames_rejected_total Cluster connections closed for a bad frame, by reason.\n# TYPE openfhir_cluster_frames_rejected_total counter");
    for (reason, n) in [
        ("malformed", c.counters.frames_malformed),
        ("oversized", c.counters.frames_oversized),
        ("unauthenticated", c.counters.frames_unauthenticated),
        ("protocol", c.counters.frames_protocol),
    ] {
        let _ = writeln!(
            out,
            "openfhir_cluster_frames_rejected_total{{reason=\"{reason}\"}} {n}"
        );
    }
    let _ = writeln!(out, "# HELP openfhir_cluster_handshakes_failed_total Cluster handshakes refused, broken or timed out.\n# TYPE openfhir_cluster_handshakes_failed_total counter\nopenfhir_cluster_handshakes_failed_total {}", c.counters.handshakes_failed);
    let _ = writeln!(out, "# HELP openfhir_cluster_connections_shed_total Cluster connections closed because too many handshakes were running.\n# TYPE openfhir_cluster_connections_shed_total counter\nopenfhir_cluster_connections_shed_total {}", c.counters.connections_shed);
    let _ = writeln!(out, "# HELP openfhir_cluster_rejected_peers Addresses refused (other version, cluster name or secret).\n# TYPE openfhir_cluster_rejected_peers gauge\nopenfhir_cluster_rejected_peers {}", c.rejected.len());
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
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in &c.peers {
            let _ = writeln!(
                out,
                "{name}{{peer=\"{}\",addr=\"{}\"}} {}",
                p.node_id,
                p.addr,
                f(p)
            );
        }
    }
}
