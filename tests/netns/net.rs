//! The network: one Linux bridge in the root namespace and N network namespaces, each joined to
//! the bridge by a veth pair, as Docker's bridge network does. Every name carries a per-process
//! tag so scenarios (and two test processes) do not collide, and [`Net`] removes everything it
//! made when dropped, also when the test panics.
//!
//! Nothing here skips: a command that fails (no root, no `ip`, no netns support) panics with the
//! command line and its stderr.

use std::os::fd::AsRawFd;
use std::process::Command;

/// Runs `ip args...`; panics naming the command and its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run `ip {}`: {e}. The netns tests need iproute2 (`ip`) and root.",
            args.join(" ")
        )
    });
    if !out.status.success() {
        panic!(
            "`ip {}` failed ({}): {}\nThe netns tests need root (CAP_NET_ADMIN and \
             CAP_SYS_ADMIN) and a kernel with network namespaces, veth and bridge support; \
             they never skip.",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

/// Runs `ip args...`, ignoring failure (cleanup of what may not exist).
fn ip_quiet(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A bridge and its namespaces. Node `i` lives in namespace `ns[i]` with `10.a.b.(i+2)/24` and
/// `fdxx:...::(i+2)/64` on its `eth0`; the bridge holds `.1` and `::1`, so the test (in the root
/// namespace) reaches every node over the bridge.
pub struct Net {
    pub bridge: String,
    pub ns: Vec<String>,
    /// The root-namespace end of each namespace's veth pair (on the bridge).
    pub host_veth: Vec<String>,
    /// `10.a.b`: the IPv4 /24 without its last octet.
    v4: String,
    /// `fd6f:fcNN:XXXX:0`: the IPv6 /64 without its interface part.
    v6: String,
}

impl Net {
    /// Builds the bridge and `count` namespaces for scenario `id` (1-99, unique per test).
    pub fn new(id: u8, count: usize) -> Net {
        let pid = std::process::id();
        let tag = format!("ofc{:03}{id:02}", pid % 1000);
        let mut net = Net {
            bridge: format!("{tag}b"),
            ns: Vec::new(),
            host_veth: Vec::new(),
            v4: format!("10.{}.{}", 100 + u32::from(id), pid % 250),
            v6: format!("fd6f:fc{id:02x}:{:x}:0", pid & 0xffff),
        };
        // Leftovers of a killed run with the same tag (pid modulo 1000): remove them first.
        for i in 0..count {
            ip_quiet(&["link", "del", &format!("{tag}v{i}")]);
            ip_quiet(&["netns", "del", &format!("{tag}n{i}")]);
        }
        ip_quiet(&["link", "del", &net.bridge]);

        // The host's firewall does not apply to traffic between the bridge's ports (a Docker
        // host's FORWARD policy DROP would otherwise cut the nodes off from each other).
        ip(&[
            "link",
            "add",
            &net.bridge,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
            "nf_call_ip6tables",
            "0",
            "nf_call_arptables",
            "0",
        ]);
        ip(&["link", "set", &net.bridge, "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.bridge_ip()),
            "dev",
            &net.bridge,
        ]);
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}::1/64", net.v6),
            "dev",
            &net.bridge,
            "nodad",
        ]);
        for i in 0..count {
            let ns = format!("{tag}n{i}");
            let veth = format!("{tag}v{i}");
            ip(&["netns", "add", &ns]);
            net.ns.push(ns.clone());
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            net.host_veth.push(veth.clone());
            ip(&["link", "set", &veth, "master", &net.bridge, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.ip(i)),
                "dev",
                "eth0",
            ]);
            // nodad: the address is usable at once (no duplicate detection, nothing else
            // on this bridge has it).
            ip(&[
                "-n",
                &ns,
                "-6",
                "addr",
                "add",
                &format!("{}/64", net.ip6(i)),
                "dev",
                "eth0",
                "nodad",
            ]);
            // As in a container: the bridge is the default gateway, which is also the route
            // IPv4 multicast takes from a node bound to 0.0.0.0.
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &net.bridge_ip(),
            ]);
        }
        net
    }

    /// The bridge's IPv4 address (the test's side).
    pub fn bridge_ip(&self) -> String {
        format!("{}.1", self.v4)
    }

    /// The IPv4 /24 of the bridge, `10.a.b.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.v4)
    }

    /// Namespace `i`'s IPv4 address.
    pub fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.v4, i + 2)
    }

    /// Namespace `i`'s IPv6 address (unique local).
    pub fn ip6(&self, i: usize) -> String {
        // Through Ipv6Addr, so it is written as the node's `/cluster` writes it (compressed).
        let raw = format!("{}::{:x}", self.v6, i + 2);
        raw.parse::<std::net::Ipv6Addr>()
            .map(|a| a.to_string())
            .unwrap_or(raw)
    }

    /// Cuts namespace `i` off the bridge: its veth's root end goes down.
    pub fn link_down(&self, i: usize) {
        ip(&["link", "set", &self.host_veth[i], "down"]);
    }

    /// Joins namespace `i` to the bridge again.
    pub fn link_up(&self, i: usize) {
        ip(&["link", "set", &self.host_veth[i], "up"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for v in &self.host_veth {
            ip_quiet(&["link", "del", v]);
        }
        for ns in &self.ns {
            if !ip_quiet(&["netns", "del", ns]) {
                eprintln!("netns: could not delete namespace {ns}");
            }
        }
        if !ip_quiet(&["link", "del", &self.bridge]) {
            eprintln!("netns: could not delete bridge {}", self.bridge);
        }
    }
}

/// Runs `f` on a new thread that has moved into network namespace `ns` (`setns` on
/// `/run/netns/<ns>`; only that thread moves), and returns its result. Sockets made by `f` stay in
/// that namespace wherever they are used later.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    let thread = std::thread::spawn(move || {
        let file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("cannot open {path} (ip netns add made it): {e}"));
        // SAFETY: setns(2) on a valid descriptor; it changes only this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            panic!(
                "setns({path}, CLONE_NEWNET) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        f()
    });
    thread
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}
