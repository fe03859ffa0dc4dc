//! The manifests source: a directory of `*.yaml`, `*.yml` and `*.json` files
//! holding v1 Services and discovery.k8s.io/v1 EndpointSlices, exactly as
//! `kubectl get svc,endpointslices -o yaml` prints them (multi-document YAML
//! and `kind: List` included). Other kinds are ignored.
//!
//! The directory is polled (default every 250 ms, so a change is seen within
//! a second); only files whose content changed are parsed again. A file that
//! no longer parses keeps its last good objects (as a watch keeps the last
//! known state when the API server errs); an object that does not decode is
//! skipped with one log line naming the file, the object and the reason.
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

use crate::store::{ObjectKey, SourceEvent, Stored};

/// One decoded object.
#[derive(Clone, Debug, PartialEq)]
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

fn decode(v: Value, file: &Path, objects: &mut Vec<Object>, problems: &mut Vec<FileProblem>) {
    let api_version = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    let problem = |reason: String| FileProblem {
        file: file.to_owned(),
        object: Some(describe(&v)),
        reason,
    };
    match (api_version, kind) {
        (_, k) if k == "List" || k.ends_with("List") => {
            match v.get("items").and_then(Value::as_array) {
                Some(items) => {
                    for item in items.clone() {
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
        _ => debug!(file = %file.display(), object = %describe(&v), "ignoring object of another kind"),
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
        decode(v, path, &mut objects, &mut problems);
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

struct CachedFile {
    hash: u64,
    objects: Vec<Object>,
}

/// Follows one directory and turns its content into [`SourceEvent`]s.
pub struct ManifestsDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    services: BTreeMap<ObjectKey, Stored<Service>>,
    slices: BTreeMap<ObjectKey, Stored<EndpointSlice>>,
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
            synced: false,
        }
    }

    /// Reads the directory once and returns the events that bring a
    /// consumer from the previous scan to this one (the first scan ends with
    /// the two "synced" events).
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
        self.files.retain(|p, _| paths.contains(p));
        for path in &paths {
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
            if self.files.get(path).is_some_and(|c| c.hash == hash) {
                continue;
            }
            match parse_file(path, &text) {
                Ok((objects, problems)) => {
                    for p in problems {
                        warn!("skipping {p}");
                    }
                    self.files.insert(path.clone(), CachedFile { hash, objects });
                }
                Err(p) => {
                    warn!("{p}; keeping its last good objects");
                    // Remember the hash so the same broken content is reported once.
                    let objects = self.files.get(path).map(|c| c.objects.clone()).unwrap_or_default();
                    self.files.insert(path.clone(), CachedFile { hash, objects });
                }
            }
        }
        let events = self.diff();
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
        let mut services = BTreeMap::new();
        let mut slices = BTreeMap::new();
        for (path, file) in &self.files {
            let origin = path.display().to_string();
            for o in &file.objects {
                match o {
                    Object::Service(s) => {
                        let key = ObjectKey::of(&s.metadata);
                        if let Some(prev) = services.insert(key.clone(), Stored { object: s.clone(), origin: origin.clone() }) {
                            warn!(service = %key, first = %prev.origin, second = %origin, "Service defined twice; the later file wins");
                        }
                    }
                    Object::Slice(s) => {
                        let key = ObjectKey::of(&s.metadata);
                        if let Some(prev) = slices.insert(key.clone(), Stored { object: s.clone(), origin: origin.clone() }) {
                            warn!(endpointslice = %key, first = %prev.origin, second = %origin, "EndpointSlice defined twice; the later file wins");
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
