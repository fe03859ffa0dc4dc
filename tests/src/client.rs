//! Real clients (std sockets); call them inside a namespace with
//! [`Netns::run`](crate::netns::Netns::run).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

/// One request on a new connection; returns the body (trimmed).
pub fn http_get(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    http_get_with_peer(addr, timeout).map(|(body, _)| body)
}

/// [`http_get`], also returning the peer as the socket reports it
/// (`getpeername`: with socket-level balancing, the Service address).
pub fn http_get_with_peer(addr: SocketAddr, timeout: Duration) -> std::io::Result<(String, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let peer = s.peer_addr()?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    Ok((read_response(&mut s)?, peer))
}

/// Reads one HTTP response with a Content-Length body.
fn read_response(s: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                if !head.starts_with("HTTP/1.1 200") {
                    return Err(std::io::Error::other(format!("unexpected response: {head}")));
                }
                return Ok(String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).trim().to_owned());
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-response"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A keep-alive HTTP connection for several requests.
pub struct KeepAlive {
    stream: TcpStream,
    addr: SocketAddr,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Self { stream, addr })
    }

    pub fn get(&mut self) -> std::io::Result<String> {
        let req = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr);
        self.stream.write_all(req.as_bytes())?;
        read_response(&mut self.stream)
    }
}

/// One datagram to `addr`, one reply back; returns the reply text.
pub fn udp_request(addr: SocketAddr, payload: &str, timeout: Duration) -> std::io::Result<String> {
    let any: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
    let sock = UdpSocket::bind(any)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.connect(addr)?;
    sock.send(payload.as_bytes())?;
    // Room for a reply as large as a fragmented datagram gets.
    let mut buf = vec![0u8; 65_536];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
