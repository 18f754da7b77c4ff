//! `COPY/ADD --chmod`: an octal mode (`0755`) or a symbolic one
//! (`u+x,g-w,o=r`, `a+X`, `go=u`) as chmod(1) and BuildKit (BSD `setmode`
//! with a zero umask) read it. A symbolic mode is resolved per copied
//! entry against that entry's source mode; `X` adds execute to
//! directories and to files that already have an execute bit.

use std::fmt;

crate::error::module_error! {
    /// A `--chmod` value that cannot be used.
    pub enum ChmodError {}
}

/// A parsed `--chmod` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chmod {
    /// An absolute mode (`0o7777` at most).
    Octal(u32),
    /// Clauses applied in order; the original text is kept for keys and
    /// history.
    Symbolic {
        /// The text as written.
        text: String,
        /// The parsed clauses.
        clauses: Vec<Clause>,
    },
}

/// One `who op perms [op perms …]` clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    /// Bits the clause may touch (`u`: 0o4700, `g`: 0o2070, `o`: 0o007;
    /// none named: all of them).
    who: u32,
    /// `t` applies: no class was named, or `u`/`g` was.
    sticky: bool,
    /// The operations.
    ops: Vec<Op>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Op {
    op: char,
    /// `r`/`w`/`x`/`s`/`t` bits, spread over u, g and o.
    bits: u32,
    /// `X` was named.
    cond_x: bool,
    /// `u`, `g` or `o`: copy that class's current bits.
    copy: Option<char>,
}

const WHO_U: u32 = 0o4700;
const WHO_G: u32 = 0o2070;
const WHO_O: u32 = 0o0007;
const STICKY: u32 = 0o1000;

impl Chmod {
    /// Parses `--chmod`'s value; the error reads like BuildKit's.
    pub fn parse(s: &str) -> Result<Chmod, ChmodError> {
        let non_octal = || {
            ChmodError::Invalid(format!(
                "invalid chmod parameter: '{s}'. it should be octal string and between 0 and 07777"
            ))
        };
        if s.starts_with(|c: char| c.is_ascii_digit()) {
            return match u32::from_str_radix(s, 8) {
                Ok(m) if m <= 0o7777 => Ok(Chmod::Octal(m)),
                _ => Err(non_octal()),
            };
        }
        let syntax =
            || ChmodError::Invalid(format!("invalid chmod parameter: '{s}': invalid syntax"));
        let mut clauses = Vec::new();
        for part in s.split(',') {
            let mut chars = part.chars().peekable();
            let mut who = 0;
            let mut named = false;
            while let Some(&c) = chars.peek() {
                let w = match c {
                    'u' => WHO_U,
                    'g' => WHO_G,
                    'o' => WHO_O,
                    'a' => WHO_U | WHO_G | WHO_O,
                    _ => break,
                };
                who |= w;
                named = true;
                chars.next();
            }
            if !named {
                who = WHO_U | WHO_G | WHO_O;
            }
            let mut ops = Vec::new();
            while let Some(op) = chars.next() {
                if !matches!(op, '+' | '-' | '=') {
                    return Err(syntax());
                }
                let mut o = Op {
                    op,
                    bits: 0,
                    cond_x: false,
                    copy: None,
                };
                while let Some(&c) = chars.peek() {
                    match c {
                        'r' => o.bits |= 0o444,
                        'w' => o.bits |= 0o222,
                        'x' => o.bits |= 0o111,
                        'X' => o.cond_x = true,
                        's' => o.bits |= 0o6000,
                        't' => o.bits |= STICKY,
                        'u' | 'g' | 'o' if o.bits == 0 && !o.cond_x && o.copy.is_none() => {
                            o.copy = Some(c)
                        }
                        '+' | '-' | '=' => break,
                        _ => return Err(syntax()),
                    }
                    chars.next();
                }
                ops.push(o);
            }
            if ops.is_empty() {
                return Err(syntax());
            }
            clauses.push(Clause {
                who,
                sticky: !named || who & (WHO_U | WHO_G) != 0,
                ops,
            });
        }
        Ok(Chmod::Symbolic {
            text: s.to_string(),
            clauses,
        })
    }

    /// The mode an entry gets: `mode` is the source's permission bits
    /// (`0o7777` mask), `is_dir` enables `X`.
    pub fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        let clauses = match self {
            Chmod::Octal(m) => return *m,
            Chmod::Symbolic { clauses, .. } => clauses,
        };
        let orig = mode & 0o7777;
        let mut cur = orig;
        for c in clauses {
            for o in &c.ops {
                let mut mask = c.who;
                if c.sticky {
                    mask |= STICKY;
                }
                let mut bits = o.bits;
                if o.cond_x && (o.op == '-' || is_dir || orig & 0o111 != 0) {
                    bits |= 0o111;
                }
                if let Some(from) = o.copy {
                    let v = match from {
                        'u' => (cur >> 6) & 7,
                        'g' => (cur >> 3) & 7,
                        _ => cur & 7,
                    };
                    bits = (v << 6) | (v << 3) | v;
                }
                let eff = bits & mask;
                match o.op {
                    '+' => cur |= eff,
                    '-' => cur &= !eff,
                    _ => {
                        // `=` resets the named classes (never the sticky
                        // bit, as BSD's setmode) and sets what is listed.
                        cur &= !(c.who & !STICKY);
                        cur |= eff;
                    }
                }
            }
        }
        cur
    }
}

impl fmt::Display for Chmod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Chmod::Octal(m) => write!(f, "{m:o}"),
            Chmod::Symbolic { text, .. } => f.write_str(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ap(s: &str, mode: u32, dir: bool) -> u32 {
        Chmod::parse(s).expect(s).apply(mode, dir)
    }

    #[test]
    fn octal_and_errors() {
        assert_eq!(Chmod::parse("0755").unwrap(), Chmod::Octal(0o755));
        assert_eq!(ap("640", 0o777, false), 0o640);
        assert!(Chmod::parse("8").is_err());
        assert!(Chmod::parse("17777").is_err());
        assert!(Chmod::parse("u*x").is_err());
        assert!(Chmod::parse("u").is_err());
        assert!(Chmod::parse("").is_err());
    }

    #[test]
    fn symbolic_like_chmod() {
        assert_eq!(ap("u+x,g-w,o=r", 0o664, false), 0o744);
        assert_eq!(ap("a+X", 0o644, false), 0o644);
        assert_eq!(ap("a+X", 0o744, false), 0o755);
        assert_eq!(ap("a+X", 0o700, true), 0o711);
        assert_eq!(ap("+x", 0o600, false), 0o711);
        assert_eq!(ap("go=u", 0o640, false), 0o666);
        assert_eq!(ap("u=rwx,go=", 0o644, false), 0o700);
        assert_eq!(ap("u+s,+t", 0o755, false), 0o5755);
        assert_eq!(ap("o-rwx", 0o777, true), 0o770);
        assert_eq!(ap("g+w-r", 0o644, false), 0o624);
        assert_eq!(ap("a-X", 0o755, false), 0o644);
    }
}
