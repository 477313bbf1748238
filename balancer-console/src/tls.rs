//! The console's TLS: a configured certificate, or a self-signed one made at first start and
//! kept in the state directory. Same policy as the L7 listeners: TLS 1.2+ with forward-secret
//! AEAD suites only (ring provider).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ConsoleConfig;

/// A certificate problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read, written or parsed.
    #[error("{path}: {err}")]
    File {
        /// File.
        path: PathBuf,
        /// Why.
        err: String,
    },
    /// The certificate could not be made or used.
    #[error("console certificate: {0}")]
    Cert(String),
}

fn file_err(path: &Path, err: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        err: err.to_string(),
    }
}

/// The L7 proxy's server policy: ring with forward-secret AEAD suites only.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    balancer_l7::server_crypto_provider()
}

/// SHA-256 of a DER certificate as `AB:CD:...`.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Paths of the generated certificate and key in the state directory.
pub fn self_signed_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    (
        state_dir.join("console-cert.pem"),
        state_dir.join("console-key.pem"),
    )
}

/// Makes a self-signed certificate for the console's address (and `localhost`) unless one is
/// already in `state_dir`; the key file gets mode 0600.
fn ensure_self_signed(c: &ConsoleConfig) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert, key) = self_signed_paths(&c.state_dir);
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(&c.state_dir).map_err(|e| file_err(&c.state_dir, e))?;
    let mut names = vec!["localhost".to_string(), c.address.ip().to_string()];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
        }
    }
    let ck =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Cert(e.to_string()))?;
    let write = |p: &Path, text: String, mode: u32| -> Result<(), TlsError> {
        let tmp = p.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| file_err(&tmp, e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| file_err(&tmp, e))?;
        std::fs::rename(&tmp, p).map_err(|e| file_err(p, e))
    };
    write(&key, ck.signing_key.serialize_pem(), 0o600)?;
    write(&cert, ck.cert.pem(), 0o644)?;
    tracing::info!(cert = %cert.display(), "console: generated a self-signed certificate");
    Ok((cert, key))
}

/// The server configuration and the leaf's SHA-256 fingerprint.
pub fn server_config(c: &ConsoleConfig) -> Result<(Arc<ServerConfig>, String), TlsError> {
    let (cert, key) = match (&c.cert, &c.key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => ensure_self_signed(c)?,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .map_err(|e| file_err(&cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&cert, e))?;
    let Some(leaf) = chain.first() else {
        return Err(file_err(&cert, "no CERTIFICATE block"));
    };
    let fp = fingerprint(leaf);
    let der = PrivateKeyDer::from_pem_file(&key).map_err(|e| file_err(&key, e))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Cert(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, der)
        .map_err(|e| TlsError::Cert(format!("{} / {}: {e}", cert.display(), key.display())))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), fp))
}

/// What the L7 page shows of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// DNS names of the subject alternative name extension.
    pub names: Vec<String>,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

/// Reads the leaf of a PEM chain.
pub fn cert_info(path: &Path) -> Result<CertInfo, TlsError> {
    let der = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .next()
        .ok_or_else(|| file_err(path, "no CERTIFICATE block"))?
        .map_err(|e| file_err(path, e))?;
    let (_, x) = x509_parser::parse_x509_certificate(&der).map_err(|e| file_err(path, e))?;
    let names = x
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertInfo {
        subject: x.subject().to_string(),
        issuer: x.issuer().to_string(),
        names,
        not_after: x.validity().not_after.timestamp(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("console-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = ConsoleConfig::new("127.0.0.1:9443".parse().unwrap());
        c.state_dir = dir.clone();
        let (_, fp1) = server_config(&c).unwrap();
        let (_, fp2) = server_config(&c).unwrap();
        assert_eq!(fp1, fp2, "the second start reuses the certificate");
        assert_eq!(fp1.len(), 32 * 3 - 1);
        let (cert, key) = self_signed_paths(&dir);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let info = cert_info(&cert).unwrap();
        assert!(info.names.contains(&"localhost".to_string()), "{info:?}");
        assert!(info.not_after > 0);
        c.cert = Some(dir.join("missing.pem"));
        c.key = Some(key);
        assert!(matches!(server_config(&c), Err(TlsError::File { .. })));
    }
}
