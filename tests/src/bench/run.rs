//! Running the cases: a fresh sandbox per (mode, number of Services), the
//! Services programmed the mode's way, then the load phases, each repeated.
//!
//! `ClusterIP` modes use the one-node sandbox ([`crate::sandbox`]: client →
//! node → pods). `NodePort` modes (`np-*`) use the two-node topology
//! ([`crate::cluster`]): the client reaches node A's address on a node port
//! and node A forwards to the pods, which are all on node B. The flood
//! modes (`np-*-flood`) are `np-tc` and `np-iptables` measured while a
//! spoofed flood arrives at node A ([`super::flood`]).
//!
//! Every data-path mode but the flood modes also runs over IPv6 (a case is
//! a mode, a [`Family`] and a number of Services): the same topology made
//! dual-stack ([`Sandbox::enable_ipv6`], [`Cluster::enable_ipv6`]), the
//! Services IPv6-only, the client talking IPv6 to the `ClusterIP`, node A's
//! IPv6 address or the pods' IPv6 addresses.
use std::{
    fmt,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use super::{
    args::{Args, Generator},
    flood::{ESTABLISHED, Established, Flood, FloodRep, LEAD_IN, Occupancy},
    program::{self, Programmed},
    services::{
        BULK_NODE_PORT, BULK_PORT, BULK_TARGET, Family, Frontend, HTTP_NODE_PORT, HTTP_PORT, HTTP_TARGET, ServiceSet, UDP_NODE_PORT,
        UDP_PORT, UDP_TARGET,
    },
    traffic::{Phase, PhaseResult, Target, run_phase, run_phase_process, start_servers},
};
use crate::{
    cgroup::TestCgroup,
    cluster::{Cluster, NODE_A_IP, NODE_A_IP6, NodeId},
    manifests::write_atomic,
    netns::Netns,
    sandbox::{Sandbox, pod_ip6},
};

/// Pods (the real Service's endpoints).
pub const PODS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Iptables,
    Nftables,
    Ipvs,
    /// The agent's per-packet TC path (its socket programs are attached, but
    /// the load generator is not in their cgroup).
    Ebpf,
    /// The same agent and Services, the load generator a process in the
    /// agent's `--cgroup`: its sockets are translated at `connect()` /
    /// `sendto()` (socket-level load balancing), no per-packet NAT.
    EbpfSock,
    /// `NodePort`: the client straight to the pods on node B, routed by node A.
    NpDirect,
    /// `NodePort`: kube-proxy's iptables rules on node A (DNAT + MASQUERADE).
    NpIptables,
    /// `NodePort`: this project's agent on node A, TC path.
    NpTc,
    /// `NodePort`: this project's agent on node A with `--xdp --xdp-mode native`.
    NpXdp,
    /// `np-iptables` while a spoofed flood arrives at node A.
    NpIptablesFlood,
    /// `np-tc` while a spoofed flood arrives at node A.
    NpTcFlood,
}

/// The `ClusterIP` modes.
pub const MODES: [Mode; 6] = [Mode::Direct, Mode::Iptables, Mode::Nftables, Mode::Ipvs, Mode::Ebpf, Mode::EbpfSock];
/// The `NodePort` (north-south) modes.
pub const NP_MODES: [Mode; 4] = [Mode::NpDirect, Mode::NpIptables, Mode::NpTc, Mode::NpXdp];
/// The `NodePort` modes under a spoofed flood (`--flood-pps`).
pub const FLOOD_MODES: [Mode; 2] = [Mode::NpIptablesFlood, Mode::NpTcFlood];

impl Mode {
    /// Whether this is a north-south (`NodePort`) mode.
    #[must_use]
    pub fn is_node_port(self) -> bool {
        NP_MODES.contains(&self) || self.is_flood()
    }

    /// Whether this is a flood mode.
    #[must_use]
    pub fn is_flood(self) -> bool {
        FLOOD_MODES.contains(&self)
    }

    /// The same mode without the flood (itself for the others).
    #[must_use]
    pub fn no_flood(self) -> Self {
        match self {
            Self::NpIptablesFlood => Self::NpIptables,
            Self::NpTcFlood => Self::NpTc,
            m => m,
        }
    }

    /// What its figures are divided by: `direct`, or `np-direct`.
    #[must_use]
    pub fn baseline(self) -> Self {
        if self.is_node_port() { Self::NpDirect } else { Self::Direct }
    }

    /// Whether the mode runs over `family` (the flood modes: IPv4 only).
    #[must_use]
    pub fn runs_over(self, family: Family) -> bool {
        family == Family::V4 || !self.is_flood()
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Ipvs => "ipvs",
            Self::Ebpf => "ebpf",
            Self::EbpfSock => "ebpf-sock",
            Self::NpDirect => "np-direct",
            Self::NpIptables => "np-iptables",
            Self::NpTc => "np-tc",
            Self::NpXdp => "np-xdp",
            Self::NpIptablesFlood => "np-iptables-flood",
            Self::NpTcFlood => "np-tc-flood",
        })
    }
}

/// The figures, in report order: (key, heading, unit, higher is better).
pub const METRICS: [(&str, &str, &str, bool); 8] = [
    ("conn_per_s", "new conn/s", "connections/s", true),
    ("req_per_s", "keep-alive req/s", "requests/s", true),
    ("bulk_gbit_s", "bulk Gbit/s", "Gbit/s", true),
    ("udp_rr_per_s", "UDP rr/s", "round trips/s", true),
    ("lat_p50_us", "p50 µs", "µs", false),
    ("lat_p99_us", "p99 µs", "µs", false),
    ("cpu_us_per_conn", "CPU µs/conn", "µs", false),
    ("cpu_us_per_req", "CPU µs/req", "µs", false),
];

/// One run of the phases: the figures in [`METRICS`] order (None when not
/// readable), plus errors seen.
#[derive(Clone, Debug, Default)]
pub struct Rep {
    pub values: Vec<Option<f64>>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Flood modes: the flood, the established connections, the conntrack.
    pub flood: Option<FloodRep>,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub mode: Mode,
    /// The family of the Services and of the traffic.
    pub family: Family,
    pub services: usize,
    /// Why the case could not be measured.
    pub skipped: Option<String>,
    pub program: Option<Programmed>,
    pub add_one: Option<Result<Duration, String>>,
    pub reps: Vec<Rep>,
    /// ebpf / ebpf-sock: the node's, np-tc / np-xdp: node A's exit-reason
    /// counters (name → packets) after the runs, which show what the socket
    /// programs, TC and XDP carried.
    pub counters: Option<std::collections::BTreeMap<String, u64>>,
}

impl Case {
    #[must_use]
    pub fn new(mode: Mode, family: Family, services: usize) -> Self {
        Self { mode, family, services, skipped: None, program: None, add_one: None, reps: Vec::new(), counters: None }
    }

    fn skipped(mode: Mode, family: Family, services: usize, why: String) -> Self {
        Self { skipped: Some(why), ..Self::new(mode, family, services) }
    }

    /// "ebpf IPv6 S=1000", for progress lines.
    #[must_use]
    pub fn label(&self) -> String {
        format!("{} {} S={}", self.mode, self.family, self.services)
    }

    /// For the agent's modes (whose node counters are read): whether the
    /// counters show the traffic took the mode's path, and what they show.
    /// `ebpf` and `np-tc`: the TC path translated new flows (and neither the
    /// socket programs nor XDP carried them); `ebpf-sock`: the socket
    /// programs translated at `connect()`/`sendto()` and the TC path no
    /// flow; `np-xdp`: XDP forwarded more packets than the TC path
    /// translated. None for other modes or without counters.
    #[must_use]
    pub fn path(&self) -> Option<(bool, String)> {
        let c = self.counters.as_ref()?;
        let n = |k: &str| c.get(k).copied().unwrap_or(0);
        let (dnat, est, sock, xdp) = (n("dnat_new_flow"), n("dnat_established"), n("sock_translated"), n("xdp_forward"));
        Some(match self.mode {
            Mode::Ebpf => {
                let ok = dnat > 0 && sock == 0;
                (ok, format!("TC path: dnat_new_flow {dnat}, sock_translated {sock}"))
            }
            Mode::EbpfSock => {
                let ok = sock > 0 && dnat == 0;
                let how = if sock == 0 {
                    format!("the socket programs translated nothing (sock_translated 0) and the TC path DNATed {dnat} new flows: these are TC-path figures")
                } else {
                    format!("socket path: sock_translated {sock}, dnat_new_flow {dnat}")
                };
                (ok, how)
            }
            Mode::NpTc | Mode::NpTcFlood => {
                let ok = dnat > 0 && xdp == 0;
                (ok, format!("TC path: dnat_new_flow {dnat}, xdp_forward {xdp}"))
            }
            Mode::NpXdp => {
                let ok = xdp > dnat + est;
                let how = if ok {
                    format!("XDP path: xdp_forward {xdp}, TC dnat_new_flow {dnat} + dnat_established {est}")
                } else {
                    format!(
                        "XDP forwarded {xdp} packets, the TC path translated {} (dnat_new_flow {dnat} + dnat_established {est}): these are mostly TC-path figures",
                        dnat + est
                    )
                };
                (ok, how)
            }
            _ => return None,
        })
    }

    /// Median and (min, max) of metric `m` over the runs.
    #[must_use]
    pub fn stat(&self, m: usize) -> Option<(f64, f64, f64)> {
        let mut v: Vec<f64> = self.reps.iter().filter_map(|r| r.values.get(m).copied().flatten()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let med = if v.len() % 2 == 1 { v[v.len() / 2] } else { f64::midpoint(v[v.len() / 2 - 1], v[v.len() / 2]) };
        Some((med, v[0], v[v.len() - 1]))
    }
}

/// Progress on stderr.
pub fn progress(msg: &str) {
    eprintln!("[bench {:>6.1}s] {msg}", START.with(|s| s.elapsed().as_secs_f64()));
}

thread_local! {
    static START: Instant = Instant::now();
}

fn ratio(part: Duration, n: f64) -> Option<f64> {
    (n > 0.0).then(|| part.as_secs_f64() * 1e6 / n)
}

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn rep_values(conn: &PhaseResult, rr: &PhaseResult, bulk: &PhaseResult, udp: &PhaseResult, lat: &mut PhaseResult) -> Vec<Option<f64>> {
    let nz = |r: &PhaseResult| (r.ops > 0).then(|| r.rate());
    vec![
        nz(conn),
        nz(rr),
        (bulk.bytes > 0).then(|| bulk.bytes as f64 * 8.0 / bulk.elapsed.as_secs_f64() / 1e9),
        nz(udp),
        super::traffic::percentile(&mut lat.samples_us, 50.0),
        super::traffic::percentile(&mut lat.samples_us, 99.0),
        ratio(conn.cpu, conn.ops as f64),
        ratio(rr.cpu, rr.ops as f64),
    ]
}

/// Where a case runs: the one-node sandbox or the two-node topology.
#[expect(clippy::large_enum_variant, reason = "a few live at once, one per case")]
enum Env {
    Node(Sandbox),
    Cluster(Cluster),
}

impl Env {
    fn client(&self) -> &Netns {
        match self {
            Self::Node(sb) => &sb.client,
            Self::Cluster(c) => &c.client,
        }
    }
}

/// A case being measured: its sandbox (with the Services programmed) and
/// servers. The cases of one number of Services exist side by side, so their
/// runs can be interleaved (drift in the machine's speed hits every mode).
pub struct Live {
    pub case: Case,
    // Declared before `env`: the servers stop before the namespaces go.
    servers: Option<super::traffic::Servers>,
    env: Option<Env>,
    set: ServiceSet,
    target: Target,
    /// `--generator process`, every mode but `ebpf-sock`: the empty cgroup
    /// the generator process runs in (`ebpf-sock`'s is the agent's).
    gen_cgroup: Option<TestCgroup>,
    /// Flood modes: the first spoofed source of the next run's flood (every
    /// run's sources are new).
    flood_next: u32,
}

/// A cgroup of its own for the generator process of a mode other than
/// `ebpf-sock` (so none of them is in the agent's `--cgroup`).
fn gen_cgroup(args: &Args, mode: Mode) -> Option<TestCgroup> {
    (args.generator == Generator::Process && mode != Mode::EbpfSock).then(|| TestCgroup::create("bg"))
}

/// Builds the sandbox for one case (dual-stack for IPv6) and programs its
/// Services; [`Live::ready`] before the runs.
#[must_use]
pub fn prepare(args: &Args, mode: Mode, family: Family, services: usize) -> Live {
    if mode.is_node_port() {
        return prepare_node_port(args, mode, family, services);
    }
    let set0 = ServiceSet::new(family, services, Vec::new());
    let mut live = Live {
        case: Case::new(mode, family, services),
        servers: None,
        env: None,
        target: Target { addrs: vec![set0.real_vip()], http: HTTP_PORT, bulk: BULK_PORT, udp: UDP_PORT },
        set: set0,
        gen_cgroup: None,
        flood_next: 0,
    };
    if mode == Mode::Ipvs {
        live.case.skipped = Some(ipvs_unavailable());
        return live;
    }
    let label = live.case.label();
    progress(&format!("{label}: building the sandbox ({PODS} pods)"));
    let mut sb = Sandbox::new("bn", PODS);
    if family == Family::V6 {
        sb.enable_ipv6();
    }
    live.gen_cgroup = gen_cgroup(args, mode);
    // Both also apply to IPv6 sockets.
    sb.client.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    sb.client.sysctl("net.ipv4.tcp_tw_reuse", "1");
    let pods: Vec<_> = sb.pods.iter().map(|p| &p.ns).collect();
    live.servers = Some(start_servers(&pods, family.unspecified(), HTTP_TARGET, BULK_TARGET, UDP_TARGET, args.clients + 2));
    let endpoints: Vec<IpAddr> = match family {
        Family::V4 => sb.pods.iter().map(|p| p.ip.into()).collect(),
        Family::V6 => (1..=sb.pods.len()).map(|i| pod_ip6(i).into()).collect(),
    };
    live.set = ServiceSet::new(family, services, endpoints);
    if mode == Mode::Direct {
        live.target = Target { addrs: live.set.real_endpoints.clone(), http: HTTP_TARGET, bulk: BULK_TARGET, udp: UDP_TARGET };
    }
    progress(&format!("{label}: programming {services} {family} Services"));
    let programmed = match mode {
        Mode::Direct | Mode::Ipvs | Mode::NpDirect | Mode::NpIptables | Mode::NpTc | Mode::NpXdp | Mode::NpIptablesFlood | Mode::NpTcFlood => None,
        Mode::Iptables => Some(program::iptables(&sb.node, &live.set, args.ipt_backend, args.ipt_chunk, args.program_timeout)),
        Mode::Nftables => Some(program::nftables(&sb.node, &live.set, args.nft_chunk, args.program_timeout)),
        Mode::Ebpf | Mode::EbpfSock => Some(program_agent(args, &mut sb, &live.set)),
    };
    live.record_programming(programmed.as_ref());
    live.case.program = programmed;
    live.env = Some(Env::Node(sb));
    live
}

/// Waits (at most 10 s) until no address in `nss` is still tentative: the
/// link-local addresses of new links go through duplicate address detection
/// (about 1–2 s), and until then neighbour discovery between the nodes does
/// not complete, so the first IPv6 connections would time out. (The global
/// addresses are added `nodad`.)
fn wait_dad(nss: &[&Netns]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for ns in nss {
        while !ns.ip(&["-6", "addr", "show", "tentative"]).trim().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Node A's address the client reaches the node ports on.
fn node_a_ip(family: Family) -> IpAddr {
    match family {
        Family::V4 => NODE_A_IP.into(),
        Family::V6 => NODE_A_IP6.into(),
    }
}

/// Builds the two-node topology (dual-stack for IPv6) for one `NodePort`
/// case and programs its Services on node A.
fn prepare_node_port(args: &Args, mode: Mode, family: Family, services: usize) -> Live {
    let mut live = Live {
        case: Case::new(mode, family, services),
        servers: None,
        env: None,
        target: Target { addrs: vec![node_a_ip(family)], http: HTTP_NODE_PORT, bulk: BULK_NODE_PORT, udp: UDP_NODE_PORT },
        set: ServiceSet::node_ports(family, services.min(10_000), Vec::new()),
        gen_cgroup: None,
        flood_next: 0,
    };
    if services > 10_000 {
        live.case.skipped = Some("at most 10,000 NodePort Services are generated (node ports 20000-29999)".into());
        return live;
    }
    let label = live.case.label();
    progress(&format!("{label}: building two nodes ({PODS} pods on node B)"));
    // Node A's links go through XDP wires, so it receives frames as from a
    // NIC (the same in every NodePort mode; see Cluster::new_wired).
    let mut c = Cluster::new_wired("bq", 0, PODS);
    if family == Family::V6 {
        c.enable_ipv6();
    }
    live.gen_cgroup = gen_cgroup(args, mode);
    c.client.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    c.client.sysctl("net.ipv4.tcp_tw_reuse", "1");
    let pods: Vec<_> = c.pods_b().iter().map(|p| &p.ns).collect();
    // A flood case also holds its established connections open (a server
    // worker each) while the load runs.
    let workers = args.clients + 2 + if mode.is_flood() { ESTABLISHED } else { 0 };
    live.servers = Some(start_servers(&pods, family.unspecified(), HTTP_TARGET, BULK_TARGET, UDP_TARGET, workers));
    let endpoints: Vec<IpAddr> = match family {
        Family::V4 => c.pods_b().iter().map(|p| p.ip.into()).collect(),
        Family::V6 => (1..=c.pods_b().len()).map(|i| NodeId::B.pod_ip6(i).into()).collect(),
    };
    live.set = ServiceSet::node_ports(family, services, endpoints);
    if mode == Mode::NpDirect {
        live.target = Target { addrs: live.set.real_endpoints.clone(), http: HTTP_TARGET, bulk: BULK_TARGET, udp: UDP_TARGET };
    }
    progress(&format!("{label}: programming {services} {family} NodePort Services on node A"));
    let programmed = match mode {
        Mode::NpIptables | Mode::NpIptablesFlood => {
            Some(program::iptables(&c.a.ns, &live.set, args.ipt_backend, args.ipt_chunk, args.program_timeout))
        }
        Mode::NpTc | Mode::NpTcFlood => Some(program_node_port_agent(args, &mut c, &live.set, false)),
        Mode::NpXdp => Some(program_node_port_agent(args, &mut c, &live.set, true)),
        _ => None,
    };
    live.record_programming(programmed.as_ref());
    if mode == Mode::NpXdp && live.case.skipped.is_none() && !c.a.agent_log().contains("XDP fast path attached") {
        live.case.skipped = Some(format!("native XDP did not attach: {}", last_warning(&c.a.agent_log())));
    }
    live.case.program = programmed;
    live.env = Some(Env::Cluster(c));
    live
}

fn last_warning(log: &str) -> String {
    log.lines().rev().find(|l| l.contains("WARN")).unwrap_or("no warning in the agent log").to_owned()
}

/// Starts the agent on node A (with `--xdp --xdp-mode native` when `xdp`)
/// and times it until every frontend, the real Service's node ports
/// included, is in its maps.
fn program_node_port_agent(args: &Args, c: &mut Cluster, set: &ServiceSet, xdp: bool) -> Programmed {
    set.write_manifests(&c.manifests);
    let start = Instant::now();
    let bin = args.agent.clone();
    c.start_agent_a(&bin, if xdp { &["--xdp", "--xdp-mode", "native"] } else { &[] });
    let mut fronts = set.all_frontends();
    let node_ports: Vec<Frontend> = set
        .frontends(set.real)
        .into_iter()
        .map(|f| Frontend { vip: node_a_ip(set.family), port: f.node_port.unwrap_or_default(), ..f })
        .collect();
    fronts.extend(node_ports);
    let result = program::wait_frontends(&c.a.bpffs, &fronts, start, args.program_timeout);
    Programmed { result, transactions: 1 }
}

impl Live {
    /// Reports how programming went; a failure skips the case.
    fn record_programming(&mut self, programmed: Option<&Programmed>) {
        let (label, services) = (self.case.label(), self.case.services);
        if let Some(p) = programmed {
            match &p.result {
                Ok(d) => progress(&format!("{label}: programmed in {:.2} s", d.as_secs_f64())),
                Err(e) => {
                    progress(&format!("{label}: programming failed: {e}"));
                    self.case.skipped = Some(format!("programming {services} Services failed: {e}"));
                }
            }
        }
    }

    /// One load phase from the client namespace with this case's generator:
    /// `ebpf-sock`'s a process in the agent's cgroup; the others' a process
    /// in a cgroup of their own (`--generator process`) or threads of the
    /// bench (`--generator thread`).
    fn load(&self, env: &Env, phase: Phase, clients: usize, dur: Duration) -> PhaseResult {
        let cgroup = match (env, self.case.mode) {
            (Env::Node(sb), Mode::EbpfSock) => Some(&sb.cgroup),
            _ => self.gen_cgroup.as_ref(),
        };
        match cgroup {
            Some(cg) => {
                let exe = std::env::current_exe().expect("the bench binary (current_exe)");
                run_phase_process(&exe, cg, env.client(), &self.target, phase, clients, dur)
            }
            None => run_phase(env.client(), &self.target, phase, clients, dur),
        }
    }

    /// Ready for the runs, once every case of its round is built: for IPv6,
    /// duplicate address detection over; then a warm-up, which checks that
    /// the target answers at all.
    pub fn ready(&mut self, args: &Args) {
        let Some(env) = self.env.as_ref().filter(|_| self.case.skipped.is_none()) else { return };
        if self.case.family == Family::V6 {
            match env {
                Env::Node(sb) => wait_dad(&[&sb.client, &sb.node]),
                Env::Cluster(c) => wait_dad(&[&c.client, &c.a.ns, &c.b.ns]),
            }
        }
        self.warm_up(args);
    }

    /// Warm-up, and a check that the target answers at all.
    fn warm_up(&mut self, args: &Args) {
        let Some(env) = self.env.as_ref().filter(|_| self.case.skipped.is_none()) else { return };
        let warm = self.load(env, Phase::Connections, args.clients, Duration::from_millis(300));
        if warm.ops == 0 {
            self.case.skipped = Some(format!("no request answered: {}", warm.first_error.unwrap_or_default()));
            progress(&format!("{}: {}", self.case.label(), self.case.skipped.as_deref().unwrap_or_default()));
        }
    }

    /// One run of every phase.
    pub fn measure(&mut self, args: &Args, rep: usize) {
        if self.case.mode.is_flood() {
            self.measure_flood(args, rep);
            return;
        }
        let Some(env) = self.env.as_ref().filter(|_| self.case.skipped.is_none()) else { return };
        let d = args.duration;
        progress(&format!("{}: run {}/{} ({:.1} s of load)", self.case.label(), rep + 1, args.reps, (d * 9 / 2).as_secs_f64()));
        let conn = self.load(env, Phase::Connections, args.clients, d);
        let rr = self.load(env, Phase::KeepAlive, args.clients, d);
        let bulk = self.load(env, Phase::Bulk, 1, d / 2);
        let udp = self.load(env, Phase::Udp, args.clients, d);
        let mut lat = self.load(env, Phase::Latency, 1, d);
        let errors = conn.errors + rr.errors + bulk.errors + udp.errors + lat.errors;
        let first_error = [&conn, &rr, &bulk, &udp, &lat].iter().find_map(|r| r.first_error.clone());
        let values = rep_values(&conn, &rr, &bulk, &udp, &mut lat);
        self.case.reps.push(Rep { values, errors, first_error, flood: None });
    }

    /// One run of a flood mode: [`ESTABLISHED`] keep-alive connections
    /// opened, then the flood started; after [`LEAD_IN`] the new-connection
    /// and keep-alive phases run under it, the conntrack read after each;
    /// then the flood stops and every established connection must still be
    /// answered by its pod.
    fn measure_flood(&mut self, args: &Args, rep: usize) {
        let Some(Env::Cluster(c)) = self.env.as_ref().filter(|_| self.case.skipped.is_none()) else { return };
        let env = self.env.as_ref().expect("checked");
        let (mode, services) = (self.case.mode, self.case.services);
        let d = args.duration;
        let pps = args.flood_pps;
        progress(&format!(
            "{mode} S={services}: run {}/{} ({:.1} s of load under a {pps} packets/s flood, {ESTABLISHED} established connections)",
            rep + 1,
            args.reps,
            (d * 2 + LEAD_IN).as_secs_f64()
        ));
        let agent = (mode == Mode::NpTcFlood).then_some(args.agent.as_path());
        let established = Established::open(&c.client);
        let before = agent.map(|bin| c.a.counters(bin));
        // Bounded: the phases take 2 × d (plus starting their processes and
        // the readings); the flood stops at the latest after this.
        let limit = LEAD_IN + d * 2 + Duration::from_secs(20);
        let flood = Flood::start(c, pps, limit, self.flood_next);
        std::thread::sleep(LEAD_IN);
        let conn = self.load(env, Phase::Connections, args.clients, d);
        let mut occupancy = vec![Occupancy::read(c, agent)];
        let rr = self.load(env, Phase::KeepAlive, args.clients, d);
        occupancy.push(Occupancy::read(c, agent));
        let sent = flood.stop();
        let survival = established.check();
        let counters = agent.zip(before).map(|(bin, before)| super::flood::delta(&before, &c.a.counters(bin)));
        let peak = occupancy.iter().copied().reduce(Occupancy::peak).unwrap_or_default();
        progress(&format!(
            "{mode} S={services}: flood {} packets at {:.0}/s; {:.0} conn/s, {:.0} req/s; established lost {} of {ESTABLISHED}; conntrack peak: {}",
            sent.packets,
            sent.rate(),
            conn.rate(),
            rr.rate(),
            survival.lost,
            super::report::occupancy_text(&peak)
        ));
        self.flood_next = self.flood_next.wrapping_add(u32::try_from(sent.packets + sent.refused + sent.skipped).unwrap_or(0));
        let nz = |r: &PhaseResult| (r.ops > 0).then(|| r.rate());
        let mut values = vec![None; METRICS.len()];
        values[0] = nz(&conn);
        values[1] = nz(&rr);
        let errors = conn.errors + rr.errors;
        let first_error = [&conn, &rr].iter().find_map(|r| r.first_error.clone());
        let flood = FloodRep { pps, sent, survival, occupancy, counters };
        self.case.reps.push(Rep { values, errors, first_error, flood: Some(flood) });
    }

    /// Measures "apply one added Service" when this is the size for it
    /// (IPv4 cases only), then tears the sandbox down and returns the case.
    #[must_use]
    pub fn finish(mut self, args: &Args) -> Case {
        // ebpf-sock programs the agent exactly as ebpf does: measured there.
        if let Some(Env::Node(sb)) = self.env.as_ref()
            && self.case.services == args.add_one_at
            && self.case.family == Family::V4
            && self.case.mode != Mode::EbpfSock
            && self.case.program.as_ref().is_some_and(|p| p.result.is_ok())
        {
            self.case.add_one = Some(add_one(args, self.case.mode, sb, &self.set));
        }
        if let Some(Env::Node(sb)) = self.env.as_ref()
            && matches!(self.case.mode, Mode::Ebpf | Mode::EbpfSock)
            && self.case.skipped.is_none()
        {
            self.case.counters = Some(sb.counters(&args.agent));
        }
        if let Some(Env::Cluster(c)) = self.env.as_ref()
            && matches!(self.case.mode, Mode::NpTc | Mode::NpXdp | Mode::NpTcFlood)
            && self.case.skipped.is_none()
        {
            self.case.counters = Some(c.a.counters(&args.agent));
        }
        if let Some((false, how)) = self.case.path() {
            progress(&format!("{}: did not take the intended path: {how}", self.case.label()));
        }
        self.servers = None;
        if self.env.take().is_some() {
            progress(&format!("{}: torn down", self.case.label()));
        }
        self.case
    }
}

/// Why kube-proxy's IPVS shape cannot be measured here.
#[must_use]
pub fn ipvs_unavailable() -> String {
    let config = std::process::Command::new("sh")
        .args(["-c", "zcat /proc/config.gz 2>/dev/null | grep -E '^(# )?CONFIG_IP_VS[ =]'"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if config.ends_with("is not set") || (config.is_empty() && !Path::new("/proc/net/ip_vs").exists()) {
        format!(
            "not measurable here: this kernel has no IPVS ({}; no loadable modules), so kube-proxy's IPVS rules cannot be programmed",
            if config.is_empty() { "no /proc/net/ip_vs".to_owned() } else { config }
        )
    } else {
        "not measured: this kernel has IPVS, but the bench does not program kube-proxy's IPVS shape yet".to_owned()
    }
}

/// Writes the manifests, starts the agent and times it until every frontend
/// is in the pinned maps.
fn program_agent(args: &Args, sb: &mut Sandbox, set: &ServiceSet) -> Programmed {
    set.write_manifests(&sb.manifests);
    let start = Instant::now();
    sb.start_agent(&args.agent);
    let fronts = set.all_frontends();
    let result = program::wait_frontends(&sb.bpffs, &fronts, start, args.program_timeout);
    Programmed { result, transactions: 1 }
}

/// Applies one more Service the mode's way and times it until it is in
/// effect (rules loaded; for the agent: in the pinned maps).
fn add_one(args: &Args, mode: Mode, sb: &Sandbox, set: &ServiceSet) -> Result<Duration, String> {
    progress(&format!("{mode} S={}: applying one added Service", set.count));
    let t = args.program_timeout;
    match mode {
        Mode::Iptables => program::iptables_add_one(&sb.node, set, args.ipt_backend, t),
        Mode::Nftables => program::nftables_add_one(&sb.node, set, t),
        Mode::Ebpf => {
            let extra = set.extra();
            let start = Instant::now();
            write_atomic(&sb.manifests, "added.yaml", &super::services::manifest_of(std::slice::from_ref(&extra)));
            program::wait_frontends(&sb.bpffs, &[extra], start, t)
        }
        Mode::Direct
        | Mode::Ipvs
        | Mode::EbpfSock
        | Mode::NpDirect
        | Mode::NpIptables
        | Mode::NpTc
        | Mode::NpXdp
        | Mode::NpIptablesFlood
        | Mode::NpTcFlood => Err("not measured in this mode".into()),
    }
}

/// Control plane only: programs `services` Services with `mode` in a fresh
/// sandbox without pods, then (at `args.add_one_at`) one more.
#[must_use]
pub fn run_program_only(args: &Args, mode: Mode, services: usize) -> Case {
    progress(&format!("control plane: {mode}, {services} Services from nothing"));
    let mut sb = Sandbox::new("bp", 0);
    let set = ServiceSet::new(Family::V4, services, vec![std::net::Ipv4Addr::new(10, 244, 0, 11).into()]);
    let program = match mode {
        Mode::Iptables => program::iptables(&sb.node, &set, args.ipt_backend, args.ipt_chunk, args.program_timeout),
        Mode::Nftables => program::nftables(&sb.node, &set, args.nft_chunk, args.program_timeout),
        Mode::Ebpf => program_agent(args, &mut sb, &set),
        Mode::Direct
        | Mode::Ipvs
        | Mode::EbpfSock
        | Mode::NpDirect
        | Mode::NpIptables
        | Mode::NpTc
        | Mode::NpXdp
        | Mode::NpIptablesFlood
        | Mode::NpTcFlood => {
            return Case::skipped(mode, Family::V4, services, ipvs_unavailable());
        }
    };
    match &program.result {
        Ok(d) => progress(&format!("control plane: {mode}, {services} Services: {:.2} s", d.as_secs_f64())),
        Err(e) => progress(&format!("control plane: {mode}, {services} Services: {e}")),
    }
    let add_one = (services == args.add_one_at && program.result.is_ok()).then(|| add_one(args, mode, &sb, &set));
    Case { program: Some(program), add_one, ..Case::new(mode, Family::V4, services) }
}
