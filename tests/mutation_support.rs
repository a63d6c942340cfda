//! The mutator and the oracle of tests/mutation.rs: what docs/protocol.md
//! says a backend does with a (possibly malformed) control message.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};

use outboard_protocol::control::{
    Header, Hello, Payload, Request, Status, FLAG_ERROR, FLAG_NEED_REPLY, FLAG_REPLY, MAX_FDS,
    MAX_PAYLOAD,
};
use outboard_tests::Rand;

/// Request codes answered whatever NEED_REPLY says (section 3.5).
pub const ALWAYS_REPLIED: [u32; 5] = [1, 2, 3, 12, 13];

/// Kinds of fd a message can carry; every one is freshly created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    Stream,
    Dgram,
    Eventfd,
    SealedMemfd,
    Pipe,
}

const KINDS: [FdKind; 5] = [
    FdKind::Stream,
    FdKind::Dgram,
    FdKind::Eventfd,
    FdKind::SealedMemfd,
    FdKind::Pipe,
];

/// A control message as bytes: the raw header, the payload, the fds.
#[derive(Debug, Clone)]
pub struct Msg {
    pub header: [u8; 12],
    pub payload: Vec<u8>,
    pub fds: Vec<FdKind>,
}

impl Msg {
    pub fn with_code(mut self, code: u32) -> Self {
        self.header[0..4].copy_from_slice(&code.to_le_bytes());
        self
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }

    fn set_flags(&mut self, f: u32) {
        self.header[4..8].copy_from_slice(&f.to_le_bytes());
    }

    fn size(&self) -> u32 {
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
}

/// The fd the backend gets for `kind`, and our end when it is a stream
/// socket (kept open by the caller while the placement may be live).
pub fn backend_fd(kind: FdKind) -> (OwnedFd, Option<UnixStream>) {
    match kind {
        FdKind::Stream => {
            let (ours, theirs) = UnixStream::pair().unwrap();
            (theirs.into(), Some(ours))
        }
        FdKind::Dgram => (UnixDatagram::pair().unwrap().0.into(), None),
        FdKind::Eventfd => {
            // SAFETY: eventfd(2) takes plain integers.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            assert!(fd >= 0);
            // SAFETY: eventfd just returned this fd; we are its only owner.
            (unsafe { OwnedFd::from_raw_fd(fd) }, None)
        }
        FdKind::SealedMemfd => {
            // SAFETY: the name is a NUL-terminated literal.
            let fd = unsafe {
                libc::memfd_create(
                    c"mutation".as_ptr(),
                    libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
                )
            };
            assert!(fd >= 0);
            // SAFETY: memfd_create just returned this fd; we are its only owner.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: plain integer arguments on an fd we own.
            unsafe {
                assert_eq!(libc::ftruncate(fd, 0x1000), 0);
                assert_eq!(
                    libc::fcntl(
                        fd,
                        libc::F_ADD_SEALS,
                        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
                    ),
                    0
                );
            }
            (owned, None)
        }
        FdKind::Pipe => {
            let mut p = [0i32; 2];
            // SAFETY: pipe2(2) writes two fds into the two-element array.
            assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: both fds were just created; each gets one owner.
            let (r, _w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
            (r, None)
        }
    }
}

/// Applies 1 to 3 random mutations, then keeps the payload length equal to
/// the header's size field whenever that field is within the limit, so the
/// stream stays framed (framing loss is tested by cuts and by sizes above
/// the limit, which the backend must refuse before reading a payload).
pub struct Mutator<'a>(pub &'a mut Rand);

impl Mutator<'_> {
    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n.max(1)
    }

    pub fn mutate(&mut self, m: &mut Msg) {
        let before = m.size();
        for _ in 0..1 + self.below(3) {
            match self.below(12) {
                0 => {
                    let at = self.below(12) as usize;
                    m.header[at] ^= 1 << self.below(8);
                }
                1 => {
                    let at = self.below(12) as usize;
                    m.header[at] = self.0.next_u64() as u8;
                }
                2 | 3 if !m.payload.is_empty() => {
                    let at = self.below(m.payload.len() as u64) as usize;
                    m.payload[at] ^= 1 << self.below(8);
                }
                4 => {
                    let n = self.below(m.payload.len() as u64 + 1) as usize;
                    m.payload.truncate(n);
                    m.set_size(n as u32);
                }
                5 => {
                    for _ in 0..1 + self.below(24) {
                        m.payload.push(self.0.next_u64() as u8);
                    }
                    m.set_size(m.payload.len() as u32);
                }
                6 => {
                    let s = match self.below(3) {
                        0 => MAX_PAYLOAD + 1 + self.below(1 << 20) as u32,
                        1 => MAX_PAYLOAD,
                        _ => self.below(64) as u32,
                    };
                    m.set_size(s);
                }
                7 => {
                    let bit = [FLAG_NEED_REPLY, FLAG_REPLY, FLAG_ERROR][self.below(3) as usize];
                    let f = m.flags() ^ bit;
                    m.set_flags(f);
                }
                8 => {
                    let code = self.below(16) as u32;
                    *m = m.clone().with_code(code);
                }
                9 if !m.fds.is_empty() => {
                    let at = self.below(m.fds.len() as u64) as usize;
                    m.fds.remove(at);
                }
                10 => {
                    let k = KINDS[self.below(5) as usize];
                    let n = if self.below(8) == 0 {
                        MAX_FDS + 1 - m.fds.len().min(MAX_FDS)
                    } else {
                        1
                    };
                    m.fds.extend(std::iter::repeat_n(k, n));
                }
                _ if !m.fds.is_empty() => {
                    let at = self.below(m.fds.len() as u64) as usize;
                    m.fds[at] = KINDS[self.below(5) as usize];
                }
                _ => m.payload.push(0),
            }
        }
        if m.size() == before && m.size() as usize != m.payload.len() && m.size() <= MAX_PAYLOAD {
            // A payload mutation without a size change: keep them equal.
            m.set_size(m.payload.len() as u32);
        }
        if m.size() <= MAX_PAYLOAD {
            m.payload.resize(m.size() as usize, 0);
        }
    }
}

/// Where to cut a message short: 1 to all-but-one byte of it.
pub fn cut_point(r: &mut Rand, m: &Msg) -> usize {
    let len = 12 + m.payload.len();
    1 + (r.next_u64() % (len as u64 - 1)) as usize
}

/// What the backend must do with a message (sections 3.5, 3.6 and 5).
#[derive(Debug, Clone)]
pub enum Expect {
    /// A framing error: at most this one error reply, then exit 2.
    Fatal { reply: Option<Status> },
    /// Refused with exactly this status by checks 1 to 7.
    Refused(Status),
    /// HELLO with this payload, before any HELLO succeeded.
    Hello(Hello),
    /// Request-specific checks: success or one of these statuses.
    Step8(Request, Vec<Status>),
}

/// The expected outcome of `m` for a backend that negotiated `features`
/// (`None`: no HELLO yet).
pub fn expect_of(m: &Msg, features: Option<u64>) -> Expect {
    if m.fds.len() > MAX_FDS {
        return Expect::Fatal { reply: None };
    }
    let h = match Header::decode(&m.header) {
        Ok(h) => h,
        Err(e) => {
            return Expect::Fatal {
                reply: Some(Status::for_error(&e)),
            }
        }
    };
    if h.is_reply() {
        return Expect::Refused(Status::UnexpectedReply);
    }
    let Ok(req) = Request::from_u32(h.request) else {
        return Expect::Refused(Status::UnknownRequest);
    };
    if req == Request::SetDirectMap {
        return Expect::Refused(Status::Unsupported);
    }
    let (lo, hi) = req.fd_range();
    if m.fds.len() < lo || m.fds.len() > hi {
        return Expect::Refused(Status::BadFdCount);
    }
    if req.payload_size().is_some_and(|s| s != m.payload.len()) {
        return Expect::Refused(Status::BadPayload);
    }
    if features.is_none() && req != Request::Hello {
        return Expect::Refused(Status::NotNegotiated);
    }
    if req
        .feature()
        .is_some_and(|f| features.unwrap_or(0) & f == 0)
    {
        return Expect::Refused(Status::Unsupported);
    }
    let specific: &[Status] = match req {
        Request::Hello if features.is_some() => return Expect::Refused(Status::Unsupported),
        Request::Hello => match Hello::decode(&m.payload) {
            Ok(p) => return Expect::Hello(p),
            Err(_) => return Expect::Refused(Status::BadPayload),
        },
        Request::GetRegionInfo | Request::GetDoorbellInfo | Request::GetIrqInfo => {
            &[Status::BadPayload, Status::BadRegionIndex]
        }
        Request::SetRegion => &[
            Status::BadRegionIndex,
            Status::RegionBusy,
            Status::BadPayload,
            Status::Unsupported,
            Status::BadFd,
        ],
        Request::RemoveRegion => &[
            Status::BadRegionIndex,
            Status::NoSuchRegion,
            Status::BadPayload,
        ],
        Request::SetMemTable => &[Status::BadPayload, Status::BadFdCount, Status::BadFd],
        Request::SetDoorbell => &[Status::BadPayload, Status::BadRegionIndex, Status::BadFd],
        Request::SetIrq => &[
            Status::BadPayload,
            Status::BadRegionIndex,
            Status::BadFd,
            Status::BadFdCount,
        ],
        _ => &[],
    };
    let mut allowed = specific.to_vec();
    allowed.push(Status::DeviceError);
    Expect::Step8(req, allowed)
}
