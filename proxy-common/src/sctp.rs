//! SCTP as the datapath sees it (RFC 9260): the chunk types that open and
//! close an association, and the CRC32c arithmetic that lets a port be
//! rewritten without reading the rest of the packet.
//!
//! SCTP's checksum is CRC32c (Castagnoli) over the whole SCTP packet — the
//! common header with the checksum field as zero, then every chunk — and
//! not over the IP addresses: an address rewrite leaves it alone, a port
//! rewrite changes it. A CRC is linear over GF(2): for two packets of the
//! same length `L` that differ by `D` (non-zero only in the 4 port bytes at
//! the start), `crc(new) = crc(old) xor crc₀(D)`, where `crc₀` is the CRC
//! without its initial value and final inversion. `crc₀(D)` of 4 bytes at
//! the start of `L` bytes is `D · x^(8L) mod P` (each byte processed
//! multiplies the register by x⁸: what Linux's `crc32_generic_shift` does
//! for appended zeros). The powers `x^(8L)` of every possible length are a
//! table built at compile time ([`x_pow_table`]), so the kernel side fixes
//! the checksum with one table read and one multiplication ([`mul`], term
//! by term: [`mul_term`]) whatever the packet's size, and never reads the
//! payload.
//!
//! Polynomials are in the reflected form CRC32c uses: bit 31 is x⁰, bit 0
//! is x³¹, the register shifts right.

/// Chunk types (RFC 9260 3.2).
pub const CHUNK_DATA: u8 = 0;
pub const CHUNK_INIT: u8 = 1;
pub const CHUNK_INIT_ACK: u8 = 2;
pub const CHUNK_ABORT: u8 = 6;
pub const CHUNK_SHUTDOWN_COMPLETE: u8 = 14;

/// The common header: source port, destination port, verification tag,
/// checksum (little-endian CRC32c: Linux stores `cpu_to_le32(crc)`).
pub const HDR_LEN: usize = 12;
/// Offset of the checksum in the common header.
pub const CSUM_OFF: usize = 8;
/// The common header and the first chunk's type, flags and length: the
/// least a packet the datapath translates holds.
pub const MIN_LEN: usize = HDR_LEN + 4;

/// The CRC32c polynomial, reflected.
pub const POLY: u32 = 0x82f6_3b78;
/// x⁰ (one) in the reflected form.
pub const X0: u32 = 1 << 31;
/// x⁸: the register's move for one byte.
pub const X8: u32 = 1 << (31 - 8);

/// TCP flag bits, for [`as_tcp_flags`].
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The TCP flags whose meaning for a flow the packet's first chunk has:
/// INIT opens (SYN), INIT ACK answers it (SYN+ACK), ABORT resets (RST),
/// SHUTDOWN COMPLETE ends (FIN+ACK), anything else belongs to an open
/// association (ACK). The datapath then follows a TCP flow's rules: only an
/// opening packet creates a flow, a retransmitted INIT keeps its flow, a
/// closing packet shortens the flow's timeout. INIT must be alone in its
/// packet (RFC 9260 6.10), so the first chunk says it.
#[must_use]
pub const fn as_tcp_flags(first_chunk: u8) -> u8 {
    match first_chunk {
        CHUNK_INIT => TCP_SYN,
        CHUNK_INIT_ACK => TCP_SYN | TCP_ACK,
        CHUNK_ABORT => TCP_RST,
        CHUNK_SHUTDOWN_COMPLETE => TCP_FIN | TCP_ACK,
        _ => TCP_ACK,
    }
}

/// `c · x mod P`: the register shifted by one bit.
#[inline(always)]
#[must_use]
pub const fn times_x(c: u32) -> u32 {
    (c >> 1) ^ (POLY & 0u32.wrapping_sub(c & 1))
}

/// Term `i` (0..32) of [`mul`]: with `b` = `b₀ · x^i` and `p` the sum of
/// the terms before, adds the coefficient of x^i in `a` (its bit 31 - i)
/// times `b`; returns the new sum and `b · x`. The kernel side runs the
/// terms in a `bpf_loop` (`proxy-ebpf/src/sctp.rs`).
#[inline(always)]
#[must_use]
pub const fn mul_term(a: u32, b: u32, p: u32, i: u32) -> (u32, u32) {
    let p = if (a >> (31 - i)) & 1 != 0 { p ^ b } else { p };
    (p, times_x(b))
}

/// `a · b mod P`.
#[must_use]
pub const fn mul(a: u32, b: u32) -> u32 {
    let (mut p, mut b) = (0, b);
    let mut i = 0;
    while i < 32 {
        (p, b) = mul_term(a, b, p, i);
        i += 1;
    }
    p
}

/// Bits of a packet length (`len < 2^LEN_BITS`): an SCTP packet fits an
/// IPv4 or IPv6 payload (no jumbograms).
pub const LEN_BITS: u32 = 16;
/// Entries of [`x_pow_table`]: every length an SCTP packet can have.
pub const LENS: usize = 1 << LEN_BITS;

/// `x^(8·len) mod P`, by squaring.
#[must_use]
pub const fn x_pow_bytes(len: u32) -> u32 {
    let (mut acc, mut sq) = (X0, X8);
    let mut i = 0;
    while i < 32 {
        if (len >> i) & 1 != 0 {
            acc = mul(sq, acc);
        }
        sq = mul(sq, sq);
        i += 1;
    }
    acc
}

/// `x^(8·len) mod P` for every `len < LENS`, built at compile time (each
/// entry the previous one times x⁸): the kernel side reads the power from
/// this table (its read-only data) instead of computing it.
#[must_use]
#[allow(long_running_const_eval, reason = "65,536 entries of 8 shifts, once, at compile time")]
pub const fn x_pow_table() -> [u32; LENS] {
    let mut t = [0u32; LENS];
    let mut x = X0;
    let mut len = 0;
    while len < LENS {
        t[len] = x;
        let mut b = 0;
        while b < 8 {
            x = times_x(x);
            b += 1;
        }
        len += 1;
    }
    t
}

/// What to xor into the checksum (as read little-endian from the packet)
/// when the 4 port bytes of an SCTP packet of `len` bytes change by `diff`
/// (the xor of old and new port bytes, read little-endian), given
/// `x_pow = x^(8·len)` ([`x_pow_bytes`], or [`x_pow_table`]`[len]`).
#[must_use]
pub const fn csum_delta(x_pow: u32, diff: u32) -> u32 {
    mul(x_pow, diff)
}

/// CRC32c of `bytes`, bit by bit (RFC 9260 appendix B), as the value an
/// SCTP packet carries little-endian: for the tests, never the datapath.
fn crc32c_of(bytes: impl Iterator<Item = u8>) -> u32 {
    let mut c = !0u32;
    for b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = times_x(c);
        }
    }
    !c
}

/// [`crc32c_of`] a slice.
#[must_use]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_of(data.iter().copied())
}

/// The checksum an SCTP packet (`pkt`: common header first) must carry:
/// [`crc32c`] with the checksum field as zero.
#[must_use]
pub fn packet_csum(pkt: &[u8]) -> u32 {
    crc32c_of(pkt.iter().enumerate().map(|(i, b)| if (CSUM_OFF..CSUM_OFF + 4).contains(&i) { 0 } else { *b }))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// RFC 3720 B.4's CRC32c vectors (the same CRC).
    #[test]
    fn crc32c_matches_the_published_vectors() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46dd_794e);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn x_pow_bytes_is_repeated_byte_shifts() {
        let table = x_pow_table();
        for len in [1000u32, 1500, 9000, 65_535] {
            assert_eq!(table[len as usize], x_pow_bytes(len), "len {len}");
        }
        let mut x = X0;
        for len in 0..300u32 {
            assert_eq!(x_pow_bytes(len), x, "len {len}");
            assert_eq!(table[len as usize], x, "len {len}");
            for _ in 0..8 {
                x = times_x(x);
            }
        }
    }

    /// A port rewrite fixed by the delta alone gives the checksum a full
    /// recomputation gives, for every length and either port.
    #[test]
    fn delta_update_equals_recomputation() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..2000 {
            let len = MIN_LEN + (rnd() % if round % 10 == 0 { 9000 } else { 1500 }) as usize;
            let mut pkt: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            let c = packet_csum(&pkt);
            pkt[CSUM_OFF..CSUM_OFF + 4].copy_from_slice(&c.to_le_bytes());
            let old = u32::from_le_bytes([pkt[0], pkt[1], pkt[2], pkt[3]]);
            // Source port, destination port, or both.
            let mask = [0x0000_ffffu32, 0xffff_0000, 0xffff_ffff][round % 3];
            let new = (old & !mask) | (rnd() as u32 & mask);
            pkt[0..4].copy_from_slice(&new.to_le_bytes());
            let updated = c ^ csum_delta(x_pow_bytes(len as u32), old ^ new);
            assert_eq!(updated, packet_csum(&pkt), "len {len} round {round}");
        }
    }

    #[test]
    fn first_chunks_read_as_tcp_flags() {
        assert_eq!(as_tcp_flags(CHUNK_INIT), TCP_SYN);
        assert_eq!(as_tcp_flags(CHUNK_INIT_ACK), TCP_SYN | TCP_ACK);
        assert_eq!(as_tcp_flags(CHUNK_ABORT), TCP_RST);
        assert_eq!(as_tcp_flags(CHUNK_SHUTDOWN_COMPLETE), TCP_FIN | TCP_ACK);
        assert_eq!(as_tcp_flags(CHUNK_DATA), TCP_ACK);
        assert_eq!(as_tcp_flags(10), TCP_ACK); // COOKIE ECHO
    }
}
