//! Rootless kiln: the user namespace an ordinary user's kiln runs in.
//!
//! At start, before any thread exists, [`enter`] checks who runs kiln. As
//! root with `CAP_SYS_ADMIN` it does nothing. As root without it (root of
//! an unprivileged container) it enters a nested user namespace mapping
//! the ids the container has, writing the maps itself (`CAP_SETUID`,
//! `CAP_SETGID`). As an ordinary user it forks: the child unshares
//! a user namespace and a mount namespace; the parent (still outside)
//! writes the child's id maps with `newuidmap`/`newgidmap` (Debian's
//! `uidmap`: setuid helpers that check `/etc/subuid` and `/etc/subgid`),
//! mapping the user to root (0) and the user's subordinate ids to 1, 2, …;
//! then the child carries on as kiln, root inside its namespace, and the
//! parent waits for it, passes on signals sent to it and exits with its
//! status. Without subordinate ids (or without the helpers) the child maps
//! itself with a one-id map (the user as 0, nothing else) and kiln says
//! what that cannot do: files owned by other ids (in base image layers,
//! `COPY --chown`, `USER` of another id).
//!
//! [`IdMaps::current`] tells whether this process runs in a user
//! namespace other than the initial one (after [`enter`], or kiln started
//! as root of a rootless container): then overlay is mounted with
//! `userxattr`, `sysfs` may have to be bound from the host, and cgroups are
//! written only where a delegated subtree allows it.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Command;

use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, pipe, ForkResult, Pid};

/// Set in the environment of a kiln that [`enter`] put into a user
/// namespace (see [`kiln_fs::idmap::ENTERED_ENV`]).
pub const ROOTLESS_ENV: &str = kiln_fs::idmap::ENTERED_ENV;

/// The file of subordinate user ids.
pub const SUBUID_FILE: &str = "/etc/subuid";
/// The file of subordinate group ids.
pub const SUBGID_FILE: &str = "/etc/subgid";

pub use kiln_fs::idmap::{describe, parse_id_map, IdMaps, IdRange};

/// Failures of entering the user namespace.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    /// A system call failed.
    #[error("rootless: {what}: {source}")]
    Sys {
        /// What was done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `newuidmap`/`newgidmap` refused the map.
    #[error("rootless: {helper} {args} failed ({status}){output}; check the ranges for this user in {file}")]
    Helper {
        /// The helper.
        helper: &'static str,
        /// Its arguments.
        args: String,
        /// How it ended.
        status: String,
        /// What it said (`: …`), or nothing.
        output: String,
        /// The file it checks.
        file: &'static str,
    },
    /// The kernel does not let this user create a user namespace.
    #[error(
        "rootless: cannot create a user namespace ({source}); unprivileged user namespaces may be \
         disabled (sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, an AppArmor \
         or seccomp policy of the container kiln runs in)"
    )]
    NoUserns {
        /// The error of unshare.
        #[source]
        source: std::io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> UsernsError {
    let what = what.into();
    move |e| UsernsError::Sys {
        what,
        source: e.into(),
    }
}

/// The subordinate id ranges `(start, count)` that `file` (`/etc/subuid`
/// format: `name-or-id:start:count` per line) grants the user `name` (or
/// id `id`). A file that cannot be read grants nothing.
pub fn subordinate_ranges(file: &Path, name: Option<&str>, id: u32) -> Vec<(u32, u32)> {
    let Ok(text) = fs::read_to_string(file) else {
        return Vec::new();
    };
    parse_subordinate(&text, name, id)
}

fn parse_subordinate(text: &str, name: Option<&str>, id: u32) -> Vec<(u32, u32)> {
    let id_s = id.to_string();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(':');
            let who = f.next()?;
            let start = f.next()?.trim().parse::<u32>().ok()?;
            let count = f.next()?.trim().parse::<u32>().ok()?;
            (count > 0 && (Some(who) == name || who == id_s)).then_some((start, count))
        })
        .collect()
}

/// What [`enter`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entered {
    /// Running as root (or already inside a namespace kiln made): nothing.
    Nothing,
    /// In a new user namespace with many ids: the user's subordinate
    /// ids, or (root of an unprivileged container) the container's ids.
    Mapped,
    /// In a new user namespace with a one-id map.
    SingleId,
}

/// The user's name, from the passwd database.
fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

fn group_name(gid: u32) -> Option<String> {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// The full map for `id` and its subordinate `ranges`: `0 id 1`, then the
/// ranges from 1 up.
fn full_map(id: u32, ranges: &[(u32, u32)]) -> Vec<IdRange> {
    let mut out = vec![IdRange {
        inside: 0,
        outside: id,
        count: 1,
    }];
    let mut next = 1u32;
    for (start, count) in ranges {
        out.push(IdRange {
            inside: next,
            outside: *start,
            count: *count,
        });
        next = next.saturating_add(*count);
    }
    out
}

/// `newuidmap`/`newgidmap`: the system's own first, then absolute
/// `PATH` entries (never a relative one: `.` in `PATH` ran a
/// `newuidmap` of the build context's).
fn helper_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .chain(std::env::split_paths(&path).filter(|d| d.is_absolute()))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Writes `file` (`uid_map`/`gid_map`) of `pid` directly.
fn write_map(pid: Pid, file: &str, map: &[IdRange]) -> Result<(), UsernsError> {
    let path = format!("/proc/{pid}/{file}");
    let text: String = map
        .iter()
        .map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count))
        .collect();
    fs::write(&path, text).map_err(|source| UsernsError::Sys {
        what: format!(
            "writing {path} ({}; needs CAP_SETUID, CAP_SETGID and CAP_SETFCAP)",
            kiln_fs::idmap::describe(map)
        ),
        source,
    })
}

/// Writes the map of `pid` with `helper` (`newuidmap`/`newgidmap`).
fn run_helper(
    helper: &'static str,
    file: &'static str,
    pid: Pid,
    map: &[IdRange],
) -> Result<(), UsernsError> {
    let path = helper_path(helper).ok_or_else(|| UsernsError::Sys {
        what: format!("{helper} not found"),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let mut args = vec![pid.to_string()];
    for r in map {
        args.extend([r.inside, r.outside, r.count].map(|n| n.to_string()));
    }
    let out = Command::new(&path)
        .args(&args)
        .output()
        .map_err(|source| UsernsError::Sys {
            what: format!("running {}", path.display()),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(UsernsError::Helper {
        helper,
        args: args.join(" "),
        status: out.status.to_string(),
        output: if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        },
        file,
    })
}

/// Enters a user namespace (see the module doc) when run by a user other
/// than root; as root, or inside a namespace kiln made already, does
/// nothing. Call it before any thread exists: it forks, and the process
/// that returns is the child (the parent never returns: it exits with the
/// child's status). `warn` receives what the one-id fallback cannot do.
pub fn enter(warn: &mut dyn FnMut(&str)) -> Result<Entered, UsernsError> {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    if std::env::var_os(ROOTLESS_ENV).is_some() {
        return Ok(Entered::Nothing);
    }
    let plan = if uid == 0 {
        if has_cap(CAP_SYS_ADMIN) {
            return Ok(Entered::Nothing);
        }
        // Root without CAP_SYS_ADMIN: root of an unprivileged container.
        // A nested namespace gives the capabilities back over the ids the
        // container has; CAP_SETUID/CAP_SETGID (and CAP_SETFCAP, to map
        // root) let this process write the child's maps itself.
        let read = |p: &str| parse_id_map(&fs::read_to_string(p).unwrap_or_default());
        let same = |m: Vec<IdRange>| -> Vec<IdRange> {
            m.iter()
                .map(|r| IdRange {
                    inside: r.inside,
                    outside: r.inside,
                    count: r.count,
                })
                .collect()
        };
        if has_cap(CAP_SETUID) && has_cap(CAP_SETGID) {
            Plan::Direct(
                same(read("/proc/self/uid_map")),
                same(read("/proc/self/gid_map")),
            )
        } else {
            warn(
                "rootless: root without CAP_SYS_ADMIN, CAP_SETUID or CAP_SETGID (a container \
                 that dropped them): only one id is mapped; files owned by other users cannot \
                 be created",
            );
            Plan::Single
        }
    } else {
        user_plan(uid, gid, warn)
    };
    let (child_r, child_w) = pipe().map_err(sys("pipe"))?;
    let (parent_r, parent_w) = pipe().map_err(sys("pipe"))?;
    // SAFETY: called before any thread exists (the caller's contract).
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            drop(child_r);
            drop(parent_w);
            let how = match plan {
                Plan::Helpers(..) => "subids",
                Plan::Direct(..) => "direct",
                Plan::Single => "single",
            };
            child(how, uid, gid, child_w, parent_r)
        }
        ForkResult::Parent { child } => {
            drop(child_w);
            drop(parent_r);
            let code = parent(child, &plan, child_r, parent_w);
            std::process::exit(code)
        }
    }
}

/// How the child's id maps are written.
enum Plan {
    /// By `newuidmap`/`newgidmap`, these maps.
    Helpers(Vec<IdRange>, Vec<IdRange>),
    /// By the parent itself (it has CAP_SETUID/CAP_SETGID), these maps.
    Direct(Vec<IdRange>, Vec<IdRange>),
    /// By the child: its own id as 0.
    Single,
}

const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SYS_ADMIN: u32 = 21;

/// Whether capability `cap` is in this process's effective set.
fn has_cap(cap: u32) -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .is_some_and(|eff| eff & (1u64 << cap) != 0)
}

/// The plan for an ordinary user: its subordinate ids through the
/// helpers, else one id (with a warning saying why and what it costs).
fn user_plan(uid: u32, gid: u32, warn: &mut dyn FnMut(&str)) -> Plan {
    let name = user_name(uid);
    let gname = group_name(gid);
    let subuids = subordinate_ranges(Path::new(SUBUID_FILE), name.as_deref(), uid);
    let subgids = subordinate_ranges(Path::new(SUBGID_FILE), name.as_deref(), uid)
        .into_iter()
        .chain(
            // subgid lines may name the group too.
            subordinate_ranges(Path::new(SUBGID_FILE), gname.as_deref(), gid),
        )
        .fold(Vec::new(), |mut v: Vec<(u32, u32)>, r| {
            if !v.contains(&r) {
                v.push(r);
            }
            v
        });
    let helpers = helper_path("newuidmap").is_some() && helper_path("newgidmap").is_some();
    let who = name.clone().unwrap_or_else(|| uid.to_string());
    if subuids.is_empty() || subgids.is_empty() {
        warn(&format!(
            "rootless: no subordinate ids for {who} in {SUBUID_FILE} and {SUBGID_FILE}: only one id is \
             mapped (you, as root in the build); files owned by other users (in base image \
             layers, COPY --chown, USER) cannot be created. Add a range (e.g. `usermod \
             --add-subuids 100000-165535 --add-subgids 100000-165535 {who}`) to build any image"
        ));
        Plan::Single
    } else if !helpers {
        warn(&format!(
            "rootless: newuidmap/newgidmap not found (Debian/Ubuntu package `uidmap`): only one \
             id is mapped (you, as root in the build); files owned by other users cannot be \
             created although {who} has subordinate ids"
        ));
        Plan::Single
    } else {
        Plan::Helpers(full_map(uid, &subuids), full_map(gid, &subgids))
    }
}

/// The child's side: unshare, tell the parent, wait for the maps.
fn child(
    how: &'static str,
    uid: u32,
    gid: u32,
    to_parent: OwnedFd,
    from_parent: OwnedFd,
) -> Result<Entered, UsernsError> {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let single = how == "single";
    let mut to_parent = fs::File::from(to_parent);
    let mut from_parent = fs::File::from(from_parent);
    if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS) {
        let _ = to_parent.write_all(b"E");
        return Err(UsernsError::NoUserns { source: e.into() });
    }
    if single {
        // One id: the process may map itself (with setgroups denied).
        let w = |p: &str, s: String| {
            fs::write(p, s).map_err(|source| UsernsError::Sys {
                what: format!("writing {p}"),
                source,
            })
        };
        w("/proc/self/setgroups", "deny".into())?;
        w("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
        w("/proc/self/gid_map", format!("0 {gid} 1\n"))?;
        let _ = to_parent.write_all(b"S");
    } else {
        to_parent
            .write_all(b"U")
            .map_err(|source| UsernsError::Sys {
                what: "telling the parent".into(),
                source,
            })?;
        let mut b = [0u8; 1];
        match from_parent.read(&mut b) {
            Ok(1) if b[0] == b'G' => {}
            // The parent said what failed.
            _ => std::process::exit(1),
        }
    }
    drop(to_parent);
    drop(from_parent);
    // Root in the namespace: the mapped ids are our own now; become 0/0
    // explicitly (and drop supplementary groups where allowed).
    nix::unistd::setresgid(0.into(), 0.into(), 0.into()).map_err(sys("setresgid 0"))?;
    if !single {
        let _ = nix::unistd::setgroups(&[]);
    }
    nix::unistd::setresuid(0.into(), 0.into(), 0.into()).map_err(sys("setresuid 0"))?;
    // Our own mount namespace: nothing mounted here reaches the host.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(sys("making / rslave"))?;
    // SAFETY: single-threaded (the caller's contract): nothing reads the
    // environment concurrently.
    std::env::set_var(ROOTLESS_ENV, how);
    Ok(if single {
        Entered::SingleId
    } else {
        Entered::Mapped
    })
}

/// The parent's side: write the maps, then wait for the child, passing on
/// signals sent to this process (not those the terminal sent to the whole
/// process group, which the child got too).
fn parent(child: Pid, plan: &Plan, from_child: OwnedFd, to_child: OwnedFd) -> i32 {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
    ] {
        set.add(s);
    }
    let _ = set.thread_block();
    let mut from_child = fs::File::from(from_child);
    let mut to_child = fs::File::from(to_child);
    let mut b = [0u8; 1];
    let said = from_child
        .read(&mut b)
        .ok()
        .filter(|n| *n == 1)
        .map(|_| b[0]);
    // Only a child that unshared ('U') waits for its maps.
    let maps = match (said, plan) {
        (Some(b'U'), Plan::Helpers(u, g)) => Some(
            run_helper("newuidmap", SUBUID_FILE, child, u)
                .and_then(|()| run_helper("newgidmap", SUBGID_FILE, child, g)),
        ),
        (Some(b'U'), Plan::Direct(u, g)) => {
            Some(write_map(child, "uid_map", u).and_then(|()| write_map(child, "gid_map", g)))
        }
        _ => None,
    };
    match maps {
        Some(Ok(())) => {
            let _ = to_child.write_all(b"G");
        }
        Some(Err(e)) => {
            eprintln!("error: {e}");
            let _ = to_child.write_all(b"F");
            let _ = wait_child(child, &set);
            return 1;
        }
        None => {}
    }
    drop(to_child);
    drop(from_child);
    wait_child(child, &set)
}

fn wait_child(child: Pid, set: &SigSet) -> i32 {
    loop {
        loop {
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return code,
                Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(nix::Error::EINTR) => continue,
                Err(_) => return 255,
            }
        }
        // SAFETY: siginfo_t is plain data filled by the kernel.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset; `info` is writable.
        let sig = unsafe { libc::sigwaitinfo(set.as_ref(), &mut info) };
        if sig < 0 || sig == libc::SIGCHLD {
            continue;
        }
        // A signal from the terminal reached the whole process group (the
        // child too); one sent to this pid alone is passed on.
        if info.si_code == libc::SI_KERNEL {
            continue;
        }
        if let Ok(s) = Signal::try_from(sig) {
            let _ = kill(child, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_lines_match_name_or_id() {
        let text = "# c\nalice:100000:65536\n1001:200000:1000\nbob:300000:0\nalice:400000:10\n";
        assert_eq!(
            parse_subordinate(text, Some("alice"), 1000),
            vec![(100000, 65536), (400000, 10)]
        );
        assert_eq!(
            parse_subordinate(text, Some("carol"), 1001),
            vec![(200000, 1000)]
        );
        assert!(parse_subordinate(text, Some("bob"), 1002).is_empty());
    }

    #[test]
    fn full_map_puts_the_user_at_zero() {
        let m = full_map(1000, &[(100000, 65536), (400000, 10)]);
        assert_eq!(
            kiln_fs::idmap::describe(&m),
            "0:1000:1,1:100000:65536,65537:400000:10"
        );
    }
}
