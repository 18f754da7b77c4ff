//! Errors that point at the Dockerfile: `Dockerfile:LINE:COL`, the source
//! line, a caret, the cause and, where obvious, a suggestion.

use std::fmt;

/// A location in the Dockerfile source (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Location {
    /// First line of the offending instruction.
    pub line: usize,
    /// Column of the offending text within `line` (1-based, in characters).
    pub column: usize,
    /// Last line of the offending instruction.
    pub end_line: usize,
}

/// A Dockerfile that cannot be parsed or whose instructions are invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// One-line cause, worded like BuildKit's where BuildKit has a message.
    pub message: String,
    /// Where the problem is; line 0 when the file as a whole is at fault.
    pub location: Location,
    /// A hint such as "did you mean COPY?".
    pub suggestion: Option<String>,
}

impl ParseError {
    pub(crate) fn new(message: impl Into<String>, line: usize, end_line: usize) -> Self {
        ParseError {
            message: message.into(),
            location: Location {
                line,
                column: 0,
                end_line: end_line.max(line),
            },
            suggestion: None,
        }
    }

    pub(crate) fn with_suggestion(mut self, suggestion: Option<String>) -> Self {
        self.suggestion = suggestion;
        self
    }

    /// Points the column at the first occurrence of `needle` within the
    /// instruction's source lines, or at its first non-blank character.
    pub(crate) fn locate(mut self, source: &str, needle: Option<&str>) -> Self {
        let loc = &mut self.location;
        if loc.line == 0 {
            return self;
        }
        let lines: Vec<&str> = source.lines().collect();
        let last = loc.end_line.min(lines.len());
        if let Some(needle) = needle.filter(|n| !n.is_empty()) {
            for n in loc.line..=last {
                if let Some(byte) = lines.get(n - 1).and_then(|l| l.find(needle)) {
                    let text = lines[n - 1];
                    loc.column = text[..byte].chars().count() + 1;
                    if n != loc.line {
                        loc.line = n;
                    }
                    return self;
                }
            }
        }
        if let Some(text) = lines.get(loc.line - 1) {
            loc.column = text.chars().take_while(|c| c.is_whitespace()).count() + 1;
        }
        self
    }

    /// Renders the error as a diagnostic:
    ///
    /// ```text
    /// Dockerfile:3:1: unknown instruction: COPPY (did you mean COPY?)
    ///    3 | COPPY . /app
    ///      | ^
    /// ```
    pub fn render(&self, file_name: &str, source: &str) -> String {
        let loc = &self.location;
        let mut out = String::new();
        if loc.line == 0 {
            out.push_str(&format!("{file_name}: {}", self.message));
        } else {
            out.push_str(&format!(
                "{file_name}:{}:{}: {}",
                loc.line,
                loc.column.max(1),
                self.message
            ));
        }
        if let Some(s) = &self.suggestion {
            out.push_str(&format!(" ({s})"));
        }
        out.push('\n');
        if loc.line == 0 {
            return out;
        }
        let source = source.strip_prefix('\u{feff}').unwrap_or(source);
        let lines: Vec<&str> = source.lines().collect();
        let width = loc.end_line.max(loc.line).to_string().len().max(4);
        let last = loc
            .end_line
            .max(loc.line)
            .min(lines.len())
            .min(loc.line + 5);
        for n in loc.line..=last {
            let Some(text) = lines.get(n - 1) else { break };
            out.push_str(&format!("{n:>width$} | {}\n", text.trim_end_matches('\r')));
            if n == loc.line {
                let pad: String = text
                    .chars()
                    .take(loc.column.max(1) - 1)
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                out.push_str(&format!("{:>width$} | {pad}^\n", ""));
            }
        }
        out
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.line > 0 {
            write!(f, "line {}: {}", self.location.line, self.message)?;
        } else {
            write!(f, "{}", self.message)?;
        }
        if let Some(s) = &self.suggestion {
            write!(f, " ({s})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseError {}

/// Suggests the candidate closest to `word` (case-insensitive Levenshtein
/// distance of at most a third of the word, BuildKit's `suggest` rule).
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let w = word.to_lowercase();
    let mut best: Option<(&str, usize)> = None;
    for c in candidates {
        let d = levenshtein(&w, &c.to_lowercase());
        if d == 0 {
            continue;
        }
        if best.is_none_or(|(_, bd)| d < bd) {
            best = Some((c, d));
        }
    }
    let (c, d) = best?;
    let max = (w.chars().count().max(3)) / 3 + 1;
    (d <= max).then_some(c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_words_only() {
        assert_eq!(suggest("COPPY", &["COPY", "RUN", "CMD"]), Some("COPY"));
        assert_eq!(
            suggest("ENTRYPONT", &["ENTRYPOINT", "ENV"]),
            Some("ENTRYPOINT")
        );
        assert_eq!(suggest("XYZZY", &["COPY", "RUN"]), None);
    }

    #[test]
    fn render_has_caret_under_column() {
        let src = "FROM busybox\nCOPPY . /app\n";
        let e = ParseError::new("unknown instruction: COPPY", 2, 2)
            .locate(src, Some("COPPY"))
            .with_suggestion(Some("did you mean COPY?".into()));
        let r = e.render("Dockerfile", src);
        assert!(r.starts_with("Dockerfile:2:1: unknown instruction: COPPY (did you mean COPY?)\n"));
        assert!(r.contains("   2 | COPPY . /app\n     | ^\n"), "{r}");
    }
}
