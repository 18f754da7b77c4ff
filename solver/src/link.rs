//! `COPY/ADD --link` on the store: a layer built on an empty parent is
//! stacked onto the current chain by applying its blob as a new snapshot
//! over the chain's top. Only that cheap apply depends on the base; the
//! layer (its files, its blob, its diffID) is reused as it is.

use kiln_cache::Store;

use crate::backend::{BackendError, BackendResult, LayerRecord};
use crate::store::chain_id;

/// Puts `layer` (committed on an empty parent) on top of `parent` and
/// records the result under `key`.
pub(crate) fn stack_layer(
    store: &Store,
    parent: Option<&str>,
    layer: &LayerRecord,
    key: &str,
) -> BackendResult<LayerRecord> {
    let blob: kiln_cache::Digest = layer
        .digest
        .as_str()
        .parse()
        .map_err(BackendError::ctx("layer digest"))?;
    let diff: kiln_cache::Digest = layer
        .diff_id
        .as_str()
        .parse()
        .map_err(BackendError::ctx("layer diff id"))?;
    let name = match parent {
        // On an empty base the linked layer is its own snapshot.
        None => layer.snapshot.clone(),
        Some(p) => {
            let name = chain_id(Some(p), layer.diff_id.as_str());
            store
                .unpack_layer(
                    &name,
                    Some(p),
                    kiln_cache::LayerBlob {
                        digest: &blob,
                        size: Some(layer.size),
                        diff_id: &diff,
                    },
                )
                .map_err(BackendError::ctx("stacking a --link layer"))?;
            let _ = store.meta().add_blob_snapshot(&blob, &name);
            name
        }
    };
    store
        .meta()
        .cache_put(key, Some(&name), Some(&diff), std::slice::from_ref(&blob))
        .map_err(BackendError::ctx("cache index"))?;
    Ok(LayerRecord {
        snapshot: name,
        ..layer.clone()
    })
}
