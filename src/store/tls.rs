//! TLS to PostgreSQL: the one connector every connection of a node uses (the pool, dedicated
//! connections, the LISTEN connection, migrations, the bench harness).
//!
//! It is tokio-postgres-rustls's connector (rustls with the ring provider) with a server
//! certificate verifier chosen by `sslmode`, as libpq: `prefer` and `require` accept any
//! certificate (encrypted, not authenticated), `verify-ca` checks the chain against
//! `sslrootcert`, `verify-full` the chain and the host name. A failed handshake is reported
//! in words that name the setting and the cause ([`HandshakeError`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{ConfigError, DatabaseTls, SslMode, TlsFiles, Verify};
use crate::error::{Error, Result};

/// The connector of every database connection: TLS as `DATABASE_URL`'s `sslmode` says.
#[derive(Clone)]
pub struct PgTls {
    inner: MakeRustlsConnect,
    context: Arc<Context>,
}

/// What an error message needs to name the settings involved.
#[derive(Debug)]
struct Context {
    mode: SslMode,
    root_cert: String,
}

impl PgTls {
    /// Builds the connector from the TLS settings and their files (read by the config layer).
    pub fn new(tls: &DatabaseTls, files: TlsFiles) -> Result<PgTls> {
        // rustls deprecates ring's provider for lacking post-quantum key exchange; aws-lc-rs has
        // it but needs cmake to build. The classical groups (X25519, P-256, P-384) remain,
        // which every PostgreSQL server accepts.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verify = tls.verify();
        let verifier: Arc<dyn ServerCertVerifier> = match (verify, files.roots) {
            (Verify::Nothing, _) => Arc::new(AnyCertificate(provider.clone())),
            // `DatabaseTls::load` refuses this already; never fall back to no verification.
            (_, None) => {
                return Err(config_error(format!(
                    "sslmode={} needs sslrootcert",
                    tls.mode
                )))
            }
            (verify, Some(roots)) => {
                let mut store = RootCertStore::empty();
                let (_, unusable) = store.add_parsable_certificates(roots);
                if store.is_empty() {
                    return Err(config_error(format!(
                        "{}: none of its {unusable} certificates can be used as a CA",
                        tls.root_cert_setting()
                    )));
                }
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                        .build()
                        .map_err(|e| config_error(format!("{}: {e}", tls.root_cert_setting())))?;
                if verify == Verify::ChainAndHost {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(format!("TLS protocol versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match files.client {
            None => builder.with_no_client_auth(),
            Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| {
                config_error(format!(
                    "sslcert and sslkey cannot be used together: {e} (is sslkey the key of \
                     sslcert?)"
                ))
            })?,
        };
        Ok(PgTls {
            inner: MakeRustlsConnect::new(config),
            context: Arc::new(Context {
                mode: tls.mode,
                root_cert: tls.root_cert_setting(),
            }),
        })
    }
}

fn config_error(reason: String) -> Error {
    Error::Config(ConfigError::Inconsistent(format!("DATABASE_URL: {reason}")))
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = Connect<<MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect>;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(
        &mut self,
        host: &str,
    ) -> std::result::Result<Self::TlsConnect, Self::Error> {
        Ok(Connect {
            inner: MakeTlsConnect::<S>::make_tls_connect(&mut self.inner, host)?,
            host: host.to_string(),
            context: self.context.clone(),
        })
    }
}

/// One TLS handshake, its failure explained ([`HandshakeError`]).
pub struct Connect<T> {
    inner: T,
    host: String,
    context: Arc<Context>,
}

impl<S, T> TlsConnect<S> for Connect<T>
where
    T: TlsConnect<S>,
    T::Future: Send + 'static,
{
    type Stream = T::Stream;
    type Error = HandshakeError;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<T::Stream, HandshakeError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let Connect {
            inner,
            host,
            context,
        } = self;
        let handshake = inner.connect(stream);
        Box::pin(async move {
            handshake
                .await
                .map_err(|e| HandshakeError::new(&context, &host, e.into()))
        })
    }
}

/// A TLS handshake with the database server that failed, in words that name the `sslmode`
/// and the cause: an unknown CA, a host name the certificate does not cover, an alert from
/// the server.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandshakeError {
    message: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl HandshakeError {
    fn new(
        context: &Context,
        host: &str,
        source: Box<dyn std::error::Error + Send + Sync>,
    ) -> HandshakeError {
        let mode = format!("sslmode={}", context.mode);
        let rustls_error = source
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let message = match rustls_error {
            Some(rustls::Error::InvalidCertificate(c)) => match c {
                CertificateError::UnknownIssuer => format!(
                    "{mode}: the server certificate is not signed by a CA in {} (UnknownIssuer)",
                    context.root_cert
                ),
                CertificateError::NotValidForName => format!(
                    "{mode}: the server certificate is not valid for host {host} (NotValidForName)"
                ),
                CertificateError::NotValidForNameContext { presented, .. } => format!(
                    "{mode}: the server certificate is not valid for host {host}; it names {} \
                     (NotValidForName)",
                    presented
                        .iter()
                        .map(|n| plain_name(n))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                other => format!("{mode}: the server certificate was refused: {other:?}"),
            },
            Some(rustls::Error::AlertReceived(alert)) => format!(
                "{mode}: the server ended the TLS handshake with alert {alert:?} (does it want \
                 a client certificate, sslcert and sslkey?)"
            ),
            Some(other) => format!("{mode}: TLS handshake with {host} failed: {other}"),
            None => format!("{mode}: TLS handshake with {host} failed: {source}"),
        };
        HandshakeError { message, source }
    }
}

/// `pg.test` for rustls's `DnsName("pg.test")`, `10.0.0.1` for `IpAddress(10.0.0.1)`.
fn plain_name(presented: &str) -> &str {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            presented
                .strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(presented)
}

/// The explanation of a TLS failure behind a database error, if that is what it was: the
/// [`HandshakeError`]'s text, or that the server does not support TLS while `mode` requires it.
pub fn tls_failure(e: &Error, mode: SslMode) -> Option<String> {
    let driver = match e.root() {
        Error::Db(pg) => pg,
        Error::Pool(deadpool_postgres::PoolError::Backend(pg)) => pg,
        _ => return None,
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(driver);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<HandshakeError>() {
            return Some(h.to_string());
        }
        // tokio-postgres's words when the server answers the TLS request with "no".
        if err.to_string() == "server does not support TLS" {
            return Some(format!(
                "sslmode={mode} but the server does not support TLS (turn `ssl` on in its \
                 postgresql.conf)"
            ));
        }
        cur = err.source();
    }
    None
}

/// `prefer`, `require`: encrypted, but any certificate is accepted (libpq does the same).
/// The handshake signatures are still checked, so the server holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: webpki's checks except the host name. webpki checks the chain (and validity
/// dates) before the name, so a name error means everything else passed.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
