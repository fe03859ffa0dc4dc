//! The test API server against real clients over real HTTP: a raw HTTP/1.1
//! client written here (list/watch semantics byte by byte), kube-rs'
//! `watcher` (the agent's client) and kubectl (an independent client).
//! Every wait is bounded in time.
use std::{
    fmt::Write as _,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use integration_tests::{
    apiserver::{ApiServer, Kind, Options},
    netns::{Netns, require_root, unique_name},
};
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
};
use serde_json::{Value, json};

// ------------------------------------------------------------ raw HTTP

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

fn send_request(s: &mut TcpStream, addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        let _ = write!(req, "{k}: {v}\r\n");
    }
    if let Some(b) = body {
        let _ = write!(req, "Content-Length: {}\r\n", b.len());
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    s.write_all(req.as_bytes()).expect("send request");
}

/// Reads the status line and headers; returns them and the bytes after.
fn read_head(s: &mut TcpStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut chunk).expect("read response head");
        assert!(n > 0, "connection closed before the response head: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    (status, headers, buf[end + 4..].to_vec())
}

/// Decodes as many complete chunks as `raw` holds into `out`; returns
/// `Some(())` once the terminating zero-size chunk has been seen.
fn dechunk(raw: &mut Vec<u8>, out: &mut Vec<u8>) -> Option<()> {
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&raw[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
        if raw.len() < line_end + 2 + size + 2 {
            return None;
        }
        out.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
        raw.drain(..line_end + 2 + size + 2);
        if size == 0 {
            return Some(());
        }
    }
}

fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    let mut s = connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    send_request(&mut s, addr, method, path, headers, body);
    let (status, headers, mut rest) = read_head(&mut s);
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut tail = Vec::new();
    s.read_to_end(&mut tail).expect("read response body");
    rest.extend_from_slice(&tail);
    let body = if chunked {
        let mut out = Vec::new();
        assert!(dechunk(&mut rest, &mut out).is_some(), "incomplete chunked body");
        out
    } else {
        rest
    };
    Resp { status, headers, body }
}

fn get(api: &ApiServer, path: &str) -> Resp {
    request(api.addr(), "GET", path, &[], None)
}

fn send_json(api: &ApiServer, method: &str, path: &str, content_type: &str, body: &Value) -> Resp {
    request(api.addr(), method, path, &[("Content-Type", content_type)], Some(&body.to_string()))
}

/// How a watch stream went on.
#[derive(Debug)]
enum Next {
    Event(Value),
    /// The terminating chunk: the server ended the watch (timeoutSeconds).
    Ended,
    /// The connection closed without the terminating chunk.
    Aborted,
    Timeout,
}

struct Watch {
    stream: TcpStream,
    status: u16,
    raw: Vec<u8>,
    data: Vec<u8>,
    ended: bool,
}

impl Watch {
    fn open(api: &ApiServer, path: &str) -> Watch {
        Self::open_with(api, path, &[])
    }

    fn open_with(api: &ApiServer, path: &str, headers: &[(&str, &str)]) -> Watch {
        let mut stream = connect(api.addr()).expect("connect");
        send_request(&mut stream, api.addr(), "GET", path, headers, None);
        let (status, _, raw) = read_head(&mut stream);
        Watch { stream, status, raw, data: Vec::new(), ended: false }
    }

    fn next(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.ended && dechunk(&mut self.raw, &mut self.data).is_some() {
                self.ended = true;
            }
            if let Some(p) = self.data.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.data.drain(..=p).collect();
                return Next::Event(serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("watch line is not JSON ({e}): {}", String::from_utf8_lossy(&line))
                }));
            }
            if self.ended {
                return Next::Ended;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).expect("read timeout");
            let mut buf = [0u8; 8192];
            match self.stream.read(&mut buf) {
                Ok(0) => return Next::Aborted,
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Next::Timeout,
                Err(_) => return Next::Aborted,
            }
        }
    }

    /// The next event, which must come within 5 s.
    fn event(&mut self) -> Value {
        match self.next(Duration::from_secs(5)) {
            Next::Event(e) => e,
            other => panic!("expected a watch event, got {other:?}"),
        }
    }

    /// The next non-bookmark event.
    fn change(&mut self) -> Value {
        loop {
            let e = self.event();
            if e["type"] != "BOOKMARK" {
                return e;
            }
        }
    }
}

fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {v}"))
}

fn service(ns: &str, name: &str, labels: &Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": { "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }], "selector": { "app": name } },
    })
}

fn start() -> ApiServer {
    ApiServer::start("127.0.0.1:0".parse().expect("addr"))
}

// ------------------------------------------------------------ raw HTTP tests

#[test]
fn discovery_documents_describe_the_served_resources() {
    let api = start();
    let v = get(&api, "/version").json();
    assert_eq!(v["major"], "1");
    assert!(v["gitVersion"].as_str().is_some_and(|s| s.starts_with("v1.")));

    let core = get(&api, "/api").json();
    assert_eq!(core["kind"], "APIVersions");
    assert_eq!(core["versions"], json!(["v1"]));

    let v1 = get(&api, "/api/v1").json();
    assert_eq!(v1["kind"], "APIResourceList");
    let svc = v1["resources"].as_array().expect("resources").iter().find(|r| r["name"] == "services").expect("services");
    assert_eq!(svc["singularName"], "service");
    assert_eq!(svc["namespaced"], true);
    assert_eq!(svc["kind"], "Service");
    assert_eq!(svc["shortNames"], json!(["svc"]));
    for verb in ["create", "delete", "get", "list", "patch", "update", "watch"] {
        assert!(svc["verbs"].as_array().expect("verbs").contains(&json!(verb)), "services lacks verb {verb}");
    }
    let node = v1["resources"].as_array().expect("resources").iter().find(|r| r["name"] == "nodes").expect("nodes");
    assert_eq!(node["namespaced"], false);

    let groups = get(&api, "/apis").json();
    assert_eq!(groups["kind"], "APIGroupList");
    assert_eq!(groups["groups"][0]["name"], "discovery.k8s.io");
    assert_eq!(groups["groups"][0]["preferredVersion"]["groupVersion"], "discovery.k8s.io/v1");
    assert_eq!(get(&api, "/apis/discovery.k8s.io").json()["kind"], "APIGroup");
    let disc = get(&api, "/apis/discovery.k8s.io/v1").json();
    assert_eq!(disc["groupVersion"], "discovery.k8s.io/v1");
    assert_eq!(disc["resources"][0]["name"], "endpointslices");
    assert_eq!(disc["resources"][0]["namespaced"], true);

    let missing = get(&api, "/api/v1/namespaces/default/pods");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["kind"], "Status");
    assert_eq!(missing.json()["reason"], "NotFound");
}

#[test]
fn writes_set_system_fields_and_errors_are_status_objects() {
    let api = start();
    let base = "/api/v1/namespaces/default/services";
    let rv0 = api.current_resource_version();

    let created = send_json(&api, "POST", base, "application/json", &service("", "web", &json!({ "app": "web" })));
    assert_eq!(created.status, 201, "{}", String::from_utf8_lossy(&created.body));
    let svc = created.json();
    assert_eq!(svc["kind"], "Service");
    assert_eq!(svc["metadata"]["namespace"], "default");
    assert!(rv_of(&svc) > rv0);
    assert_eq!(rv_of(&svc), api.current_resource_version());
    assert!(svc["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert!(svc["metadata"]["creationTimestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(svc["metadata"].get("generation").is_none(), "Services have no generation");
    // Defaults and allocation, as the real server does.
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["sessionAffinity"], "None");
    assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
    let ip = svc["spec"]["clusterIP"].as_str().expect("cluster IP allocated");
    assert!(ip.starts_with("10."), "{ip}");
    assert_eq!(svc["spec"]["clusterIPs"], json!([ip]));

    let dup = send_json(&api, "POST", base, "application/json", &service("default", "web", &json!({})));
    assert_eq!(dup.status, 409);
    let dup_status = dup.json();
    assert_eq!((dup_status["kind"].as_str(), dup_status["reason"].as_str(), dup_status["code"].as_u64()), (Some("Status"), Some("AlreadyExists"), Some(409)));
    assert_eq!(dup_status["message"], "services \"web\" already exists");
    assert_eq!(dup_status["details"], json!({ "name": "web", "kind": "services" }));

    // PUT with a stale resourceVersion conflicts; without one it is unconditional.
    let mut stale = svc.clone();
    stale["metadata"]["resourceVersion"] = json!((rv_of(&svc) - 1).to_string());
    let r = send_json(&api, "PUT", &format!("{base}/web"), "application/json", &stale);
    assert_eq!((r.status, r.json()["reason"].as_str().map(str::to_owned)), (409, Some("Conflict".into())));
    let mut fresh = svc.clone();
    fresh["metadata"]["resourceVersion"] = json!("");
    fresh["spec"]["ports"][0]["port"] = json!(81);
    let r = send_json(&api, "PUT", &format!("{base}/web"), "application/json", &fresh);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let updated = r.json();
    assert!(rv_of(&updated) > rv_of(&svc));
    assert_eq!(updated["metadata"]["uid"], svc["metadata"]["uid"]);
    assert_eq!(updated["spec"]["clusterIP"], svc["spec"]["clusterIP"], "the cluster IP is kept");

    // Merge and strategic merge patches (what kubectl label/patch send).
    let r = send_json(&api, "PATCH", &format!("{base}/web"), "application/merge-patch+json", &json!({ "metadata": { "labels": { "tier": "front" } } }));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["metadata"]["labels"], json!({ "app": "web", "tier": "front" }));
    let r = send_json(&api, "PATCH", &format!("{base}/web"), "application/strategic-merge-patch+json", &json!({
        "spec": { "ports": [{ "port": 81, "targetPort": 9090 }] }
    }));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["spec"]["ports"][0]["name"], "http", "strategic merge keeps the port's other fields");
    assert_eq!(r.json()["spec"]["ports"][0]["targetPort"], 9090);
    // A patch that changes nothing writes nothing.
    let rv = api.current_resource_version();
    let r = send_json(&api, "PATCH", &format!("{base}/web"), "application/merge-patch+json", &json!({ "metadata": { "labels": { "tier": "front" } } }));
    assert_eq!((r.status, api.current_resource_version()), (200, rv));
    let r = send_json(&api, "PATCH", &format!("{base}/nope"), "application/merge-patch+json", &json!({}));
    assert_eq!(r.status, 404);

    // Invalid objects are 422 with field causes.
    let r = send_json(&api, "POST", base, "application/json", &json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": "Bad_Name" }, "spec": { "ports": [{ "port": 70000 }] } }));
    assert_eq!(r.status, 422);
    let s = r.json();
    assert_eq!(s["reason"], "Invalid");
    let fields: Vec<&str> = s["details"]["causes"].as_array().expect("causes").iter().filter_map(|cause| cause["field"].as_str()).collect();
    assert_eq!(fields, ["metadata.name", "spec.ports[0].port"]);

    // DELETE answers the Service; a re-read is a 404 NotFound Status.
    let r = request(api.addr(), "DELETE", &format!("{base}/web"), &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["metadata"]["name"], "web");
    let r = get(&api, &format!("{base}/web"));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["reason"], "NotFound");
    assert_eq!(r.json()["message"], "services \"web\" not found");
    assert!(api.get("svc", None, "web").is_none());

    // EndpointSlices: generation, and a Success Status on delete.
    let eps = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": "web-abc", "labels": { "kubernetes.io/service-name": "web" } },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": ["10.244.0.11"], "conditions": { "ready": true } }],
        "ports": [{ "name": "http", "port": 8080 }],
    });
    let slices = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";
    let r = send_json(&api, "POST", slices, "application/json", &eps);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["metadata"]["generation"], 1);
    assert_eq!(r.json()["ports"][0]["protocol"], "TCP");
    let r = send_json(&api, "PATCH", &format!("{slices}/web-abc"), "application/merge-patch+json", &json!({ "endpoints": [] }));
    assert_eq!(r.json()["metadata"]["generation"], 2);
    let r = request(api.addr(), "DELETE", &format!("{slices}/web-abc"), &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["kind"], "Status");
    assert_eq!(r.json()["status"], "Success");
    let r = get(&api, &format!("{slices}/web-abc"));
    assert_eq!(r.json()["message"], "endpointslices.discovery.k8s.io \"web-abc\" not found");
}

#[test]
fn lists_carry_resource_versions_and_page_with_continue_tokens() {
    let api = start();
    for (ns, name) in [("b", "s1"), ("a", "s3"), ("a", "s1"), ("b", "s2"), ("a", "s2"), ("c", "s1"), ("a", "s4")] {
        api.apply(service(ns, name, &json!({}))).expect("apply");
    }
    let rv = api.current_resource_version();

    let all = get(&api, "/api/v1/services").json();
    assert_eq!(all["kind"], "ServiceList");
    assert_eq!(rv_of(&all), rv);
    let keys: Vec<String> = all["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| format!("{}/{}", i["metadata"]["namespace"].as_str().unwrap_or(""), i["metadata"]["name"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(keys, ["a/s1", "a/s2", "a/s3", "a/s4", "b/s1", "b/s2", "c/s1"], "etcd key order");
    assert!(all["items"][0].get("kind").is_none(), "list items carry no kind, as on the wire");

    let in_a = get(&api, "/api/v1/namespaces/a/services").json();
    assert_eq!(in_a["items"].as_array().map(Vec::len), Some(4));

    // Pages: a consistent snapshot at the first page's resourceVersion, even
    // when objects change between pages.
    let p1 = get(&api, "/api/v1/services?limit=3").json();
    assert_eq!(p1["items"].as_array().map(Vec::len), Some(3));
    assert_eq!(p1["metadata"]["remainingItemCount"], 4);
    let token = p1["metadata"]["continue"].as_str().expect("continue").to_owned();
    api.delete("svc", Some("b"), "s1").expect("delete");
    api.apply(service("b", "s0", &json!({}))).expect("apply");
    let p2 = get(&api, &format!("/api/v1/services?limit=3&continue={token}")).json();
    assert_eq!(rv_of(&p2), rv);
    let names: Vec<&str> = p2["items"].as_array().expect("items").iter().filter_map(|i| i["metadata"]["name"].as_str()).collect();
    assert_eq!(names, ["s4", "s1", "s2"], "page 2 of the snapshot: a/s4, b/s1, b/s2");
    let token2 = p2["metadata"]["continue"].as_str().expect("continue").to_owned();
    let p3 = get(&api, &format!("/api/v1/services?limit=3&continue={token2}")).json();
    assert_eq!(p3["items"].as_array().map(Vec::len), Some(1));
    assert!(p3["metadata"].get("continue").is_none_or(|c| c.as_str() == Some("")));

    // Exact reads of a past resourceVersion.
    let exact = get(&api, &format!("/api/v1/namespaces/b/services?resourceVersion={rv}&resourceVersionMatch=Exact")).json();
    assert_eq!(exact["items"].as_array().map(Vec::len), Some(2));

    // resourceVersion=0 is served from the cache and ignores limit.
    let cached = get(&api, "/api/v1/services?limit=2&resourceVersion=0").json();
    assert_eq!(cached["items"].as_array().map(Vec::len), Some(7));

    // After a compaction, an old continue token is 410 Expired.
    api.compact();
    let r = get(&api, &format!("/api/v1/services?limit=3&continue={token2}"));
    assert_eq!(r.status, 410);
    assert_eq!(r.json()["reason"], "Expired");

    // A resourceVersion the server has not reached: 504 after waiting.
    let t = Instant::now();
    let r = get(&api, &format!("/api/v1/services?resourceVersion={}", rv + 100));
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["details"]["causes"][0]["reason"], "ResourceVersionTooLarge");
    assert!(t.elapsed() >= Duration::from_secs(2));
}

#[test]
fn label_and_field_selectors_filter_lists() {
    let api = start();
    api.apply(service("default", "a", &json!({ "app": "web", "tier": "front" }))).expect("apply");
    api.apply(service("default", "b", &json!({ "app": "web", "tier": "back" }))).expect("apply");
    api.apply(service("default", "c", &json!({ "app": "db" }))).expect("apply");
    api.apply(service("other", "a", &json!({}))).expect("apply");
    let names = |q: &str| -> Vec<String> {
        let r = get(&api, &format!("/api/v1/services?{q}"));
        assert_eq!(r.status, 200, "{q}: {}", String::from_utf8_lossy(&r.body));
        r.json()["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| format!("{}/{}", i["metadata"]["namespace"].as_str().unwrap_or(""), i["metadata"]["name"].as_str().unwrap_or("")))
            .collect()
    };
    assert_eq!(names("labelSelector=app%3Dweb"), ["default/a", "default/b"]);
    assert_eq!(names("labelSelector=app%3D%3Dweb,tier!%3Dfront"), ["default/b"]);
    assert_eq!(names("labelSelector=tier!%3Dfront"), ["default/b", "default/c", "other/a"], "!= selects unlabelled objects too");
    assert_eq!(names("labelSelector=tier+in+(front,back)"), ["default/a", "default/b"]);
    assert_eq!(names("labelSelector=app+notin+(web)"), ["default/c", "other/a"]);
    assert_eq!(names("labelSelector=tier"), ["default/a", "default/b"]);
    assert_eq!(names("labelSelector=!app"), ["other/a"]);
    assert_eq!(names("fieldSelector=metadata.name%3Da"), ["default/a", "other/a"]);
    assert_eq!(names("fieldSelector=metadata.name%3Da,metadata.namespace!%3Ddefault"), ["other/a"]);
    assert_eq!(names("labelSelector=app%3Dweb&limit=1&fieldSelector=metadata.name!%3Da"), ["default/b"]);

    let bad = get(&api, "/api/v1/services?labelSelector=app+in+(x");
    assert_eq!((bad.status, bad.json()["reason"].as_str().map(str::to_owned)), (400, Some("BadRequest".into())));
    let bad = get(&api, "/api/v1/services?fieldSelector=spec.nope%3Dx");
    assert_eq!(bad.status, 400);
    assert!(bad.json()["message"].as_str().is_some_and(|m| m.contains("field label not supported")));

    // Nodes (cluster-scoped) by name, as kube-rs watches its own node.
    api.apply(json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node-1" } })).expect("node");
    api.apply(json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node-2" } })).expect("node");
    let r = get(&api, "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-2").json();
    assert_eq!(r["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(r["items"][0]["metadata"]["name"], "node-2");
    assert!(r["items"][0]["metadata"].get("namespace").is_none());
    assert_eq!(get(&api, "/api/v1/namespaces/default/nodes").status, 404);
}

#[test]
fn watch_streams_events_after_the_resource_version_in_order() {
    let api = start();
    api.apply(service("default", "before", &json!({}))).expect("apply");
    let rv = api.current_resource_version();
    let mut w = Watch::open(&api, &format!("/api/v1/namespaces/default/services?watch=true&resourceVersion={rv}&timeoutSeconds=3"));
    assert_eq!(w.status, 200);

    api.apply(service("default", "web", &json!({ "app": "web" }))).expect("create");
    let mut svc = service("default", "web", &json!({ "app": "web", "v": "2" }));
    svc["spec"]["ports"][0]["port"] = json!(81);
    api.apply(svc).expect("update");
    api.apply(service("other", "elsewhere", &json!({}))).expect("other namespace");
    api.delete("svc", Some("default"), "web").expect("delete");

    let (added, modified, deleted) = (w.change(), w.change(), w.change());
    assert_eq!(
        (added["type"].as_str(), modified["type"].as_str(), deleted["type"].as_str()),
        (Some("ADDED"), Some("MODIFIED"), Some("DELETED"))
    );
    assert_eq!(added["object"]["kind"], "Service", "watch objects carry kind and apiVersion");
    assert_eq!(modified["object"]["spec"]["ports"][0]["port"], 81);
    let rvs = [rv, rv_of(&added["object"]), rv_of(&modified["object"]), rv_of(&deleted["object"])];
    assert!(rvs.is_sorted() && rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");
    assert_eq!(rvs[3], api.current_resource_version(), "a DELETED object carries the delete's resourceVersion");
    // Ends at timeoutSeconds with the terminating chunk.
    let started = Instant::now();
    assert!(matches!(w.next(Duration::from_secs(6)), Next::Ended));
    assert!(started.elapsed() < Duration::from_secs(4));

    // Without a resourceVersion: the current state as ADDED first.
    let mut w = Watch::open(&api, "/api/v1/services?watch=1&timeoutSeconds=2");
    let names: Vec<String> = (0..2).map(|_| w.change()).map(|e| {
        assert_eq!(e["type"], "ADDED");
        e["object"]["metadata"]["name"].as_str().unwrap_or("").to_owned()
    }).collect();
    assert_eq!(names, ["before", "elsewhere"]);
}

#[test]
fn watch_with_a_selector_sees_objects_enter_and_leave_it() {
    let api = start();
    let rv = api.current_resource_version();
    let mut w = Watch::open(&api, &format!("/api/v1/services?watch=true&resourceVersion={rv}&labelSelector=app%3Dweb&timeoutSeconds=10"));
    api.apply(service("default", "s", &json!({ "app": "db" }))).expect("not matching");
    api.apply(service("default", "s", &json!({ "app": "web" }))).expect("starts matching");
    api.apply(service("default", "s", &json!({ "app": "web", "x": "y" }))).expect("still matching");
    let leave_rv = rv_of(&api.apply(service("default", "s", &json!({ "app": "db" }))).expect("stops matching"));
    api.delete("svc", Some("default"), "s").expect("delete (not matching)");
    api.apply(service("default", "t", &json!({ "app": "web" }))).expect("marker");

    let added = w.change();
    assert_eq!(added["type"], "ADDED", "an object that starts matching is ADDED");
    assert_eq!(w.change()["type"], "MODIFIED");
    let left = w.change();
    assert_eq!(left["type"], "DELETED", "an object that stops matching is DELETED");
    assert_eq!(left["object"]["metadata"]["labels"]["app"], "web", "with its old content");
    assert_eq!(rv_of(&left["object"]), leave_rv, "and the new resourceVersion");
    let marker = w.change();
    assert_eq!((marker["type"].as_str(), marker["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("t")));
}

#[test]
fn watch_bookmarks_when_allowed() {
    let api = ApiServer::start_with(
        "127.0.0.1:0".parse().expect("addr"),
        Options { bookmark_interval: Duration::from_millis(200), ..Options::default() },
    );
    api.apply(service("default", "s", &json!({}))).expect("apply");
    let rv = api.current_resource_version();
    let mut w = Watch::open(&api, &format!("/api/v1/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=5"));
    let b = w.event();
    assert_eq!(b["type"], "BOOKMARK");
    assert_eq!(b["object"]["kind"], "Service");
    assert_eq!(b["object"]["apiVersion"], "v1");
    assert_eq!(rv_of(&b["object"]), rv);
    // A write to another kind moves the bookmark's resourceVersion on.
    api.apply(json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "n" } })).expect("node");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let b = w.event();
        assert_eq!(b["type"], "BOOKMARK", "no Service changed");
        if rv_of(&b["object"]) == api.current_resource_version() {
            break;
        }
        assert!(Instant::now() < deadline, "bookmark never reached the node's resourceVersion");
    }

    // No bookmarks unless asked.
    let mut w = Watch::open(&api, &format!("/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=1"));
    assert!(matches!(w.next(Duration::from_secs(3)), Next::Ended));

    // sendInitialEvents: the state as ADDED, then the initial-events-end bookmark.
    let w = Watch::open(&api, "/api/v1/services?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=&allowWatchBookmarks=true&timeoutSeconds=2");
    assert_eq!(w.status, 400, "resourceVersionMatch needs a resourceVersion");
    let mut w2 = Watch::open(&api, "/api/v1/services?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0&allowWatchBookmarks=true&timeoutSeconds=2");
    assert_eq!(w2.status, 200);
    assert_eq!(w2.event()["type"], "ADDED");
    let end = w2.event();
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
}

#[test]
fn watch_from_a_compacted_resource_version_gets_an_expired_error_event() {
    let api = start();
    api.apply(service("default", "s", &json!({}))).expect("apply");
    let old = api.current_resource_version();
    api.apply(service("default", "s", &json!({ "v": "2" }))).expect("apply");
    api.compact();
    let mut w = Watch::open(&api, &format!("/api/v1/services?watch=true&resourceVersion={old}&allowWatchBookmarks=true&timeoutSeconds=5"));
    assert_eq!(w.status, 200, "HTTP 200, not 410: the error comes as an event");
    let e = w.event();
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["kind"], "Status");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    assert!(matches!(w.next(Duration::from_secs(2)), Next::Ended));

    // From the current resourceVersion nothing is missing: no error.
    let now = api.current_resource_version();
    let mut w = Watch::open(&api, &format!("/api/v1/services?watch=true&resourceVersion={now}&timeoutSeconds=1"));
    assert!(matches!(w.next(Duration::from_secs(3)), Next::Ended));

    // A bounded history forgets on its own.
    let api = ApiServer::start_with("127.0.0.1:0".parse().expect("addr"), Options { history: 3, ..Options::default() });
    let first = api.current_resource_version();
    for i in 0..5 {
        api.apply(service("default", &format!("s{i}"), &json!({}))).expect("apply");
    }
    let mut w = Watch::open(&api, &format!("/api/v1/services?watch=true&resourceVersion={first}&timeoutSeconds=2"));
    assert_eq!(w.event()["object"]["code"], 410);
}

#[test]
fn drop_watches_aborts_open_streams() {
    let api = start();
    let rv = api.current_resource_version();
    let mut w1 = Watch::open(&api, &format!("/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=30"));
    let mut w2 = Watch::open(&api, &format!("/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion={rv}&timeoutSeconds=30"));
    assert!(api.wait_until(Duration::from_secs(5), |a| a.open_watches() == 2));
    api.apply(service("default", "s", &json!({}))).expect("apply");
    assert_eq!(w1.change()["type"], "ADDED");
    api.drop_watches();
    assert!(matches!(w1.next(Duration::from_secs(5)), Next::Aborted), "closed without the terminating chunk");
    assert!(matches!(w2.next(Duration::from_secs(5)), Next::Aborted));
    assert!(api.wait_until(Duration::from_secs(5), |a| a.open_watches() == 0));
    // New watches work.
    let mut w3 = Watch::open(&api, &format!("/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=5"));
    assert_eq!(w3.change()["type"], "ADDED");
}

#[test]
fn injected_errors_stalls_and_downtime() {
    let api = start();
    api.fail_next(2, 500);
    for _ in 0..2 {
        let r = get(&api, "/api/v1/services");
        assert_eq!(r.status, 500);
        let s = r.json();
        assert_eq!((s["kind"].as_str(), s["reason"].as_str(), s["code"].as_u64()), (Some("Status"), Some("InternalError"), Some(500)));
    }
    assert_eq!(get(&api, "/api/v1/services").status, 200);

    api.fail_all(Some(503));
    assert_eq!(get(&api, "/version").status, 503);
    assert_eq!(get(&api, "/api/v1/nodes").status, 503);
    api.fail_all(Some(429));
    assert_eq!(get(&api, "/api").header("Retry-After"), Some("1"));
    api.fail_all(None);
    assert_eq!(get(&api, "/api/v1/nodes").status, 200);

    api.stall(Duration::from_millis(300));
    let t = Instant::now();
    assert_eq!(get(&api, "/version").status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    api.stall(Duration::ZERO);

    // Down: the open watch closes, connections are refused; up again on the same port.
    let mut w = Watch::open(&api, "/api/v1/services?watch=true&timeoutSeconds=30");
    let addr = api.addr();
    api.set_down(true);
    assert!(api.is_down());
    assert!(matches!(w.next(Duration::from_secs(5)), Next::Aborted));
    let err = connect(addr).expect_err("connect while down");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    api.apply(service("default", "while-down", &json!({}))).expect("the Rust API works while down");
    api.set_down(false);
    assert_eq!(api.addr(), addr);
    let r = get(&api, "/api/v1/namespaces/default/services/while-down");
    assert_eq!(r.status, 200);

    let log = api.requests();
    assert!(log.iter().any(|r| r.path == "/api/v1/namespaces/default/services/while-down" && r.method == "GET"));
    assert!(log.iter().any(|r| r.is_watch_of(Kind::Service) && r.param("timeoutSeconds").as_deref() == Some("30")));
}

#[test]
fn tables_for_kubectl_get() {
    let api = start();
    let mut svc = service("default", "web", &json!({}));
    svc["spec"]["clusterIP"] = json!("10.96.0.10");
    svc["spec"]["type"] = json!("NodePort");
    svc["spec"]["ports"][0]["nodePort"] = json!(30080);
    api.apply(svc).expect("apply");
    let accept = ("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json");
    let t = request(api.addr(), "GET", "/api/v1/services?limit=500", &[accept], None).json();
    assert_eq!(t["kind"], "Table");
    assert_eq!(t["apiVersion"], "meta.k8s.io/v1");
    let cols: Vec<&str> = t["columnDefinitions"].as_array().expect("columns").iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(cols, ["Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age", "Selector"]);
    assert_eq!(t["rows"][0]["cells"].as_array().expect("cells")[..5], [json!("web"), json!("NodePort"), json!("10.96.0.10"), json!("<none>"), json!("80:30080/TCP")]);
    assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    assert_eq!(t["rows"][0]["object"]["metadata"]["namespace"], "default");
    assert!(t["metadata"]["resourceVersion"].as_str().is_some_and(|s| !s.is_empty()));
    let one = request(api.addr(), "GET", "/api/v1/namespaces/default/services/web", &[accept], None).json();
    assert_eq!(one["rows"].as_array().map(Vec::len), Some(1));
}

#[test]
fn starts_and_restarts_inside_a_network_namespace() {
    require_root();
    let ns = Netns::create(&unique_name("api"));
    let api = ns.run(|| ApiServer::start("127.0.0.1:0".parse().expect("addr")));
    let addr = api.addr();
    // Reachable inside the namespace, not from the root namespace's loopback
    // (unless a root-namespace socket happens to own the same port).
    let status = ns.run(move || {
        let mut s = connect(addr).expect("connect inside the namespace");
        send_request(&mut s, addr, "GET", "/version", &[], None);
        read_head(&mut s).0
    });
    assert_eq!(status, 200);
    api.set_down(true);
    api.set_down(false);
    let again = ns.run(move || connect(addr).is_ok());
    assert!(again, "bound again inside the namespace");
    assert!(!api.requests().is_empty());
}

// ------------------------------------------------------------ kube-rs

fn kube_client(api: &ApiServer, dir: &tempdir::Dir) -> impl std::future::Future<Output = Client> {
    let path = dir.path.join("kubeconfig");
    api.write_kubeconfig(&path).expect("write kubeconfig");
    async move {
        let kc = Kubeconfig::read_from(&path).expect("kube-rs reads the kubeconfig");
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("kube-rs config");
        Client::try_from(config).expect("kube-rs client")
    }
}

mod tempdir {
    use std::path::PathBuf;

    /// A directory removed on drop.
    pub struct Dir {
        pub path: PathBuf,
    }

    impl Dir {
        pub fn new(prefix: &str) -> Self {
            let path = std::env::temp_dir().join(integration_tests::netns::unique_name(prefix));
            std::fs::create_dir_all(&path).expect("temp dir");
            Self { path }
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Waits (bounded) for the next watcher event that `pick` accepts.
async fn next_matching<S, T>(stream: &mut S, what: &str, mut pick: impl FnMut(&watcher::Event<Service>) -> Option<T>) -> T
where
    S: futures::Stream<Item = Result<watcher::Event<Service>, watcher::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + Duration::from_mins(1);
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(tokio::time::error::Elapsed { .. }) => panic!("timed out waiting for {what}"),
            Ok(None) => panic!("watcher stream ended waiting for {what}"),
            // Errors (refused connections, 410) are retried by the watcher.
            Ok(Some(Err(_))) => {}
            Ok(Some(Ok(e))) => {
                if let Some(t) = pick(&e) {
                    return t;
                }
            }
        }
    }
}

fn svc_name(s: &Service) -> String {
    s.metadata.name.clone().unwrap_or_default()
}

#[test]
fn kube_rs_watcher_follows_changes_survives_drops_and_relists_after_expiry() {
    let api = start();
    let dir = tempdir::Dir::new("kubers");
    api.apply(service("default", "pre", &json!({}))).expect("apply");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = kube_client(&api, &dir).await;
        let svcs: Api<Service> = Api::all(client);
        let mut stream = watcher(svcs, watcher::Config::default()).boxed();

        // Initial list.
        let listed = next_matching(&mut stream, "the initial list", |e| match e {
            watcher::Event::InitApply(s) => Some(svc_name(s)),
            _ => None,
        })
        .await;
        assert_eq!(listed, "pre");
        next_matching(&mut stream, "InitDone", |e| matches!(e, watcher::Event::InitDone).then_some(())).await;
        let list = api.requests().into_iter().find(|r| r.is_list_of(Kind::Service)).expect("a list request");
        assert_eq!(list.param("limit").as_deref(), Some("500"));

        // Create, update, delete.
        api.apply(service("default", "web", &json!({ "app": "web" }))).expect("create");
        let s = next_matching(&mut stream, "web applied", |e| match e {
            watcher::Event::Apply(s) if svc_name(s) == "web" => Some(s.clone()),
            _ => None,
        })
        .await;
        assert!(s.spec.as_ref().and_then(|s| s.cluster_ip.clone()).is_some());
        api.apply(service("default", "web", &json!({ "app": "web", "v": "2" }))).expect("update");
        next_matching(&mut stream, "web updated", |e| match e {
            watcher::Event::Apply(s) if s.metadata.labels.as_ref().and_then(|l| l.get("v")).map(String::as_str) == Some("2") => Some(()),
            _ => None,
        })
        .await;
        api.delete("svc", Some("default"), "web").expect("delete");
        next_matching(&mut stream, "web deleted", |e| match e {
            watcher::Event::Delete(s) if svc_name(s) == "web" => Some(()),
            _ => None,
        })
        .await;

        // Watches dropped: the watcher resumes from its resourceVersion, no re-list.
        let watches_before = api.requests().iter().filter(|r| r.is_watch_of(Kind::Service)).count();
        let lists_before = api.requests().iter().filter(|r| r.is_list_of(Kind::Service)).count();
        api.drop_watches();
        api.apply(service("default", "after-drop", &json!({}))).expect("apply");
        next_matching(&mut stream, "after-drop applied", |e| match e {
            watcher::Event::Apply(s) if svc_name(s) == "after-drop" => Some(()),
            _ => None,
        })
        .await;
        let log = api.requests();
        assert!(log.iter().filter(|r| r.is_watch_of(Kind::Service)).count() > watches_before, "a new watch");
        assert_eq!(log.iter().filter(|r| r.is_list_of(Kind::Service)).count(), lists_before, "resumed without a list");

        // A write the watcher misses while the server is down, then the
        // history compacted: resuming gets 410, and the watcher re-lists.
        api.set_down(true);
        api.apply(service("default", "missed", &json!({}))).expect("apply");
        api.compact();
        api.clear_requests();
        api.set_down(false);
        next_matching(&mut stream, "the re-list with the missed Service", |e| match e {
            watcher::Event::InitApply(s) if svc_name(s) == "missed" => Some(()),
            _ => None,
        })
        .await;
        let log = api.requests();
        let expired_watch = log.iter().position(|r| r.is_watch_of(Kind::Service)).expect("a resumed watch");
        let resumed_at: u64 = log[expired_watch].param("resourceVersion").and_then(|v| v.parse().ok()).expect("resumed from a resourceVersion");
        let missed_rv = rv_of(&api.get("svc", None, "missed").expect("missed"));
        assert!(resumed_at < missed_rv, "the resume predates the compaction, so it got 410");
        let relist = log.iter().position(|r| r.is_list_of(Kind::Service)).expect("a re-list after 410");
        assert!(expired_watch < relist, "watch (410) then list: {log:?}");
        next_matching(&mut stream, "InitDone after the re-list", |e| matches!(e, watcher::Event::InitDone).then_some(())).await;
    });
}

#[test]
fn kube_rs_streaming_list_uses_send_initial_events() {
    let api = start();
    let dir = tempdir::Dir::new("kubers");
    api.apply(service("default", "a", &json!({}))).expect("apply");
    api.apply(service("other", "b", &json!({}))).expect("apply");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = kube_client(&api, &dir).await;
        let mut stream = watcher(Api::<Service>::all(client), watcher::Config::default().streaming_lists()).boxed();
        let mut names = Vec::new();
        next_matching(&mut stream, "InitDone", |e| match e {
            watcher::Event::InitApply(s) => {
                names.push(svc_name(s));
                None
            }
            watcher::Event::InitDone => Some(()),
            _ => None,
        })
        .await;
        names.sort();
        assert_eq!(names, ["a", "b"]);
        assert!(api.requests().iter().any(|r| r.param("sendInitialEvents").as_deref() == Some("true")));
        api.apply(service("default", "c", &json!({}))).expect("apply");
        next_matching(&mut stream, "c applied", |e| match e {
            watcher::Event::Apply(s) if svc_name(s) == "c" => Some(()),
            _ => None,
        })
        .await;
    });
}

// ------------------------------------------------------------ kubectl

/// `$KUBECTL`, else `kubectl` on PATH; fails loudly when missing.
fn kubectl_bin() -> PathBuf {
    let bin = std::env::var_os("KUBECTL").map_or_else(|| PathBuf::from("kubectl"), PathBuf::from);
    let ok = Command::new(&bin).args(["version", "--client"]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "kubectl not found ({}): run `cargo xtask setup` (installs Debian's kubernetes-client)", bin.display());
    bin
}

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=20s")
        .args(args)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kubectl_gets_creates_labels_and_deletes() {
    let api = start();
    let dir = tempdir::Dir::new("kubectl");
    let kc = dir.path.join("kubeconfig");
    api.write_kubeconfig(&kc).expect("kubeconfig");
    let mut pre = service("kube-system", "dns", &json!({}));
    pre["spec"]["clusterIP"] = json!("10.96.0.53");
    api.apply(pre).expect("apply");

    let out = kubectl(&kc, &["get", "svc", "-A"]);
    let header = out.lines().next().unwrap_or("");
    for col in ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"] {
        assert!(header.contains(col), "no {col} column in:\n{out}");
    }
    assert!(out.contains("kube-system") && out.contains("10.96.0.53") && out.contains("80/TCP"), "{out}");

    std::fs::write(
        dir.path.join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  clusterIP: 10.96.0.10\n  selector:\n    app: web\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n",
    )
    .expect("write yaml");
    std::fs::write(
        dir.path.join("web-eps.yaml"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nendpoints:\n- addresses: [\"10.244.0.11\"]\n  conditions:\n    ready: true\nports:\n- name: http\n  port: 8080\n  protocol: TCP\n",
    )
    .expect("write yaml");
    let out = kubectl(&kc, &["create", "-f", &dir.path.join("web.yaml").to_string_lossy()]);
    assert!(out.contains("service/web created"), "{out}");
    let out = kubectl(&kc, &["create", "-f", &dir.path.join("web-eps.yaml").to_string_lossy()]);
    assert!(out.contains("endpointslice.discovery.k8s.io/web-1 created"), "{out}");
    let svc = api.get("Service", Some("default"), "web").expect("created through kubectl");
    assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
    let eps = api.get("EndpointSlice", Some("default"), "web-1").expect("created through kubectl");
    assert_eq!(eps["endpoints"][0]["addresses"][0], "10.244.0.11");

    let out = kubectl(&kc, &["get", "endpointslices", "-n", "default"]);
    assert!(out.contains("web-1") && out.contains("IPv4") && out.contains("10.244.0.11"), "{out}");

    let out = kubectl(&kc, &["label", "svc", "web", "tier=front"]);
    assert!(out.contains("service/web labeled"), "{out}");
    assert_eq!(api.get("svc", None, "web").expect("web")["metadata"]["labels"]["tier"], "front");
    let out = kubectl(&kc, &["patch", "svc", "web", "-p", r#"{"spec":{"ports":[{"port":80,"targetPort":9090}]}}"#]);
    assert!(out.contains("service/web patched"), "{out}");
    let svc = api.get("svc", None, "web").expect("web");
    assert_eq!((svc["spec"]["ports"][0]["targetPort"].as_u64(), svc["spec"]["ports"][0]["name"].as_str()), (Some(9090), Some("http")));

    let out = kubectl(&kc, &["get", "svc", "-l", "tier=front", "-o", "name"]);
    assert_eq!(out.trim(), "service/web");
    let out = kubectl(&kc, &["get", "svc", "web", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).expect("kubectl -o json");
    assert_eq!(v["metadata"]["uid"], svc["metadata"]["uid"]);

    let out = kubectl(&kc, &["delete", "svc", "web"]);
    assert!(out.contains("service \"web\" deleted"), "{out}");
    assert!(api.get("svc", None, "web").is_none());
    let out = kubectl(&kc, &["delete", "-f", &dir.path.join("web-eps.yaml").to_string_lossy()]);
    assert!(out.contains("deleted"), "{out}");
    assert!(api.get("EndpointSlice", None, "web-1").is_none());

    api.apply(json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node-1" },
        "status": { "conditions": [{ "type": "Ready", "status": "True" }], "nodeInfo": { "kubeletVersion": "v1.34.0" } } }))
    .expect("node");
    let out = kubectl(&kc, &["get", "nodes"]);
    assert!(out.contains("node-1") && out.contains("Ready") && out.contains("v1.34.0"), "{out}");
    let missing = Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["get", "svc", "nope"])
        .output()
        .expect("run kubectl");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NotFound"), "{}", String::from_utf8_lossy(&missing.stderr));
}

// ------------------------------------------------------------ events.k8s.io

fn event(name: &str, regarding: &str) -> Value {
    json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": { "name": name, "namespace": "default" },
        "eventTime": "2025-01-01T00:00:00.000000Z",
        "type": "Warning", "reason": "FrontendConflict", "action": "Program",
        "note": format!("Service default/{regarding} lost"),
        "reportingController": "proxy-agent", "reportingInstance": "proxy-agent-node-a",
        "regarding": { "apiVersion": "v1", "kind": "Service", "namespace": "default", "name": regarding, "uid": "u-1" },
    })
}

/// `events.k8s.io/v1` Events as a recorder uses them: discovered, created
/// (201), validated like the real server (a missing `reportingController`
/// is 422), read back and selected by `regarding.*`, their `series` patched
/// (and nothing else: the rest is immutable), deleted with a Status.
#[test]
fn events_are_discovered_created_validated_patched_and_deleted() {
    let api = start();
    let groups = get(&api, "/apis").json();
    let names: Vec<&str> = groups["groups"].as_array().expect("groups").iter().filter_map(|g| g["name"].as_str()).collect();
    assert!(names.contains(&"events.k8s.io"), "{groups}");
    assert_eq!(get(&api, "/apis/events.k8s.io").json()["preferredVersion"]["groupVersion"], "events.k8s.io/v1");
    let list = get(&api, "/apis/events.k8s.io/v1").json();
    let ev = list["resources"].as_array().expect("resources").iter().find(|r| r["name"] == "events").expect("events");
    assert_eq!((ev["kind"].as_str(), ev["namespaced"].as_bool(), ev["shortNames"].clone()), (Some("Event"), Some(true), json!(["ev"])));
    for verb in ["create", "get", "list", "patch", "delete", "watch"] {
        assert!(ev["verbs"].as_array().expect("verbs").contains(&json!(verb)), "events lacks {verb}");
    }

    let events = "/apis/events.k8s.io/v1/namespaces/default/events";
    let created = send_json(&api, "POST", events, "application/json", &event("web.1", "web"));
    assert_eq!(created.status, 201, "{}", created.json());
    let created = created.json();
    assert!(created["metadata"]["uid"].is_string() && created["metadata"]["creationTimestamp"].is_string(), "{created}");
    assert_eq!(created["kind"], "Event");

    let mut bad = event("web.2", "web");
    bad.as_object_mut().expect("object").remove("reportingController");
    let r = send_json(&api, "POST", events, "application/json", &bad);
    assert_eq!(r.status, 422, "{}", r.json());
    assert_eq!(r.json()["details"]["causes"][0]["field"], "reportingController");
    assert_eq!(r.json()["details"]["group"], "events.k8s.io");
    for (field, value) in [("eventTime", json!(null)), ("type", json!("Info")), ("action", json!("")), ("reason", json!("x".repeat(129)))] {
        let mut bad = event("web.3", "web");
        bad[field] = value;
        let r = send_json(&api, "POST", events, "application/json", &bad);
        assert_eq!((r.status, r.json()["details"]["causes"][0]["field"].as_str().map(str::to_owned)), (422, Some(field.to_owned())), "{}", r.json());
    }
    let mut bad = event("web.4", "web");
    bad["series"] = json!({ "count": 1, "lastObservedTime": "2025-01-01T00:00:01.000000Z" });
    assert_eq!(send_json(&api, "POST", events, "application/json", &bad).status, 422, "a series counts at least 2");

    send_json(&api, "POST", events, "application/json", &event("other.1", "other"));
    let r = get(&api, "/apis/events.k8s.io/v1/events?fieldSelector=regarding.name%3Dweb,reason%3DFrontendConflict").json();
    let items: Vec<&str> = r["items"].as_array().expect("items").iter().filter_map(|i| i["metadata"]["name"].as_str()).collect();
    assert_eq!(items, ["web.1"], "{r}");
    assert_eq!(get(&api, "/apis/events.k8s.io/v1/events?fieldSelector=regarding.colour%3Dred").status, 400);

    // A repeated event: the recorder's merge patch of the series.
    let series = json!({ "series": { "count": 2, "lastObservedTime": "2025-01-01T00:01:00.000000Z" } });
    for ct in ["application/merge-patch+json", "application/strategic-merge-patch+json"] {
        let r = send_json(&api, "PATCH", &format!("{events}/web.1"), ct, &series);
        assert_eq!(r.status, 200, "{ct}: {}", r.json());
        assert_eq!(r.json()["series"]["count"], 2);
    }
    let r = send_json(&api, "PATCH", &format!("{events}/web.1"), "application/merge-patch+json", &json!({ "note": "changed" }));
    assert_eq!(r.status, 422, "the note is immutable: {}", r.json());
    assert_eq!(api.get("Event", Some("default"), "web.1").expect("web.1")["note"], "Service default/web lost");

    let r = request(api.addr(), "DELETE", &format!("{events}/web.1"), &[], None);
    assert_eq!((r.status, r.json()["kind"].as_str()), (200, Some("Status")));
    assert_eq!(get(&api, &format!("{events}/web.1")).status, 404);
    assert!(api.get("ev", None, "web.1").is_none());
}

/// kube-rs' event `Recorder` against the server: the first publish creates
/// the Event, the same one again patches its series.
#[test]
fn kube_rs_recorder_creates_an_event_then_patches_its_series() {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::{
        Resource as _,
        runtime::events::{Event, EventType, Recorder, Reporter},
    };
    let api = start();
    let dir = tempdir::Dir::new("kubers");
    let svc = api.apply(service("default", "web", &json!({}))).expect("apply");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = kube_client(&api, &dir).await;
        let svc: Service = serde_json::from_value(svc).expect("a Service");
        let recorder = Recorder::new(client.clone(), Reporter { controller: "proxy-agent".into(), instance: Some("proxy-agent-node-a".into()) });
        let ev = Event { type_: EventType::Warning, reason: "FrontendConflict".into(), note: Some("lost".into()), action: "Program".into(), secondary: None };
        recorder.publish(&ev, &svc.object_ref(&())).await.expect("first publish: a create");
        recorder.publish(&ev, &svc.object_ref(&())).await.expect("second publish: a series patch");
        let events: Vec<K8sEvent> = Api::<K8sEvent>::namespaced(client, "default").list(&kube::api::ListParams::default()).await.expect("list").items;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].series.as_ref().map(|s| s.count), Some(2));
        assert_eq!(events[0].regarding.as_ref().and_then(|r| r.uid.clone()), svc.metadata.uid);
    });
    let methods: Vec<String> = api.requests().into_iter().filter(|r| r.path.ends_with("/events") || r.path.contains("/events/")).map(|r| r.method).collect();
    assert_eq!(methods[..2], ["POST", "PATCH"], "{methods:?}");
}
