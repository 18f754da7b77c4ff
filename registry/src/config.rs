//! Where registry settings come from: kiln's config file
//! (`{"insecure-registries": [...]}`, like daemon.json), per-registry CA
//! certificates (`certs.d/HOST:PORT/ca.crt`, like Docker's), and Docker's
//! `config.json` for credentials (`auths`, `credsStore`, `credHelpers`).
//! The config file also names pull mirrors per registry (`mirrors`, and
//! daemon.json's `registry-mirrors` for Docker Hub).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{RegistryError, Result};
use crate::reference::{DOCKER_HUB, DOCKER_HUB_AUTH_KEY};

/// Settings shared by every registry connection of one kiln run.
#[derive(Clone, Debug, Default)]
pub struct RegistryConfig {
    /// Hosts (`HOST[:PORT]`) where plain HTTP is allowed (besides
    /// localhost and 127.0.0.0/8, which always are).
    pub insecure: Vec<String>,
    /// Directories holding `HOST[:PORT]/*.crt` CA certificates.
    pub certs_dirs: Vec<PathBuf>,
    /// Docker's config directory (`$DOCKER_CONFIG`, else `~/.docker`).
    pub docker_config_dir: Option<PathBuf>,
    /// Pull mirrors (`HOST[:PORT]`, tried in order before the registry
    /// itself) by registry name (`docker.io`, `HOST[:PORT]`).
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Stops every transfer of the clients made with these settings:
    /// checked before each request and blob and between reads of a blob
    /// (a cancelled transfer fails with [`RegistryError::Cancelled`]).
    pub cancel: tokio_util::sync::CancellationToken,
}

#[derive(Deserialize, Default)]
struct KilnConfigFile {
    #[serde(rename = "insecure-registries", default)]
    insecure_registries: Vec<String>,
    #[serde(rename = "certs-dir", default)]
    certs_dir: Option<PathBuf>,
    #[serde(rename = "registry-mirrors", default)]
    registry_mirrors: Vec<String>,
    #[serde(default)]
    mirrors: BTreeMap<String, Vec<String>>,
}

/// At most this many mirrors per registry.
pub const MAX_MIRRORS: usize = 8;

/// A mirror entry (`HOST[:PORT]`, `https://HOST[:PORT]`,
/// `http://HOST[:PORT]`, a trailing `/` allowed) as `HOST[:PORT]` and
/// whether plain HTTP was asked for. A path, user info, query or an
/// invalid host is refused.
fn parse_mirror(entry: &str) -> std::result::Result<(String, bool), String> {
    let (rest, http) = if let Some(r) = entry.strip_prefix("http://") {
        (r, true)
    } else if let Some(r) = entry.strip_prefix("https://") {
        (r, false)
    } else if entry.contains("://") {
        return Err(format!(
            "mirror {entry:?}: only http:// and https:// are supported"
        ));
    } else {
        (entry, false)
    };
    let host = rest.strip_suffix('/').unwrap_or(rest);
    if host.is_empty() || host.len() > 255 {
        return Err(format!(
            "mirror {entry:?}: no host, or a host over 255 bytes"
        ));
    }
    if host.contains(['/', '@', '?', '#']) {
        return Err(format!(
            "mirror {entry:?}: give HOST[:PORT] only (no path, user or query)"
        ));
    }
    // The host must parse as a registry host of an image reference.
    let probe = format!("{host}/mirror-check");
    match kiln_image::reference::Reference::parse(&probe) {
        Ok(r) if r.registry == normalize_registry(host) => Ok((host.to_string(), http)),
        _ => Err(format!("mirror {entry:?}: not a valid HOST[:PORT]")),
    }
}

/// Docker Hub's other spellings as `docker.io`; other names unchanged.
fn normalize_registry(name: &str) -> &str {
    match name {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB,
        n => n,
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// kiln's config directories, most specific first: `$KILN_CONFIG_DIR`,
/// `$XDG_CONFIG_HOME/kiln` (else `~/.config/kiln`), `/etc/kiln`. A
/// relative `XDG_CONFIG_HOME` or `HOME` is ignored, as the XDG base
/// directory spec says (else the config would be read from wherever kiln
/// is started, a build context say).
pub fn kiln_config_dirs() -> Vec<PathBuf> {
    config_dirs_from(&|name| env_path(name))
}

fn config_dirs_from(env: &dyn Fn(&str) -> Option<PathBuf>) -> Vec<PathBuf> {
    let absolute = |name: &str| env(name).filter(|p| p.is_absolute());
    let mut v = Vec::new();
    if let Some(d) = env("KILN_CONFIG_DIR") {
        v.push(d);
    }
    if let Some(x) = absolute("XDG_CONFIG_HOME") {
        v.push(x.join("kiln"));
    } else if let Some(h) = absolute("HOME") {
        v.push(h.join(".config").join("kiln"));
    }
    v.push(PathBuf::from("/etc/kiln"));
    v
}

impl RegistryConfig {
    /// These settings with transfers stopped by `cancel`.
    pub fn with_cancel(mut self, cancel: tokio_util::sync::CancellationToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// Settings from the environment and config files, plus `insecure`
    /// hosts given on the command line. Every existing `config.json` in
    /// [`kiln_config_dirs`] contributes its insecure registries.
    pub fn load(insecure: &[String]) -> Result<RegistryConfig> {
        let mut cfg = RegistryConfig {
            insecure: insecure.to_vec(),
            certs_dirs: Vec::new(),
            docker_config_dir: docker_config_dir(),
            mirrors: BTreeMap::new(),
            cancel: Default::default(),
        };
        for dir in kiln_config_dirs() {
            let file = dir.join("config.json");
            match read_config_file(&file) {
                Ok(bytes) => {
                    let f: KilnConfigFile =
                        serde_json::from_slice(&bytes).map_err(|e| RegistryError::Config {
                            path: file.display().to_string(),
                            detail: e.to_string(),
                        })?;
                    cfg.insecure.extend(f.insecure_registries);
                    let mut groups = f.mirrors;
                    if !f.registry_mirrors.is_empty() {
                        groups
                            .entry(DOCKER_HUB.to_string())
                            .or_default()
                            .extend(f.registry_mirrors);
                    }
                    cfg.add_mirrors(&file, groups)?;
                    if let Some(c) = f.certs_dir {
                        cfg.certs_dirs.push(c);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(RegistryError::Config {
                        path: file.display().to_string(),
                        detail: e.to_string(),
                    })
                }
            }
            cfg.certs_dirs.push(dir.join("certs.d"));
        }
        Ok(cfg)
    }

    /// Adds the mirrors of one config file (`file`, for errors). A more
    /// specific config directory's mirrors come first.
    fn add_mirrors(&mut self, file: &Path, groups: BTreeMap<String, Vec<String>>) -> Result<()> {
        let err = |detail: String| RegistryError::Config {
            path: file.display().to_string(),
            detail,
        };
        for (registry, entries) in groups {
            let key = normalize_registry(registry.trim_end_matches('/')).to_string();
            let probe = format!("{key}/mirror-check");
            if !kiln_image::reference::Reference::parse(&probe).is_ok_and(|r| r.registry == key) {
                return Err(err(format!(
                    "mirrors: {registry:?} is not a registry HOST[:PORT]"
                )));
            }
            let mut list = self.mirrors.remove(&key).unwrap_or_default();
            for e in entries {
                let (host, http) = parse_mirror(&e).map_err(&err)?;
                if http && !self.is_insecure(&host) {
                    self.insecure.push(host.clone());
                }
                if host != key && !list.contains(&host) {
                    list.push(host);
                }
            }
            let list = self.mirrors.entry(key.clone()).or_insert(list);
            if list.len() > MAX_MIRRORS {
                return Err(err(format!(
                    "mirrors of {key}: {} given, kiln takes at most {MAX_MIRRORS}",
                    list.len()
                )));
            }
        }
        Ok(())
    }

    /// The pull mirrors of `registry` (`docker.io`, `HOST[:PORT]`), in
    /// the order to try them; the registry itself comes after them.
    pub fn mirrors_for(&self, registry: &str) -> &[String] {
        self.mirrors
            .get(normalize_registry(registry))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether plain HTTP may be used for `host` (`HOST[:PORT]`).
    pub fn is_insecure(&self, host: &str) -> bool {
        let bare = strip_port(host);
        if bare == "localhost" || bare == "::1" || bare == "[::1]" || bare.starts_with("127.") {
            return true;
        }
        self.insecure.iter().any(|i| {
            let i = i
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/');
            i == host || i == bare
        })
    }

    /// PEM CA certificate files for `host` (`certs.d/HOST[:PORT]/*.crt`).
    pub fn ca_files(&self, host: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in &self.certs_dirs {
            let dir = d.join(host);
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "crt"))
                .collect();
            files.sort();
            out.extend(files);
        }
        out
    }

    /// The path of Docker's `config.json`.
    pub fn docker_config_file(&self) -> Option<PathBuf> {
        self.docker_config_dir
            .as_ref()
            .map(|d| d.join("config.json"))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split(']')
            .next()
            .map(|h| &host[..h.len() + 1])
            .unwrap_or(host);
    }
    host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
}

/// `$DOCKER_CONFIG`, else `$HOME/.docker` (a relative `HOME` is ignored).
pub fn docker_config_dir() -> Option<PathBuf> {
    env_path("DOCKER_CONFIG").or_else(|| {
        env_path("HOME")
            .filter(|h| h.is_absolute())
            .map(|h| h.join(".docker"))
    })
}

/// A username and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <secret>)", self.username)
    }
}

/// The `config.json` key Docker uses for `registry`.
pub fn auth_key(registry: &str) -> String {
    if registry == DOCKER_HUB || registry == "index.docker.io" || registry == "registry-1.docker.io"
    {
        DOCKER_HUB_AUTH_KEY.to_string()
    } else {
        registry.to_string()
    }
}

/// `https://host/v1/` -> `host`, as Docker matches `auths` keys.
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

fn same_registry(key: &str, registry: &str) -> bool {
    let h = key_host(key);
    let norm = |s: &str| -> String {
        match s {
            "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.to_string(),
            o => o.to_string(),
        }
    };
    norm(h) == norm(registry)
}

#[derive(Deserialize, Default)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(rename = "credsStore", default)]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers", default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

fn config_err(path: &Path, detail: impl std::fmt::Display) -> RegistryError {
    RegistryError::Config {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// Credentials for `registry` from Docker's config: a `credHelpers` entry
/// wins, then a `credsStore`, then `auths`. `None`: anonymous.
pub fn lookup_credentials(cfg: &RegistryConfig, registry: &str) -> Result<Option<Credentials>> {
    let Some(path) = cfg.docker_config_file() else {
        return Ok(None);
    };
    let bytes = match read_config_file(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(config_err(&path, e)),
    };
    let file: DockerConfigFile =
        serde_json::from_slice(&bytes).map_err(|e| config_err(&path, e))?;
    let helper = file
        .cred_helpers
        .iter()
        .find(|(k, _)| same_registry(k, registry))
        .map(|(_, v)| v.clone())
        .or(file.creds_store.clone());
    if let Some(h) = helper.filter(|h| !h.is_empty()) {
        if let Some(c) = helper_get(&h, &auth_key(registry))? {
            return Ok(Some(c));
        }
        // Docker falls back to the auths entry when the helper knows nothing.
    }
    for (k, entry) in &file.auths {
        if !same_registry(k, registry) {
            continue;
        }
        if let Some(a) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|e| config_err(&path, format!("auths[{k}].auth: {e}")))?;
            let s = String::from_utf8(raw)
                .map_err(|_| config_err(&path, format!("auths[{k}].auth is not UTF-8")))?;
            let (u, p) = s.split_once(':').ok_or_else(|| {
                config_err(&path, format!("auths[{k}].auth is not user:password"))
            })?;
            return Ok(Some(Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }));
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
    }
    Ok(None)
}

#[derive(Deserialize)]
struct HelperReply {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

fn run_helper(helper: &str, verb: &str, input: &[u8]) -> Result<(bool, Vec<u8>, String)> {
    let prog = format!("docker-credential-{helper}");
    let mut child = Command::new(&prog)
        .arg(verb)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RegistryError::Credentials(format!("running {prog} {verb}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .map_err(|e| RegistryError::Credentials(format!("{prog} {verb}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| RegistryError::Credentials(format!("{prog} {verb}: {e}")))?;
    let msg = format!(
        "{} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((out.status.success(), out.stdout, msg.trim().to_string()))
}

/// `docker-credential-<helper> get`: `None` when it has no credentials.
pub fn helper_get(helper: &str, server: &str) -> Result<Option<Credentials>> {
    let (ok, stdout, msg) = run_helper(helper, "get", server.as_bytes())?;
    if !ok {
        if msg.contains("credentials not found") {
            return Ok(None);
        }
        return Err(RegistryError::Credentials(format!(
            "docker-credential-{helper} get {server}: {msg}"
        )));
    }
    let r: HelperReply = serde_json::from_slice(&stdout).map_err(|e| {
        RegistryError::Credentials(format!("docker-credential-{helper} get: bad reply: {e}"))
    })?;
    if r.username == "<token>" {
        // An identity token (OAuth refresh token): not supported; treat as
        // a password for basic/bearer exchanges would leak it, so skip.
        return Ok(None);
    }
    Ok(Some(Credentials {
        username: r.username,
        password: r.secret,
    }))
}

/// The largest configuration file kiln reads (its own and docker's
/// `config.json`), as the CA files.
pub const MAX_CONFIG_FILE: u64 = crate::tls::MAX_CA_FILE;

/// Reads a configuration file: a regular file of at most
/// [`MAX_CONFIG_FILE`] bytes, never blocking on a FIFO
/// (`config.json -> /dev/zero` once ate 23 GB). A missing file is
/// `NotFound`; the other refusals say what was wrong.
fn read_config_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use crate::tls::BoundedRead;
    crate::tls::read_regular_bounded(path, MAX_CONFIG_FILE).map_err(|e| match e {
        BoundedRead::Io(e) => e,
        BoundedRead::NotAFile => std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a device, FIFO, socket or directory)",
        ),
        BoundedRead::TooLarge => std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} MiB", MAX_CONFIG_FILE >> 20),
        ),
    })
}

fn read_config_value(path: &Path) -> Result<serde_json::Value> {
    match read_config_file(path) {
        Ok(b) if !b.iter().all(|c| c.is_ascii_whitespace()) => {
            serde_json::from_slice(&b).map_err(|e| config_err(path, e))
        }
        Ok(_) => Ok(serde_json::json!({})),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::json!({})),
        Err(e) => Err(config_err(path, e)),
    }
}

fn write_config_value(path: &Path, v: &serde_json::Value) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| config_err(path, "no parent directory"))?;
    std::fs::create_dir_all(dir).map_err(|e| config_err(dir, e))?;
    let mut bytes = serde_json::to_vec_pretty(v).map_err(|e| config_err(path, e))?;
    bytes.push(b'\n');
    // A new file (0600, `O_EXCL`) of a name no one can guess: never one
    // that is there already nor a symlink (the directory may be shared:
    // another user's planted `.config.json.<pid>` got the credentials).
    let res = (|| -> std::io::Result<()> {
        let mut f = tempfile::Builder::new()
            .prefix(".config.json.")
            .tempfile_in(dir)?;
        f.write_all(&bytes)?;
        f.as_file().sync_all()?;
        f.persist(path).map_err(|e| e.error)?;
        Ok(())
    })();
    res.map_err(|e| config_err(path, e))
}

fn helper_for(v: &serde_json::Value, registry: &str) -> Option<String> {
    if let Some(map) = v.get("credHelpers").and_then(|h| h.as_object()) {
        for (k, h) in map {
            if same_registry(k, registry) {
                return h.as_str().map(str::to_string);
            }
        }
    }
    v.get("credsStore")
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Store credentials as `docker login` does: through the configured
/// credential helper, else base64 `user:password` under `auths`. Other
/// content of `config.json` is kept. Returns the file written (or the
/// helper used).
pub fn store_credentials(cfg: &RegistryConfig, registry: &str, c: &Credentials) -> Result<String> {
    let path = cfg
        .docker_config_file()
        .ok_or_else(|| RegistryError::Credentials("no $HOME or $DOCKER_CONFIG".into()))?;
    let mut v = read_config_value(&path)?;
    let key = auth_key(registry);
    if let Some(h) = helper_for(&v, registry) {
        let input =
            serde_json::json!({"ServerURL": key, "Username": c.username, "Secret": c.password});
        let (ok, _, msg) = run_helper(&h, "store", input.to_string().as_bytes())?;
        if !ok {
            return Err(RegistryError::Credentials(format!(
                "docker-credential-{h} store: {msg}"
            )));
        }
        // docker records an empty entry so `auths` lists the registry
        if let Some(obj) = v.as_object_mut() {
            let auths = obj.entry("auths").or_insert_with(|| serde_json::json!({}));
            if let Some(a) = auths.as_object_mut() {
                a.insert(key, serde_json::json!({}));
            }
        }
        write_config_value(&path, &v)?;
        return Ok(format!("docker-credential-{h}"));
    }
    let obj = v
        .as_object_mut()
        .ok_or_else(|| config_err(&path, "not a JSON object"))?;
    let auths = obj.entry("auths").or_insert_with(|| serde_json::json!({}));
    let a = auths
        .as_object_mut()
        .ok_or_else(|| config_err(&path, "auths is not an object"))?;
    let enc =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
    a.insert(key, serde_json::json!({ "auth": enc }));
    write_config_value(&path, &v)?;
    Ok(path.display().to_string())
}

/// Remove stored credentials for `registry` (`docker logout`). Returns
/// whether anything was removed.
pub fn erase_credentials(cfg: &RegistryConfig, registry: &str) -> Result<bool> {
    let path = cfg
        .docker_config_file()
        .ok_or_else(|| RegistryError::Credentials("no $HOME or $DOCKER_CONFIG".into()))?;
    let mut v = read_config_value(&path)?;
    let mut removed = false;
    if let Some(h) = helper_for(&v, registry) {
        let (ok, _, _) = run_helper(&h, "erase", auth_key(registry).as_bytes())?;
        removed |= ok;
    }
    if let Some(a) = v.get_mut("auths").and_then(|a| a.as_object_mut()) {
        let keys: Vec<String> = a
            .keys()
            .filter(|k| same_registry(k, registry))
            .cloned()
            .collect();
        for k in keys {
            a.remove(&k);
            removed = true;
        }
    }
    if removed {
        write_config_value(&path, &v)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> RegistryConfig {
        RegistryConfig {
            docker_config_dir: Some(dir.to_path_buf()),
            ..Default::default()
        }
    }

    #[test]
    fn relative_xdg_config_home_and_home_are_ignored() {
        let dirs = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, PathBuf)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
                .collect();
            config_dirs_from(&|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        };
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            dirs(&[("XDG_CONFIG_HOME", "ctx"), ("HOME", "/home/u")]),
            vec![p("/home/u/.config/kiln"), p("/etc/kiln")]
        );
        assert_eq!(dirs(&[("HOME", "rel")]), vec![p("/etc/kiln")]);
        assert_eq!(
            dirs(&[("XDG_CONFIG_HOME", "/x"), ("KILN_CONFIG_DIR", "/k")]),
            vec![p("/k"), p("/x/kiln"), p("/etc/kiln")]
        );
    }

    #[test]
    fn mirror_entries() {
        assert_eq!(parse_mirror("m.example"), Ok(("m.example".into(), false)));
        assert_eq!(
            parse_mirror("https://m.example:5000/"),
            Ok(("m.example:5000".into(), false))
        );
        assert_eq!(
            parse_mirror("http://127.0.0.1:5001"),
            Ok(("127.0.0.1:5001".into(), true))
        );
        for bad in [
            "",
            "https://",
            "m.example/v2",
            "user@m.example",
            "ftp://m.example",
            "bad host",
            "mirror",
        ] {
            assert!(parse_mirror(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mirrors_merge_in_order_with_a_bound() {
        let mut c = RegistryConfig::default();
        let f = Path::new("/x/config.json");
        let g = |k: &str, v: &[&str]| {
            BTreeMap::from([(k.to_string(), v.iter().map(|s| s.to_string()).collect())])
        };
        c.add_mirrors(f, g("index.docker.io", &["a.example", "http://b.example"]))
            .unwrap();
        c.add_mirrors(f, g("docker.io", &["a.example", "c.example"]))
            .unwrap();
        assert_eq!(
            c.mirrors_for(DOCKER_HUB),
            ["a.example", "b.example", "c.example"]
        );
        assert!(c.is_insecure("b.example"));
        assert!(!c.is_insecure("a.example"));
        assert!(c.mirrors_for("ghcr.io").is_empty());
        let many: Vec<String> = (0..=MAX_MIRRORS).map(|i| format!("m{i}.example")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let e = c.add_mirrors(f, g("ghcr.io", &many)).unwrap_err();
        assert!(e.to_string().contains("at most 8"), "{e}");
    }

    #[test]
    fn insecure_hosts() {
        let c = RegistryConfig {
            insecure: vec!["reg.example:5000".into(), "http://other.example".into()],
            ..Default::default()
        };
        assert!(c.is_insecure("127.0.0.1:5000"));
        assert!(c.is_insecure("localhost"));
        assert!(c.is_insecure("reg.example:5000"));
        assert!(!c.is_insecure("reg.example:5001"));
        assert!(c.is_insecure("other.example"));
        assert!(!c.is_insecure("docker.io"));
    }

    /// Runs `f` on a thread; `None` if it has not returned within 10 s.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).ok()
    }

    #[test]
    fn a_config_json_that_is_a_fifo_or_dev_zero_is_refused_naming_it() {
        let d = tempfile::tempdir().expect("tmp");
        let file = d.path().join("config.json");
        let c = std::ffi::CString::new(file.to_str().expect("utf-8")).expect("path");
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let conf = cfg(d.path());
        let e = within_10s(move || lookup_credentials(&conf, "docker.io"))
            .expect("reading a FIFO config.json blocked")
            .expect_err("a FIFO config.json");
        assert!(e.to_string().contains("config.json"), "{e}");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_file(&file).expect("rm");
        std::os::unix::fs::symlink("/dev/zero", &file).expect("symlink");
        let conf = cfg(d.path());
        let e = within_10s(move || lookup_credentials(&conf, "docker.io"))
            .expect("reading /dev/zero as config.json did not stop")
            .expect_err("/dev/zero as config.json");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = d.path().join("big");
        std::fs::File::create(&big)
            .and_then(|f| f.set_len(MAX_CONFIG_FILE + 1))
            .expect("sparse file");
        std::fs::remove_file(&file).expect("rm");
        std::os::unix::fs::symlink(&big, &file).expect("symlink");
        let e = lookup_credentials(&cfg(d.path()), "docker.io").expect_err("too big");
        assert!(e.to_string().contains("larger than 16 MiB"), "{e}");
    }

    #[test]
    fn login_logout_round_trip_keeps_other_fields() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::write(
            d.path().join("config.json"),
            r#"{"psFormat":"x","auths":{"other.io":{"auth":"eDp5"}}}"#,
        )
        .expect("write");
        let c = cfg(d.path());
        let creds = Credentials {
            username: "alice".into(),
            password: "s3:cret".into(),
        };
        store_credentials(&c, "reg.example:5000", &creds).expect("store");
        store_credentials(&c, "docker.io", &creds).expect("store hub");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join("config.json")).expect("read"))
                .expect("json");
        assert_eq!(v["psFormat"], "x");
        assert_eq!(
            v["auths"]["reg.example:5000"]["auth"],
            "YWxpY2U6czM6Y3JldA=="
        );
        assert!(v["auths"]["https://index.docker.io/v1/"].is_object());
        assert_eq!(
            lookup_credentials(&c, "reg.example:5000").expect("get"),
            Some(creds.clone())
        );
        assert_eq!(
            lookup_credentials(&c, "docker.io").expect("get"),
            Some(creds)
        );
        assert_eq!(
            lookup_credentials(&c, "other.io")
                .expect("get")
                .map(|c| c.username),
            Some("x".to_string())
        );
        assert!(erase_credentials(&c, "reg.example:5000").expect("erase"));
        assert_eq!(
            lookup_credentials(&c, "reg.example:5000").expect("get"),
            None
        );
        assert!(!erase_credentials(&c, "reg.example:5000").expect("erase again"));
    }

    #[test]
    fn credential_helper_protocol() {
        let d = tempfile::tempdir().expect("tmp");
        let bin = d.path().join("bin");
        std::fs::create_dir(&bin).expect("mkdir");
        let script = bin.join("docker-credential-kilntest");
        std::fs::write(
            &script,
            "#!/bin/sh\nread server\nif [ \"$1\" = get ] && [ \"$server\" = helper.example ]; then\n  printf '{\"ServerURL\":\"%s\",\"Username\":\"bob\",\"Secret\":\"pw\"}' \"$server\"\nelse\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
        )
        .expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::write(
            d.path().join("config.json"),
            r#"{"credHelpers":{"helper.example":"kilntest"},"auths":{"helper.example":{"auth":"YTpi"}}}"#,
        )
        .expect("write");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // Only this test changes PATH, to a superset of the old value.
        std::env::set_var("PATH", path);
        let c = cfg(d.path());
        let got = lookup_credentials(&c, "helper.example").expect("helper");
        assert_eq!(
            got.map(|c| (c.username, c.password)),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(
            lookup_credentials(&c, "nohelper.example").expect("none"),
            None
        );
    }
}
