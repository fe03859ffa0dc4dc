//! Kernel side of the proxy: TC programs that translate Service traffic by
//! map lookups. See `../README.md` for the hook diagram and the public maps.
#![no_std]
#![no_main]

mod csum;
mod ct;
mod fib;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod stats;
mod xdp;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// TC ingress on every device named by `--devices`: DNAT of packets to a
/// frontend, reverse NAT of replies from a backend.
///
/// Verdicts: `TC_ACT_UNSPEC` (TCX "next") for packets that are not ours,
/// `TC_ACT_OK` after a translation, `TC_ACT_REDIRECT` for a reject sent back
/// out of the same device, `TC_ACT_SHOT` for a counted drop.
#[classifier]
pub fn proxy_tc_ingress(ctx: TcContext) -> i32 {
    match lb::handle_ingress(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// TC egress on the same devices: ICMP errors the node itself sends about a
/// translated flow (fragmentation needed while forwarding) are translated
/// back. Every other packet: `TC_ACT_UNSPEC` (next), uncounted.
#[classifier]
pub fn proxy_tc_egress(ctx: TcContext) -> i32 {
    lb::handle_egress(&ctx)
}

/// XDP fast path on the `--devices` (with `--xdp`): north-south flows to
/// remote backends, and their replies. Everything else: `XDP_PASS`.
#[xdp]
pub fn proxy_xdp(ctx: XdpContext) -> u32 {
    xdp::handle(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";

/// Keeps `TC_ACT_UNSPEC` in one place as an `i32`.
pub(crate) const TC_NEXT: i32 = TC_ACT_UNSPEC;
