//! Typed access to the pinned service maps.
use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
};
use proxy_common::{
    backend::{BACKEND_MAP, BACKEND6_MAP, Backend, Backend6},
    names::{NAMES_MAP, SvcName},
    stats::{STATS_MAP, StatCounter},
    svc::{SRC_RANGE_MAP, SVC_MAP, SVC6_MAP, SrcRangeKey, Svc6Key, SvcKey, SvcValue},
};

use crate::{
    error::{Error, Result},
    pins::Pins,
};

/// Everything the service maps hold, as read back from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapsDump {
    pub svc: Vec<(SvcKey, SvcValue)>,
    pub backends: Vec<(u32, Backend)>,
    /// The IPv6 maps (same slots, values and id spaces).
    pub svc6: Vec<(Svc6Key, SvcValue)>,
    pub backends6: Vec<(u32, Backend6)>,
    pub names: Vec<(u32, String)>,
    /// `loadBalancerSourceRanges`: (service id, range address, prefix length).
    pub ranges: Vec<(u32, std::net::Ipv4Addr, u8)>,
}

/// The writes the reconciler makes. Deleting an absent key succeeds, so
/// every step can be retried.
pub trait ServiceMaps {
    fn dump(&self) -> Result<MapsDump>;
    fn write_backend(&mut self, id: u32, backend: Backend) -> Result<()>;
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    fn write_svc(&mut self, key: SvcKey, value: SvcValue) -> Result<()>;
    fn delete_svc(&mut self, key: SvcKey) -> Result<()>;
    fn write_backend6(&mut self, id: u32, backend: Backend6) -> Result<()>;
    fn delete_backend6(&mut self, id: u32) -> Result<()>;
    fn write_svc6(&mut self, key: Svc6Key, value: SvcValue) -> Result<()>;
    fn delete_svc6(&mut self, key: Svc6Key) -> Result<()>;
    fn write_name(&mut self, svc_id: u32, name: &str) -> Result<()>;
    fn delete_name(&mut self, svc_id: u32) -> Result<()>;
    fn write_range(&mut self, svc_id: u32, range: (std::net::Ipv4Addr, u8)) -> Result<()>;
    fn delete_range(&mut self, svc_id: u32, range: (std::net::Ipv4Addr, u8)) -> Result<()>;
}

/// The LPM key of range `(addr, len)` of frontend `svc_id`.
fn range_key(svc_id: u32, (addr, len): (std::net::Ipv4Addr, u8)) -> Key<SrcRangeKey> {
    Key::new(32 + u32::from(len), SrcRangeKey { svc_id_be: svc_id.to_be(), addr_be: u32::from(addr).to_be() })
}

/// The real maps, pinned under `--bpffs`.
pub struct BpfMaps {
    svc: HashMap<MapData, SvcKey, SvcValue>,
    backends: HashMap<MapData, u32, Backend>,
    svc6: HashMap<MapData, Svc6Key, SvcValue>,
    backends6: HashMap<MapData, u32, Backend6>,
    names: HashMap<MapData, u32, SvcName>,
    ranges: LpmTrie<MapData, SrcRangeKey, u32>,
}

fn map_err(name: &'static str, op: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, op, source }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name).ok_or(Error::MissingMap { name })
}

fn from_pin(pins: &Pins, name: &'static str) -> Result<MapData> {
    MapData::from_pin(pins.map(name)).map_err(map_err(name, "open pinned map"))
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl BpfMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            svc: HashMap::try_from(take(ebpf, SVC_MAP)?).map_err(map_err(SVC_MAP, "open"))?,
            backends: HashMap::try_from(take(ebpf, BACKEND_MAP)?).map_err(map_err(BACKEND_MAP, "open"))?,
            svc6: HashMap::try_from(take(ebpf, SVC6_MAP)?).map_err(map_err(SVC6_MAP, "open"))?,
            backends6: HashMap::try_from(take(ebpf, BACKEND6_MAP)?).map_err(map_err(BACKEND6_MAP, "open"))?,
            names: HashMap::try_from(take(ebpf, NAMES_MAP)?).map_err(map_err(NAMES_MAP, "open"))?,
            ranges: LpmTrie::try_from(take(ebpf, SRC_RANGE_MAP)?).map_err(map_err(SRC_RANGE_MAP, "open"))?,
        })
    }

    /// Opens the maps pinned under `pins` (for `proxy-agent services`).
    pub fn open_pinned(pins: &Pins) -> Result<Self> {
        Ok(Self {
            svc: HashMap::try_from(Map::HashMap(from_pin(pins, SVC_MAP)?)).map_err(map_err(SVC_MAP, "open"))?,
            backends: HashMap::try_from(Map::HashMap(from_pin(pins, BACKEND_MAP)?))
                .map_err(map_err(BACKEND_MAP, "open"))?,
            svc6: HashMap::try_from(Map::HashMap(from_pin(pins, SVC6_MAP)?)).map_err(map_err(SVC6_MAP, "open"))?,
            backends6: HashMap::try_from(Map::HashMap(from_pin(pins, BACKEND6_MAP)?))
                .map_err(map_err(BACKEND6_MAP, "open"))?,
            names: HashMap::try_from(Map::HashMap(from_pin(pins, NAMES_MAP)?)).map_err(map_err(NAMES_MAP, "open"))?,
            ranges: LpmTrie::try_from(Map::LpmTrie(from_pin(pins, SRC_RANGE_MAP)?)).map_err(map_err(SRC_RANGE_MAP, "open"))?,
        })
    }
}

impl ServiceMaps for BpfMaps {
    fn dump(&self) -> Result<MapsDump> {
        let svc = self.svc.iter().collect::<Result<Vec<_>, _>>().map_err(map_err(SVC_MAP, "dump"))?;
        let backends = self
            .backends
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(BACKEND_MAP, "dump"))?;
        let svc6 = self.svc6.iter().collect::<Result<Vec<_>, _>>().map_err(map_err(SVC6_MAP, "dump"))?;
        let backends6 = self
            .backends6
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(BACKEND6_MAP, "dump"))?;
        let names = self
            .names
            .iter()
            .map(|r| r.map(|(id, n)| (id, n.as_str().to_owned())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(NAMES_MAP, "dump"))?;
        let ranges = self
            .ranges
            .keys()
            .map(|r| {
                r.map(|k| {
                    let d = k.data();
                    let len = u8::try_from(k.prefix_len().saturating_sub(32)).unwrap_or(32);
                    (u32::from_be(d.svc_id_be), std::net::Ipv4Addr::from(u32::from_be(d.addr_be)), len)
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(SRC_RANGE_MAP, "dump"))?;
        Ok(MapsDump { svc, backends, svc6, backends6, names, ranges })
    }

    fn write_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.backends.insert(id, backend, 0).map_err(map_err(BACKEND_MAP, "update"))
    }

    fn delete_backend(&mut self, id: u32) -> Result<()> {
        ignore_missing(self.backends.remove(&id)).map_err(map_err(BACKEND_MAP, "delete"))
    }

    fn write_svc(&mut self, key: SvcKey, value: SvcValue) -> Result<()> {
        self.svc.insert(key, value, 0).map_err(map_err(SVC_MAP, "update"))
    }

    fn delete_svc(&mut self, key: SvcKey) -> Result<()> {
        ignore_missing(self.svc.remove(&key)).map_err(map_err(SVC_MAP, "delete"))
    }

    fn write_backend6(&mut self, id: u32, backend: Backend6) -> Result<()> {
        self.backends6.insert(id, backend, 0).map_err(map_err(BACKEND6_MAP, "update"))
    }

    fn delete_backend6(&mut self, id: u32) -> Result<()> {
        ignore_missing(self.backends6.remove(&id)).map_err(map_err(BACKEND6_MAP, "delete"))
    }

    fn write_svc6(&mut self, key: Svc6Key, value: SvcValue) -> Result<()> {
        self.svc6.insert(key, value, 0).map_err(map_err(SVC6_MAP, "update"))
    }

    fn delete_svc6(&mut self, key: Svc6Key) -> Result<()> {
        ignore_missing(self.svc6.remove(&key)).map_err(map_err(SVC6_MAP, "delete"))
    }

    fn write_name(&mut self, svc_id: u32, name: &str) -> Result<()> {
        self.names.insert(svc_id, SvcName::new(name), 0).map_err(map_err(NAMES_MAP, "update"))
    }

    fn delete_name(&mut self, svc_id: u32) -> Result<()> {
        ignore_missing(self.names.remove(&svc_id)).map_err(map_err(NAMES_MAP, "delete"))
    }

    fn write_range(&mut self, svc_id: u32, range: (std::net::Ipv4Addr, u8)) -> Result<()> {
        self.ranges.insert(&range_key(svc_id, range), 1, 0).map_err(map_err(SRC_RANGE_MAP, "update"))
    }

    fn delete_range(&mut self, svc_id: u32, range: (std::net::Ipv4Addr, u8)) -> Result<()> {
        ignore_missing(self.ranges.remove(&range_key(svc_id, range))).map_err(map_err(SRC_RANGE_MAP, "delete"))
    }
}

/// Reads the per-CPU counters under `pins`, summed over CPUs, in index order.
pub fn read_stats(pins: &Pins) -> Result<Vec<(u32, StatCounter)>> {
    let map = from_pin(pins, STATS_MAP)?;
    let arr: PerCpuArray<MapData, StatCounter> =
        PerCpuArray::try_from(Map::PerCpuArray(map)).map_err(map_err(STATS_MAP, "open"))?;
    let mut out = Vec::new();
    for &(idx, _) in proxy_common::stats::REASONS {
        let values = arr.get(&idx, 0).map_err(map_err(STATS_MAP, "lookup"))?;
        let mut sum = StatCounter::default();
        for v in values.iter() {
            sum.packets += v.packets;
            sum.bytes += v.bytes;
        }
        out.push((idx, sum));
    }
    Ok(out)
}
