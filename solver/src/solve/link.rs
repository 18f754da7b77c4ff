//! `COPY/ADD --link` in the build: the step's files are written on an
//! empty parent snapshot under a key that leaves out the chain below (so
//! a changed base reuses the layer, BuildKit's `llb.Merge` of a scratch
//! copy), then the layer is stacked on the current chain under a second
//! key that does include it. Only the stacking repeats when the base
//! changes; the copy, its hashing into a blob and its diffID do not.

use std::sync::Arc;
use std::time::Instant;

use super::{blocking, Solved, Solver};
use crate::backend::LayerRecord;
use crate::error::BuildError;
use crate::fsview::LayerView;
use crate::op::key::link_stack_key;

impl Solver {
    /// Runs (or reuses) a `--link` layer whose key `key` excludes the
    /// chain, and stacks it on `state`.
    pub(super) async fn link_step<F>(
        self: Arc<Self>,
        name: &str,
        state: &Solved,
        key: String,
        ignore_cache: bool,
        work: F,
    ) -> Result<LayerRecord, BuildError>
    where
        F: FnOnce(&LayerView) -> Result<Option<kiln_cache::StreamedDiff>, BuildError>
            + Send
            + 'static,
    {
        let id = self.progress.start(name.to_string());
        let t = Instant::now();
        let stack_key = link_stack_key(&key, &state.key);
        tracing::debug!(step = id, %name, key = %key, stack_key = %stack_key, "step cache key");
        let parent = state.top().map(str::to_string);
        let me = self.clone();
        let sk = stack_key.clone();
        let r = self
            .single_flight(&stack_key, async move {
                if let Some(hit) = me
                    .cache_lookup(&sk, ignore_cache, parent.as_deref())
                    .await?
                {
                    // The copy's own record (on no parent) is looked up
                    // too: a cache export (`mode=max`) then names it, so a
                    // runner whose chain below differs reuses the copy —
                    // and its last use is marked for prune. A miss or a
                    // failure here changes nothing for this build.
                    let _ = me.cache_lookup(&key, ignore_cache, None).await;
                    return Ok((hit, true));
                }
                let (layer, cached) = me.clone().build_once(key, None, ignore_cache, work).await?;
                let backend = me.backend.clone();
                let stacked =
                    blocking(move || backend.stack_layer(parent.as_deref(), &layer, &sk)).await?;
                Ok((stacked, cached))
            })
            .await;
        self.finish(id, t, r)
    }
}
