//! Programming the Services into a node namespace: iptables-restore, nft -f,
//! or the agent; timed. Every command runs through [`in_node`], which refuses
//! the root network namespace, so no rule is ever added there.
use std::{
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use proxy_agent::pins::{Pins, SVC_MAP};
use proxy_common::svc::{SVC6_MAP, Svc6Key, SvcKey, SvcValue};

use super::services::{Family, Frontend, Proto, ServiceSet};
use crate::netns::Netns;

/// Which `iptables-restore` to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IptBackend {
    /// `iptables-nft-restore` (Debian's default `iptables`).
    Nft,
    /// `iptables-legacy-restore` (`x_tables`).
    Legacy,
}

impl IptBackend {
    #[must_use]
    pub fn restore_bin(self) -> &'static str {
        self.restore_bin_for(Family::V4)
    }
    /// `iptables-*-restore`, or `ip6tables-*-restore` for IPv6 rules.
    #[must_use]
    pub fn restore_bin_for(self, family: Family) -> &'static str {
        match (self, family) {
            (Self::Nft, Family::V4) => "iptables-nft-restore",
            (Self::Legacy, Family::V4) => "iptables-legacy-restore",
            (Self::Nft, Family::V6) => "ip6tables-nft-restore",
            (Self::Legacy, Family::V6) => "ip6tables-legacy-restore",
        }
    }
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Nft => "nft",
            Self::Legacy => "legacy",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nft" => Some(Self::Nft),
            "legacy" => Some(Self::Legacy),
            _ => None,
        }
    }
}

fn net_ino(path: &str) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Panics unless `ns` is a named namespace other than the root one (the one
/// of this process's main thread, which never enters another; and PID 1's
/// where it can be read).
pub fn assert_not_root(ns: &Netns) {
    assert!(!ns.name().is_empty(), "no namespace");
    let target = net_ino(&ns.path()).unwrap_or_else(|| panic!("{} does not exist", ns.path()));
    let main = net_ino("/proc/self/ns/net").expect("stat /proc/self/ns/net");
    assert!(main != target, "refusing to program rules: {} is the root network namespace", ns.path());
    if let Some(init) = net_ino("/proc/1/ns/net") {
        assert!(init != target, "refusing to program rules: {} is PID 1's network namespace", ns.path());
    }
}

/// Runs `prog ARGS` inside `ns` (nsenter --net), `input` on stdin, at most
/// `timeout`. Ok(elapsed) or Err(reason).
pub fn in_node(ns: &Netns, prog: &str, args: &[&str], input: &str, timeout: Duration) -> Result<Duration, String> {
    assert_not_root(ns);
    let start = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .arg(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {prog}: {e} (cargo xtask setup installs it)"))?;
    let mut stdin = child.stdin.take().expect("stdin");
    let data = input.as_bytes().to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let _ = writer.join();
                let elapsed = start.elapsed();
                if status.success() {
                    return Ok(elapsed);
                }
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                let err: String = err.lines().take(3).collect::<Vec<_>>().join(" | ");
                return Err(format!("{prog} failed ({status}): {err}"));
            }
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = writer.join();
                return Err(format!("{prog} did not finish within {} s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("{prog}: {e}")),
        }
    }
}

/// The outcome of programming one set of Services.
#[derive(Clone, Debug)]
pub struct Programmed {
    /// Wall time, or why it could not be done.
    pub result: Result<Duration, String>,
    /// Transactions (restore/nft runs) used.
    pub transactions: usize,
}

/// Loads kube-proxy's iptables rules for `set` from nothing: the base, then
/// `per_chunk` Services per `iptables-restore --noflush` transaction
/// (`ip6tables-restore` for IPv6 Services).
pub fn iptables(ns: &Netns, set: &ServiceSet, backend: IptBackend, per_chunk: usize, timeout: Duration) -> Programmed {
    let start = Instant::now();
    let mut inputs = vec![super::rules::iptables_base()];
    inputs.extend(super::rules::iptables_chunks(set, per_chunk));
    run_all(ns, backend.restore_bin_for(set.family), &["--noflush", "-w", "5"], &inputs, start, timeout)
}

/// Loads kube-proxy's nftables table for `set` from nothing with `nft -f -`
/// (`ip kube-proxy`, or `ip6 kube-proxy` for IPv6 Services).
pub fn nftables(ns: &Netns, set: &ServiceSet, per_chunk: usize, timeout: Duration) -> Programmed {
    let start = Instant::now();
    let mut inputs = vec![super::rules::nft_base(set.family)];
    inputs.extend(super::rules::nft_chunks(set, per_chunk));
    run_all(ns, "nft", &["-f", "-"], &inputs, start, timeout)
}

fn run_all(ns: &Netns, prog: &str, args: &[&str], inputs: &[String], start: Instant, timeout: Duration) -> Programmed {
    for (k, input) in inputs.iter().enumerate() {
        let left = timeout.saturating_sub(start.elapsed());
        if let Err(e) = in_node(ns, prog, args, input, left) {
            let e = if start.elapsed() >= timeout {
                format!("not done within {} s ({k} of {} transactions applied)", timeout.as_secs(), inputs.len())
            } else {
                format!("{e} (after {k} of {} transactions)", inputs.len())
            };
            return Programmed { result: Err(e), transactions: k };
        }
    }
    Programmed { result: Ok(start.elapsed()), transactions: inputs.len() }
}

/// kube-proxy's partial iptables sync for one added Service.
pub fn iptables_add_one(ns: &Netns, set: &ServiceSet, backend: IptBackend, timeout: Duration) -> Result<Duration, String> {
    let input = super::rules::iptables_add_one(set, &set.extra());
    in_node(ns, backend.restore_bin_for(set.family), &["--noflush", "-w", "5"], &input, timeout)
}

/// kube-proxy's nftables transaction for one added Service.
pub fn nftables_add_one(ns: &Netns, set: &ServiceSet, timeout: Duration) -> Result<Duration, String> {
    in_node(ns, "nft", &["-f", "-"], &super::rules::nft_add_one(&set.extra()), timeout)
}

fn proto(f: &Frontend) -> u8 {
    match f.proto {
        Proto::Tcp => proxy_common::proto::TCP,
        Proto::Udp => proxy_common::proto::UDP,
    }
}

/// The service-map key of `f`'s slot 0 (an IPv4 frontend).
#[must_use]
pub fn svc_key(f: &Frontend) -> SvcKey {
    let std::net::IpAddr::V4(vip) = f.vip else { panic!("{}: not an IPv4 frontend", f.vip) };
    SvcKey { addr_be: u32::from(vip).to_be(), port_be: f.port.to_be(), backend_slot: 0, proto: proto(f), scope: 0, _pad: [0; 2] }
}

/// The IPv6 service-map key of `f`'s slot 0 (an IPv6 frontend).
#[must_use]
pub fn svc6_key(f: &Frontend) -> Svc6Key {
    let std::net::IpAddr::V6(vip) = f.vip else { panic!("{}: not an IPv6 frontend", f.vip) };
    Svc6Key { addr: vip.octets(), port_be: f.port.to_be(), backend_slot: 0, proto: proto(f), scope: 0, _pad: [0; 2] }
}

/// The agent's pinned service maps (`proxy_svc_v1`, `proxy_svc6_v1`),
/// opened once they exist.
#[derive(Default)]
struct SvcMaps {
    v4: Option<HashMap<MapData, SvcKey, SvcValue>>,
    v6: Option<HashMap<MapData, Svc6Key, SvcValue>>,
}

impl SvcMaps {
    fn open(&mut self, bpffs: &Path) {
        let pins = Pins::new(bpffs);
        let open = |name: &str| MapData::from_pin(pins.map(name)).ok().map(Map::HashMap);
        if self.v4.is_none() {
            self.v4 = open(SVC_MAP).and_then(|m| HashMap::try_from(m).ok());
        }
        if self.v6.is_none() {
            self.v6 = open(SVC6_MAP).and_then(|m| HashMap::try_from(m).ok());
        }
    }

    /// Slot 0 of `f`: its backend count, if the frontend is there.
    fn count(&self, f: &Frontend) -> Option<u16> {
        match f.vip {
            std::net::IpAddr::V4(_) => self.v4.as_ref()?.get(&svc_key(f), 0).ok().map(|v| v.count),
            std::net::IpAddr::V6(_) => self.v6.as_ref()?.get(&svc6_key(f), 0).ok().map(|v| v.count),
        }
    }
}

/// Waits until every frontend of `fronts` is in the agent's pinned service
/// map of its family under `bpffs` with all its backends (slot 0 written
/// last, with the count). Looks each frontend up once it is reached (no map
/// dumps), so the poll is cheap. Ok(time since `since`) or Err(how many
/// were there).
pub fn wait_frontends(bpffs: &Path, fronts: &[Frontend], since: Instant, timeout: Duration) -> Result<Duration, String> {
    let mut done = 0;
    let mut maps = SvcMaps::default();
    loop {
        maps.open(bpffs);
        while let Some(f) = fronts.get(done) {
            match maps.count(f) {
                Some(n) if usize::from(n) == f.endpoints.len() => done += 1,
                _ => break,
            }
        }
        if done == fronts.len() {
            return Ok(since.elapsed());
        }
        if since.elapsed() > timeout {
            return Err(format!("{done} of {} frontends programmed after {} s", fronts.len(), timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
