//! SCTP's checksum when the datapath rewrites a port.
//!
//! SCTP carries a CRC32c of the whole SCTP packet, not the Internet
//! checksum the kernel's helpers update. A port rewrite changes 2 bytes at
//! a known place, so the new checksum is the old one xor a delta that
//! depends only on those bytes and the packet's length
//! (`proxy_common::sctp`): the payload is never read. The delta is the
//! bytes' difference times `x^(8·len)`: the power read from a table in the
//! program's read-only data, the product a 32-term carry-less
//! multiplication.
//!
//! How it stays within the verifier's budget: the work is two global BPF
//! functions, which the verifier checks once each instead of on every path
//! that translates a packet (thousands: `fix_csum`'s caller only compares
//! the protocol and calls), and the multiplication runs in a `bpf_loop`
//! (see [`proxy_sctp_csum_delta`]).
//!
//! A checksum field of zero is left zero. Linux's SCTP hands packets to a
//! device that computes the CRC32c itself (veth does) with the field zero
//! and `CHECKSUM_PARTIAL`; the CRC is computed later, over the translated
//! packet, by the device or by `skb_crc32c_csum_help`. A delta xored into
//! that zero would end up in the computed checksum. A packet whose real
//! checksum is zero (one in 2³²) keeps it, goes out with a stale one, and is
//! dropped by its receiver: SCTP retransmits it.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, __sk_buff},
    cty::c_long,
    helpers::bpf_loop,
    programs::TcContext,
};
use proxy_common::{proto, sctp};

use crate::{
    family::Family,
    maps::{SCTP_SCRATCH, SctpScratch},
    parse::{ETH_HLEN, IP6_HLEN, IP6_NEXT, IP6_PLEN, Pkt},
};

/// `x^(8·len) mod P` for every length: the program's read-only data
/// (256 KiB, built at compile time).
static X_POW_BYTES: [u32; sctp::LENS] = sctp::x_pow_table();

/// Fixes the checksum of `p` once its ports were rewritten (`p` holds the
/// ports it was parsed with): nothing to do unless it is SCTP. Called once
/// per translated packet, after every rewrite.
#[inline(always)]
pub fn fix_csum<F: Family>(ctx: &TcContext, p: &Pkt<F>) -> Result<(), c_long> {
    if p.proto != proto::SCTP {
        return Ok(());
    }
    // The 4 port bytes as a little-endian word, as parsed.
    let was = u32::from(p.sport_be) | (u32::from(p.dport_be) << 16);
    let v6 = u32::from(F::IS_V6);
    let rc = if p.l3_off == 0 {
        proxy_sctp_fix_csum_l3(ctx.skb.skb, v6, was)
    } else {
        proxy_sctp_fix_csum(ctx.skb.skb, v6, was)
    };
    if rc < 0 { Err(c_long::from(rc)) } else { Ok(()) }
}

/// The work of [`fix_csum`], as a global BPF function (checked once).
///
/// It finds the SCTP header again from the packet (IPv4: after the
/// header's IHL; IPv6: right after the fixed header, the only place the
/// parser translates SCTP at), so its arguments are only the family (`v6`,
/// a constant of the caller) and `was`, the 4 port bytes before the
/// rewrite as a little-endian word.
///
/// Returns 0 (fixed, or nothing to fix), or a negative error (the packet
/// is then dropped as `drop_rewrite_failed`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn proxy_sctp_fix_csum(skb: *mut __sk_buff, v6: u32, was: u32) -> i32 {
    fix_at::<ETH_HLEN>(skb, v6, was)
}

/// [`proxy_sctp_fix_csum`] for devices without a link-layer header.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn proxy_sctp_fix_csum_l3(skb: *mut __sk_buff, v6: u32, was: u32) -> i32 {
    fix_at::<0>(skb, v6, was)
}

/// The work of the two above, for the IP header at `L3` (a constant per
/// program variant, so not an argument).
#[inline(always)]
fn fix_at<const L3: usize>(skb: *mut __sk_buff, v6: u32, was: u32) -> i32 {
    let ctx = TcContext::new(skb);
    let l3 = L3;
    // The L4 header, when the packet is SCTP (an SCTP fragment is passed
    // untranslated by the parser), and the IP packet's length.
    let (l4, ip_len) = if v6 != 0 {
        // SCTP right after the fixed header: the parser passes SCTP behind
        // extension headers untranslated (see `parse::parse_ipv6_ports`).
        let Ok(ip) = ctx.load::<[u8; 8]>(l3) else {
            return -1;
        };
        if ip[IP6_NEXT] != proto::SCTP {
            return 0;
        }
        (l3 + IP6_HLEN, IP6_HLEN + usize::from(u16::from_be_bytes([ip[IP6_PLEN], ip[IP6_PLEN + 1]])))
    } else {
        let Ok(ip) = ctx.load::<[u8; 10]>(l3) else {
            return -1;
        };
        if ip[9] != proto::SCTP {
            return 0;
        }
        (l3 + usize::from(ip[0] & 0x0f) * 4, usize::from(u16::from_be_bytes([ip[2], ip[3]])))
    };
    let Ok(now) = ctx.load::<u32>(l4) else {
        return -1;
    };
    if now == was {
        return 0;
    }
    let csum_off = l4 + sctp::CSUM_OFF;
    let Ok(csum) = ctx.load::<u32>(csum_off) else {
        return -1;
    };
    if csum == 0 {
        return 0;
    }
    // The SCTP packet's length: the IP packet's after its L3 headers.
    let Some(len) = ip_len.checked_sub(l4 - l3) else {
        return -1;
    };
    if len < sctp::MIN_LEN {
        return -1;
    }
    // Why the volatile read: the compiler may know a bound of `len` and
    // drop the mask, which is what shows the verifier the index's bound.
    // (No IP packet holds an SCTP packet of 2^16 bytes or more: the mask
    // never changes a real length.)
    // SAFETY: reading a local.
    let idx = unsafe { core::ptr::read_volatile(&raw const len) } & (sctp::LENS - 1);
    let delta = proxy_sctp_csum_delta(X_POW_BYTES[idx], was ^ now);
    if ctx.store(csum_off, &(csum ^ delta), u64::from(BPF_F_RECOMPUTE_CSUM)).is_err() {
        return -1;
    }
    0
}

/// [`sctp::csum_delta`] (one [`sctp::mul`]) as a global BPF function of
/// its own, checked once.
///
/// Why the multiplication runs in a `bpf_loop`, two terms per step, on a
/// per-CPU scratch (`proxy_sctp_scratch`): each term selects by a bit, and
/// the compiler turns a select into `mask = bit << n s>> 63; x & mask`;
/// the verifier forks its state on every such `and` with a mask of range
/// [-1, 0]. 32 terms in a row are 2^32 paths; in a loop callback, checked
/// once and merged between steps, they are 4. The cost: 16 calls of the
/// callback per translated SCTP packet whose port changed.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn proxy_sctp_csum_delta(x_pow: u32, diff: u32) -> u32 {
    let Some(s) = SCTP_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot, ours while the program runs; a raw pointer
    // (no reference held across `bpf_loop`, whose callback writes it).
    unsafe {
        (*s).a = x_pow;
        (*s).b = diff;
        (*s).p = 0;
        bpf_loop(16, mul_step as *mut c_void, core::ptr::null_mut(), 0);
        core::ptr::read_volatile(&raw const (*s).p)
    }
}

/// Terms 2i and 2i+1 of `a · b mod P` ([`sctp::mul_term`]).
extern "C" fn mul_step(i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = SCTP_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: as in `proxy_sctp_csum_delta`.
    let s: &mut SctpScratch = unsafe { &mut *s };
    let i = (i as u32 & 15) * 2;
    let (p, b) = sctp::mul_term(s.a, s.b, s.p, i);
    (s.p, s.b) = sctp::mul_term(s.a, b, p, i + 1);
    0
}
