//! SCTP Services end to end (issue 14), over IPv4 and IPv6, on the
//! two-node topology of `northsouth.rs` with the agent on node A (TC path):
//! a `ClusterIP` from a pod and a `NodePort` from outside, each to a local
//! and a remote backend, with the Service port (3868) and node port (30868)
//! different from the pods' port (13868), so every translated packet has a
//! port rewritten and its CRC32c fixed by the datapath. The endpoints are
//! real SCTP stacks (`integration_tests::sctp`: usrsctp over raw IP, as
//! this kernel has no SCTP): an association only completes, and a message
//! only arrives, when every checksum the datapath left is right.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use integration_tests::{
    agent::{agent_bin, wait_programmed},
    cluster::{CLIENT_IP, CLIENT_IP6, Cluster, NODE_A_IP, NODE_A_IP6, NODE_A_LINK_IP, NODE_A_LINK_IP6, pod_ip6_a, pod_ip6_b, pod_ip_a, pod_ip_b},
    manifests::write_atomic,
    sctp::{SctpServer, associate},
};
use proxy_common::ct::{SNAT_PORT_MAX, SNAT_PORT_MIN};

const PORT: u16 = 3868;
const TARGET_PORT: u16 = 13868;
const NODE_PORT: u16 = 30868;
const ASSOCIATIONS: usize = 16;
const T: Duration = Duration::from_secs(5);

/// The Service `diameter` (`NodePort`, SCTP 3868 → 13868 on node port
/// 30868) of `family` at `vip`, with an EndpointSlice of `endpoints`.
fn diameter(family: &str, vip: IpAddr, endpoints: &[(IpAddr, &str)]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|(ip, node)| format!("- {{addresses: ['{ip}'], nodeName: {node}}}")).collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: diameter, namespace: default}}
spec:
  type: NodePort
  clusterIP: '{vip}'
  clusterIPs: ['{vip}']
  ipFamilies: [{family}]
  ipFamilyPolicy: SingleStack
  ports:
  - {{name: sig, port: {PORT}, targetPort: {TARGET_PORT}, nodePort: {NODE_PORT}, protocol: SCTP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: diameter-1, namespace: default, labels: {{kubernetes.io/service-name: diameter}}}}
addressType: {family}
ports: [{{name: sig, port: {TARGET_PORT}, protocol: SCTP}}]
endpoints:
{}
",
        eps.join("\n")
    )
}

struct Case {
    family: &'static str,
    vip: IpAddr,
    /// pod-a1 (the in-cluster client), pod-a2 (local backend), pod-b1
    /// (remote backend).
    pods: [IpAddr; 3],
    client: IpAddr,
    node: IpAddr,
    node_link: IpAddr,
}

fn run(case: &Case, prefix: &str) {
    let mut c = Cluster::new(prefix, 2, 1);
    if case.family == "IPv6" {
        c.enable_ipv6();
    }
    let [client_pod, local, remote] = case.pods;
    write_atomic(&c.manifests, "diameter.yaml", &diameter(case.family, case.vip, &[(local, "node-a"), (remote, "node-b")]));
    let _servers = [
        SctpServer::start(&c.pods_a()[1].ns, SocketAddr::new(local, TARGET_PORT), "pod-a2"),
        SctpServer::start(&c.pods_b()[0].ns, SocketAddr::new(remote, TARGET_PORT), "pod-b1"),
    ];
    c.start_agent_a(&agent_bin(), &[]);
    wait_programmed(&c.a.bpffs, Duration::from_secs(20), "the SCTP frontends", |v| {
        v.iter().any(|f| f.protocol == "SCTP" && f.port == NODE_PORT && f.backends.len() == 2)
            && v.iter().any(|f| f.protocol == "SCTP" && f.port == PORT && f.backends.len() == 2)
    });

    // ClusterIP from a pod: no SNAT, the pod's own address arrives.
    let seen = associate(&c.pods_a()[0].ns, Some(client_pod), SocketAddr::new(case.vip, PORT), ASSOCIATIONS, T)
        .unwrap_or_else(|e| panic!("{} ClusterIP: {e}\n{}", case.family, c.a.agent_log()));
    let servers: BTreeSet<&str> = seen.iter().map(|s| s.server.as_str()).collect();
    assert_eq!(servers, BTreeSet::from(["pod-a2", "pod-b1"]), "both backends over the ClusterIP: {seen:?}");
    assert!(seen.iter().all(|s| s.peer.ip() == client_pod), "the pod's address kept: {seen:?}");
    assert!(seen.iter().enumerate().all(|(i, s)| s.message == format!("req-{i}")), "{seen:?}");

    // NodePort from outside: the local backend sees the client, the remote
    // one node A (SNAT, a port of the SNAT range).
    let seen = associate(&c.client, Some(case.client), SocketAddr::new(case.node, NODE_PORT), ASSOCIATIONS, T)
        .unwrap_or_else(|e| panic!("{} NodePort: {e}\n{}", case.family, c.a.agent_log()));
    let servers: BTreeSet<&str> = seen.iter().map(|s| s.server.as_str()).collect();
    assert_eq!(servers, BTreeSet::from(["pod-a2", "pod-b1"]), "both backends over the NodePort: {seen:?}");
    for s in &seen {
        if s.server == "pod-a2" {
            assert_eq!(s.peer.ip(), case.client, "{s:?}");
        } else {
            assert_eq!(s.peer.ip(), case.node_link, "SNAT to node A: {s:?}");
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&s.peer.port()), "SNAT port: {s:?}");
        }
    }

    let counters = c.a.counters(&agent_bin());
    let n = |r: &str| counters.get(r).copied().unwrap_or_default();
    assert!(n("dnat_new_flow") >= 2 * ASSOCIATIONS as u64, "{counters:?}");
    assert!(n("rev_nat_reply") >= 2 * ASSOCIATIONS as u64, "{counters:?}");
    assert_eq!(n("drop_rewrite_failed"), 0, "{counters:?}");
    // The flows are listed as SCTP, by conntrack's state names.
    let bin = agent_bin();
    let out = integration_tests::netns::run(&bin.to_string_lossy(), &["--bpffs", &c.a.bpffs.to_string_lossy(), "conntrack", "-o", "json"]);
    let flows: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("conntrack json: {e}: {out}"));
    let sctp: Vec<&serde_json::Value> = flows.as_array().into_iter().flatten().filter(|f| f["protocol"] == "SCTP").collect();
    assert!(sctp.len() >= 2 * ASSOCIATIONS, "SCTP flows listed: {out}");
    let states: BTreeSet<&str> = sctp.iter().filter_map(|f| f["state"].as_str()).collect();
    assert!(states.iter().all(|s| ["COOKIE_WAIT", "COOKIE_ECHOED", "ESTABLISHED", "CLOSING"].contains(s)), "{states:?}");
}

#[test]
fn sctp_cluster_ip_and_node_port_over_ipv4_with_ports_translated() {
    run(
        &Case {
            family: "IPv4",
            vip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 38)),
            pods: [IpAddr::V4(pod_ip_a(1)), IpAddr::V4(pod_ip_a(2)), IpAddr::V4(pod_ip_b(1))],
            client: IpAddr::V4(CLIENT_IP),
            node: IpAddr::V4(NODE_A_IP),
            node_link: IpAddr::V4(NODE_A_LINK_IP),
        },
        "sctp4",
    );
}

#[test]
fn sctp_cluster_ip_and_node_port_over_ipv6_with_ports_translated() {
    run(
        &Case {
            family: "IPv6",
            vip: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x38)),
            pods: [IpAddr::V6(pod_ip6_a(1)), IpAddr::V6(pod_ip6_a(2)), IpAddr::V6(pod_ip6_b(1))],
            client: IpAddr::V6(CLIENT_IP6),
            node: IpAddr::V6(NODE_A_IP6),
            node_link: IpAddr::V6(NODE_A_LINK_IP6),
        },
        "sctp6",
    );
}

/// A hostNetwork endpoint on the node itself (an SCTP server in node A's
/// own namespace, on its address): a pod's associations through the
/// ClusterIP reach it, and its answers, which the node sends, are
/// translated back on egress (port and checksum included).
#[test]
fn sctp_cluster_ip_to_a_host_network_endpoint_on_the_same_node() {
    let mut c = Cluster::new("sctph", 1, 0);
    let vip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 39));
    let node = IpAddr::V4(NODE_A_IP);
    write_atomic(&c.manifests, "diameter.yaml", &diameter("IPv4", vip, &[(node, "node-a")]));
    let _server = SctpServer::start(&c.a.ns, SocketAddr::new(node, TARGET_PORT), "node-a");
    c.start_agent_a(&agent_bin(), &[]);
    wait_programmed(&c.a.bpffs, Duration::from_secs(20), "the SCTP ClusterIP", |v| {
        v.iter().any(|f| f.protocol == "SCTP" && f.port == PORT && f.backends.len() == 1)
    });
    let pod = IpAddr::V4(pod_ip_a(1));
    let seen = associate(&c.pods_a()[0].ns, Some(pod), SocketAddr::new(vip, PORT), ASSOCIATIONS, T)
        .unwrap_or_else(|e| panic!("ClusterIP to a hostNetwork endpoint: {e}\n{}", c.a.agent_log()));
    assert!(seen.iter().all(|s| s.server == "node-a" && s.peer.ip() == pod), "{seen:?}");
    let counters = c.a.counters(&agent_bin());
    assert_eq!(counters.get("drop_rewrite_failed").copied().unwrap_or_default(), 0, "{counters:?}");
}
