//! TLS on a port (rustls): the certificate, key and client CAs are read from files, and
//! read again when one of them changes on disk, so a renewed certificate (or a
//! Kubernetes Secret updated in place) is served to the next connection without a
//! restart. Open connections keep the certificate they were made with. A change that
//! does not load (a half-written file, a key that does not match) is logged and the
//! previous certificate stays in service.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// Largest certificate, key or CA file read (a chain of a few certificates is ~10 KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// ALPN of the gRPC port.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of the HTTP port.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A port's TLS settings, reloaded when their files change.
pub struct Tls {
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    current: Mutex<Loaded>,
}

struct Loaded {
    stamps: Vec<Option<Stamp>>,
    acceptor: TlsAcceptor,
    /// After a change that did not load: when to try it again.
    retry_at: Option<std::time::Instant>,
}

/// How long a change that did not load waits before it is tried again (a file being
/// replaced, a Secret being swapped): the files are not re-read on every connection.
const RETRY_FAILED_RELOAD: std::time::Duration = std::time::Duration::from_secs(2);

/// What tells that a file changed: modification time, length and inode.
type Stamp = (SystemTime, u64, u64);

impl Tls {
    /// Load the files now; an error names the file and what is wrong with it.
    pub fn new(files: TlsFiles, alpn: &[u8]) -> Result<Arc<Tls>, String> {
        let alpn = vec![alpn.to_vec()];
        let stamps = stamps(&files);
        let acceptor = TlsAcceptor::from(Arc::new(server_config(&files, &alpn)?));
        Ok(Arc::new(Tls {
            files,
            alpn,
            current: Mutex::new(Loaded {
                stamps,
                acceptor,
                retry_at: None,
            }),
        }))
    }

    /// The acceptor for the next connection: reloaded first if a file changed. A change
    /// that does not load leaves the previous certificate in service and is tried again
    /// after [`RETRY_FAILED_RELOAD`] (a read that failed for a moment is not final).
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut current = self.current.lock().expect("never poisoned");
        let waiting = current
            .retry_at
            .is_some_and(|at| std::time::Instant::now() < at);
        let now = stamps(&self.files);
        if now != current.stamps && !waiting {
            match server_config(&self.files, &self.alpn) {
                Ok(config) => {
                    current.acceptor = TlsAcceptor::from(Arc::new(config));
                    current.stamps = now;
                    current.retry_at = None;
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    current.retry_at = Some(std::time::Instant::now() + RETRY_FAILED_RELOAD);
                    tracing::error!(error = %e,
                        "TLS files changed but do not load; the previous certificate stays in service");
                }
            }
        }
        current.acceptor.clone()
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<Stamp>> {
    let stamp = |path: &Path| {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Some((meta.modified().ok()?, meta.len(), inode))
    };
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| stamp(p))
    .collect()
}

/// A file's bytes, at most [`MAX_PEM_BYTES`].
fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!(
            "{} is larger than {MAX_PEM_BYTES} bytes",
            path.display()
        ));
    }
    Ok(bytes)
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The rustls configuration the files describe.
pub fn server_config(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read_pem(&files.key)?)
        .map_err(|e| format!("{}: no usable private key: {e}", files.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "{} and {} do not make a certificate and its key: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// A connection, plain or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// `tcp` as it will be served: through a TLS handshake (bounded by `timeout`) when
    /// the port has TLS. `None` when the handshake fails or times out (logged).
    pub async fn accept(
        tcp: TcpStream,
        tls: Option<&Tls>,
        timeout: std::time::Duration,
    ) -> Option<Conn> {
        let Some(tls) = tls else {
            return Some(Conn::Plain(tcp));
        };
        match tokio::time::timeout(timeout, tls.acceptor().accept(tcp)).await {
            Ok(Ok(stream)) => Some(Conn::Tls(Box::new(stream))),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                None
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
