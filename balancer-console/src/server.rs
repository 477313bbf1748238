//! The HTTPS server: TLS accept, sign-in, sessions, CSRF, roles, security headers, routing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::auth::{self, COOKIE, Refusal, Session, Sessions, Throttle};
use crate::config::ConsoleConfig;
use crate::events::{EventKind, EventLog, audit};
use crate::history::History;
use crate::pages;
use crate::source::{Action, ConsoleSource, SourceError};
use crate::tls::{self, TlsError};
use crate::users::{self, Role, UserError, Users};

/// The console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Bad `[console]` settings.
    #[error("console: {0}")]
    Config(String),
    /// Certificate trouble.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The users file is unusable.
    #[error(transparent)]
    Users(#[from] UserError),
    /// The address could not be bound.
    #[error("console: bind {addr}: {err}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        err: std::io::Error,
    },
}

/// Content-Security-Policy of every response: no inline script, nothing from elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const MAX_BODY: usize = 16 * 1024;
const MAX_CONNECTIONS: usize = 256;
const CONSOLE_JS: &str = include_str!("../static/console.js");
const CONSOLE_CSS: &str = include_str!("../static/console.css");

/// The users file, re-read when it changes on disk (`balancer user ...` takes effect at once).
struct UsersFile {
    path: PathBuf,
    stamp: Option<SystemTime>,
    users: Users,
}

impl UsersFile {
    fn current(&mut self) -> &Users {
        let stamp = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if stamp != self.stamp {
            match Users::load(&self.path) {
                Ok(u) => self.users = u,
                Err(e) => {
                    // An unreadable or too-open file signs everybody out rather than trusting it.
                    tracing::warn!(error = %e, "console: users file refused");
                    self.users = Users::default();
                }
            }
            self.stamp = stamp;
        }
        &self.users
    }
}

/// Password verifications at once.
const VERIFICATIONS: usize = 2;

/// State shared by every connection.
pub(crate) struct Shared<S> {
    pub(crate) cfg: ConsoleConfig,
    pub(crate) source: S,
    pub(crate) events: Arc<EventLog>,
    pub(crate) history: Mutex<History>,
    sessions: Mutex<Sessions>,
    throttle: Mutex<Throttle>,
    users: Mutex<UsersFile>,
    /// Verified against for unknown users, so that their sign-in takes as long as a known one's.
    dummy_hash: String,
    /// Password verifications running at once (each takes Argon2's 19 MiB and a core for a
    /// few tens of milliseconds): a burst of sign-ins from many addresses queues here.
    verifying: tokio::sync::Semaphore,
    epoch: Instant,
}

impl<S> Shared<S> {
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A running console.
pub struct Running {
    /// Where it listens.
    pub local_addr: SocketAddr,
    /// SHA-256 fingerprint of its certificate.
    pub fingerprint: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting and sampling.
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Binds the management address, then serves the console and samples the status in the
/// background. `events` is the log the daemon also feeds (reloads, CLI actions).
pub async fn start<S: ConsoleSource>(
    cfg: ConsoleConfig,
    source: S,
    events: Arc<EventLog>,
) -> Result<Running, ConsoleError> {
    cfg.validate()
        .map_err(|e| ConsoleError::Config(e.join("; ")))?;
    let (tls_cfg, fingerprint) = tls::server_config(&cfg)?;
    let users = Users::load(&cfg.users)?;
    if users.is_empty() {
        tracing::warn!(users = %cfg.users.display(), "console: no users yet (balancer user add)");
    }
    let dummy_hash = tokio::task::spawn_blocking(|| {
        users::hash_password(&auth::random_token().unwrap_or_default())
    })
    .await
    .map_err(|e| ConsoleError::Config(e.to_string()))??;
    let listener = TcpListener::bind(cfg.address)
        .await
        .map_err(|err| ConsoleError::Bind {
            addr: cfg.address,
            err,
        })?;
    let local_addr = listener.local_addr().map_err(|err| ConsoleError::Bind {
        addr: cfg.address,
        err,
    })?;
    tracing::info!(address = %local_addr, fingerprint = %fingerprint, "console: serving HTTPS");
    let shared = Arc::new(Shared {
        history: Mutex::new(History::new(Duration::from_secs(3600), cfg.sample_interval)),
        sessions: Mutex::new(Sessions::default()),
        throttle: Mutex::new(Throttle::new(
            cfg.max_failures,
            cfg.lockout,
            cfg.sign_in_rate,
        )),
        users: Mutex::new(UsersFile {
            path: cfg.users.clone(),
            stamp: std::fs::metadata(&cfg.users)
                .and_then(|m| m.modified())
                .ok(),
            users,
        }),
        cfg,
        source,
        events,
        dummy_hash,
        verifying: tokio::sync::Semaphore::new(VERIFICATIONS),
        epoch: Instant::now(),
    });
    let sampler = tokio::spawn(sample_loop(shared.clone()));
    let acceptor = TlsAcceptor::from(tls_cfg);
    let server = tokio::spawn(accept_loop(shared, listener, acceptor));
    Ok(Running {
        local_addr,
        fingerprint,
        tasks: vec![sampler, server],
    })
}

async fn sample_loop<S: ConsoleSource>(shared: Arc<Shared<S>>) {
    let mut tick = tokio::time::interval(shared.cfg.sample_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match shared.source.status().await {
            Ok(s) => {
                let at = shared.now_ms();
                let log = (!shared.source.records_changes()).then_some(&*shared.events);
                lock(&shared.history).record(at, &s, log);
            }
            Err(e) => tracing::debug!(error = %e, "console: status sample failed"),
        }
    }
}

/// The sample rings, for the pages.
pub(crate) fn history_of<S>(shared: &Shared<S>) -> std::sync::MutexGuard<'_, History> {
    lock(&shared.history)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn accept_loop<S: ConsoleSource>(
    shared: Arc<Shared<S>>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "console: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Beyond the limit new connections are closed instead of queued.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (shared, acceptor) = (shared.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    _ => return,
                };
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&shared, peer, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(tls), svc);
            let _ = tokio::time::timeout(Duration::from_secs(300), conn).await;
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn with_headers(mut r: Resp) -> Resp {
    let h = r.headers_mut();
    let set = |h: &mut http::HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "same-origin");
    set(h, header::STRICT_TRANSPORT_SECURITY, "max-age=31536000");
    set(h, header::CACHE_CONTROL, "no-store");
    r
}

fn response(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn html(status: StatusCode, body: String) -> Resp {
    response(status, "text/html; charset=utf-8", body)
}

fn redirect(to: &str) -> Resp {
    let mut r = response(StatusCode::SEE_OTHER, "text/plain", "");
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn session_cookie(token: &str, ttl: Duration) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        ttl.as_secs()
    ))
    .ok()
}

fn cookie_token(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

async fn form(req: Request<Incoming>) -> Option<HashMap<String, String>> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .ok()?;
    Some(
        form_urlencoded::parse(&body.to_bytes())
            .into_owned()
            .collect(),
    )
}

/// A POST whose Origin (when the browser sends one) is not this console is refused.
fn same_origin(req: &Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    match (origin.to_str().ok(), host) {
        (Some(o), Some(h)) => o == format!("https://{h}"),
        _ => false,
    }
}

/// The request's session, if the cookie is live and its user still has that role.
fn session_of<S>(shared: &Shared<S>, req: &Request<Incoming>) -> Option<(String, Session)> {
    let token = cookie_token(req)?;
    let s = lock(&shared.sessions).get(&token, Instant::now())?;
    let still = lock(&shared.users)
        .current()
        .get(&s.user)
        .is_some_and(|u| u.role == s.role);
    if !still {
        lock(&shared.sessions).close_user(&s.user);
        return None;
    }
    Some((token, s))
}

pub(crate) async fn handle<S: ConsoleSource>(
    shared: &Arc<Shared<S>>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Resp {
    with_headers(route(shared, peer, req).await)
}

async fn route<S: ConsoleSource>(
    shared: &Arc<Shared<S>>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match (&method, path.as_str()) {
        (&Method::GET, "/static/console.js") => {
            return response(StatusCode::OK, "text/javascript; charset=utf-8", CONSOLE_JS);
        }
        (&Method::GET, "/static/console.css") => {
            return response(StatusCode::OK, "text/css; charset=utf-8", CONSOLE_CSS);
        }
        (&Method::GET, "/login") => {
            return html(
                StatusCode::OK,
                pages::login(query(&req).contains_key("out"), None),
            );
        }
        (&Method::POST, "/login") => return sign_in(shared, peer.ip(), req).await,
        _ => {}
    }
    let Some((token, session)) = session_of(shared, &req) else {
        return match method {
            Method::GET => redirect("/login"),
            _ => html(
                StatusCode::FORBIDDEN,
                pages::message(None, "Signed out", "Sign in first."),
            ),
        };
    };
    let fragment = req.headers().contains_key("x-console-fragment");
    let page = |body: Result<String, SourceError>| match body {
        Ok(b) => html(StatusCode::OK, b),
        Err(e) => html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::message(Some(&session), "Controller unavailable", &e.to_string()),
        ),
    };
    match (&method, path.as_str()) {
        (&Method::GET, "/") => {
            let s = shared.source.status().await;
            page(s.map(|s| pages::overview(shared, &session, &s, fragment)))
        }
        (&Method::GET, "/service") => {
            let name = query(&req).remove("name").unwrap_or_default();
            match shared.source.status().await {
                Ok(s) => match s.service(&name) {
                    Some(svc) => html(
                        StatusCode::OK,
                        pages::service(shared, &session, &s, svc, fragment),
                    ),
                    None => html(
                        StatusCode::NOT_FOUND,
                        pages::message(Some(&session), "No such service", &name),
                    ),
                },
                Err(e) => page(Err(e)),
            }
        }
        (&Method::GET, "/l7") => {
            let s = shared.source.status().await;
            page(s.map(|s| pages::l7(&session, &s, fragment)))
        }
        (&Method::GET, "/events") => {
            let kind = query(&req).remove("kind");
            html(
                StatusCode::OK,
                pages::events(shared, &session, kind.as_deref(), fragment),
            )
        }
        (&Method::GET, "/confirm") => {
            if session.role != Role::Operator {
                return forbidden(&session);
            }
            let q = query(&req);
            let Some(action) = Action::parse(
                q.get("verb").map_or("", String::as_str),
                q.get("service").map(String::as_str),
                q.get("backend").map(String::as_str),
            ) else {
                return html(
                    StatusCode::BAD_REQUEST,
                    pages::message(Some(&session), "Unknown action", "Nothing was done."),
                );
            };
            let s = shared.source.status().await;
            page(s.map(|s| pages::confirm(shared, &session, &s, &action)))
        }
        (&Method::POST, "/action") => act(shared, peer.ip(), session, req).await,
        (&Method::POST, "/logout") => {
            if !same_origin(&req) {
                return forbidden(&session);
            }
            let f = form(req).await.unwrap_or_default();
            if !f
                .get("csrf")
                .is_some_and(|c| auth::same_secret(c, &session.csrf))
            {
                return csrf_refused(&session);
            }
            lock(&shared.sessions).close(&token);
            shared.events.push(
                EventKind::SignIn,
                &session.user,
                &format!("console {}", peer.ip()),
                "sign out",
                "ok",
            );
            let mut r = redirect("/login?out=1");
            if let Ok(v) = HeaderValue::from_str(&format!(
                "{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"
            )) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        _ => html(
            StatusCode::NOT_FOUND,
            pages::message(Some(&session), "Not found", "No such page."),
        ),
    }
}

fn forbidden(session: &Session) -> Resp {
    html(
        StatusCode::FORBIDDEN,
        pages::message(
            Some(session),
            "Not allowed",
            "Your role is viewer: actions need the operator role.",
        ),
    )
}

fn csrf_refused(session: &Session) -> Resp {
    html(
        StatusCode::FORBIDDEN,
        pages::message(
            Some(session),
            "Refused",
            "The form was stale or not from this console (CSRF token). Nothing was done.",
        ),
    )
}

async fn sign_in<S: ConsoleSource>(
    shared: &Arc<Shared<S>>,
    ip: IpAddr,
    req: Request<Incoming>,
) -> Resp {
    if !same_origin(&req) {
        return html(StatusCode::FORBIDDEN, pages::login(false, Some("Refused.")));
    }
    let Some(f) = form(req).await else {
        return html(
            StatusCode::BAD_REQUEST,
            pages::login(false, Some("Bad form.")),
        );
    };
    let user = f.get("user").map_or("", |u| u.trim()).to_string();
    let password = f.get("password").cloned().unwrap_or_default();
    let from = format!("console {ip}");
    // The name is logged only when it is a well-formed name (a password typed into the name
    // field would not be).
    let shown = if user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        user.clone()
    } else {
        "(malformed name)".to_string()
    };
    let refused = lock(&shared.throttle).before(&user, ip, Instant::now());
    if let Err(r) = refused {
        let (result, msg) = match r {
            Refusal::RateLimited => ("rate limited", "Too many attempts: wait a minute."),
            Refusal::LockedOut => (
                "locked out",
                "Locked out after too many failures: try later.",
            ),
        };
        audit(
            Some(&shared.events),
            EventKind::SignIn,
            &shown,
            &from,
            "sign in",
            result,
        );
        return html(
            StatusCode::TOO_MANY_REQUESTS,
            pages::login(false, Some(msg)),
        );
    }
    let found = lock(&shared.users).current().get(&user).cloned();
    let hash = found
        .as_ref()
        .map_or_else(|| shared.dummy_hash.clone(), |u| u.hash.clone());
    let permit = shared.verifying.acquire().await;
    let ok = permit.is_ok()
        && tokio::task::spawn_blocking(move || users::verify_password(&password, &hash))
            .await
            .unwrap_or(false)
        && found.is_some();
    drop(permit);
    let locked = lock(&shared.throttle).after(&user, ip, ok, Instant::now());
    let Some(u) = found.filter(|_| ok) else {
        let result = if locked {
            "failed, now locked out"
        } else {
            "failed"
        };
        audit(
            Some(&shared.events),
            EventKind::SignIn,
            &shown,
            &from,
            "sign in",
            result,
        );
        return html(
            StatusCode::UNAUTHORIZED,
            pages::login(false, Some("Wrong user name or password.")),
        );
    };
    let token = lock(&shared.sessions).open(&user, u.role, shared.cfg.session_ttl, Instant::now());
    let Some(token) = token else {
        return html(
            StatusCode::INTERNAL_SERVER_ERROR,
            pages::login(false, Some("No randomness.")),
        );
    };
    audit(
        Some(&shared.events),
        EventKind::SignIn,
        &user,
        &from,
        "sign in",
        "ok",
    );
    let mut r = redirect("/");
    if let Some(c) = session_cookie(&token, shared.cfg.session_ttl) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

async fn act<S: ConsoleSource>(
    shared: &Arc<Shared<S>>,
    ip: IpAddr,
    session: Session,
    req: Request<Incoming>,
) -> Resp {
    if session.role != Role::Operator {
        return forbidden(&session);
    }
    if !same_origin(&req) {
        return csrf_refused(&session);
    }
    let Some(f) = form(req).await else {
        return html(
            StatusCode::BAD_REQUEST,
            pages::message(Some(&session), "Bad form", ""),
        );
    };
    if !f
        .get("csrf")
        .is_some_and(|c| auth::same_secret(c, &session.csrf))
    {
        return csrf_refused(&session);
    }
    let Some(action) = Action::parse(
        f.get("verb").map_or("", String::as_str),
        f.get("service").map(String::as_str),
        f.get("backend").map(String::as_str),
    ) else {
        return html(
            StatusCode::BAD_REQUEST,
            pages::message(Some(&session), "Unknown action", "Nothing was done."),
        );
    };
    let result = shared.source.act(&action).await;
    let kind = if action == Action::Reload {
        EventKind::Reload
    } else {
        EventKind::Action
    };
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(SourceError::Refused(m)) => crate::events::refused(m),
        Err(e) => format!("failed: {e}"),
    };
    audit(
        Some(&shared.events),
        kind,
        &session.user,
        &format!("console {ip}"),
        &action.to_string(),
        &outcome,
    );
    let status = if result.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    html(status, pages::done(&session, &action, &result))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
