//! The resources served, their discovery documents, the defaults and
//! validation the real server applies to them, and their server-side Table
//! columns (the ones `kubectl get` prints, from `pkg/printers/internalversion`).
use serde_json::{Map, Value, json};

use super::status::FieldError;

/// A served resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` `Service` (namespaced).
    Service,
    /// `discovery.k8s.io/v1` `EndpointSlice` (namespaced).
    EndpointSlice,
    /// `v1` `Node` (cluster-scoped).
    Node,
    /// `events.k8s.io/v1` `Event` (namespaced).
    Event,
}

/// The API groups served under `/apis`, in the order `/apis` lists them.
pub const GROUPS: [&str; 2] = ["discovery.k8s.io", "events.k8s.io"];

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Service, Kind::EndpointSlice, Kind::Node, Kind::Event];

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Event => "Event",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::Event => "events",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::EndpointSlice => "endpointslice",
            Kind::Node => "node",
            Kind::Event => "event",
        }
    }

    pub fn group(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::Event => "events.k8s.io",
            Kind::Service | Kind::Node => "",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Event => "events.k8s.io/v1",
            Kind::Service | Kind::Node => "v1",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Service => &["svc"],
            Kind::Node => &["no"],
            Kind::Event => &["ev"],
            Kind::EndpointSlice => &[],
        }
    }

    /// Whether the resource has a `/status` subresource whose status the
    /// main resource's update does not change.
    pub fn has_status(self) -> bool {
        !matches!(self, Kind::EndpointSlice | Kind::Event)
    }

    /// `services`, `endpointslices.discovery.k8s.io`: how errors name the resource.
    pub fn qualified_plural(self) -> String {
        if self.group().is_empty() {
            self.plural().to_owned()
        } else {
            format!("{}.{}", self.plural(), self.group())
        }
    }

    pub fn list_kind(self) -> String {
        format!("{}List", self.kind())
    }

    /// By kind, plural, singular, short name or `plural.group`, case-insensitively.
    pub fn from_name(name: &str) -> Option<Kind> {
        let n = name.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|k| {
            n == k.kind().to_ascii_lowercase()
                || n == k.plural()
                || n == k.singular()
                || n == k.qualified_plural()
                || k.short_names().contains(&n.as_str())
        })
    }

    /// The resource served at `/api/v1/...` or `/apis/<group>/v1/...` under this plural.
    pub fn from_path(group_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.plural() == plural && k.api_version() == group_version)
    }

    /// Field labels the real server accepts in a fieldSelector for this resource.
    pub fn field_labels(self) -> &'static [&'static str] {
        match self {
            Kind::Service => &["metadata.name", "metadata.namespace", "spec.clusterIP", "spec.type"],
            Kind::Node => &["metadata.name", "spec.unschedulable"],
            Kind::EndpointSlice => &["metadata.name", "metadata.namespace"],
            // `events.k8s.io/v1` spellings (the registry's `involvedObject.*`
            // and `reportingComponent` are converted from these).
            Kind::Event => &[
                "metadata.name",
                "metadata.namespace",
                "reason",
                "reportingController",
                "type",
                "regarding.apiVersion",
                "regarding.fieldPath",
                "regarding.kind",
                "regarding.name",
                "regarding.namespace",
                "regarding.resourceVersion",
                "regarding.uid",
            ],
        }
    }

    /// The value of a field label on `obj` (`fields.Set` of the real registry).
    pub fn field_value(self, obj: &Value, label: &str) -> String {
        let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("").to_owned();
        match label {
            "metadata.name" => s("/metadata/name"),
            "metadata.namespace" => s("/metadata/namespace"),
            "spec.clusterIP" => s("/spec/clusterIP"),
            "spec.type" => s("/spec/type"),
            "reason" | "reportingController" | "type" => s(&format!("/{label}")),
            l if l.starts_with("regarding.") => s(&format!("/{}", l.replace('.', "/"))),
            "spec.unschedulable" => obj
                .pointer("/spec/unschedulable")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                .to_string(),
            _ => String::new(),
        }
    }
}

const VERBS: [&str; 8] = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

/// `GET /version`
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-08-27T00:00:00Z",
        "goVersion": "go1.24.6",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `GET /api`
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": server_address }],
    })
}

fn group_entry(group: &str) -> Value {
    let gv = json!({ "groupVersion": format!("{group}/v1"), "version": "v1" });
    json!({ "name": group, "versions": [gv.clone()], "preferredVersion": gv })
}

/// `GET /apis`
pub fn api_group_list() -> Value {
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": GROUPS.map(group_entry) })
}

/// `GET /apis/<group>` for one of [`GROUPS`].
pub fn api_group(group: &str) -> Value {
    let mut g = group_entry(group);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    g
}

/// `GET /api/v1`, `GET /apis/<group>/v1`
pub fn resource_list(group_version: &str) -> Value {
    let mut resources = Vec::new();
    for k in Kind::ALL.into_iter().filter(|k| k.api_version() == group_version) {
        let mut r = json!({
            "name": k.plural(),
            "singularName": k.singular(),
            "namespaced": k.namespaced(),
            "kind": k.kind(),
            "verbs": VERBS,
        });
        if !k.short_names().is_empty() {
            r["shortNames"] = json!(k.short_names());
        }
        if k == Kind::Service {
            r["categories"] = json!(["all"]);
        }
        resources.push(r);
        if k.has_status() {
            resources.push(json!({
                "name": format!("{}/status", k.plural()),
                "singularName": "",
                "namespaced": k.namespaced(),
                "kind": k.kind(),
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources })
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    v[key].as_object_mut().expect("object")
}

/// Defaults of the versioned API (`SetDefaults_*` in `pkg/apis/*/v1`), except
/// the allocations (cluster IPs, node ports) that the store makes.
pub fn apply_defaults(kind: Kind, obj: &mut Value) {
    match kind {
        Kind::Service => {
            let spec = obj_mut(obj, "spec");
            let ty = spec.entry("type").or_insert_with(|| json!("ClusterIP")).as_str().unwrap_or("").to_owned();
            spec.entry("sessionAffinity").or_insert_with(|| json!("None"));
            if spec.get("sessionAffinity").and_then(Value::as_str) == Some("ClientIP") {
                spec.entry("sessionAffinityConfig")
                    .or_insert_with(|| json!({ "clientIP": { "timeoutSeconds": 10800 } }));
            }
            if ty != "ExternalName" {
                spec.entry("internalTrafficPolicy").or_insert_with(|| json!("Cluster"));
            }
            if ty == "NodePort" || ty == "LoadBalancer" {
                spec.entry("externalTrafficPolicy").or_insert_with(|| json!("Cluster"));
            }
            if ty == "LoadBalancer" {
                spec.entry("allocateLoadBalancerNodePorts").or_insert_with(|| json!(true));
            }
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    p.entry("protocol").or_insert_with(|| json!("TCP"));
                    if let Some(port) = p.get("port").cloned() {
                        p.entry("targetPort").or_insert(port);
                    }
                }
            }
            if !obj.get("status").is_some_and(Value::is_object) {
                obj["status"] = json!({ "loadBalancer": {} });
            }
        }
        Kind::EndpointSlice => {
            if let Some(ports) = obj.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    p.entry("protocol").or_insert_with(|| json!("TCP"));
                    p.entry("name").or_insert_with(|| json!(""));
                }
            }
        }
        Kind::Node | Kind::Event => {}
    }
}

/// DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// DNS-1123 subdomain: dot-separated labels, at most 253.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// DNS-1035 label: a DNS-1123 label starting with a letter (Service names).
fn is_dns1035_label(s: &str) -> bool {
    is_dns_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// A qualified label key (`[prefix/]name`) and label value check.
pub fn is_label_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(is_dns_subdomain) && is_label_value(name) && !name.is_empty()
}

pub fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && v.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

fn validate_meta(kind: Kind, obj: &Value, errs: &mut Vec<FieldError>) {
    let name = str_at(obj, "/metadata/name").unwrap_or("");
    if name.is_empty() {
        errs.push(FieldError::required("metadata.name", "name or generateName is required"));
    } else {
        let (ok, what) = match kind {
            Kind::Service => (
                is_dns1035_label(name),
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')",
            ),
            Kind::EndpointSlice | Kind::Node | Kind::Event => (
                is_dns_subdomain(name),
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
            ),
        };
        if !ok {
            errs.push(FieldError::invalid("metadata.name", name, what));
        }
    }
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if !is_label_key(k) {
                errs.push(FieldError::invalid("metadata.labels", k, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
            }
            match v.as_str() {
                Some(s) if is_label_value(s) => {}
                _ => errs.push(FieldError::invalid(
                    "metadata.labels",
                    &value_text(v),
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                )),
            }
        }
    }
}

fn value_text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn validate_port(field: &str, v: Option<&Value>, required: bool, errs: &mut Vec<FieldError>) {
    match v {
        None if !required => {}
        None => errs.push(FieldError::required(field, "")),
        Some(p) => {
            if !p.as_u64().is_some_and(|n| (1..=65535).contains(&n)) {
                errs.push(FieldError::invalid(field, &value_text(p), "must be between 1 and 65535, inclusive"));
            }
        }
    }
}

fn validate_protocol(field: &str, v: Option<&Value>, errs: &mut Vec<FieldError>) {
    if let Some(p) = v {
        let s = p.as_str().unwrap_or("");
        if !["TCP", "UDP", "SCTP"].contains(&s) {
            errs.push(FieldError::not_supported(field, &value_text(p), &["SCTP", "TCP", "UDP"]));
        }
    }
}

/// The subset of the real validation that clients can trip over in tests
/// (`pkg/apis/*/validation`): names, labels, ports, protocols, required fields.
pub fn validate(kind: Kind, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    validate_meta(kind, obj, &mut errs);
    match kind {
        Kind::Service => validate_service(obj, &mut errs),
        Kind::EndpointSlice => validate_endpoint_slice(obj, &mut errs),
        Kind::Event => validate_event(obj, &mut errs),
        Kind::Node => {}
    }
    errs
}

/// What an update may not change (`ValidateUpdate` of the registry): for an
/// `events.k8s.io/v1` Event everything but the series (and metadata).
pub fn validate_update(kind: Kind, old: &Value, new: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if kind == Kind::Event {
        let immutable = [
            "regarding", "related", "reason", "note", "action", "reportingController", "reportingInstance", "eventTime", "type",
        ];
        for f in immutable {
            if old.get(f) != new.get(f) {
                let v = new.get(f).map(value_text).unwrap_or_default();
                errs.push(FieldError::invalid(f, &v, "field is immutable"));
            }
        }
    }
    errs
}

fn validate_service(obj: &Value, errs: &mut Vec<FieldError>) {
    let ty = str_at(obj, "/spec/type").unwrap_or("ClusterIP");
    let supported = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
    if !supported.contains(&ty) {
        errs.push(FieldError::not_supported("spec.type", ty, &supported));
    }
    let headless = str_at(obj, "/spec/clusterIP") == Some("None");
    let ports = obj.pointer("/spec/ports").and_then(Value::as_array);
    if ports.is_none_or(Vec::is_empty) && ty != "ExternalName" && !headless {
        errs.push(FieldError::required("spec.ports", ""));
    }
    if ty == "ExternalName" && str_at(obj, "/spec/externalName").unwrap_or("").is_empty() {
        errs.push(FieldError::required("spec.externalName", ""));
    }
    let mut names = Vec::new();
    let many = ports.is_some_and(|p| p.len() > 1);
    for (i, p) in ports.into_iter().flatten().enumerate() {
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        if many && name.is_empty() {
            errs.push(FieldError::required(&format!("spec.ports[{i}].name"), ""));
        } else if !name.is_empty() && names.contains(&name) {
            errs.push(FieldError::duplicate(&format!("spec.ports[{i}].name"), name));
        }
        names.push(name);
        validate_port(&format!("spec.ports[{i}].port"), p.get("port"), true, errs);
        validate_protocol(&format!("spec.ports[{i}].protocol"), p.get("protocol"), errs);
        if let Some(np) = p.get("nodePort").filter(|v| v.as_u64() != Some(0)) {
            validate_port(&format!("spec.ports[{i}].nodePort"), Some(np), false, errs);
        }
    }
    if let Some(ip) = str_at(obj, "/spec/clusterIP")
        && !ip.is_empty()
        && ip != "None"
        && ip.parse::<std::net::IpAddr>().is_err()
    {
        errs.push(FieldError::invalid("spec.clusterIPs[0]", ip, "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"));
    }
}

fn validate_endpoint_slice(obj: &Value, errs: &mut Vec<FieldError>) {
    let at = str_at(obj, "/addressType").unwrap_or("");
    let supported = ["FQDN", "IPv4", "IPv6"];
    if at.is_empty() {
        errs.push(FieldError::required("addressType", ""));
    } else if !supported.contains(&at) {
        errs.push(FieldError::not_supported("addressType", at, &supported));
    }
    for (i, e) in obj.get("endpoints").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let addrs = e.get("addresses").and_then(Value::as_array);
        match addrs.map(Vec::len) {
            None | Some(0) => errs.push(FieldError::required(&format!("endpoints[{i}].addresses"), "must contain at least 1 address")),
            Some(n) if n > 100 => errs.push(FieldError::invalid(&format!("endpoints[{i}].addresses"), &n.to_string(), "must contain at most 100 addresses")),
            Some(_) => {}
        }
        for (j, a) in addrs.into_iter().flatten().enumerate() {
            let s = a.as_str().unwrap_or("");
            let ok = match at {
                "IPv4" => s.parse::<std::net::Ipv4Addr>().is_ok(),
                "IPv6" => s.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => !s.is_empty(),
            };
            if !ok {
                let what = if at == "IPv6" { "must be a valid IPv6 address" } else { "must be a valid IPv4 address" };
                errs.push(FieldError::invalid(&format!("endpoints[{i}].addresses[{j}]"), s, what));
            }
        }
    }
    for (i, p) in obj.get("ports").and_then(Value::as_array).into_iter().flatten().enumerate() {
        validate_port(&format!("ports[{i}].port"), p.get("port"), false, errs);
        validate_protocol(&format!("ports[{i}].protocol"), p.get("protocol"), errs);
    }
}

/// `ValidateEventCreate` of the real server for `events.k8s.io/v1` (the
/// strict validation of the new API plus the legacy one every Event passes).
fn validate_event(obj: &Value, errs: &mut Vec<FieldError>) {
    let s = |f: &str| str_at(obj, &format!("/{f}")).unwrap_or("");
    if s("eventTime").is_empty() {
        errs.push(FieldError::required("eventTime", ""));
    } else if s("eventTime").parse::<jiff::Timestamp>().is_err() {
        errs.push(FieldError::invalid("eventTime", s("eventTime"), "must be an RFC 3339 time"));
    }
    if !["Normal", "Warning"].contains(&s("type")) {
        errs.push(FieldError::invalid("type", "", &format!("has invalid value: {}", s("type"))));
    }
    for (f, wire) in [
        ("deprecatedFirstTimestamp", "deprecatedFirstTimestamp"),
        ("deprecatedLastTimestamp", "deprecatedLastTimestamp"),
        ("deprecatedCount", "deprecatedCount"),
    ] {
        if obj.get(f).is_some_and(|v| !v.is_null() && *v != json!(0)) {
            errs.push(FieldError::invalid(wire, "", "needs to be unset"));
        }
    }
    if obj.pointer("/deprecatedSource").and_then(Value::as_object).is_some_and(|o| o.values().any(|v| v.as_str().is_some_and(|s| !s.is_empty()))) {
        errs.push(FieldError::invalid("deprecatedSource", "", "needs to be unset"));
    }
    if let Some(series) = obj.get("series").filter(|v| !v.is_null()) {
        if series.get("count").and_then(Value::as_i64).is_none_or(|c| c < 2) {
            errs.push(FieldError::invalid("series.count", "", "should be at least 2"));
        }
        if series.get("lastObservedTime").and_then(Value::as_str).is_none_or(str::is_empty) {
            errs.push(FieldError::required("series.lastObservedTime", ""));
        }
    }
    let ns = str_at(obj, "/metadata/namespace").unwrap_or("");
    if str_at(obj, "/regarding/namespace").unwrap_or("").is_empty() && !["default", "kube-system"].contains(&ns) {
        errs.push(FieldError::invalid("involvedObject.namespace", "", "does not match event.namespace"));
    }
    let controller = s("reportingController");
    if controller.is_empty() {
        errs.push(FieldError::required("reportingController", ""));
    } else if !is_qualified_name(controller) {
        errs.push(FieldError::invalid(
            "reportingController",
            controller,
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
        ));
    }
    for (f, limit) in [("reportingInstance", 128), ("action", 128), ("reason", 128)] {
        if s(f).is_empty() {
            errs.push(FieldError::required(f, ""));
        } else if s(f).len() > limit {
            errs.push(FieldError::invalid(f, "", &format!("can have at most {limit} characters")));
        }
    }
    if s("note").len() > 1024 {
        errs.push(FieldError::invalid("note", "", "can have at most 1024 characters"));
    }
}

/// A qualified name (`[prefix/]name`, the name part at most 63 characters
/// of `[A-Za-z0-9][-A-Za-z0-9_.]*[A-Za-z0-9]`).
fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(|p| !p.is_empty() && is_dns_subdomain(p))
        && !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

// ---------------------------------------------------------------- tables

fn column(name: &str, ty: &str, format: &str, description: &str, priority: u8) -> Value {
    json!({ "name": name, "type": ty, "format": format, "description": description, "priority": priority })
}

const NAME_DOC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DOC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

/// `columnDefinitions` of the Table for `kind`.
pub fn table_columns(kind: Kind) -> Vec<Value> {
    let name = column("Name", "string", "name", NAME_DOC, 0);
    let age = column("Age", "string", "", AGE_DOC, 0);
    match kind {
        Kind::Service => vec![
            name,
            column("Type", "string", "", "The type of the service.", 0),
            column("Cluster-IP", "string", "", "The cluster IP of the service.", 0),
            column("External-IP", "string", "", "The external IP of the service.", 0),
            column("Port(s)", "string", "", "The ports of the service.", 0),
            age,
            column("Selector", "string", "", "Route service traffic to pods with label keys and values matching this selector.", 1),
        ],
        Kind::EndpointSlice => vec![
            name,
            column("AddressType", "string", "", "The IP protocol for this slice", 0),
            column("Ports", "string", "", "Enumerated ports on the slice", 0),
            column("Endpoints", "string", "", "Addresses from the endpoints", 0),
            age,
        ],
        Kind::Node => vec![
            name,
            column("Status", "string", "", "The status of the node", 0),
            column("Roles", "string", "", "The roles of the node", 0),
            age,
            column("Version", "string", "", "Kubelet Version reported by the node.", 0),
            column("Internal-IP", "string", "", "List of addresses reachable to the node.", 1),
            column("External-IP", "string", "", "List of addresses reachable to the node.", 1),
            column("OS-Image", "string", "", "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).", 1),
            column("Kernel-Version", "string", "", "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).", 1),
            column("Container-Runtime", "string", "", "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).", 1),
        ],
        // printEvent's columns; the server fills the priority-1 ones too.
        Kind::Event => vec![
            column("Last Seen", "string", "", "The time at which the most recent occurrence of this event was recorded.", 0),
            column("Type", "string", "", "Type of this event (Normal, Warning), new types could be added in the future", 0),
            column("Reason", "string", "", "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.", 0),
            column("Object", "string", "", "The object that this event is about.", 0),
            column("Subobject", "string", "", "If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2].", 1),
            column("Source", "string", "", "The component reporting this event. Should be a short machine understandable string.", 1),
            column("Message", "string", "", "A human-readable description of the status of this operation.", 0),
            column("First Seen", "string", "", "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)", 1),
            column("Count", "string", "", "The number of times this event has occurred.", 1),
            column("Name", "string", "name", NAME_DOC, 1),
        ],
    }
}

/// `duration.HumanDuration` of `k8s.io/apimachinery`.
#[expect(clippy::many_single_char_names, reason = "mirrors HumanDuration's s/m/h/d/y")]
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    let (m, h, d, y) = (s / 60, s / 3600, s / 86400, s / (86400 * 365));
    if s < 60 * 2 {
        format!("{s}s")
    } else if m < 10 {
        let r = s % 60;
        if r == 0 { format!("{m}m") } else { format!("{m}m{r}s") }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        let r = m % 60;
        if r == 0 { format!("{h}h") } else { format!("{h}h{r}m") }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        let r = h % 24;
        if r == 0 { format!("{d}d") } else { format!("{d}d{r}h") }
    } else if h < 24 * 365 * 2 {
        format!("{d}d")
    } else if h < 24 * 365 * 8 {
        let r = d % 365;
        if r == 0 { format!("{y}y") } else { format!("{y}y{r}d") }
    } else {
        format!("{y}y")
    }
}

fn age(obj: &Value, now: jiff::Timestamp) -> String {
    since(obj, "/metadata/creationTimestamp", now)
}

/// `translateTimestampSince` of the time at `ptr`.
fn since(obj: &Value, ptr: &str, now: jiff::Timestamp) -> String {
    str_at(obj, ptr)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map_or_else(|| "<unknown>".into(), |t| human_duration(now.as_second() - t.as_second()))
}

fn join_or_none(v: &[String]) -> String {
    if v.is_empty() { "<none>".into() } else { v.join(",") }
}

/// The cells of one Table row for `obj`.
pub fn table_cells(kind: Kind, obj: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let name = str_at(obj, "/metadata/name").unwrap_or("").to_owned();
    let strs = |ptr: &str| -> Vec<String> {
        obj.pointer(ptr)
            .and_then(Value::as_array)
            .map(|a| a.iter().map(value_text).collect())
            .unwrap_or_default()
    };
    match kind {
        Kind::Service => {
            let ty = str_at(obj, "/spec/type").unwrap_or("ClusterIP");
            let cluster_ip = match str_at(obj, "/spec/clusterIP") {
                Some(ip) if !ip.is_empty() => ip.to_owned(),
                _ => "<none>".into(),
            };
            let external = match ty {
                "ExternalName" => str_at(obj, "/spec/externalName").unwrap_or("").to_owned(),
                "LoadBalancer" => {
                    let mut ips: Vec<String> = obj
                        .pointer("/status/loadBalancer/ingress")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i.get("ip").or_else(|| i.get("hostname")).and_then(Value::as_str))
                        .map(str::to_owned)
                        .collect();
                    ips.extend(strs("/spec/externalIPs"));
                    if ips.is_empty() { "<pending>".into() } else { ips.join(",") }
                }
                _ => join_or_none(&strs("/spec/externalIPs")),
            };
            let ports: Vec<String> = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| {
                    let port = p.get("port").map(value_text).unwrap_or_default();
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort").and_then(Value::as_u64).filter(|n| *n != 0) {
                        Some(np) => format!("{port}:{np}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect();
            let selector: Vec<String> = obj
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={}", value_text(v))).collect())
                .unwrap_or_default();
            vec![
                json!(name),
                json!(ty),
                json!(cluster_ip),
                json!(external),
                json!(join_or_none(&ports)),
                json!(age(obj, now)),
                json!(join_or_none(&selector)),
            ]
        }
        Kind::EndpointSlice => {
            let ports: Vec<String> = obj
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("port").map(value_text))
                .collect();
            let addrs: Vec<String> = obj
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|e| e.get("addresses").and_then(Value::as_array).into_iter().flatten().map(value_text))
                .collect();
            let endpoints = if addrs.is_empty() {
                "<unset>".to_owned()
            } else if addrs.len() > 3 {
                format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
            } else {
                addrs.join(",")
            };
            vec![
                json!(name),
                json!(str_at(obj, "/addressType").unwrap_or("")),
                json!(if ports.is_empty() { "<unset>".to_owned() } else { ports.join(",") }),
                json!(endpoints),
                json!(age(obj, now)),
            ]
        }
        Kind::Node => node_cells(obj, &name, now),
        Kind::Event => event_cells(obj, &name, now),
    }
}

/// printEvent's cells (wide, as the server fills them).
fn event_cells(obj: &Value, name: &str, now: jiff::Timestamp) -> Vec<Value> {
    let s = |p: &str| str_at(obj, p).unwrap_or("").to_owned();
    let first = since(obj, "/eventTime", now);
    let (last, count) = match obj.get("series").filter(|v| v.is_object()) {
        Some(series) => (since(series, "/lastObservedTime", now), series.get("count").and_then(Value::as_i64).unwrap_or(1)),
        None => (first.clone(), 1),
    };
    let kind = s("/regarding/kind").to_ascii_lowercase();
    let target = if s("/regarding/name").is_empty() { kind } else { format!("{kind}/{}", s("/regarding/name")) };
    let source = match (s("/reportingController"), s("/reportingInstance")) {
        (c, i) if i.is_empty() => c,
        (c, i) => format!("{c}, {i}"),
    };
    vec![
        json!(last),
        json!(s("/type")),
        json!(s("/reason")),
        json!(target),
        json!(s("/regarding/fieldPath")),
        json!(source),
        json!(s("/note").trim()),
        json!(first),
        json!(count),
        json!(name),
    ]
}

fn node_cells(obj: &Value, name: &str, now: jiff::Timestamp) -> Vec<Value> {
    let ready = obj
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        .and_then(|c| c.get("status").and_then(Value::as_str));
    let mut status = match ready {
        Some("True") => "Ready".to_owned(),
        Some("False") => "NotReady".to_owned(),
        _ => "Unknown".to_owned(),
    };
    if obj.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = obj
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            if let Some(r) = k.strip_prefix("node-role.kubernetes.io/") {
                (!r.is_empty()).then(|| r.to_owned())
            } else if k == "kubernetes.io/role" {
                v.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
            } else {
                None
            }
        })
        .collect();
    roles.sort();
    roles.dedup();
    let addr = |ty: &str| -> String {
        obj.pointer("/status/addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|a| a.get("type").and_then(Value::as_str) == Some(ty))
            .and_then(|a| a.get("address").and_then(Value::as_str))
            .unwrap_or("<none>")
            .to_owned()
    };
    let info = |f: &str| -> String {
        match str_at(obj, &format!("/status/nodeInfo/{f}")) {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => "<unknown>".into(),
        }
    };
    vec![
        json!(name),
        json!(status),
        json!(join_or_none(&roles)),
        json!(age(obj, now)),
        json!(str_at(obj, "/status/nodeInfo/kubeletVersion").unwrap_or("")),
        json!(addr("InternalIP")),
        json!(addr("ExternalIP")),
        json!(info("osImage")),
        json!(info("kernelVersion")),
        json!(info("containerRuntimeVersion")),
    ]
}
