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

impl From<tokio_postgres::Error> for Error {
    fn from(err: tokio_postgres::Error) -> Self {
        Error::Postgres(PgError::Query(err))
    }
}

impl From<bb8::RunError<tokio_postgres::Error>> for Error {
    fn from(err: bb8::RunError<tokio_postgres::Error>) -> Self {
        Error::Postgres(PgError::Pool(err))
    }
}

impl ServiceError for Error {
    fn error_code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Error::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Error::Postgres(PgError::Query(e)) => match e.code().map(|c| c.code()) {
                Some(code) if !["08", "40", "53", "57"].iter().any(|c| code.starts_with(c)) => {
                    ErrorCode::Internal
                }
                _ => ErrorCode::Unavailable,
            },
            Error::Postgres(_) | Error::Unavailable(_) => ErrorCode::Unavailable,
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
