//! The overlay filesystem's on-disk format, in one place: whiteouts,
//! opaque directories, the xattr namespace overlayfs reads, and the
//! `lowerdir=` option of its mount.
//!
//! Two spellings of the same facts meet here. In an overlay *upperdir* a
//! deleted path is a whiteout character device 0:0 and a directory that
//! hides everything below it carries the xattr `<ns>.overlay.opaque = y`;
//! in an OCI *layer tar* the same facts are the names `.wh.<name>` and
//! `.wh..wh..opq`. Which xattr namespace overlayfs uses is a property of
//! the mount: `trusted.` when mounted by real root, `user.` with the
//! `userxattr` option (rootless) — [`XattrNs`].
//!
//! This module knows the names and tests; it performs no I/O beyond what a
//! caller hands it (a stat, an option string).

use std::path::PathBuf;

/// Prefix of a whiteout entry in a layer tar (`.wh.<name>` deletes `<name>`).
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the opaque-directory marker in a layer tar.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
/// Prefix of the names OCI reserves for whiteout metadata (`.wh..wh.*`).
pub const WHITEOUT_META_PREFIX: &str = ".wh..wh.";

/// The xattr namespace an overlay mount keeps its metadata in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum XattrNs {
    /// `trusted.overlay.*`: overlayfs mounted by real root (kiln today).
    #[default]
    Trusted,
    /// `user.overlay.*`: overlayfs mounted with `userxattr` (rootless).
    User,
}

impl XattrNs {
    /// Both namespaces, for readers that accept either.
    pub const ALL: [XattrNs; 2] = [XattrNs::Trusted, XattrNs::User];

    /// The namespace of this process's overlays (and of its snapshots'
    /// markers): what a reader of a snapshot interprets. The other one is
    /// an ordinary xattr there — in a root store, `user.overlay.opaque`
    /// is one any RUN step may set, which the live overlay ignores.
    pub fn current() -> XattrNs {
        crate::idmap::IdMaps::current().overlay_xattrs()
    }

    /// The prefix of every overlay xattr in this namespace (`trusted.overlay.`).
    pub fn prefix(self) -> &'static str {
        match self {
            XattrNs::Trusted => "trusted.overlay.",
            XattrNs::User => "user.overlay.",
        }
    }

    /// The opaque-directory xattr (`trusted.overlay.opaque`).
    pub fn opaque(self) -> &'static str {
        match self {
            XattrNs::Trusted => "trusted.overlay.opaque",
            XattrNs::User => "user.overlay.opaque",
        }
    }

    /// The origin xattr (`trusted.overlay.origin`), which makes overlayfs
    /// look for whiteouts in a lower directory.
    pub fn origin(self) -> &'static str {
        match self {
            XattrNs::Trusted => "trusted.overlay.origin",
            XattrNs::User => "user.overlay.origin",
        }
    }
}

/// The value overlayfs writes (and kiln writes) for an opaque directory.
pub const OPAQUE_VALUE: &[u8] = b"y";

/// Is this xattr name overlay metadata (in either namespace)? Such xattrs
/// describe the upperdir, never the file: they are not copied into layers.
pub fn is_overlay_xattr(name: &[u8]) -> bool {
    XattrNs::ALL
        .iter()
        .any(|ns| name.starts_with(ns.prefix().as_bytes()))
}

/// Is this xattr name the opaque marker (in either namespace)?
pub fn is_opaque_xattr(name: &[u8]) -> bool {
    XattrNs::ALL.iter().any(|ns| name == ns.opaque().as_bytes())
}

/// Is an upperdir entry with this `st_mode` and `st_rdev` a whiteout (a
/// character device 0:0)?
pub fn is_whiteout_stat(mode: u32, rdev: u64) -> bool {
    mode & libc::S_IFMT == libc::S_IFCHR && rdev == 0
}

/// Is this metadata a whiteout (a character device 0:0)?
pub fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// The name a layer-tar whiteout deletes (`.wh.x` -> `x`); `None` for any
/// other name, the opaque marker and the reserved `.wh..wh.*` names.
pub fn whiteout_target(name: &[u8]) -> Option<&[u8]> {
    if name.starts_with(WHITEOUT_META_PREFIX.as_bytes()) {
        return None;
    }
    name.strip_prefix(WHITEOUT_PREFIX.as_bytes())
}

/// The layer-tar whiteout name for `name` (`x` -> `.wh.x`).
pub fn whiteout_name(name: &[u8]) -> Vec<u8> {
    let mut v = WHITEOUT_PREFIX.as_bytes().to_vec();
    v.extend_from_slice(name);
    v
}

/// The most option data `mount(2)` copies: one page.
pub const MOUNT_DATA_MAX: usize = 4096;

/// Shortens an overlay `lowerdir=` value so a deep stack fits in a page
/// (containerd's `compactLowerdirOption`, Docker's overlay2 `l/` links):
/// the entries under the most common parent directory (the first one on a
/// tie) become names relative to it, the others stay as they are. Returns
/// that directory, which the mounter must make its working directory for
/// the `mount(2)` call, and the new value; `None` when no entry has a
/// parent.
pub fn compact_lowerdir(lowerdir: &str) -> Option<(PathBuf, String)> {
    let dirs: Vec<&str> = lowerdir.split(':').collect();
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for d in &dirs {
        if let Some((parent, _)) = d.rsplit_once('/') {
            match counts.iter_mut().find(|(p, _)| *p == parent) {
                Some((_, n)) => *n += 1,
                None => counts.push((parent, 1)),
            }
        }
    }
    let max = counts.iter().map(|(_, n)| *n).max()?;
    let (parent, _) = counts.into_iter().find(|(_, n)| *n == max)?;
    let rewritten: Vec<&str> = dirs
        .iter()
        .map(|d| match d.rsplit_once('/') {
            Some((p, name)) if p == parent && !name.is_empty() => name,
            _ => d,
        })
        .collect();
    let parent = if parent.is_empty() { "/" } else { parent };
    Some((PathBuf::from(parent), rewritten.join(":")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn deep_stacks_compact_under_their_most_common_parent() {
        let lowers: Vec<String> = (0..500)
            .map(|i| format!("/var/lib/kiln/l/L{i:05}"))
            .collect();
        let value = format!("/tmp/stub:{}", lowers.join(":"));
        let (dir, short) = compact_lowerdir(&value).unwrap();
        assert_eq!(dir, Path::new("/var/lib/kiln/l"));
        assert!(short.len() < MOUNT_DATA_MAX, "{}", short.len());
        assert!(short.starts_with("/tmp/stub:L00000:L00001"));
        // A tie goes to the first parent met, whatever the hash order.
        assert_eq!(
            compact_lowerdir("/a/x:/b/y"),
            Some((PathBuf::from("/a"), "x:/b/y".to_string()))
        );
        assert_eq!(compact_lowerdir("rel"), None);
    }

    #[test]
    fn whiteout_names_and_xattrs() {
        assert_eq!(whiteout_target(b".wh.foo"), Some(&b"foo"[..]));
        assert_eq!(whiteout_target(b".wh..wh..opq"), None);
        assert_eq!(whiteout_target(b"foo"), None);
        assert_eq!(whiteout_name(b"foo"), b".wh.foo");
        assert!(is_overlay_xattr(b"trusted.overlay.origin"));
        assert!(is_overlay_xattr(b"user.overlay.opaque"));
        assert!(!is_overlay_xattr(b"user.mime_type"));
        assert!(is_opaque_xattr(b"user.overlay.opaque"));
        assert_eq!(XattrNs::Trusted.opaque(), "trusted.overlay.opaque");
        assert!(is_whiteout_stat(libc::S_IFCHR | 0o644, 0));
        assert!(!is_whiteout_stat(libc::S_IFCHR, 0x0101));
        assert!(!is_whiteout_stat(libc::S_IFREG, 0));
    }
}
