//! The control API's server: HTTP/1.1 with JSON bodies on a root-only unix socket.

use std::{
    convert::Infallible,
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::Path,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request as HttpRequest, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::{net::UnixListener, sync::mpsc};
use tracing::{debug, info, warn};

use crate::api::Error;
use crate::api::client::percent_decode;
use crate::api::protocol::{AskError, Message, Request, ask};
use crate::control::operator::{BgpVerb, Verb};

/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole connection (keep-alive included) is closed after this time.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);

/// Serves the control API on a unix socket until the listener fails.
///
/// Creates the parent directory (mode 0700) if missing, replaces a stale socket, binds, and
/// restricts the socket to its owner (mode 0600, owner root when running as root). Every
/// connection's peer credentials are checked as well: only uid 0 is served, anyone else
/// gets 403.
pub async fn serve(path: &Path, tx: mpsc::Sender<Message>) -> crate::api::Result<()> {
    serve_on(bind(path)?, tx).await
}

/// Serves the control API on a socket bound before with [`bind`]: the daemon binds before it
/// reports ready, so a `balancer status` right after `balancer ready` (or systemd's
/// `READY=1`) finds the socket.
pub async fn serve_on(listener: UnixListener, tx: mpsc::Sender<Message>) -> crate::api::Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // Out of descriptors and the like: wait a little instead of spinning.
            Err(e) if is_transient(&e) => {
                warn!(error = %e, "control socket accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(Error::Accept(e)),
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
pub fn bind(path: &Path) -> crate::api::Result<UnixListener> {
    let owned = || path.to_path_buf();
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A socket someone still answers on is another daemon's: do not steal it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::InUse { path: owned() });
            }
            std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
                path: owned(),
                source,
            })?;
        }
        Ok(_) => return Err(Error::NotASocket { path: owned() }),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Inspect {
                path: owned(),
                source,
            });
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
        path: owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        Error::Chmod {
            path: owned(),
            source,
        }
    })?;
    // Created by root it is root's already: chown only otherwise (the unit's syscall filter
    // and capability set leave no chown to a root daemon that does not need one).
    let meta = std::fs::metadata(path).map_err(|source| Error::Inspect {
        path: owned(),
        source,
    })?;
    if nix::unistd::geteuid().is_root() && (meta.uid() != 0 || meta.gid() != 0) {
        std::os::unix::fs::chown(path, Some(0), Some(0)).map_err(|source| Error::Chown {
            path: owned(),
            source,
        })?;
    }
    info!(socket = %path.display(), "control socket listening");
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
    // Every operator verb is audited with the peer's uid (root: checked above).
    let audited = crate::api::audit::describe(&request);
    let answer = ask(tx, request).await;
    if let Some((kind, what)) = audited {
        let result = match &answer {
            Ok(r) if kind == balancer_console::EventKind::Reload => {
                crate::api::audit::reload_result(r)
            }
            Ok(Ok(_)) => "ok".to_string(),
            Ok(Err(_)) => "refused".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        let who = uid.map_or_else(|| "uid ?".to_string(), |u| format!("uid {u}"));
        crate::api::audit::record(kind, &who, "control socket", &what, &result);
    }
    match answer {
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

/// Maps method and path to a daemon request, or to the 404 / 405 / 400 response.
pub(crate) fn route(method: &Method, path: &str) -> Result<Request, Box<Response<Full<Bytes>>>> {
    let segs: Vec<&str> = path.split('/').collect();
    let (allowed, request) = match segs.as_slice() {
        ["", "v1", "status"] => (Method::GET, Request::Status),
        ["", "v1", "reload"] => (Method::POST, Request::Reload),
        ["", "v1", "ha", "role", role] => match crate::control::ha::Role::parse(role) {
            Some(role) => (Method::POST, Request::HaRole { role }),
            None => return Err(Box::new(error(StatusCode::NOT_FOUND, "no such route"))),
        },
        ["", "v1", "bgp", op] => match BgpVerb::parse(op) {
            Some(verb) => (Method::POST, Request::Bgp { verb }),
            None => return Err(Box::new(error(StatusCode::NOT_FOUND, "no such route"))),
        },
        ["", "v1", "services", service, "backends", backend, op] => {
            let (Some(service), Some(backend)) = (percent_decode(service), percent_decode(backend))
            else {
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "bad percent-encoding in the path",
                )));
            };
            let Some(verb) = Verb::parse(op) else {
                return Err(Box::new(error(StatusCode::NOT_FOUND, "no such route")));
            };
            (
                Method::POST,
                Request::Backend {
                    verb,
                    service,
                    backend,
                },
            )
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
