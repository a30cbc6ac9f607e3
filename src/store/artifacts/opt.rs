//! OPT rows: read one or all, create, upsert, rewrite by id.

use serde::Serialize;
use std::sync::Arc;
use time::OffsetDateTime;
use tokio_postgres::Row;
use uuid::Uuid;

use super::super::{notify_setting, tenant_fk, written, Db, WriteMode, Written};
use super::{duplicate_opt, unique_violation, Target};
use crate::domain::{OptDocument, Template};
use crate::error::{Error, Result};

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

impl Db {
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
