//! PostgreSQL: the connection pool, migrations and the repositories of every table.
//!
//! Every write runs in one statement (or one transaction) and returns only after COMMIT; callers
//! evict caches after that. Each write statement also sets `openfhir.notify` for its own
//! transaction (see [`deferred`]): while a node runs its notifier, the invalidation trigger leaves
//! the NOTIFY to it, and the caller must [`DeferredNotify::push`] the returned transaction id
//! ([`crate::node::Node`] does).

pub mod deferred;
pub mod migrate;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde::Serialize;
use time::OffsetDateTime;
use tokio_postgres::{NoTls, Row};

use crate::config::DatabaseConfig;
use crate::domain::{FcDocument, FcFormat, FcKind, OptDocument, ParsedFc, Template, Tenant};
use crate::error::{Error, Result};
use deferred::DeferredNotify;

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

/// OPT metadata as listed by `GET /opt` (no XML).
#[derive(Debug, Clone, Serialize)]
pub struct OptSummary {
    /// Tenant id.
    pub tenant: String,
    /// Normalized template id (the key).
    #[serde(rename = "templateId")]
    pub template_id: String,
    /// Template id as written in the OPT.
    #[serde(rename = "originalTemplateId")]
    pub original_template_id: String,
    /// XML size in bytes.
    pub size: i64,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// Last replaced.
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
}

/// The database: a pool of connections to the source of truth.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    notifier: Arc<DeferredNotify>,
}

/// `FROM` item that sets `openfhir.notify` for the statement's transaction to parameter `$n`
/// (`'deferred'` or empty). A volatile subquery is evaluated before the statement's AFTER
/// triggers run, and never flattened away.
fn notify_setting(n: u8) -> String {
    format!("(SELECT set_config('openfhir.notify', ${n}, true)) AS openfhir_notify")
}

/// The OPT write the node runs, into `table` (`opt`; the write benchmark passes copies of it).
/// Parameters: tenant, normalized id, original id, XML, `openfhir.notify`.
pub fn opt_write_sql(table: &str, mode: WriteMode) -> String {
    let (conflict, inserted) = match mode {
        WriteMode::Create => ("DO NOTHING", "true"),
        WriteMode::Upsert => (
            "DO UPDATE SET original_template_id = EXCLUDED.original_template_id, \
             content = EXCLUDED.content, updated = now()",
            "(xmax = 0)",
        ),
    };
    format!(
        "INSERT INTO {table} (tenant, template_id, original_template_id, content) \
         SELECT $1, $2, $3, $4 FROM {} ON CONFLICT (tenant, template_id) {conflict} \
         RETURNING tenant, template_id, original_template_id, octet_length(content)::bigint AS size, \
         created, updated, {inserted} AS inserted, pg_current_xact_id()::text AS xid",
        notify_setting(5)
    )
}

/// Which FHIR Connect table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FcTable {
    /// `fhir_connect_context`, keyed by normalized template id.
    Context,
    /// `fhir_connect_model`, keyed by model name.
    Model,
}

impl FcTable {
    /// The document kind uploaded to this table's route (models also accept extensions).
    pub fn kind(self) -> FcKind {
        match self {
            FcTable::Context => FcKind::Context,
            FcTable::Model => FcKind::Model,
        }
    }

    /// The key for an id from a path: contexts are keyed by normalized template id.
    pub fn key(self, id: &str) -> String {
        match self {
            FcTable::Context => crate::domain::normalize_template_id(id),
            FcTable::Model => id.to_string(),
        }
    }

    /// The document field the key comes from.
    pub fn key_field(self) -> &'static str {
        match self {
            FcTable::Context => "context.template.id",
            FcTable::Model => "metadata.name",
        }
    }

    /// What the key is called in error messages.
    pub fn key_name(self) -> &'static str {
        match self {
            FcTable::Context => "template id",
            FcTable::Model => "model name",
        }
    }

    /// The change a write of `key` makes.
    pub fn change(self, tenant: &str, key: &str) -> crate::cache::Change {
        let tenant = tenant.to_string();
        match self {
            FcTable::Context => crate::cache::Change::Context {
                tenant,
                template_id: key.to_string(),
            },
            FcTable::Model => crate::cache::Change::Model {
                tenant,
                name: key.to_string(),
            },
        }
    }

    /// `context` or `model`.
    pub fn what(self) -> &'static str {
        match self {
            FcTable::Context => "context",
            FcTable::Model => "model",
        }
    }
    fn select(self) -> &'static str {
        match self {
            FcTable::Context => "SELECT tenant, template_id AS id, original_template_id AS display_id, 'context' AS kind, \
                NULL::text AS archetype, NULL::text AS extends, content, content_format, parsed, created, updated \
                FROM fhir_connect_context",
            FcTable::Model => "SELECT tenant, name AS id, name AS display_id, kind, archetype, extends, content, \
                content_format, parsed, created, updated FROM fhir_connect_model",
        }
    }
    fn key_column(self) -> &'static str {
        match self {
            FcTable::Context => "template_id",
            FcTable::Model => "name",
        }
    }
}

impl Db {
    /// Builds the pool. Connections are made lazily; call [`Db::check`] to fail fast.
    /// `application_name` names the node in `pg_stat_activity`, and the invalidation triggers
    /// read the origin node from it.
    pub fn new(cfg: &DatabaseConfig, application_name: &str) -> Result<Db> {
        let mut pg = tokio_postgres::Config::from_str(cfg.url.expose())?;
        pg.application_name(application_name);
        let mgr = Manager::from_config(
            pg,
            NoTls,
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
            notifier: Arc::default(),
        })
    }

    /// The queue of this node's committed writes whose NOTIFY is still to be sent.
    pub fn notifier(&self) -> &Arc<DeferredNotify> {
        &self.notifier
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
                &[&id, &name, config, &self.notifier.setting()],
            )
            .await?;
        Ok((tenant_from_row(&row), written(&row)))
    }

    /// Deletes a tenant and, by cascade, everything it owns. `None` if it did not exist,
    /// else the writing transaction.
    pub async fn delete_tenant(&self, id: &str) -> Result<Option<u64>> {
        self.delete("tenant", "id = $1", &[&id]).await
    }

    /// `DELETE FROM table WHERE filter`; the filter's parameters come first, `openfhir.notify`
    /// is appended.
    async fn delete(
        &self,
        table: &str,
        filter: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<u64>> {
        let setting = self.notifier.setting();
        let mut all = params.to_vec();
        all.push(&setting);
        let sql = format!(
            "DELETE FROM {table} USING {} WHERE {filter} RETURNING pg_current_xact_id()::text AS xid",
            notify_setting(all.len() as u8)
        );
        let row = self.conn().await?.query_opt(&sql, &all).await?;
        Ok(row.as_ref().map(xid))
    }

    // ---- OPT ----

    /// One OPT, parsed.
    pub async fn opt(&self, tenant: &str, template_id: &str) -> Result<Option<OptDocument>> {
        let row = self
            .conn()
            .await?
            .query_opt(
                "SELECT content, created, updated FROM opt WHERE tenant = $1 AND template_id = $2",
                &[&tenant, &template_id],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let content: String = row.get("content");
        let tree = crate::domain::template::TemplateTree::parse(&content).map_err(|e| {
            Error::CorruptRow {
                what: "OPT",
                id: format!("{tenant}:{template_id}"),
                reason: e.to_string(),
            }
        })?;
        Ok(Some(OptDocument {
            tenant: tenant.to_string(),
            template: tree.header().clone(),
            tree: Arc::new(tree),
            size: content.len(),
            content: bytes::Bytes::from(content),
            created: row.get("created"),
            updated: row.get("updated"),
        }))
    }

    /// Metadata of every OPT of a tenant.
    pub async fn opts(&self, tenant: &str) -> Result<Vec<OptSummary>> {
        let rows = self
            .conn()
            .await?
            .query(
                "SELECT tenant, template_id, original_template_id, octet_length(content)::bigint AS size, created, updated \
                 FROM opt WHERE tenant = $1 ORDER BY template_id",
                &[&tenant],
            )
            .await?;
        Ok(rows.iter().map(opt_summary_from_row).collect())
    }

    /// Stores an OPT.
    pub async fn put_opt(
        &self,
        tenant: &str,
        t: &Template,
        xml: &str,
        mode: WriteMode,
    ) -> Result<(OptSummary, Written)> {
        let sql = opt_write_sql("opt", mode);
        let setting = self.notifier.setting();
        let row = self
            .conn()
            .await?
            .query_opt(
                &sql,
                &[&tenant, &t.normalized_id, &t.template_id, &xml, &setting],
            )
            .await
            .map_err(|e| tenant_fk(e, tenant))?;
        match row {
            Some(r) => Ok((opt_summary_from_row(&r), written(&r))),
            None => Err(Error::Conflict(format!(
                "OPT '{}' already exists in tenant '{tenant}'; use PUT /opt/{} to replace it",
                t.normalized_id, t.normalized_id
            ))),
        }
    }

    /// Deletes an OPT. `None` if it did not exist, else the writing transaction.
    pub async fn delete_opt(&self, tenant: &str, template_id: &str) -> Result<Option<u64>> {
        self.delete(
            "opt",
            "tenant = $1 AND template_id = $2",
            &[&tenant, &template_id],
        )
        .await
    }

    // ---- FHIR Connect ----

    /// One context or model.
    pub async fn fc(&self, table: FcTable, tenant: &str, id: &str) -> Result<Option<FcDocument>> {
        let sql = format!(
            "{} WHERE tenant = $1 AND {} = $2",
            table.select(),
            table.key_column()
        );
        let row = self.conn().await?.query_opt(&sql, &[&tenant, &id]).await?;
        row.map(|r| fc_from_row(table, &r)).transpose()
    }

    /// Every context or model of a tenant, by key.
    pub async fn fcs(&self, table: FcTable, tenant: &str) -> Result<Vec<FcDocument>> {
        let sql = format!(
            "{} WHERE tenant = $1 ORDER BY {}",
            table.select(),
            table.key_column()
        );
        let rows = self.conn().await?.query(&sql, &[&tenant]).await?;
        rows.iter().map(|r| fc_from_row(table, r)).collect()
    }

    /// Stores a context or model.
    pub async fn put_fc(
        &self,
        table: FcTable,
        tenant: &str,
        doc: &ParsedFc,
        content: &str,
        format: FcFormat,
        mode: WriteMode,
    ) -> Result<(FcDocument, Written)> {
        let on_conflict = match (mode, table) {
            (WriteMode::Create, _) => "DO NOTHING",
            (WriteMode::Upsert, FcTable::Context) => "DO UPDATE SET original_template_id = EXCLUDED.original_template_id, \
                content = EXCLUDED.content, content_format = EXCLUDED.content_format, parsed = EXCLUDED.parsed, updated = now()",
            (WriteMode::Upsert, FcTable::Model) => "DO UPDATE SET kind = EXCLUDED.kind, archetype = EXCLUDED.archetype, \
                extends = EXCLUDED.extends, content = EXCLUDED.content, content_format = EXCLUDED.content_format, \
                parsed = EXCLUDED.parsed, updated = now()",
        };
        let conn = self.conn().await?;
        let fmt = format.as_str();
        let setting = self.notifier.setting();
        let row = match table {
            FcTable::Context => {
                let sql = format!(
                    "INSERT INTO fhir_connect_context (tenant, template_id, original_template_id, content, content_format, parsed) \
                     SELECT $1, $2, $3, $4, $5, $6 FROM {} ON CONFLICT (tenant, template_id) {on_conflict} \
                     RETURNING created, updated, (xmax = 0) AS inserted, pg_current_xact_id()::text AS xid",
                    notify_setting(7)
                );
                conn.query_opt(&sql, &[&tenant, &doc.key, &doc.display_id, &content, &fmt, &doc.json, &setting]).await
            }
            FcTable::Model => {
                let sql = format!(
                    "INSERT INTO fhir_connect_model (tenant, name, kind, archetype, extends, content, content_format, parsed) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM {} ON CONFLICT (tenant, name) {on_conflict} \
                     RETURNING created, updated, (xmax = 0) AS inserted, pg_current_xact_id()::text AS xid",
                    notify_setting(9)
                );
                let kind = doc.kind.as_str();
                conn.query_opt(&sql, &[&tenant, &doc.key, &kind, &doc.archetype, &doc.extends, &content, &fmt, &doc.json, &setting])
                    .await
            }
        }
        .map_err(|e| tenant_fk(e, tenant))?;
        let Some(row) = row else {
            return Err(Error::Conflict(format!(
                "{} '{}' already exists in tenant '{tenant}'; use PUT to replace it",
                table.what(),
                doc.key
            )));
        };
        let stored = FcDocument {
            tenant: tenant.to_string(),
            kind: doc.kind,
            id: doc.key.clone(),
            display_id: doc.display_id.clone(),
            archetype: doc.archetype.clone(),
            extends: doc.extends.clone(),
            format,
            content: Arc::from(content),
            json: Arc::new(doc.json.clone()),
            created: row.get("created"),
            updated: row.get("updated"),
            rendered: Default::default(),
        };
        Ok((stored, written(&row)))
    }

    /// Deletes a context or model. `None` if it did not exist, else the writing transaction.
    pub async fn delete_fc(&self, table: FcTable, tenant: &str, id: &str) -> Result<Option<u64>> {
        let (name, filter) = match table {
            FcTable::Context => ("fhir_connect_context", "tenant = $1 AND template_id = $2"),
            FcTable::Model => ("fhir_connect_model", "tenant = $1 AND name = $2"),
        };
        self.delete(name, filter, &[&tenant, &id]).await
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

fn opt_summary_from_row(r: &Row) -> OptSummary {
    OptSummary {
        tenant: r.get("tenant"),
        template_id: r.get("template_id"),
        original_template_id: r.get("original_template_id"),
        size: r.get("size"),
        created: r.get("created"),
        updated: r.get("updated"),
    }
}

fn fc_from_row(table: FcTable, r: &Row) -> Result<FcDocument> {
    let id: String = r.get("id");
    let corrupt = |reason: String| Error::CorruptRow {
        what: table.what(),
        id: id.clone(),
        reason,
    };
    let fmt: String = r.get("content_format");
    let format = FcFormat::from_db(&fmt)
        .ok_or_else(|| corrupt(format!("unknown content_format {fmt:?}")))?;
    let kind: String = r.get("kind");
    let kind = match kind.as_str() {
        "context" => FcKind::Context,
        "model" => FcKind::Model,
        "extension" => FcKind::Extension,
        other => return Err(corrupt(format!("unknown kind {other:?}"))),
    };
    let content: String = r.get("content");
    Ok(FcDocument {
        tenant: r.get("tenant"),
        kind,
        display_id: r.get("display_id"),
        archetype: r.get("archetype"),
        extends: r.get("extends"),
        format,
        content: Arc::from(content),
        json: Arc::new(r.get("parsed")),
        created: r.get("created"),
        updated: r.get("updated"),
        id,
        rendered: Default::default(),
    })
}
