//! In-app TLS and mutual TLS with rustls, for clusters without a service mesh (a mesh does
//! mTLS itself; leave these unset under Istio or Linkerd). With `TLS_CERT_FILE` and
//! `TLS_KEY_FILE` a service serves gRPC over TLS; with `TLS_CLIENT_CA_FILE` it also refuses
//! callers without a certificate signed by that CA. Calls to `https://` addresses verify the
//! server against `TLS_CA_FILE` and present the service's own certificate. The files are
//! read again when they change (a Secret rotated by cert-manager), without a restart: a new
//! connection uses the new certificate, open ones keep theirs.

use parking_lot::RwLock;
use std::{
    path::PathBuf,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use clap::Args;
use rustls::{ClientConfig, RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::values::ConfigError;

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings every service has.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// This service's certificate chain (PEM): served to callers, and presented to the
    /// services it calls (mutual TLS). With TLS_KEY_FILE; unset: plaintext (h2c).
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of TLS_CERT_FILE (PEM).
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// The CA (PEM) that callers' certificates must be signed by: callers without one are
    /// refused (mutual TLS).
    #[arg(long, env = "TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// The CA (PEM) that signs the certificates of the services this one calls at https://
    /// addresses.
    #[arg(long, env = "TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
}

impl TlsArgs {
    /// The settings from the environment alone (for the command line, which has no flags
    /// for them).
    pub fn from_env() -> TlsArgs {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        TlsArgs {
            tls_cert_file: var("TLS_CERT_FILE"),
            tls_key_file: var("TLS_KEY_FILE"),
            tls_client_ca_file: var("TLS_CLIENT_CA_FILE"),
            tls_ca_file: var("TLS_CA_FILE"),
        }
    }

    fn files(&self) -> Vec<&PathBuf> {
        [
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.tls_client_ca_file,
            &self.tls_ca_file,
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that checks a server's certificate, and its name, against the CA
/// certificates in `path` (named `variable` in errors), presenting none of its own: for
/// PostgreSQL over TLS.
pub fn verifying_client(variable: &str, path: &PathBuf) -> Result<ClientConfig, ConfigError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(variable, e.to_string()))?
        .with_root_certificates(roots(variable, path)?)
        .with_no_client_auth())
}

/// Makes ring the process's rustls crypto provider. HTTP clients built on rustls without one
/// of their own (reqwest for Nomad and witnesses, kube) find no provider otherwise, since
/// more than one is compiled in; call it before building such a client. Calling it again, or
/// after another part of the process chose, changes nothing.
pub fn install_crypto_provider() {
    // Err only says a provider is installed already, which is what was asked.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(variable: &str, path: &PathBuf) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::new(variable, format!("{}: {e}", path.display())))
}

fn certificates(variable: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new(variable, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(ConfigError::new(variable, "holds no certificate"));
    }
    Ok(certs)
}

fn roots(variable: &str, path: &PathBuf) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(variable, &read(variable, path)?)? {
        roots
            .add(cert)
            .map_err(|e| ConfigError::new(variable, format!("not a usable CA: {e}")))?;
    }
    Ok(roots)
}

/// The certificate and key, when configured.
fn identity(
    args: &TlsArgs,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, ConfigError> {
    let (Some(cert), Some(key)) = (&args.tls_cert_file, &args.tls_key_file) else {
        return Ok(None);
    };
    let chain = certificates("TLS_CERT_FILE", &read("TLS_CERT_FILE", cert)?)?;
    let key = PrivateKeyDer::from_pem_slice(&read("TLS_KEY_FILE", key)?)
        .map_err(|e| ConfigError::new("TLS_KEY_FILE", format!("not a PEM private key: {e}")))?;
    Ok(Some((chain, key)))
}

/// The server side: this service's certificate, and client verification with a client CA.
pub fn server_config(args: &TlsArgs) -> Result<Option<Arc<ServerConfig>>, ConfigError> {
    let Some((chain, key)) = identity(args)? else {
        return Ok(None);
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new("TLS_CERT_FILE", e.to_string()))?;
    let builder = match &args.tls_client_ca_file {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("TLS_CLIENT_CA_FILE", ca)?),
                provider(),
            )
            .build()
            .map_err(|e| ConfigError::new("TLS_CLIENT_CA_FILE", e.to_string()))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        ConfigError::new(
            "TLS_KEY_FILE",
            format!("does not match TLS_CERT_FILE, or is unusable: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// The client side: servers verified against the CA, this service's certificate presented.
pub fn client_config(args: &TlsArgs) -> Result<Option<Arc<ClientConfig>>, ConfigError> {
    let Some(ca) = &args.tls_ca_file else {
        return Ok(None);
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new("TLS_CA_FILE", e.to_string()))?
        .with_root_certificates(roots("TLS_CA_FILE", ca)?);
    let mut config = match identity(args)? {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| ConfigError::new("TLS_CERT_FILE", e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// The configurations in use, and what their files looked like when read.
struct Installed {
    args: TlsArgs,
    server: RwLock<Option<Arc<ServerConfig>>>,
    client: RwLock<Option<Arc<ClientConfig>>>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Reads the files and installs the configurations for [`crate::server::serve`] and
/// [`crate::client::channel`]; an error names the setting. Call once; inside a runtime the
/// files are then watched and read again when they change.
pub fn init(args: &TlsArgs) -> Result<(), ConfigError> {
    let server = server_config(args)?;
    let client = client_config(args)?;
    let watched = server.is_some() || client.is_some();
    let installed = Installed {
        args: args.clone(),
        server: RwLock::new(server),
        client: RwLock::new(client),
    };
    if INSTALLED.set(installed).is_err() || !watched {
        return Ok(());
    }
    let files = args.files().into_iter().cloned().collect();
    crate::file_watch::on_change(files, || {
        let Some(installed) = INSTALLED.get() else {
            return true;
        };
        // A half-written update fails to parse: keep the old material and look again.
        match (
            server_config(&installed.args),
            client_config(&installed.args),
        ) {
            (Ok(server), Ok(client)) => {
                *installed.server.write() = server;
                *installed.client.write() = client;
                tracing::info!("TLS certificates reloaded");
                true
            }
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(%err, "TLS files changed but cannot be used yet; keeping the previous ones");
                false
            }
        }
    });
    Ok(())
}

/// The server configuration in use, when TLS is on.
pub fn server() -> Option<Arc<ServerConfig>> {
    INSTALLED.get()?.server.read().clone()
}

/// The client configuration in use, when `TLS_CA_FILE` is set.
pub fn client() -> Option<Arc<ClientConfig>> {
    INSTALLED.get()?.client.read().clone()
}

/// What a request knows of the TLS connection it came on: the peer's address, and the DNS and
/// URI names of its client certificate (verified against `TLS_CLIENT_CA_FILE` in the
/// handshake; empty without mutual TLS). Authentication reads the names (`crate::auth`).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub tcp: TcpConnectInfo,
    pub names: Arc<[String]>,
}

/// One accepted TLS connection, as tonic serves it.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    names: Arc<[String]>,
}

impl TlsConn {
    fn new(stream: tokio_rustls::server::TlsStream<TcpStream>) -> TlsConn {
        let names = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(certificate_names)
            .unwrap_or_default();
        TlsConn {
            stream,
            names: names.into(),
        }
    }
}

/// The subject alternative names (DNS and URI) of a certificate.
fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(parsed) => parsed
            .valid_dns_names()
            .chain(parsed.valid_uri_names())
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        PeerInfo {
            tcp: self.stream.get_ref().0.connect_info(),
            names: self.names.clone(),
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The connections of `listener`, each through a TLS handshake with the configuration in use
/// at that moment; a caller that fails it (no certificate, a wrong one, plaintext) is dropped
/// and logged.
pub fn incoming(
    listener: TcpListener,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while !tx.is_closed() {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let Some(config) = server() else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsConn::new(stream))).await;
                    }
                    Ok(Err(err)) => {
                        tracing::info!(%peer, %err, "TLS handshake refused");
                    }
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Connects to `https://` services: TCP, then TLS with the client configuration in use.
#[derive(Clone, Copy, Debug, Default)]
pub struct Connector;

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for Connector {
    type Response = TlsIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<TlsIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let config = client().ok_or("TLS_CA_FILE is not set: https:// cannot be verified")?;
            let host = uri.host().ok_or("the address names no host")?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}
