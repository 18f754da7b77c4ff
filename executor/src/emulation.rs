//! Running foreign-architecture binaries: binfmt_misc and QEMU user mode.
//!
//! A RUN step for a platform the host cannot execute natively works only
//! when the kernel hands the step's ELF binaries to an emulator: a
//! binfmt_misc handler whose magic and mask match the architecture's ELF
//! header. Inside the sandbox (after pivot_root) the handler's interpreter
//! path means nothing, so the handler needs the `F` (fix-binary) flag: the
//! kernel then opened the interpreter when it was registered and uses that
//! file in every mount namespace.
//!
//! [`check`] says, before a foreign-platform step, whether that holds and
//! why not; [`install`] registers the QEMU user-mode interpreters that
//! Debian's `qemu-user-static` installs (magic and mask from its
//! `/usr/share/binfmts/qemu-*` files) with `F` and without `C` (Debian's
//! own `credentials no`; docker's `tonistiigi/binfmt` sets `C`, which
//! starts QEMU with a setuid foreign binary's credentials: QEMU still
//! obeys its caller's `QEMU_*` variables — a debugger stub, its own
//! loader, a log file anywhere — so any local user who can reach a
//! setuid-root foreign binary, e.g. in an unpacked image, became root);
//! [`uninstall`] removes them.
//!
//! Everything read from `/proc/sys/fs/binfmt_misc` is bounded (entry count
//! and size) and a malformed entry is skipped, never trusted.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Where binfmt_misc is mounted.
pub const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";
/// Where Debian's packages describe their binary formats
/// (`update-binfmts` format).
pub const BINFMTS_DIR: &str = "/usr/share/binfmts";

/// At most this many binfmt_misc entries are read.
const MAX_ENTRIES: usize = 1024;
/// At most this many bytes of one entry (or of one format file) are read.
const MAX_ENTRY_SIZE: u64 = 4096;
/// binfmt_misc's own limit on magic and mask (`BINPRM_BUF_SIZE`).
const MAX_MAGIC: usize = 256;

/// Why a platform's binaries cannot run here, or a registration failed.
#[derive(Debug, thiserror::Error)]
pub enum EmulationError {
    /// kiln knows no ELF machine for the architecture.
    #[error("RUN for {platform} needs emulation, and kiln does not know the ELF machine of architecture {architecture:?}")]
    UnknownArchitecture {
        /// `os/arch[/variant]`.
        platform: String,
        /// The architecture as given.
        architecture: String,
    },
    /// Only Linux binaries run.
    #[error("RUN for {platform}: only linux platforms can run (not {os:?})")]
    NotLinux {
        /// `os/arch[/variant]`.
        platform: String,
        /// The OS as given.
        os: String,
    },
    /// binfmt_misc is not mounted (or not readable).
    #[error("RUN for {platform} needs emulation: binfmt_misc is not mounted at {} ({reason}). Install qemu-user-static and run `kiln system binfmt` (as root).", mount.display())]
    NotMounted {
        /// `os/arch[/variant]`.
        platform: String,
        /// The mount point looked at.
        mount: PathBuf,
        /// What failed.
        reason: String,
    },
    /// binfmt_misc is switched off as a whole.
    #[error("RUN for {platform} needs emulation: binfmt_misc is disabled ({}/status says so). Run `echo 1 > {}/status` or `kiln system binfmt` (as root).", mount.display(), mount.display())]
    Disabled {
        /// `os/arch[/variant]`.
        platform: String,
        /// The mount point.
        mount: PathBuf,
    },
    /// No enabled handler matches the architecture's ELF header.
    #[error("RUN for {platform} needs emulation: no binfmt_misc handler for {elf} ELF binaries is registered. Install qemu-user-static and run `kiln system binfmt` (as root).")]
    NoHandler {
        /// `os/arch[/variant]`.
        platform: String,
        /// The ELF machine's usual name (`aarch64`, `arm`).
        elf: &'static str,
    },
    /// A handler matches but lacks the `F` flag.
    #[error("RUN for {platform} needs emulation: the binfmt_misc handler {name:?} for {elf} ELF binaries is registered without the F flag, so its interpreter {} is not reachable inside the sandbox. Run `kiln system binfmt` (as root) to register it with F.", interpreter.display())]
    NotFixBinary {
        /// `os/arch[/variant]`.
        platform: String,
        /// The ELF machine's usual name.
        elf: &'static str,
        /// The handler's name.
        name: String,
        /// Its interpreter.
        interpreter: PathBuf,
    },
    /// A handler pins an interpreter on a writable mount: a step's
    /// emulated process reaches that file through `/proc/self/exe` and,
    /// as root, could change it on the host (make it setuid root).
    #[error("RUN for {platform} needs emulation: the binfmt_misc handler {name:?} pins its interpreter {} where a step running as root could change it on the host (through /proc/self/exe). Run `kiln system binfmt` (as root): it registers read-only copies under {PINNED_DIR}.", interpreter.display())]
    WritableInterpreter {
        /// `os/arch[/variant]`.
        platform: String,
        /// The handler's name.
        name: String,
        /// Its interpreter.
        interpreter: PathBuf,
    },
    /// No QEMU interpreter is installed for an architecture to register.
    #[error("no QEMU user-mode interpreter for {elf} is installed (looked for {}; apt-get install qemu-user-static)", looked.display())]
    NoInterpreter {
        /// The ELF machine's usual name.
        elf: &'static str,
        /// Where kiln looked.
        looked: PathBuf,
    },
    /// A `/usr/share/binfmts` file that does not describe a format.
    #[error("{}: {detail}", path.display())]
    BadFormatFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A system call or file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What kiln was doing.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> EmulationError + 'a {
    move |source| EmulationError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// An ELF machine kiln can name: the OCI architecture, the name QEMU and
/// Debian use, the ELF class, byte order and `e_machine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfArch {
    /// OCI/Go architecture (`arm64`).
    pub oci: &'static str,
    /// QEMU's name (`aarch64`): `qemu-<this>-static`, `/usr/share/binfmts/qemu-<this>`.
    pub qemu: &'static str,
    /// 64-bit ELF.
    pub class64: bool,
    /// Big-endian.
    pub big_endian: bool,
    /// `e_machine`.
    pub machine: u16,
}

/// The architectures kiln knows (Go names, as in OCI platforms).
pub const ARCHES: &[ElfArch] = &[
    ElfArch {
        oci: "amd64",
        qemu: "x86_64",
        class64: true,
        big_endian: false,
        machine: 0x3e,
    },
    ElfArch {
        oci: "386",
        qemu: "i386",
        class64: false,
        big_endian: false,
        machine: 0x03,
    },
    ElfArch {
        oci: "arm64",
        qemu: "aarch64",
        class64: true,
        big_endian: false,
        machine: 0xb7,
    },
    ElfArch {
        oci: "arm",
        qemu: "arm",
        class64: false,
        big_endian: false,
        machine: 0x28,
    },
    ElfArch {
        oci: "ppc64le",
        qemu: "ppc64le",
        class64: true,
        big_endian: false,
        machine: 0x15,
    },
    ElfArch {
        oci: "s390x",
        qemu: "s390x",
        class64: true,
        big_endian: true,
        machine: 0x16,
    },
    ElfArch {
        oci: "riscv64",
        qemu: "riscv64",
        class64: true,
        big_endian: false,
        machine: 0xf3,
    },
    ElfArch {
        oci: "mips64le",
        qemu: "mips64el",
        class64: true,
        big_endian: false,
        machine: 0x08,
    },
    ElfArch {
        oci: "loong64",
        qemu: "loongarch64",
        class64: true,
        big_endian: false,
        machine: 0x102,
    },
];

impl ElfArch {
    /// The entry for an OCI architecture name.
    pub fn from_oci(arch: &str) -> Option<&'static ElfArch> {
        ARCHES.iter().find(|a| a.oci == arch)
    }

    /// The entry for the architecture this process runs on.
    pub fn host() -> Option<&'static ElfArch> {
        let q = match std::env::consts::ARCH {
            "x86_64" => "x86_64",
            "x86" => "i386",
            "aarch64" => "aarch64",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            "mips64" => "mips64el",
            "loongarch64" => "loongarch64",
            _ => return None,
        };
        ARCHES.iter().find(|a| a.qemu == q)
    }

    /// The first 20 bytes of an executable (`ET_EXEC`) of this machine:
    /// what binfmt_misc matches magic and mask against.
    pub fn elf_header(&self) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = if self.class64 { 2 } else { 1 };
        h[5] = if self.big_endian { 2 } else { 1 };
        h[6] = 1; // EV_CURRENT
        let (t, m) = if self.big_endian {
            (2u16.to_be_bytes(), self.machine.to_be_bytes())
        } else {
            (2u16.to_le_bytes(), self.machine.to_le_bytes())
        };
        h[16..18].copy_from_slice(&t);
        h[18..20].copy_from_slice(&m);
        h
    }

    /// Whether the host kernel runs this machine's binaries without
    /// emulation (its own, and the 32-bit compat of amd64).
    pub fn is_native(&self) -> bool {
        match ElfArch::host() {
            Some(h) if h == self => true,
            Some(h) => h.oci == "amd64" && self.oci == "386",
            None => false,
        }
    }
}

/// One binfmt_misc entry, as `/proc/sys/fs/binfmt_misc/<name>` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinfmtEntry {
    /// The entry's file name.
    pub name: String,
    /// `enabled` (else `disabled`).
    pub enabled: bool,
    /// The interpreter path given at registration.
    pub interpreter: PathBuf,
    /// Flags (`F`, `C`, `O`, `P`).
    pub flags: String,
    /// Offset of the magic.
    pub offset: usize,
    /// Magic bytes (`None` for an extension entry).
    pub magic: Option<Vec<u8>>,
    /// Mask (all ones when absent).
    pub mask: Option<Vec<u8>>,
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) || s.len() > 2 * MAX_MAGIC {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl BinfmtEntry {
    /// Parses an entry's text; `None` when it is not a well-formed entry.
    pub fn parse(name: &str, text: &str) -> Option<BinfmtEntry> {
        let mut lines = text.lines();
        let enabled = match lines.next()? {
            "enabled" => true,
            "disabled" => false,
            _ => return None,
        };
        let mut e = BinfmtEntry {
            name: name.to_string(),
            enabled,
            interpreter: PathBuf::new(),
            flags: String::new(),
            offset: 0,
            magic: None,
            mask: None,
        };
        let mut have_interpreter = false;
        for l in lines {
            if let Some(v) = l.strip_prefix("interpreter ") {
                e.interpreter = PathBuf::from(v);
                have_interpreter = true;
            } else if let Some(v) = l.strip_prefix("flags:") {
                e.flags = v.trim().to_string();
            } else if let Some(v) = l.strip_prefix("offset ") {
                e.offset = v.trim().parse().ok().filter(|o| *o <= MAX_MAGIC)?;
            } else if let Some(v) = l.strip_prefix("magic ") {
                e.magic = Some(hex_bytes(v.trim())?);
            } else if let Some(v) = l.strip_prefix("mask ") {
                e.mask = Some(hex_bytes(v.trim())?);
            }
        }
        if !have_interpreter {
            return None;
        }
        if let (Some(m), Some(k)) = (&e.magic, &e.mask) {
            if m.len() != k.len() {
                return None;
            }
        }
        Some(e)
    }

    /// Whether the kernel would hand a file starting with `header` to this
    /// entry (magic entries only).
    pub fn matches(&self, header: &[u8]) -> bool {
        let Some(magic) = &self.magic else {
            return false;
        };
        if magic.is_empty() {
            return false;
        }
        let Some(window) = header.get(self.offset..self.offset + magic.len()) else {
            return false;
        };
        window.iter().enumerate().all(|(i, b)| {
            let m = self
                .mask
                .as_ref()
                .and_then(|k| k.get(i))
                .copied()
                .unwrap_or(0xff);
            b & m == magic[i] & m
        })
    }

    /// Whether the `F` flag is set.
    pub fn fix_binary(&self) -> bool {
        self.flags.contains('F')
    }
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    let f = std::fs::File::open(path)?;
    let mut s = String::new();
    f.take(MAX_ENTRY_SIZE).read_to_string(&mut s)?;
    Ok(s)
}

/// The state of binfmt_misc at `mount`: whether it is enabled, and its
/// well-formed entries (at most 1024; malformed ones skipped).
pub fn entries(mount: &Path) -> Result<(bool, Vec<BinfmtEntry>), std::io::Error> {
    let status = read_bounded(&mount.join("status"))?;
    let enabled = status.trim() == "enabled";
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(mount)?
        .filter_map(|d| d.ok())
        .filter_map(|d| d.file_name().into_string().ok())
        .filter(|n| n != "register" && n != "status")
        .take(MAX_ENTRIES)
        .collect();
    names.sort();
    for n in names {
        if let Ok(text) = read_bounded(&mount.join(&n)) {
            if let Some(e) = BinfmtEntry::parse(&n, &text) {
                out.push(e);
            }
        }
    }
    Ok((enabled, out))
}

/// How a platform's binaries run here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emulation {
    /// Natively.
    Native,
    /// Through this binfmt_misc handler (with `F`).
    Handler(BinfmtEntry),
}

fn platform_str(os: &str, arch: &str, variant: Option<&str>) -> String {
    match variant {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    }
}

/// Whether a RUN step for `os/architecture[/variant]` can run here, with
/// binfmt_misc mounted at [`BINFMT_MISC`].
pub fn check(
    os: &str,
    architecture: &str,
    variant: Option<&str>,
) -> Result<Emulation, EmulationError> {
    check_at(Path::new(BINFMT_MISC), os, architecture, variant)
}

/// [`check`] with binfmt_misc at `mount` (tests point it at a directory).
pub fn check_at(
    mount: &Path,
    os: &str,
    architecture: &str,
    variant: Option<&str>,
) -> Result<Emulation, EmulationError> {
    let platform = platform_str(os, architecture, variant);
    if os != "linux" {
        return Err(EmulationError::NotLinux {
            platform,
            os: os.to_string(),
        });
    }
    let arch =
        ElfArch::from_oci(architecture).ok_or_else(|| EmulationError::UnknownArchitecture {
            platform: platform.clone(),
            architecture: architecture.to_string(),
        })?;
    if arch.is_native() {
        return Ok(Emulation::Native);
    }
    let (enabled, list) = entries(mount).map_err(|e| EmulationError::NotMounted {
        platform: platform.clone(),
        mount: mount.to_path_buf(),
        reason: e.to_string(),
    })?;
    if !enabled {
        return Err(EmulationError::Disabled {
            platform,
            mount: mount.to_path_buf(),
        });
    }
    let header = arch.elf_header();
    let matching: Vec<&BinfmtEntry> = list
        .iter()
        .filter(|e| e.enabled && e.matches(&header))
        .collect();
    if let Some(e) = matching.iter().find(|e| e.fix_binary()) {
        // As root, only an interpreter kiln pinned read-only (a user
        // namespace's root does not own the host's file).
        if !kiln_fs::idmap::IdMaps::current().in_userns && !e.interpreter.starts_with(PINNED_DIR) {
            return Err(EmulationError::WritableInterpreter {
                platform,
                name: e.name.clone(),
                interpreter: e.interpreter.clone(),
            });
        }
        return Ok(Emulation::Handler((*e).clone()));
    }
    match matching.first() {
        Some(e) => Err(EmulationError::NotFixBinary {
            platform,
            elf: arch.qemu,
            name: e.name.clone(),
            interpreter: e.interpreter.clone(),
        }),
        None => Err(EmulationError::NoHandler {
            platform,
            elf: arch.qemu,
        }),
    }
}

/// A binary format as Debian's `update-binfmts` files describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatFile {
    /// The interpreter named by the file.
    pub interpreter: PathBuf,
    /// The magic, as the file writes it (`\x7f\x45…`, binfmt_misc's
    /// register syntax).
    pub magic: String,
    /// The mask, in the same syntax.
    pub mask: String,
    /// The offset.
    pub offset: usize,
}

fn escaped_ok(s: &str) -> bool {
    // binfmt_misc's register line is ':'-separated; the files write bytes
    // as \xNN escapes.
    !s.is_empty() && s.len() <= 4 * MAX_MAGIC && !s.contains(':') && s.is_ascii()
}

/// Parses an `update-binfmts` format file (`/usr/share/binfmts/qemu-*`).
pub fn parse_format_file(path: &Path) -> Result<FormatFile, EmulationError> {
    let text = read_bounded(path).map_err(io("reading", path))?;
    let bad = |detail: &str| EmulationError::BadFormatFile {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    };
    let mut interpreter = None;
    let mut magic = None;
    let mut mask = None;
    let mut offset = 0usize;
    for l in text.lines() {
        let (k, v) = match l.split_once(' ') {
            Some((k, v)) => (k, v.trim()),
            None => continue,
        };
        match k {
            "interpreter" => interpreter = Some(PathBuf::from(v)),
            "magic" => magic = Some(v.to_string()),
            "mask" => mask = Some(v.to_string()),
            "offset" => offset = v.parse().map_err(|_| bad("offset is not a number"))?,
            _ => {}
        }
    }
    let interpreter = interpreter.ok_or_else(|| bad("no interpreter line"))?;
    let magic = magic.ok_or_else(|| bad("no magic line"))?;
    let mask = mask.unwrap_or_default();
    if !escaped_ok(&magic) || !(mask.is_empty() || escaped_ok(&mask)) || offset > MAX_MAGIC {
        return Err(bad("magic, mask or offset out of binfmt_misc's syntax"));
    }
    Ok(FormatFile {
        interpreter,
        magic,
        mask,
        offset,
    })
}

/// What [`install`] did for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The ELF machine.
    pub arch: &'static ElfArch,
    /// The entry name (`qemu-aarch64`).
    pub name: String,
    /// The interpreter registered.
    pub interpreter: PathBuf,
    /// The flags registered.
    pub flags: String,
    /// False when an equal registration was there already.
    pub changed: bool,
}

/// Mounts binfmt_misc at `mount` when its `status` file is missing.
pub fn ensure_mounted(mount: &Path) -> Result<(), EmulationError> {
    if mount.join("status").exists() {
        return Ok(());
    }
    nix::mount::mount(
        Some("binfmt_misc"),
        mount,
        Some("binfmt_misc"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| EmulationError::Io {
        what: "mounting binfmt_misc at",
        path: mount.to_path_buf(),
        source: std::io::Error::from(e),
    })
}

/// The interpreter and flags to register for `arch`: `/usr/bin/qemu-<arch>-static`
/// with `F`, else the format file's own interpreter (Debian's
/// `…-binfmt-P` wrapper wants `P` as well). Never `C` (see the module
/// doc).
fn choose_interpreter(
    arch: &'static ElfArch,
    ff: &FormatFile,
) -> Result<(PathBuf, String), EmulationError> {
    let plain = PathBuf::from(format!("/usr/bin/qemu-{}-static", arch.qemu));
    if plain.is_file() {
        return Ok((plain, "F".to_string()));
    }
    if ff.interpreter.exists() {
        let p = ff
            .interpreter
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with("-binfmt-P"));
        return Ok((
            ff.interpreter.clone(),
            if p { "FP" } else { "F" }.to_string(),
        ));
    }
    Err(EmulationError::NoInterpreter {
        elf: arch.qemu,
        looked: plain,
    })
}

/// Where `kiln system binfmt` puts the interpreters it registers: each a
/// read-only, nosuid bind mount of the installed file. With `F` the
/// kernel keeps the file it opened at registration, and an emulated
/// process's `/proc/self/exe` is that file: on the host's writable mount
/// a step running as root (the file's owner) could `chmod 4755` it — any
/// local user then had root through a setuid QEMU.
pub const PINNED_DIR: &str = "/run/kiln/binfmt";

/// A read-only, nosuid bind mount of `interpreter` at
/// `PINNED_DIR/<its name>` (made once; kept until reboot, as the
/// registration).
fn pinned(interpreter: &Path) -> Result<PathBuf, EmulationError> {
    let name = interpreter.file_name().ok_or_else(|| EmulationError::Io {
        what: "naming",
        path: interpreter.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let dir = Path::new(PINNED_DIR);
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io("creating", dir))?;
    let at = dir.join(name);
    // Already there: the same file, on a read-only mount.
    let mounted = || -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(a), Ok(i)) = (std::fs::metadata(&at), std::fs::metadata(interpreter)) else {
            return false;
        };
        (a.dev(), a.ino()) == (i.dev(), i.ino())
            && nix::sys::statvfs::statvfs(&at)
                .is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
    };
    if mounted() {
        return Ok(at);
    }
    if std::fs::symlink_metadata(&at).is_err() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&at)
            .map_err(io("creating", &at))?;
    }
    nix::mount::mount(
        Some(interpreter),
        &at,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| EmulationError::Io {
        what: "bind-mounting the interpreter at",
        path: at.clone(),
        source: std::io::Error::from(e),
    })?;
    nix::mount::mount(
        None::<&str>,
        &at,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND
            | nix::mount::MsFlags::MS_REMOUNT
            | nix::mount::MsFlags::MS_RDONLY
            | nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| EmulationError::Io {
        what: "making the interpreter read-only at",
        path: at.clone(),
        source: std::io::Error::from(e),
    })?;
    Ok(at)
}

/// Registers every installed QEMU user-mode interpreter (for the
/// architectures in [`ARCHES`] the host does not run natively) with the
/// `F` flag. Idempotent: an equal registration is left alone, a
/// different one of the same name (without `F`, or with `C`) is
/// replaced.
/// Architectures without an installed interpreter or format file are
/// left out. Needs root.
pub fn install(mount: &Path, formats: &Path) -> Result<Vec<Registration>, EmulationError> {
    install_with(mount, formats, true)
}

/// [`install`]; `pin`: register read-only copies under [`PINNED_DIR`]
/// (tests of the registration itself leave it out).
pub fn install_with(
    mount: &Path,
    formats: &Path,
    pin: bool,
) -> Result<Vec<Registration>, EmulationError> {
    ensure_mounted(mount)?;
    let status = mount.join("status");
    if read_bounded(&status)
        .map_err(io("reading", &status))?
        .trim()
        != "enabled"
    {
        std::fs::write(&status, "1").map_err(io("enabling", &status))?;
    }
    let mut done = Vec::new();
    for arch in ARCHES.iter().filter(|a| !a.is_native()) {
        let file = formats.join(format!("qemu-{}", arch.qemu));
        if !file.is_file() {
            continue;
        }
        let ff = parse_format_file(&file)?;
        let (interpreter, flags) = match choose_interpreter(arch, &ff) {
            Ok(x) => x,
            Err(EmulationError::NoInterpreter { .. }) => continue,
            Err(e) => return Err(e),
        };
        // Registered from a read-only copy (see `PINNED_DIR`).
        let interpreter = if pin {
            pinned(&interpreter)?
        } else {
            interpreter
        };
        let interp_str = interpreter.to_string_lossy().into_owned();
        if interp_str.contains(':') || interp_str.contains('\n') {
            return Err(EmulationError::BadFormatFile {
                path: file,
                detail: "interpreter path contains ':' or a newline".into(),
            });
        }
        let name = format!("qemu-{}", arch.qemu);
        let entry_path = mount.join(&name);
        if let Ok(text) = read_bounded(&entry_path) {
            if let Some(e) = BinfmtEntry::parse(&name, &text) {
                let same_flags =
                    flags.chars().all(|c| e.flags.contains(c)) && !e.flags.contains('C');
                if e.enabled && e.interpreter == interpreter && same_flags {
                    done.push(Registration {
                        arch,
                        name,
                        interpreter,
                        flags: e.flags,
                        changed: false,
                    });
                    continue;
                }
            }
            std::fs::write(&entry_path, "-1").map_err(io("removing", &entry_path))?;
        }
        let line = format!(
            ":{name}:M:{}:{}:{}:{interp_str}:{flags}",
            ff.offset, ff.magic, ff.mask
        );
        let register = mount.join("register");
        std::fs::write(&register, line).map_err(io("writing", &register))?;
        done.push(Registration {
            arch,
            name,
            interpreter,
            flags,
            changed: true,
        });
    }
    Ok(done)
}

/// Removes the `qemu-<arch>` entries of [`ARCHES`]; returns their names.
pub fn uninstall(mount: &Path) -> Result<Vec<String>, EmulationError> {
    let mut removed = Vec::new();
    for arch in ARCHES {
        let name = format!("qemu-{}", arch.qemu);
        let p = mount.join(&name);
        if p.exists() {
            std::fs::write(&p, "-1").map_err(io("removing", &p))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AARCH64_F: &str = "enabled\ninterpreter /usr/bin/qemu-aarch64-static\nflags: OCF\noffset 0\nmagic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n";

    fn fake(entries: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::write(d.path().join("status"), "enabled\n").expect("w");
        std::fs::write(d.path().join("register"), "").expect("w");
        for (n, t) in entries {
            std::fs::write(d.path().join(n), t).expect("w");
        }
        d
    }

    fn host_is_amd64() -> bool {
        std::env::consts::ARCH == "x86_64"
    }

    #[test]
    fn an_aarch64_handler_with_f_makes_arm64_runnable() {
        if !host_is_amd64() {
            return;
        }
        // As root, only a handler pinned read-only under PINNED_DIR.
        let pinned = AARCH64_F.replace(
            "/usr/bin/qemu-aarch64-static",
            &format!("{PINNED_DIR}/qemu-aarch64-static"),
        );
        let d = fake(&[("qemu-aarch64", &pinned)]);
        match check_at(d.path(), "linux", "arm64", Some("v8")).expect("ok") {
            Emulation::Handler(e) => assert_eq!(e.name, "qemu-aarch64"),
            other => panic!("{other:?}"),
        }
        let writable = fake(&[("qemu-aarch64", AARCH64_F)]);
        if !kiln_fs::idmap::IdMaps::current().in_userns {
            let e = check_at(writable.path(), "linux", "arm64", Some("v8"))
                .expect_err("a writable interpreter");
            assert!(
                e.to_string().contains("where a step running as root"),
                "{e}"
            );
        }
        // …but not arm (32-bit): another machine.
        let e = check_at(d.path(), "linux", "arm", Some("v7")).expect_err("no arm");
        assert!(
            e.to_string().contains("no binfmt_misc handler for arm ELF"),
            "{e}"
        );
        assert!(e.to_string().contains("kiln system binfmt"), "{e}");
    }

    #[test]
    fn a_handler_without_f_is_reported_with_its_interpreter() {
        if !host_is_amd64() {
            return;
        }
        let d = fake(&[("qemu-aarch64", &AARCH64_F.replace("flags: OCF", "flags: P"))]);
        let e = check_at(d.path(), "linux", "arm64", None).expect_err("no F");
        let s = e.to_string();
        assert!(s.contains("without the F flag"), "{s}");
        assert!(s.contains("/usr/bin/qemu-aarch64-static"), "{s}");
    }

    #[test]
    fn disabled_entries_and_a_disabled_binfmt_misc_do_not_count() {
        if !host_is_amd64() {
            return;
        }
        let d = fake(&[(
            "qemu-aarch64",
            &AARCH64_F.replace("enabled\n", "disabled\n"),
        )]);
        assert!(matches!(
            check_at(d.path(), "linux", "arm64", None),
            Err(EmulationError::NoHandler { .. })
        ));
        let d = fake(&[("qemu-aarch64", AARCH64_F)]);
        std::fs::write(d.path().join("status"), "disabled\n").expect("w");
        assert!(matches!(
            check_at(d.path(), "linux", "arm64", None),
            Err(EmulationError::Disabled { .. })
        ));
    }

    #[test]
    fn native_platforms_need_nothing_and_a_missing_mount_is_named() {
        let host = ElfArch::host().expect("known host");
        let missing = Path::new("/nonexistent/binfmt_misc");
        assert_eq!(
            check_at(missing, "linux", host.oci, None).expect("native"),
            Emulation::Native
        );
        if host_is_amd64() {
            let e = check_at(missing, "linux", "arm64", None).expect_err("not mounted");
            assert!(e.to_string().contains("binfmt_misc is not mounted"), "{e}");
        }
        assert!(matches!(
            check_at(missing, "linux", "sparc-ish", None),
            Err(EmulationError::UnknownArchitecture { .. })
        ));
        assert!(matches!(
            check_at(missing, "windows", "amd64", None),
            Err(EmulationError::NotLinux { .. })
        ));
    }

    #[test]
    fn malformed_entries_are_skipped_not_trusted() {
        if !host_is_amd64() {
            return;
        }
        let long = "enabled\ninterpreter /x\nflags: F\noffset 0\nmagic ".to_string()
            + &"7f".repeat(10_000)
            + "\n";
        let d = fake(&[
            ("odd-hex", "enabled\ninterpreter /x\nflags: F\nmagic 7f4\n"),
            ("bad-hex", "enabled\ninterpreter /x\nflags: F\nmagic zz\n"),
            ("no-interp", "enabled\nflags: F\nmagic 7f454c46\n"),
            ("garbage", "\u{0}\u{1}binary"),
            (
                "mask-len",
                "enabled\ninterpreter /x\nflags: F\nmagic 7f454c46\nmask ff\n",
            ),
            (
                "huge-offset",
                "enabled\ninterpreter /x\nflags: F\noffset 99999999999\nmagic 7f\n",
            ),
            ("empty-magic", "enabled\ninterpreter /x\nflags: F\nmagic \n"),
            ("long", &long),
            (
                "python3.11",
                "enabled\ninterpreter /usr/bin/python3.11\nflags: \noffset 0\nmagic a70d0d0a\n",
            ),
            (
                "extension",
                "enabled\ninterpreter /usr/bin/wine\nflags: F\nextension .exe\n",
            ),
        ]);
        assert!(matches!(
            check_at(d.path(), "linux", "arm64", None),
            Err(EmulationError::NoHandler { .. })
        ));
        let (_, list) = entries(d.path()).expect("entries");
        let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["extension", "python3.11"]);
    }

    #[test]
    fn elf_headers_match_debians_masks() {
        // The qemu-user-static magic/mask for aarch64 and arm (ET_EXEC and ET_DYN).
        let e = BinfmtEntry::parse("q", AARCH64_F).expect("parse");
        let a = ElfArch::from_oci("arm64").expect("arm64");
        assert!(e.matches(&a.elf_header()));
        let mut dyn_ = a.elf_header();
        dyn_[16] = 3;
        assert!(e.matches(&dyn_));
        assert!(!e.matches(&ElfArch::from_oci("amd64").expect("x").elf_header()));
        assert!(!e.matches(&a.elf_header()[..10]));
    }

    /// `install` registers with `F` and never `C`, and replaces a
    /// registration of the same name that has `C` (kiln's own earlier
    /// ones did: a setuid foreign binary then ran QEMU as its owner).
    #[test]
    fn install_registers_without_credentials_and_replaces_a_c_entry() {
        if ElfArch::from_oci("arm64").expect("arm64").is_native() {
            return;
        }
        let mount = fake(&[("qemu-aarch64", AARCH64_F)]);
        let formats = tempfile::tempdir().expect("tmp");
        let interp = formats.path().join("qemu-aarch64-fake");
        std::fs::write(&interp, "").expect("w");
        std::fs::write(
            formats.path().join("qemu-aarch64"),
            format!(
                "package qemu-user-static\ninterpreter {}\nmagic \\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00\noffset 0\nmask \\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff\ncredentials no\n",
                interp.display()
            ),
        )
        .expect("w");
        let done = install_with(mount.path(), formats.path(), false).expect("install");
        let r = done
            .iter()
            .find(|r| r.name == "qemu-aarch64")
            .expect("registered");
        assert!(r.changed, "the C registration was kept");
        assert!(
            r.flags.contains('F') && !r.flags.contains('C'),
            "{}",
            r.flags
        );
        let line = std::fs::read_to_string(mount.path().join("register")).expect("r");
        assert!(line.starts_with(":qemu-aarch64:M:"), "{line}");
        let flags = line.rsplit(':').next().expect("flags");
        assert!(flags.contains('F') && !flags.contains('C'), "{line}");
    }

    #[test]
    fn format_files_parse_and_hostile_ones_are_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let ok = d.path().join("qemu-aarch64");
        std::fs::write(&ok, "package qemu-user-static\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nmagic \\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00\noffset 0\nmask \\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff\ncredentials no\nfix_binary yes\npreserve yes\n").expect("w");
        let f = parse_format_file(&ok).expect("parse");
        assert!(f.magic.starts_with("\\x7f\\x45"));
        assert_eq!(f.offset, 0);
        let bad = d.path().join("bad");
        std::fs::write(&bad, "interpreter /x\nmagic \\x7f:evil:\n").expect("w");
        assert!(parse_format_file(&bad).is_err());
        std::fs::write(&bad, "magic \\x7f\n").expect("w");
        assert!(parse_format_file(&bad).is_err());
    }
}
