//! Build a node, run its tasks, shut down gracefully.
//!
//! [`start`] runs a whole node: the background machinery plus the HTTP API. [`start_embedded`]
//! runs the same machinery without HTTP, for a Rust program that uses the [`Node`] directly.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{describe, Config};
use crate::error::{Error, Result};
use crate::node::Node;

/// Options of `serve`, [`start`] and [`start_embedded`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// Skip applying pending migrations at startup (`--no-migrate`).
    pub no_migrate: bool,
}

/// A node running without the HTTP API (see [`start_embedded`]): the database invalidation
/// channel (NOTIFY listener, catch-up and pruning) and the peer cluster channel run in the
/// background, as supervised tasks ([`Node::tasks`]); the program reads and writes through
/// [`Embedded::node`].
#[must_use = "dropping an Embedded node leaves its tasks running until the runtime ends; call shutdown"]
pub struct Embedded {
    /// The node's cached store: the same reads and writes as the HTTP API, without HTTP.
    pub node: Arc<Node>,
    bootstrap: Arc<crate::bootstrap::Progress>,
}

impl Embedded {
    /// Where the run over the bootstrap directory is (see [`crate::bootstrap`]).
    pub fn bootstrap(&self) -> &Arc<crate::bootstrap::Progress> {
        &self.bootstrap
    }

    /// Leaves the cluster (peers drop this node at once instead of waiting for its heartbeats to
    /// stop), stops the background tasks and closes the database pool. Writes that already
    /// returned have been broadcast; call this after the last one.
    pub async fn shutdown(mut self) {
        // Writes that returned may still wait for their NOTIFY (sent after COMMIT).
        self.node.invalidation().flush_deferred(LEAVE_WAIT).await;
        self.node.cluster().leave(LEAVE_WAIT).await;
        self.stop_tasks();
    }

    /// Stops everything at once without leaving the cluster, as a crash would (peers notice by
    /// the closed connections). For tests of failure handling.
    pub fn abort(mut self) {
        self.node.cluster().abort();
        self.stop_tasks();
    }

    fn stop_tasks(&mut self) {
        self.node.invalidation().stop_deferring();
        // Stopped on purpose: the supervisor restarts nothing from here on.
        self.node.tasks().stop();
        self.node.db().close();
    }
}

/// A running node: its HTTP address, its store, and the handle that stops it.
#[must_use = "dropping a Running node leaves its server task running until the runtime ends"]
pub struct Running {
    /// The address the HTTP API is bound to (useful with port 0).
    pub addr: SocketAddr,
    /// The node's cached store.
    pub node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
    background: Embedded,
}

impl Running {
    /// Where the run over the bootstrap directory is (see [`crate::bootstrap`]).
    pub fn bootstrap(&self) -> &Arc<crate::bootstrap::Progress> {
        self.background.bootstrap()
    }

    /// Stops accepting, finishes in-flight requests (their invalidations are broadcast), leaves
    /// the cluster (peers drop this node at once), stops the tasks and closes the pool.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let r = (&mut self.server).await;
        self.background.shutdown().await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Bind {
                addr: self.addr,
                io: e,
            }),
            Err(e) => Err(Error::Bind {
                addr: self.addr,
                io: std::io::Error::other(e),
            }),
        }
    }

    /// Stops everything at once without leaving the cluster or finishing requests, as a crash
    /// would (peers notice by the closed connections). For tests of failure handling.
    pub fn abort(mut self) {
        self.stop.take();
        self.server.abort();
        self.background.abort();
    }

    /// Waits until the server ends by itself (it only does on error) or `signal` fires, then shuts down.
    pub async fn run_until(mut self, signal: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::select! {
            _ = signal => tracing::info!("shutdown requested; finishing in-flight requests"),
            r = &mut self.server => {
                tracing::error!(result = ?r, "HTTP server stopped unexpectedly");
            }
        }
        self.shutdown().await
    }
}

/// How long shutdown waits for the Leave messages to be written.
const LEAVE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Starts a node without the HTTP API: connects to the database (failing fast with a clear
/// message), migrates unless told not to, sets the invalidation cursor, starts the NOTIFY
/// listener and the catch-up task (as configured) and joins the peer cluster channel
/// (`CLUSTER_*`). Stop it with [`Embedded::shutdown`].
///
/// A node embedded this way is a full cluster member: its writes are broadcast to the peers
/// and theirs evict its caches. `examples/embedded.rs` shows a complete program.
pub async fn start_embedded(config: Config, opts: ServeOptions) -> Result<Embedded> {
    let node = Arc::new(Node::new(config)?);
    let cfg = node.config().clone();
    if let Err(e) = node.db().check().await {
        return Err(unreachable(&cfg, &e));
    }
    if !opts.no_migrate {
        let applied = node.db().migrate().await?;
        if applied.is_empty() {
            tracing::info!("schema up to date");
        }
    }
    // The cursor starts at "now" before anything is cached or served: every later change is
    // then either seen by a load or replayed by catch-up.
    node.invalidation().init().await?;
    let deferred = crate::store::migrate::current_version(&*node.db().conn().await?)
        .await?
        .is_some_and(|v| v >= crate::store::migrate::DEFERRED_NOTIFY_SINCE);
    node.invalidation()
        .spawn(node.tasks(), &node.config().invalidation, deferred);
    let background = Embedded {
        node,
        bootstrap: Arc::new(crate::bootstrap::Progress::running()),
    };
    let (cluster, invalidation) = (
        background.node.cluster().clone(),
        background.node.invalidation().clone(),
    );
    match crate::cluster::start(cluster, invalidation, background.node.tasks()).await {
        Ok(()) => {}
        Err(e) => {
            background.abort();
            return Err(e);
        }
    }
    // After the cluster channel is up, so what it loads is broadcast like any write; in the
    // background, so the node answers meanwhile (readiness waits for it).
    let (node, progress) = (background.node.clone(), background.bootstrap.clone());
    background.node.tasks().spawn(
        crate::supervise::Task::once(crate::bootstrap::TASK_BOOTSTRAP),
        move || crate::bootstrap::run_recorded(node.clone(), progress.clone()),
    );
    Ok(background)
}

/// Connects to the database (failing fast with a clear message), migrates unless told not to,
/// starts the background tasks as [`start_embedded`] does, binds the HTTP API and starts serving.
pub async fn start(config: Config, opts: ServeOptions) -> Result<Running> {
    let background = start_embedded(config, opts).await?;
    let node = background.node.clone();
    let cfg = node.config().clone();
    let bound = async {
        let listener = tokio::net::TcpListener::bind(cfg.http.addr).await?;
        let addr = listener.local_addr()?;
        Ok::<_, std::io::Error>((listener, addr))
    };
    let (listener, addr) = match bound.await {
        Ok(b) => b,
        Err(io) => {
            background.abort();
            return Err(Error::Bind {
                addr: cfg.http.addr,
                io,
            });
        }
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let mut state = crate::api::AppState::new(node.clone());
    state.bootstrap = background.bootstrap.clone();
    let app = crate::api::router(state.clone());
    let limits = crate::api::ServerLimits {
        max_connections: cfg.http.max_connections,
        header_timeout: std::time::Duration::from_secs(cfg.http.header_timeout_secs),
        // In-flight requests are bounded by the request timeout; a little more for the response.
        drain: std::time::Duration::from_secs(cfg.http.request_timeout_secs + 5),
    };
    let stats = state.http_stats.clone();
    let server = tokio::spawn(async move {
        crate::api::serve(listener, app, limits, stats, async {
            let _ = stopped.await;
        })
        .await
    });
    tracing::info!(
        http = %addr,
        database = %cfg.database.url,
        config = ?describe(&cfg),
        "openfhir-cache node started"
    );
    if cfg.http.api_token.is_none() {
        tracing::warn!(
            "OPENFHIR_API_TOKEN is not set: the HTTP API accepts unauthenticated requests"
        );
    }
    Ok(Running {
        addr,
        node,
        stop: Some(stop),
        server,
        background,
    })
}

/// The one-line "cannot reach the database" error: URL (password masked), cause, how to fix.
pub fn unreachable(cfg: &Config, e: &Error) -> Error {
    let default = crate::config::VARS
        .iter()
        .find(|v| v.env == "DATABASE_URL")
        .is_some_and(|v| v.default == cfg.database.url.expose());
    let auth_refused = matches!(e.root(), Error::Pool(deadpool_postgres::PoolError::Backend(b))
        if b.code().is_some_and(|c| c.code().starts_with("28") || c.code() == "3D000"));
    // The whole chain: "error connecting to server: Connection refused (os error 111)".
    let mut cause = e.root().to_string();
    let mut src = std::error::Error::source(e.root());
    while let Some(s) = src {
        let s_text = s.to_string();
        if !cause.contains(&s_text) {
            cause = format!("{cause}: {s_text}");
        }
        src = s.source();
    }
    let tls = crate::store::tls::tls_failure(e, cfg.database.tls.mode);
    let hint = if tls.is_some() {
        "Check sslmode, sslrootcert, sslcert and sslkey in DATABASE_URL (see docs/deployment.md)"
    } else if cause.contains("no encryption") {
        // pg_hba.conf has no entry for a connection without TLS.
        "The server accepts only TLS connections: add sslmode=verify-full and sslrootcert=<the \
         CA's PEM file> to DATABASE_URL (see docs/deployment.md)"
    } else if auth_refused {
        "The server answered but refused the login or the database: set DATABASE_URL with the right \
         user, password and database name (postgres://user:password@host:5432/db)"
    } else if default {
        "No DATABASE_URL is set and nothing answers at the default address: start PostgreSQL there \
         (e.g. `pg_ctlcluster <version> main start`) or set DATABASE_URL=postgres://user:password@host:5432/db"
    } else {
        "Check that PostgreSQL runs there and DATABASE_URL is right"
    };
    // A TLS failure in its own words; the driver's chain repeats it less clearly.
    let cause = tls.unwrap_or(cause);
    Error::DatabaseUnreachable {
        url: cfg.database.url.masked(),
        cause,
        hint: hint.to_string(),
    }
}

/// Probes `GET {base}/health/live` with a plain HTTP/1.1 request (3 s limit); `Ok` on 200.
pub async fn probe_live(base: &str) -> std::result::Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hostport = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base}: only http:// URLs are supported"))?
        .trim_end_matches('/');
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(hostport).await?;
        let req =
            format!("GET /health/live HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).to_string())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(3), probe).await {
        Err(_) => Err(format!("{base}/health/live: no answer within 3 s")),
        Ok(Err(e)) => Err(format!("{base}/health/live: {e}")),
        Ok(Ok(head)) if head.starts_with("HTTP/1.1 200") => Ok(()),
        Ok(Ok(head)) => Err(format!(
            "{base}/health/live answered: {}",
            head.lines().next().unwrap_or("")
        )),
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
