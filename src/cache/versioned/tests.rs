//! Tests of [`VersionedCache`](super::VersionedCache): loads, evictions that win, bounds.

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
async fn a_byte_bound_keeps_the_cache_within_it_and_reads_stay_right() {
    // Values weigh 100 KiB each; the bound holds at most ten.
    let c = VersionedCache::<String>::bounded("t", Ttl::Infinite, Bound::MaxBytes(1 << 20), |v| {
        v.len()
    });
    for round in 0..3 {
        for k in 0..50 {
            let key = format!("k{k}");
            let v = c
                .get_or_load("a", Some(&key), || async {
                    Ok(format!("{k:03}").repeat((100 << 10) / 3))
                })
                .await
                .unwrap();
            assert!(v.starts_with(&format!("{k:03}")), "round {round}, key {k}");
        }
    }
    let s = c.stats().await;
    assert!(s.weight <= 1 << 20, "{s:?}");
    assert!(s.entries <= 10, "{s:?}");
    assert!(s.size_evictions > 0, "{s:?}");
    assert_eq!(c.bound(), Bound::MaxBytes(1 << 20));
}

#[tokio::test]
async fn an_entry_bound_counts_entries() {
    let c = VersionedCache::<u32>::bounded("t", Ttl::Infinite, Bound::MaxEntries(5), |_| 0);
    for k in 0..20u32 {
        let key = k.to_string();
        assert_eq!(
            *c.get_or_load("a", Some(&key), || async move { Ok(k) })
                .await
                .unwrap(),
            k
        );
    }
    let s = c.stats().await;
    assert!(s.entries <= 5 && s.weight == s.entries, "{s:?}");
    assert!(s.size_evictions >= 15, "{s:?}");
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
