//! Writing Service and `EndpointSlice` manifests the way users have them.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

#[derive(Clone, Debug)]
pub struct Port<'a> {
    pub name: &'a str,
    pub port: u16,
    pub target: u16,
    pub protocol: &'a str,
}

/// A `ClusterIP` Service with one `EndpointSlice` holding `endpoints`
/// (address, ready) as multi-document YAML.
#[must_use]
pub fn service_yaml(name: &str, vip: Ipv4Addr, ports: &[Port<'_>], endpoints: &[(Ipv4Addr, bool)]) -> String {
    let mut y = String::new();
    let _ = writeln!(y, "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: ClusterIP\n  clusterIP: {vip}\n  ports:");
    for p in ports {
        let _ = writeln!(y, "  - name: {}\n    port: {}\n    targetPort: {}\n    protocol: {}", p.name, p.port, p.target, p.protocol);
    }
    let _ = writeln!(
        y,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abcde\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:"
    );
    for p in ports {
        let _ = writeln!(y, "- name: {}\n  port: {}\n  protocol: {}", p.name, p.target, p.protocol);
    }
    if endpoints.is_empty() {
        y.push_str("endpoints: []\n");
    } else {
        y.push_str("endpoints:\n");
        for (ip, ready) in endpoints {
            let _ = writeln!(y, "- addresses: [\"{ip}\"]\n  conditions:\n    ready: {ready}");
        }
    }
    y
}

/// Writes `file` in `dir` atomically (temp file + rename), so the agent
/// never reads half a file.
pub fn write_atomic(dir: &Path, file: &str, content: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, content).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, dir.join(file)).unwrap_or_else(|e| panic!("rename into {file}: {e}"));
}

/// The two-node tests' Service `web` of `ty` (`NodePort` or `LoadBalancer`):
/// http 80→8080 (nodePort 30080) and dns 53→5353/UDP (nodePort 30053),
/// `spec_extra` (whole `  key: value` lines) after the clusterIP, the
/// load-balancer ingress `lb_ip` in its status, and its `EndpointSlice` of
/// `endpoints` (address, node).
#[must_use]
pub fn web_yaml(ty: &str, vip: Ipv4Addr, spec_extra: &str, lb_ip: Option<Ipv4Addr>, endpoints: &[(Ipv4Addr, &str)]) -> String {
    let y = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: {ty}
  clusterIP: {vip}
{spec_extra}  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}}
"
    );
    let endpoints: Vec<String> = endpoints.iter().map(|(ip, node)| format!("- {{addresses: [\"{ip}\"], nodeName: {node}}}")).collect();
    web_tail(
        y,
        lb_ip.map(|ip| ip.to_string()),
        "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
",
        &endpoints,
    )
}

/// The rest of [`web_yaml`] / [`web6_yaml`] after the Service's spec: the
/// load-balancer ingress `lb_ip` (quoted), the slice's `header` and its
/// endpoint lines.
fn web_tail(mut y: String, lb_ip: Option<String>, header: &str, endpoints: &[String]) -> String {
    if let Some(ip) = lb_ip {
        let _ = writeln!(y, "status:\n  loadBalancer:\n    ingress: [{{ip: '{ip}'}}]");
    }
    y.push_str(header);
    if endpoints.is_empty() {
        y.push_str("endpoints: []\n");
    } else {
        y.push_str("endpoints:\n");
        for e in endpoints {
            let _ = writeln!(y, "{e}");
        }
    }
    y
}

/// [`web_yaml`] over IPv6: an IPv6-only (`ipFamilies: [IPv6]`,
/// `SingleStack`) Service `web` of `ty` with the same ports and node ports,
/// `spec_extra` after `ipFamilyPolicy`, the load-balancer ingress `lb_ip`,
/// and an `addressType: IPv6` slice of `endpoints` (address, node, more
/// fields of the endpoint written after `nodeName`, e.g. `, conditions:
/// {...}`).
#[must_use]
pub fn web6_yaml(ty: &str, vip: Ipv6Addr, spec_extra: &str, lb_ip: Option<Ipv6Addr>, endpoints: &[(Ipv6Addr, &str, &str)]) -> String {
    let y = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: {ty}
  clusterIP: '{vip}'
  clusterIPs: ['{vip}']
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
{spec_extra}  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}}
"
    );
    let endpoints: Vec<String> = endpoints.iter().map(|(ip, node, extra)| format!("- {{addresses: ['{ip}'], nodeName: {node}{extra}}}")).collect();
    web_tail(
        y,
        lb_ip.map(|ip| ip.to_string()),
        "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
",
        &endpoints,
    )
}
