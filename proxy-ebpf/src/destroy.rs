//! Destroying connected UDP sockets whose backend left its Service port
//! (kube-proxy deletes such UDP conntrack entries; Cilium destroys the
//! sockets): an `iter/udp` program, run by the agent in each network
//! namespace, calls the `bpf_sock_destroy` kfunc (Linux 6.5) on every UDP
//! socket that the socket path connected to a backend listed in
//! `proxy_sock_destroy_v1` (IPv4, and IPv4-mapped on an IPv6 socket) or
//! `proxy_sock_destroy6_v1` (IPv6): its peer is that backend and
//! `proxy_sock_rev_v1` / `proxy_sock_rev6_v1` holds the socket's
//! translation, so sockets the application connected to a pod directly are
//! left alone. The application sees ECONNABORTED and connects again, to a
//! backend that is there.
use aya_ebpf::helpers::bpf_get_socket_cookie;
use proxy_common::{
    backend::{Backend, Backend6},
    proto,
    sock::{SockRev6Key, SockRevKey},
};

use crate::{
    family::In6,
    maps::{SOCK_DESTROY, SOCK_DESTROY6, SOCK_REV, SOCK_REV6},
};

/// Opaque kernel types, only ever handled by pointer.
#[repr(C)]
pub struct SockCommon {
    _p: [u8; 0],
}

#[repr(C)]
pub struct BpfIterMeta {
    _p: [u8; 0],
}

/// The context of `iter/udp` programs (`struct bpf_iter__udp`).
#[repr(C)]
pub struct BpfIterUdp {
    pub meta: *mut BpfIterMeta,
    /// `struct udp_sock *`, which starts with `struct sock_common`.
    pub udp_sk: *mut SockCommon,
    pub uid: u32,
    pub bucket: i32,
}

unsafe extern "C" {
    /// The kernel's kfunc; the agent patches this call into a kfunc call
    /// with the function's BTF id before loading (aya 0.14 cannot).
    fn bpf_sock_destroy(sk: *mut SockCommon) -> i32;
}

/// Offsets in `struct sock_common` (stable since 2.6): `skc_daddr` at 0,
/// `skc_dport` at 12 (network order), `skc_family` at 16.
const SKC_DADDR: usize = 0;
const SKC_DPORT: usize = 12;
const SKC_FAMILY: usize = 16;
/// `skc_v6_daddr`: after `skc_prot` and `skc_net` on a 64-bit kernel with
/// network namespaces and IPv6 (every distribution's; checked against this
/// kernel's BTF when written). Why a wrong offset could not hurt: a socket
/// is destroyed only when the address read here is a listed backend AND
/// `proxy_sock_rev6_v1` holds this very socket's translation to it.
const SKC_V6_DADDR: usize = 56;
const AF_INET6: u16 = 10;

#[inline(always)]
pub fn destroy_udp(ctx: *mut BpfIterUdp) -> i32 {
    // SAFETY: the context pointer is the kernel's; the socket pointer may be
    // NULL (end of iteration) and is checked.
    let sk = unsafe { (*ctx).udp_sk };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: the verifier knows `sk` as a trusted `struct udp_sock *`;
    // these loads are within `sock_common`.
    let (daddr, dport, family) = unsafe {
        (
            core::ptr::read_volatile(sk.cast::<u8>().add(SKC_DADDR).cast::<u32>()),
            core::ptr::read_volatile(sk.cast::<u8>().add(SKC_DPORT).cast::<u16>()),
            core::ptr::read_volatile(sk.cast::<u8>().add(SKC_FAMILY).cast::<u16>()),
        )
    };
    let ours = translated4(sk, daddr, dport) || (family == AF_INET6 && translated6(sk, dport));
    if ours {
        // SAFETY: kfunc on the iterated socket, as the kernel allows for iter/udp.
        unsafe { bpf_sock_destroy(sk) };
    }
    0
}

/// Whether `sk` is connected to a listed IPv4 backend through the socket
/// path (an IPv4 socket, or an IPv6 one connected IPv4-mapped: the kernel
/// keeps the IPv4 peer in `skc_daddr` for both).
#[inline(always)]
fn translated4(sk: *mut SockCommon, daddr: u32, dport: u16) -> bool {
    let key = Backend { addr_be: daddr, port_be: dport, proto: proto::UDP, flags: 0 };
    // SAFETY: presence check only.
    if unsafe { SOCK_DESTROY.get(&key) }.is_none() {
        return false;
    }
    // SAFETY: helper on the iterated socket.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    let rk = SockRevKey { cookie, addr_be: daddr, port_be: dport, _pad: [0; 2] };
    // SAFETY: presence check only.
    unsafe { SOCK_REV.get(&rk) }.is_some()
}

/// Whether IPv6 socket `sk` is connected to a listed IPv6 backend through
/// the socket path.
#[inline(always)]
fn translated6(sk: *mut SockCommon, dport: u16) -> bool {
    // SAFETY: as above, within `sock_common` (`skc_v6_daddr`, 16 bytes).
    let daddr = unsafe {
        let p = sk.cast::<u8>().add(SKC_V6_DADDR).cast::<u64>();
        In6([core::ptr::read_volatile(p), core::ptr::read_volatile(p.add(1))])
    };
    let addr = daddr.octets();
    let key = Backend6 { addr, port_be: dport, proto: proto::UDP, flags: 0 };
    // SAFETY: presence check only.
    if unsafe { SOCK_DESTROY6.get(&key) }.is_none() {
        return false;
    }
    // SAFETY: helper on the iterated socket.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    let rk = SockRev6Key { cookie, addr, port_be: dport, _pad: [0; 6] };
    // SAFETY: presence check only.
    unsafe { SOCK_REV6.get(&rk) }.is_some()
}
