//! rustls client configuration for `https` checks: ring provider, TLS 1.2 and 1.3.

use std::{
    path::Path,
    sync::{Arc, OnceLock},
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};

use crate::{IoReason, ProbeError};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client configuration of one `https` check.
///
/// `ca_file`: PEM file whose certificates are the only trust anchors. Neither it nor
/// `insecure`: the operating system's trust store (read once per process). `insecure`:
/// no certificate verification at all, only the handshake signature is checked.
pub(crate) fn client_config(
    ca_file: Option<&Path>,
    insecure: bool,
) -> Result<Arc<ClientConfig>, ProbeError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| ProbeError::TlsSetup(e.to_string()))?;
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let roots = match ca_file {
            Some(path) => Arc::new(load_ca_file(path)?),
            None => system_roots(),
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn load_ca_file(path: &Path) -> Result<RootCertStore, ProbeError> {
    let bad = |e: rustls_pki_types::pem::Error| ProbeError::CaFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(bad)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(ProbeError::NoUsableCa(path.to_path_buf()));
    }
    Ok(roots)
}

fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system trust store");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system trust store loaded");
            Arc::new(roots)
        })
        .clone()
}

/// The server name to send and verify: `sni`, else `host` without its port, else the IP.
pub(crate) fn server_name(
    sni: Option<&str>,
    host: Option<&str>,
    ip: std::net::IpAddr,
) -> Result<ServerName<'static>, ProbeError> {
    let name = match (sni, host) {
        (Some(s), _) => s.to_string(),
        (None, Some(h)) => strip_port(h).to_string(),
        (None, None) => return Ok(ServerName::IpAddress(ip.into())),
    };
    ServerName::try_from(name).map_err(|_| ProbeError::ServerName)
}

/// `host:port` -> `host`, `[v6]:port` -> `v6`, anything else unchanged.
fn strip_port(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match h.rsplit_once(':') {
        Some((name, port))
            if !name.contains(':')
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            name
        }
        _ => h,
    }
}

/// Short reason for a failed TLS handshake, from rustls' error when there is one.
pub(crate) fn handshake_error(e: &std::io::Error) -> ProbeError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => ProbeError::Handshake(tls.to_string()),
        None => ProbeError::Handshake(IoReason::from(e).to_string()),
    }
}

/// Certificate "verifier" for `insecure = true`: trusts any certificate, but still checks
/// that the server holds the key of the certificate it sent.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_ports() {
        assert_eq!(strip_port("app.example.org:8443"), "app.example.org");
        assert_eq!(strip_port("app.example.org"), "app.example.org");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("10.0.0.1:80"), "10.0.0.1");
    }

    #[test]
    fn server_names() {
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        assert_eq!(
            server_name(None, None, ip).unwrap(),
            ServerName::IpAddress(ip.into())
        );
        assert_eq!(
            server_name(None, Some("a.example.org:8443"), ip).unwrap(),
            ServerName::try_from("a.example.org").unwrap()
        );
        assert_eq!(
            server_name(Some("b.example.org"), Some("a.example.org"), ip).unwrap(),
            ServerName::try_from("b.example.org").unwrap()
        );
    }
}
