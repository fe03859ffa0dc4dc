//! The BPF conntrack seen from userspace: its size (kube-proxy's conntrack
//! flags), the agent's garbage collector, and `proxy-agent conntrack
//! list|flush`. Reads and writes the pinned tables of both families
//! (`proxy_ct_v2`, `proxy_ct_new_v1` and their IPv6 twins), so the commands
//! work while the agent is down.
//!
//! Timestamps are `bpf_ktime_get_ns`, i.e. `CLOCK_MONOTONIC`, which
//! userspace reads the same way.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use proxy_common::ct::{
    CONNTRACK_MAX_PER_CORE_DEFAULT, CONNTRACK_MIN_DEFAULT, CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_CLOSING, CT_F_SEEN_REPLY,
    CT_F_SNAT, CT_MAP, CT_NEW_MAP, CT6_MAP, CT6_NEW_MAP, Ct6Key, Ct6Value, CtKey, CtValue, timeout_ns,
};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    model::Protocol,
    pins::{NAMES_MAP, Pins},
};

/// kube-proxy's conntrack sizing flags (`--conntrack-max-per-core`,
/// `--conntrack-min`) and ours (`--conntrack-max`, an absolute number that
/// wins when set). All count flows; the map holds two entries per flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizing {
    pub max: Option<u32>,
    pub min: u32,
    pub max_per_core: u32,
}

impl Default for Sizing {
    fn default() -> Self {
        Self { max: None, min: CONNTRACK_MIN_DEFAULT, max_per_core: CONNTRACK_MAX_PER_CORE_DEFAULT }
    }
}

impl Sizing {
    /// Flows for a node with `cpus` CPUs: `--conntrack-max` if given (and
    /// not 0), else `max(--conntrack-min, --conntrack-max-per-core × cpus)`,
    /// as kube-proxy computes `nf_conntrack_max` (a per-core value of 0
    /// means "leave it": the minimum).
    #[must_use]
    pub fn flows(&self, cpus: u32) -> u32 {
        if let Some(m) = self.max.filter(|m| *m > 0) {
            return m;
        }
        self.min.max(self.max_per_core.saturating_mul(cpus)).max(1)
    }

    /// Entries of the conntrack map (two per flow).
    #[must_use]
    pub fn map_entries(&self, cpus: u32) -> u32 {
        self.flows(cpus).saturating_mul(2)
    }

    /// Entries of the unconfirmed flows' table: a quarter of the
    /// conntrack's (at least 1,024). Flows wait there for a round trip;
    /// a flood churns this table alone.
    #[must_use]
    pub fn new_map_entries(&self, cpus: u32) -> u32 {
        (self.map_entries(cpus) / 4).max(1024)
    }
}

/// CPUs the kernel may run programs on.
#[must_use]
pub fn possible_cpus() -> u32 {
    aya::util::nr_cpus().ok().and_then(|n| u32::try_from(n).ok()).unwrap_or(1)
}

/// `CLOCK_MONOTONIC` in ns: `bpf_ktime_get_ns`'s clock.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// One family's conntrack entries, as userspace reads them.
trait Family: Sized {
    type K: aya::Pod + Copy;
    type V: aya::Pod + Copy;
    /// (map name, holds confirmed flows)
    const TABLES: [(&'static str, bool); 2];
    fn proto(k: &Self::K) -> u8;
    fn dir(k: &Self::K) -> u8;
    fn client(k: &Self::K) -> SocketAddr;
    fn frontend(k: &Self::K) -> SocketAddr;
    fn flags(v: &Self::V) -> u8;
    fn last_seen(v: &Self::V) -> u64;
    fn backend(v: &Self::V) -> SocketAddr;
    fn snat(v: &Self::V) -> SocketAddr;
    fn ids(v: &Self::V) -> (u32, u32);
    /// The REPLY key of the flow whose SERVICE entry is (k, v).
    fn reply_key(k: &Self::K, v: &Self::V) -> Self::K;
}

fn v4(a: u32, p: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from_be(a))), u16::from_be(p))
}

fn v6(a: [u8; 16], p: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), u16::from_be(p))
}

struct V4;
impl Family for V4 {
    type K = CtKey;
    type V = CtValue;
    const TABLES: [(&'static str, bool); 2] = [(CT_MAP, true), (CT_NEW_MAP, false)];
    fn proto(k: &CtKey) -> u8 { k.proto }
    fn dir(k: &CtKey) -> u8 { k.dir }
    fn client(k: &CtKey) -> SocketAddr { v4(k.saddr_be, k.sport_be) }
    fn frontend(k: &CtKey) -> SocketAddr { v4(k.daddr_be, k.dport_be) }
    fn flags(v: &CtValue) -> u8 { v.flags }
    fn last_seen(v: &CtValue) -> u64 { v.last_seen_ns }
    fn backend(v: &CtValue) -> SocketAddr { v4(v.nat_addr_be, v.nat_port_be) }
    fn snat(v: &CtValue) -> SocketAddr { v4(v.snat_addr_be, v.snat_port_be) }
    fn ids(v: &CtValue) -> (u32, u32) { (v.backend_id, v.svc_id) }
    fn reply_key(k: &CtKey, v: &CtValue) -> CtKey {
        let (src, sport) = if v.flags & CT_F_SNAT != 0 { (v.snat_addr_be, v.snat_port_be) } else { (k.saddr_be, k.sport_be) };
        CtKey { saddr_be: v.nat_addr_be, daddr_be: src, sport_be: v.nat_port_be, dport_be: sport, proto: k.proto, dir: CT_DIR_REPLY, _pad: [0; 2] }
    }
}

struct V6;
impl Family for V6 {
    type K = Ct6Key;
    type V = Ct6Value;
    const TABLES: [(&'static str, bool); 2] = [(CT6_MAP, true), (CT6_NEW_MAP, false)];
    fn proto(k: &Ct6Key) -> u8 { k.proto }
    fn dir(k: &Ct6Key) -> u8 { k.dir }
    fn client(k: &Ct6Key) -> SocketAddr { v6(k.saddr, k.sport_be) }
    fn frontend(k: &Ct6Key) -> SocketAddr { v6(k.daddr, k.dport_be) }
    fn flags(v: &Ct6Value) -> u8 { v.flags }
    fn last_seen(v: &Ct6Value) -> u64 { v.last_seen_ns }
    fn backend(v: &Ct6Value) -> SocketAddr { v6(v.nat_addr, v.nat_port_be) }
    fn snat(v: &Ct6Value) -> SocketAddr { v6(v.snat_addr, v.snat_port_be) }
    fn ids(v: &Ct6Value) -> (u32, u32) { (v.backend_id, v.svc_id) }
    fn reply_key(k: &Ct6Key, v: &Ct6Value) -> Ct6Key {
        let (src, sport) = if v.flags & CT_F_SNAT != 0 { (v.snat_addr, v.snat_port_be) } else { (k.saddr, k.sport_be) };
        Ct6Key { saddr: v.nat_addr, daddr: src, sport_be: v.nat_port_be, dport_be: sport, proto: k.proto, dir: CT_DIR_REPLY, _pad: [0; 2] }
    }
}

fn map_err(name: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, op, source }
}

/// A pinned conntrack table.
fn open<F: Family>(pins: &Pins, name: &'static str) -> Result<HashMap<MapData, F::K, F::V>> {
    let data = MapData::from_pin(pins.map(name)).map_err(map_err(name, "open pinned map"))?;
    HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name, "open"))
}

/// Capacity (`max_entries`) of a pinned conntrack table, if pinned.
#[must_use]
pub fn pinned_capacity(pins: &Pins, name: &str) -> Option<u32> {
    let data = MapData::from_pin(pins.map(name)).ok()?;
    data.info().ok().map(|i| i.max_entries())
}

fn all<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> Vec<(K, V)> {
    // An entry deleted by the kernel between listing and reading is skipped.
    map.iter().filter_map(std::result::Result::ok).collect()
}

fn expired<F: Family>(k: &F::K, v: &F::V, now: u64, confirmed: bool) -> bool {
    now.saturating_sub(F::last_seen(v)) > timeout_ns(F::flags(v), F::proto(k), confirmed)
}

/// What one garbage-collection pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries present before the pass.
    pub entries: u64,
    pub deleted: u64,
    pub capacity: u64,
    pub elapsed: Duration,
}

/// Deletes expired entries, so the LRU's room goes to live flows rather
/// than to the oldest still-valid ones (and a spoofed SYN's entry, 60 s
/// old, is gone before it could push out an idle established flow).
pub fn gc(pins: &Pins) -> Result<Vec<(&'static str, GcReport)>> {
    let mut out = gc_family::<V4>(pins)?;
    out.extend(gc_family::<V6>(pins)?);
    Ok(out)
}

fn gc_family<F: Family>(pins: &Pins) -> Result<Vec<(&'static str, GcReport)>> {
    let mut out = Vec::new();
    for (name, confirmed) in F::TABLES {
        let start = Instant::now();
        let mut map = open::<F>(pins, name)?;
        let capacity = pinned_capacity(pins, name).map_or(0, u64::from);
        let now = monotonic_ns();
        let entries = all(&map);
        let mut deleted = 0;
        for (k, _) in &entries {
            // Re-read: a packet may have refreshed it since the listing.
            let Ok(cur) = map.get(k, 0) else { continue };
            if expired::<F>(k, &cur, now, confirmed) && map.remove(k).is_ok() {
                deleted += 1;
            }
        }
        out.push((name, GcReport { entries: entries.len() as u64, deleted, capacity, elapsed: start.elapsed() }));
    }
    Ok(out)
}

/// One tracked flow, as `proxy-agent conntrack` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowView {
    /// `IPv4` or `IPv6`.
    pub family: String,
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// The source the backend sees when it is `NATed` (node address:port).
    pub snat: Option<String>,
    /// TCP: `SYN_SENT` (no reply yet), `SYN_RECV` (replied, not confirmed),
    /// `ESTABLISHED` (confirmed), `CLOSING`; SCTP: `COOKIE_WAIT`,
    /// `COOKIE_ECHOED`, `ESTABLISHED`, `CLOSING`; UDP: `UNREPLIED`,
    /// `REPLIED`, `ASSURED` (confirmed).
    pub state: String,
    /// In the confirmed table (where floods cannot evict it).
    pub confirmed: bool,
    pub age_seconds: f64,
    pub expires_in_seconds: f64,
    pub backend_id: u32,
    pub service: String,
}

fn state(proto: u8, flags: u8, confirmed: bool) -> &'static str {
    if proto == proxy_common::proto::SCTP {
        // conntrack's names for the same points of an association.
        return match (flags & CT_F_CLOSING != 0, confirmed, flags & CT_F_SEEN_REPLY != 0) {
            (true, _, _) => "CLOSING",
            (false, true, _) => "ESTABLISHED",
            (false, false, true) => "COOKIE_ECHOED",
            (false, false, false) => "COOKIE_WAIT",
        };
    }
    let tcp = proto == proxy_common::proto::TCP;
    match (tcp, flags & CT_F_CLOSING != 0, confirmed, flags & CT_F_SEEN_REPLY != 0) {
        (true, true, _, _) => "CLOSING",
        (true, false, true, _) => "ESTABLISHED",
        (true, false, false, true) => "SYN_RECV",
        (true, false, false, false) => "SYN_SENT",
        (false, _, true, _) => "ASSURED",
        (false, _, false, true) => "REPLIED",
        (false, _, false, false) => "UNREPLIED",
    }
}

fn names(pins: &Pins) -> BTreeMap<u32, String> {
    let Ok(data) = MapData::from_pin(pins.map(NAMES_MAP)) else { return BTreeMap::new() };
    let Ok(m) = HashMap::<_, u32, proxy_common::names::SvcName>::try_from(Map::HashMap(data)) else {
        return BTreeMap::new();
    };
    m.iter().filter_map(std::result::Result::ok).map(|(id, n)| (id, n.as_str().to_owned())).collect()
}

/// The live flows (one per SERVICE entry) of both families, oldest first.
pub fn list(pins: &Pins) -> Result<Vec<FlowView>> {
    let names = names(pins);
    let mut out = list_family::<V4>(pins, &names)?;
    out.extend(list_family::<V6>(pins, &names)?);
    out.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
    Ok(out)
}

#[expect(clippy::cast_precision_loss, reason = "seconds for people")]
fn list_family<F: Family>(pins: &Pins, names: &BTreeMap<u32, String>) -> Result<Vec<FlowView>> {
    let now = monotonic_ns();
    let mut rows = Vec::new();
    for (name, confirmed) in F::TABLES {
        rows.extend(all(&open::<F>(pins, name)?).into_iter().map(|(k, v)| (k, v, confirmed)));
    }
    Ok(rows
        .into_iter()
        .filter(|(k, v, confirmed)| F::dir(k) == CT_DIR_SERVICE && !expired::<F>(k, v, now, *confirmed))
        .map(|(k, v, confirmed)| {
            let age = now.saturating_sub(F::last_seen(&v));
            let (proto, flags) = (F::proto(&k), F::flags(&v));
            let (backend_id, svc_id) = F::ids(&v);
            FlowView {
                family: if F::client(&k).is_ipv4() { "IPv4" } else { "IPv6" }.to_owned(),
                protocol: Protocol::from_number(proto).map_or_else(|| proto.to_string(), |p| p.as_str().to_owned()),
                client: F::client(&k).to_string(),
                frontend: F::frontend(&k).to_string(),
                backend: F::backend(&v).to_string(),
                snat: (flags & CT_F_SNAT != 0).then(|| F::snat(&v).to_string()),
                state: state(proto, flags, confirmed).to_owned(),
                confirmed,
                age_seconds: age as f64 / 1e9,
                expires_in_seconds: timeout_ns(flags, proto, confirmed).saturating_sub(age) as f64 / 1e9,
                backend_id,
                service: names.get(&svc_id).cloned().unwrap_or_default(),
            }
        })
        .collect())
}

/// `--frontend ADDR:PORT[/PROTO]` of `conntrack flush`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendFilter {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Option<Protocol>,
}

impl std::str::FromStr for FrontendFilter {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (ap, proto) = match s.split_once('/') {
            Some((ap, p)) => {
                let proto = match p.to_ascii_uppercase().as_str() {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    "SCTP" => Protocol::Sctp,
                    _ => return Err(format!("{s:?}: protocol must be TCP, UDP or SCTP")),
                };
                (ap, Some(proto))
            }
            None => (s, None),
        };
        let sa: SocketAddr = ap.parse().map_err(|_| format!("{s:?} is not ADDR:PORT[/PROTO] (IPv6: [ADDR]:PORT)"))?;
        Ok(Self { addr: sa.ip(), port: sa.port(), protocol: proto })
    }
}

/// Removes the flows (both entries) to `frontend`, or all flows. Returns
/// how many flows were removed. Established connections of removed flows
/// are balanced anew by their next SYN; their other packets are dropped
/// (`drop_tcp_no_flow`), as after a conntrack flush with kube-proxy.
pub fn flush(pins: &Pins, frontend: Option<FrontendFilter>) -> Result<usize> {
    let mut flows = 0;
    for (name, _) in V4::TABLES {
        flows += flush_table::<V4>(&mut open::<V4>(pins, name)?, frontend);
    }
    for (name, _) in V6::TABLES {
        flows += flush_table::<V6>(&mut open::<V6>(pins, name)?, frontend);
    }
    Ok(flows)
}

fn flush_table<F: Family>(map: &mut HashMap<MapData, F::K, F::V>, frontend: Option<FrontendFilter>) -> usize {
    let entries = all(map);
    let matches = |k: &F::K| {
        frontend.is_none_or(|f| {
            let fe = F::frontend(k);
            fe.ip() == f.addr && fe.port() == f.port && f.protocol.is_none_or(|p| p.number() == F::proto(k))
        })
    };
    let mut flows = 0;
    for (k, v) in entries.iter().filter(|(k, _)| F::dir(k) == CT_DIR_SERVICE && matches(k)) {
        let _ = map.remove(&F::reply_key(k, v));
        if map.remove(k).is_ok() {
            flows += 1;
        }
    }
    if frontend.is_none() {
        // Leftover halves (a REPLY whose SERVICE entry the LRU evicted).
        for (k, _) in all(map) {
            let _ = map.remove(&k);
        }
    }
    flows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizing_follows_kube_proxys_flags() {
        let d = Sizing::default();
        assert_eq!(d.flows(2), 131_072, "2 cores: the minimum");
        assert_eq!(d.flows(64), 64 * 32_768, "64 cores: per core");
        assert_eq!(d.map_entries(2), 262_144, "two entries per flow");
        assert_eq!(Sizing { max: Some(1000), ..d }.flows(64), 1000, "--conntrack-max wins");
        assert_eq!(Sizing { max: Some(0), ..d }.flows(2), 131_072, "--conntrack-max 0: derived");
        assert_eq!(Sizing { max_per_core: 0, ..d }.flows(64), 131_072);
    }

    #[test]
    fn frontend_filter_parses_address_port_and_protocol() {
        let f: FrontendFilter = "10.96.0.10:53/udp".parse().unwrap();
        assert_eq!((f.addr, f.port, f.protocol), (IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 53, Some(Protocol::Udp)));
        let f: FrontendFilter = "[fd00::10]:53/udp".parse().unwrap();
        assert_eq!(f.addr, "fd00::10".parse::<IpAddr>().unwrap());
        let f: FrontendFilter = "10.96.0.10:80".parse().unwrap();
        assert_eq!(f.protocol, None);
        assert!("10.96.0.10".parse::<FrontendFilter>().is_err());
        let s: FrontendFilter = "10.96.0.10:3868/sctp".parse().unwrap();
        assert_eq!(s.protocol, Some(Protocol::Sctp));
        assert!("10.96.0.10:80/ICMP".parse::<FrontendFilter>().is_err());
    }
}
