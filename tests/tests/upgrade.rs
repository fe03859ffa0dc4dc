//! Upgrades across a map-layout change, on the real kernel: tracked flows
//! are migrated into the new layout, the retired maps unpinned, and no
//! request is lost while the agent is replaced.
//!
//! - From the first releases' conntrack (`proxy_ct_v1`): the test pins a map
//!   in that layout holding the live flows of open connections, as that
//!   release left it, and starts the agent.
//! - To a bumped layout: the running agent is replaced, under load, by a
//!   binary built with the test-only next layout (feature `layout-next`:
//!   `proxy_ct_v3` and `proxy_ct_new_v2`, one more field; `cargo xtask
//!   test` builds it as `proxy-agent-layout-next`).
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use integration_tests::{
    agent::{agent_bin, agent_bin_layout_next, wait_programmed},
    client::KeepAlive,
    load,
    manifests::{Port, service_yaml, write_atomic},
    netns::run,
    sandbox::{NODE_IP, Sandbox, pod_ip},
};
use proxy_agent::datapath::migrate::CtValueV1;
use proxy_common::ct::{CT_MAP_V1, CT_MAP_V2, CT_NEW_MAP_V1, CtKey, CtValue};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const T: Duration = Duration::from_secs(2);
const HTTP: Port<'static> = Port { name: "http", port: 80, target: 8080, protocol: "TCP" };
const DNS: Port<'static> = Port { name: "dns", port: 53, target: 5353, protocol: "UDP" };

fn ready(ips: &[Ipv4Addr]) -> Vec<(Ipv4Addr, bool)> {
    ips.iter().map(|ip| (*ip, true)).collect()
}

fn ct_map<V: aya::Pod>(bpffs: &Path, name: &str) -> HashMap<MapData, CtKey, V> {
    let data = MapData::from_pin(bpffs.join(name)).unwrap_or_else(|e| panic!("open {name}: {e}"));
    HashMap::try_from(Map::LruHashMap(data)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Waits until the agent log holds `n` "datapath loaded" lines.
fn wait_loaded(sb: &Sandbox, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while sb.agent_log().matches("datapath loaded").count() < n {
        assert!(Instant::now() < deadline, "the agent did not load:\n{}", sb.agent_log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Open keep-alive connections through a `ClusterIP`, their flows put back
/// into `proxy_ct_v1` (the layout of the first releases, which had one
/// table and no SNAT) as that release would have left them, the current
/// tables unpinned: the agent migrates the flows, and every connection
/// keeps working on its backend. Without the migration the connections'
/// next segments find no flow and are dropped.
#[test]
fn flows_in_the_first_releases_conntrack_layout_survive_the_upgrade() {
    let mut sb = Sandbox::new("ctv1", 2);
    sb.serve_http(8080);
    write_atomic(&sb.manifests, "svc.yaml", &service_yaml("web", VIP, &[HTTP], &ready(&[pod_ip(1), pod_ip(2)])));
    let bin = agent_bin();
    sb.start_agent(&bin);
    wait_programmed(&sb.bpffs, Duration::from_secs(15), "web with 2 backends", |v| {
        v.iter().any(|f| f.address == VIP.to_string() && f.backends.len() == 2)
    });
    let mut conns: Vec<(KeepAlive, String)> = sb.client.run(|| {
        (0..6)
            .map(|_| {
                let mut k = KeepAlive::connect(SocketAddr::from((VIP, 80)), T).expect("connect");
                let pod = k.get().expect("first request");
                (k, pod)
            })
            .collect()
    });
    // Confirmed: the handshake's ACK and the requests followed the replies.
    std::thread::sleep(Duration::from_millis(200));
    sb.kill_agent();

    // The state the first releases left: their flows in proxy_ct_v1.
    let mut flows: Vec<(CtKey, CtValueV1)> = Vec::new();
    for name in [CT_MAP_V2, CT_NEW_MAP_V1] {
        for (k, v) in ct_map::<CtValue>(&sb.bpffs, name).iter().filter_map(Result::ok) {
            assert_eq!(v.snat_addr_be, 0, "a ClusterIP flow from a pod has no SNAT");
            flows.push((k, CtValueV1 {
                nat_addr_be: v.nat_addr_be,
                nat_port_be: v.nat_port_be,
                flags: 0,
                pad: 0,
                backend_id: v.backend_id,
                svc_id: v.svc_id,
                last_seen_ns: v.last_seen_ns,
            }));
        }
    }
    assert_eq!(flows.len(), 2 * conns.len(), "two entries per connection: {flows:?}");
    let v1 = sb.bpffs.join(CT_MAP_V1);
    run("bpftool", &["map", "create", &v1.to_string_lossy(), "type", "lru_hash", "key", "16", "value", "24", "entries", "4096", "name", CT_MAP_V1]);
    let mut old = ct_map::<CtValueV1>(&sb.bpffs, CT_MAP_V1);
    for (k, v) in &flows {
        old.insert(k, v, 0).expect("insert a v1 flow");
    }
    drop(old);
    for name in [CT_MAP_V2, CT_NEW_MAP_V1] {
        std::fs::remove_file(sb.bpffs.join(name)).expect("unpin the current conntrack");
    }

    sb.start_agent(&bin);
    wait_loaded(&sb, 2);
    let log = sb.agent_log();
    let migrated = log
        .lines()
        .find(|l| l.contains("migrated the entries of a retired layout") && l.contains(CT_MAP_V1))
        .unwrap_or_else(|| panic!("no migration logged:\n{log}"));
    assert!(migrated.contains(&format!("entries={}", flows.len())), "{migrated}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while v1.exists() {
        assert!(Instant::now() < deadline, "{CT_MAP_V1} still pinned:\n{}", sb.agent_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ct_map::<CtValue>(&sb.bpffs, CT_MAP_V2).iter().count(), flows.len(), "the flows are in the confirmed table");

    let after: Vec<Result<String, String>> = sb.client.run(move || {
        conns.iter_mut().map(|(k, before)| k.get().map_err(|e| e.to_string()).and_then(|p| {
            if p == *before { Ok(p) } else { Err(format!("moved from {before} to {p}")) }
        })).collect()
    });
    assert!(after.iter().all(Result::is_ok), "connections after the upgrade: {after:?}\n{}", sb.agent_log());
}

/// The agent replaced, under load, by a binary with a bumped conntrack
/// layout (`proxy_ct_v2` → `proxy_ct_v3`, `proxy_ct_new_v1` →
/// `proxy_ct_new_v2`) — new HTTP connections to the `ClusterIP`, requests
/// on a keep-alive connection to the `NodePort`, a connected UDP stream to
/// the `ClusterIP`, node-local clients on the socket path — loses no
/// request; the old layout is unpinned; a restart of the new binary adopts
/// the new layout.
#[test]
fn replacing_the_agent_by_a_binary_with_a_bumped_conntrack_layout_under_load_loses_no_request() {
    let mut sb = Sandbox::new("upg", 2);
    sb.serve_http(8080);
    sb.serve_udp(5353);
    let svc = service_yaml("web", VIP, &[HTTP, DNS], &ready(&[pod_ip(1), pod_ip(2)]))
        .replace("type: ClusterIP", "type: NodePort")
        .replace("    targetPort: 8080\n", "    targetPort: 8080\n    nodePort: 30080\n");
    write_atomic(&sb.manifests, "svc.yaml", &svc);
    let (bin, next) = (agent_bin(), agent_bin_layout_next());
    sb.start_agent(&bin);
    wait_programmed(&sb.bpffs, Duration::from_secs(15), "the ClusterIP and NodePort", |v| {
        v.iter().filter(|f| f.backends.len() == 2).count() >= 3
    });
    let np = SocketAddr::from((NODE_IP, 30080));

    let stop = Arc::new(AtomicBool::new(false));
    let conns = load::new_connections(&sb.client, &stop, SocketAddr::from((VIP, 80)), T, (20_000, Duration::from_mins(1)));
    let keepalive = load::keep_alive(&sb.client, &stop, np, T, (50_000, Duration::from_mins(1)));
    let udp = load::udp_stream(&sb.client, &stop, SocketAddr::from((VIP, 53)), T, (50_000, Duration::from_mins(1)));
    let sockclient = Path::new(env!("CARGO_BIN_EXE_sockclient"));
    let mut node_local = Vec::new();
    std::thread::sleep(Duration::from_millis(500));

    // The upgrade: the old agent killed, the new binary started.
    sb.kill_agent();
    node_local.extend(sb.cgroup_client(&sb.node, sockclient, &["http", &format!("{VIP}:80"), "5"]));
    sb.start_agent(&next);
    wait_loaded(&sb, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sb.bpffs.join(CT_MAP_V2).exists() || sb.bpffs.join(CT_NEW_MAP_V1).exists() {
        assert!(Instant::now() < deadline, "the old layout is still pinned:\n{}", sb.agent_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));
    node_local.extend(sb.cgroup_client(&sb.node, sockclient, &["http", &format!("{VIP}:80"), "5"]));
    // And a restart of the new binary adopts the new layout.
    sb.kill_agent();
    sb.start_agent(&next);
    wait_loaded(&sb, 3);
    std::thread::sleep(Duration::from_millis(700));

    stop.store(true, Ordering::Relaxed);
    let (conn_ok, conn_failed) = conns.join().expect("connections");
    let (ka_ok, ka_failed) = keepalive.join().expect("keep-alive");
    let (udp_ok, udp_failed) = udp.join().expect("udp");
    let log = sb.agent_log();
    println!(
        "upgrade to a bumped layout: {conn_ok} new connections, {ka_ok} keep-alive requests to the NodePort, {udp_ok} UDP exchanges, {} node-local requests; failed: {} / {} / {} / {}",
        node_local.len(),
        conn_failed.len(),
        ka_failed.len(),
        udp_failed.len(),
        node_local.iter().filter(|l| l.starts_with("ERR")).count()
    );
    for l in log.lines().filter(|l| l.contains("migrated")) {
        println!("{l}");
    }
    let counters: std::collections::BTreeMap<String, u64> = sb.counters(&bin).into_iter().filter(|(_, n)| *n > 0).collect();
    println!("datapath counters: {counters:?}");
    assert!(conn_failed.is_empty(), "new connections failed: {conn_failed:?}\n{counters:?}\n{log}");
    assert!(ka_failed.is_empty(), "keep-alive requests failed: {ka_failed:?}\n{log}");
    assert!(udp_failed.is_empty(), "UDP exchanges failed: {udp_failed:?}\n{log}");
    assert!(node_local.iter().all(|l| !l.starts_with("ERR")), "node-local requests failed: {node_local:?}");
    assert!(conn_ok >= 50 && ka_ok >= 50 && udp_ok >= 20, "enough load to judge");
    for (from, to) in [(CT_MAP_V2, "proxy_ct_v3"), (CT_NEW_MAP_V1, "proxy_ct_new_v2")] {
        assert!(
            log.lines().any(|l| l.contains("migrated the entries of a retired layout") && l.contains(from) && l.contains(to)),
            "{from} -> {to} not migrated:\n{log}"
        );
        assert!(sb.bpffs.join(to).exists(), "{to} not pinned");
    }
}
