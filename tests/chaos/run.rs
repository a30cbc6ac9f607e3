//! The chaos run: a throwaway PostgreSQL, N node processes, a seeded workload, the faults, the
//! checker and the report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, Firewall, State};
use crate::common::pg::PrivateServer;
use crate::model::{model_context_yaml, observe, Key, Obs, Sql, Write, SCRATCH};
use crate::report::{self, Failure, Fault, Stats};
use crate::rng::Rng;

/// How a run is shaped. Everything has a default; the environment can override it.
pub struct Settings {
    /// `short` or `long`: names the log directory.
    pub name: &'static str,
    pub seed: u64,
    pub nodes: usize,
    /// Node `i` listens on `127.0.60.(first_ip + i)`.
    pub first_ip: u8,
    /// `None`: one phase per fault type (the CI run). `Some(d)`: random phases until `d` passed.
    pub duration: Option<Duration>,
    pub heartbeat_ms: u64,
    pub catchup_ms: u64,
    /// Wait after a fault healed and the workload stopped, before the check.
    pub settle: Duration,
    /// Longest a write may take to reach every node before it counts as "not converged".
    pub bound: Duration,
    /// Extra node environment (`CHAOS_NODE_ENV=K=V,K=V`), applied last.
    pub node_env: Vec<(String, String)>,
    /// Whether the peer-traffic cut runs (needs root and iptables).
    pub partition: bool,
    pub keep_logs: bool,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = if let Some(hex) = v.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        v.parse()
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

impl Settings {
    /// The defaults, overridden by `CHAOS_SEED`, `CHAOS_NODES`, `CHAOS_NODE_ENV`,
    /// `CHAOS_BOUND_MS`, `CHAOS_SETTLE_MS`, `CHAOS_NO_PARTITION=1`, `CHAOS_KEEP_LOGS=1`.
    pub fn from_env(
        name: &'static str,
        default_seed: u64,
        first_ip: u8,
        duration: Option<Duration>,
    ) -> Settings {
        let nodes = env_u64("CHAOS_NODES").unwrap_or(3) as usize;
        assert!((2..=9).contains(&nodes), "CHAOS_NODES must be 2 to 9");
        let node_env = std::env::var("CHAOS_NODE_ENV")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .unwrap_or_else(|| panic!("CHAOS_NODE_ENV: {kv:?} is not K=V"));
                (k.trim().to_string(), v.trim().to_string())
            })
            .collect();
        Settings {
            name,
            seed: env_u64("CHAOS_SEED").unwrap_or(default_seed),
            nodes,
            first_ip,
            duration,
            heartbeat_ms: 200,
            catchup_ms: 500,
            settle: Duration::from_millis(env_u64("CHAOS_SETTLE_MS").unwrap_or(3000)),
            bound: Duration::from_millis(env_u64("CHAOS_BOUND_MS").unwrap_or(10_000)),
            node_env,
            partition: std::env::var("CHAOS_NO_PARTITION").map_or(true, |v| v != "1"),
            keep_logs: std::env::var("CHAOS_KEEP_LOGS").is_ok_and(|v| v == "1"),
        }
    }
}

/// What happened to a write.
enum Outcome {
    /// 2xx (or SQL success): committed; when it was acknowledged.
    Acked(Instant),
    /// Unknown: a 503, a timeout or a broken connection after sending it.
    Uncertain,
    /// Certainly not committed.
    Rejected,
}

/// Every acknowledged write's value of a key, and the writes of unknown outcome since.
#[derive(Default)]
struct Record {
    acked: Option<Obs>,
    uncertain: Vec<Obs>,
}

/// Fields drop in order: the nodes go before the firewall rules and the database.
struct Run {
    cluster: Cluster,
    fw: Option<Firewall>,
    server: Arc<PrivateServer>,
    s: Settings,
    rng: Rng,
    sql: Sql,
    http: reqwest::Client,
    keys: Vec<Key>,
    opt_keys: Vec<(String, String)>,
    records: BTreeMap<Key, Record>,
    /// Per node: keys written while it was down or paused, with the value it must serve once back.
    pending: Vec<BTreeMap<Key, Obs>>,
    stats: BTreeMap<Fault, Stats>,
    failures: Vec<Failure>,
    fault: Fault,
    phase: String,
    /// A PostgreSQL restart is under way: 503 is the documented answer.
    db_down: bool,
    /// ... and 503 stays acceptable until this instant after it.
    db_grace_until: Option<Instant>,
    marker: u64,
    started: Instant,
    writes_by_kind: BTreeMap<&'static str, u64>,
    /// Which write made each marker: kind, route and phase (evidence for failures).
    written: std::collections::HashMap<String, String>,
}

/// Runs the whole thing; panics with the failures if any.
pub fn main(s: Settings) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // `block_on` polls the run on this thread, so the nodes are spawned by the test's thread
    // and their parent-death signal fires only when the test ends.
    rt.block_on(run(s));
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) if !t.is_empty() => {
            let t = PathBuf::from(t);
            if t.is_absolute() {
                t
            } else {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(t)
            }
        }
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
    }
}

/// The test server commits asynchronously (`synchronous_commit = off`, fast for the other
/// tests); here that would let an immediate stop lose acknowledged commits inside PostgreSQL
/// itself, so the chaos server commits synchronously, as PostgreSQL does by default.
/// `CHAOS_PG_CONF=name=value,...` adds settings (`ALTER SYSTEM`), e.g.
/// `CHAOS_PG_CONF=synchronous_commit=off` to see what a database that loses commits does.
async fn configure_postgres(url: &str) {
    let mut settings = vec![("synchronous_commit".to_string(), "on".to_string())];
    for kv in std::env::var("CHAOS_PG_CONF")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.trim().is_empty())
    {
        let (k, v) = kv
            .split_once('=')
            .unwrap_or_else(|| panic!("CHAOS_PG_CONF: {kv:?} is not name=value"));
        settings.push((k.trim().to_string(), v.trim().to_string()));
    }
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the chaos PostgreSQL");
    tokio::spawn(conn);
    for (k, v) in &settings {
        let v = v.replace('\'', "''");
        client
            .batch_execute(&format!("ALTER SYSTEM SET {k} = '{v}'"))
            .await
            .unwrap_or_else(|e| panic!("ALTER SYSTEM SET {k}: {e}"));
    }
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("pg_reload_conf");
    // The reload is asynchronous: wait until a new session sees it.
    let want = settings
        .iter()
        .rev()
        .find(|(k, _)| k == "synchronous_commit")
        .map(|(_, v)| v.clone())
        .unwrap();
    for attempt in 0.. {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to the chaos PostgreSQL");
        tokio::spawn(conn);
        let now: String = c
            .query_one("SHOW synchronous_commit", &[])
            .await
            .expect("SHOW synchronous_commit")
            .get(0);
        if now == want {
            break;
        }
        assert!(attempt < 100, "synchronous_commit stays {now}, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if settings.len() > 1 {
        println!("chaos: PostgreSQL settings {settings:?}");
    }
}

/// Takes the cross-process lock of the address block starting at `127.0.60.first`, so two test
/// processes that run the same chaos test (two `cargo test` at once) take turns instead of
/// fighting over the addresses. Released when the file is dropped, or when the process dies.
// `File::lock` needs Rust 1.89, newer than the crate's declared `rust-version`; only the test
// harness uses it.
#[allow(clippy::incompatible_msrv)]
fn lock_addresses(first: u8) -> std::fs::File {
    let path = target_dir()
        .join("chaos")
        .join(format!("127.0.60.{first}.lock"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    if f.try_lock().is_err() {
        println!("chaos: waiting for another run using 127.0.60.{first}... to finish");
        f.lock()
            .unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()));
    }
    f
}

async fn run(s: Settings) {
    let _addresses = lock_addresses(s.first_ip);
    let dir = target_dir()
        .join("chaos")
        .join(format!("{}-{}", s.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ips: Vec<String> = (0..s.nodes)
        .map(|i| format!("127.0.60.{}", s.first_ip as usize + i))
        .collect();
    println!(
        "chaos {}: seed {:#x}, {} nodes on {}, logs in {}",
        s.name,
        s.seed,
        s.nodes,
        ips.join(", "),
        dir.display()
    );
    for ip in &ips {
        if std::net::TcpListener::bind((ip.as_str(), crate::cluster::HTTP_PORT)).is_err()
            || std::net::TcpListener::bind((ip.as_str(), crate::cluster::CLUSTER_PORT)).is_err()
        {
            panic!(
                "{ip}:{} or {ip}:{} is taken: is another chaos run still going?",
                crate::cluster::HTTP_PORT,
                crate::cluster::CLUSTER_PORT
            );
        }
    }

    let fw = if s.partition {
        Some(Firewall::new().unwrap_or_else(|e| {
            panic!(
                "the peer-traffic fault needs iptables and root: {e}\n\
                 Run as root with iptables installed, or set CHAOS_NO_PARTITION=1 to leave \
                 that fault out."
            )
        }))
    } else {
        println!("chaos: CHAOS_NO_PARTITION=1: the peer-traffic cut is left out");
        None
    };

    let t0 = Instant::now();
    let server = Arc::new(PrivateServer::new());
    let db_url = server.url();
    configure_postgres(&db_url).await;
    let secret: String = {
        let mut r = Rng::new(s.seed ^ 0xC0FFEE);
        (0..4).map(|_| format!("{:016x}", r.next_u64())).collect()
    };
    let hosts = ips
        .iter()
        .map(|ip| format!("{ip}[{}]", crate::cluster::CLUSTER_PORT))
        .collect::<Vec<_>>()
        .join(",");
    let mut env: Vec<(String, String)> = [
        ("DATABASE_URL", db_url.as_str()),
        ("CLUSTER_DISCOVERY", "TCP"),
        ("CLUSTER_INITIAL_HOSTS", hosts.as_str()),
        ("CLUSTER_PORT", "7800"),
        ("CLUSTER_SECRET", secret.as_str()),
        ("OPENFHIR_DB_POOL_SIZE", "4"),
        ("RUST_LOG", "info"),
        ("NO_COLOR", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.push((
        "CLUSTER_NAME".into(),
        format!("chaos-{}-{}", s.name, std::process::id()),
    ));
    env.push(("CLUSTER_HEARTBEAT_MS".into(), s.heartbeat_ms.to_string()));
    env.push((
        "OPENFHIR_CATCHUP_INTERVAL_MS".into(),
        s.catchup_ms.to_string(),
    ));
    for (k, v) in &s.node_env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    if !s.node_env.is_empty() {
        println!("chaos: extra node environment {:?}", s.node_env);
    }

    let mut cluster = Cluster::new(&dir, &ips, env);
    // The first node migrates the schema alone; the others start together.
    cluster.spawn(0);
    if let Err(e) = cluster.wait_ready(0, Duration::from_secs(60)).await {
        panic!("{e}");
    }
    for i in 1..s.nodes {
        cluster.spawn(i);
    }
    for i in 1..s.nodes {
        if let Err(e) = cluster.wait_ready(i, Duration::from_secs(60)).await {
            panic!("{e}");
        }
    }
    if let Err(e) = cluster.wait_membership(Duration::from_secs(30)).await {
        panic!("the cluster did not form: {e}");
    }
    println!(
        "chaos: PostgreSQL and {} nodes up in {:.1} s",
        s.nodes,
        t0.elapsed().as_secs_f64()
    );

    let mut opt_keys: Vec<(String, String)> = (0..6)
        .map(|i| ("default".to_string(), format!("opt{i}")))
        .collect();
    opt_keys.push(("chaos-a".into(), "opt0".into()));
    opt_keys.push(("chaos-a".into(), "opt1".into()));
    let mut keys: Vec<Key> = opt_keys
        .iter()
        .map(|(t, id)| Key::Opt {
            tenant: t.clone(),
            id: id.clone(),
        })
        .collect();
    keys.push(Key::Opt {
        tenant: SCRATCH.into(),
        id: "s0".into(),
    });
    for i in 0..3 {
        keys.push(Key::Context {
            id: format!("opt{i}"),
        });
    }
    keys.push(Key::AllContexts);
    for i in 0..2 {
        keys.push(Key::Helpers {
            template: format!("mt{i}"),
            model: format!("mdl{i}"),
        });
    }
    for t in ["chaos-a", "chaos-b", SCRATCH] {
        keys.push(Key::Tenant { id: t.into() });
    }

    let mut run = Run {
        rng: Rng::new(s.seed),
        pending: vec![BTreeMap::new(); s.nodes],
        sql: Sql::new(&db_url),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
        s,
        server,
        cluster,
        fw,
        keys,
        opt_keys,
        records: BTreeMap::new(),
        stats: BTreeMap::new(),
        failures: Vec::new(),
        fault: Fault::None,
        phase: "setup".into(),
        db_down: false,
        db_grace_until: None,
        marker: 0,
        started: Instant::now(),
        writes_by_kind: BTreeMap::new(),
        written: std::collections::HashMap::new(),
    };
    run.setup().await;

    // The schedule: every fault type once, in a seeded order after a baseline phase; the long
    // run then draws phases at random until its time is up.
    let mut first: Vec<Fault> = Fault::ALL[1..].to_vec();
    if !run.s.partition {
        first.retain(|f| *f != Fault::Partition);
    }
    run.rng.shuffle(&mut first);
    first.insert(0, Fault::None);
    let pool = first.clone();
    let mut n = 0;
    loop {
        let fault = if n < first.len() {
            first[n]
        } else {
            match run.s.duration {
                Some(d) if run.started.elapsed() < d => pool[run.rng.below(pool.len())],
                _ => break,
            }
        };
        n += 1;
        run.phase(n, fault).await;
    }
    run.finish(&dir);
}

impl Run {
    fn stat(&mut self) -> &mut Stats {
        self.stats.entry(self.fault).or_default()
    }

    fn fail(&mut self, kind: &'static str, key: &str, node: Option<usize>, detail: String) {
        let phase = self.phase.clone();
        let node = node.map_or_else(
            || "-".to_string(),
            |n| format!("node {} ({})", n + 1, self.cluster.nodes[n].ip),
        );
        if self.failures.len() < 2000 {
            self.failures.push(Failure {
                kind,
                phase,
                key: key.to_string(),
                node,
                detail,
            });
        }
    }

    fn next_marker(&mut self) -> String {
        self.marker += 1;
        format!("mk{}", self.marker)
    }

    /// A value for a report: its markers and which writes made them.
    fn describe(&self, o: &Obs) -> String {
        let ms = o.markers();
        if ms.is_empty() {
            return o.short();
        }
        ms.iter()
            .map(|m| match self.written.get(*m) {
                Some(w) => format!("{m} ({w})"),
                None => m.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn allow_503(&self) -> bool {
        self.db_down || self.db_grace_until.is_some_and(|t| Instant::now() < t)
    }

    fn sleep(d: Duration) -> tokio::time::Sleep {
        tokio::time::sleep(d)
    }

    // ---- reads ----

    /// Asks node `n` for `key` (retrying transport errors a little) and accounts the status.
    async fn read(&mut self, n: usize, key: &Key) -> Option<Obs> {
        let base = self.cluster.nodes[n].base.clone();
        let mut last = String::new();
        for _ in 0..3 {
            match observe(&self.http, &base, key).await {
                Ok(o) => {
                    self.stat().reads += 1;
                    if let Obs::Status(code, body) = &o {
                        self.account(*code, &key.to_string(), n, body);
                    }
                    return Some(o);
                }
                Err(e) => {
                    last = e;
                    Self::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        self.fail(
            "node unreachable",
            &key.to_string(),
            Some(n),
            format!("GET failed 3 times: {last}"),
        );
        None
    }

    /// Accounts an unexpected status (anything but 2xx and the 404 of an absent key).
    fn account(&mut self, code: u16, what: &str, n: usize, body: &str) {
        if code == 503 {
            self.stat().s503 += 1;
            if !self.allow_503() {
                self.fail(
                    "503 outside a database restart",
                    what,
                    Some(n),
                    body.chars().take(200).collect(),
                );
            }
        } else if code >= 500 {
            self.stat().other_5xx += 1;
            self.fail(
                "HTTP 5xx",
                what,
                Some(n),
                format!("{code}: {}", body.chars().take(300).collect::<String>()),
            );
        } else {
            self.fail(
                "unexpected status",
                what,
                Some(n),
                format!("{code}: {}", body.chars().take(300).collect::<String>()),
            );
        }
    }

    // ---- writes ----

    async fn execute(&mut self, w: &Write, origin: Option<usize>) -> Outcome {
        *self.writes_by_kind.entry(w.kind()).or_default() += 1;
        if let Some(m) = w.marker() {
            let via =
                origin.map_or_else(|| "in SQL".to_string(), |n| format!("via node {}", n + 1));
            let what = format!("{} {via} in phase {}", w.kind(), self.phase);
            self.written.insert(m.to_string(), what);
        }
        if let Some(n) = origin {
            let (method, path, tenant, ctype, body) = w.request();
            let url = format!("{}{}", self.cluster.nodes[n].base, path);
            let mut req = self
                .http
                .request(method.clone(), url)
                .header("x-tenant-id", tenant);
            if let Some(ct) = ctype {
                req = req.header("content-type", ct).body(body);
            }
            let what = format!("{method} {path}");
            match req.send().await {
                Ok(r) => {
                    let code = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    if (200..300).contains(&code) {
                        Outcome::Acked(Instant::now())
                    } else {
                        self.account(code, &what, n, &text);
                        if code >= 500 {
                            Outcome::Uncertain
                        } else {
                            Outcome::Rejected
                        }
                    }
                }
                Err(e) => {
                    self.fail("node unreachable", &what, Some(n), e.to_string());
                    Outcome::Uncertain
                }
            }
        } else {
            let res = match w {
                Write::SqlOpt { tenant, id, marker } => {
                    let xml = crate::common::opt_xml(id, marker);
                    self.sql
                        .execute(
                            "INSERT INTO opt (tenant, template_id, original_template_id, content) \
                             VALUES ($1, $2, $2, $3) ON CONFLICT (tenant, template_id) \
                             DO UPDATE SET content = EXCLUDED.content, updated = now()",
                            &[tenant, id, &xml],
                        )
                        .await
                }
                Write::SqlTenant { id, marker } => {
                    let name = format!("n-{marker}");
                    self.sql
                        .execute(
                            "UPDATE tenant SET name = $2, updated = now() WHERE id = $1",
                            &[id, &name],
                        )
                        .await
                }
                _ => unreachable!(),
            };
            match res {
                Ok(1) => Outcome::Acked(Instant::now()),
                Ok(n) => {
                    self.fail(
                        "SQL write hit no row",
                        w.kind(),
                        None,
                        format!("{n} rows: {w:?}"),
                    );
                    Outcome::Rejected
                }
                Err(e) if e.maybe_committed => Outcome::Uncertain,
                Err(_) => Outcome::Rejected,
            }
        }
    }

    /// Populates the caches of every reachable node for the keys `w` changes, makes the write,
    /// records it, and measures how long each node takes to serve the new value.
    async fn write(&mut self, w: Write) -> bool {
        let keys = w.keys();
        let avail = self.cluster.available();
        if avail.is_empty() {
            return false;
        }
        for k in &keys {
            for &n in &avail {
                self.read(n, k).await;
            }
        }
        let origin = w.via_http().then(|| avail[self.rng.below(avail.len())]);
        let outcome = self.execute(&w, origin).await;
        match outcome {
            Outcome::Acked(at) => {
                self.stat().acked += 1;
                for (k, v) in w.values() {
                    let r = self.records.entry(k).or_default();
                    r.acked = Some(v);
                    r.uncertain.clear();
                }
                self.measure(&w, origin, at).await;
                true
            }
            Outcome::Uncertain => {
                self.stat().uncertain += 1;
                for (k, v) in w.values() {
                    self.records.entry(k).or_default().uncertain.push(v);
                }
                false
            }
            Outcome::Rejected => {
                self.stat().rejected += 1;
                false
            }
        }
    }

    /// After a write acknowledged at `at`: polls every running node but the one that made it
    /// until it serves the written value (for a derived key, what the database holds now); nodes
    /// down or paused get it as pending.
    async fn measure(&mut self, w: &Write, origin: Option<usize>, at: Instant) {
        // The harness is the only writer and waits for each write, so once a write is
        // acknowledged the database holds exactly its values.
        let known = w.values();
        let mut wanted = Vec::new();
        for k in w.keys() {
            if let Some((_, v)) = known.iter().find(|(kk, _)| *kk == k) {
                wanted.push((k, v.clone()));
                continue;
            }
            match self.sql.value(&k).await {
                Ok(v) => wanted.push((k, v)),
                Err(_) => self.stat().unmeasured += 1,
            }
        }
        let mut targets = Vec::new();
        for (k, want) in wanted {
            for n in 0..self.cluster.len() {
                if Some(n) == origin {
                    continue;
                }
                if self.cluster.nodes[n].state == State::Up {
                    targets.push((n, k.clone(), want.clone()));
                } else {
                    self.pending[n].insert(k.clone(), want.clone());
                }
            }
        }
        self.converge(targets, at, false).await;
    }

    /// Polls each (node, key) until it answers the wanted value, all of them concurrently in
    /// rounds. Records the time from `from` until the matching answer arrived (time to the new
    /// value, an upper bound of the stale window, which includes time the node answered 503),
    /// and, when the node answered an old value first, when the last such answer arrived (the
    /// stale window seen). One that does not match within the bound is a failure.
    async fn converge(&mut self, targets: Vec<(usize, Key, Obs)>, from: Instant, returned: bool) {
        struct Target {
            n: usize,
            key: Key,
            want: Obs,
            last: Option<Obs>,
            errors: u32,
            /// When the last answer with an old value arrived.
            stale_until: Option<Duration>,
        }
        let mut left: Vec<Target> = targets
            .into_iter()
            .map(|(n, key, want)| Target {
                n,
                key,
                want,
                last: None,
                errors: 0,
                stale_until: None,
            })
            .collect();
        while !left.is_empty() {
            let rounds = left.iter().map(|t| {
                let http = self.http.clone();
                let base = self.cluster.nodes[t.n].base.clone();
                let key = t.key.clone();
                async move {
                    let r = observe(&http, &base, &key).await;
                    (r, Instant::now())
                }
            });
            let results = futures_util::future::join_all(rounds).await;
            let mut still = Vec::new();
            for (mut t, (r, arrived)) in left.into_iter().zip(results) {
                match r {
                    Ok(o) => {
                        self.stat().reads += 1;
                        if let Obs::Status(code, body) = &o {
                            self.account(*code, &t.key.to_string(), t.n, body);
                        }
                        if o == t.want {
                            let d = arrived.duration_since(from);
                            let st = self.stat();
                            st.windows.push(d);
                            if returned {
                                st.after_return.push(d);
                            }
                            if let Some(s) = t.stale_until {
                                st.stale_seen.push(s);
                            }
                        } else {
                            if matches!(o, Obs::Val(_) | Obs::Missing) {
                                t.stale_until = Some(arrived.duration_since(from));
                            }
                            t.last = Some(o);
                            t.errors = 0;
                            still.push(t);
                        }
                    }
                    Err(e) => {
                        t.errors += 1;
                        if t.errors >= 3 {
                            self.fail(
                                "node unreachable",
                                &t.key.to_string(),
                                Some(t.n),
                                format!("GET failed 3 times: {e}"),
                            );
                        } else {
                            still.push(t);
                        }
                    }
                }
            }
            left = still;
            if left.is_empty() {
                break;
            }
            if from.elapsed() > self.s.bound {
                for t in left {
                    self.stat().not_converged += 1;
                    let detail = format!(
                        "still {} {:?} after the write, the database has {}",
                        t.last
                            .as_ref()
                            .map_or("no answer".into(), |g| self.describe(g)),
                        self.s.bound,
                        self.describe(&t.want)
                    );
                    self.fail(
                        "not converged within bound",
                        &t.key.to_string(),
                        Some(t.n),
                        detail,
                    );
                }
                break;
            }
            Self::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A node is back (restarted or resumed) at `from`: measures the writes it missed.
    async fn node_back(&mut self, n: usize, from: Instant) {
        let pending = std::mem::take(&mut self.pending[n]);
        let targets = pending.into_iter().map(|(k, v)| (n, k, v)).collect();
        self.converge(targets, from, true).await;
    }

    async fn pick_writes(&mut self) -> Vec<Write> {
        let marker = self.next_marker();
        let x = self.rng.below(100);
        let (tenant, id) = self.opt_keys[self.rng.below(self.opt_keys.len())].clone();
        let ab = ["chaos-a", "chaos-b"][self.rng.below(2)].to_string();
        match x {
            0..=29 => vec![Write::PutOpt { tenant, id, marker }],
            30..=44 => vec![Write::SqlOpt { tenant, id, marker }],
            45..=48 => {
                match self
                    .sql
                    .exists(
                        "SELECT 1 FROM opt WHERE tenant = $1 AND template_id = $2",
                        &[&tenant, &id],
                    )
                    .await
                {
                    Ok(true) => vec![Write::DeleteOpt { tenant, id }],
                    Ok(false) => vec![Write::PutOpt { tenant, id, marker }],
                    Err(_) => vec![],
                }
            }
            49..=63 => vec![Write::PutContext {
                id: format!("opt{}", self.rng.below(3)),
                marker,
            }],
            64..=75 => {
                let i = self.rng.below(2);
                vec![Write::PutModel {
                    model: format!("mdl{i}"),
                    template: format!("mt{i}"),
                    marker,
                }]
            }
            76..=83 => vec![Write::PutTenant { id: ab, marker }],
            84..=91 => vec![Write::SqlTenant { id: ab, marker }],
            _ => {
                match self
                    .sql
                    .exists("SELECT 1 FROM tenant WHERE id = $1", &[&SCRATCH])
                    .await
                {
                    Ok(true) => vec![Write::DeleteTenant { id: SCRATCH.into() }],
                    Ok(false) => {
                        let m2 = self.next_marker();
                        vec![
                            Write::PutTenant {
                                id: SCRATCH.into(),
                                marker,
                            },
                            Write::PutOpt {
                                tenant: SCRATCH.into(),
                                id: "s0".into(),
                                marker: m2,
                            },
                        ]
                    }
                    Err(_) => vec![],
                }
            }
        }
    }

    /// One workload step: a read of two random keys on every reachable node, or a write.
    async fn step(&mut self) {
        self.reap();
        if self.cluster.available().is_empty() {
            Self::sleep(Duration::from_millis(10)).await;
            return;
        }
        if self.rng.below(100) < 25 {
            for _ in 0..2 {
                let k = self.keys[self.rng.below(self.keys.len())].clone();
                for n in self.cluster.available() {
                    self.read(n, &k).await;
                }
            }
            return;
        }
        for w in self.pick_writes().await {
            if !self.write(w).await {
                break;
            }
        }
    }

    async fn run_for(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.step().await;
        }
    }

    /// Nodes that died without the harness killing them: a failure each; restarted so the run
    /// goes on.
    fn reap(&mut self) {
        for (i, status) in self.cluster.reap_unexpected() {
            let tail = self.cluster.log_tail(i, 30);
            self.fail(
                "node died",
                "-",
                Some(i),
                format!("exited by itself ({status}); log tail:\n{tail}"),
            );
            self.cluster.spawn(i);
        }
    }

    async fn setup(&mut self) {
        let mut writes = Vec::new();
        for t in ["chaos-a", "chaos-b"] {
            writes.push(Write::PutTenant {
                id: t.into(),
                marker: self.next_marker(),
            });
        }
        for (tenant, id) in self.opt_keys.clone() {
            writes.push(Write::PutOpt {
                tenant,
                id,
                marker: self.next_marker(),
            });
        }
        for i in 0..3 {
            writes.push(Write::PutContext {
                id: format!("opt{i}"),
                marker: self.next_marker(),
            });
        }
        for i in 0..2 {
            writes.push(Write::PutModel {
                model: format!("mdl{i}"),
                template: format!("mt{i}"),
                marker: self.next_marker(),
            });
        }
        for w in writes {
            assert!(
                matches!(self.execute(&w, Some(0)).await, Outcome::Acked(_)),
                "setup write {w:?} failed: {:?}",
                self.failures
            );
            for (k, v) in w.values() {
                self.records.entry(k).or_default().acked = Some(v);
            }
        }
        // The two templates of the helper keys, with contexts naming their models; never changed.
        let base = self.cluster.nodes[0].base.clone();
        for i in 0..2 {
            for (path, ctype, body) in [
                (
                    format!("/opt/mt{i}"),
                    "application/xml",
                    crate::common::opt_xml(&format!("mt{i}"), "fixed"),
                ),
                (
                    format!("/fc/context/mt{i}"),
                    "application/yaml",
                    model_context_yaml(&format!("mt{i}"), &format!("mdl{i}")),
                ),
            ] {
                let r = self
                    .http
                    .put(format!("{base}{path}"))
                    .header("content-type", ctype)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let code = r.status();
                assert!(
                    code.is_success(),
                    "setup PUT {path}: {code} {}",
                    r.text().await.unwrap_or_default()
                );
            }
        }
        // Every key answers on every node as the database says before anything is injected.
        self.phase = "setup".into();
        self.check().await;
        assert!(
            self.failures.is_empty(),
            "the cluster is not coherent before any fault: {:#?}",
            self.failures
        );
    }

    // ---- phases ----

    async fn phase(&mut self, n: usize, fault: Fault) {
        let long = self.s.duration.is_some();
        let target = self.rng.below(self.cluster.len());
        let node = format!("node {} ({})", target + 1, self.cluster.nodes[target].ip);
        self.fault = fault;
        self.phase = match fault {
            Fault::None | Fault::KillListeners | Fault::RestartPg => {
                format!("#{n} {}", fault.name())
            }
            _ => format!("#{n} {} [{node}]", fault.name()),
        };
        let fails_before = self.failures.len();
        let acked_before = self.stats.get(&fault).map_or(0, |s| s.acked);
        let phase_started = Instant::now();
        self.stat().phases += 1;

        let pre = if long {
            self.rng.millis(500, 2000)
        } else {
            Duration::from_millis(800)
        };
        self.run_for(pre).await;

        let mut note = String::from("no fault");
        match fault {
            Fault::None => {
                let d = if long {
                    self.rng.millis(1000, 5000)
                } else {
                    Duration::from_millis(2000)
                };
                self.run_for(d).await;
            }
            Fault::Kill9 => {
                let down = if long {
                    self.rng.millis(300, 5000)
                } else {
                    Duration::from_millis(1500)
                };
                self.cluster.kill9(target);
                self.run_for(down).await;
                self.cluster.spawn(target);
                match self
                    .cluster
                    .wait_ready(target, Duration::from_secs(60))
                    .await
                {
                    Ok(t) => note = format!("down {down:?}, ready {t:.1?} after restart"),
                    Err(e) => panic!("{}: the node does not come back: {e}", self.phase),
                }
                self.node_back(target, Instant::now()).await;
            }
            Fault::Partition => {
                let d = if long {
                    self.rng.millis(1000, 8000)
                } else {
                    Duration::from_millis(3000)
                };
                let ip = self.cluster.nodes[target].ip.clone();
                let fw = self.fw.as_mut().expect("partition needs the firewall");
                if let Err(e) = fw.cut(&ip) {
                    panic!("cannot cut {ip}'s peer traffic: {e}");
                }
                self.run_for(d).await;
                // The cut must be real: another node no longer hears the target.
                let observer = (target + 1) % self.cluster.len();
                let seen = self.cluster.peer_state(observer, &ip).await;
                if seen.as_deref() == Some("alive") {
                    self.fail(
                        "fault not effective",
                        "-",
                        Some(target),
                        format!(
                            "node {} still sees it alive after {d:?} without peer traffic",
                            observer + 1
                        ),
                    );
                }
                if let Err(e) = self.fw.as_mut().unwrap().heal() {
                    panic!("cannot restore {ip}'s peer traffic: {e}");
                }
                note = format!(
                    "cut for {d:?}; node {} saw it {}",
                    observer + 1,
                    seen.as_deref().unwrap_or("unlisted")
                );
            }
            Fault::KillListeners => {
                let (kills, every) = if long {
                    (self.rng.below(5) + 1, self.rng.millis(200, 1500))
                } else {
                    (3, Duration::from_millis(1000))
                };
                let mut killed = 0;
                let mut slowest = Duration::ZERO;
                for _ in 0..kills {
                    killed += self.kill_listeners().await;
                    // Workload goes on while the listeners reconnect; how long that takes is
                    // sampled between steps.
                    let t = Instant::now();
                    // With OPENFHIR_PG_NOTIFY=false (CHAOS_NODE_ENV) there are no listeners.
                    let notify_off = self
                        .s
                        .node_env
                        .iter()
                        .any(|(k, v)| k == "OPENFHIR_PG_NOTIFY" && v == "false");
                    let mut back = notify_off.then_some(Duration::ZERO);
                    while t.elapsed() < every || (back.is_none() && t.elapsed() < self.s.bound) {
                        self.step().await;
                        if back.is_none() && self.listeners_up().await {
                            back = Some(t.elapsed());
                        }
                    }
                    match back {
                        Some(d) => {
                            slowest = slowest.max(d);
                            self.stat().listener_reconnect.push(d);
                        }
                        None => self.fail(
                            "listeners did not reconnect",
                            "-",
                            None,
                            format!(
                                "not every node has its LISTEN connection {:?} after they were killed",
                                self.s.bound
                            ),
                        ),
                    }
                }
                note = format!(
                    "{killed} LISTEN connections killed in {kills} rounds {every:?} apart, all back within {slowest:.0?}"
                );
            }
            Fault::RestartPg => {
                let (immediate, down) = if long {
                    (self.rng.chance(0.5), self.rng.millis(0, 3000))
                } else {
                    (false, Duration::ZERO)
                };
                let server = self.server.clone();
                self.db_down = true;
                let h = std::thread::spawn(move || {
                    if immediate {
                        server.kill();
                    } else {
                        server.stop();
                    }
                    std::thread::sleep(down);
                    server.start();
                });
                let t = Instant::now();
                while !h.is_finished() {
                    self.step().await;
                }
                if let Err(p) = h.join() {
                    std::panic::resume_unwind(p);
                }
                note = format!(
                    "{} stop, {:.1?} until it answered again",
                    if immediate { "immediate" } else { "fast" },
                    t.elapsed()
                );
                self.db_down = false;
                self.db_grace_until = Some(Instant::now() + Duration::from_secs(3));
            }
            Fault::Pause => {
                let d = if long {
                    self.rng.millis(300, 6000)
                } else {
                    Duration::from_millis(2500)
                };
                self.cluster.pause(target);
                self.run_for(d).await;
                self.cluster.resume(target);
                self.node_back(target, Instant::now()).await;
                note = format!("paused {d:?}");
            }
        }

        let post = if long {
            self.rng.millis(500, 2000)
        } else {
            Duration::from_millis(1000)
        };
        self.run_for(post).await;
        Self::sleep(self.s.settle).await;
        self.check().await;
        self.db_grace_until = None;

        let st = self.stats.get(&fault).unwrap();
        let new_fails = self.failures.len() - fails_before;
        println!(
            "chaos [{:>5.1} s] phase {}: {} writes acked; {} ({:.1} s){}",
            self.started.elapsed().as_secs_f64(),
            self.phase,
            st.acked - acked_before,
            note,
            phase_started.elapsed().as_secs_f64(),
            if new_fails > 0 {
                format!("; {new_fails} FAILURES")
            } else {
                String::new()
            }
        );
    }

    async fn kill_listeners(&mut self) -> u64 {
        match self
            .sql
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name LIKE 'openfhir-cache/%/listener'",
                &[],
            )
            .await
        {
            Ok(rows) => rows.len() as u64,
            Err(e) => {
                self.fail("harness SQL failed", "-", None, e.message);
                0
            }
        }
    }

    /// Whether every node has its LISTEN connection.
    async fn listeners_up(&mut self) -> bool {
        let want = self.cluster.len() as i64;
        match self
            .sql
            .query(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name LIKE 'openfhir-cache/%/listener'",
                &[],
            )
            .await
        {
            Ok(rows) => rows[0].get::<_, i64>(0) >= want,
            Err(_) => false,
        }
    }

    // ---- the checker ----

    /// With the workload stopped and the fault healed: every key on every node against the
    /// database, then every acknowledged write against the database.
    async fn check(&mut self) {
        for key in self.keys.clone() {
            let mut want = None;
            for _ in 0..100 {
                if let Ok(v) = self.sql.value(&key).await {
                    want = Some(v);
                    break;
                }
                Self::sleep(Duration::from_millis(100)).await;
            }
            let Some(want) = want else {
                self.fail("database unreadable", &key.to_string(), None, "10 s".into());
                continue;
            };
            for n in 0..self.cluster.len() {
                if self.cluster.nodes[n].state != State::Up {
                    continue;
                }
                let got = self.read(n, &key).await;
                if got.as_ref() != Some(&want) {
                    self.stat().stale += 1;
                    // How long it stays stale, for the report.
                    let t = Instant::now();
                    let mut last = got.clone();
                    while t.elapsed() < self.s.bound && last.as_ref() != Some(&want) {
                        Self::sleep(Duration::from_millis(20)).await;
                        last = self.read(n, &key).await;
                    }
                    let after = if last.as_ref() == Some(&want) {
                        format!("served the database's value {:.0?} later", t.elapsed())
                    } else {
                        format!("still stale {:?} later", self.s.bound)
                    };
                    self.fail(
                        "stale value",
                        &key.to_string(),
                        Some(n),
                        format!(
                            "served {} while the database has {} ({:?} after the workload stopped); {after}",
                            got.as_ref().map_or("no answer".into(), |g| self.describe(g)),
                            self.describe(&want),
                            self.s.settle
                        ),
                    );
                }
            }
        }
        // No acknowledged write lost: the database holds the last acknowledged value, or the value
        // of a later write whose outcome was unknown.
        let keys: Vec<Key> = self.records.keys().cloned().collect();
        for key in keys {
            let Ok(db) = self.sql.value(&key).await else {
                continue;
            };
            let r = &self.records[&key];
            let Some(acked) = &r.acked else { continue };
            if &db != acked && !r.uncertain.contains(&db) {
                let detail = format!(
                    "the database has {}, the last acknowledged write {} (later writes of unknown outcome: {})",
                    self.describe(&db),
                    self.describe(acked),
                    r.uncertain
                        .iter()
                        .map(Obs::short)
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                self.stat().lost += 1;
                self.fail("lost write", &key.to_string(), None, detail);
            }
        }
    }

    // ---- the end ----

    fn finish(mut self, dir: &std::path::Path) {
        self.phase = "end".into();
        self.reap();
        for i in 0..self.cluster.len() {
            let log = std::fs::read_to_string(&self.cluster.nodes[i].log).unwrap_or_default();
            let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
            if !panics.is_empty() {
                self.fail(
                    "panic in a node",
                    "-",
                    Some(i),
                    panics
                        .iter()
                        .take(5)
                        .copied()
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            }
        }
        let elapsed = self.started.elapsed();
        let total_writes: u64 = self.stats.values().map(|s| s.acked).sum();
        let reads: u64 = self.stats.values().map(|s| s.reads).sum();
        println!(
            "\nchaos {} finished: seed {:#x}, {} nodes, {:.0} s, {} writes acknowledged, {} reads; \
             node starts {:?}",
            self.s.name,
            self.s.seed,
            self.s.nodes,
            elapsed.as_secs_f64(),
            total_writes,
            reads,
            self.cluster.nodes.iter().map(|n| n.starts).collect::<Vec<_>>()
        );
        println!(
            "writes by kind: {}",
            self.writes_by_kind
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let reconnects: Vec<Duration> = self
            .stats
            .values()
            .flat_map(|s| s.listener_reconnect.iter().copied())
            .collect();
        if let Some(max) = reconnects.iter().max() {
            println!("LISTEN connections all back at most {max:.0?} after a kill");
        }
        println!("\n{}", report::table(&self.stats));

        if self.failures.is_empty() {
            if !self.s.keep_logs {
                drop(self.cluster);
                let _ = std::fs::remove_dir_all(dir);
            }
            return;
        }
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &self.failures {
            *by_kind.entry(f.kind).or_default() += 1;
        }
        let mut msg = format!(
            "chaos {} (seed {:#x}) found {} failures ({by_kind:?}); node logs in {}\n",
            self.s.name,
            self.s.seed,
            self.failures.len(),
            dir.display()
        );
        for f in self.failures.iter().take(60) {
            msg.push_str(&format!(
                "- {} | key {} | {} | fault {} | {}\n",
                f.kind, f.key, f.node, f.phase, f.detail
            ));
        }
        panic!("{msg}");
    }
}
