//! Command rings on the data plane (SET_CMD_RING, docs/protocol.md section
//! 7.11): a placed region's commands arrive through a ring in shared
//! memory instead of its data socket.
//!
//! The loop serves rings like sockets: every command in arrival order
//! through [`DataPlane::serve_one`], the state committed before the answer
//! is published. Between wake-ups it polls its rings for an adaptive spin
//! budget ([`SpinBudget`]); only then does it set each ring's sleeping
//! flag, look once more, and block in `epoll_wait` on the `kick`
//! eventfds with everything else. Indices read from the ring are checked
//! every time; a corrupt ring is a protocol violation, like a malformed
//! command on a socket.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use log::{info, warn};
use outboard_protocol::control::{SetCmdRing, Status};
use outboard_protocol::ring::Ring;
use outboard_protocol::wait;
use vmm_sys_util::eventfd::EventFd;

use super::data::{DataPlane, Error};
use crate::device::Device;
use crate::events::{token, Epoll};
use crate::state::Keeper;

/// The longest the loop polls its rings after the last command.
pub(crate) const SPIN_MAX: Duration = Duration::from_micros(200);

/// Counts of what the loop's spins ended with.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SpinStats {
    /// Spins that ran out of budget.
    pub(crate) ran_out: u64,
    /// Spins cut short because another process wanted the CPU.
    pub(crate) contended: u64,
    /// Sleeps in `epoll_wait` with the rings armed.
    pub(crate) sleeps: u64,
    /// Batches of ring commands served while spinning.
    pub(crate) caught: u64,
}

/// One region's ring and the backend's own copy of its consumed index.
#[derive(Debug)]
pub(crate) struct RegionRing {
    ring: Ring,
    head: u32,
    kick: EventFd,
    notify: EventFd,
}

impl DataPlane {
    /// SET_CMD_RING: checks the region is placed and the fds are what the
    /// request says (docs/protocol.md section 5.17), then serves the
    /// region's commands from the ring. A ring set before is replaced.
    pub(crate) fn set_ring(
        &mut self,
        set: SetCmdRing,
        fds: Vec<OwnedFd>,
        epoll: &Epoll,
    ) -> Result<(), Status> {
        let index = set.index as usize;
        match self.placements.get(index) {
            None => return Err(Status::BadRegionIndex),
            Some(None) => return Err(Status::NoSuchRegion),
            Some(Some(_)) => {}
        }
        let [memfd, kick, notify]: [OwnedFd; 3] = fds.try_into().map_err(|_| Status::BadFdCount)?;
        let ring = Ring::open(&memfd, set.entries).map_err(|e| {
            warn!("region {index}: command ring refused: {e}");
            Status::BadFd
        })?;
        let eventfd = |fd| {
            super::resources::eventfd_from(fd).map_err(|e| {
                warn!("region {index}: command ring refused: {e}");
                Status::BadFd
            })
        };
        let (kick, notify) = (eventfd(kick)?, eventfd(notify)?);
        // The frontend publishes from 0 on a fresh ring; a lying one is
        // caught by the first check of `tail`.
        self.drop_ring(index, epoll);
        epoll
            .add(kick.as_raw_fd(), token::RING | index as u64)
            .map_err(|_| Status::DeviceError)?;
        info!(
            "region {index}: commands on a ring of {} entries",
            set.entries
        );
        self.rings[index] = Some(RegionRing {
            ring,
            head: 0,
            kick,
            notify,
        });
        Ok(())
    }

    /// Forgets region `index`'s ring (REMOVE_REGION, or a new ring).
    pub(crate) fn drop_ring(&mut self, index: usize, epoll: &Epoll) {
        if let Some(r) = self.rings.get_mut(index).and_then(Option::take) {
            if let Err(e) = epoll.remove(r.kick.as_raw_fd()) {
                warn!("cannot stop watching a ring's kick eventfd: {e}");
            }
        }
    }

    /// True when some region has a ring.
    pub(crate) fn has_rings(&self) -> bool {
        self.rings.iter().any(Option::is_some)
    }

    /// The `kick` eventfd of region `index` fired: clears it and serves.
    pub(crate) fn kicked<D: Device + ?Sized>(
        &mut self,
        index: usize,
        device: &mut D,
        keeper: Option<&mut Keeper>,
    ) -> Result<(), Error> {
        if let Some(r) = self.rings.get(index).and_then(Option::as_ref) {
            // Nonblocking: an empty counter (a stale event) is fine.
            let _ = r.kick.read();
        }
        self.serve_ring(index, device, keeper).map(|_| ())
    }

    /// Serves every ring once; true if any had commands.
    pub(crate) fn serve_rings<D: Device + ?Sized>(
        &mut self,
        device: &mut D,
        mut keeper: Option<&mut Keeper>,
    ) -> Result<bool, Error> {
        let mut any = false;
        for index in 0..self.rings.len() {
            any |= self.serve_ring(index, device, keeper.as_deref_mut())?;
        }
        Ok(any)
    }

    /// Serves the commands published on region `index`'s ring; true if
    /// there were any. The state is committed before the answer and the
    /// new `head` are published, as on a socket before the responses go out.
    fn serve_ring<D: Device + ?Sized>(
        &mut self,
        index: usize,
        device: &mut D,
        keeper: Option<&mut Keeper>,
    ) -> Result<bool, Error> {
        let region = index as u32;
        // Taken out so the device and the counters can be borrowed.
        let Some(mut r) = self.rings.get_mut(index).and_then(Option::take) else {
            return Ok(false);
        };
        let result = self.drain_ring(region, &mut r, device, keeper);
        self.rings[index] = Some(r);
        result
    }

    fn drain_ring<D: Device + ?Sized>(
        &mut self,
        region: u32,
        r: &mut RegionRing,
        device: &mut D,
        keeper: Option<&mut Keeper>,
    ) -> Result<bool, Error> {
        let tail = r
            .ring
            .published(r.head)
            .map_err(|source| Error::Ring { region, source })?;
        if tail == r.head {
            return Ok(false);
        }
        let mut answer = None;
        let mut pos = r.head;
        while pos != tail {
            let raw = r.ring.take(pos);
            if let Some(data) = self.serve_one(region, &raw, device)? {
                answer = Some((pos, data));
            }
            pos = pos.wrapping_add(1);
        }
        if let Some(k) = keeper {
            k.keep(device, &self.served);
        }
        r.head = tail;
        if r.ring.complete(tail, answer) {
            // The frontend sleeps on `notify`; never blocks, even on an
            // eventfd the frontend made blocking and filled.
            if let Err(e) = wait::signal_eventfd(&r.notify) {
                warn!("region {region}: cannot signal the ring's notify eventfd: {e}");
            }
        }
        Ok(true)
    }

    /// Before the loop blocks: marks every ring asleep, then looks once
    /// more. False (and every mark cleared) if a command arrived meanwhile:
    /// the loop must not block.
    pub(crate) fn arm_sleep(&mut self) -> Result<bool, Error> {
        for r in self.rings.iter().flatten() {
            r.ring.set_backend_sleeping(true);
        }
        for (index, r) in self.rings.iter().enumerate() {
            let Some(r) = r else { continue };
            let tail = r.ring.published(r.head).map_err(|source| Error::Ring {
                region: index as u32,
                source,
            })?;
            if tail != r.head {
                self.disarm_sleep();
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Signals every ring's `kick` eventfd ourselves, so the epoll set
    /// stays readable while commands wait (a caller of `process_ready`
    /// that stopped serving a busy ring comes back for them).
    pub(crate) fn kick_self(&self) {
        for r in self.rings.iter().flatten() {
            let _ = wait::signal_eventfd(&r.kick);
        }
    }

    /// After the loop woke: every ring awake again.
    pub(crate) fn disarm_sleep(&mut self) {
        for r in self.rings.iter().flatten() {
            r.ring.set_backend_sleeping(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::runtime::data::tests::{rig, set};
    use outboard_protocol::control::{SetCmdRing, Status};
    use outboard_protocol::ring::Ring;
    use outboard_protocol::{AccessSize, Cmd};
    use std::os::fd::OwnedFd;
    use vmm_sys_util::eventfd::EventFd;

    fn eventfd() -> OwnedFd {
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // SAFETY: into_raw_fd hands over the only owner of an open fd.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(e)) }
    }

    /// Gives placed region 0 of `r` an 8-entry ring made of `fds`.
    fn ring_on_region_0(r: &mut crate::runtime::data::tests::Rig, fds: Vec<OwnedFd>) {
        let set = SetCmdRing {
            index: 0,
            entries: 8,
        };
        r.plane.set_ring(set, fds, &r.epoll).unwrap();
    }

    fn dup(fd: &OwnedFd) -> OwnedFd {
        fd.try_clone().unwrap()
    }

    #[test]
    fn set_ring_when_region_unplaced_or_fds_wrong_then_spec_status() {
        let mut r = rig();
        let (_ring, memfd) = Ring::create(8).unwrap();
        let ring = SetCmdRing {
            index: 0,
            entries: 8,
        };
        let fds = || vec![dup(&memfd), eventfd(), eventfd()];
        assert_eq!(
            r.plane
                .set_ring(SetCmdRing { index: 9, ..ring }, fds(), &r.epoll),
            Err(Status::BadRegionIndex)
        );
        assert_eq!(
            r.plane.set_ring(ring, fds(), &r.epoll),
            Err(Status::NoSuchRegion)
        );
        let _sock = r.place(set(0, 0, 1), 0).unwrap();
        let bad = vec![eventfd(), eventfd(), eventfd()];
        assert_eq!(r.plane.set_ring(ring, bad, &r.epoll), Err(Status::BadFd));
        let not_eventfd = vec![dup(&memfd), dup(&memfd), eventfd()];
        assert_eq!(
            r.plane.set_ring(ring, not_eventfd, &r.epoll),
            Err(Status::BadFd)
        );
        let wrong_size = SetCmdRing {
            index: 0,
            entries: 16,
        };
        assert_eq!(
            r.plane.set_ring(wrong_size, fds(), &r.epoll),
            Err(Status::BadFd)
        );
        assert_eq!(r.plane.set_ring(ring, fds(), &r.epoll), Ok(()));
        assert!(r.plane.has_rings());
        assert_eq!(r.plane.remove(set(0, 0, 1), &r.epoll), Ok(()));
        assert!(!r.plane.has_rings(), "removal drops the ring");
    }

    #[test]
    fn serve_rings_when_commands_published_then_served_in_order_and_read_answered() {
        let mut r = rig();
        let _sock = r.place(set(0, 0, 1), 0).unwrap();
        let (front, memfd) = Ring::create(8).unwrap();
        let notify = eventfd();
        let fds = vec![dup(&memfd), eventfd(), dup(&notify)];
        ring_on_region_0(&mut r, fds);
        for p in 0..7u32 {
            front.put(
                p,
                &Cmd::write(1, 0, AccessSize::B1, u64::from(p), false).encode(),
            );
        }
        front.put(7, &Cmd::read(1, 0, AccessSize::B1).encode());
        front.publish(8);
        front.set_frontend_waiting(true);
        assert!(r.plane.serve_rings(&mut r.dev, None).unwrap());
        assert_eq!(r.dev.writes.len(), 7);
        assert_eq!(front.consumed(0, 8).unwrap(), 8);
        assert!(front.response(7, 0).unwrap().is_some());
        assert!(
            !r.plane.serve_rings(&mut r.dev, None).unwrap(),
            "nothing more"
        );
        assert!(r.plane.arm_sleep().unwrap(), "idle: may sleep");
        front.put(8, &Cmd::read(1, 0, AccessSize::B1).encode());
        assert!(front.publish(9), "asleep: the frontend kicks");
        r.plane.disarm_sleep();
    }

    #[test]
    fn serve_rings_when_tail_runs_past_the_ring_then_ring_error() {
        let mut r = rig();
        let _sock = r.place(set(0, 0, 1), 0).unwrap();
        let (front, memfd) = Ring::create(8).unwrap();
        let fds = vec![dup(&memfd), eventfd(), eventfd()];
        ring_on_region_0(&mut r, fds);
        front.publish(100);
        assert!(matches!(
            r.plane.serve_rings(&mut r.dev, None),
            Err(super::Error::Ring { region: 0, .. })
        ));
    }
}
