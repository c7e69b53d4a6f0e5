//! Builds running in this process: their live state for GetBuild and WatchBuild, and their
//! cancellation. A build's state goes three ways as it changes: here at once (watchers), to the
//! cache's `NAMESPACE_BUILD_STATUS` at most a few times a second (so other replicas see its
//! progress), and to PostgreSQL on every state change and every few seconds (the record).

use parking_lot::Mutex;
use std::{collections::HashMap, sync::Arc};

use merkle_proto::scheduler::v1::{Build, BuildState};
use tokio::sync::watch;

/// True once a build ended (succeeded, failed, cancelled or skipped).
pub fn is_final(build: &Build) -> bool {
    !matches!(
        BuildState::try_from(build.state),
        Ok(BuildState::Queued | BuildState::Running | BuildState::Unspecified)
    )
}

struct Live {
    state: watch::Sender<Build>,
    cancel: watch::Sender<Option<String>>,
}

/// The builds this process runs.
#[derive(Default, Clone)]
pub struct Registry {
    builds: Arc<Mutex<HashMap<String, Live>>>,
}

/// A running build's handle: publish its state, learn of its cancellation.
pub struct Handle {
    id: String,
    registry: Registry,
    state: watch::Sender<Build>,
    pub cancelled: watch::Receiver<Option<String>>,
}

impl Registry {
    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Live>> {
        self.builds.lock()
    }

    /// Starts tracking a build; dropping the handle forgets it.
    pub fn register(&self, build: Build) -> Handle {
        let id = build.build_id.clone();
        let (state, _) = watch::channel(build);
        let (cancel, cancelled) = watch::channel(None);
        self.lock().insert(
            id.clone(),
            Live {
                state: state.clone(),
                cancel,
            },
        );
        Handle {
            id,
            registry: self.clone(),
            state,
            cancelled,
        }
    }

    /// The live state of a build running here.
    pub fn get(&self, id: &str) -> Option<Build> {
        self.lock().get(id).map(|l| l.state.borrow().clone())
    }

    /// Follows a build running here.
    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Build>> {
        self.lock().get(id).map(|l| l.state.subscribe())
    }

    /// Asks a build running here to stop; false when it does not run here.
    pub fn cancel(&self, id: &str, reason: &str) -> bool {
        match self.lock().get(id) {
            Some(live) => {
                live.cancel.send_replace(Some(reason.to_owned()));
                true
            }
            None => false,
        }
    }

    /// How many builds run here.
    pub fn running(&self) -> usize {
        self.lock().len()
    }
}

impl Handle {
    /// Publishes the build's state to its watchers here.
    pub fn publish(&self, build: &Build) {
        self.state.send_replace(build.clone());
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}
