//! Socket-level load balancing: the cgroup v2 directory the programs attach
//! to (`--cgroup`, default the cgroup v2 root), the attach itself (pinned
//! links, swapped in place on restart), and the settings the programs read.
use std::{
    fs::{self, File},
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use proxy_common::sock::{CONFIG_MAP, Config, SOCK_LB_ALL, SOCK_LB_HOST_ONLY, SOCK_LB_OFF};
use tracing::{info, warn};

use super::detach_pinned_link;
use crate::{
    error::{Error, Result},
    pins::{Pins, SOCK_LINK_PREFIX, SockHook},
};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// `--socket-lb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLb {
    /// Every socket in the cgroup (pods, hostNetwork pods, node processes).
    All,
    /// Only sockets in the host network namespace (the agent's); pods keep
    /// the per-packet path (service meshes that need the `ClusterIP` in pods).
    HostOnly,
    /// No socket-level balancing: the per-packet path carries everything.
    Off,
}

impl SocketLb {
    fn mode(self) -> u32 {
        match self {
            Self::All => SOCK_LB_ALL,
            Self::HostOnly => SOCK_LB_HOST_ONLY,
            Self::Off => SOCK_LB_OFF,
        }
    }
}

/// The cgroup v2 mount point from a `/proc/mounts` text: `/sys/fs/cgroup`
/// on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
#[must_use]
pub fn cgroup2_root_in(mounts: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, at, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(at.replace("\\040", " ")))
        })
        .collect();
    // The shortest path is the host's root (a container may show nested ones).
    found.sort_by_key(|p| p.as_os_str().len());
    found.into_iter().next()
}

/// The default `--cgroup`: the cgroup v2 root of this machine.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(Error::io("read", "/proc/mounts"))?;
    cgroup2_root_in(&mounts).ok_or_else(|| Error::Cgroup {
        path: PathBuf::from("(default)"),
        reason: "no cgroup2 file system is mounted (see /proc/mounts); mount one or use --socket-lb off".to_owned(),
    })
}

/// Opens `dir` after checking that it is a directory on a cgroup v2 file
/// system. Returns the open directory and its inode (the cgroup id).
pub fn open_cgroup(dir: &Path) -> Result<(File, u64)> {
    let bad = |reason: String| Error::Cgroup { path: dir.to_owned(), reason };
    let meta = fs::metadata(dir).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".to_owned()));
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| bad("path has a NUL byte".to_owned()))?;
    // SAFETY: statfs writes into the zeroed struct we own.
    let magic = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &raw mut st) != 0 {
            return Err(bad(std::io::Error::last_os_error().to_string()));
        }
        st.f_type
    };
    if magic != CGROUP2_SUPER_MAGIC {
        return Err(bad(format!(
            "not a cgroup v2 directory (file system magic {magic:#x}; cgroup v1 hierarchies cannot take socket programs)"
        )));
    }
    let file = File::open(dir).map_err(|e| bad(e.to_string()))?;
    Ok((file, meta.ino()))
}

/// This network namespace's cookie (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).expect("8 fits");
    // SAFETY: getsockopt into a u64 we own, with its size.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Writes the settings the socket programs read.
pub(super) fn write_config(ebpf: &mut Ebpf, mode: SocketLb) -> Result<()> {
    let map_err = |op| move |source| Error::Map { name: CONFIG_MAP, op, source };
    // Also used with `all`: a LoadBalancer frontend with source ranges is
    // translated at connect() only for host sockets.
    let cookie = match netns_cookie() {
        Ok(c) => c,
        Err(e) if mode == SocketLb::HostOnly => {
            return Err(Error::KernelFeature {
                feature: "SO_NETNS_COOKIE",
                needed_for: "--socket-lb host-only",
                kernel: kernel_release(),
                source: Box::new(e),
            });
        }
        Err(_) => 0,
    };
    let map = ebpf.map_mut(CONFIG_MAP).ok_or(Error::MissingMap { name: CONFIG_MAP })?;
    let mut arr: Array<&mut MapData, Config> = Array::try_from(map).map_err(map_err("open"))?;
    let cfg = Config { host_netns_cookie: cookie, socket_lb: mode.mode(), _pad: 0 };
    arr.set(0, cfg, 0).map_err(map_err("update"))
}

/// `uname -r`, for error messages.
#[must_use]
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "?".to_owned(), |s| s.trim().to_owned())
}

fn sock_program(ebpf: &mut Ebpf, hook: SockHook) -> Result<&mut CgroupSockAddr> {
    let name = hook.program();
    ebpf.program_mut(name)
        .ok_or(Error::MissingMap { name })?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// Loads the socket programs; a kernel that refuses one is named in the error.
pub(super) fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    for hook in SockHook::ALL {
        sock_program(ebpf, hook)?.load().map_err(|e| Error::KernelFeature {
            feature: hook.name(),
            needed_for: "socket-level load balancing (use --socket-lb off to run without it)",
            kernel: kernel_release(),
            source: Box::new(e),
        })?;
    }
    Ok(())
}

/// Attaches every socket hook to the cgroup (or adopts the pinned links of
/// an earlier run, swapping the new program in with `BPF_LINK_UPDATE`: the
/// same link, no moment without translation), then detaches links pinned
/// for another cgroup. On failure, what this call attached is detached
/// again: nothing is left half-attached.
pub(super) fn attach(ebpf: &mut Ebpf, pins: &Pins, cgroup: &Path) -> Result<()> {
    let (dir, ino) = open_cgroup(cgroup)?;
    let mut made: Vec<PathBuf> = Vec::new();
    let res = (|| -> Result<()> {
        for hook in SockHook::ALL {
            let pin = pins.sock_link(hook, ino);
            let prog = sock_program(ebpf, hook)?;
            let name = hook.program();
            if pin.exists() {
                let fd = prog.fd().map_err(|source| Error::Program { name, source })?;
                update_pinned_link(&pin, fd.as_fd().as_raw_fd()).map_err(|e| Error::Link { path: pin.clone(), source: Box::new(e) })?;
                continue;
            }
            let id = prog.attach(dir.as_fd(), CgroupAttachMode::Single).map_err(|e| Error::KernelFeature {
                feature: hook.name(),
                needed_for: "socket-level load balancing (use --socket-lb off to run without it)",
                kernel: kernel_release(),
                source: Box::new(e),
            })?;
            let link = prog.take_link(id).map_err(|source| Error::Program { name, source })?;
            let fd_link = FdLink::try_from(link).map_err(|e| Error::Link { path: pin.clone(), source: Box::new(e) })?;
            fd_link.pin(&pin).map_err(|e| Error::Link { path: pin.clone(), source: Box::new(e) })?;
            made.push(pin);
        }
        Ok(())
    })();
    if let Err(e) = res {
        for pin in made {
            let _ = detach_pinned_link(&pin);
            let _ = fs::remove_file(&pin);
        }
        return Err(e);
    }
    let keep: Vec<PathBuf> = SockHook::ALL.iter().map(|h| pins.sock_link(*h, ino)).collect();
    detach_sock_links(pins, |p| !keep.iter().any(|k| k == p));
    info!(cgroup = %cgroup.display(), hooks = ?SockHook::ALL.map(SockHook::name), "socket-level load balancing attached");
    Ok(())
}

/// Detaches and unpins the socket links for which `which` holds.
pub(super) fn detach_sock_links(pins: &Pins, which: impl Fn(&Path) -> bool) {
    let Ok(entries) = fs::read_dir(pins.links_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(SOCK_LINK_PREFIX) && which(&path) {
            if let Err(e) = detach_pinned_link(&path) {
                warn!(link = %path.display(), error = %e, "BPF_LINK_DETACH failed; unpinning anyway");
            }
            let _ = fs::remove_file(&path);
            info!(link = %path.display(), "socket-LB link detached");
        }
    }
}

/// Replaces the program of a pinned link (`BPF_LINK_UPDATE`; aya 0.14 has
/// no call for cgroup links): atomic, the link and its id stay.
fn update_pinned_link(path: &Path, new_prog_fd: i32) -> std::io::Result<()> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let mut attr = [0u64; 8];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: bpf(2) with a zeroed attr larger than the command reads.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // link_update { u32 link_fd; u32 new_prog_fd; u32 flags; u32 old_prog_fd; }
    let mut attr = [0u32; 16];
    attr[0] = fd.unsigned_abs();
    attr[1] = new_prog_fd.unsigned_abs();
    // SAFETY: as above; the fd is ours and closed right after.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd BPF_OBJ_GET gave us.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_root_is_found_on_unified_and_hybrid_hosts() {
        let unified = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(cgroup2_root_in(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_root_in(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_root_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"), None);
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_refused_by_name() {
        let err = open_cgroup(Path::new("/tmp")).expect_err("/tmp is not a cgroup");
        let text = err.to_string();
        assert!(text.contains("/tmp") && text.contains("not a cgroup v2 directory"), "{text}");
        let err = open_cgroup(Path::new("/nonexistent-cgroup-dir")).expect_err("missing dir");
        assert!(matches!(err, Error::Cgroup { .. }), "{err:?}");
    }
}
