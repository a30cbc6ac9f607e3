//! Versioned schema migrations from `sql/`, embedded in the binary.
//!
//! Each file is idempotent and records itself in `openfhir_schema_migrations`, so a DBA can apply
//! them with psql in order and the node agrees. The runner holds a transaction-level advisory lock,
//! so nodes that start at once apply each migration exactly once.

use tokio_postgres::Client;

use crate::error::{Error, Result};

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Version number (the file's numeric prefix).
    pub version: i32,
    /// File name in `sql/`.
    pub name: &'static str,
    /// The SQL.
    pub sql: &'static str,
}

/// Every migration, in order. A test checks that this list matches the files in `sql/`.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_schema.sql",
        sql: include_str!("../../sql/0001_schema.sql"),
    },
    Migration {
        version: 2,
        name: "0002_invalidation_log.sql",
        sql: include_str!("../../sql/0002_invalidation_log.sql"),
    },
    Migration {
        version: 3,
        name: "0003_specialised_triggers.sql",
        sql: include_str!("../../sql/0003_specialised_triggers.sql"),
    },
    Migration {
        version: 4,
        name: "0004_artifact_ids.sql",
        sql: include_str!("../../sql/0004_artifact_ids.sql"),
    },
    Migration {
        version: 5,
        name: "0005_bootstrap.sql",
        sql: include_str!("../../sql/0005_bootstrap.sql"),
    },
    Migration {
        version: 6,
        name: "0006_notify_created.sql",
        sql: include_str!("../../sql/0006_notify_created.sql"),
    },
    Migration {
        version: 7,
        name: "0007_operator_evictions.sql",
        sql: include_str!("../../sql/0007_operator_evictions.sql"),
    },
    Migration {
        version: 8,
        name: "0008_unlogged_log.sql",
        sql: include_str!("../../sql/0008_unlogged_log.sql"),
    },
    Migration {
        version: 9,
        name: "0009_packed_notify.sql",
        sql: include_str!("../../sql/0009_packed_notify.sql"),
    },
];

/// The first schema version whose triggers leave NOTIFY to a node that sets
/// `openfhir.notify = 'deferred'` (and that has `openfhir_notify_transactions`).
pub const DEFERRED_NOTIFY_SINCE: i32 = 3;

/// The schema version this build needs.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Arbitrary constant naming our advisory lock ("ofcache" in ASCII).
const LOCK_KEY: i64 = 0x6f_6663_6163_6865;

/// Applies pending migrations; returns the versions it applied.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>> {
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
            .await?;
        let done = current_version_in(&tx)
            .await?
            .is_some_and(|v| v >= m.version);
        if !done {
            tx.batch_execute(m.sql)
                .await
                .map_err(|source| Error::Migration {
                    version: m.version,
                    name: m.name.to_string(),
                    source,
                })?;
            tx.commit().await?;
            tracing::info!(version = m.version, name = m.name, "applied migration");
            applied.push(m.version);
        }
    }
    Ok(applied)
}

/// The highest applied migration, or `None` if the schema was never migrated.
pub async fn current_version(client: &Client) -> Result<Option<i32>> {
    current_version_in(client).await
}

async fn current_version_in(c: &impl tokio_postgres::GenericClient) -> Result<Option<i32>> {
    let exists: bool = c
        .query_one(
            "SELECT to_regclass('openfhir_schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(
        c.query_one("SELECT max(version) FROM openfhir_schema_migrations", &[])
            .await?
            .get(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sql_file_is_listed_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, listed);
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
            assert!(
                m.sql
                    .contains(&format!("VALUES ({}, '{}')", m.version, m.name)),
                "{} records itself",
                m.name
            );
        }
    }
}
