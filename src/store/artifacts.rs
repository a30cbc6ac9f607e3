//! The artifact tables: `opt`, `fhir_connect_context` and `fhir_connect_model`.
//!
//! Every row has two names: its key (`(tenant, template_id)`, or `(tenant, name)` for models),
//! which the caches and the invalidation log use, and its id (a UUID), which openFHIR's API hands
//! out. A request's path may give either; [`Db::find`] resolves it, an id match first.

use std::sync::Arc;

use serde::Serialize;
use time::OffsetDateTime;
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{notify_setting, tenant_fk, written, xid, Db, WriteMode, Written};
use crate::cache::Change;
use crate::domain::{FcDocument, FcFormat, FcKind, OptDocument, ParsedFc, Template};
use crate::error::{Error, Result};

/// One of the three artifact tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    /// `opt`, keyed by normalized template id.
    Opt,
    /// `fhir_connect_context`, keyed by normalized template id.
    Context,
    /// `fhir_connect_model`, keyed by model name.
    Model,
}

impl Artifact {
    fn table(self) -> &'static str {
        match self {
            Artifact::Opt => "opt",
            Artifact::Context => "fhir_connect_context",
            Artifact::Model => "fhir_connect_model",
        }
    }

    fn key_column(self) -> &'static str {
        match self {
            Artifact::Opt | Artifact::Context => "template_id",
            Artifact::Model => "name",
        }
    }

    /// `OPT`, `context` or `model`, for messages.
    pub fn what(self) -> &'static str {
        match self {
            Artifact::Opt => "OPT",
            Artifact::Context => "context",
            Artifact::Model => "model",
        }
    }

    /// `opt`, `context` or `model`: the name of its kind in the id index.
    pub fn kind(self) -> &'static str {
        match self {
            Artifact::Opt => "opt",
            Artifact::Context => "context",
            Artifact::Model => "model",
        }
    }

    /// The key a path names when it is not an id: template ids are normalized.
    pub fn path_key(self, path: &str) -> String {
        match self {
            Artifact::Opt | Artifact::Context => crate::domain::normalize_template_id(path),
            Artifact::Model => path.to_string(),
        }
    }

    /// The change a write of `key` makes.
    pub fn change(self, tenant: &str, key: &str) -> Change {
        let (tenant, key) = (tenant.to_string(), key.to_string());
        match self {
            Artifact::Opt => Change::Opt {
                tenant,
                template_id: key,
            },
            Artifact::Context => Change::Context {
                tenant,
                template_id: key,
            },
            Artifact::Model => Change::Model { tenant, name: key },
        }
    }
}

impl From<FcTable> for Artifact {
    fn from(t: FcTable) -> Artifact {
        match t {
            FcTable::Context => Artifact::Context,
            FcTable::Model => Artifact::Model,
        }
    }
}

/// The duplicate error of a create, in openFHIR's words (clients look for "already exists").
fn duplicate_opt(t: &Template) -> Error {
    Error::Duplicate(format!(
        "Template with templateId {} (normalized to: {}) already exists.",
        t.template_id, t.normalized_id
    ))
}

fn duplicate_fc(table: FcTable, doc: &ParsedFc) -> Error {
    Error::Duplicate(match table {
        FcTable::Context => "A context mapper for this template already exists.".to_string(),
        FcTable::Model => format!(
            "Model mapper with this name {} already exists. Modify the name of the model mapper or \
             update it (PUT with id) if you want to update an existing one.",
            doc.key
        ),
    })
}

/// A rename onto a key another row has is a duplicate too; any other error passes.
fn unique_violation(e: tokio_postgres::Error, tenant: &str, dup: impl FnOnce() -> Error) -> Error {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        dup()
    } else {
        tenant_fk(e, tenant)
    }
}

/// An existing row a write addresses: its id and its key at the time it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The row's id.
    pub id: Uuid,
    /// Its key then (the change to evict if it is rewritten or deleted).
    pub key: String,
}

/// OPT metadata as listed by `GET /opt` (no XML).
#[derive(Debug, Clone, Serialize)]
pub struct OptSummary {
    /// The server-assigned id.
    pub id: Uuid,
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

const OPT_RETURNING: &str = "RETURNING id, tenant, template_id, original_template_id, \
    octet_length(content)::bigint AS size, created, updated";

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
         {OPT_RETURNING}, {inserted} AS inserted, pg_current_xact_id()::text AS xid",
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

    /// `context` or `model`.
    pub fn what(self) -> &'static str {
        Artifact::from(self).what()
    }

    fn select(self) -> &'static str {
        match self {
            FcTable::Context => "SELECT id AS uuid, tenant, template_id AS id, original_template_id AS display_id, 'context' AS kind, \
                NULL::text AS archetype, NULL::text AS extends, content, content_format, parsed, created, updated \
                FROM fhir_connect_context",
            FcTable::Model => "SELECT id AS uuid, tenant, name AS id, name AS display_id, kind, archetype, extends, content, \
                content_format, parsed, created, updated FROM fhir_connect_model",
        }
    }
}

impl Db {
    /// The row `path` addresses in `a`: the one whose id it is, else the one whose key it is
    /// (template ids normalized).
    pub async fn find(&self, a: Artifact, tenant: &str, path: &str) -> Result<Option<Target>> {
        let id = Uuid::parse_str(path.trim()).ok();
        let sql = format!(
            "SELECT id, {key} AS key FROM {table} WHERE tenant = $1 AND (id = $2 OR {key} = $3) \
             ORDER BY (id = $2) IS TRUE DESC LIMIT 1",
            key = a.key_column(),
            table = a.table()
        );
        let row = self
            .conn()
            .await?
            .query_opt(&sql, &[&tenant, &id, &a.path_key(path)])
            .await?;
        Ok(row.map(|r| Target {
            id: r.get("id"),
            key: r.get("key"),
        }))
    }

    /// The key of the row with id `id`, if the tenant has one.
    pub async fn key_of(&self, a: Artifact, tenant: &str, id: Uuid) -> Result<Option<String>> {
        let sql = format!(
            "SELECT {} AS key FROM {} WHERE tenant = $1 AND id = $2",
            a.key_column(),
            a.table()
        );
        let row = self.conn().await?.query_opt(&sql, &[&tenant, &id]).await?;
        Ok(row.map(|r| r.get("key")))
    }

    /// Deletes the row `target` found, if it still has that id and key. `None` if it did not
    /// (already gone, or renamed meanwhile), else the writing transaction.
    pub async fn delete_target(
        &self,
        a: Artifact,
        tenant: &str,
        target: &Target,
    ) -> Result<Option<u64>> {
        let filter = format!("tenant = $1 AND id = $2 AND {} = $3", a.key_column());
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&tenant, &target.id, &target.key];
        self.delete(a.table(), &filter, &params).await
    }

    /// Deletes every OPT, context and model of the tenant in one transaction (openFHIR's
    /// `$purge`). Returns the writing transaction.
    pub async fn purge(&self, tenant: &str) -> Result<u64> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute(
            "SELECT set_config('openfhir.notify', $1, true)",
            &[&self.notify.setting()],
        )
        .await?;
        for a in [Artifact::Model, Artifact::Context, Artifact::Opt] {
            tx.execute(
                &format!("DELETE FROM {} WHERE tenant = $1", a.table()),
                &[&tenant],
            )
            .await?;
        }
        let row = tx
            .query_one("SELECT pg_current_xact_id()::text AS xid", &[])
            .await?;
        tx.commit().await?;
        Ok(xid(&row))
    }

    // ---- OPT ----

    /// One OPT, parsed, by key.
    pub async fn opt(&self, tenant: &str, template_id: &str) -> Result<Option<OptDocument>> {
        let row = self
            .conn()
            .await?
            .query_opt(
                "SELECT id, content, created, updated FROM opt WHERE tenant = $1 AND template_id = $2",
                &[&tenant, &template_id],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let content: String = row.get("content");
        let tree =
            crate::domain::opt::TemplateTree::parse(&content).map_err(|e| Error::CorruptRow {
                what: "OPT",
                id: format!("{tenant}:{template_id}"),
                reason: e.to_string(),
            })?;
        Ok(Some(OptDocument {
            id: row.get("id"),
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
                "SELECT id, tenant, template_id, original_template_id, octet_length(content)::bigint AS size, created, updated \
                 FROM opt WHERE tenant = $1 ORDER BY template_id",
                &[&tenant],
            )
            .await?;
        Ok(rows.iter().map(opt_summary_from_row).collect())
    }

    /// Stores an OPT under its template id: `Create` fails with a duplicate if one is there,
    /// `Upsert` replaces it.
    pub async fn put_opt(
        &self,
        tenant: &str,
        t: &Template,
        xml: &str,
        mode: WriteMode,
    ) -> Result<(OptSummary, Written)> {
        let sql = opt_write_sql("opt", mode);
        let setting = self.notify.setting();
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
            None => Err(duplicate_opt(t)),
        }
    }

    /// Rewrites the OPT `target` found (its template id may change). `None` if that row no
    /// longer has that id and key; a template id another OPT has is a duplicate.
    pub async fn update_opt(
        &self,
        tenant: &str,
        target: &Target,
        t: &Template,
        xml: &str,
    ) -> Result<Option<(OptSummary, Written)>> {
        let sql = format!(
            "UPDATE opt SET template_id = $4, original_template_id = $5, content = $6, updated = now() \
             FROM {} WHERE tenant = $1 AND id = $2 AND template_id = $3 \
             {OPT_RETURNING}, false AS inserted, pg_current_xact_id()::text AS xid",
            notify_setting(7)
        );
        let row = self
            .conn()
            .await?
            .query_opt(
                &sql,
                &[
                    &tenant,
                    &target.id,
                    &target.key,
                    &t.normalized_id,
                    &t.template_id,
                    &xml,
                    &self.notify.setting(),
                ],
            )
            .await
            .map_err(|e| unique_violation(e, tenant, || duplicate_opt(t)))?;
        Ok(row.map(|r| (opt_summary_from_row(&r), written(&r))))
    }

    // ---- FHIR Connect ----

    /// One context or model, by key.
    pub async fn fc(&self, table: FcTable, tenant: &str, key: &str) -> Result<Option<FcDocument>> {
        let sql = format!(
            "{} WHERE tenant = $1 AND {} = $2",
            table.select(),
            Artifact::from(table).key_column()
        );
        let row = self.conn().await?.query_opt(&sql, &[&tenant, &key]).await?;
        row.map(|r| fc_from_row(table, &r)).transpose()
    }

    /// One context or model, by the id or key `path` gives (an id match first).
    pub async fn fc_at(
        &self,
        table: FcTable,
        tenant: &str,
        path: &str,
    ) -> Result<Option<FcDocument>> {
        let a = Artifact::from(table);
        let id = Uuid::parse_str(path.trim()).ok();
        let sql = format!(
            "{} WHERE tenant = $1 AND (id = $2 OR {} = $3) ORDER BY (id = $2) IS TRUE DESC LIMIT 1",
            table.select(),
            a.key_column()
        );
        let row = self
            .conn()
            .await?
            .query_opt(&sql, &[&tenant, &id, &a.path_key(path)])
            .await?;
        row.map(|r| fc_from_row(table, &r)).transpose()
    }

    /// Every context or model of a tenant, by key.
    pub async fn fcs(&self, table: FcTable, tenant: &str) -> Result<Vec<FcDocument>> {
        let sql = format!(
            "{} WHERE tenant = $1 ORDER BY {}",
            table.select(),
            Artifact::from(table).key_column()
        );
        let rows = self.conn().await?.query(&sql, &[&tenant]).await?;
        rows.iter().map(|r| fc_from_row(table, r)).collect()
    }

    /// Stores a context or model under its key: `Create` fails with a duplicate if one is
    /// there, `Upsert` replaces it.
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
        let setting = self.notify.setting();
        const RETURNING: &str = "RETURNING id, created, updated, (xmax = 0) AS inserted, pg_current_xact_id()::text AS xid";
        let row = match table {
            FcTable::Context => {
                let sql = format!(
                    "INSERT INTO fhir_connect_context (tenant, template_id, original_template_id, content, content_format, parsed) \
                     SELECT $1, $2, $3, $4, $5, $6 FROM {} ON CONFLICT (tenant, template_id) {on_conflict} {RETURNING}",
                    notify_setting(7)
                );
                conn.query_opt(&sql, &[&tenant, &doc.key, &doc.display_id, &content, &fmt, &doc.json, &setting]).await
            }
            FcTable::Model => {
                let sql = format!(
                    "INSERT INTO fhir_connect_model (tenant, name, kind, archetype, extends, content, content_format, parsed) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM {} ON CONFLICT (tenant, name) {on_conflict} {RETURNING}",
                    notify_setting(9)
                );
                let kind = doc.kind.as_str();
                conn.query_opt(&sql, &[&tenant, &doc.key, &kind, &doc.archetype, &doc.extends, &content, &fmt, &doc.json, &setting])
                    .await
            }
        }
        .map_err(|e| tenant_fk(e, tenant))?;
        let Some(row) = row else {
            return Err(duplicate_fc(table, doc));
        };
        Ok((stored(tenant, doc, content, format, &row), written(&row)))
    }

    /// Rewrites the context or model `target` found (its key may change). `None` if that row
    /// no longer has that id and key; a key another row has is a duplicate.
    pub async fn update_fc(
        &self,
        table: FcTable,
        tenant: &str,
        target: &Target,
        doc: &ParsedFc,
        content: &str,
        format: FcFormat,
    ) -> Result<Option<(FcDocument, Written)>> {
        let conn = self.conn().await?;
        let fmt = format.as_str();
        let setting = self.notify.setting();
        const RETURNING: &str =
            "RETURNING id, created, updated, false AS inserted, pg_current_xact_id()::text AS xid";
        let row = match table {
            FcTable::Context => {
                let sql = format!(
                    "UPDATE fhir_connect_context SET template_id = $4, original_template_id = $5, content = $6, \
                     content_format = $7, parsed = $8, updated = now() \
                     FROM {} WHERE tenant = $1 AND id = $2 AND template_id = $3 {RETURNING}",
                    notify_setting(9)
                );
                conn.query_opt(
                    &sql,
                    &[&tenant, &target.id, &target.key, &doc.key, &doc.display_id, &content, &fmt, &doc.json, &setting],
                )
                .await
            }
            FcTable::Model => {
                let sql = format!(
                    "UPDATE fhir_connect_model SET name = $4, kind = $5, archetype = $6, extends = $7, content = $8, \
                     content_format = $9, parsed = $10, updated = now() \
                     FROM {} WHERE tenant = $1 AND id = $2 AND name = $3 {RETURNING}",
                    notify_setting(11)
                );
                let kind = doc.kind.as_str();
                conn.query_opt(
                    &sql,
                    &[
                        &tenant, &target.id, &target.key, &doc.key, &kind, &doc.archetype, &doc.extends,
                        &content, &fmt, &doc.json, &setting,
                    ],
                )
                .await
            }
        }
        .map_err(|e| unique_violation(e, tenant, || duplicate_fc(table, doc)))?;
        Ok(row.map(|r| (stored(tenant, doc, content, format, &r), written(&r))))
    }
}

/// The document a write stored, from what was written and what the database returned.
fn stored(tenant: &str, doc: &ParsedFc, content: &str, format: FcFormat, row: &Row) -> FcDocument {
    FcDocument {
        uuid: row.get("id"),
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
    }
}

fn opt_summary_from_row(r: &Row) -> OptSummary {
    OptSummary {
        id: r.get("id"),
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
        uuid: r.get("uuid"),
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
