//! The desired state kept between syncs and recomputed per changed Service,
//! as kube-proxy's change trackers do: an event names the Services it
//! touches ([`crate::store::Change`]), and a sync recomputes those alone —
//! their frontends, who owns each contested address, their health-check
//! inputs — and tells the reconciler which frontend keys to look at. A full
//! rebuild ([`Tracker::rebuild`]) gives exactly what [`super::desired_state`]
//! gives; the periodic full sync uses it to repair drift.
use std::collections::{BTreeMap, BTreeSet};

use super::{
    Age, Cause, Desired, Frontend, FrontendKey, FrontendKind, NodeInfo, Rejection, reject, service_frontends, service_health,
};
use crate::store::{ObjectKey, Store};

/// Who claims a frontend key, in precedence order: `ClusterIPs` first,
/// then dated before undated, then the oldest (creationTimestamp), then
/// `namespace/name`; `usize` is the frontend's index in its Service's list.
type Claim = (bool, bool, Age, usize);

/// One Service's share of the desired state.
#[derive(Clone, Debug, Default)]
struct ServiceState {
    origin: String,
    /// What its claims were made with.
    age: Age,
    frontends: Vec<(FrontendKey, Frontend)>,
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
    claims: BTreeMap<FrontendKey, BTreeSet<Claim>>,
    desired: Desired,
    /// The claims that lost a contested key.
    conflicts: BTreeMap<FrontendKey, Vec<Rejection>>,
    /// Services with a health check port: port and local endpoint count.
    health: BTreeMap<ObjectKey, (u16, usize)>,
    /// Services with `no_local` set (internal, external).
    no_local: (u64, u64),
}

impl Tracker {
    /// The desired frontends.
    #[must_use]
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Every current rejection (each Service's own and lost claims), sorted
    /// and without duplicates, as [`super::desired_state`] returns them.
    #[must_use]
    pub fn rejections(&self) -> Vec<Rejection> {
        let set: BTreeSet<&Rejection> =
            self.services.values().flat_map(|s| &s.rejections).chain(self.conflicts.values().flatten()).collect();
        set.into_iter().cloned().collect()
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
        keys
    }

    /// Recomputes the Services in `changed` (present in `store` or gone);
    /// returns the frontend keys whose desired entry may have changed.
    pub fn update(&mut self, store: &Store, node: &NodeInfo, changed: impl IntoIterator<Item = ObjectKey>) -> BTreeSet<FrontendKey> {
        let mut touched = BTreeSet::new();
        for key in changed {
            if let Some(old) = self.services.remove(&key) {
                for (i, (fk, fe)) in old.frontends.iter().enumerate() {
                    if let Some(c) = self.claims.get_mut(fk) {
                        c.remove(&claim(fe, &old.age, i));
                    }
                    touched.insert(*fk);
                }
                self.health.remove(&key);
                self.no_local.0 -= u64::from(old.no_local.0);
                self.no_local.1 -= u64::from(old.no_local.1);
            }
            let Some(svc) = store.services.get(&key) else {
                continue;
            };
            let slices = store.slices_of(&key);
            let age = (svc.object.metadata.creation_timestamp.as_ref().map(|t| t.0), key.clone());
            let mut st = ServiceState { origin: svc.origin.clone(), age, ..ServiceState::default() };
            service_frontends(&key, svc, &slices, node, &mut st.frontends, &mut st.rejections);
            st.health = service_health(svc, &slices, node);
            for (i, (fk, fe)) in st.frontends.iter().enumerate() {
                self.claims.entry(*fk).or_default().insert(claim(fe, &st.age, i));
                touched.insert(*fk);
            }
            if let (Some(port), n) = st.health {
                self.health.insert(key.clone(), (port, n));
            }
            let none_local = |external: bool| {
                st.frontends.iter().any(|(_, f)| {
                    (f.kind != FrontendKind::ClusterIp) == external && f.policy_local && f.backends.is_empty() && f.drop_when_empty
                })
            };
            st.no_local = (none_local(false), none_local(true));
            self.no_local.0 += u64::from(st.no_local.0);
            self.no_local.1 += u64::from(st.no_local.1);
            self.services.insert(key, st);
        }
        for fk in &touched {
            self.resolve(*fk);
        }
        touched
    }

    /// Decides who owns `fk` among its claims (precedence, see
    /// [`super::desired_state`]), and records the losers.
    fn resolve(&mut self, fk: FrontendKey) {
        self.conflicts.remove(&fk);
        let Some(claims) = self.claims.get(&fk).filter(|c| !c.is_empty()) else {
            self.claims.remove(&fk);
            self.desired.frontends.remove(&fk);
            return;
        };
        let mut it = claims.iter().map(|(_, _, (_, svc), i)| (svc, &self.services[svc].frontends[*i].1, &self.services[svc].origin));
        let (_, owner, _) = it.next().expect("non-empty");
        let owner = owner.clone();
        let mut lost = Vec::new();
        for (svc, fe, origin) in it {
            let why = format!(
                "frontend {fk} is already used by Service {} ({} wins over {}: ClusterIPs first, then the oldest Service)",
                owner.service,
                owner.kind.name(),
                fe.kind.name()
            );
            let cause = Cause::FrontendConflict { owner: owner.service.clone() };
            reject(&mut lost, "Service", svc, origin, cause, why);
        }
        if !lost.is_empty() {
            self.conflicts.insert(fk, lost);
        }
        self.desired.frontends.insert(fk, owner);
    }
}

fn claim(fe: &Frontend, age: &Age, i: usize) -> Claim {
    (fe.kind != FrontendKind::ClusterIp, age.0.is_none(), age.clone(), i)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use serde_json::json;

    use super::*;
    use crate::{
        model::{desired_state, health_checks},
        store::{SourceEvent, Stored},
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

    fn service(rng: &mut Rng, i: u64) -> Stored<Service> {
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
        let obj = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": format!("s{i}"), "namespace": "default",
                          "creationTimestamp": format!("2026-01-01T00:00:{:02}Z", rng.next(60)) },
            "spec": spec,
            "status": if ty == "LoadBalancer" { json!({ "loadBalancer": { "ingress": [{ "ip": ext }] } }) } else { json!({}) },
        });
        Stored { object: serde_json::from_value(obj).expect("service"), origin: "test".into() }
    }

    fn slice(rng: &mut Rng, svc: u64, n: u64) -> Stored<EndpointSlice> {
        let eps: Vec<_> = (0..rng.next(4))
            .map(|e| {
                json!({
                    "addresses": [Ipv4Addr::new(10, 244, u8::try_from(svc % 250).expect("small"), u8::try_from(e + 1).expect("small")).to_string()],
                    "conditions": { "ready": rng.next(4) != 0 },
                    "nodeName": if rng.next(2) == 0 { "me" } else { "other" },
                })
            })
            .collect();
        let obj = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": { "name": format!("s{svc}-{n}"), "namespace": "default",
                          "labels": { "kubernetes.io/service-name": format!("s{svc}") } },
            "endpoints": eps,
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        });
        Stored { object: serde_json::from_value(obj).expect("slice"), origin: "test".into() }
    }

    fn node() -> NodeInfo {
        NodeInfo { name: "me".into(), nodeport_addresses: vec![Ipv4Addr::new(192, 0, 2, 1).into()], ..NodeInfo::default() }
    }

    /// After every random change, the tracker updated with the Services the
    /// change names equals a recomputation from scratch: frontends, who
    /// owns contested addresses, rejections, health-check inputs.
    #[test]
    fn incremental_updates_equal_a_full_recomputation() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let node = node();
        let mut store = Store::default();
        let mut tracker = Tracker::default();
        let (mut contested, mut checks, mut biggest) = (0, 0, 0);
        for step in 0..3000 {
            let svc = rng.next(40);
            let n = rng.next(2);
            let ev = match rng.next(6) {
                0 | 1 => SourceEvent::ServiceApplied(service(&mut rng, svc)),
                2 => SourceEvent::ServiceDeleted(ObjectKey::new("default", &format!("s{svc}"))),
                3 | 4 => SourceEvent::SliceApplied(slice(&mut rng, svc, n)),
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
            let (ports, local) = health_checks(&store, &node);
            let (tp, tl) = tracker.health_checks();
            assert_eq!(tp, ports, "step {step}");
            assert!(tl.iter().all(|(k, n)| local.get(k) == Some(n)), "step {step}");
            assert!(keys.len() <= 8, "step {step}: one Service's keys (and nothing else) are touched: {keys:?}");
            contested += usize::from(rejections.iter().any(|r| matches!(r.cause, Cause::FrontendConflict { .. })));
            checks += usize::from(!tp.is_empty());
            biggest = biggest.max(want.frontends.len());
        }
        assert!(contested > 500 && checks > 500 && biggest > 30, "the changes exercise conflicts and health checks: {contested} {checks} {biggest}");
        let mut full = Tracker::default();
        full.rebuild(&store, &node);
        assert_eq!(full.desired(), tracker.desired());
        assert_eq!(full.no_local_endpoints(), tracker.no_local_endpoints());
    }
}
