//! `DNS` discovery: A and AAAA lookups of `CLUSTER_DNS_QUERY` (typically a Kubernetes headless
//! service, whose name resolves to one address per ready pod) at start and then every
//! `CLUSTER_DNS_INTERVAL`.
//!
//! Every round publishes `ip:CLUSTER_PORT` for each address found, so a pod that appears later is
//! dialed and one that vanishes is dropped. A negative answer (`NXDOMAIN`, or a name without A and
//! AAAA records) means no pod is ready: the empty set is published. Any other failure (timeout,
//! unreachable server, `SERVFAIL`, ...) leaves the peers of the failed address family as they were
//! published before, and is recorded in [`Status`] and logged once per outage.
//!
//! `CLUSTER_DNS_SERVER` replaces the system resolver by that single name server (UDP and TCP).
//! A fresh resolver is built for each round and its cache is disabled, so a changed zone is seen
//! on the next round whatever the records' TTLs are.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::TokioResolver;
use tokio_util::sync::CancellationToken;

use super::{Addrs, Publisher, Status};

/// How long the resolver waits for one answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// How many times the resolver asks again after a failed try (hickory's `attempts` counts
/// retries: 1 means two tries, so an unanswered query gives up after about 4 s).
const QUERY_ATTEMPTS: usize = 1;

/// An upper bound on one whole round (both families, every search domain), so a resolver that
/// never finishes cannot stall discovery.
const ROUND_TIMEOUT: Duration = Duration::from_secs(15);

/// Settings of DNS discovery.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// `CLUSTER_DNS_QUERY`.
    pub query: String,
    /// `CLUSTER_PORT`: every resolved address is dialed at this port.
    pub port: u16,
    /// `CLUSTER_DNS_INTERVAL`.
    pub interval: Duration,
    /// `CLUSTER_DNS_SERVER`: ask this server instead of the system resolver.
    pub server: Option<SocketAddr>,
}

/// Why a DNS discovery round failed. A negative answer (`NXDOMAIN`, no A/AAAA records) is not an
/// error: it is an empty set of addresses.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `CLUSTER_DNS_QUERY` is not a valid domain name.
    #[error("CLUSTER_DNS_QUERY {query:?} is not a valid DNS name: {reason}")]
    InvalidName {
        /// The query as configured.
        query: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The system resolver configuration could not be read, or the resolver not built.
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(#[source] NetError),
    /// The lookup of one record type failed (other than by a negative answer).
    #[error("{record_type} lookup of {query} failed: {source}")]
    Lookup {
        /// The name asked for.
        query: String,
        /// `A` or `AAAA`.
        record_type: RecordType,
        /// What the resolver reported.
        #[source]
        source: NetError,
    },
    /// The round did not finish in time.
    #[error("DNS lookup of {query} did not finish within {timeout:?}")]
    Timeout {
        /// The name asked for.
        query: String,
        /// The bound that was exceeded.
        timeout: Duration,
    },
}

/// Resolves `settings.query` once (A and AAAA) and returns every address found at
/// `settings.port`. A negative answer gives the empty set; every other failure is an error.
pub async fn resolve_once(settings: &DnsSettings) -> Result<Addrs, DnsError> {
    let round = resolve_round(settings).await?;
    let mut addrs = Addrs::new();
    for family in [round.v4, round.v6] {
        addrs.extend(family?);
    }
    Ok(addrs)
}

/// Resolves the query at once and then every interval, publishing the addresses, until cancelled.
///
/// A family (A or AAAA) whose lookup fails keeps the addresses of that family published before;
/// the failure is recorded in `status` and logged once per outage.
pub async fn run(
    settings: DnsSettings,
    tx: Publisher,
    status: Arc<Status>,
    cancel: CancellationToken,
) {
    let mut failing = false;
    loop {
        let round = tokio::select! {
            _ = cancel.cancelled() => return,
            round = resolve_round(&settings) => round,
        };
        let (addrs, error) = match round {
            Ok(round) => merge(round, &tx.borrow()),
            Err(e) => (tx.borrow().clone(), Some(e)),
        };
        match error {
            None => {
                status.ok();
                if failing {
                    failing = false;
                    tracing::info!(
                        query = %settings.query,
                        peers = addrs.len(),
                        "CLUSTER_DNS_QUERY resolves again"
                    );
                }
            }
            Some(e) => {
                failing = true;
                let msg = e.to_string();
                if status.failed(msg.clone()) {
                    tracing::warn!(
                        query = %settings.query,
                        error = %msg,
                        "DNS discovery failed; keeping the peers found before and retrying"
                    );
                }
            }
        }
        tx.send_if_modified(|cur| {
            if *cur == addrs {
                return false;
            }
            tracing::debug!(query = %settings.query, peers = ?addrs, "DNS discovery: peers changed");
            *cur = addrs;
            true
        });
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(settings.interval) => {}
        }
    }
}

/// The outcome of one round, per address family.
struct Round {
    v4: Result<Vec<SocketAddr>, DnsError>,
    v6: Result<Vec<SocketAddr>, DnsError>,
}

/// The addresses to publish after `round`: those found, plus, for a family whose lookup failed,
/// that family's addresses in `previous`. Also returns the first failure.
fn merge(round: Round, previous: &Addrs) -> (Addrs, Option<DnsError>) {
    let mut addrs = Addrs::new();
    let mut error = None;
    for (found, v4) in [(round.v4, true), (round.v6, false)] {
        match found {
            Ok(found) => addrs.extend(found),
            Err(e) => {
                addrs.extend(previous.iter().filter(|a| a.is_ipv4() == v4));
                error.get_or_insert(e);
            }
        }
    }
    (addrs, error)
}

/// Looks up A and AAAA records of the query concurrently, bounded by [`ROUND_TIMEOUT`].
async fn resolve_round(settings: &DnsSettings) -> Result<Round, DnsError> {
    let query = settings.query.trim();
    // A literal address needs no lookup (and is not a valid name to look up).
    if let Ok(ip) = query.parse::<IpAddr>() {
        let found = Ok(vec![SocketAddr::new(ip, settings.port)]);
        let none = Ok(Vec::new());
        return Ok(if ip.is_ipv4() {
            Round {
                v4: found,
                v6: none,
            }
        } else {
            Round {
                v4: none,
                v6: found,
            }
        });
    }
    if query.is_empty() {
        return Err(DnsError::InvalidName {
            query: settings.query.clone(),
            reason: "empty".into(),
        });
    }
    let name = Name::from_utf8(query).map_err(|e| DnsError::InvalidName {
        query: settings.query.clone(),
        reason: e.to_string(),
    })?;
    let resolver = build_resolver(settings.server)?;
    let lookups = async {
        let (v4, v6) = tokio::join!(
            lookup(&resolver, &name, RecordType::A, settings.port),
            lookup(&resolver, &name, RecordType::AAAA, settings.port),
        );
        Round { v4, v6 }
    };
    tokio::time::timeout(ROUND_TIMEOUT, lookups)
        .await
        .map_err(|_| DnsError::Timeout {
            query: query.to_string(),
            timeout: ROUND_TIMEOUT,
        })
}

/// One record type: the addresses found, none on a negative answer, or the failure.
async fn lookup(
    resolver: &TokioResolver,
    name: &Name,
    record_type: RecordType,
    port: u16,
) -> Result<Vec<SocketAddr>, DnsError> {
    match resolver.lookup(name.clone(), record_type).await {
        Ok(found) => Ok(found
            .answers()
            .iter()
            .filter(|r| r.record_type() == record_type)
            .filter_map(|r| r.data.ip_addr())
            .map(|ip| SocketAddr::new(ip, port))
            .collect()),
        Err(e) if e.is_no_records_found() => Ok(Vec::new()),
        Err(source) => Err(DnsError::Lookup {
            query: name.to_string(),
            record_type,
            source,
        }),
    }
}

/// A resolver without cache and with short timeouts: the system's, or one asking only `server`.
fn build_resolver(server: Option<SocketAddr>) -> Result<TokioResolver, DnsError> {
    let mut builder = match server {
        Some(server) => {
            let mut ns = NameServerConfig::udp_and_tcp(server.ip());
            for conn in &mut ns.connections {
                conn.port = server.port();
            }
            let mut builder = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            );
            // Only that server answers: no /etc/hosts.
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        }
        None => TokioResolver::builder_tokio().map_err(DnsError::Resolver)?,
    };
    tune(builder.options_mut());
    builder.build().map_err(DnsError::Resolver)
}

/// Short timeouts and no caching (the answer of one round must not hide a change at the next).
fn tune(opts: &mut ResolverOpts) {
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = QUERY_ATTEMPTS;
    opts.cache_size = 0;
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(query: &str, server: Option<SocketAddr>) -> DnsSettings {
        DnsSettings {
            query: query.into(),
            port: 7800,
            interval: Duration::from_millis(100),
            server,
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn a_failed_family_keeps_its_previous_addresses_only() {
        let previous = Addrs::from([sa("10.0.0.1:7800"), sa("[fd00::1]:7800")]);
        let round = Round {
            v4: Ok(vec![sa("10.0.0.2:7800")]),
            v6: Err(DnsError::Timeout {
                query: "x".into(),
                timeout: ROUND_TIMEOUT,
            }),
        };
        let (addrs, error) = merge(round, &previous);
        assert_eq!(
            addrs,
            Addrs::from([sa("10.0.0.2:7800"), sa("[fd00::1]:7800")])
        );
        assert!(matches!(error, Some(DnsError::Timeout { .. })));
    }

    #[test]
    fn a_successful_round_replaces_everything() {
        let previous = Addrs::from([sa("10.0.0.1:7800"), sa("[fd00::1]:7800")]);
        let round = Round {
            v4: Ok(vec![]),
            v6: Ok(vec![sa("[fd00::2]:7800")]),
        };
        let (addrs, error) = merge(round, &previous);
        assert_eq!(addrs, Addrs::from([sa("[fd00::2]:7800")]));
        assert!(error.is_none());
    }

    #[tokio::test]
    async fn an_ip_literal_needs_no_lookup() {
        // The server is a closed port: a lookup would fail.
        let s = settings("fd00::7", Some(sa("127.0.0.1:9")));
        let got = resolve_once(&s).await.expect("literal");
        assert_eq!(got, Addrs::from([sa("[fd00::7]:7800")]));
    }

    #[tokio::test]
    async fn an_invalid_or_empty_name_is_an_error() {
        for q in ["", "  ", "a..b"] {
            let s = settings(q, Some(sa("127.0.0.1:9")));
            assert!(
                matches!(resolve_once(&s).await, Err(DnsError::InvalidName { .. })),
                "{q:?}"
            );
        }
    }

    #[test]
    fn the_resolver_options_disable_caching_and_shorten_timeouts() {
        let mut opts = ResolverOpts::default();
        tune(&mut opts);
        assert_eq!(opts.cache_size, 0);
        assert_eq!(opts.timeout, QUERY_TIMEOUT);
        assert_eq!(opts.attempts, QUERY_ATTEMPTS);
        assert_eq!(opts.positive_max_ttl, Some(Duration::ZERO));
    }
}
