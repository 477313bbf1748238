//! Child processes of a lab: output captured in the background, killed when dropped.

use std::io::Read;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A pipe drained by a thread into a shared buffer, so the child never blocks on a full pipe
/// and the test can read what it printed so far.
#[derive(Debug)]
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    fn new(pipe: Option<impl Read + Send + 'static>) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let thread = pipe.map(|mut pipe| {
            let buf = Arc::clone(&buf);
            thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut b) = buf.lock() {
                        b.extend_from_slice(&chunk[..n]);
                    }
                }
            })
        });
        Self { buf, thread }
    }

    fn text(&self) -> String {
        self.buf
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits for the reader to see end-of-file (after the child exited), bounded.
    fn finish(&mut self, deadline: Instant) {
        if let Some(t) = self.thread.take() {
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// What a finished child printed, and how it ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

/// A process running inside a lab namespace. Its stdout and stderr are captured in memory;
/// dropping the handle kills it (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct LabChild {
    child: Child,
    what: String,
    stdout: Capture,
    stderr: Capture,
    exited: Option<ExitStatus>,
}

impl LabChild {
    pub(crate) fn new(mut child: Child, what: String) -> Self {
        let stdout = Capture::new(child.stdout.take());
        let stderr = Capture::new(child.stderr.take());
        Self {
            child,
            what,
            stdout,
            stderr,
            exited: None,
        }
    }

    /// The process id (the program itself: `nsenter` execs it).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// A short description (the command line), for error messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) unless the process already exited.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.id()).context("pid out of range")?;
        // SAFETY: kill(2) has no memory effects; the pid is our own unreaped child.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` until `needle` appears in stdout or stderr. Fails early, with the
    /// output, if the process exits first.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_status() {
                // One more look: the output may have arrived after the last check.
                self.stdout
                    .finish(Instant::now() + Duration::from_millis(500));
                self.stderr
                    .finish(Instant::now() + Duration::from_millis(500));
                if self.stdout().contains(needle) || self.stderr().contains(needle) {
                    return Ok(());
                }
                bail!(
                    "{} exited ({status}) before printing {needle:?}\nstdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.stdout(),
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.stdout(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to exit and returns its output. On timeout the
    /// process is killed and an error is returned.
    pub fn wait_output(mut self, timeout: Duration) -> Result<Finished> {
        let Some(status) = self.wait_timeout(timeout) else {
            self.kill();
            bail!(
                "{} still running after {timeout:?}; killed\nstdout:\n{}\nstderr:\n{}",
                self.what,
                self.stdout(),
                self.stderr()
            );
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        self.stdout.finish(deadline);
        self.stderr.finish(deadline);
        Ok(Finished {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        })
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for LabChild {
    fn drop(&mut self) {
        self.kill();
    }
}
