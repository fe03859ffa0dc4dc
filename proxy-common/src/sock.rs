//! Socket-level load balancing (cgroup `connect4`/`6`, `sendmsg4`/`6`,
//! `recvmsg4`/`6`, `getpeername4`/`6`): the reverse-translation maps and the
//! agent's settings.
//!
//! `connect()` / `sendmsg()` to a frontend are rewritten to the chosen
//! backend once; `proxy_sock_rev_v1` remembers, per socket (cookie) and
//! backend, which frontend the application asked for, so `recvmsg()` and
//! `getpeername()` show it the Service address again.

pub const SOCK_REV_MAP: &str = "proxy_sock_rev_v1";
pub const SOCK_REV_MAX_ENTRIES: u32 = 262_144;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// The backend the socket was sent to, network order.
    pub addr_be: u32,
    pub port_be: u16,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SockRevKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevValue {
    /// The frontend the application addressed, network order.
    pub addr_be: u32,
    pub port_be: u16,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: [u8; 2],
    pub svc_id: u32,
}
const _: () = assert!(size_of::<SockRevValue>() == 12);

/// Settings the agent writes for the programs (an array of one entry).
pub const CONFIG_MAP: &str = "proxy_config_v1";

/// `--socket-lb off`: the socket programs translate nothing.
pub const SOCK_LB_OFF: u32 = 0;
/// `--socket-lb all`: every socket in the cgroup.
pub const SOCK_LB_ALL: u32 = 1;
/// `--socket-lb host-only`: only sockets in the host network namespace
/// (the agent's); pods keep the per-packet path (service meshes).
pub const SOCK_LB_HOST_ONLY: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config {
    /// Network-namespace cookie of the host (the agent's namespace).
    pub host_netns_cookie: u64,
    /// `SOCK_LB_*`.
    pub socket_lb: u32,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: u32,
}
const _: () = assert!(size_of::<Config>() == 16);

/// IPv6 sockets (`connect6`, `sendmsg6`, `recvmsg6`, `getpeername6`): the
/// same as [`SOCK_REV_MAP`] with IPv6 addresses. An IPv6 socket that
/// addresses an IPv4-mapped frontend (`::ffff:a.b.c.d`) is translated
/// through the IPv4 maps and remembered in [`SOCK_REV_MAP`], keyed by the
/// embedded IPv4 backend.
pub const SOCK_REV6_MAP: &str = "proxy_sock_rev6_v1";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRev6Key {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// The backend the socket was sent to, network order.
    pub addr: [u8; 16],
    pub port_be: u16,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<SockRev6Key>() == 32);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRev6Value {
    /// The frontend the application addressed, network order.
    pub addr: [u8; 16],
    pub port_be: u16,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: [u8; 2],
    pub svc_id: u32,
}
const _: () = assert!(size_of::<SockRev6Value>() == 24);

crate::pod!(SockRevKey, SockRevValue, SockRev6Key, SockRev6Value, Config);

/// Backends whose translated connected UDP sockets are to be destroyed
/// (the endpoint left its Service port): key `crate::backend::Backend`
/// with `flags` 0 (address, port, protocol), value unused. Filled by the
/// agent around one run of the `iter/udp` program in each network
/// namespace, then emptied.
pub const SOCK_DESTROY_MAP: &str = "proxy_sock_destroy_v1";
pub const SOCK_DESTROY_MAX_ENTRIES: u32 = 4096;

/// The same for IPv6 backends: key `crate::backend::Backend6` with `flags`
/// 0. An IPv6 socket connected to an IPv4 backend (IPv4-mapped) is found
/// through [`SOCK_DESTROY_MAP`].
pub const SOCK_DESTROY6_MAP: &str = "proxy_sock_destroy6_v1";
