//! A build's record: a new one, and the timestamps it carries.

use chrono::{DateTime, Utc};
use merkle_proto::scheduler::v1::{Build, BuildState, BuildTrigger};

/// `t` as a protobuf timestamp.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// Now, as a protobuf timestamp.
pub fn now() -> prost_types::Timestamp {
    timestamp(Utc::now())
}

/// A new build record.
pub fn new_build(source: &str, trigger: BuildTrigger, state: BuildState) -> Build {
    Build {
        build_id: uuid::Uuid::now_v7().to_string(),
        source: source.to_owned(),
        state: state as i32,
        trigger: trigger as i32,
        create_time: Some(now()),
        ..Default::default()
    }
}
