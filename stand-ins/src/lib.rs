//! Loopback stand-ins for the orchestrator APIs Discovery reads, serving the documented
//! endpoints faithfully enough to test a client against: Nomad's HTTP API ([`nomad`]) and the
//! Kubernetes API ([`kubernetes`]); and a C2SP transparency-log witness ([`witness`]). Each listens on 127.0.0.1 on a free port, counts the calls
//! it answers, can add latency, refuse credentials or fail on demand, and stops when dropped.
//!
//! Node addresses in what they serve are loopback ones (127.1.x.y): nothing a test reads from
//! a stand-in leads anywhere but this machine.

pub mod kubernetes;
pub mod nomad;
pub mod witness;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// Serves `router` on a loopback `port` (0: a free one) until the returned handle is dropped.
async fn serve(router: axum::Router, port: u16) -> std::io::Result<(SocketAddr, Server)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((addr, Server(task)))
}

/// TLS for a stand-in: its certificate chain and key (PEM), and optionally the CA (PEM) that
/// client certificates must be signed by (mutual TLS); without it no client certificate is
/// asked for.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl Tls {
    fn server_config(&self) -> std::io::Result<std::sync::Arc<rustls::ServerConfig>> {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: {e}"))
        };
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| bad("key", &e))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("protocol versions", &e))?;
        let builder = match &self.client_ca_pem {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    roots
                        .add(cert.map_err(|e| bad("client CA", &e))?)
                        .map_err(|e| bad("client CA", &e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    std::sync::Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| bad("client verifier", &e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad("certificate and key", &e))?;
        Ok(std::sync::Arc::new(config))
    }
}

/// Serves `router` over TLS on a free loopback port until the returned handle is dropped.
async fn serve_tls(router: axum::Router, tls: &Tls) -> std::io::Result<(SocketAddr, Server)> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config()?);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let router = router.clone();
            tokio::spawn(async move {
                // A client that fails the handshake (no or a wrong certificate) is dropped.
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, Server(task)))
}

/// The serving task; aborted on drop.
struct Server(tokio::task::JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A live fleet's churn on a stand-in: a share of its nodes changed at a steady pace, in
/// sixty steps per period, as heartbeats, labels and drains change a real fleet's nodes.
/// Stops when dropped.
pub struct Churn {
    changed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Churn {
    /// Every `per / 60`, changes `percent / 60` % of `count()` nodes (a fraction carried to
    /// the next step) by `change(k)`, `k` counting up from 0 over the nodes in turn.
    fn start(
        percent: f64,
        per: Duration,
        count: impl Fn() -> usize + Send + 'static,
        mut change: impl FnMut(usize) + Send + 'static,
    ) -> Churn {
        let changed = Arc::new(AtomicU64::new(0));
        let counter = changed.clone();
        let task = tokio::spawn(async move {
            let mut step = tokio::time::interval(per / 60);
            step.tick().await;
            let (mut owed, mut k) = (0.0f64, 0usize);
            loop {
                step.tick().await;
                owed += count() as f64 * percent / 100.0 / 60.0;
                while owed >= 1.0 {
                    change(k);
                    k += 1;
                    owed -= 1.0;
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Churn { changed, task }
    }

    /// Node changes made so far.
    pub fn changed(&self) -> u64 {
        self.changed.load(Ordering::SeqCst)
    }

    /// Stops it (no change is under way once this returns); the changes it made.
    pub async fn stop(mut self) -> u64 {
        self.task.abort();
        let _ = (&mut self.task).await;
        self.changed()
    }
}

/// A duration as the APIs write it: `5s`, `5m`, `300ms`, or plain seconds.
fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |i| text.split_at(i));
    let n: u64 = number.parse().ok()?;
    Some(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return None,
    })
}

/// A loopback address for the `n`th node of a stand-in: 127.1.x.y.
pub fn node_ip(n: usize) -> String {
    format!("127.1.{}.{}", (n / 250) % 250, n % 250 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_node_addresses() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(node_ip(0), "127.1.0.1");
        assert_eq!(node_ip(999), "127.1.3.250");
    }
}
