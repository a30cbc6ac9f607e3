//! The cached store: what a node (or an embedding Rust program) reads and writes.
//!
//! A thin facade over the store ([`crate::store`]), the caches ([`crate::cache`]), the
//! invalidation machinery ([`crate::invalidation`]) and the cluster channel
//! ([`crate::cluster`]). Reads go through the caches; writes go to PostgreSQL, and only after
//! COMMIT is the change handed to [`crate::invalidation::Invalidation::apply`], the single
//! entry point for invalidation, and broadcast to the peers.

mod artifacts;
mod compiled;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use crate::cache::{CacheName, Caches, Change};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::domain::{self, Tenant};
use crate::error::{Error, Result};
use crate::invalidation::{Invalidation, InvalidationReport, StepReport};
use crate::store::{Db, Written};
use crate::supervise::Supervisor;

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
    tasks: Supervisor,
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
            tasks: Supervisor::new(),
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

    /// The supervised background tasks (see [`crate::supervise`]): their states, and, when the
    /// node runs, what readiness says of them.
    pub fn tasks(&self) -> &Supervisor {
        &self.tasks
    }

    /// An operator's eviction (`POST /caches/evict`): applied here, recorded in the invalidation
    /// log (so a peer that misses the broadcast applies it by NOTIFY or catch-up) and sent to
    /// every peer. Returns how many (cache, scope) pairs were evicted on this node.
    ///
    /// # Errors
    /// When the log row cannot be written (database unavailable, schema older than version 7),
    /// the eviction has still been applied here and broadcast to the connected peers, but a peer
    /// that missed the broadcast will not learn of it: the error says so, and retrying is safe.
    pub async fn evict(&self, change: &Change) -> Result<usize> {
        let n = self.apply(change).await;
        let Some((group, tenant, key)) = change.eviction_row() else {
            // Changes of stored data are logged by their triggers; only evictions are ours.
            self.cluster.broadcast(change, None);
            return Ok(n);
        };
        match self.db.log_eviction(group, tenant, key).await {
            Ok(xid) => {
                // Like a write: this node's own NOTIFY is recognised as an echo, and peers that
                // get the broadcast skip the log row when it reaches them.
                self.invalidation.own_write(xid);
                self.cluster.broadcast(change, Some(xid));
                Ok(n)
            }
            Err(e) => {
                // Still tell the peers that can hear it; the caller learns it is not durable.
                self.cluster.broadcast(change, None);
                tracing::warn!(?change, error = %e, "eviction applied and broadcast, but not recorded in the invalidation log");
                Err(e)
            }
        }
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
        // A write that may have committed but never returned (the request was cancelled: a
        // timeout, a client gone; or the commit's outcome is unknown) is evicted here by the
        // guard and announced to the peers by the notice, without a transaction id: an
        // announcement too many only costs a reload.
        let mut notice = PeerNotice {
            cluster: &self.cluster,
            changes: Some(changes.clone()),
        };
        let guard = self.caches.guard(changes);
        match write.await {
            Ok(v) => {
                notice.changes = None;
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
                    notice.changes = None;
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

/// Announces a write's changes to the peers when dropped armed: see [`Node::write`].
struct PeerNotice<'a> {
    cluster: &'a Cluster,
    changes: Option<Vec<Change>>,
}

impl Drop for PeerNotice<'_> {
    fn drop(&mut self) {
        for change in self.changes.take().unwrap_or_default() {
            self.cluster.broadcast(&change, None);
        }
    }
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
