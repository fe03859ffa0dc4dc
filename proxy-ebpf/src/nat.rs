//! Address and port translation of the packet in place, for either family
//! (the address rewrite and its checksums are the family's:
//! [`crate::family::Family::rewrite_addr`]).
use aya_ebpf::{cty::c_long, programs::TcContext};

use crate::{csum::rewrite_port, family::Family, parse::Pkt};

/// Destination NAT: frontend → backend.
#[inline(always)]
pub fn dnat<F: Family>(ctx: &TcContext, p: &Pkt<F>, addr: F::Addr, port_be: u16) -> Result<(), c_long> {
    if p.daddr_be != addr {
        F::rewrite_addr(ctx, p, p.l3_off + F::DADDR_OFF, p.daddr_be, addr)?;
    }
    if p.dport_be != port_be && p.has_l4() {
        rewrite_port(ctx, p, p.l4_off + 2, p.dport_be, port_be)?;
    }
    Ok(())
}

/// Source NAT of a reply: backend → frontend.
#[inline(always)]
pub fn snat<F: Family>(ctx: &TcContext, p: &Pkt<F>, addr: F::Addr, port_be: u16) -> Result<(), c_long> {
    if p.saddr_be != addr {
        F::rewrite_addr(ctx, p, p.l3_off + F::SADDR_OFF, p.saddr_be, addr)?;
    }
    if p.sport_be != port_be && p.has_l4() {
        rewrite_port(ctx, p, p.l4_off, p.sport_be, port_be)?;
    }
    Ok(())
}
