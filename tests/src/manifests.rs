//! Writing Service and `EndpointSlice` manifests the way users have them.
use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

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
