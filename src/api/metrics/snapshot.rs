//! The node's counters and gauges as `/metrics` series, copied at scrape time (`Snapshot`, a
//! custom collector): every series name, type and label set as the route always had them.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::cache::CacheReport;
use crate::cluster::{ClusterReport, PeerReport, PeerState};
use crate::invalidation::{InvalidationReport, ListenerState};

/// One series: its label pairs (names fixed here, values from anywhere) and its value.
pub(super) type Sample = (Vec<(&'static str, String)>, u64);

fn sample(v: u64) -> Sample {
    (Vec::new(), v)
}

pub(super) fn labelled(name: &'static str, value: impl Into<String>, v: u64) -> Sample {
    (vec![(name, value.into())], v)
}

/// Writes a counter family; `name` is the series name with its `_total`, as in the docs (the
/// encoders add the suffix themselves).
pub(super) fn counter(
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
pub(super) fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
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
pub(super) struct Snapshot {
    pub(super) caches: Vec<CacheReport>,
    pub(super) invalidation: InvalidationReport,
    pub(super) cluster: ClusterReport,
    /// HTTP connections accepted, refused; requests shed.
    pub(super) http: [u64; 3],
    /// Pooled database connections: open, idle.
    pub(super) pool: (usize, usize),
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
        let bytes: Vec<Sample> = self
            .caches
            .iter()
            .filter(|r| matches!(r.bound, crate::cache::Bound::MaxBytes(_)))
            .map(|r| labelled("cache", r.cache.as_str(), r.stats.weight))
            .collect();
        gauge(
            enc,
            "openfhir_cache_bytes",
            "Estimated bytes held, in caches bounded by bytes.",
            &bytes,
        )?;
        let limits: Vec<Sample> = self
            .caches
            .iter()
            .filter_map(|r| match r.bound {
                crate::cache::Bound::MaxBytes(n) => Some(labelled("cache", r.cache.as_str(), n)),
                _ => None,
            })
            .collect();
        gauge(
            enc,
            "openfhir_cache_max_bytes",
            "Byte bound of the cache (its share of its group's OPENFHIR_CACHE_*_MAX_BYTES).",
            &limits,
        )?;
        let counters: [(&str, &str, Figure); 7] = [
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
            (
                "openfhir_cache_size_evictions_total",
                "Entries evicted, or not kept, because the cache reached its size bound.",
                |s| s.size_evictions,
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
            ("openfhir_invalidation_deferred_notifications_total", "Log rows of this node's own writes announced by NOTIFY after COMMIT (several to one notification).", inv.deferred_notify.sent),
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
    encode_peers(enc, &c.peers)
}

/// The per-peer series, labelled by node id and address. Node ids come from the wire: they
/// are escaped by the encoder whatever they hold, though the handshake refuses any id outside
/// `A-Z a-z 0-9 - _ .` anyway.
fn encode_peers(enc: &mut DescriptorEncoder, peers: &[PeerReport]) -> std::fmt::Result {
    type PeerFigure = fn(&PeerReport) -> u64;
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
        let samples: Vec<Sample> = peers
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
    use prometheus_client::registry::Registry;

    #[derive(Debug)]
    struct Peers(Vec<PeerReport>);

    impl Collector for Peers {
        fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
            encode_peers(&mut enc, &self.0)
        }
    }

    /// Escaping does not rely on the handshake's node id check: an id that got past it could
    /// still not break a line in either format.
    #[test]
    fn hostile_peer_ids_are_escaped_in_both_formats() {
        let hostile = "evil\"} 1\nopenfhir_forged 1\n#\\";
        let peer = PeerReport {
            node_id: hostile.into(),
            addr: "127.0.0.1:7800".parse().unwrap(),
            version: "0.1.0".into(),
            state: PeerState::Alive,
            last_heard_ms_ago: 1,
            inbound: true,
            outbound: true,
            sent: 2,
            received: 3,
            invalidations_received: 0,
            dropped: 0,
            missed: false,
            gaps: 0,
            last_seq: 0,
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Peers(vec![peer])));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &registry).unwrap();
        for out in [&text, &om] {
            assert!(
                out.contains(r#"openfhir_cluster_peer_sent_total{peer="evil\"} 1\nopenfhir_forged 1\n#\\",addr="127.0.0.1:7800"} 2"#),
                "{out}"
            );
            // Every line is a comment or a sample of a family declared here.
            for line in out.lines() {
                assert!(
                    line.starts_with('#') || line.starts_with("openfhir_cluster_peer_"),
                    "{line:?} in\n{out}"
                );
            }
        }
    }
}
