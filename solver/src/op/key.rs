//! Cache keys: `sha256` over length-prefixed fields, so that no two
//! different field sequences can hash alike.
//!
//! [`cache_key`] is the one function that keys an op: its definition,
//! the key of the state it runs on and the keys of what else it reads
//! ([`KeyInputs`]); the solver then feeds the digests of the content the
//! op selects (COPY sources, through the stat-keyed hash cache) into the
//! returned hasher and finishes it. A state's key after a layer is
//! [`chain_key`] of the op's state key and the layer's diffID.
//!
//! The field sequences are pinned by golden tests (`solver/tests`):
//! changing one empties every existing store's cache, so it needs a new
//! [`KEY_VERSION`].

use sha2::{Digest as _, Sha256};

use super::{ContextDirOp, CopyOp, ExecOp, MkdirOp, Op};
use kiln_executor::NetworkMode;

/// The version every key starts with.
pub const KEY_VERSION: &str = "kiln-key-v2";

/// What an op's key covers besides its own definition.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyInputs<'a> {
    /// The key of the state the op runs on.
    pub parent: &'a str,
    /// `RUN --mount`: one description per mount, with the keys of the
    /// states and context content it reads.
    pub mounts: &'a [String],
    /// `ADD`: identities of the fetched remote sources (content digest,
    /// commit).
    pub remote: &'a [String],
    /// SOURCE_DATE_EPOCH: the layer's mtimes are clamped to it when it is
    /// committed (whether it is set is part of the key).
    pub clamp: Option<i64>,
}

/// Starts the cache key of `op`: its definition and `inputs`. The caller
/// adds the digests of the content the op selects (COPY sources, a
/// context directory) and finishes it.
pub fn cache_key(op: &Op, inputs: &KeyInputs<'_>) -> KeyHasher {
    let mut key = match op {
        Op::Exec(e) => exec_key(e, inputs),
        Op::Copy(c) => copy_key(c, inputs),
        Op::Mkdir(m) => mkdir_key(m, inputs),
        Op::ContextDir(d) => return context_dir_key(d),
    };
    // Whether mtimes are clamped, not to what: a layer made without the
    // clamp is never the hit of a build with it (its files carry the
    // build's clock), while builds with SOURCE_DATE_EPOCH set from each
    // commit's date still share their cache (a layer clamped to an
    // earlier epoch has no mtime past the later one).
    if inputs.clamp.is_some() {
        key.field("source-date-epoch");
    }
    key
}

fn exec_key(e: &ExecOp, inputs: &KeyInputs<'_>) -> KeyHasher {
    let mut key = KeyHasher::new("run");
    key.field(inputs.parent)
        .fields(&e.args)
        .fields(e.env.iter().map(|(k, v)| format!("{k}={v}")))
        .field(&e.cwd)
        .field(e.user.clone().unwrap_or_default())
        .field(if e.network == NetworkMode::None {
            "none"
        } else {
            "host"
        })
        .field(kiln_image::platform::normalize(&e.platform).to_string());
    if !e.mounts.is_empty() {
        key.field("mounts").fields(inputs.mounts);
    }
    if let Some((name, data)) = &e.script {
        key.field("script").field(name).field(data);
    }
    if e.insecure {
        key.field("security=insecure");
    }
    key
}

fn copy_key(c: &CopyOp, inputs: &KeyInputs<'_>) -> KeyHasher {
    let mut key = KeyHasher::new(if c.add { "add" } else { "copy" });
    for r in inputs.remote {
        key.field("remote").field(r);
    }
    // A --link layer does not depend on the chain below it.
    key.field(if c.link { "link" } else { inputs.parent })
        .field(&c.dest)
        .field(if c.dest_is_dir { "dir" } else { "path" })
        .field(c.chown.clone().unwrap_or_default())
        .field(c.chmod.as_ref().map(|m| m.to_string()).unwrap_or_default())
        .fields(&c.excludes);
    // The selected files' content and metadata are hashed by the caller:
    // no local path may enter the key (it must match on another machine
    // sharing the cache).
    key.field(if c.from.is_some() { "from" } else { "context" });
    for h in &c.heredocs {
        key.field("heredoc")
            .field(&h.path)
            .field(&h.raw)
            .field(if h.expand { "1" } else { "0" });
        if h.expand {
            // What is written: the text as ARG and ENV values expanded it
            // (those make no layer, so no parent key says them).
            key.field(&h.data);
        }
    }
    key.field(if c.parents { "parents" } else { "" });
    if c.unpack_remote {
        key.field("unpack-remote");
    }
    key
}

fn mkdir_key(m: &MkdirOp, inputs: &KeyInputs<'_>) -> KeyHasher {
    let mut k = KeyHasher::new("mkdir");
    k.field(inputs.parent)
        .field(&m.path)
        .field(m.user.clone().unwrap_or_default());
    k
}

fn context_dir_key(_: &ContextDirOp) -> KeyHasher {
    KeyHasher::new("dir-context")
}

/// The key of a COPY's shape (its key without the content): leads a
/// later run whose content changed to the files it can reuse.
pub fn copy_shape_key(c: &CopyOp, parent: &str) -> String {
    let mut k = KeyHasher::new("copy-shape");
    k.field(parent)
        .field(&c.dest)
        .field(if c.dest_is_dir { "dir" } else { "path" })
        .field(c.chown.clone().unwrap_or_default())
        .field(c.chmod.as_ref().map(|m| m.to_string()).unwrap_or_default())
        .fields(&c.excludes)
        .fields(&c.sources)
        .field(if c.parents { "parents" } else { "" });
    k.finish()
}

/// The key of a state after a layer with `diff_id` was added to the
/// state keyed `parent`.
pub fn chain_key(parent: &str, diff_id: &str) -> String {
    let mut k = KeyHasher::new("chain");
    k.field(parent).field(diff_id);
    k.finish()
}

/// The key of the empty state.
pub fn scratch_key() -> String {
    KeyHasher::new("scratch").finish()
}

/// The key of an image's state: its manifest digest.
pub fn image_key(manifest_digest: &str) -> String {
    let mut k = KeyHasher::new("image");
    k.field(manifest_digest);
    k.finish()
}

/// `--link`: the key of the layer keyed `layer` stacked on the state
/// keyed `parent`.
pub fn link_stack_key(layer: &str, parent: &str) -> String {
    let mut k = KeyHasher::new("link-stack");
    k.field(layer).field(parent);
    k.finish()
}

/// Starts the key of a `RUN --mount` bind source read from the build
/// context (the caller hashes the selected content into it).
pub fn bind_context_key() -> KeyHasher {
    KeyHasher::new("bind-context")
}

/// Incremental builder of a cache key.
#[derive(Clone)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    /// Starts a key for an op of kind `op` (e.g. `"run"`, `"copy"`).
    pub fn new(op: &str) -> Self {
        let mut h = KeyHasher(Sha256::new());
        h.field(KEY_VERSION);
        h.field(op);
        h
    }

    /// Adds one field.
    pub fn field(&mut self, s: impl AsRef<[u8]>) -> &mut Self {
        let b = s.as_ref();
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
        self
    }

    /// Adds a list of fields (its length first).
    pub fn fields<I, S>(&mut self, items: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let items: Vec<S> = items.into_iter().collect();
        self.field((items.len() as u64).to_le_bytes());
        for i in &items {
            self.field(i);
        }
        self
    }

    /// The key, as `sha256:<hex>`.
    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.0.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_boundaries_matter() {
        let mut a = KeyHasher::new("x");
        a.field("ab").field("c");
        let mut b = KeyHasher::new("x");
        b.field("a").field("bc");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn op_kind_matters() {
        assert_ne!(
            KeyHasher::new("run").finish(),
            KeyHasher::new("copy").finish()
        );
    }
}
