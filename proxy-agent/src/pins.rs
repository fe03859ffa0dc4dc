//! Every pin path and map name the agent uses, in one place.
//!
//! Layout under `--bpffs` (default `/sys/fs/bpf/proxy`):
//! ```text
//! <bpffs>/proxy_svc_v1 proxy_be_v1 proxy_ct_v2 proxy_stats_v1 proxy_names_v1   maps
//! <bpffs>/links/tcx_ingress_<ifindex>_<ifname>                               TCX links
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

/// The kernel program attached at TC ingress.
pub const TC_INGRESS_PROG: &str = "proxy_tc_ingress";

/// File-name prefix of pinned TC ingress links.
pub const TC_INGRESS_LINK_PREFIX: &str = "tcx_ingress_";

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

    /// The pinned TC ingress link of one device. The ifindex is part of the
    /// name: a device deleted and re-created under the same name is a new
    /// attachment, not the old (defunct) link.
    ///
    /// bpffs refuses names with a dot (EPERM, "reserved"), and device names
    /// may have one (VLANs: `eth0.100`), so dots become underscores.
    #[must_use]
    pub fn tc_ingress_link(&self, ifname: &str, ifindex: u32) -> PathBuf {
        self.links_dir().join(format!("{TC_INGRESS_LINK_PREFIX}{ifindex}_{}", ifname.replace('.', "_")))
    }
}
