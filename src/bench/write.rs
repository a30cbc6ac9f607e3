//! Scenario 5, the write path: the OPT upsert the node runs, on three identical copies of the
//! `opt` table (same columns, primary key and foreign key): one with the invalidation triggers
//! exactly as `opt` has them (log row plus NOTIFY), one whose trigger writes the log row but sends
//! no NOTIFY (to tell the two costs apart), and one without triggers; 1 and 8 concurrent writers,
//! a small (1 KB) and the growth-chart (33 KB) OPT. A node LISTENs meanwhile, as in production.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::harness::{sql, Harness, Linking, NodeSpec};
use super::stats::{Recorder, Summary};
use super::{data, BenchError, BenchResult};

/// The copy without triggers.
pub const PLAIN_TABLE: &str = "openfhir_bench_upsert_plain";
/// The copy with the invalidation triggers.
pub const TRACKED_TABLE: &str = "openfhir_bench_upsert_tracked";
/// The copy whose trigger logs without NOTIFY.
pub const LOG_ONLY_TABLE: &str = "openfhir_bench_upsert_log_only";
/// The trigger function of [`LOG_ONLY_TABLE`] (bench database only).
pub const LOG_ONLY_FUNCTION: &str = "openfhir_bench_log_only_row";

/// What the table's triggers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// No triggers.
    Plain,
    /// The log row only (the production trigger minus `pg_notify`).
    LogOnly,
    /// The production triggers: log row and NOTIFY.
    LogAndNotify,
}

impl Variant {
    /// Every variant, in report order.
    pub const ALL: [Variant; 3] = [Variant::Plain, Variant::LogOnly, Variant::LogAndNotify];

    /// Display name.
    pub fn label(self) -> &'static str {
        match self {
            Variant::Plain => "no triggers",
            Variant::LogOnly => "log row, no NOTIFY",
            Variant::LogAndNotify => "log row + NOTIFY",
        }
    }

    fn table(self) -> &'static str {
        match self {
            Variant::Plain => PLAIN_TABLE,
            Variant::LogOnly => LOG_ONLY_TABLE,
            Variant::LogAndNotify => TRACKED_TABLE,
        }
    }
}
/// Concurrent writers.
pub const WRITERS: [usize; 2] = [1, 8];
/// Keys each writer cycles through (writers never touch each other's rows).
const KEYS_PER_WRITER: usize = 16;

/// One measured cell.
#[derive(Debug, Clone, Serialize)]
pub struct WriteCell {
    /// What the table's triggers do.
    pub variant: Variant,
    /// Size of the OPT written, bytes.
    pub payload_bytes: usize,
    /// Concurrent writers (one connection each).
    pub writers: usize,
    /// Upserts committed.
    pub ops: u64,
    /// Upserts per second.
    pub throughput: f64,
    /// Latency of one upsert (autocommit: statement plus COMMIT).
    pub latency: Summary,
}

/// A trigger variant against no triggers, for one payload and writer count.
#[derive(Debug, Clone, Serialize)]
pub struct WriteOverhead {
    /// The variant compared with [`Variant::Plain`].
    pub variant: Variant,
    /// Size of the OPT written, bytes.
    pub payload_bytes: usize,
    /// Concurrent writers.
    pub writers: usize,
    /// Median latency with / without, minus 1, in percent.
    pub p50_pct: f64,
    /// p99 with / without, minus 1, in percent.
    pub p99_pct: f64,
    /// Throughput without / with, minus 1, in percent.
    pub throughput_pct: f64,
}

/// The write-path results.
#[derive(Debug, Clone, Serialize)]
pub struct WriteReport {
    /// Seconds each cell measured (in two halves, the variants in alternating order).
    pub cell_secs: f64,
    /// Every cell.
    pub cells: Vec<WriteCell>,
    /// The overheads.
    pub overhead: Vec<WriteOverhead>,
    /// `synchronous_commit` of the server (commit cost dominates upserts).
    pub synchronous_commit: String,
    /// `fsync` of the server.
    pub fsync: String,
}

/// Runs the scenario.
pub async fn run(h: &Harness) -> BenchResult<WriteReport> {
    let db = h.sql().await?;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {PLAIN_TABLE}, {TRACKED_TABLE}, {LOG_ONLY_TABLE};
         CREATE TABLE {PLAIN_TABLE} (LIKE opt INCLUDING ALL);
         ALTER TABLE {PLAIN_TABLE} ADD FOREIGN KEY (tenant) REFERENCES tenant (id) ON DELETE CASCADE;
         CREATE TABLE {TRACKED_TABLE} (LIKE opt INCLUDING ALL);
         ALTER TABLE {TRACKED_TABLE} ADD FOREIGN KEY (tenant) REFERENCES tenant (id) ON DELETE CASCADE;
         SELECT openfhir_track_table('{TRACKED_TABLE}', 'opt', 'tenant', ARRAY['template_id']);
         CREATE TABLE {LOG_ONLY_TABLE} (LIKE opt INCLUDING ALL);
         ALTER TABLE {LOG_ONLY_TABLE} ADD FOREIGN KEY (tenant) REFERENCES tenant (id) ON DELETE CASCADE;
         {LOG_ONLY_SQL}
         CREATE TRIGGER openfhir_bench_log_only AFTER INSERT OR UPDATE OR DELETE ON {LOG_ONLY_TABLE}
             FOR EACH ROW EXECUTE FUNCTION {LOG_ONLY_FUNCTION}('opt', 'tenant', 'template_id');"
    ))
    .await
    .map_err(sql("create the upsert tables".into()))?;
    let setting = |name: &'static str| {
        let db = &db;
        async move {
            db.query_one(&format!("SHOW {name}"), &[])
                .await
                .map(|r| r.get::<_, String>(0))
                .map_err(sql(format!("SHOW {name}")))
        }
    };
    let synchronous_commit = setting("synchronous_commit").await?;
    let fsync = setting("fsync").await?;
    // A listening node, so NOTIFY has a listener to signal as in production; it also makes
    // sure the bench tenant exists.
    let listener = h.track(
        h.start_fleet(
            1,
            Linking::Separate,
            NodeSpec {
                notify: true,
                ..NodeSpec::peer_only()
            },
        )
        .await?,
    );
    listener
        .fleet()
        .node(0)
        .put_tenant(&h.tenant, "openfhir-cache bench", &serde_json::json!({}))
        .await
        .map_err(super::harness::node_err("create the bench tenant"))?;

    let payloads: [(usize, [Arc<str>; 2]); 2] = [
        (
            data::small_opt("w", "v1").len(),
            [
                data::small_opt("w", "v1").into(),
                data::small_opt("w", "v2").into(),
            ],
        ),
        (
            data::OPT.len(),
            [
                data::OPT.into(),
                data::OPT
                    .replacen(
                        "<concept>Growth chart</concept>",
                        "<concept>Growth chart 2</concept>",
                        1,
                    )
                    .into(),
            ],
        ),
    ];
    let half = h.sizes.write_cell / 2;
    let bar = h
        .progress
        .bar("write", (payloads.len() * WRITERS.len() * 6) as u64);
    let mut cells = Vec::new();
    let mut overhead = Vec::new();
    for (bytes, contents) in &payloads {
        for writers in WRITERS {
            let mut rec = [Recorder::new(), Recorder::new(), Recorder::new()];
            let mut ops = [0u64; 3];
            let mut secs = [0f64; 3];
            // Two halves, the second in reverse order, so drift (autovacuum, checkpoints, other
            // load) hits every variant alike.
            for round in 0..2 {
                for i in 0..3 {
                    let slot = if round == 0 { i } else { 2 - i };
                    let v = Variant::ALL[slot];
                    bar.set_message(format!(
                        "{} KB, {writers} writer(s), {}",
                        bytes / 1024,
                        v.label()
                    ));
                    let (r, n, s) = upserts(h, v.table(), writers, contents, half).await?;
                    rec[slot].merge(&r);
                    ops[slot] += n;
                    secs[slot] += s;
                    bar.inc(1);
                }
            }
            let made: Vec<WriteCell> = Variant::ALL
                .iter()
                .enumerate()
                .map(|(i, &variant)| WriteCell {
                    variant,
                    payload_bytes: *bytes,
                    writers,
                    ops: ops[i],
                    throughput: ops[i] as f64 / secs[i],
                    latency: rec[i].summary(),
                })
                .collect();
            let plain = &made[0];
            for c in &made[1..] {
                overhead.push(WriteOverhead {
                    variant: c.variant,
                    payload_bytes: *bytes,
                    writers,
                    p50_pct: (c.latency.p50_us / plain.latency.p50_us - 1.0) * 100.0,
                    p99_pct: (c.latency.p99_us / plain.latency.p99_us - 1.0) * 100.0,
                    throughput_pct: (plain.throughput / c.throughput - 1.0) * 100.0,
                });
            }
            cells.extend(made);
        }
    }
    bar.finish_and_clear();
    listener.stop().await;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {PLAIN_TABLE}, {TRACKED_TABLE}, {LOG_ONLY_TABLE}; \
         DROP FUNCTION IF EXISTS {LOG_ONLY_FUNCTION}();"
    ))
    .await
    .map_err(sql("drop the upsert tables".into()))?;
    Ok(WriteReport {
        cell_secs: h.sizes.write_cell.as_secs_f64(),
        cells,
        overhead,
        synchronous_commit,
        fsync,
    })
}

/// `writers` connections upserting into `table` for `d`; every key is written once first
/// (so the measured upserts are updates, as replacing an uploaded OPT is).
async fn upserts(
    h: &Harness,
    table: &str,
    writers: usize,
    contents: &[Arc<str>; 2],
    d: Duration,
) -> BenchResult<(Recorder, u64, f64)> {
    let statement = format!(
        "INSERT INTO {table} (tenant, template_id, original_template_id, content) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (tenant, template_id) DO UPDATE SET original_template_id = EXCLUDED.original_template_id, \
         content = EXCLUDED.content, updated = now() \
         RETURNING tenant, template_id, original_template_id, octet_length(content)::bigint AS size, created, \
         updated, (xmax = 0) AS inserted, pg_current_xact_id()::text AS xid"
    );
    let mut conns = Vec::with_capacity(writers);
    for w in 0..writers {
        let c = h.sql().await?;
        let stmt = c
            .prepare(&statement)
            .await
            .map_err(sql(format!("prepare the upsert into {table}")))?;
        let keys: Vec<String> = (0..KEYS_PER_WRITER).map(|j| format!("w{w}_{j}")).collect();
        for key in &keys {
            upsert(&c, &stmt, &h.tenant, key, &contents[0]).await?;
        }
        conns.push((c, stmt, keys));
    }
    let start = Instant::now();
    let deadline = start + d;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|(c, stmt, keys)| {
            let tenant = h.tenant.clone();
            let contents = contents.clone();
            tokio::spawn(async move {
                let mut r = Recorder::new();
                let mut n = 0u64;
                loop {
                    let t = Instant::now();
                    if t >= deadline && n > 0 {
                        break;
                    }
                    let k = n as usize;
                    let content = &contents[1 - (k / KEYS_PER_WRITER) % 2];
                    upsert(&c, &stmt, &tenant, &keys[k % KEYS_PER_WRITER], content).await?;
                    r.record(t.elapsed());
                    n += 1;
                }
                Ok::<_, BenchError>((r, n))
            })
        })
        .collect();
    let mut all = Recorder::new();
    let mut ops = 0;
    for t in tasks {
        let (r, n) = t
            .await
            .map_err(|e| BenchError::Setup(format!("a writer task failed: {e}")))??;
        all.merge(&r);
        ops += n;
    }
    Ok((all, ops, start.elapsed().as_secs_f64()))
}

async fn upsert(
    c: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    tenant: &str,
    key: &str,
    content: &str,
) -> BenchResult<()> {
    c.query_one(stmt, &[&tenant, &key, &key, &content])
        .await
        .map(drop)
        .map_err(sql("upsert".into()))
}

/// The production row trigger (`openfhir_invalidation_row` and `openfhir_log_invalidation` in
/// `sql/0002_invalidation_log.sql`) with the same log row but without the `pg_notify`.
const LOG_ONLY_SQL: &str = r#"
CREATE OR REPLACE FUNCTION openfhir_bench_log_only_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_group   text := TG_ARGV[0];
    v_tcol    text := TG_ARGV[1];
    v_kcols   text[] := string_to_array(TG_ARGV[2], ',');
    v_old     jsonb;
    v_new     jsonb;
    v_old_key text;
    v_new_key text;
    v_origin  text := NULLIF(current_setting('openfhir.origin', true), '');
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        v_old := to_jsonb(OLD);
        SELECT string_agg(v_old ->> trim(c), ':' ORDER BY o) INTO v_old_key
          FROM unnest(v_kcols) WITH ORDINALITY AS u(c, o);
        INSERT INTO openfhir_invalidation_log (cache_group, tenant, key, operation, origin)
        VALUES (v_group, v_old ->> v_tcol, v_old_key, TG_OP, v_origin);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        v_new := to_jsonb(NEW);
        SELECT string_agg(v_new ->> trim(c), ':' ORDER BY o) INTO v_new_key
          FROM unnest(v_kcols) WITH ORDINALITY AS u(c, o);
        IF TG_OP = 'INSERT' OR (v_new ->> v_tcol, v_new_key) IS DISTINCT FROM (v_old ->> v_tcol, v_old_key) THEN
            INSERT INTO openfhir_invalidation_log (cache_group, tenant, key, operation, origin)
            VALUES (v_group, v_new ->> v_tcol, v_new_key, TG_OP, v_origin);
        END IF;
    END IF;
    RETURN NULL;
END $$;
"#;
