//! Mebibyte buffers kept for the next stream. A push or cache export
//! runs one short stream per layer (a tar written again, compressed,
//! spooled, uploaded), each of which used to allocate its own 1 MiB
//! buffers; glibc serves allocations that large with `mmap` and gives
//! them back with `munmap`, so every layer paid page faults and the
//! zeroing of fresh pages for its buffers. Streams take their big
//! buffers here and give them back when done: the next layer reuses
//! them. At most [`KEEP`] buffers are kept (what four layers in flight
//! use at once), so the pool never holds more than a busy moment did.

use std::sync::Mutex;

/// Buffers kept at most.
pub const KEEP: usize = 24;
/// The smallest capacity worth keeping.
const MIN_KEEP: usize = 512 * 1024;
/// The largest capacity kept (a buffer that grew for an odd stream is
/// freed, not kept).
const MAX_KEEP: usize = 3 << 20;

static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with room for at least `capacity` bytes: a kept one
/// when one is large enough, else a new one.
pub fn take(capacity: usize) -> Vec<u8> {
    if let Ok(mut free) = FREE.lock() {
        if let Some(i) = free.iter().rposition(|b| b.capacity() >= capacity) {
            let mut b = free.swap_remove(i);
            b.clear();
            return b;
        }
    }
    Vec::with_capacity(capacity)
}

/// A buffer of exactly `len` bytes (their values unspecified: zeros or
/// what an earlier stream left), for reading into.
pub fn take_filled(len: usize) -> Vec<u8> {
    let mut b = take(len);
    b.resize(len, 0);
    b
}

/// Gives a buffer back for reuse; one too small, too large or beyond
/// [`KEEP`] is freed.
pub fn give(b: Vec<u8>) {
    if !(MIN_KEEP..=MAX_KEEP).contains(&b.capacity()) {
        return;
    }
    if let Ok(mut free) = FREE.lock() {
        if free.len() < KEEP {
            free.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_and_the_pool_is_bounded() {
        let b = take(1 << 20);
        let p = b.as_ptr();
        give(b);
        // Other tests may use the pool at the same time: look for ours
        // among what is taken.
        let mut got = Vec::new();
        let mut found = false;
        for _ in 0..KEEP {
            let b = take(1 << 20);
            assert!(b.is_empty() && b.capacity() >= 1 << 20);
            found |= b.as_ptr() == p;
            got.push(b);
        }
        assert!(found, "the buffer given back was not reused");
        for b in got {
            give(b);
        }
        for _ in 0..KEEP + 5 {
            give(Vec::with_capacity(1 << 20));
        }
        assert!(FREE.lock().map(|f| f.len()).unwrap_or(0) <= KEEP);
        // Small and huge buffers are not kept.
        give(Vec::with_capacity(4096));
        give(Vec::with_capacity(64 << 20));
        assert!(FREE
            .lock()
            .map(|f| f
                .iter()
                .all(|b| (MIN_KEEP..=MAX_KEEP).contains(&b.capacity())))
            .unwrap_or(false));
    }

    #[test]
    fn take_filled_has_the_length_asked_for() {
        let mut b = take(1 << 20);
        b.extend_from_slice(&[7; 100]);
        give(b);
        let f = take_filled(1 << 20);
        assert_eq!(f.len(), 1 << 20);
        give(f);
    }
}
