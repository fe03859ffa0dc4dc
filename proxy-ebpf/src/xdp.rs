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
//!
//! Both families take the same decisions ([`try_handle`], generic over
//! [`XdpFamily`], through [`crate::lb`] and [`crate::ct`] as TC does); what
//! differs is parsing and the rewrite. IPv4 is parsed with direct packet
//! access at constant offsets (a 20-byte header; options go to TC). IPv6 is
//! walked with the TC path's own walk ([`crate::parse::walk_ipv6`], over
//! `bpf_xdp_load_bytes`): its extension headers (hop-by-hop, routing
//! without segments left, destination options; at most
//! `IPV6_MAX_EXT_HDRS`) are skipped and the rewrite lands after them. A
//! chain the walk refuses, a fragment, `ICMPv6`, a UDP datagram without
//! checksum are passed untouched, uncounted here: TC walks them again and
//! counts them once (`pass_ipv6_ext`, ...). Each family's handler is its
//! own subprogram, so their stacks never add up.
use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_TX},
    helpers::bpf_xdp_store_bytes,
    programs::XdpContext,
};
use proxy_common::{
    backend::BACKEND_F_LOCAL,
    ct::{CT_DIR_REPLY, CT_F_REDIRECT, CT_F_SNAT},
    proto, stats,
    svc::{SVC_FLAG_SNAT_REMOTE, SVC_FLAGS_EXTERNAL},
};

use crate::{
    csum::diff6,
    ct,
    family::{CtEntry, Family, In6, V4, V6},
    fib,
    maps::XDP_TX_PORTS,
    lb::{self, Client, Frontend},
    parse::{Bytes, ETH_P_IPV6_BE, FRAG_NONE, IP6_DADDR, IP6_HOPS, IP6_PLEN, IP6_SADDR, Packet, Pkt, parse_ipv6_ports, walk_ipv6},
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

/// The parts of the fast path that differ per family: the L3 length the
/// FIB lookup checks against the route's MTU, and the rewrite.
trait XdpFamily: Family {
    /// The L3 length as the header says (not `data_end - data`, which counts
    /// Ethernet padding; never 0, which would skip the MTU check).
    fn l3_len(ctx: &XdpContext) -> Option<u16>;
    /// Rewrites source and destination (address and port), fixes the
    /// checksums, decrements the TTL / hop limit and sets the MACs; `None`
    /// (nothing written) when the packet would expire.
    fn rewrite(ctx: &XdpContext, p: &Pkt<Self>, src: (Self::Addr, u16), dst: (Self::Addr, u16), route: &fib::Route<Self::Addr>) -> Option<()>;
}

impl XdpFamily for V4 {
    #[inline(always)]
    fn l3_len(ctx: &XdpContext) -> Option<u16> {
        Some(u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?).max(20))
    }

    #[inline(always)]
    fn rewrite(ctx: &XdpContext, p: &Packet, src: (u32, u16), dst: (u32, u16), route: &fib::Route<u32>) -> Option<()> {
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
        write(ctx, 6, route.smac)
    }
}

impl XdpFamily for V6 {
    #[inline(always)]
    fn l3_len(ctx: &XdpContext) -> Option<u16> {
        Some(u16::from_be(read::<u16>(ctx, ETH_HLEN + IP6_PLEN)?).saturating_add(40))
    }

    /// No header checksum in IPv6: the L4 checksum takes the address
    /// changes (the pseudo-header covers both) and the port changes, in one
    /// update. The L4 header sits after any extension headers, at a
    /// variable offset: read and written through the helpers, which check
    /// it against the packet.
    #[inline(always)]
    fn rewrite(ctx: &XdpContext, p: &Pkt<V6>, src: (In6, u16), dst: (In6, u16), route: &fib::Route<In6>) -> Option<()> {
        let hops: u8 = read(ctx, ETH_HLEN + IP6_HOPS)?;
        if hops <= 1 {
            return None;
        }
        let csum_off = p.l4_csum_off();
        let l4c: u16 = ctx.load(csum_off).ok()?;
        // The one's-complement sum of the changes: words as in memory, as
        // the checksum field itself is read.
        let mut sum = u64::from(!l4c)
            + u64::from(diff6(p.saddr_be, src.0))
            + u64::from(diff6(p.daddr_be, dst.0))
            + u64::from(!p.sport_be)
            + u64::from(src.1)
            + u64::from(!p.dport_be)
            + u64::from(dst.1);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let mut n = !(sum as u16);
        // Why: in IPv6 a UDP checksum is mandatory (RFC 8200 8.1); a
        // computed 0 is sent as 0xffff. (A datagram that came with 0 never
        // gets here: the parser passes it.)
        if p.proto == proto::UDP && n == 0 {
            n = 0xffff;
        }
        store(ctx, csum_off, n)?;
        store(ctx, p.l4_off, [src.1, dst.1])?;
        write(ctx, ETH_HLEN + IP6_HOPS, hops - 1)?;
        write(ctx, ETH_HLEN + IP6_SADDR, src.0.0)?;
        write(ctx, ETH_HLEN + IP6_DADDR, dst.0.0)?;
        write(ctx, 0, route.dmac)?;
        write(ctx, 6, route.smac)
    }
}

/// Writes `v` at `off` through `bpf_xdp_store_bytes` (a variable offset).
#[inline(always)]
fn store<T>(ctx: &XdpContext, off: usize, mut v: T) -> Option<()> {
    // SAFETY: the helper reads size_of::<T>() bytes of `v` and checks the
    // offset against the packet.
    let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, off as u32, (&raw mut v).cast(), size_of::<T>() as u32) };
    (rc == 0).then_some(())
}

/// Sends a rewritten packet out of the route's device.
#[inline(always)]
fn send<A>(ctx: &XdpContext, route: &fib::Route<A>) -> u32 {
    // SAFETY: reading the ingress ifindex of our context.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if route.ifindex == ingress {
        return XDP_TX;
    }
    // Only to devices in the map (checked in `route` before any rewrite).
    XDP_TX_PORTS.redirect(route.ifindex, u64::from(XDP_PASS)).unwrap_or_else(|fallback| fallback)
}

/// Rewrites the packet to `src → dst` and sends it out by `route`.
#[inline(always)]
fn rewrite_and_send<F: XdpFamily>(ctx: &XdpContext, p: &Pkt<F>, src: (F::Addr, u16), dst: (F::Addr, u16), route: &fib::Route<F::Addr>) -> Option<u32> {
    F::rewrite(ctx, p, src, dst, route)?;
    Some(send(ctx, route))
}

/// The route with a resolved neighbour, for a packet that fits it.
///
/// Why `None` for a packet too big for the route's MTU: the lookup is given
/// the L3 length, so it answers `FRAG_NEEDED` for such a packet, which is
/// then `XDP_PASS`ed untouched (before any rewrite) and TC answers it with
/// fragmentation needed / packet too big, or drops it. XDP cannot build
/// that reply and send it back from here in a way worth the code.
#[inline(always)]
fn route<F: XdpFamily>(ctx: &XdpContext, p: &Pkt<F>, src: F::Addr, dst: F::Addr) -> Option<fib::Route<F::Addr>> {
    // SAFETY: reading the ingress ifindex of our context.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let tot_len = F::l3_len(ctx)?;
    // Why the egress device must be in `proxy_xdp_tx_v1` (the devices the
    // agent attached XDP to): a redirect to a device that cannot transmit
    // XDP frames (no `ndo_xdp_xmit`: a tunnel, a pod veth without XDP) is
    // dropped by the kernel. Such a flow is passed untouched to TC instead.
    fib::lookup_raw::<F>(ctx.ctx.cast(), ingress, tot_len, p.proto, src, dst, true)
        .filter(|r| r.neigh && (r.ifindex == ingress || XDP_TX_PORTS.get_ifindex(r.ifindex).is_some()))
}

#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    if read::<u16>(ctx, 12) == Some(ETH_P_IPV6_BE) {
        return handle6(XdpContext::new(ctx.ctx));
    }
    handle4(XdpContext::new(ctx.ctx))
}

#[inline(never)]
fn handle4(ctx: XdpContext) -> u32 {
    parse(&ctx).and_then(|p| try_handle(&ctx, &p)).unwrap_or(XDP_PASS)
}

/// IPv6: walked as on TC; what the walk or the port parse refuses is
/// passed (see the module documentation), and so are fragments.
#[inline(never)]
fn handle6(ctx: XdpContext) -> u32 {
    let Ok(h) = walk_ipv6(&ctx, ETH_HLEN) else {
        return XDP_PASS;
    };
    let Ok(p) = parse_ipv6_ports(&ctx, ETH_HLEN, &h) else {
        return XDP_PASS;
    };
    // SCTP: its checksum is rewritten on TC only (`crate::sctp`).
    if p.frag != FRAG_NONE || p.proto == proto::SCTP {
        return XDP_PASS;
    }
    try_handle(&ctx, &p).unwrap_or(XDP_PASS)
}

/// The decisions, for either family: `None` passes the packet to TC
/// untouched.
#[inline(always)]
fn try_handle<F: XdpFamily>(ctx: &XdpContext, p: &Pkt<F>) -> Option<u32> {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let now = ct::now_ns();
    let fe = Frontend::of(p);
    let Some(svc) = lb::lookup_service(&fe) else {
        // A reply from a remote backend of a SNATed flow.
        let e = ct::lookup_packet(p, CT_DIR_REPLY, now)?;
        if e.flags() & CT_F_SNAT == 0 || lb::closes(p) {
            return None;
        }
        ct::confirm_from_reply(p, e);
        let r = route(ctx, p, e.nat_addr(), e.snat_addr())?;
        let v = rewrite_and_send(ctx, p, (e.nat_addr(), e.nat_port()), (e.snat_addr(), e.snat_port()), &r)?;
        count::<F>(stats::XDP_REVERSE, len);
        return Some(v);
    };
    if svc.flags & SVC_FLAGS_EXTERNAL == 0 || svc.flags & SVC_FLAG_SNAT_REMOTE == 0 || svc.count == 0 || lb::closes(p) {
        return None;
    }
    let e: &F::CtValue = match ct::service_entry(p, now, len) {
        Some(e) if lb::flow_keeps_backend(p, &svc, e, len) => e,
        _ => {
            // Not a flow start: TC decides (it drops it without state).
            // Not allowed by loadBalancerSourceRanges: TC drops and counts.
            if !lb::may_create_flow(p) || !lb::source_allowed::<F>(&svc, p.saddr_be) {
                return None;
            }
            let chosen = lb::select_backend(&fe, &svc, Client::Addr(p.saddr_be), now, len)?;
            let backend = chosen.backend;
            if backend.addr == p.saddr_be {
                // A hairpin: the TC path (it needs the stack's route).
                return None;
            }
            let mut flow = ct::NewFlow::to(&chosen, svc.svc_id, CT_F_REDIRECT);
            let local = backend.flags & BACKEND_F_LOCAL != 0;
            if !local {
                flow.snat_addr_be = route(ctx, p, p.saddr_be, backend.addr)?.src_be;
            }
            // One call site (the flow creation is the larger part of the
            // program: inlined twice, the IPv6 handler would not fit the
            // stack).
            let created = ct::create(p, &flow, now, len);
            if local {
                // A local backend: the stack delivers it, so TC translates
                // it. Why the flow is recorded here all the same: the choice
                // made here is the one used — TC finds this entry and keeps
                // it. Choosing again in TC would give a local backend
                // (L/N)² of the new flows instead of L/N.
                count::<F>(stats::XDP_LOCAL_FLOW, len);
                return None;
            }
            created?
        }
    };
    if e.flags() & CT_F_SNAT == 0 {
        return None;
    }
    let r = route(ctx, p, e.snat_addr(), e.nat_addr())?;
    let v = rewrite_and_send(ctx, p, (e.snat_addr(), e.snat_port()), (e.nat_addr(), e.nat_port()), &r)?;
    count::<F>(stats::XDP_FORWARD, len);
    Some(v)
}
