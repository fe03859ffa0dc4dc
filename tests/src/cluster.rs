//! The two-node test topology for north-south traffic, built on the real
//! kernel:
//!
//! ```text
//!  client ns                        node A ns (node-a)                       pod ns (x N)
//!  eth0 198.51.100.2/24 ───── ext0 198.51.100.1/24 + 198.51.100.10/24   lxcI ── eth0 10.244.1.(10+I)/32
//!  routes (no default):            nodelink 10.0.0.1/30                   routes via 169.254.1.1
//!   203.0.113.0/24 via .100.1        │  10.244.2.0/24, 198.51.101.0/24 via 10.0.0.2
//!   10.244.0.0/16  via .100.1        │
//!                                    │                                    pod ns (x M)
//!  eth1 198.51.101.2/24 ───── ext0 198.51.101.1/24   node B ns (node-b)   lxcI ── eth0 10.244.2.(10+I)/32
//!                                  nodelink 10.0.0.2/30
//!                                    10.244.1.0/24, 198.51.100.0/24 via 10.0.0.1
//! ```
//!
//! Both nodes forward (`ip_forward=1`). Pods are joined like in
//! [`crate::sandbox`]: veth pairs, /32 routes on the node, static
//! neighbours and the link-local gateway 169.254.1.1 in the pod, which has
//! routes to the client legs, the node link, the pod and the service ranges
//! (no default route). The client reaches node B's pods only through node A
//! (its one route to 10.244.0.0/16), and node B itself on its own leg.
//!
//! Each node has its own bpffs directory; both agents read one shared
//! manifests directory. Everything — namespaces, pins, files, agents,
//! servers — is removed on drop, also when a test panics.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
};

use proxy_agent::pins::Pins;

use crate::{
    agent::{Agent, AgentArgs, AgentSource},
    cgroup::TestCgroup,
    netns::{Netns, unique_name},
    servers::Server,
};

/// The client's address on its leg to node A (`eth0`).
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The client's address on its leg to node B (`eth1`).
pub const CLIENT_IP_B: Ipv4Addr = Ipv4Addr::new(198, 51, 101, 2);
/// Node A's external (primary) address on `ext0`: where its `NodePort`s are reached.
pub const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Node A's second address on `ext0` (for `--nodeport-addresses` narrowing).
pub const NODE_A_IP2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// Node B's external (primary) address on `ext0`.
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 101, 1);
/// Node A's address on `nodelink`.
pub const NODE_A_LINK_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// Node B's address on `nodelink`.
pub const NODE_B_LINK_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The link between the nodes.
pub const NODE_LINK_CIDR: &str = "10.0.0.0/30";
/// The client leg of node A.
pub const EXT_A_CIDR: &str = "198.51.100.0/24";
/// The client leg of node B.
pub const EXT_B_CIDR: &str = "198.51.101.0/24";
/// Addresses for externalIPs and load-balancer IPs; the client routes them to node A.
pub const EXTERNAL_CIDR: &str = "203.0.113.0/24";
/// Two examples out of [`EXTERNAL_CIDR`].
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// All pods (both nodes).
pub const POD_CIDR: &str = "10.244.0.0/16";
pub const POD_CIDR_A: &str = "10.244.1.0/24";
pub const POD_CIDR_B: &str = "10.244.2.0/24";
/// The `--devices` value for both nodes.
pub const DEVICES: &str = "ext0,nodelink,lxc*";
/// The pods' gateway (static neighbour, never on the wire).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// IPv6 ([`Cluster::enable_ipv6`]): the client's address on its leg to node A.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 2);
/// The client's IPv6 address on its leg to node B.
pub const CLIENT_IP6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x101, 0, 0, 0, 0, 2);
/// Node A's primary IPv6 address on `ext0`.
pub const NODE_A_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
/// Node A's second IPv6 address on `ext0`.
pub const NODE_A_IP6_2: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
/// Node B's primary IPv6 address on `ext0`.
pub const NODE_B_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x101, 0, 0, 0, 0, 1);
/// Node A's IPv6 address on `nodelink`.
pub const NODE_A_LINK_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
/// Node B's IPv6 address on `nodelink`.
pub const NODE_B_LINK_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2);
pub const EXT_A_CIDR6: &str = "2001:db8:100::/64";
pub const EXT_B_CIDR6: &str = "2001:db8:101::/64";
/// IPv6 externalIPs and load-balancer IPs; the client routes them to node A.
pub const EXTERNAL_CIDR6: &str = "2001:db8:113::/64";
pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x10);
pub const LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x20);
pub const SERVICE_CIDR6: &str = "fd00:96::/112";
/// All pods' IPv6 addresses (both nodes).
pub const POD_CIDR6: &str = "fd00:244::/48";
/// The pods' IPv6 gateway (static neighbour, never on the wire).
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Which node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeId {
    A,
    B,
}

impl NodeId {
    /// The node name (`--node-name`, `nodeName` of endpoints): `node-a` / `node-b`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::A => "node-a",
            Self::B => "node-b",
        }
    }

    /// Primary address on `ext0`.
    #[must_use]
    pub fn external_ip(self) -> Ipv4Addr {
        match self {
            Self::A => NODE_A_IP,
            Self::B => NODE_B_IP,
        }
    }

    /// Address on `nodelink`.
    #[must_use]
    pub fn link_ip(self) -> Ipv4Addr {
        match self {
            Self::A => NODE_A_LINK_IP,
            Self::B => NODE_B_LINK_IP,
        }
    }

    /// The client's address on its leg to this node.
    #[must_use]
    pub fn client_ip(self) -> Ipv4Addr {
        match self {
            Self::A => CLIENT_IP,
            Self::B => CLIENT_IP_B,
        }
    }

    /// This node's pod range.
    #[must_use]
    pub fn pod_cidr(self) -> &'static str {
        match self {
            Self::A => POD_CIDR_A,
            Self::B => POD_CIDR_B,
        }
    }

    /// The address of pod `i` (1-based) on this node: 10.244.1.(10+i) / 10.244.2.(10+i).
    #[must_use]
    pub fn pod_ip(self, i: usize) -> Ipv4Addr {
        let third = match self {
            Self::A => 1,
            Self::B => 2,
        };
        Ipv4Addr::new(10, 244, third, 10 + u8::try_from(i).expect("few pods"))
    }

    /// Primary IPv6 address on `ext0`.
    #[must_use]
    pub fn external_ip6(self) -> Ipv6Addr {
        match self {
            Self::A => NODE_A_IP6,
            Self::B => NODE_B_IP6,
        }
    }

    /// IPv6 address on `nodelink`.
    #[must_use]
    pub fn link_ip6(self) -> Ipv6Addr {
        match self {
            Self::A => NODE_A_LINK_IP6,
            Self::B => NODE_B_LINK_IP6,
        }
    }

    /// This node's IPv6 pod range: fd00:244:0:1::/64 / fd00:244:0:2::/64.
    #[must_use]
    pub fn pod_cidr6(self) -> &'static str {
        match self {
            Self::A => "fd00:244:0:1::/64",
            Self::B => "fd00:244:0:2::/64",
        }
    }

    /// The IPv6 address of pod `i` (1-based) on this node:
    /// fd00:244:0:1::(10+i) / fd00:244:0:2::(10+i) (hex).
    #[must_use]
    pub fn pod_ip6(self, i: usize) -> Ipv6Addr {
        let subnet = match self {
            Self::A => 1,
            Self::B => 2,
        };
        Ipv6Addr::new(0xfd00, 0x244, 0, subnet, 0, 0, 0, 0x10 + u16::try_from(i).expect("few pods"))
    }

    fn letter(self) -> char {
        match self {
            Self::A => 'a',
            Self::B => 'b',
        }
    }

    fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }
}

/// Pod `i` (1-based) on node A.
#[must_use]
pub fn pod_ip_a(i: usize) -> Ipv4Addr {
    NodeId::A.pod_ip(i)
}

/// Pod `i` (1-based) on node B.
#[must_use]
pub fn pod_ip_b(i: usize) -> Ipv4Addr {
    NodeId::B.pod_ip(i)
}

/// IPv6 address of pod `i` (1-based) on node A.
#[must_use]
pub fn pod_ip6_a(i: usize) -> Ipv6Addr {
    NodeId::A.pod_ip6(i)
}

/// IPv6 address of pod `i` (1-based) on node B.
#[must_use]
pub fn pod_ip6_b(i: usize) -> Ipv6Addr {
    NodeId::B.pod_ip6(i)
}

/// A pod: its namespace, address and the node side of its veth.
pub struct Pod {
    /// `pod-a1`, `pod-b2`, … (what the servers answer with).
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub node: NodeId,
    /// The veth on the node (`lxcI`).
    pub veth: String,
}

/// One node: its namespace, pods, bpffs directory and agent.
pub struct Node {
    pub id: NodeId,
    pub ns: Netns,
    pub pods: Vec<Pod>,
    /// Where this node's agent pins (`/sys/fs/bpf/proxy-cluster-<id>-a|b`).
    pub bpffs: PathBuf,
    /// This node's cgroup for the socket programs (`--cgroup`): node-local
    /// client processes started in it are this node's.
    pub cgroup: TestCgroup,
    pub agent: Option<Agent>,
    log: PathBuf,
}

impl Node {
    /// `node-a` / `node-b`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.id.name()
    }

    #[must_use]
    pub fn external_ip(&self) -> Ipv4Addr {
        self.id.external_ip()
    }

    #[must_use]
    pub fn link_ip(&self) -> Ipv4Addr {
        self.id.link_ip()
    }

    #[must_use]
    pub fn agent_log_path(&self) -> &Path {
        &self.log
    }

    /// Everything this node's agents wrote so far (all runs, appended).
    #[must_use]
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Packets counted under exit reason `reason` (`proxy-agent stats`
    /// names, e.g. `xdp_forward`) in this node's datapath so far, read with
    /// `proxy-agent stats -o json`.
    #[must_use]
    pub fn stat(&self, reason: &str) -> u64 {
        let all = self.counters(&crate::agent::agent_bin());
        all.get(reason).copied().unwrap_or_else(|| panic!("no {reason} in {all:?}"))
    }

    /// Every exit-reason counter (name → packets) of this node's datapath,
    /// read with `bin stats -o json`.
    #[must_use]
    pub fn counters(&self, bin: &Path) -> std::collections::BTreeMap<String, u64> {
        crate::agent::counters(bin, &self.bpffs)
    }

    /// SIGKILLs the agent; programs and maps stay pinned.
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    /// Starts `bin` in this node's namespace with `--manifests manifests
    /// --devices DEVICES --node-name <name>` and `extra` appended.
    fn start_agent(&mut self, bin: &Path, manifests: &Path, extra: &[&str]) {
        assert!(self.agent.is_none(), "agent already running on {}", self.name());
        self.agent = Some(Agent::start(&AgentArgs {
            bin,
            netns: self.ns.name(),
            bpffs: &self.bpffs,
            source: AgentSource::Manifests(manifests),
            devices: DEVICES,
            node_name: Some(self.name()),
            cgroup: Some(self.cgroup.path()),
            extra,
            log: &self.log,
        }));
    }

    fn add_pod(&mut self, id: &str, i: usize) {
        let n = self.id;
        let name = format!("pod-{}{i}", n.letter());
        let ns = Netns::create(&format!("{id}p{}{i}", n.letter()));
        let ip = n.pod_ip(i);
        let node_byte = match n {
            NodeId::A => 0x0a,
            NodeId::B => 0x0b,
        };
        let pod_mac = format!("02:00:00:{node_byte:02x}:01:{i:02x}");
        let node_mac = format!("02:00:00:{node_byte:02x}:02:{i:02x}");
        let veth = format!("lxc{i}");
        ns.ip(&["link", "add", "eth0", "address", &pod_mac, "type", "veth", "peer", "name", &veth, "address", &node_mac, "netns", self.ns.name()]);
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let gw = POD_GATEWAY.to_string();
        ns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"]);
        for cidr in [EXT_A_CIDR, EXT_B_CIDR, NODE_LINK_CIDR, POD_CIDR, SERVICE_CIDR] {
            ns.ip(&["route", "add", cidr, "via", &gw, "dev", "eth0"]);
        }
        ns.ip(&["neigh", "add", &gw, "lladdr", &node_mac, "dev", "eth0"]);
        self.ns.ip(&["link", "set", &veth, "up"]);
        self.ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &veth]);
        self.ns.ip(&["neigh", "add", &ip.to_string(), "lladdr", &pod_mac, "dev", &veth]);
        self.pods.push(Pod { name, ns, ip, node: n, veth });
    }

    /// IPv6 for pod `i` (1-based): its address, the link-local gateway as
    /// a static neighbour, routes to every IPv6 range of the topology
    /// through it; on the node a /128 route and a static neighbour.
    fn add_pod_ipv6(&self, i: usize) {
        add_pod_ipv6(&self.ns, &self.pods[i - 1], self.id.pod_ip6(i), &[EXT_A_CIDR6, EXT_B_CIDR6, "fd00:10::/64", POD_CIDR6, SERVICE_CIDR6]);
    }
}

/// The two-node topology. See the module documentation.
pub struct Cluster {
    pub id: String,
    pub client: Netns,
    pub a: Node,
    pub b: Node,
    /// Temporary files of this cluster (manifests, agent logs), removed on drop.
    pub workdir: PathBuf,
    /// The manifests directory both agents read.
    pub manifests: PathBuf,
    servers: Vec<Server>,
    /// [`Self::new_wired`]: the XDP wires (client ↔ node A, node A ↔ node B)
    /// and their namespaces.
    wires: Vec<crate::xdpwire::WireLink>,
    wire_ns: Vec<Netns>,
}

impl Cluster {
    /// Builds the client, both nodes, `pods_a` pods on node A (`pod-a1..`)
    /// and `pods_b` on node B (`pod-b1..`). `prefix` keeps names apart
    /// between tests. Panics unless root.
    #[must_use]
    pub fn new(prefix: &str, pods_a: usize, pods_b: usize) -> Self {
        Self::build(prefix, pods_a, pods_b, false)
    }

    /// [`Self::new`] with node A's two links — to the client (`ext0`) and to
    /// node B (`nodelink`) — each going through a wire namespace whose native
    /// XDP hands frames across ([`crate::xdpwire`]), so node A receives
    /// `xdp_frame`s as from a NIC's receive ring, not skbs from the peer's
    /// stack. Every device that receives redirected frames runs NAPI (GRO
    /// on), and the senders compute full checksums
    /// ([`Self::make_wire_like`]). Panics when the wires cannot be made.
    #[must_use]
    pub fn new_wired(prefix: &str, pods_a: usize, pods_b: usize) -> Self {
        let c = Self::build(prefix, pods_a, pods_b, true);
        c.make_wire_like();
        c
    }

    fn build(prefix: &str, pods_a: usize, pods_b: usize, wired: bool) -> Self {
        crate::netns::require_root();
        let id = unique_name(prefix);
        let workdir = std::env::temp_dir().join(format!("proxy-cluster-{id}"));
        let manifests = workdir.join("manifests");
        std::fs::create_dir_all(&manifests).expect("create manifests dir");
        let node = |n: NodeId| {
            let l = n.letter();
            Node {
                id: n,
                ns: Netns::detached(),
                pods: Vec::new(),
                bpffs: PathBuf::from(format!("/sys/fs/bpf/proxy-cluster-{id}-{l}")),
                cgroup: TestCgroup::create(&format!("{id}{l}")),
                agent: None,
                log: workdir.join(format!("agent-{}.log", n.name())),
            }
        };
        // Built field by field into the guard first, so a failing step
        // still removes what exists.
        let mut c = Self {
            client: Netns::detached(),
            a: node(NodeId::A),
            b: node(NodeId::B),
            id: id.clone(),
            workdir: workdir.clone(),
            manifests,
            servers: Vec::new(),
            wires: Vec::new(),
            wire_ns: Vec::new(),
        };
        c.client = Netns::create(&format!("{id}c"));
        c.a.ns = Netns::create(&format!("{id}na"));
        c.b.ns = Netns::create(&format!("{id}nb"));
        if wired {
            c.wire_ns.push(Netns::create(&format!("{id}w1")));
            c.wire_ns.push(Netns::create(&format!("{id}w2")));
        }
        c.wire();
        for i in 1..=pods_a {
            c.a.add_pod(&id, i);
        }
        for i in 1..=pods_b {
            c.b.add_pod(&id, i);
        }
        c
    }

    /// A veth pair `dev_x` (in `x`) ↔ `dev_y` (in `y`), or, when `wire` is
    /// given, `dev_x` ↔ `in` … `out` ↔ `dev_y` through the wire namespace.
    fn link(x: &Netns, dev_x: &str, y: &Netns, dev_y: &str, wire: Option<&Netns>) {
        match wire {
            None => {
                x.ip(&["link", "add", dev_x, "type", "veth", "peer", "name", dev_y, "netns", y.name()]);
            }
            Some(w) => {
                x.ip(&["link", "add", dev_x, "type", "veth", "peer", "name", "in", "netns", w.name()]);
                w.ip(&["link", "add", "out", "type", "veth", "peer", "name", dev_y, "netns", y.name()]);
                for d in ["in", "out"] {
                    w.ip(&["link", "set", d, "up"]);
                }
            }
        }
    }

    fn wire(&mut self) {
        let (c, a, b) = (&self.client, &self.a.ns, &self.b.ns);
        // Client legs (the one to node A through the first wire, if any).
        for (dev, node, client_ip, w) in [("eth0", a, CLIENT_IP, self.wire_ns.first()), ("eth1", b, CLIENT_IP_B, None)] {
            Self::link(c, dev, node, "ext0", w);
            c.ip(&["addr", "add", &format!("{client_ip}/24"), "dev", dev]);
            c.ip(&["link", "set", dev, "up"]);
        }
        a.ip(&["addr", "add", &format!("{NODE_A_IP}/24"), "dev", "ext0"]);
        a.ip(&["addr", "add", &format!("{NODE_A_IP2}/24"), "dev", "ext0"]);
        b.ip(&["addr", "add", &format!("{NODE_B_IP}/24"), "dev", "ext0"]);
        let via_a = NODE_A_IP.to_string();
        for cidr in [EXTERNAL_CIDR, POD_CIDR] {
            c.ip(&["route", "add", cidr, "via", &via_a]);
        }
        // Node link.
        Self::link(a, "nodelink", b, "nodelink", self.wire_ns.get(1));
        for (n, ns) in [(NodeId::A, a), (NodeId::B, b)] {
            ns.ip(&["addr", "add", &format!("{}/30", n.link_ip()), "dev", "nodelink"]);
            for dev in ["ext0", "nodelink"] {
                ns.ip(&["link", "set", dev, "up"]);
            }
            let peer = n.other().link_ip().to_string();
            let peer_ext = match n {
                NodeId::A => EXT_B_CIDR,
                NodeId::B => EXT_A_CIDR,
            };
            for cidr in [n.other().pod_cidr(), peer_ext] {
                ns.ip(&["route", "add", cidr, "via", &peer, "dev", "nodelink"]);
            }
            ns.sysctl("net.ipv4.ip_forward", "1");
        }
        let mut links = Vec::new();
        for w in &self.wire_ns {
            links.extend(crate::xdpwire::join(w, "in", "out").unwrap_or_else(|e| panic!("XDP wire in {}: {e}", w.name())));
        }
        self.wires = links;
    }

    /// Dual-stack from now on (IPv6 beside every IPv4 address, no DAD, no
    /// default route): the client legs (`CLIENT_IP6` ↔ `NODE_A_IP6` and
    /// `NODE_A_IP6_2`; `CLIENT_IP6_B` ↔ `NODE_B_IP6`), the node link
    /// (fd00:10::1/2), every pod (`NodeId::pod_ip6`); the client routes
    /// `EXTERNAL_CIDR6` and `POD_CIDR6` to node A, the nodes route each
    /// other's pods and client leg over the node link; both forward IPv6.
    pub fn enable_ipv6(&mut self) {
        let (c, a, b) = (&self.client, &self.a.ns, &self.b.ns);
        c.ip(&["-6", "addr", "add", &format!("{CLIENT_IP6}/64"), "dev", "eth0", "nodad"]);
        c.ip(&["-6", "addr", "add", &format!("{CLIENT_IP6_B}/64"), "dev", "eth1", "nodad"]);
        a.ip(&["-6", "addr", "add", &format!("{NODE_A_IP6}/64"), "dev", "ext0", "nodad"]);
        a.ip(&["-6", "addr", "add", &format!("{NODE_A_IP6_2}/64"), "dev", "ext0", "nodad"]);
        b.ip(&["-6", "addr", "add", &format!("{NODE_B_IP6}/64"), "dev", "ext0", "nodad"]);
        let via_a = NODE_A_IP6.to_string();
        for cidr in [EXTERNAL_CIDR6, POD_CIDR6] {
            c.ip(&["-6", "route", "add", cidr, "via", &via_a]);
        }
        for (n, ns) in [(NodeId::A, a), (NodeId::B, b)] {
            ns.ip(&["-6", "addr", "add", &format!("{}/64", n.link_ip6()), "dev", "nodelink", "nodad"]);
            let peer = n.other().link_ip6().to_string();
            let peer_ext = match n {
                NodeId::A => EXT_B_CIDR6,
                NodeId::B => EXT_A_CIDR6,
            };
            for cidr in [n.other().pod_cidr6(), peer_ext] {
                ns.ip(&["-6", "route", "add", cidr, "via", &peer, "dev", "nodelink"]);
            }
            ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        }
        for node in [&self.a, &self.b] {
            for i in 1..=node.pods.len() {
                node.add_pod_ipv6(i);
            }
        }
        self.wait_ipv6_settled();
    }

    /// Waits (at most 10 s) until no namespace of the cluster has a
    /// tentative IPv6 address: the link-local addresses of new links go
    /// through duplicate address detection (~1–2 s), and until then
    /// neighbour discovery from them fails, so the first flows would find
    /// no neighbour (XDP passes them to TC, TC's FIB lookup defers to the
    /// stack).
    fn wait_ipv6_settled(&self) {
        let all: Vec<&Netns> = [&self.client, &self.a.ns, &self.b.ns].into_iter().chain(self.pods().map(|p| &p.ns)).collect();
        wait_ipv6_settled(&all);
    }

    #[must_use]
    pub fn node(&self, n: NodeId) -> &Node {
        match n {
            NodeId::A => &self.a,
            NodeId::B => &self.b,
        }
    }

    pub fn node_mut(&mut self, n: NodeId) -> &mut Node {
        match n {
            NodeId::A => &mut self.a,
            NodeId::B => &mut self.b,
        }
    }

    #[must_use]
    pub fn pods_a(&self) -> &[Pod] {
        &self.a.pods
    }

    #[must_use]
    pub fn pods_b(&self) -> &[Pod] {
        &self.b.pods
    }

    /// Every pod, node A's first.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.a.pods.iter().chain(&self.b.pods)
    }

    /// HTTP on `port` in every pod, answering with the pod name
    /// ([`crate::servers::http_server`]).
    pub fn serve_http(&mut self, port: u16) {
        let new: Vec<Server> = self.pods().map(|p| crate::servers::http_server(&p.ns, port, &p.name)).collect();
        self.servers.extend(new);
    }

    /// UDP echo on `port` in every pod, answering `<pod>:<payload>`
    /// ([`crate::servers::udp_echo`]).
    pub fn serve_udp(&mut self, port: u16) {
        let new: Vec<Server> = self.pods().map(|p| crate::servers::udp_echo(&p.ns, port, &p.name)).collect();
        self.servers.extend(new);
    }

    /// HTTP on `port` in every pod, answering `<pod> <peer-ip> <peer-port>`:
    /// the source the pod sees (parse with [`Seen::parse`]).
    pub fn serve_http_peer(&mut self, port: u16) {
        let new: Vec<PeerServer> = self.pods().map(|p| http_peer_server(&p.ns, port, &p.name)).collect();
        self.servers.extend(new);
    }

    /// UDP on `port` in every pod, answering `<pod> <peer-ip> <peer-port> <payload>`.
    pub fn serve_udp_peer(&mut self, port: u16) {
        let new: Vec<PeerServer> = self.pods().map(|p| udp_peer_echo(&p.ns, port, &p.name)).collect();
        self.servers.extend(new);
    }

    /// [`Self::serve_http_peer`] and [`Self::serve_udp_peer`] on `[::]`
    /// (both families), for [`Self::enable_ipv6`]; parse with [`SeenAny`].
    pub fn serve_peer_dual(&mut self, http_port: u16, udp_port: u16) {
        let new = peer_servers_dual(self.pods(), http_port, udp_port);
        self.servers.extend(new);
    }

    /// Keeps a server (for example one in a node namespace) until the
    /// cluster is dropped.
    pub fn keep_server(&mut self, s: PeerServer) {
        self.servers.push(s);
    }

    /// Starts the agent `bin` on node `n`: `--manifests <self.manifests>
    /// --devices 'ext0,nodelink,lxc*' --node-name node-a|node-b` and `extra`
    /// (e.g. `["--nodeport-addresses", "198.51.100.1/32"]`). Its log is
    /// [`Node::agent_log`].
    pub fn start_agent(&mut self, n: NodeId, bin: &Path, extra: &[&str]) {
        let manifests = self.manifests.clone();
        self.node_mut(n).start_agent(bin, &manifests, extra);
    }

    /// [`Self::start_agent`] on node A.
    pub fn start_agent_a(&mut self, bin: &Path, extra: &[&str]) {
        self.start_agent(NodeId::A, bin, extra);
    }

    /// [`Self::start_agent`] on node B.
    pub fn start_agent_b(&mut self, bin: &Path, extra: &[&str]) {
        self.start_agent(NodeId::B, bin, extra);
    }

    /// [`Self::start_agent`] on both nodes, with the same `extra`.
    pub fn start_agents(&mut self, bin: &Path, extra: &[&str]) {
        self.start_agent_a(bin, extra);
        self.start_agent_b(bin, extra);
    }

    /// SIGKILLs the agent on node `n` (pins stay).
    pub fn kill_agent(&mut self, n: NodeId) {
        self.node_mut(n).kill_agent();
    }

    /// Makes the veths behave like wires for native XDP: the client, the
    /// pods and the node devices facing node A compute full checksums
    /// instead of leaving them to an offload a veth never performs (on a
    /// real wire every packet carries its checksum; an XDP program has no
    /// skb to finish it in), and the devices native XDP redirects into (the
    /// client's `eth0`, node B's `nodelink`; behind wires also node A's)
    /// run NAPI (GRO on), as a NIC driver does. Uses `ethtool`.
    pub fn make_wire_like(&self) {
        let both: &[&str] = &["tx", "off", "gro", "on"];
        let mut steps: Vec<(&Netns, &str, &[&str])> = vec![(&self.client, "eth0", both), (&self.b.ns, "nodelink", both)];
        if !self.wire_ns.is_empty() {
            // Behind wires node A's devices receive redirected frames too,
            // and what they send (segmented GRO packets included) goes into
            // a wire, so it must carry full checksums.
            steps.extend([(&self.a.ns, "ext0", both), (&self.a.ns, "nodelink", both)]);
        }
        steps.extend(self.pods().map(|p| (&p.ns, "eth0", &["tx", "off"][..])));
        for (ns, dev, features) in steps {
            let mut args = vec!["netns", "exec", ns.name(), "ethtool", "-K", dev];
            args.extend_from_slice(features);
            crate::netns::run("ip", &args);
        }
    }

    /// Waits (at most 20 s) until node A's agent has at least `n` frontends
    /// with backends programmed.
    pub fn wait_frontends(&self, n: usize) {
        crate::agent::wait_programmed(&self.a.bpffs, std::time::Duration::from_secs(20), &format!("{n} frontends with backends"), |v| {
            v.iter().filter(|f| !f.backends.is_empty()).count() >= n
        });
    }

    /// One raw HTTP/1.1 GET from the client to `addr` (a health-check port,
    /// say): the status and the body.
    pub fn client_http_status(&self, addr: SocketAddr, timeout: std::time::Duration) -> std::io::Result<(u16, String)> {
        use std::io::{Read as _, Write as _};
        self.client.run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            Ok((status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()))
        })
    }

    /// The names of every namespace of this cluster (client, nodes, pods).
    #[must_use]
    pub fn netns_names(&self) -> Vec<String> {
        let mut v = vec![self.client.name().to_owned(), self.a.ns.name().to_owned(), self.b.ns.name().to_owned()];
        v.extend(self.pods().map(|p| p.ns.name().to_owned()));
        v
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.a.kill_agent();
        self.b.kill_agent();
        self.servers.clear();
        for n in [&self.a, &self.b] {
            let _ = proxy_agent::datapath::cleanup(&Pins::new(&n.bpffs));
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
        self.wires.clear();
        // The namespaces go when the fields drop (pods, then nodes, client, wires).
    }
}

/// What a peer server answered: the pod's name and the source address it
/// saw (and, for UDP, the payload echoed back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub pod: String,
    pub peer: SocketAddrV4,
    pub payload: String,
}

impl Seen {
    /// Parses `<pod> <peer-ip> <peer-port>[ <payload>]`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.trim().splitn(4, ' ');
        let pod = it.next()?.to_owned();
        let ip: Ipv4Addr = it.next()?.parse().ok()?;
        let port: u16 = it.next()?.parse().ok()?;
        let payload = it.next().unwrap_or_default().to_owned();
        Some(Self { pod, peer: SocketAddrV4::new(ip, port), payload })
    }

    /// The source IP the pod saw.
    #[must_use]
    pub fn peer_ip(&self) -> Ipv4Addr {
        *self.peer.ip()
    }
}

/// [`Seen`] of either family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenAny {
    pub pod: String,
    pub peer: SocketAddr,
    pub payload: String,
}

impl SeenAny {
    /// Parses `<pod> <peer-ip> <peer-port>[ <payload>]`, either family.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.trim().splitn(4, ' ');
        let pod = it.next()?.to_owned();
        // A dual-stack server sees IPv4 peers as ::ffff:a.b.c.d.
        let ip = it.next()?.parse::<IpAddr>().ok()?.to_canonical();
        let port: u16 = it.next()?.parse().ok()?;
        let payload = it.next().unwrap_or_default().to_owned();
        Some(Self { pod, peer: SocketAddr::new(ip, port), payload })
    }

    /// The source IP the pod saw.
    #[must_use]
    pub fn peer_ip(&self) -> IpAddr {
        self.peer.ip()
    }
}

/// Gives `pod` (on the node `node_ns`) the IPv6 address `ip` (/128, no
/// duplicate address detection), the gateway [`POD_GATEWAY6`] as a static
/// neighbour at the node end of its veth, `routes` via that gateway; the
/// node gets the /128 route and neighbour to the pod.
pub fn add_pod_ipv6(node_ns: &Netns, pod: &Pod, ip: Ipv6Addr, routes: &[&str]) {
    let mac = |ns: &Netns, dev: &str| ns.ip(&["-br", "link", "show", dev]).split_whitespace().nth(2).expect("a MAC").to_owned();
    let (node_mac, pod_mac) = (mac(node_ns, &pod.veth), mac(&pod.ns, "eth0"));
    pod.ns.ip(&["-6", "addr", "add", &format!("{ip}/128"), "dev", "eth0", "nodad"]);
    let gw = POD_GATEWAY6.to_string();
    pod.ns.ip(&["-6", "neigh", "add", &gw, "lladdr", &node_mac, "dev", "eth0"]);
    for cidr in routes {
        pod.ns.ip(&["-6", "route", "add", cidr, "via", &gw, "dev", "eth0"]);
    }
    node_ns.ip(&["-6", "route", "add", &format!("{ip}/128"), "dev", &pod.veth]);
    node_ns.ip(&["-6", "neigh", "add", &ip.to_string(), "lladdr", &pod_mac, "dev", &pod.veth]);
}

/// Waits (at most 10 s) until none of `namespaces` has a tentative IPv6
/// address (see [`Cluster::enable_ipv6`]: new links' link-local addresses
/// go through duplicate address detection, and neighbour discovery from
/// them fails until it ends).
pub fn wait_ipv6_settled(namespaces: &[&Netns]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while namespaces.iter().any(|ns| !ns.ip(&["-6", "addr", "show", "tentative"]).trim().is_empty()) {
        if std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// HTTP on `[::]:http_port` and UDP on `[::]:udp_port` in each of `pods`
/// (both families), answering as [`http_peer_server`] and
/// [`udp_peer_echo`]; parse with [`SeenAny`].
pub fn peer_servers_dual<'a>(pods: impl Iterator<Item = &'a Pod>, http_port: u16, udp_port: u16) -> Vec<PeerServer> {
    let mut new = Vec::new();
    for p in pods {
        let name = p.name.clone();
        new.push(crate::servers::http_server_on(&p.ns, SocketAddr::from((Ipv6Addr::UNSPECIFIED, http_port)), move |peer| {
            format!("{}\n", peer_text(&name, peer))
        }));
        let name = p.name.clone();
        new.push(crate::servers::udp_echo_with(&p.ns, SocketAddr::from((Ipv6Addr::UNSPECIFIED, udp_port)), move |peer, payload| {
            let mut reply = format!("{} ", peer_text(&name, peer)).into_bytes();
            reply.extend_from_slice(payload);
            reply
        }));
    }
    new
}

/// A server that reports the peer it sees; stopped (threads joined) on drop.
pub type PeerServer = crate::servers::Server;

fn peer_text(name: &str, peer: SocketAddr) -> String {
    match peer {
        SocketAddr::V4(p) => format!("{name} {} {}", p.ip(), p.port()),
        SocketAddr::V6(p) => format!("{name} {} {}", p.ip(), p.port()),
    }
}

/// HTTP/1.1 (keep-alive) on `port` inside `ns`; each response body is
/// `<name> <peer-ip> <peer-port>\n`, the client address as the server sees it.
#[must_use]
pub fn http_peer_server(ns: &Netns, port: u16, name: &str) -> PeerServer {
    let name = name.to_owned();
    crate::servers::http_server_with(ns, port, move |peer| format!("{}\n", peer_text(&name, peer)))
}

/// UDP on `port` inside `ns`; answers each datagram with
/// `<name> <peer-ip> <peer-port> <payload>`. The socket is bound to the
/// wildcard address, so replies leave from the address the route picks: in
/// a namespace with several addresses (node A) use [`udp_peer_echo_at`].
#[must_use]
pub fn udp_peer_echo(ns: &Netns, port: u16, name: &str) -> PeerServer {
    udp_peer_echo_at(ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port), name)
}

/// [`udp_peer_echo`] bound to `bind`, so replies come from that address.
#[must_use]
pub fn udp_peer_echo_at(ns: &Netns, bind: SocketAddrV4, name: &str) -> PeerServer {
    let name = name.to_owned();
    crate::servers::udp_echo_with(ns, SocketAddr::V4(bind), move |peer, payload| {
        let mut reply = format!("{} ", peer_text(&name, peer)).into_bytes();
        reply.extend_from_slice(payload);
        reply
    })
}
