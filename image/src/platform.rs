//! Platforms as users write them (`linux/arm64`, `linux/arm/v7`) and the
//! matching rules of containerd's `platforms` package: names normalised
//! (`aarch64` is `arm64`, `arm64/v8` is `arm64`, `arm` alone is `arm/v7`,
//! `x86_64` is `amd64`), and an ARM v7 wanted also takes v6 and v5 images
//! (in that order of preference).
//!
//! ```
//! use kiln_image::platform::parse;
//! let p = parse("linux/aarch64").unwrap();
//! assert_eq!(p.to_string(), "linux/arm64");
//! assert!(p.matches(&parse("linux/arm64/v8").unwrap()));
//! ```

use crate::manifest::{Descriptor, ImageIndex, Platform};

/// A platform string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {input:?}: {reason} (want os/arch[/variant], e.g. linux/arm64)")]
pub struct PlatformError {
    /// As given.
    pub input: String,
    /// Why.
    pub reason: &'static str,
}

/// At most this many entries of an index are read (pulled, stored,
/// pushed); a longer one is refused.
pub const MAX_INDEX_ENTRIES: usize = 1024;

/// Longest platform string accepted.
const MAX_LEN: usize = 128;

fn component_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Parses `os/arch[/variant]` (or `arch` alone, meaning linux) and
/// normalises it.
pub fn parse(s: &str) -> Result<Platform, PlatformError> {
    let err = |reason| PlatformError {
        input: s.chars().take(MAX_LEN).collect(),
        reason,
    };
    if s.len() > MAX_LEN {
        return Err(err("too long"));
    }
    let parts: Vec<&str> = s.split('/').collect();
    if parts.iter().any(|p| !component_ok(p)) {
        return Err(err("empty or unexpected characters in a component"));
    }
    let lower: Vec<String> = parts.iter().map(|p| p.to_ascii_lowercase()).collect();
    let p = match lower.as_slice() {
        [arch] => Platform {
            os: "linux".into(),
            architecture: arch.clone(),
            ..Default::default()
        },
        [os, arch] => Platform {
            os: os.clone(),
            architecture: arch.clone(),
            ..Default::default()
        },
        [os, arch, variant] => Platform {
            os: os.clone(),
            architecture: arch.clone(),
            variant: Some(variant.clone()),
            ..Default::default()
        },
        _ => return Err(err("more than three components")),
    };
    Ok(normalize(&p))
}

/// At most this many `os.features` of a platform read from an index.
pub const MAX_OS_FEATURES: usize = 16;

/// Checks a platform read from an image index (an untrusted registry's)
/// with the rules [`parse`] applies to `--platform`: `os`, `architecture`
/// and `variant` are short names of letters, digits, `_`, `-` and `.`
/// (never `..` or a `/`, which would make a path of an export directory
/// such as `linux_arm64/`), and the rest is bounded: `os.version` at most
/// 128 bytes of the same characters, at most [`MAX_OS_FEATURES`] features
/// of at most 32 each.
pub fn validate(p: &Platform) -> Result<(), PlatformError> {
    let shown = || {
        let mut s = format!("{}/{}", p.os, p.architecture);
        if let Some(v) = &p.variant {
            s.push('/');
            s.push_str(v);
        }
        s.chars().take(MAX_LEN).collect::<String>()
    };
    let err = |reason| PlatformError {
        input: shown(),
        reason,
    };
    let name_ok = |s: &str| component_ok(s) && s != "." && s != "..";
    if !name_ok(&p.os)
        || !name_ok(&p.architecture)
        || p.variant.as_deref().is_some_and(|v| !name_ok(v))
    {
        return Err(err("empty or unexpected characters in a component"));
    }
    if let Some(v) = &p.os_version {
        if v.len() > MAX_LEN
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(err("os.version too long or with unexpected characters"));
        }
    }
    if let Some(f) = &p.os_features {
        if f.len() > MAX_OS_FEATURES || f.iter().any(|x| !name_ok(x)) {
            return Err(err(
                "too many os.features, or one with unexpected characters",
            ));
        }
    }
    Ok(())
}

/// containerd's normalisation: architecture aliases, default and implied
/// variants (`arm` is `arm/v7`; `arm64/v8` and `amd64/v1` drop the variant).
pub fn normalize(p: &Platform) -> Platform {
    let mut out = p.clone();
    out.os = p.os.to_ascii_lowercase();
    if out.os == "macos" {
        out.os = "darwin".into();
    }
    let arch = p.architecture.to_ascii_lowercase();
    let variant = p.variant.as_ref().map(|v| v.to_ascii_lowercase());
    let (arch, variant) = match arch.as_str() {
        "i386" | "i686" => ("386".to_string(), None),
        "x86_64" | "x86-64" | "amd64" => (
            "amd64".to_string(),
            variant.filter(|v| v != "v1" && !v.is_empty()),
        ),
        "aarch64" | "arm64" => (
            "arm64".to_string(),
            variant.filter(|v| v != "v8" && v != "8" && !v.is_empty()),
        ),
        "armhf" => ("arm".to_string(), Some("v7".to_string())),
        "armel" => ("arm".to_string(), Some("v6".to_string())),
        "arm" => (
            "arm".to_string(),
            Some(match variant.as_deref() {
                None | Some("") | Some("7") | Some("v7") => "v7".to_string(),
                Some("5") | Some("v5") => "v5".to_string(),
                Some("6") | Some("v6") => "v6".to_string(),
                Some("8") | Some("v8") => "v8".to_string(),
                Some(v) => v.to_string(),
            }),
        ),
        _ => (arch, variant.filter(|v| !v.is_empty())),
    };
    out.architecture = arch;
    out.variant = variant;
    out
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.variant {
            Some(v) => write!(f, "{}/{}/{v}", self.os, self.architecture),
            None => write!(f, "{}/{}", self.os, self.architecture),
        }
    }
}

impl Platform {
    /// Whether an image for `have` is one for `self`, both normalised
    /// (os, architecture and variant equal).
    pub fn matches(&self, have: &Platform) -> bool {
        let (w, h) = (normalize(self), normalize(have));
        w.os == h.os && w.architecture == h.architecture && w.variant == h.variant
    }

    /// How well an image for `have` serves `self`: 0 is an exact match,
    /// higher is worse (an older ARM variant), `None` is no match.
    pub fn rank(&self, have: &Platform) -> Option<usize> {
        let (w, h) = (normalize(self), normalize(have));
        if w.os != h.os || w.architecture != h.architecture {
            return None;
        }
        if w.variant == h.variant {
            return Some(0);
        }
        // ARM: a newer core runs older variants' binaries.
        if w.architecture == "arm" {
            let order = ["v8", "v7", "v6", "v5"];
            let wi = order
                .iter()
                .position(|v| Some(*v) == w.variant.as_deref())?;
            let hi = order
                .iter()
                .position(|v| Some(*v) == h.variant.as_deref())?;
            return hi.checked_sub(wi).filter(|d| *d > 0);
        }
        None
    }
}

impl ImageIndex {
    /// The best manifest for `platform` by containerd's rules (an exact
    /// normalised match first, then an older ARM variant), the first of
    /// equals; failing that, the first whose architecture and os match
    /// while one side names no variant (kiln's earlier, looser rule).
    pub fn select(&self, platform: &Platform) -> Option<&Descriptor> {
        let best = self
            .manifests
            .iter()
            .filter_map(|d| Some((platform.rank(d.platform.as_ref()?)?, d)))
            .min_by_key(|(r, _)| *r)
            .map(|(_, d)| d);
        best.or_else(|| {
            self.manifests.iter().find(|d| {
                d.platform.as_ref().is_some_and(|p| {
                    p.architecture == platform.architecture
                        && p.os == platform.os
                        && (platform.variant.is_none() || p.variant.is_none())
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn platforms_from_an_index_are_held_to_the_platform_flag_rules() {
        use crate::manifest::Platform;
        let p = |os: &str, arch: &str, variant: Option<&str>| Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(str::to_string),
            ..Default::default()
        };
        assert!(super::validate(&p("linux", "arm", Some("v7"))).is_ok());
        assert!(super::validate(&p("linux", "arm64", Some("../../../etc"))).is_err());
        assert!(super::validate(&p("linux", "..", None)).is_err());
        assert!(super::validate(&p("", "amd64", None)).is_err());
        let mut long = p("windows", "amd64", None);
        long.os_version = Some("1".repeat(100_000));
        assert!(super::validate(&long).is_err());
        long.os_version = Some("10.0.17763.1".into());
        assert!(super::validate(&long).is_ok());
        long.os_features = Some(vec!["win32k".into(); 1000]);
        assert!(super::validate(&long).is_err());
    }

    use super::*;
    use crate::manifest::media_types;

    #[test]
    fn parse_and_normalise_like_containerd() {
        let s = |x: &str| parse(x).expect(x).to_string();
        assert_eq!(s("linux/amd64"), "linux/amd64");
        assert_eq!(s("linux/x86_64"), "linux/amd64");
        assert_eq!(s("linux/arm64/v8"), "linux/arm64");
        assert_eq!(s("linux/aarch64"), "linux/arm64");
        assert_eq!(s("linux/arm"), "linux/arm/v7");
        assert_eq!(s("linux/armhf"), "linux/arm/v7");
        assert_eq!(s("linux/arm/6"), "linux/arm/v6");
        assert_eq!(s("arm64"), "linux/arm64");
        assert_eq!(s("Linux/ARM64"), "linux/arm64");
        for bad in [
            "",
            "linux/",
            "/arm64",
            "linux/arm/v7/x",
            "linux/a b",
            "linux/arm64\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&"a/".repeat(1000)).is_err());
    }

    fn desc(p: &str, body: &[u8]) -> Descriptor {
        let mut d = Descriptor::of_bytes(media_types::OCI_MANIFEST, body);
        let parts: Vec<&str> = p.split('/').collect();
        d.platform = Some(Platform {
            os: parts[0].into(),
            architecture: parts[1].into(),
            variant: parts.get(2).map(|v| v.to_string()),
            ..Default::default()
        });
        d
    }

    #[test]
    fn select_prefers_exact_then_older_arm_variants() {
        let idx = ImageIndex::new(vec![
            desc("linux/amd64", b"a"),
            desc("linux/arm/v5", b"5"),
            desc("linux/arm/v6", b"6"),
            desc("linux/arm64/v8", b"8"),
        ]);
        let pick = |p: &str| idx.select(&parse(p).expect("p")).map(|d| d.digest.clone());
        assert_eq!(pick("linux/arm/v7"), Some(desc("x/y", b"6").digest));
        assert_eq!(pick("linux/arm/v6"), Some(desc("x/y", b"6").digest));
        assert_eq!(pick("linux/arm/v5"), Some(desc("x/y", b"5").digest));
        assert_eq!(pick("linux/arm64"), Some(desc("x/y", b"8").digest));
        assert_eq!(pick("linux/amd64"), Some(desc("x/y", b"a").digest));
        assert_eq!(pick("linux/s390x"), None);
        // An arm64 image does not serve arm/v7, nor the other way round.
        let idx = ImageIndex::new(vec![desc("linux/arm/v7", b"7")]);
        assert_eq!(idx.select(&parse("linux/arm64").expect("p")), None);
    }
}
