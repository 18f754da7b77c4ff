//! Image references as the registry client needs them: registry host,
//! repository path and tag or digest. The parser lives in
//! [`kiln_image::reference`], shared with the store.

pub use kiln_image::reference::{
    api_host, Reference, ReferenceError, DOCKER_HUB, DOCKER_HUB_AUTH_KEY,
};

impl From<ReferenceError> for crate::RegistryError {
    fn from(e: ReferenceError) -> Self {
        crate::RegistryError::Reference(e.reference, e.reason.to_string())
    }
}
