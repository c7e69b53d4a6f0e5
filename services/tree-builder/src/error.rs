//! TreeBuilder's errors and their gRPC codes.

use merkle_core::BuildError;
use merkle_shared::error::{ErrorCode, ServiceError, to_status};

/// What can go wrong in TreeBuilder. Messages name the field or path and the rule.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("the build stopped unexpectedly: {0}")]
    Internal(String),
}

impl ServiceError for Error {
    fn error_code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Error::Internal(_) => ErrorCode::Internal,
            Error::Build(e) => match e {
                BuildError::NotFound(_) => ErrorCode::NotFound,
                BuildError::Vanished(_) => ErrorCode::Aborted,
                BuildError::NotADirectory(_) | BuildError::BadPattern { .. } => {
                    ErrorCode::BadRequest
                }
                BuildError::Unreadable { .. } => ErrorCode::FailedPrecondition,
                BuildError::Changed { .. } => ErrorCode::Aborted,
                BuildError::TooManyEntries { .. } | BuildError::TooDeep { .. } => {
                    ErrorCode::ResourceExhausted
                }
                BuildError::Cancelled => ErrorCode::Cancelled,
                BuildError::Threads(_) => ErrorCode::Internal,
            },
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        to_status(&err)
    }
}
