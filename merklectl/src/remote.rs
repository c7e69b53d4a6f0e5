//! What every command that talks to a running service shares: the channel (built by the
//! services' own client builder) and readable errors.

use std::time::Duration;

use merkle_proto::dbsync::v1::db_sync_service_client::DbSyncServiceClient;
use merkle_shared::{
    client::{Channel, channel},
    config::ClientArgs,
};

/// A channel to the service at `addr` (`http://host:port`, or `https://host:port` with the
/// services' TLS variables, `TLS_CA_FILE` and for mutual TLS `TLS_CERT_FILE`/`TLS_KEY_FILE`).
/// Calls present the command's bearer token (`crate::credentials::install_for_commands`).
pub fn connect(addr: &str) -> anyhow::Result<Channel> {
    static SETUP: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    SETUP
        .get_or_init(|| {
            merkle_shared::tls::init(&merkle_shared::tls::TlsArgs::from_env())
                .map_err(|e| e.to_string())?;
            crate::credentials::install_for_commands().map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    let args = ClientArgs {
        client_connect_timeout: Duration::from_secs(3),
        client_request_timeout: Duration::from_secs(60),
        client_max_attempts: 1,
    };
    Ok(channel("--addr", addr, &args)?)
}

/// The local stack's DbSync.
pub const DB_SYNC_DEFAULT_ADDR: &str = "http://127.0.0.1:50053";

/// Where DbSync is.
#[derive(Debug, Clone, clap::Args)]
pub struct DbSyncAddr {
    /// DbSync's address (default: the local stack's).
    #[arg(long = "addr", env = "DB_SYNC_ADDR", default_value = DB_SYNC_DEFAULT_ADDR)]
    pub addr: String,
}

impl DbSyncAddr {
    pub(crate) fn client(&self) -> anyhow::Result<DbSyncServiceClient<Channel>> {
        Ok(DbSyncServiceClient::new(connect(&self.addr)?).max_decoding_message_size(64 << 20))
    }

    pub(crate) fn failed(&self) -> impl FnOnce(tonic::Status) -> anyhow::Error {
        call_failed("DbSync", &self.addr)
    }
}

/// `"<service> at <addr>: <CODE>: <message>"`, for a failed call.
pub fn call_failed(
    service: &'static str,
    addr: &str,
) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    let addr = addr.to_owned();
    move |status| {
        let code = format!("{:?}", status.code());
        let hint = if status.code() == tonic::Code::Unauthenticated {
            format!(
                " (set {}=<token file>, e.g. .data/auth/admin.token of the stack)",
                crate::credentials::TOKEN_FILE_VARIABLE
            )
        } else {
            String::new()
        };
        anyhow::anyhow!(
            "{service} at {addr}: {}: {}{hint}",
            screaming_snake(&code),
            status.message()
        )
    }
}

/// `InvalidArgument` -> `INVALID_ARGUMENT`, the way gRPC names its codes.
fn screaming_snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_service_and_the_code() {
        let err =
            call_failed("Cache", "http://127.0.0.1:1")(tonic::Status::failed_precondition("no"));
        assert_eq!(
            err.to_string(),
            "Cache at http://127.0.0.1:1: FAILED_PRECONDITION: no"
        );
    }
}
