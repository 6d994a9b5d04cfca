//! The sandbox's seccomp filter (built with `seccompiler`, installed by [`crate::sandbox_init`]).
//!
//! A deny list: every other system call is allowed, the ones below fail with `EPERM` (never a
//! kill, so tools fail cleanly and say why), except `clone3`, which fails with `ENOSYS` so that
//! the C library falls back to `clone`, whose flags the filter can inspect.
//!
//! - Debugging other processes: `ptrace`, `process_vm_readv`, `process_vm_writev`, `kcmp`,
//!   `pidfd_getfd`, `process_madvise`.
//! - Mounts and namespaces: `mount`, `umount2`, `pivot_root`, `chroot`, `move_mount`,
//!   `open_tree`, `fsopen`, `fsconfig`, `fsmount`, `fspick`, `mount_setattr`, `unshare`, `setns`,
//!   and `clone` with any `CLONE_NEW*` flag.
//! - Kernel attack surface: `bpf`, `io_uring_setup`, `io_uring_enter`, `io_uring_register`,
//!   `keyctl`, `add_key`, `request_key`, `perf_event_open`, `userfaultfd`, `open_by_handle_at`,
//!   `name_to_handle_at`, `lookup_dcookie`.
//! - Host administration: `kexec_load`, `kexec_file_load`, `init_module`, `finit_module`,
//!   `delete_module`, `reboot`, `swapon`, `swapoff`, `acct`, `quotactl`, `syslog`,
//!   `settimeofday`, `clock_settime`, `clock_adjtime`, `adjtimex`, `iopl`, `ioperm`, `vhangup`.
//! - Sockets: `socket` and `socketpair` with a family other than `AF_UNIX`, `AF_INET`,
//!   `AF_INET6` (so no `AF_NETLINK`, `AF_PACKET`, `AF_VSOCK`, ...), or of type `SOCK_RAW`.
//!
//! The architecture is checked by the filter (seccompiler: a foreign architecture's system call
//! kills the process). On x86_64 the x32 ABI (system call numbers with bit 30 set) is not
//! covered by number; it is only safe where the kernel has no x32 support
//! (`CONFIG_X86_X32_ABI` unset, as on the reference host) — the capability probe reports it.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building the filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// This architecture is not supported by seccompiler.
    #[error("unsupported architecture {0}")]
    Architecture(String),
    /// seccompiler rejected the filter.
    #[error("{0}")]
    Build(#[from] seccompiler::BackendError),
}

/// System calls that always fail with `EPERM` inside the sandbox.
pub const DENIED_SYSTEM_CALLS: &[(&str, libc::c_long)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("process_madvise", libc::SYS_process_madvise),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("bpf", libc::SYS_bpf),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("syslog", libc::SYS_syslog),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("vhangup", libc::SYS_vhangup),
    #[cfg(target_arch = "x86_64")]
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
];

/// The `CLONE_NEW*` flags refused in `clone`'s flags.
pub const CLONE_NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME
];

/// Socket families allowed for `socket` and `socketpair`.
pub const ALLOWED_SOCKET_FAMILIES: &[(&str, i32)] = &[
    ("AF_UNIX", libc::AF_UNIX),
    ("AF_INET", libc::AF_INET),
    ("AF_INET6", libc::AF_INET6),
];

fn condition(
    index: u8,
    operator: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        operator,
        value,
    )?)
}

fn socket_rules() -> Result<Vec<SeccompRule>, SeccompError> {
    let unusual_family = ALLOWED_SOCKET_FAMILIES
        .iter()
        .map(|(_, family)| condition(0, SeccompCmpOp::Ne, *family as u64))
        .collect::<Result<Vec<_>, _>>()?;
    let raw = vec![condition(
        1,
        SeccompCmpOp::MaskedEq(0xf),
        libc::SOCK_RAW as u64,
    )?];
    Ok(vec![
        SeccompRule::new(unusual_family)?,
        SeccompRule::new(raw)?,
    ])
}

fn architecture() -> Result<TargetArch, SeccompError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| SeccompError::Architecture(std::env::consts::ARCH.to_owned()))
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    action: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, architecture()?)?;
    Ok(filter.try_into()?)
}

/// The sandbox's filters, in installation order: the `EPERM` deny list, then the `ENOSYS` filter
/// for `clone3`. (Two filters because seccompiler gives one match action per filter; the kernel
/// applies the most restrictive result of all installed filters.)
///
/// Errors: [`SeccompError`] on an unsupported architecture.
pub fn sandbox_filters() -> Result<Vec<BpfProgram>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, number) in DENIED_SYSTEM_CALLS {
        rules.insert(*number, Vec::new());
    }
    rules.insert(libc::SYS_socket, socket_rules()?);
    rules.insert(libc::SYS_socketpair, socket_rules()?);
    let clone_rules = CLONE_NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            SeccompRule::new(vec![condition(0, SeccompCmpOp::MaskedEq(*flag), *flag)?])
                .map_err(SeccompError::from)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = compile(rules, SeccompAction::Errno(libc::EPERM as u32))?;
    let clone3 = compile(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    Ok(vec![deny, clone3])
}

/// `filter` with every `EPERM` return turned into `SECCOMP_RET_USER_NOTIF`: the denied system
/// calls then wait for the supervisor of [`crate::denial`], which records and refuses them.
/// Other returns (allow, the foreign-architecture kill) are unchanged.
pub fn with_user_notification(mut filter: BpfProgram) -> BpfProgram {
    const RETURN_CONSTANT: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let errno_eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    for instruction in &mut filter {
        if instruction.code == RETURN_CONSTANT && instruction.k == errno_eperm {
            instruction.k = libc::SECCOMP_RET_USER_NOTIF;
        }
    }
    filter
}

/// Installs `filter` on the calling thread with `SECCOMP_FILTER_FLAG_NEW_LISTENER` and returns
/// the listener descriptor (close-on-exec). `no_new_privs` must be set.
///
/// Errors: the kernel's (`EBUSY` when a listener filter is installed already, `EINVAL` for a
/// bad program).
pub fn install_with_listener(filter: &BpfProgram) -> std::io::Result<std::os::fd::OwnedFd> {
    let length = u16::try_from(filter.len())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let program = libc::sock_fprog {
        len: length,
        filter: filter.as_ptr().cast_mut().cast(),
    };
    // SAFETY: `program` points at `filter`, alive for the call; the kernel copies it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &program as *const libc::sock_fprog,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let filters = sandbox_filters().unwrap();
        assert_eq!(filters.len(), 2);
        assert!(filters.iter().all(|filter| !filter.is_empty()));
    }

    #[test]
    fn user_notification_replaces_only_eperm() {
        let filters = sandbox_filters().unwrap();
        let notify = with_user_notification(filters[0].clone());
        let returns = |program: &BpfProgram, value: u32| {
            program
                .iter()
                .filter(|instruction| {
                    instruction.code == (libc::BPF_RET | libc::BPF_K) as u16
                        && instruction.k == value
                })
                .count()
        };
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        assert!(returns(&filters[0], eperm) > 0);
        assert_eq!(returns(&notify, eperm), 0);
        assert_eq!(
            returns(&notify, libc::SECCOMP_RET_USER_NOTIF),
            returns(&filters[0], eperm)
        );
        assert_eq!(
            returns(&notify, libc::SECCOMP_RET_ALLOW),
            returns(&filters[0], libc::SECCOMP_RET_ALLOW)
        );
        // The clone3 filter's ENOSYS stays.
        assert_eq!(with_user_notification(filters[1].clone()), filters[1]);
    }
}
