//! Reconciler tests against [`FakeMaps`]: what is written, in which order,
//! that only differences are written, and that the maps always decode back
//! to the desired state (also after restarts, stale leftovers and faults).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use proxy_common::{
    backend::{BACKEND_MAP, Backend},
    svc::{SVC_FLAG_CLUSTER_IP, SVC_MAP, SvcKey, SvcValue},
};

use super::{Reconciler, SyncReport};
use crate::{
    datapath::{FakeMaps, ServiceMaps as _},
    error::Error,
    inspect::services_view,
    model::{
        BackendAddr, Desired, Frontend, FrontendKey, FrontendKind,
        Protocol::{self, Tcp, Udp},
    },
    store::ObjectKey,
};

// ---------------------------------------------------------------------------
// Building desired state
// ---------------------------------------------------------------------------

type Fe = (FrontendKey, Frontend);

/// An IPv4 address as the IPv4 maps store it.
fn v4(a: std::net::IpAddr) -> u32 {
    match a {
        std::net::IpAddr::V4(a) => u32::from(a),
        std::net::IpAddr::V6(a) => panic!("{a} is IPv6"),
    }
}

fn key(vip: &str, port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey {
        addr: vip
            .parse()
            .unwrap_or_else(|e| panic!("bad VIP {vip:?}: {e}")),
        port,
        protocol,
    }
}

fn baddr(s: &str) -> BackendAddr {
    let a: std::net::SocketAddr = s.parse().unwrap_or_else(|e| panic!("backend {s:?} is not addr:port ([v6]:port): {e}"));
    BackendAddr { addr: a.ip(), port: a.port(), local: false }
}

/// A `ClusterIP` frontend named after its VIP, port and protocol.
fn fe(vip: &str, port: u16, protocol: Protocol, backends: &[&str]) -> Fe {
    let mut bs: Vec<BackendAddr> = backends.iter().map(|b| baddr(b)).collect();
    bs.sort();
    bs.dedup();
    (
        key(vip, port, protocol),
        Frontend {
            service: ObjectKey::new("default", &format!("svc-{}", vip.replace('.', "-"))),
            port_name: format!("{}-{port}", protocol.as_str().to_lowercase()).into(),
            kind: FrontendKind::ClusterIp,
            backends: bs,
            drop_when_empty: false,
            policy_local: false,
            snat_remote: false,
            affinity_timeout_s: 0,
            affinity_group: 0,
            source_ranges: None,
        },
    )
}

fn desired<'a>(fes: impl IntoIterator<Item = &'a Fe>) -> Desired {
    Desired {
        frontends: fes.into_iter().cloned().collect(),
    }
}

// ---------------------------------------------------------------------------
// Running the reconciler
// ---------------------------------------------------------------------------

fn reconciler(maps: FakeMaps) -> Reconciler<FakeMaps> {
    Reconciler::new(maps).unwrap_or_else(|e| panic!("Reconciler::new failed: {e:?}"))
}

/// The log entries written since `since`.
fn log_since(r: &Reconciler<FakeMaps>, since: usize) -> Vec<String> {
    r.maps().log[since..].to_vec()
}

/// Checks that the report's counters match what was actually written.
fn assert_report_matches_log(rep: &SyncReport, log: &[String]) {
    let writes = log.iter().filter(|l| l.contains("+ ")).count();
    let deletes = log.iter().filter(|l| l.contains("- ")).count();
    assert_eq!(
        (rep.writes, rep.deletes),
        (writes, deletes),
        "report (writes, deletes) disagrees with the write log {log:#?}"
    );
}

/// Syncs, expecting no error; returns the report and the writes it made.
fn sync_ok(r: &mut Reconciler<FakeMaps>, d: &Desired) -> (SyncReport, Vec<String>) {
    let before = r.maps().log.len();
    let rep = r.sync(d);
    assert!(
        rep.errors.is_empty() && rep.other_errors.is_empty(),
        "unexpected sync errors: {:?} / {:?}",
        rep.errors,
        rep.other_errors
    );
    let log = log_since(r, before);
    assert_report_matches_log(&rep, &log);
    (rep, log)
}

/// A reconciler that has cleanly programmed `d` into empty maps.
fn programmed(d: &Desired) -> Reconciler<FakeMaps> {
    programmed_with(d, super::FLUSH_ENTRIES)
}

/// [`programmed`], writing at most `batch_max` entries per map call.
fn programmed_with(d: &Desired, batch_max: usize) -> Reconciler<FakeMaps> {
    let mut r = reconciler(FakeMaps::default()).with_batch_max(batch_max);
    sync_ok(&mut r, d);
    assert_consistent(r.maps(), "after the initial sync");
    r
}

/// The two ways of writing: one entry per map call (as before batching),
/// and batches, where a failed entry stops a batch part-way.
const MODES: [(usize, &str); 2] = [(1, "entry by entry"), (super::FLUSH_ENTRIES, "in batches")];

fn assert_no_writes(r: &mut Reconciler<FakeMaps>, d: &Desired, what: &str) {
    let (rep, log) = sync_ok(r, d);
    assert!(
        !rep.changed() && rep.writes == 0 && rep.deletes == 0 && log.is_empty(),
        "{what}: expected no writes, got {} writes / {} deletes: {log:#?}",
        rep.writes,
        rep.deletes
    );
}

// ---------------------------------------------------------------------------
// Reading the maps back
// ---------------------------------------------------------------------------

fn skey(k: FrontendKey, slot: u16) -> SvcKey {
    super::svc_key(k, slot)
}

fn head(maps: &FakeMaps, k: FrontendKey) -> SvcValue {
    *maps
        .svc
        .get(&skey(k, 0))
        .unwrap_or_else(|| panic!("no slot 0 for {k}; svc map: {:#?}", maps.svc))
}

/// Backend ids of slots 1..=count, in slot order.
fn slot_ids(maps: &FakeMaps, k: FrontendKey) -> Vec<u32> {
    let h = head(maps, k);
    (1..=h.count)
        .map(|s| {
            maps.svc
                .get(&skey(k, s))
                .unwrap_or_else(|| panic!("{k}: slot {s} of {} is missing", h.count))
                .backend_id
        })
        .collect()
}

/// The id of the backend entry with this address and protocol (exactly one).
fn backend_id(maps: &FakeMaps, b: &str, proto: Protocol) -> u32 {
    let a = baddr(b);
    let ids: Vec<u32> = maps
        .backends
        .iter()
        .filter(|(_, v)| {
            v.addr_be == v4(a.addr).to_be()
                && v.port_be == a.port.to_be()
                && v.proto == proto.number()
        })
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "expected exactly one backend entry for {b}/{proto}, got ids {ids:?}"
    );
    ids[0]
}

/// Whether the svc map holds any entry (any slot) for this frontend.
fn has_any_entry(maps: &FakeMaps, k: FrontendKey) -> bool {
    let k0 = skey(k, 0);
    maps.svc
        .keys()
        .any(|sk| sk.addr_be == k0.addr_be && sk.port_be == k0.port_be && sk.proto == k0.proto)
}

fn backend_value(b: &str, proto: Protocol) -> Backend {
    let a = baddr(b);
    Backend {
        addr_be: v4(a.addr).to_be(),
        port_be: a.port.to_be(),
        proto: proto.number(),
        flags: 0,
    }
}

/// The maps decoded through `inspect::services_view`, one line per frontend:
/// `addr:port/PROTO kind "name" -> [backends]`. Ids are left out and
/// backends are sorted, so two maps holding the same services compare equal
/// whatever ids or slot positions they use.
fn view(maps: &FakeMaps) -> String {
    let dump = maps
        .dump()
        .unwrap_or_else(|e| panic!("FakeMaps::dump failed: {e:?}"));
    let mut out = String::new();
    for f in services_view(&dump) {
        let mut bs: Vec<String> = f
            .backends
            .iter()
            .map(|b| {
                if b.present {
                    format!("{}:{}", b.address, b.port)
                } else {
                    format!("<missing id {}>", b.id)
                }
            })
            .collect();
        bs.sort();
        let _ = writeln!(
            out,
            "{}:{}/{} {} {:?} -> [{}]",
            f.address,
            f.port,
            f.protocol,
            f.kind,
            f.service,
            bs.join(", ")
        );
    }
    out
}

/// What [`view`] must show for `d`.
fn expected_view(d: &Desired) -> String {
    let mut out = String::new();
    for (k, f) in &d.frontends {
        let mut bs: Vec<String> = f.backends.iter().map(ToString::to_string).collect();
        bs.sort();
        let _ = writeln!(
            out,
            "{k} ClusterIP {:?} -> [{}]",
            f.display_name(),
            bs.join(", ")
        );
    }
    out
}

fn fk_text(addr_be: u32, port_be: u16, proto: u8) -> String {
    let proto = Protocol::from_number(proto).map_or_else(|| proto.to_string(), |p| p.to_string());
    format!(
        "{}:{}/{proto}",
        Ipv4Addr::from(u32::from_be(addr_be)),
        u16::from_be(port_be)
    )
}

type Groups = BTreeMap<(u32, u16, u8, u8), BTreeMap<u16, SvcValue>>;

fn groups(maps: &FakeMaps) -> Groups {
    let mut g: Groups = BTreeMap::new();
    for (k, v) in &maps.svc {
        g.entry((k.addr_be, k.port_be, k.proto, k.scope))
            .or_default()
            .insert(k.backend_slot, *v);
    }
    g
}

/// What a packet can observe is valid: every slot 0 has all its slots
/// 1..=count, and each of them names an existing backend of the right
/// protocol (leftovers a packet never reaches are allowed). Returns the
/// problems found.
fn datapath_problems(maps: &FakeMaps) -> Vec<String> {
    let mut out = Vec::new();
    for ((a, p, proto, _), slots) in groups(maps) {
        let fk = fk_text(a, p, proto);
        let Some(head) = slots.get(&0) else { continue };
        for s in 1..=head.count {
            let Some(v) = slots.get(&s) else {
                out.push(format!(
                    "{fk}: count {} but slot {s} is missing",
                    head.count
                ));
                continue;
            };
            if v.svc_id != head.svc_id {
                out.push(format!(
                    "{fk}: slot {s} has svc id {}, slot 0 has {}",
                    v.svc_id, head.svc_id
                ));
            }
            match maps.backends.get(&v.backend_id) {
                None => out.push(format!(
                    "{fk}: slot {s} (count {}) points at backend id {}, which is not in the backend map",
                    head.count, v.backend_id
                )),
                Some(b) if b.proto != proto => out.push(format!("{fk}: slot {s} points at a backend of another protocol")),
                Some(_) => {}
            }
        }
    }
    out
}

fn assert_datapath_valid(maps: &FakeMaps, ctx: &str) {
    let problems = datapath_problems(maps);
    assert!(
        problems.is_empty(),
        "{ctx}: invalid for a packet:\n{}\nsvc map: {:#?}\nbackends: {:?}",
        problems.join("\n"),
        maps.svc,
        maps.backends
    );
}

/// The maps hold exactly a clean programming: no orphan slot, no slot
/// beyond a count, no unused name or backend, no duplicate id or address.
fn assert_consistent(maps: &FakeMaps, ctx: &str) {
    assert_datapath_valid(maps, ctx);
    let mut svc_ids = BTreeSet::new();
    let mut used_backends = BTreeSet::new();
    for ((a, p, proto, scope), slots) in groups(maps) {
        let fk = fk_text(a, p, proto);
        assert_eq!(scope, 0, "{ctx}: {fk}: entry with scope {scope}");
        let head = slots
            .get(&0)
            .unwrap_or_else(|| panic!("{ctx}: {fk}: slots without a slot 0: {slots:?}"));
        // Slot 0's `backend_id` is the affinity group (0 in these tests
        // unless the frontend has session affinity), never a backend.
        assert!(head.backend_id == 0 || head.affinity_timeout_s != 0, "{ctx}: {fk}: slot 0 has a backend id without affinity");
        assert_eq!(head.flags, SVC_FLAG_CLUSTER_IP, "{ctx}: {fk}: slot 0 flags");
        assert!(
            svc_ids.insert(head.svc_id),
            "{ctx}: {fk}: svc id {} is used by two frontends",
            head.svc_id
        );
        let present: Vec<u16> = slots.keys().copied().collect();
        let wanted: Vec<u16> = (0..=head.count).collect();
        assert_eq!(
            present, wanted,
            "{ctx}: {fk}: slots present should be exactly 0..=count"
        );
        let mut mine = BTreeSet::new();
        for s in 1..=head.count {
            let id = slots[&s].backend_id;
            assert!(
                mine.insert(id),
                "{ctx}: {fk}: backend id {id} is in two slots"
            );
            used_backends.insert(id);
        }
    }
    let names: BTreeSet<u32> = maps.names.keys().copied().collect();
    assert_eq!(
        names, svc_ids,
        "{ctx}: the names map should hold exactly the svc ids in use"
    );
    let all: BTreeSet<u32> = maps.backends.keys().copied().collect();
    assert_eq!(
        all, used_backends,
        "{ctx}: the backend map should hold exactly the referenced backends"
    );
    let mut addrs = BTreeSet::new();
    for (id, b) in &maps.backends {
        assert!(
            addrs.insert((b.addr_be, b.port_be, b.proto)),
            "{ctx}: backend id {id} duplicates the address of another id"
        );
        assert_eq!(b.flags, 0, "{ctx}: backend {id} flags");
    }
}

// ---------------------------------------------------------------------------
// Write log
// ---------------------------------------------------------------------------

/// How `FakeMaps` names a frontend in its log.
fn tag(k: FrontendKey) -> String {
    format!("{}:{}", v4(k.addr).to_be(), k.port.to_be())
}

fn svc_put(k: FrontendKey, slot: u16) -> String {
    format!("svc+ {} slot {slot}", tag(k))
}

fn svc_del(k: FrontendKey, slot: u16) -> String {
    format!("svc- {} slot {slot}", tag(k))
}

fn pos(log: &[String], entry: &str) -> usize {
    log.iter()
        .position(|l| l == entry)
        .unwrap_or_else(|| panic!("{entry:?} is not in the write log {log:#?}"))
}

/// Positions of the log entries starting with `prefix`.
fn positions(log: &[String], prefix: &str) -> Vec<usize> {
    log.iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with(prefix))
        .map(|(i, _)| i)
        .collect()
}

/// Slot numbers of the `svc+` writes for `k` with their log positions.
fn slot_writes(log: &[String], k: FrontendKey) -> Vec<(usize, u16)> {
    let prefix = format!("svc+ {} slot ", tag(k));
    log.iter()
        .enumerate()
        .filter_map(|(i, l)| {
            l.strip_prefix(&prefix)
                .map(|s| (i, s.parse().expect("slot number in log")))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

const WEB: [&str; 3] = ["10.244.0.11:8080", "10.244.0.12:8080", "10.244.0.13:8080"];

#[test]
fn first_sync_programs_backends_slots_head_and_names() {
    let web = fe("10.96.0.10", 80, Tcp, &WEB);
    let dns = fe("10.96.0.53", 53, Udp, &["10.244.1.2:53", "10.244.1.3:53"]);
    let empty = fe("10.96.0.99", 9000, Tcp, &[]);
    let want = desired([&web, &dns, &empty]);
    let mut r = reconciler(FakeMaps::default());
    let (rep, log) = sync_ok(&mut r, &want);
    let maps = r.maps();

    // 5 backends, 3 names, 3 heads + 5 slots.
    assert_eq!(maps.backends.len(), 5, "backends: {:?}", maps.backends);
    assert_eq!(maps.names.len(), 3, "names: {:?}", maps.names);
    assert_eq!(maps.svc.len(), 3 + 5, "svc: {:#?}", maps.svc);
    assert_eq!((rep.writes, rep.deletes), (5 + 3 + 8, 0), "log: {log:#?}");
    assert_eq!(r.programmed_frontends(), 3);

    let mut svc_ids = BTreeSet::new();
    for (k, f) in [&web, &dns, &empty] {
        let k = *k;
        let head0 = head(maps, k);
        assert_eq!(
            usize::from(head0.count),
            f.backends.len(),
            "{k}: count in slot 0"
        );
        assert_eq!(head0.flags, SVC_FLAG_CLUSTER_IP, "{k}: flags in slot 0");
        assert_eq!(
            head0.backend_id, 0,
            "{k}: slot 0 must not carry a backend id"
        );
        assert_ne!(head0.svc_id, 0, "{k}: svc id 0 is not allocated");
        assert!(
            svc_ids.insert(head0.svc_id),
            "{k}: svc id {} shared with another frontend",
            head0.svc_id
        );
        assert_eq!(
            maps.names.get(&head0.svc_id).map(String::as_str),
            Some(f.display_name().as_str()),
            "{k}: name"
        );
        // Every slot: svc id of the frontend, backend entry with the right address.
        for (i, b) in f.backends.iter().enumerate() {
            let slot = u16::try_from(i + 1).expect("few slots");
            let value = maps
                .svc
                .get(&skey(k, slot))
                .unwrap_or_else(|| panic!("{k}: slot {slot} missing"));
            assert_eq!(value.svc_id, head0.svc_id, "{k}: slot {slot} svc id");
            assert_eq!(
                (value.count, value.flags),
                (0, 0),
                "{k}: slot {slot} carries head fields"
            );
            let be = maps
                .backends
                .get(&value.backend_id)
                .unwrap_or_else(|| panic!("{k}: slot {slot}: no backend {}", value.backend_id));
            assert_eq!(
                *be,
                backend_value(&b.to_string(), k.protocol),
                "{k}: slot {slot} backend value"
            );
        }
        assert!(
            !maps.svc.contains_key(&skey(k, head0.count + 1)),
            "{k}: slot beyond count"
        );
    }
    assert_consistent(maps, "after the first sync");
    assert_eq!(
        view(maps),
        expected_view(&want),
        "maps must decode back to the desired state"
    );
}

#[test]
fn second_sync_with_same_desired_writes_nothing() {
    let d = desired(&[
        fe("10.96.0.10", 80, Tcp, &WEB),
        fe("10.96.0.10", 443, Tcp, &["10.244.0.11:8443"]),
        fe("10.96.0.53", 53, Udp, &["10.244.1.2:53", "10.244.1.3:53"]),
        fe("10.96.0.99", 9000, Tcp, &[]),
    ]);
    let mut r = programmed(&d);
    let before = r.maps().clone();
    assert_no_writes(&mut r, &d, "second sync");
    assert_no_writes(&mut r, &d.clone(), "third sync");
    assert_eq!(r.maps().svc, before.svc);
    assert_eq!(r.maps().backends, before.backends);
    assert_eq!(r.maps().names, before.names);
}

#[test]
fn new_frontend_writes_backends_then_slots_then_slot_zero() {
    let existing = fe("10.96.0.1", 443, Tcp, &["192.168.0.1:6443"]);
    let mut r = programmed(&desired([&existing]));
    let web = fe("10.96.0.10", 80, Tcp, &WEB);
    let dns = fe("10.96.0.53", 53, Udp, &["10.244.1.2:53", "10.244.1.3:53"]);
    let (_, log) = sync_ok(&mut r, &desired([&existing, &web, &dns]));

    for (k, f) in [&web, &dns] {
        let k = *k;
        let ids: Vec<u32> = f
            .backends
            .iter()
            .map(|b| backend_id(r.maps(), &b.to_string(), k.protocol))
            .collect();
        let writes = slot_writes(&log, k);
        let (slot0_at, _) = *writes
            .iter()
            .find(|(_, s)| *s == 0)
            .unwrap_or_else(|| panic!("{k}: no slot 0 write in {log:#?}"));
        let first_slot_at = writes.iter().map(|(i, _)| *i).min().expect("slot writes");
        for id in &ids {
            let b = pos(&log, &format!("backend+ {id}"));
            assert!(
                b < first_slot_at,
                "{k}: backend+ {id} (at {b}) must come before any svc+ slot write (first at {first_slot_at}): {log:#?}"
            );
        }
        for (i, s) in &writes {
            if *s != 0 {
                assert!(
                    *i < slot0_at,
                    "{k}: slot {s} written at {i}, after slot 0 (at {slot0_at}): {log:#?}"
                );
            }
        }
        let slots: BTreeSet<u16> = writes.iter().map(|(_, s)| *s).filter(|s| *s != 0).collect();
        let want: BTreeSet<u16> = (1..=u16::try_from(f.backends.len()).expect("few")).collect();
        assert_eq!(slots, want, "{k}: every slot written once");
        assert_eq!(
            writes.len(),
            f.backends.len() + 1,
            "{k}: each slot written exactly once: {log:#?}"
        );
        // The name exists before the frontend does.
        let svc_id = head(r.maps(), k).svc_id;
        let name_at = pos(&log, &format!("name+ {svc_id}"));
        assert!(
            name_at < slot0_at,
            "{k}: name+ (at {name_at}) should precede slot 0 (at {slot0_at}): {log:#?}"
        );
    }
    assert_consistent(r.maps(), "after adding frontends");
}

#[test]
fn backend_removal_writes_slot_zero_before_deleting_slots_and_backend_last() {
    let (k, _) = fe("10.96.0.10", 80, Tcp, &WEB);
    let mut r = programmed(&desired(&[fe("10.96.0.10", 80, Tcp, &WEB)]));
    let gone = backend_id(r.maps(), WEB[1], Tcp);
    let (_, log) = sync_ok(
        &mut r,
        &desired(&[fe("10.96.0.10", 80, Tcp, &[WEB[0], WEB[2]])]),
    );

    let slot0_at = pos(&log, &svc_put(k, 0));
    let del3_at = pos(&log, &svc_del(k, 3));
    assert!(
        slot0_at < del3_at,
        "slot 0 with the new count must be written before slot 3 is deleted: {log:#?}"
    );
    for (i, s) in slot_writes(&log, k) {
        assert!(
            s == 0 || i < slot0_at,
            "slot {s} rewritten after slot 0: {log:#?}"
        );
    }
    let backend_del = format!("backend- {gone}");
    assert_eq!(
        log.last(),
        Some(&backend_del),
        "the backend deletion must come last: {log:#?}"
    );
    assert_eq!(
        positions(&log, "backend-").len(),
        1,
        "only the removed backend is deleted: {log:#?}"
    );
    assert_eq!(head(r.maps(), k).count, 2);
    assert_consistent(r.maps(), "after removing a backend");
}

#[test]
fn frontend_removal_deletes_slot_zero_first() {
    let web = fe("10.96.0.10", 80, Tcp, &WEB);
    let other = fe("10.96.0.20", 80, Tcp, &["10.244.5.5:80"]);
    let mut r = programmed(&desired([&web, &other]));
    let svc_id = head(r.maps(), web.0).svc_id;
    let (_, log) = sync_ok(&mut r, &desired([&other]));

    let k = web.0;
    let slot0_at = pos(&log, &svc_del(k, 0));
    for s in 1..=3 {
        let at = pos(&log, &svc_del(k, s));
        assert!(
            slot0_at < at,
            "slot 0 (at {slot0_at}) must be deleted before slot {s} (at {at}): {log:#?}"
        );
    }
    let name_at = pos(&log, &format!("name- {svc_id}"));
    assert!(name_at > slot0_at, "name deleted before slot 0: {log:#?}");
    let first_backend_del = *positions(&log, "backend-")
        .first()
        .expect("backends deleted");
    let last_svc_del = *positions(&log, "svc-").last().expect("slots deleted");
    assert!(
        last_svc_del < first_backend_del,
        "backends must be deleted after every slot: {log:#?}"
    );
    assert_eq!(positions(&log, "backend-").len(), 3, "{log:#?}");
    assert!(
        positions(&log, "svc+").is_empty() && positions(&log, "backend+").is_empty(),
        "{log:#?}"
    );
    assert!(!has_any_entry(r.maps(), k));
    assert_eq!(view(r.maps()), expected_view(&desired([&other])));
    assert_consistent(r.maps(), "after removing a frontend");
}

#[test]
fn removing_one_of_three_backends_rewrites_at_most_one_slot() {
    for (removed, gone) in WEB.iter().enumerate() {
        let (k, _) = fe("10.96.0.10", 80, Tcp, &WEB);
        let mut r = programmed(&desired(&[fe("10.96.0.10", 80, Tcp, &WEB)]));
        let ids_before: BTreeMap<&str, u32> = WEB
            .iter()
            .map(|b| (*b, backend_id(r.maps(), b, Tcp)))
            .collect();
        let slots_before = slot_ids(r.maps(), k);
        let remaining: Vec<&str> = WEB
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, _)| *i != removed)
            .map(|(_, b)| b)
            .collect();
        let d = desired(&[fe("10.96.0.10", 80, Tcp, &remaining)]);
        let (rep, log) = sync_ok(&mut r, &d);
        let ctx = format!("removing {gone}");

        let writes = slot_writes(&log, k);
        assert!(
            writes.iter().any(|(_, s)| *s == 0),
            "{ctx}: slot 0 not rewritten: {log:#?}"
        );
        assert!(
            writes.len() <= 2,
            "{ctx}: more than one slot plus slot 0 written: {log:#?}"
        );
        assert_eq!(
            rep.writes,
            writes.len(),
            "{ctx}: only svc writes expected: {log:#?}"
        );
        let slots_after = slot_ids(r.maps(), k);
        assert_eq!(slots_after.len(), 2, "{ctx}");
        for b in &remaining {
            assert_eq!(
                backend_id(r.maps(), b, Tcp),
                ids_before[b],
                "{ctx}: {b} changed id"
            );
        }
        let moved = remaining
            .iter()
            .filter(|b| {
                let id = ids_before[*b];
                slots_before.iter().position(|x| *x == id)
                    != slots_after.iter().position(|x| *x == id)
            })
            .count();
        assert!(
            moved <= 1,
            "{ctx}: {moved} remaining backends changed slot: {slots_before:?} -> {slots_after:?}"
        );
        assert_eq!(view(r.maps()), expected_view(&d), "{ctx}");
        assert_consistent(r.maps(), &ctx);
    }
}

#[test]
fn adding_a_backend_keeps_existing_ids_and_slots() {
    let (k, _) = fe("10.96.0.10", 80, Tcp, &WEB);
    let mut r = programmed(&desired(&[fe("10.96.0.10", 80, Tcp, &[WEB[0], WEB[2]])]));
    let slots_before = slot_ids(r.maps(), k);
    let id0 = backend_id(r.maps(), WEB[0], Tcp);
    let id2 = backend_id(r.maps(), WEB[2], Tcp);
    let svc_id = head(r.maps(), k).svc_id;

    let d = desired(&[fe("10.96.0.10", 80, Tcp, &WEB)]);
    let (rep, log) = sync_ok(&mut r, &d);
    let new_id = backend_id(r.maps(), WEB[1], Tcp);
    assert_eq!(backend_id(r.maps(), WEB[0], Tcp), id0);
    assert_eq!(backend_id(r.maps(), WEB[2], Tcp), id2);
    assert!(new_id != id0 && new_id != id2, "new backend reuses an id");
    let slots_after = slot_ids(r.maps(), k);
    assert_eq!(
        slots_after[..2],
        slots_before[..],
        "existing backends moved: {slots_before:?} -> {slots_after:?}"
    );
    assert_eq!(slots_after[2], new_id);
    assert_eq!(head(r.maps(), k).svc_id, svc_id, "svc id changed");
    assert_eq!(
        log,
        vec![format!("backend+ {new_id}"), svc_put(k, 3), svc_put(k, 0)],
        "exactly: new backend, its slot, slot 0"
    );
    assert_eq!(rep.deletes, 0);
    assert_eq!(view(r.maps()), expected_view(&d));
    assert_consistent(r.maps(), "after adding a backend");
}

#[test]
fn restart_adopts_ids_and_writes_nothing() {
    let web = fe("10.96.0.10", 80, Tcp, &WEB);
    let dns = fe("10.96.0.53", 53, Udp, &["10.244.1.2:53", "10.244.1.3:53"]);
    let empty = fe("10.96.0.99", 9000, Tcp, &[]);
    let d = desired([&web, &dns, &empty]);
    let first = programmed(&d);
    let snapshot = first.maps().clone();

    let mut r = reconciler(snapshot.clone());
    assert_eq!(
        r.programmed_frontends(),
        3,
        "frontends adopted from the maps"
    );
    assert_no_writes(&mut r, &d, "first sync after restart");
    assert_eq!(
        r.maps().svc,
        snapshot.svc,
        "svc ids / slots changed across the restart"
    );
    assert_eq!(
        r.maps().backends,
        snapshot.backends,
        "backend ids changed across the restart"
    );
    assert_eq!(r.maps().names, snapshot.names);

    // A new service after the restart gets fresh ids; a shared address keeps its id.
    let old_svc_ids: BTreeSet<u32> = snapshot.svc.values().map(|v| v.svc_id).collect();
    let old_backend_ids: BTreeSet<u32> = snapshot.backends.keys().copied().collect();
    let shared_id = backend_id(&snapshot, WEB[0], Tcp);
    let api = fe(
        "10.96.0.1",
        443,
        Tcp,
        &["192.168.0.1:6443", "192.168.0.2:6443", WEB[0]],
    );
    let d2 = desired([&web, &dns, &empty, &api]);
    let (_, log) = sync_ok(&mut r, &d2);
    let m = r.maps();
    let new_svc = head(m, api.0).svc_id;
    assert!(
        !old_svc_ids.contains(&new_svc),
        "new svc id {new_svc} collides with {old_svc_ids:?}"
    );
    for b in ["192.168.0.1:6443", "192.168.0.2:6443"] {
        let id = backend_id(m, b, Tcp);
        assert!(
            !old_backend_ids.contains(&id),
            "new backend {b} got id {id}, already in use: {old_backend_ids:?}"
        );
    }
    assert_eq!(
        backend_id(m, WEB[0], Tcp),
        shared_id,
        "a backend address already programmed keeps its id"
    );
    assert!(
        positions(&log, "svc+")
            .iter()
            .all(|&i| log[i].contains(&tag(api.0))),
        "only the new frontend is written: {log:#?}"
    );
    assert_eq!(
        slot_ids(m, web.0),
        slot_ids(&snapshot, web.0),
        "{}: slots changed",
        web.0
    );
    assert_eq!(view(m), expected_view(&d2));
    assert_consistent(m, "after adding a service after restart");
}

#[test]
fn stale_entries_are_removed_by_the_next_sync() {
    let web = fe("10.96.0.10", 80, Tcp, &WEB);
    let dns = fe("10.96.0.53", 53, Udp, &["10.244.1.2:53"]);
    let d = desired([&web, &dns]);
    let clean = programmed(&d).maps().clone();

    let mut dirty = clean.clone();
    let web_head = head(&dirty, web.0);
    let some_backend = backend_id(&dirty, WEB[0], Tcp);
    // A slot beyond the count.
    dirty.svc.insert(
        skey(web.0, 4),
        SvcValue {
            backend_id: some_backend,
            svc_id: web_head.svc_id,
            ..SvcValue::default()
        },
    );
    // A frontend whose slot 0 is gone: its slots are orphans.
    let ghost = key("10.96.7.7", 7777, Tcp);
    dirty.svc.insert(
        skey(ghost, 1),
        SvcValue {
            backend_id: some_backend,
            svc_id: 500,
            ..SvcValue::default()
        },
    );
    dirty.svc.insert(
        skey(ghost, 2),
        SvcValue {
            backend_id: some_backend,
            svc_id: 500,
            ..SvcValue::default()
        },
    );
    // A name for a svc id no frontend uses.
    dirty.names.insert(999, "default/ghost:http".to_owned());
    // A backend nobody references.
    dirty
        .backends
        .insert(777, backend_value("10.244.9.9:9090", Tcp));

    let mut r = reconciler(dirty);
    let (rep, log) = sync_ok(&mut r, &d);
    assert_eq!(
        rep.writes, 0,
        "nothing to write, only stale entries to delete: {log:#?}"
    );
    let want: BTreeSet<String> = [
        svc_del(web.0, 4),
        svc_del(ghost, 1),
        svc_del(ghost, 2),
        "name- 999".to_owned(),
        "backend- 777".to_owned(),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        log.iter().cloned().collect::<BTreeSet<_>>(),
        want,
        "deletes: {log:#?}"
    );
    assert_eq!(
        log.len(),
        want.len(),
        "each stale entry deleted once: {log:#?}"
    );
    assert_eq!(r.maps().svc, clean.svc);
    assert_eq!(r.maps().backends, clean.backends);
    assert_eq!(r.maps().names, clean.names);
    assert_consistent(r.maps(), "after cleaning stale entries");
    assert_no_writes(&mut r, &d, "sync after cleanup");
}

// Regression (fixed): a slot left beyond the count (e.g. by an earlier run or a failed
// sync) is deleted after being rewritten when the frontend grows over it.
// Input: maps holding 10.96.0.10:80 with count 2 (.11, .12) plus a leftover
// slot 3; a new Reconciler adopts them and syncs 10.96.0.10:80 -> .11, .12,
// .13. program_frontend writes slot 3 (.13) and slot 0 (count 3), then step 4
// ("slots beyond the new count") deletes `stale_slots`, which still lists 3.
// Result: count 3 with slot 3 missing; the in-memory state believes it is
// programmed, so later syncs write nothing and never repair it. Expected:
// only stale slots > the new count are deleted.
#[test]
fn stale_slot_that_becomes_in_range_is_kept() {
    let web = fe("10.96.0.10", 80, Tcp, &WEB);
    let mut dirty = programmed(&desired(&[fe("10.96.0.10", 80, Tcp, &WEB[..2])]))
        .maps()
        .clone();
    let h = head(&dirty, web.0);
    let leftover = backend_id(&dirty, WEB[0], Tcp);
    dirty.svc.insert(
        skey(web.0, 3),
        SvcValue {
            backend_id: leftover,
            svc_id: h.svc_id,
            ..SvcValue::default()
        },
    );

    let mut r = reconciler(dirty);
    let d = desired([&web]);
    let (_, log) = sync_ok(&mut r, &d);
    assert_datapath_valid(
        r.maps(),
        &format!("growing over a leftover slot 3 (writes: {log:?})"),
    );
    assert_eq!(view(r.maps()), expected_view(&d));
    assert_consistent(r.maps(), "after growing over a leftover slot");
}

#[test]
fn missing_slot_within_count_is_rewritten() {
    let web = fe("10.96.0.10", 80, Tcp, &WEB);
    let d = desired([&web]);
    let clean = programmed(&d).maps().clone();
    let mut dirty = clean.clone();
    dirty.svc.remove(&skey(web.0, 2)).expect("slot 2 present");
    dirty.names.clear();

    let mut r = reconciler(dirty);
    let (_, log) = sync_ok(&mut r, &d);
    let svc_id = head(&clean, web.0).svc_id;
    assert_eq!(
        log,
        vec![format!("name+ {svc_id}"), svc_put(web.0, 2)],
        "only the hole and the name are written"
    );
    assert_eq!(r.maps().svc, clean.svc);
    assert_eq!(r.maps().names, clean.names);
    assert_no_writes(&mut r, &d, "sync after repair");
}

/// Before/after of a change that removes, adds and modifies frontends and
/// backends (about 20 map operations).
fn fault_scenario() -> (Desired, Desired) {
    let before = desired(&[
        fe("10.96.0.10", 80, Tcp, &WEB),
        fe("10.96.0.20", 53, Udp, &["10.244.1.1:53", "10.244.1.2:53"]),
        fe("10.96.0.30", 443, Tcp, &["10.244.2.1:8443"]),
    ]);
    let after = desired(&[
        fe(
            "10.96.0.10",
            80,
            Tcp,
            &[WEB[0], WEB[2], "10.244.0.14:8080", "10.244.0.15:8080"],
        ),
        fe(
            "10.96.0.30",
            443,
            Tcp,
            &["10.244.2.1:8443", "10.244.2.2:8443"],
        ),
        fe("10.96.0.40", 8080, Tcp, &[WEB[0], "10.244.3.1:8080"]),
    ]);
    (before, after)
}

/// The backend entries without their ids.
fn backend_entries(maps: &FakeMaps) -> BTreeSet<(u32, u16, u8, u8)> {
    maps.backends
        .values()
        .map(|b| (b.addr_be, b.port_be, b.proto, b.flags))
        .collect()
}

/// Number of map operations of the clean change, and its resulting maps
/// (the same entry by entry and in batches).
fn clean_change() -> (usize, FakeMaps) {
    let (before, after) = fault_scenario();
    let runs: Vec<(usize, FakeMaps)> = MODES
        .iter()
        .map(|&(batch_max, _)| {
            let mut r = programmed_with(&before, batch_max);
            let (rep, _) = sync_ok(&mut r, &after);
            assert_consistent(r.maps(), "clean reference");
            (rep.writes + rep.deletes, r.maps().clone())
        })
        .collect();
    let [(ops, single), (ops_b, batched)] = &runs[..] else { unreachable!() };
    assert_eq!(ops, ops_b, "map operations entry by entry and in batches");
    assert_eq!(
        (&single.svc, &single.backends, &single.names),
        (&batched.svc, &batched.backends, &batched.names),
        "the change leaves the same maps entry by entry and in batches"
    );
    assert!(batched.calls < single.calls, "batches take fewer calls: {} vs {}", batched.calls, single.calls);
    runs[1].clone()
}

/// One fault-injection run: the change with map operation `n` failing, then
/// a retry without fault, then a sync that must write nothing.
fn fault_then_retry(n: usize, batch_max: usize, before: &Desired, after: &Desired, reference: &FakeMaps) {
    let ctx = format!("fault at map operation {n}, batch_max {batch_max}");
    let mut r = programmed_with(before, batch_max);
    let old = r.maps().clone();
    r.maps_mut().fail_write_at = Some(n);
    let rep = r.sync(after);
    assert!(
        !rep.errors.is_empty() || !rep.other_errors.is_empty(),
        "{ctx}: the sync should report the failed write"
    );
    assert_eq!(
        r.maps().fail_write_at,
        None,
        "{ctx}: the fault did not fire"
    );

    let (_, log) = sync_ok(&mut r, after);
    let m = r.maps();
    assert!(!log.is_empty(), "{ctx}: the retry wrote nothing");
    assert_eq!(
        view(m),
        view(reference),
        "{ctx}: the retry does not decode like the clean run"
    );
    assert_consistent(m, &ctx);
    assert_eq!(
        (m.svc.len(), m.backends.len(), m.names.len()),
        (
            reference.svc.len(),
            reference.backends.len(),
            reference.names.len()
        ),
        "{ctx}: entry counts (svc, backends, names) differ from the clean run"
    );
    assert_eq!(
        backend_entries(m),
        backend_entries(reference),
        "{ctx}: backend entries (ignoring ids)"
    );
    // What survives the change keeps its ids.
    for b in [WEB[0], WEB[2], "10.244.2.1:8443"] {
        assert_eq!(
            backend_id(m, b, Tcp),
            backend_id(&old, b, Tcp),
            "{ctx}: {b} changed id"
        );
    }
    for k in [key("10.96.0.10", 80, Tcp), key("10.96.0.30", 443, Tcp)] {
        assert_eq!(
            head(m, k).svc_id,
            head(&old, k).svc_id,
            "{ctx}: {k} changed svc id"
        );
    }
    assert_no_writes(&mut r, after, &format!("{ctx}: third sync"));
}

// Regression (fixed): the retry after a failed slot 0 write of a frontend that grows does
// not converge; the maps stay broken for good. Fails for map operations 8 and
// 11 of 20 (the slot 0 writes of 10.96.0.10:80 and 10.96.0.30:443, both
// growing). Input: the fault_scenario change (10.96.0.10:80 goes from
// backends .11/.12/.13 to .11/.13/.14/.15) with map operation 8, the slot 0
// write of 10.96.0.10:80, failing. The maps then hold count 3 and a
// slot 4 beyond the count. The retry re-reads them, so slot 4 is in
// `stale_slots`; program_frontend writes slot 4 (new backend .15), writes
// slot 0 with count 4, then step 4 deletes every `stale_slots` entry,
// including slot 4, which is now within the count. Result: count 4 with slot
// 4 missing (shown as `<missing id 0>`), and since the in-memory state
// believes slot 4 is programmed, no later sync repairs it. Expected: step 4
// deletes only stale slots greater than the new count (or step 2 treats
// stale slots <= new count as present and differing). The same happens
// without any fault after a restart: see
// `stale_slot_that_becomes_in_range_is_kept`.
#[test]
fn failed_write_then_retry_converges_to_the_clean_result() {
    let (before, after) = fault_scenario();
    let (ops, reference) = clean_change();
    assert!(
        ops >= 10,
        "the scenario should make at least 10 map operations, makes {ops}"
    );
    assert_eq!(view(&reference), expected_view(&after));
    // Every operation of the change, not just the first 10, in both modes
    // (in batches, the fault stops a batch part-way).
    for (batch_max, mode) in MODES {
        let failed: Vec<usize> = (0..ops)
            .filter(|&n| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    fault_then_retry(n, batch_max, &before, &after, &reference);
                }))
                .is_err()
            })
            .collect();
        assert!(
            failed.is_empty(),
            "{mode}: with a fault at these map operations (of {ops}) the retry does not converge (messages above): {failed:?}"
        );
    }
}

// Regression (fixed): a sync in which one write fails can leave a slot, within the
// frontend's count, pointing at a backend id that the same sync then deletes.
// Input: the fault_scenario change (10.96.0.10:80 goes from backends
// .11/.12/.13 to .11/.13/.14/.15) with the write of slot 4 (or slot 0) of
// 10.96.0.10:80 failing. program_frontend has already written backends .14
// and .15 and pointed slot 2 at .14; on the error it returns without updating
// the programmed state, so .14 and .15 look unreferenced and
// remove_unreferenced_backends deletes them in the same sync. Slot 2 (count
// still 3) now names a missing backend until the next sync: packets hashed
// to it cannot be forwarded. Expected: after any sync, failed or not, every
// slot within a count points at an existing backend (the module's "every
// intermediate state valid" rule), e.g. by recording the slots actually
// written before the failure, or by not deleting backends in a sync that
// marked the state stale.
#[test]
fn failed_sync_never_leaves_a_slot_pointing_at_a_missing_backend() {
    let (before, after) = fault_scenario();
    let (ops, _) = clean_change();
    let mut failures = Vec::new();
    for (n, (batch_max, mode)) in (0..ops).flat_map(|n| MODES.map(|m| (n, m))) {
        let mut r = programmed_with(&before, batch_max);
        r.maps_mut().fail_write_at = Some(n);
        let before_log = r.maps().log.len();
        let rep = r.sync(&after);
        assert_report_matches_log(&rep, &log_since(&r, before_log));
        let problems = datapath_problems(r.maps());
        if !problems.is_empty() {
            failures.push(format!(
                "{mode}: fault at map operation {n}: {}\n{}",
                problems.join("; "),
                view(r.maps())
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "after a failed sync, a slot within count points at a deleted backend:\n{}",
        failures.join("\n")
    );
}

/// Checks that `report` holds exactly one error, a `MapFull` of `map` for `unfit`.
fn assert_one_map_full(report: &SyncReport, unfit: FrontendKey, map_name: &str, cap: u32) {
    assert!(report.other_errors.is_empty(), "{:?}", report.other_errors);
    assert_eq!(
        report.errors.len(),
        1,
        "exactly one frontend should fail: {:?}",
        report.errors
    );
    let (failed, err) = &report.errors[0];
    assert_eq!(*failed, unfit, "the failing frontend");
    match err {
        Error::MapFull {
            map,
            capacity,
            what,
        } => {
            assert_eq!(*map, map_name);
            assert_eq!(*capacity, cap);
            assert!(
                what.contains(&unfit.to_string()),
                "MapFull should name {unfit}: {what:?}"
            );
        }
        other => panic!("expected Error::MapFull, got {other:?}"),
    }
}

/// Checks that nothing of `unfit` is in the maps: no svc entry, no name,
/// no backend entry for any of its addresses.
fn assert_not_programmed(maps: &FakeMaps, unfit: &Fe) {
    let (fk, f) = unfit;
    assert!(
        !has_any_entry(maps, *fk),
        "{fk}: no slot 0 or slot of it may be written: {:#?}",
        maps.svc
    );
    for addr in &f.backends {
        let a_be = v4(addr.addr).to_be();
        assert!(
            !maps.backends.values().any(|v| v.addr_be == a_be),
            "backend {addr} of the unfit frontend was written"
        );
    }
    assert!(
        !maps.names.values().any(|n| *n == f.display_name()),
        "name of the unfit frontend written: {:?}",
        maps.names
    );
}

#[test]
fn frontend_that_does_not_fit_the_svc_map_is_not_programmed_at_all() {
    let small = fe("10.96.0.1", 80, Tcp, &["10.244.0.1:80", "10.244.0.2:80"]); // 3 entries
    let big = fe(
        "10.96.0.2",
        80,
        Tcp,
        &["10.244.1.1:80", "10.244.1.2:80", "10.244.1.3:80"],
    ); // 4 entries
    let empty = fe("10.96.0.3", 80, Tcp, &[]); // 1 entry
    let want = desired([&small, &big, &empty]);
    let mut rec = reconciler(FakeMaps::default()).with_capacity(4, 100);
    let report = rec.sync(&want);

    assert_one_map_full(&report, big.0, SVC_MAP, 4);
    assert_not_programmed(rec.maps(), &big);
    assert_eq!(
        rec.maps().svc.len(),
        4,
        "the frontends that fit fill the map exactly"
    );
    assert_eq!(
        view(rec.maps()),
        expected_view(&desired([&small, &empty])),
        "frontends that fit are programmed"
    );
    assert_eq!(rec.programmed_frontends(), 2);
    assert_consistent(rec.maps(), "after a svc MapFull");

    // Retrying while still full: same error, nothing written.
    let before = rec.maps().log.len();
    let report = rec.sync(&want);
    assert_one_map_full(&report, big.0, SVC_MAP, 4);
    assert_eq!(
        rec.maps().log.len(),
        before,
        "retry while full wrote: {:#?}",
        &rec.maps().log[before..]
    );

    // With room (e.g. after a restart with a bigger map), it is programmed.
    let mut bigger = reconciler(rec.maps().clone()).with_capacity(8, 100);
    sync_ok(&mut bigger, &want);
    assert_eq!(view(bigger.maps()), expected_view(&want));
    assert_consistent(bigger.maps(), "after growing the map");
}

/// Slot 0 of `k` and the number of entries of `k` in the service map.
fn head_and_entries(maps: &FakeMaps, k: FrontendKey) -> (SvcValue, usize) {
    let entries = maps.svc.keys().filter(|sk| super::frontend_of(**sk) == Some(k)).count();
    let head = *maps.svc.get(&super::svc_key(k, 0)).unwrap_or_else(|| panic!("{k}: no slot 0 in {:#?}", maps.svc));
    (head, entries)
}

#[test]
fn frontend_that_does_not_fit_is_programmed_closed_from_the_reserve() {
    let small = fe("10.96.0.1", 80, Tcp, &["10.244.0.1:80", "10.244.0.2:80"]); // 3 entries
    let mut big = fe("10.96.0.2", 80, Tcp, &["10.244.1.1:80", "10.244.1.2:80", "10.244.1.3:80"]); // 4 entries
    big.1.drop_when_empty = true;
    big.1.policy_local = true;
    let want = desired([&small, &big]);
    // 6 entries, 2 of them only for closed frontends: `big` does not fit the 4 open ones.
    let mut rec = reconciler(FakeMaps::default()).with_capacity(6, 100).with_closed_reserve(2);
    let report = rec.sync(&want);
    assert_one_map_full(&report, big.0, SVC_MAP, 4);
    assert_eq!(report.closed, BTreeSet::from([big.0]), "closed, not left untranslated");
    let (head, entries) = head_and_entries(rec.maps(), big.0);
    assert_eq!((head.count, entries), (0, 1), "slot 0 alone, no backends: {head:?}");
    assert_eq!(
        head.flags & (super::SVC_FLAG_DROP_WHEN_EMPTY | super::SVC_FLAG_POLICY_LOCAL),
        0,
        "closed means rejected (ICMP port unreachable), not dropped"
    );
    assert_eq!(rec.maps().backends.len(), 2, "no backend of the closed frontend is written");
    assert!(rec.maps().names.values().any(|n| *n == big.1.display_name()), "its name is there for `services`");
    assert_consistent(rec.maps(), "after closing");

    // Retrying while still full: the same report, nothing written.
    let before = rec.maps().log.len();
    let report = rec.sync(&want);
    assert_one_map_full(&report, big.0, SVC_MAP, 4);
    assert_eq!(report.closed, BTreeSet::from([big.0]));
    assert_eq!(rec.maps().log.len(), before, "{:#?}", &rec.maps().log[before..]);

    // Room made (the other frontend goes): it is programmed whole.
    let want2 = desired([&big]);
    let (report, _) = sync_ok(&mut rec, &want2);
    assert!(report.closed.is_empty());
    assert_eq!(view(rec.maps()), expected_view(&want2));
}

#[test]
fn a_programmed_frontend_that_grows_past_a_full_map_is_closed_not_left_stale() {
    let a = fe("10.96.0.1", 80, Tcp, &["10.244.0.1:80"]); // 2 entries
    let b = fe("10.96.0.2", 80, Tcp, &["10.244.1.1:80"]); // 2 entries
    let mut rec = reconciler(FakeMaps::default()).with_capacity(6, 100).with_closed_reserve(2);
    sync_ok(&mut rec, &desired([&a, &b]));
    // `b` grows to 3 backends: 4 + 2 > 4 open entries.
    let b3 = fe("10.96.0.2", 80, Tcp, &["10.244.1.1:80", "10.244.1.2:80", "10.244.1.3:80"]);
    let report = rec.sync(&desired([&a, &b3]));
    assert_one_map_full(&report, b3.0, SVC_MAP, 4);
    assert_eq!(report.closed, BTreeSet::from([b3.0]));
    assert_eq!(head_and_entries(rec.maps(), b3.0).1, 1, "its old slots are gone");
    assert_eq!(rec.maps().backends.len(), 1, "the old backend of `b` is unreferenced and deleted");
    assert_consistent(rec.maps(), "after closing a grown frontend");
}

#[test]
fn frontend_whose_backends_do_not_fit_is_programmed_closed() {
    let first = fe("10.96.0.1", 80, Tcp, &["10.244.0.1:80", "10.244.0.2:80"]);
    let unfit = fe("10.96.0.2", 80, Tcp, &["10.244.1.1:80", "10.244.1.2:80"]);
    // Shares one backend with `first`: needs one new entry, fills the map exactly.
    let sharing = fe("10.96.0.3", 80, Tcp, &["10.244.0.1:80", "10.244.2.1:80"]);
    let want = desired([&first, &unfit, &sharing]);
    let mut rec = reconciler(FakeMaps::default()).with_capacity(100, 3);
    let report = rec.sync(&want);

    assert_one_map_full(&report, unfit.0, BACKEND_MAP, 3);
    // Closed (slot 0 alone: the service map has room), none of its backends written.
    assert_eq!(report.closed, BTreeSet::from([unfit.0]));
    let (head, entries) = head_and_entries(rec.maps(), unfit.0);
    assert_eq!((head.count, entries), (0, 1));
    assert_eq!(rec.maps().backends.len(), 3);
    let closed_unfit = (unfit.0, Frontend { backends: Vec::new(), ..unfit.1.clone() });
    assert_eq!(
        view(rec.maps()),
        expected_view(&desired([&first, &closed_unfit, &sharing]))
    );
    assert_consistent(rec.maps(), "after a backend MapFull");
}

#[test]
fn shared_backend_gets_one_id_and_lives_until_its_last_user_is_gone() {
    const SHARED: &str = "10.244.0.50:8080";
    let f1 = fe("10.96.0.10", 80, Tcp, &[SHARED]);
    let f2 = fe("10.96.0.20", 80, Tcp, &[SHARED, "10.244.0.51:8080"]);
    // Same address over UDP is another backend (the entry carries the protocol).
    let f3 = fe("10.96.0.30", 80, Udp, &[SHARED]);
    let mut r = programmed(&desired([&f1, &f2, &f3]));
    let m = r.maps();
    assert_eq!(m.backends.len(), 3, "{:?}", m.backends);
    let id = backend_id(m, SHARED, Tcp);
    assert_eq!(slot_ids(m, f1.0), vec![id]);
    assert!(
        slot_ids(m, f2.0).contains(&id),
        "f2 should use the shared id {id}"
    );
    assert_ne!(
        backend_id(m, SHARED, Udp),
        id,
        "UDP backend must not share the TCP entry"
    );

    // Remove f1: the shared backend stays, nothing of f2 is touched.
    let f2_slots = slot_ids(r.maps(), f2.0);
    let (_, log) = sync_ok(&mut r, &desired([&f2, &f3]));
    assert!(
        positions(&log, "backend-").is_empty(),
        "no backend should be deleted: {log:#?}"
    );
    assert!(
        positions(&log, "svc+").is_empty(),
        "nothing should be written: {log:#?}"
    );
    assert_eq!(backend_id(r.maps(), SHARED, Tcp), id);
    assert_eq!(slot_ids(r.maps(), f2.0), f2_slots);
    assert_consistent(r.maps(), "after removing one user");

    // Remove f2 too: the TCP backends go, the UDP one stays.
    let (_, log) = sync_ok(&mut r, &desired([&f3]));
    assert!(
        log.contains(&format!("backend- {id}")),
        "shared backend not deleted: {log:#?}"
    );
    assert_eq!(r.maps().backends.len(), 1);
    assert_consistent(r.maps(), "after removing both users");

    // Nothing left.
    let (_, _) = sync_ok(&mut r, &Desired::default());
    let m = r.maps();
    assert!(
        m.svc.is_empty() && m.backends.is_empty() && m.names.is_empty(),
        "maps not empty: {m:#?}"
    );
}

#[test]
fn session_affinity_goes_into_slot_zero_and_a_change_rewrites_only_it() {
    let (k, mut f) = fe("10.96.0.10", 80, Protocol::Tcp, &["10.244.0.11:8080", "10.244.0.12:8080"]);
    f.affinity_timeout_s = 10_800;
    f.affinity_group = 0xabcd;
    let mut r = programmed(&desired([&(k, f.clone())]));
    let head = r.maps().svc[&super::svc_key(k, 0)];
    assert_eq!((head.backend_id, head.affinity_timeout_s, head.count), (0xabcd, 10_800, 2));
    assert_no_writes(&mut r, &desired([&(k, f.clone())]), "unchanged affinity");
    f.affinity_timeout_s = 60;
    let (_, log) = sync_ok(&mut r, &desired([&(k, f.clone())]));
    assert_eq!(log.len(), 1, "a new timeout rewrites slot 0 only: {log:#?}");
    assert_eq!(r.maps().svc[&super::svc_key(k, 0)].affinity_timeout_s, 60);
    // Adopted after a restart: the same fields read back, nothing rewritten.
    let mut again = reconciler(r.maps().clone());
    assert_no_writes(&mut again, &desired([&(k, f)]), "after a restart");
}

#[test]
fn udp_backends_leaving_a_frontend_are_reported_for_socket_destruction() {
    let (k, f) = fe("10.96.0.10", 53, Protocol::Udp, &["10.244.0.11:5353", "10.244.0.12:5353"]);
    let (kt, ft) = fe("10.96.0.10", 80, Protocol::Tcp, &["10.244.0.11:8080", "10.244.0.12:8080"]);
    let mut r = programmed(&desired([&(k, f), &(kt, ft)]));
    let (_, f1) = fe("10.96.0.10", 53, Protocol::Udp, &["10.244.0.12:5353"]);
    let (_, ft1) = fe("10.96.0.10", 80, Protocol::Tcp, &["10.244.0.12:8080"]);
    let (rep, _) = sync_ok(&mut r, &desired([&(k, f1), &(kt, ft1)]));
    let want: std::collections::BTreeSet<(std::net::IpAddr, u16)> = [("10.244.0.11".parse().unwrap(), 5353)].into();
    assert_eq!(rep.removed_udp_backends, want, "only the UDP backend that left, not the TCP one");
    let (rep, _) = sync_ok(&mut r, &desired([&(kt, fe("10.96.0.10", 80, Protocol::Tcp, &["10.244.0.12:8080"]).1)]));
    let want: std::collections::BTreeSet<(std::net::IpAddr, u16)> = [("10.244.0.12".parse().unwrap(), 5353)].into();
    assert_eq!(rep.removed_udp_backends, want, "a removed UDP frontend reports its backends");
}

#[test]
fn ipv6_udp_backends_leaving_a_frontend_are_reported_for_socket_destruction() {
    let (k, f) = fe("fd00:96::10", 53, Protocol::Udp, &["[fd00:244::11]:5353", "[fd00:244::12]:5353"]);
    let mut r = reconciler(FakeMaps::default());
    sync_ok(&mut r, &desired([&(k, f)]));
    let (_, f1) = fe("fd00:96::10", 53, Protocol::Udp, &["[fd00:244::12]:5353"]);
    let (rep, _) = sync_ok(&mut r, &desired([&(k, f1)]));
    let want: std::collections::BTreeSet<(std::net::IpAddr, u16)> = [("fd00:244::11".parse().unwrap(), 5353)].into();
    assert_eq!(rep.removed_udp_backends, want);
}

/// Partial syncs (`sync_keys` with the keys that changed) after random
/// changes leave the maps exactly as the desired state says — a full sync
/// afterwards writes nothing — and delete backends nobody uses any more.
#[test]
fn partial_syncs_of_the_changed_keys_converge_like_full_ones() {
    for (batch_max, mode) in MODES {
        partial_syncs_converge(batch_max, mode);
    }
}

fn partial_syncs_converge(batch_max: usize, mode: &str) {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut want = Desired::default();
    let mut rec = reconciler(FakeMaps::default()).with_batch_max(batch_max);
    for step in 0..400 {
        let mut keys = BTreeSet::new();
        for _ in 0..=next(3) {
            let vip = format!("10.96.0.{}", next(30) + 1);
            let k = key(&vip, 80, Tcp);
            keys.insert(k);
            if next(4) == 0 {
                want.frontends.remove(&k);
            } else {
                let bs: Vec<String> = (0..next(5)).map(|_| format!("10.244.0.{}:8080", next(12) + 1)).collect();
                let refs: Vec<&str> = bs.iter().map(String::as_str).collect();
                let (k2, f) = fe(&vip, 80, Tcp, &refs);
                want.frontends.insert(k2, f);
            }
        }
        let before = rec.maps().log.len();
        let rep = rec.sync_keys(&want, &keys);
        assert!(rep.errors.is_empty() && rep.other_errors.is_empty(), "{mode} step {step}: {:?}", rep.errors);
        assert_report_matches_log(&rep, &log_since(&rec, before));
        assert_eq!(view(rec.maps()), expected_view(&want), "{mode} step {step}");
        let used: BTreeSet<u32> = rec.maps().svc.iter().filter(|(k, _)| k.backend_slot != 0).map(|(_, v)| v.backend_id).collect();
        let present: BTreeSet<u32> = rec.maps().backends.keys().copied().collect();
        assert_eq!(present, used, "{mode} step {step}: exactly the referenced backends exist");
    }
    assert_no_writes(&mut rec, &want, "a full sync after partial ones");
    assert_consistent(rec.maps(), "after partial syncs");
}

/// A frontend that did not fit is retried by later partial syncs even when
/// they are about other keys: room made elsewhere is used.
#[test]
fn partial_syncs_retry_frontends_that_did_not_fit() {
    let a = fe("10.96.0.1", 80, Tcp, &["10.244.0.1:80", "10.244.0.2:80"]); // 3 entries
    let b = fe("10.96.0.2", 80, Tcp, &["10.244.1.1:80", "10.244.1.2:80"]); // 3 entries
    let mut rec = reconciler(FakeMaps::default()).with_capacity(6, 100).with_closed_reserve(2);
    let rep = rec.sync(&desired([&a, &b]));
    assert_eq!(rep.closed, BTreeSet::from([b.0]));
    // `a` goes: a partial sync about `a` alone also programs `b` whole.
    let rep = rec.sync_keys(&desired([&b]), &BTreeSet::from([a.0]));
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    assert_eq!(view(rec.maps()), expected_view(&desired([&b])));
}

/// IPv6 frontends go to the IPv6 maps (same slots, values and id spaces as
/// IPv4): programmed, adopted after a restart, changed and removed.
#[test]
fn ipv6_frontends_are_programmed_in_the_ipv6_maps() {
    let v4 = fe("10.96.0.10", 80, Tcp, &["10.244.0.1:8080"]);
    let v6 = fe("fd00::10", 80, Tcp, &["[fd00:244::1]:8080", "[fd00:244::2]:8080"]);
    let mut rec = reconciler(FakeMaps::default());
    sync_ok(&mut rec, &desired([&v4, &v6]));
    let m = rec.maps();
    assert_eq!((m.svc.len(), m.backends.len()), (2, 1), "IPv4: slot 0 and one backend");
    assert_eq!((m.svc6.len(), m.backends6.len()), (3, 2), "IPv6: slot 0 and two backends");
    let ids: BTreeSet<u32> = m.backends.keys().chain(m.backends6.keys()).copied().collect();
    assert_eq!(ids.len(), 3, "one id space for both families");
    let head6 = m.svc6.iter().find(|(k, _)| k.backend_slot == 0).map(|(_, v)| *v).expect("slot 0");
    assert_eq!(head6.count, 2);
    let view = crate::inspect::services_view(&m.dump().expect("dump"));
    assert_eq!(view.iter().map(|f| (f.family.as_str(), f.address.as_str(), f.backends.len())).collect::<Vec<_>>(), [("IPv4", "10.96.0.10", 1), ("IPv6", "fd00::10", 2)]);

    // A restart adopts both families: nothing to write.
    let mut again = reconciler(rec.maps().clone());
    assert_no_writes(&mut again, &desired([&v4, &v6]), "after a restart");
    // One IPv6 endpoint goes, then the frontend.
    let v6b = fe("fd00::10", 80, Tcp, &["[fd00:244::2]:8080"]);
    sync_ok(&mut again, &desired([&v4, &v6b]));
    assert_eq!((again.maps().svc6.len(), again.maps().backends6.len()), (2, 1));
    sync_ok(&mut again, &desired([&v4]));
    assert!(again.maps().svc6.is_empty() && again.maps().backends6.is_empty(), "{:?}", again.maps().svc6);
    assert_eq!(again.maps().svc.len(), 2, "IPv4 untouched");

    // Each family's map has its own capacity: 4 entries fit 2 frontends of
    // each family, not 4 of one.
    let mut small = reconciler(FakeMaps::default()).with_capacity(4, 100);
    let a6 = fe("fd00::20", 80, Tcp, &["[fd00:244::3]:8080"]);
    let v4b = fe("10.96.0.20", 80, Tcp, &["10.244.0.3:8080"]);
    sync_ok(&mut small, &desired([&v4, &v4b, &v6b, &a6]));
    let occ = small.occupancy();
    assert_eq!((occ[SVC_MAP].0, occ[proxy_common::svc::SVC6_MAP].0), (4, 4), "{occ:?}");
    let a6b = fe("fd00::21", 80, Tcp, &[]);
    let rep = small.sync(&desired([&v4, &v4b, &v6b, &a6, &a6b]));
    assert_one_map_full(&rep, a6b.0, proxy_common::svc::SVC6_MAP, 4);
}

// ---------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------

/// `n` TCP and UDP frontends of two backends of their own and one shared
/// per protocol.
fn many(n: usize, port: u16) -> Vec<Fe> {
    (0..n)
        .map(|i| {
            let (a, b) = (format!("10.244.{}.{}:8080", i / 200, i % 200 + 1), format!("10.245.{}.{}:8080", i / 200, i % 200 + 1));
            let proto = if i % 2 == 0 { Tcp } else { Udp };
            fe(&format!("10.96.{}.{}", i / 200, i % 200 + 1), port, proto, &[&a, &b, "10.246.0.1:8080"])
        })
        .collect()
}

#[test]
fn a_sync_writes_each_map_once_per_stage_and_the_same_entries_as_entry_by_entry() {
    let first = desired(&many(40, 80));
    // Half the frontends go, a quarter change backends, new ones come.
    let mut second = desired(&many(40, 80)[20..]);
    for (k, f) in many(10, 80) {
        second.frontends.insert(k, Frontend { backends: vec![baddr("10.247.0.1:8080")], ..f });
    }
    second.frontends.extend(many(5, 81));
    let mut batched = reconciler(FakeMaps::default());
    let mut single = reconciler(FakeMaps::default()).with_batch_max(1);
    for (step, d) in [("first", &first), ("second", &second), ("empty", &Desired::default())] {
        let calls = (batched.maps().calls, single.maps().calls);
        let (_, log) = sync_ok(&mut batched, d);
        let (_, single_log) = sync_ok(&mut single, d);
        let (b, s) = (batched.maps(), single.maps());
        assert_eq!((&b.svc, &b.backends, &b.names), (&s.svc, &s.backends, &s.names), "{step}: the same maps, ids included");
        assert_eq!(view(b), expected_view(d), "{step}");
        assert_consistent(b, step);
        assert_eq!(s.calls - calls.1, single_log.len(), "{step}: entry by entry, one call per entry");
        assert_eq!(log.len(), single_log.len(), "{step}: the same writes");
        if step == "first" {
            // New backends; names and slots; slots 0: one call per map and stage.
            assert_eq!(b.calls - calls.0, 4, "{step}: {log:#?}");
            assert_eq!(b.largest_batch, 40 * 3, "{step}: the slots in one batch");
        }
    }
}

#[test]
fn a_batch_that_stops_part_way_fails_only_the_frontends_of_the_failed_entry() {
    const SHARED: &str = "10.244.0.9:80";
    let first = fe("10.96.0.1", 80, Tcp, &["10.244.0.1:80", "10.244.0.2:80"]);
    let second = fe("10.96.0.2", 80, Tcp, &["10.244.0.3:80", SHARED]);
    let third = fe("10.96.0.3", 80, Tcp, &["10.244.0.4:80", SHARED]);
    let d = desired([&first, &second, &third]);
    for (batch_max, mode) in MODES {
        let mut r = reconciler(FakeMaps::default()).with_batch_max(batch_max);
        // The new backends, in order: first's two, second's two (the
        // shared one last), third's own. Entry 3, the shared one, fails.
        r.maps_mut().fail_write_at = Some(3);
        let rep = r.sync(&d);
        assert_report_matches_log(&rep, &r.maps().log);
        let failed: BTreeSet<FrontendKey> = rep.errors.iter().map(|(k, _)| *k).collect();
        assert_eq!(failed, BTreeSet::from([second.0, third.0]), "{mode}: second wrote the shared backend, third needs it: {:?}", rep.errors);
        assert!(rep.errors.iter().all(|(_, e)| matches!(e, Error::Injected(_))), "{mode}: {:?}", rep.errors);
        assert!(rep.other_errors.is_empty(), "{mode}: {:?}", rep.other_errors);
        let m = r.maps();
        assert_eq!(view(m), expected_view(&desired([&first])), "{mode}: first is programmed, second and third not at all");
        assert!(!has_any_entry(m, second.0) && !has_any_entry(m, third.0), "{mode}: {:#?}", m.svc);
        assert_datapath_valid(m, mode);
        // The batch went on after the failed entry: third's own backend is written.
        backend_id(m, "10.244.0.4:80", Tcp);
        if batch_max > 1 {
            assert_eq!(m.calls, 1 + 1 + 3, "{mode}: the backend batch, its rest after the failure, then names, slots, slot 0s: {:#?}", m.log);
        }
        // The next sync re-reads the maps and completes the rest.
        let (_, log) = sync_ok(&mut r, &d);
        assert!(!log.is_empty(), "{mode}");
        assert_eq!(view(r.maps()), expected_view(&d), "{mode}");
        assert_consistent(r.maps(), mode);
        assert_no_writes(&mut r, &d, mode);
    }
}

#[test]
fn a_closed_frontend_whose_writes_fail_is_not_reported_closed() {
    let small = fe("10.96.0.1", 80, Tcp, &["10.244.0.1:80", "10.244.0.2:80"]); // 3 entries
    let big = fe("10.96.0.2", 80, Tcp, &["10.244.1.1:80", "10.244.1.2:80", "10.244.1.3:80"]); // 4 entries
    let want = desired([&small, &big]);
    for (batch_max, mode) in MODES {
        let mut rec = reconciler(FakeMaps::default()).with_capacity(6, 100).with_closed_reserve(2).with_batch_max(batch_max);
        // `small`: 2 backends, its name, 2 slots, slot 0; then `big`
        // closed: its name (6), its slot 0 (7), which fails.
        rec.maps_mut().fail_write_at = Some(7);
        let rep = rec.sync(&want);
        assert_one_map_full(&SyncReport { other_errors: Vec::new(), ..rep }, big.0, SVC_MAP, 4);
        let rep = rec.sync(&want);
        assert!(rep.closed.contains(&big.0), "{mode}: closed by the retry");
        assert_eq!(head_and_entries(rec.maps(), big.0).1, 1, "{mode}");
        let mut rec = reconciler(FakeMaps::default()).with_capacity(6, 100).with_closed_reserve(2).with_batch_max(batch_max);
        rec.maps_mut().fail_write_at = Some(7);
        let rep = rec.sync(&want);
        assert!(rep.closed.is_empty(), "{mode}: its slot 0 was not written: {:?}", rep.closed);
        assert_eq!(rep.other_errors.len(), 1, "{mode}: {:?}", rep.other_errors);
        assert!(!has_any_entry(rec.maps(), big.0), "{mode}");
        assert_datapath_valid(rec.maps(), mode);
    }
}

/// The slots a shrinking frontend gives up are deleted in the last stage:
/// staging stops (and writes) before the map would need more room than
/// programming the frontends one by one.
#[test]
fn staged_writes_never_need_more_room_than_the_map_has() {
    let five = ["10.244.0.1:80", "10.244.0.2:80", "10.244.0.3:80", "10.244.0.4:80", "10.244.0.5:80"];
    let five_b = ["10.244.1.1:80", "10.244.1.2:80", "10.244.1.3:80", "10.244.1.4:80", "10.244.1.5:80"];
    let before = desired(&[fe("10.96.0.1", 80, Tcp, &five), fe("10.96.0.2", 80, Tcp, &five_b[..1])]); // 6 + 2 entries
    // The first shrinks by 4 slots, the second grows by 4: 8 entries again,
    // but 12 if the second's slots came before the first's deletes.
    let after = desired(&[fe("10.96.0.1", 80, Tcp, &five[..1]), fe("10.96.0.2", 80, Tcp, &five_b)]);
    for (batch_max, mode) in MODES {
        let maps = FakeMaps { svc_capacity: Some(10), ..FakeMaps::default() };
        let mut rec = reconciler(maps).with_capacity(10, 100).with_batch_max(batch_max);
        sync_ok(&mut rec, &before);
        sync_ok(&mut rec, &after);
        assert_eq!(view(rec.maps()), expected_view(&after), "{mode}");
        assert_consistent(rec.maps(), mode);
    }
}

/// A sync of more than [`super::FLUSH_ENTRIES`] entries is written in
/// chunks, each frontend within one.
#[test]
fn a_large_sync_is_written_in_chunks() {
    let fes: Vec<Fe> = (0..17_000u32)
        .map(|i| {
            let vip = std::net::Ipv4Addr::from(0x0a60_0000 + i).to_string();
            let b = format!("{}:8080", std::net::Ipv4Addr::from(0x0af4_0000 + i));
            fe(&vip, 80, Tcp, &[&b])
        })
        .collect();
    // 4 entries each (backend, name, slot, slot 0): 68,000.
    let d = desired(&fes);
    let r = programmed(&d);
    let m = r.maps();
    assert!(m.largest_batch <= super::FLUSH_ENTRIES, "{}", m.largest_batch);
    assert_eq!(m.calls, 2 * 4, "two chunks of 4 batches");
    assert_eq!(m.svc.len(), 2 * 17_000);
    assert_eq!(view(m), expected_view(&d));
}

// ---------------------------------------------------------------------------
// The backend records
// ---------------------------------------------------------------------------

#[test]
fn backend_keys_decode_to_what_they_were_made_of() {
    use super::{BackendEntry, BackendIdKey};
    for (addr, port, local, proto) in [
        ("10.1.2.3", 8080, false, Tcp),
        ("10.1.2.3", 65535, true, Udp),
        ("fd00::1:2", 443, true, Tcp),
        ("::", 0, false, Udp),
    ] {
        let b = BackendAddr { addr: addr.parse().expect("ip"), port, local };
        let k = BackendIdKey::new(b, proto);
        assert_eq!(k.decode(), Some((b, proto)), "{addr}");
        assert_eq!(k.is_v6(), b.addr.is_ipv6());
        assert_eq!(BackendIdKey::of_entry(BackendEntry::new(b, proto)), k, "as read back from the map");
    }
    // A protocol the model does not know: kept, but no model key.
    let k = BackendIdKey::raw("10.0.0.1".parse().expect("ip"), 80, 1, false);
    assert_eq!(k.decode(), None);
}

#[test]
fn backend_records_are_found_by_key_and_reused_when_freed() {
    use super::{BackendIdKey, Backends, NO_BACKEND};
    let key = |a: &str, port: u16| BackendIdKey::new(BackendAddr { addr: a.parse().expect("ip"), port, local: false }, Tcp);
    let mut b = Backends::default();
    let (k4, k6, k4b) = (key("10.0.0.1", 80), key("fd00::1", 80), key("10.0.0.2", 80));
    let (i4, i6) = (b.add(k4, 7, true), b.add(k6, 8, true));
    assert_ne!(i4, i6);
    assert_eq!((b.find(&k4), b.find(&k6), b.find(&k4b)), (Some(i4), Some(i6), None));
    assert_eq!((b.id(i4), b.id(i6)), (7, 8));
    assert_eq!(b.get(i6).map(|r| (r.key, r.id, r.refs)), Some((k6, 8, 0)));
    assert!(b.get(NO_BACKEND).is_none());
    // A second id for the same key is not found by it; freeing it leaves
    // the first one found.
    let dup = b.add(k4, 9, false);
    assert_eq!(b.find(&k4), Some(i4));
    assert_eq!(b.remove(dup).id, 9);
    assert_eq!(b.find(&k4), Some(i4));
    assert!(b.get(dup).is_none());
    // Freed, the key is gone and the index is reused.
    *b.refs_mut(i4) += 1;
    assert_eq!(b.get(i4).map(|r| r.refs), Some(1));
    *b.refs_mut(i4) -= 1;
    assert_eq!(b.remove(i4).key, k4);
    assert_eq!(b.find(&k4), None);
    let again = b.add(k4b, 10, true);
    assert!(again == i4 || again == dup, "a freed IPv4 record is reused");
    assert_eq!((b.find(&k4b), b.id(again)), (Some(again), 10));
    assert_eq!(b.find(&k6), Some(i6));
}
