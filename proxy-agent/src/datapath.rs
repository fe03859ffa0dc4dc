//! The only module that speaks BPF: loads the embedded object, pins maps and
//! links under `--bpffs`, attaches TC programs to devices, and writes the
//! service maps behind the [`ServiceMaps`] trait (which the reconciler uses,
//! and which tests replace with [`FakeMaps`]).
mod cgroup;
mod fake;
mod kfunc;
mod maps;
pub mod migrate;
pub mod probe;

use std::{
    collections::BTreeMap,
    ffi::CStr,
    fs,
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, Xdp,
        xdp::{XdpLink, XdpMode},
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    },
};
use tracing::{info, warn};

pub use self::{
    cgroup::{SocketLb, cgroup2_root, cgroup2_root_in, kernel_release, netns_cookie, open_cgroup},
    fake::FakeMaps,
    maps::{BatchError, BpfMaps, Delete, MapsDump, ServiceMaps, SrcRange, Update, read_stats},
};
use crate::{
    error::{Error, Result},
    pins::{Pins, TcHook, XDP_LINK_PREFIX, XDP_PROG, all_maps},
};

/// The eBPF object this agent was built with (see build.rs), as built.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

/// [`EBPF_OBJECT`] ready to load on this kernel (its kfunc calls patched,
/// see `kfunc`): what the agent and the packet tests load.
#[must_use]
pub fn ebpf_object() -> &'static [u8] {
    kfunc::patched_object(EBPF_OBJECT).0
}

/// The iterator program that destroys translated UDP sockets.
const SOCK_DESTROY_PROG: &str = "proxy_sock_destroy_udp";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A network device in the agent's network namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Device {
    pub name: String,
    pub index: u32,
}

/// Lists the devices of the current network namespace (netlink through
/// `if_nameindex`, not /sys, which may show another namespace).
pub fn list_devices() -> Result<Vec<Device>> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(Error::io("if_nameindex", "")(std::io::Error::last_os_error()));
        }
        let mut out = Vec::new();
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(Device {
                name: CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(),
                index: (*p).if_index,
            });
            p = p.add(1);
        }
        libc::if_freenameindex(head);
        out.sort();
        Ok(out)
    }
}

/// Whether a device has no link-layer header (IPIP, `WireGuard`, GRE, TUN:
/// its packets start with the IP header), from its hardware type
/// (`SIOCGIFHWADDR`): anything but Ethernet and loopback.
#[must_use]
pub fn device_is_l3(name: &str) -> bool {
    use std::os::fd::AsRawFd as _;
    const ARPHRD_ETHER: u16 = 1;
    const ARPHRD_LOOPBACK: u16 = 772;
    let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return false;
    };
    // SAFETY: an all-zero ifreq is valid; the name is copied in bounded.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut ifr) };
    if rc != 0 {
        return false;
    }
    // SAFETY: the kernel filled the hwaddr member of the union.
    let family = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_family };
    family != ARPHRD_ETHER && family != ARPHRD_LOOPBACK
}

/// The driver of a device (`ETHTOOL_GDRVINFO`), e.g. `veth`, `virtio_net`.
#[must_use]
pub fn device_driver(name: &str) -> Option<String> {
    use std::os::fd::AsRawFd as _;
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    // struct ethtool_drvinfo: cmd, then driver[32], version[32], ...
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 164],
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 164] };
    // SAFETY: an all-zero ifreq is valid; the name is copied in bounded.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    ifr.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL fills the drvinfo we own, pointed to by the ifreq.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut ifr) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// An IPv4 address of a device in the current network namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceAddr {
    pub device: String,
    pub addr: std::net::IpAddr,
    pub prefix_len: u8,
}

/// Every IPv4 address and every IPv6 address but link-local ones of the
/// current network namespace, in the kernel's order (a device's primary
/// address first).
pub fn list_addresses() -> Result<Vec<DeviceAddr>> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs allocates a list we walk and free below.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&raw mut head) != 0 {
            return Err(Error::io("getifaddrs", "")(std::io::Error::last_os_error()));
        }
        let mut p = head;
        while !p.is_null() {
            let ifa = &*p;
            let family = if ifa.ifa_addr.is_null() { -1 } else { i32::from((*ifa.ifa_addr).sa_family) };
            let found = if family == libc::AF_INET {
                let sin = ifa.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned();
                let addr = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let prefix_len = if ifa.ifa_netmask.is_null() {
                    32
                } else {
                    let m = ifa.ifa_netmask.cast::<libc::sockaddr_in>().read_unaligned();
                    u8::try_from(u32::from_be(m.sin_addr.s_addr).count_ones()).unwrap_or(32)
                };
                Some((std::net::IpAddr::V4(addr), prefix_len))
            } else if family == libc::AF_INET6 {
                let sin6 = ifa.ifa_addr.cast::<libc::sockaddr_in6>().read_unaligned();
                let addr = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let prefix_len = if ifa.ifa_netmask.is_null() {
                    128
                } else {
                    let m = ifa.ifa_netmask.cast::<libc::sockaddr_in6>().read_unaligned();
                    u8::try_from(u128::from_be_bytes(m.sin6_addr.s6_addr).count_ones()).unwrap_or(128)
                };
                // Link-local addresses serve nothing (and every veth has one).
                (!addr.is_unicast_link_local()).then_some((std::net::IpAddr::V6(addr), prefix_len))
            } else {
                None
            };
            if let Some((addr, prefix_len)) = found {
                out.push(DeviceAddr {
                    device: CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned(),
                    addr,
                    prefix_len,
                });
            }
            p = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// `--devices` patterns (comma-separated globs).
#[derive(Clone, Debug)]
pub struct DeviceSelector {
    patterns: Vec<glob::Pattern>,
}

impl DeviceSelector {
    pub fn parse(list: &str) -> Result<Self> {
        let patterns = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|p| {
                glob::Pattern::new(p).map_err(|source| Error::DevicePattern {
                    pattern: p.to_owned(),
                    source,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { patterns })
    }

    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &raw mut st) == 0 && st.f_type == BPF_FS_MAGIC
    }
}

fn mount_bpffs(at: &Path) -> Result<()> {
    fs::create_dir_all(at).map_err(Error::io("mkdir", at))?;
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: mount(2) with valid NUL-terminated strings.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(Error::Bpffs {
            path: at.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    info!(path = %at.display(), "mounted a bpffs");
    Ok(())
}

/// The conventional bpffs mount point.
const SYS_FS_BPF: &str = "/sys/fs/bpf";

/// Makes sure `root` exists on a bpffs. If no ancestor is one, a bpffs is
/// mounted at `/sys/fs/bpf` when `root` lies below it (the usual layout;
/// some machines boot without it), else on `root` itself.
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    if root.ancestors().any(|a| a.exists() && is_bpffs(a)) {
        return fs::create_dir_all(root).map_err(Error::io("mkdir", root));
    }
    if root.starts_with(SYS_FS_BPF) {
        mount_bpffs(Path::new(SYS_FS_BPF))?;
        return fs::create_dir_all(root).map_err(Error::io("mkdir", root));
    }
    mount_bpffs(root)
}

/// `--xdp-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// Native where the driver carries translated frames correctly, generic
    /// on veth (its peer hands over skbs whose checksum is left to offload,
    /// which native XDP cannot finish, and it takes redirected frames only
    /// with NAPI on): chosen per device, logged.
    Auto,
    /// In the driver; falls back to the TC path where the driver lacks it.
    Native,
    /// Generic (skb) XDP: works on any device, slower than native.
    Generic,
}

/// The loaded programs with their pinned maps and links.
pub struct Datapath {
    ebpf: Ebpf,
    pins: Pins,
    attached: BTreeMap<String, u32>,
    xdp: Option<XdpAttachMode>,
    /// The `iter/udp` socket-destroy program loaded (kernel ≥ 6.5).
    sock_destroy: bool,
}

/// Map capacities set at load (from the flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// `proxy_ct_v2` entries (two per flow).
    pub ct: u32,
    /// `proxy_ct_new_v1` entries.
    pub ct_new: u32,
    /// `--lb-map-max`: the service map's entries (one per frontend plus one
    /// per backend of each frontend) and the backend map's.
    pub lb: u32,
}

impl Datapath {
    /// Loads the embedded object. Maps already pinned under `pins` are
    /// reused with their contents (adoption after a restart); missing ones
    /// are created and pinned.
    pub fn load(pins: &Pins, socket_lb: SocketLb, sizes: MapSizes) -> Result<Self> {
        ensure_bpffs(pins.root())?;
        fs::create_dir_all(pins.links_dir()).map_err(Error::io("mkdir", pins.links_dir()))?;
        let mut loader = EbpfLoader::new();
        for name in all_maps() {
            loader.map_pin_path(name, pins.map(name));
        }
        // Capacities from the flags. A map pinned by an earlier run keeps
        // its size (resizing would drop its entries).
        for (name, entries) in [
            (crate::pins::CT_MAP, sizes.ct),
            (crate::pins::CT_NEW_MAP, sizes.ct_new),
            // The IPv6 conntrack holds as many flows as the IPv4 one.
            (proxy_common::ct::CT6_MAP, sizes.ct),
            (proxy_common::ct::CT6_NEW_MAP, sizes.ct_new),
            (crate::pins::SVC_MAP, sizes.lb),
            (crate::pins::BACKEND_MAP, sizes.lb),
            (proxy_common::svc::SVC6_MAP, sizes.lb),
            (proxy_common::backend::BACKEND6_MAP, sizes.lb),
        ] {
            loader.map_max_entries(name, entries);
            if let Some(cap) = crate::conntrack::pinned_capacity(pins, name).filter(|c| *c != entries) {
                warn!(
                    map = name,
                    pinned = cap,
                    wanted = entries,
                    "the pinned map keeps its size; to resize it run `proxy-agent cleanup` before starting (tracked flows are dropped, Services reprogrammed)"
                );
            }
        }
        let ebpf = loader.load(ebpf_object())?;
        for name in all_maps() {
            if ebpf.map(name).is_none() {
                return Err(Error::MissingMap { name });
            }
        }
        let mut dp = Self {
            ebpf,
            pins: pins.clone(),
            attached: BTreeMap::new(),
            xdp: None,
            sock_destroy: false,
        };
        for hook in TcHook::ALL {
            for name in [hook.program(), hook.program_l3()] {
                dp.program(name)?.load().map_err(|source| Error::Program { name, source })?;
            }
        }
        dp.xdp_program()?.load().map_err(|source| Error::Program { name: XDP_PROG, source })?;
        if socket_lb != SocketLb::Off {
            cgroup::load_programs(&mut dp.ebpf)?;
            dp.sock_destroy = dp.load_sock_destroy();
        }
        cgroup::write_config(&mut dp.ebpf, socket_lb)?;
        // Retired layouts' entries into the new maps, once every program is
        // verified (that takes a while), right before they replace the old
        // ones: the flows the old programs create in between are carried
        // by [`Self::finish_upgrade`], and the fewer the better.
        migrate::copy_all(pins);
        Ok(dp)
    }

    /// Loads the socket-destroy iterator; optional (a warning and connected
    /// UDP sockets keep a removed backend until they reconnect).
    fn load_sock_destroy(&mut self) -> bool {
        let missing = kfunc::patched_object(EBPF_OBJECT).1;
        let res = (|| -> std::result::Result<(), String> {
            if !missing.is_empty() {
                return Err(format!("kfunc(s) {missing:?} not in the kernel's BTF"));
            }
            let btf = aya::Btf::from_sys_fs().map_err(|e| e.to_string())?;
            let prog: &mut aya::programs::Iter = self
                .ebpf
                .program_mut(SOCK_DESTROY_PROG)
                .ok_or("program missing from the object")?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| e.to_string())?;
            prog.load("udp", &btf).map_err(|e| e.to_string())
        })();
        match res {
            Ok(()) => true,
            Err(e) => {
                warn!(
                    kernel = %kernel_release(),
                    error = %e,
                    "bpf_sock_destroy over a UDP socket iterator (Linux 6.5) is not available: a connected UDP socket keeps a removed backend until the application reconnects"
                );
                false
            }
        }
    }

    /// Destroys the connected UDP sockets the socket path translated to one
    /// of `backends` (endpoints that left their Service port; IPv4 and
    /// IPv6), in every network namespace the agent can enter: its own,
    /// `/run/netns/*` and those of `/proc/*/ns/net` (the host's processes
    /// with `hostPID`). Returns how many namespaces were walked.
    pub fn destroy_udp_sockets(&mut self, backends: &[(std::net::IpAddr, u16)]) -> usize {
        use std::io::Read as _;
        if !self.sock_destroy || backends.is_empty() {
            tracing::debug!(enabled = self.sock_destroy, ?backends, "no UDP sockets to destroy");
            return 0;
        }
        let udp = proxy_common::proto::UDP;
        let mut keys: Vec<proxy_common::backend::Backend> = Vec::new();
        let mut keys6: Vec<proxy_common::backend::Backend6> = Vec::new();
        for (a, p) in backends {
            match a {
                std::net::IpAddr::V4(a) => keys.push(proxy_common::backend::Backend { addr_be: u32::from(*a).to_be(), port_be: p.to_be(), proto: udp, flags: 0 }),
                std::net::IpAddr::V6(a) => keys6.push(proxy_common::backend::Backend6 { addr: a.octets(), port_be: p.to_be(), proto: udp, flags: 0 }),
            }
        }
        let (name, name6) = (proxy_common::sock::SOCK_DESTROY_MAP, proxy_common::sock::SOCK_DESTROY6_MAP);
        if !list_for_destruction(&mut self.ebpf, name, &keys, true) || !list_for_destruction(&mut self.ebpf, name6, &keys6, true) {
            list_for_destruction(&mut self.ebpf, name, &keys, false);
            return 0;
        }
        let mut walked = 0;
        if let Some(prog) = self.ebpf.program_mut(SOCK_DESTROY_PROG)
            && let Ok(prog) = <&mut aya::programs::Iter>::try_from(prog)
        {
            for ns in network_namespaces() {
                let link = match prog.attach().and_then(|id| prog.take_link(id)) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!(error = %e, "cannot create a socket iterator");
                        break;
                    }
                };
                // The iterator walks the namespace of the thread that
                // creates it: a thread of its own enters `ns` first.
                let own = ns == Path::new(OWN_NETNS);
                let ok = std::thread::spawn(move || -> bool {
                    use std::os::fd::AsRawFd as _;
                    // The agent's own namespace needs no setns (which would
                    // need CAP_SYS_ADMIN); others do.
                    if !own {
                        let Ok(f) = fs::File::open(&ns) else { return false };
                        // SAFETY: setns on an fd we own, for this thread only.
                        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return false;
                        }
                    }
                    let Ok(mut file) = link.into_file() else { return false };
                    file.read_to_end(&mut Vec::new()).is_ok()
                })
                .join()
                .unwrap_or(false);
                walked += usize::from(ok);
            }
        }
        list_for_destruction(&mut self.ebpf, name, &keys, false);
        list_for_destruction(&mut self.ebpf, name6, &keys6, false);
        info!(backends = ?backends, namespaces = walked, "destroyed connected UDP sockets of removed endpoints");
        walked
    }

    /// Attaches the socket-level load balancer to the cgroup v2 directory
    /// `cgroup` (adopting the links of an earlier run), or, with `None`
    /// (`--socket-lb off`), detaches any an earlier run left.
    pub fn sync_socket_lb(&mut self, cgroup: Option<&Path>) -> Result<()> {
        if let Some(dir) = cgroup {
            return cgroup::attach(&mut self.ebpf, &self.pins, dir);
        }
        cgroup::detach_sock_links(&self.pins, |_| true);
        Ok(())
    }

    /// Also attach the XDP fast path to the devices (`--xdp`).
    pub fn enable_xdp(&mut self, mode: XdpAttachMode) {
        self.xdp = Some(mode);
    }

    fn xdp_program(&mut self) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(XDP_PROG)
            .ok_or(Error::MissingMap { name: XDP_PROG })?
            .try_into()
            .map_err(|source| Error::Program { name: XDP_PROG, source })
    }

    /// Attaches (or adopts) the XDP program on one device. A driver without
    /// native XDP is reported and left to the TC path.
    fn attach_xdp(&mut self, dev: &Device, mode: XdpAttachMode) -> Result<bool> {
        let pin = self.pins.xdp_link(&dev.name, dev.index);
        let link_err = |path: &Path| {
            let path = path.to_owned();
            move |e: Box<dyn std::error::Error + Send + Sync>| Error::Link { path, source: e }
        };
        let prog = self.xdp_program()?;
        if pin.exists() {
            let pinned = PinnedLink::from_pin(&pin).map_err(|e| link_err(&pin)(Box::new(e)))?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| link_err(&pin)(Box::new(e)))?;
            let id = prog.attach_to_link(link).map_err(|source| Error::Program { name: XDP_PROG, source })?;
            let _ = prog.take_link(id);
            return Ok(true);
        }
        let flags = match mode {
            XdpAttachMode::Native => XdpMode::Driver,
            XdpAttachMode::Generic => XdpMode::Skb,
            XdpAttachMode::Auto => {
                let driver = device_driver(&dev.name);
                if driver.as_deref() == Some("veth") {
                    info!(device = %dev.name, "veth: XDP in generic mode (native XDP cannot finish a veth peer's offloaded checksums; --xdp-mode native forces it)");
                    XdpMode::Skb
                } else {
                    XdpMode::Driver
                }
            }
        };
        let id = prog.attach(&dev.name, flags).map_err(|source| Error::Program { name: XDP_PROG, source })?;
        let link = prog.take_link(id).map_err(|source| Error::Program { name: XDP_PROG, source })?;
        let fd_link = FdLink::try_from(link).map_err(|e| link_err(&pin)(Box::new(e)))?;
        fd_link.pin(&pin).map_err(|e| link_err(&pin)(Box::new(e)))?;
        Ok(false)
    }

    /// Takes the service maps out of the object for the reconciler.
    /// After the programs are attached: carries the entries retired maps
    /// got meanwhile and unpins them ([`migrate`]).
    pub fn finish_upgrade(&self) {
        migrate::finish(&self.pins);
    }

    pub fn take_maps(&mut self) -> Result<BpfMaps> {
        BpfMaps::take(&mut self.ebpf)
    }

    fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(name)
            .ok_or(Error::MissingMap { name })?
            .try_into()
            .map_err(|source| Error::Program { name, source })
    }

    /// Attaches TC ingress to every present device matching `selector` that
    /// is not attached yet, and forgets devices that are gone. Returns the
    /// names newly attached. A device that fails is logged and retried on
    /// the next call.
    pub fn sync_devices(&mut self, selector: &DeviceSelector) -> Result<Vec<String>> {
        let devices: Vec<Device> = list_devices()?
            .into_iter()
            .filter(|d| selector.matches(&d.name))
            .collect();
        self.attached
            .retain(|name, index| devices.iter().any(|d| &d.name == name && d.index == *index));
        let mut new = Vec::new();
        // Devices with an IPv4 address: the node's own interfaces, where
        // north-south traffic enters. Pod devices (no address) get no XDP:
        // nothing arriving there is for the fast path, and native XDP on a
        // veth would take GSO away from the pod's side of it. Listed once,
        // and only when a device is being attached (not every second).
        let mut addressed: Option<Vec<String>> = None;
        for dev in &devices {
            if self.attached.get(&dev.name) == Some(&dev.index) {
                continue;
            }
            let res = TcHook::ALL.into_iter().try_fold(true, |all, hook| self.attach(dev, hook).map(|a| all && a));
            match res {
                Ok(adopted) => {
                    info!(device = %dev.name, ifindex = dev.index, adopted, "TC ingress and egress attached");
                    self.attached.insert(dev.name.clone(), dev.index);
                    new.push(dev.name.clone());
                    if let Some(mode) = self.xdp {
                        if addressed.is_none() {
                            addressed = Some(list_addresses()?.into_iter().map(|a| a.device).collect());
                        }
                        if device_is_l3(&dev.name) {
                            info!(device = %dev.name, "no Ethernet header (L3 device): XDP not attached, TC carries its traffic");
                            continue;
                        }
                        if !addressed.as_ref().is_some_and(|a| a.contains(&dev.name)) {
                            info!(device = %dev.name, "no address (a pod device): XDP not attached, TC carries its traffic");
                            continue;
                        }
                        match self.attach_xdp(dev, mode) {
                            Ok(adopted) => info!(device = %dev.name, ?mode, adopted, "XDP fast path attached"),
                            Err(e) => warn!(
                                device = %dev.name,
                                ?mode,
                                error = %e,
                                "XDP not available on this device; the TC path carries its traffic"
                            ),
                        }
                    }
                }
                Err(e) => warn!(device = %dev.name, error = ?e, "cannot attach TC programs; will retry"),
            }
        }
        self.prune_link_pins(&devices);
        self.sync_xdp_tx_ports();
        Ok(new)
    }

    /// Keeps `proxy_xdp_tx_v1` equal to the devices with an XDP link: the
    /// only ones the fast path redirects to.
    fn sync_xdp_tx_ports(&mut self) {
        use aya::maps::DevMapHash;
        let wanted: std::collections::BTreeSet<u32> = fs::read_dir(self.pins.links_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(XDP_LINK_PREFIX)?.split('_').next()?.parse().ok()
            })
            .collect();
        let Some(map) = self.ebpf.map_mut(crate::pins::XDP_TX_MAP) else {
            return;
        };
        let Ok(mut ports) = DevMapHash::try_from(map) else {
            return;
        };
        let present: Vec<u32> = ports.keys().filter_map(std::result::Result::ok).collect();
        for ifindex in present.iter().filter(|i| !wanted.contains(i)) {
            let _ = ports.remove(*ifindex);
        }
        for ifindex in wanted.iter().filter(|i| !present.contains(i)) {
            if let Err(e) = ports.insert(*ifindex, *ifindex, None, 0) {
                warn!(ifindex, error = %e, "cannot allow XDP redirects to this device; its flows take the TC path");
            }
        }
    }

    /// Attaches to one device. With a pinned link from an earlier run the
    /// program is swapped in atomically (same link, no gap in forwarding);
    /// otherwise a new TCX link is made and pinned. Returns whether a link
    /// was adopted.
    fn attach(&mut self, dev: &Device, hook: TcHook) -> Result<bool> {
        let pin = self.pins.tc_link(hook, &dev.name, dev.index);
        // Why a variant: on a device without a link-layer header the packet
        // starts with the IP header, at a different offset.
        let name = if device_is_l3(&dev.name) { hook.program_l3() } else { hook.program() };
        let link_err = |path: &Path| {
            let path = path.to_owned();
            move |e: Box<dyn std::error::Error + Send + Sync>| Error::Link { path, source: e }
        };
        let prog = self.program(name)?;
        if pin.exists() {
            let pinned = PinnedLink::from_pin(&pin).map_err(|e| link_err(&pin)(Box::new(e)))?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|e| link_err(&pin)(Box::new(e)))?;
            let id = prog.attach_to_link(link).map_err(|source| Error::Program { name, source })?;
            // Keep the link alive through its pin only; dropping our fd is fine.
            let _ = prog.take_link(id);
            return Ok(true);
        }
        let attach_type = match hook {
            TcHook::Ingress => TcAttachType::Ingress,
            TcHook::Egress => TcAttachType::Egress,
        };
        let id = prog.attach(&dev.name, attach_type).map_err(|source| Error::Program { name, source })?;
        let link = prog.take_link(id).map_err(|source| Error::Program { name, source })?;
        let fd_link = FdLink::try_from(link).map_err(|e| link_err(&pin)(Box::new(e)))?;
        fd_link.pin(&pin).map_err(|e| link_err(&pin)(Box::new(e)))?;
        Ok(false)
    }

    /// Removes link pins of devices that no longer exist (their links are
    /// defunct) so the directory reflects what is attached.
    fn prune_link_pins(&self, present: &[Device]) {
        let Ok(entries) = fs::read_dir(self.pins.links_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(XDP_LINK_PREFIX) {
                // Gone devices, or XDP no longer wanted: detach.
                let wanted = self.xdp.is_some() && present.iter().any(|d| self.pins.xdp_link(&d.name, d.index) == path);
                if !wanted {
                    let _ = detach_pinned_link(&path);
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            let Some(hook) = TcHook::ALL.into_iter().find(|h| file.starts_with(h.link_prefix())) else {
                // Socket-LB links are managed by `sync_socket_lb`.
                continue;
            };
            if !present.iter().any(|d| self.pins.tc_link(hook, &d.name, d.index) == path) {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

/// Opens a pinned link and detaches it at once (`BPF_OBJ_GET`, then
/// `BPF_LINK_DETACH`); aya 0.14 has no call for the latter.
fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // union bpf_attr, zeroed; both commands read only their first fields.
    let mut attr = [0u64; 8];
    attr[0] = c.as_ptr() as u64; // pathname
    // SAFETY: bpf(2) with a zeroed attr buffer larger than either command reads.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    let mut attr = [0u64; 8];
    attr[0] = u64::from(fd.unsigned_abs()); // link_fd
    // SAFETY: as above; the fd is ours and closed right after.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd BPF_OBJ_GET gave us.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

/// The agent's own network namespace.
const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// Lists `keys` in the socket-destroy map `name` (`add`), or removes them
/// again; `false` (with a warning) when the map cannot be used.
fn list_for_destruction<K: aya::Pod>(ebpf: &mut aya::Ebpf, name: &'static str, keys: &[K], add: bool) -> bool {
    if keys.is_empty() {
        return true;
    }
    let Some(map) = ebpf.map_mut(name) else {
        warn!(map = name, "map missing: connected UDP sockets are not destroyed");
        return false;
    };
    let mut targets = match aya::maps::HashMap::<_, K, u32>::try_from(map) {
        Ok(t) => t,
        Err(e) => {
            warn!(map = name, error = %e, "connected UDP sockets are not destroyed");
            return false;
        }
    };
    for k in keys {
        if add {
            if let Err(e) = targets.insert(*k, 0, 0) {
                warn!(map = name, error = %e, "cannot list a backend for socket destruction");
            }
        } else {
            let _ = targets.remove(k);
        }
    }
    true
}

/// Every network namespace the agent can see, once each (by device and
/// inode): its own first, then `/run/netns/*`, then `/proc/<pid>/ns/net`.
fn network_namespaces() -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let mut add = |p: std::path::PathBuf| {
        if let Ok(m) = fs::metadata(&p)
            && seen.insert((m.dev(), m.ino()))
        {
            out.push(p);
        }
    };
    add(OWN_NETNS.into());
    for dir in ["/run/netns", "/proc"] {
        let Ok(entries) = fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            if dir == "/proc" {
                if name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                    add(e.path().join("ns/net"));
                }
            } else {
                add(e.path());
            }
        }
    }
    out
}

/// Detaches everything and removes every pin under the directory: what
/// `proxy-agent cleanup` does. Returns what was removed.
pub fn cleanup(pins: &Pins) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let root = pins.root();
    if !root.exists() {
        return Ok(removed);
    }
    // Links first (removing the pin of a link nobody holds detaches it),
    // then maps, then the directories.
    if let Ok(entries) = fs::read_dir(pins.links_dir()) {
        for entry in entries.flatten() {
            // Why: unpinning drops the last reference, but the kernel
            // releases a link asynchronously (deferred work); an explicit
            // BPF_LINK_DETACH makes "cleanup returned" mean "detached".
            if let Err(e) = detach_pinned_link(&entry.path()) {
                warn!(link = %entry.path().display(), error = %e, "BPF_LINK_DETACH failed; unpinning anyway");
            }
            fs::remove_file(entry.path()).map_err(Error::io("unlink", entry.path()))?;
            removed.push(format!("links/{}", entry.file_name().to_string_lossy()));
        }
    }
    let _ = fs::remove_dir(pins.links_dir());
    for name in all_maps().chain(crate::pins::retired_maps().map(|(_, r)| r.name)) {
        let path = pins.map(name);
        if path.exists() {
            fs::remove_file(&path).map_err(Error::io("unlink", &path))?;
            removed.push(name.to_owned());
        }
    }
    // Maps of layouts this binary does not know (pinned by a newer or an
    // older release): every version goes, or the directory stays behind.
    if let Ok(entries) = fs::read_dir(root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("proxy_") && entry.path().is_file() {
                fs::remove_file(entry.path()).map_err(Error::io("unlink", entry.path()))?;
                removed.push(name);
            }
        }
    }
    // Only remove the directory when it is ours and empty (not a mount point).
    let is_mount = fs::metadata(root).ok().zip(root.parent().and_then(|p| fs::metadata(p).ok()))
        .is_some_and(|(a, b)| a.dev() != b.dev());
    if is_mount && is_bpffs(root) {
        // A bpffs we mounted ourselves (no bpffs above it): unmount it.
        if let Ok(c) = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 with a valid path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _ = fs::remove_dir(root);
    Ok(removed)
}
