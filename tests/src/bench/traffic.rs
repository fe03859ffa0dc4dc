//! Load generators and the servers they talk to: lean std-socket threads in
//! the bench's own namespaces (clients in the client namespace, servers in
//! the pods). Every loop is bounded in time (a deadline) and in count.
//!
//! A load phase runs either as threads of the bench process ([`run_phase`])
//! or in a process of its own ([`run_phase_process`]: the bench binary
//! re-executed with [`PHASE_SUBCOMMAND`], in the client namespace and in a
//! cgroup, printing its [`PhaseResult`] as JSON) — the same generator code
//! either way. The socket path needs the latter: only sockets of processes
//! in the agent's `--cgroup` are translated at `connect()`/`sendto()`, and
//! the bench process itself must stay out of it.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{cgroup::TestCgroup, netns::Netns};

/// The hidden first argument of the bench binary that runs one load phase
/// ([`phase_main`]).
pub const PHASE_SUBCOMMAND: &str = "__load-phase";

/// At most this many latency samples per client thread.
const MAX_SAMPLES: usize = 2_000_000;
/// The shape of the HTTP servers' answer; each pod's has its index as the
/// 3-byte body instead of `ok` ([`response`]), so a client can tell which
/// pod answered.
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";

/// The answer of pod `index`'s HTTP server: [`RESPONSE`] with the body
/// `"NN\n"` (the same length in every pod).
fn response(index: usize) -> Vec<u8> {
    let mut r = RESPONSE[..RESPONSE.len() - 3].to_vec();
    r.extend_from_slice(format!("{:02}\n", index % 100).as_bytes());
    r
}

/// The pod index in an answer of the bench's HTTP servers.
fn pod_of(resp: &[u8]) -> Option<u8> {
    let body = resp.get(RESPONSE.len() - 3..RESPONSE.len() - 1)?;
    std::str::from_utf8(body).ok()?.parse().ok()
}

/// One keep-alive request on `s` (a connection to the bench's HTTP
/// servers); returns the index of the pod that answered.
pub fn request(s: &mut TcpStream) -> std::io::Result<u8> {
    let mut buf = [0u8; 512];
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    read_response(s, &mut buf)?;
    pod_of(&buf[..RESPONSE.len()]).ok_or_else(|| std::io::Error::other("no pod index in the answer"))
}
const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// Servers in the pods; stopped and joined on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn set_accept_timeout(l: &TcpListener, t: Duration) {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(1),
        tv_usec: libc::suseconds_t::from(t.subsec_micros()),
    };
    // SAFETY: setsockopt on a socket we own with a correctly sized timeval.
    let rc = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            libc::socklen_t::try_from(size_of::<libc::timeval>()).expect("small"),
        )
    };
    assert!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
}

/// Starts, in every pod namespace: an HTTP server on `http` (keep-alive, a
/// fixed 3-byte body), a TCP sink on `bulk`, a UDP echo on `udp`, all bound
/// to `any` (0.0.0.0, or [::] for the IPv6 cases). Workers share one
/// listener each (blocking accept with a timeout, no spawn per connection),
/// so the servers cost the same in every mode.
#[must_use]
pub fn start_servers(pods: &[&Netns], any: IpAddr, http: u16, bulk: u16, udp: u16, http_workers: usize) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (index, ns) in pods.iter().enumerate() {
        let answer: Arc<[u8]> = response(index + 1).into();
        let (tx, rx) = std::sync::mpsc::channel();
        threads.push(ns.spawn(move || {
            let any = |p| SocketAddr::new(any, p);
            let web = TcpListener::bind(any(http)).expect("bind http");
            let sink = TcpListener::bind(any(bulk)).expect("bind bulk");
            let echo = UdpSocket::bind(any(udp)).expect("bind udp");
            set_accept_timeout(&web, Duration::from_millis(100));
            set_accept_timeout(&sink, Duration::from_millis(100));
            echo.set_read_timeout(Some(Duration::from_millis(100))).expect("udp timeout");
            tx.send((web, sink, echo)).expect("ready");
        }));
        let (web, sink, echo) = rx.recv_timeout(Duration::from_secs(5)).expect("pod servers did not start");
        let web = Arc::new(web);
        for _ in 0..http_workers {
            let (l, s, a) = (web.clone(), stop.clone(), answer.clone());
            threads.push(std::thread::spawn(move || accept_loop(&l, &s, |c, s| serve_http(c, s, &a))));
        }
        let sink = Arc::new(sink);
        for _ in 0..2 {
            let (l, s) = (sink.clone(), stop.clone());
            threads.push(std::thread::spawn(move || accept_loop(&l, &s, serve_sink)));
        }
        let s = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..n], peer);
                }
            }
        }));
    }
    Servers { stop, threads }
}

fn accept_loop(l: &TcpListener, stop: &AtomicBool, serve: impl Fn(TcpStream, &AtomicBool)) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok((s, _)) = l.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            serve(s, stop);
        }
    }
}

/// Answers each request (anything ending in an empty line) with `answer`
/// until EOF.
fn serve_http(mut s: TcpStream, stop: &AtomicBool, answer: &[u8]) {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 4096];
    let mut have = 0usize;
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf[have..]) {
            Ok(0) => return,
            Ok(n) => have += n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            if s.write_all(answer).is_err() {
                return;
            }
            buf.copy_within(end + 4..have, 0);
            have -= end + 4;
        }
        if have == buf.len() {
            return;
        }
    }
}

fn serve_sink(mut s: TcpStream, stop: &AtomicBool) {
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// What the client targets: one address (a `ClusterIP`, a node address) or
/// the pods themselves in turn (direct); of one family.
#[derive(Clone, Debug)]
pub struct Target {
    pub addrs: Vec<IpAddr>,
    pub http: u16,
    pub bulk: u16,
    pub udp: u16,
}

impl Target {
    fn pick(&self, n: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.addrs[n % self.addrs.len()], port)
    }
}

/// The result of one load phase.
#[derive(Clone, Debug, Default)]
pub struct PhaseResult {
    /// Completed operations (requests, connections, datagram round trips).
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Bytes moved (bulk).
    pub bytes: u64,
    pub elapsed: Duration,
    /// Latency samples in microseconds.
    pub samples_us: Vec<u32>,
    /// sys + softirq CPU time (whole machine) during the phase.
    pub cpu: Duration,
}

impl PhaseResult {
    #[must_use]
    pub fn rate(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let ops = self.ops as f64;
        ops / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The machine's system + softirq time so far, from /proc/stat.
#[must_use]
pub fn sys_softirq() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .map(|l| l.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    // user nice system idle iowait irq softirq ...; USER_HZ is 100 on Linux.
    let ticks = fields.get(2).copied().unwrap_or(0) + fields.get(5).copied().unwrap_or(0) + fields.get(6).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A new connection per request (one thread per `clients`).
    Connections,
    /// Requests over keep-alive connections (one per client thread).
    KeepAlive,
    /// One TCP stream, as fast as it goes.
    Bulk,
    /// UDP request/response, one socket per client thread.
    Udp,
    /// One client, a new connection per request, nothing else running.
    Latency,
}

const PHASES: [(Phase, &str); 5] =
    [(Phase::Connections, "conn"), (Phase::KeepAlive, "keep-alive"), (Phase::Bulk, "bulk"), (Phase::Udp, "udp"), (Phase::Latency, "latency")];

impl Phase {
    #[must_use]
    pub fn name(self) -> &'static str {
        PHASES.iter().find(|(p, _)| *p == self).map_or("conn", |(_, n)| n)
    }

    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        PHASES.iter().find(|(_, n)| *n == s).map(|(p, _)| *p)
    }
}

/// Runs `phase` from the client namespace for `dur` with `clients` threads
/// of this process.
#[must_use]
pub fn run_phase(client: &Netns, target: &Target, phase: Phase, clients: usize, dur: Duration) -> PhaseResult {
    run_threads(target, phase, clients, dur, |f| client.spawn(f))
}

type Job = Box<dyn FnOnce() -> PhaseResult + Send>;

/// The generator: `clients` threads (one for bulk and latency) started by
/// `spawn`, until `dur` is over.
fn run_threads(target: &Target, phase: Phase, clients: usize, dur: Duration, spawn: impl Fn(Job) -> JoinHandle<PhaseResult>) -> PhaseResult {
    let threads = match phase {
        Phase::Bulk | Phase::Latency => 1,
        _ => clients.max(1),
    };
    let cpu0 = sys_softirq();
    let start = Instant::now();
    let deadline = start + dur;
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let t = target.clone();
            spawn(Box::new(move || match phase {
                Phase::Connections | Phase::Latency => connections(&t, k, deadline),
                Phase::KeepAlive => keep_alive(&t, k, deadline),
                Phase::Bulk => bulk(&t, k, deadline),
                Phase::Udp => udp(&t, k, deadline),
            }))
        })
        .collect();
    let mut out = PhaseResult::default();
    for h in handles {
        let r = h.join().unwrap_or_else(|_| PhaseResult { errors: 1, first_error: Some("client thread panicked".into()), ..PhaseResult::default() });
        out.ops += r.ops;
        out.errors += r.errors;
        out.bytes += r.bytes;
        if out.first_error.is_none() {
            out.first_error = r.first_error;
        }
        out.samples_us.extend(r.samples_us);
    }
    out.elapsed = start.elapsed();
    out.cpu = sys_softirq().saturating_sub(cpu0);
    out
}

/// Runs `phase` in a process of its own: `exe` (the bench binary) with
/// [`PHASE_SUBCOMMAND`], in `client`'s namespace and in `cgroup` (it moves
/// itself in before exec, so every socket it opens is in that cgroup).
/// Elapsed time and CPU are measured inside it, around its threads only,
/// exactly as [`run_phase`] does; starting the process is not counted.
#[must_use]
pub fn run_phase_process(exe: &Path, cgroup: &TestCgroup, client: &Netns, target: &Target, phase: Phase, clients: usize, dur: Duration) -> PhaseResult {
    let addrs: Vec<String> = target.addrs.iter().map(ToString::to_string).collect();
    let args = [
        PHASE_SUBCOMMAND.to_owned(),
        phase.name().to_owned(),
        clients.to_string(),
        dur.as_secs_f64().to_string(),
        addrs.join(","),
        target.http.to_string(),
        target.bulk.to_string(),
        target.udp.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let failed = |why: String| PhaseResult { errors: 1, first_error: Some(format!("generator process: {why}")), ..PhaseResult::default() };
    let mut child = match cgroup.command(client, exe, &args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => return failed(format!("spawn: {e}")),
    };
    // Read both pipes while it runs (the samples can exceed a pipe buffer).
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = String::new();
        let _ = stderr.read_to_string(&mut v);
        v
    });
    // Every loop of the generator stops at its deadline; I/O waits at most
    // IO_TIMEOUT. Anything beyond this bound is a hang.
    let limit = Instant::now() + dur + Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if Instant::now() < limit => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err("did not finish in time (killed)".to_owned());
            }
            Err(e) => break Err(format!("wait: {e}")),
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    match status {
        Ok(st) if st.success() => match serde_json::from_slice::<Value>(&out) {
            Ok(v) => from_json(&v),
            Err(e) => failed(format!("bad output ({e}): {}", String::from_utf8_lossy(&out).chars().take(200).collect::<String>())),
        },
        Ok(st) => failed(format!("{st}: {}", err.trim())),
        Err(why) => failed(why),
    }
}

fn to_json(r: &PhaseResult) -> Value {
    json!({
        "ops": r.ops, "errors": r.errors, "first_error": r.first_error, "bytes": r.bytes,
        "elapsed_s": r.elapsed.as_secs_f64(), "cpu_s": r.cpu.as_secs_f64(), "samples_us": r.samples_us,
    })
}

fn from_json(v: &Value) -> PhaseResult {
    let secs = |k: &str| Duration::from_secs_f64(v[k].as_f64().unwrap_or(0.0).max(0.0));
    PhaseResult {
        ops: v["ops"].as_u64().unwrap_or(0),
        errors: v["errors"].as_u64().unwrap_or(0),
        first_error: v["first_error"].as_str().map(str::to_owned),
        bytes: v["bytes"].as_u64().unwrap_or(0),
        elapsed: secs("elapsed_s"),
        samples_us: v["samples_us"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect())
            .unwrap_or_default(),
        cpu: secs("cpu_s"),
    }
}

/// The generator process ([`run_phase_process`]): `PHASE CLIENTS SECONDS
/// ADDR,... HTTP BULK UDP` (the arguments after [`PHASE_SUBCOMMAND`]). It
/// already runs in the client namespace (nsenter), so its threads stay where
/// they start. Prints the result as JSON on stdout.
pub fn phase_main(args: &[String]) {
    let usage = "bench __load-phase PHASE CLIENTS SECONDS ADDR,... HTTP BULK UDP";
    assert!(args.len() == 7, "{usage}");
    let phase = Phase::parse(&args[0]).unwrap_or_else(|| panic!("unknown phase {:?}\n{usage}", args[0]));
    let num = |s: &str| -> u64 { s.parse().unwrap_or_else(|_| panic!("not a number: {s:?}\n{usage}")) };
    let clients = usize::try_from(num(&args[1])).expect("clients");
    let dur = Duration::from_secs_f64(args[2].parse().unwrap_or_else(|_| panic!("not seconds: {:?}\n{usage}", args[2])));
    let addrs = args[3].split(',').map(|a| a.parse().unwrap_or_else(|_| panic!("not an address: {a:?}\n{usage}"))).collect();
    let port = |s: &str| u16::try_from(num(s)).expect("port");
    let target = Target { addrs, http: port(&args[4]), bulk: port(&args[5]), udp: port(&args[6]) };
    let r = run_threads(&target, phase, clients, dur, std::thread::spawn);
    println!("{}", to_json(&r));
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn error(r: &mut PhaseResult, e: &std::io::Error) {
    r.errors += 1;
    if r.first_error.is_none() {
        r.first_error = Some(e.to_string());
    }
    // A failing target must not turn into a busy loop.
    std::thread::sleep(Duration::from_millis(10));
}

/// Reads one response of the known size (headers + 3-byte body).
fn read_response(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut have = 0;
    while have < RESPONSE.len() {
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-response"));
        }
        have += n;
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("unexpected response"));
    }
    Ok(())
}

fn one_connection(addr: SocketAddr, buf: &mut [u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    read_response(&mut s, buf)
}

fn connections(target: &Target, thread: usize, deadline: Instant) -> PhaseResult {
    let mut r = PhaseResult::default();
    let mut buf = [0u8; 512];
    let mut n = thread;
    while Instant::now() < deadline && r.samples_us.len() < MAX_SAMPLES {
        let t0 = Instant::now();
        match one_connection(target.pick(n, target.http), &mut buf) {
            Ok(()) => {
                r.ops += 1;
                r.samples_us.push(micros(t0.elapsed()));
            }
            Err(e) => error(&mut r, &e),
        }
        n += 1;
    }
    r
}

fn keep_alive(target: &Target, thread: usize, deadline: Instant) -> PhaseResult {
    let mut r = PhaseResult::default();
    let mut buf = [0u8; 512];
    let mut conn: Option<TcpStream> = None;
    while Instant::now() < deadline && r.samples_us.len() < MAX_SAMPLES {
        let s = match conn.as_mut() {
            Some(s) => s,
            None => match TcpStream::connect_timeout(&target.pick(thread, target.http), IO_TIMEOUT).and_then(|s| {
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_nodelay(true)?;
                Ok(s)
            }) {
                Ok(s) => conn.insert(s),
                Err(e) => {
                    error(&mut r, &e);
                    continue;
                }
            },
        };
        let t0 = Instant::now();
        match s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n").and_then(|()| read_response(s, &mut buf)) {
            Ok(()) => {
                r.ops += 1;
                r.samples_us.push(micros(t0.elapsed()));
            }
            Err(e) => {
                conn = None;
                error(&mut r, &e);
            }
        }
    }
    r
}

fn bulk(target: &Target, thread: usize, deadline: Instant) -> PhaseResult {
    let mut r = PhaseResult::default();
    let chunk = vec![0x5au8; 128 * 1024];
    let mut s = match TcpStream::connect_timeout(&target.pick(thread, target.bulk), IO_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            error(&mut r, &e);
            return r;
        }
    };
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    while Instant::now() < deadline {
        match s.write(&chunk) {
            Ok(n) => {
                r.bytes += n as u64;
                r.ops += 1;
            }
            Err(e) => {
                error(&mut r, &e);
                break;
            }
        }
    }
    r
}

fn udp(target: &Target, thread: usize, deadline: Instant) -> PhaseResult {
    let mut r = PhaseResult::default();
    let to = target.pick(thread, target.udp);
    let any = if to.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)) };
    let sock = match UdpSocket::bind(any).and_then(|s| {
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.connect(to)?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            error(&mut r, &e);
            return r;
        }
    };
    let payload = [0x42u8; 64];
    let mut buf = [0u8; 256];
    while Instant::now() < deadline && r.samples_us.len() < MAX_SAMPLES {
        let t0 = Instant::now();
        match sock.send(&payload).and_then(|_| sock.recv(&mut buf)) {
            Ok(64) => {
                r.ops += 1;
                r.samples_us.push(micros(t0.elapsed()));
            }
            Ok(n) => error(&mut r, &std::io::Error::other(format!("short UDP reply ({n} bytes)"))),
            Err(e) => error(&mut r, &e),
        }
    }
    r
}

/// The `p`-th percentile (0..=100) of `samples` (sorted in place).
#[must_use]
pub fn percentile(samples: &mut [u32], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    #[expect(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "index in range")]
    let idx = (((samples.len() - 1) as f64) * p / 100.0).round() as usize;
    Some(f64::from(samples[idx.min(samples.len() - 1)]))
}
