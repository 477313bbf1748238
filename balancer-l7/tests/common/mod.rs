//! Test fixtures: certificates made with rcgen, small hyper backends, real curl and
//! openssl s_client processes. Every wait is bounded.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "balancer-l7-{tag}-{}-{}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// A private CA that signs leaf certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes `<stem>.pem` (leaf) and `<stem>.key` for `names`, with CN `cn`.
    pub fn leaf(&self, dir: &TempDir, stem: &str, cn: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.path(&format!("{stem}.pem")),
            dir.path(&format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    pub fn write(&self, dir: &TempDir, file: &str) -> PathBuf {
        let p = dir.path(file);
        std::fs::write(&p, &self.pem).unwrap();
        p
    }
}

/// A small HTTP backend. Answers `id=<id> path=<path> xff=<..> proto=<..> fhost=<..>`;
/// `/slow` waits 3 s; `/big` answers [`BIG`] bytes; a request with `Upgrade` gets 101 and an
/// echo of every byte after it.
/// Dropping it (or `kill`) closes the listener and every open connection.
pub struct Backend {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub fn kill(&self) {
        self.task.abort();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend_svc(
    id: Arc<str>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    if req.uri().path().ends_with("/big") {
        return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; BIG]))));
    }
    if req.uri().path().ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    let body = format!(
        "id={id} path={} xff={} proto={} fhost={} version={:?} fwd={} realip={}\n",
        req.uri().path(),
        h("x-forwarded-for"),
        h("x-forwarded-proto"),
        h("x-forwarded-host"),
        req.version(),
        h("forwarded"),
        h("x-real-ip"),
    );
    // Like an application server, read the request body before answering. (A backend that
    // answers first makes the proxy end the client's HTTP/2 stream with RST_STREAM, which
    // Debian's curl 7.88 reports as error 92 even after a complete response.)
    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
    Ok(Response::new(Full::new(Bytes::from(body))))
}

/// Size of the `/big` answer: far more than the socket buffers between proxy and client.
pub const BIG: usize = 32 * 1024 * 1024;

/// Starts a backend on 127.0.0.1 (plain, or TLS with `tls = Some(ServerConfig)`), HTTP/1.1 and h2.
pub async fn backend(id: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    backend_on(listener, id, tls)
}

pub fn backend_on(
    listener: TcpListener,
    id: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Backend {
    let addr = listener.local_addr().unwrap();
    let id: Arc<str> = Arc::from(id);
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let id = id.clone();
            let tls = tls.clone();
            conns.spawn(async move {
                let svc = service_fn(move |req| backend_svc(id.clone(), req));
                let b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    None => {
                        let _ = b
                            .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                            .await;
                    }
                    Some(cfg) => {
                        let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                            return;
                        };
                        let _ = b.serve_connection_with_upgrades(TokioIo::new(s), svc).await;
                    }
                }
            });
        }
    });
    Backend {
        addr,
        accepted,
        task,
    }
}

/// A rustls server config for a TLS backend, from PEM files.
pub fn backend_tls(cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A port on 127.0.0.1 where nothing listens.
pub async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Runs a command with a hard time limit; returns its output.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Same as [`run`], off the async runtime.
pub async fn run_async(mut cmd: Command, limit: Duration) -> Output {
    tokio::task::spawn_blocking(move || run(&mut cmd, limit))
        .await
        .unwrap()
}

/// curl against the proxy: `https://<host>:<port><path>` resolved to 127.0.0.1, trusting `ca`.
/// Returns (status code, body, stderr+version line).
pub async fn curl(
    ca: &Path,
    host: &str,
    port: u16,
    path: &str,
    extra: &[&str],
) -> (u16, String, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"));
    let out = run_async(c, Duration::from_secs(15)).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let mut it = tail.split(' ');
    let code = it.next().unwrap_or("0").parse().unwrap_or(0);
    let version = it.next().unwrap_or("").to_string();
    (
        code,
        body.to_string(),
        format!("{}version={version}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// openssl s_client handshake; returns its combined output.
pub async fn s_client(port: u16, servername: Option<&str>, extra: &[&str]) -> String {
    let mut c = Command::new("openssl");
    c.args(["s_client", "-connect", &format!("127.0.0.1:{port}")]);
    if let Some(s) = servername {
        c.args(["-servername", s]);
    } else {
        c.arg("-noservername");
    }
    c.args(extra);
    let out = run_async(c, Duration::from_secs(10)).await;
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Parses an `[l7]` TOML body.
pub fn config(toml_src: &str) -> balancer_l7::L7Config {
    toml::from_str(toml_src).unwrap_or_else(|e| panic!("{e}\n{toml_src}"))
}

/// A TLS client config trusting `ca_pem`, with the given ALPN.
pub fn client_tls(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}
