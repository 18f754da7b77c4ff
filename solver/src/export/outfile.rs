//! Output files (`save -o`, `--output type=docker,dest=…`) written so that
//! a failure or a `kill -9` leaves neither a half-written file under the
//! name nor a hidden temp file beside it, with the mode an ordinary
//! `creat(0666)` gets under the umask (docker's archives are 0644).
//!
//! The data goes to an unnamed file (`O_TMPFILE`) in the target's
//! directory, which the kernel frees if kiln dies; once complete and
//! synced it is linked in under a temp name and renamed over the target
//! (a window of two system calls). Where the filesystem has no
//! `O_TMPFILE`, a named temp file is used as before (`.kiln-*.tmp`).
//!
//! A target that exists and is not a regular file or a directory
//! (`/dev/null`, a FIFO, a terminal, a socket) is opened and written in
//! place, as docker does: renaming over it would replace the device node
//! (`save -o /dev/null` as root once turned `/dev/null` into a 2 MB
//! regular file). Only names under `/dev` and `/proc` are followed to
//! one (`/dev/stdout`); a symlink anywhere else is replaced, never
//! written through (an untrusted image's `type=local` export could leave
//! `iid -> /dev/sda` where `--iidfile` writes next), and a block device
//! is never written. A FIFO waits for a reader at most
//! [`FIFO_READER_WAIT`], never in an uninterruptible `open(2)`.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Writes `path` with what `f` writes, atomically (see the module doc).
pub fn write_atomically<E: From<std::io::Error>>(
    path: &Path,
    f: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<(), E> {
    let ctx = |e: std::io::Error| {
        E::from(std::io::Error::new(
            e.kind(),
            format!("writing {}: {e}", path.display()),
        ))
    };
    if let Some((t, follow)) = in_place(path) {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        if t.is_block_device() {
            return Err(ctx(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a block device: not written",
            )));
        }
        // Not followed now if it was not a symlink when looked at.
        let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
        let file = if t.is_fifo() {
            open_fifo(path, nofollow, FIFO_READER_WAIT).map_err(ctx)?
        } else {
            // A regular file behind `/dev/stdout` (`> out.tar`): written
            // from its start, in place (renaming over the link replaced
            // the system's /dev/stdout with a file).
            let trunc = if t.is_file() { libc::O_TRUNC } else { 0 };
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nofollow | trunc | libc::O_NONBLOCK)
                .open(path)
                .map_err(ctx)?
        };
        // What was opened, not what was looked at: never a block device
        // (a link swapped meanwhile), never a directory.
        let now = file.metadata().map_err(ctx)?.file_type();
        if now.is_block_device() || now.is_dir() {
            return Err(ctx(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a block device or directory: not written",
            )));
        }
        // Blocking writes from here (O_NONBLOCK only kept open(2) from
        // waiting).
        // SAFETY: an open descriptor; F_GETFL/F_SETFL take an int.
        unsafe {
            let fl = libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    libc::F_SETFL,
                    fl & !libc::O_NONBLOCK,
                );
            }
        }
        return write_in_place(file, f);
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match open_unnamed(dir) {
        Ok(file) => {
            let file = fill(file, f)?;
            link_into_place(&file, dir, path).map_err(ctx)
        }
        Err(e) if unsupported(&e) => {
            let mut tmp = tempfile::Builder::new()
                .prefix(".kiln-")
                .suffix(".tmp")
                .tempfile_in(dir)
                .map_err(ctx)?;
            // tempfile creates 0600; an output file gets 0666 & !umask.
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o666 & !umask()))
                .map_err(ctx)?;
            {
                let mut w = BufWriter::new(tmp.as_file_mut());
                f(&mut w)?;
                w.flush().map_err(ctx)?;
            }
            tmp.as_file().sync_all().map_err(ctx)?;
            tmp.persist(path).map_err(|e| ctx(e.error))?;
            Ok(())
        }
        Err(e) => Err(ctx(e)),
    }
}

/// The type of what `path` names when the output goes into it in place,
/// and whether it is a link to follow. In place: a device, FIFO or socket
/// named directly (never through a symlink), and whatever the standard
/// streams' names lead to — `/dev/stdout`, `/dev/stderr`, `/dev/fd/N`,
/// `/proc/self/fd/N`, spelled so exactly (a text check of "under /dev"
/// let a link in the world-writable `/dev/shm` lead to `/dev/watchdog`).
/// A symlink anywhere else (one an untrusted image's `type=local` export
/// left in `dest`, one another user planted) is replaced by the rename,
/// never written through.
fn in_place(path: &Path) -> Option<(std::fs::FileType, bool)> {
    let own = std::fs::symlink_metadata(path).ok()?;
    if own.file_type().is_symlink() {
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().ok()?.join(path)
        };
        let s = abs.to_str()?;
        let fd = |prefix: &str| {
            s.strip_prefix(prefix)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        if !(s == "/dev/stdout" || s == "/dev/stderr" || fd("/dev/fd/") || fd("/proc/self/fd/")) {
            return None;
        }
        let t = std::fs::metadata(path).ok()?.file_type();
        return (!t.is_dir()).then_some((t, true));
    }
    let t = own.file_type();
    (!t.is_file() && !t.is_dir()).then_some((t, false))
}

/// How long a FIFO target waits for a process to open it for reading.
pub const FIFO_READER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Opens the FIFO `path` for writing once a process has it open for
/// reading, waiting at most `wait` for one. A blocking `open(2)` would
/// wait for ever and is not ended by Ctrl-C (the runtime handles SIGINT
/// and the open is retried); the open here never blocks (`O_NONBLOCK`,
/// which then is cleared for the writes).
fn open_fifo(path: &Path, flags: i32, wait: std::time::Duration) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | flags)
            .open(path)
        {
            Ok(file) => {
                // SAFETY: an open descriptor; F_GETFL/F_SETFL take an int.
                let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
                // SAFETY: as above.
                if fl < 0
                    || unsafe {
                        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK)
                    } < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                return Ok(file);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if std::time::Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "a FIFO no process opened for reading within {} s",
                            wait.as_secs()
                        ),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

fn fill<E: From<std::io::Error>>(
    mut file: File,
    f: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<File, E> {
    {
        let mut w = BufWriter::new(&mut file);
        f(&mut w)?;
        w.flush()?;
    }
    file.sync_all()?;
    Ok(file)
}

/// Writes into an open device, FIFO or socket: no sync (a FIFO refuses
/// one), no rename.
fn write_in_place<E: From<std::io::Error>>(
    mut file: File,
    f: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<(), E> {
    let mut w = BufWriter::new(&mut file);
    f(&mut w)?;
    w.flush()?;
    Ok(())
}

/// Filesystems (and kernels) without `O_TMPFILE` answer one of these.
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
    )
}

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))
}

/// An unnamed regular file in `dir`, mode 0666 under the umask.
fn open_unnamed(dir: &Path) -> std::io::Result<File> {
    let c = cstring(dir)?;
    // SAFETY: a valid NUL-terminated path; the fd is owned by the File.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
            0o666 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Links the unnamed `file` in under a temp name in `dir`, then renames
/// it over `path`.
fn link_into_place(file: &File, dir: &Path, path: &Path) -> std::io::Result<()> {
    let proc_path = cstring(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))?;
    let mut last = None;
    for n in 0..16u32 {
        let tmp: PathBuf = dir.join(format!(".kiln-{}-{n}.tmp", std::process::id()));
        let tmp_c = cstring(&tmp)?;
        // SAFETY: valid NUL-terminated paths.
        let mut r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                proc_path.as_ptr(),
                libc::AT_FDCWD,
                tmp_c.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r != 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::NotFound {
            // No /proc: link the descriptor itself (needs
            // CAP_DAC_READ_SEARCH, which root has).
            // SAFETY: a valid descriptor and NUL-terminated paths.
            r = unsafe {
                libc::linkat(
                    file.as_raw_fd(),
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    tmp_c.as_ptr(),
                    libc::AT_EMPTY_PATH,
                )
            };
        }
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                last = Some(e);
                continue;
            }
            return Err(e);
        }
        return std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        });
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temp name")))
}

use kiln_fs::umask;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_file_and_leaves_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.tar");
        write_atomically::<std::io::Error>(&p, |w| w.write_all(b"hello")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask());
    }

    #[test]
    fn a_fifo_nobody_reads_is_an_error_not_a_hang() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("pipe");
        let c = cstring(&fifo).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let t = std::time::Instant::now();
        let e = open_fifo(&fifo, 0, std::time::Duration::from_millis(300)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_fifo_or_device_target_is_written_in_place_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("pipe");
        let c = cstring(&fifo).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_atomically::<std::io::Error>(&fifo, |w| w.write_all(b"through the pipe")).unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        // A device named directly is written, never renamed over.
        write_atomically::<std::io::Error>(Path::new("/dev/null"), |w| w.write_all(b"gone"))
            .unwrap();
        assert!(std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
        // A symlink elsewhere to a device (left by an image's local export
        // where --iidfile writes) is replaced: /dev/full was not written
        // (that would fail with ENOSPC), the link is now the file.
        let link = d.path().join("full");
        std::os::unix::fs::symlink("/dev/full", &link).unwrap();
        write_atomically::<std::io::Error>(&link, |w| w.write_all(b"mine")).unwrap();
        assert_eq!(std::fs::read(&link).unwrap(), b"mine");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert!(std::fs::metadata("/dev/full")
            .unwrap()
            .file_type()
            .is_char_device());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_block_device_is_never_written() {
        use std::os::unix::fs::FileTypeExt;
        let Some(dev) = std::fs::read_dir("/dev")
            .unwrap()
            .flatten()
            .find(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
        else {
            return;
        };
        let r = write_atomically::<std::io::Error>(&dev.path(), |_| {
            panic!("a block device was opened for writing")
        });
        assert!(r.is_err());
    }

    /// The standard streams' names lead where they lead: a file behind
    /// `/proc/self/fd/N` is written in place, from its start.
    #[test]
    fn a_stream_name_is_written_where_it_leads() {
        use std::os::fd::AsRawFd;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out");
        std::fs::write(&p, b"old contents that are longer").unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let name = format!("/proc/self/fd/{}", f.as_raw_fd());
        write_atomically::<std::io::Error>(Path::new(&name), |w| w.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        // A link elsewhere to the same stream name is not followed.
        let link = d.path().join("shm-link");
        std::os::unix::fs::symlink(&name, &link).unwrap();
        write_atomically::<std::io::Error>(&link, |w| w.write_all(b"mine")).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn failure_leaves_no_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.tar");
        let r = write_atomically(&p, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("boom"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
