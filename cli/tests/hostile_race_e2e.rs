//! Hostile tester's race findings: a user who can write into a build
//! context that root builds swaps a directory for a symlink out of it
//! (`renameat2(RENAME_EXCHANGE)` in a tight loop) between kiln's walk of
//! the context and its open of a file, hoping root copies a host file
//! into the image. Each build may fail with a clear error; none may ever
//! carry the outside secret.
//!
//! `KILN_E2E_BIN=/path/to/old/kiln` (tests/common) runs them against
//! another build, to see them fail there.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::Kiln;

const SECRET: &str = "TOPSECRET-outside-the-context";

/// Swaps `a` and `b` atomically in a loop until dropped.
struct Swapper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Swapper {
    fn start(a: &Path, b: &Path) -> Swapper {
        let stop = Arc::new(AtomicBool::new(false));
        let a = CString::new(a.as_os_str().as_bytes()).expect("path");
        let b = CString::new(b.as_os_str().as_bytes()).expect("path");
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                // SAFETY: two NUL-terminated paths.
                let r = unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
                assert_eq!(r, 0, "renameat2: {}", std::io::Error::last_os_error());
                n += 1;
            }
            n
        });
        Swapper {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every file under `dir` whose content holds the secret.
fn files_with_secret(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                todo.push(p);
            } else if t.is_file()
                && std::fs::read(&p)
                    .is_ok_and(|b| b.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()))
            {
                out.push(p);
            }
        }
    }
    out
}

/// A directory outside the context with secret files under the names
/// the context's `sub/` has too (and a few more).
fn secret_dir(top: &Path) -> PathBuf {
    let secrets = top.join("secrets");
    std::fs::create_dir_all(&secrets).expect("mkdir");
    for n in 0..64 {
        std::fs::write(secrets.join(format!("f{n}")), SECRET).expect("write");
    }
    secrets
}

/// Builds `dockerfile` `runs` times (`--no-cache`, exported to a local
/// directory) from a context whose `sub/` (64 public files) is swapped
/// with `subL`, a symlink to a directory of secrets outside it, in a tight
/// loop. Gives how many builds succeeded and every exported file that
/// holds the secret.
fn build_while_swapped(k: &Kiln, dockerfile: &str, runs: usize) -> (usize, Vec<PathBuf>) {
    let top = tempfile::tempdir().expect("tempdir");
    let secrets = secret_dir(top.path());
    let ctx = top.path().join("ctx");
    std::fs::create_dir_all(ctx.join("sub")).expect("mkdir");
    for n in 0..64 {
        std::fs::write(ctx.join("sub").join(format!("f{n}")), "public").expect("write");
    }
    std::os::unix::fs::symlink(&secrets, ctx.join("subL")).expect("symlink");
    std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("write");
    let swap = Swapper::start(&ctx.join("sub"), &ctx.join("subL"));
    let (mut built, mut leaked) = (0, Vec::new());
    for i in 0..runs {
        let out = top.path().join(format!("out{i}"));
        let dest = format!("type=local,dest={}", out.display());
        let o = k.run(&[
            "build",
            "-q",
            "--no-cache",
            "-o",
            &dest,
            "-f",
            ctx.join("Dockerfile").to_str().expect("utf-8"),
            ctx.to_str().expect("utf-8"),
        ]);
        if o.status.success() {
            built += 1;
        }
        leaked.extend(files_with_secret(&out));
    }
    drop(swap);
    eprintln!("{built}/{runs} builds succeeded while the context was swapped");
    (built, leaked)
}

#[test]
fn copy_from_a_context_whose_directory_is_swapped_for_a_symlink_never_reads_the_host() {
    let k = Kiln::new();
    let (_, leaked) = build_while_swapped(&k, "FROM scratch\nCOPY sub/ /x/\nCOPY sub /y/\n", 40);
    assert!(
        leaked.is_empty(),
        "host files copied into the image: {leaked:?}"
    );
}

#[test]
fn a_run_bind_mount_of_a_context_directory_swapped_for_a_symlink_never_shows_the_host() {
    let k = Kiln::with_busybox();
    // Read-only and writable binds: a plain bind and an overlay of the source.
    let (_, leaked) = build_while_swapped(
        &k,
        "FROM busybox\n\
         RUN --mount=type=bind,source=sub,target=/m cat /m/* > /ro.txt 2>&1; true\n\
         RUN --mount=type=bind,source=sub,target=/m,rw cat /m/* > /rw.txt 2>&1; true\n",
        30,
    );
    assert!(
        leaked.is_empty(),
        "a RUN step saw host files through its bind mount: {leaked:?}"
    );
}

#[test]
fn a_dockerfile_or_ignore_file_swapped_for_a_symlink_is_never_read_from_the_host() {
    let top = tempfile::tempdir().expect("tempdir");
    // What a parse error would echo: the secret on the first line.
    let secret = top.path().join("shadow");
    std::fs::write(&secret, format!("{SECRET}:$6$salt$hash:19000::::::\n[")).expect("write");
    let ctx = top.path().join("ctx");
    std::fs::create_dir_all(ctx.join("sub")).expect("mkdir");
    std::fs::write(ctx.join("a"), "a").expect("write");
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY a /a\n").expect("write");
    std::fs::write(ctx.join(".dockerignore"), "nothing\n").expect("write");
    std::fs::write(ctx.join("sub/Dockerfile"), "FROM scratch\nCOPY a /a\n").expect("write");
    let secrets = top.path().join("secrets");
    std::fs::create_dir_all(&secrets).expect("mkdir");
    std::fs::copy(&secret, secrets.join("Dockerfile")).expect("copy");
    std::os::unix::fs::symlink(&secret, ctx.join("DockerfileL")).expect("symlink");
    std::os::unix::fs::symlink(&secret, ctx.join("ignoreL")).expect("symlink");
    std::os::unix::fs::symlink(&secrets, ctx.join("subL")).expect("symlink");
    let k = Kiln::new();
    let _swaps = [
        Swapper::start(&ctx.join("Dockerfile"), &ctx.join("DockerfileL")),
        Swapper::start(&ctx.join(".dockerignore"), &ctx.join("ignoreL")),
        Swapper::start(&ctx.join("sub"), &ctx.join("subL")),
    ];
    let mut echoed = Vec::new();
    for i in 0..40 {
        let mut args = vec!["build", "-q", "--no-cache"];
        if i % 2 == 1 {
            args.extend(["-f", "sub/Dockerfile"]);
        }
        args.push(ctx.to_str().expect("utf-8"));
        let o = k.run(&args);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if all.contains(SECRET) {
            echoed.push(all);
        }
    }
    assert!(
        echoed.is_empty(),
        "a host file was read: {:?}",
        echoed.first()
    );
}

#[test]
fn iidfile_and_metadata_file_replace_a_symlink_and_never_hang_on_a_fifo() {
    let top = tempfile::tempdir().expect("tempdir");
    let ctx = top.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("mkdir");
    std::fs::write(ctx.join("a"), "a").expect("write");
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY a /a\n").expect("write");
    // A host file the symlinks point at: it must stay as it is.
    let victim = top.path().join("passwd");
    std::fs::write(&victim, "root:x:0:0::/root:/bin/sh\n").expect("write");
    let iid = top.path().join("iid");
    let meta = top.path().join("meta");
    std::os::unix::fs::symlink(&victim, &iid).expect("symlink");
    std::os::unix::fs::symlink(&victim, &meta).expect("symlink");
    let k = Kiln::new();
    let id = k.build(
        &ctx,
        &[
            "--iidfile",
            iid.to_str().expect("utf-8"),
            "--metadata-file",
            meta.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("read"),
        "root:x:0:0::/root:/bin/sh\n",
        "the symlinks' target was written"
    );
    assert!(!std::fs::symlink_metadata(&iid).expect("lstat").is_symlink());
    assert_eq!(std::fs::read_to_string(&iid).expect("read"), id);
    assert!(std::fs::read_to_string(&meta)
        .expect("read")
        .contains("containerimage.digest"));

    // A FIFO with a reader gets the ID; the build never blocks in open(2).
    let fifo = top.path().join("fifo");
    let c = CString::new(fifo.as_os_str().as_bytes()).expect("path");
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).expect("read fifo"))
    };
    let id2 = k.build(&ctx, &["--iidfile", fifo.to_str().expect("utf-8")]);
    assert_eq!(reader.join().expect("reader"), id2);
}
