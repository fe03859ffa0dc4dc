//! Spoofed traffic for the flood tests: Ethernet frames written with an
//! `AF_PACKET` socket inside a namespace of the test, bounded in count and
//! time, with any source address (what an attacker or a busy network
//! sends; the kernel's own stack in that namespace never sees them).
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use crate::{
    netns::Netns,
    packet::{FrameBuilder, tcp_flags},
};

/// The MAC address of `dev` in `ns`.
#[must_use]
pub fn mac_of(ns: &Netns, dev: &str) -> [u8; 6] {
    let out = ns.ip(&["-j", "link", "show", "dev", dev]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j link: {e}: {out}"));
    let text = v[0]["address"].as_str().unwrap_or_else(|| panic!("no address for {dev}: {out}"));
    let mut mac = [0u8; 6];
    for (m, part) in mac.iter_mut().zip(text.split(':')) {
        *m = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

/// What one flood packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Syn,
    Ack,
    Rst,
    Udp,
}

/// The `i`-th spoofed source: 172.16.0.0/12 (routed nowhere on the test
/// nodes), a different address for every packet until 2^20, random-ish port.
#[must_use]
pub fn spoofed_source(i: u32) -> SocketAddrV4 {
    let a = 0xac10_0000 | (i & 0x000f_ffff);
    let port = 1024 + u16::try_from(i.wrapping_mul(2_654_435_761) % 60_000).expect("fits");
    SocketAddrV4::new(Ipv4Addr::from(a), port)
}

/// One spoofed frame of `kind` from `src` to `dst`.
#[must_use]
pub fn frame(kind: Kind, src: SocketAddrV4, dst: SocketAddrV4, macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
    let b = match kind {
        Kind::Syn => FrameBuilder::tcp(src, dst, tcp_flags::SYN),
        Kind::Ack => FrameBuilder::tcp(src, dst, tcp_flags::ACK),
        Kind::Rst => FrameBuilder::tcp(src, dst, tcp_flags::RST),
        Kind::Udp => FrameBuilder::udp(src, dst),
    };
    b.with_macs(macs.0, macs.1).build()
}

/// Sent by [`send`].
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub packets: u64,
    pub elapsed: Duration,
}

impl Sent {
    #[must_use]
    pub fn rate(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Writes the frames `make(i)` for `i in 0..count` out of `dev` in `ns`
/// (an `AF_PACKET` raw socket), stopping early after `limit`.
pub fn send(ns: &Netns, dev: &str, count: u32, limit: Duration, make: impl Fn(u32) -> Vec<u8> + Send + 'static) -> Sent {
    let dev = dev.to_owned();
    ns.run(move || {
        // SAFETY: plain socket(2); the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let name = std::ffi::CString::new(dev.as_str()).expect("name");
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex != 0, "no device {dev}");
        // SAFETY: an all-zero sockaddr_ll is valid; we fill what bind reads.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).expect("fits");
        sll.sll_ifindex = i32::try_from(ifindex).expect("fits");
        // SAFETY: bind with a sockaddr_ll of the right size.
        let rc = unsafe { libc::bind(fd, (&raw const sll).cast(), u32::try_from(size_of::<libc::sockaddr_ll>()).expect("fits")) };
        assert!(rc == 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        let start = Instant::now();
        let mut packets = 0;
        for i in 0..count {
            if i % 1024 == 0 && start.elapsed() > limit {
                break;
            }
            let f = make(i);
            // SAFETY: sending our buffer on our socket.
            let n = unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), 0) };
            if n > 0 {
                packets += 1;
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::yield_now();
            }
        }
        // SAFETY: closing our fd.
        unsafe { libc::close(fd) };
        Sent { packets, elapsed: start.elapsed() }
    })
}
