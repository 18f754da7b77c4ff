//! Docker-style `USER` resolution against a rootfs's own /etc/passwd and
//! /etc/group (runc's `GetExecUser` semantics).
//!
//! The files are opened with `openat2(RESOLVE_IN_ROOT)`, so a symlinked
//! `/etc/passwd` in an image resolves inside the rootfs, never on the host.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

/// Largest passwd/group file read.
const MAX_FILE: u64 = 16 << 20;

/// Failures of user resolution.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// No passwd entry with that name.
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoUser(String),
    /// No group entry with that name.
    #[error("unable to find group {0}: no matching entries in group file")]
    NoGroup(String),
    /// A numeric id out of range.
    #[error("invalid {what} id {value:?} in user spec")]
    BadId {
        /// `uid` or `gid`.
        what: &'static str,
        /// The text.
        value: String,
    },
    /// The rootfs or one of its files could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// File inside the rootfs.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The result of resolving a `USER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (from /etc/group membership, implicit form only).
    pub additional_gids: Vec<u32>,
    /// Home directory from passwd, `/` when there is no entry (as Docker).
    pub home: String,
}

/// Resolve a Docker-style user (`name`, `uid`, `uid:gid`, `name:group`,
/// `uid:group`, empty = root) against the rootfs at `rootfs`.
///
/// ```no_run
/// let u = kiln_executor::resolve_user("/path/to/rootfs".as_ref(), "nobody").unwrap();
/// assert_eq!(u.uid, 65534);
/// ```
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<ResolvedUser, UserError> {
    let root = nix::fcntl::open(
        rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UserError::Io {
        path: rootfs.to_path_buf(),
        source: e.into(),
    })?;
    let passwd = read_in_root(&root, "etc/passwd")?;
    let group = read_in_root(&root, "etc/group")?;
    resolve_with(user, &passwd, &group)
}

/// Read a file inside `root` (missing file = empty).
fn read_in_root(root: &OwnedFd, rel: &str) -> Result<String, UserError> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let io_err = |e: std::io::Error| UserError::Io {
        path: PathBuf::from("/").join(rel),
        source: e,
    };
    let fd = match nix::fcntl::openat2(root, rel, how) {
        Ok(fd) => fd,
        Err(nix::Error::ENOENT) | Err(nix::Error::ENOTDIR) => return Ok(String::new()),
        Err(e) => return Err(io_err(e.into())),
    };
    let mut s = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_FILE)
        .read_to_end(&mut s)
        .map_err(io_err)?;
    Ok(String::from_utf8_lossy(&s).into_owned())
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|l| {
        let l = l.trim_end();
        if l.is_empty() || l.starts_with('#') {
            return None;
        }
        let f: Vec<&str> = l.split(':').collect();
        Some(PasswdEntry {
            name: f.first().copied()?,
            uid: f.get(2)?.parse().ok()?,
            gid: f.get(3)?.parse().ok()?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|l| {
        let l = l.trim_end();
        if l.is_empty() || l.starts_with('#') {
            return None;
        }
        let f: Vec<&str> = l.split(':').collect();
        Some(GroupEntry {
            name: f.first().copied()?,
            gid: f.get(2)?.parse().ok()?,
            members: f
                .get(3)
                .map(|m| m.split(',').filter(|s| !s.is_empty()).collect())
                .unwrap_or_default(),
        })
    })
}

fn parse_id(what: &'static str, s: &str) -> Result<Option<u32>, UserError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match s.parse::<u32>() {
        Ok(v) if v <= i32::MAX as u32 => Ok(Some(v)),
        _ => Err(UserError::BadId {
            what,
            value: s.to_string(),
        }),
    }
}

/// Resolve `user` with the given passwd and group file contents.
pub(crate) fn resolve_with(
    user: &str,
    passwd: &str,
    group: &str,
) -> Result<ResolvedUser, UserError> {
    let (user_arg, group_arg) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user_arg = if user_arg.is_empty() { "0" } else { user_arg };
    let numeric_uid = parse_id("uid", user_arg)?;
    let matched = passwd_entries(passwd).find(|e| match numeric_uid {
        Some(uid) => e.uid == uid,
        None => e.name == user_arg,
    });
    let mut out = ResolvedUser {
        uid: 0,
        gid: 0,
        additional_gids: Vec::new(),
        home: "/".into(),
    };
    let matched_name = match (&matched, numeric_uid) {
        (Some(e), _) => {
            out.uid = e.uid;
            out.gid = e.gid;
            if !e.home.is_empty() {
                out.home = e.home.to_string();
            }
            Some(e.name)
        }
        (None, Some(uid)) => {
            out.uid = uid;
            None
        }
        (None, None) => return Err(UserError::NoUser(user_arg.to_string())),
    };
    match group_arg {
        Some(g) if !g.is_empty() => {
            let numeric_gid = parse_id("gid", g)?;
            let found = group_entries(group).find(|e| match numeric_gid {
                Some(gid) => e.gid == gid,
                None => e.name == g,
            });
            out.gid = match (found, numeric_gid) {
                (Some(e), _) => e.gid,
                (None, Some(gid)) => gid,
                (None, None) => return Err(UserError::NoGroup(g.to_string())),
            };
        }
        _ => {
            if let Some(name) = matched_name {
                for e in group_entries(group) {
                    if e.members.contains(&name) && !out.additional_gids.contains(&e.gid) {
                        out.additional_gids.push(e.gid);
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/sh\n\
        nohome:x:1001:1001::\n";
    const GROUP: &str = "root:x:0:\nalice:x:1000:\nstaff:x:50:alice,bob\nwheel:x:10:alice\n";

    #[test]
    fn name_gets_home_and_supplementary_groups() {
        let u = resolve_with("alice", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1000, 1000, "/home/alice"));
        assert_eq!(u.additional_gids, vec![50, 10]);
    }

    #[test]
    fn numeric_uid_without_entry() {
        let u = resolve_with("4242", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4242, 0, "/"));
        assert!(u.additional_gids.is_empty());
    }

    #[test]
    fn numeric_uid_with_entry_and_explicit_group() {
        let u = resolve_with("1000:staff", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        assert!(
            u.additional_gids.is_empty(),
            "explicit group: no supplementary"
        );
        let u = resolve_with("1000:777", PASSWD, GROUP).unwrap();
        assert_eq!(u.gid, 777);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = resolve_with("nosuch", PASSWD, GROUP).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unable to find user nosuch: no matching entries in passwd file"
        );
        let e = resolve_with("alice:nogroup", PASSWD, GROUP).unwrap_err();
        assert!(e.to_string().contains("unable to find group nogroup"));
        assert!(resolve_with("99999999999", PASSWD, GROUP).is_err());
    }

    #[test]
    fn empty_is_root_and_missing_home_is_slash() {
        let u = resolve_with("", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.home.as_str()), (0, "/root"));
        let u = resolve_with("nohome", PASSWD, GROUP).unwrap();
        assert_eq!(u.home, "/");
    }
}
