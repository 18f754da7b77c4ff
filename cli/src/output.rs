//! `kiln build --output` (BuildKit's syntax, repeatable) and `kiln
//! export`: after a build, the image in the store goes to the local
//! store under more names (`type=image`), to a registry
//! (`type=registry`, `type=image,push=true`), to a docker-archive or OCI
//! layout (`type=docker`, `type=oci`, `tar=false` for a directory), or its
//! final filesystem to a directory (`type=local`) or one tar
//! (`type=tar`). `dest=-` writes to stdout.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_cache::Store;
use kiln_image::compression::{Compression, CompressionOpts};
use kiln_image::manifest::RawManifest;
use kiln_solver::transfer::{self, LayerEncoding};

use crate::UsageError;

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// One `--output` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    /// `image`, `registry`, `docker`, `oci`, `local`, `tar`.
    pub kind: String,
    /// The other `key=value` attributes.
    pub attrs: BTreeMap<String, String>,
}

impl OutputSpec {
    /// Parses `type=docker,dest=out.tar`; a bare `DIR` is `type=local,dest=DIR`
    /// and a bare `-` is `type=tar,dest=-`, as in BuildKit.
    pub fn parse(s: &str) -> anyhow::Result<OutputSpec> {
        if !s.contains('=') {
            let kind = if s == "-" { "tar" } else { "local" };
            return Ok(OutputSpec {
                kind: kind.into(),
                attrs: [("dest".to_string(), s.to_string())].into(),
            });
        }
        let mut attrs = BTreeMap::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| usage(format!("--output {s:?}: {part:?} is not key=value")))?;
            attrs.insert(k.trim().to_string(), v.trim().to_string());
        }
        let kind = attrs.remove("type").unwrap_or_else(|| "local".into());
        match kind.as_str() {
            "image" | "registry" => {}
            "docker" | "oci" | "local" | "tar" => {
                if !attrs.contains_key("dest") {
                    return Err(usage(format!("--output type={kind} needs dest=")));
                }
            }
            other => {
                return Err(usage(format!(
                    "--output: unknown type {other:?} (image, registry, docker, oci, local, tar)"
                )))
            }
        }
        if kind == "registry" && !attrs.contains_key("name") {
            return Err(usage("--output type=registry needs name="));
        }
        Ok(OutputSpec { kind, attrs })
    }

    fn flag(&self, k: &str) -> bool {
        self.attrs.get(k).is_some_and(|v| v == "true" || v == "1")
    }

    /// The names (normalised) this output gives the image in the store.
    pub fn names(&self) -> anyhow::Result<Vec<String>> {
        let Some(n) = self.attrs.get("name") else {
            return Ok(Vec::new());
        };
        n.split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                kiln_cache::normalize_reference(s)
                    .map_err(|e| usage(format!("--output name={s:?}: {e}")))
            })
            .collect()
    }

    /// Whether this output pushes to a registry.
    pub fn pushes(&self) -> bool {
        self.kind == "registry" || (self.kind == "image" && self.flag("push"))
    }

    /// Layer encoding from `compression=`, `compression-level=`,
    /// `force-compression=`, `oci-mediatypes=`.
    pub fn encoding(&self, default_oci: bool) -> anyhow::Result<LayerEncoding> {
        let kind: Compression = match self.attrs.get("compression") {
            Some(c) => c.parse().map_err(|_| {
                usage(format!(
                    "--output compression={c:?}: gzip, zstd or uncompressed"
                ))
            })?,
            None => Compression::Gzip,
        };
        let level = self
            .attrs
            .get("compression-level")
            .map(|l| {
                l.parse::<i32>()
                    .map_err(|_| usage(format!("--output compression-level={l:?}")))
            })
            .transpose()?;
        let oci = match self.attrs.get("oci-mediatypes").map(String::as_str) {
            Some("true") => true,
            Some("false") => false,
            Some(o) => {
                return Err(usage(format!(
                    "--output oci-mediatypes={o:?}: true or false"
                )))
            }
            None => default_oci,
        };
        Ok(LayerEncoding {
            compression: CompressionOpts { kind, level },
            force: self.flag("force-compression"),
            oci_media_types: oci,
        })
    }
}

/// Opens `dest` for writing (`-`: stdout, which must not be a terminal),
/// runs `f`, and renames a temp file into place so a failure leaves no
/// half-written file.
fn write_dest(
    dest: &str,
    f: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if dest == "-" {
        let out = std::io::stdout();
        if out.is_terminal() {
            return Err(usage(
                "refusing to write an archive to a terminal; use dest=FILE",
            ));
        }
        let mut lock = std::io::BufWriter::new(out.lock());
        match f(&mut lock).and_then(|()| Ok(lock.flush()?)) {
            // The reader of stdout went away: quietly, as docker.
            Err(e) if crate::is_broken_pipe(&e) => {
                std::process::exit(crate::EXIT_STDOUT_CLOSED.into())
            }
            r => r?,
        }
        return Ok(());
    }
    crate::outfile::write_atomically(&PathBuf::from(dest), f)
}

/// The final filesystem of `manifest` unpacked into `dir` (layers applied
/// in order, whiteouts deleting). Every write is resolved inside `dir`
/// with file descriptors (the applier's `RESOLVE_IN_ROOT`), and device
/// nodes are never made on the host: they are left out, and named on
/// stderr.
pub fn unpack_rootfs(store: &Store, manifest: &RawManifest, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let m = manifest.manifest()?;
    let opts = kiln_image::apply::ApplyOptions {
        skip_devices: true,
        ..Default::default()
    };
    let mut skipped = Vec::new();
    for l in &m.layers {
        let d: kiln_cache::Digest = l.digest.as_str().parse()?;
        let st =
            store.apply_blob_to_dir(&d, dir, kiln_image::apply::WhiteoutMode::Delete, &opts)?;
        skipped.extend(st.skipped_devices);
    }
    if !skipped.is_empty() {
        let names: Vec<String> = skipped
            .iter()
            .map(|p| format!("/{}", p.display()))
            .collect();
        eprintln!(
            "warning: {} device node(s) not exported (kiln never creates device nodes on the host): {}",
            names.len(),
            names.join(", ")
        );
    }
    Ok(())
}

/// The final filesystem of `manifest` as one tar on `out`; `clamp`
/// pins later mtimes (SOURCE_DATE_EPOCH / rewrite-timestamp).
pub fn rootfs_tar(
    store: &Store,
    manifest: &RawManifest,
    out: &mut dyn Write,
    clamp: Option<i64>,
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir_in(store.tmp_dir())?;
    let root = tmp.path().join("rootfs");
    unpack_rootfs(store, manifest, &root)?;
    let opts = kiln_image::diff::DiffOptions {
        clamp_mtime: clamp,
        exclude: Vec::new(),
    };
    kiln_image::diff::write_tree_diff(None, &root, out, &opts)?;
    Ok(())
}

fn familiar(name: &str) -> String {
    kiln_image::reference::familiar(name).to_string()
}

/// Runs every output but `type=image` without push (those only add names,
/// which the build already recorded) for the image whose manifest is
/// `manifest_digest`.
#[allow(clippy::too_many_arguments)]
pub fn run_outputs(
    root: &Path,
    outputs: &[OutputSpec],
    manifest_digest: &str,
    insecure: &[String],
    source_date_epoch: Option<i64>,
    quiet: bool,
) -> anyhow::Result<()> {
    if outputs.iter().all(|o| o.kind == "image" && !o.pushes()) {
        return Ok(());
    }
    let store = Store::open(root)
        .map_err(|e| anyhow::anyhow!("opening the store at {}: {e}", root.display()))?;
    let _lease = store.lease(None)?;
    let md: kiln_cache::Digest = manifest_digest.parse()?;
    let manifest = RawManifest::new(store.content().read(&md)?, None)?;
    for o in outputs {
        let clamp = if o.flag("rewrite-timestamp") {
            source_date_epoch
        } else {
            None
        };
        match o.kind.as_str() {
            "image" | "registry" if o.pushes() => {
                let cfg = crate::registry_cmds::registry_config(insecure)?;
                let enc = o.encoding(true)?;
                let names = o.names()?;
                if names.is_empty() {
                    return Err(usage("--output push=true needs name="));
                }
                for n in names {
                    crate::registry_cmds::push_manifest(
                        &store, &cfg, &manifest, &n, enc, 4, quiet,
                    )?;
                }
            }
            "image" | "registry" => {}
            "docker" | "oci" => {
                let dest = o.attrs.get("dest").map(String::as_str).unwrap_or("-");
                let oci = o.kind == "oci";
                let m = if oci || o.attrs.contains_key("compression") {
                    let say = |m: &str| {
                        if !quiet {
                            eprintln!("{m}")
                        }
                    };
                    transfer::encode_image(&store, &manifest, o.encoding(oci)?, 4, &say)
                        .map_err(anyhow::Error::msg)?
                } else {
                    manifest.clone()
                };
                let names: Vec<String> = o
                    .names()?
                    .iter()
                    .map(|n| if oci { n.clone() } else { familiar(n) })
                    .collect();
                let images = [kiln_image::archive::ArchiveImage { names, manifest: m }];
                let blobs = crate::image_cmds::StoreBlobs(&store);
                if oci && o.attrs.get("tar").is_some_and(|t| t == "false") {
                    kiln_image::archive::write_oci_dir(Path::new(dest), &images, &blobs)?;
                } else {
                    write_dest(dest, |w| {
                        if oci {
                            kiln_image::archive::write_oci_archive(w, &images, &blobs)?;
                        } else {
                            kiln_image::archive::write_docker_archive(w, &images, &blobs)?;
                        }
                        Ok(())
                    })?;
                }
            }
            "local" => {
                let dest = o.attrs.get("dest").map(String::as_str).unwrap_or(".");
                if dest == "-" {
                    write_dest(dest, |w| rootfs_tar(&store, &manifest, w, clamp))?;
                } else {
                    unpack_rootfs(&store, &manifest, Path::new(dest))?;
                }
            }
            "tar" => {
                let dest = o.attrs.get("dest").map(String::as_str).unwrap_or("-");
                write_dest(dest, |w| rootfs_tar(&store, &manifest, w, clamp))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// `kiln export` flags.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Write the tar here (default: stdout, which must not be a terminal).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<String>,
    /// The image.
    image: String,
}

/// Runs `kiln export`: the image's final filesystem as one tar.
pub fn export(root: &Path, a: ExportArgs) -> anyhow::Result<std::process::ExitCode> {
    let store = Store::open(root)
        .map_err(|e| anyhow::anyhow!("opening the store at {}: {e}", root.display()))?;
    let _lease = store.lease(None)?;
    let name = kiln_cache::normalize_reference(&a.image)
        .map_err(|e| usage(format!("invalid reference {:?}: {e}", a.image)))?;
    let manifest = transfer::local_manifest(&store, &name).map_err(anyhow::Error::msg)?;
    write_dest(a.output.as_deref().unwrap_or("-"), |w| {
        rootfs_tar(&store, &manifest, w, None)
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_buildkit_syntax() {
        let o = OutputSpec::parse("type=registry,name=127.0.0.1:5000/a:1,compression=zstd")
            .expect("ok");
        assert!(o.pushes());
        assert_eq!(
            o.encoding(true).expect("enc").compression.kind,
            Compression::Zstd
        );
        let o = OutputSpec::parse("out").expect("ok");
        assert_eq!(o.kind, "local");
        let o = OutputSpec::parse("-").expect("ok");
        assert_eq!(o.kind, "tar");
        assert!(OutputSpec::parse("type=docker").is_err());
        assert!(OutputSpec::parse("type=nope,dest=x").is_err());
        assert!(OutputSpec::parse("type=image,name=a,push=true")
            .expect("ok")
            .pushes());
    }
}
