//! The `kiln build` flags that docker and buildx scripts pass beyond
//! kiln's own: the ones kiln honours (`--push`, `--add-host`, `--ulimit`,
//! `--shm-size`, `--cgroup-parent`, `--no-cache-filter`,
//! `--metadata-file`, `--annotation`), the ones it accepts and ignores
//! (`--load`, `--rm`, `--force-rm`, `--compress`, `--isolation=default`,
//! `--disable-content-trust`, `--builder`, attestations turned off) and the
//! ones docker knows that kiln refuses with a reason, so that a script
//! gets "not supported by kiln: --squash (…)" rather than clap's guess at
//! a similar flag. The README's table of docker/buildx flags lists the
//! same three groups.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_solver::export::OutputSpec;
use kiln_solver::session::BuildRequest;

use crate::build_cmd::usage;

/// `true`/`false` (also `1`/`0`) of a flag given as `--flag[=BOOL]`.
fn bool_value(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{s:?} is not true or false")),
    }
}

/// docker/buildx build flags beyond kiln's own (see the module doc).
#[derive(clap::Args, Debug, Default)]
pub struct CompatFlags {
    /// Push the image to its `-t` names (`-o type=registry`).
    #[arg(long)]
    push: bool,
    /// Keep the image in kiln's store: always done (accepted for buildx's
    /// scripts).
    #[arg(long)]
    load: bool,
    /// Provenance attestation: only `false` (kiln writes none yet).
    #[arg(long, value_name = "false")]
    provenance: Option<String>,
    /// SBOM attestation: only `false` (kiln writes none yet).
    #[arg(long, value_name = "false")]
    sbom: Option<String>,
    /// Attestations: only `type=provenance|sbom,disabled=true`.
    #[arg(long = "attest", value_name = "type=TYPE,disabled=true")]
    attest: Vec<String>,
    /// An `/etc/hosts` entry for RUN steps (`HOST:IP`); repeatable.
    #[arg(long = "add-host", value_name = "HOST:IP")]
    add_host: Vec<String>,
    /// A resource limit of RUN steps (`nofile=1024:2048`); repeatable.
    #[arg(long = "ulimit", value_name = "NAME=SOFT[:HARD]")]
    ulimit: Vec<String>,
    /// Size of RUN steps' /dev/shm (e.g. `256m`; default 64m).
    #[arg(long = "shm-size", value_name = "SIZE")]
    shm_size: Option<String>,
    /// The cgroup (below kiln's own) that holds the RUN steps' cgroups.
    #[arg(long = "cgroup-parent", value_name = "PATH")]
    cgroup_parent: Option<String>,
    /// Stages whose RUN, COPY and ADD steps are not taken from the cache
    /// (by name; comma-separated or repeated).
    #[arg(long = "no-cache-filter", value_name = "STAGE", value_delimiter = ',')]
    no_cache_filter: Vec<String>,
    /// Write BuildKit's build result metadata (image digest, config
    /// digest, names) as JSON to this file.
    #[arg(long = "metadata-file", value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,
    /// An annotation of the image manifest (`KEY=VALUE`,
    /// `manifest:KEY=VALUE`); repeatable.
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    annotation: Vec<String>,
    /// Accepted and ignored (docker's default; kiln keeps no containers).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = bool_value, value_name = "BOOL")]
    rm: Option<bool>,
    /// Accepted and ignored (kiln keeps no containers).
    #[arg(long = "force-rm", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = bool_value, value_name = "BOOL")]
    force_rm: Option<bool>,
    /// Accepted and ignored (the context is read in place, never sent).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = bool_value, value_name = "BOOL")]
    compress: Option<bool>,
    /// Accepted and ignored (docker's default; image signing is not
    /// supported).
    #[arg(long = "disable-content-trust", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = bool_value, value_name = "BOOL")]
    disable_content_trust: Option<bool>,
    /// Only `default` (Windows isolation modes do not apply).
    #[arg(long, value_name = "default")]
    isolation: Option<String>,
    /// Accepted and ignored: kiln is its own builder.
    #[arg(long, value_name = "NAME")]
    builder: Option<String>,
    /// `build` (the default) or `check` (as --check).
    #[arg(long, value_name = "build|check")]
    call: Option<String>,
    /// Refused (see the README's flag table).
    #[arg(long = "cpu-shares", short = 'c', hide = true)]
    cpu_shares: Option<String>,
    #[arg(long = "cpu-period", hide = true)]
    cpu_period: Option<String>,
    #[arg(long = "cpu-quota", hide = true)]
    cpu_quota: Option<String>,
    #[arg(long = "cpuset-cpus", hide = true)]
    cpuset_cpus: Option<String>,
    #[arg(long = "cpuset-mems", hide = true)]
    cpuset_mems: Option<String>,
    #[arg(long = "memory-swap", hide = true)]
    memory_swap: Option<String>,
    #[arg(long = "security-opt", hide = true)]
    security_opt: Vec<String>,
    #[arg(long, hide = true)]
    squash: bool,
    #[arg(long, hide = true)]
    stream: bool,
    #[arg(long, hide = true)]
    print: Option<String>,
    #[arg(long = "label-file", hide = true)]
    label_file: Option<String>,
}

/// "not supported by kiln: --FLAG (why)", a usage error.
fn unsupported(flag: &str, why: &str) -> anyhow::Error {
    usage(format!("not supported by kiln: {flag} ({why})"))
}

const ATTESTATIONS: &str =
    "attestations are not supported yet; --provenance=false and --sbom=false are accepted";

/// Whether an attestation flag's value turns it off.
fn attestation_off(v: &str) -> bool {
    matches!(v, "false" | "0" | "disabled=true")
}

impl CompatFlags {
    /// Refuses the docker flags kiln does not implement (each with its
    /// reason) and the "on" forms of attestations.
    fn refuse_unsupported(&self) -> anyhow::Result<()> {
        let refused: [(&str, bool, &str); 10] = [
            ("--cpu-shares", self.cpu_shares.is_some(), "use --cpus"),
            ("--cpu-period", self.cpu_period.is_some(), "use --cpus"),
            ("--cpu-quota", self.cpu_quota.is_some(), "use --cpus"),
            ("--cpuset-cpus", self.cpuset_cpus.is_some(), "RUN steps cannot be pinned to CPUs"),
            ("--cpuset-mems", self.cpuset_mems.is_some(), "RUN steps cannot be pinned to memory nodes"),
            ("--memory-swap", self.memory_swap.is_some(), "RUN steps get no swap beyond --memory"),
            ("--security-opt", !self.security_opt.is_empty(), "RUN steps run under Docker's default seccomp profile; use RUN --security=insecure with --allow security.insecure"),
            ("--squash", self.squash, "layers are not squashed; use a multi-stage build"),
            ("--stream", self.stream, "the context is read in place, not streamed"),
            ("--print", self.print.is_some(), "use --check for the lint rules"),
        ];
        if let Some((flag, _, why)) = refused.iter().find(|(_, given, _)| *given) {
            return Err(unsupported(flag, why));
        }
        if self.label_file.is_some() {
            return Err(unsupported("--label-file", "use --label K=V"));
        }
        for (flag, v) in [("--provenance", &self.provenance), ("--sbom", &self.sbom)] {
            if let Some(v) = v.as_deref().filter(|v| !attestation_off(v)) {
                return Err(unsupported(&format!("{flag}={v}"), ATTESTATIONS));
            }
        }
        for a in &self.attest {
            let off = a.split(',').any(|kv| kv == "disabled=true");
            if !off {
                return Err(unsupported(&format!("--attest {a}"), ATTESTATIONS));
            }
        }
        if let Some(i) = self.isolation.as_deref().filter(|i| *i != "default") {
            return Err(unsupported(
                &format!("--isolation={i}"),
                "isolation modes are Windows containers'; only default is accepted",
            ));
        }
        match self.call.as_deref() {
            None | Some("build") | Some("check") => {}
            Some(c) => {
                return Err(unsupported(
                    &format!("--call={c}"),
                    "kiln's build takes --call=build or --call=check",
                ))
            }
        }
        Ok(())
    }

    /// Whether `--call=check` asks for the lint rules only.
    pub fn check(&self) -> bool {
        self.call.as_deref() == Some("check")
    }

    /// Applies the flags to `req` (after its tags and outputs are set):
    /// refused flags fail here, before anything is built.
    pub fn apply(&self, req: &mut BuildRequest) -> anyhow::Result<()> {
        self.refuse_unsupported()?;
        let _ = (
            self.load,
            self.rm,
            self.force_rm,
            self.compress,
            self.disable_content_trust,
            &self.builder,
        );
        if self.push {
            if req.tags.is_empty() {
                return Err(usage("--push needs a name to push to: add -t NAME[:TAG]"));
            }
            if !req.outputs.iter().any(OutputSpec::pushes) {
                req.outputs.push(OutputSpec {
                    kind: "registry".into(),
                    attrs: [("name".to_string(), req.tags.join(","))].into(),
                });
            }
        }
        for h in &self.add_host {
            // docker takes HOST:IP (an IPv6 address has colons: split at
            // the first) and HOST=IP.
            let (name, addr) = h
                .split_once('=')
                .or_else(|| h.split_once(':'))
                .ok_or_else(|| usage(format!("--add-host {h:?}: want HOST:IP")))?;
            // Checked (host name, IP address) by the session's prepare.
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            req.sandbox
                .extra_hosts
                .push((name.to_string(), addr.to_string()));
        }
        for u in &self.ulimit {
            req.sandbox.ulimits.push(
                u.parse()
                    .map_err(|e: kiln_solver::build::UlimitError| usage(e.to_string()))?,
            );
        }
        if let Some(s) = &self.shm_size {
            let n = crate::store_cmds::parse_size(s)
                .map_err(|e| usage(format!("--shm-size {s:?}: {e}")))?;
            if n == 0 {
                return Err(usage("--shm-size must be more than 0"));
            }
            req.sandbox.shm_size = Some(n);
        }
        if let Some(p) = &self.cgroup_parent {
            req.sandbox.cgroup_parent = Some(p.trim_start_matches('/').to_string());
        }
        req.no_cache_filter = self.no_cache_filter.clone();
        let mut annotations = BTreeMap::new();
        for a in &self.annotation {
            let (k, v) = a
                .split_once('=')
                .ok_or_else(|| usage(format!("--annotation {a:?}: want KEY=VALUE")))?;
            // `manifest:KEY` (and `manifest[PLATFORM]:KEY`) is the manifest;
            // kiln writes no index, so `index:` has nothing to go on.
            let k = match k.split_once(':') {
                Some((t, key)) if t == "manifest" || t.starts_with("manifest[") => key,
                Some((t, _))
                    if ["index", "manifest-descriptor", "index-descriptor"]
                        .iter()
                        .any(|x| t == *x || t.starts_with(&format!("{x}["))) =>
                {
                    return Err(unsupported(
                        &format!("--annotation {a}"),
                        "kiln puts annotations on the image manifest only",
                    ))
                }
                _ => k,
            };
            if k.is_empty() {
                return Err(usage(format!("--annotation {a:?}: empty key")));
            }
            annotations.insert(k.to_string(), v.to_string());
        }
        req.annotations = annotations;
        Ok(())
    }
}

/// The flag table of `-o type=registry` / `push=true` without `name=`:
/// the `-t` names, as buildx takes them.
pub fn output(spec: &str, tags: &[String]) -> anyhow::Result<OutputSpec> {
    let parse = |s: &str| OutputSpec::parse(s).map_err(|e| usage(e.to_string()));
    let named = spec
        .split(',')
        .any(|kv| kv.trim_start().starts_with("name="));
    let pushes = spec.split(',').any(|kv| {
        let kv = kv.trim();
        kv == "type=registry" || kv == "push=true"
    });
    if named || !pushes || tags.is_empty() || !spec.contains('=') {
        return parse(spec);
    }
    let mut o = parse(&format!("{spec},name=x"))?;
    o.attrs.insert("name".into(), tags.join(","));
    Ok(o)
}

/// BuildKit's `--metadata-file` JSON: `containerimage.digest` (the pushed
/// manifest's digest when pushed, else the stored one's),
/// `containerimage.config.digest`, `containerimage.descriptor` and
/// `image.name` (the names, comma-separated).
pub fn metadata(
    image_id: &str,
    manifest_digest: &str,
    manifest: Option<(String, u64)>,
    names: &[String],
    pushed: Option<&str>,
) -> serde_json::Value {
    let digest = pushed.unwrap_or(manifest_digest);
    let mut v = serde_json::json!({
        "containerimage.config.digest": image_id,
        "containerimage.digest": digest,
    });
    if let (Some((media_type, size)), None) = (manifest, pushed) {
        v["containerimage.descriptor"] = serde_json::json!({
            "mediaType": media_type,
            "digest": manifest_digest,
            "size": size,
        });
    }
    if !names.is_empty() {
        v["image.name"] = serde_json::json!(names.join(","));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        f: CompatFlags,
    }

    fn apply(args: &[&str]) -> anyhow::Result<BuildRequest> {
        let t = T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))?;
        let mut req = BuildRequest::new(".");
        req.tags = vec!["docker.io/library/app:1".into()];
        t.f.apply(&mut req)?;
        Ok(req)
    }

    #[test]
    fn attestations_off_are_accepted_on_are_refused() {
        assert!(apply(&["--provenance=false", "--sbom=false"]).is_ok());
        assert!(apply(&["--attest", "type=provenance,disabled=true"]).is_ok());
        assert!(apply(&["--provenance", "false"]).is_ok());
        for on in [
            &["--provenance=true"][..],
            &["--sbom=true"],
            &["--provenance=mode=max"],
        ] {
            let e = apply(on).unwrap_err().to_string();
            assert!(e.contains("attestations are not supported yet"), "{e}");
        }
    }

    #[test]
    fn legacy_no_ops_and_refusals() {
        assert!(apply(&[
            "--rm",
            "--force-rm=true",
            "--compress",
            "--isolation=default",
            "--disable-content-trust=false"
        ])
        .is_ok());
        let e = apply(&["--squash"]).unwrap_err().to_string();
        assert!(e.starts_with("not supported by kiln: --squash"), "{e}");
        let e = apply(&["--isolation=hyperv"]).unwrap_err().to_string();
        assert!(e.contains("not supported by kiln"), "{e}");
    }

    #[test]
    fn push_uses_the_tags_and_hosts_are_checked() {
        let r = apply(&["--push"]).unwrap();
        assert!(r.outputs[0].pushes());
        assert_eq!(r.outputs[0].names().unwrap(), ["docker.io/library/app:1"]);
        let r = apply(&["--add-host", "db:10.0.0.2", "--add-host", "v6=::1"]).unwrap();
        assert_eq!(
            r.sandbox.extra_hosts[1],
            ("v6".to_string(), "::1".to_string())
        );
        // Host names and addresses are checked by the session's prepare
        // (the docker_compat hostile case).
    }

    #[test]
    fn registry_output_takes_the_tags_without_name() {
        let tags = vec![
            "docker.io/library/a:1".to_string(),
            "docker.io/library/b:2".to_string(),
        ];
        let o = output("type=registry", &tags).unwrap();
        assert_eq!(o.names().unwrap(), tags);
        let o = output("type=image,push=true", &tags).unwrap();
        assert!(o.pushes());
        assert_eq!(o.names().unwrap(), tags);
        let o = output("type=registry,name=c", &tags).unwrap();
        assert_eq!(o.names().unwrap(), ["docker.io/library/c:latest"]);
    }
}
