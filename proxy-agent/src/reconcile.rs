//! Desired (from the model) vs programmed (what the maps hold): only the
//! differences are written, in an order that keeps every intermediate state
//! valid for a packet in flight:
//!
//! 1. frontends that are gone: slot 0 first (new packets stop matching), then
//!    their slots, then their name;
//! 2. for each new or changed frontend: new backends, then the slots that
//!    differ, then slot 0 with the new count, then the slots beyond it;
//! 3. backends no longer referenced by any slot.
//!
//! Existing backends keep their slot where possible, so a change to one
//! endpoint rewrites one slot, not the whole list. Ids (service and backend)
//! are read back from the pinned maps on start, so a restart reshuffles
//! nothing and conntrack entries (which hold backend ids) stay valid.
//!
//! The writes of a sync are staged, then made stage by stage, one batch per
//! map and stage (one bpf(2) call for thousands of entries, see
//! `datapath::maps`): the order above holds for every frontend, and a
//! stage's entries never depend on each other. Removing: every slot 0,
//! then the other slots, then ranges and names. Programming: every new
//! backend; then names, source ranges and the slots that differ; then every
//! slot 0; then the slots beyond the counts and the ranges no longer
//! wanted. A large sync is staged and written in chunks of
//! [`FLUSH_ENTRIES`], each frontend within one chunk.
//!
//! A failed write marks the programmed view stale; the next sync re-reads the
//! maps and retries what is still different. A batch that stops part-way
//! (the kernel writes the entries in order and stops at the first that
//! fails) fails the frontend that entry is for: the later stages skip that
//! frontend's writes and every slot that would point at a backend not
//! written, and the batch goes on after the entry. So a failure leaves each
//! frontend as it was or as wanted, or in between in a way a packet cannot
//! tell (slots within the old count rewritten to backends that exist).
//!
//! A frontend that does not fit in a map is never programmed half: it is
//! programmed *closed* instead — slot 0 alone, no backends, no
//! drop-when-empty flag — so its traffic is rejected (ICMP port
//! unreachable, `ECONNREFUSED` on the socket path) rather than routed
//! untranslated to an address nobody serves. Closed frontends take one
//! service-map entry each from a reserve the others cannot use
//! ([`closed_reserve`]); the sync reports them (and `/healthz` fails) until a
//! later sync finds room for the whole frontend.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher as _, RandomState};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hashbrown::HashTable;

use aya::{maps::MapError, sys::SyscallError};
use proxy_common::{
    backend::{BACKEND_F_LOCAL, BACKEND_MAP, BACKEND_MAX_ENTRIES, BACKEND6_MAP, Backend, Backend6},
    names::SvcName,
    svc::{SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_POLICY_LOCAL, SVC_FLAG_SNAT_REMOTE, SVC_MAP, SVC_MAX_ENTRIES, SVC6_MAP, Svc6Key, SvcKey, SvcValue},
};

use crate::{
    datapath::{BatchError, Delete, MapsDump, ServiceMaps, SrcRange, Update},
    error::{Error, Result},
    model::{BackendAddr, Desired, Frontend, FrontendKey, IpCidr, Protocol},
};

/// A frontend as it is in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ProgFrontend {
    svc_id: u32,
    flags: u16,
    /// Slot 0's affinity group and timeout.
    affinity_group: u32,
    affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges` entries of this frontend's service id.
    ranges: BTreeSet<IpCidr>,
    /// The backend of slot i + 1, as its index in [`Backends`]
    /// ([`NO_BACKEND`]: the slot is missing in the map, or points at no
    /// backend the map holds).
    slots: Box<[u32]>,
    /// Slot numbers present in the map beyond `slots.len()`.
    stale_slots: Box<[u16]>,
    name: Option<Box<str>>,
}

impl ProgFrontend {
    fn entries(&self) -> usize {
        1 + self.slots.len() + self.stale_slots.len()
    }
}

/// A slot that points at no backend of [`Backends`].
const NO_BACKEND: u32 = u32::MAX;

/// `refs` of a free record of [`Backends`].
const FREE: u32 = u32::MAX;

/// A backend as the backend maps hold it: what it is (address, port,
/// protocol, locality, family), its id, and how many slots point at it.
#[derive(Clone, Copy, Debug)]
struct BackendRec {
    key: BackendIdKey,
    id: u32,
    /// Slots that reference it ([`FREE`]: the record is unused).
    refs: u32,
}

/// An IPv4 backend's record: [`BackendRec`] without the 12 bytes of an
/// IPv6 address, 16 bytes. The reconciler keeps one per backend (a million
/// at 50,000 Services of 2 ports and 10 endpoints).
#[derive(Clone, Copy, Debug)]
struct BackendRec4 {
    addr: u32,
    /// Word 4 of [`BackendIdKey`]: port, protocol, locality.
    rest: u32,
    id: u32,
    refs: u32,
}

/// Record indices with this bit are IPv6 ones (in [`Backends::recs6`]).
const REC6: u32 = 1 << 31;

/// The backends the maps hold: records in vectors, one per family (slots
/// refer to them by index; freed indices are reused, ids never are), and
/// an index from backend to record (a hash table of record indices, 4
/// bytes a bucket): no map of full keys per id.
#[derive(Clone, Debug, Default)]
struct Backends {
    recs4: Vec<BackendRec4>,
    recs6: Vec<BackendRec>,
    free4: Vec<u32>,
    free6: Vec<u32>,
    by_key: HashTable<u32>,
    hasher: RandomState,
}

impl Backends {
    /// The key of live or free record `i` (a valid index).
    fn key(recs4: &[BackendRec4], recs6: &[BackendRec], i: u32) -> BackendIdKey {
        if i & REC6 == 0 {
            let r = &recs4[i as usize];
            BackendIdKey([0, 0, 0, r.addr, r.rest])
        } else {
            recs6[(i & !REC6) as usize].key
        }
    }

    /// The record of `key` (the first added, when two ids stand for it).
    fn find(&self, key: &BackendIdKey) -> Option<u32> {
        let (recs4, recs6) = (&self.recs4, &self.recs6);
        self.by_key.find(self.hasher.hash_one(key), |&i| Self::key(recs4, recs6, i) == *key).copied()
    }

    /// Record `i`, if it is in use.
    fn get(&self, i: u32) -> Option<BackendRec> {
        let r = if i & REC6 == 0 {
            let r = self.recs4.get(i as usize)?;
            BackendRec { key: BackendIdKey([0, 0, 0, r.addr, r.rest]), id: r.id, refs: r.refs }
        } else {
            *self.recs6.get((i & !REC6) as usize)?
        };
        (r.refs != FREE).then_some(r)
    }

    /// The backend id of record `i` (of a slot, not [`NO_BACKEND`]).
    fn id(&self, i: u32) -> u32 {
        if i & REC6 == 0 { self.recs4[i as usize].id } else { self.recs6[(i & !REC6) as usize].id }
    }

    /// The reference count of record `i` (of a slot, not [`NO_BACKEND`]).
    fn refs_mut(&mut self, i: u32) -> &mut u32 {
        if i & REC6 == 0 { &mut self.recs4[i as usize].refs } else { &mut self.recs6[(i & !REC6) as usize].refs }
    }

    /// Adds a record (no references yet), found by its key unless
    /// `indexed` is false (another id already stands for the key).
    fn add(&mut self, key: BackendIdKey, id: u32, indexed: bool) -> u32 {
        let index = |len: usize, bit: u32| {
            let i = u32::try_from(len - 1).ok().filter(|i| i & REC6 == 0).expect("fewer than 2^31 backends per family");
            i | bit
        };
        let i = if key.is_v6() {
            let rec = BackendRec { key, id, refs: 0 };
            if let Some(i) = self.free6.pop() {
                self.recs6[(i & !REC6) as usize] = rec;
                i
            } else {
                self.recs6.push(rec);
                index(self.recs6.len(), REC6)
            }
        } else {
            let rec = BackendRec4 { addr: key.0[3], rest: key.0[4], id, refs: 0 };
            if let Some(i) = self.free4.pop() {
                self.recs4[i as usize] = rec;
                i
            } else {
                self.recs4.push(rec);
                index(self.recs4.len(), 0)
            }
        };
        if indexed {
            let Self { recs4, recs6, by_key, hasher, .. } = self;
            by_key.insert_unique(hasher.hash_one(key), i, |&j| hasher.hash_one(Self::key(recs4, recs6, j)));
        }
        i
    }

    /// Frees record `i` (in use); returns what it held.
    fn remove(&mut self, i: u32) -> BackendRec {
        let rec = self.get(i).expect("a record in use");
        // (Out of the index only if it is the one found for its key.)
        if let Ok(e) = self.by_key.find_entry(self.hasher.hash_one(rec.key), |&j| j == i) {
            e.remove();
        }
        *self.refs_mut(i) = FREE;
        if i & REC6 == 0 { self.free4.push(i) } else { self.free6.push(i) }
        rec
    }
}

/// What the maps hold, indexed for diffing.
#[derive(Clone, Debug, Default)]
struct Programmed {
    frontends: BTreeMap<FrontendKey, ProgFrontend>,
    backends: Backends,
    /// Service-map keys that belong to no valid frontend.
    orphan_svc: Vec<SlotKey>,
    /// Names of service ids no frontend uses.
    orphan_names: Vec<u32>,
    /// Source ranges of service ids no frontend uses.
    orphan_ranges: Vec<(u32, IpAddr, u8)>,
    /// Service-map entries per family (index [`fam`]): each family's map
    /// has its own capacity.
    svc_entries: [usize; 2],
    /// Backend-map entries per family.
    backend_entries: [usize; 2],
    next_svc_id: u32,
    next_backend_id: u32,
    /// Backends (records) whose reference count reached 0 (deleted by
    /// `remove_unreferenced_backends` unless referenced again; may repeat).
    unref: Vec<u32>,
}

/// A key of the service map of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SlotKey {
    V4(SvcKey),
    V6(Svc6Key),
}

impl SlotKey {
    /// The same frontend's key of slot `slot`.
    fn with_slot(self, slot: u16) -> Self {
        match self {
            Self::V4(k) => Self::V4(SvcKey { backend_slot: slot, ..k }),
            Self::V6(k) => Self::V6(Svc6Key { backend_slot: slot, ..k }),
        }
    }

    fn slot(self) -> u16 {
        match self {
            Self::V4(k) => k.backend_slot,
            Self::V6(k) => k.backend_slot,
        }
    }

    /// The frontend, if the key is a valid one (known protocol, scope 0).
    fn frontend(self) -> Option<FrontendKey> {
        let (addr, port_be, proto, scope) = match self {
            Self::V4(k) => (IpAddr::V4(Ipv4Addr::from(u32::from_be(k.addr_be))), k.port_be, k.proto, k.scope),
            Self::V6(k) => (IpAddr::V6(Ipv6Addr::from(k.addr)), k.port_be, k.proto, k.scope),
        };
        (scope == 0).then_some(())?;
        Some(FrontendKey { addr, port: u16::from_be(port_be), protocol: Protocol::from_number(proto)? })
    }
}

/// The service-map key of slot `slot` of frontend `k`, in its family's map.
fn slot_key(k: FrontendKey, slot: u16) -> SlotKey {
    let (port_be, proto) = (k.port.to_be(), k.protocol.number());
    match k.addr {
        IpAddr::V4(a) => SlotKey::V4(SvcKey { addr_be: u32::from(a).to_be(), port_be, backend_slot: slot, proto, scope: 0, _pad: [0; 2] }),
        IpAddr::V6(a) => SlotKey::V6(Svc6Key { addr: a.octets(), port_be, backend_slot: slot, proto, scope: 0, _pad: [0; 2] }),
    }
}

/// The IPv4 service-map key of slot `slot` of frontend `k` (tests).
#[cfg(test)]
pub(crate) fn svc_key(k: FrontendKey, slot: u16) -> SvcKey {
    match slot_key(k, slot) {
        SlotKey::V4(k) => k,
        SlotKey::V6(_) => panic!("{k} is IPv6"),
    }
}

#[cfg(test)]
fn frontend_of(k: SvcKey) -> Option<FrontendKey> {
    SlotKey::V4(k).frontend()
}

/// A backend-map entry of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BackendEntry {
    V4(Backend),
    V6(Backend6),
}

impl BackendEntry {
    fn new(b: BackendAddr, proto: Protocol) -> Self {
        let (port_be, flags) = (b.port.to_be(), if b.local { BACKEND_F_LOCAL } else { 0 });
        match b.addr {
            IpAddr::V4(a) => Self::V4(Backend { addr_be: u32::from(a).to_be(), port_be, proto: proto.number(), flags }),
            IpAddr::V6(a) => Self::V6(Backend6 { addr: a.octets(), port_be, proto: proto.number(), flags }),
        }
    }
}

/// A backend (address, port, protocol number, locality, family) as the
/// key of the backend index: integers, cheap to compare and hash (the
/// index may hold a million), and smaller than the model's types (20
/// bytes, 4-aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BackendIdKey([u32; 5]);

impl BackendIdKey {
    fn new(b: BackendAddr, proto: Protocol) -> Self {
        Self::raw(b.addr, b.port, proto.number(), b.local)
    }

    fn raw(addr: IpAddr, port: u16, proto: u8, local: bool) -> Self {
        let (a, v6) = match addr {
            IpAddr::V4(a) => ([0, 0, 0, u32::from(a)], 0),
            IpAddr::V6(a) => {
                let o = a.octets();
                let w = |i: usize| u32::from_be_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                ([w(0), w(4), w(8), w(12)], 1)
            }
        };
        Self([a[0], a[1], a[2], a[3], v6 << 25 | u32::from(local) << 24 | u32::from(proto) << 16 | u32::from(port)])
    }

    /// The key of a backend-map entry (its flags but the local one left out).
    fn of_entry(b: BackendEntry) -> Self {
        match b {
            BackendEntry::V4(b) => Self::raw(IpAddr::V4(Ipv4Addr::from(u32::from_be(b.addr_be))), u16::from_be(b.port_be), b.proto, b.flags & BACKEND_F_LOCAL != 0),
            BackendEntry::V6(b) => Self::raw(IpAddr::V6(Ipv6Addr::from(b.addr)), u16::from_be(b.port_be), b.proto, b.flags & BACKEND_F_LOCAL != 0),
        }
    }

    fn is_v6(self) -> bool {
        self.0[4] >> 25 & 1 == 1
    }

    /// The model's backend and protocol (`None`: a protocol it does not know).
    fn decode(self) -> Option<(BackendAddr, Protocol)> {
        let [a0, a1, a2, a3, rest] = self.0;
        let addr = if self.is_v6() {
            let mut o = [0; 16];
            for (i, w) in [a0, a1, a2, a3].into_iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            IpAddr::V4(Ipv4Addr::from(a3))
        };
        // (Word 4: family and locality bits, protocol, port.)
        let [bits, proto, port_hi, port_lo] = rest.to_be_bytes();
        let port = u16::from_be_bytes([port_hi, port_lo]);
        Some((BackendAddr { addr, port, local: bits & 1 == 1 }, Protocol::from_number(proto)?))
    }
}

/// The index of `a`'s family in per-family counters: 0 IPv4, 1 IPv6.
fn fam(a: IpAddr) -> usize {
    usize::from(a.is_ipv6())
}

fn slot_u16(i: usize) -> u16 {
    u16::try_from(i).expect("slot numbers fit u16 (MAX_BACKENDS_PER_FRONTEND)")
}

impl Programmed {
    fn from_dump(d: MapsDump) -> Self {
        let mut p = Self {
            svc_entries: [d.svc.len(), d.svc6.len()],
            backend_entries: [d.backends.len(), d.backends6.len()],
            ..Self::default()
        };
        // Slot 0's key → slot → value, both families.
        let mut groups: BTreeMap<SlotKey, BTreeMap<u16, SvcValue>> = BTreeMap::new();
        let keys = d.svc.into_iter().map(|(k, v)| (SlotKey::V4(k), v)).chain(d.svc6.into_iter().map(|(k, v)| (SlotKey::V6(k), v)));
        for (k, v) in keys {
            groups.entry(k.with_slot(0)).or_default().insert(k.slot(), v);
        }
        let names: BTreeMap<u32, String> = d.names.into_iter().collect();
        let mut ranges: BTreeMap<u32, BTreeSet<IpCidr>> = BTreeMap::new();
        for (id, a, l) in d.ranges {
            ranges.entry(id).or_default().insert((a, l));
        }
        // Backends first: slots refer to their records.
        let mut by_id: HashMap<u32, u32> = HashMap::with_capacity(d.backends.len() + d.backends6.len());
        let backends = d.backends.into_iter().map(|(id, b)| (id, BackendEntry::V4(b)));
        for (id, b) in backends.chain(d.backends6.into_iter().map(|(id, b)| (id, BackendEntry::V6(b)))) {
            p.next_backend_id = p.next_backend_id.max(id);
            let key = BackendIdKey::of_entry(b);
            // Two ids for one address (should not happen): the first is
            // found by address; the other is deleted once nothing references it.
            let indexed = key.decode().is_some() && p.backends.find(&key).is_none();
            if let Some(old) = by_id.insert(id, p.backends.add(key, id, indexed)) {
                // (One id in both families' maps: the last one read stands for it.)
                p.backends.remove(old);
            }
        }
        for (key0, slots) in groups {
            let (Some(fk), Some(head)) = (key0.frontend(), slots.get(&0)) else {
                p.orphan_svc.extend(slots.keys().map(|&s| key0.with_slot(s)));
                continue;
            };
            let count = head.count;
            let fe = ProgFrontend {
                svc_id: head.svc_id,
                flags: head.flags,
                affinity_group: head.backend_id,
                affinity_timeout_s: head.affinity_timeout_s,
                ranges: ranges.remove(&head.svc_id).unwrap_or_default(),
                // (Backend id 0 is no backend's: a slot pointing there is missing.)
                slots: (1..=count)
                    .map(|s| slots.get(&s).filter(|v| v.backend_id != 0).and_then(|v| by_id.get(&v.backend_id)).copied().unwrap_or(NO_BACKEND))
                    .collect(),
                stale_slots: slots.keys().copied().filter(|&s| s > count).collect(),
                name: names.get(&head.svc_id).map(|n| n.as_str().into()),
            };
            p.next_svc_id = p.next_svc_id.max(head.svc_id);
            p.frontends.insert(fk, fe);
        }
        let used: BTreeSet<u32> = p.frontends.values().map(|f| f.svc_id).collect();
        p.orphan_names = names.keys().copied().filter(|id| !used.contains(id)).collect();
        p.orphan_ranges = ranges.into_iter().flat_map(|(id, rs)| rs.into_iter().map(move |(a, l)| (id, a, l))).collect();
        p.next_svc_id += 1;
        p.next_backend_id += 1;
        let slots: Vec<u32> = p.frontends.values().flat_map(|f| f.slots.iter().copied()).collect();
        p.add_refs(&slots);
        p.unref = by_id.into_values().filter(|&i| p.backends.get(i).is_some_and(|r| r.refs == 0)).collect();
        p
    }

    fn add_refs(&mut self, slots: &[u32]) {
        for &i in slots.iter().filter(|&&i| i != NO_BACKEND) {
            *self.backends.refs_mut(i) += 1;
        }
    }

    fn drop_refs(&mut self, slots: &[u32]) {
        for &i in slots.iter().filter(|&&i| i != NO_BACKEND) {
            let n = self.backends.refs_mut(i);
            if *n != 0 && *n != FREE {
                *n -= 1;
                if *n == 0 {
                    self.unref.push(i);
                }
            }
        }
    }

    /// Sets (or removes) frontend `key`, keeping the entry count and the
    /// backends' reference counts. Returns what it replaces.
    fn set_frontend(&mut self, key: FrontendKey, fe: Option<ProgFrontend>) -> Option<ProgFrontend> {
        // (Entries counted from a dump may be fewer than `entries()` says
        // when a slot was missing: saturate, never underflow.)
        let old = if let Some(fe) = fe {
            let n = &mut self.svc_entries[fam(key.addr)];
            *n += fe.entries();
            self.add_refs(&fe.slots);
            self.frontends.insert(key, fe)
        } else {
            self.frontends.remove(&key)
        };
        if let Some(old) = &old {
            let n = &mut self.svc_entries[fam(key.addr)];
            *n = n.saturating_sub(old.entries());
            self.drop_refs(&old.slots);
        }
        old
    }
}

/// Who a staged entry is written for: a failure is reported against it.
#[derive(Clone, Copy, Debug)]
enum Owner {
    /// A frontend programmed or removed ([`SyncReport::errors`]).
    Frontend(FrontendKey),
    /// A frontend programmed closed ([`SyncReport::other_errors`]; it is
    /// then not reported closed).
    Closed(FrontendKey),
    /// Entries no frontend owns: leftovers, unreferenced backends
    /// ([`SyncReport::other_errors`], each).
    Cleanup,
}

/// Entries for one map, in order, each with the index of its owner.
#[derive(Debug)]
struct Batch<K, V> {
    keys: Vec<K>,
    values: Vec<V>,
    owners: Vec<u32>,
}

impl<K, V> Default for Batch<K, V> {
    fn default() -> Self {
        Self { keys: Vec::new(), values: Vec::new(), owners: Vec::new() }
    }
}

impl<K, V> Batch<K, V> {
    fn push(&mut self, owner: u32, key: K, value: V) {
        self.keys.push(key);
        self.values.push(value);
        self.owners.push(owner);
    }
}

/// One stage of writes, per map. Entries of a stage do not depend on each
/// other; they may depend on earlier stages.
#[derive(Debug, Default)]
struct Stage {
    backends: Batch<u32, Backend>,
    backends6: Batch<u32, Backend6>,
    names: Batch<u32, SvcName>,
    ranges: Batch<SrcRange, ()>,
    svc: Batch<SvcKey, SvcValue>,
    svc6: Batch<Svc6Key, SvcValue>,
    del_svc: Batch<SvcKey, ()>,
    del_svc6: Batch<Svc6Key, ()>,
    del_ranges: Batch<SrcRange, ()>,
    del_names: Batch<u32, ()>,
    del_backends: Batch<u32, ()>,
    del_backends6: Batch<u32, ()>,
}

impl Stage {
    fn put_slot(&mut self, owner: u32, k: SlotKey, v: SvcValue) {
        match k {
            SlotKey::V4(k) => self.svc.push(owner, k, v),
            SlotKey::V6(k) => self.svc6.push(owner, k, v),
        }
    }

    fn del_slot(&mut self, owner: u32, k: SlotKey) {
        match k {
            SlotKey::V4(k) => self.del_svc.push(owner, k, ()),
            SlotKey::V6(k) => self.del_svc6.push(owner, k, ()),
        }
    }

    fn entries(&self) -> usize {
        self.backends.keys.len()
            + self.backends6.keys.len()
            + self.names.keys.len()
            + self.ranges.keys.len()
            + self.svc.keys.len()
            + self.svc6.keys.len()
            + self.del_svc.keys.len()
            + self.del_svc6.keys.len()
            + self.del_ranges.keys.len()
            + self.del_names.keys.len()
            + self.del_backends.keys.len()
            + self.del_backends6.keys.len()
    }
}

/// The stages of programming frontends, in order.
const NEW_BACKENDS: usize = 0;
/// Names, source ranges and the slots that differ.
const SLOTS: usize = 1;
/// Slot 0 with the count.
const HEADS: usize = 2;
/// Slots beyond the count, ranges no longer wanted.
const BEYOND: usize = 3;
/// The stages of removing frontends: slot 0 first, then the other slots,
/// then the ranges and the name.
const GONE_HEADS: usize = 0;
const GONE_SLOTS: usize = 1;
const GONE_REST: usize = 2;

/// Staged entries after which they are written (a chunk of a large sync):
/// bounds the memory the staging takes and the entries the service map
/// holds in between, and still writes thousands per bpf(2) call.
pub const FLUSH_ENTRIES: usize = 65_536;

/// Writes staged, not made yet.
#[derive(Debug, Default)]
struct Plan {
    owners: Vec<Owner>,
    stages: [Stage; 4],
    /// Service-map entries (per family) the last stage deletes: until it
    /// runs, the map holds them as well as what the stages before add.
    transient: [usize; 2],
}

impl Plan {
    fn owner(&mut self, o: Owner) -> u32 {
        let i = u32::try_from(self.owners.len()).expect("fewer than 2^32 frontends in a plan");
        self.owners.push(o);
        i
    }

    fn entries(&self) -> usize {
        self.stages.iter().map(Stage::entries).sum()
    }
}

/// A copy of `e`, for another frontend that needed the entry that failed
/// (errors are reported once per frontend and are not `Clone`).
fn same_failure(e: &Error) -> Error {
    let copy = |io_error: &io::Error| io_error.raw_os_error().map_or_else(|| io::Error::new(io_error.kind(), io_error.to_string()), io::Error::from_raw_os_error);
    match e {
        Error::Map { name, op, source: MapError::SyscallError(SyscallError { call, io_error }) } => {
            Error::Map { name, op, source: MapError::SyscallError(SyscallError { call, io_error: copy(io_error) }) }
        }
        Error::Injected(what) => Error::Injected(what),
        // (Map writes fail with the two above; anything else keeps its text.)
        other => Error::Map { name: "(service maps)", op: "write", source: MapError::SyscallError(SyscallError { call: "bpf", io_error: io::Error::other(other.to_string()) }) },
    }
}

fn needs_nothing<K, V>(_: &K, _: &V) -> Option<u32> {
    None
}

/// Writes a plan's batches: the failure handling of [`Reconciler::flush`].
struct Run<'a, M> {
    maps: &'a mut M,
    batch_max: usize,
    owners: &'a [Owner],
    /// Owners that failed: their later entries are skipped.
    failed: Vec<bool>,
    /// Backend ids whose write failed in this sync (with the error): slots
    /// that would point at them are skipped.
    failed_backends: &'a mut BTreeMap<u32, Error>,
    report: &'a mut SyncReport,
    stale: &'a mut bool,
}

impl<M: ServiceMaps> Run<'_, M> {
    fn fail(&mut self, owner: u32, error: Error) {
        *self.stale = true;
        let i = owner as usize;
        match self.owners[i] {
            Owner::Cleanup => self.report.other_errors.push(error),
            _ if self.failed[i] => {}
            Owner::Frontend(key) => {
                self.failed[i] = true;
                self.report.errors.push((key, error));
            }
            Owner::Closed(key) => {
                self.failed[i] = true;
                self.report.closed.remove(&key);
                self.report.other_errors.push(error);
            }
        }
    }

    /// Writes (or deletes) `b` in batches of at most `batch_max`, without
    /// the entries of owners that failed and without those that `needs` a
    /// backend whose write failed. After a failed entry the batch goes on
    /// with the next one. Returns the keys that failed (with copies of the
    /// errors, which went to the report).
    fn run<K: Copy, V: Copy>(
        &mut self,
        mut b: Batch<K, V>,
        delete: bool,
        needs: impl Fn(&K, &V) -> Option<u32>,
        call: impl Fn(&mut M, &[K], &[V]) -> Result<(), BatchError>,
    ) -> Vec<(K, Error)> {
        if !self.failed_backends.is_empty() {
            for i in 0..b.keys.len() {
                if let Some(e) = needs(&b.keys[i], &b.values[i]).and_then(|id| self.failed_backends.get(&id)).map(same_failure) {
                    self.fail(b.owners[i], e);
                }
            }
        }
        // (After the pass above: a frontend that needs a backend not
        // written gets none of this stage's entries, not even the ones
        // before that slot.)
        if self.failed.contains(&true) {
            let mut kept = Batch::default();
            for ((k, v), o) in b.keys.into_iter().zip(b.values).zip(b.owners) {
                if !self.failed[o as usize] {
                    kept.push(o, k, v);
                }
            }
            b = kept;
        }
        let mut failures = Vec::new();
        let (mut at, mut done) = (0, 0);
        while at < b.keys.len() {
            let end = b.keys.len().min(at + self.batch_max.max(1));
            match call(self.maps, &b.keys[at..end], &b.values[at..end]) {
                Ok(()) => {
                    done += end - at;
                    at = end;
                }
                Err(BatchError { written, error }) => {
                    let i = at + written.min(end - at - 1);
                    done += i - at;
                    failures.push((b.keys[i], same_failure(&error)));
                    self.fail(b.owners[i], error);
                    at = i + 1;
                }
            }
        }
        if delete {
            self.report.deletes += done;
        } else {
            self.report.writes += done;
        }
        failures
    }

    fn stage(&mut self, st: Stage) {
        // A slot (not slot 0, whose id is the affinity group) needs its backend.
        let slot4 = |k: &SvcKey, v: &SvcValue| (k.backend_slot != 0).then_some(v.backend_id);
        let slot6 = |k: &Svc6Key, v: &SvcValue| (k.backend_slot != 0).then_some(v.backend_id);
        for (id, e) in self.run(st.backends, false, needs_nothing, |m, k, v| m.update(Update::Backends(k, v))) {
            self.failed_backends.insert(id, e);
        }
        for (id, e) in self.run(st.backends6, false, needs_nothing, |m, k, v| m.update(Update::Backends6(k, v))) {
            self.failed_backends.insert(id, e);
        }
        self.run(st.names, false, needs_nothing, |m, k, v| m.update(Update::Names(k, v)));
        self.run(st.ranges, false, needs_nothing, |m, k, _| m.update(Update::Ranges(k)));
        self.run(st.svc, false, slot4, |m, k, v| m.update(Update::Svc(k, v)));
        self.run(st.svc6, false, slot6, |m, k, v| m.update(Update::Svc6(k, v)));
        self.run(st.del_svc, true, needs_nothing, |m, k, _| m.delete(Delete::Svc(k)));
        self.run(st.del_svc6, true, needs_nothing, |m, k, _| m.delete(Delete::Svc6(k)));
        self.run(st.del_ranges, true, needs_nothing, |m, k, _| m.delete(Delete::Ranges(k)));
        self.run(st.del_names, true, needs_nothing, |m, k, _| m.delete(Delete::Names(k)));
        self.run(st.del_backends, true, needs_nothing, |m, k, _| m.delete(Delete::Backends(k)));
        self.run(st.del_backends6, true, needs_nothing, |m, k, _| m.delete(Delete::Backends6(k)));
    }
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    pub deletes: usize,
    /// Frontends that could not be (fully) programmed, and why.
    pub errors: Vec<(FrontendKey, Error)>,
    /// Errors outside any one frontend (cleanup of stale entries).
    pub other_errors: Vec<Error>,
    /// UDP backends (address, port) that left a frontend in this sync:
    /// connected UDP sockets translated to them are to be destroyed.
    pub removed_udp_backends: BTreeSet<(IpAddr, u16)>,
    /// Frontends of `errors` that did not fit and are programmed closed
    /// (their traffic is rejected).
    pub closed: BTreeSet<FrontendKey>,
}

impl SyncReport {
    #[must_use]
    pub fn changed(&self) -> bool {
        self.writes + self.deletes > 0
    }
}

pub struct Reconciler<M: ServiceMaps> {
    maps: M,
    state: Programmed,
    stale: bool,
    svc_capacity: usize,
    /// Service-map entries only closed frontends may use.
    svc_reserve: usize,
    backend_capacity: usize,
    /// Frontends that did not fit at the last attempt: retried by every
    /// sync, partial ones included, so room made elsewhere is used.
    unfit: BTreeSet<FrontendKey>,
    /// Writes staged and not made yet.
    plan: Plan,
    /// Entries per map call at most.
    batch_max: usize,
    /// Backend ids whose write failed in the current sync.
    failed_backends: BTreeMap<u32, Error>,
}

/// The service-map entries held back for closed frontends (one entry
/// each): 1/64 of the map (16,384 of the default 1,048,576 entries), at
/// least a quarter of a small map's first 64.
#[must_use]
pub fn closed_reserve(svc_capacity: usize) -> usize {
    (svc_capacity / 64).max(svc_capacity.min(64) / 4)
}

/// `fe` closed: slot 0 alone, answered with a reject.
fn closed(fe: &Frontend) -> Frontend {
    Frontend {
        backends: Vec::new(),
        drop_when_empty: false,
        policy_local: false,
        snat_remote: false,
        affinity_timeout_s: 0,
        source_ranges: None,
        ..fe.clone()
    }
}

impl<M: ServiceMaps> Reconciler<M> {
    /// Adopts whatever the maps already hold (ids included).
    pub fn new(maps: M) -> Result<Self> {
        let state = Programmed::from_dump(maps.dump()?);
        Ok(Self {
            maps,
            state,
            stale: false,
            svc_capacity: SVC_MAX_ENTRIES as usize,
            svc_reserve: closed_reserve(SVC_MAX_ENTRIES as usize),
            backend_capacity: BACKEND_MAX_ENTRIES as usize,
            unfit: BTreeSet::new(),
            plan: Plan::default(),
            batch_max: FLUSH_ENTRIES,
            failed_backends: BTreeMap::new(),
        })
    }

    /// Writes at most `entries` per map call (1: entry by entry, one
    /// bpf(2) call each, as before batching).
    #[must_use]
    pub fn with_batch_max(mut self, entries: usize) -> Self {
        self.batch_max = entries.max(1);
        self
    }

    /// Sets the capacities checked before writing (the maps' real sizes,
    /// or smaller ones in tests), with no reserve for closed frontends.
    #[must_use]
    pub fn with_capacity(mut self, svc: usize, backends: usize) -> Self {
        self.svc_capacity = svc;
        self.svc_reserve = 0;
        self.backend_capacity = backends;
        self
    }

    /// Holds `entries` of the service map back for closed frontends.
    #[must_use]
    pub fn with_closed_reserve(mut self, entries: usize) -> Self {
        self.svc_reserve = entries.min(self.svc_capacity);
        self
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Entries and capacity of the service and backend maps, as programmed.
    #[must_use]
    pub fn occupancy(&self) -> std::collections::BTreeMap<&'static str, (u64, u64)> {
        [
            (SVC_MAP, (self.state.svc_entries[0] as u64, self.svc_capacity as u64)),
            (BACKEND_MAP, (self.state.backend_entries[0] as u64, self.backend_capacity as u64)),
            (SVC6_MAP, (self.state.svc_entries[1] as u64, self.svc_capacity as u64)),
            (BACKEND6_MAP, (self.state.backend_entries[1] as u64, self.backend_capacity as u64)),
        ]
        .into_iter()
        .collect()
    }

    /// Number of frontends currently programmed.
    #[must_use]
    pub fn programmed_frontends(&self) -> usize {
        self.state.frontends.len()
    }

    /// Brings the maps to `desired`, writing only differences.
    pub fn sync(&mut self, desired: &Desired) -> SyncReport {
        self.sync_inner(desired, None)
    }

    /// Brings the frontends `keys` (present in `desired` or gone from it)
    /// to `desired`, leaving every other frontend as it is: O(changed), for
    /// syncs that follow a few changes. Frontends that did not fit before
    /// are retried too.
    pub fn sync_keys(&mut self, desired: &Desired, keys: &BTreeSet<FrontendKey>) -> SyncReport {
        self.sync_inner(desired, Some(keys))
    }

    fn sync_inner(&mut self, desired: &Desired, keys: Option<&BTreeSet<FrontendKey>>) -> SyncReport {
        let mut report = SyncReport::default();
        let mut keys = keys;
        if self.stale {
            match self.maps.dump() {
                Ok(d) => {
                    self.state = Programmed::from_dump(d);
                    self.stale = false;
                    // After a re-read everything is compared again.
                    keys = None;
                }
                Err(e) => {
                    report.other_errors.push(e);
                    return report;
                }
            }
        }
        self.failed_backends.clear();
        self.remove_gone(desired, keys, &mut report);
        self.flush(&mut report);
        let open_limit = self.svc_capacity - self.svc_reserve;
        let mut unfit = Vec::new();
        let retry = std::mem::take(&mut self.unfit);
        let todo: Box<dyn Iterator<Item = (&FrontendKey, &Frontend)>> = match keys {
            None => Box::new(desired.frontends.iter()),
            Some(keys) => Box::new(
                keys.union(&retry).filter_map(|k| desired.frontends.get_key_value(k)),
            ),
        };
        for (key, fe) in todo {
            if self.plan.entries() >= FLUSH_ENTRIES {
                self.flush(&mut report);
            }
            // (Staging fails only for room: the writes come later.)
            if let Err(e) = self.program_frontend(*key, fe, open_limit, Owner::Frontend(*key), &mut report) {
                unfit.push(*key);
                report.errors.push((*key, e));
            }
        }
        self.flush(&mut report);
        // After every frontend that fits, so closing one never takes the
        // room another needed.
        self.unfit = unfit.iter().copied().collect();
        for key in unfit {
            if self.plan.entries() >= FLUSH_ENTRIES {
                self.flush(&mut report);
            }
            if self.program_frontend(key, &closed(&desired.frontends[&key]), self.svc_capacity, Owner::Closed(key), &mut report).is_ok() {
                // (Taken back if its writes fail.)
                report.closed.insert(key);
            }
        }
        self.flush(&mut report);
        // Why: after a failed write the programmed view may miss slots that
        // were written (pointing at new backends); deleting "unreferenced"
        // backends now could leave such a slot dangling. The next sync
        // re-reads the maps and removes them safely.
        if !self.stale {
            self.remove_unreferenced_backends();
            self.flush(&mut report);
        }
        if keys.is_none() && report.changed() {
            // Filled in key order, the map's nodes are about half full;
            // rebuilt at once from its sorted entries, full.
            self.state.frontends = std::mem::take(&mut self.state.frontends).into_iter().collect();
        }
        report
    }

    /// Writes what is staged, stage by stage.
    fn flush(&mut self, report: &mut SyncReport) {
        let Plan { owners, stages, .. } = std::mem::take(&mut self.plan);
        let mut run = Run {
            maps: &mut self.maps,
            batch_max: self.batch_max,
            failed: vec![false; owners.len()],
            owners: &owners,
            failed_backends: &mut self.failed_backends,
            report,
            stale: &mut self.stale,
        };
        for st in stages {
            run.stage(st);
        }
    }

    fn remove_gone(&mut self, desired: &Desired, keys: Option<&BTreeSet<FrontendKey>>, report: &mut SyncReport) {
        let gone: Vec<FrontendKey> = match keys {
            None => self.state.frontends.keys().filter(|k| !desired.frontends.contains_key(k)).copied().collect(),
            Some(keys) => keys
                .iter()
                .filter(|k| self.state.frontends.contains_key(k) && !desired.frontends.contains_key(k))
                .copied()
                .collect(),
        };
        for key in gone {
            if self.plan.entries() >= FLUSH_ENTRIES {
                self.flush(report);
            }
            let Some(fe) = self.state.set_frontend(key, None) else { continue };
            if key.protocol == Protocol::Udp {
                self.note_removed(&fe.slots, &[], report);
            }
            let o = self.plan.owner(Owner::Frontend(key));
            let st = &mut self.plan.stages;
            st[GONE_HEADS].del_slot(o, slot_key(key, 0));
            for s in (1..=fe.slots.len()).map(slot_u16).chain(fe.stale_slots.iter().copied()) {
                st[GONE_SLOTS].del_slot(o, slot_key(key, s));
            }
            for r in &fe.ranges {
                st[GONE_REST].del_ranges.push(o, (fe.svc_id, *r), ());
            }
            if fe.name.is_some() {
                st[GONE_REST].del_names.push(o, fe.svc_id, ());
            }
        }
        let o = self.plan.owner(Owner::Cleanup);
        for k in std::mem::take(&mut self.state.orphan_svc) {
            self.plan.stages[GONE_SLOTS].del_slot(o, k);
            let n = &mut self.state.svc_entries[usize::from(matches!(k, SlotKey::V6(_)))];
            *n = n.saturating_sub(1);
        }
        for (id, a, l) in std::mem::take(&mut self.state.orphan_ranges) {
            self.plan.stages[GONE_REST].del_ranges.push(o, (id, (a, l)), ());
        }
        for id in std::mem::take(&mut self.state.orphan_names) {
            self.plan.stages[GONE_REST].del_names.push(o, id, ());
        }
    }

    /// The slot layout for `wanted` ids that moves as few as possible from `cur`.
    fn plan_slots(cur: &[u32], wanted: &[u32]) -> Vec<u32> {
        if cur.is_empty() {
            return wanted.to_vec();
        }
        let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
        let mut slots: Vec<Option<u32>> = cur
            .iter()
            .map(|id| wanted_set.contains(id).then_some(*id))
            .collect();
        // An id twice in `cur` (should not happen) keeps its first slot only.
        let mut seen = BTreeSet::new();
        for s in &mut slots {
            if let Some(id) = *s
                && !seen.insert(id) {
                    *s = None;
                }
        }
        let mut fresh = wanted.iter().copied().filter(|id| !seen.contains(id));
        for s in &mut slots {
            if s.is_none() {
                *s = fresh.next();
            }
        }
        slots.extend(fresh.map(Some));
        // Compact: move entries from the tail into the remaining holes.
        let mut out: Vec<Option<u32>> = slots;
        let mut i = 0;
        while i < out.len() {
            if out[i].is_none() {
                while out.last() == Some(&None) {
                    out.pop();
                }
                if i < out.len() {
                    out[i] = out.pop().flatten();
                }
            }
            i += 1;
        }
        out.into_iter().flatten().collect()
    }

    /// Whether `cur` already is `fe` with backend `ids` (`ranges` and `name`
    /// as wanted): nothing to write.
    fn unchanged(cur: &ProgFrontend, fe: &Frontend, ids: &[Option<u32>], name: &str, ranges: &BTreeSet<IpCidr>) -> bool {
        if !(cur.stale_slots.is_empty()
            && cur.slots.len() == ids.len()
            && cur.flags == frontend_flags(fe)
            && cur.affinity_group == fe.affinity_group
            && cur.affinity_timeout_s == fe.affinity_timeout_s
            && cur.name.as_deref() == Some(name)
            && cur.ranges == *ranges)
        {
            return false;
        }
        // The same ids in any slot order (ids are unique per address, so
        // equal sorted lists hold no id twice and no missing slot, 0).
        let Some(mut want) = ids.iter().copied().collect::<Option<Vec<u32>>>() else { return false };
        let mut have = cur.slots.to_vec();
        want.sort_unstable();
        have.sort_unstable();
        want == have
    }

    /// Stages the writes that bring frontend `key` to `fe`, and records it
    /// as programmed. Fails (staging nothing) if it does not fit.
    #[expect(clippy::too_many_lines, reason = "one ordered sequence of writes; split up, the order would be harder to see")]
    fn program_frontend(&mut self, key: FrontendKey, fe: &Frontend, svc_limit: usize, owner: Owner, report: &mut SyncReport) -> Result<()> {
        let proto = key.protocol;
        let f = fam(key.addr);
        // As the names map stores it (truncated), so an adopted name compares equal.
        let name = SvcName::new(&fe.display_name());
        let want_ranges: BTreeSet<IpCidr> = fe.source_ranges.iter().flatten().copied().collect();
        // Each backend's record; none yet for new ones.
        let mut ids: Vec<Option<u32>> = fe.backends.iter().map(|b| self.state.backends.find(&BackendIdKey::new(*b, proto))).collect();
        let cur = self.state.frontends.get(&key);
        if cur.is_some_and(|c| Self::unchanged(c, fe, &ids, name.as_str(), &want_ranges)) {
            return Ok(());
        }
        // Capacity checks before anything is staged: all or nothing.
        let new_backends = ids.iter().filter(|id| id.is_none()).count();
        if self.state.backend_entries[f] + new_backends > self.backend_capacity {
            return Err(Error::MapFull {
                map: [BACKEND_MAP, BACKEND6_MAP][f],
                capacity: u32::try_from(self.backend_capacity).unwrap_or(u32::MAX),
                what: format!("frontend {key} ({})", name.as_str()),
            });
        }
        let need = 1 + fe.backends.len();
        let have = cur.map_or(0, ProgFrontend::entries);
        let after = self.state.svc_entries[f] + need.saturating_sub(have);
        if after > svc_limit {
            return Err(Error::MapFull {
                map: [SVC_MAP, SVC6_MAP][f],
                capacity: u32::try_from(svc_limit).unwrap_or(u32::MAX),
                what: format!("frontend {key} ({})", name.as_str()),
            });
        }
        let beyond = |c: &ProgFrontend| {
            let n = fe.backends.len();
            c.slots.len().saturating_sub(n) + c.stale_slots.iter().filter(|&&s| usize::from(s) > n).count()
        };
        let beyond = cur.map_or(0, beyond);
        if self.plan.transient[f] > 0 && after + self.plan.transient[f] + beyond > self.svc_capacity {
            // The slots the last stage deletes stay in the map while the
            // stages before add theirs: write what is staged first, so the
            // map never needs more room than this frontend alone.
            self.flush(report);
        }
        self.plan.transient[f] += beyond;
        let o = self.plan.owner(owner);
        // 1. Backends (ids in the model's order: sorted by address).
        for (b, id) in fe.backends.iter().zip(&mut ids) {
            if id.is_some() {
                continue;
            }
            let key = BackendIdKey::new(*b, proto);
            // (An address twice in the list gets the record of the first.)
            if let Some(i) = self.state.backends.find(&key) {
                *id = Some(i);
                continue;
            }
            let next = self.state.next_backend_id;
            match BackendEntry::new(*b, proto) {
                BackendEntry::V4(v) => self.plan.stages[NEW_BACKENDS].backends.push(o, next, v),
                BackendEntry::V6(v) => self.plan.stages[NEW_BACKENDS].backends6.push(o, next, v),
            }
            *id = Some(self.state.backends.add(key, next, true));
            self.state.backend_entries[f] += 1;
            self.state.next_backend_id += 1;
        }
        let wanted: Vec<u32> = ids.into_iter().map(|id| id.expect("every backend has a record")).collect();
        let cur = self.state.frontends.get(&key);
        let cur_slots = cur.map_or(&[][..], |c| &c.slots[..]);
        if proto == Protocol::Udp {
            self.note_removed(cur_slots, &wanted, report);
        }
        let slots = Self::plan_slots(cur_slots, &wanted);
        let svc_id = if let Some(c) = cur { c.svc_id } else {
            let id = self.state.next_svc_id;
            self.state.next_svc_id += 1;
            id
        };
        let st = &mut self.plan.stages;
        // Name before the frontend exists, so a reader never sees an unnamed id.
        if cur.and_then(|c| c.name.as_deref()) != Some(name.as_str()) {
            st[SLOTS].names.push(o, svc_id, name);
        }
        // 2. Slots that differ.
        for (i, id) in slots.iter().enumerate() {
            if cur_slots.get(i) != Some(id) {
                let v = SvcValue { backend_id: self.state.backends.id(*id), svc_id, ..SvcValue::default() };
                st[SLOTS].put_slot(o, slot_key(key, slot_u16(i + 1)), v);
            }
        }
        // Source ranges before slot 0 says to check them.
        let no_ranges = BTreeSet::new();
        let cur_ranges = cur.map_or(&no_ranges, |c| &c.ranges);
        for r in want_ranges.difference(cur_ranges) {
            st[SLOTS].ranges.push(o, (svc_id, *r), ());
        }
        // 3. Slot 0 with the count.
        let flags = frontend_flags(fe);
        let head_same = cur.is_some_and(|c| {
            c.svc_id == svc_id
                && c.flags == flags
                && c.slots.len() == slots.len()
                && c.affinity_group == fe.affinity_group
                && c.affinity_timeout_s == fe.affinity_timeout_s
        });
        if !head_same {
            let v = SvcValue {
                backend_id: fe.affinity_group,
                count: slot_u16(slots.len()),
                flags,
                svc_id,
                affinity_timeout_s: fe.affinity_timeout_s,
            };
            st[HEADS].put_slot(o, slot_key(key, 0), v);
        }
        // 4. Slots beyond the new count; only leftovers beyond it (one
        // within it was just written above).
        let stale_beyond = cur.iter().flat_map(|c| c.stale_slots.iter().copied()).filter(|&s| usize::from(s) > slots.len());
        for s in (slots.len() + 1..=cur_slots.len()).map(slot_u16).chain(stale_beyond) {
            st[BEYOND].del_slot(o, slot_key(key, s));
        }
        // Ranges no longer wanted, after slot 0 stopped asking for them.
        for r in cur_ranges.difference(&want_ranges) {
            st[BEYOND].del_ranges.push(o, (svc_id, *r), ());
        }
        let prog = ProgFrontend {
            svc_id,
            flags,
            affinity_group: fe.affinity_group,
            affinity_timeout_s: fe.affinity_timeout_s,
            ranges: want_ranges,
            slots: slots.into_boxed_slice(),
            stale_slots: Box::default(),
            name: Some(name.as_str().into()),
        };
        self.state.set_frontend(key, Some(prog));
        Ok(())
    }

    /// Records the backends of `before` that are not in `after`.
    fn note_removed(&self, before: &[u32], after: &[u32], report: &mut SyncReport) {
        for &i in before.iter().filter(|i| !after.contains(i)) {
            if let Some((BackendAddr { addr, port, .. }, _)) = self.state.backends.get(i).and_then(|r| r.key.decode()) {
                report.removed_udp_backends.insert((addr, port));
            }
        }
    }

    /// Stages the deletion of the backends no slot references.
    fn remove_unreferenced_backends(&mut self) {
        // (id, record), in id order, once each.
        let mut unused: Vec<(u32, u32)> = std::mem::take(&mut self.state.unref)
            .into_iter()
            .filter_map(|i| self.state.backends.get(i).filter(|r| r.refs == 0).map(|r| (r.id, i)))
            .collect();
        unused.sort_unstable();
        unused.dedup();
        let o = self.plan.owner(Owner::Cleanup);
        for (id, i) in unused {
            // (Out of the backend index too, if it is the record found there.)
            let rec = self.state.backends.remove(i);
            let st = &mut self.plan.stages[0];
            if rec.key.is_v6() {
                st.del_backends6.push(o, id, ());
            } else {
                st.del_backends.push(o, id, ());
            }
            let n = &mut self.state.backend_entries[usize::from(rec.key.is_v6())];
            *n = n.saturating_sub(1);
        }
    }
}

/// Slot 0's flags for `fe`.
fn frontend_flags(fe: &Frontend) -> u16 {
    fe.kind.flags()
        | if fe.source_ranges.is_some() { proxy_common::svc::SVC_FLAG_SOURCE_RANGES } else { 0 }
        | if fe.drop_when_empty { SVC_FLAG_DROP_WHEN_EMPTY } else { 0 }
        | if fe.snat_remote { SVC_FLAG_SNAT_REMOTE } else { 0 }
        | if fe.policy_local { SVC_FLAG_POLICY_LOCAL } else { 0 }
}

#[cfg(test)]
mod tests;
