//! Supervised background tasks: every end of a node's background task is seen, logged and
//! either repaired or shown in readiness.
//!
//! A node's background machinery (the LISTEN connection, catch-up, the deferred NOTIFY sender,
//! the cluster channel's tasks, the bootstrap run) runs as named tasks of the node's
//! [`Supervisor`] ([`crate::node::Node::tasks`]). Each is spawned from a factory, so it can be
//! started again, under a watcher that awaits its end:
//!
//! * a [`Task::restart`] task that panics or returns is logged (the task, how it ended, the
//!   delay) and started again after an exponential backoff ([`BackoffPolicy`]); until then it is
//!   *down*;
//! * a [`Task::once`] task (the bootstrap run) that returns is done; one that panics is *dead*:
//!   it is not run again;
//! * an end after the supervisor was stopped ([`Supervisor::stop`], at shutdown) or after the
//!   task's own stop token ([`Task::until`]) was cancelled is a stop on purpose: nothing is
//!   logged or restarted.
//!
//! [`Supervisor::readiness`] names every task that is down or dead (`/health/ready` answers 503
//! with it), [`Supervisor::report`] gives each task's state for `GET /cluster` and `/metrics`.
//!
//! Tests inject faults into a named task with the `fault-injection` feature, which production
//! builds do not enable (see `fault`).

mod backoff;
#[cfg(feature = "fault-injection")]
mod fault;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use backoff::{Backoff, BackoffPolicy};
#[cfg(feature = "fault-injection")]
pub use fault::Fault;

/// Locks a mutex whose every update is a single assignment or push, so a panic while holding it
/// cannot leave it half-updated: a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a task is supervised: its name and what its end means.
#[derive(Debug, Clone)]
pub struct Task {
    name: &'static str,
    once: bool,
    until: Option<CancellationToken>,
}

impl Task {
    /// A task that should run as long as the node: whenever it ends (a panic, or a return) it is
    /// started again after a backoff. Its state must allow that (see each task's notes).
    pub fn restart(name: &'static str) -> Task {
        Task {
            name,
            once: false,
            until: None,
        }
    }

    /// A task that runs once to its end: a return is done; a panic marks it dead (it is not run
    /// again, and readiness names it).
    pub fn once(name: &'static str) -> Task {
        Task {
            name,
            once: true,
            until: None,
        }
    }

    /// The task returns by itself when `stop` is cancelled (the cluster channel's tasks on
    /// leave): an end after that is a stop on purpose, not a failure.
    pub fn until(mut self, stop: CancellationToken) -> Task {
        self.until = Some(stop);
        self
    }

    fn stopped_on_purpose(&self, supervisor: &CancellationToken) -> bool {
        supervisor.is_cancelled() || self.until.as_ref().is_some_and(|t| t.is_cancelled())
    }
}

/// How a run of a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The task's future completed (a loop meant to run forever ended).
    Returned,
    /// The task panicked, with the panic's message.
    Panicked(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Returned => f.write_str("returned"),
            End::Panicked(m) => write!(f, "panicked: {m}"),
        }
    }
}

/// Where a supervised task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Running.
    Running,
    /// Ended and waiting for its restart: down.
    Restarting,
    /// A one-shot task that panicked: down for good.
    Dead,
    /// A one-shot task that finished.
    Done,
    /// Stopped on purpose (shutdown, or the cluster channel left).
    Stopped,
}

/// One task's state, for `GET /cluster` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskReport {
    /// The task's name (`catchup`, `cluster.accept`, ...).
    pub name: &'static str,
    /// Where it is.
    pub state: TaskState,
    /// How many times it was started again.
    pub restarts: u64,
    /// How its last run ended (`returned`, `panicked: ...`), if one did.
    pub last_end: Option<String>,
    /// While restarting: the milliseconds until the next start.
    pub restart_in_ms: Option<u64>,
}

impl TaskReport {
    /// True unless the task is waiting for a restart, dead or stopped (`openfhir_task_up`).
    pub fn up(&self) -> bool {
        matches!(self.state, TaskState::Running | TaskState::Done)
    }
}

#[derive(Debug, Clone)]
enum State {
    Running,
    Restarting { restart: u64, at: Instant },
    Dead,
    Done,
    Stopped,
}

#[derive(Debug)]
struct Status {
    state: State,
    last_end: Option<End>,
}

/// One supervised task's record.
#[derive(Debug)]
struct Slot {
    name: &'static str,
    restarts: AtomicU64,
    status: Mutex<Status>,
}

impl Slot {
    fn set(&self, state: State, end: Option<End>) {
        let mut s = lock(&self.status);
        s.state = state;
        if end.is_some() {
            s.last_end = end;
        }
    }

    fn report(&self) -> TaskReport {
        let s = lock(&self.status);
        let (state, restart_in_ms) = match &s.state {
            State::Running => (TaskState::Running, None),
            State::Restarting { at, .. } => (
                TaskState::Restarting,
                Some(at.saturating_duration_since(Instant::now()).as_millis() as u64),
            ),
            State::Dead => (TaskState::Dead, None),
            State::Done => (TaskState::Done, None),
            State::Stopped => (TaskState::Stopped, None),
        };
        TaskReport {
            name: self.name,
            state,
            restarts: self.restarts.load(Ordering::Relaxed),
            last_end: s.last_end.as_ref().map(End::to_string),
            restart_in_ms,
        }
    }

    /// Why readiness fails because of this task, if it does.
    fn down(&self) -> Option<String> {
        let s = lock(&self.status);
        let end = s
            .last_end
            .as_ref()
            .map_or_else(|| "ended".to_string(), End::to_string);
        match &s.state {
            State::Restarting { restart, at } => Some(format!(
                "background task {} is down: {end}; restart {restart} in {} ms",
                self.name,
                at.saturating_duration_since(Instant::now()).as_millis()
            )),
            State::Dead => Some(format!(
                "background task {} is dead: {end}; it is not restarted",
                self.name
            )),
            _ => None,
        }
    }
}

/// A node's supervised background tasks. Cloning gives another handle to the same tasks.
#[derive(Debug, Clone, Default)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    backoff: BackoffPolicy,
    slots: Mutex<Vec<Arc<Slot>>>,
    watchers: Mutex<Vec<JoinHandle<()>>>,
    stopped: CancellationToken,
    #[cfg(feature = "fault-injection")]
    faults: Arc<fault::Faults>,
}

/// A spawned run of a task, aborted when dropped: a watcher that is aborted (at shutdown) takes
/// the run it watches down with it.
struct Run(JoinHandle<()>);

impl Drop for Run {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Supervisor {
    /// A supervisor with the default [`BackoffPolicy`] and no tasks.
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// A supervisor whose restarts wait as `backoff` says.
    pub fn with_backoff(backoff: BackoffPolicy) -> Supervisor {
        Supervisor {
            inner: Arc::new(Inner {
                backoff,
                ..Inner::default()
            }),
        }
    }

    /// Starts `task` from `factory` (called again for every restart) under a watcher, on the
    /// current tokio runtime. Does nothing once the supervisor was stopped.
    pub fn spawn<F, Fut>(&self, task: Task, factory: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let slot = Arc::new(Slot {
            name: task.name,
            restarts: AtomicU64::new(0),
            status: Mutex::new(Status {
                state: State::Running,
                last_end: None,
            }),
        });
        // Under the watchers' lock, which `stop` takes before cancelling: a task is either
        // spawned before the stop (and aborted by it) or not at all.
        let mut watchers = lock(&self.inner.watchers);
        if self.inner.stopped.is_cancelled() {
            return;
        }
        lock(&self.inner.slots).push(slot.clone());
        let watcher = Watcher {
            slot,
            task,
            stopped: self.inner.stopped.clone(),
            backoff: self.inner.backoff,
            #[cfg(feature = "fault-injection")]
            faults: self.inner.faults.clone(),
        };
        watchers.push(tokio::spawn(watcher.run(factory)));
    }

    /// Stops supervising and aborts every task: nothing is restarted after this. At shutdown.
    pub fn stop(&self) {
        let watchers = {
            let mut w = lock(&self.inner.watchers);
            self.inner.stopped.cancel();
            std::mem::take(&mut *w)
        };
        for w in watchers {
            w.abort();
        }
        for slot in lock(&self.inner.slots).iter() {
            let mut s = lock(&slot.status);
            if matches!(s.state, State::Running | State::Restarting { .. }) {
                s.state = State::Stopped;
            }
        }
    }

    /// Every task's state, in the order they were spawned.
    pub fn report(&self) -> Vec<TaskReport> {
        lock(&self.inner.slots).iter().map(|s| s.report()).collect()
    }

    /// The state of the task named `name`, if there is one.
    pub fn task(&self, name: &str) -> Option<TaskReport> {
        lock(&self.inner.slots)
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.report())
    }

    /// `Ok` when no task is down; otherwise what is down, every such task named with how it
    /// ended and when it starts again (or that it will not), for `/health/ready`.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        let down: Vec<String> = lock(&self.inner.slots)
            .iter()
            .filter_map(|s| s.down())
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(down.join("; "))
        }
    }

    /// Test only: makes the running task `name` fail with `fault` once. `false` when no task has
    /// that name.
    #[cfg(feature = "fault-injection")]
    pub fn inject_fault(&self, name: &str, fault: Fault) -> bool {
        self.arm(name, fault, false)
    }

    /// Test only: makes the task `name` fail with `fault` now and at every restart until
    /// [`Supervisor::clear_fault`]. `false` when no task has that name.
    #[cfg(feature = "fault-injection")]
    pub fn inject_sticky_fault(&self, name: &str, fault: Fault) -> bool {
        self.arm(name, fault, true)
    }

    #[cfg(feature = "fault-injection")]
    fn arm(&self, name: &str, fault: Fault, sticky: bool) -> bool {
        if self.task(name).is_none() {
            return false;
        }
        self.inner.faults.arm(name, fault, sticky);
        true
    }

    /// Test only: disarms the fault of task `name`; its next start runs normally.
    #[cfg(feature = "fault-injection")]
    pub fn clear_fault(&self, name: &str) {
        self.inner.faults.clear(name);
    }
}

/// What a watcher needs: its task's record and spec, the supervisor's stop token and backoff.
struct Watcher {
    slot: Arc<Slot>,
    task: Task,
    stopped: CancellationToken,
    backoff: BackoffPolicy,
    #[cfg(feature = "fault-injection")]
    faults: Arc<fault::Faults>,
}

impl Watcher {
    /// Runs the task, awaits every end and acts on it (see the module's notes).
    async fn run<F, Fut>(self, factory: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name = self.task.name;
        let mut backoff = Backoff::new(self.backoff);
        loop {
            let started = Instant::now();
            let run = factory();
            #[cfg(feature = "fault-injection")]
            let run = self.faults.clone().wrap(name, run);
            let mut run = Run(tokio::spawn(run));
            let end = match (&mut run.0).await {
                Ok(()) => End::Returned,
                Err(e) if e.is_panic() => End::Panicked(panic_message(e.into_panic())),
                // Only the runtime's shutdown cancels a run this watcher did not abort.
                Err(_) => {
                    self.slot.set(State::Stopped, None);
                    return;
                }
            };
            if self.task.stopped_on_purpose(&self.stopped) {
                self.slot.set(State::Stopped, Some(end));
                return;
            }
            if self.task.once {
                if end == End::Returned {
                    self.slot.set(State::Done, None);
                } else {
                    tracing::error!(task = name, end = %end, "background task {name} died ({end}); it is not run again");
                    self.slot.set(State::Dead, Some(end));
                }
                return;
            }
            let delay = backoff.next(started.elapsed());
            let restart = self.slot.restarts.load(Ordering::Relaxed) + 1;
            let delay_ms = delay.as_millis() as u64;
            match &end {
                End::Panicked(_) => tracing::error!(
                    task = name, end = %end, restart, delay_ms,
                    "background task {name} {end}; restarting it in {delay_ms} ms"
                ),
                End::Returned => tracing::warn!(
                    task = name, end = %end, restart, delay_ms,
                    "background task {name} returned; restarting it in {delay_ms} ms"
                ),
            }
            self.slot.set(
                State::Restarting {
                    restart,
                    at: Instant::now() + delay,
                },
                Some(end),
            );
            if !self.wait(delay).await {
                self.slot.set(State::Stopped, None);
                return;
            }
            self.slot.restarts.fetch_add(1, Ordering::Relaxed);
            self.slot.set(State::Running, None);
            tracing::info!(task = name, restart, "background task {name} started again");
        }
    }

    /// Sleeps `delay`; `false` when a stop came first.
    async fn wait(&self, delay: Duration) -> bool {
        let until = async {
            match &self.task.until {
                Some(t) => t.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.stopped.cancelled() => false,
            _ = until => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// The text of a panic's payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p.downcast_ref::<&str>().map_or_else(
            || "(a panic without a message)".to_string(),
            |s| s.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests;
