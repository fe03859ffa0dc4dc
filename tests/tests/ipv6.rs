//! IPv6 and dual-stack Services end to end on the real kernel: a sandbox
//! with IPv6 on the client/node link and on every pod (no default routes),
//! the agent as a real process, real clients and servers of both
//! families, the per-packet (TC) path.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{agent_bin, wait_programmed},
    client::{http_get, udp_request},
    manifests::write_atomic,
    sandbox::{Sandbox, pod_ip, pod_ip6},
};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
const T: Duration = Duration::from_secs(2);

/// A dual-stack Service `name` (IPv4 and IPv6 cluster IPs; HTTP 80→8080,
/// DNS 53→5353/UDP) with one slice per family holding `pods`.
fn dual_stack_yaml(name: &str, vip4: Ipv4Addr, vip6: Ipv6Addr, pods: &[usize]) -> String {
    let mut y = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {vip4}
  clusterIPs: [{vip4}, '{vip6}']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}
"
    );
    for (family, addrs) in [
        ("IPv4", pods.iter().map(|i| pod_ip(*i).to_string()).collect::<Vec<_>>()),
        ("IPv6", pods.iter().map(|i| pod_ip6(*i).to_string()).collect()),
    ] {
        let eps: Vec<String> = addrs.iter().map(|a| format!("  - addresses: ['{a}']")).collect();
        let _ = write!(
            y,
            "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-{}
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: {family}
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:{}
{}
",
            family.to_lowercase(),
            if eps.is_empty() { " []" } else { "" },
            eps.join("\n")
        );
    }
    y
}

/// A dual-stack Service reached over IPv6 and IPv4 from a client namespace:
/// every backend of each family answers, TCP and UDP; replies come back
/// from the cluster IP; a Service without endpoints refuses IPv6 clients
/// (`ICMPv6` port unreachable); `services -o json` shows both families.
#[test]
fn a_dual_stack_cluster_ip_serves_both_families_on_the_tc_path() {
    let mut sb = Sandbox::new("ip6", 3);
    sb.enable_ipv6();
    sb.serve_http_dual(8080);
    sb.serve_udp_dual(5353);
    write_atomic(&sb.manifests, "web.yaml", &dual_stack_yaml("web", VIP4, VIP6, &[1, 2, 3]));
    write_atomic(&sb.manifests, "empty.yaml", &dual_stack_yaml("empty", Ipv4Addr::new(10, 96, 0, 11), EMPTY6, &[]));
    sb.start_agent(&agent_bin());
    let v = wait_programmed(&sb.bpffs, Duration::from_secs(15), "both families of web", |v| {
        v.iter().filter(|f| f.service.starts_with("default/web") && f.backends.len() == 3).count() == 4
    });
    assert!(v.iter().any(|f| f.family == "IPv6" && f.address == VIP6.to_string()), "{v:#?}");

    for vip in [IpAddr::V6(VIP6), IpAddr::V4(VIP4)] {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < 3 {
            let r = sb.client.run(move || http_get(SocketAddr::new(vip, 80), T));
            match r {
                Ok(pod) => *seen.entry(pod).or_default() += 1,
                Err(e) => panic!("HTTP to {vip}: {e}\n{}", sb.agent_log()),
            }
            assert!(Instant::now() < deadline, "not every backend answered on {vip}: {seen:?}");
        }
        let udp = sb.client.run(move || udp_request(SocketAddr::new(vip, 53), "hi", T));
        assert!(udp.as_deref().is_ok_and(|r| r.starts_with("pod") && r.ends_with(":hi")), "UDP to {vip}: {udp:?}");
    }

    // Refused, not timed out. (Linux aborts an IPv6 connect on the ICMPv6
    // port unreachable that answers the retransmitted SYN, ~1 s in; the
    // same with ip6tables' REJECT and no proxy at all.)
    let started = Instant::now();
    let err = sb.client.run(|| http_get(SocketAddr::new(IpAddr::V6(EMPTY6), 80), Duration::from_secs(5))).expect_err("no endpoints: refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "refused, not by timeout: {:?}", started.elapsed());
    let counters = sb.counters(&agent_bin());
    assert!(counters.get("reject_no_backend").copied().unwrap_or_default() >= 1, "{counters:?}");
}
