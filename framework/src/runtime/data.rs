//! The data plane: placed regions, their ioregionfd data sockets, command
//! batching and decoding, and dispatch to the device by `user_data` token.
//!
//! A readable data socket is drained in batches of up to [`BATCH_BYTES`]
//! per `recv`; its commands are served in arrival order and the responses
//! of a batch (only for commands with the resp bit) go out in one write.
//! Placing and removing regions is in `placement.rs`.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use log::{debug, warn};
use outboard_protocol::control::SetRegion;
use outboard_protocol::ioregionfd::{self, Cmd, Op, Resp, CMD_SIZE};
use outboard_protocol::Access;
use thiserror::Error;

use crate::device::{Device, Region};
use crate::events::Epoll;
use crate::state::Keeper;

/// Bytes read from a data socket per `recv`: 512 commands.
pub const BATCH_BYTES: usize = 512 * CMD_SIZE;
/// `recv` calls on one data socket per wake-up before other fds get a turn.
const MAX_READS_PER_WAKE: usize = 16;

/// A protocol violation or I/O failure on a data socket (fatal).
#[derive(Debug, Error)]
pub enum Error {
    /// protocol violation on the data socket of region {region}
    #[error("protocol violation on the data socket of region {region}")]
    Violation {
        /// Region whose socket carried the command.
        region: u32,
        /// What was malformed.
        #[source]
        source: ioregionfd::Error,
    },
    /// command with unknown user_data {user_data:#x} on the data socket of region {region}
    #[error("command with unknown user_data {user_data:#x} on the data socket of region {region}")]
    UnknownUserData {
        /// Region whose socket carried the command.
        region: u32,
        /// The token no region of this socket was set with.
        user_data: u64,
    },
    /// the command ring of region {region} is corrupt
    #[error("the command ring of region {region} is corrupt")]
    Ring {
        /// Region of the ring.
        region: u32,
        /// What was out of range.
        #[source]
        source: outboard_protocol::ring::Error,
    },
    /// data socket of region {region} failed
    #[error("data socket of region {region} failed")]
    Io {
        /// Region of the socket.
        region: u32,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// A placed region: where the frontend put it and which socket carries it.
#[derive(Debug)]
pub(super) struct Placement {
    pub(super) set: SetRegion,
    pub(super) slot: usize,
}

/// One data socket with its partially received command bytes.
#[derive(Debug)]
pub(super) struct DataSocket {
    pub(super) sock: UnixStream,
    /// Its inode and its peer's, to refuse a later socket connected to it.
    pub(super) id: super::sockcheck::Identity,
    pub(super) region: u32,
    pub(super) buf: Vec<u8>,
    pub(super) len: usize,
}

/// Every region of the device, where each is placed and the sockets that
/// carry their accesses.
#[derive(Debug)]
pub(crate) struct DataPlane {
    pub(super) regions: Vec<Region>,
    pub(super) placements: Vec<Option<Placement>>,
    pub(super) sockets: Vec<Option<DataSocket>>,
    /// Token -> (region, vCPU): each placed region's base token and its
    /// per-vCPU tokens.
    pub(super) by_user_data: HashMap<u64, (u32, Option<u32>)>,
    responses: Vec<u8>,
    rejected: u64,
    /// Per region: data commands served on its current placement (saved
    /// with the state, so a frontend replays only the posted writes the
    /// state does not hold).
    pub(super) served: Vec<u64>,
    /// Checks each new data socket (docs/protocol.md section 5.4).
    pub(super) vetter: super::sockcheck::Vetter,
    /// Per region: its command ring, if SET_CMD_RING gave one.
    pub(super) rings: Vec<Option<super::ring::RegionRing>>,
    /// How long the loop polls the rings before it sleeps.
    pub(super) spin: outboard_protocol::ring::SpinBudget,
    /// What the spins did, for the log at exit.
    pub(super) spin_stats: super::ring::SpinStats,
}

impl DataPlane {
    /// The device's regions, none placed yet.
    pub(crate) fn new(regions: Vec<Region>) -> Self {
        let regions_len = regions.len();
        DataPlane {
            placements: regions.iter().map(|_| None).collect(),
            served: vec![0; regions.len()],
            regions,
            sockets: Vec::new(),
            by_user_data: HashMap::new(),
            responses: Vec::with_capacity(BATCH_BYTES),
            rejected: 0,
            vetter: super::sockcheck::Vetter::new(),
            rings: regions_none(regions_len),
            spin: outboard_protocol::ring::SpinBudget::new(super::ring::SPIN_MAX),
            spin_stats: super::ring::SpinStats::default(),
        }
    }

    /// The device's regions.
    pub(crate) fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Per region: data commands served on its current placement.
    pub(crate) fn served(&self) -> &[u64] {
        &self.served
    }

    /// Takes over served counts restored with the state (RESTORE_STATE
    /// after the regions were placed again).
    pub(crate) fn set_served(&mut self, served: &[u64]) {
        for (mine, theirs) in self.served.iter_mut().zip(served) {
            *mine = *theirs;
        }
    }

    /// Accesses that did not fit their region so far.
    pub(crate) fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Serves every command already queued on every data socket.
    pub(crate) fn drain_all<D: Device + ?Sized>(
        &mut self,
        device: &mut D,
        epoll: &Epoll,
        mut keeper: Option<&mut Keeper>,
    ) -> Result<(), Error> {
        for slot in 0..self.sockets.len() {
            while !self.serve(slot, device, epoll, keeper.as_deref_mut())? {}
        }
        self.serve_rings(device, keeper)?;
        Ok(())
    }

    /// Serves queued commands of the socket in `slot`; `Ok(true)` once it is
    /// drained (or gone), `Ok(false)` if it still had data after a fair
    /// share of reads.
    ///
    /// With a state area, the device's state is committed before the
    /// responses go out, so an answered access is never lost by a restart.
    pub(crate) fn serve<D: Device + ?Sized>(
        &mut self,
        slot: usize,
        device: &mut D,
        epoll: &Epoll,
        mut keeper: Option<&mut Keeper>,
    ) -> Result<bool, Error> {
        for _ in 0..MAX_READS_PER_WAKE {
            let Some(ds) = self.sockets.get_mut(slot).and_then(Option::as_mut) else {
                return Ok(true);
            };
            let region = ds.region;
            let got = match recv_nonblocking(&ds.sock, &mut ds.buf[ds.len..]) {
                Ok(0) => {
                    // The placement stays until REMOVE_REGION names it; only the socket goes.
                    debug!("data socket of region {region} closed by the frontend");
                    self.close(slot, epoll);
                    return Ok(true);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(Error::Io { region, source }),
            };
            let space = ds.buf.len() - ds.len;
            ds.len += got;
            let whole = ds.len - ds.len % CMD_SIZE;
            // Take the buffer out so the device can be borrowed mutably.
            let buf = std::mem::take(&mut ds.buf);
            let result = self.serve_commands(region, &buf[..whole], device);
            let Some(ds) = self.sockets.get_mut(slot).and_then(Option::as_mut) else {
                return result.map(|()| true);
            };
            ds.buf = buf;
            ds.buf.copy_within(whole..ds.len, 0);
            ds.len -= whole;
            result?;
            if let Some(k) = keeper.as_deref_mut() {
                k.keep(device, &self.served);
            }
            if !self.responses.is_empty() {
                let sent = (&ds.sock).write_all(&self.responses);
                self.responses.clear();
                sent.map_err(|source| Error::Io { region, source })?;
            }
            if got < space {
                // The socket is drained; level-triggered epoll wakes us for more.
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn serve_commands<D: Device + ?Sized>(
        &mut self,
        socket_region: u32,
        bytes: &[u8],
        device: &mut D,
    ) -> Result<(), Error> {
        for chunk in bytes.chunks_exact(CMD_SIZE) {
            let mut raw = [0u8; CMD_SIZE];
            raw.copy_from_slice(chunk);
            if let Some(data) = self.serve_one(socket_region, &raw, device)? {
                self.responses.extend_from_slice(&Resp { data }.encode());
            }
        }
        Ok(())
    }

    /// Decodes and serves one command that arrived for `channel_region`
    /// (on its data socket or its ring); the response data if the command
    /// asks for one.
    pub(super) fn serve_one<D: Device + ?Sized>(
        &mut self,
        channel_region: u32,
        raw: &[u8; CMD_SIZE],
        device: &mut D,
    ) -> Result<Option<u64>, Error> {
        let cmd = Cmd::decode(raw).map_err(|source| Error::Violation {
            region: channel_region,
            source,
        })?;
        // Dispatch by user_data, as a kernel-written stream would need; a
        // token of another region on this channel is as wrong as an unknown
        // one. The channel's own placement says which tokens are its: the
        // base token, then one per vCPU (the same as `by_user_data`, without
        // hashing on every command).
        let index = channel_region;
        let vcpu = self
            .placements
            .get(index as usize)
            .and_then(Option::as_ref)
            .and_then(|p| {
                let d = cmd.user_data.wrapping_sub(p.set.user_data);
                match d {
                    0 => Some(None),
                    d if d <= u64::from(p.set.vcpu_tokens()) => Some(Some((d - 1) as u32)),
                    _ => None,
                }
            })
            .ok_or(Error::UnknownUserData {
                region: channel_region,
                user_data: cmd.user_data,
            })?;
        if let Some(n) = self.served.get_mut(index as usize) {
            *n += 1;
        }
        let access = Access::new(index, cmd.offset, cmd.size).by(vcpu);
        let data = if self.fits(&cmd, index) {
            match cmd.op {
                Op::Read => cmd.size.truncate(device.read(access)),
                Op::Write => {
                    device.write(access, cmd.size.truncate(cmd.data));
                    0
                }
            }
        } else {
            match cmd.op {
                Op::Read => cmd.size.all_ones(),
                Op::Write => 0,
            }
        };
        Ok(cmd.resp.then_some(data))
    }

    /// True when `cmd` fits region `index`; counts (and now and then logs)
    /// the accesses that do not.
    fn fits(&mut self, cmd: &Cmd, index: u32) -> bool {
        let Some(region) = self.regions.get(index as usize) else {
            return false;
        };
        let permitted = match cmd.op {
            Op::Read => region.readable,
            Op::Write => region.writable,
        };
        if permitted && region.allows(cmd.offset, cmd.size) {
            return true;
        }
        self.rejected += 1;
        if self.rejected.is_power_of_two() {
            warn!(
                "rejected {:?} of {} bytes at offset {:#x} of region {index} ({} so far)",
                cmd.op,
                cmd.size.bytes(),
                cmd.offset,
                self.rejected
            );
        }
        false
    }
}

fn regions_none<T>(n: usize) -> Vec<Option<T>> {
    (0..n).map(|_| None).collect()
}

fn recv_nonblocking(sock: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes for the
    // duration of the call, and the socket fd is open (borrowed from `sock`).
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::runtime::testutil::TestDevice;
    use outboard_protocol::control::{
        Status, FEATURES_SUPPORTED, SET_REGION_POSTED, SET_REGION_VCPUS_SHIFT,
    };
    use outboard_protocol::AccessSize;
    use std::io::Read;
    use std::time::Duration;

    pub(in crate::runtime) struct Rig {
        pub(in crate::runtime) plane: DataPlane,
        pub(in crate::runtime) dev: TestDevice,
        pub(in crate::runtime) epoll: Epoll,
    }

    pub(in crate::runtime) fn rig() -> Rig {
        Rig {
            plane: DataPlane::new(TestDevice::default().describe().regions),
            dev: TestDevice::default(),
            epoll: Epoll::new().unwrap_or_else(|e| panic!("{e}")),
        }
    }

    pub(in crate::runtime) fn set(index: u32, flags: u32, user_data: u64) -> SetRegion {
        SetRegion {
            index,
            flags,
            guest_addr: 0x1000,
            user_data,
        }
    }

    impl Rig {
        pub(in crate::runtime) fn place(
            &mut self,
            s: SetRegion,
            features: u64,
        ) -> Result<UnixStream, Status> {
            let (ours, theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
            ours.set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap_or_else(|e| panic!("{e}"));
            self.plane
                .place(s, theirs.into(), features, &self.epoll)
                .map(|()| ours)
        }
        pub(in crate::runtime) fn serve(&mut self) -> Result<(), Error> {
            self.plane.drain_all(&mut self.dev, &self.epoll, None)
        }
    }

    fn send(sock: &mut UnixStream, cmds: &[Cmd]) {
        let bytes: Vec<u8> = cmds.iter().flat_map(|c| c.encode()).collect();
        sock.write_all(&bytes).unwrap_or_else(|e| panic!("{e}"));
    }

    fn resp(sock: &mut UnixStream) -> u64 {
        let mut b = [0u8; CMD_SIZE];
        sock.read_exact(&mut b).unwrap_or_else(|e| panic!("{e}"));
        Resp::decode(&b).unwrap_or_else(|e| panic!("{e}")).data
    }

    #[test]
    fn serve_when_batch_then_in_order_and_responses_only_for_resp() {
        let mut r = rig();
        let mut s = r
            .place(set(0, SET_REGION_POSTED, 1), FEATURES_SUPPORTED)
            .unwrap_or_else(|e| panic!("{e}"));
        send(
            &mut s,
            &[
                Cmd::write(1, 8, AccessSize::B4, 5, true),
                Cmd::write(1, 8, AccessSize::B2, 0x1_0007, true),
                Cmd::read(1, 0, AccessSize::B2),
                Cmd::write(1, 16, AccessSize::B8, 9, false),
            ],
        );
        r.serve().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp(&mut s), 0x7788, "read truncated to its width");
        assert_eq!(resp(&mut s), 0, "non-posted write answered");
        let values: Vec<u64> = r.dev.writes.iter().map(|w| w.1).collect();
        assert_eq!(values, vec![5, 7, 9], "in order, truncated");
        assert!(!crate::runtime::testutil::readable(s.as_raw_fd()));
    }

    #[test]
    fn serve_when_vcpu_token_then_device_sees_the_vcpu() {
        let mut r = rig();
        let flags = 2 << SET_REGION_VCPUS_SHIFT;
        let mut s = r
            .place(set(0, flags, 10), FEATURES_SUPPORTED)
            .unwrap_or_else(|e| panic!("{e}"));
        send(
            &mut s,
            &[
                Cmd::read(10, 0, AccessSize::B1),
                Cmd::read(12, 0, AccessSize::B1),
            ],
        );
        r.serve().unwrap_or_else(|e| panic!("{e}"));
        let vcpus: Vec<Option<u32>> = r.dev.reads.iter().map(|a| a.vcpu).collect();
        assert_eq!(vcpus, vec![None, Some(1)]);
    }

    #[test]
    fn serve_when_access_does_not_fit_then_all_ones_and_device_untouched() {
        let mut r = rig();
        let mut s = r.place(set(1, 0, 1), 0).unwrap_or_else(|e| panic!("{e}"));
        send(
            &mut s,
            &[
                Cmd::read(1, 0, AccessSize::B2),
                Cmd::read(1, 16, AccessSize::B4),
                Cmd::write(1, 0, AccessSize::B4, 1, false),
                Cmd::read(1, 12, AccessSize::B4),
            ],
        );
        r.serve().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp(&mut s), 0xffff);
        assert_eq!(resp(&mut s), 0xffff_ffff);
        assert_eq!(resp(&mut s), 0);
        assert_eq!(resp(&mut s), 0x5566_7788 ^ 12);
        assert!(r.dev.writes.is_empty());
        assert_eq!(r.dev.reads.len(), 1);
        assert_eq!(r.plane.rejected(), 3);
    }

    #[test]
    fn serve_when_token_of_another_region_then_unknown_user_data() {
        let mut r = rig();
        let mut s0 = r.place(set(0, 0, 1), 0).unwrap_or_else(|e| panic!("{e}"));
        let _s1 = r.place(set(1, 0, 2), 0).unwrap_or_else(|e| panic!("{e}"));
        send(&mut s0, &[Cmd::read(2, 0, AccessSize::B4)]);
        let e = r.serve().err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("command with unknown user_data 0x2 on the data socket of region 0")
        );
    }

    #[test]
    fn serve_when_command_malformed_then_violation() {
        let mut r = rig();
        let mut s = r.place(set(0, 0, 1), 0).unwrap_or_else(|e| panic!("{e}"));
        let mut raw = Cmd::read(1, 0, AccessSize::B4).encode();
        raw[0] = 2;
        s.write_all(&raw).unwrap_or_else(|e| panic!("{e}"));
        let e = r.serve().err().map(|e| outboard_protocol::error_chain(&e));
        assert_eq!(
            e.as_deref(),
            Some("protocol violation on the data socket of region 0: unknown command 2")
        );
    }

    #[test]
    fn serve_when_command_split_then_served_once_whole() {
        let mut r = rig();
        let mut s = r.place(set(0, 0, 1), 0).unwrap_or_else(|e| panic!("{e}"));
        let raw = Cmd::read(1, 4, AccessSize::B4).encode();
        s.write_all(&raw[..20]).unwrap_or_else(|e| panic!("{e}"));
        r.serve().unwrap_or_else(|e| panic!("{e}"));
        assert!(r.dev.reads.is_empty());
        s.write_all(&raw[20..]).unwrap_or_else(|e| panic!("{e}"));
        r.serve().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp(&mut s), 0x5566_7788 ^ 4);
    }
}
