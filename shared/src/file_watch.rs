//! Files read again when they change: TLS certificates and keys, identities and tokens, which a
//! Kubernetes Secret (or an operator) replaces under a running service. Polled by modification
//! time and size, which works on every file system and through a Secret's symlink swap.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

/// How often watched files are looked at.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// The files' modification times and sizes: a change in any means a reload.
fn stamp(paths: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Calls `reload` (on the runtime, every [`RELOAD_EVERY`]) whenever one of `paths` changed
/// since the last successful reload; `reload` returns false when the files cannot be used yet
/// (half-written), so they are read again next time. Does nothing outside a Tokio runtime.
pub fn on_change(paths: Vec<PathBuf>, mut reload: impl FnMut() -> bool + Send + 'static) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if paths.is_empty() {
        return;
    }
    runtime.spawn(async move {
        let mut seen = stamp(&paths);
        loop {
            tokio::time::sleep(RELOAD_EVERY).await;
            let now = stamp(&paths);
            if now != seen && reload() {
                seen = now;
            }
        }
    });
}
