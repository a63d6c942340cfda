//! The event loop: wait on the epoll set and dispatch each ready fd to the
//! control, data, doorbell, resample or device handler. [`Backend::run`]
//! blocks; [`Backend::process_ready`] serves what is ready and returns, for
//! callers that poll the backend's fd from their own loop.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::{Backend, Error, Flow};
use crate::device::Device;
use crate::events::token;

/// Events taken from the epoll set per wait.
const EVENTS_PER_WAIT: usize = 32;
/// Rounds of ring service one [`Backend::process_ready`] call makes at most.
const ONCE_ROUNDS: usize = 16;
/// Spin rounds between two looks at the epoll set and two offers of the
/// CPU to other processes.
const SPIN_CHECK: u32 = 64;
/// A `sched_yield` that took this long let another process run: the CPU
/// is shared, and the spin ends.
const CONTENDED: Duration = Duration::from_micros(5);

impl<D: Device> Backend<D> {
    /// Serves until the frontend disconnects or shuts the device down.
    ///
    /// While it runs, a second thread watches the frontend's process and
    /// the control socket: once either is gone, the loop has
    /// [`GRACE`](super::GRACE) to end on its own before that thread ends the
    /// process with status 2 (docs/protocol.md section 8.2). The thread
    /// exists only while `run` does.
    pub fn run(&mut self) -> Result<(), Error> {
        let Some(watch) = self.watch.take() else {
            return self.serve();
        };
        let result = watch.run_while(|| self.serve());
        self.watch = Some(watch);
        result.map_err(Error::Watch)?
    }

    fn serve(&mut self) -> Result<(), Error> {
        let result = loop {
            match self.poll(-1) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Exit) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        if self.data.has_rings() {
            let s = self.data.spin_stats;
            log::info!(
                "command rings: {} batches met spinning, {} spins ran out, {} cut short \
                 for another process, {} sleeps; spin budget now {:?}",
                s.caught,
                s.ran_out,
                s.contended,
                s.sleeps,
                self.data.spin.budget()
            );
        }
        result
    }

    /// Serves one batch of whatever is ready (up to 32 ready fds) without
    /// blocking, and returns. Poll [`AsRawFd::as_raw_fd`] for readability
    /// to know when to call it again; [`Flow::Exit`] means the frontend has
    /// gone and the backend should be dropped.
    pub fn process_ready(&mut self) -> Result<Flow, Error> {
        self.poll(0)
    }

    fn poll(&mut self, timeout_ms: i32) -> Result<Flow, Error> {
        if self.paused {
            return self.poll_control(timeout_ms);
        }
        if timeout_ms == 0 && self.data.has_rings() {
            return self.poll_rings_once();
        }
        // With command rings, a blocking wait first polls them for the spin
        // budget, then marks them asleep (and looks once more) before it blocks.
        let rings = self.data.has_rings();
        if rings {
            if self.spin()? == Flow::Exit {
                return Ok(Flow::Exit);
            }
            if self.paused {
                return Ok(Flow::Continue);
            }
            if !self.data.arm_sleep()? {
                // A command came after the spin (or there was no spin): serve it.
                self.data
                    .serve_rings(&mut self.device, self.state.as_mut())?;
                return Ok(Flow::Continue);
            }
        }
        let slept = Instant::now();
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); EVENTS_PER_WAIT];
        let waited = self.epoll.wait(timeout_ms, &mut events);
        if rings {
            self.data.spin_stats.sleeps += 1;
            self.data.disarm_sleep();
            self.data.spin.slept(slept.elapsed());
        }
        let n = waited.map_err(Error::Epoll)?;
        self.dispatch_all(&events[..n])
    }

    /// [`Backend::process_ready`] with command rings: serves what the rings
    /// and the epoll set hold, then leaves the rings marked asleep, so that
    /// the next command kicks the epoll fd the caller polls.
    fn poll_rings_once(&mut self) -> Result<Flow, Error> {
        self.data.disarm_sleep();
        self.data
            .serve_rings(&mut self.device, self.state.as_mut())?;
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); EVENTS_PER_WAIT];
        let n = self.epoll.wait(0, &mut events).map_err(Error::Epoll)?;
        if self.dispatch_all(&events[..n])? == Flow::Exit {
            return Ok(Flow::Exit);
        }
        for _ in 0..ONCE_ROUNDS {
            if self.paused || self.data.arm_sleep()? {
                return Ok(Flow::Continue);
            }
            self.data
                .serve_rings(&mut self.device, self.state.as_mut())?;
        }
        // Still busy: keep the epoll fd readable for the caller's next turn.
        self.data.kick_self();
        Ok(Flow::Continue)
    }

    fn dispatch_all(&mut self, events: &[epoll::Event]) -> Result<Flow, Error> {
        for ev in events {
            if self.dispatch(ev.data)? == Flow::Exit {
                return Ok(Flow::Exit);
            }
        }
        Ok(Flow::Continue)
    }

    /// Polls the command rings until a whole spin budget passes with
    /// nothing to serve. Every [`SPIN_CHECK`] rounds the other fds get a
    /// turn (control requests, doorbells, device events), and so does any
    /// other process waiting for this CPU; if one was, the spin ends.
    fn spin(&mut self) -> Result<Flow, Error> {
        let budget = self.data.spin.budget();
        if budget.is_zero() {
            return Ok(Flow::Continue);
        }
        let mut idle_since = Instant::now();
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); EVENTS_PER_WAIT];
        for round in 1u32.. {
            if self
                .data
                .serve_rings(&mut self.device, self.state.as_mut())?
            {
                idle_since = Instant::now();
                self.data.spin_stats.caught += 1;
            }
            if round % SPIN_CHECK == 0 {
                let n = self.epoll.wait(0, &mut events).map_err(Error::Epoll)?;
                if n > 0 {
                    if self.dispatch_all(&events[..n])? == Flow::Exit {
                        return Ok(Flow::Exit);
                    }
                    if self.paused {
                        return Ok(Flow::Continue);
                    }
                }
                if idle_since.elapsed() >= budget {
                    self.data.spin_stats.ran_out += 1;
                    break;
                }
                // Another process wanting this CPU is served at once: a
                // yield that took long means one ran, and a spin that
                // keeps others from the CPU is not worth it.
                let yielded = Instant::now();
                // SAFETY: sched_yield takes no arguments and only gives up the CPU.
                unsafe { libc::sched_yield() };
                if yielded.elapsed() >= CONTENDED {
                    self.data.spin_stats.contended += 1;
                    self.data.spin.contended();
                    break;
                }
            }
            std::hint::spin_loop();
        }
        Ok(Flow::Continue)
    }

    /// After SAVE_STATE: waits on the control socket alone, so doorbells,
    /// data and device fds stay untouched for the next instance.
    fn poll_control(&mut self, timeout_ms: i32) -> Result<Flow, Error> {
        let mut p = libc::pollfd {
            fd: self.control.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the call only.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(Flow::Continue);
            }
            return Err(Error::Epoll(e));
        }
        if n == 0 {
            return Ok(Flow::Continue);
        }
        self.serve_control()
    }

    fn dispatch(&mut self, tok: u64) -> Result<Flow, Error> {
        let index = (tok & !token::KIND_MASK) as usize;
        match tok & token::KIND_MASK {
            token::RING => {
                self.data
                    .kicked(index, &mut self.device, self.state.as_mut())?;
                return Ok(Flow::Continue);
            }
            token::DATA => {
                self.data
                    .serve(index, &mut self.device, &self.epoll, self.state.as_mut())?;
                return Ok(Flow::Continue);
            }
            token::DEVICE => {
                let ops = self.ops.clone();
                self.device.handle_event(index as u32, &ops);
            }
            token::DOORBELL => {
                if let Some(count) = self.resources.take_doorbell(index) {
                    self.device.doorbell(index, count);
                }
            }
            token::RESAMPLE => {
                if self.resources.take_resample(index) {
                    self.device.resample(index);
                }
            }
            _ => {
                let flow = self.serve_control()?;
                self.keep_state();
                return Ok(flow);
            }
        }
        self.keep_state();
        Ok(Flow::Continue)
    }

    /// Commits the device's state if it changed (after doorbells, device
    /// events and control requests; data accesses commit before answering).
    fn keep_state(&mut self) {
        if let Some(k) = self.state.as_mut() {
            k.keep(&self.device, self.data.served());
        }
    }
}

impl<D: Device> AsRawFd for Backend<D> {
    /// The epoll fd: readable whenever [`Backend::process_ready`] has work.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.raw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::testutil::{
        backend, hello, place, put, readable, reply, send, status, TestDevice, WATCH_ID,
    };
    use outboard_protocol::control::{ObjectIndex, Payload, Request, SetIrq, Status, IRQ_RESAMPLE};
    use outboard_protocol::{AccessSize, Cmd};
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::eventfd::EventFd;

    fn eventfd() -> EventFd {
        EventFd::new(0).unwrap_or_else(|e| panic!("{e}"))
    }

    fn clone(e: &EventFd) -> EventFd {
        e.try_clone().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn process_ready_when_nothing_ready_then_returns_at_once() {
        let (mut b, _ch) = backend(TestDevice::default());
        assert_eq!(b.process_ready().ok(), Some(Flow::Continue));
        assert!(!readable(b.as_raw_fd()));
    }

    #[test]
    fn as_raw_fd_when_frontend_sends_then_readable_and_served() {
        let (mut b, ch) = backend(TestDevice::default());
        hello(&mut b, &ch);
        let mut data = place(&mut b, &ch, 0, 0, 1);
        put(&mut data, &Cmd::read(1, 0, AccessSize::B1).encode());
        assert!(readable(b.as_raw_fd()), "epoll fd signals work");
        assert_eq!(b.process_ready().ok(), Some(Flow::Continue));
        let mut resp = [0u8; 32];
        data.read_exact(&mut resp).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp[0], 0x88);
        assert!(!readable(b.as_raw_fd()));
    }

    #[test]
    fn process_ready_when_doorbell_resample_and_device_fd_ready_then_each_dispatched() {
        let (watch, mut peer) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (mut b, ch) = backend(TestDevice {
            watch: Some(watch),
            ..TestDevice::default()
        });
        hello(&mut b, &ch);
        let bell = eventfd();
        let idx = ObjectIndex { index: 0 }.encode();
        send(
            &ch,
            Request::SetDoorbell,
            &idx,
            &[clone(&bell).into_raw_fd()],
        );
        assert_eq!(status(&reply(&mut b, &ch)), Status::Ok);
        let (line, resample) = (eventfd(), eventfd());
        let set = SetIrq {
            index: 1,
            flags: IRQ_RESAMPLE,
        };
        let fds = [clone(&line).into_raw_fd(), clone(&resample).into_raw_fd()];
        send(&ch, Request::SetIrq, &set.encode(), &fds);
        assert_eq!(status(&reply(&mut b, &ch)), Status::Ok);
        for fd in fds {
            // SAFETY: these are the clones sent above, still open and ours.
            drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        }
        bell.write(3).unwrap_or_else(|e| panic!("{e}"));
        resample.write(1).unwrap_or_else(|e| panic!("{e}"));
        peer.write_all(b"x").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.process_ready().ok(), Some(Flow::Continue));
        let d = b.device();
        assert_eq!(d.doorbells, vec![(0, 3)]);
        assert_eq!(d.lines, vec![1]);
        assert_eq!(d.resamples, vec![1]);
        assert_eq!(d.events, vec![WATCH_ID]);
    }

    #[test]
    fn process_ready_when_commands_on_a_ring_then_epoll_fd_readable_and_answered() {
        use outboard_protocol::control::SetCmdRing;
        use outboard_protocol::ring::Ring;
        let (mut b, ch) = backend(TestDevice::default());
        hello(&mut b, &ch);
        let _data = place(&mut b, &ch, 0, 0, 1);
        let (ring, memfd) = Ring::create(8).unwrap_or_else(|e| panic!("{e}"));
        let (kick, notify) = (eventfd(), eventfd());
        let fds = [memfd.as_raw_fd(), kick.as_raw_fd(), notify.as_raw_fd()];
        let set = SetCmdRing {
            index: 0,
            entries: 8,
        };
        send(&ch, Request::SetCmdRing, &set.encode(), &fds);
        assert_eq!(status(&reply(&mut b, &ch)), Status::Ok);
        assert_eq!(b.process_ready().ok(), Some(Flow::Continue));
        assert!(!readable(b.as_raw_fd()), "idle, rings marked asleep");
        ring.put(0, &Cmd::read(1, 0, AccessSize::B1).encode());
        assert!(ring.publish(1), "the backend said it sleeps");
        kick.write(1).unwrap_or_else(|e| panic!("{e}"));
        assert!(readable(b.as_raw_fd()), "the kick wakes the caller's poll");
        assert_eq!(b.process_ready().ok(), Some(Flow::Continue));
        let answer = ring.response(0, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer, Some(0x88));
    }

    #[test]
    fn run_when_reset_then_shutdown_then_served_in_order_and_ok() {
        let (mut b, ch) = backend(TestDevice::default());
        hello(&mut b, &ch);
        let mut data = place(
            &mut b,
            &ch,
            0,
            outboard_protocol::control::SET_REGION_POSTED,
            1,
        );
        put(
            &mut data,
            &Cmd::write(1, 0, AccessSize::B4, 7, true).encode(),
        );
        send(&ch, Request::Reset, &[], &[]);
        send(&ch, Request::Shutdown, &[], &[]);
        assert!(b.run().is_ok());
        assert_eq!(
            b.device().writes.len(),
            1,
            "posted write served before RESET"
        );
        assert_eq!(b.device().resets, 1);
        assert_eq!(
            status(&ch.recv().unwrap_or_else(|e| panic!("{e}"))),
            Status::Ok
        );
    }
}
