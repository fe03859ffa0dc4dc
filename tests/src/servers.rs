//! Small real servers that answer with their own name: HTTP/1.1 (keep-alive)
//! on TCP and an echo on UDP. They run as threads inside a namespace and stop
//! when their handle is dropped.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Netns;

/// A running server; stopped on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Requests (HTTP) or datagrams (UDP) answered so far.
    #[must_use]
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `HTTP/1.1 200` with body `<name>\n` on `port` inside `ns`.
#[must_use]
pub fn http_server(ns: &Netns, port: u16, name: &str) -> Server {
    let body = format!("{name}\n");
    http_server_with(ns, port, move |_| body.clone())
}

/// Serves HTTP/1.1 (keep-alive) on `port` inside `ns`; every response on a
/// connection has the body `body(peer)`, the peer as the server sees it.
#[must_use]
pub fn http_server_with(ns: &Netns, port: u16, body: impl Fn(SocketAddr) -> String + Send + 'static) -> Server {
    http_server_on(ns, SocketAddr::from(([0, 0, 0, 0], port)), body)
}

/// Serves `HTTP/1.1 200` with body `<name>\n` on `[::]:port` inside `ns`:
/// both families (IPv4 clients appear as `::ffff:a.b.c.d`).
#[must_use]
pub fn http_server_dual(ns: &Netns, port: u16, name: &str) -> Server {
    let body = format!("{name}\n");
    http_server_on(ns, SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)), move |_| body.clone())
}

/// [`http_server_with`] on `bind`.
#[must_use]
pub fn http_server_on(ns: &Netns, bind: SocketAddr, body: impl Fn(SocketAddr) -> String + Send + 'static) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let (s, c) = (stop.clone(), served.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = ns.spawn(move || {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind http server {bind}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        ready_tx.send(()).expect("ready");
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        while !s.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let (s, c, body) = (s.clone(), c.clone(), body(peer));
                    conns.push(std::thread::spawn(move || serve_http_body(stream, &body, &s, &c)));
                    conns.retain(|h| !h.is_finished());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        for h in conns {
            let _ = h.join();
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("http server did not start");
    Server { stop, served, thread: Some(thread) }
}

/// Answers every request on one keep-alive connection with `body`.
pub(crate) fn serve_http_body(mut stream: TcpStream, body: &str, stop: &AtomicBool, served: &AtomicU64) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let response = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            if stream.write_all(response.as_bytes()).is_err() {
                return;
            }
            served.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Answers each datagram on `port` with `<name>:<payload>`.
#[must_use]
pub fn udp_echo(ns: &Netns, port: u16, name: &str) -> Server {
    let prefix = format!("{name}:");
    udp_echo_with(ns, SocketAddr::from(([0, 0, 0, 0], port)), move |_, payload| {
        let mut reply = prefix.clone().into_bytes();
        reply.extend_from_slice(payload);
        reply
    })
}

/// Answers each datagram received on `bind` inside `ns` with
/// `reply(peer, payload)`.
#[must_use]
pub fn udp_echo_with(ns: &Netns, bind: SocketAddr, reply: impl Fn(SocketAddr, &[u8]) -> Vec<u8> + Send + 'static) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let (s, c) = (stop.clone(), served.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = ns.spawn(move || {
        let sock = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind udp echo {bind}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        ready_tx.send(()).expect("ready");
        let mut buf = vec![0u8; 65_536];
        while !s.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = sock.recv_from(&mut buf)
                && sock.send_to(&reply(peer, &buf[..n]), peer).is_ok()
            {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("udp echo did not start");
    Server { stop, served, thread: Some(thread) }
}

/// Serves HTTP in the current network namespace until the process ends
/// (the demo runs its pods' servers as processes, so `--keep` outlives it).
pub fn http_server_forever(port: u16, name: &str) -> ! {
    let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let served: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).expect("bind http server");
    for stream in listener.incoming().flatten() {
        let name = name.to_owned();
        std::thread::spawn(move || serve_http_body(stream, &format!("{name}\n"), stop, served));
    }
    unreachable!("TcpListener::incoming never ends")
}
