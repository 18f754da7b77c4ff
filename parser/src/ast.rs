//! The lossless syntax tree: one [`Node`] per instruction, as BuildKit's
//! `parser.Node` holds it, with source lines, flags, heredocs and comments.

use serde::Serialize;

/// A parsed Dockerfile: directives, the instructions in order, and warnings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ast {
    /// Parser directives found at the top of the file (`# syntax=`, …).
    pub directives: Vec<Directive>,
    /// The escape character in force (`\` or `` ` ``).
    pub escape: char,
    /// The instructions, in source order.
    pub children: Vec<Node>,
    /// Non-fatal findings, such as empty continuation lines.
    pub warnings: Vec<Warning>,
}

/// A parser directive such as `# escape=\``.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Directive {
    /// Lower-cased directive name (`syntax`, `escape` or `check`).
    pub name: String,
    /// The value as written (trimmed).
    pub value: String,
    /// 1-based line of the directive.
    pub line: usize,
}

/// A non-fatal parse finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// One-line description, worded as BuildKit's.
    pub short: String,
    /// 1-based line the warning refers to.
    pub line: usize,
}

/// One argument of an instruction: a plain value, or (for ONBUILD) a nested
/// instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Arg {
    /// A literal word or text, neither unquoted nor expanded.
    Value(String),
    /// The trigger instruction of an ONBUILD.
    Nested(Box<Node>),
}

impl Arg {
    /// The literal text of a [`Arg::Value`], `None` for a nested instruction.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Arg::Value(v) => Some(v),
            Arg::Nested(_) => None,
        }
    }
}

/// A heredoc attached to an instruction (`RUN <<EOF … EOF`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heredoc {
    /// The terminator word, quotes removed.
    pub name: String,
    /// File descriptor written before `<<` (`3<<EOF`), 0 when absent.
    pub fd: u32,
    /// False when any part of the terminator word was quoted: the body is
    /// then not variable-expanded.
    pub expand: bool,
    /// True for `<<-`: leading tabs are stripped from the body when used.
    pub chomp: bool,
    /// The raw body, line endings included, before any chomping.
    pub content: String,
}

impl Heredoc {
    /// The body with leading tabs removed from every line when `chomp` is set.
    pub fn chomped_content(&self) -> String {
        if !self.chomp {
            return self.content.clone();
        }
        chomp_leading_tabs(&self.content)
    }
}

/// Removes leading tabs from every line of `text` (`<<-` heredocs).
pub fn chomp_leading_tabs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        out.push_str(line.trim_start_matches('\t'));
    }
    out
}

/// One instruction of the Dockerfile, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// The instruction keyword with its original case (`RUN`, `copy`, …).
    pub keyword: String,
    /// Leading `--flag[=value]` words, quotes removed.
    pub flags: Vec<String>,
    /// The argument chain (see the module docs of BuildKit's line parsers).
    pub args: Vec<Arg>,
    /// True when the arguments came from a JSON (exec-form) array.
    pub json: bool,
    /// The whole logical line, continuations joined.
    pub original: String,
    /// Heredocs whose bodies followed this instruction.
    pub heredocs: Vec<Heredoc>,
    /// 1-based first source line.
    pub start_line: usize,
    /// 1-based last source line (heredoc bodies included).
    pub end_line: usize,
    /// Comment lines directly above the instruction (without `#`).
    pub comments: Vec<String>,
}

impl Node {
    /// The plain argument strings, nested instructions flattened the way
    /// BuildKit's `nodeArgs` does (keyword followed by its arguments).
    pub fn arg_strings(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.args.len());
        for arg in &self.args {
            match arg {
                Arg::Value(v) => out.push(v.clone()),
                Arg::Nested(inner) => {
                    out.push(inner.keyword.clone());
                    out.extend(inner.arg_strings());
                }
            }
        }
        out
    }

    /// BuildKit's `Node.Dump()` of this instruction (without parentheses).
    pub fn dump(&self) -> String {
        let mut s = self.keyword.to_lowercase();
        if !self.flags.is_empty() {
            s.push(' ');
            s.push_str(&go_quote_list(&self.flags));
        }
        for arg in &self.args {
            s.push(' ');
            match arg {
                Arg::Value(v) => s.push_str(&go_quote(v)),
                Arg::Nested(inner) => {
                    s.push('(');
                    s.push_str(&inner.dump());
                    s.push(')');
                }
            }
        }
        go_trim_space(&s).to_string()
    }
}

impl Ast {
    /// BuildKit's `AST.Dump()`: one `(instruction …)` per line, without the
    /// final newline that the golden `result` files add.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for child in &self.children {
            s.push('(');
            s.push_str(&child.dump());
            s.push_str(")\n");
        }
        go_trim_space(&s).to_string()
    }

    /// The first and last source line covered by instructions.
    pub fn line_range(&self) -> Option<(usize, usize)> {
        let first = self.children.first()?;
        let last = self.children.last()?;
        Some((first.start_line, last.end_line))
    }

    /// The value of a parser directive, if present.
    pub fn directive(&self, name: &str) -> Option<&str> {
        self.directives
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.value.as_str())
    }
}

/// Go's `strings.TrimSpace`: Unicode White_Space removed from both ends.
fn go_trim_space(s: &str) -> &str {
    s.trim_matches(char::is_whitespace)
}

/// Go's `fmt.Sprintf("%q", []string)`.
pub fn go_quote_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| go_quote(i)).collect();
    format!("[{}]", quoted.join(" "))
}

/// Go's `strconv.Quote` for a valid UTF-8 string.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{0B}' => out.push_str("\\v"),
            c if go_is_print(c) => out.push(c),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// An approximation of Go's `unicode.IsPrint`: letters, marks, numbers,
/// punctuation, symbols and the ASCII space. Rust's standard library has no
/// general-category tables, so non-ASCII code points are judged by the
/// ranges that Go treats as unprintable (controls, separators other than
/// space, surrogates, private use, format characters and non-characters).
fn go_is_print(c: char) -> bool {
    let u = c as u32;
    if u < 0x80 {
        return (0x20..0x7f).contains(&u);
    }
    if c.is_control() {
        return false;
    }
    // Separators (Zs, Zl, Zp) other than ASCII space are not printable.
    if c.is_whitespace() || matches!(u, 0x2028 | 0x2029) {
        return false;
    }
    // Common format characters (Cf).
    if matches!(
        u,
        0xAD | 0x600..=0x605
            | 0x61C
            | 0x6DD
            | 0x70F
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    ) {
        return false;
    }
    // Private use and non-characters.
    if matches!(u, 0xE000..=0xF8FF | 0xF0000..=0x10FFFF | 0xFDD0..=0xFDEF) || (u & 0xFFFE) == 0xFFFE
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_matches_go() {
        assert_eq!(go_quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(go_quote("\u{0}"), r#""\x00""#);
        assert_eq!(go_quote("♥ ☃"), "\"♥ ☃\"");
        assert_eq!(go_quote("\t\n"), r#""\t\n""#);
        assert_eq!(go_quote("\u{7f}"), r#""\x7f""#);
        assert_eq!(go_quote("\u{a0}"), r#""\u00a0""#);
    }

    #[test]
    fn chomp_strips_tabs_per_line() {
        assert_eq!(chomp_leading_tabs("\t\ta\n\tb\n c\n"), "a\nb\n c\n");
    }
}
