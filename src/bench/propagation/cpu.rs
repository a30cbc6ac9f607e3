//! The CPU cost of one peer invalidation: on the sender per peer, and on a receiver including
//! the apply, so that the peer channel's cost can be compared across machines and releases
//! (latency on a shared 2-core machine cannot be).
//!
//! Setup: a cluster of [`NODES`](super::NODES) whose last member runs as its own process
//! (`openfhir-cache serve`), so its CPU time is the receiver's alone. Node 0 broadcasts
//! invalidations one at a time, each after every peer applied the previous one and a pause of
//! [`GAP`](super::GAP), the pattern of real invalidations (and of the latency rows).
//!
//! * **Sender:** the CPU time of the calling thread inside `Cluster::broadcast` (which is
//!   synchronous: it encodes the message, seals it per peer and writes each idle peer's socket,
//!   the kernel's loopback delivery included), read with `CLOCK_THREAD_CPUTIME_ID` before and
//!   after each call, minus the cost of reading the clock twice, divided by the number of peers.
//! * **Receiver:** the CPU time of the child process (every thread's run time in
//!   `/proc/<pid>/task/*/schedstat`, in nanoseconds) over the whole run, minus what it spends
//!   idle over as long (measured just before), divided by the invalidations it received: the
//!   wake-up, the read, the open, the decode, the apply and whatever else the node does per
//!   message.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::receipts::{await_all, drain, hook};
use super::{GAP, NODES};
use crate::bench::harness::{can_spawn_nodes, Harness, Linking, NodeSpec};
use crate::bench::BenchResult;
use crate::cache::Change;

/// The reference the "cut by 2x" is counted from: the sender's CPU per invalidation and
/// peer before the binary frame (protocol 2: a JSON envelope per message, one write per frame),
/// measured by this module (`bench --scenario propagation`, full run, 10,000 invalidations to 2
/// peers, `CLUSTER_SECRET` set) on the 2-core development VM on 2026-12-07: the median of 5 runs
/// (22.9 to 30.8 µs) interleaved with runs of the new build, load average 7 to 10 from other work.
/// Figures of another machine compare with its own baseline run, not with this constant.
pub const BASELINE_SENDER_US: f64 = 25.4;
/// See [`BASELINE_SENDER_US`]: the receiver's CPU per invalidation, apply included (median of the
/// same 5 runs, 60.7 to 67.4 µs).
pub const BASELINE_RECEIVER_US: f64 = 64.3;

/// The CPU cost of one invalidation over the peer channel.
#[derive(Debug, Clone, Serialize)]
pub struct PeerCpu {
    /// Invalidations sent.
    pub messages: usize,
    /// Peers each went to.
    pub peers: usize,
    /// Sender CPU per invalidation and peer, µs.
    pub sender_per_peer_us: f64,
    /// Receiver CPU per invalidation (apply included), µs.
    pub receiver_us: f64,
    /// The receiver's CPU while idle, per second of run time, µs (subtracted above).
    pub receiver_idle_us_per_s: f64,
    /// The cost of one thread-CPU-clock reading pair, subtracted per call, µs.
    pub clock_overhead_us: f64,
    /// Invalidations not applied by every peer within 3 s.
    pub lost: usize,
    /// The reference figures of [`BASELINE_SENDER_US`] and [`BASELINE_RECEIVER_US`].
    pub baseline_sender_per_peer_us: f64,
    /// See `baseline_sender_per_peer_us`.
    pub baseline_receiver_us: f64,
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The CPU time of every live thread of process `pid` (nanoseconds of run time from
/// `/proc/<pid>/task/*/schedstat`).
fn process_cpu(pid: u32) -> Option<Duration> {
    let mut ns: u64 = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(t) = t else { continue };
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        ns += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(Duration::from_nanos(ns))
}

/// Runs the measurement with `messages` invalidations; `None` when nodes cannot run as child
/// processes (this program is not the `openfhir-cache` binary, as under `cargo test`).
pub(super) async fn run(h: &Harness, messages: usize) -> BenchResult<Option<PeerCpu>> {
    if !can_spawn_nodes() {
        return Ok(None);
    }
    let spec = NodeSpec::peer_only();
    let fleet = h.track(
        h.start_fleet_with(NODES, Linking::Cluster, spec, true)
            .await?,
    );
    let f = fleet.fleet();
    let Some(pid) = f.child.as_ref().and_then(|c| c.id()) else {
        fleet.stop().await;
        return Ok(None);
    };
    // The in-process peers pace the run; the child is the one measured.
    let in_process: Vec<usize> = (1..f.len()).collect();
    let peers = in_process.len() + 1;
    let mut rx = hook(f, &in_process);
    drain(&mut rx).await;

    // The clock's own cost, to subtract per call.
    let reps = 10_000u32;
    let t = thread_cpu();
    for _ in 0..reps {
        std::hint::black_box(thread_cpu());
    }
    let clock = (thread_cpu() - t) / reps;

    // The receiver at rest, over a second.
    let idle_for = Duration::from_secs(1);
    let (c0, t0) = (process_cpu(pid), Instant::now());
    tokio::time::sleep(idle_for).await;
    let (c1, t1) = (process_cpu(pid), Instant::now());

    let mut sender = Duration::ZERO;
    let mut lost = 0;
    let (r0, s0) = (process_cpu(pid), Instant::now());
    for k in 0..messages {
        let key = format!("cpu{k}");
        let change = Change::Opt {
            tenant: h.tenant.clone(),
            template_id: key.clone(),
        };
        let sent = Instant::now();
        let before = thread_cpu();
        f.node(0).cluster().broadcast(&change, None);
        sender += (thread_cpu() - before).saturating_sub(clock);
        if await_all(&mut rx, &key, &in_process, sent).await.is_none() {
            lost += 1;
        }
        tokio::time::sleep(GAP).await;
    }
    // The child's last apply is done long before this (one pause later at most).
    tokio::time::sleep(GAP * 5).await;
    let (r1, s1) = (process_cpu(pid), Instant::now());
    super::unhook(f);
    fleet.stop().await;

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let idle_rate = match (c0, c1) {
        (Some(a), Some(b)) => us(b.saturating_sub(a)) / (t1 - t0).as_secs_f64(),
        _ => 0.0,
    };
    let receiver = match (r0, r1) {
        (Some(a), Some(b)) => {
            let busy = us(b.saturating_sub(a)) - idle_rate * (s1 - s0).as_secs_f64();
            busy.max(0.0) / messages as f64
        }
        _ => f64::NAN,
    };
    Ok(Some(PeerCpu {
        messages,
        peers,
        sender_per_peer_us: us(sender) / (messages * peers) as f64,
        receiver_us: receiver,
        receiver_idle_us_per_s: idle_rate,
        clock_overhead_us: us(clock),
        lost,
        baseline_sender_per_peer_us: BASELINE_SENDER_US,
        baseline_receiver_us: BASELINE_RECEIVER_US,
    }))
}
