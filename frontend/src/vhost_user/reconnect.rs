//! Reconnecting to a restarted vhost-user backend: the device's [`Link`]
//! state and the [`Recovery`] thread that acts on it.
//!
//! A [`Link`] says whether the device's vhost-user connection is usable. It
//! is `Up` while the connection works, `Down` from the moment the backend is
//! lost (the watchdog saw it hang up, or a request failed on the socket)
//! until a new connection has been set up again, and `Failed` for good once
//! the device's [`RestartPolicy`] says no more. Every connection has a
//! generation number, so news about an old connection never touches the
//! current one.
//!
//! With `restart = "on-failure"` the [`Recovery`] thread waits for the link
//! to go down, waits the policy's backoff, connects to the same socket path
//! again (retrying while nothing listens, for up to the frontend's
//! timeout), and has the backend replay the device's state on the new
//! connection under the register lock ([`super::backend::Backend::restore`]).
//! Each attempt counts against the policy's limit; past it the device fails
//! as it does without a restart policy (DEVICE_NEEDS_RESET).

use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};

use vm_memory::{Bytes, GuestAddress};

use super::{Error, Inner};
use crate::health::Health;
use crate::irq::IrqLine;
use crate::memory::GuestRam;
use crate::restart::{RestartMode, RestartPolicy};

/// A restart that lives shorter than this counts as a quick death: the
/// next backoff doubles (see [`RestartPolicy::delay`]).
const QUICK: Duration = Duration::from_secs(1);

/// Where the device's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The connection of the current generation works.
    Up,
    /// The backend was lost; the recovery is reconnecting.
    Down,
    /// The device failed for good.
    Failed,
    /// The device is being dropped.
    Closed,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// The connection in use (`Up`) or being set up (`Down`).
    generation: u64,
    /// The connection being set up was lost before it came up.
    attempt_lost: bool,
    /// Reconnection attempts so far (what the policy's limit counts).
    attempts: u32,
    /// Successful reconnections so far.
    reconnects: u32,
}

/// The rings a lost backend was serving, as [`Link::settled`] needs them.
#[derive(Debug, Default)]
pub(super) struct Rings {
    /// Guest RAM.
    pub(super) ram: Option<Arc<GuestRam>>,
    /// (queue, available ring, used ring) of every ready queue the driver
    /// activated; empty while it has not.
    pub(super) queues: Vec<(usize, u64, u64)>,
    /// The backend keeps an inflight region (INFLIGHT_SHMFD).
    pub(super) inflight: bool,
}

/// The state of a vhost-user device's connection, shared by the register
/// path, the watchdogs and the recovery thread.
#[derive(Debug)]
pub(super) struct Link {
    name: String,
    policy: RestartPolicy,
    health: Arc<Health>,
    irq: IrqLine,
    state: Mutex<State>,
    changed: Condvar,
    rings: Mutex<Rings>,
}

impl Link {
    /// A link whose first connection (generation 0) is up.
    pub(super) fn new(
        name: &str,
        policy: RestartPolicy,
        health: Arc<Health>,
        irq: IrqLine,
    ) -> Arc<Self> {
        Arc::new(Link {
            name: name.to_owned(),
            policy,
            health,
            irq,
            state: Mutex::new(State {
                phase: Phase::Up,
                generation: 0,
                attempt_lost: false,
                attempts: 0,
                reconnects: 0,
            }),
            changed: Condvar::new(),
            rings: Mutex::new(Rings::default()),
        })
    }

    /// Updates what [`Link::settled`] looks at.
    pub(super) fn set_rings(&self, f: impl FnOnce(&mut Rings)) {
        f(&mut self.rings.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Whether a new backend can resume where a lost one stopped. With an
    /// inflight region it can: the backend resubmits what the old one had
    /// taken and not completed. Without one, the frontend cannot tell which
    /// chains the old backend had taken and which of those it completed (a
    /// backend may complete them out of order, as qemu-storage-daemon
    /// does), so a new one resumes only from a settled ring: every chain
    /// made available has been used. Otherwise [`Error::InFlight`]:
    /// resuming could lose a request or complete one twice.
    pub(super) fn settled(&self) -> Result<(), Error> {
        let rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        if rings.inflight || rings.queues.is_empty() {
            return Ok(());
        }
        let ram = rings.ram.as_ref().ok_or(Error::NoMemory)?;
        let index = |queue: usize, ring: u64| -> Result<u16, Error> {
            ram.memory()
                .load(GuestAddress(ring.wrapping_add(2)), Ordering::Acquire)
                .map_err(|source| Error::RingIndex { queue, source })
        };
        for &(queue, avail, used) in &rings.queues {
            let (avail, used) = (index(queue, avail)?, index(queue, used)?);
            if avail != used {
                return Err(Error::InFlight { queue, avail, used });
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The device's health (failed only once the link failed for good).
    pub(super) fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// True when a lost backend is to be reconnected.
    pub(super) fn restarts(&self) -> bool {
        self.policy.mode == RestartMode::OnFailure
    }

    /// Whether a request may go out on connection `generation`: while it is
    /// the one in use, or (`probation`) while the recovery sets it up.
    pub(super) fn admit(&self, generation: u64, probation: bool) -> Result<(), Error> {
        let s = self.lock();
        match s.phase {
            Phase::Up if s.generation == generation => Ok(()),
            Phase::Down if probation && s.generation == generation => Ok(()),
            Phase::Up | Phase::Down => Err(Error::Reconnecting),
            Phase::Failed | Phase::Closed => Err(Error::Failed),
        }
    }

    /// True while the recovery is reconnecting.
    pub(super) fn is_down(&self) -> bool {
        self.lock().phase == Phase::Down
    }

    /// Connection `generation` is gone (`why`). The current connection's
    /// loss starts a reconnection, or fails the device when the policy
    /// allows no restart; a connection being set up just fails its attempt.
    pub(super) fn lost(&self, generation: u64, why: &Error) {
        let mut s = self.lock();
        if s.generation != generation {
            return;
        }
        match s.phase {
            Phase::Up if self.restarts() => {
                warn!(
                    "device {}: vhost-user backend lost ({})",
                    self.name,
                    outboard_protocol::error_chain(why)
                );
                // At once, before the guest makes more chains available.
                if let Err(e) = self.settled() {
                    drop(s);
                    self.fail(&e);
                    return;
                }
                info!("device {}: reconnecting", self.name);
                s.phase = Phase::Down;
                self.changed.notify_all();
            }
            Phase::Up => {
                drop(s);
                self.fail(why);
            }
            Phase::Down => s.attempt_lost = true,
            Phase::Failed | Phase::Closed => {}
        }
    }

    /// Connection `generation` outlived a deadline: the backend may still
    /// be running the rings, so the device fails for good.
    pub(super) fn overdue(&self, generation: u64) {
        if self.lock().generation == generation {
            self.fail(&Error::Timeout);
        }
    }

    /// Fails the device for good: its health records `why`, the driver sees
    /// DEVICE_NEEDS_RESET and a configuration interrupt wakes it.
    pub(super) fn fail(&self, why: &dyn std::error::Error) {
        {
            let mut s = self.lock();
            if matches!(s.phase, Phase::Failed | Phase::Closed) {
                return;
            }
            s.phase = Phase::Failed;
            self.changed.notify_all();
        }
        self.health.fail(why);
        // Wake a driver waiting for a completion: it reads the failure.
        if let Err(e) = outboard_protocol::wait::signal_eventfd(self.irq.eventfd()) {
            warn!("device {}: interrupt after failure: {e}", self.name);
        }
    }

    /// Waits until the link is up again, or `deadline` passes. A failed
    /// device answers [`Error::Failed`], a deadline [`Error::Reconnecting`].
    pub(super) fn wait_up(&self, deadline: Instant) -> Result<(), Error> {
        let mut s = self.lock();
        loop {
            match s.phase {
                Phase::Up => return Ok(()),
                Phase::Failed | Phase::Closed => return Err(Error::Failed),
                Phase::Down => {}
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or(Error::Reconnecting)?;
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// True when the backend keeps an inflight region (INFLIGHT_SHMFD).
    pub(super) fn inflight(&self) -> bool {
        self.rings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .inflight
    }

    /// Successful reconnections so far.
    pub(super) fn reconnects(&self) -> u32 {
        self.lock().reconnects
    }

    /// Blocks until the link goes down (true) or the device fails or is
    /// dropped (false).
    fn wait_down(&self) -> bool {
        let mut s = self.lock();
        loop {
            match s.phase {
                Phase::Down => return true,
                Phase::Failed | Phase::Closed => return false,
                Phase::Up => {}
            }
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Sleeps `d` unless the device is dropped first (false).
    fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut s = self.lock();
        while s.phase != Phase::Closed {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return true;
            };
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        false
    }

    /// True once the device is being dropped.
    fn closed(&self) -> bool {
        self.lock().phase == Phase::Closed
    }

    /// Starts a reconnection attempt: its generation, or `None` when the
    /// policy's limit is reached or the link is no longer down.
    fn begin_attempt(&self) -> Option<u64> {
        let mut s = self.lock();
        if s.phase != Phase::Down || !self.policy.allows(s.attempts) {
            return None;
        }
        s.attempts += 1;
        s.generation += 1;
        s.attempt_lost = false;
        Some(s.generation)
    }

    /// Attempt `generation` set the device up again: the link is up unless
    /// that connection was lost meanwhile (false).
    pub(super) fn up(&self, generation: u64) -> bool {
        let mut s = self.lock();
        if s.phase != Phase::Down || s.generation != generation || s.attempt_lost {
            return false;
        }
        s.phase = Phase::Up;
        s.reconnects += 1;
        self.changed.notify_all();
        true
    }

    /// The device is being dropped: the recovery ends.
    fn close(&self) {
        let mut s = self.lock();
        if s.phase != Phase::Failed {
            s.phase = Phase::Closed;
        }
        self.changed.notify_all();
    }

    /// Attempts made so far.
    fn attempts(&self) -> u32 {
        self.lock().attempts
    }
}

/// The recovery thread of a device with `restart = "on-failure"`; dropping
/// it ends the thread.
#[derive(Debug)]
pub(super) struct Recovery {
    link: Arc<Link>,
    thread: Option<JoinHandle<()>>,
}

/// What the recovery thread works with.
pub(super) struct Target {
    /// The backend's socket path.
    pub(super) socket: PathBuf,
    /// The device's registers and vhost-user side.
    pub(super) inner: Arc<Mutex<Inner>>,
    /// The frontend's timeout: for the connection and for the replay.
    pub(super) timeout: Duration,
}

impl Recovery {
    /// Starts the thread for `link`.
    pub(super) fn start(link: Arc<Link>, target: Target) -> io::Result<Self> {
        let l = Arc::clone(&link);
        let thread = std::thread::Builder::new()
            .name("outboard-vhost-reconnect".into())
            .spawn(move || run(&l, &target))?;
        Ok(Recovery {
            link,
            thread: Some(thread),
        })
    }
}

impl Drop for Recovery {
    fn drop(&mut self) {
        self.link.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(link: &Link, target: &Target) {
    // Deaths in a row that came less than QUICK after the previous restart.
    let mut quick = 0u32;
    let mut last_up: Option<Instant> = None;
    while link.wait_down() {
        if last_up.is_none_or(|t| t.elapsed() >= QUICK) {
            quick = 0;
        }
        let mut last_error = None;
        loop {
            let Some(generation) = link.begin_attempt() else {
                if link.is_down() {
                    let why = Error::GaveUp {
                        attempts: link.attempts(),
                        last: Box::new(last_error.unwrap_or(Error::HungUp)),
                    };
                    link.fail(&why);
                }
                break;
            };
            if !link.sleep(link.policy.delay(quick)) {
                return;
            }
            match attempt(link, target, generation) {
                Ok(()) => {
                    info!(
                        "device {}: vhost-user backend reconnected (attempt {})",
                        link.name,
                        link.attempts()
                    );
                    last_up = Some(Instant::now());
                    quick += 1;
                    break;
                }
                Err(e) => {
                    warn!(
                        "device {}: reconnecting to {}: {}",
                        link.name,
                        target.socket.display(),
                        outboard_protocol::error_chain(&e)
                    );
                    if link.closed() {
                        return;
                    }
                    if !worth_retrying(&e) {
                        link.fail(&e);
                        break;
                    }
                    quick += 1;
                    last_error = Some(e);
                }
            }
        }
    }
}

/// False when the backend answered but cannot resume the device (another
/// attempt would find the same backend); true when it was not there yet or
/// went away again.
fn worth_retrying(e: &Error) -> bool {
    !matches!(
        e,
        Error::Changed(_)
            | Error::PackedRing
            | Error::InFlight { .. }
            | Error::NoMemory
            | Error::RingIndex { .. }
    )
}

/// One attempt: connect, then replay the device's state under the
/// register lock.
fn attempt(link: &Link, target: &Target, generation: u64) -> Result<(), Error> {
    let sock =
        crate::backend::connect_retrying_while(&target.socket, target.timeout, || !link.closed())
            .map_err(|e| Error::Connect(target.socket.clone(), e))?;
    let mut inner = target.inner.lock().unwrap_or_else(PoisonError::into_inner);
    inner.backend.restore(sock, generation, target.timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::InterruptSink;

    fn link(policy: RestartPolicy) -> (Arc<Link>, InterruptSink) {
        let mut sink = InterruptSink::new().unwrap_or_else(|e| panic!("{e}"));
        let irq = sink
            .add_line("d", 0, false)
            .unwrap_or_else(|e| panic!("{e}"));
        (Link::new("d", policy, Health::new("d"), irq), sink)
    }

    #[test]
    fn lost_when_policy_never_then_failed_for_good() {
        let (l, _sink) = link(RestartPolicy::default());
        l.lost(0, &Error::HungUp);
        assert!(l.health().is_failed());
        assert!(matches!(l.admit(0, false), Err(Error::Failed)));
        assert_eq!(l.begin_attempt(), None);
    }

    #[test]
    fn lost_when_on_failure_then_down_and_only_the_new_generation_admitted() {
        let (l, _sink) = link(RestartPolicy::on_failure());
        l.lost(0, &Error::HungUp);
        assert!(l.is_down() && !l.health().is_failed());
        assert!(matches!(l.admit(0, false), Err(Error::Reconnecting)));
        let g = l.begin_attempt().unwrap_or_else(|| panic!("attempt"));
        assert!(l.admit(g, true).is_ok());
        assert!(matches!(l.admit(g, false), Err(Error::Reconnecting)));
        // News about the old connection changes nothing.
        l.lost(0, &Error::HungUp);
        assert!(l.up(g));
        assert!(l.admit(g, false).is_ok());
        assert_eq!(l.reconnects(), 1);
    }

    #[test]
    fn up_when_the_attempt_was_lost_meanwhile_then_stays_down() {
        let (l, _sink) = link(RestartPolicy::on_failure());
        l.lost(0, &Error::HungUp);
        let g = l.begin_attempt().unwrap_or_else(|| panic!("attempt"));
        l.lost(g, &Error::HungUp);
        assert!(!l.up(g));
        assert!(l.is_down());
    }

    #[test]
    fn begin_attempt_when_limit_reached_then_none() {
        let policy = RestartPolicy {
            limit: 1,
            ..RestartPolicy::on_failure()
        };
        let (l, _sink) = link(policy);
        l.lost(0, &Error::HungUp);
        assert!(l.begin_attempt().is_some());
        assert_eq!(l.begin_attempt(), None);
    }

    #[test]
    fn lost_when_a_ring_is_not_settled_and_no_inflight_region_then_failed_for_good() {
        let (l, _sink) = link(RestartPolicy::on_failure());
        let ram = Arc::new(GuestRam::new(&[(0, 0x10000)]).unwrap_or_else(|e| panic!("{e}")));
        // Queue 0: available ring at 0x1000, used ring at 0x2000.
        let put = |at: u64, v: u16| {
            ram.memory()
                .write_obj(v, GuestAddress(at + 2))
                .unwrap_or_else(|e| panic!("{e}"));
        };
        put(0x1000, 7);
        put(0x2000, 7);
        l.set_rings(|r| {
            r.ram = Some(Arc::clone(&ram));
            r.queues = vec![(0, 0x1000, 0x2000)];
        });
        assert!(l.settled().is_ok(), "every chain used");
        put(0x1000, 9);
        l.set_rings(|r| r.inflight = true);
        assert!(l.settled().is_ok(), "the backend resubmits from its region");
        l.set_rings(|r| r.inflight = false);
        l.lost(0, &Error::HungUp);
        assert!(!l.is_down());
        let why = l.health().reason().unwrap_or_default();
        assert!(
            why.contains("in flight on queue 0 (available 9, used 7)"),
            "{why}"
        );
    }

    #[test]
    fn wait_up_when_deadline_passes_while_down_then_reconnecting() {
        let (l, _sink) = link(RestartPolicy::on_failure());
        l.lost(0, &Error::HungUp);
        assert!(matches!(
            l.wait_up(Instant::now()),
            Err(Error::Reconnecting)
        ));
        l.fail(&Error::HungUp);
        assert!(matches!(l.wait_up(Instant::now()), Err(Error::Failed)));
    }
}
