//! The host around the balancer: interface addresses, VIPs and sysctls, and systemd.

pub mod net;
pub mod systemd;
