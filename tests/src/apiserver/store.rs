//! The storage layer: objects keyed like etcd keys, one global revision
//! counter, a bounded history of events (the watch cache), and the registry
//! semantics of the real server for create, update, delete and list.
use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

use super::{
    resources::{self, Kind},
    selector::{FieldSelector, LabelSelector},
    status::{ApiError, FieldError},
};

/// Creating many objects in one call (benchmarks).
mod bulk;

/// `(kind, namespace, name)`; namespace is empty for cluster-scoped kinds.
/// Ordered like the etcd keys `/registry/<resource>/<namespace>/<name>`.
pub(crate) type Key = (Kind, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write, as the watch cache keeps it: the object after the write (for
/// a delete: the last state, with the delete's resourceVersion) and before.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub rv: u64,
    pub key: Key,
    pub ty: EventType,
    pub object: Value,
    pub prev: Option<Value>,
}

/// Who writes: a client over HTTP (main resource or `/status`), or the test
/// through the Rust API (whole object, status included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Writer {
    Main,
    Status,
    Test,
}

/// Delete preconditions (`DeleteOptions.preconditions`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// A list request after parsing.
#[derive(Debug, Default)]
pub(crate) struct ListQuery {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    /// `resourceVersion` as given (`None` when unset or empty).
    pub resource_version: Option<u64>,
    /// `resourceVersionMatch`: `Exact` or `NotOlderThan`.
    pub resource_version_match: Option<String>,
}

#[derive(Debug)]
pub(crate) struct ListResult {
    pub items: Vec<Value>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<u64>,
}

#[derive(Debug, Clone)]
pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Event>,
    capacity: usize,
    /// Every event with `rv > floor` is in `history`: a watch or a snapshot
    /// from `rv >= floor` can be served, an older one is Expired.
    floor: u64,
    rng: u64,
    /// The injected clock: how far the server's time is ahead of the wall
    /// clock ([`Store::advance_clock`]).
    clock_offset: std::time::Duration,
    /// Time on the injected clock since the last compactor run, and the
    /// resourceVersion that run saw (the next run compacts to it).
    since_compaction: std::time::Duration,
    compaction_rv: u64,
}

/// kube-apiserver's `--etcd-compaction-interval` default.
pub(crate) const COMPACTION_INTERVAL: std::time::Duration = std::time::Duration::from_mins(5);

fn meta(obj: &Value, field: &str) -> Option<String> {
    obj.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
}

fn meta_mut(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().expect("metadata")
}

/// The object's resourceVersion as a number.
pub(crate) fn object_rv(obj: &Value) -> u64 {
    meta(obj, "resourceVersion").and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn rfc3339(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64 `RawURLEncoding`, as continue tokens are encoded.
fn b64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(B64[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let c = match c {
            b'+' => b'-',
            b'/' => b'_',
            c => c,
        };
        let v = B64.iter().position(|x| *x == c)?;
        acc = acc << 6 | u32::try_from(v).ok()?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from(acc >> bits & 0xff).ok()?);
        }
    }
    Some(out)
}

fn expired_continue() -> ApiError {
    ApiError::expired(
        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue value from the response.",
    )
}

impl Store {
    pub fn new(capacity: usize) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0))
            ^ u64::from(std::process::id()) << 32;
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            capacity: capacity.max(1),
            floor: 1,
            rng: seed,
            clock_offset: std::time::Duration::ZERO,
            since_compaction: std::time::Duration::ZERO,
            compaction_rv: 1,
        }
    }

    /// The server's time: the wall clock plus the injected offset. Every
    /// timestamp the server writes comes from here.
    pub(crate) fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::try_from(std::time::SystemTime::now() + self.clock_offset).unwrap_or(jiff::Timestamp::MAX)
    }

    /// Moves the server's clock forward by `by`, and runs the compactor as
    /// kube-apiserver does every [`COMPACTION_INTERVAL`] of that time: each
    /// run compacts etcd to the revision the previous run saw. So a jump of
    /// two intervals or more forgets the history up to the current
    /// resourceVersion, as ten minutes of a real cluster do.
    pub fn advance_clock(&mut self, by: std::time::Duration) {
        self.clock_offset += by;
        self.since_compaction += by;
        while self.since_compaction >= COMPACTION_INTERVAL {
            self.since_compaction -= COMPACTION_INTERVAL;
            let to = self.compaction_rv;
            self.history.retain(|e| e.rv > to);
            self.floor = self.floor.max(to);
            self.compaction_rv = self.rv;
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Forgets the history: the next watch or continue from an older
    /// resourceVersion is Expired (what an etcd compaction does).
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }

    fn random(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uid(&mut self) -> String {
        let (a, b) = (self.random(), self.random());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(kind, ns.to_owned(), name.to_owned()))
    }

    /// Every current object of `kind` (in `ns` when given), in key order.
    pub fn current(&self, kind: Kind, ns: Option<&str>) -> impl Iterator<Item = &Value> {
        let from = (kind, ns.unwrap_or("").to_owned(), String::new());
        self.objects
            .range(from..)
            .take_while(move |((k, n, _), _)| *k == kind && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
    }

    /// Events with `rv > after`, or Expired when some of them are forgotten.
    pub fn events_after(&self, after: u64) -> Result<impl Iterator<Item = &Event>, ApiError> {
        if after < self.floor {
            return Err(ApiError::expired(format!("too old resource version: {after} ({})", self.floor)));
        }
        // The history is in resourceVersion order: start at the first newer event.
        let first = self.history.partition_point(|e| e.rv <= after);
        Ok(self.history.range(first..))
    }

    fn commit(&mut self, key: Key, ty: EventType, mut object: Value, prev: Option<Value>) -> Value {
        self.rv += 1;
        meta_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        if ty == EventType::Deleted {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), object.clone());
        }
        self.history.push_back(Event { rv: self.rv, key, ty, object: object.clone(), prev });
        while self.history.len() > self.capacity {
            if let Some(e) = self.history.pop_front() {
                self.floor = e.rv;
            }
        }
        object
    }

    /// Checks and fills `apiVersion`/`kind` the way the decoder does with
    /// the defaults taken from the URL.
    fn type_meta(kind: Kind, obj: &mut Value) -> Result<(), ApiError> {
        let Some(m) = obj.as_object_mut() else {
            return Err(ApiError::bad_request("the body of the request must be a JSON object"));
        };
        let k = m.get("kind").and_then(Value::as_str).unwrap_or(kind.kind()).to_owned();
        let v = m.get("apiVersion").and_then(Value::as_str).unwrap_or(kind.api_version()).to_owned();
        if k != kind.kind() || v != kind.api_version() {
            return Err(ApiError::bad_request(format!(
                "{k} in version \"{}\" cannot be handled as a {}: no kind \"{k}\" is registered for version \"{v}\"",
                v.rsplit('/').next().unwrap_or(&v),
                kind.kind()
            )));
        }
        m.insert("kind".into(), json!(kind.kind()));
        m.insert("apiVersion".into(), json!(kind.api_version()));
        Ok(())
    }

    fn namespace(kind: Kind, ns: &str, obj: &mut Value) -> Result<(), ApiError> {
        let m = meta_mut(obj);
        if kind.namespaced() {
            let body = m.get("namespace").and_then(Value::as_str).unwrap_or("");
            if !body.is_empty() && body != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        Ok(())
    }

    /// `POST`: a new object (409 `AlreadyExists` when the name is taken).
    pub fn create(&mut self, kind: Kind, ns: &str, mut obj: Value, writer: Writer) -> Result<Value, ApiError> {
        Self::type_meta(kind, &mut obj)?;
        Self::namespace(kind, ns, &mut obj)?;
        if meta(&obj, "name").is_none()
            && let Some(prefix) = meta(&obj, "generateName")
        {
            // names.SimpleNameGenerator: 5 characters from a consonant/digit alphabet.
            const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
            let suffix: String = (0..5)
                .map(|_| char::from(ALPHA[usize::try_from(self.random() % ALPHA.len() as u64).unwrap_or(0)]))
                .collect();
            meta_mut(&mut obj).insert("name".into(), json!(format!("{prefix}{suffix}")));
        }
        let name = meta(&obj, "name").unwrap_or_default();
        if meta(&obj, "resourceVersion").is_some() {
            if writer != Writer::Test {
                return Err(ApiError::internal("resourceVersion should not be set on objects to be created"));
            }
            meta_mut(&mut obj).remove("resourceVersion");
        }
        let uid = self.uid();
        let m = meta_mut(&mut obj);
        m.insert("uid".into(), json!(uid));
        m.insert("creationTimestamp".into(), json!(rfc3339(self.now())));
        for f in ["deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"] {
            m.remove(f);
        }
        if kind == Kind::EndpointSlice {
            m.insert("generation".into(), json!(1));
        }
        if kind == Kind::Service && writer != Writer::Test {
            // The Service strategy resets the status on create.
            obj["status"] = json!({ "loadBalancer": {} });
        }
        resources::apply_defaults(kind, &mut obj);
        let mut errs = resources::validate(kind, &obj);
        if errs.is_empty() && kind == Kind::Service {
            self.allocate(&mut obj, None, &mut errs);
        }
        if !errs.is_empty() {
            return Err(ApiError::invalid(kind, &name, &errs));
        }
        let key = (kind, ns.to_owned(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind, &name));
        }
        Ok(self.commit(key, EventType::Added, obj, None))
    }

    /// `PUT` (main resource or `/status`) and the write step of `PATCH`.
    pub fn update(&mut self, kind: Kind, ns: &str, name: &str, mut obj: Value, writer: Writer) -> Result<Value, ApiError> {
        let key = (kind, ns.to_owned(), name.to_owned());
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(kind, name));
        };
        Self::type_meta(kind, &mut obj)?;
        Self::namespace(kind, ns, &mut obj)?;
        let body_name = meta(&obj, "name").unwrap_or_default();
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(rv) = meta(&obj, "resourceVersion")
            && rv != meta(&old, "resourceVersion").unwrap_or_default()
        {
            return Err(ApiError::modified(kind, name));
        }
        let old_uid = meta(&old, "uid").unwrap_or_default();
        if let Some(uid) = meta(&obj, "uid")
            && uid != old_uid
        {
            return Err(ApiError::conflict(
                kind,
                name,
                &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"),
            ));
        }
        if writer == Writer::Status {
            // The status strategy keeps everything but the status.
            let status = obj.get("status").cloned();
            obj = old.clone();
            match status {
                Some(s) => obj["status"] = s,
                None => {
                    obj.as_object_mut().expect("object").remove("status");
                }
            }
        } else if writer == Writer::Main && kind.has_status() {
            // The main resource's strategy keeps the old status.
            match old.get("status") {
                Some(s) => obj["status"] = s.clone(),
                None => {
                    obj.as_object_mut().expect("object").remove("status");
                }
            }
        }
        {
            let om = old.get("metadata").cloned().unwrap_or_else(|| json!({}));
            let m = meta_mut(&mut obj);
            for f in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation", "resourceVersion"] {
                match om.get(f) {
                    Some(v) => m.insert(f.into(), v.clone()),
                    None => m.remove(f),
                };
            }
            m.remove("selfLink");
        }
        resources::apply_defaults(kind, &mut obj);
        let mut errs = resources::validate(kind, &obj);
        errs.extend(resources::validate_update(kind, &old, &obj));
        if errs.is_empty() && kind == Kind::Service {
            self.allocate(&mut obj, Some(&old), &mut errs);
        }
        if !errs.is_empty() {
            return Err(ApiError::invalid(kind, name, &errs));
        }
        if kind == Kind::EndpointSlice && generation_changes(&old, &obj) {
            let g = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0) + 1;
            meta_mut(&mut obj).insert("generation".into(), json!(g));
        }
        if obj == old {
            // A no-op update writes nothing: no new resourceVersion, no event.
            return Ok(old);
        }
        let finalizers_empty = obj.pointer("/metadata/finalizers").and_then(Value::as_array).is_none_or(Vec::is_empty);
        if meta(&obj, "deletionTimestamp").is_some() && finalizers_empty {
            // The last finalizer is gone from an object being deleted.
            return Ok(self.commit(key, EventType::Deleted, obj, Some(old)));
        }
        Ok(self.commit(key, EventType::Modified, obj, Some(old)))
    }

    /// `DELETE`: gone at once, or marked with a deletionTimestamp while
    /// finalizers remain.
    pub fn delete(&mut self, kind: Kind, ns: &str, name: &str, pre: &Preconditions) -> Result<Value, ApiError> {
        let key = (kind, ns.to_owned(), name.to_owned());
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(kind, name));
        };
        if let Some(uid) = &pre.uid {
            let have = meta(&old, "uid").unwrap_or_default();
            if *uid != have {
                return Err(ApiError::conflict(
                    kind,
                    name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"),
                ));
            }
        }
        if let Some(rv) = &pre.resource_version {
            let have = meta(&old, "resourceVersion").unwrap_or_default();
            if *rv != have {
                return Err(ApiError::conflict(
                    kind,
                    name,
                    &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {have}"),
                ));
            }
        }
        let has_finalizers = old.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if meta(&old, "deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut obj = old.clone();
            let m = meta_mut(&mut obj);
            m.insert("deletionTimestamp".into(), json!(rfc3339(self.now())));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            return Ok(self.commit(key, EventType::Modified, obj, Some(old)));
        }
        Ok(self.commit(key, EventType::Deleted, old.clone(), Some(old)))
    }

    /// The objects of `kind` that changed after `rv` (`rv >= floor`), as they
    /// were at `rv` (`None`: absent then): the earliest newer event's
    /// previous state. Costs the events after `rv`, not the objects.
    fn changed_since(&self, kind: Kind, rv: u64) -> BTreeMap<&Key, Option<&Value>> {
        let mut then = BTreeMap::new();
        // Newest first: the last insert for a key is its earliest event.
        for e in self.history.iter().rev().take_while(|e| e.rv > rv).filter(|e| e.key.0 == kind) {
            let before = match (&e.ty, &e.prev) {
                (EventType::Added, _) | (_, None) => None,
                (_, Some(prev)) => Some(prev),
            };
            then.insert(&e.key, before);
        }
        then
    }

    /// The objects of `kind` as they were at `rv` (`rv >= floor`), in key
    /// order from `from` (exclusive with `after`): the current objects with
    /// the changes since `rv` undone ([`Store::changed_since`]). Lazy: a
    /// page costs its own objects and the events after `rv`, not a copy of
    /// every object of the kind.
    fn snapshot_from<'a>(
        &'a self,
        kind: Kind,
        rv: u64,
        from: &Key,
        after: bool,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        use std::ops::Bound;
        let lower = if after { Bound::Excluded(from.clone()) } else { Bound::Included(from.clone()) };
        let changed = if rv < self.rv { self.changed_since(kind, rv) } else { BTreeMap::new() };
        let of_kind = move |k: &&Key| k.0 == kind;
        let mut now = self.objects.range((lower.clone(), Bound::Unbounded)).map(|(k, v)| (k, Some(v))).take_while(move |(k, _)| of_kind(k)).peekable();
        let mut then: Vec<(&Key, Option<&Value>)> = changed.into_iter().filter(|(k, _)| match &lower {
            Bound::Included(f) => *k >= f,
            Bound::Excluded(f) => *k > f,
            Bound::Unbounded => true,
        }).collect();
        then.reverse();
        // Merges the two key-ordered streams; a key changed since `rv`
        // takes its state at `rv` (or is skipped when it did not exist).
        std::iter::from_fn(move || loop {
            let next_then = then.last().map(|(k, _)| *k);
            let next_now = now.peek().map(|(k, _)| *k);
            let (key, value) = match (next_now, next_then) {
                (None, None) => return None,
                (Some(a), Some(b)) if a == b => {
                    now.next();
                    then.pop().expect("peeked")
                }
                (Some(a), Some(b)) if b < a => then.pop().expect("peeked"),
                (None, Some(_)) => then.pop().expect("peeked"),
                (Some(_), _) => now.next().expect("peeked"),
            };
            if let Some(v) = value {
                return Some((key, v));
            }
        })
    }

    /// `GET` on a collection (the caller waits for a future resourceVersion
    /// first). A page costs its own objects (and the events since the
    /// snapshot's resourceVersion), not the whole collection: it starts at
    /// the continue token's key in the ordered map, as etcd's range read does.
    pub fn list(&self, kind: Kind, q: &ListQuery) -> Result<ListResult, ApiError> {
        let (at, start) = if let Some(token) = &q.continue_token {
            if q.resource_version.is_some() {
                return Err(ApiError::bad_request("specifying resource version is not allowed when using continue"));
            }
            let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
            let raw = b64_decode(token).ok_or_else(|| bad("incorrect encoding"))?;
            let v: Value = serde_json::from_slice(&raw).map_err(|_| bad("incorrect encoding"))?;
            if v.get("v").and_then(Value::as_str) != Some("meta.k8s.io/v1") {
                return Err(bad("server does not recognize this encoding"));
            }
            let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(|| bad("incorrect encoding"))?;
            let start = v.get("start").and_then(Value::as_str).ok_or_else(|| bad("incorrect encoding"))?;
            if rv < self.floor {
                return Err(expired_continue());
            }
            (rv, Some(start.trim_end_matches('\0').to_owned()))
        } else {
            match (q.resource_version, q.resource_version_match.as_deref()) {
                (Some(rv), Some("Exact")) => {
                    if rv < self.floor {
                        return Err(ApiError::expired("The resourceVersion for the provided list is too old."));
                    }
                    (rv, None)
                }
                _ => (self.rv, None),
            }
        };
        // resourceVersion=0 (any) is served from the watch cache, which ignores limit.
        let from_cache = q.continue_token.is_none() && q.resource_version == Some(0);
        let limit = if from_cache { None } else { q.limit.filter(|l| *l > 0) };
        // A key relative to the listed collection: `namespace/name` across
        // namespaces, the name within one (or of a cluster-scoped kind).
        let across = kind.namespaced() && q.namespace.is_none();
        let rel = |k: &Key| -> String { if across { format!("{}/{}", k.1, k.2) } else { k.2.clone() } };
        let ns = q.namespace.clone().unwrap_or_default();
        let (from, after) = match &start {
            Some(s) if across => {
                let (n, name) = s.split_once('/').ok_or_else(|| ApiError::bad_request("continue key is not valid: incorrect encoding"))?;
                ((kind, n.to_owned(), name.to_owned()), true)
            }
            Some(s) => ((kind, ns.clone(), s.clone()), true),
            None => ((kind, ns.clone(), String::new()), false),
        };
        let mut matching = self
            .snapshot_from(kind, at, &from, after)
            .take_while(|(k, _)| q.namespace.as_ref().is_none_or(|ns| *ns == k.1))
            .filter(|(_, v)| q.labels.matches(v.pointer("/metadata/labels").and_then(Value::as_object)) && q.fields.matches(kind, v));
        let mut items = Vec::new();
        let mut last = None;
        for (k, v) in matching.by_ref() {
            if limit.is_some_and(|l| items.len() == l) {
                // One more exists: the page is full. (The count of the rest,
                // only given without selectors, walks them; not cloned.)
                let selectors = !q.labels.is_empty() || !q.fields.is_empty();
                let rest = if selectors { None } else { Some(1 + matching.count() as u64) };
                let token = json!({ "v": "meta.k8s.io/v1", "rv": at, "start": format!("{}\0", last.unwrap_or_default()) });
                return Ok(ListResult {
                    items,
                    resource_version: at,
                    continue_token: Some(b64_encode(token.to_string().as_bytes())),
                    remaining: rest,
                });
            }
            last = Some(rel(k));
            items.push(v.clone());
        }
        Ok(ListResult { items, resource_version: at, continue_token: None, remaining: None })
    }

    /// Cluster IPs and node ports, as the Service REST allocators give them,
    /// and the fields the real server keeps from the old object on update.
    #[expect(clippy::too_many_lines, reason = "one pass over the Service like the REST allocators; splitting scatters the shared state")]
    fn allocate(&mut self, obj: &mut Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
        let ty = obj.pointer("/spec/type").and_then(Value::as_str).unwrap_or("ClusterIP").to_owned();
        let name = meta(obj, "name").unwrap_or_default();
        let ns = meta(obj, "namespace").unwrap_or_default();
        let others: Vec<&Value> = self
            .current(Kind::Service, None)
            .filter(|s| !(meta(s, "name").as_deref() == Some(&name) && meta(s, "namespace").as_deref() == Some(&ns)))
            .collect();
        let used_ips: Vec<String> = others
            .iter()
            .filter_map(|s| s.pointer("/spec/clusterIP").and_then(Value::as_str))
            .map(str::to_owned)
            .collect();
        let mut used_ports: Vec<u64> = others
            .iter()
            .flat_map(|s| {
                let mut p: Vec<u64> = s
                    .pointer("/spec/ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
                    .collect();
                p.extend(s.pointer("/spec/healthCheckNodePort").and_then(Value::as_u64));
                p
            })
            .collect();
        let old_spec = old.and_then(|o| o.get("spec")).cloned().unwrap_or_else(|| json!({}));
        let spec = obj["spec"].as_object_mut().expect("spec defaulted");

        if ty == "ExternalName" {
            for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                if spec.get(f).is_some() && spec.get(f) == old_spec.get(f) {
                    spec.remove(f);
                }
            }
        } else {
            let given = spec.get("clusterIP").and_then(Value::as_str).unwrap_or("").to_owned();
            let old_ip = old_spec.get("clusterIP").and_then(Value::as_str).unwrap_or("").to_owned();
            let ip = if given.is_empty() && !old_ip.is_empty() {
                old_ip.clone()
            } else if given.is_empty() {
                loop {
                    // The dynamic band of 10.96.0.0/12 (above the first 256 addresses).
                    let off = 256 + u32::try_from(self.random() % ((1 << 20) - 258)).unwrap_or(0);
                    let ip = std::net::Ipv4Addr::from(0x0a60_0000 | off).to_string();
                    if !used_ips.contains(&ip) {
                        break ip;
                    }
                }
            } else {
                given
            };
            if old.is_some() && !old_ip.is_empty() && ip != old_ip {
                errs.push(FieldError::invalid("spec.clusterIPs[0]", &ip, "may not change once set"));
            } else if ip != "None" && old_ip != ip && used_ips.contains(&ip) {
                errs.push(FieldError::invalid(
                    "spec.clusterIPs",
                    &format!("[]string{{\"{ip}\"}}"),
                    &format!("failed to allocate IP {ip}: provided IP is already allocated"),
                ));
            }
            let v6 = ip.contains(':');
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
            spec.entry("ipFamilies").or_insert_with(|| json!([if v6 { "IPv6" } else { "IPv4" }]));
            spec.entry("ipFamilyPolicy").or_insert_with(|| json!("SingleStack"));
        }

        let wants_node_ports = ty == "NodePort"
            || (ty == "LoadBalancer" && spec.get("allocateLoadBalancerNodePorts").and_then(Value::as_bool) != Some(false));
        let old_ports: Vec<Value> = old_spec.get("ports").and_then(Value::as_array).cloned().unwrap_or_default();
        let alloc = |this: &mut Self, used: &mut Vec<u64>| -> u64 {
            loop {
                let p = 30000 + this.random() % 2768;
                if !used.contains(&p) {
                    used.push(p);
                    return p;
                }
            }
        };
        let mut taken = Vec::new();
        let ports = spec.get_mut("ports").and_then(Value::as_array_mut).map(std::mem::take).unwrap_or_default();
        let mut new_ports = Vec::new();
        for (i, mut p) in ports.into_iter().enumerate() {
            let old_np = old_ports
                .iter()
                .find(|o| o.get("port") == p.get("port") && o.get("protocol") == p.get("protocol"))
                .and_then(|o| o.get("nodePort"))
                .and_then(Value::as_u64);
            let np = p.get("nodePort").and_then(Value::as_u64).filter(|n| *n != 0);
            let m = p.as_object_mut().expect("port");
            if wants_node_ports {
                let (np, fresh) = match (np, old_np) {
                    (Some(n), _) => (n, false),
                    (None, Some(o)) => (o, false),
                    (None, None) => (alloc(self, &mut used_ports), true),
                };
                if !(30000..=32767).contains(&np) {
                    errs.push(FieldError::invalid(
                        &format!("spec.ports[{i}].nodePort"),
                        &np.to_string(),
                        "provided port is not in the valid range. The range of valid ports is 30000-32767",
                    ));
                } else if taken.contains(&np) || (!fresh && used_ports.contains(&np)) {
                    errs.push(FieldError::invalid(&format!("spec.ports[{i}].nodePort"), &np.to_string(), "provided port is already allocated"));
                }
                taken.push(np);
                m.insert("nodePort".into(), json!(np));
            } else if np.is_some() && np == old_np {
                // Dropped with the type that needed it.
                m.remove("nodePort");
            } else if let Some(np) = np
                && ty == "ClusterIP"
            {
                errs.push(FieldError {
                    field: format!("spec.ports[{i}].nodePort"),
                    reason: "FieldValueForbidden",
                    value: Some(np.to_string()),
                    detail: "may not be used when `type` is 'ClusterIP'".into(),
                });
            }
            new_ports.push(p);
        }
        if !new_ports.is_empty() || spec.contains_key("ports") {
            spec.insert("ports".into(), Value::Array(new_ports));
        }

        let local = spec.get("externalTrafficPolicy").and_then(Value::as_str) == Some("Local");
        if ty == "LoadBalancer" && local {
            if spec.get("healthCheckNodePort").and_then(Value::as_u64).is_none_or(|p| p == 0) {
                let p = old_spec.get("healthCheckNodePort").and_then(Value::as_u64).unwrap_or_else(|| alloc(self, &mut used_ports));
                spec.insert("healthCheckNodePort".into(), json!(p));
            }
        } else if spec.get("healthCheckNodePort").is_some() && spec.get("healthCheckNodePort") == old_spec.get("healthCheckNodePort") {
            spec.remove("healthCheckNodePort");
        }
    }
}

/// `EndpointSlice` generation: bumped when anything but metadata, or the labels, change.
fn generation_changes(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
        }
        v
    };
    strip(old) != strip(new) || old.pointer("/metadata/labels") != new.pointer("/metadata/labels")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for s in ["", "a", "ab", "abc", "{\"v\":\"meta.k8s.io/v1\",\"rv\":5,\"start\":\"a/b\\u0000\"}"] {
            assert_eq!(b64_decode(&b64_encode(s.as_bytes())).as_deref(), Some(s.as_bytes()));
        }
        assert_eq!(b64_encode(b"hello?>"), "aGVsbG8_Pg");
    }

    /// Every page of a paged list, whatever changes between the pages,
    /// comes from the first page's snapshot: together they are exactly the
    /// list at that resourceVersion (across namespaces, within one, with a
    /// label selector), in key order.
    #[test]
    fn pages_make_up_the_snapshot_of_the_first_page() {
        let mut s = Store::new(100_000);
        let svc = |ns: &str, name: &str, tier: &str| {
            json!({"metadata": {"name": name, "namespace": ns, "labels": {"tier": tier}}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}})
        };
        let names = |r: &ListResult| -> Vec<String> {
            r.items.iter().map(|o| format!("{}/{}", meta(o, "namespace").unwrap_or_default(), meta(o, "name").unwrap_or_default())).collect()
        };
        for i in 0..60 {
            let ns = ["a", "a-b", "b"][i % 3];
            s.create(Kind::Service, ns, svc(ns, &format!("s{i:02}"), ["web", "db"][i % 2]), Writer::Test).expect("create");
            s.create(Kind::Node, "", json!({"metadata": {"name": format!("n{i}")}}), Writer::Test).expect("node");
        }
        for (ns, labels) in [(None, ""), (Some("a-b"), ""), (None, "tier=web"), (Some("b"), "tier!=web")] {
            let q = |limit, token: Option<String>| ListQuery {
                namespace: ns.map(str::to_owned),
                labels: LabelSelector::parse(labels).expect("selector"),
                limit,
                continue_token: token,
                ..ListQuery::default()
            };
            let whole = s.list(Kind::Service, &q(None, None)).expect("list");
            let mut step = s.clone();
            let mut got = Vec::new();
            let mut token = None;
            let mut n = 0;
            loop {
                let page = step.list(Kind::Service, &q(Some(7), token.take())).expect("page");
                assert_eq!(page.resource_version, whole.resource_version, "{ns:?} {labels}");
                got.extend(names(&page));
                // Between pages: deletes, updates and creates on both sides
                // of the next page's start.
                n += 1;
                let victim = format!("s{:02}", (n * 11) % 60);
                for ns in ["a", "a-b", "b"] {
                    let _ = step.delete(Kind::Service, ns, &victim, &Preconditions::default());
                    let _ = step.create(Kind::Service, ns, svc(ns, &format!("t{n:02}"), "web"), Writer::Test);
                }
                match page.continue_token {
                    Some(t) => token = Some(t),
                    None => break,
                }
            }
            assert_eq!(got, names(&whole), "{ns:?} {labels}");
            assert!(!got.is_empty());
        }
        // Keys in order within the kind only: the Nodes listed apart.
        assert_eq!(s.list(Kind::Node, &ListQuery { limit: Some(100), ..ListQuery::default() }).expect("nodes").items.len(), 60);
    }

    #[test]
    fn the_injected_clock_stamps_objects_and_runs_the_compactor_every_5_minutes() {
        let mut s = Store::new(1000);
        let node = |name: &str| json!({ "metadata": { "name": name } });
        s.create(Kind::Node, "", node("a"), Writer::Test).expect("a");
        let at_a = s.resource_version();
        s.advance_clock(std::time::Duration::from_mins(4));
        assert!(s.events_after(1).is_ok(), "no compaction before 5 minutes");
        s.advance_clock(std::time::Duration::from_mins(1));
        // The first run compacts to what the store had when it started.
        assert!(s.events_after(1).is_ok(), "the first run compacts to its start");
        s.create(Kind::Node, "", node("b"), Writer::Test).expect("b");
        let b = s.get(Kind::Node, "", "b").expect("b").clone();
        let created: jiff::Timestamp = b["metadata"]["creationTimestamp"].as_str().expect("ts").parse().expect("rfc3339");
        let ahead = created.duration_since(jiff::Timestamp::now());
        assert!(ahead > jiff::SignedDuration::from_mins(4), "creationTimestamp 5 minutes ahead: {created}");
        s.advance_clock(std::time::Duration::from_mins(5));
        assert!(s.events_after(at_a - 1).is_err(), "compacted to the previous run's revision");
        assert!(s.events_after(at_a).is_ok(), "what came after the previous run is kept");
        s.advance_clock(std::time::Duration::from_mins(5));
        assert!(s.events_after(at_a).is_err(), "10 minutes on: the history is gone");
        assert!(s.events_after(s.resource_version()).is_ok());
    }
}
