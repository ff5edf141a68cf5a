//! Accept stage (Pingora's connection filter): a cap on open client connections, in
//! total and per client address, so a flood of idle connections cannot exhaust the
//! relay. Pingora tells the relay about a connection when it is accepted but not when
//! it closes, so the counts come from the kernel: one thread reads the established
//! connections on the proxy port from `/proc/net/tcp` and `/proc/net/tcp6` every
//! [`REFRESH`], and each accepted connection is added until the next reading. A
//! connection over a cap is closed at once, before any byte is read.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use log::{info, warn};
use pingora_core::listeners::ConnectionFilter;

use crate::metrics::Metrics;

pub const REFRESH: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

pub struct ConnectionCap {
    max_total: usize,
    max_per_ip: usize,
    counts: Arc<Mutex<Counts>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ConnectionCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCap")
            .field("max_total", &self.max_total)
            .field("max_per_ip", &self.max_per_ip)
            .finish()
    }
}

impl ConnectionCap {
    /// `None` when neither cap is set, or the kernel's tables cannot be read (logged).
    pub fn start(
        port: u16,
        max_total: usize,
        max_per_ip: usize,
        metrics: Arc<Metrics>,
    ) -> Option<Arc<ConnectionCap>> {
        if max_total == 0 && max_per_ip == 0 {
            return None;
        }
        let first = match scan(port) {
            Ok(c) => c,
            Err(e) => {
                warn!("connection caps are off: cannot read /proc/net/tcp ({e})");
                return None;
            }
        };
        let counts = Arc::new(Mutex::new(first));
        let refresher = counts.clone();
        let gauge = metrics.clone();
        std::thread::Builder::new()
            .name("connection-cap".into())
            .spawn(move || loop {
                std::thread::sleep(REFRESH);
                if let Ok(c) = scan(port) {
                    gauge.client_connections(c.total);
                    *lock(&refresher) = c;
                }
            })
            .ok()?;
        info!(
            "client connections capped: {max_total} in all, {max_per_ip} per address (0: no cap)"
        );
        Some(Arc::new(ConnectionCap {
            max_total,
            max_per_ip,
            counts,
            metrics,
        }))
    }

    /// Counts the connection in, or says which cap it is over.
    fn admit(&self, ip: IpAddr) -> Result<(), &'static str> {
        let mut c = lock(&self.counts);
        if self.max_total > 0 && c.total >= self.max_total {
            return Err("total");
        }
        let mine = c.per_ip.get(&ip).copied().unwrap_or(0);
        if self.max_per_ip > 0 && mine >= self.max_per_ip {
            return Err("per_address");
        }
        c.total += 1;
        *c.per_ip.entry(ip).or_default() += 1;
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait]
impl ConnectionFilter for ConnectionCap {
    async fn should_accept(&self, addr: Option<&SocketAddr>) -> bool {
        let Some(addr) = addr else {
            return true;
        };
        match self.admit(canonical(addr.ip())) {
            Ok(()) => true,
            Err(cap) => {
                self.metrics.connection_refused(cap);
                false
            }
        }
    }
}

/// IPv4-mapped IPv6 addresses count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Established (or half-closed, still held) connections on local `port`. Read line by
/// line into one small buffer: with thousands of connections the tables are megabytes,
/// and reading them whole every 500 ms kept that much more memory in the process.
fn scan(port: u16) -> std::io::Result<Counts> {
    use std::io::BufRead;
    let mut counts = Counts::default();
    let mut read_any = false;
    let mut line = String::with_capacity(256);
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(file) = std::fs::File::open(table) else {
            continue;
        };
        read_any = true;
        let mut reader = std::io::BufReader::with_capacity(16 * 1024, file);
        let mut first = true;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                break;
            }
            if std::mem::take(&mut first) {
                continue;
            }
            if let Some(ip) = parse_line(&line, port) {
                counts.total += 1;
                *counts.per_ip.entry(canonical(ip)).or_default() += 1;
            }
        }
    }
    if !read_any {
        return Err(std::io::Error::other("no /proc/net/tcp"));
    }
    Ok(counts)
}

/// The remote address of a `/proc/net/tcp*` line whose local port is `port` and whose
/// state is ESTABLISHED (01) or CLOSE_WAIT (08).
fn parse_line(line: &str, port: u16) -> Option<IpAddr> {
    let mut fields = line.split_whitespace();
    let _slot = fields.next()?;
    let local = fields.next()?;
    let remote = fields.next()?;
    let state = fields.next()?;
    if state != "01" && state != "08" {
        return None;
    }
    let (_, local_port) = local.split_once(':')?;
    if u16::from_str_radix(local_port, 16).ok()? != port {
        return None;
    }
    let (remote_ip, _) = remote.split_once(':')?;
    parse_ip(remote_ip)
}

/// The kernel prints addresses as 32-bit words in host order (little-endian here).
fn parse_ip(hex: &str) -> Option<IpAddr> {
    match hex.len() {
        8 => {
            let w = u32::from_str_radix(hex, 16).ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(w.to_le_bytes())))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()?;
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kernel_lines() {
        let v4 = "   1: 0100007F:1F90 0200007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(
            parse_line(v4, 8080),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        );
        assert_eq!(parse_line(v4, 8081), None);
        let listening = v4.replace(" 01 ", " 0A ");
        assert_eq!(parse_line(&listening, 8080), None);
        let v6 = "   0: 00000000000000000000000000000000:1F90 0000000000000000FFFF00000100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 1 1";
        let ip = parse_line(v6, 8080).unwrap();
        assert_eq!(canonical(ip), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
    }

    #[test]
    fn caps_in_all_and_per_address() {
        let cap = ConnectionCap {
            max_total: 3,
            max_per_ip: 2,
            counts: Arc::new(Mutex::new(Counts::default())),
            metrics: Arc::new(Metrics::new(false)),
        };
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(cap.admit(a).is_ok() && cap.admit(a).is_ok());
        assert_eq!(cap.admit(a), Err("per_address"));
        assert!(cap.admit(b).is_ok());
        assert_eq!(cap.admit(b), Err("total"));
    }

    #[test]
    fn counts_this_process_connections() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _c1 = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _c2 = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _s1 = l.accept().unwrap();
        let _s2 = l.accept().unwrap();
        let c = scan(port).unwrap();
        assert_eq!(c.total, 2);
        assert_eq!(c.per_ip[&IpAddr::V4(Ipv4Addr::LOCALHOST)], 2);
    }
}
