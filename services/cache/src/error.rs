//! Cache's errors and their gRPC codes.

use merkle_shared::error::{ErrorCode, ServiceError, to_status};

/// What can go wrong in Cache. Messages name the field and the rule, or the missing piece.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// INVALID_ARGUMENT naming `field` and the `rule` it broke.
    pub fn bad_request(field: &str, rule: impl std::fmt::Display) -> Self {
        Error::BadRequest(format!("{field}: {rule}"))
    }
}

impl ServiceError for Error {
    fn error_code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        to_status(&err)
    }
}
