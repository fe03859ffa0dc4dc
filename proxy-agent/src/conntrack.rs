//! The BPF conntrack seen from userspace: its size (kube-proxy's conntrack
//! flags), the agent's garbage collector, and `proxy-agent conntrack
//! list|flush`. Reads and writes the pinned `proxy_ct_v2` map, so the
//! commands work while the agent is down.
//!
//! Timestamps are `bpf_ktime_get_ns`, i.e. `CLOCK_MONOTONIC`, which
//! userspace reads the same way.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use proxy_common::ct::{
    CONNTRACK_MAX_PER_CORE_DEFAULT, CONNTRACK_MIN_DEFAULT, CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_CLOSING, CT_F_SEEN_REPLY,
    CT_F_SNAT, CT_MAP, CT_NEW_MAP, CtKey, CtValue, timeout_ns,
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

/// The two tables: (map name, holds confirmed flows).
const TABLES: [(&str, bool); 2] = [(CT_MAP, true), (CT_NEW_MAP, false)];

fn map_err(name: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, op, source }
}

/// A pinned conntrack table.
fn open(pins: &Pins, name: &'static str) -> Result<HashMap<MapData, CtKey, CtValue>> {
    let data = MapData::from_pin(pins.map(name)).map_err(map_err(name, "open pinned map"))?;
    HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name, "open"))
}

/// Capacity (`max_entries`) of a pinned conntrack table, if pinned.
#[must_use]
pub fn pinned_capacity(pins: &Pins, name: &str) -> Option<u32> {
    let data = MapData::from_pin(pins.map(name)).ok()?;
    data.info().ok().map(|i| i.max_entries())
}

fn all(map: &HashMap<MapData, CtKey, CtValue>) -> Vec<(CtKey, CtValue)> {
    // An entry deleted by the kernel between listing and reading is skipped.
    map.iter().filter_map(std::result::Result::ok).collect()
}

fn expired(k: &CtKey, v: &CtValue, now: u64, confirmed: bool) -> bool {
    now.saturating_sub(v.last_seen_ns) > timeout_ns(v.flags, k.proto, confirmed)
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
    let mut out = Vec::new();
    for (name, confirmed) in TABLES {
        let start = Instant::now();
        let mut map = open(pins, name)?;
        let capacity = pinned_capacity(pins, name).map_or(0, u64::from);
        let now = monotonic_ns();
        let entries = all(&map);
        let mut deleted = 0;
        for (k, _) in &entries {
            // Re-read: a packet may have refreshed it since the listing.
            let Ok(cur) = map.get(k, 0) else { continue };
            if expired(k, &cur, now, confirmed) && map.remove(k).is_ok() {
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
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// The source the backend sees when it is NATed (node address:port).
    pub snat: Option<String>,
    /// TCP: `SYN_SENT` (no reply yet), `SYN_RECV` (replied, not confirmed),
    /// `ESTABLISHED` (confirmed), `CLOSING`; UDP: `UNREPLIED`, `REPLIED`,
    /// `ASSURED` (confirmed).
    pub state: String,
    /// In the confirmed table (where floods cannot evict it).
    pub confirmed: bool,
    pub age_seconds: f64,
    pub expires_in_seconds: f64,
    pub backend_id: u32,
    pub service: String,
}

fn addr(a: u32, p: u16) -> String {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a)), u16::from_be(p)).to_string()
}

fn state(k: &CtKey, v: &CtValue, confirmed: bool) -> &'static str {
    let tcp = k.proto == proxy_common::proto::TCP;
    match (tcp, v.flags & CT_F_CLOSING != 0, confirmed, v.flags & CT_F_SEEN_REPLY != 0) {
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

/// The live flows (one per SERVICE entry), oldest first.
pub fn list(pins: &Pins) -> Result<Vec<FlowView>> {
    let names = names(pins);
    let now = monotonic_ns();
    let mut rows = Vec::new();
    for (name, confirmed) in TABLES {
        rows.extend(all(&open(pins, name)?).into_iter().map(|(k, v)| (k, v, confirmed)));
    }
    let mut out: Vec<FlowView> = rows
        .into_iter()
        .filter(|(k, v, confirmed)| k.dir == CT_DIR_SERVICE && !expired(k, v, now, *confirmed))
        .map(|(k, v, confirmed)| {
            let age = now.saturating_sub(v.last_seen_ns);
            FlowView {
                protocol: Protocol::from_number(k.proto).map_or_else(|| k.proto.to_string(), |p| p.as_str().to_owned()),
                client: addr(k.saddr_be, k.sport_be),
                frontend: addr(k.daddr_be, k.dport_be),
                backend: addr(v.nat_addr_be, v.nat_port_be),
                snat: (v.flags & CT_F_SNAT != 0).then(|| addr(v.snat_addr_be, v.snat_port_be)),
                state: state(&k, &v, confirmed).to_owned(),
                confirmed,
                age_seconds: age as f64 / 1e9,
                expires_in_seconds: timeout_ns(v.flags, k.proto, confirmed).saturating_sub(age) as f64 / 1e9,
                backend_id: v.backend_id,
                service: names.get(&v.svc_id).cloned().unwrap_or_default(),
            }
        })
        .collect();
    out.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
    Ok(out)
}

/// `--frontend ADDR:PORT[/PROTO]` of `conntrack flush`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendFilter {
    pub addr: Ipv4Addr,
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
                    _ => return Err(format!("{s:?}: protocol must be TCP or UDP")),
                };
                (ap, Some(proto))
            }
            None => (s, None),
        };
        let sa: SocketAddrV4 = ap.parse().map_err(|_| format!("{s:?} is not ADDR:PORT[/PROTO]"))?;
        Ok(Self { addr: *sa.ip(), port: sa.port(), protocol: proto })
    }
}

/// Removes the flows (both entries) to `frontend`, or all flows. Returns
/// how many flows were removed. Established connections of removed flows
/// are balanced anew by their next SYN; their other packets are dropped
/// (`drop_tcp_no_flow`), as after a conntrack flush with kube-proxy.
pub fn flush(pins: &Pins, frontend: Option<FrontendFilter>) -> Result<usize> {
    let mut flows = 0;
    for (name, _) in TABLES {
        flows += flush_table(&mut open(pins, name)?, frontend);
    }
    Ok(flows)
}

fn flush_table(map: &mut HashMap<MapData, CtKey, CtValue>, frontend: Option<FrontendFilter>) -> usize {
    let entries = all(map);
    let matches = |k: &CtKey| {
        frontend.is_none_or(|f| {
            u32::from_be(k.daddr_be) == u32::from(f.addr)
                && u16::from_be(k.dport_be) == f.port
                && f.protocol.is_none_or(|p| p.number() == k.proto)
        })
    };
    let mut flows = 0;
    for (k, v) in entries.iter().filter(|(k, _)| k.dir == CT_DIR_SERVICE && matches(k)) {
        let (src, sport) = if v.flags & CT_F_SNAT != 0 { (v.snat_addr_be, v.snat_port_be) } else { (k.saddr_be, k.sport_be) };
        let rk = CtKey { saddr_be: v.nat_addr_be, daddr_be: src, sport_be: v.nat_port_be, dport_be: sport, proto: k.proto, dir: CT_DIR_REPLY, _pad: [0; 2] };
        let _ = map.remove(&rk);
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
        assert_eq!((f.addr, f.port, f.protocol), (Ipv4Addr::new(10, 96, 0, 10), 53, Some(Protocol::Udp)));
        let f: FrontendFilter = "10.96.0.10:80".parse().unwrap();
        assert_eq!(f.protocol, None);
        assert!("10.96.0.10".parse::<FrontendFilter>().is_err());
        assert!("10.96.0.10:80/SCTP".parse::<FrontendFilter>().is_err());
    }
}
