//! Where Services and `EndpointSlices` come from. Every source sends the same
//! [`SourceEvent`](crate::store::SourceEvent)s; nothing downstream knows
//! which one is in use.
pub mod kube;
pub mod manifests;
