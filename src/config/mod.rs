//! Configuration: defaults < optional `openfhir-cache.toml` < environment.
//!
//! Every setting is listed once in [`VARS`] with its environment variable (the seeds' names, exactly),
//! its key in the TOML file, its default and its meaning. That table drives the environment mapping,
//! the defaults, the error messages and the README reference (a test checks README against it).
//!
//! Values are parsed here, by hand, so that every error names the variable (or file key) and the
//! offending value: `OPENFHIR_CACHE_OPT_TTL='5m' is invalid: ...`.
//!
//! # Layout
//! * `vars`: the [`VARS`] table.
//! * `values`: the value types ([`Ttl`], [`Discovery`], [`HostPort`], [`LogFormat`]) and the
//!   shared parsers.
//! * `secret`: [`Secret`] and [`DatabaseUrl`], which never print their secret ([`mask_url`]).
//! * `database`: `DATABASE_URL`'s TLS settings ([`DatabaseTls`], libpq's `sslmode` and files).
//! * `source`: the layered sources and [`describe`].
//! * this module: the validated [`Config`] and its sections, and [`Config::from_sources`].

mod database;
mod libpq;
mod secret;
mod source;
mod values;
mod vars;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::Serialize;

pub use database::{parse_database_url, DatabaseTls, RootCert, SslMode, TlsFiles, Verify};
pub use secret::{mask_url, DatabaseUrl, Secret};
pub use source::describe;
pub use values::{parse_initial_hosts, Discovery, HostPort, LogFormat, Ttl};
pub use vars::{Var, VARS};

use source::{defaults, EnvVars, Raw};
use values::{
    non_empty, parse_bool, parse_bound, parse_cluster_name, parse_multicast_group, parse_range,
};

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

/// The smallest byte bound a cache group accepts (1 MiB): below it a single typical OPT or
/// compiled mapper would not fit and the cache would keep nothing.
pub const MIN_CACHE_BYTES: u64 = 1 << 20;

/// The cache groups' TTLs and size bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheConfig {
    /// `OPENFHIR_CACHE_OPT_TTL`.
    pub opt_ttl: Ttl,
    /// `OPENFHIR_CACHE_FHIR_CONNECT_TTL`.
    pub fhir_connect_ttl: Ttl,
    /// `OPENFHIR_CACHE_TENANT_TTL`.
    pub tenant_ttl: Ttl,
    /// `OPENFHIR_CACHE_OPT_MAX_BYTES`; `None` (`-1`) = no bound.
    pub opt_max_bytes: Option<u64>,
    /// `OPENFHIR_CACHE_FHIR_CONNECT_MAX_BYTES` (the four caches of the group together); `None`
    /// (`-1`) = no bound.
    pub fhir_connect_max_bytes: Option<u64>,
    /// `OPENFHIR_CACHE_TENANT_MAX_ENTRIES`; `None` (`-1`) = no bound.
    pub tenant_max_entries: Option<u64>,
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
    /// `CLUSTER_MULTICAST_ADDR`: an IPv4 or IPv6 multicast group and port. When it is not set,
    /// [`DEFAULT_MULTICAST_V4`], or [`DEFAULT_MULTICAST_V6`] when `CLUSTER_BIND_ADDR` is IPv6.
    pub multicast_addr: SocketAddr,
    /// `CLUSTER_DNS_INTERVAL`, in seconds.
    pub dns_interval: u64,
    /// `CLUSTER_DNS_SERVER`.
    pub dns_server: Option<SocketAddr>,
    /// `CLUSTER_HEARTBEAT_MS`.
    pub heartbeat_ms: u64,
    /// `CLUSTER_SEND_QUEUE`: per-peer queue capacity, in messages.
    pub send_queue: usize,
}

/// The multicast group and port of announcements when `CLUSTER_MULTICAST_ADDR` is not set and
/// `CLUSTER_BIND_ADDR` is IPv4 (the `VARS` default): in `239.255.0.0/16`, the IPv4 local scope.
pub const DEFAULT_MULTICAST_V4: &str = "239.255.78.0:45588";

/// The multicast group and port of announcements when `CLUSTER_MULTICAST_ADDR` is not set and
/// `CLUSTER_BIND_ADDR` is IPv6 (e.g. `::`): `ff15::78`, a transient (`1`) site-local (`5`)
/// group, the IPv6 counterpart of the IPv4 local scope. Site scope rather than link-local
/// (`ff12::`) so the source address of an announcement is the node's unique-local or global
/// address, which a peer can dial without a zone index, and not its `fe80::` address.
pub const DEFAULT_MULTICAST_V6: &str = "[ff15::78]:45588";

/// The multicast group of announcements: `configured` (`CLUSTER_MULTICAST_ADDR`, `None` when it
/// is not set), else the default of the bind address's family. IPv4 bind addresses get
/// [`DEFAULT_MULTICAST_V4`] as before; an IPv6 bind address (a node that listens on IPv6 only,
/// or on `::`) gets [`DEFAULT_MULTICAST_V6`], so a cluster on an IPv6-only network finds itself
/// with no settings at all.
pub fn multicast_group(configured: Option<SocketAddr>, bind_addr: IpAddr) -> SocketAddr {
    let default = if bind_addr.is_ipv6() {
        DEFAULT_MULTICAST_V6
    } else {
        DEFAULT_MULTICAST_V4
    };
    configured.unwrap_or_else(|| {
        default
            .parse()
            .unwrap_or(SocketAddr::from(([239, 255, 78, 0], 45588)))
    })
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
    /// The TLS settings of `DATABASE_URL` (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`).
    pub tls: DatabaseTls,
}

impl DatabaseConfig {
    /// The tokio-postgres settings of `DATABASE_URL` (without the TLS parameters it does not
    /// know) and its TLS files, read now. Errors name `DATABASE_URL`, the setting and the file.
    pub fn connect_settings(&self) -> Result<(tokio_postgres::Config, TlsFiles), ConfigError> {
        let invalid = |reason| ConfigError::Invalid {
            source_name: "DATABASE_URL".to_string(),
            value: self.url.masked(),
            reason,
        };
        let (pg, _) = parse_database_url(self.url.expose()).map_err(invalid)?;
        let files = self.tls.load().map_err(invalid)?;
        Ok((pg, files))
    }
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
            opt_max_bytes: raw.parse("cache.opt_max_bytes", |s| {
                parse_bound(s, MIN_CACHE_BYTES, "a number of bytes")
            })?,
            fhir_connect_max_bytes: raw.parse("cache.fhir_connect_max_bytes", |s| {
                parse_bound(s, MIN_CACHE_BYTES, "a number of bytes")
            })?,
            tenant_max_entries: raw.parse("cache.tenant_max_entries", |s| {
                parse_bound(s, 1, "a number of entries")
            })?,
        };
        let mut cluster = ClusterConfig {
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
            multicast_addr: raw.parse("cluster.multicast_addr", parse_multicast_group)?,
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
        if !raw.is_set("cluster.multicast_addr") {
            // Unset: the default group of the bind address's family (IPv6 for `::`).
            cluster.multicast_addr = multicast_group(None, cluster.bind_addr);
        }
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
        let (url, tls) = raw.parse("database.url", |s| {
            let s = s.trim();
            parse_database_url(s).map(|(_, tls)| (DatabaseUrl(s.to_string()), tls))
        })?;
        let database = DatabaseConfig {
            url,
            pool_size: raw.parse("database.pool_size", |s| {
                parse_range(s, 1, 1000, "a number of connections")
            })?,
            tls,
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

#[cfg(test)]
mod tests;
