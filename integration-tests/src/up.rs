//! `merklectl up` as the tests start it: on a block of free ports, its data in a temporary
//! folder, nothing of the caller's environment picked up.

use std::{
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{binary, free_port};

/// A base port with the `count` ports from it free (the five services and any fleet nodes),
/// and their metrics ports (each + 1000), searched from `from` (tests that run at once search
/// different ranges). Blocks are kept out of the kernel's ephemeral range: there, a connection
/// any test opens meanwhile may be given one of the ports before `merklectl up` binds it.
pub fn free_port_block(from: u16, count: u16) -> u16 {
    let (low, high) = ephemeral_ports();
    for base in (from..from.saturating_add(10_000)).step_by(37) {
        let mut ports = (base..base + count).chain(base + 1000..base + 1000 + count);
        if ports.clone().any(|p| (low..=high).contains(&p)) {
            continue;
        }
        if ports.all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no block of {count} free ports from {from} outside {low}-{high}");
}

/// The kernel's range of ports for outgoing connections (Linux's default when unreadable).
fn ephemeral_ports() -> (u16, u16) {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().filter_map(|n| n.parse().ok());
    match (bounds.next(), bounds.next()) {
        (Some(low), Some(high)) => (low, high),
        _ => (32768, 60999),
    }
}

/// `merklectl up` with its data under `data/stack`, its services from port `base`, its own
/// PostgreSQL, its Redis (or the first node of its Redis Cluster) on `redis_port`, its own OTLP
/// port, and its stderr in `data/merklectl.stderr`.
pub fn command(data: &Path, base: u16, redis_port: u16) -> Command {
    let stderr = std::fs::File::create(data.join("merklectl.stderr")).expect("log file");
    let mut command = Command::new(binary("merklectl"));
    command
        .arg("up")
        .arg("--data-dir")
        .arg(data.join("stack"))
        .args(["--postgres-port", &free_port().expect("port").to_string()])
        .args(["--redis-port", &redis_port.to_string()])
        .args(["--base-port", &base.to_string(), "--no-build"])
        .args(["--otlp-port", &free_port().expect("port").to_string()])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("CARGO")
        .env_remove("DISCOVERY_BACKEND")
        .env_remove("STATIC_FILE")
        .stdout(Stdio::piped())
        .stderr(stderr);
    command
}

/// Stops `merklectl up` if the test fails midway, so that nothing outlives the test.
pub struct StopOnDrop(pub std::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGINT);
            let _ = self.0.wait();
        }
    }
}
