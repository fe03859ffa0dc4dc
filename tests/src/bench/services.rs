//! The Services every mode is given: S `ClusterIP` Services with 10
//! endpoints each. One of them (in the middle of the list, so a linear rule
//! walk sees half the others before it) points at the real pods and has
//! three ports (HTTP, a bulk TCP sink, a UDP echo); the others have one port
//! and endpoints at addresses that are never reached (10.64.0.0/13).
//!
//! The north-south cases use the same set with every Service of type
//! `NodePort` ([`ServiceSet::node_ports`]): the real one on node ports
//! [`HTTP_NODE_PORT`], [`BULK_NODE_PORT`], [`UDP_NODE_PORT`], the others on
//! `20000 + i` (a cluster with 10,000 `NodePort`s needs a wider
//! `--service-node-port-range` than the default 30000–32767), and every
//! endpoint on node B.
//!
//! Each set is of one address family ([`Family`]): IPv4 Services as above,
//! or IPv6-only Services (`ipFamilies: [IPv6]`, `addressType: IPv6`
//! slices) with the same names, ports and node ports, their `ClusterIP`s in
//! `fd00:96::/112` and the never-reached endpoints in `fd00:64::/96`.
use std::{
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use crate::manifests::{Port, service_yaml, write_atomic};

/// Ports of the real Service (`port` → the pods' `target`).
pub const HTTP_PORT: u16 = 80;
pub const HTTP_TARGET: u16 = 8080;
pub const BULK_PORT: u16 = 5201;
pub const BULK_TARGET: u16 = 5201;
pub const UDP_PORT: u16 = 5300;
pub const UDP_TARGET: u16 = 5300;
/// Node ports of the real Service in the north-south cases.
pub const HTTP_NODE_PORT: u16 = 30080;
pub const BULK_NODE_PORT: u16 = 30201;
pub const UDP_NODE_PORT: u16 = 30300;
/// Node port of the other Services: this + their index.
const NODE_PORT_BASE: u16 = 20_000;
/// The node the endpoints of the north-south cases are on.
pub const ENDPOINT_NODE: &str = "node-b";
/// Endpoints per Service (issue 5).
pub const ENDPOINTS: usize = 10;
/// The pod CIDR (kube-proxy's `--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The IPv6 pod CIDR (kube-proxy's `--cluster-cidr` for IPv6; it holds the
/// IPv6 pods of both test topologies).
pub const CLUSTER_CIDR6: &str = "fd00:244::/48";
/// The IPv6 Service CIDR ([`crate::sandbox::SERVICE_CIDR6`]).
pub const SERVICE_CIDR6: &str = "fd00:96::/112";
const VIP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 16]);
const FAKE_EP_BASE: u32 = u32::from_be_bytes([10, 64, 0, 0]);
/// `fd00:96::10`: the first IPv6 `ClusterIP` (the low 16 bits count up).
const VIP6_BASE: u128 = 0xfd00_0096_0000_0000_0000_0000_0000_0010;
/// `fd00:64::/96`: the IPv6 endpoints that are never reached.
const FAKE_EP6_BASE: u128 = 0xfd00_0064_0000_0000_0000_0000_0000_0000;

/// The address family of a set of Services and of the traffic of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both, in report order.
    pub const ALL: [Self; 2] = [Self::V4, Self::V6];

    /// `IPv4` / `IPv6`, as Kubernetes spells them (`ipFamilies`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// `ipv4` / `ipv6` (also `4`, `6`, any case).
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ipv4" | "v4" | "4" => Some(Self::V4),
            "ipv6" | "v6" | "6" => Some(Self::V6),
            _ => None,
        }
    }

    /// The family of `ip`.
    #[must_use]
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    /// The unspecified address of the family (servers bind to it).
    #[must_use]
    pub fn unspecified(self) -> IpAddr {
        match self {
            Self::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Self::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// kube-proxy's `--cluster-cidr` of the family.
    #[must_use]
    pub fn cluster_cidr(self) -> &'static str {
        match self {
            Self::V4 => CLUSTER_CIDR,
            Self::V6 => CLUSTER_CIDR6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `ip/32` or `ip/128`: one host, as iptables and nft match it.
#[must_use]
pub fn host_cidr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// `ip:port`, IPv6 in brackets (Go's `net.JoinHostPort`, which kube-proxy
/// writes DNAT targets with).
#[must_use]
pub fn host_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    #[must_use]
    pub fn lower(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
    #[must_use]
    pub fn upper(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// One Service port: what kube-proxy calls a `ServicePortName`.
#[derive(Clone, Debug)]
pub struct Frontend {
    pub service: String,
    pub port_name: &'static str,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub target: u16,
    pub endpoints: Vec<IpAddr>,
    /// The node port (north-south cases), or `None` (`ClusterIP`).
    pub node_port: Option<u16>,
}

impl Frontend {
    /// `default/<svc>:<port>` as kube-proxy prints it.
    #[must_use]
    pub fn port_name_string(&self) -> String {
        format!("default/{}:{}", self.service, self.port_name)
    }
}

/// The Services of one run.
#[derive(Clone, Debug)]
pub struct ServiceSet {
    /// Services in order; index `real` is the real one.
    pub count: usize,
    pub real: usize,
    pub real_endpoints: Vec<IpAddr>,
    /// Every Service is a `NodePort` with its endpoints on [`ENDPOINT_NODE`].
    pub node_ports: bool,
    /// IPv4 Services, or IPv6-only ones.
    pub family: Family,
}

impl ServiceSet {
    /// `count` Services of `family`; the real one's endpoints (of the same
    /// family) are `real_endpoints`.
    #[must_use]
    pub fn new(family: Family, count: usize, real_endpoints: Vec<IpAddr>) -> Self {
        assert!(count >= 1, "at least one Service");
        assert!(count <= 52_000, "at most 52,000 Services (address plan)");
        assert!(real_endpoints.iter().all(|ip| Family::of(*ip) == family), "{family} endpoints only: {real_endpoints:?}");
        Self { count, real: count / 2, real_endpoints, node_ports: false, family }
    }

    /// The same Services, each of type `NodePort` (north-south cases).
    #[must_use]
    pub fn node_ports(family: Family, count: usize, real_endpoints: Vec<IpAddr>) -> Self {
        assert!(count <= 10_000, "at most 10,000 NodePort Services (node ports 20000-29999)");
        Self { node_ports: true, ..Self::new(family, count, real_endpoints) }
    }

    /// The IPv4 `ClusterIP` of Service `i`.
    #[must_use]
    pub fn vip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(VIP_BASE + u32::try_from(i).expect("index"))
    }

    /// The IPv6 `ClusterIP` of Service `i` (`fd00:96::10` + i).
    #[must_use]
    pub fn vip6(i: usize) -> Ipv6Addr {
        Ipv6Addr::from(VIP6_BASE + u128::try_from(i).expect("index"))
    }

    /// The `ClusterIP` of Service `i` in this set's family.
    #[must_use]
    pub fn vip_of(&self, i: usize) -> IpAddr {
        match self.family {
            Family::V4 => Self::vip(i).into(),
            Family::V6 => Self::vip6(i).into(),
        }
    }

    /// The real Service's `ClusterIP`.
    #[must_use]
    pub fn real_vip(&self) -> IpAddr {
        self.vip_of(self.real)
    }

    /// Endpoint `j` of (not real) Service `i`: never reached.
    fn fake_endpoint(&self, i: usize, j: usize) -> IpAddr {
        let k = i * ENDPOINTS + j;
        match self.family {
            Family::V4 => Ipv4Addr::from(FAKE_EP_BASE + u32::try_from(k).expect("index")).into(),
            Family::V6 => Ipv6Addr::from(FAKE_EP6_BASE + u128::try_from(k).expect("index")).into(),
        }
    }

    #[must_use]
    pub fn name(i: usize) -> String {
        format!("svc-{i:05}")
    }

    /// The frontends of Service `i` (three for the real one, one otherwise).
    #[must_use]
    pub fn frontends(&self, i: usize) -> Vec<Frontend> {
        let service = Self::name(i);
        let vip = self.vip_of(i);
        let np = |p: u16| self.node_ports.then_some(p);
        if i == self.real {
            let eps = self.real_endpoints.clone();
            vec![
                Frontend {
                    service: service.clone(),
                    port_name: "http",
                    vip,
                    port: HTTP_PORT,
                    proto: Proto::Tcp,
                    target: HTTP_TARGET,
                    endpoints: eps.clone(),
                    node_port: np(HTTP_NODE_PORT),
                },
                Frontend {
                    service: service.clone(),
                    port_name: "bulk",
                    vip,
                    port: BULK_PORT,
                    proto: Proto::Tcp,
                    target: BULK_TARGET,
                    endpoints: eps.clone(),
                    node_port: np(BULK_NODE_PORT),
                },
                Frontend { service, port_name: "udp", vip, port: UDP_PORT, proto: Proto::Udp, target: UDP_TARGET, endpoints: eps, node_port: np(UDP_NODE_PORT) },
            ]
        } else {
            let endpoints = (0..ENDPOINTS).map(|j| self.fake_endpoint(i, j)).collect();
            let node_port = np(NODE_PORT_BASE + u16::try_from(i).expect("at most 10,000 NodePort Services"));
            vec![Frontend { service, port_name: "http", vip, port: HTTP_PORT, proto: Proto::Tcp, target: HTTP_TARGET, endpoints, node_port }]
        }
    }

    /// Every frontend, in Service order.
    #[must_use]
    pub fn all_frontends(&self) -> Vec<Frontend> {
        (0..self.count).flat_map(|i| self.frontends(i)).collect()
    }

    /// A Service that is not in the set (for "apply one added Service").
    #[must_use]
    pub fn extra(&self) -> Frontend {
        let mut f = Self { count: self.count + 1, real: usize::MAX, real_endpoints: Vec::new(), node_ports: false, family: self.family }.frontends(self.count);
        f.remove(0)
    }

    /// Writes the Services as manifests (Service + `EndpointSlice`), 500 per
    /// file, into `dir`.
    pub fn write_manifests(&self, dir: &Path) {
        let mut chunk = String::new();
        let mut file = 0;
        for i in 0..self.count {
            chunk.push_str(&manifest_of(&self.frontends(i)));
            chunk.push_str("---\n");
            if (i + 1) % 500 == 0 || i + 1 == self.count {
                write_atomic(dir, &format!("services-{file:03}.yaml"), &chunk);
                chunk.clear();
                file += 1;
            }
        }
    }
}

/// Service + `EndpointSlice` YAML for the frontends of one Service.
#[must_use]
pub fn manifest_of(fronts: &[Frontend]) -> String {
    let ports: Vec<Port<'_>> = fronts
        .iter()
        .map(|f| Port { name: f.port_name, port: f.port, target: f.target, protocol: f.proto.upper() })
        .collect();
    let y = match fronts[0].vip {
        IpAddr::V4(vip) => {
            let eps: Vec<(Ipv4Addr, bool)> = fronts[0]
                .endpoints
                .iter()
                .map(|ip| match ip {
                    IpAddr::V4(a) => (*a, true),
                    IpAddr::V6(a) => panic!("IPv6 endpoint {a} of an IPv4 Service"),
                })
                .collect();
            service_yaml(&fronts[0].service, vip, &ports, &eps)
        }
        IpAddr::V6(vip) => service_yaml6(&fronts[0].service, vip, &ports, &fronts[0].endpoints),
    };
    if fronts[0].node_port.is_none() {
        return y;
    }
    // NodePort: the type, each port's nodePort, and the endpoints' node.
    let mut y = y.replacen("  type: ClusterIP\n", "  type: NodePort\n", 1);
    for f in fronts {
        let target = format!("    targetPort: {}\n    protocol: {}\n", f.target, f.proto.upper());
        let with = format!("{target}    nodePort: {}\n", f.node_port.unwrap_or_default());
        y = y.replacen(&target, &with, 1);
    }
    y.replace("  conditions:\n", &format!("  nodeName: {ENDPOINT_NODE}\n  conditions:\n"))
}

/// [`service_yaml`] of an IPv6-only Service: `ipFamilies: [IPv6]`,
/// `ipFamilyPolicy: SingleStack`, an `addressType: IPv6` slice of ready
/// `endpoints`; the same layout otherwise (so [`manifest_of`] turns either
/// into a `NodePort` the same way).
fn service_yaml6(name: &str, vip: Ipv6Addr, ports: &[Port<'_>], endpoints: &[IpAddr]) -> String {
    let mut y = String::new();
    let _ = writeln!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: ClusterIP\n  clusterIP: '{vip}'\n  clusterIPs: ['{vip}']\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n  ports:"
    );
    for p in ports {
        let _ = writeln!(y, "  - name: {}\n    port: {}\n    targetPort: {}\n    protocol: {}", p.name, p.port, p.target, p.protocol);
    }
    let _ = writeln!(
        y,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abcde\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv6\nports:"
    );
    for p in ports {
        let _ = writeln!(y, "- name: {}\n  port: {}\n  protocol: {}", p.name, p.target, p.protocol);
    }
    if endpoints.is_empty() {
        y.push_str("endpoints: []\n");
    } else {
        y.push_str("endpoints:\n");
        for ip in endpoints {
            let _ = writeln!(y, "- addresses: [\"{ip}\"]\n  conditions:\n    ready: true");
        }
    }
    y
}

/// kube-proxy's chain-name hash: 16 base32 characters of a hash of the
/// service port name and protocol (kube-proxy uses SHA-256; FNV-1a here,
/// the same length and spread, which is what matters for rule evaluation).
#[must_use]
pub fn hash16(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h1: u64 = 0xcbf2_9ce4_8422_2325;
    let mut h2: u64 = 0x8422_2325_cbf2_9ce4;
    for b in s.bytes() {
        h1 = (h1 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        h2 = (h2 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3 ^ 0x1000);
    }
    let mut out = String::with_capacity(16);
    for k in 0..16 {
        let v = if k < 8 { h1 >> (k * 5) } else { h2 >> ((k - 8) * 5) };
        out.push(char::from(ALPHABET[usize::try_from(v & 31).expect("5 bits")]));
    }
    out
}

/// `0.10000000000`-style probability, as kube-proxy prints it.
#[must_use]
pub fn probability(n: usize) -> String {
    #[expect(clippy::cast_precision_loss, reason = "n is small")]
    let p = 1.0 / n as f64;
    format!("{p:.10}")
}

/// Appends `line` and a newline.
pub fn line(out: &mut String, line: &str) {
    let _ = writeln!(out, "{line}");
}
