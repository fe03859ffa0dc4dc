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
use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

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
const VIP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 16]);
const FAKE_EP_BASE: u32 = u32::from_be_bytes([10, 64, 0, 0]);

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
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub target: u16,
    pub endpoints: Vec<Ipv4Addr>,
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
    pub real_endpoints: Vec<Ipv4Addr>,
    /// Every Service is a `NodePort` with its endpoints on [`ENDPOINT_NODE`].
    pub node_ports: bool,
}

impl ServiceSet {
    #[must_use]
    pub fn new(count: usize, real_endpoints: Vec<Ipv4Addr>) -> Self {
        assert!(count >= 1, "at least one Service");
        assert!(count <= 52_000, "at most 52,000 Services (address plan)");
        Self { count, real: count / 2, real_endpoints, node_ports: false }
    }

    /// The same Services, each of type `NodePort` (north-south cases).
    #[must_use]
    pub fn node_ports(count: usize, real_endpoints: Vec<Ipv4Addr>) -> Self {
        assert!(count <= 10_000, "at most 10,000 NodePort Services (node ports 20000-29999)");
        Self { node_ports: true, ..Self::new(count, real_endpoints) }
    }

    /// The `ClusterIP` of Service `i`.
    #[must_use]
    pub fn vip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(VIP_BASE + u32::try_from(i).expect("index"))
    }

    /// The real Service's `ClusterIP`.
    #[must_use]
    pub fn real_vip(&self) -> Ipv4Addr {
        Self::vip(self.real)
    }

    #[must_use]
    pub fn name(i: usize) -> String {
        format!("svc-{i:05}")
    }

    /// The frontends of Service `i` (three for the real one, one otherwise).
    #[must_use]
    pub fn frontends(&self, i: usize) -> Vec<Frontend> {
        let service = Self::name(i);
        let vip = Self::vip(i);
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
            let base = FAKE_EP_BASE + u32::try_from(i * ENDPOINTS).expect("index");
            let endpoints = (0..ENDPOINTS).map(|j| Ipv4Addr::from(base + u32::try_from(j).expect("small"))).collect();
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
        let mut f = Self { count: self.count + 1, real: usize::MAX, real_endpoints: Vec::new(), node_ports: false }.frontends(self.count);
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
    let eps: Vec<(Ipv4Addr, bool)> = fronts[0].endpoints.iter().map(|ip| (*ip, true)).collect();
    let y = service_yaml(&fronts[0].service, fronts[0].vip, &ports, &eps);
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
