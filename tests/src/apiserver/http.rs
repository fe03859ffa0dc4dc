//! HTTP/1.1 front: routing like the real server's REST handlers, content
//! negotiation (JSON, Table, `PartialObjectMetadata`), streamed watches, and
//! the injected faults.
use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming, SizeHint},
    header::{self, HeaderMap, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{mpsc, watch},
    time::Instant,
};

use super::{
    Options, RequestRecord,
    patch,
    resources::{self, Kind},
    selector::{FieldSelector, LabelSelector},
    status::ApiError,
    store::{Event, EventType, ListQuery, Preconditions, Store, Writer, object_rv},
};

/// Injected faults.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub fail_next: usize,
    pub fail_next_code: u16,
    pub fail_all: Option<u16>,
    pub stall: Duration,
    /// Kinds whose writes are 403 Forbidden (an RBAC rule missing).
    pub forbidden_writes: Vec<Kind>,
}

/// State shared by the server thread and the test's handle.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    /// The store's resourceVersion after each write: wakes the watches.
    pub rv_tx: watch::Sender<u64>,
    /// Bumped by `drop_watches`: every open watch aborts its connection.
    pub drop_tx: watch::Sender<u64>,
    /// True while the server is down: connections close.
    pub down_tx: watch::Sender<bool>,
    pub faults: Mutex<Faults>,
    pub log: Mutex<Vec<RequestRecord>>,
    pub open_watches: AtomicUsize,
    pub connections: AtomicUsize,
    pub opts: Options,
}

/// Locks a mutex, ignoring poisoning (a panicking test thread must not
/// wedge the server).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub fn new(opts: Options) -> Self {
        Self {
            store: Mutex::new(Store::new(opts.history)),
            rv_tx: watch::Sender::new(0),
            drop_tx: watch::Sender::new(0),
            down_tx: watch::Sender::new(false),
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
            open_watches: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            opts,
        }
    }

    /// Runs a store operation and wakes the watches if it wrote.
    pub fn write<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let (out, rv) = {
            let mut s = lock(&self.store);
            let out = f(&mut s);
            (out, s.resource_version())
        };
        self.rv_tx.send_if_modified(|v| {
            let changed = *v != rv;
            *v = rv;
            changed
        });
        out
    }
}

/// Commands from the test's handle to the accept loop.
pub(crate) enum Command {
    SetDown(bool, std::sync::mpsc::Sender<()>),
    Stop,
}

/// A response body: whole, or streamed (a watch).
pub(crate) enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Result<Bytes, io::Error>>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept(l: Option<&TcpListener>) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// The accept loop; runs on the server thread until `Command::Stop`.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, mut commands: mpsc::UnboundedReceiver<Command>) {
    let addr = listener.local_addr().expect("local addr");
    let mut listener = Some(listener);
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                None | Some(Command::Stop) => break,
                Some(Command::SetDown(down, reply)) => {
                    if down {
                        // Closing the listener makes new connections fail
                        // with ECONNREFUSED, as a stopped server does.
                        listener = None;
                        shared.down_tx.send_replace(true);
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while shared.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    } else if listener.is_none() {
                        let deadline = Instant::now() + Duration::from_secs(5);
                        listener = loop {
                            match bind(addr) {
                                Ok(l) => break Some(l),
                                Err(e) if Instant::now() > deadline => {
                                    eprintln!("apiserver: cannot bind {addr} again: {e}");
                                    break None;
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                            }
                        };
                        shared.down_tx.send_replace(false);
                    }
                    let _ = reply.send(());
                }
            },
            accepted = accept(listener.as_ref()), if listener.is_some() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(connection(shared.clone(), stream));
                }
            }
        }
    }
}

struct CountGuard<'a>(&'a AtomicUsize);

impl<'a> CountGuard<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Self(c)
    }
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connection(shared: Arc<Shared>, stream: tokio::net::TcpStream) {
    let _count = CountGuard::new(&shared.connections);
    let mut down = shared.down_tx.subscribe();
    if *down.borrow_and_update() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let s = shared.clone();
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service_fn(move |req| handle(s.clone(), req)));
    tokio::select! {
        _ = conn => {}
        // Dropping the connection closes the socket mid-request or mid-stream.
        _ = down.wait_for(|d| *d) => {}
    }
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Body::Full(Some(Bytes::from(v.to_string()))));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.to_status());
    if let Some(secs) = e.details.as_ref().and_then(|d| d.get("retryAfterSeconds")).and_then(Value::as_u64) {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let record = RequestRecord {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or("").to_owned(),
        user_agent: req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned(),
    };
    lock(&shared.log).push(record);
    let (stall, fail) = {
        let mut f = lock(&shared.faults);
        let fail = if let Some(code) = f.fail_all {
            Some(code)
        } else if f.fail_next > 0 {
            f.fail_next -= 1;
            Some(f.fail_next_code)
        } else {
            None
        };
        (f.stall, fail)
    };
    if !stall.is_zero() {
        tokio::time::sleep(stall).await;
    }
    if let Some(code) = fail {
        return Ok(error_response(&ApiError::injected(code)));
    }
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(error_response(&ApiError::bad_request(format!("cannot read the request body: {e}")))),
    };
    let ctx = Ctx {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        params: parse_query(parts.uri.query().unwrap_or("")),
        headers: parts.headers,
        body,
    };
    Ok(route(&shared, &ctx).await.unwrap_or_else(|e| error_response(&e)))
}

/// `%XX` and `+` decoding of a query component (Go's `url.ParseQuery`).
pub(crate) fn percent_decode(s: &str) -> String {
    let hex = |digit: u8| char::from(digit).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'+' => out.push(b' '),
            b'%' if at + 2 < bytes.len() => match (hex(bytes[at + 1]), hex(bytes[at + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    at += 2;
                }
                _ => out.push(b'%'),
            },
            other => out.push(other),
        }
        at += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

struct Ctx {
    method: Method,
    path: String,
    params: Vec<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
}

impl Ctx {
    fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
    }

    /// `strconv.ParseBool`.
    fn flag(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.param(name) {
            None => Ok(None),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
            Some(v) => Err(ApiError::bad_request(format!("{name}: invalid value {v:?}: strconv.ParseBool: parsing {v:?}: invalid syntax"))),
        }
    }

    fn header(&self, name: header::HeaderName) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    fn json_body(&self) -> Result<Value, ApiError> {
        serde_json::from_slice(&self.body).map_err(|e| ApiError::bad_request(format!("the body of the request could not be decoded as JSON: {e}")))
    }

    fn dry_run(&self) -> Result<bool, ApiError> {
        match self.param("dryRun") {
            None => Ok(false),
            Some("All") => Ok(true),
            Some(v) => Err(ApiError::bad_request(format!("dryRun: Unsupported value: {v:?}: supported values: \"All\""))),
        }
    }
}

/// What the client asked for in `Accept`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Output {
    Object,
    /// `as=Table`; `true` for `meta.k8s.io/v1`, `false` for `v1beta1`.
    Table(bool),
    /// `as=PartialObjectMetadata[List]`.
    Metadata(bool),
}

fn negotiate(accept: &str) -> Output {
    for clause in accept.split(',') {
        let mut parts = clause.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        if !matches!(media, "application/json" | "application/*" | "*/*" | "") {
            continue;
        }
        let params: Vec<(&str, &str)> = parts.filter_map(|p| p.split_once('=')).collect();
        let get = |k: &str| params.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        match (get("as"), get("g")) {
            (None, _) => return Output::Object,
            (Some("Table"), Some("meta.k8s.io")) => return Output::Table(get("v") == Some("v1")),
            (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some("meta.k8s.io")) => {
                return Output::Metadata(get("v") == Some("v1"));
            }
            _ => {}
        }
    }
    Output::Object
}

async fn route(shared: &Arc<Shared>, ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    let segs: Vec<&str> = ctx.path.split('/').filter(|s| !s.is_empty()).collect();
    let get_only = |v: Value| {
        if ctx.method == Method::GET { Ok(json_response(200, &v)) } else { Err(ApiError::method_not_allowed()) }
    };
    match segs.as_slice() {
        ["version"] => get_only(resources::version()),
        ["healthz" | "livez" | "readyz"] => {
            let mut r = Response::new(Body::Full(Some(Bytes::from_static(b"ok"))));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            Ok(r)
        }
        ["api"] => {
            let host = ctx.header(header::HOST).to_owned();
            get_only(resources::api_versions(&host))
        }
        ["api", "v1"] => get_only(resources::resource_list("v1")),
        ["apis"] => get_only(resources::api_group_list()),
        ["apis", group] if resources::GROUPS.contains(group) => get_only(resources::api_group(group)),
        ["apis", group, "v1"] if resources::GROUPS.contains(group) => get_only(resources::resource_list(&format!("{group}/v1"))),
        ["openapi", "v2"] => Ok(openapi_v2(ctx)),
        ["api", "v1", rest @ ..] => resource(shared, ctx, "v1", rest).await,
        ["apis", group, "v1", rest @ ..] => resource(shared, ctx, &format!("{group}/v1"), rest).await,
        _ => Err(ApiError::no_such_path()),
    }
}

/// An empty `OpenAPI` v2 document: clients that validate against it find no
/// schema for any kind and skip client-side validation (as `kubectl create`
/// does for kinds a server does not describe).
fn openapi_v2(ctx: &Ctx) -> Response<Body> {
    if ctx.header(header::ACCEPT).contains("protobuf") {
        // An empty protobuf message is a valid, empty `openapi_v2.Document`.
        let mut r = Response::new(Body::Full(None));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/com.github.proto-openapi.spec.v2.v1.0+protobuf"),
        );
        return r;
    }
    json_response(200, &json!({
        "swagger": "2.0",
        "info": { "title": "Kubernetes", "version": resources::version()["gitVersion"] },
        "paths": {},
        "definitions": {},
    }))
}

#[expect(clippy::too_many_lines, reason = "one match over the REST verbs, as the real handler table")]
async fn resource(shared: &Arc<Shared>, ctx: &Ctx, gv: &str, rest: &[&str]) -> Result<Response<Body>, ApiError> {
    let (watch_path, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => (Some(*ns), [&[*plural][..], rest].concat()),
        _ => (None, rest.to_vec()),
    };
    let Some((plural, tail)) = rest.split_first() else {
        return Err(ApiError::no_such_path());
    };
    let kind = Kind::from_path(gv, plural).ok_or_else(ApiError::no_such_path)?;
    // Namespaced kinds are listed and watched across namespaces at
    // `/<prefix>/<plural>`; everything else about them lives under a namespace.
    let all_namespaces = kind.namespaced() && ns.is_none();
    if (all_namespaces && !(tail.is_empty() && ctx.method == Method::GET)) || (!kind.namespaced() && ns.is_some()) {
        return Err(ApiError::no_such_path());
    }
    let (name, status) = match tail {
        [] => (None, false),
        [n] => (Some(*n), false),
        [n, "status"] if kind.has_status() => (Some(*n), true),
        _ => return Err(ApiError::no_such_path()),
    };
    let ns_str = ns.unwrap_or("");
    if ctx.method != Method::GET && lock(&shared.faults).forbidden_writes.contains(&kind) {
        let verb = match (&ctx.method, name) {
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (_, None) => "deletecollection",
            _ => "delete",
        };
        return Err(ApiError::forbidden(kind, verb, ns));
    }
    let watch = watch_path || ctx.flag("watch")?.unwrap_or(false);
    let output = negotiate(ctx.header(header::ACCEPT));

    match (&ctx.method, name) {
        (&Method::GET, None) if watch => start_watch(shared, ctx, kind, ns, None, output),
        (&Method::GET, Some(n)) if watch => start_watch(shared, ctx, kind, ns, Some(n), output),
        (&Method::GET, None) => list(shared, ctx, kind, ns, output).await,
        (&Method::GET, Some(n)) => {
            if let Some(rv) = ctx.param("resourceVersion").map(parse_rv).transpose()? {
                wait_for_rv(shared, rv).await?;
            }
            let obj = lock(&shared.store).get(kind, ns_str, n).cloned().ok_or_else(|| ApiError::not_found(kind, n))?;
            Ok(json_response(200, &render_one(kind, &obj, output, ctx)))
        }
        (&Method::POST, None) if ns.is_some() || !kind.namespaced() => {
            let obj = ctx.json_body()?;
            let created = write(shared, ctx, |s| s.create(kind, ns_str, obj, Writer::Main))?;
            Ok(json_response(201, &render_one(kind, &created, output, ctx)))
        }
        (&Method::PUT, Some(n)) => {
            let obj = ctx.json_body()?;
            let writer = if status { Writer::Status } else { Writer::Main };
            let updated = write(shared, ctx, |s| s.update(kind, ns_str, n, obj, writer))?;
            Ok(json_response(200, &render_one(kind, &updated, output, ctx)))
        }
        (&Method::PATCH, Some(n)) => {
            let patch_body = ctx.json_body()?;
            let content_type = ctx.header(header::CONTENT_TYPE).split(';').next().unwrap_or("").trim().to_owned();
            let writer = if status { Writer::Status } else { Writer::Main };
            let updated = write(shared, ctx, |s| {
                let mut obj = s.get(kind, ns_str, n).cloned().ok_or_else(|| ApiError::not_found(kind, n))?;
                let fail = |e: String| ApiError::bad_request(e);
                match content_type.as_str() {
                    "application/merge-patch+json" => patch::merge_patch(&mut obj, &patch_body),
                    "application/strategic-merge-patch+json" => {
                        patch::strategic_merge_patch(kind, &mut obj, &patch_body).map_err(fail)?;
                    }
                    "application/json-patch+json" => patch::json_patch(&mut obj, &patch_body).map_err(fail)?,
                    other => return Err(ApiError::unsupported_media_type(other)),
                }
                s.update(kind, ns_str, n, obj, writer)
            })?;
            Ok(json_response(200, &render_one(kind, &updated, output, ctx)))
        }
        (&Method::DELETE, Some(n)) => {
            let pre = delete_options(ctx)?;
            let deleted = write(shared, ctx, |s| s.delete(kind, ns_str, n, &pre))?;
            // Services answer with the deleted object, the others with a Status.
            let gone = lock(&shared.store).get(kind, ns_str, n).is_none();
            if kind == Kind::Service || !gone {
                Ok(json_response(200, &render_one(kind, &deleted, output, ctx)))
            } else {
                let mut details = json!({ "name": n, "kind": kind.plural(), "uid": deleted.pointer("/metadata/uid") });
                if !kind.group().is_empty() {
                    details["group"] = json!(kind.group());
                }
                Ok(json_response(200, &json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details,
                })))
            }
        }
        (&Method::DELETE, None) if ns.is_some() || !kind.namespaced() => {
            let pre = delete_options(ctx)?;
            let q = list_query(ctx, kind, ns)?;
            let deleted = write(shared, ctx, |s| -> Result<Vec<Value>, ApiError> {
                let names: Vec<(String, String)> = s
                    .list(kind, &ListQuery { limit: None, continue_token: None, ..q })?
                    .items
                    .iter()
                    .map(|o| {
                        let m = |f: &str| o.pointer(&format!("/metadata/{f}")).and_then(Value::as_str).unwrap_or("").to_owned();
                        (m("namespace"), m("name"))
                    })
                    .collect();
                names.iter().map(|(ns, name)| s.delete(kind, ns, name, &pre)).collect()
            })?;
            Ok(json_response(200, &json!({
                "kind": kind.list_kind(),
                "apiVersion": kind.api_version(),
                "metadata": { "resourceVersion": lock(&shared.store).resource_version().to_string() },
                "items": deleted.into_iter().map(strip_type_meta).collect::<Vec<_>>(),
            })))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// A write, or with `dryRun=All` the same write on a copy of the store.
fn write<T>(shared: &Shared, ctx: &Ctx, f: impl FnOnce(&mut Store) -> Result<T, ApiError>) -> Result<T, ApiError> {
    if ctx.dry_run()? {
        let mut copy = lock(&shared.store).clone();
        return f(&mut copy);
    }
    shared.write(f)
}

fn delete_options(ctx: &Ctx) -> Result<Preconditions, ApiError> {
    ctx.dry_run()?;
    if ctx.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Preconditions::default());
    }
    let o = ctx.json_body()?;
    let s = |p: &str| o.pointer(p).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
    Ok(Preconditions { uid: s("/preconditions/uid"), resource_version: s("/preconditions/resourceVersion") })
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse().map_err(|_| ApiError::bad_request(format!("resourceVersion: Invalid value: {s:?}: must be a non-negative integer")))
}

/// A read at a resourceVersion newer than the store's waits up to 3 s for
/// it, then fails with 504 `ResourceVersionTooLarge`, as the cacher does.
async fn wait_for_rv(shared: &Shared, rv: u64) -> Result<(), ApiError> {
    let mut rx = shared.rv_tx.subscribe();
    let current = || lock(&shared.store).resource_version();
    let wait = tokio::time::timeout(Duration::from_secs(3), async {
        while current() < rv {
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
    if wait.await.is_err() || current() < rv {
        return Err(ApiError::too_large_resource_version(rv, current()));
    }
    Ok(())
}

fn list_query(ctx: &Ctx, kind: Kind, ns: Option<&str>) -> Result<ListQuery, ApiError> {
    let limit = ctx
        .param("limit")
        .map(|l| l.parse::<i64>().map_err(|_| ApiError::bad_request(format!("limit: Invalid value: {l:?}"))))
        .transpose()?;
    let rv_match = ctx.param("resourceVersionMatch").map(str::to_owned);
    if let Some(m) = &rv_match {
        if !["Exact", "NotOlderThan"].contains(&m.as_str()) {
            return Err(ApiError::bad_request(format!(
                "resourceVersionMatch: Unsupported value: {m:?}: supported values: \"Exact\", \"NotOlderThan\""
            )));
        }
        if ctx.param("resourceVersion").is_none() {
            return Err(ApiError::bad_request("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided"));
        }
    }
    Ok(ListQuery {
        namespace: ns.map(str::to_owned),
        labels: LabelSelector::parse(ctx.param("labelSelector").unwrap_or(""))?,
        fields: FieldSelector::parse(ctx.param("fieldSelector").unwrap_or(""), kind)?,
        limit: limit.and_then(|l| usize::try_from(l).ok()),
        continue_token: ctx.param("continue").map(str::to_owned),
        resource_version: ctx.param("resourceVersion").map(parse_rv).transpose()?,
        resource_version_match: rv_match,
    })
}

async fn list(shared: &Arc<Shared>, ctx: &Ctx, kind: Kind, ns: Option<&str>, output: Output) -> Result<Response<Body>, ApiError> {
    let q = list_query(ctx, kind, ns)?;
    if let Some(rv) = q.resource_version
        && q.resource_version_match.as_deref() != Some("Exact")
        && q.continue_token.is_none()
    {
        wait_for_rv(shared, rv).await?;
    }
    let r = lock(&shared.store).list(kind, &q)?;
    let mut meta = json!({ "resourceVersion": r.resource_version.to_string() });
    if let Some(c) = &r.continue_token {
        meta["continue"] = json!(c);
    }
    if let Some(n) = r.remaining {
        meta["remainingItemCount"] = json!(n);
    }
    let body = match output {
        Output::Table(v1) => table(kind, &r.items, &meta, v1, true, ctx),
        Output::Metadata(v1) => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": meta_api_version(v1),
            "metadata": meta,
            "items": r.items.iter().map(|o| partial(o, v1)).collect::<Vec<_>>(),
        }),
        // List items carry no kind/apiVersion, as the real server writes them.
        Output::Object => json!({
            "kind": kind.list_kind(),
            "apiVersion": kind.api_version(),
            "metadata": meta,
            "items": r.items.into_iter().map(strip_type_meta).collect::<Vec<_>>(),
        }),
    };
    Ok(json_response(200, &body))
}

fn strip_type_meta(mut v: Value) -> Value {
    if let Some(m) = v.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    v
}

fn meta_api_version(v1: bool) -> &'static str {
    if v1 { "meta.k8s.io/v1" } else { "meta.k8s.io/v1beta1" }
}

fn partial(obj: &Value, v1: bool) -> Value {
    json!({ "kind": "PartialObjectMetadata", "apiVersion": meta_api_version(v1), "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})) })
}

fn render_one(kind: Kind, obj: &Value, output: Output, ctx: &Ctx) -> Value {
    match output {
        Output::Object => obj.clone(),
        Output::Metadata(v1) => partial(obj, v1),
        Output::Table(v1) => table(
            kind,
            std::slice::from_ref(obj),
            &json!({ "resourceVersion": object_rv(obj).to_string() }),
            v1,
            true,
            ctx,
        ),
    }
}

/// A `meta.k8s.io` Table; rows carry the object as `includeObject` asks
/// (default: `PartialObjectMetadata`).
fn table(kind: Kind, objs: &[Value], meta: &Value, v1: bool, columns: bool, ctx: &Ctx) -> Value {
    let now = jiff::Timestamp::now();
    let include = ctx.param("includeObject").unwrap_or("Metadata");
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let mut row = json!({ "cells": resources::table_cells(kind, o, now) });
            match include {
                "None" => {}
                "Object" => row["object"] = o.clone(),
                _ => row["object"] = partial(o, v1),
            }
            row
        })
        .collect();
    let mut t = json!({ "kind": "Table", "apiVersion": meta_api_version(v1), "metadata": meta.clone(), "rows": rows });
    if columns {
        t["columnDefinitions"] = json!(resources::table_columns(kind));
    }
    t
}

struct WatchSpec {
    kind: Kind,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    resource_version: Option<u64>,
    timeout: Duration,
    bookmarks: bool,
    initial_events: bool,
    output: Output,
    include_object: String,
}

impl WatchSpec {
    fn selects(&self, obj: &Value) -> bool {
        self.labels.matches(obj.pointer("/metadata/labels").and_then(Value::as_object)) && self.fields.matches(self.kind, obj)
    }

    /// The event this watcher sees for a write, as the cacher's
    /// `convertToWatchEvent` decides it: an object that stops matching the
    /// selectors is DELETED (its old content, the new resourceVersion), one
    /// that starts matching is ADDED.
    fn convert(&self, e: &Event) -> Option<(EventType, Value)> {
        if e.key.0 != self.kind || self.ns.as_ref().is_some_and(|ns| *ns != e.key.1) {
            return None;
        }
        match e.ty {
            EventType::Added => self.selects(&e.object).then(|| (EventType::Added, e.object.clone())),
            EventType::Deleted => self.selects(&e.object).then(|| (EventType::Deleted, e.object.clone())),
            EventType::Modified => {
                let now = self.selects(&e.object);
                let before = e.prev.as_ref().is_some_and(|p| self.selects(p));
                match (before, now) {
                    (true, true) => Some((EventType::Modified, e.object.clone())),
                    (false, true) => Some((EventType::Added, e.object.clone())),
                    (true, false) => {
                        let mut old = e.prev.clone().expect("prev");
                        old["metadata"]["resourceVersion"] = json!(e.rv.to_string());
                        Some((EventType::Deleted, old))
                    }
                    (false, false) => None,
                }
            }
        }
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({ "resourceVersion": rv.to_string() });
        if initial_end {
            meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        line("BOOKMARK", &json!({ "kind": self.kind.kind(), "apiVersion": self.kind.api_version(), "metadata": meta }))
    }
}

fn line(ty: &str, obj: &Value) -> Bytes {
    let mut s = json!({ "type": ty, "object": obj }).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn start_watch(
    shared: &Arc<Shared>,
    ctx: &Ctx,
    kind: Kind,
    ns: Option<&str>,
    name: Option<&str>,
    output: Output,
) -> Result<Response<Body>, ApiError> {
    let mut q = list_query(ctx, kind, ns)?;
    if let Some(n) = name {
        // `/watch/.../NAME` is a watch with `metadata.name=NAME`.
        let sel = match ctx.param("fieldSelector") {
            Some(s) => format!("{s},metadata.name={n}"),
            None => format!("metadata.name={n}"),
        };
        q.fields = FieldSelector::parse(&sel, kind)?;
    }
    let initial_events = ctx.flag("sendInitialEvents")?;
    let bookmarks = ctx.flag("allowWatchBookmarks")?.unwrap_or(false);
    match (initial_events, q.resource_version_match.as_deref()) {
        (Some(true), m) => {
            if m != Some("NotOlderThan") {
                return Err(ApiError::bad_request("resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"));
            }
            if !bookmarks {
                return Err(ApiError::bad_request("allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true"));
            }
        }
        (_, Some(_)) => {
            return Err(ApiError::bad_request("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"));
        }
        _ => {}
    }
    let timeout = match ctx.param("timeoutSeconds") {
        Some(t) => Duration::from_secs(t.parse().map_err(|_| ApiError::bad_request(format!("timeoutSeconds: Invalid value: {t:?}")))?),
        None => shared.opts.default_watch_timeout,
    };
    let spec = WatchSpec {
        kind,
        ns: q.namespace,
        labels: q.labels,
        fields: q.fields,
        resource_version: q.resource_version,
        timeout,
        bookmarks,
        initial_events: initial_events.unwrap_or(false),
        output,
        include_object: ctx.param("includeObject").unwrap_or("Metadata").to_owned(),
    };
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(run_watch(shared.clone(), spec, tx));
    let mut r = Response::new(Body::Stream(rx));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    Ok(r)
}

type Tx = mpsc::Sender<Result<Bytes, io::Error>>;

struct Emitter {
    tx: Tx,
    first_table: bool,
}

impl Emitter {
    async fn send(&mut self, b: Bytes) -> bool {
        self.tx.send(Ok(b)).await.is_ok()
    }

    async fn event(&mut self, w: &WatchSpec, ty: EventType, obj: &Value) -> bool {
        let obj = match w.output {
            Output::Object => obj.clone(),
            Output::Metadata(v1) => partial(obj, v1),
            Output::Table(v1) => {
                // Column definitions go with the first event only.
                let now = jiff::Timestamp::now();
                let mut row = json!({ "cells": resources::table_cells(w.kind, obj, now) });
                match w.include_object.as_str() {
                    "None" => {}
                    "Object" => row["object"] = obj.clone(),
                    _ => row["object"] = partial(obj, v1),
                }
                let mut t = json!({
                    "kind": "Table",
                    "apiVersion": meta_api_version(v1),
                    "metadata": { "resourceVersion": object_rv(obj).to_string() },
                    "rows": [row],
                });
                t["columnDefinitions"] = if self.first_table { json!(resources::table_columns(w.kind)) } else { json!([]) };
                self.first_table = false;
                t
            }
        };
        self.send(line(ty.as_str(), &obj)).await
    }
}

async fn run_watch(shared: Arc<Shared>, w: WatchSpec, tx: Tx) {
    let _count = CountGuard::new(&shared.open_watches);
    let deadline = Instant::now() + w.timeout;
    let mut rv_rx = shared.rv_tx.subscribe();
    let mut drop_rx = shared.drop_tx.subscribe();
    let mut out = Emitter { tx, first_table: true };
    let interval = shared.opts.bookmark_interval.max(Duration::from_millis(10));
    let mut next_bookmark = Instant::now() + interval;

    // Where the stream starts: the current state as ADDED events (no
    // resourceVersion, "0", or sendInitialEvents), else the events after it.
    let initial: Result<(Vec<Value>, u64), ApiError> = {
        let s = lock(&shared.store);
        match w.resource_version {
            None | Some(0) => Ok((s.current(w.kind, w.ns.as_deref()).filter(|o| w.selects(o)).cloned().collect(), s.resource_version())),
            Some(rv) if w.initial_events => {
                if rv > s.resource_version() {
                    Err(ApiError::too_large_resource_version(rv, s.resource_version()))
                } else {
                    Ok((s.current(w.kind, w.ns.as_deref()).filter(|o| w.selects(o)).cloned().collect(), s.resource_version()))
                }
            }
            Some(rv) => s.events_after(rv).map(|_| (Vec::new(), rv)),
        }
    };
    let mut last = match initial {
        Ok((objs, rv)) => {
            for o in &objs {
                if !out.event(&w, EventType::Added, o).await {
                    return;
                }
            }
            if w.initial_events && !out.send(w.bookmark(rv, true)).await {
                return;
            }
            rv
        }
        Err(e) => {
            // HTTP 200, then an ERROR event: what makes clients re-list.
            let _ = out.send(line("ERROR", &e.to_status())).await;
            return;
        }
    };
    loop {
        rv_rx.borrow_and_update();
        let batch: Result<(Vec<(EventType, Value)>, u64), ApiError> = {
            let s = lock(&shared.store);
            s.events_after(last).map(|evs| (evs.filter_map(|e| w.convert(e)).collect(), s.resource_version()))
        };
        match batch {
            Ok((events, rv)) => {
                for (ty, obj) in &events {
                    if !out.event(&w, *ty, obj).await {
                        return;
                    }
                }
                last = rv;
            }
            Err(e) => {
                // A watcher that fell behind the history: the cacher closes it
                // and the resume gets 410; here it gets the 410 at once.
                let _ = out.send(line("ERROR", &e.to_status())).await;
                return;
            }
        }
        tokio::select! {
            changed = rv_rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(next_bookmark), if w.bookmarks => {
                next_bookmark = Instant::now() + interval;
                if !out.send(w.bookmark(last, false)).await {
                    return;
                }
            }
            () = tokio::time::sleep_until(deadline) => return,
            _ = drop_rx.changed() => {
                // An error from the body makes hyper abort the connection
                // without the last chunk: the client sees a broken stream.
                let _ = out.tx.send(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "watch dropped by the test"))).await;
                return;
            }
            () = out.tx.closed() => return,
        }
    }
}
