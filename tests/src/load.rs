//! Load for the restart and upgrade tests: one loop per kind of traffic, in
//! a client namespace, bounded in count and time, counting what failed.
use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    client::{KeepAlive, http_get},
    netns::Netns,
};

/// Requests that succeeded, and each failure with when its request started.
pub type Outcome = (u32, Vec<String>);

/// Every `every` in `ns`, runs `request` on the state `open` makes, until
/// `stop` is set, `max` requests succeeded or `limit` has passed.
pub fn spawn_loop<S: 'static>(
    ns: &Netns,
    stop: &Arc<AtomicBool>,
    every: Duration,
    (max, limit): (u32, Duration),
    open: impl FnOnce() -> std::io::Result<S> + Send + 'static,
    mut request: impl FnMut(&mut S) -> std::io::Result<()> + Send + 'static,
) -> JoinHandle<Outcome> {
    let stop = stop.clone();
    ns.spawn(move || {
        let mut state = open().expect("open the load's connection");
        let (start, mut ok, mut failed) = (Instant::now(), 0u32, Vec::new());
        while !stop.load(Ordering::Relaxed) && ok < max && start.elapsed() < limit {
            let t0 = SystemTime::now();
            match request(&mut state) {
                Ok(()) => ok += 1,
                Err(e) => failed.push(format!("{e} (started {})", jiff::Timestamp::try_from(t0).map(|t| t.to_string()).unwrap_or_default())),
            }
            std::thread::sleep(every);
        }
        (ok, failed)
    })
}

/// New HTTP connections to `addr`, one request each, every 5 ms.
pub fn new_connections(ns: &Netns, stop: &Arc<AtomicBool>, addr: SocketAddr, timeout: Duration, bounds: (u32, Duration)) -> JoinHandle<Outcome> {
    spawn_loop(ns, stop, Duration::from_millis(5), bounds, || Ok(()), move |()| http_get(addr, timeout).map(drop))
}

/// Requests on one keep-alive connection to `addr`, every 5 ms.
pub fn keep_alive(ns: &Netns, stop: &Arc<AtomicBool>, addr: SocketAddr, timeout: Duration, bounds: (u32, Duration)) -> JoinHandle<Outcome> {
    spawn_loop(ns, stop, Duration::from_millis(5), bounds, move || KeepAlive::connect(addr, timeout), |k| k.get().map(drop))
}

/// Datagrams on one connected UDP socket to `addr`, each answered, every 10 ms.
pub fn udp_stream(ns: &Netns, stop: &Arc<AtomicBool>, addr: SocketAddr, timeout: Duration, bounds: (u32, Duration)) -> JoinHandle<Outcome> {
    let open = move || {
        let s = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        s.set_read_timeout(Some(timeout))?;
        s.connect(addr)?;
        Ok(s)
    };
    spawn_loop(ns, stop, Duration::from_millis(10), bounds, open, |s| {
        let mut buf = [0u8; 512];
        s.send(b"u").and_then(|_| s.recv(&mut buf)).map(drop)
    })
}
