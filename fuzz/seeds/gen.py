#!/usr/bin/env python3
"""Regenerate the committed fuzz seeds (small, deterministic) into seeds/<target>/.

Run from fuzz/: python3 seeds/gen.py   (needs the `zstd` CLI for zstd seeds)
"""
import gzip, hashlib, io, json, os, subprocess, tarfile

HERE = os.path.dirname(os.path.abspath(__file__))


def out(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def tar(entries, fmt=tarfile.PAX_FORMAT):
    """entries: list of (TarInfo, bytes or None). Trailing padding trimmed to
    the two zero blocks, so seeds stay small."""
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=fmt) as t:
        for ti, data in entries:
            ti.mtime = 1700000000
            if data is not None:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
            else:
                t.addfile(ti)
        end = t.offset
    return b.getvalue()[:end] + b"\0" * 1024


def ti(name, kind=tarfile.REGTYPE, mode=0o644, link="", pax=None):
    t = tarfile.TarInfo(name)
    t.type = kind
    t.mode = mode
    t.linkname = link
    if pax:
        t.pax_headers = pax
    return t


def gz(b):
    return gzip.compress(b, mtime=0)


def zst(b):
    return subprocess.run(["zstd", "-q", "-c", "-19"], input=b, capture_output=True, check=True).stdout


# --- apply: layers --------------------------------------------------------
layer = tar([
    (ti("etc/", tarfile.DIRTYPE, 0o755), None),
    (ti("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n"),
    (ti("bin/sh", mode=0o4755, pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\n"}), b"#!\n"),
    (ti("bin/link", tarfile.LNKTYPE, link="bin/sh"), None),
    (ti("bin/sym", tarfile.SYMTYPE, link="../etc/passwd"), None),
    (ti("run/fifo", tarfile.FIFOTYPE), None),
    (ti("dev/null", tarfile.CHRTYPE, 0o666), None),
    (ti("usr/.wh..wh..opq"), b""),
    (ti("etc/.wh.shadow"), b""),
    (ti("a" * 120 + "/" + "b" * 120, pax={"user.x": "y"}), b"long"),
])
out("apply", "layer.tar", layer)
out("apply", "layer.tar.gz", gz(layer))
out("apply", "layer.tar.zst", zst(layer))
# writes through the symlinks the target plants (must stay confined)
escape = tar([
    (ti("up/evil"), b"x"),
    (ti("abs/evil"), b"x"),
    (ti("upfile"), b"x"),
    (ti("l", tarfile.SYMTYPE, link="/"), None),
    (ti("l/evil"), b"x"),
    (ti("h", tarfile.LNKTYPE, link="up/file"), None),
    (ti("up/.wh.file"), b""),
])
out("apply", "escape.tar", escape)
gnu = tar([(ti("g" * 150), b"gnu"), (ti("s" * 110, tarfile.SYMTYPE, link="t" * 120), None)], tarfile.GNU_FORMAT)
out("apply", "gnu.tar", gnu)

# --- archive: docker-archive and OCI layout --------------------------------
small_layer = tar([(ti("hello.txt"), b"hi\n")])
diff_id = "sha256:" + hashlib.sha256(small_layer).hexdigest()
config = json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    "history": [{"created_by": "COPY hello.txt /"}],
}, separators=(",", ":")).encode()
chex = hashlib.sha256(config).hexdigest()
lhex = diff_id[7:]
manifest = json.dumps([{"Config": chex + ".json", "RepoTags": ["app:latest"],
                        "Layers": [lhex + "/layer.tar"]}]).encode()
docker = tar([
    (ti(chex + ".json"), config),
    (ti(lhex + "/layer.tar"), small_layer),
    (ti("manifest.json"), manifest),
])
out("archive", "docker.tar", docker)
out("archive", "docker.tar.gz", gz(docker))

glayer = gz(small_layer)
ghex = hashlib.sha256(glayer).hexdigest()
oci_manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": "sha256:" + chex, "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": "sha256:" + ghex, "size": len(glayer)}],
}, separators=(",", ":")).encode()
mhex = hashlib.sha256(oci_manifest).hexdigest()
index = json.dumps({
    "schemaVersion": 2,
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": "sha256:" + mhex, "size": len(oci_manifest),
                   "annotations": {"org.opencontainers.image.ref.name": "latest"},
                   "platform": {"architecture": "amd64", "os": "linux"}}],
}, separators=(",", ":")).encode()
oci = tar([
    (ti("oci-layout"), b'{"imageLayoutVersion":"1.0.0"}'),
    (ti("index.json"), index),
    (ti("blobs/sha256/" + chex), config),
    (ti("blobs/sha256/" + ghex), glayer),
    (ti("blobs/sha256/" + mhex), oci_manifest),
])
out("archive", "oci.tar", oci)
out("archive", "oci.tar.zst", zst(oci))

# --- manifest: selector byte + JSON ----------------------------------------
out("manifest", "oci-manifest", b"\x00" + oci_manifest)
out("manifest", "index", b"\x03" + index)
out("manifest", "config", b"\x00" + config)
out("manifest", "docker-list", b"\x04" + json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
    "manifests": [{"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                   "digest": "sha256:" + mhex, "size": 7,
                   "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}}],
}).encode())

# --- dockerignore: ignore text \0 includes \0 paths ------------------------
out("dockerignore", "basic",
    b"# comment\n*.log\n!keep.log\n/build/**\n**/node_modules\n  ! tmp/[a-c]?.txt \n"
    b"\0src\n*.go\0a.log\nkeep.log\nbuild/x/y\nsrc/\nsrc/node_modules/z\ntmp/b1.txt\n")
# found by hand while fuzzing: minutes per name before MATCH_BUDGET
out("dockerignore", "costly", b"?{0,1000}" * 100 + b"x\n\0\0" + b"a" * 1000 + b"\n")
out("dockerignore", "escapes", b"\xef\xbb\xbf\\*\n[^a]\n[\\]]\n**\n!**/*.md\n\0\0x/y/z.md\nx/\n")
