//! BuildKit-era COPY/ADD features and build sources end to end (issue 7):
//! symbolic `--chmod`, `COPY --parents`, `COPY --link` layer reuse across
//! base changes, `ADD` of http(s) URLs and git repositories,
//! `--build-context`, and contexts from stdin, git and http(s) tarballs.
//! Real builds on a private store with the busybox base; every server is
//! on 127.0.0.1, started and stopped by its test.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{build_fails, context, prerequisites, sh, Kiln};

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn chmod_symbolic_is_resolved_per_file_against_its_source_mode() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\n\
             COPY --chmod=u+x,g-w,o=r f664 /a/\n\
             COPY --chmod=a+X tree /t/\n\
             COPY --chmod=go=u,u-w f640 /b\n\
             ADD --chmod=+x f640 /c\n\
             COPY --chmod=0600 f664 /d\n\
             COPY --chmod=u=rwx,go= <<EOF /e\nhello\nEOF\n",
        ),
        ("f664", "x"),
        ("f640", "y"),
        ("tree/plain", "p"),
        ("tree/exe", "e"),
        ("tree/sub/deep", "d"),
    ]);
    let c = ctx.path();
    set_mode(&c.join("f664"), 0o664);
    set_mode(&c.join("f640"), 0o640);
    set_mode(&c.join("tree/plain"), 0o640);
    set_mode(&c.join("tree/exe"), 0o744);
    set_mode(&c.join("tree/sub"), 0o700);
    set_mode(&c.join("tree/sub/deep"), 0o600);
    k.build(c, &["-t", "chmod:1"]);
    let out = sh(
        &k,
        "chmod:1",
        "cd / && stat -c '%a %n' a/f664 t/plain t/exe t/sub t/sub/deep b c d e",
    );
    assert_eq!(
        out,
        "744 a/f664\n640 t/plain\n755 t/exe\n711 t/sub\n600 t/sub/deep\n466 b\n751 c\n600 d\n700 e\n"
    );
    // A bad mode is a clear error.
    let bad = context(&[
        ("Dockerfile", "FROM busybox\nCOPY --chmod=u*x f /f\n"),
        ("f", ""),
    ]);
    let err = build_fails(&k, bad.path(), &[]);
    assert!(err.contains("invalid chmod parameter"), "{err}");
}

#[test]
fn copy_parents_keeps_parent_dirs_pivots_at_dot_and_globs() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox AS first\n\
             COPY --parents a/b/c.txt x/./y/z.txt /out/\n\
             COPY --parents */keep.txt /glob/\n\
             COPY --parents nomatch*/q /none/\n\
             COPY --parents ./dir/sub /tree\n\
             FROM busybox\n\
             COPY --from=first --parents /out/./a/b /from/\n",
        ),
        ("a/b/c.txt", "c"),
        ("x/y/z.txt", "z"),
        ("p1/keep.txt", "1"),
        ("p2/keep.txt", "2"),
        ("p2/other.txt", "o"),
        ("dir/sub/f", "f"),
        ("dir/sub/g/h", "h"),
    ]);
    set_mode(&ctx.path().join("a/b"), 0o750);
    k.build(ctx.path(), &["-t", "parents:1", "--target", "first"]);
    let out = sh(
        &k,
        "parents:1",
        "cd / && find out glob tree none 2>/dev/null | sort; stat -c '%a' out/a/b; cat out/a/b/c.txt out/y/z.txt",
    );
    assert_eq!(
        out,
        "glob\nglob/p1\nglob/p1/keep.txt\nglob/p2\nglob/p2/keep.txt\nnone\n\
         out\nout/a\nout/a/b\nout/a/b/c.txt\nout/y\nout/y/z.txt\n\
         tree\ntree/dir\ntree/dir/sub\ntree/dir/sub/f\ntree/dir/sub/g\ntree/dir/sub/g/h\n\
         750\ncz"
    );
    k.build(ctx.path(), &["-t", "parents:2"]);
    assert_eq!(
        sh(&k, "parents:2", "cd / && find from | sort"),
        "from\nfrom/a\nfrom/a/b\nfrom/a/b/c.txt\n"
    );
    let hist = k.ok(&["history", "parents:1"]);
    assert!(hist.contains("COPY --parents */keep.txt /glob/"), "{hist}");
    // A plain (wildcard-free) source must exist.
    let bad = context(&[("Dockerfile", "FROM busybox\nCOPY --parents missing/f /m/\n")]);
    let err = build_fails(&k, bad.path(), &[]);
    assert!(err.contains("not found"), "{err}");
}

/// `kiln build` (not quiet) of `ctx`; returns the progress output.
fn build_progress(k: &Kiln, ctx: &Path, extra: &[&str]) -> String {
    let mut args = vec!["build", "--progress=plain"];
    args.extend_from_slice(extra);
    args.push(ctx.to_str().expect("utf-8"));
    let o = k.run(&args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "build failed:\n{err}");
    err
}

/// The progress id of the step whose name contains `needle`, and whether
/// it was reported CACHED.
fn step_cached(progress: &str, needle: &str) -> bool {
    let id = progress
        .lines()
        .find(|l| l.contains(needle) && l.starts_with('#'))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no step {needle:?} in:\n{progress}"))
        .to_string();
    progress.lines().any(|l| l.trim() == format!("{id} CACHED"))
}

fn layers(k: &Kiln, image: &str) -> Vec<String> {
    k.inspect(image)["RootFS"]["Layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn copy_link_layer_is_reused_when_the_base_changes() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\n\
             ARG V=1\n\
             RUN mkdir -p /app && chmod 0700 /app && echo $V > /base\n\
             COPY --link --chmod=0640 data /app/sub/\n\
             COPY --link <<EOF /app/inline\nhi\nEOF\n\
             COPY data /plain/\n",
        ),
        ("data/a", "alpha"),
        ("data/b/c", "gamma"),
    ]);
    let c = ctx.path();
    let p1 = build_progress(&k, c, &["-t", "link:1", "--build-arg", "V=1"]);
    assert!(!step_cached(&p1, "COPY --link --chmod=0640"), "{p1}");
    let p2 = build_progress(&k, c, &["-t", "link:2", "--build-arg", "V=2"]);
    // The base changed (the RUN ran again), the --link layers did not:
    // reported cached, identical diffIDs. The plain COPY was redone.
    assert!(!step_cached(&p2, "RUN mkdir"), "{p2}");
    assert!(step_cached(&p2, "COPY --link --chmod=0640"), "{p2}");
    assert!(step_cached(&p2, "COPY --link <<EOF"), "{p2}");
    assert!(!step_cached(&p2, "COPY data /plain/"), "{p2}");
    let (l1, l2) = (layers(&k, "link:1"), layers(&k, "link:2"));
    assert_eq!(l1.len(), 5);
    assert_ne!(l1[1], l2[1], "the RUN layer differs");
    assert_eq!(l1[2], l2[2], "COPY --link layer reused");
    assert_eq!(l1[3], l2[3], "COPY --link heredoc layer reused");
    // The layer is independent of the base: /app was made fresh (0755,
    // root) in the layer, so it shows over the base's 0700 /app; the
    // files are stacked on the new base.
    assert_eq!(
        sh(
            &k,
            "link:2",
            "stat -c '%a %u' /app /app/sub/a; cat /base /app/sub/a /app/sub/b/c /app/inline /plain/a"
        ),
        "755 0\n640 0\n2\nalphagammahi\nalpha"
    );
    // Same inputs once more: everything cached, same image.
    let p3 = build_progress(&k, c, &["-t", "link:3", "--build-arg", "V=2"]);
    assert!(step_cached(&p3, "COPY --link --chmod=0640"), "{p3}");
    assert_eq!(layers(&k, "link:3"), l2);
}

/// A tiny HTTP/1.1 server on 127.0.0.1 for the test's life: fixed
/// responses by path, else files under `root` (a dumb git server needs
/// no more). Stopped and joined on drop.
struct Server {
    port: u16,
    routes: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Route>>>,
    hits: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
struct Route {
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

impl Server {
    fn start(root: Option<std::path::PathBuf>) -> Server {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("addr").port();
        let routes: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Route>>> =
            Default::default();
        let hits: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, h, s) = (routes.clone(), hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    continue;
                }
                loop {
                    let mut l = String::new();
                    if reader.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                        break;
                    }
                }
                let full = first.split_whitespace().nth(1).unwrap_or("/").to_string();
                let path = full.split('?').next().unwrap_or("/").to_string();
                h.lock().unwrap().push(path.clone());
                let route = r.lock().unwrap().get(&path).cloned().or_else(|| {
                    let clean = path.as_str();
                    let f = root.as_ref()?.join(clean.trim_start_matches('/'));
                    if clean.contains("..") || !f.is_file() {
                        return None;
                    }
                    Some(Route {
                        body: std::fs::read(f).ok()?,
                        headers: Vec::new(),
                    })
                });
                let resp = match route {
                    Some(rt) => {
                        let mut head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n",
                            rt.body.len()
                        );
                        for (k, v) in &rt.headers {
                            head.push_str(&format!("{k}: {v}\r\n"));
                        }
                        head.push_str("\r\n");
                        let mut b = head.into_bytes();
                        b.extend_from_slice(&rt.body);
                        b
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = conn.write_all(&resp);
            }
        });
        Server {
            port,
            routes,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn set(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) {
        self.routes.lock().unwrap().insert(
            path.to_string(),
            Route {
                body: body.to_vec(),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        );
    }

    fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(data)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A gzip tarball holding `inner.txt`.
fn tarball() -> Vec<u8> {
    let d = context(&[("inner.txt", "packed")]);
    let out = std::process::Command::new("tar")
        .arg("-C")
        .arg(d.path())
        .args(["-czf", "-", "inner.txt"])
        .output()
        .expect("tar");
    assert!(out.status.success());
    out.stdout
}

#[test]
fn add_http_url_names_modes_mtime_checksum_unpack_and_cache() {
    if !prerequisites() {
        return;
    }
    let srv = Server::start(None);
    let lm = ("Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT");
    srv.set("/files/hello.txt", b"hello v1\n", &[lm]);
    srv.set("/files/a.tar.gz", &tarball(), &[]);
    let sum = sha256_hex(b"hello v1\n");
    let k = Kiln::with_busybox();
    let df = format!(
        "FROM busybox\n\
         ADD {hello} /dl/\n\
         ADD {hello}?x=1 /named.txt\n\
         ADD --checksum=sha256:{sum} {hello} /sum/\n\
         ADD {tgz} /tars/\n\
         ADD --unpack=true {tgz} /unpacked/\n\
         ADD --chmod=0644 {hello} /moded\n",
        hello = srv.url("/files/hello.txt"),
        tgz = srv.url("/files/a.tar.gz"),
    );
    let ctx = context(&[("Dockerfile", &df)]);
    k.build(ctx.path(), &["-t", "http:1"]);
    assert_eq!(
        sh(
            &k,
            "http:1",
            "cd / && stat -c '%a %Y %u %n' dl/hello.txt named.txt sum/hello.txt moded; ls tars; ls unpacked; cat dl/hello.txt unpacked/inner.txt"
        ),
        "600 784111777 0 dl/hello.txt\n600 784111777 0 named.txt\n600 784111777 0 sum/hello.txt\n\
         644 784111777 0 moded\na.tar.gz\ninner.txt\nhello v1\npacked"
    );
    // Unchanged content: every ADD is a cache hit (the URL is re-checked).
    let before = srv.hits("/files/hello.txt");
    let p = build_progress(&k, ctx.path(), &["-t", "http:2"]);
    assert!(step_cached(&p, "ADD http"), "{p}");
    assert!(
        srv.hits("/files/hello.txt") > before,
        "the URL was re-checked"
    );
    assert_eq!(layers(&k, "http:1"), layers(&k, "http:2"));
    // Changed content: the plain ADDs run again; the checksum one fails.
    srv.set("/files/hello.txt", b"hello v2\n", &[lm]);
    let err = build_fails(&k, ctx.path(), &[]);
    assert!(err.contains("digest mismatch"), "{err}");
    let df2 = df.replace(&format!("ADD --checksum=sha256:{sum} "), "ADD ");
    let ctx2 = context(&[("Dockerfile", &df2)]);
    k.build(ctx2.path(), &["-t", "http:3"]);
    assert_eq!(
        sh(&k, "http:3", "cat /dl/hello.txt /sum/hello.txt"),
        "hello v2\nhello v2\n"
    );
    // COPY does not fetch URLs; a missing URL is a clear error.
    let bad = context(&[(
        "Dockerfile",
        &format!("FROM busybox\nADD {} /x\n", srv.url("/missing")),
    )]);
    let err = build_fails(&k, bad.path(), &[]);
    assert!(err.contains("404"), "{err}");
}

/// Runs git in `dir`, asserting success; stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    let o = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .expect("git");
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// git is needed: under CI=true its absence fails the test.
fn have_git() -> bool {
    let ok = std::process::Command::new("git")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = "git tests need the git command (apt-get install git)";
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{msg}");
        }
        eprintln!("{msg}: not run");
    }
    ok
}

/// A bare repository under `root/repo.git` served dumb-HTTP style: tag
/// `v1` has `sub/f` = "one", branch `main` then moves on to "two".
fn git_repo(root: &Path) -> String {
    let work = root.join("work");
    std::fs::create_dir_all(work.join("sub")).expect("mkdir");
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("sub/f"), "one").expect("write");
    std::fs::write(work.join("top"), "top").expect("write");
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "one"]);
    git(&work, &["tag", "v1"]);
    let v1 = git(&work, &["rev-parse", "HEAD"]);
    std::fs::write(work.join("sub/f"), "two").expect("write");
    git(&work, &["commit", "-q", "-am", "two"]);
    publish(root, &work);
    v1
}

/// A bare clone of the repository `work` at `root/repo.git`, served
/// dumb-HTTP style.
fn publish(root: &Path, work: &Path) {
    let bare = root.join("repo.git");
    git(
        root,
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    git(&bare, &["update-server-info"]);
}

#[test]
fn add_git_repository_at_ref_and_subdir_with_keep_git_dir() {
    if !prerequisites() || !have_git() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let v1 = git_repo(root.path());
    let srv = Server::start(Some(root.path().to_path_buf()));
    let repo = srv.url("/repo.git");
    let k = Kiln::with_busybox();
    let df = format!(
        "FROM busybox\n\
         ADD {repo}#v1:sub /at-tag/\n\
         ADD {repo} /head/\n\
         ADD {repo}#{short}:sub /at-commit/\n\
         ADD --keep-git-dir=true {repo}#main /kept/\n\
         ADD --checksum={v1} {repo}#v1 /summed/\n",
        short = &v1[..12],
    );
    let ctx = context(&[("Dockerfile", &df)]);
    k.build(ctx.path(), &["-t", "git:1"]);
    assert_eq!(
        sh(
            &k,
            "git:1",
            "cd / && ls -A at-tag head kept | tr '\\n' ' '; echo; cat at-tag/f head/sub/f at-commit/f summed/sub/f; test -d kept/.git && test ! -e head/.git && echo ok"
        ),
        "at-tag: f  head: sub top  kept: .git sub top \nonetwooneoneok\n"
    );
    // A checksum that is not the commit fails clearly.
    let bad = context(&[(
        "Dockerfile",
        &format!("FROM busybox\nADD --checksum=0000000 {repo}#v1 /x/\n"),
    )]);
    let err = build_fails(&k, bad.path(), &[]);
    assert!(err.contains("checksum mismatch"), "{err}");
    // An unchanged repository is a cache hit.
    let p = build_progress(&k, ctx.path(), &["-t", "git:2"]);
    assert!(step_cached(&p, "ADD --keep-git-dir"), "{p}");
    assert_eq!(layers(&k, "git:1"), layers(&k, "git:2"));
}

#[test]
fn build_context_names_a_directory_or_an_image_for_from_and_copy_from() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let extra = context(&[("data.txt", "from a named dir"), ("skip.txt", "s")]);
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM alpine AS a\n\
             COPY --from=files data.txt /d.txt\n\
             COPY --from=img /etc/group /g\n\
             RUN stat -c '%u %n' /d.txt > /owner\n",
        ),
        (".dockerignore", "data.txt\n"),
    ]);
    let files = format!("files={}", extra.path().display());
    let args = [
        "-t",
        "named:1",
        "--build-context",
        "alpine=docker-image://busybox:latest",
        "--build-context",
        &files,
        "--build-context",
        "img=docker-image://busybox",
    ];
    k.build(ctx.path(), &args);
    assert_eq!(
        sh(&k, "named:1", "cat /d.txt; echo; cat /owner; head -1 /g"),
        "from a named dir\n0 /d.txt\nroot:x:0:\n"
    );
    // Changing the named directory's content changes the COPY.
    std::fs::write(extra.path().join("data.txt"), "changed").expect("write");
    k.build(ctx.path(), &args);
    assert_eq!(sh(&k, "named:1", "cat /d.txt"), "changed");
    // A directory as a FROM base: its files, root-owned, are the base layer.
    let rootfs = tempfile::tempdir().expect("tempdir");
    common::make_rootfs(rootfs.path());
    std::fs::write(rootfs.path().join("hello"), "from a directory base\n").expect("write");
    let based = context(&[("Dockerfile", "FROM base\nRUN cat /hello > /copied\n")]);
    let base_arg = format!("base={}", rootfs.path().display());
    k.build(
        based.path(),
        &["-t", "dirbase:1", "--build-context", &base_arg],
    );
    assert_eq!(
        sh(&k, "dirbase:1", "cat /copied"),
        "from a directory base\n"
    );
    assert_eq!(
        k.inspect("dirbase:1")["RootFS"]["Layers"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "the directory layer and the RUN layer"
    );
}

#[test]
fn a_named_context_replaces_the_stage_of_its_name() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let dir = context(&[("which", "from the context\n")]);
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox AS base\n\
         RUN echo from the stage > /which\n\
         FROM busybox AS tools\n\
         RUN echo tool > /tool\n\
         FROM busybox\n\
         COPY --from=base /which /which\n\
         COPY --from=tools /tool /tool\n",
    )]);
    k.build(ctx.path(), &["-t", "replaced:0"]);
    assert_eq!(sh(&k, "replaced:0", "cat /which"), "from the stage\n");
    // As BuildKit: `--build-context base=DIR` replaces the stage named
    // base (its RUN does not run); the other stage is built as before.
    let base = format!("base={}", dir.path().display());
    let p = build_progress(
        &k,
        ctx.path(),
        &["-t", "replaced:1", "--build-context", &base],
    );
    assert!(!p.contains("echo from the stage"), "{p}");
    assert_eq!(
        sh(&k, "replaced:1", "cat /which /tool"),
        "from the context\ntool\n"
    );
    // An image replacing a stage that is another stage's base.
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox AS base\n\
         RUN echo stage > /marker\n\
         FROM base\n\
         RUN test ! -e /marker && echo replaced > /ok\n",
    )]);
    k.build(
        ctx.path(),
        &[
            "-t",
            "replaced:2",
            "--build-context",
            "base=docker-image://busybox",
        ],
    );
    assert_eq!(sh(&k, "replaced:2", "cat /ok"), "replaced\n");
    // The replaced stage's own ONBUILD lines still run in its children,
    // and it may be read before it is defined (both as BuildKit).
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox AS first\n\
         COPY --from=base /which /early\n\
         FROM busybox AS base\n\
         ONBUILD RUN echo trigger > /trig\n\
         RUN echo stage > /which\n\
         FROM base\n\
         COPY --from=first /early /early\n",
    )]);
    let rootfs = tempfile::tempdir().expect("tempdir");
    common::make_rootfs(rootfs.path());
    std::fs::write(rootfs.path().join("which"), "from the context\n").expect("write");
    let rooted = format!("base={}", rootfs.path().display());
    k.build(
        ctx.path(),
        &["-t", "replaced:3", "--build-context", &rooted],
    );
    assert_eq!(
        sh(&k, "replaced:3", "cat /early /which /trig"),
        "from the context\nfrom the context\ntrigger\n"
    );
    // BuildKit never takes `scratch` or `context` from a named context.
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox AS context\n\
         RUN echo from the stage > /which\n\
         FROM busybox\n\
         COPY --from=context /which /which\n",
    )]);
    let named = format!("context={}", dir.path().display());
    k.build(ctx.path(), &["-t", "replaced:4", "--build-context", &named]);
    assert_eq!(sh(&k, "replaced:4", "cat /which"), "from the stage\n");
    // Names are compared as BuildKit compares them: a context named
    // `docker.io/library/base:latest` is `base`, and `FROM img:latest`
    // finds a context named `img`.
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox AS base\n\
         RUN echo from the stage > /which\n\
         FROM img:latest\n\
         COPY --from=base /which /which\n\
         RUN test -x /bin/sh && echo ok > /ok\n",
    )]);
    let long = format!("docker.io/library/base:latest={}", dir.path().display());
    k.build(
        ctx.path(),
        &[
            "-t",
            "replaced:5",
            "--build-context",
            &long,
            "--build-context",
            "img=docker-image://busybox",
        ],
    );
    assert_eq!(
        sh(&k, "replaced:5", "cat /which /ok"),
        "from the context\nok\n"
    );
    // Under that long name too, the replaced stage may be read first.
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox AS first\n\
         COPY --from=base /which /early\n\
         FROM busybox AS base\n\
         RUN echo from the stage > /which\n",
    )]);
    k.build(
        ctx.path(),
        &[
            "-t",
            "replaced:6",
            "--target",
            "first",
            "--build-context",
            &long,
        ],
    );
    assert_eq!(sh(&k, "replaced:6", "cat /early"), "from the context\n");
}

/// `kiln build ARGS…` with `input` on stdin.
fn run_stdin(k: &Kiln, args: &[&str], input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = k
        .cmd()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let mut stdin = child.stdin.take().expect("stdin");
    // A failing build may stop reading early; a broken pipe is its answer.
    let _ = stdin.write_all(input);
    drop(stdin);
    child.wait_with_output().expect("wait kiln")
}

fn ok_stdin(k: &Kiln, args: &[&str], input: &[u8]) -> String {
    let o = run_stdin(k, args, input);
    assert!(
        o.status.success(),
        "kiln {args:?} failed\nstderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `tar -C dir FLAGS -f - .` (FLAGS picks the compression).
fn tar_of(dir: &Path, flags: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(flags)
        .args(["-cf", "-", "."])
        .output()
        .expect("tar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Nothing of a context from stdin, git or a URL is left in the store.
fn no_context_left(k: &Kiln) {
    let tmp = k.root.path().join("tmp");
    let left: Vec<String> = std::fs::read_dir(&tmp)
        .expect("store tmp")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("context-") || n.starts_with("add-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn context_files() -> tempfile::TempDir {
    context(&[
        (
            "Dockerfile",
            "FROM busybox\nCOPY . /ctx/\nRUN cd /ctx && find . -type f | sort > /list\n",
        ),
        ("a.txt", "alpha"),
        ("sub/b.txt", "beta"),
        (
            "sub/Other.Dockerfile",
            "FROM busybox\nCOPY sub/b.txt /only\n",
        ),
        ("skip.log", "s"),
        (".dockerignore", "*.log\n"),
    ])
}

#[test]
fn build_context_from_stdin_archive_in_any_compression() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context_files();
    for (i, flags) in [
        &[][..],
        &["-z"][..],
        &["-j"][..],
        &["-J"][..],
        &["--zstd"][..],
    ]
    .iter()
    .enumerate()
    {
        let tag = format!("stdin:{i}");
        ok_stdin(
            &k,
            &["build", "-q", "-t", &tag, "-"],
            &tar_of(ctx.path(), flags),
        );
        assert_eq!(
            sh(&k, &tag, "cat /list; cat /ctx/a.txt /ctx/sub/b.txt"),
            "./.dockerignore\n./Dockerfile\n./a.txt\n./sub/Other.Dockerfile\n./sub/b.txt\nalphabeta",
            "{flags:?}"
        );
    }
    // -f is a path inside the archive.
    ok_stdin(
        &k,
        &[
            "build",
            "-q",
            "-t",
            "stdin:f",
            "-f",
            "sub/Other.Dockerfile",
            "-",
        ],
        &tar_of(ctx.path(), &["-z"]),
    );
    let err = run_stdin(
        &k,
        &["build", "-q", "-f", "sub/Other.Dockerfile", "-"],
        &tar_of(&ctx.path().join("sub"), &[]),
    );
    // The archive of sub/ alone has no sub/Other.Dockerfile.
    assert_eq!(err.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    assert_eq!(sh(&k, "stdin:f", "cat /only"), "beta");
    // A plain Dockerfile on stdin is a build with an empty context.
    ok_stdin(
        &k,
        &["build", "-q", "-t", "stdin:df", "-"],
        b"FROM busybox\nRUN echo plain > /p\n",
    );
    assert_eq!(sh(&k, "stdin:df", "cat /p"), "plain\n");
    // Hostile names cannot escape the temporary context.
    let mut b = Vec::new();
    {
        let mut hdr = [0u8; 512];
        let name = b"../escaped.txt";
        hdr[..name.len()].copy_from_slice(name);
        hdr[100..108].copy_from_slice(b"0000644\0");
        hdr[108..116].copy_from_slice(b"0000000\0");
        hdr[116..124].copy_from_slice(b"0000000\0");
        hdr[124..136].copy_from_slice(b"00000000001\0");
        hdr[136..148].copy_from_slice(b"00000000000\0");
        hdr[156] = b'0';
        hdr[257..263].copy_from_slice(b"ustar\0");
        hdr[263..265].copy_from_slice(b"00");
        hdr[148..156].copy_from_slice(b"        ");
        let sum: u32 = hdr.iter().map(|c| u32::from(*c)).sum();
        hdr[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        b.extend_from_slice(&hdr);
        let mut data = [0u8; 512];
        data[0] = b'x';
        b.extend_from_slice(&data);
        b.extend_from_slice(&[0u8; 1024]);
    }
    let o = run_stdin(&k, &["build", "-q", "-"], &b);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unpacking the build context"), "{err}");
    assert!(!k.root.path().join("tmp/escaped.txt").exists());
    // stdin cannot be both the context and the Dockerfile.
    let o = run_stdin(&k, &["build", "-f", "-", "-"], b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("both"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    no_context_left(&k);
}

#[test]
fn build_context_from_an_http_tarball() {
    if !prerequisites() {
        return;
    }
    let srv = Server::start(None);
    let ctx = context_files();
    srv.set("/ctx.tar.gz", &tar_of(ctx.path(), &["-z"]), &[]);
    srv.set("/ctx.tar.xz", &tar_of(ctx.path(), &["-J"]), &[]);
    srv.set("/Dockerfile", b"FROM busybox\nRUN echo remote > /r\n", &[]);
    let k = Kiln::with_busybox();
    for (tag, path) in [("url:gz", "/ctx.tar.gz"), ("url:xz", "/ctx.tar.xz")] {
        k.ok(&["build", "-q", "-t", tag, &srv.url(path)]);
        assert_eq!(
            sh(&k, tag, "cat /list; cat /ctx/a.txt"),
            "./.dockerignore\n./Dockerfile\n./a.txt\n./sub/Other.Dockerfile\n./sub/b.txt\nalpha"
        );
    }
    k.ok(&[
        "build",
        "-q",
        "-t",
        "url:f",
        "-f",
        "sub/Other.Dockerfile",
        &srv.url("/ctx.tar.gz"),
    ]);
    assert_eq!(sh(&k, "url:f", "cat /only"), "beta");
    // A URL of a plain Dockerfile builds with an empty context.
    k.ok(&["build", "-q", "-t", "url:df", &srv.url("/Dockerfile")]);
    assert_eq!(sh(&k, "url:df", "cat /r"), "remote\n");
    // A missing URL is a clear error.
    let o = k.run(&["build", "-q", &srv.url("/missing.tar")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("404"), "{err}");
    no_context_left(&k);
}

#[test]
fn build_context_from_a_git_repository_at_ref_and_subdir() {
    if !prerequisites() || !have_git() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    git_repo(root.path());
    // A Dockerfile in sub/ on a branch of its own.
    let work = root.path().join("work");
    git(&work, &["checkout", "-q", "-b", "docker"]);
    std::fs::write(
        work.join("sub/Dockerfile"),
        "FROM busybox\nCOPY . /ctx/\nRUN ls -A /ctx | tr '\\n' ' ' > /list\n",
    )
    .expect("write");
    std::fs::write(
        work.join("Dockerfile.top"),
        "FROM busybox\nCOPY top sub/f /t/\n",
    )
    .expect("write");
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "docker"]);
    let bare = root.path().join("repo.git");
    git(
        &bare,
        &[
            "fetch",
            "-q",
            work.to_str().expect("utf-8"),
            "docker:docker",
        ],
    );
    git(&bare, &["update-server-info"]);
    let srv = Server::start(Some(root.path().to_path_buf()));
    let repo = srv.url("/repo.git");
    let k = Kiln::with_busybox();
    k.ok(&[
        "build",
        "-q",
        "-t",
        "git:sub",
        &format!("{repo}#docker:sub"),
    ]);
    assert_eq!(
        sh(&k, "git:sub", "cat /list; cat /ctx/f"),
        "Dockerfile f two"
    );
    k.ok(&[
        "build",
        "-q",
        "-t",
        "git:top",
        "-f",
        "Dockerfile.top",
        &format!("{repo}#docker"),
    ]);
    assert_eq!(sh(&k, "git:top", "cat /t/top /t/f"), "toptwo");
    // A ref without the Dockerfile, a missing ref, a missing subdir.
    for (url, want) in [
        (format!("{repo}#v1"), "Dockerfile"),
        (format!("{repo}#nope"), "not found"),
        (format!("{repo}#docker:missing"), "missing"),
    ] {
        let o = k.run(&["build", "-q", &url]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{url}: {err}");
        assert!(err.contains(want), "{url}: {err}");
    }
    no_context_left(&k);
}

#[test]
fn build_context_from_an_oci_layout_directory_by_tag() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    // An OCI layout directory made by `-o type=oci,tar=false`, holding
    // tag v1 (and then v2 in a second layout).
    let layouts = tempfile::tempdir().expect("tempdir");
    let lay = layouts.path().join("lay");
    for v in ["v1", "v2"] {
        let src = context(&[(
            "Dockerfile",
            &format!("FROM busybox\nRUN echo {v} > /marker\n"),
        )]);
        let dest = if v == "v1" {
            lay.clone()
        } else {
            layouts.path().join("lay2")
        };
        let out = format!(
            "type=oci,dest={},tar=false,name=example/base:{v}",
            dest.display()
        );
        k.build(src.path(), &["-o", &out]);
    }
    // Another store, without those images: only the layout provides them.
    let k2 = Kiln::with_busybox();
    let named = format!("base=oci-layout://{}:v1", lay.display());
    let ctx_a = context(&[("Dockerfile", "FROM base\nRUN cat /marker > /seen\n")]);
    k2.build(ctx_a.path(), &["-t", "oci:from", "--build-context", &named]);
    assert_eq!(sh(&k2, "oci:from", "cat /seen"), "v1\n");
    let ctx_b = context(&[(
        "Dockerfile",
        "FROM busybox\nCOPY --from=base /marker /copied\n",
    )]);
    k2.build(ctx_b.path(), &["-t", "oci:copy", "--build-context", &named]);
    assert_eq!(sh(&k2, "oci:copy", "cat /copied"), "v1\n");
    // A tag the layout does not hold, and a path that is no layout.
    let err = build_fails(
        &k2,
        ctx_a.path(),
        &[
            "--build-context",
            &format!("base=oci-layout://{}:v9", lay.display()),
        ],
    );
    assert!(err.contains("no image tagged \"v9\""), "{err}");
    let err = build_fails(
        &k2,
        ctx_a.path(),
        &[
            "--build-context",
            "base=oci-layout:///nonexistent/layout:v1",
        ],
    );
    assert!(err.contains("not an OCI image layout"), "{err}");

    // The layout is the image's, and not trusted: a symlinked index.json
    // (here to an endless device, read to the end of memory before), a
    // layer blob that is a fifo (a hang before) or a symlink to a host
    // file are refused, each with an error naming it.
    let hostile = layouts.path().join("hostile");
    let run = |cmd: &str, args: &[&std::path::Path]| {
        let o = std::process::Command::new(cmd)
            .args(args)
            .output()
            .expect(cmd);
        assert!(o.status.success(), "{cmd}: {o:?}");
    };
    run("cp", &[Path::new("-a"), &lay, &hostile]);
    let named = format!("base=oci-layout://{}:v1", hostile.display());
    let index = hostile.join("index.json");
    let kept = hostile.join("index.json.kept");
    std::fs::rename(&index, &kept).expect("rename");
    std::os::unix::fs::symlink("/dev/zero", &index).expect("symlink");
    let err = build_fails(&k2, ctx_a.path(), &["--build-context", &named]);
    assert!(
        err.contains("index.json") && err.contains("symlink"),
        "{err}"
    );
    std::fs::remove_file(&index).expect("rm");
    std::fs::rename(&kept, &index).expect("rename");
    let k3 = Kiln::with_busybox();
    let blobs = hostile.join("blobs/sha256");
    let mut biggest: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(&blobs)
        .expect("blobs")
        .map(|e| {
            let p = e.expect("entry").path();
            (std::fs::metadata(&p).expect("meta").len(), p)
        })
        .collect();
    biggest.sort();
    let (_, layer) = biggest.pop().expect("a layer blob");
    std::fs::remove_file(&layer).expect("rm");
    run("mkfifo", &[&layer]);
    let t = std::time::Instant::now();
    let err = build_fails(&k3, ctx_a.path(), &["--build-context", &named]);
    assert!(t.elapsed() < std::time::Duration::from_secs(60));
    assert!(
        err.contains(
            &layer
                .file_name()
                .expect("name")
                .to_string_lossy()
                .to_string()
        ),
        "{err}"
    );
    std::fs::remove_file(&layer).expect("rm");
    std::os::unix::fs::symlink("/etc/passwd", &layer).expect("symlink");
    let err = build_fails(&k3, ctx_a.path(), &["--build-context", &named]);
    assert!(err.contains("symlink"), "{err}");
}

/// Sets `p`'s mtime (a directory too) to `secs` since the epoch.
fn set_mtime(p: &Path, secs: u64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    std::fs::File::open(p)
        .expect("open")
        .set_modified(t)
        .expect("set mtime");
}

/// Issue 15 item 1, BuildKit's rule (fsutil `copy.Copy`): the directory a
/// directory's contents are copied into keeps its owner and mode when it
/// exists (a user's home, chmod 700, a WORKDIR with `COPY
/// --chown . .`, `/usr/src` with `COPY . /usr/src/`) and takes only the
/// source's mtime; one COPY creates is 0755 and owned by `--chown` or root
/// (never the source directory's owner or mode); a directory below it
/// that exists takes its source's metadata; created parents are owned by
/// `--chown`.
#[test]
fn copy_into_an_existing_directory_keeps_its_owner_and_mode() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox AS stage\n\
             RUN mkdir -p /owned/sub && echo s > /owned/sub/f && chown -R 1234:4321 /owned \
                 && chmod 700 /owned\n\
             FROM busybox\n\
             RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd \
                 && echo 'app:x:1000:' >> /etc/group && mkdir -p /home/app \
                 && chown 1000:1000 /home/app && chmod 700 /home/app && mkdir -m 700 /home/app/sub \
                 && mkdir -p /usr/src/app && chmod 750 /usr/src\n\
             COPY src/ /home/app/\n\
             WORKDIR /usr/src/app\n\
             COPY --chown=app:app src/ .\n\
             COPY src/ /usr/src/\n\
             COPY --chown=app:app src/ /new/made/\n\
             COPY --from=stage /owned /fromstage\n",
        ),
        ("src/a.txt", "a\n"),
        ("src/sub/b.txt", "b\n"),
    ]);
    let c = ctx.path();
    set_mode(&c.join("src"), 0o775);
    set_mode(&c.join("src/sub"), 0o755);
    set_mtime(&c.join("src"), 1_000_000_000);
    k.build(c, &["-t", "keep:1"]);
    let out = sh(
        &k,
        "keep:1",
        "cd / && stat -c '%a %u:%g %n' home/app home/app/sub home/app/a.txt \
         usr/src/app usr/src/app/a.txt usr/src new new/made fromstage fromstage/sub \
         && stat -c %Y home/app",
    );
    let uid = 1000;
    assert_eq!(
        out,
        format!(
            "700 {uid}:{uid} home/app\n\
             755 0:0 home/app/sub\n\
             644 0:0 home/app/a.txt\n\
             755 0:0 usr/src/app\n\
             644 {uid}:{uid} usr/src/app/a.txt\n\
             750 0:0 usr/src\n\
             755 {uid}:{uid} new\n\
             755 {uid}:{uid} new/made\n\
             755 0:0 fromstage\n\
             755 1234:4321 fromstage/sub\n\
             1000000000\n"
        )
    );
}

/// Issue 15 item 2: `COPY --from=<a stage that is only FROM scratch> / /`
/// copies nothing and goes on (BuildKit sees an empty directory), and
/// into a new directory makes just that directory.
#[test]
fn copy_the_root_of_an_empty_scratch_stage_copies_nothing() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM scratch AS empty\n\
         FROM busybox\n\
         COPY --from=empty / /\n\
         COPY --from=empty / /made/\n\
         RUN echo ok > /ok\n",
    )]);
    k.build(ctx.path(), &["-t", "empty:1"]);
    let out = sh(
        &k,
        "empty:1",
        "cat /ok && ls -A /made | wc -l && stat -c '%a %u' / /made",
    );
    assert_eq!(out, "ok\n0\n755 0\n755 0\n");
    // A path below that root is still not there.
    let bad = context(&[(
        "Dockerfile",
        "FROM scratch AS empty\nFROM busybox\nCOPY --from=empty /x /x\n",
    )]);
    let err = build_fails(&k, bad.path(), &[]);
    assert!(err.contains("not found"), "{err}");
}

/// A server that accepts connections and then sends `prefix` and one byte
/// every 300 ms for ever (or nothing, for an empty prefix with no bytes):
/// the idle timeout never trips. Returns its port.
fn trickling_server(prefix: &'static [u8], drip: bool) -> u16 {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let _ = conn.write_all(prefix);
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    if drip && conn.write_all(b"x").is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Hostile-review finding: a download or git fetch had only an idle
/// timeout, so a server sending a byte now and then (or a git:// daemon
/// that accepts and says nothing, which git waits on for ever) held the
/// build for ever. Each now ends at `KILN_FETCH_TIMEOUT` with an error
/// that names it.
#[test]
fn a_trickling_download_or_a_silent_git_server_ends_at_the_fetch_timeout() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let http = trickling_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: application/octet-stream\r\n\r\n",
        true,
    );
    let git_port = trickling_server(b"", false);
    for (src, needle) in [
        (format!("http://127.0.0.1:{http}/big.bin"), "big.bin"),
        (format!("git://127.0.0.1:{git_port}/repo.git"), "git"),
    ] {
        let ctx = context(&[("Dockerfile", &format!("FROM busybox\nADD {src} /got\n"))]);
        let started = std::time::Instant::now();
        let o = k
            .cmd()
            .env("KILN_FETCH_TIMEOUT", "3s")
            .args(["build", "-q"])
            .arg(ctx.path())
            .output()
            .expect("kiln");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{src}: {err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{src}: took {:?}",
            started.elapsed()
        );
        assert!(err.contains(needle), "{src}: {err}");
        if src.starts_with("git") {
            assert!(err.contains("KILN_FETCH_TIMEOUT"), "{src}: {err}");
        } else {
            assert!(
                err.to_lowercase().contains("timed out") || err.contains("timeout"),
                "{src}: {err}"
            );
        }
    }
}

/// A Dockerfile's git source gets none of the credentials of the user
/// running kiln: git reads no configuration of the host (a URL rewrite
/// in `~/.gitconfig` or `GIT_CONFIG_GLOBAL` is not applied), and ssh gets
/// no agent but the one given with `--ssh`, no key files, no config.
/// (Before: git ran with kiln's environment — the host's git config,
/// `SSH_AUTH_SOCK`, `~/.ssh` keys and `~/.netrc` all applied.)
#[test]
fn a_dockerfiles_git_source_gets_none_of_the_hosts_git_or_ssh_credentials() {
    if !prerequisites() || !have_git() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    git_repo(root.path());
    let srv = Server::start(Some(root.path().to_path_buf()));
    let repo = srv.url("/repo.git");
    let home = tempfile::tempdir().expect("tempdir");
    let gitconfig = home.path().join(".gitconfig");
    std::fs::write(
        &gitconfig,
        format!(
            "[url \"{}\"]\n\tinsteadOf = {repo}\n[http]\n\textraHeader = X-Host-Secret: s3cret\n",
            srv.url("/host-rewrite.git")
        ),
    )
    .expect("write");
    let k = Kiln::with_busybox();
    let ctx = context(&[("Dockerfile", &format!("FROM busybox\nADD {repo}#v1 /r/\n"))]);
    let o = k
        .cmd()
        .env("HOME", home.path())
        .env("GIT_CONFIG_GLOBAL", &gitconfig)
        .args(["build", "-q", "-t", "g:1", ctx.path().to_str().unwrap()])
        .output()
        .expect("run kiln");
    common::succeeded(&o, format_args!("kiln build"));
    let rewritten = srv
        .hits
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.starts_with("/host-rewrite"))
        .count();
    assert_eq!(rewritten, 0, "git applied the host's configuration");
    assert_eq!(sh(&k, "g:1", "cat /r/sub/f"), "one");

    // ssh: a fake `ssh` first on PATH records what git gave it.
    let bin = tempfile::tempdir().expect("tempdir");
    let log = bin.path().join("ssh.log");
    let fake = bin.path().join("ssh");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"agent=$SSH_AUTH_SOCK home=$HOME args=$*\" >> {}\nexit 1\n",
            log.display()
        ),
    )
    .expect("write");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ssh_ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nADD ssh://git@127.0.0.1:1/x.git /x/\n",
    )]);
    let given = bin.path().join("given.sock");
    for extra in [None, Some(format!("default={}", given.display()))] {
        let _ = std::fs::remove_file(&log);
        let mut c = k.cmd();
        c.env("PATH", &path)
            .env("SSH_AUTH_SOCK", "/tmp/the-hosts-agent.sock")
            .args(["build", "-q"]);
        if let Some(e) = &extra {
            c.args(["--ssh", e]);
        }
        let o = c
            .arg(ssh_ctx.path().to_str().unwrap())
            .output()
            .expect("run kiln");
        assert!(!o.status.success(), "the fake ssh fails");
        let seen = std::fs::read_to_string(&log).expect("the fake ssh ran");
        assert!(!seen.contains("the-hosts-agent"), "{seen}");
        assert!(seen.contains("-F /dev/null"), "{seen}");
        assert!(seen.contains("IdentityFile=none"), "{seen}");
        assert!(seen.contains("BatchMode=yes"), "{seen}");
        match &extra {
            None => assert!(seen.contains("agent= "), "{seen}"),
            Some(_) => assert!(
                seen.contains(&format!("agent={} ", given.display())),
                "{seen}"
            ),
        }
    }
}

/// `#ref:subdir` names a directory of the repository: a link in the
/// repository (here to `..`, the scratch directory around the checkout)
/// is refused, as BuildKit refuses it. Credentials in a source's URL
/// never reach a message.
#[test]
fn a_git_subdir_that_is_a_link_is_refused_and_url_credentials_are_not_shown() {
    if !prerequisites() || !have_git() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let work = root.path().join("work");
    std::fs::create_dir_all(work.join("d")).expect("mkdir");
    std::fs::write(work.join("d/f"), "x").expect("write");
    std::os::unix::fs::symlink("..", work.join("up")).expect("symlink");
    std::os::unix::fs::symlink("d", work.join("alias")).expect("symlink");
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "one"]);
    publish(root.path(), &work);
    let srv = Server::start(Some(root.path().to_path_buf()));
    let repo = srv.url("/repo.git");
    let k = Kiln::with_busybox();
    for sub in ["up", "alias"] {
        let ctx = context(&[(
            "Dockerfile",
            &format!("FROM busybox\nADD {repo}#main:{sub} /x/\n"),
        )]);
        let err = build_fails(&k, ctx.path(), &[]);
        assert!(
            err.contains("is not a directory of the repository"),
            "{err}"
        );
    }
    let ok = context(&[(
        "Dockerfile",
        &format!("FROM busybox\nADD {repo}#main:d /x/\n"),
    )]);
    k.build(ok.path(), &["-t", "sub:1"]);
    assert_eq!(sh(&k, "sub:1", "cat /x/f"), "x");

    // A kept .git names its origin without the URL's credentials.
    let port = srv.port;
    let kept = context(&[(
        "Dockerfile",
        &format!(
            "FROM busybox\nADD --keep-git-dir=true http://user:s3cret-token@127.0.0.1:{port}/repo.git#main /k/\n"
        ),
    )]);
    k.build(kept.path(), &["-t", "kept:1"]);
    let cfg = sh(&k, "kept:1", "cat /k/.git/config");
    assert!(!cfg.contains("s3cret-token"), "{cfg}");
    assert!(
        cfg.contains(&format!("url = http://127.0.0.1:{port}/repo.git")),
        "{cfg}"
    );
    for src in [
        format!("http://user:s3cret-token@127.0.0.1:{port}/missing.git"),
        format!("http://user:s3cret-token@127.0.0.1:{port}/missing.txt"),
    ] {
        let ctx = context(&[("Dockerfile", &format!("FROM busybox\nADD {src} /x\n"))]);
        let err = build_fails(&k, ctx.path(), &[]);
        // (The Dockerfile's own line, quoted under the message, is the
        // user's text.)
        let msg: Vec<&str> = err.lines().filter(|l| l.contains("failed to")).collect();
        assert!(!msg.is_empty(), "{err}");
        for l in msg {
            assert!(!l.contains("s3cret-token"), "{err}");
        }
        assert!(err.contains("xxxxx@127.0.0.1"), "{err}");
    }
}
