//! Remote sources of `ADD` and of build contexts: http(s) URLs and git
//! repositories, fetched into a scratch directory that COPY's selection
//! then reads like any other source.
//!
//! * **http(s)**: one GET (ureq over rustls). The file is named after the
//!   URL path's last element (`__unnamed__` when there is none, as
//!   BuildKit), mode 0600, its mtime the `Last-Modified` header; a
//!   `--checksum=sha256:…` is verified after the download. The step's key
//!   then covers the content (its digest), so an unchanged download is a
//!   cache hit.
//! * **git**: `https://host/repo.git#ref:subdir`, `git@host:repo.git#ref`,
//!   `git://…` and `ssh://…` through the `git` CLI (a full clone, so dumb
//!   HTTP servers work too), checked out at `ref` (branch, tag or commit;
//!   default HEAD); `.git` is removed unless `--keep-git-dir`. A checksum
//!   is a prefix of the commit ID.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

crate::error::module_error! {
    /// Why fetching a URL or git source failed.
    pub enum FetchError {}
}

/// Does this `ADD` source name a git repository (BuildKit's rules)?
pub fn is_git_url(s: &str) -> bool {
    if s.starts_with("git@") || s.starts_with("git://") || s.starts_with("ssh://") {
        return true;
    }
    if s.starts_with("github.com/") {
        return true;
    }
    if s.starts_with("http://") || s.starts_with("https://") {
        let base = s.split('#').next().unwrap_or(s);
        return base.ends_with(".git") || base.ends_with(".git/") || s.contains(".git#");
    }
    false
}

/// Does this `ADD` source name an http(s) URL (and not a git repository)?
pub fn is_http_url(s: &str) -> bool {
    (s.starts_with("http://") || s.starts_with("https://")) && !is_git_url(s)
}

/// A downloaded or cloned source: a scratch directory (removed on drop)
/// and the path inside it to select.
#[derive(Debug)]
pub struct Fetched {
    /// Keeps the files until the step has copied them.
    pub dir: tempfile::TempDir,
    /// What to select in `dir`: `/NAME` for a URL, `/` for a repository.
    pub select: String,
    /// What identifies the source besides its content (the commit of a
    /// repository), for the step's key.
    pub identity: String,
    /// Whether the key must also cover the fetched content (a download);
    /// a repository is keyed by its commit alone (a kept `.git` differs
    /// from clone to clone).
    pub hash_content: bool,
}

/// An agent for one URL's host: kiln's timeouts, and the TLS roots every
/// kiln client trusts (the system store, `SSL_CERT_FILE`/`SSL_CERT_DIR`,
/// the host's `certs.d` CAs; see [`kiln_registry::tls`]).
fn http_agent(url: &kiln_registry::http::Url) -> Result<ureq::Agent, FetchError> {
    let t = kiln_registry::http::NetTimeouts::from_env().map_err(FetchError::src)?;
    let mut b = t.agent_builder();
    if url.scheme() == "https" {
        let host = kiln_registry::tls::url_host(url).unwrap_or_default();
        let cfg = kiln_registry::RegistryConfig::load(&[]).map_err(FetchError::src)?;
        let tls = kiln_registry::tls::client_config(&cfg, &host).map_err(FetchError::src)?;
        b = b.tls_config(tls);
    }
    Ok(b.build())
}

/// A transport error's text, with where kiln looks for CAs when the
/// server's certificate was not trusted.
fn transport_error(e: &ureq::Error) -> String {
    let s = e.to_string();
    match kiln_registry::tls::untrusted_hint(&s) {
        Some(h) => format!("{s} ({h})"),
        None => s,
    }
}

/// The file name BuildKit gives a URL download.
pub fn url_file_name(url: &str) -> String {
    let path = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(url)
        .split(['?', '#'])
        .next()
        .unwrap_or_default();
    let path = path.split_once('/').map(|(_, p)| p).unwrap_or("");
    match path.trim_end_matches('/').rsplit('/').next() {
        Some(b) if !b.is_empty() && b != "." && b != ".." => b.to_string(),
        _ => "__unnamed__".to_string(),
    }
}

/// Parses `sha256:HEX` (`--checksum`).
fn parse_sha256(checksum: &str) -> Result<String, FetchError> {
    match checksum.split_once(':') {
        Some(("sha256", hex)) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(hex.to_ascii_lowercase())
        }
        _ => Err(FetchError::Invalid(format!(
            "invalid checksum {checksum:?}: expected sha256:<64 hex digits>"
        ))),
    }
}

/// Downloads `url` into a fresh directory under `scratch`, to `/NAME`.
pub fn fetch_http(
    url: &str,
    scratch: &Path,
    checksum: Option<&str>,
) -> Result<Fetched, FetchError> {
    fetch_http_inner(url, scratch, checksum).map_err(redacted)
}

/// `e` with the credentials of every URL in its text redacted (see
/// [`redact_urls`]): the HTTP client's and git's own messages name the
/// URL as given.
fn redacted(e: FetchError) -> FetchError {
    let mut text = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(c) = cur {
        let t = c.to_string();
        if !text.ends_with(&t) {
            text = format!("{text}: {t}");
        }
        cur = c.source();
    }
    let clean = redact_urls(&text);
    if clean == text {
        e
    } else {
        FetchError::Invalid(clean)
    }
}

fn fetch_http_inner(
    url: &str,
    scratch: &Path,
    checksum: Option<&str>,
) -> Result<Fetched, FetchError> {
    let want = checksum.map(parse_sha256).transpose()?;
    let started = std::time::Instant::now();
    let shown = redact_urls(url);
    // The response headers within `KILN_REQUEST_TIMEOUT` and the whole
    // download within `KILN_FETCH_TIMEOUT`: a server trickling its
    // headers or its body a byte a minute never trips the idle timeout
    // (which still ends a read that waits too long).
    let timeouts = kiln_registry::http::NetTimeouts::from_env().map_err(FetchError::src)?;
    let limit = timeouts.fetch;
    let dir = tempfile::Builder::new()
        .prefix("add-url-")
        .tempdir_in(scratch)
        .map_err(FetchError::ctx("scratch dir"))?;
    let name = url_file_name(url);
    // Redirects are followed by kiln's rules: http(s) only (a redirect to
    // `file:///…` is an error, not a panic inside the HTTP client). Each
    // hop trusts the CAs of its own host.
    let mut agents: Vec<(String, ureq::Agent)> = Vec::new();
    let mut setup_err: Option<FetchError> = None;
    let followed = kiln_registry::http::follow(url, |u, _| {
        let key = format!(
            "{}://{}",
            u.scheme(),
            kiln_registry::tls::url_host(u).unwrap_or_default()
        );
        let agent = match agents.iter().find(|(k, _)| *k == key) {
            Some((_, a)) => a.clone(),
            None => {
                let a = http_agent(u).map_err(|e| {
                    let b = Box::new(ureq::Error::from(io::Error::other(e.to_string())));
                    setup_err = Some(e);
                    b
                })?;
                agents.push((key, a.clone()));
                a
            }
        };
        let req = agent.request_url("GET", u);
        let wait = timeouts
            .request
            .min(limit.saturating_sub(started.elapsed()));
        kiln_registry::http::call_within(req, None, wait, None).map_err(Box::new)
    })
    .map_err(|e| FetchError::Invalid(format!("failed to load {shown}: {e}")))?;
    if let Some(e) = setup_err {
        return Err(FetchError::ctx(format!("failed to load {shown}"))(e));
    }
    let resp = match followed.map_err(|e| *e) {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            return Err(FetchError::Invalid(format!(
                "failed to load {shown}: invalid response status {code} {}",
                r.status_text()
            )))
        }
        Err(e) => {
            return Err(FetchError::Invalid(format!(
                "failed to load {shown}: {}",
                transport_error(&e)
            )))
        }
    };
    let last_modified = resp.header("Last-Modified").and_then(parse_http_date);
    let path = dir.path().join(&name);
    let mut out =
        fs::File::create(&path).map_err(FetchError::ctx(format!("{}", path.display())))?;
    let mut reader = resp.into_reader();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        if started.elapsed() > limit {
            return Err(FetchError::Invalid(format!(
                "failed to load {shown}: timed out after {}s (KILN_FETCH_TIMEOUT)",
                limit.as_secs()
            )));
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FetchError::Invalid(format!("failed to load {shown}: {e}"))),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(FetchError::ctx(format!("{}", path.display())))?;
    }
    out.sync_all()
        .map_err(FetchError::ctx(format!("{}", path.display())))?;
    drop(out);
    let got = hex::encode(hasher.finalize());
    if let Some(w) = want {
        if w != got {
            return Err(FetchError::Invalid(format!(
                "digest mismatch for {shown}: --checksum=sha256:{w} but the download is sha256:{got}"
            )));
        }
    }
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .map_err(FetchError::ctx(format!("{}", path.display())))?;
    }
    if let Some(t) = last_modified {
        crate::fsview::set_mtime(&path, t, 0, false).map_err(FetchError::src)?;
    }
    Ok(Fetched {
        dir,
        select: format!("/{name}"),
        identity: format!("sha256:{got}"),
        hash_content: true,
    })
}

/// An RFC 7231 IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) as Unix
/// seconds.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let mut it = s.split_whitespace();
    let _weekday = it.next()?;
    let day: i64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + m * 60 + sec)
}

/// A git source split into remote, ref and subdirectory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRef {
    /// What `git clone` is given.
    pub remote: String,
    /// Branch, tag or commit (`None`: the remote's HEAD).
    pub reference: Option<String>,
    /// Directory inside the repository to use as the root.
    pub subdir: Option<String>,
}

/// Parses `REMOTE[#REF[:SUBDIR]]`.
pub fn parse_git_url(s: &str) -> Result<GitRef, FetchError> {
    let (remote, frag) = match s.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (s, None),
    };
    let mut remote = remote.to_string();
    if remote.starts_with("github.com/") {
        remote = format!("https://{remote}");
    }
    let (reference, subdir) = match frag {
        None => (None, None),
        Some(f) => {
            // BuildKit also takes `#key=value,…` (ref=, subdir=).
            if f.contains('=') {
                let mut r = None;
                let mut d = None;
                for kv in f.split(',') {
                    match kv.split_once('=') {
                        Some(("ref", v)) => r = Some(v.to_string()),
                        Some(("subdir", v)) => d = Some(v.to_string()),
                        _ => {
                            return Err(FetchError::Invalid(format!(
                                "unsupported git fragment {kv:?} in {s}"
                            )))
                        }
                    }
                }
                (r, d)
            } else {
                let (r, d) = match f.split_once(':') {
                    Some((r, d)) => (r, Some(d.to_string())),
                    None => (f, None),
                };
                ((!r.is_empty()).then(|| r.to_string()), d)
            }
        }
    };
    let subdir = subdir
        .map(|d| d.trim_matches('/').to_string())
        .filter(|d| !d.is_empty());
    if let Some(d) = &subdir {
        if d.split('/').any(|c| c == "..") {
            return Err(FetchError::Invalid(format!(
                "git subdir {d:?} leaves the repository"
            )));
        }
    }
    Ok(GitRef {
        remote,
        reference,
        subdir,
    })
}

/// Settings every git run of kiln gets (`-c` arguments, before the
/// command's own): only the network transports (`file`, `ext`, `fd` and
/// the rest are refused, for a repository's submodules too), no
/// credential helper, no hooks, no file-system monitor.
const GIT_LOCKDOWN: &[&str] = &[
    "-c",
    "protocol.allow=never",
    "-c",
    "protocol.https.allow=always",
    "-c",
    "protocol.http.allow=always",
    "-c",
    "protocol.ssh.allow=always",
    "-c",
    "protocol.git.allow=always",
    "-c",
    "credential.helper=",
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
];

/// Variables of kiln's environment a git run keeps: the path, the
/// proxies and the CA bundle git is told to use. Nothing else — no
/// `HOME` (git's and curl's config, `.git-credentials`, `.netrc`), no
/// `SSH_AUTH_SOCK`, no `GIT_*` — reaches git, as BuildKit runs it: a
/// Dockerfile names the repository, so it gets none of the credentials
/// of the user running kiln but the SSH agent given with `--ssh`.
const GIT_ENV_KEPT: &[&str] = &[
    "PATH",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "GIT_SSL_CAINFO",
];

/// Where a git fetch may authenticate: the SSH agent socket the build was
/// given (`--ssh default=…`), else nowhere.
#[derive(Debug, Clone, Default)]
pub struct GitAuth {
    /// The SSH agent socket for ssh remotes.
    pub ssh_agent: Option<PathBuf>,
}

fn git(dir: &Path, args: &[&str], auth: &GitAuth) -> Result<String, FetchError> {
    // The same connect and idle bounds as every other fetch: http(s)
    // transfers slower than 1 byte/s for the idle time are aborted, ssh
    // gets a connect timeout and keep-alives.
    let t = kiln_registry::http::NetTimeouts::from_env().map_err(FetchError::src)?;
    let mut cmd = Command::new("git");
    cmd.env_clear();
    for k in GIT_ENV_KEPT {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    }
    cmd.arg("-C")
        .arg(dir)
        .args(GIT_LOCKDOWN)
        .args(t.git_config())
        .args(args)
        .env("HOME", "/dev/null")
        .env("LC_ALL", "C")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_SSH_COMMAND", t.git_ssh_command());
    if let Some(sock) = &auth.ssh_agent {
        cmd.env("SSH_AUTH_SOCK", sock);
    }
    let what = args.first().copied().unwrap_or_default();
    let out = run_bounded(cmd, t.fetch).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            FetchError::invalid("git sources need the git command (apt-get install git)")
        } else {
            FetchError::ctx("running git")(e)
        }
    })?;
    if out.timed_out {
        return Err(FetchError::Invalid(format!(
            "git {what}: stopped after {}s (KILN_FETCH_TIMEOUT): {}",
            t.fetch.as_secs(),
            redact_urls(String::from_utf8_lossy(&out.stderr).trim())
        )));
    }
    if !out.status.success() {
        return Err(FetchError::Invalid(format!(
            "git {what}: {}",
            redact_urls(String::from_utf8_lossy(&out.stderr).trim())
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What [`run_bounded`] kept of a command's run.
struct Bounded {
    status: std::process::ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    timed_out: bool,
}

/// Bytes of a command's stdout, and of its stderr, kept (the rest is read
/// and dropped: a server's endless `remote:` lines cost no memory).
const OUTPUT_KEPT: u64 = 1 << 20;

/// Runs `cmd` in a process group of its own, for at most `limit`: after
/// that the whole group (git and the transports it started) is killed.
fn run_bounded(mut cmd: Command, limit: std::time::Duration) -> io::Result<Bounded> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let keep = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(mut r) = r {
                let _ = (&mut r).take(OUTPUT_KEPT).read_to_end(&mut kept);
                let _ = io::copy(&mut r, &mut io::sink());
            }
            kept
        })
    };
    let out = keep(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = keep(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let deadline = std::time::Instant::now() + limit;
    let pgid = child.id() as libc::pid_t;
    let mut timed_out = false;
    // Until the leader is reaped its pid (the group's id) cannot be
    // reused, so the group is signalled only before `wait`: once the
    // leader has ended (seen without reaping it) or the time is up, the
    // rest of the group (a transport left behind would hold the pipes
    // open) is killed, then the leader is reaped.
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value to be written.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child, WNOWAIT: nothing is reaped.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pgid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: reading the pid field waitid filled in (0: not ended).
        let ended = r != 0 || unsafe { info.si_pid() } != 0;
        if !ended && std::time::Instant::now() >= deadline {
            timed_out = true;
        }
        if ended || timed_out {
            // SAFETY: signalling the group our unreaped child leads.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = child.wait()?;
    Ok(Bounded {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        timed_out,
    })
}

/// git's CA settings for an https `remote` (`-c http.sslCAInfo=FILE`):
/// git reads the system bundle but neither `SSL_CERT_FILE`/`SSL_CERT_DIR`
/// nor kiln's certs.d, so when either applies, the same roots as every
/// other kiln client go to a bundle under `dir` (see
/// [`kiln_registry::tls::pem_bundle`]). None when git's own
/// `GIT_SSL_CAINFO` is set, or the defaults do.
fn git_ca_args(remote: &str, dir: &Path) -> Result<Vec<String>, FetchError> {
    if !remote.starts_with("https://") || std::env::var_os("GIT_SSL_CAINFO").is_some() {
        return Ok(Vec::new());
    }
    let Some(host) = kiln_registry::http::Url::parse(remote)
        .ok()
        .and_then(|u| kiln_registry::tls::url_host(&u))
    else {
        return Ok(Vec::new());
    };
    let cfg = kiln_registry::RegistryConfig::load(&[]).map_err(FetchError::src)?;
    let Some(pem) = kiln_registry::tls::pem_bundle(&cfg, &host).map_err(FetchError::src)? else {
        return Ok(Vec::new());
    };
    let file = dir.join("ca-bundle.pem");
    fs::write(&file, pem).map_err(FetchError::ctx(format!("{}", file.display())))?;
    Ok(vec![
        "-c".into(),
        format!("http.sslCAInfo={}", file.display()),
    ])
}

/// `text` with the authority of every URL in it (`scheme://AUTHORITY/…`)
/// passed through `f(scheme in lower case, authority, out)`.
fn rewrite_authorities(text: &str, f: impl Fn(&str, &str, &mut String)) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let scheme_start = rest[..i]
            .rfind(|c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '-' && c != '.')
            .map_or(0, |p| p + 1);
        let scheme = rest[scheme_start..i].to_ascii_lowercase();
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '\'' | '"') || c.is_whitespace())
            .unwrap_or(tail.len());
        f(&scheme, &tail[..end], &mut out);
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `text` with the user-info of every URL in it (`scheme://user:pass@`)
/// replaced by `xxxxx`, as BuildKit shows them: a token in a git or
/// http(s) URL never reaches a message or a log.
pub fn redact_urls(text: &str) -> String {
    rewrite_authorities(text, |_, authority, out| match authority.rfind('@') {
        Some(at) => {
            out.push_str("xxxxx");
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    })
}

/// `text` with the user-info of its http(s) URLs removed (`https://u:t@h`
/// → `https://h`): what a kept `.git`'s config says of its remotes. An
/// ssh URL's user (`ssh://git@host`) is a login name, not a secret, and
/// stays.
fn without_http_credentials(text: &str) -> String {
    rewrite_authorities(text, |scheme, authority, out| match authority.rfind('@') {
        Some(at) if scheme == "http" || scheme == "https" => out.push_str(&authority[at + 1..]),
        _ => out.push_str(authority),
    })
}

/// Removes the credentials of http(s) URLs from every `config` file of a
/// kept `.git` (the repository's and its submodules' under `modules/`).
/// The directory is git's own work in kiln's scratch directory; links
/// are not followed.
fn strip_http_credentials(git_dir: &Path) -> io::Result<()> {
    let mut todo = vec![git_dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let t = e.file_type()?;
            let p = e.path();
            if t.is_dir() {
                todo.push(p);
            } else if t.is_file() && e.file_name() == "config" {
                let text = fs::read_to_string(&p)?;
                let clean = without_http_credentials(&text);
                if clean != text {
                    use std::os::unix::fs::OpenOptionsExt;
                    fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&p)?
                        .write_all(clean.as_bytes())?;
                }
            }
        }
    }
    Ok(())
}

/// A subdirectory of a checkout (`#ref:subdir`) is a directory of the
/// repository: every component a real directory, no link — not a link
/// out of the checkout, as BuildKit refuses it.
fn check_subdir(repo: &Path, subdir: &str, url: &str) -> Result<(), FetchError> {
    let mut at = repo.to_path_buf();
    for c in subdir.split('/').filter(|c| !c.is_empty() && *c != ".") {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(FetchError::Invalid(format!(
                "failed to fetch {}: subdirectory {subdir} is not a directory of the repository",
                redact_urls(url)
            )))
            }
            Err(_) => {
                return Err(FetchError::Invalid(format!(
                    "failed to fetch {}: subdirectory {subdir} not found in the repository",
                    redact_urls(url)
                )))
            }
        }
    }
    Ok(())
}

/// Clones `url` into a fresh directory under `scratch`; the selection is
/// the checked-out tree (or its subdirectory). git runs with none of the
/// host's git or ssh configuration and credentials but `auth`'s.
pub fn fetch_git(
    url: &str,
    scratch: &Path,
    keep_git_dir: bool,
    checksum: Option<&str>,
    auth: &GitAuth,
) -> Result<Fetched, FetchError> {
    fetch_git_inner(url, scratch, keep_git_dir, checksum, auth).map_err(redacted)
}

fn fetch_git_inner(
    url: &str,
    scratch: &Path,
    keep_git_dir: bool,
    checksum: Option<&str>,
    auth: &GitAuth,
) -> Result<Fetched, FetchError> {
    let r = parse_git_url(url)?;
    let shown = redact_urls(url);
    let url = shown.as_str();
    let dir = tempfile::Builder::new()
        .prefix("add-git-")
        .tempdir_in(scratch)
        .map_err(FetchError::ctx("scratch dir"))?;
    let repo: PathBuf = dir.path().join("repo");
    let repo_s = repo.to_string_lossy().to_string();
    let ca = git_ca_args(&r.remote, dir.path())
        .map_err(FetchError::ctx(format!("failed to fetch {url}")))?;
    let ca: Vec<&str> = ca.iter().map(String::as_str).collect();
    git(
        dir.path(),
        &[
            &ca[..],
            &[
                "clone",
                "--quiet",
                "--no-checkout",
                "--",
                &r.remote,
                &repo_s,
            ],
        ]
        .concat(),
        auth,
    )
    .map_err(FetchError::ctx(format!("failed to fetch {url}")))?;
    let target = match &r.reference {
        Some(reference) => {
            // A branch or tag of the remote, else a commit.
            let remote_ref = format!("refs/remotes/origin/{reference}^{{commit}}");
            let tag = format!("refs/tags/{reference}^{{commit}}");
            let commit = format!("{reference}^{{commit}}");
            [remote_ref, tag, commit]
                .iter()
                .find_map(|c| git(&repo, &["rev-parse", "--verify", "--quiet", c], auth).ok())
                .ok_or_else(|| {
                    FetchError::Invalid(format!(
                        "failed to fetch {url}: ref {reference:?} not found"
                    ))
                })?
        }
        None => git(&repo, &["rev-parse", "HEAD^{commit}"], auth)
            .map_err(FetchError::ctx(format!("failed to fetch {url}")))?,
    };
    if let Some(c) = checksum {
        let want = c.trim_start_matches("sha1:").to_ascii_lowercase();
        if want.len() < 7 || !target.starts_with(&want) {
            return Err(FetchError::Invalid(format!(
                "checksum mismatch for {url}: expected commit {c}, got {target}"
            )));
        }
    }
    git(&repo, &["checkout", "--quiet", "--detach", &target], auth)
        .map_err(FetchError::ctx(format!("failed to fetch {url}")))?;
    // Submodules are followed as BuildKit does by default (best effort:
    // a repository without them does nothing here).
    if repo.join(".gitmodules").exists() {
        git(
            &repo,
            &[
                &ca[..],
                &["submodule", "update", "--init", "--recursive", "--quiet"],
            ]
            .concat(),
            auth,
        )
        .map_err(FetchError::ctx(format!(
            "failed to fetch submodules of {url}"
        )))?;
    }
    if !keep_git_dir {
        fs::remove_dir_all(repo.join(".git")).map_err(FetchError::ctx("removing .git"))?;
    } else {
        // The kept .git names its origin, and the submodules git resolved
        // against it, without the URL's credentials.
        strip_http_credentials(&repo.join(".git"))
            .map_err(FetchError::ctx(format!("failed to fetch {url}")))?;
    }
    if let Some(d) = &r.subdir {
        check_subdir(&repo, d, url)?;
    }
    let select = match &r.subdir {
        Some(d) => format!("/repo/{d}"),
        None => "/repo".to_string(),
    };
    Ok(Fetched {
        dir,
        select,
        identity: format!(
            "git:{}#{target}:{}:{keep_git_dir}",
            r.remote,
            r.subdir.unwrap_or_default()
        ),
        hash_content: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact_urls("failed https://u:tok@h.example/r.git and git://x@h/y, ok https://h/z"),
            "failed https://xxxxx@h.example/r.git and git://xxxxx@h/y, ok https://h/z"
        );
        assert_eq!(
            redact_urls("git@github.com:o/r.git"),
            "git@github.com:o/r.git"
        );
        assert_eq!(redact_urls("'http://a:b@h'"), "'http://xxxxx@h'");
        assert_eq!(redact_urls("no url"), "no url");
    }

    #[test]
    fn a_kept_git_config_loses_http_credentials_only() {
        let cfg = "[remote \"origin\"]\n\turl = https://u:tok@h.example/r.git\n[submodule \"s\"]\n\turl = HTTP://tok@h.example/s.git\n\turl = ssh://git@h.example/x.git\n";
        assert_eq!(
            without_http_credentials(cfg),
            "[remote \"origin\"]\n\turl = https://h.example/r.git\n[submodule \"s\"]\n\turl = HTTP://h.example/s.git\n\turl = ssh://git@h.example/x.git\n"
        );
    }

    #[test]
    fn url_kinds_and_names() {
        assert!(is_git_url("https://example.com/a/b.git#main:dir"));
        assert!(is_git_url("git@github.com:moby/buildkit.git"));
        assert!(is_http_url("http://127.0.0.1:8000/x/file.txt?a=b"));
        assert!(!is_http_url("https://h/r.git"));
        assert_eq!(url_file_name("http://h:1/x/file.txt?a=b"), "file.txt");
        assert_eq!(url_file_name("http://h:1/"), "__unnamed__");
        assert_eq!(url_file_name("http://h"), "__unnamed__");
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784111777)
        );
        assert_eq!(parse_http_date("garbage"), None);
        let g = parse_git_url("https://h/r.git#v1:sub/dir").unwrap();
        assert_eq!(g.reference.as_deref(), Some("v1"));
        assert_eq!(g.subdir.as_deref(), Some("sub/dir"));
        let g = parse_git_url("https://h/r.git#:sub").unwrap();
        assert_eq!((g.reference, g.subdir.as_deref()), (None, Some("sub")));
        assert!(parse_git_url("https://h/r.git#main:../x").is_err());
        assert!(parse_sha256("sha256:abc").is_err());
    }
}
