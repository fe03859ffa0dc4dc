//! End-to-end `ClusterIP` tests on the real kernel: the agent runs in a node
//! namespace, real clients in a client namespace talk to a `ClusterIP`, real
//! servers answer in pod namespaces. Every loop is bounded in count and time;
//! the sandbox removes namespaces, pins and files even when a test fails.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{agent_bin, programmed, stats_table_cell, wait_programmed},
    client::{KeepAlive, http_get, udp_request},
    manifests::{Port, service_yaml, write_atomic},
    netns::run,
    sandbox::{Sandbox, pod_ip},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const T: Duration = Duration::from_secs(2);
const HTTP: Port<'static> = Port { name: "http", port: 80, target: 8080, protocol: "TCP" };
const DNS: Port<'static> = Port { name: "dns", port: 53, target: 5353, protocol: "UDP" };

fn ready(ips: &[Ipv4Addr]) -> Vec<(Ipv4Addr, bool)> {
    ips.iter().map(|ip| (*ip, true)).collect()
}

fn backends_of(sb: &Sandbox, port: u16) -> Vec<String> {
    programmed(&sb.bpffs)
        .into_iter()
        .find(|f| f.address == VIP.to_string() && f.port == port)
        .map(|f| f.backends.iter().map(|b| format!("{}:{}", b.address, b.port)).collect())
        .unwrap_or_default()
}

fn wait_backends(sb: &Sandbox, port: u16, n: usize) {
    wait_programmed(&sb.bpffs, Duration::from_secs(15), &format!("{n} backends on {VIP}:{port}"), |v| {
        v.iter().any(|f| f.address == VIP.to_string() && f.port == port && f.backends.len() == n)
    });
}

/// Runs HTTP requests (a new connection each) from the client until `stop`
/// is set, at most `max` of them or `limit` in time. Returns (when, result).
fn http_load(
    sb: &Sandbox,
    stop: Arc<AtomicBool>,
    max: usize,
    limit: Duration,
) -> std::thread::JoinHandle<Vec<(Instant, Result<String, String>)>> {
    sb.client.spawn(move || {
        let start = Instant::now();
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) && out.len() < max && start.elapsed() < limit {
            let r = http_get(SocketAddr::from((VIP, 80)), T).map_err(|e| e.to_string());
            out.push((Instant::now(), r));
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    })
}

fn count_by_pod(results: &[(Instant, Result<String, String>)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (_, r) in results {
        let k = r.clone().unwrap_or_else(|e| format!("error: {e}"));
        *m.entry(k).or_default() += 1;
    }
    m
}

/// Two pods serving HTTP and UDP behind Service `web` (VIP:80 and :53), the
/// agent running and both ports programmed.
fn web_sandbox(prefix: &str) -> Sandbox {
    let mut sb = Sandbox::new(prefix, 2);
    sb.serve_http(8080);
    sb.serve_udp(5353);
    let ips = [pod_ip(1), pod_ip(2)];
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP, DNS], &ready(&ips)));
    sb.start_agent(&agent_bin());
    wait_backends(&sb, 80, 2);
    wait_backends(&sb, 53, 2);
    sb
}

#[test]
fn http_and_udp_through_a_cluster_ip_use_every_backend() {
    let sb = web_sandbox("cip");

    let (http, udp, sticky) = sb.client.run(|| {
        let http: Vec<_> = (0..40).map(|_| http_get(SocketAddr::from((VIP, 80)), T).map_err(|e| e.to_string())).collect();
        // A connected UDP socket accepts replies only from VIP:53, so a reply
        // proves the reverse translation too.
        let udp: Vec<_> = (0..40)
            .map(|i| udp_request(SocketAddr::from((VIP, 53)), &format!("q{i}"), T).map_err(|e| e.to_string()))
            .collect();
        let mut ka = KeepAlive::connect(SocketAddr::from((VIP, 80)), T).expect("keep-alive connect");
        let sticky: Vec<_> = (0..20).map(|_| ka.get().expect("keep-alive request")).collect();
        (http, udp, sticky)
    });
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    for r in &http {
        *by_pod.entry(r.clone().expect("HTTP request through the ClusterIP failed")).or_default() += 1;
    }
    assert_eq!(by_pod.len(), 2, "both pods must answer HTTP: {by_pod:?}\n{}", sb.agent_log());
    let mut udp_pods: BTreeMap<String, usize> = BTreeMap::new();
    for (i, r) in udp.iter().enumerate() {
        let reply = r.clone().expect("UDP request through the ClusterIP failed");
        let (pod, payload) = reply.split_once(':').expect("reply is pod:payload");
        assert_eq!(payload, format!("q{i}"));
        *udp_pods.entry(pod.to_owned()).or_default() += 1;
    }
    assert_eq!(udp_pods.len(), 2, "both pods must answer UDP: {udp_pods:?}");
    assert!(sticky.iter().all(|p| p == &sticky[0]), "a TCP connection must keep its backend: {sticky:?}");
}

#[test]
fn removing_an_endpoint_moves_new_connections_with_no_failed_request() {
    let mut sb = Sandbox::new("rm", 3);
    sb.serve_http(8080);
    let ips = [pod_ip(1), pod_ip(2), pod_ip(3)];
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP], &ready(&ips)));
    sb.start_agent(&agent_bin());
    wait_backends(&sb, 80, 3);

    // An established connection to whichever pod it lands on.
    let mut ka = sb.client.run(|| {
        let mut ka = KeepAlive::connect(SocketAddr::from((VIP, 80)), T).expect("connect");
        let first = ka.get().expect("first request");
        (ka, first)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let load = http_load(&sb, stop.clone(), 2000, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));

    // Remove the pod the established connection uses.
    let victim_name = ka.1.clone();
    let victim_ip = sb.pods.iter().find(|p| p.name == victim_name).expect("pod").ip;
    let remaining: Vec<Ipv4Addr> = ips.iter().copied().filter(|ip| *ip != victim_ip).collect();
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP], &ready(&remaining)));
    wait_backends(&sb, 80, 2);
    let programmed_at = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().expect("load thread");

    let failed: Vec<_> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "requests failed while the endpoint was removed: {failed:?}");
    let after: Vec<_> = results.iter().filter(|(t, _)| *t > programmed_at).collect();
    assert!(after.len() >= 10, "too few requests after the change to judge: {}", after.len());
    assert!(
        after.iter().all(|(_, r)| r.as_ref().is_ok_and(|p| *p != victim_name)),
        "new connections still reach {victim_name} after its removal was programmed: {:?}",
        count_by_pod(&results)
    );
    // kube-proxy semantics: an established TCP connection keeps its backend.
    let answer = ka.0.get().expect("the established connection must keep working");
    assert_eq!(answer, victim_name);
}

#[test]
fn killing_the_agent_mid_traffic_loses_no_request_and_a_restart_converges() {
    let mut sb = Sandbox::new("kill", 3);
    sb.serve_http(8080);
    let two = [pod_ip(1), pod_ip(2)];
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP], &ready(&two)));
    let bin = agent_bin();
    sb.start_agent(&bin);
    wait_backends(&sb, 80, 2);
    let before = programmed(&sb.bpffs);

    let mut ka = sb.client.run(|| {
        let mut ka = KeepAlive::connect(SocketAddr::from((VIP, 80)), T).expect("connect");
        let first = ka.get().expect("first request");
        (ka, first)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let load = http_load(&sb, stop.clone(), 3000, Duration::from_secs(40));
    std::thread::sleep(Duration::from_millis(300));

    sb.kill_agent();
    // Forwarding goes on without the agent.
    std::thread::sleep(Duration::from_millis(700));
    // The desired state changes while the agent is down: a third endpoint.
    let three = [pod_ip(1), pod_ip(2), pod_ip(3)];
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP], &ready(&three)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(backends_of(&sb, 80).len(), 2, "nothing may change the maps while the agent is down");

    sb.start_agent(&bin);
    wait_backends(&sb, 80, 3);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().expect("load thread");

    let failed: Vec<_> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "requests failed across the agent's kill and restart: {failed:?}\n{}", sb.agent_log());
    assert!(results.len() >= 50, "too few requests to judge: {}", results.len());
    let after = programmed(&sb.bpffs);
    let (b, a) = (&before[0], &after[0]);
    assert_eq!(a.svc_id, b.svc_id, "the restart must keep the service id");
    for old in &b.backends {
        let new = a.backends.iter().find(|x| x.address == old.address).expect("old backend kept");
        assert_eq!(new.id, old.id, "the restart must keep backend ids");
    }
    assert!(sb.agent_log().contains("adopted=true"), "the restart must adopt the pinned links:\n{}", sb.agent_log());
    let answer = ka.0.get().expect("an established connection must survive the agent's death");
    assert_eq!(answer, ka.1);
}

#[test]
fn bpftool_dump_of_the_pinned_maps_shows_field_names() {
    let mut sb = Sandbox::new("btf", 1);
    sb.serve_http(8080);
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP], &ready(&[pod_ip(1)])));
    sb.start_agent(&agent_bin());
    wait_backends(&sb, 80, 1);
    sb.client.run(|| http_get(SocketAddr::from((VIP, 80)), T).expect("request"));

    let dump = |map: &str| run("bpftool", &["map", "dump", "pinned", &sb.bpffs.join(map).to_string_lossy()]);
    let svc = dump("proxy_svc_v1");
    for field in ["\"addr_be\"", "\"port_be\"", "\"backend_slot\"", "\"count\"", "\"svc_id\"", "\"backend_id\""] {
        assert!(svc.contains(field), "bpftool dump of proxy_svc_v1 lacks {field}:\n{svc}");
    }
    let be = dump("proxy_be_v1");
    assert!(be.contains("\"addr_be\"") && be.contains("\"port_be\""), "proxy_be_v1 dump:\n{be}");
    let ct = dump("proxy_ct_v2");
    assert!(ct.contains("\"nat_addr_be\"") && ct.contains("\"backend_id\""), "proxy_ct_v2 dump:\n{ct}");
    let stats = dump("proxy_stats_v3");
    assert!(stats.contains("\"packets\""), "proxy_stats_v3 dump:\n{stats}");
}

#[test]
fn bad_manifests_are_skipped_with_a_log_line_and_the_rest_is_programmed() {
    let mut sb = Sandbox::new("bad", 1);
    sb.serve_http(8080);
    write_atomic(&sb.manifests, "good.yaml", &service_yaml("web", VIP, &[HTTP], &ready(&[pod_ip(1)])));
    write_atomic(&sb.manifests, "broken.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n");
    let icmp = service_yaml("icmp", Ipv4Addr::new(10, 96, 0, 20), &[Port { name: "s", port: 9, target: 9, protocol: "ICMP" }], &[]);
    write_atomic(&sb.manifests, "icmp.yaml", &icmp);
    let bad_ip = service_yaml("badip", Ipv4Addr::new(10, 96, 0, 21), &[HTTP], &[]).replace("10.96.0.21", "10.96.0.300");
    write_atomic(&sb.manifests, "badip.yaml", &bad_ip);
    sb.start_agent(&agent_bin());
    wait_backends(&sb, 80, 1);
    std::thread::sleep(Duration::from_millis(300));

    let frontends = programmed(&sb.bpffs);
    assert_eq!(frontends.len(), 1, "only the good Service is programmed: {frontends:#?}");
    let answer = sb.client.run(|| http_get(SocketAddr::from((VIP, 80)), T));
    assert_eq!(answer.expect("the good Service works"), "pod1");
    let log = sb.agent_log();
    for needle in ["broken.yaml", "does not parse", "default/icmp", "unknown protocol \"ICMP\"", "default/badip", "10.96.0.300", "badip.yaml"] {
        assert!(log.contains(needle), "agent log lacks {needle:?}:\n{log}");
    }
}

#[test]
fn a_device_that_appears_later_is_attached_and_a_frontend_without_endpoints_rejects() {
    let mut sb = Sandbox::new("dev", 1);
    sb.serve_http(8080);
    let empty = Ipv4Addr::new(10, 96, 0, 11);
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP], &ready(&[pod_ip(1)])));
    write_atomic(&sb.manifests, "empty.yaml", &service_yaml("empty", empty, &[HTTP], &[]));
    sb.start_agent(&agent_bin());
    wait_backends(&sb, 80, 1);

    // kube-proxy's REJECT: the client's connect fails at once, not by timeout.
    let started = Instant::now();
    let err = sb.client.run(move || http_get(SocketAddr::from((empty, 80)), T)).expect_err("no endpoints must be rejected");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // A new pod (its lxc2 matches `lxc*`): replies come back through it only
    // if the agent attached to it.
    sb.add_pod(2);
    let p2 = sb.pods.iter().find(|p| p.name == "pod2").expect("pod2");
    sb.servers.push(integration_tests::servers::http_server(&p2.ns, 8080, "pod2"));
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP], &ready(&[pod_ip(2)])));
    wait_backends(&sb, 80, 1);
    wait_programmed(&sb.bpffs, Duration::from_secs(10), "pod2 as the backend", |v| {
        v.iter().any(|f| f.backends.iter().any(|b| b.address == pod_ip(2).to_string()))
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = sb.client.run(|| http_get(SocketAddr::from((VIP, 80)), Duration::from_millis(500)));
        if r.as_deref().ok() == Some("pod2") {
            break;
        }
        assert!(Instant::now() < deadline, "pod2 never answered through the ClusterIP: {r:?}\n{}", sb.agent_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(sb.agent_log().contains("device=lxc2"), "{}", sb.agent_log());
}

/// A Service that does not fit a full service map is served closed: its
/// clients are refused at once (not routed untranslated to an address
/// nobody serves, where they would hang), `/healthz` is 503 and says how
/// many frontends are not programmed; once room is made it is programmed
/// whole and `/healthz` is 200 again.
#[test]
fn a_frontend_that_does_not_fit_a_full_map_is_rejected_and_fails_healthz_until_it_fits() {
    let mut sb = Sandbox::new("full", 3);
    sb.serve_http(8080);
    let big = Ipv4Addr::new(10, 96, 0, 12);
    let all = [pod_ip(1), pod_ip(2), pod_ip(3)];
    // `--lb-map-max 8`: 2 entries held back for closed frontends, 6 for the
    // rest. `web` takes 4 (slot 0 and 3 backends); `big` needs 4 more.
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP], &ready(&all)));
    write_atomic(&sb.manifests, "big.yaml", &service_yaml("big", big, &[HTTP], &ready(&all)));
    sb.start_agent_with(&agent_bin(), &["--lb-map-max", "8"]);
    wait_backends(&sb, 80, 3);
    wait_programmed(&sb.bpffs, Duration::from_secs(10), "big closed (no backends)", |v| {
        v.iter().any(|f| f.address == big.to_string() && f.backends.is_empty())
    });

    let started = Instant::now();
    let err = sb.client.run(move || http_get(SocketAddr::from((big, 80)), T)).expect_err("a closed frontend must refuse");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not by timeout");
    assert!(sb.client.run(|| http_get(SocketAddr::from((VIP, 80)), T)).is_ok(), "the Service that fits serves");
    let (status, body) = sb.node_http(10256, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""frontendsNotProgrammed": 1"#), "{body}");
    assert_eq!(sb.node_http(10256, "/livez").0, 200, "alive: it serves what fits");
    let log = sb.agent_log();
    assert!(log.contains("its traffic is rejected until it fits") && log.contains("default/big"), "{log}");

    // Room made: `big` is programmed whole, serves, and the node is ready again.
    std::fs::remove_file(sb.manifests.join("svc.yaml")).expect("remove svc.yaml");
    wait_programmed(&sb.bpffs, Duration::from_secs(15), "big with 3 backends", |v| {
        v.iter().any(|f| f.address == big.to_string() && f.backends.len() == 3)
    });
    let r = sb.client.run(move || http_get(SocketAddr::from((big, 80)), T));
    assert!(r.as_deref().is_ok_and(|p| p.starts_with("pod")), "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while sb.node_http(10256, "/healthz").0 != 200 {
        assert!(Instant::now() < deadline, "healthz never returned to 200: {:?}", sb.node_http(10256, "/healthz"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn services_json_reads_the_pins_and_cleanup_removes_everything() {
    let mut sb = Sandbox::new("cln", 2);
    sb.serve_http(8080);
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP, DNS], &ready(&[pod_ip(1), pod_ip(2)])));
    let bin = agent_bin();
    sb.start_agent(&bin);
    wait_backends(&sb, 80, 2);
    wait_backends(&sb, 53, 2);
    sb.kill_agent();

    // From the pinned maps alone, with the agent gone.
    let bpffs = sb.bpffs.to_string_lossy().into_owned();
    let json = run(&bin.to_string_lossy(), &["--bpffs", &bpffs, "services", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("services -o json is JSON");
    let list = v.as_array().expect("array");
    assert_eq!(list.len(), 2, "{json}");
    assert!(list.iter().all(|f| f["service"].as_str().is_some_and(|s| s.starts_with("default/web")) && f["backends"].as_array().map(Vec::len) == Some(2)), "{json}");
    let table = run(&bin.to_string_lossy(), &["--bpffs", &bpffs, "services"]);
    assert!(table.contains("10.96.0.10:80/TCP") && table.contains("10.244.0.11:8080"), "{table}");
    let stats = run(&bin.to_string_lossy(), &["--bpffs", &bpffs, "stats", "-o", "json"]);
    assert!(stats.contains("dnat_new_flow"), "{stats}");

    assert!(sb.client.run(|| http_get(SocketAddr::from((VIP, 80)), T)).is_ok(), "forwarding without the agent");
    let out = run(&bin.to_string_lossy(), &["--bpffs", &bpffs, "cleanup"]);
    assert!(out.contains("proxy_svc_v1") && out.contains("tcx_ingress_"), "{out}");
    assert!(!sb.bpffs.exists(), "cleanup leaves {bpffs}");
    // Detached: the node no longer translates, and has no route to the VIP.
    let r = sb.client.run(|| http_get(SocketAddr::from((VIP, 80)), Duration::from_millis(500)));
    assert!(r.is_err(), "the ClusterIP still answers after cleanup: {r:?}");
}

/// Path-MTU discovery through a ClusterIP: the node cannot forward a
/// too-big datagram to the pod and sends "fragmentation needed" quoting the
/// translated packet (client → pod); the agent's TC egress program
/// translates the quote back (client → VIP), so the client's socket learns
/// the smaller MTU.
#[test]
fn fragmentation_needed_reaches_the_client_translated_so_pmtu_discovery_works() {
    use std::os::fd::AsRawFd as _;
    let mut sb = Sandbox::new("mtu", 1);
    sb.serve_udp(5353);
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[DNS], &ready(&[pod_ip(1)])));
    sb.start_agent(&agent_bin());
    wait_backends(&sb, 53, 1);
    sb.node.ip(&["link", "set", "lxc1", "mtu", "1280"]);
    sb.pods[0].ns.ip(&["link", "set", "eth0", "mtu", "1280"]);

    let mtu = sb.client.run(|| {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.connect(SocketAddr::from((VIP, 53))).expect("connect");
        let fd = sock.as_raw_fd();
        let on: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: setsockopt on our socket with an int option.
        let rc = unsafe {
            libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, (&raw const on).cast(), size_of::<libc::c_int>() as u32)
        };
        assert_eq!(rc, 0, "IP_MTU_DISCOVER");
        let big = vec![b'x'; 1400];
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let _ = sock.send(&big);
            std::thread::sleep(Duration::from_millis(100));
            let mut mtu: libc::c_int = 0;
            let mut len = size_of::<libc::c_int>() as u32;
            // SAFETY: getsockopt into an int we own.
            unsafe { libc::getsockopt(fd, libc::IPPROTO_IP, libc::IP_MTU, (&raw mut mtu).cast(), &raw mut len) };
            if mtu == 1280 || Instant::now() > deadline {
                return mtu;
            }
        }
    });
    assert_eq!(mtu, 1280, "the client never learned the path MTU through the ClusterIP\n{}", sb.agent_log());
    let stats = run(&agent_bin().to_string_lossy(), &["--bpffs", &sb.bpffs.to_string_lossy(), "stats"]);
    assert!(stats_table_cell(&stats, "icmp_error_translated", "PACKETS") > 0, "{stats}");
    // An ICMP error about an IPv4 flow: the IPv4 column, not the IPv6 one.
    assert!(stats_table_cell(&stats, "icmp_error_translated", "IPV4") > 0, "{stats}");
    assert_eq!(stats_table_cell(&stats, "icmp_error_translated", "IPV6"), 0, "{stats}");
}

/// A 4,000-byte UDP datagram crosses a 1,500-byte link in three fragments;
/// only the first carries the ports. Both directions must be translated
/// alike (the later fragments through the ports the first left in
/// `proxy_frag_v1`), or the pod (and then the client) cannot reassemble
/// the datagram — kube-proxy's conntrack reassembles, so this works there.
#[test]
fn a_4000_byte_udp_datagram_through_a_cluster_ip_is_translated_in_fragments_both_ways() {
    let mut sb = Sandbox::new("frag", 2);
    sb.serve_udp(5353);
    let ips = [pod_ip(1), pod_ip(2)];
    write_atomic(&sb.manifests, "dns.yaml", &service_yaml("dns", VIP, &[DNS], &ready(&ips)));
    sb.start_agent(&agent_bin());
    wait_backends(&sb, 53, 2);
    let payload = "f".repeat(4000);
    let sent = payload.clone();
    let got = sb.client.run(move || udp_request(SocketAddr::from((VIP, 53)), &sent, T));
    let got = got.unwrap_or_else(|e| panic!("no answer to a fragmented datagram: {e}\n{}", sb.agent_log()));
    let (pod, echoed) = got.split_once(':').expect("<pod>:<payload>");
    assert!(pod.starts_with("pod"), "{pod}");
    assert!(echoed == payload, "the whole datagram came back: {} of {} bytes", echoed.len(), payload.len());
    let c = integration_tests::agent::counters(&agent_bin(), &sb.bpffs);
    // Two later fragments each way.
    assert!(c.get("fragment_translated").copied().unwrap_or(0) >= 4, "{c:?}");
}

/// `proxy-agent conntrack` shows the flows an operator is asking about
/// (client, frontend, backend, state, Service), `conntrack flush
/// --frontend` removes exactly those of one frontend, and the agent's
/// garbage collector deletes expired entries (a closed flow: 10 s) and
/// counts them.
#[test]
fn conntrack_lists_flushes_and_collects_flows() {
    let sb = web_sandbox("ctcli");
    let bin = agent_bin().to_string_lossy().into_owned();
    let bpffs = sb.bpffs.to_string_lossy().into_owned();
    let list = || -> Vec<serde_json::Value> {
        let out = run(&bin, &["--bpffs", &bpffs, "conntrack", "-o", "json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("conntrack -o json: {e}: {out}"))
    };
    // An open keep-alive connection, three UDP flows, five closed TCP ones.
    let ka = sb.client.run(|| {
        let mut ka = KeepAlive::connect(SocketAddr::from((VIP, 80)), T).expect("connect");
        ka.get().expect("request");
        for i in 0..3 {
            udp_request(SocketAddr::from((VIP, 53)), &format!("c{i}"), T).expect("udp");
        }
        for _ in 0..5 {
            http_get(SocketAddr::from((VIP, 80)), T).expect("http");
        }
        ka
    });
    let flows = list();
    let tcp: Vec<&serde_json::Value> = flows.iter().filter(|f| f["frontend"] == "10.96.0.10:80").collect();
    let udp: Vec<&serde_json::Value> = flows.iter().filter(|f| f["frontend"] == "10.96.0.10:53").collect();
    assert_eq!(tcp.len(), 6, "six TCP flows: {flows:#?}");
    assert_eq!(udp.len(), 3, "three UDP flows: {flows:#?}");
    assert!(tcp.iter().any(|f| f["state"] == "ESTABLISHED" && f["confirmed"] == true), "the open connection: {tcp:#?}");
    assert_eq!(tcp.iter().filter(|f| f["state"] == "CLOSING").count(), 5, "{tcp:#?}");
    for f in &flows {
        let client = f["client"].as_str().unwrap_or_default();
        let backend = f["backend"].as_str().unwrap_or_default();
        assert!(client.starts_with("192.0.2.2:"), "{f}");
        assert!(backend.starts_with("10.244.0.1"), "{f}");
        assert!(f["service"].as_str().is_some_and(|s| s.starts_with("default/web:")), "{f}");
    }
    let table = run(&bin, &["--bpffs", &bpffs, "conntrack"]);
    assert!(table.starts_with("PROTO") && table.contains("ESTABLISHED") && table.contains("default/web:http"), "{table}");

    // Flush one frontend: its flows go, the other's stay.
    let out = run(&bin, &["--bpffs", &bpffs, "conntrack", "flush", "--frontend", "10.96.0.10:53/UDP"]);
    assert_eq!(out.trim(), "removed 3 flow(s)");
    let after = list();
    assert!(after.iter().all(|f| f["frontend"] == "10.96.0.10:80"), "{after:#?}");
    assert_eq!(after.len(), 6);

    // The closed flows expire after 10 s; the GC (every 10 s) deletes them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = sb.node.run(|| {
            let mut s = std::net::TcpStream::connect("127.0.0.1:10249").expect("metrics");
            std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\n\r\n").expect("write");
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out).expect("read");
            out
        });
        let deleted: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("proxy_conntrack_gc_deleted_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        // Five closed flows, two entries each.
        if deleted >= 10.0 {
            assert!(metrics.contains("proxy_map_capacity{map=\"proxy_ct_v2\"}"), "{metrics}");
            break;
        }
        assert!(Instant::now() < deadline, "the GC did not delete the closed flows within 30 s:\n{metrics}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let left = list();
    assert_eq!(left.len(), 1, "only the open connection is left: {left:#?}");
    drop(ka);
}

/// Maps of retired layouts (`proxy_ct_v1`, `proxy_stats_v1`, `proxy_stats_v2`) that an
/// earlier release left pinned are unpinned when the agent starts (no
/// kernel memory leaks across upgrades), and `cleanup` removes the whole
/// directory.
#[test]
fn maps_of_retired_layouts_are_unpinned_on_start() {
    let mut sb = Sandbox::new("retire", 1);
    sb.serve_http(8080);
    std::fs::create_dir_all(&sb.bpffs).expect("mkdir bpffs dir");
    let ct_v1 = sb.bpffs.join("proxy_ct_v1");
    let stats_v1 = sb.bpffs.join("proxy_stats_v1");
    // The stats layout before the family split (one slot per reason).
    let stats_v2 = sb.bpffs.join("proxy_stats_v2");
    run("bpftool", &["map", "create", &ct_v1.to_string_lossy(), "type", "lru_hash", "key", "16", "value", "32", "entries", "1024", "name", "proxy_ct_v1"]);
    run("bpftool", &["map", "create", &stats_v1.to_string_lossy(), "type", "percpu_array", "key", "4", "value", "16", "entries", "32", "name", "proxy_stats_v1"]);
    run("bpftool", &["map", "create", &stats_v2.to_string_lossy(), "type", "percpu_array", "key", "4", "value", "16", "entries", "64", "name", "proxy_stats_v2"]);
    assert!(ct_v1.exists() && stats_v1.exists() && stats_v2.exists());
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP], &ready(&[pod_ip(1)])));
    sb.start_agent(&agent_bin());
    wait_backends(&sb, 80, 1);
    assert!(!ct_v1.exists() && !stats_v1.exists() && !stats_v2.exists(), "retired maps still pinned:\n{}", sb.agent_log());
    assert!(sb.agent_log().contains("unpinned a map of a retired layout"), "{}", sb.agent_log());
    assert_eq!(sb.client.run(|| http_get(SocketAddr::from((VIP, 80)), T)).expect("request"), "pod1");
    // A map of a layout this binary does not know (a newer release's):
    // cleanup removes it with the rest, leaving no directory behind.
    sb.kill_agent();
    let future = sb.bpffs.join("proxy_future_v9");
    run("bpftool", &["map", "create", &future.to_string_lossy(), "type", "hash", "key", "4", "value", "4", "entries", "16", "name", "proxy_future_v9"]);
    run(&agent_bin().to_string_lossy(), &["--bpffs", &sb.bpffs.to_string_lossy(), "cleanup"]);
    assert!(!sb.bpffs.exists(), "cleanup left {}", sb.bpffs.display());
}

/// The agent SIGKILLed and restarted ten times under load — new HTTP
/// connections to the ClusterIP, requests on a keep-alive connection to the
/// NodePort, a connected UDP stream to the ClusterIP, and node-local
/// clients on the socket path — loses no request: the kernel forwards on
/// its own, and each start adopts the pinned programs, links and maps.
#[test]
fn ten_agent_kills_under_load_lose_no_request() {
    let mut sb = Sandbox::new("kill10", 2);
    sb.serve_http(8080);
    sb.serve_udp(5353);
    let ips = [pod_ip(1), pod_ip(2)];
    let svc = service_yaml("web", VIP, &[HTTP, DNS], &ready(&ips))
        .replace("type: ClusterIP", "type: NodePort")
        .replace("    targetPort: 8080\n", "    targetPort: 8080\n    nodePort: 30080\n");
    write_atomic(&sb.manifests, "svc.yaml", &svc);
    let bin = agent_bin();
    sb.start_agent(&bin);
    wait_backends(&sb, 80, 2);
    wait_backends(&sb, 53, 2);
    let np = SocketAddr::from((integration_tests::sandbox::NODE_IP, 30080));
    wait_programmed(&sb.bpffs, Duration::from_secs(15), "the NodePort", |v| v.iter().any(|f| f.port == 30080 && f.backends.len() == 2));

    let stop = Arc::new(AtomicBool::new(false));
    let conns = http_load(&sb, stop.clone(), 20_000, Duration::from_secs(60));
    let keepalive = integration_tests::load::keep_alive(&sb.client, &stop, np, T, (50_000, Duration::from_mins(1)));
    let udp = integration_tests::load::udp_stream(&sb.client, &stop, SocketAddr::from((VIP, 53)), T, (50_000, Duration::from_mins(1)));
    let mut node_local = Vec::new();
    for round in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        sb.kill_agent();
        // Node-local clients (socket path) while no agent runs.
        node_local.extend(sb.cgroup_client(&sb.node, std::path::Path::new(env!("CARGO_BIN_EXE_sockclient")), &["http", &format!("{VIP}:80"), "5"]));
        std::thread::sleep(Duration::from_millis(200));
        sb.start_agent(&bin);
        let deadline = Instant::now() + Duration::from_secs(20);
        while sb.agent_log().matches("datapath loaded").count() < round + 2 {
            assert!(Instant::now() < deadline, "restart {round} did not load:\n{}", sb.agent_log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let conns = conns.join().expect("connections");
    let (ka_ok, ka_failed) = keepalive.join().expect("keep-alive");
    let (udp_ok, udp_failed) = udp.join().expect("udp");
    let conn_failed: Vec<&String> = conns.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    println!(
        "10 kills: {} new connections, {ka_ok} keep-alive requests to the NodePort, {udp_ok} UDP exchanges, {} node-local requests",
        conns.len(),
        node_local.len()
    );
    assert!(conn_failed.is_empty(), "new connections failed: {conn_failed:?}\n{}", sb.agent_log());
    assert!(ka_failed.is_empty(), "keep-alive requests failed: {ka_failed:?}");
    assert!(udp_failed.is_empty(), "UDP exchanges failed: {udp_failed:?}");
    assert!(node_local.iter().all(|l| !l.starts_with("ERR")), "node-local requests failed: {node_local:?}");
    assert!(conns.len() >= 100 && ka_ok >= 100 && udp_ok >= 100, "enough load to judge");
    assert!(sb.agent_log().matches("adopted=true").count() >= 10, "every restart adopts the pinned links");
}
