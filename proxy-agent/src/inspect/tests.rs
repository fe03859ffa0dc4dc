use std::net::{Ipv4Addr, Ipv6Addr};

use proxy_common::{
    backend::{Backend, Backend6},
    proto,
    stats::{
        ByFamily, DNAT_NEW, FAMILY_IPV4, FAMILY_IPV6, FAMILY_OTHER, PASS_NOT_IPV4, StatCounter,
    },
    svc::{SVC_FLAG_CLUSTER_IP, Svc6Key, SvcKey, SvcValue},
};

use super::*;

fn by_family(v4: u64, v6: u64, other: u64) -> ByFamily {
    let mut c = ByFamily::default();
    for (f, n) in [(FAMILY_IPV4, v4), (FAMILY_IPV6, v6), (FAMILY_OTHER, other)] {
        c[f as usize] = StatCounter {
            packets: n,
            bytes: n * 100,
        };
    }
    c
}

#[test]
fn stats_split_by_family_with_the_totals_kept() {
    let view = stats_view(&[
        (DNAT_NEW, by_family(3, 2, 0)),
        (PASS_NOT_IPV4, by_family(0, 4, 5)),
    ]);
    let dnat = &view[0];
    assert_eq!(
        (dnat.reason, dnat.packets, dnat.bytes),
        ("dnat_new_flow", 5, 500),
        "totals as before the split"
    );
    assert_eq!(
        (
            dnat.packets_of("ipv4"),
            dnat.packets_of("ipv6"),
            dnat.packets_of("other")
        ),
        (3, 2, 0)
    );
    let json = serde_json::to_value(&view).expect("json");
    assert_eq!(json[0]["reason"], "dnat_new_flow");
    assert_eq!(json[0]["packets"], 5, "the total keeps its field");
    assert_eq!(
        json[0]["families"][0],
        serde_json::json!({ "family": "ipv4", "packets": 3, "bytes": 300 })
    );
    assert_eq!(
        json[0]["families"][1],
        serde_json::json!({ "family": "ipv6", "packets": 2, "bytes": 200 })
    );
    assert_eq!(
        json[1]["families"][2],
        serde_json::json!({ "family": "other", "packets": 5, "bytes": 500 })
    );

    let t = stats_table(&view);
    let mut lines = t.lines();
    let cols = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(
        cols(lines.next().expect("header")),
        ["REASON", "IPV4", "IPV6", "OTHER", "PACKETS", "BYTES"]
    );
    assert_eq!(
        cols(lines.next().expect("row")),
        ["dnat_new_flow", "3", "2", "0", "5", "500"]
    );
    assert_eq!(
        cols(lines.next().expect("row")),
        ["pass_not_ipv4", "0", "4", "5", "9", "900"]
    );
}

#[test]
fn services_of_both_families_with_family_and_bracketed_ipv6() {
    let head = SvcValue {
        count: 1,
        flags: SVC_FLAG_CLUSTER_IP,
        svc_id: 1,
        ..Default::default()
    };
    let dump = MapsDump {
        svc: vec![
            (
                SvcKey {
                    addr_be: u32::from(Ipv4Addr::new(10, 96, 0, 10)).to_be(),
                    port_be: 80u16.to_be(),
                    proto: proto::TCP,
                    ..Default::default()
                },
                head,
            ),
            (
                SvcKey {
                    addr_be: u32::from(Ipv4Addr::new(10, 96, 0, 10)).to_be(),
                    port_be: 80u16.to_be(),
                    proto: proto::TCP,
                    backend_slot: 1,
                    ..Default::default()
                },
                SvcValue {
                    backend_id: 1,
                    ..Default::default()
                },
            ),
        ],
        backends: vec![(
            1,
            Backend {
                addr_be: u32::from(Ipv4Addr::new(10, 0, 0, 2)).to_be(),
                port_be: 8080u16.to_be(),
                ..Default::default()
            },
        )],
        svc6: vec![
            (
                Svc6Key {
                    addr: "fd00::10".parse::<Ipv6Addr>().unwrap().octets(),
                    port_be: 80u16.to_be(),
                    proto: proto::TCP,
                    ..Default::default()
                },
                SvcValue { svc_id: 2, ..head },
            ),
            (
                Svc6Key {
                    addr: "fd00::10".parse::<Ipv6Addr>().unwrap().octets(),
                    port_be: 80u16.to_be(),
                    proto: proto::TCP,
                    backend_slot: 1,
                    ..Default::default()
                },
                SvcValue {
                    backend_id: 2,
                    ..Default::default()
                },
            ),
        ],
        backends6: vec![(
            2,
            Backend6 {
                addr: "fd00::2".parse::<Ipv6Addr>().unwrap().octets(),
                port_be: 8080u16.to_be(),
                ..Default::default()
            },
        )],
        ..Default::default()
    };
    let view = services_view(&dump);
    let fams: Vec<(&str, &str)> = view
        .iter()
        .map(|f| (f.family.as_str(), f.address.as_str()))
        .collect();
    assert_eq!(fams, [("IPv4", "10.96.0.10"), ("IPv6", "fd00::10")]);
    let json = serde_json::to_value(&view).expect("json");
    assert_eq!(json[1]["family"], "IPv6");
    assert_eq!(json[1]["backends"][0]["address"], "fd00::2");
    let t = services_table(&view);
    assert!(
        t.contains("10.96.0.10:80/TCP") && t.contains("10.0.0.2:8080"),
        "{t}"
    );
    assert!(
        t.contains("[fd00::10]:80/TCP") && t.contains("[fd00::2]:8080"),
        "IPv6 in brackets, as conntrack shows it:\n{t}"
    );
}
