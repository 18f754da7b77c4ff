//! Parser directives (`# syntax=`, `# escape=`, `# check=`): comments of the
//! form `name=value` at the very top of a Dockerfile.

/// The directive names BuildKit knows; any other name ends the directives.
const KNOWN: [&str; 3] = ["syntax", "escape", "check"];

/// A directive that cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectiveError {
    /// The same directive twice.
    #[error("only one {0} parser directive can be used")]
    Repeated(String),
    /// `# escape=` with another character than `` ` `` or `\\`.
    #[error("invalid escape token '{0}' does not match ` or \\")]
    InvalidEscape(String),
}

/// A directive found by [`DirectiveParser`] or [`detect_syntax`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundDirective {
    /// Lower-cased name.
    pub name: String,
    /// Value, trimmed.
    pub value: String,
    /// 1-based line.
    pub line: usize,
}

/// Reads directives line by line until the first line that is not one.
#[derive(Debug, Clone)]
pub struct DirectiveParser {
    line: usize,
    prefix: &'static str,
    seen: Vec<String>,
    done: bool,
}

impl Default for DirectiveParser {
    fn default() -> Self {
        Self::new("#")
    }
}

impl DirectiveParser {
    /// A parser for directives written as comments starting with `prefix`
    /// (`#`, or `//` for front-end detection).
    pub fn new(prefix: &'static str) -> Self {
        DirectiveParser {
            line: 0,
            prefix,
            seen: Vec::new(),
            done: false,
        }
    }

    fn starting_at(mut self, line: usize) -> Self {
        self.line = line;
        self
    }

    /// Feeds the next physical line (without its newline). Returns the
    /// directive it holds, `Ok(None)` when it holds none (which ends
    /// directive processing for good), or an error for a repeated directive.
    pub fn parse_line(&mut self, line: &str) -> Result<Option<FoundDirective>, DirectiveError> {
        self.line += 1;
        if self.done {
            return Ok(None);
        }
        let Some(rest) = line.strip_prefix(self.prefix) else {
            self.done = true;
            return Ok(None);
        };
        let rest = rest.trim_start_matches(char::is_whitespace);
        let Some((name, value)) = split_directive(rest) else {
            self.done = true;
            return Ok(None);
        };
        let name = name.to_ascii_lowercase();
        if !KNOWN.contains(&name.as_str()) {
            self.done = true;
            return Ok(None);
        }
        if self.seen.contains(&name) {
            return Err(DirectiveError::Repeated(name));
        }
        self.seen.push(name.clone());
        Ok(Some(FoundDirective {
            name,
            value: value.to_string(),
            line: self.line,
        }))
    }

    /// Reads all directives at the top of `text`.
    pub fn parse_all(&mut self, text: &str) -> Result<Vec<FoundDirective>, DirectiveError> {
        let mut out = Vec::new();
        for line in text.lines() {
            if self.done {
                break;
            }
            if let Some(d) = self.parse_line(line)? {
                out.push(d);
            }
        }
        Ok(out)
    }
}

/// Matches `^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$`.
fn split_directive(s: &str) -> Option<(&str, &str)> {
    let mut chars = s.char_indices();
    let (_, first) = chars.next()?;
    if !first.is_ascii_alphabetic() {
        return None;
    }
    let name_end = s
        .char_indices()
        .find(|(_, c)| !c.is_ascii_alphanumeric())
        .map(|(i, _)| i)
        .unwrap_or(s.len());
    let name = &s[..name_end];
    let rest = s[name_end..].trim_start_matches(char::is_whitespace);
    let value = rest.strip_prefix('=')?;
    let value = value.trim_matches(char::is_whitespace);
    if value.is_empty() {
        return None;
    }
    Some((name, value))
}

/// The result of [`detect_syntax`] / [`parse_directive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectedDirective {
    /// First space-separated token of the value (the front-end reference).
    pub reference: String,
    /// The whole value.
    pub cmdline: String,
    /// 1-based line (0 for the JSON form).
    pub line: usize,
}

/// BuildKit's `DetectSyntax`: finds `# syntax=` (also `// syntax=` and a
/// whole-file JSON object with a `"syntax"` key), skipping a BOM and a
/// leading `#!` shebang line.
pub fn detect_syntax(text: &str) -> Option<DetectedDirective> {
    detect(text, "syntax", true)
}

/// BuildKit's `ParseDirective`: like [`detect_syntax`] for any directive
/// name, in `#` comment style only.
pub fn parse_directive(name: &str, text: &str) -> Option<DetectedDirective> {
    detect(text, name, false)
}

fn detect(text: &str, key: &str, any_format: bool) -> Option<DetectedDirective> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let (body, line) = if first.starts_with("#!") {
        (rest, 1)
    } else {
        (text, 0)
    };
    let prefixes: &[&'static str] = if any_format { &["#", "//"] } else { &["#"] };
    for prefix in prefixes {
        let mut p = DirectiveParser::new(prefix).starting_at(line);
        let found = p.parse_all(body).unwrap_or_default();
        if let Some(d) = found.into_iter().find(|d| d.name == key) {
            let reference = d.value.split(' ').next().unwrap_or_default().to_string();
            return Some(DetectedDirective {
                reference,
                cmdline: d.value,
                line: d.line,
            });
        }
    }
    if any_format {
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(body)
        {
            if let Some(serde_json::Value::String(v)) = map.get(key) {
                return Some(DetectedDirective {
                    reference: v.clone(),
                    cmdline: v.clone(),
                    line,
                });
            }
        }
    }
    None
}
