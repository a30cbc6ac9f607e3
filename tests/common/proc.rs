//! The real `openfhir-cache` binary as a child process: a cleared environment (only `PATH` plus
//! what the test sets), an empty working directory, stdout and stderr captured into files, and
//! a guard that kills the process when the test ends or panics.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_openfhir-cache");

/// The binary with `args`, a cleared environment plus `env`, run in `dir`.
pub fn command<K: AsRef<str>, V: AsRef<str>>(dir: &Path, args: &[&str], env: &[(K, V)]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_ref(), v.as_ref())))
        .current_dir(dir)
        .stdin(Stdio::null());
    c
}

/// A TCP port of 127.0.0.1 nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A TCP port of `ip` nothing listens on (bound, then released).
pub fn free_port_on(ip: &str) -> u16 {
    let l = TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// An HTTP client with a 5 s limit per request.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// A running child process, killed (and reaped) when dropped, also when the test panics.
pub struct ChildGuard {
    child: Child,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
}

impl ChildGuard {
    /// Starts `command` with stdout and stderr captured into `dir/name.stdout` and
    /// `dir/name.stderr` (files, so stderr is not a terminal).
    pub fn spawn(mut command: Command, dir: &Path, name: &str) -> ChildGuard {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stdout_path = dir.join(format!("{name}.stdout"));
        let out = File::create(&stdout_path).unwrap();
        let err = File::create(&stderr_path).unwrap();
        let child = command
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("the binary starts");
        ChildGuard {
            child,
            stderr_path,
            stdout_path,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Panics (with its stderr) if the process has already exited.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.child.try_wait().unwrap() {
            panic!("the process exited early ({s}):\n{}", self.stderr());
        }
    }

    /// Waits (bounded) until the process handles SIGTERM, then sends it.
    pub async fn sigterm(&mut self) {
        let pid = self.pid();
        for _ in 0..200 {
            if catches_sigterm(pid) {
                break;
            }
            self.assert_running();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            catches_sigterm(pid),
            "no SIGTERM handler installed:\n{}",
            self.stderr()
        );
        let kill = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(kill.success(), "kill -TERM {pid} failed");
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True once the process has a handler installed for SIGTERM (Linux: `SigCgt` in
/// `/proc/PID/status`), so a SIGTERM will be handled, not fatal.
pub fn catches_sigterm(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
}

/// Starts `serve` with exactly `env` (which must set `OPENFHIR_HTTP_ADDR` to `addr`) and waits
/// (up to 20 s) until `GET http://addr/health/live` answers 200; returns the guard and the base
/// URL.
pub async fn start_serve<K: AsRef<str>, V: AsRef<str>>(
    dir: &Path,
    name: &str,
    addr: &str,
    env: &[(K, V)],
) -> (ChildGuard, String) {
    let guard = ChildGuard::spawn(command(dir, &["serve"], env), dir, name);
    wait_live(guard, format!("http://{addr}")).await
}

/// Waits (up to 20 s) until `GET {base}/health/live` answers 200, panicking with the process's
/// stderr if it exits first or never answers.
pub async fn wait_live(mut guard: ChildGuard, base: String) -> (ChildGuard, String) {
    let client = http();
    for _ in 0..200 {
        guard.assert_running();
        if let Ok(r) = client.get(format!("{base}/health/live")).send().await {
            if r.status() == 200 {
                return (guard, base);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{base}/health/live never answered:\n{}", guard.stderr());
}
