//! The manifests source: a directory of `*.yaml`, `*.yml` and `*.json` files
//! holding v1 Services and discovery.k8s.io/v1 `EndpointSlices`, exactly as
//! `kubectl get svc,endpointslices -o yaml` prints them (multi-document YAML
//! and `kind: List` included). Other kinds are ignored.
//!
//! The directory is polled (default every 250 ms, so a change is seen within
//! a second); only files whose content changed are parsed again. A file that
//! no longer parses keeps its last good objects (as a watch keeps the last
//! known state when the API server errs); an object that does not decode is
//! skipped with one log line naming the file, the object and the reason.
//! What is kept of a file is the records the store keeps
//! ([`ServiceRecord`], [`SliceRecord`]), built when it is read.
use std::{
    collections::{BTreeMap, hash_map::DefaultHasher},
    fs,
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::store::{Interner, ObjectKey, ServiceRecord, SliceRecord, SourceEvent};

/// One decoded object.
#[derive(Clone, Debug, PartialEq)]
#[expect(clippy::large_enum_variant, reason = "kept as decoded, like the API types")]
pub enum Object {
    Service(Service),
    Slice(EndpointSlice),
}

/// A problem with a file or an object in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProblem {
    pub file: PathBuf,
    /// `Kind namespace/name` when the problem is one object.
    pub object: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.object {
            Some(o) => write!(f, "{}: {o}: {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

/// The documents of a file as JSON values.
fn documents(path: &Path, text: &str) -> Result<Vec<Value>, String> {
    let is_json = path.extension().is_some_and(|e| e == "json");
    if is_json {
        return serde_json::from_str::<Value>(text).map(|v| vec![v]).map_err(|e| e.to_string());
    }
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc).map_err(|e| e.to_string())?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn describe(v: &Value) -> String {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("object");
    let meta = v.get("metadata");
    let ns = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or("default");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("<no name>");
    format!("{kind} {ns}/{name}")
}

fn decode(v: &Value, file: &Path, objects: &mut Vec<Object>, problems: &mut Vec<FileProblem>) {
    let api_version = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    let problem = |reason: String| FileProblem {
        file: file.to_owned(),
        object: Some(describe(v)),
        reason,
    };
    match (api_version, kind) {
        (_, k) if k == "List" || k.ends_with("List") => {
            match v.get("items").and_then(Value::as_array) {
                Some(items) => {
                    for item in items {
                        decode(item, file, objects, problems);
                    }
                }
                None => problems.push(problem("a List without items".to_owned())),
            }
        }
        ("v1", "Service") => match serde_json::from_value::<Service>(v.clone()) {
            Ok(s) if s.metadata.name.as_deref().is_some_and(|n| !n.is_empty()) => objects.push(Object::Service(s)),
            Ok(_) => problems.push(problem("metadata.name is missing".to_owned())),
            Err(e) => problems.push(problem(e.to_string())),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => match serde_json::from_value::<EndpointSlice>(v.clone()) {
            Ok(s) if s.metadata.name.as_deref().is_some_and(|n| !n.is_empty()) => objects.push(Object::Slice(s)),
            Ok(_) => problems.push(problem("metadata.name is missing".to_owned())),
            Err(e) => problems.push(problem(e.to_string())),
        },
        (_, "Service" | "EndpointSlice") => {
            problems.push(problem(format!("unsupported apiVersion {api_version:?} for {kind}")));
        }
        _ => debug!(file = %file.display(), object = %describe(v), "ignoring object of another kind"),
    }
}

/// Parses one file. `Err` = the file as a whole does not parse.
pub fn parse_file(path: &Path, text: &str) -> Result<(Vec<Object>, Vec<FileProblem>), FileProblem> {
    let docs = documents(path, text).map_err(|reason| FileProblem {
        file: path.to_owned(),
        object: None,
        reason: format!("does not parse: {reason}"),
    })?;
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for v in docs {
        decode(&v, path, &mut objects, &mut problems);
    }
    Ok((objects, problems))
}

fn is_manifest(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        && !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
}

/// An object of a file, as the store keeps it.
#[derive(Clone, Debug)]
enum Record {
    Service(Box<ServiceRecord>),
    Slice(Box<SliceRecord>),
}

struct CachedFile {
    /// Size, modification time and inode when last read: a file whose stamp
    /// is unchanged is not read again.
    stamp: Option<(u64, i64, i64, u64)>,
    hash: u64,
    objects: Vec<Record>,
}

/// What tells a file changed without reading it: size, mtime (s, ns) and
/// inode (an atomic rename gives a new one).
fn stamp(path: &Path) -> Option<(u64, i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::metadata(path).ok()?;
    Some((m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
}

/// Follows one directory and turns its content into [`SourceEvent`]s.
pub struct ManifestsDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    services: BTreeMap<ObjectKey, Box<ServiceRecord>>,
    slices: BTreeMap<ObjectKey, Box<SliceRecord>>,
    strings: Interner,
    synced: bool,
}

impl ManifestsDir {
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            strings: Interner::default(),
            synced: false,
        }
    }

    /// Reads the directory once and returns the events that bring a
    /// consumer from the previous scan to this one (the first scan ends with
    /// the two "synced" events). Files whose size, mtime and inode are
    /// unchanged are not read again, and when no file changed nothing is
    /// compared: an idle directory of 10,000 Services costs a `stat` per file.
    pub fn scan(&mut self) -> Vec<SourceEvent> {
        let paths = match fs::read_dir(&self.dir) {
            Ok(rd) => {
                let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| is_manifest(p) && p.is_file()).collect();
                v.sort();
                v
            }
            Err(e) => {
                // Why: a directory that vanished or is unreadable for a moment
                // must not wipe the services: keep the last known state.
                warn!(dir = %self.dir.display(), error = %e, "cannot read the manifests directory; keeping the last known objects");
                return self.finish_first_scan(Vec::new());
            }
        };
        let before = self.files.len();
        self.files.retain(|p, _| paths.contains(p));
        let mut changed = self.files.len() != before;
        for path in &paths {
            let st = stamp(path);
            if st.is_some() && self.files.get(path).is_some_and(|c| c.stamp == st) {
                continue;
            }
            let text = match fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "cannot read manifest; keeping its last good objects");
                    continue;
                }
            };
            let mut h = DefaultHasher::new();
            text.hash(&mut h);
            let hash = h.finish();
            if let Some(c) = self.files.get_mut(path)
                && c.hash == hash
            {
                c.stamp = st;
                continue;
            }
            changed = true;
            match parse_file(path, &text) {
                Ok((objects, problems)) => {
                    for p in problems {
                        warn!("skipping {p}");
                    }
                    let origin = self.strings.get(&path.display().to_string());
                    let objects = objects
                        .iter()
                        .map(|o| match o {
                            Object::Service(s) => Record::Service(Box::new(ServiceRecord::new(s, origin.clone(), &mut self.strings))),
                            Object::Slice(s) => Record::Slice(Box::new(SliceRecord::new(s, origin.clone(), &mut self.strings))),
                        })
                        .collect();
                    self.files.insert(path.clone(), CachedFile { stamp: st, hash, objects });
                }
                Err(p) => {
                    warn!("{p}; keeping its last good objects");
                    // Remember the hash so the same broken content is reported once.
                    let objects = self.files.get(path).map(|c| c.objects.clone()).unwrap_or_default();
                    self.files.insert(path.clone(), CachedFile { stamp: st, hash, objects });
                }
            }
        }
        let events = if changed { self.diff() } else { Vec::new() };
        self.finish_first_scan(events)
    }

    fn finish_first_scan(&mut self, mut events: Vec<SourceEvent>) -> Vec<SourceEvent> {
        if !self.synced {
            self.synced = true;
            events.push(SourceEvent::ServicesSynced);
            events.push(SourceEvent::SlicesSynced);
        }
        events
    }

    fn diff(&mut self) -> Vec<SourceEvent> {
        let mut services: BTreeMap<ObjectKey, Box<ServiceRecord>> = BTreeMap::new();
        let mut slices: BTreeMap<ObjectKey, Box<SliceRecord>> = BTreeMap::new();
        for file in self.files.values() {
            for o in &file.objects {
                match o {
                    Record::Service(s) => {
                        let key = s.key().clone();
                        if let Some(prev) = services.insert(key.clone(), s.clone()) {
                            warn!(service = %key, first = %prev.meta.origin, second = %s.meta.origin, "Service defined twice; the later file wins");
                        }
                    }
                    Record::Slice(s) => {
                        let key = s.key().clone();
                        if let Some(prev) = slices.insert(key.clone(), s.clone()) {
                            warn!(endpointslice = %key, first = %prev.meta.origin, second = %s.meta.origin, "EndpointSlice defined twice; the later file wins");
                        }
                    }
                }
            }
        }
        let mut events = Vec::new();
        for (k, v) in &services {
            if self.services.get(k) != Some(v) {
                events.push(SourceEvent::ServiceApplied(v.clone()));
            }
        }
        for k in self.services.keys() {
            if !services.contains_key(k) {
                events.push(SourceEvent::ServiceDeleted(k.clone()));
            }
        }
        for (k, v) in &slices {
            if self.slices.get(k) != Some(v) {
                events.push(SourceEvent::SliceApplied(v.clone()));
            }
        }
        for k in self.slices.keys() {
            if !slices.contains_key(k) {
                events.push(SourceEvent::SliceDeleted(k.clone()));
            }
        }
        self.services = services;
        self.slices = slices;
        events
    }
}

/// Polls `dir` every `interval` and sends the events, until the receiver is gone.
pub async fn run(dir: PathBuf, interval: Duration, tx: mpsc::Sender<Vec<SourceEvent>>) {
    let mut source = ManifestsDir::new(dir);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let events = tokio::task::block_in_place(|| source.scan());
        if !events.is_empty() && tx.send(events).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::{Path, PathBuf},
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::{FileProblem, ManifestsDir, Object, parse_file};
    use crate::store::{ObjectKey, SourceEvent, Store};

    const SERVICE: &str = r"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: 8080
    protocol: TCP
";

    const SLICE: &str = r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: [10.244.0.11]
  conditions: {ready: true}
";

    /// `Service ns/name` / `EndpointSlice ns/name` for each object.
    fn names(objects: &[Object]) -> Vec<String> {
        objects
            .iter()
            .map(|o| match o {
                Object::Service(s) => format!("Service {}", ObjectKey::of(&s.metadata)),
                Object::Slice(s) => format!("EndpointSlice {}", ObjectKey::of(&s.metadata)),
            })
            .collect()
    }

    #[track_caller]
    fn parse_ok(file: &str, text: &str) -> (Vec<Object>, Vec<FileProblem>) {
        parse_file(Path::new(file), text).unwrap_or_else(|p| panic!("{file} should parse, got: {p}"))
    }

    #[track_caller]
    fn parse_clean(file: &str, text: &str) -> Vec<Object> {
        let (objects, problems) = parse_ok(file, text);
        assert!(problems.is_empty(), "{file}: unexpected problems: {problems:?}");
        objects
    }

    // ------------------------------------------------------------ parse_file

    #[test]
    fn multi_document_yaml_with_a_service_and_a_slice() {
        let text = format!("---\n{SERVICE}---\n{SLICE}---\n");
        let objects = parse_clean("a.yaml", &text);
        assert_eq!(names(&objects), ["Service shop/web", "EndpointSlice shop/web-abcde"]);
        let Object::Service(svc) = &objects[0] else { unreachable!() };
        let spec = svc.spec.as_ref().expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        let ports = spec.ports.as_ref().expect("ports");
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, 80);
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        let Object::Slice(slice) = &objects[1] else { unreachable!() };
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.endpoints.as_ref().expect("endpoints")[0].addresses, ["10.244.0.11"]);
        assert_eq!(slice.ports.as_ref().expect("ports")[0].port, Some(8080));
    }

    #[test]
    fn yml_extension_and_empty_documents() {
        let objects = parse_clean("a.yml", &format!("---\n---\n# only a comment\n---\n{SERVICE}\n---\n"));
        assert_eq!(names(&objects), ["Service shop/web"]);
        assert!(parse_clean("empty.yaml", "").is_empty());
        assert!(parse_clean("comment.yaml", "# nothing here\n").is_empty());
    }

    #[test]
    fn json_file() {
        let text = r#"{
  "apiVersion": "v1",
  "kind": "Service",
  "metadata": {"name": "api", "namespace": "default"},
  "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 443, "protocol": "TCP", "targetPort": "https"}]}
}"#;
        let objects = parse_clean("svc.json", text);
        assert_eq!(names(&objects), ["Service default/api"]);
        let Object::Service(svc) = &objects[0] else { unreachable!() };
        assert_eq!(svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()), Some("10.96.0.20"));
    }

    #[test]
    fn json_list_file() {
        let text = r#"{"apiVersion": "v1", "kind": "List", "items": [
  {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"clusterIP": "10.96.0.1"}},
  {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "a-1", "labels": {"kubernetes.io/service-name": "a"}}, "addressType": "IPv4", "endpoints": []}
]}"#;
        let objects = parse_clean("all.json", text);
        assert_eq!(names(&objects), ["Service default/a", "EndpointSlice default/a-1"]);
    }

    #[test]
    fn kind_list_as_kubectl_prints_it() {
        // `kubectl get svc,endpointslices -A -o yaml`, trimmed.
        let text = r#"apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2024-05-01T10:00:00Z"
    labels:
      component: apiserver
      provider: kubernetes
    name: kubernetes
    namespace: default
    resourceVersion: "234"
    uid: 0a4c3f4e-6c1a-4b7e-9a43-1f6d8e2b7c11
  spec:
    clusterIP: 10.96.0.1
    clusterIPs:
    - 10.96.0.1
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: https
      port: 443
      protocol: TCP
      targetPort: 6443
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 172.18.0.2
    conditions:
      ready: true
      serving: true
      terminating: false
  kind: EndpointSlice
  metadata:
    creationTimestamp: "2024-05-01T10:00:00Z"
    generation: 1
    labels:
      endpointslice.kubernetes.io/skip-mirror: "true"
      kubernetes.io/service-name: kubernetes
    name: kubernetes
    namespace: default
    resourceVersion: "236"
    uid: 5c0b7a0e-3f1d-4d8e-8d2b-8f3a7e9c6d22
  ports:
  - name: https
    port: 6443
    protocol: TCP
kind: List
metadata:
  resourceVersion: ""
"#;
        let objects = parse_clean("all.yaml", text);
        assert_eq!(names(&objects), ["Service default/kubernetes", "EndpointSlice default/kubernetes"]);
    }

    #[test]
    fn typed_lists_and_nested_lists() {
        let text = r"
apiVersion: v1
kind: ServiceList
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a}
  spec: {clusterIP: 10.96.0.1}
- apiVersion: v1
  kind: List
  items:
  - apiVersion: v1
    kind: Service
    metadata: {name: b}
    spec: {clusterIP: 10.96.0.2}
";
        let objects = parse_clean("list.yaml", text);
        assert_eq!(names(&objects), ["Service default/a", "Service default/b"]);
    }

    #[test]
    fn list_without_items_is_a_problem() {
        let (objects, problems) = parse_ok("list.yaml", "apiVersion: v1\nkind: List\nmetadata: {name: l}\n");
        assert!(objects.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].reason, "a List without items");
        assert_eq!(problems[0].object.as_deref(), Some("List default/l"));
    }

    #[test]
    fn other_kinds_are_ignored_without_problems() {
        let text = format!(
            r"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: shop}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers: [{{name: web, image: nginx}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: cfg}}
data: {{port: '80'}}
---
apiVersion: v1
kind: Endpoints
metadata: {{name: web, namespace: shop}}
---
{SERVICE}"
        );
        let objects = parse_clean("mixed.yaml", &text);
        assert_eq!(names(&objects), ["Service shop/web"]);
    }

    #[test]
    fn wrong_field_type_is_a_problem_for_that_object_only() {
        let text = format!(
            r#"
{SERVICE}
---
apiVersion: v1
kind: Service
metadata:
  name: broken
  namespace: shop
spec:
  clusterIP: 10.96.0.11
  ports:
  - port: "abc"
---
{SLICE}"#
        );
        let (objects, problems) = parse_ok("dir/mixed.yaml", &text);
        assert_eq!(names(&objects), ["Service shop/web", "EndpointSlice shop/web-abcde"]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        let p = &problems[0];
        assert_eq!(p.file, Path::new("dir/mixed.yaml"));
        assert_eq!(p.object.as_deref(), Some("Service shop/broken"));
        assert!(!p.reason.is_empty());
        let shown = p.to_string();
        assert!(
            shown.starts_with("dir/mixed.yaml: Service shop/broken: "),
            "the problem should name the file and the object: {shown}"
        );
    }

    #[test]
    fn wrong_field_type_in_a_slice() {
        let text = r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s}
addressType: IPv4
endpoints: {not: a list}
";
        let (objects, problems) = parse_ok("s.yaml", text);
        assert!(objects.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].object.as_deref(), Some("EndpointSlice default/s"));
    }

    #[test]
    fn missing_name_and_unsupported_api_version_are_problems() {
        let text = r"
apiVersion: v1
kind: Service
metadata: {namespace: shop}
spec: {clusterIP: 10.96.0.1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ''}
addressType: IPv4
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: old}
addressType: IPv4
";
        let (objects, problems) = parse_ok("p.yaml", text);
        assert!(objects.is_empty());
        let got: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "p.yaml: Service shop/<no name>: metadata.name is missing",
                "p.yaml: EndpointSlice default/: metadata.name is missing",
                r#"p.yaml: EndpointSlice default/old: unsupported apiVersion "discovery.k8s.io/v1beta1" for EndpointSlice"#,
            ]
        );
    }

    #[test]
    fn broken_yaml_syntax_is_an_error_for_the_whole_file() {
        let text = format!("{SERVICE}---\nkind: Service\nmetadata: {{name: [unclosed\n");
        let err = parse_file(Path::new("bad.yaml"), &text).expect_err("broken YAML must not parse");
        assert_eq!(err.file, Path::new("bad.yaml"));
        assert_eq!(err.object, None);
        assert!(err.reason.starts_with("does not parse: "), "{err}");
        assert!(err.to_string().starts_with("bad.yaml: does not parse: "), "{err}");

        let err = parse_file(Path::new("bad.yaml"), "a: b\n  c: d\n").expect_err("bad indentation");
        assert!(err.reason.starts_with("does not parse: "), "{err}");
    }

    #[test]
    fn broken_json_is_an_error() {
        let err = parse_file(Path::new("bad.json"), r#"{"apiVersion": "v1", "kind": "#).expect_err("broken JSON");
        assert_eq!(err.object, None);
        assert!(err.to_string().starts_with("bad.json: does not parse: "), "{err}");
    }

    // --------------------------------------------------------- ManifestsDir

    /// A fresh directory under the system temp dir, removed on drop (so also
    /// when the test panics).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("proxy-agent-manifests-{}-{n}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            Self(dir)
        }

        fn write(&self, name: &str, text: &str) {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        }

        fn remove(&self, name: &str) {
            let p = self.0.join(name);
            std::fs::remove_file(&p).unwrap_or_else(|e| panic!("remove {}: {e}", p.display()));
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// One line per event, origins relative to `dir`.
    fn render(dir: &Path, events: &[SourceEvent]) -> Vec<String> {
        let rel = |origin: &str| {
            Path::new(origin)
                .strip_prefix(dir)
                .map_or_else(|_| origin.to_owned(), |p| p.display().to_string())
        };
        events
            .iter()
            .map(|e| match e {
                SourceEvent::ServiceApplied(s) => {
                    format!("ServiceApplied {} from {}", s.key(), rel(&s.meta.origin))
                }
                SourceEvent::ServiceDeleted(k) => format!("ServiceDeleted {k}"),
                SourceEvent::SliceApplied(s) => {
                    format!("SliceApplied {} from {}", s.key(), rel(&s.meta.origin))
                }
                SourceEvent::SliceDeleted(k) => format!("SliceDeleted {k}"),
                SourceEvent::ServicesSynced => "ServicesSynced".to_owned(),
                SourceEvent::SlicesSynced => "SlicesSynced".to_owned(),
                SourceEvent::NodeApplied(_) | SourceEvent::NodeDeleted => "Node".to_owned(),
            })
            .collect()
    }

    /// Scans, feeds the events to `store` and returns them rendered.
    fn scan(src: &mut ManifestsDir, dir: &TempDir, store: &mut Store) -> Vec<String> {
        let events = src.scan();
        let shown = render(&dir.0, &events);
        for e in events {
            store.apply(e);
        }
        shown
    }

    fn keys<T>(m: &std::collections::BTreeMap<ObjectKey, T>) -> Vec<String> {
        m.keys().map(ToString::to_string).collect()
    }

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"
        )
    }

    fn slice(name: &str, service: &str, addr: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: ['{addr}']}}]\n"
        )
    }

    #[test]
    fn dir_follows_additions_edits_and_deletions() {
        let dir = TempDir::new("lifecycle");
        dir.write(
            "web.yaml",
            &format!("{}---\n{}", service("web", "10.96.0.10"), slice("web-1", "web", "10.244.0.11")),
        );
        dir.write("api.json", r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.20"}}"#);
        let mut src = ManifestsDir::new(&dir.0);
        let mut store = Store::default();

        // First scan: everything, then both "synced" events.
        assert_eq!(
            scan(&mut src, &dir, &mut store),
            [
                "ServiceApplied shop/api from api.json",
                "ServiceApplied shop/web from web.yaml",
                "SliceApplied shop/web-1 from web.yaml",
                "ServicesSynced",
                "SlicesSynced",
            ]
        );
        assert!(store.synced());
        assert_eq!(keys(&store.services), ["shop/api", "shop/web"]);
        assert_eq!(keys(&store.slices), ["shop/web-1"]);
        let origin = &store.services[&ObjectKey::new("shop", "web")].meta.origin;
        assert_eq!(Path::new(&**origin), dir.0.join("web.yaml"), "origin is the file's path");

        // Nothing changed: nothing to say (and no second "synced").
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());

        // Only the slice changes: only the slice is sent, with its new content.
        dir.write(
            "web.yaml",
            &format!("{}---\n{}", service("web", "10.96.0.10"), slice("web-1", "web", "10.244.0.99")),
        );
        assert_eq!(scan(&mut src, &dir, &mut store), ["SliceApplied shop/web-1 from web.yaml"]);
        let eps = &store.slices[&ObjectKey::new("shop", "web-1")].endpoints;
        assert_eq!(eps[0].address().map(|a| a.text().into_owned()).as_deref(), Some("10.244.0.99"));

        // Same objects, different text (a comment, reordered documents): no events.
        dir.write(
            "web.yaml",
            &format!("# edited\n{}---\n{}", slice("web-1", "web", "10.244.0.99"), service("web", "10.96.0.10")),
        );
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());

        // An object removed from a file that stays.
        dir.write("web.yaml", &service("web", "10.96.0.10"));
        assert_eq!(scan(&mut src, &dir, &mut store), ["SliceDeleted shop/web-1"]);

        // A new file.
        dir.write("db.yml", &format!("{}---\n{}", service("db", "10.96.0.30"), slice("db-1", "db", "10.244.0.30")));
        assert_eq!(
            scan(&mut src, &dir, &mut store),
            ["ServiceApplied shop/db from db.yml", "SliceApplied shop/db-1 from db.yml"]
        );

        // Deleting files deletes their objects.
        dir.remove("db.yml");
        assert_eq!(scan(&mut src, &dir, &mut store), ["ServiceDeleted shop/db", "SliceDeleted shop/db-1"]);
        dir.remove("web.yaml");
        dir.remove("api.json");
        assert_eq!(
            scan(&mut src, &dir, &mut store),
            ["ServiceDeleted shop/api", "ServiceDeleted shop/web"]
        );
        assert!(store.services.is_empty() && store.slices.is_empty());
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());
    }

    #[test]
    fn dir_empty_first_scan_still_reports_synced() {
        let dir = TempDir::new("empty");
        let mut src = ManifestsDir::new(&dir.0);
        let mut store = Store::default();
        assert_eq!(scan(&mut src, &dir, &mut store), ["ServicesSynced", "SlicesSynced"]);
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());
    }

    #[test]
    fn dir_unparsable_file_keeps_its_last_good_objects() {
        let dir = TempDir::new("broken");
        dir.write("web.yaml", &format!("{}---\n{}", service("web", "10.96.0.10"), slice("web-1", "web", "10.244.0.11")));
        let mut src = ManifestsDir::new(&dir.0);
        let mut store = Store::default();
        assert_eq!(scan(&mut src, &dir, &mut store).len(), 4);

        // Broken mid-edit: no deletions, and the same broken content again
        // is quiet too.
        dir.write("web.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n");
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());
        assert_eq!(keys(&store.services), ["shop/web"]);
        assert_eq!(keys(&store.slices), ["shop/web-1"]);

        // Fixed with the same objects: still nothing to say.
        dir.write("web.yaml", &format!("{}---\n{}", service("web", "10.96.0.10"), slice("web-1", "web", "10.244.0.11")));
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());

        // Broken again, then fixed with a change: only the change.
        dir.write("web.yaml", "{{{{");
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());
        dir.write("web.yaml", &format!("{}---\n{}", service("web", "10.96.0.11"), slice("web-1", "web", "10.244.0.11")));
        assert_eq!(scan(&mut src, &dir, &mut store), ["ServiceApplied shop/web from web.yaml"]);

        // Deleting the file (even after it was broken) deletes its objects.
        dir.write("web.yaml", "{{{{");
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());
        dir.remove("web.yaml");
        assert_eq!(scan(&mut src, &dir, &mut store), ["ServiceDeleted shop/web", "SliceDeleted shop/web-1"]);
    }

    #[test]
    fn dir_file_broken_from_the_start_contributes_nothing() {
        let dir = TempDir::new("broken-first");
        dir.write("bad.yaml", "kind: [unclosed\n");
        dir.write("good.yaml", &service("good", "10.96.0.10"));
        let mut src = ManifestsDir::new(&dir.0);
        let mut store = Store::default();
        assert_eq!(
            scan(&mut src, &dir, &mut store),
            ["ServiceApplied shop/good from good.yaml", "ServicesSynced", "SlicesSynced"]
        );
        dir.write("bad.yaml", &service("late", "10.96.0.11"));
        assert_eq!(scan(&mut src, &dir, &mut store), ["ServiceApplied shop/late from bad.yaml"]);
    }

    #[test]
    fn dir_object_that_does_not_decode_is_skipped_the_rest_kept() {
        let dir = TempDir::new("bad-object");
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec:\n  ports: [{port: abc}]\n";
        dir.write("web.yaml", &format!("{}---\n{bad}---\n{}", service("web", "10.96.0.10"), slice("web-1", "web", "10.244.0.11")));
        let mut src = ManifestsDir::new(&dir.0);
        let mut store = Store::default();
        assert_eq!(
            scan(&mut src, &dir, &mut store),
            [
                "ServiceApplied shop/web from web.yaml",
                "SliceApplied shop/web-1 from web.yaml",
                "ServicesSynced",
                "SlicesSynced",
            ]
        );
    }

    #[test]
    fn dir_ignores_other_extensions_hidden_files_and_directories() {
        let dir = TempDir::new("ignored");
        dir.write("notes.txt", &service("txt", "10.96.0.1"));
        dir.write("web.yaml.bak", &service("bak", "10.96.0.2"));
        dir.write(".x.yaml", &service("hidden", "10.96.0.3"));
        dir.write(".web.yaml.swp", &service("swap", "10.96.0.4"));
        dir.write("README", &service("readme", "10.96.0.5"));
        std::fs::create_dir(dir.0.join("sub.yaml")).expect("mkdir");
        std::fs::write(dir.0.join("sub.yaml").join("inner.yaml"), service("inner", "10.96.0.6")).expect("write");
        dir.write("real.yaml", &service("real", "10.96.0.7"));
        let mut src = ManifestsDir::new(&dir.0);
        let mut store = Store::default();
        assert_eq!(
            scan(&mut src, &dir, &mut store),
            ["ServiceApplied shop/real from real.yaml", "ServicesSynced", "SlicesSynced"]
        );
        // Changing an ignored file is still nothing.
        dir.write("notes.txt", &service("txt2", "10.96.0.8"));
        dir.write(".x.yaml", &service("hidden2", "10.96.0.9"));
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());
    }

    #[test]
    fn dir_object_moved_to_another_file_is_reapplied_not_deleted() {
        let dir = TempDir::new("move");
        dir.write("a.yaml", &service("web", "10.96.0.10"));
        let mut src = ManifestsDir::new(&dir.0);
        let mut store = Store::default();
        assert_eq!(scan(&mut src, &dir, &mut store).len(), 3);
        dir.remove("a.yaml");
        dir.write("b.yaml", &service("web", "10.96.0.10"));
        assert_eq!(scan(&mut src, &dir, &mut store), ["ServiceApplied shop/web from b.yaml"]);
        assert_eq!(keys(&store.services), ["shop/web"]);
    }

    #[test]
    fn dir_same_object_in_two_files_the_later_file_wins() {
        let dir = TempDir::new("twice");
        dir.write("a.yaml", &service("web", "10.96.0.10"));
        dir.write("b.yaml", &service("web", "10.96.0.11"));
        let mut src = ManifestsDir::new(&dir.0);
        let mut store = Store::default();
        assert_eq!(
            scan(&mut src, &dir, &mut store),
            ["ServiceApplied shop/web from b.yaml", "ServicesSynced", "SlicesSynced"]
        );
        let ip = |store: &Store| {
            store.services[&ObjectKey::new("shop", "web")].cluster_ips.as_ref().ok().and_then(|ips| ips.first().map(ToString::to_string))
        };
        assert_eq!(ip(&store).as_deref(), Some("10.96.0.11"));
        // The winner goes away: the other definition takes over, no delete.
        dir.remove("b.yaml");
        assert_eq!(scan(&mut src, &dir, &mut store), ["ServiceApplied shop/web from a.yaml"]);
        assert_eq!(ip(&store).as_deref(), Some("10.96.0.10"));
    }

    #[test]
    fn dir_that_vanishes_keeps_the_last_known_objects() {
        let dir = TempDir::new("vanish");
        dir.write("a.yaml", &service("web", "10.96.0.10"));
        let mut src = ManifestsDir::new(&dir.0);
        let mut store = Store::default();
        assert_eq!(scan(&mut src, &dir, &mut store).len(), 3);
        std::fs::remove_dir_all(&dir.0).expect("remove dir");
        assert_eq!(scan(&mut src, &dir, &mut store), Vec::<String>::new());
        assert_eq!(keys(&store.services), ["shop/web"]);
    }

    #[test]
    fn dir_missing_at_start_still_reports_synced() {
        let dir = TempDir::new("missing");
        let missing = dir.0.join("does-not-exist");
        let mut src = ManifestsDir::new(&missing);
        let events = src.scan();
        assert_eq!(render(&dir.0, &events), ["ServicesSynced", "SlicesSynced"]);
        assert!(src.scan().is_empty());
    }

    async fn next_batch(rx: &mut tokio::sync::mpsc::Receiver<Vec<SourceEvent>>) -> Vec<SourceEvent> {
        tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("no batch within 10 s")
            .expect("channel closed")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_sends_batches_until_the_receiver_is_gone() {
        let dir = TempDir::new("run");
        dir.write("a.yaml", &service("web", "10.96.0.10"));
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let task = tokio::spawn(super::run(dir.0.clone(), std::time::Duration::from_millis(10), tx));
        let first = next_batch(&mut rx).await;
        assert_eq!(
            render(&dir.0, &first),
            ["ServiceApplied shop/web from a.yaml", "ServicesSynced", "SlicesSynced"]
        );
        dir.write("b.yaml", &service("api", "10.96.0.20"));
        let second = next_batch(&mut rx).await;
        assert_eq!(render(&dir.0, &second), ["ServiceApplied shop/api from b.yaml"]);
        drop(rx);
        // The next non-empty batch finds the receiver gone and ends the task.
        dir.remove("b.yaml");
        tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("run did not stop after the receiver was dropped")
            .expect("run panicked");
    }
}
