//! Rootless kiln end to end (issue 18): the same `kiln` binary run by an
//! unprivileged user the test creates (`kiln-rl-<pid>-<n>`, with a
//! subordinate id range from `useradd`, removed afterwards), on a store in
//! a directory that user owns. kiln enters a user namespace through
//! `newuidmap`/`newgidmap` and builds with overlay (`userxattr`).
//!
//! Features covered, rootless:
//! - entering the namespace: the user is root (0) inside, its subordinate
//!   ids are 1…; `kiln unshare`; `kiln system info` (rootless, id maps,
//!   overlay with `user.` xattrs)
//! - build: RUN, whiteouts and opaque directories, `COPY --chown` to
//!   several ids (beyond 65535 too), `ADD` of a file and of a local tar
//!   holding files of other owners, `RUN --mount=type=cache` (kept
//!   between builds), `type=secret`, `type=bind`, `type=tmpfs`
//! - layers carry container ids (the tar exporter's members), never host
//!   subordinate ids; the same Dockerfile under SOURCE_DATE_EPOCH gives
//!   the same image ID rootless and as root
//! - exporters: the store, `type=oci`, `type=tar`, `type=local`; `kiln
//!   save`; `kiln run`; `RUN --mount=type=ssh`
//! - concurrent builds on one store; SIGTERM to the kiln outside the
//!   namespace cancels the build inside, nothing is left running
//! - registry: push to and pull from the test registry (`docker-registry`
//!   on 127.0.0.1), pull into a fresh store and run; the build cache
//!   exported to and imported from it (`--cache-to/--cache-from
//!   type=registry`); credentials from the user's `~/.docker/config.json`
//!   (`kiln login` as the user)
//! - network: the user's own by default, `--network=none` a fresh
//!   namespace with only `lo`
//! - cgroup limits: `--memory` without a delegated cgroup fails with a
//!   clear message while plain builds work (succeeds where delegated)
//! - the one-id fallback (a user without subordinate ids): a warning, a
//!   build as root works, `COPY --chown` and `USER` of another id fail
//!   naming the file or step and the id
//! - sandbox escapes, rootless: descriptors of kiln's caller, a host disk
//!   through `mknod`, `/sys` read-only, masked `/proc` paths
//! - hostile: overlay xattrs (`user.overlay.opaque`) in an ADDed tar hide
//!   nothing
//! - kiln as root of a podman container without `--privileged`, in a user
//!   namespace (`--uidmap`): a nested namespace over the container's ids;
//!   what it needs (`seccomp=unconfined`, `systempaths=unconfined`)
//!
//! Under CI=true missing prerequisites (newuidmap, unprivileged user
//! namespaces, Linux ≥ 5.11) fail the tests.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::registry::{sh, Reg, RegOpts};
use common::rootless::{prerequisites, TestUser, UserKiln};
use common::Kiln;

/// A docker-archive of the test busybox image that any user can read
/// (saved from a root store; the same bytes for every store that loads
/// it, so image IDs compare).
fn busybox_archive() -> PathBuf {
    static TAR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    TAR.get_or_init(|| {
        let dir = common::process_tempdir();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let tar = dir.join("busybox.tar");
        let k = Kiln::with_busybox();
        k.ok(&["save", "-o", tar.to_str().expect("utf-8"), "busybox:latest"]);
        std::fs::set_permissions(&tar, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        tar
    })
    .clone()
}

/// A fresh user with subordinate ids, or None (outside CI) when rootless
/// kiln cannot run here.
fn user_with_subids() -> Option<TestUser> {
    prerequisites().then(|| TestUser::create(true))
}

fn rootless_kiln(user: &TestUser) -> UserKiln<'_> {
    let k = user.kiln();
    k.load(&busybox_archive());
    k
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `tar --numeric-owner -tvf TAR` lines.
fn tar_listing(tar: &Path) -> String {
    text(
        &sh(Command::new("tar")
            .args(["--numeric-owner", "-tvf"])
            .arg(tar))
        .stdout,
    )
}

/// The `owner/group` column of the member `name` in a `tar -tv` listing.
fn owner_in(listing: &str, name: &str) -> String {
    let line = listing
        .lines()
        .find(|l| {
            l.split_whitespace()
                .last()
                .is_some_and(|n| n.trim_start_matches("./").trim_end_matches('/') == name)
        })
        .unwrap_or_else(|| panic!("{name} not in the tar:\n{listing}"));
    line.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

#[test]
fn namespace_info_and_unshare() {
    let Some(user) = user_with_subids() else {
        return;
    };
    let k = user.kiln();
    let info = k.ok(&["system", "info"]);
    assert!(info.contains("Rootless:     yes"), "{info}");
    assert!(info.contains("ID mapping:   subordinate ids"), "{info}");
    assert!(
        info.contains("Snapshotter:  overlay (user.overlay xattrs)"),
        "{info}"
    );
    assert!(
        info.contains(&format!("UID map:      0:{}:1,1:", user.uid)),
        "{info}"
    );
    let id = k.ok(&[
        "unshare",
        "sh",
        "-c",
        "id -u; id -g; cat /proc/self/uid_map",
    ]);
    let mut lines = id.lines();
    assert_eq!(lines.next(), Some("0"), "{id}");
    assert_eq!(lines.next(), Some("0"), "{id}");
    let map: Vec<Vec<u64>> = lines
        .map(|l| {
            l.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .collect();
    assert_eq!(map[0], vec![0, u64::from(user.uid), 1], "{id}");
    assert!(
        map.len() == 2 && map[1][0] == 1 && map[1][2] == 131072,
        "{id}"
    );
    // The default store for the user is under its home.
    let o = k
        .command(common::rootless::kiln_bin())
        .args(["system", "info"])
        .output()
        .expect("kiln");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains(&format!(
            "Store:        {}/.local/share/kiln",
            user.home.display()
        )),
        "{}",
        text(&o.stdout)
    );
    // Without HOME, or with relative HOME / XDG_DATA_HOME (ignored, as
    // the XDG spec says), the store is still under the home from the
    // user database: never /tmp/.local/share/kiln (a shared directory
    // another user could have made first) nor below the working
    // directory.
    let want = format!("Store:        {}/.local/share/kiln\n", user.home.display());
    for env in [
        vec![],
        vec![("HOME", "relative")],
        vec![("XDG_DATA_HOME", "rel"), ("HOME", "")],
    ] {
        let mut c = k.command(common::rootless::kiln_bin());
        c.env_remove("HOME").envs(env.iter().copied());
        let o = c.args(["system", "info"]).output().expect("kiln");
        assert!(o.status.success(), "{env:?}: {}", text(&o.stderr));
        assert!(
            text(&o.stdout).contains(&want),
            "{env:?}: {}",
            text(&o.stdout)
        );
    }
    // Root never opens the user's store (the user controls all of it, and
    // root's files would be left in it): refused, nothing written.
    k.ok(&["images"]);
    let before = std::fs::read_dir(k.root()).expect("ls").count();
    let o = Command::new(common::rootless::kiln_bin())
        .arg("--root")
        .arg(k.root())
        .args(["images"])
        .output()
        .expect("kiln");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains(&format!(
            "belongs to uid {}, not to this kiln's uid 0",
            user.uid
        )),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(std::fs::read_dir(k.root()).expect("ls").count(), before);
    // Nor, through a symlink the user made in place of a store, a
    // directory of root's with files of its own: refused, its mode and
    // contents untouched (it was made 0700 and filled).
    let victim = tempfile::tempdir().expect("tmp");
    std::fs::write(victim.path().join("keep"), "root's").expect("write");
    std::fs::set_permissions(victim.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let link = user.home.join("store-link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(victim.path(), &link).expect("symlink");
    std::os::unix::fs::lchown(&link, Some(user.uid), Some(user.gid)).expect("lchown");
    let o = Command::new(common::rootless::kiln_bin())
        .arg("--root")
        .arg(&link)
        .args(["images"])
        .output()
        .expect("kiln");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("is not a kiln store"),
        "{}",
        text(&o.stderr)
    );
    let m = std::fs::metadata(victim.path()).expect("stat");
    assert_eq!(m.permissions().mode() & 0o7777, 0o755, "chmod'ed");
    let names: Vec<_> = std::fs::read_dir(victim.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["keep"]);
}

/// RUN, whiteouts, COPY --chown, ADD (file and tar), every RUN --mount
/// type, exporters and `kiln run`, with the files' owners checked in the
/// layer tars.
#[test]
fn build_mounts_exporters_and_run() {
    let Some(user) = user_with_subids() else {
        return;
    };
    let k = rootless_kiln(&user);
    let ctx = k.context(
        "ctx",
        &[
            (
                "Dockerfile",
                "FROM busybox\n\
                 ARG N=1\n\
                 RUN mkdir -p /a/b /gone && echo x > /a/b/f && echo y > /gone/y \
                     && chown -R 1000:1000 /a && chown 33:44 /a/b/f\n\
                 RUN rm -rf /gone /a/b/f && mkdir /gone && echo z > /gone/z && chown 65534:65534 /gone/z\n\
                 COPY --chown=1234:567 a.txt /copied.txt\n\
                 COPY --chown=70000:70001 a.txt /high.txt\n\
                 ADD a.txt /added.txt\n\
                 ADD app.tar /app/\n\
                 RUN --mount=type=cache,target=/cache echo \"run $N\" >> /cache/log && cp /cache/log /cache-log\n\
                 RUN --mount=type=secret,id=tok cat /run/secrets/tok > /secret-len.txt && wc -c < /run/secrets/tok > /secret-len.txt\n\
                 RUN --mount=type=bind,source=a.txt,target=/bound.txt cp /bound.txt /from-bind.txt\n\
                 RUN --mount=type=tmpfs,target=/t touch /t/x && ls /t > /tmpfs.txt && test ! -e /t/y\n\
                 RUN --mount=type=ssh test -S \"$SSH_AUTH_SOCK\" && echo ssh-ok > /ssh.txt\n\
                 RUN id -u > /whoami\n",
            ),
            ("a.txt", "hello\n"),
        ],
    );
    // A tar with files of other owners for ADD.
    let src = k.dir.path().join("tarsrc");
    std::fs::create_dir_all(src.join("etc")).expect("mkdir");
    std::fs::write(src.join("etc/conf"), "c\n").expect("write");
    std::fs::write(src.join("bin-file"), "b\n").expect("write");
    sh(Command::new("chown")
        .arg("4242:4343")
        .arg(src.join("etc/conf")));
    sh(Command::new("chown").arg("0:0").arg(src.join("bin-file")));
    sh(Command::new("tar")
        .arg("-C")
        .arg(&src)
        .args(["--numeric-owner", "-cf"])
        .arg(ctx.join("app.tar"))
        .args(["etc", "bin-file"]));
    user.chown(&ctx);
    let secret = k.dir.path().join("secret");
    std::fs::write(&secret, "s3cr3t").expect("secret");
    user.chown(&secret);
    let secret_arg = format!("id=tok,src={}", secret.display());
    let sock = k.dir.path().join("agent.sock");
    let _agent = std::os::unix::net::UnixListener::bind(&sock).expect("agent socket");
    user.chown(&sock);
    let ssh_arg = format!("default={}", sock.display());
    let oci = k.dir.path().join("out-oci.tar");
    let fstar = k.dir.path().join("out-fs.tar");
    let local = k.dir.path().join("out-local");
    let c = ctx.to_str().expect("utf-8");
    k.ok(&[
        "build",
        "-q",
        "-t",
        "app:1",
        "--secret",
        &secret_arg,
        "--ssh",
        &ssh_arg,
        "-o",
        &format!("type=oci,dest={}", oci.display()),
        "-o",
        &format!("type=tar,dest={}", fstar.display()),
        "-o",
        &format!("type=local,dest={}", local.display()),
        "-o",
        "type=image",
        c,
    ]);
    // Owners inside the image: container ids, as written.
    let fs = tar_listing(&fstar);
    for (name, owner) in [
        ("a", "1000/1000"),
        ("a/b", "1000/1000"),
        ("gone/z", "65534/65534"),
        ("copied.txt", "1234/567"),
        ("high.txt", "70000/70001"),
        ("added.txt", "0/0"),
        ("app/etc/conf", "4242/4343"),
        ("app/bin-file", "0/0"),
        ("secret-len.txt", "0/0"),
    ] {
        assert_eq!(owner_in(&fs, name), owner, "{name}:\n{fs}");
    }
    assert!(!fs.contains("a/b/f"), "deleted file exported:\n{fs}");
    assert!(!fs.contains("gone/y"), "opaque dir leaked:\n{fs}");
    assert!(!fs.contains("s3cr3t"));
    // The local export holds the same files, owned by the host user (as
    // the user's kiln wrote them).
    let conf = std::fs::symlink_metadata(local.join("app/etc/conf")).expect("local export");
    assert!(conf.is_file());
    assert!(!local.join("a/b/f").exists());
    // The OCI archive: a layout whose layers carry container ids.
    let listing = tar_listing(&oci);
    assert!(listing.contains("index.json"), "{listing}");
    let out = k.ok(&["run", "--rm", "app:1", "sh", "-c",
        "cat /whoami /cache-log /secret-len.txt /from-bind.txt /tmpfs.txt /ssh.txt; ls -ln /copied.txt /high.txt /app/etc/conf"]);
    assert!(out.starts_with("0\nrun 1\n6\nhello\nx\nssh-ok\n"), "{out}");
    assert!(out.contains(" 1234 ") && out.contains(" 567 "), "{out}");
    assert!(out.contains(" 70000 ") && out.contains(" 70001 "), "{out}");
    assert!(out.contains(" 4242 ") && out.contains(" 4343 "), "{out}");
    // On the host the files belong to the user's subordinate ids.
    let root = k.root();
    let mut seen_sub = false;
    for e in walk(&root.join("snapshots")) {
        let m = std::fs::symlink_metadata(&e).expect("stat");
        assert_ne!(m.uid(), 0, "{} owned by host root", e.display());
        seen_sub |= m.uid() != user.uid;
    }
    assert!(seen_sub, "no file of a subordinate id in the snapshots");
    // The cache mount survives into the next build.
    k.ok(&[
        "build",
        "-q",
        "-t",
        "app:2",
        "--build-arg",
        "N=2",
        "--secret",
        &secret_arg,
        "--ssh",
        &ssh_arg,
        c,
    ]);
    let log = k.ok(&["run", "--rm", "app:2", "cat", "/cache-log"]);
    assert_eq!(log, "run 1\nrun 2\n");
    // `kiln save` as the user.
    let saved = k.dir.path().join("saved.tar");
    k.ok(&["save", "-o", saved.to_str().expect("utf-8"), "app:1"]);
    assert!(tar_listing(&saved).contains("manifest.json"));
}

/// Every path under `dir` (no symlinks followed).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// The same Dockerfile (files chowned to several users, whiteouts, COPY
/// --chown, ADD) under SOURCE_DATE_EPOCH gives the same image ID rootless
/// and as root.
#[test]
fn same_digest_rootless_and_as_root() {
    if !prerequisites() {
        return;
    }
    let dockerfile = "FROM busybox\n\
        RUN mkdir -p /a/b /c /home/app && echo 1 > /a/b/f && echo x > /c/y \
            && chown -R 1000:1000 /a /home/app && chown 33:33 /c/y && chown 70000:5 /a/b/f\n\
        RUN rm -rf /c && mkdir /c && echo z > /c/z && rm /a/b/f && chown 65534:65534 /c/z\n\
        COPY --chown=1234:567 a.txt /a.txt\n\
        ADD --chown=2000:2001 a.txt /home/app/added.txt\n\
        RUN chmod 4755 /home/app && ln -s /a.txt /link && chown -h 1000:1000 /link\n";
    let files = [("Dockerfile", dockerfile), ("a.txt", "same\n")];
    let root = Kiln::new();
    root.ok(&[
        "load",
        "-q",
        "-i",
        busybox_archive().to_str().expect("utf-8"),
    ]);
    let ctx = common::context(&files);
    let as_root = text(
        &sh(root
            .cmd()
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["build", "-q", "-t", "same:1"])
            .arg(ctx.path()))
        .stdout,
    );
    let user = TestUser::create(true);
    let k = rootless_kiln(&user);
    let uctx = k.context("ctx", &files);
    let rootless = text(
        &sh(k
            .cmd()
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["build", "-q", "-t", "same:1"])
            .arg(&uctx))
        .stdout,
    );
    assert!(as_root.trim().starts_with("sha256:"), "{as_root}");
    assert_eq!(as_root.trim(), rootless.trim(), "image IDs differ");
}

#[test]
fn registry_push_and_pull() {
    if !prerequisites() || !common::registry::ready(&["docker-registry"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let user = TestUser::create(true);
    let k = rootless_kiln(&user);
    let ctx = k.context(
        "ctx",
        &[(
            "Dockerfile",
            "FROM busybox\nRUN echo pushed > /p && chown 1000:1000 /p\n",
        )],
    );
    let name = format!("{}/rootless/app:1", reg.host());
    let cache = format!("{}/rootless/cache:1", reg.host());
    k.ok(&[
        "build",
        "-q",
        "-t",
        &name,
        "--cache-to",
        &format!("type=registry,ref={cache},mode=max"),
        ctx.to_str().expect("utf-8"),
    ]);
    k.ok(&["push", "-q", &name]);
    // The build cache through the registry: a fresh store runs nothing.
    let k3 = rootless_kiln(&user);
    let o = k3
        .cmd()
        .args(["build", "--progress", "plain", "--cache-from"])
        .arg(format!("type=registry,ref={cache}"))
        .arg(&ctx)
        .output()
        .expect("kiln");
    let log = format!("{}{}", text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{log}");
    assert!(
        log.lines().any(|l| l.contains("CACHED")),
        "not served from the registry cache:\n{log}"
    );
    // A fresh store of the same user pulls it back.
    let k2 = user.kiln();
    k2.ok(&["pull", "-q", &name]);
    let out = k2.ok(&["run", "--rm", &name, "sh", "-c", "cat /p; stat -c %u /p"]);
    assert_eq!(out, "pushed\n1000\n");
    // FROM a registry image, rootless.
    let ctx2 = k2.context(
        "ctx2",
        &[("Dockerfile", &format!("FROM {name}\nRUN cat /p > /q\n"))],
    );
    k2.ok(&[
        "build",
        "-q",
        "-t",
        "from-reg:1",
        ctx2.to_str().expect("utf-8"),
    ]);
}

#[test]
fn network_is_the_users_by_default_and_fresh_for_none() {
    let Some(user) = user_with_subids() else {
        return;
    };
    let k = rootless_kiln(&user);
    let ctx = k.context(
        "ctx",
        &[(
            "Dockerfile",
            "FROM busybox\n\
             RUN ls /sys/class/net > /host-net\n\
             RUN --network=none ls /sys/class/net > /none-net\n",
        )],
    );
    k.ok(&["build", "-q", "-t", "net:1", ctx.to_str().expect("utf-8")]);
    let host: Vec<String> = std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let out = k.ok(&["run", "--rm", "net:1", "cat", "/host-net"]);
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    let mut want: Vec<&str> = host.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(got, want, "default network is not the user's");
    let none = k.ok(&["run", "--rm", "net:1", "cat", "/none-net"]);
    assert_eq!(none, "lo\n");
}

/// Whether the user could create a child of its own cgroup v2 (a
/// delegated subtree).
fn delegated(k: &UserKiln<'_>) -> bool {
    k.command("sh")
        .args([
            "-c",
            "d=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup); \
             [ -f /sys/fs/cgroup/cgroup.controllers ] && mkdir \"$d/kiln-probe\" && rmdir \"$d/kiln-probe\"",
        ])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn limits_need_a_delegated_cgroup_plain_builds_work() {
    let Some(user) = user_with_subids() else {
        return;
    };
    let k = rootless_kiln(&user);
    let ctx = k.context("ctx", &[("Dockerfile", "FROM busybox\nRUN echo limited\n")]);
    let c = ctx.to_str().expect("utf-8");
    k.ok(&["build", "-q", c]);
    let o = k.run(&[
        "build",
        "-q",
        "--no-cache",
        "--memory",
        "64m",
        "--pids-limit",
        "100",
        c,
    ]);
    if delegated(&k) {
        assert!(o.status.success(), "{}", text(&o.stderr));
    } else {
        assert!(!o.status.success());
        let err = text(&o.stderr);
        assert!(
            err.contains("--memory, --cpus and --pids-limit need a cgroup kiln may write")
                && err.contains("kiln runs rootless")
                && err.contains("Delegate=yes"),
            "{err}"
        );
    }
}

#[test]
fn one_id_map_fallback() {
    if !prerequisites() {
        return;
    }
    let user = TestUser::create(false);
    let k = user.kiln();
    let o = k.run(&[
        "load",
        "-q",
        "-i",
        busybox_archive().to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let warn = text(&o.stderr);
    assert!(
        warn.contains("rootless: no subordinate ids for")
            && warn.contains("only one id is mapped")
            && warn.contains("files owned by other users"),
        "{warn}"
    );
    let info = k.ok(&["system", "info"]);
    assert!(info.contains("ID mapping:   one id"), "{info}");
    assert!(
        info.contains(&format!("UID map:      0:{}:1\n", user.uid)),
        "{info}"
    );
    let ctx = k.context(
        "ctx",
        &[
            (
                "Dockerfile",
                "FROM busybox\nRUN echo ok > /ok && id -u > /id\nCOPY a.txt /a.txt\n",
            ),
            (
                "Dockerfile.chown",
                "FROM busybox\nCOPY --chown=1234:567 a.txt /a.txt\n",
            ),
            ("Dockerfile.user", "FROM busybox\nUSER 1000\nRUN id\n"),
            ("a.txt", "a\n"),
        ],
    );
    let c = ctx.to_str().expect("utf-8");
    k.ok(&["build", "-q", "-t", "one:1", c]);
    assert_eq!(
        k.ok(&["run", "--rm", "one:1", "cat", "/ok", "/id"]),
        "ok\n0\n"
    );
    let o = k.run(&["build", "-q", "-f", "Dockerfile.chown", c]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("a.txt")
            && err.contains("uid 1234 does not exist in kiln's rootless user namespace")
            && err.contains("/etc/subuid"),
        "{err}"
    );
    let o = k.run(&["build", "-q", "-f", "Dockerfile.user", c]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("RUN id") && err.contains("uid 1000 does not exist"),
        "{err}"
    );
}

/// A few of the sandbox's escape checks (sandbox_e2e.rs), rootless.
#[test]
fn sandbox_escapes_hold_rootless() {
    let Some(user) = user_with_subids() else {
        return;
    };
    let k = rootless_kiln(&user);
    // The host disk that holds the store.
    let dev = std::fs::metadata(k.root().parent().expect("parent"))
        .expect("stat")
        .dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    let probe = format!(
        "ls /proc/self/fd > /fds; \
         mknod /tmp/disk b {maj} {min} 2>&1; echo \"mknod rc=$?\"; \
         head -c 4096 /tmp/disk > /dev/null 2>&1; echo \"read rc=$?\"; \
         touch /sys/kernel/kiln-probe 2>/dev/null; echo \"sys rc=$?\"; \
         for f in /proc/kcore /proc/keys /proc/timer_list; do \
           [ -e $f ] && echo \"masked $f $(wc -c < $f)\"; done; \
         (echo h > /proc/sysrq-trigger) 2>/dev/null; echo \"sysrq rc=$?\"; \
         echo x > /dev/null && head -c 3 /dev/zero | wc -c"
    );
    let ctx = k.context(
        "ctx",
        &[(
            "Dockerfile",
            &format!("FROM busybox\nRUN ({probe}) > /probe 2>&1; true\n"),
        )],
    );
    // fd 7 open on the host's / and fd 9 on a file while kiln runs.
    let held = k.dir.path().join("held");
    std::fs::write(&held, "x").expect("write");
    user.chown(&held);
    let mut cmd = k.cmd();
    let held_c = std::ffi::CString::new(held.to_str().expect("utf-8")).expect("cstring");
    // SAFETY: open and dup2 on descriptors this child owns; no allocation.
    unsafe {
        cmd.pre_exec(move || {
            let root = libc::open(c"/".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            let f = libc::open(held_c.as_ptr(), libc::O_RDONLY);
            if root < 0 || f < 0 || libc::dup2(root, 7) < 0 || libc::dup2(f, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd
        .args(["build", "-q", "-t", "probe:1", ctx.to_str().expect("utf-8")])
        .output()
        .expect("kiln");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = k.ok(&["run", "--rm", "probe:1", "cat", "/fds", "/probe"]);
    let fds: Vec<&str> = out
        .lines()
        .take_while(|l| l.parse::<u32>().is_ok())
        .collect();
    assert!(
        !fds.contains(&"7") && !fds.contains(&"9"),
        "caller's descriptors reached the step: {out}"
    );
    assert!(!out.contains("read rc=0"), "host disk read: {out}");
    assert!(!out.contains("sys rc=0"), "/sys writable: {out}");
    let masked: Vec<&str> = out.lines().filter(|l| l.starts_with("masked ")).collect();
    assert!(
        !masked.is_empty() && masked.iter().all(|l| l.ends_with(" 0")),
        "/proc paths not masked: {out}"
    );
    assert!(
        !out.contains("sysrq rc=0"),
        "/proc/sysrq-trigger writable: {out}"
    );
    assert!(out.trim_end().ends_with('3'), "allowed nodes: {out}");
    // The same through `kiln run`.
    let out = k.ok(&["run", "--rm", "busybox", "sh", "-c", &probe]);
    assert!(
        !out.contains("read rc=0"),
        "kiln run: host disk read: {out}"
    );
    assert!(!out.contains("sys rc=0"), "kiln run: /sys writable: {out}");
}

/// A root filesystem for `podman run --rootfs`: busybox, the kiln binary
/// and the libraries both need (from `ldd`), a build context and the
/// busybox archive.
fn podman_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in [
        "bin", "usr/bin", "etc", "tmp", "proc", "sys", "dev", "work/ctx", "store",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod");
    let bb = common::busybox().expect("busybox");
    std::fs::copy(&bb, root.join("bin/busybox")).expect("busybox");
    for a in ["sh", "cat", "ls", "id"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).expect("symlink");
    }
    let kiln = common::rootless::kiln_bin();
    std::fs::copy(&kiln, root.join("usr/bin/kiln")).expect("kiln");
    let ldd = text(&sh(Command::new("ldd").arg(&kiln)).stdout);
    for lib in ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/') && Path::new(w).exists())
    {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(lib, &to).expect("copy library");
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    std::fs::copy(busybox_archive(), root.join("work/bb.tar")).expect("archive");
    std::fs::write(
        root.join("work/ctx/Dockerfile"),
        "FROM busybox\nRUN echo hi > /x && chown 33:44 /x && stat -c %u:%g /x\n",
    )
    .expect("Dockerfile");
    // The container's root (host uid 400000, see --uidmap) owns its files.
    sh(Command::new("chown")
        .args(["-R", "400000:400000"])
        .arg(&root));
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    root
}

/// kiln as root of a podman container started without `--privileged`, in
/// a user namespace of its own (`--uidmap`, as a Kubernetes pod with
/// `hostUsers: false`), with podman's default capabilities: it enters a
/// nested user namespace and builds; what it needs besides is
/// `seccomp=unconfined` (mount(2) and unshare(2) are refused to a
/// container without CAP_SYS_ADMIN by the default profile) and
/// `systempaths=unconfined` (the kernel mounts no new /proc where parts of
/// the old one are masked). Without them the build fails with a clear
/// error.
#[test]
fn in_a_podman_container_without_privileged() {
    if !prerequisites() || !common::registry::ready(&["podman", "runc", "ldd"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = podman_rootfs(dir.path());
    let nofile = text(&sh(Command::new("sh").args(["-c", "ulimit -Hn"])).stdout);
    let podman = |extra: &[&str]| {
        let mut c = Command::new("podman");
        c.arg("--root").arg(dir.path().join("p/root"));
        c.arg("--runroot").arg(dir.path().join("p/run"));
        c.arg("--tmpdir").arg(dir.path().join("p/tmp"));
        c.args(["--runtime", "runc", "--storage-driver", "vfs"]);
        c.args(["run", "--rm", "--network", "host"]);
        c.args(["--ulimit", &format!("nofile={0}:{0}", nofile.trim())]);
        c.args(["--ulimit", "nproc=32768:32768"]);
        c.args(["--uidmap", "0:400000:65536", "--gidmap", "0:400000:65536"]);
        c.args(["--mount", "type=tmpfs,destination=/store"]);
        c.args(extra);
        c.arg("--rootfs").arg(&rootfs);
        c.args([
            "sh",
            "-c",
            "kiln --root /store/s load -q -i /work/bb.tar && kiln --root /store/s system info \
             && kiln --root /store/s build -q --progress plain /work/ctx",
        ]);
        c.stdin(std::process::Stdio::null());
        c.output().expect("podman")
    };
    let o = podman(&[
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "systempaths=unconfined",
    ]);
    let out = text(&o.stdout);
    assert!(
        o.status.success(),
        "kiln in podman failed:\n{out}\n{}",
        text(&o.stderr)
    );
    assert!(out.contains("Rootless:     yes"), "{out}");
    assert!(
        out.contains("Snapshotter:  overlay (user.overlay xattrs)"),
        "{out}"
    );
    assert!(out.contains("UID map:      0:0:65536"), "{out}");
    // podman's default seccomp profile and masked /proc: a clear error.
    let o = podman(&[]);
    assert!(!o.status.success(), "{}", text(&o.stdout));
    let err = text(&o.stderr);
    assert!(
        err.contains("Operation not permitted") || err.contains("EPERM"),
        "{err}"
    );
}

/// Two builds at once on one store, both rootless (each kiln its own user
/// namespace), sharing the base's snapshots.
#[test]
fn concurrent_builds_on_one_store() {
    let Some(user) = user_with_subids() else {
        return;
    };
    let k = rootless_kiln(&user);
    let ctx = k.context(
        "ctx",
        &[
            (
                "Dockerfile.1",
                "FROM busybox\nRUN sleep 1 && echo one > /n && chown 1:1 /n\n",
            ),
            (
                "Dockerfile.2",
                "FROM busybox\nRUN sleep 1 && echo two > /n && chown 2:2 /n\n",
            ),
        ],
    );
    let spawn = |n: &str| {
        k.cmd()
            .args(["build", "-q", "-t", &format!("c:{n}"), "-f"])
            .arg(ctx.join(format!("Dockerfile.{n}")))
            .arg(&ctx)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kiln")
    };
    let (a, b) = (spawn("1"), spawn("2"));
    for c in [a, b] {
        let o = c.wait_with_output().expect("wait");
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    assert_eq!(
        k.ok(&["run", "--rm", "c:1", "stat", "-c", "%u %n", "/n"]),
        "1 /n\n"
    );
    assert_eq!(
        k.ok(&["run", "--rm", "c:2", "stat", "-c", "%u %n", "/n"]),
        "2 /n\n"
    );
    k.ok(&["system", "check"]);
}

/// Processes of `uid` (this test's own user: nothing else runs as it).
fn processes_of(uid: u32) -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let m = std::fs::metadata(e.path()).ok()?;
            (m.uid() == uid).then(|| {
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                (pid, String::from_utf8_lossy(&cmd).replace('\0', " "))
            })
        })
        .collect()
}

/// SIGTERM to the kiln the caller started (the process outside the user
/// namespace) reaches the kiln inside: the build is cancelled, its step
/// killed, and the store stays intact.
#[test]
fn sigterm_to_the_outer_process_cancels_the_build() {
    let Some(user) = user_with_subids() else {
        return;
    };
    let k = rootless_kiln(&user);
    let ctx = k.context(
        "ctx",
        &[(
            "Dockerfile",
            "FROM busybox\nRUN echo started && sleep 600\n",
        )],
    );
    let mut child = k
        .cmd()
        .args(["build", "--progress", "plain", "-t", "never:1"])
        .arg(&ctx)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kiln");
    let t0 = std::time::Instant::now();
    while !processes_of(user.uid)
        .iter()
        .any(|(_, c)| c.starts_with("sleep 600"))
    {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "the step never started: {:?}",
            processes_of(user.uid)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: kill(2) of the child this test spawned.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let t1 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            t1.elapsed() < std::time::Duration::from_secs(30),
            "kiln still running 30 s after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success());
    let t2 = std::time::Instant::now();
    while !processes_of(user.uid).is_empty() {
        assert!(
            t2.elapsed() < std::time::Duration::from_secs(10),
            "left behind: {:?}",
            processes_of(user.uid)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    k.ok(&["system", "check"]);
    let o = k.run(&["inspect", "never:1"]);
    assert!(!o.status.success(), "the cancelled build was tagged");
}

/// Hostile: a tar added by ADD whose directories carry the overlay's own
/// xattrs (`user.overlay.opaque`, what a rootless overlay reads, and
/// `trusted.overlay.opaque`) must not hide what the layers below hold.
#[test]
fn overlay_xattrs_in_an_added_tar_hide_nothing() {
    let Some(user) = user_with_subids() else {
        return;
    };
    let k = rootless_kiln(&user);
    let src = k.dir.path().join("evil");
    for (d, name) in [
        ("bin", "user.overlay.opaque"),
        ("etc", "trusted.overlay.opaque"),
    ] {
        std::fs::create_dir_all(src.join(d)).expect("mkdir");
        std::fs::write(src.join(d).join("planted"), "x\n").expect("write");
        let p = std::ffi::CString::new(src.join(d).to_str().expect("utf-8")).expect("path");
        let n = std::ffi::CString::new(name).expect("name");
        // SAFETY: NUL-terminated path and name, a one-byte value.
        let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), c"y".as_ptr().cast(), 1, 0) };
        assert_eq!(r, 0, "setxattr {name}: {}", std::io::Error::last_os_error());
    }
    let ctx = k.context(
        "ctx",
        &[(
            "Dockerfile",
            "FROM busybox\nADD evil.tar /\nRUN test -x /bin/busybox && test -e /etc/passwd \
             && test -e /bin/planted && echo intact > /result\n",
        )],
    );
    sh(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(ctx.join("evil.tar"))
        .args(["bin", "etc"]));
    let listing = text(
        &sh(Command::new("tar")
            .args(["--xattrs", "-tvvf"])
            .arg(ctx.join("evil.tar")))
        .stdout,
    );
    assert!(listing.contains("user.overlay.opaque"), "{listing}");
    user.chown(&ctx);
    k.ok(&["build", "-q", "-t", "evil:1", ctx.to_str().expect("utf-8")]);
    assert_eq!(
        k.ok(&["run", "--rm", "evil:1", "cat", "/result"]),
        "intact\n"
    );
    let out = k.ok(&["run", "--rm", "evil:1", "sh", "-c", "ls /bin | wc -l"]);
    assert!(out.trim().parse::<u32>().expect("count") > 10, "{out}");
}

/// Registry credentials from the user's own `~/.docker/config.json`:
/// `kiln login` (run as the user, outside the namespace) writes it, and the
/// push and pull inside the namespace use it.
#[test]
fn registry_auth_from_the_users_docker_config() {
    if !common::registry::ready(&["docker-registry", "htpasswd"]) {
        return;
    }
    let Some(user) = user_with_subids() else {
        return;
    };
    let reg = Reg::start(RegOpts {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        tls: false,
    });
    let k = rootless_kiln(&user);
    let name = format!("{}/private/app:1", reg.host());
    k.ok(&["tag", "busybox:latest", &name]);
    let o = k.run(&["push", &name]);
    assert!(!o.status.success(), "pushed without credentials");
    k.ok(&["login", "-u", "alice", "-p", "s3cret", &reg.host()]);
    let config = user.home.join(".docker/config.json");
    let meta = std::fs::metadata(&config).expect("the user's docker config");
    assert_eq!(meta.uid(), user.uid, "config.json not the user's own");
    k.ok(&["push", "-q", &name]);
    let k2 = user.kiln();
    k2.ok(&["pull", "-q", &name]);
    assert_eq!(k2.ok(&["run", "--rm", &name, "echo", "pulled"]), "pulled\n");
}
