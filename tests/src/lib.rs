//! Test support shared by the integration tests, the demo and the benchmark:
//! network-namespace sandboxes with RAII cleanup, in-process servers and
//! clients that run inside a namespace, the agent as a child process, and a
//! packet builder for `BPF_PROG_TEST_RUN` tests.
pub mod agent;
pub mod client;
pub mod manifests;
pub mod netns;
pub mod packet;
pub mod sandbox;
pub mod servers;
