//! A hostile build cannot write to the host through symlinks (issue 13):
//! every write into a layer, a rootfs or an export directory goes through
//! kiln-fs. Each test plants links to a host directory ("outside", a temp
//! directory standing in for the host) and checks that nothing there
//! changed, and that the image got what BuildKit gives.

mod common;

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use common::{context, prerequisites, sh, Kiln};

/// A host directory holding one file, `victim` ("host", mode 0600).
fn outside() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("victim"), "host").unwrap();
    std::fs::set_permissions(
        d.path().join("victim"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    d
}

/// `outside` still holds exactly its victim, unchanged.
fn untouched(outside: &Path) {
    let mut names: Vec<String> = std::fs::read_dir(outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["victim"], "the host directory gained entries");
    let v = outside.join("victim");
    assert_eq!(
        std::fs::read_to_string(&v).unwrap(),
        "host",
        "victim rewritten"
    );
    assert_eq!(
        std::fs::symlink_metadata(&v).unwrap().mode() & 0o7777,
        0o600,
        "victim chmod'ed"
    );
}

fn dockerfile(ctx: &Path, text: &str) {
    std::fs::write(ctx.join("Dockerfile"), text).unwrap();
}

#[test]
fn heredoc_source_over_a_context_symlink_does_not_write_the_host_file() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let out = outside();
    let victim = out.path().join("victim");
    for chmod in ["", "--chmod=4777 "] {
        let ctx = context(&[]);
        std::fs::create_dir(ctx.path().join("dir")).unwrap();
        symlink(&victim, ctx.path().join("dir/s")).unwrap();
        dockerfile(
            ctx.path(),
            &format!("FROM busybox\nCOPY {chmod}dir/ <<s /d/\nfrom heredoc\ns\n"),
        );
        k.build(ctx.path(), &["-t", "hd:1"]);
        untouched(out.path());
        // BuildKit's copier replaces the copied link with the heredoc file.
        let got = sh(
            &k,
            "hd:1",
            "test -L /d/s && echo link; cat /d/s; stat -c %a /d/s",
        );
        let mode = if chmod.is_empty() { "644" } else { "4777" };
        assert_eq!(got, format!("from heredoc\n{mode}\n"), "chmod {chmod:?}");
    }
}

#[test]
fn copy_chmod_and_chown_through_links_stay_in_the_image() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let out = outside();
    let o = out.path().display().to_string();
    let ctx = context(&[("f", "file\n"), ("d/inner", "inner\n")]);
    symlink(out.path().join("victim"), ctx.path().join("d/v")).unwrap();
    symlink(out.path(), ctx.path().join("d/hostdir")).unwrap();
    dockerfile(
        ctx.path(),
        &format!(
            "FROM busybox\n\
             RUN ln -s {o} /app && ln -s {o}/victim /app-file\n\
             COPY --chmod=777 --chown=1000:1000 f /app/\n\
             COPY --chmod=777 f /app-file\n\
             COPY --chmod=777 --chown=1000:1000 d/ /app/d/\n\
             RUN ln -s {o} /lk\n\
             COPY --chmod=777 --link f /lk/linked\n"
        ),
    );
    k.build(ctx.path(), &["-t", "ch:1"]);
    untouched(out.path());
    let got = sh(
        &k,
        "ch:1",
        &format!(
            "test -L /app && test -L /app-file && echo links; \
             cat {o}/f {o}/victim; stat -c '%a %u' {o}/f {o}/d/inner; \
             readlink {o}/d/v"
        ),
    );
    assert_eq!(
        got,
        format!("links\nfile\nfile\n777 1000\n777 1000\n{o}/victim\n")
    );
}

#[test]
fn symlinked_workdir_is_created_inside_the_image() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let out = outside();
    let o = out.path().display().to_string();
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        &format!(
            "FROM busybox\nRUN ln -s {o} /w\nWORKDIR /w/sub\nRUN pwd > here\nWORKDIR /w/sub2\n"
        ),
    );
    k.build(ctx.path(), &["-t", "wd:1"]);
    untouched(out.path());
    let got = sh(
        &k,
        "wd:1",
        &format!("test -L /w && echo link; cat {o}/sub/here; test -d {o}/sub2 && echo sub2"),
    );
    // The step ran in the link's target inside the image.
    assert_eq!(got, format!("link\n{o}/sub\nsub2\n"));
}

/// A tar with symlinks `hostdir` -> the host directory and `hostfile` ->
/// the host file, then `files` (name, content).
fn hostile_tar(o: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let head = |kind, size| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    for (name, target) in [
        ("hostdir", o.to_string()),
        ("hostfile", format!("{o}/victim")),
    ] {
        let mut h = head(tar::EntryType::Symlink, 0);
        b.append_link(&mut h, name, target).unwrap();
    }
    for (name, data) in files {
        let mut h = head(tar::EntryType::Regular, data.len() as u64);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn add_archive_through_links_unpacks_inside_the_image() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let out = outside();
    let o = out.path().display().to_string();
    let ctx = context(&[]);
    // A member written over a link to the host file, into a destination
    // that is a link to the host directory.
    std::fs::write(
        ctx.path().join("a.tar"),
        hostile_tar(&o, &[("hostfile", b"pwned\n")]),
    )
    .unwrap();
    dockerfile(
        ctx.path(),
        &format!("FROM busybox\nRUN ln -s {o} /dst\nADD a.tar /dst/\n"),
    );
    k.build(ctx.path(), &["-t", "add:1"]);
    untouched(out.path());
    let got = sh(
        &k,
        "add:1",
        &format!("test -L /dst && echo link; test -L {o}/hostfile || cat {o}/hostfile; readlink {o}/hostdir"),
    );
    assert_eq!(got, format!("link\npwned\n{o}\n"));
    // A member below a link to the host directory: it may fail, but it
    // never lands on the host.
    std::fs::write(
        ctx.path().join("b.tar"),
        hostile_tar(&o, &[("hostdir/pwned", b"pwned\n")]),
    )
    .unwrap();
    dockerfile(ctx.path(), "FROM busybox\nADD b.tar /x/\n");
    let _ = k.run(&["build", "-q", ctx.path().to_str().unwrap()]);
    untouched(out.path());
}

#[test]
fn run_mount_target_through_a_link_to_a_host_path() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let out = outside();
    let o = out.path().display().to_string();
    let ctx = context(&[("f", "mounted\n")]);
    // Each mount lands at the link's target inside the image while the
    // step runs, and the link stays a link (runc resolves a destination
    // inside the root).
    dockerfile(
        ctx.path(),
        &format!(
            "FROM busybox\nRUN ln -s {o} /mnt2\n\
             RUN --mount=type=bind,source=f,target=/mnt2/f \
                 test -L /mnt2 && cat {o}/f > /seen\n\
             RUN --mount=type=cache,target=/mnt2/cache \
                 test -L /mnt2 && touch {o}/cache/x\n\
             RUN --mount=type=tmpfs,target=/mnt2/victim \
                 test -L /mnt2 && touch {o}/victim/in-tmpfs\n"
        ),
    );
    k.build(ctx.path(), &["-t", "mnt:1"]);
    untouched(out.path());
    assert_eq!(sh(&k, "mnt:1", "cat /seen"), "mounted\n");
}

#[test]
fn run_volume_onto_a_link_lands_at_its_target_inside_the_container() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let out = outside();
    let o = out.path().display().to_string();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("data"), "volume\n").unwrap();
    let ctx = context(&[]);
    dockerfile(ctx.path(), &format!("FROM busybox\nRUN ln -s {o} /vol\n"));
    k.build(ctx.path(), &["-t", "vol:1"]);
    let v = format!("{}:/vol", src.path().display());
    let got = k.ok(&[
        "run",
        "--rm",
        "-v",
        &v,
        "vol:1",
        "sh",
        "-c",
        &format!("test -L /vol && echo link; cat {o}/data; touch /vol/new"),
    ]);
    assert_eq!(got, "link\nvolume\n");
    untouched(out.path());
    assert!(src.path().join("new").exists());
}

#[test]
fn local_export_never_creates_device_nodes_on_the_host() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        "FROM busybox\nRUN mknod /null2 c 1 3 && mknod /disk b 7 0 && mkfifo /fifo && echo x > /file\n",
    );
    let dest = tempfile::tempdir().unwrap();
    let o = format!("type=local,dest={}", dest.path().join("out").display());
    let r = k.run(&["build", "-q", "-o", &o, ctx.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    let out = dest.path().join("out");
    assert!(out.join("file").is_file());
    for n in ["null2", "disk"] {
        assert!(
            std::fs::symlink_metadata(out.join(n)).is_err(),
            "device node {n} was created on the host"
        );
        assert!(
            err.contains(&format!("/{n}")),
            "no warning naming {n}: {err}"
        );
    }
    // A tar export leaves them out as well (and says so).
    let tar = dest.path().join("out.tar");
    let o = format!("type=tar,dest={}", tar.display());
    let r = k.run(&["build", "-q", "-o", &o, ctx.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains("/null2"), "{err}");
}

/// `-o type=local` into a directory that has files of its own (`-o .`):
/// the image's whiteouts remove what its earlier layers wrote there, never
/// what the directory held (BuildKit merges its tree into `dest` too). An
/// image made to whiteout `.git` or a whole directory deletes nothing of
/// the user's.
#[test]
fn local_export_whiteouts_never_delete_what_dest_held() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        "FROM busybox\n\
         RUN mkdir -p /src /data /.git && echo img > /src/f && echo img > /data/g && echo img > /.git/HEAD\n\
         RUN rm -rf /src /.git /data && mkdir /data && echo new > /data/h\n",
    );
    let dest = tempfile::tempdir().unwrap();
    let out = dest.path();
    for (p, c) in [
        ("src/user.txt", "mine"),
        ("data/user.txt", "mine"),
        (".git/config", "mine"),
    ] {
        std::fs::create_dir_all(out.join(p).parent().unwrap()).unwrap();
        std::fs::write(out.join(p), c).unwrap();
    }
    let o = format!("type=local,dest={}", out.display());
    let r = k.run(&["build", "-q", "-o", &o, ctx.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    for p in ["src/user.txt", "data/user.txt", ".git/config"] {
        assert_eq!(
            std::fs::read_to_string(out.join(p)).ok().as_deref(),
            Some("mine"),
            "the export deleted {p}, which dest held"
        );
    }
    for gone in ["src/f", "data/g", ".git/HEAD"] {
        assert!(!out.join(gone).exists(), "{gone} survived its whiteout");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("data/h")).unwrap(),
        "new\n"
    );
    assert!(out.join("bin/busybox").is_file());
}

/// `-o type=local` merges only the image's final tree into `dest`: an
/// entry an earlier layer made and a later one removed never touches what
/// `dest` held (a file `src` over the user's `src/` directory, then
/// deleted, used to delete the directory); what is written belongs to
/// the user running kiln, not to the image's uid; a directory `dest` had
/// keeps its owner and mode (an image's `.ssh` 0777 of uid 1001 made the
/// user's own `.ssh` that); a symlink in `dest` is replaced, never
/// written through; a final file over one of the user's directories is
/// an error that deletes nothing.
#[test]
fn local_export_merges_the_final_tree_as_the_user_and_keeps_dest_own() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let out = outside();
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        "FROM busybox\n\
         RUN echo img > /src && echo img > /.git\n\
         RUN rm /src /.git && mkdir -m 777 /.ssh && echo k > /.ssh/key \
         && chown -R 1001:1001 /.ssh && echo img > /link && chown 1001:1001 /link\n",
    );
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    std::fs::create_dir_all(d.join("src/deep")).unwrap();
    std::fs::write(d.join("src/deep/code.rs"), "mine").unwrap();
    std::fs::create_dir_all(d.join(".git")).unwrap();
    std::fs::write(d.join(".git/config"), "mine").unwrap();
    std::fs::create_dir(d.join(".ssh")).unwrap();
    std::fs::set_permissions(d.join(".ssh"), std::fs::Permissions::from_mode(0o700)).unwrap();
    symlink(out.path().join("victim"), d.join("link")).unwrap();
    let o = format!("type=local,dest={}", d.display());
    let r = k.run(&["build", "-q", "-o", &o, ctx.path().to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        std::fs::read_to_string(d.join("src/deep/code.rs")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_to_string(d.join(".git/config")).unwrap(),
        "mine"
    );
    let ssh = std::fs::metadata(d.join(".ssh")).unwrap();
    assert_eq!(ssh.mode() & 0o7777, 0o700, "dest's own .ssh was chmod'ed");
    // SAFETY: no arguments.
    let me = unsafe { libc::geteuid() };
    assert_eq!(ssh.uid(), me, "dest's own .ssh was chown'ed");
    let key = std::fs::metadata(d.join(".ssh/key")).unwrap();
    assert_eq!((key.uid(), key.gid()), (me, unsafe { libc::getegid() }));
    assert!(std::fs::symlink_metadata(d.join("link")).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(d.join("link")).unwrap(), "img\n");
    assert_eq!(std::fs::metadata(d.join("bin/busybox")).unwrap().uid(), me);
    untouched(out.path());

    // A final file where dest has a directory: refused, nothing lost.
    let ctx = context(&[]);
    dockerfile(ctx.path(), "FROM busybox\nRUN echo img > /conf\n");
    std::fs::create_dir(d.join("conf")).unwrap();
    std::fs::write(d.join("conf/x"), "mine").unwrap();
    let r = k.run(&["build", "-q", "-o", &o, ctx.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{err}");
    assert!(
        err.contains("is a directory and the image has a file there"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(d.join("conf/x")).unwrap(), "mine");
}

/// Another output inside a `type=local` destination is refused before the
/// build: the image's tree is written there first and could hold, where
/// `--iidfile` or a tar goes next, a symlink to a device or a directory
/// of the host (`iid -> /dev/sda` was written through as root). A stale
/// `--iidfile` of an earlier build is gone after a failed one.
#[test]
fn outputs_inside_a_local_destination_are_refused() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        "FROM busybox\nRUN ln -s /dev/full /iid && mkdir /cache && ln -s /dev/full /rootfs.tar\n",
    );
    let dest = tempfile::tempdir().unwrap();
    let out = dest.path().join("out");
    let o = format!("type=local,dest={}", out.display());
    // Directories there are refused (opened through the image's links).
    for extra in [
        vec![
            "--cache-to".to_string(),
            format!("type=local,dest={}/cache", out.display()),
        ],
        vec![
            "-o".to_string(),
            format!("type=oci,tar=false,dest={}/./layout", out.display()),
        ],
    ] {
        let mut args = vec!["build", "-q", "-o", &o];
        args.extend(extra.iter().map(String::as_str));
        args.push(ctx.path().to_str().unwrap());
        let r = k.run(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{err}");
        assert!(
            err.contains("is inside the type=local destination"),
            "{err}"
        );
    }
    // A file there replaces what the image put at its name (`iid ->
    // /dev/full` was written through as root).
    let iid = out.join("iid");
    let tar = format!("type=tar,dest={}/rootfs.tar", out.display());
    let r = k.run(&[
        "build",
        "-q",
        "-o",
        &o,
        "-o",
        &tar,
        "--iidfile",
        iid.to_str().unwrap(),
        ctx.path().to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(std::fs::symlink_metadata(&iid).unwrap().is_file());
    assert!(std::fs::read_to_string(&iid)
        .unwrap()
        .starts_with("sha256:"));
    assert!(std::fs::symlink_metadata(out.join("rootfs.tar"))
        .unwrap()
        .is_file());
    // A failed build removes the --iidfile an earlier one left.
    let iid = dest.path().join("iid");
    std::fs::write(&iid, "sha256:old").unwrap();
    let bad = context(&[]);
    dockerfile(bad.path(), "FROM busybox\nRUN false\n");
    let r = k.run(&[
        "build",
        "--iidfile",
        iid.to_str().unwrap(),
        bad.path().to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(!iid.exists(), "the old image ID survived a failed build");
}

/// A bind mount of a stage's directory shows that stage's files only:
/// what an earlier layer had under a directory a later one made opaque
/// (`rm -rf /a && mkdir /a`) stays deleted, as `COPY --from` sees it.
#[test]
fn a_bind_mount_from_a_stage_shows_nothing_its_opaque_directory_deleted() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        "FROM busybox AS s\n\
         RUN mkdir -p /a/b && echo secret > /a/b/s\n\
         RUN rm -rf /a && mkdir /a\n\
         RUN mkdir -p /a/b && echo new > /a/b/n\n\
         FROM busybox\n\
         RUN --mount=type=bind,from=s,source=/a/b,target=/m echo LIST:$(ls /m | tr '\\n' ,)\n",
    );
    let o = k.run(&["build", "--progress", "plain", ctx.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.lines().any(|l| l.ends_with("LIST:n,")), "{err}");
}

/// A read-only bind is read-only before it is attached, and nothing is
/// mounted over the root: a target that led to `/` (an image's `/x -> /`,
/// or a symlink a cache mount holds) got the bind of a layer of the store
/// over the root, its read-only remount then landed on the rootfs below,
/// and the step wrote the stored layer — every later build of that base
/// saw the file. `kiln run -v HOST:/x:ro` was writable the same way.
#[test]
fn a_read_only_bind_is_never_left_writable_and_never_over_the_root() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    for (df, want) in [
        (
            "FROM busybox\nRUN ln -s / /x\n\
             RUN --mount=type=bind,from=busybox,target=/x sh -c 'echo pwned > /POISON'\n",
            "it leads to /",
        ),
        (
            "FROM busybox\nRUN --mount=type=cache,id=c1,target=/a ln -sfn / /a/b\n\
             RUN --mount=type=cache,id=c1,target=/a --mount=type=bind,from=busybox,target=/a/b \
             sh -c 'echo pwned > /POISON'\n",
            "the destination is the root of the filesystem",
        ),
    ] {
        let ctx = context(&[]);
        dockerfile(ctx.path(), df);
        let r = k.run(&["build", "-q", ctx.path().to_str().unwrap()]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{err}");
        assert!(err.contains(want), "{err}");
    }
    // No later build sees a planted file; a read-only bind refuses writes.
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        "FROM busybox\nRUN test ! -e /POISON && mkdir /m\n\
         RUN --mount=type=bind,from=busybox,target=/m sh -c 'touch /m/x 2>&1 || echo REFUSED'\n",
    );
    let r = k.run(&[
        "build",
        "--no-cache",
        "--progress",
        "plain",
        ctx.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        r.status.success(),
        "a layer of the store was written: {err}"
    );
    assert!(err.contains("REFUSED"), "{err}");
    // kiln run -v HOST:/x:ro where the image has /x -> /.
    let ctx = context(&[]);
    dockerfile(ctx.path(), "FROM busybox\nRUN ln -s / /x\n");
    k.build(ctx.path(), &["-t", "rootlink:1"]);
    let host = outside();
    let v = format!("{}:/x:ro", host.path().display());
    let r = k.run(&[
        "run",
        "--rm",
        "-v",
        &v,
        "rootlink:1",
        "sh",
        "-c",
        "echo hi > /f2",
    ]);
    assert!(!r.status.success());
    untouched(host.path());
}

/// A COPY's reuse of its previous run's unchanged files (hard links
/// into the new layer, found by the step's shape and the source's hash)
/// never takes another build's bytes: a build on a shared store whose
/// `/app/config` was, at the end of its COPY, a hard link of another
/// source's file (or a heredoc written over it) left an index row naming
/// `config`'s content over other bytes, and the victim's COPY of the same
/// shape linked them into its layer under its own key.
#[test]
fn a_copy_never_reuses_another_builds_file_under_its_own_content() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let touch = |p: &Path| {
        std::fs::File::options()
            .write(true)
            .open(p)
            .and_then(|f| f.set_modified(when))
            .unwrap();
    };
    let df = "FROM busybox\nCOPY a b /app/\n";
    let attacker = context(&[("Dockerfile", df)]);
    let a = attacker.path();
    std::fs::create_dir_all(a.join("a")).unwrap();
    std::fs::create_dir_all(a.join("b")).unwrap();
    std::fs::write(a.join("a/config"), "GOOD-CONFIG").unwrap();
    std::fs::write(a.join("a/zz"), "EVIL-CONFIG").unwrap();
    std::fs::hard_link(a.join("a/zz"), a.join("b/config")).unwrap();
    for f in ["a/config", "a/zz"] {
        touch(&a.join(f));
    }
    k.build(a, &[]);
    let victim = context(&[("Dockerfile", df)]);
    let v = victim.path();
    std::fs::create_dir_all(v.join("a")).unwrap();
    std::fs::create_dir_all(v.join("b")).unwrap();
    std::fs::write(v.join("a/config"), "GOOD-CONFIG").unwrap();
    std::fs::write(v.join("b/other"), "x").unwrap();
    touch(&v.join("a/config"));
    k.build(v, &["-t", "victim:1"]);
    assert_eq!(sh(&k, "victim:1", "cat /app/config"), "GOOD-CONFIG");
}

/// A step that executes `/proc/self/exe` runs kiln's own binary inside
/// the sandbox; a child of it reached the host's file through
/// `/proc/$PPID/exe` and, as its owner, made it setuid root (any local
/// user then had root). The init now runs from a read-only clone of the
/// binary: the file keeps its mode. (Run on a copy of the binary; the
/// image carries the host's libraries kiln needs.)
#[test]
fn a_step_never_changes_the_hosts_kiln_binary() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("kiln-copy");
    let src = std::env::var_os("KILN_E2E_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_kiln").into());
    std::fs::copy(&src, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctx = context(&[]);
    let ldd = std::process::Command::new("ldd")
        .arg(&bin)
        .output()
        .unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = ctx.path().join("libs").join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(lib, &to).unwrap();
    }
    std::fs::create_dir_all(ctx.path().join("evil")).unwrap();
    let helper = ctx.path().join("evil/docker-credential-evil");
    std::fs::write(&helper, "#!/bin/sh\nchmod 4755 /proc/$PPID/exe\n").unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    dockerfile(
        ctx.path(),
        "FROM busybox\nCOPY libs/ /\nCOPY evil/ /evil/\n\
         RUN mkdir /dc && echo '{\"credsStore\":\"evil\"}' > /dc/config.json\n\
         ENV PATH=/evil:/bin DOCKER_CONFIG=/dc\n\
         RUN [\"/proc/self/exe\", \"logout\", \"example.invalid\"]\n",
    );
    let o = std::process::Command::new(&bin)
        .arg("--root")
        .arg(k.root.path())
        .args(["build", "-q", "--no-cache"])
        .arg(ctx.path())
        .output()
        .unwrap();
    let mode = std::fs::metadata(&bin).unwrap().mode() & 0o7777;
    assert_eq!(
        mode,
        0o755,
        "the host's kiln binary was changed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// An image's `/etc/passwd` that is a FIFO is never waited on: the init
/// read it for every step (HOME, even without USER) and hung there.
#[test]
fn a_fifo_for_etc_passwd_is_an_error_not_a_hang() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        "FROM busybox\nRUN rm /etc/passwd && mkfifo /etc/passwd\nRUN echo after\n",
    );
    let child = k
        .cmd()
        .args(["build", "-q"])
        .arg(ctx.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = within_a_minute(child, "the step waited on a FIFO /etc/passwd");
    // No USER: the step runs as root, its HOME looked up in vain.
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A USER by name is then a clear error.
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        "FROM busybox\nRUN rm /etc/passwd && mkfifo /etc/passwd\nUSER nobody\nRUN echo after\n",
    );
    let child = k
        .cmd()
        .args(["build", "-q"])
        .arg(ctx.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = within_a_minute(child, "the step waited on a FIFO /etc/passwd");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
}

/// A directory tree deeper than a layer may be (1,500 levels from a RUN
/// step, 1,100 in the context) is an error that says so, not a stack
/// overflow that aborts kiln; the step's snapshot is pruned whole after
/// (prune recursed per level too, and failed on it for ever).
#[test]
fn a_tree_too_deep_is_an_error_and_prune_removes_it() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        "FROM busybox\nRUN mkdir -p x/$(printf 'a/%.0s' $(seq 1500))\n",
    );
    let r = k.run(&["build", "-q", ctx.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("deeper than 1000 levels"), "{err}");
    let deep = context(&[("Dockerfile", "FROM busybox\nCOPY . /d/\n")]);
    let mut p = deep.path().to_path_buf();
    for _ in 0..1100 {
        p.push("a");
    }
    std::fs::create_dir_all(&p).unwrap();
    let r = k.run(&["build", "-q", deep.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("deeper than 1000 levels"), "{err}");
    k.ok(&["prune", "-f"]);
    k.ok(&["system", "check"]);
}

/// What `.dockerignore` leaves out is not in the context: no symlink of
/// the context leads to it (`COPY cfg` with `cfg -> .env`, `COPY gitdir/`
/// with `gitdir -> .git` copied the secrets), as BuildKit, which never
/// sends them, says "not found".
#[test]
fn dockerignored_files_are_not_reached_through_symlinks() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        (".env", "TOKEN=supersecret\n"),
        (".dockerignore", ".env\n.git\n"),
    ]);
    std::fs::create_dir(ctx.path().join(".git")).unwrap();
    std::fs::write(ctx.path().join(".git/config"), "url=https://u:SECRET@x\n").unwrap();
    symlink(".env", ctx.path().join("cfg")).unwrap();
    symlink(".git", ctx.path().join("gitdir")).unwrap();
    for copy in ["COPY cfg /cfg", "COPY gitdir/ /g/", "COPY gitdir/config /c"] {
        dockerfile(ctx.path(), &format!("FROM busybox\n{copy}\n"));
        let r = k.run(&["build", "-q", ctx.path().to_str().unwrap()]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{copy}: copied an ignored file");
        assert!(err.contains("not found"), "{copy}: {err}");
    }
    // The links themselves are context files, copied as links.
    dockerfile(ctx.path(), "FROM busybox\nCOPY . /all/\n");
    k.build(ctx.path(), &["-t", "all:1"]);
    assert_eq!(
        sh(
            &k,
            "all:1",
            "readlink /all/cfg; test -e /all/.env || echo no-env"
        ),
        ".env\nno-env\n"
    );
}

/// A file named `.wh.*` (a deletion, to whoever unpacks the layer) never
/// goes into a layer: the build saw `/etc/passwd` and `/etc/.wh.passwd`,
/// the image unpacked elsewhere had no `/etc/passwd`.
#[test]
fn a_file_named_like_a_whiteout_never_enters_a_layer() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(".wh.passwd", "x\n")]);
    for df in [
        "FROM busybox\nCOPY .wh.passwd /etc/\n",
        "FROM busybox\nRUN touch /etc/.wh..wh..opq\n",
    ] {
        dockerfile(ctx.path(), df);
        let r = k.run(&["build", "-q", ctx.path().to_str().unwrap()]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{df}");
        assert!(err.contains("reads as a deletion"), "{err}");
    }
}

/// Which copied files are one (hard links) is part of a COPY's key: a
/// context of two separate files got the links of another build's
/// context with the same bytes, from the cache.
#[test]
fn a_copy_key_covers_its_hard_links() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let df = "FROM busybox\nCOPY f1 f2 /app/\n";
    let linked = context(&[("Dockerfile", df), ("f1", "same\n")]);
    std::fs::hard_link(linked.path().join("f1"), linked.path().join("f2")).unwrap();
    k.build(linked.path(), &["-t", "linked:1"]);
    let apart = context(&[("Dockerfile", df), ("f1", "same\n"), ("f2", "same\n")]);
    k.build(apart.path(), &["-t", "apart:1"]);
    assert_eq!(sh(&k, "linked:1", "stat -c %h /app/f1"), "2\n");
    assert_eq!(sh(&k, "apart:1", "stat -c %h /app/f1"), "1\n");
}

/// A `type=local` dest that is a symlink another user made (planted in a
/// shared directory) is not followed: root merged the image into the
/// directory it named (`/etc`, `/usr`).
#[test]
fn a_local_dest_symlinked_by_another_user_is_not_followed() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let shared = tempfile::tempdir().unwrap();
    let victim = outside();
    let link = shared.path().join("out");
    symlink(victim.path(), &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUN echo x > /planted\n")]);
    let o = format!("type=local,dest={}", link.display());
    let r = k.run(&["build", "-q", "-o", &o, ctx.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("not followed"), "{err}");
    untouched(victim.path());
}

/// A bind source whose name holds `:` (overlayfs' lowerdir separator):
/// `source=/s/x:.` lowered `.`, kiln's working directory on the host, into
/// the step. The name is the image's own directory, nothing else.
#[test]
fn a_bind_source_named_with_an_overlay_separator_lowers_nothing_of_the_host() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let host = outside();
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        "FROM busybox AS evil\nRUN mkdir -p /s/x '/s/x:.' && echo image > '/s/x:./own'\n\
         FROM busybox\n\
         RUN --mount=type=bind,from=evil,source=/s/x:.,target=/m,rw echo LIST:$(ls -a /m | tr '\\n' ,)\n",
    );
    let o = k
        .cmd()
        .current_dir(host.path())
        .args([
            "build",
            "--no-cache",
            "--progress",
            "plain",
            ctx.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("victim"),
        "the host's directory was lowered: {err}"
    );
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("LIST:.,..,own,"),
        "the mount is the image's directory and nothing else: {err}"
    );
    untouched(host.path());
}

/// `-o type=local` leaves no set-id bit nor file capability on the host
/// (a setuid-root shell from an untrusted image, in a directory other
/// users reach, would be theirs to run); `type=tar` keeps them.
#[test]
fn local_export_leaves_no_setuid_file_on_the_host() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[]);
    dockerfile(
        ctx.path(),
        "FROM busybox\nRUN cp /bin/busybox /sh && chmod 6755 /sh && mkdir /d && chmod 2775 /d\n",
    );
    let dest = tempfile::tempdir().unwrap();
    let o = format!("type=local,dest={}", dest.path().join("out").display());
    let r = k.run(&["build", "-q", "-o", &o, ctx.path().to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m = std::fs::metadata(dest.path().join("out/sh")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o755, "set-id bits reached the host");
    let d = std::fs::metadata(dest.path().join("out/d")).unwrap();
    assert_eq!(d.mode() & 0o7777, 0o2775, "a directory's setgid is kept");
    let tar = dest.path().join("out.tar");
    let o = format!("type=tar,dest={}", tar.display());
    let r = k.run(&["build", "-q", "-o", &o, ctx.path().to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let listed = std::process::Command::new("tar")
        .args(["-tvf"])
        .arg(&tar)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("-rwsr-sr-x") && l.ends_with(" sh")),
        "the tar keeps the image's modes: {listed}"
    );
}

/// `-f` naming a symlink out of its directory (`Dockerfile.ci ->
/// /etc/shadow` in an untrusted checkout) reads nothing of the host: a
/// parse error would print the file's lines.
#[test]
fn a_dockerfile_given_with_f_is_never_a_symlink_to_a_host_file() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::new();
    let host = tempfile::tempdir().unwrap();
    let secret = host.path().join("shadow");
    std::fs::write(&secret, "root:SECRET-HASH:19000:0:99999:7:::\n").unwrap();
    let ctx = context(&[("a", "x")]);
    let elsewhere = tempfile::tempdir().unwrap();
    for dir in [ctx.path(), elsewhere.path()] {
        symlink(&secret, dir.join("Dockerfile.ci")).unwrap();
        let f = dir.join("Dockerfile.ci");
        let r = k.run(&[
            "build",
            "-f",
            f.to_str().unwrap(),
            ctx.path().to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "built from a host file: {err}");
        assert!(
            !err.contains("SECRET-HASH"),
            "the host file was printed: {err}"
        );
        // Relative to the working directory too.
        let r = k
            .cmd()
            .current_dir(dir)
            .args(["build", "-f", "Dockerfile.ci", ctx.path().to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && !err.contains("SECRET-HASH"), "{err}");
    }
}

/// `-o type=local` whose dest is `/` (here through a symlink) is refused
/// before anything is written: the image's directories would replace the
/// host's symlinks (`/bin -> usr/bin`) and its files the host's.
#[test]
fn local_export_over_the_hosts_root_is_refused() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::new();
    let name = format!("kiln-refused-export-{}", std::process::id());
    let ctx = context(&[
        ("Dockerfile", &format!("FROM scratch\nCOPY f /{name}\n")),
        ("f", "x\n"),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let link = tmp.path().join("root");
    symlink("/", &link).unwrap();
    let o = format!("type=local,dest={}", link.display());
    let r = k.run(&["build", "-q", "-o", &o, ctx.path().to_str().unwrap()]);
    let written = Path::new("/").join(&name);
    let leaked = std::fs::remove_file(&written).is_ok();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !leaked,
        "{} was written on the host: {err}",
        written.display()
    );
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("refusing to export the image's filesystem over /"),
        "{err}"
    );
}

/// Waits for `child` at most a minute (killing it and failing with
/// `hung` after that) and returns its output.
fn within_a_minute(mut child: std::process::Child, hung: &str) -> std::process::Output {
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{hung}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Red-team finding: `COPY --chown=NAME` read the image's /etc/passwd and
/// /etc/group on the host side, where nothing is nodev: a device node there
/// was opened by kiln (a host disk read, /dev/zero read until memory ran
/// out) and a fifo hung the build. They are refused without being opened.
#[test]
fn chown_lookup_never_opens_a_device_or_fifo_from_the_image() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    for (file, make) in [
        ("/etc/passwd", "mknod /etc/passwd c 1 5"),
        ("/etc/group", "mkfifo /etc/group"),
    ] {
        let ctx = context(&[("f", "x")]);
        dockerfile(
            ctx.path(),
            &format!("FROM busybox\nRUN rm -f {file} && {make}\nCOPY --chown=root:root f /f\n"),
        );
        let child = k
            .cmd()
            .args(["build", "-q"])
            .arg(ctx.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let o = within_a_minute(child, &format!("{make}: the build hung on {file}"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{make}: the build should fail");
        assert!(
            err.contains(file) && err.contains("not a regular file"),
            "{make}: a clear error naming {file}: {err}"
        );
    }
}

/// Hostile-review finding: a writable bind mount of a single file from a
/// stage (`RUN --mount=type=bind,from=s,source=F,rw`) copied F on the host
/// side, where nothing is nodev: a device node an earlier step made was
/// opened as the host's device (here /dev/null's numbers, so the step got
/// an empty copy; a disk's numbers would have copied the host's disk into
/// the step) and a fifo hung the build. A special file is now bound as it
/// is, read-only, under the step's nodev; a regular file is still copied.
#[test]
fn a_writable_bind_of_a_special_file_never_opens_it_on_the_host() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[("f", "x")]);
    dockerfile(
        ctx.path(),
        "FROM busybox AS s\n\
         RUN mknod /null c 1 3 && mkfifo /fifo && echo text > /file\n\
         FROM busybox\n\
         RUN --mount=type=bind,from=s,source=/null,target=/x,rw test -c /x && echo null-is-a-device\n\
         RUN --mount=type=bind,from=s,source=/fifo,target=/x,rw test -p /x && echo fifo-is-a-fifo\n\
         RUN --mount=type=bind,from=s,source=/file,target=/x,rw test -f /x && echo more >> /x && cat /x\n",
    );
    let child = k
        .cmd()
        .args(["build", "--no-cache", "--progress", "plain"])
        .arg(ctx.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = within_a_minute(child, "the build hung on a fifo of the image");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("null-is-a-device"), "{err}");
    assert!(err.contains("fifo-is-a-fifo"), "{err}");
    assert!(err.contains("text\n") && err.contains("more"), "{err}");
}

#[test]
fn a_pipeline_whose_reader_exits_ends() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[]);
    // `&& true`: busybox sh execs its last command itself, with SIGQUIT
    // ignored as the shell has it; the grep must be a forked child.
    dockerfile(
        ctx.path(),
        "FROM busybox\nRUN yes kiln | head -c 9 > /y && grep -q '^SigIgn:[[:space:]]*0*$' /proc/self/status && true\n",
    );
    let child = k
        .cmd()
        .args(["build", "-q", "-t", "pipe:1"])
        .arg(ctx.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = within_a_minute(
        child,
        "`yes | head` never ended: SIGPIPE is ignored in the step",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sh(&k, "pipe:1", "cat /y"), "kiln\nkiln");
}
