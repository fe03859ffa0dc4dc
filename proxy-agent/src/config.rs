//! `proxy-agent run`'s settings: its flags, kube-proxy's configuration file
//! (`--config FILE`, a `KubeProxyConfiguration`), and how the two combine
//! into a [`RunConfig`].
//!
//! # Precedence
//! A flag given on the command line wins over the file, the file over the
//! environment (`$NODE_NAME`), the environment over the defaults — as with
//! kube-proxy, whose flags override its `--config`.
//!
//! # The file
//! A `kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration` (YAML or
//! JSON), as kubeadm writes it into the `kube-proxy` `ConfigMap` (key
//! `config.conf`):
//! - fields with a meaning here set the flag of the same meaning
//!   ([`FileSettings`]; the table is in docs/replacing-kube-proxy.md);
//! - fields of kube-proxy's own machinery (iptables marks, IPVS, Windows,
//!   conntrack timeouts, profiling, ...) are read and ignored: each one set
//!   to something other than its zero value or kube-proxy's default gets one
//!   warning naming the file and the field. kubeadm writes every field at its
//!   zero value, so its file warns only about what the admin changed (and
//!   `clusterCIDR`, which it fills in from the pod subnet);
//! - unknown fields get one warning each and are otherwise ignored. (Recent
//!   kube-proxy refuses them; warning instead lets the file of a newer
//!   kube-proxy, with fields this agent does not know yet, still load.)
//! - `null` and a missing field are the same thing, as in Go's decoder;
//!   durations are Go's (`"30s"`, `"1m0s"`, `"1h30m"`), and `0s` means the
//!   default, as in kube-proxy;
//! - a wrong `kind` or `apiVersion`, a file that does not parse, a value of
//!   the wrong type or out of range is an error naming the file (and the
//!   field).
//!
//! # Invoked as kube-proxy
//! [`implied_run`]: when the binary is called `kube-proxy` (the image ships
//! `/usr/local/bin/kube-proxy` → `proxy-agent`), or when its first argument
//! is a flag rather than a subcommand, `run` is implied — so kubeadm's
//! `DaemonSet` command, `/usr/local/bin/kube-proxy
//! --config=/var/lib/kube-proxy/config.conf --hostname-override=$(NODE_NAME)`,
//! starts the agent unchanged.
use std::{
    collections::BTreeMap,
    ffi::OsString,
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{ArgMatches, parser::ValueSource};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_yaml::Value;

use crate::{
    agent::{NodePortAddresses, RunConfig, SourceConfig},
    datapath::{SocketLb, XdpAttachMode},
    model::Cidr,
};

/// The `--devices` default: the usual uplink names, the host side of the
/// common CNIs' pod veths and their overlay devices (the list
/// deploy/configmap.yaml explains, device by device).
pub const DEFAULT_DEVICES: &str =
    "eth*,en*,bond*,veth*,cali*,eni*,lxc*,antrea-*,flannel*,vxlan*,tunl*,wireguard*,cilium_*,weave,wg*";

/// The `apiVersion` of the configuration file.
pub const KUBE_PROXY_API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The `kind` of the configuration file.
pub const KUBE_PROXY_KIND: &str = "KubeProxyConfiguration";

const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;

/// The flags of `proxy-agent run`.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// kube-proxy's configuration file: a `KubeProxyConfiguration`
    /// (kubeproxy.config.k8s.io/v1alpha1, as kubeadm writes it in the
    /// kube-proxy `ConfigMap`). Its fields set the flags of the same meaning;
    /// flags given on the command line win; fields with no meaning here get
    /// one warning each.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Read Services and `EndpointSlices` from this directory of manifests
    /// (YAML/JSON) instead of the API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig of the API server (default: $KUBECONFIG, ~/.kube/config, then in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Devices to attach to: comma-separated names or globs (e.g. "eth0,lxc*").
    /// The default covers the usual uplinks and the common CNIs' pod and
    /// overlay devices.
    #[arg(long, default_value = DEFAULT_DEVICES)]
    pub devices: String,
    /// This node's name (default: $`NODE_NAME`, else the hostname).
    #[arg(long, env = "NODE_NAME", visible_alias = "hostname-override")]
    pub node_name: Option<String>,
    /// Least time between two syncs; bursts of changes are coalesced (kube-proxy's minSyncPeriod).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub min_sync_period: Duration,
    /// A sync runs at least this often (kube-proxy's syncPeriod); twice this is the health timeout.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub sync_period: Duration,
    /// Address for /healthz and /livez ("" disables).
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_bind)]
    pub healthz_bind_address: Bind,
    /// Address for /metrics ("" disables).
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_bind)]
    pub metrics_bind_address: Bind,
    /// CIDRs whose node addresses serve `NodePorts` (default: the primary
    /// address of each --devices device; "primary" says the same).
    #[arg(long, default_value = "", value_parser = NodePortAddresses::parse)]
    pub nodeport_addresses: NodePortAddresses,
    /// Also attach the XDP fast path for north-south traffic to remote backends.
    #[arg(long)]
    pub xdp: bool,
    /// XDP mode: auto (native, but generic on veth, whose frames native
    /// XDP cannot translate correctly), native (forced; devices without it
    /// keep the TC path) or generic.
    #[arg(long, value_enum, default_value = "auto", requires = "xdp")]
    pub xdp_mode: XdpAttachMode,
    /// Socket-level load balancing: all sockets in --cgroup, only those in
    /// the host network namespace (host-only), or none (off: the
    /// per-packet path carries everything).
    #[arg(long, value_enum, default_value = "all")]
    pub socket_lb: SocketLb,
    /// The cgroup v2 directory the socket programs attach to (default:
    /// the cgroup v2 root, found in /proc/mounts).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Flows the conntrack holds (two map entries each); 0 or unset:
    /// max(--conntrack-min, --conntrack-max-per-core × CPUs), as kube-proxy.
    #[arg(long)]
    pub conntrack_max: Option<u32>,
    /// Least flows the conntrack holds (kube-proxy's default).
    #[arg(long, default_value_t = proxy_common::ct::CONNTRACK_MIN_DEFAULT)]
    pub conntrack_min: u32,
    /// Flows per CPU (kube-proxy's default).
    #[arg(long, default_value_t = proxy_common::ct::CONNTRACK_MAX_PER_CORE_DEFAULT)]
    pub conntrack_max_per_core: u32,
    /// Entries of the service map (one per frontend — Service port ×
    /// address — plus one per backend of each) and of the backend map
    /// (one per endpoint address:port:protocol). 1/64 of the service
    /// map is held back for frontends that do not fit: those are served
    /// closed (rejected) until they fit.
    #[arg(long, default_value_t = proxy_common::svc::SVC_MAX_ENTRIES, value_parser = clap::value_parser!(u32).range(8..))]
    pub lb_map_max: u32,
    /// The Service CIDRs (the API server's --service-cluster-ip-range):
    /// externalIPs inside them are refused.
    #[arg(long, default_value = "", value_parser = crate::model::parse_cidrs)]
    pub service_cidrs: Cidrs,
    /// Serve only externalIPs inside these CIDRs (default: all, as
    /// kube-proxy); others are refused with a warning.
    #[arg(long, value_parser = crate::model::parse_cidrs)]
    pub external_ip_cidrs: Option<Cidrs>,
    /// Log verbosity, as kube-proxy's --v: 0-3 info, 4-5 debug, 6 and more
    /// trace. $`RUST_LOG`, when set, wins.
    #[arg(long = "v", short = 'v', value_name = "N")]
    pub verbosity: Option<u32>,
    /// kube-proxy's --proxy-mode: accepted, and ignored with a warning (the
    /// datapath is eBPF); it picks the file's iptables, ipvs or nftables
    /// section, as kube-proxy's mode does.
    #[arg(long, value_name = "MODE")]
    pub proxy_mode: Option<String>,
    /// kube-proxy's --cluster-cidr: accepted, and ignored with a warning.
    #[arg(long, value_name = "CIDRS")]
    pub cluster_cidr: Option<String>,
}

/// A list of CIDRs (clap needs a named type for a parsed `Vec`).
pub type Cidrs = Vec<Cidr>;

/// A bind address, or none ("" disables the server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bind(pub Option<SocketAddr>);

/// `--healthz-bind-address` / `--metrics-bind-address`: `ADDR:PORT`, or ""
/// for none.
pub fn parse_bind(s: &str) -> Result<Bind, String> {
    if s.is_empty() {
        return Ok(Bind(None));
    }
    s.parse().map(|a| Bind(Some(a))).map_err(|e| format!("invalid address {s:?}: {e}"))
}

/// The duration flags: a number with `ms`, `s` (the default) or `m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// A Go duration, as `metav1.Duration` writes it: `"30s"`, `"1m0s"`,
/// `"1h2m3.5s"`, `"250ms"`, `"0s"` or `"0"`. Negative ones are refused
/// (kube-proxy refuses them for every field read here).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (Go's format, e.g. \"30s\", \"1m0s\", \"1h30m\", \"250ms\")");
    let t = s.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.starts_with('-') {
        return Err(format!("negative duration {s:?}"));
    }
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err(bad());
    }
    let mut rest = t;
    let mut secs = 0f64;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        secs += n * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// A `metav1.Duration` field of the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\" or \"1m0s\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<GoDuration, E> {
                parse_go_duration(s).map(GoDuration).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", self.0.as_secs_f64()))
    }
}

impl GoDuration {
    fn is(d: Option<Self>, defaults: &[Duration]) -> bool {
        d.is_none_or(|d| d.0.is_zero() || defaults.contains(&d.0))
    }
}

/// A sub-object written as `null` is the same as one left out.
fn null_is_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration`: every field
/// of kube-proxy up to 1.34 (and a few older ones: `udpIdleTimeout`,
/// `resourceContainer`, `conntrack.max`). Every leaf is optional: `null`
/// and a missing field are the same, as in Go.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    #[serde(deserialize_with = "null_is_default")]
    pub client_connection: ClientConnection,
    #[serde(deserialize_with = "null_is_default")]
    pub logging: Logging,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    #[serde(deserialize_with = "null_is_default")]
    pub iptables: IpTables,
    #[serde(deserialize_with = "null_is_default")]
    pub ipvs: Ipvs,
    #[serde(deserialize_with = "null_is_default")]
    pub nftables: NfTables,
    #[serde(deserialize_with = "null_is_default")]
    pub winkernel: Winkernel,
    pub detect_local_mode: Option<String>,
    #[serde(deserialize_with = "null_is_default")]
    pub detect_local: DetectLocal,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    #[serde(deserialize_with = "null_is_default")]
    pub conntrack: Conntrack,
    pub config_sync_period: Option<GoDuration>,
    pub port_range: Option<String>,
    pub windows_run_as_service: Option<bool>,
    /// Removed from kube-proxy (userspace mode); still in old files.
    pub udp_idle_timeout: Option<GoDuration>,
    /// Removed from kube-proxy; still in old files.
    pub resource_container: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f64>,
    pub burst: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Logging {
    pub format: Option<String>,
    /// Nanoseconds, or a duration string.
    pub flush_frequency: Option<Value>,
    pub verbosity: Option<u32>,
    pub vmodule: Option<Value>,
    pub options: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IpTables {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub localhost_node_ports: Option<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Ipvs {
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub tcp_timeout: Option<GoDuration>,
    pub tcp_fin_timeout: Option<GoDuration>,
    pub udp_timeout: Option<GoDuration>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NfTables {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Winkernel {
    pub network_name: Option<String>,
    pub source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<bool>,
    pub root_hns_endpoint_name: Option<String>,
    pub forward_health_check_vip: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Conntrack {
    /// Removed from kube-proxy (an absolute size); still in old files.
    pub max: Option<i32>,
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<GoDuration>,
    pub udp_stream_timeout: Option<GoDuration>,
}

/// The configuration file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("kube-proxy configuration {}: {reason}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub reason: String,
}

impl ConfigError {
    fn new(path: &Path, reason: impl Into<String>) -> Self {
        Self { path: path.to_owned(), reason: reason.into() }
    }
}

/// A setting that was given and is ignored: one log line each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// The file, or "command line".
    pub source: String,
    /// The field (`conntrack.tcpEstablishedTimeout`) or the flag.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.source, self.field, self.reason)
    }
}

/// What a configuration file sets, flag by flag (`None`: not set there).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileSettings {
    pub kubeconfig: Option<PathBuf>,
    pub node_name: Option<String>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub nodeport_addresses: Option<NodePortAddresses>,
    pub conntrack_max: Option<u32>,
    pub conntrack_min: Option<u32>,
    pub conntrack_max_per_core: Option<u32>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub verbosity: Option<u32>,
}

/// kube-proxy's proxy mode, which picks the section the sync periods come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    IpTables,
    Ipvs,
    NfTables,
}

impl Mode {
    fn of(mode: &str) -> Self {
        match mode.trim().to_ascii_lowercase().as_str() {
            "ipvs" => Self::Ipvs,
            "nftables" => Self::NfTables,
            // "" is iptables on Linux, as in kube-proxy; others too.
            _ => Self::IpTables,
        }
    }

    fn section(self) -> &'static str {
        match self {
            Self::IpTables => "iptables",
            Self::Ipvs => "ipvs",
            Self::NfTables => "nftables",
        }
    }
}

/// Collects the warnings of one file.
struct Warnings<'a> {
    source: &'a str,
    out: Vec<Warning>,
}

impl Warnings<'_> {
    fn push(&mut self, field: &str, reason: impl Into<String>) {
        self.out.push(Warning { source: self.source.to_owned(), field: field.to_owned(), reason: reason.into() });
    }

    /// One warning when `set` (the field differs from its zero value and
    /// kube-proxy's default).
    fn ignored(&mut self, set: bool, field: &str, value: impl fmt::Debug, why: &str) {
        if set {
            self.push(field, format!("{value:?} is ignored: {why}"));
        }
    }
}

/// A value as it appears in a warning: as written (durations Go's way,
/// free-form values as JSON), not as Rust's `Debug` would show it.
struct Shown(String);

impl fmt::Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Shown {
    fn of(d: Option<GoDuration>) -> Self {
        Self(d.map_or_else(String::new, |d| go_duration(d.0)))
    }
}

/// A duration as Go prints it: `1h0m0s`, `1m30s`, `2.5s`, `250ms`.
fn go_duration(d: Duration) -> String {
    fn trim(x: f64) -> String {
        let s = format!("{x:.9}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
    if d.is_zero() {
        return "0s".to_owned();
    }
    let nanos = d.as_nanos();
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", trim(d.as_secs_f64() * 1e6));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim(d.as_secs_f64() * 1e3));
    }
    let (h, m) = (d.as_secs() / 3600, d.as_secs() / 60 % 60);
    let s = trim(d.saturating_sub(Duration::from_secs(h * 3600 + m * 60)).as_secs_f64());
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m{s}s"),
        (h, m) => format!("{h}h{m}m{s}s"),
    }
}

const WHY_MASQUERADE: &str = "there is no iptables mark here; the eBPF datapath SNATs only what needs it (NodePort, externalIP and LoadBalancer traffic to a backend on another node, hairpin flows)";
const WHY_TIMEOUTS: &str = "conntrack timeouts are fixed here (unconfirmed TCP 60 s / UDP 30 s, established TCP 6 h, UDP 180 s, closing 10 s)";
const WHY_IPVS: &str = "there is no IPVS here";
const WHY_WINDOWS: &str = "Windows only";
const WHY_LOCAL: &str = "the agent does not tell cluster traffic by its source (kube-proxy uses it to masquerade off-cluster traffic to ClusterIPs and to short-circuit local pods' traffic to externalTrafficPolicy: Local services)";

/// Whether a free-form value is all zeros, empty strings, `false` and nulls
/// (what Go writes for a field left at its zero value).
fn is_zeroish(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || s == "0",
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.values().all(is_zeroish),
        Value::Tagged(t) => is_zeroish(&t.value),
    }
}

fn nonempty(s: Option<&String>) -> Option<&str> {
    s.map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// `IP:PORT`, `IP` (the port is added, as kube-proxy does), `[IPv6]`.
fn bind_address(field: &str, s: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    ip.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, port))
        .map_err(|_| format!("{field}: {s:?} is not an address (IP:PORT or IP)"))
}

fn non_negative(field: &str, v: Option<i32>) -> Result<Option<u32>, String> {
    v.map(|n| u32::try_from(n).map_err(|_| format!("{field}: {n} is negative"))).transpose()
}

impl KubeProxyConfiguration {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, format!("cannot be read: {e}")))?;
        Self::parse(&text).map_err(|reason| ConfigError::new(path, reason))
    }

    /// Parses the text of a configuration file (errors without the file name).
    pub fn parse(text: &str) -> Result<Self, String> {
        let doc: Value = serde_yaml::from_str(text).map_err(|e| format!("not valid YAML or JSON: {e}"))?;
        let Value::Mapping(map) = &doc else {
            return Err(format!("not a {KUBE_PROXY_KIND} (the document is not a mapping)"));
        };
        let kind = map.get("kind").and_then(Value::as_str).unwrap_or("");
        let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if kind != KUBE_PROXY_KIND {
            let hint = if kind == "ConfigMap" {
                " — this is the ConfigMap; point --config at its config.conf key (where the DaemonSet mounts it)"
            } else {
                ""
            };
            return Err(format!("kind is {kind:?}, not {KUBE_PROXY_KIND:?}{hint}"));
        }
        if api_version != KUBE_PROXY_API_VERSION {
            return Err(format!("apiVersion {api_version:?} is not supported (only {KUBE_PROXY_API_VERSION})"));
        }
        serde_yaml::from_str(text).map_err(|e| format!("{e}"))
    }

    /// The fields of `text` (a configuration file) this agent does not
    /// know, as dotted paths.
    pub fn unknown_fields(text: &str) -> Vec<String> {
        fn walk(doc: &Value, known: &Value, path: &str, out: &mut Vec<String>) {
            let (Value::Mapping(d), Value::Mapping(k)) = (doc, known) else { return };
            for (key, v) in d {
                let name = key.as_str().map_or_else(|| format!("{key:?}"), str::to_owned);
                let at = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
                match k.get(name.as_str()) {
                    None => out.push(at),
                    // A sub-object: its fields are known one by one.
                    Some(kv @ Value::Mapping(km)) if !km.is_empty() => walk(v, kv, &at, out),
                    Some(_) => {}
                }
            }
        }
        let known = serde_yaml::to_value(Self::default()).expect("the defaults serialize");
        let mut out = Vec::new();
        if let Ok(doc) = serde_yaml::from_str::<Value>(text) {
            walk(&doc, &known, "", &mut out);
        }
        out
    }

    /// What the file sets, and a warning for each field set to something
    /// this agent ignores. `source` names the file in the warnings;
    /// `mode_flag` is `--proxy-mode` (it overrides `mode`, as in kube-proxy).
    pub fn settings(&self, source: &str, mode_flag: Option<&str>) -> Result<(FileSettings, Vec<Warning>), String> {
        let mut w = Warnings { source, out: Vec::new() };
        let mut s = FileSettings {
            kubeconfig: nonempty(self.client_connection.kubeconfig.as_ref()).map(PathBuf::from),
            // As kube-proxy: trimmed and lower-cased.
            node_name: nonempty(self.hostname_override.as_ref()).map(str::to_lowercase),
            verbosity: self.logging.verbosity.filter(|v| *v > 0),
            ..FileSettings::default()
        };
        if let Some(gates) = self.feature_gates.as_ref().filter(|g| !g.is_empty()) {
            let list: Vec<String> = gates.iter().map(|(k, v)| format!("{k}={v}")).collect();
            w.push("featureGates", format!("{} is ignored: kube-proxy's feature gates do not apply to this agent", list.join(",")));
        }
        self.client_and_logging(&mut w);
        self.listeners(&mut w, &mut s)?;
        self.sync_periods(&mut w, &mut s, mode_flag);
        self.kube_proxy_machinery(&mut w);
        s.nodeport_addresses = self.nodeport_addresses(&mut w)?;
        self.conntrack_sizes(&mut w, &mut s)?;
        Ok((s, w.out))
    }

    /// `clientConnection` (but its kubeconfig) and `logging` (but its verbosity).
    fn client_and_logging(&self, w: &mut Warnings<'_>) {
        const NO_LIMIT: &str = "the agent's client has no rate limit (it lists and watches)";
        let cc = &self.client_connection;
        let accept = nonempty(cc.accept_content_types.as_ref());
        w.ignored(accept.is_some(), "clientConnection.acceptContentTypes", accept.unwrap_or_default(), "the agent's client asks for JSON");
        let content = nonempty(cc.content_type.as_ref()).filter(|t| *t != "application/vnd.kubernetes.protobuf");
        w.ignored(content.is_some(), "clientConnection.contentType", content.unwrap_or_default(), "the agent's client speaks JSON");
        let qps = cc.qps.filter(|q| *q != 0.0 && (q - 5.0).abs() > f64::EPSILON);
        w.ignored(qps.is_some(), "clientConnection.qps", qps.unwrap_or_default(), NO_LIMIT);
        let burst = cc.burst.filter(|b| *b != 0 && *b != 10);
        w.ignored(burst.is_some(), "clientConnection.burst", burst.unwrap_or_default(), NO_LIMIT);

        let log = &self.logging;
        let format = nonempty(log.format.as_ref()).filter(|f| *f != "text");
        w.ignored(format.is_some(), "logging.format", format.unwrap_or_default(), "logs are text lines on stderr");
        let flush_default = log.flush_frequency.as_ref().is_none_or(|v| match v {
            Value::Number(n) => n.as_u64().is_some_and(|n| n == 0 || n == 5_000_000_000),
            Value::String(t) => parse_go_duration(t).is_ok_and(|d| d.is_zero() || d == Duration::from_secs(5)),
            other => is_zeroish(other),
        });
        let show = |v: &Option<Value>| Shown(v.as_ref().map_or_else(String::new, |v| serde_json::to_string(v).unwrap_or_default()));
        w.ignored(!flush_default, "logging.flushFrequency", show(&log.flush_frequency), "every log line is written at once");
        let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !is_zeroish(v));
        w.ignored(set(&log.vmodule), "logging.vmodule", show(&log.vmodule), "use RUST_LOG (e.g. RUST_LOG=info,proxy_agent::source=debug)");
        w.ignored(set(&log.options), "logging.options", show(&log.options), "logs are text lines on stderr");
    }

    /// `bindAddress`, `healthzBindAddress`, `metricsBindAddress`,
    /// `enableProfiling`, `showHiddenMetricsForVersion`.
    fn listeners(&self, w: &mut Warnings<'_>, s: &mut FileSettings) -> Result<(), String> {
        // bindAddress: kube-proxy's idea of the node's primary IP, and the
        // family of the default health and metrics addresses.
        let bind = nonempty(self.bind_address.as_ref());
        let bind_ip = bind.map(|b| b.parse::<IpAddr>().map_err(|_| format!("bindAddress: {b:?} is not an IP address"))).transpose()?;
        w.ignored(
            bind_ip.is_some_and(|ip| !ip.is_unspecified()),
            "bindAddress",
            bind.unwrap_or_default(),
            "the node's addresses come from the --devices devices (and --nodeport-addresses)",
        );
        let v6 = bind_ip.is_some_and(|ip| ip.is_ipv6());
        s.healthz_bind_address = match nonempty(self.healthz_bind_address.as_ref()) {
            Some(a) => Some(bind_address("healthzBindAddress", a, HEALTHZ_PORT)?),
            None => v6.then_some(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), HEALTHZ_PORT)),
        };
        s.metrics_bind_address = match nonempty(self.metrics_bind_address.as_ref()) {
            Some(a) => Some(bind_address("metricsBindAddress", a, METRICS_PORT)?),
            None => v6.then_some(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), METRICS_PORT)),
        };
        // bindAddressHardFail: the agent always exits when it cannot listen
        // (as with `true`); no warning either way (documented).
        w.ignored(self.enable_profiling == Some(true), "enableProfiling", true, "there is no /debug/pprof here");
        let hidden = nonempty(self.show_hidden_metrics_for_version.as_ref());
        w.ignored(hidden.is_some(), "showHiddenMetricsForVersion", hidden.unwrap_or_default(), "the agent has no hidden metrics");
        Ok(())
    }

    /// `mode` picks the section whose `syncPeriod` and `minSyncPeriod` are
    /// read; the datapath is eBPF whatever it says.
    fn sync_periods(&self, w: &mut Warnings<'_>, s: &mut FileSettings, mode_flag: Option<&str>) {
        let file_mode = nonempty(self.mode.as_ref());
        let mode = Mode::of(mode_flag.or(file_mode).unwrap_or(""));
        if let (None, Some(m)) = (mode_flag, file_mode) {
            w.push(
                "mode",
                format!("{m:?} is ignored: the eBPF datapath replaces kube-proxy's modes (the sync periods are read from the {} section)", mode.section()),
            );
        }
        let sections = [
            (Mode::IpTables, self.iptables.sync_period, self.iptables.min_sync_period),
            (Mode::Ipvs, self.ipvs.sync_period, self.ipvs.min_sync_period),
            (Mode::NfTables, self.nftables.sync_period, self.nftables.min_sync_period),
        ];
        for (m, sync, min_sync) in sections {
            if m == mode {
                // 0s (what kubeadm writes) is kube-proxy's default.
                s.sync_period = sync.map(|d| d.0).filter(|d| !d.is_zero());
                s.min_sync_period = min_sync.map(|d| d.0).filter(|d| !d.is_zero());
            } else {
                let why = format!("the mode is {}: its section is the one read", mode.section());
                let sec = m.section();
                w.ignored(!GoDuration::is(sync, &[Duration::from_secs(30)]), &format!("{sec}.syncPeriod"), Shown::of(sync), &why);
                w.ignored(!GoDuration::is(min_sync, &[Duration::from_secs(1)]), &format!("{sec}.minSyncPeriod"), Shown::of(min_sync), &why);
            }
        }
    }

    /// The fields of kube-proxy's iptables, IPVS, nftables and Windows
    /// machinery, and of its local-traffic detection.
    fn kube_proxy_machinery(&self, w: &mut Warnings<'_>) {
        const GONE: &str = "kube-proxy no longer uses it either";
        for (sec, bit, all) in [
            ("iptables", self.iptables.masquerade_bit, self.iptables.masquerade_all),
            ("nftables", self.nftables.masquerade_bit, self.nftables.masquerade_all),
        ] {
            w.ignored(bit.is_some_and(|b| b != 14), &format!("{sec}.masqueradeBit"), bit.unwrap_or_default(), WHY_MASQUERADE);
            w.ignored(all == Some(true), &format!("{sec}.masqueradeAll"), true, WHY_MASQUERADE);
        }
        w.ignored(
            self.iptables.localhost_node_ports == Some(false),
            "iptables.localhostNodePorts",
            false,
            "NodePorts always answer on 127.0.0.1 to node-local clients (socket-level balancing)",
        );
        w.ignored(
            self.iptables.snat_node_internal_ip == Some(true),
            "iptables.snatNodeInternalIP",
            true,
            "SNAT uses the address the kernel picks for the route, as MASQUERADE does",
        );
        let ipvs = &self.ipvs;
        let scheduler = nonempty(ipvs.scheduler.as_ref());
        w.ignored(scheduler.is_some(), "ipvs.scheduler", scheduler.unwrap_or_default(), "backends are chosen at random");
        let exclude = ipvs.exclude_cidrs.as_ref().filter(|c| !c.is_empty());
        w.ignored(exclude.is_some(), "ipvs.excludeCIDRs", exclude.cloned().unwrap_or_default(), WHY_IPVS);
        w.ignored(ipvs.strict_arp == Some(true), "ipvs.strictARP", true, WHY_IPVS);
        for (f, d) in [("ipvs.tcpTimeout", ipvs.tcp_timeout), ("ipvs.tcpFinTimeout", ipvs.tcp_fin_timeout), ("ipvs.udpTimeout", ipvs.udp_timeout)] {
            w.ignored(!GoDuration::is(d, &[]), f, Shown::of(d), WHY_TIMEOUTS);
        }
        let wk = &self.winkernel;
        for (f, v) in [
            ("winkernel.networkName", &wk.network_name),
            ("winkernel.sourceVip", &wk.source_vip),
            ("winkernel.rootHnsEndpointName", &wk.root_hns_endpoint_name),
        ] {
            w.ignored(nonempty(v.as_ref()).is_some(), f, nonempty(v.as_ref()).unwrap_or_default(), WHY_WINDOWS);
        }
        w.ignored(wk.enable_dsr == Some(true), "winkernel.enableDSR", true, WHY_WINDOWS);
        w.ignored(wk.forward_health_check_vip == Some(true), "winkernel.forwardHealthCheckVip", true, WHY_WINDOWS);
        w.ignored(self.windows_run_as_service == Some(true), "windowsRunAsService", true, WHY_WINDOWS);

        for (f, v) in [
            ("detectLocalMode", &self.detect_local_mode),
            ("detectLocal.bridgeInterface", &self.detect_local.bridge_interface),
            ("detectLocal.interfaceNamePrefix", &self.detect_local.interface_name_prefix),
            ("clusterCIDR", &self.cluster_cidr),
        ] {
            w.ignored(nonempty(v.as_ref()).is_some(), f, nonempty(v.as_ref()).unwrap_or_default(), WHY_LOCAL);
        }
        let oom = self.oom_score_adj.filter(|o| *o != -999);
        w.ignored(oom.is_some(), "oomScoreAdj", oom.unwrap_or_default(), "set the pod's OOM score with its priority and resources");
        w.ignored(
            !GoDuration::is(self.config_sync_period, &[Duration::from_mins(15)]),
            "configSyncPeriod",
            Shown::of(self.config_sync_period),
            "the agent's watches need no periodic re-list (a sync runs every syncPeriod)",
        );
        let ports = nonempty(self.port_range.as_ref());
        w.ignored(ports.is_some(), "portRange", ports.unwrap_or_default(), GONE);
        w.ignored(!GoDuration::is(self.udp_idle_timeout, &[Duration::from_millis(250)]), "udpIdleTimeout", Shown::of(self.udp_idle_timeout), GONE);
        let container = nonempty(self.resource_container.as_ref());
        w.ignored(container.is_some(), "resourceContainer", container.unwrap_or_default(), GONE);
    }

    /// `conntrack`: its sizes are kube-proxy's; its timeouts are fixed here.
    fn conntrack_sizes(&self, w: &mut Warnings<'_>, s: &mut FileSettings) -> Result<(), String> {
        let ct = &self.conntrack;
        s.conntrack_max = non_negative("conntrack.max", ct.max)?.filter(|m| *m > 0);
        s.conntrack_max_per_core = non_negative("conntrack.maxPerCore", ct.max_per_core)?;
        s.conntrack_min = non_negative("conntrack.min", ct.min)?;
        for (f, d, default) in [
            ("conntrack.tcpEstablishedTimeout", ct.tcp_established_timeout, &[Duration::from_hours(24)][..]),
            ("conntrack.tcpCloseWaitTimeout", ct.tcp_close_wait_timeout, &[Duration::from_hours(1)][..]),
            ("conntrack.udpTimeout", ct.udp_timeout, &[][..]),
            ("conntrack.udpStreamTimeout", ct.udp_stream_timeout, &[][..]),
        ] {
            w.ignored(!GoDuration::is(d, default), f, Shown::of(d), WHY_TIMEOUTS);
        }
        w.ignored(ct.tcp_be_liberal == Some(true), "conntrack.tcpBeLiberal", true, "the BPF conntrack does not track TCP windows");
        Ok(())
    }

    /// `nodePortAddresses`: CIDRs of both families and the keywords
    /// `primary`, `all` and `localhost` (both families each).
    fn nodeport_addresses(&self, w: &mut Warnings<'_>) -> Result<Option<NodePortAddresses>, String> {
        let Some(list) = self.node_port_addresses.as_ref().filter(|l| !l.is_empty()) else {
            return Ok(None);
        };
        let mut primary = false;
        let mut cidrs = Vec::new();
        for item in list.iter().map(|i| i.trim()) {
            match item {
                "primary" => primary = true,
                "all" => cidrs.extend(["0.0.0.0/0", "::/0"]),
                "localhost" => cidrs.extend(["127.0.0.0/8", "::1/128"]),
                i => cidrs.push(i),
            }
        }
        let text = match (primary, cidrs.is_empty()) {
            (true, true) => "primary".to_owned(),
            (true, false) => {
                w.push(
                    "nodePortAddresses",
                    format!("\"primary\" together with {cidrs:?} is not supported: only the ranges are used"),
                );
                cidrs.join(",")
            }
            (false, _) => cidrs.join(","),
        };
        NodePortAddresses::parse(&text).map(Some).map_err(|e| format!("nodePortAddresses: {e}"))
    }
}

/// What `proxy-agent run` runs with.
#[derive(Debug)]
pub struct Resolved {
    pub config: RunConfig,
    /// The tracing filter to use when `$RUST_LOG` is not set.
    pub log_filter: &'static str,
    /// One line each, to be logged once the logger is set up.
    pub warnings: Vec<Warning>,
    /// The kube-proxy configuration file that was read.
    pub file: Option<PathBuf>,
}

/// The tracing filter for kube-proxy's (klog's) verbosity.
#[must_use]
pub fn log_filter(verbosity: u32) -> &'static str {
    match verbosity {
        0..=3 => "info",
        4 | 5 => "info,proxy_agent=debug",
        _ => "debug,proxy_agent=trace",
    }
}

/// The node's hostname, the last resort for the node name.
#[must_use]
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// `cli` if the flag was given on the command line, else the file's value,
/// else `cli` (its environment variable or default).
fn pick<T>(given: bool, cli: T, file: Option<T>) -> T {
    if given { cli } else { file.unwrap_or(cli) }
}

impl RunArgs {
    /// Combines the flags with `--config`'s file. `matches` are the `run`
    /// subcommand's (they tell a flag given on the command line from a
    /// default or an environment variable).
    pub fn resolve(self, matches: &ArgMatches, bpffs: PathBuf) -> Result<Resolved, ConfigError> {
        let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        let mode_flag = self.proxy_mode.as_deref().map(str::trim).filter(|m| !m.is_empty());
        let (file, mut warnings) = match &self.config {
            Some(path) => {
                let source = path.display().to_string();
                let error = |reason: String| ConfigError::new(path, reason);
                let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot be read: {e}")))?;
                let (settings, mut warnings) =
                    KubeProxyConfiguration::parse(&text).and_then(|c| c.settings(&source, mode_flag)).map_err(error)?;
                warnings.extend(KubeProxyConfiguration::unknown_fields(&text).into_iter().map(|field| Warning {
                    source: source.clone(),
                    field,
                    reason: format!("unknown field (not in {KUBE_PROXY_API_VERSION} as this agent knows it): ignored"),
                }));
                (settings, warnings)
            }
            None => (FileSettings::default(), Vec::new()),
        };
        let flag_warning = |flag: &str, value: &str, why: &str| Warning {
            source: "command line".to_owned(),
            field: flag.to_owned(),
            reason: format!("{value:?} is ignored: {why}"),
        };
        if let Some(m) = mode_flag {
            warnings.push(flag_warning("--proxy-mode", m, "the eBPF datapath replaces kube-proxy's modes"));
        }
        if let Some(c) = self.cluster_cidr.as_deref().filter(|c| !c.trim().is_empty()) {
            warnings.push(flag_warning("--cluster-cidr", c, WHY_LOCAL));
        }

        let source = match self.manifests {
            Some(dir) => SourceConfig::Manifests(dir),
            None => SourceConfig::ApiServer { kubeconfig: pick(given("kubeconfig"), self.kubeconfig, file.kubeconfig.map(Some)) },
        };
        let node_name = pick(given("node_name"), self.node_name, file.node_name.map(Some)).unwrap_or_else(hostname);
        let verbosity = pick(given("verbosity"), self.verbosity, file.verbosity.map(Some));
        let config = RunConfig {
            source,
            devices: self.devices,
            bpffs,
            node_name,
            min_sync_period: pick(given("min_sync_period"), self.min_sync_period, file.min_sync_period),
            sync_period: pick(given("sync_period"), self.sync_period, file.sync_period),
            poll_interval: Duration::from_millis(250),
            device_interval: Duration::from_secs(1),
            healthz_bind_address: pick(given("healthz_bind_address"), self.healthz_bind_address.0, file.healthz_bind_address.map(Some)),
            metrics_bind_address: pick(given("metrics_bind_address"), self.metrics_bind_address.0, file.metrics_bind_address.map(Some)),
            nodeport_addresses: pick(given("nodeport_addresses"), self.nodeport_addresses, file.nodeport_addresses),
            xdp: self.xdp.then_some(self.xdp_mode),
            socket_lb: self.socket_lb,
            cgroup: self.cgroup,
            conntrack: crate::conntrack::Sizing {
                max: pick(given("conntrack_max"), self.conntrack_max, file.conntrack_max.map(Some)),
                min: pick(given("conntrack_min"), self.conntrack_min, file.conntrack_min),
                max_per_core: pick(given("conntrack_max_per_core"), self.conntrack_max_per_core, file.conntrack_max_per_core),
            },
            lb_map_max: self.lb_map_max,
            conntrack_gc_interval: Duration::from_secs(10),
            service_cidrs: self.service_cidrs,
            external_ip_cidrs: self.external_ip_cidrs,
        };
        Ok(Resolved { config, log_filter: log_filter(verbosity.unwrap_or(0)), warnings, file: self.config })
    }
}

/// kube-proxy's command line: `run` is implied when the binary is invoked
/// as `kube-proxy` (a link to it by that name), or when the first argument
/// after the global `--bpffs` is a flag rather than a subcommand.
/// `--help` and `--version` keep their meaning for `proxy-agent`; invoked
/// as `kube-proxy`, `--help` shows `run`'s flags.
#[must_use]
pub fn implied_run(mut args: Vec<OsString>) -> Vec<OsString> {
    let as_kube_proxy = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == "kube-proxy");
    let mut i = 1;
    while let Some(a) = args.get(i).and_then(|a| a.to_str()) {
        if a == "--bpffs" {
            i += 2;
        } else if a.starts_with("--bpffs=") {
            i += 1;
        } else {
            break;
        }
    }
    let Some(first) = args.get(i) else {
        if as_kube_proxy {
            args.push("run".into());
        }
        return args;
    };
    let first = first.to_string_lossy();
    let top_level = matches!(first.as_ref(), "-V" | "--version") || (!as_kube_proxy && matches!(first.as_ref(), "-h" | "--help"));
    // A subcommand (`run`, `services`, ...) never starts with '-'.
    if first.starts_with('-') && first != "--" && !top_level {
        args.insert(i, "run".into());
    }
    args
}

#[cfg(test)]
mod tests {
    use clap::{Args as _, FromArgMatches as _};

    use super::*;

    /// The kube-proxy `ConfigMap` kubeadm (1.31 to 1.34) creates, for
    /// `--pod-network-cidr=10.244.0.0/16`.
    const KUBEADM_CONFIGMAP: &str = include_str!("../../tests/fixtures/kubeadm/kube-proxy-configmap.yaml");

    /// Its `config.conf`: what kube-proxy reads with `--config`.
    fn kubeadm() -> String {
        let cm: Value = serde_yaml::from_str(KUBEADM_CONFIGMAP).expect("the fixture parses");
        cm["data"]["config.conf"].as_str().expect("config.conf").to_owned()
    }

    fn parse(text: &str) -> KubeProxyConfiguration {
        KubeProxyConfiguration::parse(text).expect("parses")
    }

    fn settings(text: &str) -> (FileSettings, Vec<Warning>) {
        parse(text).settings("/etc/kp.yaml", None).expect("settings")
    }

    fn fields(w: &[Warning]) -> Vec<&str> {
        w.iter().map(|w| w.field.as_str()).collect()
    }

    const HEAD: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

    fn with(body: &str) -> String {
        format!("{HEAD}{body}")
    }

    fn args(argv: &[&str]) -> (RunArgs, ArgMatches) {
        let cmd = RunArgs::augment_args(clap::Command::new("run"));
        let m = cmd.try_get_matches_from(std::iter::once("run").chain(argv.iter().copied())).expect("flags parse");
        (RunArgs::from_arg_matches(&m).expect("RunArgs"), m)
    }

    fn write_config(text: &str) -> (PathBuf, impl Drop) {
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("proxy-agent-config-test-{}-{n}.conf", std::process::id()));
        std::fs::write(&path, text).expect("write the config");
        (path.clone(), Rm(path))
    }

    fn resolve(config: &str, argv: &[&str]) -> Resolved {
        let (path, _rm) = write_config(config);
        let mut all = vec!["--config".to_owned(), path.display().to_string()];
        all.extend(argv.iter().map(|s| (*s).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let (a, m) = args(&all);
        a.resolve(&m, PathBuf::from("/sys/fs/bpf/test")).expect("resolves")
    }

    #[test]
    fn config_kubeadm_file_loads_maps_the_kubeconfig_and_warns_only_about_cluster_cidr() {
        let (s, w) = settings(&kubeadm());
        assert_eq!(
            s,
            FileSettings { kubeconfig: Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf")), ..FileSettings::default() },
            "everything else is at its zero value: the agent's defaults (kube-proxy's) apply"
        );
        assert_eq!(fields(&w), ["clusterCIDR"], "{w:#?}");
        assert!(w[0].to_string().starts_with("/etc/kp.yaml: clusterCIDR: \"10.244.0.0/16\" is ignored"), "{}", w[0]);
        assert!(KubeProxyConfiguration::unknown_fields(&kubeadm()).is_empty(), "{:?}", KubeProxyConfiguration::unknown_fields(&kubeadm()));
    }

    #[test]
    fn config_kubeadm_file_resolves_to_the_agent_defaults() {
        let r = resolve(&kubeadm(), &["--hostname-override=node-a"]);
        let c = &r.config;
        assert!(matches!(&c.source, SourceConfig::ApiServer { kubeconfig: Some(k) } if k == Path::new("/var/lib/kube-proxy/kubeconfig.conf")));
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(c.metrics_bind_address, Some("127.0.0.1:10249".parse().unwrap()));
        assert_eq!((c.sync_period, c.min_sync_period), (Duration::from_secs(30), Duration::from_secs(1)));
        assert_eq!(c.conntrack, crate::conntrack::Sizing::default());
        assert!(c.nodeport_addresses.is_default());
        assert_eq!(c.devices, DEFAULT_DEVICES);
        assert_eq!(r.log_filter, "info");
        assert_eq!(fields(&r.warnings), ["clusterCIDR"]);
    }

    #[test]
    fn config_every_mapped_field() {
        let (s, w) = settings(&with(
            "clientConnection: {kubeconfig: /etc/kc}\nhostnameOverride: ' Node-B '\n\
             healthzBindAddress: 192.0.2.1:10356\nmetricsBindAddress: 0.0.0.0\n\
             nodePortAddresses: [10.0.0.0/8, 192.168.1.0/24]\n\
             conntrack: {maxPerCore: 0, min: 65536, max: 100000}\n\
             iptables: {syncPeriod: 1m0s, minSyncPeriod: 250ms}\nlogging: {verbosity: 4}\n",
        ));
        assert_eq!(
            s,
            FileSettings {
                kubeconfig: Some("/etc/kc".into()),
                node_name: Some("node-b".into()),
                healthz_bind_address: Some("192.0.2.1:10356".parse().unwrap()),
                metrics_bind_address: Some("0.0.0.0:10249".parse().unwrap()),
                nodeport_addresses: Some(NodePortAddresses::parse("10.0.0.0/8,192.168.1.0/24").unwrap()),
                conntrack_max: Some(100_000),
                conntrack_min: Some(65536),
                conntrack_max_per_core: Some(0),
                sync_period: Some(Duration::from_mins(1)),
                min_sync_period: Some(Duration::from_millis(250)),
                verbosity: Some(4),
            }
        );
        assert!(w.is_empty(), "{w:#?}");
    }

    #[test]
    fn config_sync_periods_come_from_the_mode_section() {
        let body = "iptables: {syncPeriod: 10s, minSyncPeriod: 2s}\nipvs: {syncPeriod: 20s, minSyncPeriod: 3s}\nnftables: {syncPeriod: 40s, minSyncPeriod: 4s}\n";
        for (mode, sync, min) in [("", 10, 2), ("iptables", 10, 2), ("ipvs", 20, 3), ("nftables", 40, 4), ("kernelspace", 10, 2)] {
            let (s, w) = settings(&with(&format!("mode: \"{mode}\"\n{body}")));
            assert_eq!((s.sync_period, s.min_sync_period), (Some(Duration::from_secs(sync)), Some(Duration::from_secs(min))), "mode {mode:?}");
            // The other two sections' periods are not read: one warning each,
            // and one for the mode itself when set.
            let ws = fields(&w);
            assert_eq!(ws.iter().filter(|f| f.ends_with("yncPeriod")).count(), 4, "{mode}: {ws:?}");
            assert_eq!(ws.contains(&"mode"), !mode.is_empty(), "{mode}: {ws:?}");
        }
        // --proxy-mode picks the section instead of the file's mode.
        let (s, w) = parse(&with(&format!("mode: iptables\n{body}"))).settings("f", Some("ipvs")).unwrap();
        assert_eq!(s.sync_period, Some(Duration::from_secs(20)));
        assert!(!fields(&w).contains(&"mode"), "the flag's warning replaces the file's");
        // Zero means the default; the other sections at kube-proxy's defaults are silent.
        let (s, w) = settings(&with("mode: ipvs\nipvs: {syncPeriod: 0s, minSyncPeriod: \"0\"}\niptables: {syncPeriod: 30s, minSyncPeriod: 1s}\n"));
        assert_eq!((s.sync_period, s.min_sync_period), (None, None));
        assert_eq!(fields(&w), ["mode"]);
    }

    #[test]
    fn config_go_durations_print_as_go_does() {
        for (secs, want) in [(3600.0, "1h0m0s"), (90.0, "1m30s"), (2.5, "2.5s"), (0.25, "250ms"), (86400.0, "24h0m0s"), (0.0001, "100µs")] {
            assert_eq!(go_duration(Duration::from_secs_f64(secs)), want);
        }
        let (_, w) = settings(&with("conntrack: {tcpEstablishedTimeout: 1h}\n"));
        assert!(w[0].reason.starts_with("1h0m0s is ignored"), "{}", w[0]);
    }

    #[test]
    fn config_go_durations() {
        for (s, want) in [
            ("0", 0.0),
            ("0s", 0.0),
            ("30s", 30.0),
            ("1m0s", 60.0),
            ("1h30m", 5400.0),
            ("2h22m", 8520.0),
            ("250ms", 0.25),
            ("1.5s", 1.5),
            ("100us", 0.0001),
            ("100µs", 0.0001),
            ("10ns", 0.000_000_01),
            ("24h0m0s", 86400.0),
        ] {
            let d = parse_go_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert!((d.as_secs_f64() - want).abs() < 1e-9, "{s}: {d:?}");
        }
        for bad in ["", "30", "1x", "s", "-1s", "1m-1s", "abc"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} parses");
        }
        let e = KubeProxyConfiguration::parse(&with("iptables: {syncPeriod: 30}\n")).unwrap_err();
        assert!(e.contains("iptables.syncPeriod"), "the error names the field: {e}");
        let e = KubeProxyConfiguration::parse(&with("conntrack:\n  tcpEstablishedTimeout: 1d\n")).unwrap_err();
        assert!(e.contains("conntrack.tcpEstablishedTimeout") && e.contains("\"1d\""), "{e}");
    }

    #[test]
    fn config_wrong_kind_or_api_version_is_an_error_naming_the_file() {
        for (text, needle) in [
            ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n", "kind is \"KubeletConfiguration\""),
            ("apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n", "apiVersion \"kubeproxy.config.k8s.io/v1alpha2\" is not supported"),
            ("kind: KubeProxyConfiguration\n", "apiVersion \"\""),
            ("apiVersion: v1\nkind: ConfigMap\ndata: {config.conf: x}\n", "point --config at its config.conf key"),
            ("- a\n- b\n", "not a mapping"),
            ("a: [\n", "not valid YAML"),
            ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nconntrack: {min: -1}\n", "conntrack.min: -1 is negative"),
            ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nhealthzBindAddress: nowhere\n", "healthzBindAddress"),
        ] {
            let (path, _rm) = write_config(text);
            let (a, m) = args(&["--config", path.to_str().unwrap()]);
            let e = a.resolve(&m, PathBuf::from("/x")).expect_err(text).to_string();
            assert!(e.contains(&path.display().to_string()), "{e} names the file");
            assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        }
        let (a, m) = args(&["--config", "/nonexistent/kube-proxy.conf"]);
        let e = a.resolve(&m, PathBuf::from("/x")).expect_err("missing file").to_string();
        assert!(e.contains("/nonexistent/kube-proxy.conf") && e.contains("cannot be read"), "{e}");
    }

    #[test]
    fn config_flags_override_the_file_and_the_file_the_environment_default() {
        let file = with(
            "clientConnection: {kubeconfig: /from/file}\nhostnameOverride: file-node\n\
             healthzBindAddress: 127.0.0.1:1111\nmetricsBindAddress: 127.0.0.1:2222\n\
             nodePortAddresses: [10.0.0.0/8]\nconntrack: {maxPerCore: 1, min: 2}\n\
             iptables: {syncPeriod: 3s, minSyncPeriod: 2s}\nlogging: {verbosity: 5}\n",
        );
        let r = resolve(&file, &[]);
        let c = &r.config;
        assert!(matches!(&c.source, SourceConfig::ApiServer { kubeconfig: Some(k) } if k == Path::new("/from/file")));
        assert_eq!(c.node_name, "file-node");
        assert_eq!(c.healthz_bind_address, Some("127.0.0.1:1111".parse().unwrap()));
        assert_eq!(c.metrics_bind_address, Some("127.0.0.1:2222".parse().unwrap()));
        assert_eq!((c.conntrack.max_per_core, c.conntrack.min), (1, 2));
        assert_eq!((c.sync_period, c.min_sync_period), (Duration::from_secs(3), Duration::from_secs(2)));
        assert_eq!(r.log_filter, "info,proxy_agent=debug");

        let r = resolve(
            &file,
            &[
                "--kubeconfig=/from/flag",
                "--hostname-override=flag-node",
                "--healthz-bind-address=127.0.0.1:3333",
                "--metrics-bind-address=",
                "--nodeport-addresses=primary",
                "--conntrack-max-per-core=7",
                "--conntrack-min=8",
                "--sync-period=9s",
                "--min-sync-period=1s",
                "--v=0",
            ],
        );
        let c = &r.config;
        assert!(matches!(&c.source, SourceConfig::ApiServer { kubeconfig: Some(k) } if k == Path::new("/from/flag")));
        assert_eq!(c.node_name, "flag-node");
        assert_eq!(c.healthz_bind_address, Some("127.0.0.1:3333".parse().unwrap()));
        assert_eq!(c.metrics_bind_address, None, "\"\" on the command line disables, whatever the file says");
        assert!(c.nodeport_addresses.is_default());
        assert_eq!((c.conntrack.max_per_core, c.conntrack.min), (7, 8));
        assert_eq!((c.sync_period, c.min_sync_period), (Duration::from_secs(9), Duration::from_secs(1)), "even a flag equal to the default wins");
        assert_eq!(r.log_filter, "info");
        // --node-name is the same flag as --hostname-override.
        assert_eq!(resolve(&file, &["--node-name", "n2"]).config.node_name, "n2");
        // --manifests on the command line wins over the file's kubeconfig.
        assert!(matches!(resolve(&file, &["--manifests", "/m"]).config.source, SourceConfig::Manifests(_)));
    }

    #[test]
    fn config_ignored_fields_warn_once_each_naming_the_file() {
        let text = with(
            "featureGates: {Foo: true, Bar: false}\nclientConnection: {qps: 50, burst: 100, contentType: application/json}\n\
             logging: {format: json, flushFrequency: 1s, vmodule: [{filePattern: x, verbosity: 4}], options: {json: {infoBufferSize: \"1Mi\"}}}\n\
             bindAddress: 192.0.2.1\nenableProfiling: true\nshowHiddenMetricsForVersion: \"1.30\"\nmode: ipvs\n\
             iptables: {masqueradeAll: true, masqueradeBit: 12, localhostNodePorts: false, syncPeriod: 5s}\n\
             ipvs: {scheduler: rr, excludeCIDRs: [10.0.0.0/8], strictARP: true, tcpTimeout: 1s, tcpFinTimeout: 2s, udpTimeout: 3s}\n\
             nftables: {masqueradeAll: true}\nwinkernel: {enableDSR: true, networkName: n}\n\
             detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: veth, bridgeInterface: cni0}\nclusterCIDR: 10.244.0.0/16\n\
             oomScoreAdj: -500\nconntrack: {tcpEstablishedTimeout: 1h, tcpCloseWaitTimeout: 1m, tcpBeLiberal: true, udpTimeout: 30s, udpStreamTimeout: 2m}\n\
             configSyncPeriod: 1m\nportRange: 30000-32767\nudpIdleTimeout: 1s\nwindowsRunAsService: true\nresourceContainer: /kube-proxy\n\
             futureField: 1\nconntrack2: {}\n",
        );
        let (_, w) = settings(&text);
        let mut got = fields(&w);
        got.sort_unstable();
        let mut want = vec![
            "featureGates",
            "clientConnection.qps",
            "clientConnection.burst",
            "clientConnection.contentType",
            "logging.format",
            "logging.flushFrequency",
            "logging.vmodule",
            "logging.options",
            "bindAddress",
            "enableProfiling",
            "showHiddenMetricsForVersion",
            "mode",
            "iptables.syncPeriod",
            "iptables.masqueradeAll",
            "iptables.masqueradeBit",
            "iptables.localhostNodePorts",
            "ipvs.scheduler",
            "ipvs.excludeCIDRs",
            "ipvs.strictARP",
            "ipvs.tcpTimeout",
            "ipvs.tcpFinTimeout",
            "ipvs.udpTimeout",
            "nftables.masqueradeAll",
            "winkernel.enableDSR",
            "winkernel.networkName",
            "windowsRunAsService",
            "detectLocalMode",
            "detectLocal.interfaceNamePrefix",
            "detectLocal.bridgeInterface",
            "clusterCIDR",
            "oomScoreAdj",
            "conntrack.tcpEstablishedTimeout",
            "conntrack.tcpCloseWaitTimeout",
            "conntrack.tcpBeLiberal",
            "conntrack.udpTimeout",
            "conntrack.udpStreamTimeout",
            "configSyncPeriod",
            "portRange",
            "udpIdleTimeout",
            "resourceContainer",
        ];
        want.sort_unstable();
        assert_eq!(got, want);
        assert!(w.iter().all(|w| w.source == "/etc/kp.yaml" && w.reason.contains("ignored")), "{w:#?}");
        assert_eq!(KubeProxyConfiguration::unknown_fields(&text), ["futureField", "conntrack2"]);
        assert_eq!(KubeProxyConfiguration::unknown_fields(&with("conntrack: {maxPerCore: 1, typo: 2}\nlogging: {options: {x: 1}}\n")), ["conntrack.typo"]);

        // The same fields at kube-proxy's defaults (a fully defaulted file,
        // as `kube-proxy --write-config-to` writes it) are silent.
        let defaulted = with(
            "bindAddress: 0.0.0.0\nclientConnection: {contentType: application/vnd.kubernetes.protobuf, qps: 5, burst: 10}\n\
             logging: {format: text, flushFrequency: 5s, verbosity: 0, options: {json: {infoBufferSize: \"0\"}, text: {infoBufferSize: \"0\"}}}\n\
             iptables: {masqueradeBit: 14, masqueradeAll: false, localhostNodePorts: true, syncPeriod: 30s, minSyncPeriod: 1s}\n\
             ipvs: {syncPeriod: 30s, minSyncPeriod: 0s, scheduler: \"\", strictARP: false}\nnftables: {masqueradeBit: 14, syncPeriod: 30s, minSyncPeriod: 1s}\n\
             oomScoreAdj: -999\nconntrack: {maxPerCore: 32768, min: 131072, tcpEstablishedTimeout: 24h0m0s, tcpCloseWaitTimeout: 1h0m0s}\n\
             configSyncPeriod: 15m0s\nudpIdleTimeout: 250ms\nportRange: \"\"\nenableProfiling: false\nbindAddressHardFail: false\n",
        );
        let (s, w) = settings(&defaulted);
        assert!(w.is_empty(), "{w:#?}");
        assert_eq!((s.conntrack_max_per_core, s.conntrack_min), (Some(32768), Some(131_072)));
    }

    #[test]
    fn config_nodeport_addresses_keywords_and_families() {
        let npa = |list: &str| settings(&with(&format!("nodePortAddresses: {list}\n")));
        assert_eq!(npa("[primary]").0.nodeport_addresses, Some(NodePortAddresses::parse("primary").unwrap()));
        assert_eq!(npa("[all]").0.nodeport_addresses, Some(NodePortAddresses::parse("0.0.0.0/0,::/0").unwrap()));
        assert_eq!(npa("[localhost, 10.0.0.0/8]").0.nodeport_addresses, Some(NodePortAddresses::parse("127.0.0.0/8,::1/128,10.0.0.0/8").unwrap()));
        assert_eq!(npa("[]").0.nodeport_addresses, None, "empty: the default");
        let (s, w) = npa("[\"fd00::/64\", 10.0.0.0/8]");
        assert_eq!(s.nodeport_addresses, Some(NodePortAddresses::parse("fd00::/64,10.0.0.0/8").unwrap()), "both families");
        assert!(w.is_empty(), "{w:#?}");
        let (s, w) = npa("[primary, 10.0.0.0/8]");
        assert_eq!(s.nodeport_addresses, Some(NodePortAddresses::parse("10.0.0.0/8").unwrap()));
        assert_eq!(fields(&w), ["nodePortAddresses"]);
        let e = KubeProxyConfiguration::parse(&with("nodePortAddresses: [bogus]\n")).unwrap().settings("f", None).unwrap_err();
        assert!(e.starts_with("nodePortAddresses: "), "{e}");
    }

    #[test]
    fn config_ipv6_bind_address_moves_the_default_listeners() {
        let (s, _) = settings(&with("bindAddress: \"::\"\n"));
        assert_eq!(s.healthz_bind_address, Some("[::]:10256".parse().unwrap()));
        assert_eq!(s.metrics_bind_address, Some("[::1]:10249".parse().unwrap()));
        let (s, _) = settings(&with("healthzBindAddress: \"[::1]\"\nmetricsBindAddress: \"[::]:9999\"\n"));
        assert_eq!(s.healthz_bind_address, Some("[::1]:10256".parse().unwrap()));
        assert_eq!(s.metrics_bind_address, Some("[::]:9999".parse().unwrap()));
    }

    #[test]
    fn config_nulls_are_unset_and_json_loads() {
        let (s, w) = settings(&with("conntrack: null\niptables: {syncPeriod: null}\nhostnameOverride: null\nfeatureGates: null\n"));
        assert_eq!(s, FileSettings::default());
        assert!(w.is_empty());
        let json = r#"{"apiVersion":"kubeproxy.config.k8s.io/v1alpha1","kind":"KubeProxyConfiguration","hostnameOverride":"n","conntrack":{"min":5}}"#;
        let (s, _) = settings(json);
        assert_eq!((s.node_name.as_deref(), s.conntrack_min), (Some("n"), Some(5)));
    }

    #[test]
    fn config_kube_proxy_flags_are_accepted() {
        let r = resolve(&with(""), &["--v=6", "--proxy-mode=ipvs", "--cluster-cidr=10.244.0.0/16"]);
        assert_eq!(r.log_filter, "debug,proxy_agent=trace");
        assert_eq!(resolve(&with(""), &["-v=4"]).log_filter, "info,proxy_agent=debug", "klog's -v too");
        assert_eq!(resolve(&with(""), &["-v", "2"]).log_filter, "info");
        let mut f = fields(&r.warnings);
        f.sort_unstable();
        assert_eq!(f, ["--cluster-cidr", "--proxy-mode"]);
        assert!(r.warnings.iter().all(|w| w.source == "command line"));
        // Without --config nothing is read and nothing warns.
        let (a, m) = args(&["--node-name", "x"]);
        let r = a.resolve(&m, PathBuf::from("/x")).unwrap();
        assert!(r.warnings.is_empty() && r.file.is_none());
        assert_eq!(r.config.devices, DEFAULT_DEVICES);
    }

    #[test]
    fn config_implied_run_for_kube_proxy_command_lines() {
        let v = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let kubeadm = ["/usr/local/bin/kube-proxy", "--config=/var/lib/kube-proxy/config.conf", "--hostname-override=n"];
        assert_eq!(implied_run(v(&kubeadm)), v(&["/usr/local/bin/kube-proxy", "run", "--config=/var/lib/kube-proxy/config.conf", "--hostname-override=n"]));
        // The first argument a flag: run, whatever the binary's name.
        assert_eq!(implied_run(v(&["proxy-agent", "--config", "f"])), v(&["proxy-agent", "run", "--config", "f"]));
        assert_eq!(implied_run(v(&["proxy-agent", "--bpffs", "/b", "--v=2"])), v(&["proxy-agent", "--bpffs", "/b", "run", "--v=2"]));
        assert_eq!(implied_run(v(&["kube-proxy", "--bpffs=/b"])), v(&["kube-proxy", "--bpffs=/b", "run"]));
        assert_eq!(implied_run(v(&["kube-proxy"])), v(&["kube-proxy", "run"]));
        assert_eq!(implied_run(v(&["kube-proxy", "--help"])), v(&["kube-proxy", "run", "--help"]));
        // Unchanged: subcommands, top-level help and version, nothing.
        for same in [
            &["proxy-agent", "run", "--config", "f"][..],
            &["proxy-agent", "--bpffs", "/b", "services"],
            &["proxy-agent", "--bpffs=/b", "stats", "-o", "json"],
            &["proxy-agent", "--help"],
            &["proxy-agent", "-V"],
            &["kube-proxy", "--version"],
            &["proxy-agent"],
            &["kube-proxy", "cleanup"],
        ] {
            assert_eq!(implied_run(v(same)), v(same), "{same:?}");
        }
    }
}
