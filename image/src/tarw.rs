//! A small deterministic tar writer: USTAR headers, PAX extended headers
//! only where USTAR cannot express something (long names or link targets,
//! xattrs, large ids/sizes/times), no uname/gname/atime/ctime.

use std::io::{self, Read, Write};

/// The kind of a tar entry, with what each kind needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Regular file of `size` bytes; data follows.
    Regular(u64),
    /// Directory.
    Dir,
    /// Symbolic link to the target.
    Symlink(Vec<u8>),
    /// Hard link to an earlier entry of the same archive (path as written).
    Hardlink(Vec<u8>),
    /// Character device (major, minor).
    Char(u32, u32),
    /// Block device (major, minor).
    Block(u32, u32),
    /// Named pipe.
    Fifo,
}

/// One entry's metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Path inside the archive, relative, `/`-separated, no trailing slash.
    pub path: Vec<u8>,
    /// What the entry is.
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Extended attributes (name, value), sorted by name.
    pub xattrs: Xattrs,
}

impl Meta {
    /// Feeds everything of this entry that its tar header says (path,
    /// kind with its size or link target, mode, owner, mtime, xattrs)
    /// into `h`, each field length-prefixed: two entries with equal
    /// fingerprints write equal headers.
    pub fn fingerprint(&self, h: &mut crate::Hasher) {
        fn field(h: &mut crate::Hasher, b: &[u8]) {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        }
        field(h, &self.path);
        let (tag, a, b, bytes): (u8, u64, u64, &[u8]) = match &self.kind {
            Kind::Regular(n) => (b'0', *n, 0, &[]),
            Kind::Dir => (b'5', 0, 0, &[]),
            Kind::Symlink(t) => (b'2', 0, 0, t),
            Kind::Hardlink(t) => (b'1', 0, 0, t),
            Kind::Char(x, y) => (b'3', u64::from(*x), u64::from(*y), &[]),
            Kind::Block(x, y) => (b'4', u64::from(*x), u64::from(*y), &[]),
            Kind::Fifo => (b'6', 0, 0, &[]),
        };
        h.update(&[tag]);
        h.update(&a.to_le_bytes());
        h.update(&b.to_le_bytes());
        field(h, bytes);
        h.update(&self.mode.to_le_bytes());
        h.update(&self.uid.to_le_bytes());
        h.update(&self.gid.to_le_bytes());
        h.update(&self.mtime.to_le_bytes());
        h.update(&(self.xattrs.len() as u64).to_le_bytes());
        for (k, v) in &self.xattrs {
            field(h, k);
            field(h, v);
        }
    }
}

/// Extended attributes as (name, value) pairs.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Streams entries into `out`.
pub struct TarWriter<W: Write> {
    out: W,
    written: u64,
    /// Copy buffer for file data (large reads: few syscalls per file).
    buf: Vec<u8>,
    /// See [`TarWriter::defer_content`].
    deferred: bool,
}

const BLOCK: usize = 512;
const MAX_OCTAL_8: u64 = 0o7777777;
const MAX_OCTAL_12: u64 = 0o77777777777;

fn put_octal(field: &mut [u8], v: u64) {
    // width-1 digits then NUL, zero padded (as Go's archive/tar)
    let n = field.len() - 1;
    let s = format!("{:0width$o}", v, width = n);
    field[..n].copy_from_slice(s.as_bytes());
    field[n] = 0;
}

fn put_bytes(field: &mut [u8], b: &[u8]) {
    field.fill(0);
    field[..b.len()].copy_from_slice(b);
}

/// Split a name into USTAR (prefix, name) if it fits.
fn split_ustar(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if path.len() <= 100 {
        return Some((&[], path));
    }
    if path.len() > 256 {
        return None;
    }
    // choose the first '/' such that the prefix fits in 155 and the rest in 100
    for (i, &b) in path.iter().enumerate() {
        if b == b'/' && i <= 155 && path.len() - i - 1 <= 100 && i > 0 && i + 1 < path.len() {
            return Some((&path[..i], &path[i + 1..]));
        }
    }
    None
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "<len> <key>=<value>\n" where len counts itself
    let body = key.len() + value.len() + 3; // space, '=', '\n'
    let mut len = body + 1;
    loop {
        let total = body + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Parse the records of a PAX extended header ("<len> <key>=<value>\n"),
/// honouring the length prefix so values may hold any byte, newlines too.
pub fn parse_pax(mut data: &[u8]) -> io::Result<Xattrs> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed PAX record");
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad());
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

impl<W: Write> TarWriter<W> {
    /// A writer into `out`.
    pub fn new(out: W) -> Self {
        TarWriter {
            out,
            written: 0,
            buf: Vec::new(),
            deferred: false,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// From now on, [`TarWriter::append`] of a regular file without
    /// `data` writes only its header(s): the caller puts the file's
    /// content and its padding to 512 bytes into the stream itself,
    /// right after (see [`TarWriter::get_mut`]).
    pub fn defer_content(&mut self) {
        self.deferred = true;
    }

    /// The writer entries go to.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.raw(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn header_block(
        name: &[u8],
        prefix: &[u8],
        typeflag: u8,
        mode: u32,
        uid: u64,
        gid: u64,
        size: u64,
        mtime: u64,
        link: &[u8],
        dev: (u32, u32),
    ) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        put_bytes(&mut h[0..100], name);
        put_octal(&mut h[100..108], u64::from(mode));
        put_octal(&mut h[108..116], uid);
        put_octal(&mut h[116..124], gid);
        put_octal(&mut h[124..136], size);
        put_octal(&mut h[136..148], mtime);
        h[156] = typeflag;
        put_bytes(&mut h[157..257], link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        // uname/gname left empty
        if matches!(typeflag, b'3' | b'4') {
            put_octal(&mut h[329..337], u64::from(dev.0).min(MAX_OCTAL_8));
            put_octal(&mut h[337..345], u64::from(dev.1).min(MAX_OCTAL_8));
        }
        put_bytes(&mut h[345..500], prefix);
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let s = format!("{:06o}\0 ", sum);
        h[148..156].copy_from_slice(s.as_bytes());
        h
    }

    /// Append one entry; `data` must yield exactly the regular file's size.
    pub fn append(&mut self, meta: &Meta, data: Option<&mut dyn Read>) -> io::Result<()> {
        let mut name = meta.path.clone();
        if meta.kind == Kind::Dir && !name.ends_with(b"/") {
            name.push(b'/');
        }
        let (typeflag, size, link, dev): (u8, u64, &[u8], (u32, u32)) = match &meta.kind {
            Kind::Regular(s) => (b'0', *s, &[], (0, 0)),
            Kind::Dir => (b'5', 0, &[], (0, 0)),
            Kind::Symlink(t) => (b'2', 0, t, (0, 0)),
            Kind::Hardlink(t) => (b'1', 0, t, (0, 0)),
            Kind::Char(a, b) => (b'3', 0, &[], (*a, *b)),
            Kind::Block(a, b) => (b'4', 0, &[], (*a, *b)),
            Kind::Fifo => (b'6', 0, &[], (0, 0)),
        };
        let mut pax = Vec::new();
        let split = split_ustar(&name);
        if split.is_none() {
            pax_record(&mut pax, b"path", &name);
        }
        if link.len() > 100 {
            pax_record(&mut pax, b"linkpath", link);
        }
        if meta.uid > MAX_OCTAL_8 {
            pax_record(&mut pax, b"uid", meta.uid.to_string().as_bytes());
        }
        if meta.gid > MAX_OCTAL_8 {
            pax_record(&mut pax, b"gid", meta.gid.to_string().as_bytes());
        }
        if size > MAX_OCTAL_12 {
            pax_record(&mut pax, b"size", size.to_string().as_bytes());
        }
        let mtime = meta.mtime.max(0) as u64;
        if mtime > MAX_OCTAL_12 {
            pax_record(&mut pax, b"mtime", mtime.to_string().as_bytes());
        }
        let mut xattrs = meta.xattrs.clone();
        xattrs.sort();
        for (k, v) in &xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
        // Keys are emitted in a fixed order (path, linkpath, uid, gid, size,
        // mtime, xattrs sorted), so output is deterministic.
        if !pax.is_empty() {
            let base = name
                .rsplit(|&b| b == b'/')
                .find(|c| !c.is_empty())
                .unwrap_or(b"");
            let mut pname = b"PaxHeaders.0/".to_vec();
            pname.extend_from_slice(base);
            pname.truncate(100);
            let h = Self::header_block(
                &pname,
                &[],
                b'x',
                0o644,
                0,
                0,
                pax.len() as u64,
                0,
                &[],
                (0, 0),
            );
            self.raw(&h)?;
            self.raw(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        let (prefix, short): (&[u8], &[u8]) = match split {
            Some(p) => p,
            None => (&[], &name[..name.len().min(100)]),
        };
        let link_field = &link[..link.len().min(100)];
        let h = Self::header_block(
            short,
            prefix,
            typeflag,
            meta.mode & 0o7777,
            meta.uid.min(MAX_OCTAL_8),
            meta.gid.min(MAX_OCTAL_8),
            size.min(MAX_OCTAL_12),
            mtime.min(MAX_OCTAL_12),
            link_field,
            dev,
        );
        self.raw(&h)?;
        if size > 0 && data.is_none() && self.deferred {
            // The caller supplies the content and padding itself.
            self.written += size.div_ceil(BLOCK as u64) * BLOCK as u64;
            return Ok(());
        }
        if size > 0 {
            let data = data.ok_or_else(|| io::Error::other("regular file without data"))?;
            let n = self.copy_data(data, size)?;
            if n != size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: file shrank while writing the layer ({n} of {size} bytes)",
                        String::from_utf8_lossy(&meta.path)
                    ),
                ));
            }
            self.pad(size)?;
        }
        Ok(())
    }

    /// Copies up to `size` bytes of `data` into the archive.
    fn copy_data(&mut self, data: &mut dyn Read, size: u64) -> io::Result<u64> {
        const CHUNK: usize = 256 * 1024;
        let want = usize::try_from(size).unwrap_or(CHUNK).min(CHUNK);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let mut left = size;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(CHUNK).min(self.buf.len());
            let got = match data.read(&mut self.buf[..n]) {
                Ok(0) => break,
                Ok(g) => g,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.out.write_all(&self.buf[..got])?;
            self.written += got as u64;
            left -= got as u64;
        }
        Ok(size - left)
    }

    /// Write the end-of-archive marker and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.raw(&[0u8; BLOCK * 2])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let mut v = Vec::new();
        pax_record(&mut v, b"path", b"x");
        assert_eq!(v, b"9 path=x\n");
        let mut v = Vec::new();
        pax_record(&mut v, b"path", &[b'a'; 95]);
        // 95 + 4 + 3 = 102 body; +3 digits = 105
        assert!(v.starts_with(b"105 path="));
    }

    #[test]
    fn parse_pax_binary_values() {
        let mut v = Vec::new();
        pax_record(
            &mut v,
            b"SCHILY.xattr.security.capability",
            b"\x01\n\x00=\n",
        );
        pax_record(&mut v, b"path", b"a b");
        let r = parse_pax(&v).expect("parse");
        assert_eq!(r[0].1, b"\x01\n\x00=\n");
        assert_eq!(r[1], (b"path".to_vec(), b"a b".to_vec()));
        assert!(parse_pax(b"99 path=x\n").is_err());
    }

    #[test]
    fn readable_by_tar_crate() {
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
        let mut w = TarWriter::new(Vec::new());
        let metas = vec![
            Meta {
                path: b"dir".to_vec(),
                kind: Kind::Dir,
                mode: 0o755,
                uid: 1,
                gid: 2,
                mtime: 5,
                xattrs: vec![],
            },
            Meta {
                path: b"dir/file".to_vec(),
                kind: Kind::Regular(3),
                mode: 0o4755,
                uid: 3_000_000,
                gid: 4,
                mtime: 6,
                xattrs: vec![(b"user.k".to_vec(), b"v\0\n".to_vec())],
            },
            Meta {
                path: long.clone().into_bytes(),
                kind: Kind::Symlink(vec![b't'; 150]),
                mode: 0o777,
                uid: 0,
                gid: 0,
                mtime: 7,
                xattrs: vec![],
            },
        ];
        for m in &metas {
            let mut d: &[u8] = b"abc";
            w.append(m, Some(&mut d)).expect("append");
        }
        let bytes = w.finish().expect("finish");
        assert_eq!(bytes.len() % 512, 0);
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        let mut pax = Vec::new();
        for e in ar.entries().expect("entries").raw(true) {
            let mut e = e.expect("entry");
            if e.header().entry_type() == tar::EntryType::XHeader {
                let mut d = Vec::new();
                e.read_to_end(&mut d).expect("read pax");
                pax = parse_pax(&d).expect("parse pax");
                continue;
            }
            let x = std::mem::take(&mut pax);
            let p = x
                .iter()
                .find(|(k, _)| k == b"path")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| e.path_bytes().into_owned());
            let uid = e.header().uid().expect("uid");
            let link = x
                .iter()
                .find(|(k, _)| k == b"linkpath")
                .map(|(_, v)| v.clone())
                .or_else(|| e.link_name_bytes().map(|c| c.into_owned()));
            seen.push((p, uid, x, link));
        }
        assert_eq!(seen[0].0, b"dir/");
        assert_eq!(seen[1].0, b"dir/file");
        assert!(seen[1]
            .2
            .iter()
            .any(|(k, v)| k == b"SCHILY.xattr.user.k" && v == b"v\0\n"));
        assert!(seen[1]
            .2
            .iter()
            .any(|(k, v)| k == b"uid" && v == b"3000000"));
        assert_eq!(seen[2].0, long.as_bytes());
        assert_eq!(seen[2].3.as_deref(), Some(&[b't'; 150][..]));
    }
}
