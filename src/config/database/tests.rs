//! The TLS settings of `DATABASE_URL`: every `sslmode`, both syntaxes, the files.

use std::io::Write;

use tokio_postgres::config::SslMode as Pg;

use super::*;

/// A self-signed certificate and its key, in PEM.
fn cert_and_key() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["db".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    (cert.pem(), key.serialize_pem())
}

fn pem_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write");
    f
}

fn parse(s: &str) -> Result<(tokio_postgres::Config, DatabaseTls), String> {
    parse_database_url(s)
}

#[test]
fn without_sslmode_the_mode_is_libpqs_default_prefer() {
    let (pg, tls) = parse("postgres://u@db:5432/x").unwrap();
    assert_eq!(tls.mode, SslMode::Prefer);
    assert_eq!(pg.get_ssl_mode(), Pg::Prefer);
    assert_eq!(tls.verify(), Verify::Nothing);
}

#[test]
fn every_sslmode_is_read_and_told_to_tokio_postgres() {
    let ca = pem_file(&cert_and_key().0);
    let ca = ca.path().display().to_string();
    for (mode, want, pg_mode, verify) in [
        ("disable", SslMode::Disable, Pg::Disable, Verify::Nothing),
        ("allow", SslMode::Prefer, Pg::Prefer, Verify::Nothing),
        ("prefer", SslMode::Prefer, Pg::Prefer, Verify::Nothing),
        ("require", SslMode::Require, Pg::Require, Verify::Nothing),
        ("verify-ca", SslMode::VerifyCa, Pg::Require, Verify::Chain),
        (
            "verify-full",
            SslMode::VerifyFull,
            Pg::Require,
            Verify::ChainAndHost,
        ),
    ] {
        let root = if verify == Verify::Nothing {
            String::new()
        } else {
            format!("&sslrootcert={ca}")
        };
        let (pg, tls) = parse(&format!("postgres://u@db/x?sslmode={mode}{root}"))
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(tls.mode, want, "{mode}");
        assert_eq!(pg.get_ssl_mode(), pg_mode, "{mode}");
        assert_eq!(tls.verify(), verify, "{mode}");
    }
}

#[test]
fn an_unknown_sslmode_is_refused_naming_the_setting_and_the_choices() {
    let e = parse("postgres://u:pw1@db/x?sslmode=verify_full").unwrap_err();
    assert!(e.contains("sslmode=\"verify_full\""), "{e}");
    assert!(e.contains("verify-full"), "{e}");
    assert!(!e.contains("pw1"), "{e}");
    let e = parse("host=db sslmode=strict").unwrap_err();
    assert!(e.contains("sslmode=\"strict\""), "{e}");
}

#[test]
fn require_with_a_root_certificate_verifies_the_chain_as_libpq() {
    let ca = pem_file(&cert_and_key().0);
    let url = format!(
        "postgres://u@db/x?sslmode=require&sslrootcert={}",
        ca.path().display()
    );
    let (_, tls) = parse(&url).unwrap();
    assert_eq!(tls.verify(), Verify::Chain);
}

#[test]
fn verifying_modes_need_a_root_certificate() {
    // Unless ~/.postgresql/root.crt exists (libpq's default), which a test cannot rule out.
    if default_root_cert().is_some() {
        return;
    }
    for mode in ["verify-ca", "verify-full"] {
        let e = parse(&format!("postgres://u@db/x?sslmode={mode}")).unwrap_err();
        assert!(
            e.contains(&format!("sslmode={mode} needs sslrootcert")),
            "{e}"
        );
    }
}

#[test]
fn a_missing_or_unreadable_file_is_refused_naming_the_setting_and_the_file() {
    let url = "postgres://u@db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem";
    let e = parse(url).unwrap_err();
    assert!(
        e.starts_with("sslrootcert=/nonexistent/ca.pem: cannot read it"),
        "{e}"
    );

    let not_pem = pem_file("hello\n");
    let url = format!(
        "postgres://u@db/x?sslmode=verify-ca&sslrootcert={}",
        not_pem.path().display()
    );
    let e = parse(&url).unwrap_err();
    assert!(e.contains("no certificate in it"), "{e}");

    let cert = pem_file(&cert_and_key().0);
    let url = format!(
        "postgres://u@db/x?sslcert={}&sslkey=/nonexistent/key.pem",
        cert.path().display()
    );
    let e = parse(&url).unwrap_err();
    assert!(
        e.starts_with("sslkey=/nonexistent/key.pem: cannot read it"),
        "{e}"
    );

    let e = parse(&format!(
        "postgres://u@db/x?sslcert={}",
        cert.path().display()
    ))
    .unwrap_err();
    assert!(e.contains("sslcert is set but sslkey is not"), "{e}");

    let e = parse(&format!(
        "postgres://u@db/x?sslkey={}",
        not_pem.path().display()
    ))
    .unwrap_err();
    assert!(e.contains("sslkey is set but sslcert is not"), "{e}");

    let e = parse(&format!(
        "postgres://u@db/x?sslcert={0}&sslkey={0}",
        cert.path().display()
    ))
    .unwrap_err();
    assert!(e.contains("sslkey=") && e.contains("no private key"), "{e}");
}

#[test]
fn the_tls_parameters_are_taken_out_and_the_others_kept() {
    let ca = pem_file(&cert_and_key().0);
    let path = ca.path().display().to_string();
    let url = format!(
        "postgres://u:p%40ss@db:5433/x?application_name=a&sslmode=verify-full&sslrootcert={}&connect_timeout=7",
        path.replace('/', "%2F")
    );
    let (pg, tls) = parse(&url).unwrap();
    assert_eq!(tls.root_cert, Some(RootCert::File(path.clone().into())));
    assert_eq!(pg.get_application_name(), Some("a"));
    assert_eq!(pg.get_password(), Some(&b"p@ss"[..]));
    assert_eq!(
        pg.get_connect_timeout(),
        Some(&std::time::Duration::from_secs(7))
    );
    assert_eq!(pg.get_ports(), &[5433]);

    let kv = format!(
        "host=db port = 5433 user=u password='p w\\'x' sslmode = 'verify-ca' sslrootcert='{path}' dbname=x"
    );
    let (pg, tls) = parse(&kv).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tls.mode, SslMode::VerifyCa);
    assert_eq!(tls.root_cert, Some(RootCert::File(path.into())));
    assert_eq!(pg.get_dbname(), Some("x"));
    assert_eq!(pg.get_user(), Some("u"));
    assert_eq!(pg.get_ssl_mode(), Pg::Require);
}

#[test]
fn sslrootcert_system_means_the_system_cas() {
    match parse("postgres://u@db/x?sslmode=verify-full&sslrootcert=system") {
        Ok((_, tls)) => assert_eq!(tls.root_cert, Some(RootCert::System)),
        // A machine without a CA store: the error says which setting could not be honoured.
        Err(e) => assert!(
            e.starts_with("sslrootcert=system: no CA certificates"),
            "{e}"
        ),
    }
}

#[test]
fn a_client_certificate_and_key_are_read() {
    let (cert, key) = cert_and_key();
    let (cert, key) = (pem_file(&cert), pem_file(&key));
    let url = format!(
        "postgres://u@db/x?sslmode=require&sslcert={}&sslkey={}",
        cert.path().display(),
        key.path().display()
    );
    let (_, tls) = parse(&url).unwrap();
    let files = tls.load().unwrap();
    assert!(files.client.is_some() && files.roots.is_none());
}

#[test]
fn an_empty_file_setting_is_refused() {
    let e = parse("postgres://u@db/x?sslrootcert=").unwrap_err();
    assert!(e.contains("sslrootcert is empty"), "{e}");
}
