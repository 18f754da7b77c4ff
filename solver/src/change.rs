//! Dockerfile instructions applied to an image config outside a build:
//! `kiln import --change 'CMD ["bash"]'`, as `docker import -c` does
//! (moby's `BuildFromConfig`). Only instructions that edit the runtime
//! config are accepted; anything that needs a file system or a stage (RUN,
//! COPY, ADD, FROM, ARG, SHELL, MAINTAINER) is refused by name.
//!
//! Values are expanded with the config's own `ENV` as each line is applied,
//! in order; `CMD`/`ENTRYPOINT` in shell form get `/bin/sh -c`.

use std::collections::BTreeMap;

use kiln_image::config::ContainerConfig;
use kiln_parser::instructions::{lower_instruction, Kind};
use kiln_parser::shell::Lex;
use kiln_parser::ParseError;

use crate::build::{healthcheck_config, parse_ports, shell_wrap, validate_signal};
use crate::fsview::join_abs;

/// The instructions a change may use (moby's `validCommitCommands`).
pub const ALLOWED: [&str; 11] = [
    "CMD",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// Most bytes all changes together may hold.
pub const MAX_CHANGES_BYTES: usize = 1 << 20;

/// Why a change could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The changes hold more than [`MAX_CHANGES_BYTES`].
    #[error("the changes hold {0} bytes, more than the {MAX_CHANGES_BYTES} allowed")]
    TooLarge(usize),
    /// A change does not parse as a Dockerfile instruction.
    #[error("change {index} ({text:?}): {error}")]
    Parse {
        /// 1-based position of the change.
        index: usize,
        /// The change as given.
        text: String,
        /// The parser's error (shown in this one's message, so not a
        /// `source` that would print twice).
        error: ParseError,
    },
    /// A change uses an instruction that does not edit the config.
    #[error(
        "change {index}: {instruction} is not a valid change instruction (allowed: {})",
        ALLOWED.join(", ")
    )]
    NotAllowed {
        /// 1-based position of the change.
        index: usize,
        /// The instruction, upper-cased.
        instruction: String,
    },
    /// A change parses but its value is invalid (bad port, signal, …).
    #[error("change {index} ({text:?}): {message}")]
    Invalid {
        /// 1-based position of the change.
        index: usize,
        /// The change as given.
        text: String,
        /// What is wrong.
        message: String,
    },
}

/// Applies `changes` (one instruction each, in order) to `config`.
pub fn apply_changes(config: &mut ContainerConfig, changes: &[String]) -> Result<(), ChangeError> {
    let total: usize = changes.iter().map(|c| c.len() + 1).sum();
    if total > MAX_CHANGES_BYTES {
        return Err(ChangeError::TooLarge(total));
    }
    let lex = Lex::new('\\');
    let mut cmd_set = false;
    for (i, text) in changes.iter().enumerate() {
        let index = i + 1;
        let parse = |error: ParseError| ChangeError::Parse {
            index,
            text: text.clone(),
            error,
        };
        let invalid = |message: String| ChangeError::Invalid {
            index,
            text: text.clone(),
            message,
        };
        let ast = kiln_parser::parse_ast(text).map_err(parse)?;
        for node in &ast.children {
            let keyword = node.keyword.to_ascii_uppercase();
            if !ALLOWED.contains(&keyword.as_str()) {
                return Err(ChangeError::NotAllowed {
                    index,
                    instruction: keyword,
                });
            }
            let instr = lower_instruction(node, text).map_err(parse)?;
            let env: Vec<(String, String)> = config
                .env
                .iter()
                .flatten()
                .map(|e| match e.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (e.clone(), String::new()),
                })
                .collect();
            let expand = |w: &str| {
                lex.process_word(w, &env)
                    .map_err(|e| invalid(e.to_string()))
            };
            match &instr.kind {
                Kind::Env { vars } => {
                    // Every word expands with the environment from before
                    // this ENV (`ENV a=1 b=$a` sees the old `a`), as Docker.
                    for kv in vars {
                        let k = expand(&kv.key)?;
                        let v = expand(&kv.value)?;
                        let list = config.env.get_or_insert_with(Vec::new);
                        let entry = format!("{k}={v}");
                        match list
                            .iter_mut()
                            .find(|e| e.split_once('=').map_or(e.as_str(), |(a, _)| a) == k)
                        {
                            Some(e) => *e = entry,
                            None => list.push(entry),
                        }
                    }
                }
                Kind::Label { labels } => {
                    for kv in labels {
                        let k = expand(&kv.key)?;
                        let v = expand(&kv.value)?;
                        config.labels.get_or_insert_with(BTreeMap::new).insert(k, v);
                    }
                }
                Kind::User { user } => config.user = Some(expand(user)?),
                Kind::Stopsignal { signal } => {
                    let s = expand(signal)?;
                    validate_signal(&s).map_err(|e| invalid(e.to_string()))?;
                    config.stop_signal = Some(s);
                }
                Kind::Volume { volumes } => {
                    for v in volumes {
                        let v = expand(v)?;
                        if v.is_empty() {
                            return Err(invalid(
                                "VOLUME specified can not be an empty string".into(),
                            ));
                        }
                        config
                            .volumes
                            .get_or_insert_with(BTreeMap::new)
                            .insert(v, Default::default());
                    }
                }
                Kind::Expose { ports } => {
                    for p in ports {
                        let words = lex
                            .process_words(p, &env)
                            .map_err(|e| invalid(e.to_string()))?;
                        for w in words {
                            for spec in parse_ports(&w).map_err(|e| invalid(e.to_string()))? {
                                config
                                    .exposed_ports
                                    .get_or_insert_with(BTreeMap::new)
                                    .insert(spec, Default::default());
                            }
                        }
                    }
                }
                Kind::Onbuild { expression, .. } => config
                    .on_build
                    .get_or_insert_with(Vec::new)
                    .push(expression.clone()),
                Kind::Cmd(cl) => {
                    config.cmd = Some(shell_wrap(cl, &shell(config)));
                    cmd_set = true;
                }
                Kind::Entrypoint(cl) => {
                    let args = shell_wrap(cl, &shell(config));
                    config.entrypoint = (!args.is_empty()).then_some(args);
                    if !cmd_set {
                        config.cmd = None;
                    }
                }
                Kind::Healthcheck(h) => config.healthcheck = Some(healthcheck_config(h)),
                Kind::Workdir { path } => {
                    let p = expand(path)?;
                    let base = config
                        .working_dir
                        .clone()
                        .filter(|w| !w.is_empty())
                        .unwrap_or_else(|| "/".into());
                    config.working_dir = Some(join_abs(&base, &p));
                }
                // ALLOWED above keeps every other kind out.
                _ => {
                    return Err(ChangeError::NotAllowed {
                        index,
                        instruction: keyword,
                    })
                }
            }
        }
    }
    Ok(())
}

/// The shell a shell-form CMD/ENTRYPOINT is wrapped in.
fn shell(config: &ContainerConfig) -> Vec<String> {
    config
        .shell
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(changes: &[&str]) -> Result<ContainerConfig, ChangeError> {
        let mut c = ContainerConfig::default();
        let changes: Vec<String> = changes.iter().map(|s| s.to_string()).collect();
        apply_changes(&mut c, &changes)?;
        Ok(c)
    }

    #[test]
    fn docker_import_changes_set_the_config() {
        let c = apply(&[
            r#"CMD ["bash"]"#,
            "ENV PATH=/usr/local/bin:/usr/bin:/bin",
            "ENV HOME=/root APP=$HOME/app",
            "ENV APP=$HOME/app",
            "EXPOSE 80 53/udp",
            "LABEL org.example.a=$APP",
            "USER app:app",
            "WORKDIR /srv",
            "WORKDIR data",
            "VOLUME /data",
            "STOPSIGNAL SIGINT",
            "ONBUILD RUN echo hi",
            "HEALTHCHECK --interval=5s CMD true",
        ])
        .unwrap();
        assert_eq!(c.cmd, Some(vec!["bash".to_string()]));
        assert_eq!(
            c.env.unwrap(),
            vec![
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "HOME=/root",
                "APP=/root/app"
            ]
        );
        assert_eq!(
            c.exposed_ports.unwrap().keys().cloned().collect::<Vec<_>>(),
            vec!["53/udp", "80/tcp"]
        );
        assert_eq!(c.labels.unwrap()["org.example.a"], "/root/app");
        assert_eq!(c.user.as_deref(), Some("app:app"));
        assert_eq!(c.working_dir.as_deref(), Some("/srv/data"));
        assert!(c.volumes.unwrap().contains_key("/data"));
        assert_eq!(c.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(c.on_build, Some(vec!["RUN echo hi".to_string()]));
        let hc = c.healthcheck.unwrap();
        assert_eq!(hc.interval, Some(5_000_000_000));
    }

    #[test]
    fn shell_form_cmd_is_wrapped_and_entrypoint_resets_an_earlier_cmd_only_if_unset() {
        let c = apply(&["ENTRYPOINT echo hi"]).unwrap();
        assert_eq!(
            c.entrypoint,
            Some(vec!["/bin/sh".into(), "-c".into(), "echo hi".into()])
        );
        assert_eq!(c.cmd, None);
        let c = apply(&[r#"CMD ["x"]"#, r#"ENTRYPOINT ["/e"]"#]).unwrap();
        assert_eq!(c.cmd, Some(vec!["x".into()]));
    }

    #[test]
    fn instructions_that_need_a_build_are_refused_by_name() {
        for (change, name) in [
            ("RUN rm -rf /", "RUN"),
            ("COPY a /b", "COPY"),
            ("ADD http://x/y /y", "ADD"),
            ("FROM busybox", "FROM"),
            ("ARG X=1", "ARG"),
            (r#"SHELL ["/bin/bash", "-c"]"#, "SHELL"),
            ("MAINTAINER me", "MAINTAINER"),
            ("BOGUS x", "BOGUS"),
        ] {
            let e = apply(&[r#"CMD ["ok"]"#, change]).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(&e, ChangeError::NotAllowed { index: 2, instruction } if instruction == name),
                "{change}: {msg}"
            );
            assert!(
                msg.contains(&format!("{name} is not a valid change")),
                "{msg}"
            );
        }
    }

    #[test]
    fn bad_values_and_oversized_changes_are_errors() {
        assert!(matches!(
            apply(&["EXPOSE 99999"]),
            Err(ChangeError::Invalid { .. })
        ));
        assert!(matches!(
            apply(&["STOPSIGNAL SIGNOPE"]),
            Err(ChangeError::Invalid { .. })
        ));
        assert!(matches!(apply(&["ENV"]), Err(ChangeError::Parse { .. })));
        let big = format!("LABEL a={}", "x".repeat(MAX_CHANGES_BYTES));
        assert!(matches!(apply(&[&big]), Err(ChangeError::TooLarge(_))));
    }
}
