//! Hostile inputs that must not exhaust kiln or leak through it (issue 14,
//! items 4, 5 and 7): a step that floods its output, ARGs that double
//! themselves, a Dockerfile that is a device or a FIFO, HTTP servers that
//! redirect to `file://`, stay silent, or name another host for an upload;
//! a `save` killed mid-write, the umask of output files, and a closed
//! stdout.
//!
//! The HTTP servers are small in-process fakes (a thread per connection).
//! `KILN_E2E_BIN=/path/to/old/kiln` (tests/common) runs the suite against
//! another build.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{context, prerequisites, Kiln};

/// Runs `cmd`, killing it after `limit`; `None` when it had to be killed.
fn run_with_limit(cmd: &mut Command, limit: Duration) -> Option<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let t0 = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return Some(child.wait_with_output().expect("output"));
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Caps the child's address space, so that old code that reads without
/// bound fails fast instead of taking the machine's memory.
fn cap_memory(cmd: &mut Command, bytes: u64) {
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------
// A fake HTTP server.

/// What the fake does with one request (its head, lower-cased header
/// names kept as sent).
enum Reply {
    /// Send these bytes and close.
    Send(Vec<u8>),
    /// Keep the connection open and say nothing.
    Silence,
    /// Send this head, then a body of one byte a second (until the
    /// client goes away).
    Drip(Vec<u8>),
}

struct Fake {
    port: u16,
    /// Every request head received.
    heads: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    fn start(handler: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let h2 = heads.clone();
        let handler = Arc::new(handler);
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let heads = h2.clone();
                let handler = handler.clone();
                std::thread::spawn(move || serve(c, &heads, &*handler));
            }
        });
        Fake { port, heads }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("lock").clone()
    }
}

fn serve(mut c: TcpStream, heads: &Mutex<Vec<String>>, handler: &dyn Fn(&str) -> Reply) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let n = match c.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&b[..n]);
        // A TLS ClientHello: this server speaks plain HTTP.
        if buf[0] == 0x16 {
            return;
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = text(&buf[..end]);
            heads.lock().expect("lock").push(head.clone());
            match handler(&head) {
                Reply::Send(r) => {
                    let _ = c.write_all(&r);
                    return;
                }
                Reply::Silence => {
                    std::thread::sleep(Duration::from_secs(600));
                    return;
                }
                Reply::Drip(head) => {
                    if c.write_all(&head).is_err() {
                        return;
                    }
                    for _ in 0..600 {
                        if c.write_all(b" ").is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    return;
                }
            }
        }
    }
}

/// A config directory whose `docker/config.json` holds a login (user
/// `user`, password `secret`) for `host`; `kiln` reads it with
/// `DOCKER_CONFIG=DIR/docker` and `KILN_CONFIG_DIR=DIR/kiln`.
fn config_with_login(host: &str) -> tempfile::TempDir {
    let conf = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(conf.path().join("docker")).expect("mkdir");
    std::fs::write(
        conf.path().join("docker/config.json"),
        format!("{{\"auths\":{{\"{host}\":{{\"auth\":\"dXNlcjpzZWNyZXQ=\"}}}}}}"),
    )
    .expect("config");
    conf
}

fn response(status: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    Reply::Send(r.into_bytes())
}

// ---------------------------------------------------------------------
// Item 4: memory.

/// The peak RSS (VmHWM, KiB) of a running process, polled until it ends.
fn wait_peak_rss(child: &mut Child, limit: Duration) -> (Option<std::process::ExitStatus>, u64) {
    let pid = child.id();
    let mut peak = 0;
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kb) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(kb);
            }
        }
        if let Some(st) = child.try_wait().expect("wait") {
            return (Some(st), peak);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return (None, peak);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_step_that_floods_its_output_is_clipped_and_memory_stays_flat() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    // 32 MiB of two-byte lines: 16 million lines.
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN yes | head -c 33554432; echo done-flooding >&2\n",
    )]);
    let log = tempfile::NamedTempFile::new().expect("tmp");
    let mut cmd = k.cmd();
    cmd.args(["build", "--progress=plain", "-t", "flood:1"])
        .arg(ctx.path())
        .stdout(Stdio::null())
        .stderr(log.reopen().expect("reopen"));
    cap_memory(&mut cmd, 4 << 30);
    let mut child = cmd.spawn().expect("spawn");
    let (status, peak_kb) = wait_peak_rss(&mut child, Duration::from_secs(300));
    let out = std::fs::read_to_string(log.path()).unwrap_or_default();
    let status = status.expect("the build did not end within 300 s");
    assert!(
        status.success(),
        "build failed: {}",
        &out[out.len().saturating_sub(3000)..]
    );
    assert!(
        out.contains("[output clipped, log limit 2MiB reached]"),
        "no clip note in the log ({} bytes)",
        out.len()
    );
    // The stderr stream has its own budget: its line gets through.
    assert!(out.contains("done-flooding"), "stderr line missing");
    // 2 MiB of 'y' lines is a million lines of "#N 0.123 y".
    assert!(out.len() < 24 << 20, "log is {} bytes", out.len());
    eprintln!("peak RSS of kiln during the flood: {} MiB", peak_kb >> 10);
    assert!(
        peak_kb < 200 << 10,
        "kiln grew to {} MiB while the step printed 32 MiB",
        peak_kb >> 10
    );
}

#[test]
fn args_that_double_themselves_stop_at_the_limit_with_a_located_error() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let mut df = String::from("FROM busybox\nARG a=0123456789abcdef\n");
    for _ in 0..20 {
        df.push_str("ARG a=$a$a\n");
    }
    df.push_str("ENV v=$a\nLABEL l=$a\n");
    let ctx = context(&[("Dockerfile", &df)]);
    let mut cmd = k.cmd();
    cmd.args(["build", "-q"]).arg(ctx.path());
    cap_memory(&mut cmd, 8 << 30);
    let out = run_with_limit(&mut cmd, Duration::from_secs(120)).expect("build hung");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the build succeeded: {err}");
    // 16 bytes doubled 16 times is 1 MiB: the 17th doubling (line 19)
    // passes the limit.
    assert!(err.contains("more than 1 MiB"), "{err}");
    assert!(err.contains("Dockerfile:19:"), "no file:line:col: {err}");
    assert!(
        err.contains("ARG a=$a$a") && err.contains('^'),
        "no caret: {err}"
    );
}

#[test]
fn a_dockerfile_that_is_a_device_a_fifo_or_a_host_file_is_refused() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let secret = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(secret.path(), "SECRET-FIRST-LINE of a host file\n").expect("write");
    type Make<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Make, &str)> = vec![
        (
            "symlink to /dev/zero",
            Box::new(|d: &Path| {
                std::os::unix::fs::symlink("/dev/zero", d.join("Dockerfile")).expect("symlink")
            }),
            "not found inside the build context",
        ),
        (
            "FIFO",
            Box::new(|d: &Path| {
                let p = std::ffi::CString::new(d.join("Dockerfile").to_str().expect("utf8"))
                    .expect("cstr");
                // SAFETY: valid path.
                assert_eq!(unsafe { libc::mkfifo(p.as_ptr(), 0o644) }, 0);
            }),
            "is a FIFO, not a regular file",
        ),
        (
            "symlink to a host file",
            Box::new(|d: &Path| {
                std::os::unix::fs::symlink(secret.path(), d.join("Dockerfile")).expect("symlink")
            }),
            "not found inside the build context",
        ),
    ];
    for (what, make, want) in cases {
        let ctx = tempfile::tempdir().expect("tmp");
        make(ctx.path());
        let mut cmd = k.cmd();
        cmd.args(["build", "-q"]).arg(ctx.path());
        cap_memory(&mut cmd, 4 << 30);
        let out = run_with_limit(&mut cmd, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{what}: the build hung"));
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{what}: the build succeeded");
        assert!(err.contains(want), "{what}: {err}");
        assert!(
            !err.contains("SECRET-FIRST-LINE"),
            "{what}: host file shown: {err}"
        );
    }
    // -f names a device: refused as one.
    let ctx = context(&[("f", "x")]);
    let mut cmd = k.cmd();
    cmd.args(["build", "-q", "-f", "/dev/zero"]).arg(ctx.path());
    cap_memory(&mut cmd, 4 << 30);
    let out = run_with_limit(&mut cmd, Duration::from_secs(30)).expect("-f /dev/zero hung");
    let err = text(&out.stderr);
    assert!(
        err.contains("is a character device, not a regular file"),
        "{err}"
    );
}

// ---------------------------------------------------------------------
// Item 5: network.

#[test]
fn a_redirect_to_file_is_a_clear_error_not_a_panic() {
    if !prerequisites() {
        return;
    }
    // The API root answers (so a registry client gets past its ping);
    // everything else redirects to a local file.
    let fake = Fake::start(|head| {
        if head.starts_with("GET /v2/ ") {
            return response("200 OK", &[], "{}");
        }
        response("302 Found", &[("Location", "file:///etc/passwd")], "")
    });
    let k = Kiln::with_busybox();
    // ADD <url>
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM busybox\nADD http://{}/f /f\n", fake.host()),
    )]);
    let out = run_with_limit(
        k.cmd().args(["build", "-q"]).arg(ctx.path()),
        Duration::from_secs(60),
    )
    .expect("ADD hung");
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("only http:// and https://"), "{err}");
    // pull
    let out = run_with_limit(
        k.cmd().args(["pull", &format!("{}/img:1", fake.host())]),
        Duration::from_secs(60),
    )
    .expect("pull hung");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("only http:// and https://"), "{err}");
}

#[test]
fn a_silent_server_times_out_pull_and_add() {
    if !prerequisites() {
        return;
    }
    let fake = Fake::start(|_| Reply::Silence);
    // Silent even to TLS: a listener that accepts and never reads.
    let mute = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mute_port = mute.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in mute.incoming().flatten() {
            held.push(c);
        }
    });
    let k = Kiln::with_busybox();
    let timeouts = |c: &mut Command| {
        c.env("KILN_IDLE_TIMEOUT", "2")
            .env("KILN_CONNECT_TIMEOUT", "2");
    };
    for host in [fake.host(), format!("127.0.0.1:{mute_port}")] {
        let mut cmd = k.cmd();
        timeouts(&mut cmd);
        cmd.args(["pull", &format!("{host}/img:1")]);
        let err = fails_within_30s(&mut cmd, &format!("pull from a silent {host}"));
        assert!(err.contains("timed out"), "{err}");
    }
    // push: the same client, the same bound.
    let target = format!("127.0.0.1:{mute_port}/img:1");
    k.ok(&["tag", "busybox:latest", &target]);
    let mut cmd = k.cmd();
    timeouts(&mut cmd);
    cmd.args(["push", &target]);
    let err = fails_within_30s(&mut cmd, "push to a silent registry");
    assert!(err.contains("timed out"), "{err}");
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM busybox\nADD http://{}/f /f\n", fake.host()),
    )]);
    let mut cmd = k.cmd();
    timeouts(&mut cmd);
    cmd.args(["build", "-q"]).arg(ctx.path());
    let err = fails_within_30s(&mut cmd, "ADD from a silent server");
    assert!(
        err.contains("timed out") || err.contains("Timed out"),
        "{err}"
    );
}

/// Runs `cmd`, which must fail, and within 30 s (it is given 60); gives
/// its stderr.
fn fails_within_30s(cmd: &mut Command, what: &str) -> String {
    let t0 = Instant::now();
    let out = run_with_limit(cmd, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("{what} still running after 60 s"));
    let took = t0.elapsed();
    assert!(!out.status.success(), "{what} succeeded");
    assert!(took < Duration::from_secs(30), "{what} took {took:?}");
    text(&out.stderr)
}

/// A registry that answers `/v2/` and sends a manifest one byte a second
/// (Content-Length 100000).
fn dripping_registry() -> Fake {
    Fake::start(|head| {
        if head.contains("/manifests/") {
            Reply::Drip(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 100000\r\n\r\n"
                    .to_vec(),
            )
        } else {
            response(
                "200 OK",
                &[("Docker-Distribution-API-Version", "registry/2.0")],
                "{}",
            )
        }
    })
}

#[test]
fn a_manifest_sent_a_byte_a_second_is_bounded_in_total_and_ctrl_c_ends_the_pull() {
    if !prerequisites() {
        return;
    }
    let fake = dripping_registry();
    let k = Kiln::new();
    // The total bound: not the idle timeout, which a byte a second never
    // trips.
    let mut cmd = k.cmd();
    cmd.env("KILN_REQUEST_TIMEOUT", "3")
        .args(["pull", &format!("{}/img:1", fake.host())]);
    let err = fails_within_30s(&mut cmd, "pull of a dripping manifest");
    assert!(err.contains("timed out"), "{err}");
    // Ctrl-C: kiln ends within a few seconds, exit 130.
    let mut child = k
        .cmd()
        .args(["pull", &format!("{}/img:1", fake.host())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if t1.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = status.expect("kiln pull ignored SIGINT for 10 s");
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(k.ok(&["images", "-q"]).trim().is_empty());
}

#[test]
fn push_sends_no_credentials_to_another_host_named_in_an_upload_location() {
    if !prerequisites() {
        return;
    }
    // The second host: records what it is sent, refuses the upload.
    let other = Fake::start(|_| response("400 Bad Request", &[], "no"));
    let other_host = other.host();
    // The registry: basic auth, no blobs, uploads go to the other host.
    let registry = Fake::start(move |head| {
        let authed = head
            .to_ascii_lowercase()
            .contains("\r\nauthorization: basic");
        let first = head.lines().next().unwrap_or_default().to_string();
        if !authed {
            return response(
                "401 Unauthorized",
                &[("WWW-Authenticate", "Basic realm=\"kiln-test\"")],
                "",
            );
        }
        if first.starts_with("GET /v2/ ") {
            return response("200 OK", &[], "{}");
        }
        if first.starts_with("HEAD ") {
            return response("404 Not Found", &[], "");
        }
        if first.starts_with("POST ") && first.contains("/blobs/uploads/") {
            let loc = format!("http://{other_host}/upload/1?state=x");
            return response("202 Accepted", &[("Location", &loc)], "");
        }
        response("404 Not Found", &[], "")
    });
    let k = Kiln::with_busybox();
    let conf = config_with_login(&registry.host());
    let target = format!("{}/repo:1", registry.host());
    k.ok(&["tag", "busybox:latest", &target]);
    let out = run_with_limit(
        k.cmd()
            .env("DOCKER_CONFIG", conf.path().join("docker"))
            .env("KILN_CONFIG_DIR", conf.path().join("kiln"))
            .args(["push", &target]),
        Duration::from_secs(120),
    )
    .expect("push hung");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the push cannot succeed: {err}");
    let sent = other.heads();
    assert!(
        !sent.is_empty(),
        "the upload never went to the other host: {err}"
    );
    for h in &sent {
        assert!(
            !h.to_ascii_lowercase().contains("authorization:"),
            "credentials sent to the other host:\n{h}"
        );
    }
    // The registry itself did get them.
    assert!(registry
        .heads()
        .iter()
        .any(|h| h.to_ascii_lowercase().contains("authorization: basic")));
}

// ---------------------------------------------------------------------
// Item 7: leftovers, modes, closed stdout.

/// Whether `pid` has a file open under `dir`.
fn has_file_open_in(pid: u32, dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    rd.flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(dir) && t != dir))
}

#[test]
fn save_killed_mid_write_leaves_nothing_beside_the_output() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN dd if=/dev/urandom of=/big bs=1M count=96 2>/dev/null\n",
    )]);
    k.build(ctx.path(), &["-t", "big:1"]);
    let out_dir = tempfile::tempdir().expect("tmp");
    let mut child = k
        .cmd()
        .args(["save", "-o"])
        .arg(out_dir.path().join("big.tar"))
        .arg("big:1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn save");
    let t0 = Instant::now();
    while !has_file_open_in(child.id(), out_dir.path()) {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "save ended before it could be killed"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "save never opened its output"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    // The next kiln command on the store, for good measure.
    k.ok(&["images"]);
    let left: Vec<_> = std::fs::read_dir(out_dir.path())
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left beside the output: {left:?}");
}

#[test]
fn saved_archives_honour_the_umask() {
    if !prerequisites() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let k = Kiln::with_busybox();
    let d = tempfile::tempdir().expect("tmp");
    for (umask, want) in [(0o022, 0o644), (0o027, 0o640)] {
        let p = d.path().join(format!("out-{umask:o}.tar"));
        let mut cmd = k.cmd();
        cmd.args(["save", "-o"]).arg(&p).arg("busybox:latest");
        // SAFETY: umask is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(umask);
                Ok(())
            });
        }
        let out = cmd.output().expect("save");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, want, "umask {umask:o}: mode {mode:o}");
    }
}

#[test]
fn an_oci_layout_directory_honours_the_umask() {
    if !prerequisites() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let k = Kiln::with_busybox();
    let ctx = context(&[("Dockerfile", "FROM busybox\n")]);
    let d = tempfile::tempdir().expect("tmp");
    for (umask, want) in [(0o022, 0o644), (0o027, 0o640)] {
        let out = d.path().join(format!("oci-{umask:o}"));
        let mut cmd = k.cmd();
        cmd.args(["build", "-q", "-o"])
            .arg(format!("type=oci,tar=false,dest={}", out.display()))
            .arg(ctx.path());
        // SAFETY: umask is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(umask);
                Ok(())
            });
        }
        let o = cmd.output().expect("build");
        assert!(o.status.success(), "{}", text(&o.stderr));
        let mut files = vec![out.join("index.json"), out.join("oci-layout")];
        for e in std::fs::read_dir(out.join("blobs/sha256")).expect("blobs") {
            files.push(e.expect("entry").path());
        }
        for f in files {
            let mode = std::fs::metadata(&f).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, want, "umask {umask:o}: {} mode {mode:o}", f.display());
        }
    }
}

#[test]
fn a_closed_stdout_ends_kiln_quietly() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    for args in [
        vec!["images"],
        vec!["images", "-q"],
        vec!["inspect", "busybox:latest"],
        vec!["history", "busybox:latest"],
        vec!["save", "busybox:latest"],
    ] {
        let mut fds = [0; 2];
        // SAFETY: valid out-array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds were just created and are owned here.
        let (r, w) = unsafe {
            use std::os::fd::FromRawFd;
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        // The reader is gone before kiln writes, as after `| head -0`.
        drop(r);
        let out = k
            .cmd()
            .args(&args)
            .stdout(Stdio::from(w))
            .stderr(Stdio::piped())
            .output()
            .expect("run");
        let err = text(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let code = out.status.code();
        assert!(
            code == Some(141) || code == Some(0),
            "{args:?}: exit {code:?}: {err}"
        );
    }
}

#[test]
fn one_config_limit_for_load_and_build() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    // load: a docker-archive whose config carries a 9 MiB label.
    let d = tempfile::tempdir().expect("tmp");
    let big = "x".repeat(9 << 20);
    let cfg = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Labels": {"big": big}},
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    std::fs::write(d.path().join("c.json"), cfg.to_string()).expect("write");
    std::fs::write(
        d.path().join("manifest.json"),
        r#"[{"Config":"c.json","RepoTags":["big:1"],"Layers":[]}]"#,
    )
    .expect("write");
    let tar = d.path().join("big.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(d.path())
        .arg("-cf")
        .arg(&tar)
        .args(["manifest.json", "c.json"])
        .status()
        .expect("tar");
    assert!(st.success());
    let out = k.run(&["load", "-i", tar.to_str().expect("utf8")]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a 9 MiB config was loaded");
    assert!(
        err.contains("image config is") && err.contains("more than the limit"),
        "{err}"
    );
    // build: labels that together pass the same limit fail at their line.
    let mut df = String::from("FROM busybox\nARG a=0123456789abcdef\n");
    for _ in 0..15 {
        df.push_str("ARG a=$a$a\n");
    }
    for i in 0..20 {
        df.push_str(&format!("LABEL l{i}=$a\n"));
    }
    let ctx = context(&[("Dockerfile", &df)]);
    let mut cmd = k.cmd();
    cmd.args(["build", "-q"]).arg(ctx.path());
    cap_memory(&mut cmd, 8 << 30);
    let out = run_with_limit(&mut cmd, Duration::from_secs(120)).expect("build hung");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a config over the limit was built");
    assert!(err.contains("more than the limit of 8 MiB"), "{err}");
    assert!(err.contains("| LABEL l"), "no source line: {err}");
}

#[test]
fn an_ignore_file_that_cannot_be_read_fails_the_build_instead_of_excluding_nothing() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = tempfile::tempdir().expect("tmp");
    std::fs::write(ctx.path().join("Dockerfile"), "FROM busybox\nCOPY . /c\n").expect("write");
    std::fs::write(ctx.path().join("secret.key"), "do not ship").expect("write");
    let p = std::ffi::CString::new(ctx.path().join(".dockerignore").to_str().expect("utf8"))
        .expect("cstr");
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(p.as_ptr(), 0o644) }, 0);
    let o = k.run(&["build", "-q", ctx.path().to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "built with an unreadable .dockerignore"
    );
    assert!(
        err.contains(".dockerignore is a FIFO, not a regular file"),
        "{err}"
    );
}

/// A server that sends its status line and then its headers a byte a
/// second (the idle timeout never trips) is bounded in total too: the
/// registry's ping, and an `ADD` of a URL. (Before: the total bounds were
/// checked only while a body was read, so such a server held kiln for
/// hours.)
#[test]
fn headers_sent_a_byte_a_second_are_bounded_in_total() {
    if !prerequisites() {
        return;
    }
    let fake = Fake::start(|_| Reply::Drip(b"HTTP/1.1 200 OK\r\nX-Drip: ".to_vec()));
    let k = Kiln::with_busybox();
    let mut cmd = k.cmd();
    cmd.env("KILN_REQUEST_TIMEOUT", "3")
        .args(["pull", &format!("{}/img:1", fake.host())]);
    let err = fails_within_30s(&mut cmd, "pull from a registry dripping its headers");
    assert!(err.contains("timed out"), "{err}");
    let ctx = common::context(&[(
        "Dockerfile",
        &format!("FROM busybox\nADD http://{}/f /f\n", fake.host()),
    )]);
    let mut cmd = k.cmd();
    cmd.env("KILN_FETCH_TIMEOUT", "3")
        .args(["build", "-q", ctx.path().to_str().expect("utf-8")]);
    let err = fails_within_30s(&mut cmd, "ADD of a URL dripping its headers");
    assert!(err.contains("failed to load"), "{err}");
}

/// A registry's Basic credentials go over plain HTTP only to a token
/// endpoint on the registry's own host or this machine — not to another
/// host a challenge names (before: any `http://` realm got them when the
/// registry itself was plain HTTP, as every localhost registry is).
#[test]
fn basic_credentials_never_go_over_plain_http_to_a_token_server_on_another_host() {
    if !prerequisites() {
        return;
    }
    let registry = Fake::start(|head| {
        if head
            .to_ascii_lowercase()
            .contains("\r\nauthorization: bearer")
        {
            return response("404 Not Found", &[], "");
        }
        response(
            "401 Unauthorized",
            &[(
                "WWW-Authenticate",
                "Bearer realm=\"http://tokens.kiln-test.invalid/token\",service=\"x\"",
            )],
            "",
        )
    });
    let k = Kiln::new();
    let conf = config_with_login(&registry.host());
    let mut cmd = k.cmd();
    cmd.env("DOCKER_CONFIG", conf.path().join("docker"))
        .env("KILN_CONFIG_DIR", conf.path().join("kiln"))
        .args(["pull", &format!("{}/img:1", registry.host())]);
    let err = fails_within_30s(&mut cmd, "pull with a foreign plain-HTTP realm");
    assert!(err.contains("is not HTTPS"), "{err}");
}
