//! The local stack's service processes, supervised like an init system: a process that exits
//! after it served is restarted with backoff (1 s doubling to 30 s; back to 1 s once it has
//! stayed up a minute), and the reason is said at once (its exit status and the last lines of
//! its log); the others keep running. A process that exits before it ever served cannot start
//! (a port taken, a bad setting): that is reported at once, with the same reason, and is not
//! retried.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use tonic_health::pb::health_check_response::ServingStatus;

use crate::stack::{self, ManagedProcess, ServiceSpec};

/// Lines of a log shown with a process that exited.
const TAIL_LINES: usize = 6;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Up this long, a process's next crash is restarted after the first backoff again.
const STABLE: Duration = Duration::from_secs(60);

/// Why a process did not come up.
#[derive(Debug, thiserror::Error)]
pub enum NotServing {
    /// It exited: it cannot start.
    #[error("{0}")]
    Exited(String),
    /// It runs, but did not report SERVING in time.
    #[error("{0}")]
    Late(String),
}

/// One supervised service process.
pub struct Supervised {
    /// Its name in the stack's table and messages (`db-sync`, `node-1`).
    pub name: String,
    pub spec: ServiceSpec,
    pub addr: SocketAddr,
    env: Vec<(&'static str, String)>,
    pub log: PathBuf,
    /// The running process; `None` while a restart is due.
    pub process: Option<ManagedProcess>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
    /// How many times it was restarted.
    pub restarts: u32,
}

/// What became of a process that stopped: its exit status and the last lines of its log.
pub fn why_exited(status: ExitStatus, log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    let mut shown: Vec<&str> = Vec::new();
    // The error that ended it, also when background tasks logged more lines after it while
    // the process wound down (a migration finishing, a health probe).
    let is_error = |l: &&str| l.contains("\"level\":\"ERROR\"") || l.contains(" ERROR ");
    if let Some(error) = lines[..start].iter().rposition(is_error)
        && !lines[start..].iter().any(is_error)
    {
        shown.push(lines[error]);
        shown.push("...");
    }
    shown.extend(&lines[start..]);
    format!(
        "{status}; the last lines of {}:\n    {}",
        log.display(),
        shown.join("\n    ")
    )
}

impl Supervised {
    /// Starts the service `spec` as `name` on 127.0.0.1:`port`.
    pub fn start(
        name: &str,
        spec: ServiceSpec,
        port: u16,
        env: Vec<(&'static str, String)>,
        log: PathBuf,
    ) -> anyhow::Result<Supervised> {
        let process = stack::spawn_service(&spec, port, &env, &log)?;
        Ok(Supervised {
            name: name.to_owned(),
            spec,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            env,
            log,
            process: Some(process),
            started: Instant::now(),
            backoff: FIRST_BACKOFF,
            restart_at: None,
            restarts: 0,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, ManagedProcess::pid)
    }

    /// Waits until the process reports SERVING, for at most `timeout`; fails at once, with why,
    /// when it exits meanwhile (it cannot start).
    pub async fn wait_serving(&mut self, timeout: Duration) -> Result<(), NotServing> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.as_mut().and_then(|p| p.try_exit_status()) {
                return Err(NotServing::Exited(format!(
                    "{} could not start: it exited {}",
                    self.name,
                    why_exited(status, &self.log)
                )));
            }
            if stack::health_status(self.addr, self.spec.grpc_name).await
                == Some(ServingStatus::Serving)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NotServing::Late(format!(
                    "{} at {} did not report SERVING within {timeout:?}; see {}",
                    self.name,
                    self.addr,
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Looks after the process once: when it exited, returns what to say and schedules its
    /// restart; when a restart is due, restarts it (and says so).
    pub fn tend(&mut self) -> Option<String> {
        if let Some(process) = self.process.as_mut()
            && let Some(status) = process.try_exit_status()
        {
            if self.started.elapsed() >= STABLE {
                self.backoff = FIRST_BACKOFF;
            }
            let delay = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            self.restart_at = Some(Instant::now() + delay);
            self.process = None;
            return Some(format!(
                "{} exited {}\n  restarting it in {}",
                self.name,
                why_exited(status, &self.log),
                humantime::format_duration(delay)
            ));
        }
        let due = self.restart_at.is_some_and(|at| Instant::now() >= at);
        if !due {
            return None;
        }
        self.restart_at = None;
        self.started = Instant::now();
        match stack::spawn_service(&self.spec, self.addr.port(), &self.env, &self.log) {
            Ok(process) => {
                self.restarts += 1;
                let pid = process.pid();
                self.process = Some(process);
                Some(format!(
                    "{} restarted (pid {pid}, restart {})",
                    self.name, self.restarts
                ))
            }
            Err(err) => {
                let delay = self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                self.restart_at = Some(Instant::now() + delay);
                Some(format!(
                    "{} could not be restarted: {err}; trying again in {}",
                    self.name,
                    humantime::format_duration(delay)
                ))
            }
        }
    }

    /// Stops the process (SIGTERM, then SIGKILL after `grace`).
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.restart_at = None;
        self.process.as_mut().and_then(|p| p.stop(grace))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_names_the_status_and_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("x.log");
        let lines: Vec<String> = (0..20).map(|i| format!("line {i}")).collect();
        std::fs::write(&log, lines.join("\n")).expect("write");
        let status = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .status()
            .expect("sh");
        let why = why_exited(status, &log);
        assert!(why.contains("exit status: 3"), "{why}");
        assert!(why.contains("line 19") && why.contains("line 14"), "{why}");
        assert!(!why.contains("line 13"), "{why}");
    }

    #[test]
    fn the_error_that_ended_it_is_shown_when_later_lines_push_it_out_of_the_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("x.log");
        let mut lines = vec![r#"{"level":"INFO","fields":{"message":"starting"}}"#.to_owned()];
        lines.push(
            r#"{"level":"ERROR","fields":{"error":"cannot listen on 127.0.0.1:1: Address already in use"}}"#
                .into(),
        );
        lines.extend(
            (0..8).map(|i| format!(r#"{{"level":"INFO","fields":{{"message":"late {i}"}}}}"#)),
        );
        std::fs::write(&log, lines.join("\n")).expect("write");
        let status = std::process::Command::new("sh")
            .args(["-c", "exit 1"])
            .status()
            .expect("sh");
        let why = why_exited(status, &log);
        assert!(why.contains("Address already in use"), "{why}");
        assert!(why.contains("late 7") && !why.contains("late 1\""), "{why}");
        assert!(!why.contains("starting"), "{why}");
    }
}
