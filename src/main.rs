//! The `openfhir-cache` binary: parse the command line, call into the library.

use std::process::ExitCode;

mod cli;

use clap::Parser;
use cli::{Cli, Command};
use openfhir_cache::config::{Config, LogFormat, Sources};
use openfhir_cache::{app, store::Db};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&Sources {
        file: cli.config.clone(),
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::Config = cli.command {
        match serde_json::to_string_pretty(&config.to_json()) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    // The benchmark starts dozens of nodes in this process: only their errors are of interest.
    let default_filter = match cli.command {
        #[cfg(feature = "bench")]
        Command::Bench(_) => "error",
        _ => "info",
    };
    init_tracing(config.log.format, default_filter);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if interrupted(&e) {
                // 128 + SIGINT, as shells report an interrupted command.
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Whether the error is a benchmark run stopped by Ctrl-C.
#[cfg(feature = "bench")]
fn interrupted(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<openfhir_cache::bench::BenchError>(),
        Some(openfhir_cache::bench::BenchError::Interrupted)
    )
}

#[cfg(not(feature = "bench"))]
fn interrupted(_: &anyhow::Error) -> bool {
    false
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve { no_migrate } => {
            let running = app::start(config, app::ServeOptions { no_migrate }).await?;
            running.run_until(app::shutdown_signal()).await?;
            tracing::info!("stopped");
        }
        Command::Migrate => {
            let db = Db::new(&config.database, "openfhir-cache/migrate")?;
            if let Err(e) = db.check().await {
                return Err(app::unreachable(&config, &e).into());
            }
            let applied = db.migrate().await?;
            println!(
                "applied migrations: {applied:?} (schema version {})",
                openfhir_cache::store::migrate::latest_version()
            );
        }
        Command::Health { url } => {
            let addr = match url {
                Some(u) => u,
                None => {
                    let mut a = config.http.addr;
                    if a.ip().is_unspecified() {
                        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                    }
                    format!("http://{a}")
                }
            };
            openfhir_cache::app::probe_live(&addr)
                .await
                .map_err(anyhow::Error::msg)?;
            println!("{addr}/health/live: live");
        }
        #[cfg(feature = "bench")]
        Command::Bench(args) => {
            let opts = openfhir_cache::bench::BenchOptions {
                quick: args.quick,
                scenarios: args.scenarios,
                out: args.out.clone(),
                database_url: args
                    .database_url
                    .unwrap_or_else(|| config.database.url.expose().to_string()),
                in_place: args.in_place,
                redis_url: (!args.no_redis).then_some(args.redis_url),
            };
            let report = openfhir_cache::bench::run(opts).await?;
            println!("{}", report.targets_table());
            println!("report: {}", args.out.display());
        }
        Command::Config => unreachable!("handled before the runtime starts"),
    }
    Ok(())
}

fn init_tracing(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
