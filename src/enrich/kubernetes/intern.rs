//! One copy of each repeated string (namespaces, nodes, workloads, labels):
//! with ten thousand pods this is most of what keeps a pod under its memory
//! budget.

use std::sync::Arc;

/// A fast, randomly seeded map: keys are cluster data, not attacker-chosen
/// at a rate that matters, and lookups are on the flow path.
pub(crate) type Map<K, V> = foldhash::HashMap<K, V>;
/// The set counterpart of [`Map`].
pub(crate) type Set<T> = foldhash::HashSet<T>;

/// Interned strings. Strings nothing else holds any more are dropped by
/// [`Interner::sweep`].
#[derive(Debug, Default)]
pub(crate) struct Interner {
    strings: Set<Arc<str>>,
    /// How many strings were left by the last sweep.
    after_sweep: usize,
}

impl Interner {
    /// The shared copy of `s`.
    pub(crate) fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(s);
        self.strings.insert(shared.clone());
        shared
    }

    /// Drops the strings only the interner still holds, once the set has
    /// doubled since the last sweep (so the cost stays proportional to the
    /// churn).
    pub(crate) fn sweep(&mut self) {
        if self.strings.len() < 2 * self.after_sweep + 1024 {
            return;
        }
        self.strings.retain(|s| Arc::strong_count(s) > 1);
        self.after_sweep = self.strings.len();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.strings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_forgets() {
        let mut strings = Interner::default();
        let a = strings.get("shop");
        let b = strings.get("shop");
        assert!(Arc::ptr_eq(&a, &b));
        for i in 0..2000 {
            strings.get(&format!("gone-{i}"));
        }
        strings.sweep();
        assert_eq!(strings.len(), 1);
        assert!(Arc::ptr_eq(&strings.get("shop"), &a));
    }
}
