//! Hosts as Linux network namespaces on one bridge, and partitions between them.
//!
//! Layout of one [`Network`] (tag `T`, unique per test process and network):
//! - a bridge `fcbT` in the root namespace with address `10.213.S.1/24`, where `S` is a /24
//!   no interface of this machine uses yet;
//! - per host `i`: a namespace `fchaos-T-<name>`, a veth pair `fcvTi` (root side, on the bridge)
//!   and `eth0` (inside, `10.213.S.(11+i)/24`), loopback up;
//! - one root-namespace `iptables` rule accepting traffic between bridge ports (hosts with
//!   `br_netfilter` and a `FORWARD DROP` policy would drop it otherwise).
//!
//! Everything is removed on drop, and [`Network::create`] first removes what an earlier test
//! process that died without cleaning up left behind (its pid is in the tag).

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Prefix of every namespace this crate creates.
const NAMESPACE_PREFIX: &str = "fchaos-";
/// Prefix of the bridge and the root-side veth names.
const BRIDGE_PREFIX: &str = "fcb";
const VETH_PREFIX: &str = "fcv";

/// Runs a command to completion; returns its stdout, or an error naming the command with its
/// stderr.
pub fn run(program: &str, arguments: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(arguments)
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            arguments.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Fails with a clear message unless this process is root and `ip netns` and `iptables` work.
pub fn require_privileges() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "the chaos tests need root (network namespaces, veth pairs, iptables); \
             run them as root, e.g. `sudo -E cargo test -p flotilla-chaos-tests`"
        );
    }
    run("ip", &["netns", "list"]).context(
        "`ip netns` is unavailable: install iproute2 (deploy/env.sh does) on a kernel with \
         network namespaces",
    )?;
    run("iptables", &["-w", "-S", "FORWARD"])
        .context("`iptables` is unavailable: install iptables (deploy/env.sh does)")?;
    Ok(())
}

/// One host: a network namespace with one address on the bridge.
#[derive(Clone, Debug)]
pub struct Host {
    /// Short name within the network, e.g. `voter1`.
    pub name: String,
    /// The namespace's name, for `ip netns exec`.
    pub namespace: String,
    /// The host's address.
    pub address: Ipv4Addr,
}

impl Host {
    /// Drops every packet on the host's `eth0`, both directions (loopback still works).
    ///
    /// # Errors
    /// When `iptables` fails inside the namespace.
    pub fn isolate(&self) -> Result<()> {
        for rule in [["-A", "INPUT", "-i"], ["-A", "OUTPUT", "-o"]] {
            self.iptables(&[rule[0], rule[1], rule[2], "eth0", "-j", "DROP"])?;
        }
        Ok(())
    }

    /// Removes the rules of [`Host::isolate`].
    ///
    /// # Errors
    /// When `iptables` fails inside the namespace (e.g. the host was not isolated).
    pub fn heal(&self) -> Result<()> {
        for rule in [["-D", "INPUT", "-i"], ["-D", "OUTPUT", "-o"]] {
            self.iptables(&[rule[0], rule[1], rule[2], "eth0", "-j", "DROP"])?;
        }
        Ok(())
    }

    fn iptables(&self, arguments: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.namespace, "iptables", "-w"];
        all.extend_from_slice(arguments);
        run("ip", &all)
    }
}

/// A bridge with hosts in their own network namespaces; removed on drop.
#[derive(Debug)]
pub struct Network {
    tag: String,
    bridge: String,
    /// The bridge's address in the root namespace (where the test runs).
    pub gateway: Ipv4Addr,
    /// The hosts, in creation order.
    pub hosts: Vec<Host>,
    forward_rule: bool,
}

impl Network {
    /// Creates the bridge and one namespace per name in `host_names` (at most 9).
    ///
    /// # Errors
    /// When a command fails; what was created so far is removed again.
    pub fn create(host_names: &[&str]) -> Result<Network> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        anyhow::ensure!(host_names.len() <= 9, "at most 9 hosts per network");
        require_privileges()?;
        remove_stale();
        let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}x{sequence}", std::process::id());
        let subnet = free_subnet(sequence)?;
        let mut network = Network {
            bridge: format!("{BRIDGE_PREFIX}{tag}"),
            tag,
            gateway: Ipv4Addr::new(10, 213, subnet, 1),
            hosts: Vec::new(),
            forward_rule: false,
        };
        // On error, `network` is dropped here and removes what exists.
        network.build(subnet, host_names)?;
        Ok(network)
    }

    fn build(&mut self, subnet: u8, host_names: &[&str]) -> Result<()> {
        let bridge = self.bridge.clone();
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        run("ip", &["link", "set", &bridge, "up"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.gateway),
                "dev",
                &bridge,
            ],
        )?;
        run(
            "iptables",
            &[
                "-w", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
            ],
        )?;
        self.forward_rule = true;
        for (index, name) in host_names.iter().enumerate() {
            let namespace = format!("{NAMESPACE_PREFIX}{}-{name}", self.tag);
            let address = Ipv4Addr::new(10, 213, subnet, 11 + index as u8);
            run("ip", &["netns", "add", &namespace])?;
            self.hosts.push(Host {
                name: name.to_string(),
                namespace: namespace.clone(),
                address,
            });
            let outside = format!("{VETH_PREFIX}{}{index}", self.tag);
            let inside = format!("fci{}{index}", self.tag);
            run(
                "ip",
                &[
                    "link", "add", &outside, "type", "veth", "peer", "name", &inside,
                ],
            )?;
            run("ip", &["link", "set", &inside, "netns", &namespace])?;
            run("ip", &["link", "set", &outside, "master", &bridge, "up"])?;
            let ns = ["-n", namespace.as_str()];
            run("ip", &[&ns[..], &["link", "set", "lo", "up"]].concat())?;
            run(
                "ip",
                &[&ns[..], &["link", "set", &inside, "name", "eth0"]].concat(),
            )?;
            run(
                "ip",
                &[
                    &ns[..],
                    &["addr", "add", &format!("{address}/24"), "dev", "eth0"],
                ]
                .concat(),
            )?;
            run("ip", &[&ns[..], &["link", "set", "eth0", "up"]].concat())?;
        }
        Ok(())
    }

    /// The host named `name`.
    ///
    /// # Panics
    /// When there is no such host (a bug in the test).
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            remove_namespace(&host.namespace);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
        if self.forward_rule {
            let _ = run(
                "iptables",
                &[
                    "-w",
                    "-D",
                    "FORWARD",
                    "-i",
                    &self.bridge,
                    "-o",
                    &self.bridge,
                    "-j",
                    "ACCEPT",
                ],
            );
        }
    }
}

/// Kills what still runs in a namespace, then deletes it (its veth pair goes with it).
fn remove_namespace(namespace: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", namespace]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGCONT);
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    if let Err(error) = run("ip", &["netns", "del", namespace]) {
        eprintln!("chaos: cannot delete namespace {namespace}: {error:#}");
    }
}

/// Whether the test process that made `tag` (`<pid hex>x<n>`) is gone.
fn tag_is_stale(tag: &str) -> bool {
    let Some(pid) = tag
        .split('x')
        .next()
        .and_then(|p| u32::from_str_radix(p, 16).ok())
    else {
        return false;
    };
    pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces, bridges and FORWARD rules left by test processes that died.
fn remove_stale() {
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for namespace in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if let Some(rest) = namespace.strip_prefix(NAMESPACE_PREFIX)
                && tag_is_stale(rest.split('-').next().unwrap_or(""))
            {
                eprintln!("chaos: removing stale namespace {namespace}");
                remove_namespace(namespace);
            }
        }
    }
    if let Ok(links) = run("ip", &["-o", "link", "show", "type", "bridge"]) {
        for link in links.lines().filter_map(|l| l.split(':').nth(1)) {
            let link = link.trim();
            if let Some(tag) = link.strip_prefix(BRIDGE_PREFIX)
                && tag_is_stale(tag)
            {
                eprintln!("chaos: removing stale bridge {link}");
                let _ = run("ip", &["link", "del", link]);
            }
        }
    }
    if let Ok(rules) = run("iptables", &["-w", "-S", "FORWARD"]) {
        for rule in rules.lines() {
            let words: Vec<&str> = rule.split_whitespace().collect();
            let stale = words.windows(2).any(|w| {
                w[0] == "-i" && w[1].strip_prefix(BRIDGE_PREFIX).is_some_and(tag_is_stale)
            });
            if stale && words.first() == Some(&"-A") {
                let mut arguments = vec!["-w", "-D"];
                arguments.extend_from_slice(&words[1..]);
                eprintln!("chaos: removing stale rule {rule}");
                let _ = run("iptables", &arguments);
            }
        }
    }
}

/// A third octet for 10.213.S.0/24 that no interface uses.
fn free_subnet(sequence: u32) -> Result<u8> {
    let used = run("ip", &["-o", "-4", "addr", "show"])?;
    let start = (std::process::id().wrapping_mul(7) + sequence.wrapping_mul(13)) % 250;
    for offset in 0..250 {
        let octet = ((start + offset) % 250 + 2) as u8;
        if !used.contains(&format!(" 10.213.{octet}.")) {
            return Ok(octet);
        }
    }
    bail!("no free /24 in 10.213.0.0/16")
}
