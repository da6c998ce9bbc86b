//! [`Memo`]: a bounded cache keyed by a text's hash and length, for work done per message that
//! later requests repeat (token counts, lossless rewrites). Two generations: lookups promote
//! from the old one, and when the young one fills (entries or bytes) the old one is dropped. A
//! cheap bound that keeps what the live conversations use.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

pub(crate) struct Memo<V> {
    inner: Mutex<Generations<V>>,
    max_entries: usize,
    max_bytes: usize,
}

struct Generations<V> {
    young: HashMap<(u64, usize), V>,
    old: HashMap<(u64, usize), V>,
    young_bytes: usize,
}

impl<V: Clone> Memo<V> {
    /// A memo of up to `max_entries` and `max_bytes` (as `weigh` counts them) per generation.
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Self {
        let generations = Generations { young: HashMap::new(), old: HashMap::new(), young_bytes: 0 };
        Self { inner: Mutex::new(generations), max_entries, max_bytes }
    }

    /// The value for `text` under `kind`, computed by `make` on a miss; `weigh` is a value's
    /// size in bytes.
    pub(crate) fn get_or(
        &self,
        text: &str,
        kind: u64,
        make: impl FnOnce() -> V,
        weigh: impl Fn(&V) -> usize,
    ) -> V {
        let key = (hash(text) ^ kind, text.len());
        if let Ok(mut g) = self.inner.lock() {
            if let Some(v) = g.young.get(&key) {
                return v.clone();
            }
            if let Some(v) = g.old.remove(&key) {
                self.insert(&mut g, key, v.clone(), weigh(&v));
                return v;
            }
        }
        let value = make();
        if let Ok(mut g) = self.inner.lock() {
            self.insert(&mut g, key, value.clone(), weigh(&value));
        }
        value
    }

    fn insert(&self, g: &mut Generations<V>, key: (u64, usize), value: V, bytes: usize) {
        if g.young.len() >= self.max_entries || g.young_bytes + bytes > self.max_bytes {
            g.old = std::mem::take(&mut g.young);
            g.young_bytes = 0;
        }
        g.young_bytes += bytes;
        g.young.insert(key, value);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().map_or(0, |g| g.young.len())
    }
}

fn hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}
