//! The workload and its checks. Every value is an OPT (`PUT /opt/{key}`) whose `<concept>` is
//! `m<seq>`, `seq` increasing over the whole run, so any answer says which write it shows.
//!
//! - **Convergence:** after each acknowledged write, every other node that is up is polled until
//!   it serves that write (bounded); one that does not is a failure.
//! - **Stale read:** a read that started more than [`GRACE`] after a newer write of the same key
//!   was acknowledged, and answered an older value, from a node that was up all along.
//! - **Final check:** after the load stops and a settle time, every key on every node against a
//!   direct `SELECT` of the database, and the database against the last acknowledged write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::opt_xml;
use crate::nodes::Scenario;

/// How long after a write's acknowledgement an older answer is still not a stale read (the
/// propagation window: the peer channel takes milliseconds, NOTIFY and catch-up well under this).
pub const GRACE: Duration = Duration::from_millis(1000);

/// The seq a stored or served OPT carries (`<concept>m<seq></concept>`).
pub fn seq_of(xml: &str) -> Option<u64> {
    let start = xml.find("<concept>m")? + "<concept>m".len();
    let end = xml[start..].find("</concept>")? + start;
    xml[start..end].parse().ok()
}

/// One answer for a key: `Ok(None)` = 404, `Ok(Some(seq))` = a value.
pub async fn read(http: &reqwest::Client, base: &str, key: &str) -> Result<Option<u64>, String> {
    let r = http
        .get(format!("{base}/opt/{key}"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let body = r.text().await.map_err(|e| e.to_string())?;
    match status {
        200 => seq_of(&body)
            .map(Some)
            .ok_or_else(|| format!("200 without a marker: {body:.120}")),
        404 => Ok(None),
        s => Err(format!("HTTP {s}: {body:.200}")),
    }
}

/// `PUT /opt/{key}` with value `seq` through `base`.
pub async fn write(http: &reqwest::Client, base: &str, key: &str, seq: u64) -> Result<(), String> {
    let r = http
        .put(format!("{base}/opt/{key}"))
        .header("content-type", "application/xml")
        .body(opt_xml(key, &format!("m{seq}")))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "HTTP {status}: {:.200}",
            r.text().await.unwrap_or_default()
        ))
    }
}

/// Polls `base` until it serves `seq` (or newer) for `key`, up to `bound`; `Err` with the last
/// answer otherwise.
pub async fn converge(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    seq: u64,
    bound: Duration,
    still_up: impl Fn() -> bool,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last: String;
    loop {
        match read(http, base, key).await {
            Ok(Some(s)) if s >= seq => return Ok(started.elapsed()),
            Ok(other) => last = format!("{other:?}"),
            Err(e) => last = e,
        }
        if !still_up() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > bound {
            return Err(format!("still {last} after {bound:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The SQL value of every key: `key -> seq` (absent keys are missing).
pub async fn db_values(db_url: &str, keys: &[String]) -> HashMap<String, u64> {
    let (client, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("SQL connection to {db_url}: {e}"));
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT template_id, content FROM opt WHERE tenant = 'default' \
             AND template_id = ANY($1)",
            &[&keys],
        )
        .await
        .expect("SELECT opt");
    rows.iter()
        .filter_map(|r| {
            let id: String = r.get(0);
            let content: String = r.get(1);
            seq_of(&content).map(|s| (id, s))
        })
        .collect()
}

/// Whether each node takes part in the load: written through, read and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Up,
    /// Partitioned, restarting, or back but not yet settled: left alone.
    Away,
}

/// The shared state of a running load.
pub struct Load {
    pub keys: Vec<String>,
    pub roles: Mutex<Vec<Role>>,
    /// Bumped on every role change, so an operation can tell whether its node stayed up.
    epochs: Mutex<Vec<u64>>,
    stop: AtomicBool,
    seq: AtomicU64,
    /// Per key: `(seq, acknowledged at)` of every acknowledged write.
    acked: Mutex<HashMap<String, Vec<(u64, Instant)>>>,
    pub writes: AtomicU64,
    pub reads: AtomicU64,
    pub failed_writes: Mutex<Vec<String>>,
    pub stale_reads: Mutex<Vec<String>>,
    pub not_converged: Mutex<Vec<String>>,
    /// Slowest convergence seen.
    pub max_converge: Mutex<Duration>,
    /// Convergence bound.
    pub bound: Duration,
}

impl Load {
    pub fn new(nodes: usize, keys: usize, bound: Duration) -> Load {
        Load {
            keys: (0..keys).map(|k| format!("netns_k{k}")).collect(),
            roles: Mutex::new(vec![Role::Up; nodes]),
            epochs: Mutex::new(vec![0; nodes]),
            stop: AtomicBool::new(false),
            seq: AtomicU64::new(1),
            acked: Mutex::new(HashMap::new()),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            failed_writes: Mutex::new(Vec::new()),
            stale_reads: Mutex::new(Vec::new()),
            not_converged: Mutex::new(Vec::new()),
            max_converge: Mutex::new(Duration::ZERO),
            bound,
        }
    }

    /// Sets node `i`'s role.
    pub fn set_role(&self, i: usize, role: Role) {
        self.roles.lock().unwrap()[i] = role;
        self.epochs.lock().unwrap()[i] += 1;
    }

    fn up(&self) -> Vec<usize> {
        let roles = self.roles.lock().unwrap();
        (0..roles.len()).filter(|&i| roles[i] == Role::Up).collect()
    }

    fn epoch(&self, i: usize) -> u64 {
        self.epochs.lock().unwrap()[i]
    }

    /// True if node `i` is up and has not changed role since `epoch`.
    fn stayed_up(&self, i: usize, epoch: u64) -> bool {
        self.roles.lock().unwrap()[i] == Role::Up && self.epoch(i) == epoch
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The last acknowledged seq of every key.
    pub fn last_acked(&self) -> HashMap<String, u64> {
        self.acked
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(k, v)| v.last().map(|(s, _)| (k.clone(), *s)))
            .collect()
    }

    /// Writes through the nodes that are up, one at a time, each followed by the convergence
    /// check on every other node that is up; until stopped.
    pub async fn writer(&self, s: &Scenario) {
        let mut n: usize = 0;
        while !self.stopped() {
            let up = self.up();
            if up.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            n += 1;
            let node = up[n % up.len()];
            let key = &self.keys[n % self.keys.len()];
            let seq = self.seq.fetch_add(1, Ordering::SeqCst);
            let epoch = self.epoch(node);
            let result = write(&s.http, &s.nodes[node].base, key, seq).await;
            match result {
                Ok(()) => {
                    self.writes.fetch_add(1, Ordering::Relaxed);
                    self.acked
                        .lock()
                        .unwrap()
                        .entry(key.clone())
                        .or_default()
                        .push((seq, Instant::now()));
                }
                Err(e) => {
                    // Only a write to a node that stayed up counts: the restarting or
                    // partitioned node is allowed to fail.
                    if self.stayed_up(node, epoch) {
                        self.failed_writes
                            .lock()
                            .unwrap()
                            .push(format!("write m{seq} of {key} through node {node}: {e}"));
                    }
                    continue;
                }
            }
            for j in self.up() {
                if j == node {
                    continue;
                }
                let ej = self.epoch(j);
                let r = converge(&s.http, &s.nodes[j].base, key, seq, self.bound, || {
                    self.stayed_up(j, ej)
                })
                .await;
                match r {
                    Ok(d) => {
                        let mut m = self.max_converge.lock().unwrap();
                        *m = (*m).max(d);
                    }
                    Err(e) if self.stayed_up(j, ej) => self.not_converged.lock().unwrap().push(
                        format!("write m{seq} of {key} (through node {node}) on node {j}: {e}"),
                    ),
                    Err(_) => {}
                }
            }
        }
    }

    /// Reads random keys on the nodes that are up until stopped; an older answer than a write
    /// acknowledged more than [`GRACE`] before the read started is a stale read.
    pub async fn reader(&self, s: &Scenario, salt: usize) {
        let mut n: usize = salt;
        while !self.stopped() {
            let up = self.up();
            if up.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            n = n.wrapping_mul(2_654_435_761).wrapping_add(7);
            let node = up[(n >> 8) % up.len()];
            let key = &self.keys[(n >> 16) % self.keys.len()];
            let epoch = self.epoch(node);
            let started = Instant::now();
            let got = read(&s.http, &s.nodes[node].base, key).await;
            self.reads.fetch_add(1, Ordering::Relaxed);
            if !self.stayed_up(node, epoch) {
                continue;
            }
            let served = match got {
                Ok(v) => v.unwrap_or(0),
                // Errors from a node that is up are failures too (no 5xx expected here).
                Err(e) => {
                    self.stale_reads
                        .lock()
                        .unwrap()
                        .push(format!("read of {key} on node {node} failed: {e}"));
                    continue;
                }
            };
            let newer = self.acked.lock().unwrap().get(key).and_then(|v| {
                v.iter()
                    .rev()
                    .find(|(seq, at)| *seq > served && *at + GRACE < started)
                    .map(|(seq, at)| (*seq, started - *at))
            });
            if let Some((seq, age)) = newer {
                self.stale_reads.lock().unwrap().push(format!(
                    "node {node} served m{served} of {key}, but m{seq} was acknowledged {age:?} \
                     before the read"
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Every key on every node in `nodes` against the database and the last acknowledged
    /// writes; the differences.
    pub async fn final_check(&self, s: &Scenario, nodes: &[usize]) -> Vec<String> {
        let db = db_values(&s.db_url, &self.keys).await;
        let acked = self.last_acked();
        let mut diffs = Vec::new();
        for key in &self.keys {
            let want = db.get(key).copied();
            if let Some(a) = acked.get(key) {
                if want.is_none_or(|w| w < *a) {
                    diffs.push(format!(
                        "{key}: the database holds {want:?}, older than the acknowledged m{a} \
                         (lost write)"
                    ));
                }
            }
            for &i in nodes {
                match read(&s.http, &s.nodes[i].base, key).await {
                    Ok(got) if got == want => {}
                    Ok(got) => diffs.push(format!(
                        "{key} on node {i}: serves {got:?}, the database holds {want:?}"
                    )),
                    Err(e) => diffs.push(format!("{key} on node {i}: {e}")),
                }
            }
        }
        diffs
    }

    /// Panics with every failure collected, if any.
    pub fn assert_clean(&self, name: &str) {
        let fw = self.failed_writes.lock().unwrap();
        let st = self.stale_reads.lock().unwrap();
        let nc = self.not_converged.lock().unwrap();
        let show = |v: &Vec<String>| {
            v.iter()
                .take(10)
                .map(|s| format!("\n  {s}"))
                .collect::<String>()
        };
        assert!(
            fw.is_empty() && st.is_empty() && nc.is_empty(),
            "{name}: {} failed writes, {} stale reads, {} writes not converged within {:?} \
             ({} writes, {} reads)\nfailed writes:{}\nstale reads:{}\nnot converged:{}",
            fw.len(),
            st.len(),
            nc.len(),
            self.bound,
            self.writes.load(Ordering::Relaxed),
            self.reads.load(Ordering::Relaxed),
            show(&fw),
            show(&st),
            show(&nc)
        );
    }
}
