//! Kernel side of the proxy: TC, XDP and cgroup socket programs that
//! translate Service traffic by map lookups, all deciding through one
//! load-balancing library (`lb`). See `../README.md` for the hook diagram and the public maps.
#![no_std]
#![no_main]

mod csum;
mod ct;
mod destroy;
mod family;
mod fib;
mod frag;
mod icmp;
mod icmp6;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod sctp;
mod sock;
mod stats;
mod tc;
mod xdp;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use parse::ETH_HLEN;

/// TC ingress on every device named by `--devices`: DNAT of packets to a
/// frontend, reverse NAT of replies from a backend; IPv4 and IPv6.
///
/// Verdicts: `TC_ACT_UNSPEC` (TCX "next") for packets that are not ours,
/// `TC_ACT_OK` after a translation, `TC_ACT_REDIRECT` for a reject sent back
/// out of the same device, `TC_ACT_SHOT` for a counted drop.
#[classifier]
pub fn proxy_tc_ingress(ctx: TcContext) -> i32 {
    tc::handle_ingress::<ETH_HLEN>(&ctx)
}

/// `proxy_tc_ingress` for devices without a link-layer header (IPIP,
/// WireGuard, GRE, TUN: the packet starts with the IP header).
#[classifier]
pub fn proxy_tc_ingress_l3(ctx: TcContext) -> i32 {
    tc::handle_ingress::<0>(&ctx)
}

/// TC egress on the same devices: ICMP errors the node itself sends about a
/// translated flow (fragmentation needed while forwarding) are translated
/// back, and so are replies the node sends from a frontend's local backend
/// (hostNetwork endpoints). Every other packet: `TC_ACT_UNSPEC` (next),
/// uncounted.
#[classifier]
pub fn proxy_tc_egress(ctx: TcContext) -> i32 {
    tc::handle_egress::<ETH_HLEN>(&ctx)
}

/// `proxy_tc_egress` for devices without a link-layer header.
#[classifier]
pub fn proxy_tc_egress_l3(ctx: TcContext) -> i32 {
    tc::handle_egress::<0>(&ctx)
}

/// Socket LB: `connect()` to a frontend (TCP and UDP) goes to a backend.
#[cgroup_sock_addr(connect4)]
pub fn proxy_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward4(&ctx, false)
}

/// Socket LB: `sendmsg()`/`sendto()` with a frontend address (UDP).
#[cgroup_sock_addr(sendmsg4)]
pub fn proxy_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward4(&ctx, true)
}

/// Socket LB: the sender of a datagram from a backend is shown as the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn proxy_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// Socket LB: the peer of a socket connected to a backend is shown as the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn proxy_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// Socket LB for IPv6 sockets: `connect()` to an IPv6 frontend, or to an
/// IPv4 one as an IPv4-mapped address (`::ffff:a.b.c.d`).
#[cgroup_sock_addr(connect6)]
pub fn proxy_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::forward6(&ctx, false)
}

/// Socket LB: `sendmsg()`/`sendto()` of an IPv6 socket (UDP).
#[cgroup_sock_addr(sendmsg6)]
pub fn proxy_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::forward6(&ctx, true)
}

/// Socket LB: `recvmsg()` of an IPv6 socket shows the frontend.
#[cgroup_sock_addr(recvmsg6)]
pub fn proxy_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

/// Socket LB: `getpeername()` of an IPv6 socket shows the frontend.
#[cgroup_sock_addr(getpeername6)]
pub fn proxy_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

/// XDP fast path on the `--devices` (with `--xdp`): north-south flows to
/// remote backends, and their replies. Everything else: `XDP_PASS`.
#[xdp]
pub fn proxy_xdp(ctx: XdpContext) -> u32 {
    xdp::handle(&ctx)
}

/// Destroys connected UDP sockets translated to a backend that left its
/// Service port (run by the agent per network namespace; see `destroy`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub extern "C" fn proxy_sock_destroy_udp(ctx: *mut destroy::BpfIterUdp) -> i32 {
    destroy::destroy_udp(ctx)
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
