//! A test Kubernetes API server for v1 Services, discovery.k8s.io/v1
//! `EndpointSlices`, v1 Nodes and events.k8s.io/v1 Events, that real clients
//! (kube-rs `watcher`s and event publishers, kubectl) use over real HTTP
//! through a kubeconfig, with faults the test injects.
//!
//! ```no_run
//! use integration_tests::apiserver::ApiServer;
//! let api = ApiServer::start("127.0.0.1:0".parse().unwrap());
//! api.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig")).unwrap();
//! api.apply(serde_json::json!({
//!     "apiVersion": "v1", "kind": "Service",
//!     "metadata": { "name": "web", "namespace": "default" },
//!     "spec": { "clusterIP": "10.96.0.10", "ports": [{ "port": 80 }] },
//! })).unwrap();
//! ```
//!
//! [`ApiServer::start`] runs the server on its own thread with its own
//! single-threaded tokio runtime; the listener is made on that thread, so a
//! server started from a thread that entered a network namespace (setns)
//! listens in that namespace, and so does the listener bound again after
//! [`ApiServer::set_down`]`(false)`.
//!
//! # Faithful to the real server (what clients can observe)
//! - **Discovery** (`/version`, `/api`, `/api/v1`, `/apis`,
//!   `/apis/discovery.k8s.io[/v1]`, `/apis/events.k8s.io[/v1]`) with verbs,
//!   `singularName`, `shortNames` (`svc`, `no`, `ev`), categories and
//!   `/status` subresources.
//!   Aggregated discovery is not offered: clients fall back to these
//!   documents, as with a server before 1.26.
//! - **Reads**: list (all namespaces or one), get, `labelSelector` (`=`,
//!   `==`, `!=`, `in`, `notin`, `key`, `!key`, `>`, `<`) and `fieldSelector`
//!   (`=`, `==`, `!=` on the field labels the real registry has:
//!   `metadata.name`, `metadata.namespace`, `spec.clusterIP`, `spec.type`,
//!   `spec.unschedulable`, and for Events `reason`, `type`,
//!   `reportingController` and `regarding.*`; others are a 400 like the
//!   real one). Lists carry
//!   `metadata.resourceVersion`; `limit` pages with `continue` tokens
//!   (etcd's format, a consistent snapshot at the first page's
//!   resourceVersion, `remainingItemCount` without selectors, 410 Expired
//!   once compacted); `resourceVersion=0` is served from "the cache" and
//!   ignores `limit`; `resourceVersionMatch=Exact` reads a past snapshot; a
//!   resourceVersion the store has not reached waits 3 s then answers 504
//!   `ResourceVersionTooLarge`. List items have no `kind`/`apiVersion`, as
//!   on the wire of the real server.
//! - **Output**: JSON; server-side `Table` (`meta.k8s.io/v1` or `v1beta1`)
//!   with kubectl's columns for each kind, rows with cells and the object as
//!   `includeObject` asks (`PartialObjectMetadata` by default); and
//!   `PartialObjectMetadata[List]`.
//! - **Writes**: create (201; 409 `AlreadyExists`; `generateName`), replace
//!   (409 Conflict on a stale `resourceVersion`, unconditional without one),
//!   `/status` (only the status changes; the main resource keeps the old
//!   status), patch (`merge-patch+json`, `strategic-merge-patch+json` with
//!   the merge keys and `$patch`/`$retainKeys`/`$setElementOrder`/
//!   `$deleteFromPrimitiveList` directives of these types, `json-patch+json`;
//!   415 for apply patches), delete (Services answer with the object, others
//!   with a Success Status; preconditions; finalizers mark the object with a
//!   `deletionTimestamp` until the last one is removed), deletecollection,
//!   `dryRun=All`. Every write bumps one global resourceVersion and sets
//!   `uid`, `creationTimestamp`, `namespace` and, for `EndpointSlices`,
//!   `generation` (bumped when anything but metadata, or the labels,
//!   change); an update that changes nothing writes nothing. Services get
//!   the real defaults (type, sessionAffinity, protocol, targetPort,
//!   internal/externalTrafficPolicy, ipFamilies, ipFamilyPolicy,
//!   clusterIPs), a cluster IP from 10.96.0.0/12 when none is given,
//!   node ports from 30000-32767 (and a healthCheckNodePort for
//!   `LoadBalancer` + `Local`), kept on update; a taken cluster IP or node
//!   port, a changed cluster IP, a port or protocol out of range, a missing
//!   `EndpointSlice` `addressType` are 422 Invalid with field causes. Events
//!   are validated as `events.k8s.io/v1` creates are (`eventTime`, `type`
//!   `Normal`/`Warning`, `reportingController` a qualified name,
//!   `reportingInstance`, `action` and `reason` required and at most 128
//!   characters, `note` at most 1 kB, `series` with `count` ≥ 2 and
//!   `lastObservedTime`, the `deprecated*` fields unset), and an update may
//!   change only their `series` (and metadata): what a recorder's PATCH of a
//!   repeated Event does. Errors are
//!   `Status` objects with the real messages, reasons and details.
//! - **Watch** (`watch=true` or `/watch/` paths): chunked JSON lines, events
//!   after `resourceVersion` (no resourceVersion or `0`: the current objects
//!   as ADDED first), filtered by namespace and selectors with the cacher's
//!   transitions (an object that stops matching is DELETED with its old
//!   content and the new resourceVersion, one that starts matching is
//!   ADDED), ending cleanly at `timeoutSeconds`; BOOKMARKs (kind,
//!   apiVersion, metadata.resourceVersion) every
//!   [`Options::bookmark_interval`] when `allowWatchBookmarks=true`;
//!   `sendInitialEvents=true` (with its required `resourceVersionMatch` and
//!   bookmarks) ends the initial ADDED events with the
//!   `k8s.io/initial-events-end` bookmark. A resourceVersion older than the
//!   kept history gets HTTP 200 and then an `ERROR` event carrying a
//!   Status with code 410, reason Expired, as the real server does (an HTTP
//!   410 would make kube-rs retry the same resourceVersion forever).
//!
//! # Not faithful (on purpose or not needed)
//! - Only these four resources (no core v1 Events: clients that write
//!   `events.k8s.io/v1` never need them); Events never expire (the real
//!   server keeps them an hour); no namespaces resource (every namespace
//!   exists), no authentication or authorization (the kubeconfig's bearer
//!   token is accepted, as is no token), no admission, no `managedFields`,
//!   no server-side apply (`apply-patch+yaml` is a 415), no protobuf (JSON
//!   is answered whatever `Accept` prefers), no HTTP/2, no TLS.
//! - `/openapi/v2` is an empty document (no schemas): kubectl finds no schema
//!   for the kinds and skips client-side validation, so `kubectl create -f`
//!   works without `--validate=false`; `kubectl explain` cannot work.
//! - Validation covers what tests trip over (names, labels, ports,
//!   protocols, types, addresses), not all of it. Any valid IP is accepted
//!   as a static cluster IP (the real one must be inside its service range).
//!   `fieldValidation=Strict` (kubectl 1.25+) is accepted but unknown fields
//!   are kept, not rejected.
//! - Bookmarks come at a fixed interval (the real cacher: about a minute,
//!   plus one shortly before the watch times out). `compact()` forgets the
//!   history up to the current resourceVersion, like an etcd compaction:
//!   only a client that missed at least one write gets 410 on resuming.
//!   A watch from a resourceVersion newer than the store's simply waits for
//!   it.
//!
//! # Faults and the test's view
//! [`ApiServer::drop_watches`] aborts every open watch connection (no final
//! chunk); [`ApiServer::compact`]; [`ApiServer::set_down`] closes the
//! listener and every connection (connects are refused) and binds the same
//! port again when back up; [`ApiServer::fail_next`] / [`ApiServer::fail_all`]
//! answer requests with an error Status of a given code;
//! [`ApiServer::forbid_writes`] answers the writes of one kind with 403 (an
//! RBAC rule missing); [`ApiServer::stall`]
//! delays every response; [`ApiServer::advance_clock`] moves the server's
//! clock (the timestamps it writes) forward, running the etcd compactor
//! every 5 minutes of that time as kube-apiserver does, so a long outage
//! can be simulated in seconds. The store is reachable from Rust
//! ([`ApiServer::apply`], [`ApiServer::delete`], [`ApiServer::get`],
//! [`ApiServer::list`], [`ApiServer::current_resource_version`]), faults do not
//! apply to it, and its writes reach the watches like a client's. Every HTTP
//! request is logged ([`ApiServer::requests`]).
mod http;
mod patch;
mod resources;
mod selector;
mod status;
mod store;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use tokio::sync::mpsc;

pub use self::{resources::Kind, status::ApiError};
use self::{
    http::{Command, Shared, lock},
    store::{Preconditions, Writer},
};

/// Tunables of the server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Events kept for resuming watches and continuing lists (the watch
    /// cache); a watch from before them gets 410 Expired. Default 1000.
    pub history: usize,
    /// Interval between BOOKMARK events on watches that allow them. Default
    /// 60 s, about what the real cacher does.
    pub bookmark_interval: Duration,
    /// How long a watch without `timeoutSeconds` lasts. Default 30 min (the
    /// real server picks 30 to 60 min).
    pub default_watch_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { history: 1000, bookmark_interval: Duration::from_mins(1), default_watch_timeout: Duration::from_mins(30) }
    }
}

/// One HTTP request as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string (without `?`).
    pub query: String,
    pub user_agent: String,
}

impl RequestRecord {
    /// A query parameter, decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        http::parse_query(&self.query).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// A watch request (`watch=true`/`1` or a `/watch/` path).
    pub fn is_watch(&self) -> bool {
        self.path.contains("/watch/") || matches!(self.param("watch").as_deref(), Some("true" | "1" | "True" | "TRUE" | "t" | "T"))
    }

    /// A GET of a collection that is not a watch, i.e. a list of `kind`.
    pub fn is_list_of(&self, kind: Kind) -> bool {
        self.method == "GET" && !self.is_watch() && self.path.ends_with(&format!("/{}", kind.plural()))
    }

    /// A watch of a collection of `kind`.
    pub fn is_watch_of(&self, kind: Kind) -> bool {
        self.method == "GET" && self.is_watch() && self.path.ends_with(&format!("/{}", kind.plural()))
    }
}

/// A running test API server; stopped (and its thread joined) on drop.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
}

fn kind_of(name: &str) -> Kind {
    Kind::from_name(name).unwrap_or_else(|| panic!("the test API server serves Service, EndpointSlice, Node and Event, not {name:?}"))
}

fn namespace_of(kind: Kind, ns: Option<&str>) -> String {
    if kind.namespaced() { ns.unwrap_or("default").to_owned() } else { String::new() }
}

impl ApiServer {
    /// Starts a server on `addr` (port 0 picks a free one) with default
    /// [`Options`]. Panics when it cannot bind.
    pub fn start(addr: SocketAddr) -> Self {
        Self::start_with(addr, Options::default())
    }

    /// Starts a server with the given options.
    pub fn start_with(addr: SocketAddr, opts: Options) -> Self {
        let shared = Arc::new(Shared::new(opts));
        let (commands, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let s = shared.clone();
        // Threads inherit the network namespace of the thread that makes
        // them, so the listener below is in the caller's namespace.
        let thread = std::thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    match http::bind(addr) {
                        Ok(listener) => {
                            let _ = ready_tx.send(listener.local_addr());
                            http::serve(s, listener, rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .expect("spawn the API server thread");
        let addr = match ready_rx.recv() {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => panic!("test API server cannot listen on {addr}: {e}"),
            Err(std::sync::mpsc::RecvError) => panic!("test API server thread died before listening on {addr}"),
        };
        Self { shared, addr, commands, thread: Some(thread) }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server: plain HTTP, namespace `default`, and a
    /// bearer token (which the server accepts, as it accepts no token).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\nusers:\n- name: test\n  user:\n    token: test-token\npreferences: {{}}\n",
            self.url()
        )
    }

    /// Writes [`Self::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    // ------------------------------------------------------ the store

    /// Creates the object, or replaces the stored one of that kind,
    /// namespace (default `default`) and name — status included, whatever
    /// its resourceVersion says — as the real server would store it
    /// (defaults, allocations, system fields, one event for the watches; no
    /// event when nothing changes). The real server's rules hold: changing a
    /// Service's cluster IP is a 422 (delete it first).
    pub fn apply(&self, mut obj: Value) -> Result<Value, ApiError> {
        let kind_name = obj.get("kind").and_then(Value::as_str).unwrap_or("").to_owned();
        let kind = Kind::from_name(&kind_name)
            .filter(|k| k.kind() == kind_name)
            .ok_or_else(|| ApiError::bad_request(format!("the test API server does not serve kind {kind_name:?}")))?;
        let meta = obj.get("metadata").cloned().unwrap_or(Value::Null);
        let ns = namespace_of(kind, meta.get("namespace").and_then(Value::as_str).filter(|s| !s.is_empty()));
        let name = meta.get("name").and_then(Value::as_str).unwrap_or("").to_owned();
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
            m.remove("uid");
        }
        self.shared.write(|s| {
            if s.get(kind, &ns, &name).is_some() {
                s.update(kind, &ns, &name, obj, Writer::Test)
            } else {
                s.create(kind, &ns, obj, Writer::Test)
            }
        })
    }

    /// Deletes an object (`kind`: "Service", "services", "svc", ...;
    /// `namespace` `None` means `default` for namespaced kinds). Returns it.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let kind = kind_of(kind);
        let ns = namespace_of(kind, namespace);
        self.shared.write(|s| s.delete(kind, &ns, name, &Preconditions::default()))
    }

    /// The stored object, if any.
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let kind = kind_of(kind);
        lock(&self.shared.store).get(kind, &namespace_of(kind, namespace), name).cloned()
    }

    /// Every stored object of `kind` (in `namespace`, or in all namespaces
    /// with `None`), in key order.
    pub fn list(&self, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        let kind = kind_of(kind);
        let namespace = namespace.filter(|_| kind.namespaced());
        lock(&self.shared.store).current(kind, namespace).cloned().collect()
    }

    /// The global resourceVersion (that of the last write).
    pub fn current_resource_version(&self) -> u64 {
        lock(&self.shared.store).resource_version()
    }

    // ------------------------------------------------------ requests

    /// Every HTTP request received so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).clone()
    }

    /// Forgets the logged requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }

    /// Watches being streamed now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Waits until `cond(self)` holds, up to `timeout`; true if it did.
    pub fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // ------------------------------------------------------ faults

    /// Aborts every open watch stream (the connection closes without the
    /// final chunk).
    pub fn drop_watches(&self) {
        self.shared.drop_tx.send_modify(|n| *n += 1);
    }

    /// Forgets the event history: resuming a watch (or continuing a list)
    /// from before the current resourceVersion gets 410 Expired.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
    }

    /// Moves the server's clock forward by `by`: the timestamps it writes
    /// from now on (`creationTimestamp`, `deletionTimestamp`) are that much
    /// later than the wall clock. The compactor runs as kube-apiserver's
    /// does every 5 minutes of that time (`--etcd-compaction-interval`),
    /// each run compacting to the resourceVersion the previous run saw: a
    /// jump of 10 minutes forgets the history up to now, and a watch resumed
    /// from before it gets 410 Expired.
    pub fn advance_clock(&self, by: Duration) {
        lock(&self.shared.store).advance_clock(by);
    }

    /// The server's time (the wall clock plus what
    /// [`Self::advance_clock`] added).
    pub fn now(&self) -> jiff::Timestamp {
        lock(&self.shared.store).now()
    }

    /// Down: the listener is closed (connects are refused) and every open
    /// connection is closed. Up: the same address is bound again. Returns
    /// when done.
    pub fn set_down(&self, down: bool) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.commands.send(Command::SetDown(down, tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Whether the server is down.
    pub fn is_down(&self) -> bool {
        *self.shared.down_tx.borrow()
    }

    /// The next `n` requests get an error `Status` with HTTP code `status`
    /// (500 `InternalError`, 503, 429 with `Retry-After`, ...).
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut f = lock(&self.shared.faults);
        f.fail_next = n;
        f.fail_next_code = status;
    }

    /// Every request fails with `status` until called with `None`.
    pub fn fail_all(&self, status: Option<u16>) {
        lock(&self.shared.faults).fail_all = status;
    }

    /// Writes (create, update, patch, delete) of `kind` are 403 Forbidden
    /// while `forbidden`, as without the RBAC rule; reads are not affected.
    pub fn forbid_writes(&self, kind: &str, forbidden: bool) {
        let kind = kind_of(kind);
        let mut f = lock(&self.shared.faults);
        f.forbidden_writes.retain(|k| *k != kind);
        if forbidden {
            f.forbidden_writes.push(kind);
        }
    }

    /// Delays every response by `delay` (zero: no delay).
    pub fn stall(&self, delay: Duration) {
        lock(&self.shared.faults).stall = delay;
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------ bulk loading

impl ApiServer {
    /// Creates every object of `objs` (each a `Service`, `EndpointSlice`,
    /// `Node` or `Event` that does not exist yet) as [`ApiServer::apply`]
    /// would, in one store operation; stops at the first error. A
    /// `ClusterIP` Service with a given cluster IP is checked against the
    /// cluster IPs in use without scanning every Service, so loading tens
    /// of thousands (the benchmark) is not quadratic. Returns how many were
    /// created.
    pub fn create_many(&self, objs: Vec<Value>) -> Result<usize, ApiError> {
        let mut items = Vec::with_capacity(objs.len());
        for mut obj in objs {
            let kind_name = obj.get("kind").and_then(Value::as_str).unwrap_or("").to_owned();
            let kind = Kind::from_name(&kind_name)
                .filter(|k| k.kind() == kind_name)
                .ok_or_else(|| ApiError::bad_request(format!("the test API server does not serve kind {kind_name:?}")))?;
            let ns = namespace_of(kind, obj.pointer("/metadata/namespace").and_then(Value::as_str).filter(|s| !s.is_empty()));
            if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("uid");
            }
            items.push((kind, ns, obj));
        }
        self.shared.write(|s| s.create_many(items))
    }
}
