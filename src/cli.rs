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
}
