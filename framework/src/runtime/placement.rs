//! Placing and removing regions (SET_REGION and REMOVE_REGION on the data
//! plane): the checks of docs/protocol.md sections 5.4 and 5.5, the
//! `user_data` tokens (per-vCPU ones included) and the sockets' lifetime.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use log::{info, warn};
use outboard_protocol::control::{SetRegion, Status, F_POSTED_WRITES, F_VCPU_TOKENS};

use super::data::{DataPlane, DataSocket, Placement, BATCH_BYTES};
use crate::events::{token, Epoll};

impl DataPlane {
    /// SET_REGION: checks the placement (docs/protocol.md section 5.4, in
    /// its order) and starts serving `fd` under the negotiated `features`.
    pub(crate) fn place(
        &mut self,
        set: SetRegion,
        fd: OwnedFd,
        features: u64,
        epoll: &Epoll,
    ) -> Result<(), Status> {
        let index = set.index as usize;
        let region = self.regions.get(index).ok_or(Status::BadRegionIndex)?;
        if self.placements[index].is_some() {
            return Err(Status::RegionBusy);
        }
        if set.guest_addr.checked_add(region.size - 1).is_none() {
            return Err(Status::BadPayload);
        }
        let tokens = u64::from(set.vcpu_tokens());
        if tokens > 0 && features & F_VCPU_TOKENS == 0 {
            return Err(Status::Unsupported);
        }
        let last_token = set
            .user_data
            .checked_add(tokens)
            .ok_or(Status::BadPayload)?;
        if (set.user_data..=last_token).any(|t| self.by_user_data.contains_key(&t)) {
            return Err(Status::BadPayload);
        }
        if set.posted() && !(region.posted_writes && features & F_POSTED_WRITES != 0) {
            return Err(Status::Unsupported);
        }
        let held: Vec<_> = self.sockets.iter().flatten().map(|d| d.id).collect();
        let id = self.vetter.vet(fd.as_fd(), held).map_err(|e| {
            warn!("region {index}: {e}");
            Status::BadFd
        })?;
        let sock = UnixStream::from(fd);
        let slot = match self.sockets.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.sockets.push(None);
                self.sockets.len() - 1
            }
        };
        epoll
            .add(sock.as_raw_fd(), token::DATA | slot as u64)
            .map_err(|_| Status::DeviceError)?;
        info!(
            "region {index} ({}) set at {:#x}, user_data {:#x}{}",
            region.name,
            set.guest_addr,
            set.user_data,
            if set.posted() { ", posted writes" } else { "" }
        );
        self.sockets[slot] = Some(DataSocket {
            sock,
            id,
            region: set.index,
            buf: vec![0u8; BATCH_BYTES],
            len: 0,
        });
        self.by_user_data.insert(set.user_data, (set.index, None));
        for vcpu in 0..set.vcpu_tokens() {
            self.by_user_data
                .insert(set.user_data + 1 + u64::from(vcpu), (set.index, Some(vcpu)));
        }
        self.placements[index] = Some(Placement { set, slot });
        // Counting starts again with each placement, as the frontend's does.
        self.served[index] = 0;
        Ok(())
    }

    /// REMOVE_REGION: forgets a placement that matches `set` exactly and
    /// closes its data socket.
    pub(crate) fn remove(&mut self, set: SetRegion, epoll: &Epoll) -> Result<(), Status> {
        let index = set.index as usize;
        let p = match self.placements.get_mut(index) {
            None => return Err(Status::BadRegionIndex),
            Some(p) if p.as_ref().is_some_and(|p| p.set == set) => p.take(),
            Some(_) => return Err(Status::NoSuchRegion),
        };
        if let Some(p) = p {
            for t in 0..=u64::from(p.set.vcpu_tokens()) {
                self.by_user_data.remove(&(p.set.user_data + t));
            }
            // The slot may have been reused by another region after this
            // region's socket reached EOF; only close the socket if it is ours.
            let ours = self
                .sockets
                .get(p.slot)
                .is_some_and(|s| s.as_ref().is_some_and(|d| d.region as usize == index));
            if ours {
                self.close(p.slot, epoll);
            }
        }
        self.drop_ring(index, epoll);
        info!("region {index} removed");
        Ok(())
    }

    pub(super) fn close(&mut self, slot: usize, epoll: &Epoll) {
        if let Some(s) = self.sockets.get_mut(slot).and_then(Option::take) {
            if let Err(e) = epoll.remove(s.sock.as_raw_fd()) {
                warn!("cannot stop watching a data socket: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::runtime::data::tests::{rig, set};
    use outboard_protocol::control::{
        Status, FEATURES_SUPPORTED, SET_REGION_POSTED, SET_REGION_VCPUS_SHIFT,
    };
    use std::os::fd::OwnedFd;

    #[test]
    fn serve_when_frontend_closes_socket_then_placement_stays_until_removed() {
        let mut r = rig();
        let s = r.place(set(0, 0, 1), 0).unwrap_or_else(|e| panic!("{e}"));
        drop(s);
        r.serve().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.place(set(0, 0, 3), 0).err(), Some(Status::RegionBusy));
        assert_eq!(
            r.place(set(1, 0, 1), 0).err(),
            Some(Status::BadPayload),
            "token in use"
        );
        assert_eq!(
            r.plane.remove(set(0, 0, 2), &r.epoll),
            Err(Status::NoSuchRegion)
        );
        assert_eq!(r.plane.remove(set(0, 0, 1), &r.epoll), Ok(()));
        assert!(
            r.place(set(0, 0, 1), 0).is_ok(),
            "index and token free again"
        );
    }

    #[test]
    fn place_when_invalid_then_refused_with_spec_status() {
        let mut r = rig();
        assert_eq!(r.place(set(2, 0, 1), 0).err(), Some(Status::BadRegionIndex));
        let mut top = set(0, 0, 1);
        top.guest_addr = u64::MAX - 0x10;
        assert_eq!(r.place(top, 0).err(), Some(Status::BadPayload));
        top.guest_addr = u64::MAX - 0xff;
        assert!(r.place(top, 0).is_ok(), "ending exactly at 2^64");
        let vcpus = 1 << SET_REGION_VCPUS_SHIFT;
        assert_eq!(
            r.place(set(1, vcpus, 5), 0).err(),
            Some(Status::Unsupported)
        );
        assert_eq!(
            r.place(set(1, vcpus, u64::MAX), FEATURES_SUPPORTED).err(),
            Some(Status::BadPayload)
        );
        assert_eq!(
            r.place(set(1, SET_REGION_POSTED, 5), FEATURES_SUPPORTED)
                .err(),
            Some(Status::Unsupported),
            "region 1 takes no posted writes"
        );
        assert_eq!(
            r.plane.remove(set(9, 0, 1), &r.epoll),
            Err(Status::BadRegionIndex)
        );
        let (_a, b) = std::os::unix::net::UnixDatagram::pair().unwrap_or_else(|e| panic!("{e}"));
        let fd: OwnedFd = b.into();
        assert_eq!(
            r.plane.place(set(1, 0, 5), fd, 0, &r.epoll),
            Err(Status::BadFd)
        );
    }
}
