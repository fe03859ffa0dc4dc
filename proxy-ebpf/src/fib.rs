//! Sending a translated packet out by a FIB lookup, bypassing the stack's
//! input path: needed whenever the packet's source is now a local address
//! (SNAT to the node, or the reply of a NodePort), which the stack would
//! drop as a martian. The egress device and the source address the kernel
//! would pick (what MASQUERADE picks) come from `bpf_fib_lookup`;
//! `bpf_redirect_neigh` resolves the next hop's MAC.
//!
//! MTU: the stack's forwarding path (which fragments, or answers
//! "fragmentation needed") is bypassed too, so [`egress`] checks the packet
//! against the egress device's MTU *before* it is translated, with
//! `bpf_check_mtu(BPF_MTU_CHK_SEGS)`: a GSO packet (GRO-merged on ingress,
//! or TSO from a local veth) is checked per segment, as `ip_forward` does,
//! never by its merged length. The TC lookup itself passes `tot_len = 0`:
//! with a `tot_len` the helper compares that length with the route MTU and,
//! when it is exceeded, returns `FRAG_NEEDED` without filling in the egress
//! device or source address; without one it only checks the skb with
//! `is_skb_forwardable` (GSO always passes) after the route is complete, so a
//! `FRAG_NEEDED` result still carries the route.
//!
//! Both families: the lookup's addresses and family come from
//! [`Family::fib_set`] / [`Family::fib_src`]; an IPv6 packet has its hop
//! limit decremented (no header checksum) instead of the TTL.
use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup, bpf_redirect_neigh, bpf_skb_change_head},
    programs::TcContext,
};
use proxy_common::stats;

use crate::{
    family::{Family, V4},
    parse::{ETH_HLEN, IP_CSUM, IP6_HOPS},
    stats::count,
};

/// The helper's parameter block.
pub type FibParams = aya_ebpf::bindings::bpf_fib_lookup;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
/// BPF_FIB_LOOKUP_SKIP_NEIGH: redirect_neigh resolves it.
const LOOKUP_SKIP_NEIGH: u32 = 1 << 2;
/// BPF_FIB_LOOKUP_SRC: fill in the source address for the route.
const LOOKUP_SRC: u32 = 1 << 4;
/// BPF_MTU_CHK_SEGS: check a GSO skb's segments, not its length.
const MTU_CHK_SEGS: u64 = 1;
/// BPF_MTU_CHK_RET_SUCCESS (FRAG_NEEDED = 1 and SEGS_TOOBIG = 2 are above).
const MTU_CHK_RET_SUCCESS: i64 = 0;

/// The egress device, preferred source address and (when resolved) MACs
/// for `dst`.
pub struct Route<A> {
    pub ifindex: u32,
    pub src_be: A,
    /// Whether `smac`/`dmac` are filled in (the neighbour is known).
    pub neigh: bool,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// `bpf_fib_lookup` for a TC or XDP context pointer. `with_neigh`: also
/// resolve the next hop's MAC (XDP rewrites Ethernet itself).
///
/// `tot_len` (the L3 length) makes the helper check it against the route's
/// MTU; a packet that does not fit gives `None`, like no route (XDP hands
/// it to TC that way). With `tot_len == 0` (TC) the route is returned even
/// when the skb does not fit the device: the caller checks the MTU itself
/// ([`egress`]).
#[inline(always)]
pub fn lookup_raw<F: Family>(ctx: *mut core::ffi::c_void, ingress_ifindex: u32, tot_len: u16, proto: u8, src_be: F::Addr, dst_be: F::Addr, with_neigh: bool) -> Option<Route<F::Addr>> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid input.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = proto;
    params.ifindex = ingress_ifindex;
    params.__bindgen_anon_1.tot_len = tot_len;
    F::fib_set(&mut params, src_be, dst_be);
    let flags = if with_neigh { LOOKUP_SRC } else { LOOKUP_SKIP_NEIGH | LOOKUP_SRC };
    // SAFETY: params lives on our stack for the call.
    let rc = unsafe { bpf_fib_lookup(ctx.cast(), &raw mut params, size_of::<FibParams>() as i32, flags) };
    let neigh = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    // Why: without tot_len, FRAG_NEEDED is only the skb-vs-device check made
    // after a complete lookup; the route is valid.
    let complete = tot_len == 0 && rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED);
    if !neigh && !complete && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return None;
    }
    Some(Route {
        ifindex: params.ifindex,
        src_be: F::fib_src(&params),
        neigh: neigh && with_neigh,
        smac: params.smac,
        dmac: params.dmac,
    })
}

/// The route for `src → dst` from a TC program (no MTU check: see
/// [`egress`]).
#[inline(always)]
pub fn lookup<F: Family>(ctx: &TcContext, proto: u8, src_be: F::Addr, dst_be: F::Addr) -> Option<Route<F::Addr>> {
    // SAFETY: reading the ingress ifindex of our skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    lookup_raw::<F>(ctx.skb.skb.cast(), ifindex, 0, proto, src_be, dst_be, false)
}

/// The source address the kernel would pick for `src → dst` (what
/// MASQUERADE picks): the SNAT address of a new flow. For IPv6 a
/// subprogram, as [`egress`].
#[inline(always)]
pub fn masquerade_src<F: Family>(ctx: &TcContext, proto: u8, src_be: F::Addr, dst_be: F::Addr) -> Option<F::Addr> {
    if F::IS_V6 {
        let mut out = F::ZERO;
        return masquerade_out_of_line::<F>(ctx, proto, &src_be, &dst_be, &mut out).then_some(out);
    }
    lookup::<F>(ctx, proto, src_be, dst_be).map(|r| r.src_be)
}

#[inline(never)]
fn masquerade_out_of_line<F: Family>(ctx: &TcContext, proto: u8, src_be: &F::Addr, dst_be: &F::Addr, out: &mut F::Addr) -> bool {
    match lookup::<F>(ctx, proto, *src_be, *dst_be) {
        Some(r) => {
            *out = r.src_be;
            true
        }
        None => false,
    }
}

/// Where a packet about to be translated to `src → dst` would leave.
#[derive(Clone, Copy)]
pub enum Egress {
    /// Out of this device, and it fits its MTU.
    Device(u32),
    /// No usable route: the translated packet is left to the stack (counted
    /// `fib_no_route`).
    NoRoute,
    /// Larger than this MTU of the egress device (a GSO packet: one of its
    /// segments would be).
    TooBig(u32),
}

/// The route and MTU check for the packet as it is now, before translation
/// (translation does not change its length).
///
/// For IPv6 a subprogram: the lookup's parameter block is on the stack
/// once, not at each of the paths that check a route.
#[inline(always)]
pub fn egress<F: Family>(ctx: &TcContext, proto: u8, src_be: F::Addr, dst_be: F::Addr) -> Egress {
    if F::IS_V6 {
        return egress_out_of_line::<F>(ctx, proto, &src_be, &dst_be);
    }
    egress_inline::<F>(ctx, proto, src_be, dst_be)
}

#[inline(never)]
fn egress_out_of_line<F: Family>(ctx: &TcContext, proto: u8, src_be: &F::Addr, dst_be: &F::Addr) -> Egress {
    egress_inline::<F>(ctx, proto, *src_be, *dst_be)
}

#[inline(always)]
fn egress_inline<F: Family>(ctx: &TcContext, proto: u8, src_be: F::Addr, dst_be: F::Addr) -> Egress {
    let Some(route) = lookup::<F>(ctx, proto, src_be, dst_be) else {
        return Egress::NoRoute;
    };
    // Why BPF_MTU_CHK_SEGS: a GSO skb is compared by its segments'
    // network length (skb_gso_validate_network_len), not by skb->len, so
    // GRO-merged packets never get a false "too big". mtu_len must be 0 with
    // that flag: the skb's own length is checked.
    let mut mtu: u32 = 0;
    // SAFETY: the skb is our context; mtu lives on our stack for the call.
    let rc = unsafe { bpf_check_mtu(ctx.skb.skb.cast(), route.ifindex, &raw mut mtu, 0, MTU_CHK_SEGS) };
    // Negative: an error (the device vanished): let the redirect decide.
    if rc > MTU_CHK_RET_SUCCESS && mtu != 0 {
        return Egress::TooBig(mtu);
    }
    Egress::Device(route.ifindex)
}

/// Decrements the IPv4 TTL (fixing the header checksum) or the IPv6 hop
/// limit as a router does. `Err(verdict)`: the packet is left to the stack
/// (it would expire, counted `pass_ttl_expired`, or the rewrite failed).
#[inline(always)]
fn decrement_ttl<F: Family>(ctx: &TcContext, l3: usize) -> Result<(), i32> {
    if F::IS_V6 {
        let Ok(hops) = ctx.load::<u8>(l3 + IP6_HOPS) else {
            return Err(TC_ACT_OK as i32);
        };
        if hops <= 1 {
            count::<F>(stats::PASS_TTL_EXPIRED, ctx.len());
            return Err(TC_ACT_OK as i32);
        }
        return ctx.store(l3 + IP6_HOPS, &(hops - 1), 0).map_err(|_| TC_ACT_OK as i32);
    }
    let Ok(word) = ctx.load::<[u8; 2]>(l3 + 8) else {
        return Err(TC_ACT_OK as i32);
    };
    if word[0] <= 1 {
        count::<F>(stats::PASS_TTL_EXPIRED, ctx.len());
        return Err(TC_ACT_OK as i32);
    }
    let new = [word[0] - 1, word[1]];
    let old16 = u16::from_ne_bytes(word);
    let new16 = u16::from_ne_bytes(new);
    if ctx.l3_csum_replace(l3 + IP_CSUM, u64::from(old16), u64::from(new16), 2).is_err()
        || ctx.store(l3 + 8, &new, 0).is_err()
    {
        return Err(TC_ACT_OK as i32);
    }
    Ok(())
}

/// Sends the (already translated) packet out as [`egress`] decided:
/// decrements the TTL (hop limit) as a router does and redirects it out of
/// the device. `NoRoute` (or `TooBig`, which callers answer before
/// translating) leaves it to the stack. Returns the verdict.
#[inline(always)]
pub fn send<F: Family>(ctx: &TcContext, l3: usize, out: Egress) -> i32 {
    let Egress::Device(ifindex) = out else {
        count::<F>(stats::FIB_NO_ROUTE, ctx.len());
        return TC_ACT_OK as i32;
    };
    if let Err(v) = decrement_ttl::<F>(ctx, l3) {
        return v;
    }
    // Why: `bpf_redirect_neigh` needs a link-layer header in front of the
    // network header (it drops the packet when `mac_header >=
    // network_header`, as on an L3 device: IPIP, WireGuard, TUN) and pulls
    // it before building the real one for the egress device. Give a packet
    // that came in on an L3 device a placeholder Ethernet header, as
    // Cilium does for its L3 devices.
    if l3 == 0 {
        // SAFETY: growing the headroom of our own skb; later accesses go
        // through bounds-checked helpers.
        if unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_HLEN as u32, 0) } != 0 {
            return TC_ACT_OK as i32;
        }
        let mut eth = [0u8; ETH_HLEN];
        eth[12..14].copy_from_slice(&F::ETH_P_BE.to_ne_bytes());
        if ctx.store(0, &eth, 0).is_err() {
            return TC_ACT_SHOT as i32;
        }
    }
    // SAFETY: NULL params: the helper looks up the next hop itself.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Route lookup and [`send`] for a packet that is already translated (ICMP
/// errors, a few hundred bytes at most: no MTU check).
#[inline(always)]
pub fn redirect<F: Family>(ctx: &TcContext, l3: usize, proto: u8, src_be: F::Addr, dst_be: F::Addr) -> i32 {
    let out = match lookup::<F>(ctx, proto, src_be, dst_be) {
        Some(route) => Egress::Device(route.ifindex),
        None => Egress::NoRoute,
    };
    send::<F>(ctx, l3, out)
}

/// [`redirect`] for IPv4 (the ICMP error path).
#[inline(always)]
pub fn redirect4(ctx: &TcContext, l3: usize, proto: u8, src_be: u32, dst_be: u32) -> i32 {
    redirect::<V4>(ctx, l3, proto, src_be, dst_be)
}
