//! Creating many objects in one call (the benchmark's initial load of tens
//! of thousands of Services): each object is created as [`Store::create`]
//! creates it for the test (`Writer::Test`), but a `ClusterIP` Service with
//! a given cluster IP and no node ports is checked against a set of the
//! cluster IPs in use built once, instead of `allocate`'s scan of every
//! other Service — which makes loading N Services one by one quadratic.
//! Every other object goes through [`Store::create`] unchanged.
use std::collections::HashSet;

use serde_json::{Value, json};

use super::{ApiError, EventType, FieldError, Kind, Store, Writer, meta, meta_mut, resources, rfc3339};

/// A `ClusterIP` Service with a given cluster IP and no `nodePort` on any
/// port: what the fast path creates (its cluster IP, or `None`).
fn plain_cluster_ip(kind: Kind, obj: &Value) -> Option<String> {
    if kind != Kind::Service || obj.pointer("/spec/type").and_then(Value::as_str).is_some_and(|t| t != "ClusterIP") {
        return None;
    }
    let ports = obj.pointer("/spec/ports").and_then(Value::as_array);
    if ports.is_some_and(|p| p.iter().any(|p| p.get("nodePort").is_some())) {
        return None;
    }
    obj.pointer("/spec/clusterIP").and_then(Value::as_str).filter(|ip| !ip.is_empty() && *ip != "None").map(str::to_owned)
}

impl Store {
    /// Creates every `(kind, namespace, object)` in order (stopping at the
    /// first error); returns how many were created.
    pub(crate) fn create_many(&mut self, objs: Vec<(Kind, String, Value)>) -> Result<usize, ApiError> {
        let mut used: HashSet<String> = self
            .current(Kind::Service, None)
            .filter_map(|s| s.pointer("/spec/clusterIP").and_then(Value::as_str))
            .map(str::to_owned)
            .collect();
        let mut created = 0;
        for (kind, ns, obj) in objs {
            let obj = match plain_cluster_ip(kind, &obj) {
                Some(ip) => {
                    let o = self.create_cluster_ip_service(&ns, obj, &ip, &used)?;
                    used.insert(ip);
                    o
                }
                None => self.create(kind, &ns, obj, Writer::Test)?,
            };
            if let Some(ip) = obj.pointer("/spec/clusterIP").and_then(Value::as_str).filter(|_| kind == Kind::Service) {
                used.insert(ip.to_owned());
            }
            created += 1;
        }
        Ok(created)
    }

    /// [`Store::create`] of a `ClusterIP` Service with cluster IP `ip` (not
    /// in `used`), setting what `allocate` sets for one.
    fn create_cluster_ip_service(&mut self, ns: &str, mut obj: Value, ip: &str, used: &HashSet<String>) -> Result<Value, ApiError> {
        let kind = Kind::Service;
        Self::type_meta(kind, &mut obj)?;
        Self::namespace(kind, ns, &mut obj)?;
        let name = meta(&obj, "name").unwrap_or_default();
        let uid = self.uid();
        let now = rfc3339(self.now());
        let m = meta_mut(&mut obj);
        m.insert("uid".into(), json!(uid));
        m.insert("creationTimestamp".into(), json!(now));
        for f in ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"] {
            m.remove(f);
        }
        resources::apply_defaults(kind, &mut obj);
        let mut errs = resources::validate(kind, &obj);
        if used.contains(ip) {
            errs.push(FieldError::invalid(
                "spec.clusterIPs",
                &format!("[]string{{\"{ip}\"}}"),
                &format!("failed to allocate IP {ip}: provided IP is already allocated"),
            ));
        }
        if !errs.is_empty() {
            return Err(ApiError::invalid(kind, &name, &errs));
        }
        if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
            spec.entry("ipFamilies").or_insert_with(|| json!([if ip.contains(':') { "IPv6" } else { "IPv4" }]));
            spec.entry("ipFamilyPolicy").or_insert_with(|| json!("SingleStack"));
        }
        let key = (kind, ns.to_owned(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind, &name));
        }
        Ok(self.commit(key, EventType::Added, obj, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> (Kind, String, Value) {
        (Kind::Service, "default".into(), json!({"metadata": {"name": name}, "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}))
    }

    #[test]
    fn many_objects_are_created_as_create_creates_them() {
        let mut s = Store::new(10);
        let slice = json!({"metadata": {"name": "a-1", "labels": {"kubernetes.io/service-name": "a"}}, "addressType": "IPv4", "endpoints": []});
        let node_port = json!({"metadata": {"name": "np"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        let n = s
            .create_many(vec![
                svc("a", "10.96.0.10"),
                svc("b", "10.96.0.11"),
                (Kind::EndpointSlice, "default".into(), slice),
                (Kind::Service, "default".into(), node_port),
            ])
            .expect("created");
        assert_eq!(n, 4);
        let a = s.get(Kind::Service, "default", "a").expect("a");
        assert_eq!(a["spec"]["clusterIPs"], json!(["10.96.0.10"]));
        assert_eq!(a["spec"]["ipFamilies"], json!(["IPv4"]));
        assert_eq!(a["spec"]["ports"][0]["protocol"], "TCP", "defaults applied");
        assert!(meta(a, "uid").is_some() && meta(a, "creationTimestamp").is_some() && meta(a, "resourceVersion").is_some());
        assert_eq!(s.get(Kind::EndpointSlice, "default", "a-1").expect("slice")["metadata"]["generation"], 1);
        let np = s.get(Kind::Service, "default", "np").expect("np");
        assert!(np["spec"]["ports"][0]["nodePort"].as_u64().is_some_and(|p| (30000..=32767).contains(&p)), "the slow path allocates");
        // A taken cluster IP, whether stored before or earlier in the batch.
        assert!(s.create_many(vec![svc("c", "10.96.0.10")]).is_err());
        assert!(s.create_many(vec![svc("d", "10.96.0.20"), svc("e", "10.96.0.20")]).is_err());
        assert!(s.get(Kind::Service, "default", "d").is_some() && s.get(Kind::Service, "default", "e").is_none(), "stops at the first error");
        assert!(s.create_many(vec![svc("a", "10.96.0.30")]).is_err(), "already exists");
    }
}
