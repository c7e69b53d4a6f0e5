//! How a build ended other than successfully, and what that means for its source: a failure
//! of the source is backed off, an outage of the system itself is not.

use merkle_proto::scheduler::v1::{Build, BuildState};
use tonic::{Code, Status};

/// How a build ended other than successfully.
pub enum Ending {
    /// The source's build failed (its directory, its node, its tree).
    Failed(String),
    /// A service of the system itself (DbSync, the Scheduler's own TreeBuilder) could not be
    /// reached: the build failed, the source did not.
    Outage(String),
    Cancelled(String),
}

/// The ending of a call to `service` that failed; `ours`: a service of the system itself,
/// whose being unavailable is an outage, not the source's failure.
pub fn call_failed(service: &str, ours: bool, status: &Status) -> Ending {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded if ours => {
            Ending::Outage(format!("{service} is unavailable: {}", status.message()))
        }
        Code::Unavailable => {
            Ending::Failed(format!("{service} is unavailable: {}", status.message()))
        }
        code => Ending::Failed(format!("{service}: {code:?}: {}", status.message())),
    }
}

/// A call to DbSync failed.
pub fn db_sync_failed(status: &Status) -> Ending {
    call_failed("DbSync", true, status)
}

/// What a build's ending means for its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// The source's own failure: counted, and backed off.
    pub failed: bool,
    /// An outage of the system: not counted against the source.
    pub outage: bool,
}

/// Writes `outcome` on `build` (its final state and, when it did not succeed, the reason).
pub fn settle(build: &mut Build, outcome: Result<BuildState, Ending>) -> Settled {
    let (state, reason, failed, outage) = match outcome {
        Ok(state) => (state, None, false, false),
        Err(Ending::Failed(reason)) => (BuildState::Failed, Some(reason), true, false),
        Err(Ending::Outage(reason)) => (BuildState::Failed, Some(reason), false, true),
        Err(Ending::Cancelled(reason)) => (BuildState::Cancelled, Some(reason), false, false),
    };
    build.state = state as i32;
    if let Some(reason) = reason {
        build.error_message = reason;
    }
    Settled { failed, outage }
}
