//! `kiln run`'s standard streams: `--env-file`, `-i` (kiln's stdin is the
//! application's) and `-t` (a pseudo-terminal, kiln's terminal in raw mode
//! while it runs).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use crate::build_cmd::usage;

/// An env file may be at most this big.
const MAX_ENV_FILE: u64 = 1 << 20;

/// docker's `--env-file`: `K=V` lines (the value as it is, quotes
/// included), blank lines and `#` comments skipped, leading whitespace
/// trimmed, `K` alone taken from kiln's environment (skipped when unset).
pub fn read_env_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let f = std::fs::File::open(path)
        .map_err(|e| usage(format!("--env-file {}: {e}", path.display())))?;
    let mut text = String::new();
    f.take(MAX_ENV_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| usage(format!("--env-file {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_ENV_FILE {
        return Err(usage(format!(
            "--env-file {}: larger than {MAX_ENV_FILE} bytes",
            path.display()
        )));
    }
    parse_env_file(&text).map_err(|e| usage(format!("--env-file {}: {e}", path.display())))
}

fn parse_env_file(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (line, None),
        };
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            return Err(format!(
                "line {}: variable {key:?} is empty or contains whitespace",
                n + 1
            ));
        }
        match value {
            Some(v) => out.push(format!("{key}={v}")),
            None => {
                if let Ok(v) = std::env::var(key) {
                    out.push(format!("{key}={v}"));
                }
            }
        }
    }
    Ok(out)
}

/// The application's stdin for `-i` without `-t`: a pipe that a thread
/// fills from kiln's stdin, as docker's. Never kiln's own descriptor: the
/// application would get the file behind it (a file redirected into
/// kiln, kiln's terminal) and could open it again through
/// `/proc/self/fd/0` for writing, as root — or push input into the
/// user's shell through the terminal (`TIOCSTI`).
pub fn stdin_pipe() -> anyhow::Result<OwnedFd> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(anyhow::anyhow!(
            "a pipe for stdin: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: both descriptors were just made, and are owned here only.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Not joined: it ends at kiln's EOF, or when the application's end is
    // closed (EPIPE), or with kiln (a read of stdin cannot be interrupted).
    std::thread::spawn(move || {
        let mut out = std::fs::File::from(w);
        let mut buf = [0u8; 64 * 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    Ok(r)
}

/// A pseudo-terminal for `kiln run -t`: the slave goes to the sandbox,
/// a thread copies the master to kiln's stdout, and with `-i` another
/// copies kiln's stdin to the master (kiln's terminal in raw mode).
pub struct Terminal {
    slave: Option<Arc<OwnedFd>>,
    resizer: Resizer,
    output: Option<std::thread::JoinHandle<()>>,
    saved: Option<libc::termios>,
}

impl Terminal {
    /// Opens the pair (the window size of kiln's terminal, if it has one)
    /// and starts the copying.
    pub fn open(interactive: bool) -> anyhow::Result<Terminal> {
        let mut master: libc::c_int = -1;
        let mut slave: libc::c_int = -1;
        let ws = own_window_size();
        // SAFETY: openpty writes two descriptors; the name is not asked for.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                match &ws {
                    Some(ws) => ws,
                    None => std::ptr::null(),
                },
            )
        };
        if r != 0 {
            return Err(anyhow::anyhow!(
                "opening a pseudo-terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: openpty returned these two descriptors to us.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        for fd in [&master, &slave] {
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        let mut saved = None;
        if interactive {
            let stdin = std::io::stdin();
            if std::io::IsTerminal::is_terminal(&stdin) {
                // SAFETY: termios calls on fd 0 with a zeroed struct they fill.
                unsafe {
                    let mut t: libc::termios = std::mem::zeroed();
                    if libc::tcgetattr(0, &mut t) == 0 {
                        saved = Some(t);
                        let mut raw = t;
                        libc::cfmakeraw(&mut raw);
                        libc::tcsetattr(0, libc::TCSANOW, &raw);
                    }
                }
            }
            let mut to = std::fs::File::from(
                master
                    .try_clone()
                    .map_err(|e| anyhow::anyhow!("pseudo-terminal: {e}"))?,
            );
            // Not joined: it ends with kiln (a read of stdin cannot be
            // interrupted).
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut stdin = std::io::stdin().lock();
                while let Ok(n) = stdin.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                // End of input: the terminal's end-of-file character.
                let _ = to.write_all(&[4]);
            });
        }
        let resizer = Resizer(Arc::new(
            master
                .try_clone()
                .map_err(|e| anyhow::anyhow!("pseudo-terminal: {e}"))?,
        ));
        let mut from = std::fs::File::from(master);
        let output = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut out = std::io::stdout();
            // EIO once every slave descriptor is closed: the sandbox is over.
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || out.write_all(&buf[..n]).is_err() {
                    break;
                }
                let _ = out.flush();
            }
        });
        Ok(Terminal {
            slave: Some(Arc::new(slave)),
            resizer,
            output: Some(output),
            saved,
        })
    }

    /// The slave side, for [`kiln_solver::executor::ExecRequest::tty`].
    pub fn slave(&self) -> Option<Arc<OwnedFd>> {
        self.slave.clone()
    }

    /// What follows kiln's window size onto the application's terminal
    /// (for [`crate::signals::forward_to_step`]).
    pub fn resizer(&self) -> Resizer {
        self.resizer.clone()
    }

    /// After the run: the rest of the output copied, kiln's terminal as it
    /// was.
    pub fn finish(mut self) {
        // Our reference to the slave goes (the sandbox's went with it), so
        // the master reads end.
        self.slave = None;
        if let Some(h) = self.output.take() {
            let _ = h.join();
        }
    }
}

/// The window size of kiln's terminal: stdout's, else stdin's or
/// stderr's (none when kiln has no terminal).
fn own_window_size() -> Option<libc::winsize> {
    [1, 0, 2].into_iter().find_map(|fd| {
        // SAFETY: a zeroed winsize is valid; the ioctl fills it or fails.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        (unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0).then_some(ws)
    })
}

/// The master side of `kiln run -t`'s terminal, for following kiln's
/// window size: docker sets the container's terminal size on every
/// SIGWINCH, and the kernel then signals the terminal's foreground
/// process group.
#[derive(Clone)]
pub struct Resizer(Arc<OwnedFd>);

impl Resizer {
    /// Sets kiln's terminal's current window size on the application's.
    pub fn follow(&self) {
        if let Some(ws) = own_window_size() {
            // SAFETY: TIOCSWINSZ reads a winsize; the master is ours.
            unsafe { libc::ioctl(self.0.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(t) = self.saved.take() {
            // SAFETY: restores the attributes read in `open`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_read_as_docker_reads_them() {
        std::env::set_var("KILN_TEST_FROM_ENV", "yes");
        let v = parse_env_file(
            "# comment\n\n  A=1\nB=\"quoted\"\nKILN_TEST_FROM_ENV\nKILN_TEST_UNSET_VAR\nC=x=y\n",
        )
        .unwrap();
        assert_eq!(
            v,
            ["A=1", "B=\"quoted\"", "KILN_TEST_FROM_ENV=yes", "C=x=y"]
        );
        assert!(parse_env_file("BAD KEY=1\n").is_err());
        assert!(parse_env_file("=1\n").is_err());
    }
}
