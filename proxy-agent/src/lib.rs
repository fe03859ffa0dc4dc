//! The node agent of the eBPF kube-proxy replacement, as a library.
//!
//! Layers, one direction of flow:
//! `source` (manifests directory; API server later) → `store` → `model`
//! (pure) → `reconcile` (diff, ordered writes) → `datapath` (the only module
//! that speaks BPF). `agent` wires them together; `inspect` reads the pinned
//! maps for the CLI.
pub mod agent;
pub mod config;
pub mod conntrack;
pub mod datapath;
pub mod error;
pub mod events;
pub mod health;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod pins;
pub mod reconcile;
pub mod runner;
pub mod source;
pub mod store;
pub mod svchealth;

pub use error::{Error, Result};
