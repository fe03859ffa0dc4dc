//! The XDP fast path for north-south traffic (`--xdp`): a packet to a
//! NodePort / externalIP / LoadBalancer frontend whose flow goes to a
//! backend on another node (externalTrafficPolicy Cluster: DNAT + SNAT) is
//! translated here and sent straight out with `XDP_TX` / `bpf_redirect`
//! after a FIB lookup, never entering the stack; so is its reply coming back
//! from that node. It shares the service, backend and conntrack maps with
//! the TC programs, so either path can carry either packet of a flow.
//! Everything else — and anything this path cannot finish (unknown
//! neighbour, IP options, fragments, a frontend without backends, a packet
//! too big for the egress route's MTU) — is `XDP_PASS`ed untouched to the
//! TC programs.
use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_TX},
    programs::XdpContext,
};
use proxy_common::{
    backend::BACKEND_F_LOCAL,
    ct::{CT_DIR_REPLY, CT_F_REDIRECT, CT_F_SNAT, CtValue},
    proto, stats,
    svc::{SVC_FLAG_SNAT_REMOTE, SVC_FLAGS_EXTERNAL},
};

use crate::{
    ct,
    family::V4,
    fib,
    maps::XDP_TX_PORTS,
    lb::{self, Client, Frontend},
    parse::Packet,
    stats::count,
};

const ETH_HLEN: usize = 14;

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: bounds checked against data_end.
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn write<T>(ctx: &XdpContext, off: usize, v: T) -> Option<()> {
    // SAFETY: bounds checked against data_end.
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::write_unaligned(p, v) })
}

/// RFC 1624 incremental update of a checksum for a 16-bit word change.
#[inline(always)]
fn csum_update16(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn csum_update32(csum: u16, old: u32, new: u32) -> u16 {
    let c = csum_update16(csum, (old >> 16) as u16, (new >> 16) as u16);
    csum_update16(c, old as u16, new as u16)
}

/// Parses Ethernet + IPv4 (no options, not a fragment) + TCP/UDP.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Packet> {
    if read::<u16>(ctx, 12)? != 0x0800_u16.to_be() {
        return None;
    }
    // Why: a fixed 20-byte header keeps every offset a constant for the
    // verifier; packets with options take the TC path.
    if read::<u8>(ctx, ETH_HLEN)? != 0x45 {
        return None;
    }
    if read::<u16>(ctx, ETH_HLEN + 6)? & 0x3fff_u16.to_be() != 0 {
        return None;
    }
    let proto: u8 = read(ctx, ETH_HLEN + 9)?;
    let l4 = ETH_HLEN + 20;
    let tcp_flags = if proto == proto::TCP {
        // The whole TCP header must be there (checksum at 16).
        read::<[u8; 20]>(ctx, l4)?[13]
    } else if proto == proto::UDP {
        read::<[u8; 8]>(ctx, l4)?;
        0
    } else {
        return None;
    };
    let ports: [u16; 2] = read(ctx, l4)?;
    // The L4 header must lie within the IPv4 total length (not padding).
    let l4_min = if proto == proto::TCP { 20 } else { 8 };
    if usize::from(u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?)) < 20 + l4_min {
        return None;
    }
    Some(Packet {
        l3_off: ETH_HLEN,
        l4_off: l4,
        ihl_len: 20,
        proto,
        saddr_be: read(ctx, ETH_HLEN + 12)?,
        daddr_be: read(ctx, ETH_HLEN + 16)?,
        sport_be: ports[0],
        dport_be: ports[1],
        tcp_flags,
        frag: crate::parse::FRAG_NONE,
    })
}

/// Rewrites source and destination (address and port), fixes both
/// checksums, decrements the TTL, sets the MACs and sends the packet out.
#[inline(always)]
fn rewrite_and_send(ctx: &XdpContext, p: &Packet, src: (u32, u16), dst: (u32, u16), route: &fib::Route<u32>) -> Option<u32> {
    let ttl: u8 = read(ctx, ETH_HLEN + 8)?;
    if ttl <= 1 {
        return None;
    }
    let ip_csum: u16 = read(ctx, ETH_HLEN + 10)?;
    let mut c = csum_update32(ip_csum, p.saddr_be, src.0);
    c = csum_update32(c, p.daddr_be, dst.0);
    let old_ttl_word: u16 = read(ctx, ETH_HLEN + 8)?;
    let new_ttl_word = u16::from_ne_bytes([ttl - 1, p.proto]);
    c = csum_update16(c, old_ttl_word, new_ttl_word);
    let csum_off = p.l4_off + if p.proto == proto::TCP { 16 } else { 6 };
    let l4c: u16 = read(ctx, csum_off)?;
    // Why: a UDP checksum of 0 means none (RFC 768): leave it so.
    if !(p.proto == proto::UDP && l4c == 0) {
        let mut n = csum_update32(l4c, p.saddr_be, src.0);
        n = csum_update32(n, p.daddr_be, dst.0);
        n = csum_update16(n, p.sport_be, src.1);
        n = csum_update16(n, p.dport_be, dst.1);
        if p.proto == proto::UDP && n == 0 {
            n = 0xffff;
        }
        write(ctx, csum_off, n)?;
    }
    write(ctx, ETH_HLEN + 8, new_ttl_word)?;
    write(ctx, ETH_HLEN + 10, c)?;
    write(ctx, ETH_HLEN + 12, src.0)?;
    write(ctx, ETH_HLEN + 16, dst.0)?;
    write(ctx, p.l4_off, src.1)?;
    write(ctx, p.l4_off + 2, dst.1)?;
    write(ctx, 0, route.dmac)?;
    write(ctx, 6, route.smac)?;
    // SAFETY: reading the ingress ifindex of our context.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if route.ifindex == ingress {
        return Some(XDP_TX);
    }
    // Only to devices in the map (checked in `route` before any rewrite).
    Some(XDP_TX_PORTS.redirect(route.ifindex, u64::from(XDP_PASS)).unwrap_or_else(|fallback| fallback))
}

/// The route with a resolved neighbour, for a packet that fits it.
///
/// Why `None` for a packet too big for the route's MTU: the lookup is given
/// the IPv4 total length, so it answers `FRAG_NEEDED` for such a packet,
/// which is then `XDP_PASS`ed untouched (before any rewrite) and TC answers
/// it with fragmentation needed (DF) or drops it (no DF). XDP cannot build
/// that reply and send it back from here in a way worth the code.
#[inline(always)]
fn route(ctx: &XdpContext, p: &Packet, src: u32, dst: u32) -> Option<fib::Route<u32>> {
    // SAFETY: reading the ingress ifindex of our context.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    // The L3 length as the header says (not data_end - data, which counts
    // Ethernet padding; never 0 here, 0 would skip the MTU check).
    let tot_len = u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?).max(20);
    // Why the egress device must be in `proxy_xdp_tx_v1` (the devices the
    // agent attached XDP to): a redirect to a device that cannot transmit
    // XDP frames (no `ndo_xdp_xmit`: a tunnel, a pod veth without XDP) is
    // dropped by the kernel. Such a flow is passed untouched to TC instead.
    fib::lookup_raw::<V4>(ctx.ctx.cast(), ingress, tot_len, p.proto, src, dst, true)
        .filter(|r| r.neigh && (r.ifindex == ingress || XDP_TX_PORTS.get_ifindex(r.ifindex).is_some()))
}

#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    match try_handle(ctx) {
        Some(v) => v,
        None => XDP_PASS,
    }
}

#[inline(always)]
fn try_handle(ctx: &XdpContext) -> Option<u32> {
    let p = parse(ctx)?;
    let len = (ctx.data_end() - ctx.data()) as u32;
    let now = ct::now_ns();
    let fe = Frontend::of(&p);
    let Some(svc) = lb::lookup_service(&fe) else {
        // A reply from a remote backend of a SNATed flow.
        let e = ct::lookup_packet(&p, CT_DIR_REPLY, now)?;
        if e.flags & CT_F_SNAT == 0 || lb::closes(&p) {
            return None;
        }
        ct::confirm_from_reply(&p, e);
        let r = route(ctx, &p, e.nat_addr_be, e.snat_addr_be)?;
        let v = rewrite_and_send(ctx, &p, (e.nat_addr_be, e.nat_port_be), (e.snat_addr_be, e.snat_port_be), &r)?;
        count(stats::XDP_REVERSE, len);
        return Some(v);
    };
    if svc.flags & SVC_FLAGS_EXTERNAL == 0 || svc.flags & SVC_FLAG_SNAT_REMOTE == 0 || svc.count == 0 || lb::closes(&p) {
        return None;
    }
    let e: &CtValue = match ct::service_entry(&p, now, len) {
        Some(e) if lb::flow_keeps_backend(&p, &svc, e, len) => e,
        _ => {
            // Not a flow start: TC decides (it drops it without state).
            // Not allowed by loadBalancerSourceRanges: TC drops and counts.
            if !lb::may_create_flow(&p) || !lb::source_allowed::<V4>(&svc, p.saddr_be) {
                return None;
            }
            let chosen = lb::select_backend(&fe, &svc, Client::Addr(p.saddr_be), now, len)?;
            let backend = chosen.backend;
            if backend.addr == p.saddr_be {
                // A hairpin: the TC path (it needs the stack's route).
                return None;
            }
            let mut flow = ct::NewFlow::to(&chosen, svc.svc_id, CT_F_REDIRECT);
            if backend.flags & BACKEND_F_LOCAL != 0 {
                // A local backend: the stack delivers it, so TC translates
                // it. Why the flow is recorded here all the same: the choice
                // made here is the one used — TC finds this entry and keeps
                // it. Choosing again in TC would give a local backend
                // (L/N)² of the new flows instead of L/N.
                let _ = ct::create(&p, &flow, now, len);
                count(stats::XDP_LOCAL_FLOW, len);
                return None;
            }
            flow.snat_addr_be = route(ctx, &p, p.saddr_be, backend.addr)?.src_be;
            ct::create(&p, &flow, now, len)?
        }
    };
    if e.flags & CT_F_SNAT == 0 {
        return None;
    }
    let r = route(ctx, &p, e.snat_addr_be, e.nat_addr_be)?;
    let v = rewrite_and_send(ctx, &p, (e.snat_addr_be, e.snat_port_be), (e.nat_addr_be, e.nat_port_be), &r)?;
    count(stats::XDP_FORWARD, len);
    Some(v)
}
