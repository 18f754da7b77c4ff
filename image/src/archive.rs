//! Image archives: `docker save` format (docker-archive) and the OCI image
//! layout, as tar streams or (OCI) a directory, plus a reader for both.
//!
//! Writers take images as raw manifests and fetch every blob through a
//! [`BlobSource`], streaming each one: no layer is ever held in memory.
//! Archive entries carry fixed metadata (mode 0644/0755, uid 0, mtime 0) so
//! the same images give the same archive bytes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compression::{self, Compression};
use crate::config::ImageConfig;
use crate::digest::{Hasher, HashingReader, HashingWriter};
use crate::manifest::{
    media_types, Descriptor, ImageIndex, ImageManifest, Platform, RawManifest,
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME,
};
use crate::tarw::{Kind, Meta, TarWriter};
use crate::{Digest, ImageError};

/// Where writers get blob bytes from (the content store, a registry, ...).
pub trait BlobSource {
    /// A reader over the blob's bytes.
    fn open_blob(&self, d: &Digest) -> io::Result<Box<dyn Read + '_>>;
    /// The blob's size in bytes.
    fn blob_size(&self, d: &Digest) -> io::Result<u64>;
    /// The size of the layer tar `diff_id`, when known from a tar that was
    /// checked against it (saves decompressing a layer only to size it).
    fn tar_size(&self, _diff_id: &Digest) -> Option<u64> {
        None
    }
}

/// Blobs held in memory (tests, tiny images).
#[derive(Clone, Debug, Default)]
pub struct MemoryBlobs(pub HashMap<Digest, Vec<u8>>);

impl MemoryBlobs {
    /// Store `bytes` and return their digest.
    pub fn put(&mut self, bytes: Vec<u8>) -> Digest {
        let d = Digest::sha256_of(&bytes);
        self.0.insert(d.clone(), bytes);
        d
    }
}

fn not_found(d: &Digest) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("blob {d} not found"))
}

impl BlobSource for MemoryBlobs {
    fn open_blob(&self, d: &Digest) -> io::Result<Box<dyn Read + '_>> {
        let b = self.0.get(d).ok_or_else(|| not_found(d))?;
        Ok(Box::new(&b[..]))
    }
    fn blob_size(&self, d: &Digest) -> io::Result<u64> {
        Ok(self.0.get(d).ok_or_else(|| not_found(d))?.len() as u64)
    }
}

/// One image to put into an archive.
#[derive(Clone, Debug)]
pub struct ArchiveImage {
    /// References (`app:1.0`, `docker.io/library/app:1.0`); may be empty.
    pub names: Vec<String>,
    /// The image manifest, as stored; or, in an OCI layout only, an image
    /// index (a multi-platform image) whose child manifests, configs and
    /// layers are all in the blob source.
    pub manifest: RawManifest,
}

fn arch_err(s: impl Into<String>) -> ImageError {
    ImageError::Archive(s.into())
}

fn file_meta(path: &str, size: u64) -> Meta {
    Meta {
        path: path.as_bytes().to_vec(),
        kind: Kind::Regular(size),
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        xattrs: Vec::new(),
    }
}

fn dir_meta(path: &str) -> Meta {
    Meta {
        kind: Kind::Dir,
        mode: 0o755,
        ..file_meta(path, 0)
    }
}

fn read_small(blobs: &dyn BlobSource, d: &Digest) -> Result<Vec<u8>, ImageError> {
    let mut v = Vec::new();
    let limit = crate::config::MAX_CONFIG_SIZE;
    let mut r = HashingReader::new(blobs.open_blob(d)?.take(limit + 1));
    r.read_to_end(&mut v)?;
    crate::config::check_config_size(v.len() as u64)?;
    let got = r.finish().1;
    if &got != d {
        return Err(ImageError::DigestMismatch {
            what: "blob".into(),
            expected: d.to_string(),
            actual: got.to_string(),
        });
    }
    Ok(v)
}

/// Copy a blob into the tar as `path`, verifying its digest and size.
fn put_blob<W: Write>(
    tar: &mut TarWriter<W>,
    path: &str,
    blobs: &dyn BlobSource,
    desc: &Descriptor,
) -> Result<(), ImageError> {
    let size = blobs.blob_size(&desc.digest)?;
    if size != desc.size {
        return Err(arch_err(format!(
            "blob {} is {size} bytes, its descriptor says {}",
            desc.digest, desc.size
        )));
    }
    let mut r = HashingReader::new(blobs.open_blob(&desc.digest)?);
    tar.append(&file_meta(path, size), Some(&mut r))?;
    let got = r.finish().1;
    if got != desc.digest {
        return Err(ImageError::DigestMismatch {
            what: path.to_string(),
            expected: desc.digest.to_string(),
            actual: got.to_string(),
        });
    }
    Ok(())
}

/// Split a reference into (repository, tag) with Docker's familiar form for
/// Docker Hub names; `None` for digest references.
fn repo_tag(name: &str) -> Option<(String, String)> {
    if name.contains('@') {
        return None;
    }
    let (repo, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], &name[i + 1..]),
        _ => (name, "latest"),
    };
    Some((
        crate::reference::familiar(repo).to_string(),
        tag.to_string(),
    ))
}

#[derive(Serialize, Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Write a `docker save` archive (manifest.json, repositories,
/// `<config hex>.json`, `<diffID hex>/layer.tar`) loadable by `docker load`
/// and `podman load`. Layers are stored uncompressed, as Docker does;
/// compressed blobs are decompressed twice while streaming (once to learn
/// the size the tar header needs, once to copy) rather than buffered.
pub fn write_docker_archive(
    out: impl Write,
    images: &[ArchiveImage],
    blobs: &dyn BlobSource,
) -> Result<(), ImageError> {
    let mut tar = TarWriter::new(out);
    let mut entries = Vec::new();
    let mut repos: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut done: HashSet<Digest> = HashSet::new();
    for img in images {
        if img.manifest.is_index() {
            return Err(arch_err(format!(
                "{}: docker exporter does not currently support exporting manifest lists (pick one platform)",
                img.manifest.digest
            )));
        }
        let m = img.manifest.manifest()?;
        let cfg_bytes = read_small(blobs, &m.config.digest)?;
        let cfg = ImageConfig::from_bytes(&cfg_bytes)?;
        if cfg.rootfs.diff_ids.len() != m.layers.len() {
            return Err(arch_err(format!(
                "config has {} diffIDs, manifest {} layers",
                cfg.rootfs.diff_ids.len(),
                m.layers.len()
            )));
        }
        let mut layer_paths = Vec::new();
        for (desc, diff_id) in m.layers.iter().zip(&cfg.rootfs.diff_ids) {
            let dir = diff_id.hex().to_string();
            let path = format!("{dir}/layer.tar");
            if done.insert(diff_id.clone()) {
                tar.append(&dir_meta(&dir), None)?;
                write_uncompressed_layer(&mut tar, &path, blobs, desc, diff_id)?;
            }
            layer_paths.push(path);
        }
        let cfg_name = format!("{}.json", m.config.digest.hex());
        if done.insert(m.config.digest.clone()) {
            let mut r: &[u8] = &cfg_bytes;
            tar.append(&file_meta(&cfg_name, cfg_bytes.len() as u64), Some(&mut r))?;
        }
        let mut tags = Vec::new();
        for n in &img.names {
            if let Some((repo, tag)) = repo_tag(n) {
                tags.push(format!("{repo}:{tag}"));
                if let Some(last) = layer_paths.last() {
                    let id = last.trim_end_matches("/layer.tar").to_string();
                    repos.entry(repo).or_default().insert(tag, id);
                }
            }
        }
        entries.push(DockerManifestEntry {
            config: cfg_name,
            repo_tags: if tags.is_empty() { None } else { Some(tags) },
            layers: layer_paths,
        });
    }
    let mj = serde_json::to_vec(&entries)?;
    tar.append(
        &file_meta("manifest.json", mj.len() as u64),
        Some(&mut &mj[..]),
    )?;
    if !repos.is_empty() {
        let rj = serde_json::to_vec(&repos)?;
        tar.append(
            &file_meta("repositories", rj.len() as u64),
            Some(&mut &rj[..]),
        )?;
    }
    tar.finish()?;
    Ok(())
}

fn layer_kind(desc: &Descriptor) -> Compression {
    let mt = desc.media_type.as_str();
    if mt.ends_with("gzip") {
        Compression::Gzip
    } else if mt.ends_with("zstd") {
        Compression::Zstd
    } else {
        Compression::Uncompressed
    }
}

fn open_decompressed<'a>(
    blobs: &'a dyn BlobSource,
    desc: &Descriptor,
) -> Result<Box<dyn Read + 'a>, ImageError> {
    let r = blobs.open_blob(&desc.digest)?;
    Ok(match layer_kind(desc) {
        Compression::Uncompressed => r,
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(r))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
    })
}

fn write_uncompressed_layer<W: Write>(
    tar: &mut TarWriter<W>,
    path: &str,
    blobs: &dyn BlobSource,
    desc: &Descriptor,
    diff_id: &Digest,
) -> Result<(), ImageError> {
    let check = |got: Digest| {
        if &got != diff_id {
            return Err(ImageError::DigestMismatch {
                what: format!("layer {} (diffID)", desc.digest),
                expected: diff_id.to_string(),
                actual: got.to_string(),
            });
        }
        Ok(())
    };
    let size = match (layer_kind(desc), blobs.tar_size(diff_id)) {
        (Compression::Uncompressed, _) => blobs.blob_size(&desc.digest)?,
        (_, Some(n)) => n,
        // Sized by decompressing it once, and checked then: a blob that
        // is not its diffID (a decompression bomb under a false one) is
        // refused before anything of it is written.
        _ => {
            let mut r = HashingReader::new(open_decompressed(blobs, desc)?);
            let n = io::copy(&mut r, &mut io::sink())?;
            check(r.finish().1)?;
            n
        }
    };
    let mut r = HashingReader::new(open_decompressed(blobs, desc)?);
    tar.append(&file_meta(path, size), Some(&mut r))?;
    check(r.finish().1)
}

/// The blobs of `images` in write order (config, layers; for an index,
/// each child manifest then its config and layers), deduplicated.
fn collect_blobs(
    images: &[ArchiveImage],
    blobs: &dyn BlobSource,
) -> Result<Vec<Descriptor>, ImageError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut push = |d: Descriptor, out: &mut Vec<Descriptor>| {
        if seen.insert(d.digest.clone()) {
            out.push(d);
        }
    };
    for img in images {
        let manifests = if img.manifest.is_index() {
            let idx = img.manifest.index()?;
            if idx.manifests.len() > crate::platform::MAX_INDEX_ENTRIES {
                return Err(arch_err(format!(
                    "index {} has {} entries; at most {} are written",
                    img.manifest.digest,
                    idx.manifests.len(),
                    crate::platform::MAX_INDEX_ENTRIES
                )));
            }
            let mut v = Vec::with_capacity(idx.manifests.len());
            for child in idx.manifests {
                if crate::manifest::media_types::is_index(&child.media_type) {
                    return Err(arch_err(format!(
                        "index {}: nested index {} is not written",
                        img.manifest.digest, child.digest
                    )));
                }
                let bytes = read_small(blobs, &child.digest)?;
                v.push(RawManifest::new(bytes, Some(&child.media_type))?.manifest()?);
                push(child, &mut out);
            }
            v
        } else {
            vec![img.manifest.manifest()?]
        };
        for m in manifests {
            for d in std::iter::once(m.config.clone()).chain(m.layers.iter().cloned()) {
                push(d, &mut out);
            }
        }
    }
    Ok(out)
}

fn index_for(images: &[ArchiveImage], blobs: &dyn BlobSource) -> Result<Vec<u8>, ImageError> {
    let mut manifests = Vec::new();
    for img in images {
        let mut desc = img.manifest.descriptor();
        // An index is listed as it is (its children carry the platforms).
        let config = match img.manifest.is_index() {
            true => None,
            false => Some(img.manifest.manifest()?.config.digest),
        };
        if let Some(Ok(cfg)) =
            config.map(|c| read_small(blobs, &c).and_then(|b| ImageConfig::from_bytes(&b)))
        {
            desc.platform = Some(Platform {
                architecture: cfg.architecture.clone(),
                os: cfg.os.clone(),
                variant: cfg.variant.clone(),
                ..Default::default()
            });
        }
        if img.names.is_empty() {
            manifests.push(desc.clone());
        }
        for n in &img.names {
            let mut d = desc.clone();
            let mut ann = BTreeMap::new();
            ann.insert(ANNOTATION_CONTAINERD_NAME.to_string(), n.clone());
            if let Some((_, tag)) = repo_tag(n) {
                ann.insert(ANNOTATION_REF_NAME.to_string(), tag);
            }
            d.annotations = Some(ann);
            manifests.push(d);
        }
    }
    ImageIndex::new(manifests).to_bytes()
}

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Write an OCI image layout as a tar stream (`oci-layout`, `blobs/sha256/…`,
/// `index.json` with `org.opencontainers.image.ref.name` (the tag) and
/// `io.containerd.image.name` (the full name) annotations, as BuildKit).
pub fn write_oci_archive(
    out: impl Write,
    images: &[ArchiveImage],
    blobs: &dyn BlobSource,
) -> Result<(), ImageError> {
    let mut tar = TarWriter::new(out);
    tar.append(
        &file_meta("oci-layout", OCI_LAYOUT.len() as u64),
        Some(&mut &OCI_LAYOUT[..]),
    )?;
    tar.append(&dir_meta("blobs"), None)?;
    tar.append(&dir_meta("blobs/sha256"), None)?;
    let mut written = HashSet::new();
    for img in images {
        if written.insert(img.manifest.digest.clone()) {
            let b = &img.manifest.bytes;
            let p = format!("blobs/sha256/{}", img.manifest.digest.hex());
            tar.append(&file_meta(&p, b.len() as u64), Some(&mut &b[..]))?;
        }
    }
    for d in collect_blobs(images, blobs)? {
        if written.insert(d.digest.clone()) {
            put_blob(
                &mut tar,
                &format!("blobs/sha256/{}", d.digest.hex()),
                blobs,
                &d,
            )?;
        }
    }
    let idx = index_for(images, blobs)?;
    tar.append(
        &file_meta("index.json", idx.len() as u64),
        Some(&mut &idx[..]),
    )?;
    tar.finish()?;
    Ok(())
}

/// Whether `hex` in `dir` is a regular file holding exactly the blob
/// `digest` names: a blob kept from an earlier export is read back, not
/// trusted by its name (a corrupt one is written again).
pub fn blob_intact(dir: &kiln_fs::Dir, hex: &str, digest: &Digest) -> bool {
    let Ok(f) = dir.open_file(hex) else {
        return false;
    };
    let mut r = HashingReader::new(f);
    io::copy(&mut r, &mut io::sink()).is_ok() && &r.finish().1 == digest
}

/// Writes `name` in `dir` from `r` (hashed on the way and checked against
/// `expect`) through a temp name in the same directory, then renames it
/// into place: every step is an `*at` call on one name below the open
/// directory, so nothing renamed or symlinked in `dir` meanwhile sends a
/// write elsewhere. `path` names the file in errors.
fn write_atomic(
    dir: &kiln_fs::Dir,
    name: &str,
    path: &Path,
    r: &mut dyn Read,
    expect: Option<&Digest>,
) -> Result<(), ImageError> {
    let fs_err = |e: kiln_fs::Error| {
        ImageError::path(e.op(), path, io::Error::new(e.kind(), e.io().to_string()))
    };
    let tmp = format!(".{name}.kiln-tmp-{}", std::process::id());
    let mut f = dir
        .create_file(&tmp, 0o666 & !kiln_fs::umask(), kiln_fs::Create::Replace)
        .map_err(fs_err)?;
    let written = (|| {
        let mut w = HashingWriter::new(&mut f);
        io::copy(r, &mut w).map_err(|e| ImageError::path("write", path, e))?;
        let (_, got, _) = w.finish();
        if let Some(d) = expect {
            if &got != d {
                return Err(ImageError::DigestMismatch {
                    what: path.display().to_string(),
                    expected: d.to_string(),
                    actual: got.to_string(),
                });
            }
        }
        f.sync_all()
            .map_err(|e| ImageError::path("fsync", path, e))?;
        dir.rename(&tmp, dir, name).map_err(fs_err)
    })();
    if written.is_err() {
        let _ = dir.remove(&tmp);
    }
    written
}

/// Write an OCI image layout into the directory `dir` (created if needed).
/// Blobs already present are kept; `index.json` is replaced. Every file is
/// written to a temp file, verified, fsynced and renamed into place.
pub fn write_oci_dir(
    dir: &Path,
    images: &[ArchiveImage],
    blobs: &dyn BlobSource,
) -> Result<(), ImageError> {
    let bdir = dir.join("blobs/sha256");
    fs::create_dir_all(dir).map_err(|e| ImageError::path("mkdir", dir, e))?;
    // What is in `dir` already may come from an earlier export of an
    // untrusted image: a symlink named `blobs` or `blobs/sha256` is an
    // error, never followed out of `dir`; every file is then written
    // below the directories opened here (see `write_atomic`).
    let fs_err = |e: kiln_fs::Error| {
        let msg = if e.raw_os_error() == Some(libc::ELOOP) {
            "a symlink, never followed out of the layout directory".to_string()
        } else {
            e.io().to_string()
        };
        ImageError::path(e.op(), e.path(), io::Error::new(e.kind(), msg))
    };
    let root = kiln_fs::Root::open(dir).map_err(fs_err)?;
    let blob_dir = root
        .mkdir_all("blobs/sha256", kiln_fs::Follow::Never, &Default::default())
        .map_err(fs_err)?;
    write_atomic(
        root.dir(),
        "oci-layout",
        &dir.join("oci-layout"),
        &mut &OCI_LAYOUT[..],
        None,
    )?;
    for img in images {
        let hex = img.manifest.digest.hex();
        if !blob_intact(&blob_dir, hex, &img.manifest.digest) {
            write_atomic(
                &blob_dir,
                hex,
                &bdir.join(hex),
                &mut &img.manifest.bytes[..],
                Some(&img.manifest.digest),
            )?;
        }
    }
    for d in collect_blobs(images, blobs)? {
        let hex = d.digest.hex();
        if !blob_intact(&blob_dir, hex, &d.digest) {
            let mut r = blobs.open_blob(&d.digest)?;
            write_atomic(&blob_dir, hex, &bdir.join(hex), &mut r, Some(&d.digest))?;
        }
    }
    let idx = index_for(images, blobs)?;
    write_atomic(
        root.dir(),
        "index.json",
        &dir.join("index.json"),
        &mut &idx[..],
        None,
    )
}

/// The most [`read_archive`] reads between two members of a tar: their
/// GNU long-name and PAX headers, which the tar crate holds in memory.
const MEMBER_META: u64 = 16 << 20;

/// A reader that fails once `left` bytes have been read (the caller sets
/// the budget; `u64::MAX` is none).
struct Budgeted<R> {
    inner: R,
    left: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left.get();
        if left == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a tar member's headers (long name, PAX records) exceed {} MiB",
                    MEMBER_META >> 20
                ),
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let got = self.inner.read(&mut buf[..want])?;
        self.left.set(left.saturating_sub(got as u64));
        Ok(got)
    }
}

/// Which kind of archive [`read_archive`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// `docker save` format.
    Docker,
    /// OCI image layout.
    Oci,
}

/// One image found in an archive.
#[derive(Clone, Debug)]
pub struct LoadedImage {
    /// Names it was saved under (`repo:tag`), possibly none.
    pub names: Vec<String>,
    /// The manifest: raw bytes from an OCI layout, synthesized (Docker
    /// schema2) for a docker-archive.
    pub manifest: RawManifest,
    /// The raw config bytes.
    pub config: Vec<u8>,
    /// Layer descriptors (as in the manifest), base first.
    pub layers: Vec<Descriptor>,
}

struct Spilled {
    path: PathBuf,
    digest: Digest,
    size: u64,
}

/// The content of an archive read by [`read_archive`]. Blobs live in a
/// temp directory that disappears with this value; it is a [`BlobSource`].
pub struct LoadedArchive {
    /// Which format it was.
    pub format: ArchiveFormat,
    /// The images, in archive order.
    pub images: Vec<LoadedImage>,
    blobs: HashMap<Digest, PathBuf>,
    _spill: tempfile::TempDir,
}

impl LoadedArchive {
    /// The spilled file holding blob `d` (on the filesystem of the
    /// `spill_dir` given to [`read_archive`]); its content was hashed as
    /// it was written and is `d`. Lets a store take the file as it is
    /// instead of copying it.
    pub fn blob_file(&self, d: &Digest) -> Option<&Path> {
        self.blobs.get(d).map(PathBuf::as_path)
    }

    /// Digests of every blob available.
    pub fn blob_digests(&self) -> Vec<Digest> {
        let mut v: Vec<_> = self.blobs.keys().cloned().collect();
        v.sort();
        v
    }
}

impl BlobSource for LoadedArchive {
    fn open_blob(&self, d: &Digest) -> io::Result<Box<dyn Read + '_>> {
        let p = self.blobs.get(d).ok_or_else(|| not_found(d))?;
        Ok(Box::new(File::open(p)?))
    }
    fn blob_size(&self, d: &Digest) -> io::Result<u64> {
        let p = self.blobs.get(d).ok_or_else(|| not_found(d))?;
        Ok(fs::metadata(p)?.len())
    }
}

fn norm(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    s.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// The most members an image archive may have (each is a file spilled to
/// disk and a name kept in memory; docker's archives have a few per
/// layer).
pub const MAX_MEMBERS: usize = 100_000;

/// The longest member name or link target (Linux's `PATH_MAX`): names are
/// kept in memory for the whole load.
pub const MAX_MEMBER_NAME: usize = 4096;

/// Images one archive may describe (`kiln load`).
pub const MAX_IMAGES: usize = 10_000;

/// Bytes of configs and manifests an archive's images may hold in all
/// while they are loaded (each config is read whole: one 8 MiB config
/// named by 100,000 entries would otherwise be held 100,000 times).
pub const MAX_HELD: usize = 256 << 20;

/// Layer entries an archive's images may list in all.
pub const MAX_LAYER_ENTRIES: usize = 1_000_000;

/// Counts what an archive's images hold against [`MAX_IMAGES`],
/// [`MAX_HELD`] and [`MAX_LAYER_ENTRIES`].
#[derive(Default)]
struct Held {
    images: usize,
    bytes: usize,
    layers: usize,
}

impl Held {
    fn add(&mut self, bytes: usize, layers: usize) -> Result<(), ImageError> {
        self.images += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        self.layers = self.layers.saturating_add(layers);
        if self.images > MAX_IMAGES {
            return Err(arch_err(format!(
                "more than {MAX_IMAGES} images in one archive"
            )));
        }
        if self.bytes > MAX_HELD {
            return Err(arch_err(format!(
                "the archive's images hold more than {} MiB of configs and manifests",
                MAX_HELD >> 20
            )));
        }
        if self.layers > MAX_LAYER_ENTRIES {
            return Err(arch_err(format!(
                "the archive's images list more than {MAX_LAYER_ENTRIES} layers"
            )));
        }
        Ok(())
    }
}

/// Read a docker-archive or OCI-layout tar (plain, gzip or zstd wrapped).
///
/// Every regular file is streamed into a temp directory created inside
/// `spill_dir` (put it on the store's filesystem so blobs can later be
/// renamed into place), hashing as it goes; archive metadata is then read
/// from there. Memory stays flat; disk use is the archive's size. OCI blobs
/// whose content does not match their name are rejected.
pub fn read_archive(r: impl Read + 'static, spill_dir: &Path) -> Result<LoadedArchive, ImageError> {
    let spill = tempfile::Builder::new()
        .prefix(".kiln-load-")
        .tempdir_in(spill_dir)
        .map_err(|e| ImageError::path("create temp dir in", spill_dir, e))?;
    let mut files: HashMap<String, Spilled> = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();
    // The tar crate reads a member's GNU long-name and PAX headers whole
    // into memory before it hands the member out: between two members
    // (those headers, and what is left of the member before, which the
    // loop below reads to its end for files) at most MEMBER_META bytes
    // are read, so a header that claims gigabytes is an error, not an
    // allocation.
    let budget = std::rc::Rc::new(std::cell::Cell::new(MEMBER_META));
    let mut ar = tar::Archive::new(Budgeted {
        inner: compression::decompress_auto(r)?,
        left: budget.clone(),
    });
    let mut entries = ar.entries()?;
    let mut n = 0usize;
    loop {
        budget.set(MEMBER_META);
        let Some(e) = entries.next() else { break };
        budget.set(u64::MAX);
        n += 1;
        let mut e = e?;
        if n > MAX_MEMBERS {
            return Err(ImageError::Archive(format!(
                "more than {MAX_MEMBERS} members: not an image archive"
            )));
        }
        let raw_name = e.path_bytes();
        let long_link = e
            .link_name_bytes()
            .is_some_and(|l| l.len() > MAX_MEMBER_NAME);
        if raw_name.len() > MAX_MEMBER_NAME || long_link {
            return Err(ImageError::Archive(format!(
                "member {n}: a name or link target over {MAX_MEMBER_NAME} bytes"
            )));
        }
        let name = norm(&raw_name);
        match e.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let path = spill.path().join(n.to_string());
                let mut f =
                    File::create(&path).map_err(|err| ImageError::path("create", &path, err))?;
                let mut w = HashingWriter::new(&mut f);
                io::copy(&mut e, &mut w)?;
                let (_, digest, size) = w.finish();
                files.insert(name, Spilled { path, digest, size });
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                if let Some(t) = e.link_name_bytes() {
                    let target = if e.header().entry_type() == tar::EntryType::Symlink {
                        let dir = name.rsplit_once('/').map(|x| x.0).unwrap_or("");
                        resolve_rel(dir, &String::from_utf8_lossy(&t))
                    } else {
                        norm(&t)
                    };
                    links.insert(name, target);
                }
            }
            _ => {}
        }
    }
    let lookup = |name: &str| -> Option<&Spilled> {
        let mut n = name.to_string();
        for _ in 0..16 {
            if let Some(s) = files.get(&n) {
                return Some(s);
            }
            n = links.get(&n)?.clone();
        }
        None
    };
    // Archive metadata, manifests and configs are read whole: bounded.
    let read = |s: &Spilled| -> Result<Vec<u8>, ImageError> {
        crate::config::check_config_size(s.size)?;
        fs::read(&s.path).map_err(|e| ImageError::path("read", &s.path, e))
    };
    let mut blobs = HashMap::new();
    let mut images = Vec::new();
    let mut held = Held::default();
    let format;
    if let Some(idx_file) = lookup("index.json") {
        format = ArchiveFormat::Oci;
        for (name, s) in &files {
            if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                let want: Digest = format!("sha256:{hex}").parse()?;
                if want != s.digest {
                    return Err(ImageError::DigestMismatch {
                        what: name.clone(),
                        expected: want.to_string(),
                        actual: s.digest.to_string(),
                    });
                }
                blobs.insert(s.digest.clone(), s.path.clone());
            }
        }
        let index: ImageIndex = serde_json::from_slice(&read(idx_file)?)?;
        let blob_bytes = |d: &Digest| -> Result<Vec<u8>, ImageError> {
            let p = blobs
                .get(d)
                .ok_or_else(|| arch_err(format!("blob {d} missing")))?;
            let len = fs::metadata(p)
                .map_err(|e| ImageError::path("stat", p, e))?
                .len();
            crate::config::check_config_size(len)?;
            fs::read(p).map_err(|e| ImageError::path("read", p, e))
        };
        // group index entries by manifest digest, gathering names
        let mut order: Vec<Descriptor> = Vec::new();
        let mut names: HashMap<Digest, Vec<String>> = HashMap::new();
        for d in &index.manifests {
            let ann = d.annotations.clone().unwrap_or_default();
            let name = ann
                .get(ANNOTATION_CONTAINERD_NAME)
                .cloned()
                .or_else(|| ann.get(ANNOTATION_REF_NAME).cloned());
            if !names.contains_key(&d.digest) {
                order.push(d.clone());
            }
            let e = names.entry(d.digest.clone()).or_default();
            if let Some(n) = name {
                e.push(n);
            }
        }
        for d in order {
            let mut raw = RawManifest::new(blob_bytes(&d.digest)?, Some(&d.media_type))?;
            if raw.is_index() {
                let sub = raw.index()?;
                let pick = sub
                    .select(&Platform::host())
                    .or(sub.manifests.first())
                    .ok_or_else(|| arch_err("empty nested index"))?
                    .clone();
                raw = RawManifest::new(blob_bytes(&pick.digest)?, Some(&pick.media_type))?;
            }
            let m = raw.manifest()?;
            let config = blob_bytes(&m.config.digest)?;
            held.add(config.len() + raw.bytes.len(), m.layers.len())?;
            images.push(LoadedImage {
                names: names.remove(&d.digest).unwrap_or_default(),
                manifest: raw,
                config,
                layers: m.layers,
            });
        }
    } else if let Some(mf) = lookup("manifest.json") {
        format = ArchiveFormat::Docker;
        let entries: Vec<DockerManifestEntry> = serde_json::from_slice(&read(mf)?)?;
        for ent in entries {
            let cfg = lookup(&norm(ent.config.as_bytes()))
                .ok_or_else(|| arch_err(format!("config {} missing", ent.config)))?;
            held.add(cfg.size as usize, ent.layers.len())?;
            let config = read(cfg)?;
            blobs.insert(cfg.digest.clone(), cfg.path.clone());
            let mut layers = Vec::new();
            for l in &ent.layers {
                let s = lookup(&norm(l.as_bytes()))
                    .ok_or_else(|| arch_err(format!("layer {l} missing")))?;
                let mut head = [0u8; 4];
                let n = File::open(&s.path)
                    .and_then(|mut f| f.read(&mut head))
                    .map_err(|e| ImageError::path("read", &s.path, e))?;
                let mt = match compression::sniff(&head[..n]) {
                    Compression::Uncompressed => media_types::DOCKER_LAYER,
                    Compression::Gzip => media_types::DOCKER_LAYER_GZIP,
                    Compression::Zstd => media_types::OCI_LAYER_ZSTD,
                };
                blobs.insert(s.digest.clone(), s.path.clone());
                layers.push(Descriptor::new(mt, s.digest.clone(), s.size));
            }
            let man = ImageManifest::new(
                Descriptor::new(media_types::DOCKER_CONFIG, cfg.digest.clone(), cfg.size),
                layers.clone(),
                false,
            );
            images.push(LoadedImage {
                names: ent.repo_tags.unwrap_or_default(),
                manifest: man.to_raw()?,
                config,
                layers,
            });
        }
    } else {
        return Err(arch_err(
            "neither index.json (OCI layout) nor manifest.json (docker-archive) found",
        ));
    }
    Ok(LoadedArchive {
        format,
        images,
        blobs,
        _spill: spill,
    })
}

/// A symlink's `target` read from the directory `dir` of the archive,
/// cleaned inside the archive's root ([`kiln_fs::path::components_in_root`]).
fn resolve_rel(dir: &str, target: &str) -> String {
    let joined = if target.starts_with('/') {
        target.to_string()
    } else {
        format!("{dir}/{target}")
    };
    kiln_fs::path::components_in_root(joined.as_bytes())
        .iter()
        .map(|c| String::from_utf8_lossy(c))
        .collect::<Vec<_>>()
        .join("/")
}

/// Hash a reader completely (helper for callers verifying blobs).
pub fn digest_reader(mut r: impl Read) -> io::Result<(Digest, u64)> {
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let len = h.len();
    Ok((h.finish(), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar whose first member has a GNU long-name header claiming
    /// `claimed` bytes (of zeros, streamed, never held here).
    fn long_name_bomb(claimed: u64) -> impl Read {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(claimed);
        h.as_gnu_mut().expect("gnu").name[..13].copy_from_slice(b"././@LongLink");
        h.set_cksum();
        io::Cursor::new(h.as_bytes().to_vec()).chain(io::repeat(0).take(claimed))
    }

    #[test]
    fn a_long_name_header_of_gigabytes_is_refused_not_read_into_memory() {
        let spill = tempfile::tempdir().expect("tmp");
        let t = std::time::Instant::now();
        let err = read_archive(long_name_bomb(4 << 30), spill.path())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("16 MiB"), "{err}");
        // Refused after the budget, not after reading 4 GiB.
        assert!(t.elapsed() < std::time::Duration::from_secs(20));
        // A long name of ordinary length still works.
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/index.json", "d".repeat(300));
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, &long, &b"{}"[..]).expect("append");
        let bytes = b.into_inner().expect("tar");
        let err = read_archive(io::Cursor::new(bytes), spill.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!err.contains("16 MiB"), "{err}");
    }

    /// Names are kept for the whole load: one over `PATH_MAX` is refused
    /// (16 MiB each, under the per-member header budget, were N × 16 MiB).
    #[test]
    fn a_member_name_over_path_max_is_refused() {
        let spill = tempfile::tempdir().expect("tmp");
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/x", "d".repeat(MAX_MEMBER_NAME));
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        b.append_data(&mut h, &long, &b""[..]).expect("append");
        let bytes = b.into_inner().expect("tar");
        let err = read_archive(io::Cursor::new(bytes), spill.path())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("4096 bytes"), "{err}");
    }

    /// One config named by many `manifest.json` entries is held once per
    /// entry: the images' total is bounded (before, 8 MiB × 300,000
    /// entries were read into memory).
    #[test]
    fn configs_held_by_many_entries_are_bounded() {
        let spill = tempfile::tempdir().expect("tmp");
        let archive = |config: &[u8], entries: usize| {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_size(config.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, "c.json", config).expect("append");
            let one = r#"{"Config":"c.json","RepoTags":null,"Layers":[]}"#;
            let mf = format!("[{}]", vec![one; entries].join(","));
            let mut h = tar::Header::new_gnu();
            h.set_size(mf.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, "manifest.json", mf.as_bytes())
                .expect("append");
            b.into_inner().expect("tar")
        };
        let big = vec![b' '; 1 << 20];
        let err = read_archive(io::Cursor::new(archive(&big, 300)), spill.path())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("256 MiB"), "{err}");
        let err = read_archive(
            io::Cursor::new(archive(b"{}", MAX_IMAGES + 1)),
            spill.path(),
        )
        .err()
        .expect("refused");
        assert!(err.to_string().contains("images in one archive"), "{err}");
    }

    /// A compressed layer that is not its diffID (a decompression bomb
    /// under a false one) is refused before any of it is written: it was
    /// decompressed once to size it, then again into the archive, checked
    /// only at the end.
    #[test]
    fn a_layer_that_is_not_its_diffid_is_refused_before_it_is_written() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::copy(&mut io::repeat(0).take(4 << 20), &mut gz).expect("gzip");
        let blob = gz.finish().expect("gzip");
        let mut blobs = MemoryBlobs::default();
        let size = blob.len() as u64;
        let d = blobs.put(blob);
        let desc = Descriptor::new(crate::manifest::media_types::OCI_LAYER_GZIP, d, size);
        let bogus = Digest::sha256_of(b"not this layer");
        let mut tar = TarWriter::new(Vec::new());
        let err = write_uncompressed_layer(&mut tar, "l/layer.tar", &blobs, &desc, &bogus)
            .expect_err("refused");
        assert!(err.to_string().contains("diffID"), "{err}");
        assert_eq!(tar.written(), 0, "the layer was written before the check");
    }

    #[test]
    fn repo_tags() {
        assert_eq!(repo_tag("app"), Some(("app".into(), "latest".into())));
        assert_eq!(
            repo_tag("docker.io/library/app:1.0"),
            Some(("app".into(), "1.0".into()))
        );
        assert_eq!(
            repo_tag("localhost:5000/x/y"),
            Some(("localhost:5000/x/y".into(), "latest".into()))
        );
        assert_eq!(
            repo_tag("localhost:5000/x:2"),
            Some(("localhost:5000/x".into(), "2".into()))
        );
        assert_eq!(repo_tag("a@sha256:00"), None);
    }

    #[test]
    fn resolve_symlinks() {
        assert_eq!(resolve_rel("abc", "../def/layer.tar"), "def/layer.tar");
        assert_eq!(resolve_rel("", "/x"), "x");
    }
}
