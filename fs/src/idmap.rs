//! The id maps of this process's user namespace (`/proc/self/uid_map`,
//! `gid_map`): whether kiln runs rootless (in a user namespace other than
//! the initial one), which ids exist here, and so which overlay xattr
//! namespace an overlay mounted by this process uses.

use std::sync::OnceLock;

/// Set in the environment of a kiln that entered a user namespace of its
/// own at start (to `subids`, `direct` or `single`: how its maps were
/// written), and passed on to the sandbox init. A nested namespace that
/// maps the whole of its parent's ids looks like the initial one from its
/// maps alone.
pub const ENTERED_ENV: &str = "_KILN_ROOTLESS";

use crate::overlay::XattrNs;

/// One line of a `uid_map`/`gid_map`: `count` ids from `inside` (in the
/// namespace) are `outside` and up (in the parent namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First id inside the namespace.
    pub inside: u32,
    /// First id outside.
    pub outside: u32,
    /// How many.
    pub count: u32,
}

/// Parses a `uid_map`/`gid_map` text (lines of three numbers).
pub fn parse_id_map(text: &str) -> Vec<IdRange> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|x| x.parse::<u32>().ok());
            Some(IdRange {
                inside: f.next()??,
                outside: f.next()??,
                count: f.next()??,
            })
        })
        .collect()
}

/// A map in one line (`0:1000:1,1:100000:65536`: inside, outside, count).
pub fn describe(map: &[IdRange]) -> String {
    map.iter()
        .map(|r| format!("{}:{}:{}", r.inside, r.outside, r.count))
        .collect::<Vec<_>>()
        .join(",")
}

/// Which of the two maps an id is looked up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// A user id (`/etc/subuid`).
    Uid,
    /// A group id (`/etc/subgid`).
    Gid,
}

impl IdKind {
    fn name(self) -> &'static str {
        match self {
            IdKind::Uid => "uid",
            IdKind::Gid => "gid",
        }
    }
}

/// This process's user namespace, as its id maps show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMaps {
    /// Whether this is a user namespace other than the initial one
    /// (rootless kiln, or kiln as root of a rootless container).
    pub in_userns: bool,
    /// The uid map.
    pub uid_map: Vec<IdRange>,
    /// The gid map.
    pub gid_map: Vec<IdRange>,
}

impl IdMaps {
    /// Reads this process's maps (once: they never change after they are
    /// written).
    pub fn current() -> &'static IdMaps {
        static MAPS: OnceLock<IdMaps> = OnceLock::new();
        MAPS.get_or_init(|| {
            let read = |p: &str| parse_id_map(&std::fs::read_to_string(p).unwrap_or_default());
            let mut maps =
                IdMaps::from_maps(read("/proc/self/uid_map"), read("/proc/self/gid_map"));
            maps.in_userns |= std::env::var_os(ENTERED_ENV).is_some_and(|v| !v.is_empty());
            maps
        })
    }

    /// The maps `uid_map`, `gid_map`.
    pub fn from_maps(uid_map: Vec<IdRange>, gid_map: Vec<IdRange>) -> IdMaps {
        let initial = IdRange {
            inside: 0,
            outside: 0,
            count: u32::MAX,
        };
        IdMaps {
            // No map at all (no /proc): assume the initial namespace.
            in_userns: !uid_map.is_empty() && uid_map != [initial],
            uid_map,
            gid_map,
        }
    }

    /// Whether only one uid is mapped (kiln's one-id fallback): files and
    /// processes of any other id cannot exist here.
    pub fn single_id(&self) -> bool {
        self.in_userns && self.uid_map.iter().map(|r| u64::from(r.count)).sum::<u64>() <= 1
    }

    /// Whether uid `uid` exists in this namespace.
    pub fn maps_uid(&self, uid: u32) -> bool {
        maps(&self.uid_map, uid)
    }

    /// Whether gid `gid` exists in this namespace.
    pub fn maps_gid(&self, gid: u32) -> bool {
        maps(&self.gid_map, gid)
    }

    /// Why `id` cannot be had here, for an error: it does not exist in
    /// the rootless namespace (both maps shown), and the fix: subordinate
    /// ids when only the user's own id is mapped, else a range that
    /// reaches `id` (its subordinate ids stop short of it).
    pub fn unmapped_message(&self, kind: IdKind, id: u32) -> String {
        let k = kind.name();
        let map = match kind {
            IdKind::Uid => &self.uid_map,
            IdKind::Gid => &self.gid_map,
        };
        let mapped: u64 = map.iter().map(|r| u64::from(r.count)).sum();
        let head = format!(
            "{k} {id} does not exist in kiln's rootless user namespace (uid map {}, gid map {})",
            describe(&self.uid_map),
            describe(&self.gid_map)
        );
        if mapped <= 1 {
            return format!(
                "{head}: only your own id is mapped; give the user subordinate ids in /etc/subuid \
                 and /etc/subgid (e.g. `usermod --add-subuids 100000-165535 --add-subgids \
                 100000-165535 $USER`)"
            );
        }
        // Id 0 is the user's own; subordinate ids are 1 and up, so `id`
        // needs `id` of them.
        let last = 100_000 + u64::from(id) - 1;
        format!(
            "{head}: the user's subordinate {k}s map {k}s 1 to {} only; {k} {id} needs a range of \
             at least {id} ids in /etc/sub{k} (e.g. `usermod --add-sub{k}s 100000-{last} $USER`)",
            mapped - 1
        )
    }

    /// The xattr namespace of an overlay this process mounts: `user.`
    /// (mounted with `userxattr`) in a user namespace, where `trusted.`
    /// xattrs cannot be written; else `trusted.`.
    pub fn overlay_xattrs(&self) -> XattrNs {
        if self.in_userns {
            XattrNs::User
        } else {
            XattrNs::Trusted
        }
    }
}

fn maps(map: &[IdRange], id: u32) -> bool {
    map.iter()
        .any(|r| id >= r.inside && u64::from(id) < u64::from(r.inside) + u64::from(r.count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmapped_id_s_hint_fits_the_map() {
        let one = parse_id_map("0 1000 1\n");
        let m = IdMaps::from_maps(one.clone(), one);
        let s = m.unmapped_message(IdKind::Uid, 33);
        assert!(s.starts_with("uid 33 does not exist"), "{s}");
        assert!(s.contains("only your own id is mapped"), "{s}");
        assert!(s.contains("give the user subordinate ids"), "{s}");
        // With subordinate ids, the range is too short: no advice to add
        // what the user already has.
        let some = parse_id_map("0 1000 1\n1 100000 65536\n");
        let m = IdMaps::from_maps(some.clone(), some);
        let s = m.unmapped_message(IdKind::Gid, 70000);
        assert!(!s.contains("give the user subordinate ids"), "{s}");
        assert!(
            s.contains("map gids 1 to 65536 only; gid 70000 needs a range of at least 70000 ids in /etc/subgid"),
            "{s}"
        );
        assert!(s.contains("--add-subgids 100000-169999"), "{s}");
    }

    #[test]
    fn maps_parse_and_answer() {
        let m =
            parse_id_map("         0       1000          1\n         1     100000      65536\n");
        let r = IdMaps::from_maps(m.clone(), m);
        assert!(r.in_userns && !r.single_id());
        assert!(r.maps_uid(0) && r.maps_uid(65536) && !r.maps_uid(65537));
        assert_eq!(describe(&r.uid_map), "0:1000:1,1:100000:65536");
        assert_eq!(r.overlay_xattrs(), XattrNs::User);
        let init = IdMaps::from_maps(parse_id_map("0 0 4294967295\n"), vec![]);
        assert!(!init.in_userns && !init.single_id());
        assert_eq!(init.overlay_xattrs(), XattrNs::Trusted);
        let one = IdMaps::from_maps(parse_id_map("0 1000 1\n"), vec![]);
        assert!(one.single_id() && one.maps_uid(0) && !one.maps_uid(1));
    }
}
