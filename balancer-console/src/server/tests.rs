//! The console over real HTTPS on loopback, with a real HTTP client and a fake controller.

use std::sync::Arc;
use std::sync::Mutex as StdMutex;

use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::*;
use crate::source::{
    AdminState, BackendView, DataplaneState, Health, ServiceView, StatusSnapshot, Traffic,
};

#[derive(Default)]
struct Fake {
    status: StdMutex<StatusSnapshot>,
    acts: StdMutex<Vec<Action>>,
    refuse_reload: bool,
}

impl ConsoleSource for Arc<Fake> {
    async fn status(&self) -> Result<StatusSnapshot, SourceError> {
        Ok(self.status.lock().unwrap().clone())
    }
    async fn act(&self, a: &Action) -> Result<String, SourceError> {
        self.acts.lock().unwrap().push(a.clone());
        if *a == Action::Reload && self.refuse_reload {
            return Err(SourceError::Refused(
                "/etc/balancer/balancer.toml:12:9: unknown field `wieght`".into(),
            ));
        }
        if let Some((svc, addr)) = a.target() {
            let mut s = self.status.lock().unwrap();
            let b = s
                .services
                .iter_mut()
                .find(|v| v.name == svc)
                .and_then(|v| v.backends.iter_mut().find(|b| b.address == addr))
                .ok_or_else(|| SourceError::Refused("no such backend".into()))?;
            b.admin = match a {
                Action::Drain { .. } => AdminState::Drain,
                Action::Disable { .. } => AdminState::Disabled,
                _ => AdminState::Up,
            };
        }
        Ok(format!("{a}: done"))
    }
}

fn snapshot() -> StatusSnapshot {
    let b = |a: &str, active| BackendView {
        flows: 7,
        address: a.parse().unwrap(),
        weight: 1,
        priority: 0,
        admin: AdminState::Up,
        health: Health::Up,
        state: DataplaneState::Up,
        active,
        check_latency_ms: Some(0.4),
        traffic: Traffic::default(),
    };
    StatusSnapshot {
        config: "/etc/balancer/balancer.toml".into(),
        services: vec![ServiceView {
            name: "hl7-<adt>".into(),
            vip: "10.0.0.1:2575".parse().unwrap(),
            protocol: "tcp".into(),
            forwarding: "nat".into(),
            scheduler: "failover".into(),
            health_check: Some("mllp".into()),
            active: Some("10.0.0.11:2575".parse().unwrap()),
            traffic: Traffic::default(),
            backends: vec![b("10.0.0.11:2575", true), b("10.0.0.12:2575", false)],
        }],
        ..StatusSnapshot::default()
    }
}

struct Lab {
    running: Option<Running>,
    fake: Arc<Fake>,
    connector: TlsConnector,
    addr: SocketAddr,
    users: PathBuf,
    events: Arc<EventLog>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, h: &str) -> &str {
        self.headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    /// The CSRF token of the first form.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .expect("a csrf field")
            + 19;
        self.body[at..at + 64].to_string()
    }
}

async fn lab(name: &str, refuse_reload: bool, max_failures: u32) -> Lab {
    let dir = std::env::temp_dir().join(format!("console-srv-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let users = dir.join("users");
    let mut u = Users::default();
    u.add("olivia", Role::Operator, "operator password")
        .unwrap();
    u.add("victor", Role::Viewer, "viewer password!").unwrap();
    u.save(&users).unwrap();
    let mut cfg = ConsoleConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.users = users.clone();
    cfg.state_dir = dir.clone();
    cfg.max_failures = max_failures;
    cfg.sample_interval = Duration::from_millis(200);
    let fake = Arc::new(Fake {
        status: StdMutex::new(snapshot()),
        refuse_reload,
        ..Fake::default()
    });
    let events = Arc::new(EventLog::default());
    let running = start(cfg, fake.clone(), events.clone()).await.unwrap();
    let (cert, _) = tls::self_signed_paths(&dir);
    let mut roots = RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cc = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Lab {
        addr: running.local_addr,
        running: Some(running),
        fake,
        connector: TlsConnector::from(Arc::new(cc)),
        users,
        events,
    }
}

impl Lab {
    async fn req(
        &self,
        method: Method,
        path: &str,
        cookie: Option<&str>,
        form: &[(&str, &str)],
    ) -> Reply {
        self.req_with(method, path, cookie, form, &[]).await
    }

    async fn req_with(
        &self,
        method: Method,
        path: &str,
        cookie: Option<&str>,
        form: &[(&str, &str)],
        extra: &[(&str, &str)],
    ) -> Reply {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let tls = self
            .connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut send, conn) = http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, format!("localhost:{}", self.addr.port()))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, format!("{COOKIE}={c}"));
        }
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        let resp = send
            .send_request(b.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    async fn sign_in(&self, user: &str, password: &str) -> Reply {
        self.req(
            Method::POST,
            "/login",
            None,
            &[("user", user), ("password", password)],
        )
        .await
    }

    async fn session(&self, user: &str, password: &str) -> String {
        let r = self.sign_in(user, password).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        let c = r.header("set-cookie");
        c.split(';')
            .next()
            .unwrap()
            .split_once('=')
            .unwrap()
            .1
            .to_string()
    }
}

#[tokio::test]
async fn no_access_without_a_session() {
    let lab = lab("nosession", false, 5).await;
    for path in [
        "/",
        "/service?name=hl7-%3Cadt%3E",
        "/l7",
        "/events",
        "/confirm?verb=reload",
    ] {
        let r = lab.req(Method::GET, path, None, &[]).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.header("location"), "/login", "{path}");
        assert!(!r.body.contains("10.0.0.11"), "{path}");
    }
    let r = lab.req(Method::GET, "/", Some(&"0".repeat(64)), &[]).await;
    assert_eq!(
        r.status,
        StatusCode::SEE_OTHER,
        "a made-up cookie is no session"
    );
    let r = lab
        .req(
            Method::POST,
            "/action",
            None,
            &[("verb", "reload"), ("csrf", "x")],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(lab.fake.acts.lock().unwrap().is_empty());
    let r = lab.req(Method::GET, "/static/console.js", None, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("content-type").starts_with("text/javascript"));
}

#[tokio::test]
async fn security_headers_and_no_inline_script() {
    let lab = lab("headers", false, 5).await;
    let cookie = lab.session("victor", "viewer password!").await;
    for path in [
        "/login",
        "/",
        "/service?name=hl7-%3Cadt%3E",
        "/l7",
        "/events",
        "/nowhere",
    ] {
        let r = lab.req(Method::GET, path, Some(&cookie), &[]).await;
        let csp = r.header("content-security-policy");
        assert_eq!(csp, CSP, "{path}");
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
        assert!(!csp.contains("unsafe-inline"));
        assert_eq!(r.header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(r.header("x-frame-options"), "DENY", "{path}");
        assert_eq!(r.header("referrer-policy"), "same-origin", "{path}");
        assert!(
            r.header("strict-transport-security")
                .starts_with("max-age="),
            "{path}"
        );
        assert_eq!(r.header("cache-control"), "no-store", "{path}");
        // Every script element loads a file; none has a body.
        for (i, _) in r.body.match_indices("<script") {
            assert!(
                r.body[i..].starts_with("<script src=\"/static/console.js\" defer></script>"),
                "{path}"
            );
        }
        assert!(!r.body.contains(" style=\""), "{path}: no inline style");
    }
    let r = lab.req(Method::GET, "/", Some(&cookie), &[]).await;
    assert!(r.body.contains("hl7-&lt;adt&gt;"), "names are escaped");
    assert!(!r.body.contains("hl7-<adt>"));
}

#[tokio::test]
async fn sign_in_sets_a_strict_cookie_and_sign_out_ends_it() {
    let lab = lab("cookie", false, 5).await;
    let r = lab.sign_in("olivia", "operator password").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.header("location"), "/");
    let c = r.header("set-cookie");
    assert!(c.starts_with(&format!("{COOKIE}=")), "{c}");
    for flag in [
        "; Secure",
        "; HttpOnly",
        "; SameSite=Strict",
        "; Path=/",
        "; Max-Age=28800",
    ] {
        assert!(c.contains(flag), "{c} lacks {flag}");
    }
    let cookie = c
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string();
    let page = lab.req(Method::GET, "/", Some(&cookie), &[]).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("10.0.0.11:2575"));
    let r = lab
        .req(Method::POST, "/logout", Some(&cookie), &[("csrf", "wrong")])
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "sign-out needs the token too"
    );
    let r = lab
        .req(
            Method::POST,
            "/logout",
            Some(&cookie),
            &[("csrf", &page.csrf())],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.header("set-cookie").contains("Max-Age=0"));
    let r = lab.req(Method::GET, "/", Some(&cookie), &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "the session is gone");
    let ev = lab.events.recent(10, |e| e.kind == EventKind::SignIn);
    assert_eq!(
        ev.iter().map(|e| e.what.as_str()).collect::<Vec<_>>(),
        ["sign out", "sign in"]
    );
    assert_eq!(ev[1].who, "olivia");
    assert_eq!(ev[1].from, "console 127.0.0.1");
}

#[tokio::test]
async fn a_viewer_cannot_act() {
    let lab = lab("viewer", false, 5).await;
    let cookie = lab.session("victor", "viewer password!").await;
    let page = lab
        .req(
            Method::GET,
            "/service?name=hl7-%3Cadt%3E",
            Some(&cookie),
            &[],
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        !page.body.contains("/confirm?"),
        "no action links for a viewer"
    );
    let csrf = page.csrf();
    let r = lab
        .req(
            Method::GET,
            "/confirm?verb=drain&service=hl7-%3Cadt%3E&backend=10.0.0.11:2575",
            Some(&cookie),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = lab
        .req(
            Method::POST,
            "/action",
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("verb", "drain"),
                ("service", "hl7-<adt>"),
                ("backend", "10.0.0.11:2575"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        lab.fake.acts.lock().unwrap().is_empty(),
        "nothing reached the controller"
    );
}

#[tokio::test]
async fn actions_need_the_csrf_token_and_are_audited() {
    let lab = lab("csrf", false, 5).await;
    let cookie = lab.session("olivia", "operator password").await;
    let confirm = lab
        .req(
            Method::GET,
            "/confirm?verb=drain&service=hl7-%3Cadt%3E&backend=10.0.0.11:2575",
            Some(&cookie),
            &[],
        )
        .await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(
        confirm.body.contains("No new flows go to 10.0.0.11:2575"),
        "{}",
        confirm.body
    );
    assert!(
        confirm.body.contains("its 7 established flow(s) stay"),
        "{}",
        confirm.body
    );
    let csrf = confirm.csrf();
    let drain = [
        ("verb", "drain"),
        ("service", "hl7-<adt>"),
        ("backend", "10.0.0.11:2575"),
    ];
    for bad in [None, Some("0".repeat(64)), Some(csrf[..63].to_string())] {
        let mut f = drain.to_vec();
        if let Some(b) = &bad {
            f.push(("csrf", b));
        }
        let r = lab.req(Method::POST, "/action", Some(&cookie), &f).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{bad:?}");
    }
    let mut f = drain.to_vec();
    f.push(("csrf", &csrf));
    let r = lab
        .req_with(
            Method::POST,
            "/action",
            Some(&cookie),
            &f,
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "a foreign Origin is refused"
    );
    assert!(lab.fake.acts.lock().unwrap().is_empty());
    let origin = format!("https://localhost:{}", lab.addr.port());
    let r = lab
        .req_with(
            Method::POST,
            "/action",
            Some(&cookie),
            &f,
            &[("origin", &origin)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        *lab.fake.acts.lock().unwrap(),
        [Action::Drain {
            service: "hl7-<adt>".into(),
            backend: "10.0.0.11:2575".parse().unwrap()
        }]
    );
    let page = lab
        .req(
            Method::GET,
            "/service?name=hl7-%3Cadt%3E",
            Some(&cookie),
            &[],
        )
        .await;
    assert!(page.body.contains("<td class=\"admin drain\">drain</td>"));
    let ev = lab
        .req(Method::GET, "/events?kind=action", Some(&cookie), &[])
        .await;
    assert!(
        ev.body.contains("drain hl7-&lt;adt&gt; 10.0.0.11:2575"),
        "{}",
        ev.body
    );
    assert!(
        ev.body
            .contains("<td>olivia</td><td>console 127.0.0.1</td>")
    );
}

#[tokio::test]
async fn a_refused_reload_shows_the_positions() {
    let lab = lab("reload", true, 5).await;
    let cookie = lab.session("olivia", "operator password").await;
    let confirm = lab
        .req(Method::GET, "/confirm?verb=reload", Some(&cookie), &[])
        .await;
    assert!(confirm.body.contains("the running config keeps serving"));
    let r = lab
        .req(
            Method::POST,
            "/action",
            Some(&cookie),
            &[("verb", "reload"), ("csrf", &confirm.csrf())],
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(
        r.body
            .contains("/etc/balancer/balancer.toml:12:9: unknown field `wieght`"),
        "{}",
        r.body
    );
    let ev = lab.events.recent(1, |e| e.kind == EventKind::Reload);
    assert_eq!(ev[0].result, "refused (1 problem(s))");
}

#[tokio::test]
async fn wrong_passwords_lock_out() {
    let lab = lab("lockout", false, 3).await;
    for _ in 0..3 {
        let r = lab.sign_in("olivia", "not the password").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(r.header("set-cookie").is_empty());
    }
    let r = lab.sign_in("olivia", "operator password").await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "locked even with the right password"
    );
    assert!(r.header("set-cookie").is_empty());
    let r = lab.sign_in("nobody", "whatever it is").await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the address is locked too"
    );
    let results: Vec<_> = lab
        .events
        .recent(10, |e| e.kind == EventKind::SignIn)
        .into_iter()
        .map(|e| e.result)
        .collect();
    assert_eq!(
        results,
        [
            "locked out",
            "locked out",
            "failed, now locked out",
            "failed",
            "failed"
        ]
    );
}

#[tokio::test]
async fn removing_a_user_ends_its_sessions() {
    let lab = lab("remove", false, 5).await;
    let cookie = lab.session("victor", "viewer password!").await;
    assert_eq!(
        lab.req(Method::GET, "/", Some(&cookie), &[]).await.status,
        StatusCode::OK
    );
    let mut u = Users::load(&lab.users).unwrap();
    u.remove("victor").unwrap();
    // The file's mtime must move for the change to be seen; coarse filesystems need a nudge.
    std::thread::sleep(Duration::from_millis(20));
    u.save(&lab.users).unwrap();
    let r = lab.req(Method::GET, "/", Some(&cookie), &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn fragments_and_failover_events() {
    let lab = lab("live", false, 5).await;
    let cookie = lab.session("victor", "viewer password!").await;
    let r = lab
        .req_with(
            Method::GET,
            "/",
            Some(&cookie),
            &[],
            &[("x-console-fragment", "1")],
        )
        .await;
    assert!(
        !r.body.contains("<html"),
        "a fragment is the main section only"
    );
    assert!(r.body.contains("id=\"services\""));
    // Fail over in the fake and wait for the sampler to see it.
    {
        let mut s = lab.fake.status.lock().unwrap();
        let svc = &mut s.services[0];
        svc.active = Some("10.0.0.12:2575".parse().unwrap());
        svc.backends[0].health = Health::Down;
    }
    let mut seen = false;
    for _ in 0..50 {
        let r = lab
            .req(Method::GET, "/events?kind=failover", Some(&cookie), &[])
            .await;
        if r.body.contains("active 10.0.0.11:2575 → 10.0.0.12:2575") {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "the failover is on the events page");
    let r = lab
        .req(
            Method::GET,
            "/service?name=hl7-%3Cadt%3E",
            Some(&cookie),
            &[],
        )
        .await;
    assert!(r.body.contains("10.0.0.11:2575: up → down"), "{}", r.body);
}
