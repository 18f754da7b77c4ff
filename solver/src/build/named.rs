//! `--build-context` names in the build: `FROM NAME` and image sources of
//! `COPY --from=NAME` resolve through [`crate::contexts::NamedContext`]
//! before the image store is asked.

use super::Ctx;
use crate::contexts::NamedContext;
use crate::error::BuildError;

impl Ctx {
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
