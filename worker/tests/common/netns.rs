//! A stand-in "outside" host for egress tests: a network namespace the test creates, joined to
//! the root namespace by one veth pair (the approach of `chaos-tests/src/net.rs`), with an HTTP
//! responder listening inside it. Removed on drop; namespaces left by test processes that died
//! are removed first. Traffic goes only between the test's own namespaces.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAMESPACE_PREFIX: &str = "fegress-";
const VETH_PREFIX: &str = "feg";

/// The body the outside server answers with.
pub const OUTSIDE_BODY: &str = "hello from outside";

/// Runs a command; panics with its stderr unless it succeeds. Returns stdout.
pub fn run(program: &str, arguments: &[&str]) -> String {
    let output = Command::new(program)
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        output.status.success(),
        "`{program} {}` failed: {}",
        arguments.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Fails loudly unless the test can create network namespaces.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "egress tests need root (network namespaces, veth pairs): run them as root"
    );
}

/// A namespace `fegress-<tag>` with `eth0` at `10.215.S.2/24`, whose peer in the root
/// namespace has `10.215.S.1/24`.
pub struct OutsideHost {
    namespace: String,
    /// The host's address.
    pub address: Ipv4Addr,
}

impl OutsideHost {
    /// Creates the namespace and veth pair.
    pub fn create() -> OutsideHost {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        require_root();
        remove_stale();
        let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}x{sequence}", std::process::id());
        let subnet = free_subnet(sequence);
        let host = OutsideHost {
            namespace: format!("{NAMESPACE_PREFIX}{tag}"),
            address: Ipv4Addr::new(10, 215, subnet, 2),
        };
        let outside = format!("{VETH_PREFIX}{tag}");
        let inside = format!("fei{tag}");
        run("ip", &["netns", "add", &host.namespace]);
        run(
            "ip",
            &[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ],
        );
        run("ip", &["link", "set", &inside, "netns", &host.namespace]);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.215.{subnet}.1/24"),
                "dev",
                &outside,
            ],
        );
        run("ip", &["link", "set", &outside, "up"]);
        let ns = ["-n", host.namespace.as_str()];
        run("ip", &[&ns[..], &["link", "set", "lo", "up"]].concat());
        run(
            "ip",
            &[&ns[..], &["link", "set", &inside, "name", "eth0"]].concat(),
        );
        run(
            "ip",
            &[
                &ns[..],
                &[
                    "addr",
                    "add",
                    &format!("{}/24", host.address),
                    "dev",
                    "eth0",
                ],
            ]
            .concat(),
        );
        run("ip", &[&ns[..], &["link", "set", "eth0", "up"]].concat());
        host
    }

    /// Binds a TCP listener on `0.0.0.0:0` inside the namespace (from a thread that joins it).
    pub fn bind(&self) -> TcpListener {
        let path = format!("/run/netns/{}", self.namespace);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns has no memory-safety preconditions; it moves only this thread.
            let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap()
        })
        .join()
        .unwrap()
    }

    /// Starts an HTTP server inside the namespace answering every request with
    /// [`OUTSIDE_BODY`].
    pub fn serve(&self) -> Server {
        Server::start(self.bind())
    }
}

impl Drop for OutsideHost {
    fn drop(&mut self) {
        remove_namespace(&self.namespace);
    }
}

fn remove_namespace(namespace: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", namespace])
        .output();
}

fn tag_is_stale(tag: &str) -> bool {
    let Some(pid) = tag
        .split('x')
        .next()
        .and_then(|pid| u32::from_str_radix(pid, 16).ok())
    else {
        return false;
    };
    pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn remove_stale() {
    let list = run("ip", &["netns", "list"]);
    for namespace in list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        if let Some(tag) = namespace.strip_prefix(NAMESPACE_PREFIX)
            && tag_is_stale(tag)
        {
            remove_namespace(namespace);
        }
    }
}

fn free_subnet(sequence: u32) -> u8 {
    let used = run("ip", &["-o", "-4", "addr", "show"]);
    let start = (std::process::id().wrapping_mul(7) + sequence.wrapping_mul(13)) % 250;
    for offset in 0..250 {
        let octet = ((start + offset) % 250 + 2) as u8;
        if !used.contains(&format!(" 10.215.{octet}.")) {
            return octet;
        }
    }
    panic!("no free /24 in 10.215.0.0/16")
}

/// An HTTP responder on a listener (in any namespace), counting the connections it accepted.
pub struct Server {
    /// The listener's port.
    pub port: u16,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves `listener` from the current tokio runtime.
    pub fn start(listener: TcpListener) -> Server {
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buffer = [0_u8; 1024];
                    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(count) => head.extend_from_slice(&buffer[..count]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{OUTSIDE_BODY}",
                        OUTSIDE_BODY.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Server {
            port,
            accepted,
            task,
        }
    }

    /// A server on `127.0.0.1:0` of the test's (host) namespace.
    pub fn on_host_loopback() -> Server {
        Server::start(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
    }

    /// How many connections it accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to `address` from inside the namespace `namespace` (from a thread that joins it).
pub async fn connect_in(namespace: &OwnedFd, address: SocketAddr) -> tokio::net::TcpStream {
    let fd = namespace.as_raw_fd();
    let stream = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns has no memory-safety preconditions; it moves only this thread.
                let entered = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
                std::net::TcpStream::connect(address)
            })
            .join()
            .unwrap()
    })
    .unwrap();
    stream.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(stream).unwrap()
}

/// Polls `condition` every 20 ms until it holds, or panics with `what` after 10 s.
pub async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
