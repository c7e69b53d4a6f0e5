//! Scheduler's errors and their gRPC codes.

use merkle_shared::{
    error::{ErrorCode, ServiceError, to_status},
    postgres::PgError,
};

/// What can go wrong in the Scheduler. Messages name the field, source or build, and the rule.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// An answer from another service, passed on as it came.
    #[error("{}", .0.message())]
    Remote(tonic::Status),
}

impl Error {
    /// INVALID_ARGUMENT naming `field` and the `rule` it broke.
    pub fn bad_request(field: &str, rule: impl std::fmt::Display) -> Self {
        Error::BadRequest(format!("{field}: {rule}"))
    }
}

merkle_shared::from_postgres!(Error::Postgres);

impl ServiceError for Error {
    fn error_code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Error::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Error::Postgres(e) => e.error_code(),
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::Internal(_) => ErrorCode::Internal,
            Error::Remote(status) => ErrorCode::from_grpc(status.code()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Remote(status) => status,
            other => to_status(&other),
        }
    }
}
