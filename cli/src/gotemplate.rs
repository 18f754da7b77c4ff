//! Go `text/template`, as far as docker's `--format` uses it, over JSON
//! values: `{{.Field.Path}}`, `{{.}}`, variables (`$x := …`, `$.Root`),
//! pipelines (`{{.Size | printf "%d"}}`), parenthesised calls, `if` /
//! `else if` / `else`, `range` (with `$i, $v :=`) and `with`, `{{- -}}`
//! trimming and `{{/* comments */}}`; Go's functions `and or not len index
//! print printf println eq ne lt le gt ge slice` and docker's `json join
//! split upper lower title truncate pad`. Values print as Go's `%v` does
//! (`[a b]`, `map[k:v]`, `<no value>` for a missing key).
//!
//! No crate implements Go templates with Go's printing of lists and maps
//! (the one there is, gtmpl, prints Rust's `Debug` form, which breaks
//! `{{.Config.Env}}`); this is small and over the JSON docker's commands
//! render anyway.

use serde_json::Value;

/// A template that does not parse or fails to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template: {0}")]
pub struct TemplateError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, TemplateError> {
    Err(TemplateError(m.into()))
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    nodes: Vec<Node>,
}

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Action(Pipeline),
    If(Vec<(Pipeline, Vec<Node>)>, Vec<Node>),
    Range(Pipeline, Vec<Node>, Vec<Node>),
    With(Pipeline, Vec<Node>, Vec<Node>),
}

#[derive(Debug, Clone)]
struct Pipeline {
    /// `$a, $b :=` (or `=`).
    decl: Vec<String>,
    cmds: Vec<Vec<Arg>>,
}

#[derive(Debug, Clone)]
enum Arg {
    /// `.A.B` (empty: `.`).
    Field(Vec<String>),
    /// `$x.A.B` (`$` alone: the root).
    Var(String, Vec<String>),
    Lit(Value),
    Ident(String),
    Sub(Pipeline, Vec<String>),
}

// ------------------------------------------------------------- lexing

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Field(Vec<String>),
    Var(String, Vec<String>),
    Str(String),
    Num(f64),
    Ident(String),
    LParen,
    RParen(Vec<String>),
    Pipe,
    Decl,
    Assign,
    Comma,
}

fn fields(s: &str, i: &mut usize) -> Vec<String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    while *i < b.len() && b[*i] == b'.' {
        let start = *i + 1;
        let mut j = start;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        if j == start {
            break;
        }
        out.push(s[start..j].to_string());
        *i = j;
    }
    out
}

fn lex(s: &str) -> Result<Vec<Tok>, TemplateError> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push(Tok::LParen);
                i += 1
            }
            b')' => {
                i += 1;
                let f = fields(s, &mut i);
                out.push(Tok::RParen(f))
            }
            b'|' => {
                out.push(Tok::Pipe);
                i += 1
            }
            b',' => {
                out.push(Tok::Comma);
                i += 1
            }
            b':' if b.get(i + 1) == Some(&b'=') => {
                out.push(Tok::Decl);
                i += 2
            }
            b'=' => {
                out.push(Tok::Assign);
                i += 1
            }
            b'"' => {
                let mut j = i + 1;
                let mut esc = false;
                while j < b.len() && (esc || b[j] != b'"') {
                    esc = !esc && b[j] == b'\\';
                    j += 1;
                }
                if j >= b.len() {
                    return err("unterminated quoted string");
                }
                let v: String = serde_json::from_str(&s[i..=j])
                    .map_err(|e| TemplateError(format!("bad string {}: {e}", &s[i..=j])))?;
                out.push(Tok::Str(v));
                i = j + 1;
            }
            b'`' => {
                let j = s[i + 1..]
                    .find('`')
                    .ok_or_else(|| TemplateError("unterminated raw string".into()))?;
                out.push(Tok::Str(s[i + 1..i + 1 + j].to_string()));
                i += j + 2;
            }
            b'.' => {
                let f = fields(s, &mut i);
                if f.is_empty() {
                    i += 1;
                }
                out.push(Tok::Field(f))
            }
            b'$' => {
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                let name = s[i + 1..j].to_string();
                i = j;
                let f = fields(s, &mut i);
                out.push(Tok::Var(name, f))
            }
            b'-' | b'0'..=b'9' => {
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
                    j += 1;
                }
                let n: f64 = s[i..j]
                    .parse()
                    .map_err(|_| TemplateError(format!("bad number {:?}", &s[i..j])))?;
                out.push(Tok::Num(n));
                i = j;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                out.push(Tok::Ident(s[i..j].to_string()));
                i = j;
            }
            _ => return err(format!("unexpected {:?} in action", c as char)),
        }
    }
    Ok(out)
}

// ------------------------------------------------------------ parsing

struct Toks {
    t: Vec<Tok>,
    i: usize,
}

impl Toks {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.t.get(self.i).cloned();
        self.i += 1;
        t
    }
}

fn parse_pipeline(t: &mut Toks, nested: bool) -> Result<Pipeline, TemplateError> {
    let mut decl = Vec::new();
    // `$a :=`, `$a, $b :=`
    let save = t.i;
    let mut vars = Vec::new();
    while let Some(Tok::Var(n, f)) = t.peek().cloned() {
        if !f.is_empty() {
            break;
        }
        t.next();
        vars.push(n);
        match t.peek() {
            Some(Tok::Comma) => {
                t.next();
            }
            Some(Tok::Decl) | Some(Tok::Assign) => {
                t.next();
                decl = vars.clone();
                break;
            }
            _ => break,
        }
    }
    if decl.is_empty() {
        t.i = save;
    }
    let mut cmds = Vec::new();
    let mut cmd = Vec::new();
    loop {
        match t.next() {
            None => break,
            Some(Tok::RParen(f)) if nested => {
                t.i -= 1;
                let _ = f;
                break;
            }
            Some(Tok::Pipe) => {
                if cmd.is_empty() {
                    return err("missing command before |");
                }
                cmds.push(std::mem::take(&mut cmd));
            }
            Some(Tok::Field(f)) => cmd.push(Arg::Field(f)),
            Some(Tok::Var(n, f)) => cmd.push(Arg::Var(n, f)),
            Some(Tok::Str(s)) => cmd.push(Arg::Lit(Value::String(s))),
            Some(Tok::Num(n)) => cmd.push(Arg::Lit(
                serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number),
            )),
            Some(Tok::Ident(id)) => cmd.push(match id.as_str() {
                "true" => Arg::Lit(Value::Bool(true)),
                "false" => Arg::Lit(Value::Bool(false)),
                "nil" => Arg::Lit(Value::Null),
                _ => Arg::Ident(id),
            }),
            Some(Tok::LParen) => {
                let p = parse_pipeline(t, true)?;
                match t.next() {
                    Some(Tok::RParen(f)) => cmd.push(Arg::Sub(p, f)),
                    _ => return err("unclosed left paren"),
                }
            }
            Some(tok) => return err(format!("unexpected {tok:?}")),
        }
    }
    if !cmd.is_empty() {
        cmds.push(cmd);
    }
    if cmds.is_empty() {
        return err("missing value for command");
    }
    Ok(Pipeline { decl, cmds })
}

enum Piece {
    Text(String),
    Action(String),
}

fn split(src: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = &rest[..start];
        if trim_next {
            text = text.trim_start();
        }
        let after = &rest[start + 2..];
        let trim_before =
            after.starts_with("- ") || after.starts_with("-\t") || after.starts_with("-\n");
        if trim_before {
            text = text.trim_end();
        }
        out.push(Piece::Text(text.to_string()));
        let end = after
            .find("}}")
            .ok_or_else(|| TemplateError("unclosed action".into()))?;
        let mut inner = &after[..end];
        if trim_before {
            inner = &inner[1..];
        }
        trim_next = inner.ends_with(" -") || inner.ends_with("\t-") || inner.ends_with("\n-");
        if trim_next {
            inner = &inner[..inner.len() - 1];
        }
        let inner = inner.trim();
        if !(inner.starts_with("/*") && inner.ends_with("*/")) {
            out.push(Piece::Action(inner.to_string()));
        }
        rest = &after[end + 2..];
    }
    out.push(Piece::Text(if trim_next {
        rest.trim_start().to_string()
    } else {
        rest.to_string()
    }));
    Ok(out)
}

enum Stop {
    End,
    Else(Option<String>),
    Eof,
}

fn parse_list(pieces: &mut std::vec::IntoIter<Piece>) -> Result<(Vec<Node>, Stop), TemplateError> {
    let mut nodes = Vec::new();
    while let Some(p) = pieces.next() {
        let a = match p {
            Piece::Text(t) => {
                if !t.is_empty() {
                    nodes.push(Node::Text(t));
                }
                continue;
            }
            Piece::Action(a) => a,
        };
        let (word, rest) = match a.split_once(|c: char| c.is_whitespace()) {
            Some((w, r)) => (w, r.trim()),
            None => (a.as_str(), ""),
        };
        let pipe = |s: &str| -> Result<Pipeline, TemplateError> {
            let mut t = Toks { t: lex(s)?, i: 0 };
            let p = parse_pipeline(&mut t, false)?;
            if t.i < t.t.len() {
                return err(format!("unexpected {:?}", t.t[t.i]));
            }
            Ok(p)
        };
        match word {
            "end" => return Ok((nodes, Stop::End)),
            "else" => {
                return Ok((
                    nodes,
                    Stop::Else((!rest.is_empty()).then(|| rest.to_string())),
                ))
            }
            "if" => {
                let mut branches = vec![(pipe(rest)?, Vec::new())];
                let mut otherwise = Vec::new();
                loop {
                    let (body, stop) = parse_list(pieces)?;
                    if let Some(b) = branches.last_mut() {
                        b.1 = body;
                    }
                    match stop {
                        Stop::End => break,
                        Stop::Else(Some(e)) => match e.strip_prefix("if ") {
                            Some(cond) => branches.push((pipe(cond.trim())?, Vec::new())),
                            None => return err(format!("unexpected else {e}")),
                        },
                        Stop::Else(None) => {
                            let (body, stop) = parse_list(pieces)?;
                            if !matches!(stop, Stop::End) {
                                return err("if: missing end");
                            }
                            otherwise = body;
                            break;
                        }
                        Stop::Eof => return err("if: missing end"),
                    }
                }
                nodes.push(Node::If(branches, otherwise));
            }
            "range" | "with" => {
                let p = pipe(rest)?;
                let (body, stop) = parse_list(pieces)?;
                let otherwise = match stop {
                    Stop::End => Vec::new(),
                    Stop::Else(None) => {
                        let (b, s) = parse_list(pieces)?;
                        if !matches!(s, Stop::End) {
                            return err(format!("{word}: missing end"));
                        }
                        b
                    }
                    _ => return err(format!("{word}: missing end")),
                };
                nodes.push(if word == "range" {
                    Node::Range(p, body, otherwise)
                } else {
                    Node::With(p, body, otherwise)
                });
            }
            "define" | "template" | "block" | "break" | "continue" => {
                return err(format!("{word} is not supported"))
            }
            _ => nodes.push(Node::Action(pipe(&a)?)),
        }
    }
    Ok((nodes, Stop::Eof))
}

impl Template {
    /// Parses `src`.
    pub fn parse(src: &str) -> Result<Template, TemplateError> {
        let mut pieces = split(src)?.into_iter();
        let (nodes, stop) = parse_list(&mut pieces)?;
        match stop {
            Stop::Eof => Ok(Template { nodes }),
            Stop::End => err("unexpected {{end}}"),
            Stop::Else(_) => err("unexpected {{else}}"),
        }
    }

    /// Runs the template with `data` as dot.
    pub fn render(&self, data: &Value) -> Result<String, TemplateError> {
        let mut out = String::new();
        let mut vars = vec![(String::new(), data.clone())];
        exec(&self.nodes, data, &mut vars, &mut out)?;
        Ok(out)
    }
}

// ---------------------------------------------------------- execution

/// The most a template may print (`{{range …}}{{printf "%0999999d" 0}}`
/// once took 2.8 GB): past it rendering stops with an error.
pub const MAX_OUTPUT: usize = 64 << 20;

/// The most items `{{range N}}` counts to.
const MAX_RANGE: u64 = 10_000_000;

/// The error once `out` has grown past [`MAX_OUTPUT`].
fn check_output(out: &str) -> Result<(), TemplateError> {
    if out.len() > MAX_OUTPUT {
        return err(format!(
            "the template's output is larger than {} MiB",
            MAX_OUTPUT >> 20
        ));
    }
    Ok(())
}

/// A missing map key: prints `<no value>`, is false.
fn missing() -> Value {
    Value::String("\u{0}<no value>".into())
}

fn is_missing(v: &Value) -> bool {
    matches!(v, Value::String(s) if s == "\u{0}<no value>")
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty() && !is_missing(v),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Go's `%v` of a value.
pub fn print(v: &Value) -> String {
    match v {
        Value::Null => "<nil>".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        Value::String(s) if is_missing(v) => s[1..].to_string(),
        Value::String(s) => s.clone(),
        Value::Array(a) => format!("[{}]", a.iter().map(print).collect::<Vec<_>>().join(" ")),
        Value::Object(o) => format!(
            "map[{}]",
            o.iter()
                .map(|(k, v)| format!("{k}:{}", print(v)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    }
}

fn walk(mut v: Value, path: &[String]) -> Result<Value, TemplateError> {
    for p in path {
        v = match v {
            Value::Object(mut o) => o.remove(p).unwrap_or_else(missing),
            Value::Null => Value::Null,
            _ if is_missing(&v) => missing(),
            other => {
                return err(format!(
                    "can't evaluate field {p} in {}",
                    match other {
                        Value::Array(_) => "a list",
                        Value::String(_) => "a string",
                        Value::Number(_) => "a number",
                        _ => "a value",
                    }
                ))
            }
        };
    }
    Ok(v)
}

fn exec(
    nodes: &[Node],
    dot: &Value,
    vars: &mut Vec<(String, Value)>,
    out: &mut String,
) -> Result<(), TemplateError> {
    for n in nodes {
        match n {
            Node::Text(t) => {
                out.push_str(t);
                check_output(out)?;
            }
            Node::Action(p) => {
                let v = eval_pipeline(p, dot, vars)?;
                if p.decl.is_empty() {
                    out.push_str(&print(&v));
                    check_output(out)?;
                }
            }
            Node::If(branches, otherwise) => {
                let depth = vars.len();
                let mut done = false;
                for (cond, body) in branches {
                    if truthy(&eval_pipeline(cond, dot, vars)?) {
                        exec(body, dot, vars, out)?;
                        done = true;
                        break;
                    }
                }
                if !done {
                    exec(otherwise, dot, vars, out)?;
                }
                vars.truncate(depth);
            }
            Node::With(p, body, otherwise) => {
                let depth = vars.len();
                let v = eval_pipeline(p, dot, vars)?;
                if truthy(&v) {
                    exec(body, &v, vars, out)?;
                } else {
                    exec(otherwise, dot, vars, out)?;
                }
                vars.truncate(depth);
            }
            Node::Range(p, body, otherwise) => {
                let depth = vars.len();
                let decl = p.decl.clone();
                let bare = Pipeline {
                    decl: Vec::new(),
                    cmds: p.cmds.clone(),
                };
                let v = eval_pipeline(&bare, dot, vars)?;
                let items: Vec<(Value, Value)> = match v {
                    Value::Array(a) => a
                        .into_iter()
                        .enumerate()
                        .map(|(i, x)| (Value::from(i), x))
                        .collect(),
                    Value::Object(o) => o.into_iter().map(|(k, x)| (Value::String(k), x)).collect(),
                    Value::Null => Vec::new(),
                    Value::Number(n) if n.as_u64().is_some_and(|n| n > MAX_RANGE) => {
                        return err(format!("range {n}: more than {MAX_RANGE} items"))
                    }
                    Value::Number(n) => (0..n.as_u64().unwrap_or(0))
                        .map(|i| (Value::from(i), Value::from(i)))
                        .collect(),
                    v if is_missing(&v) => Vec::new(),
                    _ => return err("range can't iterate over a string or bool"),
                };
                if items.is_empty() {
                    exec(otherwise, dot, vars, out)?;
                }
                for (k, x) in items {
                    let inner = vars.len();
                    match decl.as_slice() {
                        [v] => vars.push((v.clone(), x.clone())),
                        [i, v] => {
                            vars.push((i.clone(), k));
                            vars.push((v.clone(), x.clone()));
                        }
                        _ => {}
                    }
                    exec(body, &x, vars, out)?;
                    vars.truncate(inner);
                }
                vars.truncate(depth);
            }
        }
    }
    Ok(())
}

fn eval_pipeline(
    p: &Pipeline,
    dot: &Value,
    vars: &mut Vec<(String, Value)>,
) -> Result<Value, TemplateError> {
    let mut prev: Option<Value> = None;
    for cmd in &p.cmds {
        prev = Some(eval_cmd(cmd, dot, vars, prev)?);
    }
    let v = prev.unwrap_or(Value::Null);
    for name in &p.decl {
        match vars.iter_mut().rev().find(|(n, _)| n == name) {
            Some(slot) if p.decl.len() == 1 => slot.1 = v.clone(),
            _ => vars.push((name.clone(), v.clone())),
        }
    }
    Ok(v)
}

fn eval_arg(a: &Arg, dot: &Value, vars: &mut Vec<(String, Value)>) -> Result<Value, TemplateError> {
    match a {
        Arg::Field(path) => walk(dot.clone(), path),
        Arg::Var(name, path) => {
            let v = vars
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| TemplateError(format!("undefined variable ${name}")))?;
            walk(v, path)
        }
        Arg::Lit(v) => Ok(v.clone()),
        Arg::Ident(f) => call(f, Vec::new()),
        Arg::Sub(p, path) => walk(eval_pipeline(p, dot, vars)?, path),
    }
}

fn eval_cmd(
    cmd: &[Arg],
    dot: &Value,
    vars: &mut Vec<(String, Value)>,
    prev: Option<Value>,
) -> Result<Value, TemplateError> {
    match cmd {
        [Arg::Ident(f), rest @ ..] => {
            let mut args = rest
                .iter()
                .map(|a| eval_arg(a, dot, vars))
                .collect::<Result<Vec<_>, _>>()?;
            args.extend(prev);
            call(f, args)
        }
        [one] if prev.is_none() => eval_arg(one, dot, vars),
        _ => err("can't give an argument to a non-function"),
    }
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

fn compare(a: &Value, b: &Value) -> Result<std::cmp::Ordering, TemplateError> {
    match (num(a), num(b), a, b) {
        (Some(x), Some(y), _, _) => Ok(x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal)),
        (_, _, Value::String(x), Value::String(y)) => Ok(x.cmp(y)),
        _ => err("incompatible types for comparison"),
    }
}

/// Go's `printf` for the verbs scripts use: `%s %v %d %q %f %x %%`, with
/// `-` and a width.
fn sprintf(fmt: &str, args: &[Value]) -> String {
    let mut out = String::new();
    let mut args = args.iter();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut left = false;
        let mut width = String::new();
        while let Some(&d) = chars.peek() {
            if d == '-' {
                left = true;
            } else if d.is_ascii_digit() || d == '.' {
                width.push(d);
            } else {
                break;
            }
            chars.next();
        }
        let Some(verb) = chars.next() else {
            out.push_str("%!(NOVERB)");
            break;
        };
        if verb == '%' {
            out.push('%');
            continue;
        }
        let Some(a) = args.next() else {
            out.push_str(&format!("%!{verb}(MISSING)"));
            continue;
        };
        let s = match verb {
            'q' => serde_json::to_string(&print(a)).unwrap_or_default(),
            'd' => num(a).map_or_else(|| format!("%!d({})", print(a)), |f| (f as i64).to_string()),
            'x' => num(a).map_or_else(
                || print(a).bytes().map(|b| format!("{b:02x}")).collect(),
                |f| format!("{:x}", f as i64),
            ),
            'f' => {
                let prec = width
                    .split_once('.')
                    .and_then(|(_, p)| p.parse().ok())
                    .unwrap_or(6);
                num(a).map_or_else(|| format!("%!f({})", print(a)), |f| format!("{f:.prec$}"))
            }
            _ => print(a),
        };
        let w: usize = width
            .split('.')
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or(0);
        // A width past the output bound is clipped to just past it: the
        // output check then stops the template, with no huge allocation.
        let pad = w.min(MAX_OUTPUT + 1).saturating_sub(s.chars().count());
        if left {
            out.push_str(&s);
            out.push_str(&" ".repeat(pad));
        } else {
            out.push_str(&" ".repeat(pad));
            out.push_str(&s);
        }
    }
    for extra in args {
        out.push_str(&format!("%!(EXTRA {})", print(extra)));
    }
    out
}

fn want(f: &str, args: &[Value], n: usize) -> Result<(), TemplateError> {
    if args.len() != n {
        return err(format!(
            "wrong number of args for {f}: want {n} got {}",
            args.len()
        ));
    }
    Ok(())
}

fn string(v: &Value) -> String {
    print(v)
}

fn call(f: &str, args: Vec<Value>) -> Result<Value, TemplateError> {
    Ok(match f {
        "json" => {
            want(f, &args, 1)?;
            let v = if is_missing(&args[0]) {
                Value::Null
            } else {
                args[0].clone()
            };
            Value::String(serde_json::to_string(&v).map_err(|e| TemplateError(e.to_string()))?)
        }
        "join" => {
            want(f, &args, 2)?;
            let sep = string(&args[1]);
            match &args[0] {
                Value::Array(a) => {
                    Value::String(a.iter().map(print).collect::<Vec<_>>().join(&sep))
                }
                Value::Null => Value::String(String::new()),
                v => Value::String(print(v)),
            }
        }
        "split" => {
            want(f, &args, 2)?;
            let (s, sep) = (string(&args[0]), string(&args[1]));
            Value::Array(
                s.split(sep.as_str())
                    .map(|p| Value::String(p.into()))
                    .collect(),
            )
        }
        "upper" => Value::String(string(args.first().unwrap_or(&Value::Null)).to_uppercase()),
        "lower" => Value::String(string(args.first().unwrap_or(&Value::Null)).to_lowercase()),
        "title" => {
            let s = string(args.first().unwrap_or(&Value::Null));
            let mut out = String::new();
            let mut start = true;
            for c in s.chars() {
                if start {
                    out.extend(c.to_uppercase());
                } else {
                    out.push(c);
                }
                start = c.is_whitespace();
            }
            Value::String(out)
        }
        "truncate" => {
            want(f, &args, 2)?;
            let n = num(&args[1]).unwrap_or(0.0) as usize;
            Value::String(string(&args[0]).chars().take(n).collect())
        }
        "pad" => {
            want(f, &args, 3)?;
            let (l, r) = (
                (num(&args[1]).unwrap_or(0.0) as usize).min(MAX_OUTPUT + 1),
                (num(&args[2]).unwrap_or(0.0) as usize).min(MAX_OUTPUT + 1),
            );
            Value::String(format!(
                "{}{}{}",
                " ".repeat(l),
                string(&args[0]),
                " ".repeat(r)
            ))
        }
        "len" => {
            want(f, &args, 1)?;
            Value::from(match &args[0] {
                Value::Array(a) => a.len(),
                Value::Object(o) => o.len(),
                Value::String(s) if !is_missing(&args[0]) => s.len(),
                Value::Null => 0,
                _ => return err("len of a value without length"),
            })
        }
        "index" => {
            let Some((first, keys)) = args.split_first() else {
                return err("index needs a value");
            };
            let mut v = first.clone();
            for k in keys {
                v = match (&v, k) {
                    (Value::Array(a), k) => {
                        let i = num(k)
                            .ok_or_else(|| TemplateError("index of a list is a number".into()))?;
                        a.get(i as usize)
                            .cloned()
                            .ok_or_else(|| TemplateError(format!("index out of range: {i}")))?
                    }
                    (Value::Object(o), k) => o.get(&string(k)).cloned().unwrap_or_else(missing),
                    (Value::Null, _) => Value::Null,
                    _ => return err("can't index this value"),
                };
            }
            v
        }
        "slice" => {
            let Some((first, idx)) = args.split_first() else {
                return err("slice needs a value");
            };
            let n = |i: usize, d: usize| idx.get(i).and_then(num).map_or(d, |f| f as usize);
            match first {
                Value::Array(a) => {
                    let (lo, hi) = (n(0, 0), n(1, a.len()));
                    Value::Array(
                        a.get(lo..hi)
                            .ok_or_else(|| TemplateError("slice out of range".into()))?
                            .to_vec(),
                    )
                }
                v => {
                    let s = string(v);
                    let (lo, hi) = (n(0, 0), n(1, s.len()));
                    Value::String(
                        s.get(lo..hi)
                            .ok_or_else(|| TemplateError("slice out of range".into()))?
                            .into(),
                    )
                }
            }
        }
        "print" => Value::String(args.iter().map(print).collect::<Vec<_>>().join("")),
        "println" => Value::String(args.iter().map(print).collect::<Vec<_>>().join(" ") + "\n"),
        "printf" => {
            let Some((fmt, rest)) = args.split_first() else {
                return err("printf needs a format");
            };
            Value::String(sprintf(&string(fmt), rest))
        }
        "not" => {
            want(f, &args, 1)?;
            Value::Bool(!truthy(&args[0]))
        }
        "and" => args
            .iter()
            .find(|v| !truthy(v))
            .or(args.last())
            .cloned()
            .unwrap_or(Value::Null),
        "or" => args
            .iter()
            .find(|v| truthy(v))
            .or(args.last())
            .cloned()
            .unwrap_or(Value::Null),
        "eq" => {
            let Some((a, rest)) = args.split_first() else {
                return err("eq needs arguments");
            };
            Value::Bool(rest.iter().any(|b| match (num(a), num(b)) {
                (Some(x), Some(y)) => x == y,
                _ => a == b,
            }))
        }
        "ne" | "lt" | "le" | "gt" | "ge" => {
            want(f, &args, 2)?;
            if f == "ne" {
                return Ok(Value::Bool(match (num(&args[0]), num(&args[1])) {
                    (Some(x), Some(y)) => x != y,
                    _ => args[0] != args[1],
                }));
            }
            let o = compare(&args[0], &args[1])?;
            use std::cmp::Ordering::*;
            Value::Bool(match f {
                "lt" => o == Less,
                "le" => o != Greater,
                "gt" => o == Greater,
                _ => o != Less,
            })
        }
        _ => return err(format!("function {f:?} not defined")),
    })
}

// -------------------------------------------------------------- tables

/// docker's `--format` handling for list commands: `table TEMPLATE` (a
/// header row from `headers`, columns aligned as docker's tabwriter
/// does), a plain template (one line per item), with `\t` and `\n`
/// written literally in the flag turned into tab and newline first.
pub fn render_rows(
    format: &str,
    items: &[Value],
    headers: &Value,
) -> Result<String, TemplateError> {
    let (table, body) = match format.strip_prefix("table") {
        Some(rest) => (true, rest),
        None => (false, format),
    };
    let body = body
        .trim_matches(' ')
        .replace("\\t", "\t")
        .replace("\\n", "\n");
    let t = Template::parse(&body)?;
    let mut lines = Vec::new();
    if table {
        lines.push(t.render(headers)?);
    }
    for it in items {
        lines.push(t.render(it)?);
    }
    if !table {
        return Ok(lines.iter().map(|l| format!("{l}\n")).collect());
    }
    Ok(tabwrite(&lines))
}

/// Aligns tab-separated cells: each column as wide as its widest cell
/// plus 3 spaces, at least 10 (docker's tabwriter settings); the last
/// cell of a line is not padded.
pub fn tabwrite(lines: &[String]) -> String {
    let rows: Vec<Vec<&str>> = lines.iter().map(|l| l.split('\t').collect()).collect();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter(|r| c + 1 < r.len())
                .map(|r| r[c].chars().count() + 3)
                .max()
                .unwrap_or(0)
                .max(10)
        })
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_template_that_prints_without_end_stops_at_the_output_bound() {
        let t = super::Template::parse(
            r#"{{range split (printf "%0999999d" 0) ""}}{{printf "%0999999d" 0}}{{end}}"#,
        )
        .expect("parse");
        let e = t
            .render(&serde_json::json!({}))
            .expect_err("unbounded output");
        assert!(e.0.contains("larger than 64 MiB"), "{e}");
        let t = super::Template::parse(r#"{{printf "%099999999999d" 0}}"#).expect("parse");
        assert!(t.render(&serde_json::json!({})).is_err());
    }

    use super::*;

    fn r(t: &str, v: &Value) -> String {
        Template::parse(t)
            .and_then(|t| t.render(v))
            .unwrap_or_else(|e| format!("ERR {e}"))
    }

    #[test]
    fn docker_inspect_formats() {
        let v = serde_json::json!({
            "Id": "sha256:abc", "RepoTags": ["a:1", "b:2"], "Size": 1234,
            "Config": {"Env": ["A=1", "B=2"], "Cmd": null, "Labels": {"x": "y", "k": "v"}},
        });
        assert_eq!(r("{{.Id}}", &v), "sha256:abc");
        assert_eq!(r("{{.Config.Env}}", &v), "[A=1 B=2]");
        assert_eq!(r("{{json .Config.Env}}", &v), r#"["A=1","B=2"]"#);
        assert_eq!(r("{{index .RepoTags 0}}", &v), "a:1");
        assert_eq!(r("{{range .RepoTags}}{{.}} {{end}}", &v), "a:1 b:2 ");
        assert_eq!(
            r("{{range $i, $t := .RepoTags}}{{$i}}={{$t}};{{end}}", &v),
            "0=a:1;1=b:2;"
        );
        assert_eq!(
            r(
                "{{range $k, $v := .Config.Labels}}{{$k}}={{$v}} {{end}}",
                &v
            ),
            "k=v x=y "
        );
        assert_eq!(r("{{index .Config.Labels \"x\"}}", &v), "y");
        assert_eq!(r("{{.Config.Labels.x}}", &v), "y");
        assert_eq!(r("{{.Config.Labels}}", &v), "map[k:v x:y]");
        assert_eq!(r("{{.Missing}}", &v), "<no value>");
        assert_eq!(r("{{.Config.Cmd}}", &v), "<nil>");
        assert_eq!(r("{{join .RepoTags \",\"}}", &v), "a:1,b:2");
        assert_eq!(
            r("{{printf \"%s-%d|%-5s|\" .Id .Size \"x\"}}", &v),
            "sha256:abc-1234|x    |"
        );
        assert_eq!(r("{{len .RepoTags}}", &v), "2");
        assert_eq!(
            r(
                "{{if .Config.Cmd}}cmd{{else if .RepoTags}}tags{{else}}none{{end}}",
                &v
            ),
            "tags"
        );
        assert_eq!(r("{{with .Config}}{{.Env}}{{end}}", &v), "[A=1 B=2]");
        assert_eq!(r("{{.Size | printf \"%d bytes\"}}", &v), "1234 bytes");
        assert_eq!(r("{{upper (index .RepoTags 1)}}", &v), "B:2");
        assert_eq!(r("{{ $t := index .RepoTags 0 }}{{ $t }}", &v), "a:1");
        assert_eq!(r("a {{- /* c */ -}} b", &v), "ab");
        assert_eq!(r("{{$.Id}}", &v), "sha256:abc");
        assert_eq!(r("{{if eq .Size 1234}}yes{{end}}", &v), "yes");
        assert_eq!(
            r("{{json .}}", &serde_json::json!({"a": [1, 2]})),
            r#"{"a":[1,2]}"#
        );
    }

    #[test]
    fn bad_templates_say_why() {
        for t in [
            "{{.Id",
            "{{if .X}}",
            "{{end}}",
            "{{nosuch .X}}",
            "{{template \"x\"}}",
        ] {
            assert!(
                Template::parse(t)
                    .and_then(|t| t.render(&Value::Null))
                    .is_err(),
                "{t}"
            );
        }
    }

    #[test]
    fn tables_have_docker_headers_and_alignment() {
        let items = vec![
            serde_json::json!({"Repository": "busybox", "Tag": "latest"}),
            serde_json::json!({"Repository": "a-much-longer-name", "Tag": "1"}),
        ];
        let h = serde_json::json!({"Repository": "REPOSITORY", "Tag": "TAG"});
        let out = render_rows("table {{.Repository}}\\t{{.Tag}}", &items, &h).unwrap();
        assert_eq!(
            out,
            "REPOSITORY           TAG\nbusybox              latest\na-much-longer-name   1\n"
        );
        let out = render_rows("{{.Repository}}:{{.Tag}}", &items, &h).unwrap();
        assert_eq!(out, "busybox:latest\na-much-longer-name:1\n");
    }
}
