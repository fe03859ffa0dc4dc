//! kube-proxy's health state (`pkg/proxy/healthcheck/proxier_health.go`),
//! served on `--healthz-bind-address`:
//!
//! - unhealthy when a change has been queued and not programmed for longer
//!   than the health timeout (2 × `--sync-period`, as kube-proxy uses);
//!   healthy whenever nothing is pending;
//! - `/livez` answers by that alone; `/healthz` also answers 503 until the
//!   initial lists have been programmed once (not ready before: a node
//!   whose datapath is empty must not receive traffic), and when the node
//!   is not eligible (being deleted, or tainted
//!   `ToBeDeletedByClusterAutoscaler`), so load balancers drain it, and
//!   while frontends are not programmed because a map is full (their
//!   traffic is rejected: this node does not serve every Service).
//!
//! Body as kube-proxy's: `{"lastUpdated": "...","currentTime": "...", "nodeEligible": true}`
//! (times in RFC 3339), `Content-Type: application/json`,
//! `X-Content-Type-Options: nosniff`; with frontends not programmed, one
//! more field says how many: `"frontendsNotProgrammed": 3`.
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;

#[derive(Clone, Debug)]
pub struct ProxierHealth {
    timeout: Duration,
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: Option<bool>,
    not_programmed: usize,
}

/// One health answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthAnswer {
    pub status: u16,
    pub body: String,
}

fn rfc3339(t: Option<SystemTime>) -> String {
    let t = t.unwrap_or(SystemTime::UNIX_EPOCH);
    jiff::Timestamp::try_from(t).map_or_else(|_| String::new(), |ts| ts.to_string())
}

impl ProxierHealth {
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, last_updated: None, oldest_pending: None, node_eligible: None, not_programmed: 0 }
    }

    /// A change arrived that the datapath does not have yet.
    pub fn queued_update(&mut self, now: SystemTime) {
        self.oldest_pending.get_or_insert(now);
    }

    /// A sync programmed everything queued so far.
    pub fn updated(&mut self, now: SystemTime) {
        self.last_updated = Some(now);
        self.oldest_pending = None;
    }

    /// How many frontends the last sync could not program (a map full).
    pub fn set_not_programmed(&mut self, frontends: usize) {
        self.not_programmed = frontends;
    }

    /// The agent's own Node changed (or is known for the first time).
    pub fn node_changed(&mut self, node: Option<&Node>) {
        self.node_eligible = node.map(|n| {
            let deleting = n.metadata.deletion_timestamp.is_some();
            let draining = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"));
            !deleting && !draining
        });
    }

    #[must_use]
    pub fn healthy(&self, now: SystemTime) -> bool {
        self.oldest_pending
            .is_none_or(|p| now.duration_since(p).unwrap_or_default() < self.timeout)
    }

    fn answer(&self, now: SystemTime, ok: bool) -> HealthAnswer {
        let eligible = self.node_eligible.unwrap_or(true);
        let not_programmed = match self.not_programmed {
            0 => String::new(),
            n => format!(r#", "frontendsNotProgrammed": {n}"#),
        };
        HealthAnswer {
            status: if ok { 200 } else { 503 },
            body: format!(
                r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {eligible}{not_programmed}}}"#,
                rfc3339(self.last_updated),
                rfc3339(Some(now))
            ),
        }
    }

    #[must_use]
    pub fn healthz(&self, now: SystemTime) -> HealthAnswer {
        self.answer(
            now,
            self.last_updated.is_some() && self.healthy(now) && self.node_eligible != Some(false) && self.not_programmed == 0,
        )
    }

    #[must_use]
    pub fn livez(&self, now: SystemTime) -> HealthAnswer {
        self.answer(now, self.healthy(now))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};

    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    #[test]
    fn not_ready_until_the_first_sync_but_alive() {
        let mut h = ProxierHealth::new(Duration::from_mins(1));
        let a = h.healthz(t(0));
        assert_eq!(a.status, 503, "nothing programmed yet");
        assert_eq!(
            a.body,
            r#"{"lastUpdated": "1970-01-01T00:00:00Z","currentTime": "2023-11-14T22:13:20Z", "nodeEligible": true}"#
        );
        assert_eq!(h.livez(t(0)).status, 200, "starting up is alive");
        h.updated(t(1));
        assert_eq!(h.healthz(t(2)).status, 200);
    }

    #[test]
    fn a_pending_change_older_than_the_timeout_is_unhealthy_until_synced() {
        let mut h = ProxierHealth::new(Duration::from_mins(1));
        h.updated(t(0));
        h.queued_update(t(0));
        h.queued_update(t(30)); // the oldest pending one counts
        assert_eq!(h.healthz(t(59)).status, 200);
        assert_eq!(h.healthz(t(60)).status, 503);
        assert_eq!(h.livez(t(60)).status, 503);
        h.updated(t(61));
        let a = h.healthz(t(62));
        assert_eq!(a.status, 200);
        assert!(a.body.contains(r#""lastUpdated": "2023-11-14T22:14:21Z""#), "{}", a.body);
    }

    #[test]
    fn frontends_left_unprogrammed_fail_healthz_until_they_fit() {
        let mut h = ProxierHealth::new(Duration::from_mins(1));
        h.updated(t(0));
        h.set_not_programmed(3);
        let a = h.healthz(t(1));
        assert_eq!(a.status, 503);
        assert!(a.body.ends_with(r#""nodeEligible": true, "frontendsNotProgrammed": 3}"#), "{}", a.body);
        assert_eq!(h.livez(t(1)).status, 200, "alive: it keeps serving what fits");
        h.set_not_programmed(0);
        let a = h.healthz(t(2));
        assert_eq!(a.status, 200);
        assert!(a.body.ends_with(r#""nodeEligible": true}"#), "{}", a.body);
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_but_not_livez() {
        let mut h = ProxierHealth::new(Duration::from_mins(1));
        h.updated(t(0));
        let mut node = Node::default();
        node.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH));
        h.node_changed(Some(&node));
        let a = h.healthz(t(0));
        assert_eq!(a.status, 503);
        assert!(a.body.ends_with(r#""nodeEligible": false}"#), "{}", a.body);
        assert_eq!(h.livez(t(0)).status, 200);
    }

    #[test]
    fn a_node_tainted_for_deletion_by_the_autoscaler_fails_healthz() {
        let mut h = ProxierHealth::new(Duration::from_mins(1));
        h.updated(t(0));
        let node = Node {
            spec: Some(NodeSpec {
                taints: Some(vec![Taint { key: "ToBeDeletedByClusterAutoscaler".into(), effect: "NoSchedule".into(), ..Taint::default() }]),
                ..NodeSpec::default()
            }),
            ..Node::default()
        };
        h.node_changed(Some(&node));
        assert_eq!(h.healthz(t(0)).status, 503);
        h.node_changed(Some(&Node::default()));
        assert_eq!(h.healthz(t(0)).status, 200);
    }
}
