//! The supervisor on a paused clock: restarts and their delays, one-shot tasks, stops on purpose.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Lets the spawned tasks and their watchers run until they wait (no time passes).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// A factory whose runs panic while `fail` of them have started, and then run until aborted.
fn failing_first(
    fail: u64,
    starts: Arc<AtomicU64>,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync + 'static {
    move || {
        let n = starts.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            if n <= fail {
                panic!("boom {n}");
            }
            std::future::pending::<()>().await
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_that_panics_is_down_until_restarted_with_growing_delays() {
    let sup = Supervisor::new();
    let starts = Arc::new(AtomicU64::new(0));
    sup.spawn(Task::restart("t"), failing_first(2, starts.clone()));
    settle().await;
    let r = sup.task("t").expect("spawned");
    assert_eq!(r.state, TaskState::Restarting);
    assert_eq!(r.last_end.as_deref(), Some("panicked: boom 1"));
    assert_eq!(r.restart_in_ms, Some(100));
    assert!(!r.up());
    assert_eq!(
        sup.readiness(),
        Err("background task t is down: panicked: boom 1; restart 1 in 100 ms".into())
    );

    tokio::time::sleep(Duration::from_millis(100)).await;
    settle().await;
    assert_eq!(starts.load(Ordering::SeqCst), 2);
    let r = sup.task("t").expect("spawned");
    assert_eq!(r.state, TaskState::Restarting);
    assert_eq!(r.restarts, 1);
    assert_eq!(r.restart_in_ms, Some(200), "the delay doubles");

    tokio::time::sleep(Duration::from_millis(200)).await;
    settle().await;
    assert_eq!(starts.load(Ordering::SeqCst), 3);
    let r = sup.task("t").expect("spawned");
    assert_eq!(r.state, TaskState::Running);
    assert_eq!(r.restarts, 2);
    assert_eq!(
        r.last_end.as_deref(),
        Some("panicked: boom 2"),
        "kept after the restart"
    );
    assert!(r.up());
    assert_eq!(sup.readiness(), Ok(()));
    sup.stop();
}

#[tokio::test(start_paused = true)]
async fn a_task_that_returns_is_restarted_too() {
    let sup = Supervisor::new();
    let starts = Arc::new(AtomicU64::new(0));
    let s = starts.clone();
    sup.spawn(Task::restart("r"), move || {
        s.fetch_add(1, Ordering::SeqCst);
        async {}
    });
    settle().await;
    assert_eq!(
        sup.readiness(),
        Err("background task r is down: returned; restart 1 in 100 ms".into())
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    settle().await;
    // Started at 0, 100 and 300 ms.
    assert_eq!(starts.load(Ordering::SeqCst), 3);
    sup.stop();
}

#[tokio::test(start_paused = true)]
async fn a_one_shot_task_is_done_when_it_returns_and_dead_when_it_panics() {
    let sup = Supervisor::new();
    sup.spawn(Task::once("fine"), || async {});
    let starts = Arc::new(AtomicU64::new(0));
    sup.spawn(Task::once("bad"), failing_first(1, starts.clone()));
    settle().await;
    assert_eq!(sup.task("fine").map(|r| r.state), Some(TaskState::Done));
    assert!(sup.task("fine").is_some_and(|r| r.up()));
    let bad = sup.task("bad").expect("spawned");
    assert_eq!(bad.state, TaskState::Dead);
    assert!(!bad.up());
    assert_eq!(
        sup.readiness(),
        Err("background task bad is dead: panicked: boom 1; it is not restarted".into())
    );
    tokio::time::sleep(Duration::from_secs(120)).await;
    settle().await;
    assert_eq!(starts.load(Ordering::SeqCst), 1, "never run again");
}

#[tokio::test(start_paused = true)]
async fn nothing_is_restarted_after_a_stop() {
    let sup = Supervisor::new();
    let starts = Arc::new(AtomicU64::new(0));
    sup.spawn(Task::restart("t"), failing_first(10, starts.clone()));
    settle().await;
    sup.stop();
    tokio::time::sleep(Duration::from_secs(60)).await;
    settle().await;
    assert_eq!(starts.load(Ordering::SeqCst), 1);
    assert_eq!(sup.task("t").map(|r| r.state), Some(TaskState::Stopped));
    assert_eq!(sup.readiness(), Ok(()), "a stopped task is not down");
    // A task spawned after the stop does not run at all.
    sup.spawn(Task::restart("late"), failing_first(0, starts.clone()));
    settle().await;
    assert!(sup.task("late").is_none());
    assert_eq!(starts.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stop_aborts_the_running_task() {
    let sup = Supervisor::new();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tx = std::sync::Mutex::new(Some(tx));
    sup.spawn(Task::restart("t"), move || {
        // Dropped (closing the channel) when the run is aborted.
        let held = tx.lock().unwrap().take();
        async move {
            let _held = held;
            std::future::pending::<()>().await
        }
    });
    settle().await;
    sup.stop();
    settle().await;
    assert!(rx.await.is_err(), "the run was dropped");
}

#[tokio::test(start_paused = true)]
async fn an_end_after_the_tasks_own_stop_token_is_not_a_failure() {
    let sup = Supervisor::new();
    let stop = CancellationToken::new();
    let starts = Arc::new(AtomicU64::new(0));
    let (s, t) = (starts.clone(), stop.clone());
    sup.spawn(Task::restart("c").until(stop.clone()), move || {
        s.fetch_add(1, Ordering::SeqCst);
        let t = t.clone();
        async move { t.cancelled().await }
    });
    settle().await;
    stop.cancel();
    settle().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(starts.load(Ordering::SeqCst), 1);
    let r = sup.task("c").expect("spawned");
    assert_eq!(r.state, TaskState::Stopped);
    assert_eq!(r.restarts, 0);
    assert_eq!(sup.readiness(), Ok(()));
}

#[cfg(feature = "fault-injection")]
#[tokio::test(start_paused = true)]
async fn injected_faults_fire_once_or_until_cleared() {
    let sup = Supervisor::new();
    let starts = Arc::new(AtomicU64::new(0));
    sup.spawn(Task::restart("t"), failing_first(0, starts.clone()));
    settle().await;
    assert!(!sup.inject_fault("nope", Fault::Panic), "no such task");

    assert!(sup.inject_fault("t", Fault::Panic));
    settle().await;
    let r = sup.task("t").expect("spawned");
    assert_eq!(r.state, TaskState::Restarting);
    assert_eq!(
        r.last_end.as_deref(),
        Some("panicked: fault injected into background task t")
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    settle().await;
    assert_eq!(sup.task("t").map(|r| r.state), Some(TaskState::Running));

    assert!(sup.inject_sticky_fault("t", Fault::Return));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
    }
    let r = sup.task("t").expect("spawned");
    assert_eq!(r.state, TaskState::Restarting);
    assert_eq!(r.last_end.as_deref(), Some("returned"));
    assert!(r.restarts >= 4, "{r:?}");
    sup.clear_fault("t");
    tokio::time::sleep(Duration::from_secs(30)).await;
    settle().await;
    assert_eq!(sup.task("t").map(|r| r.state), Some(TaskState::Running));
    assert_eq!(sup.readiness(), Ok(()));
    sup.stop();
}
