//! A moka cache whose entries carry the generation they were loaded under.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;

use crate::config::Ttl;
use crate::error::{Error, Result};

/// Number of generation stripes per cache. An eviction bumps one key stripe (or one tenant stripe),
/// so an unrelated entry that shares the stripe is reloaded once: a harmless extra load, never a
/// stale read. 1024 stripes keep that rare at a fixed 16 KiB per cache.
const STRIPES: usize = 1024;

/// How many times a read retries when its freshly loaded value was overtaken by an eviction before
/// it falls back to an uncached load (which is fresh by construction).
const MAX_ATTEMPTS: usize = 3;

/// Counters of one cache, as shown by `GET /caches` and `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    loads: AtomicU64,
    load_failures: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
}

/// A point-in-time copy of the cache's statistics plus the entry count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Entries currently held.
    pub entries: u64,
    /// Reads answered from memory.
    pub hits: u64,
    /// Reads that had to wait for a load.
    pub misses: u64,
    /// Database loads actually run (concurrent misses on one key share one load).
    pub loads: u64,
    /// Loads that failed (nothing was cached).
    pub load_failures: u64,
    /// Entries or scopes removed by explicit eviction.
    pub evictions: u64,
    /// Entries removed because their TTL ran out.
    pub expirations: u64,
}

/// Where an entry's validity is recorded: its key stripe, its tenant stripe and the cache epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    key: u64,
    tenant: u64,
    epoch: u64,
}

struct Entry<V> {
    value: Arc<V>,
    stamp: Stamp,
}

// Manual impl: cloning an entry clones the `Arc`, so `V` itself need not be `Clone`.
impl<V> Clone for Entry<V> {
    fn clone(&self) -> Self {
        Entry {
            value: self.value.clone(),
            stamp: self.stamp,
        }
    }
}

struct Generations {
    keys: Vec<AtomicU64>,
    tenants: Vec<AtomicU64>,
    epoch: AtomicU64,
}

/// The stripes a key maps to.
#[derive(Clone, Copy)]
struct Slots {
    key: usize,
    tenant: usize,
}

impl Generations {
    fn new() -> Self {
        Generations {
            keys: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            tenants: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
        }
    }

    fn stamp(&self, s: Slots) -> Stamp {
        // SeqCst pairs with the SeqCst bumps in `evict_*`: a load that reads the old generation
        // started its database read before the eviction, so its value is never trusted.
        Stamp {
            key: self.keys[s.key].load(Ordering::SeqCst),
            tenant: self.tenants[s.tenant].load(Ordering::SeqCst),
            epoch: self.epoch.load(Ordering::SeqCst),
        }
    }
}

fn stripe(s: &str) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    (h.finish() as usize) % STRIPES
}

/// The cache key for `tenant` and `id`: `tenant:id`, or just `tenant` for tenant-keyed caches.
pub fn cache_key(tenant: &str, id: Option<&str>) -> String {
    match id {
        Some(id) => format!("{tenant}:{id}"),
        None => tenant.to_string(),
    }
}

/// One cache: TTL from configuration, coalesced loads, statistics, and evictions that win.
///
/// # Concurrent calls on the same key
/// Concurrent misses on one key run the loader once; every caller gets its result. A failed load
/// is not cached: every waiter gets the error and the next read retries.
///
/// # Guarantees
/// An eviction that happens while a load of the same key is in flight wins: the loader captures
/// the key's generation *before* it reads the database, and an entry whose generation is older
/// than the current one is never served (moka's `invalidate` does not cancel an in-flight
/// `try_get_with`, so without this the stale value would be inserted afterwards and kept forever
/// under TTL -1). Callers must evict only *after* the change committed.
///
/// With [`Ttl::Disabled`] nothing is stored: every read runs the loader.
pub struct VersionedCache<V> {
    name: &'static str,
    ttl: Ttl,
    inner: Option<moka::future::Cache<String, Entry<V>>>,
    gens: Generations,
    stats: Arc<Stats>,
    /// Seconds each load took (the `/metrics` histogram of this cache).
    load_seconds: Histogram,
}

impl<V: Send + Sync + 'static> VersionedCache<V> {
    /// A cache named `name` (for statistics) with the given TTL.
    pub fn new(name: &'static str, ttl: Ttl) -> Self {
        let stats = Arc::new(Stats::default());
        let inner = match ttl {
            Ttl::Disabled => None,
            _ => {
                let listener_stats = stats.clone();
                let mut builder = moka::future::Cache::builder().eviction_listener(
                    move |_k: Arc<String>, _v: Entry<V>, cause: RemovalCause| {
                        if cause == RemovalCause::Expired {
                            listener_stats.expirations.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                );
                if let Some(d) = ttl.duration() {
                    builder = builder.time_to_live(d);
                }
                Some(builder.build())
            }
        };
        VersionedCache {
            name,
            ttl,
            inner,
            gens: Generations::new(),
            stats,
            load_seconds: super::load_histogram(),
        }
    }

    /// Records load times in `h` (a series of a family shared by several caches) instead of a
    /// histogram of its own.
    pub fn with_load_histogram(mut self, h: Histogram) -> Self {
        self.load_seconds = h;
        self
    }

    /// How long its loads took, in seconds (every load, failed or not).
    pub fn load_histogram(&self) -> &Histogram {
        &self.load_seconds
    }

    /// The cache's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The cache's TTL.
    pub fn ttl(&self) -> Ttl {
        self.ttl
    }

    fn slots(tenant: &str, key: &str) -> Slots {
        Slots {
            key: stripe(key),
            tenant: stripe(tenant),
        }
    }

    /// Returns the value for (`tenant`, `id`), running `load` on a miss.
    ///
    /// `id` is `None` for caches keyed by tenant alone.
    pub async fn get_or_load<F, Fut>(
        &self,
        tenant: &str,
        id: Option<&str>,
        load: F,
    ) -> Result<Arc<V>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<V>>,
    {
        let Some(inner) = &self.inner else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return self.load_uncached(&load).await;
        };
        let key = cache_key(tenant, id);
        let slots = Self::slots(tenant, &key);
        if let Some(e) = inner.get(&key).await {
            if e.stamp == self.gens.stamp(slots) {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(e.value);
            }
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        for _ in 0..MAX_ATTEMPTS {
            let entry = inner
                .try_get_with(key.clone(), async {
                    let stamp = self.gens.stamp(slots);
                    let value = self.load_counted(&load).await?;
                    Ok::<_, Error>(Entry {
                        value: Arc::new(value),
                        stamp,
                    })
                })
                .await?;
            if entry.stamp == self.gens.stamp(slots) {
                return Ok(entry.value);
            }
            // Overtaken by an eviction: drop this entry (only this one; a newer load may have
            // replaced it meanwhile) and load again.
            let stale = entry.stamp;
            inner
                .entry(key.clone())
                .and_compute_with(|cur| {
                    let op = match cur {
                        Some(c) if c.value().stamp == stale => Op::Remove,
                        _ => Op::Nop,
                    };
                    std::future::ready(op)
                })
                .await;
        }
        self.load_uncached(&load).await
    }

    async fn load_counted<F, Fut>(&self, load: &F) -> Result<V>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<V>>,
    {
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let r = load().await;
        self.load_seconds.observe(started.elapsed().as_secs_f64());
        // "Not found" is an answer, not a failure of the source.
        if matches!(&r, Err(e) if !matches!(e.root(), Error::NotFound { .. })) {
            self.stats.load_failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn load_uncached<F, Fut>(&self, load: &F) -> Result<Arc<V>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<V>>,
    {
        self.load_counted(load).await.map(Arc::new)
    }

    /// Makes every entry in `scope` unservable at once, synchronously: bumps the generation only.
    /// The entries themselves are dropped later (by the async `evict_*`, or on their next read).
    /// Usable from `Drop`, which is what makes evictions survive a cancelled request.
    pub fn invalidate_now(&self, scope: &super::Scope) {
        let counter = match scope {
            super::Scope::Key { tenant, id } => {
                let key = cache_key(tenant, id.as_deref());
                &self.gens.keys[Self::slots(tenant, &key).key]
            }
            super::Scope::Tenant(tenant) => &self.gens.tenants[stripe(tenant)],
            super::Scope::All => &self.gens.epoch,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops the entries of `scope` that [`VersionedCache::invalidate_now`] made unservable,
    /// freeing their memory. No generation bump: call `invalidate_now` first.
    pub async fn purge(&self, scope: &super::Scope) {
        let Some(inner) = &self.inner else { return };
        match scope {
            super::Scope::Key { tenant, id } => {
                inner.invalidate(&cache_key(tenant, id.as_deref())).await
            }
            super::Scope::Tenant(tenant) => {
                let prefix = format!("{tenant}:");
                let keys: Vec<Arc<String>> = inner
                    .iter()
                    .map(|(k, _)| k)
                    .filter(|k| k.as_str() == tenant.as_str() || k.starts_with(&prefix))
                    .collect();
                for k in keys {
                    inner.invalidate(k.as_str()).await;
                }
            }
            super::Scope::All => inner.invalidate_all(),
        }
    }

    /// Evicts one key; a load of it in flight right now will not be served from cache.
    pub async fn evict_key(&self, tenant: &str, id: Option<&str>) {
        self.evict(&super::Scope::Key {
            tenant: tenant.to_string(),
            id: id.map(str::to_string),
        })
        .await
    }

    /// Evicts every entry of `tenant`.
    pub async fn evict_tenant(&self, tenant: &str) {
        self.evict(&super::Scope::Tenant(tenant.to_string())).await
    }

    /// Evicts everything.
    pub async fn evict_all(&self) {
        self.evict(&super::Scope::All).await
    }

    /// [`VersionedCache::invalidate_now`] then [`VersionedCache::purge`].
    pub async fn evict(&self, scope: &super::Scope) {
        self.invalidate_now(scope);
        self.purge(scope).await;
    }

    /// True when a current (servable) entry for the key is held; no load, no statistics.
    pub async fn contains(&self, tenant: &str, id: Option<&str>) -> bool {
        let Some(inner) = &self.inner else {
            return false;
        };
        let key = cache_key(tenant, id);
        let slots = Self::slots(tenant, &key);
        matches!(inner.get(&key).await, Some(e) if e.stamp == self.gens.stamp(slots))
    }

    /// True while moka still holds an entry for the key, servable or not (tests: has it been
    /// purged yet?).
    #[cfg(test)]
    pub(crate) fn holds(&self, tenant: &str, id: Option<&str>) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|inner| inner.contains_key(&cache_key(tenant, id)))
    }

    /// Current statistics. Runs moka's pending maintenance first so counts are up to date.
    pub async fn stats(&self) -> StatsSnapshot {
        let entries = match &self.inner {
            Some(inner) => {
                inner.run_pending_tasks().await;
                inner.entry_count()
            }
            None => 0,
        };
        let s = &self.stats;
        StatsSnapshot {
            entries,
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            loads: s.loads.load(Ordering::Relaxed),
            load_failures: s.load_failures.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            expirations: s.expirations.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use tokio::sync::{Barrier, Notify};

    #[tokio::test]
    async fn hit_after_load_and_eviction_reloads() {
        let c = VersionedCache::<u32>::new("t", Ttl::Infinite);
        let n = AtomicUsize::new(0);
        let load = || async { Ok(n.fetch_add(1, Ordering::SeqCst) as u32) };
        assert_eq!(*c.get_or_load("a", Some("k"), load).await.unwrap(), 0);
        assert_eq!(*c.get_or_load("a", Some("k"), load).await.unwrap(), 0);
        c.evict_key("a", Some("k")).await;
        assert_eq!(*c.get_or_load("a", Some("k"), load).await.unwrap(), 1);
        c.evict_tenant("a").await;
        assert_eq!(*c.get_or_load("a", Some("k"), load).await.unwrap(), 2);
        c.evict_all().await;
        assert_eq!(*c.get_or_load("a", Some("k"), load).await.unwrap(), 3);
        let s = c.stats().await;
        assert_eq!(
            (s.hits, s.misses, s.loads, s.evictions, s.entries),
            (1, 4, 4, 3, 1)
        );
    }

    #[tokio::test]
    async fn disabled_cache_always_loads() {
        let c = VersionedCache::<u32>::new("t", Ttl::Disabled);
        let n = AtomicUsize::new(0);
        for i in 0..3 {
            let v = c.get_or_load("a", None, || async {
                Ok(n.fetch_add(1, Ordering::SeqCst) as u32)
            });
            assert_eq!(*v.await.unwrap(), i);
        }
        assert_eq!(c.stats().await.entries, 0);
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let c = VersionedCache::<u32>::new("t", Ttl::Infinite);
        let r = c
            .get_or_load("a", None, || async { Err(Error::Conflict("down".into())) })
            .await;
        assert!(r.is_err());
        assert_eq!(
            *c.get_or_load("a", None, || async { Ok(7) }).await.unwrap(),
            7
        );
        assert_eq!(c.stats().await.load_failures, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_misses_load_once() {
        let c = Arc::new(VersionedCache::<u32>::new("t", Ttl::Infinite));
        let loads = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(200));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (c, loads, barrier) = (c.clone(), loads.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    c.get_or_load("a", Some("k"), || async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(42)
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(*t.await.unwrap().unwrap(), 42);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eviction_during_load_wins() {
        let c = Arc::new(VersionedCache::<&'static str>::new("t", Ttl::Infinite));
        let source = Arc::new(std::sync::Mutex::new("old"));
        let (read_done, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let first_call = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let slow = {
            let (c, source, read_done, release) = (
                c.clone(),
                source.clone(),
                read_done.clone(),
                release.clone(),
            );
            tokio::spawn(async move {
                c.get_or_load("a", Some("k"), || {
                    let (source, read_done, release) =
                        (source.clone(), read_done.clone(), release.clone());
                    let pause = first_call.swap(false, Ordering::SeqCst);
                    async move {
                        let v = *source.lock().unwrap();
                        if pause {
                            read_done.notify_one();
                            release.notified().await;
                        }
                        Ok(v)
                    }
                })
                .await
            })
        };
        read_done.notified().await;
        *source.lock().unwrap() = "new";
        c.evict_key("a", Some("k")).await;
        release.notify_one();
        // The paused load read "old" before the eviction; its caller retries and sees "new".
        let first = slow.await.unwrap().unwrap();
        assert_eq!(*first, "new");
        let next = c
            .get_or_load("a", Some("k"), || async { Ok(*source.lock().unwrap()) })
            .await
            .unwrap();
        assert_eq!(*next, "new");
    }
}
