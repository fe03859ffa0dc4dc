//! Every map the programs use. Names and layouts come from `proxy-common`;
//! the agent pins them under `--bpffs` with those names. The `name = ...`
//! strings must equal the `*_MAP` constants of `proxy-common` (the agent
//! checks at load time that every constant names a map of the object).
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use proxy_common::{
    affinity::{AFFINITY_MAX_ENTRIES, AffinityKey, AffinityValue},
    sock::{Config, SOCK_DESTROY_MAX_ENTRIES, SOCK_REV_MAX_ENTRIES, SockRev6Key, SockRev6Value, SockRevKey, SockRevValue},
    backend::{BACKEND_MAX_ENTRIES, Backend, Backend6},
    ct::{CT_MAX_ENTRIES, CT_NEW_MAX_ENTRIES, CT6_MAX_ENTRIES, CT6_NEW_MAX_ENTRIES, Ct6Key, Ct6Value, CtKey, CtValue},
    names::{NAMES_MAX_ENTRIES, SvcName},
    frag::{FRAG_MAX_ENTRIES, Frag6Key, FragKey, FragValue},
    stats::{IcmpBucket, STATS_MAX_ENTRIES, StatCounter},
    svc::{SRC_RANGE_MAX_ENTRIES, SVC_MAX_ENTRIES, SrcRange6Key, SrcRangeKey, Svc6Key, SvcKey, SvcValue},
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map(name = "proxy_svc_v1")]
pub static SVC: HashMap<SvcKey, SvcValue, { SVC_MAX_ENTRIES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "proxy_be_v1")]
pub static BACKEND: HashMap<u32, Backend, { BACKEND_MAX_ENTRIES as usize }, NO_PREALLOC> =
    HashMap::new();

/// IPv6 frontends (`proxy_common::svc::SVC6_MAP`).
#[btf_map(name = "proxy_svc6_v1")]
pub static SVC6: HashMap<Svc6Key, SvcValue, { SVC_MAX_ENTRIES as usize }, NO_PREALLOC> =
    HashMap::new();

/// IPv6 backends (`proxy_common::backend::BACKEND6_MAP`).
#[btf_map(name = "proxy_be6_v1")]
pub static BACKEND6: HashMap<u32, Backend6, { BACKEND_MAX_ENTRIES as usize }, NO_PREALLOC> =
    HashMap::new();

/// IPv6 confirmed and unconfirmed flows (`proxy_common::ct::CT6_MAP`, `CT6_NEW_MAP`).
#[btf_map(name = "proxy_ct6_v1")]
pub static CT6: LruHashMap<Ct6Key, Ct6Value, { CT6_MAX_ENTRIES as usize }> = LruHashMap::new();

#[btf_map(name = "proxy_ct6_new_v1")]
pub static CT6_NEW: LruHashMap<Ct6Key, Ct6Value, { CT6_NEW_MAX_ENTRIES as usize }> = LruHashMap::new();

/// Confirmed flows (`proxy_common::ct::CT_MAP`; the test-only next layout
/// renames both tables).
#[cfg_attr(not(feature = "layout-next"), btf_map(name = "proxy_ct_v2"))]
#[cfg_attr(feature = "layout-next", btf_map(name = "proxy_ct_v3"))]
pub static CT: LruHashMap<CtKey, CtValue, { CT_MAX_ENTRIES as usize }> = LruHashMap::new();

/// Unconfirmed flows (see `proxy_common::ct`).
#[cfg_attr(not(feature = "layout-next"), btf_map(name = "proxy_ct_new_v1"))]
#[cfg_attr(feature = "layout-next", btf_map(name = "proxy_ct_new_v2"))]
pub static CT_NEW: LruHashMap<CtKey, CtValue, { CT_NEW_MAX_ENTRIES as usize }> = LruHashMap::new();

/// Per-CPU counters by (family, reason) (`proxy_common::stats::STATS_MAP`, `stats_slot`).
#[btf_map(name = "proxy_stats_v3")]
pub static STATS: PerCpuArray<StatCounter, { STATS_MAX_ENTRIES as usize }> =
    PerCpuArray::new();

/// Written and read by the agent only; declared here so the object carries it.
#[btf_map(name = "proxy_names_v1")]
pub static NAMES: HashMap<u32, SvcName, { NAMES_MAX_ENTRIES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "proxy_affinity_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_MAX_ENTRIES as usize }> = LruHashMap::new();

#[btf_map(name = "proxy_sock_rev_v1")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue, { SOCK_REV_MAX_ENTRIES as usize }> = LruHashMap::new();

/// IPv6 sockets' reverse translation (`proxy_common::sock::SOCK_REV6_MAP`).
#[btf_map(name = "proxy_sock_rev6_v1")]
pub static SOCK_REV6: LruHashMap<SockRev6Key, SockRev6Value, { SOCK_REV_MAX_ENTRIES as usize }> = LruHashMap::new();

#[btf_map(name = "proxy_config_v1")]
pub static CONFIG: Array<Config, 1> = Array::new();

#[btf_map(name = "proxy_sock_destroy_v1")]
pub static SOCK_DESTROY: HashMap<Backend, u32, { SOCK_DESTROY_MAX_ENTRIES as usize }> = HashMap::new();

/// IPv6 backends whose connected UDP sockets are destroyed
/// (`proxy_common::sock::SOCK_DESTROY6_MAP`).
#[btf_map(name = "proxy_sock_destroy6_v1")]
pub static SOCK_DESTROY6: HashMap<Backend6, u32, { SOCK_DESTROY_MAX_ENTRIES as usize }> = HashMap::new();

/// Per-CPU token bucket of the ICMP errors the datapath sends.
#[btf_map(name = "proxy_icmp_rl_v1")]
pub static ICMP_RL: PerCpuArray<IcmpBucket, 1> = PerCpuArray::new();

/// First fragments' ports, for the later fragments of their datagram.
#[btf_map(name = "proxy_frag_v1")]
pub static FRAG: LruHashMap<FragKey, FragValue, { FRAG_MAX_ENTRIES as usize }> = LruHashMap::new();

/// The same for IPv6 (`proxy_common::frag::FRAG6_MAP`).
#[btf_map(name = "proxy_frag6_v1")]
pub static FRAG6: LruHashMap<Frag6Key, FragValue, { FRAG_MAX_ENTRIES as usize }> = LruHashMap::new();

/// Devices the XDP fast path may redirect to: those the agent attached XDP
/// to (ifindex → ifindex).
#[btf_map(name = "proxy_xdp_tx_v1")]
pub static XDP_TX_PORTS: DevMapHash<256> = DevMapHash::new();

/// Per-CPU work area of the conntrack functions (`ct::Work`): keys and
/// entries too large for the stack of the IPv6 path. Not pinned: its
/// contents live for one call.
#[repr(C)]
pub struct CtScratch {
    pub words: [u64; 32],
}

#[btf_map(name = "proxy_ct_scratch")]
pub static CT_SCRATCH: PerCpuArray<CtScratch, 1> = PerCpuArray::new();

/// Per-CPU operands of the SCTP checksum's multiplication
/// (`sctp::proxy_sctp_csum_delta`, run in a `bpf_loop`). Not pinned: its
/// contents live for one call.
#[repr(C)]
pub struct SctpScratch {
    pub a: u32,
    pub b: u32,
    pub p: u32,
    pub _pad: u32,
}

#[btf_map(name = "proxy_sctp_scratch")]
pub static SCTP_SCRATCH: PerCpuArray<SctpScratch, 1> = PerCpuArray::new();

/// Per-CPU slot of the conntrack entry a lookup hands out (see `ct`).
#[repr(C)]
pub struct CtEntrySlot {
    pub words: [u64; 8],
}

#[btf_map(name = "proxy_ct_entry")]
pub static CT_ENTRY: PerCpuArray<CtEntrySlot, 1> = PerCpuArray::new();

/// `loadBalancerSourceRanges` (see `proxy_common::svc::SRC_RANGE_MAP`).
#[btf_map(name = "proxy_src_range_v1")]
pub static SRC_RANGES: LpmTrie<SrcRangeKey, u32, { SRC_RANGE_MAX_ENTRIES as usize }> = LpmTrie::new();

/// The LPM key of a client of a frontend.
#[inline(always)]
pub fn src_range_key(svc_id: u32, addr_be: u32) -> Key<SrcRangeKey> {
    Key::new(64, SrcRangeKey { svc_id_be: svc_id.to_be(), addr_be })
}

/// `loadBalancerSourceRanges` of IPv6 frontends (see
/// `proxy_common::svc::SRC_RANGE6_MAP`).
#[btf_map(name = "proxy_src_range6_v1")]
pub static SRC_RANGES6: LpmTrie<SrcRange6Key, u32, { SRC_RANGE_MAX_ENTRIES as usize }> = LpmTrie::new();

/// The LPM key of an IPv6 client of a frontend.
#[inline(always)]
pub fn src_range6_key(svc_id: u32, addr: [u8; 16]) -> Key<SrcRange6Key> {
    Key::new(32 + 128, SrcRange6Key { svc_id_be: svc_id.to_be(), addr })
}
