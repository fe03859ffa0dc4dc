//! Per-CPU datapath counters: one slot per (address family, exit reason).
//!
//! Layout of `proxy_stats_v3` (a per-CPU array of [`StatCounter`]): slot
//! [`stats_slot`]`(family, reason)` = `family * STATS_REASON_SLOTS + reason`,
//! family one of [`FAMILY_IPV4`], [`FAMILY_IPV6`] and [`FAMILY_OTHER`]
//! (frames that are neither: ARP, LLDP, ...; only `pass_not_ipv4` and a
//! frame too short to hold an Ethertype, `malformed_truncated`, count
//! there). A packet counts under the family of its L3 header (the Ethertype
//! chooses the parser); the socket path under the family of the frontend it
//! asked for (an IPv4-mapped address on an IPv6 socket is IPv4). The sum of
//! the three is what `proxy_stats_v2` counted in one slot.

pub const STATS_MAP: &str = "proxy_stats_v3";
/// Earlier layouts of the stats map, newest first, unpinned on start (their
/// counters are not carried over: a per-CPU sum cannot be split by family).
/// v2: 64 slots, one per reason, both families summed; v1: 32 slots.
pub const STATS_MAP_RETIRED: [&str; 2] = ["proxy_stats_v2", "proxy_stats_v1"];

/// Address families of the counters (the first factor of a slot index).
pub const FAMILY_IPV4: u32 = 0;
pub const FAMILY_IPV6: u32 = 1;
/// Neither IPv4 nor IPv6.
pub const FAMILY_OTHER: u32 = 2;
/// `(family, name)` for every family, in index order; the names are the
/// `family` label of the metrics and the `family` field of `stats -o json`.
pub const FAMILIES: &[(u32, &str)] = &[
    (FAMILY_IPV4, "ipv4"),
    (FAMILY_IPV6, "ipv6"),
    (FAMILY_OTHER, "other"),
];
/// Number of families ([`FAMILIES`]).
pub const STATS_FAMILIES: u32 = 3;
/// Reason slots per family.
pub const STATS_REASON_SLOTS: u32 = 64;

/// The slot of `reason` in `family`.
#[inline]
#[must_use]
pub const fn stats_slot(family: u32, reason: u32) -> u32 {
    family * STATS_REASON_SLOTS + reason
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatCounter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<StatCounter>() == 16);

crate::pod!(StatCounter);

impl StatCounter {
    /// `self + o`, saturating (userspace sums over CPUs and families).
    #[must_use]
    pub const fn plus(self, o: Self) -> Self {
        Self {
            packets: self.packets.saturating_add(o.packets),
            bytes: self.bytes.saturating_add(o.bytes),
        }
    }
}

/// One reason's counters by family, in [`FAMILIES`] order, as userspace
/// reads them (summed over CPUs).
pub type ByFamily = [StatCounter; STATS_FAMILIES as usize];

/// The sum over families (what `proxy_stats_v2` counted).
#[must_use]
pub fn total(c: &ByFamily) -> StatCounter {
    c.iter().fold(StatCounter::default(), |a, c| a.plus(*c))
}

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident = $idx:literal, $text:literal;)*) => {
        $( $(#[$doc])* pub const $name: u32 = $idx; )*
        /// `(index, name)` for every reason, in index order.
        pub const REASONS: &[(u32, &str)] = &[$(($idx, $text)),*];
    };
}

reasons! {
    /// Neither IPv4 nor IPv6 (ARP, ...; family `other`), or IPv6 that is not
    /// for the proxy (not to an IPv6 frontend, nor a reply of a tracked IPv6
    /// flow; family `ipv6`): passed untouched. (The name predates the IPv6
    /// path; the counter, summed over families, keeps counting what it always
    /// counted.)
    PASS_NOT_IPV4 = 0, "pass_not_ipv4";
    /// IPv4 or IPv6 but neither TCP nor UDP (after the IPv6 extension
    /// headers; AH and ESP count here: rewriting would break them): passed
    /// untouched.
    PASS_OTHER_PROTO = 1, "pass_other_proto";
    /// TCP/UDP not addressed to a frontend and not a reply of a translated flow.
    PASS_NO_SERVICE = 2, "pass_no_service";
    /// First packet of a flow to a frontend: backend chosen, destination translated.
    DNAT_NEW = 3, "dnat_new_flow";
    /// Later packet of a tracked flow: translated to the same backend.
    DNAT_ESTABLISHED = 4, "dnat_established";
    /// Reply from a backend: source restored to the frontend.
    REV_NAT = 5, "rev_nat_reply";
    /// Frontend without backends: answered with ICMP port unreachable
    /// (ICMPv6 destination unreachable, code 4, for IPv6).
    REJECT_NO_BACKEND = 6, "reject_no_backend";
    /// Frontend without backends and the reject could not be built: dropped.
    DROP_NO_BACKEND = 7, "drop_no_backend";
    /// Shorter than its headers claim (IPv4 total length, IPv6 payload
    /// length): passed to the kernel, which drops it.
    MALFORMED_TRUNCATED = 8, "malformed_truncated";
    /// IPv4 header with version other than 4 or IHL below 5 (an IPv6
    /// Ethertype over a version other than 6): passed to the kernel, which drops it.
    MALFORMED_BAD_IHL = 9, "malformed_bad_ihl";
    /// A later IPv4 fragment whose first fragment was not seen (or of no
    /// tracked flow), or any later IPv6 fragment (not tracked yet): passed
    /// untouched.
    PASS_FRAGMENT = 10, "pass_fragment";
    /// A slot points at a backend id that is not in the backend map: dropped.
    DROP_BACKEND_MISSING = 11, "drop_backend_missing";
    /// A packet rewrite helper failed: dropped.
    DROP_REWRITE_FAILED = 12, "drop_rewrite_failed";
    /// A conntrack entry could not be written: translated without tracking.
    CT_INSERT_FAILED = 13, "ct_insert_failed";
    /// Frontend whose endpoints are all elsewhere (`internalTrafficPolicy: Local`): dropped.
    DROP_NO_LOCAL_BACKEND = 14, "drop_no_local_backend";
    /// No free SNAT source port for a new flow to a remote backend: dropped.
    DROP_SNAT_EXHAUSTED = 15, "drop_snat_ports_exhausted";
    /// Translated, but no route for the FIB redirect: left to the stack.
    FIB_NO_ROUTE = 16, "fib_no_route";
    /// TTL would expire on the FIB redirect: left to the stack.
    PASS_TTL_EXPIRED = 17, "pass_ttl_expired";
    /// An ICMP error (unreachable, fragmentation needed, time exceeded) or
    /// ICMPv6 error (unreachable, packet too big, time exceeded) about a
    /// translated flow, translated back.
    ICMP_ERROR_TRANSLATED = 18, "icmp_error_translated";
    /// XDP fast path: DNAT+SNAT to a remote backend, sent out from XDP.
    XDP_FORWARD = 19, "xdp_forward";
    /// XDP fast path: reply of an SNAT flow translated back, sent out from XDP.
    XDP_REVERSE = 20, "xdp_reverse";
    /// Too big for the device the FIB redirect would send it out of, DF set
    /// (any IPv6 packet: IPv6 routers never fragment): answered with ICMP
    /// fragmentation needed (ICMPv6 packet too big) with the next-hop MTU,
    /// from the address the sender targeted, quoting the untranslated packet.
    ICMP_FRAG_NEEDED = 21, "icmp_frag_needed";
    /// Too big for the device the FIB redirect would send it out of, DF not
    /// set (translated packets are not fragmented), or the ICMP error could
    /// not be built (IP options; IPv6 extension headers longer than the
    /// quote): dropped.
    DROP_TOO_BIG = 22, "drop_too_big";
    /// Socket path: `connect()`/`sendmsg()` to a frontend rewritten to a backend.
    SOCK_TRANSLATED = 23, "sock_translated";
    /// Socket path: frontend without backends; the call fails with
    /// ECONNREFUSED (EHOSTUNREACH when it has endpoints, none usable here).
    SOCK_REJECTED = 24, "sock_rejected";
    /// Socket path: `recvmsg()`/`getpeername()` shown the frontend again.
    SOCK_REV_TRANSLATED = 25, "sock_rev_translated";
    /// A new flow given its backend by session affinity.
    AFFINITY_HIT = 26, "affinity_hit";
    /// A UDP flow whose backend left the frontend, moved to another backend.
    UDP_FLOW_MOVED = 27, "udp_flow_moved";
    /// A TCP packet other than a SYN to a frontend, of no tracked flow:
    /// dropped without creating state (kube-proxy drops conntrack INVALID),
    /// so spoofed ACK/FIN/RST floods cannot fill the table.
    DROP_NO_FLOW = 28, "drop_tcp_no_flow";
    /// An SNAT port held by an unconfirmed TCP flow without a reply for
    /// `CT_SYN_RECLAIM_NS` (a likely spoofed SYN) given to a new flow.
    SNAT_PORT_RECLAIMED = 29, "snat_port_reclaimed";
    /// A flow confirmed (reply seen, then the client again): moved to the
    /// confirmed table, where floods cannot evict it.
    CT_CONFIRMED = 30, "ct_flow_confirmed";
    /// XDP fast path: a new flow given a local backend, recorded and passed
    /// to TC, which translates it to that backend (XDP's choice is kept).
    XDP_LOCAL_FLOW = 31, "xdp_local_flow";
    /// An ICMP error the datapath would send (reject, fragmentation
    /// needed) suppressed by its per-CPU rate limit; the packet is dropped.
    ICMP_RATE_LIMITED = 32, "icmp_rate_limited";
    /// A later fragment translated like its datagram's first fragment
    /// (ports remembered in `proxy_frag_v1`, IPv6: `proxy_frag6_v1`).
    FRAGMENT_TRANSLATED = 33, "fragment_translated";
    /// A new flow to a `LoadBalancer` frontend from a client outside its
    /// `loadBalancerSourceRanges`: dropped (kube-proxy's KUBE-FW drop).
    DROP_SOURCE_RANGE = 34, "drop_source_range";
    /// IPv6 whose extension-header chain cannot be walked within
    /// `IPV6_MAX_EXT_HDRS` headers, holds an unknown header, or a routing
    /// header with segments left (its destination is not the final one):
    /// passed untouched, never translated.
    PASS_IPV6_EXT = 35, "pass_ipv6_ext";
    /// IPv6 UDP without a checksum (0, invalid in IPv6, RFC 8200; the stack
    /// drops it): passed untouched, never translated.
    MALFORMED_UDP6_NO_CSUM = 36, "malformed_udp6_no_checksum";
}

/// The most IPv6 extension headers the datapath walks before the upper-layer
/// header; a longer chain is passed (`pass_ipv6_ext`).
pub const IPV6_MAX_EXT_HDRS: usize = 6;

/// ICMP errors the datapath sends, per CPU: this many per second on
/// average (Linux's `icmp_msgs_per_sec`, per CPU here), bursts of up to
/// `ICMP_BURST` (`icmp_msgs_burst`).
pub const ICMP_PER_SEC: u64 = 1000;
pub const ICMP_BURST: u64 = 50;

/// The per-CPU token bucket of the ICMP rate limit (`proxy_icmp_rl_v1`):
/// credit in ns of time; a message costs `1e9 / ICMP_PER_SEC`.
pub const ICMP_RL_MAP: &str = "proxy_icmp_rl_v1";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpBucket {
    pub credit_ns: u64,
    pub last_ns: u64,
}
const _: () = assert!(size_of::<IcmpBucket>() == 16);

crate::pod!(IcmpBucket);

/// Number of counter slots (size of the per-CPU array).
pub const STATS_MAX_ENTRIES: u32 = STATS_FAMILIES * STATS_REASON_SLOTS;
const _: () = assert!(REASONS.len() <= STATS_REASON_SLOTS as usize);
const _: () = assert!(FAMILIES.len() == STATS_FAMILIES as usize);
