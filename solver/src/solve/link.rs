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
        work: F,
    ) -> Result<LayerRecord, BuildError>
    where
        F: FnOnce(&LayerView) -> Result<(), BuildError> + Send + 'static,
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
                if let Some(hit) = me.cache_lookup(&sk).await? {
                    return Ok((hit, true));
                }
                let inner = me.clone();
                let k = key.clone();
                let (layer, cached) = me
                    .single_flight(&key, async move {
                        if let Some(hit) = inner.cache_lookup(&k).await? {
                            return Ok((hit, true));
                        }
                        let backend = inner.backend.clone();
                        let opts = inner.diff_options();
                        let cancel = inner.cancel.clone();
                        let layer = blocking(move || -> Result<_, BuildError> {
                            let active = backend.prepare(None)?;
                            let view = LayerView::new(active.layers.clone(), false);
                            let worked = work(&view);
                            if cancel.is_cancelled() {
                                backend.abort(active);
                                return Err(BuildError::Cancelled);
                            }
                            if let Err(e) = worked {
                                backend.abort(active);
                                return Err(e);
                            }
                            Ok(backend.commit(active, &k, &opts)?)
                        })
                        .await?;
                        Ok((layer, false))
                    })
                    .await?;
                let backend = me.backend.clone();
                let stacked =
                    blocking(move || backend.stack_layer(parent.as_deref(), &layer, &sk)).await?;
                Ok((stacked, cached))
            })
            .await;
        self.finish(id, t, r)
    }
}
