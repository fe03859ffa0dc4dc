//! The agent as a real child process, run inside the node namespace.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use proxy_agent::{
    datapath::{BpfMaps, ServiceMaps as _},
    inspect::{FrontendView, services_view},
    pins::Pins,
};

/// The `proxy-agent` binary: `$PROXY_AGENT_BIN`, else next to the test
/// executable's target directory (`cargo xtask test` builds it first).
#[must_use]
pub fn agent_bin() -> PathBuf {
    built_bin("PROXY_AGENT_BIN", "proxy-agent", "`cargo build -p proxy-agent`; `cargo xtask test` does")
}

/// The agent built with the test-only next map layout (feature
/// `layout-next`: `proxy_ct_v3`), for upgrade tests.
#[must_use]
pub fn agent_bin_layout_next() -> PathBuf {
    built_bin("PROXY_AGENT_LAYOUT_NEXT_BIN", "proxy-agent-layout-next", "`cargo xtask test` builds it")
}

fn built_bin(env: &str, name: &str, how: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target dir");
    assert!(candidate.exists(), "{} not found: build it first ({how}) or set {env}", candidate.display());
    candidate
}

/// A running agent; killed on drop. Its pins are left for the owner of the
/// bpffs directory to clean up (see [`crate::sandbox::Sandbox`]).
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

/// Where the agent reads Services and `EndpointSlices` from.
#[derive(Clone, Copy, Debug)]
pub enum AgentSource<'a> {
    Manifests(&'a Path),
    /// An API server, through this kubeconfig.
    ApiServer { kubeconfig: &'a Path },
}

#[derive(Clone, Debug)]
pub struct AgentArgs<'a> {
    pub bin: &'a Path,
    pub netns: &'a str,
    pub bpffs: &'a Path,
    pub source: AgentSource<'a>,
    pub devices: &'a str,
    /// `--node-name` (default: the agent's own default).
    pub node_name: Option<&'a str>,
    /// `--cgroup` for the socket programs: a cgroup the test made. `None`:
    /// `--socket-lb off` (never the machine's root cgroup).
    pub cgroup: Option<&'a Path>,
    /// More `run` flags.
    pub extra: &'a [&'a str],
    pub log: &'a Path,
}

impl Agent {
    /// Starts `proxy-agent run` in the namespace with nsenter (which, unlike
    /// `ip netns exec`, keeps /sys and so the bpffs visible).
    #[must_use] 
    pub fn start(a: &AgentArgs<'_>) -> Self {
        let log = File::options().create(true).append(true).open(a.log).expect("agent log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", a.netns)).arg(a.bin).arg("--bpffs").arg(a.bpffs).arg("run");
        match a.source {
            AgentSource::Manifests(dir) => cmd.arg("--manifests").arg(dir),
            AgentSource::ApiServer { kubeconfig } => cmd.arg("--kubeconfig").arg(kubeconfig),
        };
        if let Some(name) = a.node_name {
            cmd.arg("--node-name").arg(name);
        }
        match a.cgroup {
            Some(dir) => cmd.arg("--cgroup").arg(dir),
            None => cmd.arg("--socket-lb").arg("off"),
        };
        cmd.args(a.extra);
        let child = cmd
            .arg("--devices")
            .arg(a.devices)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn proxy-agent via nsenter");
        Self { child: Some(child), log: a.log.to_owned() }
    }

    /// SIGKILL, as a crash or OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The frontends programmed under `bpffs`, read from the pinned maps (empty
/// when nothing is pinned yet).
#[must_use]
pub fn programmed(bpffs: &Path) -> Vec<FrontendView> {
    BpfMaps::open_pinned(&Pins::new(bpffs))
        .and_then(|m| m.dump())
        .map(|d| services_view(&d))
        .unwrap_or_default()
}

/// Polls until `pred` holds for the programmed frontends, at most `timeout`.
pub fn wait_programmed(bpffs: &Path, timeout: Duration, what: &str, pred: impl Fn(&[FrontendView]) -> bool) -> Vec<FrontendView> {
    let start = Instant::now();
    loop {
        let v = programmed(bpffs);
        if pred(&v) {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}; programmed: {v:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A cell of `proxy-agent stats`'s table: the row of `reason`, the column
/// headed `column` (`IPV4`, `IPV6`, `OTHER`, `PACKETS`, `BYTES`).
#[must_use]
pub fn stats_table_cell(table: &str, reason: &str, column: &str) -> u64 {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    let col = header.iter().position(|h| *h == column).unwrap_or_else(|| panic!("no column {column}:\n{table}"));
    let row = lines.find(|l| l.split_whitespace().next() == Some(reason)).unwrap_or_else(|| panic!("no row {reason}:\n{table}"));
    let cell = row.split_whitespace().nth(col).unwrap_or_else(|| panic!("{reason}: no column {column}:\n{table}"));
    cell.parse().unwrap_or_else(|e| panic!("{reason}/{column}: {cell:?}: {e}\n{table}"))
}

/// Every exit-reason counter of one family (`ipv4`, `ipv6`, `other`):
/// name → packets, read with `bin stats -o json`.
#[must_use]
pub fn counters_of_family(bin: &Path, bpffs: &Path, family: &str) -> std::collections::BTreeMap<String, u64> {
    let out = crate::netns::run(&bin.to_string_lossy(), &["--bpffs", &bpffs.to_string_lossy(), "stats", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats json: {e}: {out}"));
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let f = s["families"].as_array()?.iter().find(|f| f["family"] == family)?;
            Some((s["reason"].as_str()?.to_owned(), f["packets"].as_u64()?))
        })
        .collect()
}

/// Every exit-reason counter (name → packets, summed over families) of
/// the datapath pinned under `bpffs`, read with `bin stats -o json` as an
/// operator would.
#[must_use]
pub fn counters(bin: &Path, bpffs: &Path) -> std::collections::BTreeMap<String, u64> {
    let out = crate::netns::run(&bin.to_string_lossy(), &["--bpffs", &bpffs.to_string_lossy(), "stats", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats json: {e}: {out}"));
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["reason"].as_str()?.to_owned(), s["packets"].as_u64()?)))
        .collect()
}
