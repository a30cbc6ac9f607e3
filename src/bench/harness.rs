//! What every scenario needs: the database (throwaway or in place), nodes on loopback
//! addresses, a SQL connection, progress output, and cleanup.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{BenchError, BenchOptions, BenchResult, Sizes};
use crate::app::{self, Running, ServeOptions};
use crate::config::Config;
use crate::node::Node;

/// The cluster port every bench node uses, each on its own loopback address.
const CLUSTER_PORT: u16 = 7800;
/// Second octet of the loopback addresses the bench nodes get (127.77.x.y): away from
/// 127.0.0.x, which the tests and the local-cluster script use.
const LOOPBACK_NET: u8 = 77;

/// The shared state of one run.
pub struct Harness {
    /// The database URL the nodes use.
    pub url: String,
    /// The tenant every scenario works in.
    pub tenant: String,
    /// The run's sizes.
    pub sizes: Sizes,
    /// Progress output.
    pub progress: Progress,
    /// Redis for the pub/sub baseline.
    pub redis_url: Option<String>,
    /// True when running in the given database rather than a throwaway one.
    pub in_place: bool,
    /// `(admin URL, database name)` of the throwaway database, dropped at cleanup.
    throwaway: Option<(String, String)>,
    next_ip: AtomicU32,
    /// Nodes started and not stopped yet (stopped at cleanup, e.g. after Ctrl-C).
    live: Mutex<Vec<Running>>,
}

/// How the nodes of a fleet find each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linking {
    /// One cluster: the peer channel connects every pair.
    Cluster,
    /// Every node a cluster of its own: no peer channel between them.
    Separate,
}

/// The settings of the nodes of one fleet.
#[derive(Debug, Clone, Copy)]
pub struct NodeSpec {
    /// `OPENFHIR_PG_NOTIFY`.
    pub notify: bool,
    /// `OPENFHIR_CATCHUP_INTERVAL_MS`.
    pub catchup_ms: u64,
    /// TTL -1 (cached) or TTL 0 for every group.
    pub cached: bool,
    /// `OPENFHIR_DB_POOL_SIZE`.
    pub pool: usize,
}

/// The `CLUSTER_SECRET` of every benchmark fleet.
pub const BENCH_CLUSTER_SECRET: &str = "openfhir-cache-bench-cluster-secret";

impl NodeSpec {
    /// A cached node with only the peer channel (no NOTIFY, no periodic catch-up).
    pub fn peer_only() -> NodeSpec {
        NodeSpec {
            notify: false,
            catchup_ms: 0,
            cached: true,
            pool: 4,
        }
    }
}

/// Nodes started together.
pub struct Fleet {
    /// The running nodes, in start order.
    pub nodes: Vec<Running>,
    /// A node running as a child process (killed when dropped), if asked for.
    pub child: Option<tokio::process::Child>,
}

impl Fleet {
    /// Node `i`.
    pub fn node(&self, i: usize) -> &Arc<Node> {
        &self.nodes[i].node
    }

    /// `http://ip:port` of node `i`.
    pub fn base(&self, i: usize) -> String {
        format!("http://{}", self.nodes[i].addr)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Waits until every node sends to and receives from every other (`Linking::Cluster`).
    pub async fn wait_mesh(&self, limit: Duration) -> BenchResult<()> {
        let n = self.nodes.len() + usize::from(self.child.is_some());
        let deadline = Instant::now() + limit;
        loop {
            let ready = self.nodes.iter().all(|r| {
                let peers = r.node.cluster().peers();
                peers
                    .iter()
                    .filter(|p| {
                        p.inbound && p.outbound && p.state == crate::cluster::PeerState::Alive
                    })
                    .count()
                    >= n - 1
            });
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Setup(format!(
                    "a cluster of {n} nodes did not connect every pair within {} s",
                    limit.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Harness {
    /// Connects, creates the throwaway database (unless in place) and migrates it.
    pub async fn setup(opts: &BenchOptions, sizes: Sizes) -> BenchResult<Harness> {
        let pid = std::process::id();
        let (url, throwaway) = if opts.in_place {
            (opts.database_url.clone(), None)
        } else {
            let name = format!("openfhir_bench_{pid}");
            let admin = connect(&opts.database_url, "connect to the PostgreSQL server").await?;
            drop_database(&admin, &name).await?;
            admin
                .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await
                .map_err(sql(format!(
                    "create the throwaway database {name} (the role needs CREATEDB; or run with \
                     --in-place)"
                )))?;
            (
                with_database(&opts.database_url, &name)?,
                Some((opts.database_url.clone(), name)),
            )
        };
        let tenant = if opts.in_place {
            format!("openfhir_bench_{pid}")
        } else {
            "bench".to_string()
        };
        let h = Harness {
            url,
            tenant,
            sizes,
            progress: Progress::new(),
            redis_url: opts.redis_url.clone(),
            in_place: opts.in_place,
            throwaway,
            next_ip: AtomicU32::new(0),
            live: Mutex::new(Vec::new()),
        };
        // Migrate once, so that the nodes start without racing for the advisory lock.
        let config = Config::from_sources(None, |k| (k == "DATABASE_URL").then(|| h.url.clone()))?;
        let db = crate::store::Db::new(&config.database, "openfhir-cache/bench")
            .map_err(node_err("open the database pool"))?;
        let migrated = db.migrate().await.map_err(node_err("migrate the database"));
        db.close();
        if let Err(e) = migrated {
            let _ = h.cleanup().await;
            return Err(e);
        }
        Ok(h)
    }

    /// A fresh SQL connection to the bench database.
    pub async fn sql(&self) -> BenchResult<tokio_postgres::Client> {
        connect(&self.url, "connect to the bench database").await
    }

    /// A free loopback address for the next node.
    fn next_addr(&self) -> BenchResult<Ipv4Addr> {
        for _ in 0..1000 {
            let n = self.next_ip.fetch_add(1, Ordering::Relaxed);
            let ip = Ipv4Addr::new(127, LOOPBACK_NET, (n / 200) as u8, (10 + n % 200) as u8);
            // Probe both the cluster port and any HTTP port; another bench run may hold it.
            if std::net::TcpListener::bind(SocketAddr::from((ip, CLUSTER_PORT))).is_ok() {
                return Ok(ip);
            }
        }
        Err(BenchError::Setup(
            "no free loopback address for a bench node (127.77.x.y:7800 all taken)".into(),
        ))
    }

    /// Starts `n` nodes on their own loopback addresses, linked as asked, and waits until a
    /// cluster's every pair is connected.
    pub async fn start_fleet(
        &self,
        n: usize,
        linking: Linking,
        spec: NodeSpec,
    ) -> BenchResult<Fleet> {
        self.start_fleet_with(n, linking, spec, false).await
    }

    /// [`Harness::start_fleet`], with the last of the `n` nodes run as a child process
    /// (`openfhir-cache serve`) when `child` is true, so that its memory and sockets can be read
    /// from `/proc`. Needs this program to be the `openfhir-cache` binary.
    pub async fn start_fleet_with(
        &self,
        n: usize,
        linking: Linking,
        spec: NodeSpec,
        child: bool,
    ) -> BenchResult<Fleet> {
        let ips = (0..n)
            .map(|_| self.next_addr())
            .collect::<BenchResult<Vec<_>>>()?;
        let tag = format!("{:x}", std::process::id());
        let first = self.next_ip.load(Ordering::Relaxed);
        let all_hosts = ips
            .iter()
            .map(|ip| format!("{ip}[{CLUSTER_PORT}]"))
            .collect::<Vec<_>>()
            .join(",");
        let mut envs = Vec::with_capacity(n);
        for (i, ip) in ips.iter().enumerate() {
            let (name, hosts) = match linking {
                Linking::Cluster => (format!("bench-{tag}-{first}"), all_hosts.clone()),
                Linking::Separate => (
                    format!("bench-{tag}-{first}-{i}"),
                    format!("{ip}[{CLUSTER_PORT}]"),
                ),
            };
            envs.push(self.node_env(*ip, name, hosts, spec));
        }
        let child_env = if child { envs.pop() } else { None };
        let mut configs = Vec::with_capacity(envs.len());
        for env in envs {
            let map: HashMap<&str, String> = env.into_iter().collect();
            configs.push(Config::from_sources(None, |k| map.get(k).cloned())?);
        }
        let started = futures_util::future::join_all(
            configs
                .into_iter()
                .map(|c| app::start(c, ServeOptions { no_migrate: true })),
        )
        .await;
        let mut fleet = Fleet {
            nodes: Vec::with_capacity(n),
            child: None,
        };
        let mut failure = None;
        for r in started {
            match r {
                Ok(r) => fleet.nodes.push(r),
                Err(e) => {
                    failure = Some(BenchError::Node {
                        what: "start a bench node",
                        source: e,
                    })
                }
            }
        }
        if let (None, Some(env)) = (&failure, child_env) {
            match spawn_child(env) {
                Ok(c) => fleet.child = Some(c),
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            self.stop(fleet).await;
            return Err(e);
        }
        if linking == Linking::Cluster && n > 1 {
            if let Err(e) = fleet.wait_mesh(Duration::from_secs(30)).await {
                self.stop(fleet).await;
                return Err(e);
            }
        }
        Ok(fleet)
    }

    /// The settings of one node, as environment variables.
    fn node_env(
        &self,
        ip: Ipv4Addr,
        name: String,
        hosts: String,
        spec: NodeSpec,
    ) -> Vec<(&'static str, String)> {
        let ttl = if spec.cached { "-1" } else { "0" };
        vec![
            ("DATABASE_URL", self.url.clone()),
            ("OPENFHIR_HTTP_ADDR", format!("{ip}:0")),
            ("OPENFHIR_DB_POOL_SIZE", spec.pool.to_string()),
            ("OPENFHIR_PG_NOTIFY", spec.notify.to_string()),
            ("OPENFHIR_CATCHUP_INTERVAL_MS", spec.catchup_ms.to_string()),
            ("OPENFHIR_CACHE_OPT_TTL", ttl.into()),
            ("OPENFHIR_CACHE_FHIR_CONNECT_TTL", ttl.into()),
            ("OPENFHIR_CACHE_TENANT_TTL", ttl.into()),
            ("CLUSTER_DISCOVERY", "TCP".into()),
            ("CLUSTER_INITIAL_HOSTS", hosts),
            ("CLUSTER_BIND_ADDR", ip.to_string()),
            ("CLUSTER_PORT", CLUSTER_PORT.to_string()),
            ("CLUSTER_NAME", name),
            // 200 ms heartbeats: peers are alive (and the mesh detected) quickly.
            ("CLUSTER_HEARTBEAT_MS", "200".into()),
            // As in production: the peer channel is encrypted (Noise), so its cost is measured.
            ("CLUSTER_SECRET", BENCH_CLUSTER_SECRET.into()),
        ]
    }

    /// Stops every node of the fleet (gracefully, all at once).
    pub async fn stop(&self, mut fleet: Fleet) {
        if let Some(mut c) = fleet.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        futures_util::future::join_all(fleet.nodes.drain(..).map(|r| async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), r.shutdown()).await;
        }))
        .await;
    }

    /// Stops what is still running, removes what the run wrote (in place) or drops the
    /// throwaway database.
    pub async fn cleanup(&self) -> BenchResult<()> {
        let live: Vec<Running> = self
            .live
            .lock()
            .map(|mut l| l.drain(..).collect())
            .unwrap_or_default();
        for r in live {
            r.abort();
        }
        if let Some((admin_url, name)) = &self.throwaway {
            let admin = connect(admin_url, "connect to the PostgreSQL server").await?;
            drop_database(&admin, name).await?;
        } else if self.in_place {
            let c = self.sql().await?;
            c.batch_execute(&format!(
                "{drop} \
                 DROP TABLE IF EXISTS openfhir_bench_upsert_log_only; \
                 DROP FUNCTION IF EXISTS openfhir_bench_log_only_row(); \
                 DELETE FROM tenant WHERE id = '{t}'; \
                 DELETE FROM openfhir_invalidation_log WHERE tenant = '{t}';",
                drop = super::write::DROP_TABLES,
                t = self.tenant
            ))
            .await
            .map_err(sql("remove the bench tenant and tables".to_string()))?;
        }
        Ok(())
    }

    /// The side-by-side pair of the read and cold-start scenarios: one cached node (TTL -1) and
    /// one TTL 0 node, each a cluster of its own, no NOTIFY or catch-up, the data seeded.
    pub async fn cached_and_uncached(&self) -> BenchResult<(Tracked<'_>, Tracked<'_>)> {
        let spec = |cached| NodeSpec {
            notify: false,
            catchup_ms: 0,
            cached,
            pool: 16,
        };
        let cached = self.track(self.start_fleet(1, Linking::Separate, spec(true)).await?);
        let uncached = self.track(self.start_fleet(1, Linking::Separate, spec(false)).await?);
        super::data::seed(cached.fleet().node(0), &self.tenant).await?;
        Ok((cached, uncached))
    }

    /// Keeps a fleet's nodes to be stopped at cleanup if the scenario is interrupted: the
    /// returned guard hands them back.
    pub fn track(&self, fleet: Fleet) -> Tracked<'_> {
        Tracked {
            h: self,
            fleet: Some(fleet),
        }
    }
}

/// A fleet that is aborted at cleanup if its scenario never stops it (interrupt, error).
pub struct Tracked<'a> {
    h: &'a Harness,
    fleet: Option<Fleet>,
}

impl Tracked<'_> {
    /// The fleet.
    pub fn fleet(&self) -> &Fleet {
        self.fleet
            .as_ref()
            .unwrap_or_else(|| unreachable!("present until stopped"))
    }

    /// Stops the fleet now.
    pub async fn stop(mut self) {
        if let Some(f) = self.fleet.take() {
            self.h.stop(f).await;
        }
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        // Dropped without `stop` (an error or Ctrl-C cancelled the scenario): hand the nodes
        // to cleanup, which aborts them.
        if let Some(mut f) = self.fleet.take() {
            // A child process is killed when its handle drops (`kill_on_drop`).
            drop(f.child.take());
            if let Ok(mut live) = self.h.live.lock() {
                live.extend(f.nodes.drain(..));
            }
        }
    }
}

/// True when this program is the `openfhir-cache` binary, so nodes can run as child processes.
pub fn can_spawn_nodes() -> bool {
    std::env::current_exe().is_ok_and(|exe| {
        exe.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("openfhir-cache"))
    })
}

/// Starts `openfhir-cache serve` (this program) with exactly `env` as its environment.
fn spawn_child(env: Vec<(&'static str, String)>) -> BenchResult<tokio::process::Child> {
    let exe = std::env::current_exe()
        .map_err(|e| BenchError::Setup(format!("cannot find this program to start a node: {e}")))?;
    if !exe
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("openfhir-cache"))
    {
        return Err(BenchError::Setup(format!(
            "{} is not the openfhir-cache binary: cannot start a node process",
            exe.display()
        )));
    }
    tokio::process::Command::new(&exe)
        // No configuration file and none of the caller's variables: only what the bench sets.
        .args(["--config", "/dev/null", "serve", "--no-migrate"])
        .env_clear()
        .envs(env)
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| BenchError::Setup(format!("starting {}: {e}", exe.display())))
}

/// Drops database `name`, disconnecting its sessions (`WITH (FORCE)`, PostgreSQL 13 and later;
/// before that, by terminating them first).
async fn drop_database(admin: &tokio_postgres::Client, name: &str) -> BenchResult<()> {
    let forced = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    if admin.batch_execute(&forced).await.is_ok() {
        return Ok(());
    }
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await
        .map_err(sql(format!("disconnect the sessions of {name}")))?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\""))
        .await
        .map_err(sql(format!("drop the database {name}")))?;
    Ok(())
}

/// Connects as a node would: `url`'s TLS settings (`sslmode`, `sslrootcert`, ...) apply.
async fn connect(url: &str, what: &str) -> BenchResult<tokio_postgres::Client> {
    let config = Config::from_sources(None, |k| (k == "DATABASE_URL").then(|| url.to_string()))?;
    let (pg, files) = config.database.connect_settings()?;
    let tls = crate::store::tls::PgTls::new(&config.database.tls, files)
        .map_err(node_err("set up TLS to the database"))?;
    let (client, conn) = pg.connect(tls).await.map_err(sql(what.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Maps a SQL error to [`BenchError::Sql`] with what was being done.
pub fn sql(what: String) -> impl FnOnce(tokio_postgres::Error) -> BenchError {
    move |source| BenchError::Sql { what, source }
}

/// Maps a library error to [`BenchError::Node`].
pub fn node_err(what: &'static str) -> impl FnOnce(crate::Error) -> BenchError {
    move |source| BenchError::Node { what, source }
}

/// `url` with its database replaced by `db` (URL or `key=value` form).
fn with_database(url: &str, db: &str) -> BenchResult<String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut u = url::Url::parse(url)
            .map_err(|e| BenchError::Setup(format!("DATABASE_URL is not a valid URL: {e}")))?;
        u.set_path(&format!("/{db}"));
        Ok(u.to_string())
    } else {
        tokio_postgres::Config::from_str(url)
            .map_err(|e| BenchError::Setup(format!("DATABASE_URL is invalid: {e}")))?;
        Ok(format!("{url} dbname={db}"))
    }
}

/// Progress bars on a terminal, one line per finished scenario everywhere.
pub struct Progress {
    style: ProgressStyle,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    /// Progress output on stderr.
    pub fn new() -> Progress {
        let style = ProgressStyle::with_template(
            "{prefix:>12.bold} [{bar:32.cyan/blue}] {pos}/{len} {wide_msg} {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        Progress { style }
    }

    /// Announces a scenario.
    pub fn section(&self, name: &str) {
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!("bench: {name} ...");
        }
    }

    /// A bar of `len` steps for scenario `name` (hidden when stderr is not a terminal).
    pub fn bar(&self, name: &str, len: u64) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        bar.set_style(self.style.clone());
        bar.set_prefix(name.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }

    /// Reports a finished scenario.
    pub fn done(&self, name: &str, took: Duration) {
        eprintln!("bench: {name} done in {:.1} s", took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_replaced() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            with_database("host=h user=u", "x").unwrap(),
            "host=h user=u dbname=x"
        );
    }
}
