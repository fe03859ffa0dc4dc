//! The library's error type: structured fields, matched by variant, never by
//! message text.
use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the embedded eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {op}: {source}")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("link {}: {source}", path.display())]
    Link {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{} is not a bpffs and mounting one there failed: {source}", path.display())]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map {map} is full ({capacity} entries): {what} is not programmed")]
    MapFull {
        map: &'static str,
        capacity: u32,
        what: String,
    },
    #[error("device pattern {pattern:?}: {source}")]
    DevicePattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("finding the API server (no --kubeconfig, $KUBECONFIG, ~/.kube/config or in-cluster config): {0}")]
    InferConfig(#[source] Box<kube::config::InferConfigError>),
    #[error("API client: {0}")]
    Kube(#[source] Box<kube::Error>),
    #[error("{what} on {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("--cgroup {}: {reason}", path.display())]
    Cgroup { path: PathBuf, reason: String },
    #[error("kernel {kernel} lacks {feature}, which {needed_for} needs: {source}")]
    KernelFeature {
        feature: &'static str,
        needed_for: &'static str,
        kernel: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("fault injected: {0}")]
    Injected(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }
}
