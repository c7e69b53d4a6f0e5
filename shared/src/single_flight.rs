//! Single-flight: concurrent calls for the same key share one execution (Go's
//! `golang.org/x/sync/singleflight`). A hundred requests missing the same cache key cause one
//! database read, not a hundred.
//!
//! The shared work is a `'static` future: when the caller that started it goes away, the
//! others keep driving it, so one impatient caller cannot fail the rest.

use parking_lot::Mutex;
use std::{collections::HashMap, future::Future, hash::Hash};

use futures::future::{BoxFuture, FutureExt as _, Shared};

/// Calls in flight, by key.
pub struct SingleFlight<K, V> {
    calls: Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            calls: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone + Send + Sync + 'static,
{
    /// Runs the future `start` makes, unless a call with the same key is in flight: then waits
    /// for that one and returns a clone of its output. `start` runs only when no call is.
    pub async fn run<F>(&self, key: K, start: impl FnOnce() -> F) -> V
    where
        F: Future<Output = V> + Send + 'static,
    {
        let call = {
            let mut calls = self.lock();
            calls
                .entry(key.clone())
                .or_insert_with(|| start().boxed().shared())
                .clone()
        };
        let output = call.clone().await;
        let mut calls = self.lock();
        if calls.get(&key).is_some_and(|c| c.ptr_eq(&call)) {
            calls.remove(&key);
        }
        output
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<K, Shared<BoxFuture<'static, V>>>> {
        // The map holds no invariant a panic could break half-way.
        self.calls.lock()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicU32, Ordering},
        },
        time::Duration,
    };

    use super::*;

    #[tokio::test]
    async fn concurrent_calls_share_one_execution() {
        let flights = Arc::new(SingleFlight::<String, u32>::default());
        let runs = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let flights = flights.clone();
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                flights
                    .run("k".to_owned(), move || async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 7
                    })
                    .await
            }));
        }
        for task in tasks {
            assert_eq!(task.await.expect("task"), 7);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(flights.in_flight(), 0, "finished calls are forgotten");

        // A later call runs again.
        let again = flights.run("k".to_owned(), || async { 9 }).await;
        assert_eq!(again, 9);
    }

    #[tokio::test]
    async fn the_others_finish_when_the_first_caller_leaves() {
        let flights = Arc::new(SingleFlight::<u8, u8>::default());
        let first = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run(1, || async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        5
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run(1, || async { 99 }).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        assert_eq!(second.await.expect("second"), 5, "joined the first call");
    }
}
