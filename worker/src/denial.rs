//! Recording what a sandbox refused, from the kernel's side: the seccomp supervisor and the
//! cgroup event counters. The agent's own account of what it tried is never trusted.
//!
//! # Seccomp denials (seccomp_unotify(2))
//!
//! The sandbox init ([`crate::sandbox_init`], `--seccomp notify`) installs the deny list of
//! [`crate::seccomp`] with `SECCOMP_RET_USER_NOTIF` in place of `EPERM`
//! ([`crate::seccomp::with_user_notification`]), sends the listener descriptor to the worker
//! over a Unix socket on descriptor [`LISTENER_SOCKET_FD`] (`SCM_RIGHTS`), closes both and only
//! then executes the command. A worker thread, the [`Supervisor`], receives each notification,
//! counts it by system call and answers `EPERM`: the agent sees what a plain `EPERM` filter
//! would give it, and every denial is counted.
//!
//! - The supervisor never lets a system call proceed (no `SECCOMP_USER_NOTIF_FLAG_CONTINUE`)
//!   and reads nothing from the agent's memory, so there is no time-of-check/time-of-use
//!   question: it only counts and refuses.
//! - Fail closed: if the supervisor is gone, the kernel fails a notified system call with
//!   `ENOSYS`; it never runs it.
//! - Bounded: at most [`MAX_DISTINCT_DENIALS`] distinct actions per command (the rest are
//!   counted under `other`), counts saturate. A flood of denied calls costs the agent its own CPU
//!   quota and one supervisor thread a system call round trip each.
//! - The agent cannot reach the socket: the init closes it before `exec`, a Unix socket cannot
//!   be reopened through `/proc/<pid>/fd`, and `ptrace`/`pidfd_getfd` are denied. The
//!   supervisor takes the first descriptor it receives and closes the socket.
//!
//! # cgroup limits
//!
//! After a command, its cgroup's event counters give how often it hit its limits: `pids.events`
//! `max` (a fork refused at `pids.max`), `memory.events` `max` (usage reached `memory.max`) and
//! `oom_kill` (processes the OOM killer killed).

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

use crate::seccomp::{ALLOWED_SOCKET_FAMILIES, CLONE_NAMESPACE_FLAGS, DENIED_SYSTEM_CALLS};

/// The descriptor number on which the init finds the socket to send the seccomp listener on.
pub const LISTENER_SOCKET_FD: libc::c_int = 4;

/// Most distinct (mechanism, action) pairs recorded per sandboxed command; further ones are
/// counted under the action `other`.
pub const MAX_DISTINCT_DENIALS: usize = 32;

/// Longest action text, in bytes.
pub const MAX_ACTION_BYTES: usize = 128;

/// How often the supervisor thread looks at its stop flag, in milliseconds.
const SUPERVISOR_POLL_MS: libc::c_int = 100;

/// The mechanism of a denied system call.
pub const MECHANISM_SECCOMP: &str = "seccomp";
/// The mechanism of a reached cgroup limit.
pub const MECHANISM_CGROUP: &str = "cgroup";

/// One kind of refused action of a command and how often it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// [`MECHANISM_SECCOMP`] or [`MECHANISM_CGROUP`].
    pub mechanism: &'static str,
    /// What was refused: `ptrace`, `socket(AF_NETLINK)`, `clone(CLONE_NEWUSER)`, `pids.max`, ...
    pub action: String,
    /// How many times (saturating).
    pub count: u64,
}

/// A bounded tally of denials (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Denials {
    counts: BTreeMap<(&'static str, String), u64>,
}

impl Denials {
    /// Adds `count` occurrences of `action` under `mechanism`. An action beyond
    /// [`MAX_DISTINCT_DENIALS`] is counted as `other`; one longer than [`MAX_ACTION_BYTES`] is
    /// cut.
    pub fn record(&mut self, mechanism: &'static str, action: &str, count: u64) {
        if count == 0 {
            return;
        }
        let mut action = action.to_owned();
        if action.len() > MAX_ACTION_BYTES {
            let mut end = MAX_ACTION_BYTES;
            while !action.is_char_boundary(end) {
                end -= 1;
            }
            action.truncate(end);
        }
        let key = if self.counts.contains_key(&(mechanism, action.clone()))
            || self.counts.len() < MAX_DISTINCT_DENIALS
        {
            (mechanism, action)
        } else {
            (mechanism, "other".to_owned())
        };
        let entry = self.counts.entry(key).or_insert(0);
        *entry = entry.saturating_add(count);
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The denials, ordered by mechanism and action.
    pub fn to_vec(&self) -> Vec<Denial> {
        self.counts
            .iter()
            .map(|((mechanism, action), count)| Denial {
                mechanism,
                action: action.clone(),
                count: *count,
            })
            .collect()
    }
}

/// The supervisor of one sandboxed command's seccomp listener (see the module documentation).
/// Started before the sandbox, finished after every process of it is gone.
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Denials>>,
}

impl Supervisor {
    /// Starts the supervisor thread on the worker's end of the listener socket.
    ///
    /// Errors: the thread cannot be spawned.
    pub fn start(socket: UnixStream) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("seccomp-supervisor".to_owned())
            .spawn(move || supervise(socket, &thread_stop))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread (within [`SUPERVISOR_POLL_MS`]) and returns what it counted. Call it
    /// when no process of the sandbox is left (a process still blocked in a denied system call
    /// then gets `ENOSYS`).
    pub async fn finish(mut self) -> Denials {
        self.stop.store(true, Ordering::Release);
        let Some(thread) = self.thread.take() else {
            return Denials::default();
        };
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(denials)) => denials,
            _ => {
                tracing::warn!("the seccomp supervisor thread failed; its denials are lost");
                Denials::default()
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn supervise(socket: UnixStream, stop: &AtomicBool) -> Denials {
    let Some(listener) = receive_listener(&socket, stop) else {
        return Denials::default();
    };
    drop(socket);
    serve(&listener, stop)
}

/// Waits for `fd` to be readable: `Some(revents)`, or `None` on a timeout or an interrupted
/// wait.
fn wait_readable(fd: libc::c_int) -> Option<libc::c_short> {
    let mut poll_fd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let ready = unsafe { libc::poll(&mut poll_fd, 1, SUPERVISOR_POLL_MS) };
    (ready > 0).then_some(poll_fd.revents)
}

/// The first descriptor received on `socket`, `None` when the socket closes, fails or `stop`
/// is set first.
fn receive_listener(socket: &UnixStream, stop: &AtomicBool) -> Option<OwnedFd> {
    loop {
        if stop.load(Ordering::Acquire) {
            return None;
        }
        if wait_readable(socket.as_raw_fd()).is_none() {
            continue;
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut ancillary = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0_u8; 1];
        let received = rustix::net::recvmsg(
            socket,
            &mut [IoSliceMut::new(&mut byte)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        );
        match received {
            Ok(message) if message.bytes == 0 => return None,
            Ok(_) => {
                let descriptor = ancillary.drain().find_map(|message| match message {
                    RecvAncillaryMessage::ScmRights(mut descriptors) => descriptors.next(),
                    _ => None,
                });
                if descriptor.is_some() {
                    return descriptor;
                }
            }
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot receive the seccomp listener; denials are not recorded");
                return None;
            }
        }
    }
}

/// Answers every notification of `listener` with `EPERM`, counting them, until the filter has
/// no task left or `stop` is set.
fn serve(listener: &OwnedFd, stop: &AtomicBool) -> Denials {
    let mut denials = Denials::default();
    let fd = listener.as_raw_fd();
    loop {
        match wait_readable(fd) {
            Some(revents) if revents & libc::POLLIN != 0 => {
                if let Some(action) = answer_one(fd) {
                    denials.record(MECHANISM_SECCOMP, &action, 1);
                }
            }
            // POLLHUP: every task of the filter is gone.
            Some(_) => return denials,
            None if stop.load(Ordering::Acquire) => return denials,
            None => {}
        }
    }
}

/// Receives one notification and answers `EPERM`; returns the refused action, `None` when the
/// notification vanished (its task died or was interrupted).
fn answer_one(fd: libc::c_int) -> Option<String> {
    // SAFETY: seccomp_notif is plain data; the kernel requires it zeroed before RECV.
    let mut request: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: `request` is a valid, writable seccomp_notif, the size the ioctl number encodes.
    if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut request) } != 0 {
        return None;
    }
    let mut response = libc::seccomp_notif_resp {
        id: request.id,
        val: 0,
        error: -libc::EPERM,
        flags: 0,
    };
    // SAFETY: `response` is a valid seccomp_notif_resp. ENOENT (the task is gone) is harmless:
    // the system call did not run.
    unsafe {
        libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut response);
    }
    Some(describe_system_call(
        libc::c_long::from(request.data.nr),
        &request.data.args,
    ))
}

/// The socket family names shown in actions (others are shown as numbers).
const SOCKET_FAMILY_NAMES: &[(i32, &str)] = &[
    (libc::AF_NETLINK, "AF_NETLINK"),
    (libc::AF_PACKET, "AF_PACKET"),
    (libc::AF_VSOCK, "AF_VSOCK"),
    (libc::AF_BLUETOOTH, "AF_BLUETOOTH"),
    (libc::AF_ALG, "AF_ALG"),
    (libc::AF_KEY, "AF_KEY"),
    (libc::AF_XDP, "AF_XDP"),
    (libc::AF_CAN, "AF_CAN"),
    (libc::AF_TIPC, "AF_TIPC"),
    (libc::AF_RDS, "AF_RDS"),
];

/// The clone namespace flag names, in [`CLONE_NAMESPACE_FLAGS`] order.
const CLONE_FLAG_NAMES: &[&str] = &[
    "CLONE_NEWUSER",
    "CLONE_NEWNS",
    "CLONE_NEWNET",
    "CLONE_NEWPID",
    "CLONE_NEWIPC",
    "CLONE_NEWUTS",
    "CLONE_NEWCGROUP",
    "CLONE_NEWTIME",
];

/// A denied system call as an action: its name, with the argument that made it denied for
/// `socket`, `socketpair` and `clone`.
pub fn describe_system_call(number: libc::c_long, arguments: &[u64; 6]) -> String {
    let name = DENIED_SYSTEM_CALLS
        .iter()
        .find(|(_, denied)| *denied == number)
        .map(|(name, _)| *name);
    if number == libc::SYS_socket || number == libc::SYS_socketpair {
        let call = if number == libc::SYS_socket {
            "socket"
        } else {
            "socketpair"
        };
        // The family and type are ints: the low 32 bits of the registers.
        let family = arguments[0] as u32 as i32;
        let kind = arguments[1] as u32 as i32;
        let allowed = ALLOWED_SOCKET_FAMILIES
            .iter()
            .any(|(_, allowed)| *allowed == family);
        if allowed && kind & 0xf == libc::SOCK_RAW {
            return format!("{call}(SOCK_RAW)");
        }
        return match SOCKET_FAMILY_NAMES
            .iter()
            .find(|(known, _)| *known == family)
        {
            Some((_, family_name)) => format!("{call}({family_name})"),
            None => format!("{call}(family {family})"),
        };
    }
    if number == libc::SYS_clone {
        let flags: Vec<&str> = CLONE_NAMESPACE_FLAGS
            .iter()
            .zip(CLONE_FLAG_NAMES)
            .filter(|(flag, _)| arguments[0] & **flag == **flag)
            .map(|(_, flag_name)| *flag_name)
            .collect();
        return format!("clone({})", flags.join("|"));
    }
    match name {
        Some(name) => name.to_owned(),
        None => format!("system call {number}"),
    }
}

/// The cgroup limit events, as denials: `(action, count)` pairs with a non-zero count.
pub fn cgroup_denials(events: &[(&'static str, u64)]) -> Denials {
    let mut denials = Denials::default();
    for (action, count) in events {
        denials.record(MECHANISM_CGROUP, action, *count);
    }
    denials
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_calls_are_described() {
        let none = [0_u64; 6];
        assert_eq!(describe_system_call(libc::SYS_ptrace, &none), "ptrace");
        let netlink = [libc::AF_NETLINK as u64, libc::SOCK_RAW as u64, 0, 0, 0, 0];
        assert_eq!(
            describe_system_call(libc::SYS_socket, &netlink),
            "socket(AF_NETLINK)"
        );
        let raw = [libc::AF_INET as u64, libc::SOCK_RAW as u64, 0, 0, 0, 0];
        assert_eq!(
            describe_system_call(libc::SYS_socket, &raw),
            "socket(SOCK_RAW)"
        );
        let user = [
            (libc::CLONE_NEWUSER | libc::CLONE_NEWNS) as u64,
            0,
            0,
            0,
            0,
            0,
        ];
        assert_eq!(
            describe_system_call(libc::SYS_clone, &user),
            "clone(CLONE_NEWUSER|CLONE_NEWNS)"
        );
        assert_eq!(describe_system_call(100_000, &none), "system call 100000");
    }

    #[test]
    fn the_tally_is_bounded() {
        let mut denials = Denials::default();
        for index in 0..(MAX_DISTINCT_DENIALS + 5) {
            denials.record(MECHANISM_SECCOMP, &format!("call-{index}"), 2);
        }
        denials.record(MECHANISM_SECCOMP, "call-0", u64::MAX);
        denials.record(MECHANISM_SECCOMP, &"x".repeat(500), 1);
        let entries = denials.to_vec();
        assert_eq!(entries.len(), MAX_DISTINCT_DENIALS + 1);
        let other = entries
            .iter()
            .find(|entry| entry.action == "other")
            .unwrap();
        assert_eq!(other.count, 5 * 2 + 1);
        let first = entries
            .iter()
            .find(|entry| entry.action == "call-0")
            .unwrap();
        assert_eq!(first.count, u64::MAX);
        denials.record(MECHANISM_CGROUP, "pids.max", 0);
        assert_eq!(denials.to_vec().len(), MAX_DISTINCT_DENIALS + 1);
    }
}
