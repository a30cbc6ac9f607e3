//! What a chaos run found: per-fault statistics, the failures, and the table docs/testing.md quotes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// A fault type. A *phase* is one injection: some workload before it, the fault, the heal, some
/// workload after it, the settle time and the check. `None` phases are the no-fault baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    None,
    Kill9,
    Partition,
    KillListeners,
    RestartPg,
    Pause,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::None,
        Fault::Kill9,
        Fault::Partition,
        Fault::KillListeners,
        Fault::RestartPg,
        Fault::Pause,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::None => "none (baseline)",
            Fault::Kill9 => "kill -9 a node, restart it",
            Fault::Partition => "cut a node's peer traffic",
            Fault::KillListeners => "kill the LISTEN connections",
            Fault::RestartPg => "restart PostgreSQL",
            Fault::Pause => "SIGSTOP/SIGCONT a node",
        }
    }
}

/// Counters of one fault type, over all its phases.
#[derive(Default)]
pub struct Stats {
    pub phases: u32,
    pub reads: u64,
    pub acked: u64,
    pub uncertain: u64,
    pub rejected: u64,
    /// Propagation windows: from a write's acknowledgement (or from a node's return, for a node
    /// that was down or paused when the write was made) until the node served the new value.
    pub windows: Vec<Duration>,
    /// The subset of `windows` measured from a node's return.
    pub after_return: Vec<Duration>,
    /// For each (write, node) where the node answered an old value after the write was
    /// acknowledged (or after it came back): when the last such answer arrived.
    pub stale_seen: Vec<Duration>,
    /// Writes whose propagation could not be measured (the database did not answer right after).
    pub unmeasured: u64,
    pub stale: u64,
    pub not_converged: u64,
    pub lost: u64,
    pub s503: u64,
    pub other_5xx: u64,
    pub listener_reconnect: Vec<Duration>,
}

/// One thing that went wrong.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: &'static str,
    pub phase: String,
    pub key: String,
    pub node: String,
    pub detail: String,
}

pub fn pct(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() as f64 - 1.0) * p).round() as usize])
}

fn ms(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_millis(10) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.0} ms", d.as_secs_f64() * 1e3),
    }
}

/// The per-fault table (Markdown).
pub fn table(stats: &BTreeMap<Fault, Stats>) -> String {
    let mut out = String::new();
    out.push_str(
        "| fault | injections | writes acked | time to new value p50 | p99 | max | \
         max after the node's return | old value served: answers / latest | \
         stale after heal | not converged | lost writes | 503s | other 5xx |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for f in Fault::ALL {
        let Some(s) = stats.get(&f) else { continue };
        let mut w = s.windows.clone();
        w.sort();
        let mut r = s.after_return.clone();
        r.sort();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} |",
            f.name(),
            s.phases,
            s.acked,
            ms(pct(&w, 0.5)),
            ms(pct(&w, 0.99)),
            ms(w.last().copied()),
            ms(r.last().copied()),
            s.stale_seen.len(),
            ms(s.stale_seen.iter().max().copied()),
            s.stale,
            s.not_converged,
            s.lost,
            s.s503,
            s.other_5xx,
        );
    }
    out.push_str(
        "\nTime to new value: from a write's acknowledgement (for a node that was down or paused, \
         from its return) until the node served what the database holds, all nodes polled \
         concurrently; it includes time a node answered 503. Old value served: (write, node) \
         pairs that answered the previous value at least once after the acknowledgement, and the \
         latest such answer. Stale after heal: values that differed from the database at the \
         check, after the fault healed and the settle time passed. Not converged: writes a node \
         had not served within the bound.\n",
    );
    out
}
