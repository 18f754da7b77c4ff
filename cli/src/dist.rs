//! What a distributed kiln says about itself: `kiln version` (docker's
//! `key: value` layout, or a Go template), `kiln completion bash|zsh|fish`
//! and `kiln man` (the roff page). The commit and build date come from the
//! environment of the build (`KILN_GIT_COMMIT`, `KILN_BUILD_DATE`, as
//! `scripts/release.sh` sets them; no build script).

use std::process::ExitCode;

use clap::CommandFactory;

/// `kiln version` flags.
#[derive(clap::Args, Debug)]
pub struct VersionArgs {
    /// A Go template over `{{.Client.Version}}`, `.GitCommit`, `.BuildTime`,
    /// `.Os`, `.Arch`, `.RustVersion`; or `json`.
    #[arg(short, long, value_name = "TEMPLATE")]
    format: Option<String>,
}

/// The shells `kiln completion` writes for.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Shell {
    /// bash (source it, or put it in /usr/share/bash-completion/completions/kiln).
    Bash,
    /// zsh (put it as `_kiln` in a directory of `$fpath`).
    Zsh,
    /// fish (put it in ~/.config/fish/completions/kiln.fish).
    Fish,
}

fn client() -> serde_json::Value {
    serde_json::json!({
        "Version": env!("CARGO_PKG_VERSION"),
        "GitCommit": option_env!("KILN_GIT_COMMIT").unwrap_or("unknown"),
        "BuildTime": option_env!("KILN_BUILD_DATE").unwrap_or("unknown"),
        "RustVersion": option_env!("KILN_RUSTC_VERSION").unwrap_or("unknown"),
        "Os": std::env::consts::OS,
        "Arch": match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            a => a,
        },
    })
}

/// `kiln version`.
pub fn version(a: VersionArgs) -> anyhow::Result<ExitCode> {
    let c = client();
    let all = serde_json::json!({ "Client": c });
    match a.format.as_deref() {
        Some("json") => outln!("{all}"),
        Some(t) => {
            let t = crate::gotemplate::Template::parse(t)
                .map_err(|e| crate::build_cmd::usage(e.to_string()))?;
            let out = t
                .render(&all)
                .map_err(|e| crate::build_cmd::usage(e.to_string()))?;
            outln!("{out}");
        }
        None => {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            outln!("Client: kiln");
            outln!(" Version:           {}", s("Version"));
            outln!(" Rust version:      {}", s("RustVersion"));
            outln!(" Git commit:        {}", s("GitCommit"));
            outln!(" Built:             {}", s("BuildTime"));
            outln!(" OS/Arch:           {}/{}", s("Os"), s("Arch"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln completion SHELL`: the completion script on stdout.
pub fn completion(shell: Shell) -> anyhow::Result<ExitCode> {
    let mut cmd = crate::Cli::command();
    let mut out = Vec::new();
    let sh = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(sh, &mut cmd, "kiln", &mut out);
    write_all(&out);
    Ok(ExitCode::SUCCESS)
}

/// `kiln man`: the kiln(1) page (roff) on stdout.
pub fn man() -> anyhow::Result<ExitCode> {
    let cmd = crate::Cli::command();
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut out)
        .map_err(|e| anyhow::anyhow!("rendering the man page: {e}"))?;
    write_all(&out);
    Ok(ExitCode::SUCCESS)
}

fn write_all(b: &[u8]) {
    use std::io::Write as _;
    if let Err(e) = std::io::stdout().lock().write_all(b) {
        crate::stdout_failed(e)
    }
}
