//! Run slots: a server-wide limit and a per-namespace one. A run takes its namespace's
//! permit first and only then queues for a server slot, so a namespace at its maximum has no
//! waiter in the server queue: the slots it cannot use go, in FIFO order (tokio's semaphores
//! are fair), to runs of other namespaces. With the default per-namespace maximum one server
//! slot always stays for the others.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The default per-namespace maximum: all but one of the server's slots (1 when it has 1).
pub(crate) fn default_per_namespace(total: usize) -> usize {
    total.saturating_sub(1).max(1)
}

/// Both permits of a run; dropping it frees them.
pub(crate) struct RunPermit {
    _global: OwnedSemaphorePermit,
    _namespace: OwnedSemaphorePermit,
}

/// Waits for the namespace's permit, then for a server slot. `None` if a semaphore was closed.
pub(crate) async fn acquire(namespace: Arc<Semaphore>, global: Arc<Semaphore>) -> Option<RunPermit> {
    let ns = namespace.acquire_owned().await.ok()?;
    let global = global.acquire_owned().await.ok()?;
    Some(RunPermit { _global: global, _namespace: ns })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Namespace A floods with `runs` runs; returns whether one run of B starts while A's hold
    /// their slots.
    async fn b_gets_a_slot(total: usize, per_ns: usize, runs: usize) -> bool {
        let global = Arc::new(Semaphore::new(total));
        let (a, b) = (Arc::new(Semaphore::new(per_ns)), Arc::new(Semaphore::new(per_ns)));
        let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..runs {
            let (a, global, held_tx) = (a.clone(), global.clone(), held_tx.clone());
            tokio::spawn(async move {
                let permit = acquire(a, global).await.unwrap();
                let _ = held_tx.send(());
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(permit);
            });
        }
        // A's first runs hold their slots before B arrives.
        for _ in 0..per_ns.min(total) {
            held_rx.recv().await.unwrap();
        }
        tokio::time::timeout(Duration::from_millis(300), acquire(b, global)).await.is_ok()
    }

    #[tokio::test]
    async fn a_flooding_namespace_leaves_a_slot_for_another() {
        // The starvation is observable: with a per-namespace maximum equal to the server's,
        // A's flood takes every slot and B waits.
        assert!(!b_gets_a_slot(4, 4, 20).await);
        // With the default, B starts at once.
        assert!(b_gets_a_slot(4, default_per_namespace(4), 20).await);
        assert!(b_gets_a_slot(2, default_per_namespace(2), 20).await);
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_waiting_namespace_not_the_flooder() {
        let global = Arc::new(Semaphore::new(2));
        let (a, b) = (Arc::new(Semaphore::new(1)), Arc::new(Semaphore::new(1)));
        let first_a = acquire(a.clone(), global.clone()).await.unwrap();
        let first_b = acquire(b.clone(), global.clone()).await.unwrap();
        // C queues for a server slot; A's next run is held back by A's own maximum.
        let c = Arc::new(Semaphore::new(1));
        let c_run = tokio::spawn(acquire(c, global.clone()));
        let a_next = tokio::spawn(acquire(a.clone(), global.clone()));
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first_b);
        let c_permit = tokio::time::timeout(Duration::from_secs(1), c_run).await.expect("C got B's slot");
        assert!(c_permit.unwrap().is_some());
        assert!(!a_next.is_finished(), "A stays at its maximum");
        drop(first_a);
        assert!(tokio::time::timeout(Duration::from_secs(1), a_next).await.is_ok());
    }

    #[test]
    fn default_maximum() {
        assert_eq!(default_per_namespace(0), 1);
        assert_eq!(default_per_namespace(1), 1);
        assert_eq!(default_per_namespace(2), 1);
        assert_eq!(default_per_namespace(4), 3);
    }
}
