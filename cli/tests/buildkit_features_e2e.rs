//! BuildKit-era Dockerfile features end to end (issue 7): `RUN --mount`
//! of every type, secrets that leave no trace in the store or the image,
//! forwarded SSH agents, `--network`, `--security=insecure`. Real builds on
//! a private store with the busybox base.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{build_fails, context, prerequisites, sh, Kiln};

fn dockerfile(text: &str) -> tempfile::TempDir {
    context(&[("Dockerfile", text)])
}

fn cachemount_dirs(k: &Kiln) -> Vec<String> {
    let d = k.root.path().join("cachemounts");
    let mut out: Vec<String> = std::fs::read_dir(d)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn cache_mount_persists_across_builds_never_enters_a_layer_and_prune_all_clears_it() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = dockerfile(
        "FROM busybox\n\
         ARG N=1\n\
         WORKDIR /work\n\
         RUN --mount=type=cache,target=/root/.cache,id=c1 \\\n\
             --mount=type=cache,target=rel,uid=1000,gid=50,mode=0710 \\\n\
             sh -c 'echo $N >> /root/.cache/log; cp /root/.cache/log /seen; stat -c \"%u %g %a\" /work/rel > /relstat'\n",
    );
    let c = ctx.path().to_str().unwrap();
    k.ok(&["build", "-q", "-t", "c:1", "--build-arg", "N=1", c]);
    assert_eq!(sh(&k, "c:1", "cat /seen"), "1\n");
    assert_eq!(sh(&k, "c:1", "cat /relstat"), "1000 50 710\n");
    // Neither the mount points nor the cache contents are in the image.
    assert_eq!(
        sh(
            &k,
            "c:1",
            "test ! -e /root/.cache && test ! -e /work/rel && echo absent"
        ),
        "absent\n"
    );
    let id2 = k.build(ctx.path(), &["-t", "c:2", "--build-arg", "N=2"]);
    assert_eq!(sh(&k, "c:2", "cat /seen"), "1\n2\n", "the cache persisted");
    // The contents are not part of the key: the same step is a cache hit
    // although the cache changed.
    let id2b = k.build(ctx.path(), &["--build-arg", "N=2"]);
    assert_eq!(id2, id2b);
    // The mount spec is part of the key.
    let other = dockerfile(
        "FROM busybox\nARG N=1\nWORKDIR /work\nRUN --mount=type=cache,target=/root/.cache,id=c9 sh -c 'echo $N >> /root/.cache/log; cp /root/.cache/log /seen'\n",
    );
    k.build(other.path(), &["-t", "c:9", "--build-arg", "N=2"]);
    assert_eq!(sh(&k, "c:9", "cat /seen"), "2\n");
    assert_eq!(cachemount_dirs(&k).len(), 3, "{:?}", cachemount_dirs(&k));

    // Plain prune keeps the cache mounts; prune --all clears them.
    k.ok(&["prune"]);
    assert_eq!(cachemount_dirs(&k).len(), 3);
    let out = k.ok(&["prune", "--all"]);
    assert!(out.contains("3 cache mounts"), "{out}");
    assert!(cachemount_dirs(&k).is_empty());
    k.build(ctx.path(), &["-t", "c:3", "--build-arg", "N=3"]);
    assert_eq!(sh(&k, "c:3", "cat /seen"), "3\n");
    let check = k.ok(&["system", "check"]);
    assert!(!check.to_lowercase().contains("problem"), "{check}");
}

#[test]
fn cache_mount_from_a_stage_seeds_a_new_cache_and_ro_is_read_only() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = dockerfile(
        "FROM busybox AS seed\n\
         RUN mkdir -p /s/sub && echo seeded > /s/sub/f\n\
         FROM busybox\n\
         RUN --mount=type=cache,target=/c,from=seed,source=/s cat /c/sub/f > /got\n\
         RUN --mount=type=cache,target=/c,from=seed,source=/s,ro sh -c 'touch /c/x 2>/dev/null && echo writable || echo readonly' > /ro\n",
    );
    k.build(ctx.path(), &["-t", "seeded"]);
    assert_eq!(sh(&k, "seeded", "cat /got"), "seeded\n");
    assert_eq!(sh(&k, "seeded", "cat /ro"), "readonly\n");
}

/// A cache seeded `from=` a stage is that seed's own: a cache another
/// build filled under the same id (BuildKit keys seeded caches by id and
/// source too) is not what the seeded mount shows.
#[test]
fn a_seeded_cache_is_not_the_one_another_build_filled_under_its_id() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let evil = dockerfile(
        "FROM busybox\nRUN --mount=type=cache,id=deps,target=/c sh -c 'echo EVIL > /c/marker'\n",
    );
    k.build(evil.path(), &[]);
    let victim = dockerfile(
        "FROM busybox AS src\nRUN mkdir /d && echo GOOD > /d/marker\n\
         FROM busybox\n\
         RUN --mount=type=cache,id=deps,from=src,source=/d,target=/c cat /c/marker > /got\n",
    );
    k.build(victim.path(), &["-t", "victim"]);
    assert_eq!(sh(&k, "victim", "cat /got"), "GOOD\n");
}

/// One RUN mounting one locked cache twice shares it (each mount waited
/// for the other's lock for ever, past Ctrl-C).
#[test]
fn one_locked_cache_mounted_twice_in_a_run_does_not_wait_for_itself() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = dockerfile(
        "FROM busybox\n\
         RUN --mount=type=cache,id=x,target=/a,sharing=locked \
         --mount=type=cache,id=x,target=/b,sharing=locked sh -c 'touch /a/f && ls /b > /seen'\n",
    );
    let mut child = k
        .cmd()
        .args(["build", "-q", "-t", "twice"])
        .arg(ctx.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let t = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the build waited for its own cache lock");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = child.wait_with_output().expect("output");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sh(&k, "twice", "cat /seen"), "f\n");
}

/// Two builds on one store at once, both holding the cache `id=shared-id`
/// for ~2 s with `sharing`. Returns what each saw.
fn concurrent_cache_users(sharing: &str) -> Vec<String> {
    let k = Kiln::with_busybox();
    let mk = |who: &str| {
        dockerfile(&format!(
            "FROM busybox\nRUN --mount=type=cache,target=/c,id=shared-id,sharing={sharing} sh -c '\
             if mkdir /c/busy 2>/dev/null; then echo alone; else echo together; fi > /r; \
             touch /c/{who}; sleep 2; ls /c | grep -v busy | wc -l >> /r; rmdir /c/busy 2>/dev/null; true'\n"
        ))
    };
    let (a, b) = (mk("a"), mk("b"));
    let spawn = |ctx: &Path, tag: &str| {
        k.cmd()
            .args(["build", "-q", "-t", tag])
            .arg(ctx)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln")
    };
    let pa = spawn(a.path(), "a");
    let pb = spawn(b.path(), "b");
    for p in [pa, pb] {
        let o = p.wait_with_output().expect("wait");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    vec![sh(&k, "a", "cat /r"), sh(&k, "b", "cat /r")]
}

#[test]
fn cache_mount_sharing_locked_serialises_and_private_separates() {
    if !prerequisites() {
        return;
    }
    // locked: never together; the second sees the first's file.
    let mut r = concurrent_cache_users("locked");
    r.sort();
    assert_eq!(r, vec!["alone\n1\n", "alone\n2\n"], "locked: {r:?}");
    // private: never together and each has a directory of its own.
    let r = concurrent_cache_users("private");
    assert_eq!(r, vec!["alone\n1\n", "alone\n1\n"], "private: {r:?}");
    // shared: together in one directory.
    let r = concurrent_cache_users("shared");
    assert!(r.iter().any(|s| s.starts_with("together")), "shared: {r:?}");
    assert!(r.iter().all(|s| s.ends_with("2\n")), "shared: {r:?}");
}

#[test]
fn bind_mounts_from_context_stage_and_image() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox AS s\n\
             RUN mkdir /data && echo one > /data/x\n\
             RUN echo two > /data/y && rm /data/x\n\
             FROM busybox\n\
             RUN --mount=type=bind,target=/ctx sh -c 'cat /ctx/a.txt > /a; ls /ctx > /ls; touch /ctx/new 2>/dev/null && echo writable > /ro || echo readonly > /ro'\n\
             RUN --mount=type=bind,target=/ctx,rw sh -c 'echo changed > /ctx/a.txt && cat /ctx/a.txt > /rw'\n\
             RUN --mount=type=bind,source=sub/f,target=/f cat /f > /sub\n\
             RUN --mount=type=bind,from=s,source=/data,target=/d sh -c 'ls /d > /stage; touch /d/z 2>/dev/null || echo ro >> /stage'\n\
             RUN --mount=type=bind,from=s,source=/data,target=/d,rw sh -c 'rm /d/y && echo w > /d/w && ls /d > /stagerw'\n\
             RUN --mount=type=bind,from=busybox,source=/etc,target=/e cat /e/group | head -1 > /img\n\
             RUN test ! -e /ctx && test ! -e /d && test ! -e /f && echo clean > /clean\n",
        ),
        ("a.txt", "from context\n"),
        ("secret.key", "ignored\n"),
        (".dockerignore", "secret.key\n"),
        ("sub/f", "sub file\n"),
    ]);
    k.build(ctx.path(), &["-t", "b:1"]);
    assert_eq!(sh(&k, "b:1", "cat /a"), "from context\n");
    let ls = sh(&k, "b:1", "cat /ls");
    assert!(ls.contains("a.txt") && !ls.contains("secret.key"), "{ls}");
    assert_eq!(sh(&k, "b:1", "cat /ro"), "readonly\n");
    assert_eq!(sh(&k, "b:1", "cat /rw"), "changed\n");
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("a.txt")).unwrap(),
        "from context\n",
        "rw writes never reach the context"
    );
    assert!(!ctx.path().join("new").exists());
    assert_eq!(sh(&k, "b:1", "cat /sub"), "sub file\n");
    assert_eq!(sh(&k, "b:1", "cat /stage"), "y\nro\n");
    assert_eq!(sh(&k, "b:1", "cat /stagerw"), "w\n");
    assert_eq!(sh(&k, "b:1", "cat /img"), "root:x:0:\n");
    assert_eq!(sh(&k, "b:1", "cat /clean"), "clean\n");

    // What is bound from the context is in the key: a changed file reruns
    // the step, an ignored one does not.
    let id1 = k.build(ctx.path(), &[]);
    std::fs::write(ctx.path().join("secret.key"), "still ignored\n").unwrap();
    assert_eq!(k.build(ctx.path(), &[]), id1);
    std::fs::write(ctx.path().join("a.txt"), "edited\n").unwrap();
    k.build(ctx.path(), &["-t", "b:2"]);
    assert_eq!(sh(&k, "b:2", "cat /a"), "edited\n");

    // Without a .dockerignore the context is bound directly (read-only).
    let direct = context(&[
        (
            "Dockerfile",
            "FROM busybox\nRUN --mount=type=bind,target=/ctx sh -c 'cat /ctx/a.txt > /a; touch /ctx/new 2>/dev/null || echo ro >> /a'\nRUN --mount=type=bind,target=/ctx,rw sh -c 'echo x > /ctx/a.txt; mkdir /ctx/d'\n",
        ),
        ("a.txt", "direct\n"),
    ]);
    k.build(direct.path(), &["-t", "b:3"]);
    assert_eq!(sh(&k, "b:3", "cat /a"), "direct\nro\n");
    assert_eq!(
        std::fs::read_to_string(direct.path().join("a.txt")).unwrap(),
        "direct\n"
    );
    assert!(!direct.path().join("d").exists());
}

#[test]
fn tmpfs_mount_with_size_leaves_nothing() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = dockerfile(
        "FROM busybox\nRUN --mount=type=tmpfs,target=/t,size=1m sh -c 'grep \" /t \" /proc/mounts > /m; echo x > /t/f; dd if=/dev/zero of=/t/big bs=1k count=2048 2>/dev/null || echo full >> /m'\n",
    );
    k.build(ctx.path(), &["-t", "t:1"]);
    let m = sh(&k, "t:1", "cat /m");
    assert!(m.starts_with("tmpfs /t tmpfs"), "{m}");
    assert!(m.contains("size=1024k"), "{m}");
    assert!(m.ends_with("full\n"), "{m}");
    assert_eq!(sh(&k, "t:1", "test ! -e /t && echo gone"), "gone\n");
}

/// Every file under `dir` (recursively) that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                todo.push(p);
            } else if m.is_file() {
                let mut data = std::fs::read(&p).unwrap_or_default();
                if data.starts_with(&[0x1f, 0x8b]) {
                    let out = Command::new("gzip")
                        .arg("-dc")
                        .arg(&p)
                        .output()
                        .expect("gzip");
                    data.extend_from_slice(&out.stdout);
                }
                if data.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

#[test]
fn secrets_reach_only_their_step_and_no_file_of_the_store_or_image() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let value = "S3CRET-kiln-7f3a9c-VALUE";
    let env_value = "ENV-S3CRET-kiln-41d0e2";
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("tok");
    std::fs::write(&file, value).unwrap();
    let ctx = dockerfile(
        "FROM busybox\n\
         RUN --mount=type=secret,id=tok rev /run/secrets/tok > /rev && echo file-ok > /ok\n\
         RUN --mount=type=secret,id=tok,target=/s,mode=0440,uid=1000,gid=50 sh -c 'stat -c \"%a %u %g\" /s > /st; grep -c . /s >> /st'\n\
         RUN --mount=type=secret,id=envtok,env=TOKEN sh -c 'echo \"$TOKEN\" | rev > /envrev && test ! -e /run/secrets/envtok && echo env-ok >> /ok'\n\
         RUN --mount=type=secret,id=absent sh -c 'test ! -e /run/secrets/absent && echo optional-ok >> /ok'\n\
         RUN test ! -e /run/secrets/tok && test -z \"$TOKEN\" && echo after-ok >> /ok\n",
    );
    let src = format!("id=tok,src={}", file.display());
    let o = k
        .cmd()
        .args(["build", "-t", "s:1", "--progress=plain", "--secret", &src])
        .args(["--secret", "id=envtok,env=KILN_TEST_SECRET"])
        .arg(ctx.path())
        .env("KILN_TEST_SECRET", env_value)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for out in [&o.stdout, &o.stderr] {
        let s = String::from_utf8_lossy(out);
        assert!(!s.contains(value) && !s.contains(env_value), "{s}");
    }
    assert_eq!(
        sh(&k, "s:1", "cat /ok"),
        "file-ok\nenv-ok\noptional-ok\nafter-ok\n"
    );
    assert_eq!(sh(&k, "s:1", "cat /st"), "440 1000 50\n1\n");
    // The step saw the values (reversed, so the image never holds them).
    let rev = |v: &str| v.chars().rev().collect::<String>();
    assert_eq!(sh(&k, "s:1", "cat /rev"), rev(value));
    assert_eq!(
        sh(&k, "s:1", "cat /envrev"),
        format!("{}\n", rev(env_value))
    );

    // The secret value changes nothing in the key: a new value is a hit.
    std::fs::write(&file, "another value").unwrap();
    let o2 = k
        .cmd()
        .args(["build", "-q", "--secret", &src])
        .args(["--secret", "id=envtok,env=KILN_TEST_SECRET"])
        .arg(ctx.path())
        .env("KILN_TEST_SECRET", "x")
        .output()
        .unwrap();
    assert!(o2.status.success());
    let id1 = k.inspect("s:1")["Id"].as_str().unwrap().to_string();
    assert_eq!(String::from_utf8_lossy(&o2.stdout).trim(), id1);

    let archive = tempfile::tempdir().unwrap();
    let tar = archive.path().join("s.tar");
    k.ok(&["save", "-o", tar.to_str().unwrap(), "s:1"]);
    let oci = archive.path().join("s-oci.tar");
    k.ok(&[
        "save",
        "--format",
        "oci",
        "-o",
        oci.to_str().unwrap(),
        "s:1",
    ]);
    let x = archive.path().join("x");
    std::fs::create_dir(&x).unwrap();
    for t in [&tar, &oci] {
        let st = Command::new("tar")
            .arg("-C")
            .arg(&x)
            .arg("-xf")
            .arg(t)
            .status()
            .unwrap();
        assert!(st.success());
    }
    for needle in [value, env_value] {
        let hits = files_containing(k.root.path(), needle.as_bytes());
        assert!(hits.is_empty(), "secret found in the store: {hits:?}");
        let hits = files_containing(archive.path(), needle.as_bytes());
        assert!(hits.is_empty(), "secret found in the saved image: {hits:?}");
    }
    let history = k.ok(&["history", "s:1"]);
    assert!(!history.contains(value));

    // required: a missing secret fails the build with a clear message.
    let req = dockerfile("FROM busybox\nRUN --mount=type=secret,id=nope,required true\n");
    let err = build_fails(&k, req.path(), &[]);
    assert!(err.contains("secret nope not found"), "{err}");
    // Nothing left on the tmpfs.
    let leftovers: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|r| {
            r.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("kiln-secret-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn ssh_agent_socket_is_forwarded() {
    if !prerequisites() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let k = Kiln::with_busybox();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let ino = std::fs::metadata(&sock).unwrap().ino();
    let ctx = dockerfile(
        "FROM busybox\n\
         RUN --mount=type=ssh sh -c 'test -S \"$SSH_AUTH_SOCK\" && echo $SSH_AUTH_SOCK > /ssh && stat -c %i \"$SSH_AUTH_SOCK\" >> /ssh'\n\
         RUN --mount=type=ssh,id=other,target=/agent sh -c 'echo $SSH_AUTH_SOCK > /ssh2; test -e /agent || echo skipped >> /ssh2'\n\
         RUN test ! -e /run/buildkit/ssh_agent.0 && echo clean > /clean\n",
    );
    let flag = format!("default={}", sock.display());
    k.build(ctx.path(), &["-t", "ssh:1", "--ssh", &flag]);
    // The host's socket is the step's to connect to, not to change.
    let before = std::fs::metadata(&sock).unwrap();
    let ch = dockerfile(
        "FROM busybox\nRUN --mount=type=ssh sh -c 'chmod 777 $SSH_AUTH_SOCK; chown 4242 $SSH_AUTH_SOCK; touch -d 2001-01-01 $SSH_AUTH_SOCK; true'\n",
    );
    k.build(ch.path(), &["--ssh", &flag]);
    let after = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        (after.mode(), after.uid(), after.mtime()),
        (before.mode(), before.uid(), before.mtime()),
        "the step changed the host's agent socket"
    );
    assert_eq!(
        sh(&k, "ssh:1", "cat /ssh"),
        format!("/run/buildkit/ssh_agent.0\n{ino}\n")
    );
    assert_eq!(sh(&k, "ssh:1", "cat /ssh2"), "\nskipped\n");
    assert_eq!(sh(&k, "ssh:1", "cat /clean"), "clean\n");
    let req = dockerfile("FROM busybox\nRUN --mount=type=ssh,required=true true\n");
    let err = build_fails(&k, req.path(), &[]);
    assert!(err.contains("--ssh default"), "{err}");
}

#[test]
fn run_network_modes_and_security_insecure() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = dockerfile(
        "FROM busybox\n\
         RUN --network=none sh -c 'ls /sys/class/net > /none'\n\
         RUN --network=host sh -c 'ls /sys/class/net > /host'\n\
         RUN --network=default sh -c 'ls /sys/class/net > /default'\n\
         RUN grep CapEff /proc/self/status > /caps\n",
    );
    // The host's network is the builder's to grant (as BuildKit's
    // network.host entitlement): refused without it, at the RUN's line,
    // even where the build's own default is the host's network — so a
    // build run with `--network none` stays there whatever its Dockerfile
    // says.
    for extra in [&[][..], &["--network", "none"][..]] {
        let err = build_fails(&k, ctx.path(), extra);
        assert!(
            err.contains("--allow network.host") && err.contains(":3"),
            "{err}"
        );
    }
    k.build(ctx.path(), &["-t", "n:1", "--allow", "network.host"]);
    assert_eq!(sh(&k, "n:1", "cat /none"), "lo\n");
    let host_ifaces = std::fs::read_dir("/sys/class/net").unwrap().count();
    let seen = sh(&k, "n:1", "cat /host");
    assert_eq!(seen.lines().count(), host_ifaces, "{seen}");
    assert_eq!(sh(&k, "n:1", "cat /default"), seen);
    assert_eq!(sh(&k, "n:1", "cat /caps"), "CapEff:\t00000000a80425fb\n");

    let ins =
        dockerfile("FROM busybox\nRUN --security=insecure grep CapEff /proc/self/status > /caps\n");
    let err = build_fails(&k, ins.path(), &[]);
    assert!(err.contains("--allow security.insecure"), "{err}");
    k.build(ins.path(), &["-t", "n:2", "--allow", "security.insecure"]);
    // Every capability kiln itself has.
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let bnd = own
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(sh(&k, "n:2", "cat /caps"), format!("CapEff:\t{bnd}\n"));
}

#[test]
fn copy_and_add_exclude_patterns() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\n\
             COPY --exclude=*.log --exclude=tmp/ src/ /app/\n\
             ADD --exclude=**/*.md --exclude=*.log src /add\n",
        ),
        ("src/a.txt", "a\n"),
        ("src/b.log", "b\n"),
        ("src/tmp/c.txt", "c\n"),
        ("src/doc/readme.md", "d\n"),
        ("src/doc/keep.txt", "k\n"),
    ]);
    k.build(ctx.path(), &["-t", "ex:1"]);
    assert_eq!(
        sh(&k, "ex:1", "cd /app && find . -type f | sort"),
        "./a.txt\n./doc/keep.txt\n./doc/readme.md\n"
    );
    assert_eq!(
        sh(&k, "ex:1", "cd /add && find . -type f | sort"),
        "./a.txt\n./doc/keep.txt\n./tmp/c.txt\n"
    );
    // Excluded files never affect the key.
    let id = k.build(ctx.path(), &[]);
    std::fs::write(ctx.path().join("src/b.log"), "changed\n").unwrap();
    std::fs::write(ctx.path().join("src/doc/readme.md"), "changed\n").unwrap();
    let id2 = k.build(ctx.path(), &[]);
    assert_ne!(id, id2, "readme.md is copied by COPY, so the image changes");
    std::fs::write(ctx.path().join("src/b.log"), "changed again\n").unwrap();
    assert_eq!(k.build(ctx.path(), &[]), id2);
}

#[test]
fn build_check_reports_lint_rules_with_lines_without_building() {
    // Needs no root: nothing is built.
    let k = Kiln::new();
    let ctx = dockerfile(
        "FROM --platform=linux/amd64 busybox as Build\nrun true\nCMD echo hi\nENV A b\n",
    );
    let out = k.ok(&["build", "--check", ctx.path().to_str().unwrap()]);
    assert!(
        out.contains("Check complete, 6 warnings have been found!"),
        "{out}"
    );
    for (rule, line) in [
        ("FromAsCasing", 1),
        ("StageNameCasing", 1),
        ("FromPlatformFlagConstDisallowed", 1),
        ("ConsistentInstructionCasing", 2),
        ("JSONArgsRecommended", 3),
        ("LegacyKeyValueFormat", 4),
    ] {
        let at = out
            .find(&format!("WARNING: {rule} - "))
            .unwrap_or_else(|| panic!("{rule} missing:\n{out}"));
        assert!(
            out[at..].contains(&format!("Dockerfile:{line}\n")),
            "{rule} line {line}:\n{out}"
        );
    }
    assert!(k.ok(&["images"]).lines().count() <= 1, "nothing was built");
    // # check=error=true fails; skip= silences.
    let strict =
        dockerfile("# check=error=true;skip=JSONArgsRecommended\nFROM busybox\nCMD sh\nENV A b\n");
    let o = k.run(&["build", "--check", strict.path().to_str().unwrap()]);
    assert!(!o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("LegacyKeyValueFormat") && !s.contains("JSONArgs"),
        "{s}"
    );
    let clean = dockerfile("FROM busybox AS a\nCMD [\"sh\"]\n");
    let out = k.ok(&["build", "--check", clean.path().to_str().unwrap()]);
    assert_eq!(out, "Check complete, no warnings found.\n");
}
