//! One proxied request: route, pick a backend (next one on connect failure), rewrite
//! headers, forward, and log the exchange: route and status, the path only for routes that
//! opt in, never the query string, a body or another header.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;

use crate::config::ForwardedFor;
use crate::metrics::RouteCounters;
use crate::pool::{Body, BoxError, InFlight, Pool, Sender};
use crate::route::normalize_host;
use crate::server::Shared;

/// Headers that apply to one hop only (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn full(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Removes hop-by-hop headers, including those named in `Connection`; keeps `Upgrade` if asked.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        if keep_upgrade && *n == header::UPGRADE {
            continue;
        }
        h.remove(n);
    }
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
}

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Largest excess body read and discarded before a 413.
const DRAIN_CAP: u64 = 1024 * 1024;

/// Reads a request body to its end (at most [`DRAIN_CAP`] bytes past the limit, bounded in time).
async fn drain(mut body: Incoming, within: Duration) {
    let _ = tokio::time::timeout(within, async {
        let mut n = 0u64;
        while let Some(Ok(f)) = body.frame().await {
            n += f.data_ref().map_or(0, |d| d.len() as u64);
            if n > 2 * DRAIN_CAP {
                break;
            }
        }
    })
    .await;
}

/// Size of the request head as received (close enough for HTTP/2, where it is decoded).
fn head_size(req: &Request<Incoming>) -> usize {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    line + req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
}

/// What the access log line and metrics say about one exchange; written when the
/// response body ends or is dropped.
struct Exchange {
    method: Method,
    host: String,
    /// The request path, kept only when the route has `log_path = true`.
    path: Option<String>,
    route: String,
    status: u16,
    backend: Option<SocketAddr>,
    start: Instant,
    counters: Option<Arc<RouteCounters>>,
    _in_flight: Option<InFlight>,
    _conn_requests: ConnRequest,
}

impl Exchange {
    fn finish(self, bytes: u64) {
        let elapsed = self.start.elapsed();
        if let Some(c) = &self.counters {
            c.record(self.status, elapsed);
        }
        let backend = self
            .backend
            .map_or_else(|| "-".to_string(), |b| b.to_string());
        // Never the query string, body, cookies or other headers, and the path only where the
        // route allows it: all of them can identify a patient.
        tracing::info!(
            target: "access",
            method = %self.method,
            host = %self.host,
            path = %self.path.as_deref().unwrap_or("-"),
            route = %self.route,
            status = self.status,
            bytes,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            backend = %backend,
        );
    }
}

/// Counts a connection's requests in flight, for its idle timer.
pub(crate) struct ConnRequest(Arc<AtomicUsize>);

impl ConnRequest {
    pub(crate) fn new(c: &Arc<AtomicUsize>) -> ConnRequest {
        c.fetch_add(1, Relaxed);
        ConnRequest(c.clone())
    }
}

impl Drop for ConnRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

type OnEnd = Box<dyn FnOnce() + Send>;

/// A response body that counts bytes, returns the backend connection to the pool at its
/// end, and writes the access log when done.
struct TrackedBody {
    inner: Body,
    bytes: u64,
    on_end: Option<OnEnd>,
    exchange: Option<Exchange>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.on_end.take() {
                    f();
                }
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream()
            && let Some(f) = self.on_end.take()
        {
            f();
        }
        if let Some(e) = self.exchange.take() {
            e.finish(self.bytes);
        }
    }
}

fn tracked(resp: Response<Body>, on_end: Option<OnEnd>, exchange: Exchange) -> Response<Body> {
    resp.map(|inner| {
        TrackedBody {
            inner,
            bytes: 0,
            on_end,
            exchange: Some(exchange),
        }
        .boxed_unsync()
    })
}

/// Serves one request from a TLS listener.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    listener: Arc<str>,
    client: SocketAddr,
    conn_requests: Arc<AtomicUsize>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let start = Instant::now();
    let raw_host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let host = normalize_host(&raw_host);
    let mut ex = Exchange {
        method: req.method().clone(),
        host: host.clone(),
        path: None,
        route: "-".into(),
        status: 0,
        backend: None,
        start,
        counters: None,
        _in_flight: None,
        _conn_requests: ConnRequest::new(&conn_requests),
    };
    let snap = shared.snapshot.load_full();
    let Some(lcfg) = snap.listeners.get(&*listener) else {
        return Ok(local(
            ex,
            StatusCode::SERVICE_UNAVAILABLE,
            "listener removed\n",
        ));
    };
    // Refusals before routing count under the unrouted ("", "") pair.
    if head_size(&req) > lcfg.max_header_bytes {
        ex.counters = Some(shared.registry.route("", ""));
        return Ok(local(
            ex,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header fields too large\n",
        ));
    }
    let limit = lcfg.max_body_bytes;
    let forwarded_for = lcfg.x_forwarded_for;
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > limit
    {
        ex.counters = Some(shared.registry.route("", ""));
        // Read (and discard) a moderate excess first, so the client that is still sending
        // gets the 413 instead of a reset.
        if len <= limit.saturating_add(DRAIN_CAP) {
            drain(req.into_body(), Duration::from_secs(2)).await;
        }
        return Ok(local(
            ex,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload too large\n",
        ));
    }
    let Some(route) = snap.find(&listener, &host, req.uri().path()) else {
        ex.counters = Some(shared.registry.route("", ""));
        return Ok(local(ex, StatusCode::NOT_FOUND, "no route\n"));
    };
    ex.route = route.name.clone();
    ex.counters = Some(route.counters.clone());
    if route.log_path {
        ex.path = Some(req.uri().path().to_string());
    }
    let pool = route.pool.clone();
    let upgrade = wants_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let sticky = pool.sticky_key(req.headers(), client);

    // Backend request: headers rewritten, body streamed (bounded if configured).
    let (mut parts, body) = req.into_parts();
    // `TE: trailers` is the one TE value that survives a hop (gRPC needs it).
    let te_trailers = parts
        .headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if te_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    set_forwarded_for(&mut parts.headers, forwarded_for, client);
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("https"));
    if let Ok(v) = HeaderValue::from_str(&raw_host) {
        parts.headers.insert("x-forwarded-host", v);
    }
    let body: Body =
        Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).boxed_unsync();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let breq = Request::from_parts(parts, body);

    // Pick a backend; a failed connect moves on to the next (no byte was sent), and so does
    // a pooled connection found closed when the request was handed to it.
    let mut tried = Vec::new();
    let mut stale = 0;
    let mut pending = Some(breq);
    let (backend, resp, h1_tx) = loop {
        let Some(idx) = pool.select(&tried, sticky.as_ref()) else {
            let (status, text) = if tried.is_empty() {
                (StatusCode::SERVICE_UNAVAILABLE, "no healthy backend\n")
            } else {
                (StatusCode::BAD_GATEWAY, "no backend reachable\n")
            };
            return Ok(local(ex, status, text));
        };
        let b = pool.backends[idx].clone();
        let sender = match pool.checkout(&b, upgrade, stale > 0).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pool = %pool.name, backend = %b.addr, error = %e, "backend connect failed, trying another");
                b.connect_failed(pool.cfg.fail_cooldown);
                tried.push(idx);
                continue;
            }
        };
        let Some(mut breq) = pending.take() else {
            return Ok(local(ex, StatusCode::BAD_GATEWAY, "bad gateway\n"));
        };
        ex.backend = Some(b.addr);
        ex._in_flight = Some(InFlight::new(b.clone()));
        if prepare_target(
            &mut breq,
            &sender,
            &pool,
            b.addr,
            &raw_host,
            &path_and_query,
        )
        .is_err()
        {
            return Ok(local(ex, StatusCode::BAD_REQUEST, "bad request target\n"));
        }
        match send(sender, breq, pool.cfg.response_timeout).await {
            Ok((resp, tx)) => break (b, resp, tx),
            Err(SendError::Stale(r)) if stale < 3 => {
                stale += 1;
                pending = Some(*r);
            }
            Err(SendError::Stale(_)) => {
                return Ok(local(ex, StatusCode::BAD_GATEWAY, "bad gateway\n"));
            }
            Err(SendError::Timeout) => {
                tracing::warn!(pool = %pool.name, backend = %b.addr, "backend response timed out");
                return Ok(local(
                    ex,
                    StatusCode::GATEWAY_TIMEOUT,
                    "backend timed out\n",
                ));
            }
            Err(SendError::Failed(e)) if body_too_large(&*e) => {
                return Ok(local(
                    ex,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload too large\n",
                ));
            }
            Err(SendError::Failed(e)) => {
                tracing::warn!(pool = %pool.name, backend = %b.addr, error = %e, "backend request failed");
                return Ok(local(ex, StatusCode::BAD_GATEWAY, "bad gateway\n"));
            }
        }
    };
    let mut resp = resp;
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let h1_tx = if upgrade { None } else { h1_tx };
    if switching && let Some(client_upgrade) = client_upgrade {
        splice(client_upgrade, hyper::upgrade::on(&mut resp));
    }
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers, switching);
    if switching {
        rparts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if pool.cfg.sticky == crate::config::Sticky::Cookie
        && !matches!(&sticky, Some(crate::pool::StickyKey::Cookie(v)) if *v == backend.sticky_id)
        && let Ok(v) = HeaderValue::from_str(&format!(
            "{}={}; Path=/; Secure; HttpOnly; SameSite=Lax",
            pool.cfg.sticky_cookie, backend.sticky_id
        ))
    {
        rparts.headers.append(header::SET_COOKIE, v);
    }
    ex.status = rparts.status.as_u16();
    let on_end: Option<OnEnd> = h1_tx.map(|tx| {
        let b = backend.clone();
        let (max_idle, max_age) = (pool.cfg.max_idle_per_backend, pool.cfg.idle_timeout);
        Box::new(move || b.checkin(tx, max_idle, max_age)) as OnEnd
    });
    let resp = Response::from_parts(rparts, rbody.map_err(BoxError::from).boxed_unsync());
    Ok(tracked(resp, on_end, ex))
}

/// `X-Forwarded-For` to the backend. `Append`: every earlier line is kept, in order, then
/// the client's address. `Replace`: the client's address alone, and the client's own
/// `Forwarded` and `X-Real-IP` are dropped (a backend must not trust a chain it cannot check).
fn set_forwarded_for(h: &mut HeaderMap, mode: ForwardedFor, client: SocketAddr) {
    let ip = client.ip().to_string();
    let xff = match mode {
        ForwardedFor::Append => {
            let mut v: Vec<&str> = h
                .get_all(X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            v.push(&ip);
            v.join(", ")
        }
        ForwardedFor::Replace => {
            h.remove(header::FORWARDED);
            h.remove(X_REAL_IP);
            ip
        }
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(X_FORWARDED_FOR, v);
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Whether a failed exchange was cut by the request body limit (a body without
/// `Content-Length`, or one longer than announced).
fn body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A locally generated response (error, redirect), logged like any other.
fn local(mut ex: Exchange, status: StatusCode, text: &'static str) -> Response<Body> {
    ex.status = status.as_u16();
    tracked(full(status, text), None, ex)
}

enum SendError {
    /// The connection was closed before the request was written; it can go elsewhere.
    Stale(Box<Request<Body>>),
    Timeout,
    Failed(BoxError),
}

type Sent = (
    Response<Incoming>,
    Option<hyper::client::conn::http1::SendRequest<Body>>,
);

/// Sets version and target for the backend: origin-form and `Host` for HTTP/1.1,
/// absolute form (`:authority`) for h2.
fn prepare_target(
    breq: &mut Request<Body>,
    sender: &Sender,
    pool: &Pool,
    addr: SocketAddr,
    raw_host: &str,
    path_and_query: &str,
) -> Result<(), http::Error> {
    if matches!(sender, Sender::H2(_)) {
        *breq.version_mut() = Version::HTTP_2;
        let scheme = if pool.cfg.scheme == crate::config::Scheme::Https {
            "https"
        } else {
            "http"
        };
        let authority = if raw_host.is_empty() {
            addr.to_string()
        } else {
            raw_host.to_string()
        };
        breq.headers_mut().remove(header::HOST);
        *breq.uri_mut() = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path_and_query)
            .build()?;
    } else {
        *breq.version_mut() = Version::HTTP_11;
        if !breq.headers().contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(raw_host)
        {
            breq.headers_mut().insert(header::HOST, v);
        }
        *breq.uri_mut() = path_and_query.parse::<Uri>()?;
    }
    Ok(())
}

/// Sends the request, bounded by the response timeout.
async fn send(sender: Sender, req: Request<Body>, timeout: Duration) -> Result<Sent, SendError> {
    let fut = async {
        match sender {
            Sender::H2(mut tx) => {
                if tx.ready().await.is_err() {
                    return Err(SendError::Stale(Box::new(req)));
                }
                match tx.try_send_request(req).await {
                    Ok(r) => Ok((r, None)),
                    Err(mut e) => match e.take_message() {
                        Some(req) => Err(SendError::Stale(Box::new(req))),
                        None => Err(SendError::Failed(e.into_error().into())),
                    },
                }
            }
            Sender::H1 { mut tx, reused } => match tx.try_send_request(req).await {
                Ok(r) => Ok((r, Some(tx))),
                Err(mut e) => match (reused, e.take_message()) {
                    (true, Some(req)) => Err(SendError::Stale(Box::new(req))),
                    _ => Err(SendError::Failed(e.into_error().into())),
                },
            },
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| SendError::Timeout)?
}

/// Splices an upgraded client connection (e.g. WebSocket) to the backend's.
pub(crate) fn splice(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (c, b) = match tokio::try_join!(client, backend) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut b).await {
            tracing::debug!(error = %e, "upgraded connection ended");
        }
    });
}

/// Serves one request on a redirect listener: `Location: https://host[:port]/path?query`.
pub(crate) async fn redirect(
    shared: Arc<Shared>,
    https_port: u16,
    status: StatusCode,
    conn_requests: Arc<AtomicUsize>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let raw_host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let host = normalize_host(raw_host);
    let mut ex = Exchange {
        method: req.method().clone(),
        host: host.clone(),
        path: None,
        route: "redirect".into(),
        status: 0,
        backend: None,
        start: Instant::now(),
        counters: None,
        _in_flight: None,
        _conn_requests: ConnRequest::new(&conn_requests),
    };
    if host.is_empty() {
        return Ok(local(ex, StatusCode::BAD_REQUEST, "missing Host\n"));
    }
    shared.registry.redirects.fetch_add(1, Relaxed);
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{pq}");
    ex.status = status.as_u16();
    let mut resp = full(status, "moved to https\n");
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            Ok(tracked(resp, None, ex))
        }
        Err(_) => Ok(local(ex, StatusCode::BAD_REQUEST, "bad host\n")),
    }
}
