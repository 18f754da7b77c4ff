//! `RUN --mount` planning at lowering: each spec's variables expanded
//! (every `key=value` field on its own, `from` kept as written, as
//! BuildKit does), its `from` resolved to a stage or image, its target
//! made absolute against the working directory, its id chosen, and the
//! plan checked (targets given, none over `/` or twice, required secrets
//! and SSH sockets present). What the mounts *read* is left to the
//! solver: it enters the RUN's key there.

use kiln_parser::instructions::{parse_mount, Mount, MountType};

use crate::build::BuildOptions;
use crate::error::BuildError;
use crate::fsview::join_abs;
use crate::op::{MountSpec, Source};

/// Expands the variables of a mount spec and parses it again.
pub fn expand_mount(
    m: &Mount,
    line: usize,
    expand: &dyn Fn(&str) -> Result<String, BuildError>,
) -> Result<Mount, BuildError> {
    if !m.raw.contains('$') {
        return Ok(m.clone());
    }
    // The fields first, then each value expanded (BuildKit's order): a
    // value that expands to `a,target=/etc` stays one field's value, never
    // new fields.
    let raw_fields = kiln_parser::instructions::csv_fields(&m.raw)
        .map_err(|e| BuildError::at(line, format!("--mount={}: {e}", m.raw)))?;
    let mut fields = Vec::new();
    for f in raw_fields {
        let field = match f.split_once('=') {
            Some((k, v)) if !k.eq_ignore_ascii_case("from") => format!("{k}={}", expand(v)?),
            _ => f,
        };
        // Quoted again as CSV when it must be, to be read back as one.
        if field.contains([',', '"']) {
            fields.push(format!("\"{}\"", field.replace('"', "\"\"")));
        } else {
            fields.push(field);
        }
    }
    parse_mount(&fields.join(","))
        .map_err(|e| BuildError::at(line, format!("--mount={}: {e}", m.raw)))
}

/// Plans the mounts of one RUN (see the module doc).
pub fn plan_mounts(
    mounts: Vec<(Mount, Option<Source>)>,
    workdir: &str,
    opts: &BuildOptions,
    line: usize,
) -> Result<Vec<MountSpec>, BuildError> {
    let mut out = Vec::with_capacity(mounts.len());
    let mut ssh_n = 0usize;
    let mut targets: Vec<String> = Vec::new();
    for (m, from) in mounts {
        let given = m.target.as_deref().filter(|t| !t.is_empty());
        let target_of = |t: &str| crate::fsview::clean_abs(&join_abs(workdir, t));
        let err = |msg: String| BuildError::at(line, format!("--mount={}: {msg}", m.raw));
        let required = || err("mount target required".into());
        // (target, id, present: false for an optional secret or socket
        // the build was not given, which is then not mounted)
        let (target, id, present) = match m.kind {
            MountType::Cache => {
                let target = given.map(target_of).ok_or_else(required)?;
                let id =
                    m.id.clone()
                        .filter(|i| !i.is_empty())
                        .unwrap_or(target.clone());
                (Some(target), id, true)
            }
            MountType::Bind | MountType::Tmpfs => (
                Some(given.map(target_of).ok_or_else(required)?),
                String::new(),
                true,
            ),
            MountType::Secret => {
                let id = match (&m.id, &m.source, given) {
                    (Some(i), _, _) | (None, Some(i), _) => i.clone(),
                    (None, None, Some(t)) => crate::fsview::base_name(t).to_string(),
                    (None, None, None) => return Err(err("secret id required".into())),
                };
                let target = match (given, &m.env) {
                    (Some(t), _) => Some(target_of(t)),
                    (None, Some(_)) => None,
                    (None, None) => Some(format!("/run/secrets/{id}")),
                };
                let present = opts.secrets.contains_key(&id);
                if !present && m.required {
                    return Err(err(format!(
                        "secret {id} not found: pass it with `--secret id={id},src=FILE` or `--secret id={id},env=VAR`"
                    )));
                }
                (target, id, present)
            }
            MountType::Ssh => {
                let id = m.id.clone().unwrap_or_else(|| "default".into());
                let target = match given {
                    Some(t) => target_of(t),
                    None => format!("/run/buildkit/ssh_agent.{ssh_n}"),
                };
                ssh_n += 1;
                let present = opts.ssh.contains_key(&id);
                if !present && m.required {
                    return Err(err(format!(
                        "no SSH agent socket for id {id}: pass `--ssh {id}[=SOCKET]`"
                    )));
                }
                (Some(target), id, present)
            }
        };
        if let Some(t) = target.as_ref().filter(|_| present) {
            if t == "/" {
                return Err(err("cannot mount over /".into()));
            }
            if targets.contains(t) {
                return Err(err(format!("{t} is the target of two mounts")));
            }
            targets.push(t.clone());
        }
        out.push(MountSpec {
            mount: m,
            from,
            target,
            id,
        });
    }
    Ok(out)
}
