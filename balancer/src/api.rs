//! The control API: HTTP/1.1 with JSON bodies on a root-only unix socket, and its client.
//!
//! Routes:
//! - `GET  /v1/status`: the daemon's [`Status`] as JSON.
//! - `POST /v1/services/{service}/backends/{backend}/{drain|disable|enable}`
//! - `POST /v1/reload`
//!
//! Successful operations answer `{"ok": true, "message": "..."}`; every failure answers
//! `{"error": "..."}` with 400 (a bad request or one the daemon refused), 403 (peer not root),
//! 404 (no such route), 405 (wrong method), 409 (reload refused: the running config keeps
//! serving), 503 (daemon gone) or 504 (daemon did not answer in time).
//!
//! The API only ever asks the daemon through its channel: it owns no state.

use std::{
    convert::Infallible,
    fmt::Write as _,
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http::{HeaderValue, Method, Request as HttpRequest, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{debug, info, warn};

use crate::control::{Message, Request, Status};

/// How long the daemon may take to answer one request (a reload re-reads the config and
/// rewrites maps; everything else is immediate).
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole connection (keep-alive included) is closed after this time.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);
/// The client's limit for one call (daemon timeout plus slack).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(40);
/// Largest reply the client reads.
const MAX_REPLY_BYTES: usize = 64 << 20;

/// Serves the control API on a unix socket until the listener fails.
///
/// Creates the parent directory (mode 0700) if missing, replaces a stale socket, binds, and
/// restricts the socket to its owner (mode 0600, owner root when running as root). Every
/// connection's peer credentials are checked as well: only uid 0 is served, anyone else
/// gets 403.
pub async fn serve(path: &Path, tx: mpsc::Sender<Message>) -> anyhow::Result<()> {
    let listener = bind(path)?;
    info!(socket = %path.display(), "control socket listening");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // Out of descriptors and the like: wait a little instead of spinning.
            Err(e) if is_transient(&e) => {
                warn!(error = %e, "control socket accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e).context("control socket accept"),
        };
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        if uid != Some(0) {
            warn!(uid = ?uid, "control socket: refusing a non-root peer");
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let tx = tx.clone();
                async move { Ok::<_, Infallible>(handle(req, uid, &tx).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "control connection ended with an error"),
                Err(_) => debug!("control connection closed after the connection timeout"),
            }
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) || matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::Interrupted
    )
}

/// Prepares the directory, removes a stale socket, binds and restricts the socket.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A socket someone still answers on is another daemon's: do not steal it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("{} is in use: is another balancer running?", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    // Created by root it is root's already: chown only otherwise (the unit's syscall filter
    // and capability set leave no chown to a root daemon that does not need one).
    let meta = std::fs::metadata(path).with_context(|| format!("inspecting {}", path.display()))?;
    if nix::unistd::geteuid().is_root() && (meta.uid() != 0 || meta.gid() != 0) {
        std::os::unix::fs::chown(path, Some(0), Some(0))
            .with_context(|| format!("chown root {}", path.display()))?;
    }
    Ok(listener)
}

/// One request: route, ask the daemon, map its answer to a status code.
async fn handle(
    req: HttpRequest<Incoming>,
    uid: Option<u32>,
    tx: &mpsc::Sender<Message>,
) -> Response<Full<Bytes>> {
    if uid != Some(0) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden: the control socket serves root only",
        );
    }
    let request = match route(req.method(), req.uri().path()) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    debug!(method = %req.method(), path = %req.uri().path(), "control request");
    // Reload failures are a refused config; the other operations fail on bad input.
    let refused = if request == Request::Reload {
        StatusCode::CONFLICT
    } else {
        StatusCode::BAD_REQUEST
    };
    let is_status = request == Request::Status;
    match ask(tx, request).await {
        Ok(Ok(v)) => json_response(StatusCode::OK, &v),
        Ok(Err(e)) if is_status => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        Ok(Err(e)) => error(refused, &e),
        Err(AskError::Gone) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        ),
        Err(AskError::Timeout) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "the daemon did not answer in time",
        ),
    }
}

/// Why the daemon gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AskError {
    /// The daemon loop is gone (shutting down).
    Gone,
    /// No answer within [`DAEMON_TIMEOUT`].
    Timeout,
}

impl std::fmt::Display for AskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Gone => f.write_str("the daemon is shutting down"),
            AskError::Timeout => f.write_str("the daemon did not answer in time"),
        }
    }
}

impl std::error::Error for AskError {}

/// Sends one request to the daemon loop and waits (at most [`DAEMON_TIMEOUT`]) for its reply.
pub async fn ask(
    tx: &mpsc::Sender<Message>,
    request: Request,
) -> Result<crate::control::Reply, AskError> {
    let (reply, rx) = oneshot::channel();
    let work = async {
        tx.send(Message { request, reply })
            .await
            .map_err(|_| AskError::Gone)?;
        rx.await.map_err(|_| AskError::Gone)
    };
    tokio::time::timeout(DAEMON_TIMEOUT, work)
        .await
        .map_err(|_| AskError::Timeout)?
}

/// Maps method and path to a daemon request, or to the 404 / 405 / 400 response.
fn route(method: &Method, path: &str) -> Result<Request, Box<Response<Full<Bytes>>>> {
    let segs: Vec<&str> = path.split('/').collect();
    let (allowed, request) = match segs.as_slice() {
        ["", "v1", "status"] => (Method::GET, Request::Status),
        ["", "v1", "reload"] => (Method::POST, Request::Reload),
        ["", "v1", "services", service, "backends", backend, op] => {
            let (Some(service), Some(backend)) = (percent_decode(service), percent_decode(backend))
            else {
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "bad percent-encoding in the path",
                )));
            };
            let r = match *op {
                "drain" => Request::Drain { service, backend },
                "disable" => Request::Disable { service, backend },
                "enable" => Request::Enable { service, backend },
                _ => return Err(Box::new(error(StatusCode::NOT_FOUND, "no such route"))),
            };
            (Method::POST, r)
        }
        _ => return Err(Box::new(error(StatusCode::NOT_FOUND, "no such route"))),
    };
    if *method != allowed {
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("method not allowed: use {allowed}"),
        );
        if let Ok(v) = HeaderValue::from_str(allowed.as_str()) {
            resp.headers_mut().insert(header::ALLOW, v);
        }
        return Err(Box::new(resp));
    }
    Ok(request)
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(v)
        .unwrap_or_else(|_| b"{\"error\":\"cannot encode the reply\"}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": msg }))
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved characters).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Decodes one percent-encoded path segment; `None` on a bad escape or non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The URI of a backend operation (`op` is drain, disable or enable).
pub fn backend_uri(service: &str, backend: &str, op: &str) -> String {
    format!(
        "/v1/services/{}/backends/{}/{op}",
        percent_encode(service),
        percent_encode(backend)
    )
}

/// Calls the control API on `path`: the reply's JSON on success, the daemon's `error`
/// message as the error otherwise.
pub async fn call(path: &Path, method: Method, uri: &str) -> anyhow::Result<Value> {
    tokio::time::timeout(CLIENT_TIMEOUT, call_inner(path, method, uri))
        .await
        .map_err(|_| {
            anyhow!(
                "no answer from the control socket {} within {CLIENT_TIMEOUT:?}",
                path.display()
            )
        })?
}

async fn call_inner(path: &Path, method: Method, uri: &str) -> anyhow::Result<Value> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => anyhow!(
                "is balancer running? no control socket at {}",
                path.display()
            ),
            ErrorKind::ConnectionRefused => {
                anyhow!(
                    "is balancer running? the control socket {} refuses connections",
                    path.display()
                )
            }
            ErrorKind::PermissionDenied => anyhow!(
                "permission denied on {}: the control socket is root only",
                path.display()
            ),
            _ => anyhow!("connecting to {}: {e}", path.display()),
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("control socket handshake")?;
    let conn = tokio::spawn(conn);
    let req = HttpRequest::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "balancer")
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let resp = sender
        .send_request(req)
        .await
        .context("sending the request")?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the reply: {e}"))?
        .to_bytes();
    conn.abort();
    let value: Value = serde_json::from_slice(&body).with_context(|| {
        format!("the control socket answered {status} with a body that is not JSON")
    })?;
    if status.is_success() {
        Ok(value)
    } else {
        match value.get("error").and_then(Value::as_str) {
            Some(e) => bail!("{e}"),
            None => bail!("the control socket answered {status}"),
        }
    }
}

/// A CLI verb spoken over the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `balancer status [--json]`.
    Status {
        /// Print the API's JSON instead of the table.
        json: bool,
    },
    /// `balancer drain SVC BACKEND`.
    Drain {
        /// Service name.
        service: String,
        /// Backend address or IP.
        backend: String,
    },
    /// `balancer disable SVC BACKEND`.
    Disable {
        /// Service name.
        service: String,
        /// Backend address or IP.
        backend: String,
    },
    /// `balancer enable SVC BACKEND`.
    Enable {
        /// Service name.
        service: String,
        /// Backend address or IP.
        backend: String,
    },
    /// `balancer reload`.
    Reload,
}

impl Command {
    /// The method and URI of the verb.
    pub fn request(&self) -> (Method, String) {
        match self {
            Command::Status { .. } => (Method::GET, "/v1/status".into()),
            Command::Drain { service, backend } => {
                (Method::POST, backend_uri(service, backend, "drain"))
            }
            Command::Disable { service, backend } => {
                (Method::POST, backend_uri(service, backend, "disable"))
            }
            Command::Enable { service, backend } => {
                (Method::POST, backend_uri(service, backend, "enable"))
            }
            Command::Reload => (Method::POST, "/v1/reload".into()),
        }
    }
}

/// Runs a verb against the daemon and returns what to print: the status table (or JSON),
/// or the daemon's message. The error is the daemon's refusal, or why it could not be asked.
pub async fn command(socket: &Path, cmd: &Command) -> anyhow::Result<String> {
    let (method, uri) = cmd.request();
    let v = call(socket, method, &uri).await?;
    Ok(match cmd {
        Command::Status { json: true } => format!("{}\n", serde_json::to_string_pretty(&v)?),
        Command::Status { json: false } => {
            let s: Status =
                serde_json::from_value(v).context("the daemon's status has an unexpected shape")?;
            status_table(&s)
        }
        _ => match v.get("message").and_then(Value::as_str) {
            Some(m) => format!("{m}\n"),
            None => format!("{v}\n"),
        },
    })
}

/// The CLI's entry for a verb: prints the result on stdout, or `balancer: <error>` on stderr,
/// and returns the process exit code (0 or 1).
pub fn cli(socket: &Path, cmd: &Command) -> i32 {
    let out = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(command(socket, cmd)));
    match out {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("balancer: {e:#}");
            1
        }
    }
}

/// Renders a status as the readable table of `balancer status`.
pub fn status_table(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "config {}  interfaces {}  uptime {}",
        s.config,
        if s.interfaces.is_empty() {
            "-".to_string()
        } else {
            s.interfaces.join(",")
        },
        uptime(s.uptime_secs)
    );
    let _ = writeln!(
        out,
        "reloads {}  config errors {}  failovers {}  flows {}",
        s.reloads, s.config_errors, s.failovers, s.flows
    );
    if !s.reasons.is_empty() {
        let reasons: Vec<String> = s.reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "verdicts {}", reasons.join("  "));
    }
    for svc in &s.services {
        out.push('\n');
        let t = &svc.traffic;
        let head = [
            vec![
                "SERVICE",
                "VIP",
                "PROTO",
                "FWD",
                "SCHEDULER",
                "CHECK",
                "ACTIVE",
                "PACKETS",
                "BYTES",
                "NEW FLOWS",
                "RESETS",
                "DROPS",
            ]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>(),
            vec![
                svc.name.clone(),
                svc.vip.to_string(),
                svc.protocol.clone(),
                svc.forwarding.clone(),
                svc.scheduler.clone(),
                svc.health_check.clone().unwrap_or_else(|| "-".into()),
                svc.active.map_or_else(
                    || {
                        if svc.scheduler == "failover" {
                            "NONE".into()
                        } else {
                            "-".into()
                        }
                    },
                    |a| a.to_string(),
                ),
                t.packets.to_string(),
                human_bytes(t.bytes),
                t.new_flows.to_string(),
                t.resets.to_string(),
                t.drops.to_string(),
            ],
        ];
        out.push_str(&columns(&head, "lllllllrrrrr", ""));
        let mut rows = vec![
            [
                "BACKEND",
                "WEIGHT",
                "PRIO",
                "ADMIN",
                "HEALTH",
                "STATE",
                "ACTIVE",
                "LATENCY",
                "PACKETS",
                "BYTES",
                "NEW FLOWS",
                "RESETS",
                "DROPS",
            ]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>(),
        ];
        for b in &svc.backends {
            let t = &b.traffic;
            rows.push(vec![
                b.address.to_string(),
                b.weight.to_string(),
                b.priority.to_string(),
                b.admin.clone(),
                b.health.clone(),
                b.state.clone(),
                if b.active { "*".into() } else { "".into() },
                b.check_latency_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms")),
                t.packets.to_string(),
                human_bytes(t.bytes),
                t.new_flows.to_string(),
                t.resets.to_string(),
                t.drops.to_string(),
            ]);
        }
        out.push_str(&columns(&rows, "lrrllllrrrrrr", "  "));
    }
    if !s.l7_backends.is_empty() {
        out.push('\n');
        let mut rows = vec![
            [
                "L7 POOL",
                "BACKEND",
                "HEALTH",
                "LATENCY",
                "REQUESTS",
                "CONNECT FAILURES",
            ]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>(),
        ];
        for b in &s.l7_backends {
            rows.push(vec![
                b.pool.clone(),
                b.address.to_string(),
                b.health.clone(),
                b.check_latency_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms")),
                b.requests.to_string(),
                b.connect_failures.to_string(),
            ]);
        }
        out.push_str(&columns(&rows, "lllrrr", ""));
    }
    out
}

/// Aligns rows in columns; `align` has one letter per column: `l`eft or `r`ight.
fn columns(rows: &[Vec<String>], align: &str, indent: &str) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::from(indent);
        for (i, c) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let w = widths[i];
            if align.as_bytes().get(i) != Some(&b'r') {
                let _ = write!(line, "{c:<w$}");
            } else {
                let _ = write!(line, "{c:>w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b}B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}

fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h{m:02}m")
    } else {
        format!("{h}h{m:02}m{s:02}s")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{collections::BTreeMap, path::PathBuf};

    use super::*;
    use crate::{
        control::{BackendStatus, ServiceStatus},
        report::Traffic,
    };

    /// A status with one failover service and one maglev service.
    pub(crate) fn sample_status() -> Status {
        let traffic = |p: u64| Traffic {
            packets: p,
            bytes: p * 1500,
            new_flows: p / 100,
            resets: p / 1000,
            drops: 0,
        };
        let backend =
            |addr: &str, weight, priority, health: &str, state: &str, active, p| BackendStatus {
                address: addr.parse().unwrap(),
                weight,
                priority,
                admin: if state == "draining" {
                    "drain".into()
                } else {
                    "up".into()
                },
                health: health.into(),
                state: state.into(),
                active,
                check_latency_ms: (health == "up").then_some(0.84),
                traffic: traffic(p),
            };
        Status {
            config: "/etc/balancer/balancer.toml".into(),
            l7: None,
            l7_backends: Vec::new(),
            capacity: crate::control::Capacity {
                flow_table_entries: 262144,
                snat_ports: 22768,
            },
            certificates: vec![
                crate::control::CertificateStatus {
                    listener: "https".into(),
                    cert: "/etc/balancer/tls/lb.example.org.pem".into(),
                    not_after: Some(1_900_000_000),
                },
                crate::control::CertificateStatus {
                    listener: "https".into(),
                    cert: "/etc/balancer/tls/missing.pem".into(),
                    not_after: None,
                },
            ],
            interfaces: vec!["eth0".into()],
            uptime_secs: 3723,
            reloads: 2,
            config_errors: 1,
            failovers: 1,
            flows: 1234,
            reasons: BTreeMap::from([("pass".into(), 99), ("no_backend".into(), 3)]),
            services: vec![
                ServiceStatus {
                    name: "hl7-listener".into(),
                    vip: "10.77.0.100:6661".parse().unwrap(),
                    protocol: "tcp".into(),
                    forwarding: "nat".into(),
                    scheduler: "failover".into(),
                    health_check: Some("mllp".into()),
                    active: Some("10.77.0.12:6661".parse().unwrap()),
                    traffic: traffic(5000),
                    backends: vec![
                        backend("10.77.0.11:6661", 1, 1, "down", "down", false, 1000),
                        backend("10.77.0.12:6661", 1, 2, "up", "up", true, 4000),
                    ],
                },
                ServiceStatus {
                    name: "web".into(),
                    vip: "10.77.0.100:7002".parse().unwrap(),
                    protocol: "tcp".into(),
                    forwarding: "nat".into(),
                    scheduler: "maglev".into(),
                    health_check: Some("http".into()),
                    active: None,
                    traffic: traffic(3_000_000),
                    backends: vec![
                        backend("10.77.0.11:7002", 1, 0, "up", "up", false, 1_000_000),
                        backend("10.77.0.12:7002", 2, 0, "up", "draining", false, 2_000_000),
                        backend("[fd00::13]:7002", 1, 0, "unchecked", "up", false, 0),
                    ],
                },
            ],
        }
    }

    #[test]
    fn routes() {
        assert_eq!(
            route(&Method::GET, "/v1/status").ok(),
            Some(Request::Status)
        );
        assert_eq!(
            route(&Method::POST, "/v1/reload").ok(),
            Some(Request::Reload)
        );
        assert_eq!(
            route(
                &Method::POST,
                "/v1/services/web/backends/10.77.0.11%3A7002/drain"
            )
            .ok(),
            Some(Request::Drain {
                service: "web".into(),
                backend: "10.77.0.11:7002".into()
            })
        );
        assert_eq!(
            route(
                &Method::POST,
                "/v1/services/hl7/backends/10.77.0.11:6661/disable"
            )
            .ok(),
            Some(Request::Disable {
                service: "hl7".into(),
                backend: "10.77.0.11:6661".into()
            })
        );
        assert_eq!(
            route(
                &Method::POST,
                "/v1/services/a%20b/backends/%5Bfd00%3A%3A1%5D%3A80/enable"
            )
            .ok(),
            Some(Request::Enable {
                service: "a b".into(),
                backend: "[fd00::1]:80".into()
            })
        );
        let code = |m: &Method, p: &str| route(m, p).err().map(|r| r.status());
        assert_eq!(
            code(&Method::POST, "/v1/status"),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            code(&Method::GET, "/v1/reload"),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            code(&Method::GET, "/v1/services/web/backends/x/drain"),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            code(&Method::POST, "/v1/services/web/backends/x/explode"),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(code(&Method::GET, "/"), Some(StatusCode::NOT_FOUND));
        assert_eq!(
            code(&Method::GET, "/v1/status/"),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(code(&Method::GET, ""), Some(StatusCode::NOT_FOUND));
        assert_eq!(
            code(&Method::POST, "/v1/services/%zz/backends/x/drain"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            code(&Method::POST, "/v1/services/%ff/backends/x/drain"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            code(&Method::POST, "/v1/services/%/backends/x/drain"),
            Some(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn percent_round_trip() {
        for s in ["web", "10.77.0.11:7002", "[fd00::1]:80", "a b/c%d", "ünï"] {
            assert_eq!(percent_decode(&percent_encode(s)).as_deref(), Some(s));
        }
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%é1"), None);
        assert_eq!(
            backend_uri("web", "10.0.0.1:80", "drain"),
            "/v1/services/web/backends/10.0.0.1%3A80/drain"
        );
    }

    #[test]
    fn table() {
        let t = status_table(&sample_status());
        println!("{t}");
        assert!(
            t.contains("reloads 2  config errors 1  failovers 1  flows 1234"),
            "{t}"
        );
        assert!(t.contains("hl7-listener  10.77.0.100:6661"), "{t}");
        assert!(t.contains("10.77.0.12:6661"), "{t}");
        assert!(t.contains("draining"), "{t}");
        assert!(t.contains("[fd00::13]:7002"), "{t}");
        assert!(t.contains("0.8ms"), "{t}");
        assert!(t.contains("uptime 1h02m03s"), "{t}");
        // Every backend line of a service has the same width as its header.
        let lines: Vec<&str> = t.lines().filter(|l| l.starts_with("  ")).collect();
        assert_eq!(lines.len(), 2 + 3 + 2);
    }

    #[test]
    fn bytes_and_uptime() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(3 << 30), "3.0GiB");
        assert_eq!(uptime(59), "0h00m59s");
        assert_eq!(uptime(90061), "1d01h01m");
    }

    fn temp_socket(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("balancer-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("sub").join("control.sock")
    }

    /// A daemon stand-in: answers Status with the sample, refuses one backend and one reload.
    fn fake_daemon() -> mpsc::Sender<Message> {
        let (tx, mut rx) = mpsc::channel::<Message>(8);
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let reply = match m.request {
                    Request::Status => {
                        serde_json::to_value(sample_status()).map_err(|e| e.to_string())
                    }
                    Request::Reload => {
                        Err("config refused, nothing changed:\nbalancer.toml:3:7: bad".into())
                    }
                    Request::Drain { service, backend } if service == "web" => {
                        Ok(json!({ "ok": true, "message": format!("drain: {service} {backend}") }))
                    }
                    Request::Drain { service, .. }
                    | Request::Disable { service, .. }
                    | Request::Enable { service, .. } => Err(format!("no service '{service}'")),
                };
                let _ = m.reply.send(reply);
            }
        });
        tx
    }

    async fn raw(path: &Path, request: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn wait_for(path: &Path) {
        for _ in 0..200 {
            if path.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} never appeared", path.display());
    }

    #[tokio::test]
    async fn serve_and_call() {
        let path = temp_socket("serve");
        let server = tokio::spawn({
            let path = path.clone();
            let tx = fake_daemon();
            async move { serve(&path, tx).await }
        });
        wait_for(&path).await;
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let sock_mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(sock_mode, 0o600);

        let v = call(&path, Method::GET, "/v1/status").await.unwrap();
        let st: Status = serde_json::from_value(v).unwrap();
        assert_eq!(st, sample_status());

        let v = call(
            &path,
            Method::POST,
            &backend_uri("web", "10.77.0.11:7002", "drain"),
        )
        .await
        .unwrap();
        assert_eq!(v["ok"], json!(true));
        assert_eq!(v["message"], json!("drain: web 10.77.0.11:7002"));

        let e = call(
            &path,
            Method::POST,
            &backend_uri("nope", "1.2.3.4", "drain"),
        )
        .await
        .unwrap_err();
        assert_eq!(e.to_string(), "no service 'nope'");
        let e = call(&path, Method::POST, "/v1/reload").await.unwrap_err();
        assert!(e.to_string().contains("balancer.toml:3:7"), "{e}");

        let r = raw(
            &path,
            "POST /v1/reload HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 409"), "{r}");
        let r = raw(&path, "POST /v1/services/nope/backends/x/enable HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let r = raw(
            &path,
            "GET /v2/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 404") && r.contains("{\"error\":"),
            "{r}"
        );
        let r = raw(
            &path,
            "DELETE /v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 405") && r.to_lowercase().contains("allow: get"),
            "{r}"
        );
        // Garbage is answered (or the connection closed), never a crash.
        let r = raw(&path, "\x00\x01garbage\r\n\r\n").await;
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
        // Still serving after all of that.
        call(&path, Method::GET, "/v1/status").await.unwrap();

        // A second daemon does not steal a live socket.
        let e = bind(&path).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");

        server.abort();
        let _ = server.await;
        // The socket file is left behind: the next start replaces it.
        assert!(path.exists());
        let l = bind(&path).unwrap();
        drop(l);
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn daemon_gone_is_503_and_missing_socket_is_clear() {
        let path = temp_socket("gone");
        let (tx, rx) = mpsc::channel::<Message>(1);
        drop(rx);
        let server = tokio::spawn({
            let path = path.clone();
            async move { serve(&path, tx).await }
        });
        wait_for(&path).await;
        let r = raw(
            &path,
            "GET /v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        server.abort();
        let _ = server.await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());

        let e = call(&path, Method::GET, "/v1/status").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "is balancer running? no control socket at {}",
                path.display()
            )
        );
    }
}
