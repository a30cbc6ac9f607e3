//! Chaos: faults, load and stale reads across real node processes.
//!
//! The harness starts a private throwaway PostgreSQL (`common::pg::PrivateServer`, since it gets
//! restarted) and N `openfhir-cache serve` processes on `127.0.60.x` (HTTP :8080, cluster :7800,
//! `CLUSTER_DISCOVERY=TCP` listing every node, heartbeats every 200 ms, catch-up every 500 ms, a
//! cluster secret). A seeded workload drives it through HTTP and SQL:
//!
//! - writes on a random node: OPTs (`PUT`/`DELETE /opt`, two tenants), contexts, models, tenants
//!   (and a scratch tenant created with an OPT in it, then deleted); plain-SQL writes of OPTs and
//!   tenant names straight in the database;
//! - reads of every key a write touches on every node before the write (so caches are hot and a
//!   missed invalidation shows), and of random keys.
//!
//! After every acknowledged write it polls each other node (concurrently) until it serves what
//! the database holds: the time to the new value, an upper bound of the stale window (it includes
//! time the node answered 503 during a database restart). When a node answers the old value
//! first, the arrival of its last old answer is recorded too: the stale window actually seen. A
//! node that is down or paused when a write is made is measured from the moment it is back.
//!
//! Faults, one per phase: kill -9 a node and restart it on the same address; cut one node's peer
//! traffic (iptables DROP on its cluster port; needs root); kill every node's LISTEN connection
//! (`pg_terminate_backend`), several times; restart PostgreSQL (fast, or in the long run also
//! immediate, with some downtime); SIGSTOP a node, then SIGCONT. Each phase runs workload before,
//! during and after the fault, then stops the workload, waits the settle time (3 s: several
//! catch-up intervals) and checks every key on every node against a direct `SELECT`: any
//! difference is a failure naming the key, the node and the phase's fault. It also checks that the
//! database still holds every acknowledged write, that no response was a 5xx other than the 503
//! of a database restart, that no node died unless the harness killed it, and that no node's log
//! says `panicked`.
//!
//! - `chaos_short` (CI): seed `CHAOS_SEED` (default 0x5eed), a baseline phase and every fault
//!   once, about a minute.
//! - `chaos_long` (by hand): random phases for `CHAOS_DURATION` seconds, then the per-fault table:
//!
//!   ```sh
//!   CHAOS_DURATION=600 cargo test --release --test chaos -- --ignored --nocapture
//!   ```
//!
//! Other knobs: `CHAOS_NODES` (3), `CHAOS_BOUND_MS` (10000: how long a write may take to reach
//! a node before that is a failure), `CHAOS_SETTLE_MS` (3000), `CHAOS_NO_PARTITION=1` (leave the
//! iptables fault out where there is no root), `CHAOS_KEEP_LOGS=1` (keep the node logs of a run
//! that passed; a failing run always keeps them under `target/chaos/`), and `CHAOS_NODE_ENV`
//! (`K=V,K=V` added to every node's environment), `CHAOS_PG_CONF` (`name=value,...` set on the
//! chaos PostgreSQL with `ALTER SYSTEM`; it runs with `synchronous_commit = on`, PostgreSQL's
//! default, unlike the other tests' server). The checker can fail: with
//! `CHAOS_NODE_ENV=OPENFHIR_PG_NOTIFY=false,OPENFHIR_CATCHUP_INTERVAL_MS=0` nothing tells the
//! nodes about plain-SQL writes, and the run reports their stale values.

mod common;

#[path = "chaos/cluster.rs"]
mod cluster;
#[path = "chaos/model.rs"]
mod model;
#[path = "chaos/report.rs"]
mod report;
#[path = "chaos/rng.rs"]
mod rng;
#[path = "chaos/run.rs"]
mod run;

use std::time::Duration;

#[test]
fn chaos_short() {
    run::main(run::Settings::from_env("short", 0x5eed, 1, None));
}

#[test]
#[ignore = "long chaos run, by hand: CHAOS_DURATION=600 cargo test --release --test chaos -- --ignored --nocapture"]
fn chaos_long() {
    let secs = std::env::var("CHAOS_DURATION")
        .ok()
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("CHAOS_DURATION={v:?} is not a number of seconds"))
        })
        .unwrap_or(600);
    let seed = std::env::var("CHAOS_SEED").map_or_else(
        |_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        },
        |_| 0,
    );
    run::main(run::Settings::from_env(
        "long",
        seed,
        11,
        Some(Duration::from_secs(secs)),
    ));
}
