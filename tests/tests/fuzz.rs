//! The packet fuzzer (`integration_tests::fuzz`): a small run that is part
//! of `cargo test` (and so of `cargo xtask test`), an honesty check that the
//! invariant checker does reject broken translations, and the full run
//! (`#[ignore]`d; `cargo xtask fuzz [--packets N] [--seed S]` runs it with
//! `FUZZ_PACKETS` / `FUZZ_SEED`).
//!
//! Needs root (network namespaces, `BPF_PROG_TEST_RUN`).
use std::{net::SocketAddrV4, time::Duration};

use integration_tests::{
    fuzz::{self, FuzzConfig, Model, Prog, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_UNSPEC, XDP_DROP, check_packet, fix_checksums},
    netns::require_root,
    packet::{ETH_HLEN, FrameBuilder, tcp_flags},
};
use proxy_common::ct::{CtKey, CtValue};

fn no_ct(_: &CtKey) -> Option<CtValue> {
    None
}

/// A few thousand packets a second on a busy 2-core machine: this stays
/// well under 30 s.
#[test]
fn fuzz_small_run() {
    require_root();
    let mut cfg = fuzz::config_from_env(20_000);
    if std::env::var_os("FUZZ_PACKETS").is_none() {
        cfg.packets = 20_000;
    }
    cfg.progress = Some(Duration::from_secs(10));
    cfg.state_check_every = 5_000;
    eprintln!("fuzz: seed {} ({} packets)", cfg.seed, cfg.packets);
    let s = fuzz::run(&cfg);
    print!("{}", s.report());
    assert_eq!(s.packets, cfg.packets);
    assert!(s.translations > 0, "the fuzzer never reached a translation: it tests nothing");
    for p in fuzz::PROGS {
        assert!(s.verdicts.contains_key(p.name()), "{} never ran", p.name());
    }
}

/// The full run, sized by `FUZZ_PACKETS` (default 10 million) and seeded by
/// `FUZZ_SEED` (default: the clock).
#[test]
#[ignore = "long: run by `cargo xtask fuzz`"]
fn fuzz_full_run() {
    require_root();
    let cfg: FuzzConfig = fuzz::config_from_env(10_000_000);
    eprintln!("fuzz: seed {} ({} packets)", cfg.seed, cfg.packets);
    let s = fuzz::run(&cfg);
    print!("{}", s.report());
}

const CLIENT: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(203, 0, 113, 7), 40000);

/// The client's SYN to the plain `ClusterIP` and the frame the datapath
/// should make of it (DNAT to backend 1).
fn syn_and_dnat() -> (Vec<u8>, Vec<u8>, Model) {
    let model = Model::standard();
    let fe = model.frontends.iter().find(|f| f.name == "clusterip" && f.proto == proxy_common::proto::TCP).expect("clusterip").clone();
    let be = model.backends[&fe.backends[0]].addr;
    let input = FrameBuilder::tcp(CLIENT, fe.addr, tcp_flags::SYN).build();
    let good = FrameBuilder::tcp(CLIENT, be, tcp_flags::SYN).build();
    (input, good, model)
}

/// The checker is not a rubber stamp: it accepts a correct translation and
/// rejects broken ones (bad checksums, a non-backend destination, a verdict
/// outside the allowed set, a modified pass-through, an unasked-for change).
/// Plain Rust: no BPF needed.
#[test]
fn checker_rejects_broken_translations() {
    let (input, good, model) = syn_and_dnat();
    let check = |prog: Prog, v: u32, out: &[u8]| check_packet(&model, prog, &input, v, out, &no_ct);
    let finding = check(Prog::Ingress, TC_ACT_OK, &good).unwrap_or_else(|e| panic!("a correct DNAT was rejected: {e}"));
    assert_eq!(finding, None, "a well-formed DNAT flagged as a finding");

    // Destination rewritten without fixing the checksums.
    let mut stale = input.clone();
    stale[ETH_HLEN + 16..ETH_HLEN + 20].copy_from_slice(&good[ETH_HLEN + 16..ETH_HLEN + 20]);
    stale[ETH_HLEN + 22..ETH_HLEN + 24].copy_from_slice(&good[ETH_HLEN + 22..ETH_HLEN + 24]);
    let e = check(Prog::Ingress, TC_ACT_OK, &stale).expect_err("stale checksums accepted");
    assert!(e.contains("checksum"), "{e}");

    // IPv4 checksum right, TCP checksum off by one.
    let mut bad_tcp = good.clone();
    bad_tcp[ETH_HLEN + 20 + 17] ^= 1;
    let e = check(Prog::Ingress, TC_ACT_OK, &bad_tcp).expect_err("bad TCP checksum accepted");
    assert!(e.contains("TCP checksum"), "{e}");

    // Correct checksums, but a destination that is no backend of the frontend.
    let mut elsewhere = FrameBuilder::tcp(CLIENT, "10.244.9.9:8080".parse().unwrap(), tcp_flags::SYN).build();
    fix_checksums(&mut elsewhere, ETH_HLEN);
    let e = check(Prog::Ingress, TC_ACT_OK, &elsewhere).expect_err("DNAT to a non-backend accepted");
    assert!(e.contains("not one of its backends"), "{e}");

    // A verdict the program never returns.
    let e = check(Prog::Xdp, XDP_DROP, &input).expect_err("XDP_DROP accepted");
    assert!(e.contains("verdict"), "{e}");
    let e = check(Prog::Ingress, 1, &input).expect_err("TC_ACT_RECLASSIFY accepted");
    assert!(e.contains("verdict"), "{e}");

    // "Next" with a modified packet.
    let e = check(Prog::Ingress, TC_ACT_UNSPEC, &good).expect_err("modified pass-through accepted");
    assert!(e.contains("pass-through"), "{e}");

    // A change outside addresses, ports and checksums (the TCP sequence number).
    let mut seq = good.clone();
    seq[ETH_HLEN + 20 + 7] ^= 1;
    fix_checksums(&mut seq, ETH_HLEN);
    let e = check(Prog::Ingress, TC_ACT_OK, &seq).expect_err("changed sequence number accepted");
    assert!(e.contains("byte"), "{e}");

    // A reject that is no reject: a frontend with backends answered with
    // port unreachable.
    let mut rej = FrameBuilder::icmp_error(*input_dst(&input).ip(), *CLIENT.ip(), 3, 3, [0; 4], &input[ETH_HLEN..ETH_HLEN + 28]).with_ttl(64).build();
    rej[0..6].copy_from_slice(&input[6..12]);
    rej[6..12].copy_from_slice(&input[0..6]);
    let mut rej_ip = rej[ETH_HLEN..].to_vec();
    rej_ip[1] = 0xc0;
    rej_ip[4..8].fill(0);
    rej.truncate(ETH_HLEN);
    rej.extend_from_slice(&rej_ip);
    fix_checksums(&mut rej, ETH_HLEN);
    let e = check(Prog::Ingress, TC_ACT_REDIRECT, &rej).expect_err("reject for a frontend with backends accepted");
    assert!(e.contains("reject"), "{e}");
}

fn input_dst(f: &[u8]) -> SocketAddrV4 {
    let p = integration_tests::packet::parse(f).expect("parse");
    p.dst()
}
