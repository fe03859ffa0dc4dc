//! Services + `EndpointSlices` (+ node facts) → frontends and backends.
//!
//! Pure functions, no I/O. The rules are kube-proxy's (pkg/proxy and the
//! Service API reference):
//! - Services labelled `service.kubernetes.io/service-proxy-name`, headless
//!   Services (`clusterIP: None`) and `type: ExternalName` are not proxied.
//! - `EndpointSlices` belong to the Service named by their
//!   `kubernetes.io/service-name` label in the same namespace.
//! - A Service port takes its endpoints from the slice ports with the same
//!   name and protocol; the slice carries the resolved target port, which is
//!   how a named `targetPort` reaches the proxy.
//! - Ready endpoints (`ready` true or unset) are used; when none is ready,
//!   endpoints that are serving and terminating are (KEP-1669). The first
//!   address of an endpoint is its address; the same address:port in several
//!   slices counts once.
//! - `internalTrafficPolicy: Local` uses only endpoints whose `nodeName` is
//!   this node (with the same terminating fallback); when the Service has
//!   endpoints but none here, its traffic is dropped, not rejected.
//! - Topology: when every ready endpoint carries zone hints and one matches
//!   this node's zone (`topology.kubernetes.io/zone` of its Node), only those
//!   are used; `trafficDistribution: PreferSameNode` likewise with node
//!   hints first. Otherwise all endpoints are (kube-proxy's fallbacks).
//! - A Service with no usable endpoints still gets its frontend, with no
//!   backends: the datapath rejects connections to it (ICMP port
//!   unreachable), as kube-proxy's REJECT rule does.
//!
//! - `sessionAffinity: ClientIP`: the timeout (default 10800 s) and the
//!   Service port's affinity group go into every frontend of the port.
//!
//! Invalid objects (or ports) are skipped with a [`Rejection`] naming them;
//! everything else is unaffected.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::core::v1::Service;
use proxy_common::svc::{
    MAX_BACKENDS_PER_FRONTEND, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT,
};

use crate::store::{AddressType, ObjectKey, ServiceRecord, ServiceType, SliceRecord, Store};

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::proto::TCP,
            Self::Udp => proxy_common::proto::UDP,
            Self::Sctp => proxy_common::proto::SCTP,
        }
    }

    #[must_use]
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::proto::TCP => Some(Self::Tcp),
            proxy_common::proto::UDP => Some(Self::Udp),
            proxy_common::proto::SCTP => Some(Self::Sctp),
            _ => None,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where packets arrive: address, port, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    /// IPv4 or IPv6: each family has its own maps.
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", std::net::SocketAddr::new(self.addr, self.port), self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    /// As Kubernetes users say it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::ExternalIp => "externalIP",
            Self::LoadBalancer => "LoadBalancer",
        }
    }

    #[must_use]
    pub fn flags(self) -> u16 {
        match self {
            Self::ClusterIp => SVC_FLAG_CLUSTER_IP,
            Self::NodePort => SVC_FLAG_NODE_PORT,
            Self::ExternalIp => SVC_FLAG_EXTERNAL_IP,
            Self::LoadBalancer => SVC_FLAG_LOAD_BALANCER,
        }
    }
}

/// A backend address (the protocol is the frontend's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    /// The frontend's family.
    pub addr: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node (`nodeName`).
    pub local: bool,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::net::SocketAddr::new(self.addr, self.port))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ObjectKey,
    /// The Service port's name ("" when unnamed).
    pub port_name: std::sync::Arc<str>,
    pub kind: FrontendKind,
    /// Sorted, without duplicates.
    pub backends: Vec<BackendAddr>,
    /// With no backends: drop (there are endpoints, none usable from this
    /// node) instead of reject (there are none).
    pub drop_when_empty: bool,
    /// The traffic policy for this frontend is Local (internalTrafficPolicy
    /// for a `ClusterIP`, externalTrafficPolicy for the others).
    pub policy_local: bool,
    /// External frontend with externalTrafficPolicy Cluster: remote
    /// backends get the source `NATed` to this node.
    pub snat_remote: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds (0 = none).
    pub affinity_timeout_s: u32,
    /// The Service port's affinity group: the same for every frontend of
    /// one Service port, so a client keeps its backend across them
    /// ([`affinity_group`]).
    pub affinity_group: u32,
    /// `loadBalancerSourceRanges` of a `LoadBalancer` frontend of its own
    /// family, with the node's addresses of that family added (health
    /// checks, hairpin); `None`: open. An invalid range makes the list just
    /// the node's addresses (closed); so does a Service whose ranges are all
    /// of the other family (closed, never open).
    pub source_ranges: Option<Vec<IpCidr>>,
}

impl Frontend {
    /// `namespace/name:port` as shown by `proxy-agent services`.
    #[must_use]
    pub fn display_name(&self) -> String {
        if self.port_name.is_empty() {
            self.service.to_string()
        } else {
            format!("{}:{}", self.service, self.port_name)
        }
    }
}

/// What the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}

/// An object (or part of one) that is skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rejection {
    pub kind: &'static str,
    pub object: ObjectKey,
    pub origin: String,
    /// The text: what is skipped and why (for a conflict, naming the
    /// Service that keeps the frontend).
    pub reason: String,
    /// What kind of refusal it is, for machines (the Kubernetes Event's
    /// `reason`, see [`Cause::code`]).
    pub cause: Cause,
}

/// What kind of refusal a [`Rejection`] is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// A frontend (address:port:protocol) another Service holds (cluster
    /// IPs first, then the oldest Service); `owner` is the one that keeps it.
    FrontendConflict { owner: ObjectKey },
    /// An externalIP refused by policy: inside `--service-cidrs`, on a node
    /// address, or outside `--external-ip-cidrs`.
    ExternalIpRefused,
    /// A `loadBalancerSourceRanges` entry that does not parse (the LB IPs
    /// are served closed).
    InvalidSourceRange,
    /// More endpoints than a frontend holds (the first ones are used).
    TooManyEndpoints,
    /// Valid Kubernetes, not proxied (FQDN EndpointSlices, as kube-proxy).
    Unsupported,
    /// Malformed: what the API server would have refused.
    Invalid,
}

impl Cause {
    /// A stable `PascalCase` code (a Kubernetes Event's `reason`).
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::FrontendConflict { .. } => "FrontendConflict",
            Self::ExternalIpRefused => "ExternalIPRefused",
            Self::InvalidSourceRange => "InvalidSourceRange",
            Self::TooManyEndpoints => "TooManyEndpoints",
            Self::Unsupported => "Unsupported",
            Self::Invalid => "Invalid",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (from {}): {}", self.kind, self.object, self.origin, self.reason)
    }
}

/// Facts about the node the agent runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `topology.kubernetes.io/zone` of the Node, when known.
    pub zone: Option<String>,
    /// The addresses `NodePorts` are served on (see `--nodeport-addresses`).
    pub nodeport_addresses: Vec<IpAddr>,
    /// Also serve `NodePorts` on 127.0.0.1 (the socket path: node-local
    /// clients, as kube-proxy's iptables mode allows with `route_localnet`).
    pub loopback_nodeports: bool,
    /// `--service-cidrs`: externalIPs inside are refused.
    pub service_cidrs: Vec<Cidr>,
    /// `--external-ip-cidrs`: when set, only externalIPs inside are served.
    pub external_ip_cidrs: Option<Vec<Cidr>>,
}

/// An IPv4 CIDR: network address and prefix length.
pub type Cidr = (Ipv4Addr, u8);

/// A CIDR of either family: network address and prefix length.
pub type IpCidr = (IpAddr, u8);

/// Whether `cidr` holds `a`.
#[must_use]
pub fn cidr_contains((net, len): Cidr, a: Ipv4Addr) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
    u32::from(a) & mask == u32::from(net) & mask
}

/// Parses `"10.96.0.0/12,192.168.0.0/16"` (`""`: none).
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (ip, len) = part.split_once('/').ok_or_else(|| format!("{part:?} is not a CIDR"))?;
            let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{part:?}: not an IPv4 address"))?;
            let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(|| format!("{part:?}: bad prefix length"))?;
            Ok((ip, len))
        })
        .collect()
}

impl NodeInfo {
    /// From the agent's own Node object (if the source has it).
    #[must_use]
    pub fn from_node(name: &str, node: Option<&k8s_openapi::api::core::v1::Node>) -> Self {
        Self {
            name: name.to_owned(),
            nodeport_addresses: Vec::new(),
            loopback_nodeports: false,
            service_cidrs: Vec::new(),
            external_ip_cidrs: None,
            zone: node
                .and_then(|n| n.metadata.labels.as_ref())
                .and_then(|l| l.get("topology.kubernetes.io/zone"))
                .cloned(),
        }
    }
}

/// Who came first: `creationTimestamp` (none: after every dated one), then
/// `namespace/name`.
type Age = (Option<jiff::Timestamp>, ObjectKey);

/// Computes the desired frontends from everything in the store.
#[must_use]
pub fn desired_state(store: &Store, node: &NodeInfo) -> (Desired, Vec<Rejection>) {
    let mut rejections = Vec::new();
    let mut desired = Desired::default();
    // Every Service's frontends first; who gets a contested address is
    // decided after, by precedence, never by the order of the objects.
    let mut candidates: Vec<(bool, Age, &str, FrontendKey, Frontend)> = Vec::new();
    for (key, svc) in &store.services {
        let slices = store.slices_of(key);
        let mut mine = Vec::new();
        service_frontends(key, svc, &slices, node, &mut mine, &mut rejections);
        let age = (svc.created, key.clone());
        for (fk, fe) in mine {
            candidates.push((fe.kind != FrontendKind::ClusterIp, age.clone(), &svc.meta.origin, fk, fe));
        }
    }
    // Why: a Service must never take another's address (CVE-2020-8554 with
    // externalIPs, or an LB status pointing at a ClusterIP). ClusterIPs are
    // allocated by the API server and always win; among the rest the
    // oldest Service (creationTimestamp, then namespace/name) keeps what it
    // has, so a newcomer cannot hijack it.
    candidates.sort_by(|a, b| (a.0, a.1.0.is_none(), &a.1).cmp(&(b.0, b.1.0.is_none(), &b.1)));
    for (_, _, origin, fk, fe) in candidates {
        if let Some(owner) = desired.frontends.get(&fk) {
            let why = format!(
                "frontend {fk} is already used by Service {} ({} wins over {}: ClusterIPs first, then the oldest Service)",
                owner.service,
                owner.kind.name(),
                fe.kind.name()
            );
            let cause = Cause::FrontendConflict { owner: owner.service.clone() };
            reject(&mut rejections, "Service", &fe.service, origin, cause, why);
            continue;
        }
        desired.frontends.insert(fk, fe);
    }
    // A slice shared by several ports reports the same problem once per port.
    rejections.sort();
    rejections.dedup();
    (desired, rejections)
}

/// kube-proxy's health-check inputs: the `healthCheckNodePort` of every
/// proxied `LoadBalancer` Service with `externalTrafficPolicy: Local`, and per
/// Service the number of distinct ready endpoint addresses on this node (of
/// its primary family).
#[must_use]
pub fn health_checks(store: &Store, node: &NodeInfo) -> (BTreeMap<ObjectKey, u16>, BTreeMap<ObjectKey, usize>) {
    let mut ports = BTreeMap::new();
    let mut local = BTreeMap::new();
    for (key, svc) in &store.services {
        let (port, n) = service_health(svc, &store.slices_of(key), node);
        if let Some(port) = port {
            ports.insert(key.clone(), port);
        }
        if port.is_some() || proxied(svc) {
            local.insert(key.clone(), n);
        }
    }
    (ports, local)
}

fn proxied(svc: &ServiceRecord) -> bool {
    !svc.other_proxy && svc.cluster_ips.as_ref().is_ok_and(|v| !v.is_empty())
}

/// One Service's health-check inputs: its `healthCheckNodePort` when it
/// needs one, and its ready endpoint addresses on this node.
fn service_health(svc: &ServiceRecord, slices: &[&SliceRecord], node: &NodeInfo) -> (Option<u16>, usize) {
    if !proxied(svc) {
        return (None, 0);
    }
    let needs = svc.type_ == ServiceType::LoadBalancer && svc.external_local && !svc.ports.is_empty();
    let port = svc.health_check_node_port.filter(|_| needs);
    // Distinct addresses as given.
    // The primary family's endpoints (kube-proxy's proxier of that family
    // counts them; both families' slices normally list the same pods).
    let v6 = svc.cluster_ips.as_ref().ok().and_then(|ips| ips.first()).is_some_and(IpAddr::is_ipv6);
    let family = if v6 { AddressType::IPv6 } else { AddressType::IPv4 };
    let mut ips = BTreeSet::new();
    for slice in slices {
        if slice.address_type != family {
            continue;
        }
        for ep in &slice.endpoints {
            let ready = ep.ready().unwrap_or(true);
            if ready && ep.node_name() == Some(node.name.as_str())
                && let Some(ip) = ep.address() {
                    ips.insert(ip);
                }
        }
    }
    (port, ips.len())
}

fn reject(out: &mut Vec<Rejection>, kind: &'static str, key: &ObjectKey, origin: &str, cause: Cause, reason: String) {
    out.push(Rejection {
        kind,
        object: key.clone(),
        origin: origin.to_owned(),
        reason,
        cause,
    });
}

pub(crate) fn parse_protocol(p: Option<&str>) -> Result<Protocol, (Cause, String)> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err((Cause::Invalid, format!("unknown protocol {other:?}"))),
    }
}

pub(crate) fn port_in_range(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|&p| p != 0)
}

/// The Service's cluster IPs, the first of each family in `clusterIPs`
/// order (dual-stack: one IPv4 and one IPv6); empty when it is not proxied
/// (headless, `ExternalName`). A cluster IP of a family `spec.ipFamilies`
/// does not list is an error naming both.
pub(crate) fn cluster_ips(svc: &Service) -> Result<Vec<IpAddr>, (Cause, String)> {
    let invalid = |why: String| (Cause::Invalid, why);
    let spec = svc.spec.as_ref().ok_or_else(|| invalid("has no spec".to_owned()))?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.as_str()],
        _ => return Err(invalid("has no clusterIP".to_owned())),
    };
    if ips[0] == "None" {
        return Ok(Vec::new()); // headless
    }
    let families = spec.ip_families.as_ref().filter(|f| !f.is_empty());
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in &ips {
        let a = match ip.parse::<IpAddr>() {
            Ok(a) if a.is_unspecified() || a.is_multicast() || matches!(a, IpAddr::V4(v4) if v4.is_broadcast()) => {
                return Err(invalid(format!("invalid clusterIP {ip:?}")));
            }
            Ok(a) => a,
            Err(_) => return Err(invalid(format!("invalid clusterIP {ip:?}"))),
        };
        let family = if a.is_ipv4() { "IPv4" } else { "IPv6" };
        if let Some(f) = families.filter(|f| !f.iter().any(|x| x == family)) {
            return Err(invalid(format!("clusterIP {a} is {family}, but ipFamilies is {f:?}")));
        }
        if !out.iter().any(|o| o.is_ipv4() == a.is_ipv4()) {
            out.push(a);
        }
    }
    Ok(out)
}

/// externalIPs and `LoadBalancer` ingress IPs, of both families (an
/// ingress whose `ipMode` is `Proxy` is skipped, as kube-proxy does: the
/// load balancer itself proxies to the nodes).
fn external_ips(svc: &ServiceRecord, key: &ObjectKey, node: &NodeInfo, rejections: &mut Vec<Rejection>) -> Vec<(IpAddr, FrontendKind)> {
    let mut out = Vec::new();
    let origin = &*svc.meta.origin;
    for ip in &svc.external_ips {
        match ip.parse() {
            Ok(IpAddr::V4(a)) => {
                // Why: an externalIP inside the Service range could take a
                // ClusterIP not allocated yet, one on a node address the
                // node's own ports (CVE-2020-8554); and the operator may
                // allow only some ranges (DenyServiceExternalIPs-like).
                let refused = if node.service_cidrs.iter().any(|c| cidr_contains(*c, a)) {
                    Some("is inside the Service CIDR (--service-cidrs)")
                } else if node.nodeport_addresses.contains(&IpAddr::V4(a)) {
                    Some("is an address of this node")
                } else if node.external_ip_cidrs.as_ref().is_some_and(|cs| !cs.iter().any(|c| cidr_contains(*c, a))) {
                    Some("is outside --external-ip-cidrs")
                } else {
                    None
                };
                match refused {
                    Some(why) => reject(rejections, "Service", key, origin, Cause::ExternalIpRefused, format!("externalIP {a} refused: it {why}")),
                    None => out.push((IpAddr::V4(a), FrontendKind::ExternalIp)),
                }
            }
            // (--service-cidrs and --external-ip-cidrs are IPv4 lists: an
            // allow-list refuses every IPv6 address.)
            Ok(IpAddr::V6(a)) if node.external_ip_cidrs.is_some() => {
                reject(rejections, "Service", key, origin, Cause::ExternalIpRefused, format!("externalIP {a} refused: it is outside --external-ip-cidrs"));
            }
            Ok(IpAddr::V6(a)) if node.nodeport_addresses.contains(&IpAddr::V6(a)) => {
                reject(rejections, "Service", key, origin, Cause::ExternalIpRefused, format!("externalIP {a} refused: it is an address of this node"));
            }
            Ok(a @ IpAddr::V6(_)) => out.push((a, FrontendKind::ExternalIp)),
            Err(_) => reject(rejections, "Service", key, origin, Cause::Invalid, format!("invalid externalIP {:?}", ip.text())),
        }
    }
    // (Those with ipMode Proxy are left out of the record.)
    out.extend(svc.ingress_ips.iter().map(|a| (*a, FrontendKind::LoadBalancer)));
    out
}

#[expect(clippy::too_many_lines, reason = "one Service's frontends: per port, per family, per address, in one readable pass")]
fn service_frontends(
    key: &ObjectKey,
    svc: &ServiceRecord,
    slices: &[&SliceRecord],
    node: &NodeInfo,
    out: &mut Vec<(FrontendKey, Frontend)>,
    rejections: &mut Vec<Rejection>,
) {
    const KIND: &str = "Service";
    if svc.other_proxy {
        return;
    }
    let origin = &*svc.meta.origin;
    let vips = match &svc.cluster_ips {
        Ok(v) if v.is_empty() => return,
        Ok(v) => v,
        Err(e) => return reject(rejections, KIND, key, origin, e.0.clone(), e.1.clone()),
    };
    let ports = &svc.ports;
    // A port out of range makes the whole object invalid (the API server
    // would have refused it): skip it entirely rather than half of it.
    if let Some(bad) = ports.iter().find(|p| port_in_range(p.port).is_none()) {
        return reject(rejections, KIND, key, origin, Cause::Invalid, format!("port {} is out of range 1-65535", bad.port));
    }
    let itp_local = svc.internal_local;
    let etp_local = svc.external_local;
    let prefer_same_node = svc.prefer_same_node;
    let external_ips = external_ips(svc, key, node, rejections);
    // An address of a family the Service has no cluster IP of is not
    // served (kube-proxy programs each family from its own clusterIP).
    for (a, kind) in external_ips.iter().filter(|(a, _)| !vips.iter().any(|v| v.is_ipv4() == a.is_ipv4())) {
        reject(rejections, KIND, key, origin, Cause::Invalid, format!("{} {a} is {}, a family the Service has no clusterIP of (ipFamilies)", kind.name(), if a.is_ipv4() { "IPv4" } else { "IPv6" }));
    }
    let affinity_timeout = svc.affinity_timeout_s;
    let source_ranges = lb_source_ranges(svc, key, node, rejections);
    let mut mine: Vec<(FrontendKey, Frontend)> = Vec::new();
    for sp in ports {
        let port_name = &*sp.name;
        let protocol = match &sp.protocol {
            Ok(p) => *p,
            Err(e) => {
                reject(rejections, KIND, key, origin, e.0.clone(), format!("port {port_name:?} ({}): {}", sp.port, e.1));
                continue;
            }
        };
        let port = port_in_range(sp.port).expect("checked above");
        for &vip in vips {
            let v6 = vip.is_ipv6();
            // Every address this port is reachable on, with its kind.
            let mut keys = vec![(FrontendKey { addr: vip, port, protocol }, FrontendKind::ClusterIp)];
            if matches!(svc.type_, ServiceType::NodePort | ServiceType::LoadBalancer) {
                match sp.node_port.map(port_in_range) {
                    // On the node's addresses of this family (127.0.0.1 too
                    // for the socket path; kube-proxy serves none on ::1).
                    Some(Some(np)) => {
                        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
                        keys.extend(
                            node.nodeport_addresses
                                .iter()
                                .copied()
                                .chain((!v6 && node.loopback_nodeports && !node.nodeport_addresses.contains(&lo)).then_some(lo))
                                .filter(|a| a.is_ipv6() == v6)
                                .map(|a| (FrontendKey { addr: a, port: np, protocol }, FrontendKind::NodePort)),
                        );
                    }
                    Some(None) => reject(
                        rejections,
                        KIND,
                        key,
                        origin,
                        Cause::Invalid,
                        format!("port {port_name:?}: nodePort {} is out of range", sp.node_port.unwrap_or_default()),
                    ),
                    None => {}
                }
            }
            keys.extend(external_ips.iter().filter(|(a, _)| a.is_ipv6() == v6).map(|(a, kind)| (FrontendKey { addr: *a, port, protocol }, *kind)));
            let endpoints = endpoints_for_port(port_name, protocol, v6, slices, rejections);
            let group = affinity_group(key, port_name, protocol);
            for (fk, kind) in keys {
                // Why: two ports of one Service on the same frontend (the API
                // server refuses it, a manifest may not) would silently replace
                // each other; keep the first.
                if mine.iter().any(|(k, _)| *k == fk) {
                    reject(rejections, KIND, key, origin, Cause::Invalid, format!("port {port_name:?}: frontend {fk} is already used by another port of this Service"));
                    continue;
                }
                let external = kind != FrontendKind::ClusterIp;
                let policy_local = if external { etp_local } else { itp_local };
                let (mut backends, drop_when_empty) = select_backends(&endpoints, node, policy_local, prefer_same_node);
                if backends.len() > usize::from(MAX_BACKENDS_PER_FRONTEND) {
                    reject(
                        rejections,
                        KIND,
                        key,
                        origin,
                        Cause::TooManyEndpoints,
                        format!("port {port_name:?} has {} endpoints; only the first {MAX_BACKENDS_PER_FRONTEND} are used", backends.len()),
                    );
                    backends.truncate(usize::from(MAX_BACKENDS_PER_FRONTEND));
                }
                mine.push((
                    fk,
                    Frontend {
                        service: key.clone(),
                        port_name: sp.name.clone(),
                        kind,
                        backends,
                        drop_when_empty,
                        policy_local,
                        // externalTrafficPolicy Cluster: remote backends need SNAT.
                        snat_remote: external && !etp_local,
                        affinity_timeout_s: affinity_timeout,
                        affinity_group: group,
                        // The ranges of the frontend's family only.
                        source_ranges: if kind == FrontendKind::LoadBalancer {
                            source_ranges.as_ref().map(|r| r.iter().filter(|(a, _)| a.is_ipv6() == v6).copied().collect())
                        } else {
                            None
                        },
                    },
                ));
        }
        }
    }
    out.extend(mine);
}

/// `spec.loadBalancerSourceRanges` as kube-proxy applies them to the LB
/// ingress IPs: `None` when unset (open); else the ranges of both families
/// plus the node's addresses (as /32 and /128: health checks and hairpin
/// traffic come from them); each frontend keeps those of its own family. A
/// range that does not parse is reported by name and the Service is served
/// closed (only the node's addresses), never open.
fn lb_source_ranges(svc: &ServiceRecord, key: &ObjectKey, node: &NodeInfo, rejections: &mut Vec<Rejection>) -> Option<Vec<IpCidr>> {
    let ranges = svc.source_ranges.as_ref()?;
    let mut out: Vec<IpCidr> = node.nodeport_addresses.iter().map(|a| (*a, if a.is_ipv4() { 32 } else { 128 })).collect();
    let mut parsed = Vec::new();
    for r in ranges {
        let one = if r.trim().contains(':') {
            parse_cidr6(r.trim()).map(|(a, l)| vec![(IpAddr::V6(a), l)])
        } else {
            parse_cidrs(r).map(|c| c.into_iter().map(|(a, l)| (IpAddr::V4(a), l)).collect())
        };
        match one {
            Ok(c) => parsed.extend(c),
            Err(e) => {
                reject(
                    rejections,
                    "Service",
                    key,
                    &svc.meta.origin,
                    Cause::InvalidSourceRange,
                    format!("loadBalancerSourceRanges {r:?}: {e}; its LoadBalancer IPs accept no client but the node (served closed)"),
                );
                out.sort();
                out.dedup();
                return Some(out);
            }
        }
    }
    // Normalised (host bits cleared), as the LPM tries store them.
    out.extend(parsed.into_iter().map(|(a, len)| (cidr_network(a, len), len)));
    out.sort();
    out.dedup();
    Some(out)
}

/// The network address of `addr/len` (host bits cleared).
fn cidr_network(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len.min(128))) };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// Parses one IPv6 CIDR (`"2001:db8::/64"`).
fn parse_cidr6(part: &str) -> Result<(Ipv6Addr, u8), String> {
    let (ip, len) = part.split_once('/').ok_or_else(|| format!("{part:?} is not a CIDR"))?;
    let ip: Ipv6Addr = ip.parse().map_err(|_| format!("{part:?}: not an IPv6 address"))?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 128).ok_or_else(|| format!("{part:?}: bad prefix length"))?;
    Ok((ip, len))
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// `sessionAffinity: ClientIP` → its timeout in seconds (default 10800,
/// the API's range 1..=86400 enforced by clamping); anything else → 0.
pub(crate) fn session_affinity_timeout(spec: Option<&k8s_openapi::api::core::v1::ServiceSpec>) -> u32 {
    let Some(spec) = spec.filter(|s| s.session_affinity.as_deref() == Some("ClientIP")) else {
        return 0;
    };
    let t = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .map_or(DEFAULT_AFFINITY_TIMEOUT_S, |t| u32::try_from(t.clamp(1, 86_400)).unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S));
    t.max(1)
}

/// The affinity group of a Service port: FNV-1a of `namespace/name:port/PROTO`.
/// Stable across restarts without any allocation; two ports that happened
/// to share a group could only share an entry whose backend the datapath
/// then finds missing from the other's slots, so it never misroutes.
#[must_use]
pub fn affinity_group(svc: &ObjectKey, port_name: &str, protocol: Protocol) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in format!("{svc}:{port_name}/{protocol}").bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    // 0 is reserved for "no group".
    h.max(1)
}

/// One endpoint of a Service port, as the slices describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint<'a> {
    backend: BackendAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node_name: Option<&'a str>,
    zone_hints: &'a [std::sync::Arc<str>],
    node_hints: &'a [std::sync::Arc<str>],
}

/// Whether `hints` name `name`.
fn hinted(hints: &[std::sync::Arc<str>], name: &str) -> bool {
    hints.iter().any(|h| **h == *name)
}

/// The endpoints of one Service port in the slices of one family
/// (`addressType` IPv4, or IPv6 with `v6`).
fn endpoints_for_port<'a>(
    port_name: &str,
    protocol: Protocol,
    v6: bool,
    slices: &[&'a SliceRecord],
    rejections: &mut Vec<Rejection>,
) -> Vec<Endpoint<'a>> {
    const KIND: &str = "EndpointSlice";
    let mut out: BTreeMap<BackendAddr, Endpoint<'a>> = BTreeMap::new();
    let (family, address_type) = if v6 { ("IPv6", AddressType::IPv6) } else { ("IPv4", AddressType::IPv4) };
    for &slice in slices {
        let key = slice.key();
        let origin = &*slice.meta.origin;
        if slice.address_type == AddressType::Fqdn && !v6 {
            // (Reported once, with the IPv4 pass.)
            reject(rejections, KIND, key, origin, Cause::Unsupported, "addressType FQDN is not proxied (as kube-proxy)".to_owned());
        }
        // The other family's slices serve the other family's frontends.
        if slice.address_type != address_type {
            continue;
        }
        let Some(target) = slice.ports.iter().find(|p| *p.name == *port_name && p.protocol == Some(protocol)) else {
            continue;
        };
        let Some(port) = target.port.and_then(port_in_range) else {
            reject(
                rejections,
                KIND,
                key,
                origin,
                Cause::Invalid,
                format!("port {port_name:?} has no valid port number ({:?})", target.port),
            );
            continue;
        };
        for ep in &slice.endpoints {
            let Some(first) = ep.address() else {
                continue;
            };
            let addr = match first.parse() {
                Ok(a) if a.is_ipv6() == v6 => a,
                _ => {
                    reject(rejections, KIND, key, origin, Cause::Invalid, format!("endpoint address {:?} is not an {family} address", first.text()));
                    continue;
                }
            };
            // Unset `ready` means ready; unset `serving` means the same as
            // ready; unset `terminating` means not terminating (API docs).
            let ready = ep.ready().unwrap_or(true);
            let serving = ep.serving().unwrap_or(ready);
            let terminating = ep.terminating().unwrap_or(false);
            let backend = BackendAddr { addr, port, local: false };
            // The same address:port in two slices counts once (the first).
            out.entry(backend).or_insert_with(|| Endpoint {
                backend,
                ready,
                serving,
                terminating,
                node_name: ep.node_name(),
                zone_hints: ep.zone_hints(),
                node_hints: ep.node_hints(),
            });
        }
    }
    out.into_values().collect()
}

/// Which endpoints topology-aware routing keeps (kube-proxy's
/// `topologyModeFromHints`): hints are used only when every ready endpoint
/// carries them and at least one matches this node (`PreferSameNode`) or its
/// zone; otherwise all endpoints are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    All,
    SameNode,
    SameZone,
}

fn topology_mode(endpoints: &[Endpoint], node: &NodeInfo, prefer_same_node: bool) -> TopologyMode {
    let ready = || endpoints.iter().filter(|e| e.ready);
    let all_node_hints = ready().all(|e| !e.node_hints.is_empty());
    let for_node = ready().any(|e| hinted(e.node_hints, &node.name));
    if prefer_same_node && all_node_hints && for_node {
        return TopologyMode::SameNode;
    }
    let all_zone_hints = ready().all(|e| !e.zone_hints.is_empty());
    let for_zone = node.zone.as_ref().is_some_and(|z| ready().any(|e| hinted(e.zone_hints, z)));
    if ready().next().is_some() && all_zone_hints && for_zone {
        return TopologyMode::SameZone;
    }
    TopologyMode::All
}

/// The backends a frontend uses, and whether an empty list means "drop"
/// (endpoints exist, none usable from here) rather than "reject" (none at
/// all) — kube-proxy's `CategorizeEndpoints`:
/// - cluster traffic: ready endpoints (narrowed by topology), else those
///   that are serving and terminating;
/// - `internalTrafficPolicy: Local`: this node's ready endpoints, else its
///   serving-and-terminating ones; none → dropped, not rejected.
fn select_backends(endpoints: &[Endpoint], node: &NodeInfo, local_only: bool, prefer_same_node: bool) -> (Vec<BackendAddr>, bool) {
    let is_local = |e: &Endpoint| e.node_name == Some(node.name.as_str());
    // (Of the exact length: the desired state keeps these lists.)
    let pick = |f: &dyn Fn(&Endpoint) -> bool| -> Vec<BackendAddr> {
        let mut v = Vec::with_capacity(endpoints.iter().filter(|e| f(e)).count());
        v.extend(endpoints.iter().filter(|e| f(e)).map(|e| BackendAddr { local: is_local(e), ..e.backend }));
        v
    };
    let has_any = endpoints.iter().any(|e| e.ready || (e.serving && e.terminating));
    if local_only {
        let mut v = pick(&|e| is_local(e) && e.ready);
        if v.is_empty() {
            v = pick(&|e| is_local(e) && e.serving && e.terminating);
        }
        let drop = v.is_empty() && has_any;
        return (v, drop);
    }
    let mode = topology_mode(endpoints, node, prefer_same_node);
    let mut v = pick(&|e| {
        e.ready
            && match mode {
                TopologyMode::All => true,
                TopologyMode::SameNode => hinted(e.node_hints, &node.name),
                TopologyMode::SameZone => node.zone.as_ref().is_some_and(|z| hinted(e.zone_hints, z)),
            }
    });
    if v.is_empty() {
        v = pick(&|e| e.serving && e.terminating);
    }
    (v, false)
}

mod tracker;
pub use tracker::Tracker;

#[cfg(test)]
mod tests;
