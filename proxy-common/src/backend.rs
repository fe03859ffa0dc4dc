//! The backend map: backend id → address and port.
//!
//! Ids are allocated by the agent, kept stable across restarts (read back from
//! the pinned map) and are what conntrack records, so a flow keeps its backend
//! while slots are reshuffled.

pub const BACKEND_MAP: &str = "proxy_be_v1";
/// No preallocation: only used entries cost memory.
pub const BACKEND_MAX_ENTRIES: u32 = 1_048_576;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Backend (pod) address, network byte order.
    pub addr_be: u32,
    /// Backend (target) port, network byte order.
    pub port_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `BACKEND_F_*`.
    pub flags: u8,
}
const _: () = assert!(size_of::<Backend>() == 8);

/// The backend runs on this node (no SNAT needed to reach it).
pub const BACKEND_F_LOCAL: u8 = 1 << 0;

crate::pod!(Backend);

/// IPv6 backends. Ids come from the same space as [`BACKEND_MAP`]'s (the
/// agent allocates both from one counter), so an id names one backend of
/// one family.
pub const BACKEND6_MAP: &str = "proxy_be6_v1";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend6 {
    /// Network byte order.
    pub addr: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub flags: u8,
}
const _: () = assert!(size_of::<Backend6>() == 20);

crate::pod!(Backend6);
