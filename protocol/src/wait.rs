//! Bounded waits on sockets and eventfds that a peer can manipulate.
//!
//! * [`Deadline`]: one deadline for a whole exchange (a reply, an access),
//!   so that a peer trickling one byte at a time cannot stretch a timeout
//!   that would otherwise restart with every `read`.
//! * [`recv_some`] and [`send_some`]: one transfer that waits, with `poll`,
//!   at most until the deadline; they first try without waiting so the
//!   common case costs one syscall.
//! * [`signal_eventfd`]: adds 1 to an eventfd without ever blocking. The
//!   eventfd's open file description is shared with the peer that passed
//!   it, and that peer can clear `O_NONBLOCK` on it and raise its counter to
//!   the maximum, which would make a plain `write` block forever.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Why a bounded transfer failed.
#[derive(Debug, Error)]
pub enum Error {
    /// the deadline passed
    #[error("timed out waiting for the peer")]
    Timeout,
    /// the socket or eventfd failed
    #[error("I/O failed")]
    Io(#[source] io::Error),
}

/// When an exchange must be over; `None` inside means never.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Option<Instant>);

impl Deadline {
    /// `timeout` from now; `None` waits forever.
    pub fn after(timeout: Option<Duration>) -> Self {
        Deadline(timeout.map(|t| Instant::now() + t))
    }

    /// The time left, rounded up to whole milliseconds for `poll`: `-1` for
    /// forever, `None` once the deadline has passed.
    pub fn poll_timeout(&self) -> Option<libc::c_int> {
        let Some(at) = self.0 else {
            return Some(-1);
        };
        let left = at.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        let ms = left.as_nanos().div_ceil(1_000_000);
        Some(libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX))
    }

    /// Waits until `fd` reports one of `events` (or an error or hang-up,
    /// which the following transfer will report), or the deadline passes.
    pub fn wait(&self, fd: BorrowedFd<'_>, events: libc::c_short) -> Result<(), Error> {
        loop {
            let timeout = self.poll_timeout().ok_or(Error::Timeout)?;
            match poll_one(fd, events, timeout) {
                Ok(0) => return Err(Error::Timeout),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }
}

/// `poll` on one fd; returns the number of ready fds (0 or 1).
fn poll_one(fd: BorrowedFd<'_>, events: libc::c_short, timeout: libc::c_int) -> io::Result<i32> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: `p` is one live pollfd and the count passed is 1; the fd stays
    // open for the borrow.
    let n = unsafe { libc::poll(&mut p, 1, timeout) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// Receives at least one byte into `buf` (0 means EOF), waiting at most
/// until `deadline`. Tries a non-blocking `recv` first and polls only when
/// nothing is there yet.
pub fn recv_some(fd: BorrowedFd<'_>, buf: &mut [u8], deadline: &Deadline) -> Result<usize, Error> {
    loop {
        // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes and
        // the fd stays open for the borrow.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => deadline.wait(fd, libc::POLLIN)?,
            _ => return Err(Error::Io(e)),
        }
    }
}

/// Sends what fits of `buf` now (never raising SIGPIPE): `None` when the
/// socket's buffer is full.
pub fn try_send(fd: BorrowedFd<'_>, buf: &[u8]) -> Result<Option<usize>, Error> {
    loop {
        // SAFETY: `buf` is a live slice of `buf.len()` bytes and the fd
        // stays open for the borrow.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(Error::Io(e)),
        }
    }
}

/// Sends at least one byte of `buf` (never raising SIGPIPE), waiting at
/// most until `deadline`. Tries without waiting first and polls only when
/// the socket's buffer is full.
pub fn send_some(fd: BorrowedFd<'_>, buf: &[u8], deadline: &Deadline) -> Result<usize, Error> {
    loop {
        if let Some(n) = try_send(fd, buf)? {
            return Ok(n);
        }
        deadline.wait(fd, libc::POLLOUT)?;
    }
}

/// What [`signal_eventfd`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The counter was incremented.
    Sent,
    /// The counter is full: an earlier signal is still pending, unread.
    Pending,
}

/// Adds 1 to the eventfd `fd` without blocking, whatever its `O_NONBLOCK`
/// flag says (the peer shares the open file description and may clear
/// it). A full counter (`0xffff_ffff_ffff_fffe`) means the reader has a
/// signal pending already, so nothing is lost by not adding to it.
///
/// A peer that fills the counter between the `poll` and the `write` can
/// still block the caller; backends therefore also watch their frontend and
/// exit when it goes (the backend runtime's peer watch).
pub fn signal_eventfd(fd: &impl AsRawFd) -> Result<Signal, Error> {
    // SAFETY: `fd` is borrowed for this call, so its descriptor stays open.
    let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    loop {
        match poll_one(fd, libc::POLLOUT, 0) {
            Ok(0) => return Ok(Signal::Pending),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
    let one = 1u64.to_ne_bytes();
    loop {
        // SAFETY: `one` is a live 8-byte buffer, the size an eventfd write
        // takes; the fd stays open for the borrow.
        let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n >= 0 {
            return Ok(Signal::Sent);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Ok(Signal::Pending),
            _ => return Err(Error::Io(e)),
        }
    }
}

/// A pidfd for process `pid` (`pidfd_open`, close-on-exec): readable once
/// the process has exited, whatever fds it shared.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open just returned this new fd (close-on-exec); we own it.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as libc::c_int) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    /// A blocking eventfd whose counter is one short of full.
    fn full_blocking_eventfd() -> OwnedFd {
        // SAFETY: eventfd takes no pointers; a negative result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: eventfd just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let v = (u64::MAX - 1).to_ne_bytes();
        // SAFETY: `v` is a live 8-byte buffer; the fd is open.
        let n = unsafe { libc::write(fd.as_raw_fd(), v.as_ptr().cast(), 8) };
        assert_eq!(n, 8);
        fd
    }

    #[test]
    fn signal_eventfd_when_counter_full_and_blocking_then_pending_without_blocking() {
        let fd = full_blocking_eventfd();
        assert_eq!(signal_eventfd(&fd).ok(), Some(Signal::Pending));
        let mut v = [0u8; 8];
        // SAFETY: `v` is a live 8-byte buffer; the fd is open.
        let n = unsafe { libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(signal_eventfd(&fd).ok(), Some(Signal::Sent));
    }

    #[test]
    fn recv_some_when_peer_silent_then_timeout_and_data_when_sent() {
        let (mut a, b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let d = Deadline::after(Some(Duration::from_millis(20)));
        let mut buf = [0u8; 4];
        assert!(matches!(
            recv_some(b.as_fd(), &mut buf, &d),
            Err(Error::Timeout)
        ));
        a.write_all(b"xy").unwrap_or_else(|e| panic!("{e}"));
        let d = Deadline::after(None);
        assert_eq!(recv_some(b.as_fd(), &mut buf, &d).ok(), Some(2));
        drop(a);
        assert_eq!(recv_some(b.as_fd(), &mut buf, &d).ok(), Some(0));
    }

    #[test]
    fn send_some_when_buffer_full_then_timeout() {
        let (a, _b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let chunk = [0u8; 4096];
        let d = Deadline::after(Some(Duration::from_millis(20)));
        let mut sent = 0usize;
        let e = loop {
            match send_some(a.as_fd(), &chunk, &d) {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
            assert!(sent < 64 << 20, "the buffer never filled");
        };
        assert!(matches!(e, Error::Timeout));
    }
}
