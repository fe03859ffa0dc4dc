//! Kernel features the datapath needs, probed at start before anything is
//! loaded or attached: each is looked up by name in the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux` holds the names of every enum value and
//! function the kernel has), so a missing one is one clear error naming it
//! and the kernel, rather than a program that fails silently later (a
//! missing `BPF_FIB_LOOKUP_SRC` would make every SNAT and NodePort reply
//! fail without a word).
use crate::error::{Error, Result};

/// One feature: what it is, what needs it, from which Linux, and the BTF
/// name that shows the kernel has it.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    pub name: &'static str,
    pub needed_for: &'static str,
    pub since: &'static str,
    btf_name: &'static str,
    pub required: Need,
}

/// When a feature is required.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Always,
    /// Only with socket-level balancing on.
    SocketLb,
    /// Optional: a warning and that part off.
    Optional,
}

pub const FEATURES: [Feature; 5] = [
    Feature {
        name: "TCX (BPF_TCX_INGRESS)",
        needed_for: "attaching the TC programs",
        since: "6.6",
        btf_name: "BPF_TCX_INGRESS",
        required: Need::Always,
    },
    Feature {
        name: "bpf_fib_lookup with BPF_FIB_LOOKUP_SRC",
        needed_for: "SNAT to remote backends and NodePort replies",
        since: "6.7",
        btf_name: "BPF_FIB_LOOKUP_SRC",
        required: Need::Always,
    },
    Feature {
        name: "cgroup getpeername4/6 and recvmsg4/6 hooks",
        needed_for: "socket-level load balancing (--socket-lb off runs without it)",
        since: "5.8",
        btf_name: "BPF_CGROUP_INET4_GETPEERNAME",
        required: Need::SocketLb,
    },
    Feature {
        name: "bpf_get_netns_cookie for sock_addr (SO_NETNS_COOKIE)",
        needed_for: "--socket-lb host-only",
        since: "5.14",
        btf_name: "bpf_get_netns_cookie_sock_addr",
        required: Need::Optional,
    },
    Feature {
        name: "bpf_sock_destroy kfunc",
        needed_for: "destroying connected UDP sockets of removed endpoints",
        since: "6.5",
        btf_name: "bpf_sock_destroy",
        required: Need::Optional,
    },
];

/// Whether the BTF blob names `name` (as a whole NUL-terminated string).
#[must_use]
pub fn btf_has(btf: &[u8], name: &str) -> bool {
    let mut needle = Vec::with_capacity(name.len() + 2);
    needle.push(0);
    needle.extend_from_slice(name.as_bytes());
    needle.push(0);
    btf.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// The features this kernel lacks, from its BTF.
pub fn missing(btf: &[u8]) -> Vec<Feature> {
    FEATURES.into_iter().filter(|f| !btf_has(btf, f.btf_name)).collect()
}

/// Probes the running kernel: an error naming the first required feature
/// it lacks (with `socket_lb` whether socket-level balancing is on), else
/// the optional ones it lacks.
pub fn probe(socket_lb: bool) -> Result<Vec<Feature>> {
    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
    let kernel = super::kernel_release();
    let btf = std::fs::read(VMLINUX).map_err(|e| Error::KernelFeature {
        feature: "BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF)",
        needed_for: "loading the programs (their maps carry BTF) and probing the kernel",
        kernel: kernel.clone(),
        source: Box::new(e),
    })?;
    let mut optional = Vec::new();
    for f in missing(&btf) {
        let required = f.required == Need::Always || (f.required == Need::SocketLb && socket_lb);
        if required {
            return Err(Error::KernelFeature {
                feature: f.name,
                needed_for: f.needed_for,
                kernel,
                source: format!("not in the kernel's BTF: Linux {} or later is needed", f.since).into(),
            });
        }
        if f.required == Need::Optional {
            optional.push(f);
        }
    }
    Ok(optional)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_matched_whole() {
        let btf = b"\0BPF_TCX_INGRESS\0BPF_FIB_LOOKUP_SRC_X\0bpf_sock_destroy\0";
        assert!(btf_has(btf, "BPF_TCX_INGRESS"));
        assert!(!btf_has(btf, "BPF_FIB_LOOKUP_SRC"), "a longer name is another name");
        assert!(!btf_has(btf, "TCX_INGRESS"));
        let names: Vec<&str> = missing(btf).iter().map(|f| f.name).collect();
        assert!(names.contains(&"bpf_fib_lookup with BPF_FIB_LOOKUP_SRC"), "{names:?}");
        assert!(!names.contains(&"bpf_sock_destroy kfunc"), "{names:?}");
    }

    #[test]
    fn this_kernel_has_every_required_feature() {
        let optional = probe(true).expect("the test machines run a kernel with every required feature");
        assert!(optional.iter().all(|f| f.required == Need::Optional));
    }
}
