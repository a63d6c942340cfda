//! The frontend's half of a region's command ring (docs/protocol.md
//! section 7.11): commands go into shared memory, and the backend is
//! kicked only when its flag says it sleeps.
//!
//! A caller holds the region's lock, so there is one producer and at most
//! one synchronous access outstanding, exactly as on the data socket. It
//! waits for an answer (or for room in a full ring) by spinning for an
//! adaptive budget, then by sleeping in `poll` on the `notify` eventfd and
//! the data socket, whose hang-up says the backend is gone, and on the
//! backend's pidfd where the frontend spawned it (readable once the
//! process died, even if another process still holds its sockets): its
//! death is noticed without any read, within the access's deadline. The budget
//! doubles when a spin meets the answer and halves when it runs out or
//! when a `sched_yield` shows another process wanted the CPU (perhaps the
//! very backend it waits for). Every index the
//! backend wrote is checked before it is used; a lie fails the device.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use outboard_protocol::control::SetCmdRing;
use outboard_protocol::ioregionfd::Cmd;
use outboard_protocol::ring::{self, Ring, SpinBudget};
use outboard_protocol::wait::{self, Deadline};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{self, Connection};
use crate::bus::AccessError;

/// The longest the frontend spins for an answer before it sleeps: about
/// what waking a sleeping process on another CPU costs on a nested VM, so
/// an access to a backend that had gone to sleep is still met spinning.
pub(crate) const SPIN_MAX: Duration = Duration::from_micros(100);
/// The shortest: the caller waits anyway, and a spin this short both
/// catches an awake backend's answer and lets the budget learn again.
const SPIN_FLOOR: Duration = Duration::from_micros(2);
/// Spin rounds between two looks at the clock.
const CLOCK_EVERY: u32 = 64;
/// After spinning this long, the spin offers the CPU to other processes
/// at every look at the clock (the backend may be waiting for this CPU).
const YIELD_AFTER: Duration = Duration::from_micros(5);
/// A `sched_yield` that took this long let another process run.
const CONTENDED: Duration = Duration::from_micros(5);

/// Why a ring could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// cannot make the ring
    #[error("cannot make the ring")]
    Ring(#[source] ring::Error),
    /// cannot make the ring's eventfds
    #[error("cannot make the ring's eventfds")]
    Eventfd(#[source] std::io::Error),
    /// the backend refused the ring
    #[error("the backend refused the ring")]
    Refused(#[source] backend::Error),
}

/// One region's ring, as the frontend drives it.
#[derive(Debug)]
pub(crate) struct RingLink {
    ring: Ring,
    /// Commands published.
    tail: u32,
    /// Commands the backend has consumed, as last read (and checked).
    head: u32,
    /// Sequence of the last answer taken.
    answered: u32,
    kick: EventFd,
    notify: EventFd,
    spin: SpinBudget,
    /// The backend's process, where the frontend knows it (a spawned
    /// backend): readable once it died, whoever still holds its sockets.
    pidfd: Option<OwnedFd>,
}

impl RingLink {
    /// Makes a ring of `entries` entries for region `region` and hands it
    /// to the backend with SET_CMD_RING.
    pub(crate) fn set_up(conn: &Connection, region: u32, entries: u32) -> Result<Self, Error> {
        let (ring, memfd) = Ring::create(entries).map_err(Error::Ring)?;
        let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::Eventfd)?;
        let notify =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::Eventfd)?;
        conn.set_cmd_ring(
            &SetCmdRing {
                index: region,
                entries,
            },
            [memfd.as_raw_fd(), kick.as_raw_fd(), notify.as_raw_fd()],
        )
        .map_err(Error::Refused)?;
        // Taken while the backend has just answered, so the pid is its own.
        let pidfd = conn
            .pid()
            .and_then(|p| libc::pid_t::try_from(p).ok())
            .and_then(|p| wait::pidfd_open(p).ok());
        Ok(RingLink {
            ring,
            tail: 0,
            head: 0,
            answered: 0,
            kick,
            notify,
            spin: SpinBudget::with_floor(SPIN_MAX, SPIN_FLOOR),
            pidfd,
        })
    }

    /// Sends `cmd` and, if it asks for one, waits for its answer, all
    /// within `timeout`. `sock` is the region's data socket, watched for
    /// the backend's hang-up only.
    pub(crate) fn exchange(
        &mut self,
        cmd: &Cmd,
        sock: &UnixStream,
        timeout: Duration,
    ) -> Result<u64, AccessError> {
        let entries = self.ring.entries();
        // Started only when the access has to wait: a posted write into a
        // ring with room reads no clock at all.
        let mut deadline = None;
        if self.tail.wrapping_sub(self.head) >= entries {
            let tail = self.tail;
            let seen = self.head;
            let deadline = deadline.get_or_insert_with(|| Deadline::after(Some(timeout)));
            self.head = self.wait(sock, deadline, |r| {
                let head = r.consumed(seen, tail)?;
                Ok((tail.wrapping_sub(head) < entries).then_some(head))
            })?;
        }
        let pos = self.tail;
        self.ring.put(pos, &cmd.encode());
        self.tail = pos.wrapping_add(1);
        if self.ring.publish(self.tail) {
            wait::signal_eventfd(&self.kick).map_err(super::access_error)?;
        }
        if !cmd.resp {
            return Ok(0);
        }
        let answered = self.answered;
        let deadline = deadline.get_or_insert_with(|| Deadline::after(Some(timeout)));
        let data = self.wait(sock, deadline, |r| r.response(pos, answered))?;
        self.answered = pos.wrapping_add(1);
        // The answer comes after every command up to it was consumed: the
        // backend stores `head` first, so it must read exactly `tail` now.
        let head = self
            .ring
            .consumed(self.head, self.tail)
            .map_err(AccessError::CorruptRing)?;
        if head != self.tail {
            return Err(AccessError::CorruptRing(ring::Error::Corrupt {
                what: "head after the answer",
                got: head,
                base: self.head,
                tail: self.tail,
                entries,
            }));
        }
        self.head = head;
        Ok(data)
    }

    /// Polls `check` until it yields: spinning for the budget, then asleep
    /// on `notify` (with the flag set, and one more look after setting it)
    /// until the deadline.
    fn wait<T>(
        &mut self,
        sock: &UnixStream,
        deadline: &Deadline,
        mut check: impl FnMut(&Ring) -> Result<Option<T>, ring::Error>,
    ) -> Result<T, AccessError> {
        let corrupt = AccessError::CorruptRing;
        let budget = self.spin.budget();
        let start = Instant::now();
        for round in 1u32.. {
            if let Some(v) = check(&self.ring).map_err(corrupt)? {
                if round > 1 {
                    self.spin.caught();
                }
                return Ok(v);
            }
            if round % CLOCK_EVERY == 0 {
                let spun = start.elapsed();
                if spun >= budget {
                    self.spin.missed();
                    break;
                }
                if spun >= YIELD_AFTER {
                    let t = Instant::now();
                    // SAFETY: sched_yield takes no arguments and only gives up the CPU.
                    unsafe { libc::sched_yield() };
                    if t.elapsed() >= CONTENDED {
                        // Someone, perhaps the backend, wanted this CPU.
                        self.spin.contended();
                        break;
                    }
                }
            }
            std::hint::spin_loop();
        }
        loop {
            self.ring.set_frontend_waiting(true);
            if let Some(v) = check(&self.ring).map_err(corrupt)? {
                self.ring.set_frontend_waiting(false);
                return Ok(v);
            }
            let woke = self.sleep(sock, deadline);
            self.ring.set_frontend_waiting(false);
            // An answer may have come with the hang-up or the deadline.
            if let Some(v) = check(&self.ring).map_err(corrupt)? {
                return Ok(v);
            }
            woke?;
        }
    }

    /// Sleeps until `notify` is signalled, the backend hangs up or exits,
    /// or the deadline passes.
    fn sleep(&self, sock: &UnixStream, deadline: &Deadline) -> Result<(), AccessError> {
        let pid = libc::pollfd {
            fd: self.pidfd.as_ref().map_or(-1, |p| p.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [
            libc::pollfd {
                fd: self.notify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sock.as_fd().as_raw_fd(),
                // Hang-up only: bytes a backend writes there mean nothing here.
                events: libc::POLLRDHUP,
                revents: 0,
            },
            // A negative fd is skipped by poll.
            pid,
        ];
        let ms = deadline.poll_timeout().ok_or(AccessError::Timeout)?;
        // SAFETY: three valid pollfds in a live array, for the call only.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(AccessError::Io(e));
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // Nonblocking; the counter only says "look again".
            let _ = self.notify.read();
        }
        if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
            || fds[2].revents & libc::POLLIN != 0
        {
            return Err(AccessError::BackendGone);
        }
        if n == 0 && deadline.poll_timeout().is_none() {
            return Err(AccessError::Timeout);
        }
        Ok(())
    }
}
