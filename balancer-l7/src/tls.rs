//! TLS policy, certificate loading and SNI selection (rustls, ring provider).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ListenerConfig, TlsVersion, UnknownSni};

/// A certificate or key that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The file could not be read or holds no PEM object of the expected kind.
    #[error("{path}: {what}: {err}")]
    Read {
        /// File.
        path: String,
        /// What was being read.
        what: &'static str,
        /// Why.
        err: String,
    },
    /// The private key does not belong to the certificate, or is of an unsupported kind.
    #[error("{cert} / {key}: {err}")]
    Mismatch {
        /// Certificate file.
        cert: String,
        /// Key file.
        key: String,
        /// Why.
        err: String,
    },
}

/// The crypto provider: ring, forward-secret AEAD suites only (ECDHE with AES-GCM or
/// ChaCha20-Poly1305 for TLS 1.2; all TLS 1.3 suites, which are AEAD and ephemeral). The
/// project's one server-side TLS policy: the console uses it too.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn read_err(path: &Path, what: &'static str, err: impl fmt::Display) -> CertError {
    CertError::Read {
        path: path.display().to_string(),
        what,
        err: err.to_string(),
    }
}

/// Reads a PEM chain and key and checks that the key matches the leaf certificate.
pub(crate) fn load_certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read_err(cert, "certificate", e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(cert, "certificate", e))?;
    if chain.is_empty() {
        return Err(read_err(cert, "certificate", "no CERTIFICATE block"));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| read_err(key, "private key", e))?;
    let mismatch = |err: String| CertError::Mismatch {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        err,
    };
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| mismatch(e.to_string()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| mismatch(format!("key does not match certificate ({e})")))?;
    Ok(Arc::new(ck))
}

/// Picks the certificate by SNI: exact name, then `*.` wildcard, then the default or nothing.
#[derive(Debug)]
pub(crate) struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    fn lookup(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(k) = self.exact.get(&name) {
                return Some(k.clone());
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(k) = self.wildcard.get(parent)
            {
                return Some(k.clone());
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name())
    }
}

/// Builds the rustls server configuration of a listener, reading its certificates.
pub(crate) fn server_config(l: &ListenerConfig) -> Result<Arc<ServerConfig>, CertError> {
    let provider = provider();
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut first = None;
    for c in &l.certificates {
        let ck = load_certified_key(&c.cert, &c.key, &provider)?;
        first.get_or_insert_with(|| ck.clone());
        for n in &c.server_names {
            let n = n.to_ascii_lowercase();
            match n.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_string()),
                None => exact.entry(n),
            }
            .or_insert_with(|| ck.clone());
        }
    }
    let resolver = SniResolver {
        exact,
        wildcard,
        default: match l.unknown_sni {
            UnknownSni::Default => first,
            UnknownSni::Reject => None,
        },
    };
    let versions: &[&'static rustls::SupportedProtocolVersion] = match l.min_tls_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| read_err(Path::new("<tls policy>"), "protocol versions", e))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = l.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    cfg.ignore_client_order = true;
    // Stateful resumption only (no tickets): nothing outlives the process's memory.
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Ok(Arc::new(cfg))
}

/// Builds the client configuration used towards HTTPS backends of a pool.
pub(crate) fn backend_client_config(ca: &Path, h2: bool) -> Result<Arc<ClientConfig>, CertError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| read_err(ca, "CA certificate", e))? {
        let c = c.map_err(|e| read_err(ca, "CA certificate", e))?;
        roots
            .add(c)
            .map_err(|e| read_err(ca, "CA certificate", e))?;
    }
    if roots.is_empty() {
        return Err(read_err(ca, "CA certificate", "no CERTIFICATE block"));
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| read_err(ca, "client policy", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = if h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(cfg))
}
