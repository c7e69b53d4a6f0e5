//! The one map from a service's errors to gRPC statuses.
//!
//! Each crate has its own `thiserror` enum and implements [`ServiceError`] for it, saying which
//! [`ErrorCode`] each variant is; [`to_status`] alone knows the gRPC codes. The crate then writes
//! `impl From<Error> for tonic::Status { fn from(e) -> Self { to_status(&e) } }`.

use tonic::{Code, Status};

/// What kind of failure an error is, independent of gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is malformed: a field breaks a rule.
    BadRequest,
    /// A position past the end of what exists (e.g. a tree size past the log's); a later call
    /// may succeed.
    OutOfRange,
    /// What the request names does not exist.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// The caller may not do this (e.g. a path outside the allowed roots).
    PermissionDenied,
    /// The system is not in a state that allows this.
    FailedPrecondition,
    /// A configured limit was exceeded.
    ResourceExhausted,
    /// The operation was aborted, e.g. a file changed while it was read; retry may succeed.
    Aborted,
    /// The caller cancelled.
    Cancelled,
    /// A dependency (PostgreSQL, Redis, another service) is unavailable; retry later.
    Unavailable,
    /// It took too long.
    Timeout,
    /// This server does not do this (yet); the message says which piece is missing.
    Unimplemented,
    /// Stored data is corrupted (e.g. a stored node no longer matches its hash).
    DataLoss,
    /// A bug or an unexpected failure.
    Internal,
}

impl ErrorCode {
    /// The kind of failure a gRPC code from another service stands for, to pass it on.
    pub fn from_grpc(code: Code) -> ErrorCode {
        match code {
            Code::InvalidArgument => ErrorCode::BadRequest,
            Code::OutOfRange => ErrorCode::OutOfRange,
            Code::NotFound => ErrorCode::NotFound,
            Code::AlreadyExists => ErrorCode::AlreadyExists,
            Code::PermissionDenied | Code::Unauthenticated => ErrorCode::PermissionDenied,
            Code::FailedPrecondition => ErrorCode::FailedPrecondition,
            Code::ResourceExhausted => ErrorCode::ResourceExhausted,
            Code::Aborted => ErrorCode::Aborted,
            Code::Cancelled => ErrorCode::Cancelled,
            Code::Unavailable => ErrorCode::Unavailable,
            Code::DeadlineExceeded => ErrorCode::Timeout,
            Code::Unimplemented => ErrorCode::Unimplemented,
            Code::DataLoss => ErrorCode::DataLoss,
            Code::Ok | Code::Unknown | Code::Internal => ErrorCode::Internal,
        }
    }
}

/// Implemented by each crate's error enum.
pub trait ServiceError: std::fmt::Display {
    fn error_code(&self) -> ErrorCode;
}

/// The gRPC status for an error: its code from [`ErrorCode`] and its message from `Display`.
/// Internal errors are logged here, with their full text, so no handler has to.
pub fn to_status<E: ServiceError + ?Sized>(err: &E) -> Status {
    let code = match err.error_code() {
        ErrorCode::BadRequest => Code::InvalidArgument,
        ErrorCode::OutOfRange => Code::OutOfRange,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::PermissionDenied => Code::PermissionDenied,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        ErrorCode::ResourceExhausted => Code::ResourceExhausted,
        ErrorCode::Aborted => Code::Aborted,
        ErrorCode::Cancelled => Code::Cancelled,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Timeout => Code::DeadlineExceeded,
        ErrorCode::Unimplemented => Code::Unimplemented,
        ErrorCode::DataLoss => {
            tracing::error!(error = %err, "stored data is corrupted");
            Code::DataLoss
        }
        ErrorCode::Internal => {
            tracing::error!(error = %err, "internal error");
            Code::Internal
        }
    };
    Status::new(code, err.to_string())
}

/// An INVALID_ARGUMENT status naming the field and the rule it broke.
pub fn invalid_argument(field: &str, rule: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {rule}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Example {
        #[error("path: must be under an allowed root")]
        Outside,
        #[error("database unavailable")]
        Down,
    }

    impl ServiceError for Example {
        fn error_code(&self) -> ErrorCode {
            match self {
                Example::Outside => ErrorCode::PermissionDenied,
                Example::Down => ErrorCode::Unavailable,
            }
        }
    }

    #[test]
    fn codes_map_to_grpc_and_keep_the_message() {
        let status = to_status(&Example::Outside);
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "path: must be under an allowed root");
        assert_eq!(to_status(&Example::Down).code(), Code::Unavailable);
    }

    #[test]
    fn invalid_argument_names_field_and_rule() {
        let status = invalid_argument("page_size", "must be at most 1000");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "page_size: must be at most 1000");
    }
}
