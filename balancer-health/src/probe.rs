//! One check of one target. Reasons are short and never contain payload bytes.

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{
    Request,
    header::{CONNECTION, HOST, USER_AGENT},
};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::{CheckKind, HealthSpec, IoReason, ProbeError, mllp, tls};

/// Most of a response body read to look for `body_contains`.
const MAX_BODY: usize = 64 * 1024;
/// Largest MLLP ACK accepted.
const MAX_ACK: usize = 64 * 1024;

/// Runs one check of `addr` as `spec` says, bounded by `spec.timeout`.
///
/// Returns the latency (connect to verdict) of a healthy answer, or a short reason such as
/// `"connect refused"`, `"status 503"`, `"MSA-1 AE"` or `"timeout 200ms"`. A reason never
/// contains response bodies or HL7 content. For `https`, the CA file is read on every call;
/// [`crate::Monitor`] reads it once per target.
pub async fn probe(addr: SocketAddr, spec: &HealthSpec) -> Result<Duration, ProbeError> {
    Prober::new(addr, spec.clone())
        .run()
        .await
        .map(|ok| ok.latency)
}

/// A healthy verdict.
#[derive(Debug, Clone)]
pub(crate) struct Success {
    /// From the start of the connect to the verdict.
    pub latency: Duration,
    /// What made it healthy, e.g. `status 200`; no payload.
    pub detail: String,
}

/// A target's check, prepared once (TLS configuration) and run many times.
pub(crate) struct Prober {
    addr: SocketAddr,
    spec: HealthSpec,
    tls: Option<Result<Arc<ClientConfig>, ProbeError>>,
}

impl Prober {
    pub(crate) fn new(addr: SocketAddr, spec: HealthSpec) -> Self {
        let addr = spec.port.map_or(addr, |p| SocketAddr::new(addr.ip(), p));
        let tls = match &spec.kind {
            CheckKind::Https {
                ca_file, insecure, ..
            } => Some(tls::client_config(ca_file.as_deref(), *insecure)),
            _ => None,
        };
        Prober { addr, spec, tls }
    }

    /// One check, bounded by the spec's timeout.
    pub(crate) async fn run(&self) -> Result<Success, ProbeError> {
        let start = Instant::now();
        match tokio::time::timeout(self.spec.timeout, self.check()).await {
            Ok(Ok(detail)) => Ok(Success {
                latency: start.elapsed(),
                detail,
            }),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err(ProbeError::Timeout(self.spec.timeout)),
        }
    }

    async fn check(&self) -> Result<String, ProbeError> {
        match &self.spec.kind {
            CheckKind::Tcp => {
                connect(self.addr).await?;
                Ok("connected".into())
            }
            CheckKind::Http {
                path,
                expect_status,
                body_contains,
                host,
            } => {
                let stream = connect(self.addr).await?;
                let authority = host.clone().unwrap_or_else(|| self.addr.to_string());
                http_get(
                    stream,
                    &authority,
                    path,
                    expect_status,
                    body_contains.as_deref(),
                )
                .await
            }
            CheckKind::Https {
                path,
                expect_status,
                body_contains,
                host,
                sni,
                ..
            } => {
                let config = match &self.tls {
                    Some(Ok(c)) => c.clone(),
                    Some(Err(e)) => return Err(e.clone()),
                    None => return Err(ProbeError::TlsSetup("missing".into())),
                };
                let name = tls::server_name(sni.as_deref(), host.as_deref(), self.addr.ip())?;
                let stream = connect(self.addr).await?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await
                    .map_err(|e| tls::handshake_error(&e))?;
                let authority = host.clone().unwrap_or_else(|| self.addr.to_string());
                http_get(
                    stream,
                    &authority,
                    path,
                    expect_status,
                    body_contains.as_deref(),
                )
                .await
            }
            CheckKind::Mllp { message } => {
                let message = match message {
                    Some(m) => m.replace("\r\n", "\r").replace('\n', "\r"),
                    None => mllp::ping(),
                };
                mllp_exchange(self.addr, message.as_bytes()).await
            }
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, ProbeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| ProbeError::Connect(IoReason::from(&e)))?;
    // Small request, answer awaited at once: do not let Nagle hold it back.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Aborts the spawned connection driver when the exchange ends, whatever its outcome.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn http_get<S>(
    stream: S,
    authority: &str,
    path: &str,
    expect_status: &[u16],
    body_contains: Option<&str>,
) -> Result<String, ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http_error(&e))?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let request = Request::get(path)
        .header(HOST, authority)
        .header(USER_AGENT, "balancer-health")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|_| ProbeError::InvalidRequest)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http_error(&e))?;
    let status = response.status().as_u16();
    if !expect_status.contains(&status) {
        return Err(ProbeError::Status(status));
    }
    if let Some(needle) = body_contains {
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|_| ProbeError::BodyUnreadable {
                status,
                max: MAX_BODY,
            })?
            .to_bytes();
        if !contains(&body, needle.as_bytes()) {
            return Err(ProbeError::BodyMismatch(status));
        }
        return Ok(format!("status {status}, body match"));
    }
    Ok(format!("status {status}"))
}

/// hyper's error kinds, named without any of the bytes that caused them.
fn http_error(e: &hyper::Error) -> ProbeError {
    let what = if e.is_parse() || e.is_parse_status() {
        "malformed response"
    } else if e.is_incomplete_message() {
        "connection closed before response"
    } else if e.is_closed() || e.is_canceled() {
        "connection closed"
    } else if e.is_timeout() {
        "timed out"
    } else {
        "exchange failed"
    };
    ProbeError::Http(what)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

async fn mllp_exchange(addr: SocketAddr, message: &[u8]) -> Result<String, ProbeError> {
    let mut stream = connect(addr).await?;
    stream
        .write_all(&mllp::frame(message))
        .await
        .map_err(|e| ProbeError::MllpSend(IoReason::from(&e)))?;
    let mut reader = BufReader::new(stream);
    let reply = mllp::read_frame(&mut reader, MAX_ACK)
        .await
        .map_err(|e| match e.kind() {
            // read_frame's InvalidData messages name the problem, never the bytes.
            io::ErrorKind::InvalidData => ProbeError::MllpFrame(e.to_string()),
            io::ErrorKind::UnexpectedEof => ProbeError::MllpClosed,
            _ => ProbeError::MllpReceive(IoReason::from(&e)),
        })?;
    match mllp::ack_code(&reply).as_deref() {
        Some(code @ ("AA" | "CA")) => Ok(format!("MSA-1 {code}")),
        // Known codes only: anything else in MSA-1 is payload and is not echoed.
        Some("AE") => Err(ProbeError::Nack("AE")),
        Some("AR") => Err(ProbeError::Nack("AR")),
        Some("CE") => Err(ProbeError::Nack("CE")),
        Some("CR") => Err(ProbeError::Nack("CR")),
        Some(_) => Err(ProbeError::NotAnAck),
        None => Err(ProbeError::NoMsa),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substring() {
        assert!(contains(b"all good here", b"good"));
        assert!(!contains(b"all bad here", b"good"));
        assert!(!contains(b"go", b"good"));
    }

    #[test]
    fn io_reasons_are_short() {
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            ProbeError::Connect(IoReason::from(&e)).to_string(),
            "connect refused"
        );
    }
}
