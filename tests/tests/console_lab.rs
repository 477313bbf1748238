//! The web console in a lab, driven by Debian's chromium over WebDriver (chromedriver in the
//! client namespace, its HTTP API called with curl there): sign in, see the services, drain a
//! backend and watch the state change (and the CLI agree), see an enable from the CLI arrive
//! without a reload, see a failover in the events, sign out. Screenshots of every page go to
//! `$CARGO_TARGET_TMPDIR/console-screenshots/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use balancer_tests::{ECHO_PORT, HTTP_PORT, Host, Lab, LabChild, balancer_bin};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde_json::{Value, json};

const HL7_PORT: u16 = 6661;
const CONSOLE: &str = "https://10.77.0.1:9443";
const DRIVER: &str = "http://127.0.0.1:9515";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A WebDriver session, each command one curl in the client namespace.
struct Browser<'a> {
    lab: &'a Lab,
    session: String,
    shots: PathBuf,
}

/// A WebDriver call; `Err((error, message))` when the driver answers with an error.
fn try_call(
    lab: &Lab,
    method: &str,
    url: &str,
    body: Option<&Value>,
) -> Result<Value, (String, String)> {
    let mut args = vec!["curl", "-sS", "--max-time", "60", "-X", method, url];
    let text;
    if let Some(b) = body {
        text = b.to_string();
        args.extend([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &text,
        ]);
    }
    let out = lab.exec(Host::Client, &args).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{url}: {e}: {out}"));
    if let Some(err) = v["value"].get("error") {
        return Err((err.to_string(), v["value"]["message"].to_string()));
    }
    Ok(v["value"].clone())
}

fn call(lab: &Lab, method: &str, url: &str, body: Option<&Value>) -> Value {
    try_call(lab, method, url, body)
        .unwrap_or_else(|(err, message)| panic!("{method} {url}: {err}: {message}"))
}

impl<'a> Browser<'a> {
    fn open(lab: &'a Lab) -> Browser<'a> {
        let profile = lab.dir().join("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,860",
                    format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let v = call(lab, "POST", &format!("{DRIVER}/session"), Some(&caps));
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            lab,
            session: v["sessionId"].as_str().unwrap().to_string(),
            shots,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{DRIVER}/session/{}{path}", self.session)
    }

    fn go(&self, path: &str) {
        call(
            self.lab,
            "POST",
            &self.url("/url"),
            Some(&json!({ "url": format!("{CONSOLE}{path}") })),
        );
    }

    fn current(&self) -> String {
        call(self.lab, "GET", &self.url("/url"), None)
            .as_str()
            .unwrap()
            .to_string()
    }

    fn find(&self, css: &str) -> String {
        let v = call(
            self.lab,
            "POST",
            &self.url("/element"),
            Some(&json!({ "using": "css selector", "value": css })),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("{css}: {v}"))
            .to_string()
    }

    fn exists(&self, css: &str) -> bool {
        let v = call(
            self.lab,
            "POST",
            &self.url("/elements"),
            Some(&json!({ "using": "css selector", "value": css })),
        );
        !v.as_array().unwrap().is_empty()
    }

    /// Finds `css` and runs `what` on the element. The page refreshes itself (polling), so an
    /// element found a moment ago may have been replaced: then it is found again (bounded).
    fn on_element(&self, css: &str, method: &str, what: &str, body: Option<&Value>) -> Value {
        let mut last = None;
        for _ in 0..20 {
            let e = self.find(css);
            match try_call(
                self.lab,
                method,
                &self.url(&format!("/element/{e}{what}")),
                body,
            ) {
                Ok(v) => return v,
                Err((err, message)) if err.contains("stale element reference") => {
                    last = Some(message);
                    sleep(Duration::from_millis(100));
                }
                Err((err, message)) => panic!("{css}{what}: {err}: {message}"),
            }
        }
        panic!("{css}{what}: still stale after 20 tries: {last:?}")
    }

    fn click(&self, css: &str) {
        self.on_element(css, "POST", "/click", Some(&json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        self.on_element(css, "POST", "/value", Some(&json!({ "text": text })));
    }

    fn text(&self, css: &str) -> String {
        self.on_element(css, "GET", "/text", None)
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits (bounded) until `css` matches, without navigating: the page's own refresh.
    fn wait_for(&self, css: &str, limit: Duration) {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.exists(css) {
                return;
            }
            sleep(Duration::from_millis(200));
        }
        let src = call(self.lab, "GET", &self.url("/source"), None);
        eprintln!("page source: {}", src.as_str().unwrap_or_default());
        panic!(
            "{css} did not appear within {limit:?} on {}",
            self.current()
        );
    }

    fn screenshot(&self, name: &str) {
        let v = call(self.lab, "GET", &self.url("/screenshot"), None);
        let png = STANDARD.decode(v.as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = self.lab.exec(
            Host::Client,
            &[
                "curl",
                "-sS",
                "-X",
                "DELETE",
                &format!("{DRIVER}/session/{}", self.session),
            ],
        );
    }
}

fn user_add(users: &std::path::Path, name: &str, role: &str, password: &str) {
    let mut c = Command::new(balancer_bin().unwrap())
        .args(["user", "add", name, "--role", role, "--users"])
        .arg(users)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(c.stdin.take().unwrap(), "{password}").unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate for the L7 listener that expires in 20 days (the L7 page warns under 30).
fn short_lived_cert(lab: &Lab) -> (String, String) {
    let cert = lab.dir().join("portal.pem");
    let key = lab.dir().join("portal.key");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "20", "-subj", "/CN=portal.example.org"])
        .args(["-addext", "subjectAltName=DNS:portal.example.org"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert.display().to_string(), key.display().to_string())
}

fn config(lab: &Lab) -> String {
    let (cert, key) = short_lived_cert(lab);
    format!(
        r#"[dataplane]
interface = "eth0"

[controller]
socket = "{sock}"

[console]
address = "10.77.0.1:9443"
users = "{users}"
state_dir = "{state}"
sample_interval = "1s"
refresh_interval = "1s"

[[service]]
name = "web"
vip = "10.77.0.100:{ECHO_PORT}"
health = {{ kind = "http", path = "/health", port = {HTTP_PORT}, interval = "500ms", timeout = "300ms", rise = 2, fall = 2 }}
backends = [ {{ address = "10.77.0.11:{ECHO_PORT}" }}, {{ address = "10.77.0.12:{ECHO_PORT}" }} ]

[[service]]
name = "hl7-listener"
vip = "10.77.0.100:{HL7_PORT}"
scheduler = "failover"
health = {{ kind = "mllp", interval = "250ms", timeout = "200ms", rise = 2, fall = 2 }}
backends = [
  {{ address = "10.77.0.11:{HL7_PORT}", priority = 1 }},
  {{ address = "10.77.0.12:{HL7_PORT}", priority = 2 }},
]

[[l7.listener]]
name = "portal"
address = "10.77.0.100:443"
  [[l7.listener.certificate]]
  cert = "{cert}"
  key = "{key}"
  server_names = ["portal.example.org"]

[[l7.route]]
name = "portal"
host = "portal.example.org"
pool = "portal-web"

[[l7.pool]]
name = "portal-web"
health = {{ kind = "http", path = "/health", interval = "500ms", timeout = "300ms", rise = 2, fall = 2 }}
  [[l7.pool.backend]]
  address = "10.77.0.11:{HTTP_PORT}"
  [[l7.pool.backend]]
  address = "10.77.0.12:{HTTP_PORT}"
"#,
        sock = lab.dir().join("control.sock").display(),
        users = lab.dir().join("console-users").display(),
        state = lab.dir().join("console").display(),
    )
}

fn service<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()
}

fn cli_status(lab: &Lab) -> Value {
    let sock = lab.dir().join("control.sock");
    let out = lab
        .balancer_cli(&["status", "--json", "--socket", &sock.to_string_lossy()])
        .unwrap();
    serde_json::from_str(&out).unwrap()
}

#[test]
fn chromium_signs_in_drains_sees_a_failover_and_signs_out() {
    let lab = Lab::new(2).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let mut mllp: Vec<LabChild> = Vec::new();
    for (i, name) in [(1, "hl7a"), (2, "hl7b")] {
        let addr = format!("0.0.0.0:{HL7_PORT}");
        let mut c = lab
            .spawn_tool(
                Host::Backend(i),
                "blb-mllp",
                &["listen", "--name", name, "--addr", &addr],
            )
            .unwrap();
        c.wait_for_output("blb-mllp ready", Duration::from_secs(10))
            .unwrap();
        mllp.push(c);
    }
    let users = lab.dir().join("console-users");
    user_add(&users, "olivia", "operator", "operator password");
    let mut bal = lab.start_balancer(&config(&lab)).unwrap();
    bal.wait_for_log("console ready", Duration::from_secs(20))
        .unwrap();
    // Health checks settle before the pages are looked at.
    let t = Instant::now();
    while service(&cli_status(&lab), "hl7-listener")["active"] != "10.77.0.11:6661" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "hl7 never became active"
        );
        sleep(Duration::from_millis(100));
    }

    let mut driver = lab
        .spawn(Host::Client, &["chromedriver", "--port=9515"])
        .unwrap();
    driver
        .wait_for_output("was started successfully", Duration::from_secs(20))
        .unwrap();
    let b = Browser::open(&lab);

    // Not signed in: the console sends the browser to the sign-in page.
    b.go("/");
    assert!(b.current().ends_with("/login"), "{}", b.current());
    b.screenshot("login");
    b.type_into("#login-user", "olivia");
    b.type_into("#login-password", "wrong password");
    b.click("#login-submit");
    b.screenshot("login-refused");
    let err = b.text("#login-error");
    assert!(err.contains("Wrong user name or password"), "{err}");
    b.type_into("#login-user", "olivia");
    b.type_into("#login-password", "operator password");
    b.click("#login-submit");
    b.wait_for("table#services", Duration::from_secs(10));
    assert_eq!(b.text("#user"), "olivia");
    for name in ["web", "hl7-listener"] {
        assert!(
            b.exists(&format!("tr[data-service='{name}']")),
            "{name} on the overview"
        );
    }
    assert!(
        b.text("tr[data-service='hl7-listener']")
            .contains("10.77.0.11:6661"),
        "the active listener"
    );
    // Long-lived connections (what a drain leaves in place), and traffic for the charts.
    let vip: std::net::SocketAddr = format!("10.77.0.100:{ECHO_PORT}").parse().unwrap();
    let _streams: Vec<LabChild> = (0..8)
        .map(|_| lab.spawn_stream(vip, 60.0, 200).unwrap())
        .collect();
    for _ in 0..3 {
        lab.client(&[
            "conns",
            "--to",
            &format!("10.77.0.100:{ECHO_PORT}"),
            "--count",
            "20",
        ])
        .unwrap();
        sleep(Duration::from_millis(1100));
    }
    b.go("/");
    b.wait_for("tr[data-service='web'] polyline", Duration::from_secs(10));
    b.screenshot("overview");

    // Drain a backend: a confirmation that says what happens, then the state on the page and
    // in the CLI.
    // The flow-table sweep (every 5 s) has counted the streams.
    let t = Instant::now();
    loop {
        let st = cli_status(&lab);
        let flows: u64 = service(&st, "web")["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["flows"].as_u64().unwrap_or(0))
            .sum();
        if flows >= 8 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "established flows in the status: {flows}"
        );
        sleep(Duration::from_millis(250));
    }
    b.go("/service?name=web");
    b.wait_for(
        "tr[data-backend='10.77.0.11:7002'] polyline",
        Duration::from_secs(10),
    );
    b.screenshot("service");
    b.click("#drain-10-77-0-11-7002");
    let what = b.text("#what");
    assert!(
        what.contains("No new flows go to 10.77.0.11:7002"),
        "{what}"
    );
    let stay = what
        .split("its ")
        .nth(1)
        .and_then(|t| t.split(" established flow(s) stay").next())
        .unwrap_or_default();
    assert!(stay.parse::<u64>().is_ok(), "how many flows stay: {what}");
    b.screenshot("confirm-drain");
    b.click("#confirm");
    assert!(b.text("#result").contains("drain"), "{}", b.text("#result"));
    b.click("#back");
    b.wait_for(
        "tr[data-backend='10.77.0.11:7002'] td.admin.drain",
        Duration::from_secs(5),
    );
    let st = cli_status(&lab);
    let web = &service(&st, "web")["backends"][0];
    assert_eq!(
        (web["address"].as_str(), web["admin"].as_str()),
        (Some("10.77.0.11:7002"), Some("drain"))
    );
    assert_eq!(web["state"], "draining");

    // An enable from the CLI reaches the open page by its own refresh.
    let sock = lab.dir().join("control.sock");
    lab.balancer_cli(&[
        "enable",
        "web",
        "10.77.0.11:7002",
        "--socket",
        &sock.to_string_lossy(),
    ])
    .unwrap();
    b.wait_for(
        "tr[data-backend='10.77.0.11:7002'] td.admin.up",
        Duration::from_secs(10),
    );

    // Fail the active HL7 listener over; the events page shows it.
    b.go("/events");
    lab.exec(Host::Backend(1), &["ip", "link", "set", "eth0", "down"])
        .unwrap();
    b.wait_for("tr.ev.failover", Duration::from_secs(15));
    let t = Instant::now();
    while !b
        .text("#events")
        .contains("hl7-listener: active 10.77.0.11:6661 → 10.77.0.12:6661")
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{}",
            b.text("#events")
        );
        sleep(Duration::from_millis(200));
    }
    let events = b.text("#events");
    assert!(events.contains("drain web 10.77.0.11:7002"), "{events}");
    assert!(events.contains("enable web 10.77.0.11:7002"), "{events}");
    assert!(events.contains("uid 0"), "the CLI's peer uid: {events}");
    b.screenshot("events");
    b.go("/l7");
    b.wait_for("table#certs span.expiry.warn", Duration::from_secs(5));
    let certs = b.text("table#certs");
    assert!(certs.contains("portal.example.org"), "{certs}");
    assert!(certs.contains("days left"), "{certs}");
    assert!(b.text("table#routes").contains("portal-web"));
    assert!(b.exists("table#pools"));
    b.screenshot("l7");

    // A refused reload shows its errors with file:line:column; the running config serves on.
    let good = std::fs::read_to_string(bal.config_path()).unwrap();
    let bad = good.replace("scheduler = \"failover\"", "scheduler = \"roundrobin\"");
    std::fs::write(bal.config_path(), bad).unwrap();
    b.go("/");
    b.click("#reload");
    b.screenshot("confirm-reload");
    b.click("#confirm");
    let result = b.text("#result");
    let file = bal.config_path().display().to_string();
    let at = result
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{file}:")))
        .unwrap_or_else(|| panic!("no {file}:line:column in {result}"));
    let mut pos = at.splitn(3, ':');
    for what in ["line", "column"] {
        let n = pos.next().unwrap_or_default();
        assert!(n.parse::<u32>().is_ok(), "{what} in {result}");
    }
    b.screenshot("reload-refused");
    // The [console] section changes only with a restart: a reload from the CLI is refused.
    let changed = good.replace("refresh_interval = \"1s\"", "refresh_interval = \"2s\"");
    assert_ne!(changed, good);
    std::fs::write(bal.config_path(), changed).unwrap();
    let e = lab
        .balancer_cli(&["reload", "--socket", &sock.to_string_lossy()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[console] settings change only with a restart"),
        "{e}"
    );
    std::fs::write(bal.config_path(), good).unwrap();
    assert_eq!(cli_status(&lab)["config_errors"], 2);

    // Sign out: the session is gone.
    b.go("/");
    b.click("#signout");
    // The click returns once the form is submitted; the signed-out page may still be loading.
    b.wait_for("#signed-out", Duration::from_secs(10));
    b.go("/events");
    assert!(b.current().ends_with("/login"), "{}", b.current());

    let logs = bal.logs();
    for needle in [
        "who=\"olivia\"",
        "what=\"drain web 10.77.0.11:7002\"",
        "who=\"uid 0\"",
        "result=\"refused (1 problem(s))\"",
        "from=\"control socket\" what=\"reload\" result=\"refused (1 problem(s))\"",
    ] {
        assert!(logs.contains(needle), "audit {needle} missing");
    }
    assert!(
        !logs.contains("operator password"),
        "no password in the log"
    );
    drop(b);
    driver.kill();
    lab.exec(Host::Backend(1), &["ip", "link", "set", "eth0", "up"])
        .unwrap();
}

/// The daemon's resident memory, kB.
fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// 64 services, each on its own port of the VIP over the two backends.
fn many_services(lab: &Lab, console: bool) -> String {
    let mut c = format!(
        "[dataplane]\ninterface = \"eth0\"\n\n[controller]\nsocket = \"{}\"\n",
        lab.dir().join("control.sock").display()
    );
    if console {
        c.push_str(&format!(
            "\n[console]\naddress = \"10.77.0.1:9443\"\nusers = \"{}\"\nstate_dir = \"{}\"\n",
            lab.dir().join("console-users").display(),
            lab.dir().join("console").display()
        ));
    }
    for i in 0..64u16 {
        c.push_str(&format!(
            "\n[[service]]\nname = \"svc-{i:02}\"\nvip = \"10.77.0.100:{}\"\nhealth = {{ kind = \"tcp\", port = {ECHO_PORT}, interval = \"2s\", timeout = \"500ms\" }}\nbackends = [ {{ address = \"10.77.0.11:{ECHO_PORT}\" }}, {{ address = \"10.77.0.12:{ECHO_PORT}\" }} ]\n",
            8000 + i
        ));
    }
    c
}

/// Measures, does not judge: the overview's time to a full render in chromium with 64
/// services, the overview's fetch time with curl, and the daemon's memory with the console
/// off and on. The numbers are printed (`--nocapture`).
#[test]
fn sixty_four_services_render_and_the_memory_it_costs() {
    let lab = Lab::new(2).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let settle = Duration::from_secs(5);

    let mut off = lab.start_balancer(&many_services(&lab, false)).unwrap();
    off.wait_for_log("balancer ready", Duration::from_secs(30))
        .unwrap();
    sleep(settle);
    let rss_off = rss_kb(off.pid());
    off.stop().unwrap();
    lab.teardown_balancer().unwrap();

    let users = lab.dir().join("console-users");
    user_add(&users, "olivia", "viewer", "viewer password");
    let mut on = lab.start_balancer(&many_services(&lab, true)).unwrap();
    on.wait_for_log("console ready", Duration::from_secs(30))
        .unwrap();
    sleep(settle);
    let rss_on_idle = rss_kb(on.pid());

    let mut driver = lab
        .spawn(Host::Client, &["chromedriver", "--port=9515"])
        .unwrap();
    driver
        .wait_for_output("was started successfully", Duration::from_secs(20))
        .unwrap();
    let b = Browser::open(&lab);
    b.go("/login");
    b.type_into("#login-user", "olivia");
    b.type_into("#login-password", "viewer password");
    b.click("#login-submit");
    b.wait_for("tr[data-service='svc-63']", Duration::from_secs(10));
    let rss_signed_in = rss_kb(on.pid());
    let mut loads = Vec::new();
    for _ in 0..5 {
        b.go("/");
        b.wait_for("tr[data-service='svc-63']", Duration::from_secs(10));
        let v = call(
            &lab,
            "POST",
            &b.url("/execute/sync"),
            Some(
                &json!({ "script": "var n = performance.getEntriesByType('navigation')[0]; return [n.responseEnd - n.startTime, n.loadEventEnd - n.startTime, n.transferSize];", "args": [] }),
            ),
        );
        loads.push((
            v[0].as_f64().unwrap(),
            v[1].as_f64().unwrap(),
            v[2].as_f64().unwrap(),
        ));
    }
    let rows = call(
        &lab,
        "POST",
        &b.url("/execute/sync"),
        Some(
            &json!({ "script": "return document.querySelectorAll('tr[data-service]').length;", "args": [] }),
        ),
    );
    assert_eq!(rows, 64, "every service on the overview");
    b.screenshot("overview-64");
    // Pages keep refreshing while open: memory after a minute's worth of samples and pages.
    for _ in 0..10 {
        b.go("/service?name=svc-07");
        b.go("/events");
        b.go("/");
    }
    let rss_on_used = rss_kb(on.pid());
    drop(b);
    driver.kill();

    let n = loads.len() as f64;
    let avg = |f: fn(&(f64, f64, f64)) -> f64| loads.iter().map(f).sum::<f64>() / n;
    println!(
        "console with 64 services: overview HTML {:.1} ms to the last byte, {:.1} ms to the load event (CSS and JS included), {:.0} bytes; mean of {} loads in headless chromium",
        avg(|l| l.0),
        avg(|l| l.1),
        avg(|l| l.2),
        loads.len()
    );
    println!(
        "daemon RSS with 64 services: console off {rss_off} kB, on (idle) {rss_on_idle} kB, after one sign-in {rss_signed_in} kB, after 35 more page loads {rss_on_used} kB"
    );
    on.stop().unwrap();
}
