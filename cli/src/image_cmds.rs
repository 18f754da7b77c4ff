//! Image commands that mirror docker's: `images`, `inspect`, `history`,
//! `tag`, `rmi`, `save`, `export`, and `run` to try an image right after
//! building it. The data comes from the library ([`Session`]); this is
//! flags, tables and exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kiln_solver::export::{ArchiveFormat, Dest};
use kiln_solver::image::manifest::Platform;
use kiln_solver::images::{familiar, Error as ImagesError, ImageInfo};
use kiln_solver::session::Session;

use crate::{lib_error, session, UsageError};

/// `kiln images` flags.
#[derive(clap::Args, Debug)]
pub struct ImagesArgs {
    /// Only show image IDs.
    #[arg(short, long)]
    quiet: bool,
    /// Show manifest digests.
    #[arg(long)]
    digests: bool,
    /// All images (kiln keeps no intermediate images: the same list).
    #[arg(short, long)]
    all: bool,
    /// Full image IDs.
    #[arg(long)]
    no_trunc: bool,
    /// `dangling=true|false`, `reference=GLOB`, `label=K[=V]`,
    /// `before=IMAGE`, `since=IMAGE`, `until=DURATION`; repeatable (all
    /// must hold; several `reference=` are alternatives).
    #[arg(short, long = "filter", value_name = "KEY=VALUE")]
    filter: Vec<String>,
    /// `table` (default), `json` (one object per line), or a Go template
    /// (`{{.Repository}}:{{.Tag}}`, `table {{.ID}}\t{{.Size}}`).
    #[arg(long, value_name = "FORMAT")]
    format: Option<String>,
    /// Only this repository (and tag).
    #[arg(value_name = "REPOSITORY[:TAG]")]
    repository: Option<String>,
}

/// `kiln tag` arguments.
#[derive(clap::Args, Debug)]
pub struct TagArgs {
    /// The existing image.
    source: String,
    /// The new name.
    target: String,
}

/// `kiln rmi` flags.
#[derive(clap::Args, Debug)]
pub struct RmiArgs {
    /// Remove every name of an image given by ID.
    #[arg(short, long)]
    force: bool,
    /// Accepted (data goes with the next prune anyway).
    #[arg(long)]
    no_prune: bool,
    /// Images.
    #[arg(required = true)]
    images: Vec<String>,
}

/// `kiln run` flags.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Remove the container when it exits (kiln never keeps containers).
    #[arg(long)]
    rm: bool,
    /// Run an init that forwards signals and reaps processes (kiln always
    /// does: the application is the child of kiln's PID 1, as under
    /// docker's `--init`).
    #[arg(long)]
    init: bool,
    /// Set an environment variable (`K=V`, or `K` from the environment).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Read environment variables from a file (docker's format: `K=V`
    /// lines, `#` comments, `K` alone from kiln's environment); before
    /// `-e`; repeatable.
    #[arg(long = "env-file", value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// Keep stdin open: the application reads kiln's stdin.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the application on a pseudo-terminal (its stdin, stdout,
    /// stderr and controlling terminal); with `-i` kiln's terminal is put
    /// in raw mode and passed through.
    #[arg(short = 't', long)]
    tty: bool,
    /// Accepted and ignored: kiln keeps no containers to name.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Refused: kiln runs in the foreground only.
    #[arg(short = 'd', long, hide = true)]
    detach: bool,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User (`name`, `uid`, `uid:gid`, `name:group`).
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Bind mount `HOST:CONTAINER[:ro]`.
    #[arg(short = 'v', long = "volume", value_name = "HOST:CTR")]
    volumes: Vec<String>,
    /// Network: host (default) or none.
    #[arg(long, default_value = "host", value_parser = ["host", "none", "default"])]
    network: String,
    /// Override the image's ENTRYPOINT.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Security options: `seccomp=unconfined` runs without Docker's default
    /// seccomp profile (the only option kiln takes).
    #[arg(long = "security-opt", value_name = "OPT")]
    security_opt: Vec<String>,
    /// Run this platform's image of a multi-platform image (`linux/arm64`);
    /// a foreign platform runs under QEMU emulation (`kiln system binfmt`).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// The image.
    image: String,
    /// Command and arguments (replace the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn usage(m: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(m.into()))
}

/// A `--platform` value, parsed and normalised (a usage error if bad).
pub fn platform_arg(p: Option<&str>) -> anyhow::Result<Option<Platform>> {
    p.map(|p| kiln_solver::image::platform::parse(p).map_err(|e| usage(e.to_string())))
        .transpose()
}

/// Whether `--security-opt` values lift the seccomp profile; any other
/// option is refused (Docker also spells it `seccomp:unconfined`).
fn seccomp_unconfined(opts: &[String]) -> anyhow::Result<bool> {
    let mut unconfined = false;
    for o in opts {
        match o.as_str() {
            "seccomp=unconfined" | "seccomp:unconfined" => unconfined = true,
            s if s.starts_with("seccomp=") || s.starts_with("seccomp:") => {
                return Err(usage(format!(
                    "--security-opt {o:?}: kiln applies Docker's default seccomp profile or none; custom profiles are not supported (use seccomp=unconfined)"
                )))
            }
            _ => {
                return Err(usage(format!(
                    "--security-opt {o:?} is not supported (kiln run takes seccomp=unconfined)"
                )))
            }
        }
    }
    Ok(unconfined)
}

fn short_id(d: &str) -> String {
    d.trim_start_matches("sha256:").chars().take(12).collect()
}

/// "3 minutes ago" from an RFC 3339 time.
fn ago(created: Option<&str>) -> String {
    let Some(t) = created.and_then(parse_rfc3339) else {
        return "N/A".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let s = (now - t).max(0);
    let (n, unit) = match s {
        0..=59 => (s, "second"),
        60..=3599 => (s / 60, "minute"),
        3600..=86_399 => (s / 3600, "hour"),
        86_400..=2_591_999 => (s / 86_400, "day"),
        2_592_000..=31_535_999 => (s / 2_592_000, "month"),
        _ => (s / 31_536_000, "year"),
    };
    if n == 1 {
        format!("1 {unit} ago")
    } else {
        format!("{n} {unit}s ago")
    }
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS(.frac)?(Z|±HH:MM)`.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = days * 86_400 + h * 3600 + mi * 60 + se;
    let tz = &s[19..];
    let tz = tz.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if let Some(off) = tz.strip_prefix('+').or_else(|| tz.strip_prefix('-')) {
        let oh: i64 = off.get(0..2)?.parse().ok()?;
        let om: i64 = off.get(3..5)?.parse().ok()?;
        let sign = if tz.starts_with('+') { 1 } else { -1 };
        t -= sign * (oh * 3600 + om * 60);
    }
    Some(t)
}

/// Docker's human sizes (`4.26MB`, decimal units).
fn human(n: u64) -> String {
    match kiln_solver::units::decimal_units(n) {
        (_, "B") => format!("{n}B"),
        (v, unit) => {
            let s: String = format!("{v:.3}").chars().take(4).collect();
            format!("{}{unit}", s.trim_end_matches('.'))
        }
    }
}

/// "2024-01-02 03:04:05 +0000 UTC": Go's time printing, docker's
/// `CreatedAt`.
fn go_time(created: Option<&str>) -> String {
    let Some(t) = created.and_then(parse_rfc3339) else {
        return String::new();
    };
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Civil from days (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} +0000 UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// docker's `images --filter` values, parsed.
#[derive(Default)]
struct ImageFilters {
    dangling: Option<bool>,
    references: Vec<String>,
    labels: Vec<(String, Option<String>)>,
    before: Option<i64>,
    since: Option<i64>,
    until: Option<i64>,
}

/// When an image was made (its config's `created`), Unix seconds.
fn created_at(l: &ImageInfo) -> i64 {
    l.config
        .created
        .as_deref()
        .and_then(parse_rfc3339)
        .unwrap_or(0)
}

fn image_filters(s: &Session, filters: &[String]) -> anyhow::Result<ImageFilters> {
    let mut f = ImageFilters::default();
    for raw in filters {
        let (k, v) = raw
            .split_once('=')
            .ok_or_else(|| usage(format!("--filter {raw:?}: want KEY=VALUE")))?;
        match k {
            "dangling" => {
                f.dangling = Some(match v {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(usage(format!("--filter {raw:?}: dangling=true or false"))),
                })
            }
            "reference" => f.references.push(v.to_string()),
            "label" => f.labels.push(match v.split_once('=') {
                Some((lk, lv)) => (lk.to_string(), Some(lv.to_string())),
                None => (v.to_string(), None),
            }),
            "before" | "since" => {
                let t = created_at(&s.find_image(v).map_err(lib_error)?);
                if k == "before" {
                    f.before = Some(t);
                } else {
                    f.since = Some(t);
                }
            }
            "until" => {
                let secs = crate::store_cmds::parse_go_duration(v).map_err(usage)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                f.until = Some(now - secs as i64);
            }
            _ => {
                return Err(usage(format!(
                    "--filter {raw:?}: kiln's images takes dangling, reference, label, before, since, until"
                )))
            }
        }
    }
    Ok(f)
}

/// Whether `pattern` (docker's `reference=` filter, a glob such as
/// `busy*` or `*/app:1.*`) matches the familiar `repo` and `repo:tag`.
fn reference_matches(pattern: &str, repo: &str, tag: &str) -> bool {
    let m = |name: &str| kiln_solver::parser::glob::match_pattern(pattern, name).unwrap_or(false);
    m(repo) || m(&format!("{repo}:{tag}"))
}

impl ImageFilters {
    fn keep_image(&self, l: &ImageInfo) -> bool {
        if self.dangling.is_some_and(|d| d != l.names.is_empty()) {
            return false;
        }
        let t = created_at(l);
        if self.before.is_some_and(|b| t >= b)
            || self.since.is_some_and(|s| t <= s)
            || self.until.is_some_and(|u| t >= u)
        {
            return false;
        }
        let labels = l.config.config.as_ref().and_then(|c| c.labels.as_ref());
        self.labels.iter().all(|(k, v)| {
            labels
                .and_then(|ls| ls.get(k))
                .is_some_and(|have| v.as_ref().is_none_or(|v| v == have))
        })
    }

    fn keep_row(&self, repo: &str, tag: &str) -> bool {
        self.references.is_empty()
            || self
                .references
                .iter()
                .any(|p| reference_matches(p, repo, tag))
    }
}

/// The `{{.Field}}`s of a row of `kiln images`, as docker's.
fn image_row(l: &ImageInfo, repo: &str, tag: &str, size: u64, no_trunc: bool) -> serde_json::Value {
    let digest = l
        .repo_digests
        .iter()
        .find(|d| kiln_solver::images::repository(d) == repo_name_of(repo))
        .and_then(|d| d.split_once('@').map(|(_, h)| h.to_string()))
        .unwrap_or_else(|| "<none>".into());
    let mut v = serde_json::json!({
        "Containers": "N/A",
        "CreatedAt": go_time(l.config.created.as_deref()),
        "CreatedSince": ago(l.config.created.as_deref()),
        "Digest": digest,
        "ID": if no_trunc { l.config_digest.clone() } else { short_id(&l.config_digest) },
        "Repository": repo,
        "SharedSize": "N/A",
        "Size": human(size),
        "Tag": tag,
        "UniqueSize": "N/A",
        "VirtualSize": human(size),
    });
    if !l.platforms.is_empty() {
        v["Platforms"] = serde_json::json!(l.platforms);
    }
    v
}

/// The normalised repository of a familiar one (`busybox` ->
/// `docker.io/library/busybox`).
fn repo_name_of(familiar_repo: &str) -> String {
    kiln_solver::cache::normalize_reference(familiar_repo)
        .map(|n| kiln_solver::images::repository(&n).to_string())
        .unwrap_or_else(|_| familiar_repo.to_string())
}

/// `kiln images [REPO[:TAG]]`.
pub fn images(root: &Path, a: ImagesArgs) -> anyhow::Result<ExitCode> {
    let s = session(root, false)?;
    let filters = image_filters(&s, &a.filter)?;
    let _ = a.all;
    // `images REPO[:TAG]`: that repository, that tag if given.
    let wanted = a.repository.as_deref().map(|r| {
        let (repo, tag) = match r.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
            Some((repo, tag)) => (repo, Some(tag)),
            None => (r, None),
        };
        (repo_name_of(repo), tag.map(str::to_string))
    });
    let imgs = s.images().map_err(lib_error)?;
    let mut rows = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for l in imgs.iter().filter(|l| filters.keep_image(l)) {
        let mut size = None;
        for (repo, tag) in repo_tags(l) {
            if !filters.keep_row(&repo, &tag) {
                continue;
            }
            if let Some((wr, wt)) = &wanted {
                if repo_name_of(&repo) != *wr || wt.as_ref().is_some_and(|t| *t != tag) {
                    continue;
                }
            }
            let size = match size {
                Some(n) => n,
                None => *size.insert(s.image_size(l).map_err(lib_error)?),
            };
            let id = if a.no_trunc {
                l.config_digest.clone()
            } else {
                short_id(&l.config_digest)
            };
            if !ids.contains(&id) {
                ids.push(id);
            }
            rows.push(image_row(l, &repo, &tag, size, a.no_trunc));
        }
    }
    if a.quiet {
        for id in ids {
            outln!("{id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let format = a.format.as_deref().unwrap_or("table");
    if format == "json" {
        for r in &rows {
            outln!("{r}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let multi = imgs.iter().any(|l| !l.platforms.is_empty());
    let format = if format == "table" {
        let mut f = "table {{.Repository}}\t{{.Tag}}\t".to_string();
        if a.digests {
            f.push_str("{{.Digest}}\t");
        }
        f.push_str("{{.ID}}\t{{.CreatedSince}}\t{{.Size}}");
        if multi {
            f.push_str("\t{{join .Platforms \",\"}}");
        }
        f
    } else {
        format.to_string()
    };
    let headers = serde_json::json!({
        "Containers": "CONTAINERS", "CreatedAt": "CREATED AT", "CreatedSince": "CREATED",
        "Digest": "DIGEST", "ID": "IMAGE ID", "Repository": "REPOSITORY",
        "SharedSize": "SHARED SIZE", "Size": "SIZE", "Tag": "TAG",
        "UniqueSize": "UNIQUE SIZE", "VirtualSize": "VIRTUAL SIZE", "Platforms": ["PLATFORMS"],
    });
    let rows: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|mut r| {
            if multi && r.get("Platforms").is_none() {
                r["Platforms"] = serde_json::json!([]);
            }
            r
        })
        .collect();
    let out = crate::gotemplate::render_rows(&format, &rows, &headers).map_err(template_error)?;
    out_str(&out);
    Ok(ExitCode::SUCCESS)
}

/// Writes `s` to stdout as it is (see [`outln`]).
fn out_str(s: &str) {
    use std::io::Write as _;
    let s = crate::term::shown(s, crate::term::stdout_tty());
    if let Err(e) = std::io::stdout().lock().write_all(s.as_bytes()) {
        crate::stdout_failed(e)
    }
}

/// A `--format` template that does not parse or run: docker's wording,
/// a usage error.
fn template_error(e: crate::gotemplate::TemplateError) -> anyhow::Error {
    usage(format!("{e}"))
}

/// (repository, tag) of each name, familiar; `<none>`, `<none>` for an
/// untagged image.
fn repo_tags(l: &ImageInfo) -> Vec<(String, String)> {
    if l.names.is_empty() {
        return vec![("<none>".into(), "<none>".into())];
    }
    l.names.iter().map(|n| familiar(n)).collect()
}

/// docker's `inspect` JSON for one image.
fn inspect_json(s: &Session, l: &ImageInfo) -> Result<serde_json::Value, ImagesError> {
    let c = &l.config;
    let mut v = serde_json::json!({
        "Id": l.config_digest,
        "RepoTags": l.names.iter().filter(|n| !n.contains('@')).map(|n| {
            let (repo, tag) = familiar(n);
            format!("{repo}:{tag}")
        }).collect::<Vec<_>>(),
        "RepoDigests": l.repo_digests.iter().map(|d| {
            let (repo, _) = familiar(d);
            let digest = d.split_once('@').map(|(_, h)| h).unwrap_or_default();
            format!("{repo}@{digest}")
        }).collect::<Vec<_>>(),
        "Parent": "",
        "Comment": "",
        "Created": c.created,
        "DockerVersion": "",
        "Author": c.author.clone().unwrap_or_default(),
        "Config": c.config,
        "Architecture": c.architecture,
        "Variant": c.variant,
        "Os": c.os,
        "Size": s.image_size(l)?,
        "VirtualSize": s.image_size(l)?,
        "RootFS": {"Type": c.rootfs.kind, "Layers": c.rootfs.diff_ids},
        "Metadata": {"ManifestDigest": l.manifest_digest},
    });
    if !l.platforms.is_empty() {
        v["Platforms"] = serde_json::json!(l.platforms);
        v["Metadata"]["IndexDigest"] = serde_json::json!(l.stored_digest);
    }
    Ok(v)
}

/// `kiln inspect` flags.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Print each image through this Go template (`{{.Id}}`,
    /// `{{json .Config}}`) instead of the JSON array.
    #[arg(short = 'f', long = "format", value_name = "TEMPLATE")]
    format: Option<String>,
    /// Only `image` (kiln has no containers, volumes or networks).
    #[arg(long = "type", value_name = "image")]
    kind: Option<String>,
    /// Accepted (sizes are always shown).
    #[arg(short = 's', long)]
    size: bool,
    /// Of a multi-platform image, this platform's (default: the host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// Images (name, ID or ID prefix).
    #[arg(required = true)]
    images: Vec<String>,
}

/// `kiln inspect IMAGE...`: docker-style JSON, or a template per image.
pub fn inspect(root: &Path, a: InspectArgs) -> anyhow::Result<ExitCode> {
    if let Some(k) = a.kind.as_deref().filter(|k| *k != "image") {
        return Err(usage(format!(
            "--type {k:?}: kiln inspects images only (--type image)"
        )));
    }
    let _ = a.size;
    let template = a
        .format
        .as_deref()
        .filter(|f| !f.is_empty() && *f != "json")
        .map(|f| crate::gotemplate::Template::parse(&f.replace("\\t", "\t").replace("\\n", "\n")))
        .transpose()
        .map_err(template_error)?;
    let platform = platform_arg(a.platform.as_deref())?;
    let s = session(root, false)?;
    let mut out = Vec::new();
    let mut failed = false;
    for r in &a.images {
        match s.find_image_for(r, platform.as_ref()) {
            Ok(l) => {
                let v = inspect_json(&s, &l).map_err(lib_error)?;
                match &template {
                    Some(t) => {
                        let text = t.render(&v).map_err(template_error)?;
                        outln!("{text}");
                    }
                    None => out.push(v),
                }
            }
            Err(e) => {
                eprintln!(
                    "error: {}",
                    crate::term::shown(&e.to_string(), crate::term::stderr_tty())
                );
                failed = true;
            }
        }
    }
    if template.is_none() {
        outln!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `kiln history` flags.
#[derive(clap::Args, Debug)]
pub struct HistoryArgs {
    /// Of a multi-platform image, this platform's (default: the host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// A Go template per entry (`{{.CreatedBy}}`, `table …`) or `json`.
    #[arg(long, value_name = "TEMPLATE")]
    format: Option<String>,
    /// Do not cut the commands.
    #[arg(long)]
    no_trunc: bool,
    /// Only the image ID (docker prints it for the newest entry and
    /// `<missing>` for the others).
    #[arg(short, long)]
    quiet: bool,
    /// Sizes and dates in human form (`-H=false`: bytes and RFC 3339).
    #[arg(short = 'H', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    human: Option<bool>,
    /// The image.
    image: String,
}

/// `kiln history IMAGE`.
pub fn history(root: &Path, a: HistoryArgs) -> anyhow::Result<ExitCode> {
    let platform = platform_arg(a.platform.as_deref())?;
    let s = session(root, false)?;
    let (l, rows) = s
        .history_for(&a.image, platform.as_ref())
        .map_err(lib_error)?;
    let human_form = a.human.unwrap_or(true);
    let n = rows.len();
    let mut items = Vec::new();
    for (i, row) in rows.into_iter().enumerate().rev() {
        let h = &row.entry;
        let mut by = h.created_by.clone().unwrap_or_default();
        if !a.no_trunc && a.format.is_none() && by.chars().count() > 45 {
            by = by.chars().take(44).collect::<String>() + "…";
        }
        let id = if i + 1 == n {
            if a.no_trunc {
                l.config_digest.clone()
            } else {
                short_id(&l.config_digest)
            }
        } else {
            "<missing>".into()
        };
        items.push(serde_json::json!({
            "ID": id,
            "CreatedSince": if human_form { ago(h.created.as_deref()) } else { h.created.clone().unwrap_or_default() },
            "CreatedAt": h.created.clone().unwrap_or_default(),
            "CreatedBy": by,
            "Size": if human_form { human(row.size) } else { row.size.to_string() },
            "Comment": h.comment.clone().unwrap_or_default(),
        }));
    }
    if a.quiet {
        for it in &items {
            outln!("{}", it["ID"].as_str().unwrap_or_default());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let format = a.format.as_deref().unwrap_or("table");
    if format == "json" {
        for it in &items {
            outln!("{it}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let format = if format == "table" {
        "table {{.ID}}\t{{.CreatedSince}}\t{{.CreatedBy}}\t{{.Size}}\t{{.Comment}}"
    } else {
        format
    };
    let headers = serde_json::json!({
        "ID": "IMAGE", "CreatedSince": "CREATED", "CreatedAt": "CREATED AT",
        "CreatedBy": "CREATED BY", "Size": "SIZE", "Comment": "COMMENT",
    });
    let out = crate::gotemplate::render_rows(format, &items, &headers).map_err(template_error)?;
    out_str(&out);
    Ok(ExitCode::SUCCESS)
}

/// `kiln tag SRC DST`.
pub fn tag(root: &Path, a: TagArgs) -> anyhow::Result<ExitCode> {
    session(root, false)?
        .tag(&a.source, &a.target)
        .map_err(lib_error)?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln rmi [-f] IMAGE...`.
pub fn rmi(root: &Path, a: RmiArgs) -> anyhow::Result<ExitCode> {
    let s = session(root, false)?;
    let mut failed = false;
    let _ = a.no_prune;
    for r in &a.images {
        match s.untag(r, a.force) {
            Ok(removed) => {
                for n in removed.untagged {
                    let (repo, tag) = familiar(&n);
                    outln!("Untagged: {repo}:{tag}");
                }
                if let Some(id) = removed.deleted {
                    outln!("Deleted: {id}");
                }
            }
            Err(
                e @ (ImagesError::NoSuchImage(_)
                | ImagesError::AmbiguousId(..)
                | ImagesError::MustForce(_)
                | ImagesError::InvalidReference { .. }),
            ) => {
                eprintln!(
                    "error: {}",
                    crate::term::shown(&e.to_string(), crate::term::stderr_tty())
                );
                failed = true;
            }
            Err(e) => return Err(lib_error(e)),
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `kiln run`: the image's entrypoint/cmd (Docker's rules) in a sandbox
/// on a throw-away writable layer. The signals kiln receives go to the
/// application ([`crate::signals::forward_to_step`]); kiln exits with its
/// status.
pub fn run(root: &Path, a: RunArgs) -> anyhow::Result<ExitCode> {
    use kiln_solver::run::{
        CancellationToken, ExecError, ExitStatus, NetworkMode, OutputLine, RunError, RunRequest,
        Stream, Volume,
    };
    if a.detach {
        return Err(usage(
            "not supported by kiln: --detach (kiln runs an image in the foreground only)",
        ));
    }
    let _ = &a.name;
    let unconfined = seccomp_unconfined(&a.security_opt)?;
    let mut from_files = Vec::new();
    for f in &a.env_file {
        from_files.extend(crate::run_io::read_env_file(f)?);
    }
    let platform = platform_arg(a.platform.as_deref())?;
    let session = session(root, false)?;
    // `--env-file` first, then `-e`; `KEY` alone takes KEY from kiln's
    // environment (left out when unset).
    let env = from_files
        .iter()
        .chain(&a.env)
        .filter_map(|e| match e.split_once('=') {
            Some(_) => Some(e.clone()),
            None => std::env::var(e).ok().map(|v| format!("{e}={v}")),
        })
        .collect();
    let mut volumes = Vec::new();
    for v in &a.volumes {
        let parts: Vec<&str> = v.split(':').collect();
        let (host, ctr, ro) = match parts.as_slice() {
            [h, c] => (*h, *c, false),
            [h, c, o] => (*h, *c, volume_read_only(v, o)?),
            _ => {
                return Err(usage(format!(
                    "invalid volume {v:?}: want HOST:CONTAINER[:OPTIONS]"
                )))
            }
        };
        let host =
            std::fs::canonicalize(host).map_err(|e| usage(format!("volume source {host}: {e}")))?;
        volumes.push(Volume {
            host,
            container: ctr.to_string(),
            read_only: ro,
        });
    }
    let req = RunRequest {
        image: a.image.clone(),
        platform,
        entrypoint: a.entrypoint.clone(),
        command: a.command.clone(),
        env,
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        network: if a.network == "none" {
            NetworkMode::None
        } else {
            NetworkMode::Host
        },
        seccomp_unconfined: unconfined,
        volumes,
        stdin: None,
        tty: None,
    };
    let mut req = req;
    let terminal = if a.tty {
        let t = crate::run_io::Terminal::open(a.interactive)?;
        req.tty = t.slave();
        Some(t)
    } else {
        if a.interactive {
            req.stdin = Some(std::sync::Arc::new(crate::run_io::stdin_pipe()?));
        }
        None
    };
    let prepared = match session.prepare_run(&req) {
        Ok(p) => p,
        Err(RunError::Image(e)) => return Err(lib_error(e)),
        Err(RunError::Session(e)) => return Err(crate::build_cmd::facade_error(e)),
        Err(e @ (RunError::NoCommand | RunError::VolumeDestination { .. })) => {
            return Err(usage(e.to_string()))
        }
        Err(e) => return Err(anyhow::anyhow!(e)),
    };
    // The request's reference to the terminal's slave goes now: the
    // terminal's output ends when the sandbox's last one closes.
    drop(req);
    let resizer = terminal.as_ref().map(crate::run_io::Terminal::resizer);
    let rt = tokio::runtime::Builder::new_multi_thread()
        // A layer's tree is walked recursively, per level (see
        // `kiln_image::diff::MAX_TREE_DEPTH`).
        .thread_stack_size(kiln_solver::copy::DEEP_STACK)
        .enable_all()
        .build()?;
    let outcome = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<OutputLine>(256);
        let printer = tokio::spawn(async move {
            use std::io::Write;
            while let Some(line) = rx.recv().await {
                match line.stream {
                    Stream::Stdout => {
                        let mut o = std::io::stdout().lock();
                        let _ = o.write_all(&line.bytes);
                        if line.newline {
                            let _ = o.write_all(b"\n");
                        }
                        let _ = o.flush();
                    }
                    Stream::Stderr => {
                        let mut e = std::io::stderr().lock();
                        let _ = e.write_all(&line.bytes);
                        if line.newline {
                            let _ = e.write_all(b"\n");
                        }
                    }
                }
            }
        });
        let cancel = CancellationToken::new();
        let signals = crate::signals::forward_to_step(&cancel, resizer);
        let r = prepared.run(Some(tx), cancel, signals).await;
        let _ = printer.await;
        r
    });
    if let Some(t) = terminal {
        t.finish();
    }
    let _ = (a.rm, a.init);
    match outcome {
        Ok(o) => Ok(ExitCode::from(match o.status {
            ExitStatus::Code(c) => u8::try_from(c).unwrap_or(1),
            ExitStatus::Signal(s) => u8::try_from(128 + s).unwrap_or(1),
        })),
        // Killed after the last of the SIGINT/SIGTERMs it was sent: the
        // status of a SIGKILLed container (what `docker kill` gives).
        Err(ExecError::Cancelled { .. }) => Ok(ExitCode::from(128 + 9)),
        // docker's statuses: 127 when the command is not found, 126 when
        // it cannot be run, 125 for kiln's own failures.
        Err(ExecError::Setup { stage, message, .. }) if stage == "exec" => {
            eprintln!(
                "error: {}",
                crate::term::shown(&message, crate::term::stderr_tty())
            );
            let not_found = message.contains("not found") || message.contains("no such file");
            Ok(ExitCode::from(if not_found { 127 } else { 126 }))
        }
        Err(e) => {
            eprintln!(
                "error: {}",
                crate::term::shown(&e.to_string(), crate::term::stderr_tty())
            );
            Ok(ExitCode::from(125))
        }
    }
}

/// `kiln save` flags.
#[derive(clap::Args, Debug)]
pub struct SaveArgs {
    /// Write to this file (default: stdout, which must not be a terminal).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Archive format: `docker` (docker save / docker load) or `oci`
    /// (an OCI image layout in a tar).
    #[arg(long, default_value = "docker", value_parser = ["docker", "oci"])]
    format: String,
    /// Save this platform's image of a multi-platform image (default: the
    /// host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// Images to save.
    #[arg(required = true)]
    images: Vec<String>,
}

/// `kiln save`: images from the store as a docker-archive or OCI tar.
pub fn save(root: &Path, a: SaveArgs) -> anyhow::Result<ExitCode> {
    let format = if a.format == "oci" {
        ArchiveFormat::Oci
    } else {
        ArchiveFormat::Docker
    };
    let dest = match &a.output {
        Some(path) => Dest::File(path.clone()),
        None => Dest::Stdout,
    };
    let platform = platform_arg(a.platform.as_deref())?;
    session(root, false)?
        .save_for(&a.images, format, dest, platform.as_ref())
        .map_err(|e| {
            export_error(
                e,
                "cowardly refusing to save to a terminal. Use the -o flag or redirect",
            )
        })?;
    Ok(ExitCode::SUCCESS)
}

/// An export's error: a broken pipe on stdout ends kiln quietly (status
/// 141, as docker), stdout on a terminal is refused with `refusal` (a
/// usage error).
fn export_error(e: ImagesError, refusal: &str) -> anyhow::Error {
    match e {
        ImagesError::Export(x) if x.is_broken_pipe() => {
            std::process::exit(crate::EXIT_STDOUT_CLOSED.into())
        }
        ImagesError::Export(kiln_solver::export::ExportError::Terminal) => usage(refusal),
        e => lib_error(e),
    }
}

/// `kiln export` flags.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Write the tar here (default: stdout, which must not be a terminal).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<String>,
    /// Export this platform's image of a multi-platform image (default:
    /// the host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// The image.
    image: String,
}

/// Runs `kiln export`: the image's final filesystem as one tar.
pub fn export(root: &Path, a: ExportArgs) -> anyhow::Result<ExitCode> {
    let platform = platform_arg(a.platform.as_deref())?;
    let dest = Dest::parse(a.output.as_deref().unwrap_or("-"));
    session(root, false)?
        .export_filesystem_for(&a.image, dest, platform.as_ref())
        .map_err(|e| {
            export_error(
                e,
                "refusing to write an archive to a terminal; use dest=FILE",
            )
        })?;
    Ok(ExitCode::SUCCESS)
}

/// Whether the options of `-v HOST:CONTAINER:OPTIONS` (docker's, comma
/// separated) make the mount read-only. Every option is understood or
/// refused: one taken for another (`ro,z` read as "not `ro`") would give
/// the container a writable host directory the user meant to protect.
fn volume_read_only(v: &str, opts: &str) -> anyhow::Result<bool> {
    let mut ro = None;
    for o in opts.split(',') {
        match o {
            "ro" | "rw" => {
                if ro.replace(o == "ro").is_some() {
                    return Err(usage(format!(
                        "invalid volume {v:?}: both ro and rw, or one twice"
                    )));
                }
            }
            // SELinux labels (no SELinux here), the default propagation
            // and docker's no-op cache hints.
            "z" | "Z" | "private" | "rprivate" | "nocopy" | "consistent" | "cached"
            | "delegated" => {}
            _ => {
                return Err(usage(format!(
                    "invalid volume {v:?}: option {o:?} is not supported (ro, rw, z, Z, rprivate)"
                )))
            }
        }
    }
    Ok(ro.unwrap_or(false))
}

#[cfg(test)]
mod volume_tests {
    use super::volume_read_only;

    #[test]
    fn volume_options_are_understood_or_refused() {
        for (o, ro) in [
            ("ro", true),
            ("rw", false),
            ("ro,z", true),
            ("Z,ro", true),
            ("z", false),
        ] {
            assert_eq!(volume_read_only("a:b:x", o).unwrap(), ro, "{o}");
        }
        for bad in ["RO", "readonly", "ro,rw", "ro,ro", "rshared", "ro,bogus"] {
            assert!(volume_read_only("a:b:x", bad).is_err(), "{bad} accepted");
        }
    }
}
