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
    size_evictions: AtomicU64,
}

/// How much one cache may hold (`OPENFHIR_CACHE_*_MAX_BYTES`, `OPENFHIR_CACHE_TENANT_MAX_ENTRIES`).
///
/// When full, moka evicts the entries least likely to be read again (TinyLFU), and may decline
/// to keep a new entry that is read less often than those it would displace; either way the
/// read is answered, only the memory is not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// No bound: the cache grows with every key read (until its TTL, if any, expires entries).
    Unbounded,
    /// At most this many entries.
    MaxEntries(u64),
    /// At most this many bytes, by each entry's estimated footprint (see [`crate::domain::footprint`]).
    MaxBytes(u64),
}

/// Bytes charged per entry on top of its value: the key, moka's entry and our stamp.
const ENTRY_OVERHEAD: usize = 160;

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
    /// Entries removed (or not kept) because the cache was full ([`Bound`]).
    pub size_evictions: u64,
    /// What the entries weigh against the bound: estimated bytes under [`Bound::MaxBytes`], the
    /// entry count otherwise.
    pub weight: u64,
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
    bound: Bound,
    gens: Generations,
    stats: Arc<Stats>,
    /// Seconds each load took (the `/metrics` histogram of this cache).
    load_seconds: Histogram,
}

impl<V: Send + Sync + 'static> VersionedCache<V> {
    /// A cache named `name` (for statistics) with the given TTL and no size bound.
    pub fn new(name: &'static str, ttl: Ttl) -> Self {
        Self::bounded(name, ttl, Bound::Unbounded, |_| 0)
    }

    /// A cache named `name` with the given TTL that holds at most `bound`; under
    /// [`Bound::MaxBytes`], `weigh` says how many bytes a value keeps alive.
    pub fn bounded(name: &'static str, ttl: Ttl, bound: Bound, weigh: fn(&V) -> usize) -> Self {
        let stats = Arc::new(Stats::default());
        let inner = match ttl {
            Ttl::Disabled => None,
            _ => {
                let listener_stats = stats.clone();
                let mut builder = moka::future::Cache::builder().eviction_listener(
                    move |_k: Arc<String>, _v: Entry<V>, cause: RemovalCause| {
                        let counter = match cause {
                            RemovalCause::Expired => &listener_stats.expirations,
                            RemovalCause::Size => &listener_stats.size_evictions,
                            _ => return,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    },
                );
                match bound {
                    Bound::Unbounded => {}
                    Bound::MaxEntries(n) => builder = builder.max_capacity(n),
                    Bound::MaxBytes(n) => {
                        builder =
                            builder
                                .max_capacity(n)
                                .weigher(move |k: &String, e: &Entry<V>| {
                                    let w = ENTRY_OVERHEAD + k.capacity() + weigh(&e.value);
                                    u32::try_from(w).unwrap_or(u32::MAX)
                                })
                    }
                }
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
            bound,
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

    /// The cache's size bound.
    pub fn bound(&self) -> Bound {
        self.bound
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
        let (entries, weight) = match &self.inner {
            Some(inner) => {
                inner.run_pending_tasks().await;
                let entries = inner.entry_count();
                let weight = match self.bound {
                    Bound::MaxBytes(_) => inner.weighted_size(),
                    _ => entries,
                };
                (entries, weight)
            }
            None => (0, 0),
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
            size_evictions: s.size_evictions.load(Ordering::Relaxed),
            weight,
        }
    }
}

#[cfg(test)]
mod tests;
