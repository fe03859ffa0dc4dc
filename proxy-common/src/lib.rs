//! Map keys, values, constants and map names shared by the kernel programs
//! (`proxy-ebpf`) and the agent (`proxy-agent`).
//!
//! Every type here is `#[repr(C)]`, `Copy`, made of integers only, with any
//! padding spelled out as a `_pad` field, and its size asserted at compile
//! time: the kernel and the agent must agree on the layout byte for byte.
//! Byte order is carried in the field name (`*_be` = network order).
//! The `user` feature adds `aya::Pod` impls for the agent; the kernel build
//! never links aya.
#![no_std]

pub mod affinity;
pub mod backend;
pub mod ct;
pub mod frag;
pub mod names;
pub mod sctp;
pub mod sock;
pub mod stats;
pub mod svc;

/// IP protocol numbers as they appear in the IPv4 header.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;

    /// Whether flows of `proto` open and close (TCP, SCTP): only an opening
    /// packet creates one, a closing one shortens its timeout, and it keeps
    /// its backend while it lasts. UDP flows are datagram flows.
    #[must_use]
    pub const fn is_connected(proto: u8) -> bool {
        proto == TCP || proto == SCTP
    }
}

/// Implements `aya::Pod` for map types when built for userspace.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is repr(C), Copy, integers only, no implicit padding
            // (checked by the size assertion next to its definition).
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use pod;
