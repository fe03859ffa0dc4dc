//! Typed access to the pinned service maps.
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray},
};
use proxy_common::{
    backend::{BACKEND_MAP, Backend},
    names::{NAMES_MAP, SvcName},
    stats::{STATS_MAP, StatCounter},
    svc::{SVC_MAP, SvcKey, SvcValue},
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
    pub names: Vec<(u32, String)>,
}

/// The writes the reconciler makes. Deleting an absent key succeeds, so
/// every step can be retried.
pub trait ServiceMaps {
    fn dump(&self) -> Result<MapsDump>;
    fn write_backend(&mut self, id: u32, backend: Backend) -> Result<()>;
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    fn write_svc(&mut self, key: SvcKey, value: SvcValue) -> Result<()>;
    fn delete_svc(&mut self, key: SvcKey) -> Result<()>;
    fn write_name(&mut self, svc_id: u32, name: &str) -> Result<()>;
    fn delete_name(&mut self, svc_id: u32) -> Result<()>;
}

/// The real maps, pinned under `--bpffs`.
pub struct BpfMaps {
    svc: HashMap<MapData, SvcKey, SvcValue>,
    backends: HashMap<MapData, u32, Backend>,
    names: HashMap<MapData, u32, SvcName>,
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
            names: HashMap::try_from(take(ebpf, NAMES_MAP)?).map_err(map_err(NAMES_MAP, "open"))?,
        })
    }

    /// Opens the maps pinned under `pins` (for `proxy-agent services`).
    pub fn open_pinned(pins: &Pins) -> Result<Self> {
        Ok(Self {
            svc: HashMap::try_from(Map::HashMap(from_pin(pins, SVC_MAP)?)).map_err(map_err(SVC_MAP, "open"))?,
            backends: HashMap::try_from(Map::HashMap(from_pin(pins, BACKEND_MAP)?))
                .map_err(map_err(BACKEND_MAP, "open"))?,
            names: HashMap::try_from(Map::HashMap(from_pin(pins, NAMES_MAP)?)).map_err(map_err(NAMES_MAP, "open"))?,
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
        let names = self
            .names
            .iter()
            .map(|r| r.map(|(id, n)| (id, n.as_str().to_owned())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(NAMES_MAP, "dump"))?;
        Ok(MapsDump { svc, backends, names })
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

    fn write_name(&mut self, svc_id: u32, name: &str) -> Result<()> {
        self.names.insert(svc_id, SvcName::new(name), 0).map_err(map_err(NAMES_MAP, "update"))
    }

    fn delete_name(&mut self, svc_id: u32) -> Result<()> {
        ignore_missing(self.names.remove(&svc_id)).map_err(map_err(NAMES_MAP, "delete"))
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
