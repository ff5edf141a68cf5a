//! Start stage (`main`, before the server is built): `listen.max_connections` against the
//! process's file limit (RLIMIT_NOFILE). A cap the limit cannot hold is no cap: past the
//! limit `accept` fails and the relay stops taking connections, also from the clients it
//! would have served. So the soft limit is raised to the hard one when the cap needs it,
//! and if the cap still does not fit it is lowered to what does, with a warning naming
//! both numbers.

use log::{info, warn};

/// Open files besides client and upstream connections: listeners, the admin port, logs,
/// the rows file, Redis and ClickHouse connections, epoll and the like.
pub const MARGIN: u64 = 64;

/// Files `max_connections` client connections may need: each one may hold an upstream
/// connection of its own.
pub fn needed(max_connections: usize) -> u64 {
    2 * max_connections as u64 + MARGIN
}

/// What the start does with the file limit for a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Raise the soft limit to this first (the hard limit).
    pub raise_to: Option<u64>,
    /// The file limit the relay then runs under.
    pub limit: u64,
    /// The cap on client connections that fits in it.
    pub max_connections: usize,
}

/// The plan for a cap of `max_connections` (0: no cap, nothing to fit) under the limits
/// `soft` and `hard`.
pub fn plan(max_connections: usize, soft: u64, hard: u64) -> Plan {
    let need = needed(max_connections);
    if max_connections == 0 || need <= soft {
        return Plan {
            raise_to: None,
            limit: soft,
            max_connections,
        };
    }
    let limit = hard.max(soft);
    let fits = if need <= limit {
        max_connections
    } else {
        // Never 0, which would mean no cap at all.
        (limit.saturating_sub(MARGIN) / 2).max(1) as usize
    };
    Plan {
        raise_to: (hard > soft).then_some(hard),
        limit,
        max_connections: fits,
    }
}

// rlim_t is narrower than u64 on some targets.
#[allow(clippy::unnecessary_cast)]
fn get() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((r.rlim_cur as u64, r.rlim_max as u64))
}

fn set_soft(soft: u64, hard: u64) -> std::io::Result<()> {
    let r = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Fits `max_connections` to this process's file limit, raising the soft limit when that
/// is needed and allowed, and returns the cap to run with. `check_only` (`-t`) changes
/// nothing and reports what a start under the same limits would do.
pub fn fit_max_connections(max_connections: usize, check_only: bool) -> usize {
    let (soft, hard) = match get() {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot read the file limit (RLIMIT_NOFILE: {e}); listen.max_connections {max_connections} is not checked against it");
            return max_connections;
        }
    };
    let mut p = plan(max_connections, soft, hard);
    if let (Some(to), false) = (p.raise_to, check_only) {
        // The hard limit may be more than the kernel lets a process open (unlimited,
        // say): then what the cap needs is enough.
        let raised = set_soft(to, hard).map(|()| to).or_else(|e| {
            let need = needed(max_connections).min(to);
            set_soft(need, hard).map(|()| need).map_err(|_| e)
        });
        match raised {
            Ok(now) => {
                info!("file limit (RLIMIT_NOFILE) raised from {soft} to {now} for listen.max_connections {max_connections}");
                p = plan(max_connections, now, now);
            }
            Err(e) => {
                warn!("cannot raise the file limit (RLIMIT_NOFILE) from {soft} to {to}: {e}");
                p = plan(max_connections, soft, soft);
            }
        }
    }
    if p.max_connections != max_connections {
        warn!(
            "listen.max_connections {max_connections} needs up to {} open files (a client and an upstream connection each, plus {MARGIN}) but the file limit (RLIMIT_NOFILE) is {}: client connections are capped at {}; raise the limit (ulimit -n, systemd LimitNOFILE=) to keep {max_connections}",
            needed(max_connections),
            p.limit,
            p.max_connections
        );
    }
    p.max_connections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_that_fits_changes_nothing() {
        assert_eq!(
            plan(50_000, 1_048_576, 1_048_576),
            Plan {
                raise_to: None,
                limit: 1_048_576,
                max_connections: 50_000
            }
        );
        // No cap: nothing to fit, whatever the limit.
        assert_eq!(plan(0, 256, 256).max_connections, 0);
        assert_eq!(plan(0, 256, 4096).raise_to, None);
        // Exactly enough.
        assert_eq!(plan(96, 256, 256).max_connections, 96);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one_when_the_cap_needs_it() {
        assert_eq!(
            plan(50_000, 1024, 524_288),
            Plan {
                raise_to: Some(524_288),
                limit: 524_288,
                max_connections: 50_000
            }
        );
    }

    #[test]
    fn a_cap_over_the_hard_limit_is_lowered_to_what_fits() {
        // (256 - 64) / 2
        assert_eq!(
            plan(50_000, 256, 256),
            Plan {
                raise_to: None,
                limit: 256,
                max_connections: 96
            }
        );
        assert_eq!(
            plan(50_000, 1024, 65_536),
            Plan {
                raise_to: Some(65_536),
                limit: 65_536,
                max_connections: 32_736
            }
        );
        // Never 0 (no cap), however small the limit.
        assert_eq!(plan(50_000, 16, 16).max_connections, 1);
        assert_eq!(needed(96), 256);
    }
}
