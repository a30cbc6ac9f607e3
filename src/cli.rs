//! Command line: `serve`, `migrate`, `config`.

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
}
