//! The fake backend of tests/mutation_replies.rs: a thread that speaks the
//! control protocol faithfully (a two-region device with one doorbell and
//! one interrupt line) and serves data sockets, except that each reply or
//! response can be mutated as the test's plan says. Everything it puts on
//! the wire is logged before it is sent, so the test can judge what the
//! frontend did with it.

use std::collections::VecDeque;
use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use outboard_protocol::channel::Channel;
use outboard_protocol::control::{
    DeviceInfo, DeviceKind, DoorbellInfo, Header, Hello, IrqInfo, Payload, RegionIndex, RegionInfo,
    Request, Status, StatusReply, FEATURES_SUPPORTED, FLAG_ERROR, FLAG_NEED_REPLY, FLAG_REPLY,
    F_CMD_RING, MAX_FDS, MAX_PAYLOAD, REGION_READ, REGION_WRITE,
};
use outboard_protocol::ioregionfd::{Cmd, Op, Resp, CMD_SIZE, RESP_SIZE};
use outboard_tests::{socket_path, Rand};

use crate::mutation_support::{backend_fd, FdKind};

/// What the fake offers: everything but command rings (it serves data
/// sockets only).
pub const FAKE_FEATURES: u64 = FEATURES_SUPPORTED & !F_CMD_RING;

/// The device the fake describes when it is faithful.
pub fn device_info() -> DeviceInfo {
    DeviceInfo {
        kind: DeviceKind::OTHER,
        num_regions: 2,
        num_doorbells: 1,
        num_irqs: 1,
        name: "fake".into(),
    }
}

pub fn region_info(index: u32) -> Option<RegionInfo> {
    let (flags, size) = match index {
        0 => (REGION_READ | REGION_WRITE, 0x100),
        1 => (REGION_READ, 0x10),
        _ => return None,
    };
    Some(RegionInfo {
        index,
        flags,
        size,
        preferred_addr: 0,
        access_sizes: 0x0f,
        name: format!("r{index}"),
    })
}

/// A control reply as bytes, and how it goes on the wire.
#[derive(Debug, Clone)]
pub struct Reply {
    pub header: [u8; 12],
    pub payload: Vec<u8>,
    /// Eventfds attached to the first byte.
    pub fds: usize,
    /// Send only this many bytes, then close.
    pub cut: Option<usize>,
}

impl Reply {
    pub fn size(&self) -> u32 {
        u32::from_le_bytes([
            self.header[8],
            self.header[9],
            self.header[10],
            self.header[11],
        ])
    }

    fn set_size(&mut self, s: u32) {
        self.header[8..12].copy_from_slice(&s.to_le_bytes());
    }

    /// The fake closes its end after this reply: the frontend must not
    /// wait for bytes that never come, nor read a stream that lost framing.
    pub fn closes(&self) -> bool {
        self.cut.is_some() || self.size() as usize != self.payload.len()
    }
}

/// One control exchange as the fake saw and answered it.
#[derive(Debug, Clone)]
pub struct Sent {
    pub request: Header,
    pub request_payload: Vec<u8>,
    pub reply: Reply,
}

/// One data response as the fake sent it.
#[derive(Debug, Clone)]
pub struct DataSent {
    pub cmd: Cmd,
    /// The bytes sent (fewer than 32: then the socket was closed).
    pub bytes: Vec<u8>,
}

/// How to answer the next control request or data command: `None` is
/// faithful, `Some(seed)` mutates with a generator seeded so.
pub type Plan = Arc<Mutex<VecDeque<Option<u64>>>>;

/// A running fake backend.
pub struct Fake {
    pub path: PathBuf,
    pub control: Plan,
    pub data: Plan,
    pub log: Receiver<Sent>,
    pub data_log: Receiver<DataSent>,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    pub fn start() -> Fake {
        let path = socket_path("fake-replies");
        let listener = UnixListener::bind(&path).unwrap();
        let control: Plan = Arc::default();
        let data: Plan = Arc::default();
        let (tx, log) = mpsc::channel();
        let (dtx, data_log) = mpsc::channel();
        let (c, d) = (Arc::clone(&control), Arc::clone(&data));
        let thread = thread::spawn(move || {
            if let Ok((sock, _)) = listener.accept() {
                serve_control(Channel::new(sock), &c, &d, &tx, &dtx);
            }
        });
        Fake {
            path,
            control,
            data,
            log,
            data_log,
            thread: Some(thread),
        }
    }

    /// Every control exchange since the last call.
    pub fn drain(&self) -> Vec<Sent> {
        self.log.try_iter().collect()
    }

    /// Waits for the fake to see the frontend close the control socket.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn next(plan: &Plan) -> Option<u64> {
    plan.lock().unwrap().pop_front().flatten()
}

fn serve_control(
    ch: Channel,
    plan: &Plan,
    data: &Plan,
    log: &Sender<Sent>,
    dlog: &Sender<DataSent>,
) {
    while let Ok(m) = ch.recv() {
        let mut reply = faithful(m.header.request, &m.payload);
        if let Some(seed) = next(plan) {
            mutate_reply(&mut Rand(seed | 1), &mut reply);
        }
        if m.header.request == Request::SetRegion as u32 {
            if let Some(fd) = m.fds.into_iter().next() {
                let (plan, log) = (Arc::clone(data), dlog.clone());
                thread::spawn(move || serve_data(UnixStream::from(fd), &plan, &log));
            }
        }
        let _ = log.send(Sent {
            request: m.header,
            request_payload: m.payload,
            reply: reply.clone(),
        });
        let eventfds: Vec<OwnedFd> = (0..reply.fds)
            .map(|_| backend_fd(FdKind::Eventfd).0)
            .collect();
        let raw: Vec<RawFd> = eventfds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut bytes = reply.header.to_vec();
        bytes.extend_from_slice(&reply.payload);
        bytes.truncate(reply.cut.unwrap_or(bytes.len()));
        if ch.send_raw(&bytes, &raw).is_err() || reply.closes() {
            let _ = ch.socket().shutdown(Shutdown::Write);
        }
    }
}

/// What a correct backend answers.
fn faithful(code: u32, payload: &[u8]) -> Reply {
    let index = RegionIndex::decode(payload).map_or(u32::MAX, |r| r.index);
    let data: Result<Vec<u8>, Status> = match Request::from_u32(code) {
        // It serves data sockets only, never a command ring.
        Ok(Request::Hello) => Ok(Hello::ours(FAKE_FEATURES).encode()),
        Ok(Request::GetDeviceInfo) => Ok(device_info().encode()),
        Ok(Request::GetRegionInfo) => region_info(index)
            .map(|r| r.encode())
            .ok_or(Status::BadRegionIndex),
        Ok(Request::GetDoorbellInfo) if index == 0 => Ok(DoorbellInfo {
            index,
            region: 1,
            offset: 0,
            size: 4,
            flags: 0,
            datamatch: 0,
        }
        .encode()),
        Ok(Request::GetIrqInfo) if index == 0 => Ok(IrqInfo { index, flags: 0 }.encode()),
        Ok(Request::GetDoorbellInfo | Request::GetIrqInfo) => Err(Status::BadRegionIndex),
        Ok(_) => Ok(StatusReply { status: Status::Ok }.encode()),
        Err(_) => Err(Status::UnknownRequest),
    };
    let (payload, error) = match data {
        Ok(p) => (p, false),
        Err(status) => (StatusReply { status }.encode(), true),
    };
    Reply {
        header: Header::reply(code, payload.len(), error).encode(),
        payload,
        fds: 0,
        cut: None,
    }
}

fn below(r: &mut Rand, n: u64) -> u64 {
    r.next_u64() % n.max(1)
}

/// Applies 1 to 3 mutations. Payload edits keep the size field equal to
/// the payload length; only the size-field edits (and header bit flips that
/// hit it) make it lie, and then the fake closes after sending.
pub fn mutate_reply(r: &mut Rand, m: &mut Reply) {
    for _ in 0..1 + below(r, 3) {
        let len = m.payload.len() as u64;
        match below(r, 11) {
            0 => {
                let at = below(r, 12) as usize;
                m.header[at] ^= 1 << below(r, 8);
            }
            1 => {
                let at = below(r, 12) as usize;
                m.header[at] = r.next_u64() as u8;
            }
            2 if len > 0 => {
                let at = below(r, len) as usize;
                m.payload[at] ^= 1 << below(r, 8);
            }
            3 => {
                let bit = [FLAG_NEED_REPLY, FLAG_REPLY, FLAG_ERROR][below(r, 3) as usize];
                let f = flags(m) ^ bit;
                m.header[4..8].copy_from_slice(&f.to_le_bytes());
            }
            4 => {
                let code = below(r, 16) as u32;
                m.header[0..4].copy_from_slice(&code.to_le_bytes());
            }
            5 => {
                m.payload.truncate(below(r, len + 1) as usize);
                m.set_size(m.payload.len() as u32);
            }
            6 => {
                for _ in 0..1 + below(r, 24) {
                    m.payload.push(r.next_u64() as u8);
                }
                m.set_size(m.payload.len() as u32);
            }
            7 => {
                let s = match below(r, 3) {
                    0 => MAX_PAYLOAD + 1 + below(r, 1 << 20) as u32,
                    1 => (len + 1 + below(r, 16)) as u32,
                    _ => below(r, len) as u32,
                };
                m.set_size(s);
            }
            8 => m.fds = 1 + below(r, MAX_FDS as u64 + 1) as usize,
            9 => {
                // A garbage status, with or without ERROR.
                let status = below(r, 20) as u32;
                let reserved = if below(r, 4) == 0 {
                    r.next_u64() as u32
                } else {
                    0
                };
                m.payload = [status.to_le_bytes(), reserved.to_le_bytes()].concat();
                m.set_size(8);
                let f = if below(r, 2) == 0 {
                    flags(m) ^ FLAG_ERROR
                } else {
                    flags(m)
                };
                m.header[4..8].copy_from_slice(&f.to_le_bytes());
            }
            _ => m.cut = Some(1 + below(r, 12 + len - 1) as usize),
        }
    }
}

fn flags(m: &Reply) -> u32 {
    u32::from_le_bytes([m.header[4], m.header[5], m.header[6], m.header[7]])
}

/// Serves one data socket: reads answer a value derived from the command,
/// writes answer zero, unless the plan mutates the response.
fn serve_data(mut sock: UnixStream, plan: &Plan, log: &Sender<DataSent>) {
    let mut b = [0u8; CMD_SIZE];
    while sock.read_exact(&mut b).is_ok() {
        let Ok(cmd) = Cmd::decode(&b) else { return };
        if !cmd.resp {
            continue;
        }
        let data = match cmd.op {
            Op::Read => cmd
                .size
                .truncate(cmd.offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ cmd.user_data),
            Op::Write => 0,
        };
        let mut resp = Resp { data }.encode();
        let mut cut = RESP_SIZE;
        if let Some(seed) = next(plan) {
            let r = &mut Rand(seed | 1);
            let width = 8 * cmd.size.bytes();
            let flip = |resp: &mut [u8; RESP_SIZE], bit: u64| {
                resp[..8].copy_from_slice(&(data ^ (1 << bit)).to_ne_bytes());
            };
            match below(r, 4) {
                // Any bit of the 32 bytes.
                0 => resp[below(r, 32) as usize] ^= 1 << below(r, 8),
                // A bit of the data above the access width (any, for a write).
                1 => {
                    let low = if cmd.op == Op::Read { width } else { 0 };
                    if low < 64 {
                        flip(&mut resp, low + below(r, 64 - low));
                    }
                }
                // A short response, then EOF.
                2 => cut = below(r, RESP_SIZE as u64) as usize,
                // A bit of the data within the access width: still valid for a read.
                _ => flip(&mut resp, below(r, width)),
            }
        }
        let bytes = resp[..cut].to_vec();
        let _ = log.send(DataSent {
            cmd,
            bytes: bytes.clone(),
        });
        let _ = std::io::Write::write_all(&mut sock, &bytes);
        if bytes.len() < RESP_SIZE {
            let _ = sock.shutdown(Shutdown::Write);
            return;
        }
    }
}
