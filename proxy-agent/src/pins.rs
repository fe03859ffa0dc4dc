//! Every pin path and map name the agent uses, in one place.
//!
//! Layout under `--bpffs` (default `/sys/fs/bpf/proxy`):
//! ```text
//! <bpffs>/proxy_svc_v1 proxy_be_v1 proxy_ct_v2 proxy_ct_new_v1 proxy_stats_v2 proxy_names_v1 proxy_icmp_rl_v1 proxy_frag_v1
//!         proxy_affinity_v1 proxy_sock_rev_v1 proxy_config_v1 proxy_sock_destroy_v1   maps
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
    sock::{CONFIG_MAP, SOCK_DESTROY_MAP, SOCK_REV_MAP},
    stats::STATS_MAP,
    svc::SVC_MAP,
};

/// Default pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/proxy";

/// Every map the agent pins.
/// Devices the XDP fast path may redirect to.
pub const XDP_TX_MAP: &str = "proxy_xdp_tx_v1";

pub const ALL_MAPS: [&str; 14] = [
    XDP_TX_MAP,
    proxy_common::svc::SRC_RANGE_MAP,
    proxy_common::stats::ICMP_RL_MAP,
    proxy_common::frag::FRAG_MAP,
    SVC_MAP,
    BACKEND_MAP,
    CT_MAP,
    CT_NEW_MAP,
    STATS_MAP,
    NAMES_MAP,
    AFFINITY_MAP,
    SOCK_REV_MAP,
    CONFIG_MAP,
    SOCK_DESTROY_MAP,
];

/// Map names of earlier layouts: unpinned on start and by `cleanup`, so an
/// upgrade leaks no kernel memory. Their contents are not carried over:
/// counters start again; `proxy_ct_v1`'s flows (a layout of the first
/// releases) are not migrated.
pub const RETIRED_MAPS: &[&str] = &[proxy_common::stats::STATS_MAP_RETIRED, proxy_common::ct::CT_MAP_RETIRED];

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
}

impl SockHook {
    pub const ALL: [SockHook; 4] = [Self::Connect4, Self::Sendmsg4, Self::Recvmsg4, Self::Getpeername4];

    /// The kernel program for this hook.
    #[must_use]
    pub const fn program(self) -> &'static str {
        match self {
            Self::Connect4 => "proxy_sock_connect4",
            Self::Sendmsg4 => "proxy_sock_sendmsg4",
            Self::Recvmsg4 => "proxy_sock_recvmsg4",
            Self::Getpeername4 => "proxy_sock_getpeername4",
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
