//! The desired state kept between syncs and recomputed per changed Service,
//! as kube-proxy's change trackers do: an event names the Services it
//! touches ([`crate::store::Change`]), and a sync recomputes those alone —
//! their frontends, who owns each contested address, their health-check
//! inputs, their rejections — and tells the reconciler which frontend keys
//! to look at. A full rebuild ([`Tracker::rebuild`]) gives exactly what
//! [`super::desired_state`] gives; the periodic full sync uses it to repair
//! drift.
//!
//! Memory: each frontend is kept once. The one that owns its key is in
//! [`Tracker::desired`]; a Service keeps (parks) only the frontends it does
//! not own (a lost claim, waiting to win when the owner goes). A key's
//! claims hold the first inline. The rejections are counted as they come
//! and go, so reading them costs their number, not the Services'.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use super::{Cause, Desired, Frontend, FrontendKey, FrontendKind, NodeInfo, Rejection, reject, service_frontends, service_health};
use crate::store::{ObjectKey, Store};

/// A Service's claim on a frontend key. Precedence is the field order:
/// `ClusterIPs` first, then dated before undated, then the oldest
/// (creationTimestamp), then `namespace/name`; `index` is the frontend's
/// place in its Service's list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    external: bool,
    undated: bool,
    created: Option<jiff::Timestamp>,
    service: ObjectKey,
    index: u32,
}

/// The claims on one key: the winner, and the others when it is contested.
#[derive(Clone, Debug)]
struct KeyState {
    first: Claim,
    contest: Option<Box<Contest>>,
}

/// The losing claims on a key (sorted) and their rejections.
#[derive(Clone, Debug, Default)]
struct Contest {
    others: Vec<Claim>,
    lost: Vec<Rejection>,
}

impl KeyState {
    fn others(&self) -> &[Claim] {
        self.contest.as_ref().map_or(&[], |c| &c.others)
    }

    fn lost(&self) -> &[Rejection] {
        self.contest.as_ref().map_or(&[], |c| &c.lost)
    }
}

/// One frontend of a Service: its key and kind, and the frontend itself
/// while the Service does not own the key (else it is in `desired`).
#[derive(Clone, Debug)]
struct Slot {
    key: FrontendKey,
    kind: FrontendKind,
    parked: Option<Box<Frontend>>,
}

/// One Service's share of the desired state.
#[derive(Clone, Debug, Default)]
struct ServiceState {
    origin: Arc<str>,
    /// What its claims were made with.
    created: Option<jiff::Timestamp>,
    frontends: Vec<Slot>,
    rejections: Vec<Rejection>,
    /// `healthCheckNodePort` (when it needs one) and its ready endpoint
    /// addresses on this node.
    health: (Option<u16>, usize),
    /// Local internal / external traffic policy without a local endpoint.
    no_local: (bool, bool),
}

#[derive(Clone, Debug, Default)]
pub struct Tracker {
    services: BTreeMap<ObjectKey, ServiceState>,
    keys: BTreeMap<FrontendKey, KeyState>,
    desired: Desired,
    /// Every current rejection (each Service's own and lost claims), with
    /// how many times it is made.
    rejections: BTreeMap<Rejection, usize>,
    /// Services with a health check port: port and local endpoint count.
    health: BTreeMap<ObjectKey, (u16, usize)>,
    /// Services with `no_local` set (internal, external).
    no_local: (u64, u64),
}

/// Counts `r` in (`add`) or out.
fn count(set: &mut BTreeMap<Rejection, usize>, r: &Rejection, add: bool) {
    if add {
        if let Some(n) = set.get_mut(r) {
            *n += 1;
        } else {
            set.insert(r.clone(), 1);
        }
    } else if let Some(n) = set.get_mut(r) {
        *n -= 1;
        if *n == 0 {
            set.remove(r);
        }
    }
}

impl Tracker {
    /// The desired frontends.
    #[must_use]
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Every current rejection (each Service's own and lost claims), sorted
    /// and without duplicates, as [`super::desired_state`] returns them.
    /// Kept up to date by [`Tracker::update`]: costs the rejections, not the
    /// Services.
    #[must_use]
    pub fn rejections(&self) -> Vec<Rejection> {
        self.rejections.keys().cloned().collect()
    }

    /// [`Tracker::rejections`] without copying them.
    pub fn rejection_set(&self) -> impl Iterator<Item = &Rejection> {
        self.rejections.keys()
    }

    /// kube-proxy's health-check inputs, as [`super::health_checks`]: the
    /// port of every Service that needs one, and its local endpoint count.
    #[must_use]
    pub fn health_checks(&self) -> (BTreeMap<ObjectKey, u16>, BTreeMap<ObjectKey, usize>) {
        let ports = self.health.iter().map(|(k, (p, _))| (k.clone(), *p)).collect();
        let local = self.health.iter().map(|(k, (_, n))| (k.clone(), *n)).collect();
        (ports, local)
    }

    /// Services whose Local traffic policy finds no local endpoint:
    /// (internalTrafficPolicy, externalTrafficPolicy), as kube-proxy's
    /// `sync_proxy_rules_no_local_endpoints_total` counts them.
    #[must_use]
    pub fn no_local_endpoints(&self) -> (u64, u64) {
        self.no_local
    }

    /// Recomputes everything from `store`; returns every frontend key that
    /// was or is desired.
    pub fn rebuild(&mut self, store: &Store, node: &NodeInfo) -> BTreeSet<FrontendKey> {
        let mut keys: BTreeSet<FrontendKey> = self.desired.frontends.keys().copied().collect();
        *self = Self::default();
        let all: Vec<ObjectKey> = store.services.keys().cloned().collect();
        keys.extend(self.update(store, node, all));
        self.compact();
        keys
    }

    /// Rebuilds the maps from their ordered entries: a map filled in key
    /// order (as a rebuild fills them) leaves its nodes about half full;
    /// built at once from sorted entries, they are full.
    fn compact(&mut self) {
        fn refill<K: Ord, V>(m: &mut BTreeMap<K, V>) {
            *m = std::mem::take(m).into_iter().collect();
        }
        refill(&mut self.services);
        refill(&mut self.keys);
        refill(&mut self.desired.frontends);
        refill(&mut self.health);
    }

    /// Recomputes the Services in `changed` (present in `store` or gone);
    /// returns the frontend keys whose desired entry may have changed.
    pub fn update(&mut self, store: &Store, node: &NodeInfo, changed: impl IntoIterator<Item = ObjectKey>) -> BTreeSet<FrontendKey> {
        let mut touched = BTreeSet::new();
        for key in changed {
            if let Some(old) = self.services.remove(&key) {
                for (i, slot) in old.frontends.iter().enumerate() {
                    self.unclaim(slot.key, &claim(slot.kind, old.created, &key, i));
                    if slot.parked.is_none() {
                        // It owned the key: its frontend goes with it.
                        self.desired.frontends.remove(&slot.key);
                    }
                    touched.insert(slot.key);
                }
                for r in &old.rejections {
                    count(&mut self.rejections, r, false);
                }
                self.health.remove(&key);
                self.no_local.0 -= u64::from(old.no_local.0);
                self.no_local.1 -= u64::from(old.no_local.1);
            }
            let Some(svc) = store.services.get(&key) else {
                continue;
            };
            let slices = store.slices_of(&key);
            let mut frontends = Vec::new();
            let mut st = ServiceState { origin: svc.meta.origin.clone(), created: svc.created, ..ServiceState::default() };
            service_frontends(&key, svc, &slices, node, &mut frontends, &mut st.rejections);
            st.health = service_health(svc, &slices, node);
            let none_local = |external: bool| {
                frontends.iter().any(|(_, f)| {
                    (f.kind != FrontendKind::ClusterIp) == external && f.policy_local && f.backends.is_empty() && f.drop_when_empty
                })
            };
            st.no_local = (none_local(false), none_local(true));
            self.no_local.0 += u64::from(st.no_local.0);
            self.no_local.1 += u64::from(st.no_local.1);
            for (i, (fk, fe)) in frontends.iter().enumerate() {
                self.claim(*fk, claim(fe.kind, st.created, &key, i));
                touched.insert(*fk);
            }
            // (A new list: collected in place, it would keep the larger one's room.)
            st.frontends = Vec::with_capacity(frontends.len());
            st.frontends.extend(frontends.into_iter().map(|(key, fe)| Slot { key, kind: fe.kind, parked: Some(Box::new(fe)) }));
            for r in &st.rejections {
                count(&mut self.rejections, r, true);
            }
            if let (Some(port), n) = st.health {
                self.health.insert(key.clone(), (port, n));
            }
            self.services.insert(key, st);
        }
        for fk in &touched {
            self.resolve(*fk);
        }
        touched
    }

    fn claim(&mut self, fk: FrontendKey, c: Claim) {
        match self.keys.get_mut(&fk) {
            None => {
                self.keys.insert(fk, KeyState { first: c, contest: None });
            }
            Some(k) => {
                let c = if c < k.first { std::mem::replace(&mut k.first, c) } else { c };
                let others = &mut k.contest.get_or_insert_default().others;
                let at = others.partition_point(|o| *o < c);
                others.insert(at, c);
            }
        }
    }

    fn unclaim(&mut self, fk: FrontendKey, c: &Claim) {
        let Some(k) = self.keys.get_mut(&fk) else {
            return;
        };
        if k.first == *c {
            if let Some(t) = k.contest.as_mut().filter(|t| !t.others.is_empty()) {
                k.first = t.others.remove(0);
            } else {
                let gone = self.keys.remove(&fk).expect("present");
                for r in gone.lost() {
                    count(&mut self.rejections, r, false);
                }
            }
        } else if let Some(t) = k.contest.as_mut()
            && let Ok(at) = t.others.binary_search(c)
        {
            t.others.remove(at);
        }
    }

    /// Gives `fk` to the first of its claims (precedence, see
    /// [`super::desired_state`]) — moving frontends between `desired` and
    /// the Services' parked ones — and records the losers.
    fn resolve(&mut self, fk: FrontendKey) {
        let Some(k) = self.keys.get(&fk) else {
            // No claim left: the owner's frontend went with its Service.
            self.desired.frontends.remove(&fk);
            return;
        };
        let winner = k.first.clone();
        if self.desired.frontends.get(&fk).is_none_or(|fe| fe.service != winner.service) {
            if let Some(fe) = self.desired.frontends.remove(&fk) {
                // The owner lost the key to a newcomer: its frontend waits.
                let slot = self.services.get_mut(&fe.service).and_then(|s| s.frontends.iter_mut().find(|s| s.key == fk));
                slot.expect("an owner's Service claims its key").parked = Some(Box::new(fe));
            }
            let slot = &mut self.services.get_mut(&winner.service).expect("a claim's Service is tracked").frontends[winner.index as usize];
            let fe = slot.parked.take().expect("a frontend that does not own its key is parked");
            self.desired.frontends.insert(fk, *fe);
        }
        let owner = &self.desired.frontends[&fk];
        let mut lost = Vec::new();
        for c in k.others() {
            let st = &self.services[&c.service];
            let why = format!(
                "frontend {fk} is already used by Service {} ({} wins over {}: ClusterIPs first, then the oldest Service)",
                owner.service,
                owner.kind.name(),
                st.frontends[c.index as usize].kind.name()
            );
            let cause = Cause::FrontendConflict { owner: owner.service.clone() };
            reject(&mut lost, "Service", &c.service, &st.origin, cause, why);
        }
        let k = self.keys.get_mut(&fk).expect("present");
        if lost != k.lost() {
            for r in k.lost() {
                count(&mut self.rejections, r, false);
            }
            for r in &lost {
                count(&mut self.rejections, r, true);
            }
            k.contest.get_or_insert_default().lost = lost;
        }
        // An uncontested key keeps no room for a contest.
        if k.contest.as_ref().is_some_and(|t| t.others.is_empty() && t.lost.is_empty()) {
            k.contest = None;
        }
    }
}

fn claim(kind: FrontendKind, created: Option<jiff::Timestamp>, service: &ObjectKey, index: usize) -> Claim {
    // (A Service has a handful of frontends: ports × addresses.)
    let index = u32::try_from(index).expect("fewer than 2^32 frontends per Service");
    Claim { external: kind != FrontendKind::ClusterIp, undated: created.is_none(), created, service: service.clone(), index }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use serde_json::json;

    use super::*;
    use crate::{
        model::{desired_state, health_checks},
        store::SourceEvent,
    };

    /// A small deterministic generator (xorshift).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A random Service `s{i}`; with `invalid`, sometimes with an invalid
    /// externalIP, a second (UDP) port, or an unknown protocol.
    fn service(rng: &mut Rng, i: u64, invalid: bool) -> SourceEvent {
        // Few externalIPs and node ports, so Services contest them.
        let ext = format!("203.0.113.{}", rng.next(3) + 1);
        let ty = ["ClusterIP", "NodePort", "LoadBalancer"][usize::try_from(rng.next(3)).expect("small")];
        let mut spec = json!({
            "type": ty,
            "clusterIP": format!("10.96.{}.{}", i / 200, i % 200 + 1),
            "externalIPs": if rng.next(2) == 0 { json!([ext]) } else { json!([]) },
            "ports": [{ "name": "http", "port": 80 + rng.next(2), "targetPort": 8080, "protocol": "TCP" }],
            "internalTrafficPolicy": if rng.next(3) == 0 { "Local" } else { "Cluster" },
            "externalTrafficPolicy": if rng.next(3) == 0 { "Local" } else { "Cluster" },
        });
        if ty != "ClusterIP" {
            spec["ports"][0]["nodePort"] = json!(30000 + rng.next(3));
        }
        if ty == "LoadBalancer" {
            spec["healthCheckNodePort"] = json!(31000 + i);
        }
        if invalid {
            if rng.next(4) == 0 {
                spec["externalIPs"] = json!(["banana"]);
            }
            match rng.next(4) {
                0 => spec["ports"].as_array_mut().expect("ports").push(json!({ "name": "dns", "port": 53, "protocol": "UDP" })),
                1 => spec["ports"].as_array_mut().expect("ports").push(json!({ "name": "x", "port": 99, "protocol": "ICMP" })),
                _ => {}
            }
        }
        let obj = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": format!("s{i}"), "namespace": "default",
                          "creationTimestamp": format!("2026-01-01T00:00:{:02}Z", rng.next(60)) },
            "spec": spec,
            "status": if ty == "LoadBalancer" { json!({ "loadBalancer": { "ingress": [{ "ip": ext }] } }) } else { json!({}) },
        });
        SourceEvent::service(&serde_json::from_value::<Service>(obj).expect("service"), "test")
    }

    /// A random slice `s{svc}-{n}` of Service `s{svc}`; with `invalid`,
    /// sometimes with an address that is not one (refused once per port
    /// that uses the slice).
    fn slice(rng: &mut Rng, svc: u64, n: u64, invalid: bool) -> SourceEvent {
        let mut eps: Vec<_> = (0..rng.next(4))
            .map(|e| {
                json!({
                    "addresses": [Ipv4Addr::new(10, 244, u8::try_from(svc % 250).expect("small"), u8::try_from(e + 1).expect("small")).to_string()],
                    "conditions": { "ready": rng.next(4) != 0 },
                    "nodeName": if rng.next(2) == 0 { "me" } else { "other" },
                })
            })
            .collect();
        let mut ports = vec![json!({ "name": "http", "port": 8080, "protocol": "TCP" })];
        if invalid {
            if rng.next(3) == 0 {
                eps.push(json!({ "addresses": ["not-an-address"] }));
            }
            ports.push(json!({ "name": "dns", "port": 5353, "protocol": "UDP" }));
        }
        let obj = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": { "name": format!("s{svc}-{n}"), "namespace": "default",
                          "labels": { "kubernetes.io/service-name": format!("s{svc}") } },
            "endpoints": eps,
            "ports": ports,
        });
        SourceEvent::slice(&serde_json::from_value::<EndpointSlice>(obj).expect("slice"), "test")
    }

    fn node() -> NodeInfo {
        NodeInfo { name: "me".into(), nodeport_addresses: vec![Ipv4Addr::new(192, 0, 2, 1).into()], ..NodeInfo::default() }
    }

    /// After every random change, the tracker updated with the Services the
    /// change names equals a recomputation from scratch: frontends, who
    /// owns contested addresses, rejections, health-check inputs.
    impl Tracker {
        /// Each frontend is either the owner of its key (in `desired`) or
        /// parked in its Service, never both; the counted rejections are
        /// the Services' own and the lost claims'.
        fn check(&self) {
            for (svc, st) in &self.services {
                for slot in &st.frontends {
                    let owns = self.desired.frontends.get(&slot.key).is_some_and(|f| f.service == *svc);
                    assert_eq!(owns, slot.parked.is_none(), "{svc} {}", slot.key);
                }
            }
            let mut all: BTreeMap<Rejection, usize> = BTreeMap::new();
            for r in self.services.values().flat_map(|s| &s.rejections).chain(self.keys.values().flat_map(KeyState::lost)) {
                *all.entry(r.clone()).or_default() += 1;
            }
            assert_eq!(all, self.rejections);
        }
    }

    #[test]
    fn incremental_updates_equal_a_full_recomputation() {
        equal_to_full_recomputation(false);
    }

    /// The same with Services and slices that are refused in part (an
    /// invalid externalIP, an unknown protocol, an endpoint address that is
    /// not one, the same refusal made once per port): the rejections kept
    /// up to date as Services change are the ones a full recomputation finds.
    #[test]
    fn incremental_rejections_equal_a_full_recomputation() {
        equal_to_full_recomputation(true);
    }

    fn equal_to_full_recomputation(invalid: bool) {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let node = node();
        let mut store = Store::default();
        let mut tracker = Tracker::default();
        let (mut contested, mut checks, mut biggest, mut refused) = (0, 0, 0, 0);
        for step in 0..3000 {
            let svc = rng.next(40);
            let n = rng.next(2);
            let ev = match rng.next(6) {
                0 | 1 => service(&mut rng, svc, invalid),
                2 => SourceEvent::ServiceDeleted(ObjectKey::new("default", &format!("s{svc}"))),
                3 | 4 => slice(&mut rng, svc, n, invalid),
                _ => SourceEvent::SliceDeleted(ObjectKey::new("default", &format!("s{svc}-{n}"))),
            };
            let changed = match store.apply(ev) {
                crate::store::Change::Services(v) => v,
                crate::store::Change::None => Vec::new(),
                crate::store::Change::All => panic!("no node events here"),
            };
            let keys = tracker.update(&store, &node, changed);
            let (want, rejections) = desired_state(&store, &node);
            assert_eq!(tracker.desired(), &want, "step {step}");
            assert_eq!(tracker.rejections(), rejections, "step {step}");
            tracker.check();
            let (ports, local) = health_checks(&store, &node);
            let (tp, tl) = tracker.health_checks();
            assert_eq!(tp, ports, "step {step}");
            assert!(tl.iter().all(|(k, n)| local.get(k) == Some(n)), "step {step}");
            // (Old and new frontends of one Service: ClusterIP, node port,
            // externalIP, ingress; per port.)
            let most = if invalid { 16 } else { 8 };
            assert!(keys.len() <= most, "step {step}: one Service's keys (and nothing else) are touched: {keys:?}");
            contested += usize::from(rejections.iter().any(|r| matches!(r.cause, Cause::FrontendConflict { .. })));
            checks += usize::from(!tp.is_empty());
            biggest = biggest.max(want.frontends.len());
            refused += usize::from(rejections.iter().any(|r| r.cause == Cause::Invalid));
        }
        assert!(contested > 500 && checks > 500 && biggest > 30, "the changes exercise conflicts and health checks: {contested} {checks} {biggest}");
        assert!(!invalid || refused > 500, "the changes exercise refused objects: {refused}");
        let mut full = Tracker::default();
        full.rebuild(&store, &node);
        full.check();
        assert_eq!(full.desired(), tracker.desired());
        assert_eq!(full.rejections(), tracker.rejections());
        assert_eq!(full.no_local_endpoints(), tracker.no_local_endpoints());
    }
}
