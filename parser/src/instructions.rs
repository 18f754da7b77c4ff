//! Typed instructions: the AST lowered into one Rust type per instruction,
//! with flags validated, grouped into stages (BuildKit's `instructions`).
//!
//! Values are kept as written (not unquoted, not expanded): expansion needs
//! the build's environment and happens in the solver with [`crate::shell`].

use serde::Serialize;
use std::time::Duration;

use crate::ast::{Ast, Heredoc, Node};
use crate::error::{suggest, ParseError};
use crate::reader::parse_heredoc;

/// A whole Dockerfile in typed form.
#[derive(Debug, Clone, Serialize)]
pub struct Dockerfile {
    /// Parser directives (`syntax`, `escape`, `check`).
    pub directives: Vec<(String, String)>,
    /// The escape character in force.
    pub escape: char,
    /// Global `ARG`s declared before the first `FROM`.
    pub meta_args: Vec<Instruction>,
    /// The build stages in order.
    pub stages: Vec<Stage>,
    /// Parse warnings (empty continuation lines).
    pub warnings: Vec<String>,
}

/// One `FROM` and the instructions up to the next `FROM`.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    /// The stage's position (0-based).
    pub index: usize,
    /// The lower-cased `AS` name, if any.
    pub name: Option<String>,
    /// The base: `scratch`, an image reference or an earlier stage's name
    /// (not yet expanded: global ARGs may appear in it).
    pub base: String,
    /// `--platform` value, if given.
    pub platform: Option<String>,
    /// The `FROM` line as written.
    pub source: String,
    /// First source line of the `FROM`.
    pub line: usize,
    /// The stage's instructions.
    pub instructions: Vec<Instruction>,
}

/// A located instruction.
#[derive(Debug, Clone, Serialize)]
pub struct Instruction {
    /// What it is, with its validated arguments.
    pub kind: Kind,
    /// The logical line as written (continuations joined).
    pub original: String,
    /// First source line.
    pub line: usize,
    /// Last source line.
    pub end_line: usize,
}

/// Every instruction Dockerfiles have.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "instruction", rename_all = "UPPERCASE")]
pub enum Kind {
    /// `ADD`.
    Add(Add),
    /// `ARG` (one or more names, with optional defaults).
    Arg {
        /// The declared arguments.
        args: Vec<ArgDef>,
    },
    /// `CMD`.
    Cmd(CommandLine),
    /// `COPY`.
    Copy(Copy),
    /// `ENTRYPOINT`.
    Entrypoint(CommandLine),
    /// `ENV`.
    Env {
        /// The variables in order.
        vars: Vec<KeyValue>,
    },
    /// `EXPOSE` (ports sorted as BuildKit sorts them).
    Expose {
        /// Port specs such as `80/tcp`.
        ports: Vec<String>,
    },
    /// `HEALTHCHECK`.
    Healthcheck(Healthcheck),
    /// `LABEL`.
    Label {
        /// The labels in order.
        labels: Vec<KeyValue>,
    },
    /// `MAINTAINER` (deprecated; sets the image author).
    Maintainer {
        /// The author text.
        name: String,
    },
    /// `ONBUILD` with its trigger, validated and kept as text for the image
    /// config.
    Onbuild {
        /// The trigger instruction as it will be stored (heredocs appended).
        expression: String,
        /// The trigger parsed, so errors surface at build time of the base.
        trigger: Box<Kind>,
    },
    /// `RUN`.
    Run(Run),
    /// `SHELL` (JSON form only).
    Shell {
        /// The new shell command line.
        shell: Vec<String>,
    },
    /// `STOPSIGNAL`.
    Stopsignal {
        /// Signal name or number as written.
        signal: String,
    },
    /// `USER`.
    User {
        /// `user[:group]` as written.
        user: String,
    },
    /// `VOLUME`.
    Volume {
        /// Mount points.
        volumes: Vec<String>,
    },
    /// `WORKDIR`.
    Workdir {
        /// The path as written.
        path: String,
    },
}

/// A `key=value` pair of ENV or LABEL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyValue {
    /// Key, as written (may contain quotes to be removed by expansion).
    pub key: String,
    /// Value, as written.
    pub value: String,
    /// True for the legacy `KEY value` form.
    pub legacy_form: bool,
}

/// One name of an `ARG`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArgDef {
    /// The name.
    pub key: String,
    /// The default, if `=` was given (possibly empty).
    pub default: Option<String>,
}

/// The command of RUN, CMD or ENTRYPOINT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandLine {
    /// Exec form: the argv. Shell form: one element, the command text.
    pub args: Vec<String>,
    /// True for the shell form (the current SHELL is prepended).
    pub prepend_shell: bool,
    /// Heredoc files (`RUN <<EOF`).
    pub files: Vec<Heredoc>,
}

/// `RUN` with its flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    /// The command.
    pub command: CommandLine,
    /// `--mount` specs.
    pub mounts: Vec<Mount>,
    /// `--network`.
    pub network: Option<String>,
    /// `--security`.
    pub security: Option<String>,
}

/// Sources and destination of COPY/ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourcesAndDest {
    /// Source paths or URLs, as written.
    pub sources: Vec<String>,
    /// Inline heredoc sources.
    pub contents: Vec<SourceContent>,
    /// Destination, as written.
    pub dest: String,
}

/// A heredoc used as a COPY/ADD source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceContent {
    /// File name (the heredoc's terminator word).
    pub path: String,
    /// Body (chomped when `<<-`).
    pub data: String,
    /// Whether variables in the body are expanded.
    pub expand: bool,
}

/// `COPY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copy {
    /// What to copy where.
    pub paths: SourcesAndDest,
    /// `--from` stage, image or named context.
    pub from: Option<String>,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude` patterns.
    pub excludes: Vec<String>,
}

/// `ADD`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Add {
    /// What to add where.
    pub paths: SourcesAndDest,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--keep-git-dir`, when given.
    pub keep_git_dir: Option<bool>,
    /// `--checksum`.
    pub checksum: Option<String>,
    /// `--unpack`, when given.
    pub unpack: Option<bool>,
    /// `--exclude` patterns.
    pub excludes: Vec<String>,
}

/// `HEALTHCHECK`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Healthcheck {
    /// Docker's `Test`: `["NONE"]`, `["CMD", …]` or `["CMD-SHELL", cmd]`.
    pub test: Vec<String>,
    /// `--interval`.
    pub interval: Option<Duration>,
    /// `--timeout`.
    pub timeout: Option<Duration>,
    /// `--start-period`.
    pub start_period: Option<Duration>,
    /// `--start-interval`.
    pub start_interval: Option<Duration>,
    /// `--retries`.
    pub retries: Option<u32>,
}

/// A `RUN --mount` spec. Values may still hold `$VARS`; they are checked
/// here when literal and again by the solver after expansion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Mount {
    /// `type` (default `bind`).
    pub kind: MountType,
    /// `from`.
    pub from: Option<String>,
    /// `source`/`src`.
    pub source: Option<String>,
    /// `target`/`dst`/`destination`.
    pub target: Option<String>,
    /// Read-only (defaults: bind/secret/ssh read-only, cache/tmpfs writable).
    pub readonly: bool,
    /// `id`.
    pub id: Option<String>,
    /// `sharing` for cache mounts.
    pub sharing: Option<String>,
    /// `required` for secret/ssh mounts.
    pub required: bool,
    /// `size` for tmpfs mounts, in bytes.
    pub size: Option<u64>,
    /// `mode` (octal).
    pub mode: Option<u32>,
    /// `uid`.
    pub uid: Option<u32>,
    /// `gid`.
    pub gid: Option<u32>,
    /// `env` for secrets.
    pub env: Option<String>,
    /// The spec as written.
    pub raw: String,
}

/// The `type=` of a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MountType {
    /// Bind mount from the context, a stage or an image.
    #[default]
    Bind,
    /// Persistent cache directory.
    Cache,
    /// Fresh tmpfs.
    Tmpfs,
    /// A build secret.
    Secret,
    /// A forwarded SSH agent socket.
    Ssh,
}

impl MountType {
    fn as_str(self) -> &'static str {
        match self {
            MountType::Bind => "bind",
            MountType::Cache => "cache",
            MountType::Tmpfs => "tmpfs",
            MountType::Secret => "secret",
            MountType::Ssh => "ssh",
        }
    }
}

/// Every instruction keyword, upper-case.
pub const INSTRUCTIONS: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// An instruction-level error: message plus the text to point the caret at.
struct InstrError {
    message: String,
    needle: Option<String>,
    suggestion: Option<String>,
}

impl InstrError {
    fn new(message: impl Into<String>) -> Self {
        InstrError {
            message: message.into(),
            needle: None,
            suggestion: None,
        }
    }
    fn at(mut self, needle: &str) -> Self {
        self.needle = Some(needle.to_string());
        self
    }
}

type IResult<T> = Result<T, InstrError>;

#[derive(Clone, Copy, PartialEq)]
enum FlagType {
    Bool,
    String,
    Strings,
}

/// BuildKit's `BFlags`: declared flags, then one pass over what was given.
struct Flags<'a> {
    given: &'a [String],
    declared: Vec<(&'static str, FlagType)>,
    values: Vec<Vec<String>>,
}

impl<'a> Flags<'a> {
    fn new(given: &'a [String]) -> Self {
        Flags {
            given,
            declared: Vec::new(),
            values: Vec::new(),
        }
    }

    fn declare(&mut self, name: &'static str, t: FlagType) -> usize {
        self.declared.push((name, t));
        self.values.push(Vec::new());
        self.declared.len() - 1
    }

    fn parse(&mut self) -> IResult<()> {
        for a in self.given {
            if a == "--" {
                return Ok(());
            }
            let Some(body) = a.strip_prefix("--") else {
                return Err(InstrError::new(format!("arg should start with -- : {a}")).at(a));
            };
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let flag_name = format!("--{name}");
            let Some(idx) = self.declared.iter().position(|(n, _)| *n == name) else {
                let names: Vec<&str> = self.declared.iter().map(|(n, _)| *n).collect();
                let mut e = InstrError::new(format!("unknown flag: {flag_name}")).at(a);
                e.suggestion = suggest(name, &names).map(|s| format!("did you mean --{s}?"));
                return Err(e);
            };
            let t = self.declared[idx].1;
            if t != FlagType::Strings && !self.values[idx].is_empty() {
                return Err(
                    InstrError::new(format!("duplicate flag specified: {flag_name}")).at(a),
                );
            }
            let v = match (t, value) {
                (FlagType::Bool, Some("")) => {
                    return Err(
                        InstrError::new(format!("missing a value on flag: {flag_name}")).at(a),
                    )
                }
                (FlagType::Bool, None) => "true".to_string(),
                (FlagType::Bool, Some(v)) => match v.to_ascii_lowercase().as_str() {
                    "true" => "true".to_string(),
                    "false" => "false".to_string(),
                    _ => {
                        return Err(InstrError::new(format!(
                            "expecting boolean value for flag {flag_name}, not: {v}"
                        ))
                        .at(a))
                    }
                },
                (_, None) => {
                    return Err(
                        InstrError::new(format!("missing a value on flag: {flag_name}")).at(a),
                    )
                }
                (_, Some(v)) => v.to_string(),
            };
            self.values[idx].push(v);
        }
        Ok(())
    }

    fn string(&self, idx: usize) -> Option<String> {
        self.values[idx].last().cloned()
    }
    fn bool(&self, idx: usize) -> Option<bool> {
        self.values[idx].last().map(|v| v == "true")
    }
    fn strings(&self, idx: usize) -> Vec<String> {
        self.values[idx].clone()
    }
}

/// Lowers one instruction node of a parsed AST (anything but `FROM`, which
/// [`lower`] handles) into its typed form, with its flags validated. Used
/// alone where instructions come without stages, as `kiln import --change`
/// lines do.
pub fn lower_instruction(node: &Node, source: &str) -> Result<Instruction, ParseError> {
    let kind = parse_kind(node).map_err(|e| {
        ParseError::new(e.message, node.start_line, node.end_line)
            .locate(source, e.needle.as_deref())
            .with_suggestion(e.suggestion)
    })?;
    Ok(Instruction {
        kind,
        original: node.original.clone(),
        line: node.start_line,
        end_line: node.end_line,
    })
}

/// Lowers a parsed AST into stages of typed instructions.
pub fn lower(ast: &Ast, source: &str) -> Result<Dockerfile, ParseError> {
    let mut meta_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    // Stage names seen so far: a set, so that N stages cost N lookups,
    // not N² comparisons.
    let mut names: std::collections::HashSet<String> = std::collections::HashSet::new();
    for node in &ast.children {
        let located = |e: InstrError| {
            ParseError::new(e.message, node.start_line, node.end_line)
                .locate(source, e.needle.as_deref())
                .with_suggestion(e.suggestion)
        };
        if node.keyword.eq_ignore_ascii_case("from") {
            let stage = parse_from(node, stages.len()).map_err(located)?;
            if let Some(name) = &stage.name {
                if !names.insert(name.clone()) {
                    return Err(located(
                        InstrError::new(format!("duplicate stage name {name:?}")).at(name),
                    ));
                }
            }
            stages.push(stage);
            continue;
        }
        let instruction = lower_instruction(node, source)?;
        match stages.last_mut() {
            Some(stage) => stage.instructions.push(instruction),
            None if matches!(instruction.kind, Kind::Arg { .. }) => meta_args.push(instruction),
            None => {
                return Err(located(InstrError::new(format!(
                    "{} instruction before the first FROM: only ARG may precede FROM",
                    node.keyword.to_uppercase()
                ))))
            }
        }
    }
    if stages.is_empty() {
        let line = ast.children.last().map(|n| n.start_line).unwrap_or(0);
        return Err(
            ParseError::new("the Dockerfile has no FROM instruction", line, line)
                .locate(source, None),
        );
    }
    Ok(Dockerfile {
        directives: ast
            .directives
            .iter()
            .map(|d| (d.name.clone(), d.value.clone()))
            .collect(),
        escape: ast.escape,
        meta_args,
        stages,
        warnings: ast.warnings.iter().map(|w| w.short.clone()).collect(),
    })
}

fn is_valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

fn parse_from(node: &Node, index: usize) -> IResult<Stage> {
    let args = node.arg_strings();
    let name = match args.len() {
        3 if args[1].eq_ignore_ascii_case("as") => {
            let name = args[2].to_lowercase();
            if !is_valid_stage_name(&name) {
                return Err(InstrError::new(format!(
                    "invalid name for build stage: {:?}, name can't start with a number or contain symbols",
                    args[2]
                ))
                .at(&args[2]));
            }
            Some(name)
        }
        1 => None,
        _ => {
            return Err(InstrError::new(
                "FROM requires either one or three arguments",
            ))
        }
    };
    let mut flags = Flags::new(&node.flags);
    let platform = flags.declare("platform", FlagType::String);
    flags.parse()?;
    Ok(Stage {
        index,
        name,
        base: args[0].clone(),
        platform: flags.string(platform),
        source: node.original.trim().to_string(),
        line: node.start_line,
        instructions: Vec::new(),
    })
}

fn no_flags(node: &Node) -> IResult<()> {
    Flags::new(&node.flags).parse()
}

fn exactly_one(node: &Node, name: &str) -> IResult<String> {
    let args = node.arg_strings();
    no_flags(node)?;
    match <[String; 1]>::try_from(args) {
        Ok([one]) => Ok(one),
        Err(_) => Err(InstrError::new(format!(
            "{name} requires exactly one argument"
        ))),
    }
}

fn key_values(node: &Node, name: &str) -> IResult<Vec<KeyValue>> {
    no_flags(node)?;
    let args = node.arg_strings();
    if args.is_empty() {
        return Err(InstrError::new(format!(
            "{name} requires at least one argument"
        )));
    }
    if !args.len().is_multiple_of(3) {
        return Err(InstrError::new(format!(
            "Bad input to {name}, too many arguments"
        )));
    }
    let mut out = Vec::new();
    for chunk in args.chunks(3) {
        if chunk[0].is_empty() {
            return Err(InstrError::new(format!("{name} names can not be blank")));
        }
        out.push(KeyValue {
            key: chunk[0].clone(),
            value: chunk[1].clone(),
            legacy_form: chunk[2].is_empty(),
        });
    }
    Ok(out)
}

fn command_line(node: &Node) -> CommandLine {
    CommandLine {
        args: node.arg_strings(),
        prepend_shell: !node.json,
        files: node.heredocs.clone(),
    }
}

/// Parses every instruction other than FROM.
fn parse_kind(node: &Node) -> IResult<Kind> {
    let kw = node.keyword.to_ascii_uppercase();
    Ok(match kw.as_str() {
        "ENV" => Kind::Env {
            vars: key_values(node, "ENV")?,
        },
        "LABEL" => Kind::Label {
            labels: key_values(node, "LABEL")?,
        },
        "MAINTAINER" => Kind::Maintainer {
            name: exactly_one(node, "MAINTAINER")?,
        },
        "WORKDIR" => Kind::Workdir {
            path: exactly_one(node, "WORKDIR")?,
        },
        "USER" => Kind::User {
            user: exactly_one(node, "USER")?,
        },
        "STOPSIGNAL" => Kind::Stopsignal {
            signal: exactly_one(node, "STOPSIGNAL")?,
        },
        "ADD" => Kind::Add(parse_add(node)?),
        "COPY" => Kind::Copy(parse_copy(node)?),
        "RUN" => Kind::Run(parse_run(node)?),
        "CMD" => {
            no_flags(node)?;
            Kind::Cmd(command_line(node))
        }
        "ENTRYPOINT" => {
            no_flags(node)?;
            Kind::Entrypoint(command_line(node))
        }
        "SHELL" => {
            no_flags(node)?;
            let args = node.arg_strings();
            if args.is_empty() {
                return Err(InstrError::new("SHELL requires at least one argument"));
            }
            if !node.json {
                return Err(InstrError::new(format!(
                    "SHELL requires the arguments to be in JSON form: {}",
                    node.original.trim()
                )));
            }
            Kind::Shell { shell: args }
        }
        "EXPOSE" => {
            let mut ports = node.arg_strings();
            if ports.is_empty() {
                return Err(InstrError::new("EXPOSE requires at least one argument"));
            }
            no_flags(node)?;
            ports.sort();
            Kind::Expose { ports }
        }
        "VOLUME" => {
            let args = node.arg_strings();
            if args.is_empty() {
                return Err(InstrError::new("VOLUME requires at least one argument"));
            }
            no_flags(node)?;
            let mut volumes = Vec::new();
            for v in args {
                let v = v.trim();
                if v.is_empty() {
                    return Err(InstrError::new(
                        "VOLUME specified can not be an empty string",
                    ));
                }
                volumes.push(v.to_string());
            }
            Kind::Volume { volumes }
        }
        "ARG" => {
            let args = node.arg_strings();
            if args.is_empty() {
                return Err(InstrError::new("ARG requires at least one argument"));
            }
            no_flags(node)?;
            let mut defs = Vec::new();
            for a in args {
                let def = match a.split_once('=') {
                    Some(("", _)) => return Err(InstrError::new("ARG names can not be blank")),
                    Some((k, v)) => ArgDef {
                        key: k.to_string(),
                        default: Some(v.to_string()),
                    },
                    None => ArgDef {
                        key: a,
                        default: None,
                    },
                };
                defs.push(def);
            }
            Kind::Arg { args: defs }
        }
        "HEALTHCHECK" => Kind::Healthcheck(parse_healthcheck(node)?),
        "ONBUILD" => parse_onbuild(node)?,
        "FROM" => return Err(InstrError::new("FROM is not allowed here")),
        _ => {
            let mut e =
                InstrError::new(format!("unknown instruction: {}", node.keyword)).at(&node.keyword);
            e.suggestion =
                suggest(&node.keyword, &INSTRUCTIONS).map(|s| format!("did you mean {s}?"));
            return Err(e);
        }
    })
}

fn parse_onbuild(node: &Node) -> IResult<Kind> {
    let Some(crate::ast::Arg::Nested(inner)) = node.args.first() else {
        return Err(InstrError::new("ONBUILD requires at least one argument"));
    };
    no_flags(node)?;
    let trigger = inner.keyword.trim().to_ascii_uppercase();
    match trigger.as_str() {
        "ONBUILD" => {
            return Err(
                InstrError::new("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
                    .at("ONBUILD"),
            )
        }
        "MAINTAINER" | "FROM" => {
            return Err(
                InstrError::new(format!("{trigger} isn't allowed as an ONBUILD trigger"))
                    .at(&inner.keyword),
            )
        }
        _ => {}
    }
    let kind = parse_kind(inner)?;
    let original = node.original.trim_start();
    let original = match original.get(..7) {
        Some(kw) if kw.eq_ignore_ascii_case("onbuild") => original[7..].trim_start(),
        _ => original,
    };
    let mut expression = original.to_string();
    for doc in &node.heredocs {
        expression.push('\n');
        expression.push_str(&doc.content);
        expression.push_str(&doc.name);
    }
    Ok(Kind::Onbuild {
        expression,
        trigger: Box::new(kind),
    })
}

fn no_destination(name: &str) -> InstrError {
    InstrError::new(format!(
        "{name} requires at least two arguments, but only one was provided. Destination could not be determined"
    ))
}

fn sources_and_dest(node: &Node, args: &[String], name: &str) -> IResult<SourcesAndDest> {
    let Some((dest, srcs)) = args.split_last().filter(|(_, s)| !s.is_empty()) else {
        return Err(no_destination(name));
    };
    if matches!(parse_heredoc(dest), Ok(Some(_))) {
        return Err(
            InstrError::new(format!("{name} cannot accept a heredoc as a destination")).at(dest),
        );
    }
    let mut sources = Vec::new();
    let mut contents = Vec::new();
    for src in srcs {
        match parse_heredoc(src) {
            Ok(Some(h)) => {
                let body = node
                    .heredocs
                    .iter()
                    .find(|d| d.name == h.name)
                    .map(|d| d.content.clone())
                    .unwrap_or_default();
                let data = if h.chomp {
                    crate::ast::chomp_leading_tabs(&body)
                } else {
                    body
                };
                contents.push(SourceContent {
                    path: h.name,
                    data,
                    expand: h.expand,
                });
            }
            _ => sources.push(src.clone()),
        }
    }
    Ok(SourcesAndDest {
        sources,
        contents,
        dest: dest.clone(),
    })
}

fn parse_copy(node: &Node) -> IResult<Copy> {
    let args = node.arg_strings();
    if args.len() < 2 {
        return Err(no_destination("COPY"));
    }
    let mut f = Flags::new(&node.flags);
    let chown = f.declare("chown", FlagType::String);
    let from = f.declare("from", FlagType::String);
    let chmod = f.declare("chmod", FlagType::String);
    let link = f.declare("link", FlagType::Bool);
    let exclude = f.declare("exclude", FlagType::Strings);
    let parents = f.declare("parents", FlagType::Bool);
    f.parse()?;
    let paths = sources_and_dest(node, &args, "COPY")?;
    if let Some(m) = f.string(chmod) {
        validate_chmod(&m)?;
    }
    Ok(Copy {
        paths,
        from: f.string(from),
        chown: f.string(chown),
        chmod: f.string(chmod),
        link: f.bool(link).unwrap_or(false),
        parents: f.bool(parents).unwrap_or(false),
        excludes: f.strings(exclude),
    })
}

fn parse_add(node: &Node) -> IResult<Add> {
    let args = node.arg_strings();
    if args.len() < 2 {
        return Err(no_destination("ADD"));
    }
    let mut f = Flags::new(&node.flags);
    let chown = f.declare("chown", FlagType::String);
    let chmod = f.declare("chmod", FlagType::String);
    let link = f.declare("link", FlagType::Bool);
    let keep_git = f.declare("keep-git-dir", FlagType::Bool);
    let checksum = f.declare("checksum", FlagType::String);
    let unpack = f.declare("unpack", FlagType::Bool);
    let exclude = f.declare("exclude", FlagType::Strings);
    f.parse()?;
    let paths = sources_and_dest(node, &args, "ADD")?;
    if let Some(m) = f.string(chmod) {
        validate_chmod(&m)?;
    }
    Ok(Add {
        paths,
        chown: f.string(chown),
        chmod: f.string(chmod),
        link: f.bool(link).unwrap_or(false),
        keep_git_dir: f.bool(keep_git),
        checksum: f.string(checksum),
        unpack: f.bool(unpack),
        excludes: f.strings(exclude),
    })
}

/// `--chmod` takes an octal mode or a symbolic one (`u+x,go-w`); a value
/// with `$` is checked after expansion.
fn validate_chmod(mode: &str) -> IResult<()> {
    if mode.contains('$') {
        return Ok(());
    }
    if !mode.is_empty() && mode.chars().all(|c| c.is_ascii_digit()) {
        if u32::from_str_radix(mode, 8).is_ok_and(|m| m <= 0o7777) {
            return Ok(());
        }
        return Err(InstrError::new(format!("invalid chmod parameter: {mode}")).at(mode));
    }
    let symbolic = mode.split(',').all(|clause| {
        let ops_at = clause.find(['+', '-', '=']);
        match ops_at {
            Some(i) => {
                clause[..i].chars().all(|c| "ugoa".contains(c))
                    && clause[i..].chars().all(|c| "+-=rwxXstugo".contains(c))
            }
            None => false,
        }
    });
    if symbolic {
        Ok(())
    } else {
        Err(InstrError::new(format!("invalid chmod parameter: {mode}")).at(mode))
    }
}

fn parse_run(node: &Node) -> IResult<Run> {
    let mut f = Flags::new(&node.flags);
    let mount = f.declare("mount", FlagType::Strings);
    let network = f.declare("network", FlagType::String);
    let security = f.declare("security", FlagType::String);
    f.parse()?;
    let mut mounts = Vec::new();
    for raw in f.strings(mount) {
        let m = parse_mount(&raw).map_err(|e| {
            let at = e.field.as_deref().unwrap_or(&raw);
            InstrError::new(e.message).at(at)
        })?;
        mounts.push(m);
    }
    let network = f.string(network);
    if let Some(n) = &network {
        if !matches!(n.as_str(), "default" | "none" | "host") {
            return Err(InstrError::new(format!("invalid network mode {n:?}")).at(n));
        }
    }
    let security = f.string(security);
    if let Some(s) = &security {
        if !matches!(s.as_str(), "insecure" | "sandbox") {
            return Err(InstrError::new(format!("security {s:?} is not valid")).at(s));
        }
    }
    Ok(Run {
        command: command_line(node),
        mounts,
        network,
        security,
    })
}

/// The fields of a `--mount` value: comma-separated, a field in double
/// quotes may hold commas (`""` is a quote), as Go's `encoding/csv`.
pub fn csv_fields(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("failed to parse csv mounts: unterminated quote".into()),
                }
            }
            match chars.next() {
                None => {
                    out.push(field);
                    return Ok(out);
                }
                Some(',') => {}
                Some(c) => {
                    return Err(format!(
                        "failed to parse csv mounts: unexpected {c:?} after quoted field"
                    ))
                }
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        out.push(field);
                        return Ok(out);
                    }
                    Some(',') => break,
                    Some(c) => field.push(c),
                }
            }
        }
        out.push(field);
    }
}

const MOUNT_KEYS: [&str; 19] = [
    "type",
    "from",
    "source",
    "target",
    "readonly",
    "id",
    "sharing",
    "required",
    "size",
    "mode",
    "uid",
    "gid",
    "src",
    "dst",
    "destination",
    "ro",
    "rw",
    "readwrite",
    "env",
];

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Ok(true),
        "0" | "f" | "false" => Ok(false),
        _ => Err(format!("invalid value for {key}: {v}")),
    }
}

/// A `--mount` value that does not parse: the message and, where one
/// field is at fault, that field (for the caret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountError {
    /// What is wrong.
    pub message: String,
    /// The offending `key=value` field.
    pub field: Option<String>,
}

impl std::fmt::Display for MountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Parses a `--mount` value. Values containing `$` are kept for the solver
/// to expand and re-check.
pub fn parse_mount(raw: &str) -> Result<Mount, MountError> {
    let whole = |message: String| MountError {
        message,
        field: None,
    };
    let fields = csv_fields(raw).map_err(whole)?;
    let mut m = Mount {
        raw: raw.to_string(),
        ..Mount::default()
    };
    let mut ro_auto = true;
    for field in &fields {
        mount_field(&mut m, field, &mut ro_auto).map_err(|message| MountError {
            message,
            field: Some(field.clone()),
        })?;
    }
    check_mount(m, ro_auto).map_err(whole)
}

fn mount_field(m: &mut Mount, field: &str, ro_auto: &mut bool) -> Result<(), String> {
    let (key, value) = match field.split_once('=') {
        Some((k, v)) => (k.to_ascii_lowercase(), Some(v)),
        None => (field.to_ascii_lowercase(), None),
    };
    let Some(value) = value else {
        match key.as_str() {
            "readonly" | "ro" => {
                m.readonly = true;
                *ro_auto = false;
            }
            "readwrite" | "rw" => {
                m.readonly = false;
                *ro_auto = false;
            }
            "required" if matches!(m.kind, MountType::Secret | MountType::Ssh) => m.required = true,
            "required" => {
                return Err(format!(
                    "unexpected key '{key}' for mount type '{}'",
                    m.kind.as_str()
                ))
            }
            _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
        }
        return Ok(());
    };
    if key == "from" {
        if let Some(i) = value.find('$') {
            if i != value.len() - 1 {
                return Err(format!(
                    "'{key}' doesn't support variable expansion, define alias stage instead"
                ));
            }
        }
    }
    let deferred = value.contains('$');
    let num = |radix: u32, what: &str| -> Result<Option<u32>, String> {
        if deferred {
            return Ok(None);
        }
        u32::from_str_radix(value, radix)
            .map(Some)
            .map_err(|_| format!("invalid value {value} for {what}"))
    };
    match key.as_str() {
        "type" => {
            m.kind = match value.to_ascii_lowercase().as_str() {
                "bind" => MountType::Bind,
                "cache" => MountType::Cache,
                "tmpfs" => MountType::Tmpfs,
                "secret" => MountType::Secret,
                "ssh" => MountType::Ssh,
                _ => {
                    let hint = suggest(value, &["bind", "cache", "tmpfs", "secret", "ssh"])
                        .map(|s| format!(" (did you mean {s}?)"))
                        .unwrap_or_default();
                    return Err(format!("unsupported mount type {value:?}{hint}"));
                }
            }
        }
        "from" => m.from = Some(value.to_string()),
        "source" | "src" => m.source = Some(value.to_string()),
        "target" | "dst" | "destination" => m.target = Some(value.to_string()),
        "readonly" | "ro" => {
            if !deferred {
                m.readonly = parse_bool(&key, value)?;
            }
            *ro_auto = false;
        }
        "readwrite" | "rw" => {
            if !deferred {
                m.readonly = !parse_bool(&key, value)?;
            }
            *ro_auto = false;
        }
        "required" => {
            if !matches!(m.kind, MountType::Secret | MountType::Ssh) {
                return Err(format!(
                    "unexpected key '{key}' for mount type '{}'",
                    m.kind.as_str()
                ));
            }
            if !deferred {
                m.required = parse_bool(&key, value)?;
            }
        }
        "size" => {
            if m.kind != MountType::Tmpfs {
                return Err(format!(
                    "unexpected key '{key}' for mount type '{}'",
                    m.kind.as_str()
                ));
            }
            if !deferred {
                m.size = Some(
                    crate::units::ram_in_bytes(value)
                        .map_err(|_| format!("invalid value for {key}: {value}"))?,
                );
            }
        }
        "id" => m.id = Some(value.to_string()),
        "sharing" => {
            let v = value.to_ascii_lowercase();
            if !deferred && !matches!(v.as_str(), "shared" | "private" | "locked") {
                return Err(format!("unsupported sharing value {value:?}"));
            }
            m.sharing = Some(v);
        }
        "mode" => m.mode = num(8, "mode")?,
        "uid" => m.uid = num(10, "uid")?,
        "gid" => m.gid = num(10, "gid")?,
        "env" => m.env = Some(value.to_string()),
        _ => {
            let hint = suggest(&key, &MOUNT_KEYS)
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_default();
            return Err(format!("unexpected key '{key}' in '{field}'{hint}"));
        }
    }
    Ok(())
}

fn check_mount(mut m: Mount, ro_auto: bool) -> Result<Mount, String> {
    let file_info_allowed = matches!(
        m.kind,
        MountType::Secret | MountType::Ssh | MountType::Cache
    );
    if !file_info_allowed {
        for (set, what) in [
            (m.mode.is_some(), "mode"),
            (m.uid.is_some(), "uid"),
            (m.gid.is_some(), "gid"),
        ] {
            if set {
                return Err(format!(
                    "{what} not allowed for {:?} type mounts",
                    m.kind.as_str()
                ));
            }
        }
    }
    if ro_auto {
        m.readonly = !matches!(m.kind, MountType::Cache | MountType::Tmpfs);
    }
    if m.kind == MountType::Secret {
        if m.from.is_some() {
            return Err("secret mount should not have a from".into());
        }
        if m.sharing.is_some() {
            return Err("secret mount should not define sharing".into());
        }
        if m.source.is_none() && m.target.is_none() && m.id.is_none() {
            return Err("invalid secret mount. one of source, target required".into());
        }
        if m.source.is_some() && m.id.is_some() {
            return Err("both source and id can't be set".into());
        }
    }
    if m.sharing.is_some() && m.kind != MountType::Cache {
        return Err(format!(
            "invalid cache sharing set for {} mount",
            m.kind.as_str()
        ));
    }
    Ok(m)
}

/// Go's `time.ParseDuration` (`300ms`, `1m30s`, `1.5h`, `0`).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() || rest.starts_with('-') {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..n_end].parse().ok()?;
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[u_end..];
        total += num * unit;
    }
    // Go's time.Duration is an int64 of nanoseconds: longer is an error.
    let d = Duration::try_from_secs_f64(total).ok()?;
    (d.as_nanos() <= i64::MAX as u128).then_some(d)
}

fn parse_healthcheck(node: &Node) -> IResult<Healthcheck> {
    let args = node.arg_strings();
    let Some(first) = args.first() else {
        return Err(InstrError::new(
            "HEALTHCHECK requires at least one argument",
        ));
    };
    let typ = first.to_ascii_uppercase();
    let rest = &args[1..];
    let mut hc = Healthcheck {
        test: Vec::new(),
        interval: None,
        timeout: None,
        start_period: None,
        start_interval: None,
        retries: None,
    };
    if typ == "NONE" {
        if !rest.is_empty() {
            return Err(InstrError::new("HEALTHCHECK NONE takes no arguments"));
        }
        no_flags(node)?;
        hc.test = vec![typ];
        return Ok(hc);
    }
    let mut f = Flags::new(&node.flags);
    let interval = f.declare("interval", FlagType::String);
    let timeout = f.declare("timeout", FlagType::String);
    let start_period = f.declare("start-period", FlagType::String);
    let start_interval = f.declare("start-interval", FlagType::String);
    let retries = f.declare("retries", FlagType::String);
    f.parse()?;
    if typ != "CMD" {
        return Err(
            InstrError::new(format!("Unknown type \"{typ}\" in HEALTHCHECK (try CMD)")).at(first),
        );
    }
    if rest.is_empty() {
        return Err(InstrError::new("Missing command after HEALTHCHECK CMD"));
    }
    let t = if node.json { "CMD" } else { "CMD-SHELL" };
    hc.test = std::iter::once(t.to_string())
        .chain(rest.iter().cloned())
        .collect();
    let dur = |idx: usize, name: &str| -> IResult<Option<Duration>> {
        let Some(v) = f.string(idx).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let d = parse_go_duration(&v)
            .ok_or_else(|| InstrError::new(format!("time: invalid duration {v:?}")).at(&v))?;
        if d.is_zero() {
            return Ok(None);
        }
        if d < Duration::from_millis(1) {
            return Err(InstrError::new(format!(
                "Interval \"{name}\" cannot be less than 1ms"
            )));
        }
        Ok(Some(d))
    };
    hc.interval = dur(interval, "interval")?;
    hc.timeout = dur(timeout, "timeout")?;
    hc.start_period = dur(start_period, "start-period")?;
    hc.start_interval = dur(start_interval, "start-interval")?;
    if let Some(r) = f.string(retries).filter(|r| !r.is_empty()) {
        let n: i64 = r
            .parse()
            .map_err(|_| InstrError::new(format!("invalid --retries value {r:?}")).at(&r))?;
        if n < 0 {
            return Err(InstrError::new(format!(
                "--retries cannot be negative ({n})"
            )));
        }
        hc.retries = Some(u32::try_from(n).map_err(|_| InstrError::new("--retries is too large"))?);
    }
    Ok(hc)
}

#[cfg(test)]
mod tests {
    /// 50,000 `FROM … AS sN` lines: the duplicate-name check is a set
    /// lookup (it was a scan of every earlier stage: 100,000 stages took
    /// over two minutes).
    #[test]
    fn many_named_stages_lower_in_linear_time() {
        let src: String = (0..50_000)
            .map(|i| format!("FROM busybox AS s{i}\n"))
            .collect();
        let t = std::time::Instant::now();
        let df = crate::parse(&src).expect("parse");
        assert_eq!(df.stages.len(), 50_000);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
        let dup = format!("{src}FROM busybox AS s7\n");
        let e = crate::parse(&dup).expect_err("a duplicate name");
        assert!(e.to_string().contains("duplicate stage name"), "{e}");
    }

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_go_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("-1s"), None);
    }

    #[test]
    fn mounts() {
        let m = parse_mount("type=cache,target=/root/.cache,sharing=locked").unwrap();
        assert_eq!(m.kind, MountType::Cache);
        assert!(!m.readonly);
        let m = parse_mount("type=secret,id=tok,required").unwrap();
        assert!(m.required && m.readonly);
        assert!(parse_mount("type=bind,target=/x,bogus=1")
            .unwrap_err()
            .message
            .contains("unexpected key 'bogus'"));
        assert!(parse_mount("type=bnid,target=/x")
            .unwrap_err()
            .message
            .contains("did you mean bind?"));
        assert!(parse_mount("type=bind,target=/x,mode=0700").is_err());
        assert_eq!(
            parse_mount("type=tmpfs,target=/t,size=64m").unwrap().size,
            Some(64 << 20)
        );
        assert_eq!(
            csv_fields("a=1,\"b=x,y\",c").unwrap(),
            vec!["a=1", "b=x,y", "c"]
        );
    }

    #[test]
    fn chmod_forms() {
        assert!(validate_chmod("0755").is_ok());
        assert!(validate_chmod("u+x,go-w").is_ok());
        assert!(validate_chmod("999").is_err());
        assert!(validate_chmod("rwx").is_err());
    }
}
