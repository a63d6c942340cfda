//! [`Channel`]: the vhost-user connection, every exchange bounded by a
//! [`Watchdog`] that also notices a backend that hangs up.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;

use super::Error;
use crate::health::Health;
use crate::irq::IrqLine;

/// A thread that shuts the vhost-user socket down, fails the device's
/// [`Health`] and signals its interrupt line when the backend hangs up or a
/// call outlives its deadline.
pub(super) struct Watchdog {
    deadline: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `sock` (a clone of the vhost-user connection).
    pub(super) fn start(sock: UnixStream, health: Arc<Health>, irq: IrqLine) -> io::Result<Self> {
        let deadline: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (Arc::clone(&deadline), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("outboard-vhost-watchdog".into())
            .spawn(move || watch(&sock, &health, &irq, &d, &s))?;
        Ok(Watchdog {
            deadline,
            stop,
            thread: Some(thread),
        })
    }

    /// A call starts: it must finish within `timeout`.
    pub(super) fn arm(&self, timeout: Duration) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Instant::now() + timeout);
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

/// The vhost-user connection under a [`Watchdog`].
pub(super) struct Channel {
    fe: Frontend,
    health: Arc<Health>,
    timeout: Duration,
    watchdog: Watchdog,
}

impl Channel {
    /// Wraps `fe`, whose socket `watchdog` watches; calls fail `health`.
    pub(super) fn new(
        fe: Frontend,
        health: Arc<Health>,
        timeout: Duration,
        watchdog: Watchdog,
    ) -> Self {
        Channel {
            fe,
            health,
            timeout,
            watchdog,
        }
    }

    /// The device's health.
    pub(super) fn health(&self) -> &Health {
        &self.health
    }

    /// Runs one vhost-user exchange under the watchdog; a failure marks the
    /// device failed, and a failed device's calls fail at once.
    pub(super) fn call<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, Error> {
        if self.health.is_failed() {
            return Err(Error::HungUp);
        }
        self.watchdog.arm(self.timeout);
        let r = f(&mut self.fe);
        self.watchdog.disarm();
        let r = r.map_err(|source| Error::Vhost { op, source });
        if let Err(e) = &r {
            self.health.fail(e);
        }
        r
    }
}

fn watch(
    sock: &UnixStream,
    health: &Health,
    irq: &IrqLine,
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
            let why = if hung_up {
                Error::HungUp
            } else {
                Error::Timeout
            };
            health.fail(&why);
            // Unblock a call in progress, and wake a driver waiting for a completion.
            let _ = sock.shutdown(std::net::Shutdown::Both);
            let _ = irq.eventfd().write(1);
            return;
        }
    }
}
