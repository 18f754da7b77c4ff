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
