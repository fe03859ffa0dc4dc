//! kube-proxy's rule shapes for the same Services, as `iptables-restore` and
//! `nft -f` input.
//!
//! iptables: the `nat` chains that `pkg/proxy/iptables` writes —
//! `KUBE-SERVICES` (one rule per Service port, matched in order) →
//! `KUBE-SVC-*` (the `KUBE-MARK-MASQ` rule for traffic from outside the
//! cluster CIDR, then the `-m statistic --mode random --probability 1/n`
//! ladder) → `KUBE-SEP-*` (hairpin `KUBE-MARK-MASQ`, `DNAT`), and
//! `KUBE-POSTROUTING` (`MASQUERADE` of marked packets); in `filter`,
//! `KUBE-FORWARD` and the (empty: every Service has endpoints) `KUBE-SERVICES`.
//! Like kube-proxy with more than 1,000 endpoints ("large cluster mode"), the
//! per-endpoint rules carry no comments.
//!
//! nftables: the `ip kube-proxy` table that `pkg/proxy/nftables` writes — the
//! `service-ips` verdict map (`ip daddr . meta l4proto . th dport vmap`),
//! one `service-*` chain per Service port (masquerade mark, then `numgen
//! random mod n vmap`), one `endpoint-*` chain per endpoint (`dnat to`), the
//! `cluster-ips` set and the `filter-forward` checks.
//!
//! IPv6 Services get what kube-proxy's IPv6 proxier writes: the same
//! iptables chains for `ip6tables-restore` (`/128` matches, `[addr]:port`
//! DNAT targets, the IPv6 `--cluster-cidr`, the same MASQUERADE), and the
//! `ip6 kube-proxy` table (`ipv6_addr` sets and maps, `ip6 daddr` /
//! `ip6 saddr`, the IPv6 Service CIDR).
use std::net::IpAddr;

use super::services::{Family, Frontend, SERVICE_CIDR6, ServiceSet, hash16, host_cidr, host_port, line, probability};

fn svc_chain(f: &Frontend) -> String {
    format!("KUBE-SVC-{}", hash16(&format!("{}{}", f.port_name_string(), f.proto.lower())))
}

fn ext_chain(f: &Frontend) -> String {
    format!("KUBE-EXT-{}", hash16(&format!("{}{}", f.port_name_string(), f.proto.lower())))
}

fn sep_chain(f: &Frontend, ep: IpAddr) -> String {
    format!("KUBE-SEP-{}", hash16(&format!("{}{}{ep}:{}", f.port_name_string(), f.proto.lower(), f.target)))
}

/// kube-proxy drops comments on endpoint rules above this many endpoints.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

fn large(set: &ServiceSet) -> bool {
    set.count * super::services::ENDPOINTS > LARGE_CLUSTER_ENDPOINTS
}

/// The `KUBE-SERVICES` rule of one frontend.
fn iptables_services_rule(out: &mut String, f: &Frontend) {
    let p = f.proto.lower();
    line(
        out,
        &format!(
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {} --dport {} -j {}",
            f.port_name_string(),
            host_cidr(f.vip),
            f.port,
            svc_chain(f)
        ),
    );
}

/// The `KUBE-NODEPORTS` rule of a `NodePort` frontend (none otherwise):
/// matched only for local destination addresses (the last `KUBE-SERVICES`
/// rule), one rule per node port, in order.
fn iptables_nodeports_rule(out: &mut String, f: &Frontend) {
    let Some(np) = f.node_port else { return };
    let p = f.proto.lower();
    line(out, &format!("-A KUBE-NODEPORTS -m comment --comment \"{}\" -m {p} -p {p} --dport {np} -j {}", f.port_name_string(), ext_chain(f)));
}

/// Declarations (`:CHAIN - [0:0]`) and rules of one frontend's own chains:
/// `KUBE-EXT-*` for a `NodePort` (externalTrafficPolicy Cluster: mark for
/// masquerade, then the Service chain), `KUBE-SVC-*`, `KUBE-SEP-*`.
fn iptables_frontend_chains(decl: &mut String, rules: &mut String, f: &Frontend, large: bool) {
    let svc = svc_chain(f);
    let p = f.proto.lower();
    let name = f.port_name_string();
    if f.node_port.is_some() {
        let ext = ext_chain(f);
        line(decl, &format!(":{ext} - [0:0]"));
        line(rules, &format!("-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"));
        line(rules, &format!("-A {ext} -j {svc}"));
    }
    line(decl, &format!(":{svc} - [0:0]"));
    line(
        rules,
        &format!(
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {} --dport {} ! -s {} -j KUBE-MARK-MASQ",
            host_cidr(f.vip),
            f.port,
            Family::of(f.vip).cluster_cidr()
        ),
    );
    let n = f.endpoints.len();
    for (k, ep) in f.endpoints.iter().enumerate() {
        let sep = sep_chain(f, *ep);
        line(decl, &format!(":{sep} - [0:0]"));
        let comment = if large { String::new() } else { format!("-m comment --comment \"{name} -> {ep}:{}\" ", f.target) };
        if k + 1 < n {
            line(rules, &format!("-A {svc} {comment}-m statistic --mode random --probability {} -j {sep}", probability(n - k)));
        } else {
            line(rules, &format!("-A {svc} {comment}-j {sep}"));
        }
        let comment = if large { String::new() } else { format!("-m comment --comment {name} ") };
        line(rules, &format!("-A {sep} {comment}-s {} -j KUBE-MARK-MASQ", host_cidr(*ep)));
        line(rules, &format!("-A {sep} {comment}-m {p} -p {p} -j DNAT --to-destination {}", host_port(*ep, f.target)));
    }
}

/// The first `iptables-restore --noflush` input: the fixed chains and the
/// jumps from the built-in chains (kube-proxy adds those with `iptables -I`).
/// The same for `ip6tables-restore`.
#[must_use]
pub fn iptables_base() -> String {
    let mut s = String::new();
    for l in [
        "*filter",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-EXTERNAL-SERVICES - [0:0]",
        ":KUBE-FORWARD - [0:0]",
        ":KUBE-PROXY-FIREWALL - [0:0]",
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "COMMIT",
    ] {
        line(&mut s, l);
    }
    s
}

const NODEPORTS_LAST: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS";

/// `iptables-restore --noflush` inputs that program `set` from nothing, after
/// [`iptables_base`]: `per_chunk` Services per transaction (all in one when
/// `per_chunk >= set.count`). Each appends to `KUBE-SERVICES` in order.
#[must_use]
pub fn iptables_chunks(set: &ServiceSet, per_chunk: usize) -> Vec<String> {
    let large = large(set);
    let mut out = Vec::new();
    let mut start = 0;
    while start < set.count {
        let end = (start + per_chunk.max(1)).min(set.count);
        let (mut decl, mut svc_rules, mut np_rules, mut rules) = (String::new(), String::new(), String::new(), String::new());
        for i in start..end {
            for f in set.frontends(i) {
                iptables_services_rule(&mut svc_rules, &f);
                iptables_nodeports_rule(&mut np_rules, &f);
                iptables_frontend_chains(&mut decl, &mut rules, &f, large);
            }
        }
        if end == set.count {
            line(&mut svc_rules, NODEPORTS_LAST);
        }
        out.push(format!("*nat\n{decl}{svc_rules}{np_rules}{rules}COMMIT\n"));
        start = end;
    }
    out
}

/// kube-proxy's partial sync after one added Service: `KUBE-SERVICES`
/// rewritten whole (declaring it flushes it under `--noflush`), plus the new
/// Service's chains. `set` is the state before; `extra` the added frontend.
#[must_use]
pub fn iptables_add_one(set: &ServiceSet, extra: &Frontend) -> String {
    let large = large(set);
    let (mut decl, mut svc_rules, mut rules) = (String::new(), String::new(), String::new());
    line(&mut decl, ":KUBE-SERVICES - [0:0]");
    for f in set.all_frontends() {
        iptables_services_rule(&mut svc_rules, &f);
    }
    iptables_services_rule(&mut svc_rules, extra);
    line(&mut svc_rules, NODEPORTS_LAST);
    iptables_frontend_chains(&mut decl, &mut rules, extra, large);
    format!("*nat\n{decl}{svc_rules}{rules}COMMIT\n")
}

/// nftables chain names: `service-HASH8-ns/name/proto/port` and
/// `endpoint-HASH8-ns/name/proto/port__ip/port`, as kube-proxy names them.
fn nft_svc_chain(f: &Frontend) -> String {
    let base = format!("default/{}/{}/{}", f.service, f.proto.lower(), f.port_name);
    format!("service-{}-{base}", &hash16(&base)[..8])
}

/// An IPv6 endpoint's colons become dots, as kube-proxy writes them (nft
/// chain names cannot hold colons).
fn nft_ep_chain(f: &Frontend, ep: IpAddr) -> String {
    let ep = ep.to_string().replace(':', ".");
    let base = format!("default/{}/{}/{}__{ep}/{}", f.service, f.proto.lower(), f.port_name, f.target);
    format!("endpoint-{}-{base}", &hash16(&base)[..8])
}

/// The table of the family: `ip kube-proxy` / `ip6 kube-proxy`.
fn table(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip kube-proxy",
        Family::V6 => "ip6 kube-proxy",
    }
}

/// What nft matches addresses of the family with: `ip` / `ip6`.
fn nft_ip(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// The table, its fixed chains, sets and maps, for `family`'s table.
#[must_use]
pub fn nft_base(family: Family) -> String {
    let mut s = String::new();
    let t = table(family);
    let ip = nft_ip(family);
    let addr = match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    };
    let service_cidr = match family {
        Family::V4 => "10.96.0.0/12",
        Family::V6 => SERVICE_CIDR6,
    };
    for l in [
        format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}"),
        format!("add chain {t} mark-for-masquerade"),
        format!("add rule {t} mark-for-masquerade mark set mark or 0x4000"),
        format!("add chain {t} masquerading"),
        format!("add rule {t} masquerading mark and 0x4000 == 0 return"),
        format!("add rule {t} masquerading mark set mark xor 0x4000"),
        format!("add rule {t} masquerading masquerade fully-random"),
        format!("add set {t} cluster-ips {{ type {addr} ; comment \"Active ClusterIPs\" ; }}"),
        format!("add map {t} service-ips {{ type {addr} . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"),
        format!("add map {t} no-endpoint-services {{ type {addr} . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"),
        format!("add chain {t} services"),
        format!("add rule {t} services {ip} daddr . meta l4proto . th dport vmap @service-ips"),
        format!("add chain {t} service-endpoints-check"),
        format!("add rule {t} service-endpoints-check {ip} daddr . meta l4proto . th dport vmap @no-endpoint-services"),
        format!("add chain {t} cluster-ips-check"),
        format!("add rule {t} cluster-ips-check {ip} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""),
        format!("add rule {t} cluster-ips-check {ip} daddr {service_cidr} drop comment \"Drop traffic to unallocated ClusterIPs\""),
        format!("add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}"),
        format!("add rule {t} filter-forward ct state new jump service-endpoints-check"),
        format!("add rule {t} filter-forward ct state new jump cluster-ips-check"),
        format!("add chain {t} filter-output {{ type filter hook output priority -110 ; }}"),
        format!("add rule {t} filter-output ct state new jump service-endpoints-check"),
        format!("add rule {t} filter-output ct state new jump cluster-ips-check"),
        format!("add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}"),
        format!("add rule {t} nat-prerouting jump services"),
        format!("add chain {t} nat-output {{ type nat hook output priority -100 ; }}"),
        format!("add rule {t} nat-output jump services"),
        format!("add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}"),
        format!("add rule {t} nat-postrouting jump masquerading"),
    ] {
        line(&mut s, &l);
    }
    s
}

fn nft_frontend(out: &mut String, f: &Frontend) {
    let family = Family::of(f.vip);
    let t = table(family);
    let ip = nft_ip(family);
    let svc = nft_svc_chain(f);
    let p = f.proto.lower();
    line(out, &format!("add chain {t} {svc}"));
    line(
        out,
        &format!("add rule {t} {svc} {ip} daddr {} {p} dport {} {ip} saddr != {} jump mark-for-masquerade", f.vip, f.port, family.cluster_cidr()),
    );
    let mut vmap = Vec::new();
    for (k, ep) in f.endpoints.iter().enumerate() {
        let chain = nft_ep_chain(f, *ep);
        line(out, &format!("add chain {t} {chain}"));
        line(out, &format!("add rule {t} {chain} {ip} saddr {ep} jump mark-for-masquerade"));
        line(out, &format!("add rule {t} {chain} meta l4proto {p} dnat to {}", host_port(*ep, f.target)));
        vmap.push(format!("{k} : goto {chain}"));
    }
    line(out, &format!("add rule {t} {svc} numgen random mod {} vmap {{ {} }}", f.endpoints.len(), vmap.join(" , ")));
    line(out, &format!("add element {t} cluster-ips {{ {} }}", f.vip));
    line(out, &format!("add element {t} service-ips {{ {} . {p} . {} : goto {svc} }}", f.vip, f.port));
}

/// `nft -f` inputs that program `set` after [`nft_base`], `per_chunk`
/// Services per transaction.
#[must_use]
pub fn nft_chunks(set: &ServiceSet, per_chunk: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < set.count {
        let end = (start + per_chunk.max(1)).min(set.count);
        let mut s = String::new();
        for i in start..end {
            for f in set.frontends(i) {
                nft_frontend(&mut s, &f);
            }
        }
        out.push(s);
        start = end;
    }
    out
}

/// The one transaction kube-proxy's nftables proxier writes for one added
/// Service: its chains and its map elements.
#[must_use]
pub fn nft_add_one(extra: &Frontend) -> String {
    let mut s = String::new();
    nft_frontend(&mut s, extra);
    s
}
