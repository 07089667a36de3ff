//! The target guard: a load run goes to a loopback address unless `--allow-remote` says
//! otherwise, so a typo cannot turn the generator on somebody else's machine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, bail};

/// Where the load goes: the server's address, as resolved and checked.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's HTTP + WebSocket address.
    pub addr: SocketAddr,
}

/// How many 127.0.0.x source addresses connections spread over: 127.0.0.2 ..= 127.0.0.251.
pub const SOURCE_ADDRS: usize = 250;

impl Target {
    /// A target known to be safe (tests: a server they started on loopback).
    pub fn loopback(addr: SocketAddr) -> anyhow::Result<Self> {
        if !addr.ip().is_loopback() {
            bail!("{addr} is not a loopback address");
        }
        Ok(Self { addr })
    }

    /// `http://addr/api/v1{path}`.
    pub fn api(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.addr)
    }

    /// The WebSocket URL with `token`.
    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    /// Whether the server is on this machine's loopback.
    pub fn is_loopback(&self) -> bool {
        self.addr.ip().is_loopback()
    }

    /// The source address of source slot `i`: 127.0.0.(2 + i % 250) for an IPv4 loopback
    /// target (each address has its own ~28,000 ephemeral ports), none otherwise (the system
    /// picks).
    pub fn source(&self, i: usize) -> Option<IpAddr> {
        match self.addr.ip() {
            IpAddr::V4(v4) if v4.is_loopback() => {
                let last = u8::try_from(2 + i % SOURCE_ADDRS).unwrap_or(2);
                Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
            }
            _ => None,
        }
    }
}

/// Resolves `server` (`host:port`) and refuses anything but loopback unless `allow_remote`.
pub async fn resolve(server: &str, allow_remote: bool) -> anyhow::Result<Target> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("cannot resolve {server} (expected host:port)"))?
        .collect();
    let Some(first) = addrs.first().copied() else {
        bail!("{server} resolves to no address");
    };
    if let Some(remote) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        if !allow_remote {
            bail!(
                "refusing to load {server} ({remote}): not a loopback address. \
                 Pass --allow-remote only for a server you own."
            );
        }
        return Ok(Target { addr: *remote });
    }
    Ok(Target { addr: first })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_loopback_without_the_flag() {
        assert!(resolve("127.0.0.1:8080", false).await.is_ok());
        assert!(resolve("localhost:8080", false).await.is_ok());
        assert!(resolve("[::1]:8080", false).await.is_ok());
        let err = resolve("192.0.2.7:8080", false).await.expect_err("refused");
        assert!(err.to_string().contains("--allow-remote"), "{err}");
        assert!(resolve("192.0.2.7:8080", true).await.is_ok());
    }

    #[test]
    fn sources_cycle_over_250_loopback_addresses() {
        let t = Target::loopback("127.0.0.1:1".parse().expect("addr")).expect("loopback");
        assert_eq!(t.source(0), Some("127.0.0.2".parse().expect("ip")));
        assert_eq!(t.source(249), Some("127.0.0.251".parse().expect("ip")));
        assert_eq!(t.source(250), Some("127.0.0.2".parse().expect("ip")));
    }
}
