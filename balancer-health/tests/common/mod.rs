//! Real peers on 127.0.0.1 ephemeral ports: TCP, HTTP, HTTPS (rcgen CA) and MLLP.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpListener,
};

use balancer_health::mllp;

/// Bound on every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(5);

/// A listener that accepts connections, says nothing, and closes them after 2 s.
pub async fn tcp_listener() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                drop(s);
            });
        }
    });
    addr
}

/// An address on which nothing listens (bound, then closed).
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

/// Body of healthy answers.
pub const BODY_OK: &str = "service healthy SECRET-BODY";
/// Body of unhealthy answers.
pub const BODY_BAD: &str = "service degraded SECRET-BODY";

/// An HTTP (or HTTPS) server whose status can be changed while it runs.
#[derive(Clone)]
pub struct HttpServer {
    pub addr: SocketAddr,
    /// Status of the next answers (ignored while `alternate` is set).
    pub status: Arc<AtomicU16>,
    /// Non-zero: answer 200 and 503 in turn.
    pub alternate: Arc<AtomicU16>,
    /// Requests served, by status class: total and non-2xx.
    pub hits: Arc<AtomicUsize>,
    pub failures_served: Arc<AtomicUsize>,
    /// Host header of the last request.
    pub last_host: Arc<Mutex<Option<String>>>,
}

impl HttpServer {
    pub fn set_status(&self, s: u16) {
        self.status.store(s, Ordering::SeqCst);
    }
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    pub fn failures_served(&self) -> usize {
        self.failures_served.load(Ordering::SeqCst)
    }
}

pub async fn http_server(status: u16) -> HttpServer {
    serve(status, None).await
}

pub async fn https_server(status: u16, tls: Arc<ServerConfig>) -> HttpServer {
    serve(status, Some(tls)).await
}

async fn serve(status: u16, tls: Option<Arc<ServerConfig>>) -> HttpServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HttpServer {
        addr: listener.local_addr().unwrap(),
        status: Arc::new(AtomicU16::new(status)),
        alternate: Arc::new(AtomicU16::new(0)),
        hits: Arc::default(),
        failures_served: Arc::default(),
        last_host: Arc::default(),
    };
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let state = server.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => serve_conn(stream, state).await,
                    Some(a) => {
                        // A client that refuses our certificate aborts here: fine.
                        if let Ok(tls) = a.accept(stream).await {
                            serve_conn(tls, state).await;
                        }
                    }
                }
            });
        }
    });
    server
}

async fn serve_conn<S>(io: S, state: HttpServer)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        async move {
            let n = state.hits.fetch_add(1, Ordering::SeqCst);
            *state.last_host.lock().unwrap() = req
                .headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string);
            let status = if state.alternate.load(Ordering::SeqCst) != 0 {
                if n.is_multiple_of(2) { 200 } else { 503 }
            } else {
                state.status.load(Ordering::SeqCst)
            };
            if !(200..300).contains(&status) {
                state.failures_served.fetch_add(1, Ordering::SeqCst);
            }
            let body = if status == 200 { BODY_OK } else { BODY_BAD };
            let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
            Ok::<_, Infallible>(resp)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// A test PKI: a CA, and a server certificate it signed for `localhost` and 127.0.0.1.
pub struct Pki {
    /// PEM file holding the CA certificate.
    pub ca_file: PathBuf,
    pub server_config: Arc<ServerConfig>,
}

static FILE_SEQ: AtomicU64 = AtomicU64::new(0);

pub fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "balancer-health test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();

    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();

    let ca_file = std::env::temp_dir().join(format!(
        "balancer-health-ca-{}-{}.pem",
        std::process::id(),
        FILE_SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    Pki {
        ca_file,
        server_config: Arc::new(server_config),
    }
}

/// How an MLLP peer answers each message.
#[derive(Clone, Copy, Debug)]
pub enum MllpReply {
    /// A proper ACK with this MSA-1 (and a text in MSA-3 that must never leak).
    Ack(&'static str),
    /// Bytes that are not an MLLP frame.
    Garbage,
    /// A frame whose content is not an ACK.
    NotAck,
    /// A frame larger than any ACK the checker accepts.
    Oversized,
    /// Read the message, answer nothing, keep the connection open.
    Silence,
    /// Read the message and close.
    Close,
}

/// An MLLP peer; records every message it received.
pub struct MllpServer {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Vec<u8>>>>,
}

pub async fn mllp_server(reply: MllpReply) -> MllpServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let log = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                while let Ok(msg) = mllp::read_frame(&mut reader, 1 << 20).await {
                    log.lock().unwrap().push(msg.clone());
                    let out = match reply {
                        MllpReply::Ack(code) => {
                            let mut ack = mllp::make_ack(&msg, code);
                            ack.extend_from_slice(b"|SECRET-TEXT");
                            mllp::frame(&ack)
                        }
                        MllpReply::Garbage => b"SECRET-GARBAGE\r\n".to_vec(),
                        MllpReply::NotAck => {
                            mllp::frame(b"MSH|^~\\&|X|Y|||1||ADT^A01|1|P|2.3\rPID|1||SECRET")
                        }
                        MllpReply::Oversized => {
                            let mut big = b"MSH|^~\\&|X\rMSA|AA|1|".to_vec();
                            big.resize(200 * 1024, b'S');
                            mllp::frame(&big)
                        }
                        MllpReply::Silence => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                        MllpReply::Close => return,
                    };
                    if reader.get_mut().write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    MllpServer { addr, received }
}
