//! `--build-context` names in the build: `FROM NAME` and image sources of
//! `COPY --from=NAME` resolve through [`crate::contexts::NamedContext`]
//! before the image store is asked.

use std::sync::Arc;

use super::{blocking, history, push_layer, scratch_state, Ctx, StageState};
use crate::contexts::NamedContext;
use crate::copy::{copy_selections, hash_selection, CopyOptions, Selector};
use crate::error::BuildError;
use crate::fsview::LayerView;
use crate::key::KeyHasher;

impl Ctx {
    /// `FROM NAME` where `--build-context NAME=DIR`: the directory's files
    /// (owned by root, as the build context's are) become the base's one
    /// layer, keyed by their content.
    pub(super) async fn dir_base_state(
        self: Arc<Self>,
        reference: &str,
        label: &str,
        total: usize,
        line: usize,
    ) -> Result<StageState, BuildError> {
        let Some(NamedContext::Dir(dir)) = self.opts.named_contexts.get(reference).cloned() else {
            return Err(BuildError::at(
                line,
                format!("{reference}: not a directory context"),
            ));
        };
        let mut state = scratch_state();
        let backend = self.backend.clone();
        let d = dir.clone();
        let (selections, key) = blocking(move || {
            let view = LayerView::new(vec![d], true);
            let sel = Selector {
                view: &view,
                ignore: None,
                exclude: None,
            }
            .select("/")
            .map_err(|e| e.to_string())?;
            let mut key = KeyHasher::new("dir-context");
            hash_selection(&mut key, &sel, backend.hash_cache(), false)
                .map_err(|e| e.to_string())?;
            Ok((sel, key.finish()))
        })
        .await?;
        let opts = CopyOptions {
            clamp_mtime: self.opts.source_date_epoch,
            ..CopyOptions::default()
        };
        let name = format!("[{label} 1/{total}] FROM {reference} ({})", dir.display());
        let layer = self
            .clone()
            .layer_step(&name, &state, key, move |dst| {
                copy_selections(dst, "/", true, &selections, &opts).map_err(|e| e.to_string())
            })
            .await?;
        let h = history(
            &self.created,
            format!("FROM {reference} (directory {})", dir.display()),
        );
        push_layer(&mut state, layer, h);
        Ok(state)
    }

    /// The image reference `reference` stands for (itself when it names
    /// no context).
    pub(super) fn named_image(&self, reference: &str, line: usize) -> Result<String, BuildError> {
        match self.opts.named_contexts.get(reference) {
            None => Ok(reference.to_string()),
            Some(NamedContext::Image(r)) => Ok(r.clone()),
            Some(NamedContext::Dir(d)) => Err(BuildError::at(
                line,
                format!(
                    "FROM {reference}: a local directory context ({}) as a base is not supported yet; use it with COPY --from={reference}",
                    d.display()
                ),
            )),
            Some(NamedContext::OciLayout(p, _)) => Err(BuildError::at(
                line,
                format!(
                    "{reference}: the oci-layout:// build context ({}) was not imported into the store",
                    p.display()
                ),
            )),
        }
    }
}
