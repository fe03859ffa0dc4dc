//! BENCHMARKS.md, bench.json and bench.svg from the cases of one run.
use std::{fmt::Write as _, path::Path, time::Duration};

use plotters::prelude::*;
use serde_json::{Value, json};

use super::{
    args::{Args, Generator},
    flood::{ESTABLISHED, Occupancy},
    run::{Case, FLOOD_MODES, METRICS, MODES, Mode, NP_MODES},
    services::Family,
};

/// One row of the targets table: the family its cases are of (None: not a
/// data-path target), what, met (None: not measurable), by how much.
pub type TargetRow = (Option<Family>, String, Option<bool>, String);

/// Facts about the machine and the run, for the report header.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub date: String,
    pub iptables: String,
    pub nft: String,
    /// /proc/loadavg (1, 5, 15 min) when the run started: other work on the
    /// machine skews every figure.
    pub load_start: String,
}

/// The 1, 5 and 15 minute load averages.
#[must_use]
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

impl Machine {
    #[must_use]
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned()))
            .unwrap_or_else(|| "unknown".into());
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            kernel: cmd_out("uname", &["-r"]),
            date: cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            iptables: cmd_out("iptables-nft-restore", &["--version"]),
            nft: cmd_out("nft", &["--version"]),
            load_start: loadavg(),
        }
    }
}

/// A whole run.
pub struct Report<'a> {
    pub args: &'a Args,
    pub machine: Machine,
    pub cases: Vec<Case>,
    /// Control-plane-only cases (sizes not covered by a data-path case).
    pub program_cases: Vec<Case>,
    /// The agent following the test API server (`apiserver`).
    pub api_cases: Vec<super::controlplane::ApiCase>,
    pub elapsed: Duration,
}

/// The counters shown under the `NodePort` table (all are in `bench.json`).
const NOTED_COUNTERS: [&str; 7] =
    ["xdp_forward", "xdp_reverse", "dnat_new_flow", "dnat_established", "rev_nat_reply", "drop_snat_ports_exhausted", "fib_no_route"];
/// The counters shown under the `ClusterIP` table (ebpf and ebpf-sock).
const NOTED_COUNTERS_CLUSTER_IP: [&str; 6] =
    ["sock_translated", "sock_rev_translated", "dnat_new_flow", "dnat_established", "rev_nat_reply", "pass_no_service"];
/// The throughput figures (higher is better) the ratio targets cover.
const THROUGHPUT: [(usize, &str); 4] = [(0, "conn"), (1, "req"), (2, "bulk"), (3, "udp")];

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "display of a positive figure")]
        fmt_count(v.round() as usize)
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A count with thousands separators.
fn fmt_count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "agent: unconfirmed 32,768 / 32,768 flows, confirmed 25 / 131,072;
/// `nf_conntrack` 12 / 262,144": what a conntrack reading shows.
#[must_use]
pub fn occupancy_text(o: &Occupancy) -> String {
    let n = |v: Option<u64>| v.map_or_else(|| "?".into(), |v| fmt_count(usize::try_from(v).unwrap_or(usize::MAX)));
    let mut parts = Vec::new();
    if o.confirmed.is_some() || o.unconfirmed.is_some() {
        parts.push(format!(
            "agent: unconfirmed {} / {} flows, confirmed {} / {}",
            n(o.unconfirmed),
            n(o.unconfirmed_cap),
            n(o.confirmed),
            n(o.confirmed_cap)
        ));
    }
    if o.nf_count.is_some() {
        parts.push(format!("nf_conntrack {} / {}", n(o.nf_count), n(o.nf_max)));
    }
    if parts.is_empty() { "not readable".into() } else { parts.join("; ") }
}

/// The counters shown under the flood table (the agent's, over the flood).
const FLOOD_COUNTERS: [&str; 7] =
    ["dnat_new_flow", "drop_tcp_no_flow", "ct_flow_confirmed", "snat_port_reclaimed", "drop_snat_ports_exhausted", "fib_no_route", "rev_nat_reply"];

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

impl Report<'_> {
    fn case(&self, f: Family, mode: Mode, s: usize) -> Option<&Case> {
        self.cases.iter().find(|c| c.mode == mode && c.family == f && c.services == s)
    }

    /// The families with data-path cases, IPv4 first.
    fn families(&self) -> Vec<Family> {
        Family::ALL.into_iter().filter(|f| self.cases.iter().any(|c| c.family == *f)).collect()
    }

    /// The numbers of Services the data-path cases of `f` ran at.
    fn sizes(&self, f: Family) -> Vec<usize> {
        self.args.services.iter().copied().filter(|&n| self.cases.iter().any(|c| c.family == f && c.services == n)).collect()
    }

    /// The programming case for (mode, S) of the IPv4 Services (the
    /// control-plane figures): the data-path one when it exists.
    fn program_case(&self, mode: Mode, s: usize) -> Option<&Case> {
        self.case(Family::V4, mode, s)
            .filter(|c| c.program.is_some())
            .or_else(|| self.program_cases.iter().find(|c| c.mode == mode && c.services == s))
    }

    fn median(&self, f: Family, mode: Mode, s: usize, m: usize) -> Option<f64> {
        self.case(f, mode, s).and_then(|c| c.stat(m)).map(|(med, _, _)| med)
    }

    /// `mode`'s figure over its baseline's (`direct` / `np-direct`) of the
    /// same family at S.
    fn ratio(&self, f: Family, mode: Mode, s: usize, m: usize) -> Option<f64> {
        self.ratio_to(f, mode, mode.baseline(), s, m)
    }

    fn ratio_to(&self, family: Family, mode: Mode, base: Mode, s: usize, m: usize) -> Option<f64> {
        let d = self.median(family, base, s, m)?;
        let v = self.median(family, mode, s, m)?;
        (d > 0.0).then(|| v / d)
    }

    /// `mode`'s figure over its baseline's run by run (run i of every case
    /// of one S and family is measured in the same round, back to back).
    fn run_ratios(&self, family: Family, mode: Mode, s: usize, m: usize) -> Vec<f64> {
        let (Some(c), Some(b)) = (self.case(family, mode, s), self.case(family, mode.baseline(), s)) else { return Vec::new() };
        c.reps
            .iter()
            .zip(&b.reps)
            .filter_map(|(x, y)| x.values.get(m).copied().flatten().zip(y.values.get(m).copied().flatten()))
            .filter(|&(_, y)| y > 0.0)
            .map(|(x, y)| x / y)
            .collect()
    }

    /// The ratio of the medians and, with more than one run, the range of
    /// the run-by-run ratios: "0.98× (0.95–1.01)".
    fn ratio_with_spread(&self, f: Family, mode: Mode, s: usize, m: usize) -> String {
        let Some(r) = self.ratio(f, mode, s, m) else { return "–".into() };
        let runs = self.run_ratios(f, mode, s, m);
        if runs.len() < 2 {
            return format!("{r:.2}×");
        }
        let (lo, hi) = runs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        format!("{r:.2}× ({lo:.2}–{hi:.2})")
    }

    /// Where the node's counters show that `mode`'s case of (f, S) did not
    /// take its path: " (counters: not on its path)", to append to a
    /// target's note; empty otherwise.
    fn off_path(&self, f: Family, mode: Mode, s: usize) -> &'static str {
        match self.case(f, mode, s).and_then(Case::path) {
            Some((false, _)) => " (**not on its path** by the node's counters: these are not its figures)",
            _ => "",
        }
    }

    /// The socket-path target: `ebpf-sock` (and, for comparison, the TC
    /// path `ebpf`) at least 0.97 × direct on every throughput figure at
    /// every S, per family.
    fn socket_targets(&self, f: Family, out: &mut Vec<TargetRow>) {
        for n in self.sizes(f) {
            for mode in [Mode::EbpfSock, Mode::Ebpf] {
                if self.case(f, mode, n).is_none_or(|c| c.reps.is_empty()) {
                    continue;
                }
                let ratios: Vec<Option<f64>> = THROUGHPUT.iter().map(|&(m, _)| self.ratio(f, mode, n, m)).collect();
                let met = ratios.iter().all(|r| r.is_some_and(|r| r >= 0.97));
                let note = THROUGHPUT
                    .iter()
                    .map(|&(m, h)| format!("{h} {}", self.ratio_with_spread(f, mode, n, m)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let what = format!("{mode} ≥ 0.97 × direct on conn, req, bulk and UDP at S={}", fmt_count(n));
                out.push((Some(f), what, Some(met), format!("{note}{}", self.off_path(f, mode, n))));
            }
        }
    }

    /// The north-south targets of issue 4: the TC path at least the iptables
    /// shape on every figure, the XDP path clearly (≥ 1.2×) above it, and
    /// neither depending on the number of Services; per family.
    fn node_port_targets(&self, f: Family, out: &mut Vec<TargetRow>) {
        let figures = THROUGHPUT;
        let sizes = self.sizes(f);
        for &n in &sizes {
            for (mode, floor, what) in [(Mode::NpTc, 1.0, "≥"), (Mode::NpXdp, 1.2, "≥ 1.2 ×")] {
                let ratios: Vec<(&str, Option<f64>)> = figures.iter().map(|&(m, h)| (h, self.ratio_to(f, mode, Mode::NpIptables, n, m))).collect();
                if ratios.iter().all(|(_, r)| r.is_none()) {
                    continue;
                }
                let met = ratios.iter().all(|(_, r)| r.is_some_and(|r| r >= floor));
                let note = ratios
                    .iter()
                    .map(|(h, r)| format!("{h} {}", r.map_or_else(|| "–".into(), |r| format!("{r:.2}×"))))
                    .collect::<Vec<_>>()
                    .join(", ");
                let target = format!("{mode} {what} np-iptables on every NodePort figure at S={}", fmt_count(n));
                out.push((Some(f), target, Some(met), format!("{note}{}", self.off_path(f, mode, n))));
            }
        }
        let smin = sizes.first().copied().unwrap_or(1);
        let smax = sizes.iter().copied().filter(|&n| n <= 10_000).max().unwrap_or(smin);
        if smax != smin {
            for mode in [Mode::NpTc, Mode::NpXdp] {
                // (figure, change S=min → S=max, the same relative to np-direct at each S)
                let changes: Vec<(&str, Option<f64>, Option<f64>)> = [(0, "conn"), (1, "req")]
                    .iter()
                    .map(|&(m, h)| {
                        let raw = self.median(f, mode, smin, m).zip(self.median(f, mode, smax, m)).map(|(a, b)| b / a);
                        let norm = self.ratio(f, mode, smin, m).zip(self.ratio(f, mode, smax, m)).map(|(a, b)| b / a);
                        (h, raw, norm)
                    })
                    .collect();
                if changes.iter().all(|(_, r, _)| r.is_none()) {
                    continue;
                }
                let met = changes.iter().all(|(_, r, _)| r.is_some_and(|r| r >= 0.95));
                let note = changes
                    .iter()
                    .map(|(h, r, n)| {
                        format!(
                            "{h} {} its S={} figure (relative to np-direct at each S: {})",
                            r.map_or_else(|| "–".into(), |r| format!("{r:.3}×")),
                            fmt_count(smin),
                            n.map_or_else(|| "–".into(), |n| format!("{n:.3}×"))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                out.push((Some(f), format!("{mode} at S={} within 5% of its own S={}", fmt_count(smax), fmt_count(smin)), Some(met), note));
            }
        }
    }

    /// A flood mode's figure `m` over its own no-flood mode's at S (medians;
    /// the flood modes run over IPv4 only).
    fn flood_ratio(&self, mode: Mode, s: usize, m: usize) -> Option<f64> {
        self.ratio_to(Family::V4, mode, mode.no_flood(), s, m)
    }

    /// The flood runs of (mode, S).
    fn flood_reps(&self, mode: Mode, s: usize) -> Vec<&super::flood::FloodRep> {
        self.case(Family::V4, mode, s).map(|c| c.reps.iter().filter_map(|r| r.flood.as_ref()).collect()).unwrap_or_default()
    }

    /// Established flows lost per run of (mode, S).
    fn lost(&self, mode: Mode, s: usize) -> Vec<usize> {
        self.flood_reps(mode, s).iter().map(|f| f.survival.lost).collect()
    }

    /// The flood target: the agent's TC path under the flood at least 0.8 ×
    /// its no-flood new-connection rate, and no established flow lost.
    fn flood_targets(&self, out: &mut Vec<TargetRow>) {
        for &n in &self.args.services {
            let reps = self.flood_reps(Mode::NpTcFlood, n);
            if reps.is_empty() {
                continue;
            }
            let r = self.flood_ratio(Mode::NpTcFlood, n, 0);
            let lost = self.lost(Mode::NpTcFlood, n);
            let worst = lost.iter().copied().max().unwrap_or(0);
            let met = r.map(|r| r >= 0.8 && worst == 0);
            let rates: Vec<String> = reps.iter().map(|f| format!("{:.0}", f.sent.rate())).collect();
            let note = format!(
                "new conn/s {} ({} under flood vs {} without; keep-alive req/s {}); established flows lost: {} of {ESTABLISHED} (per run: {}); flood {} packets/s (sent per run: {})",
                r.map_or_else(|| "–".into(), |r| format!("{r:.2}×")),
                self.median(Family::V4, Mode::NpTcFlood, n, 0).map_or_else(|| "–".into(), fmt_num),
                self.median(Family::V4, Mode::NpTc, n, 0).map_or_else(|| "–".into(), fmt_num),
                self.flood_ratio(Mode::NpTcFlood, n, 1).map_or_else(|| "–".into(), |r| format!("{r:.2}×")),
                worst,
                lost.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                fmt_count(self.args.flood_pps as usize),
                rates.join(", ")
            );
            out.push((
                Some(Family::V4),
                format!("np-tc under a {} packets/s flood ≥ 0.8× its no-flood new conn/s; 0 established flows lost (S={})", fmt_count(self.args.flood_pps as usize), fmt_count(n)),
                met,
                note,
            ));
        }
    }

    /// The flood section: each flood mode's figures against its no-flood
    /// ones, the agent against the iptables shape, the established
    /// connections, the conntrack's occupancy and the agent's counters.
    #[expect(clippy::too_many_lines, reason = "one section, read top to bottom")]
    fn flood_section(&self, s: &mut String) {
        let flood_cases: Vec<&Case> = self.cases.iter().filter(|c| c.mode.is_flood()).collect();
        if flood_cases.is_empty() {
            return;
        }
        let a = self.args;
        let _ = writeln!(s, "\n## NodePort under a spoofed flood\n");
        let _ = writeln!(
            s,
            "`np-tc` and `np-iptables` again, each on a topology of its own, while the client's namespace writes spoofed frames \
             (`AF_PACKET`) at node A at a fixed {} packets/s: of every 10, 5 SYNs, 1 ACK and 1 RST to the HTTP node port and 3 \
             datagrams to the UDP node port, each from another source in 172.16.0.0/12 (never answered). Before the flood, {ESTABLISHED} \
             keep-alive connections are opened to the node port ({} of them then make a request every 100 ms during the flood, the \
             others stay idle); the flood runs {:.1} s before the new-connection and keep-alive phases ({} s each) and until they end; \
             after it, one more request on each connection must be answered by the pod that answered its first — otherwise the flow \
             counts as lost. Conntrack readings after each phase, while the flood runs: the agent's two tables with `proxy-agent \
             conntrack -o json` (live flows; capacity = `max_entries` / 2), node A's netfilter conntrack from \
             /proc/sys/net/netfilter/nf_conntrack_count and _max in its namespace. Ratios: each mode under the flood over the same \
             mode without it (the table above, same run), and the agent over the iptables shape.\n",
            fmt_count(a.flood_pps as usize),
            super::flood::BUSY,
            super::flood::LEAD_IN.as_secs_f64(),
            a.duration.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "| S | mode | flood sent, packets/s | new conn/s | × no-flood | keep-alive req/s | × no-flood | established flows lost | conntrack during the flood (peak) |"
        );
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---|---|");
        for &n in &a.services {
            for mode in FLOOD_MODES {
                let Some(case) = self.case(Family::V4, mode, n) else { continue };
                if let Some(why) = &case.skipped {
                    let _ = writeln!(s, "| {} | {mode} | {why} | | | | | | |", fmt_count(n));
                    continue;
                }
                let reps = self.flood_reps(mode, n);
                let mut rates: Vec<f64> = reps.iter().map(|f| f.sent.rate()).collect();
                rates.sort_by(f64::total_cmp);
                let rate = rates.get(rates.len() / 2).map_or_else(|| "–".into(), |r| fmt_num(*r));
                let fig = |m| self.median(Family::V4, mode, n, m).map_or_else(|| "–".into(), fmt_num);
                let ratio = |m| self.flood_ratio(mode, n, m).map_or_else(|| "–".into(), |r| format!("{r:.2}×"));
                let lost = self.lost(mode, n);
                let lost = format!(
                    "{} of {ESTABLISHED} (per run: {})",
                    lost.iter().copied().max().unwrap_or(0),
                    lost.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                );
                let peak = reps.iter().map(|f| f.peak()).reduce(Occupancy::peak).unwrap_or_default();
                let _ = writeln!(
                    s,
                    "| {} | {mode} | {rate} (target {}) | {} | {} | {} | {} | {lost} | {} |",
                    fmt_count(n),
                    fmt_count(a.flood_pps as usize),
                    fig(0),
                    ratio(0),
                    fig(1),
                    ratio(1),
                    occupancy_text(&peak)
                );
            }
        }
        s.push('\n');
        for &n in &a.services {
            let both = |m: usize, x: Mode, y: Mode| self.ratio_to(Family::V4, x, y, n, m).map_or_else(|| "–".into(), |r| format!("{r:.2}×"));
            if self.case(Family::V4, Mode::NpTcFlood, n).is_some() && self.case(Family::V4, Mode::NpIptablesFlood, n).is_some() {
                let _ = writeln!(
                    s,
                    "- S={}: agent (np-tc) over the iptables shape under the flood: new conn/s {}, keep-alive req/s {} (without the flood: {}, {})",
                    fmt_count(n),
                    both(0, Mode::NpTcFlood, Mode::NpIptablesFlood),
                    both(1, Mode::NpTcFlood, Mode::NpIptablesFlood),
                    both(0, Mode::NpTc, Mode::NpIptables),
                    both(1, Mode::NpTc, Mode::NpIptables)
                );
            }
            for mode in FLOOD_MODES {
                let reps = self.flood_reps(mode, n);
                if reps.is_empty() {
                    continue;
                }
                let sent: u64 = reps.iter().map(|f| f.sent.packets).sum();
                let why: Vec<String> = reps.iter().flat_map(|f| f.survival.why.clone()).take(2).collect();
                let _ = write!(
                    s,
                    "- {mode} S={}: {} spoofed packets over {} run(s) ({} SYN, {} UDP, {} ACK/RST)",
                    fmt_count(n),
                    fmt_count(usize::try_from(sent).unwrap_or(usize::MAX)),
                    reps.len(),
                    fmt_count(usize::try_from(reps.iter().map(|f| f.sent.syn).sum::<u64>()).unwrap_or(0)),
                    fmt_count(usize::try_from(reps.iter().map(|f| f.sent.udp).sum::<u64>()).unwrap_or(0)),
                    fmt_count(usize::try_from(reps.iter().map(|f| f.sent.ack_rst).sum::<u64>()).unwrap_or(0)),
                );
                let counters: Option<std::collections::BTreeMap<&str, u64>> = reps.iter().all(|f| f.counters.is_some()).then(|| {
                    FLOOD_COUNTERS.iter().map(|k| (*k, reps.iter().filter_map(|f| f.counters.as_ref()?.get(*k)).sum())).collect()
                });
                if let Some(c) = counters {
                    let shown: Vec<String> = c.iter().map(|(k, v)| format!("{k} {v}")).collect();
                    let _ = write!(s, "; node A counters over the floods: {}", shown.join(", "));
                }
                if !why.is_empty() {
                    let _ = write!(s, "; lost flows: {}", why.join("; "));
                }
                s.push('\n');
            }
        }
    }

    /// The data-path table of `modes`: medians, with the ratio to the
    /// baseline of the same family in brackets; by S, then family. A mode
    /// whose node counters show it did not take its path says so.
    fn data_table(&self, s: &mut String, modes: &[Mode]) {
        let a = self.args;
        let mut head = String::from("| S | family | mode |");
        let mut sep = String::from("|---:|---|---|");
        for (_, h, _, _) in METRICS {
            let _ = write!(head, " {h} |");
            sep.push_str("---:|");
        }
        let _ = writeln!(s, "{head}\n{sep}");
        for &n in &a.services {
            for f in Family::ALL {
                for &mode in modes {
                    let Some(case) = self.case(f, mode, n) else { continue };
                    let off = if case.path().is_some_and(|(ok, _)| !ok) { " (**not on its path**, see below)" } else { "" };
                    let _ = write!(s, "| {} | {f} | {mode}{off} |", fmt_count(n));
                    if let Some(why) = &case.skipped {
                        let _ = writeln!(s, " {why} |{}", " |".repeat(METRICS.len() - 1));
                        continue;
                    }
                    for k in 0..METRICS.len() {
                        match (case.stat(k), self.ratio(f, mode, n, k)) {
                            (Some((med, _, _)), Some(r)) if mode != mode.baseline() => {
                                let _ = write!(s, " {} ({r:.2}×) |", fmt_num(med));
                            }
                            (Some((med, _, _)), _) => {
                                let _ = write!(s, " {} |", fmt_num(med));
                            }
                            (None, _) => s.push_str(" – |"),
                        }
                    }
                    s.push('\n');
                }
            }
        }
    }

    /// IPv6 beside IPv4: for each S with both, every mode's ratio to its
    /// own family's baseline on the throughput figures and p50, side by
    /// side; below, the baselines' own IPv6 figures over their IPv4 ones.
    fn family_table(&self, s: &mut String) {
        let both: Vec<usize> = self.sizes(Family::V6).into_iter().filter(|n| self.sizes(Family::V4).contains(n)).collect();
        if both.is_empty() {
            return;
        }
        let _ = writeln!(s, "\n## IPv6 beside IPv4\n");
        let _ = writeln!(
            s,
            "Each mode over its own family's baseline (`direct` / `np-direct` of IPv4 Services over IPv4, of IPv6-only Services over \
             IPv6) at the same S, in this run: IPv4 → IPv6. The families ran one after the other at each S (each family's cases \
             interleaved with its own baseline). p50: lower is better.\n"
        );
        let figures = [(0, "new conn/s"), (1, "keep-alive req/s"), (2, "bulk Gbit/s"), (3, "UDP rr/s"), (4, "p50 µs")];
        let mut head = String::from("| S | mode |");
        let mut sep = String::from("|---:|---|");
        for (_, h) in figures {
            let _ = write!(head, " {h} × baseline, IPv4 → IPv6 |");
            sep.push_str("---:|");
        }
        let _ = writeln!(s, "{head}\n{sep}");
        let r = |f, mode, n, m| self.ratio(f, mode, n, m).map_or_else(|| "–".into(), |r| format!("{r:.2}×"));
        for &n in &both {
            for mode in MODES.into_iter().chain(NP_MODES).filter(|m| *m != m.baseline()) {
                let (Some(c4), Some(c6)) = (self.case(Family::V4, mode, n), self.case(Family::V6, mode, n)) else { continue };
                if c4.skipped.is_some() && c6.skipped.is_some() {
                    continue;
                }
                let mark = |c: &Case| if c.path().is_some_and(|(ok, _)| !ok) { "†" } else { "" };
                let _ = write!(s, "| {} | {mode} |", fmt_count(n));
                for (m, _) in figures {
                    let _ = write!(s, " {}{} → {}{} |", r(Family::V4, mode, n, m), mark(c4), r(Family::V6, mode, n, m), mark(c6));
                }
                s.push('\n');
            }
        }
        s.push('\n');
        for &n in &both {
            for base in [Mode::Direct, Mode::NpDirect] {
                let parts: Vec<String> = figures
                    .iter()
                    .filter_map(|&(m, h)| {
                        let v = self.median(Family::V6, base, n, m)? / self.median(Family::V4, base, n, m)?;
                        Some(format!("{h} {v:.2}×"))
                    })
                    .collect();
                if !parts.is_empty() {
                    let _ = writeln!(s, "- {base} S={}: its IPv6 figures over its IPv4 ones: {}", fmt_count(n), parts.join(", "));
                }
            }
        }
        if self.cases.iter().any(|c| c.path().is_some_and(|(ok, _)| !ok)) {
            let _ = writeln!(s, "- †: the node's counters show the case did not take its mode's path (see the counter lines under the tables above).");
        }
    }

    /// The node counters of the agent's cases of `cases`, one line each,
    /// with whether they show the mode's path.
    fn counter_lines(s: &mut String, cases: &[&Case], noted: &[&str], whose: &str) {
        if !cases.is_empty() {
            s.push('\n');
        }
        for c in cases {
            let Some(n) = c.counters.as_ref() else { continue };
            let shown: Vec<String> = noted.iter().map(|k| format!("{k} {}", n.get(*k).copied().unwrap_or(0))).collect();
            let verdict = match c.path() {
                Some((true, how)) => format!(" — on its path ({how})"),
                Some((false, how)) => format!(" — **did not take the intended path**: {how}"),
                None => String::new(),
            };
            let _ = writeln!(s, "- {} {} S={}: {whose} counters over the runs: {}{verdict}", c.mode, c.family, fmt_count(c.services), shown.join(", "));
        }
    }

    fn targets(&self) -> Vec<TargetRow> {
        let mut out = Vec::new();
        for f in self.families() {
            self.data_path_targets(f, &mut out);
        }
        let s = 10_000;
        let t = |mode| self.program_case(mode, s).and_then(|c| c.program.as_ref()).map(|p| p.result.clone());
        if let Some(ebpf) = t(Mode::Ebpf) {
            for (mode, tool) in [(Mode::Iptables, "iptables-restore"), (Mode::Nftables, "nft -f")] {
                let (met, note) = match (&ebpf, t(mode)) {
                    (Ok(e), Some(Ok(o))) => (Some(e < &o), format!("agent {} vs {tool} {} ({:.1}× faster)", secs(*e), secs(o), o.as_secs_f64() / e.as_secs_f64())),
                    (Ok(e), Some(Err(o))) => (Some(true), format!("agent {} vs {tool}: {o}", secs(*e))),
                    (Err(e), _) => (Some(false), format!("agent: {e}")),
                    (Ok(_), None) => (None, format!("{tool} not measured")),
                };
                out.push((Some(Family::V4), format!("programming {s} Services faster than {tool}"), met, note));
            }
        }
        for f in self.families() {
            self.socket_targets(f, &mut out);
        }
        for f in self.families() {
            self.node_port_targets(f, &mut out);
        }
        self.flood_targets(&mut out);
        out.extend(super::controlplane::targets(&self.api_cases).into_iter().map(|(w, m, n)| (None, w, m, n)));
        out
    }

    /// The `ClusterIP` data-path targets of family `f` (none without its
    /// data-path cases).
    fn data_path_targets(&self, f: Family, out: &mut Vec<TargetRow>) {
        let sizes = self.sizes(f);
        let (Some(&smin), Some(&smax)) = (sizes.first(), sizes.last()) else { return };
        if self.case(f, Mode::Ebpf, smin).is_none() && self.case(f, Mode::Direct, smin).is_none() {
            return;
        }
        for (m, what) in [(0, "new-connection rate"), (1, "keep-alive request rate")] {
            let r = self.ratio(f, Mode::Ebpf, smin, m);
            out.push((
                Some(f),
                format!("ebpf {what} ≥ 0.95 × direct at S={smin}"),
                r.map(|r| r >= 0.95),
                r.map_or_else(|| "no figures".into(), |r| format!("{r:.3} × direct ({:+.1}% vs the target)", (r / 0.95 - 1.0) * 100.0)),
            ));
        }
        if smax != smin {
            for (m, what) in [(0, "new-connection rate"), (1, "keep-alive request rate")] {
                let (a, b) = (self.median(f, Mode::Ebpf, smin, m), self.median(f, Mode::Ebpf, smax, m));
                let r = a.zip(b).map(|(a, b)| b / a);
                // The same comparison with each figure taken relative to
                // `direct` at its S: what is left when the machine itself
                // was faster or slower during one group of cases.
                let norm = self.ratio(f, Mode::Ebpf, smin, m).zip(self.ratio(f, Mode::Ebpf, smax, m)).map(|(a, b)| b / a);
                out.push((
                    Some(f),
                    format!("ebpf {what} at S={smax} within 5% of its own S={smin}"),
                    r.map(|r| r >= 0.95),
                    r.map_or_else(
                        || "no figures".into(),
                        |r| {
                            format!(
                                "{r:.3} × its S={smin} figure ({:+.1}%); relative to direct at each S: {}",
                                (r - 1.0) * 100.0,
                                norm.map_or_else(|| "–".into(), |n| format!("{n:.3}× ({:+.1}%)", (n - 1.0) * 100.0))
                            )
                        },
                    ),
                ));
            }
            let (e, i) = (self.median(f, Mode::Ebpf, smax, 0), self.median(f, Mode::Iptables, smax, 0));
            out.push((
                Some(f),
                format!("ebpf ahead of iptables on new connections at S={smax}"),
                e.zip(i).map(|(e, i)| e > i),
                e.zip(i).map_or_else(|| "no figures".into(), |(e, i)| format!("{} vs {} conn/s ({:.2}×)", fmt_num(e), fmt_num(i), e / i)),
            ));
        }
    }

    /// Programming the Services of the data-path cases, IPv4 beside IPv6
    /// (kube-proxy's shapes: `iptables-restore` / `ip6tables-restore`, the
    /// `ip` / `ip6` table), when any IPv6 case was programmed.
    fn program_by_family(&self, s: &mut String) {
        let sizes = self.sizes(Family::V6);
        let took = |f, mode, n| {
            self.case(f, mode, n).and_then(|c| c.program.as_ref()).map(|p| match &p.result {
                Ok(d) => secs(*d),
                Err(e) => e.clone(),
            })
        };
        let modes = [Mode::Iptables, Mode::Nftables, Mode::Ebpf, Mode::NpIptables, Mode::NpTc];
        if !sizes.iter().any(|&n| modes.iter().any(|&m| took(Family::V6, m, n).is_some())) {
            return;
        }
        let _ = writeln!(s, "\nThe data-path cases' Services (their programming time, same method), IPv4 / IPv6:\n");
        let mut head = String::from("| mode |");
        let mut sep = String::from("|---|");
        for &n in &sizes {
            let _ = write!(head, " S = {}, IPv4 / IPv6 |", fmt_count(n));
            sep.push_str("---:|");
        }
        let _ = writeln!(s, "{head}\n{sep}");
        for mode in modes {
            if !sizes.iter().any(|&n| took(Family::V6, mode, n).is_some() || took(Family::V4, mode, n).is_some()) {
                continue;
            }
            let _ = write!(s, "| {mode} |");
            for &n in &sizes {
                let v = |f| took(f, mode, n).unwrap_or_else(|| "–".into());
                let _ = write!(s, " {} / {} |", v(Family::V4), v(Family::V6));
            }
            s.push('\n');
        }
    }

    /// The `apiserver` section, with this run's kube-proxy counterparts.
    fn api_section(&self, s: &mut String) {
        let mode_of = |name: &str| match name {
            "iptables" => Some(Mode::Iptables),
            "nftables" => Some(Mode::Nftables),
            _ => None,
        };
        let program = |name: &str, n: usize| {
            let mode = mode_of(name)?;
            self.program_case(mode, n).and_then(|c| c.program.as_ref()).map(|p| p.result.clone())
        };
        let add_one = |name: &str| {
            let mode = mode_of(name)?;
            let c = self.cases.iter().chain(&self.program_cases).find(|c| c.mode == mode && c.add_one.is_some())?;
            c.add_one.clone().map(|r| (c.services, r))
        };
        let kp = super::controlplane::Counterparts { program: &program, add_one: &add_one };
        super::controlplane::markdown(s, &self.api_cases, self.args, &kp);
    }

    /// The Markdown report.
    #[must_use]
    #[expect(clippy::too_many_lines, reason = "one report, read top to bottom")]
    pub fn markdown(&self) -> String {
        let (a, mach) = (self.args, &self.machine);
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmarks\n");
        let _ = writeln!(
            s,
            "ClusterIP datapath and control plane of this project's agent (`ebpf`) side by side with direct routing and \
             kube-proxy's iptables, nftables and IPVS rule shapes (issue 5), and its NodePort datapath, TC and XDP paths (`np-tc`, \
             `np-xdp`), side by side with kube-proxy's iptables NodePort rules and a direct route to the pods (issue 4), measured \
             in one run on one machine by `cargo xtask bench`. Everything runs in network namespaces the bench creates (client → \
             node → 10 pods; for NodePort client → node A → node B → 10 pods, the test topologies). `ebpf-sock` is the same \
             agent and Services as `ebpf` with the load generator inside the agent's `--cgroup`, so its sockets take the \
             socket path (translated once at `connect()`/`sendto()`) instead of the per-packet TC path. Every data-path mode but \
             the flood modes runs over IPv4 and over IPv6 (IPv6-only Services on the same topologies made dual-stack, kube-proxy's \
             IPv6 rule shapes), each family's ratios against its own direct baseline.\n"
        );
        let _ = writeln!(s, "- machine: {} ({} cores), kernel {}", mach.cpu, mach.cores, mach.kernel);
        let _ = writeln!(s, "- date: {}; whole run {:.0} s; load average at start / end: {} / {}", mach.date, self.elapsed.as_secs_f64(), mach.load_start, loadavg());
        let _ = writeln!(s, "- command: `{}`", a.command_line);
        let _ = writeln!(
            s,
            "- each case: {} run(s) of {} s per phase ({} client threads); figures are the median, spread in the raw table",
            a.reps,
            a.duration.as_secs_f64(),
            a.clients
        );
        let ipv6_at = if a.families.contains(&Family::V6) {
            format!(" (IPv6 at S = {})", a.ipv6_services.iter().map(|&n| fmt_count(n)).collect::<Vec<_>>().join(", "))
        } else {
            String::new()
        };
        let _ = writeln!(s, "- families: {}{ipv6_at}; the flood modes run over IPv4 only", a.families.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "));
        let _ = writeln!(
            s,
            "- iptables: `{}` / `{}` ({} backend; {}), {} Services per `--noflush` transaction; nftables: `nft -f` ({}), {} Services per transaction",
            a.ipt_backend.restore_bin(),
            a.ipt_backend.restore_bin_for(Family::V6),
            a.ipt_backend.name(),
            mach.iptables,
            a.ipt_chunk,
            mach.nft,
            a.nft_chunk
        );
        let _ = writeln!(
            s,
            "- ebpf: `{}` (release), TC ingress on `ext0,lxc*`, socket programs on a cgroup of the bench's (`--cgroup`; only ebpf-sock's generator is in it)",
            a.agent.display()
        );
        let _ = writeln!(
            s,
            "- load generator: {}\n",
            match a.generator {
                Generator::Process => "a process per phase in every mode (`--generator process`)",
                Generator::Thread => "threads of the bench process, but a process in ebpf-sock (`--generator thread`)",
            }
        );

        if !self.cases.is_empty() {
            let _ = writeln!(s, "## Data path\n");
            let _ = writeln!(
                s,
                "ClusterIP: client → node → pod. Median of the runs; in brackets the ratio to `direct` of the same family at the same \
                 number of Services in this run.\n"
            );
            self.data_table(&mut s, &MODES);
        }
        let cluster_ip_counters: Vec<&Case> = self.cases.iter().filter(|c| !c.mode.is_node_port() && c.counters.is_some()).collect();
        Self::counter_lines(&mut s, &cluster_ip_counters, &NOTED_COUNTERS_CLUSTER_IP, "node");
        if self.cases.iter().any(|c| c.mode.is_node_port()) {
            let _ = writeln!(s, "\n## NodePort (north-south)\n");
            let _ = writeln!(
                s,
                "Client → node A's address on a node port → backend on node B (node A DNATs and SNATs; the reply returns through node A). \
                 Median of the runs; in brackets the ratio to `np-direct` of the same family (the client routed straight to the pod IPs \
                 through node A, no translation) at the same number of Services in this run.\n"
            );
            self.data_table(&mut s, &NP_MODES);
            let with_counters: Vec<&Case> = self.cases.iter().filter(|c| c.mode.is_node_port() && !c.mode.is_flood() && c.counters.is_some()).collect();
            Self::counter_lines(&mut s, &with_counters, &NOTED_COUNTERS, "node A");
        }

        self.family_table(&mut s);

        self.flood_section(&mut s);

        if !self.program_cases.is_empty() || self.cases.iter().any(|c| c.program.is_some()) {
            let _ = writeln!(s, "\n## Control plane\n");
            let _ = writeln!(
                s,
                "Time to program S Services (10 endpoints each) from nothing into an empty node{}. \
                 iptables/nftables: until the last restore/`nft -f` returns; ebpf: from starting the agent until the pinned service map \
                 holds every frontend with all its backends (read with map lookups). Where a data-path case had the same S, its \
                 programming time is the one shown.\n",
                if a.add_one_at > 0 { format!(", and to apply one added Service at S = {}", fmt_count(a.add_one_at)) } else { String::new() }
            );
            // (`--cp-services 0 --add-one-at 0`: no control-plane cases.)
            if !a.cp_services.is_empty() || a.add_one_at > 0 {
                let mut head = String::from("| mode |");
                let mut sep = String::from("|---|");
                for n in &a.cp_services {
                    let _ = write!(head, " S = {} |", fmt_count(*n));
                    sep.push_str("---:|");
                }
                let _ = writeln!(s, "{head} add one at S = {} |\n{sep}---:|", fmt_count(a.add_one_at));
                for mode in [Mode::Iptables, Mode::Nftables, Mode::Ipvs, Mode::Ebpf] {
                    let _ = write!(s, "| {mode} |");
                    if mode == Mode::Ipvs {
                        let _ = writeln!(s, " not measurable here (no IPVS in this kernel) |{}", " |".repeat(a.cp_services.len()));
                        continue;
                    }
                    for &n in &a.cp_services {
                        match self.program_case(mode, n).and_then(|c| c.program.as_ref()) {
                            Some(prog) => match &prog.result {
                                Ok(took) => {
                                    let _ = write!(s, " {} ({} tx) |", secs(*took), prog.transactions);
                                }
                                Err(why) => {
                                    let _ = write!(s, " {why} |");
                                }
                            },
                            None => s.push_str(" – |"),
                        }
                    }
                    let add = self
                        .cases
                        .iter()
                        .chain(&self.program_cases)
                        .find(|c| c.mode == mode && c.services == a.add_one_at && c.add_one.is_some())
                        .and_then(|c| c.add_one.clone());
                    match add {
                        Some(Ok(d)) => {
                            let _ = writeln!(s, " {} |", secs(d));
                        }
                        Some(Err(e)) => {
                            let _ = writeln!(s, " {e} |");
                        }
                        None => s.push_str(" – |\n"),
                    }
                }
            }
            self.program_by_family(&mut s);
        }

        self.api_section(&mut s);

        let _ = writeln!(s, "\n## Targets (reported, not asserted)\n");
        let _ = writeln!(
            s,
            "The same targets for each family, over that family's own baselines; a note says where a case's node counters show it \
             did not take its mode's path.\n"
        );
        let _ = writeln!(s, "| target | family | met | by how much |\n|---|---|---|---|");
        for (family, what, met, note) in self.targets() {
            let met = match met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "–",
            };
            let _ = writeln!(s, "| {what} | {} | {met} | {note} |", family.map_or("–", Family::name));
        }

        let _ = writeln!(s, "\n## How it is measured\n");
        for l in [
            "- Topology: client namespace (no default route) → node namespace (veth `ext0`; `ip_forward=1`) → 10 pod namespaces (veth `lxcN`, /32 routes). A fresh sandbox for every case; rules live only in its node namespace and go with it. The bench refuses to run iptables/nft in the root namespace.",
            "- IPv6 (`--families`, default both; `--ipv6-services` for the S values, by default all of them, with `--quick` the smallest): every data-path mode but the flood modes again on the same topologies made dual-stack (client fd00:c::2 → node fd00:c::1 → pods fd00:244::11–1a/128; NodePort: client 2001:db8:100::2 → node A 2001:db8:100::1, node link fd00:10::1/2 → pods on node B fd00:244:0:2::11–1a), with the same S Services IPv6-only (`ipFamilies: [IPv6]`, `ipFamilyPolicy: SingleStack`, ClusterIPs from fd00:96::10, `addressType: IPv6` slices; the never-reached endpoints in fd00:64::/96). kube-proxy's IPv6 shapes: the same chains through `ip6tables-restore` (`/128` matches, `[addr]:port` DNAT targets, `! -s fd00:244::/48` for the masquerade mark, MASQUERADE `--random-fully`), and the `ip6 kube-proxy` table (`ipv6_addr` set and maps, `ip6 daddr . meta l4proto . th dport vmap`, `ip6 saddr != fd00:244::/48` masquerade mark, `dnat to [addr]:port`, fd00:96::/112 for unallocated ClusterIPs). `direct` / `np-direct` connect to the pods' IPv6 addresses. The families run one after the other at each S; within a family the runs are interleaved as above, and every ratio is to the same family's baseline. Add-one-Service is measured for IPv4 only.",
            "- Services: S ClusterIP Services with 10 endpoints each. The one in the middle of the list is the real one (ports 80/TCP HTTP, 5201/TCP bulk, 5300/UDP echo → the 10 pods); the others point at 10.64.0.0/13, never reached. A linear rule walk (iptables' `KUBE-SERVICES`) sees half the Services before the real one.",
            "- `direct`: the client connects to the pod IPs in turn (no translation). Other modes connect to the real Service's ClusterIP.",
            "- `ebpf` and `ebpf-sock`: the same agent (socket load balancing on, the default) with the same Services. In `ebpf` the load generator is outside the agent's `--cgroup`: every packet takes the TC path (DNAT on the node, reverse NAT of the replies). In `ebpf-sock` it is a process inside that cgroup: `connect()` (TCP, connected UDP) is rewritten to a backend once by the cgroup `connect4` program, and the packets go client → node → pod untranslated (the TC programs still look at each one and pass it). The node's counters below the table show which path carried the traffic.",
            "- Load generator: every phase of every mode is a separate process (the bench binary re-executed, `nsenter` into the client namespace, moved into a cgroup before exec), which times its own phase and reports it as JSON; `ebpf-sock`'s runs in the agent's `--cgroup`, every other mode's in an empty cgroup of its own, so the ratios compare datapaths, not generators (`--generator thread` runs every mode but `ebpf-sock` as threads of the bench instead). The generator code is the same either way.",
            "- new conn/s: each client thread opens a connection, sends one HTTP/1.1 request, reads the reply, closes (client `tcp_tw_reuse=1`, port range 1024–65535). keep-alive req/s: one connection per client thread, requests back to back. bulk: one TCP stream writing 128 KiB buffers to a sink for half the phase time. UDP rr/s: one connected UDP socket per client thread, 64-byte request, echo reply. p50/p99: one client alone, a new connection per request (connect + request + reply).",
            "- CPU µs/conn and µs/req: system + softirq time of the whole machine from /proc/stat during the new-connection and keep-alive phases, divided by the operations. Client, node and pods share the same CPUs, so this is total kernel cost per operation; the differences between modes are the datapath's. Resolution is 10 ms per phase.",
            "- kube-proxy masquerades ClusterIP traffic from outside the cluster CIDR; the client (192.0.2.2) is outside 10.244.0.0/16, so the iptables and nftables modes also SNAT (as kube-proxy would). The ebpf mode does not SNAT (replies come back through the node, where TC reverses the DNAT); ebpf-sock needs neither.",
            "- Targets with a spread: the ratio of the medians, then in brackets the lowest and highest run-by-run ratio (run i of every case of one S is measured in the same round, the cases back to back).",
            "- Servers: in each pod, worker threads sharing one listener (no thread spawned per connection), the same in every mode.",
            "- NodePort modes (`np-*`): the two-node topology of the north-south tests — client (198.51.100.2, no default route) → node A (`ext0` 198.51.100.1; `nodelink` 10.0.0.1/30) → node B (10.0.0.2) → 10 pods on node B (10.244.2.0/24). Every one of the S Services is of type NodePort (the real one on node ports 30080/TCP HTTP, 30201/TCP bulk, 30300/UDP echo; the others on 20000 + i, endpoints never reached); externalTrafficPolicy Cluster, so node A SNATs to its own address and the reply comes back through it. Rules and agents only on node A.",
            "- `np-direct`: the client connects to the pod IPs in turn, routed by node A (no translation). `np-iptables`: kube-proxy's iptables rules on node A — the ClusterIP chains above plus `KUBE-NODEPORTS` (one rule per node port, reached through the last `KUBE-SERVICES` rule, `-m addrtype --dst-type LOCAL`) → `KUBE-EXT-*` (`KUBE-MARK-MASQ`, then `KUBE-SVC-*`), MASQUERADE `--random-fully` in `POSTROUTING`. `np-tc`: the agent on node A (`--devices ext0,nodelink,lxc*`), TC path. `np-xdp`: the same with `--xdp --xdp-mode native` (XDP on node A's `ext0` and `nodelink`).",
            "- Flood modes (`np-tc-flood`, `np-iptables-flood`; `--flood-pps N`, 0 for none, at `--flood-services`, by default the smallest S): see the flood section above. The flood is paced in 1 ms steps to the set rate (a sender more than 50 ms behind skips what it owes rather than bursting), bounded in packets (rate × time limit) and time (the two phases + 20 s); only the new-connection and keep-alive phases run under it. The spoofed SYNs and datagrams are DNATed and SNATed to the pods on node B like real first packets (their SYN-ACKs and echoes go back through node A towards 172.16.0.0/12, where no route leads); the agent drops the ACKs and RSTs of no flow (`drop_tcp_no_flow`). The HTTP servers answer with their pod's index as the body, so the established connections' check knows the pod.",
            "- NIC-like links for every `np-*` mode: node A's two links (to the client and to node B) each pass through a wire namespace whose native XDP program redirects every frame across (`tests/src/xdpwire.rs`), so node A receives `xdp_frame`s as from a NIC's receive ring — its XDP program runs before any skb exists, and without XDP the driver builds the skb, as a NIC driver does. Without the wires node A would receive skbs from its peer's stack, and native XDP on a veth then only adds work. The senders compute full checksums (`ethtool -K … tx off`, which also turns TSO off: MTU-sized segments) — a packet on a real wire carries its checksum, and a frame cannot carry one left to offload — and the devices that receive redirected frames run NAPI (`gro on`).",
        ] {
            let _ = writeln!(s, "{l}");
        }

        let _ = writeln!(s, "\n## Raw numbers\n");
        let _ = writeln!(s, "Every run of every case (also in `bench.json`).\n");
        let _ = writeln!(s, "| S | family | mode | figure | runs | median | min | max | errors |\n|---:|---|---|---|---|---:|---:|---:|---:|");
        for c in &self.cases {
            if c.reps.is_empty() {
                continue;
            }
            let errors: u64 = c.reps.iter().map(|r| r.errors).sum();
            for (k, (_, h, _, _)) in METRICS.iter().enumerate() {
                // The flood modes measure new connections and keep-alive requests only.
                if c.mode.is_flood() && c.reps.iter().all(|r| r.values[k].is_none()) {
                    continue;
                }
                let runs: Vec<String> = c.reps.iter().map(|r| r.values[k].map_or_else(|| "–".into(), fmt_num)).collect();
                let (med, lo, hi) = c.stat(k).map_or_else(|| ("–".into(), "–".into(), "–".into()), |(a, b, c)| (fmt_num(a), fmt_num(b), fmt_num(c)));
                let _ = writeln!(s, "| {} | {} | {} | {h} | {} | {med} | {lo} | {hi} | {errors} |", c.services, c.family, c.mode, runs.join(", "));
            }
            if let Some(e) = c.reps.iter().find_map(|r| r.first_error.clone()) {
                let _ = writeln!(s, "| {} | {} | {} | first error | {e} | | | | |", c.services, c.family, c.mode);
            }
        }
        let _ = writeln!(s, "\n![connection rate and latency against the number of Services](bench.svg)");
        s
    }

    /// The raw data as JSON.
    #[must_use]
    pub fn json(&self) -> Value {
        let case = |c: &Case| {
            let prog = c.program.as_ref().map(|p| match &p.result {
                Ok(d) => json!({"seconds": d.as_secs_f64(), "transactions": p.transactions}),
                Err(e) => json!({"error": e, "transactions": p.transactions}),
            });
            let add = c.add_one.as_ref().map(|r| match r {
                Ok(d) => json!({"seconds": d.as_secs_f64()}),
                Err(e) => json!({"error": e}),
            });
            let metrics: serde_json::Map<String, Value> = METRICS
                .iter()
                .enumerate()
                .map(|(k, (key, _, unit, higher))| {
                    let runs: Vec<Option<f64>> = c.reps.iter().map(|r| r.values[k]).collect();
                    let stat = c.stat(k);
                    ((*key).to_owned(), json!({"unit": unit, "higher_is_better": higher, "runs": runs,
                        "median": stat.map(|s| s.0), "min": stat.map(|s| s.1), "max": stat.map(|s| s.2),
                        "ratio_to_direct": self.ratio(c.family, c.mode, c.services, k),
                        "ratio_to_direct_runs": (c.mode != c.mode.baseline()).then(|| self.run_ratios(c.family, c.mode, c.services, k)),
                        "ratio_to_iptables": c.mode.is_node_port().then(|| {
                            let iptables = if c.mode.is_flood() { Mode::NpIptablesFlood } else { Mode::NpIptables };
                            self.ratio_to(c.family, c.mode, iptables, c.services, k)
                        }).flatten(),
                        "ratio_to_no_flood": c.mode.is_flood().then(|| self.flood_ratio(c.mode, c.services, k)).flatten()}))
                })
                .collect();
            json!({
                "mode": c.mode.to_string(), "family": c.family.name(), "baseline": c.mode.baseline().to_string(), "services": c.services,
                "skipped": c.skipped, "counters": c.counters,
                "path": c.path().map(|(intended, how)| json!({"intended": intended, "counters_show": how})),
                "program": prog, "add_one": add, "metrics": metrics,
                "errors": c.reps.iter().map(|r| r.errors).collect::<Vec<_>>(),
                "first_error": c.reps.iter().find_map(|r| r.first_error.clone()),
                "flood": c.mode.is_flood().then(|| json!({
                    "no_flood_mode": c.mode.no_flood().to_string(),
                    "established_lost_max": self.lost(c.mode, c.services).into_iter().max(),
                    "runs": c.reps.iter().filter_map(|r| r.flood.as_ref().map(super::flood::FloodRep::json)).collect::<Vec<_>>(),
                })),
            })
        };
        let m = &self.machine;
        let a = self.args;
        json!({
            "machine": {"cpu": m.cpu, "cores": m.cores, "kernel": m.kernel, "date": m.date, "iptables": m.iptables, "nft": m.nft,
                "loadavg_start": m.load_start, "loadavg_end": loadavg()},
            "command_line": a.command_line,
            "settings": {"quick": a.quick, "services": a.services, "families": a.families.iter().map(|f| f.name()).collect::<Vec<_>>(),
                "ipv6_services": a.ipv6_services, "duration_s": a.duration.as_secs_f64(), "reps": a.reps,
                "clients": a.clients, "cp_services": a.cp_services, "add_one_at": a.add_one_at,
                "iptables_backend": a.ipt_backend.name(), "ipt_chunk": a.ipt_chunk, "nft_chunk": a.nft_chunk,
                "generator": a.generator.name(), "flood_pps": a.flood_pps, "flood_services": a.flood_services,
                "api_services": a.api_services, "api_changes": a.api_changes},
            "elapsed_s": self.elapsed.as_secs_f64(),
            "cases": self.cases.iter().map(case).collect::<Vec<_>>(),
            "program_cases": self.program_cases.iter().map(case).collect::<Vec<_>>(),
            "api_cases": super::controlplane::json(&self.api_cases),
            "targets": self.targets().into_iter().map(|(f, w, m, n)| json!({"target": w, "family": f.map(Family::name), "met": m, "note": n})).collect::<Vec<_>>(),
        })
    }

    /// The flood panel: each flood mode's new conn/s and keep-alive req/s
    /// over its no-flood figures at the smallest S with flood cases, and
    /// the 0.8× line of the target.
    fn svg_flood<DB: DrawingBackend>(&self, area: &DrawingArea<DB, plotters::coord::Shift>) -> Result<(), String> {
        let Some(n) = self.args.services.iter().copied().find(|&n| FLOOD_MODES.iter().any(|&m| self.case(Family::V4, m, n).is_some_and(|c| !c.reps.is_empty())))
        else {
            return Ok(());
        };
        let bars: Vec<(String, Option<f64>, RGBColor)> = [(0, "new conn/s"), (1, "keep-alive req/s")]
            .iter()
            .flat_map(|&(m, h)| {
                [(Mode::NpIptablesFlood, RGBColor(230, 120, 0)), (Mode::NpTcFlood, RGBColor(0, 160, 160))]
                    .map(|(mode, color)| (format!("{} {h}", mode.no_flood()), self.flood_ratio(mode, n, m), color))
            })
            .collect();
        let ymax = bars.iter().filter_map(|b| b.1).fold(1.0, f64::max) * 1.25;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("NodePort under a {} packets/s spoofed flood, S={}: figure / same mode without the flood", fmt_count(self.args.flood_pps as usize), fmt_count(n)),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(10)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..4f64, 0f64..ymax)
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc("× no-flood").draw().map_err(|e| e.to_string())?;
        #[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
        for (i, (label, r, color)) in bars.iter().enumerate() {
            let x = i as f64;
            let v = r.unwrap_or(0.0);
            chart.draw_series(std::iter::once(Rectangle::new([(x + 0.15, 0.0), (x + 0.85, v)], color.filled()))).map_err(|e| e.to_string())?;
            let text = format!("{label}: {}", r.map_or_else(|| "–".into(), |r| format!("{r:.2}×")));
            chart
                .draw_series(std::iter::once(Text::new(text, (x + 0.12, v + ymax * 0.04), ("sans-serif", 13))))
                .map_err(|e| e.to_string())?;
        }
        chart
            .draw_series(LineSeries::new(vec![(0.0, 0.8), (4.0, 0.8)], RED.stroke_width(1)))
            .map_err(|e| e.to_string())?
            .label("0.8× (target for np-tc new conn/s)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(1)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Connection rate and p50 latency against the number of Services, per
    /// mode: a row of two panels per family (IPv4 above IPv6, the same
    /// scales); below them, when the run has flood cases, the flood panel.
    pub fn svg(&self, path: &Path) -> Result<(), String> {
        const ROW: u32 = 440;
        let floods = self.cases.iter().any(|c| c.mode.is_flood() && !c.reps.is_empty());
        let families = self.families();
        let rows = u32::try_from(families.len().max(1)).unwrap_or(1);
        let root = SVGBackend::new(path, (1100, ROW * rows + if floods { 360 } else { 0 })).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(ROW * rows);
        if floods {
            self.svg_flood(&bottom)?;
        }
        let areas = top.split_evenly((usize::try_from(rows).unwrap_or(1), 1));
        // Without data-path cases: the (empty) IPv4 panels, as before.
        let families = if families.is_empty() { vec![Family::V4] } else { families };
        for (area, f) in areas.iter().zip(families) {
            self.svg_family(area, f)?;
        }
        root.present().map_err(|e| e.to_string())
    }

    /// One family's row of the chart: new connections/s and p50 latency
    /// against S, a line per mode (the y scales shared by both families).
    fn svg_family<DB: DrawingBackend>(&self, area: &DrawingArea<DB, plotters::coord::Shift>, family: Family) -> Result<(), String> {
        let panels = area.split_evenly((1, 2));
        let colors = [
            (Mode::Direct, BLACK),
            (Mode::Iptables, RED),
            (Mode::Nftables, BLUE),
            (Mode::Ebpf, GREEN),
            (Mode::EbpfSock, RGBColor(0, 110, 40)),
            (Mode::NpDirect, RGBColor(128, 128, 128)),
            (Mode::NpIptables, RGBColor(230, 120, 0)),
            (Mode::NpTc, RGBColor(0, 160, 160)),
            (Mode::NpXdp, RGBColor(150, 0, 200)),
        ];
        #[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
        let xs: Vec<f64> = self.args.services.iter().map(|&n| n as f64).collect();
        let xmax = xs.iter().copied().fold(1.0, f64::max) * 3.0;
        for (panel, (m, title)) in panels.iter().zip([(0, "new TCP connections/s"), (4, "p50 latency, new connection + request (µs)")]) {
            let title = format!("{title}, {family}");
            let ymax = self
                .cases
                .iter()
                .filter(|c| !c.mode.is_flood())
                .filter_map(|c| c.stat(m).map(|s| s.0))
                .fold(1.0, f64::max)
                * 1.15;
            let mut chart = ChartBuilder::on(panel)
                .caption(&title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(64)
                .build_cartesian_2d((0.5f64..xmax).log_scale(), 0f64..ymax)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("Services")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .draw()
                .map_err(|e| e.to_string())?;
            for (mode, color) in colors {
                #[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
                let pts: Vec<(f64, f64)> = self
                    .cases
                    .iter()
                    .filter(|c| c.mode == mode && c.family == family)
                    .filter_map(|c| c.stat(m).map(|s| (c.services as f64, s.0)))
                    .collect();
                if pts.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(mode.to_string())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| e.to_string())?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerLeft)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
