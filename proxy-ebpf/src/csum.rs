//! Checksum helpers: incremental updates through the kernel helpers (which
//! handle CHECKSUM_PARTIAL skbs), and a full fold for packets we build.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use aya_ebpf::cty::c_long;
use proxy_common::proto;

use crate::parse::{IP_CSUM, Packet};

/// Flags for an L4 checksum update of a field of `size` bytes.
#[inline(always)]
fn l4_flags(p: &Packet, size: u64, pseudo: bool) -> u64 {
    let mut f = size;
    if pseudo {
        f |= u64::from(BPF_F_PSEUDO_HDR);
    }
    // Why: a UDP checksum of 0 means "none" (RFC 768); MANGLED_0 keeps it 0
    // and turns a computed 0 into 0xffff.
    if p.proto == proto::UDP {
        f |= u64::from(BPF_F_MARK_MANGLED_0);
    }
    f
}

/// Rewrites an IPv4 address at `addr_off`, fixing the IP and L4 checksums.
#[inline(always)]
pub fn rewrite_addr(ctx: &TcContext, p: &Packet, addr_off: usize, old: u32, new: u32) -> Result<(), c_long> {
    // A later fragment has no L4 header; the first fragment's L4 checksum
    // (over the whole datagram) already took the address change.
    if p.has_l4() {
        ctx.l4_csum_replace(p.l4_csum_off(), u64::from(old), u64::from(new), l4_flags(p, 4, true))?;
    }
    ctx.l3_csum_replace(p.l3_off + IP_CSUM, u64::from(old), u64::from(new), 4)?;
    ctx.store(addr_off, &new, 0)
}

/// Rewrites an L4 port at `port_off`, fixing the L4 checksum.
#[inline(always)]
pub fn rewrite_port(ctx: &TcContext, p: &Packet, port_off: usize, old: u16, new: u16) -> Result<(), c_long> {
    ctx.l4_csum_replace(p.l4_csum_off(), u64::from(old), u64::from(new), l4_flags(p, 2, false))?;
    ctx.store(port_off, &new, 0)
}

/// One's-complement sum of `words` 16-bit words, folded and inverted.
#[inline(always)]
pub fn fold(words: &[u16]) -> u16 {
    let mut sum: u32 = 0;
    for w in words {
        sum += u32::from(*w);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
