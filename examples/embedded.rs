//! openfhir-cache inside a Rust program, without its HTTP API.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo run --example embedded
//! ```
//!
//! The program reads its configuration like `openfhir-cache serve` does (defaults, then
//! `./openfhir-cache.toml` if present, then the environment), starts an embedded node
//! ([`app::start_embedded`]: schema migration, NOTIFY listener, catch-up task, peer cluster
//! channel), and then, in the tenant `embedded-example` (created if missing):
//!
//! 1. writes the growth chart OPT and reads it back twice (the second read is a cache hit);
//! 2. writes its FHIR Connect context, two models and three extensions, and gets the compiled
//!    mapper index and the helper tree (`node.mapper`, `node.helpers`);
//! 3. prints a short summary and shuts down: it leaves the cluster, stops its tasks and closes
//!    its database connections.
//!
//! The artifacts stay in the database, so nodes serving the same database show them
//! (`curl -H 'X-Tenant-Id: embedded-example' http://127.0.0.1:8080/opt`). Remove them with
//! `curl -X DELETE http://127.0.0.1:8080/tenants/embedded-example`.
//!
//! `tests/embedded.rs` runs [`run`] against a throwaway database.

use std::process::ExitCode;
use std::sync::Arc;

use openfhir_cache::app::{self, ServeOptions};
use openfhir_cache::cache::CacheName;
use openfhir_cache::config::{LogFormat, Sources};
use openfhir_cache::domain::FcFormat;
use openfhir_cache::node::Put;
use openfhir_cache::{Config, Node, Result};

/// The tenant the example writes into (kept apart from `default`).
pub const TENANT: &str = "embedded-example";

/// A real OPT (12 KB) and the FHIR Connect documents that map it, from the test fixtures.
const OPT: &str = include_str!("../tests/fixtures/growth_chart.opt");
const CONTEXT: &str = include_str!("../tests/fixtures/growth_chart.context.yml");
const MODELS: [&str; 5] = [
    include_str!("../tests/fixtures/height.model.yml"),
    include_str!("../tests/fixtures/weight.model.yml"),
    include_str!("../tests/fixtures/height.ext-add.yml"),
    include_str!("../tests/fixtures/height.ext-append.yml"),
    include_str!("../tests/fixtures/height.ext-overwrite.yml"),
];

/// What the example did, as printed at the end.
#[derive(Debug)]
pub struct Summary {
    /// This node's id (new at every start).
    pub node_id: String,
    /// The address the cluster channel listened on.
    pub cluster_addr: Option<std::net::SocketAddr>,
    /// Peers seen when the work was done (0 when no other node runs).
    pub peers: usize,
    /// The OPT's normalized template id.
    pub template_id: String,
    /// True if the OPT was new, false if it replaced one (a second run).
    pub opt_created: bool,
    /// The consistency token of the OPT write (its transaction id).
    pub opt_xid: u64,
    /// The OPT read back is byte for byte what was written.
    pub opt_round_trip: bool,
    /// Nodes of the parsed template tree.
    pub template_nodes: usize,
    /// OPT cache hits after the two reads.
    pub opt_hits: u64,
    /// OPT cache loads (database reads) after the two reads.
    pub opt_loads: u64,
    /// Models in the compiled mapper index.
    pub mapper_models: Vec<String>,
    /// Extensions merged into them.
    pub merged_extensions: Vec<String>,
    /// How long compiling the mapper took, in microseconds.
    pub compile_us: u64,
    /// Helpers in the helper tree, all levels.
    pub helpers: usize,
    /// Helpers whose openEHR path exists in the template.
    pub helpers_resolved: usize,
}

/// Starts an embedded node with `config`, does the work, and shuts the node down (also when
/// the work failed).
pub async fn run(config: Config) -> Result<Summary> {
    let embedded = app::start_embedded(config, ServeOptions::default()).await?;
    let summary = work(&embedded.node).await;
    embedded.shutdown().await;
    summary
}

async fn work(node: &Arc<Node>) -> Result<Summary> {
    node.put_tenant(
        TENANT,
        "openfhir-cache embedding example",
        &serde_json::json!({}),
    )
    .await?;

    // 1. The OPT: written to PostgreSQL (evicted here and on every peer after COMMIT), then read
    //    through the cache.
    let (meta, written) = node.put_opt(TENANT, OPT, Put::At("Growth chart")).await?;
    let first = node.opt(TENANT, &meta.template_id).await?;
    let second = node.opt(TENANT, "Growth chart").await?; // same id, normalized
    let opt_stats = node
        .caches()
        .report()
        .await
        .into_iter()
        .find(|r| r.cache == CacheName::Opt)
        .map(|r| r.stats)
        .unwrap_or_default();

    // 2. FHIR Connect: the models and extensions first, then the context that names them.
    for model in MODELS {
        node.put_model(TENANT, model.as_bytes(), FcFormat::Yaml, Put::Upsert)
            .await?;
    }
    node.put_context(
        TENANT,
        CONTEXT.as_bytes(),
        FcFormat::Yaml,
        Put::At("Growth chart"),
    )
    .await?;
    let mapper = node.mapper(TENANT, "growth_chart").await?;
    let helpers = node.helpers(TENANT, "growth_chart").await?;

    Ok(Summary {
        node_id: node.id().to_string(),
        cluster_addr: node.cluster().local_addr(),
        peers: node.cluster().peers().len(),
        template_id: meta.template_id.clone(),
        opt_created: written.created,
        opt_xid: written.xid,
        opt_round_trip: first.content.as_ref() == OPT.as_bytes() && second.content == first.content,
        template_nodes: first.tree.len(),
        opt_hits: opt_stats.hits,
        opt_loads: opt_stats.loads,
        mapper_models: mapper.index.by_model.keys().cloned().collect(),
        merged_extensions: mapper.index.merged_extensions.clone(),
        compile_us: mapper.compile_us,
        helpers: helpers.iter().count(),
        helpers_resolved: helpers.iter().filter(|h| h.resolved()).count(),
    })
}

fn print(s: &Summary) {
    println!(
        "embedded node {} (cluster channel on {}, {} peer(s))",
        s.node_id,
        s.cluster_addr.map_or("-".to_string(), |a| a.to_string()),
        s.peers,
    );
    println!(
        "OPT {}/{}: {} (consistency token {}), {} template nodes; read back {}; OPT cache: {} load(s), {} hit(s)",
        TENANT,
        s.template_id,
        if s.opt_created { "created" } else { "replaced" },
        s.opt_xid,
        s.template_nodes,
        if s.opt_round_trip { "byte for byte" } else { "DIFFERENT" },
        s.opt_loads,
        s.opt_hits,
    );
    println!(
        "mapper {}: models [{}], extensions merged [{}], compiled in {} us; {} helpers, {} resolved in the template",
        s.template_id,
        s.mapper_models.join(", "),
        s.merged_extensions.join(", "),
        s.compile_us,
        s.helpers,
        s.helpers_resolved,
    );
    println!("left the cluster and closed the database pool");
}

fn main() -> ExitCode {
    let config = match Config::load(&Sources::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // Logs on stderr as the binary writes them (RUST_LOG, OPENFHIR_LOG_FORMAT); the summary
    // goes to stdout.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(summary) => {
            print(&summary);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
