//! Cache keys: `sha256` over length-prefixed fields, so that no two
//! different field sequences can hash alike.

use sha2::{Digest as _, Sha256};

/// Incremental builder of a cache key.
#[derive(Clone)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    /// Starts a key for an op of kind `op` (e.g. `"run"`, `"copy"`).
    pub fn new(op: &str) -> Self {
        let mut h = KeyHasher(Sha256::new());
        h.field("kiln-key-v1");
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
