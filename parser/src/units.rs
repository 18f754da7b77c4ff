//! Human sizes (`512m`, `2GiB`, `10GB`) as docker/go-units reads them.
//!
//! The one size parser of kiln: `RUN --mount=type=tmpfs,size=`, `build
//! --memory` and `prune --keep-storage` all read sizes here. Docker's CLI
//! and buildx read all three with `RAMInBytes` (`opts.MemBytes`), where a
//! `k` is 1024 bytes whatever the spelling (`k`, `kb`, `KiB`);
//! [`from_human_size`] is go-units' decimal `FromHumanSize`, for a flag that
//! docker reads that way.
//!
//! ```
//! use kiln_parser::units::{from_human_size, ram_in_bytes};
//!
//! assert_eq!(ram_in_bytes("1k").unwrap(), 1024);
//! assert_eq!(ram_in_bytes("1.5 GB").unwrap(), 3 << 29);
//! assert_eq!(from_human_size("1k").unwrap(), 1000);
//! assert!(ram_in_bytes("lots").is_err());
//! ```

/// A size that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size: {0:?} (e.g. 512m, 2g, 1024)")]
pub struct SizeError(pub String);

/// go-units `RAMInBytes`: binary multiples (`k` = `kb` = `kib` = 1024).
pub fn ram_in_bytes(s: &str) -> Result<u64, SizeError> {
    parse(s, 1024.0)
}

/// go-units `FromHumanSize`: decimal multiples (`k` = `kb` = `kib` = 1000).
pub fn from_human_size(s: &str) -> Result<u64, SizeError> {
    parse(s, 1000.0)
}

/// A byte count in decimal units, as go-units' `HumanSize` scales it:
/// divided by 1000 while it is at least 1000, with its unit (`B`, `kB`,
/// `MB`, `GB`, `TB`, `PB`). The callers choose the precision (docker's
/// `images` and `system df`, BuildKit's progress differ).
///
/// ```
/// assert_eq!(kiln_parser::units::decimal_units(999), (999.0, "B"));
/// assert_eq!(kiln_parser::units::decimal_units(4_260_000), (4.26, "MB"));
/// ```
pub fn decimal_units(n: u64) -> (f64, &'static str) {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    (v, UNITS[u])
}

/// go-units `parseSize`: a number, an optional space, then an optional
/// suffix `b`, or one of `k m g t p` optionally followed by `b` or `ib`
/// (any case). Outer whitespace is ignored; negative, non-finite and
/// too-large values are errors.
fn parse(s: &str, base: f64) -> Result<u64, SizeError> {
    let bad = || SizeError(s.to_string());
    let t = s.trim();
    let sep = t
        .rfind(|c: char| c.is_ascii_digit() || c == '.' || c == ' ')
        .ok_or_else(bad)?;
    let (num, sfx) = if t.as_bytes()[sep] == b' ' {
        (&t[..sep], &t[sep + 1..])
    } else {
        t.split_at(sep + 1)
    };
    // Go's ParseFloat: digits, one dot, an optional sign and exponent; never
    // `inf`/`nan` (no digit-free spelling gets here past `sep`).
    if !num.bytes().any(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    let sfx = sfx.to_ascii_lowercase();
    let mult = match sfx.as_bytes() {
        [] | [b'b'] => 1.0,
        [p] | [p, b'b'] | [p, b'i', b'b'] => {
            let exp = match p {
                b'k' => 1,
                b'm' => 2,
                b'g' => 3,
                b't' => 4,
                b'p' => 5,
                _ => return Err(bad()),
            };
            base.powi(exp)
        }
        _ => return Err(bad()),
    };
    let v = n * mult;
    if v >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_in_bytes_is_binary_for_every_spelling() {
        for (s, v) in [
            ("0", 0),
            ("1024", 1024),
            ("1k", 1024),
            ("1K", 1024),
            ("1kb", 1024),
            ("1KiB", 1024),
            ("512m", 512 << 20),
            ("2G", 2 << 30),
            ("2 GB", 2 << 30),
            ("1.5g", 3 << 29),
            ("1t", 1 << 40),
            ("1p", 1 << 50),
            ("10b", 10),
            (" 64k ", 64 << 10),
        ] {
            assert_eq!(ram_in_bytes(s), Ok(v), "{s}");
        }
    }

    #[test]
    fn from_human_size_is_decimal() {
        assert_eq!(from_human_size("1k"), Ok(1000));
        assert_eq!(from_human_size("1KiB"), Ok(1000));
        assert_eq!(from_human_size("1.5GB"), Ok(1_500_000_000));
    }

    #[test]
    fn malformed_sizes_are_errors() {
        for s in [
            "", "lots", "k", "-1k", "1x", "1kk", "1kbb", "1ki", "1bb", "1e999", "inf", "nan",
            "1 2k", "1..2",
        ] {
            assert!(ram_in_bytes(s).is_err(), "{s:?}");
        }
        assert!(ram_in_bytes("99999999999p").is_err(), "overflow");
    }
}
