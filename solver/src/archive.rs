//! ADD's local-archive extraction and COPY/ADD heredoc sources.
//!
//! A local source file that is a tar archive (plain, gzip, zstd, bzip2 or
//! xz — recognised by content, as Docker does, not by name) is unpacked
//! into the destination directory; anything else is copied like COPY.

use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;

use kiln_image::apply::{apply_layer, WhiteoutMode};

use crate::copy::{copy_selections, CopyError, CopyOptions, Selection, Selector};
use crate::fsview::{base_bytes, join_bytes, parent_bytes, show, LayerView};

fn io_err(what: &str, e: impl std::fmt::Display) -> CopyError {
    CopyError::Io(what.to_string(), io::Error::other(e.to_string()))
}

/// The decompressor for a file's first bytes, if it is an archive.
/// `open` opens the file (it is called again to read from the start).
pub(crate) fn open_archive(
    open: impl Fn() -> io::Result<fs::File>,
) -> io::Result<Option<Box<dyn Read>>> {
    let mut f = open()?;
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        let r = f.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let head = &head[..n];
    let reopen = &open;
    let reader: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(reopen()?))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::new(reopen()?)?)
    } else if head.starts_with(b"BZh") {
        Box::new(bzip2::read::MultiBzDecoder::new(reopen()?))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Box::new(liblzma::read::XzDecoder::new_multi_decoder(reopen()?))
    } else if is_tar_header(head) {
        Box::new(reopen()?)
    } else {
        return Ok(None);
    };
    // A compressed file is an archive only if what it holds is a tar.
    let mut probe = reader;
    let mut inner = [0u8; 512];
    let mut got = 0;
    while got < inner.len() {
        let r = probe.read(&mut inner[got..])?;
        if r == 0 {
            break;
        }
        got += r;
    }
    if !is_tar_header(&inner[..got]) {
        return Ok(None);
    }
    let rest: Box<dyn Read> = Box::new(io::Cursor::new(inner[..got].to_vec()).chain(probe));
    Ok(Some(rest))
}

/// A 512-byte block whose checksum field matches (ustar or old v7 tar).
fn is_tar_header(b: &[u8]) -> bool {
    if b.len() < 512 {
        return false;
    }
    let field = &b[148..156];
    let s: String = field
        .iter()
        .take_while(|c| **c != 0 && **c != b' ')
        .map(|c| *c as char)
        .collect();
    let Ok(want) = u32::from_str_radix(s.trim(), 8) else {
        return false;
    };
    let sum: u32 = b[..512]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*c)
            }
        })
        .sum();
    sum == want
}

/// ADD: archives among the (file) selections are unpacked into `dest`;
/// the rest is copied as COPY would.
pub fn add_selections(
    dst: &LayerView,
    dest: &str,
    dest_is_dir: bool,
    selections: &[Selection],
    opts: &CopyOptions,
) -> Result<(), CopyError> {
    let mut plain = Vec::new();
    for s in selections {
        let archive = if s.is_dir {
            None
        } else {
            s.entries
                .first()
                .map(|e| {
                    open_archive(|| {
                        crate::fsview::open_found(&e.host, (e.meta.dev(), e.meta.ino()))
                    })
                })
                .transpose()
                .map_err(|e| io_err(&show(&s.path), e))?
                .flatten()
        };
        let Some(reader) = archive else {
            plain.push(s.clone());
            continue;
        };
        // Unpack into a scratch directory beside the layer (hostile names
        // are confined by the applier), then copy it in with its owners.
        let top = dst
            .top()
            .ok_or_else(|| CopyError::NotFound("(no layers)".into()))?;
        let parent = top.parent().unwrap_or(top);
        let tmp = tempfile::Builder::new()
            .prefix(".kiln-add-")
            .tempdir_in(parent)
            .map_err(|e| io_err("temporary directory", e))?;
        apply_layer(reader, tmp.path(), WhiteoutMode::Delete)
            .map_err(|e| io_err(&show(&s.path), e))?;
        let src = LayerView::new(vec![tmp.path().to_path_buf()], false);
        let sel = Selector {
            view: &src,
            ignore: None,
            exclude: None,
        }
        .select("/")?;
        let unpack_opts = CopyOptions {
            keep_owner: opts.owner.is_none(),
            ..opts.clone()
        };
        copy_selections(dst, dest, true, &sel, &unpack_opts)?;
    }
    if !plain.is_empty() {
        copy_selections(dst, dest, dest_is_dir || selections.len() > 1, &plain, opts)?;
    }
    Ok(())
}

/// Writes a heredoc source (`COPY <<EOF /dest`) as a file, as BuildKit
/// copies it: into a directory destination under its own name (an entry
/// of that name, a symlink too, is replaced, never followed), or at a file
/// destination resolved through the image's symlinks inside the root.
/// Written through the top layer's open directory: no symlink is ever
/// followed on the host.
pub fn write_inline(
    dst: &LayerView,
    dest: &str,
    dest_is_dir: bool,
    name: &str,
    data: &str,
    opts: &CopyOptions,
) -> Result<(), CopyError> {
    let target = if dest_is_dir {
        join_bytes(&dst.resolve(dest, true)?, name.as_bytes())
    } else {
        dst.resolve(dest, true)?
    };
    let owner = opts.owner.unwrap_or((0, 0));
    let parent = dst.resolve(parent_bytes(&target), true)?;
    let dir = dst.ensure_dir(&parent, owner)?;
    let base = std::ffi::OsStr::from_bytes(base_bytes(&target));
    if base.is_empty() {
        return Err(io_err(&show(&target), "not a file name"));
    }
    let mode = opts.chmod.as_ref().map_or(0o644, |c| c.apply(0o644, false));
    let fs_err = |e: kiln_fs::Error| CopyError::View(e.into());
    dir.write_file(base, data.as_bytes(), mode, Some(owner))
        .map_err(fs_err)?;
    if let Some(t) = opts.clamp_mtime {
        dir.set_times(base, (t, 0)).map_err(fs_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_tar_by_content_not_name() {
        let t = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "hello.txt", &b"hi"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        fs::write(t.path().join("x.bin"), &bytes).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &bytes).unwrap();
        fs::write(t.path().join("x.tgz"), gz.finish().unwrap()).unwrap();
        fs::write(t.path().join("plain.tar"), "not a tar at all").unwrap();
        assert!(open_archive(|| fs::File::open(t.path().join("x.bin")))
            .unwrap()
            .is_some());
        assert!(open_archive(|| fs::File::open(t.path().join("x.tgz")))
            .unwrap()
            .is_some());
        assert!(open_archive(|| fs::File::open(t.path().join("plain.tar")))
            .unwrap()
            .is_none());
    }
}
