//! Docker-style image reference normalisation
//! (`busybox` -> `docker.io/library/busybox:latest`).

use crate::error::{Error, Result};

fn invalid(reference: &str, reason: &'static str) -> Error {
    Error::InvalidReference {
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

/// Normalise an image reference the way Docker does:
/// `busybox` -> `docker.io/library/busybox:latest`,
/// `user/app:1` -> `docker.io/user/app:1`,
/// `localhost:5000/app` -> `localhost:5000/app:latest`,
/// `index.docker.io/x` -> `docker.io/library/x:latest`,
/// `name@sha256:…` keeps its digest (and gets no default tag).
pub fn normalize_reference(reference: &str) -> Result<String> {
    let r = reference.trim();
    if r.is_empty() {
        return Err(invalid(reference, "empty reference"));
    }
    let (name_tag, digest) = match r.split_once('@') {
        Some((n, d)) => {
            let (algo, hex) = d
                .split_once(':')
                .ok_or_else(|| invalid(reference, "invalid digest"))?;
            let ok = algo == "sha256"
                && hex.len() == 64
                && hex
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
            if !ok {
                return Err(invalid(reference, "invalid digest"));
            }
            (n, Some(d))
        }
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
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    if !valid_domain(&domain) {
        return Err(invalid(reference, "invalid registry host"));
    }
    let domain = if domain == "index.docker.io" {
        "docker.io".to_string()
    } else {
        domain
    };
    let path = if domain == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    if path.bytes().any(|c| c.is_ascii_uppercase()) {
        return Err(invalid(reference, "repository name must be lowercase"));
    }
    if !path.split('/').all(valid_component) {
        return Err(invalid(reference, "invalid repository name"));
    }
    let full = format!("{domain}/{path}");
    if full.len() > 255 {
        return Err(invalid(reference, "repository name too long"));
    }
    let mut out = full;
    match (tag, digest) {
        (Some(t), _) => {
            out.push(':');
            out.push_str(t);
        }
        (None, None) => out.push_str(":latest"),
        (None, Some(_)) => {}
    }
    if let Some(d) = digest {
        out.push('@');
        out.push_str(d);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::normalize_reference as n;

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
}
