//! Path MTU through a `NodePort`, on two nodes: the link between the nodes
//! (`nodelink`, as with a tunnel) has a smaller MTU (1280) than the
//! client's leg (1500). A flow to a backend on node B leaves node A by the
//! FIB redirect, which bypasses the stack's forwarding, so the datapath
//! itself must answer a packet with DF that does not fit with ICMP
//! fragmentation needed — from the frontend the client targeted, quoting
//! what the client sent — or the client's path-MTU discovery never learns
//! and a TCP upload stalls. The agent runs on node A only.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{agent_bin, wait_programmed},
    cluster::{Cluster, NODE_A_IP, NODE_A_LINK_IP, Seen, pod_ip_a, pod_ip_b},
    manifests::write_atomic,
    netns::Netns,
};

const T: Duration = Duration::from_secs(2);
/// The MTU of the link between the nodes; the client's legs keep 1500.
const LINK_MTU: u16 = 1280;
/// The `NodePort` of the Service whose only backend is on node B (TCP, UDP).
const REMOTE_TCP: u16 = 30090;
const REMOTE_UDP: u16 = 30053;
/// The `NodePort` of the Service whose only backend is on node A.
const LOCAL_TCP: u16 = 30091;
/// The pods' upload sink (TCP) and UDP peer echo.
const SINK_PORT: u16 = 9000;
const UDP_PORT: u16 = 5353;
/// Bytes uploaded over TCP.
const UPLOAD: usize = 200 * 1024;
/// How long an upload may take before it counts as stalled.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Service `remote` (its one endpoint on node B: TCP 9000 as nodePort
/// 30090, UDP 53→5353 as nodePort 30053) and Service `local` (its one
/// endpoint on node A: TCP 9000 as nodePort 30091).
fn services() -> String {
    let (b1, a1) = (pod_ip_b(1), pod_ip_a(1));
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: remote, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  ports:
  - {{name: up, port: {SINK_PORT}, targetPort: {SINK_PORT}, nodePort: {REMOTE_TCP}, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: {UDP_PORT}, nodePort: {REMOTE_UDP}, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote-1
  namespace: default
  labels: {{kubernetes.io/service-name: remote}}
addressType: IPv4
ports: [{{name: up, port: {SINK_PORT}, protocol: TCP}}, {{name: dns, port: {UDP_PORT}, protocol: UDP}}]
endpoints:
- {{addresses: [\"{b1}\"], nodeName: node-b}}
---
apiVersion: v1
kind: Service
metadata: {{name: local, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.21
  ports:
  - {{name: up, port: {SINK_PORT}, targetPort: {SINK_PORT}, nodePort: {LOCAL_TCP}, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-1
  namespace: default
  labels: {{kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{{name: up, port: {SINK_PORT}, protocol: TCP}}]
endpoints:
- {{addresses: [\"{a1}\"], nodeName: node-a}}
"
    )
}

/// A TCP server that reads each connection to its end and answers with
/// the number of bytes it got; stopped (thread joined) on drop.
struct Sink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sink(ns: &Netns, port: u16) -> Sink {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = ns.spawn(move || {
        let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).expect("bind sink");
        listener.set_nonblocking(true).expect("nonblocking");
        ready_tx.send(()).expect("ready");
        while !s.load(Ordering::Relaxed) {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            let mut got = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            while !s.load(Ordering::Relaxed) {
                match conn.read(&mut buf) {
                    Ok(0) => {
                        let _ = conn.write_all(format!("{got}\n").as_bytes());
                        break;
                    }
                    Ok(n) => got += n,
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(_) => break,
                }
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("sink did not start");
    Sink { stop, thread: Some(thread) }
}

/// The cluster (one pod per node), UDP peer echo and the sink in both
/// pods, the services written, `nodelink` at [`LINK_MTU`] on both nodes.
/// The agent is not started yet.
fn cluster(prefix: &str) -> (Cluster, Vec<Sink>) {
    let mut c = Cluster::new(prefix, 1, 1);
    c.serve_udp_peer(UDP_PORT);
    let sinks = c.pods().map(|p| sink(&p.ns, SINK_PORT)).collect();
    for ns in [&c.a.ns, &c.b.ns] {
        ns.ip(&["link", "set", "nodelink", "mtu", &LINK_MTU.to_string()]);
    }
    write_atomic(&c.manifests, "svc.yaml", &services());
    (c, sinks)
}

fn wait_node_ports(c: &Cluster) {
    wait_programmed(&c.a.bpffs, Duration::from_secs(20), "the three NodePorts with backends", |v| {
        let node_a = NODE_A_IP.to_string();
        [REMOTE_TCP, REMOTE_UDP, LOCAL_TCP]
            .iter()
            .all(|port| v.iter().any(|f| f.kind == "NodePort" && f.address == node_a && f.port == *port && !f.backends.is_empty()))
    });
}


/// `size_of::<T>()` as a `socklen_t`.
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).expect("small type")
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt on a socket we own with an int option.
    let rc = unsafe { libc::setsockopt(fd, level, name, (&raw const value).cast(), socklen::<libc::c_int>()) };
    assert_eq!(rc, 0, "setsockopt {level}/{name}: {}", std::io::Error::last_os_error());
}

/// The path MTU the kernel holds for a connected socket (`IP_MTU`).
fn path_mtu(fd: RawFd) -> i32 {
    let mut mtu: libc::c_int = 0;
    let mut len = socklen::<libc::c_int>();
    // SAFETY: getsockopt into an int we own.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_IP, libc::IP_MTU, (&raw mut mtu).cast(), &raw mut len) };
    if rc == 0 { mtu } else { -1 }
}

/// One ICMP error as the socket's error queue (`IP_RECVERR`) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IcmpError {
    errno: u32,
    icmp_type: u8,
    code: u8,
    /// The next-hop MTU for fragmentation needed.
    info: u32,
    /// The ICMP error's source address.
    offender: Ipv4Addr,
    /// The destination quoted in the error: the packet as the client sent it.
    quoted_dst: SocketAddrV4,
}

/// Reads one error from the socket's error queue without blocking.
fn read_error_queue(fd: RawFd) -> Option<IcmpError> {
    let mut data = [0u8; 2048];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: plain C structs, valid when zeroed.
    let mut name: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 64];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = socklen::<libc::sockaddr_in>();
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: every buffer msg points to lives until the call returns.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        return None;
    }
    let quoted_dst = SocketAddrV4::new(Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)), u16::from_be(name.sin_port));
    // SAFETY: walking the control messages the kernel just wrote into
    // `control`, with the libc macros; reads are unaligned-safe.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_RECVERR {
                // Only ever read with read_unaligned.
                #[allow(clippy::cast_ptr_alignment)]
                let ee_ptr = libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>();
                let ee = std::ptr::read_unaligned(ee_ptr);
                let off = std::ptr::read_unaligned(libc::SO_EE_OFFENDER(ee_ptr).cast::<libc::sockaddr_in>());
                if ee.ee_origin == libc::SO_EE_ORIGIN_ICMP {
                    return Some(IcmpError {
                        errno: ee.ee_errno,
                        icmp_type: ee.ee_type,
                        code: ee.ee_code,
                        info: ee.ee_info,
                        offender: Ipv4Addr::from(u32::from_be(off.sin_addr.s_addr)),
                        quoted_dst,
                    });
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    None
}

/// From the client: a connected UDP socket to `to` with DF on every
/// datagram (`IP_PMTUDISC_DO`) and `IP_RECVERR`; sends a `size`-byte
/// datagram (every 100 ms, at most 5 s) until an ICMP error comes back.
/// Returns the error, the socket's path MTU after it, and what a second
/// send of `size` bytes then gives.
fn udp_too_big(c: &Cluster, to: SocketAddrV4, size: usize) -> (Option<IcmpError>, i32, std::io::Result<usize>) {
    c.client.run(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.connect(to).expect("connect");
        let fd = sock.as_raw_fd();
        set_int(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO);
        set_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
        let big = vec![b'x'; size];
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut err = None;
        while err.is_none() && Instant::now() < deadline {
            // Once the path MTU is learned the send fails locally (EMSGSIZE).
            let _ = sock.send(&big);
            std::thread::sleep(Duration::from_millis(100));
            err = read_error_queue(fd);
        }
        let mtu = path_mtu(fd);
        (err, mtu, sock.send(&big))
    })
}

/// From the client: a `size`-byte datagram without DF (`IP_PMTUDISC_DONT`)
/// to `to`; returns what came back within a second: an answer, an ICMP
/// error (`IP_RECVERR`).
fn udp_no_df(c: &Cluster, to: SocketAddrV4, size: usize) -> (Option<String>, Option<IcmpError>) {
    c.client.run(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.connect(to).expect("connect");
        let fd = sock.as_raw_fd();
        set_int(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT);
        set_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
        sock.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
        sock.send(&vec![b'n'; size]).expect("send");
        let mut buf = [0u8; 4096];
        let answer = sock.recv(&mut buf).ok().map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
        (answer, read_error_queue(fd))
    })
}

/// A `size`-byte datagram (DF set) to `to` from a fresh socket, and the
/// peer echo's answer.
fn udp_fits(c: &Cluster, to: SocketAddrV4, size: usize) -> std::io::Result<Seen> {
    c.client.run(move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(to)?;
        set_int(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO);
        sock.set_read_timeout(Some(T))?;
        sock.send(&vec![b'y'; size])?;
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf)?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        Seen::parse(&text).ok_or_else(|| std::io::Error::other(format!("bad answer {text:?}")))
    })
}

/// From the client: uploads [`UPLOAD`] bytes over TCP to `to`, half-closes
/// and reads the sink's count. Returns the count and the connection's path
/// MTU at the end. Every step is bounded by [`UPLOAD_TIMEOUT`].
fn upload(c: &Cluster, to: SocketAddrV4) -> std::io::Result<(usize, i32)> {
    c.client.run(move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(to), T)?;
        s.set_write_timeout(Some(UPLOAD_TIMEOUT))?;
        s.set_read_timeout(Some(UPLOAD_TIMEOUT))?;
        let data: Vec<u8> = (0..=250u8).cycle().take(UPLOAD).collect();
        s.write_all(&data)?;
        s.shutdown(Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let got = out.trim().parse().map_err(|_| std::io::Error::other(format!("bad sink answer {out:?}")))?;
        Ok((got, path_mtu(s.as_raw_fd())))
    })
}

/// A DF datagram too big for the node link, to a `NodePort` whose backend is
/// on node B: the client gets fragmentation needed with MTU 1280, from the
/// node address it targeted, quoting the datagram it sent (to the
/// `NodePort`, not the pod); its socket learns the path MTU, and a datagram
/// that fits then gets through. The same datagram without DF is dropped and
/// counted (a translated, redirected packet is not fragmented), with no
/// error sent.
#[test]
fn df_datagram_too_big_for_the_node_link_gets_fragmentation_needed_from_the_node_port() {
    let (mut c, _sinks) = cluster("mtu");
    c.start_agent_a(&agent_bin(), &[]);
    wait_node_ports(&c);
    let to = SocketAddrV4::new(NODE_A_IP, REMOTE_UDP);
    let small = udp_fits(&c, to, 100).unwrap_or_else(|e| panic!("small datagram: {e}\n{}", c.a.agent_log()));
    assert_eq!((small.pod.as_str(), small.peer_ip()), ("pod-b1", NODE_A_LINK_IP), "{small:?}");

    // First without DF, while the client still assumes 1500 (once it has
    // learned 1280 it would fragment the datagram itself).
    assert_eq!(udp_no_df(&c, to, 1400), (None, None), "a non-DF datagram too big for the node link");
    assert!(c.a.stat("drop_too_big") > 0);
    assert_eq!(c.a.stat("icmp_frag_needed"), 0);

    let (err, mtu, again) = udp_too_big(&c, to, 1400);
    let err = err.unwrap_or_else(|| panic!("no ICMP error for a 1400-byte DF datagram\n{}", c.a.agent_log()));
    assert_eq!(
        err,
        IcmpError {
            errno: libc::EMSGSIZE as u32,
            icmp_type: 3,
            code: 4,
            info: u32::from(LINK_MTU),
            offender: NODE_A_IP,
            quoted_dst: to,
        }
    );
    assert_eq!(mtu, i32::from(LINK_MTU), "the socket's path MTU");
    let again = again.expect_err("a 1400-byte DF datagram after the path MTU is learned");
    assert_eq!(again.raw_os_error(), Some(libc::EMSGSIZE), "{again}");
    assert!(c.a.stat("icmp_frag_needed") > 0);

    // 1200 bytes fit the node link: through to node B and answered.
    let s = udp_fits(&c, to, 1200).unwrap_or_else(|e| panic!("1200-byte datagram: {e}\n{}", c.a.agent_log()));
    assert_eq!((s.pod.as_str(), s.peer_ip(), s.payload.len()), ("pod-b1", NODE_A_LINK_IP, 1200), "{:?}", s.pod);
}

/// A TCP upload through a `NodePort` to the backend on node B: the
/// client's full-sized segments (GSO super-packets on the veth) do not fit
/// the node link; fragmentation needed makes it lower its MSS and the
/// upload completes instead of stalling.
#[test]
fn tcp_upload_to_a_remote_backend_through_a_node_port_completes_over_a_smaller_node_link() {
    let (mut c, _sinks) = cluster("mtt");
    c.start_agent_a(&agent_bin(), &[]);
    wait_node_ports(&c);
    let (got, mtu) = upload(&c, SocketAddrV4::new(NODE_A_IP, REMOTE_TCP))
        .unwrap_or_else(|e| panic!("upload to the remote backend stalled: {e}\n{}", c.a.agent_log()));
    assert_eq!(got, UPLOAD);
    assert_eq!(mtu, i32::from(LINK_MTU), "the connection's path MTU");
    assert!(c.a.stat("icmp_frag_needed") > 0, "the upload never needed fragmentation-needed");
    assert_eq!(c.a.stat("drop_too_big"), 0, "TCP sets DF: nothing is dropped");
}

/// The same upload to a backend on node A: the packet is not redirected
/// (DNAT only), so the stack forwards it. With the node side of the pod's
/// link also at 1280, the stack's own fragmentation needed (quoting the
/// translated packet) is translated back by the TC egress program.
#[test]
fn tcp_upload_to_a_local_backend_through_a_node_port_completes() {
    let (mut c, _sinks) = cluster("mtl");
    c.start_agent_a(&agent_bin(), &[]);
    wait_node_ports(&c);
    let to = SocketAddrV4::new(NODE_A_IP, LOCAL_TCP);
    let (got, mtu) = upload(&c, to).unwrap_or_else(|e| panic!("upload to the local backend: {e}\n{}", c.a.agent_log()));
    assert_eq!((got, mtu), (UPLOAD, 1500), "nothing smaller on this path yet");

    let veth = c.a.pods[0].veth.clone();
    c.a.ns.ip(&["link", "set", &veth, "mtu", &LINK_MTU.to_string()]);
    let (got, mtu) = upload(&c, to).unwrap_or_else(|e| panic!("upload over the smaller pod link: {e}\n{}", c.a.agent_log()));
    assert_eq!((got, mtu), (UPLOAD, i32::from(LINK_MTU)));
    assert!(c.a.stat("icmp_error_translated") > 0);
    assert_eq!(c.a.stat("icmp_frag_needed"), 0, "the datapath answers only what it redirects");
}

/// With the XDP fast path (generic mode): a packet too big for the route is
/// passed to TC untouched, which answers it; the rest of the flow still
/// goes through XDP.
#[test]
fn xdp_passes_too_big_packets_to_tc_which_answers_them() {
    let (mut c, _sinks) = cluster("mtx");
    c.start_agent_a(&agent_bin(), &["--xdp", "--xdp-mode", "generic"]);
    wait_node_ports(&c);
    assert!(c.a.agent_log().contains("XDP fast path attached"), "{}", c.a.agent_log());
    let to = SocketAddrV4::new(NODE_A_IP, REMOTE_UDP);
    let (err, mtu, _) = udp_too_big(&c, to, 1400);
    let err = err.unwrap_or_else(|| panic!("no ICMP error with XDP\n{}", c.a.agent_log()));
    assert_eq!((err.icmp_type, err.code, err.info, err.offender, err.quoted_dst), (3, 4, u32::from(LINK_MTU), NODE_A_IP, to));
    assert_eq!(mtu, i32::from(LINK_MTU));
    let s = udp_fits(&c, to, 1200).unwrap_or_else(|e| panic!("1200-byte datagram over XDP: {e}"));
    assert_eq!(s.pod, "pod-b1");
    let (got, _) = upload(&c, SocketAddrV4::new(NODE_A_IP, REMOTE_TCP)).unwrap_or_else(|e| panic!("upload with XDP stalled: {e}\n{}", c.a.agent_log()));
    assert_eq!(got, UPLOAD);
    assert!(c.a.stat("xdp_forward") > 0, "nothing went through XDP");
    assert!(c.a.stat("icmp_frag_needed") > 0);
}
