//! Stall protection (`connected_to_upstream` arms it, the response hooks feed it): three
//! deadlines per route, checked by one small task per request.
//!
//! - first byte: from the upstream connection to the response head;
//! - gap: between two response chunks (a stream that stops after its first event);
//! - total: from the request head to the response's end.
//!
//! Pingora 0.9 has a single read timeout for every upstream read, which cannot tell
//! these apart. So the guard keeps its own clock and, when a deadline passes, shuts the
//! upstream socket down, through a duplicate of its descriptor taken then and checked
//! to be the same connection (same local and peer address) before it is used: no
//! syscall on the request path, and never another socket by mistake. Pingora's read then fails at once; the proxy sees the guard
//! fired and ends the request the way its client expects (see `proxy::failure::end_stalled`).
//! Only HTTP/1 upstreams are used, so the socket carries this request alone.
//!
//! One thread checks every armed guard each [`TICK`] (a task and a timer per request
//! cost about 5 µs of CPU each, measured); deadlines are met within a tick.

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::{OnceLock, Weak};

/// A route's upstream deadlines (`routes[].timeouts`): connect (with TLS), first byte,
/// the longest gap between chunks, and the whole request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
    pub total: Duration,
    /// WebSocket sessions: no frame either way for this long ends one; its longest life.
    pub session_idle: Duration,
    pub session_max: Duration,
}

impl Timeouts {
    /// The deadlines of a WebSocket session: the handshake's first byte as any
    /// request's, then the session's idle limit (frames either way) and longest life.
    pub fn for_session(&self) -> Timeouts {
        Timeouts {
            idle: self.session_idle,
            total: self.session_max,
            ..*self
        }
    }
}

/// How often armed guards are checked.
pub const TICK: Duration = Duration::from_millis(50);

/// Which deadline ended a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    FirstByte,
    Gap,
    Total,
    /// The relay is shutting down and its grace period is ending: an open WebSocket
    /// session is closed (see [`close_sessions`]).
    Shutdown,
    /// The request's budget has no room for more output: the stream is cut (see
    /// [`StallGuard::cut`]).
    Budget,
}

impl Deadline {
    /// The request's outcome label.
    pub fn outcome(self) -> &'static str {
        match self {
            Deadline::FirstByte => "first_byte_timeout",
            Deadline::Gap => "stream_stalled",
            Deadline::Total => "total_timeout",
            Deadline::Shutdown => "shutdown",
            Deadline::Budget => "budget_exceeded",
        }
    }

    /// The outcome label of a WebSocket session this deadline ended.
    pub fn session_outcome(self) -> &'static str {
        match self {
            Deadline::Gap => "session_idle",
            Deadline::Total => "session_max",
            other => other.outcome(),
        }
    }

    fn from_u8(v: u8) -> Option<Deadline> {
        match v {
            1 => Some(Deadline::FirstByte),
            2 => Some(Deadline::Gap),
            3 => Some(Deadline::Total),
            4 => Some(Deadline::Shutdown),
            5 => Some(Deadline::Budget),
            _ => None,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Deadline::FirstByte => 1,
            Deadline::Gap => 2,
            Deadline::Total => 3,
            Deadline::Shutdown => 4,
            Deadline::Budget => 5,
        }
    }
}

const WAITING: u8 = 0;
const STREAMING: u8 = 1;
const DONE: u8 = 2;
/// Between two attempts: only the total deadline runs.
const BETWEEN: u8 = 3;

struct Inner {
    origin: Instant,
    first_byte: Duration,
    gap: Duration,
    total: Duration,
    /// Nanoseconds after `origin`: the current attempt's connection, the last chunk.
    attempt_at: AtomicU64,
    last_chunk: AtomicU64,
    phase: AtomicU8,
    fired: AtomicU8,
    watching: AtomicBool,
    /// A WebSocket session is open on the connection (closed at shutdown).
    session: AtomicBool,
    /// The current attempt's upstream socket.
    socket: Mutex<Target>,
}

/// How the guard reaches the upstream socket.
enum Target {
    None,
    /// The descriptor Pingora uses and the connection's addresses (from Pingora's
    /// digest, known once per connection).
    Raw {
        fd: RawFd,
        local: SocketAddr,
        peer: SocketAddr,
    },
    /// A duplicate taken at once, when the addresses were not known.
    Dup(TcpStream),
}

impl Target {
    fn shutdown(&self) {
        match self {
            Target::None => {}
            Target::Dup(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Target::Raw { fd, local, peer } => {
                // SAFETY: `fd` is the descriptor of this request's upstream connection,
                // which Pingora keeps open while the request runs. On an error path it
                // may just have been closed: the duplicate then fails, or names another
                // socket, which the address check below refuses to touch.
                let dup = unsafe { BorrowedFd::borrow_raw(*fd) }.try_clone_to_owned();
                if let Ok(owned) = dup {
                    let s = TcpStream::from(owned);
                    if s.local_addr().ok() == Some(*local) && s.peer_addr().ok() == Some(*peer) {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            }
        }
    }
}

impl Inner {
    fn since(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_nanos() as u64
    }

    /// The next deadline and which one it is.
    fn next(&self) -> (Duration, Deadline) {
        let total = (self.total, Deadline::Total);
        let other = match self.phase.load(Ordering::Acquire) {
            BETWEEN => return total,
            WAITING => (
                Duration::from_nanos(self.attempt_at.load(Ordering::Acquire)) + self.first_byte,
                Deadline::FirstByte,
            ),
            _ => (
                Duration::from_nanos(self.last_chunk.load(Ordering::Acquire)) + self.gap,
                Deadline::Gap,
            ),
        };
        if other.0 < total.0 {
            other
        } else {
            total
        }
    }

    fn fire(&self, which: Deadline) {
        let socket = lock(&self.socket);
        if self.phase.load(Ordering::Acquire) == DONE {
            return;
        }
        if matches!(*socket, Target::None) {
            // Between attempts there is nothing to cut: the next attempt's arming sees
            // the deadline passed and fires then.
            return;
        }
        if self
            .fired
            .compare_exchange(0, which.as_u8(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            socket.shutdown();
        }
    }
}

/// One request's guard. Dropping it ends the watch.
pub struct StallGuard {
    inner: Arc<Inner>,
}

impl StallGuard {
    pub fn new(start: Instant, timeouts: &Timeouts) -> StallGuard {
        StallGuard {
            inner: Arc::new(Inner {
                origin: start,
                first_byte: timeouts.first_byte,
                gap: timeouts.idle,
                total: timeouts.total,
                attempt_at: AtomicU64::new(0),
                last_chunk: AtomicU64::new(0),
                phase: AtomicU8::new(WAITING),
                fired: AtomicU8::new(0),
                watching: AtomicBool::new(false),
                session: AtomicBool::new(false),
                socket: Mutex::new(Target::None),
            }),
        }
    }

    /// An attempt connected (or reused a connection) on socket `fd`, whose local and
    /// peer addresses are `addrs` when known: the first-byte clock starts. Starts the
    /// watch on the first attempt.
    pub fn attempt(&self, fd: RawFd, addrs: Option<(SocketAddr, SocketAddr)>, now: Instant) {
        let inner = &self.inner;
        let target = match addrs {
            Some((local, peer)) => Target::Raw { fd, local, peer },
            // SAFETY: Pingora hands over the descriptor of the connection it is about
            // to use for this request; it stays open during this call.
            None => unsafe { BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .map_or(Target::None, |o| Target::Dup(TcpStream::from(o))),
        };
        *lock(&inner.socket) = target;
        inner.attempt_at.store(inner.since(now), Ordering::Release);
        inner.phase.store(WAITING, Ordering::Release);
        if !inner.watching.swap(true, Ordering::AcqRel) {
            lock(watched()).push(Arc::downgrade(inner));
        }
    }

    /// An attempt ended and another is being chosen: its socket is no longer this
    /// request's, and only the total deadline runs until the next one connects.
    pub fn between_attempts(&self) {
        let inner = &self.inner;
        let mut socket = lock(&inner.socket);
        *socket = Target::None;
        inner.phase.store(BETWEEN, Ordering::Release);
    }

    /// The upstream switched to a WebSocket (`101`): from now on the gap clock is the
    /// session's idle clock, fed by frames either way, and the session is closed when
    /// the relay's grace period at shutdown ends.
    pub fn session_started(&self, now: Instant) {
        self.response_started(now);
        self.inner.session.store(true, Ordering::Release);
    }

    /// The response head arrived: the gap clock starts.
    pub fn response_started(&self, now: Instant) {
        self.inner
            .last_chunk
            .store(self.inner.since(now), Ordering::Release);
        self.inner.phase.store(STREAMING, Ordering::Release);
    }

    /// A response chunk passed.
    pub fn chunk(&self, now: Instant) {
        self.inner
            .last_chunk
            .store(self.inner.since(now), Ordering::Release);
    }

    /// The response ended (or the request did): no deadline applies any more.
    pub fn done(&self) {
        self.inner.phase.store(DONE, Ordering::Release);
        *lock(&self.inner.socket) = Target::None;
    }

    /// Ends the request now, as a deadline would (the upstream socket is shut down, so
    /// the upstream stops its work and the proxy ends the response its way).
    pub fn cut(&self, why: Deadline) {
        self.inner.fire(why);
    }

    /// The deadline that ended this request, if one did.
    pub fn fired(&self) -> Option<Deadline> {
        Deadline::from_u8(self.inner.fired.load(Ordering::Acquire))
    }
}

impl Drop for StallGuard {
    fn drop(&mut self) {
        self.done();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The armed guards, checked by one thread started with the first.
fn watched() -> &'static Mutex<Vec<Weak<Inner>>> {
    static WATCHED: OnceLock<&'static Mutex<Vec<Weak<Inner>>>> = OnceLock::new();
    WATCHED.get_or_init(|| {
        let list: &'static Mutex<Vec<Weak<Inner>>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        std::thread::Builder::new()
            .name("stall-guard".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                check(list);
            })
            .expect("start the stall guard thread");
        list
    })
}

/// Ends every open WebSocket session (the relay is about to exit); returns how many.
pub fn close_sessions() -> usize {
    let sessions: Vec<Arc<Inner>> = lock(watched())
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|i| i.session.load(Ordering::Acquire) && i.fired.load(Ordering::Acquire) == 0)
        .collect();
    let mut closed = 0;
    for inner in sessions {
        inner.fire(Deadline::Shutdown);
        closed += usize::from(inner.fired.load(Ordering::Acquire) == Deadline::Shutdown.as_u8());
    }
    closed
}

/// Fires every guard whose deadline passed; forgets finished ones.
fn check(list: &Mutex<Vec<Weak<Inner>>>) {
    let armed: Vec<Arc<Inner>> = {
        let mut list = lock(list);
        let mut alive = Vec::with_capacity(list.len());
        list.retain(|w| match w.upgrade() {
            Some(inner)
                if inner.phase.load(Ordering::Acquire) != DONE
                    && inner.fired.load(Ordering::Acquire) == 0 =>
            {
                alive.push(inner);
                true
            }
            _ => false,
        });
        alive
    };
    let now = Instant::now();
    for inner in armed {
        let (at, which) = inner.next();
        if inner.since(now) >= at.as_nanos() as u64 {
            inner.fire(which);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;

    fn timeouts(first_byte: u64, idle: u64, total: u64) -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(1),
            first_byte: Duration::from_millis(first_byte),
            idle: Duration::from_millis(idle),
            total: Duration::from_millis(total),
            session_idle: Duration::from_millis(idle),
            session_max: Duration::from_millis(total),
        }
    }

    fn addrs(s: &TcpStream) -> Option<(SocketAddr, SocketAddr)> {
        Some((s.local_addr().unwrap(), s.peer_addr().unwrap()))
    }

    /// A connected pair: the guard watches `client`; reading it ends when it fires.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        (client, server)
    }

    /// Waits (up to 10 s, the machine may be loaded) for the guard to fire.
    async fn fired_within(g: &StallGuard) -> Option<Deadline> {
        for _ in 0..1000 {
            if g.fired().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        g.fired()
    }

    #[tokio::test]
    async fn a_stream_that_stops_is_cut_by_the_gap_deadline() {
        let (mut client, _server) = pair();
        let start = Instant::now();
        let g = StallGuard::new(start, &timeouts(60_000, 1_000, 60_000));
        g.attempt(client.as_raw_fd(), addrs(&client), Instant::now());
        g.response_started(Instant::now());
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            g.chunk(Instant::now());
        }
        assert_eq!(g.fired(), None, "chunks keep it alive");
        let read = tokio::task::spawn_blocking(move || {
            let mut b = [0u8; 1];
            client.read(&mut b)
        });
        let n = read.await.unwrap().unwrap();
        assert_eq!(n, 0, "the socket was shut down");
        assert_eq!(g.fired(), Some(Deadline::Gap));
    }

    #[tokio::test]
    async fn the_first_byte_deadline_and_done() {
        let (client, _server) = pair();
        let g = StallGuard::new(Instant::now(), &timeouts(100, 5_000, 60_000));
        g.attempt(client.as_raw_fd(), addrs(&client), Instant::now());
        assert_eq!(fired_within(&g).await, Some(Deadline::FirstByte));

        let (client, _server) = pair();
        let g = StallGuard::new(Instant::now(), &timeouts(100, 100, 100));
        g.attempt(client.as_raw_fd(), addrs(&client), Instant::now());
        g.done();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(g.fired(), None, "a finished request is never cut");
    }

    #[tokio::test]
    async fn a_descriptor_that_now_names_another_connection_is_left_alone() {
        let (first, _s1) = pair();
        let (mut other, _s2) = pair();
        let g = StallGuard::new(Instant::now(), &timeouts(100, 5_000, 60_000));
        // The fd of `other`, with the addresses of `first`: as if `first` had closed
        // and its number had been given to `other`.
        g.attempt(other.as_raw_fd(), addrs(&first), Instant::now());
        assert_eq!(fired_within(&g).await, Some(Deadline::FirstByte));
        other
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 1];
        let e = other.read(&mut b).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the other connection was shut down: {e:?}"
        );
    }

    #[tokio::test]
    async fn the_total_deadline_wins_over_a_steady_stream() {
        let (client, _server) = pair();
        let g = StallGuard::new(Instant::now(), &timeouts(5_000, 5_000, 200));
        g.attempt(client.as_raw_fd(), addrs(&client), Instant::now());
        g.response_started(Instant::now());
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            g.chunk(Instant::now());
        }
        assert_eq!(fired_within(&g).await, Some(Deadline::Total));
    }
}
