//! The host around the balancer: interface addresses, VIPs and sysctls, systemd, and BIRD
//! (the VIP announcements of `[bgp]`).

pub mod bird;
pub mod keepalived;
pub mod net;
pub mod systemd;

/// Writes `bytes` to `path` atomically (a temporary file renamed over it), mode 0600.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    std::fs::rename(&tmp, path)
}
