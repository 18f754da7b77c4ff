//! `ADD https://…` and https build contexts trust what the registry client
//! trusts: the system store, `SSL_CERT_FILE`, `SSL_CERT_DIR` and kiln's
//! `certs.d/HOST:PORT/*.crt` (issue 15 item 3). The server is
//! `openssl s_server -WWW` on 127.0.0.1 with a certificate from a private
//! test CA (the registry tests' `make_certs`).
//!
//! Needs root, busybox-static and openssl: under CI=true a missing tool
//! fails the test, elsewhere the test prints "not run".

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::context;
use common::registry::{free_port, make_certs, ready, Client};

/// `openssl s_server -WWW` serving `dir/www` over TLS, killed on drop.
struct Https {
    child: Child,
    port: u16,
    /// `ca.crt`, `server.crt`, `server.key` and `www/`.
    dir: tempfile::TempDir,
}

impl Https {
    fn start() -> Https {
        let dir = tempfile::tempdir().expect("tmp");
        make_certs(dir.path());
        let www = dir.path().join("www");
        std::fs::create_dir(&www).expect("www");
        let port = free_port();
        let child = Command::new("openssl")
            .args(["s_server", "-WWW", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(dir.path().join("server.crt"))
            .arg("-key")
            .arg(dir.path().join("server.key"))
            .current_dir(&www)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "openssl s_server did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Https { child, port, dir }
    }

    fn put(&self, name: &str, body: &[u8]) {
        std::fs::write(self.dir.path().join("www").join(name), body).expect("put");
    }

    fn url(&self, name: &str) -> String {
        format!("https://127.0.0.1:{}/{name}", self.port)
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }
}

impl Drop for Https {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `kiln build -q -t TAG CTX` with the environment `env` (and no
/// SSL_CERT_* of the test's own environment).
fn build(c: &Client, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = c.cmd();
    cmd.env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .env_remove("GIT_SSL_CAINFO");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.arg("build")
        .arg("-q")
        .args(args)
        .output()
        .expect("kiln")
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "build failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn failed(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "build should fail\nstdout:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn add_https_url_trusts_ssl_cert_file_ssl_cert_dir_and_certs_d() {
    if !ready(&["openssl"]) {
        return;
    }
    let srv = Https::start();
    srv.put("hello.txt", b"hello over tls\n");
    let c = Client::new(true);
    let df = format!("FROM busybox\nADD {} /f\n", srv.url("hello.txt"));
    let ctx = context(&[("Dockerfile", &df)]);
    let ctx_s = ctx.path().to_str().expect("utf8");
    let cat = |tag: &str| c.stdout(&["run", "--rm", tag, "cat", "/f"]);

    // The private CA is in no store: the server is not trusted, and the
    // error says where kiln looks for CAs.
    let err = failed(&build(&c, &[], &["-t", "a:0", ctx_s]));
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(err.contains("SSL_CERT_FILE"), "{err}");

    // SSL_CERT_FILE: a PEM bundle.
    ok(&build(
        &c,
        &[("SSL_CERT_FILE", &srv.ca())],
        &["-t", "a:1", ctx_s],
    ));
    assert_eq!(cat("a:1"), "hello over tls");

    // SSL_CERT_DIR: a directory of PEM files (other files are passed over).
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::copy(srv.ca(), dir.path().join("test-ca.pem")).expect("ca");
    std::fs::write(dir.path().join("README"), "not a certificate\n").expect("readme");
    ok(&build(
        &c,
        &[("SSL_CERT_DIR", dir.path())],
        &["-t", "a:2", ctx_s],
    ));
    assert_eq!(cat("a:2"), "hello over tls");

    // kiln's per-host CAs: certs.d/127.0.0.1:PORT/ca.crt.
    let host = format!("127.0.0.1:{}", srv.port);
    let certs = c.conf.path().join("kiln/certs.d").join(&host);
    std::fs::create_dir_all(&certs).expect("mkdir");
    std::fs::copy(srv.ca(), certs.join("ca.crt")).expect("ca");
    ok(&build(&c, &[], &["-t", "a:3", ctx_s]));
    assert_eq!(cat("a:3"), "hello over tls");
    std::fs::remove_dir_all(&certs).expect("rm certs.d");

    // Another CA does not make the server trusted (the same subject name,
    // another key: rustls says BadSignature).
    let other = tempfile::tempdir().expect("tmp");
    make_certs(other.path());
    let err = failed(&build(
        &c,
        &[("SSL_CERT_FILE", &other.path().join("ca.crt"))],
        &["-t", "a:4", ctx_s],
    ));
    assert!(
        err.contains("invalid peer certificate") && err.contains("not signed by a trusted CA"),
        "{err}"
    );
}

#[test]
fn hostile_ca_settings_fail_clearly_and_do_not_hang() {
    if !ready(&["openssl"]) {
        return;
    }
    let srv = Https::start();
    srv.put("hello.txt", b"hi\n");
    let c = Client::new(true);
    let df = format!("FROM busybox\nADD {} /f\n", srv.url("hello.txt"));
    let ctx = context(&[("Dockerfile", &df)]);
    let ctx_s = ctx.path().to_str().expect("utf8");
    let d = tempfile::tempdir().expect("tmp");

    let empty = d.path().join("empty.pem");
    std::fs::write(&empty, "no certificate here\n").expect("write");
    let err = failed(&build(&c, &[("SSL_CERT_FILE", &empty)], &[ctx_s]));
    assert!(err.contains("no PEM certificate"), "{err}");

    let missing = d.path().join("missing.pem");
    let err = failed(&build(&c, &[("SSL_CERT_FILE", &missing)], &[ctx_s]));
    assert!(err.contains("missing.pem"), "{err}");

    let big = d.path().join("big.pem");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(64 << 20))
        .expect("big");
    let err = failed(&build(&c, &[("SSL_CERT_FILE", &big)], &[ctx_s]));
    assert!(err.contains("larger than"), "{err}");

    // A FIFO is refused at once, not read forever.
    let fifo = d.path().join("fifo.pem");
    let status = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    let t0 = Instant::now();
    let err = failed(&build(&c, &[("SSL_CERT_FILE", &fifo)], &[ctx_s]));
    assert!(err.contains("not a regular file"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[test]
fn https_build_context_trusts_ssl_cert_file() {
    if !ready(&["openssl"]) {
        return;
    }
    let srv = Https::start();
    let src = context(&[
        ("Dockerfile", "FROM busybox\nCOPY a.txt /a.txt\n"),
        ("a.txt", "from a tarball over tls"),
    ]);
    let tar = Command::new("tar")
        .arg("-C")
        .arg(src.path())
        .args(["-czf", "-", "."])
        .output()
        .expect("tar");
    assert!(tar.status.success());
    srv.put("ctx.tar.gz", &tar.stdout);
    srv.put("Dockerfile", b"FROM busybox\nRUN echo remote > /r\n");
    let c = Client::new(true);

    let err = failed(&build(&c, &[], &["-t", "c:0", &srv.url("ctx.tar.gz")]));
    assert!(err.contains("UnknownIssuer"), "{err}");
    ok(&build(
        &c,
        &[("SSL_CERT_FILE", &srv.ca())],
        &["-t", "c:1", &srv.url("ctx.tar.gz")],
    ));
    assert_eq!(
        c.stdout(&["run", "--rm", "c:1", "cat", "/a.txt"]),
        "from a tarball over tls"
    );
    ok(&build(
        &c,
        &[("SSL_CERT_FILE", &srv.ca())],
        &["-t", "c:2", &srv.url("Dockerfile")],
    ));
    assert_eq!(c.stdout(&["run", "--rm", "c:2", "cat", "/r"]), "remote");
}

/// Runs git, asserting success.
fn git(dir: &Path, args: &[&str]) {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .expect("git");
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// git reads the system bundle only: kiln hands it the same roots as its
/// own clients (`SSL_CERT_FILE`, certs.d) for `ADD https://….git` and git
/// build contexts.
#[test]
fn git_over_https_trusts_ssl_cert_file_and_certs_d() {
    if !ready(&["openssl", "git"]) {
        return;
    }
    let srv = Https::start();
    // A dumb-HTTP repository: s_server serves files by path, so the
    // smart-protocol probe's URL is a file holding the plain refs.
    let src = tempfile::tempdir().expect("tmp");
    git(src.path(), &["init", "-q"]);
    std::fs::write(
        src.path().join("Dockerfile"),
        "FROM busybox\nCOPY g.txt /g.txt\n",
    )
    .expect("w");
    std::fs::write(src.path().join("g.txt"), "from git over tls").expect("w");
    git(src.path(), &["add", "."]);
    git(src.path(), &["commit", "-qm", "one"]);
    let bare = srv.dir.path().join("www/repo.git");
    let bare_s = bare.to_str().expect("utf8");
    git(src.path(), &["clone", "-q", "--bare", ".", bare_s]);
    git(&bare, &["update-server-info"]);
    std::fs::copy(
        bare.join("info/refs"),
        bare.join("info/refs?service=git-upload-pack"),
    )
    .expect("refs");
    let url = srv.url("repo.git");
    let c = Client::new(true);

    let err = failed(&build(&c, &[], &["-t", "g:0", &url]));
    assert!(err.contains("certificate"), "{err}");
    ok(&build(
        &c,
        &[("SSL_CERT_FILE", &srv.ca())],
        &["-t", "g:1", &url],
    ));
    assert_eq!(
        c.stdout(&["run", "--rm", "g:1", "cat", "/g.txt"]),
        "from git over tls"
    );
    // ADD of the repository, trusted through certs.d.
    let host = format!("127.0.0.1:{}", srv.port);
    let certs = c.conf.path().join("kiln/certs.d").join(&host);
    std::fs::create_dir_all(&certs).expect("mkdir");
    std::fs::copy(srv.ca(), certs.join("ca.crt")).expect("ca");
    let ctx = context(&[("Dockerfile", &format!("FROM busybox\nADD {url} /src/\n"))]);
    ok(&build(
        &c,
        &[],
        &["-t", "g:2", ctx.path().to_str().expect("utf8")],
    ));
    assert_eq!(
        c.stdout(&["run", "--rm", "g:2", "cat", "/src/g.txt"]),
        "from git over tls"
    );
}
