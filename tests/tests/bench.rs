//! `cargo xtask bench --quick` with tiny sizes: every mode (`ClusterIP` and
//! `NodePort`) produces numbers (not that they are fast), the IPVS mode says why it cannot be measured,
//! the socket-path mode went through the socket programs and the TC-path
//! mode did not, and BENCHMARKS.md, bench.json and bench.svg are written.
//! Runs the bench binary as a real process, as root, in its own namespaces.
use std::process::Command;

use integration_tests::{agent::agent_bin, netns::require_root};

#[test]
fn bench_quick_produces_numbers_for_every_mode() {
    require_root();
    let out = std::env::temp_dir().join(format!("proxy-bench-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--quick", "--services", "1,100", "--duration", "0.5", "--cp-services", "100", "--program-timeout", "60"])
        .arg("--agent")
        .arg(agent_bin())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run the bench binary");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench failed ({}):\n{stdout}\n{stderr}", run.status);
    assert!(
        stdout.contains("## Data path") && stdout.contains("## NodePort (north-south)") && stdout.contains("## Control plane"),
        "no tables on stdout:\n{stdout}"
    );
    let md = std::fs::read_to_string(out.join("BENCHMARKS.md")).expect("BENCHMARKS.md");
    assert_eq!(md.trim(), stdout.trim(), "stdout and BENCHMARKS.md differ");
    let svg = std::fs::read_to_string(out.join("bench.svg")).expect("bench.svg");
    assert!(svg.contains("<svg"), "not an SVG");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).expect("bench.json")).expect("valid JSON");
    let cases = json["cases"].as_array().expect("cases");
    for s in [1, 100] {
        for mode in ["direct", "iptables", "nftables", "ebpf", "ebpf-sock", "np-direct", "np-iptables", "np-tc", "np-xdp"] {
            let c = cases
                .iter()
                .find(|c| c["mode"] == mode && c["services"] == s)
                .unwrap_or_else(|| panic!("no case {mode} S={s}"));
            assert!(c["skipped"].is_null(), "{mode} S={s} not measured: {}", c["skipped"]);
            for (key, m) in c["metrics"].as_object().expect("metrics") {
                let median = m["median"].as_f64().unwrap_or_else(|| panic!("{mode} S={s}: no {key}: {m}"));
                assert!(median > 0.0, "{mode} S={s}: {key} = {median}");
            }
            if !mode.ends_with("direct") {
                assert!(c["program"]["seconds"].as_f64().is_some(), "{mode} S={s}: no programming time: {}", c["program"]);
            }
            if ["iptables", "nftables", "ebpf"].contains(&mode) && s == 100 {
                assert!(c["add_one"]["seconds"].as_f64().is_some(), "{mode} S={s}: no add-one time: {}", c["add_one"]);
            }
        }
        // The XDP case went through XDP, the TC case did not.
        let counters = |mode: &str| {
            let c = cases.iter().find(|c| c["mode"] == mode && c["services"] == s).expect("case");
            c["counters"].clone()
        };
        let counter = |mode: &str, key: &str| counters(mode)[key].as_u64().unwrap_or_else(|| panic!("{mode}: no {key} in {}", counters(mode)));
        let forwarded = |mode: &str| counter(mode, "xdp_forward");
        assert!(forwarded("np-xdp") > 0, "np-xdp: {}", counters("np-xdp"));
        assert_eq!(forwarded("np-tc"), 0, "np-tc: {}", counters("np-tc"));
        // The socket-path case was translated at connect()/sendto() (no
        // per-packet NAT); the TC-path case was DNATed per flow and never
        // reached the socket programs.
        assert!(counter("ebpf-sock", "sock_translated") > 0, "ebpf-sock: {}", counters("ebpf-sock"));
        assert_eq!(counter("ebpf-sock", "dnat_new_flow"), 0, "ebpf-sock: {}", counters("ebpf-sock"));
        assert!(counter("ebpf", "dnat_new_flow") > 0, "ebpf: {}", counters("ebpf"));
        assert_eq!(counter("ebpf", "sock_translated"), 0, "ebpf: {}", counters("ebpf"));
        let ipvs = cases.iter().find(|c| c["mode"] == "ipvs" && c["services"] == s).expect("ipvs case");
        let why = ipvs["skipped"].as_str().expect("ipvs gives a reason, never numbers");
        assert!(why.contains("IPVS"), "{why}");
        assert!(ipvs["metrics"]["conn_per_s"]["median"].is_null(), "invented IPVS numbers");
    }
    let _ = std::fs::remove_dir_all(&out);
}
