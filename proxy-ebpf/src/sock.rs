//! Socket-level load balancing (cgroup v2 `connect4`, `sendmsg4`,
//! `recvmsg4`, `getpeername4`): a socket on this node (pod, hostNetwork
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
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    affinity::{AFFINITY_CLIENT_SOCKET, AffinityKey},
    proto,
    sock::{SOCK_LB_HOST_ONLY, SOCK_LB_OFF, SockRevKey, SockRevValue},
    stats,
    svc::SVC_FLAG_SOURCE_RANGES,
};

use crate::{
    ct,
    family::V4,
    lb::{self, Chosen, Client, Empty, Frontend},
    maps::{CONFIG, SOCK_REV},
    stats::count,
};

/// The verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
/// How long an unconnected UDP socket keeps its backend without sending
/// (the per-packet path's UDP conntrack timeout).
const UDP_STICKY_NS: u64 = proxy_common::ct::CT_UDP_TIMEOUT_NS;

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

/// The frontend the call addresses (`user_ip4:user_port`, the socket's protocol).
#[inline(always)]
fn frontend(ctx: &SockAddrContext) -> Option<Frontend<V4>> {
    // SAFETY: reading fields of our own context.
    let (addr_be, port, protocol) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port, (*ctx.sock_addr).protocol) };
    let proto = protocol as u8;
    if proto != proto::TCP && proto != proto::UDP {
        return None;
    }
    // `user_port` holds the port in network order in its low 16 bits.
    Some(Frontend { addr_be, port_be: port as u16, proto })
}

/// Per-socket stickiness for unconnected UDP: the backend this socket had,
/// if it is still in the frontend and was used within `UDP_STICKY_NS`.
#[inline(always)]
fn sticky(fe: &Frontend<V4>, svc: &proxy_common::svc::SvcValue, cookie: u64, now: u64, len: u32) -> Option<Chosen<u32>> {
    let key = AffinityKey { client: cookie, group: svc.svc_id, client_kind: AFFINITY_CLIENT_SOCKET, _pad: [0; 3] };
    if let Some(c) = lb::remembered(fe, svc, &key, UDP_STICKY_NS, proxy_common::ct::CT_REFRESH_NS, now) {
        return Some(c);
    }
    // No session affinity here (the caller checked), so the client is unused.
    let c = lb::select_backend(fe, svc, Client::Netns(0), now, len)?;
    lb::remember(&key, &c, now);
    Some(c)
}

/// `connect()` (TCP and UDP) and `sendmsg()` with an address (UDP):
/// rewrites a frontend destination to the chosen backend.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    if !enabled(ctx) {
        return ALLOW;
    }
    let Some(fe) = frontend(ctx) else {
        return ALLOW;
    };
    let Some(svc) = lb::lookup_service(&fe) else {
        return ALLOW;
    };
    if svc.count == 0 {
        count(stats::SOCK_REJECTED, 0);
        let errno = if lb::when_empty(&svc) == Empty::Drop { EHOSTUNREACH } else { ECONNREFUSED };
        // SAFETY: plain helper call; with DENY the call fails with this errno.
        unsafe { bpf_set_retval(-errno) };
        return DENY;
    }
    // Why: with loadBalancerSourceRanges the client's address decides, and
    // a pod's is not known at connect(): its packets go the per-packet
    // path, which checks their source. The host's sockets have node
    // addresses, which are always allowed.
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 && !in_host_netns(ctx) {
        return ALLOW;
    }
    let now = ct::now_ns();
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let chosen = if sendmsg && svc.affinity_timeout_s == 0 {
        sticky(&fe, &svc, cookie, now, 0)
    } else {
        // SAFETY: helper on our own context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
        lb::select_backend(&fe, &svc, Client::Netns(netns), now, 0)
    };
    let Some(c) = chosen else {
        count(stats::DROP_BACKEND_MISSING, 0);
        // SAFETY: as above.
        unsafe { bpf_set_retval(-EHOSTUNREACH) };
        return DENY;
    };
    // SAFETY: writing the destination fields of our own context, which the
    // kernel allows for connect4 and sendmsg4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = c.backend.addr;
        (*ctx.sock_addr).user_port = u32::from(c.backend.port_be);
    }
    let rk = SockRevKey { cookie, addr_be: c.backend.addr, port_be: c.backend.port_be, _pad: [0; 2] };
    let rv = SockRevValue { addr_be: fe.addr_be, port_be: fe.port_be, _pad: [0; 2], svc_id: svc.svc_id };
    // Why only when different: every sendto() would otherwise write the map.
    // SAFETY: the value is compared at once.
    let same = unsafe { SOCK_REV.get(&rk) }.is_some_and(|v| v.addr_be == rv.addr_be && v.port_be == rv.port_be);
    if !same {
        let _ = SOCK_REV.insert(&rk, &rv, 0);
    }
    count(stats::SOCK_TRANSLATED, 0);
    ALLOW
}

/// `recvmsg()` (UDP) and `getpeername()`: a backend address this socket
/// was sent to by [`forward`] is shown as the frontend the application
/// asked for.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    // SAFETY: reading fields of our own context.
    let (addr_be, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rk = SockRevKey { cookie, addr_be, port_be: port as u16, _pad: [0; 2] };
    // SAFETY: the value is copied out at once.
    if let Some(v) = unsafe { SOCK_REV.get(&rk).copied() } {
        // SAFETY: writing the address fields, allowed for recvmsg4 and getpeername4.
        unsafe {
            (*ctx.sock_addr).user_ip4 = v.addr_be;
            (*ctx.sock_addr).user_port = u32::from(v.port_be);
        }
        count(stats::SOCK_REV_TRANSLATED, 0);
    }
    ALLOW
}
