//! Prometheus text exposition on `--metrics-bind-address`, with kube-proxy's
//! metric names where the meaning is the same, plus map occupancy and the
//! datapath counters.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use proxy_common::stats::{ByFamily, FAMILIES, REASONS, StatCounter};

/// A cumulative histogram with fixed upper bounds (seconds).
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    #[must_use]
    pub fn new(bounds: Vec<f64>) -> Self {
        let n = bounds.len();
        Self { bounds, counts: vec![0; n], sum: 0.0, count: 0 }
    }

    /// kube-proxy's sync duration buckets: exponential from 1 ms, ×2, 15 buckets.
    #[must_use]
    pub fn sync_duration() -> Self {
        Self::new((0..15).map(|i| 0.001 * f64::from(1u32 << i)).collect())
    }

    /// 0.1 ms to 13 s, doubling: the agent's own share of a change's way.
    #[must_use]
    pub fn agent_latency() -> Self {
        Self::new((0..18).map(|i| 0.0001 * f64::from(1u32 << i)).collect())
    }

    /// kube-proxy's network programming buckets: 0.25, 0.5, 1..59 by 1,
    /// 60..115 by 5, 120..300 by 30.
    #[must_use]
    pub fn network_programming() -> Self {
        let mut b = vec![0.25, 0.5];
        b.extend((1..=59).map(f64::from));
        b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
        b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
        Self::new(b)
    }

    pub fn observe(&mut self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Kubernetes Events about refused objects ([`crate::events`]): counted by
/// the publishing task itself, without the agent's lock.
#[derive(Debug, Default)]
pub struct EventCounters {
    /// Events the API server accepted (created, or a series updated).
    pub published: AtomicU64,
    /// Events the API server refused or did not answer in time.
    pub failed: AtomicU64,
    /// Events dropped because the publishing queue was full.
    pub dropped: AtomicU64,
}

impl EventCounters {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug)]
pub struct Metrics {
    pub sync_duration: Histogram,
    /// Syncs that recomputed and compared everything (start, node facts,
    /// every --sync-period) and those that followed changes.
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    /// From a change's arrival at the agent (the first not yet programmed)
    /// to the end of the sync that programmed it.
    pub change_programming: Histogram,
    /// When the last change was queued (s since the epoch).
    pub last_queued_timestamp_seconds: f64,
    /// Services with a Local traffic policy and no local endpoints, by
    /// policy (internal, external).
    pub no_local_endpoints: (u64, u64),
    /// `/healthz` and `/livez` answers by status code.
    pub healthz_total: BTreeMap<u16, u64>,
    pub livez_total: BTreeMap<u16, u64>,
    pub network_programming: Histogram,
    pub last_sync_timestamp_seconds: f64,
    pub endpoint_changes_pending: u64,
    pub endpoint_changes_total: u64,
    pub service_changes_pending: u64,
    pub service_changes_total: u64,
    pub sync_errors_total: u64,
    /// Objects (or ports) skipped as invalid in the last sync.
    pub invalid_objects: u64,
    /// Frontends that could not be programmed (map full, write error).
    pub frontends_not_programmed: u64,
    pub frontends_programmed: u64,
    /// map name → (entries, capacity)
    pub map_entries: BTreeMap<&'static str, (u64, u64)>,
    /// Conntrack garbage collection: passes, entries deleted, last duration.
    pub ct_gc_runs_total: u64,
    pub ct_gc_deleted_total: u64,
    pub ct_gc_duration_seconds: f64,
    /// Shared with the Event publisher (API server mode; zero otherwise).
    pub events: Arc<EventCounters>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sync_duration: Histogram::sync_duration(),
            sync_full_duration: Histogram::sync_duration(),
            sync_partial_duration: Histogram::sync_duration(),
            change_programming: Histogram::agent_latency(),
            last_queued_timestamp_seconds: 0.0,
            no_local_endpoints: (0, 0),
            healthz_total: BTreeMap::new(),
            livez_total: BTreeMap::new(),
            network_programming: Histogram::network_programming(),
            last_sync_timestamp_seconds: 0.0,
            endpoint_changes_pending: 0,
            endpoint_changes_total: 0,
            service_changes_pending: 0,
            service_changes_total: 0,
            sync_errors_total: 0,
            invalid_objects: 0,
            frontends_not_programmed: 0,
            frontends_programmed: 0,
            map_entries: BTreeMap::new(),
            ct_gc_runs_total: 0,
            ct_gc_deleted_total: 0,
            ct_gc_duration_seconds: 0.0,
            events: Arc::default(),
        }
    }
}

fn simple(out: &mut String, kind: &str, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

impl Metrics {
    /// The exposition text; `stats` are the datapath counters (summed over
    /// CPUs, by family).
    #[must_use]
    pub fn render(&self, stats: &[(u32, ByFamily)]) -> String {
        let mut o = String::new();
        self.sync_duration.render(&mut o, "kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds");
        self.sync_full_duration.render(&mut o, "kubeproxy_sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs");
        self.sync_partial_duration.render(&mut o, "kubeproxy_sync_partial_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for partial resyncs");
        simple(&mut o, "gauge", "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "The last time a sync of proxy rules was queued", self.last_queued_timestamp_seconds);
        let _ = writeln!(o, "# HELP kubeproxy_sync_proxy_rules_no_local_endpoints_total Number of services with a Local traffic policy and no endpoints\n# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge");
        let _ = writeln!(o, "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{traffic_policy=\"internal\"}} {}", self.no_local_endpoints.0);
        let _ = writeln!(o, "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{traffic_policy=\"external\"}} {}", self.no_local_endpoints.1);
        for (name, help, by_code) in [
            ("kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status", &self.healthz_total),
            ("kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status", &self.livez_total),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (code, n) in by_code {
                let _ = writeln!(o, "{name}{{code=\"{code}\"}} {n}");
            }
        }
        self.change_programming.render(
            &mut o,
            "proxy_change_programming_duration_seconds",
            "From a change's arrival at the agent (watch event or manifest) to the maps holding it",
        );
        self.network_programming.render(
            &mut o,
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
        );
        simple(&mut o, "gauge", "kubeproxy_sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced", self.last_sync_timestamp_seconds);
        simple(&mut o, "gauge", "kubeproxy_sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes", self.endpoint_changes_pending);
        simple(&mut o, "counter", "kubeproxy_sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes", self.endpoint_changes_total);
        simple(&mut o, "gauge", "kubeproxy_sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes", self.service_changes_pending);
        simple(&mut o, "counter", "kubeproxy_sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes", self.service_changes_total);
        simple(&mut o, "counter", "proxy_sync_errors_total", "Syncs in which a map write failed (retried)", self.sync_errors_total);
        simple(&mut o, "gauge", "proxy_invalid_objects", "Objects or ports skipped as invalid in the last sync", self.invalid_objects);
        let events = |c: &AtomicU64| c.load(Ordering::Relaxed);
        simple(&mut o, "counter", "proxy_events_published_total", "Kubernetes Events about refused objects accepted by the API server", events(&self.events.published));
        simple(&mut o, "counter", "proxy_events_failed_total", "Kubernetes Events about refused objects the API server refused or did not answer", events(&self.events.failed));
        simple(&mut o, "counter", "proxy_events_dropped_total", "Kubernetes Events about refused objects dropped because the publishing queue was full", events(&self.events.dropped));
        simple(&mut o, "gauge", "proxy_frontends_programmed", "Frontends programmed in the maps", self.frontends_programmed);
        simple(&mut o, "gauge", "proxy_frontends_not_programmed", "Frontends that could not be programmed (map full or write error)", self.frontends_not_programmed);
        simple(&mut o, "counter", "proxy_conntrack_gc_runs_total", "Conntrack garbage-collection passes", self.ct_gc_runs_total);
        simple(&mut o, "counter", "proxy_conntrack_gc_deleted_total", "Expired conntrack entries deleted by the garbage collector", self.ct_gc_deleted_total);
        simple(&mut o, "gauge", "proxy_conntrack_gc_duration_seconds", "Duration of the last conntrack garbage-collection pass", self.ct_gc_duration_seconds);
        let _ = writeln!(o, "# HELP proxy_map_entries Entries in a BPF map\n# TYPE proxy_map_entries gauge");
        for (map, (n, _)) in &self.map_entries {
            let _ = writeln!(o, "proxy_map_entries{{map=\"{map}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP proxy_map_capacity Capacity (max_entries) of a BPF map\n# TYPE proxy_map_capacity gauge");
        for (map, (_, cap)) in &self.map_entries {
            let _ = writeln!(o, "proxy_map_capacity{{map=\"{map}\"}} {cap}");
        }
        // As Cilium's bpf_map_pressure: how full a map is (0..1).
        let _ = writeln!(o, "# HELP proxy_map_pressure Fill ratio of a BPF map (entries / capacity)\n# TYPE proxy_map_pressure gauge");
        for (map, (n, cap)) in &self.map_entries {
            #[expect(clippy::cast_precision_loss, reason = "a ratio")]
            let p = if *cap == 0 { 0.0 } else { *n as f64 / *cap as f64 };
            let _ = writeln!(o, "proxy_map_pressure{{map=\"{map}\"}} {p}");
        }
        // One series per (reason, family): `family` is `ipv4`, `ipv6` or
        // `other` (neither, e.g. ARP under `pass_not_ipv4`); `sum by (reason)`
        // gives what the series without the label counted before.
        for (metric, help, value) in [
            ("proxy_datapath_packets_total", "Packets by datapath exit reason and address family", (|c| c.packets) as fn(&StatCounter) -> u64),
            ("proxy_datapath_bytes_total", "Bytes by datapath exit reason and address family", |c| c.bytes),
        ] {
            let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for (idx, c) in stats {
                let Some((_, name)) = REASONS.iter().find(|(i, _)| i == idx) else { continue };
                for &(f, family) in FAMILIES {
                    let _ = writeln!(o, "{metric}{{reason=\"{name}\",family=\"{family}\"}} {}", value(&c[f as usize]));
                }
            }
        }
        o
    }
}

#[cfg(test)]
#[expect(clippy::float_cmp, reason = "exact values parsed back from text")]
mod tests {
    use super::*;
    use proxy_common::stats::{FAMILY_IPV4, FAMILY_IPV6};

    /// Parses exposition text into (series, value), checking every sample
    /// line is `name{labels} value` with a declared TYPE.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut types = BTreeMap::new();
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (n, t) = rest.split_once(' ').expect("TYPE name kind");
                types.insert(n.to_owned(), t.to_owned());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let name = series.split('{').next().unwrap();
            let base = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            assert!(types.contains_key(name) || types.contains_key(base), "no TYPE for {name}");
            out.insert(series.to_owned(), value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line}")));
        }
        out
    }

    #[test]
    fn exposition_parses_and_carries_kube_proxy_names() {
        let mut m = Metrics::default();
        m.sync_duration.observe(0.003);
        m.sync_duration.observe(0.5);
        m.network_programming.observe(1.2);
        m.endpoint_changes_pending = 2;
        m.map_entries.insert("proxy_svc_v1", (7, 262_144));
        let mut by_family = ByFamily::default();
        by_family[FAMILY_IPV4 as usize] = StatCounter { packets: 5, bytes: 300 };
        by_family[FAMILY_IPV6 as usize] = StatCounter { packets: 2, bytes: 160 };
        let stats = vec![(3, by_family)];
        let p = parse(&m.render(&stats));
        assert_eq!(p["kubeproxy_sync_proxy_rules_duration_seconds_count"], 2.0);
        assert_eq!(p["kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"}"], 1.0);
        assert_eq!(p["kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"}"], 2.0);
        assert_eq!(p["kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"}"], 0.0);
        assert_eq!(p["kubeproxy_network_programming_duration_seconds_bucket{le=\"2\"}"], 1.0);
        assert_eq!(p["kubeproxy_sync_proxy_rules_endpoint_changes_pending"], 2.0);
        assert_eq!(p["proxy_map_entries{map=\"proxy_svc_v1\"}"], 7.0);
        assert_eq!(p["proxy_datapath_packets_total{reason=\"dnat_new_flow\",family=\"ipv4\"}"], 5.0);
        assert_eq!(p["proxy_datapath_packets_total{reason=\"dnat_new_flow\",family=\"ipv6\"}"], 2.0);
        assert_eq!(p["proxy_datapath_packets_total{reason=\"dnat_new_flow\",family=\"other\"}"], 0.0);
        assert_eq!(p["proxy_datapath_bytes_total{reason=\"dnat_new_flow\",family=\"ipv6\"}"], 160.0);
        assert!(p.contains_key("kubeproxy_sync_proxy_rules_last_timestamp_seconds"));
        assert_eq!(p["proxy_events_published_total"], 0.0);
        EventCounters::add(&m.events.failed);
        EventCounters::add(&m.events.failed);
        let p = parse(&m.clone().render(&stats));
        assert_eq!(p["proxy_events_failed_total"], 2.0, "clones share the counters");
        assert_eq!(p["proxy_events_dropped_total"], 0.0);
    }

    #[test]
    fn buckets_are_cumulative() {
        let mut h = Histogram::new(vec![1.0, 2.0, 3.0]);
        for v in [0.5, 1.5, 2.5, 9.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![1, 2, 3]);
        assert_eq!(h.count(), 4);
    }
}
