//! PostgreSQL harness for integration tests.
//!
//! By default the tests share one throwaway PostgreSQL server that lives under
//! `<target dir>/test-pg/` (the target dir is `$CARGO_TARGET_DIR`, or
//! `<manifest dir>/target`). It is created on first use, reused by every test
//! binary and every later test run, and only listens on `127.0.0.1` on a port
//! recorded in `<target dir>/test-pg/port`. Layout:
//!
//! ```text
//! target/test-pg/
//!   lock       file lock guarding setup across processes
//!   port       TCP port of the shared server
//!   log        server log of the shared server
//!   data/      data directory of the shared server (owned by `postgres` when run as root)
//!   private/   one sub-directory per live [`PrivateServer`]
//! ```
//!
//! Stop the shared server with
//! `runuser -u postgres -- /usr/lib/postgresql/<ver>/bin/pg_ctl -D target/test-pg/data stop -m fast`
//! (drop the `runuser` part when not root); `.ci/run` does that at the end.
//!
//! If `TEST_DATABASE_URL` is set (a `postgres://` URL of a role that may create
//! databases), that server is used instead and no throwaway server is started.
//!
//! Every test gets its own database through [`TestDb::new`], which is dropped
//! again when the [`TestDb`] is dropped. Tests that stop or restart a server
//! must use a [`PrivateServer`] so they do not disturb tests running in
//! parallel.
//!
//! Nothing here skips silently: missing binaries or a server that will not
//! start make the calling test panic with an explanation.

use std::collections::hash_map::RandomState;
use std::fs;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::NoTls;

/// Prefix of every database created by [`TestDb::new`].
pub const DB_PREFIX: &str = "ofc_test_";

/// Environment variable naming an existing server to use instead of the
/// throwaway one.
pub const TEST_DATABASE_URL: &str = "TEST_DATABASE_URL";

/// Environment variable naming the directory holding `initdb`, `pg_ctl` and
/// `postgres`, overriding the automatic lookup.
pub const PG_BIN_DIR_ENV: &str = "TEST_PG_BIN_DIR";

const INSTALL_HINT: &str = "install the PostgreSQL server binaries (Debian/Ubuntu: \
     `apt-get install postgresql`; Fedora: `dnf install postgresql-server`; \
     macOS: `brew install postgresql`), or set TEST_PG_BIN_DIR to the directory \
     containing initdb/pg_ctl/postgres, or set TEST_DATABASE_URL to a \
     postgres:// URL of an existing server whose role may create databases";

const START_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Shared server
// ---------------------------------------------------------------------------

#[derive(Debug)]
enum Shared {
    /// `TEST_DATABASE_URL` was given.
    External { admin_url: String },
    /// The throwaway server under `target/test-pg`.
    Throwaway { port: u16 },
}

impl Shared {
    fn admin_url(&self) -> String {
        match self {
            Shared::External { admin_url } => admin_url.clone(),
            Shared::Throwaway { port } => local_url(*port, "postgres"),
        }
    }

    fn db_url(&self, name: &str) -> String {
        match self {
            Shared::External { admin_url } => replace_db_in_url(admin_url, name),
            Shared::Throwaway { port } => local_url(*port, name),
        }
    }
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// Sets up (once per process) and returns the shared server.
fn shared() -> &'static Shared {
    SHARED.get_or_init(|| match std::env::var(TEST_DATABASE_URL) {
        Ok(url) if !url.trim().is_empty() => {
            let url = url.trim().to_string();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                panic!(
                    "{TEST_DATABASE_URL} must be a postgres:// or postgresql:// URL, got {url:?}"
                );
            }
            if let Err(e) = probe(&url) {
                panic!("cannot connect to {TEST_DATABASE_URL} ({url}): {e}");
            }
            Shared::External { admin_url: url }
        }
        _ => {
            let port = ensure_throwaway_server();
            cleanup_stale_databases(&local_url(port, "postgres"));
            Shared::Throwaway { port }
        }
    })
}

/// Returns the admin URL (database `postgres`) of the server the tests use,
/// setting up the throwaway server first if needed.
///
/// Blocks the calling thread during the first (per-process) setup; safe to
/// call from synchronous code and from inside a tokio runtime (async work runs
/// on its own runtime in helper threads, never nested). Panics with an
/// explanation if no server can be provided.
pub fn admin_url() -> String {
    shared().admin_url()
}

/// Returns `true` if the tests run against `TEST_DATABASE_URL` rather than
/// the throwaway server.
pub fn using_external_server() -> bool {
    matches!(shared(), Shared::External { .. })
}

fn throwaway_port(what: &str) -> u16 {
    match shared() {
        Shared::Throwaway { port } => *port,
        Shared::External { .. } => panic!(
            "{what} only works with the throwaway test server, \
             but {TEST_DATABASE_URL} is set"
        ),
    }
}

/// Stops the shared throwaway server (`pg_ctl stop -m fast`, waits).
///
/// This disturbs every other test using the shared server at the same time:
/// fault-injection tests should use a [`PrivateServer`] instead. Panics when
/// `TEST_DATABASE_URL` is set.
pub fn stop_server() {
    throwaway_port("stop_server");
    let layout = Layout::shared();
    let _lock = layout.lock();
    let pg = PgBin::get();
    if pg.is_running(&layout.data) {
        pg.stop(&layout.data, "fast").unwrap_or_else(|e| {
            panic!(
                "stopping the test server failed: {e}\n{}",
                log_tail(&layout.log)
            )
        });
    }
}

/// Starts the shared throwaway server again on its recorded port (no-op if it
/// is running) and waits until it answers.
///
/// See [`stop_server`] for caveats.
pub fn start_server() {
    let port = throwaway_port("start_server");
    let layout = Layout::shared();
    let _lock = layout.lock();
    let pg = PgBin::get();
    if !pg.is_running(&layout.data) {
        pg.start(&layout.data, &layout.log, port)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    wait_answering(port, &layout.log);
}

/// Restarts the shared throwaway server (`-m fast`) on the same port and waits
/// until it answers.
///
/// See [`stop_server`] for caveats.
pub fn restart_server() {
    stop_server();
    start_server();
}

/// Makes sure the shared throwaway server is initialised, running and
/// answering; returns its port. Runs under the cross-process file lock.
fn ensure_throwaway_server() -> u16 {
    let pg = PgBin::get();
    let layout = Layout::shared();
    let _lock = layout.lock();

    // Reuse a running server.
    if layout.data.join("PG_VERSION").exists() && pg.is_running(&layout.data) {
        if let Some(port) = pidfile_port(&layout.data).or_else(|| read_port(&layout.port_file)) {
            if wait_answering_for(port, Duration::from_secs(30)).is_ok() {
                write_port(&layout.port_file, port);
                return port;
            }
        }
        eprintln!(
            "test-pg: server in {} is running but not answering; restarting it",
            layout.data.display()
        );
        let _ = pg.stop(&layout.data, "immediate");
    }

    // (Re)initialise if the data dir is missing, half-made or from another major version.
    let initialised = fs::read_to_string(layout.data.join("PG_VERSION"))
        .ok()
        .map(|v| v.trim().to_string());
    match initialised {
        Some(v) if v == pg.major => {}
        other => {
            if let Some(v) = other {
                eprintln!(
                    "test-pg: data dir {} is from PostgreSQL {v}, binaries are {}; re-creating it",
                    layout.data.display(),
                    pg.major
                );
            }
            if layout.data.exists() {
                fs::remove_dir_all(&layout.data)
                    .unwrap_or_else(|e| panic!("cannot remove {}: {e}", layout.data.display()));
            }
            pg.initdb(&layout.data);
        }
    }

    // Start on the recorded port if it is free, else on a fresh one.
    let port = match read_port(&layout.port_file) {
        Some(p) if port_is_free(p) => p,
        _ => free_port(),
    };
    let port = start_retrying(pg, &layout.data, &layout.log, port);
    write_port(&layout.port_file, port);
    wait_answering(port, &layout.log);
    port
}

/// Starts the server on `port`, or on another free port if `port` got taken.
/// Retries a few times (a killed postmaster may leave a stale pid file or
/// still-exiting backends behind); panics with the log tail if it never
/// starts. Returns the port used.
fn start_retrying(pg: &PgBin, data: &Path, log: &Path, mut port: u16) -> u16 {
    let mut attempt = 0;
    loop {
        attempt += 1;
        if postmaster_is_zombie(data) {
            // Dead but not yet reaped: postgres would refuse the stale pid file.
            let _ = fs::remove_file(data.join("postmaster.pid"));
        }
        match pg.start(data, log, port) {
            Ok(()) => return port,
            Err(e) if attempt < 5 => {
                let first = e.lines().next().unwrap_or_default();
                if port_is_free(port) {
                    eprintln!("test-pg: {first}; retrying in 1s");
                    std::thread::sleep(Duration::from_secs(1));
                } else {
                    eprintln!("test-pg: {first}; port {port} is taken, trying another port");
                    port = free_port();
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Drops `ofc_test_<pid>_...` databases whose creating process is gone
/// (leftovers of killed test processes). Best effort, Linux only.
fn cleanup_stale_databases(admin: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let admin = admin.to_string();
    let res = block_on_thread(async move {
        let client = connect(&admin).await?;
        let rows = client
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE 'ofc\\_test\\_%'",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        for row in rows {
            let name: String = row.get(0);
            let pid = name[DB_PREFIX.len()..]
                .split('_')
                .next()
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = drop_database(&client, &name).await;
                }
            }
        }
        Ok::<_, String>(())
    });
    if let Ok(Err(e)) = res {
        eprintln!("test-pg: cleanup of stale test databases failed: {e}");
    }
}

// ---------------------------------------------------------------------------
// Per-test databases
// ---------------------------------------------------------------------------

/// A fresh, uniquely named database on the shared test server, dropped (with
/// `FORCE`, terminating leftover connections) when this value is dropped.
#[derive(Debug)]
pub struct TestDb {
    /// Connection URL, `postgres://postgres@127.0.0.1:PORT/NAME` for the
    /// throwaway server.
    pub url: String,
    /// Database name, `ofc_test_<pid>_<counter>_<random>`.
    pub name: String,
    admin_url: String,
}

impl TestDb {
    /// Creates a new empty database. Panics (with the reason) if no server is
    /// available or the database cannot be created.
    pub async fn new() -> TestDb {
        let shared = tokio::task::spawn_blocking(shared)
            .await
            .unwrap_or_else(|e| match e.try_into_panic() {
                Ok(payload) => std::panic::resume_unwind(payload),
                Err(e) => panic!("test server setup task failed: {e}"),
            });
        let name = unique_db_name();
        let admin_url = shared.admin_url();
        let client = connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test server {admin_url}: {e}"));
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {}", pg_err(&e)));
        TestDb {
            url: shared.db_url(&name),
            name,
            admin_url,
        }
    }

    /// Opens a new connection to this database (the connection task is
    /// spawned on the current tokio runtime). Panics on failure.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        let res = block_on_thread(async move {
            let client = connect(&admin).await?;
            drop_database(&client, &name).await
        });
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("test-pg: failed to drop database {}: {e}", self.name),
            Err(_) => eprintln!(
                "test-pg: failed to drop database {} (helper thread panicked)",
                self.name
            ),
        }
    }
}

async fn drop_database(client: &tokio_postgres::Client, name: &str) -> Result<(), String> {
    let forced = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    let run = async {
        if client.batch_execute(&forced).await.is_ok() {
            return Ok(());
        }
        // Servers before 13 lack FORCE.
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .await
            .map_err(|e| pg_err(&e))?;
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\""))
            .await
            .map_err(|e| pg_err(&e))
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .map_err(|_| "timed out".to_string())?
}

fn unique_db_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(n);
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!(
        "{DB_PREFIX}{}_{n}_{:08x}",
        std::process::id(),
        h.finish() as u32
    )
}

// ---------------------------------------------------------------------------
// Private servers
// ---------------------------------------------------------------------------

/// A dedicated PostgreSQL cluster for tests that stop, restart or otherwise
/// disturb their server.
///
/// Created with `initdb` in its own directory under
/// `target/test-pg/private/`, listening on its own free port on 127.0.0.1
/// (same settings as the shared server). Dropping it stops the server
/// (`pg_ctl stop -m immediate`) and removes the directory. All methods block.
///
/// It always needs local PostgreSQL binaries, even when `TEST_DATABASE_URL`
/// is set.
#[derive(Debug)]
pub struct PrivateServer {
    dir: Option<tempfile::TempDir>,
    data: PathBuf,
    log: PathBuf,
    port: u16,
}

impl PrivateServer {
    /// Initialises and starts a new cluster (takes about a second). Panics
    /// with an explanation on failure.
    pub fn new() -> PrivateServer {
        let pg = PgBin::get();
        let base = Layout::shared().base.join("private");
        ensure_dir(&base);
        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("cannot create a directory in {}: {e}", base.display()));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.path().display()));
        give_to_postgres(dir.path());
        let data = dir.path().join("data");
        let log = dir.path().join("log");
        pg.initdb(&data);
        let mut server = PrivateServer {
            dir: Some(dir),
            data,
            log,
            port: free_port(),
        };
        server.port = start_retrying(pg, &server.data, &server.log, server.port);
        wait_answering(server.port, &server.log);
        server
    }

    /// Like [`new`](Self::new), but `setup` runs on the data directory after `initdb` and
    /// before the first start (extra `postgresql.conf` lines, a new `pg_hba.conf`, key files:
    /// see [`write_server_file`]). Readiness is what `pg_ctl start -w` waits for, not a plain
    /// connection, which such a server may refuse (e.g. one that accepts only TLS).
    pub fn with_setup(setup: impl FnOnce(&Path)) -> PrivateServer {
        let pg = PgBin::get();
        let base = Layout::shared().base.join("private");
        ensure_dir(&base);
        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("cannot create a directory in {}: {e}", base.display()));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.path().display()));
        give_to_postgres(dir.path());
        let data = dir.path().join("data");
        let log = dir.path().join("log");
        pg.initdb(&data);
        setup(&data);
        let mut server = PrivateServer {
            dir: Some(dir),
            data,
            log,
            port: free_port(),
        };
        server.port = start_retrying(pg, &server.data, &server.log, server.port);
        server
    }

    /// The server's log so far (its last lines), for a failure message.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Admin URL (database `postgres`).
    pub fn url(&self) -> String {
        local_url(self.port, "postgres")
    }

    /// URL of database `db` on this server.
    pub fn url_for(&self, db: &str) -> String {
        local_url(self.port, db)
    }

    /// Directory holding the data dir and the log; removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir present until drop").path()
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Whether the postmaster is running (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        PgBin::get().is_running(&self.data)
    }

    /// Starts the server on its port (no-op if running) and waits until it
    /// answers.
    pub fn start(&self) {
        let pg = PgBin::get();
        if !pg.is_running(&self.data) {
            pg.start(&self.data, &self.log, self.port)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        wait_answering(self.port, &self.log);
    }

    /// Stops the server with `pg_ctl stop -m fast` and waits until it is down.
    pub fn stop(&self) {
        self.stop_mode("fast");
    }

    /// Stops the server with `pg_ctl stop -m immediate` (crash-like: no
    /// shutdown checkpoint, clients see their connections drop).
    pub fn kill(&self) {
        self.stop_mode("immediate");
    }

    fn stop_mode(&self, mode: &str) {
        let pg = PgBin::get();
        if pg.is_running(&self.data) {
            pg.stop(&self.data, mode).unwrap_or_else(|e| {
                panic!(
                    "stopping private server failed: {e}\n{}",
                    log_tail(&self.log)
                )
            });
        }
    }

    /// `stop` (fast) followed by `start`; same port.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// Takes a cold backup of the data directory: stops the server cleanly, copies the data
    /// directory (`cp -a`, ownership and modes kept) to `backup/` next to it, replacing an
    /// earlier backup, and starts the server again. [`restore_backup`](Self::restore_backup)
    /// puts it back.
    pub fn backup(&self) {
        self.stop();
        let backup = self.backup_dir();
        remove_dir(&backup);
        copy_dir(&self.data, &backup);
        self.start();
    }

    /// Replaces the data directory with the copy [`backup`](Self::backup) took, as a restore
    /// of a backup (or a failover to a standby that missed the last commits) would: everything
    /// committed since is lost and transaction ids are handed out again. The server must be
    /// stopped (see [`kill`](Self::kill)); call [`start`](Self::start) afterwards.
    pub fn restore_backup(&self) {
        assert!(
            !self.is_running(),
            "restore_backup needs a stopped server ({})",
            self.data.display()
        );
        let backup = self.backup_dir();
        assert!(backup.is_dir(), "no backup at {}", backup.display());
        remove_dir(&self.data);
        copy_dir(&backup, &self.data);
    }

    fn backup_dir(&self) -> PathBuf {
        self.dir().join("backup")
    }
}

/// Writes a file the server reads (a certificate, a key, a config file) with permission bits
/// `mode` (a private key must be 0600), owned by the server's user (`postgres` when the tests
/// run as root, as the server then does). Panics on failure.
pub fn write_server_file(path: &Path, contents: &[u8], mode: u32) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    give_to_postgres(path);
}

/// `cp -a from to` (as root this keeps `postgres` as the owner); panics on failure.
fn copy_dir(from: &Path, to: &Path) {
    let out = Command::new("cp").arg("-a").arg(from).arg(to).output();
    check_output(&format!("cp -a {} {}", from.display(), to.display()), out)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Removes `dir` and its contents if it exists; panics on failure.
fn remove_dir(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}: {e}", dir.display()),
    }
}

impl Default for PrivateServer {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        // Never panic here: PgBin::get() succeeded in new(), so it is cached.
        if let Some(pg) = PG_BIN.get() {
            if let Err(e) = pg.stop(&self.data, "immediate") {
                if pg.is_running(&self.data) {
                    eprintln!("test-pg: stopping private server failed: {e}");
                }
            }
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!("test-pg: removing {} failed: {e}", path.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Directory layout and locking
// ---------------------------------------------------------------------------

struct Layout {
    base: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port_file: PathBuf,
    lock_file: PathBuf,
}

impl Layout {
    /// `<target>/test-pg`, created (mode 0755, owned by `postgres` when root).
    fn shared() -> Layout {
        static BASE: OnceLock<PathBuf> = OnceLock::new();
        let base = BASE
            .get_or_init(|| {
                let target = match std::env::var_os("CARGO_TARGET_DIR") {
                    Some(t) if !t.is_empty() => {
                        let t = PathBuf::from(t);
                        if t.is_absolute() {
                            t
                        } else {
                            std::env::current_dir().expect("current dir").join(t)
                        }
                    }
                    _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
                };
                let base = target.join("test-pg");
                ensure_dir(&base);
                let base = base.canonicalize().unwrap_or(base);
                give_to_postgres(&base);
                check_postgres_can_use(&base);
                base
            })
            .clone();
        Layout {
            data: base.join("data"),
            log: base.join("log"),
            port_file: base.join("port"),
            lock_file: base.join("lock"),
            base,
        }
    }

    /// Takes the exclusive cross-process lock (released when the returned
    /// file is dropped, also on panic).
    // `File::lock` needs Rust 1.89, newer than the crate's declared
    // `rust-version`; only the test harness uses it.
    #[allow(clippy::incompatible_msrv)]
    fn lock(&self) -> fs::File {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_file)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.lock_file.display()));
        f.lock()
            .unwrap_or_else(|e| panic!("cannot lock {}: {e}", self.lock_file.display()));
        f
    }
}

/// Creates `dir` and any missing ancestors with mode 0755.
fn ensure_dir(dir: &Path) {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.exists() {
            break;
        }
        missing.push(d);
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {
                fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                    .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", d.display()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => panic!("cannot create directory {}: {e}", d.display()),
        }
    }
}

fn read_port(file: &Path) -> Option<u16> {
    fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn write_port(file: &Path, port: u16) {
    if read_port(file) == Some(port) {
        return;
    }
    let tmp = file.with_extension("tmp");
    let res = fs::File::create(&tmp)
        .and_then(|mut f| writeln!(f, "{port}"))
        .and_then(|()| fs::rename(&tmp, file));
    if let Err(e) = res {
        panic!("cannot write {}: {e}", file.display());
    }
}

/// Port from line 4 of `postmaster.pid`.
fn pidfile_port(data: &Path) -> Option<u16> {
    fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .nth(3)?
        .trim()
        .parse()
        .ok()
}

/// True if the pid in `postmaster.pid` is a zombie (killed, not yet reaped:
/// `pg_ctl status` would still call it running). Linux only.
fn postmaster_is_zombie(data: &Path) -> bool {
    let Some(pid) = fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
    else {
        return false;
    };
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()?
                .split_whitespace()
                .next()
                .map(|st| st == "Z")
        })
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free TCP port on 127.0.0.1: {e}"))
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn log_tail(log: &Path) -> String {
    match fs::read_to_string(log) {
        Ok(s) => {
            let lines: Vec<&str> = s.lines().collect();
            let start = lines.len().saturating_sub(40);
            format!(
                "--- last lines of {} ---\n{}\n--- end of log ---",
                log.display(),
                lines[start..].join("\n")
            )
        }
        Err(e) => format!("(server log {} unreadable: {e})", log.display()),
    }
}

// ---------------------------------------------------------------------------
// Running as root: everything server-side runs as `postgres`
// ---------------------------------------------------------------------------

fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        if let Ok(status) = fs::read_to_string("/proc/self/status") {
            if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
                // Real, effective, saved, fs uid: use the effective one.
                if let Some(euid) = line.split_whitespace().nth(2) {
                    return euid == "0";
                }
            }
        }
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// When root, chowns `path` (not recursively) to `postgres:postgres`.
fn give_to_postgres(path: &Path) {
    if !is_root() {
        return;
    }
    let out = Command::new("chown")
        .arg("postgres:postgres")
        .arg(path)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "running as root, so the test server must run as user `postgres`, but \
             `chown postgres:postgres {}` failed: {}\n\
             Create the user (installing the postgresql package does) or run the tests \
             as a non-root user.",
            path.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("cannot run chown: {e}"),
    }
}

/// When root, checks that user `postgres` can reach and write `dir`.
fn check_postgres_can_use(dir: &Path) {
    if !is_root() {
        return;
    }
    let ok = Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-w"])
        .arg(dir)
        .args(["-a", "-x"])
        .arg(dir)
        .current_dir("/")
        .output();
    match ok {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "user `postgres` cannot access {} ({}). Every parent directory must be \
             traversable by others (chmod o+x), or point CARGO_TARGET_DIR at a \
             location the postgres user can reach.",
            dir.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "running as root requires `runuser` (util-linux) to run PostgreSQL as user \
             `postgres`: {e}"
        ),
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL binaries
// ---------------------------------------------------------------------------

static PG_BIN: OnceLock<PgBin> = OnceLock::new();

#[derive(Debug)]
struct PgBin {
    dir: PathBuf,
    /// Major version of the binaries, as in `PG_VERSION` ("15").
    major: String,
}

impl PgBin {
    fn get() -> &'static PgBin {
        PG_BIN.get_or_init(|| {
            let dir = find_bin_dir().unwrap_or_else(|searched| {
                panic!(
                    "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found \
                     (searched: {searched}). To fix: {INSTALL_HINT}."
                )
            });
            let out = Command::new(dir.join("pg_ctl"))
                .arg("--version")
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}/pg_ctl: {e}", dir.display()));
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            // "pg_ctl (PostgreSQL) 15.20 (Debian ...)" or "... 9.6.24"
            let ver = text
                .split(')')
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("cannot parse `pg_ctl --version` output: {text:?}"));
            let mut parts = ver.split('.');
            let first = parts.next().unwrap_or_default();
            let major = if first.parse::<u32>().map(|m| m < 10).unwrap_or(false) {
                format!("{first}.{}", parts.next().unwrap_or_default())
            } else {
                first.to_string()
            };
            PgBin { dir, major }
        })
    }

    /// A command running `bin` from the PostgreSQL bin dir, as `postgres`
    /// when we are root (initdb and postgres refuse to run as root).
    fn cmd(&self, bin: &str) -> Command {
        let path = self.dir.join(bin);
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        c.current_dir("/");
        c.env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .env("LC_ALL", "C");
        c
    }

    fn initdb(&self, data: &Path) {
        let out = self
            .cmd("initdb")
            .arg("-D")
            .arg(data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output();
        let out = check_output("initdb", out)
            .unwrap_or_else(|e| panic!("{e}\nIs the data directory's parent writable?"));
        drop(out);
        let conf = data.join("postgresql.conf");
        let settings = "\n# openfhir-cache test settings\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = ''\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 300\n\
             shared_buffers = 32MB\n\
             max_wal_size = 1GB\n\
             log_checkpoints = off\n\
             log_min_messages = warning\n\
             log_line_prefix = '%m [%p] '\n";
        fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .unwrap_or_else(|e| panic!("cannot append to {}: {e}", conf.display()));
    }

    /// `pg_ctl status`: true if a postmaster is running on `data`.
    fn is_running(&self, data: &Path) -> bool {
        if !data.join("postmaster.pid").exists() || postmaster_is_zombie(data) {
            return false;
        }
        self.cmd("pg_ctl")
            .arg("-D")
            .arg(data)
            .arg("status")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// `pg_ctl start -w` on `port`; on failure the error includes the log tail.
    fn start(&self, data: &Path, log: &Path, port: u16) -> Result<(), String> {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(data)
            .arg("-l")
            .arg(log)
            .args(["-w", "-t"])
            .arg(START_TIMEOUT.as_secs().to_string())
            .arg("-o")
            .arg(format!("-p {port}"))
            .arg("start")
            .output();
        check_output("pg_ctl start", out).map(drop).map_err(|e| {
            format!(
                "PostgreSQL test server (data dir {}, port {port}) failed to start: {e}\n{}",
                data.display(),
                log_tail(log)
            )
        })
    }

    /// `pg_ctl stop -w -m <mode>`.
    fn stop(&self, data: &Path, mode: &str) -> Result<(), String> {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(data)
            .args(["-w", "-t", "60", "-m", mode, "stop"])
            .output();
        check_output("pg_ctl stop", out).map(drop)
    }
}

fn check_output(what: &str, out: std::io::Result<Output>) -> Result<Output, String> {
    match out {
        Ok(o) if o.status.success() => Ok(o),
        Ok(o) => Err(format!(
            "{what} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("cannot run {what}: {e}")),
    }
}

fn has_server_bins(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

/// Finds the directory with initdb/pg_ctl/postgres: `$TEST_PG_BIN_DIR`, the
/// newest `/usr/lib/postgresql/*/bin`, `pg_config --bindir`, then `$PATH`.
/// On failure returns a description of what was searched.
fn find_bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(PG_BIN_DIR_ENV) {
        let dir = PathBuf::from(dir);
        return if has_server_bins(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "{PG_BIN_DIR_ENV}={} lacks initdb/pg_ctl/postgres",
                dir.display()
            ))
        };
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let ver: Vec<u32> = name
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            let bin = e.path().join("bin");
            has_server_bins(&bin).then_some((ver, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(o) = Command::new("pg_config").arg("--bindir").output() {
        if o.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            if has_server_bins(&dir) {
                return Ok(dir);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server_bins(&dir) {
                return Ok(dir);
            }
        }
    }
    Err("$TEST_PG_BIN_DIR, /usr/lib/postgresql/*/bin, `pg_config --bindir`, $PATH".into())
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

fn local_url(port: u16, db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{db}")
}

/// Replaces the database (path) component of a `postgres://` URL.
fn replace_db_in_url(url: &str, db: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_end = base[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .unwrap_or(base.len());
    format!("{}/{db}{query}", &base[..authority_end])
}

fn pg_err(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Connects with a short timeout and spawns the connection task on the
/// current runtime.
async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    config.connect_timeout(Duration::from_secs(5));
    let (client, conn) = tokio::time::timeout(Duration::from_secs(10), config.connect(NoTls))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| pg_err(&e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Runs `fut` to completion on a fresh current-thread runtime in a new OS
/// thread, so it works with or without an ambient tokio runtime. `Err` if the
/// helper thread panicked.
fn block_on_thread<F>(fut: F) -> std::thread::Result<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build helper tokio runtime")
            .block_on(fut)
    })
    .join()
}

/// `select 1` against `url`.
fn probe(url: &str) -> Result<(), String> {
    let url = url.to_string();
    block_on_thread(async move {
        let client = connect(&url).await?;
        client
            .simple_query("select 1")
            .await
            .map_err(|e| pg_err(&e))?;
        Ok(())
    })
    .unwrap_or_else(|_| Err("probe thread panicked".into()))
}

fn wait_answering_for(port: u16, timeout: Duration) -> Result<(), String> {
    let url = local_url(port, "postgres");
    let deadline = Instant::now() + timeout;
    loop {
        match probe(&url) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Waits until the server on `port` answers `select 1`; panics with the log
/// tail otherwise.
fn wait_answering(port: u16, log: &Path) {
    if let Err(e) = wait_answering_for(port, START_TIMEOUT) {
        panic!(
            "PostgreSQL test server on 127.0.0.1:{port} started but does not answer: {e}\n{}",
            log_tail(log)
        );
    }
}
