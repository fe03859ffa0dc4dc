//! Real SCTP endpoints for the tests: `tests/sctp/sctp_peer.c` on usrsctp
//! (the FreeBSD SCTP stack in userspace, speaking SCTP over raw IP
//! sockets), because this machine's kernel has no SCTP (`CONFIG_IP_SCTP`
//! unset). Its packets are real SCTP on the wire — INIT, INIT ACK, COOKIE
//! ECHO, DATA, SACK, SHUTDOWN, with CRC32c checksums it verifies — so the
//! datapath translates what a kernel SCTP endpoint would send.
//!
//! `cargo xtask setup` installs `libusrsctp-dev`; the program is compiled
//! once per test process with `cc`.
use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use crate::netns::Netns;

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sctp/sctp_peer.c");

/// The compiled `sctp-peer`, built on first use.
///
/// # Panics
/// When it does not build (no `libusrsctp-dev`: run `cargo xtask setup`).
pub fn peer_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("sctp-peer-{}", std::process::id()));
        let r = Command::new("cc")
            .args(["-O2", "-Wall", "-o"])
            .arg(&out)
            .arg(SOURCE)
            .args(["-lusrsctp", "-lpthread"])
            .output()
            .unwrap_or_else(|e| panic!("running cc for {SOURCE}: {e}"));
        assert!(
            r.status.success(),
            "building {SOURCE} failed (is libusrsctp-dev installed? `cargo xtask setup` installs it):\n{}",
            String::from_utf8_lossy(&r.stderr)
        );
        out
    })
    .clone()
}

/// An SCTP server in a namespace, killed on drop.
pub struct SctpServer {
    child: Child,
}

impl SctpServer {
    /// Listens on `addr` in `ns`, answering `<name> <peer> <message>`.
    ///
    /// # Panics
    /// When it does not report listening within 5 s.
    #[must_use]
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(peer_bin())
            .args(["server", &addr.ip().to_string(), &addr.port().to_string(), name])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the SCTP server {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        assert_eq!(line.trim(), "listening", "the SCTP server {name} on {addr} did not start");
        Self { child }
    }
}

impl Drop for SctpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One association's answer: the server's name and the peer it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SctpSeen {
    pub server: String,
    pub peer: SocketAddr,
    pub message: String,
}

/// `count` associations from `src` (any address: `None`) in `ns` to `dst`,
/// one after the other, all within `count` times `timeout`: every answer,
/// or an error naming the first failure, with the client's output.
pub fn associate(ns: &Netns, src: Option<IpAddr>, dst: SocketAddr, count: usize, timeout: Duration) -> Result<Vec<SctpSeen>, String> {
    let total = timeout.as_secs().max(1) * count as u64;
    let src = src.map_or_else(|| "-".to_owned(), |a| a.to_string());
    let out = Command::new("timeout")
        .arg(total.to_string())
        .args(["ip", "netns", "exec", ns.name()])
        .arg(peer_bin())
        .args(["client", &src, &dst.ip().to_string(), &dst.port().to_string(), &count.to_string()])
        .output()
        .map_err(|e| format!("running the SCTP client: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut seen = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("OK ") else {
            return Err(format!("SCTP client to {dst}: {line}\nall output:\n{text}"));
        };
        let mut it = rest.splitn(3, ' ');
        let (Some(server), Some(peer), Some(message)) = (it.next(), it.next(), it.next()) else {
            return Err(format!("SCTP client to {dst}: bad answer {rest:?}"));
        };
        let peer: SocketAddr = peer.parse().map_err(|e| format!("peer {peer:?}: {e}"))?;
        seen.push(SctpSeen { server: server.to_owned(), peer, message: message.to_owned() });
    }
    if seen.len() != count {
        return Err(format!("SCTP client to {dst}: {} of {count} associations answered (exit {}):\n{text}", seen.len(), out.status));
    }
    Ok(seen)
}
