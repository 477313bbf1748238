//! The example configuration parses and validates; bad values are all reported.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use balancer_l7::L7Config;

#[derive(serde::Deserialize)]
struct File {
    l7: L7Config,
}

#[test]
fn example_config_is_valid() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/l7.toml")).unwrap();
    let f: File = toml::from_str(&text).unwrap();
    f.l7.validate().unwrap();
    assert_eq!(f.l7.listeners[0].certificates.len(), 2);
    assert_eq!(f.l7.pools.len(), 3);
    let h = f.l7.pools[0].health.as_ref().unwrap();
    assert_eq!(h.kind.name(), "http");
    assert_eq!(h.interval, std::time::Duration::from_secs(2));
}

#[test]
fn unknown_keys_are_refused() {
    let e = toml::from_str::<File>("[l7]\ncert_watch = \"1s\"\n")
        .err()
        .unwrap();
    assert!(e.to_string().contains("unknown field `cert_watch`"), "{e}");
}

#[test]
fn every_problem_is_reported() {
    let f: File = toml::from_str(
        r#"
        [[l7.listener]]
        name = "web"
        address = "127.0.0.1:443"
        alpn = ["spdy"]
        certificate = []
        [[l7.listener]]
        name = "web"
        address = "127.0.0.1:443"
        [[l7.listener.certificate]]
        cert = "a"
        key = "b"
        server_names = ["bad name"]
        [[l7.redirect]]
        address = "127.0.0.1:80"
        status = 200
        [[l7.pool]]
        name = "p"
        scheme = "https"
        backend = []
        [[l7.route]]
        name = "r"
        path_prefix = "x"
        pool = "nope"
        listeners = ["other"]
        "#,
    )
    .unwrap();
    let errs = f.l7.validate().unwrap_err();
    let all = errs.join("\n");
    for want in [
        "duplicate listener name",
        "used twice",
        "needs at least one [[certificate]]",
        "alpn \"spdy\" unsupported",
        "server name \"bad name\"",
        "status must be",
        "needs at least one [[backend]]",
        "needs ca",
        "pool \"nope\" is not defined",
        "listener \"other\" is not defined",
        "path_prefix must start with '/'",
    ] {
        assert!(all.contains(want), "missing {want:?} in:\n{all}");
    }
}
