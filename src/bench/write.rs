//! Scenario 5, the write path: the OPT upsert the node runs (`store::opt_write_sql`, the same
//! statement), on two identical copies of the `opt` table (same columns, primary key and foreign
//! key): one without triggers, one put under invalidation with `openfhir_track_table` exactly as
//! `opt` is. Four variants: no triggers; the log row only (the write defers NOTIFY and nobody sends
//! it, to tell the costs apart); production, as a node writes: the log row, NOTIFY deferred and
//! sent after COMMIT by a running node's notifier task (`invalidation::deferred`); and a plain-SQL write
//! (psql, a script), whose NOTIFY the trigger sends inside the transaction. 1 and 8 concurrent
//! writers, a small (1 KB) and the growth-chart (33 KB) OPT. A node LISTENs meanwhile, as in
//! production.

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
/// Drops both copies, and the trigger function `openfhir_track_table` generated for the tracked one.
pub const DROP_TABLES: &str =
    "SELECT openfhir_untrack_table(to_regclass('openfhir_bench_upsert_tracked')); \
     DROP TABLE IF EXISTS openfhir_bench_upsert_plain, openfhir_bench_upsert_tracked;";

/// What the table's triggers do and who sends the NOTIFY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// No triggers.
    Plain,
    /// The log row only: the write defers NOTIFY and nobody sends it.
    LogOnly,
    /// Production, a node's write: the log row, NOTIFY deferred and sent after COMMIT by the
    /// listening node's notifier task.
    LogAndNotify,
    /// A plain-SQL write (not through a node): the log row and NOTIFY from the trigger, inside the
    /// transaction.
    SqlNotify,
}

impl Variant {
    /// Every variant, in report order.
    pub const ALL: [Variant; 4] = [
        Variant::Plain,
        Variant::LogOnly,
        Variant::LogAndNotify,
        Variant::SqlNotify,
    ];

    /// Display name.
    pub fn label(self) -> &'static str {
        match self {
            Variant::Plain => "no triggers",
            Variant::LogOnly => "log row, no NOTIFY",
            Variant::LogAndNotify => "node write: log row + NOTIFY after COMMIT",
            Variant::SqlNotify => "plain SQL: log row + NOTIFY in the trigger",
        }
    }

    fn table(self) -> &'static str {
        match self {
            Variant::Plain => PLAIN_TABLE,
            _ => TRACKED_TABLE,
        }
    }

    /// `openfhir.notify` for the write.
    fn setting(self) -> &'static str {
        match self {
            Variant::LogOnly | Variant::LogAndNotify => crate::store::DEFERRED,
            Variant::Plain | Variant::SqlNotify => "",
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
        "{DROP_TABLES}
         CREATE TABLE {PLAIN_TABLE} (LIKE opt INCLUDING ALL);
         ALTER TABLE {PLAIN_TABLE} ADD FOREIGN KEY (tenant) REFERENCES tenant (id) ON DELETE CASCADE;
         CREATE TABLE {TRACKED_TABLE} (LIKE opt INCLUDING ALL);
         ALTER TABLE {TRACKED_TABLE} ADD FOREIGN KEY (tenant) REFERENCES tenant (id) ON DELETE CASCADE;
         SELECT openfhir_track_table('{TRACKED_TABLE}', 'opt', 'tenant', ARRAY['template_id']);"
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
    // Production: the listening node's own notifier task sends the deferred NOTIFY.
    let notifier = listener.fleet().node(0).invalidation().deferred().clone();
    let half = h.sizes.write_cell / 2;
    let n_variants = Variant::ALL.len();
    let bar = h.progress.bar(
        "write",
        (payloads.len() * WRITERS.len() * 2 * n_variants) as u64,
    );
    let mut cells = Vec::new();
    let mut overhead = Vec::new();
    for (bytes, contents) in &payloads {
        for writers in WRITERS {
            let mut rec: Vec<Recorder> = Variant::ALL.iter().map(|_| Recorder::new()).collect();
            let mut ops = vec![0u64; n_variants];
            let mut secs = vec![0f64; n_variants];
            // Two halves, the second in reverse order, so drift (autovacuum, checkpoints, other
            // load) hits every variant alike.
            for round in 0..2 {
                for i in 0..n_variants {
                    let slot = if round == 0 { i } else { n_variants - 1 - i };
                    let v = Variant::ALL[slot];
                    bar.set_message(format!(
                        "{} KB, {writers} writer(s), {}",
                        bytes / 1024,
                        v.label()
                    ));
                    let notify = (v == Variant::LogAndNotify).then_some(&notifier);
                    let (r, n, s) = upserts(h, v, notify, writers, contents, half).await?;
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
    db.batch_execute(DROP_TABLES)
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

/// `writers` connections upserting into the variant's table for `d`; every key is written once
/// first (so the measured upserts are updates, as replacing an uploaded OPT is). With `notify`,
/// each committed write is handed to that node's deferred notifier, as `Node::write` does.
async fn upserts(
    h: &Harness,
    variant: Variant,
    notify: Option<&Arc<crate::invalidation::DeferredNotify>>,
    writers: usize,
    contents: &[Arc<str>; 2],
    d: Duration,
) -> BenchResult<(Recorder, u64, f64)> {
    let table = variant.table();
    let setting = variant.setting();
    let statement = crate::store::opt_write_sql(table, crate::store::WriteMode::Upsert);
    let mut conns = Vec::with_capacity(writers);
    for w in 0..writers {
        let c = h.sql().await?;
        let stmt = c
            .prepare(&statement)
            .await
            .map_err(sql(format!("prepare the upsert into {table}")))?;
        let keys: Vec<String> = (0..KEYS_PER_WRITER).map(|j| format!("w{w}_{j}")).collect();
        for key in &keys {
            upsert(&c, &stmt, &h.tenant, key, &contents[0], setting).await?;
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
            let notifier = notify.cloned();
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
                    let xid = upsert(
                        &c,
                        &stmt,
                        &tenant,
                        &keys[k % KEYS_PER_WRITER],
                        content,
                        setting,
                    )
                    .await?;
                    r.record(t.elapsed());
                    if let Some(n) = &notifier {
                        n.push(xid);
                    }
                    n += 1;
                }
                Ok::<_, BenchError>((r, n))
            })
        })
        .collect();
    let (all, ops) = Recorder::join(tasks, "a writer task").await?;
    Ok((all, ops, start.elapsed().as_secs_f64()))
}

/// One upsert; returns its transaction id.
async fn upsert(
    c: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    tenant: &str,
    key: &str,
    content: &str,
    setting: &str,
) -> BenchResult<u64> {
    let row = c
        .query_one(stmt, &[&tenant, &key, &key, &content, &setting])
        .await
        .map_err(sql("upsert".into()))?;
    let xid: String = row.get("xid");
    xid.parse()
        .map_err(|_| BenchError::Setup(format!("the upsert returned xid {xid:?}")))
}
