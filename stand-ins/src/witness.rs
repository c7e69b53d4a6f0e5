//! A transparency-log witness (C2SP tlog-witness), as independent witnesses run it: it knows
//! some logs by origin and checkpoint key, keeps the latest tree size and root it cosigned for
//! each, and cosigns a new checkpoint (C2SP tlog-cosignature) only when it is signed by the
//! log's key and provably extends that tree, so it never cosigns a fork.
//!
//! `POST /add-checkpoint` takes `old <size>`, the consistency proof's hashes (base64, one per
//! line), an empty line and the signed checkpoint. Answers: 200 with the cosignature line;
//! 409 with the size it has (`text/x.tlog.size`) when `old` is not it; 422 when the proof does
//! not prove the checkpoint extends the tree it has; 403 for a checkpoint its log did not
//! sign; 404 for an unknown origin; 400 for a malformed request.

use parking_lot::Mutex;
use std::{
    collections::HashMap,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::post};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use ed25519_dalek::SigningKey;
use signed_note::{Note, StandardVerifier, VerifierList};
use tlog_tiles::{Checkpoint, Hash, check_tree};

/// What the witness keeps.
struct Shared {
    name: String,
    key: SigningKey,
    /// Log checkpoint keys by origin (the note verifier key).
    logs: HashMap<String, String>,
    /// The latest cosigned (size, root) per origin.
    trees: Mutex<HashMap<String, (u64, Hash)>>,
    /// Answers by HTTP status, for tests.
    answers: Mutex<HashMap<u16, u64>>,
}

/// A running witness on 127.0.0.1; stops when dropped.
pub struct WitnessStandIn {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    _server: crate::Server,
}

impl WitnessStandIn {
    /// A witness named `name` whose key is derived from `seed`, witnessing the logs whose
    /// checkpoint (note verifier) keys are given; their names are their origins.
    pub async fn start(name: &str, seed: [u8; 32], logs: &[&str]) -> std::io::Result<Self> {
        let logs = logs
            .iter()
            .map(|k| {
                (
                    k.split('+').next().unwrap_or_default().to_owned(),
                    (*k).to_owned(),
                )
            })
            .collect();
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
            logs,
            trees: Mutex::default(),
            answers: Mutex::default(),
        });
        let router = axum::Router::new()
            .route("/add-checkpoint", post(add_checkpoint))
            .with_state(shared.clone());
        let (addr, server) = crate::serve(router, 0).await?;
        Ok(WitnessStandIn {
            addr,
            shared,
            _server: server,
        })
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The witness's cosignature verifier key (`name+id+base64(0x04 || key)`).
    pub fn verifier_key(&self) -> String {
        merkle_core::cosignature::verifier_key(&self.shared.name, &self.shared.key.verifying_key())
    }

    /// The tree size it last cosigned for `origin`.
    pub fn size(&self, origin: &str) -> Option<u64> {
        self.lock_trees().get(origin).map(|(size, _)| *size)
    }

    /// How many requests it answered with `status`.
    pub fn answered(&self, status: u16) -> u64 {
        self.shared
            .answers
            .lock()
            .get(&status)
            .copied()
            .unwrap_or(0)
    }

    fn lock_trees(&self) -> parking_lot::MutexGuard<'_, HashMap<String, (u64, Hash)>> {
        self.shared.trees.lock()
    }
}

async fn add_checkpoint(State(shared): State<Arc<Shared>>, body: String) -> impl IntoResponse {
    let (status, content_type, answer) = answer(&shared, &body);
    *shared.answers.lock().entry(status.as_u16()).or_default() += 1;
    (status, [("content-type", content_type)], answer)
}

fn answer(shared: &Shared, body: &str) -> (StatusCode, &'static str, String) {
    let text = "text/plain; charset=utf-8";
    let bad = |why: &str| (StatusCode::BAD_REQUEST, text, format!("{why}\n"));
    let Some((head, note)) = body.split_once("\n\n") else {
        return bad("the body is `old <size>`, the proof's lines, an empty line, the checkpoint");
    };
    let mut lines = head.lines();
    let Some(old) = lines
        .next()
        .and_then(|l| l.strip_prefix("old "))
        .and_then(|n| n.parse::<u64>().ok())
    else {
        return bad("the first line is `old <size>`");
    };
    let mut proof = Vec::new();
    for line in lines {
        match STANDARD
            .decode(line)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
        {
            Some(hash) => proof.push(Hash(hash)),
            None => return bad("a proof line is not a base64 hash"),
        }
    }
    let Ok(note) = Note::from_bytes(note.as_bytes()) else {
        return bad("the checkpoint is not a signed note");
    };
    let Ok(checkpoint) = Checkpoint::from_bytes(note.text()) else {
        return bad("the note is not a checkpoint");
    };
    let Some(log_key) = shared.logs.get(checkpoint.origin()) else {
        return (StatusCode::NOT_FOUND, text, "unknown log\n".into());
    };
    let signed = StandardVerifier::new(log_key)
        .ok()
        .is_some_and(|v| note.verify(&VerifierList::new(vec![Box::new(v)])).is_ok());
    if !signed {
        return (
            StatusCode::FORBIDDEN,
            text,
            "not signed by the log's key\n".into(),
        );
    }
    let mut trees = shared.trees.lock();
    let (size, root) = trees
        .get(checkpoint.origin())
        .copied()
        .unwrap_or((0, tlog_tiles::EMPTY_HASH));
    if old != size {
        return (
            StatusCode::CONFLICT,
            "text/x.tlog.size",
            format!("{size}\n"),
        );
    }
    if checkpoint.size() < old {
        return bad("the checkpoint is smaller than the old size");
    }
    let consistent = match old {
        0 => proof.is_empty(),
        _ if old == checkpoint.size() => proof.is_empty() && root == *checkpoint.hash(),
        _ => check_tree(&proof, checkpoint.size(), *checkpoint.hash(), old, root).is_ok(),
    };
    if !consistent {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            text,
            "the checkpoint does not extend the tree this witness cosigned\n".into(),
        );
    }
    trees.insert(
        checkpoint.origin().to_owned(),
        (checkpoint.size(), *checkpoint.hash()),
    );
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let line = merkle_core::cosignature::sign(&shared.name, &shared.key, time, note.text());
    (StatusCode::OK, text, line)
}
