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
    OutOfRange(String),
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

merkle_shared::from_postgres!(Error::Postgres);

impl ServiceError for Error {
    fn error_code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::OutOfRange(_) => ErrorCode::OutOfRange,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Error::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Error::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            Error::Cancelled(_) => ErrorCode::Cancelled,
            Error::Postgres(e) => e.error_code(),
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
