//! A cgroup v2 directory of the test's own (under the machine's cgroup v2
//! root, never the root itself) for the socket programs, and node-local
//! client processes started inside it. Removed on drop, with whatever still
//! runs in it killed first.
use std::{
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::netns::{Netns, unique_name};

pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Makes `<cgroup2 root>/proxy-test-<unique>`.
    #[must_use]
    pub fn create(prefix: &str) -> Self {
        let root = proxy_agent::datapath::cgroup2_root().expect("a cgroup v2 file system (see /proc/mounts)");
        let path = root.join(format!("proxy-test-{}", unique_name(prefix)));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// A guard that owns nothing (removes nothing on drop).
    #[must_use]
    pub fn detached() -> Self {
        Self { path: PathBuf::new() }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `program args...` run with nsenter in `ns`, as a process of this
    /// cgroup (it moves itself in before exec, so its sockets are the socket
    /// programs' from the first syscall).
    #[must_use]
    pub fn command(&self, ns: &Netns, program: &Path, args: &[&str]) -> Command {
        let procs = self.path.join("cgroup.procs");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path())).arg(program).args(args);
        // SAFETY: the closure only opens and writes a file (async-signal-safe
        // system calls) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process (cgroup v2).
                std::fs::OpenOptions::new().write(true).open(&procs)?.write_all(b"0")
            });
        }
        cmd
    }

    /// Pids in the cgroup.
    #[must_use]
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        // cgroup.kill (5.14) SIGKILLs everything left in it.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let start = Instant::now();
        while std::fs::remove_dir(&self.path).is_err() && start.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
