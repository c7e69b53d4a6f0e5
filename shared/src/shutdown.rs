//! Shutdown as a value (the mini-redis pattern): one [`Shutdown`] is created from the process's
//! signals and cloned into every task that must stop; each awaits [`Shutdown::wait`].

use tokio::sync::watch;

/// A cloneable handle that resolves once shutdown has begun.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Begins shutdown for every [`Shutdown`] made from it.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    tx: std::sync::Arc<watch::Sender<bool>>,
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    /// A handle and its trigger, for tests and for programs with their own stop conditions.
    pub fn new() -> (Shutdown, ShutdownTrigger) {
        let (tx, rx) = watch::channel(false);
        (
            Shutdown { rx },
            ShutdownTrigger {
                tx: std::sync::Arc::new(tx),
            },
        )
    }

    /// A handle that begins shutdown on SIGTERM or SIGINT (Ctrl-C).
    pub fn on_signals() -> std::io::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (shutdown, trigger) = Shutdown::new();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(
                signal = name,
                "shutdown requested; draining in-flight calls"
            );
            trigger.trigger();
        });
        Ok(shutdown)
    }

    /// True once shutdown has begun.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn wait(&mut self) {
        // An error means every trigger is gone; nothing can start shutdown any more, so wait
        // forever rather than shutting down by accident.
        if self.rx.wait_for(|triggered| *triggered).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs `round` every `interval` (a round that overruns delays the next) until `shutdown`:
/// a service's periodic background work.
pub fn spawn_every<F, Fut>(interval: std::time::Duration, mut shutdown: Shutdown, mut round: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.wait() => return,
            }
            round().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_trigger() {
        let (shutdown, trigger) = Shutdown::new();
        let mut a = shutdown.clone();
        let mut b = shutdown;
        assert!(!a.is_triggered());
        trigger.trigger();
        a.wait().await;
        b.wait().await;
        assert!(b.is_triggered());
    }
}
