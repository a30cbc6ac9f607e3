//! The setting value types (TTLs, discovery mode, `host[port]` peers, log format) and the small
//! parsers the settings share.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

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

/// Log output format (`OPENFHIR_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

pub(super) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".to_string()),
    }
}

/// `CLUSTER_MULTICAST_ADDR`: an IPv4 (`224.0.0.0/4`) or IPv6 (`ff00::/8`, in brackets) multicast
/// group with a port > 0.
pub(super) fn parse_multicast_group(s: &str) -> Result<std::net::SocketAddr, String> {
    match s.trim().parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_multicast() && a.port() > 0 => Ok(a),
        Ok(_) => Err(
            "not a multicast group (IPv4 224.0.0.0/4 or IPv6 ff00::/8) with a port > 0".to_string(),
        ),
        Err(_) => Err(
            "expected a multicast group and port, e.g. 239.255.78.0:45588 or [ff15::78]:45588"
                .to_string(),
        ),
    }
}

pub(super) fn parse_cluster_name(s: &str) -> Result<String, String> {
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

pub(super) fn non_empty(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// A cache size bound: `-1` for none, else a whole number of at least `min`.
pub(super) fn parse_bound(s: &str, min: u64, what: &str) -> Result<Option<u64>, String> {
    match s.trim() {
        "-1" => Ok(None),
        t => match t.parse::<u64>() {
            Ok(n) if n >= min => Ok(Some(n)),
            _ => Err(format!(
                "expected -1 (no bound) or {what} of at least {min}"
            )),
        },
    }
}

pub(super) fn parse_range(s: &str, min: usize, max: usize, what: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected {what} from {min} to {max}")),
    }
}
