//! "YAML in, frontends out": each test feeds manifests (as a user or
//! `kubectl get -o yaml` would write them) through the manifests parser and
//! the store, computes the desired state and compares a compact rendering of
//! it with the expected text:
//!
//! ```text
//! 10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080,10.244.0.12:8080
//! rejected: Service default/bad (from test.yaml): invalid clusterIP "banana"
//! ```
//!
//! One line per frontend (in key order, `-> (none)` when it has no
//! backends), then one line per rejection (in the order they were made).
use std::{fmt::Write as _, path::Path};

use super::{BackendAddr, Cause, Desired, FrontendKind, NodeInfo, Rejection, desired_state};
use crate::{
    source::manifests::{Object, parse_file},
    store::{SourceEvent, Store},
};

const ORIGIN: &str = "test.yaml";

/// Parses `yaml` (multi-document) into a synced store; panics if the test
/// input itself does not decode, so that a typo in a test cannot pass as
/// "no frontends".
fn store_from(yaml: &str) -> Store {
    let (objects, problems) =
        parse_file(Path::new(ORIGIN), yaml).unwrap_or_else(|p| panic!("test YAML does not parse: {p}"));
    assert!(
        problems.is_empty(),
        "test YAML has objects that do not decode:\n{}",
        problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
    );
    let mut store = Store::default();
    for o in objects {
        let event = match o {
            Object::Service(s) => SourceEvent::service(&s, ORIGIN),
            Object::Slice(s) => SourceEvent::slice(&s, ORIGIN),
        };
        store.apply(event);
    }
    store.apply(SourceEvent::ServicesSynced);
    store.apply(SourceEvent::SlicesSynced);
    assert!(store.synced());
    store
}

fn compute(yaml: &str) -> (Desired, Vec<Rejection>) {
    desired_state(&store_from(yaml), &NodeInfo::default())
}

#[track_caller]
fn check_on(node: &NodeInfo, yaml: &str, expected: &str) {
    let (desired, rejections) = desired_state(&store_from(yaml), node);
    let got = render(&desired, &rejections);
    let want = lines(expected);
    assert!(got == want, "desired state differs\n--- expected ---\n{want}--- got ---\n{got}----------------");
}

fn node(name: &str, zone: Option<&str>) -> NodeInfo {
    NodeInfo { name: name.to_owned(), zone: zone.map(str::to_owned), ..NodeInfo::default() }
}

fn render(desired: &Desired, rejections: &[Rejection]) -> String {
    let mut out = String::new();
    for (key, fe) in &desired.frontends {
        assert_eq!(fe.kind, FrontendKind::ClusterIp, "only ClusterIP frontends exist so far");
        let mut sorted = fe.backends.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, fe.backends, "backends of {key} must be sorted and without duplicates");
        let backends = if fe.backends.is_empty() && fe.drop_when_empty {
            "(dropped)".to_owned()
        } else if fe.backends.is_empty() {
            "(none)".to_owned()
        } else {
            fe.backends.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
        };
        writeln!(out, "{key} {} -> {backends}", fe.display_name()).unwrap();
    }
    for r in rejections {
        writeln!(out, "rejected: {r}").unwrap();
    }
    out
}

/// Trims the common indentation and blank lines of an expected block.
fn lines(text: &str) -> String {
    let mut out = String::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        out.push_str(l);
        out.push('\n');
    }
    out
}

#[track_caller]
fn check(yaml: &str, expected: &str) {
    let (desired, rejections) = compute(yaml);
    let got = render(&desired, &rejections);
    let want = lines(expected);
    assert!(
        got == want,
        "desired state differs\n--- expected ---\n{want}--- got ---\n{got}----------------"
    );
}

// ---------------------------------------------------------------- basics

#[test]
fn cluster_ip_with_two_endpoints() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.0.12]
  conditions: {ready: true}
- addresses: [10.244.0.11]
  conditions: {ready: true}
",
        "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080,10.244.0.12:8080",
    );
}

#[test]
fn namespace_defaults_to_default_and_protocol_to_tcp() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.0.11]
",
        "10.96.0.10:80/TCP default/web -> 10.244.0.11:8080",
    );
}

#[test]
fn all_ports_of_a_multi_port_service_tcp_and_udp() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - {name: dns, port: 53, targetPort: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, targetPort: 53, protocol: TCP}
  - {name: metrics, port: 9153, targetPort: 9153, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-xyz
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns}
addressType: IPv4
ports:
- {name: dns-tcp, port: 53, protocol: TCP}
- {name: dns, port: 53, protocol: UDP}
- {name: metrics, port: 9153, protocol: TCP}
endpoints:
- addresses: [10.244.0.2]
  conditions: {ready: true}
- addresses: [10.244.0.3]
  conditions: {ready: true}
",
        "
        10.96.0.10:53/TCP kube-system/kube-dns:dns-tcp -> 10.244.0.2:53,10.244.0.3:53
        10.96.0.10:53/UDP kube-system/kube-dns:dns -> 10.244.0.2:53,10.244.0.3:53
        10.96.0.10:9153/TCP kube-system/kube-dns:metrics -> 10.244.0.2:9153,10.244.0.3:9153
        ",
    );
}

#[test]
fn service_without_ports_has_no_frontends() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: noports}
spec:
  clusterIP: 10.96.0.10
",
        "",
    );
}

// ------------------------------------------------- joining EndpointSlices

#[test]
fn slices_join_by_service_name_label_and_namespace() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
# Joins: right label, same namespace; the slice's own name does not matter.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: unrelated-name
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.11]}]
---
# Same label, another namespace: belongs to other/web, not default/web.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-other
  namespace: other
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.9.9]}]
---
# No label (even though its name looks like the Service's): joins nothing.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-nolabel
  namespace: default
  labels: {app: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.8.8]}]
---
# No labels at all.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web
  namespace: default
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.7.7]}]
---
# Labelled for a Service that does not exist: silently unused.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ghost-abc
  namespace: default
  labels: {kubernetes.io/service-name: ghost}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.6.6]}]
",
        "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080",
    );
}

#[test]
fn same_service_name_in_two_namespaces_each_gets_its_own_slices() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: b}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: a
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: b
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.2.2]}]
",
        "
        10.96.0.10:80/TCP a/web -> 10.244.1.1:8080
        10.96.0.11:80/TCP b/web -> 10.244.2.2:8080
        ",
    );
}

// ------------------------------------------------------------ port matching

#[test]
fn named_target_port_uses_each_slices_resolved_number() {
    // Two pods name their container port `web` but number it differently:
    // the EndpointSlice controller puts each number in its own slice.
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: web, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.0.11], conditions: {ready: true}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-b
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 9090, protocol: TCP}]
endpoints: [{addresses: [10.244.0.12], conditions: {ready: true}}]
",
        "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080,10.244.0.12:9090",
    );
}

#[test]
fn slice_ports_match_by_service_port_name_not_by_number() {
    // The Service's port/targetPort numbers are irrelevant to the match: only
    // the name (and protocol) is.
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: admin, port: 81, targetPort: 8081}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: admin, port: 7001}
- {name: http, port: 7000}
- {name: unused, port: 7002}
endpoints: [{addresses: [10.244.0.11]}]
",
        "
        10.96.0.10:80/TCP default/web:http -> 10.244.0.11:7000
        10.96.0.10:81/TCP default/web:admin -> 10.244.0.11:7001
        ",
    );
}

#[test]
fn unnamed_service_port_matches_unnamed_slice_port() {
    // The EndpointSlice controller writes `name: ""` for an unnamed port;
    // hand-written slices often leave it out. Both match; a named one does not.
    check(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-empty-name
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.0.11]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-no-name
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.12]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-named
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.13]}]
"#,
        "10.96.0.10:80/TCP default/web -> 10.244.0.11:8080,10.244.0.12:8080",
    );
}

#[test]
fn slice_port_must_match_protocol_too() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: dns, port: 53, protocol: UDP}]
---
# Same name, wrong protocol (unset means TCP): no match.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-tcp
  namespace: default
  labels: {kubernetes.io/service-name: dns}
addressType: IPv4
ports: [{name: dns, port: 5353}]
endpoints: [{addresses: [10.244.0.11]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-udp
  namespace: default
  labels: {kubernetes.io/service-name: dns}
addressType: IPv4
ports: [{name: dns, port: 53, protocol: UDP}]
endpoints: [{addresses: [10.244.0.12]}]
",
        "10.96.0.10:53/UDP default/dns:dns -> 10.244.0.12:53",
    );
}

#[test]
fn slice_without_the_services_port_contributes_nothing() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-noports
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints: [{addresses: [10.244.0.11]}]
",
        "10.96.0.10:80/TCP default/web:http -> (none)",
    );
}

// ---------------------------------------------------------------- endpoints

#[test]
fn only_ready_endpoints_are_used_and_unset_ready_counts_as_ready() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.1]
  conditions: {ready: true}
- addresses: [10.244.0.2]
  conditions: {ready: false}
- addresses: [10.244.0.3]          # no conditions at all: ready
- addresses: [10.244.0.4]
  conditions: {serving: true}      # conditions without ready: ready
- addresses: [10.244.0.5]
  conditions: {}                   # empty conditions: ready
- addresses: [10.244.0.6]          # terminating: not ready (no fallback yet)
  conditions: {ready: false, serving: true, terminating: true}
",
        "10.96.0.10:80/TCP default/web:http -> 10.244.0.1:8080,10.244.0.3:8080,10.244.0.4:8080,10.244.0.5:8080",
    );
}

#[test]
fn first_address_of_an_endpoint_is_used() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.0.2, 10.244.0.1]
",
        "10.96.0.10:80/TCP default/web -> 10.244.0.2:8080",
    );
}

#[test]
fn same_address_and_port_in_two_slices_counts_once() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-b
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.13]
",
        "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080,10.244.0.12:8080,10.244.0.13:8080",
    );
}

#[test]
fn same_address_with_different_ports_in_two_slices_counts_twice() {
    // Dedup is by address:port, not by address.
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: web}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.11]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-b
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 9090}]
endpoints: [{addresses: [10.244.0.11]}]
",
        "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080,10.244.0.11:9090",
    );
}

#[test]
fn no_endpoints_gives_a_frontend_with_no_backends() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: default}
spec:
  clusterIP: 10.96.0.40
  ports: [{name: http, port: 80}]
---
# A slice with no endpoints at all.
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.41
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: empty-a
  namespace: default
  labels: {kubernetes.io/service-name: empty}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: []
---
# Only unready endpoints.
apiVersion: v1
kind: Service
metadata: {name: unready, namespace: default}
spec:
  clusterIP: 10.96.0.42
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: unready-a
  namespace: default
  labels: {kubernetes.io/service-name: unready}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.1], conditions: {ready: false}}]
",
        "
        10.96.0.40:80/TCP default/lonely:http -> (none)
        10.96.0.41:80/TCP default/empty:http -> (none)
        10.96.0.42:80/TCP default/unready:http -> (none)
        ",
    );
}

#[test]
fn each_family_takes_its_own_slices_and_fqdn_slices_are_reported() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00::10']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v4
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.11]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ['fd00:244::11']}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-fqdn
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: FQDN
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [web.example.com]}]
",
        "
        10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080
        [fd00::10]:80/TCP default/web:http -> [fd00:244::11]:8080
        rejected: EndpointSlice default/web-fqdn (from test.yaml): addressType FQDN is not proxied (as kube-proxy)
        ",
    );
}

#[test]
fn endpoints_beyond_the_map_limit_are_truncated_with_one_rejection() {
    let limit = usize::from(proxy_common::svc::MAX_BACKENDS_PER_FRONTEND);
    let mut yaml = String::from(
        r"
apiVersion: v1
kind: Service
metadata: {name: big, namespace: default}
spec:
  clusterIP: 10.96.0.50
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: big-a
  namespace: default
  labels: {kubernetes.io/service-name: big}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
",
    );
    for i in 0..=limit {
        writeln!(yaml, "- addresses: [10.1.{}.{}]", i / 256, i % 256).unwrap();
    }
    let (desired, rejections) = compute(&yaml);
    let fe = desired.frontends.values().next().expect("one frontend");
    assert_eq!(desired.frontends.len(), 1);
    assert_eq!(fe.backends.len(), limit, "backends are capped at the map's capacity");
    let msgs: Vec<String> = rejections.iter().map(ToString::to_string).collect();
    assert_eq!(
        msgs,
        [format!(
            "Service default/big (from test.yaml): port \"\" has {} endpoints; only the first {limit} are used",
            limit + 1
        )]
    );
}

// ------------------------------------------------------ not proxied (silent)

#[test]
fn headless_external_name_and_other_proxy_services_are_skipped_silently() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: default}
spec:
  clusterIP: None
  clusterIPs: [None]
  ports: [{name: http, port: 80}]
---
# Headless with only the singular field set.
apiVersion: v1
kind: Service
metadata: {name: headless2, namespace: default}
spec:
  clusterIP: None
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec:
  type: ExternalName
  externalName: example.com
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata:
  name: foo-proxied
  namespace: default
  labels: {service.kubernetes.io/service-proxy-name: foo}
spec:
  clusterIP: 10.96.0.60
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: headless-a
  namespace: default
  labels: {kubernetes.io/service-name: headless}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.11]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: foo-proxied-a
  namespace: default
  labels: {kubernetes.io/service-name: foo-proxied}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.12]}]
---
# A normal Service next to them is still programmed.
apiVersion: v1
kind: Service
metadata: {name: normal, namespace: default}
spec:
  clusterIP: 10.96.0.61
  ports: [{name: http, port: 80}]
",
        "10.96.0.61:80/TCP default/normal:http -> (none)",
    );
}

#[test]
fn headless_service() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  ports: [{port: 80}]
",
        "",
    );
}

#[test]
fn external_name_service() {
    // Not proxied, even with an (invalid for it) clusterIP-less spec.
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  type: ExternalName
  externalName: db.example.com
",
        "",
    );
}

#[test]
fn service_proxy_name_label_service() {
    // Any value of the label means "another proxy handles it" (kube-proxy
    // skips the Service whenever the label is present).
    check(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: other
  labels: {service.kubernetes.io/service-proxy-name: foo}
spec:
  clusterIP: 10.96.0.60
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata:
  name: other-empty
  labels: {service.kubernetes.io/service-proxy-name: ""}
spec:
  clusterIP: 10.96.0.62
  ports: [{port: 80}]
"#,
        "",
    );
}

// --------------------------------------------------------------- dual-stack

#[test]
fn dual_stack_service_gets_a_frontend_per_family() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: default}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, 'fd00::20']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dual-v4
  namespace: default
  labels: {kubernetes.io/service-name: dual}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.11]}]
",
        "
        10.96.0.20:80/TCP default/dual:http -> 10.244.0.11:8080
        [fd00::20]:80/TCP default/dual:http -> (none)
        ",
    );
}

#[test]
fn ipv6_primary_dual_stack_service_gets_both_families() {
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: dual6, namespace: default}
spec:
  clusterIP: fd00::21
  clusterIPs: ['fd00::21', 10.96.0.21]
  ipFamilies: [IPv6, IPv4]
  ipFamilyPolicy: PreferDualStack
  ports: [{name: http, port: 80}]
",
        "
        10.96.0.21:80/TCP default/dual6:http -> (none)
        [fd00::21]:80/TCP default/dual6:http -> (none)
        ",
    );
}

// ------------------------------------------------------------- bad input

/// A good Service included in every bad-input test: it must stay programmed.
const GOOD: &str = r"
apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: https, port: 443, targetPort: 6443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: good-a
  namespace: default
  labels: {kubernetes.io/service-name: good}
addressType: IPv4
ports: [{name: https, port: 6443}]
endpoints: [{addresses: [192.168.1.10]}]
";
const GOOD_LINE: &str = "10.96.0.1:443/TCP default/good:https -> 192.168.1.10:6443";

#[track_caller]
fn check_with_good(bad_yaml: &str, expected: &str) {
    let yaml = format!("{GOOD}---\n{bad_yaml}");
    // The good Service sorts first in key order (10.96.0.1 is the lowest VIP).
    check(&yaml, &format!("{GOOD_LINE}\n{expected}"));
}

#[test]
fn invalid_cluster_ip_out_of_range_octet() {
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: default}
spec:
  clusterIP: 10.96.0.300
  ports: [{port: 80}]
",
        r#"rejected: Service default/bad (from test.yaml): invalid clusterIP "10.96.0.300""#,
    );
}

#[test]
fn invalid_cluster_ip_not_an_address() {
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: default}
spec:
  clusterIP: banana
  ports: [{port: 80}]
",
        r#"rejected: Service default/bad (from test.yaml): invalid clusterIP "banana""#,
    );
}

#[test]
fn invalid_cluster_ip_in_cluster_ips_list() {
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: default}
spec:
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, banana]
  ports: [{port: 80}]
",
        r#"rejected: Service default/bad (from test.yaml): invalid clusterIP "banana""#,
    );
}

#[test]
fn unusable_cluster_ips_are_rejected() {
    for ip in ["0.0.0.0", "255.255.255.255", "224.0.0.1"] {
        check_with_good(
            &format!(
                "
apiVersion: v1
kind: Service
metadata: {{name: bad, namespace: default}}
spec:
  clusterIP: {ip}
  ports: [{{port: 80}}]
"
            ),
            &format!(r#"rejected: Service default/bad (from test.yaml): invalid clusterIP "{ip}""#),
        );
    }
}

#[test]
fn missing_cluster_ip() {
    check_with_good(
        r#"
apiVersion: v1
kind: Service
metadata: {name: noip, namespace: default}
spec:
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: emptyip, namespace: default}
spec:
  clusterIP: ""
  clusterIPs: []
  ports: [{port: 80}]
"#,
        "
        rejected: Service default/emptyip (from test.yaml): has no clusterIP
        rejected: Service default/noip (from test.yaml): has no clusterIP
        ",
    );
}

#[test]
fn missing_spec() {
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: nospec, namespace: default}
",
        "rejected: Service default/nospec (from test.yaml): has no spec",
    );
}

#[test]
fn port_out_of_range_skips_the_whole_service() {
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: bigport, namespace: default}
spec:
  clusterIP: 10.96.0.31
  ports:
  - {name: ok, port: 80}
  - {name: huge, port: 70000}
",
        "rejected: Service default/bigport (from test.yaml): port 70000 is out of range 1-65535",
    );
}

#[test]
fn port_zero_skips_the_whole_service() {
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: zeroport, namespace: default}
spec:
  clusterIP: 10.96.0.31
  ports: [{name: ok, port: 80}, {name: zero, port: 0}]
",
        "rejected: Service default/zeroport (from test.yaml): port 0 is out of range 1-65535",
    );
}

#[test]
fn sctp_port_is_programmed_beside_the_tcp_port_of_the_same_service() {
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: mixed, namespace: default}
spec:
  clusterIP: 10.96.0.32
  ports:
  - {name: sig, port: 3868, protocol: SCTP}
  - {name: http, port: 80, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: mixed-a
  namespace: default
  labels: {kubernetes.io/service-name: mixed}
addressType: IPv4
ports:
- {name: sig, port: 3868, protocol: SCTP}
- {name: http, port: 8080, protocol: TCP}
endpoints: [{addresses: [10.244.0.11]}]
",
        r#"
        10.96.0.32:80/TCP default/mixed:http -> 10.244.0.11:8080
        10.96.0.32:3868/SCTP default/mixed:sig -> 10.244.0.11:3868
        "#,
    );
}

#[test]
fn unknown_protocol_port_is_skipped() {
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: weird, namespace: default}
spec:
  clusterIP: 10.96.0.33
  ports:
  - {name: x, port: 99, protocol: ICMP}
  - {name: http, port: 80}
",
        r#"
        10.96.0.33:80/TCP default/weird:http -> (none)
        rejected: Service default/weird (from test.yaml): port "x" (99): unknown protocol "ICMP"
        "#,
    );
}

/// An IPv6-only Service with its IPv6 slice.
const V6_ONLY: &str = r"
apiVersion: v1
kind: Service
metadata: {name: v6, namespace: default}
spec:
  clusterIP: fd00::1
  clusterIPs: ['fd00::1']
  ipFamilies: [IPv6]
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: v6-a
  namespace: default
  labels: {kubernetes.io/service-name: v6}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00:244::1']}]
";

#[test]
fn ipv6_only_service_is_programmed_and_a_family_it_does_not_list_is_reported() {
    check_with_good(V6_ONLY, "[fd00::1]:80/TCP default/v6 -> [fd00:244::1]:8080");
    check_with_good(
        &V6_ONLY.replace("ipFamilies: [IPv6]", "ipFamilies: [IPv4]"),
        r#"rejected: Service default/v6 (from test.yaml): clusterIP fd00::1 is IPv6, but ipFamilies is ["IPv4"]"#,
    );
}

#[test]
fn second_service_on_the_same_frontend_is_rejected() {
    // Services are visited in namespace/name order: `a-first` wins.
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: b-second, namespace: default}
spec:
  clusterIP: 10.96.0.34
  ports:
  - {name: http, port: 80}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: a-first, namespace: default}
spec:
  clusterIP: 10.96.0.34
  ports: [{name: web, port: 80, protocol: TCP}]
",
        "
        10.96.0.34:53/UDP default/b-second:dns -> (none)
        10.96.0.34:80/TCP default/a-first:web -> (none)
        rejected: Service default/b-second (from test.yaml): frontend 10.96.0.34:80/TCP is already used by Service default/a-first (ClusterIP wins over ClusterIP: ClusterIPs first, then the oldest Service)
        ",
    );
}

#[test]
fn same_cluster_ip_and_port_with_different_protocols_do_not_clash() {
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: t, namespace: default}
spec:
  clusterIP: 10.96.0.35
  ports: [{port: 53, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: u, namespace: default}
spec:
  clusterIP: 10.96.0.35
  ports: [{port: 53, protocol: UDP}]
",
        "
        10.96.0.35:53/TCP default/t -> (none)
        10.96.0.35:53/UDP default/u -> (none)
        ",
    );
}

#[test]
fn non_ipv4_endpoint_address_in_an_ipv4_slice_is_rejected() {
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.36
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-bad
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: ['fd00::11']
- addresses: [10.244.0.12]
",
        r#"
        10.96.0.36:80/TCP default/web:http -> 10.244.0.12:8080
        rejected: EndpointSlice default/web-bad (from test.yaml): endpoint address "fd00::11" is not an IPv4 address
        "#,
    );
}

#[test]
fn slice_port_without_a_number_is_rejected() {
    check_with_good(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.37
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-noport
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http}]
endpoints: [{addresses: [10.244.0.11]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-ok
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.12]}]
",
        r#"
        10.96.0.37:80/TCP default/web:http -> 10.244.0.12:8080
        rejected: EndpointSlice default/web-noport (from test.yaml): port "http" has no valid port number (None)
        "#,
    );
}

#[test]
fn rejections_carry_kind_object_origin_and_reason() {
    // The fields themselves, not only their rendering.
    let (_, rejections) = compute(
        r"
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: ns1}
spec:
  clusterIP: banana
",
    );
    assert_eq!(
        rejections,
        [Rejection {
            kind: "Service",
            object: crate::store::ObjectKey::new("ns1", "bad"),
            origin: ORIGIN.to_owned(),
            reason: r#"invalid clusterIP "banana""#.to_owned(),
            cause: Cause::Invalid,
        }]
    );
}

#[test]
fn empty_store_gives_nothing() {
    let (desired, rejections) = desired_state(&Store::default(), &NodeInfo::default());
    assert!(desired.frontends.is_empty());
    assert!(rejections.is_empty());
}

#[test]
fn backend_addr_and_frontend_display() {
    let (desired, _) = compute(GOOD);
    let (key, fe) = desired.frontends.iter().next().expect("one frontend");
    assert_eq!(key.to_string(), "10.96.0.1:443/TCP");
    assert_eq!(fe.display_name(), "default/good:https");
    assert_eq!(
        fe.backends,
        [BackendAddr {
            addr: "192.168.1.10".parse().unwrap(),
            port: 6443,
            local: false,
        }]
    );
    assert_eq!(key.protocol.number(), proxy_common::proto::TCP);
    assert_eq!(super::Protocol::from_number(proxy_common::proto::UDP), Some(super::Protocol::Udp));
    assert_eq!(super::Protocol::from_number(proxy_common::proto::SCTP), Some(super::Protocol::Sctp));
    assert_eq!(super::Protocol::from_number(1), None);
}

#[test]
fn non_ipv4_endpoint_in_a_slice_of_a_multi_port_service() {
    // The bad endpoint is skipped for every port, the good one used for
    // every port. (The rejection is currently reported once per matching
    // Service port, so only its content is checked here, not the count.)
    let (desired, rejections) = compute(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.38
  ports: [{name: http, port: 80}, {name: admin, port: 81}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-bad
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: admin, port: 8081}]
endpoints:
- addresses: [not-an-ip]
- addresses: [10.244.0.12]
",
    );
    assert_eq!(
        render(&desired, &[]),
        lines(
            "
            10.96.0.38:80/TCP default/web:http -> 10.244.0.12:8080
            10.96.0.38:81/TCP default/web:admin -> 10.244.0.12:8081
            "
        )
    );
    let all = render(&Desired::default(), &rejections);
    assert!(!rejections.is_empty(), "the bad address must be reported");
    for r in &rejections {
        assert_eq!(
            r.to_string(),
            r#"EndpointSlice default/web-bad (from test.yaml): endpoint address "not-an-ip" is not an IPv4 address"#,
            "all rejections:\n{all}"
        );
    }
}

#[test]
fn two_ports_of_one_service_on_the_same_port_and_protocol() {
    // The API server refuses such a Service (duplicate port/protocol), but a
    // manifest can hold one: the first port is kept, the second rejected.
    check(
        r"
apiVersion: v1
kind: Service
metadata: {name: dup, namespace: default}
spec:
  clusterIP: 10.96.0.39
  ports:
  - {name: a, port: 80}
  - {name: b, port: 80}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dup-1
  namespace: default
  labels: {kubernetes.io/service-name: dup}
addressType: IPv4
ports: [{name: a, port: 8080}, {name: b, port: 9090}]
endpoints: [{addresses: [10.244.0.11]}]
",
        "
        10.96.0.39:80/TCP default/dup:a -> 10.244.0.11:8080
        rejected: Service default/dup (from test.yaml): port \"b\": frontend 10.96.0.39:80/TCP is already used by another port of this Service
        ",
    );
}

// ------------------------------------------ terminating, traffic policy, topology

const SVC_ITP: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80}]
";

fn slice(endpoints: &str) -> String {
    format!(
        "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{endpoints}"
    )
}

const SVC: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
";

#[test]
fn serving_terminating_endpoints_are_used_only_when_none_is_ready() {
    let eps = "
- addresses: [10.244.0.11]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.0.12]
  conditions: {ready: false, serving: false, terminating: true}
";
    check(&format!("{SVC}{}", slice(eps)), "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080");
    let with_ready = format!("{eps}- addresses: [10.244.0.13]\n");
    check(&format!("{SVC}{}", slice(&with_ready)), "10.96.0.10:80/TCP default/web:http -> 10.244.0.13:8080");
}

#[test]
fn internal_traffic_policy_local_uses_this_nodes_endpoints_only() {
    let eps = "
- {addresses: [10.244.0.11], nodeName: node-a}
- {addresses: [10.244.0.12], nodeName: node-b}
- {addresses: [10.244.0.13], nodeName: node-a, conditions: {ready: false}}
";
    let yaml = format!("{SVC_ITP}{}", slice(eps));
    check_on(&node("node-a", None), &yaml, "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080");
    check_on(&node("node-b", None), &yaml, "10.96.0.10:80/TCP default/web:http -> 10.244.0.12:8080");
    // Endpoints exist, none here: dropped, not rejected (kube-proxy).
    check_on(&node("node-c", None), &yaml, "10.96.0.10:80/TCP default/web:http -> (dropped)");
}

#[test]
fn internal_traffic_policy_local_falls_back_to_local_terminating_endpoints() {
    let eps = "
- {addresses: [10.244.0.11], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.0.12], nodeName: node-b}
";
    check_on(&node("node-a", None), &format!("{SVC_ITP}{}", slice(eps)), "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080");
}

#[test]
fn internal_traffic_policy_local_without_any_endpoint_rejects() {
    check_on(&node("node-a", None), &format!("{SVC_ITP}{}", slice("").replace("endpoints:\n", "endpoints: []\n")), "10.96.0.10:80/TCP default/web:http -> (none)");
}

#[test]
fn zone_hints_narrow_to_this_zone_when_every_ready_endpoint_has_them() {
    let eps = "
- {addresses: [10.244.0.11], zone: a, hints: {forZones: [{name: a}]}}
- {addresses: [10.244.0.12], zone: b, hints: {forZones: [{name: b}]}}
- {addresses: [10.244.0.13], zone: a, hints: {forZones: [{name: a}]}}
";
    let yaml = format!("{SVC}{}", slice(eps));
    check_on(&node("n", Some("a")), &yaml, "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080,10.244.0.13:8080");
    check_on(&node("n", Some("b")), &yaml, "10.96.0.10:80/TCP default/web:http -> 10.244.0.12:8080");
    // No endpoint for this zone, or the zone unknown: all of them.
    let all = "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080,10.244.0.12:8080,10.244.0.13:8080";
    check_on(&node("n", Some("c")), &yaml, all);
    check_on(&node("n", None), &yaml, all);
}

#[test]
fn zone_hints_are_ignored_unless_every_ready_endpoint_has_them() {
    let eps = "
- {addresses: [10.244.0.11], hints: {forZones: [{name: a}]}}
- {addresses: [10.244.0.12]}
";
    check_on(
        &node("n", Some("a")),
        &format!("{SVC}{}", slice(eps)),
        "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080,10.244.0.12:8080",
    );
}

#[test]
fn prefer_same_node_uses_node_hints_then_zone_hints() {
    let svc = SVC.replace("  ports:", "  trafficDistribution: PreferSameNode\n  ports:");
    let eps = "
- {addresses: [10.244.0.11], nodeName: n1, hints: {forNodes: [{name: n1}], forZones: [{name: a}]}}
- {addresses: [10.244.0.12], nodeName: n2, hints: {forNodes: [{name: n2}], forZones: [{name: a}]}}
- {addresses: [10.244.0.13], nodeName: n3, hints: {forNodes: [{name: n3}], forZones: [{name: b}]}}
";
    let yaml = format!("{svc}{}", slice(eps));
    check_on(&node("n2", Some("a")), &yaml, "10.96.0.10:80/TCP default/web:http -> 10.244.0.12:8080");
    // A node with no endpoint of its own: its zone's.
    check_on(&node("n9", Some("a")), &yaml, "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080,10.244.0.12:8080");
    // Without PreferSameNode, node hints are not used.
    check_on(&node("n2", Some("a")), &format!("{SVC}{}", slice(eps)), "10.96.0.10:80/TCP default/web:http -> 10.244.0.11:8080,10.244.0.12:8080");
}

// ---------------------------------------------- NodePort, externalIPs, LoadBalancer

fn render_external(node: &NodeInfo, yaml: &str) -> String {
    let (desired, rejections) = desired_state(&store_from(yaml), node);
    let mut out = String::new();
    for (key, fe) in &desired.frontends {
        let backends: Vec<String> = fe.backends.iter().map(|b| format!("{b}{}", if b.local { "(local)" } else { "" })).collect();
        writeln!(
            out,
            "{key} {:?} policy={} snat={} drop={} -> {}",
            fe.kind,
            if fe.policy_local { "Local" } else { "Cluster" },
            fe.snat_remote,
            fe.drop_when_empty,
            backends.join(",")
        )
        .unwrap();
    }
    for r in rejections {
        writeln!(out, "rejected: {r}").unwrap();
    }
    out
}

const LB_SVC: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.7, fd00::7]
  externalTrafficPolicy: ETP
  ports: [{name: http, port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.50}, {ip: 203.0.113.51, ipMode: Proxy}, {hostname: lb.example}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
- {addresses: [10.244.2.11], nodeName: node-b}
";

fn node_a() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: None,
        nodeport_addresses: vec!["10.0.0.1".parse().unwrap(), "198.51.100.1".parse().unwrap()],
        ..NodeInfo::default()
    }
}

#[test]
fn load_balancer_service_gets_cluster_ip_node_ports_external_and_ingress_ips() {
    let got = render_external(&node_a(), &LB_SVC.replace("ETP", "Cluster"));
    let want = lines(
        "
        10.0.0.1:30080/TCP NodePort policy=Cluster snat=true drop=false -> 10.244.1.11:8080(local),10.244.2.11:8080
        10.96.0.10:80/TCP ClusterIp policy=Cluster snat=false drop=false -> 10.244.1.11:8080(local),10.244.2.11:8080
        198.51.100.1:30080/TCP NodePort policy=Cluster snat=true drop=false -> 10.244.1.11:8080(local),10.244.2.11:8080
        203.0.113.7:80/TCP ExternalIp policy=Cluster snat=true drop=false -> 10.244.1.11:8080(local),10.244.2.11:8080
        203.0.113.50:80/TCP LoadBalancer policy=Cluster snat=true drop=false -> 10.244.1.11:8080(local),10.244.2.11:8080
        rejected: Service default/web (from test.yaml): externalIP fd00::7 is IPv6, a family the Service has no clusterIP of (ipFamilies)
        ",
    );
    assert_eq!(got, want);
}

#[test]
fn external_traffic_policy_local_uses_local_endpoints_without_snat_and_drops_without_them() {
    let yaml = LB_SVC.replace("ETP", "Local");
    let got = render_external(&node_a(), &yaml);
    assert!(got.contains("198.51.100.1:30080/TCP NodePort policy=Local snat=false drop=false -> 10.244.1.11:8080(local)\n"), "{got}");
    assert!(got.contains("10.96.0.10:80/TCP ClusterIp policy=Cluster snat=false drop=false -> 10.244.1.11:8080(local),10.244.2.11:8080\n"), "{got}");
    let elsewhere = NodeInfo { name: "node-c".into(), ..node_a() };
    let got = render_external(&elsewhere, &yaml);
    assert!(got.contains("198.51.100.1:30080/TCP NodePort policy=Local snat=false drop=true -> \n"), "{got}");
    assert!(got.contains("203.0.113.50:80/TCP LoadBalancer policy=Local snat=false drop=true -> \n"), "{got}");
}

#[test]
fn cluster_ip_services_get_no_node_ports_and_bad_external_ips_are_rejected() {
    let yaml = LB_SVC.replace("type: LoadBalancer", "type: ClusterIP").replace("203.0.113.7, fd00::7", "banana").replace("ETP", "Cluster");
    let got = render_external(&node_a(), &yaml);
    assert!(!got.contains("NodePort"), "{got}");
    assert!(got.contains(r#"rejected: Service default/web (from test.yaml): invalid externalIP "banana""#), "{got}");
}

#[test]
fn the_same_node_port_in_two_services_is_rejected_for_the_second() {
    let two = format!(
        "{}---\n{}",
        LB_SVC.replace("ETP", "Cluster"),
        LB_SVC.replace("ETP", "Cluster").replace("name: web,", "name: web2,").replace("10.96.0.10", "10.96.0.11").replace("203.0.113.7, fd00::7", "203.0.113.8").replace("203.0.113.50", "203.0.113.60")
    );
    let got = render_external(&node_a(), &two);
    assert!(got.contains("rejected: Service default/web2 (from test.yaml): frontend 10.0.0.1:30080/TCP is already used by Service default/web (NodePort wins over NodePort"), "{got}");
}

#[test]
fn node_ports_are_also_served_on_loopback_for_the_socket_path() {
    let node = NodeInfo { loopback_nodeports: true, ..node_a() };
    let got = render_external(&node, &LB_SVC.replace("ETP", "Cluster"));
    assert!(got.contains("127.0.0.1:30080/TCP NodePort policy=Cluster snat=true drop=false -> "), "{got}");
    let got = render_external(&node_a(), &LB_SVC.replace("ETP", "Cluster"));
    assert!(!got.contains("127.0.0.1"), "no loopback NodePorts without the socket path: {got}");
}

#[test]
fn session_affinity_client_ip_sets_the_timeout_and_one_group_per_service_port() {
    let with = |extra: &str| {
        let yaml = LB_SVC.replace("ETP", "Cluster").replace("  ports: [{name: http, port: 80, nodePort: 30080}]", &format!("{extra}  ports: [{{name: http, port: 80, nodePort: 30080}}, {{name: dns, port: 53, nodePort: 30053, protocol: UDP}}]"));
        let (desired, rejections) = desired_state(&store_from(&yaml), &node_a());
        // (Only the IPv6 externalIP of this IPv4-only Service.)
        assert!(rejections.iter().all(|r| r.reason.contains("fd00::7")), "{rejections:?}");
        desired
    };
    let d = with("  sessionAffinity: ClientIP\n");
    let http: Vec<_> = d.frontends.iter().filter(|(k, _)| k.protocol == super::Protocol::Tcp).map(|(_, f)| f).collect();
    assert!(http.len() >= 4, "ClusterIP, node ports, externalIP, LB IP");
    // kube-proxy's default timeout, and every frontend of the port shares the group.
    assert!(http.iter().all(|f| f.affinity_timeout_s == 10_800), "{http:?}");
    assert!(http.iter().all(|f| f.affinity_group == http[0].affinity_group && f.affinity_group != 0));
    let dns = d.frontends.values().find(|f| &*f.port_name == "dns").expect("dns frontend");
    assert_ne!(dns.affinity_group, http[0].affinity_group, "another Service port, another group");
    let d = with("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n");
    assert!(d.frontends.values().all(|f| f.affinity_timeout_s == 60));
    let d = with("  sessionAffinity: None\n");
    assert!(d.frontends.values().all(|f| f.affinity_timeout_s == 0));
    // Stable across runs (restarts): a pure function of the Service port.
    assert_eq!(
        super::affinity_group(&crate::store::ObjectKey::new("default", "web"), "http", super::Protocol::Tcp),
        http[0].affinity_group
    );
}

/// CVE-2020-8554, sharper: a Service in another namespace (sorting first)
/// claims `kube-dns`'s `ClusterIP` as an externalIP. ClusterIPs always win; the
/// newcomer is refused by name.
#[test]
fn an_external_ip_cannot_hijack_a_cluster_ip_whatever_the_names() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: evil, namespace: app, creationTimestamp: "2023-01-01T00:00:00Z"}
spec:
  clusterIP: 10.96.0.99
  externalIPs: [10.96.0.10]
  ports: [{name: dns, port: 53, protocol: UDP}]
"#;
    let got = render_external(&NodeInfo::default(), yaml);
    assert!(got.contains("10.96.0.10:53/UDP ClusterIp"), "kube-dns keeps its ClusterIP: {got}");
    assert!(
        got.contains("rejected: Service app/evil (from test.yaml): frontend 10.96.0.10:53/UDP is already used by Service kube-system/kube-dns (ClusterIP wins over externalIP"),
        "{got}"
    );
}

/// Among the rest, the oldest Service keeps a contested address, whatever
/// the names sort like; without timestamps, names decide (as before).
#[test]
fn the_oldest_service_keeps_a_contested_external_ip() {
    let svc = |name: &str, created: &str, vip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default, creationTimestamp: \"{created}\"}}\nspec:\n  clusterIP: {vip}\n  externalIPs: [203.0.113.9]\n  ports: [{{name: http, port: 80}}]\n---\n"
        )
    };
    let yaml = svc("a-new", "2025-06-01T00:00:00Z", "10.96.0.20") + &svc("z-old", "2020-01-01T00:00:00Z", "10.96.0.21");
    let (desired, rejections) = desired_state(&store_from(&yaml), &NodeInfo::default());
    let owner = desired.frontends.iter().find(|(k, _)| k.addr.to_string() == "203.0.113.9").map(|(_, f)| f.service.to_string());
    assert_eq!(owner.as_deref(), Some("default/z-old"), "the oldest Service keeps it");
    assert!(rejections.iter().any(|r| r.object.to_string() == "default/a-new" && r.reason.contains("default/z-old")), "{rejections:?}");
}

#[test]
fn external_ips_in_the_service_cidr_on_a_node_address_or_outside_the_allowed_cidrs_are_refused() {
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  externalIPs: [10.96.5.5, 10.0.0.1, 203.0.113.7, 198.18.0.1]
  ports: [{name: http, port: 80}]
";
    let node = NodeInfo {
        service_cidrs: super::parse_cidrs("10.96.0.0/12").unwrap(),
        external_ip_cidrs: Some(super::parse_cidrs("203.0.113.0/24, 10.0.0.0/8").unwrap()),
        ..node_a()
    };
    let got = render_external(&node, yaml);
    assert!(got.contains("203.0.113.7:80/TCP ExternalIp"), "{got}");
    assert!(got.contains("externalIP 10.96.5.5 refused: it is inside the Service CIDR"), "{got}");
    assert!(got.contains("externalIP 10.0.0.1 refused: it is an address of this node"), "{got}");
    assert!(got.contains("externalIP 198.18.0.1 refused: it is outside --external-ip-cidrs"), "{got}");
    // Default: all allowed, as kube-proxy.
    let got = render_external(&node_a(), yaml);
    assert!(got.contains("198.18.0.1:80/TCP ExternalIp"), "{got}");
}

/// Every refusal carries a stable cause (the Kubernetes Event's `reason`),
/// and a lost claim names the Service that keeps the frontend, in the cause
/// and in the text, so one line (or Event) names both Services.
#[test]
fn refusals_carry_a_stable_cause_and_a_conflict_names_the_winner() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: old, namespace: default, creationTimestamp: "2020-01-01T00:00:00Z"}
spec:
  clusterIP: 10.96.0.20
  externalIPs: [203.0.113.9]
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: young, namespace: default, creationTimestamp: "2025-01-01T00:00:00Z"}
spec:
  clusterIP: 10.96.0.21
  externalIPs: [203.0.113.9, 10.96.7.7]
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.22
  loadBalancerSourceRanges: [banana]
  ports: [{name: sig, port: 3868, protocol: SCTP}, {name: dns, port: 53, protocol: ICMP}]
"#;
    let node = NodeInfo { service_cidrs: super::parse_cidrs("10.96.0.0/12").unwrap(), ..NodeInfo::default() };
    let (_, rejections) = desired_state(&store_from(yaml), &node);
    let of = |name: &str| -> Vec<(&'static str, &str)> {
        rejections.iter().filter(|r| &*r.object.name == name).map(|r| (r.cause.code(), r.reason.as_str())).collect()
    };
    let young = of("young");
    assert_eq!(young.len(), 2, "{young:?}");
    assert!(young.iter().any(|(c, t)| *c == "ExternalIPRefused" && t.contains("10.96.7.7")), "{young:?}");
    let conflict = rejections.iter().find(|r| &*r.object.name == "young" && r.cause.code() == "FrontendConflict").expect("a conflict");
    assert_eq!(conflict.cause, Cause::FrontendConflict { owner: crate::store::ObjectKey::new("default", "old") });
    let text = conflict.to_string();
    assert!(text.contains("default/young") && text.contains("default/old"), "names both Services: {text}");
    let lb: Vec<&str> = of("lb").into_iter().map(|(c, _)| c).collect();
    assert_eq!(lb, ["InvalidSourceRange", "Invalid"], "{:?}", of("lb"));
    assert!(of("old").is_empty());
}

/// `loadBalancerSourceRanges` per family: each LB ingress IP gets the
/// ranges of its own family (normalised) plus the node's addresses of that
/// family; a range of the other family never applies. A Service whose
/// ranges are all IPv4 serves its IPv6 LB IP to the node alone (closed,
/// never open); a range that does not parse closes both.
#[test]
fn load_balancer_source_ranges_apply_per_family_with_the_nodes_own_addresses() {
    let yaml = |ranges: &str| {
        format!(
            r"
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, 'fd00:96::30']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  loadBalancerSourceRanges: [{ranges}]
  ports: [{{name: http, port: 80, nodePort: 30080}}]
status:
  loadBalancer:
    ingress: [{{ip: 203.0.113.50}}, {{ip: '2001:db8:113::50'}}]
"
        )
    };
    let node = NodeInfo { nodeport_addresses: vec!["198.51.100.1".parse().unwrap(), "2001:db8:100::1".parse().unwrap()], ..node_a() };
    let ranges_of = |yaml: &str| -> (Vec<String>, Vec<Option<Vec<String>>>) {
        let (desired, rejections) = desired_state(&store_from(yaml), &node);
        let mut lbs = Vec::new();
        for (key, fe) in &desired.frontends {
            let shown = fe.source_ranges.as_ref().map(|r| r.iter().map(|(a, l)| format!("{a}/{l}")).collect::<Vec<_>>());
            if fe.kind == FrontendKind::LoadBalancer {
                lbs.push((key.addr, shown));
            } else {
                assert_eq!(shown, None, "only LB IPs are restricted: {key}");
            }
        }
        lbs.sort();
        (rejections.iter().map(|r| r.cause.code().to_owned()).collect(), lbs.into_iter().map(|(_, r)| r).collect())
    };
    let (rej, lbs) = ranges_of(&yaml("'192.0.2.7/24', '2001:db8:5::9/64'"));
    assert!(rej.is_empty(), "an IPv6 LB IP with ranges is served: {rej:?}");
    let s = |v: &[&str]| Some(v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>());
    assert_eq!(lbs, [s(&["192.0.2.0/24", "198.51.100.1/32"]), s(&["2001:db8:5::/64", "2001:db8:100::1/128"])]);

    let (rej, lbs) = ranges_of(&yaml("'192.0.2.0/24'"));
    assert!(rej.is_empty(), "{rej:?}");
    assert_eq!(lbs, [s(&["192.0.2.0/24", "198.51.100.1/32"]), s(&["2001:db8:100::1/128"])], "no IPv6 range: the node alone");

    let (rej, lbs) = ranges_of(&yaml("'2001:db8:5::/64', '2001:db8:6::/200'"));
    assert_eq!(rej, ["InvalidSourceRange"]);
    assert_eq!(lbs, [s(&["198.51.100.1/32"]), s(&["2001:db8:100::1/128"])], "an invalid range closes both families");
}
