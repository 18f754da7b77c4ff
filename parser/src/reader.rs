//! The line reader: a small state machine over physical lines that handles
//! directives, the escape character, continuations, comments and heredocs,
//! and dispatches each logical line to its argument parser.

use crate::ast::{Arg, Ast, Directive, Heredoc, Node, Warning};
use crate::directives::{DirectiveError, DirectiveParser};
use crate::error::ParseError;
use crate::shell::{Env, Lex, ShellError};

/// State that the directives at the top of the file set.
pub(crate) struct Directives {
    pub(crate) escape: char,
    parser: DirectiveParser,
}

impl Directives {
    pub(crate) fn new() -> Self {
        Directives {
            escape: '\\',
            parser: DirectiveParser::default(),
        }
    }

    /// Looks for a directive on `line`; returns it when found.
    fn possible_directive(&mut self, line: &str) -> Result<Option<Directive>, DirectiveError> {
        let Some(found) = self.parser.parse_line(line)? else {
            return Ok(None);
        };
        if found.name == "escape" {
            match found.value.as_str() {
                "\\" => self.escape = '\\',
                "`" => self.escape = '`',
                other => return Err(DirectiveError::InvalidEscape(other.to_string())),
            }
        }
        Ok(Some(Directive {
            name: found.name,
            value: found.value,
            line: found.line,
        }))
    }
}

struct EmptyEnv;

impl Env for EmptyEnv {
    fn get(&self, _key: &str) -> Option<String> {
        None
    }
}

fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

fn trim_leading_ws(s: &str) -> &str {
    s.trim_start_matches(char::is_whitespace)
}

fn is_comment(line: &str) -> bool {
    trim_leading_ws(line).starts_with('#')
}

/// Removes a trailing continuation (`E[ \t]*$` not preceded by another
/// `E`); returns the line and whether the logical line ends here.
fn trim_continuation(line: &str, escape: char) -> (String, bool) {
    let stripped = line.trim_end_matches([' ', '\t']);
    if let Some(before) = stripped.strip_suffix(escape) {
        if before.is_empty() {
            return (String::new(), false);
        }
        if !before.ends_with(escape) {
            return (before.to_string(), false);
        }
    }
    (line.to_string(), true)
}

/// Parses Dockerfile text into its syntax tree.
pub fn parse(source: &str) -> Result<Ast, ParseError> {
    let mut d = Directives::new();
    let mut directives = Vec::new();
    let mut children: Vec<Node> = Vec::new();
    let mut warnings = Vec::new();
    let mut comments: Vec<String> = Vec::new();
    let mut current_line = 0usize;
    let mut lines = source.split_inclusive('\n').peekable();
    let err = |msg: String, start: usize, end: usize| ParseError::new(msg, start, end);

    while let Some(raw) = lines.next() {
        let raw = if current_line == 0 {
            raw.strip_prefix('\u{feff}').unwrap_or(raw)
        } else {
            raw
        };
        if is_comment(raw) {
            let mut rest = raw.chars();
            rest.next();
            let comment = rest.as_str().trim();
            if comment.is_empty() {
                comments.clear();
            } else {
                comments.push(comment.to_string());
            }
        }
        let token = trim_leading_ws(trim_newline(raw));
        match d.possible_directive(token) {
            Ok(Some(directive)) => {
                comments.pop();
                directives.push(directive);
            }
            Ok(None) => {}
            Err(e) => return Err(err(e.to_string(), current_line + 1, current_line + 1)),
        }
        let token = if is_comment(token) { "" } else { token };
        current_line += 1;
        let start_line = current_line;
        let (first, mut is_end) = trim_continuation(token, d.escape);
        if is_end && first.is_empty() {
            continue;
        }
        let mut buf = first;
        let mut has_empty_continuation = false;
        while !is_end {
            let Some(raw) = lines.next() else { break };
            let token = trim_newline(raw);
            if let Err(e) = d.possible_directive(token) {
                return Err(err(e.to_string(), current_line + 1, current_line + 1));
            }
            current_line += 1;
            if is_comment(raw) {
                continue;
            }
            if trim_leading_ws(token).is_empty() {
                has_empty_continuation = true;
                continue;
            }
            let (part, end) = trim_continuation(token, d.escape);
            is_end = end;
            buf.push_str(&part);
        }
        let line = buf;
        if has_empty_continuation {
            warnings.push(Warning {
                short: format!("Empty continuation line found in: {line}"),
                line: current_line,
            });
        }
        let mut child = new_node_from_line(&line, &d, std::mem::take(&mut comments)).map_err(
            |(msg, needle)| err(msg, start_line, current_line).locate(source, needle.as_deref()),
        )?;
        if can_contain_heredoc(&child) && line.contains("<<") {
            let docs = heredocs_from_line(&line).map_err(|m| {
                err(m.to_string(), start_line, current_line).locate(source, Some("<<"))
            })?;
            for mut doc in docs {
                let mut content = String::new();
                let mut terminated = false;
                for raw in lines.by_ref() {
                    current_line += 1;
                    let mut candidate = trim_newline(raw);
                    if doc.chomp {
                        candidate = candidate.trim_start_matches('\t');
                    }
                    if candidate == doc.name {
                        terminated = true;
                        break;
                    }
                    content.push_str(raw);
                }
                if !terminated {
                    return Err(err("unterminated heredoc".into(), start_line, current_line)
                        .locate(source, Some("<<")));
                }
                doc.content = content;
                child.heredocs.push(doc);
            }
        }
        child.start_line = start_line;
        child.end_line = current_line;
        children.push(child);
    }
    if children.is_empty() {
        return Err(ParseError::new("file with no instructions", 0, 0));
    }
    Ok(Ast {
        directives,
        escape: d.escape,
        children,
        warnings,
    })
}

fn can_contain_heredoc(node: &Node) -> bool {
    let mut node = node;
    if node.keyword.eq_ignore_ascii_case("onbuild") {
        if let Some(Arg::Nested(inner)) = node.args.first() {
            node = inner;
        }
    }
    let kw = node.keyword.to_ascii_lowercase();
    matches!(kw.as_str(), "add" | "copy" | "run") && !node.json
}

/// Finds the heredoc words (`<<EOF`, `<<-'EOF'`, `3<<EOF`) of a line.
fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, HeredocError> {
    let lex = Lex::new('\\')
        .raw_quotes(true)
        .raw_escapes(true)
        .skip_unset_env(true);
    let words = lex.process_words(line, &EmptyEnv).unwrap_or_default();
    let mut docs = Vec::new();
    for word in words {
        if let Some(doc) = parse_heredoc(&word)? {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// A heredoc word that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeredocError {
    /// Its terminator does not expand.
    #[error(transparent)]
    Shell(#[from] ShellError),
    /// The two lexing passes disagree (BuildKit's internal check).
    #[error("internal lexing of heredoc produced inconsistent results: {0}")]
    Inconsistent(String),
}

/// BuildKit's `ParseHeredoc`: recognises `^(\d*)<<(-?)\s*([^<]*)$` and
/// works out the terminator name and whether its body expands.
pub fn parse_heredoc(src: &str) -> Result<Option<Heredoc>, HeredocError> {
    let digits = src.bytes().take_while(u8::is_ascii_digit).count();
    let Some(after) = src[digits..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, after) = match after.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, after),
    };
    let rest = after.trim_start_matches(char::is_whitespace);
    if rest.contains('<') || rest.is_empty() {
        return Ok(None);
    }
    // Go's ParseUint fails on overflow and yields 0.
    let fd = src[..digits].parse::<u32>().unwrap_or(0);
    let lex = Lex::new('\\').skip_unset_env(true);
    let words = lex.process_words(rest, &EmptyEnv)?;
    if words.len() != 1 {
        return Ok(None);
    }
    let raw = Lex::new('\\')
        .skip_unset_env(true)
        .raw_quotes(true)
        .process_words(rest, &EmptyEnv)?;
    if raw.len() != words.len() {
        return Err(HeredocError::Inconsistent(rest.to_string()));
    }
    let quotes = |w: &str| w.chars().filter(|c| *c == '\'' || *c == '"').count();
    let name = words[0].clone();
    let expand = quotes(&name) == quotes(&raw[0]);
    Ok(Some(Heredoc {
        name,
        fd,
        expand,
        chomp,
        content: String::new(),
    }))
}

type LineError = (String, Option<String>);

fn new_node_from_line(
    line: &str,
    d: &Directives,
    comments: Vec<String>,
) -> Result<Node, LineError> {
    node_from_line(line, d, comments, false)
}

/// The node of `line`; `in_onbuild`: it is an `ONBUILD`'s trigger, where
/// another `ONBUILD` is kept as its text, not parsed (`ONBUILD ONBUILD …`
/// is refused later, and thousands of them recursed once per word).
fn node_from_line(
    line: &str,
    d: &Directives,
    comments: Vec<String>,
    in_onbuild: bool,
) -> Result<Node, LineError> {
    let (cmd, flags, args) = split_command(line, d.escape);
    let (args, json) = match cmd.to_ascii_lowercase().as_str() {
        "add" | "copy" | "volume" => parse_maybe_json_to_list(&args)?,
        "arg" => (values(parse_words(&args, d.escape)), false),
        "cmd" | "entrypoint" | "run" | "shell" => parse_maybe_json(&args)?,
        "env" => (parse_name_val(&args, "ENV", d.escape)?, false),
        "label" => (parse_name_val(&args, "LABEL", d.escape)?, false),
        "expose" | "from" => (values(split_ws(&args)), false),
        "healthcheck" => parse_health_config(&args)?,
        "maintainer" | "stopsignal" | "user" | "workdir" => {
            if args.is_empty() {
                (Vec::new(), false)
            } else {
                (vec![Arg::Value(args.clone())], false)
            }
        }
        "onbuild" => {
            if args.is_empty() {
                (Vec::new(), false)
            } else if in_onbuild {
                (vec![Arg::Value(args.clone())], false)
            } else {
                let inner = node_from_line(&args, d, Vec::new(), true)?;
                (vec![Arg::Nested(Box::new(inner))], false)
            }
        }
        _ => (vec![Arg::Value(String::new())], false),
    };
    Ok(Node {
        keyword: cmd,
        flags,
        args,
        json,
        original: line.to_string(),
        heredocs: Vec::new(),
        start_line: 0,
        end_line: 0,
        comments,
    })
}

fn values(v: Vec<String>) -> Vec<Arg> {
    v.into_iter().map(Arg::Value).collect()
}

fn is_go_ws(c: char) -> bool {
    matches!(c, '\t' | '\u{0B}' | '\u{0C}' | '\r' | ' ')
}

/// Splits on runs of `[\t\v\f\r ]` (the text is already trimmed).
fn split_ws(s: &str) -> Vec<String> {
    if s.is_empty() {
        return Vec::new();
    }
    s.split(is_go_ws)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// `cmd`, the leading `--flags`, and the rest of the line.
fn split_command(line: &str, escape: char) -> (String, Vec<String>, String) {
    let trimmed = line.trim();
    let (cmd, rest) = match trimmed.find(is_go_ws) {
        Some(i) => {
            let rest = trimmed[i..].trim_start_matches(is_go_ws);
            (&trimmed[..i], Some(rest))
        }
        None => (trimmed, None),
    };
    match rest {
        Some(rest) => {
            let (args, flags) = extract_builder_flags(rest, escape);
            (cmd.to_string(), flags, args.trim().to_string())
        }
        None => (cmd.to_string(), Vec::new(), String::new()),
    }
}

/// Pulls leading `--name[=value]` words off `line` (quotes removed, escapes
/// honoured); a bare `--` ends the flags and is dropped.
fn extract_builder_flags(line: &str, escape: char) -> (String, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote(char),
    }
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut blank_ok = false;
    let mut i = 0;
    while i < chars.len() {
        let (pos, ch) = chars[i];
        match phase {
            Phase::Spaces => {
                if ch.is_whitespace() {
                    i += 1;
                    continue;
                }
                let next_is_dash = chars.get(i + 1).is_some_and(|(_, c)| *c == '-');
                if ch != '-' || !next_is_dash {
                    return (line[pos..].to_string(), words);
                }
                phase = Phase::Word;
                continue;
            }
            Phase::Word => {
                if ch.is_whitespace() {
                    phase = Phase::Spaces;
                    if word == "--" {
                        return (line[pos..].to_string(), words);
                    }
                    if blank_ok || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    word.clear();
                    blank_ok = false;
                    i += 1;
                    continue;
                }
                if ch == '\'' || ch == '"' {
                    phase = Phase::Quote(ch);
                    blank_ok = true;
                    i += 1;
                    continue;
                }
                if ch == escape {
                    if i + 1 == chars.len() {
                        i += 1;
                        continue;
                    }
                    i += 1;
                    word.push(chars[i].1);
                    i += 1;
                    continue;
                }
                word.push(ch);
                i += 1;
            }
            Phase::Quote(q) => {
                if ch == q {
                    phase = Phase::Word;
                    i += 1;
                    continue;
                }
                if ch == escape {
                    if i + 1 == chars.len() {
                        phase = Phase::Word;
                        i += 1;
                        continue;
                    }
                    i += 1;
                    word.push(chars[i].1);
                    i += 1;
                    continue;
                }
                word.push(ch);
                i += 1;
            }
        }
    }
    if phase != Phase::Spaces && word != "--" && (blank_ok || !word.is_empty()) {
        words.push(word);
    }
    (String::new(), words)
}

/// Splits on whitespace keeping quotes and escapes in the words (ARG, and
/// LABEL/ENV `key=value` detection).
pub(crate) fn parse_words(rest: &str, escape: char) -> Vec<String> {
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut blank_ok = false;
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        if !in_word && quote.is_none() {
            if ch.is_whitespace() {
                i += 1;
                continue;
            }
            in_word = true;
        }
        if let Some(q) = quote {
            if ch == q {
                quote = None;
            }
            if ch == escape && q != '\'' {
                if i + 1 == chars.len() {
                    quote = None;
                    i += 1;
                    continue;
                }
                word.push(ch);
                i += 1;
                word.push(chars[i]);
                i += 1;
                continue;
            }
            word.push(ch);
            i += 1;
            continue;
        }
        if ch.is_whitespace() {
            in_word = false;
            if blank_ok || !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            blank_ok = false;
            i += 1;
            continue;
        }
        if ch == '\'' || ch == '"' {
            quote = Some(ch);
            blank_ok = true;
        }
        if ch == escape {
            if i + 1 == chars.len() {
                i += 1;
                continue;
            }
            word.push(ch);
            i += 1;
            word.push(chars[i]);
            i += 1;
            continue;
        }
        word.push(ch);
        i += 1;
    }
    if (in_word || quote.is_some()) && (blank_ok || !word.is_empty()) {
        words.push(word);
    }
    words
}

fn parse_name_val(rest: &str, key: &str, escape: char) -> Result<Vec<Arg>, LineError> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    if !first.contains('=') {
        let mut parts = rest.splitn(2, is_go_ws);
        let name = parts.next().unwrap_or_default();
        let value = parts.next().map(|v| v.trim_start_matches(is_go_ws));
        return match value {
            Some(v) => Ok(values(vec![name.into(), v.into(), String::new()])),
            None => Err((format!("{key} must have two arguments"), None)),
        };
    }
    let mut out = Vec::new();
    for w in &words {
        let Some((k, v)) = w.split_once('=') else {
            return Err((
                format!(
                    "Syntax error - can't find = in {}. Must be of the form: name=value",
                    crate::ast::go_quote(w)
                ),
                Some(w.clone()),
            ));
        };
        out.extend(values(vec![k.into(), v.into(), "=".into()]));
    }
    Ok(out)
}

/// Parses `rest` as a JSON array of strings: `Ok(None)` when it is not a
/// JSON array at all, an error when it is one with a non-string element.
pub(crate) fn parse_json_array(rest: &str) -> Result<Option<Vec<String>>, LineError> {
    let t = rest.trim_start_matches(char::is_whitespace);
    if !t.starts_with('[') {
        return Ok(None);
    }
    let Ok(items) = serde_json::from_str::<Vec<serde_json::Value>>(t) else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item {
            serde_json::Value::String(s) => out.push(s),
            _ => {
                return Err((
                    "when using JSON array syntax, arrays must be comprised of strings only".into(),
                    Some("[".into()),
                ))
            }
        }
    }
    Ok(Some(out))
}

fn parse_maybe_json(rest: &str) -> Result<(Vec<Arg>, bool), LineError> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    match parse_json_array(rest)? {
        Some(items) => Ok((values(items), true)),
        None => Ok((vec![Arg::Value(rest.to_string())], false)),
    }
}

fn parse_maybe_json_to_list(rest: &str) -> Result<(Vec<Arg>, bool), LineError> {
    match parse_json_array(rest)? {
        Some(items) => Ok((values(items), true)),
        None => Ok((values(split_ws(rest)), false)),
    }
}

fn parse_health_config(rest: &str) -> Result<(Vec<Arg>, bool), LineError> {
    // Byte-wise like BuildKit: ASCII whitespace ends the type word.
    let is_space = |b: u8| matches!(b, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ');
    let bytes = rest.as_bytes();
    let sep = bytes
        .iter()
        .position(|b| is_space(*b))
        .unwrap_or(bytes.len());
    if sep == 0 {
        return Ok((Vec::new(), false));
    }
    let next = bytes[sep..]
        .iter()
        .position(|b| !is_space(*b))
        .map(|p| sep + p)
        .unwrap_or(bytes.len());
    let (mut cmd, json) = parse_maybe_json(&rest[next..])?;
    let mut args = vec![Arg::Value(rest[..sep].to_string())];
    args.append(&mut cmd);
    Ok((args, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_regex_semantics() {
        assert_eq!(trim_continuation("foo \\", '\\'), ("foo ".into(), false));
        assert_eq!(trim_continuation("foo\\  \t", '\\'), ("foo".into(), false));
        assert_eq!(trim_continuation("\\ ", '\\'), ("".into(), false));
        assert_eq!(
            trim_continuation("foo \\\\", '\\'),
            ("foo \\\\".into(), true)
        );
        assert_eq!(trim_continuation("foo `", '`'), ("foo ".into(), false));
        assert_eq!(trim_continuation("foo \\", '`'), ("foo \\".into(), true));
    }

    #[test]
    fn flags_are_extracted() {
        let (rest, flags) = extract_builder_flags("--from=a --chown=\"1:1\" x y", '\\');
        assert_eq!(flags, vec!["--from=a", "--chown=1:1"]);
        assert_eq!(rest, "x y");
        let (rest, flags) = extract_builder_flags("--link -- --not-a-flag", '\\');
        assert_eq!(flags, vec!["--link"]);
        assert_eq!(rest.trim(), "--not-a-flag");
    }
}
