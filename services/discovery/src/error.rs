//! Discovery's errors and their gRPC codes.

use merkle_shared::error::{ErrorCode, ServiceError, to_status};

/// What can go wrong in Discovery. Messages name the field or the backend setting.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The backend could not be read and no list is known.
    #[error("{0}")]
    Unavailable(String),
}

impl ServiceError for Error {
    fn error_code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        to_status(&err)
    }
}

/// Why a backend call failed; kept as text so a STALE answer can carry it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The backend is misconfigured; the message names the setting.
    #[error("{0}")]
    Config(String),
    /// It could not be reached or did not answer in time.
    #[error("{0}")]
    Unreachable(String),
    /// It refused the credentials.
    #[error("{0}")]
    Denied(String),
    /// The node asked for no longer exists.
    #[error("{0}")]
    Gone(String),
    /// It answered something that does not parse, or an error status.
    #[error("{0}")]
    BadAnswer(String),
}

/// The first `max` characters of a backend's answer, for a log line or an error message.
pub fn snippet(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}
