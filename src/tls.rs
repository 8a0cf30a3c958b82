//! Serving certificates: the pair the traffic port (`--tls-cert/--tls-key` or
//! `--tls self-signed`) and the webhook present, its reload when the files change, and the
//! rustls server configuration around it.
//!
//! Files are re-read every reload interval and swapped in when their contents change and
//! the pair is valid (cert-manager rotates them in the mounted Secret, and the kubelet
//! updates the mounted files about a minute later); new handshakes use the new pair, a bad
//! pair keeps the old one and is logged once. A self-signed pair is generated at start and
//! never changes: an ALB does not verify its targets' certificates, so it is enough for an
//! HTTPS target group.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// ALPN protocol ids (RFC 7301 registry).
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A certificate/key pair that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
}

/// The serving certificate; for a file pair, re-read from its files when they change.
#[derive(Debug)]
pub struct CertStore {
    /// The files, or `None` for a generated pair.
    files: Option<(PathBuf, PathBuf)>,
    /// The file contents behind `current`, to notice a change.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads the pair now; an unusable pair is an error.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<CertStore, TlsError> {
        let (cert_pem, key_pem) = read_pair(cert_path, key_path)?;
        let key = parse_pair(cert_path, key_path, &cert_pem, &key_pem)?;
        Ok(CertStore {
            files: Some((cert_path.to_owned(), key_path.to_owned())),
            loaded: Mutex::new((cert_pem, key_pem)),
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// A new self-signed pair (ECDSA P-256) naming `names` (DNS names or IP addresses).
    pub fn self_signed(names: Vec<String>) -> Result<CertStore, TlsError> {
        let generated = rcgen::generate_simple_self_signed(names)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let cert_pem = generated.cert.pem().into_bytes();
        let key_pem = generated.signing_key.serialize_pem().into_bytes();
        let here = Path::new("(self-signed)");
        let key = parse_pair(here, here, &cert_pem, &key_pem)?;
        Ok(CertStore {
            files: None,
            loaded: Mutex::new((cert_pem, key_pem)),
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// The certificate chain in use, PEM (for tests and the self-signed start log).
    pub fn cert_pem(&self) -> String {
        let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&loaded.0).into_owned()
    }

    /// Re-reads the files; swaps the pair in if they changed and are valid. `Ok(true)`: a
    /// new pair is in use. On error the previous pair stays. A generated pair never changes.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some((cert_path, key_path)) = &self.files else {
            return Ok(false);
        };
        let (cert_pem, key_pem) = read_pair(cert_path, key_path)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let key = parse_pair(cert_path, key_path, &cert_pem, &key_pem)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    Ok((read(cert)?, read(key)?))
}

fn parse_pair(
    cert_path: &Path,
    key_path: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let invalid = |path: &Path, reason: String| TlsError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(cert_path, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(cert_path, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| invalid(key_path, format!("not a PEM private key: {e}")))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| invalid(key_path, format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(certs, signer);
    // A rotation caught half-way (new certificate, old key) must not be served.
    certified.keys_match().map_err(|e| {
        invalid(
            key_path,
            format!("does not match {}: {e}", cert_path.display()),
        )
    })?;
    Ok(certified)
}

/// A TLS acceptor presenting `certs`' current pair and offering `alpn` (most preferred
/// first): TLS 1.2 and 1.3, no client certificates.
pub fn acceptor(certs: Arc<CertStore>, alpn: &[&[u8]]) -> TlsAcceptor {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_no_client_auth()
    .with_cert_resolver(certs);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsAcceptor::from(Arc::new(config))
}

/// Re-reads `certs` every `every` until dropped (abort the task); logs a reload, and each
/// distinct failure once.
pub async fn reload_loop(certs: Arc<CertStore>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_error = None;
    loop {
        tick.tick().await;
        match certs.reload() {
            Ok(true) => {
                tracing::info!("TLS certificate reloaded");
                last_error = None;
            }
            Ok(false) => last_error = None,
            Err(e) => {
                // Once per distinct error, not every tick.
                let text = e.to_string();
                if last_error.as_ref() != Some(&text) {
                    tracing::warn!(error = %text, "TLS certificate not reloaded; keeping the current one");
                    last_error = Some(text);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pairs_are_valid_and_fixed() {
        let store = CertStore::self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert!(store.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!store.reload().unwrap());
        assert!(store.current().keys_match().is_ok());
    }

    #[test]
    fn a_mismatched_pair_is_refused_and_the_old_one_kept() {
        let dir = std::env::temp_dir().join(format!("lameduck-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let a = rcgen::generate_simple_self_signed(vec!["a".to_string()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".to_string()]).unwrap();
        std::fs::write(&cert, a.cert.pem()).unwrap();
        std::fs::write(&key, a.signing_key.serialize_pem()).unwrap();
        let store = CertStore::load(&cert, &key).unwrap();
        assert!(!store.reload().unwrap());
        // Half-way through a rotation: new certificate, old key.
        std::fs::write(&cert, b.cert.pem()).unwrap();
        let err = store.reload().unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        assert_eq!(store.cert_pem(), a.cert.pem());
        std::fs::write(&key, b.signing_key.serialize_pem()).unwrap();
        assert!(store.reload().unwrap());
        assert_eq!(store.cert_pem(), b.cert.pem());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
