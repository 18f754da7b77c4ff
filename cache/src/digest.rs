//! Content digests: the store uses kiln-image's [`Digest`] (`sha256:<hex>`)
//! and its streaming [`Hasher`], so blobs, manifests and configs name
//! content the same way everywhere.

pub use kiln_image::{Digest, Hasher};
