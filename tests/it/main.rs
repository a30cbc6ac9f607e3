//! The integration tests: real PostgreSQL (the throwaway server of `tests/common/pg.rs`, one
//! database per test), real nodes on loopback sockets, and the real binary as a child process.
//! One binary with a module per area; run one area with `cargo test --test it cluster::`.
//!
//! What makes sharing one process safe (cargo runs a binary's tests in parallel threads):
//!
//! - No test sets an environment variable or installs a global tracing subscriber: nodes get
//!   their settings through `common::test_config`, child processes through `Command::env`.
//! - No test stops or restarts the shared PostgreSQL server (`pg::stop_server` and
//!   `pg::restart_server` are unused): the tests that stop, restart or rewind a server
//!   (`catchup_rewind`, `pg_harness`) use a `pg::PrivateServer` of their own.
//! - Every module that binds a fixed address owns its `127.0.N.x` range, so modules never share
//!   one: `cluster` 127.0.0.2-4 and 127.0.5-12.x and 127.0.73-74.x, `shutdown` 127.0.30.x,
//!   `embedded` 127.0.31.x, `openfhir_api` 127.0.70.x, `hardening` 127.0.71.x, `bootstrap`
//!   127.0.72.x, `metrics` 127.0.91.x, `supervision` 127.0.93.x, `operator_evict` 127.0.95.x.
//!   (`multicast_discovery` binds UDP on random group ports only; the other binaries own
//!   127.0.40.x, `cluster_flood`, 127.0.60.x, `chaos`, and namespaces of their own, `netns`.)
//!   Everything else binds port 0. `pg_tls` runs private servers on 127.0.0.1 at free ports.
//!
//! Kept out of this binary: `cluster_flood` (its flood of 1,500 connections and garbage loads
//! both cores, which would starve the 100 ms heartbeats of tests running beside it), `chaos` and
//! `bench_smoke` (long, CPU-bound runs of several node processes).

#[path = "../common/mod.rs"]
mod common;

mod bootstrap;
mod cache_semantics;
mod catchup_rewind;
mod cli;
mod cluster;
mod compiled;
mod dns_discovery;
mod embedded;
mod hardening;
mod http_api;
mod http_limits;
mod invalidation;
mod logs;
mod memory_bound;
mod metrics;
mod multicast_discovery;
mod openfhir_api;
mod operator_evict;
mod pg_harness;
mod pg_tls;
mod shutdown;
mod stale_window;
mod supervision;
mod triggers;
