//! A "wire" for the two-node topology: a namespace between two veths whose
//! native XDP programs hand every frame from one side to the other with
//! `bpf_redirect`, so the next hop receives `xdp_frame`s instead of skbs —
//! what a NIC driver's receive ring delivers. A node behind such a wire
//! sees traffic the way it would from a real network card: its own XDP
//! program runs before any skb exists, and without XDP the driver builds
//! the skb. Used by [`crate::cluster::Cluster::new_wired`].
//!
//! The program is four instructions (`r1 = ifindex; r2 = 0; call
//! bpf_redirect; exit`), loaded with the `bpf(2)` system call and attached
//! with a BPF link; dropping the [`WireLink`] closes the link and detaches it.
use std::{
    ffi::CString,
    os::fd::{FromRawFd as _, OwnedFd},
};

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_FUNC_REDIRECT: i32 = 23;

/// One attached wire program; detached when dropped.
#[derive(Debug)]
pub struct WireLink {
    _link: OwnedFd,
    _prog: OwnedFd,
}

fn insn(code: u8, dst: u8, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = dst & 0x0f;
    b[4..8].copy_from_slice(&imm.to_ne_bytes());
    b
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: bpf(2) with a zero-padded attribute buffer of the size given.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(rc).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifindex(dev: &str) -> Result<u32, String> {
    let c = CString::new(dev).map_err(|e| e.to_string())?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 { Err(format!("no device {dev}")) } else { Ok(i) }
}

/// In the calling thread's namespace: native XDP on `from` redirecting
/// every frame to `to`.
fn attach_here(from: &str, to: &str) -> Result<WireLink, String> {
    let (from_i, to_i) = (ifindex(from)?, ifindex(to)?);
    let mut insns = Vec::new();
    // BPF_ALU64 | BPF_MOV | BPF_K: r1 = ifindex of `to`, r2 = 0 (flags).
    insns.extend_from_slice(&insn(0xb7, 1, i32::try_from(to_i).map_err(|e| e.to_string())?));
    insns.extend_from_slice(&insn(0xb7, 2, 0));
    // BPF_JMP | BPF_CALL bpf_redirect; BPF_JMP | BPF_EXIT.
    insns.extend_from_slice(&insn(0x85, 0, BPF_FUNC_REDIRECT));
    insns.extend_from_slice(&insn(0x95, 0, 0));
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&4u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&1u32.to_ne_bytes());
    attr[28..32].copy_from_slice(&u32::try_from(log.len()).unwrap_or(0).to_ne_bytes());
    attr[32..40].copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
    attr[48..52].copy_from_slice(b"wire");
    attr[68..72].copy_from_slice(&BPF_XDP.to_ne_bytes());
    let prog = bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        format!("loading the wire program: {e}: {}", String::from_utf8_lossy(&log[..end]))
    })?;
    let mut attr = [0u8; 128];
    let prog_fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&prog)).map_err(|e| e.to_string())?;
    attr[0..4].copy_from_slice(&prog_fd.to_ne_bytes());
    attr[4..8].copy_from_slice(&from_i.to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
    attr[12..16].copy_from_slice(&XDP_FLAGS_DRV_MODE.to_ne_bytes());
    let link = bpf(BPF_LINK_CREATE, &mut attr).map_err(|e| format!("attaching native XDP to {from}: {e}"))?;
    Ok(WireLink { _link: link, _prog: prog })
}

/// Joins `a` and `b` (two veths in `ns`) into a wire: every frame arriving
/// on one leaves by the other, redirected in native XDP.
pub fn join(ns: &Netns, a: &str, b: &str) -> Result<[WireLink; 2], String> {
    let (a, b) = (a.to_owned(), b.to_owned());
    ns.run(move || Ok([attach_here(&a, &b)?, attach_here(&b, &a)?]))
}
