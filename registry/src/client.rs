//! The distribution API client: one [`Registry`] per registry host, with
//! its TLS settings, scheme (https, or http where allowed), credentials and
//! cached tokens. Requests retry with exponential backoff on 5xx, 429 and
//! dropped connections, a bounded number of times.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kiln_image::manifest::{media_types, Descriptor, RawManifest};
use kiln_image::{Digest, Hasher};

use crate::auth::{parse_challenge, Challenge, TokenReply};
use crate::config::{lookup_credentials, Credentials, RegistryConfig};
use crate::error::{RegistryError, Result};
use crate::reference::api_host;

/// The manifest media types kiln asks for (and accepts).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest or index accepted (distribution's own limit is 4 MiB).
pub const MAX_MANIFEST: u64 = kiln_image::manifest::MAX_MANIFEST_SIZE;

/// Tunables of a client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Attempts after the first for transient failures.
    pub retries: u32,
    /// First backoff delay (doubles per attempt).
    pub backoff: Duration,
    /// Blobs up to this size go up in one PUT; larger ones in PATCH chunks.
    pub monolithic_limit: u64,
    /// Chunk size of chunked uploads.
    pub chunk_size: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            retries: 4,
            backoff: Duration::from_millis(200),
            monolithic_limit: 256 << 20,
            chunk_size: 64 << 20,
        }
    }
}

/// Attempts after the first for transient failures of a pull mirror
/// (the registry itself gets [`ClientOptions::default`]'s).
pub const MIRROR_RETRIES: u32 = 1;

/// How a pushed blob reached the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// The registry had it already (HEAD said so).
    Exists,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// A request body that can be sent again on retry.
enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// A body read from a stream: of this length, or of a length not
    /// known in advance (sent with chunked transfer encoding).
    Stream(Box<dyn Read + 'a>, Option<u64>),
}

#[derive(Default)]
struct AuthState {
    challenge: Option<Challenge>,
    tokens: HashMap<String, String>,
}

/// A client for one registry.
pub struct Registry {
    name: String,
    host: String,
    agent: ureq::Agent,
    insecure: bool,
    base: Mutex<Option<String>>,
    creds: Option<Credentials>,
    cancel: tokio_util::sync::CancellationToken,
    auth: Mutex<AuthState>,
    opts: ClientOptions,
    /// Total time of a small request ([`crate::http::NetTimeouts::request`]).
    request_timeout: Duration,
    /// The plain-HTTP registries of the configuration (for a token
    /// endpoint on another host the user marked insecure).
    insecure_hosts: RegistryConfig,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({})", self.name)
    }
}

fn percent(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

fn with_query(url: &str, q: &str) -> String {
    if url.contains('?') {
        format!("{url}&{q}")
    } else {
        format!("{url}?{q}")
    }
}

/// Content type without parameters.
fn mime(resp: &ureq::Response) -> Option<String> {
    resp.header("Content-Type")
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
}

/// Reads an error body and extracts distribution's `errors[].code/message`.
fn error_detail(resp: ureq::Response) -> String {
    // At most 8 KiB, within 10 s however slowly they come.
    let mut buf = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    let mut r = resp.into_reader().take(8192);
    let mut chunk = [0u8; 1024];
    while Instant::now() < until {
        match r.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    #[derive(serde::Deserialize)]
    struct E {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    #[derive(serde::Deserialize)]
    struct Es {
        errors: Vec<E>,
    }
    if let Ok(es) = serde_json::from_slice::<Es>(&buf) {
        return es
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; ");
    }
    String::from_utf8_lossy(&buf)
        .trim()
        .chars()
        .take(300)
        .collect()
}

/// The slowest a blob body may arrive, held for [`LOW_SPEED_TIME`]: a
/// registry trickling a byte every few seconds (under the idle timeout)
/// fails the download instead of holding it for days (git's
/// `http.lowSpeedLimit`/`lowSpeedTime`).
pub const LOW_SPEED_LIMIT: u64 = 1024;
/// See [`LOW_SPEED_LIMIT`].
pub const LOW_SPEED_TIME: Duration = Duration::from_secs(60);

/// A body reader that fails when fewer than [`LOW_SPEED_LIMIT`] bytes a
/// second arrived over a whole [`LOW_SPEED_TIME`].
struct LowSpeed<R> {
    inner: R,
    window: Instant,
    bytes: u64,
    registry: String,
    limit: u64,
    time: Duration,
}

impl<R> LowSpeed<R> {
    fn new(inner: R, registry: &str) -> Self {
        Self::with(inner, registry, LOW_SPEED_LIMIT, LOW_SPEED_TIME)
    }
    fn with(inner: R, registry: &str, limit: u64, time: Duration) -> Self {
        LowSpeed {
            inner,
            window: Instant::now(),
            bytes: 0,
            registry: registry.to_string(),
            limit,
            time,
        }
    }
}

impl<R: Read> Read for LowSpeed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        let spent = self.window.elapsed();
        if spent >= self.time {
            let rate = (self.bytes as f64 / spent.as_secs_f64()) as u64;
            if rate < self.limit {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{}: network: the blob arrived at {rate} bytes/s over {:.0} s, under {} bytes/s",
                        self.registry,
                        spent.as_secs_f64(),
                        self.limit
                    ),
                ));
            }
            self.window = Instant::now();
            self.bytes = 0;
        }
        Ok(n)
    }
}

/// A reader that checks size and digest when the stream ends and fails
/// the read that reaches EOF on a mismatch, so a sink never commits bad
/// content.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Hasher,
    expected: Digest,
    size: u64,
    registry: String,
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if self.hasher.len() > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: blob {} is longer than its {} bytes",
                    self.registry, self.expected, self.size
                ),
            ));
        }
        if n == 0 && !buf.is_empty() {
            let got = self.hasher.clone().finish();
            if got == self.expected && self.hasher.len() != self.size {
                // The right bytes; the descriptor's size is what is wrong.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: blob size mismatch: {} is {} bytes, not the {} its descriptor says",
                        self.registry,
                        self.expected,
                        self.hasher.len(),
                        self.size
                    ),
                ));
            }
            if got != self.expected || self.hasher.len() != self.size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: blob digest mismatch: expected {} ({} bytes), got {} ({} bytes)",
                        self.registry,
                        self.expected,
                        self.size,
                        got,
                        self.hasher.len()
                    ),
                ));
            }
        }
        Ok(n)
    }
}

struct CountingReader<'a, R> {
    inner: R,
    progress: &'a (dyn Fn(u64) + Sync),
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// The body of a streamed blob upload (a layer compressed while it is
/// sent): its bytes as they come.
pub trait StreamBody: Read {
    /// Called once, when the upload session is open and before any byte
    /// is sent; may wait a little (`stop` says when to give up waiting:
    /// the push is being cancelled). The blob's digest and size when all
    /// of it is ready by then (a small layer compressed while the session
    /// was being opened): it is then read into memory and goes up in one
    /// PUT with its length — one request fewer, a body the registry reads
    /// in one piece, and one that can be sent again after a 401. `None`:
    /// it is streamed. A blob whole this way is at most
    /// [`MAX_WHOLE_BODY`] bytes.
    fn whole(&mut self, _stop: &dyn Fn() -> bool) -> Option<(Digest, u64)> {
        None
    }
}

/// The largest blob [`StreamBody::whole`] may offer (it is held in memory
/// while it is sent).
pub const MAX_WHOLE_BODY: u64 = 16 << 20;

/// Hashes what it reads and notes a read error (so that the caller can
/// tell a failing source from a failing network).
struct NotingReader<R> {
    inner: R,
    hasher: Hasher,
    failed: Option<String>,
}

impl<R: Read> Read for NotingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }
}

impl Registry {
    /// A client for `registry` (`docker.io`, `HOST[:PORT]`) with
    /// credentials from Docker's config (if any).
    pub fn new(registry: &str, cfg: &RegistryConfig) -> Result<Registry> {
        let creds = lookup_credentials(cfg, registry)?;
        Registry::with_credentials(registry, cfg, creds)
    }

    /// A client with explicit credentials (`None`: anonymous).
    pub fn with_credentials(
        registry: &str,
        cfg: &RegistryConfig,
        creds: Option<Credentials>,
    ) -> Result<Registry> {
        let host = api_host(registry).to_string();
        let tls = crate::tls::client_config(cfg, &host)?;
        let timeouts = crate::http::NetTimeouts::from_env()
            .map_err(|e| RegistryError::Local(e.to_string()))?;
        let agent = timeouts
            .agent_builder()
            .tls_config(tls)
            .max_idle_connections_per_host(16)
            .build();
        Ok(Registry {
            name: registry.to_string(),
            insecure: cfg.is_insecure(&host),
            host,
            agent,
            base: Mutex::new(None),
            creds,
            cancel: cfg.cancel.clone(),
            auth: Mutex::new(AuthState::default()),
            opts: ClientOptions::default(),
            request_timeout: timeouts.request,
            insecure_hosts: cfg.clone(),
        })
    }

    /// Runs `f` (a pull step: resolve, fetch) against the pull mirrors of
    /// `registry` in order, then `registry` itself; returns the client
    /// that answered and `f`'s result. Any failure of a mirror (connection
    /// refused, a 404, auth, a digest mismatch) is logged at debug level
    /// and the next source is tried; the registry's own error is returned
    /// when it fails too. A mirror gets [`MIRROR_RETRIES`] retries.
    /// Cancellation stops at once. Tags are resolved by
    /// whichever source answers (as docker and BuildKit trust mirrors);
    /// every byte is still checked against its digest. Pushes never use
    /// this.
    pub fn through_mirrors<T>(
        registry: &str,
        cfg: &RegistryConfig,
        mut f: impl FnMut(&Registry) -> Result<T>,
    ) -> Result<(Registry, T)> {
        for mirror in cfg.mirrors_for(registry) {
            // One retry: a dead mirror should cost little before the next
            // source; blobs it did deliver are kept by the sink.
            let attempt = Registry::new(mirror, cfg).and_then(|mut m| {
                m.set_options(ClientOptions {
                    retries: MIRROR_RETRIES,
                    ..ClientOptions::default()
                });
                f(&m).map(|t| (m, t))
            });
            match attempt {
                Ok(ok) => {
                    tracing::debug!(registry, mirror = %mirror, "pulled through mirror");
                    return Ok(ok);
                }
                Err(e @ RegistryError::Cancelled { .. }) => return Err(e),
                Err(e) => {
                    tracing::debug!(registry, mirror = %mirror, error = %e, "mirror failed; trying the next source");
                }
            }
        }
        let origin = Registry::new(registry, cfg)?;
        let t = f(&origin)?;
        Ok((origin, t))
    }

    /// Replace the tunables.
    pub fn set_options(&mut self, opts: ClientOptions) {
        self.opts = opts;
    }

    /// [`RegistryError::Cancelled`] for this registry.
    pub fn cancelled(&self) -> RegistryError {
        RegistryError::Cancelled {
            registry: self.name.clone(),
        }
    }

    /// Fails with [`RegistryError::Cancelled`] once the settings' cancel
    /// token is cancelled.
    pub fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            Err(self.cancelled())
        } else {
            Ok(())
        }
    }

    /// The body of a small response (a manifest, a token reply), at most
    /// `limit + 1` bytes: the read stops once the transfer is cancelled,
    /// and fails as timed out once the request, begun at `started`, has
    /// taken longer than the request timeout in all (a server sending a
    /// byte a second never trips the idle timeout, and held `kiln pull`
    /// for hours, deaf to Ctrl-C).
    fn read_small(&self, r: ureq::Response, limit: u64, started: Instant) -> Result<Vec<u8>> {
        let mut reader = CancelReader {
            inner: Box::new(r.into_reader().take(limit + 1)),
            cancel: self.cancel.clone(),
            deadline: Some((started + self.request_timeout, self.request_timeout)),
        };
        let mut buf = Vec::new();
        reader.read_to_end(&mut buf).map_err(|e| self.net(e))?;
        Ok(buf)
    }

    /// `r`, failing its reads once the transfer is cancelled.
    pub fn cancellable<'r>(&self, r: Box<dyn Read + 'r>) -> Box<dyn Read + 'r> {
        Box::new(CancelReader {
            inner: r,
            cancel: self.cancel.clone(),
            deadline: None,
        })
    }

    /// The registry name this client talks to.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn net(&self, e: impl std::fmt::Display) -> RegistryError {
        let detail = e.to_string();
        if crate::http::is_timeout_message(&detail) {
            return RegistryError::TimedOut {
                registry: self.name.clone(),
                detail,
            };
        }
        RegistryError::Network {
            registry: self.name.clone(),
            detail: e.to_string(),
        }
    }

    fn proto(&self, e: impl std::fmt::Display) -> RegistryError {
        RegistryError::Protocol {
            registry: self.name.clone(),
            detail: e.to_string(),
        }
    }

    /// Ping `/v2/` on `scheme`; `Ok(Some(resp status))`, transport error as Err.
    fn ping_scheme(&self, scheme: &str) -> std::result::Result<(u16, Option<String>), String> {
        let url = format!("{scheme}://{}/v2/", self.host);
        let req = self.agent.get(&url);
        match crate::http::call_within(req, None, self.request_timeout, Some(&self.cancel)) {
            Ok(r) => Ok((r.status(), None)),
            Err(ureq::Error::Status(code, r)) => {
                Ok((code, r.header("WWW-Authenticate").map(str::to_string)))
            }
            Err(ureq::Error::Transport(t)) => Err(t.to_string()),
        }
    }

    /// The base URL (`https://host`, or `http://host` where allowed and
    /// HTTPS is not answered), found once by pinging `/v2/`.
    fn base(&self) -> Result<String> {
        // What a ping found, per host, for the whole process: a client is
        // made per blob (through the mirror logic), and each pinged again
        // (two requests, one of them a failed TLS handshake to a plain-HTTP
        // registry).
        type Found = (String, bool, Option<String>, Option<Challenge>);
        static FOUND: Mutex<Vec<Found>> = Mutex::new(Vec::new());
        if let Some(b) = self.base.lock().map_err(|_| self.proto("lock"))?.clone() {
            return Ok(b);
        }
        let known = FOUND.lock().ok().and_then(|f| {
            f.iter()
                .find(|(h, i, _, _)| *h == self.host && *i == self.insecure)
                .map(|(_, _, b, c)| (b.clone(), c.clone()))
        });
        if let Some((Some(b), challenge)) = known {
            if let Ok(mut a) = self.auth.lock() {
                a.challenge = challenge;
            }
            if let Ok(mut g) = self.base.lock() {
                *g = Some(b.clone());
            }
            return Ok(b);
        }
        let mut last = String::new();
        for attempt in 0..=self.opts.retries.min(2) {
            if attempt > 0 {
                std::thread::sleep(self.opts.backoff * (1 << attempt));
            }
            let (scheme, res) = match self.ping_scheme("https") {
                Ok(r) => ("https", r),
                // A server that accepts and stays silent: neither another
                // scheme nor another attempt helps.
                Err(e) if crate::http::is_timeout_message(&e) => {
                    return Err(self.net(format!("https://{}/v2/: {e}", self.host)))
                }
                Err(tls_err) if self.insecure => match self.ping_scheme("http") {
                    Ok(r) if r.0 == 200 || r.0 == 401 => ("http", r),
                    Ok(r) => {
                        last = format!("https: {tls_err}; http: HTTP {}", r.0);
                        continue;
                    }
                    Err(e) if crate::http::is_timeout_message(&e) => {
                        return Err(self.net(format!("http://{}/v2/: {e}", self.host)))
                    }
                    Err(e) => {
                        last = format!("https: {tls_err}; http: {e}");
                        continue;
                    }
                },
                Err(e) => {
                    // The hint is for a server that answers, but not with
                    // TLS; not for a name that does not resolve or a port
                    // nobody listens on.
                    let lower = e.to_lowercase();
                    let unreachable = ["dns", "refused", "unreachable", "no route"]
                        .iter()
                        .any(|m| lower.contains(m));
                    last = if unreachable {
                        e.to_string()
                    } else {
                        format!(
                            "{e} (plain HTTP is only used for localhost and --insecure-registry hosts)"
                        )
                    };
                    continue;
                }
            };
            if res.0 >= 500 {
                last = format!("{scheme}://{}/v2/ answered HTTP {}", self.host, res.0);
                continue;
            }
            if let Some(h) = res.1 {
                if let Ok(mut a) = self.auth.lock() {
                    a.challenge = parse_challenge(&h);
                }
            }
            let b = format!("{scheme}://{}", self.host);
            if let Ok(mut g) = self.base.lock() {
                *g = Some(b.clone());
            }
            let challenge = self.auth.lock().ok().and_then(|a| a.challenge.clone());
            if let Ok(mut f) = FOUND.lock() {
                if f.len() < 256 {
                    f.push((self.host.clone(), self.insecure, Some(b.clone()), challenge));
                }
            }
            return Ok(b);
        }
        Err(self.net(last))
    }

    fn basic_header(&self) -> Option<String> {
        self.creds.as_ref().map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.username, c.password))
            )
        })
    }

    /// Whether the registry's Basic credentials may go to the plain-HTTP
    /// token endpoint `realm`: only when the registry itself is reached
    /// over plain HTTP (localhost, `--insecure-registry`) and the endpoint
    /// is on the registry's own host or on this machine — never to
    /// another host a challenge names.
    fn may_send_basic_over_http(&self, realm: &crate::http::Url) -> bool {
        if !self.insecure {
            return false;
        }
        let loopback = match realm.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => return false,
        };
        let own = crate::http::Url::parse(&format!("http://{}/", self.host))
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        let host = realm.host_str().map(str::to_ascii_lowercase);
        loopback
            || (own.is_some() && own == host)
            || crate::tls::url_host(realm).is_some_and(|h| self.insecure_hosts.is_insecure(&h))
    }

    /// Fetch a bearer token for `scope` (space-separated scopes).
    fn fetch_token(&self, realm: &str, service: Option<&str>, scope: &str) -> Result<String> {
        let started = Instant::now();
        let basic = self.basic_header();
        let mut url = crate::http::check_url(realm)
            .map_err(|e| self.proto(format!("token endpoint: {e}")))?;
        if basic.is_some() && url.scheme() != "https" && !self.may_send_basic_over_http(&url) {
            // The credentials would cross the network in the clear, at
            // the word of the registry's challenge.
            return Err(self.proto(format!(
                "token endpoint {realm} is not HTTPS: the credentials for {} are sent only over \
                 HTTPS (or to a registry marked insecure)",
                self.name
            )));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scope.split(' ').filter(|s| !s.is_empty()) {
                q.append_pair("scope", s);
            }
        }
        let followed = crate::http::follow(url.as_str(), |url, first_origin| {
            let mut req = self.agent.request_url("GET", url);
            // The registry named the realm: its credentials go there, and
            // to no other host a redirect names.
            if let (Some(h), true) = (&basic, first_origin) {
                req = req.set("Authorization", h);
            }
            crate::http::call_within(req, None, self.request_timeout, Some(&self.cancel))
                .map_err(Box::new)
        })
        .map_err(|e| self.proto(format!("token endpoint: {e}")))?;
        let resp = match followed.map_err(|e| *e) {
            Ok(r) => r,
            Err(ureq::Error::Status(401, r)) | Err(ureq::Error::Status(403, r)) => {
                return Err(RegistryError::Unauthorized {
                    registry: self.name.clone(),
                    detail: format!("token endpoint {realm} refused: {}", error_detail(r)),
                })
            }
            Err(ureq::Error::Status(code, r)) => {
                return Err(RegistryError::Status {
                    registry: self.name.clone(),
                    status: code,
                    method: "GET".into(),
                    url: realm.to_string(),
                    detail: error_detail(r),
                })
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(self.net(format!("token endpoint {realm}: {t}")))
            }
        };
        let buf = self.read_small(resp, 1 << 20, started)?;
        let t: TokenReply =
            serde_json::from_slice(&buf).map_err(|e| self.proto(format!("token reply: {e}")))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.proto("token reply has no token"))
    }

    /// The Authorization header for `scope`, fetching a token if the
    /// registry uses bearer auth and none is cached. `refresh` drops a
    /// cached token first.
    fn authorization(&self, scope: &str, refresh: bool) -> Result<Option<String>> {
        let challenge = {
            let mut a = self.auth.lock().map_err(|_| self.proto("lock"))?;
            if refresh {
                a.tokens.remove(scope);
            }
            if let Some(t) = a.tokens.get(scope) {
                return Ok(Some(format!("Bearer {t}")));
            }
            a.challenge.clone()
        };
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic { .. }) => Ok(self.basic_header()),
            Some(Challenge::Bearer {
                realm,
                service,
                scope: asked,
            }) => {
                let sc = if scope.is_empty() {
                    asked.unwrap_or_default()
                } else {
                    scope.to_string()
                };
                let t = self.fetch_token(&realm, service.as_deref(), &sc)?;
                if let Ok(mut a) = self.auth.lock() {
                    a.tokens.insert(scope.to_string(), t.clone());
                }
                Ok(Some(format!("Bearer {t}")))
            }
        }
    }

    fn status_error(
        &self,
        method: &str,
        url: &str,
        what: &str,
        code: u16,
        resp: ureq::Response,
    ) -> RegistryError {
        let detail = error_detail(resp);
        match code {
            401 => RegistryError::Unauthorized {
                registry: self.name.clone(),
                detail: if detail.is_empty() {
                    format!("{method} {what}")
                } else {
                    detail
                },
            },
            403 => RegistryError::Forbidden {
                registry: self.name.clone(),
                detail: format!("{what}: {detail}"),
            },
            404 => RegistryError::NotFound {
                registry: self.name.clone(),
                what: what.to_string(),
                detail,
            },
            _ => RegistryError::Status {
                registry: self.name.clone(),
                status: code,
                method: method.to_string(),
                url: url.to_string(),
                detail,
            },
        }
    }

    /// One request with auth (a 401 refreshes the challenge/token once).
    /// `path_or_url`: `/v2/...` relative to the base, or absolute.
    fn send_once(
        &self,
        method: &str,
        path_or_url: &str,
        scope: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
        what: &str,
    ) -> Result<ureq::Response> {
        let base = self.base()?;
        let url = if path_or_url.starts_with('/') {
            format!("{base}{path_or_url}")
        } else {
            path_or_url.to_string()
        };
        let target = crate::http::check_url(&url).map_err(|e| self.proto(e))?;
        let base_url = crate::http::check_url(&base).map_err(|e| self.proto(e))?;
        // Credentials go to the registry's own origin only: an upload
        // `Location` or a redirect naming another host gets none.
        let own = crate::http::same_origin(&base_url, &target);
        // Every request but a streamed upload gets its status line and
        // headers within KILN_REQUEST_TIMEOUT however slowly they come
        // (`call_within`); every read keeps the idle timeout, and the body
        // of a small response is bounded in all by its reader
        // (`read_small`).
        let build = |u: &crate::http::Url, auth: Option<&str>| {
            let mut req = self.agent.request_url(method, u);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            if let Some(a) = auth {
                req = req.set("Authorization", a);
            }
            req
        };
        let auth = if own {
            self.authorization(scope, false)?
        } else {
            None
        };
        // A streamed body can be sent once. Uploads send one only after
        // their POST, on the same scope, has answered any 401 challenge,
        // so it goes out with credentials.
        let call = |req: ureq::Request| {
            crate::http::call_within(req, None, self.request_timeout, Some(&self.cancel))
        };
        let send_bytes = |req: ureq::Request, b: &[u8]| {
            crate::http::call_within(
                req,
                Some(b.to_vec()),
                self.request_timeout,
                Some(&self.cancel),
            )
        };
        let (first, body_again) = match body {
            Body::Empty => (call(build(&target, auth.as_deref())), Some(Body::Empty)),
            Body::Bytes(b) => (
                send_bytes(build(&target, auth.as_deref()), b),
                Some(Body::Bytes(b)),
            ),
            Body::Stream(r, len) => {
                let mut req = build(&target, auth.as_deref());
                if let Some(len) = len {
                    req = req.set("Content-Length", &len.to_string());
                }
                (req.send(r), None)
            }
        };
        let resp = match (first, body_again) {
            (Err(ureq::Error::Status(401, r)), Some(body)) if own => {
                let ch = r.header("WWW-Authenticate").and_then(parse_challenge);
                if let Some(ch) = ch {
                    let mut a = self.auth.lock().map_err(|_| self.proto("lock"))?;
                    a.challenge = Some(ch);
                }
                let Some(auth) = self.authorization(scope, true)? else {
                    return Err(self.status_error(method, &url, what, 401, r));
                };
                match body {
                    Body::Bytes(b) => send_bytes(build(&target, Some(&auth)), b),
                    _ => call(build(&target, Some(&auth))),
                }
            }
            (other, _) => other,
        };
        let lift = |resp: std::result::Result<ureq::Response, ureq::Error>, u: &str| match resp {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => Err(self.status_error(method, u, what, code, r)),
            Err(ureq::Error::Transport(t)) => Err(self.net(format!("{method} {u}: {t}"))),
        };
        let mut resp = lift(resp, &url)?;
        if !matches!(method, "GET" | "HEAD") {
            return Ok(resp);
        }
        // Redirects (blob downloads go to storage hosts), by kiln's rules:
        // http(s) only, credentials only on the registry's own origin.
        let mut cur = target;
        for _ in 0..crate::http::MAX_REDIRECTS {
            let Some(next) =
                crate::http::redirect_target(&cur, &resp).map_err(|e| self.proto(e))?
            else {
                return Ok(resp);
            };
            let keep = own && crate::http::same_origin(&base_url, &next);
            let auth = if keep { auth.as_deref() } else { None };
            resp = lift(call(build(&next, auth)), next.as_str())?;
            cur = next;
        }
        Err(self.proto(format!(
            "{method} {url}: more than {} redirects",
            crate::http::MAX_REDIRECTS
        )))
    }

    /// Run `f` until it succeeds, fails for good, or the retries run out.
    pub fn retry<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            self.check_cancel()?;
            match f() {
                // Whatever broke once the transfer was cancelled (a reader
                // that stopped, a dropped connection) is the cancellation.
                Err(_) if self.cancel.is_cancelled() => return Err(self.cancelled()),
                Err(e) if e.is_transient() && attempt < self.opts.retries => {
                    attempt += 1;
                    std::thread::sleep(self.opts.backoff * (1u32 << (attempt - 1).min(6)));
                }
                other => return other,
            }
        }
    }

    fn scope(repo: &str, push: bool) -> String {
        if push {
            format!("repository:{repo}:pull,push")
        } else {
            format!("repository:{repo}:pull")
        }
    }

    /// Check that the registry answers and accepts our credentials
    /// (`kiln login`).
    pub fn check_login(&self) -> Result<()> {
        self.retry(|| {
            self.send_once("GET", "/v2/", "", &[], Body::Empty, "API root /v2/")
                .map(|_| ())
        })
    }

    /// GET a manifest by tag or digest (any of the four accepted types),
    /// bytes kept as received; verified when asked for by digest.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Result<RawManifest> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let what = format!("manifest {repo}:{reference}");
        let (bytes, mt) = self.retry(|| {
            let started = Instant::now();
            let r = self.send_once(
                "GET",
                &path,
                &Self::scope(repo, false),
                &[("Accept", MANIFEST_ACCEPT)],
                Body::Empty,
                &what,
            )?;
            let mt = mime(&r);
            let buf = self.read_small(r, MAX_MANIFEST, started)?;
            Ok((buf, mt))
        })?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(self.proto(format!("{what} is larger than 4 MiB")));
        }
        let mt = mt.filter(|m| media_types::is_manifest(m) || media_types::is_index(m));
        let raw = RawManifest::new(bytes, mt.as_deref())?;
        if let Ok(d) = reference.parse::<Digest>() {
            if d != raw.digest {
                return Err(RegistryError::DigestMismatch {
                    registry: self.name.clone(),
                    what,
                    expected: d.to_string(),
                    actual: raw.digest.to_string(),
                });
            }
        }
        if !raw.is_index() && !media_types::is_manifest(&raw.media_type) {
            return Err(self.proto(format!("{what}: unsupported media type {}", raw.media_type)));
        }
        Ok(raw)
    }

    /// PUT a manifest under a tag or its digest; returns its digest.
    pub fn put_manifest(&self, repo: &str, reference: &str, m: &RawManifest) -> Result<Digest> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let what = format!("manifest {repo}:{reference}");
        self.retry(|| {
            self.send_once(
                "PUT",
                &path,
                &Self::scope(repo, true),
                &[("Content-Type", m.media_type.as_str())],
                Body::Bytes(&m.bytes),
                &what,
            )
        })?;
        Ok(m.digest.clone())
    }

    /// Whether the repository has the blob (HEAD).
    pub fn blob_exists(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let what = format!("blob {digest}");
        match self.retry(|| {
            self.send_once(
                "HEAD",
                &path,
                &Self::scope(repo, false),
                &[],
                Body::Empty,
                &what,
            )
        }) {
            Ok(_) => Ok(true),
            Err(RegistryError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A verifying reader over a blob (one attempt; see [`Self::retry`]).
    pub fn open_blob(
        &self,
        repo: &str,
        desc: &Descriptor,
    ) -> Result<VerifyingReader<Box<dyn Read + Send + Sync>>> {
        let path = format!("/v2/{repo}/blobs/{}", desc.digest);
        let what = format!("blob {} in {repo}", desc.digest);
        let r = self.send_once(
            "GET",
            &path,
            &Self::scope(repo, false),
            &[],
            Body::Empty,
            &what,
        )?;
        Ok(VerifyingReader {
            inner: Box::new(LowSpeed::new(r.into_reader(), &self.name)),
            hasher: Hasher::new(),
            expected: desc.digest.clone(),
            size: desc.size,
            registry: self.name.clone(),
        })
    }

    /// A small blob (config) in memory, verified.
    pub fn get_blob_bytes(&self, repo: &str, desc: &Descriptor) -> Result<Vec<u8>> {
        if desc.size > MAX_MANIFEST * 4 {
            return Err(self.proto(format!("blob {} too large to hold", desc.digest)));
        }
        self.retry(|| {
            // A small read has a total deadline, as a manifest's: a server
            // sending a byte a minute never trips the idle timeout.
            let started = Instant::now();
            let mut r = CancelReader {
                inner: Box::new(self.open_blob(repo, desc)?),
                cancel: self.cancel.clone(),
                deadline: Some((started + self.request_timeout, self.request_timeout)),
            };
            let mut v = Vec::with_capacity(desc.size as usize);
            r.read_to_end(&mut v).map_err(|e| {
                if e.kind() == io::ErrorKind::InvalidData {
                    self.proto(e)
                } else {
                    self.net(e)
                }
            })?;
            Ok(v)
        })
    }

    fn upload_url(&self, resp: &ureq::Response) -> Result<String> {
        let loc = resp
            .header("Location")
            .ok_or_else(|| self.proto("upload response without Location"))?;
        if loc.starts_with("http://") || loc.starts_with("https://") {
            Ok(loc.to_string())
        } else if loc.starts_with('/') {
            Ok(format!("{}{loc}", self.base()?))
        } else {
            Err(self.proto(format!("odd upload Location {loc:?}")))
        }
    }

    /// Push one blob: HEAD first, then a cross-repository mount from
    /// `mount_from` (same registry) if given, else an upload — one PUT up
    /// to [`ClientOptions::monolithic_limit`], PATCH chunks above. `open`
    /// is called again for each retry. `progress` gets byte counts.
    pub fn push_blob<'s>(
        &self,
        repo: &str,
        desc: &Descriptor,
        mount_from: Option<&str>,
        open: &dyn Fn() -> io::Result<Box<dyn Read + 's>>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<PushOutcome> {
        if self.blob_exists(repo, &desc.digest)? {
            return Ok(PushOutcome::Exists);
        }
        let open = || open().map(|r| self.cancellable(r));
        self.retry(|| self.push_blob_once(repo, desc, mount_from, &open, progress))
    }

    /// Upload a blob whose digest is known only once all of it has been
    /// read (a layer compressed while it is sent): POST, one PATCH that
    /// streams `source` with chunked transfer encoding, then PUT with the
    /// digest of what was sent. Returns the digest and size. One attempt,
    /// no retries: a body of unknown length cannot be replayed, so a
    /// caller that can produce the blob again falls back to
    /// [`Registry::push_blob`] (sized, retried) when this fails — see
    /// [`RegistryError::stream_refused`]. A read error of the source
    /// comes back as [`RegistryError::Local`].
    pub fn push_blob_streamed(
        &self,
        repo: &str,
        mut source: Box<dyn StreamBody + '_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(Digest, u64)> {
        let what = format!("blob upload to {repo}");
        let scope = Self::scope(repo, true);
        let start = format!("/v2/{repo}/blobs/uploads/");
        let r = self.retry(|| {
            self.send_once(
                "POST",
                &start,
                &scope,
                &[("Content-Length", "0")],
                Body::Empty,
                &what,
            )
        })?;
        let url = self.upload_url(&r)?;
        let whole = source
            .whole(&|| self.cancel.is_cancelled())
            .filter(|(_, n)| *n <= MAX_WHOLE_BODY);
        let source: Box<dyn Read + '_> = source;
        let source = self.cancellable(source);
        let result = match whole {
            Some((digest, size)) => {
                self.put_whole(&url, &scope, &what, source, digest, size, progress)
            }
            None => self.stream_to(&url, &scope, &what, source, progress),
        }
        .map_err(|e| {
            if self.cancel.is_cancelled() {
                self.cancelled()
            } else {
                e
            }
        });
        if result.is_err() {
            // Best effort: let the registry drop the unfinished upload.
            let _ = self.send_once("DELETE", &url, &scope, &[], Body::Empty, &what);
        }
        result
    }

    /// The single PUT of [`Registry::push_blob_streamed`] for a blob that
    /// was whole before its upload began.
    #[allow(clippy::too_many_arguments)]
    fn put_whole(
        &self,
        url: &str,
        scope: &str,
        what: &str,
        source: Box<dyn Read + '_>,
        digest: Digest,
        size: u64,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(Digest, u64)> {
        // Read whole (at most MAX_WHOLE_BODY), so that a 401 (a token
        // that expired while the layer was compressed) can be answered
        // by sending it again.
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        source
            .take(size)
            .read_to_end(&mut bytes)
            .map_err(|e| RegistryError::Local(format!("reading the blob to upload: {e}")))?;
        if bytes.len() as u64 != size {
            return Err(RegistryError::Local(format!(
                "reading the blob to upload: {} bytes of {size}",
                bytes.len()
            )));
        }
        let digest_q = format!("digest={}", percent(digest.as_str()));
        self.send_once(
            "PUT",
            &with_query(url, &digest_q),
            scope,
            &[("Content-Type", "application/octet-stream")],
            Body::Bytes(&bytes),
            what,
        )?;
        progress(size);
        Ok((digest, size))
    }

    /// The PATCH and PUT of [`Registry::push_blob_streamed`] on the upload
    /// session at `url`.
    fn stream_to(
        &self,
        url: &str,
        scope: &str,
        what: &str,
        source: Box<dyn Read + '_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(Digest, u64)> {
        let local = |e: String| RegistryError::Local(format!("reading the blob to upload: {e}"));
        let mut reader = NotingReader {
            inner: CountingReader {
                inner: source,
                progress,
            },
            hasher: Hasher::new(),
            failed: None,
        };
        let sent = self.send_once(
            "PATCH",
            url,
            scope,
            &[("Content-Type", "application/octet-stream")],
            Body::Stream(Box::new(&mut reader), None),
            what,
        );
        if let Some(e) = reader.failed.take() {
            return Err(local(e));
        }
        let url = self.upload_url(&sent?)?;
        let size = reader.hasher.len();
        let digest = reader.hasher.finish();
        let digest_q = format!("digest={}", percent(digest.as_str()));
        self.send_once(
            "PUT",
            &with_query(&url, &digest_q),
            scope,
            &[("Content-Length", "0")],
            Body::Empty,
            what,
        )?;
        Ok((digest, size))
    }

    fn push_blob_once<'s>(
        &self,
        repo: &str,
        desc: &Descriptor,
        mount_from: Option<&str>,
        open: &dyn Fn() -> io::Result<Box<dyn Read + 's>>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<PushOutcome> {
        let what = format!("blob upload to {repo}");
        let mut scope = Self::scope(repo, true);
        let mut path = format!("/v2/{repo}/blobs/uploads/");
        if let Some(from) = mount_from.filter(|f| *f != repo) {
            scope = format!("{scope} repository:{from}:pull");
            path = format!(
                "{path}?mount={}&from={}",
                percent(desc.digest.as_str()),
                percent(from)
            );
        }
        let r = self.send_once(
            "POST",
            &path,
            &scope,
            &[("Content-Length", "0")],
            Body::Empty,
            &what,
        )?;
        if r.status() == 201 {
            return Ok(PushOutcome::Mounted);
        }
        let mut url = self.upload_url(&r)?;
        let scope = Self::scope(repo, true);
        let local =
            |e: io::Error| RegistryError::Local(format!("reading blob {}: {e}", desc.digest));
        let reader = open().map_err(local)?;
        let mut reader = CountingReader {
            inner: reader,
            progress,
        };
        let digest_q = format!("digest={}", percent(desc.digest.as_str()));
        if desc.size <= self.opts.monolithic_limit {
            self.send_once(
                "PUT",
                &with_query(&url, &digest_q),
                &scope,
                &[("Content-Type", "application/octet-stream")],
                Body::Stream(Box::new(&mut reader), Some(desc.size)),
                &what,
            )?;
            return Ok(PushOutcome::Uploaded);
        }
        let mut off = 0u64;
        while off < desc.size {
            let n = self.opts.chunk_size.min(desc.size - off);
            let range = format!("{}-{}", off, off + n - 1);
            let r = self.send_once(
                "PATCH",
                &url,
                &scope,
                &[
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Range", range.as_str()),
                ],
                Body::Stream(Box::new((&mut reader).take(n)), Some(n)),
                &what,
            )?;
            url = self.upload_url(&r)?;
            off += n;
        }
        self.send_once(
            "PUT",
            &with_query(&url, &digest_q),
            &scope,
            &[("Content-Length", "0")],
            Body::Empty,
            &what,
        )?;
        Ok(PushOutcome::Uploaded)
    }
}

/// A reader that fails once its token is cancelled (checked before each
/// read, so a transfer stops within one buffer).
struct CancelReader<'r> {
    inner: Box<dyn Read + 'r>,
    cancel: tokio_util::sync::CancellationToken,
    /// When given, reads fail as timed out after this instant (the
    /// duration is for the message).
    deadline: Option<(Instant, Duration)>,
}

impl Read for CancelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.is_cancelled() {
            // Not `Interrupted`: `read_to_end` and `io::copy` would retry.
            return Err(io::Error::other("cancelled"));
        }
        if let Some((at, total)) = self.deadline {
            if Instant::now() >= at {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "timed out: the response took longer than {} s in all (KILN_REQUEST_TIMEOUT)",
                        total.as_secs_f64()
                    ),
                ));
            }
        }
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod low_speed_tests {
    use super::*;

    /// One byte every 30 ms against 100 bytes/s over 200 ms: an error
    /// once the window has passed; a fast body reads to its end.
    #[test]
    fn a_trickling_body_fails_and_a_fast_one_does_not() {
        struct Trickle(usize);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 || buf.is_empty() {
                    return Ok(0);
                }
                std::thread::sleep(Duration::from_millis(30));
                self.0 -= 1;
                buf[0] = b'x';
                Ok(1)
            }
        }
        let mut slow = LowSpeed::with(Trickle(100), "r", 100, Duration::from_millis(200));
        let e = io::copy(&mut slow, &mut io::sink()).expect_err("too slow");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let mut fast = LowSpeed::with(&[7u8; 4096][..], "r", 100, Duration::from_millis(200));
        assert_eq!(io::copy(&mut fast, &mut io::sink()).expect("fast"), 4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifying_reader_rejects_bad_content() {
        let data = b"hello".to_vec();
        let good = Descriptor::of_bytes("x", &data);
        let mut r = VerifyingReader {
            inner: &data[..],
            hasher: Hasher::new(),
            expected: good.digest.clone(),
            size: good.size,
            registry: "r".into(),
        };
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("good content reads");
        let mut r = VerifyingReader {
            inner: &b"hellO"[..],
            hasher: Hasher::new(),
            expected: good.digest,
            size: good.size,
            registry: "r".into(),
        };
        let err = r.read_to_end(&mut Vec::new()).expect_err("mismatch");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn query_helpers() {
        assert_eq!(
            with_query("http://h/u?_state=x", "digest=a"),
            "http://h/u?_state=x&digest=a"
        );
        assert_eq!(percent("sha256:ab"), "sha256%3Aab");
    }
}
