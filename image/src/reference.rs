//! Image references (`busybox` -> `docker.io/library/busybox:latest`):
//! the one parser, used by the store (names it keeps) and the registry
//! client (where to fetch from). Docker's grammar (distribution/reference)
//! and normalisation: a first component with a `.` or `:`, or `localhost`,
//! is a registry; Docker Hub short names gain `library/`; `index.docker.io`
//! is `docker.io`; no tag and no digest means `:latest`.

use std::fmt;

use crate::Digest;

/// Docker Hub's name in references.
pub const DOCKER_HUB: &str = "docker.io";
/// Docker Hub's API host.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// The key Docker uses for Docker Hub in `config.json`.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// A reference that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid reference {reference:?}: {reason}")]
pub struct ReferenceError {
    /// The reference as given.
    pub reference: String,
    /// Why it is invalid.
    pub reason: &'static str,
}

fn invalid(reference: &str, reason: &'static str) -> ReferenceError {
    ReferenceError {
        reference: reference.to_string(),
        reason,
    }
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let ch = b[i];
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            i += 1;
            continue;
        }
        // a separator run
        let start = i;
        while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok || sep.is_empty() {
            return false;
        }
    }
    true
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_domain(d: &str) -> bool {
    let host = match d.rsplit_once(':') {
        Some((h, port)) if !h.starts_with('[') || h.ends_with(']') => {
            if port.is_empty() || !port.bytes().all(|c| c.is_ascii_digit()) {
                return false;
            }
            h
        }
        _ => d,
    };
    if host.starts_with('[') && host.ends_with(']') {
        return true; // IPv6 literal
    }
    !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A parsed image reference. Short Docker Hub names are expanded as Docker
/// does (`busybox` -> `docker.io/library/busybox:latest`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Registry host[:port] as written (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path (`library/busybox`).
    pub repository: String,
    /// Tag, if any (`latest` when neither tag nor digest was given).
    pub tag: Option<String>,
    /// Digest, if any.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses `reference`, normalising Docker Hub short names.
    pub fn parse(reference: &str) -> Result<Reference, ReferenceError> {
        let r = reference.trim();
        if r.is_empty() {
            return Err(invalid(reference, "empty reference"));
        }
        let (name_tag, digest) = match r.split_once('@') {
            Some((n, d)) => (
                n,
                Some(
                    d.parse::<Digest>()
                        .map_err(|_| invalid(reference, "invalid digest"))?,
                ),
            ),
            None => (r, None),
        };
        let last_slash = name_tag.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(&name_tag[last_slash + i + 1..]),
            ),
            None => (name_tag, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(invalid(reference, "invalid tag"));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first, rest)
            }
            _ => (DOCKER_HUB, name),
        };
        if !valid_domain(registry) {
            return Err(invalid(reference, "invalid registry host"));
        }
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if repository.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(invalid(reference, "repository name must be lowercase"));
        }
        if !repository.split('/').all(valid_component) {
            return Err(invalid(reference, "invalid repository name"));
        }
        if registry.len() + 1 + repository.len() > 255 {
            return Err(invalid(reference, "repository name too long"));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry: registry.to_string(),
            repository,
            tag,
            digest,
        })
    }

    /// The tag or digest to ask the manifest endpoint for (digest wins).
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The host to send API requests to (`registry-1.docker.io` for Hub).
    pub fn api_host(&self) -> &str {
        api_host(&self.registry)
    }

    /// The same repository with another tag.
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        }
    }
}

/// The API host of a registry name (`docker.io` -> `registry-1.docker.io`).
pub fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_API
    } else {
        registry
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Normalise an image reference the way Docker does:
/// `busybox` -> `docker.io/library/busybox:latest`,
/// `user/app:1` -> `docker.io/user/app:1`,
/// `localhost:5000/app` -> `localhost:5000/app:latest`,
/// `index.docker.io/x` -> `docker.io/library/x:latest`,
/// `name@sha256:…` keeps its digest (and gets no default tag).
pub fn normalize(reference: &str) -> Result<String, ReferenceError> {
    Reference::parse(reference).map(|r| r.to_string())
}

/// Docker's `FamiliarName` of a normalised name (with or without its tag
/// or digest): `docker.io/library/busybox:1` -> `busybox:1`,
/// `docker.io/user/app` -> `user/app`; other registries stay as they are,
/// and so does `library/` before a path of more than one component.
pub fn familiar(name: &str) -> &str {
    let Some(rest) = name.strip_prefix("docker.io/") else {
        return name;
    };
    match rest.strip_prefix("library/") {
        Some(short) if !short.split([':', '@']).next().unwrap_or("").contains('/') => short,
        _ => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::normalize as n;
    use super::*;

    #[test]
    fn docker_hub_short_names() {
        assert_eq!(n("busybox").unwrap(), "docker.io/library/busybox:latest");
        assert_eq!(n("busybox:1.36").unwrap(), "docker.io/library/busybox:1.36");
        assert_eq!(n("user/app").unwrap(), "docker.io/user/app:latest");
        assert_eq!(
            n("docker.io/busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            n("index.docker.io/library/busybox:x").unwrap(),
            "docker.io/library/busybox:x"
        );
    }

    #[test]
    fn registries_ports_digests() {
        assert_eq!(n("localhost/app").unwrap(), "localhost/app:latest");
        assert_eq!(n("localhost:5000/a/b:v1").unwrap(), "localhost:5000/a/b:v1");
        assert_eq!(
            n("127.0.0.1:5000/busybox").unwrap(),
            "127.0.0.1:5000/busybox:latest"
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            n(&format!("busybox@{d}")).unwrap(),
            format!("docker.io/library/busybox@{d}")
        );
        assert_eq!(
            n(&format!("busybox:1@{d}")).unwrap(),
            format!("docker.io/library/busybox:1@{d}")
        );
    }

    #[test]
    fn invalid_references() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "a//b",
            "busybox@sha256:abc",
            "-x",
            "x:tag with space",
            "a/b:-x",
        ] {
            assert!(n(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn parses_like_docker() {
        let r = Reference::parse("busybox").expect("parse");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = Reference::parse("127.0.0.1:5000/a/b:v1").expect("parse");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.manifest_ref(), "v1");
        assert_eq!(r.to_string(), "127.0.0.1:5000/a/b:v1");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/x@{d}")).expect("parse");
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_ref(), d);
        assert!(Reference::parse("UPPER/x").is_err());
        assert!(Reference::parse("x@sha256:12").is_err());
        assert!(Reference::parse("x:").is_err());
    }

    /// Three copies shortened names; all dropped `library/` even before a
    /// deeper path, which Docker keeps.
    #[test]
    fn familiar_names_are_docker_s() {
        assert_eq!(familiar("docker.io/library/busybox:1"), "busybox:1");
        assert_eq!(familiar("docker.io/library/busybox"), "busybox");
        assert_eq!(familiar("docker.io/user/app:2"), "user/app:2");
        assert_eq!(familiar("docker.io/library/a/b:1"), "library/a/b:1");
        assert_eq!(familiar("localhost:5000/x:1"), "localhost:5000/x:1");
    }

    /// The registry client's copy used to map `registry-1.docker.io` to
    /// `docker.io` (so `registry-1.docker.io/x` became `library/x`) and to
    /// accept what Docker's grammar does not; the store's copy did not.
    /// Docker keeps that host as written, like any other.
    #[test]
    fn the_copies_that_disagreed_follow_docker() {
        assert_eq!(
            n("registry-1.docker.io/x").unwrap(),
            "registry-1.docker.io/x:latest"
        );
        for bad in ["a..b", "a/.b", "x:.tag", "bad_host.-x/y"] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }
}
