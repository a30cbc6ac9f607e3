//! The cached store: what a node (or an embedding Rust program) reads and writes.
//!
//! Reads go through the caches; writes go to PostgreSQL, and only after COMMIT is the change
//! handed to [`Node::apply`], the single entry point for invalidation.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use crate::cache::{CacheName, Caches, Change};
use crate::catchup::{Invalidator, StepReport};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::domain::{
    self, normalize_template_id, parse_fc, FcDocument, FcFormat, FcList, OptDocument, Tenant,
};
use crate::error::{Error, Result};
use crate::store::{Db, FcTable, OptSummary, WriteMode, Written};

/// Called after a cache loader read the database and before the value is cached, with the
/// cache and the key. Lets tests pause a load at exactly that point (the eviction race).
pub type LoadHook =
    Arc<dyn Fn(CacheName, &str) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Called when [`Node::apply`] has made a change's entries unservable on this node (the
/// synchronous generation bump; their memory is freed just after): for changes delivered by the
/// peer channel, NOTIFY or catch-up, and operator evictions (not this node's own writes).
/// Benchmarks use it to time propagation; it must be cheap and must not block.
pub type ApplyHook = Arc<dyn Fn(&Change) + Send + Sync>;

/// One node's cached view of the store.
pub struct Node {
    id: String,
    invalidator: Invalidator,
    config: Config,
    db: Db,
    caches: Caches,
    cluster: Cluster,
    load_hook: RwLock<Option<LoadHook>>,
    apply_hook: RwLock<Option<ApplyHook>>,
    http_stats: Arc<crate::api::ServerStats>,
}

impl Node {
    /// Builds a node from its configuration. No connection is made yet.
    pub fn new(config: Config) -> Result<Node> {
        let id = new_node_id();
        let db = Db::new(&config.database, &format!("openfhir-cache/{id}"))?;
        let caches = Caches::new(&config.cache);
        let cluster = Cluster::new(&config.cluster, &id);
        Ok(Node {
            cluster,
            id,
            invalidator: Invalidator::default(),
            config,
            db,
            caches,
            load_hook: RwLock::new(None),
            apply_hook: RwLock::new(None),
            http_stats: Arc::default(),
        })
    }

    /// Installs (or with `None` removes) the [`LoadHook`].
    pub fn set_load_hook(&self, hook: Option<LoadHook>) {
        if let Ok(mut h) = self.load_hook.write() {
            *h = hook;
        }
    }

    /// Installs (or with `None` removes) the [`ApplyHook`].
    pub fn set_apply_hook(&self, hook: Option<ApplyHook>) {
        if let Ok(mut h) = self.apply_hook.write() {
            *h = hook;
        }
    }

    async fn loaded<T>(&self, cache: CacheName, key: &str, value: T) -> T {
        let hook = self.load_hook.read().ok().and_then(|h| h.clone());
        if let Some(hook) = hook {
            hook(cache, key).await;
        }
        value
    }

    /// This node's id: `<host>-<random>`, new at every start. The database records it as the
    /// origin of the changes this node writes.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The database invalidation channel (cursor, catch-up, statistics).
    pub fn invalidator(&self) -> &Invalidator {
        &self.invalidator
    }

    /// The database invalidation channel's state, with the counters of this node's deferred
    /// notifications.
    pub fn invalidation_report(&self) -> crate::catchup::InvalidationReport {
        let mut r = self.invalidator.report();
        r.deferred_notify = self.db.notifier().report();
        r
    }

    /// Runs one catch-up step now.
    pub async fn catch_up(&self) -> Result<StepReport> {
        self.invalidator.step(self).await
    }

    /// Waits until this node has applied every change of transaction `xid` (a consistency
    /// token), catching up at once if it is behind; `false` when `wait` runs out.
    pub async fn await_token(&self, xid: u64, wait: std::time::Duration) -> Result<bool> {
        self.invalidator.await_xid(self, xid, wait).await
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The caches (statistics, explicit eviction).
    pub fn caches(&self) -> &Caches {
        &self.caches
    }

    /// Counters of this node's HTTP front (connections, shed requests).
    pub fn http_stats(&self) -> &Arc<crate::api::ServerStats> {
        &self.http_stats
    }

    /// The peer cluster channel (membership, statistics, broadcast).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// An operator's eviction (`POST /caches/evict`): applied here and sent to every peer.
    /// Returns how many cache entries or scopes were evicted on this node.
    pub async fn evict(&self, change: &Change) -> usize {
        let n = self.apply(change).await;
        self.cluster.broadcast(change, None);
        n
    }

    /// Applies a change to this node's caches through the one eviction rule. Every channel that
    /// learns of a change calls this.
    pub async fn apply(&self, change: &Change) -> usize {
        // The generation bump is the eviction: from here on no read serves an old entry (and a
        // caller cancelled later cannot undo it), so this is when the change counts as applied.
        self.caches.invalidate_now(change);
        if let Some(hook) = self.apply_hook.read().ok().and_then(|h| h.clone()) {
            hook(change);
        }
        // Dropping the dead entries only frees memory.
        let n = self.caches.purge(change).await;
        tracing::debug!(?change, targets = n, "evicted");
        n
    }

    /// Runs a write under an armed eviction: the change is evicted after COMMIT, and also if
    /// this future is dropped half-way (the write may have committed); not when the write
    /// certainly changed nothing (conflict, not found, invalid).
    async fn write<T: Committed>(
        &self,
        change: Change,
        write: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let guard = self.caches.guard(change);
        match write.await {
            Ok(v) => {
                self.invalidator.own_write(v.xid());
                // The trigger left this transaction's NOTIFY to the node (a transaction that
                // notifies commits only one at a time): queue it now that it committed, after
                // `own_write`, so this node's own listener recognises the echo. If it is never
                // sent, nothing is lost: the peer broadcast below and every node's catch-up
                // deliver the change too (see `store::deferred`).
                let notifier = self.db.notifier();
                if notifier.enabled() {
                    notifier.push(v.xid());
                }
                let change = guard.committed().await;
                // After COMMIT and the local eviction: a peer that reloads on receipt reads
                // the new row. Never waits on a peer.
                self.cluster.broadcast(&change, Some(v.xid()));
                tracing::debug!(?change, "committed, evicted and broadcast");
                Ok(v)
            }
            Err(e) => {
                let unchanged = matches!(
                    e.root(),
                    Error::Conflict(_) | Error::NotFound { .. } | Error::Invalid { .. }
                ) || e.is_bad_value();
                if unchanged {
                    guard.disarm();
                }
                Err(e)
            }
        }
    }

    // ---- tenants ----

    /// A tenant record (cached); `NotFound` if it does not exist.
    pub async fn tenant(&self, id: &str) -> Result<Arc<Tenant>> {
        domain::validate_tenant_id(id)?;
        self.caches
            .tenant
            .get_or_load(id, None, || async {
                let t = self.db.tenant(id).await?;
                self.loaded(CacheName::Tenant, id, t)
                    .await
                    .ok_or_else(|| not_found("tenant", id))
            })
            .await
    }

    /// Every tenant (from the database).
    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        self.db.tenants().await
    }

    /// Creates or updates a tenant.
    pub async fn put_tenant(
        &self,
        id: &str,
        name: &str,
        config: &serde_json::Value,
    ) -> Result<(Tenant, Written)> {
        domain::validate_tenant_id(id)?;
        domain::reject_nul("tenant name", &serde_json::Value::from(name))?;
        domain::reject_nul("tenant config", config)?;
        self.write(
            Change::Tenant {
                tenant: id.to_string(),
                deleted: false,
            },
            self.db.put_tenant(id, name, config),
        )
        .await
    }

    /// Deletes a tenant and everything it owns. The `default` tenant cannot be deleted.
    pub async fn delete_tenant(&self, id: &str) -> Result<u64> {
        domain::validate_tenant_id(id)?;
        if id == domain::DEFAULT_TENANT {
            return Err(Error::Conflict(
                "the default tenant cannot be deleted (zero-config nodes serve it)".into(),
            ));
        }
        self.write(
            Change::Tenant {
                tenant: id.to_string(),
                deleted: true,
            },
            async {
                self.db
                    .delete_tenant(id)
                    .await?
                    .ok_or_else(|| not_found("tenant", id))
            },
        )
        .await
    }

    // ---- OPT ----

    /// An OPT (cached). `template_id` is normalized here.
    pub async fn opt(&self, tenant: &str, template_id: &str) -> Result<Arc<OptDocument>> {
        let id = normalize_template_id(template_id);
        domain::validate_artifact_id("template id", &id)?;
        self.caches
            .opt
            .get_or_load(tenant, Some(&id), || async {
                let o = self.db.opt(tenant, &id).await?;
                self.loaded(CacheName::Opt, &id, o)
                    .await
                    .ok_or_else(|| not_found("OPT", &id))
            })
            .await
    }

    /// Metadata of every OPT of the tenant.
    pub async fn opts(&self, tenant: &str) -> Result<Vec<OptSummary>> {
        self.db.opts(tenant).await
    }

    /// Stores an OPT. With `path_id` (PUT) the XML's template id must match it.
    pub async fn put_opt(
        &self,
        tenant: &str,
        xml: &str,
        path_id: Option<&str>,
        mode: WriteMode,
    ) -> Result<(OptSummary, Written)> {
        // The whole template is parsed (and so validated) before anything is written.
        let t = crate::domain::template::TemplateTree::parse(xml)?
            .header()
            .clone();
        check_path_id(
            path_id.map(normalize_template_id).as_deref(),
            &t.normalized_id,
            "the OPT's template_id",
        )?;
        self.write(
            Change::Opt {
                tenant: tenant.to_string(),
                template_id: t.normalized_id.clone(),
            },
            self.db.put_opt(tenant, &t, xml, mode),
        )
        .await
    }

    /// Deletes an OPT.
    pub async fn delete_opt(&self, tenant: &str, template_id: &str) -> Result<u64> {
        let id = normalize_template_id(template_id);
        domain::validate_artifact_id("template id", &id)?;
        self.write(
            Change::Opt {
                tenant: tenant.to_string(),
                template_id: id.clone(),
            },
            async {
                self.db
                    .delete_opt(tenant, &id)
                    .await?
                    .ok_or_else(|| not_found("OPT", &id))
            },
        )
        .await
    }

    // ---- FHIR Connect contexts ----

    /// A context (cached), by template id (normalized here).
    pub async fn context(&self, tenant: &str, template_id: &str) -> Result<Arc<FcDocument>> {
        let id = normalize_template_id(template_id);
        domain::validate_artifact_id("template id", &id)?;
        self.caches
            .context
            .get_or_load(tenant, Some(&id), || async {
                let c = self.db.fc(FcTable::Context, tenant, &id).await?;
                self.loaded(CacheName::Context, &id, c)
                    .await
                    .ok_or_else(|| not_found("context", &id))
            })
            .await
    }

    /// Every context of the tenant (cached as one entry).
    pub async fn contexts(&self, tenant: &str) -> Result<Arc<FcList>> {
        self.caches
            .all_contexts
            .get_or_load(tenant, None, || async {
                let all = self.db.fcs(FcTable::Context, tenant).await?;
                let all = self.loaded(CacheName::AllContexts, tenant, all).await;
                Ok(FcList {
                    docs: all.into_iter().map(Arc::new).collect(),
                    rendered: Default::default(),
                })
            })
            .await
    }

    /// Stores a context. With `path_id` (PUT) its `context.template.id` must match it.
    pub async fn put_context(
        &self,
        tenant: &str,
        body: &[u8],
        format: FcFormat,
        path_id: Option<&str>,
        mode: WriteMode,
    ) -> Result<(FcDocument, Written)> {
        self.put_fc(FcTable::Context, tenant, body, format, path_id, mode)
            .await
    }

    /// Deletes a context.
    pub async fn delete_context(&self, tenant: &str, template_id: &str) -> Result<u64> {
        self.delete_fc(FcTable::Context, tenant, template_id).await
    }

    /// Stores a FHIR Connect document in `table`. With `path_id` (PUT) the document's key
    /// (`context.template.id`, normalized, or `metadata.name`) must match it.
    pub async fn put_fc(
        &self,
        table: FcTable,
        tenant: &str,
        body: &[u8],
        format: FcFormat,
        path_id: Option<&str>,
        mode: WriteMode,
    ) -> Result<(FcDocument, Written)> {
        let doc = parse_fc(body, format, table.kind())?;
        // The typed models validate every field and report every problem at once.
        let text = utf8(body)?;
        match table {
            FcTable::Context => drop(crate::domain::fc_model::parse_context(text, format)?),
            FcTable::Model => drop(crate::domain::fc_model::parse_model(text, format)?),
        }
        check_path_id(
            path_id.map(|p| table.key(p)).as_deref(),
            &doc.key,
            table.key_field(),
        )?;
        let content = utf8(body)?;
        let change = table.change(tenant, &doc.key);
        self.write(
            change,
            self.db.put_fc(table, tenant, &doc, content, format, mode),
        )
        .await
    }

    /// Deletes a FHIR Connect document from `table` by its key (normalized for contexts).
    pub async fn delete_fc(&self, table: FcTable, tenant: &str, id: &str) -> Result<u64> {
        let id = table.key(id);
        domain::validate_artifact_id(table.key_name(), &id)?;
        self.write(table.change(tenant, &id), async {
            self.db
                .delete_fc(table, tenant, &id)
                .await?
                .ok_or_else(|| not_found(table.what(), &id))
        })
        .await
    }

    // ---- compiled artifacts ----

    /// The compiled mapper index of a template (cached in the FHIR Connect group; concurrent cold
    /// requests compile once). A context that names models, extensions or a template that are
    /// not uploaded is `Unprocessable`, listing every missing name; nothing is cached then.
    pub async fn mapper(
        &self,
        tenant: &str,
        template_id: &str,
    ) -> Result<Arc<crate::domain::mapper::CompiledMapper>> {
        let id = normalize_template_id(template_id);
        domain::validate_artifact_id("template id", &id)?;
        self.caches
            .mapper
            .get_or_load(tenant, Some(&id), || async {
                let compiled = self.compile_mapper(tenant, &id).await?;
                Ok(self.loaded(CacheName::Mapper, &id, compiled).await)
            })
            .await
    }

    async fn compile_mapper(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<crate::domain::mapper::CompiledMapper> {
        use crate::domain::fc_model::{parse_context, parse_model};
        let ctx = self.context(tenant, id).await?;
        let context = parse_context(&ctx.content, ctx.format)?;
        // Only what the context names matters: a broken model of another template must not
        // break this one. (Names may also be archetype ids; the compiler resolves them.)
        let named: std::collections::BTreeSet<&str> = context
            .context
            .as_ref()
            .map(|c| {
                c.archetypes
                    .iter()
                    .flatten()
                    .chain(c.extensions.iter().flatten())
                    .map(|s| s.trim())
                    .collect()
            })
            .unwrap_or_default();
        let mut models = std::collections::BTreeMap::new();
        for m in self.db.fcs(FcTable::Model, tenant).await? {
            let referenced = named.contains(m.id.as_str())
                || m.archetype.as_deref().is_some_and(|a| {
                    named.contains(a) || named.iter().any(|n| a == format!("openEHR-EHR-{n}"))
                });
            match parse_model(&m.content, m.format) {
                Ok(typed) => {
                    models.insert(m.id.clone(), typed);
                }
                // Stored models were validated at upload; one that no longer parses is reported
                // only where it is used.
                Err(e) if referenced => {
                    return Err(Error::CorruptRow {
                        what: "model",
                        id: m.id.clone(),
                        reason: e.to_string(),
                    })
                }
                Err(e) => {
                    tracing::warn!(model = %m.id, error = %e, "skipping an unreadable stored model")
                }
            }
        }
        let template_uploaded = match self.opt(tenant, id).await {
            Ok(_) => true,
            Err(e) if matches!(e.root(), Error::NotFound { .. }) => false,
            Err(e) => return Err(e),
        };
        let started = std::time::Instant::now();
        let index =
            crate::domain::mapper::compile(&context, &models, template_uploaded).map_err(|e| {
                Error::Unprocessable {
                    message: format!("cannot compile the mapper for template '{id}'"),
                    details: e.missing,
                }
            })?;
        Ok(crate::domain::mapper::CompiledMapper {
            index,
            compiled_at: time::OffsetDateTime::now_utc(),
            node: self.id.clone(),
            compile_us: started.elapsed().as_micros() as u64,
        })
    }

    /// The helper tree of a template, shared and immutable (cached). Code that writes
    /// per-request state must use [`Node::helpers_copy`].
    pub async fn helpers(
        &self,
        tenant: &str,
        template_id: &str,
    ) -> Result<Arc<crate::domain::helpers::HelperTree>> {
        let id = normalize_template_id(template_id);
        domain::validate_artifact_id("template id", &id)?;
        self.caches
            .helpers
            .get_or_load(tenant, Some(&id), || async {
                let mapper = self.mapper(tenant, &id).await?;
                let opt = self.opt(tenant, &id).await?;
                let tree = crate::domain::helpers::build(&mapper.index, &opt.tree);
                Ok(self.loaded(CacheName::Helpers, &id, tree).await)
            })
            .await
    }

    /// An isolated copy of the helper tree for one use: mutating it never changes the cached
    /// tree or another request's copy.
    pub async fn helpers_copy(
        &self,
        tenant: &str,
        template_id: &str,
    ) -> Result<crate::domain::helpers::HelperTree> {
        Ok((*self.helpers(tenant, template_id).await?).clone())
    }

    // ---- FHIR Connect models ----

    /// A model or extension, by name (read from the database; compiled artifacts are cached).
    pub async fn model(&self, tenant: &str, name: &str) -> Result<FcDocument> {
        domain::validate_artifact_id("model name", name)?;
        self.db
            .fc(FcTable::Model, tenant, name)
            .await?
            .ok_or_else(|| not_found("model", name))
    }

    /// Every model and extension of the tenant.
    pub async fn models(&self, tenant: &str) -> Result<Vec<FcDocument>> {
        self.db.fcs(FcTable::Model, tenant).await
    }

    /// Stores a model or extension. With `path_id` (PUT) its `metadata.name` must match it.
    pub async fn put_model(
        &self,
        tenant: &str,
        body: &[u8],
        format: FcFormat,
        path_id: Option<&str>,
        mode: WriteMode,
    ) -> Result<(FcDocument, Written)> {
        self.put_fc(FcTable::Model, tenant, body, format, path_id, mode)
            .await
    }

    /// Deletes a model.
    pub async fn delete_model(&self, tenant: &str, name: &str) -> Result<u64> {
        self.delete_fc(FcTable::Model, tenant, name).await
    }
}

fn not_found(what: &'static str, id: &str) -> Error {
    Error::NotFound {
        what,
        id: id.to_string(),
    }
}

fn utf8(body: &[u8]) -> Result<&str> {
    std::str::from_utf8(body).map_err(|e| Error::invalid("document is not UTF-8", e.to_string()))
}

fn check_path_id(path_id: Option<&str>, doc_id: &str, field: &str) -> Result<()> {
    match path_id {
        Some(p) if p != doc_id => Err(Error::invalid(
            "path and document disagree",
            format!("the path names '{p}' but {field} gives '{doc_id}'"),
        )),
        _ => Ok(()),
    }
}

/// `<host>-<8 hex digits>`: readable in logs, unique per start.
fn new_node_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(40)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{host}-{:08x}", h.finish() as u32)
}

/// What a write returns carries the transaction that made it.
trait Committed {
    fn xid(&self) -> u64;
}

impl<T> Committed for (T, Written) {
    fn xid(&self) -> u64 {
        self.1.xid
    }
}

impl Committed for u64 {
    fn xid(&self) -> u64 {
        *self
    }
}

#[cfg(test)]
mod apply_hook_tests {
    use super::*;
    use futures_util::FutureExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A node with cached tenant records whose database is never contacted (the pool connects
    /// lazily).
    fn node() -> Arc<Node> {
        let config = Config::from_sources(None, |k| match k {
            "DATABASE_URL" => Some("postgres://nobody@127.0.0.1:1/none".into()),
            "OPENFHIR_CACHE_TENANT_TTL" => Some("-1".into()),
            _ => None,
        })
        .expect("config");
        Arc::new(Node::new(config).expect("node"))
    }

    #[tokio::test]
    async fn the_apply_hook_runs_at_the_synchronous_invalidation_before_the_purge() {
        let node = node();
        let tenant = || async {
            Ok(Tenant {
                id: "t".into(),
                name: "T".into(),
                config: serde_json::Value::Null,
                created: time::OffsetDateTime::UNIX_EPOCH,
                updated: time::OffsetDateTime::UNIX_EPOCH,
            })
        };
        node.caches()
            .tenant
            .get_or_load("t", None, tenant)
            .await
            .unwrap();
        assert!(node.caches().tenant.contains("t", None).await);

        // What the hook saw: how often it ran, whether the entry was still servable, and
        // whether it was still held (not purged yet).
        let calls = Arc::new(AtomicUsize::new(0));
        let servable = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let weak = Arc::downgrade(&node);
        let (c, sv, h) = (calls.clone(), servable.clone(), held.clone());
        node.set_apply_hook(Some(Arc::new(move |_: &Change| {
            c.fetch_add(1, Ordering::SeqCst);
            let n = weak.upgrade().expect("node alive");
            let still = n
                .caches()
                .tenant
                .contains("t", None)
                .now_or_never()
                .expect("a cache lookup does not wait");
            if still {
                sv.fetch_add(1, Ordering::SeqCst);
            }
            if n.caches().tenant.holds("t", None) {
                h.fetch_add(1, Ordering::SeqCst);
            }
        })));
        let change = Change::Tenant {
            tenant: "t".into(),
            deleted: false,
        };
        assert_eq!(node.apply(&change).await, 1);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the hook runs once per apply"
        );
        assert_eq!(
            servable.load(Ordering::SeqCst),
            0,
            "when the hook runs, no read can be served the old entry any more"
        );
        assert_eq!(
            held.load(Ordering::SeqCst),
            1,
            "the hook does not wait for moka's purge"
        );
        assert!(!node.caches().tenant.contains("t", None).await);
        assert!(!node.caches().tenant.holds("t", None), "purged by the end");
    }
}
