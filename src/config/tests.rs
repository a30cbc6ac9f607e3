//! Unit tests of the configuration: defaults, every value parser through `from_sources`, the
//! file and environment layering, and secret masking.

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
    assert_eq!(c.cache.opt_max_bytes, Some(256 << 20));
    assert_eq!(c.cache.fhir_connect_max_bytes, Some(256 << 20));
    assert_eq!(c.cache.tenant_max_entries, Some(10_000));
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
        ("OPENFHIR_CACHE_OPT_MAX_BYTES", "1000"),
        ("OPENFHIR_CACHE_FHIR_CONNECT_MAX_BYTES", "-2"),
        ("OPENFHIR_CACHE_TENANT_MAX_ENTRIES", "0"),
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
        e.contains("CLUSTER_SECRET") && e.contains("at least 16") && !e.contains("short-secret"),
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

#[test]
fn cache_bounds_take_minus_one_for_none() {
    let c = with(&[
        ("OPENFHIR_CACHE_OPT_MAX_BYTES", "-1"),
        ("OPENFHIR_CACHE_FHIR_CONNECT_MAX_BYTES", "1048576"),
        ("OPENFHIR_CACHE_TENANT_MAX_ENTRIES", "3"),
    ])
    .unwrap();
    assert_eq!(c.cache.opt_max_bytes, None);
    assert_eq!(c.cache.fhir_connect_max_bytes, Some(1 << 20));
    assert_eq!(c.cache.tenant_max_entries, Some(3));
    let e = with(&[("OPENFHIR_CACHE_OPT_MAX_BYTES", "1000")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 1048576"), "{e}");
}

#[test]
fn the_multicast_group_follows_the_bind_address_family_unless_set() {
    let group = |vars: &[(&str, &str)]| with(vars).unwrap().cluster.multicast_addr.to_string();
    // IPv4 bind addresses: the IPv4 group, as always.
    assert_eq!(group(&[]), "239.255.78.0:45588");
    for bind in ["0.0.0.0", "10.1.2.3", "127.0.0.2"] {
        assert_eq!(
            group(&[("CLUSTER_BIND_ADDR", bind)]),
            DEFAULT_MULTICAST_V4,
            "{bind}"
        );
    }
    // IPv6 bind addresses, with no group set: the IPv6 site-local group, same port.
    for bind in ["::", "fd00::2", "::1", "2001:db8::7"] {
        assert_eq!(
            group(&[("CLUSTER_BIND_ADDR", bind)]),
            "[ff15::78]:45588",
            "{bind}"
        );
    }
    // A group that is set wins, whatever the bind address, also when it equals the default.
    for (bind, set) in [
        ("::", "239.255.78.0:45588"),
        ("::", "239.255.1.2:5000"),
        ("0.0.0.0", "[ff15::78]:45588"),
        ("fd00::2", "[ff02::1234]:6000"),
    ] {
        assert_eq!(
            group(&[("CLUSTER_BIND_ADDR", bind), ("CLUSTER_MULTICAST_ADDR", set)]),
            set,
            "{bind} {set}"
        );
    }
    // The same rule when the group comes from the file.
    let dir = std::env::temp_dir().join(format!("ofc-config-mc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("openfhir-cache.toml");
    std::fs::write(&path, "[cluster]\nbind_addr = \"::\"\n").unwrap();
    let c = Config::from_sources(Some(&path), |_| None).unwrap();
    assert_eq!(c.cluster.multicast_addr.to_string(), DEFAULT_MULTICAST_V6);
    std::fs::write(
        &path,
        "[cluster]\nbind_addr = \"::\"\nmulticast_addr = \"239.255.78.0:45588\"\n",
    )
    .unwrap();
    let c = Config::from_sources(Some(&path), |_| None).unwrap();
    assert_eq!(c.cluster.multicast_addr.to_string(), DEFAULT_MULTICAST_V4);
    std::fs::remove_dir_all(&dir).unwrap();
    // Not multicast, or no port: refused with the variable named.
    for bad in ["[fd00::1]:45588", "[ff15::78]:0", "ff15::78", "[ff15::78]"] {
        let e = with(&[("CLUSTER_MULTICAST_ADDR", bad)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CLUSTER_MULTICAST_ADDR"), "{bad}: {e}");
    }
    assert_eq!(
        multicast_group(None, "::".parse().unwrap()).to_string(),
        DEFAULT_MULTICAST_V6
    );
    assert_eq!(
        multicast_group(None, "0.0.0.0".parse().unwrap()).to_string(),
        DEFAULT_MULTICAST_V4
    );
}
