//! A node-local client process for the socket-LB tests: run inside a test
//! cgroup (and network namespace), it talks to a Service address with real
//! sockets and prints, one line per request, what answered and what the
//! socket API says the peer is (`getpeername` / `recvfrom`), so a test sees
//! both the backend choice and the reverse translation.
//!
//! ```text
//! sockclient http ADDR COUNT            new TCP connection per request: "<body> <getpeername>"
//! sockclient udp ADDR COUNT             one connected UDP socket: "<reply> <getpeername>"
//! sockclient udp-sendto ADDR COUNT      one unconnected UDP socket: "<reply> <recvfrom source>"
//! sockclient udp-stream ADDR MS COUNT   connected UDP, a datagram every MS ms:
//!                                       "<ms since start> <reply>|ERR <error>"; an aborted
//!                                       socket (destroyed by the agent) is connect()ed
//!                                       again, the same socket
//! ```
//! Errors are printed as `ERR <error>` lines; the exit status is 0.
use std::{
    io::Write as _,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn http(addr: SocketAddr) -> std::io::Result<String> {
    let (body, peer) = integration_tests::client::http_get_with_peer(addr, TIMEOUT)?;
    Ok(format!("{body} {peer}"))
}

fn udp_once(s: &UdpSocket, connected: bool, addr: SocketAddr, i: u32) -> std::io::Result<String> {
    let payload = format!("ping{i}");
    if connected {
        s.send(payload.as_bytes())?;
    } else {
        s.send_to(payload.as_bytes(), addr)?;
    }
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf)?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    // `<name>:<payload>` from the echo servers; a peer server's
    // `<name> <peer-ip> <peer-port> <payload>` (an IPv6 peer has colons)
    // is kept whole.
    let name = if reply.contains(' ') { reply.trim_end().to_owned() } else { reply.split(':').next().unwrap_or("").to_owned() };
    let peer = if connected { s.peer_addr()? } else { from };
    Ok(format!("{name} {peer}"))
}

/// The wildcard address of `addr`'s family (an IPv6 socket for an IPv6
/// address, IPv4-mapped ones included).
fn any(addr: SocketAddr) -> &'static str {
    if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_else(|| panic!("usage: see the module doc (argument {i} missing)"));
    let addr: SocketAddr = arg(2).parse().expect("ADDR is ip:port");
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut line = |s: std::io::Result<String>| {
        let _ = match s {
            Ok(s) => writeln!(out, "{s}"),
            Err(e) => writeln!(out, "ERR {e}"),
        };
        let _ = out.flush();
    };
    match arg(1).as_str() {
        "http" => {
            for _ in 0..arg(3).parse::<u32>().expect("COUNT") {
                line(http(addr));
            }
        }
        mode @ ("udp" | "udp-sendto") => {
            let s = UdpSocket::bind(any(addr)).expect("bind");
            s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            let connected = mode == "udp";
            if connected && let Err(e) = s.connect(addr) {
                line(Err(e));
                return;
            }
            for i in 0..arg(3).parse::<u32>().expect("COUNT") {
                line(udp_once(&s, connected, addr, i));
            }
        }
        "udp-stream" => {
            let every = Duration::from_millis(arg(3).parse().expect("MS"));
            let count: u32 = arg(4).parse().expect("COUNT");
            let s = UdpSocket::bind(any(addr)).expect("bind");
            s.set_read_timeout(Some(every.max(Duration::from_millis(50)))).expect("timeout");
            let _ = s.connect(addr);
            let start = Instant::now();
            for i in 0..count {
                let t = start.elapsed().as_millis();
                match udp_once(&s, true, addr, i) {
                    Ok(r) => line(Ok(format!("{t} {r}"))),
                    Err(e) => {
                        line(Ok(format!("{t} ERR {e}")));
                        // ECONNABORTED (the socket was destroyed) and
                        // EDESTADDRREQ (it is no longer connected): connect
                        // the same socket again, as resolvers do.
                        if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EDESTADDRREQ | libc::ENOTCONN)) {
                            let _ = s.connect(addr);
                        }
                    }
                }
                std::thread::sleep((every * (i + 1)).saturating_sub(start.elapsed()));
            }
        }
        other => panic!("unknown mode {other}"),
    }
}
