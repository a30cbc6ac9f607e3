//! Command line of the `openfhir-cache` binary: `serve`, `migrate`, `config`, `health` and, with
//! the `bench` feature (on by default), `bench`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// openfhir-cache: coherent caches of openFHIR artifacts, backed by PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "openfhir-cache", version, about)]
pub struct Cli {
    /// Configuration file (TOML). Default: ./openfhir-cache.toml if it exists. Environment
    /// variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node (applies pending migrations first).
    Serve {
        /// Do not apply migrations at startup.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply the schema migrations and exit.
    Migrate,
    /// Print the effective configuration as JSON (secrets masked); fail if it is invalid.
    Config,
    /// Probe a running node's `/health/live` (exit 0 if it answers 200). Needs no curl, so
    /// container health checks work on a slim image.
    Health {
        /// Base URL of the node. Default: the configured OPENFHIR_HTTP_ADDR (0.0.0.0 as 127.0.0.1).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// Benchmark this cache against the alternatives (TTL 0, NOTIFY, catch-up, Redis pub/sub)
    /// on this machine's PostgreSQL; writes a report directory (JSON, Markdown, SVG charts).
    #[cfg(feature = "bench")]
    Bench(BenchArgs),
}

/// Options of `bench`.
#[cfg(feature = "bench")]
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The short run (about three minutes) instead of the full one (under ten minutes).
    #[arg(long)]
    pub quick: bool,

    /// Run only this scenario (repeatable): read, cold-start, propagation, scale, write, catchup,
    /// helpers.
    #[arg(long = "scenario", value_name = "NAME", value_enum)]
    pub scenarios: Vec<openfhir_cache::bench::Scenario>,

    /// Report directory (report.json, report.md and the SVG charts).
    #[arg(long, value_name = "DIR", default_value = "target/bench-report")]
    pub out: PathBuf,

    /// PostgreSQL server to use. Default: the configured DATABASE_URL. A throwaway database
    /// `openfhir_bench_<pid>` is created there and dropped at the end (also on Ctrl-C).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,

    /// Run in the database of the URL itself instead of a throwaway one (in a tenant of its own,
    /// removed at the end); for roles without CREATEDB.
    #[arg(long)]
    pub in_place: bool,

    /// Redis server of the pub/sub baseline (skipped with a note when unreachable).
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Skip the Redis pub/sub baseline.
    #[arg(long)]
    pub no_redis: bool,
}
