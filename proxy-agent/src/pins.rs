//! Every pin path and map name the agent uses, in one place.
//!
//! Layout under `--bpffs` (default `/sys/fs/bpf/proxy`):
//! ```text
//! <bpffs>/proxy_svc_v1 proxy_be_v1 proxy_ct_v2 proxy_stats_v1 proxy_names_v1   maps
//! <bpffs>/links/tcx_{ingress,egress}_<ifindex>_<ifname>                       TCX links
//! ```
//! The map names are public interface (`bpftool map dump pinned <bpffs>/<map>`).
use std::path::{Path, PathBuf};

pub use proxy_common::{
    backend::BACKEND_MAP, ct::CT_MAP, names::NAMES_MAP, stats::STATS_MAP, svc::SVC_MAP,
};

/// Default pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/proxy";

/// Every map the agent pins.
pub const ALL_MAPS: [&str; 5] = [SVC_MAP, BACKEND_MAP, CT_MAP, STATS_MAP, NAMES_MAP];

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

    /// The kernel program for this hook.
    #[must_use]
    pub const fn program(self) -> &'static str {
        match self {
            Self::Ingress => "proxy_tc_ingress",
            Self::Egress => "proxy_tc_egress",
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
