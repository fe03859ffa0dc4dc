//! The service maps written in batches (`BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_DELETE_BATCH`) on this kernel: a sync leaves exactly the
//! entries that writing entry by entry leaves, in far fewer bpf(2) calls,
//! and a batch the kernel stops part-way reports how many entries it wrote.
//!
//! Each test pins the agent's service maps (from the embedded object;
//! nothing loaded or attached) under a directory of its own in
//! /sys/fs/bpf and removes it, also when the test fails. Needs root.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use aya::{
    EbpfLoader, Pod,
    maps::{HashMap, Map, MapData, MapError},
    sys::SyscallError,
};
use integration_tests::netns::unique_name;
use proxy_agent::{
    datapath::{BatchError, BpfMaps, Delete, MapsDump, ServiceMaps as _, Update, ebpf_object, ensure_bpffs},
    error::Error,
    model::{BackendAddr, Desired, Frontend, FrontendKey, FrontendKind, Protocol},
    pins::Pins,
    reconcile::Reconciler,
    store::ObjectKey,
};
use proxy_common::{
    backend::{BACKEND_MAP, BACKEND6_MAP, Backend},
    names::{NAMES_MAP, SvcName},
    svc::{SRC_RANGE_MAP, SRC_RANGE6_MAP, SVC_MAP, SVC6_MAP},
};

/// The six service maps of a fresh object, pinned under a directory of
/// their own, removed on drop.
struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    /// `svc` entries in each service map, `backends` in each backend map.
    fn new(tag: &str, svc: u32, backends: u32) -> Self {
        let dir = PathBuf::from(format!("/sys/fs/bpf/proxy-test-{}", unique_name(tag)));
        ensure_bpffs(&dir).unwrap_or_else(|e| panic!("bpffs at {}: {e} (needs root)", dir.display()));
        let maps = Self { dir };
        let pins = Pins::new(&maps.dir);
        let mut loader = EbpfLoader::new();
        for name in [SVC_MAP, BACKEND_MAP, SVC6_MAP, BACKEND6_MAP, NAMES_MAP, SRC_RANGE_MAP, SRC_RANGE6_MAP] {
            loader.map_pin_path(name, pins.map(name));
        }
        for (name, entries) in [(SVC_MAP, svc), (SVC6_MAP, svc), (BACKEND_MAP, backends), (BACKEND6_MAP, backends)] {
            loader.map_max_entries(name, entries);
        }
        // The maps stay pinned when the object goes.
        loader.load(ebpf_object()).unwrap_or_else(|e| panic!("loading the object's maps under {}: {e}", maps.dir.display()));
        maps
    }

    /// Hash map `name` read key by key with aya (not in batches).
    fn walk<K: Pod + Ord, V: Pod>(&self, name: &str) -> Vec<(K, V)> {
        let data = MapData::from_pin(Pins::new(&self.dir).map(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let map: HashMap<MapData, K, V> = HashMap::try_from(Map::HashMap(data)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut v: Vec<(K, V)> = map.iter().collect::<Result<_, _>>().unwrap_or_else(|e| panic!("{name}: {e}"));
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// [`BpfMaps::dump`] (batched lookups) holds what aya's walk reads.
    fn check_dump(&self, d: &MapsDump) {
        assert_eq!(d.svc, self.walk(SVC_MAP), "{SVC_MAP}");
        assert_eq!(d.svc6, self.walk(SVC6_MAP), "{SVC6_MAP}");
        assert_eq!(d.backends, self.walk(BACKEND_MAP), "{BACKEND_MAP}");
        assert_eq!(d.backends6, self.walk(BACKEND6_MAP), "{BACKEND6_MAP}");
        let names: Vec<(u32, String)> = self.walk::<u32, SvcName>(NAMES_MAP).into_iter().map(|(id, n)| (id, n.as_str().to_owned())).collect();
        assert_eq!(d.names, names, "{NAMES_MAP}");
    }

    fn open(&self) -> BpfMaps {
        BpfMaps::open_pinned(&Pins::new(&self.dir)).unwrap_or_else(|e| panic!("opening the maps pinned under {}: {e}", self.dir.display()))
    }
}

impl Drop for PinnedMaps {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("removing {}: {e}", self.dir.display());
        }
    }
}

/// Everything the maps hold, sorted (the kernel's order is its hash's).
fn dump(m: &BpfMaps) -> MapsDump {
    let mut d = m.dump().expect("dump");
    d.svc.sort_by_key(|(k, _)| *k);
    d.svc6.sort_by_key(|(k, _)| *k);
    d.backends.sort_by_key(|(k, _)| *k);
    d.backends6.sort_by_key(|(k, _)| *k);
    d.names.sort();
    d.ranges.sort();
    d
}

/// What a packet can reach is valid: every slot 0's slots exist and name
/// an existing backend (of the frontend's family).
fn datapath_problems(d: &MapsDump) -> Vec<String> {
    let mut out = Vec::new();
    let v4 = d.svc.iter().map(|(k, v)| ((IpAddr::V4(Ipv4Addr::from(u32::from_be(k.addr_be))), u16::from_be(k.port_be), k.proto), k.backend_slot, *v));
    let v6 = d.svc6.iter().map(|(k, v)| ((IpAddr::V6(Ipv6Addr::from(k.addr)), u16::from_be(k.port_be), k.proto), k.backend_slot, *v));
    let svc: BTreeMap<_, _> = v4.chain(v6).map(|(fk, slot, v)| ((fk, slot), v)).collect();
    let backends: BTreeMap<u32, bool> = d.backends.iter().map(|(id, _)| (*id, false)).chain(d.backends6.iter().map(|(id, _)| (*id, true))).collect();
    for (&(fk, slot), head) in &svc {
        if slot != 0 {
            continue;
        }
        for s in 1..=head.count {
            match svc.get(&(fk, s)) {
                None => out.push(format!("{fk:?}: slot {s} of {} missing", head.count)),
                Some(v) if backends.get(&v.backend_id) != Some(&fk.0.is_ipv6()) => {
                    out.push(format!("{fk:?}: slot {s} names backend {}, not in its family's map", v.backend_id));
                }
                Some(_) => {}
            }
        }
    }
    out
}

fn frontend(service: usize, port: &str, backends: Vec<BackendAddr>) -> Frontend {
    let mut backends = backends;
    backends.sort();
    backends.dedup();
    Frontend {
        service: ObjectKey::new("default", &format!("svc-{service}")),
        port_name: port.into(),
        kind: FrontendKind::ClusterIp,
        backends,
        drop_when_empty: false,
        policy_local: false,
        snat_remote: false,
        affinity_timeout_s: 0,
        affinity_group: 0,
        source_ranges: None,
    }
}

fn v4(a: u32, port: u16) -> BackendAddr {
    BackendAddr { addr: IpAddr::V4(Ipv4Addr::from(a)), port, local: a.is_multiple_of(7) }
}

/// `services` Services (from `first`) of a TCP and a UDP port with
/// `endpoints` endpoints each (`shift` moves the endpoints), every third
/// with an IPv6 frontend too, every fifth with source ranges and session
/// affinity; all share one backend per protocol.
fn services(first: usize, services: usize, endpoints: u32, shift: u32) -> Desired {
    let mut d = Desired::default();
    for i in first..first + services {
        let n = u32::try_from(i).expect("few");
        let vip = IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + n));
        let eps: Vec<u32> = (0..endpoints).map(|j| 0x0af4_0000 + n * 64 + j + shift).chain([0x0af5_0000]).collect();
        for (port, proto, target, name) in [(80, Protocol::Tcp, 8080, "http"), (53, Protocol::Udp, 5353, "dns")] {
            let mut fe = frontend(i, name, eps.iter().map(|&a| v4(a, target)).collect());
            if i % 5 == 0 {
                fe.source_ranges = Some(vec![(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)), 24), (IpAddr::V4(Ipv4Addr::new(198, 51, 100, u8::try_from(i % 256).expect("byte"))), 32)]);
                fe.affinity_timeout_s = 600;
                fe.affinity_group = n + 1;
            }
            d.frontends.insert(FrontendKey { addr: vip, port, protocol: proto }, fe);
        }
        if i % 3 == 0 {
            let vip6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::try_from(i % 65_536).expect("u16")));
            let eps6 = (0..endpoints).map(|j| BackendAddr { addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, u16::try_from(i % 65_536).expect("u16"), u16::try_from(j + shift).expect("u16"))), port: 8080, local: false });
            let mut fe6 = frontend(i, "http", eps6.collect());
            if i % 5 == 0 {
                fe6.source_ranges = Some(vec![(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)), 32), (IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, u16::try_from(i % 65_536).expect("u16"))), 128)]);
            }
            d.frontends.insert(FrontendKey { addr: vip6, port: 80, protocol: Protocol::Tcp }, fe6);
        }
    }
    d
}

#[test]
fn a_sync_in_batches_leaves_the_maps_exactly_as_entry_by_entry_writes() {
    let pinned = [PinnedMaps::new("bb", 65_536, 65_536), PinnedMaps::new("bs", 65_536, 65_536)];
    let mut batched = Reconciler::new(pinned[0].open()).expect("adopt").with_capacity(65_536, 65_536);
    let mut single = Reconciler::new(pinned[1].open()).expect("adopt").with_capacity(65_536, 65_536).with_batch_max(1);
    // 600 Services, then: 200 gone, 200 with other endpoints (fewer, more,
    // moved), 100 new; then a restart (adopting the maps); then nothing.
    let first = services(0, 600, 10, 0);
    let mut second = services(200, 100, 10, 0);
    second.frontends.extend(services(300, 100, 4, 0).frontends);
    second.frontends.extend(services(400, 100, 13, 3).frontends);
    second.frontends.extend(services(500, 200, 10, 0).frontends);
    let third = services(250, 400, 7, 1);
    for (step, d) in [("initial", &first), ("changes", &second), ("after a restart", &third), ("empty", &Desired::default())] {
        if step == "after a restart" {
            batched = Reconciler::new(pinned[0].open()).expect("adopt").with_capacity(65_536, 65_536);
            single = Reconciler::new(pinned[1].open()).expect("adopt").with_capacity(65_536, 65_536).with_batch_max(1);
        }
        let calls = (batched.maps().write_calls(), single.maps().write_calls());
        let rb = batched.sync(d);
        let rs = single.sync(d);
        for (what, r) in [("batched", &rb), ("entry by entry", &rs)] {
            assert!(r.errors.is_empty() && r.other_errors.is_empty(), "{step}, {what}: {:?} {:?}", r.errors, r.other_errors);
        }
        assert_eq!((rb.writes, rb.deletes), (rs.writes, rs.deletes), "{step}: the same writes and deletes");
        assert!(rb.writes + rb.deletes > 0, "{step}: nothing written");
        let (db, ds) = (dump(batched.maps()), dump(single.maps()));
        assert_eq!(db, ds, "{step}: the maps differ");
        pinned[0].check_dump(&db);
        assert!(datapath_problems(&db).is_empty(), "{step}: {:?}", datapath_problems(&db));
        assert_eq!(proxy_agent::inspect::services_view(&db).len(), d.frontends.len(), "{step}: every frontend, nothing else");
        let calls = (batched.maps().write_calls() - calls.0, single.maps().write_calls() - calls.1);
        assert_eq!(usize::try_from(calls.1).expect("count"), rs.writes + rs.deletes, "{step}: entry by entry, a call per entry");
        assert!(calls.0 * 50 < calls.1, "{step}: batches take {} bpf(2) calls, entry by entry {}", calls.0, calls.1);
        assert!(batched.maps().unbatched().is_empty(), "the kernel refused batches for {:?}", batched.maps().unbatched());
    }
    // The first sync wrote every map: each took batches.
    assert!(first.frontends.values().any(|f| f.source_ranges.is_some()));
    assert!(first.frontends.iter().any(|(k, f)| k.addr.is_ipv6() && f.source_ranges.is_some()), "IPv6 ranges too");
}

#[test]
fn a_batch_the_kernel_stops_part_way_reports_what_it_wrote() {
    let pinned = PinnedMaps::new("bf", 64, 64);
    let mut maps = pinned.open();
    let ids: Vec<u32> = (1..=70).collect();
    let values: Vec<Backend> = ids.iter().map(|&id| Backend { addr_be: (0x0af4_0000 + id).to_be(), port_be: 8080u16.to_be(), proto: 6, flags: 0 }).collect();
    // The backend map holds 64: the kernel writes 64 and stops at the 65th (E2BIG).
    let Err(BatchError { written, error }) = maps.update(Update::Backends(&ids, &values)) else { panic!("70 entries fit a map of 64") };
    assert_eq!(written, 64, "{error}");
    let Error::Map { name, source: MapError::SyscallError(SyscallError { call, io_error }), .. } = &error else { panic!("{error:?}") };
    assert_eq!((*name, *call, io_error.raw_os_error()), (BACKEND_MAP, "BPF_MAP_UPDATE_BATCH", Some(libc::E2BIG)), "{error}");
    assert_eq!(maps.write_calls(), 1, "one bpf(2) call");
    let d = dump(&maps);
    assert_eq!(d.backends, ids[..64].iter().copied().zip(values[..64].iter().copied()).collect::<Vec<_>>(), "exactly the entries before the one that failed");
    // Deleting absent keys succeeds and the batch goes on after them.
    maps.delete(Delete::Backends(&[1, 1000, 2, 1001, 1002, 3])).expect("batch delete with absent keys");
    let left: Vec<u32> = dump(&maps).backends.iter().map(|(id, _)| *id).collect();
    assert_eq!(left, (4..=64).collect::<Vec<_>>());

    // A reconciler that believes the maps larger than they are: the
    // frontends whose entries the kernel refuses fail, the others are
    // programmed, and what a packet can reach stays valid.
    drop(maps);
    let pinned = PinnedMaps::new("bg", 64, 64);
    let mut rec = Reconciler::new(pinned.open()).expect("adopt").with_capacity(1000, 1000);
    // 12 IPv4 frontends of 11 backends: 132 backends, 144 service entries.
    let too_many = services(0, 6, 10, 0);
    let report = rec.sync(&too_many);
    assert!(!report.errors.is_empty(), "the kernel's maps hold 64: some frontends cannot be programmed");
    let d = dump(rec.maps());
    assert!(datapath_problems(&d).is_empty(), "{:?}", datapath_problems(&d));
    let programmed = proxy_agent::inspect::services_view(&d).len();
    assert_eq!(programmed + report.errors.len(), too_many.frontends.len(), "each frontend is programmed or reported: {:?}", report.errors);
    // With fewer frontends the next sync re-reads the maps and converges.
    let fits = services(0, 2, 10, 0);
    let report = rec.sync(&fits);
    assert!(report.errors.is_empty() && report.other_errors.is_empty(), "{:?} {:?}", report.errors, report.other_errors);
    let report = rec.sync(&fits);
    assert!(!report.changed(), "a second sync writes nothing");
    let d = dump(rec.maps());
    assert_eq!(proxy_agent::inspect::services_view(&d).len(), fits.frontends.len());
    assert!(datapath_problems(&d).is_empty(), "{:?}", datapath_problems(&d));
}
