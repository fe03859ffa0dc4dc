//! The demo behind `cargo xtask demo`: a sandboxed node in network
//! namespaces, three pods answering HTTP with their own name, a `ClusterIP`
//! Service fed to the agent as ordinary YAML, real requests from a client
//! namespace, and a table of what went where.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::wait_programmed,
    client::http_get,
    manifests::{Port, service_yaml, write_atomic},
    sandbox::{DEVICES, NODE_IP, Sandbox},
    servers::http_server_forever,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const PODS: usize = 3;
const NODE_PORT: u16 = 30080;

struct Args {
    agent: PathBuf,
    keep: bool,
    requests: u32,
}

fn parse_args() -> Args {
    let mut args = std::env::args().skip(1);
    let mut out = Args { agent: PathBuf::from("proxy-agent"), keep: false, requests: 90 };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--serve-http" => {
                let name = args.next().expect("--serve-http NAME PORT");
                let port = args.next().and_then(|p| p.parse().ok()).expect("--serve-http NAME PORT");
                http_server_forever(port, &name);
            }
            "--node-client" => {
                // A node-local client process (run inside the node's cgroup):
                // one line per request, the answering pod or `ERR ...`.
                let to: SocketAddr = args.next().and_then(|a| a.parse().ok()).expect("--node-client ADDR N");
                let n: u32 = args.next().and_then(|a| a.parse().ok()).expect("--node-client ADDR N");
                for _ in 0..n {
                    match http_get(to, Duration::from_secs(2)) {
                        Ok(body) => println!("{body}"),
                        Err(e) => println!("ERR {e}"),
                    }
                }
                std::process::exit(0);
            }
            "--agent" => out.agent = PathBuf::from(args.next().expect("--agent PATH")),
            "--keep" => out.keep = true,
            "--requests" => out.requests = args.next().and_then(|n| n.parse().ok()).expect("--requests N"),
            other => panic!("unknown argument {other:?}"),
        }
    }
    out
}

fn say(step: u32, msg: &str) {
    println!("[{step}/6] {msg}");
}

fn main() {
    let args = parse_args();
    let me = std::env::current_exe().expect("current_exe");

    say(1, "creating the sandbox: client, node and 3 pod network namespaces");
    let mut sb = Sandbox::new("demo", PODS);
    sb.serve_http_processes(&me, &["--serve-http"], 8080);

    say(2, &format!("writing manifests: Service web (NodePort: ClusterIP {VIP}:80 and {NODE_IP}:{NODE_PORT} -> 3 pods :8080) and Service empty (no endpoints)"));
    let endpoints: Vec<(Ipv4Addr, bool)> = sb.pods.iter().map(|p| (p.ip, true)).collect();
    let http = [Port { name: "http", port: 80, target: 8080, protocol: "TCP" }];
    let web = service_yaml("web", VIP, &http, &endpoints)
        .replace("type: ClusterIP", "type: NodePort")
        .replace("    targetPort: 8080\n", &format!("    targetPort: 8080\n    nodePort: {NODE_PORT}\n"));
    write_atomic(&sb.manifests, "web.yaml", &web);
    write_atomic(&sb.manifests, "empty.yaml", &service_yaml("empty", EMPTY_VIP, &http, &[]));

    say(3, &format!("starting proxy-agent in the node (--devices '{DEVICES}', --bpffs {})", sb.bpffs.display()));
    sb.start_agent(&args.agent);
    // ClusterIP, NodePort on the node's address and on 127.0.0.1, the empty Service.
    wait_programmed(&sb.bpffs, Duration::from_secs(20), "the demo Services", |v| v.len() == 4);

    say(
        4,
        &format!(
            "sending {} HTTP requests each from the client namespace (per-packet TC path) and from a process on the node itself (socket-level balancing, in the node's cgroup) to http://{VIP}:80 and the NodePort",
            args.requests
        ),
    );
    let n = args.requests;
    let cip = run_load(&sb, SocketAddr::from((VIP, 80)), n);
    let np = run_load(&sb, SocketAddr::from((NODE_IP, NODE_PORT)), n);
    let node_cip = node_load(&sb, &me, SocketAddr::from((VIP, 80)), n);
    let node_np = node_load(&sb, &me, SocketAddr::from((Ipv4Addr::LOCALHOST, NODE_PORT)), n);
    let refused = sb.client.run(|| http_get(SocketAddr::from((EMPTY_VIP, 80)), Duration::from_secs(2)).err().map(|e| e.to_string()));

    say(5, "results");
    println!();
    println!("  {:<6}  {:<13}  {:>22}  {:>22}  {:>22}  {:>22}", "", "", "from the client:", "", "from the node itself:", "");
    println!(
        "  {:<6}  {:<13}  {:>22}  {:>22}  {:>22}  {:>22}",
        "POD",
        "IP",
        format!("ClusterIP {VIP}:80"),
        format!("NodePort {NODE_IP}:{NODE_PORT}"),
        format!("ClusterIP {VIP}:80"),
        format!("NodePort 127.0.0.1:{NODE_PORT}")
    );
    for p in &sb.pods {
        let cell = |l: &Load| {
            let c = l.answers.get(&p.name).copied().unwrap_or(0);
            format!("{c} ({:.0}%)", f64::from(c) * 100.0 / f64::from(n.max(1)))
        };
        println!(
            "  {:<6}  {:<13}  {:>22}  {:>22}  {:>22}  {:>22}",
            p.name,
            p.ip.to_string(),
            cell(&cip),
            cell(&np),
            cell(&node_cip),
            cell(&node_np)
        );
    }
    for (what, l) in [
        ("client → ClusterIP", &cip),
        ("client → NodePort", &np),
        ("node → ClusterIP", &node_cip),
        ("node → NodePort on 127.0.0.1", &node_np),
    ] {
        println!(
            "  {what}: {n} requests in {:.2} s, {} failed{}",
            l.elapsed.as_secs_f64(),
            l.failures.len(),
            l.failures.first().map(|f| format!(" (first: {f})")).unwrap_or_default()
        );
    }
    println!(
        "  http://{EMPTY_VIP}:80 (no endpoints): {}",
        refused.unwrap_or_else(|| "answered?! (expected a reject)".to_owned())
    );
    let ok = [&cip, &np, &node_cip, &node_np].iter().all(|l| l.failures.is_empty() && l.answers.len() == PODS);
    report(&args, &mut sb);
    // Tear down (unless kept) before exiting with the verdict.
    drop(sb);
    if !ok {
        eprintln!("demo FAILED: expected every request answered and all {PODS} pods used");
        std::process::exit(1);
    }
}

struct Load {
    answers: BTreeMap<String, u32>,
    failures: Vec<String>,
    elapsed: Duration,
}

/// `n` requests (a new connection each) from the client, bounded to 60 s.
fn run_load(sb: &Sandbox, to: SocketAddr, n: u32) -> Load {
    sb.client.run(move || {
        let mut answers: BTreeMap<String, u32> = BTreeMap::new();
        let mut failures = Vec::new();
        let start = Instant::now();
        let deadline = start + Duration::from_mins(1);
        for _ in 0..n {
            if Instant::now() > deadline {
                failures.push("deadline of 60 s reached".to_owned());
                break;
            }
            match http_get(to, Duration::from_secs(2)) {
                Ok(body) => *answers.entry(body).or_default() += 1,
                Err(e) => failures.push(e.to_string()),
            }
        }
        Load { answers, failures, elapsed: start.elapsed() }
    })
}

/// `n` requests from a process in the node's network namespace and cgroup
/// (this binary with `--node-client`): a hostNetwork pod or node process,
/// whose `connect()` the socket programs translate.
fn node_load(sb: &Sandbox, me: &std::path::Path, to: SocketAddr, n: u32) -> Load {
    let start = Instant::now();
    let mut answers: BTreeMap<String, u32> = BTreeMap::new();
    let mut failures = Vec::new();
    match sb.cgroup.command(&sb.node, me, &["--node-client", &to.to_string(), &n.to_string()]).output() {
        Ok(out) => {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                match line.strip_prefix("ERR ") {
                    Some(e) => failures.push(e.to_owned()),
                    None => *answers.entry(line.to_owned()).or_default() += 1,
                }
            }
        }
        Err(e) => failures.push(format!("cannot start the node-local client: {e}")),
    }
    Load { answers, failures, elapsed: start.elapsed() }
}

fn report(args: &Args, sb: &mut Sandbox) {
    println!();
    println!("$ proxy-agent --bpffs {} services", sb.bpffs.display());
    let out = Command::new(&args.agent).arg("--bpffs").arg(&sb.bpffs).arg("services").output().expect("proxy-agent services");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!();
    println!("$ proxy-agent --bpffs {} stats   (non-zero counters)", sb.bpffs.display());
    let out = Command::new(&args.agent).arg("--bpffs").arg(&sb.bpffs).arg("stats").output().expect("proxy-agent stats");
    for (i, line) in String::from_utf8_lossy(&out.stdout).lines().enumerate() {
        // The PACKETS column (the sum over families).
        if i == 0 || line.split_whitespace().nth(4).is_none_or(|p| p != "0") {
            println!("{line}");
        }
    }
    println!();

    if args.keep {
        say(6, "keeping the sandbox (--keep). Look inside with:");
        let agent = args.agent.display();
        let bpffs = sb.bpffs.display();
        println!("  nsenter --net={} curl -s http://{VIP}/        # from the client namespace", sb.client.path());
        println!("  bpftool map dump pinned {bpffs}/proxy_svc_v1");
        println!("  bpftool map dump pinned {bpffs}/proxy_be_v1");
        println!("  bpftool map dump pinned {bpffs}/proxy_ct_v2");
        println!("  {agent} --bpffs {bpffs} services");
        println!("  {agent} --bpffs {bpffs} stats");
        println!("  cat {}                                  # agent log", sb.agent_log_path().display());
        println!("  $EDITOR {}/web.yaml                     # the agent follows changes", sb.manifests.display());
        println!("Tear down with:");
        let pids: Vec<String> = sb.server_procs.iter().map(|c| c.id().to_string()).chain(sb.agent.as_ref().and_then(integration_tests::agent::Agent::pid).map(|p| p.to_string())).collect();
        println!("  kill {}", pids.join(" "));
        println!("  {agent} --bpffs {bpffs} cleanup");
        let mut nss = vec![sb.client.name().to_owned(), sb.node.name().to_owned()];
        nss.extend(sb.pods.iter().map(|p| p.ns.name().to_owned()));
        for ns in nss {
            println!("  ip netns del {ns}");
        }
        println!("  rm -rf {}", sb.workdir.display());
        sb.keep();
    } else {
        say(6, "tearing down (use --keep to leave it running)");
    }
}
