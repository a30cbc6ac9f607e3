//! PostgreSQL: the connection pool, migrations and the repositories of every table.
//!
//! Every write runs in one statement (or one transaction) and returns only after COMMIT; callers
//! evict caches after that. Each write statement also sets `openfhir.notify` for its own
//! transaction ([`NotifyMode`]): while a node sends its own notifications, the invalidation
//! trigger leaves the NOTIFY to it, and the caller must queue the returned transaction id (the
//! node's write path does).

mod artifacts;
pub mod migrate;
pub mod tls;

pub use artifacts::{opt_write_sql, Artifact, FcTable, OptSummary, Target};

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::Row;

use crate::config::DatabaseConfig;
use crate::domain::Tenant;
use crate::error::{Error, Result};
use tls::PgTls;

/// How long a request waits for a pooled connection, or for a new one to be made, before it
/// fails with "database unavailable" (503) instead of hanging.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a write may replace an existing row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// `POST`: fail with a conflict if the row exists.
    Create,
    /// `PUT`: create or replace.
    Upsert,
}

/// What a write did, and the transaction that did it (the consistency token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// True for a new row, false for a replaced one.
    pub created: bool,
    /// The writing transaction's id (`pg_current_xact_id()`).
    pub xid: u64,
}

/// The database: a pool of connections to the source of truth.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    notify: NotifyMode,
    /// The connection settings, `application_name` included, for connections of their own.
    config: tokio_postgres::Config,
    /// TLS as `DATABASE_URL` says, for every connection (pooled or not).
    tls: PgTls,
}

/// The value of `openfhir.notify` that makes the triggers leave the notification to the writer.
pub const DEFERRED: &str = "deferred";

/// Whether the writes through a [`Db`] (every clone) leave their NOTIFY to the node, which sends
/// it after COMMIT (the invalidation module's deferred notifier), or to the trigger. Shared by
/// every clone.
#[derive(Debug, Clone, Default)]
pub struct NotifyMode(Arc<std::sync::atomic::AtomicBool>);

impl NotifyMode {
    /// True while writes defer their notification to the node.
    pub fn deferred(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Defers (a node task sends the notifications) or not (the triggers do).
    pub fn set_deferred(&self, on: bool) {
        self.0.store(on, std::sync::atomic::Ordering::Release);
    }

    /// The value a write sets `openfhir.notify` to: [`DEFERRED`] while deferring, else empty.
    pub fn setting(&self) -> &'static str {
        if self.deferred() {
            DEFERRED
        } else {
            ""
        }
    }
}

/// `FROM` item that sets `openfhir.notify` for the statement's transaction to parameter `$n`
/// (`'deferred'` or empty). A volatile subquery is evaluated before the statement's AFTER
/// triggers run, and never flattened away.
fn notify_setting(n: u8) -> String {
    format!("(SELECT set_config('openfhir.notify', ${n}, true)) AS openfhir_notify")
}

impl Db {
    /// Builds the pool. Connections are made lazily; call [`Db::check`] to fail fast.
    /// `application_name` names the node in `pg_stat_activity`, and the invalidation triggers
    /// read the origin node from it.
    /// The TLS files of `DATABASE_URL` are read here, once.
    pub fn new(cfg: &DatabaseConfig, application_name: &str) -> Result<Db> {
        let (mut pg, files) = cfg.connect_settings()?;
        let tls = PgTls::new(&cfg.tls, files)?;
        pg.application_name(application_name);
        let mgr = Manager::from_config(
            pg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| Error::invalid("cannot build the database pool", e.to_string()))?;
        Ok(Db {
            pool,
            notify: NotifyMode::default(),
            config: pg,
            tls,
        })
    }

    /// The TLS connector of this database's connections, for a connection made outside the
    /// pool with [`Db::connection_config`] (the LISTEN connection).
    pub fn tls(&self) -> PgTls {
        self.tls.clone()
    }

    /// The settings of a connection outside the pool named `application_name`.
    pub fn connection_config(&self, application_name: &str) -> tokio_postgres::Config {
        let mut cfg = self.config.clone();
        cfg.application_name(application_name);
        cfg
    }

    /// A connection of its own, outside the pool, named `<application_name>/<purpose>` in
    /// `pg_stat_activity`: for session state (an advisory lock) that must end with the work
    /// that took it, never be handed to another pool user.
    pub async fn dedicated(&self, purpose: &str) -> Result<tokio_postgres::Client> {
        let name = format!(
            "{}/{purpose}",
            self.config
                .get_application_name()
                .unwrap_or("openfhir-cache")
        );
        let mut cfg = self.connection_config(&name);
        cfg.connect_timeout(POOL_TIMEOUT);
        let (client, connection) = cfg.connect(self.tls()).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a dedicated database connection ended");
            }
        });
        Ok(client)
    }

    /// Whether this node's writes leave their NOTIFY to the node.
    pub fn notify_mode(&self) -> &NotifyMode {
        &self.notify
    }

    /// A pooled connection.
    pub async fn conn(&self) -> Result<Object> {
        Ok(self.pool.get().await?)
    }

    /// Connects once and runs `SELECT 1`.
    pub async fn check(&self) -> Result<()> {
        self.conn().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Applies pending migrations; returns the versions applied.
    pub async fn migrate(&self) -> Result<Vec<i32>> {
        let mut conn = self.conn().await?;
        migrate::migrate(&mut conn).await
    }

    /// Ready means reachable and migrated to this build's schema version.
    pub async fn readiness(&self) -> Result<std::result::Result<(), String>> {
        let conn = self.conn().await?;
        let v = migrate::current_version(&conn).await?;
        let want = migrate::latest_version();
        Ok(match v {
            Some(v) if v >= want => Ok(()),
            Some(v) => Err(format!(
                "schema is at version {v}, this build needs {want}: run `openfhir-cache migrate`"
            )),
            None => Err("schema not migrated: run `openfhir-cache migrate`".to_string()),
        })
    }

    /// Pool status: (connections, idle).
    pub fn pool_status(&self) -> (usize, usize) {
        let s = self.pool.status();
        (s.size, s.available)
    }

    /// Closes the pool.
    pub fn close(&self) {
        self.pool.close();
    }

    // ---- tenants ----

    /// One tenant.
    pub async fn tenant(&self, id: &str) -> Result<Option<Tenant>> {
        let row = self
            .conn()
            .await?
            .query_opt(
                "SELECT id, name, config, created, updated FROM tenant WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(row.map(|r| tenant_from_row(&r)))
    }

    /// Every tenant, by id.
    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        let rows = self
            .conn()
            .await?
            .query(
                "SELECT id, name, config, created, updated FROM tenant ORDER BY id",
                &[],
            )
            .await?;
        Ok(rows.iter().map(tenant_from_row).collect())
    }

    /// Creates or updates a tenant.
    pub async fn put_tenant(
        &self,
        id: &str,
        name: &str,
        config: &serde_json::Value,
    ) -> Result<(Tenant, Written)> {
        let row = self
            .conn()
            .await?
            .query_one(
                &format!(
                    "INSERT INTO tenant (id, name, config) SELECT $1, $2, $3 FROM {} \
                     ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, config = EXCLUDED.config, updated = now() \
                     RETURNING id, name, config, created, updated, (xmax = 0) AS inserted, pg_current_xact_id()::text AS xid",
                    notify_setting(4)
                ),
                &[&id, &name, config, &self.notify.setting()],
            )
            .await?;
        Ok((tenant_from_row(&row), written(&row)))
    }

    /// Deletes a tenant and, by cascade, everything it owns. `None` if it did not exist,
    /// else the writing transaction.
    pub async fn delete_tenant(&self, id: &str) -> Result<Option<u64>> {
        self.delete("tenant", "id = $1", &[&id]).await
    }

    /// A transaction for a write of several statements, with `openfhir.notify` set for it (the
    /// triggers then leave the NOTIFY to this node's notifier while it defers).
    pub(crate) async fn write_transaction<'a>(
        &self,
        conn: &'a mut Object,
    ) -> Result<deadpool_postgres::Transaction<'a>> {
        let tx = conn.transaction().await?;
        tx.execute(
            "SELECT set_config('openfhir.notify', $1, true)",
            &[&self.notify.setting()],
        )
        .await?;
        Ok(tx)
    }

    // ---- operator evictions ----

    /// Records an operator's eviction in the invalidation log (one row with operation `EVICT`,
    /// see `sql/0007_operator_evictions.sql`), announced by NOTIFY like any change. Returns the
    /// writing transaction. A schema older than version 7 refuses the row: that is a conflict
    /// naming the fix, not a bad value.
    pub async fn log_eviction(
        &self,
        group: &str,
        tenant: Option<&str>,
        key: Option<&str>,
    ) -> Result<u64> {
        let mut conn = self.conn().await?;
        let tx = self.write_transaction(&mut conn).await?;
        let logged = tx
            .query_one(
                "SELECT openfhir_log_invalidation($1, $2, $3, $4), pg_current_xact_id()::text AS xid",
                &[&group, &tenant, &key, &crate::cache::EVICT_OPERATION],
            )
            .await;
        let row = match logged {
            Ok(row) => row,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) => {
                return Err(Error::Conflict(
                    "the database schema predates durable evictions (version 7): run                      `openfhir-cache migrate`"
                        .into(),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        Ok(xid(&row))
    }

    /// `DELETE FROM table WHERE filter`; the filter's parameters come first, `openfhir.notify`
    /// is appended.
    async fn delete(
        &self,
        table: &str,
        filter: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<u64>> {
        let setting = self.notify.setting();
        let mut all = params.to_vec();
        all.push(&setting);
        let sql = format!(
            "DELETE FROM {table} USING {} WHERE {filter} RETURNING pg_current_xact_id()::text AS xid",
            notify_setting(all.len() as u8)
        );
        let row = self.conn().await?.query_opt(&sql, &all).await?;
        Ok(row.as_ref().map(xid))
    }
}

fn written(row: &Row) -> Written {
    Written {
        created: row.get::<_, bool>("inserted"),
        xid: xid(row),
    }
}

/// Reads the `xid` column (`pg_current_xact_id()::text`); PostgreSQL always sends a number.
fn xid(row: &Row) -> u64 {
    row.get::<_, String>("xid").parse().unwrap_or(0)
}

/// A write into a tenant that vanished meanwhile (foreign key) is a 404 for that tenant.
fn tenant_fk(e: tokio_postgres::Error, tenant: &str) -> Error {
    if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) {
        Error::NotFound {
            what: "tenant",
            id: tenant.to_string(),
        }
    } else {
        Error::Db(e)
    }
}

fn tenant_from_row(r: &Row) -> Tenant {
    Tenant {
        id: r.get("id"),
        name: r.get("name"),
        config: r.get("config"),
        created: r.get("created"),
        updated: r.get("updated"),
    }
}
