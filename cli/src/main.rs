//! The `kiln` command line: argument parsing, rendering and exit codes.
//! The engine lives in the library crates; this binary is glue.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` for command output: a closed stdout (`kiln images | head`)
/// ends kiln quietly with status 141 (128 + SIGPIPE, what a shell shows
/// for docker, whose writes die of SIGPIPE) instead of panicking.
macro_rules! outln {
    () => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock()) {
            $crate::stdout_failed(e)
        }
    }};
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let text = format!($($t)*);
        let text = $crate::term::shown(&text, $crate::term::stdout_tty());
        if let Err(e) = writeln!(std::io::stdout().lock(), "{text}") {
            $crate::stdout_failed(e)
        }
    }};
}

mod build_cmd;
mod build_flags;
mod dist;
mod gotemplate;
mod image_cmds;
mod mgmt;
mod progress;
mod registry_cmds;
mod run_io;
mod signals;
mod store_cmds;
mod term;

/// An error in how kiln was called: exit status 2, like a clap error.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// kiln: a daemonless, BuildKit-class Dockerfile build engine.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about, propagate_version = true)]
struct Cli {
    /// Store root (default: $KILN_ROOT unless empty, else /var/lib/kiln
    /// as root).
    #[arg(long, global = true, env = "KILN_ROOT", value_name = "DIR")]
    root: Option<PathBuf>,
    /// Verbose diagnostics on stderr (also `KILN_DEBUG=1`; `RUST_LOG`
    /// filters them).
    #[arg(long, global = true)]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build an image from a Dockerfile and a context directory.
    Build(Box<build_cmd::BuildArgs>),
    /// List images.
    Images(image_cmds::ImagesArgs),
    /// Show images' configuration as JSON (or through a Go template).
    Inspect(image_cmds::InspectArgs),
    /// Show the history of an image.
    History(image_cmds::HistoryArgs),
    /// Give an image another name.
    Tag(image_cmds::TagArgs),
    /// Remove image names (the data goes with the next prune).
    Rmi(image_cmds::RmiArgs),
    /// docker's `image` spellings: `image ls|rm|inspect|prune|history|tag|
    /// save|load|import|push|pull|build`.
    Image {
        #[command(subcommand)]
        what: mgmt::ImageCommand,
    },
    /// docker's `builder` spellings: `builder prune|build`.
    Builder {
        #[command(subcommand)]
        what: mgmt::BuilderCommand,
    },
    /// buildx spellings: `buildx build` (also `buildx b`), `buildx prune`.
    Buildx {
        #[command(subcommand)]
        what: mgmt::BuildxCommand,
    },
    /// Run a command in a new container from an image.
    Run(Box<image_cmds::RunArgs>),
    /// Save images to a tar archive (docker-archive or OCI layout).
    Save(image_cmds::SaveArgs),
    /// Load images from a docker-archive or OCI archive (gzip too).
    Load(store_cmds::LoadArgs),
    /// Import a root filesystem tar as a one-layer image.
    Import(store_cmds::ImportArgs),
    /// Remove unreferenced data and, per policy, build cache.
    Prune(store_cmds::PruneArgs),
    /// Pull an image from a registry into the store.
    Pull(registry_cmds::PullArgs),
    /// Push an image from the store to a registry.
    Push(registry_cmds::PushArgs),
    /// Log in to a registry (credentials go to Docker's config.json).
    Login(registry_cmds::LoginArgs),
    /// Log out from a registry.
    Logout(registry_cmds::LogoutArgs),
    /// Write an image's final filesystem as one tar.
    Export(image_cmds::ExportArgs),
    /// Store-wide tools: disk usage, consistency check.
    System {
        #[command(subcommand)]
        what: store_cmds::SystemCommand,
    },
    /// Show kiln's version, commit and build date (docker's layout).
    Version(dist::VersionArgs),
    /// Print a shell completion script (bash, zsh, fish).
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: dist::Shell,
    },
    /// Print the kiln(1) man page (roff).
    Man,
    /// Run a command (default: $SHELL) in the user and mount namespace a
    /// rootless kiln builds in, as `buildah unshare` does (as root: just
    /// runs it).
    Unshare {
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Tools for looking inside kiln.
    Debug {
        #[command(subcommand)]
        what: DebugCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DebugCommand {
    /// Print a Dockerfile's AST in BuildKit's dump format (or typed JSON).
    Ast {
        /// The Dockerfile; stdin when omitted or `-`.
        file: Option<PathBuf>,
        /// Print the typed instructions as JSON instead.
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// Whether the command runs in the rootless user namespace (when kiln
    /// is not run by root): everything that touches the store or runs
    /// steps. Registry logins edit the user's own files as the user.
    fn in_namespace(&self) -> bool {
        !matches!(
            self,
            Command::Login(_) | Command::Logout(_) | Command::Debug { .. }
        )
    }
}

/// Exit status of a command whose stdout was closed under it.
pub const EXIT_STDOUT_CLOSED: u8 = 141;

/// Ends kiln after a failed write to stdout: quietly with
/// [`EXIT_STDOUT_CLOSED`] when the reader went away (EPIPE), else with the
/// error and status 1.
pub fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(EXIT_STDOUT_CLOSED.into());
    }
    eprintln!("error: writing to stdout: {e}");
    std::process::exit(1)
}

/// Whether `e` comes from writing to a pipe whose reader is gone.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let io = c.downcast_ref::<std::io::Error>().or_else(|| match c
            .downcast_ref::<kiln_solver::image::ImageError>()
        {
            Some(kiln_solver::image::ImageError::Io(io)) => Some(io),
            _ => None,
        });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A backstop for output written with `println!`/`eprintln!` (which panic
/// on a closed pipe): such a panic ends kiln quietly with
/// [`EXIT_STDOUT_CLOSED`]; every other panic keeps the default report.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if (msg.starts_with("failed printing to stdout")
            || msg.starts_with("failed printing to stderr"))
            && msg.contains("Broken pipe")
        {
            std::process::exit(EXIT_STDOUT_CLOSED.into());
        }
        default(info)
    }));
}

fn main() -> ExitCode {
    // The sandbox's init re-executes this binary: handle that before
    // anything else (and before any thread exists).
    kiln_executor::maybe_run_init();
    quiet_on_closed_pipe();
    // `KILN_ROOT=` (set but empty) is unset, as docker treats its empty
    // variables (`DOCKER_HOST=`): the default store, not clap's "a value
    // is required for --root". Still one thread here.
    if std::env::var_os("KILN_ROOT").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("KILN_ROOT");
    }
    // Every thread's stack (std reads this once, at the first spawn) room
    // for the walks of a layer's tree, which recurse per level, down to
    // `kiln_image::diff::MAX_TREE_DEPTH` (a deep tree a step made
    // overflowed a 2 MiB stack). Address space only until used.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", kiln_solver::copy::DEEP_STACK.to_string());
    }
    let mut cli = Cli::parse();
    // The default store is the calling user's: chosen before entering the
    // user namespace, where this process is root.
    if cli.root.is_none() {
        match kiln_solver::cache::default_root() {
            Ok(r) => cli.root = Some(r),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if cli.command.in_namespace() {
        // Before any thread: this forks when run by an ordinary user.
        if let Err(e) = kiln_executor::userns::enter(&mut |w| eprintln!("warning: {w}")) {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    }
    init_logging(cli.debug);
    match run(cli) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            let text = chain_text(&e);
            eprintln!("error: {}", term::shown(&text, term::stderr_tty()));
            ExitCode::from(2)
        }
        Err(e) => {
            // An error may quote what an image, archive or registry said.
            let text = chain_text(&e);
            eprintln!("error: {}", term::shown(&text, term::stderr_tty()));
            ExitCode::from(1)
        }
    }
}

/// With `--debug` or `KILN_DEBUG` (set, not empty or `0`): the library's
/// `tracing` spans and events (build start and end, each step started,
/// cached or done, pulls, pushes, exports, cache imports and exports) go
/// to stderr, at debug level unless `RUST_LOG` says otherwise. Without
/// it nothing is logged.
fn init_logging(debug: bool) {
    let env = std::env::var("KILN_DEBUG").is_ok_and(|v| !v.is_empty() && v != "0");
    if !(debug || env) {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(
            "kiln=debug,kiln_solver=debug,kiln_cache=debug,kiln_image=debug,kiln_registry=debug,kiln_executor=debug",
        ));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// An error and its causes, `: `-joined as anyhow's `{:#}` does, but
/// without the causes whose text a message before them already includes
/// (many errors quote their source: the chain would say it twice or
/// three times).
pub fn chain_text(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for c in e.chain() {
        let t = c.to_string();
        if msg.contains(&t) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&t);
    }
    msg
}

/// A library session on the store at `root`, reporting on stderr (notes
/// only unless `quiet`).
pub fn session(
    root: &std::path::Path,
    quiet: bool,
) -> anyhow::Result<kiln_solver::session::Session> {
    Ok(kiln_solver::session::Session::open(root)
        .map_err(build_cmd::facade_error)?
        .with_reporter(std::sync::Arc::new(registry_cmds::CliReporter::new(quiet))))
}

/// An error of the library's image operations: its message and those of
/// its causes that it does not already include; a usage error exits 2.
pub fn lib_error(e: kiln_solver::images::Error) -> anyhow::Error {
    let mut msg = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(c) = cur {
        let t = c.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        cur = c.source();
    }
    if e.is_usage() {
        anyhow::Error::new(UsageError(msg))
    } else {
        anyhow::Error::msg(msg)
    }
}

/// The store root: `--root`, else `$KILN_ROOT` (clap reads both), else the
/// default for this user.
fn store_root(root: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match root {
        Some(r) => Ok(r),
        None => Ok(kiln_solver::cache::default_root()?),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Build(args) => build_cmd::run(&store_root(cli.root)?, *args),
        Command::Images(args) => image_cmds::images(&store_root(cli.root)?, args),
        Command::Inspect(args) => image_cmds::inspect(&store_root(cli.root)?, args),
        Command::History(args) => image_cmds::history(&store_root(cli.root)?, args),
        Command::Tag(args) => image_cmds::tag(&store_root(cli.root)?, args),
        Command::Rmi(args) => image_cmds::rmi(&store_root(cli.root)?, args),
        Command::Image { what } => mgmt::image(&store_root(cli.root)?, what),
        Command::Builder { what } => mgmt::builder(&store_root(cli.root)?, what),
        Command::Buildx { what } => mgmt::buildx(&store_root(cli.root)?, what),
        Command::Run(args) => image_cmds::run(&store_root(cli.root)?, *args),
        Command::Save(args) => image_cmds::save(&store_root(cli.root)?, args),
        Command::Load(args) => store_cmds::load(&store_root(cli.root)?, args),
        Command::Import(args) => store_cmds::import(&store_root(cli.root)?, args),
        Command::Prune(args) => store_cmds::prune(&store_root(cli.root)?, args),
        Command::Pull(args) => registry_cmds::pull(&store_root(cli.root)?, args),
        Command::Push(args) => registry_cmds::push(&store_root(cli.root)?, args),
        Command::Login(args) => registry_cmds::login(args),
        Command::Logout(args) => registry_cmds::logout(args),
        Command::Export(args) => image_cmds::export(&store_root(cli.root)?, args),
        Command::System { what } => store_cmds::system(&store_root(cli.root)?, what),
        Command::Version(args) => dist::version(args),
        Command::Completion { shell } => dist::completion(shell),
        Command::Man => dist::man(),
        Command::Unshare { command } => unshare(command),
        Command::Debug {
            what: DebugCommand::Ast { file, json },
        } => debug_ast(file, json),
    }
}

/// `kiln unshare`: runs `command` (default `$SHELL`, else `/bin/sh`) in
/// the namespace `main` entered, replacing kiln. A command that cannot
/// be run exits as a shell's (and `docker run`'s) would: 127 when it is
/// not found, 126 when it is there but cannot be executed.
fn unshare(command: Vec<std::ffi::OsString>) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt as _;
    let mut argv = command.into_iter();
    let prog = argv
        .next()
        .or_else(|| std::env::var_os("SHELL").filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "/bin/sh".into());
    let err = std::process::Command::new(&prog).args(argv).exec();
    eprintln!(
        "error: kiln unshare: running {}: {err}",
        std::path::Path::new(&prog).display()
    );
    Ok(ExitCode::from(exec_failure_status(&err)))
}

/// The exit status of a command that could not be executed: 127 when it
/// does not exist (or a directory of its path does not), else 126.
fn exec_failure_status(err: &std::io::Error) -> u8 {
    match err.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR) => 127,
        _ => 126,
    }
}

/// Reads a Dockerfile from a path, or stdin for `None` / `-`.
fn read_dockerfile(file: Option<&PathBuf>) -> anyhow::Result<(String, String)> {
    let limit = kiln_solver::context::MAX_DOCKERFILE;
    let mut bytes = Vec::new();
    let name = match file.filter(|f| f.as_os_str() != "-") {
        Some(path) => {
            std::fs::File::open(path)
                .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            path.display().to_string()
        }
        None => {
            std::io::stdin().take(limit + 1).read_to_end(&mut bytes)?;
            "Dockerfile".to_string()
        }
    };
    if bytes.len() as u64 > limit {
        anyhow::bail!("{name}: a Dockerfile is at most {} MiB", limit >> 20);
    }
    Ok((name, String::from_utf8_lossy(&bytes).into_owned()))
}

fn debug_ast(file: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let (name, text) = read_dockerfile(file.as_ref())?;
    match kiln_solver::debug_ast(&text, json) {
        Ok(s) => {
            outln!("{s}");
            Ok(ExitCode::SUCCESS)
        }
        Err(kiln_solver::DebugAstError::Parse(e)) => {
            let text = e.render(&name, &text);
            eprint!("{}", term::shown(&text, term::stderr_tty()));
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}
