//! The backend event loop: one epoll set over the control socket, every
//! region's data socket and the device's own fds.
//!
//! On a readable data socket the loop drains every queued command (up to
//! [`BATCH_BYTES`] per `recv`), serves them in arrival order, and sends the
//! responses of the batch with a single write, only for commands with the
//! resp bit. Control requests are answered as `docs/protocol.md` says.
//!
//! The loop ends with `Ok(())` when the frontend closes the control socket or
//! sends SHUTDOWN, and with an [`Error`] on a protocol violation: a header
//! that loses framing, a malformed data command, or a command whose
//! `user_data` names no region.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use log::{debug, info, warn};
use outboard_protocol::channel::{self, Channel, Message};
use outboard_protocol::control::{
    self, DeviceInfo, DoorbellInfo, Hello, IrqInfo, MemTable, Negotiated, Payload, RegionIndex,
    RegionInfo, Request, SetIrq, SetRegion, Status, DOORBELL_DATAMATCH, FEATURES_SUPPORTED,
    F_DOORBELL, F_IRQ, F_POSTED_WRITES, IRQ_LEVEL, IRQ_RESAMPLE,
};
use outboard_protocol::ioregionfd::{self, Cmd, Op, Resp, CMD_SIZE};
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{
    DescriptionError, Device, Doorbell, GuestMemory, Interrupt, InterruptLine, Region,
};
use crate::events::{token, Epoll, EventOps};
use outboard_protocol::control::{DeviceKind, F_MEM_TABLE};
use outboard_protocol::Access;

/// Bytes read from a data socket per `recv`: 512 commands.
pub const BATCH_BYTES: usize = 512 * CMD_SIZE;
/// `recv` calls on one data socket per wake-up before other fds get a turn.
const MAX_READS_PER_WAKE: usize = 16;

const TOKEN_CONTROL: u64 = token::CONTROL;
const TOKEN_DATA: u64 = token::DATA;
const TOKEN_DEVICE: u64 = token::DEVICE;
const TOKEN_DOORBELL: u64 = token::DOORBELL;
const TOKEN_RESAMPLE: u64 = token::RESAMPLE;
const TOKEN_KIND_MASK: u64 = token::KIND_MASK;

/// Errors that end the backend's event loop.
#[derive(Debug, Error)]
pub enum Error {
    /// cannot create the event loop
    #[error("cannot create the event loop")]
    Epoll(#[source] io::Error),
    /// control channel failed
    #[error("control channel failed")]
    Control(#[source] channel::Error),
    /// protocol violation on the control channel
    #[error("protocol violation on the control channel")]
    ControlViolation(#[source] control::Error),
    /// protocol violation on the data socket of region {region}
    #[error("protocol violation on the data socket of region {region}")]
    DataViolation {
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
        /// The token no region was set with.
        user_data: u64,
    },
    /// data socket of region {region} failed
    #[error("data socket of region {region} failed")]
    DataIo {
        /// Region of the socket.
        region: u32,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// the device description is invalid
    #[error("the device description is invalid")]
    Description(#[source] DescriptionError),
    /// the device cannot start
    #[error("the device cannot start")]
    DeviceInit(#[source] io::Error),
}

/// A placed region: where the frontend put it and which socket carries it.
#[derive(Debug)]
struct Placement {
    set: SetRegion,
    slot: usize,
}

/// One data socket with its partially received command bytes.
#[derive(Debug)]
struct DataSocket {
    sock: UnixStream,
    region: u32,
    buf: Vec<u8>,
    len: usize,
}

/// What the loop does after handling a control message.
enum Flow {
    Continue,
    Exit,
}

/// The runtime serving one [`Device`] to one frontend.
#[derive(Debug)]
pub struct Backend<D: Device> {
    device: D,
    regions: Vec<Region>,
    name: String,
    kind: DeviceKind,
    features: u64,
    control: Channel,
    epoll: Epoll,
    ops: EventOps,
    negotiated: Option<Negotiated>,
    placements: Vec<Option<Placement>>,
    sockets: Vec<Option<DataSocket>>,
    /// Token -> (region, vCPU): each placed region's base token and its
    /// per-vCPU tokens.
    by_user_data: HashMap<u64, (u32, Option<u32>)>,
    doorbells: Vec<Doorbell>,
    doorbell_fds: Vec<Option<EventFd>>,
    interrupts: Vec<Interrupt>,
    resample_fds: Vec<Option<EventFd>>,
    memory: GuestMemory,
    responses: Vec<u8>,
    rejected_accesses: u64,
}

impl<D: Device> Backend<D> {
    /// Prepares to serve `device` on a connected control socket.
    pub fn new(device: D, control: UnixStream) -> Result<Self, Error> {
        let desc = device.describe();
        desc.validate().map_err(Error::Description)?;
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        let ops = epoll.ops();
        let mut device = device;
        let mut features = FEATURES_SUPPORTED;
        if desc.needs_memory {
            device.set_memory(memory.clone());
        } else {
            // Least privilege: a device that does not need guest RAM never gets it.
            features &= !F_MEM_TABLE;
        }
        let backend = Backend {
            placements: desc.regions.iter().map(|_| None).collect(),
            device,
            name: desc.name,
            kind: desc.kind,
            features,
            regions: desc.regions,
            control: Channel::new(control),
            epoll,
            ops,
            negotiated: None,
            sockets: Vec::new(),
            by_user_data: HashMap::new(),
            doorbell_fds: desc.doorbells.iter().map(|_| None).collect(),
            doorbells: desc.doorbells,
            resample_fds: desc.interrupts.iter().map(|_| None).collect(),
            interrupts: desc.interrupts,
            memory,
            responses: Vec::with_capacity(BATCH_BYTES),
            rejected_accesses: 0,
        };
        backend.watch(backend.control.as_raw_fd(), TOKEN_CONTROL)?;
        let mut backend = backend;
        let ops = backend.ops.clone();
        backend.device.init(&ops).map_err(Error::DeviceInit)?;
        Ok(backend)
    }

    /// The device being served.
    pub fn device(&self) -> &D {
        &self.device
    }

    fn watch(&self, fd: RawFd, token: u64) -> Result<(), Error> {
        self.epoll.add(fd, token).map_err(Error::Epoll)
    }

    fn unwatch(&self, fd: RawFd) {
        if let Err(e) = self.epoll.remove(fd) {
            warn!("cannot stop watching fd {fd}: {e}");
        }
    }

    /// Serves until the frontend disconnects or shuts the device down.
    pub fn run(&mut self) -> Result<(), Error> {
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 32];
        loop {
            let n = self.epoll.wait(-1, &mut events).map_err(Error::Epoll)?;
            for ev in &events[..n] {
                let token = ev.data;
                match token & TOKEN_KIND_MASK {
                    TOKEN_DATA => {
                        self.serve_data((token & 0xffff_ffff) as usize)?;
                    }
                    TOKEN_DEVICE => {
                        let ops = self.ops.clone();
                        self.device.handle_event((token & 0xffff_ffff) as u32, &ops);
                    }
                    TOKEN_DOORBELL => self.serve_doorbell((token & 0xffff_ffff) as usize),
                    TOKEN_RESAMPLE => self.serve_resample((token & 0xffff_ffff) as usize),
                    _ => {
                        if let Flow::Exit = self.serve_control()? {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    fn serve_doorbell(&mut self, index: usize) {
        let count = match self.doorbell_fds.get(index).and_then(Option::as_ref) {
            Some(fd) => match fd.read() {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("doorbell {index}: {e}");
                    return;
                }
            },
            None => return,
        };
        self.device.doorbell(index, count);
    }

    fn serve_resample(&mut self, index: usize) {
        if let Some(fd) = self.resample_fds.get(index).and_then(Option::as_ref) {
            match fd.read() {
                Ok(_) => self.device.resample(index),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => warn!("resample of interrupt {index}: {e}"),
            }
        }
    }

    /// Serves every command already queued on every data socket. Called before
    /// each control request, so that a request (RESET, REMOVE_REGION) takes
    /// effect after every access the frontend sent before it.
    fn drain_all(&mut self) -> Result<(), Error> {
        for slot in 0..self.sockets.len() {
            while !self.serve_data(slot)? {}
        }
        Ok(())
    }

    fn serve_control(&mut self) -> Result<Flow, Error> {
        let msg = match self.control.recv() {
            Ok(m) => m,
            Err(channel::Error::Closed) => {
                info!("frontend closed the control socket; exiting");
                return Ok(Flow::Exit);
            }
            Err(channel::Error::Header { request, source }) => {
                // Framing is lost: say why, then give up on the connection.
                let _ = self
                    .control
                    .reply_error(request, Status::for_error(&source));
                return Err(Error::ControlViolation(source));
            }
            Err(e) => return Err(Error::Control(e)),
        };
        self.drain_all()?;
        let request = msg.header.request;
        let need_reply = msg.header.need_reply();
        match self.handle_request(msg) {
            Ok((Some(payload), _)) => self
                .control
                .send(
                    control::Header::reply(request, payload.len(), false),
                    &payload,
                    &[],
                )
                .map_err(Error::Control)?,
            Ok((None, flow)) => {
                if need_reply {
                    self.control.ack(request).map_err(Error::Control)?;
                }
                return Ok(flow);
            }
            Err((status, fatal)) => {
                warn!("control request {request} refused: {status}");
                let always_replies = matches!(
                    Request::from_u32(request),
                    Ok(Request::Hello
                        | Request::GetDeviceInfo
                        | Request::GetRegionInfo
                        | Request::GetDoorbellInfo
                        | Request::GetIrqInfo)
                );
                if need_reply || always_replies {
                    self.control
                        .reply_error(request, status)
                        .map_err(Error::Control)?;
                }
                if let Some(e) = fatal {
                    return Err(Error::ControlViolation(e));
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// Carries out one request: `Ok((reply payload, flow))` or `Err((status, fatal error))`.
    #[allow(clippy::type_complexity)]
    fn handle_request(
        &mut self,
        msg: Message,
    ) -> Result<(Option<Vec<u8>>, Flow), (Status, Option<control::Error>)> {
        let Message {
            header,
            payload,
            mut fds,
        } = msg;
        if header.is_reply() {
            return Err((Status::UnexpectedReply, None));
        }
        let req = Request::from_u32(header.request).map_err(|_| (Status::UnknownRequest, None))?;
        if req == Request::SetDirectMap {
            return Err((Status::Unsupported, None));
        }
        let (min_fds, max_fds) = req.fd_range();
        if fds.len() < min_fds || fds.len() > max_fds {
            return Err((Status::BadFdCount, None));
        }
        if req.payload_size().is_some_and(|size| payload.len() != size) {
            return Err((Status::BadPayload, None));
        }
        let bad = |_| (Status::BadPayload, None);
        let negotiated = match self.negotiated {
            Some(n) => n.features,
            None if req == Request::Hello => 0,
            None => return Err((Status::NotNegotiated, None)),
        };
        if req.feature().is_some_and(|f| negotiated & f == 0) {
            return Err((Status::Unsupported, None));
        }
        match req {
            Request::Hello => {
                if self.negotiated.is_some() {
                    return Err((Status::Unsupported, None));
                }
                let peer = Hello::decode(&payload).map_err(bad)?;
                let ours = Hello::ours(self.features);
                match ours.negotiate(&peer) {
                    Ok(n) => {
                        info!(
                            "negotiated protocol version {} features {:#x}",
                            n.version, n.features
                        );
                        self.negotiated = Some(n);
                        Ok((Some(ours.encode()), Flow::Continue))
                    }
                    Err(e) => Err((Status::NoCommonVersion, Some(e))),
                }
            }
            Request::GetDeviceInfo => Ok((
                Some(
                    DeviceInfo {
                        kind: self.kind,
                        num_regions: self.regions.len() as u32,
                        num_doorbells: if negotiated & F_DOORBELL != 0 {
                            self.doorbells.len() as u32
                        } else {
                            0
                        },
                        num_irqs: if negotiated & F_IRQ != 0 {
                            self.interrupts.len() as u32
                        } else {
                            0
                        },
                        name: self.name.clone(),
                    }
                    .encode(),
                ),
                Flow::Continue,
            )),
            Request::GetRegionInfo => {
                let RegionIndex { index } = RegionIndex::decode(&payload).map_err(bad)?;
                let info: RegionInfo = self
                    .regions
                    .get(index as usize)
                    .ok_or((Status::BadRegionIndex, None))?
                    .to_info(index);
                Ok((Some(info.encode()), Flow::Continue))
            }
            Request::SetRegion => {
                let set = SetRegion::decode(&payload).map_err(bad)?;
                let fd = fds.pop().ok_or((Status::BadFdCount, None))?;
                self.set_region(set, fd).map_err(|s| (s, None))?;
                Ok((None, Flow::Continue))
            }
            Request::RemoveRegion => {
                let set = SetRegion::decode(&payload).map_err(bad)?;
                self.remove_region(set).map_err(|s| (s, None))?;
                Ok((None, Flow::Continue))
            }
            Request::Reset => {
                info!("reset");
                self.device.reset();
                Ok((None, Flow::Continue))
            }
            Request::Shutdown => {
                info!("shutdown requested; exiting");
                Ok((None, Flow::Exit))
            }
            Request::GetDoorbellInfo => {
                let RegionIndex { index } = RegionIndex::decode(&payload).map_err(bad)?;
                let d = self
                    .doorbells
                    .get(index as usize)
                    .ok_or((Status::BadRegionIndex, None))?;
                let info = DoorbellInfo {
                    index,
                    region: d.region,
                    offset: d.offset,
                    size: d.size.map_or(0, |s| s.bytes() as u32),
                    flags: if d.datamatch.is_some() {
                        DOORBELL_DATAMATCH
                    } else {
                        0
                    },
                    datamatch: d.datamatch.unwrap_or(0),
                };
                Ok((Some(info.encode()), Flow::Continue))
            }
            Request::GetIrqInfo => {
                let RegionIndex { index } = RegionIndex::decode(&payload).map_err(bad)?;
                let i = self
                    .interrupts
                    .get(index as usize)
                    .ok_or((Status::BadRegionIndex, None))?;
                let info = IrqInfo {
                    index,
                    flags: if i.level { IRQ_LEVEL } else { 0 },
                };
                Ok((Some(info.encode()), Flow::Continue))
            }
            Request::SetMemTable => {
                let table = MemTable::decode(&payload).map_err(bad)?;
                if table.regions.len() != fds.len() {
                    return Err((Status::BadFdCount, None));
                }
                self.set_memory(&table, fds).map_err(|s| (s, None))?;
                Ok((None, Flow::Continue))
            }
            Request::SetDoorbell => {
                let RegionIndex { index } = RegionIndex::decode(&payload).map_err(bad)?;
                let fd = fds.pop().ok_or((Status::BadFdCount, None))?;
                self.set_doorbell(index as usize, fd)
                    .map_err(|s| (s, None))?;
                Ok((None, Flow::Continue))
            }
            Request::SetIrq => {
                let set = SetIrq::decode(&payload).map_err(bad)?;
                let wants = if set.flags & IRQ_RESAMPLE != 0 { 2 } else { 1 };
                if fds.len() != wants {
                    return Err((Status::BadFdCount, None));
                }
                let resample = if wants == 2 { fds.pop() } else { None };
                let fd = fds.pop().ok_or((Status::BadFdCount, None))?;
                self.set_irq(set.index as usize, fd, resample)
                    .map_err(|s| (s, None))?;
                Ok((None, Flow::Continue))
            }
            Request::SetDirectMap => Err((Status::Unsupported, None)),
        }
    }

    /// Maps a new memory table and swaps it in. Each fd must be large enough
    /// for its entry; a memfd must be sealed against shrinking, so that the
    /// frontend cannot turn our mapping into SIGBUS later.
    fn set_memory(&mut self, table: &MemTable, fds: Vec<OwnedFd>) -> Result<(), Status> {
        let mut ranges = Vec::with_capacity(fds.len());
        for (r, fd) in table.regions.iter().zip(fds) {
            let file = File::from(fd);
            let len = file.metadata().map_err(|_| Status::BadFd)?.len();
            let end = r.fd_offset.checked_add(r.size).ok_or(Status::BadPayload)?;
            if end > len || !shrink_sealed_or_not_memfd(&file) {
                warn!(
                    "memory fd for {:#x}+{:#x} is too small or not sealed against shrinking",
                    r.guest_addr, r.size
                );
                return Err(Status::BadFd);
            }
            let size = usize::try_from(r.size).map_err(|_| Status::BadPayload)?;
            ranges.push((
                GuestAddress(r.guest_addr),
                size,
                Some(FileOffset::new(file, r.fd_offset)),
            ));
        }
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(ranges).map_err(|e| {
            warn!("cannot map the memory table: {e}");
            Status::DeviceError
        })?;
        match self.memory.lock() {
            Ok(guard) => guard.replace(mem),
            Err(poisoned) => poisoned.into_inner().replace(mem),
        }
        info!("memory table set: {} regions", table.regions.len());
        Ok(())
    }

    fn set_doorbell(&mut self, index: usize, fd: OwnedFd) -> Result<(), Status> {
        if index >= self.doorbells.len() {
            return Err(Status::BadRegionIndex);
        }
        let efd = eventfd_from(fd)?;
        // Watch the new fd before letting the old one go, so a failure keeps the old.
        self.watch(efd.as_raw_fd(), TOKEN_DOORBELL | index as u64)
            .map_err(|_| Status::DeviceError)?;
        if let Some(old) = self.doorbell_fds[index].replace(efd) {
            self.unwatch(old.as_raw_fd());
        }
        debug!("doorbell {index} connected");
        Ok(())
    }

    fn set_irq(
        &mut self,
        index: usize,
        fd: OwnedFd,
        resample: Option<OwnedFd>,
    ) -> Result<(), Status> {
        let irq = *self.interrupts.get(index).ok_or(Status::BadRegionIndex)?;
        if resample.is_some() && !irq.level {
            return Err(Status::Unsupported);
        }
        let line = eventfd_from(fd)?;
        let resample = resample.map(eventfd_from).transpose()?;
        // Watch the new fd before letting the old one go, so a failure keeps the old.
        if let Some(r) = &resample {
            self.watch(r.as_raw_fd(), TOKEN_RESAMPLE | index as u64)
                .map_err(|_| Status::DeviceError)?;
        }
        if let Some(old) = std::mem::replace(&mut self.resample_fds[index], resample) {
            self.unwatch(old.as_raw_fd());
        }
        self.device
            .connect_interrupt(index, InterruptLine::new(line));
        debug!("interrupt {index} connected");
        Ok(())
    }

    fn set_region(&mut self, set: SetRegion, fd: OwnedFd) -> Result<(), Status> {
        let index = set.index as usize;
        let region = self.regions.get(index).ok_or(Status::BadRegionIndex)?;
        if self.placements[index].is_some() {
            return Err(Status::RegionBusy);
        }
        if set.guest_addr.checked_add(region.size - 1).is_none() {
            return Err(Status::BadPayload);
        }
        let tokens = u64::from(set.vcpu_tokens());
        if tokens > 0
            && self
                .negotiated
                .is_none_or(|n| n.features & outboard_protocol::control::F_VCPU_TOKENS == 0)
        {
            return Err(Status::Unsupported);
        }
        let last_token = set
            .user_data
            .checked_add(tokens)
            .ok_or(Status::BadPayload)?;
        if (set.user_data..=last_token).any(|t| self.by_user_data.contains_key(&t)) {
            return Err(Status::BadPayload);
        }
        let posted_ok = region.posted_writes
            && self
                .negotiated
                .is_some_and(|n| n.features & F_POSTED_WRITES != 0);
        if set.posted() && !posted_ok {
            return Err(Status::Unsupported);
        }
        if !is_stream_socket(&fd) {
            return Err(Status::BadFd);
        }
        let sock = UnixStream::from(fd);
        let slot = match self.sockets.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.sockets.push(None);
                self.sockets.len() - 1
            }
        };
        self.watch(sock.as_raw_fd(), TOKEN_DATA | slot as u64)
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
        Ok(())
    }

    fn remove_region(&mut self, set: SetRegion) -> Result<(), Status> {
        let index = set.index as usize;
        match self.placements.get(index) {
            None => Err(Status::BadRegionIndex),
            Some(Some(p)) if p.set == set => {
                self.take_down(index);
                info!("region {index} removed");
                Ok(())
            }
            Some(_) => Err(Status::NoSuchRegion),
        }
    }

    /// Forgets a placement and closes its data socket.
    fn take_down(&mut self, index: usize) {
        if let Some(p) = self.placements.get_mut(index).and_then(Option::take) {
            for t in 0..=u64::from(p.set.vcpu_tokens()) {
                self.by_user_data.remove(&(p.set.user_data + t));
            }
            // The slot may have been reused by another region after this
            // region's socket reached EOF; only close the socket if it is ours.
            let slot = self.sockets.get_mut(p.slot);
            if let Some(slot) =
                slot.filter(|s| s.as_ref().is_some_and(|d| d.region as usize == index))
            {
                if let Some(s) = slot.take() {
                    self.unwatch(s.sock.as_raw_fd());
                }
            }
        }
    }

    /// Serves queued commands of one data socket; `Ok(true)` once it is drained
    /// (or gone), `Ok(false)` if it still had data after a fair share of reads.
    fn serve_data(&mut self, slot: usize) -> Result<bool, Error> {
        for _ in 0..MAX_READS_PER_WAKE {
            let Some(ds) = self.sockets.get_mut(slot).and_then(Option::as_mut) else {
                return Ok(true);
            };
            let region = ds.region;
            let got = match recv_nonblocking(&ds.sock, &mut ds.buf[ds.len..]) {
                Ok(0) => {
                    // The placement stays until REMOVE_REGION names it; only the socket goes.
                    debug!("data socket of region {region} closed by the frontend");
                    if let Some(s) = self.sockets.get_mut(slot).and_then(Option::take) {
                        self.unwatch(s.sock.as_raw_fd());
                    }
                    return Ok(true);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::DataIo { region, source: e }),
            };
            let space = ds.buf.len() - ds.len;
            ds.len += got;
            let whole = ds.len - ds.len % CMD_SIZE;
            // Take the buffer out so the device can be borrowed mutably.
            let buf = std::mem::take(&mut ds.buf);
            let result = self.serve_commands(region, &buf[..whole]);
            let ds = match self.sockets.get_mut(slot).and_then(Option::as_mut) {
                Some(ds) => ds,
                None => return result.map(|()| true),
            };
            ds.buf = buf;
            ds.buf.copy_within(whole..ds.len, 0);
            ds.len -= whole;
            result?;
            if !self.responses.is_empty() {
                let out = std::mem::take(&mut self.responses);
                let sent = (&ds.sock).write_all(&out);
                self.responses = out;
                self.responses.clear();
                sent.map_err(|source| Error::DataIo { region, source })?;
            }
            if got < space {
                // The socket is drained; level-triggered epoll wakes us for more.
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn serve_commands(&mut self, socket_region: u32, bytes: &[u8]) -> Result<(), Error> {
        for chunk in bytes.chunks_exact(CMD_SIZE) {
            let mut raw = [0u8; CMD_SIZE];
            raw.copy_from_slice(chunk);
            let cmd = Cmd::decode(&raw).map_err(|source| Error::DataViolation {
                region: socket_region,
                source,
            })?;
            // Dispatch by user_data, as a kernel-written stream would need; a
            // token of another region on this socket is as wrong as an unknown one.
            let (index, vcpu) = self
                .by_user_data
                .get(&cmd.user_data)
                .copied()
                .filter(|&(i, _)| i == socket_region)
                .ok_or(Error::UnknownUserData {
                    region: socket_region,
                    user_data: cmd.user_data,
                })?;
            let region = &self.regions[index as usize];
            let permitted = match cmd.op {
                Op::Read => region.readable,
                Op::Write => region.writable,
            };
            let valid = permitted && region.allows(cmd.offset, cmd.size);
            if !valid {
                self.rejected_accesses += 1;
                if self.rejected_accesses.is_power_of_two() {
                    warn!(
                        "rejected {:?} of {} bytes at offset {:#x} of region {index} ({} so far)",
                        cmd.op,
                        cmd.size.bytes(),
                        cmd.offset,
                        self.rejected_accesses
                    );
                }
            }
            let data = match cmd.op {
                Op::Read if valid => cmd.size.truncate(
                    self.device
                        .read(Access::new(index, cmd.offset, cmd.size).by(vcpu)),
                ),
                Op::Read => cmd.size.all_ones(),
                Op::Write => {
                    if valid {
                        self.device.write(
                            Access::new(index, cmd.offset, cmd.size).by(vcpu),
                            cmd.size.truncate(cmd.data),
                        );
                    }
                    0
                }
            };
            if cmd.resp {
                self.responses.extend_from_slice(&Resp { data }.encode());
            }
        }
        Ok(())
    }
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

/// Takes an fd as an eventfd (checked through /proc), made non-blocking.
fn eventfd_from(fd: OwnedFd) -> Result<EventFd, Status> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    if !link.is_ok_and(|l| l.to_string_lossy() == "anon_inode:[eventfd]") {
        return Err(Status::BadFd);
    }
    // SAFETY: F_GETFL/F_SETFL only change the file status flags of an fd we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(Status::BadFd);
        }
    }
    // SAFETY: the fd is an eventfd (checked above) and ownership moves into the EventFd.
    Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

/// True unless `file` is a memfd that may still shrink.
fn shrink_sealed_or_not_memfd(file: &File) -> bool {
    // SAFETY: F_GET_SEALS only queries the fd's seals.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    // Files that are not memfds do not support seals (EINVAL): their size was checked.
    seals < 0 || seals & libc::F_SEAL_SHRINK != 0
}

/// True when `fd` is a stream socket (the only kind of data socket accepted).
pub(crate) fn is_stream_socket(fd: &impl AsFd) -> bool {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `ty` and `len` are live locals of the sizes passed; the fd is
    // open for the duration of the borrow.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && ty == libc::SOCK_STREAM
}

impl<D: Device> Drop for Backend<D> {
    fn drop(&mut self) {
        if self.rejected_accesses > 0 {
            warn!(
                "{} guest accesses were rejected (outside a region, wrong size or direction)",
                self.rejected_accesses
            );
        }
    }
}
