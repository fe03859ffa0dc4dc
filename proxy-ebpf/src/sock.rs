//! Socket-level load balancing (cgroup v2 `connect4`/`6`, `sendmsg4`/`6`,
//! `recvmsg4`/`6`, `getpeername4`/`6`): a socket on this node (pod, hostNetwork
//! pod, node process) that connects or sends to a frontend gets the chosen
//! backend written into its destination once, so its packets need no
//! per-packet NAT at all; `recvmsg()` and `getpeername()` show it the
//! frontend again. The choice is [`crate::lb`]'s, the same as on the
//! per-packet path (policies, topology, terminating fallback, session
//! affinity, reject/drop when empty).
//!
//! - A frontend without endpoints fails the call with ECONNREFUSED (what
//!   the per-packet path's ICMP port unreachable gives a client), one whose
//!   endpoints are all elsewhere (`internalTrafficPolicy: Local`) with
//!   EHOSTUNREACH (the per-packet path drops).
//! - Unconnected UDP (`sendto()` per datagram) keeps its backend per socket
//!   while that backend stays in the frontend (an affinity entry keyed by
//!   the socket cookie), so a request and its retries go to one backend;
//!   with `sessionAffinity: ClientIP` the client is the socket's network
//!   namespace.
//! - `--socket-lb host-only`: only sockets in the host's network namespace
//!   (the agent's, `Config::host_netns_cookie`) are translated; pods keep
//!   the per-packet path (service meshes that must see the ClusterIP).
//! - Both families decide through one generic function ([`decide`], over
//!   [`SockFamily`]); each family remembers its translations in its own
//!   reverse map (`proxy_sock_rev_v1`, `proxy_sock_rev6_v1`). An IPv6 socket
//!   that addresses an IPv4-mapped frontend (`::ffff:a.b.c.d`: a dual-stack
//!   socket reaching an IPv4 Service) is translated through the IPv4 maps
//!   and gets the IPv4-mapped backend, as Cilium's `sock6_xlate_v4_in_v6`
//!   does; `recvmsg6`/`getpeername6` translate such an address back through
//!   the IPv4 reverse map. (An unconnected `sendto()` of such a socket to a
//!   mapped address never reaches `sendmsg6`: the kernel hands it to the
//!   IPv4 `udp_sendmsg`, which runs `sendmsg4` with the IPv4 address.)
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    affinity::{AFFINITY_CLIENT_SOCKET, AffinityKey},
    proto,
    sock::{SOCK_LB_HOST_ONLY, SOCK_LB_OFF, SockRev6Key, SockRev6Value, SockRevKey, SockRevValue},
    stats,
    svc::{SVC_FLAG_SOURCE_RANGES, SvcValue},
};

use crate::{
    ct,
    family::{Be, Family, In6, V4, V6},
    lb::{self, Chosen, Client, Empty, Frontend},
    maps::{CONFIG, SOCK_REV, SOCK_REV6},
    stats::{count, count_in},
};

/// The verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
/// How long an unconnected UDP socket keeps its backend without sending
/// (the per-packet path's UDP conntrack timeout).
const UDP_STICKY_NS: u64 = proxy_common::ct::CT_UDP_TIMEOUT_NS;

/// The part of the socket path that differs per family: its reverse map.
pub trait SockFamily: Family {
    /// Remembers that socket `cookie` was sent to `backend` for `fe`.
    fn rev_remember(cookie: u64, backend: &Be<Self::Addr>, fe: &Frontend<Self>, svc_id: u32);
    /// The frontend socket `cookie` asked for when it was sent to
    /// `addr:port_be`, if it was.
    fn rev_lookup(cookie: u64, addr: Self::Addr, port_be: u16) -> Option<(Self::Addr, u16)>;
}

impl SockFamily for V4 {
    #[inline(always)]
    fn rev_remember(cookie: u64, backend: &Be<u32>, fe: &Frontend<V4>, svc_id: u32) {
        let rk = SockRevKey { cookie, addr_be: backend.addr, port_be: backend.port_be, _pad: [0; 2] };
        let rv = SockRevValue { addr_be: fe.addr_be, port_be: fe.port_be, _pad: [0; 2], svc_id };
        // Why only when different: every sendto() would otherwise write the map.
        // SAFETY: the value is compared at once.
        let same = unsafe { SOCK_REV.get(rk) }.is_some_and(|v| v.addr_be == rv.addr_be && v.port_be == rv.port_be);
        if !same {
            let _ = SOCK_REV.insert(rk, rv, 0);
        }
    }

    #[inline(always)]
    fn rev_lookup(cookie: u64, addr: u32, port_be: u16) -> Option<(u32, u16)> {
        let rk = SockRevKey { cookie, addr_be: addr, port_be, _pad: [0; 2] };
        // SAFETY: the value is copied out at once.
        unsafe { SOCK_REV.get(rk) }.map(|v| (v.addr_be, v.port_be))
    }
}

impl SockFamily for V6 {
    #[inline(always)]
    fn rev_remember(cookie: u64, backend: &Be<In6>, fe: &Frontend<V6>, svc_id: u32) {
        let rk = SockRev6Key { cookie, addr: backend.addr.octets(), port_be: backend.port_be, _pad: [0; 6] };
        let rv = SockRev6Value { addr: fe.addr_be.octets(), port_be: fe.port_be, _pad: [0; 2], svc_id };
        // SAFETY: the value is compared at once.
        let same = unsafe { SOCK_REV6.get(rk) }.is_some_and(|v| In6::from_octets(v.addr) == fe.addr_be && v.port_be == rv.port_be);
        if !same {
            let _ = SOCK_REV6.insert(rk, rv, 0);
        }
    }

    #[inline(always)]
    fn rev_lookup(cookie: u64, addr: In6, port_be: u16) -> Option<(In6, u16)> {
        let rk = SockRev6Key { cookie, addr: addr.octets(), port_be, _pad: [0; 6] };
        // SAFETY: the value is copied out at once.
        unsafe { SOCK_REV6.get(rk) }.map(|v| (In6::from_octets(v.addr), v.port_be))
    }
}

/// Whether the socket is in the host's network namespace.
#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = CONFIG.get(0).copied() else {
        return false;
    };
    // SAFETY: helper on our own context.
    cfg.host_netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == cfg.host_netns_cookie
}

/// Whether this socket is one the socket path translates.
#[inline(always)]
fn enabled(ctx: &SockAddrContext) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(cfg) = CONFIG.get(0).copied() else {
        return false;
    };
    if cfg.socket_lb == SOCK_LB_OFF {
        return false;
    }
    // SAFETY: helper on our own context.
    cfg.socket_lb != SOCK_LB_HOST_ONLY || unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == cfg.host_netns_cookie
}

/// The socket's protocol, if the socket path balances it (TCP, UDP).
#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> Option<u8> {
    // SAFETY: reading a field of our own context.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    (proto == proto::TCP || proto == proto::UDP).then_some(proto)
}

/// The port the call addresses: `user_port` holds it in network order in
/// its low 16 bits.
#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: reading a field of our own context.
    unsafe { (*ctx.sock_addr).user_port as u16 }
}

/// `user_ip6`: the 16 bytes as they are in memory (network order).
///
/// Why word by word, volatile: the verifier allows the context only at a
/// constant offset from its own pointer; a 16-byte copy lets the compiler
/// form `ctx + 8` first and access through that, which it refuses
/// ("dereference of modified ctx ptr").
#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> In6 {
    let sa = ctx.sock_addr;
    // SAFETY: reading fields of our own context.
    let w = unsafe {
        [
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        ]
    };
    // SAFETY: same size, every bit pattern valid, memory order kept.
    In6(unsafe { core::mem::transmute::<[u32; 4], [u64; 2]>(w) })
}

/// Writes the destination (`connect`, `sendmsg`) or the peer (`recvmsg`,
/// `getpeername`) of an IPv6 call; the kernel allows both for these hooks.
/// Word by word, as [`user_ip6`] reads.
#[inline(always)]
fn set_user6(ctx: &SockAddrContext, addr: In6, port_be: u16) {
    let sa = ctx.sock_addr;
    let w = addr.words32();
    // SAFETY: writing the address fields of our own context.
    unsafe {
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], w[0]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], w[1]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], w[2]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], w[3]);
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(port_be));
    }
}

/// The same for an IPv4 call.
#[inline(always)]
fn set_user4(ctx: &SockAddrContext, addr_be: u32, port_be: u16) {
    // SAFETY: writing the address fields of our own context.
    unsafe {
        (*ctx.sock_addr).user_ip4 = addr_be;
        (*ctx.sock_addr).user_port = u32::from(port_be);
    }
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
/// RFC 4291 2.5.5.2), network order.
#[inline(always)]
fn v4_mapped(a: In6) -> Option<u32> {
    // Bytes 8..12 are 00 00 ff ff: in the (little-endian) word, 0xffff0000.
    (a.0[0] == 0 && a.0[1] as u32 == 0xffff_0000).then_some((a.0[1] >> 32) as u32)
}

/// `::ffff:a.b.c.d` for an IPv4 address in network order.
#[inline(always)]
fn mapped(addr_be: u32) -> In6 {
    In6([0, (u64::from(addr_be) << 32) | 0xffff_0000])
}

/// Per-socket stickiness for unconnected UDP: the backend this socket had,
/// if it is still in the frontend and was used within `UDP_STICKY_NS`.
#[inline(always)]
fn sticky<F: Family>(fe: &Frontend<F>, svc: &SvcValue, cookie: u64, now: u64) -> Option<Chosen<F::Addr>> {
    let key = AffinityKey { client: cookie, group: svc.svc_id, client_kind: AFFINITY_CLIENT_SOCKET, _pad: [0; 3] };
    if let Some(c) = lb::remembered(fe, svc, &key, UDP_STICKY_NS, proxy_common::ct::CT_REFRESH_NS, now) {
        return Some(c);
    }
    // No session affinity here (the caller checked), so the client is unused.
    let c = lb::select_backend(fe, svc, Client::Netns(0), now, 0)?;
    lb::remember(&key, &c, now);
    Some(c)
}

/// What the socket path makes of a call to an address.
enum Decision<A> {
    /// Not a frontend, or one this socket reaches by the per-packet path:
    /// the call goes on unchanged.
    Pass,
    /// The call fails with this errno.
    Refuse(i32),
    /// The call goes to this backend instead (recorded for the reverse
    /// translation, counted).
    To(Be<A>),
}

/// `connect()` (TCP and UDP) or `sendmsg()` with an address (UDP) to `fe`,
/// for either family: the choice is [`crate::lb`]'s, as on the per-packet
/// paths.
#[inline(always)]
fn decide<F: SockFamily>(ctx: &SockAddrContext, fe: &Frontend<F>, sendmsg: bool) -> Decision<F::Addr> {
    let Some(svc) = lb::lookup_service(fe) else {
        return Decision::Pass;
    };
    if svc.count == 0 {
        count::<F>(stats::SOCK_REJECTED, 0);
        return Decision::Refuse(if lb::when_empty(&svc) == Empty::Drop { EHOSTUNREACH } else { ECONNREFUSED });
    }
    // Why: with loadBalancerSourceRanges the client's address decides, and
    // a pod's is not known at connect(): its packets go the per-packet
    // path, which checks their source. The host's sockets have node
    // addresses, which are always allowed.
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 && !in_host_netns(ctx) {
        return Decision::Pass;
    }
    let now = ct::now_ns();
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let chosen = if sendmsg && svc.affinity_timeout_s == 0 {
        sticky(fe, &svc, cookie, now)
    } else {
        // SAFETY: helper on our own context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
        lb::select_backend(fe, &svc, Client::Netns(netns), now, 0)
    };
    let Some(c) = chosen else {
        count::<F>(stats::DROP_BACKEND_MISSING, 0);
        return Decision::Refuse(EHOSTUNREACH);
    };
    F::rev_remember(cookie, &c.backend, fe, svc.svc_id);
    count::<F>(stats::SOCK_TRANSLATED, 0);
    Decision::To(c.backend)
}

/// Fails the call with `errno`.
#[inline(always)]
fn refuse(errno: i32) -> i32 {
    // SAFETY: plain helper call; with DENY the call fails with this errno.
    unsafe { bpf_set_retval(-errno) };
    DENY
}

/// `connect4`, `sendmsg4`: rewrites a frontend destination to the chosen
/// backend.
#[inline(always)]
pub fn forward4(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    if !enabled(ctx) {
        return ALLOW;
    }
    let Some(proto) = protocol(ctx) else {
        return ALLOW;
    };
    // SAFETY: reading a field of our own context.
    let addr_be = unsafe { (*ctx.sock_addr).user_ip4 };
    let fe = Frontend::<V4> { addr_be, port_be: user_port(ctx), proto };
    match decide(ctx, &fe, sendmsg) {
        Decision::Pass => ALLOW,
        Decision::Refuse(errno) => refuse(errno),
        Decision::To(b) => {
            set_user4(ctx, b.addr, b.port_be);
            ALLOW
        }
    }
}

/// `connect6`, `sendmsg6`: the same for an IPv6 socket. An IPv4-mapped
/// destination is an IPv4 frontend, decided through the IPv4 maps, and gets
/// its backend IPv4-mapped.
#[inline(always)]
pub fn forward6(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    if !enabled(ctx) {
        return ALLOW;
    }
    let Some(proto) = protocol(ctx) else {
        return ALLOW;
    };
    let (addr, port_be) = (user_ip6(ctx), user_port(ctx));
    if let Some(addr_be) = v4_mapped(addr) {
        let fe = Frontend::<V4> { addr_be, port_be, proto };
        return match decide(ctx, &fe, sendmsg) {
            Decision::Pass => ALLOW,
            Decision::Refuse(errno) => refuse(errno),
            Decision::To(b) => {
                set_user6(ctx, mapped(b.addr), b.port_be);
                ALLOW
            }
        };
    }
    let fe = Frontend::<V6> { addr_be: addr, port_be, proto };
    match decide(ctx, &fe, sendmsg) {
        Decision::Pass => ALLOW,
        Decision::Refuse(errno) => refuse(errno),
        Decision::To(b) => {
            set_user6(ctx, b.addr, b.port_be);
            ALLOW
        }
    }
}

/// The socket's cookie.
#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper on our own context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// `recvmsg4` (UDP) and `getpeername4`: a backend address this socket was
/// sent to by [`forward4`] is shown as the frontend the application asked
/// for.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: reading a field of our own context.
    let addr_be = unsafe { (*ctx.sock_addr).user_ip4 };
    if let Some((fe, port_be)) = V4::rev_lookup(cookie(ctx), addr_be, user_port(ctx)) {
        set_user4(ctx, fe, port_be);
        count::<V4>(stats::SOCK_REV_TRANSLATED, 0);
    }
    ALLOW
}

/// `recvmsg6` and `getpeername6`: the same for an IPv6 socket; an
/// IPv4-mapped peer is looked up in the IPv4 reverse map (where
/// [`forward6`] and, for a mapped `sendto()`, [`forward4`] put it).
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    let (addr, port_be, cookie) = (user_ip6(ctx), user_port(ctx), cookie(ctx));
    // Counted under the frontend's family: IPv4 for a mapped peer.
    let (shown, family) = match v4_mapped(addr) {
        Some(addr_be) => (V4::rev_lookup(cookie, addr_be, port_be).map(|(fe, port)| (mapped(fe), port)), V4::STATS_FAMILY),
        None => (V6::rev_lookup(cookie, addr, port_be), V6::STATS_FAMILY),
    };
    if let Some((fe, port)) = shown {
        set_user6(ctx, fe, port);
        count_in(family, stats::SOCK_REV_TRANSLATED, 0);
    }
    ALLOW
}
