//! Two nodes joined by an overlay, as CNIs lay it out, built on the real
//! kernel. [`OverlayKind::Vxlan`] is flannel's VXLAN backend;
//! [`OverlayKind::Tun`] is an L3 device without an Ethernet header
//! (`ARPHRD_NONE`), which is what `WireGuard` or IPIP look like to the
//! datapath:
//!
//! ```text
//!  client ns                  node A ns                                  node B ns
//!  eth0 198.51.100.2/24 ── ext0 198.51.100.1/24
//!  (no routes beyond          underlay 10.0.0.1/30 ─────────────────── underlay 10.0.0.2/30
//!   its own /24)
//!   Vxlan: flannel.1 (vxlan id 1, dstport 8472, nolearning, local = underlay address)
//!                             10.244.1.0/32                              10.244.2.0/32
//!                             10.244.2.0/24 via 10.244.2.0 onlink        10.244.1.0/24 via 10.244.1.0 onlink
//!                             neigh 10.244.2.0 → B's VTEP MAC            neigh 10.244.1.0 → A's VTEP MAC
//!                             fdb B's VTEP MAC dst 10.0.0.2              fdb A's VTEP MAC dst 10.0.0.1
//!   Tun: tun0 (IFF_TUN|IFF_NO_PI), packets relayed between the two fds by a test thread
//!                             10.244.1.0/32, 10.244.2.0/24 dev tun0      10.244.2.0/32, 10.244.1.0/24 dev tun0
//!
//!  pods (x N per node): lxcI ── eth0 10.244.{1,2}.(10+I)/32, gateway 169.254.1.1,
//!                       10.244.0.0/16 and 10.96.0.0/12 via the gateway (no default route)
//! ```
//!
//! Pod addresses, node names and the service ranges are those of
//! [`crate::cluster`]. Each node has its own bpffs directory, its own
//! [`TestCgroup`] (node-local clients started in it take the socket path)
//! and its own agent with `--devices` naming the overlay device; both
//! agents read one manifests directory. Everything — namespaces, pins,
//! files, agents, servers, the relay thread — is removed on drop, also
//! when a test panics.
use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use proxy_agent::pins::Pins;

use crate::{
    agent::{Agent, AgentArgs, AgentSource},
    cgroup::TestCgroup,
    cluster::{
        CLIENT_IP, CLIENT_IP6, NODE_A_IP, NODE_A_IP6, NodeId, POD_CIDR, POD_CIDR6, POD_GATEWAY, PeerServer, Pod, SERVICE_CIDR,
        SERVICE_CIDR6, add_pod_ipv6, http_peer_server, peer_servers_dual, udp_peer_echo, wait_ipv6_settled,
    },
    netns::{Netns, unique_name},
};

/// The VXLAN device, named as flannel names it.
pub const VXLAN_DEV: &str = "flannel.1";
/// flannel's VXLAN port (not the IANA 4789).
pub const VXLAN_PORT: u16 = 8472;
/// The L3 overlay device.
pub const TUN_DEV: &str = "tun0";
/// The node-to-node link the overlay runs over.
pub const UNDERLAY_DEV: &str = "underlay";

/// How the nodes are joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverlayKind {
    /// flannel's VXLAN backend (`flannel.1`, Ethernet inside UDP 8472).
    Vxlan,
    /// A TUN device (`tun0`, no link-layer header), relayed by a test thread.
    Tun,
}

impl OverlayKind {
    /// The overlay device on each node.
    #[must_use]
    pub fn device(self) -> &'static str {
        match self {
            Self::Vxlan => VXLAN_DEV,
            Self::Tun => TUN_DEV,
        }
    }

    /// `--devices` for both nodes: the uplink, the underlay, the overlay and the pods.
    #[must_use]
    pub fn devices(self) -> String {
        format!("ext0,{UNDERLAY_DEV},{},lxc*", self.device())
    }
}

/// Node `n`'s address on the underlay (10.0.0.1 / 10.0.0.2).
#[must_use]
pub fn underlay_ip(n: NodeId) -> std::net::Ipv4Addr {
    n.link_ip()
}

/// Node `n`'s address on its overlay device: the first address of its pod
/// range (10.244.1.0 / 10.244.2.0), as flannel gives `flannel.1`. Traffic
/// the node sends to the other node's pods (node-local clients, `NodePort`
/// SNAT) has this source.
#[must_use]
pub fn overlay_ip(n: NodeId) -> std::net::Ipv4Addr {
    match n {
        NodeId::A => std::net::Ipv4Addr::new(10, 244, 1, 0),
        NodeId::B => std::net::Ipv4Addr::new(10, 244, 2, 0),
    }
}

/// Node `n`'s IPv6 address on its overlay device
/// ([`Overlay::enable_ipv6`]): the first address of its IPv6 pod range
/// (fd00:244:0:1:: / fd00:244:0:2::), the source of what the node sends
/// to the other node's pods over IPv6.
#[must_use]
pub fn overlay_ip6(n: NodeId) -> std::net::Ipv6Addr {
    match n {
        NodeId::A => std::net::Ipv6Addr::new(0xfd00, 0x244, 0, 1, 0, 0, 0, 0),
        NodeId::B => std::net::Ipv6Addr::new(0xfd00, 0x244, 0, 2, 0, 0, 0, 0),
    }
}

/// The MAC of node `n`'s VTEP (`flannel.1`), fixed so the peer's
/// neighbour and fdb entries can be written before the device exists.
#[must_use]
pub fn vtep_mac(n: NodeId) -> &'static str {
    match n {
        NodeId::A => "02:00:00:0a:ff:01",
        NodeId::B => "02:00:00:0b:ff:01",
    }
}

fn other(n: NodeId) -> NodeId {
    match n {
        NodeId::A => NodeId::B,
        NodeId::B => NodeId::A,
    }
}

/// One node of the overlay topology.
pub struct OverlayNode {
    pub id: NodeId,
    pub ns: Netns,
    pub pods: Vec<Pod>,
    /// Where this node's agent pins (`/sys/fs/bpf/proxy-overlay-<id>-a|b`).
    pub bpffs: PathBuf,
    /// This node's cgroup for the socket programs (`--cgroup`).
    pub cgroup: TestCgroup,
    pub agent: Option<Agent>,
    pub log: PathBuf,
}

impl OverlayNode {
    /// `node-a` / `node-b`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.id.name()
    }

    /// Everything this node's agent wrote so far.
    #[must_use]
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every exit-reason counter (name → packets) of this node's datapath,
    /// read with `proxy-agent stats -o json`.
    #[must_use]
    pub fn counters(&self) -> BTreeMap<String, u64> {
        crate::agent::counters(&crate::agent::agent_bin(), &self.bpffs)
    }

    /// Pod `i` (1-based): namespace, veth `lxcI`, /32 route and static
    /// neighbours, as in [`crate::cluster`], with routes for the pod and
    /// service ranges only.
    fn add_pod(&mut self, id: &str, i: usize) {
        let n = self.id;
        let letter = match n {
            NodeId::A => 'a',
            NodeId::B => 'b',
        };
        let node_byte = match n {
            NodeId::A => 0x0a,
            NodeId::B => 0x0b,
        };
        let ns = Netns::create(&format!("{id}p{letter}{i}"));
        let ip = n.pod_ip(i);
        let pod_mac = format!("02:00:00:{node_byte:02x}:01:{i:02x}");
        let node_mac = format!("02:00:00:{node_byte:02x}:02:{i:02x}");
        let veth = format!("lxc{i}");
        ns.ip(&["link", "add", "eth0", "address", &pod_mac, "type", "veth", "peer", "name", &veth, "address", &node_mac, "netns", self.ns.name()]);
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let gw = POD_GATEWAY.to_string();
        ns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"]);
        for cidr in [POD_CIDR, SERVICE_CIDR] {
            ns.ip(&["route", "add", cidr, "via", &gw, "dev", "eth0"]);
        }
        ns.ip(&["neigh", "add", &gw, "lladdr", &node_mac, "dev", "eth0"]);
        self.ns.ip(&["link", "set", &veth, "up"]);
        self.ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &veth]);
        self.ns.ip(&["neigh", "add", &ip.to_string(), "lladdr", &pod_mac, "dev", &veth]);
        self.pods.push(Pod { name: format!("pod-{letter}{i}"), ns, ip, node: n, veth });
    }

    /// flannel's VXLAN device: `flannel.1` with the node's overlay address,
    /// the other node's pod range via its VTEP address (onlink), and the
    /// static neighbour and fdb entry flannel writes for the remote VTEP.
    fn add_vxlan(&self) {
        let (n, ns) = (self.id, &self.ns);
        let peer = other(n);
        let local = underlay_ip(n).to_string();
        let port = VXLAN_PORT.to_string();
        ns.ip(&["link", "add", VXLAN_DEV, "address", vtep_mac(n), "type", "vxlan", "id", "1", "local", &local, "dev", UNDERLAY_DEV, "dstport", &port, "nolearning"]);
        ns.ip(&["addr", "add", &format!("{}/32", overlay_ip(n)), "dev", VXLAN_DEV]);
        ns.ip(&["link", "set", VXLAN_DEV, "up"]);
        let gw = overlay_ip(peer).to_string();
        ns.ip(&["route", "add", peer.pod_cidr(), "via", &gw, "dev", VXLAN_DEV, "onlink"]);
        ns.ip(&["neigh", "add", &gw, "lladdr", vtep_mac(peer), "dev", VXLAN_DEV]);
        crate::netns::run(
            "bridge",
            &["-n", ns.name(), "fdb", "append", vtep_mac(peer), "dev", VXLAN_DEV, "dst", &underlay_ip(peer).to_string()],
        );
    }

    /// `tun0` (opened here, so it lives while the returned fd is open), up,
    /// with the node's overlay address and the other node's pod range.
    fn add_tun(&self) -> OwnedFd {
        let (n, ns) = (self.id, &self.ns);
        let fd = ns.run(|| open_tun(TUN_DEV));
        ns.ip(&["addr", "add", &format!("{}/32", overlay_ip(n)), "dev", TUN_DEV]);
        ns.ip(&["link", "set", TUN_DEV, "up"]);
        ns.ip(&["route", "add", other(n).pod_cidr(), "dev", TUN_DEV]);
        fd
    }

    /// IPv6 beside IPv4 on this node's overlay device and pods: the node's
    /// [`overlay_ip6`], the other node's IPv6 pod range through the overlay
    /// (via its VTEP's IPv6 address, onlink, with the static neighbour
    /// flannel would write, on VXLAN; straight into `tun0` on TUN), and
    /// every pod's `NodeId::pod_ip6` with routes for the IPv6 pod and
    /// service ranges.
    fn add_ipv6(&self, kind: OverlayKind) {
        let (n, ns) = (self.id, &self.ns);
        let peer = other(n);
        let dev = kind.device();
        ns.ip(&["-6", "addr", "add", &format!("{}/128", overlay_ip6(n)), "dev", dev, "nodad"]);
        match kind {
            OverlayKind::Vxlan => {
                let gw = overlay_ip6(peer).to_string();
                ns.ip(&["-6", "route", "add", peer.pod_cidr6(), "via", &gw, "dev", dev, "onlink"]);
                ns.ip(&["-6", "neigh", "add", &gw, "lladdr", vtep_mac(peer), "dev", dev]);
            }
            OverlayKind::Tun => {
                ns.ip(&["-6", "route", "add", peer.pod_cidr6(), "dev", dev]);
            }
        }
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        for (i, pod) in self.pods.iter().enumerate() {
            add_pod_ipv6(ns, pod, n.pod_ip6(i + 1), &[POD_CIDR6, SERVICE_CIDR6]);
        }
    }

    fn start_agent(&mut self, bin: &Path, manifests: &Path, devices: &str, extra: &[&str]) {
        assert!(self.agent.is_none(), "agent already running on {}", self.name());
        self.agent = Some(Agent::start(&AgentArgs {
            bin,
            netns: self.ns.name(),
            bpffs: &self.bpffs,
            source: AgentSource::Manifests(manifests),
            devices,
            node_name: Some(self.name()),
            cgroup: Some(self.cgroup.path()),
            extra,
            log: &self.log,
        }));
    }

    fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }
}

/// Creates the TUN device `name` (`IFF_TUN | IFF_NO_PI`: raw IP packets,
/// `ARPHRD_NONE`) in the calling thread's network namespace.
fn open_tun(name: &str) -> OwnedFd {
    let f = File::options().read(true).write(true).open("/dev/net/tun").expect("open /dev/net/tun");
    // SAFETY: an all-zero ifreq is valid; the name is copied in bounded.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s.cast_signed();
    }
    ifr.ifr_ifru.ifru_flags = libc::c_short::try_from(libc::IFF_TUN | libc::IFF_NO_PI).expect("flags fit");
    // SAFETY: TUNSETIFF reads the ifreq we own.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) };
    assert!(rc == 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    f.into()
}

/// The wire between the two TUN devices: a thread that reads each packet
/// from one node's fd and writes it to the other's. Stopped and joined on
/// drop (it polls with a 100 ms timeout), which closes the fds and so
/// removes the devices.
pub struct TunRelay {
    stop: Arc<AtomicBool>,
    relayed: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl TunRelay {
    /// Relays between node A's and node B's tun fds until dropped.
    #[must_use]
    pub fn start(fd_a: OwnedFd, fd_b: OwnedFd) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let relayed = Arc::new(AtomicU64::new(0));
        let (stopping, count) = (stop.clone(), relayed.clone());
        let thread = std::thread::spawn(move || {
            let fds = [fd_a, fd_b];
            let mut buf = vec![0u8; 65536];
            while !stopping.load(Ordering::Relaxed) {
                let mut pfd = fds.each_ref().map(|f| libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 });
                // SAFETY: two pollfds on our stack, fds open for the call.
                let ready = unsafe { libc::poll(pfd.as_mut_ptr(), 2, 100) };
                if ready <= 0 {
                    continue;
                }
                for (from, to) in [(0, 1), (1, 0)] {
                    if pfd[from].revents & libc::POLLIN == 0 {
                        continue;
                    }
                    // SAFETY: reading into our buffer from an open fd.
                    let len = unsafe { libc::read(fds[from].as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    let Ok(len) = usize::try_from(len) else { continue };
                    // SAFETY: writing `len` bytes of our buffer to an open fd.
                    // A failed write is a lost packet, as on a wire.
                    if unsafe { libc::write(fds[to].as_raw_fd(), buf.as_ptr().cast(), len) } > 0 {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Self { stop, relayed, thread: Some(thread) }
    }

    /// Packets carried so far (both directions).
    #[must_use]
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }
}

impl Drop for TunRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The overlay topology. See the module documentation.
pub struct Overlay {
    pub id: String,
    pub kind: OverlayKind,
    /// The external client on node A's uplink.
    pub client: Netns,
    pub a: OverlayNode,
    pub b: OverlayNode,
    /// Temporary files (manifests, agent logs), removed on drop.
    pub workdir: PathBuf,
    /// The manifests directory both agents read.
    pub manifests: PathBuf,
    /// [`OverlayKind::Tun`]: the thread carrying packets between the nodes.
    pub relay: Option<TunRelay>,
    servers: Vec<PeerServer>,
}

impl Overlay {
    /// Builds the client, both nodes joined by `kind`, `pods_a` pods on
    /// node A (`pod-a1..`) and `pods_b` on node B (`pod-b1..`). `prefix`
    /// keeps names apart between tests. Panics unless root.
    #[must_use]
    pub fn new(prefix: &str, kind: OverlayKind, pods_a: usize, pods_b: usize) -> Self {
        crate::netns::require_root();
        let id = unique_name(prefix);
        let workdir = std::env::temp_dir().join(format!("proxy-overlay-{id}"));
        let manifests = workdir.join("manifests");
        std::fs::create_dir_all(&manifests).expect("create manifests dir");
        let node = |n: NodeId, l: char| OverlayNode {
            id: n,
            ns: Netns::detached(),
            pods: Vec::new(),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/proxy-overlay-{id}-{l}")),
            cgroup: TestCgroup::create(&format!("{id}{l}")),
            agent: None,
            log: workdir.join(format!("agent-{}.log", n.name())),
        };
        // The guard exists before any step that can fail, so a failing
        // step still removes what exists.
        let mut o = Self {
            id: id.clone(),
            kind,
            client: Netns::detached(),
            a: node(NodeId::A, 'a'),
            b: node(NodeId::B, 'b'),
            workdir: workdir.clone(),
            manifests,
            relay: None,
            servers: Vec::new(),
        };
        o.client = Netns::create(&format!("{id}c"));
        o.a.ns = Netns::create(&format!("{id}na"));
        o.b.ns = Netns::create(&format!("{id}nb"));
        o.wire();
        for i in 1..=pods_a {
            o.a.add_pod(&id, i);
        }
        for i in 1..=pods_b {
            o.b.add_pod(&id, i);
        }
        o
    }

    fn wire(&mut self) {
        let (c, a, b) = (&self.client, &self.a.ns, &self.b.ns);
        // The external client, on node A's uplink only: its one route is its /24.
        c.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "ext0", "netns", a.name()]);
        c.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]);
        c.ip(&["link", "set", "eth0", "up"]);
        a.ip(&["addr", "add", &format!("{NODE_A_IP}/24"), "dev", "ext0"]);
        a.ip(&["link", "set", "ext0", "up"]);
        // The underlay.
        a.ip(&["link", "add", UNDERLAY_DEV, "type", "veth", "peer", "name", UNDERLAY_DEV, "netns", b.name()]);
        for (n, ns) in [(NodeId::A, a), (NodeId::B, b)] {
            ns.ip(&["addr", "add", &format!("{}/30", underlay_ip(n)), "dev", UNDERLAY_DEV]);
            ns.ip(&["link", "set", UNDERLAY_DEV, "up"]);
            ns.sysctl("net.ipv4.ip_forward", "1");
        }
        match self.kind {
            OverlayKind::Vxlan => {
                self.a.add_vxlan();
                self.b.add_vxlan();
            }
            OverlayKind::Tun => {
                let fa = self.a.add_tun();
                let fb = self.b.add_tun();
                self.relay = Some(TunRelay::start(fa, fb));
            }
        }
    }

    #[must_use]
    pub fn node(&self, n: NodeId) -> &OverlayNode {
        match n {
            NodeId::A => &self.a,
            NodeId::B => &self.b,
        }
    }

    /// Every pod, node A's first.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.a.pods.iter().chain(&self.b.pods)
    }

    /// HTTP on `port` in every pod, answering `<pod> <peer-ip> <peer-port>`
    /// ([`http_peer_server`]; parse with [`crate::cluster::Seen::parse`]).
    pub fn serve_http_peer(&mut self, port: u16) {
        let new: Vec<PeerServer> = self.pods().map(|p| http_peer_server(&p.ns, port, &p.name)).collect();
        self.servers.extend(new);
    }

    /// UDP on `port` in every pod, answering `<pod> <peer-ip> <peer-port> <payload>`.
    pub fn serve_udp_peer(&mut self, port: u16) {
        let new: Vec<PeerServer> = self.pods().map(|p| udp_peer_echo(&p.ns, port, &p.name)).collect();
        self.servers.extend(new);
    }

    /// IPv6 beside IPv4, as a dual-stack flannel lays it out over one
    /// overlay device: the client's [`CLIENT_IP6`] and node A's
    /// [`NODE_A_IP6`] on the uplink (the client has no other route), each
    /// node's [`overlay_ip6`] on its overlay device and routes to the other
    /// node's IPv6 pod range through it, IPv6 on every pod. The underlay
    /// stays IPv4 (VXLAN carries the IPv6 frames in IPv4 UDP). Call before
    /// starting servers and agents.
    pub fn enable_ipv6(&mut self) {
        self.client.ip(&["-6", "addr", "add", &format!("{CLIENT_IP6}/64"), "dev", "eth0", "nodad"]);
        self.a.ns.ip(&["-6", "addr", "add", &format!("{NODE_A_IP6}/64"), "dev", "ext0", "nodad"]);
        self.a.add_ipv6(self.kind);
        self.b.add_ipv6(self.kind);
        let all: Vec<&Netns> = [&self.client, &self.a.ns, &self.b.ns].into_iter().chain(self.pods().map(|p| &p.ns)).collect();
        wait_ipv6_settled(&all);
    }

    /// HTTP and UDP peer servers on `[::]` (both families) in every pod;
    /// parse with [`crate::cluster::SeenAny`].
    pub fn serve_peer_dual(&mut self, http_port: u16, udp_port: u16) {
        let new = peer_servers_dual(self.pods(), http_port, udp_port);
        self.servers.extend(new);
    }

    /// What to print when a request fails: both nodes' non-zero counters,
    /// programmed frontends and agent logs, and what the relay carried.
    #[must_use]
    pub fn diag(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        if let Some(r) = &self.relay {
            let _ = writeln!(s, "tun relay carried {} packets", r.relayed());
        }
        for n in [&self.a, &self.b] {
            let nonzero: BTreeMap<String, u64> = n.counters().into_iter().filter(|(_, v)| *v > 0).collect();
            let fronts: Vec<String> =
                crate::agent::programmed(&n.bpffs).iter().map(|f| format!("{}:{}/{} {}", f.address, f.port, f.protocol, f.backends.len())).collect();
            let _ = writeln!(s, "--- {}: counters {nonzero:?}\nfrontends: {fronts:?}\nagent log:\n{}", n.name(), n.agent_log());
        }
        s
    }

    /// Starts the agent `bin` on both nodes: `--manifests <self.manifests>
    /// --devices <kind.devices()> --node-name node-a|node-b --cgroup <the
    /// node's cgroup>` and `extra`.
    pub fn start_agents(&mut self, bin: &Path, extra: &[&str]) {
        let devices = self.kind.devices();
        for n in [&mut self.a, &mut self.b] {
            n.start_agent(bin, &self.manifests, &devices, extra);
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.a.kill_agent();
        self.b.kill_agent();
        self.servers.clear();
        self.relay = None;
        for n in [&self.a, &self.b] {
            let _ = proxy_agent::datapath::cleanup(&Pins::new(&n.bpffs));
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
        // The namespaces and cgroups go when the fields drop.
    }
}
