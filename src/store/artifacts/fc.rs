//! FHIR Connect rows (contexts and models): read, create, upsert, rewrite by id.

use std::sync::Arc;
use tokio_postgres::Row;
use uuid::Uuid;

use super::super::{notify_setting, tenant_fk, written, Db, WriteMode, Written};
use super::{duplicate_fc, unique_violation, Artifact, FcTable, Target};
use crate::domain::{FcDocument, FcFormat, FcKind, ParsedFc};
use crate::error::{Error, Result};

impl Db {
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
