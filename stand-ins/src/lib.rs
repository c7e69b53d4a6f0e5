//! Loopback stand-ins for the orchestrator APIs Discovery reads, serving the documented
//! endpoints faithfully enough to test a client against: Nomad's HTTP API ([`nomad`]) and the
//! Kubernetes API ([`kubernetes`]). Each listens on 127.0.0.1 on a free port, counts the calls
//! it answers, can add latency, refuse credentials or fail on demand, and stops when dropped.
//!
//! Node addresses in what they serve are loopback ones (127.1.x.y): nothing a test reads from
//! a stand-in leads anywhere but this machine.

pub mod kubernetes;
pub mod nomad;

use std::{net::SocketAddr, time::Duration};

/// Serves `router` on a loopback `port` (0: a free one) until the returned handle is dropped.
async fn serve(router: axum::Router, port: u16) -> std::io::Result<(SocketAddr, Server)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((addr, Server(task)))
}

/// The serving task; aborted on drop.
struct Server(tokio::task::JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A duration as the APIs write it: `5s`, `5m`, `300ms`, or plain seconds.
fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |i| text.split_at(i));
    let n: u64 = number.parse().ok()?;
    Some(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return None,
    })
}

/// A loopback address for the `n`th node of a stand-in: 127.1.x.y.
pub fn node_ip(n: usize) -> String {
    format!("127.1.{}.{}", (n / 250) % 250, n % 250 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_node_addresses() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(node_ip(0), "127.1.0.1");
        assert_eq!(node_ip(999), "127.1.3.250");
    }
}
