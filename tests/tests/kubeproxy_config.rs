//! The agent in kube-proxy's place in kubeadm's `DaemonSet`: the real binary,
//! invoked by the name `kube-proxy` (as the image's
//! `/usr/local/bin/kube-proxy` link does) with the command of kubeadm's
//! `DaemonSet`, reading the `config.conf` of the `ConfigMap` kubeadm generates
//! (tests/fixtures/kubeadm/), against the test API server in a node
//! namespace.
//!
//! The test plays the kubelet: it writes the `ConfigMap`'s keys into a
//! directory (the volume), maps the container's mount path
//! (`/var/lib/kube-proxy`) onto it in the command and in `config.conf`, and
//! expands `$(NODE_NAME)`. The volume's `kubeconfig.conf` is the test API
//! server's (kubeadm's names the service-account token and CA of a real
//! cluster). Three flags are added to keep the test to itself: `--bpffs`
//! (its own pin directory), `--cgroup` (its own cgroup, never the machine's
//! root) — what the pod's own mounts would give — and nothing else: the
//! devices are the agent's default list (the node's uplink is named `eth0`
//! here, the pods' veths `lxcN`).
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{agent_bin, programmed},
    apiserver::ApiServer,
    client::http_get,
    inspect_backends,
    netns::Netns,
    sandbox::{NODE_IP, Sandbox, pod_ip},
};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap};
use proxy_agent::config::{DEFAULT_DEVICES, KubeProxyConfiguration};
use serde_json::json;
use serde_yaml::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE: &str = "node-a";
/// Where kubeadm's `DaemonSet` mounts the `ConfigMap`.
const MOUNT: &str = "/var/lib/kube-proxy";
const T: Duration = Duration::from_secs(2);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kubeadm").join(name)
}

fn kubeadm_configmap() -> ConfigMap {
    let text = std::fs::read_to_string(fixture("kube-proxy-configmap.yaml")).expect("the ConfigMap fixture");
    serde_yaml::from_str(&text).expect("the fixture is a ConfigMap")
}

fn kubeadm_daemonset() -> DaemonSet {
    let text = std::fs::read_to_string(fixture("kube-proxy-daemonset.yaml")).expect("the DaemonSet fixture");
    serde_yaml::from_str(&text).expect("the fixture is a DaemonSet")
}

/// kube-proxy's container command in kubeadm's `DaemonSet`.
fn kubeadm_command() -> Vec<String> {
    let ds = kubeadm_daemonset();
    let spec = ds.spec.template.spec.expect("a pod spec");
    let c = spec.containers.into_iter().find(|c| c.name == "kube-proxy").expect("the kube-proxy container");
    assert!(c.args.is_none(), "kubeadm passes everything in `command`");
    c.command.expect("a command")
}

/// The `ConfigMap`'s `config.conf`.
fn kubeadm_config() -> String {
    kubeadm_configmap().data.expect("data").remove("config.conf").expect("config.conf")
}

/// GET `path` on `addr` from inside `ns`: status and body; status 0 when
/// nothing answers (refused, or no answer within 2 s).
fn http(ns: &Netns, addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_owned();
    ns.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, T) else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(T));
        let mut out = String::new();
        if write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() || s.read_to_string(&mut out).is_err() {
            return (0, String::new());
        }
        let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (status, body)
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn node_ip(port: u16) -> SocketAddr {
    SocketAddr::from((NODE_IP, port))
}

/// The agent process; killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node running the agent as kubeadm's `DaemonSet` runs kube-proxy.
/// Fields drop in order: the agent first, then the API server, then the
/// namespaces, pins and files.
struct KubeadmNode {
    agent: Option<Process>,
    api: ApiServer,
    sb: Sandbox,
    /// The `ConfigMap` volume (what the container sees at /var/lib/kube-proxy).
    volume: PathBuf,
    log: PathBuf,
}

impl KubeadmNode {
    /// A node with two pods serving HTTP on 8080 behind `VIP`:80, the test
    /// API server, and the `ConfigMap` volume holding `config_conf`
    /// (kubeadm's, or an edit of it).
    fn new(prefix: &str, config_conf: &str) -> Self {
        let mut sb = Sandbox::new(prefix, 2);
        sb.serve_http(8080);
        // The uplink under a usual name, so that the default --devices
        // (kubeadm passes none) covers it.
        sb.node.ip(&["link", "set", "ext0", "down"]);
        sb.node.ip(&["link", "set", "ext0", "name", "eth0"]);
        sb.node.ip(&["link", "set", "eth0", "up"]);
        let api = sb.node.run(|| ApiServer::start(loopback(0)));
        api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})).expect("node");
        api.apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": VIP.to_string(), "clusterIPs": [VIP.to_string()],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
        }))
        .expect("service");
        let endpoints: Vec<_> = [1, 2]
            .map(|i| json!({"addresses": [pod_ip(i).to_string()], "nodeName": NODE, "conditions": {"ready": true}}))
            .into();
        api.apply(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints
        }))
        .expect("slice");

        // The kubelet's part: the ConfigMap's keys as files in the volume.
        let volume = sb.workdir.join("var-lib-kube-proxy");
        std::fs::create_dir_all(&volume).expect("volume");
        for (key, value) in kubeadm_configmap().data.expect("data") {
            std::fs::write(volume.join(&key), value).expect("write a ConfigMap key");
        }
        // The volume's path stands for the mount path inside the config too.
        let config_conf = config_conf.replace(&format!("{MOUNT}/"), &format!("{}/", volume.display()));
        std::fs::write(volume.join("config.conf"), config_conf).expect("config.conf");
        api.write_kubeconfig(&volume.join("kubeconfig.conf")).expect("kubeconfig.conf");
        let log = sb.workdir.join("kube-proxy.log");
        Self { agent: None, api, sb, volume, log }
    }

    fn config_path(&self) -> String {
        self.volume.join("config.conf").display().to_string()
    }

    /// Starts the agent with kubeadm's `DaemonSet` command, as the container
    /// runtime would (after the kubelet expanded `$(NODE_NAME)`), plus
    /// `extra` flags.
    fn start(&mut self, extra: &[&str]) {
        let command = kubeadm_command();
        // The image's /usr/local/bin/kube-proxy: a link to the agent.
        let bin_dir = self.sb.workdir.join("usr-local-bin");
        std::fs::create_dir_all(&bin_dir).expect("bin dir");
        let link = bin_dir.join(Path::new(&command[0]).file_name().expect("a file name"));
        std::os::unix::fs::symlink(agent_bin(), &link).expect("link kube-proxy to the agent");
        let args: Vec<String> = command[1..]
            .iter()
            .map(|a| a.replace("$(NODE_NAME)", NODE).replace(&format!("{MOUNT}/"), &format!("{}/", self.volume.display())))
            .chain([format!("--bpffs={}", self.sb.bpffs.display()), format!("--cgroup={}", self.sb.cgroup.path().display())])
            .chain(extra.iter().map(|s| (*s).to_owned()))
            .collect();
        let out = std::fs::File::create(&self.log).expect("log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.sb.node.name()))
            .arg(&link)
            .args(&args)
            .env("NODE_NAME", NODE)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn the agent as kube-proxy");
        self.agent = Some(Process(child));
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most 20 s) until both pods are programmed behind `VIP`:80,
    /// failing at once, with the log, if the agent exits.
    fn wait_programmed(&mut self) {
        let want: Vec<String> = [1, 2].map(|i| format!("{}:8080", pod_ip(i))).into();
        let start = Instant::now();
        loop {
            if inspect_backends(&programmed(&self.sb.bpffs), VIP, 80) == want {
                return;
            }
            if let Some(status) = self.agent.as_mut().and_then(|p| p.0.try_wait().ok().flatten()) {
                panic!("the agent exited ({status}):\n{}", self.log_text());
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{VIP}:80 not programmed after 20 s:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET the `ClusterIP` from the client namespace (outside the node).
    fn get_service(&self) -> std::io::Result<String> {
        self.sb.client.run(|| http_get(SocketAddr::from((VIP, 80)), T))
    }

    /// Polls `GET addr path` from the node until it answers 200 (10 s).
    fn wait_http_ok(&self, addr: SocketAddr, path: &str) -> String {
        let start = Instant::now();
        loop {
            let (status, body) = http(&self.sb.node, addr, path);
            if status == 200 {
                return body;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "GET {addr}{path}: {status} after 10 s\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn refused(&self, addr: SocketAddr) -> bool {
        http(&self.sb.node, addr, "/").0 == 0
    }

    /// The node names the agent watched its Node by.
    fn watched_node_names(&self) -> Vec<String> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.path.ends_with("/nodes"))
            .filter_map(|r| r.param("fieldSelector"))
            .collect()
    }

    /// The log's warnings about `field` of the configuration file.
    fn warnings_about(&self, field: &str) -> Vec<String> {
        let needle = format!("{}: {field}: ", self.config_path());
        self.log_text().lines().filter(|l| l.contains(" WARN ") && l.contains(&needle)).map(str::to_owned).collect()
    }
}

/// The fixtures are what kubeadm generates: the `ConfigMap`'s hash
/// annotation is kubeadm's checksum of its data (so the data is exactly what
/// kubeadm wrote), its `config.conf` is a `KubeProxyConfiguration` with no
/// field this agent does not know, and the `DaemonSet` runs kube-proxy on it.
#[test]
fn kubeadm_fixtures_are_what_kubeadm_generates() {
    let cm = kubeadm_configmap();
    assert_eq!(cm.metadata.name.as_deref(), Some("kube-proxy"));
    assert_eq!(cm.metadata.namespace.as_deref(), Some("kube-system"));
    let data: BTreeMap<String, String> = cm.data.clone().expect("data");
    assert_eq!(data.keys().collect::<Vec<_>>(), ["config.conf", "kubeconfig.conf"]);
    // kubeadm's ChecksumForConfigMap: sha256 over the values, in key order.
    let mut sha = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("sha256sum");
    sha.stdin.take().expect("stdin").write_all(data.values().map(String::as_str).collect::<String>().as_bytes()).expect("hash input");
    let out = sha.wait_with_output().expect("sha256sum");
    let sum = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    let annotations = cm.metadata.annotations.expect("annotations");
    assert_eq!(annotations["kubeadm.kubernetes.io/component-config.hash"], format!("sha256:{sum}"));

    let config = &data["config.conf"];
    let parsed = KubeProxyConfiguration::parse(config).expect("config.conf loads");
    assert_eq!(parsed.client_connection.kubeconfig.as_deref(), Some("/var/lib/kube-proxy/kubeconfig.conf"));
    assert!(KubeProxyConfiguration::unknown_fields(config).is_empty(), "{:?}", KubeProxyConfiguration::unknown_fields(config));
    let kubeconfig: Value = serde_yaml::from_str(&data["kubeconfig.conf"]).expect("kubeconfig.conf");
    assert_eq!(kubeconfig["users"][0]["user"]["tokenFile"], "/var/run/secrets/kubernetes.io/serviceaccount/token");

    assert_eq!(kubeadm_command(), ["/usr/local/bin/kube-proxy", "--config=/var/lib/kube-proxy/config.conf", "--hostname-override=$(NODE_NAME)"]);
    let spec = kubeadm_daemonset().spec.template.spec.expect("pod spec");
    let volume = spec.volumes.iter().flatten().find(|v| v.name == "kube-proxy").expect("the ConfigMap volume");
    assert_eq!(volume.config_map.as_ref().map(|c| c.name.as_str()), Some("kube-proxy"));
    let mount = spec.containers[0].volume_mounts.iter().flatten().find(|m| m.name == "kube-proxy").expect("mounted");
    assert_eq!(mount.mount_path, MOUNT);
}

/// kubeadm passes no --devices: the agent's default must be the list the
/// `DaemonSet` of deploy/ explains device by device.
#[test]
fn default_devices_are_deploy_configmaps_list() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/configmap.yaml")).expect("deploy/configmap.yaml");
    let cm: ConfigMap = serde_yaml::from_str(&text).expect("a ConfigMap");
    assert_eq!(cm.data.expect("data")["devices"], DEFAULT_DEVICES);
}

#[test]
fn kubeadm_daemonset_command_runs_the_agent_as_kube_proxy() {
    let mut n = KubeadmNode::new("kpc", &kubeadm_config());
    n.start(&[]);
    n.wait_programmed();
    let body = n.get_service().expect("the ClusterIP answers from outside the node");
    assert!(body == "pod1" || body == "pod2", "{body}");

    // --hostname-override=$(NODE_NAME): the agent follows its own Node.
    assert!(
        n.watched_node_names().iter().any(|s| s == &format!("metadata.name={NODE}")),
        "the Node is watched by name: {:?}",
        n.watched_node_names()
    );
    // The file leaves healthzBindAddress and metricsBindAddress empty:
    // kube-proxy's defaults, 0.0.0.0:10256 and 127.0.0.1:10249.
    let healthz = n.wait_http_ok(node_ip(10256), "/healthz");
    assert!(healthz.contains("\"lastUpdated\""), "{healthz}");
    n.wait_http_ok(loopback(10256), "/livez");
    let metrics = n.wait_http_ok(loopback(10249), "/metrics");
    assert!(metrics.contains("kubeproxy_sync_proxy_rules_duration_seconds"), "{metrics}");
    assert!(n.refused(node_ip(10249)), "metrics listen on 127.0.0.1 only");

    // kubeadm's file sets one field with no meaning here: clusterCIDR, from
    // the pod subnet. One warning, naming the file and the field; nothing
    // else in the file warns.
    let log = n.log_text();
    let cidr = n.warnings_about("clusterCIDR");
    assert_eq!(cidr.len(), 1, "{log}");
    assert!(cidr[0].contains("\"10.244.0.0/16\" is ignored"), "{}", cidr[0]);
    let config_warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") && l.contains(&n.config_path())).collect();
    assert_eq!(config_warnings.len(), 1, "only clusterCIDR warns: {config_warnings:#?}");
    assert!(log.contains("read kube-proxy's configuration"), "{log}");
    let agent = n.agent.as_mut().expect("agent");
    assert!(agent.0.try_wait().expect("wait").is_none(), "the agent keeps running:\n{log}");
}

#[test]
fn configuration_fields_map_ignored_ones_warn_and_flags_win() {
    // kubeadm's file as an admin edits it (`kubectl -n kube-system edit cm
    // kube-proxy`).
    let mut config: Value = serde_yaml::from_str(&kubeadm_config()).expect("yaml");
    let set = |config: &mut Value, path: &str, v: Value| {
        let mut at = &mut *config;
        let keys: Vec<&str> = path.split('.').collect();
        for k in &keys[..keys.len() - 1] {
            at = &mut at[*k];
        }
        at[*keys.last().expect("a key")] = v;
    };
    let yaml = |s: &str| serde_yaml::from_str::<Value>(s).expect("a value");
    // Mapped: the listeners, the conntrack size, the mode's sync periods,
    // the node name (but the command line's --hostname-override wins).
    set(&mut config, "healthzBindAddress", yaml("0.0.0.0:10356"));
    set(&mut config, "metricsBindAddress", yaml("0.0.0.0:10349"));
    set(&mut config, "conntrack.maxPerCore", yaml("0"));
    set(&mut config, "conntrack.min", yaml("65536"));
    set(&mut config, "mode", yaml("ipvs"));
    set(&mut config, "ipvs.syncPeriod", yaml("1m0s"));
    set(&mut config, "hostnameOverride", yaml("not-this-node"));
    // Ignored here, each with one warning.
    set(&mut config, "ipvs.scheduler", yaml("rr"));
    set(&mut config, "iptables.masqueradeAll", yaml("true"));
    set(&mut config, "conntrack.tcpEstablishedTimeout", yaml("1h0m0s"));
    set(&mut config, "detectLocalMode", yaml("InterfaceNamePrefix"));
    set(&mut config, "detectLocal.interfaceNamePrefix", yaml("veth"));
    set(&mut config, "featureGates", yaml("{SomeGate: true}"));
    set(&mut config, "oomScoreAdj", yaml("-500"));
    set(&mut config, "futureField", yaml("{a: 1}"));
    let text = serde_yaml::to_string(&config).expect("yaml");

    let mut n = KubeadmNode::new("kpf", &text);
    // kubeadm's command, and two more flags as a kube-proxy user would add:
    // the command line wins over the file.
    n.start(&["--v=2", "--metrics-bind-address=127.0.0.1:10449"]);
    n.wait_programmed();
    let body = n.get_service().expect("the ClusterIP answers");
    assert!(body == "pod1" || body == "pod2", "{body}");

    // healthzBindAddress from the file; metricsBindAddress from the flag.
    n.wait_http_ok(node_ip(10356), "/healthz");
    n.wait_http_ok(loopback(10449), "/metrics");
    for gone in [loopback(10256), loopback(10249), loopback(10349), node_ip(10349)] {
        assert!(n.refused(gone), "nothing listens on {gone}");
    }
    // --hostname-override beats hostnameOverride.
    let names = n.watched_node_names();
    assert!(names.iter().all(|s| s == &format!("metadata.name={NODE}")) && !names.is_empty(), "{names:?}");
    // conntrack: max(min, maxPerCore × CPUs) = max(65536, 0).
    let log = n.log_text();
    assert!(log.lines().any(|l| l.contains("conntrack size") && l.contains("flows=65536")), "{log}");

    for field in [
        "mode",
        "ipvs.scheduler",
        "iptables.masqueradeAll",
        "conntrack.tcpEstablishedTimeout",
        "detectLocalMode",
        "detectLocal.interfaceNamePrefix",
        "clusterCIDR",
        "featureGates",
        "oomScoreAdj",
        "futureField",
    ] {
        let w = n.warnings_about(field);
        assert_eq!(w.len(), 1, "one warning for {field}, naming the file: {w:#?}\n{log}");
    }
    for mapped in ["healthzBindAddress", "metricsBindAddress", "conntrack.min", "conntrack.maxPerCore", "ipvs.syncPeriod", "hostnameOverride"] {
        assert!(n.warnings_about(mapped).is_empty(), "{mapped} has a meaning: no warning\n{log}");
    }
    assert!(n.warnings_about("futureField")[0].contains("unknown field"), "{log}");
}
