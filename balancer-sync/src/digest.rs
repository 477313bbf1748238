//! A digest of the configuration both nodes of a pair must share.

use ring::digest;

use crate::error::SyncError;

/// Top-level tables that are per node and left out of the digest: the pair's own addresses,
/// the console and the control socket / metrics address.
const PER_NODE: [&str; 3] = ["ha", "console", "controller"];

/// Keys of `[dataplane]` that may differ between two machines without changing what they
/// do with traffic (interface names, attach mode, pin directory).
const PER_NODE_DATAPLANE: [&str; 4] = ["interface", "interfaces", "xdp_mode", "pin_path"];

/// SHA-256 of the configuration with its per-node parts (`[ha]`, `[console]`,
/// `[controller]`, and `[dataplane]`'s interfaces, attach mode and pin path) removed.
///
/// The text is parsed as TOML and re-serialized with every table's keys sorted, so
/// comments, whitespace, key order and inline-vs-standard table syntax do not change the
/// digest; the order of array elements (such as `[[service]]`) does. Two nodes whose
/// heartbeats carry different digests run different services.
pub fn config_digest(toml_text: &str) -> Result<[u8; 32], SyncError> {
    let mut table: toml::Table = toml_text
        .parse()
        .map_err(|e: toml::de::Error| SyncError::Config(e.message().to_string()))?;
    for name in PER_NODE {
        table.remove(name);
    }
    if let Some(toml::Value::Table(dp)) = table.get_mut("dataplane") {
        for key in PER_NODE_DATAPLANE {
            dp.remove(key);
        }
    }
    let canonical = toml::to_string(&sorted(table))
        .map_err(|e| SyncError::Config(format!("cannot re-serialize: {e}")))?;
    let d = digest::digest(&digest::SHA256, canonical.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Ok(out)
}

/// The table with its keys, and those of every nested table, in sorted order. (`toml`'s
/// map keeps insertion order when any crate of the build enables `preserve_order`.)
fn sorted(table: toml::Table) -> toml::Table {
    let mut entries: Vec<_> = table.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
        .into_iter()
        .map(|(k, v)| (k, sorted_value(v)))
        .collect()
}

fn sorted_value(v: toml::Value) -> toml::Value {
    match v {
        toml::Value::Table(t) => toml::Value::Table(sorted(t)),
        toml::Value::Array(a) => toml::Value::Array(a.into_iter().map(sorted_value).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = r#"
# node lb1
[dataplane]
interfaces = ["eth0", "eth1"]
mode = "native"

[ha]
node = "lb1"
peer = "10.0.0.2:7946"

[console]
listen = "10.0.0.1:8443"

[[service]]
name = "web"
vip = "10.0.0.100:80"
backends = [ { addr = "10.0.0.11:80", weight = 1 }, { addr = "10.0.0.12:80", weight = 2 } ]
health = { kind = "tcp", interval = "1s" }

[[service]]
name = "hl7"
vip = "10.0.0.100:2575"
scheduler = "failover"
backends = [ { addr = "10.0.0.21:2575" } ]
"#;

    /// A's configuration as node lb2 would write it: other comments, other key and table
    /// order, other `[ha]` and `[console]`, inline tables spelled as standard ones.
    const B: &str = r#"
[ha]
peer = "10.0.0.1:7946"
node = "lb2"

[[service]]
vip = "10.0.0.100:80"
name = "web"   # the web farm
backends = [ { weight = 1, addr = "10.0.0.11:80" }, { addr = "10.0.0.12:80", weight = 2 } ]

[service.health]
interval = "1s"
kind = "tcp"

[[service]]
backends = [ { addr = "10.0.0.21:2575" } ]
name = "hl7"
scheduler = "failover"
vip = "10.0.0.100:2575"

[dataplane]
mode = "native"
interfaces = ["eth0", "eth1"]
"#;

    #[test]
    fn same_config_other_node_same_digest() {
        let a = config_digest(A).unwrap();
        assert_eq!(a, config_digest(B).unwrap());
        let no_node_tables: String = A
            .split("[[service]]")
            .enumerate()
            .map(|(i, part)| {
                if i == 0 {
                    "[dataplane]\ninterfaces = [\"eth0\", \"eth1\"]\nmode = \"native\"\n"
                        .to_string()
                } else {
                    format!("[[service]]{part}")
                }
            })
            .collect();
        assert_eq!(a, config_digest(&no_node_tables).unwrap());
    }

    #[test]
    fn per_node_sockets_interfaces_and_pins_do_not_count() {
        let a = config_digest(A).unwrap();
        let other = A
            .replace(
                "interfaces = [\"eth0\", \"eth1\"]",
                "interfaces = [\"ens3\"]\npin_path = \"/sys/fs/bpf/lb2\"\nxdp_mode = \"skb\"",
            )
            .replace(
                "[ha]",
                "[controller]\nsocket = \"/run/lb2/control.sock\"\nmetrics = \"10.0.0.2:9550\"\n\n[ha]",
            );
        assert_eq!(a, config_digest(&other).unwrap());
        // What the dataplane does with traffic counts.
        let snat = A.replace(
            "mode = \"native\"",
            "mode = \"native\"\nsnat_ipv4 = \"10.0.0.200\"",
        );
        assert_ne!(a, config_digest(&snat).unwrap());
    }

    #[test]
    fn changed_backend_changes_digest() {
        let a = config_digest(A).unwrap();
        let changed = A.replace("10.0.0.12:80", "10.0.0.13:80");
        assert_ne!(a, config_digest(&changed).unwrap());
        let weight = A.replace("weight = 2", "weight = 3");
        assert_ne!(a, config_digest(&weight).unwrap());
        let failback = A.replace(
            "scheduler = \"failover\"",
            "scheduler = \"failover\"\nfailback = true",
        );
        assert_ne!(a, config_digest(&failback).unwrap());
    }

    #[test]
    fn invalid_toml_is_an_error() {
        let e = config_digest("[dataplane\nx = 1").unwrap_err();
        assert!(matches!(e, SyncError::Config(_)), "{e:?}");
    }
}
