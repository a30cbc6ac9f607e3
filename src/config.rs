//! Configuration: defaults < optional `openfhir-cache.toml` < environment.
//!
//! Every setting is listed once in [`VARS`] with its environment variable (the seeds' names, exactly),
//! its key in the TOML file, its default and its meaning. That table drives the environment mapping,
//! the defaults, the error messages and the README reference (a test checks README against it).
//!
//! Values are parsed here, by hand, so that every error names the variable (or file key) and the
//! offending value: `OPENFHIR_CACHE_OPT_TTL='5m' is invalid: ...`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Serialize;

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
          doc: "Shared secret (at least 16 characters): peers must prove it to join, and every frame carries an HMAC-SHA256. Unset = unauthenticated channel." },
    Var { env: "CLUSTER_MULTICAST_ADDR", key: "cluster.multicast_addr", default: "239.255.78.0:45588",
          doc: "MULTICAST mode: IPv4 multicast group and UDP port of the announcements." },
    Var { env: "CLUSTER_DNS_INTERVAL", key: "cluster.dns_interval", default: "10",
          doc: "DNS mode: seconds between lookups of CLUSTER_DNS_QUERY (1-3600)." },
    Var { env: "CLUSTER_DNS_SERVER", key: "cluster.dns_server", default: "",
          doc: "DNS mode: ip:port of the DNS server to ask instead of the system resolver." },
    Var { env: "CLUSTER_HEARTBEAT_MS", key: "cluster.heartbeat_ms", default: "1000",
          doc: "Heartbeat interval in milliseconds (50-60000); a peer is suspect after 3 silent intervals and gone after 10." },
    Var { env: "CLUSTER_SEND_QUEUE", key: "cluster.send_queue", default: "4096",
          doc: "Messages queued per peer (1-1000000); a peer whose queue overflows is marked as having missed messages." },
    Var { env: "DATABASE_URL", key: "database.url", default: "postgres://postgres@127.0.0.1:5432/postgres",
          doc: "PostgreSQL connection URL (the source of truth). The password is masked in output." },
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

/// openFHIR's default bootstrap directory (`openfhir.bootstrap.dir`).
pub const DEFAULT_BOOTSTRAP_DIR: &str = "/app/bootstrap/";

/// Default name of the optional configuration file, looked up in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "openfhir-cache.toml";

/// A configuration value that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting has a value that does not parse or is out of range.
    #[error("{source_name}={value:?} is invalid: {reason}")]
    Invalid {
        /// Where it came from: the environment variable, or the file key and file.
        source_name: String,
        /// The value as given.
        value: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// Settings that are valid alone but not together (e.g. `DNS` without a query).
    #[error("{0}")]
    Inconsistent(String),
    /// The configuration file could not be read or parsed.
    #[error("configuration file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Time-to-live of one cache group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// `0`: no cache at all; every read goes to the database and nothing is stored.
    Disabled,
    /// `-1`: entries never expire; only explicit eviction or a restart removes them.
    Infinite,
    /// `N > 0`: an entry expires N seconds after it was loaded (expire-after-write).
    Seconds(u64),
}

/// Largest TTL accepted (1000 years; the cache library refuses more).
const MAX_TTL_SECS: u64 = 1000 * 365 * 24 * 3600;

impl Ttl {
    /// The value as configured: `-1`, `0` or `N`.
    pub fn as_i64(self) -> i64 {
        match self {
            Ttl::Disabled => 0,
            Ttl::Infinite => -1,
            Ttl::Seconds(n) => n as i64,
        }
    }

    /// The expiry duration, if entries expire.
    pub fn duration(self) -> Option<Duration> {
        match self {
            Ttl::Seconds(n) => Some(Duration::from_secs(n)),
            _ => None,
        }
    }
}

impl FromStr for Ttl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const EXPECTED: &str =
            "expected -1 (infinite), 0 (disabled) or a whole number of seconds > 0";
        let t = s.trim();
        if t.is_empty() {
            return Err(format!("empty; {EXPECTED}"));
        }
        match t {
            "-1" => return Ok(Ttl::Infinite),
            "0" => return Ok(Ttl::Disabled),
            _ => {}
        }
        if !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(EXPECTED.to_string());
        }
        match t.parse::<u64>() {
            Ok(0) => Ok(Ttl::Disabled),
            Ok(n) if n <= MAX_TTL_SECS => Ok(Ttl::Seconds(n)),
            _ => Err(format!("too large; at most {MAX_TTL_SECS} seconds")),
        }
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_i64())
    }
}

impl Serialize for Ttl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.as_i64())
    }
}

/// How peers find each other (`CLUSTER_DISCOVERY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Discovery {
    /// Announce on a multicast group (default).
    Multicast,
    /// Resolve a headless DNS name (Kubernetes).
    Dns,
    /// A static list of peers.
    Tcp,
}

impl FromStr for Discovery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_uppercase().as_str() {
            "MULTICAST" => Ok(Discovery::Multicast),
            "DNS" => Ok(Discovery::Dns),
            "TCP" => Ok(Discovery::Tcp),
            _ => Err("expected MULTICAST, DNS or TCP".to_string()),
        }
    }
}

/// One `host[port]` entry of `CLUSTER_INITIAL_HOSTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// A DNS name, an IPv4 address or an IPv6 address (without brackets).
    pub host: String,
    /// The peer's cluster port.
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}][{}]", self.host, self.port)
        } else {
            write!(f, "{}[{}]", self.host, self.port)
        }
    }
}

impl Serialize for HostPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for HostPort {
    type Err = String;
    /// Parses `host[port]`, `1.2.3.4[7800]` or `[::1][7800]`.
    fn from_str(entry: &str) -> Result<Self, String> {
        let e = entry.trim();
        let form = "expected host[port], e.g. node-1[7800], 10.0.0.1[7800] or [::1][7800]";
        let Some(body) = e.strip_suffix(']') else {
            return Err(format!("'{e}': {form}"));
        };
        let Some(open) = body.rfind('[') else {
            return Err(format!("'{e}': {form}"));
        };
        let (host, port) = (body[..open].trim(), body[open + 1..].trim());
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(format!(
                    "'{e}': port '{port}' is not a number from 1 to 65535"
                ))
            }
        };
        let host = if let Some(inner) = host.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| format!("'{e}': unclosed '[' in IPv6 host"))?;
            inner
                .parse::<Ipv6Addr>()
                .map_err(|_| format!("'{e}': '{inner}' is not an IPv6 address"))?;
            inner.to_string()
        } else {
            if host.is_empty() {
                return Err(format!("'{e}': host is empty; {form}"));
            }
            if host.contains(':') {
                return Err(format!(
                    "'{e}': write an IPv6 host in brackets, e.g. [{host}][{port}]"
                ));
            }
            if host.parse::<IpAddr>().is_err() && !is_dns_name(host) {
                return Err(format!(
                    "'{e}': '{host}' is neither an IP address nor a host name"
                ));
            }
            host.to_string()
        };
        Ok(HostPort { host, port })
    }
}

fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Parses the whole `CLUSTER_INITIAL_HOSTS` list; empty entries (a trailing comma) are ignored.
pub fn parse_initial_hosts(s: &str) -> Result<Vec<HostPort>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(HostPort::from_str)
        .collect()
}

/// A secret that never prints: `Debug`, `Display` and `Serialize` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// A database URL whose password is masked when shown.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The full URL, password included; only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `***`, safe for logs and messages.
    pub fn masked(&self) -> String {
        mask_url(&self.0)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.masked())
    }
}

/// Masks the password of a `postgres://` URL (user info and `?password=`) or of a libpq
/// `key=value` connection string (spaces around `=` and quoted values included).
pub fn mask_url(raw: &str) -> String {
    if let Ok(mut u) = url::Url::parse(raw) {
        if u.password().is_some() {
            let _ = u.set_password(Some("***"));
        }
        if u.query_pairs()
            .any(|(k, _)| k.eq_ignore_ascii_case("password"))
        {
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k.eq_ignore_ascii_case("password") {
                        "***".to_string()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            u.query_pairs_mut().clear().extend_pairs(pairs);
        }
        return u.to_string();
    }
    if let Some((scheme, rest)) = raw.split_once("://") {
        return format!("{scheme}://{}", mask_unparsable_url(rest));
    }
    mask_key_values(raw)
}

/// A URL the `url` crate refused (e.g. port 99999): mask `user:password@` and any
/// `password=` query parameter by hand, so an error message about it never leaks the secret.
fn mask_unparsable_url(rest: &str) -> String {
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", q.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{authority}{tail}")
}

/// libpq `key = value` syntax: values are bare words or single-quoted with `\` escapes.
fn mask_key_values(raw: &str) -> String {
    let mut out = Vec::new();
    let mut chars = raw.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            out.push(key);
            continue;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            value.push('\'');
            while let Some(c) = chars.next() {
                value.push(c);
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => break,
                    _ => {}
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        if key.eq_ignore_ascii_case("password") {
            value = "***".to_string();
        }
        out.push(format!("{key}={value}"));
    }
    out.join(" ")
}

/// Log output format (`OPENFHIR_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The cache group TTLs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheConfig {
    /// `OPENFHIR_CACHE_OPT_TTL`.
    pub opt_ttl: Ttl,
    /// `OPENFHIR_CACHE_FHIR_CONNECT_TTL`.
    pub fhir_connect_ttl: Ttl,
    /// `OPENFHIR_CACHE_TENANT_TTL`.
    pub tenant_ttl: Ttl,
}

/// Peer cluster settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterConfig {
    /// `CLUSTER_DISCOVERY`.
    pub discovery: Discovery,
    /// `CLUSTER_DNS_QUERY`; required in DNS mode.
    pub dns_query: Option<String>,
    /// `CLUSTER_INITIAL_HOSTS`; required in TCP mode.
    pub initial_hosts: Vec<HostPort>,
    /// `CLUSTER_PORT`; 0 = any free port.
    pub port: u16,
    /// `CLUSTER_BIND_ADDR`.
    pub bind_addr: IpAddr,
    /// `CLUSTER_NAME`.
    pub name: String,
    /// `CLUSTER_SECRET`; `None` = unauthenticated channel.
    pub secret: Option<Secret>,
    /// `CLUSTER_MULTICAST_ADDR`.
    pub multicast_addr: SocketAddrV4,
    /// `CLUSTER_DNS_INTERVAL`, in seconds.
    pub dns_interval: u64,
    /// `CLUSTER_DNS_SERVER`.
    pub dns_server: Option<SocketAddr>,
    /// `CLUSTER_HEARTBEAT_MS`.
    pub heartbeat_ms: u64,
    /// `CLUSTER_SEND_QUEUE`: per-peer queue capacity, in messages.
    pub send_queue: usize,
}

/// Shortest accepted `CLUSTER_SECRET`, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// Database settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatabaseConfig {
    /// `DATABASE_URL`.
    pub url: DatabaseUrl,
    /// `OPENFHIR_DB_POOL_SIZE`: maximum pooled connections.
    pub pool_size: usize,
}

/// HTTP API settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpConfig {
    /// `OPENFHIR_HTTP_ADDR`.
    pub addr: SocketAddr,
    /// `OPENFHIR_API_TOKEN`.
    pub api_token: Option<Secret>,
    /// `OPENFHIR_MAX_BODY_BYTES`: largest accepted body, in bytes.
    pub max_body_bytes: usize,
    /// `OPENFHIR_MAX_FC_BODY_BYTES`: largest FHIR Connect document, in bytes. Lower than
    /// `max_body_bytes` because YAML parsing and the typed models take up to ~300x the text.
    pub max_fc_body_bytes: usize,
    /// `OPENFHIR_REQUEST_TIMEOUT_SECS`: per-request time limit, in seconds.
    pub request_timeout_secs: u64,
    /// `OPENFHIR_HEADER_TIMEOUT_SECS`: time to receive request headers, in seconds.
    pub header_timeout_secs: u64,
    /// `OPENFHIR_MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// `OPENFHIR_MAX_CONCURRENT_REQUESTS`.
    pub max_concurrent_requests: usize,
}

/// The database invalidation channel: LISTEN/NOTIFY and log catch-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvalidationConfig {
    /// `OPENFHIR_PG_NOTIFY`.
    pub pg_notify: bool,
    /// `OPENFHIR_CATCHUP_INTERVAL_MS`: 0 = no periodic catch-up.
    pub catchup_interval_ms: u64,
    /// `OPENFHIR_INVALIDATION_RETENTION`, in seconds.
    pub retention_secs: u64,
    /// `OPENFHIR_CONSISTENCY_WAIT_MS`.
    pub consistency_wait_ms: u64,
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    /// `OPENFHIR_LOG_FORMAT`.
    pub format: LogFormat,
}

/// openFHIR's bootstrap directory (`OPENFHIR_BOOTSTRAP_*`; the bootstrap module loads it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootstrapConfig {
    /// `OPENFHIR_BOOTSTRAP_DIR`; `None` when set empty.
    pub dir: Option<PathBuf>,
    /// True when `dir` is openFHIR's default, not set by the operator (a missing default
    /// directory is normal, a missing configured one is worth a warning).
    #[serde(skip)]
    pub dir_is_default: bool,
    /// `OPENFHIR_BOOTSTRAP_RECURSIVELY_OPEN_DIRECTORIES`.
    #[serde(rename = "recursively_open_directories")]
    pub recursive: bool,
}

/// The node's effective configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Cache group TTLs.
    pub cache: CacheConfig,
    /// Peer cluster.
    pub cluster: ClusterConfig,
    /// PostgreSQL.
    pub database: DatabaseConfig,
    /// HTTP API.
    pub http: HttpConfig,
    /// Database invalidation channel.
    pub invalidation: InvalidationConfig,
    /// Logging.
    pub log: LogConfig,
    /// The bootstrap directory.
    pub bootstrap: BootstrapConfig,
}

impl Default for Config {
    /// The configuration with nothing set: every [`VARS`] default.
    fn default() -> Self {
        Config::from_sources(None, |_| None).expect("the built-in defaults are valid")
    }
}

/// Where the node reads its settings from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML file: `Some` = required to exist; `None` = `openfhir-cache.toml` if present.
    pub file: Option<PathBuf>,
}

impl Config {
    /// Loads the configuration from the default file (if present) and the process environment.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let file = match &sources.file {
            Some(p) if !p.exists() => {
                return Err(ConfigError::File {
                    path: p.clone(),
                    reason: "no such file".into(),
                })
            }
            Some(p) => Some(p.clone()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
        };
        Config::from_sources(file.as_deref(), |name| std::env::var(name).ok())
    }

    /// Builds the configuration from an optional file and an environment lookup function
    /// (tests pass a map instead of touching the process environment).
    pub fn from_sources(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::new().merge(Serialized::defaults(defaults()));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(EnvVars::read(env));
        let raw = Raw { figment, file };

        let cache = CacheConfig {
            opt_ttl: raw.parse("cache.opt_ttl", Ttl::from_str)?,
            fhir_connect_ttl: raw.parse("cache.fhir_connect_ttl", Ttl::from_str)?,
            tenant_ttl: raw.parse("cache.tenant_ttl", Ttl::from_str)?,
        };
        let cluster = ClusterConfig {
            discovery: raw.parse("cluster.discovery", Discovery::from_str)?,
            dns_query: raw.parse("cluster.dns_query", |s| Ok(non_empty(s)))?,
            initial_hosts: raw.parse("cluster.initial_hosts", parse_initial_hosts)?,
            port: raw.parse("cluster.port", |s| {
                s.trim()
                    .parse::<u16>()
                    .map_err(|_| "expected a port number from 0 to 65535".to_string())
            })?,
            bind_addr: raw.parse("cluster.bind_addr", |s| {
                s.trim().parse::<IpAddr>().map_err(|_| {
                    "expected an IP address without a port, e.g. 0.0.0.0, 10.0.0.1 or ::".to_string()
                })
            })?,
            name: raw.parse("cluster.name", parse_cluster_name)?,
            secret: raw.parse("cluster.secret", |s| match s {
                "" => Ok(None),
                s if s.len() < MIN_SECRET_LEN => Err(format!(
                    "too short ({} bytes); use at least {MIN_SECRET_LEN}, e.g. `openssl rand -hex 32`",
                    s.len()
                )),
                s => Ok(Some(Secret(s.to_string()))),
            })?,
            multicast_addr: raw.parse("cluster.multicast_addr", |s| {
                match s.trim().parse::<SocketAddrV4>() {
                    Ok(a) if a.ip().is_multicast() && a.port() > 0 => Ok(a),
                    Ok(_) => Err("not an IPv4 multicast group (224.0.0.0/4) with a port > 0".to_string()),
                    Err(_) => Err("expected an IPv4 multicast group and port, e.g. 239.255.78.0:45588".to_string()),
                }
            })?,
            dns_interval: raw.parse("cluster.dns_interval", |s| {
                parse_range(s, 1, 3600, "a number of seconds").map(|n| n as u64)
            })?,
            dns_server: raw.parse("cluster.dns_server", |s| match s.trim() {
                "" => Ok(None),
                t => t.parse::<SocketAddr>().map(Some).map_err(|_| {
                    "expected ip:port of a DNS server, e.g. 10.96.0.10:53".to_string()
                }),
            })?,
            heartbeat_ms: raw.parse("cluster.heartbeat_ms", |s| {
                parse_range(s, 50, 60_000, "a number of milliseconds").map(|n| n as u64)
            })?,
            send_queue: raw.parse("cluster.send_queue", |s| {
                parse_range(s, 1, 1_000_000, "a number of messages")
            })?,
        };
        match cluster.discovery {
            Discovery::Dns if cluster.dns_query.is_none() => {
                return Err(ConfigError::Inconsistent(
                    "CLUSTER_DISCOVERY=DNS needs CLUSTER_DNS_QUERY: set it to the headless \
                     service's DNS name, e.g. openfhir-cluster.default.svc.cluster.local"
                        .into(),
                ))
            }
            Discovery::Tcp if cluster.initial_hosts.is_empty() => {
                return Err(ConfigError::Inconsistent(
                    "CLUSTER_DISCOVERY=TCP needs CLUSTER_INITIAL_HOSTS: set it to every node's \
                     cluster address, itself included, e.g. 10.0.0.1[7800],10.0.0.2[7800]"
                        .into(),
                ))
            }
            _ => {}
        }
        let database = DatabaseConfig {
            url: raw.parse("database.url", |s| {
                let s = s.trim();
                tokio_postgres::Config::from_str(s)
                    .map(|_| DatabaseUrl(s.to_string()))
                    .map_err(|e| format!("not a PostgreSQL connection URL ({e})"))
            })?,
            pool_size: raw.parse("database.pool_size", |s| {
                parse_range(s, 1, 1000, "a number of connections")
            })?,
        };
        let http = HttpConfig {
            addr: raw.parse("http.addr", |s| {
                s.trim()
                    .parse::<SocketAddr>()
                    .map_err(|_| "expected ip:port, e.g. 0.0.0.0:8080 or [::]:8080".to_string())
            })?,
            api_token: raw.parse("http.api_token", |s| Ok(non_empty(s).map(Secret)))?,
            max_body_bytes: raw.parse("http.max_body_bytes", |s| {
                parse_range(s, 1024, 1 << 30, "a number of bytes")
            })?,
            max_fc_body_bytes: raw.parse("http.max_fc_body_bytes", |s| {
                parse_range(s, 1024, 1 << 30, "a number of bytes")
            })?,
            request_timeout_secs: raw.parse("http.request_timeout_secs", |s| {
                parse_range(s, 1, 3600, "a number of seconds").map(|n| n as u64)
            })?,
            header_timeout_secs: raw.parse("http.header_timeout_secs", |s| {
                parse_range(s, 1, 3600, "a number of seconds").map(|n| n as u64)
            })?,
            max_connections: raw.parse("http.max_connections", |s| {
                parse_range(s, 1, 1_000_000, "a number of connections")
            })?,
            max_concurrent_requests: raw.parse("http.max_concurrent_requests", |s| {
                parse_range(s, 1, 1_000_000, "a number of requests")
            })?,
        };
        let invalidation = InvalidationConfig {
            pg_notify: raw.parse("invalidation.pg_notify", parse_bool)?,
            catchup_interval_ms: raw.parse("invalidation.catchup_interval_ms", |s| {
                parse_range(s, 0, 3_600_000, "a number of milliseconds").map(|n| n as u64)
            })?,
            retention_secs: raw.parse("invalidation.retention_secs", |s| {
                parse_range(s, 1, 365 * 24 * 3600, "a number of seconds").map(|n| n as u64)
            })?,
            consistency_wait_ms: raw.parse("invalidation.consistency_wait_ms", |s| {
                parse_range(s, 0, 600_000, "a number of milliseconds").map(|n| n as u64)
            })?,
        };
        let log = LogConfig {
            format: raw.parse("log.format", |s| {
                match s.trim().to_ascii_lowercase().as_str() {
                    "text" => Ok(LogFormat::Text),
                    "json" => Ok(LogFormat::Json),
                    _ => Err("expected text or json".to_string()),
                }
            })?,
        };
        let dir = raw.parse("bootstrap.dir", |s| Ok(non_empty(s).map(PathBuf::from)))?;
        let bootstrap = BootstrapConfig {
            dir_is_default: dir.as_deref() == Some(Path::new(DEFAULT_BOOTSTRAP_DIR)),
            dir,
            recursive: raw.parse("bootstrap.recursively_open_directories", parse_bool)?,
        };
        Ok(Config {
            cache,
            cluster,
            database,
            http,
            invalidation,
            log,
            bootstrap,
        })
    }

    /// The configuration as JSON, secrets masked (what `openfhir-cache config` prints).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".to_string()),
    }
}

fn parse_cluster_name(s: &str) -> Result<String, String> {
    let t = s.trim();
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(t.to_string())
    } else {
        Err("expected 1 to 64 letters, digits, '.', '_' or '-'".to_string())
    }
}

fn non_empty(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn parse_range(s: &str, min: usize, max: usize, what: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected {what} from {min} to {max}")),
    }
}

fn var_by_key(key: &str) -> &'static Var {
    VARS.iter()
        .find(|v| v.key == key)
        .unwrap_or_else(|| panic!("config key {key} missing from VARS"))
}

fn defaults() -> Dict {
    let mut root = Dict::new();
    for v in VARS {
        insert_nested(&mut root, v.key, Value::from(v.default.to_string()));
    }
    root
}

fn insert_nested(root: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            root.insert(key.to_string(), value);
        }
        Some((head, rest)) => {
            let entry = root
                .entry(head.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, dict) = entry {
                insert_nested(dict, rest, value);
            }
        }
    }
}

/// The environment as a figment provider: only the variables in [`VARS`], as raw strings
/// (figment's own `Env` would read `[::1][7800]` as an array).
struct EnvVars(Dict);

impl EnvVars {
    fn read(env: impl Fn(&str) -> Option<String>) -> Self {
        let mut root = Dict::new();
        for v in VARS {
            if let Some(value) = env(v.env) {
                insert_nested(&mut root, v.key, Value::from(value));
            }
        }
        EnvVars(root)
    }
}

const ENV_SOURCE: &str = "environment";

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_SOURCE)
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Map::from([(Profile::Default, self.0.clone())]))
    }
}

/// The merged sources, read one key at a time so errors can name their origin.
struct Raw<'a> {
    figment: Figment,
    file: Option<&'a Path>,
}

impl Raw<'_> {
    fn parse<T>(
        &self,
        key: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let var = var_by_key(key);
        let value = self
            .figment
            .find_value(key)
            .map_err(|e| self.file_error(e))?;
        let (text, source_name) = (self.text(&value, var)?, self.source_name(&value, var));
        f(&text).map_err(|reason| ConfigError::Invalid {
            source_name,
            // Never echo a secret in an error message.
            value: match key {
                "database.url" => mask_url(&text),
                "http.api_token" | "cluster.secret" => "***".to_string(),
                _ => text,
            },
            reason,
        })
    }

    fn source_name(&self, value: &Value, var: &Var) -> String {
        let from_env = self
            .figment
            .get_metadata(value.tag())
            .is_some_and(|m| m.name == ENV_SOURCE);
        match (from_env, self.file) {
            (false, Some(file))
                if self
                    .figment
                    .get_metadata(value.tag())
                    .is_some_and(|m| m.source.is_some()) =>
            {
                format!("{} (in {})", var.key, file.display())
            }
            _ => var.env.to_string(),
        }
    }

    /// A scalar as text; a list of strings (TOML `initial_hosts = [...]`) joined with commas.
    fn text(&self, value: &Value, var: &Var) -> Result<String, ConfigError> {
        match value {
            Value::String(_, s) => Ok(s.clone()),
            Value::Char(_, c) => Ok(c.to_string()),
            Value::Bool(_, b) => Ok(b.to_string()),
            Value::Num(_, n) => Ok(num_text(n)),
            Value::Array(_, items) => items
                .iter()
                .map(|i| self.text(i, var))
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.join(",")),
            other => Err(ConfigError::Invalid {
                source_name: self.source_name(value, var),
                value: format!("{other:?}"),
                reason: "expected a single value".into(),
            }),
        }
    }

    fn file_error(&self, e: figment::Error) -> ConfigError {
        ConfigError::File {
            path: self.file.map(Path::to_path_buf).unwrap_or_default(),
            reason: e.to_string(),
        }
    }
}

fn num_text(n: &figment::value::Num) -> String {
    use figment::value::Num;
    match *n {
        Num::U8(v) => v.to_string(),
        Num::U16(v) => v.to_string(),
        Num::U32(v) => v.to_string(),
        Num::U64(v) => v.to_string(),
        Num::U128(v) => v.to_string(),
        Num::USize(v) => v.to_string(),
        Num::I8(v) => v.to_string(),
        Num::I16(v) => v.to_string(),
        Num::I32(v) => v.to_string(),
        Num::I64(v) => v.to_string(),
        Num::I128(v) => v.to_string(),
        Num::ISize(v) => v.to_string(),
        Num::F32(v) => v.to_string(),
        Num::F64(v) => v.to_string(),
    }
}

/// The effective settings as `(env var, shown value)` pairs, secrets masked, for startup logs.
pub fn describe(config: &Config) -> BTreeMap<&'static str, String> {
    let json = config.to_json();
    VARS.iter()
        .map(|v| {
            let mut node = &json;
            for part in v.key.split('.') {
                node = &node[part];
            }
            let shown = match node {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => String::new(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            (v.env, shown)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_sources(None, |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_seeds() {
        let c = Config::default();
        assert_eq!(c.cache.opt_ttl, Ttl::Infinite);
        assert_eq!(c.cache.fhir_connect_ttl, Ttl::Infinite);
        assert_eq!(c.cache.tenant_ttl, Ttl::Infinite);
        assert_eq!(c.cluster.discovery, Discovery::Multicast);
        assert_eq!(c.cluster.port, 7800);
        assert!(c.cluster.dns_query.is_none() && c.cluster.initial_hosts.is_empty());
        assert_eq!(c.http.addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.http.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(c.http.max_fc_body_bytes, 128 * 1024);
        assert_eq!(
            c.database.url.expose(),
            "postgres://postgres@127.0.0.1:5432/postgres"
        );
        assert!(c.http.api_token.is_none());
    }

    #[test]
    fn ttl_values() {
        let c = with(&[
            ("OPENFHIR_CACHE_OPT_TTL", "300"),
            ("OPENFHIR_CACHE_FHIR_CONNECT_TTL", "0"),
        ])
        .unwrap();
        assert_eq!(c.cache.opt_ttl, Ttl::Seconds(300));
        assert_eq!(c.cache.fhir_connect_ttl, Ttl::Disabled);
        assert_eq!(
            c.cache.tenant_ttl,
            Ttl::Infinite,
            "unset TTLs keep their default"
        );
        for bad in [
            "-2",
            "5m",
            "abc",
            "",
            "  ",
            "1.5",
            "+5",
            "99999999999999999999",
        ] {
            let err = with(&[("OPENFHIR_CACHE_TENANT_TTL", bad)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("OPENFHIR_CACHE_TENANT_TTL"), "{err}");
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn discovery_is_case_insensitive_and_checked() {
        assert_eq!(
            with(&[("CLUSTER_DISCOVERY", "multicast")])
                .unwrap()
                .cluster
                .discovery,
            Discovery::Multicast
        );
        let e = with(&[("CLUSTER_DISCOVERY", "dns")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CLUSTER_DNS_QUERY"), "{e}");
        let e = with(&[("CLUSTER_DISCOVERY", "Tcp")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CLUSTER_INITIAL_HOSTS"), "{e}");
        let e = with(&[("CLUSTER_DISCOVERY", "gossip")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CLUSTER_DISCOVERY") && e.contains("gossip"),
            "{e}"
        );
        let c = with(&[
            ("CLUSTER_DISCOVERY", "DNS"),
            ("CLUSTER_DNS_QUERY", "svc.ns.svc.cluster.local"),
        ])
        .unwrap();
        assert_eq!(
            c.cluster.dns_query.as_deref(),
            Some("svc.ns.svc.cluster.local")
        );
    }

    #[test]
    fn initial_hosts() {
        let c = with(&[
            ("CLUSTER_DISCOVERY", "TCP"),
            (
                "CLUSTER_INITIAL_HOSTS",
                " node-1[7800] , 10.0.0.2[7801],[::1][7802],",
            ),
        ])
        .unwrap();
        let h = &c.cluster.initial_hosts;
        assert_eq!(h.len(), 3);
        assert_eq!((h[0].host.as_str(), h[0].port), ("node-1", 7800));
        assert_eq!((h[1].host.as_str(), h[1].port), ("10.0.0.2", 7801));
        assert_eq!((h[2].host.as_str(), h[2].port), ("::1", 7802));
        assert_eq!(h[2].to_string(), "[::1][7802]");
        for bad in [
            "node-1:7800",
            "::1[7800]",
            "node-1[0]",
            "node-1[70000]",
            "[7800]",
            "[::1[7800]",
            "bad host[1]",
            "[zz::1][1]",
        ] {
            let e = with(&[("CLUSTER_INITIAL_HOSTS", &format!("ok[1],{bad}"))])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("CLUSTER_INITIAL_HOSTS") && e.contains(bad.trim()),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn other_values() {
        for (var, bad) in [
            ("CLUSTER_PORT", "65536"),
            ("CLUSTER_PORT", "http"),
            ("CLUSTER_BIND_ADDR", "127.0.0.2:7800"),
            ("CLUSTER_NAME", "my cluster"),
            ("CLUSTER_NAME", ""),
            ("CLUSTER_MULTICAST_ADDR", "10.0.0.1:45588"),
            ("CLUSTER_MULTICAST_ADDR", "239.1.1.1"),
            ("CLUSTER_DNS_INTERVAL", "0"),
            ("CLUSTER_DNS_SERVER", "dns.local"),
            ("CLUSTER_HEARTBEAT_MS", "10"),
            ("CLUSTER_SEND_QUEUE", "0"),
            ("OPENFHIR_HTTP_ADDR", "localhost"),
            ("OPENFHIR_DB_POOL_SIZE", "0"),
            ("OPENFHIR_MAX_BODY_BYTES", "16MiB"),
            ("OPENFHIR_LOG_FORMAT", "xml"),
            ("DATABASE_URL", "mysql://x"),
        ] {
            let e = with(&[(var, bad)]).unwrap_err().to_string();
            assert!(e.contains(var) && e.contains(bad), "{var}={bad}: {e}");
        }
    }

    #[test]
    fn cluster_defaults_and_values() {
        let c = with(&[]).unwrap().cluster;
        assert_eq!(c.name, "openfhir");
        assert_eq!(c.port, 7800);
        assert_eq!(c.bind_addr, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(c.multicast_addr, "239.255.78.0:45588".parse().unwrap());
        assert!(c.secret.is_none() && c.dns_server.is_none());
        assert_eq!(
            (c.dns_interval, c.heartbeat_ms, c.send_queue),
            (10, 1000, 4096)
        );
        let c = with(&[
            ("CLUSTER_PORT", "0"),
            ("CLUSTER_BIND_ADDR", "::1"),
            ("CLUSTER_NAME", "prod-eu_1.a"),
            ("CLUSTER_DNS_SERVER", "127.0.0.1:5353"),
        ])
        .unwrap()
        .cluster;
        assert_eq!(c.port, 0);
        assert_eq!(c.bind_addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(c.name, "prod-eu_1.a");
        assert_eq!(c.dns_server, Some("127.0.0.1:5353".parse().unwrap()));
    }

    #[test]
    fn short_cluster_secret_is_refused_without_echo() {
        let e = with(&[("CLUSTER_SECRET", "short-secret")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CLUSTER_SECRET")
                && e.contains("at least 16")
                && !e.contains("short-secret"),
            "{e}"
        );
        let c = with(&[("CLUSTER_SECRET", "0123456789abcdef")]).unwrap();
        assert_eq!(
            c.cluster.secret.as_ref().unwrap().expose(),
            "0123456789abcdef"
        );
        assert!(!c.to_json().to_string().contains("0123456789abcdef"));
    }

    #[test]
    fn secrets_never_print() {
        let c = with(&[
            ("OPENFHIR_API_TOKEN", "tok-123"),
            ("DATABASE_URL", "postgres://u:hunter2@db:5432/x"),
        ])
        .unwrap();
        let json = c.to_json().to_string();
        let debug = format!("{c:?}");
        for shown in [json, debug] {
            assert!(
                !shown.contains("tok-123") && !shown.contains("hunter2"),
                "{shown}"
            );
        }
        assert_eq!(c.http.api_token.as_ref().unwrap().expose(), "tok-123");
        assert_eq!(
            mask_url("host=db password=x user=u"),
            "host=db password=*** user=u"
        );
    }

    #[test]
    fn file_then_environment() {
        let dir = std::env::temp_dir().join(format!("ofc-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("openfhir-cache.toml");
        std::fs::write(&path, "[cache]\nopt_ttl = 300\ntenant_ttl = 60\n[cluster]\nport = 7900\ninitial_hosts = [\"a[1]\", \"b[2]\"]\n").unwrap();
        let env: HashMap<&str, &str> = HashMap::from([("OPENFHIR_CACHE_OPT_TTL", "5")]);
        let c = Config::from_sources(Some(&path), |k| env.get(k).map(|s| s.to_string())).unwrap();
        assert_eq!(
            c.cache.opt_ttl,
            Ttl::Seconds(5),
            "environment wins over the file"
        );
        assert_eq!(c.cache.tenant_ttl, Ttl::Seconds(60));
        assert_eq!(c.cluster.port, 7900);
        assert_eq!(c.cluster.initial_hosts.len(), 2);
        std::fs::write(&path, "[cache]\nopt_ttl = \"5m\"\n").unwrap();
        let e = Config::from_sources(Some(&path), |_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache.opt_ttl") && e.contains("5m"), "{e}");
        std::fs::write(&path, "[cache\n").unwrap();
        assert!(matches!(
            Config::from_sources(Some(&path), |_| None),
            Err(ConfigError::File { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_password_form_is_masked() {
        for raw in [
            "postgres://u:pw1@db:5432/x",
            "postgres://u@db/x?sslmode=disable&password=pw1",
            "postgresql:///x?host=db&password=pw1",
            "postgres://u:pw1@db:99999/x",
            "postgres://u:pw1@db:99999/x?password=pw1",
            "host=db password = 'p w1\\' x' user=u",
            "host=db password=pw1",
        ] {
            let m = mask_url(raw);
            assert!(!m.contains("pw1") && m.contains("***"), "{raw} -> {m}");
        }
        let e = with(&[("DATABASE_URL", "postgres://app:pw1@db:99999/x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("DATABASE_URL") && !e.contains("pw1"), "{e}");
    }
}
