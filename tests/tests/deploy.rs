//! The deployment: every manifest in `deploy/`, the `Dockerfile` and the
//! replacement guide, checked against each other and against the agent.
//!
//! - each manifest parses as its Kubernetes type, with no field the type does
//!   not know (a misspelt field would otherwise be dropped silently by the
//!   API server's decoder and by these typed checks alike);
//! - the kustomization lists exactly the files that exist;
//! - the `DaemonSet` passes only flags that `proxy-agent run --help` prints,
//!   and its mounts, probes, environment and `ConfigMap` keys match those flags;
//! - it is not privileged and has exactly the documented capabilities;
//! - the `ClusterRole` grants only the documented reads (and Event writes);
//! - `kubectl kustomize deploy/` renders it (a test of its own, which fails
//!   when kubectl is missing: `cargo xtask setup` installs it).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::agent::agent_bin;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
    serde::{Deserialize as _, Serialize, de::DeserializeOwned},
};
use serde_json::Value;

const NAMESPACE: &str = "kube-system";
const CONTAINER: &str = "proxy-agent";
const HEALTHZ_PORT: i32 = 10256;
/// The capabilities the `DaemonSet` adds, each explained in its comments and
/// in docs/replacing-kube-proxy.md.
const DOCUMENTED_CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];
/// The flags kube-proxy users know, with the same meaning (DESIGN.md).
const KUBE_PROXY_FLAGS: [&str; 5] = [
    "--kubeconfig",
    "--healthz-bind-address",
    "--metrics-bind-address",
    "--min-sync-period",
    "--sync-period",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every document of a (multi-document) YAML text, empty ones skipped.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The YAML files in deploy/, by file name.
fn yaml_files() -> BTreeSet<String> {
    fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|n| Path::new(n).extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect()
}

fn kustomization() -> Value {
    let mut docs = yaml_docs(&read(&deploy_dir().join("kustomization.yaml")), "kustomization.yaml");
    assert_eq!(docs.len(), 1, "kustomization.yaml holds one document");
    docs.remove(0)
}

/// Every object of every manifest (all YAML files but the kustomization).
fn objects() -> Vec<(String, Value)> {
    yaml_files()
        .into_iter()
        .filter(|f| f != "kustomization.yaml")
        .flat_map(|f| {
            yaml_docs(&read(&deploy_dir().join(&f)), &f).into_iter().map(move |v| (f.clone(), v))
        })
        .collect()
}

fn kind_of(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or("")
}

/// Where two JSON values differ, as JSON-pointer-like paths.
fn differences(path: &str, before: &Value, after: &Value, out: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(old), Value::Object(new)) => {
            for key in old.keys().chain(new.keys()).collect::<BTreeSet<_>>() {
                let at = format!("{path}/{key}");
                match (old.get(key), new.get(key)) {
                    (Some(o), Some(n)) => differences(&at, o, n, out),
                    (Some(_), None) => out.push(format!("{at}: not a field of the type (misspelt or misplaced?)")),
                    (None, Some(_)) => out.push(format!("{at}: added by the type")),
                    (None, None) => unreachable!(),
                }
            }
        }
        (Value::Array(old), Value::Array(new)) if old.len() == new.len() => {
            for (i, (o, n)) in old.iter().zip(new).enumerate() {
                differences(&format!("{path}/{i}"), o, n, out);
            }
        }
        _ if before == after => {}
        _ => out.push(format!("{path}: {before} became {after}")),
    }
}

/// Parses an object as `T` and checks that nothing was lost on the way.
fn typed<T: DeserializeOwned + Serialize>(file: &str, v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{file}: not a valid {}: {e}", kind_of(v)));
    let back = serde_json::to_value(&t).expect("serialize");
    let mut diffs = Vec::new();
    differences("", v, &back, &mut diffs);
    assert!(diffs.is_empty(), "{file}: {} does not round-trip:\n  {}", kind_of(v), diffs.join("\n  "));
    t
}

/// The one object of a kind, typed.
fn the<T: DeserializeOwned + Serialize>(kind: &str) -> T {
    let all: Vec<_> = objects().into_iter().filter(|(_, v)| kind_of(v) == kind).collect();
    assert_eq!(all.len(), 1, "expected exactly one {kind} in deploy/, found {}", all.len());
    typed(&all[0].0, &all[0].1)
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.template.spec.as_ref().expect("DaemonSet has a pod spec")
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = pod_spec(ds);
    assert_eq!(spec.containers.len(), 1, "one container");
    let c = &spec.containers[0];
    assert_eq!(c.name, CONTAINER);
    c
}

/// The container's arguments after `run`, as (flag, value).
fn run_flags(c: &Container) -> Vec<(String, Option<String>)> {
    let args = c.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"), "the image's entrypoint is proxy-agent: args start with `run`");
    args[1..]
        .iter()
        .map(|a| {
            assert!(a.starts_with("--"), "argument {a:?}: only --flag=value arguments (one per item) are used");
            match a.split_once('=') {
                Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
                None => (a.clone(), None),
            }
        })
        .collect()
}

fn flag<'a>(flags: &'a [(String, Option<String>)], name: &str) -> &'a str {
    flags
        .iter()
        .find(|(f, _)| f == name)
        .and_then(|(_, v)| v.as_deref())
        .unwrap_or_else(|| panic!("the DaemonSet passes no {name}=..."))
}

/// The long flags `proxy-agent run --help` prints.
fn help_flags() -> BTreeSet<String> {
    let bin = agent_bin();
    let out = Command::new(&bin)
        .args(["run", "--help"])
        .output()
        .unwrap_or_else(|e| panic!("running {} run --help: {e}", bin.display()));
    assert!(out.status.success(), "{} run --help failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split([' ', ',', '=', '<']))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_manifest_parses_as_its_kubernetes_type_with_no_unknown_fields() {
    let objects = objects();
    assert!(!objects.is_empty(), "no manifests in deploy/");
    let mut kinds = BTreeSet::new();
    for (file, v) in &objects {
        assert!(v["metadata"]["name"].is_string(), "{file}: an object without metadata.name");
        match kind_of(v) {
            "DaemonSet" => drop(typed::<DaemonSet>(file, v)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(file, v)),
            "ClusterRole" => drop(typed::<ClusterRole>(file, v)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(file, v)),
            "ConfigMap" => drop(typed::<ConfigMap>(file, v)),
            other => panic!("{file}: unexpected kind {other:?} (add it to this test)"),
        }
        if let Some(ns) = v["metadata"]["namespace"].as_str() {
            assert_eq!(ns, NAMESPACE, "{file}: namespaced objects live in {NAMESPACE}");
        }
        assert!(kinds.insert(kind_of(v).to_owned()), "{file}: a second {}", kind_of(v));
    }
    let want: BTreeSet<String> = ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"]
        .map(str::to_owned)
        .into();
    assert_eq!(kinds, want);
}

#[test]
fn kustomization_lists_exactly_the_manifests_in_deploy() {
    let k = kustomization();
    let listed: Vec<String> = k["resources"]
        .as_array()
        .expect("kustomization.yaml has resources")
        .iter()
        .map(|r| r.as_str().expect("resources are file names").to_owned())
        .collect();
    let listed_set: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(listed.len(), listed_set.len(), "a resource listed twice: {listed:?}");
    for r in &listed {
        assert!(deploy_dir().join(r).is_file(), "kustomization.yaml lists {r}, which does not exist in deploy/");
    }
    let files: BTreeSet<String> = yaml_files().into_iter().filter(|f| f != "kustomization.yaml").collect();
    let unlisted: Vec<_> = files.difference(&listed_set).collect();
    assert!(unlisted.is_empty(), "in deploy/ but not in kustomization.yaml's resources: {unlisted:?}");
}

#[test]
fn kustomization_sets_the_namespace_and_an_overridable_image() {
    let k = kustomization();
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    assert_eq!(k["namespace"], NAMESPACE);
    let ds: DaemonSet = the("DaemonSet");
    let image = agent_container(&ds).image.clone().expect("the container has an image");
    let images = k["images"].as_array().expect("kustomization.yaml has images");
    let entry = images
        .iter()
        .find(|i| i["name"] == image.as_str())
        .unwrap_or_else(|| panic!("kustomization.yaml has no images entry named {image:?} (the DaemonSet's image)"));
    assert!(entry["newName"].as_str().is_some_and(|s| !s.is_empty()), "images[{image}] has no newName");
    assert_eq!(
        entry["newTag"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "images[{image}].newTag follows the workspace version (override it in an overlay)"
    );
}

#[test]
fn daemonset_args_use_only_flags_that_proxy_agent_run_accepts() {
    let ds: DaemonSet = the("DaemonSet");
    let flags = run_flags(agent_container(&ds));
    let known = help_flags();
    let unknown: Vec<&str> = flags.iter().map(|(f, _)| f.as_str()).filter(|f| !known.contains(*f)).collect();
    assert!(
        unknown.is_empty(),
        "the DaemonSet passes flags that `proxy-agent run --help` does not print: {unknown:?}\n(it prints: {known:?})"
    );
    let used: BTreeSet<&str> = flags.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(used.len(), flags.len(), "a flag passed twice: {flags:?}");
    for f in ["--kubeconfig", "--node-name", "--devices", "--bpffs", "--healthz-bind-address"] {
        assert!(used.contains(f), "the DaemonSet does not pass {f}");
    }
    assert!(!used.contains("--manifests"), "in a cluster the agent follows the API server, not a directory");
}

#[test]
fn daemonset_flags_match_its_mounts_environment_and_configmap() {
    let ds: DaemonSet = the("DaemonSet");
    let cm: ConfigMap = the("ConfigMap");
    let c = agent_container(&ds);
    let spec = pod_spec(&ds);
    let flags = run_flags(c);
    let data = cm.data.clone().unwrap_or_default();
    let cm_name = cm.metadata.name.clone().expect("ConfigMap name");

    // Every $(VAR) in the args is defined, and every ConfigMap key exists.
    let env: BTreeMap<&str, _> = c.env.iter().flatten().map(|e| (e.name.as_str(), e)).collect();
    for (f, v) in &flags {
        let mut rest = v.as_deref().unwrap_or("");
        while let Some(i) = rest.find("$(") {
            let end = i + rest[i..].find(')').unwrap_or_else(|| panic!("{f}: unclosed $("));
            let var = &rest[i + 2..end];
            let e = env.get(var).unwrap_or_else(|| panic!("{f} uses $({var}), which the container does not define"));
            if let Some(r) = e.value_from.as_ref().and_then(|s| s.config_map_key_ref.as_ref()) {
                assert_eq!(r.name, cm_name, "${var} comes from another ConfigMap");
                assert!(data.contains_key(&r.key), "${var} needs key {:?}, which configmap.yaml lacks", r.key);
                assert_ne!(r.optional, Some(true), "${var}: a missing key would leave the literal $({var}) in the args");
            }
            rest = &rest[end + 1..];
        }
    }

    let mounts: BTreeMap<&str, _> = c.volume_mounts.iter().flatten().map(|m| (m.name.as_str(), m)).collect();
    let volumes: BTreeMap<&str, _> = spec.volumes.iter().flatten().map(|v| (v.name.as_str(), v)).collect();
    let host_path_mount = |host: &str| {
        let (name, _) = volumes
            .iter()
            .find(|(_, v)| v.host_path.as_ref().is_some_and(|h| h.path == host))
            .unwrap_or_else(|| panic!("no hostPath volume for the node's {host}"));
        *mounts.get(name).unwrap_or_else(|| panic!("volume {name} ({host}) is not mounted"))
    };

    // --bpffs lies on the node's bpffs.
    let bpffs = host_path_mount("/sys/fs/bpf");
    let pins = flag(&flags, "--bpffs");
    assert!(
        Path::new(pins).starts_with(&bpffs.mount_path) && pins != bpffs.mount_path,
        "--bpffs={pins} is not below the node's bpffs, mounted at {}",
        bpffs.mount_path
    );
    assert!(!bpffs.read_only.unwrap_or(false), "pins are written: the bpffs mount is read-write");
    assert!(
        !Path::new(&bpffs.mount_path).starts_with("/sys"),
        "the default AppArmor profile denies writes under /sys/fs/b*: mount the bpffs elsewhere"
    );
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));

    // The node's cgroup v2 root is mounted read-only, ready for --cgroup
    // (socket-level balancing, not implemented yet).
    let cgroup = host_path_mount("/sys/fs/cgroup");
    assert_eq!(cgroup.read_only, Some(true), "the cgroup root is mounted read-only");

    // --kubeconfig is the ConfigMap's kubeconfig.conf.
    let kubeconfig = Path::new(flag(&flags, "--kubeconfig"));
    let dir = kubeconfig.parent().expect("a directory").to_str().expect("utf-8");
    let (name, m) = mounts.iter().find(|(_, m)| m.mount_path == dir).unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let source = volumes[name].config_map.as_ref().unwrap_or_else(|| panic!("{dir} is not a ConfigMap volume"));
    assert_eq!(source.name, cm_name);
    let file = kubeconfig.file_name().expect("file").to_str().expect("utf-8");
    let key = source
        .items
        .iter()
        .flatten()
        .find(|i| i.path == file)
        .map_or(file, |i| i.key.as_str());
    assert!(data.contains_key(key), "the ConfigMap has no {key:?} for --kubeconfig");
    assert_eq!(m.read_only, Some(true));
}

#[test]
fn configmap_kubeconfig_authenticates_as_the_pod_service_account() {
    let cm: ConfigMap = the("ConfigMap");
    let text = cm.data.unwrap_or_default().remove("kubeconfig.conf").expect("kubeconfig.conf in the ConfigMap");
    let kc = kube::config::Kubeconfig::from_yaml(&text).unwrap_or_else(|e| panic!("kubeconfig.conf does not parse: {e}"));
    let cluster = kc.clusters[0].cluster.as_ref().expect("a cluster");
    assert_eq!(cluster.certificate_authority.as_deref(), Some("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"));
    let server = cluster.server.as_deref().expect("a server");
    assert!(server.starts_with("https://"), "server {server:?}");
    let user = kc.auth_infos[0].auth_info.as_ref().expect("a user");
    assert_eq!(
        user.token_file.as_deref(),
        Some("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        "the projected token is re-read from its file as the kubelet rotates it"
    );
    assert!(kc.current_context.is_some());
}

#[test]
fn daemonset_is_not_privileged_and_has_exactly_the_documented_capabilities() {
    let ds: DaemonSet = the("DaemonSet");
    let spec = pod_spec(&ds);
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        let sc = c.security_context.as_ref().unwrap_or_else(|| panic!("{}: no securityContext", c.name));
        assert_ne!(sc.privileged, Some(true), "{}: privileged", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}: allowPrivilegeEscalation", c.name);
        let caps = sc.capabilities.as_ref().unwrap_or_else(|| panic!("{}: no capabilities", c.name));
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]), "{}: drops ALL first", c.name);
        let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
        assert_eq!(added, DOCUMENTED_CAPABILITIES.into(), "{}: capabilities", c.name);
        for m in c.volume_mounts.iter().flatten() {
            assert_ne!(
                m.mount_propagation.as_deref(),
                Some("Bidirectional"),
                "{}: the API server allows Bidirectional propagation only in privileged containers",
                c.name
            );
        }
    }
    assert_ne!(spec.host_pid, Some(true), "hostPID");
    assert_ne!(spec.host_ipc, Some(true), "hostIPC");
    // Each capability is explained where it is granted.
    let text = read(&deploy_dir().join("daemonset.yaml"));
    for cap in DOCUMENTED_CAPABILITIES {
        assert!(text.contains(&format!("# CAP_{cap}:")), "daemonset.yaml does not say why it adds {cap}");
    }
}

#[test]
fn daemonset_probes_livez_and_healthz_on_10256() {
    let ds: DaemonSet = the("DaemonSet");
    let c = agent_container(&ds);
    for (probe, path) in [(&c.liveness_probe, "/livez"), (&c.readiness_probe, "/healthz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("no HTTP probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(HEALTHZ_PORT), "{path} probe port");
        assert!(get.host.is_none(), "{path}: probes go to the pod IP, the node's with hostNetwork");
    }
    let flags = run_flags(c);
    let healthz = flag(&flags, "--healthz-bind-address");
    assert_eq!(healthz, format!("0.0.0.0:{HEALTHZ_PORT}"), "the probes reach --healthz-bind-address");
}

#[test]
fn daemonset_runs_on_every_node_like_kube_proxy() {
    let ds: DaemonSet = the("DaemonSet");
    let spec = pod_spec(&ds);
    assert_eq!(spec.host_network, Some(true), "hostNetwork");
    assert_eq!(
        spec.dns_policy.as_deref(),
        Some("Default"),
        "the node's resolver: cluster DNS is a ClusterIP, which nothing translates for the host network namespace"
    );
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations.iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "tolerates every taint, as kube-proxy does: {tolerations:?}"
    );
    assert_eq!(
        spec.node_selector.as_ref().and_then(|s| s.get("kubernetes.io/os")).map(String::as_str),
        Some("linux")
    );
    let strategy = ds.spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy.rolling_update.as_ref().and_then(|r| r.max_unavailable.clone()),
        Some(IntOrString::String("10%".to_owned()))
    );
    let requests = agent_container(&ds).resources.as_ref().and_then(|r| r.requests.as_ref()).expect("resource requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"), "requests: {requests:?}");
}

#[test]
fn daemonset_reads_node_name_from_the_downward_api() {
    let ds: DaemonSet = the("DaemonSet");
    let c = agent_container(&ds);
    let node_name = c.env.iter().flatten().find(|e| e.name == "NODE_NAME").expect("NODE_NAME in env");
    let field = node_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    assert_eq!(flag(&run_flags(c), "--node-name"), "$(NODE_NAME)");
}

#[test]
fn clusterrole_grants_only_reads_of_services_endpointslices_and_nodes_and_event_writes() {
    let role: ClusterRole = the("ClusterRole");
    assert!(role.aggregation_rule.is_none(), "no aggregation");
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "unexpected rule {rule:?}");
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        for s in groups.iter().chain(&resources).chain(&rule.verbs) {
            assert!(!s.contains('*'), "wildcard in {rule:?}");
        }
        for g in &groups {
            for r in &resources {
                granted.entry((g.clone(), r.clone())).or_default().extend(rule.verbs.iter().cloned());
            }
        }
    }
    let want: BTreeMap<(String, String), BTreeSet<String>> = [
        ("", "services", &["list", "watch"][..]),
        ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
        ("", "nodes", &["get", "list", "watch"]),
        // Warning Events on refused objects (created; a repeat patches the series).
        ("events.k8s.io", "events", &["create", "patch"]),
        ("", "events", &["create", "patch"]),
    ]
    .into_iter()
    .map(|(g, r, v)| ((g.to_owned(), r.to_owned()), v.iter().map(|s| (*s).to_owned()).collect()))
    .collect();
    assert_eq!(granted, want, "the agent reads these, and writes only Events");
}

#[test]
fn serviceaccount_binding_and_daemonset_agree_on_names() {
    let sa: ServiceAccount = the("ServiceAccount");
    let role: ClusterRole = the("ClusterRole");
    let binding: ClusterRoleBinding = the("ClusterRoleBinding");
    let ds: DaemonSet = the("DaemonSet");
    let sa_name = sa.metadata.name.expect("ServiceAccount name");
    assert_eq!(binding.role_ref.api_group.as_deref(), Some("rbac.authorization.k8s.io"));
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(binding.role_ref.name), role.metadata.name);
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, sa_name);
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(pod_spec(&ds).service_account_name.as_deref(), Some(sa_name.as_str()));
}

#[test]
fn dockerfile_builds_the_agent_like_xtask_setup_and_ships_only_the_binary() {
    let docker = read(&repo().join("Dockerfile"));
    let lines: Vec<&str> = docker.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    let froms: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage");
    let runtime = &lines[*froms.last().expect("a FROM")..];
    assert_eq!(runtime[0], "FROM debian:bookworm-slim");
    let copies: Vec<&&str> = runtime.iter().filter(|l| l.starts_with("COPY")).collect();
    assert_eq!(copies.len(), 1, "the runtime stage gets the binary only: {copies:?}");
    // The builder's /out holds the binary and the kube-proxy link to it
    // (kubeadm's DaemonSet runs /usr/local/bin/kube-proxy), nothing else.
    assert_eq!(*copies[0], "COPY --from=builder /out/ /usr/local/bin/", "{copies:?}");
    let outs: Vec<&str> = lines.iter().flat_map(|l| l.split_whitespace()).filter(|w| w.starts_with("/out/")).collect();
    assert_eq!(outs, ["/out/proxy-agent", "/out/kube-proxy", "/out/"], "what the builder puts in /out: {outs:?}");
    assert!(docker.contains("ln -s proxy-agent /out/kube-proxy"), "kube-proxy is a link to the agent");
    assert!(!runtime.iter().any(|l| l.starts_with("RUN")), "nothing installed in the runtime stage");
    let entry = runtime.iter().find(|l| l.starts_with("ENTRYPOINT")).expect("ENTRYPOINT");
    assert!(entry.contains("proxy-agent\"]"), "{entry}");

    let builder = lines[..*froms.last().expect("a FROM")].join("\n");
    for needle in ["rustup toolchain install nightly", "rust-src", "LLVM_PREFIX", "cargo install --locked bpf-linker", "-p proxy-agent", "--release"] {
        assert!(builder.contains(needle), "the builder stage lacks {needle:?}");
    }
    // The same bpf-linker as `cargo xtask setup` installs.
    let setup = read(&repo().join("xtask/src/setup.rs"));
    let pinned = setup
        .split("\"--version\", \"=")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("setup.rs pins a bpf-linker version");
    assert!(
        docker.contains(&format!("ARG BPF_LINKER_VERSION={pinned}")),
        "the Dockerfile's bpf-linker is not setup.rs's {pinned}"
    );
    let ignore = read(&repo().join(".dockerignore"));
    assert!(ignore.lines().any(|l| l.trim().trim_start_matches('/') == "target/"), ".dockerignore leaves out target/");
}

#[test]
fn docs_explain_every_flag_and_capability_the_daemonset_uses() {
    let docs = read(&repo().join("docs/replacing-kube-proxy.md"));
    let ds: DaemonSet = the("DaemonSet");
    for (f, _) in run_flags(agent_container(&ds)) {
        assert!(docs.contains(&f), "docs/replacing-kube-proxy.md does not mention {f}");
    }
    for f in KUBE_PROXY_FLAGS.iter().chain(&["--hostname-override", "--nodeport-addresses", "--iptables-min-sync-period"]) {
        assert!(docs.contains(f), "the flag table lacks kube-proxy's {f}");
    }
    for cap in DOCUMENTED_CAPABILITIES {
        assert!(docs.contains(&format!("CAP_{cap}")), "the docs do not explain CAP_{cap}");
    }
    for step in ["kube-proxy --cleanup", "proxy-agent", "cleanup", "kubectl apply -k deploy/", "--skip-phases=addon/kube-proxy"] {
        assert!(docs.contains(step), "the docs lack {step:?}");
    }
}

/// `kubectl kustomize deploy/`: what `kubectl apply -k deploy/` would send.
#[test]
fn kubectl_kustomize_renders_deploy() {
    let out = match Command::new("kubectl").arg("kustomize").arg(deploy_dir()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("kubectl is not installed, so `kubectl kustomize deploy/` cannot be checked: run `cargo xtask setup` (it installs Debian's kubernetes-client)")
        }
        Err(e) => panic!("cannot run kubectl: {e}"),
    };
    assert!(out.status.success(), "kubectl kustomize deploy/ failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let rendered = yaml_docs(&String::from_utf8_lossy(&out.stdout), "kubectl kustomize output");
    let kinds: BTreeSet<&str> = rendered.iter().map(kind_of).collect();
    assert_eq!(kinds, ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"].into());
    for v in &rendered {
        if !kind_of(v).starts_with("Cluster") {
            assert_eq!(v["metadata"]["namespace"], NAMESPACE, "{} not in {NAMESPACE}", kind_of(v));
        }
    }
    let k = kustomization();
    let image = &k["images"][0];
    let want = format!("{}:{}", image["newName"].as_str().expect("newName"), image["newTag"].as_str().expect("newTag"));
    let ds = rendered.iter().find(|v| kind_of(v) == "DaemonSet").expect("DaemonSet");
    assert_eq!(ds["spec"]["template"]["spec"]["containers"][0]["image"], want.as_str(), "the image is replaced");
}
