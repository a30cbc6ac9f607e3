//! Test-only fault injection (feature `fault-injection`, which production builds never enable):
//! makes a named supervised task panic or return, once or at every start until cleared, so the
//! tests can watch each task's end being noticed, logged, counted and repaired.
//!
//! The fault fires in the wrapper the supervisor puts around the task's future: the task's own
//! future is dropped at the await point it was waiting at and the spawned task then panics (or
//! returns). From outside that is exactly a panic raised inside the task at that point (a panic
//! unwinds by dropping the same state), so no task needs a hook of its own and the real restart
//! path, with the real state a restart must reset, is what the tests exercise.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

/// What an injected fault makes the task do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Panic with a message naming the task.
    Panic,
    /// Return, as a loop that ended by mistake would.
    Return,
}

#[derive(Debug, Clone, Copy)]
struct Armed {
    fault: Fault,
    sticky: bool,
}

/// The faults armed on one supervisor's tasks, by task name.
#[derive(Debug)]
pub(super) struct Faults {
    armed: Mutex<HashMap<String, Armed>>,
    /// Bumped on every change, so a running task's wrapper looks again.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            armed: Mutex::default(),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Armed>> {
        // Every update is a single insert or remove: a poisoned map is still consistent.
        self.armed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms `fault` on `task`: it fires in the running task at once and, when `sticky`, again at
    /// every start until [`Faults::clear`].
    pub(super) fn arm(&self, task: &str, fault: Fault, sticky: bool) {
        self.lock()
            .insert(task.to_string(), Armed { fault, sticky });
        self.changed.send_modify(|n| *n += 1);
    }

    /// Disarms `task`'s fault, if any.
    pub(super) fn clear(&self, task: &str) {
        self.lock().remove(task);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The fault to fire now in `task`: a one-shot fault is used up, a sticky one stays.
    fn take(&self, task: &str) -> Option<Fault> {
        let mut armed = self.lock();
        let a = *armed.get(task)?;
        if !a.sticky {
            armed.remove(task);
        }
        Some(a.fault)
    }

    /// `run`, failing as soon as a fault is armed on `task`.
    pub(super) async fn wrap<F>(self: Arc<Self>, task: &'static str, run: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Subscribed before the first look, so an arm between the look and the wait is seen.
        let mut changed = self.changed.subscribe();
        tokio::pin!(run);
        loop {
            match self.take(task) {
                Some(Fault::Panic) => panic!("fault injected into background task {task}"),
                Some(Fault::Return) => return,
                None => {}
            }
            tokio::select! {
                biased;
                () = &mut run => return,
                r = changed.changed() => if r.is_err() {
                    // The sender lives as long as the supervisor; without it, just run.
                    return run.await;
                },
            }
        }
    }
}
