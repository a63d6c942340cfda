//! The peer watch: a backend leaves when its frontend does, even if its
//! event loop is stuck (say, in a write to an fd the frontend manipulated).
//!
//! [`PeerWatch::new`] runs at setup, in [`Backend::new`](super::Backend::new),
//! before any confinement: it takes a pidfd of the frontend's process from
//! the control socket (`SO_PEERPIDFD`, or `SO_PEERCRED` and `pidfd_open` on
//! kernels before 6.5), a duplicate of the control socket and a stop
//! eventfd. A pidfd keeps working after the backend enters a new pid
//! namespace, where the frontend's pid number would mean nothing.
//!
//! [`PeerWatch::run_while`] starts the watch thread only while the event
//! loop runs ([`Backend::run`](super::Backend::run)), so the process stays
//! single-threaded between setup and the loop (a sandbox needs that to
//! unshare a user namespace and fork into a pid namespace). The thread polls
//! the pidfd (readable once the frontend's process has exited) and the
//! control socket (`POLLRDHUP`: the frontend closed or shut down its end).
//! When either fires it gives the loop [`GRACE`] to end on its own, then
//! prints an error and ends the process with status 2.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use log::{debug, warn};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long the event loop may take to end on its own once the frontend is gone.
pub const GRACE: Duration = Duration::from_secs(1);

/// Exit status for a protocol violation or I/O failure (docs/protocol.md section 2.3).
const EXIT_PROTOCOL: i32 = 2;

/// Why the peer watch cannot be set up or started.
#[derive(Debug, Error)]
pub enum Error {
    /// cannot duplicate the control socket
    #[error("cannot duplicate the control socket")]
    Dup(#[source] io::Error),
    /// cannot create the watch's stop eventfd
    #[error("cannot create the watch's stop eventfd")]
    Eventfd(#[source] io::Error),
    /// cannot start the peer watch thread
    #[error("cannot start the peer watch thread")]
    Spawn(#[source] io::Error),
}

/// What the watch thread holds: everything it needs, taken at setup.
#[derive(Debug)]
pub(crate) struct PeerWatch {
    control: OwnedFd,
    pidfd: Option<OwnedFd>,
    stop: EventFd,
    program: String,
}

impl PeerWatch {
    /// Takes the frontend's pidfd and a duplicate of `control`. A frontend
    /// whose pidfd cannot be had (an old kernel without `pidfd_open`, a
    /// peer in a pid namespace we cannot see) is watched through the
    /// control socket alone.
    pub(crate) fn new(control: BorrowedFd<'_>) -> Result<Self, Error> {
        let pidfd = match peer_pidfd(control) {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!("cannot watch the frontend's process, only its control socket: {e}");
                None
            }
        };
        let control = control.try_clone_to_owned().map_err(Error::Dup)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(Error::Eventfd)?;
        let program = std::env::args_os()
            .next()
            .map(std::path::PathBuf::from)
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "outboard".to_owned());
        Ok(PeerWatch {
            control,
            pidfd,
            stop,
            program,
        })
    }

    /// Runs `body` (the event loop) with the watch thread running, and
    /// stops and joins the thread once `body` returns.
    pub(crate) fn run_while<R>(&self, body: impl FnOnce() -> R) -> Result<R, Error> {
        // A stop left over from an earlier run would end this one's watch at once.
        let _ = self.stop.read();
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("peer-watch".to_owned())
                .spawn_scoped(s, || self.watch())
                .map_err(Error::Spawn)?;
            let r = body();
            if let Err(e) = self.stop.write(1) {
                // Cannot happen on our own fresh eventfd; the thread then ends
                // the process once the frontend goes, as it should anyway.
                warn!("cannot stop the peer watch: {e}");
            }
            Ok(r)
        })
    }

    /// The thread: waits for the frontend to go or for the stop signal.
    fn watch(&self) {
        let Some(reason) = self.wait_for_peer() else {
            return;
        };
        debug!("{reason}; waiting {GRACE:?} for the event loop to end");
        let mut stop = [pollfd(self.stop.as_raw_fd(), libc::POLLIN)];
        match poll(&mut stop, GRACE.as_millis() as libc::c_int) {
            Ok(n) if n > 0 => return,
            Ok(_) => {}
            Err(e) => warn!("peer watch: {e}"),
        }
        eprintln!(
            "{}: error: {reason}, and the event loop did not end within {GRACE:?}",
            self.program
        );
        std::process::exit(EXIT_PROTOCOL);
    }

    /// Why the frontend is gone, or `None` when told to stop.
    fn wait_for_peer(&self) -> Option<&'static str> {
        let mut fds = [
            pollfd(self.stop.as_raw_fd(), libc::POLLIN),
            pollfd(self.control.as_raw_fd(), libc::POLLRDHUP),
            // poll ignores a negative fd: no pidfd, no process watch.
            pollfd(
                self.pidfd.as_ref().map_or(-1, |p| p.as_raw_fd()),
                libc::POLLIN,
            ),
        ];
        loop {
            match poll(&mut fds, -1) {
                Ok(_) => {}
                Err(e) => {
                    warn!("peer watch stopped: {e}");
                    return None;
                }
            }
            if fds[0].revents != 0 {
                return None;
            }
            if fds[2].revents != 0 {
                return Some("the frontend's process is gone");
            }
            if fds[1].revents != 0 {
                return Some("the frontend closed the control connection");
            }
        }
    }
}

fn pollfd(fd: libc::c_int, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// `poll` retried on EINTR.
fn poll(fds: &mut [libc::pollfd], timeout: libc::c_int) -> io::Result<libc::c_int> {
    loop {
        // SAFETY: `fds` is a live, writable slice of pollfds and its length
        // is the count passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n >= 0 {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A pidfd of the process at the other end of `sock`.
fn peer_pidfd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are live locals of the sizes passed; the socket
    // stays open for the borrow.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 && fd >= 0 {
        // SAFETY: the kernel just installed this pidfd (close-on-exec) in
        // our table for us; nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let e = io::Error::last_os_error();
    if rc == 0 || e.raw_os_error() != Some(libc::ENOPROTOOPT) {
        return Err(e);
    }
    // Before Linux 6.5: the peer's pid, then a pidfd for it. The pid could
    // have been reused if the frontend died in between; it is taken at once.
    pidfd_open(peer_pid(sock)?)
}

pub(crate) use outboard_protocol::wait::pidfd_open;

/// The pid of the process at the other end of `sock` (`SO_PEERCRED`).
fn peer_pid(sock: BorrowedFd<'_>) -> io::Result<libc::pid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals of the sizes passed; the
    // socket stays open for the borrow.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if cred.pid <= 0 {
        // The peer is in a pid namespace we cannot see.
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(cred.pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn run_while_when_body_returns_then_thread_stopped_and_result_given() {
        let (a, _b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let w = PeerWatch::new(a.as_fd()).unwrap_or_else(|e| panic!("{e}"));
        assert!(w.pidfd.is_some(), "a socketpair's peer is this process");
        assert_eq!(w.run_while(|| 7).ok(), Some(7));
        assert_eq!(w.run_while(|| 8).ok(), Some(8), "runs again");
    }
}
