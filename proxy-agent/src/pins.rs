//! Every pin path and map name the agent uses, in one place.
//!
//! Layout under `--bpffs` (default `/sys/fs/bpf/proxy`):
//! ```text
//! <bpffs>/proxy_svc_v1 proxy_be_v1 proxy_ct_v2 proxy_ct_new_v1 proxy_stats_v3 proxy_names_v1 proxy_icmp_rl_v1 proxy_frag_v1
//!         proxy_affinity_v1 proxy_sock_rev_v1 proxy_sock_rev6_v1 proxy_config_v1 proxy_sock_destroy_v1
//!         proxy_xdp_tx_v1 proxy_src_range_v1
//!         proxy_svc6_v1 proxy_be6_v1 proxy_ct6_v1 proxy_ct6_new_v1 proxy_frag6_v1
//!         proxy_src_range6_v1 proxy_sock_destroy6_v1 (IPv6)
//!                                                                     maps ([`LAYOUTS`])
//! <bpffs>/links/tcx_{ingress,egress}_<ifindex>_<ifname>                       TCX links
//! <bpffs>/links/xdp_<ifindex>_<ifname>                                        XDP links
//! <bpffs>/links/cgroup_<hook>_<cgroup inode>                                  cgroup links
//! ```
//! The map names are public interface (`bpftool map dump pinned <bpffs>/<map>`).
use std::path::{Path, PathBuf};

pub use proxy_common::{
    affinity::AFFINITY_MAP,
    backend::BACKEND_MAP,
    ct::{CT_MAP, CT_NEW_MAP},
    names::NAMES_MAP,
    sock::{CONFIG_MAP, SOCK_DESTROY_MAP, SOCK_DESTROY6_MAP, SOCK_REV_MAP, SOCK_REV6_MAP},
    stats::STATS_MAP,
    svc::SVC_MAP,
};

/// Default pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/proxy";

/// Devices the XDP fast path may redirect to.
pub const XDP_TX_MAP: &str = "proxy_xdp_tx_v1";

/// How a retired layout's entries are carried into its successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migration {
    /// `proxy_ct_v1` (one table, no SNAT) into the conntrack's confirmed
    /// table: every flow it held keeps its backend.
    CtV1,
    /// The shipped conntrack layout (`proxy_ct_v2`, `proxy_ct_new_v1`)
    /// into the test-only next one (feature `layout-next`).
    #[cfg(feature = "layout-next")]
    CtV2,
}

/// A layout a map replaced: unpinned on start (after its entries are
/// migrated, when it has a [`Migration`]) and by `cleanup`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retired {
    pub name: &'static str,
    /// `None`: not carried over (counters start again).
    pub migration: Option<Migration>,
}

/// One pinned map: its name, whose `_vN` suffix is its layout version
/// (bumped whenever its key, value, type or meaning changes), and the
/// layouts it retires, newest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub retires: &'static [Retired],
}

const fn map(name: &'static str) -> MapLayout {
    MapLayout { name, retires: &[] }
}

#[cfg(not(feature = "layout-next"))]
const CT_RETIRES: &[Retired] = &[Retired { name: proxy_common::ct::CT_MAP_V1, migration: Some(Migration::CtV1) }];
#[cfg(feature = "layout-next")]
const CT_RETIRES: &[Retired] = &[
    Retired { name: proxy_common::ct::CT_MAP_V2, migration: Some(Migration::CtV2) },
    Retired { name: proxy_common::ct::CT_MAP_V1, migration: Some(Migration::CtV1) },
];
#[cfg(not(feature = "layout-next"))]
const CT_NEW_RETIRES: &[Retired] = &[];
#[cfg(feature = "layout-next")]
const CT_NEW_RETIRES: &[Retired] = &[Retired { name: proxy_common::ct::CT_NEW_MAP_V1, migration: Some(Migration::CtV2) }];

/// Every map the agent pins, with its layout history: the one table that
/// loading, migration and cleanup walk.
pub const LAYOUTS: [MapLayout; 22] = [
    map(XDP_TX_MAP),
    map(proxy_common::svc::SRC_RANGE_MAP),
    map(proxy_common::svc::SRC_RANGE6_MAP),
    map(proxy_common::stats::ICMP_RL_MAP),
    map(proxy_common::frag::FRAG_MAP),
    map(proxy_common::frag::FRAG6_MAP),
    map(SVC_MAP),
    map(BACKEND_MAP),
    map(proxy_common::svc::SVC6_MAP),
    map(proxy_common::backend::BACKEND6_MAP),
    map(proxy_common::ct::CT6_MAP),
    map(proxy_common::ct::CT6_NEW_MAP),
    MapLayout { name: CT_MAP, retires: CT_RETIRES },
    MapLayout { name: CT_NEW_MAP, retires: CT_NEW_RETIRES },
    MapLayout {
        name: STATS_MAP,
        // v2 summed both families in one slot per reason; v1 had 32 slots.
        retires: &[
            Retired { name: proxy_common::stats::STATS_MAP_RETIRED[0], migration: None },
            Retired { name: proxy_common::stats::STATS_MAP_RETIRED[1], migration: None },
        ],
    },
    map(NAMES_MAP),
    map(AFFINITY_MAP),
    map(SOCK_REV_MAP),
    map(SOCK_REV6_MAP),
    map(CONFIG_MAP),
    map(SOCK_DESTROY_MAP),
    map(SOCK_DESTROY6_MAP),
];

/// The names of every current map.
pub fn all_maps() -> impl Iterator<Item = &'static str> {
    LAYOUTS.iter().map(|l| l.name)
}

/// Every retired layout, with the map that replaced it.
pub fn retired_maps() -> impl Iterator<Item = (&'static MapLayout, &'static Retired)> {
    LAYOUTS.iter().flat_map(|l| l.retires.iter().map(move |r| (l, r)))
}

/// The base name and layout version of a map name (`proxy_ct_v2` →
/// (`proxy_ct`, 2)).
#[must_use]
pub fn layout_version(name: &str) -> Option<(&str, u32)> {
    let (base, v) = name.rsplit_once("_v")?;
    Some((base, v.parse().ok()?))
}

/// The TC hooks the agent attaches to every `--devices` match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    /// DNAT, SNAT, reverse NAT, reject, ICMP errors arriving.
    Ingress,
    /// ICMP errors the node itself sends about translated flows.
    Egress,
}

impl TcHook {
    pub const ALL: [TcHook; 2] = [TcHook::Ingress, TcHook::Egress];

    /// The kernel program for this hook on an Ethernet device.
    #[must_use]
    pub const fn program(self) -> &'static str {
        match self {
            Self::Ingress => "proxy_tc_ingress",
            Self::Egress => "proxy_tc_egress",
        }
    }

    /// The variant for devices without a link-layer header (IPIP,
    /// `WireGuard`, GRE, TUN), whose packets start with the IP header.
    #[must_use]
    pub const fn program_l3(self) -> &'static str {
        match self {
            Self::Ingress => "proxy_tc_ingress_l3",
            Self::Egress => "proxy_tc_egress_l3",
        }
    }

    /// File-name prefix of this hook's pinned links.
    #[must_use]
    pub fn link_prefix(self) -> &'static str {
        match self {
            Self::Ingress => "tcx_ingress_",
            Self::Egress => "tcx_egress_",
        }
    }
}

/// The cgroup socket-LB hooks the agent attaches to `--cgroup`: one table
/// that loading, attaching and cleanup walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockHook {
    Connect4,
    Sendmsg4,
    Recvmsg4,
    Getpeername4,
    /// IPv6 sockets (and IPv4-mapped destinations of IPv6 sockets).
    Connect6,
    Sendmsg6,
    Recvmsg6,
    Getpeername6,
}

impl SockHook {
    pub const ALL: [SockHook; 8] = [
        Self::Connect4,
        Self::Sendmsg4,
        Self::Recvmsg4,
        Self::Getpeername4,
        Self::Connect6,
        Self::Sendmsg6,
        Self::Recvmsg6,
        Self::Getpeername6,
    ];

    /// The kernel program for this hook.
    #[must_use]
    pub const fn program(self) -> &'static str {
        match self {
            Self::Connect4 => "proxy_sock_connect4",
            Self::Sendmsg4 => "proxy_sock_sendmsg4",
            Self::Recvmsg4 => "proxy_sock_recvmsg4",
            Self::Getpeername4 => "proxy_sock_getpeername4",
            Self::Connect6 => "proxy_sock_connect6",
            Self::Sendmsg6 => "proxy_sock_sendmsg6",
            Self::Recvmsg6 => "proxy_sock_recvmsg6",
            Self::Getpeername6 => "proxy_sock_getpeername6",
        }
    }

    /// The attach point's name, as in the program's section (`cgroup/<name>`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Sendmsg4 => "sendmsg4",
            Self::Recvmsg4 => "recvmsg4",
            Self::Getpeername4 => "getpeername4",
            Self::Connect6 => "connect6",
            Self::Sendmsg6 => "sendmsg6",
            Self::Recvmsg6 => "recvmsg6",
            Self::Getpeername6 => "getpeername6",
        }
    }
}

/// File-name prefix of pinned cgroup links.
pub const SOCK_LINK_PREFIX: &str = "cgroup_";

/// The XDP fast-path program.
pub const XDP_PROG: &str = "proxy_xdp";
/// File-name prefix of pinned XDP links.
pub const XDP_LINK_PREFIX: &str = "xdp_";

/// Paths below one pin directory.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    #[must_use]
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The pinned XDP link of one device (named like [`Self::tc_link`]).
    #[must_use]
    pub fn xdp_link(&self, ifname: &str, ifindex: u32) -> PathBuf {
        self.links_dir().join(format!("{XDP_LINK_PREFIX}{ifindex}_{}", ifname.replace('.', "_")))
    }

    /// The pinned link of a socket-LB hook on the cgroup whose directory
    /// has inode `cgroup_ino` (the cgroup id), so a changed `--cgroup` is a
    /// new attachment and the old one is recognised and detached.
    #[must_use]
    pub fn sock_link(&self, hook: SockHook, cgroup_ino: u64) -> PathBuf {
        self.links_dir().join(format!("{SOCK_LINK_PREFIX}{}_{cgroup_ino}", hook.name()))
    }

    /// The pinned TC link of one device and hook. The ifindex is part of the
    /// name: a device deleted and re-created under the same name is a new
    /// attachment, not the old (defunct) link.
    ///
    /// bpffs refuses names with a dot (EPERM, "reserved"), and device names
    /// may have one (VLANs: `eth0.100`), so dots become underscores.
    #[must_use]
    pub fn tc_link(&self, hook: TcHook, ifname: &str, ifindex: u32) -> PathBuf {
        self.links_dir().join(format!("{}{ifindex}_{}", hook.link_prefix(), ifname.replace('.', "_")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_retired_layout_is_an_older_version_of_its_map() {
        let mut seen = std::collections::BTreeSet::new();
        for l in &LAYOUTS {
            let (base, v) = layout_version(l.name).unwrap_or_else(|| panic!("{}: no _vN suffix", l.name));
            assert!(seen.insert(l.name), "{} twice", l.name);
            let mut last = v;
            for r in l.retires {
                let (rbase, rv) = layout_version(r.name).unwrap_or_else(|| panic!("{}: no _vN suffix", r.name));
                assert_eq!(rbase, base, "{} retires another map's layout {}", l.name, r.name);
                assert!(rv < last, "{} retires {} out of order (newest first)", l.name, r.name);
                last = rv;
            }
        }
        assert_eq!(retired_maps().count(), if cfg!(feature = "layout-next") { 5 } else { 3 });
    }
}
