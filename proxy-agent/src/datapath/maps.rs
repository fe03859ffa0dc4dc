//! Typed access to the pinned service maps, written and read in batches (see
//! [`batch`]).
mod batch;

use std::os::fd::AsFd as _;

use aya::{
    Ebpf, Pod,
    maps::{HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
    sys::SyscallError,
};
use proxy_common::{
    backend::{BACKEND_MAP, BACKEND6_MAP, Backend, Backend6},
    names::{NAMES_MAP, SvcName},
    stats::{ByFamily, STATS_MAP, StatCounter, stats_slot},
    svc::{SRC_RANGE_MAP, SRC_RANGE6_MAP, SVC_MAP, SVC6_MAP, SrcRange6Key, SrcRangeKey, Svc6Key, SvcKey, SvcValue},
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
    /// `loadBalancerSourceRanges` of both families: (service id, range
    /// address, prefix length).
    pub ranges: Vec<(u32, std::net::IpAddr, u8)>,
}

/// A source range of a frontend: (service id, (range address, prefix
/// length)); written to the LPM trie of its family.
pub type SrcRange = (u32, (std::net::IpAddr, u8));

/// Entries to write to one map, in order: `keys[i]` → `values[i]`.
#[derive(Clone, Copy, Debug)]
pub enum Update<'a> {
    Backends(&'a [u32], &'a [Backend]),
    Backends6(&'a [u32], &'a [Backend6]),
    Svc(&'a [SvcKey], &'a [SvcValue]),
    Svc6(&'a [Svc6Key], &'a [SvcValue]),
    Names(&'a [u32], &'a [SvcName]),
    Ranges(&'a [SrcRange]),
}

/// Keys to delete from one map, in order.
#[derive(Clone, Copy, Debug)]
pub enum Delete<'a> {
    Backends(&'a [u32]),
    Backends6(&'a [u32]),
    Svc(&'a [SvcKey]),
    Svc6(&'a [Svc6Key]),
    Names(&'a [u32]),
    Ranges(&'a [SrcRange]),
}

/// A batch that stopped part-way: its first `written` entries are written
/// (or deleted), entry `written` failed with `error`, the rest were not
/// tried.
#[derive(Debug)]
pub struct BatchError {
    pub written: usize,
    pub error: Error,
}

/// The writes the reconciler makes, each a batch of entries of one map,
/// taken in order (one bpf(2) call for the whole batch where the kernel
/// can). Deleting an absent key succeeds, so every step can be retried.
pub trait ServiceMaps {
    fn dump(&self) -> Result<MapsDump>;
    fn update(&mut self, batch: Update<'_>) -> Result<(), BatchError>;
    fn delete(&mut self, batch: Delete<'_>) -> Result<(), BatchError>;
}

/// The LPM key of IPv4 range `(addr, len)` of frontend `svc_id`.
fn range_key(svc_id: u32, addr: std::net::Ipv4Addr, len: u8) -> Key<SrcRangeKey> {
    Key::new(32 + u32::from(len), SrcRangeKey { svc_id_be: svc_id.to_be(), addr_be: u32::from(addr).to_be() })
}

/// The LPM key of IPv6 range `(addr, len)` of frontend `svc_id`.
fn range6_key(svc_id: u32, addr: std::net::Ipv6Addr, len: u8) -> Key<SrcRange6Key> {
    Key::new(32 + u32::from(len), SrcRange6Key { svc_id_be: svc_id.to_be(), addr: addr.octets() })
}

/// `ranges` cut into runs of one family, in order: (offset of the run in
/// `ranges`, the run). A batch goes to one map; running the runs in order
/// keeps "the first `written` entries are written" true across the two.
fn family_runs(ranges: &[SrcRange]) -> impl Iterator<Item = (usize, &[SrcRange])> {
    let mut start = 0;
    std::iter::from_fn(move || {
        let first = ranges.get(start)?;
        let v6 = first.1.0.is_ipv6();
        let len = ranges[start..].iter().take_while(|r| r.1.0.is_ipv6() == v6).count();
        let run = (start, &ranges[start..start + len]);
        start += len;
        Some(run)
    })
}

fn v4(a: std::net::IpAddr) -> Option<std::net::Ipv4Addr> {
    match a {
        std::net::IpAddr::V4(a) => Some(a),
        std::net::IpAddr::V6(_) => None,
    }
}

fn v6(a: std::net::IpAddr) -> Option<std::net::Ipv6Addr> {
    match a {
        std::net::IpAddr::V6(a) => Some(a),
        std::net::IpAddr::V4(_) => None,
    }
}

/// A run's failure as a failure of the whole batch.
fn at(offset: usize) -> impl Fn(BatchError) -> BatchError {
    move |e| BatchError { written: offset + e.written, error: e.error }
}

/// The real maps, pinned under `--bpffs`.
pub struct BpfMaps {
    svc: HashMap<MapData, SvcKey, SvcValue>,
    backends: HashMap<MapData, u32, Backend>,
    svc6: HashMap<MapData, Svc6Key, SvcValue>,
    backends6: HashMap<MapData, u32, Backend6>,
    names: HashMap<MapData, u32, SvcName>,
    ranges: LpmTrie<MapData, SrcRangeKey, u32>,
    ranges6: LpmTrie<MapData, SrcRange6Key, u32>,
    batching: Batching,
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
            ranges6: LpmTrie::try_from(take(ebpf, SRC_RANGE6_MAP)?).map_err(map_err(SRC_RANGE6_MAP, "open"))?,
            batching: Batching::default(),
        })
    }

    /// bpf(2) calls the writes made so far: one per batch where the kernel
    /// batches, one per entry where it does not.
    #[must_use]
    pub fn write_calls(&self) -> u64 {
        self.batching.calls
    }

    /// The maps whose updates (`false`) or deletes (`true`) the kernel
    /// refused to batch, so they go entry by entry.
    #[must_use]
    pub fn unbatched(&self) -> &[(&'static str, bool)] {
        &self.batching.refused
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
            ranges6: LpmTrie::try_from(Map::LpmTrie(from_pin(pins, SRC_RANGE6_MAP)?)).map_err(map_err(SRC_RANGE6_MAP, "open"))?,
            batching: Batching::default(),
        })
    }
}

impl ServiceMaps for BpfMaps {
    fn dump(&self) -> Result<MapsDump> {
        let svc = dump_hash(SVC_MAP, &self.svc)?;
        let backends = dump_hash(BACKEND_MAP, &self.backends)?;
        let svc6 = dump_hash(SVC6_MAP, &self.svc6)?;
        let backends6 = dump_hash(BACKEND6_MAP, &self.backends6)?;
        let names = dump_hash(NAMES_MAP, &self.names)?.into_iter().map(|(id, n)| (id, n.as_str().to_owned())).collect();
        let mut ranges = self
            .ranges
            .keys()
            .map(|r| {
                r.map(|k| {
                    let d = k.data();
                    let len = u8::try_from(k.prefix_len().saturating_sub(32)).unwrap_or(32);
                    (u32::from_be(d.svc_id_be), std::net::IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(d.addr_be))), len)
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(SRC_RANGE_MAP, "dump"))?;
        for r in self.ranges6.keys() {
            let k = r.map_err(map_err(SRC_RANGE6_MAP, "dump"))?;
            let d = k.data();
            let len = u8::try_from(k.prefix_len().saturating_sub(32)).unwrap_or(128);
            ranges.push((u32::from_be(d.svc_id_be), std::net::IpAddr::V6(std::net::Ipv6Addr::from(d.addr)), len));
        }
        Ok(MapsDump { svc, backends, svc6, backends6, names, ranges })
    }

    fn update(&mut self, batch: Update<'_>) -> Result<(), BatchError> {
        let on = &mut self.batching;
        match batch {
            Update::Backends(k, v) => on.update_hash(BACKEND_MAP, &mut self.backends, k, v),
            Update::Backends6(k, v) => on.update_hash(BACKEND6_MAP, &mut self.backends6, k, v),
            Update::Svc(k, v) => on.update_hash(SVC_MAP, &mut self.svc, k, v),
            Update::Svc6(k, v) => on.update_hash(SVC6_MAP, &mut self.svc6, k, v),
            Update::Names(k, v) => on.update_hash(NAMES_MAP, &mut self.names, k, v),
            Update::Ranges(r) => {
                for (offset, run) in family_runs(r) {
                    let ones = vec![1u32; run.len()];
                    if run[0].1.0.is_ipv4() {
                        let keys: Vec<Key<SrcRangeKey>> = run.iter().filter_map(|&(id, (a, l))| v4(a).map(|a| range_key(id, a, l))).collect();
                        on.update(SRC_RANGE_MAP, self.ranges.map(), &keys, &ones)
                            .unwrap_or_else(|| each(&mut on.calls, SRC_RANGE_MAP, false, keys.iter(), |k| self.ranges.insert(k, 1, 0)))
                            .map_err(at(offset))?;
                    } else {
                        let keys: Vec<Key<SrcRange6Key>> = run.iter().filter_map(|&(id, (a, l))| v6(a).map(|a| range6_key(id, a, l))).collect();
                        on.update(SRC_RANGE6_MAP, self.ranges6.map(), &keys, &ones)
                            .unwrap_or_else(|| each(&mut on.calls, SRC_RANGE6_MAP, false, keys.iter(), |k| self.ranges6.insert(k, 1, 0)))
                            .map_err(at(offset))?;
                    }
                }
                Ok(())
            }
        }
    }

    fn delete(&mut self, batch: Delete<'_>) -> Result<(), BatchError> {
        let on = &mut self.batching;
        match batch {
            Delete::Backends(k) => on.delete_hash(BACKEND_MAP, &mut self.backends, k),
            Delete::Backends6(k) => on.delete_hash(BACKEND6_MAP, &mut self.backends6, k),
            Delete::Svc(k) => on.delete_hash(SVC_MAP, &mut self.svc, k),
            Delete::Svc6(k) => on.delete_hash(SVC6_MAP, &mut self.svc6, k),
            Delete::Names(k) => on.delete_hash(NAMES_MAP, &mut self.names, k),
            Delete::Ranges(r) => {
                for (offset, run) in family_runs(r) {
                    if run[0].1.0.is_ipv4() {
                        let keys: Vec<Key<SrcRangeKey>> = run.iter().filter_map(|&(id, (a, l))| v4(a).map(|a| range_key(id, a, l))).collect();
                        on.delete(SRC_RANGE_MAP, self.ranges.map(), &keys)
                            .unwrap_or_else(|| each(&mut on.calls, SRC_RANGE_MAP, true, keys.iter(), |k| self.ranges.remove(k)))
                            .map_err(at(offset))?;
                    } else {
                        let keys: Vec<Key<SrcRange6Key>> = run.iter().filter_map(|&(id, (a, l))| v6(a).map(|a| range6_key(id, a, l))).collect();
                        on.delete(SRC_RANGE6_MAP, self.ranges6.map(), &keys)
                            .unwrap_or_else(|| each(&mut on.calls, SRC_RANGE6_MAP, true, keys.iter(), |k| self.ranges6.remove(k)))
                            .map_err(at(offset))?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Every entry of hash map `map`: in batches where the kernel can, else
/// key by key (aya's walk: two bpf(2) calls per entry).
fn dump_hash<K: Pod, V: Pod>(name: &'static str, map: &HashMap<MapData, K, V>) -> Result<Vec<(K, V)>> {
    match batch::lookup_all(map.map().fd().as_fd()) {
        Ok(entries) => Ok(entries),
        Err(s) if s.unsupported => map.iter().collect::<Result<Vec<_>, _>>().map_err(map_err(name, "dump")),
        Err(s) => Err(Error::Map { name, op: "dump", source: MapError::SyscallError(SyscallError { call: "BPF_MAP_LOOKUP_BATCH", io_error: s.error }) }),
    }
}

/// Writes (or deletes) `items` one bpf(2) call each, stopping at the first
/// failure. A delete of an absent key succeeds.
fn each<T>(calls: &mut u64, name: &'static str, delete: bool, items: impl Iterator<Item = T>, mut one: impl FnMut(T) -> Result<(), MapError>) -> Result<(), BatchError> {
    for (written, item) in items.enumerate() {
        *calls += 1;
        let res = one(item);
        let res = if delete { ignore_missing(res) } else { res };
        res.map_err(|source| BatchError { written, error: Error::Map { name, op: if delete { "delete" } else { "update" }, source } })?;
    }
    Ok(())
}

/// Which maps the kernel writes in batches: all of them until it refuses
/// one (a kernel before 5.6, or a map type without batch operations), then
/// that map's writes (or deletes) go entry by entry, with a warning saying
/// why.
#[derive(Debug, Default)]
struct Batching {
    /// (map, delete?) the kernel refused to batch.
    refused: Vec<(&'static str, bool)>,
    /// bpf(2) write calls made (a batch is one per `batch::MAX_PER_CALL`
    /// entries).
    calls: u64,
}

impl Batching {
    /// `keys[i]` → `values[i]` into hash map `map`: one batch, or entry by
    /// entry where the kernel refuses to batch it.
    fn update_hash<K: Pod, V: Pod>(&mut self, name: &'static str, map: &mut HashMap<MapData, K, V>, keys: &[K], values: &[V]) -> Result<(), BatchError> {
        self.update(name, map.map(), keys, values)
            .unwrap_or_else(|| each(&mut self.calls, name, false, keys.iter().zip(values), |(k, v)| map.insert(k, v, 0)))
    }

    /// Deletes `keys` from hash map `map`, as [`Self::update_hash`] writes.
    fn delete_hash<K: Pod, V: Pod>(&mut self, name: &'static str, map: &mut HashMap<MapData, K, V>, keys: &[K]) -> Result<(), BatchError> {
        self.delete(name, map.map(), keys).unwrap_or_else(|| each(&mut self.calls, name, true, keys.iter(), |k| map.remove(k)))
    }

    /// `None`: write these entry by entry (a single one, or the kernel
    /// cannot batch this map).
    fn update<K: Pod, V: Pod>(&mut self, name: &'static str, map: &MapData, keys: &[K], values: &[V]) -> Option<Result<(), BatchError>> {
        if keys.len() < 2 || self.refused.contains(&(name, false)) {
            return None;
        }
        self.calls += batch::calls(keys.len());
        self.outcome(name, false, batch::update(map.fd().as_fd(), keys, values))
    }

    fn delete<K: Pod>(&mut self, name: &'static str, map: &MapData, keys: &[K]) -> Option<Result<(), BatchError>> {
        if keys.len() < 2 || self.refused.contains(&(name, true)) {
            return None;
        }
        self.calls += batch::calls(keys.len());
        self.outcome(name, true, batch::delete(map.fd().as_fd(), keys))
    }

    fn outcome(&mut self, name: &'static str, delete: bool, res: Result<(), batch::Stopped>) -> Option<Result<(), BatchError>> {
        let call = if delete { "BPF_MAP_DELETE_BATCH" } else { "BPF_MAP_UPDATE_BATCH" };
        match res {
            Ok(()) => Some(Ok(())),
            Err(s) if s.unsupported => {
                tracing::warn!(
                    map = name,
                    error = %s.error,
                    kernel = %super::kernel_release(),
                    "the kernel has no {call} for this map (Linux 5.6 has it for hash maps): writing its entries one bpf(2) call each"
                );
                self.refused.push((name, delete));
                None
            }
            Err(s) => Some(Err(BatchError {
                written: s.done,
                error: Error::Map {
                    name,
                    op: if delete { "batch delete" } else { "batch update" },
                    source: MapError::SyscallError(SyscallError { call, io_error: s.error }),
                },
            })),
        }
    }
}

/// Reads the per-CPU counters under `pins`, summed over CPUs: for every
/// reason, in index order, its counters by family
/// (`proxy_common::stats::FAMILIES` order).
pub fn read_stats(pins: &Pins) -> Result<Vec<(u32, ByFamily)>> {
    let map = from_pin(pins, STATS_MAP)?;
    let arr: PerCpuArray<MapData, StatCounter> =
        PerCpuArray::try_from(Map::PerCpuArray(map)).map_err(map_err(STATS_MAP, "open"))?;
    let mut out = Vec::new();
    for &(idx, _) in proxy_common::stats::REASONS {
        let mut by_family = ByFamily::default();
        for &(family, _) in proxy_common::stats::FAMILIES {
            let values = arr.get(&stats_slot(family, idx), 0).map_err(map_err(STATS_MAP, "lookup"))?;
            by_family[family as usize] = values.iter().fold(StatCounter::default(), |a, v| a.plus(*v));
        }
        out.push((idx, by_family));
    }
    Ok(out)
}
