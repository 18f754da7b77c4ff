//! HTTP rules shared by every client kiln has — registries, token servers,
//! `ADD <url>` and remote build contexts — and the timeouts handed to git:
//!
//! * **timeouts**: a connect timeout and an idle timeout (no byte read or
//!   written for that long ends the request), from `KILN_CONNECT_TIMEOUT`
//!   and `KILN_IDLE_TIMEOUT` (seconds, or with a `ms`/`s`/`m` suffix;
//!   defaults [`DEFAULT_CONNECT_TIMEOUT`] and [`DEFAULT_IDLE_TIMEOUT`]),
//!   and for small registry requests (manifests, tokens) a total bound,
//!   `KILN_REQUEST_TIMEOUT` ([`DEFAULT_REQUEST_TIMEOUT`]); an `ADD <url>`
//!   download, a remote context or a git fetch has a total bound too,
//!   `KILN_FETCH_TIMEOUT` ([`DEFAULT_FETCH_TIMEOUT`]).
//! * **http(s) only**: redirects are followed here, not inside the HTTP
//!   library, at most [`MAX_REDIRECTS`] of them, and only to `http://` or
//!   `https://` URLs; anything else (`file:///…`) is a clear error.
//! * **credentials only for the host that asked for them**: a redirect or
//!   an upload `Location` on another origin (scheme, host, port) gets no
//!   `Authorization` header.

use std::time::Duration;

pub use url::Url;

/// Sends `req` (with `body`, if any) on a thread of its own and waits at most `limit` for the response's status line and
/// headers, however slowly they come; the body is then read under the
/// agent's idle timeout, each read (a ureq deadline would replace the
/// idle timeout of every read with the time left). On time out the
/// request's thread is left behind, blocked on a socket nothing reads: it
/// ends with the process, or when the server stops. Cancellation is
/// checked every 50 ms. (The result is `ureq::Request::call`'s.)
pub fn call_within(
    req: ureq::Request,
    body: Option<Vec<u8>>,
    limit: Duration,
    cancel: Option<&tokio_util::sync::CancellationToken>,
) -> Result<ureq::Response, ureq::Error> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("kiln-http".into())
        .spawn(move || {
            let _ = tx.send(match body {
                Some(b) => req.send_bytes(&b),
                None => req.call(),
            });
        })
        .map_err(ureq::Error::from)?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(ureq::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "timed out: no response within {} s (KILN_REQUEST_TIMEOUT)",
                    limit.as_secs_f64()
                ),
            )));
        }
        if cancel.is_some_and(|c| c.is_cancelled()) {
            return Err(ureq::Error::from(std::io::Error::other("cancelled")));
        }
        match rx.recv_timeout(left.min(Duration::from_millis(50))) {
            Ok(r) => return r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(ureq::Error::from(std::io::Error::other(
                    "the request's thread ended without an answer",
                )))
            }
        }
    }
}

/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default idle timeout: the longest wait for the next byte of a request
/// or a response.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The most redirects one request follows.
pub const MAX_REDIRECTS: usize = 10;

/// Default total time of a small registry request (a manifest, a token):
/// from sending it to the last byte of its body, however slowly the
/// bytes come (`KILN_REQUEST_TIMEOUT`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Default total time of an `ADD <url>` download, a remote build context
/// or a git fetch, however slowly the bytes come (`KILN_FETCH_TIMEOUT`).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// A URL, redirect or timeout setting that kiln will not use.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// `KILN_CONNECT_TIMEOUT` / `KILN_IDLE_TIMEOUT` does not parse.
    #[error("{name}={value:?}: expected a positive duration such as 30, 30s, 500ms or 2m")]
    BadTimeout {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
    },
    /// Not a URL.
    #[error("invalid URL {url:?}: {source}")]
    InvalidUrl {
        /// As given.
        url: String,
        /// Why.
        #[source]
        source: url::ParseError,
    },
    /// Neither `http://` nor `https://`.
    #[error("{url}: only http:// and https:// URLs are fetched, not {scheme}://")]
    Scheme {
        /// As given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// A URL without a host.
    #[error("{0}: no host")]
    NoHost(String),
    /// A `Location` that is not a URL.
    #[error("{from} redirects to an invalid URL {location:?}: {source}")]
    BadRedirect {
        /// The URL that redirected.
        from: String,
        /// Its `Location`.
        location: String,
        /// Why.
        #[source]
        source: url::ParseError,
    },
    /// A redirect to another scheme than http(s).
    #[error("{from} redirects to {to}: only http:// and https:// redirects are followed")]
    RedirectScheme {
        /// The URL that redirected.
        from: String,
        /// Where to.
        to: String,
    },
    /// More than [`MAX_REDIRECTS`] hops.
    #[error("{0}: more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects(String),
}

/// Connect and idle timeouts of network clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetTimeouts {
    /// Longest wait for a TCP (and TLS) connection.
    pub connect: Duration,
    /// Longest time without a byte read or written.
    pub idle: Duration,
    /// Longest total time of a small request (manifest, token), body
    /// included: a server that sends one byte a second never trips the
    /// idle timeout.
    pub request: Duration,
    /// Longest total time of a download or git fetch of a build source.
    pub fetch: Duration,
}

impl Default for NetTimeouts {
    fn default() -> Self {
        NetTimeouts {
            connect: DEFAULT_CONNECT_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
            request: DEFAULT_REQUEST_TIMEOUT,
            fetch: DEFAULT_FETCH_TIMEOUT,
        }
    }
}

/// Parses a duration: `30` (seconds), `30s`, `500ms`, `2m`; zero is refused.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return None;
    }
    Some(Duration::from_secs_f64(secs))
}

impl NetTimeouts {
    /// The timeouts from `KILN_CONNECT_TIMEOUT`, `KILN_IDLE_TIMEOUT` and
    /// `KILN_REQUEST_TIMEOUT`,
    /// defaults where unset; a value that does not parse is an error.
    pub fn from_env() -> Result<NetTimeouts, HttpError> {
        let get = |name: &'static str, default: Duration| match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => {
                parse_duration(&v).ok_or(HttpError::BadTimeout { name, value: v })
            }
            _ => Ok(default),
        };
        Ok(NetTimeouts {
            connect: get("KILN_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)?,
            idle: get("KILN_IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT)?,
            request: get("KILN_REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT)?,
            fetch: get("KILN_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT)?,
        })
    }

    /// An agent builder with these timeouts that follows no redirects
    /// (see [`follow`]).
    pub fn agent_builder(&self) -> ureq::AgentBuilder {
        ureq::AgentBuilder::new()
            .timeout_connect(self.connect)
            .timeout_read(self.idle)
            .timeout_write(self.idle)
            .redirects(0)
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
    }

    /// Settings that give git the same bounds (`-c` arguments): a transfer
    /// slower than 1 byte/s for the idle time is aborted.
    pub fn git_config(&self) -> Vec<String> {
        let idle = self.idle.as_secs().max(1);
        vec![
            "-c".into(),
            "http.lowSpeedLimit=1".into(),
            "-c".into(),
            format!("http.lowSpeedTime={idle}"),
        ]
    }

    /// Environment for git's ssh transport (`GIT_SSH_COMMAND`): none of
    /// the host's ssh configuration, key files or known hosts (read or
    /// written: host keys are not checked, as BuildKit's git does without
    /// known hosts), never a prompt, a connect timeout and keep-alives
    /// that end a silent connection. Keys come only from an agent the
    /// caller names (`SSH_AUTH_SOCK`).
    pub fn git_ssh_command(&self) -> String {
        let connect = self.connect.as_secs().max(1);
        let alive = (self.idle.as_secs() / 3).max(1);
        format!(
            "ssh -F /dev/null -o BatchMode=yes -o IdentityFile=none \
             -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no \
             -o ConnectTimeout={connect} -o ServerAliveInterval={alive} -o ServerAliveCountMax=3"
        )
    }
}

/// Whether a transport error's text says it timed out (ureq reports a
/// socket timeout as "timed out" or, for reads, "Resource temporarily
/// unavailable"/"would block").
pub fn is_timeout_message(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    d.contains("timed out")
        || d.contains("timeout")
        || d.contains("resource temporarily unavailable")
        || d.contains("would block")
}

/// Parses `url` and checks that it is `http://` or `https://` with a host.
pub fn check_url(url: &str) -> Result<Url, HttpError> {
    let u = Url::parse(url).map_err(|source| HttpError::InvalidUrl {
        url: url.to_string(),
        source,
    })?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(HttpError::Scheme {
            url: url.to_string(),
            scheme: u.scheme().to_string(),
        });
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(HttpError::NoHost(url.to_string()));
    }
    Ok(u)
}

/// Whether `a` and `b` are the same origin: scheme, host and port.
pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Where a response redirects to, if it is a redirect a GET or HEAD
/// follows (301, 302, 303, 307, 308 with a `Location`): the target URL,
/// checked by [`check_url`].
pub fn redirect_target(from: &Url, resp: &ureq::Response) -> Result<Option<Url>, HttpError> {
    if !matches!(resp.status(), 301 | 302 | 303 | 307 | 308) {
        return Ok(None);
    }
    let Some(loc) = resp.header("Location") else {
        return Ok(None);
    };
    let to = from.join(loc).map_err(|source| HttpError::BadRedirect {
        from: from.to_string(),
        location: loc.to_string(),
        source,
    })?;
    if !matches!(to.scheme(), "http" | "https") || to.host_str().is_none_or(str::is_empty) {
        return Err(HttpError::RedirectScheme {
            from: from.to_string(),
            to: to.to_string(),
        });
    }
    Ok(Some(to))
}

/// A GET or HEAD of `url` that follows redirects by kiln's rules:
/// `request(url, same_origin_as_first)` makes each request (with
/// credentials only when asked for the first URL's origin). Statuses of
/// 400 and above come back as `ureq::Error::Status`, as ureq returns them
/// (boxed: the error is large).
pub fn follow(
    url: &str,
    mut request: impl FnMut(&Url, bool) -> Result<ureq::Response, Box<ureq::Error>>,
) -> Result<Result<ureq::Response, Box<ureq::Error>>, HttpError> {
    let first = check_url(url)?;
    let mut cur = first.clone();
    for _ in 0..=MAX_REDIRECTS {
        let resp = match request(&cur, same_origin(&first, &cur)) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        match redirect_target(&cur, &resp)? {
            Some(next) => cur = next,
            None => return Ok(Ok(resp)),
        }
    }
    Err(HttpError::TooManyRedirects(url.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("1h"), None);
        assert_eq!(parse_duration("x"), None);
    }

    fn redirect(to: &str) -> ureq::Response {
        format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\n\r\n")
            .parse()
            .unwrap()
    }

    #[test]
    fn redirects_are_followed_by_kiln_rules() {
        let ok = || {
            "HTTP/1.1 200 OK\r\n\r\nx"
                .parse::<ureq::Response>()
                .unwrap()
        };
        // http(s) only.
        let r = follow("http://a.example/x", |_, _| {
            Ok(redirect("file:///etc/passwd"))
        });
        assert!(matches!(r.unwrap_err(), HttpError::RedirectScheme { .. }));
        // A relative Location stays on the origin; another host is not the
        // first origin (no credentials there).
        let mut seen = Vec::new();
        let r = follow("http://a.example/x", |u, first| {
            seen.push((u.to_string(), first));
            Ok(match u.path() {
                "/x" => redirect("/y"),
                "/y" => redirect("https://b.example/z"),
                _ => ok(),
            })
        });
        assert!(r.unwrap().is_ok());
        assert_eq!(
            seen,
            vec![
                ("http://a.example/x".to_string(), true),
                ("http://a.example/y".to_string(), true),
                ("https://b.example/z".to_string(), false),
            ]
        );
        // A loop ends.
        let r = follow("http://a.example/x", |_, _| Ok(redirect("/x")));
        assert!(matches!(r.unwrap_err(), HttpError::TooManyRedirects(_)));
        // The first URL is checked too.
        assert!(follow("file:///etc/passwd", |_, _| Ok(ok())).is_err());
    }

    #[test]
    fn urls_and_origins() {
        assert!(check_url("file:///etc/passwd").is_err());
        assert!(check_url("ftp://h/x").is_err());
        assert!(check_url("http://h:1/x").is_ok());
        let a = Url::parse("https://r.example/v2/").unwrap();
        assert!(same_origin(
            &a,
            &Url::parse("https://r.example:443/x").unwrap()
        ));
        assert!(!same_origin(&a, &Url::parse("http://r.example/x").unwrap()));
        assert!(!same_origin(
            &a,
            &Url::parse("https://r.example:444/x").unwrap()
        ));
        assert!(!same_origin(
            &a,
            &Url::parse("https://evil.example/x").unwrap()
        ));
    }
}
