//! The transparency log as C2SP tlog-tiles (read-only): `checkpoint`, hash tiles
//! `tile/<L>/<N>[.p/<W>]` and entry bundles `tile/entries/<N>[.p/<W>]`, tile height 8, each
//! leaf's entry its 32-byte record hash. Served over HTTP on `LOG_LISTEN_ADDR` and by the
//! GetLogTile RPC (`merklectl export-log` writes them to a directory any web server can serve).

use std::sync::Arc;

use merkle_shared::log_tiles::{HEIGHT, WIDTH, parse};
use merkle_shared::{
    http_get::{Reply, StatusCode, serve},
    postgres::{PgPool, Traced as _},
    shutdown::Shutdown,
};
use tokio_postgres::GenericClient;

use crate::{error::Error, tlog};

/// A resource of the log: its bytes and whether it never changes.
pub struct Resource {
    pub body: Vec<u8>,
    pub immutable: bool,
}

/// The resource at `path` (without a leading `/`), for the log as its newest checkpoint has
/// it; `None` when there is none such (yet).
pub async fn resource(
    client: &(impl GenericClient + Sync),
    path: &str,
) -> Result<Option<Resource>, Error> {
    // The path is checked first: a malformed one is refused even while the log is empty.
    let tile = match path {
        "checkpoint" => None,
        _ => Some(parse(path).ok_or_else(|| {
            Error::bad_request(
                "path",
                format!("{path:?} is not a tlog-tiles path: checkpoint, tile/<L>/<N>[.p/<W>] or tile/entries/<N>[.p/<W>]"),
            )
        })?),
    };
    let Some(checkpoint) = tlog::checkpoint(client, None).await? else {
        return Ok(None);
    };
    let Some(tile) = tile else {
        // Cosigned: the witnesses' lines follow the log's signature.
        let mut note = checkpoint.note;
        for line in crate::witness::cosignatures(client, checkpoint.size).await? {
            note.push_str(&line);
        }
        return Ok(Some(Resource {
            body: note.into_bytes(),
            immutable: false,
        }));
    };
    // A tile is there once the newest checkpoint's tree covers every hash it lists.
    let level_shift = u32::from(HEIGHT) * u32::from(tile.level());
    let end = tile.level_index() * WIDTH + u64::from(tile.width());
    let covered = end
        .checked_shl(level_shift)
        .is_some_and(|leaves| leaves <= checkpoint.size);
    if !covered {
        return Ok(None);
    }
    let immutable = u64::from(tile.width()) == WIDTH;
    let body = if tile.is_data() {
        entry_bundle(client, tile.level_index() * WIDTH, end).await?
    } else {
        tlog::tile_data(client, &tile).await?
    };
    Ok(Some(Resource { body, immutable }))
}

/// Leaves `[from, to)` as an entry bundle: each a big-endian u16 length and the entry.
async fn entry_bundle(
    client: &(impl GenericClient + Sync),
    from: u64,
    to: u64,
) -> Result<Vec<u8>, Error> {
    let rows = client
        .query_traced(
            "SELECT record_hash FROM merkle_log_leaves WHERE index >= $1 AND index < $2 \
             ORDER BY index",
            &[&(from as i64), &(to as i64)],
        )
        .await?;
    if rows.len() as u64 != to - from {
        return Err(Error::DataLoss(format!(
            "the transparency log's leaves {from}..{to} are not all stored"
        )));
    }
    let mut body = Vec::with_capacity(rows.len() * 34);
    for row in &rows {
        let entry: &[u8] = row.get(0);
        body.extend_from_slice(&(entry.len() as u16).to_be_bytes());
        body.extend_from_slice(entry);
    }
    Ok(body)
}

/// Serves the log's resources over HTTP on `listener` (read-only, no credentials: a
/// transparency log is public by design, and its entries are record hashes only).
pub fn spawn_http(listener: tokio::net::TcpListener, pool: PgPool, shutdown: Shutdown) {
    let pool = Arc::new(pool);
    tokio::spawn(serve(listener, shutdown, move |path: String| {
        let pool = pool.clone();
        async move {
            let path = path.trim_start_matches('/').to_owned();
            let answer = async {
                let conn = pool.get().await?;
                resource(&*conn, &path).await
            };
            match answer.await {
                Ok(Some(found)) => Reply {
                    status: StatusCode::OK,
                    content_type: if path == "checkpoint" {
                        "text/plain; charset=utf-8"
                    } else {
                        "application/octet-stream"
                    },
                    cache_control: Some(if found.immutable {
                        "public, max-age=31536000, immutable"
                    } else {
                        "no-cache"
                    }),
                    body: found.body,
                },
                Ok(None) => Reply::status(
                    StatusCode::NOT_FOUND,
                    format!("{path}: not in the log's newest checkpoint"),
                ),
                Err(Error::BadRequest(message)) => Reply::status(StatusCode::NOT_FOUND, message),
                Err(err) => {
                    tracing::warn!(%err, path, "serving the transparency log failed");
                    Reply::status(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
                }
            }
        }
    }));
}
