//! Views of the pinned maps for `proxy-agent services` and `stats`: read from
//! the maps alone, so they work while the agent is down.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::Serialize;

use proxy_common::{
    stats::{ByFamily, FAMILIES, REASONS, total},
    svc::{SvcValue, SVC_FLAG_CLUSTER_IP, SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_POLICY_LOCAL, SVC_FLAG_SNAT_REMOTE, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT},
};

use crate::{datapath::MapsDump, model::Protocol};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub address: String,
    pub port: u16,
    /// False when a slot points at an id missing from the backend map.
    pub present: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendView {
    pub address: String,
    /// `IPv4` or `IPv6`.
    pub family: String,
    pub port: u16,
    pub protocol: String,
    pub kind: String,
    pub svc_id: u32,
    pub service: String,
    /// With no backends, traffic is dropped (not rejected).
    pub drop_when_empty: bool,
    /// Traffic policy of this frontend: "Cluster" or "Local".
    pub policy: String,
    /// Remote backends are reached with the source `NATed` to this node.
    pub snat_remote: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges` (with the node's addresses), when set.
    pub source_ranges: Option<Vec<String>>,
    pub backends: Vec<BackendView>,
}

fn kind_of(flags: u16) -> &'static str {
    match flags {
        f if f & SVC_FLAG_NODE_PORT != 0 => "NodePort",
        f if f & SVC_FLAG_LOAD_BALANCER != 0 => "LoadBalancer",
        f if f & SVC_FLAG_EXTERNAL_IP != 0 => "ExternalIP",
        f if f & SVC_FLAG_CLUSTER_IP != 0 => "ClusterIP",
        _ => "?",
    }
}

/// Frontends with their backends, both families, sorted by address, port,
/// protocol.
#[must_use]
pub fn services_view(dump: &MapsDump) -> Vec<FrontendView> {
    let v4 = dump.backends.iter().map(|(id, b)| (*id, (IpAddr::V4(Ipv4Addr::from(u32::from_be(b.addr_be))), u16::from_be(b.port_be))));
    let v6 = dump.backends6.iter().map(|(id, b)| (*id, (IpAddr::V6(Ipv6Addr::from(b.addr)), u16::from_be(b.port_be))));
    let backends: BTreeMap<u32, (IpAddr, u16)> = v4.chain(v6).collect();
    let names: BTreeMap<u32, &str> = dump.names.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // (address, port, protocol, scope) → slot → value
    let mut slots: BTreeMap<(IpAddr, u16, u8, u8), BTreeMap<u16, SvcValue>> = BTreeMap::new();
    for (k, v) in &dump.svc {
        let a = IpAddr::V4(Ipv4Addr::from(u32::from_be(k.addr_be)));
        slots.entry((a, u16::from_be(k.port_be), k.proto, k.scope)).or_default().insert(k.backend_slot, *v);
    }
    for (k, v) in &dump.svc6 {
        let a = IpAddr::V6(Ipv6Addr::from(k.addr));
        slots.entry((a, u16::from_be(k.port_be), k.proto, k.scope)).or_default().insert(k.backend_slot, *v);
    }
    let mut out = Vec::new();
    for ((addr, port, proto, _), fe) in &slots {
        let Some(head) = fe.get(&0) else { continue };
        let backends = (1..=head.count)
            .map(|s| {
                let id = fe.get(&s).map_or(0, |v| v.backend_id);
                match backends.get(&id) {
                    Some((a, p)) => BackendView { id, address: a.to_string(), port: *p, present: true },
                    None => BackendView { id, address: "?".into(), port: 0, present: false },
                }
            })
            .collect();
        out.push(FrontendView {
            address: addr.to_string(),
            family: if addr.is_ipv4() { "IPv4" } else { "IPv6" }.to_owned(),
            port: *port,
            protocol: Protocol::from_number(*proto).map_or_else(|| proto.to_string(), |p| p.as_str().to_owned()),
            kind: kind_of(head.flags).to_owned(),
            svc_id: head.svc_id,
            service: names.get(&head.svc_id).map_or_else(String::new, |s| (*s).to_owned()),
            drop_when_empty: head.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0,
            policy: if head.flags & SVC_FLAG_POLICY_LOCAL != 0 { "Local" } else { "Cluster" }.to_owned(),
            snat_remote: head.flags & SVC_FLAG_SNAT_REMOTE != 0,
            affinity_timeout_s: head.affinity_timeout_s,
            source_ranges: (head.flags & proxy_common::svc::SVC_FLAG_SOURCE_RANGES != 0).then(|| {
                // Only the frontend's family: the datapath looks nowhere else.
                dump.ranges.iter().filter(|(id, a, _)| *id == head.svc_id && a.is_ipv4() == addr.is_ipv4()).map(|(_, a, l)| format!("{a}/{l}")).collect()
            }),
            backends,
        });
    }
    // IPv4 first, then IPv6, each by address (the map order above).
    out
}

/// Pads columns to their widest cell.
#[must_use]
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut s = String::new();
    let line = |s: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ", w = widths[i]);
            }
        }
        s.push('\n');
    };
    line(&mut s, &mut header.iter().copied());
    for r in rows {
        line(&mut s, &mut r.iter().map(String::as_str));
    }
    s
}

/// `address:port`, an IPv6 address in brackets (`[fd00::10]:80`), as
/// `SocketAddr` prints it and `conntrack` shows it.
fn host_port(address: &str, port: u16) -> String {
    if address.contains(':') { format!("[{address}]:{port}") } else { format!("{address}:{port}") }
}

#[must_use]
pub fn services_table(view: &[FrontendView]) -> String {
    let rows: Vec<Vec<String>> = view
        .iter()
        .map(|f| {
            let backends = if f.backends.is_empty() && f.drop_when_empty {
                "(none on this node: dropped)".to_owned()
            } else if f.backends.is_empty() {
                "(none: rejected)".to_owned()
            } else {
                f.backends
                    .iter()
                    .map(|b| if b.present { host_port(&b.address, b.port) } else { format!("<missing id {}>", b.id) })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            vec![
                format!("{}/{}", host_port(&f.address, f.port), f.protocol),
                f.kind.clone(),
                f.policy.clone(),
                if f.affinity_timeout_s == 0 { "-".to_owned() } else { format!("ClientIP/{}s", f.affinity_timeout_s) },
                f.service.clone(),
                f.svc_id.to_string(),
                backends,
            ]
        })
        .collect();
    table(&["FRONTEND", "KIND", "POLICY", "AFFINITY", "SERVICE", "ID", "BACKENDS"], &rows)
}

/// `proxy-agent conntrack` as a table.
#[must_use]
pub fn conntrack_table(flows: &[crate::conntrack::FlowView]) -> String {
    let rows: Vec<Vec<String>> = flows
        .iter()
        .map(|f| {
            vec![
                f.protocol.clone(),
                f.client.clone(),
                f.frontend.clone(),
                f.backend.clone(),
                f.snat.clone().unwrap_or_else(|| "-".to_owned()),
                f.state.clone(),
                format!("{:.0}s", f.age_seconds),
                format!("{:.0}s", f.expires_in_seconds),
                f.service.clone(),
            ]
        })
        .collect();
    table(&["PROTO", "CLIENT", "FRONTEND", "BACKEND", "SNAT", "STATE", "IDLE", "EXPIRES", "SERVICE"], &rows)
}

/// One exit reason's counters (`proxy-agent stats`): `packets` and `bytes`
/// are the sum over families, `families` the split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatView {
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
    /// Every family, in the order `ipv4`, `ipv6`, `other` (neither: ARP, ...).
    pub families: Vec<FamilyStatView>,
}

/// One family's share of an exit reason's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FamilyStatView {
    /// `ipv4`, `ipv6` or `other` (as the metrics' `family` label).
    pub family: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

impl StatView {
    /// Packets of `family` (`ipv4`, `ipv6`, `other`); 0 for an unknown name.
    #[must_use]
    pub fn packets_of(&self, family: &str) -> u64 {
        self.families.iter().find(|f| f.family == family).map_or(0, |f| f.packets)
    }
}

#[must_use]
pub fn stats_view(counters: &[(u32, ByFamily)]) -> Vec<StatView> {
    counters
        .iter()
        .filter_map(|(idx, c)| {
            let name = REASONS.iter().find(|(i, _)| i == idx)?.1;
            let sum = total(c);
            let families = FAMILIES
                .iter()
                .map(|&(f, family)| FamilyStatView { family, packets: c[f as usize].packets, bytes: c[f as usize].bytes })
                .collect();
            Some(StatView { reason: name, packets: sum.packets, bytes: sum.bytes, families })
        })
        .collect()
}

/// Packets by family, then the totals (packets and bytes).
#[must_use]
pub fn stats_table(view: &[StatView]) -> String {
    let rows: Vec<Vec<String>> = view
        .iter()
        .map(|s| {
            let mut row = vec![s.reason.to_owned()];
            row.extend(FAMILIES.iter().map(|(_, f)| s.packets_of(f).to_string()));
            row.extend([s.packets.to_string(), s.bytes.to_string()]);
            row
        })
        .collect();
    table(&["REASON", "IPV4", "IPV6", "OTHER", "PACKETS", "BYTES"], &rows)
}

#[cfg(test)]
mod tests;
