//! The artifact tables: `opt`, `fhir_connect_context` and `fhir_connect_model`.
//!
//! Every row has two names: its key (`(tenant, template_id)`, or `(tenant, name)` for models),
//! which the caches and the invalidation log use, and its id (a UUID), which openFHIR's API hands
//! out. A request's path may give either; [`Db::find`] resolves it, an id match first.
//!
//! [`opt`] holds the OPT rows, [`fc`] the FHIR Connect contexts and models.

mod fc;
mod opt;

pub use opt::{opt_write_sql, OptSummary};

use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::{tenant_fk, xid, Db};
use crate::cache::Change;
use crate::domain::{FcKind, ParsedFc, Template};
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
        let tx = self.write_transaction(&mut conn).await?;
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
}
