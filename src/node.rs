//! The cached store: what a node (or an embedding Rust program) reads and writes.
//!
//! A thin facade over the store ([`crate::store`]), the caches ([`crate::cache`]), the
//! invalidation machinery ([`crate::invalidation`]) and the cluster channel
//! ([`crate::cluster`]). Reads go through the caches; writes go to PostgreSQL, and only after
//! COMMIT is the change handed to [`crate::invalidation::Invalidation::apply`], the single
//! entry point for invalidation, and broadcast to the peers.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use uuid::Uuid;

use crate::cache::{CacheName, Caches, Change};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::domain::{
    self, normalize_template_id, parse_fc, FcDocument, FcFormat, FcList, OptDocument, Tenant,
};
use crate::error::{Error, Result};
use crate::invalidation::{Invalidation, InvalidationReport, StepReport};
use crate::store::{Artifact, Db, FcTable, OptSummary, Target, WriteMode, Written};

/// Called after a cache loader read the database and before the value is cached, with the
/// cache and the key. Lets tests pause a load at exactly that point (the eviction race).
pub type LoadHook =
    Arc<dyn Fn(CacheName, &str) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub use crate::invalidation::ApplyHook;

/// How many times a write looks its target up again when the row it found was renamed or
/// deleted before the write reached it.
const WRITE_ATTEMPTS: usize = 3;

/// Where a write of an OPT, context or model goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put<'a> {
    /// A new artifact (`POST`): one with the same template id or name already there is an
    /// [`Error::Duplicate`].
    Create,
    /// Creates the artifact, or replaces the one with the document's template id or name.
    Upsert,
    /// `PUT /.../{path}`: the artifact whose id (else template id or name) `path` is gets the
    /// document, renamed if the document's key differs (onto a key another artifact has: a
    /// duplicate). When `path` names none, as in openFHIR the document is created (a duplicate if
    /// its key is taken), except that a path equal to the document's own key replaces.
    At(&'a str),
}

/// One node's cached view of the store.
pub struct Node {
    id: String,
    invalidation: Arc<Invalidation>,
    config: Config,
    db: Db,
    caches: Arc<Caches>,
    cluster: Cluster,
    load_hook: RwLock<Option<LoadHook>>,
}

impl Node {
    /// Builds a node from its configuration. No connection is made yet.
    pub fn new(config: Config) -> Result<Node> {
        let id = new_node_id();
        let db = Db::new(&config.database, &format!("openfhir-cache/{id}"))?;
        let caches = Arc::new(Caches::new(&config.cache));
        let cluster = Cluster::new(&config.cluster, &id);
        let invalidation = Arc::new(Invalidation::new(caches.clone(), db.clone(), &id));
        Ok(Node {
            cluster,
            id,
            invalidation,
            config,
            db,
            caches,
            load_hook: RwLock::new(None),
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
        self.invalidation.set_apply_hook(hook);
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

    /// The invalidation machinery (the apply rule, cursor, catch-up, statistics).
    pub fn invalidation(&self) -> &Arc<Invalidation> {
        &self.invalidation
    }

    /// The invalidation channels' state, with the counters of this node's deferred
    /// notifications.
    pub fn invalidation_report(&self) -> InvalidationReport {
        self.invalidation.report()
    }

    /// Runs one catch-up step now.
    pub async fn catch_up(&self) -> Result<StepReport> {
        self.invalidation.step().await
    }

    /// Waits until this node has applied every change of transaction `xid` (a consistency
    /// token), catching up at once if it is behind; `false` when `wait` runs out.
    pub async fn await_token(&self, xid: u64, wait: std::time::Duration) -> Result<bool> {
        self.invalidation.await_xid(xid, wait).await
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

    /// Applies a change to this node's caches through the one eviction rule (see
    /// [`Invalidation::apply`]).
    pub async fn apply(&self, change: &Change) -> usize {
        self.invalidation.apply(change).await
    }

    /// Runs a write under armed evictions: the changes are evicted after COMMIT, and also if
    /// this future is dropped half-way (the write may have committed); not when the write
    /// certainly changed nothing (duplicate, not found, invalid, or a write that reports it
    /// touched no row).
    async fn write<T: Committed>(
        &self,
        changes: Vec<Change>,
        write: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let guard = self.caches.guard(changes);
        match write.await {
            Ok(v) => {
                let Some(xid) = v.xid() else {
                    guard.disarm();
                    return Ok(v);
                };
                // Recorded as this node's own, and its NOTIFY queued when the trigger left it to
                // the node (a transaction that notifies commits only one at a time).
                self.invalidation.own_write(xid);
                let changes = guard.committed().await;
                // After COMMIT and the local eviction: a peer that reloads on receipt reads
                // the new row. Never waits on a peer.
                for change in &changes {
                    self.cluster.broadcast(change, Some(xid));
                }
                tracing::debug!(?changes, "committed, evicted and broadcast");
                Ok(v)
            }
            Err(e) => {
                let unchanged = matches!(
                    e.root(),
                    Error::Conflict(_)
                        | Error::Duplicate(_)
                        | Error::NotFound { .. }
                        | Error::Invalid { .. }
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
            vec![Change::Tenant {
                tenant: id.to_string(),
                deleted: false,
            }],
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
            vec![Change::Tenant {
                tenant: id.to_string(),
                deleted: true,
            }],
            async {
                self.db
                    .delete_tenant(id)
                    .await?
                    .ok_or_else(|| not_found("tenant", id))
            },
        )
        .await
    }

    // ---- artifacts: OPTs, contexts, models ----

    /// Writes an artifact as `put` says (see [`Put`]): `update` rewrites an existing row the
    /// path found, `create` writes the document under its own key. Retries when the row found
    /// was renamed or deleted before the write reached it.
    async fn put_artifact<D, U, UF, C, CF>(
        &self,
        a: Artifact,
        tenant: &str,
        key: &str,
        put: Put<'_>,
        update: U,
        create: C,
    ) -> Result<(D, Written)>
    where
        U: Fn(Target) -> UF,
        UF: Future<Output = Result<Option<(D, Written)>>>,
        C: Fn(WriteMode) -> CF,
        CF: Future<Output = Result<(D, Written)>>,
    {
        for _ in 0..WRITE_ATTEMPTS {
            let found = match put {
                Put::At(path) => self.db.find(a, tenant, path).await?,
                Put::Create | Put::Upsert => None,
            };
            let Some(target) = found else {
                // As openFHIR: a PUT whose path names nothing creates; except that a PUT to the
                // document's own key replaces (this API's PUT by template id or model name).
                let mode = match put {
                    Put::Create => WriteMode::Create,
                    Put::Upsert => WriteMode::Upsert,
                    Put::At(path) if a.path_key(path) == key => WriteMode::Upsert,
                    Put::At(_) => WriteMode::Create,
                };
                return self.write(vec![a.change(tenant, key)], create(mode)).await;
            };
            let mut changes = vec![a.change(tenant, &target.key)];
            if target.key != key {
                changes.push(a.change(tenant, key));
            }
            if let Some(done) = self.write(changes, update(target)).await? {
                return Ok(done);
            }
        }
        Err(Error::Conflict(format!(
            "the {} kept changing while it was being written; retry",
            a.what()
        )))
    }

    /// Deletes the artifact `path` addresses (its id, else its key). `None` when there was
    /// none, which is not an error (openFHIR answers 204 either way); else the writing
    /// transaction.
    pub async fn delete_artifact(
        &self,
        a: Artifact,
        tenant: &str,
        path: &str,
    ) -> Result<Option<u64>> {
        for _ in 0..WRITE_ATTEMPTS {
            let Some(target) = self.db.find(a, tenant, path).await? else {
                return Ok(None);
            };
            let change = a.change(tenant, &target.key);
            if let Some(xid) = self
                .write(vec![change], self.db.delete_target(a, tenant, &target))
                .await?
            {
                return Ok(Some(xid));
            }
        }
        Ok(None)
    }

    /// Deletes every OPT, context and model of the tenant (openFHIR's `GET /$purge`), evicting
    /// them on every node like any other write. Returns the writing transaction.
    pub async fn purge(&self, tenant: &str) -> Result<u64> {
        let change = Change::Evict {
            group: None,
            tenant: Some(tenant.to_string()),
            key: None,
        };
        self.write(vec![change], self.db.purge(tenant)).await
    }

    /// The cached artifact with id `id`, found through the id index (a hint, checked here
    /// against the id the artifact carries) or the database.
    async fn by_id<T, L, LF>(
        &self,
        a: Artifact,
        tenant: &str,
        id: Uuid,
        id_of: fn(&T) -> Uuid,
        load: L,
    ) -> Result<Option<Arc<T>>>
    where
        L: Fn(String) -> LF,
        LF: Future<Output = Result<Arc<T>>>,
    {
        let check = |r: Result<Arc<T>>| match r {
            Ok(doc) if id_of(&doc) == id => Ok(Some(doc)),
            Ok(_) => Ok(None),
            Err(e) if matches!(e.root(), Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        };
        if let Some(key) = self.caches.ids.get(a.kind(), tenant, id).await {
            if let Some(doc) = check(load(key).await)? {
                return Ok(Some(doc));
            }
            self.caches.ids.forget(a.kind(), tenant, id).await;
        }
        let Some(key) = self.db.key_of(a, tenant, id).await? else {
            return Ok(None);
        };
        let doc = check(load(key.clone()).await)?;
        if doc.is_some() {
            self.caches.ids.insert(a.kind(), tenant, id, &key).await;
        }
        Ok(doc)
    }

    // ---- OPT ----

    /// An OPT (cached), by id or by template id (normalized here); an id match wins.
    pub async fn opt(&self, tenant: &str, path: &str) -> Result<Arc<OptDocument>> {
        if let Ok(id) = Uuid::parse_str(path.trim()) {
            let load = |key: String| async move { self.opt_by_key(tenant, &key).await };
            if let Some(doc) = self
                .by_id(Artifact::Opt, tenant, id, |d| d.id, load)
                .await?
            {
                return Ok(doc);
            }
        }
        self.opt_by_key(tenant, &normalize_template_id(path)).await
    }

    async fn opt_by_key(&self, tenant: &str, id: &str) -> Result<Arc<OptDocument>> {
        domain::validate_artifact_id("template id", id)?;
        self.caches
            .opt
            .get_or_load(tenant, Some(id), || async {
                let o = self.db.opt(tenant, id).await?;
                self.loaded(CacheName::Opt, id, o)
                    .await
                    .ok_or_else(|| not_found("OPT", id))
            })
            .await
    }

    /// Metadata of every OPT of the tenant.
    pub async fn opts(&self, tenant: &str) -> Result<Vec<OptSummary>> {
        self.db.opts(tenant).await
    }

    /// Stores an OPT as `put` says ([`Put`]). The whole template is parsed (and so validated)
    /// before anything is written.
    pub async fn put_opt(
        &self,
        tenant: &str,
        xml: &str,
        put: Put<'_>,
    ) -> Result<(OptSummary, Written)> {
        let t = crate::domain::opt::TemplateTree::parse(xml)?
            .header()
            .clone();
        let (db, t) = (&self.db, &t);
        self.put_artifact(
            Artifact::Opt,
            tenant,
            &t.normalized_id,
            put,
            |target| async move { db.update_opt(tenant, &target, t, xml).await },
            |mode| db.put_opt(tenant, t, xml, mode),
        )
        .await
    }

    /// Deletes the OPT `path` addresses; see [`Node::delete_artifact`].
    pub async fn delete_opt(&self, tenant: &str, path: &str) -> Result<Option<u64>> {
        self.delete_artifact(Artifact::Opt, tenant, path).await
    }

    // ---- FHIR Connect contexts ----

    /// A context (cached), by id or by template id (normalized here); an id match wins.
    pub async fn context(&self, tenant: &str, path: &str) -> Result<Arc<FcDocument>> {
        if let Ok(id) = Uuid::parse_str(path.trim()) {
            let load = |key: String| async move { self.context_by_key(tenant, &key).await };
            if let Some(doc) = self
                .by_id(Artifact::Context, tenant, id, |d| d.uuid, load)
                .await?
            {
                return Ok(doc);
            }
        }
        self.context_by_key(tenant, &normalize_template_id(path))
            .await
    }

    async fn context_by_key(&self, tenant: &str, id: &str) -> Result<Arc<FcDocument>> {
        domain::validate_artifact_id("template id", id)?;
        self.caches
            .context
            .get_or_load(tenant, Some(id), || async {
                let c = self.db.fc(FcTable::Context, tenant, id).await?;
                self.loaded(CacheName::Context, id, c)
                    .await
                    .ok_or_else(|| not_found("context", id))
            })
            .await
    }

    /// The template id a path to a template's context, mapper or helpers names: a context's id
    /// stands for that context's template.
    async fn template_key(&self, tenant: &str, path: &str) -> Result<String> {
        if Uuid::parse_str(path.trim()).is_ok() {
            match self.context(tenant, path).await {
                Ok(c) => return Ok(c.id.clone()),
                Err(e) if matches!(e.root(), Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let id = normalize_template_id(path);
        domain::validate_artifact_id("template id", &id)?;
        Ok(id)
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

    /// Stores a context as `put` says ([`Put`]).
    pub async fn put_context(
        &self,
        tenant: &str,
        body: &[u8],
        format: FcFormat,
        put: Put<'_>,
    ) -> Result<(FcDocument, Written)> {
        self.put_fc(FcTable::Context, tenant, body, format, put)
            .await
    }

    /// Deletes the context `path` addresses; see [`Node::delete_artifact`].
    pub async fn delete_context(&self, tenant: &str, path: &str) -> Result<Option<u64>> {
        self.delete_artifact(Artifact::Context, tenant, path).await
    }

    /// Stores a FHIR Connect document in `table` as `put` says ([`Put`]), after checking it by
    /// openFHIR's rules ([`crate::domain::fc_model`]).
    pub async fn put_fc(
        &self,
        table: FcTable,
        tenant: &str,
        body: &[u8],
        format: FcFormat,
        put: Put<'_>,
    ) -> Result<(FcDocument, Written)> {
        let doc = parse_fc(body, format, table.kind())?;
        let content = utf8(body)?;
        let (db, d) = (&self.db, &doc);
        self.put_artifact(
            table.into(),
            tenant,
            &doc.key,
            put,
            |target| async move {
                db.update_fc(table, tenant, &target, d, content, format)
                    .await
            },
            |mode| db.put_fc(table, tenant, d, content, format, mode),
        )
        .await
    }

    // ---- compiled artifacts ----

    /// The compiled mapper index of a template (cached in the FHIR Connect group; concurrent cold
    /// requests compile once), by template id or by its context's id. A context the engine
    /// cannot compile (see [`crate::domain::mapper::compile`]) is `Unprocessable`, listing every
    /// problem; nothing is cached then.
    pub async fn mapper(
        &self,
        tenant: &str,
        path: &str,
    ) -> Result<Arc<crate::domain::mapper::CompiledMapper>> {
        let id = self.template_key(tenant, path).await?;
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
        use crate::domain::fc_model::{typed, ContextDocument, ModelDocument};
        let ctx = self.context_by_key(tenant, id).await?;
        // Stored documents were checked when they were uploaded; only their shape is read here.
        let corrupt = |what: &'static str, id: &str, e: Error| Error::CorruptRow {
            what,
            id: id.to_string(),
            reason: e.to_string(),
        };
        let context: ContextDocument =
            typed(&ctx.json, "context").map_err(|e| corrupt("context", id, e))?;
        // As the engine, only the models the context names are read: a broken model of another
        // template cannot break this one.
        let named: std::collections::BTreeSet<&str> = context
            .archetypes()
            .iter()
            .chain(context.extensions())
            .map(|s| s.trim())
            .collect();
        let mut models = std::collections::BTreeMap::new();
        for m in self.db.fcs(FcTable::Model, tenant).await? {
            if !named.contains(m.id.as_str()) {
                continue;
            }
            let model: ModelDocument =
                typed(&m.json, "model").map_err(|e| corrupt("model", &m.id, e))?;
            models.insert(m.id.clone(), model);
        }
        let template_uploaded = match self.opt_by_key(tenant, id).await {
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
        for w in &index.warnings {
            tracing::info!(tenant, template = id, warning = %w, "mapper compiled with a warning");
        }
        Ok(crate::domain::mapper::CompiledMapper {
            index,
            compiled_at: time::OffsetDateTime::now_utc(),
            node: self.id.clone(),
            compile_us: started.elapsed().as_micros() as u64,
        })
    }

    /// The helper tree of a template (by template id or its context's id), shared and
    /// immutable (cached). Code that writes per-request state must use [`Node::helpers_copy`].
    pub async fn helpers(
        &self,
        tenant: &str,
        path: &str,
    ) -> Result<Arc<crate::domain::helpers::HelperTree>> {
        let id = self.template_key(tenant, path).await?;
        self.caches
            .helpers
            .get_or_load(tenant, Some(&id), || async {
                let mapper = self.mapper(tenant, &id).await?;
                let opt = self.opt_by_key(tenant, &id).await?;
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

    /// A model or extension, by id or by name; an id match wins (read from the database;
    /// compiled artifacts are cached).
    pub async fn model(&self, tenant: &str, path: &str) -> Result<FcDocument> {
        self.db
            .fc_at(FcTable::Model, tenant, path)
            .await?
            .ok_or_else(|| not_found("model", path))
    }

    /// Every model and extension of the tenant.
    pub async fn models(&self, tenant: &str) -> Result<Vec<FcDocument>> {
        self.db.fcs(FcTable::Model, tenant).await
    }

    /// Stores a model or extension as `put` says ([`Put`]).
    pub async fn put_model(
        &self,
        tenant: &str,
        body: &[u8],
        format: FcFormat,
        put: Put<'_>,
    ) -> Result<(FcDocument, Written)> {
        self.put_fc(FcTable::Model, tenant, body, format, put).await
    }

    /// Deletes the model `path` addresses; see [`Node::delete_artifact`].
    pub async fn delete_model(&self, tenant: &str, path: &str) -> Result<Option<u64>> {
        self.delete_artifact(Artifact::Model, tenant, path).await
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

/// What a write returns carries the transaction that made it, or says it changed nothing.
trait Committed {
    fn xid(&self) -> Option<u64>;
}

impl<T> Committed for (T, Written) {
    fn xid(&self) -> Option<u64> {
        Some(self.1.xid)
    }
}

impl Committed for u64 {
    fn xid(&self) -> Option<u64> {
        Some(*self)
    }
}

impl<T: Committed> Committed for Option<T> {
    fn xid(&self) -> Option<u64> {
        self.as_ref().and_then(Committed::xid)
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
