//! The single-node test topology, built on the real kernel:
//!
//! ```text
//!  client ns                node ns (agent: TC ingress on ext0, lxc*)          pod ns (x N)
//!  eth0 192.0.2.2/24 ── ext0 192.0.2.1/24        lxcI ───────────────────── eth0 10.244.0.(10+I)/32
//!  routes: 10.96.0.0/12, 10.244.0.0/16            route 10.244.0.(10+I)/32 dev lxcI   route 192.0.2.0/24 via 169.254.1.1
//!          via 192.0.2.1 (no default route)       ip_forward=1
//! ```
//! Pods are joined by veth pairs with /32 routes and static neighbours (no
//! ARP on the pod links). Everything — namespaces, pins, files, the agent
//! process — is removed on drop, also when a test panics.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use proxy_agent::pins::Pins;

use crate::{
    agent::{Agent, AgentArgs, AgentSource},
    cgroup::TestCgroup,
    netns::{Netns, unique_name},
    servers::Server,
};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const POD_CIDR: &str = "10.244.0.0/16";
/// IPv6 (after [`Sandbox::enable_ipv6`]): the client/node link, the
/// Service and pod ranges.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc, 0, 0, 0, 0, 0, 2);
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc, 0, 0, 0, 0, 0, 1);
pub const SERVICE_CIDR6: &str = "fd00:96::/112";
pub const POD_CIDR6: &str = "fd00:244::/64";
/// The other node of [`Sandbox::add_remote_node6`]: the node's device
/// towards it, both ends of that link, and the one pod it hosts (in its
/// pod range, routed via its link address).
pub const REMOTE_DEVICE: &str = "ext1";
pub const NODE_LINK_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xd, 0, 0, 0, 0, 0, 1);
pub const REMOTE_LINK_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xd, 0, 0, 0, 0, 0, 2);
pub const REMOTE_POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x245, 0, 0, 0, 0, 0, 0x10);
pub const REMOTE_POD_CIDR6: &str = "fd00:245::/64";

/// The `--devices` value for the node.
pub const DEVICES: &str = "ext0,lxc*";

pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
}

pub struct Sandbox {
    pub id: String,
    pub agent: Option<Agent>,
    pub servers: Vec<Server>,
    /// Server processes (demo), killed on drop unless kept.
    pub server_procs: Vec<std::process::Child>,
    pub client: Netns,
    pub node: Netns,
    pub pods: Vec<Pod>,
    pub bpffs: PathBuf,
    pub workdir: PathBuf,
    pub manifests: PathBuf,
    /// The node's cgroup for the socket programs (`--cgroup`): node-local
    /// clients ([`Self::node_client`]) run in it.
    pub cgroup: TestCgroup,
    keep: bool,
    ipv6: bool,
    /// The other node's namespace ([`Self::add_remote_node6`]).
    remote: Option<Netns>,
}

#[must_use]
pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 10 + u8::try_from(i).expect("few pods"))
}

/// Pod `i`'s IPv6 address (after [`Sandbox::enable_ipv6`]).
#[must_use]
pub fn pod_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x10 + u16::try_from(i).expect("few pods"))
}

impl Sandbox {
    /// Builds the client, the node and `pods` pod namespaces named
    /// `pod1..podN`. `prefix` keeps names apart between tests.
    #[must_use] 
    pub fn new(prefix: &str, pods: usize) -> Self {
        crate::netns::require_root();
        let id = unique_name(prefix);
        let workdir = std::env::temp_dir().join(format!("proxy-{id}"));
        let manifests = workdir.join("manifests");
        std::fs::create_dir_all(&manifests).expect("create manifests dir");
        let client = Netns::create(&format!("{id}c"));
        let node = Netns::create(&format!("{id}n"));
        let mut sb = Self {
            bpffs: PathBuf::from(format!("/sys/fs/bpf/proxy-sandbox-{id}")),
            id: id.clone(),
            agent: None,
            servers: Vec::new(),
            server_procs: Vec::new(),
            client,
            node,
            pods: Vec::new(),
            workdir,
            manifests,
            cgroup: TestCgroup::create(&id),
            keep: false,
            ipv6: false,
            remote: None,
        };
        let (c, n) = (&sb.client, &sb.node);
        c.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "ext0", "netns", n.name()]);
        c.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]);
        c.ip(&["link", "set", "eth0", "up"]);
        n.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "ext0"]);
        n.ip(&["link", "set", "ext0", "up"]);
        for cidr in [SERVICE_CIDR, POD_CIDR] {
            c.ip(&["route", "add", cidr, "via", &NODE_IP.to_string()]);
        }
        n.sysctl("net.ipv4.ip_forward", "1");
        for i in 1..=pods {
            sb.add_pod(i);
        }
        sb
    }

    /// Adds pod `i` (namespace, veth `lxcI` on the node, routes).
    pub fn add_pod(&mut self, i: usize) {
        let name = format!("pod{i}");
        let ns = Netns::create(&format!("{}p{i}", self.id));
        let ip = pod_ip(i);
        let pod_mac = format!("02:00:00:00:01:{i:02x}");
        let node_mac = format!("02:00:00:00:02:{i:02x}");
        let lxc = format!("lxc{i}");
        ns.ip(&["link", "add", "eth0", "address", &pod_mac, "type", "veth", "peer", "name", &lxc, "address", &node_mac, "netns", self.node.name()]);
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
        ns.ip(&["route", "add", "192.0.2.0/24", "via", "169.254.1.1", "dev", "eth0"]);
        ns.ip(&["neigh", "add", "169.254.1.1", "lladdr", &node_mac, "dev", "eth0"]);
        self.node.ip(&["link", "set", &lxc, "up"]);
        self.node.ip(&["route", "add", &format!("{ip}/32"), "dev", &lxc]);
        self.node.ip(&["neigh", "add", &ip.to_string(), "lladdr", &pod_mac, "dev", &lxc]);
        self.pods.push(Pod { name, ns, ip });
        if self.ipv6 {
            self.pod_ipv6(i);
        }
    }

    /// Dual-stack from now on: IPv6 on the client/node link (`CLIENT_IP6`,
    /// `NODE_IP6`, routes to `SERVICE_CIDR6` and `POD_CIDR6` via the node,
    /// no default route) and on every pod (`pod_ip6`), with static
    /// neighbours as the IPv4 side has (no DAD, no router discovery).
    pub fn enable_ipv6(&mut self) {
        if std::mem::replace(&mut self.ipv6, true) {
            return;
        }
        let (c, n) = (&self.client, &self.node);
        c.ip(&["-6", "addr", "add", &format!("{CLIENT_IP6}/64"), "dev", "eth0", "nodad"]);
        n.ip(&["-6", "addr", "add", &format!("{NODE_IP6}/64"), "dev", "ext0", "nodad"]);
        for cidr in [SERVICE_CIDR6, POD_CIDR6] {
            c.ip(&["-6", "route", "add", cidr, "via", &NODE_IP6.to_string()]);
        }
        n.sysctl("net.ipv6.conf.all.forwarding", "1");
        for i in 1..=self.pods.len() {
            self.pod_ipv6(i);
        }
    }

    fn pod_ipv6(&self, i: usize) {
        let p = &self.pods[i - 1];
        let ip = pod_ip6(i);
        let (pod_mac, node_mac, lxc) = (format!("02:00:00:00:01:{i:02x}"), format!("02:00:00:00:02:{i:02x}"), format!("lxc{i}"));
        p.ns.ip(&["-6", "addr", "add", &format!("{ip}/128"), "dev", "eth0", "nodad"]);
        p.ns.ip(&["-6", "neigh", "add", "fe80::1", "lladdr", &node_mac, "dev", "eth0"]);
        p.ns.ip(&["-6", "route", "add", "fd00:c::/64", "via", "fe80::1", "dev", "eth0"]);
        self.node.ip(&["-6", "route", "add", &format!("{ip}/128"), "dev", &lxc]);
        self.node.ip(&["-6", "neigh", "add", &ip.to_string(), "lladdr", &pod_mac, "dev", &lxc]);
    }

    /// Another node, over IPv6 only: a namespace joined to the node by a
    /// veth ([`REMOTE_DEVICE`] on the node, `NODE_LINK_IP6` ↔
    /// `REMOTE_LINK_IP6`, static neighbours), hosting one pod address
    /// (`REMOTE_POD_IP6`, in `REMOTE_POD_CIDR6`, which the node routes via
    /// the link). It routes the client/node link back via the node; no
    /// default route. What it serves is the caller's (servers in the
    /// returned namespace). Removed with the sandbox.
    pub fn add_remote_node6(&mut self) -> &Netns {
        assert!(self.remote.is_none(), "one remote node");
        let r = Netns::create(&format!("{}r", self.id));
        let (node_mac, remote_mac) = ("02:00:00:00:03:01", "02:00:00:00:03:02");
        r.ip(&["link", "add", "eth0", "address", remote_mac, "type", "veth", "peer", "name", REMOTE_DEVICE, "address", node_mac, "netns", self.node.name()]);
        r.ip(&["-6", "addr", "add", &format!("{REMOTE_LINK_IP6}/64"), "dev", "eth0", "nodad"]);
        r.ip(&["-6", "addr", "add", &format!("{REMOTE_POD_IP6}/128"), "dev", "eth0", "nodad"]);
        r.ip(&["link", "set", "eth0", "up"]);
        r.ip(&["-6", "neigh", "add", &NODE_LINK_IP6.to_string(), "lladdr", node_mac, "dev", "eth0"]);
        r.ip(&["-6", "route", "add", "fd00:c::/64", "via", &NODE_LINK_IP6.to_string(), "dev", "eth0"]);
        let n = &self.node;
        n.ip(&["-6", "addr", "add", &format!("{NODE_LINK_IP6}/64"), "dev", REMOTE_DEVICE, "nodad"]);
        n.ip(&["link", "set", REMOTE_DEVICE, "up"]);
        n.ip(&["-6", "neigh", "add", &REMOTE_LINK_IP6.to_string(), "lladdr", remote_mac, "dev", REMOTE_DEVICE]);
        n.ip(&["-6", "route", "add", REMOTE_POD_CIDR6, "via", &REMOTE_LINK_IP6.to_string(), "dev", REMOTE_DEVICE]);
        n.sysctl("net.ipv6.conf.all.forwarding", "1");
        self.remote.insert(r)
    }

    /// HTTP on `[::]:port` in every pod (both families), each answering
    /// with its pod name.
    pub fn serve_http_dual(&mut self, port: u16) {
        for p in &self.pods {
            self.servers.push(crate::servers::http_server_dual(&p.ns, port, &p.name));
        }
    }

    /// UDP echo on `[::]:port` in every pod (both families).
    pub fn serve_udp_dual(&mut self, port: u16) {
        for p in &self.pods {
            let prefix = format!("{}:", p.name);
            self.servers.push(crate::servers::udp_echo_with(&p.ns, std::net::SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), move |_, payload| {
                let mut reply = prefix.clone().into_bytes();
                reply.extend_from_slice(payload);
                reply
            }));
        }
    }

    /// HTTP on `port` in every pod, each answering with its pod name.
    pub fn serve_http(&mut self, port: u16) {
        for p in &self.pods {
            self.servers.push(crate::servers::http_server(&p.ns, port, &p.name));
        }
    }

    /// UDP echo on `port` in every pod.
    pub fn serve_udp(&mut self, port: u16) {
        for p in &self.pods {
            self.servers.push(crate::servers::udp_echo(&p.ns, port, &p.name));
        }
    }

    /// HTTP on `port` in every pod as separate processes: `bin ARGS... NAME
    /// PORT` run with nsenter in the pod's namespace.
    pub fn serve_http_processes(&mut self, bin: &Path, args: &[&str], port: u16) {
        for p in &self.pods {
            let child = std::process::Command::new("nsenter")
                .arg(format!("--net={}", p.ns.path()))
                .arg(bin)
                .args(args)
                .arg(&p.name)
                .arg(port.to_string())
                .stdin(std::process::Stdio::null())
                .spawn()
                .expect("spawn pod server");
            self.server_procs.push(child);
        }
    }

    #[must_use] 
    pub fn agent_log_path(&self) -> PathBuf {
        self.workdir.join("agent.log")
    }

    /// Starts the agent (`bin`) in the node namespace, reading the
    /// sandbox's manifests directory.
    pub fn start_agent(&mut self, bin: &Path) {
        let manifests = self.manifests.clone();
        self.start_agent_from(bin, AgentSource::Manifests(&manifests), None);
    }

    /// Starts the agent (`bin`) in the node namespace with `source`, as
    /// node `node_name` when given.
    pub fn start_agent_from(&mut self, bin: &Path, source: AgentSource<'_>, node_name: Option<&str>) {
        self.start_agent_full(bin, source, node_name, &[]);
    }

    /// [`Self::start_agent`] with more `run` flags.
    pub fn start_agent_with(&mut self, bin: &Path, extra: &[&str]) {
        let manifests = self.manifests.clone();
        self.start_agent_full(bin, AgentSource::Manifests(&manifests), None, extra);
    }

    fn start_agent_full(&mut self, bin: &Path, source: AgentSource<'_>, node_name: Option<&str>, extra: &[&str]) {
        self.start_agent_on(bin, source, DEVICES, node_name, extra);
    }

    /// Starts the agent with `--devices devices` (e.g. [`DEVICES`] plus
    /// [`REMOTE_DEVICE`]), as node `node_name` when given, with more `run`
    /// flags.
    pub fn start_agent_on(&mut self, bin: &Path, source: AgentSource<'_>, devices: &str, node_name: Option<&str>, extra: &[&str]) {
        assert!(self.agent.is_none(), "agent already running");
        let log = self.agent_log_path();
        self.agent = Some(Agent::start(&AgentArgs {
            bin,
            netns: self.node.name(),
            bpffs: &self.bpffs,
            source,
            devices,
            node_name,
            cgroup: Some(self.cgroup.path()),
            extra,
            log: &log,
        }));
    }

    /// Runs a node-local client process (`bin args...`) in `ns` inside the
    /// node's cgroup (so the socket programs see it) and returns its
    /// stdout lines; bounded by the client's own timeouts.
    #[must_use]
    pub fn cgroup_client(&self, ns: &Netns, bin: &Path, args: &[&str]) -> Vec<String> {
        let out = self.cgroup.command(ns, bin, args).output().expect("run a client in the cgroup");
        assert!(out.status.success(), "{} {args:?} failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
    }

    /// The datapath counters (`proxy-agent stats -o json`) by reason.
    #[must_use]
    pub fn counters(&self, bin: &Path) -> std::collections::BTreeMap<String, u64> {
        crate::agent::counters(bin, &self.bpffs)
    }

    /// GET `path` on the node's loopback port `port` (the agent's health
    /// and metrics servers): status and body; status 0 if nothing answers.
    #[must_use]
    pub fn node_http(&self, port: u16, path: &str) -> (u16, String) {
        use std::io::{Read as _, Write as _};
        let path = path.to_owned();
        self.node.run(move || {
            let t = std::time::Duration::from_secs(2);
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&std::net::SocketAddr::from(([127, 0, 0, 1], port)), t) else {
                return (0, String::new());
            };
            let _ = s.set_read_timeout(Some(t));
            let mut out = String::new();
            if write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() || s.read_to_string(&mut out).is_err() {
                return (0, String::new());
            }
            let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            (status, body)
        })
    }

    /// SIGKILLs the agent; programs and maps stay pinned.
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    #[must_use]
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.agent_log_path()).unwrap_or_default()
    }

    /// Leaves everything in place when dropped (`cargo xtask demo --keep`).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.keep {
            if let Some(a) = self.agent.take() {
                std::mem::forget(a);
            }
            std::mem::forget(std::mem::take(&mut self.servers));
            std::mem::forget(std::mem::take(&mut self.server_procs));
            for p in self.pods.drain(..) {
                std::mem::forget(p);
            }
            // Keep the namespaces: forget their guards.
            let client = std::mem::replace(&mut self.client, Netns::detached());
            let node = std::mem::replace(&mut self.node, Netns::detached());
            std::mem::forget(client);
            std::mem::forget(node);
            // The agent's socket programs stay attached to it.
            if let Some(r) = self.remote.take() {
                std::mem::forget(r);
            }
            let cgroup = std::mem::replace(&mut self.cgroup, TestCgroup::detached());
            std::mem::forget(cgroup);
            return;
        }
        self.kill_agent();
        self.servers.clear();
        for mut c in self.server_procs.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = proxy_agent::datapath::cleanup(&Pins::new(&self.bpffs));
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}
