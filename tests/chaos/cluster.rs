//! The nodes under test as real `openfhir-cache serve` child processes, each on its own loopback
//! address, and the faults that act on processes and on the network: kill -9 and restart,
//! SIGSTOP/SIGCONT, and cutting one node's peer traffic with iptables.
//!
//! Cleanup does not depend on the test ending well: [`Cluster`] kills and reaps every node when
//! dropped (also on panic), each node also gets `PR_SET_PDEATHSIG = SIGKILL` so it dies with the
//! test process even when that is killed with -9, and [`Firewall`] removes its rules when dropped;
//! rules left behind by a killed run carry the dead process's pid in their comment and are removed
//! by the next run.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_openfhir-cache");
pub const HTTP_PORT: u16 = 8080;
pub const CLUSTER_PORT: u16 = 7800;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Running and addressed by the workload.
    Up,
    /// SIGSTOPped: not addressed until resumed.
    Paused,
    /// Killed (or died): no process.
    Down,
}

pub struct NodeProc {
    /// Its loopback address, e.g. `127.0.60.2`.
    pub ip: String,
    /// `http://ip:8080`.
    pub base: String,
    /// stdout and stderr of every incarnation, appended.
    pub log: PathBuf,
    pub state: State,
    /// How many times it was started.
    pub starts: u32,
    child: Option<Child>,
}

impl NodeProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// N nodes sharing one database.
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    http: reqwest::Client,
}

impl Cluster {
    /// Prepares (does not start) `ips.len()` nodes with the common environment `env`; each node
    /// adds its own `OPENFHIR_HTTP_ADDR` and `CLUSTER_BIND_ADDR`.
    pub fn new(dir: &Path, ips: &[String], env: Vec<(String, String)>) -> Cluster {
        let nodes = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| NodeProc {
                ip: ip.clone(),
                base: format!("http://{ip}:{HTTP_PORT}"),
                log: dir.join(format!("node-{}.log", i + 1)),
                state: State::Down,
                starts: 0,
                child: None,
            })
            .collect();
        Cluster {
            nodes,
            env,
            dir: dir.to_path_buf(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Indices of the nodes the workload may address.
    pub fn available(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].state == State::Up)
            .collect()
    }

    /// Starts node `i` (which must be down). Must be called from a thread that outlives the node
    /// (the test's own thread): the node's parent-death signal fires when that thread ends.
    pub fn spawn(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        assert!(n.child.is_none(), "node {} is already running", i + 1);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", n.log.display()));
        writeln!(
            log,
            "=== chaos harness: start #{} of node {} ===",
            n.starts + 1,
            i + 1
        )
        .unwrap();
        let err = log.try_clone().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("OPENFHIR_HTTP_ADDR", format!("{}:{HTTP_PORT}", n.ip))
            .env("CLUSTER_BIND_ADDR", &n.ip)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        n.child = Some(cmd.spawn().expect("the openfhir-cache binary starts"));
        n.starts += 1;
        n.state = State::Up;
    }

    /// Waits until node `i` answers `/health/ready` with 200.
    pub async fn wait_ready(&mut self, i: usize, limit: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let url = format!("{}/health/ready", self.nodes[i].base);
        loop {
            if let Some(c) = self.nodes[i].child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.nodes[i].child = None;
                    self.nodes[i].state = State::Down;
                    return Err(format!(
                        "node {} exited during startup ({status}):\n{}",
                        i + 1,
                        self.log_tail(i, 40)
                    ));
                }
            }
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status() == 200 {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "node {} not ready within {limit:?}:\n{}",
                    i + 1,
                    self.log_tail(i, 40)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node sees every other running node as alive; returns how long
    /// that took, or what was missing.
    pub async fn wait_membership(&self, limit: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let up = self.available();
        loop {
            let mut missing = Vec::new();
            for &i in &up {
                let url = format!("{}/cluster", self.nodes[i].base);
                let alive = match self.http.get(&url).send().await {
                    Ok(r) => r
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|v| {
                            v["cluster"]["peers"].as_array().map(|ps| {
                                ps.iter()
                                    .filter(|p| p["state"] == "alive")
                                    .filter_map(|p| p["addr"].as_str().map(str::to_string))
                                    .collect::<Vec<_>>()
                            })
                        })
                        .unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
                for &j in &up {
                    let ip = &self.nodes[j].ip;
                    if j != i && !alive.iter().any(|a| a.starts_with(&format!("{ip}:"))) {
                        missing.push(format!("node {} does not see node {}", i + 1, j + 1));
                    }
                }
            }
            if missing.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                return Err(missing.join("; "));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How node `observer` sees the peer at `ip` (`alive`, `suspect`, `gone`, `left`), or `None`
    /// when it lists no such peer (or does not answer).
    pub async fn peer_state(&self, observer: usize, ip: &str) -> Option<String> {
        let url = format!("{}/cluster", self.nodes[observer].base);
        let v: serde_json::Value = self.http.get(&url).send().await.ok()?.json().await.ok()?;
        let prefix = format!("{ip}:");
        // A restarted node leaves its old row behind for a while: the freshest row counts.
        v["cluster"]["peers"]
            .as_array()?
            .iter()
            .filter(|p| p["addr"].as_str().is_some_and(|a| a.starts_with(&prefix)))
            .min_by_key(|p| p["lastHeardMsAgo"].as_u64().unwrap_or(u64::MAX))
            .and_then(|p| p["state"].as_str().map(str::to_string))
    }

    /// kill -9 node `i` and reap it.
    pub fn kill9(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if let Some(mut c) = n.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        n.state = State::Down;
        append(&n.log, "=== chaos harness: kill -9 ===");
    }

    /// SIGSTOP node `i`.
    pub fn pause(&mut self, i: usize) {
        self.signal(i, libc::SIGSTOP);
        self.nodes[i].state = State::Paused;
        append(&self.nodes[i].log, "=== chaos harness: SIGSTOP ===");
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
        if self.nodes[i].child.is_some() {
            self.nodes[i].state = State::Up;
        }
        append(&self.nodes[i].log, "=== chaos harness: SIGCONT ===");
    }

    fn signal(&self, i: usize, sig: libc::c_int) {
        if let Some(pid) = self.nodes[i].pid() {
            // SAFETY: plain kill(2) on our own child, which is not reaped yet (so the pid is
            // still ours).
            let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
            assert_eq!(
                rc,
                0,
                "kill({pid}, {sig}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Nodes that exited although the harness did not kill them: marked down, returned with
    /// their exit status.
    pub fn reap_unexpected(&mut self) -> Vec<(usize, String)> {
        let mut dead = Vec::new();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if let Some(c) = n.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    n.child = None;
                    n.state = State::Down;
                    dead.push((i, status.to_string()));
                }
            }
        }
        dead
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // SIGKILL also ends a stopped process.
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn append(path: &Path, line: &str) {
    if let Ok(mut f) = OpenOptions::new().append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

// ---------------------------------------------------------------------------------------------
// Cutting peer traffic
// ---------------------------------------------------------------------------------------------

/// iptables rules (chain INPUT, which all loopback traffic crosses) that drop every TCP packet
/// to or from one address's cluster port, tagged with `chaos-<pid>`.
pub struct Firewall {
    tag: String,
    active: Vec<Vec<String>>,
}

impl Firewall {
    /// Checks that iptables works here and removes rules left by runs that were killed.
    pub fn new() -> Result<Firewall, String> {
        let listing = iptables(&["-S", "INPUT"])?;
        for line in listing.lines() {
            let Some(rest) = line.strip_prefix("-A ") else {
                continue;
            };
            let Some(pid) = line
                .split_once("--comment chaos-")
                .and_then(|(_, t)| t.split_whitespace().next())
                .and_then(|p| p.trim_matches('"').parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let mut args = vec!["-D"];
                args.extend(rest.split_whitespace());
                if let Err(e) = iptables(&args) {
                    eprintln!("chaos: cannot remove leftover rule `{line}`: {e}");
                }
            }
        }
        Ok(Firewall {
            tag: format!("chaos-{}", std::process::id()),
            active: Vec::new(),
        })
    }

    /// Drops every TCP packet from or to `ip`'s cluster port, both directions.
    pub fn cut(&mut self, ip: &str) -> Result<(), String> {
        let port = CLUSTER_PORT.to_string();
        for (addr, port_dir) in [
            ("-s", "--dport"),
            ("-s", "--sport"),
            ("-d", "--dport"),
            ("-d", "--sport"),
        ] {
            let rule: Vec<String> = [
                "INPUT",
                "-p",
                "tcp",
                addr,
                ip,
                port_dir,
                &port,
                "-m",
                "comment",
                "--comment",
                &self.tag,
                "-j",
                "DROP",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut args = vec!["-I"];
            args.extend(rule.iter().map(String::as_str));
            iptables(&args)?;
            self.active.push(rule);
        }
        Ok(())
    }

    /// Removes every rule this firewall added.
    pub fn heal(&mut self) -> Result<(), String> {
        let mut errors = Vec::new();
        for rule in self.active.drain(..) {
            let mut args = vec!["-D"];
            args.extend(rule.iter().map(String::as_str));
            if let Err(e) = iptables(&args) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        if let Err(e) = self.heal() {
            eprintln!("chaos: removing iptables rules failed: {e}");
        }
    }
}

fn iptables(args: &[&str]) -> Result<String, String> {
    let out = Command::new("iptables")
        .args(["-w", "10"])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "iptables {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
