//! Keeps the deployment files honest: `docker/Dockerfile`, `docker/compose*.yml` and `k8s/*.yaml`.
//!
//! Every file is parsed as YAML (all documents, merge keys applied). Every environment a file gives
//! a node must use only variables the node reads (`config::VARS`, plus `RUST_LOG`) and must pass
//! `Config::from_sources`, which is what `openfhir-cache config` and `serve` run: a misspelled
//! name would be ignored silently by the node, and a bad value would stop it at startup. The
//! structure the HA contract asks for (PostgreSQL healthy before the nodes, a headless Service
//! that publishes not-ready pods, RBAC on pods and endpoints, probes on routes that exist, ...) is
//! checked too. No database, no Docker, no cluster needed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use openfhir_cache::config::{Config, Discovery, VARS};
use serde::Deserialize;
use serde_norway::Value;

/// What the downward API's `status.podIP` stands for in these checks.
const SAMPLE_POD_IP: &str = "10.1.2.3";

/// Values for `${VAR}` interpolations in the Compose files (what a user would export).
const COMPOSE_SAMPLES: &[(&str, &str)] = &[("CLUSTER_SECRET", "0123456789abcdef0123456789abcdef")];

/// Variables a node reads that are not configuration settings.
const EXTRA_VARS: &[&str] = &["RUST_LOG"];

type Env = BTreeMap<String, String>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The files of `dir` (relative to the crate root) whose name satisfies `keep`, sorted.
fn files(dir: &str, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let dir = root().join(dir);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(&keep))
        .collect();
    out.sort();
    out
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// Every YAML document of a file, with `<<` merge keys applied; empty documents are skipped.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let mut v = Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{}: document {}: invalid YAML: {e}", rel(path), i + 1));
        v.apply_merge()
            .unwrap_or_else(|e| panic!("{}: document {}: bad merge key: {e}", rel(path), i + 1));
        if !v.is_null() {
            out.push(v);
        }
    }
    out
}

/// The value at a path of mapping keys.
fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// A scalar as text (strings, numbers, booleans).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn text_at(v: &Value, path: &[&str]) -> Option<String> {
    at(v, path).and_then(scalar)
}

fn seq(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Checks collected by one test, reported together.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }
    fn push(&mut self, msg: String) {
        self.0.push(msg);
    }
    fn assert_none(self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{what}: {} problem(s):\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

/// Checks that every name is one the node reads, then builds the configuration exactly as
/// `openfhir-cache config` would from that environment (and no file).
fn node_config(origin: &str, env: &Env, p: &mut Problems) -> Option<Config> {
    for name in env.keys() {
        let known = VARS.iter().any(|v| v.env == name) || EXTRA_VARS.contains(&name.as_str());
        p.check(known, || {
            format!(
                "{origin}: {name} is not a variable the node reads (config::VARS or {EXTRA_VARS:?}); \
                 the node would ignore it"
            )
        });
    }
    match Config::from_sources(None, |k| env.get(k).cloned()) {
        Ok(c) => Some(c),
        Err(e) => {
            p.push(format!(
                "{origin}: `openfhir-cache config` would refuse this environment: {e}"
            ));
            None
        }
    }
}

// --- src/api/mod.rs --------------------------------------------------------------------------

/// The paths registered with a GET handler in `src/api/mod.rs`.
fn get_routes() -> BTreeSet<String> {
    let src = read(&root().join("src/api/mod.rs"));
    let mut out = BTreeSet::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + ".route(".len()..];
        let Some(lit) = rest.trim_start().strip_prefix('"') else {
            continue;
        };
        let path = &lit[..lit.find('"').expect("closing quote of a route path")];
        // The handlers follow the path, up to the next `.route(` (or the end of the router).
        let args = &lit[..lit.find(".route(").unwrap_or(lit.len())];
        let has_get = args
            .match_indices("get(")
            .any(|(j, _)| j == 0 || !args.as_bytes()[j - 1].is_ascii_alphanumeric());
        if has_get {
            out.insert(path.to_string());
        }
    }
    assert!(
        out.len() >= 10 && out.contains("/health/live"),
        "parsed only {out:?} from src/api/mod.rs; has the router moved?"
    );
    out
}

// --- docker/Dockerfile -----------------------------------------------------------------------

/// The Dockerfile's instructions (continuation lines joined, comments dropped), as
/// (upper-case keyword, arguments).
fn dockerfile() -> Vec<(String, String)> {
    let text = read(&root().join("docker/Dockerfile"));
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let instr = std::mem::take(&mut cur);
        let instr = instr.trim();
        if instr.is_empty() {
            continue;
        }
        let (kw, args) = instr.split_once(char::is_whitespace).unwrap_or((instr, ""));
        out.push((kw.to_ascii_uppercase(), args.trim().to_string()));
    }
    out
}

/// The instructions of the last stage (the image that runs).
fn final_stage(instrs: &[(String, String)]) -> &[(String, String)] {
    let start = instrs
        .iter()
        .rposition(|(k, _)| k == "FROM")
        .expect("a FROM");
    &instrs[start..]
}

/// `ENV` settings of the final stage: the environment every container of the image starts with.
fn image_env() -> Env {
    let mut env = Env::new();
    for (kw, args) in final_stage(&dockerfile()) {
        if kw != "ENV" {
            continue;
        }
        if !args.contains('=') {
            // Legacy form `ENV NAME value`.
            let (k, v) = args.split_once(' ').unwrap_or((args, ""));
            env.insert(k.to_string(), v.trim().to_string());
            continue;
        }
        for pair in args.split_whitespace() {
            let (k, v) = pair.split_once('=').expect("ENV NAME=value");
            env.insert(k.to_string(), v.trim_matches('"').to_string());
        }
    }
    env
}

/// The words of an exec-form (`["a", "b"]`) or shell-form instruction argument.
fn words(args: &str) -> Vec<String> {
    args.replace(['[', ']', ',', '"'], " ")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn dockerfile_builds_a_small_non_root_image_with_a_health_check() {
    let instrs = dockerfile();
    let last = final_stage(&instrs);
    let mut p = Problems::default();

    let stages = instrs.iter().filter(|(k, _)| k == "FROM").count();
    p.check(stages >= 2, || {
        format!("multi-stage build expected (build, then runtime), found {stages} FROM")
    });
    let base = &last[0].1;
    p.check(base.contains("slim") || base.contains("distroless"), || {
        format!("the runtime stage should be a slim image, not `FROM {base}`")
    });

    // A numeric, non-zero uid: Kubernetes' runAsNonRoot can only verify a numeric USER.
    let users: Vec<&String> = last
        .iter()
        .filter(|(k, _)| k == "USER")
        .map(|(_, a)| a)
        .collect();
    match users.last() {
        None => p.push("the runtime stage has no USER: the node would run as root".into()),
        Some(u) => {
            let uid = u.split(':').next().unwrap_or("");
            p.check(uid.parse::<u32>().is_ok_and(|n| n != 0), || {
                format!("USER {u}: use a numeric non-zero uid (runAsNonRoot checks it)")
            });
        }
    }

    let exposed: BTreeSet<String> = last
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace().map(str::to_string))
        .collect();
    for port in ["8080/tcp", "7800/tcp"] {
        let bare = port.trim_end_matches("/tcp");
        p.check(exposed.contains(port) || exposed.contains(bare), || {
            format!("EXPOSE must list {port} (found {exposed:?})")
        });
    }

    let health: Vec<&String> = last
        .iter()
        .filter(|(k, _)| k == "HEALTHCHECK")
        .map(|(_, a)| a)
        .collect();
    match health.as_slice() {
        [h] => {
            let w = words(h).join(" ");
            p.check(w.contains("CMD openfhir-cache health"), || {
                format!("HEALTHCHECK must run `openfhir-cache health` (no curl in the image): {h}")
            });
        }
        other => p.push(format!("expected one HEALTHCHECK, found {}", other.len())),
    }

    let run: Vec<String> = last
        .iter()
        .filter(|(k, _)| k == "ENTRYPOINT" || k == "CMD")
        .flat_map(|(_, a)| words(a))
        .collect();
    p.check(
        run.first().map(String::as_str) == Some("openfhir-cache") && run.contains(&"serve".into()),
        || format!("the image must run `openfhir-cache serve`, runs {run:?}"),
    );

    // The environment the image sets is a valid node configuration on its own.
    node_config("docker/Dockerfile ENV", &image_env(), &mut p);

    // Every COPY source (from the build context) exists and is not excluded by .dockerignore.
    let ignore = read(&root().join(".dockerignore"));
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    p.check(
        ignored.contains("target") && ignored.contains(".git"),
        || ".dockerignore must exclude target/ and .git/".into(),
    );
    for (_, args) in instrs.iter().filter(|(k, _)| k == "COPY") {
        if args.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = args
            .split_whitespace()
            .filter(|a| !a.starts_with("--"))
            .collect();
        for src in &parts[..parts.len().saturating_sub(1)] {
            let src = src.trim_end_matches('/');
            p.check(root().join(src).exists(), || {
                format!("COPY {src}: no such path")
            });
            p.check(!ignored.contains(src), || {
                format!("COPY {src}: excluded by .dockerignore")
            });
        }
    }
    p.assert_none("docker/Dockerfile");
}

// --- docker/compose*.yml ---------------------------------------------------------------------

/// Compose-style interpolation of `$$`, `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`,
/// `${NAME:?error}` and `${NAME?error}` from [`COMPOSE_SAMPLES`]. A variable without a sample and
/// without a default is an error: Compose would substitute an empty string.
fn interpolate(s: &str, origin: &str) -> String {
    let sample = |name: &str| {
        COMPOSE_SAMPLES
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let (expr, after) = if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .unwrap_or_else(|| panic!("{origin}: unclosed ${{ in {s:?}"));
            (&r[..end], &r[end + 1..])
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        rest = after;
        let name_end = expr
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expr.len());
        let (name, op) = expr.split_at(name_end);
        let value = sample(name);
        let v = match (op.get(..2), op.get(..1)) {
            (Some(":-"), _) => value
                .filter(|v| !v.is_empty())
                .unwrap_or(op[2..].to_string()),
            (_, Some("-")) => value.unwrap_or(op[1..].to_string()),
            (Some(":?"), _) | (_, Some("?")) => value.unwrap_or_else(|| {
                panic!("{origin}: ${{{expr}}} is required; add a sample to COMPOSE_SAMPLES")
            }),
            _ if op.is_empty() => value.unwrap_or_else(|| {
                panic!(
                    "{origin}: ${{{name}}} has no default; Compose would substitute an empty \
                     string when it is unset (use ${{{name}:-default}} or ${{{name}:?message}})"
                )
            }),
            _ => panic!("{origin}: unsupported interpolation ${{{expr}}}"),
        };
        out.push_str(&v);
    }
    out.push_str(rest);
    out
}

/// The environment of a Compose service (`environment` as a map or a `NAME=value` list).
fn compose_env(svc: &Value, origin: &str, p: &mut Problems) -> Env {
    let mut env = Env::new();
    match svc.get("environment") {
        None => {}
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                let k = scalar(k).unwrap_or_default();
                match scalar(v) {
                    Some(v) => {
                        env.insert(k.clone(), interpolate(&v, &format!("{origin} {k}")));
                    }
                    None => p.push(format!(
                        "{origin}: {k} has no value (it would be taken from the host's environment)"
                    )),
                }
            }
        }
        Some(Value::Sequence(items)) => {
            for item in items {
                let item = scalar(item).unwrap_or_default();
                match item.split_once('=') {
                    Some((k, v)) => {
                        env.insert(k.to_string(), interpolate(v, &format!("{origin} {k}")));
                    }
                    None => p.push(format!(
                        "{origin}: {item} has no value (it would be taken from the host's environment)"
                    )),
                }
            }
        }
        Some(other) => p.push(format!(
            "{origin}: environment is neither a map nor a list: {other:?}"
        )),
    }
    env
}

/// (host port, container port) of a Compose `ports` entry: `"8081:8080"`,
/// `"127.0.0.1:8081:8080/tcp"` or the long syntax.
fn compose_port(v: &Value) -> Option<(u16, u16)> {
    if let Some(s) = v.as_str() {
        let parts: Vec<&str> = s.rsplitn(3, ':').collect();
        let container = parts.first()?.split('/').next()?.parse().ok()?;
        let host = parts.get(1)?.parse().ok()?;
        return Some((host, container));
    }
    let container = text_at(v, &["target"])?.parse().ok()?;
    let host = text_at(v, &["published"])?.parse().ok()?;
    Some((host, container))
}

const NODE_SERVICES: [&str; 3] = ["openfhir-node-1", "openfhir-node-2", "openfhir-node-3"];

/// Which discovery each Compose file must configure.
fn expected_discovery(name: &str) -> Option<Discovery> {
    match name {
        "compose.yml" => Some(Discovery::Multicast),
        "compose.tcp.yml" => Some(Discovery::Tcp),
        _ => None,
    }
}

#[test]
fn compose_files_run_three_nodes_after_a_healthy_postgres() {
    let composes = files("docker", |n| {
        n.starts_with("compose") && (n.ends_with(".yml") || n.ends_with(".yaml"))
    });
    let names: BTreeSet<&str> = composes.iter().map(|p| file_name(p)).collect();
    for want in ["compose.yml", "compose.tcp.yml"] {
        assert!(
            names.contains(want),
            "docker/{want} is missing (found {names:?})"
        );
    }
    let image = image_env();

    for path in &composes {
        let file = rel(path);
        let docs = yaml_docs(path);
        assert_eq!(docs.len(), 1, "{file}: one YAML document expected");
        let doc = &docs[0];
        let mut p = Problems::default();
        let services = doc
            .get("services")
            .and_then(Value::as_mapping)
            .unwrap_or_else(|| panic!("{file}: no `services`"));
        let declared_volumes: BTreeSet<String> = doc
            .get("volumes")
            .and_then(Value::as_mapping)
            .map(|m| m.keys().filter_map(scalar).collect())
            .unwrap_or_default();

        // PostgreSQL 15 with a health check and its data on a volume.
        let pg = doc
            .get("services")
            .and_then(|s| s.get("postgres"))
            .unwrap_or_else(|| panic!("{file}: no `postgres` service"));
        let pg_image = text_at(pg, &["image"]).unwrap_or_default();
        p.check(pg_image.starts_with("postgres:15"), || {
            format!("postgres: image {pg_image:?}, expected postgres:15")
        });
        let test = seq(at(pg, &["healthcheck", "test"]))
            .iter()
            .filter_map(scalar)
            .collect::<Vec<_>>()
            .join(" ")
            + &text_at(pg, &["healthcheck", "test"]).unwrap_or_default();
        p.check(test.contains("pg_isready"), || {
            format!("postgres: healthcheck.test must run pg_isready, is {test:?}")
        });
        let pg_volumes: Vec<String> = seq(pg.get("volumes")).iter().filter_map(scalar).collect();
        p.check(
            pg_volumes
                .iter()
                .any(|v| v.ends_with(":/var/lib/postgresql/data")),
            || format!("postgres: no volume on /var/lib/postgresql/data ({pg_volumes:?})"),
        );
        for v in &pg_volumes {
            let source = v.split(':').next().unwrap_or("");
            let named = !source.starts_with('.') && !source.starts_with('/');
            p.check(!named || declared_volumes.contains(source), || {
                format!("postgres: volume {source:?} is not declared under top-level `volumes`")
            });
        }
        let pg_env = compose_env(pg, &format!("{file} postgres"), &mut p);

        // Exactly the three nodes.
        let nodes: BTreeSet<String> = services
            .keys()
            .filter_map(scalar)
            .filter(|n| n != "postgres")
            .collect();
        let want: BTreeSet<String> = NODE_SERVICES.iter().map(|s| s.to_string()).collect();
        p.check(nodes == want, || {
            format!("services besides postgres: {nodes:?}, expected {want:?}")
        });

        let mut host_ports = BTreeSet::new();
        for name in &nodes {
            let svc = &services[name.as_str()];
            let origin = format!("{file} {name}");
            let condition = text_at(svc, &["depends_on", "postgres", "condition"]);
            p.check(condition.as_deref() == Some("service_healthy"), || {
                format!("{origin}: depends_on.postgres.condition must be service_healthy, is {condition:?}")
            });
            let context = text_at(svc, &["build", "context"]).unwrap_or_default();
            let dockerfile = text_at(svc, &["build", "dockerfile"]).unwrap_or_default();
            let built = path.parent().unwrap().join(&context).join(&dockerfile);
            p.check(
                context == ".." && dockerfile == "docker/Dockerfile" && built.is_file(),
                || {
                    format!(
                        "{origin}: build must be context `..`, dockerfile docker/Dockerfile \
                         (is {context:?}, {dockerfile:?})"
                    )
                },
            );

            // The node's environment: the image's ENV, overridden by the service's.
            let own = compose_env(svc, &origin, &mut p);
            let mut env = image.clone();
            env.extend(own.clone());
            let Some(cfg) = node_config(&origin, &env, &mut p) else {
                continue;
            };

            // DATABASE_URL points at the postgres service with its credentials.
            match url::Url::parse(env.get("DATABASE_URL").map_or("", String::as_str)) {
                Ok(u) => {
                    p.check(u.host_str() == Some("postgres"), || {
                        format!("{origin}: DATABASE_URL must name the `postgres` service")
                    });
                    let user = pg_env
                        .get("POSTGRES_USER")
                        .map_or("postgres", String::as_str);
                    p.check(u.username() == user, || {
                        format!(
                            "{origin}: DATABASE_URL user {:?}, postgres has {user:?}",
                            u.username()
                        )
                    });
                    p.check(
                        u.password() == pg_env.get("POSTGRES_PASSWORD").map(String::as_str),
                        || {
                            format!(
                                "{origin}: DATABASE_URL password differs from POSTGRES_PASSWORD"
                            )
                        },
                    );
                    let db = u.path().trim_start_matches('/');
                    let want_db = pg_env.get("POSTGRES_DB").map_or(user, String::as_str);
                    p.check(db == want_db, || {
                        format!(
                            "{origin}: DATABASE_URL database {db:?}, postgres creates {want_db:?}"
                        )
                    });
                }
                Err(e) => p.push(format!("{origin}: DATABASE_URL is not a URL: {e}")),
            }

            // The HTTP port published on the host reaches the port the node listens on.
            let ports: Vec<Option<(u16, u16)>> =
                seq(svc.get("ports")).iter().map(compose_port).collect();
            p.check(ports.len() == 1 && ports[0].is_some(), || {
                format!(
                    "{origin}: one HTTP port mapping expected, found {:?}",
                    svc.get("ports")
                )
            });
            if let Some(Some((host, container))) = ports.first() {
                p.check(*container == cfg.http.addr.port(), || {
                    format!(
                        "{origin}: port mapping targets {container}, the node listens on {}",
                        cfg.http.addr
                    )
                });
                host_ports.insert(*host);
            }

            match expected_discovery(file_name(path)) {
                Some(Discovery::Multicast) => {
                    // The seed's first example: no cluster configuration at all.
                    let cluster: Vec<&String> =
                        own.keys().filter(|k| k.starts_with("CLUSTER_")).collect();
                    p.check(cluster.is_empty(), || {
                        format!(
                            "{origin}: MULTICAST needs no cluster configuration, found {cluster:?}"
                        )
                    });
                    p.check(cfg.cluster.discovery == Discovery::Multicast, || {
                        format!(
                            "{origin}: discovery {:?}, expected MULTICAST",
                            cfg.cluster.discovery
                        )
                    });
                }
                Some(d) => p.check(cfg.cluster.discovery == d, || {
                    format!(
                        "{origin}: discovery {:?}, expected {d:?}",
                        cfg.cluster.discovery
                    )
                }),
                None => {}
            }
            if cfg.cluster.discovery == Discovery::Tcp {
                // Every node lists every peer, itself included, on the cluster port.
                let hosts: BTreeSet<String> = cfg
                    .cluster
                    .initial_hosts
                    .iter()
                    .map(|h| h.host.clone())
                    .collect();
                p.check(hosts == nodes, || {
                    format!(
                        "{origin}: CLUSTER_INITIAL_HOSTS names {hosts:?}, the nodes are {nodes:?}"
                    )
                });
                for h in &cfg.cluster.initial_hosts {
                    p.check(h.port == cfg.cluster.port, || {
                        format!(
                            "{origin}: peer {h} is not on CLUSTER_PORT {}",
                            cfg.cluster.port
                        )
                    });
                }
            }
        }
        let want_ports: BTreeSet<u16> = [8081, 8082, 8083].into();
        p.check(host_ports == want_ports, || {
            format!("host HTTP ports {host_ports:?}, expected {want_ports:?}")
        });
        p.assert_none(&file);
    }
}

// --- k8s/ ------------------------------------------------------------------------------------

/// Every object of every `k8s/*.yaml` file, with its file name.
fn k8s_objects() -> Vec<(String, Value)> {
    let paths = files("k8s", |n| n.ends_with(".yaml") || n.ends_with(".yml"));
    assert!(!paths.is_empty(), "k8s/ has no manifests");
    let mut out = Vec::new();
    for path in paths {
        for doc in yaml_docs(&path) {
            assert!(
                text_at(&doc, &["kind"]).is_some() && text_at(&doc, &["apiVersion"]).is_some(),
                "{}: a document without kind/apiVersion",
                rel(&path)
            );
            out.push((file_name(&path).to_string(), doc));
        }
    }
    out
}

fn kind(v: &Value) -> String {
    text_at(v, &["kind"]).unwrap_or_default()
}

fn name(v: &Value) -> String {
    text_at(v, &["metadata", "name"]).unwrap_or_default()
}

/// The one object of a kind (panics if there is not exactly one).
fn one<'a>(objects: &'a [(String, Value)], k: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .map(|(_, v)| v)
        .filter(|v| kind(v) == k)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "k8s/: expected exactly one {k}, found {}",
        found.len()
    );
    found[0]
}

/// `labels` as a map.
fn labels(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_mapping)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((scalar(k)?, scalar(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// A selector matches the pods when each of its labels is on them (and it is not empty).
fn selects(selector: &BTreeMap<String, String>, pod: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod.get(k) == Some(v))
}

/// The container port a probe or Service `targetPort` designates (a number or a port name).
fn container_port(container: &Value, target: Option<&Value>) -> Option<u16> {
    let target = target.and_then(scalar)?;
    if let Ok(n) = target.parse() {
        return Some(n);
    }
    seq(container.get("ports"))
        .iter()
        .find(|p| text_at(p, &["name"]).as_deref() == Some(target.as_str()))
        .and_then(|p| text_at(p, &["containerPort"])?.parse().ok())
}

/// The environment of a container as the kubelet would give it, on top of the image's: plain
/// values, secretKeyRef values from the Secret manifests' stringData, and the downward API's
/// `status.podIP` as [`SAMPLE_POD_IP`].
fn k8s_env(container: &Value, secrets: &[&Value], mut env: Env, p: &mut Problems) -> Env {
    p.check(container.get("envFrom").is_none(), || {
        "the container uses envFrom: list variables one by one so their names can be checked".into()
    });
    for e in seq(container.get("env")) {
        let n = text_at(e, &["name"]).unwrap_or_default();
        if let Some(v) = e.get("value") {
            match v.as_str() {
                Some(s) => {
                    env.insert(n, s.to_string());
                }
                None => p.push(format!(
                    "env {n}: value must be a string (quote it), is {v:?}"
                )),
            }
        } else if let Some(r) = at(e, &["valueFrom", "secretKeyRef"]) {
            let (sname, key) = (text_at(r, &["name"]), text_at(r, &["key"]));
            let value = secrets
                .iter()
                .find(|s| Some(name(s)) == sname)
                .and_then(|s| text_at(s, &["stringData", key.as_deref().unwrap_or("")]));
            match value {
                Some(v) => {
                    env.insert(n, v);
                }
                None => p.push(format!(
                    "env {n}: secretKeyRef {sname:?}/{key:?} is not in any k8s/ Secret's stringData"
                )),
            }
        } else if let Some(f) = text_at(e, &["valueFrom", "fieldRef", "fieldPath"]) {
            match f.as_str() {
                "status.podIP" => {
                    env.insert(n, SAMPLE_POD_IP.to_string());
                }
                other => p.push(format!(
                    "env {n}: fieldRef {other} has no sample value here"
                )),
            }
        } else {
            p.push(format!(
                "env {n}: neither value, secretKeyRef nor fieldRef podIP"
            ));
        }
    }
    env
}

#[test]
fn kubernetes_manifests_run_three_nodes_in_dns_mode() {
    let objects = k8s_objects();
    let routes = get_routes();
    let mut p = Problems::default();

    let deploy = one(&objects, "Deployment");
    let sa = one(&objects, "ServiceAccount");
    let role = one(&objects, "Role");
    let binding = one(&objects, "RoleBinding");
    let pdb = one(&objects, "PodDisruptionBudget");
    let secrets: Vec<&Value> = objects
        .iter()
        .map(|(_, v)| v)
        .filter(|v| kind(v) == "Secret")
        .collect();
    assert!(!secrets.is_empty(), "k8s/: no Secret manifest");
    let services: Vec<&Value> = objects
        .iter()
        .map(|(_, v)| v)
        .filter(|v| kind(v) == "Service")
        .collect();

    // The Deployment.
    let replicas = text_at(deploy, &["spec", "replicas"]);
    p.check(replicas.as_deref() == Some("3"), || {
        format!("Deployment replicas {replicas:?}, expected 3")
    });
    let pod = at(deploy, &["spec", "template"]).expect("Deployment spec.template");
    let pod_labels = labels(at(pod, &["metadata", "labels"]));
    p.check(
        selects(
            &labels(at(deploy, &["spec", "selector", "matchLabels"])),
            &pod_labels,
        ),
        || "Deployment selector does not match its pod labels".into(),
    );
    let spec = pod.get("spec").expect("pod spec");
    let sa_name = text_at(spec, &["serviceAccountName"]);
    p.check(sa_name.as_deref() == Some(name(sa).as_str()), || {
        format!(
            "pods run as service account {sa_name:?}, the ServiceAccount is {:?}",
            name(sa)
        )
    });
    p.check(
        text_at(spec, &["terminationGracePeriodSeconds"]).is_some(),
        || "pod spec needs terminationGracePeriodSeconds".into(),
    );
    let containers = seq(spec.get("containers"));
    assert_eq!(containers.len(), 1, "one container per pod expected");
    let c = &containers[0];

    // Its environment: names the node reads, values it accepts, DNS discovery.
    let env = k8s_env(c, &secrets, image_env(), &mut p);
    let cfg = node_config("k8s Deployment container env", &env, &mut p);

    // Probes on health routes that exist, on the port the node listens on.
    let http_port = cfg.as_ref().map_or(8080, |c| c.http.addr.port());
    for (probe, want) in [
        ("livenessProbe", Some("/health/live")),
        ("readinessProbe", Some("/health/ready")),
        ("startupProbe", None),
    ] {
        let Some(pr) = c.get(probe) else {
            p.check(want.is_none(), || format!("container has no {probe}"));
            continue;
        };
        let path = text_at(pr, &["httpGet", "path"]).unwrap_or_default();
        p.check(routes.contains(&path), || {
            format!("{probe} path {path:?} is not a GET route of src/api/mod.rs")
        });
        if let Some(w) = want {
            p.check(path == w, || {
                format!("{probe} must probe {w}, probes {path:?}")
            });
        }
        let port = container_port(c, at(pr, &["httpGet", "port"]));
        p.check(port == Some(http_port), || {
            format!("{probe} port is {port:?}, the node listens on {http_port}")
        });
    }

    // Hardening.
    let sc = |k: &str| {
        text_at(c, &["securityContext", k]).or_else(|| text_at(spec, &["securityContext", k]))
    };
    p.check(sc("runAsNonRoot").as_deref() == Some("true"), || {
        "runAsNonRoot must be true".into()
    });
    p.check(
        sc("readOnlyRootFilesystem").as_deref() == Some("true"),
        || "readOnlyRootFilesystem must be true".into(),
    );
    p.check(
        sc("allowPrivilegeEscalation").as_deref() == Some("false"),
        || "allowPrivilegeEscalation must be false".into(),
    );
    let dropped: Vec<String> = seq(at(c, &["securityContext", "capabilities", "drop"]))
        .iter()
        .filter_map(scalar)
        .collect();
    p.check(dropped.iter().any(|d| d == "ALL"), || {
        format!("capabilities.drop must contain ALL ({dropped:?})")
    });
    p.check(at(c, &["resources", "requests"]).is_some(), || {
        "container needs resources.requests".into()
    });
    p.check(at(c, &["resources", "limits", "memory"]).is_some(), || {
        "container needs a memory limit".into()
    });

    // The headless Service the DNS query names.
    let headless: Vec<&&Value> = services
        .iter()
        .filter(|s| text_at(s, &["spec", "clusterIP"]).as_deref() == Some("None"))
        .collect();
    assert_eq!(
        headless.len(),
        1,
        "exactly one headless Service (clusterIP: None) expected"
    );
    let hl = headless[0];
    p.check(text_at(hl, &["spec", "publishNotReadyAddresses"]).as_deref() == Some("true"), || {
        "the headless Service needs publishNotReadyAddresses: true (peers must find starting pods)".into()
    });
    p.check(
        selects(&labels(at(hl, &["spec", "selector"])), &pod_labels),
        || "the headless Service does not select the Deployment's pods".into(),
    );
    let namespaces: BTreeSet<String> = objects
        .iter()
        .filter(|(_, v)| kind(v) != "Kustomization")
        .map(|(f, v)| {
            text_at(v, &["metadata", "namespace"]).unwrap_or_else(|| format!("(none in {f})"))
        })
        .collect();
    p.check(namespaces.len() == 1, || {
        format!("objects are in several namespaces: {namespaces:?}")
    });
    let ns = namespaces.iter().next().cloned().unwrap_or_default();

    if let Some(cfg) = &cfg {
        p.check(cfg.cluster.discovery == Discovery::Dns, || {
            format!("discovery {:?}, expected DNS", cfg.cluster.discovery)
        });
        let want_query = format!("{}.{ns}.svc.cluster.local", name(hl));
        p.check(
            cfg.cluster.dns_query.as_deref() == Some(want_query.as_str()),
            || {
                format!(
                    "CLUSTER_DNS_QUERY is {:?}, the headless Service is {want_query}",
                    cfg.cluster.dns_query
                )
            },
        );
        p.check(
            cfg.cluster.bind_addr == SAMPLE_POD_IP.parse::<IpAddr>().unwrap(),
            || "CLUSTER_BIND_ADDR must come from the downward API (status.podIP)".into(),
        );
        p.check(cfg.cluster.secret.is_some(), || {
            "CLUSTER_SECRET must be set (from the Secret)".into()
        });
        for var in ["DATABASE_URL", "CLUSTER_SECRET"] {
            let from_secret = seq(c.get("env")).iter().any(|e| {
                text_at(e, &["name"]).as_deref() == Some(var)
                    && at(e, &["valueFrom", "secretKeyRef"]).is_some()
            });
            p.check(from_secret, || {
                format!("{var} must come from a Secret (secretKeyRef)")
            });
        }
        let cluster_ports: Vec<&Value> = seq(at(hl, &["spec", "ports"])).iter().collect();
        let ok = cluster_ports.iter().any(|sp| {
            text_at(sp, &["port"]) == Some(cfg.cluster.port.to_string())
                && container_port(c, sp.get("targetPort").or(sp.get("port")))
                    == Some(cfg.cluster.port)
        });
        p.check(ok, || {
            format!(
                "the headless Service must expose CLUSTER_PORT {} to the pods",
                cfg.cluster.port
            )
        });
    }

    // A Service for the HTTP API.
    let http_service = services.iter().any(|s| {
        name(s) != name(hl)
            && selects(&labels(at(s, &["spec", "selector"])), &pod_labels)
            && seq(at(s, &["spec", "ports"])).iter().any(|sp| {
                container_port(c, sp.get("targetPort").or(sp.get("port"))) == Some(http_port)
            })
    });
    p.check(http_service, || {
        format!("no Service sends traffic to the pods' HTTP port {http_port}")
    });

    // RBAC: read pods and endpoints, bound to the pods' service account.
    let grants = seq(at(role, &["rules"])).iter().any(|r| {
        let list = |k: &str| -> Vec<String> { seq(r.get(k)).iter().filter_map(scalar).collect() };
        let (groups, res, verbs) = (list("apiGroups"), list("resources"), list("verbs"));
        groups.iter().any(|g| g.is_empty())
            && ["pods", "endpoints"]
                .iter()
                .all(|x| res.iter().any(|r| r == x))
            && ["get", "list", "watch"]
                .iter()
                .all(|x| verbs.iter().any(|v| v == x))
    });
    p.check(grants, || {
        "the Role must grant get/list/watch on pods and endpoints".into()
    });
    p.check(
        text_at(binding, &["roleRef", "kind"]).as_deref() == Some("Role")
            && text_at(binding, &["roleRef", "name"]) == Some(name(role)),
        || "the RoleBinding must reference the Role".into(),
    );
    let bound = seq(binding.get("subjects")).iter().any(|s| {
        text_at(s, &["kind"]).as_deref() == Some("ServiceAccount")
            && text_at(s, &["name"]) == Some(name(sa))
            && text_at(s, &["namespace"]).as_deref() == Some(ns.as_str())
    });
    p.check(bound, || {
        "the RoleBinding must bind the ServiceAccount (with its namespace)".into()
    });

    // PodDisruptionBudget over the pods, allowing a drain.
    p.check(
        selects(
            &labels(at(pdb, &["spec", "selector", "matchLabels"])),
            &pod_labels,
        ),
        || "the PodDisruptionBudget does not select the Deployment's pods".into(),
    );
    let min = text_at(pdb, &["spec", "minAvailable"]).and_then(|s| s.parse::<u32>().ok());
    let max = text_at(pdb, &["spec", "maxUnavailable"]);
    p.check(
        min.is_some_and(|m| (1..3).contains(&m)) || max.is_some(),
        || "the PodDisruptionBudget needs minAvailable 1-2 or maxUnavailable".into(),
    );

    // Secret manifests hold placeholders only.
    for s in &secrets {
        let data = at(s, &["stringData"]).and_then(Value::as_mapping);
        p.check(data.is_some(), || {
            format!("Secret {}: use stringData", name(s))
        });
        for (k, v) in data.into_iter().flatten() {
            let v = scalar(v).unwrap_or_default();
            p.check(v.to_ascii_uppercase().contains("REPLACE"), || {
                format!(
                    "Secret {} {:?}: a committed value must be a marked placeholder (REPLACE...)",
                    name(s),
                    scalar(k).unwrap_or_default()
                )
            });
        }
    }
    p.assert_none("k8s/");
}

#[test]
fn kustomization_lists_every_manifest_but_the_secret() {
    let objects = k8s_objects();
    let kust = one(&objects, "Kustomization");
    let listed: BTreeSet<String> = seq(kust.get("resources"))
        .iter()
        .filter_map(scalar)
        .collect();
    let mut p = Problems::default();
    for f in &listed {
        p.check(root().join("k8s").join(f).is_file(), || {
            format!("resources: {f} does not exist")
        });
    }
    let by_file: BTreeMap<&str, Vec<String>> =
        objects.iter().fold(BTreeMap::new(), |mut m, (f, v)| {
            m.entry(f.as_str()).or_default().push(kind(v));
            m
        });
    for (f, kinds) in by_file {
        if kinds == ["Kustomization"] {
            continue;
        }
        let only_secrets = kinds.iter().all(|k| k == "Secret");
        // Listing a placeholder Secret would reset the real one on every `kubectl apply -k`.
        p.check(listed.contains(f) != only_secrets, || {
            if only_secrets {
                format!("{f} holds placeholder Secrets: do not list it in resources")
            } else {
                format!("{f} is not listed in kustomization.yaml resources")
            }
        });
    }
    let ns = text_at(kust, &["namespace"]);
    let objs_ns = objects
        .iter()
        .find(|(_, v)| kind(v) == "Deployment")
        .and_then(|(_, v)| text_at(v, &["metadata", "namespace"]));
    p.check(ns == objs_ns, || {
        format!("kustomization namespace {ns:?}, the objects use {objs_ns:?}")
    });
    p.assert_none("k8s/kustomization.yaml");
}

// --- the checks themselves -------------------------------------------------------------------

#[test]
fn the_checks_catch_mistakes() {
    let mut p = Problems::default();
    let env: Env = [("CLUSTER_DISCOVRY", "TCP")]
        .map(|(k, v)| (k.into(), v.into()))
        .into();
    node_config("misspelled", &env, &mut p);
    let env: Env = [("CLUSTER_DISCOVERY", "TCP")]
        .map(|(k, v)| (k.into(), v.into()))
        .into();
    node_config("TCP without hosts", &env, &mut p);
    let env: Env = [("CLUSTER_SECRET", "short")]
        .map(|(k, v)| (k.into(), v.into()))
        .into();
    node_config("short secret", &env, &mut p);
    assert_eq!(p.0.len(), 3, "{:#?}", p.0);
    assert!(
        p.0[0].contains("CLUSTER_DISCOVRY is not a variable"),
        "{}",
        p.0[0]
    );

    assert_eq!(
        interpolate("a$$b ${X:-d} ${CLUSTER_SECRET:?m}", "t"),
        format!("a$b d {}", COMPOSE_SAMPLES[0].1)
    );
    assert!(std::panic::catch_unwind(|| interpolate("${NOPE:?required}", "t")).is_err());
    assert_eq!(
        compose_port(&Value::String("127.0.0.1:8081:8080".into())),
        Some((8081, 8080))
    );
    assert_eq!(
        compose_port(&Value::String("8082:8080/tcp".into())),
        Some((8082, 8080))
    );
}
