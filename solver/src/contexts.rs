//! Named build contexts (`kiln build --build-context NAME=VALUE`): a name
//! that `FROM NAME` and `COPY --from=NAME` resolve to before stages'
//! images are looked up — a local directory, or another image
//! (`docker-image://REF`), or an OCI image layout directory
//! (`oci-layout://PATH[:TAG]`, which `kiln build` imports into the store
//! and then uses as an image).

use std::collections::BTreeMap;
use std::path::PathBuf;

crate::error::module_error! {
    /// A `--build-context` value that cannot be used.
    pub enum NamedContextError {}
}

/// What a named context stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedContext {
    /// A local directory (read like the main build context).
    Dir(PathBuf),
    /// An image reference, resolved like a `FROM` image.
    Image(String),
    /// An OCI image layout directory and optional tag.
    OciLayout(PathBuf, Option<String>),
}

/// Parses `NAME=DIR|docker-image://REF|oci-layout://PATH[:TAG]`.
pub fn parse_build_context(s: &str) -> Result<(String, NamedContext), NamedContextError> {
    let (name, value) = s
        .split_once('=')
        .filter(|(n, v)| !n.is_empty() && !v.is_empty())
        .ok_or_else(|| {
            NamedContextError::Invalid(format!(
                "invalid --build-context {s:?}: expected NAME=VALUE"
            ))
        })?;
    let ctx = if let Some(r) = value.strip_prefix("docker-image://") {
        NamedContext::Image(r.to_string())
    } else if let Some(p) = value.strip_prefix("oci-layout://") {
        // The tag follows the last ':' after the last '/'.
        let slash = p.rfind('/').map_or(0, |i| i + 1);
        match p[slash..].rfind(':') {
            Some(i) => NamedContext::OciLayout(
                PathBuf::from(&p[..slash + i]),
                Some(p[slash + i + 1..].to_string()),
            ),
            None => NamedContext::OciLayout(PathBuf::from(p), None),
        }
    } else if value.contains("://") {
        return Err(NamedContextError::Invalid(format!(
            "--build-context {name}={value}: this kind of context is not supported yet (use a directory, docker-image:// or oci-layout://)"
        )));
    } else {
        let p = PathBuf::from(value);
        if !p.is_dir() {
            return Err(NamedContextError::Invalid(format!(
                "--build-context {name}={value}: not a directory"
            )));
        }
        NamedContext::Dir(p)
    };
    Ok((name.to_string(), ctx))
}

/// The name a named context is found by, as BuildKit compares them: an
/// image reference in its short form without `:latest`
/// (`docker.io/library/alpine:latest`, `alpine:latest` and `alpine` are
/// one name); a name that is not a valid reference, as it is.
pub fn context_key(name: &str) -> String {
    match kiln_image::reference::normalize(name) {
        Ok(full) => {
            let short = full
                .strip_prefix("docker.io/library/")
                .or_else(|| full.strip_prefix("docker.io/"))
                .unwrap_or(&full);
            short.strip_suffix(":latest").unwrap_or(short).to_string()
        }
        Err(_) => name.to_string(),
    }
}

/// The context `name` (a `FROM` image, a `--from` value) stands for: the
/// entry of that name, else one naming the same image (see
/// [`context_key`]).
pub fn lookup<'a>(map: &'a BTreeMap<String, NamedContext>, name: &str) -> Option<&'a NamedContext> {
    if let Some(c) = map.get(name) {
        return Some(c);
    }
    let key = context_key(name);
    map.iter()
        .find(|(n, _)| context_key(n) == key)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_compared_as_buildkit_does() {
        let map = BTreeMap::from([
            (
                "docker.io/library/alpine:latest".to_string(),
                NamedContext::Image("busybox".into()),
            ),
            ("tools".to_string(), NamedContext::Image("x".into())),
        ]);
        for n in [
            "alpine",
            "alpine:latest",
            "docker.io/alpine",
            "docker.io/library/alpine",
        ] {
            assert_eq!(
                lookup(&map, n),
                Some(&NamedContext::Image("busybox".into())),
                "{n}"
            );
        }
        assert_eq!(lookup(&map, "alpine:3.19"), None);
        assert_eq!(
            lookup(&map, "tools:latest"),
            Some(&NamedContext::Image("x".into()))
        );
        assert_eq!(lookup(&map, "other"), None);
        assert_eq!(context_key("Not A Reference"), "Not A Reference");
        assert_eq!(context_key("ghcr.io/o/i:latest"), "ghcr.io/o/i");
        assert_eq!(context_key("docker.io/user/img:1"), "user/img:1");
    }

    #[test]
    fn parses_kinds() {
        assert_eq!(
            parse_build_context("base=docker-image://busybox:1.36").unwrap(),
            ("base".into(), NamedContext::Image("busybox:1.36".into()))
        );
        assert_eq!(
            parse_build_context("l=oci-layout:///tmp/lay:v1").unwrap().1,
            NamedContext::OciLayout("/tmp/lay".into(), Some("v1".into()))
        );
        assert!(parse_build_context("x").is_err());
        assert!(parse_build_context("x=/definitely/not/here").is_err());
        assert!(parse_build_context("x=https://h/a.tar").is_err());
    }
}
