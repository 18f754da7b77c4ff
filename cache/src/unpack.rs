//! Layer blobs into snapshots, verified: the one place where bytes from
//! an image become a snapshot named after a diffID.
//!
//! An image's config names each layer's diffID, and the snapshot is named
//! (and shared by every image) after the chain of those diffIDs; so the
//! bytes unpacked must be proved to be that layer before the snapshot is
//! committed, or an image could plant its files under another image's
//! layer. [`Store::unpack_layer`] streams the blob once: a thread reads the
//! stored file, hashes it (against the blob digest and size), decompresses
//! it and hashes the tar (against the diffID) while the applier writes the
//! files on this thread. Only when both digests match is the snapshot
//! committed; on a mismatch nothing is kept. A stored blob whose bytes no
//! longer match its digest is moved aside (under `tmp/`, reclaimed by
//! prune), so that loading or pulling the image again stores a good copy.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::path::Path;
use std::rc::Rc;

use kiln_image::compression::{decompress, sniff_reader, Compression};

use crate::content::BlobWriter;
use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::meta::LazyLayer;

/// The OCI chain ID of a layer with diffID `diff_id` on the chain
/// `parent` (the name of its snapshot).
fn chain_id(parent: Option<&str>, diff_id: &Digest) -> String {
    match parent {
        None => diff_id.to_string(),
        Some(p) => Digest::sha256_of(format!("{p} {diff_id}").as_bytes()).to_string(),
    }
}
use crate::snapshot::{apply_into, ApplyMode, Info};
use crate::store::Store;

/// The most layers an image's chain may have (a pull or a load of an
/// image with more is refused; Docker stops at about 128).
pub const MAX_CHAIN: usize = 4096;

/// Bytes one command may decompress in all to find the sizes of layers
/// not unpacked ([`Store::layer_size`]).
pub const SIZE_PROBE_BUDGET: u64 = 8 << 30;

/// One layer of an image, as its manifest and config name it.
#[derive(Debug, Clone, Copy)]
pub struct LayerBlob<'a> {
    /// The blob's digest (compressed or not) from the manifest.
    pub digest: &'a Digest,
    /// Its size from the manifest (`None`: not known, e.g. a layer this
    /// store built itself).
    pub size: Option<u64>,
    /// The diffID the image config names for it: the digest of the
    /// uncompressed tar.
    pub diff_id: &'a Digest,
}

/// Reads through to `inner`, hashing what passes into a shared hasher (so
/// the hash can be read back after a decompressor has swallowed the
/// reader).
struct HashInto<R> {
    inner: R,
    hasher: Rc<RefCell<Hasher>>,
}

impl<R: Read> Read for HashInto<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.borrow_mut().update(&buf[..n]);
        Ok(n)
    }
}

/// What the reading thread saw: the blob's digest and size, and the
/// uncompressed stream's digest and size.
struct Streamed {
    blob: (Digest, u64),
    tar: (Digest, u64),
}

/// Reads `src` (the blob), hashes it, decompresses it, hashes the tar and
/// writes the tar to `out` (and to `tee`, when given), to its end.
fn stream_layer(
    src: Box<dyn Read + Send>,
    out: &mut dyn Write,
    mut tee: Option<&mut BlobWriter>,
) -> io::Result<Streamed> {
    let blob_hash = Rc::new(RefCell::new(Hasher::new()));
    let hashed = HashInto {
        inner: src,
        hasher: blob_hash.clone(),
    };
    let (kind, sniffed) = sniff_reader(hashed)?;
    let tar_hash = (kind != Compression::Uncompressed).then(Hasher::new);
    let mut tar = decompress(sniffed, kind)?;
    let mut tar_hash = tar_hash;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match tar.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(h) = tar_hash.as_mut() {
            h.update(&buf[..n]);
        }
        out.write_all(&buf[..n])?;
        if let Some(t) = tee.as_mut() {
            t.write_all(&buf[..n])?;
        }
    }
    out.flush()?;
    drop(tar);
    let blob_hasher = Rc::try_unwrap(blob_hash)
        .map(RefCell::into_inner)
        .map_err(|_| io::Error::other("blob hasher still shared"))?;
    let blob_len = blob_hasher.len();
    let blob = (blob_hasher.finish(), blob_len);
    let tar = match tar_hash {
        Some(h) => {
            let len = h.len();
            (h.finish(), len)
        }
        // An uncompressed blob is its own tar.
        None => blob.clone(),
    };
    Ok(Streamed { blob, tar })
}

impl Store {
    /// Unpacks `layer` as the committed snapshot `name` over `parent`
    /// (see the module doc), verifying the blob against its digest and
    /// size and the tar against the diffID before anything is committed.
    /// A snapshot `name` that exists already is returned as it is (it was
    /// verified when it was made): a cached rebuild hashes nothing.
    ///
    /// Errors: [`Error::CorruptBlob`] when the stored blob no longer
    /// matches its digest (it is moved aside, so that loading or pulling
    /// the image again repairs the store); [`Error::DiffIdMismatch`]
    /// when the content is not the layer the config names.
    pub fn unpack_layer(
        &self,
        name: &str,
        parent: Option<&str>,
        layer: LayerBlob<'_>,
    ) -> Result<Info> {
        apply_into(self.snapshotter(), name, parent, |dir, mode| {
            self.unpack_verified(layer, dir, mode, None).map(|(d, _)| d)
        })
    }

    /// Whether the committed snapshot `name` exists.
    fn committed(&self, name: &str) -> bool {
        self.snapshotter()
            .stat(name)
            .is_ok_and(|i| i.kind == crate::Kind::Committed)
    }

    /// Whether the lazy layer `l` may be used: its name is the chain ID of
    /// its parent and diffID, and (with `need_blob`) its blob is stored.
    fn lazy_usable(&self, l: &LazyLayer, need_blob: bool) -> bool {
        chain_id(l.parent.as_deref(), &l.diff_id) == l.snapshot
            && (!need_blob
                || self.content().size(&l.blob).is_ok()
                || self.remote_blob(&l.blob).is_ok_and(|r| r.is_some()))
    }

    /// The candidates for each lazy layer (see [`crate::LazyLayer`]) of
    /// `snapshot`'s chain not yet unpacked, top first, down to a committed
    /// snapshot or the bottom. `None` when a layer of the chain is neither
    /// committed nor has a candidate: a lazy layer whose name is the chain
    /// ID of its parent and diffID (a row naming a snapshot it cannot be
    /// is never used) and, with `need_blobs`, whose blob is stored.
    fn lazy_chain(&self, snapshot: &str, need_blobs: bool) -> Result<Option<Vec<Vec<LazyLayer>>>> {
        // A chain longer than any image may have is a loop in the rows.
        let mut chain = Vec::new();
        let mut cur = Some(snapshot.to_string());
        while let Some(name) = cur {
            if self.committed(&name) {
                break;
            }
            let found: Vec<LazyLayer> = self
                .meta()
                .lazy_layers(&name)?
                .into_iter()
                .filter(|l| self.lazy_usable(l, need_blobs))
                .collect();
            let Some(first) = found.first() else {
                return Ok(None);
            };
            if chain.len() >= MAX_CHAIN {
                return Ok(None);
            }
            cur = first.parent.clone();
            chain.push(found);
        }
        Ok(Some(chain))
    }

    /// [`Store::lazy_ready`] for the one candidate of `snapshot` whose
    /// blob is `blob`: what a step taken from an import is described by
    /// (another candidate, recorded by another build, may claim the same
    /// snapshot with other bytes).
    pub fn lazy_ready_with(&self, snapshot: &str, blob: &Digest) -> Result<Option<LazyLayer>> {
        self.lazy_candidate(snapshot, Some(blob))
    }

    /// The lazy layer `snapshot` (its first usable candidate: a blob
    /// stored) when it can be had: it is unpacked already, or it and every
    /// ancestor not yet unpacked have such a candidate.
    pub fn lazy_ready(&self, snapshot: &str) -> Result<Option<LazyLayer>> {
        self.lazy_candidate(snapshot, None)
    }

    /// The first usable candidate of `snapshot` (whose blob is `blob`,
    /// when given), if `snapshot` is unpacked or every ancestor not yet
    /// unpacked has a usable candidate.
    fn lazy_candidate(&self, snapshot: &str, blob: Option<&Digest>) -> Result<Option<LazyLayer>> {
        let top = if self.committed(snapshot) {
            self.meta().lazy_layers(snapshot)?
        } else {
            match self.lazy_chain(snapshot, true)? {
                Some(c) => c.into_iter().next().unwrap_or_default(),
                None => return Ok(None),
            }
        };
        Ok(top
            .into_iter()
            .find(|l| blob.is_none_or(|b| &l.blob == b) && self.lazy_usable(l, true)))
    }

    /// Makes the snapshot `snapshot` from its lazy layer, its lazy
    /// ancestors first, each unpacked as [`Store::unpack_layer`] does
    /// (the blob verified against its digest and size, the tar against
    /// the diffID, before the snapshot is committed). A candidate whose
    /// blob fails that (or is gone) is dropped and the next tried.
    /// Returns whether there was anything to do: `false` when `snapshot`
    /// is committed already or is not a lazy layer.
    pub fn unpack_lazy(&self, snapshot: &str) -> Result<bool> {
        let Some(chain) = self.lazy_chain(snapshot, false)? else {
            return Ok(false);
        };
        for candidates in chain.iter().rev() {
            let mut last = None;
            for l in candidates {
                let r = self.unpack_layer(
                    &l.snapshot,
                    l.parent.as_deref(),
                    LayerBlob {
                        digest: &l.blob,
                        size: Some(l.size),
                        diff_id: &l.diff_id,
                    },
                );
                match r {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(
                        e @ (Error::DiffIdMismatch { .. }
                        | Error::CorruptBlob { .. }
                        | Error::WrongSize { .. }
                        | Error::NotFound { .. }),
                    ) => {
                        let _ = self.meta().drop_lazy_layer(&l.snapshot, &l.blob);
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some(e) = last {
                return Err(e);
            }
        }
        Ok(!chain.is_empty())
    }

    /// Records `layer` as the lazy layer `name` over `parent` (see
    /// [`crate::LazyLayer`]): its snapshot is made when first used. The
    /// blob is verified now as [`Store::unpack_layer`] would — its digest
    /// and size, and the digest of the tar it decompresses to against the
    /// diffID — in one streaming pass that writes no file. Nothing is done
    /// when the snapshot exists or a usable lazy layer of the same blob was
    /// recorded (it was verified then).
    ///
    /// Errors: those of [`Store::unpack_layer`] for a blob that is not the
    /// layer (nothing is recorded).
    pub fn keep_layer_lazy(
        &self,
        name: &str,
        parent: Option<&str>,
        layer: LayerBlob<'_>,
        media_type: &str,
    ) -> Result<()> {
        if self.committed(name) {
            return Ok(());
        }
        let recorded = self.meta().lazy_layers(name)?;
        if recorded
            .iter()
            .any(|l| &l.blob == layer.digest && self.lazy_usable(l, true))
        {
            return Ok(());
        }
        let file = match self.open_file_fetching(layer.digest) {
            Ok(f) => f,
            // Not a stored file (a layer kept as the snapshot it is made
            // again from): unpacked now, as before.
            Err(Error::NotFound { .. }) => {
                return self.unpack_layer(name, parent, layer).map(|_| ());
            }
            Err(e) => return Err(e),
        };
        let blob_size = self.check_stored(file, layer)?;
        self.record_lazy(name, parent, layer, media_type, blob_size)
    }

    /// Records the proved `layer` (a blob of `size` bytes) as the lazy
    /// layer `name` over `parent`.
    fn record_lazy(
        &self,
        name: &str,
        parent: Option<&str>,
        layer: LayerBlob<'_>,
        media_type: &str,
        size: u64,
    ) -> Result<()> {
        self.meta().put_lazy_layer(&LazyLayer {
            snapshot: name.to_string(),
            parent: parent.map(str::to_string),
            blob: layer.digest.clone(),
            media_type: media_type.to_string(),
            size,
            diff_id: layer.diff_id.clone(),
        })
    }

    /// [`Store::keep_layer_lazy`] that trusts nothing recorded: the blob
    /// itself is proved to be `layer` (one streaming pass that writes
    /// nothing) even when snapshot `name` exists or a lazy layer (a cache
    /// import's claim) names the blob — for a name about to move onto an
    /// image, whose manifest will name this blob for that diffID. A blob
    /// that is its own tar (its digest is the diffID) was proved when it
    /// was stored.
    pub fn prove_layer(
        &self,
        name: &str,
        parent: Option<&str>,
        layer: LayerBlob<'_>,
        media_type: &str,
    ) -> Result<()> {
        let blob_size = match self.content().size(layer.digest) {
            // Its own tar, stored (verified against its digest then).
            Ok(n) if layer.digest == layer.diff_id => n,
            // Its own tar kept as a snapshot's diff (a layer this store
            // built: read back checked against its digest): proved.
            _ if layer.digest == layer.diff_id && self.has_blob(layer.digest) => return Ok(()),
            _ => self.prove_blob(layer)?,
        };
        if layer.size.is_some_and(|s| s != blob_size) {
            return Err(Error::WrongSize {
                digest: layer.digest.to_string(),
                claimed: layer.size.unwrap_or(blob_size),
                actual: blob_size,
            });
        }
        if self.committed(name) {
            return Ok(());
        }
        self.record_lazy(name, parent, layer, media_type, blob_size)
    }

    /// Proves the blob `layer.digest` (fetched first if it is kept in a
    /// registry) to be `layer`: its digest and size, the tar it
    /// decompresses to against the diffID, in one pass that writes
    /// nothing. Returns the blob's size.
    pub fn prove_blob(&self, layer: LayerBlob<'_>) -> Result<u64> {
        let file = self.open_file_fetching(layer.digest)?;
        self.check_stored(file, layer)
    }

    /// Checks that the stored blob `file` is `layer` — its digest and
    /// size, and the digest of the tar it decompresses to against the
    /// diffID — in one streaming pass that writes nothing (as
    /// [`Store::unpack_layer`] would check it). Returns the blob's size.
    fn check_stored(&self, file: std::fs::File, layer: LayerBlob<'_>) -> Result<u64> {
        let keep = file.try_clone().ok();
        let src: Box<dyn Read + Send> = Box::new(io::BufReader::with_capacity(256 * 1024, file));
        let streamed = stream_layer(src, &mut io::sink(), None);
        let size = streamed.as_ref().map(|st| st.blob.1).unwrap_or(0);
        self.check_streamed(layer, keep.as_ref(), streamed, Ok(()))?;
        Ok(size)
    }

    /// A stored blob in one of `media_types` proved to be the layer
    /// `diff_id`, among those lazy layers claim (a remote cache's records
    /// claim them: a claim is checked here — the blob against its digest
    /// and size, the tar it decompresses to against `diff_id`, in one
    /// streaming pass that writes nothing — before anyone relies on it; a
    /// claim that fails is forgotten). `None` when no claim holds.
    pub fn verified_lazy_blob(
        &self,
        diff_id: &Digest,
        media_types: &[&str],
    ) -> Result<Option<(Digest, u64)>> {
        for l in self.meta().lazy_layers_of_diff(diff_id, media_types)? {
            let file = match self.open_file_fetching(&l.blob) {
                Ok(f) => f,
                // Gone, or kept in a registry that cannot be reached now:
                // the caller makes the blob itself.
                Err(Error::NotFound { .. } | Error::Fetch { .. }) => continue,
                Err(e) => return Err(e),
            };
            let layer = LayerBlob {
                digest: &l.blob,
                size: Some(l.size),
                diff_id,
            };
            match self.check_stored(file, layer) {
                Ok(_) => return Ok(Some((l.blob.clone(), l.size))),
                Err(
                    Error::DiffIdMismatch { .. }
                    | Error::CorruptBlob { .. }
                    | Error::WrongSize { .. },
                ) => {
                    let _ = self.meta().drop_lazy_layer(&l.snapshot, &l.blob);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Stores the uncompressed tar of the layer `diff_id` (the blob
    /// `diff_id`) from the compressed blob a lazy layer of that diffID
    /// names (fetched first if it is kept in a registry), the tar proved
    /// to be `diff_id` before it is committed. For an export of a build
    /// whose steps came from an imported cache: their layers were kept
    /// compressed, never unpacked. Returns whether a tar was stored: `false`
    /// when no lazy layer's blob can be had or makes the diffID (a claim
    /// that fails is forgotten).
    pub fn keep_lazy_tar(&self, diff_id: &Digest) -> Result<bool> {
        use kiln_image::manifest::media_types as mt;
        let compressed = [
            mt::OCI_LAYER_GZIP,
            mt::DOCKER_LAYER_GZIP,
            mt::OCI_LAYER_ZSTD,
        ];
        for l in self.meta().lazy_layers_of_diff(diff_id, &compressed)? {
            let file = match self.open_file_fetching(&l.blob) {
                Ok(f) => f,
                Err(Error::NotFound { .. } | Error::Fetch { .. }) => continue,
                Err(e) => return Err(e),
            };
            // Bytes that do not decompress are a claim that fails; a
            // full disk is the store's error.
            let mut w = self.content().writer()?;
            let copied = sniff_reader(io::BufReader::with_capacity(256 * 1024, file))
                .and_then(|(kind, r)| decompress(r, kind))
                .and_then(|mut tar| io::copy(&mut tar, &mut w));
            match copied {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    return Err(crate::error::io_err("writing", self.root(), e));
                }
                Err(_) => {
                    let _ = self.meta().drop_lazy_layer(&l.snapshot, &l.blob);
                    continue;
                }
            }
            match self.commit_blob(
                w,
                Some(diff_id),
                None,
                Some(kiln_image::manifest::media_types::OCI_LAYER),
            ) {
                Ok(_) => return Ok(true),
                Err(Error::DigestMismatch { .. }) => {
                    let _ = self.meta().drop_lazy_layer(&l.snapshot, &l.blob);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// [`Store::unpack_layer`] of a compressed blob that also keeps the
    /// layer's uncompressed tar, as the blob `layer.diff_id`: the thread
    /// that decompresses the blob writes the tar while the files are
    /// applied, and the tar is committed once its digest is proved to be
    /// the diffID — one decompression and one hash of the tar instead of
    /// a decompression into the store followed by an unpack that reads,
    /// hashes and applies the tar again. Returns whether the tar was kept:
    /// `false` when the snapshot existed already (nothing is unpacked) or
    /// the blob is not compressed (it is the tar).
    pub fn unpack_layer_keeping_tar(
        &self,
        name: &str,
        parent: Option<&str>,
        layer: LayerBlob<'_>,
    ) -> Result<bool> {
        if layer.digest == layer.diff_id {
            self.unpack_layer(name, parent, layer)?;
            return Ok(false);
        }
        let mut tar = self.content().writer_prehashed()?;
        let mut tar_len = None;
        apply_into(self.snapshotter(), name, parent, |dir, mode| {
            let (d, n) = self.unpack_verified(layer, dir, mode, Some(&mut tar))?;
            tar_len = Some(n);
            Ok(d)
        })?;
        let Some(n) = tar_len else {
            return Ok(false);
        };
        self.commit_blob(
            tar,
            Some(layer.diff_id),
            Some(n),
            Some(kiln_image::manifest::media_types::OCI_LAYER),
        )?;
        Ok(true)
    }

    /// Applies `layer` onto `dir`, verified; returns the tar's digest and
    /// size. `tee` gets a copy of the tar (see
    /// [`Store::unpack_layer_keeping_tar`]).
    fn unpack_verified(
        &self,
        layer: LayerBlob<'_>,
        dir: &Path,
        mode: ApplyMode,
        tee: Option<&mut BlobWriter>,
    ) -> Result<(Digest, u64)> {
        // A stored file: kept open so that a corrupt one can be moved
        // aside (the very file that was read, not a repaired copy).
        let (src, file): (Box<dyn Read + Send>, Option<std::fs::File>) =
            match self.open_file_fetching(layer.digest) {
                Ok(f) => {
                    let keep = f.try_clone().ok();
                    (Box::new(io::BufReader::with_capacity(256 * 1024, f)), keep)
                }
                Err(Error::NotFound { .. }) => (self.open_blob(layer.digest)?, None),
                Err(e) => return Err(e),
            };
        let wmode = match mode {
            ApplyMode::Overlay => kiln_image::apply::WhiteoutMode::Overlay,
            ApplyMode::Delete => kiln_image::apply::WhiteoutMode::Delete,
        };
        let (mut w, mut r) = crate::chunkpipe::chunk_pipe();
        let (streamed, applied) = std::thread::scope(|s| {
            let reader = s.spawn(move || {
                let res = stream_layer(src, &mut w, tee);
                drop(w);
                res
            });
            let opts = kiln_image::apply::ApplyOptions {
                overlay_xattrs: kiln_fs::idmap::IdMaps::current().overlay_xattrs(),
                ..Default::default()
            };
            let applied =
                kiln_image::apply::apply_layer_with(&mut r, dir, wmode, &opts).and_then(|_| {
                    // What follows the tar's end marker is part of the
                    // layer's bytes too (and its diffID).
                    io::copy(&mut r, &mut io::sink())
                        .map(|_| ())
                        .map_err(kiln_image::ImageError::from)
                });
            // A failed apply stops reading: the thread's next write fails.
            drop(r);
            let streamed = reader
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("layer reader panicked")));
            (streamed, applied)
        });
        self.check_streamed(
            layer,
            file.as_ref(),
            streamed,
            applied.map_err(|e| Error::Image(e.to_string())),
        )
    }

    /// What [`stream_layer`] saw of `layer`, checked: the blob against its
    /// digest and size (a stored `file` that no longer matches is moved
    /// aside, as `corrupt` does), then `applied` (what was done with
    /// the tar), then the tar against the diffID, whose size is recorded.
    /// Returns the tar's digest and size.
    fn check_streamed(
        &self,
        layer: LayerBlob<'_>,
        file: Option<&std::fs::File>,
        streamed: io::Result<Streamed>,
        applied: Result<()>,
    ) -> Result<(Digest, u64)> {
        let blob_ok =
            |got: &(Digest, u64)| &got.0 == layer.digest && layer.size.is_none_or(|s| s == got.1);
        match streamed {
            Ok(st) if !blob_ok(&st.blob) => Err(self.corrupt(layer, file, Some(st.blob))),
            Ok(st) => {
                applied?;
                if &st.tar.0 != layer.diff_id {
                    return Err(Error::DiffIdMismatch {
                        blob: layer.digest.to_string(),
                        expected: layer.diff_id.to_string(),
                        actual: st.tar.0.to_string(),
                    });
                }
                // The uncompressed size, for `images`/`inspect`/`history`.
                // A memo of a value [`Store::layer_size`] can derive again:
                // a failure to record it does not fail the unpack.
                let _ = self.meta().put_diff_size(layer.diff_id, st.tar.1);
                Ok(st.tar)
            }
            Err(e) => {
                // The blob could not be read or decompressed to its end:
                // corrupt in the store, or bad from the start.
                if let Some(f) = file {
                    if let Ok(got) = hash_file(f) {
                        if !blob_ok(&got) {
                            return Err(self.corrupt(layer, Some(f), Some(got)));
                        }
                    }
                }
                // A failed apply stops the reader (a broken pipe): then
                // the apply's error is the one to tell.
                applied?;
                Err(Error::Image(format!("reading layer {}: {e}", layer.digest)))
            }
        }
    }

    /// One layer of an image's series applied over `dir`, which may hold
    /// files of its own (a `type=local` export's destination): whiteouts
    /// remove only what the series wrote (see
    /// [`kiln_image::apply::Merge`]). The tar is proved to be
    /// `layer.diff_id` before the apply returns: its size is known once a
    /// blob was proved to be that diffID (else the blob is checked first,
    /// in a pass that writes nothing), the apply reads no more than that,
    /// and the tar's digest is compared at its end — a blob that is not
    /// its layer (a pulled image whose config names other content, a
    /// decompression bomb) fails the export instead of being written out.
    pub fn apply_blob_merging(
        &self,
        layer: LayerBlob<'_>,
        dir: &Path,
        opts: &kiln_image::apply::ApplyOptions,
        merge: &mut kiln_image::apply::Merge,
    ) -> Result<kiln_image::apply::ApplyStats> {
        let digest = layer.digest;
        if digest == layer.diff_id {
            let (r, checked) = self.open_blob_checked(digest)?;
            if checked {
                // Written again from the snapshot it was built as, and
                // checked against its digest (the diffID) as it is read.
                return kiln_image::apply::apply_layer_merging(r, dir, opts, merge)
                    .map_err(|e| Error::Image(format!("layer {digest}: {e}")));
            }
        }
        let size = match self.meta().diff_size(layer.diff_id)? {
            Some(n) => n,
            None => {
                let file = self.open_file_fetching(digest)?;
                self.check_stored(
                    file,
                    LayerBlob {
                        size: None,
                        ..layer
                    },
                )?;
                self.meta().diff_size(layer.diff_id)?.ok_or_else(|| {
                    Error::Image(format!("layer {digest}: its size was not recorded"))
                })?
            }
        };
        let r = kiln_image::compression::decompress_auto(self.open_blob(digest)?)
            .map_err(|e| Error::Image(format!("layer {digest}: {e}")))?;
        // One byte more than the layer's tar: a longer stream is caught.
        let mut hashed = kiln_image::HashingReader::new(r.take(size + 1));
        let stats = kiln_image::apply::apply_layer_merging(&mut hashed, dir, opts, merge)
            .map_err(|e| Error::Image(format!("layer {digest}: {e}")))?;
        // The tar's end (padding the applier does not read) counts too.
        io::copy(&mut hashed, &mut io::sink())
            .map_err(|e| Error::Image(format!("layer {digest}: {e}")))?;
        let (_, got, n) = hashed.finish();
        if n != size || got.as_str() != layer.diff_id.as_str() {
            return Err(Error::DiffIdMismatch {
                blob: digest.to_string(),
                expected: layer.diff_id.to_string(),
                actual: if n > size {
                    format!("more than {size} bytes")
                } else {
                    got.to_string()
                },
            });
        }
        Ok(stats)
    }

    /// The size of `layer`'s uncompressed tar, as docker reports layer and
    /// image sizes: recorded when the layer was unpacked or built; else
    /// the blob's own size when the blob is the tar (its digest is the
    /// diffID) or the tar is stored too; else found by decompressing the
    /// stored blob once (checked against the diffID, then recorded — a
    /// store from before sizes were recorded); else, when the blob is
    /// not here, the blob's size from the manifest (the best there is).
    pub fn layer_size(&self, layer: LayerBlob<'_>) -> Result<u64> {
        use std::io::Read as _;
        if let Some(n) = self.meta().diff_size(layer.diff_id)? {
            return Ok(n);
        }
        let blob_size = layer.size.unwrap_or(0);
        if layer.digest == layer.diff_id {
            return match layer.size {
                Some(n) => Ok(n),
                None => self.blob_size(layer.digest),
            };
        }
        if let Ok(n) = self.blob_size(layer.diff_id) {
            return Ok(n);
        }
        // What one command may decompress to find sizes, in all: a layer
        // whose blob is a decompression bomb under a diffID it is not
        // (nothing recorded, so every listing would count it again, once
        // per entry naming it) costs a bounded amount, then the
        // manifest's size is shown.
        use std::sync::atomic::{AtomicU64, Ordering};
        static PROBE_BUDGET: AtomicU64 = AtomicU64::new(SIZE_PROBE_BUDGET);
        let left = PROBE_BUDGET.load(Ordering::Relaxed);
        if left == 0 {
            return Ok(blob_size);
        }
        let counted = self.open_blob(layer.digest).and_then(|r| {
            let (kind, r) = sniff_reader(r).map_err(|e| Error::Image(e.to_string()))?;
            let r = decompress(r, kind).map_err(|e| Error::Image(e.to_string()))?;
            kiln_image::archive::digest_reader(r.take(left))
                .map_err(|e| Error::Image(e.to_string()))
        });
        if let Ok((_, n)) = &counted {
            let _ = PROBE_BUDGET.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(*n))
            });
        }
        match counted {
            Ok((d, n)) if &d == layer.diff_id => {
                self.meta().put_diff_size(layer.diff_id, n)?;
                Ok(n)
            }
            // Not here, unreadable, or not the layer the config names
            // (`kiln verify` tells which): the manifest's size.
            _ => Ok(blob_size),
        }
    }

    /// Layer snapshots (named `sha256:…`, with a diffID) whose name is not
    /// the OCI chain ID of their parent and diffID.
    pub(crate) fn check_layer_names(&self, problems: &mut Vec<String>) -> Result<()> {
        for s in self.meta().snapshots()? {
            let (Some(diff), true) = (&s.diff_id, s.key.starts_with("sha256:")) else {
                continue;
            };
            if s.kind != crate::meta::Kind::Committed {
                continue;
            }
            let want = match &s.parent {
                None => diff.clone(),
                Some(p) => Digest::sha256_of(format!("{p} {diff}").as_bytes()).to_string(),
            };
            if want != s.key {
                problems.push(format!(
                    "snapshot {}: recorded diffID {diff} on parent {} makes chain ID {want}",
                    s.key,
                    s.parent.as_deref().unwrap_or("(none)")
                ));
            }
        }
        Ok(())
    }

    /// Decompresses and hashes every stored image's layer blobs against
    /// the diffIDs their configs name; returns how many layers were.
    pub(crate) fn check_image_layers(&self, problems: &mut Vec<String>) -> Result<usize> {
        use kiln_image::config::ImageConfig;
        use kiln_image::manifest::RawManifest;
        let mut seen = std::collections::HashSet::new();
        let mut n = 0;
        for img in self.meta().images()? {
            // An image, or every stored platform's image of an index.
            let parts = (|| -> std::result::Result<Vec<_>, String> {
                let md: Digest = img.manifest.parse().map_err(|e| format!("{e}"))?;
                let raw =
                    RawManifest::new(self.content().read(&md).map_err(|e| e.to_string())?, None)
                        .map_err(|e| e.to_string())?;
                let manifests = if raw.is_index() {
                    let idx = raw.index().map_err(|e| e.to_string())?;
                    if idx.manifests.len() > kiln_image::platform::MAX_INDEX_ENTRIES {
                        return Err(format!("index has {} entries", idx.manifests.len()));
                    }
                    let mut v = Vec::new();
                    for d in idx.manifests {
                        let Ok(cd) = d.digest.as_str().parse::<Digest>() else {
                            continue;
                        };
                        if !kiln_image::manifest::media_types::is_manifest(&d.media_type)
                            || !self.meta().has_blob(&cd).unwrap_or(false)
                        {
                            continue;
                        }
                        let bytes = self.content().read(&cd).map_err(|e| e.to_string())?;
                        v.push(
                            RawManifest::new(bytes, Some(&d.media_type))
                                .map_err(|e| e.to_string())?,
                        );
                    }
                    v
                } else {
                    vec![raw]
                };
                let mut out = Vec::new();
                for raw in manifests {
                    let m = raw.manifest().map_err(|e| e.to_string())?;
                    let cbytes = self
                        .content()
                        .read(&m.config.digest)
                        .map_err(|e| e.to_string())?;
                    let cfg = ImageConfig::from_bytes(&cbytes).map_err(|e| e.to_string())?;
                    out.push((m, cfg));
                }
                Ok(out)
            })();
            let parts = match parts {
                Ok(x) => x,
                Err(e) => {
                    problems.push(format!("image {}: {e}", img.name));
                    continue;
                }
            };
            for (m, cfg) in parts {
                if m.layers.len() != cfg.rootfs.diff_ids.len() {
                    problems.push(format!(
                        "image {}: {} layers, {} diffIDs",
                        img.name,
                        m.layers.len(),
                        cfg.rootfs.diff_ids.len()
                    ));
                    continue;
                }
                for (l, d) in m.layers.iter().zip(&cfg.rootfs.diff_ids) {
                    if !seen.insert((l.digest.clone(), d.clone())) {
                        continue;
                    }
                    let got = self.open_blob(&l.digest).and_then(|r| {
                        let (kind, r) = sniff_reader(r).map_err(|e| Error::Image(e.to_string()))?;
                        let r = decompress(r, kind).map_err(|e| Error::Image(e.to_string()))?;
                        kiln_image::archive::digest_reader(r)
                            .map_err(|e| Error::Image(e.to_string()))
                    });
                    n += 1;
                    match got {
                        Ok((got, _)) if &got == d => {}
                        Ok((got, _)) => problems.push(format!(
                            "image {}: layer {} has diffID {got}, its config says {d}",
                            img.name, l.digest
                        )),
                        Err(e) => {
                            problems.push(format!("image {}: layer {}: {e}", img.name, l.digest))
                        }
                    }
                }
            }
        }
        Ok(n)
    }

    /// The error for a stored blob that does not match its digest, after
    /// moving it aside (when it is still the file in place) so that the
    /// next load or pull stores a good copy.
    fn corrupt(
        &self,
        layer: LayerBlob<'_>,
        file: Option<&std::fs::File>,
        got: Option<(Digest, u64)>,
    ) -> Error {
        // The right bytes under a wrong size claim: the claim is what
        // fails, and the blob stays (another image may name it rightly).
        if let Some((d, n)) = &got {
            if d == layer.digest {
                return Error::WrongSize {
                    digest: d.to_string(),
                    claimed: layer.size.unwrap_or(*n),
                    actual: *n,
                };
            }
        }
        let moved =
            file.is_some_and(|f| self.content().move_aside(layer.digest, f, self.tmp_dir()));
        let actual = match got {
            Some((d, n)) => format!("{d} ({n} bytes)"),
            None => "unreadable".to_string(),
        };
        Error::CorruptBlob {
            digest: layer.digest.to_string(),
            actual,
            what_now: if moved {
                "it was moved aside: load or pull the image again to restore it".to_string()
            } else {
                "load or pull the image again to replace it".to_string()
            },
        }
    }
}

/// The digest and size of an open file's content, read from its start.
fn hash_file(f: &std::fs::File) -> io::Result<(Digest, u64)> {
    use std::os::unix::fs::FileExt;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    let len = h.len();
    Ok((h.finish(), len))
}
