//! Which layers are in use right now, so unreferenced ones can be removed while runs,
//! inspections and commits go on. A [`LayerPin`] is held from before a layer's file is opened
//! (a run until its VM has its disks, a view until it has its files open) or, for a new layer,
//! from before its file is put in place until the image naming it is recorded.
//!
//! A sweep is two steps around a read of the metadata store: [`PinTable::begin`] lists the
//! unpinned layers, the caller reads which layers images reference, and [`PinTable::remove`]
//! deletes the candidates still unreferenced, holding the table's lock. A layer pinned at any
//! time after the sweep began is spared even if its pin is gone again by then: its image may
//! have been recorded after the store was read.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
struct PinState {
    /// Pins held per digest.
    held: HashMap<String, usize>,
    /// The sweep generation in which each digest was last pinned.
    pinned_in: HashMap<String, u64>,
    /// Incremented when a sweep begins.
    generation: u64,
}

/// The pins of one layer store.
#[derive(Debug, Default)]
pub(crate) struct PinTable(Mutex<PinState>);

impl PinTable {
    fn state(&self) -> MutexGuard<'_, PinState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pins `digests` until the returned pin (and its clones) are dropped. `then` runs under
    /// the table's lock, after the pins are counted: a sweep cannot remove a file in between.
    pub(crate) fn pin<T>(self: &Arc<Self>, digests: &[String], then: impl FnOnce() -> T) -> (LayerPin, T) {
        let mut st = self.state();
        let generation = st.generation;
        for d in digests {
            *st.held.entry(d.clone()).or_default() += 1;
            st.pinned_in.insert(d.clone(), generation);
        }
        let out = then();
        drop(st);
        (LayerPin { _held: Arc::new(Held { table: self.clone(), digests: digests.to_vec() }) }, out)
    }

    /// Starts a sweep: of `present`, the digests no one holds now.
    pub(crate) fn begin(&self, present: Vec<String>) -> Sweep {
        let mut st = self.state();
        st.generation += 1;
        let candidates = present.into_iter().filter(|d| !st.held.contains_key(d)).collect();
        Sweep { generation: st.generation, candidates }
    }

    /// Ends a sweep: calls `remove` for each candidate that is not in `referenced`, not held
    /// and not pinned since the sweep began, under the lock; returns those removed.
    pub(crate) fn remove<E>(
        &self,
        sweep: Sweep,
        referenced: &HashSet<String>,
        mut remove: impl FnMut(&str) -> Result<(), E>,
    ) -> Result<Vec<String>, E> {
        let mut st = self.state();
        let mut removed = Vec::new();
        for d in sweep.candidates {
            let recent = st.pinned_in.get(&d).is_some_and(|&g| g >= sweep.generation);
            if referenced.contains(&d) || st.held.contains_key(&d) || recent {
                continue;
            }
            remove(&d)?;
            st.pinned_in.remove(&d);
            removed.push(d);
        }
        Ok(removed)
    }
}

/// The unpinned layers a sweep began with.
#[derive(Debug)]
pub struct Sweep {
    generation: u64,
    candidates: Vec<String>,
}

/// Keeps layers from being removed while held (clones share the pin).
#[derive(Debug, Clone)]
pub struct LayerPin {
    _held: Arc<Held>,
}

#[derive(Debug)]
struct Held {
    table: Arc<PinTable>,
    digests: Vec<String>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut st = self.table.state();
        for d in &self.digests {
            if let Some(n) = st.held.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    st.held.remove(d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn sweep(table: &PinTable, present: &[&str], referenced: &[&str]) -> Vec<String> {
        let s = table.begin(present.iter().map(|s| (*s).to_owned()).collect());
        table.remove(s, &set(referenced), |_| Ok::<_, ()>(())).unwrap()
    }

    #[test]
    fn only_unreferenced_unpinned_layers_go() {
        let table = Arc::new(PinTable::default());
        let (pin, ()) = table.pin(&["a".into()], || ());
        assert_eq!(sweep(&table, &["a", "b", "c"], &["c"]), ["b"], "a held, c referenced");
        drop(pin);
        assert_eq!(sweep(&table, &["a", "c"], &["c"]), ["a"], "a released");
    }

    #[test]
    fn a_pin_taken_during_a_sweep_spares_the_layer_even_once_released() {
        let table = Arc::new(PinTable::default());
        let s = table.begin(vec!["new".into(), "old".into()]);
        // A commit re-publishes `new` and records its image after the store was read; its
        // pin is gone by the time the sweep removes.
        let (pin, ()) = table.pin(&["new".into()], || ());
        drop(pin);
        let removed = table.remove(s, &set(&[]), |_| Ok::<_, ()>(())).unwrap();
        assert_eq!(removed, ["old"]);
        // The next sweep (the store now read after the image was recorded) decides anew.
        assert_eq!(sweep(&table, &["new"], &["new"]), Vec::<String>::new());
    }

    #[test]
    fn pins_count_per_holder() {
        let table = Arc::new(PinTable::default());
        let (a, ()) = table.pin(&["x".into()], || ());
        let (b, ()) = table.pin(&["x".into()], || ());
        let c = b.clone();
        drop(a);
        drop(b);
        assert!(sweep(&table, &["x"], &[]).is_empty(), "a clone still holds it");
        drop(c);
        assert_eq!(sweep(&table, &["x"], &[]), ["x"]);
    }
}
