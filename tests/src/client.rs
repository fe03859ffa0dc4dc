//! Real clients (std sockets); call them inside a namespace with
//! [`Netns::run`](crate::netns::Netns::run).
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
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

/// [`http_get`] from the local address `src` (a client with several
/// addresses choosing the one it sends from); the connection attempt gives
/// up after `timeout` (`ErrorKind::TimedOut`).
pub fn http_get_from(src: IpAddr, addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket(2) without pointers.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own; the stream closes it.
    let mut s = unsafe { TcpStream::from_raw_fd(fd) };
    // Why the write timeout first: a blocking connect(2) gives up after
    // SO_SNDTIMEO (with EINPROGRESS).
    s.set_write_timeout(Some(timeout))?;
    s.set_read_timeout(Some(timeout))?;
    let (sa, len) = sockaddr(SocketAddr::new(src, 0));
    // SAFETY: `sa` is a sockaddr of `len` bytes.
    if unsafe { libc::bind(s.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (sa, len) = sockaddr(addr);
    // SAFETY: as above.
    if unsafe { libc::connect(s.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EINPROGRESS) { std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out") } else { e });
    }
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    read_response(&mut s)
}

/// `addr` as a `sockaddr_storage` and its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET");
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::sa_family_t::try_from(libc::AF_INET6).expect("AF_INET6");
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, libc::socklen_t::try_from(len).expect("small"))
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
    let any = if addr.is_ipv4() { IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) };
    udp_request_from(any, addr, payload, timeout)
}

/// [`udp_request`] from the local address `src`.
pub fn udp_request_from(src: IpAddr, addr: SocketAddr, payload: &str, timeout: Duration) -> std::io::Result<String> {
    let sock = UdpSocket::bind(SocketAddr::new(src, 0))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.connect(addr)?;
    sock.send(payload.as_bytes())?;
    // Room for a reply as large as a fragmented datagram gets.
    let mut buf = vec![0u8; 65_536];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
