//! kube-proxy's service health server (`ServiceHealthServer`,
//! `pkg/proxy/healthcheck/service_health.go`): for every Service of type
//! `LoadBalancer` with `externalTrafficPolicy: Local`, an HTTP server on its
//! `healthCheckNodePort` tells load balancers whether this node has local
//! endpoints for it.
//!
//! - One listener per bind address: the addresses `--nodeport-addresses`
//!   selects, or all addresses when it is unset (`[::]` dual-stack, as Go
//!   listens for `0.0.0.0`; `0.0.0.0` where the kernel has no IPv6). Sockets
//!   use `SO_REUSEADDR`, as Go's listeners do.
//! - Any method and path answers `Content-Type: application/json`,
//!   `X-Content-Type-Options: nosniff`, `X-Load-Balancing-Endpoint-Weight:
//!   <n>` (kube-proxy ≥ 1.28, kubernetes/kubernetes#118999), status 200 when
//!   the Service has local ready endpoints and the proxier is healthy, else
//!   503, and the body kube-proxy writes byte for byte (see [`body`]).
//! - [`ServiceHealthServer::sync_services`] opens listeners for new Services,
//!   closes those of Services gone or whose port changed (closed before any
//!   is opened, so ports can move between Services in one sync), and leaves
//!   the others alone. A port that cannot be bound is logged naming the
//!   Service and port, closes whatever that Service had opened, is returned
//!   to the caller, does not affect any other Service, and is retried on the
//!   next sync (kube-proxy does the same; it also posts an Event).
//! - [`ServiceHealthServer::sync_endpoints`] sets the local endpoint counts:
//!   listed Services get their count, open Services not listed get 0,
//!   Services that are not open are ignored. A newly opened Service counts 0
//!   until the next `sync_endpoints`, as in kube-proxy, which calls both in
//!   that order after each sync.
//! - The proxier's health is a closure asked on every request (kube-proxy's
//!   `healthzServer.Health().Healthy`: a queued change not programmed within
//!   the health timeout; node eligibility does not count here).
//!
//! Closing stops accepting at once and the port is free when `sync_services`
//! returns; open keep-alive connections are shut down gracefully (idle ones
//! at once, one in flight after its answer), where Go's `Server.Close` cuts
//! them. A request on a listener being closed answers with the last counts
//! (kube-proxy answers an empty 200 in that window; unreachable here).
use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio::{net::TcpSocket, sync::oneshot, task::JoinHandle};
use tracing::{debug, error, info, warn};

use crate::store::ObjectKey;

/// Whether the proxier is healthy, asked on every request.
pub type ProxierHealthy = Arc<dyn Fn() -> bool + Send + Sync>;

/// The header kube-proxy adds for weighted load balancing.
pub const ENDPOINT_WEIGHT_HEADER: &str = "x-load-balancing-endpoint-weight";

/// How long closing waits for a listener's task to let go of its socket.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Listen backlog (the kernel caps it at `net.core.somaxconn`, as Go uses).
const BACKLOG: u32 = 4096;

/// A Service's health check port that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("failed to start healthcheck \"{service}\" on port {port}: listen on {addr}: {source}")]
pub struct ListenError {
    pub service: ObjectKey,
    pub port: u16,
    /// The address whose bind failed.
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// What a Service's listeners read.
struct HealthCheck {
    service: ObjectKey,
    endpoints: AtomicUsize,
    healthy: ProxierHealthy,
}

struct Listener {
    addr: SocketAddr,
    /// Dropping it starts the graceful shutdown of the connections.
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

struct Instance {
    port: u16,
    state: Arc<HealthCheck>,
    listeners: Vec<Listener>,
}

/// The health check servers of all `externalTrafficPolicy: Local` Services.
/// Owned by the agent; needs a tokio runtime. Dropping it stops every
/// listener.
pub struct ServiceHealthServer {
    /// `None`: all addresses.
    bind_ips: Vec<Option<IpAddr>>,
    healthy: ProxierHealthy,
    services: BTreeMap<ObjectKey, Instance>,
}

impl std::fmt::Debug for ServiceHealthServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHealthServer")
            .field("bind_ips", &self.bind_ips)
            .field("services", &self.services.iter().map(|(k, i)| (k, i.port)).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ServiceHealthServer {
    /// `bind_ips`: the node addresses `--nodeport-addresses` selects; empty
    /// (or holding an unspecified address) for all addresses.
    /// `proxier_healthy`: asked on every request.
    pub fn new(bind_ips: &[IpAddr], proxier_healthy: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        let mut ips: Vec<IpAddr> = bind_ips.to_vec();
        ips.sort_unstable();
        ips.dedup();
        // Why: a wildcard and a specific address cannot both listen on one
        // port; the wildcard covers them all.
        let bind_ips = if ips.is_empty() || ips.iter().any(IpAddr::is_unspecified) {
            vec![None]
        } else {
            ips.into_iter().map(Some).collect()
        };
        Self { bind_ips, healthy: Arc::new(proxier_healthy), services: BTreeMap::new() }
    }

    /// Makes the given Services (→ their `healthCheckNodePort`) the open
    /// ones. Returns the ports that could not be opened (already logged;
    /// retried on the next call). Port 0 means no health check.
    pub async fn sync_services(&mut self, services: BTreeMap<ObjectKey, u16>) -> Vec<ListenError> {
        let gone: Vec<ObjectKey> = self
            .services
            .iter()
            .filter(|(svc, inst)| services.get(*svc) != Some(&inst.port))
            .map(|(svc, _)| svc.clone())
            .collect();
        for svc in gone {
            if let Some(inst) = self.services.remove(&svc) {
                info!(service = %svc, port = inst.port, "closing healthcheck");
                close_all(inst.listeners).await;
            }
        }
        let mut errors = Vec::new();
        for (svc, port) in services {
            if port == 0 || self.services.contains_key(&svc) {
                continue;
            }
            info!(service = %svc, port, "opening healthcheck");
            match self.open(&svc, port).await {
                Ok(inst) => {
                    self.services.insert(svc, inst);
                }
                Err(e) => {
                    error!(
                        service = %e.service,
                        port = e.port,
                        addr = %e.addr,
                        error = %e.source,
                        "failed to start healthcheck; will retry on the next sync"
                    );
                    errors.push(e);
                }
            }
        }
        errors
    }

    /// Sets the number of local ready endpoints of each open Service (0 for
    /// those not listed; Services not open are ignored).
    pub fn sync_endpoints(&self, endpoints: &BTreeMap<ObjectKey, usize>) {
        for (svc, inst) in &self.services {
            let n = endpoints.get(svc).copied().unwrap_or(0);
            if inst.state.endpoints.swap(n, Ordering::Relaxed) != n {
                debug!(service = %svc, local_endpoints = n, "reporting endpoints for healthcheck");
            }
        }
    }

    /// The port a Service's health check listens on, when open.
    pub fn port(&self, service: &ObjectKey) -> Option<u16> {
        self.services.get(service).map(|i| i.port)
    }

    /// The open Services and their ports.
    pub fn open_services(&self) -> impl Iterator<Item = (&ObjectKey, u16)> {
        self.services.iter().map(|(k, i)| (k, i.port))
    }

    async fn open(&self, service: &ObjectKey, port: u16) -> Result<Instance, ListenError> {
        let state = Arc::new(HealthCheck {
            service: service.clone(),
            endpoints: AtomicUsize::new(0),
            healthy: Arc::clone(&self.healthy),
        });
        let mut listeners = Vec::with_capacity(self.bind_ips.len());
        for ip in &self.bind_ips {
            match listen(*ip, port) {
                Ok(listener) => listeners.push(spawn(listener, Arc::clone(&state))),
                Err((addr, source)) => {
                    // Close what was opened, so the next sync retries it all.
                    close_all(listeners).await;
                    return Err(ListenError { service: service.clone(), port, addr, source });
                }
            }
        }
        Ok(Instance { port, state, listeners })
    }
}

impl Drop for ServiceHealthServer {
    fn drop(&mut self) {
        for inst in self.services.values() {
            for l in &inst.listeners {
                l.task.abort();
            }
        }
    }
}

/// The body kube-proxy writes: its Go template
/// ```text
/// {
///     "service": {
///         "namespace": %q,
///         "name": %q
///     },
///     "localEndpoints": %d,
///     "serviceProxyHealthy": %v
/// }
/// ```
/// passed through `dedent.Dedent` and `strings.Trim(_, "\n")`: tab-indented,
/// no trailing newline. Names are quoted as JSON strings, the same bytes as
/// Go's `%q` for every valid Kubernetes name.
pub fn body(service: &ObjectKey, local_endpoints: usize, proxy_healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        json_string(&service.namespace),
        json_string(&service.name),
    )
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

async fn answer(State(hc): State<Arc<HealthCheck>>) -> Response {
    let count = hc.endpoints.load(Ordering::Relaxed);
    let healthy = (hc.healthy)();
    let status = if count != 0 && healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        status,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (HeaderName::from_static(ENDPOINT_WEIGHT_HEADER), HeaderValue::from(count)),
        ],
        body(&hc.service, count, healthy),
    )
        .into_response()
}

fn spawn(listener: tokio::net::TcpListener, state: Arc<HealthCheck>) -> Listener {
    let addr = listener.local_addr().unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let (stop, stopped) = oneshot::channel::<()>();
    let service = state.service.clone();
    let router = Router::new().fallback(answer).with_state(state);
    let task = tokio::spawn(async move {
        debug!(service = %service, %addr, "serving healthcheck");
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
            error!(service = %service, %addr, error = %e, "healthcheck server stopped");
        }
    });
    Listener { addr, stop, task }
}

/// Stops accepting on every listener and waits until each has let go of its
/// socket (the port is free on return). Connections finish gracefully in the
/// background.
async fn close_all(listeners: Vec<Listener>) {
    for Listener { addr, stop, mut task } in listeners {
        drop(stop);
        task.abort();
        if tokio::time::timeout(CLOSE_WAIT, &mut task).await.is_err() {
            warn!(%addr, "healthcheck listener did not stop in time");
        }
    }
}

/// Binds one listener; `None` is all addresses.
fn listen(ip: Option<IpAddr>, port: u16) -> Result<tokio::net::TcpListener, (SocketAddr, io::Error)> {
    if let Some(ip) = ip {
        return listen_on(SocketAddr::new(ip, port), false);
    }
    match listen_on(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true) {
        // No IPv6 in this kernel: IPv4 only.
        Err((_, e)) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            listen_on(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), false)
        }
        r => r,
    }
}

fn listen_on(addr: SocketAddr, dual_stack: bool) -> Result<tokio::net::TcpListener, (SocketAddr, io::Error)> {
    let bind = || {
        let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        sock.set_reuseaddr(true)?;
        if dual_stack {
            set_ipv6_only(&sock, false)?;
        }
        sock.bind(addr)?;
        sock.listen(BACKLOG)
    };
    bind().map_err(|e| (addr, e))
}

fn set_ipv6_only(sock: &TcpSocket, on: bool) -> io::Result<()> {
    let value = libc::c_int::from(on);
    let len = libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("c_int size fits socklen_t");
    // SAFETY: the descriptor is open for the lifetime of `sock`; the option
    // value points to a c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(sock.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, (&raw const value).cast(), len)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use tokio::{net::TcpStream, time::timeout};

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);
    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    fn svc(ns: &str, name: &str) -> ObjectKey {
        ObjectKey::new(ns, name)
    }

    /// A port that was free a moment ago (bound to :0, read, released).
    fn free_port(ip: IpAddr) -> u16 {
        std::net::TcpListener::bind((ip, 0)).expect("bind :0").local_addr().expect("local addr").port()
    }

    fn server(bind: &[IpAddr]) -> (ServiceHealthServer, Arc<AtomicBool>) {
        let healthy = Arc::new(AtomicBool::new(true));
        let h = Arc::clone(&healthy);
        (ServiceHealthServer::new(bind, move || h.load(Ordering::Relaxed)), healthy)
    }

    // tokio's `io-util` feature is not enabled in the workspace: read and
    // write with readiness + try_read/try_write.
    async fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            s.readable().await?;
            match s.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
        }
    }

    async fn write_all(s: &TcpStream, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            s.writable().await?;
            match s.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads one response (headers, then `Content-Length` bytes unless it
    /// answers a HEAD).
    async fn read_reply(s: &TcpStream, no_body: bool) -> io::Result<Reply> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = read_some(s, &mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the headers"));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .expect("a content-length");
        let mut body = buf[head_end + 4..].to_vec();
        while !no_body && body.len() < len {
            let n = read_some(s, &mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in the body"));
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Ok(Reply { status, headers, body: String::from_utf8(body).expect("utf-8 body") })
    }

    async fn request(addr: SocketAddr, method: &str, path: &str) -> io::Result<Reply> {
        timeout(WAIT, async {
            let s = TcpStream::connect(addr).await?;
            let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            write_all(&s, req.as_bytes()).await?;
            read_reply(&s, method == "HEAD").await
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))?
    }

    async fn get(port: u16) -> Reply {
        let addr = SocketAddr::new(LOCALHOST, port);
        request(addr, "GET", "/").await.unwrap_or_else(|e| panic!("GET http://{addr}/: {e}"))
    }

    /// Connecting is refused (the listener is gone), within a bounded wait.
    async fn assert_closed(addr: SocketAddr) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match timeout(WAIT, TcpStream::connect(addr)).await {
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => return,
                other => assert!(tokio::time::Instant::now() < deadline, "{addr} still open: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn expected(ns: &str, name: &str, n: usize, healthy: bool) -> String {
        format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": \"{ns}\",\n\t\t\"name\": \"{name}\"\n\t}},\n\t\"localEndpoints\": {n},\n\t\"serviceProxyHealthy\": {healthy}\n}}"
        )
    }

    #[test]
    fn the_body_is_kube_proxys_dedented_template() {
        // What `strings.Trim(dedent.Dedent(fmt.Sprintf(tmpl, ...)), "\n")` yields.
        assert_eq!(
            body(&svc("default", "web"), 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&body(&svc("ns", "a\"b"), 0, false)).expect("valid JSON");
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "ns", "name": "a\"b"}, "localEndpoints": 0, "serviceProxyHealthy": false})
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_like_kube_proxy() {
        let (mut hcs, healthy) = server(&[LOCALHOST]);
        let port = free_port(LOCALHOST);
        let web = svc("default", "web");
        let errs = hcs.sync_services(BTreeMap::from([(web.clone(), port)])).await;
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(hcs.port(&web), Some(port));

        // No local endpoints yet.
        let r = get(port).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("0"));
        assert_eq!(r.body, expected("default", "web", 0, true));

        // Two local endpoints: 200, on any path and method.
        hcs.sync_endpoints(&BTreeMap::from([(web.clone(), 2), (svc("default", "not-open"), 5)]));
        let r = get(port).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("2"));
        assert_eq!(r.body, expected("default", "web", 2, true));
        for (method, path) in [("GET", "/healthz"), ("GET", "/any/path?x=1"), ("POST", "/"), ("HEAD", "/")] {
            let r = request(SocketAddr::new(LOCALHOST, port), method, path).await.expect(path);
            assert_eq!(r.status, 200, "{method} {path}");
            if method != "HEAD" {
                assert_eq!(r.body, expected("default", "web", 2, true), "{method} {path}");
            }
        }

        // The proxier unhealthy: 503 even with endpoints.
        healthy.store(false, Ordering::Relaxed);
        let r = get(port).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body, expected("default", "web", 2, false));
        healthy.store(true, Ordering::Relaxed);
        assert_eq!(get(port).await.status, 200);

        // Not listed any more: 0 local endpoints.
        hcs.sync_endpoints(&BTreeMap::new());
        let r = get(port).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body, expected("default", "web", 0, true));

        // The same Services again: nothing reopened (the count survives).
        hcs.sync_endpoints(&BTreeMap::from([(web.clone(), 1)]));
        assert!(hcs.sync_services(BTreeMap::from([(web.clone(), port)])).await.is_empty());
        assert_eq!(get(port).await.status, 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removing_a_service_closes_its_port_and_its_connections() {
        let (mut hcs, _) = server(&[LOCALHOST]);
        let (pa, pb) = (free_port(LOCALHOST), free_port(LOCALHOST));
        let (a, b) = (svc("ns", "a"), svc("ns", "b"));
        assert!(hcs.sync_services(BTreeMap::from([(a.clone(), pa), (b.clone(), pb)])).await.is_empty());
        hcs.sync_endpoints(&BTreeMap::from([(a.clone(), 1), (b.clone(), 3)]));

        // A keep-alive connection to a.
        let a_addr = SocketAddr::new(LOCALHOST, pa);
        let conn = timeout(WAIT, TcpStream::connect(a_addr)).await.expect("in time").expect("connect");
        let req = format!("GET / HTTP/1.1\r\nHost: {a_addr}\r\n\r\n");
        timeout(WAIT, write_all(&conn, req.as_bytes())).await.expect("in time").expect("write");
        let r = timeout(WAIT, read_reply(&conn, false)).await.expect("in time").expect("reply");
        assert_eq!(r.status, 200);

        assert!(hcs.sync_services(BTreeMap::from([(b.clone(), pb)])).await.is_empty());
        assert_eq!(hcs.port(&a), None);
        // Closed when sync_services returns, not eventually.
        match timeout(WAIT, TcpStream::connect(a_addr)).await.expect("in time") {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            Ok(_) => panic!("{a_addr} still accepts after the Service was removed"),
        }
        // The idle keep-alive connection is closed too.
        let mut buf = [0u8; 64];
        let n = timeout(WAIT, read_some(&conn, &mut buf)).await.expect("closed in time");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

        let r = get(pb).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, expected("ns", "b", 3, true));

        // Everything removed.
        assert!(hcs.sync_services(BTreeMap::new()).await.is_empty());
        assert_closed(SocketAddr::new(LOCALHOST, pb)).await;
        assert_eq!(hcs.open_services().count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_port_in_use_fails_that_service_only_and_is_retried() {
        let (mut hcs, _) = server(&[LOCALHOST]);
        let blocker = std::net::TcpListener::bind((LOCALHOST, 0)).expect("bind");
        let busy = blocker.local_addr().expect("addr").port();
        let free = free_port(LOCALHOST);
        let (a, b) = (svc("ns", "a"), svc("ns", "b"));
        let want = BTreeMap::from([(a.clone(), busy), (b.clone(), free)]);

        let errs = hcs.sync_services(want.clone()).await;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].service, a);
        assert_eq!(errs[0].port, busy);
        assert_eq!(errs[0].source.kind(), io::ErrorKind::AddrInUse);
        let msg = errs[0].to_string();
        assert!(msg.contains("\"ns/a\"") && msg.contains(&format!("port {busy}")), "{msg}");
        assert_eq!(hcs.port(&a), None);
        assert_eq!(hcs.port(&b), Some(free));
        hcs.sync_endpoints(&BTreeMap::from([(a.clone(), 1), (b.clone(), 1)]));
        assert_eq!(get(free).await.status, 200);

        // Still busy: still failing, b untouched.
        let errs = hcs.sync_services(want.clone()).await;
        assert_eq!(errs.iter().map(|e| &e.service).collect::<Vec<_>>(), [&a]);
        assert_eq!(get(free).await.status, 200);

        // Freed: the next sync opens it.
        drop(blocker);
        assert!(hcs.sync_services(want).await.is_empty());
        assert_eq!(hcs.port(&a), Some(busy));
        let r = get(busy).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body, expected("ns", "a", 0, true));
        hcs.sync_endpoints(&BTreeMap::from([(a.clone(), 1), (b.clone(), 1)]));
        assert_eq!(get(busy).await.status, 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_address_closes_the_others_of_that_service() {
        let second = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let (mut hcs, _) = server(&[second, LOCALHOST, LOCALHOST]);
        let blocker = std::net::TcpListener::bind((second, 0)).expect("bind 127.0.0.2");
        let port = blocker.local_addr().expect("addr").port();
        let a = svc("ns", "a");

        let errs = hcs.sync_services(BTreeMap::from([(a.clone(), port)])).await;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].addr, SocketAddr::new(second, port));
        // 127.0.0.1 was opened first, then closed again.
        assert_closed(SocketAddr::new(LOCALHOST, port)).await;

        drop(blocker);
        assert!(hcs.sync_services(BTreeMap::from([(a.clone(), port)])).await.is_empty());
        for ip in [LOCALHOST, second] {
            let r = request(SocketAddr::new(ip, port), "GET", "/").await.expect("answer");
            assert_eq!(r.status, 503, "{ip}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changing_the_port_moves_the_listener() {
        let (mut hcs, _) = server(&[LOCALHOST]);
        let (p1, p2) = (free_port(LOCALHOST), free_port(LOCALHOST));
        let a = svc("ns", "a");
        assert!(hcs.sync_services(BTreeMap::from([(a.clone(), p1)])).await.is_empty());
        hcs.sync_endpoints(&BTreeMap::from([(a.clone(), 1)]));
        assert_eq!(get(p1).await.status, 200);

        assert!(hcs.sync_services(BTreeMap::from([(a.clone(), p2)])).await.is_empty());
        assert_eq!(hcs.port(&a), Some(p2));
        assert_closed(SocketAddr::new(LOCALHOST, p1)).await;
        // A new listener counts 0 until the next sync_endpoints, as kube-proxy's.
        assert_eq!(get(p2).await.status, 503);
        hcs.sync_endpoints(&BTreeMap::from([(a.clone(), 1)]));
        let r = get(p2).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, expected("ns", "a", 1, true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_services_can_swap_ports_in_one_sync() {
        let (mut hcs, _) = server(&[LOCALHOST]);
        let (p1, p2) = (free_port(LOCALHOST), free_port(LOCALHOST));
        let (a, b) = (svc("ns", "a"), svc("ns", "b"));
        assert!(hcs.sync_services(BTreeMap::from([(a.clone(), p1), (b.clone(), p2)])).await.is_empty());
        let errs = hcs.sync_services(BTreeMap::from([(a.clone(), p2), (b.clone(), p1)])).await;
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(get(p2).await.body, expected("ns", "a", 0, true));
        assert_eq!(get(p1).await.body, expected("ns", "b", 0, true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn all_addresses_when_no_bind_address_is_given() {
        let (mut hcs, _) = server(&[]);
        let port = free_port(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let a = svc("ns", "a");
        assert!(hcs.sync_services(BTreeMap::from([(a.clone(), port)])).await.is_empty());
        hcs.sync_endpoints(&BTreeMap::from([(a.clone(), 4)]));
        // Dual-stack: IPv4 reaches the [::] listener.
        let r = get(port).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, expected("ns", "a", 4, true));
        if std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok() {
            let r = request(SocketAddr::from((Ipv6Addr::LOCALHOST, port)), "GET", "/").await.expect("[::1]");
            assert_eq!(r.status, 200);
        }
        assert!(hcs.sync_services(BTreeMap::new()).await.is_empty());
        assert_closed(SocketAddr::new(LOCALHOST, port)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_server_stops_its_listeners() {
        let (mut hcs, _) = server(&[LOCALHOST]);
        let port = free_port(LOCALHOST);
        assert!(hcs.sync_services(BTreeMap::from([(svc("ns", "a"), port)])).await.is_empty());
        assert_eq!(get(port).await.status, 503);
        drop(hcs);
        assert_closed(SocketAddr::new(LOCALHOST, port)).await;
    }
}
