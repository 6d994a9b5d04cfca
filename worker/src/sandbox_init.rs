//! The sandbox init: the first program bubblewrap executes inside the sandbox, after it has built
//! the mounts (Landlock forbids later mount changes, so it must come after them). It
//!
//! 1. sets `no_new_privs` (bubblewrap already does; set again so the init never depends on it);
//! 2. applies a Landlock ruleset ([`LandlockPolicy`]): read anywhere visible, write only beneath
//!    the `--write` roots, execute only beneath the `--exec` roots, plus signal and abstract Unix
//!    socket scoping (Landlock ABI ≥ 6), all as a hard requirement: a kernel that cannot enforce
//!    every requested right makes the init fail, never run degraded;
//! 3. installs the seccomp filter of [`crate::seccomp`] (denied system calls fail with `EPERM`);
//!    with `--seccomp notify` the deny list notifies instead, and the init sends the listener
//!    descriptor on the socket at descriptor [`crate::denial::LISTENER_SOCKET_FD`] and closes
//!    both (the worker's supervisor then records each denial and answers `EPERM`);
//! 4. writes one byte to file descriptor 3 (the start marker of [`crate::sandbox`]), closes it,
//!    and executes the command.
//!
//! Invocation (built by [`init_arguments`]):
//!
//! ```text
//! <init> [sandbox-init] [--landlock required|off] [--exec DIR]... [--write DIR]...
//!        [--write-noexec DIR]... [--device DIR]... [--seccomp on|notify|off] -- PROGRAM ARG...
//! ```
//!
//! `--write` roots get every file-system right, execution included (the workspace);
//! `--write-noexec` roots every right but execution (`/tmp`, `/dev/shm`); `--device` roots read,
//! write and ioctl on existing files (`/dev`). On any failure the init prints
//! `flotilla-sandbox-init: <reason>` on standard error and exits with [`INIT_FAILURE_EXIT_CODE`]
//! without writing the marker, so the worker reports that the sandbox did not start.
//!
//! It is reached through the hidden `flotilla sandbox-init` subcommand of the node binary, and the
//! `flotilla-sandbox-init` binary of this crate (for its tests).

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};

/// Exit code of the init when it cannot set up the sandbox.
pub const INIT_FAILURE_EXIT_CODE: i32 = 125;

/// The name of the node binary's hidden subcommand that runs [`main`].
pub const INIT_SUBCOMMAND: &str = "sandbox-init";

/// The file descriptor on which the init signals that the sandbox is set up.
const START_MARKER_FD: libc::c_int = 3;

/// What Landlock allows inside the sandbox (paths as seen inside it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LandlockPolicy {
    /// Whether Landlock is applied at all (`false` only when the operator allowed running without
    /// it: `allow_without_landlock`).
    pub enabled: bool,
    /// Roots beneath which files may be read and executed (toolchains, `/usr`, the workspace).
    pub execute_roots: Vec<PathBuf>,
    /// Roots beneath which everything is allowed, execution included (the workspace).
    pub write_roots: Vec<PathBuf>,
    /// Roots beneath which everything but execution is allowed (`/tmp`, `/dev/shm`).
    pub write_noexec_roots: Vec<PathBuf>,
    /// Roots of device files: read, write, truncate and ioctl on existing files (`/dev`).
    pub device_roots: Vec<PathBuf>,
}

/// How the init installs the seccomp filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filter (only when the operator allowed it).
    Off,
    /// Denied system calls fail with `EPERM`, unrecorded (`on`).
    Errno,
    /// Denied system calls are sent to the worker's supervisor, which records them and answers
    /// `EPERM` (`notify`; see [`crate::denial`]).
    Notify,
}

impl SeccompMode {
    fn name(self) -> &'static str {
        match self {
            SeccompMode::Off => "off",
            SeccompMode::Errno => "on",
            SeccompMode::Notify => "notify",
        }
    }
}

/// The init's parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitInvocation {
    /// The Landlock rules.
    pub landlock: LandlockPolicy,
    /// How the seccomp filter is installed.
    pub seccomp: SeccompMode,
    /// The program and its arguments.
    pub command: Vec<OsString>,
}

/// The init's arguments for `invocation` (without the program name), as parsed by
/// [`parse_arguments`].
pub fn init_arguments(invocation: &InitInvocation) -> Vec<OsString> {
    let mut arguments: Vec<OsString> = vec![INIT_SUBCOMMAND.into()];
    arguments.push("--landlock".into());
    arguments.push(if invocation.landlock.enabled {
        "required".into()
    } else {
        "off".into()
    });
    let groups: [(&str, &Vec<PathBuf>); 4] = [
        ("--exec", &invocation.landlock.execute_roots),
        ("--write", &invocation.landlock.write_roots),
        ("--write-noexec", &invocation.landlock.write_noexec_roots),
        ("--device", &invocation.landlock.device_roots),
    ];
    for (flag, paths) in groups {
        for path in paths {
            arguments.push(flag.into());
            arguments.push(path.as_os_str().to_owned());
        }
    }
    arguments.push("--seccomp".into());
    arguments.push(invocation.seccomp.name().into());
    arguments.push("--".into());
    arguments.extend(invocation.command.iter().cloned());
    arguments
}

/// Parses the init's arguments (after the program name; a leading `sandbox-init` is skipped).
///
/// Errors: a message naming the unknown flag, the flag without a value, a bad value, or a missing
/// command.
pub fn parse_arguments(arguments: &[OsString]) -> Result<InitInvocation, String> {
    let mut index = 0;
    if arguments
        .first()
        .is_some_and(|first| first == INIT_SUBCOMMAND)
    {
        index = 1;
    }
    let mut invocation = InitInvocation {
        landlock: LandlockPolicy {
            enabled: true,
            ..LandlockPolicy::default()
        },
        seccomp: SeccompMode::Errno,
        command: Vec::new(),
    };
    while index < arguments.len() {
        let flag = arguments[index].to_string_lossy().into_owned();
        if flag == "--" {
            invocation.command = arguments[index + 1..].to_vec();
            break;
        }
        let Some(value) = arguments.get(index + 1) else {
            return Err(format!("{flag} needs a value"));
        };
        match flag.as_str() {
            "--landlock" => {
                invocation.landlock.enabled = match value.to_str() {
                    Some("required") => true,
                    Some("off") => false,
                    _ => return Err("--landlock must be required or off".to_owned()),
                }
            }
            "--seccomp" => {
                invocation.seccomp = match value.to_str() {
                    Some("on") => SeccompMode::Errno,
                    Some("notify") => SeccompMode::Notify,
                    Some("off") => SeccompMode::Off,
                    _ => return Err("--seccomp must be on, notify or off".to_owned()),
                }
            }
            "--exec" => invocation.landlock.execute_roots.push(value.into()),
            "--write" => invocation.landlock.write_roots.push(value.into()),
            "--write-noexec" => invocation.landlock.write_noexec_roots.push(value.into()),
            "--device" => invocation.landlock.device_roots.push(value.into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
        index += 2;
    }
    if invocation.command.is_empty() {
        return Err("no command after --".to_owned());
    }
    Ok(invocation)
}

/// Errors of [`apply_landlock`].
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// The kernel cannot enforce the requested rights (or Landlock is off).
    #[error("Landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
    /// A rule's path cannot be opened.
    #[error("Landlock: cannot open {path}: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// Why.
        source: landlock::PathFdError,
    },
    /// The ruleset was not fully enforced.
    #[error("Landlock: the ruleset is only {0:?}")]
    NotEnforced(RulesetStatus),
}

/// The Landlock ABI whose file-system rights the init requires.
pub const LANDLOCK_FILESYSTEM_ABI: ABI = ABI::V5;
/// The Landlock ABI whose scopes (signals, abstract Unix sockets) the init requires.
pub const LANDLOCK_SCOPE_ABI: ABI = ABI::V6;

/// Restricts the calling thread (and what it executes) with `policy`, as a hard requirement.
///
/// Errors: [`LandlockError`] when the kernel lacks a requested right or a path cannot be opened.
pub fn apply_landlock(policy: &LandlockPolicy) -> Result<(), LandlockError> {
    let all = AccessFs::from_all(LANDLOCK_FILESYSTEM_ABI);
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let execute = read | AccessFs::Execute;
    let device = read | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(all)?
        .scope(Scope::from_all(LANDLOCK_SCOPE_ABI))?
        .create()?;
    let mut rules: Vec<(PathBuf, BitFlags<AccessFs>)> = vec![(PathBuf::from("/"), read)];
    rules.extend(
        policy
            .execute_roots
            .iter()
            .map(|path| (path.clone(), execute)),
    );
    rules.extend(policy.write_roots.iter().map(|path| (path.clone(), all)));
    rules.extend(
        policy
            .write_noexec_roots
            .iter()
            .map(|path| (path.clone(), all & !AccessFs::Execute)),
    );
    rules.extend(
        policy
            .device_roots
            .iter()
            .map(|path| (path.clone(), device)),
    );
    for (path, access) in rules {
        let fd = PathFd::new(&path).map_err(|source| LandlockError::Path {
            path: path.clone(),
            source,
        })?;
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
    }
    let status = ruleset.restrict_self()?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(LandlockError::NotEnforced(status.ruleset));
    }
    Ok(())
}

/// Installs the filters of [`crate::seccomp::sandbox_filters`]; in [`SeccompMode::Notify`] the
/// deny list as a listener filter whose descriptor goes to the worker. Fails the init on any
/// error.
fn install_seccomp(mode: SeccompMode) {
    let mut filters = match crate::seccomp::sandbox_filters() {
        Ok(filters) => filters.into_iter(),
        Err(error) => fail(&format!("cannot build the seccomp filter: {error}")),
    };
    if mode == SeccompMode::Notify
        && let Some(deny) = filters.next()
    {
        let notifying = crate::seccomp::with_user_notification(deny);
        let listener = match crate::seccomp::install_with_listener(&notifying) {
            Ok(listener) => listener,
            Err(error) => fail(&format!(
                "cannot install the seccomp listener filter: {error}"
            )),
        };
        // SAFETY: the worker opened LISTENER_SOCKET_FD for this process; it is closed below and
        // not used after.
        let socket = unsafe { BorrowedFd::borrow_raw(crate::denial::LISTENER_SOCKET_FD) };
        let sent = send_descriptor(socket, listener.as_fd());
        // SAFETY: closing a descriptor number this process owns.
        unsafe {
            libc::close(crate::denial::LISTENER_SOCKET_FD);
        }
        if let Err(error) = sent {
            fail(&format!(
                "cannot send the seccomp listener to the worker: {error}"
            ));
        }
    }
    for filter in filters {
        if let Err(error) = seccompiler::apply_filter(&filter) {
            fail(&format!("cannot install the seccomp filter: {error}"));
        }
    }
}

/// Sends `descriptor` on `socket` (one data byte and `SCM_RIGHTS`).
fn send_descriptor(socket: BorrowedFd<'_>, descriptor: BorrowedFd<'_>) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let descriptors = [descriptor];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if !ancillary.push(SendAncillaryMessage::ScmRights(&descriptors)) {
        return Err(std::io::Error::from(std::io::ErrorKind::OutOfMemory));
    }
    let sent = rustix::net::sendmsg(
        socket,
        &[std::io::IoSlice::new(b"l")],
        &mut ancillary,
        SendFlags::NOSIGNAL,
    )?;
    if sent != 1 {
        return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
    }
    Ok(())
}

fn fail(message: &str) -> ! {
    eprintln!("flotilla-sandbox-init: {message}");
    std::process::exit(INIT_FAILURE_EXIT_CODE);
}

/// The init's entry point (see the module documentation): reads `std::env::args_os()`, sets up
/// the restrictions and executes the command. Never returns.
pub fn main() -> ! {
    let arguments: Vec<OsString> = std::env::args_os().skip(1).collect();
    let invocation = match parse_arguments(&arguments) {
        Ok(invocation) => invocation,
        Err(message) => fail(&message),
    };
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) has no memory-safety preconditions.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        fail(&format!(
            "cannot set no_new_privs: {}",
            std::io::Error::last_os_error()
        ));
    }
    if invocation.landlock.enabled
        && let Err(error) = apply_landlock(&invocation.landlock)
    {
        fail(&error.to_string());
    }
    let program = match CString::new(invocation.command[0].as_bytes()) {
        Ok(program) => program,
        Err(_) => fail("the program contains a NUL byte"),
    };
    let mut argv: Vec<CString> = Vec::with_capacity(invocation.command.len());
    for argument in &invocation.command {
        match CString::new(argument.as_bytes()) {
            Ok(argument) => argv.push(argument),
            Err(_) => fail("an argument contains a NUL byte"),
        }
    }
    let mut argv_pointers: Vec<*const libc::c_char> =
        argv.iter().map(|argument| argument.as_ptr()).collect();
    argv_pointers.push(std::ptr::null());
    if invocation.seccomp != SeccompMode::Off {
        install_seccomp(invocation.seccomp);
    }
    // SAFETY: write/close on a descriptor number; a missing descriptor only gives EBADF.
    unsafe {
        libc::write(START_MARKER_FD, b"s".as_ptr().cast(), 1);
        libc::close(START_MARKER_FD);
    }
    // SAFETY: `program` and every pointer in `argv_pointers` (null-terminated) point into
    // `argv`/`program`, alive until execv returns; `environ` is the process's own environment.
    unsafe {
        libc::execv(program.as_ptr(), argv_pointers.as_ptr());
    }
    fail(&format!(
        "cannot execute {:?}: {}",
        invocation.command[0],
        std::io::Error::last_os_error()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let invocation = InitInvocation {
            landlock: LandlockPolicy {
                enabled: true,
                execute_roots: vec!["/usr".into(), "/workspace".into()],
                write_roots: vec!["/workspace".into()],
                write_noexec_roots: vec!["/tmp".into()],
                device_roots: vec!["/dev".into()],
            },
            seccomp: SeccompMode::Notify,
            command: vec!["/bin/sh".into(), "-c".into(), "echo -- hi".into()],
        };
        let arguments = init_arguments(&invocation);
        assert_eq!(parse_arguments(&arguments).unwrap(), invocation);
        assert!(parse_arguments(&["--exec".into()]).is_err());
        assert!(parse_arguments(&["--bogus".into(), "x".into(), "--".into(), "a".into()]).is_err());
        assert!(parse_arguments(&["--".into()]).is_err());
    }
}
