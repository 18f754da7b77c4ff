//! Shell-word expansion with BuildKit's `shell.Lex` semantics.
//!
//! Dockerfile instructions expand `$VAR` references, remove quotes and
//! process escapes the way BuildKit's `frontend/dockerfile/shell` package
//! does. [`Lex`] is that expander: it is configured with the escape
//! character of the Dockerfile (`\` by default, or `` ` `` from an
//! `# escape=` directive) and BuildKit's four options, and it works on one
//! word at a time against an [`Env`] lookup.
//!
//! Supported forms: `$V`, `${V}`, `${V:-x}`, `${V-x}`, `${V:+x}`, `${V+x}`,
//! `${V:?msg}`, `${V?msg}`, `${V#p}`, `${V##p}`, `${V%p}`, `${V%%p}`,
//! `${V/p/r}` and `${V//p/r}`; single and double quotes; the escape
//! character. Positional (`$1`) and special (`$@`, `$#`, …) parameters parse
//! but are looked up like any name, so they are normally unset.
//!
//! Patterns (`#`, `%`, `/`) are shell wildcards as BuildKit reads them: `*`
//! is any run of characters, `?` any one character, `\*`, `\?` and `\\` are
//! literal, `\}` and `\/` stand for `}` and `/`; every other character,
//! including `[` and `]`, is literal (BuildKit has no bracket expressions).
//! Like BuildKit's regular expressions, wildcards never match a newline.
//!
//! ```
//! use std::collections::HashMap;
//! use kiln_parser::shell::Lex;
//!
//! let env = HashMap::from([("V".to_string(), "1.2.3".to_string())]);
//! let lex = Lex::new('\\');
//! assert_eq!(lex.process_word("v${V%.*}-${X:-none}", &env).unwrap(), "v1.2-none");
//! assert_eq!(lex.process_words("a \"b c\" $V", &env).unwrap(), ["a", "b c", "1.2.3"]);
//! ```
//!
//! # Differences from BuildKit
//!
//! The expander follows `lex.go` at BuildKit commit `73ed6825` line by
//! line, with three deliberate exceptions, each a defect upstream:
//!
//! * **Word splitting keeps text before `${V<op>…}`.** Upstream shares one
//!   word buffer between nesting levels, so `ProcessWords("a${X:-b}c")`
//!   returns `["bc"]`, dropping `a`. Here each level has its own buffer
//!   (the behaviour before BuildKit v0.15): `["abc"]`.
//! * **`skip_unset_env` keeps `//`.** Upstream writes an unset
//!   `${V//p/r}` back as `${V/p/r}`; here it is written back unchanged.
//! * **Nesting is bounded.** More than [`MAX_NESTING`] levels of `${…}` or
//!   quotes inside `${…}` are an error instead of unbounded recursion.
//! * **Length is bounded.** A word whose expansion grows past
//!   [`MAX_EXPANSION`] bytes (say, ARGs that double themselves) is an
//!   error, found while it grows, not after it has filled memory.
//!
//! Go's `unicode.IsLetter`/`IsDigit` decide what a variable name is; the
//! tables below reproduce them for Unicode 15.0 (Go 1.21 and later).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;

/// How deep `${…}` expansions and quotes inside them may nest before
/// expansion fails with [`ShellErrorKind::TooDeep`].
pub const MAX_NESTING: usize = 64;

/// The longest expansion of one word, in bytes (1 MiB; Linux refuses an
/// environment string over 128 KiB to `execve` anyway).
pub const MAX_EXPANSION: usize = 1 << 20;

fn check_len(s: &str) -> Result<(), ShellErrorKind> {
    if s.len() > MAX_EXPANSION {
        return Err(ShellErrorKind::TooLong);
    }
    Ok(())
}

/// A read-only view of environment variables for expansion.
///
/// `None` means the variable is unset; `Some(String::new())` means it is set
/// and empty — `${V-x}` and `${V:-x}` tell the two apart. Keys compare
/// exactly (case-sensitive), as on Linux.
pub trait Env {
    /// The value of `key`, or `None` when it is unset.
    fn get(&self, key: &str) -> Option<String>;
}

impl<T: Env + ?Sized> Env for &T {
    fn get(&self, key: &str) -> Option<String> {
        (**self).get(key)
    }
}

impl<S: BuildHasher> Env for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        BTreeMap::get(self, key).cloned()
    }
}

/// A list of pairs: when a key appears more than once, the last entry wins,
/// as in BuildKit's `EnvsFromSlice`.
impl Env for [(String, String)] {
    fn get(&self, key: &str) -> Option<String> {
        self.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

/// Same as the slice: the last entry for a key wins.
impl Env for Vec<(String, String)> {
    fn get(&self, key: &str) -> Option<String> {
        Env::get(self.as_slice(), key)
    }
}

/// An environment built from `KEY=VALUE` strings, BuildKit's
/// `EnvsFromSlice`.
///
/// Each entry is split at its first `=`; an entry without `=` (`KEY`) sets
/// `KEY` to the empty string. When a key is repeated, the last value wins.
/// [`EnvList::keys`] keeps every key in the order given, duplicates
/// included.
///
/// ```
/// use kiln_parser::shell::{Env, EnvList};
///
/// let env = EnvList::new(["A=1", "B", "A=2=3"]);
/// assert_eq!(env.get("A").as_deref(), Some("2=3"));
/// assert_eq!(env.get("B").as_deref(), Some(""));
/// assert_eq!(env.get("C"), None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvList {
    values: HashMap<String, String>,
    keys: Vec<String>,
}

impl EnvList {
    /// Builds the environment from `KEY=VALUE` entries.
    pub fn new<I, S>(entries: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        entries.into_iter().collect()
    }

    /// Every key in the order it was given, repeated keys included.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }
}

impl<S: AsRef<str>> FromIterator<S> for EnvList {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut list = EnvList::default();
        for entry in iter {
            let entry = entry.as_ref();
            let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
            list.keys.push(key.to_string());
            list.values.insert(key.to_string(), value.to_string());
        }
        list
    }
}

impl Env for EnvList {
    fn get(&self, key: &str) -> Option<String> {
        self.values.get(key).cloned()
    }
}

/// Why a word could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShellErrorKind {
    /// A `'` without its closing `'`.
    #[error("unexpected end of statement while looking for matching single-quote")]
    UnterminatedSingleQuote,
    /// A `"` without its closing `"`.
    #[error("unexpected end of statement while looking for matching double-quote")]
    UnterminatedDoubleQuote,
    /// A `${` without its closing `}`.
    #[error("syntax error: missing '}}'")]
    MissingBrace,
    /// A `${V/pattern` without the `/` that ends the pattern.
    #[error("syntax error: missing '/' in ${{}}")]
    MissingSlash,
    /// `${}`, `${{…}`, `${:…}` and the like.
    #[error("syntax error: bad substitution")]
    BadSubstitution,
    /// A modifier BuildKit does not support, such as `:=`, `:#` or `.`.
    #[error("unsupported modifier ({0}) in substitution")]
    UnsupportedModifier(String),
    /// `${V?msg}` with `V` unset, or `${V:?msg}` with `V` unset or empty.
    #[error("{name}: {message}")]
    Required {
        /// The variable that had to be set.
        name: String,
        /// The expanded `msg`, or BuildKit's default text when it was empty.
        message: String,
    },
    /// A `#`, `%` or `/` pattern with an escape other than `\*`, `\?`, `\\`,
    /// `\}` or `\/`.
    #[error("invalid pattern ({pattern}) in substitution: {reason}")]
    InvalidPattern {
        /// The pattern as it was after expansion.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `${…}` and quotes nested more than [`MAX_NESTING`] levels deep.
    #[error("expansions nested more than {MAX_NESTING} levels deep")]
    TooDeep,
    /// The expansion grew past [`MAX_EXPANSION`] bytes.
    #[error("the expanded value is larger than {} MiB", MAX_EXPANSION >> 20)]
    TooLong,
    /// `#`, `%` and `/` patterns matched against values took more than
    /// [`MAX_MATCH_STEPS`] steps on this thread since
    /// [`reset_match_budget`] (pattern length × value length each).
    #[error("pattern substitutions too costly: more than {MAX_MATCH_STEPS} matching steps (pattern length × value length)")]
    TooComplex,
}

/// The most work `${V#p}`, `${V%p}` and `${V/p/r}` may do on a thread
/// between two [`reset_match_budget`] calls (a build's frontend resets it):
/// both the pattern and the value can be a 1 MiB ARG, and a match costs
/// their product.
pub const MAX_MATCH_STEPS: u64 = 2_000_000_000;

thread_local! {
    static MATCH_STEPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Starts a new matching budget on this thread (see [`MAX_MATCH_STEPS`]).
pub fn reset_match_budget() {
    MATCH_STEPS.with(|c| c.set(0));
}

fn charge_match(steps: u64) -> Result<(), ShellErrorKind> {
    MATCH_STEPS.with(|c| {
        let n = c.get().saturating_add(steps);
        c.set(n);
        if n > MAX_MATCH_STEPS {
            Err(ShellErrorKind::TooComplex)
        } else {
            Ok(())
        }
    })
}

/// A word that could not be expanded, and why.
///
/// Displays like BuildKit's error: `failed to process "<word>": <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to process {word:?}: {kind}")]
pub struct ShellError {
    word: String,
    kind: ShellErrorKind,
}

impl ShellError {
    /// The word whose expansion failed, as it was given.
    pub fn word(&self) -> &str {
        &self.word
    }

    /// The reason.
    pub fn kind(&self) -> &ShellErrorKind {
        &self.kind
    }
}

/// Everything one expansion produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Processed {
    /// The word after expansion, quote removal and escape processing, not
    /// split (what [`Lex::process_word`] returns).
    pub result: String,
    /// The same input split into fields (what [`Lex::process_words`]
    /// returns).
    pub words: Vec<String>,
    /// Variables that were looked up and set (possibly empty).
    pub matched: BTreeSet<String>,
    /// Variables that were looked up and unset.
    pub unmatched: BTreeSet<String>,
}

/// The shell-word expander: an escape character and BuildKit's options.
///
/// A `Lex` holds no state between calls, so one value can be shared freely,
/// across threads too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lex {
    escape: char,
    raw_quotes: bool,
    raw_escapes: bool,
    skip_unset_env: bool,
    skip_process_quotes: bool,
}

impl Default for Lex {
    /// A lexer with the default escape character `\` and no options.
    fn default() -> Self {
        Lex::new('\\')
    }
}

impl Lex {
    /// A lexer with `escape` as escape character (`\`, or `` ` `` after
    /// `# escape=` in the Dockerfile) and every option off.
    pub fn new(escape: char) -> Self {
        Lex {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_unset_env: false,
            skip_process_quotes: false,
        }
    }

    /// The escape character.
    pub fn escape(&self) -> char {
        self.escape
    }

    /// BuildKit's `RawQuotes`: keep the quote characters in the output
    /// (their content is still processed as quoted).
    pub fn raw_quotes(mut self, on: bool) -> Self {
        self.raw_quotes = on;
        self
    }

    /// BuildKit's `RawEscapes`: keep escape characters in the output at the
    /// top level of the word (text inside `${V:-…}` still drops them).
    pub fn raw_escapes(mut self, on: bool) -> Self {
        self.raw_escapes = on;
        self
    }

    /// BuildKit's `SkipUnsetEnv`: leave references to unset variables in
    /// the output as written (`$V`, `${V}`, `${V:-x}` …) instead of
    /// expanding them, and never fail on them.
    pub fn skip_unset_env(mut self, on: bool) -> Self {
        self.skip_unset_env = on;
        self
    }

    /// BuildKit's `SkipProcessQuotes`: treat `'` and `"` as ordinary
    /// characters.
    pub fn skip_process_quotes(mut self, on: bool) -> Self {
        self.skip_process_quotes = on;
        self
    }

    /// Expands `word` as one word: variables, quotes and escapes, with no
    /// splitting (BuildKit's `ProcessWord`).
    pub fn process_word(&self, word: &str, env: &dyn Env) -> Result<String, ShellError> {
        self.run(word, env, false).map(|p| p.result)
    }

    /// Expands `word` and splits it into fields at unquoted, unescaped
    /// whitespace, including whitespace that unquoted expansions produce
    /// (BuildKit's `ProcessWords`). Empty fields are dropped.
    pub fn process_words(&self, word: &str, env: &dyn Env) -> Result<Vec<String>, ShellError> {
        self.run(word, env, true).map(|p| p.words)
    }

    /// Expands `word` like [`Lex::process_word`] and also reports the split
    /// fields and which variables were found and which were not
    /// (BuildKit's `ProcessWordWithMatches`).
    pub fn process_word_with_matches(
        &self,
        word: &str,
        env: &dyn Env,
    ) -> Result<Processed, ShellError> {
        self.run(word, env, true)
    }

    fn run(&self, word: &str, env: &dyn Env, want_words: bool) -> Result<Processed, ShellError> {
        let mut chars: Vec<char> = word.chars().collect();
        // Go's text/scanner drops a byte-order mark at the very start.
        if chars.first() == Some(&BOM) {
            chars.remove(0);
        }
        let mut state = Expander {
            lex: self,
            env,
            chars,
            pos: 0,
            depth: 0,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        };
        let mut words = Words::default();
        let sink = if want_words { Some(&mut words) } else { None };
        match state.process_until(None, self.raw_escapes, sink) {
            Ok(result) => Ok(Processed {
                result,
                words: words.finish(),
                matched: state.matched,
                unmatched: state.unmatched,
            }),
            Err(kind) => Err(ShellError {
                word: word.to_string(),
                kind,
            }),
        }
    }
}

const BOM: char = '\u{FEFF}';

/// Field splitting of one nesting level (BuildKit's `wordsStruct`).
#[derive(Default)]
struct Words {
    buf: String,
    words: Vec<String>,
}

impl Words {
    /// A character that splits fields when it is whitespace.
    fn add_char(&mut self, c: char) {
        if c.is_whitespace() {
            self.flush();
        } else {
            self.buf.push(c);
        }
    }

    /// A character that never splits (escaped).
    fn add_raw_char(&mut self, c: char) {
        self.buf.push(c);
    }

    /// Text whose whitespace splits fields (unquoted expansions).
    fn add_str(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }

    /// Text that never splits (quoted strings).
    fn add_raw_str(&mut self, s: &str) {
        self.buf.push_str(s);
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.words.push(std::mem::take(&mut self.buf));
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.flush();
        self.words
    }
}

/// The state of one expansion: BuildKit's `shellWord`.
struct Expander<'a> {
    lex: &'a Lex,
    env: &'a dyn Env,
    chars: Vec<char>,
    pos: usize,
    depth: usize,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

impl Expander<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        let value = self.env.get(name);
        let set = if value.is_some() {
            &mut self.matched
        } else {
            &mut self.unmatched
        };
        if !set.contains(name) {
            set.insert(name.to_string());
        }
        value
    }

    /// Processes characters until `stop` (consumed) or the end of input
    /// (`stop == None`): BuildKit's `processStopOn`. Fields go to `words`
    /// when the caller wants them. Reaching the end while looking for
    /// `stop` reports [`ShellErrorKind::MissingBrace`]; callers that stop
    /// on something else re-map it.
    fn process_until(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
        words: Option<&mut Words>,
    ) -> Result<String, ShellErrorKind> {
        if self.depth >= MAX_NESTING {
            return Err(ShellErrorKind::TooDeep);
        }
        self.depth += 1;
        let result = self.process_until_inner(stop, raw_escapes, words);
        self.depth -= 1;
        result
    }

    fn process_until_inner(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
        mut words: Option<&mut Words>,
    ) -> Result<String, ShellErrorKind> {
        let mut result = String::new();
        let quotes = !self.lex.skip_process_quotes;
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.pos += 1;
                return Ok(result);
            }
            match c {
                '$' => {
                    let value = self.process_dollar()?;
                    check_len(&value)?;
                    if let Some(w) = words.as_deref_mut() {
                        w.add_str(&value);
                    }
                    result.push_str(&value);
                    check_len(&result)?;
                }
                '<' => {
                    let text = self.process_possible_heredoc();
                    if let Some(w) = words.as_deref_mut() {
                        w.add_raw_str(&text);
                    }
                    result.push_str(&text);
                }
                '\'' if quotes => {
                    let text = self.process_single_quote()?;
                    if let Some(w) = words.as_deref_mut() {
                        w.add_raw_str(&text);
                    }
                    result.push_str(&text);
                }
                '"' if quotes => {
                    let text = self.process_double_quote(raw_escapes)?;
                    if let Some(w) = words.as_deref_mut() {
                        w.add_raw_str(&text);
                    }
                    result.push_str(&text);
                }
                _ => {
                    self.pos += 1;
                    if c == self.lex.escape {
                        if raw_escapes {
                            if let Some(w) = words.as_deref_mut() {
                                w.add_raw_char(c);
                            }
                            result.push(c);
                        }
                        // The escape character escapes the next character;
                        // at the very end it is dropped.
                        let Some(escaped) = self.next() else { break };
                        if let Some(w) = words.as_deref_mut() {
                            w.add_raw_char(escaped);
                        }
                        result.push(escaped);
                    } else {
                        if let Some(w) = words.as_deref_mut() {
                            w.add_char(c);
                        }
                        result.push(c);
                    }
                }
            }
        }
        if stop.is_some() {
            return Err(ShellErrorKind::MissingBrace);
        }
        Ok(result)
    }

    /// `'…'`: everything up to the next `'` is literal.
    fn process_single_quote(&mut self) -> Result<String, ShellErrorKind> {
        let mut result = String::new();
        self.pos += 1;
        if self.lex.raw_quotes {
            result.push('\'');
        }
        loop {
            match self.next() {
                None => return Err(ShellErrorKind::UnterminatedSingleQuote),
                Some('\'') => {
                    if self.lex.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    /// `"…"`: `$` expands; the escape character escapes only `"`, `$` and
    /// itself and is kept before anything else.
    fn process_double_quote(&mut self, raw_escapes: bool) -> Result<String, ShellErrorKind> {
        let mut result = String::new();
        self.pos += 1;
        if self.lex.raw_quotes {
            result.push('"');
        }
        loop {
            match self.peek() {
                None => return Err(ShellErrorKind::UnterminatedDoubleQuote),
                Some('"') => {
                    self.pos += 1;
                    if self.lex.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let value = self.process_dollar()?;
                    result.push_str(&value);
                    check_len(&result)?;
                }
                Some(mut c) => {
                    self.pos += 1;
                    if c == self.lex.escape {
                        if raw_escapes {
                            result.push(c);
                        }
                        match self.peek() {
                            // The loop reports the missing quote.
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.lex.escape => {
                                self.pos += 1;
                                c = n;
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(c);
                }
            }
        }
    }

    /// `<<` followed by blanks stays together in one field, so that a
    /// heredoc marker such as `<< EOF` is seen as one word.
    fn process_possible_heredoc(&mut self) -> String {
        self.pos += 1;
        if self.peek() != Some('<') {
            return "<".to_string();
        }
        self.pos += 1;
        let mut text = "<<".to_string();
        while let Some(c @ ('\t' | '\r' | ' ')) = self.peek() {
            text.push(c);
            self.pos += 1;
        }
        text
    }

    /// A variable name after `$` or `${`: a run of digits (positional), one
    /// special-parameter character, or letters, digits and `_`.
    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && is_digit(c) {
                while let Some(d) = self.peek().filter(|&d| is_digit(d)) {
                    name.push(d);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && is_special_param(c) {
                self.pos += 1;
                return c.to_string();
            }
            if !is_letter(c) && !is_digit(c) && c != '_' {
                break;
            }
            name.push(c);
            self.pos += 1;
        }
        name
    }

    /// `$…` and `${…}`, starting at the `$`.
    fn process_dollar(&mut self) -> Result<String, ShellErrorKind> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(match self.get_env(&name) {
                Some(value) => value,
                None if self.lex.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }
        self.pos += 1;
        match self.peek() {
            None => return Err(ShellErrorKind::MissingBrace),
            Some('{' | '}' | ':') => return Err(ShellErrorKind::BadSubstitution),
            Some(_) => {}
        }
        let name = self.process_name();
        let Some(c) = self.next() else {
            return Err(ShellErrorKind::MissingBrace);
        };
        match c {
            '}' => Ok(match self.get_env(&name) {
                Some(value) => value,
                None if self.lex.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            ':' | '+' | '-' | '?' | '#' | '%' => self.process_modifier(name, c),
            '/' => self.process_replace(name),
            other => Err(ShellErrorKind::UnsupportedModifier(other.to_string())),
        }
    }

    /// `${name<op>word}` for the operators `-`, `+`, `?`, `#`, `%`, each
    /// optionally after `:`; `first` is the character after the name.
    fn process_modifier(&mut self, name: String, first: char) -> Result<String, ShellErrorKind> {
        let mut modifier = first.to_string();
        let null_is_unset = first == ':';
        let op = if null_is_unset {
            // Whatever follows `:` is taken as the operator, valid or not;
            // an invalid one fails after its word has been read.
            let op = self.next();
            modifier.push(op.unwrap_or(char::REPLACEMENT_CHARACTER));
            op
        } else {
            Some(first)
        };
        let pattern_op = matches!(op, Some('#' | '%'));
        if null_is_unset && pattern_op {
            return Err(ShellErrorKind::UnsupportedModifier(modifier));
        }
        let word = self
            .process_until(Some('}'), pattern_op, None)
            .map_err(|e| self.missing_if_at_end(e, ShellErrorKind::MissingBrace))?;

        let value = self.get_env(&name);
        if value.is_none() && self.lex.skip_unset_env {
            return Ok(format!("${{{name}{modifier}{word}}}"));
        }
        let empty = value.as_deref().is_none_or(str::is_empty);
        match op {
            Some('-') => Ok(match value {
                Some(v) if !(null_is_unset && v.is_empty()) => v,
                _ => word,
            }),
            Some('+') => Ok(if value.is_none() || (null_is_unset && empty) {
                String::new()
            } else {
                word
            }),
            Some('?') => match value {
                None => Err(required(name, word, "is not allowed to be unset")),
                Some(v) if null_is_unset && v.is_empty() => {
                    Err(required(name, word, "is not allowed to be empty"))
                }
                Some(v) => Ok(v),
            },
            Some(op @ ('#' | '%')) => {
                // `#`/`%` remove the shortest match, `##`/`%%` the longest.
                let (greedy, pattern) = match word.strip_prefix(op) {
                    Some(rest) => (true, rest),
                    None => (false, word.as_str()),
                };
                let value = value.unwrap_or_default();
                if op == '#' {
                    trim_prefix(pattern, &value, greedy)
                } else {
                    trim_suffix(pattern, &value, greedy)
                }
            }
            _ => Err(ShellErrorKind::UnsupportedModifier(modifier)),
        }
    }

    /// `${name/pattern/replacement}` and `${name//pattern/replacement}`,
    /// after the first `/`.
    fn process_replace(&mut self, name: String) -> Result<String, ShellErrorKind> {
        let replace_all = self.peek() == Some('/');
        if replace_all {
            self.pos += 1;
        }
        let pattern = self
            .process_until(Some('/'), true, None)
            .map_err(|e| self.missing_if_at_end(e, ShellErrorKind::MissingSlash))?;
        let replacement = self
            .process_until(Some('}'), true, None)
            .map_err(|e| self.missing_if_at_end(e, ShellErrorKind::MissingBrace))?;

        let value = match self.get_env(&name) {
            Some(value) => value,
            None if self.lex.skip_unset_env => {
                let slashes = if replace_all { "//" } else { "/" };
                return Ok(format!("${{{name}{slashes}{pattern}/{replacement}}}"));
            }
            // An unset variable is replaced in as empty: `${U/*/x}` is `x`.
            None => String::new(),
        };
        let glob = glob_for(&pattern, true)?;
        let value: Vec<char> = value.chars().collect();
        let ends = glob.match_ends(&value)?;
        if replace_all {
            replace_all_matches(&value, &ends, &replacement)
        } else {
            let found = ends
                .iter()
                .enumerate()
                .find_map(|(start, end)| end.map(|end| (start, end)));
            Ok(match found {
                Some((start, end)) => {
                    let mut out: String = value[..start].iter().collect();
                    out.push_str(&replacement);
                    out.extend(&value[end..]);
                    out
                }
                None => value.iter().collect(),
            })
        }
    }

    /// An error from a nested word becomes "missing `}`" (or `/`) when the
    /// input ran out, as in BuildKit.
    fn missing_if_at_end(&self, err: ShellErrorKind, missing: ShellErrorKind) -> ShellErrorKind {
        if self.at_end() && err != ShellErrorKind::TooDeep && err != ShellErrorKind::TooLong {
            missing
        } else {
            err
        }
    }
}

fn required(name: String, word: String, default: &str) -> ShellErrorKind {
    let message = if word.is_empty() {
        default.to_string()
    } else {
        word
    };
    ShellErrorKind::Required { name, message }
}

fn is_special_param(c: char) -> bool {
    matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0')
}

/// Go's `unicode.IsLetter`: general category L.
fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphabetic()
    } else {
        in_ranges(unicode_tables::LETTER, c)
    }
}

/// Go's `unicode.IsDigit`: general category Nd.
fn is_digit(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_digit()
    } else {
        in_ranges(unicode_tables::DIGIT, c)
    }
}

/// Whether `c` lies in one of the sorted inclusive ranges `[lo0, hi0, lo1,
/// hi1, …]`.
fn in_ranges(ranges: &[u32], c: char) -> bool {
    let c = u32::from(c);
    let (mut lo, mut hi) = (0, ranges.len() / 2);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let (first, last) = (ranges[2 * mid], ranges[2 * mid + 1]);
        if c < first {
            hi = mid;
        } else if c > last {
            lo = mid + 1;
        } else {
            return true;
        }
    }
    false
}

/// One element of a compiled shell pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// This character.
    Lit(char),
    /// `?`: any one character but a newline.
    Any,
    /// `*`: any run of characters without a newline.
    Star,
}

/// A shell pattern compiled for BuildKit's matching: equivalent to the
/// regular expression that `convertShellPatternToRegex` builds, matched
/// with leftmost-first (backtracking-order) semantics.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Glob {
    toks: Vec<Tok>,
    /// Stars prefer the longest run (`.*`) rather than the shortest (`.*?`).
    greedy: bool,
}

impl Glob {
    /// Compiles `pattern`, or explains why it is invalid.
    fn compile(pattern: &str, greedy: bool) -> Result<Glob, String> {
        let mut chars = pattern.chars().peekable();
        // Go's text/scanner drops a byte-order mark at the very start.
        chars.next_if_eq(&BOM);
        let mut toks = Vec::new();
        while let Some(c) = chars.next() {
            toks.push(match c {
                '*' => Tok::Star,
                '?' => Tok::Any,
                '\\' => {
                    // `\}` and `\/` had to be escaped inside `${…}`; the
                    // backslash is not part of the pattern.
                    if matches!(chars.peek(), Some('}' | '/')) {
                        continue;
                    }
                    match chars.next() {
                        Some(e @ ('*' | '?' | '\\')) => Tok::Lit(e),
                        Some(e) => return Err(format!("invalid escape '\\{e}'")),
                        None => return Err("invalid escape '\\' at end of pattern".to_string()),
                    }
                }
                c => Tok::Lit(c),
            });
        }
        Ok(Glob { toks, greedy })
    }

    /// For every start position `0..=s.len()`, the end of the match that a
    /// backtracking matcher would find there, if any.
    ///
    /// Dynamic programming over (token, position) from the back: the first
    /// successful path from a state does not depend on how it was reached,
    /// so `O(tokens × len)` time and `O(len)` space.
    fn match_ends(&self, s: &[char]) -> Result<Vec<Option<usize>>, ShellErrorKind> {
        let n = s.len();
        charge_match((self.toks.len() as u64).saturating_mul(n as u64 + 1))?;
        let mut next: Vec<Option<usize>> = (0..=n).map(Some).collect();
        let mut row: Vec<Option<usize>> = vec![None; n + 1];
        for tok in self.toks.iter().rev() {
            for p in (0..=n).rev() {
                let here = s.get(p).copied();
                // Wildcards stop at a newline, like `.` in a Go regexp.
                let wild = matches!(here, Some(h) if h != '\n');
                row[p] = match *tok {
                    Tok::Lit(c) if here == Some(c) => next[p + 1],
                    Tok::Any if wild => next[p + 1],
                    Tok::Lit(_) | Tok::Any => None,
                    Tok::Star => {
                        let longer = if wild { row[p + 1] } else { None };
                        if self.greedy {
                            longer.or(next[p])
                        } else {
                            next[p].or(longer)
                        }
                    }
                };
            }
            std::mem::swap(&mut next, &mut row);
        }
        Ok(next)
    }
}

fn glob_for(pattern: &str, greedy: bool) -> Result<Glob, ShellErrorKind> {
    Glob::compile(pattern, greedy).map_err(|reason| ShellErrorKind::InvalidPattern {
        pattern: pattern.to_string(),
        reason,
    })
}

/// `${V#pattern}` (shortest) and `${V##pattern}` (longest).
fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Result<String, ShellErrorKind> {
    let glob = glob_for(pattern, greedy)?;
    let value: Vec<char> = value.chars().collect();
    let end = glob.match_ends(&value)?[0].unwrap_or(0);
    Ok(value[end..].iter().collect())
}

/// `${V%pattern}` (shortest) and `${V%%pattern}` (longest): a prefix trim
/// of the reversed value with the reversed pattern, as BuildKit does it.
fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Result<String, ShellErrorKind> {
    let reversed_value: String = value.chars().rev().collect();
    let trimmed =
        trim_prefix(&reverse_pattern(pattern), &reversed_value, greedy).map_err(|e| match e {
            // Report the pattern as the user wrote it.
            ShellErrorKind::InvalidPattern { reason, .. } => ShellErrorKind::InvalidPattern {
                pattern: pattern.to_string(),
                reason,
            },
            other => other,
        })?;
    Ok(trimmed.chars().rev().collect())
}

/// Reverses a pattern but keeps each `\x` pair in order: `a\*c` -> `c\*a`.
fn reverse_pattern(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut pieces: Vec<&[char]> = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        let len = if chars[i] == '\\' && i + 1 < chars.len() {
            2
        } else {
            1
        };
        pieces.push(&chars[i..i + len]);
        i += len;
    }
    pieces.iter().rev().flat_map(|p| p.iter()).collect()
}

/// Go's `Regexp.ReplaceAllString` over precomputed match ends: repeated
/// leftmost matches, an empty match right after a match is skipped, and
/// the replacement is a Go template (`$0`/`${0}` is the match, `$$` a `$`).
fn replace_all_matches(
    value: &[char],
    ends: &[Option<usize>],
    template: &str,
) -> Result<String, ShellErrorKind> {
    let n = value.len();
    let mut out = String::new();
    let mut last_end = 0;
    let mut search = 0;
    while search <= n {
        let found = (search..=n).find_map(|start| ends[start].map(|end| (start, end)));
        let Some((start, end)) = found else { break };
        out.extend(&value[last_end..start]);
        if end > last_end || start == 0 {
            let matched: String = value[start..end].iter().collect();
            expand_template(&mut out, template, &matched);
            check_len(&out)?;
        }
        last_end = end;
        search = if end == search { search + 1 } else { end };
    }
    out.extend(&value[last_end..]);
    Ok(out)
}

/// Go's `Regexp.Expand` for a pattern without groups.
fn expand_template(out: &mut String, template: &str, matched: &str) {
    let mut rest = template;
    while let Some((before, after)) = rest.split_once('$') {
        out.push_str(before);
        rest = after;
        if let Some(after_dollar) = rest.strip_prefix('$') {
            out.push('$');
            rest = after_dollar;
            continue;
        }
        match extract_group_name(rest) {
            Some((name, after_name)) => {
                if name == "0" {
                    out.push_str(matched);
                }
                rest = after_name;
            }
            None => out.push('$'),
        }
    }
    out.push_str(rest);
}

/// Go's `regexp.extract`: a leading `name` or `{name}`, and what follows.
fn extract_group_name(s: &str) -> Option<(&str, &str)> {
    let (braced, body) = match s.strip_prefix('{') {
        Some(body) => (true, body),
        None => (false, s),
    };
    let len = body
        .char_indices()
        .find(|&(_, c)| !is_letter(c) && !is_digit(c) && c != '_')
        .map_or(body.len(), |(i, _)| i);
    if len == 0 {
        return None;
    }
    let (name, after) = body.split_at(len);
    if braced {
        after.strip_prefix('}').map(|after| (name, after))
    } else {
        Some((name, after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> EnvList {
        EnvList::new([
            "V=a.b.c",
            "E=",
            "N=a b",
            "M=x\ny.z",
            "नाम=hindi",
            "न=na",
            "٣=three",
        ])
    }

    fn word(lex: Lex, input: &str) -> String {
        lex.process_word(input, &env())
            .unwrap_or_else(|e| panic!("{input:?}: {e}"))
    }

    fn words(lex: Lex, input: &str) -> Vec<String> {
        lex.process_words(input, &env())
            .unwrap_or_else(|e| panic!("{input:?}: {e}"))
    }

    fn error(lex: Lex, input: &str) -> ShellErrorKind {
        match lex.process_word(input, &env()) {
            Ok(s) => panic!("{input:?} expanded to {s:?}, expected an error"),
            Err(e) => e.kind().clone(),
        }
    }

    #[test]
    fn env_implementations() {
        let pairs = vec![
            ("K".to_string(), "first".to_string()),
            ("K".to_string(), "last".to_string()),
        ];
        assert_eq!(Env::get(&pairs, "K").as_deref(), Some("last"));
        assert_eq!(Env::get(pairs.as_slice(), "K").as_deref(), Some("last"));
        assert_eq!(Env::get(&pairs, "k"), None, "keys are case-sensitive");

        let map = HashMap::from([("K".to_string(), String::new())]);
        assert_eq!(Env::get(&map, "K").as_deref(), Some(""));
        let tree = BTreeMap::from([("K".to_string(), "v".to_string())]);
        assert_eq!(Env::get(&tree, "K").as_deref(), Some("v"));

        let list = EnvList::new(["A=1", "B", "A=2=3", "C="]);
        assert_eq!(list.get("A").as_deref(), Some("2=3"));
        assert_eq!(list.get("B").as_deref(), Some(""));
        assert_eq!(list.get("C").as_deref(), Some(""));
        assert_eq!(list.get("D"), None);
        assert_eq!(list.keys(), ["A", "B", "A", "C"]);
    }

    #[test]
    fn prefix_and_suffix_removal() {
        let lex = Lex::default();
        assert_eq!(word(lex, "${V%.*}"), "a.b");
        assert_eq!(word(lex, "${V%%.*}"), "a");
        assert_eq!(word(lex, "${V#*.}"), "b.c");
        assert_eq!(word(lex, "${V##*.}"), "c");
        assert_eq!(word(lex, "${V#a?b}"), ".c");
        assert_eq!(word(lex, "${V#[a]}"), "a.b.c", "brackets are literal");
        assert_eq!(word(lex, "${U%%*}"), "");
        // Wildcards do not cross a newline.
        assert_eq!(word(lex, "${M%.*}"), "x\ny");
        assert_eq!(word(lex, "${M##*}"), "\ny.z");
    }

    #[test]
    fn replacement() {
        let lex = Lex::default();
        assert_eq!(word(lex, "${V/./-}"), "a-b.c");
        assert_eq!(word(lex, "${V//./-}"), "a-b-c");
        assert!(
            matches!(
                error(lex, "${V//\\./-}"),
                ShellErrorKind::InvalidPattern { .. }
            ),
            "only \\*, \\?, \\\\, \\}} and \\/ are escapes"
        );
        // Only `//` reads the replacement as a Go template: `$0` is the
        // match and `$$` a dollar.
        assert_eq!(
            word(lex, "${V//./<$0>}"),
            "a<>b<>c",
            "$0 here is an unset variable"
        );
        assert_eq!(word(lex, "${V//'.'/'[$0]'}"), "a[.]b[.]c");
        assert_eq!(word(lex, "${V//'.'/'$$'}"), "a$b$c");
        assert_eq!(word(lex, "${V/'.'/'[$0]'}"), "a[$0]b.c");
        // An unset variable is replaced in as empty.
        assert_eq!(word(lex, "${U/*/x}"), "x");
        assert_eq!(word(lex, "${U//*/x}"), "x");
    }

    #[test]
    fn backtick_escape() {
        let lex = Lex::new('`');
        assert_eq!(lex.escape(), '`');
        assert_eq!(words(lex, "a`$b c`\\d"), ["a$b", "c\\d"]);
        assert_eq!(word(lex, "\"a`\"b\""), "a\"b");
        // Patterns only know `\` escapes.
        assert_eq!(word(lex, "${V#`*}"), "a.b.c");
        assert_eq!(word(lex, "${V#*\\?b}"), "a.b.c");
        assert_eq!(word(lex, "${V#*\\\\}"), "a.b.c");
    }

    #[test]
    fn raw_quotes() {
        let lex = Lex::default().raw_quotes(true);
        assert_eq!(
            words(lex, "'a b' \"$N\" $N"),
            ["'a b'", "\"a b\"", "a", "b"]
        );
    }

    #[test]
    fn raw_escapes() {
        let lex = Lex::default().raw_escapes(true);
        assert_eq!(words(lex, "a\\ b \"c\\d\""), ["a\\ b", "c\\\\d"]);
        // Not inside `${V:-…}`.
        assert_eq!(word(lex, "${U:-a\\b}"), "ab");
    }

    #[test]
    fn skip_unset_env_writes_references_back() {
        let lex = Lex::default().skip_unset_env(true);
        assert_eq!(
            words(lex, "$U ${U} ${U:-x} ${U?x} ${U:=x} ${V:-x}"),
            ["$U", "${U}", "${U:-x}", "${U?x}", "${U:=x}", "a.b.c"]
        );
        // Regression: BuildKit writes `${U//a/b}` back as `${U/a/b}`.
        assert_eq!(word(lex, "${U//a/b} ${U/a/b}"), "${U//a/b} ${U/a/b}");
    }

    #[test]
    fn skip_process_quotes() {
        let lex = Lex::default().skip_process_quotes(true);
        assert_eq!(words(lex, "'a b' \"c\""), ["'a", "b'", "\"c\""]);
    }

    #[test]
    fn splitting() {
        let lex = Lex::default();
        assert_eq!(words(lex, "x${U:-a b}y"), ["xa", "by"]);
        assert_eq!(words(lex, "\"x${U:-a b}y\""), ["xa by"]);
        // Quotes inside the default do not protect the expansion.
        assert_eq!(words(lex, "${U:-\"a b\"}"), ["a", "b"]);
        assert_eq!(words(lex, "a \"\" b"), ["a", "b"]);
        assert_eq!(words(lex, "cat << EOF x"), ["cat", "<< EOF", "x"]);
        assert_eq!(words(lex, "a<b"), ["a<b"]);
    }

    #[test]
    fn words_keep_text_before_a_nested_expansion() {
        // Regression for BuildKit's shared word buffer, which returns
        // ["bc"] here.
        let lex = Lex::default();
        assert_eq!(words(lex, "a${U:-b}c"), ["abc"]);
        assert_eq!(words(lex, "'q'\"${U:-b}\""), ["qb"]);
    }

    #[test]
    fn names_follow_go_unicode_classes() {
        let lex = Lex::default();
        // U+093E (a vowel sign) is not a letter: the name stops before it.
        assert_eq!(word(lex, "$नाम"), "naाम");
        // Non-ASCII decimal digits start a positional name.
        assert_eq!(word(lex, "$٣x"), "threex");
        // U+00B2 is a number but not a decimal digit.
        assert_eq!(word(lex, "$V²"), "a.b.c²");
        assert!(is_letter('ª') && is_letter('한') && !is_letter('Ⅻ'));
        assert!(is_digit('٣') && !is_digit('²'));
    }

    #[test]
    fn leading_byte_order_mark_is_ignored() {
        assert_eq!(word(Lex::default(), "\u{feff}$V"), "a.b.c");
        assert_eq!(word(Lex::default(), "x\u{feff}"), "x\u{feff}");
    }

    #[test]
    fn matches() {
        let p = Lex::default()
            .process_word_with_matches("$V ${U:-$E} ${N+x}", &env())
            .unwrap();
        assert_eq!(p.result, "a.b.c  x");
        assert_eq!(p.words, ["a.b.c", "x"]);
        assert_eq!(
            p.matched,
            BTreeSet::from(["V".into(), "E".into(), "N".into()])
        );
        assert_eq!(p.unmatched, BTreeSet::from(["U".into()]));
    }

    #[test]
    fn errors() {
        use ShellErrorKind::*;
        let lex = Lex::default();
        assert_eq!(error(lex, "${V"), MissingBrace);
        assert_eq!(error(lex, "${V:-${U}"), MissingBrace);
        assert_eq!(error(lex, "${V/a"), MissingSlash);
        assert_eq!(error(lex, "${}"), BadSubstitution);
        assert_eq!(error(lex, "${:-x}"), BadSubstitution);
        assert_eq!(error(lex, "${V:=x}"), UnsupportedModifier(":=".into()));
        assert_eq!(error(lex, "${V:#x}"), UnsupportedModifier(":#".into()));
        assert_eq!(error(lex, "${V.}"), UnsupportedModifier(".".into()));
        assert_eq!(error(lex, "\"abc"), UnterminatedDoubleQuote);
        assert_eq!(error(lex, "'abc"), UnterminatedSingleQuote);
        assert_eq!(
            error(lex, "${U?}"),
            Required {
                name: "U".into(),
                message: "is not allowed to be unset".into()
            }
        );
        assert_eq!(
            error(lex, "${E:?must be $N}"),
            Required {
                name: "E".into(),
                message: "must be a b".into()
            }
        );
        assert!(matches!(
            error(lex, "${V%\\x}"),
            InvalidPattern { pattern, .. } if pattern == "\\x"
        ));
        let e = lex.process_word("${E:?no}", &env()).unwrap_err();
        assert_eq!(e.word(), "${E:?no}");
        assert_eq!(e.to_string(), "failed to process \"${E:?no}\": E: no");
    }

    #[test]
    fn expansion_is_bounded_while_it_grows() {
        let lex = Lex::default();
        let half = "x".repeat(MAX_EXPANSION / 2);
        let env: Vec<(String, String)> = vec![("A".into(), half.clone())];
        // Exactly at the limit is fine.
        assert_eq!(lex.process_word("$A$A", &env).unwrap().len(), MAX_EXPANSION);
        for word in ["$A$A$A", "\"$A$A$A\"", "${A//x/yyy}", "x${B:-$A$A$A}"] {
            let r = lex.process_word(word, &env).map(|v| v.len());
            assert!(
                matches!(&r, Err(e) if e.kind() == &ShellErrorKind::TooLong),
                "{word}: {r:?}"
            );
        }
        // A replacement that multiplies stops early instead of building
        // MAX_EXPANSION² bytes.
        let small: Vec<(String, String)> = vec![("A".into(), "x".repeat(4096)), ("R".into(), half)];
        let err = lex.process_word("${A//x/$R}", &small).unwrap_err();
        assert_eq!(err.kind(), &ShellErrorKind::TooLong);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // At the limit a debug build needs about 300 KiB of stack (release
        // far less); 512 KiB keeps a margin inside any 2 MiB thread.
        let run = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(|| {
                let lex = Lex::default();
                let deep = "${U:-\"".repeat(100_000);
                let err = lex.process_word(&deep, &env()).unwrap_err();
                assert_eq!(err.kind(), &ShellErrorKind::TooDeep);
                let ok = format!(
                    "{}x{}",
                    "${U:-".repeat(MAX_NESTING - 1),
                    "}".repeat(MAX_NESTING - 1)
                );
                assert_eq!(lex.process_word(&ok, &env()).unwrap(), "x");
                let too_deep = format!(
                    "{}x{}",
                    "${U:-".repeat(MAX_NESTING),
                    "}".repeat(MAX_NESTING)
                );
                assert!(lex.process_word(&too_deep, &env()).is_err());
            })
            .unwrap();
        run.join().unwrap();
    }

    #[test]
    fn glob_priority_matches_go_regexp() {
        let s: Vec<char> = "xaxbxa".chars().collect();
        let greedy = Glob::compile("*x", true).unwrap();
        assert_eq!(greedy.match_ends(&s).unwrap()[0], Some(5));
        let lazy = Glob::compile("*x", false).unwrap();
        assert_eq!(lazy.match_ends(&s).unwrap()[0], Some(1));
        let unanchored = Glob::compile("b*", true).unwrap();
        assert_eq!(unanchored.match_ends(&s).unwrap()[3], Some(6));
        assert_eq!(unanchored.match_ends(&s).unwrap()[2], None);
        assert!(Glob::compile("\\", true).is_err());
        assert!(Glob::compile("a\\}\\/", true).is_ok());
    }

    #[test]
    fn reverse_pattern_keeps_escapes() {
        assert_eq!(reverse_pattern("a\\*c"), "c\\*a");
        assert_eq!(reverse_pattern("\\\\\\ab"), "b\\a\\\\");
        assert_eq!(reverse_pattern("ab\\"), "\\ba");
        assert_eq!(reverse_pattern("👽\\🚀🖖"), "🖖\\🚀👽");
    }

    #[test]
    fn go_template_expansion() {
        let mut out = String::new();
        expand_template(&mut out, "<$0|${0}|$00|$1|$$|${0|$|$name|${}>", "M");
        assert_eq!(out, "<M|M|||$|${0|$||${}>");
    }
}

/// Go's `unicode.IsLetter` and `unicode.IsDigit` as sorted inclusive code
/// point ranges `[first, last, first, last, …]`, generated from the Unicode
/// 15.0.0 database (general categories Lu, Ll, Lt, Lm, Lo and Nd).
mod unicode_tables {
    pub(super) const LETTER: &[u32] = &[
        0x41, 0x5A, 0x61, 0x7A, 0xAA, 0xAA, 0xB5, 0xB5, 0xBA, 0xBA, 0xC0, 0xD6, 0xD8, 0xF6, 0xF8,
        0x2C1, 0x2C6, 0x2D1, 0x2E0, 0x2E4, 0x2EC, 0x2EC, 0x2EE, 0x2EE, 0x370, 0x374, 0x376, 0x377,
        0x37A, 0x37D, 0x37F, 0x37F, 0x386, 0x386, 0x388, 0x38A, 0x38C, 0x38C, 0x38E, 0x3A1, 0x3A3,
        0x3F5, 0x3F7, 0x481, 0x48A, 0x52F, 0x531, 0x556, 0x559, 0x559, 0x560, 0x588, 0x5D0, 0x5EA,
        0x5EF, 0x5F2, 0x620, 0x64A, 0x66E, 0x66F, 0x671, 0x6D3, 0x6D5, 0x6D5, 0x6E5, 0x6E6, 0x6EE,
        0x6EF, 0x6FA, 0x6FC, 0x6FF, 0x6FF, 0x710, 0x710, 0x712, 0x72F, 0x74D, 0x7A5, 0x7B1, 0x7B1,
        0x7CA, 0x7EA, 0x7F4, 0x7F5, 0x7FA, 0x7FA, 0x800, 0x815, 0x81A, 0x81A, 0x824, 0x824, 0x828,
        0x828, 0x840, 0x858, 0x860, 0x86A, 0x870, 0x887, 0x889, 0x88E, 0x8A0, 0x8C9, 0x904, 0x939,
        0x93D, 0x93D, 0x950, 0x950, 0x958, 0x961, 0x971, 0x980, 0x985, 0x98C, 0x98F, 0x990, 0x993,
        0x9A8, 0x9AA, 0x9B0, 0x9B2, 0x9B2, 0x9B6, 0x9B9, 0x9BD, 0x9BD, 0x9CE, 0x9CE, 0x9DC, 0x9DD,
        0x9DF, 0x9E1, 0x9F0, 0x9F1, 0x9FC, 0x9FC, 0xA05, 0xA0A, 0xA0F, 0xA10, 0xA13, 0xA28, 0xA2A,
        0xA30, 0xA32, 0xA33, 0xA35, 0xA36, 0xA38, 0xA39, 0xA59, 0xA5C, 0xA5E, 0xA5E, 0xA72, 0xA74,
        0xA85, 0xA8D, 0xA8F, 0xA91, 0xA93, 0xAA8, 0xAAA, 0xAB0, 0xAB2, 0xAB3, 0xAB5, 0xAB9, 0xABD,
        0xABD, 0xAD0, 0xAD0, 0xAE0, 0xAE1, 0xAF9, 0xAF9, 0xB05, 0xB0C, 0xB0F, 0xB10, 0xB13, 0xB28,
        0xB2A, 0xB30, 0xB32, 0xB33, 0xB35, 0xB39, 0xB3D, 0xB3D, 0xB5C, 0xB5D, 0xB5F, 0xB61, 0xB71,
        0xB71, 0xB83, 0xB83, 0xB85, 0xB8A, 0xB8E, 0xB90, 0xB92, 0xB95, 0xB99, 0xB9A, 0xB9C, 0xB9C,
        0xB9E, 0xB9F, 0xBA3, 0xBA4, 0xBA8, 0xBAA, 0xBAE, 0xBB9, 0xBD0, 0xBD0, 0xC05, 0xC0C, 0xC0E,
        0xC10, 0xC12, 0xC28, 0xC2A, 0xC39, 0xC3D, 0xC3D, 0xC58, 0xC5A, 0xC5D, 0xC5D, 0xC60, 0xC61,
        0xC80, 0xC80, 0xC85, 0xC8C, 0xC8E, 0xC90, 0xC92, 0xCA8, 0xCAA, 0xCB3, 0xCB5, 0xCB9, 0xCBD,
        0xCBD, 0xCDD, 0xCDE, 0xCE0, 0xCE1, 0xCF1, 0xCF2, 0xD04, 0xD0C, 0xD0E, 0xD10, 0xD12, 0xD3A,
        0xD3D, 0xD3D, 0xD4E, 0xD4E, 0xD54, 0xD56, 0xD5F, 0xD61, 0xD7A, 0xD7F, 0xD85, 0xD96, 0xD9A,
        0xDB1, 0xDB3, 0xDBB, 0xDBD, 0xDBD, 0xDC0, 0xDC6, 0xE01, 0xE30, 0xE32, 0xE33, 0xE40, 0xE46,
        0xE81, 0xE82, 0xE84, 0xE84, 0xE86, 0xE8A, 0xE8C, 0xEA3, 0xEA5, 0xEA5, 0xEA7, 0xEB0, 0xEB2,
        0xEB3, 0xEBD, 0xEBD, 0xEC0, 0xEC4, 0xEC6, 0xEC6, 0xEDC, 0xEDF, 0xF00, 0xF00, 0xF40, 0xF47,
        0xF49, 0xF6C, 0xF88, 0xF8C, 0x1000, 0x102A, 0x103F, 0x103F, 0x1050, 0x1055, 0x105A, 0x105D,
        0x1061, 0x1061, 0x1065, 0x1066, 0x106E, 0x1070, 0x1075, 0x1081, 0x108E, 0x108E, 0x10A0,
        0x10C5, 0x10C7, 0x10C7, 0x10CD, 0x10CD, 0x10D0, 0x10FA, 0x10FC, 0x1248, 0x124A, 0x124D,
        0x1250, 0x1256, 0x1258, 0x1258, 0x125A, 0x125D, 0x1260, 0x1288, 0x128A, 0x128D, 0x1290,
        0x12B0, 0x12B2, 0x12B5, 0x12B8, 0x12BE, 0x12C0, 0x12C0, 0x12C2, 0x12C5, 0x12C8, 0x12D6,
        0x12D8, 0x1310, 0x1312, 0x1315, 0x1318, 0x135A, 0x1380, 0x138F, 0x13A0, 0x13F5, 0x13F8,
        0x13FD, 0x1401, 0x166C, 0x166F, 0x167F, 0x1681, 0x169A, 0x16A0, 0x16EA, 0x16F1, 0x16F8,
        0x1700, 0x1711, 0x171F, 0x1731, 0x1740, 0x1751, 0x1760, 0x176C, 0x176E, 0x1770, 0x1780,
        0x17B3, 0x17D7, 0x17D7, 0x17DC, 0x17DC, 0x1820, 0x1878, 0x1880, 0x1884, 0x1887, 0x18A8,
        0x18AA, 0x18AA, 0x18B0, 0x18F5, 0x1900, 0x191E, 0x1950, 0x196D, 0x1970, 0x1974, 0x1980,
        0x19AB, 0x19B0, 0x19C9, 0x1A00, 0x1A16, 0x1A20, 0x1A54, 0x1AA7, 0x1AA7, 0x1B05, 0x1B33,
        0x1B45, 0x1B4C, 0x1B83, 0x1BA0, 0x1BAE, 0x1BAF, 0x1BBA, 0x1BE5, 0x1C00, 0x1C23, 0x1C4D,
        0x1C4F, 0x1C5A, 0x1C7D, 0x1C80, 0x1C88, 0x1C90, 0x1CBA, 0x1CBD, 0x1CBF, 0x1CE9, 0x1CEC,
        0x1CEE, 0x1CF3, 0x1CF5, 0x1CF6, 0x1CFA, 0x1CFA, 0x1D00, 0x1DBF, 0x1E00, 0x1F15, 0x1F18,
        0x1F1D, 0x1F20, 0x1F45, 0x1F48, 0x1F4D, 0x1F50, 0x1F57, 0x1F59, 0x1F59, 0x1F5B, 0x1F5B,
        0x1F5D, 0x1F5D, 0x1F5F, 0x1F7D, 0x1F80, 0x1FB4, 0x1FB6, 0x1FBC, 0x1FBE, 0x1FBE, 0x1FC2,
        0x1FC4, 0x1FC6, 0x1FCC, 0x1FD0, 0x1FD3, 0x1FD6, 0x1FDB, 0x1FE0, 0x1FEC, 0x1FF2, 0x1FF4,
        0x1FF6, 0x1FFC, 0x2071, 0x2071, 0x207F, 0x207F, 0x2090, 0x209C, 0x2102, 0x2102, 0x2107,
        0x2107, 0x210A, 0x2113, 0x2115, 0x2115, 0x2119, 0x211D, 0x2124, 0x2124, 0x2126, 0x2126,
        0x2128, 0x2128, 0x212A, 0x212D, 0x212F, 0x2139, 0x213C, 0x213F, 0x2145, 0x2149, 0x214E,
        0x214E, 0x2183, 0x2184, 0x2C00, 0x2CE4, 0x2CEB, 0x2CEE, 0x2CF2, 0x2CF3, 0x2D00, 0x2D25,
        0x2D27, 0x2D27, 0x2D2D, 0x2D2D, 0x2D30, 0x2D67, 0x2D6F, 0x2D6F, 0x2D80, 0x2D96, 0x2DA0,
        0x2DA6, 0x2DA8, 0x2DAE, 0x2DB0, 0x2DB6, 0x2DB8, 0x2DBE, 0x2DC0, 0x2DC6, 0x2DC8, 0x2DCE,
        0x2DD0, 0x2DD6, 0x2DD8, 0x2DDE, 0x2E2F, 0x2E2F, 0x3005, 0x3006, 0x3031, 0x3035, 0x303B,
        0x303C, 0x3041, 0x3096, 0x309D, 0x309F, 0x30A1, 0x30FA, 0x30FC, 0x30FF, 0x3105, 0x312F,
        0x3131, 0x318E, 0x31A0, 0x31BF, 0x31F0, 0x31FF, 0x3400, 0x4DBF, 0x4E00, 0xA48C, 0xA4D0,
        0xA4FD, 0xA500, 0xA60C, 0xA610, 0xA61F, 0xA62A, 0xA62B, 0xA640, 0xA66E, 0xA67F, 0xA69D,
        0xA6A0, 0xA6E5, 0xA717, 0xA71F, 0xA722, 0xA788, 0xA78B, 0xA7CA, 0xA7D0, 0xA7D1, 0xA7D3,
        0xA7D3, 0xA7D5, 0xA7D9, 0xA7F2, 0xA801, 0xA803, 0xA805, 0xA807, 0xA80A, 0xA80C, 0xA822,
        0xA840, 0xA873, 0xA882, 0xA8B3, 0xA8F2, 0xA8F7, 0xA8FB, 0xA8FB, 0xA8FD, 0xA8FE, 0xA90A,
        0xA925, 0xA930, 0xA946, 0xA960, 0xA97C, 0xA984, 0xA9B2, 0xA9CF, 0xA9CF, 0xA9E0, 0xA9E4,
        0xA9E6, 0xA9EF, 0xA9FA, 0xA9FE, 0xAA00, 0xAA28, 0xAA40, 0xAA42, 0xAA44, 0xAA4B, 0xAA60,
        0xAA76, 0xAA7A, 0xAA7A, 0xAA7E, 0xAAAF, 0xAAB1, 0xAAB1, 0xAAB5, 0xAAB6, 0xAAB9, 0xAABD,
        0xAAC0, 0xAAC0, 0xAAC2, 0xAAC2, 0xAADB, 0xAADD, 0xAAE0, 0xAAEA, 0xAAF2, 0xAAF4, 0xAB01,
        0xAB06, 0xAB09, 0xAB0E, 0xAB11, 0xAB16, 0xAB20, 0xAB26, 0xAB28, 0xAB2E, 0xAB30, 0xAB5A,
        0xAB5C, 0xAB69, 0xAB70, 0xABE2, 0xAC00, 0xD7A3, 0xD7B0, 0xD7C6, 0xD7CB, 0xD7FB, 0xF900,
        0xFA6D, 0xFA70, 0xFAD9, 0xFB00, 0xFB06, 0xFB13, 0xFB17, 0xFB1D, 0xFB1D, 0xFB1F, 0xFB28,
        0xFB2A, 0xFB36, 0xFB38, 0xFB3C, 0xFB3E, 0xFB3E, 0xFB40, 0xFB41, 0xFB43, 0xFB44, 0xFB46,
        0xFBB1, 0xFBD3, 0xFD3D, 0xFD50, 0xFD8F, 0xFD92, 0xFDC7, 0xFDF0, 0xFDFB, 0xFE70, 0xFE74,
        0xFE76, 0xFEFC, 0xFF21, 0xFF3A, 0xFF41, 0xFF5A, 0xFF66, 0xFFBE, 0xFFC2, 0xFFC7, 0xFFCA,
        0xFFCF, 0xFFD2, 0xFFD7, 0xFFDA, 0xFFDC, 0x10000, 0x1000B, 0x1000D, 0x10026, 0x10028,
        0x1003A, 0x1003C, 0x1003D, 0x1003F, 0x1004D, 0x10050, 0x1005D, 0x10080, 0x100FA, 0x10280,
        0x1029C, 0x102A0, 0x102D0, 0x10300, 0x1031F, 0x1032D, 0x10340, 0x10342, 0x10349, 0x10350,
        0x10375, 0x10380, 0x1039D, 0x103A0, 0x103C3, 0x103C8, 0x103CF, 0x10400, 0x1049D, 0x104B0,
        0x104D3, 0x104D8, 0x104FB, 0x10500, 0x10527, 0x10530, 0x10563, 0x10570, 0x1057A, 0x1057C,
        0x1058A, 0x1058C, 0x10592, 0x10594, 0x10595, 0x10597, 0x105A1, 0x105A3, 0x105B1, 0x105B3,
        0x105B9, 0x105BB, 0x105BC, 0x10600, 0x10736, 0x10740, 0x10755, 0x10760, 0x10767, 0x10780,
        0x10785, 0x10787, 0x107B0, 0x107B2, 0x107BA, 0x10800, 0x10805, 0x10808, 0x10808, 0x1080A,
        0x10835, 0x10837, 0x10838, 0x1083C, 0x1083C, 0x1083F, 0x10855, 0x10860, 0x10876, 0x10880,
        0x1089E, 0x108E0, 0x108F2, 0x108F4, 0x108F5, 0x10900, 0x10915, 0x10920, 0x10939, 0x10980,
        0x109B7, 0x109BE, 0x109BF, 0x10A00, 0x10A00, 0x10A10, 0x10A13, 0x10A15, 0x10A17, 0x10A19,
        0x10A35, 0x10A60, 0x10A7C, 0x10A80, 0x10A9C, 0x10AC0, 0x10AC7, 0x10AC9, 0x10AE4, 0x10B00,
        0x10B35, 0x10B40, 0x10B55, 0x10B60, 0x10B72, 0x10B80, 0x10B91, 0x10C00, 0x10C48, 0x10C80,
        0x10CB2, 0x10CC0, 0x10CF2, 0x10D00, 0x10D23, 0x10E80, 0x10EA9, 0x10EB0, 0x10EB1, 0x10F00,
        0x10F1C, 0x10F27, 0x10F27, 0x10F30, 0x10F45, 0x10F70, 0x10F81, 0x10FB0, 0x10FC4, 0x10FE0,
        0x10FF6, 0x11003, 0x11037, 0x11071, 0x11072, 0x11075, 0x11075, 0x11083, 0x110AF, 0x110D0,
        0x110E8, 0x11103, 0x11126, 0x11144, 0x11144, 0x11147, 0x11147, 0x11150, 0x11172, 0x11176,
        0x11176, 0x11183, 0x111B2, 0x111C1, 0x111C4, 0x111DA, 0x111DA, 0x111DC, 0x111DC, 0x11200,
        0x11211, 0x11213, 0x1122B, 0x1123F, 0x11240, 0x11280, 0x11286, 0x11288, 0x11288, 0x1128A,
        0x1128D, 0x1128F, 0x1129D, 0x1129F, 0x112A8, 0x112B0, 0x112DE, 0x11305, 0x1130C, 0x1130F,
        0x11310, 0x11313, 0x11328, 0x1132A, 0x11330, 0x11332, 0x11333, 0x11335, 0x11339, 0x1133D,
        0x1133D, 0x11350, 0x11350, 0x1135D, 0x11361, 0x11400, 0x11434, 0x11447, 0x1144A, 0x1145F,
        0x11461, 0x11480, 0x114AF, 0x114C4, 0x114C5, 0x114C7, 0x114C7, 0x11580, 0x115AE, 0x115D8,
        0x115DB, 0x11600, 0x1162F, 0x11644, 0x11644, 0x11680, 0x116AA, 0x116B8, 0x116B8, 0x11700,
        0x1171A, 0x11740, 0x11746, 0x11800, 0x1182B, 0x118A0, 0x118DF, 0x118FF, 0x11906, 0x11909,
        0x11909, 0x1190C, 0x11913, 0x11915, 0x11916, 0x11918, 0x1192F, 0x1193F, 0x1193F, 0x11941,
        0x11941, 0x119A0, 0x119A7, 0x119AA, 0x119D0, 0x119E1, 0x119E1, 0x119E3, 0x119E3, 0x11A00,
        0x11A00, 0x11A0B, 0x11A32, 0x11A3A, 0x11A3A, 0x11A50, 0x11A50, 0x11A5C, 0x11A89, 0x11A9D,
        0x11A9D, 0x11AB0, 0x11AF8, 0x11C00, 0x11C08, 0x11C0A, 0x11C2E, 0x11C40, 0x11C40, 0x11C72,
        0x11C8F, 0x11D00, 0x11D06, 0x11D08, 0x11D09, 0x11D0B, 0x11D30, 0x11D46, 0x11D46, 0x11D60,
        0x11D65, 0x11D67, 0x11D68, 0x11D6A, 0x11D89, 0x11D98, 0x11D98, 0x11EE0, 0x11EF2, 0x11F02,
        0x11F02, 0x11F04, 0x11F10, 0x11F12, 0x11F33, 0x11FB0, 0x11FB0, 0x12000, 0x12399, 0x12480,
        0x12543, 0x12F90, 0x12FF0, 0x13000, 0x1342F, 0x13441, 0x13446, 0x14400, 0x14646, 0x16800,
        0x16A38, 0x16A40, 0x16A5E, 0x16A70, 0x16ABE, 0x16AD0, 0x16AED, 0x16B00, 0x16B2F, 0x16B40,
        0x16B43, 0x16B63, 0x16B77, 0x16B7D, 0x16B8F, 0x16E40, 0x16E7F, 0x16F00, 0x16F4A, 0x16F50,
        0x16F50, 0x16F93, 0x16F9F, 0x16FE0, 0x16FE1, 0x16FE3, 0x16FE3, 0x17000, 0x187F7, 0x18800,
        0x18CD5, 0x18D00, 0x18D08, 0x1AFF0, 0x1AFF3, 0x1AFF5, 0x1AFFB, 0x1AFFD, 0x1AFFE, 0x1B000,
        0x1B122, 0x1B132, 0x1B132, 0x1B150, 0x1B152, 0x1B155, 0x1B155, 0x1B164, 0x1B167, 0x1B170,
        0x1B2FB, 0x1BC00, 0x1BC6A, 0x1BC70, 0x1BC7C, 0x1BC80, 0x1BC88, 0x1BC90, 0x1BC99, 0x1D400,
        0x1D454, 0x1D456, 0x1D49C, 0x1D49E, 0x1D49F, 0x1D4A2, 0x1D4A2, 0x1D4A5, 0x1D4A6, 0x1D4A9,
        0x1D4AC, 0x1D4AE, 0x1D4B9, 0x1D4BB, 0x1D4BB, 0x1D4BD, 0x1D4C3, 0x1D4C5, 0x1D505, 0x1D507,
        0x1D50A, 0x1D50D, 0x1D514, 0x1D516, 0x1D51C, 0x1D51E, 0x1D539, 0x1D53B, 0x1D53E, 0x1D540,
        0x1D544, 0x1D546, 0x1D546, 0x1D54A, 0x1D550, 0x1D552, 0x1D6A5, 0x1D6A8, 0x1D6C0, 0x1D6C2,
        0x1D6DA, 0x1D6DC, 0x1D6FA, 0x1D6FC, 0x1D714, 0x1D716, 0x1D734, 0x1D736, 0x1D74E, 0x1D750,
        0x1D76E, 0x1D770, 0x1D788, 0x1D78A, 0x1D7A8, 0x1D7AA, 0x1D7C2, 0x1D7C4, 0x1D7CB, 0x1DF00,
        0x1DF1E, 0x1DF25, 0x1DF2A, 0x1E030, 0x1E06D, 0x1E100, 0x1E12C, 0x1E137, 0x1E13D, 0x1E14E,
        0x1E14E, 0x1E290, 0x1E2AD, 0x1E2C0, 0x1E2EB, 0x1E4D0, 0x1E4EB, 0x1E7E0, 0x1E7E6, 0x1E7E8,
        0x1E7EB, 0x1E7ED, 0x1E7EE, 0x1E7F0, 0x1E7FE, 0x1E800, 0x1E8C4, 0x1E900, 0x1E943, 0x1E94B,
        0x1E94B, 0x1EE00, 0x1EE03, 0x1EE05, 0x1EE1F, 0x1EE21, 0x1EE22, 0x1EE24, 0x1EE24, 0x1EE27,
        0x1EE27, 0x1EE29, 0x1EE32, 0x1EE34, 0x1EE37, 0x1EE39, 0x1EE39, 0x1EE3B, 0x1EE3B, 0x1EE42,
        0x1EE42, 0x1EE47, 0x1EE47, 0x1EE49, 0x1EE49, 0x1EE4B, 0x1EE4B, 0x1EE4D, 0x1EE4F, 0x1EE51,
        0x1EE52, 0x1EE54, 0x1EE54, 0x1EE57, 0x1EE57, 0x1EE59, 0x1EE59, 0x1EE5B, 0x1EE5B, 0x1EE5D,
        0x1EE5D, 0x1EE5F, 0x1EE5F, 0x1EE61, 0x1EE62, 0x1EE64, 0x1EE64, 0x1EE67, 0x1EE6A, 0x1EE6C,
        0x1EE72, 0x1EE74, 0x1EE77, 0x1EE79, 0x1EE7C, 0x1EE7E, 0x1EE7E, 0x1EE80, 0x1EE89, 0x1EE8B,
        0x1EE9B, 0x1EEA1, 0x1EEA3, 0x1EEA5, 0x1EEA9, 0x1EEAB, 0x1EEBB, 0x20000, 0x2A6DF, 0x2A700,
        0x2B739, 0x2B740, 0x2B81D, 0x2B820, 0x2CEA1, 0x2CEB0, 0x2EBE0, 0x2F800, 0x2FA1D, 0x30000,
        0x3134A, 0x31350, 0x323AF,
    ];

    pub(super) const DIGIT: &[u32] = &[
        0x30, 0x39, 0x660, 0x669, 0x6F0, 0x6F9, 0x7C0, 0x7C9, 0x966, 0x96F, 0x9E6, 0x9EF, 0xA66,
        0xA6F, 0xAE6, 0xAEF, 0xB66, 0xB6F, 0xBE6, 0xBEF, 0xC66, 0xC6F, 0xCE6, 0xCEF, 0xD66, 0xD6F,
        0xDE6, 0xDEF, 0xE50, 0xE59, 0xED0, 0xED9, 0xF20, 0xF29, 0x1040, 0x1049, 0x1090, 0x1099,
        0x17E0, 0x17E9, 0x1810, 0x1819, 0x1946, 0x194F, 0x19D0, 0x19D9, 0x1A80, 0x1A89, 0x1A90,
        0x1A99, 0x1B50, 0x1B59, 0x1BB0, 0x1BB9, 0x1C40, 0x1C49, 0x1C50, 0x1C59, 0xA620, 0xA629,
        0xA8D0, 0xA8D9, 0xA900, 0xA909, 0xA9D0, 0xA9D9, 0xA9F0, 0xA9F9, 0xAA50, 0xAA59, 0xABF0,
        0xABF9, 0xFF10, 0xFF19, 0x104A0, 0x104A9, 0x10D30, 0x10D39, 0x11066, 0x1106F, 0x110F0,
        0x110F9, 0x11136, 0x1113F, 0x111D0, 0x111D9, 0x112F0, 0x112F9, 0x11450, 0x11459, 0x114D0,
        0x114D9, 0x11650, 0x11659, 0x116C0, 0x116C9, 0x11730, 0x11739, 0x118E0, 0x118E9, 0x11950,
        0x11959, 0x11C50, 0x11C59, 0x11D50, 0x11D59, 0x11DA0, 0x11DA9, 0x11F50, 0x11F59, 0x16A60,
        0x16A69, 0x16AC0, 0x16AC9, 0x16B50, 0x16B59, 0x1D7CE, 0x1D7FF, 0x1E140, 0x1E149, 0x1E2F0,
        0x1E2F9, 0x1E4F0, 0x1E4F9, 0x1E950, 0x1E959, 0x1FBF0, 0x1FBF9,
    ];
}
