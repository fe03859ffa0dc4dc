//! The flood cases (`np-tc-flood`, `np-iptables-flood`): the `NodePort`
//! load phases while spoofed packets arrive at node A at a fixed rate, the
//! established connections that must survive it, and the conntrack's
//! occupancy meanwhile.
//!
//! The flood is written in the client's namespace with an `AF_PACKET`
//! socket (frames of [`crate::flood`]), paced to `--flood-pps` and bounded
//! in packets and time: of every 10 packets 5 SYNs and 1 ACK and 1 RST to
//! the HTTP node port, 3 datagrams to the UDP node port, each from another
//! source in 172.16.0.0/12 (routed nowhere, so the SYN-ACKs and echoes go
//! unanswered). The kernel stack of the client never sees them.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    services::{HTTP_NODE_PORT, UDP_NODE_PORT},
    traffic::request,
};
use crate::{
    cluster::{Cluster, NODE_A_IP},
    flood::{self, Kind},
    netns::Netns,
};

/// Keep-alive connections opened before the flood and checked after it.
pub const ESTABLISHED: usize = 20;
/// Of those, the ones that make a request every [`BUSY_EVERY`] during the
/// flood (the others stay idle until the check).
pub const BUSY: usize = 10;
const BUSY_EVERY: Duration = Duration::from_millis(100);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The flood runs this long before the first measured phase (so the phases
/// see a table the flood has already filled, not an empty one).
pub const LEAD_IN: Duration = Duration::from_millis(500);

/// Packet `i` of the flood: its kind and destination port (node A's).
#[must_use]
pub fn kind_of(i: u32) -> (Kind, u16) {
    match i % 10 {
        0..=4 => (Kind::Syn, HTTP_NODE_PORT),
        5..=7 => (Kind::Udp, UDP_NODE_PORT),
        8 => (Kind::Ack, HTTP_NODE_PORT),
        _ => (Kind::Rst, HTTP_NODE_PORT),
    }
}

/// What a flood sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// Frames the socket accepted.
    pub packets: u64,
    pub syn: u64,
    pub udp: u64,
    pub ack_rst: u64,
    /// Frames the socket refused (`ENOBUFS`, ...).
    pub refused: u64,
    /// Frames not sent because the sender fell more than 50 ms behind.
    pub skipped: u64,
    pub elapsed: Duration,
}

impl Sent {
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    pub fn rate(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    #[must_use]
    pub fn json(&self) -> Value {
        json!({"packets": self.packets, "syn": self.syn, "udp": self.udp, "ack_rst": self.ack_rst, "refused": self.refused, "skipped": self.skipped,
            "seconds": self.elapsed.as_secs_f64(), "packets_per_s": self.rate()})
    }
}

/// A running flood; [`Flood::stop`] ends it.
pub struct Flood {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Sent>>,
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Flood {
    /// Starts sending at `pps` packets/s out of the client's `eth0` to node
    /// A (its `ext0`): at most `pps × limit` packets, for at most `limit`.
    /// Sources start at [`flood::spoofed_source`]`(first)`.
    #[must_use]
    pub fn start(c: &Cluster, pps: u32, limit: Duration, first: u32) -> Self {
        let macs = (flood::mac_of(&c.client, "eth0"), flood::mac_of(&c.a.ns, "ext0"));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = c.client.spawn(move || paced(pps, limit, first, macs, &s));
        Self { stop, handle: Some(handle) }
    }

    /// Stops the flood and returns what it sent.
    #[must_use]
    pub fn stop(mut self) -> Sent {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

/// The sender (in the client namespace): frames in 1 ms steps, each step
/// bringing the count up to `pps × elapsed`.
fn paced(pps: u32, limit: Duration, first: u32, macs: ([u8; 6], [u8; 6]), stop: &AtomicBool) -> Sent {
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
    assert!(ifindex != 0, "no device eth0 in the client namespace");
    // SAFETY: an all-zero sockaddr_ll is valid; we fill what bind reads.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = u16::try_from(libc::AF_PACKET).expect("fits");
    sll.sll_ifindex = i32::try_from(ifindex).expect("fits");
    // SAFETY: bind with a sockaddr_ll of the right size.
    let rc = unsafe { libc::bind(fd, (&raw const sll).cast(), u32::try_from(size_of::<libc::sockaddr_ll>()).expect("fits")) };
    assert!(rc == 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
    let total = u64::from(pps).saturating_mul(limit.as_secs().max(1));
    let mut sent = Sent::default();
    let mut i: u64 = 0;
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) && start.elapsed() < limit && i < total {
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "bounded by total")]
        let due = ((start.elapsed().as_secs_f64() * f64::from(pps)) as u64).min(total);
        // More than 50 ms behind (the sender did not get a CPU): skip the
        // packets owed rather than bursting them out.
        let floor = due.saturating_sub(u64::from(pps / 20).max(1));
        if i < floor {
            sent.skipped += floor - i;
            i = floor;
        }
        while i < due {
            let n = first.wrapping_add(u32::try_from(i % (1 << 31)).expect("fits"));
            let (kind, port) = kind_of(n);
            let f = flood::frame(kind, flood::spoofed_source(n), SocketAddrV4::new(NODE_A_IP, port), macs);
            // SAFETY: sending our buffer on our socket.
            let rc = unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), 0) };
            if rc > 0 {
                sent.packets += 1;
                match kind {
                    Kind::Syn => sent.syn += 1,
                    Kind::Udp => sent.udp += 1,
                    Kind::Ack | Kind::Rst => sent.ack_rst += 1,
                }
            } else {
                sent.refused += 1;
            }
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    sent.elapsed = start.elapsed();
    // SAFETY: closing our fd.
    unsafe { libc::close(fd) };
    sent
}

/// One keep-alive connection opened before the flood.
struct Conn {
    stream: TcpStream,
    /// The pod that answered its first request.
    pod: u8,
    /// Why it counts as lost (an error, or another pod answering).
    lost: Option<String>,
    requests: u64,
}

impl Conn {
    fn check(&mut self) {
        if self.lost.is_some() {
            return;
        }
        match request(&mut self.stream) {
            Ok(p) if p == self.pod => self.requests += 1,
            Ok(p) => self.lost = Some(format!("answered by pod {p}, was pod {}", self.pod)),
            Err(e) => self.lost = Some(e.to_string()),
        }
    }
}

/// The established connections: [`BUSY`] of them make requests during the
/// flood (a thread of their own), the others stay idle.
pub struct Established {
    idle: Vec<Conn>,
    stop: Arc<AtomicBool>,
    busy: Option<JoinHandle<Vec<Conn>>>,
    opened: usize,
    open_errors: Vec<String>,
}

/// The outcome for the established connections.
#[derive(Clone, Debug, Default)]
pub struct Survival {
    pub opened: usize,
    /// Connections that failed or moved to another pod (the ones that could
    /// not be opened before the flood count as lost too).
    pub lost: usize,
    /// Requests on the busy ones during the flood.
    pub busy_requests: u64,
    /// Up to 3 reasons.
    pub why: Vec<String>,
}

impl Established {
    /// Opens `ESTABLISHED` connections from the client to node A's HTTP
    /// node port (a request on each), then starts the busy ones' thread.
    #[must_use]
    pub fn open(client: &Netns) -> Self {
        let to = SocketAddr::V4(SocketAddrV4::new(NODE_A_IP, HTTP_NODE_PORT));
        let (conns, open_errors) = client.run(move || {
            let mut conns = Vec::new();
            let mut errors = Vec::new();
            for _ in 0..ESTABLISHED {
                let opened = TcpStream::connect_timeout(&to, IO_TIMEOUT).and_then(|mut s| {
                    s.set_read_timeout(Some(IO_TIMEOUT))?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    s.set_nodelay(true)?;
                    let pod = request(&mut s)?;
                    Ok(Conn { stream: s, pod, lost: None, requests: 1 })
                });
                match opened {
                    Ok(c) => conns.push(c),
                    Err(e) => errors.push(format!("opening: {e}")),
                }
            }
            (conns, errors)
        });
        let opened = conns.len();
        let mut busy = conns;
        let idle = busy.split_off(BUSY.min(busy.len()));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        // Sockets keep their namespace: any thread can use them.
        let busy = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_mins(10);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                let t0 = Instant::now();
                for c in &mut busy {
                    c.check();
                }
                std::thread::sleep(BUSY_EVERY.saturating_sub(t0.elapsed()));
            }
            busy
        });
        Self { idle, stop, busy: Some(busy), opened, open_errors }
    }

    /// After the flood: one more request on every connection, each must be
    /// answered by the pod that answered its first.
    #[must_use]
    pub fn check(mut self) -> Survival {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = self.busy.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let busy_requests = all.iter().map(|c| c.requests.saturating_sub(1)).sum();
        all.append(&mut self.idle);
        for c in &mut all {
            c.check();
        }
        let mut why = self.open_errors.clone();
        why.extend(all.iter().filter_map(|c| c.lost.clone()));
        let lost = ESTABLISHED - all.iter().filter(|c| c.lost.is_none()).count();
        why.truncate(3);
        Survival { opened: self.opened, lost, busy_requests, why }
    }
}

/// Node A's conntrack at one moment during the flood.
#[derive(Clone, Copy, Debug, Default)]
pub struct Occupancy {
    /// The agent's tables (`conntrack -o json`): live flows confirmed
    /// (`proxy_ct_v2`) and unconfirmed (`proxy_ct_new_v1`).
    pub confirmed: Option<u64>,
    pub unconfirmed: Option<u64>,
    /// Their capacity in flows (`max_entries` / 2: two entries per flow).
    pub confirmed_cap: Option<u64>,
    pub unconfirmed_cap: Option<u64>,
    /// Node A's netfilter conntrack: `nf_conntrack_count` / `_max`.
    pub nf_count: Option<u64>,
    pub nf_max: Option<u64>,
}

impl Occupancy {
    /// Reads node A's tables: the agent's when `agent` is given (its
    /// binary), netfilter's always.
    #[must_use]
    pub fn read(c: &Cluster, agent: Option<&std::path::Path>) -> Self {
        let mut o = Self::default();
        if let Some(bin) = agent {
            let out = std::process::Command::new(bin)
                .arg("--bpffs")
                .arg(&c.a.bpffs)
                .args(["conntrack", "-o", "json"])
                .output()
                .ok()
                .filter(|o| o.status.success());
            if let Some(flows) = out.and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok()).and_then(|v| v.as_array().cloned()) {
                let confirmed = flows.iter().filter(|f| f["confirmed"] == true).count() as u64;
                o.confirmed = Some(confirmed);
                o.unconfirmed = Some(flows.len() as u64 - confirmed);
            }
            let pins = proxy_agent::pins::Pins::new(&c.a.bpffs);
            let cap = |name| proxy_agent::conntrack::pinned_capacity(&pins, name).map(|e| u64::from(e) / 2);
            o.confirmed_cap = cap(proxy_common::ct::CT_MAP);
            o.unconfirmed_cap = cap(proxy_common::ct::CT_NEW_MAP);
        }
        let (count, max) = c.a.ns.run(|| {
            let read = |k: &str| std::fs::read_to_string(format!("/proc/sys/net/netfilter/{k}")).ok().and_then(|v| v.trim().parse::<u64>().ok());
            (read("nf_conntrack_count"), read("nf_conntrack_max"))
        });
        o.nf_count = count;
        o.nf_max = max;
        o
    }

    /// The larger of two readings, field by field.
    #[must_use]
    pub fn peak(self, other: Self) -> Self {
        let m = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Self {
            confirmed: m(self.confirmed, other.confirmed),
            unconfirmed: m(self.unconfirmed, other.unconfirmed),
            confirmed_cap: self.confirmed_cap.or(other.confirmed_cap),
            unconfirmed_cap: self.unconfirmed_cap.or(other.unconfirmed_cap),
            nf_count: m(self.nf_count, other.nf_count),
            nf_max: self.nf_max.or(other.nf_max),
        }
    }

    #[must_use]
    pub fn json(&self) -> Value {
        json!({"agent_confirmed_flows": self.confirmed, "agent_unconfirmed_flows": self.unconfirmed,
            "agent_confirmed_capacity_flows": self.confirmed_cap, "agent_unconfirmed_capacity_flows": self.unconfirmed_cap,
            "nf_conntrack_count": self.nf_count, "nf_conntrack_max": self.nf_max})
    }
}

/// One run of a flood case, besides its load figures.
#[derive(Clone, Debug, Default)]
pub struct FloodRep {
    pub pps: u32,
    pub sent: Sent,
    pub survival: Survival,
    /// The readings during the flood (after each measured phase).
    pub occupancy: Vec<Occupancy>,
    /// Node A's datapath counters over this run (agent only): after − before.
    pub counters: Option<BTreeMap<String, u64>>,
}

impl FloodRep {
    /// The highest reading.
    #[must_use]
    pub fn peak(&self) -> Occupancy {
        self.occupancy.iter().copied().reduce(Occupancy::peak).unwrap_or_default()
    }

    #[must_use]
    pub fn json(&self) -> Value {
        json!({"target_packets_per_s": self.pps, "sent": self.sent.json(),
            "established": ESTABLISHED, "established_opened": self.survival.opened, "established_lost": self.survival.lost,
            "busy_requests_during_flood": self.survival.busy_requests, "lost_why": self.survival.why,
            "occupancy": self.occupancy.iter().map(Occupancy::json).collect::<Vec<_>>(), "peak_occupancy": self.peak().json(),
            "counters_delta": self.counters})
    }
}

/// `after − before`, counter by counter.
#[must_use]
pub fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after.iter().map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k).copied().unwrap_or(0)))).collect()
}
