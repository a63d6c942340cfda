//! The control channel's request state machine: receive a request, serve
//! queued data first, check it in the order of docs/protocol.md section 5,
//! carry it out, and reply as section 3.5 says.

use std::os::fd::OwnedFd;

use log::{info, warn};
use outboard_protocol::channel::{self, Message};
use outboard_protocol::control::{
    self, DeviceInfo, DoorbellInfo, Header, Hello, IrqInfo, MemTable, Payload, RegionIndex,
    Request, SetCmdRing, SetIrq, SetRegion, Status, DOORBELL_DATAMATCH, F_DOORBELL, F_IRQ,
    IRQ_LEVEL, IRQ_RESAMPLE,
};
use thiserror::Error;

use super::{Backend, Flow};
use crate::device::Device;

/// A failure of the control channel that ends the backend.
#[derive(Debug, Error)]
pub enum Error {
    /// control channel failed
    #[error("control channel failed")]
    Channel(#[source] channel::Error),
    /// protocol violation on the control channel
    #[error("protocol violation on the control channel")]
    Violation(#[source] control::Error),
}

/// What a request that was carried out answers.
#[derive(Debug)]
enum Reply {
    /// A data reply, sent whatever NEED_REPLY says.
    Data(Vec<u8>),
    /// An acknowledgement, sent only with NEED_REPLY.
    Ack,
    /// An acknowledgement (with NEED_REPLY), then the backend exits.
    Exit,
}

/// A refused request: the status to report and, for a failed negotiation,
/// the violation that ends the backend after the reply.
#[derive(Debug)]
struct Refusal {
    status: Status,
    fatal: Option<control::Error>,
}

impl From<Status> for Refusal {
    fn from(status: Status) -> Self {
        Refusal {
            status,
            fatal: None,
        }
    }
}

/// The checks every request passes before its own (docs/protocol.md
/// section 5, steps 1 to 7): the REPLY bit, a known code, the reserved
/// SET_DIRECT_MAP, the fd count, the payload size, negotiation and the
/// request's feature. `negotiated` is the negotiated feature set, if any.
pub(crate) fn check_request(
    header: &Header,
    payload_len: usize,
    fds: usize,
    negotiated: Option<u64>,
) -> Result<Request, Status> {
    if header.is_reply() {
        return Err(Status::UnexpectedReply);
    }
    let req = Request::from_u32(header.request).map_err(|_| Status::UnknownRequest)?;
    if req == Request::SetDirectMap {
        return Err(Status::Unsupported);
    }
    let (min_fds, max_fds) = req.fd_range();
    if fds < min_fds || fds > max_fds {
        return Err(Status::BadFdCount);
    }
    if req.payload_size().is_some_and(|size| payload_len != size) {
        return Err(Status::BadPayload);
    }
    let features = match negotiated {
        Some(f) => f,
        None if req == Request::Hello => 0,
        None => return Err(Status::NotNegotiated),
    };
    if req.feature().is_some_and(|f| features & f == 0) {
        return Err(Status::Unsupported);
    }
    Ok(req)
}

/// True for the requests that get a reply whatever NEED_REPLY says.
fn always_replies(request: u32) -> bool {
    matches!(
        Request::from_u32(request),
        Ok(Request::Hello
            | Request::GetDeviceInfo
            | Request::GetRegionInfo
            | Request::GetDoorbellInfo
            | Request::GetIrqInfo)
    )
}

fn bad_payload(_: control::Error) -> Refusal {
    Status::BadPayload.into()
}

impl<D: Device> Backend<D> {
    /// Serves one control message; `Flow::Exit` after SHUTDOWN or when the
    /// frontend closed the socket.
    pub(super) fn serve_control(&mut self) -> Result<Flow, super::Error> {
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
                return Err(Error::Violation(source).into());
            }
            Err(e) => return Err(Error::Channel(e).into()),
        };
        // Every access the frontend sent before this request takes effect first.
        self.data
            .drain_all(&mut self.device, &self.epoll, self.state.as_mut())?;
        let request = msg.header.request;
        let need_reply = msg.header.need_reply();
        let sent = match self.handle_request(msg) {
            Ok(Reply::Data(payload)) => {
                self.control
                    .send(Header::reply(request, payload.len(), false), &payload, &[])
            }
            Ok(reply @ (Reply::Ack | Reply::Exit)) => {
                if need_reply {
                    self.control.ack(request).map_err(Error::Channel)?;
                }
                return Ok(match reply {
                    Reply::Exit => Flow::Exit,
                    _ => Flow::Continue,
                });
            }
            Err(Refusal { status, fatal }) => {
                warn!("control request {request} refused: {status}");
                if need_reply || always_replies(request) {
                    self.control
                        .reply_error(request, status)
                        .map_err(Error::Channel)?;
                }
                if let Some(e) = fatal {
                    return Err(Error::Violation(e).into());
                }
                Ok(())
            }
        };
        sent.map_err(Error::Channel)?;
        Ok(Flow::Continue)
    }

    /// Carries out one request.
    fn handle_request(&mut self, msg: Message) -> Result<Reply, Refusal> {
        let Message {
            header,
            payload,
            mut fds,
        } = msg;
        let negotiated = self.negotiated.map(|n| n.features);
        let req = check_request(&header, payload.len(), fds.len(), negotiated)?;
        let features = negotiated.unwrap_or(0);
        match req {
            Request::Hello => self.hello(&payload),
            Request::GetDeviceInfo => Ok(Reply::Data(
                DeviceInfo {
                    kind: self.kind,
                    num_regions: self.data.regions().len() as u32,
                    num_doorbells: if features & F_DOORBELL != 0 {
                        self.resources.doorbells().len() as u32
                    } else {
                        0
                    },
                    num_irqs: if features & F_IRQ != 0 {
                        self.resources.interrupts().len() as u32
                    } else {
                        0
                    },
                    name: self.name.clone(),
                }
                .encode(),
            )),
            Request::GetRegionInfo => {
                let RegionIndex { index } = RegionIndex::decode(&payload).map_err(bad_payload)?;
                let region = self
                    .data
                    .regions()
                    .get(index as usize)
                    .ok_or(Status::BadRegionIndex)?;
                Ok(Reply::Data(region.to_info(index).encode()))
            }
            Request::SetRegion => {
                let set = SetRegion::decode(&payload).map_err(bad_payload)?;
                let fd = fds.pop().ok_or(Status::BadFdCount)?;
                self.data.place(set, fd, features, &self.epoll)?;
                Ok(Reply::Ack)
            }
            Request::RemoveRegion => {
                let set = SetRegion::decode(&payload).map_err(bad_payload)?;
                self.data.remove(set, &self.epoll)?;
                Ok(Reply::Ack)
            }
            Request::Reset => {
                info!("reset");
                self.device.reset();
                if let Some(k) = self.state.as_mut() {
                    // A reset device starts over: its state is kept from now on.
                    k.arm();
                }
                Ok(Reply::Ack)
            }
            Request::Shutdown => {
                info!("shutdown requested; exiting");
                Ok(Reply::Exit)
            }
            Request::GetDoorbellInfo => {
                let RegionIndex { index } = RegionIndex::decode(&payload).map_err(bad_payload)?;
                let d = self
                    .resources
                    .doorbells()
                    .get(index as usize)
                    .ok_or(Status::BadRegionIndex)?;
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
                Ok(Reply::Data(info.encode()))
            }
            Request::GetIrqInfo => {
                let RegionIndex { index } = RegionIndex::decode(&payload).map_err(bad_payload)?;
                let i = self
                    .resources
                    .interrupts()
                    .get(index as usize)
                    .ok_or(Status::BadRegionIndex)?;
                let flags = if i.level { IRQ_LEVEL } else { 0 };
                Ok(Reply::Data(IrqInfo { index, flags }.encode()))
            }
            Request::SetMemTable => {
                let table = MemTable::decode(&payload).map_err(bad_payload)?;
                table
                    .check_page_alignment(super::resources::page_size())
                    .map_err(bad_payload)?;
                if table.regions.len() != fds.len() {
                    return Err(Status::BadFdCount.into());
                }
                self.resources
                    .set_memory_table(&table, fds)
                    .map_err(refused)?;
                Ok(Reply::Ack)
            }
            Request::SetDoorbell => {
                let RegionIndex { index } = RegionIndex::decode(&payload).map_err(bad_payload)?;
                let fd = fds.pop().ok_or(Status::BadFdCount)?;
                self.resources
                    .set_doorbell(index as usize, fd, &self.epoll)
                    .map_err(refused)?;
                Ok(Reply::Ack)
            }
            Request::SetIrq => self.set_irq(&payload, fds),
            Request::SetCmdRing => {
                let set = SetCmdRing::decode(&payload).map_err(bad_payload)?;
                self.data.set_ring(set, fds, &self.epoll)?;
                Ok(Reply::Ack)
            }
            Request::SetDirectMap => Err(Status::Unsupported.into()),
            Request::SetStateArea => {
                let fd = fds.pop().ok_or(Status::BadFdCount)?;
                let (keeper, had) = crate::state::Keeper::new(fd, &self.name, self.kind.0)
                    .map_err(state_refused)?;
                info!(
                    "state area set{}",
                    if had { " (holds a record)" } else { "" }
                );
                self.state = Some(keeper);
                Ok(Reply::Ack)
            }
            Request::RestoreState => {
                let keeper = self
                    .state
                    .as_mut()
                    .ok_or_else(|| state_refused(crate::state::Error::NoArea))?;
                let served = keeper.restore(&mut self.device).map_err(state_refused)?;
                self.data.set_served(&served);
                // A paused backend whose successor failed to start resumes.
                self.paused = false;
                info!("state restored");
                Ok(Reply::Ack)
            }
            Request::SaveState => {
                let keeper = self
                    .state
                    .as_mut()
                    .ok_or_else(|| state_refused(crate::state::Error::NoArea))?;
                // Queued data commands were served before this request.
                self.device.pause();
                self.paused = true;
                keeper
                    .save(&self.device, self.data.served())
                    .map_err(state_refused)?;
                info!("paused and state saved; serving control requests only");
                Ok(Reply::Ack)
            }
        }
    }

    fn hello(&mut self, payload: &[u8]) -> Result<Reply, Refusal> {
        if self.negotiated.is_some() {
            return Err(Status::Unsupported.into());
        }
        let peer = Hello::decode(payload).map_err(bad_payload)?;
        let ours = Hello::ours(self.features);
        match ours.negotiate(&peer) {
            Ok(n) => {
                info!(
                    "negotiated protocol version {} features {:#x}",
                    n.version, n.features
                );
                self.negotiated = Some(n);
                Ok(Reply::Data(ours.encode()))
            }
            Err(e) => Err(Refusal {
                status: Status::NoCommonVersion,
                fatal: Some(e),
            }),
        }
    }

    fn set_irq(&mut self, payload: &[u8], mut fds: Vec<OwnedFd>) -> Result<Reply, Refusal> {
        let set = SetIrq::decode(payload).map_err(bad_payload)?;
        let wants = if set.flags & IRQ_RESAMPLE != 0 { 2 } else { 1 };
        if fds.len() != wants {
            return Err(Status::BadFdCount.into());
        }
        let resample = if wants == 2 { fds.pop() } else { None };
        let fd = fds.pop().ok_or(Status::BadFdCount)?;
        let index = set.index as usize;
        let line = self
            .resources
            .set_irq(index, fd, resample, &self.epoll)
            .map_err(refused)?;
        self.device.connect_interrupt(index, line);
        Ok(Reply::Ack)
    }
}

/// Logs why a state request was refused: a bad area is BadFd, anything
/// else (no record, another device's, a version the device cannot read,
/// corrupt bytes) DeviceError.
fn state_refused(e: crate::state::Error) -> Refusal {
    warn!("{}", outboard_protocol::error_chain(&e));
    match e {
        crate::state::Error::BadArea | crate::state::Error::Map(_) => Status::BadFd.into(),
        _ => Status::DeviceError.into(),
    }
}

/// Logs why a resource was refused and turns it into its status.
fn refused(e: super::resources::Error) -> Refusal {
    warn!("{}", outboard_protocol::error_chain(&e));
    e.status().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::testutil::{backend, hello, reply, send, status, TestDevice};
    use outboard_protocol::control::{
        ObjectIndex, FEATURES_SUPPORTED, FLAG_NEED_REPLY, F_MEM_TABLE, F_STATE, HEADER_VERSION,
    };

    fn header(request: u32, flags: u32) -> Header {
        Header {
            request,
            flags: HEADER_VERSION | flags,
            size: 0,
        }
    }

    #[test]
    fn check_request_when_checks_fail_then_first_failure_in_spec_order() {
        let h = |r: Request| header(r as u32, 0);
        let reply = Header::reply(Request::Hello as u32, 0, false);
        assert_eq!(
            check_request(&reply, 16, 0, None),
            Err(Status::UnexpectedReply)
        );
        assert_eq!(
            check_request(&header(99, 0), 0, 0, None),
            Err(Status::UnknownRequest)
        );
        assert_eq!(
            check_request(&h(Request::SetDirectMap), 3, 5, None),
            Err(Status::Unsupported)
        );
        assert_eq!(
            check_request(&h(Request::GetRegionInfo), 8, 1, None),
            Err(Status::BadFdCount)
        );
        assert_eq!(
            check_request(&h(Request::GetRegionInfo), 4, 0, None),
            Err(Status::BadPayload)
        );
        assert_eq!(
            check_request(&h(Request::GetRegionInfo), 8, 0, None),
            Err(Status::NotNegotiated)
        );
        assert_eq!(
            check_request(&h(Request::SetDoorbell), 8, 1, Some(F_MEM_TABLE)),
            Err(Status::Unsupported)
        );
        assert_eq!(
            check_request(&h(Request::Hello), 16, 0, None),
            Ok(Request::Hello)
        );
        assert_eq!(
            check_request(&h(Request::SetMemTable), 32, 0, Some(FEATURES_SUPPORTED)),
            Err(Status::BadFdCount)
        );
    }

    #[test]
    fn hello_when_device_needs_no_memory_then_mem_table_not_offered() {
        let (mut b, ch) = backend(TestDevice::default());
        let theirs = hello(&mut b, &ch);
        // The test device keeps no state: no state area either.
        assert_eq!(
            theirs.features,
            FEATURES_SUPPORTED & !(F_MEM_TABLE | F_STATE)
        );
        assert!(!b.device().got_memory);
        let (mut b, ch) = backend(TestDevice {
            needs_memory: true,
            ..TestDevice::default()
        });
        assert_eq!(hello(&mut b, &ch).features, FEATURES_SUPPORTED & !F_STATE);
        assert!(b.device().got_memory);
        assert_eq!(
            b.negotiated().map(|n| n.features),
            Some(FEATURES_SUPPORTED & !F_STATE)
        );
    }

    #[test]
    fn set_mem_table_when_memory_not_offered_then_unsupported() {
        let (mut b, ch) = backend(TestDevice::default());
        hello(&mut b, &ch);
        let (a, _keep) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let table = MemTable {
            regions: vec![outboard_protocol::control::MemRegion {
                guest_addr: 0,
                size: 4096,
                fd_offset: 0,
            }],
        };
        use std::os::fd::AsRawFd;
        send(&ch, Request::SetMemTable, &table.encode(), &[a.as_raw_fd()]);
        let m = reply(&mut b, &ch);
        assert!(m.header.is_error());
        assert_eq!(status(&m), Status::Unsupported);
    }

    #[test]
    fn hello_when_sent_twice_then_unsupported_and_first_result_kept() {
        let (mut b, ch) = backend(TestDevice::default());
        hello(&mut b, &ch);
        send(&ch, Request::Hello, &Hello::ours(0).encode(), &[]);
        let m = reply(&mut b, &ch);
        assert_eq!(status(&m), Status::Unsupported);
        assert_eq!(
            b.negotiated().map(|n| n.features),
            Some(FEATURES_SUPPORTED & !(F_MEM_TABLE | F_STATE))
        );
    }

    #[test]
    fn hello_when_no_common_version_then_error_reply_and_violation() {
        let (mut b, ch) = backend(TestDevice::default());
        let peer = Hello {
            min_version: 7,
            max_version: 9,
            features: 0,
        };
        send(&ch, Request::Hello, &peer.encode(), &[]);
        assert!(matches!(
            b.process_ready(),
            Err(crate::runtime::Error::Control(Error::Violation(_)))
        ));
        let m = ch.recv().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status(&m), Status::NoCommonVersion);
    }

    #[test]
    fn request_when_need_reply_clear_then_only_info_requests_answered() {
        let (mut b, ch) = backend(TestDevice::default());
        hello(&mut b, &ch);
        ch.send(header(Request::Reset as u32, 0), &[], &[])
            .unwrap_or_else(|e| panic!("{e}"));
        let bad = ObjectIndex { index: 9 };
        ch.send(
            Header::request(Request::GetRegionInfo, 8, false),
            &bad.encode(),
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let m = reply(&mut b, &ch);
        assert_eq!(m.header.request, Request::GetRegionInfo as u32);
        assert_eq!(status(&m), Status::BadRegionIndex);
        assert_eq!(b.device().resets, 1, "reset done without a reply");
    }

    #[test]
    fn device_info_when_features_not_negotiated_then_counts_zero() {
        let (mut b, ch) = backend(TestDevice::default());
        send(&ch, Request::Hello, &Hello::ours(0).encode(), &[]);
        reply(&mut b, &ch);
        send(&ch, Request::GetDeviceInfo, &[], &[]);
        let info =
            DeviceInfo::decode(&reply(&mut b, &ch).payload).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (info.num_regions, info.num_doorbells, info.num_irqs),
            (2, 0, 0)
        );
        assert_eq!(info.name, "test");
    }

    #[test]
    fn shutdown_when_requested_then_acknowledged_and_exit() {
        let (mut b, ch) = backend(TestDevice::default());
        hello(&mut b, &ch);
        send(&ch, Request::Shutdown, &[], &[]);
        assert_eq!(b.process_ready().ok(), Some(Flow::Exit));
        let m = ch.recv().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status(&m), Status::Ok);
    }

    #[test]
    fn header_when_bad_version_then_error_reply_and_violation() {
        let (mut b, ch) = backend(TestDevice::default());
        let mut raw = header(Request::Hello as u32, FLAG_NEED_REPLY).encode();
        raw[4] = 2;
        ch.send_raw(&raw, &[]).unwrap_or_else(|e| panic!("{e}"));
        let e = b
            .process_ready()
            .err()
            .map(|e| outboard_protocol::error_chain(&e));
        assert_eq!(
            e.as_deref(),
            Some("protocol violation on the control channel: unsupported header version 2")
        );
        assert_eq!(
            status(&ch.recv().unwrap_or_else(|e| panic!("{e}"))),
            Status::BadVersion
        );
    }

    #[test]
    fn control_when_frontend_closes_then_exit() {
        let (mut b, ch) = backend(TestDevice::default());
        drop(ch);
        assert_eq!(b.process_ready().ok(), Some(Flow::Exit));
    }
}
