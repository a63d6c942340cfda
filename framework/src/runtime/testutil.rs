//! A small device and a scripted frontend for the runtime's unit tests.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use outboard_protocol::channel::{Channel, Message};
use outboard_protocol::control::{
    Header, Hello, Payload, Request, SetRegion, StatusReply, FEATURES_SUPPORTED,
};
use outboard_protocol::{Access, AccessSize};

use super::Backend;
use crate::device::{Device, DeviceDescription, Doorbell, GuestMemory, Interrupt, InterruptLine};
use crate::events::EventOps;
use crate::Region;

/// Id the test device registers its watched socket under.
pub const WATCH_ID: u32 = 5;

/// Records everything the runtime asks of it. Region 0 `regs` (MMIO, 256
/// bytes, posted writes), region 1 `ro` (read-only, 16 bytes, 4-byte
/// accesses); doorbell 0 at regs+0x10; line 0 edge, line 1 level.
#[derive(Debug, Default)]
pub struct TestDevice {
    pub needs_memory: bool,
    pub reads: Vec<Access>,
    pub writes: Vec<(Access, u64)>,
    pub resets: usize,
    pub doorbells: Vec<(usize, u64)>,
    pub lines: Vec<usize>,
    pub resamples: Vec<usize>,
    pub events: Vec<u32>,
    pub got_memory: bool,
    pub watch: Option<UnixStream>,
}

impl Device for TestDevice {
    fn describe(&self) -> DeviceDescription {
        let d = DeviceDescription::new("test")
            .region(Region::mmio("regs", 0x100).posted_writes())
            .region(
                Region::mmio("ro", 16)
                    .read_only()
                    .access_sizes(&[AccessSize::B4]),
            )
            .doorbell(Doorbell {
                region: 0,
                offset: 0x10,
                size: Some(AccessSize::B4),
                datamatch: None,
            })
            .interrupt(Interrupt { level: false })
            .interrupt(Interrupt { level: true });
        if self.needs_memory {
            d.needs_memory()
        } else {
            d
        }
    }

    fn read(&mut self, access: Access) -> u64 {
        self.reads.push(access);
        0x1122_3344_5566_7788 ^ access.offset
    }

    fn write(&mut self, access: Access, value: u64) {
        self.writes.push((access, value));
    }

    fn reset(&mut self) {
        self.resets += 1;
    }

    fn init(&mut self, ops: &EventOps) -> std::io::Result<()> {
        match &self.watch {
            Some(s) => ops.add(s, WATCH_ID),
            None => Ok(()),
        }
    }

    fn handle_event(&mut self, id: u32, _ops: &EventOps) {
        self.events.push(id);
        if let Some(s) = &mut self.watch {
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
        }
    }

    fn doorbell(&mut self, index: usize, count: u64) {
        self.doorbells.push((index, count));
    }

    fn connect_interrupt(&mut self, index: usize, _line: InterruptLine) {
        self.lines.push(index);
    }

    fn resample(&mut self, index: usize) {
        self.resamples.push(index);
    }

    fn set_memory(&mut self, _mem: GuestMemory) {
        self.got_memory = true;
    }
}

/// A backend serving `dev` and the frontend's end of its control socket.
pub fn backend(dev: TestDevice) -> (Backend<TestDevice>, Channel) {
    let (ours, theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
    ours.set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap_or_else(|e| panic!("{e}"));
    let b = Backend::new(dev, theirs).unwrap_or_else(|e| panic!("backend: {e}"));
    (b, Channel::new(ours))
}

/// Sends a request with NEED_REPLY.
pub fn send(ch: &Channel, req: Request, payload: &[u8], fds: &[RawFd]) {
    ch.send(Header::request(req, payload.len(), true), payload, fds)
        .unwrap_or_else(|e| panic!("send: {e}"));
}

/// True when `fd` is readable now.
pub fn readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one live pollfd and the count passed is 1.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// Lets the backend serve until a reply is waiting, then reads it.
pub fn reply(b: &mut Backend<TestDevice>, ch: &Channel) -> Message {
    for _ in 0..100 {
        let _ = b.process_ready().unwrap_or_else(|e| panic!("serve: {e}"));
        if readable(ch.socket().as_raw_fd()) {
            break;
        }
    }
    ch.recv().unwrap_or_else(|e| panic!("recv: {e}"))
}

/// The status of an error reply (or of an acknowledgement).
pub fn status(m: &Message) -> outboard_protocol::control::Status {
    StatusReply::decode(&m.payload)
        .unwrap_or_else(|e| panic!("status reply: {e}"))
        .status
}

/// Negotiates with every feature; returns the backend's Hello.
pub fn hello(b: &mut Backend<TestDevice>, ch: &Channel) -> Hello {
    send(
        ch,
        Request::Hello,
        &Hello::ours(FEATURES_SUPPORTED).encode(),
        &[],
    );
    let m = reply(b, ch);
    assert!(!m.header.is_error(), "hello refused");
    Hello::decode(&m.payload).unwrap_or_else(|e| panic!("hello: {e}"))
}

/// Places region `index` with `user_data` (and `flags`); returns the
/// frontend's end of its data socket.
pub fn place(
    b: &mut Backend<TestDevice>,
    ch: &Channel,
    index: u32,
    flags: u32,
    user_data: u64,
) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
    ours.set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap_or_else(|e| panic!("{e}"));
    let set = SetRegion {
        index,
        flags,
        guest_addr: 0x1000,
        user_data,
    };
    send(ch, Request::SetRegion, &set.encode(), &[theirs.as_raw_fd()]);
    let m = reply(b, ch);
    assert!(!m.header.is_error(), "set region: {:?}", status(&m));
    ours
}

/// Writes raw command bytes to a data socket.
pub fn put(sock: &mut UnixStream, bytes: &[u8]) {
    sock.write_all(bytes).unwrap_or_else(|e| panic!("{e}"));
}
