//! Docker's default seccomp profile, compiled for the step.
//!
//! **Semantics.** An allowlist with Docker's (moby `profiles/seccomp`)
//! rules: every syscall not allowed fails with `EPERM` (Docker's
//! `defaultErrnoRet`); a few are allowed only with some arguments
//! (`socket` except `AF_ALG`/`AF_VSOCK`, `personality` with Docker's five
//! values, `clone` without namespace flags);
//! one addition: a step on the host's network namespace (kiln's default,
//! where a Docker container has its own) cannot open `AF_PACKET` sockets,
//! which would see every frame of the host's interfaces, nor raw or
//! `SOCK_PACKET` sockets of `AF_INET`/`AF_INET6` (a raw TCP socket gets a
//! copy of every TCP segment the host receives); rules Docker ties to a
//! capability apply when the step's bounding set holds it (with Docker's
//! default set that adds only `chroot`); `clone3` without `CAP_SYS_ADMIN`
//! and any syscall newer than the profile knows fail with `ENOSYS`, so libc
//! falls back to `clone` and programs to older calls, as under runc.
//!
//! **How.** The allowlist is compiled by `seccompiler` (rust-vmm) for the
//! host architecture (x86_64 and aarch64). `seccompiler` has one action per
//! filter and matches syscall numbers one by one, so the `ENOSYS` answers
//! live in a second, small filter installed after the first: the kernel
//! runs every filter and, for two `ERRNO` answers, returns the newer
//! filter's. For a build step that filter also answers the flush calls
//! (`fsync`, `fdatasync`, `sync_file_range`, `syncfs`, `sync`) with
//! success without running them (see [`ANSWERED_WITHOUT_SYNC`]): an
//! `ERRNO` answer of 0 outranks the allowlist's `ALLOW`. Processes of the compat ABI (i386 on x86_64, arm on
//! aarch64) are killed at their first syscall (Docker allows them; see
//! `docs/security.md`).
//!
//! **Where the switch is.** A spec whose `linux.seccomp` section is present
//! gets this profile (`default_spec()` sets the section; see
//! [`default_seccomp`]); without the section the step is unconfined (as
//! under runc). kiln does not compile custom profiles: a section that lists
//! syscalls of its own, or whose default action is not `SCMP_ACT_ERRNO`, is
//! refused rather than misread.
//!
//! The filter is installed by the init without `no_new_privs` (it holds
//! `CAP_SYS_ADMIN` then), as runc does, so setuid programs keep working in
//! steps as they do under Docker.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompBuilder};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::request::RequestError;

mod table;

/// One BPF instruction as sent to the init: (code, jt, jf, k).
pub(crate) type Insn = (u16, u8, u8, u32);

/// The highest syscall number the profile's tables know (`file_setattr`,
/// Linux 6.17; x86_64 and aarch64 share numbers from 424 on). Anything
/// above answers `ENOSYS`, as runc answers syscalls newer than its
/// libseccomp.
const LAST_KNOWN: u32 = 469;

/// Allowed whatever the arguments and capabilities (Docker's main list,
/// plus its per-architecture entries; names a architecture lacks are
/// skipped through the number table).
const ALLOW: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listmount",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "riscv_hwprobe",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statmount",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "uretprobe",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
    // Architecture-specific entries of the profile.
    "sync_file_range2",
    "swapcontext",
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "breakpoint",
    "cacheflush",
    "set_tls",
    "arch_prctl",
    "modify_ldt",
    "s390_pci_mmio_read",
    "s390_pci_mmio_write",
    "s390_runtime_instr",
    "riscv_flush_icache",
    // Docker allows these from kernel 4.8 on; kiln needs a newer kernel anyway.
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
];

/// Allowed when the step's bounding set holds the capability (bit number).
const BY_CAPABILITY: &[(u32, &[&str])] = &[
    (2, &["open_by_handle_at"]), // CAP_DAC_READ_SEARCH
    (
        21, // CAP_SYS_ADMIN
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "lsm_get_self_attr",
            "lsm_list_modules",
            "lsm_set_self_attr",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    (22, &["reboot"]),                                       // CAP_SYS_BOOT
    (18, &["chroot"]),                                       // CAP_SYS_CHROOT
    (16, &["delete_module", "init_module", "finit_module"]), // CAP_SYS_MODULE
    (20, &["acct"]),                                         // CAP_SYS_PACCT
    (
        19, // CAP_SYS_PTRACE
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    (17, &["iopl", "ioperm"]), // CAP_SYS_RAWIO
    (
        25,
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ), // CAP_SYS_TIME
    (26, &["vhangup"]),        // CAP_SYS_TTY_CONFIG
    (
        23,
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ), // CAP_SYS_NICE
    (34, &["syslog"]),         // CAP_SYSLOG
    (39, &["bpf"]),            // CAP_BPF
    (38, &["perf_event_open"]), // CAP_PERFMON
];

const CAP_SYS_ADMIN: u32 = 21;

/// `socket` domains Docker refuses: AF_ALG (38) and AF_VSOCK (40).
const AF_ALG: u64 = 38;
const AF_VSOCK: u64 = 40;
/// Link-level sockets: refused on the host's network namespace.
const AF_PACKET: u64 = 17;
const AF_INET: u64 = 2;
const AF_INET6: u64 = 10;
/// The type bits of socket(2)'s second argument (the rest are
/// `SOCK_NONBLOCK` and `SOCK_CLOEXEC`).
const SOCK_TYPE_MASK: u64 = 0xf;
/// The socket types an AF_INET/AF_INET6 socket may have on the host's
/// network: stream, datagram, SCTP's seqpacket, DCCP (not raw, not the
/// obsolete SOCK_PACKET).
const INET_TYPES: [u64; 4] = [1, 2, 5, 6];

/// `personality` values Docker allows: PER_LINUX, PER_LINUX32,
/// UNAME26, UNAME26|PER_LINUX32, and the query 0xffffffff.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// The `clone` flags that create namespaces (CLONE_NEWNS, NEWCGROUP, NEWUTS,
/// NEWIPC, NEWUSER, NEWPID, NEWNET): Docker's mask 0x7E020000.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: u32 = 0;

/// The `linux.seccomp` section [`crate::default_spec`] sets: "Docker's
/// default profile". kiln fills in the rules itself from the step's
/// capabilities, so the section carries only the default action and errno.
pub fn default_seccomp() -> LinuxSeccomp {
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(libc::EPERM as u32)
        .build()
        .unwrap_or_default()
}

fn syscall_nr(name: &str) -> Option<i64> {
    table::SYSCALLS
        .iter()
        .chain(table::COMMON)
        .find(|(n, _)| *n == name)
        .map(|(_, nr)| *nr)
}

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, len, op, value)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(conds)
}

/// What one syscall may do: always, or when one of the rules matches.
enum Allow {
    Always,
    When(Vec<SeccompRule>),
}

/// The allowlist for a step whose bounding set is `bounding`, by syscall
/// name (names this architecture lacks included; they are dropped later).
fn allowlist(
    bounding: u64,
    host_network: bool,
) -> Result<BTreeMap<&'static str, Allow>, seccompiler::BackendError> {
    let mut m: BTreeMap<&'static str, Allow> = BTreeMap::new();
    let always = |m: &mut BTreeMap<&'static str, Allow>, n: &'static str| {
        m.insert(n, Allow::Always);
    };
    for n in ALLOW {
        always(&mut m, n);
    }
    for (cap, names) in BY_CAPABILITY {
        if bounding & (1u64 << cap) != 0 {
            for n in *names {
                always(&mut m, n);
            }
        }
    }
    let when = |m: &mut BTreeMap<&'static str, Allow>, n: &'static str, r: SeccompRule| match m
        .entry(n)
        .or_insert_with(|| Allow::When(Vec::new()))
    {
        Allow::Always => {}
        Allow::When(v) => v.push(r),
    };
    use SeccompCmpArgLen::{Dword, Qword};
    // socket(2): every domain but AF_ALG and AF_VSOCK (and, on the host's
    // network, AF_PACKET and raw or SOCK_PACKET sockets of AF_INET and
    // AF_INET6: a raw TCP socket receives a copy of every TCP segment the
    // host gets; netlink's raw sockets stay).
    let below_alg = if host_network {
        when(
            &mut m,
            "socket",
            rule(vec![
                cond(0, Dword, SeccompCmpOp::Lt, AF_PACKET)?,
                cond(0, Dword, SeccompCmpOp::Ne, AF_INET)?,
                cond(0, Dword, SeccompCmpOp::Ne, AF_INET6)?,
            ])?,
        );
        for domain in [AF_INET, AF_INET6] {
            for ty in INET_TYPES {
                when(
                    &mut m,
                    "socket",
                    rule(vec![
                        cond(0, Dword, SeccompCmpOp::Eq, domain)?,
                        cond(1, Dword, SeccompCmpOp::MaskedEq(SOCK_TYPE_MASK), ty)?,
                    ])?,
                );
            }
        }
        rule(vec![
            cond(0, Dword, SeccompCmpOp::Gt, AF_PACKET)?,
            cond(0, Dword, SeccompCmpOp::Lt, AF_ALG)?,
        ])?
    } else {
        rule(vec![cond(0, Dword, SeccompCmpOp::Lt, AF_ALG)?])?
    };
    when(&mut m, "socket", below_alg);
    when(
        &mut m,
        "socket",
        rule(vec![cond(0, Dword, SeccompCmpOp::Eq, AF_ALG + 1)?])?,
    );
    when(
        &mut m,
        "socket",
        rule(vec![cond(0, Dword, SeccompCmpOp::Gt, AF_VSOCK)?])?,
    );
    for p in PERSONALITIES {
        when(
            &mut m,
            "personality",
            rule(vec![cond(0, Dword, SeccompCmpOp::Eq, *p)?])?,
        );
    }
    if bounding & (1u64 << CAP_SYS_ADMIN) == 0 {
        // clone(2) without namespace flags (the flags are argument 0 on
        // x86_64 and aarch64).
        when(
            &mut m,
            "clone",
            rule(vec![cond(
                0,
                Qword,
                SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS),
                0,
            )?])?,
        );
    }
    Ok(m)
}

fn to_insns(p: BpfProgram) -> Vec<Insn> {
    p.into_iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect()
}

/// Syscalls a build step's filter answers with success without running
/// them (`ExecRequest::skip_flushes`): its requests to flush files to
/// disk. A build step's files become a layer through the page cache (kiln
/// commits a snapshot without syncing it, and `kiln system check` finds a
/// layer a power loss damaged), so a flush inside it buys nothing, while
/// `dpkg` alone flushes every file it unpacks and `sync`/`syncfs` flush the
/// whole host's dirty pages, other builds' too. What the step reads back
/// is the same either way. `kiln run` flushes for real: its `-v` mounts
/// are the user's own files.
pub const ANSWERED_WITHOUT_SYNC: &[&str] = &[
    "fsync",
    "fdatasync",
    "sync_file_range",
    "sync_file_range2",
    "syncfs",
    "sync",
];

/// The small filter answering, before the allowlist: `ENOSYS` for
/// syscalls above [`LAST_KNOWN`] and, when `clone3_enosys`, for `clone3`;
/// with `skip_flushes`, success for [`ANSWERED_WITHOUT_SYNC`]. Other
/// architectures pass (the allowlist filter kills them).
fn answers_filter(clone3_enosys: bool, skip_flushes: bool) -> Vec<Insn> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const NR_OFFSET: u32 = 0; // seccomp_data.nr
    const ARCH_OFFSET: u32 = 4; // seccomp_data.arch
                                // An impossible number when clone3 is allowed (the jump never matches).
    let clone3 = syscall_nr("clone3")
        .filter(|_| clone3_enosys)
        .map(|n| n as u32)
        .unwrap_or(u32::MAX);
    let synced: Vec<u32> = ANSWERED_WITHOUT_SYNC
        .iter()
        .filter(|_| skip_flushes)
        .filter_map(|n| syscall_nr(n))
        .map(|n| n as u32)
        .collect();
    let n = synced.len() as u8;
    // 0 ld arch; 1 our arch? (else ALLOW); 2 ld nr; 3 newer than the
    // profile? -> ENOSYS; 4 clone3? -> ENOSYS; 5.. one test per synced
    // call -> 0; then ret ALLOW (5+n), ret ENOSYS (6+n), ret 0 (7+n).
    // A jump counts from the next instruction.
    let mut p = vec![
        (LD_W_ABS, 0, 0, ARCH_OFFSET),
        (JEQ_K, 0, 3 + n, AUDIT_ARCH),
        (LD_W_ABS, 0, 0, NR_OFFSET),
        (JGT_K, 2 + n, 0, LAST_KNOWN),
        (JEQ_K, 1 + n, 0, clone3),
    ];
    for (i, nr) in synced.iter().enumerate() {
        p.push((JEQ_K, 1 + n - i as u8, 0, *nr));
    }
    p.push((RET_K, 0, 0, libc::SECCOMP_RET_ALLOW));
    p.push((RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32));
    p.push((RET_K, 0, 0, libc::SECCOMP_RET_ERRNO)); // errno 0: success
    p
}

/// Compile the filters for a spec's `linux.seccomp` section, the step's
/// bounding set and whether it shares the host's network namespace: the
/// programs to install, in order.
pub(crate) fn compile(
    section: &LinuxSeccomp,
    bounding: u64,
    host_network: bool,
    skip_flushes: bool,
) -> Result<Vec<Vec<Insn>>, RequestError> {
    let bad = |why: String| RequestError::UnsupportedSeccomp(why);
    if section.syscalls().as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(bad(
            "custom profiles are not supported: give the section default_spec() sets (Docker's default profile) or none (unconfined)".into(),
        ));
    }
    if section.default_action() != LinuxSeccompAction::ScmpActErrno {
        return Err(bad(format!(
            "default action {} is not supported (only SCMP_ACT_ERRNO, Docker's)",
            section.default_action()
        )));
    }
    if table::SYSCALLS.is_empty() {
        return Err(bad(format!(
            "no syscall table for {}: run unconfined",
            std::env::consts::ARCH
        )));
    }
    let errno = section.default_errno_ret().unwrap_or(libc::EPERM as u32);
    // The programs depend on these four only: compiled once a process,
    // not once a step.
    type Memo = std::collections::HashMap<(u32, u64, bool, bool), Vec<Vec<Insn>>>;
    static MEMO: std::sync::OnceLock<std::sync::Mutex<Memo>> = std::sync::OnceLock::new();
    let memo = MEMO.get_or_init(Default::default);
    let key = (errno, bounding, host_network, skip_flushes);
    if let Some(p) = memo.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(p);
    }
    let programs = build(errno, bounding, host_network, skip_flushes)?;
    if let Ok(mut m) = memo.lock() {
        m.insert(key, programs.clone());
    }
    Ok(programs)
}

/// Compiles the two programs [`compile`] hands out.
fn build(
    errno: u32,
    bounding: u64,
    host_network: bool,
    skip_flushes: bool,
) -> Result<Vec<Vec<Insn>>, RequestError> {
    let bad = |why: String| RequestError::UnsupportedSeccomp(why);
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| bad(e.to_string()))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (name, allow) in allowlist(bounding, host_network).map_err(|e| bad(e.to_string()))? {
        let Some(nr) = syscall_nr(name) else { continue };
        rules.insert(
            nr,
            match allow {
                Allow::Always => Vec::new(),
                Allow::When(v) => v,
            },
        );
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(errno),
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| bad(e.to_string()))?;
    let main: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| bad(e.to_string()))?;
    if main.len() > libc::BPF_MAXINSNS as usize {
        return Err(bad(format!(
            "filter of {} instructions is too long",
            main.len()
        )));
    }
    let clone3_enosys = bounding & (1u64 << CAP_SYS_ADMIN) == 0;
    Ok(vec![
        to_insns(main),
        answers_filter(clone3_enosys, skip_flushes),
    ])
}

/// Install `programs` in order on the calling thread. Needs CAP_SYS_ADMIN
/// or no_new_privs (which this does not set).
pub(crate) fn install(programs: &[Vec<Insn>]) -> nix::Result<()> {
    for p in programs {
        let mut insns: Vec<libc::sock_filter> = p
            .iter()
            .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
            .collect();
        let len = u16::try_from(insns.len()).map_err(|_| nix::Error::E2BIG)?;
        let prog = libc::sock_fprog {
            len,
            filter: insns.as_mut_ptr(),
        };
        // SAFETY: the kernel copies the program; `insns` outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0 as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        };
        if r != 0 {
            return Err(nix::Error::last());
        }
    }
    Ok(())
}

/// Join a fresh anonymous session keyring (`_ses`), as runc does, so the
/// step does not share the session keyring kiln was started with. A kernel
/// without keyrings (`ENOSYS`), or an outer seccomp filter that denies
/// `keyctl` (`EPERM`: kiln itself runs in a container; the step cannot
/// reach any keyring then either), is fine.
pub(crate) fn join_session_keyring() -> nix::Result<()> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_int = 1;
    // SAFETY: keyctl with an integer operation and a NULL name.
    let r = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    if r < 0 {
        let e = nix::Error::last();
        if e != nix::Error::ENOSYS && e != nix::Error::EPERM {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::DEFAULT_CAPS;

    #[test]
    fn default_caps_allow_chroot_but_not_admin_calls() {
        let m = allowlist(DEFAULT_CAPS, true).unwrap();
        for n in [
            "chroot",
            "read",
            "execve",
            "setresuid",
            "capset",
            "prctl",
            "statx",
        ] {
            assert!(matches!(m.get(n), Some(Allow::Always)), "{n}");
        }
        for n in [
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "kexec_load",
            "init_module",
            "finit_module",
            "delete_module",
            "mount",
            "umount2",
            "pivot_root",
            "unshare",
            "setns",
            "clone3",
            "open_by_handle_at",
            "reboot",
            "kcmp",
        ] {
            assert!(!m.contains_key(n), "{n} must be denied");
        }
        assert!(matches!(m.get("clone"), Some(Allow::When(r)) if r.len() == 1));
        // On the host's network: below AF_PACKET but AF_INET/AF_INET6,
        // those two with four socket types each, between AF_PACKET and
        // AF_ALG, between AF_ALG and AF_VSOCK, above AF_VSOCK.
        assert!(matches!(m.get("socket"), Some(Allow::When(r)) if r.len() == 12));
        let own = allowlist(DEFAULT_CAPS, false).unwrap();
        assert!(matches!(own.get("socket"), Some(Allow::When(r)) if r.len() == 3));
        assert!(matches!(m.get("personality"), Some(Allow::When(r)) if r.len() == 5));
    }

    #[test]
    fn sys_admin_allows_namespaces() {
        let m = allowlist(DEFAULT_CAPS | 1 << CAP_SYS_ADMIN, false).unwrap();
        for n in ["clone", "clone3", "unshare", "setns", "mount"] {
            assert!(matches!(m.get(n), Some(Allow::Always)), "{n}");
        }
    }

    #[test]
    fn every_profile_name_known_on_x86_64_resolves() {
        #[cfg(target_arch = "x86_64")]
        for n in [
            "open",
            "stat",
            "fork",
            "arch_prctl",
            "modify_ldt",
            "statx",
            "clone3",
            "mseal",
        ] {
            assert!(syscall_nr(n).is_some(), "{n}");
        }
        for n in [
            "read",
            "openat",
            "clone3",
            "keyctl",
            "socket",
            "personality",
        ] {
            assert!(syscall_nr(n).is_some(), "{n}");
        }
    }

    #[test]
    fn compiles_within_limits() {
        let p = compile(&default_seccomp(), DEFAULT_CAPS, true, false).unwrap();
        assert_eq!(p.len(), 2);
        assert!(p[0].len() < libc::BPF_MAXINSNS as usize);
        assert_eq!(p[1].len(), 8);
        let synced = ANSWERED_WITHOUT_SYNC
            .iter()
            .filter(|n| syscall_nr(n).is_some())
            .count();
        assert!(synced >= 5, "{synced}");
        let p = compile(&default_seccomp(), DEFAULT_CAPS, true, true).unwrap();
        assert_eq!(p[1].len(), 8 + synced);
    }

    #[test]
    fn custom_profiles_are_refused() {
        let mut s = default_seccomp();
        s.set_default_action(LinuxSeccompAction::ScmpActAllow);
        assert!(compile(&s, DEFAULT_CAPS, true, false).is_err());
        let mut s = default_seccomp();
        s.set_syscalls(Some(vec![oci_spec::runtime::LinuxSyscallBuilder::default(
        )
        .names(vec!["read".to_string()])
        .action(LinuxSeccompAction::ScmpActAllow)
        .build()
        .unwrap()]));
        assert!(compile(&s, DEFAULT_CAPS, true, false).is_err());
    }
}
