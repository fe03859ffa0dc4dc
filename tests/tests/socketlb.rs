//! Socket-level load balancing and east-west shapes on the real kernel:
//! node-local clients (processes in the node's network namespace, put in
//! the sandbox's own cgroup, which is the agent's `--cgroup`), hostNetwork
//! endpoints on the same node, session affinity on the socket and TC paths,
//! UDP flows whose endpoint leaves, `--socket-lb host-only`, a bad
//! `--cgroup`, and `cleanup`. The clients are real processes
//! (`sockclient`) with real sockets; every loop is bounded.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{agent_bin, wait_programmed},
    client::http_get,
    manifests::write_atomic,
    netns::run,
    sandbox::{NODE_IP, Sandbox, pod_ip},
    servers::http_server,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const NODE_PORT: u16 = 30080;
const T: Duration = Duration::from_secs(2);

fn sockclient() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sockclient"))
}

/// A Service `name` (`type`, extra spec lines) with http 80→8080 (nodePort
/// 30080 for `NodePort`) and dns 53→5353/UDP, and its slice of `pods`.
fn service(name: &str, vip: Ipv4Addr, ty: &str, spec_extra: &str, pods: &[Ipv4Addr]) -> String {
    let np = |p: u16| if ty == "NodePort" { format!(", nodePort: {p}") } else { String::new() };
    let endpoints: String = pods.iter().map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n")).collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: {ty}
  clusterIP: {vip}
{spec_extra}  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP{}}}
  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP{}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-x
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:{}
{endpoints}",
        np(NODE_PORT),
        np(30053),
        if pods.is_empty() { " []" } else { "" },
    )
}

fn wait_frontend(sb: &Sandbox, addr: Ipv4Addr, port: u16, backends: usize) {
    wait_programmed(&sb.bpffs, Duration::from_secs(15), &format!("{addr}:{port} with {backends} backends"), |v| {
        v.iter().any(|f| f.address == addr.to_string() && f.port == port && f.backends.len() == backends)
    });
}

/// `name peer` lines → the names, asserting every peer is `want_peer`.
fn names_with_peer(lines: &[String], want_peer: &str, what: &str) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let (name, peer) = l.split_once(' ').unwrap_or_else(|| panic!("{what}: unexpected line {l:?} in {lines:?}"));
            assert!(!name.starts_with("ERR"), "{what}: request failed: {l}");
            assert_eq!(peer, want_peer, "{what}: the socket API must show the Service address, not the backend: {lines:?}");
            name.to_owned()
        })
        .collect()
}

fn sandbox_with_pods(prefix: &str) -> Sandbox {
    let mut sb = Sandbox::new(prefix, 3);
    sb.serve_http(8080);
    sb.serve_udp(5353);
    sb
}

#[test]
fn node_local_clients_reach_cluster_ips_and_node_ports_by_socket_translation() {
    let mut sb = sandbox_with_pods("slb");
    let pods: Vec<Ipv4Addr> = (1..=3).map(pod_ip).collect();
    write_atomic(&sb.manifests, "web.yaml", &service("web", VIP, "NodePort", "", &pods));
    write_atomic(&sb.manifests, "empty.yaml", &service("empty", EMPTY_VIP, "ClusterIP", "", &[]));
    sb.start_agent(&agent_bin());
    wait_frontend(&sb, VIP, 80, 3);
    wait_frontend(&sb, Ipv4Addr::LOCALHOST, NODE_PORT, 3);
    wait_frontend(&sb, EMPTY_VIP, 80, 0);
    let before = sb.counters(&agent_bin());
    let c = sockclient();

    let lines = sb.cgroup_client(&sb.node, c, &["http", &format!("{VIP}:80"), "30"]);
    let names = names_with_peer(&lines, &format!("{VIP}:80"), "ClusterIP over TCP");
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert!(distinct.len() >= 2, "30 connections used only {distinct:?}");
    for addr in [NODE_IP, Ipv4Addr::LOCALHOST] {
        let target = format!("{addr}:{NODE_PORT}");
        let lines = sb.cgroup_client(&sb.node, c, &["http", &target, "10"]);
        names_with_peer(&lines, &target, "NodePort from the node");
    }
    let lines = sb.cgroup_client(&sb.node, c, &["udp", &format!("{VIP}:53"), "10"]);
    names_with_peer(&lines, &format!("{VIP}:53"), "connected UDP");
    let lines = sb.cgroup_client(&sb.node, c, &["udp-sendto", &format!("{VIP}:53"), "10"]);
    let names: BTreeSet<String> = names_with_peer(&lines, &format!("{VIP}:53"), "unconnected UDP").into_iter().collect();
    assert_eq!(names.len(), 1, "one unconnected UDP socket keeps its backend: {lines:?}");
    let lines = sb.cgroup_client(&sb.node, c, &["http", &format!("{EMPTY_VIP}:80"), "1"]);
    assert!(lines[0].contains("os error 111"), "no endpoints: connect() must fail with ECONNREFUSED, got {lines:?}");

    let after = sb.counters(&agent_bin());
    let d = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    assert!(d("sock_translated") >= 30 + 20 + 1 + 10, "sock_translated moved by {}", d("sock_translated"));
    assert!(d("sock_rev_translated") > 0, "getpeername/recvmsg were not translated back");
    assert_eq!(d("sock_rejected"), 1);
    assert_eq!(d("dnat_new_flow"), 0, "node-local traffic must not need per-packet NAT");
}

/// `kubernetes.default` on a control-plane node: the endpoint is a server
/// on a node address (hostNetwork). A pod reaches it through the TC path
/// (DNAT at the pod veth's ingress; the reply is generated locally and
/// leaves by the veth's egress, where it must be translated back), a
/// node-local process and a pod in the cgroup through the socket path.
#[test]
fn pods_and_the_node_reach_a_service_whose_endpoint_is_a_host_network_server_on_this_node() {
    let mut sb = Sandbox::new("hostep", 2);
    sb.servers.push(http_server(&sb.node, 6443, "apiserver"));
    let svc = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: kubernetes, namespace: default}}
spec:
  clusterIP: {API_VIP}
  ports: [{{name: https, port: 443, targetPort: 6443, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: kubernetes, namespace: default, labels: {{kubernetes.io/service-name: kubernetes}}}}
addressType: IPv4
ports: [{{name: https, port: 6443, protocol: TCP}}]
endpoints:
- {{addresses: [\"{NODE_IP}\"], nodeName: node, conditions: {{ready: true}}}}
"
    );
    write_atomic(&sb.manifests, "kubernetes.yaml", &svc);
    sb.start_agent(&agent_bin());
    wait_frontend(&sb, API_VIP, 443, 1);
    let pod = &sb.pods[0];
    pod.ns.ip(&["route", "add", "10.96.0.0/12", "via", "169.254.1.1", "dev", "eth0"]);
    let target = SocketAddr::from((API_VIP, 443));
    let before = sb.counters(&agent_bin());
    let got: Vec<String> = pod.ns.run(move || (0..20).map(|_| http_get(target, T).unwrap_or_else(|e| format!("error: {e}"))).collect());
    assert!(got.iter().all(|g| g == "apiserver"), "pod → kubernetes.default over the TC path: {got:?}\n{}", sb.agent_log());
    let after = sb.counters(&agent_bin());
    let d = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    assert!(d("dnat_new_flow") >= 20 && d("rev_nat_reply") >= 20, "TC path counters: {after:?}");

    let lines = sb.cgroup_client(&sb.node, sockclient(), &["http", &target.to_string(), "10"]);
    names_with_peer(&lines, &target.to_string(), "node-local → hostNetwork endpoint");
    let lines = sb.cgroup_client(&sb.pods[1].ns, sockclient(), &["http", &target.to_string(), "10"]);
    names_with_peer(&lines, &target.to_string(), "pod in the cgroup → hostNetwork endpoint");
}

#[test]
fn host_only_translates_host_sockets_and_leaves_pods_to_the_per_packet_path() {
    let mut sb = sandbox_with_pods("hostonly");
    let pods: Vec<Ipv4Addr> = (1..=3).map(pod_ip).collect();
    write_atomic(&sb.manifests, "web.yaml", &service("web", VIP, "ClusterIP", "", &pods));
    sb.start_agent_with(&agent_bin(), &["--socket-lb", "host-only"]);
    wait_frontend(&sb, VIP, 80, 3);
    // Pod-to-pod and pod-to-service routes, as a CNI gives pods.
    for p in &sb.pods {
        for cidr in ["10.96.0.0/12", "10.244.0.0/16"] {
            p.ns.ip(&["route", "add", cidr, "via", "169.254.1.1", "dev", "eth0"]);
        }
    }
    let pod = &sb.pods[0];
    let c0 = sb.counters(&agent_bin());
    let lines = sb.cgroup_client(&sb.node, sockclient(), &["http", &format!("{VIP}:80"), "5"]);
    names_with_peer(&lines, &format!("{VIP}:80"), "host socket");
    let c1 = sb.counters(&agent_bin());
    let lines = sb.cgroup_client(&pod.ns, sockclient(), &["http", &format!("{VIP}:80"), "5"]);
    names_with_peer(&lines, &format!("{VIP}:80"), "pod socket (per-packet path)");
    let c2 = sb.counters(&agent_bin());
    let d = |a: &std::collections::BTreeMap<String, u64>, b: &std::collections::BTreeMap<String, u64>, k: &str| {
        b.get(k).copied().unwrap_or(0) - a.get(k).copied().unwrap_or(0)
    };
    assert_eq!(d(&c0, &c1, "sock_translated"), 5, "host sockets are translated at connect()");
    assert_eq!(d(&c1, &c2, "sock_translated"), 0, "host-only: a pod's connect() is left alone");
    assert!(d(&c1, &c2, "dnat_new_flow") >= 5, "the pod's flows are translated per packet: {c2:?}");
}

/// The pod answering `n` requests of `client` (TC path, from the client
/// namespace) or of a node-local process (socket path); all must agree.
fn one_backend(sb: &Sandbox, socket_path: bool, n: usize) -> String {
    let names: Vec<String> = if socket_path {
        let lines = sb.cgroup_client(&sb.node, sockclient(), &["http", &format!("{VIP}:80"), &n.to_string()]);
        names_with_peer(&lines, &format!("{VIP}:80"), "affinity over the socket path")
    } else {
        let t = SocketAddr::from((VIP, 80));
        sb.client.run(move || (0..n).map(|_| http_get(t, T).unwrap_or_else(|e| format!("error: {e}"))).collect())
    };
    let set: BTreeSet<&String> = names.iter().collect();
    assert_eq!(set.len(), 1, "sessionAffinity ClientIP: one backend for one client, got {names:?}\n{}", sb.agent_log());
    names[0].clone()
}

#[test]
fn session_affinity_client_ip_holds_on_both_paths_survives_a_restart_and_drops_a_removed_backend() {
    let mut sb = sandbox_with_pods("aff");
    let pods: Vec<Ipv4Addr> = (1..=3).map(pod_ip).collect();
    let affinity = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n";
    write_atomic(&sb.manifests, "web.yaml", &service("web", VIP, "ClusterIP", affinity, &pods));
    sb.start_agent(&agent_bin());
    wait_frontend(&sb, VIP, 80, 3);
    let v = integration_tests::agent::programmed(&sb.bpffs);
    assert!(v.iter().any(|f| f.address == VIP.to_string() && f.affinity_timeout_s == 600), "services view: {v:?}");
    let tc = one_backend(&sb, false, 15);
    let sock = one_backend(&sb, true, 15);

    sb.kill_agent();
    sb.start_agent(&agent_bin());
    wait_frontend(&sb, VIP, 80, 3);
    assert_eq!(one_backend(&sb, false, 5), tc, "affinity (TC path) after an agent restart");
    assert_eq!(one_backend(&sb, true, 5), sock, "affinity (socket path) after an agent restart");

    // The TC client's backend leaves: it is never chosen again from the
    // affinity entry; the client gets a new one and keeps it.
    let gone: Ipv4Addr = pods[tc.trim_start_matches("pod").parse::<usize>().expect("podN") - 1];
    let rest: Vec<Ipv4Addr> = pods.iter().copied().filter(|p| *p != gone).collect();
    write_atomic(&sb.manifests, "web.yaml", &service("web", VIP, "ClusterIP", affinity, &rest));
    wait_frontend(&sb, VIP, 80, 2);
    let next = one_backend(&sb, false, 10);
    assert_ne!(next, tc, "a removed backend was chosen from an affinity entry");
}

/// kube-proxy deletes the UDP conntrack entries of an endpoint that leaves
/// a Service port, even while the same pod stays an endpoint of another
/// Service: a connected UDP client sending every 100 ms is answered by
/// another endpoint within 1 s, on its same socket. TC path: the next
/// datagram moves. Socket path: the agent destroys the socket
/// (`bpf_sock_destroy`), the client sees ECONNABORTED and connects the same
/// socket again.
#[test]
fn udp_flow_moves_within_a_second_when_its_endpoint_leaves_the_service() {
    udp_flow_moves(false);
}

#[test]
fn connected_udp_socket_is_destroyed_and_reconnects_within_a_second_when_its_endpoint_leaves() {
    udp_flow_moves(true);
}

fn udp_flow_moves(socket_path: bool) {
    let mut sb = sandbox_with_pods(if socket_path { "stalesk" } else { "stale" });
    let pods: Vec<Ipv4Addr> = (1..=3).map(pod_ip).collect();
    write_atomic(&sb.manifests, "web.yaml", &service("web", VIP, "ClusterIP", "", &pods));
    // The same pods behind another Service: their backends stay in the map.
    write_atomic(&sb.manifests, "other.yaml", &service("other", EMPTY_VIP, "ClusterIP", "", &pods));
    sb.start_agent(&agent_bin());
    wait_frontend(&sb, VIP, 53, 3);
    wait_frontend(&sb, EMPTY_VIP, 53, 3);
    let target = format!("{VIP}:53");
    // 40 datagrams at 100 ms: 4 s; the endpoint is removed after ~1 s.
    let mut cmd = if socket_path {
        sb.cgroup.command(&sb.node, sockclient(), &["udp-stream", &target, "100", "40"])
    } else {
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net={}", sb.client.path())).arg(sockclient()).args(["udp-stream", &target, "100", "40"]);
        c
    };
    let t0 = Instant::now();
    let stream = std::thread::spawn({
        move || {
            let out = cmd.output().expect("udp-stream");
            String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect::<Vec<String>>()
        }
    });
    std::thread::sleep(Duration::from_millis(1000));
    // The pod it talks to: the UDP server that answered most (the UDP
    // servers follow the three HTTP ones in `servers`).
    let served: Vec<u64> = sb.servers[3..].iter().map(integration_tests::servers::Server::served).collect();
    let busy = served.iter().enumerate().max_by_key(|(_, n)| **n).map(|(i, _)| i).expect("servers");
    let gone_name = format!("pod{}", busy + 1);
    let rest: Vec<Ipv4Addr> = pods.iter().copied().filter(|p| *p != pods[busy]).collect();
    write_atomic(&sb.manifests, "web.yaml", &service("web", VIP, "ClusterIP", "", &rest));
    wait_frontend(&sb, VIP, 53, 2);
    // When the removal reached the maps, on the stream's clock (which
    // started a little after t0, so this is an upper bound).
    let programmed_ms = u64::try_from(t0.elapsed().as_millis()).expect("ms");
    let lines = stream.join().expect("stream thread");
    // Lines: "<ms> <pod> <peer>" or "<ms> ERR ...".
    let parsed: Vec<(u64, String)> = lines
        .iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.to_owned()))
        })
        .collect();
    assert!(parsed.len() >= 35, "udp-stream output: {lines:?}");
    assert!(parsed.iter().any(|(_, n)| *n == gone_name), "the stream talked to {gone_name}: {lines:?}");
    let late: Vec<&(u64, String)> = parsed.iter().filter(|(t, _)| *t > programmed_ms + 1000).collect();
    assert!(!late.is_empty(), "the stream outlived the removal by a second: {lines:?}");
    assert!(
        late.iter().all(|(_, n)| n.starts_with("pod") && *n != gone_name),
        "a second after the removal ({programmed_ms} ms) only other endpoints answer, on the same socket: {lines:?}\n{}",
        sb.agent_log()
    );
    let errs = parsed.iter().filter(|(_, n)| n == "ERR").count();
    assert!(errs <= 2, "at most a datagram lost around the move, got {errs}: {lines:?}");
    let c = sb.counters(&agent_bin());
    if socket_path {
        assert!(sb.agent_log().contains("destroyed connected UDP sockets"), "agent log: {}", sb.agent_log());
        assert_eq!(c.get("dnat_new_flow").copied().unwrap_or(0), 0, "socket path: no per-packet NAT: {c:?}");
    } else {
        assert!(c.get("udp_flow_moved").copied().unwrap_or(0) >= 1, "udp_flow_moved must count the move: {c:?}");
    }
}

#[test]
fn a_cgroup_that_is_not_cgroup_v2_is_refused_by_name_and_nothing_is_attached() {
    let sb = Sandbox::new("badcg", 0);
    let bpffs = sb.bpffs.to_string_lossy().into_owned();
    let manifests = sb.manifests.to_string_lossy().into_owned();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", sb.node.path()))
        .arg(agent_bin())
        .args(["--bpffs", &bpffs, "run", "--manifests", &manifests, "--devices", "ext0", "--cgroup", "/tmp"])
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .output()
        .expect("run the agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent must refuse --cgroup /tmp");
    assert!(err.contains("--cgroup /tmp") && err.contains("not a cgroup v2 directory"), "stderr: {err}");
    let links = sb.bpffs.join("links");
    let n = std::fs::read_dir(&links).map(Iterator::count).unwrap_or(0);
    assert_eq!(n, 0, "nothing may be attached: {}", links.display());
}

#[test]
fn cleanup_detaches_the_socket_programs() {
    let mut sb = sandbox_with_pods("slbclean");
    let pods: Vec<Ipv4Addr> = (1..=3).map(pod_ip).collect();
    write_atomic(&sb.manifests, "web.yaml", &service("web", VIP, "ClusterIP", "", &pods));
    sb.start_agent(&agent_bin());
    wait_frontend(&sb, VIP, 80, 3);
    let lines = sb.cgroup_client(&sb.node, sockclient(), &["http", &format!("{VIP}:80"), "3"]);
    names_with_peer(&lines, &format!("{VIP}:80"), "before cleanup");
    let cg = sb.cgroup.path().to_string_lossy().into_owned();
    let attached = run("bpftool", &["cgroup", "show", &cg]);
    assert!(attached.contains("connect4") && attached.contains("getpeername4"), "bpftool cgroup show: {attached}");
    sb.kill_agent();
    run(&agent_bin().to_string_lossy(), &["--bpffs", &sb.bpffs.to_string_lossy(), "cleanup"]);
    let attached = run("bpftool", &["cgroup", "show", &cg]);
    assert!(!attached.contains("connect4"), "cleanup left socket programs attached: {attached}");
    // Untranslated now: the node has no route to the service range.
    let lines = sb.cgroup_client(&sb.node, sockclient(), &["http", &format!("{VIP}:80"), "1"]);
    assert!(lines[0].starts_with("ERR"), "after cleanup a ClusterIP must not answer: {lines:?}");
}
