//! Socket-level load balancing (cgroup `connect4`, `sendmsg4`, `recvmsg4`,
//! `getpeername4`): the reverse-translation map and the agent's settings.
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

crate::pod!(SockRevKey, SockRevValue, Config);

/// Backends whose translated connected UDP sockets are to be destroyed
/// (the endpoint left its Service port): key `crate::backend::Backend`
/// with `flags` 0 (address, port, protocol), value unused. Filled by the
/// agent around one run of the `iter/udp` program in each network
/// namespace, then emptied.
pub const SOCK_DESTROY_MAP: &str = "proxy_sock_destroy_v1";
pub const SOCK_DESTROY_MAX_ENTRIES: u32 = 4096;
