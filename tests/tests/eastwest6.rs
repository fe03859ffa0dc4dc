//! IPv6 east-west in the shapes real clusters have: a Service whose
//! endpoint is a hostNetwork server on the same node (`kubernetes.default`
//! on a control-plane node, over IPv6), reached by a pod on the per-packet
//! (TC) path, where the reply is generated on the node and must be
//! translated back at the pod veth's egress, and by a node-local process
//! and a pod in the agent's cgroup on the socket path. Real processes, real
//! sockets, no default routes; every loop is bounded.
use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use integration_tests::{
    agent::{agent_bin, wait_programmed},
    client::http_get,
    manifests::write_atomic,
    sandbox::{NODE_IP6, Sandbox},
    servers::http_server_dual,
};

const API_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 1);
const T: Duration = Duration::from_secs(2);

fn sockclient() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sockclient"))
}

/// `name peer` lines of `sockclient`: every request answered by `want`,
/// and the socket API showing `peer` (the Service address), not the
/// endpoint.
fn assert_answers(lines: &[String], want: &str, peer: &str, what: &str) {
    assert!(!lines.is_empty(), "{what}: no answer");
    for l in lines {
        assert_eq!(l.split_once(' '), Some((want, peer)), "{what}: {lines:?}");
    }
}

#[test]
fn pods_and_the_node_reach_an_ipv6_service_whose_endpoint_is_a_host_network_server_on_this_node() {
    let mut sb = Sandbox::new("hostep6", 2);
    sb.enable_ipv6();
    sb.servers.push(http_server_dual(&sb.node, 6443, "apiserver"));
    let svc = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: kubernetes, namespace: default}}
spec:
  clusterIP: '{API_VIP6}'
  clusterIPs: ['{API_VIP6}']
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports: [{{name: https, port: 443, targetPort: 6443, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: kubernetes, namespace: default, labels: {{kubernetes.io/service-name: kubernetes}}}}
addressType: IPv6
ports: [{{name: https, port: 6443, protocol: TCP}}]
endpoints:
- {{addresses: ['{NODE_IP6}'], nodeName: node, conditions: {{ready: true}}}}
"
    );
    write_atomic(&sb.manifests, "kubernetes.yaml", &svc);
    sb.start_agent(&agent_bin());
    let v = wait_programmed(&sb.bpffs, Duration::from_secs(15), "the IPv6 kubernetes Service", |v| {
        v.iter().any(|f| f.family == "IPv6" && f.address == API_VIP6.to_string() && f.backends.len() == 1)
    });
    assert!(!v.iter().any(|f| f.family == "IPv4" && f.service.starts_with("default/kubernetes")), "an IPv6-only Service: {v:#?}");

    // A pod, not in the cgroup: the per-packet path. Its route to the
    // Service range goes to the node, as a CNI's does.
    let pod = &sb.pods[0];
    pod.ns.ip(&["-6", "route", "add", "fd00:96::/112", "via", "fe80::1", "dev", "eth0"]);
    let target = SocketAddr::new(IpAddr::V6(API_VIP6), 443);
    let before = sb.counters(&agent_bin());
    let got: Vec<String> = pod.ns.run(move || (0..20).map(|_| http_get(target, T).unwrap_or_else(|e| format!("error: {e}"))).collect());
    assert!(got.iter().all(|g| g == "apiserver"), "pod → [{API_VIP6}]:443 over the TC path: {got:?}\n{}", sb.agent_log());
    let after = sb.counters(&agent_bin());
    let d = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    assert!(d("dnat_new_flow") >= 20, "the pod's flows are translated per packet: {after:?}");
    assert!(d("rev_nat_reply") >= 20, "the node's replies are translated back at the pod veth: {after:?}");

    // The socket path: a node-local process, then a pod in the cgroup.
    let t = target.to_string();
    let lines = sb.cgroup_client(&sb.node, sockclient(), &["http", &t, "10"]);
    assert_answers(&lines, "apiserver", &t, "node-local → IPv6 hostNetwork endpoint");
    let lines = sb.cgroup_client(&sb.pods[1].ns, sockclient(), &["http", &t, "10"]);
    assert_answers(&lines, "apiserver", &t, "pod in the cgroup → IPv6 hostNetwork endpoint");
    let last = sb.counters(&agent_bin());
    let s = |k: &str| last.get(k).copied().unwrap_or(0) - after.get(k).copied().unwrap_or(0);
    assert!(s("sock_translated") >= 20, "socket path: {last:?}");
}
