//! Test support shared by the integration tests, the demo and the benchmark:
//! network-namespace sandboxes with RAII cleanup, in-process servers and
//! clients that run inside a namespace, the agent as a child process, and a
//! packet builder for `BPF_PROG_TEST_RUN` tests.
pub mod agent;
pub mod apiserver;
pub mod cgroup;
pub mod client;
pub mod fuzz;
pub mod cluster;
pub mod flood;
pub mod load;
pub mod manifests;
pub mod netns;
pub mod overlay;
pub mod packet;
pub mod packet6;
pub mod sandbox;
pub mod sctp;
pub mod servers;
pub mod xdpwire;
pub mod bench;

/// `address:port` of the backends programmed for `vip:port`, in slot order.
#[must_use]
pub fn inspect_backends(view: &[proxy_agent::inspect::FrontendView], vip: std::net::Ipv4Addr, port: u16) -> Vec<String> {
    let mut v: Vec<String> = view
        .iter()
        .find(|f| f.address == vip.to_string() && f.port == port)
        .map(|f| f.backends.iter().map(|b| format!("{}:{}", b.address, b.port)).collect())
        .unwrap_or_default();
    v.sort();
    v
}
