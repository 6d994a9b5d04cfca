//! The run's own network namespace: created by the worker (not by bubblewrap), holding only
//! loopback and the proxy's listening socket.
//!
//! A short-lived thread calls `unshare(CLONE_NEWNET)` (which moves only that thread), brings `lo`
//! up, binds the proxy's TCP listener on `127.0.0.1:<port>` (a socket belongs to the namespace
//! it was created in, whichever thread later uses it), opens `/proc/thread-self/ns/net` and
//! exits. The worker's other threads never leave the host's namespace, so the proxy's outgoing
//! connections are made from the host network. The namespace lives as long as the kept file
//! descriptor or the listener. It is owned by the worker's user namespace (the host's initial
//! one), so nothing in a user namespace bubblewrap creates below it has `CAP_NET_ADMIN` over it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Errors creating a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// A system call failed (`unshare` needs `CAP_SYS_ADMIN`: the worker runs as root).
    #[error("cannot create the run's network namespace ({step}): {source}")]
    System {
        /// Which step.
        step: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The setup thread could not be started or panicked.
    #[error("cannot create the run's network namespace: the setup thread failed")]
    Thread,
}

fn system(step: &'static str) -> impl FnOnce(std::io::Error) -> NamespaceError {
    move |source| NamespaceError::System { step, source }
}

/// A fresh network namespace with `lo` up and a listener on `127.0.0.1:<port>` in it.
#[derive(Debug)]
pub struct RunNamespace {
    /// An `O_RDONLY` descriptor of the namespace (`/proc/thread-self/ns/net` of the thread that
    /// created it), for `setns(2)`.
    pub namespace: OwnedFd,
    /// The listener, non-blocking, inside the namespace.
    pub listener: TcpListener,
}

/// Creates a namespace with a listener on `127.0.0.1:port` in it (see the module documentation).
///
/// Errors: [`NamespaceError`] when a system call fails (e.g. without `CAP_SYS_ADMIN`).
pub fn create_run_namespace(port: u16) -> Result<RunNamespace, NamespaceError> {
    std::thread::Builder::new()
        .name("flotilla-netns".to_owned())
        .spawn(move || create_in_this_thread(port))
        .map_err(|_| NamespaceError::Thread)?
        .join()
        .map_err(|_| NamespaceError::Thread)?
}

/// Runs in a thread of its own, which it moves into a new namespace; the thread must end
/// afterwards.
fn create_in_this_thread(port: u16) -> Result<RunNamespace, NamespaceError> {
    // SAFETY: unshare has no memory-safety preconditions; it affects only this thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(system("unshare(CLONE_NEWNET)")(
            std::io::Error::last_os_error(),
        ));
    }
    bring_loopback_up().map_err(system("bring lo up"))?;
    let path = c"/proc/thread-self/ns/net";
    // SAFETY: the path is a NUL-terminated constant; the returned descriptor is owned below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(system("open /proc/thread-self/ns/net")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let namespace = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .map_err(system("bind the proxy listener"))?;
    listener
        .set_nonblocking(true)
        .map_err(system("set the listener non-blocking"))?;
    Ok(RunNamespace {
        namespace,
        listener,
    })
}

/// `ip link set lo up` for the calling thread's namespace (`SIOCGIFFLAGS`/`SIOCSIFFLAGS`).
fn bring_loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket creation; the descriptor is owned by `socket` below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags into `request`, a valid ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union field was just written by the kernel as flags.
    unsafe {
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `request`, a valid ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread (or the forked child, before `exec`) into the namespace `fd`
/// (`setns(fd, CLONE_NEWNET)`). Async-signal-safe: only the system call.
///
/// Errors: the `setns` error (e.g. `EPERM` without `CAP_SYS_ADMIN`).
pub fn enter_namespace(fd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setns has no memory-safety preconditions.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
