//! Accept stage (the head gate, as a connection arrives): a cap on open client
//! connections, in total and per client address, so a flood of idle connections cannot
//! exhaust the relay. A connection is counted when the head gate takes it and uncounted
//! when the gate lets it go (its [`Held`] drops, however it ended), so the counts are
//! exact without asking the kernel. A connection over a cap is closed at once, before any
//! byte is read. The counts are this process's: during an upgrade, the old and the new
//! relay each hold their own connections to the caps.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use log::info;

use crate::metrics::Metrics;

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

pub struct ConnectionCap {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
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

/// A connection counted against the caps until it drops.
pub struct Held {
    cap: Arc<ConnectionCap>,
    ip: IpAddr,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut c = lock(&self.cap.counts);
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
        self.cap.metrics.client_connections(c.total);
    }
}

impl ConnectionCap {
    /// `None` when neither cap is set.
    pub fn new(max_total: usize, max_per_ip: usize, metrics: Arc<Metrics>) -> Option<Arc<Self>> {
        if max_total == 0 && max_per_ip == 0 {
            return None;
        }
        info!(
            "client connections capped: {max_total} in all, {max_per_ip} per address (0: no cap)"
        );
        Some(Arc::new(ConnectionCap {
            max_total,
            max_per_ip,
            counts: Mutex::default(),
            metrics,
        }))
    }

    /// Counts a connection from `addr` in, or refuses it (counted by the cap it is over).
    pub fn admit(self: &Arc<Self>, addr: SocketAddr) -> Option<Held> {
        let ip = canonical(addr.ip());
        match self.count_in(ip) {
            Ok(total) => {
                self.metrics.client_connections(total);
                Some(Held {
                    cap: self.clone(),
                    ip,
                })
            }
            Err(cap) => {
                self.metrics.connection_refused(cap);
                None
            }
        }
    }

    /// The new total, or which cap the connection is over.
    fn count_in(&self, ip: IpAddr) -> Result<usize, &'static str> {
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
        Ok(c.total)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// IPv4-mapped IPv6 addresses count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 5000)
    }

    #[test]
    fn caps_in_all_and_per_address_and_frees_what_drops() {
        let cap = ConnectionCap::new(3, 2, Arc::new(Metrics::new(false))).unwrap();
        let a1 = cap.admit(addr("10.0.0.1")).unwrap();
        let _a2 = cap.admit(addr("10.0.0.1")).unwrap();
        assert!(cap.admit(addr("10.0.0.1")).is_none(), "per address");
        // An IPv4-mapped IPv6 address is the same client.
        assert!(cap.admit(addr("::ffff:10.0.0.1")).is_none());
        let _b = cap.admit(addr("10.0.0.2")).unwrap();
        assert!(cap.admit(addr("10.0.0.3")).is_none(), "total");
        drop(a1);
        let _c = cap
            .admit(addr("10.0.0.3"))
            .expect("a closed connection frees its place");
        assert_eq!(lock(&cap.counts).total, 3);
        assert_eq!(lock(&cap.counts).per_ip[&"10.0.0.1".parse().unwrap()], 1);
    }

    #[test]
    fn no_cap_no_counting() {
        assert!(ConnectionCap::new(0, 0, Arc::new(Metrics::new(false))).is_none());
    }
}
