//! DbSync's errors and their gRPC codes.

use merkle_shared::{
    error::{ErrorCode, ServiceError, to_status},
    postgres::PgError,
};

/// What can go wrong in DbSync. Messages name the field, node or source, and the rule.
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
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Cancelled(String),
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// A stored node or record that no longer matches its hash.
    #[error("{0}")]
    DataLoss(String),
    #[error("{0}")]
    Internal(String),
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
            Error::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            Error::Cancelled(_) => ErrorCode::Cancelled,
            // A query that failed because the server went away, is shutting down, is out of
            // resources or lost a serialization race is worth a retry (UNAVAILABLE); one
            // that PostgreSQL refused otherwise is a bug here.
            Error::Postgres(PgError::Query(e)) => match e.code().map(|c| c.code()) {
                Some(code)
                    if !["08", "40", "53", "57"]
                        .iter()
                        .any(|class| code.starts_with(class)) =>
                {
                    ErrorCode::Internal
                }
                _ => ErrorCode::Unavailable,
            },
            Error::Postgres(PgError::Migration { .. }) => ErrorCode::Unavailable,
            Error::Postgres(PgError::Pool(_)) => ErrorCode::Unavailable,
            Error::DataLoss(_) => ErrorCode::DataLoss,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        to_status(&err)
    }
}
