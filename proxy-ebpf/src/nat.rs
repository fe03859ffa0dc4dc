//! Address and port translation of the packet in place.
use aya_ebpf::{cty::c_long, programs::TcContext};

use crate::{
    csum::{rewrite_addr, rewrite_port},
    parse::{IP_DADDR, IP_SADDR, Packet},
};

/// Destination NAT: frontend → backend.
#[inline(always)]
pub fn dnat(ctx: &TcContext, p: &Packet, addr_be: u32, port_be: u16) -> Result<(), c_long> {
    if p.daddr_be != addr_be {
        rewrite_addr(ctx, p, p.l3_off + IP_DADDR, p.daddr_be, addr_be)?;
    }
    if p.dport_be != port_be && p.has_l4() {
        rewrite_port(ctx, p, p.l4_off + 2, p.dport_be, port_be)?;
    }
    Ok(())
}

/// Source NAT of a reply: backend → frontend.
#[inline(always)]
pub fn snat(ctx: &TcContext, p: &Packet, addr_be: u32, port_be: u16) -> Result<(), c_long> {
    if p.saddr_be != addr_be {
        rewrite_addr(ctx, p, p.l3_off + IP_SADDR, p.saddr_be, addr_be)?;
    }
    if p.sport_be != port_be && p.has_l4() {
        rewrite_port(ctx, p, p.l4_off, p.sport_be, port_be)?;
    }
    Ok(())
}
