//! `/etc/passwd` and `/etc/group`: the one parser, and the two ways kiln
//! resolves a user against them — a `USER` for a process (runc's
//! `GetExecUser`: [`resolve_exec_user`]) and a `--chown` owner for copied
//! files (BuildKit's file-op rule: [`resolve_chown`]).
//!
//! Pure: callers read the files (inside the image's root, bounded) and
//! hand their text in.
//!
//! ```
//! use kiln_fs::userdb::{resolve_chown, resolve_exec_user};
//!
//! let passwd = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:100::/home/alice:/bin/sh\n";
//! let group = "users:x:100:alice\nstaff:x:50:alice\n";
//! let u = resolve_exec_user("alice", passwd, group).unwrap();
//! assert_eq!((u.uid, u.gid, u.additional_gids), (1000, 100, vec![100, 50]));
//! assert_eq!(resolve_chown("alice:staff", passwd, group).unwrap(), (1000, 50));
//! assert_eq!(resolve_chown("42", passwd, group).unwrap(), (42, 42));
//! ```

/// Failures of user resolution.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

/// One well-formed line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry<'a> {
    /// User name.
    pub name: &'a str,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory (may be empty).
    pub home: &'a str,
}

/// An id field of a passwd or group line: a number up to 2^31-1 (as
/// runc: `4294967295` is `(uid_t)-1`, which `setresuid` takes as "leave
/// it", so a user by that id ran as root).
fn file_id(s: &str) -> Option<u32> {
    s.parse::<u32>().ok().filter(|n| *n <= i32::MAX as u32)
}

/// The well-formed entries of a passwd file, in order (blank lines,
/// comments and lines without numeric ids are skipped).
pub fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|l| {
        let l = l.trim_end();
        if l.is_empty() || l.starts_with('#') {
            return None;
        }
        let f: Vec<&str> = l.split(':').collect();
        Some(PasswdEntry {
            name: f.first().copied()?,
            uid: file_id(f.get(2)?)?,
            gid: file_id(f.get(3)?)?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

/// One well-formed line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry<'a> {
    /// Group name.
    pub name: &'a str,
    /// Group id.
    pub gid: u32,
    /// Member user names.
    pub members: Vec<&'a str>,
}

/// The well-formed entries of a group file, in order.
pub fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|l| {
        let l = l.trim_end();
        if l.is_empty() || l.starts_with('#') {
            return None;
        }
        let f: Vec<&str> = l.split(':').collect();
        Some(GroupEntry {
            name: f.first().copied()?,
            gid: file_id(f.get(2)?)?,
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

/// Resolve a `USER` (`name`, `uid`, `uid:gid`, `name:group`, `uid:group`,
/// empty = root) with the given passwd and group file contents, as runc's
/// `GetExecUser` does: a numeric uid without an entry is used as is (gid
/// 0, home `/`); a name gets its entry's gid, home and, without an explicit
/// group, its supplementary groups.
pub fn resolve_exec_user(user: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
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

/// Resolve a `COPY`/`ADD --chown=user[:group]` owner as BuildKit's file
/// op does: a numeric user is that uid, and (without a group) that gid
/// too, entry or not; a name takes its passwd entry's uid and gid; a
/// group, by number or by name, overrides the gid.
pub fn resolve_chown(spec: &str, passwd: &str, group: &str) -> Result<(u32, u32), UserError> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (n, n),
        Err(_) => passwd_entries(passwd)
            .find(|e| e.name == user)
            .map(|e| (e.uid, e.gid))
            .ok_or_else(|| UserError::NoUser(user.to_string()))?,
    };
    let gid = match grp {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group_entries(group)
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::NoGroup(g.to_string()))?,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/sh\n\
        nohome:x:1001:1001::\n";
    const GROUP: &str = "root:x:0:\nalice:x:1000:\nstaff:x:50:alice,bob\nwheel:x:10:alice\n";

    /// An id above 2^31-1 in the image's files is no id (4294967295 is
    /// `(uid_t)-1`: `setresuid` left the step as root).
    #[test]
    fn ids_out_of_range_in_the_files_are_not_users() {
        let passwd = "evil:x:4294967295:1000::/:/bin/sh\nok:x:2147483647:1::/:/bin/sh\n";
        assert!(resolve_exec_user("evil", passwd, "").is_err());
        assert_eq!(resolve_exec_user("ok", passwd, "").unwrap().uid, 2147483647);
        let group = "g:x:4294967295:\n";
        assert!(resolve_exec_user("0:g", "", group).is_err());
    }

    #[test]
    fn name_gets_home_and_supplementary_groups() {
        let u = resolve_exec_user("alice", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1000, 1000, "/home/alice"));
        assert_eq!(u.additional_gids, vec![50, 10]);
    }

    #[test]
    fn numeric_uid_without_entry() {
        let u = resolve_exec_user("4242", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4242, 0, "/"));
        assert!(u.additional_gids.is_empty());
    }

    #[test]
    fn numeric_uid_with_entry_and_explicit_group() {
        let u = resolve_exec_user("1000:staff", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        assert!(
            u.additional_gids.is_empty(),
            "explicit group: no supplementary"
        );
        let u = resolve_exec_user("1000:777", PASSWD, GROUP).unwrap();
        assert_eq!(u.gid, 777);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = resolve_exec_user("nosuch", PASSWD, GROUP).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unable to find user nosuch: no matching entries in passwd file"
        );
        let e = resolve_exec_user("alice:nogroup", PASSWD, GROUP).unwrap_err();
        assert!(e.to_string().contains("unable to find group nogroup"));
        assert!(resolve_exec_user("99999999999", PASSWD, GROUP).is_err());
    }

    #[test]
    fn empty_is_root_and_missing_home_is_slash() {
        let u = resolve_exec_user("", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.home.as_str()), (0, "/root"));
        let u = resolve_exec_user("nohome", PASSWD, GROUP).unwrap();
        assert_eq!(u.home, "/");
    }

    #[test]
    fn chown_follows_buildkit() {
        assert_eq!(resolve_chown("alice", PASSWD, GROUP).unwrap(), (1000, 1000));
        // A numeric user is its own gid, whatever passwd says.
        assert_eq!(resolve_chown("1001", PASSWD, GROUP).unwrap(), (1001, 1001));
        assert_eq!(resolve_chown("4242", PASSWD, GROUP).unwrap(), (4242, 4242));
        assert_eq!(
            resolve_chown("alice:staff", PASSWD, GROUP).unwrap(),
            (1000, 50)
        );
        assert_eq!(resolve_chown("7:8", PASSWD, GROUP).unwrap(), (7, 8));
        assert_eq!(
            resolve_chown("nosuch", PASSWD, GROUP)
                .unwrap_err()
                .to_string(),
            "unable to find user nosuch: no matching entries in passwd file"
        );
        assert!(matches!(
            resolve_chown("alice:nogroup", PASSWD, GROUP),
            Err(UserError::NoGroup(_))
        ));
    }
}
