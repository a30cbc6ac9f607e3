//! Micro-benchmarks of the cache hot path: a hit, a miss that loads, and an eviction.
//!
//! `cargo bench --bench cache`. The loader here is in memory, so "miss" measures the cache's own
//! overhead (coalescing, stamping, insertion), not the database.

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, Criterion};
use openfhir_cache::cache::VersionedCache;
use openfhir_cache::config::Ttl;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache = VersionedCache::<String>::new("bench", Ttl::Infinite);
    rt.block_on(async {
        cache
            .get_or_load("default", Some("growth_chart"), || async {
                Ok("x".repeat(64))
            })
            .await
            .unwrap();
    });

    let mut g = c.benchmark_group("cache");
    g.bench_function("hit", |b| {
        b.to_async(&rt).iter(|| async {
            cache
                .get_or_load("default", Some("growth_chart"), || async {
                    Ok(String::new())
                })
                .await
                .unwrap()
        })
    });
    let n = AtomicU64::new(0);
    g.bench_function("evict_then_load", |b| {
        b.to_async(&rt).iter(|| async {
            cache.evict_key("default", Some("growth_chart")).await;
            cache
                .get_or_load("default", Some("growth_chart"), || async {
                    Ok(n.fetch_add(1, Ordering::Relaxed).to_string())
                })
                .await
                .unwrap()
        })
    });
    let disabled = VersionedCache::<String>::new("bench", Ttl::Disabled);
    g.bench_function("disabled_passthrough", |b| {
        b.to_async(&rt).iter(|| async {
            disabled
                .get_or_load("default", Some("growth_chart"), || async {
                    Ok(String::new())
                })
                .await
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
