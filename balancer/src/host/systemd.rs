//! systemd notifications (`Type=notify`): READY, RELOADING, STOPPING, STATUS and the watchdog.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd). Failures
//! to notify are logged, never fatal: the balancer keeps forwarding either way.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, info, warn};

fn send(what: &str, states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(false, states) {
        Ok(()) => debug!(what, "sd_notify sent"),
        Err(e) => warn!(what, error = %e, "sd_notify failed"),
    }
}

/// `READY=1`: start-up (or a reload) is complete.
pub fn ready() {
    send("ready", &[NotifyState::Ready]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` (CLOCK_MONOTONIC in µs), as `Type=notify-reload`
/// requires; follow with [`ready`] when the reload is done.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("reloading", &[NotifyState::Reloading, now]),
        Err(e) => {
            warn!(error = %e, "CLOCK_MONOTONIC unreadable; RELOADING=1 without MONOTONIC_USEC");
            send("reloading", &[NotifyState::Reloading]);
        }
    }
}

/// `STOPPING=1`: shutting down.
pub fn stopping() {
    send("stopping", &[NotifyState::Stopping]);
}

/// `STATUS=...`: a one-line status shown by `systemctl status` (never put payload bytes here).
pub fn status(text: &str) {
    // A newline would start a new assignment in the datagram.
    let line = text.replace('\n', " ");
    send("status", &[NotifyState::Status(&line)]);
}

/// `WATCHDOG=1`: the service is alive.
pub fn watchdog() {
    send("watchdog", &[NotifyState::Watchdog]);
}

/// The watchdog period systemd asked of this process: `WATCHDOG_USEC`, if `WATCHDOG_PID`
/// is unset or names this process.
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok()? != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Starts a tokio task that sends `WATCHDOG=1` every half period, if systemd enabled the
/// watchdog for this process (and `NOTIFY_SOCKET` is set); otherwise does nothing. Must be
/// called inside a tokio runtime. The task pings from the runtime, so a wedged runtime stops
/// the pings and systemd restarts the service.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let period = watchdog_period()?;
    let every = (period / 2).max(Duration::from_millis(1));
    info!(period = ?period, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            watchdog();
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::net::UnixDatagram,
        path::PathBuf,
        sync::{Mutex, MutexGuard},
    };

    use super::*;

    /// Tests that change the environment run one at a time.
    static ENV: Mutex<()> = Mutex::new(());

    struct Env {
        _guard: MutexGuard<'static, ()>,
        dir: PathBuf,
        sock: UnixDatagram,
    }

    impl Env {
        fn new(name: &str) -> Env {
            let guard = ENV.lock().unwrap_or_else(|p| p.into_inner());
            let dir =
                std::env::temp_dir().join(format!("balancer-sd-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("notify.sock");
            let sock = UnixDatagram::bind(&path).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            // SAFETY: tests that touch the environment hold the ENV lock; nothing else in the
            // crate's tests reads these variables.
            unsafe {
                std::env::set_var("NOTIFY_SOCKET", &path);
                std::env::remove_var("WATCHDOG_USEC");
                std::env::remove_var("WATCHDOG_PID");
            }
            Env {
                _guard: guard,
                dir,
                sock,
            }
        }

        fn recv(&self) -> String {
            let mut buf = [0u8; 4096];
            let n = self.sock.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
    }

    impl Drop for Env {
        fn drop(&mut self) {
            // SAFETY: as in `new`, under the ENV lock (the guard drops after this).
            unsafe {
                std::env::remove_var("NOTIFY_SOCKET");
                std::env::remove_var("WATCHDOG_USEC");
                std::env::remove_var("WATCHDOG_PID");
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn monotonic_usec() -> i128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid out-pointer to a timespec.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
            0
        );
        i128::from(ts.tv_sec) * 1_000_000 + i128::from(ts.tv_nsec) / 1000
    }

    #[test]
    fn notifications() {
        let env = Env::new("notify");
        ready();
        assert_eq!(env.recv(), "READY=1\n");

        let before = monotonic_usec();
        reloading();
        let after = monotonic_usec();
        let msg = env.recv();
        let mut lines = msg.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec: i128 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            before <= usec && usec <= after,
            "{before} <= {usec} <= {after}"
        );

        status("serving 2 services\nsecond line");
        assert_eq!(env.recv(), "STATUS=serving 2 services second line\n");
        watchdog();
        assert_eq!(env.recv(), "WATCHDOG=1\n");
        stopping();
        assert_eq!(env.recv(), "STOPPING=1\n");
    }

    #[test]
    fn no_socket_is_a_no_op() {
        let env = Env::new("none");
        // SAFETY: under the ENV lock.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        ready();
        stopping();
        env.sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert!(env.sock.recv(&mut buf).is_err());
    }

    #[test]
    fn watchdog_period_rules() {
        let _env = Env::new("period");
        assert_eq!(watchdog_period(), None);
        // SAFETY: under the ENV lock.
        unsafe { std::env::set_var("WATCHDOG_USEC", "30000000") };
        assert_eq!(watchdog_period(), Some(Duration::from_secs(30)));
        // SAFETY: under the ENV lock.
        unsafe { std::env::set_var("WATCHDOG_PID", std::process::id().to_string()) };
        assert_eq!(watchdog_period(), Some(Duration::from_secs(30)));
        // SAFETY: under the ENV lock.
        unsafe { std::env::set_var("WATCHDOG_PID", "1") };
        assert_eq!(watchdog_period(), None);
        // SAFETY: under the ENV lock.
        unsafe { std::env::set_var("WATCHDOG_PID", std::process::id().to_string()) };
        unsafe { std::env::set_var("WATCHDOG_USEC", "0") };
        assert_eq!(watchdog_period(), None);
    }

    #[test]
    fn watchdog_task_pings_every_half_period() {
        let env = Env::new("watchdog");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // No WATCHDOG_USEC: no task.
        assert!(rt.block_on(async { spawn_watchdog() }).is_none());
        // SAFETY: under the ENV lock.
        unsafe {
            std::env::set_var("WATCHDOG_USEC", "100000");
            std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        }
        // A paused clock: time jumps from timer to timer, so no wall-clock time is measured.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let task = rt.block_on(async { spawn_watchdog() }).unwrap();
        // First ping at once, then every 50 ms: 120 ms of the paused clock hold the pings at
        // 0, 50 and 100 ms, and no other.
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(120)).await });
        env.sock.set_nonblocking(true).unwrap();
        let mut pings = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = env.sock.recv(&mut buf) {
            pings.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        assert_eq!(pings, ["WATCHDOG=1\n"; 3]);
        task.abort();
        drop(rt);
    }
}
