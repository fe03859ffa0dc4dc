//! Checksum helpers: incremental updates through the kernel helpers (which
//! handle CHECKSUM_PARTIAL skbs), and a full fold for packets we build.
//!
//! IPv4 and IPv6 differ in what an address rewrite touches: IPv4 has a
//! header checksum and 4-byte addresses (one `bpf_l4_csum_replace` with the
//! pseudo-header flag); IPv6 has no header checksum, so the L4 checksum is
//! all there is, and its 16-byte addresses go in as a precomputed
//! difference ([`diff6`]).
use aya_ebpf::{
    bindings::{BPF_F_MARK_ENFORCE, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_csum_update,
    programs::TcContext,
};
use aya_ebpf::cty::c_long;
use proxy_common::proto;

use crate::{
    family::{Family, In6, V4, V6},
    parse::{IP_CSUM, Pkt},
};

/// Why: a UDP checksum of 0 means "none" in IPv4 (RFC 768); MANGLED_0 keeps
/// it 0 and turns a computed 0 into 0xffff.
pub const UDP4_CSUM_FLAGS: u64 = BPF_F_MARK_MANGLED_0 as u64;
/// Why ENFORCE too: in IPv6 a UDP checksum is mandatory (RFC 8200 8.1), so
/// the update is never skipped (the parser passes datagrams whose checksum
/// is 0), and a computed 0 still goes out as 0xffff.
pub const UDP6_CSUM_FLAGS: u64 = (BPF_F_MARK_MANGLED_0 | BPF_F_MARK_ENFORCE) as u64;

/// Flags for an L4 checksum update of a field of `size` bytes (0: `to` is
/// a precomputed difference).
#[inline(always)]
fn l4_flags<F: Family>(p: &Pkt<F>, size: u64, pseudo: bool) -> u64 {
    let mut f = size;
    if pseudo {
        f |= u64::from(BPF_F_PSEUDO_HDR);
    }
    if p.proto == proto::UDP {
        f |= F::udp_csum_flags();
    }
    f
}

/// Rewrites an IPv4 address at `addr_off`, fixing the IP and L4 checksums.
#[inline(always)]
pub fn rewrite_addr4(ctx: &TcContext, p: &Pkt<V4>, addr_off: usize, old: u32, new: u32) -> Result<(), c_long> {
    // A later fragment has no L4 header; the first fragment's L4 checksum
    // (over the whole datagram) already took the address change. SCTP's
    // checksum does not cover the addresses.
    if p.has_l4() && p.proto != proto::SCTP {
        ctx.l4_csum_replace(p.l4_csum_off(), u64::from(old), u64::from(new), l4_flags(p, 4, true))?;
    }
    ctx.l3_csum_replace(p.l3_off + IP_CSUM, u64::from(old), u64::from(new), 4)?;
    ctx.store(addr_off, &new, 0)
}

/// The one's-complement difference `new - old` of two IPv6 addresses, as
/// `bpf_l4_csum_replace` takes it with size 0 (what `bpf_csum_diff` would
/// return: the 32-bit sum of `~old` and `new`, words as in memory).
/// Computed in registers: the helper would want both addresses on the
/// stack at every rewrite, which the IPv6 path has no room for.
#[inline(always)]
pub fn diff6(old: In6, new: In6) -> u32 {
    let lo = |w: u64| w & 0xffff_ffff;
    let mut s: u64 = 0;
    for i in 0..2 {
        let (o, n) = (!old.0[i], new.0[i]);
        s += lo(o) + (o >> 32) + lo(n) + (n >> 32);
    }
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s as u32
}

/// The sum of an IPv6 address as 16-bit words in memory order (for
/// checksums built from scratch), unfolded.
#[inline(always)]
pub fn sum6(a: In6) -> u32 {
    let mut s = 0u32;
    for w in a.0 {
        s += (w & 0xffff) as u32 + ((w >> 16) & 0xffff) as u32 + ((w >> 32) & 0xffff) as u32 + (w >> 48) as u32;
    }
    s
}

/// Applies the difference `diff` of a change covered by the pseudo-header
/// (an address) to the IPv6 L4 checksum at `csum_off`.
///
/// Why the `bpf_csum_update` afterwards: with BPF_F_PSEUDO_HDR the helper
/// also moves `skb->csum` of a CHECKSUM_COMPLETE skb by the difference, as
/// IPv4 needs (there the address change is cancelled by the IPv4 header
/// checksum, the L4 checksum change is not). In IPv6 nothing cancels the
/// address change but the L4 checksum's own: the packet's sum is unchanged
/// and `skb->csum` must stay as it was, so the move is undone (Linux 6.16
/// added `BPF_F_IPV6` for this; undoing works on every kernel). Without
/// CHECKSUM_COMPLETE `bpf_csum_update` does nothing.
#[inline(always)]
pub fn l4_pseudo_diff6(ctx: &TcContext, csum_off: usize, diff: u32, flags: u64) -> Result<(), c_long> {
    ctx.l4_csum_replace(csum_off, 0, u64::from(diff), flags | u64::from(BPF_F_PSEUDO_HDR))?;
    // SAFETY: helper on our own skb.
    let _ = unsafe { bpf_csum_update(ctx.skb.skb, diff) };
    Ok(())
}

/// Rewrites an IPv6 address at `addr_off`, fixing the L4 checksum (the
/// pseudo-header covers both addresses).
#[inline(always)]
pub fn rewrite_addr6(ctx: &TcContext, p: &Pkt<V6>, addr_off: usize, old: In6, new: In6) -> Result<(), c_long> {
    let diff = diff6(old, new);
    if p.has_l4() && p.proto != proto::SCTP {
        l4_pseudo_diff6(ctx, p.l4_csum_off(), diff, l4_flags(p, 0, false))?;
    } else {
        // A later fragment: no L4 checksum here (the first fragment's took
        // the change for the datagram); SCTP: its checksum does not cover
        // the addresses. No IPv6 header checksum cancels the address
        // change either, so the packet's sum moves by `diff`: `skb->csum`
        // of a CHECKSUM_COMPLETE skb must move alike, or a checksum
        // checked against it (the reassembled datagram's) fails.
        // SAFETY: helper on our own skb.
        let _ = unsafe { bpf_csum_update(ctx.skb.skb, diff) };
    }
    ctx.store(addr_off, &new.0, 0)
}

/// Rewrites an L4 port at `port_off`, fixing the L4 checksum. SCTP's
/// CRC32c is fixed once both ports are written ([`crate::sctp::fix_csum`]);
/// `BPF_F_RECOMPUTE_CSUM` keeps `skb->csum` of a CHECKSUM_COMPLETE skb
/// right, as no Internet checksum balances the change.
#[inline(always)]
pub fn rewrite_port<F: Family>(ctx: &TcContext, p: &Pkt<F>, port_off: usize, old: u16, new: u16) -> Result<(), c_long> {
    if p.proto == proto::SCTP {
        return ctx.store(port_off, &new, u64::from(BPF_F_RECOMPUTE_CSUM));
    }
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
