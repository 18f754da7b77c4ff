//! Docker-style image reference normalisation
//! (`busybox` -> `docker.io/library/busybox:latest`), through the one
//! parser in [`kiln_image::reference`].

use crate::error::{Error, Result};

/// Normalise an image reference the way Docker does
/// ([`kiln_image::reference::normalize`]):
/// `busybox` -> `docker.io/library/busybox:latest`,
/// `user/app:1` -> `docker.io/user/app:1`,
/// `localhost:5000/app` -> `localhost:5000/app:latest`,
/// `index.docker.io/x` -> `docker.io/library/x:latest`,
/// `name@sha256:…` keeps its digest (and gets no default tag).
pub fn normalize_reference(reference: &str) -> Result<String> {
    kiln_image::reference::normalize(reference).map_err(|e| Error::InvalidReference {
        reference: e.reference,
        reason: e.reason,
    })
}
