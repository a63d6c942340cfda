//! [`Channel`]: one vhost-user connection, every exchange bounded by a
//! [`Watchdog`] that also notices a backend that hangs up. Both report to
//! the device's [`Link`], which decides between reconnecting and failing.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::Frontend;

use super::reconnect::Link;
use super::Error;

/// A thread that shuts the vhost-user socket down and tells the [`Link`]
/// when the backend hangs up or a call outlives its deadline.
pub(super) struct Watchdog {
    deadline: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `sock` (a clone of connection `generation`).
    pub(super) fn start(sock: UnixStream, link: Arc<Link>, generation: u64) -> io::Result<Self> {
        let deadline: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (Arc::clone(&deadline), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("outboard-vhost-watchdog".into())
            .spawn(move || watch(&sock, &link, generation, &d, &s))?;
        Ok(Watchdog {
            deadline,
            stop,
            thread: Some(thread),
        })
    }

    /// A call starts: it must finish by `deadline`.
    pub(super) fn arm(&self, deadline: Instant) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) = Some(deadline);
    }

    /// The call finished.
    pub(super) fn disarm(&self) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One vhost-user connection under a [`Watchdog`].
pub(super) struct Channel {
    fe: Frontend,
    /// A clone of the socket, to end the session when a request fails.
    sock: UnixStream,
    link: Arc<Link>,
    generation: u64,
    /// Set up by the recovery: its requests go out while the link is down.
    probation: bool,
    timeout: Duration,
    /// One deadline for every request until it is cleared (a replay).
    budget: Option<Instant>,
    watchdog: Watchdog,
}

impl Channel {
    /// Connection `generation` over `sock`; `probation` while the recovery
    /// sets it up. Every request asks for a reply where one is defined
    /// (NEED_REPLY, acknowledged when REPLY_ACK is negotiated).
    pub(super) fn open(
        sock: UnixStream,
        link: Arc<Link>,
        generation: u64,
        probation: bool,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let killer = sock.try_clone().map_err(Error::Setup)?;
        let watched = sock.try_clone().map_err(Error::Setup)?;
        let watchdog =
            Watchdog::start(watched, Arc::clone(&link), generation).map_err(Error::Setup)?;
        let fe = Frontend::from_stream(sock, 64);
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        Ok(Channel {
            fe,
            sock: killer,
            link,
            generation,
            probation,
            timeout,
            budget: None,
            watchdog,
        })
    }

    /// The device's link.
    pub(super) fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// This connection's generation.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The recovery has set the connection up: it is the device's now.
    pub(super) fn end_probation(&mut self) {
        self.probation = false;
    }

    /// Bounds every request until `None` by one `deadline`.
    pub(super) fn set_budget(&mut self, deadline: Option<Instant>) {
        self.budget = deadline;
    }

    /// Runs one vhost-user exchange under the watchdog. A request fails at
    /// once while the device reconnects or has failed; a failed request
    /// ends the session and tells the link (a refusal by the backend fails
    /// the device, anything else counts as a lost backend).
    pub(super) fn call<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, Error> {
        self.link.admit(self.generation, self.probation)?;
        let own = Instant::now() + self.timeout;
        self.watchdog.arm(self.budget.map_or(own, |b| b.min(own)));
        let r = f(&mut self.fe);
        self.watchdog.disarm();
        let r = r.map_err(|source| Error::Vhost { op, source });
        if let Err(e) = &r {
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
            if refused(e) {
                self.link.fail(e);
            } else {
                self.link.lost(self.generation, e);
            }
        }
        r
    }
}

/// True when the backend answered a request with a failure (a non-zero
/// REPLY_ACK): a new connection would not fare better.
fn refused(e: &Error) -> bool {
    matches!(
        e,
        Error::Vhost {
            source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::BackendInternalError),
            ..
        }
    )
}

fn watch(
    sock: &UnixStream,
    link: &Link,
    generation: u64,
    deadline: &Mutex<Option<Instant>>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: `pfd` is a live pollfd for an fd that `sock` keeps open.
        let n = unsafe { libc::poll(&mut pfd, 1, 20) };
        let hung_up = n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0;
        let overdue = deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|d| Instant::now() > d);
        if hung_up || overdue {
            if hung_up {
                link.lost(generation, &Error::HungUp);
            } else {
                link.overdue(generation);
            }
            // Unblock a call in progress.
            let _ = sock.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}
