//! A scenario: its network ([`Net`]), a private PostgreSQL reached over the bridge, and the
//! `openfhir-cache serve` processes, each started with `ip netns exec <ns>` in its own namespace.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::pg::PrivateServer;
use crate::common::proc::{ChildGuard, BIN};
use crate::net::Net;

/// HTTP port of every node (each in its own namespace, so all use the same).
pub const HTTP_PORT: u16 = 8080;
/// Cluster port of every node.
pub const CLUSTER_PORT: u16 = 7800;

/// One node: where it lives and its process, if running.
pub struct Node {
    pub ns: String,
    /// Its IPv4 address on the bridge.
    pub ip: String,
    /// Its IPv6 address on the bridge.
    pub ip6: String,
    /// `http://ip:8080`.
    pub base: String,
    /// The node's own settings, added to the scenario's.
    pub env: Vec<(String, String)>,
    pub starts: AtomicU32,
    proc: Mutex<Option<ChildGuard>>,
}

/// The node log directory: removed when the test passed (kept when it panicked, or with
/// `NETNS_KEEP_LOGS=1`).
struct LogDir(PathBuf);

impl Drop for LogDir {
    fn drop(&mut self) {
        let keep = std::env::var("NETNS_KEEP_LOGS").is_ok_and(|v| v == "1");
        if !std::thread::panicking() && !keep {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Fields drop in order: the nodes, their logs, then PostgreSQL, then the network.
pub struct Scenario {
    pub nodes: Vec<Node>,
    _logs: LogDir,
    /// Held for its lifetime: dropped (stopped) after the nodes.
    _pg: PrivateServer,
    pub net: Net,
    pub name: &'static str,
    /// Node logs, `<target>/netns/<name>-<pid>/` (kept when the test fails).
    pub dir: PathBuf,
    /// `DATABASE_URL` of the nodes and of the test's own SQL: the bridge address.
    pub db_url: String,
    /// Settings of every node.
    pub env: Vec<(String, String)>,
    pub http: reqwest::Client,
    /// Peers are identified by their IPv6 address in `/cluster` (IPv6 scenario).
    pub v6_cluster: bool,
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

/// `NETNS_NODE_ENV=K=V,K=V`: extra settings for every node (by hand, e.g. to show the checks
/// fail with `OPENFHIR_PG_NOTIFY=false,OPENFHIR_CATCHUP_INTERVAL_MS=0`).
fn extra_env() -> Vec<(String, String)> {
    std::env::var("NETNS_NODE_ENV")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("NETNS_NODE_ENV: {kv:?} is not K=V"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

impl Scenario {
    /// The network (`nodes + extra_ns` namespaces) and PostgreSQL; no node runs yet. `env` is
    /// given to every node besides the database, HTTP and log settings.
    pub fn new(
        id: u8,
        name: &'static str,
        nodes: usize,
        extra_ns: usize,
        env: &[(&str, &str)],
    ) -> Scenario {
        let net = Net::new(id, nodes + extra_ns);
        let (bridge_ip, subnet) = (net.bridge_ip(), net.subnet());
        // PostgreSQL listens on the bridge too (nodes reach it over their veth, so a partition
        // cuts a node off its database as well) and trusts the bridge's subnet.
        let pg = PrivateServer::with_setup(move |data| {
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))
                .expect("postgresql.conf");
            writeln!(conf, "listen_addresses = '127.0.0.1,{bridge_ip}'").unwrap();
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .expect("pg_hba.conf");
            writeln!(hba, "host all all {subnet} trust").unwrap();
        });
        let db_url = format!(
            "postgres://postgres@{}:{}/postgres?sslmode=disable",
            net.bridge_ip(),
            pg.port()
        );
        let dir = target_dir()
            .join("netns")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut all_env: Vec<(String, String)> = [
            ("DATABASE_URL", db_url.as_str()),
            ("OPENFHIR_HTTP_ADDR", "0.0.0.0:8080"),
            ("OPENFHIR_BOOTSTRAP_DIR", ""),
            ("OPENFHIR_DB_POOL_SIZE", "4"),
            ("RUST_LOG", "info"),
            ("NO_COLOR", "1"),
        ]
        .iter()
        .chain(env)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra_env() {
            all_env.retain(|(ek, _)| *ek != k);
            all_env.push((k, v));
        }
        let nodes = (0..nodes)
            .map(|i| Node {
                ns: net.ns[i].clone(),
                ip: net.ip(i),
                ip6: net.ip6(i),
                base: format!("http://{}:{HTTP_PORT}", net.ip(i)),
                env: Vec::new(),
                starts: AtomicU32::new(0),
                proc: Mutex::new(None),
            })
            .collect();
        Scenario {
            nodes,
            _logs: LogDir(dir.clone()),
            _pg: pg,
            net,
            name,
            dir,
            db_url,
            env: all_env,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .connect_timeout(Duration::from_secs(1))
                .build()
                .unwrap(),
            v6_cluster: false,
        }
    }

    /// Starts node `i` in its namespace. Call from the test's own thread: each node gets
    /// `PR_SET_PDEATHSIG = SIGKILL`, so it dies with that thread even if the test is killed.
    pub fn spawn(&self, i: usize) {
        let n = &self.nodes[i];
        let mut proc = n.proc.lock().unwrap();
        assert!(proc.is_none(), "node {i} already runs");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &n.ns, BIN, "serve"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(n.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let start = n.starts.fetch_add(1, Ordering::SeqCst) + 1;
        *proc = Some(ChildGuard::spawn(
            cmd,
            &self.dir,
            &format!("node{i}-start{start}"),
        ));
    }

    /// Waits until node `i` answers `GET /health/ready` with 200 over the bridge.
    pub async fn wait_ready(&self, i: usize, limit: Duration) {
        let started = Instant::now();
        let url = format!("{}/health/ready", self.nodes[i].base);
        loop {
            if !self.running(i) {
                panic!(
                    "{}: node {i} exited during startup:\n{}",
                    self.name,
                    self.stderr(i)
                );
            }
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if started.elapsed() > limit {
                panic!(
                    "{}: node {i} not ready at {url} within {limit:?}:\n{}",
                    self.name,
                    self.stderr(i)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts every node: the first alone (it migrates the schema), then the others together.
    pub async fn start_all(&self) {
        self.spawn(0);
        self.wait_ready(0, Duration::from_secs(60)).await;
        for i in 1..self.nodes.len() {
            self.spawn(i);
        }
        for i in 1..self.nodes.len() {
            self.wait_ready(i, Duration::from_secs(60)).await;
        }
    }

    /// SIGTERM node `i` and wait (bounded) for it to exit.
    pub async fn stop(&self, i: usize) {
        let taken = self.nodes[i].proc.lock().unwrap().take();
        let mut p = taken.expect("node runs");
        p.sigterm().await;
        if p.wait_for_exit(Duration::from_secs(30)).is_none() {
            panic!(
                "{}: node {i} did not exit within 30 s of SIGTERM:\n{}",
                self.name,
                p.stderr()
            );
        }
    }

    /// The address node `j` has in the others' `/cluster` peer list.
    fn cluster_ip(&self, j: usize) -> String {
        if self.v6_cluster {
            format!("[{}]:", self.nodes[j].ip6)
        } else {
            format!("{}:", self.nodes[j].ip)
        }
    }

    /// `GET /cluster` of node `i`.
    pub async fn cluster_json(&self, i: usize) -> Option<serde_json::Value> {
        let url = format!("{}/cluster", self.nodes[i].base);
        self.http.get(&url).send().await.ok()?.json().await.ok()
    }

    /// The peer addresses node `i` lists as alive.
    pub async fn alive_peers(&self, i: usize) -> Vec<String> {
        self.cluster_json(i)
            .await
            .and_then(|v| {
                v["cluster"]["peers"].as_array().map(|ps| {
                    ps.iter()
                        .filter(|p| p["state"] == "alive")
                        .filter_map(|p| p["addr"].as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Which of the wanted links (`i` sees `j` alive) are missing now.
    pub async fn missing_links(&self, pairs: &[(usize, usize)]) -> Vec<String> {
        let mut missing = Vec::new();
        for &(i, j) in pairs {
            let want = self.cluster_ip(j);
            if !self
                .alive_peers(i)
                .await
                .iter()
                .any(|a| a.starts_with(&want))
            {
                missing.push(format!("node {i} does not see node {j} ({want}..) alive"));
            }
        }
        missing
    }

    /// Every ordered pair of distinct nodes among `nodes`.
    pub fn all_pairs(nodes: &[usize]) -> Vec<(usize, usize)> {
        let mut pairs = Vec::new();
        for &i in nodes {
            for &j in nodes {
                if i != j {
                    pairs.push((i, j));
                }
            }
        }
        pairs
    }

    /// Waits until every pair in `pairs` is linked; panics with what is missing and the
    /// `/cluster` of each node otherwise.
    pub async fn wait_links(&self, pairs: &[(usize, usize)], limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let missing = self.missing_links(pairs).await;
            if missing.is_empty() {
                return started.elapsed();
            }
            if started.elapsed() > limit {
                let mut views = String::new();
                for i in 0..self.nodes.len() {
                    views.push_str(&format!(
                        "\n--- node {i} /cluster: {}",
                        self.cluster_json(i)
                            .await
                            .map(|v| v["cluster"].to_string())
                            .unwrap_or_else(|| "(no answer)".into())
                    ));
                }
                panic!(
                    "{}: the cluster did not form within {limit:?}: {}{views}\nlogs in {}",
                    self.name,
                    missing.join("; "),
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether node `i`'s process is running.
    pub fn running(&self, i: usize) -> bool {
        self.nodes[i]
            .proc
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|p| p.is_running())
    }

    /// Node `i`'s stderr (its current process).
    pub fn stderr(&self, i: usize) -> String {
        self.nodes[i]
            .proc
            .lock()
            .unwrap()
            .as_ref()
            .map(|p| p.stderr())
            .unwrap_or_default()
    }

    /// Panics naming any node that died or logged a panic.
    pub fn assert_healthy(&self) {
        for i in 0..self.nodes.len() {
            if !self.running(i) {
                panic!("{}: node {i} died:\n{}", self.name, self.stderr(i));
            }
        }
        for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            assert!(
                !text.contains("panicked"),
                "{}: {} logged a panic:\n{text}",
                self.name,
                entry.path().display()
            );
        }
    }
}
