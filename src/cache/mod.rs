//! The cache groups and the one rule that says what a change evicts.
//!
//! * OPT group: `opt` (`tenant:templateId` -> parsed template).
//! * FHIR Connect group: `context` (`tenant:templateId`) and `all_contexts` (`tenant`), one TTL.
//! * Tenant group: `tenant` (`tenantId` -> tenant record).
//!
//! Every invalidation, whatever delivered it (the local write path, a peer, NOTIFY, catch-up or an
//! operator's `POST /caches/evict`), goes through [`Caches::apply`], which asks [`targets`].

mod change;
mod ids;
mod versioned;

use std::sync::Arc;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;

pub use change::{targets, CacheName, Change, Group, Scope, EVICT_OPERATION};
pub use ids::IdIndex;
pub use versioned::{cache_key, Bound, StatsSnapshot, VersionedCache};

use crate::config::CacheConfig;
use crate::domain::footprint::Footprint;
use crate::domain::{FcDocument, FcList, OptDocument, Tenant};

/// A cache group of an embedding application, invalidated like the built-in ones by changes to
/// the tables it tracks with `openfhir_track_table` (see [`Caches::register_group`]).
pub trait CustomGroup: Send + Sync {
    /// Invalidate `key` of `tenant`; `None` means every key, or every tenant. Must not block;
    /// [`VersionedCache::invalidate_now`] is the intended building block.
    fn invalidate(&self, tenant: Option<&str>, key: Option<&str>);
}

/// Upper bounds, in seconds, of the cache load histogram's buckets: a load is one or two indexed
/// queries (about a millisecond), a mapper or helper tree compile can take much longer.
pub const LOAD_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram with [`LOAD_BUCKETS`].
pub fn load_histogram() -> Histogram {
    Histogram::new(LOAD_BUCKETS)
}

/// The label set of a per-cache series: `cache="opt"` and so on.
pub type CacheLabel = [(&'static str, &'static str); 1];

/// Load times of every cache of the node, one histogram per `cache` label.
pub type LoadHistograms = Family<CacheLabel, Histogram, fn() -> Histogram>;

/// How many caches share `OPENFHIR_CACHE_FHIR_CONNECT_MAX_BYTES` (context, all-contexts, mapper,
/// helpers): each holds at most its even share, so the group as a whole stays within the bound.
pub const FHIR_CONNECT_CACHES: u64 = 4;

/// Every cache of the node.
pub struct Caches {
    /// `tenant:templateId` -> OPT.
    pub opt: VersionedCache<OptDocument>,
    /// `tenant:templateId` -> context.
    pub context: VersionedCache<FcDocument>,
    /// `tenant` -> all of the tenant's contexts.
    pub all_contexts: VersionedCache<FcList>,
    /// `tenant` -> tenant record.
    pub tenant: VersionedCache<Tenant>,
    /// `tenant:templateId` -> compiled mapper index.
    pub mapper: VersionedCache<crate::domain::mapper::CompiledMapper>,
    /// `tenant:templateId` -> helper tree (hand out copies, see `Node::helpers_copy`).
    pub helpers: VersionedCache<crate::domain::helpers::HelperTree>,
    /// Artifact id (UUID) -> key: a self-checking hint for reads by id (see [`IdIndex`]).
    pub ids: IdIndex,
    load_seconds: LoadHistograms,
    custom: std::sync::RwLock<std::collections::HashMap<String, Arc<dyn CustomGroup>>>,
}

/// One row of `GET /caches`.
#[derive(Debug, Clone, Serialize)]
pub struct CacheReport {
    /// Cache name.
    pub cache: CacheName,
    /// Its group.
    pub group: Group,
    /// TTL as configured (-1, 0 or seconds).
    pub ttl: i64,
    /// Size bound: `"unbounded"`, `{"max_bytes": N}` or `{"max_entries": N}`.
    pub bound: Bound,
    /// Counters.
    #[serde(flatten)]
    pub stats: StatsSnapshot,
}

impl Caches {
    /// Builds every cache with its group's TTL and size bound. The FHIR Connect group's byte
    /// bound is split evenly over its four caches (see [`FHIR_CONNECT_CACHES`]).
    pub fn new(cfg: &CacheConfig) -> Self {
        let load_seconds = LoadHistograms::new_with_constructor(load_histogram);
        // Each cache records into its own series of the shared family.
        fn cache<V: Footprint + Send + Sync + 'static>(
            family: &LoadHistograms,
            name: &'static str,
            ttl: crate::config::Ttl,
            bound: Bound,
        ) -> VersionedCache<V> {
            VersionedCache::bounded(name, ttl, bound, crate::domain::footprint::charged::<V>)
                .with_load_histogram(family.get_or_create_owned(&[("cache", name)]))
        }
        let bytes = |max: Option<u64>, share: u64| match max {
            Some(n) => Bound::MaxBytes((n / share).max(1)),
            None => Bound::Unbounded,
        };
        let opt = bytes(cfg.opt_max_bytes, 1);
        let fc = bytes(cfg.fhir_connect_max_bytes, FHIR_CONNECT_CACHES);
        let tenant = match cfg.tenant_max_entries {
            Some(n) => Bound::MaxEntries(n),
            None => Bound::Unbounded,
        };
        let f = &load_seconds;
        Caches {
            opt: cache(f, "opt", cfg.opt_ttl, opt),
            context: cache(f, "context", cfg.fhir_connect_ttl, fc),
            all_contexts: cache(f, "all_contexts", cfg.fhir_connect_ttl, fc),
            tenant: cache(f, "tenant", cfg.tenant_ttl, tenant),
            mapper: cache(f, "mapper", cfg.fhir_connect_ttl, fc),
            helpers: cache(f, "helpers", cfg.fhir_connect_ttl, fc),
            ids: IdIndex::default(),
            load_seconds,
            custom: Default::default(),
        }
    }

    /// How long each cache's loads took (for `/metrics`).
    pub fn load_histograms(&self) -> &LoadHistograms {
        &self.load_seconds
    }

    /// Registers an application's cache group under `name` (the name given to
    /// `openfhir_track_table`). Changes to its tables then reach it from every channel.
    pub fn register_group(&self, name: &str, group: Arc<dyn CustomGroup>) {
        if let Ok(mut m) = self.custom.write() {
            m.insert(name.to_string(), group);
        }
    }

    fn apply_custom(&self, change: &Change) {
        let groups: Vec<(String, Arc<dyn CustomGroup>)> = match self.custom.read() {
            Ok(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => return,
        };
        match change {
            Change::Custom { group, tenant, key } => {
                match groups.iter().find(|(n, _)| n == group) {
                    Some((_, g)) => g.invalidate(tenant.as_deref(), key.as_deref()),
                    None => {
                        tracing::debug!(group, "change for an unregistered cache group ignored")
                    }
                }
            }
            // A flush of everything, or a tenant gone with all it owned, reaches every group.
            Change::Evict {
                group: None,
                tenant,
                key: None,
            } => {
                for (_, g) in &groups {
                    g.invalidate(tenant.as_deref(), None);
                }
            }
            Change::Tenant {
                tenant,
                deleted: true,
            } => {
                for (_, g) in &groups {
                    g.invalidate(Some(tenant), None);
                }
            }
            _ => {}
        }
    }

    /// Applies a change through [`targets`]; returns how many (cache, scope) pairs it evicted.
    pub async fn apply(&self, change: &Change) -> usize {
        // Every target becomes unservable before the first await, so a caller cancelled
        // half-way cannot leave one of them stale; purging only frees memory.
        self.invalidate_now(change);
        self.purge(change).await
    }

    /// The asynchronous half of [`Caches::apply`]: drops the entries [`Caches::invalidate_now`]
    /// made unservable, freeing their memory. Returns how many (cache, scope) pairs it purged.
    pub async fn purge(&self, change: &Change) -> usize {
        let t = targets(change);
        for (cache, scope) in &t {
            match cache {
                CacheName::Opt => self.opt.purge(scope).await,
                CacheName::Context => self.context.purge(scope).await,
                CacheName::AllContexts => self.all_contexts.purge(scope).await,
                CacheName::Tenant => self.tenant.purge(scope).await,
                CacheName::Mapper => self.mapper.purge(scope).await,
                CacheName::Helpers => self.helpers.purge(scope).await,
            }
        }
        t.len()
    }

    /// The synchronous half of [`Caches::apply`]: makes everything the change touches
    /// unservable at once, without awaiting (see [`VersionedCache::invalidate_now`]).
    pub fn invalidate_now(&self, change: &Change) {
        self.apply_custom(change);
        for (cache, scope) in targets(change) {
            match cache {
                CacheName::Opt => self.opt.invalidate_now(&scope),
                CacheName::Context => self.context.invalidate_now(&scope),
                CacheName::AllContexts => self.all_contexts.invalidate_now(&scope),
                CacheName::Tenant => self.tenant.invalidate_now(&scope),
                CacheName::Mapper => self.mapper.invalidate_now(&scope),
                CacheName::Helpers => self.helpers.invalidate_now(&scope),
            }
        }
    }

    /// Arms the evictions of a write about to be made (a write that renames an artifact changes
    /// two keys). Call [`EvictGuard::committed`] after COMMIT; if the write's future is dropped
    /// first (client gone, timeout) the guard still invalidates on drop, because the write may
    /// have committed.
    pub fn guard(&self, changes: Vec<Change>) -> EvictGuard<'_> {
        EvictGuard {
            caches: self,
            changes: Some(changes),
        }
    }

    /// Statistics of every cache.
    pub async fn report(&self) -> Vec<CacheReport> {
        let mut out = Vec::with_capacity(CacheName::ALL.len());
        for cache in CacheName::ALL {
            let (ttl, bound, stats) = match cache {
                CacheName::Opt => (self.opt.ttl(), self.opt.bound(), self.opt.stats().await),
                CacheName::Context => (
                    self.context.ttl(),
                    self.context.bound(),
                    self.context.stats().await,
                ),
                CacheName::AllContexts => (
                    self.all_contexts.ttl(),
                    self.all_contexts.bound(),
                    self.all_contexts.stats().await,
                ),
                CacheName::Tenant => (
                    self.tenant.ttl(),
                    self.tenant.bound(),
                    self.tenant.stats().await,
                ),
                CacheName::Mapper => (
                    self.mapper.ttl(),
                    self.mapper.bound(),
                    self.mapper.stats().await,
                ),
                CacheName::Helpers => (
                    self.helpers.ttl(),
                    self.helpers.bound(),
                    self.helpers.stats().await,
                ),
            };
            out.push(CacheReport {
                cache,
                group: cache.group(),
                ttl: ttl.as_i64(),
                bound,
                stats,
            });
        }
        out
    }
}

/// See [`Caches::guard`].
#[must_use = "an unused guard invalidates at once"]
pub struct EvictGuard<'a> {
    caches: &'a Caches,
    changes: Option<Vec<Change>>,
}

impl EvictGuard<'_> {
    /// The write committed: evict now, completely.
    pub async fn committed(mut self) -> Vec<Change> {
        let changes = self.changes.take().unwrap_or_default();
        // All unservable before the first await, as in `apply`.
        for c in &changes {
            self.caches.invalidate_now(c);
        }
        for c in &changes {
            self.caches.purge(c).await;
        }
        changes
    }

    /// The write certainly changed nothing (e.g. a conflict): evict nothing.
    pub fn disarm(mut self) {
        self.changes = None;
    }
}

impl Drop for EvictGuard<'_> {
    fn drop(&mut self) {
        for change in self.changes.take().unwrap_or_default() {
            self.caches.invalidate_now(&change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_guard_still_invalidates() {
        let caches = Caches::new(&crate::config::Config::default().cache);
        let tenant = || async {
            Ok(crate::domain::Tenant {
                id: "a".into(),
                name: "A".into(),
                config: serde_json::json!({}),
                created: time::OffsetDateTime::UNIX_EPOCH,
                updated: time::OffsetDateTime::UNIX_EPOCH,
            })
        };
        caches.tenant.get_or_load("a", None, tenant).await.unwrap();
        assert!(caches.tenant.contains("a", None).await);
        let change = Change::Tenant {
            tenant: "a".into(),
            deleted: false,
        };

        // A write whose future is dropped after arming (e.g. the client went away after COMMIT).
        drop(caches.guard(vec![change.clone()]));
        assert!(
            !caches.tenant.contains("a", None).await,
            "dropped guard made the entry unservable"
        );

        caches.tenant.get_or_load("a", None, tenant).await.unwrap();
        caches.guard(vec![change.clone()]).disarm();
        assert!(
            caches.tenant.contains("a", None).await,
            "a disarmed guard evicts nothing"
        );
        let committed = caches.guard(vec![change.clone()]).committed().await;
        assert_eq!(committed, std::slice::from_ref(&change));
        assert!(!caches.tenant.contains("a", None).await);
    }

    #[tokio::test]
    async fn custom_groups_receive_their_changes() {
        struct Seen(std::sync::Mutex<Vec<(Option<String>, Option<String>)>>);
        impl CustomGroup for Seen {
            fn invalidate(&self, tenant: Option<&str>, key: Option<&str>) {
                self.0
                    .lock()
                    .unwrap()
                    .push((tenant.map(Into::into), key.map(Into::into)));
            }
        }
        let caches = Caches::new(&crate::config::Config::default().cache);
        let seen = Arc::new(Seen(Default::default()));
        caches.register_group("mine", seen.clone());
        caches
            .apply(&Change::from_log("mine", Some("a"), Some("k"), "UPDATE"))
            .await;
        caches
            .apply(&Change::from_log("other", Some("a"), Some("k"), "UPDATE"))
            .await;
        assert_eq!(
            *seen.0.lock().unwrap(),
            vec![(Some("a".into()), Some("k".into()))]
        );
    }
}
