//! The settings table: every variable the node reads, with its file key, default and meaning.

use super::DEFAULT_BOOTSTRAP_DIR;

/// One configuration setting: its environment variable, file key, default and meaning.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    /// Environment variable name.
    pub env: &'static str,
    /// Dotted key in `openfhir-cache.toml` (`cache.opt_ttl` is `[cache] opt_ttl = ...`).
    pub key: &'static str,
    /// Default value as text; empty means unset.
    pub default: &'static str,
    /// One-line meaning, with the unit.
    pub doc: &'static str,
}

/// Every setting the node reads.
pub const VARS: &[Var] = &[
    Var { env: "OPENFHIR_CACHE_OPT_TTL", key: "cache.opt_ttl", default: "-1",
          doc: "TTL in seconds for the OPT cache. 0 = disabled, -1 = infinite, N = expire N seconds after load." },
    Var { env: "OPENFHIR_CACHE_FHIR_CONNECT_TTL", key: "cache.fhir_connect_ttl", default: "-1",
          doc: "TTL in seconds for all FHIR Connect caches (context, all-contexts, mapper, helpers). 0 = disabled, -1 = infinite." },
    Var { env: "OPENFHIR_CACHE_TENANT_TTL", key: "cache.tenant_ttl", default: "-1",
          doc: "TTL in seconds for the tenant cache. 0 = disabled, -1 = infinite." },
    Var { env: "CLUSTER_DISCOVERY", key: "cluster.discovery", default: "MULTICAST",
          doc: "Peer discovery mode: MULTICAST, DNS or TCP (case-insensitive)." },
    Var { env: "CLUSTER_DNS_QUERY", key: "cluster.dns_query", default: "",
          doc: "Headless DNS name to resolve in DNS mode (e.g. openfhir-cluster.default.svc.cluster.local)." },
    Var { env: "CLUSTER_INITIAL_HOSTS", key: "cluster.initial_hosts", default: "",
          doc: "TCP mode: comma-separated peers as host[port],host[port] (names, IPv4 or [IPv6]); include the node itself." },
    Var { env: "CLUSTER_PORT", key: "cluster.port", default: "7800",
          doc: "TCP port of the cluster channel (0 = any free port, for tests and embedding)." },
    Var { env: "CLUSTER_BIND_ADDR", key: "cluster.bind_addr", default: "0.0.0.0",
          doc: "Local IP address the cluster channel listens on and sends from (e.g. 10.0.0.1, 127.0.0.2, ::)." },
    Var { env: "CLUSTER_NAME", key: "cluster.name", default: "openfhir",
          doc: "Cluster name: nodes join only peers with the same name (letters, digits, . _ -; at most 64)." },
    Var { env: "CLUSTER_SECRET", key: "cluster.secret", default: "",
          doc: "Shared secret (at least 16 characters): peers must hold it to join (Noise handshake with it as pre-shared key), and every frame is encrypted and authenticated with per-session keys. Unset = unauthenticated, unencrypted channel." },
    Var { env: "CLUSTER_MULTICAST_ADDR", key: "cluster.multicast_addr", default: "239.255.78.0:45588",
          doc: "MULTICAST mode: multicast group and UDP port of the announcements (IPv4, or IPv6 as [group]:port). When unset: 239.255.78.0:45588, or [ff15::78]:45588 when CLUSTER_BIND_ADDR is IPv6 (e.g. ::)." },
    Var { env: "CLUSTER_DNS_INTERVAL", key: "cluster.dns_interval", default: "10",
          doc: "DNS mode: seconds between lookups of CLUSTER_DNS_QUERY (1-3600)." },
    Var { env: "CLUSTER_DNS_SERVER", key: "cluster.dns_server", default: "",
          doc: "DNS mode: ip:port of the DNS server to ask instead of the system resolver." },
    Var { env: "CLUSTER_HEARTBEAT_MS", key: "cluster.heartbeat_ms", default: "1000",
          doc: "Heartbeat interval in milliseconds (50-60000); a peer is suspect after 3 silent intervals and gone after 10." },
    Var { env: "CLUSTER_SEND_QUEUE", key: "cluster.send_queue", default: "4096",
          doc: "Messages queued per peer (1-1000000); a peer whose queue overflows is marked as having missed messages." },
    Var { env: "DATABASE_URL", key: "database.url", default: "postgres://postgres@127.0.0.1:5432/postgres",
          doc: "PostgreSQL connection URL (the source of truth). The password is masked in output. TLS: libpq's sslmode (disable, prefer, require, verify-ca, verify-full), sslrootcert (a CA file or `system`), sslcert and sslkey." },
    Var { env: "OPENFHIR_DB_POOL_SIZE", key: "database.pool_size", default: "16",
          doc: "Maximum number of pooled database connections (1-1000)." },
    Var { env: "OPENFHIR_HTTP_ADDR", key: "http.addr", default: "0.0.0.0:8080",
          doc: "Address and port the HTTP API listens on." },
    Var { env: "OPENFHIR_API_TOKEN", key: "http.api_token", default: "",
          doc: "When set, every endpoint except /health/* requires `Authorization: Bearer <token>`." },
    Var { env: "OPENFHIR_MAX_BODY_BYTES", key: "http.max_body_bytes", default: "16777216",
          doc: "Largest accepted request body in bytes (default 16 MiB; real OPTs reach 3 MB). Larger bodies get 413." },
    Var { env: "OPENFHIR_MAX_FC_BODY_BYTES", key: "http.max_fc_body_bytes", default: "131072",
          doc: "Largest FHIR Connect document (POST/PUT /fc/context, /fc/model) in bytes (default 128 KiB; real ones are a few KB, and parsing one takes up to about 300 times its size in memory). Larger bodies get 413." },
    Var { env: "OPENFHIR_REQUEST_TIMEOUT_SECS", key: "http.request_timeout_secs", default: "30",
          doc: "A request that takes longer than this many seconds is answered 408 and its resources freed." },
    Var { env: "OPENFHIR_HEADER_TIMEOUT_SECS", key: "http.header_timeout_secs", default: "10",
          doc: "A client must send a request's headers within this many seconds, or its connection is closed." },
    Var { env: "OPENFHIR_MAX_CONNECTIONS", key: "http.max_connections", default: "4096",
          doc: "Open HTTP connections at most; more are closed at once." },
    Var { env: "OPENFHIR_MAX_CONCURRENT_REQUESTS", key: "http.max_concurrent_requests", default: "512",
          doc: "Requests handled at once at most; more get 503 with Retry-After (the health routes are exempt)." },
    Var { env: "OPENFHIR_PG_NOTIFY", key: "invalidation.pg_notify", default: "true",
          doc: "LISTEN for the database's invalidation notifications (the fallback channel): true or false." },
    Var { env: "OPENFHIR_CATCHUP_INTERVAL_MS", key: "invalidation.catchup_interval_ms", default: "1000",
          doc: "Replay the invalidation log every this many milliseconds (0 = only on reconnect and on demand)." },
    Var { env: "OPENFHIR_INVALIDATION_RETENTION", key: "invalidation.retention_secs", default: "86400",
          doc: "Seconds the invalidation log keeps rows; a node whose cursor is older flushes its caches." },
    Var { env: "OPENFHIR_CONSISTENCY_WAIT_MS", key: "invalidation.consistency_wait_ms", default: "5000",
          doc: "How long a read with X-Consistency-Token waits for this node to catch up before answering 504." },
    Var { env: "OPENFHIR_LOG_FORMAT", key: "log.format", default: "text",
          doc: "Log format: text or json. The level comes from RUST_LOG (default info)." },
    Var { env: "OPENFHIR_BOOTSTRAP_DIR", key: "bootstrap.dir", default: DEFAULT_BOOTSTRAP_DIR,
          doc: "openFHIR's bootstrap directory: OPTs, contexts and models loaded at start-up, once per cluster (empty = none)." },
    Var { env: "OPENFHIR_BOOTSTRAP_RECURSIVELY_OPEN_DIRECTORIES", key: "bootstrap.recursively_open_directories", default: "true",
          doc: "Also load the bootstrap directory's sub-folders: true or false." },
];
