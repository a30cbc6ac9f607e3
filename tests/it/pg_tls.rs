//! PostgreSQL over TLS: a private server with `ssl = on` that accepts only TLS connections,
//! certificates from a test CA made here (rcgen), and nodes configured with libpq's
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in `DATABASE_URL`.

use std::path::PathBuf;

use crate::common;
use crate::common::pg::{write_server_file, PrivateServer, TestDb};
use openfhir_cache::app::{self, ServeOptions};
use openfhir_cache::config::parse_database_url;
use openfhir_cache::store::tls::PgTls;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The password of the `app` role (SCRAM authentication over TLS).
const APP_PASSWORD: &str = "tls-test-pw-7f3a";

/// A certificate authority made for one test.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate (PEM) and its key (PEM) for `names` (DNS names or IP addresses),
    /// with common name `cn`.
    fn issue(
        &self,
        cn: &str,
        names: &[&str],
        purpose: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![purpose];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// A private PostgreSQL that accepts only TLS, with its CA's files in a client directory.
struct TlsServer {
    server: PrivateServer,
    /// Where the client-side files are: `ca.pem`, `other-ca.pem`, `client.pem`, `client.key`.
    files: tempfile::TempDir,
}

impl TlsServer {
    /// The server's certificate names `127.0.0.1` and `pg.test` (not `localhost`). Roles:
    /// `postgres` (trust over TLS), `app` (SCRAM password), `certuser` (client certificate).
    fn start() -> TlsServer {
        let ca = Ca::new("openfhir-cache test CA");
        let (server_cert, server_key) = ca.issue(
            "pg.test",
            &["127.0.0.1", "pg.test"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let ca_pem = ca.pem.clone();
        let server = PrivateServer::with_setup(|data| {
            write_server_file(&data.join("server.crt"), server_cert.as_bytes(), 0o644);
            write_server_file(&data.join("server.key"), server_key.as_bytes(), 0o600);
            write_server_file(&data.join("root.crt"), ca_pem.as_bytes(), 0o644);
            let conf = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
            let conf = format!(
                "{conf}\n# pg_tls test\nssl = on\nssl_cert_file = 'server.crt'\n\
                 ssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n\
                 password_encryption = 'scram-sha-256'\n"
            );
            write_server_file(&data.join("postgresql.conf"), conf.as_bytes(), 0o600);
            // First match wins: TLS only, and each role with its own method.
            let hba = "hostssl all certuser 127.0.0.1/32 cert\n\
                       hostssl all app 127.0.0.1/32 scram-sha-256\n\
                       hostssl all all 127.0.0.1/32 trust\n\
                       hostnossl all all 0.0.0.0/0 reject\n";
            write_server_file(&data.join("pg_hba.conf"), hba.as_bytes(), 0o600);
        });
        let files = tempfile::tempdir().expect("temp dir");
        std::fs::write(files.path().join("ca.pem"), &ca.pem).expect("ca.pem");
        let other = Ca::new("some other CA");
        std::fs::write(files.path().join("other-ca.pem"), &other.pem).expect("other-ca.pem");
        let (client_cert, client_key) =
            ca.issue("certuser", &[], ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(files.path().join("client.pem"), client_cert).expect("client.pem");
        std::fs::write(files.path().join("client.key"), client_key).expect("client.key");
        TlsServer { server, files }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.files.path().join(name)
    }

    /// `postgres://USER@127.0.0.1:PORT/DB?QUERY`.
    fn url(&self, user: &str, db: &str, query: &str) -> String {
        format!(
            "postgres://{user}@127.0.0.1:{}/{db}?{query}",
            self.server.port()
        )
    }

    /// `sslmode=verify-full&sslrootcert=<the right CA>`.
    fn verify_full(&self) -> String {
        format!(
            "sslmode=verify-full&sslrootcert={}",
            self.file("ca.pem").display()
        )
    }

    /// Waits until the server answers over TLS, creates the roles and a database for the
    /// test owned by `app`; returns its name.
    async fn prepare(&self, db: &str) -> String {
        let admin = self.url("postgres", "postgres", &self.verify_full());
        let mut last = String::new();
        for _ in 0..100 {
            match sql(&admin).await {
                Ok(c) => {
                    c.batch_execute(&format!(
                        "CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'; \
                         CREATE ROLE certuser LOGIN"
                    ))
                    .await
                    .expect("roles");
                    // Not in the same batch: CREATE DATABASE refuses a transaction block.
                    c.batch_execute(&format!("CREATE DATABASE {db} OWNER app"))
                        .await
                        .expect("database");
                    return db.to_string();
                }
                Err(e) => last = e,
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!(
            "the TLS test server does not answer: {last}\n{}",
            self.server.log_tail()
        );
    }
}

/// A SQL connection made exactly as a node makes its own (same parser, same connector).
async fn sql(url: &str) -> Result<tokio_postgres::Client, String> {
    let (pg, tls) = parse_database_url(url)?;
    let files = tls.load()?;
    let connector = PgTls::new(&tls, files).map_err(|e| e.to_string())?;
    let (client, conn) = pg.connect(connector).await.map_err(|e| chain(&e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// An error and all its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        text = format!("{text}: {s}");
        src = s.source();
    }
    text
}

/// Starts a node on `url` (panics with the error if it does not start).
async fn start_node(url: &str) -> common::TestApp {
    common::spawn_url(url, &[]).await
}

/// The error a node started on `url` stops with (panics if it starts).
async fn node_refused(url: &str) -> String {
    match app::start(common::test_config(url, &[]), ServeOptions::default()).await {
        Ok(running) => {
            let _ = running.shutdown().await;
            panic!("the node started on {url}")
        }
        Err(e) => e.to_string(),
    }
}

/// The node's backends, by `application_name`, and whether each one is encrypted.
async fn node_backends(admin: &tokio_postgres::Client, node_id: &str) -> Vec<(String, bool)> {
    admin
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a \
             USING (pid) WHERE a.application_name LIKE $1 ORDER BY 1",
            &[&format!("openfhir-cache/{node_id}%")],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn a_node_runs_against_a_tls_only_server_with_verify_full() {
    let tls = TlsServer::start();
    let db = tls.prepare("ofc_tls_full").await;
    let url = tls.url("postgres", &db, &tls.verify_full());
    let app = start_node(&url).await;

    let xml = common::opt_xml("tls_opt", "over-tls");
    assert_eq!(app.put_opt("tls_opt", &xml).await, 200);
    assert_eq!(app.get_text("/opt/tls_opt").await, xml);
    let ready = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // Every connection of the node is encrypted, the LISTEN one included.
    let admin = sql(&tls.url("postgres", "postgres", &tls.verify_full()))
        .await
        .expect("admin connection");
    let listener = openfhir_cache::invalidation::listener_application_name(app.node.id());
    let mut backends = Vec::new();
    for _ in 0..100 {
        backends = node_backends(&admin, app.node.id()).await;
        if backends.iter().any(|(name, _)| *name == listener) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        backends.iter().any(|(name, _)| *name == listener),
        "no listener backend among {backends:?}"
    );
    assert!(backends.len() >= 2, "pool and listener: {backends:?}");
    assert!(backends.iter().all(|(_, ssl)| *ssl), "{backends:?}");

    // A host name the certificate names works as well as its IP address.
    let by_name = format!(
        "postgres://postgres@pg.test:{}/{db}?hostaddr=127.0.0.1&{}",
        tls.server.port(),
        tls.verify_full()
    );
    sql(&by_name).await.expect("verify-full by host name");
    app.stop().await;
}

#[tokio::test]
async fn wrong_ca_wrong_host_and_no_tls_are_refused_with_clear_errors() {
    let tls = TlsServer::start();
    let db = tls.prepare("ofc_tls_refused").await;

    // A CA that did not sign the server's certificate.
    let other = tls.file("other-ca.pem");
    let url = tls.url(
        "postgres",
        &db,
        &format!("sslmode=verify-full&sslrootcert={}", other.display()),
    );
    let e = node_refused(&url).await;
    let want = format!(
        "sslmode=verify-full: the server certificate is not signed by a CA in sslrootcert={} \
         (UnknownIssuer)",
        other.display()
    );
    assert!(e.contains(&want), "{e}");
    assert!(e.contains("Check sslmode, sslrootcert"), "{e}");
    // verify-ca checks the chain too.
    let url = tls.url(
        "postgres",
        &db,
        &format!("sslmode=verify-ca&sslrootcert={}", other.display()),
    );
    let e = sql(&url).await.expect_err("verify-ca with a wrong CA");
    assert!(
        e.contains("sslmode=verify-ca: the server certificate is not signed"),
        "{e}"
    );

    // A host name the certificate does not name (it names 127.0.0.1 and pg.test).
    let url = format!(
        "postgres://postgres@localhost:{}/{db}?hostaddr=127.0.0.1&{}",
        tls.server.port(),
        tls.verify_full()
    );
    let e = node_refused(&url).await;
    assert!(
        e.contains(
            "sslmode=verify-full: the server certificate is not valid for host localhost; it \
             names 127.0.0.1, pg.test"
        ),
        "{e}"
    );
    // verify-ca does not check the name: the same connection works.
    let url = format!(
        "postgres://postgres@localhost:{}/{db}?hostaddr=127.0.0.1&sslmode=verify-ca&sslrootcert={}",
        tls.server.port(),
        tls.file("ca.pem").display()
    );
    sql(&url).await.expect("verify-ca ignores the host name");

    // Without TLS the server refuses, and says why.
    let url = tls.url("postgres", &db, "sslmode=disable");
    let e = node_refused(&url).await;
    assert!(e.contains("no encryption"), "{e}");
    assert!(e.contains("accepts only TLS connections"), "{e}");
}

#[tokio::test]
async fn require_needs_no_ca_and_scram_passwords_work_over_tls() {
    let tls = TlsServer::start();
    let db = tls.prepare("ofc_tls_require").await;
    let url = format!(
        "postgres://app:{APP_PASSWORD}@127.0.0.1:{}/{db}?sslmode=require&channel_binding=require",
        tls.server.port()
    );
    let app = start_node(&url).await;
    let xml = common::opt_xml("tls_require", "scram");
    assert_eq!(app.put_opt("tls_require", &xml).await, 200);
    assert_eq!(app.get_text("/opt/tls_require").await, xml);
    app.stop().await;

    // The password is checked (SCRAM, as pg_hba.conf says for `app`), and `channel_binding=require`
    // above held: SCRAM-SHA-256-PLUS, bound to this TLS connection.
    let client = sql(&url).await.expect("app connects");
    let user: String = client
        .query_one(
            "SELECT a.usename::text FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE pid = pg_backend_pid() AND s.ssl",
            &[],
        )
        .await
        .expect("own backend is encrypted")
        .get(0);
    assert_eq!(user, "app");
    let wrong = format!(
        "postgres://app:not-the-password@127.0.0.1:{}/{db}?sslmode=require",
        tls.server.port()
    );
    let e = sql(&wrong).await.expect_err("a wrong password is refused");
    assert!(e.contains("password authentication failed"), "{e}");
}

#[tokio::test]
async fn a_client_certificate_logs_in_with_sslcert_and_sslkey() {
    let tls = TlsServer::start();
    let db = tls.prepare("ofc_tls_cert").await;
    let query = format!(
        "{}&sslcert={}&sslkey={}",
        tls.verify_full(),
        tls.file("client.pem").display(),
        tls.file("client.key").display()
    );
    let client = sql(&tls.url("certuser", &db, &query))
        .await
        .expect("certificate login");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "certuser");

    // Without a certificate the server refuses the login.
    let e = sql(&tls.url("certuser", &db, &tls.verify_full()))
        .await
        .expect_err("no certificate, no login");
    assert!(e.contains("certificate"), "{e}");
}

#[tokio::test]
async fn require_against_a_server_without_tls_is_refused() {
    // The shared test server has no TLS.
    let db = TestDb::new().await;
    if common::pg::using_external_server() {
        return;
    }
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}sslmode=require", db.url);
    let e = node_refused(&url).await;
    assert!(
        e.contains("sslmode=require but the server does not support TLS"),
        "{e}"
    );
    // prefer (libpq's default) falls back to a plain connection.
    let url = format!("{}{sep}sslmode=prefer", db.url);
    sql(&url).await.expect("prefer falls back to plain");
}

#[tokio::test]
async fn readiness_names_the_tls_failure_when_the_server_certificate_changes() {
    let tls = TlsServer::start();
    let db = tls.prepare("ofc_tls_ready").await;
    let app = start_node(&tls.url("postgres", &db, &tls.verify_full())).await;
    let ready = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // Made before the change: afterwards nothing verifies against the test CA.
    let admin = sql(&tls.url("postgres", "postgres", &tls.verify_full()))
        .await
        .expect("admin connection");
    // The server now presents a certificate of a CA the node does not trust ...
    let other = Ca::new("a CA the node does not trust");
    let (cert, key) = other.issue(
        "pg.test",
        &["127.0.0.1", "pg.test"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let data = tls.server.data_dir();
    write_server_file(&data.join("server.crt"), cert.as_bytes(), 0o644);
    write_server_file(&data.join("server.key"), key.as_bytes(), 0o600);
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    // ... and the node's connections are gone, so it must make new ones.
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1",
            &[&format!("openfhir-cache/{}%", app.node.id())],
        )
        .await
        .expect("terminate the node's backends");

    let (refused, body) = app
        .eventually("/health/ready", |status, body| {
            status == 503 && body.contains("UnknownIssuer")
        })
        .await;
    assert!(refused, "readiness did not name the TLS failure: {body}");
    assert!(
        body.contains(
            "sslmode=verify-full: the server certificate is not signed by a CA in sslrootcert="
        ),
        "{body}"
    );
    app.abort();
}
