//! [`EventOps`]: how a device watches its own fds (input sockets, timers)
//! in the loop that serves it, modelled on event-manager's `EventOps`.
//!
//! A device gets an `EventOps` in [`crate::Device::init`] and in every
//! [`crate::Device::handle_event`] call. It may keep a clone and use it at
//! any time, for example to stop reading an input while a FIFO is full and
//! to resume from inside a register read that drained it. Each fd is
//! registered with an `id` of the device's choosing, which comes back in
//! `handle_event`. An event may still arrive for an id removed during the
//! same wake-up; devices treat such a late event as spurious.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// What registers fds for an [`EventOps`]: the runtime's epoll set, or the
/// vhost-user daemon's listeners.
pub(crate) trait Watch: Send + Sync {
    /// Watches `fd` for readability (or, with `writable`, for room to
    /// write), reporting it as device event `id`.
    fn add(&self, fd: RawFd, id: u32, writable: bool) -> io::Result<()>;
    /// Stops watching `fd`, registered as `id`.
    fn remove(&self, fd: RawFd, id: u32) -> io::Result<()>;
}

/// A device's handle on the event loop that serves it.
#[derive(Clone)]
pub struct EventOps(Arc<dyn Watch>);

impl std::fmt::Debug for EventOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventOps").finish_non_exhaustive()
    }
}

impl EventOps {
    pub(crate) fn new(watch: Arc<dyn Watch>) -> Self {
        EventOps(watch)
    }

    /// Ops bound to no loop: every call succeeds and watches nothing. For
    /// unit tests of device models, and for devices driven by hand.
    pub fn detached() -> Self {
        EventOps(Arc::new(Detached))
    }

    /// Watches `fd` for readability (and hang-up); the loop then calls
    /// `handle_event` with `id`. Adding an fd twice is an error (`EEXIST`).
    pub fn add(&self, fd: impl AsFd, id: u32) -> io::Result<()> {
        self.0.add(fd.as_fd().as_raw_fd(), id, false)
    }

    /// Watches `fd` for room to write (level-triggered: remove it once the
    /// device has written what waited); reported as `id` like [`EventOps::add`].
    pub fn add_writable(&self, fd: impl AsFd, id: u32) -> io::Result<()> {
        self.0.add(fd.as_fd().as_raw_fd(), id, true)
    }

    /// Stops watching `fd`, registered as `id`.
    pub fn remove(&self, fd: impl AsFd, id: u32) -> io::Result<()> {
        self.0.remove(fd.as_fd().as_raw_fd(), id)
    }
}

struct Detached;

impl Watch for Detached {
    fn add(&self, _fd: RawFd, _id: u32, _writable: bool) -> io::Result<()> {
        Ok(())
    }
    fn remove(&self, _fd: RawFd, _id: u32) -> io::Result<()> {
        Ok(())
    }
}

/// Epoll token kinds of the runtime's loop; the low 32 bits carry an index.
pub(crate) mod token {
    /// The control socket.
    pub const CONTROL: u64 = 0;
    /// A data socket; low bits: its slot.
    pub const DATA: u64 = 1 << 32;
    /// A device fd; low bits: the device's id.
    pub const DEVICE: u64 = 2 << 32;
    /// A doorbell eventfd; low bits: the doorbell index.
    pub const DOORBELL: u64 = 3 << 32;
    /// A resample eventfd; low bits: the interrupt line.
    pub const RESAMPLE: u64 = 4 << 32;
    /// A command ring's `kick` eventfd; low bits: the region index.
    pub const RING: u64 = 5 << 32;
    /// Mask of the kind bits.
    pub const KIND_MASK: u64 = !0xffff_ffff;
}

/// One epoll set: the runtime's, shared with the device's [`EventOps`].
#[derive(Debug, Clone)]
pub(crate) struct Epoll(Arc<OwnedFd>);

impl Epoll {
    /// A new close-on-exec epoll set.
    pub(crate) fn new() -> io::Result<Self> {
        let fd = epoll::create(true)?;
        // SAFETY: epoll_create1 just returned this fd and nothing else owns
        // it, so the OwnedFd becomes its only owner.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Epoll(Arc::new(owned)))
    }

    /// Watches `fd` for readability under `token`.
    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.add_events(fd, token, epoll::Events::EPOLLIN)
    }

    /// Watches `fd` for `events` under `token`.
    pub(crate) fn add_events(
        &self,
        fd: RawFd,
        token: u64,
        events: epoll::Events,
    ) -> io::Result<()> {
        epoll::ctl(
            self.0.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            epoll::Event::new(events, token),
        )
    }

    /// Stops watching `fd`.
    pub(crate) fn remove(&self, fd: RawFd) -> io::Result<()> {
        epoll::ctl(
            self.0.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_DEL,
            fd,
            epoll::Event::new(epoll::Events::empty(), 0),
        )
    }

    /// Waits up to `timeout_ms` (-1: forever) for events; retries on EINTR
    /// only when waiting forever (a bounded wait just reports none).
    pub(crate) fn wait(&self, timeout_ms: i32, events: &mut [epoll::Event]) -> io::Result<usize> {
        loop {
            match epoll::wait(self.0.as_raw_fd(), timeout_ms, events) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted && timeout_ms < 0 => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(0),
                other => return other,
            }
        }
    }

    /// The epoll fd itself.
    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// The device's view of this set: its fds under [`token::DEVICE`].
    pub(crate) fn ops(&self) -> EventOps {
        EventOps::new(Arc::new(self.clone()))
    }
}

impl Watch for Epoll {
    fn add(&self, fd: RawFd, id: u32, writable: bool) -> io::Result<()> {
        let events = if writable {
            epoll::Events::EPOLLOUT
        } else {
            epoll::Events::EPOLLIN
        };
        self.add_events(fd, token::DEVICE | u64::from(id), events)
    }
    fn remove(&self, fd: RawFd, _id: u32) -> io::Result<()> {
        Epoll::remove(self, fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn ops_when_fd_added_then_reported_under_device_token_until_removed() {
        let ep = Epoll::new().unwrap_or_else(|e| panic!("{e}"));
        let ops = ep.ops();
        let (a, mut b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        ops.add(&a, 7).unwrap_or_else(|e| panic!("{e}"));
        assert!(ops.add(&a, 7).is_err(), "twice");
        b.write_all(b"x").unwrap_or_else(|e| panic!("{e}"));
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 4];
        let n = ep.wait(0, &mut events).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 1);
        let data = events[0].data;
        assert_eq!(data, token::DEVICE | 7);
        ops.remove(&a, 7).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ep.wait(0, &mut events).unwrap_or_else(|e| panic!("{e}")), 0);
    }

    #[test]
    fn detached_when_used_then_succeeds_without_watching() {
        let ops = EventOps::detached();
        let (a, _b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        assert!(ops.add(&a, 1).is_ok());
        assert!(ops.remove(&a, 1).is_ok());
    }

    #[test]
    fn ops_when_fd_added_writable_then_reported_while_room() {
        let ep = Epoll::new().unwrap_or_else(|e| panic!("{e}"));
        let ops = ep.ops();
        let (a, _b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        ops.add_writable(&a, 3).unwrap_or_else(|e| panic!("{e}"));
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 4];
        assert_eq!(ep.wait(0, &mut events).unwrap_or_else(|e| panic!("{e}")), 1);
        let data = events[0].data;
        assert_eq!(data, token::DEVICE | 3);
        ops.remove(&a, 3).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ep.wait(0, &mut events).unwrap_or_else(|e| panic!("{e}")), 0);
    }
}
