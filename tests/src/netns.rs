//! Network namespaces with RAII cleanup, and running code inside one.
use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (cargo xtask setup installs the tools)"));
    assert!(
        out.status.success(),
        "{cmd} {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS...`
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// A name unique to this process and call, short enough for netns and
/// bpffs paths: `<prefix><pid>x<n>`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A network namespace deleted on drop (even when the test panics).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    #[must_use] 
    pub fn create(name: &str) -> Self {
        ip(&["netns", "add", name]);
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A guard that owns nothing (deletes nothing on drop).
    #[must_use]
    pub fn detached() -> Self {
        Self { name: String::new() }
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        run("ip", &["netns", "exec", &self.name, "sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it
    /// creates live in the namespace.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// Runs `f` inside the namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a namespace fd we own; affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Fails loudly when not root: these tests never pass by skipping.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert!(uid == 0, "this test needs root (network namespaces, BPF); run it via `sudo cargo xtask test`");
}
