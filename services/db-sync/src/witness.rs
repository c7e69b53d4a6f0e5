//! Witnesses of the transparency log (C2SP tlog-witness): each new checkpoint is submitted to
//! every configured witness with a consistency proof from the size that witness last
//! cosigned, and the cosignatures (C2SP tlog-cosignature) are kept beside the checkpoint and
//! served with it. A witness answering 409 with a larger tree than the log's, or 422 (the
//! proof does not extend what it cosigned), means the log was rolled back or forked: a loud
//! alarm in the log and the `merkle.log.witness.alarms` metric. Syncs never wait for a
//! witness; a checkpoint without enough cosignatures is served as it is, and says so.

use std::{sync::Arc, time::Duration};

use ed25519_dalek::VerifyingKey;
use merkle_shared::{
    config::ConfigError,
    postgres::{PgPool, Traced as _},
};
use opentelemetry::{KeyValue, metrics::Counter};

use crate::{error::Error, tlog};

/// One configured witness.
#[derive(Debug, Clone)]
pub struct Witness {
    pub name: String,
    pub key: VerifyingKey,
    /// Its tlog-witness URL prefix (`.../add-checkpoint` is appended).
    pub url: String,
}

/// Parses `WITNESSES`: comma-separated `<cosignature verifier key>@<URL>`.
pub fn parse(list: &[String]) -> Result<Vec<Witness>, ConfigError> {
    list.iter()
        .filter(|w| !w.is_empty())
        .map(|entry| {
            let bad = |why: &str| ConfigError::new("WITNESSES", format!("{entry:?}: {why}"));
            let (key, url) = entry
                .split_once('@')
                .ok_or_else(|| bad("is not <verifier key>@<URL>"))?;
            let (name, key) = merkle_core::cosignature::parse_verifier_key(key)
                .map_err(|e| bad(&e.to_string()))?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad("the URL must be http:// or https://"));
            }
            Ok(Witness {
                name,
                key,
                url: url.trim_end_matches('/').to_owned(),
            })
        })
        .collect()
}

/// The witnesses, the policy and the HTTP client.
pub struct Witnesses {
    pub list: Vec<Witness>,
    /// Cosignatures a checkpoint needs to count as witnessed.
    pub policy: usize,
    http: reqwest::Client,
    alarms: Counter<u64>,
    failures: Counter<u64>,
}

impl Witnesses {
    pub fn new(
        list: Vec<Witness>,
        policy: usize,
        timeout: Duration,
    ) -> Result<Witnesses, ConfigError> {
        merkle_shared::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| ConfigError::new("WITNESSES", format!("the HTTP client: {e}")))?;
        let meter = merkle_shared::metrics::meter();
        Ok(Witnesses {
            list,
            policy,
            http,
            alarms: meter
                .u64_counter("merkle.log.witness.alarms")
                .with_description(
                    "Witnesses that refused the log's checkpoint as a fork or a rollback (409 with a larger tree, 422)",
                )
                .build(),
            failures: meter
                .u64_counter("merkle.log.witness.failures")
                .with_description("Checkpoint submissions a witness did not answer (down, timeout, other errors)")
                .build(),
        })
    }

    /// Submits the newest checkpoint to every witness that has not cosigned it yet.
    pub async fn submit(&self, pool: &PgPool) -> Result<(), Error> {
        let conn = pool.get().await?;
        let Some(checkpoint) = tlog::checkpoint(&*conn, None).await? else {
            return Ok(());
        };
        for witness in &self.list {
            let seen: u64 = conn
                .query_opt_traced(
                    "SELECT size FROM merkle_log_witnesses WHERE name = $1",
                    &[&witness.name],
                )
                .await?
                .map_or(0, |r| r.get::<_, i64>(0) as u64);
            if seen >= checkpoint.size {
                continue;
            }
            // A 409 tells the size the witness has: one more try from there.
            let mut old = seen;
            for _ in 0..2 {
                match self
                    .add_checkpoint(&*conn, witness, old, &checkpoint)
                    .await?
                {
                    Answer::Cosigned(line) => {
                        conn.execute_traced(
                            "INSERT INTO merkle_log_cosignatures (size, witness, line) \
                             VALUES ($1, $2, $3) ON CONFLICT (size, witness) DO UPDATE SET line = EXCLUDED.line",
                            &[&(checkpoint.size as i64), &witness.name, &line],
                        )
                        .await?;
                        remember(&*conn, &witness.name, checkpoint.size).await?;
                        break;
                    }
                    Answer::HasSize(size) if size <= checkpoint.size && size != old => {
                        remember(&*conn, &witness.name, size).await?;
                        old = size;
                    }
                    Answer::HasSize(size) => {
                        self.alarm(
                            witness,
                            format!(
                                "it has cosigned a tree of {size} leaves, and this log has {}: the log was rolled back or forked",
                                checkpoint.size
                            ),
                        );
                        break;
                    }
                    Answer::Refused(why) => {
                        self.alarm(witness, why);
                        break;
                    }
                    Answer::Failed(why) => {
                        self.failures
                            .add(1, &[KeyValue::new("witness", witness.name.clone())]);
                        tracing::warn!(witness = %witness.name, error = %why, "a witness did not cosign the checkpoint; trying again at the next one");
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn alarm(&self, witness: &Witness, why: String) {
        self.alarms
            .add(1, &[KeyValue::new("witness", witness.name.clone())]);
        tracing::error!(witness = %witness.name, alarm = true, "A WITNESS REFUSED THE TRANSPARENCY LOG: {why}");
    }

    async fn add_checkpoint(
        &self,
        client: &(impl tokio_postgres::GenericClient + Sync),
        witness: &Witness,
        old: u64,
        checkpoint: &tlog::StoredCheckpoint,
    ) -> Result<Answer, Error> {
        use base64::Engine as _;
        let proof = if old == 0 || old == checkpoint.size {
            Vec::new()
        } else {
            tlog::consistency_proof(client, old, checkpoint.size).await?
        };
        let mut body = format!("old {old}\n");
        for hash in &proof {
            body.push_str(&base64::engine::general_purpose::STANDARD.encode(hash));
            body.push('\n');
        }
        body.push('\n');
        body.push_str(&checkpoint.note);
        let answer = self
            .http
            .post(format!("{}/add-checkpoint", witness.url))
            .body(body)
            .send()
            .await;
        let response = match answer {
            Ok(response) => response,
            Err(e) => return Ok(Answer::Failed(e.to_string())),
        };
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        Ok(match status {
            200 => {
                let signed_text = match checkpoint.note.split_once("\n\n") {
                    Some((text, _)) => format!("{text}\n"),
                    None => checkpoint.note.clone(),
                };
                let line = text.lines().find(|line| {
                    merkle_core::cosignature::verify(
                        line,
                        &witness.name,
                        &witness.key,
                        signed_text.as_bytes(),
                    )
                    .is_ok()
                });
                match line {
                    Some(line) => Answer::Cosigned(format!("{line}\n")),
                    None => Answer::Failed(
                        "it answered 200 without a valid cosignature of its key".into(),
                    ),
                }
            }
            409 => match text.trim().parse() {
                Ok(size) => Answer::HasSize(size),
                Err(_) => Answer::Failed(format!("409 without a size: {text:?}")),
            },
            422 => Answer::Refused(format!(
                "it refused the consistency proof from {old} to {} leaves: this log does not extend what it cosigned (a fork)",
                checkpoint.size
            )),
            other => Answer::Failed(format!("HTTP {other}: {}", text.trim())),
        })
    }
}

/// What a witness said.
enum Answer {
    Cosigned(String),
    HasSize(u64),
    Refused(String),
    Failed(String),
}

async fn remember(
    client: &(impl tokio_postgres::GenericClient + Sync),
    witness: &str,
    size: u64,
) -> Result<(), Error> {
    client
        .execute_traced(
            "INSERT INTO merkle_log_witnesses (name, size, updated_at) VALUES ($1, $2, now()) \
             ON CONFLICT (name) DO UPDATE SET size = EXCLUDED.size, updated_at = now()",
            &[&witness, &(size as i64)],
        )
        .await?;
    Ok(())
}

/// The cosignature lines kept for the checkpoint of `size` leaves.
pub async fn cosignatures(
    client: &(impl tokio_postgres::GenericClient + Sync),
    size: u64,
) -> Result<Vec<String>, Error> {
    Ok(client
        .query_traced(
            "SELECT line FROM merkle_log_cosignatures WHERE size = $1 ORDER BY witness",
            &[&(size as i64)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Submits each new checkpoint to the witnesses every `interval`, until `shutdown`.
pub fn spawn(
    witnesses: Arc<Witnesses>,
    pool: PgPool,
    interval: Duration,
    shutdown: merkle_shared::shutdown::Shutdown,
) {
    merkle_shared::shutdown::spawn_every(interval, shutdown, move || {
        let (witnesses, pool) = (witnesses.clone(), pool.clone());
        async move {
            if let Err(err) = witnesses.submit(&pool).await {
                tracing::warn!(error = %err, "submitting the checkpoint to witnesses failed; retrying");
            }
        }
    });
}
