//! A real registry for the CLI's end-to-end tests: Debian's
//! `docker-registry` on 127.0.0.1 (plain, htpasswd or TLS from a test CA,
//! access log on) and a kiln client with private config directories.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::Kiln;

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Common prerequisites plus `tools`.
pub fn ready(tools: &[&str]) -> bool {
    if !super::prerequisites() {
        return false;
    }
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "registry tests need {} (apt-get install docker-registry skopeo apache2-utils openssl)",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg}");
    }
    eprintln!("{msg}: not run");
    false
}

/// A docker-registry process on 127.0.0.1:<free port>, killed on drop.
pub struct Reg {
    child: Child,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// Config, data, certificates and `registry.log`.
    pub dir: tempfile::TempDir,
}

#[derive(Default)]
pub struct RegOpts {
    /// Basic auth with this user and password.
    pub htpasswd: Option<(String, String)>,
    /// TLS with a server certificate from a test CA (`ca.crt` in `dir`).
    pub tls: bool,
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Runs `cmd` and asserts it succeeded.
pub fn sh(cmd: &mut Command) -> Output {
    let o = cmd.output().expect("spawn");
    assert!(
        o.status.success(),
        "{cmd:?} failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

impl Reg {
    /// Starts a registry and waits until it accepts connections.
    pub fn start(o: RegOpts) -> Reg {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: kiln-test-secret\n",
            d.join("data").display()
        );
        if o.tls {
            make_certs(d);
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                d.join("server.crt").display(),
                d.join("server.key").display()
            ));
        }
        if let Some((u, p)) = &o.htpasswd {
            sh(Command::new("htpasswd")
                .args(["-Bbc"])
                .arg(d.join("htpasswd"))
                .args([u, p]));
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                d.join("htpasswd").display()
            ));
        }
        std::fs::write(d.join("config.yml"), cfg).expect("config");
        let log = std::fs::File::create(d.join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("docker-registry");
        let reg = Reg { child, port, dir };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "registry did not come up: {}",
                reg.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        reg
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's output so far, access log included.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Blob GETs in `log` under repository `repo`: digest -> count.
    pub fn blob_gets(log: &str, repo: &str) -> BTreeMap<String, usize> {
        let needle = format!("\"GET /v2/{repo}/blobs/");
        let mut out = BTreeMap::new();
        for l in log.lines() {
            if let Some(i) = l.find(&needle) {
                let rest = &l[i + needle.len()..];
                let d: String = rest.chars().take_while(|c| *c != ' ').collect();
                *out.entry(d).or_default() += 1;
            }
        }
        out
    }
}

impl Drop for Reg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a server certificate for 127.0.0.1 signed by it.
pub fn make_certs(d: &Path) {
    let p = |n: &str| d.join(n).display().to_string();
    sh(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=kiln test CA",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.crt"),
    ]));
    sh(Command::new("openssl").args([
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &p("server.key"),
        "-out",
        &p("server.csr"),
    ]));
    std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    sh(Command::new("openssl").args([
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p("ext.cnf"),
        "-out",
        &p("server.crt"),
    ]));
}

/// kiln with private docker/kiln config directories.
pub struct Client {
    /// The store.
    pub kiln: Kiln,
    /// DOCKER_CONFIG, KILN_CONFIG_DIR and XDG_CONFIG_HOME live here.
    pub conf: tempfile::TempDir,
}

impl Client {
    /// A private store (with the busybox image when `busybox`) and
    /// private config directories.
    pub fn new(busybox: bool) -> Client {
        Client {
            kiln: if busybox {
                Kiln::with_busybox()
            } else {
                Kiln::new()
            },
            conf: tempfile::tempdir().expect("tmp"),
        }
    }
    /// `kiln` with the store and config directories set.
    pub fn cmd(&self) -> Command {
        let mut c = self.kiln.cmd();
        c.env("DOCKER_CONFIG", self.conf.path().join("docker"));
        c.env("KILN_CONFIG_DIR", self.conf.path().join("kiln"));
        c.env("XDG_CONFIG_HOME", self.conf.path().join("xdg"));
        c
    }
    /// Runs kiln.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("kiln")
    }
    /// Runs kiln, asserts success; stdout and stderr together.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "kiln {args:?} failed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }
    /// Runs kiln, asserts success; stdout, trimmed.
    pub fn stdout(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "kiln {args:?} failed\nstderr:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
    /// `kiln build -q` with `extra`: the image ID.
    pub fn build(&self, ctx: &Path, extra: &[&str]) -> String {
        let mut a = vec!["build", "-q"];
        a.extend_from_slice(extra);
        a.push(ctx.to_str().expect("utf8"));
        self.stdout(&a)
    }
}

/// An HTTP proxy on 127.0.0.1 in front of a registry that refuses
/// request bodies of unknown length (chunked transfer encoding) with 411
/// Length Required, as some registries do; everything else goes through,
/// one request per connection.
pub struct NoStreamProxy {
    /// The port on 127.0.0.1.
    pub port: u16,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl NoStreamProxy {
    /// A proxy for the registry on 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> NoStreamProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = refused.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let count = count.clone();
                std::thread::spawn(move || {
                    let _ = proxy_one(c, upstream, &count);
                });
            }
        });
        NoStreamProxy { port, refused }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Requests refused with 411 so far.
    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn proxy_one(
    client: TcpStream,
    upstream: u16,
    refused: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut r = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_string());
    }
    let header = |name: &str| {
        head.iter().skip(1).find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let mut out = client;
    if header("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        // Read the whole chunked body, then refuse it.
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            let mut skip = vec![0u8; n + 2];
            r.read_exact(&mut skip)?;
            if n == 0 {
                break;
            }
        }
        refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        out.write_all(
            b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let len: usize = header("Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut req = String::new();
    for h in &head {
        if !h.to_ascii_lowercase().starts_with("connection:") {
            req.push_str(h);
            req.push_str("\r\n");
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    up.write_all(req.as_bytes())?;
    up.write_all(&body)?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    out.write_all(&resp)
}

/// A TCP proxy on 127.0.0.1 in front of a registry that sends the
/// registry's answers on at most `rate` bytes a second (requests go
/// through unthrottled): a large pull through it takes long enough to be
/// interrupted in the middle of a blob.
pub struct SlowProxy {
    /// The port on 127.0.0.1.
    pub port: u16,
}

impl SlowProxy {
    /// A proxy for the registry on 127.0.0.1:`upstream`.
    pub fn start(upstream: u16, rate: usize) -> SlowProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = slow_one(c, upstream, rate);
                });
            }
        });
        SlowProxy { port }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn slow_one(client: TcpStream, upstream: u16, rate: usize) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let server = TcpStream::connect(("127.0.0.1", upstream))?;
    let (mut c_in, mut s_out) = (client.try_clone()?, server.try_clone()?);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_in, &mut s_out);
        let _ = s_out.shutdown(std::net::Shutdown::Write);
    });
    let (mut s_in, mut c_out) = (server, client);
    // Chunks of a tenth of the rate, one every 100 ms.
    let mut buf = vec![0u8; (rate / 10).max(1)];
    loop {
        let n = s_in.read(&mut buf)?;
        if n == 0 {
            let _ = c_out.shutdown(std::net::Shutdown::Write);
            return Ok(());
        }
        c_out.write_all(&buf[..n])?;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Uploads `body` as a blob of `repo` (POST, then one PUT with the
/// bytes), whatever they are: what an attacker's own client can push.
/// Returns its digest.
pub fn push_blob(reg: &Reg, repo: &str, body: &[u8]) -> String {
    let digest = kiln_image::Digest::sha256_of(body).to_string();
    let request = |head: String, body: &[u8]| -> String {
        let mut s = TcpStream::connect(("127.0.0.1", reg.port)).expect("connect");
        s.write_all(head.as_bytes()).expect("write");
        s.write_all(body).expect("write");
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp
    };
    let resp = request(
        format!(
            "POST /v2/{repo}/blobs/uploads/ HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            reg.host()
        ),
        b"",
    );
    assert!(resp.starts_with("HTTP/1.1 202"), "POST upload: {resp}");
    let location = resp
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_string())
        })
        .expect("Location");
    let path = match location.find("/v2/") {
        Some(i) => location[i..].to_string(),
        None => location,
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let resp = request(
        format!(
            "PUT {path}{sep}digest={digest} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            reg.host(),
            body.len()
        ),
        body,
    );
    assert!(resp.starts_with("HTTP/1.1 201"), "PUT blob: {resp}");
    digest
}

/// PUTs `body` as a manifest of `media_type` at `/v2/{repo}/manifests/{reference}`.
pub fn put_manifest(reg: &Reg, repo: &str, reference: &str, media_type: &str, body: &[u8]) {
    let mut s = TcpStream::connect(("127.0.0.1", reg.port)).expect("connect");
    let head = format!(
        "PUT /v2/{repo}/manifests/{reference} HTTP/1.1\r\nHost: {}\r\nContent-Type: {media_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reg.host(),
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("write");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(
        resp.starts_with("HTTP/1.1 201"),
        "PUT {repo}:{reference}: {}",
        resp.lines().next().unwrap_or_default()
    );
}

/// The raw manifest at `docker://REF`.
pub fn raw(reference: &str) -> Vec<u8> {
    sh(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]))
    .stdout
}

pub fn descriptor(reference: &str, platform: serde_json::Value) -> serde_json::Value {
    let bytes = raw(reference);
    let m: serde_json::Value = serde_json::from_slice(&bytes).expect("manifest");
    serde_json::json!({
        "mediaType": m["mediaType"],
        "digest": kiln_image::Digest::sha256_of(&bytes).to_string(),
        "size": bytes.len(),
        "platform": platform,
    })
}

/// Imports each (tag, rootfs tar, platform) of `images` as
/// `REG/kiln/busybox:TAG` for its platform, pushes it, and pushes the OCI
/// index of them all as `REG/kiln/busybox:INDEX_TAG`; returns the index's
/// reference.
pub fn push_busybox_index(
    reg: &Reg,
    index_tag: &str,
    images: &[(&str, std::path::PathBuf, &str)],
) -> String {
    let c = Client::new(false);
    let repo = format!("{}/kiln/busybox", reg.host());
    let mut manifests = Vec::new();
    for (tag, tar, platform) in images {
        let name = format!("{repo}:{tag}");
        c.ok(&[
            "import",
            "--platform",
            platform,
            tar.to_str().expect("utf-8"),
            &name,
        ]);
        c.ok(&["push", "-q", &name]);
        let p: Vec<&str> = platform.split('/').collect();
        let mut pj = serde_json::json!({"os": p[0], "architecture": p[1]});
        if let Some(v) = p.get(2) {
            pj["variant"] = serde_json::json!(v);
        }
        manifests.push(descriptor(&name, pj));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    put_manifest(
        reg,
        "kiln/busybox",
        index_tag,
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).expect("json"),
    );
    format!("{repo}:{index_tag}")
}

/// `podman load -i TAR` into a private podman store under `dir` (runc,
/// vfs: the host's store is left alone), then `podman run --rm --network
/// none` with this host's hard limits (podman's defaults are above them)
/// and `args` (options, image, command); returns its stdout.
pub fn podman_load_run(dir: &Path, tar: &Path, args: &[&str]) -> String {
    let proot = dir.join("podman-root");
    let prun = dir.join("podman-run");
    let podman = || {
        let mut c = Command::new("podman");
        c.arg("--root").arg(&proot).arg("--runroot").arg(&prun);
        c.args(["--runtime", "runc", "--storage-driver", "vfs"]);
        c
    };
    sh(podman().args(["load", "-i"]).arg(tar));
    let nofile = sh(Command::new("sh").args(["-c", "ulimit -Hn"])).stdout;
    let nofile = String::from_utf8_lossy(&nofile).trim().to_string();
    let o = sh(podman()
        .args(["run", "--rm", "--network", "none", "--ulimit"])
        .arg(format!("nofile={nofile}:{nofile}"))
        .args(["--ulimit", "nproc=32768:32768"])
        .args(args));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `kiln save --platform linux/arm64` of `image` (from `c`'s store) into
/// `dir`, loaded and run by podman ([`podman_load_run`]) as `uname -m`
/// for linux/arm64; returns the output, trimmed (`aarch64` under QEMU).
pub fn podman_uname_arm64(c: &Client, dir: &Path, image: &str) -> String {
    let tar = dir.join("arm64.tar");
    c.ok(&[
        "save",
        "--platform",
        "linux/arm64",
        "-o",
        tar.to_str().expect("utf-8"),
        image,
    ]);
    podman_load_run(
        dir,
        &tar,
        &["--platform", "linux/arm64", image, "uname", "-m"],
    )
    .trim()
    .to_string()
}
