//! Background work that a graceful stop must let finish before storage closes (pending-lead
//! re-auctions): once stopping, no new work starts, and the stop waits for what runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    stopping: AtomicBool,
    running: AtomicUsize,
    idle: Notify,
}

/// Held while a piece of background work runs.
pub struct DrainGuard {
    inner: Arc<Inner>,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.inner.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Starts a piece of work, or `None` once the stop has begun.
    pub fn enter(&self) -> Option<DrainGuard> {
        self.inner.running.fetch_add(1, Ordering::AcqRel);
        let guard = DrainGuard {
            inner: self.inner.clone(),
        };
        (!self.inner.stopping.load(Ordering::Acquire)).then_some(guard)
    }

    /// Refuses new work from now on; what runs goes on.
    pub fn refuse_new(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }

    /// Refuses new work and waits up to `limit` for the running work; `true` when all ended.
    pub async fn stop_and_wait(&self, limit: Duration) -> bool {
        self.refuse_new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.inner.idle.notified();
            if self.inner.running.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.inner.running.load(Ordering::Acquire) == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_running_work_and_refuses_new_work() {
        let drain = Drain::default();
        let guard = drain.enter().expect("running");
        let waiter = {
            let drain = drain.clone();
            tokio::spawn(async move { drain.stop_and_wait(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(drain.enter().is_none(), "no new work once stopping");
        assert!(!waiter.is_finished());
        // Refusing new work alone lets what runs go on.
        let other = Drain::default();
        let running = other.enter().expect("running");
        other.refuse_new();
        assert!(other.enter().is_none());
        drop(running);
        assert!(other.stop_and_wait(Duration::ZERO).await);
        drop(guard);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_limit() {
        let drain = Drain::default();
        let _guard = drain.enter().unwrap();
        assert!(!drain.stop_and_wait(Duration::from_secs(1)).await);
    }
}
