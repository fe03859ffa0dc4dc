//! The agent following an API server end to end: the test API server
//! (tests/src/apiserver) runs inside the node namespace on 127.0.0.1, the
//! agent reaches it over real HTTP through a kubeconfig, and the results are
//! checked in the pinned maps and with real traffic from the client.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{AgentSource, agent_bin, programmed, wait_programmed},
    apiserver::ApiServer,
    client::http_get,
    inspect_backends,
    netns::run,
    sandbox::{NODE_IP, Sandbox, pod_ip},
};
use serde_json::{Value, json};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE: &str = "node-a";
const T: Duration = Duration::from_secs(2);

fn service(name: &str, vip: Ipv4Addr, extra: Value) -> Value {
    let mut s = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    });
    merge(&mut s, extra);
    s
}

fn slice(name: &str, service: &str, endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

fn ep(ip: Ipv4Addr, node: &str, ready: bool) -> Value {
    json!({"addresses": [ip.to_string()], "nodeName": node, "conditions": {"ready": ready}})
}

fn merge(a: &mut Value, b: Value) {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        for (k, v) in b {
            match a.get_mut(&k) {
                Some(av) if av.is_object() && v.is_object() => merge(av, v),
                _ => {
                    a.insert(k, v);
                }
            }
        }
    }
}

struct Cluster {
    sb: Sandbox,
    api: ApiServer,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn new(prefix: &str, pods: usize) -> Self {
        let mut sb = Sandbox::new(prefix, pods);
        sb.serve_http(8080);
        // Started from a thread inside the node namespace: its listener (and
        // so 127.0.0.1) is the node's, where the agent runs.
        let api = sb.node.run(|| ApiServer::start(SocketAddr::from(([127, 0, 0, 1], 0))));
        let kubeconfig = sb.workdir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");
        api.apply(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "z1"}}}))
            .expect("node");
        Self { sb, api, kubeconfig }
    }

    fn start_agent(&mut self) {
        let kc = self.kubeconfig.clone();
        self.sb.start_agent_from(&agent_bin(), AgentSource::ApiServer { kubeconfig: &kc }, Some(NODE));
    }

    fn backends(&self) -> Vec<String> {
        inspect_backends(&programmed(&self.sb.bpffs), VIP, 80)
    }

    fn wait_backends(&self, want: &[Ipv4Addr], what: &str) {
        let want: Vec<String> = want.iter().map(|ip| format!("{ip}:8080")).collect();
        wait_programmed(&self.sb.bpffs, Duration::from_secs(20), what, |v| inspect_backends(v, VIP, 80) == want);
    }

    fn get(&self) -> std::io::Result<String> {
        self.sb.client.run(|| http_get(SocketAddr::from((VIP, 80)), T))
    }

    /// One series of `/metrics` (`None`: not there).
    fn metric(&self, series: &str) -> Option<f64> {
        let (_, text) = self.node_http(10249, "/metrics");
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' '))).and_then(|v| v.parse().ok())
    }

    /// GET on the node's loopback (health and metrics), returning status and body.
    fn node_http(&self, port: u16, path: &str) -> (u16, String) {
        let path = path.to_owned();
        self.sb.node.run(move || {
            let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), T).expect("connect");
            s.set_read_timeout(Some(T)).expect("timeout");
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("send");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("read");
            let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            (status, body)
        })
    }
}

#[test]
fn creates_updates_and_deletes_follow_the_api_server() {
    let mut c = Cluster::new("apic", 3);
    c.api.apply(service("web", VIP, json!({}))).expect("svc");
    c.api.apply(slice("web-1", "web", json!([ep(pod_ip(1), NODE, true)]))).expect("slice 1");
    c.api.apply(slice("web-2", "web", json!([ep(pod_ip(2), "node-b", true)]))).expect("slice 2");
    // Not ours: another proxy's Service, and a headless one.
    c.api.apply(service("other", Ipv4Addr::new(10, 96, 0, 50), json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "foo"}}}))).expect("other");
    c.api.apply(service("headless", Ipv4Addr::new(10, 96, 0, 51), json!({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}}))).expect("headless");
    c.start_agent();

    // Endpoints split across two slices.
    c.wait_backends(&[pod_ip(1), pod_ip(2)], "both slices' endpoints");
    assert_eq!(programmed(&c.sb.bpffs).len(), 1, "only web is programmed");
    assert!(c.get().is_ok(), "traffic through the ClusterIP");
    let lists: Vec<_> = c.api.requests().into_iter().filter(|r| r.path.ends_with("/services") && !r.is_watch()).collect();
    assert!(
        lists.iter().any(|r| r.param("labelSelector").is_some_and(|s| s.contains("!service.kubernetes.io/service-proxy-name") && s.contains("!service.kubernetes.io/headless"))),
        "Services are listed with kube-proxy's label selector: {lists:?}"
    );

    // Readiness flips.
    c.api.apply(slice("web-2", "web", json!([ep(pod_ip(2), "node-b", false), ep(pod_ip(3), "node-b", true)]))).expect("slice 2");
    c.wait_backends(&[pod_ip(1), pod_ip(3)], "pod2 not ready, pod3 ready");
    // None ready, one serving and terminating: it is used.
    c.api.apply(slice("web-1", "web", json!([{"addresses": [pod_ip(1).to_string()], "nodeName": NODE,
        "conditions": {"ready": false, "serving": true, "terminating": true}}]))).expect("slice 1");
    c.api.delete("EndpointSlice", Some("default"), "web-2").expect("delete slice 2");
    c.wait_backends(&[pod_ip(1)], "terminating fallback");
    assert_eq!(c.get().expect("served by the terminating endpoint"), "pod1");

    // internalTrafficPolicy Local: only this node's endpoints.
    c.api.apply(slice("web-2", "web", json!([ep(pod_ip(2), "node-b", true), ep(pod_ip(3), NODE, true)]))).expect("slice 2");
    c.api.apply(service("web", VIP, json!({"spec": {"internalTrafficPolicy": "Local"}}))).expect("svc");
    c.wait_backends(&[pod_ip(3)], "internalTrafficPolicy Local");

    // Delete the Service: the frontend goes.
    c.api.delete("Service", Some("default"), "web").expect("delete");
    wait_programmed(&c.sb.bpffs, Duration::from_secs(20), "no frontends", <[_]>::is_empty);
}

#[test]
fn faults_keep_forwarding_and_converge() {
    let mut c = Cluster::new("apif", 3);
    c.api.apply(service("web", VIP, json!({}))).expect("svc");
    c.api.apply(slice("web-1", "web", json!([ep(pod_ip(1), NODE, true)]))).expect("slice");
    c.start_agent();
    c.wait_backends(&[pod_ip(1)], "initial");

    // A watch dropped mid-stream: the agent resumes and sees later changes.
    c.api.drop_watches();
    c.api.apply(slice("web-1", "web", json!([ep(pod_ip(1), NODE, true), ep(pod_ip(2), NODE, true)]))).expect("slice");
    c.wait_backends(&[pod_ip(1), pod_ip(2)], "change after a dropped watch");

    // 410 Gone: the agent's resourceVersion falls out of the history while it
    // is disconnected; its watch resume gets 410 Expired and it re-lists.
    let lists_before = c.api.requests().iter().filter(|r| r.path.ends_with("/endpointslices") && !r.is_watch()).count();
    c.api.set_down(true);
    c.api.apply(slice("web-1", "web", json!([ep(pod_ip(2), NODE, true)]))).expect("slice");
    c.api.compact();
    c.api.set_down(false);
    wait_programmed(&c.sb.bpffs, Duration::from_mins(1), "convergence after 410 Gone", |v| {
        inspect_backends(v, VIP, 80) == vec![format!("{}:8080", pod_ip(2))]
    });
    let lists_after = c.api.requests().iter().filter(|r| r.path.ends_with("/endpointslices") && !r.is_watch()).count();
    assert!(lists_after > lists_before, "410 Gone must make the agent list again ({lists_before} -> {lists_after})");

    // The API server down for a while: traffic keeps flowing, nothing flushed.
    c.api.set_down(true);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(c.get().expect("traffic while the API server is down"), "pod2");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.backends(), vec![format!("{}:8080", pod_ip(2))], "no flush while the API server is down");
    // The agent restarted while the API server is still down: it keeps the
    // pinned state (no initial list, so nothing is pruned).
    c.sb.kill_agent();
    c.start_agent();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.backends(), vec![format!("{}:8080", pod_ip(2))], "a restart without the API server flushes nothing");
    assert_eq!(c.get().expect("traffic after a restart without the API server"), "pod2");
    // Changed while it was unreachable; back up: converges.
    c.api.apply(slice("web-1", "web", json!([ep(pod_ip(3), NODE, true)]))).expect("slice");
    c.api.set_down(false);
    // kube-rs backs off up to 30 s between retries.
    wait_programmed(&c.sb.bpffs, Duration::from_mins(1), "convergence after the outage", |v| {
        inspect_backends(v, VIP, 80) == vec![format!("{}:8080", pod_ip(3))]
    });
    assert_eq!(c.get().expect("traffic after the outage"), "pod3");

    // Objects changed while the agent was down: the next start converges.
    c.sb.kill_agent();
    c.api.apply(slice("web-1", "web", json!([ep(pod_ip(1), NODE, true), ep(pod_ip(3), NODE, true)]))).expect("slice");
    assert_eq!(c.get().expect("traffic with the agent down"), "pod3");
    c.start_agent();
    c.wait_backends(&[pod_ip(1), pod_ip(3)], "changes made while the agent was down");
}

#[test]
fn health_and_metrics_answer_like_kube_proxy() {
    let mut c = Cluster::new("apih", 1);
    c.api.apply(service("web", VIP, json!({}))).expect("svc");
    c.api.apply(slice("web-1", "web", json!([ep(pod_ip(1), NODE, true)]))).expect("slice");
    c.start_agent();
    c.wait_backends(&[pod_ip(1)], "initial");

    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let r = c.node_http(10256, "/healthz");
        if r.0 == 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("healthz body is JSON");
    assert!(v["lastUpdated"].is_string() && v["currentTime"].is_string(), "{body}");
    assert_eq!(v["nodeEligible"], json!(true), "{body}");
    assert_eq!(c.node_http(10256, "/livez").0, 200);

    c.get().expect("one request for the counters");
    // A change after the initial (full) sync is a partial one. (A full
    // sync can still fall on it: the device scan finds the node's
    // addresses changed when IPv6 duplicate address detection ends late on
    // a loaded machine. So up to five changes, each its own sync.)
    let partial = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("kubeproxy_sync_partial_proxy_rules_duration_seconds_count "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let mut text = String::new();
    for i in 1..=5u8 {
        let vip = Ipv4Addr::new(10, 96, 0, 10 + i);
        c.api.apply(service(&format!("web{}", i + 1), vip, json!({}))).expect("svc");
        wait_programmed(&c.sb.bpffs, Duration::from_secs(10), "the new Service", |v| v.iter().any(|f| f.address == vip.to_string()));
        let (status, t) = c.node_http(10249, "/metrics");
        assert_eq!(status, 200);
        text = t;
        if partial(&text) >= 1.0 {
            break;
        }
    }
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert!(value("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1.0);
    assert!(value("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.0e9);
    assert!(value("proxy_map_entries{map=\"proxy_svc_v1\"}") >= 2.0);
    // The datapath counters carry the family: this request was IPv4.
    assert!(value("proxy_datapath_packets_total{reason=\"dnat_new_flow\",family=\"ipv4\"}") >= 1.0);
    assert_eq!(value("proxy_datapath_packets_total{reason=\"dnat_new_flow\",family=\"ipv6\"}"), 0.0);
    assert_eq!(value("kubeproxy_sync_proxy_rules_endpoint_changes_pending"), 0.0);
    assert!(value("kubeproxy_sync_full_proxy_rules_duration_seconds_count") >= 1.0, "the initial sync is full");
    assert!(value("kubeproxy_sync_partial_proxy_rules_duration_seconds_count") >= 1.0, "no partial sync in five changes\n{}", c.sb.agent_log());
    assert!(value("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > 1.0e9);
    assert_eq!(value("kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"}"), 0.0);
    assert!(value("kubeproxy_proxy_healthz_total{code=\"200\"}") >= 1.0);
    assert!(value("kubeproxy_proxy_livez_total{code=\"200\"}") >= 1.0);
    let pressure = value("proxy_map_pressure{map=\"proxy_svc_v1\"}");
    assert!(pressure > 0.0 && pressure < 0.01, "{pressure}");

    // The Node being deleted: /healthz says 503, /livez still 200.
    c.api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
        "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}})).expect("node");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.node_http(10256, "/healthz").0 != 503 {
        assert!(Instant::now() < deadline, "healthz never turned 503 for a node being deleted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.node_http(10256, "/livez").0, 200);
}

#[test]
fn kubectl_as_an_independent_client_drives_the_agent() {
    let mut c = Cluster::new("apik", 1);
    c.start_agent();
    let manifest = c.sb.workdir.join("web.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n{}",
            serde_yaml::to_string(&slice("web-1", "web", json!([ep(pod_ip(1), NODE, true)]))).expect("yaml")
        ),
    )
    .expect("write manifest");
    let kc = c.kubeconfig.to_string_lossy().into_owned();
    let netns = format!("--net={}", c.sb.node.path());
    let kubectl = |args: &[&str]| {
        let mut all = vec![netns.as_str(), "kubectl", "--kubeconfig", kc.as_str()];
        all.extend_from_slice(args);
        run("nsenter", &all)
    };
    kubectl(&["create", "--validate=false", "-f", &manifest.to_string_lossy()]);
    c.wait_backends(&[pod_ip(1)], "the Service kubectl created");
    assert_eq!(c.get().expect("traffic"), "pod1");
    let listed = kubectl(&["get", "svc", "-A"]);
    assert!(listed.contains("web") && listed.contains(&VIP.to_string()), "{listed}");
    kubectl(&["label", "svc", "web", "service.kubernetes.io/service-proxy-name=other"]);
    wait_programmed(&c.sb.bpffs, Duration::from_secs(20), "the relabelled Service gone", <[_]>::is_empty);
    kubectl(&["label", "svc", "web", "service.kubernetes.io/service-proxy-name-"]);
    c.wait_backends(&[pod_ip(1)], "the Service back");
    kubectl(&["delete", "svc", "web"]);
    wait_programmed(&c.sb.bpffs, Duration::from_secs(20), "the deleted Service gone", <[_]>::is_empty);
}

/// Not ready until programmed: with the API server down from the start,
/// `/healthz` answers 503 (nothing is programmed: a load balancer must not
/// send traffic here), `/livez` 200 (starting up is alive); once the
/// server is up and the lists are programmed, `/healthz` turns 200.
#[test]
fn healthz_is_503_until_the_initial_lists_are_programmed() {
    let mut c = Cluster::new("apiready", 1);
    c.api.apply(service("web", VIP, json!({}))).expect("svc");
    c.api.apply(slice("web-1", "web", json!([ep(pod_ip(1), NODE, true)]))).expect("slice");
    c.api.set_down(true);
    c.start_agent();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.sb.node.run(|| TcpStream::connect(("127.0.0.1", 10256)).is_err()) {
        assert!(Instant::now() < deadline, "healthz never listened:\n{}", c.sb.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..5 {
        assert_eq!(c.node_http(10256, "/healthz").0, 503, "ready before anything is programmed");
        assert_eq!(c.node_http(10256, "/livez").0, 200);
        std::thread::sleep(Duration::from_millis(200));
    }
    c.api.set_down(false);
    c.wait_backends(&[pod_ip(1)], "after the API server came up");
    let deadline = Instant::now() + Duration::from_secs(40);
    while c.node_http(10256, "/healthz").0 != 200 {
        assert!(Instant::now() < deadline, "healthz never turned 200 after programming:\n{}", c.sb.agent_log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Readiness flapping: the only endpoint goes unready (0 usable endpoints:
/// new connections are refused) and ready again; an open connection keeps
/// working throughout, as with kube-proxy, which rejects only new ones.
#[test]
fn an_established_connection_survives_its_endpoint_flapping_unready() {
    let mut c = Cluster::new("apiflap", 1);
    c.api.apply(service("web", VIP, json!({}))).expect("svc");
    c.api.apply(slice("web-1", "web", json!([ep(pod_ip(1), NODE, true)]))).expect("slice");
    c.start_agent();
    c.wait_backends(&[pod_ip(1)], "initial");
    let mut conn = c
        .sb
        .client
        .run(|| {
            let mut k = integration_tests::client::KeepAlive::connect(SocketAddr::from((VIP, 80)), T)?;
            k.get()?;
            Ok::<_, std::io::Error>(k)
        })
        .expect("open a connection");
    for round in 0..2 {
        c.api.apply(slice("web-1", "web", json!([ep(pod_ip(1), NODE, false)]))).expect("unready");
        c.wait_backends(&[], "no usable endpoint");
        assert!(c.get().is_err(), "round {round}: a new connection is refused without endpoints");
        conn = c.sb.client.run(move || {
            let mut k = conn;
            k.get().map(|_| k)
        }).unwrap_or_else(|e| panic!("round {round}: the open connection broke while its endpoint was unready: {e}"));
        c.api.apply(slice("web-1", "web", json!([ep(pod_ip(1), NODE, true)]))).expect("ready");
        c.wait_backends(&[pod_ip(1)], "ready again");
        conn = c.sb.client.run(move || {
            let mut k = conn;
            k.get().map(|_| k)
        }).unwrap_or_else(|e| panic!("round {round}: the open connection broke after the flap: {e}"));
    }
}

/// Two Services claim one externalIP:port: the older one (by
/// creationTimestamp, although its name sorts last) keeps it and serves;
/// the younger gets exactly one Warning Event, on itself, naming both —
/// not one per sync — and the metric counts it.
#[test]
fn a_lost_claim_is_one_warning_event_on_the_younger_service() {
    const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    let mut c = Cluster::new("apiev", 2);
    // The client (the test's namespace) reaches the externalIP through the node.
    c.sb.client.ip(&["route", "add", &format!("{EXTERNAL_IP}/32"), "via", &NODE_IP.to_string()]);
    let claim = || json!({"spec": {"externalIPs": [EXTERNAL_IP.to_string()]}});
    let older = c.api.apply(service("web", VIP, claim())).expect("older");
    c.api.apply(slice("web-1", "web", json!([ep(pod_ip(1), NODE, true)]))).expect("slice");
    // creationTimestamp has a resolution of one second.
    std::thread::sleep(Duration::from_millis(1100));
    let younger = c.api.apply(service("a-web", Ipv4Addr::new(10, 96, 0, 11), claim())).expect("younger");
    c.api.apply(slice("a-web-1", "a-web", json!([ep(pod_ip(2), NODE, true)]))).expect("slice");
    assert!(older["metadata"]["creationTimestamp"].as_str() < younger["metadata"]["creationTimestamp"].as_str());
    c.start_agent();

    let ext = |v: &[proxy_agent::inspect::FrontendView]| inspect_backends(v, EXTERNAL_IP, 80);
    wait_programmed(&c.sb.bpffs, Duration::from_secs(20), "the older Service on the externalIP", |v| {
        ext(v) == vec![format!("{}:8080", pod_ip(1))]
    });
    let events_about = |api: &ApiServer, name: &str| -> Vec<Value> {
        api.list("Event", Some("default")).into_iter().filter(|e| e["regarding"]["name"] == name).collect()
    };
    assert!(
        c.api.wait_until(Duration::from_secs(20), |api| !events_about(api, "a-web").is_empty()),
        "no Event on the younger Service:\n{}",
        c.sb.agent_log()
    );
    assert_eq!(c.sb.client.run(|| http_get(SocketAddr::from((EXTERNAL_IP, 80)), T)).expect("the winner serves"), "pod1");

    // More syncs (endpoint changes), the refusal standing: still one Event.
    for (i, ips) in [vec![pod_ip(1)], vec![pod_ip(1), pod_ip(2)], vec![pod_ip(1)]].into_iter().enumerate() {
        let eps: Vec<Value> = ips.iter().map(|ip| ep(*ip, NODE, true)).collect();
        c.api.apply(slice("web-1", "web", json!(eps))).expect("slice");
        let want: Vec<String> = ips.iter().map(|ip| format!("{ip}:8080")).collect();
        wait_programmed(&c.sb.bpffs, Duration::from_secs(20), &format!("change {i}"), |v| ext(v) == want);
    }
    std::thread::sleep(Duration::from_secs(2));
    let events = events_about(&c.api, "a-web");
    assert_eq!(events.len(), 1, "one Event, not one per sync: {events:#?}");
    let e = &events[0];
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["reason"], "FrontendConflict");
    assert_eq!(e["action"], "Program");
    assert_eq!(e["reportingController"], "proxy-agent");
    assert_eq!(e["reportingInstance"], format!("proxy-agent-{NODE}"));
    assert_eq!((&e["regarding"]["kind"], &e["regarding"]["uid"]), (&json!("Service"), &younger["metadata"]["uid"]));
    assert_eq!((&e["related"]["name"], &e["related"]["uid"]), (&json!("web"), &older["metadata"]["uid"]));
    let note = e["note"].as_str().expect("note");
    assert!(note.contains("default/a-web") && note.contains("default/web ") && note.contains(&EXTERNAL_IP.to_string()), "names both Services: {note}");
    assert!(e.get("series").is_none_or(Value::is_null), "not repeated: {e}");
    assert!(events_about(&c.api, "web").is_empty(), "nothing on the winner");
    let posts = c.api.requests().iter().filter(|r| r.method != "GET" && r.path.contains("/events")).count();
    assert_eq!(posts, 1, "one write to the events API");
    let warnings = c.sb.agent_log().matches("skipping Service default/a-web").count();
    assert_eq!(warnings, 1, "one warning:\n{}", c.sb.agent_log());

    for (series, want) in [("proxy_events_published_total", 1), ("proxy_events_failed_total", 0), ("proxy_events_dropped_total", 0)] {
        assert_eq!(c.metric(series), Some(f64::from(want)), "{series}");
    }

    // The refusal goes (the younger Service moves to port 81, where it is
    // served) and comes back: the same Event counts it in its series.
    let port = |p: u16| json!({"spec": {"externalIPs": [EXTERNAL_IP.to_string()], "ports": [{"name": "http", "port": p, "targetPort": 8080, "protocol": "TCP"}]}});
    c.api.apply(service("a-web", Ipv4Addr::new(10, 96, 0, 11), port(81))).expect("move");
    wait_programmed(&c.sb.bpffs, Duration::from_secs(20), "the younger Service on port 81", |v| {
        inspect_backends(v, EXTERNAL_IP, 81) == vec![format!("{}:8080", pod_ip(2))]
    });
    c.api.apply(service("a-web", Ipv4Addr::new(10, 96, 0, 11), port(80))).expect("back");
    wait_programmed(&c.sb.bpffs, Duration::from_secs(20), "port 81 gone", |v| inspect_backends(v, EXTERNAL_IP, 81).is_empty());
    assert!(
        c.api.wait_until(Duration::from_secs(20), |api| events_about(api, "a-web").first().is_some_and(|e| e["series"]["count"] == 2)),
        "the repeated refusal is not counted in the series: {:#?}",
        events_about(&c.api, "a-web")
    );
    assert_eq!(events_about(&c.api, "a-web").len(), 1, "still one Event");
    assert_eq!(c.metric("proxy_events_published_total"), Some(2.0));
}

/// Without the RBAC rule for Events (403), refusals are still logged and
/// the rest works; the failed publishes are counted and logged once (not
/// per Event), and publishing resumes once the rule is there.
#[test]
fn events_that_cannot_be_published_are_counted_and_logged_once() {
    const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
    const FAILED: &str = "publishing a Kubernetes Event failed";
    let mut c = Cluster::new("apievf", 1);
    c.api.forbid_writes("Event", true);
    let claim = || json!({"spec": {"externalIPs": [EXTERNAL_IP.to_string()]}});
    c.api.apply(service("web", VIP, claim())).expect("older");
    c.api.apply(slice("web-1", "web", json!([ep(pod_ip(1), NODE, true)]))).expect("slice");
    std::thread::sleep(Duration::from_millis(1100));
    for i in 1..=3u8 {
        c.api.apply(service(&format!("b{i}"), Ipv4Addr::new(10, 96, 0, 20 + i), claim())).expect("younger");
    }
    c.start_agent();
    wait_programmed(&c.sb.bpffs, Duration::from_secs(20), "the older Service on the externalIP", |v| {
        inspect_backends(v, EXTERNAL_IP, 80) == vec![format!("{}:8080", pod_ip(1))]
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.metric("proxy_events_failed_total") != Some(3.0) {
        assert!(Instant::now() < deadline, "3 failed publishes never counted:\n{}", c.sb.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.metric("proxy_events_published_total"), Some(0.0));
    let log = c.sb.agent_log();
    assert_eq!(log.matches(FAILED).count(), 1, "logged once:\n{log}");
    assert_eq!(log.matches("skipping Service default/b").count(), 3, "every refusal still logged:\n{log}");
    assert!(c.api.list("Event", None).is_empty());
    assert_eq!(c.get().expect("the ClusterIP still serves"), "pod1");

    c.api.forbid_writes("Event", false);
    c.api.apply(service("b4", Ipv4Addr::new(10, 96, 0, 30), claim())).expect("one more");
    assert!(
        c.api.wait_until(Duration::from_secs(20), |api| api.list("Event", None).iter().any(|e| e["regarding"]["name"] == "b4")),
        "publishing did not resume:\n{}",
        c.sb.agent_log()
    );
    assert_eq!(c.metric("proxy_events_published_total"), Some(1.0));
    assert_eq!(c.metric("proxy_events_failed_total"), Some(3.0));
    let log = c.sb.agent_log();
    assert!(log.contains("publishing Kubernetes Events works again"), "{log}");
    assert_eq!(log.matches(FAILED).count(), 1, "{log}");
}

/// Hundreds of changes followed through the API server — endpoints
/// flipping, Services deleted and re-created, externalIPs contested — each
/// burst programmed by a partial sync, leave the maps exactly as a fresh
/// agent's full sync programs the same objects, and a Service nobody
/// touched keeps serving throughout.
#[test]
fn partial_syncs_after_many_changes_equal_a_fresh_full_sync() {
    let mut c = Cluster::new("apip", 3);
    let pods = [pod_ip(1), pod_ip(2), pod_ip(3)];
    let vip = |i: u8| Ipv4Addr::new(10, 96, 1, i + 1);
    let svc = |i: u8, contested: bool| {
        let extra = if contested { json!({"spec": {"externalIPs": ["203.0.113.5"]}}) } else { json!({}) };
        service(&format!("s{i}"), vip(i), extra)
    };
    let mut seed: u64 = 0x5851_f42d_4c95_7f2d;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let eps = |mask: u64| json!(pods.iter().enumerate().map(|(j, ip)| ep(*ip, NODE, mask & (1 << j) != 0)).collect::<Vec<_>>());
    c.api.apply(service("web", VIP, json!({}))).expect("web");
    c.api.apply(slice("web-1", "web", eps(0b111))).expect("web slice");
    for i in 0..40u8 {
        c.api.apply(svc(i, i % 4 == 0)).expect("svc");
        c.api.apply(slice(&format!("s{i}-1"), &format!("s{i}"), eps(next(8)))).expect("slice");
    }
    c.start_agent();
    wait_programmed(&c.sb.bpffs, Duration::from_secs(30), "41 ClusterIPs", |v| v.iter().filter(|f| f.kind == "ClusterIP").count() == 41);

    let stop = Arc::new(AtomicBool::new(false));
    let load = c.sb.client.spawn({
        let stop = stop.clone();
        move || {
            let (start, mut ok, mut failed) = (Instant::now(), 0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_mins(1) {
                match http_get(SocketAddr::from((VIP, 80)), T) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        }
    });
    for step in 0..300 {
        let i = u8::try_from(next(40)).expect("small");
        let r = match next(5) {
            0 => c.api.delete("Service", Some("default"), &format!("s{i}")).map(|_| ()),
            1 => c.api.apply(svc(i, next(2) == 0)).map(|_| ()),
            _ => c.api.apply(slice(&format!("s{i}-1"), &format!("s{i}"), eps(next(8)))).map(|_| ()),
        };
        // A delete of a Service already gone is a 404: fine.
        let _ = r;
        std::thread::sleep(Duration::from_millis(if step % 25 == 0 { 1200 } else { 10 }));
    }
    let quiet = |c: &Cluster| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = normalized(&programmed(&c.sb.bpffs));
        loop {
            std::thread::sleep(Duration::from_millis(2500));
            let now = normalized(&programmed(&c.sb.bpffs));
            if now == last {
                return now;
            }
            assert!(Instant::now() < deadline, "the maps never settled");
            last = now;
        }
    };
    let incremental = quiet(&c);
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().expect("load");
    assert!(failed.is_empty() && ok > 50, "the untouched Service: {ok} ok, failed {failed:?}");
    let (_, metrics) = c.node_http(10249, "/metrics");
    let partial = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kubeproxy_sync_partial_proxy_rules_duration_seconds_count "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_default();
    assert!(partial >= 10.0, "the changes went through partial syncs: {partial}");

    // A fresh agent on empty maps: one full sync of the same objects.
    c.sb.kill_agent();
    run(&agent_bin().to_string_lossy(), &["--bpffs", &c.sb.bpffs.to_string_lossy(), "cleanup"]);
    c.start_agent();
    wait_programmed(&c.sb.bpffs, Duration::from_secs(30), "the fresh agent's first sync", |v| !v.is_empty());
    let fresh = quiet(&c);
    assert_eq!(incremental, fresh, "partial syncs diverged from a full sync");
}

/// Frontends as comparable text: ids left out (a fresh agent numbers anew).
fn normalized(v: &[proxy_agent::inspect::FrontendView]) -> Vec<String> {
    let mut out: Vec<String> = v
        .iter()
        .map(|f| {
            let mut bs: Vec<String> = f.backends.iter().map(|b| format!("{}:{}", b.address, b.port)).collect();
            bs.sort();
            format!("{} {}:{}/{} {} drop={} {}", f.service, f.address, f.port, f.protocol, f.kind, f.drop_when_empty, bs.join(","))
        })
        .collect();
    out.sort();
    out
}
