//! `DATABASE_URL`'s TLS settings, with libpq's names: `sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey`.
//!
//! tokio-postgres knows only `sslmode=disable|prefer|require` and none of the file settings, so
//! [`parse_database_url`] takes them out of the URL (or `key=value` string), checks them, and
//! hands the rest to [`tokio_postgres::Config`]. This is the one parser of these settings; the
//! store builds its TLS connector from the [`DatabaseTls`] it returns.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

/// libpq's `sslmode`: whether the connection is encrypted and what of the server is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS if the server offers it (the certificate unchecked), plain otherwise. libpq's default.
    Prefer,
    /// TLS or no connection; the certificate is not checked unless a root certificate is
    /// configured (then as [`SslMode::VerifyCa`], as libpq does).
    Require,
    /// TLS, and the server certificate must chain to a CA of `sslrootcert`; any host name.
    VerifyCa,
    /// TLS, the certificate must chain to a CA of `sslrootcert` and name the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The setting's value as written in `DATABASE_URL`.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disable" => Ok(SslMode::Disable),
            // libpq's `allow` tries plain first; one attempt with TLS offered is close enough
            // and never weaker.
            "allow" | "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(format!(
                "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            )),
        }
    }
}

/// Where the CA certificates that vouch for the server come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RootCert {
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's trusted CAs (as libpq 16).
    System,
}

impl fmt::Display for RootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootCert::File(p) => write!(f, "{}", p.display()),
            RootCert::System => f.write_str("system"),
        }
    }
}

/// What of the server's certificate a connection checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Nothing (`prefer`, `require` without a root certificate): encrypted, not authenticated.
    Nothing,
    /// The chain up to a CA of `sslrootcert`, not the host name.
    Chain,
    /// The chain and the host name (IP address SAN when the host is an address).
    ChainAndHost,
}

/// The TLS settings of `DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatabaseTls {
    /// `sslmode`; `prefer` when not given, as libpq.
    pub mode: SslMode,
    /// `sslrootcert`, or `~/.postgresql/root.crt` when not given and that file exists (libpq's
    /// default).
    pub root_cert: Option<RootCert>,
    /// `sslcert`: the client certificate (PEM, the chain after the leaf), sent when asked.
    pub client_cert: Option<PathBuf>,
    /// `sslkey`: the client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<PathBuf>,
}

impl Default for DatabaseTls {
    fn default() -> Self {
        DatabaseTls {
            mode: SslMode::Prefer,
            root_cert: None,
            client_cert: None,
            client_key: None,
        }
    }
}

/// The certificates and key named by a [`DatabaseTls`], read and decoded.
#[derive(Debug)]
pub struct TlsFiles {
    /// The CAs to verify the server with (`None` when nothing is verified).
    pub roots: Option<Vec<CertificateDer<'static>>>,
    /// The client certificate chain and its key.
    pub client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

impl DatabaseTls {
    /// What a connection checks: libpq's rule, `require` with a root certificate is `verify-ca`.
    pub fn verify(&self) -> Verify {
        match self.mode {
            SslMode::VerifyFull => Verify::ChainAndHost,
            SslMode::VerifyCa => Verify::Chain,
            SslMode::Require if self.root_cert.is_some() => Verify::Chain,
            _ => Verify::Nothing,
        }
    }

    /// The mode as tokio-postgres knows it: whether TLS is tried and whether it is required.
    pub fn pg_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self.mode {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }

    /// The setting that names the CAs, for messages: `sslrootcert=/etc/ca.pem`.
    pub fn root_cert_setting(&self) -> String {
        match &self.root_cert {
            Some(r) => format!("sslrootcert={r}"),
            None => "sslrootcert (not set)".to_string(),
        }
    }

    /// Reads and decodes the files: the CAs only when the mode verifies, the client
    /// certificate whenever given. Errors name the setting, the file and the cause.
    pub fn load(&self) -> Result<TlsFiles, String> {
        let roots = match (self.verify(), &self.root_cert) {
            (Verify::Nothing, _) | (_, None) => None,
            (_, Some(RootCert::System)) => Some(system_roots()?),
            (_, Some(RootCert::File(path))) => Some(read_certs("sslrootcert", path)?),
        };
        if roots.is_none() && self.verify() != Verify::Nothing {
            return Err(format!(
                "sslmode={} needs sslrootcert: a PEM file of the CA that signed the server's \
                 certificate, or sslrootcert=system for the system's CAs",
                self.mode
            ));
        }
        let client = match (&self.client_cert, &self.client_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((read_certs("sslcert", cert)?, read_key(key)?)),
            (Some(_), None) => return Err("sslcert is set but sslkey is not: set both".into()),
            (None, Some(_)) => return Err("sslkey is set but sslcert is not: set both".into()),
        };
        Ok(TlsFiles { roots, client })
    }
}

/// The libpq names this module takes out of the connection string.
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits a `postgres://` URL or libpq `key=value` string into the tokio-postgres settings and
/// the TLS settings, and checks both (the TLS files are read). The error says what is wrong
/// without repeating the string (it may hold a password).
pub fn parse_database_url(s: &str) -> Result<(tokio_postgres::Config, DatabaseTls), String> {
    let (rest, params) = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        split_url(s)?
    } else {
        split_key_values(s)?
    };
    let mut pg = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| format!("not a PostgreSQL connection URL ({e})"))?;
    let mut tls = DatabaseTls::default();
    for (key, value) in params {
        match key.as_str() {
            "sslmode" => tls.mode = value.parse()?,
            "sslrootcert" if value == "system" => tls.root_cert = Some(RootCert::System),
            "sslrootcert" => tls.root_cert = Some(RootCert::File(non_empty_path(&key, &value)?)),
            "sslcert" => tls.client_cert = Some(non_empty_path(&key, &value)?),
            _ => tls.client_key = Some(non_empty_path(&key, &value)?),
        }
    }
    if tls.root_cert.is_none() {
        tls.root_cert = default_root_cert().map(RootCert::File);
    }
    if tls.mode == SslMode::Disable && tls.root_cert.is_some() {
        // Nothing to verify; keeps `config` output honest.
        tls.root_cert = None;
    }
    pg.ssl_mode(tls.pg_mode());
    tls.load()?;
    Ok((pg, tls))
}

fn non_empty_path(key: &str, value: &str) -> Result<PathBuf, String> {
    if value.is_empty() {
        return Err(format!("{key} is empty: name a PEM file"));
    }
    Ok(PathBuf::from(value))
}

/// libpq's default CA file, `~/.postgresql/root.crt`, when it exists.
fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql").join("root.crt");
    path.is_file().then_some(path)
}

/// A URL's query without the TLS parameters, and those parameters decoded.
type Split = (String, Vec<(String, String)>);

fn split_url(s: &str) -> Result<Split, String> {
    let Some((base, query)) = s.split_once('?') else {
        return Ok((s.to_string(), Vec::new()));
    };
    let mut kept = Vec::new();
    let mut tls = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k)?;
        if TLS_KEYS.contains(&key.as_str()) {
            tls.push((key, decode(v)?));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, tls))
}

fn decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| "a URL parameter is not UTF-8 once percent-decoded".to_string())
}

/// libpq `key = value` pairs ([`super::libpq`]): the TLS ones are taken out, the others written
/// back quoted, which tokio-postgres reads the same.
fn split_key_values(s: &str) -> Result<Split, String> {
    let mut kept = Vec::new();
    let mut tls = Vec::new();
    for super::libpq::Pair { key, value } in super::libpq::pairs(s) {
        let Some(value) = value else {
            return Err(format!("{key:?} has no `=value`"));
        };
        if !value.closed {
            return Err(format!("the value of {key} has no closing quote"));
        }
        if TLS_KEYS.contains(&key.as_str()) {
            tls.push((key, value.text));
        } else {
            let quoted = value.text.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{key}='{quoted}'"));
        }
    }
    Ok((kept.join(" "), tls))
}

fn read_pem(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{setting}={}: cannot read it: {e}", path.display()))
}

fn read_certs(setting: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{setting}={}: not a PEM file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{setting}={}: no certificate in it (expected PEM `BEGIN CERTIFICATE` blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_pem("sslkey", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "sslkey={}: no private key in it (expected PEM PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        )
    })
}

fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(format!(
            "sslrootcert=system: no CA certificates found in the system's store{why}"
        ));
    }
    Ok(found.certs)
}

#[cfg(test)]
mod tests;
