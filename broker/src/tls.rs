//! TLS for `mqtts` and `wss` listeners: loading PEM certificates and keys, client-certificate
//! verification, and hot reload of the files.
//!
//! A listener holds a [`TlsReloader`]; every new connection takes the acceptor current at accept
//! time, so a reload affects new connections only. A watch task compares the files' modification
//! stamps every `tls_reload_interval_secs`; when one changed it builds a complete new
//! configuration and swaps it in only if that succeeded. A half-written or bad file is logged and
//! counted, and the old certificate stays in service.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::ClientCertificate;
use crate::config::ListenerConfig;
use crate::metrics::ListenerMetrics;

/// Why a TLS configuration could not be built. Messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path}: no certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not accepted as a CA certificate: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("certificate/key: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("listener has no `{0}`")]
    Missing(&'static str),
}

/// The TLS acceptor of one listener, replaced when its files change.
pub struct TlsReloader {
    config: ListenerConfig,
    acceptor: RwLock<TlsAcceptor>,
}

impl TlsReloader {
    /// Loads the listener's files now, so a bad certificate is reported at start.
    pub fn load(config: &ListenerConfig) -> Result<TlsReloader, TlsError> {
        let server = server_config(config)?;
        Ok(TlsReloader {
            config: config.clone(),
            acceptor: RwLock::new(TlsAcceptor::from(server)),
        })
    }

    /// The acceptor for a connection accepted now.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().clone()
    }

    /// Watches the files until shutdown and swaps in a new configuration when they change.
    pub async fn watch(
        self: Arc<Self>,
        metrics: Arc<ListenerMetrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let interval = Duration::from_secs(self.config.tls_reload_interval_secs.max(1));
        let mut seen = self.stamps();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let now = self.stamps();
            if now == seen {
                continue;
            }
            // Remember the new stamps whatever the outcome: a bad file is reported once, and
            // retried when it changes again.
            seen = now;
            match server_config(&self.config) {
                Ok(server) => {
                    *self.acceptor.write() = TlsAcceptor::from(server);
                    metrics.tls_reloads.inc();
                    tracing::info!(listener = %self.config.name, "TLS certificate reloaded");
                }
                Err(e) => {
                    metrics.tls_reload_failures.inc();
                    tracing::warn!(
                        listener = %self.config.name,
                        error = %e,
                        "TLS files changed but cannot be loaded; keeping the previous certificate"
                    );
                }
            }
        }
    }

    /// What identifies the current contents of each file: modification time, size and inode
    /// (a replacement by rename changes the inode even within one mtime tick).
    fn stamps(&self) -> Vec<Option<(SystemTime, u64, u64)>> {
        [
            &self.config.cert_file,
            &self.config.key_file,
            &self.config.client_ca_file,
        ]
        .into_iter()
        .flatten()
        .map(|path| stamp(path))
        .collect()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// Builds the rustls configuration of a TLS listener from its files.
pub fn server_config(config: &ListenerConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_file = config
        .cert_file
        .as_deref()
        .ok_or(TlsError::Missing("cert_file"))?;
    let key_file = config
        .key_file
        .as_deref()
        .ok_or(TlsError::Missing("key_file"))?;
    let certs = load_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Pem {
        path: key_file.to_path_buf(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &config.client_ca_file {
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca_file)? {
                roots.add(cert).map_err(|source| TlsError::BadCa {
                    path: ca_file.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    // No ALPN list: clients offering any protocol (or none) are served alike.
    Ok(Arc::new(builder.with_single_cert(certs, key)?))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The verified certificate chain a client presented, with its subject CN.
pub fn client_certificate(connection: &ServerConnection) -> Option<ClientCertificate> {
    let chain = connection.peer_certificates()?;
    let first = chain.first()?;
    let subject_cn = x509_parser::parse_x509_certificate(first.as_ref())
        .ok()
        .and_then(|(_, cert)| {
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned)
        });
    Some(ClientCertificate {
        subject_cn,
        chain_der: chain
            .iter()
            .map(|c| Bytes::copy_from_slice(c.as_ref()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ListenerProtocol;

    fn files(dir: &Path, cert: &str, key: &str) -> ListenerConfig {
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        ListenerConfig {
            protocol: ListenerProtocol::Mqtts,
            cert_file: Some(c),
            key_file: Some(k),
            ..ListenerConfig::default()
        }
    }

    #[test]
    fn bad_files_are_reported_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (a.cert.pem(), a.signing_key.serialize_pem());
        assert!(server_config(&files(dir.path(), &cert, &key)).is_ok());

        let err = server_config(&files(dir.path(), &cert, "")).unwrap_err();
        assert!(err.to_string().contains("k.pem"), "{err}");
        let err = server_config(&files(dir.path(), "", &key)).unwrap_err();
        assert!(err.to_string().contains("c.pem"), "{err}");
        let other_key = b.signing_key.serialize_pem();
        let err = server_config(&files(dir.path(), &cert, &other_key)).unwrap_err();
        assert!(err.to_string().contains("not be consistent"), "{err}");
    }
}
