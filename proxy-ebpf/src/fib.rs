//! Sending a translated packet out by a FIB lookup, bypassing the stack's
//! input path: needed whenever the packet's source is now a local address
//! (SNAT to the node, or the reply of a NodePort), which the stack would
//! drop as a martian. The egress device and the source address the kernel
//! would pick (what MASQUERADE picks) come from `bpf_fib_lookup`;
//! `bpf_redirect_neigh` resolves the next hop's MAC.
use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup as FibParams},
    helpers::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::stats;

use crate::{
    parse::{ETH_HLEN, IP_CSUM},
    stats::count,
};

const AF_INET: u8 = 2;
/// BPF_FIB_LOOKUP_SKIP_NEIGH: redirect_neigh resolves it.
const LOOKUP_SKIP_NEIGH: u32 = 1 << 2;
/// BPF_FIB_LOOKUP_SRC: fill in the source address for the route.
const LOOKUP_SRC: u32 = 1 << 4;

/// The egress device, preferred source address and (when resolved) MACs
/// for `dst`.
pub struct Route {
    pub ifindex: u32,
    pub src_be: u32,
    /// Whether `smac`/`dmac` are filled in (the neighbour is known).
    pub neigh: bool,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// `bpf_fib_lookup` for a TC or XDP context pointer. `with_neigh`: also
/// resolve the next hop's MAC (XDP rewrites Ethernet itself).
#[inline(always)]
pub fn lookup_raw(ctx: *mut core::ffi::c_void, ingress_ifindex: u32, tot_len: u16, proto: u8, src_be: u32, dst_be: u32, with_neigh: bool) -> Option<Route> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid input.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.ifindex = ingress_ifindex;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.__bindgen_anon_3.ipv4_src = src_be;
    params.__bindgen_anon_4.ipv4_dst = dst_be;
    let flags = if with_neigh { LOOKUP_SRC } else { LOOKUP_SKIP_NEIGH | LOOKUP_SRC };
    // SAFETY: params lives on our stack for the call.
    let rc = unsafe { bpf_fib_lookup(ctx.cast(), &raw mut params, size_of::<FibParams>() as i32, flags) };
    let neigh = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    if !neigh && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return None;
    }
    Some(Route {
        ifindex: params.ifindex,
        // SAFETY: the helper filled the union's IPv4 member.
        src_be: unsafe { params.__bindgen_anon_3.ipv4_src },
        neigh: neigh && with_neigh,
        smac: params.smac,
        dmac: params.dmac,
    })
}

#[inline(always)]
pub fn lookup(ctx: &TcContext, proto: u8, src_be: u32, dst_be: u32) -> Option<Route> {
    // SAFETY: reading the ingress ifindex of our skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let tot_len = (ctx.len() as u16).saturating_sub(ETH_HLEN as u16);
    lookup_raw(ctx.skb.skb.cast(), ifindex, tot_len, proto, src_be, dst_be, false)
}

/// Decrements the TTL as a router does and redirects the (already
/// translated) packet out of the route's device. Returns the verdict.
#[inline(always)]
pub fn redirect(ctx: &TcContext, proto: u8, src_be: u32, dst_be: u32) -> i32 {
    let Some(route) = lookup(ctx, proto, src_be, dst_be) else {
        count(stats::FIB_NO_ROUTE, ctx.len());
        return TC_ACT_OK as i32;
    };
    let Ok(word) = ctx.load::<[u8; 2]>(ETH_HLEN + 8) else {
        return TC_ACT_OK as i32;
    };
    if word[0] <= 1 {
        count(stats::PASS_TTL_EXPIRED, ctx.len());
        return TC_ACT_OK as i32;
    }
    let new = [word[0] - 1, word[1]];
    let old16 = u16::from_ne_bytes(word);
    let new16 = u16::from_ne_bytes(new);
    if ctx.l3_csum_replace(ETH_HLEN + IP_CSUM, u64::from(old16), u64::from(new16), 2).is_err()
        || ctx.store(ETH_HLEN + 8, &new, 0).is_err()
    {
        return TC_ACT_OK as i32;
    }
    // SAFETY: NULL params: the helper looks up the next hop itself.
    unsafe { bpf_redirect_neigh(route.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
