//! Address family as a type: [`V4`] and [`V6`] implement [`Family`], which
//! names each family's address type, map keys and values and its maps, so
//! the load-balancing library ([`crate::lb`]), conntrack ([`crate::ct`]),
//! NAT ([`crate::nat`]) and the TC path ([`crate::tc`]) are written once and
//! monomorphized per family (Cilium's `lb4_*`/`lb6_*` twins, without the
//! copy). What really differs between the families — header offsets, the
//! checksum of an address rewrite, the FIB lookup's parameters, the ICMP
//! errors — sits behind the trait's methods, each implemented next to its
//! kind (`csum`, `fib`, `reject`).
//!
//! IPv6 addresses are [`In6`]: two 64-bit words holding the 16 bytes in
//! network order, as loaded from the packet. Two words, not four: an
//! address then takes two registers, which keeps the register pressure —
//! and the spill slots on the 512-byte stack — of the IPv6 path down. Map
//! layouts keep `[u8; 16]` (`proxy-common`): the bytes are the same, so
//! converting is a copy, never a byte swap.
use aya_ebpf::{bindings::BPF_NOEXIST, cty::c_long, programs::TcContext};
use proxy_common::{
    affinity::{AFFINITY_CLIENT_ADDR, AFFINITY_CLIENT_ADDR6, AFFINITY_CLIENT_NETNS, AFFINITY_CLIENT_NETNS6},
    ct::{Ct6Key, Ct6Value, CtKey, CtValue},
    frag::{Frag6Key, FragKey, FragValue},
    svc::{Svc6Key, SvcKey, SvcValue},
};

use crate::{
    fib::{AF_INET, AF_INET6, FibParams},
    maps::{BACKEND, BACKEND6, CT, CT6, CT6_NEW, CT_NEW, FRAG, FRAG6, SRC_RANGES, SRC_RANGES6, SVC, SVC6},
    parse::{ETH_P_IP_BE, ETH_P_IPV6_BE, Pkt},
};
use proxy_common::stats;

/// An IPv6 address: 16 bytes in network order, held as two words so that
/// a comparison is two word compares (no `bcmp` call, one basic block).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct In6(pub [u64; 2]);

impl PartialEq for In6 {
    #[inline(always)]
    fn eq(&self, o: &Self) -> bool {
        let (a, b) = (self.0, o.0);
        ((a[0] ^ b[0]) | (a[1] ^ b[1])) == 0
    }
}

impl In6 {
    #[inline(always)]
    pub fn octets(self) -> [u8; 16] {
        // SAFETY: same size, every bit pattern valid; the words hold the
        // address bytes in memory order, so this is the address as sent.
        unsafe { core::mem::transmute(self.0) }
    }

    /// As the FIB helper wants it.
    #[inline(always)]
    pub fn words32(self) -> [u32; 4] {
        // SAFETY: same size, every bit pattern valid, memory order kept.
        unsafe { core::mem::transmute(self.0) }
    }

    #[inline(always)]
    pub fn from_octets(b: [u8; 16]) -> Self {
        // SAFETY: as above.
        Self(unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(b) })
    }
}

/// A backend as the library sees it, whatever the family.
#[derive(Clone, Copy)]
pub struct Be<A> {
    pub addr: A,
    /// Network order.
    pub port_be: u16,
    /// `BACKEND_F_*`.
    pub flags: u8,
}

/// The fields a new conntrack entry is made of ([`Family::ct_value`]).
#[derive(Clone, Copy)]
pub struct CtInit<A> {
    pub nat_addr: A,
    pub nat_port_be: u16,
    pub flags: u8,
    pub snat_addr: A,
    pub snat_port_be: u16,
    pub slot: u16,
    pub backend_id: u32,
    pub svc_id: u32,
    pub now: u64,
}

/// A conntrack value of either family (`CtValue`, `Ct6Value`): the fields
/// mean the same (`proxy_common::ct`).
pub trait CtEntry: Copy {
    type Addr: Copy;
    fn nat_addr(&self) -> Self::Addr;
    fn nat_port(&self) -> u16;
    fn snat_addr(&self) -> Self::Addr;
    fn snat_port(&self) -> u16;
    fn set_snat_port(&mut self, port_be: u16);
    fn flags(&self) -> u8;
    fn flags_mut(&mut self) -> &mut u8;
    fn last_seen(&self) -> u64;
    fn set_last_seen(&mut self, now: u64);
    fn backend_id(&self) -> u32;
    fn slot(&self) -> u16;
}

/// One address family: its types, its maps, and the L3 operations that
/// differ between IPv4 and IPv6.
pub trait Family: Sized + 'static {
    type Addr: Copy + PartialEq;
    type SvcKey;
    type CtKey: Copy;
    type CtValue: CtEntry<Addr = Self::Addr>;
    /// The fragment map's key ([`crate::frag`]).
    type FragKey;

    /// The all-zero address ("none").
    const ZERO: Self::Addr;
    const IS_V6: bool;
    /// The Ethertype, network order.
    const ETH_P_BE: u16;
    /// The family's counters (`proxy_common::stats::FAMILY_*`).
    const STATS_FAMILY: u32;
    /// What a packet of this family that is not for the proxy (no frontend,
    /// no tracked flow) is counted as.
    const PASS_NO_SERVICE: u32;
    /// The affinity map's client kind of a network namespace (the socket
    /// path's client) for a frontend of this family.
    const AFFINITY_NETNS: u8;
    /// Offsets of the source and destination address in the L3 header.
    const SADDR_OFF: usize;
    const DADDR_OFF: usize;

    /// Key of slot `slot` of a frontend.
    fn svc_key(addr: Self::Addr, port_be: u16, proto: u8, slot: u16) -> Self::SvcKey;
    /// The service map entry of `key`.
    fn svc(key: &Self::SvcKey) -> Option<SvcValue>;
    /// The backend map entry of `id` (ids are shared by the families: an id
    /// of the other family is simply not found).
    fn backend(id: u32) -> Option<Be<Self::Addr>>;
    /// The affinity map's client of an address: its value and its kind
    /// (`AFFINITY_CLIENT_*`).
    fn affinity_client(addr: Self::Addr) -> (u64, u8);
    /// `loadBalancerSourceRanges` for a client (the frontend has the flag).
    fn source_in_ranges(svc_id: u32, client: Self::Addr) -> bool;

    /// A conntrack key.
    fn ct_key(saddr: Self::Addr, daddr: Self::Addr, sport_be: u16, dport_be: u16, proto: u8, dir: u8) -> Self::CtKey;
    fn ct_key_proto(k: &Self::CtKey) -> u8;
    fn ct_key_dir(k: &Self::CtKey) -> u8;
    /// The entry of `key` in the confirmed (`true`) or unconfirmed table.
    fn ct_ptr(confirmed: bool, key: &Self::CtKey) -> Option<*mut Self::CtValue>;
    /// Inserts (`noexist`: only when absent, atomically); `true` on success.
    fn ct_insert(confirmed: bool, key: &Self::CtKey, v: &Self::CtValue, noexist: bool) -> bool;
    fn ct_remove(confirmed: bool, key: &Self::CtKey);
    fn ct_value(i: &CtInit<Self::Addr>) -> Self::CtValue;

    /// The fragment map's key of a datagram: its addresses, its
    /// identification (network order; IPv4's 16 bits in the low-addressed
    /// half as loaded, IPv6's 32) and its upper-layer protocol.
    fn frag_key(saddr: Self::Addr, daddr: Self::Addr, id_be: u32, proto: u8) -> Self::FragKey;
    fn frag_get(key: &Self::FragKey) -> Option<FragValue>;
    fn frag_insert(key: &Self::FragKey, v: &FragValue);

    /// Rewrites the address at `off` (source or destination of `p`'s L3
    /// header) from `old` to `new`, fixing the checksums that cover it.
    fn rewrite_addr(ctx: &TcContext, p: &Pkt<Self>, off: usize, old: Self::Addr, new: Self::Addr) -> Result<(), c_long>;
    /// BPF_F_* flags of an L4 checksum update of a UDP datagram.
    fn udp_csum_flags() -> u64;

    /// Fills in the family and addresses of a FIB lookup.
    fn fib_set(params: &mut FibParams, src: Self::Addr, dst: Self::Addr);
    /// The source address a FIB lookup with `BPF_FIB_LOOKUP_SRC` chose.
    fn fib_src(params: &FibParams) -> Self::Addr;

    /// Rejects a new flow to a frontend without backends (ICMP port
    /// unreachable / ICMPv6 destination unreachable, port); returns the verdict.
    fn port_unreachable(ctx: &TcContext, p: &Pkt<Self>, len: u32) -> i32;
    /// Answers a packet too big for the egress device's `mtu` (ICMP
    /// fragmentation needed / ICMPv6 packet too big from `from`), or drops
    /// it; returns the verdict.
    fn too_big(ctx: &TcContext, p: &Pkt<Self>, from: Self::Addr, mtu: u32, len: u32) -> i32;
}

/// IPv4.
pub struct V4;

/// IPv6.
pub struct V6;

impl CtEntry for CtValue {
    type Addr = u32;
    #[inline(always)]
    fn nat_addr(&self) -> u32 {
        self.nat_addr_be
    }
    #[inline(always)]
    fn nat_port(&self) -> u16 {
        self.nat_port_be
    }
    #[inline(always)]
    fn snat_addr(&self) -> u32 {
        self.snat_addr_be
    }
    #[inline(always)]
    fn snat_port(&self) -> u16 {
        self.snat_port_be
    }
    #[inline(always)]
    fn set_snat_port(&mut self, port_be: u16) {
        self.snat_port_be = port_be;
    }
    #[inline(always)]
    fn flags(&self) -> u8 {
        self.flags
    }
    #[inline(always)]
    fn flags_mut(&mut self) -> &mut u8 {
        &mut self.flags
    }
    #[inline(always)]
    fn last_seen(&self) -> u64 {
        self.last_seen_ns
    }
    #[inline(always)]
    fn set_last_seen(&mut self, now: u64) {
        self.last_seen_ns = now;
    }
    #[inline(always)]
    fn backend_id(&self) -> u32 {
        self.backend_id
    }
    #[inline(always)]
    fn slot(&self) -> u16 {
        self.slot
    }
}

impl CtEntry for Ct6Value {
    type Addr = In6;
    #[inline(always)]
    fn nat_addr(&self) -> In6 {
        In6::from_octets(self.nat_addr)
    }
    #[inline(always)]
    fn nat_port(&self) -> u16 {
        self.nat_port_be
    }
    #[inline(always)]
    fn snat_addr(&self) -> In6 {
        In6::from_octets(self.snat_addr)
    }
    #[inline(always)]
    fn snat_port(&self) -> u16 {
        self.snat_port_be
    }
    #[inline(always)]
    fn set_snat_port(&mut self, port_be: u16) {
        self.snat_port_be = port_be;
    }
    #[inline(always)]
    fn flags(&self) -> u8 {
        self.flags
    }
    #[inline(always)]
    fn flags_mut(&mut self) -> &mut u8 {
        &mut self.flags
    }
    #[inline(always)]
    fn last_seen(&self) -> u64 {
        self.last_seen_ns
    }
    #[inline(always)]
    fn set_last_seen(&mut self, now: u64) {
        self.last_seen_ns = now;
    }
    #[inline(always)]
    fn backend_id(&self) -> u32 {
        self.backend_id
    }
    #[inline(always)]
    fn slot(&self) -> u16 {
        self.slot
    }
}

#[inline(always)]
fn noexist(on: bool) -> u64 {
    if on { u64::from(BPF_NOEXIST) } else { 0 }
}

impl Family for V4 {
    type Addr = u32;
    type SvcKey = SvcKey;
    type CtKey = CtKey;
    type CtValue = CtValue;
    type FragKey = FragKey;

    const ZERO: u32 = 0;
    const IS_V6: bool = false;
    const ETH_P_BE: u16 = ETH_P_IP_BE;
    const STATS_FAMILY: u32 = stats::FAMILY_IPV4;
    const PASS_NO_SERVICE: u32 = stats::PASS_NO_SERVICE;
    const AFFINITY_NETNS: u8 = AFFINITY_CLIENT_NETNS;
    const SADDR_OFF: usize = crate::parse::IP_SADDR;
    const DADDR_OFF: usize = crate::parse::IP_DADDR;

    #[inline(always)]
    fn svc_key(addr: u32, port_be: u16, proto: u8, slot: u16) -> SvcKey {
        SvcKey { addr_be: addr, port_be, backend_slot: slot, proto, scope: 0, _pad: [0; 2] }
    }

    #[inline(always)]
    fn svc(key: &SvcKey) -> Option<SvcValue> {
        // SAFETY: the value is copied out at once.
        unsafe { SVC.get(key).copied() }
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Be<u32>> {
        // SAFETY: the value is copied out at once.
        let b = unsafe { BACKEND.get(id).copied() }?;
        Some(Be { addr: b.addr_be, port_be: b.port_be, flags: b.flags })
    }

    #[inline(always)]
    fn affinity_client(addr: u32) -> (u64, u8) {
        (u64::from(addr), AFFINITY_CLIENT_ADDR)
    }

    #[inline(always)]
    fn source_in_ranges(svc_id: u32, client: u32) -> bool {
        SRC_RANGES.get(&crate::maps::src_range_key(svc_id, client)).is_some()
    }

    #[inline(always)]
    fn ct_key(saddr: u32, daddr: u32, sport_be: u16, dport_be: u16, proto: u8, dir: u8) -> CtKey {
        CtKey { saddr_be: saddr, daddr_be: daddr, sport_be, dport_be, proto, dir, _pad: [0; 2] }
    }

    #[inline(always)]
    fn ct_key_proto(k: &CtKey) -> u8 {
        k.proto
    }

    #[inline(always)]
    fn ct_key_dir(k: &CtKey) -> u8 {
        k.dir
    }

    #[inline(always)]
    fn ct_ptr(confirmed: bool, key: &CtKey) -> Option<*mut CtValue> {
        if confirmed { CT.get_ptr_mut(key) } else { CT_NEW.get_ptr_mut(key) }
    }


    #[inline(always)]
    fn ct_insert(confirmed: bool, key: &CtKey, v: &CtValue, no: bool) -> bool {
        if confirmed { CT.insert(key, v, noexist(no)).is_ok() } else { CT_NEW.insert(key, v, noexist(no)).is_ok() }
    }

    #[inline(always)]
    fn ct_remove(confirmed: bool, key: &CtKey) {
        let _ = if confirmed { CT.remove(key) } else { CT_NEW.remove(key) };
    }

    #[inline(always)]
    fn ct_value(i: &CtInit<u32>) -> CtValue {
        CtValue {
            nat_addr_be: i.nat_addr,
            nat_port_be: i.nat_port_be,
            flags: i.flags,
            _pad: 0,
            snat_addr_be: i.snat_addr,
            snat_port_be: i.snat_port_be,
            slot: i.slot,
            backend_id: i.backend_id,
            svc_id: i.svc_id,
            last_seen_ns: i.now,
            #[cfg(feature = "layout-next")]
            created_ns: i.now,
        }
    }

    #[inline(always)]
    fn frag_key(saddr: u32, daddr: u32, id_be: u32, proto: u8) -> FragKey {
        // The low 16 bits hold the two bytes of the IPv4 id as loaded.
        FragKey { saddr_be: saddr, daddr_be: daddr, id_be: id_be as u16, proto, _pad: 0 }
    }

    #[inline(always)]
    fn frag_get(key: &FragKey) -> Option<FragValue> {
        // SAFETY: the value is copied out at once.
        unsafe { FRAG.get(key).copied() }
    }

    #[inline(always)]
    fn frag_insert(key: &FragKey, v: &FragValue) {
        let _ = FRAG.insert(key, v, 0);
    }

    #[inline(always)]
    fn rewrite_addr(ctx: &TcContext, p: &Pkt<Self>, off: usize, old: u32, new: u32) -> Result<(), c_long> {
        crate::csum::rewrite_addr4(ctx, p, off, old, new)
    }

    #[inline(always)]
    fn udp_csum_flags() -> u64 {
        crate::csum::UDP4_CSUM_FLAGS
    }

    #[inline(always)]
    fn fib_set(params: &mut FibParams, src: u32, dst: u32) {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
    }

    #[inline(always)]
    fn fib_src(params: &FibParams) -> u32 {
        // SAFETY: the helper filled the union's IPv4 member.
        unsafe { params.__bindgen_anon_3.ipv4_src }
    }

    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, p: &Pkt<Self>, len: u32) -> i32 {
        crate::reject::port_unreachable(ctx, p, len)
    }

    #[inline(always)]
    fn too_big(ctx: &TcContext, p: &Pkt<Self>, from: u32, mtu: u32, len: u32) -> i32 {
        crate::reject::frag_needed(ctx, p, from, mtu, len)
    }
}

impl Family for V6 {
    type Addr = In6;
    type SvcKey = Svc6Key;
    type CtKey = Ct6Key;
    type CtValue = Ct6Value;
    type FragKey = Frag6Key;

    const ZERO: In6 = In6([0; 2]);
    const IS_V6: bool = true;
    const ETH_P_BE: u16 = ETH_P_IPV6_BE;
    const STATS_FAMILY: u32 = stats::FAMILY_IPV6;
    /// Why `pass_not_ipv4`: before the IPv6 path, every IPv6 packet counted
    /// there; IPv6 that is not for the proxy still does (in the IPv6
    /// counters), so the counter summed over families keeps its meaning on
    /// dashboards and in the tests that pin it.
    const PASS_NO_SERVICE: u32 = stats::PASS_NOT_IPV4;
    const AFFINITY_NETNS: u8 = AFFINITY_CLIENT_NETNS6;
    const SADDR_OFF: usize = crate::parse::IP6_SADDR;
    const DADDR_OFF: usize = crate::parse::IP6_DADDR;

    #[inline(always)]
    fn svc_key(addr: In6, port_be: u16, proto: u8, slot: u16) -> Svc6Key {
        Svc6Key { addr: addr.octets(), port_be, backend_slot: slot, proto, scope: 0, _pad: [0; 2] }
    }

    #[inline(always)]
    fn svc(key: &Svc6Key) -> Option<SvcValue> {
        // SAFETY: the value is copied out at once.
        unsafe { SVC6.get(key).copied() }
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Be<In6>> {
        // SAFETY: the value is copied out at once.
        let b = unsafe { BACKEND6.get(id).copied() }?;
        Some(Be { addr: In6::from_octets(b.addr), port_be: b.port_be, flags: b.flags })
    }

    /// Why a hash and not the address: the affinity key holds 64 bits of
    /// client (its layout is shared with IPv4 and the socket path). Two
    /// clients whose addresses fold to the same value share an affinity
    /// entry: they get the same backend, which is all affinity promises
    /// either of them — never a backend outside the frontend (the slot is
    /// checked on use).
    #[inline(always)]
    fn affinity_client(addr: In6) -> (u64, u8) {
        let [hi, lo] = addr.0;
        // A multiply-xorshift mix, so that addresses differing only in the
        // upper half (the prefix) do not cancel out.
        let mut h = hi.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ lo;
        h ^= h >> 29;
        (h, AFFINITY_CLIENT_ADDR6)
    }

    #[inline(always)]
    fn source_in_ranges(svc_id: u32, client: In6) -> bool {
        SRC_RANGES6.get(&crate::maps::src_range6_key(svc_id, client.octets())).is_some()
    }

    #[inline(always)]
    fn ct_key(saddr: In6, daddr: In6, sport_be: u16, dport_be: u16, proto: u8, dir: u8) -> Ct6Key {
        Ct6Key { saddr: saddr.octets(), daddr: daddr.octets(), sport_be, dport_be, proto, dir, _pad: [0; 2] }
    }

    #[inline(always)]
    fn ct_key_proto(k: &Ct6Key) -> u8 {
        k.proto
    }

    #[inline(always)]
    fn ct_key_dir(k: &Ct6Key) -> u8 {
        k.dir
    }

    #[inline(always)]
    fn ct_ptr(confirmed: bool, key: &Ct6Key) -> Option<*mut Ct6Value> {
        if confirmed { CT6.get_ptr_mut(key) } else { CT6_NEW.get_ptr_mut(key) }
    }


    #[inline(always)]
    fn ct_insert(confirmed: bool, key: &Ct6Key, v: &Ct6Value, no: bool) -> bool {
        if confirmed { CT6.insert(key, v, noexist(no)).is_ok() } else { CT6_NEW.insert(key, v, noexist(no)).is_ok() }
    }

    #[inline(always)]
    fn ct_remove(confirmed: bool, key: &Ct6Key) {
        let _ = if confirmed { CT6.remove(key) } else { CT6_NEW.remove(key) };
    }

    #[inline(always)]
    fn ct_value(i: &CtInit<In6>) -> Ct6Value {
        Ct6Value {
            nat_addr: i.nat_addr.octets(),
            snat_addr: i.snat_addr.octets(),
            nat_port_be: i.nat_port_be,
            snat_port_be: i.snat_port_be,
            flags: i.flags,
            _pad: 0,
            slot: i.slot,
            backend_id: i.backend_id,
            svc_id: i.svc_id,
            last_seen_ns: i.now,
        }
    }

    #[inline(always)]
    fn frag_key(saddr: In6, daddr: In6, id_be: u32, proto: u8) -> Frag6Key {
        Frag6Key { saddr: saddr.octets(), daddr: daddr.octets(), id_be, proto, _pad: [0; 3] }
    }

    #[inline(always)]
    fn frag_get(key: &Frag6Key) -> Option<FragValue> {
        // SAFETY: the value is copied out at once.
        unsafe { FRAG6.get(key).copied() }
    }

    #[inline(always)]
    fn frag_insert(key: &Frag6Key, v: &FragValue) {
        let _ = FRAG6.insert(key, v, 0);
    }

    #[inline(always)]
    fn rewrite_addr(ctx: &TcContext, p: &Pkt<Self>, off: usize, old: In6, new: In6) -> Result<(), c_long> {
        crate::csum::rewrite_addr6(ctx, p, off, old, new)
    }

    #[inline(always)]
    fn udp_csum_flags() -> u64 {
        crate::csum::UDP6_CSUM_FLAGS
    }

    #[inline(always)]
    fn fib_set(params: &mut FibParams, src: In6, dst: In6) {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = src.words32();
        params.__bindgen_anon_4.ipv6_dst = dst.words32();
    }

    #[inline(always)]
    fn fib_src(params: &FibParams) -> In6 {
        // SAFETY: the helper filled the union's IPv6 member.
        let w = unsafe { params.__bindgen_anon_3.ipv6_src };
        // SAFETY: same size, every bit pattern valid, memory order kept.
        In6(unsafe { core::mem::transmute::<[u32; 4], [u64; 2]>(w) })
    }

    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, p: &Pkt<Self>, len: u32) -> i32 {
        crate::reject::port_unreachable6(ctx, p, len)
    }

    #[inline(always)]
    fn too_big(ctx: &TcContext, p: &Pkt<Self>, from: In6, mtu: u32, len: u32) -> i32 {
        crate::reject::packet_too_big6(ctx, p, from, mtu, len)
    }
}
