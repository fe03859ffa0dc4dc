//! Floods against the conntrack and the SNAT ports, on the real kernel in
//! the two-node topology: spoofed SYN, ACK, RST and UDP packets from ~2^16
//! source addresses at a NodePort and an LB IP — many times what the
//! unconfirmed-flow table holds — while established TCP connections (one
//! busy, one idle) and a UDP flow stay up; then a SYN flood at one remote
//! backend's SNAT port range. Bounded in packets and time; the packets are
//! written in the client's namespace (AF_PACKET) and reach node A only.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{agent_bin, wait_programmed},
    client::{KeepAlive, http_get},
    cluster::{CLIENT_IP, Cluster, LB_IP, NODE_A_IP, Seen, pod_ip_a, pod_ip_b},
    flood::{self, Kind},
    manifests::{web_yaml, write_atomic},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const T: Duration = Duration::from_secs(2);

/// A LoadBalancer Service with http 80→8080 (nodePort 30080) and dns
/// 53→5353/UDP (nodePort 30053) to `endpoints` (address, node).
fn lb_service(endpoints: &[(Ipv4Addr, &str)]) -> String {
    web_yaml("LoadBalancer", VIP, "", Some(LB_IP), endpoints)
}

fn setup(prefix: &str, endpoints: &[(Ipv4Addr, &str)], extra: &[&str]) -> Cluster {
    let mut c = Cluster::new(prefix, 1, 1);
    c.serve_http_peer(8080);
    c.serve_udp_peer(5353);
    write_atomic(&c.manifests, "web.yaml", &lb_service(endpoints));
    c.start_agents(&agent_bin(), extra);
    wait_programmed(&c.a.bpffs, Duration::from_secs(20), "the Service on node A", |v| {
        v.iter().filter(|f| !f.backends.is_empty()).count() >= 4
    });
    c
}

fn seen(body: &str) -> Seen {
    Seen::parse(body).unwrap_or_else(|| panic!("bad answer {body:?}"))
}

/// Spoofed frames from the client's namespace to node A: SYN, ACK and RST
/// to the NodePort and the LB IP, UDP to the UDP NodePort, round-robin.
fn mixed_flood(c: &Cluster, count: u32) -> flood::Sent {
    let macs = (flood::mac_of(&c.client, "eth0"), flood::mac_of(&c.a.ns, "ext0"));
    flood::send(&c.client, "eth0", count, Duration::from_secs(40), move |i| {
        let src = flood::spoofed_source(i);
        let (kind, dst) = match i % 5 {
            0 => (Kind::Syn, SocketAddrV4::new(NODE_A_IP, NODE_PORT)),
            1 => (Kind::Syn, SocketAddrV4::new(LB_IP, 80)),
            2 => (Kind::Ack, SocketAddrV4::new(NODE_A_IP, NODE_PORT)),
            3 => (Kind::Rst, SocketAddrV4::new(LB_IP, 80)),
            _ => (Kind::Udp, SocketAddrV4::new(NODE_A_IP, UDP_NODE_PORT)),
        };
        flood::frame(kind, src, dst, macs)
    })
}

#[test]
fn a_spoofed_flood_breaks_no_established_flow() {
    // A small conntrack (4,096 flows: 8,192 confirmed entries, 2,048
    // unconfirmed), so the flood cycles the unconfirmed table many times.
    let c = setup("flood", &[(pod_ip_a(1), "node-a"), (pod_ip_b(1), "node-b")], &["--conntrack-max", "4096"]);
    let np = SocketAddr::from((NODE_A_IP, NODE_PORT));
    let lb = SocketAddr::from((LB_IP, 80));
    let udp_np = SocketAddr::from((NODE_A_IP, UDP_NODE_PORT));

    // Established before the flood: a busy keep-alive connection (a request
    // every 20 ms throughout), an idle one, and a UDP flow (confirmed by a
    // reply and a second datagram).
    let stop = Arc::new(AtomicBool::new(false));
    let busy = c.client.spawn({
        let stop = stop.clone();
        move || {
            let mut conn = KeepAlive::connect(np, T).expect("busy connection");
            let first = seen(&conn.get().expect("first request")).pod;
            let (mut ok, mut failed, mut moved) = (0u32, Vec::new(), 0u32);
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(90) {
                match conn.get() {
                    Ok(b) if seen(&b).pod == first => ok += 1,
                    Ok(_) => moved += 1,
                    Err(e) => {
                        failed.push(e.to_string());
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed, moved)
        }
    });
    let (idle, idle_pod) = c.client.run(move || {
        let mut conn = KeepAlive::connect(lb, T).expect("idle connection");
        let pod = seen(&conn.get().expect("idle: first request")).pod;
        conn.get().expect("idle: second request");
        (conn, pod)
    });
    let (udp, udp_pod) = c.client.run(move || {
        let s = UdpSocket::bind((CLIENT_IP, 0)).expect("bind");
        s.set_read_timeout(Some(T)).expect("timeout");
        s.connect(udp_np).expect("connect");
        let mut buf = [0u8; 512];
        let mut pod = String::new();
        for _ in 0..3 {
            s.send(b"before").expect("send");
            let n = s.recv(&mut buf).expect("UDP reply before the flood");
            pod = seen(&String::from_utf8_lossy(&buf[..n])).pod;
        }
        (s, pod)
    });
    std::thread::sleep(Duration::from_millis(300));
    let flows = run_ct_list(&c);
    assert!(flows.iter().filter(|f| f["confirmed"] == true).count() >= 3, "the three flows are confirmed: {flows:#?}");

    let sent = mixed_flood(&c, 150_000);
    println!(
        "flood: {} spoofed packets in {:.2} s = {:.0} packets/s (SYN, ACK, RST, UDP at the NodePort and the LB IP)",
        sent.packets,
        sent.elapsed.as_secs_f64(),
        sent.rate()
    );
    let counters = c.a.counters(&agent_bin());
    println!("node A counters after the flood: {counters:?}");
    assert!(sent.packets >= 100_000, "the flood must be large: {sent:?}");
    // The spoofed SYNs and datagrams created unconfirmed flows many times
    // the unconfirmed table (1,024 flows); ACK/RST created nothing.
    let created = counters.get("dnat_new_flow").copied().unwrap_or(0);
    assert!(created > 10 * 1024, "the flood cycled the unconfirmed table: {created} new flows");
    assert!(counters.get("drop_tcp_no_flow").copied().unwrap_or(0) >= 40_000, "spoofed ACK/RST dropped without state: {counters:?}");

    stop.store(true, Ordering::Relaxed);
    let (ok, failed, moved) = busy.join().expect("busy thread");
    assert!(failed.is_empty() && moved == 0, "the busy connection: {ok} ok, failed {failed:?}, {moved} from another pod");
    assert!(ok > 10, "the busy connection made requests throughout: {ok}");
    let (idle_after, udp_after) = c.client.run(move || {
        let mut idle = idle;
        let i = idle.get().map(|b| seen(&b).pod).map_err(|e| e.to_string());
        udp.send(b"after").expect("send");
        let mut buf = [0u8; 512];
        let u = udp.recv(&mut buf).map(|n| seen(&String::from_utf8_lossy(&buf[..n])).pod).map_err(|e| e.to_string());
        (i, u)
    });
    assert_eq!(idle_after, Ok(idle_pod), "the idle connection survives the flood, on its backend");
    assert_eq!(udp_after, Ok(udp_pod), "the UDP flow survives the flood, on its backend");
    // New legitimate connections still succeed.
    let fresh: Vec<String> = c.client.run(move || (0..20).map(|_| http_get(np, T).map_or_else(|e| format!("error: {e}"), |b| seen(&b).pod)).collect());
    assert!(fresh.iter().all(|p| p.starts_with("pod-")), "new connections after the flood: {fresh:?}");
}

#[test]
fn a_syn_flood_at_one_remote_backend_leaves_snat_ports_for_new_flows() {
    // One remote backend: every NodePort flow takes one of its 4,536 SNAT
    // ports. 12,000 spoofed SYNs (their SYN-ACKs go unanswered) claim the
    // whole range.
    let c = setup("synflood", &[(pod_ip_b(1), "node-b")], &[]);
    let np = SocketAddr::from((NODE_A_IP, NODE_PORT));
    let macs = (flood::mac_of(&c.client, "eth0"), flood::mac_of(&c.a.ns, "ext0"));
    let sent = flood::send(&c.client, "eth0", 12_000, Duration::from_secs(30), move |i| {
        flood::frame(Kind::Syn, flood::spoofed_source(i), SocketAddrV4::new(NODE_A_IP, NODE_PORT), macs)
    });
    println!("SYN flood: {} packets in {:.2} s = {:.0} packets/s", sent.packets, sent.elapsed.as_secs_f64(), sent.rate());
    let before = c.a.counters(&agent_bin());
    assert!(
        before.get("drop_snat_ports_exhausted").copied().unwrap_or(0) > 0,
        "the flood must exhaust the backend's SNAT range: {before:?}"
    );
    // Past the reclaim age, legitimate flows get ports again (without it,
    // the range would stay taken for the SYN timeout, 60 s).
    std::thread::sleep(Duration::from_millis(2500));
    let got: Vec<String> = c.client.run(move || (0..20).map(|_| http_get(np, T).map_or_else(|e| format!("error: {e}"), |b| seen(&b).pod)).collect());
    assert!(got.iter().all(|p| p == "pod-b1"), "new flows during a SYN flood's aftermath: {got:?}\n{}", c.a.agent_log());
    let after = c.a.counters(&agent_bin());
    assert!(after.get("snat_port_reclaimed").copied().unwrap_or(0) >= 20, "ports came from unanswered SYNs: {after:?}");
}

/// `proxy-agent conntrack -o json` on node A.
fn run_ct_list(c: &Cluster) -> Vec<serde_json::Value> {
    let out = integration_tests::netns::run(&agent_bin().to_string_lossy(), &["--bpffs", &c.a.bpffs.to_string_lossy(), "conntrack", "-o", "json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("conntrack json: {e}: {out}"))
}
