//! The control channel: message header, request codes and payloads.
//!
//! Every control message is a 12-byte little-endian [`Header`] followed by
//! `size` payload bytes and, for some requests, file descriptors passed with
//! SCM_RIGHTS on the first byte of the header. Payloads have fixed layouts
//! (see each type); names are fixed-width, NUL-padded UTF-8.
//!
//! This module only encodes and decodes; [`crate::channel`] moves messages
//! over a socket, and `docs/protocol.md` states the ordering rules.

use thiserror::Error;

/// Size in bytes of an encoded [`Header`].
pub const HEADER_SIZE: usize = 12;
/// Largest payload a peer may send; a larger `size` loses framing.
pub const MAX_PAYLOAD: u32 = 4096;
/// Most file descriptors one message may carry; more loses framing.
pub const MAX_FDS: usize = 8;
/// Version of the header layout, carried in bits 0..=7 of every header's flags.
pub const HEADER_VERSION: u32 = 1;

/// Oldest protocol version this implementation speaks.
pub const PROTOCOL_VERSION_MIN: u32 = 1;
/// Newest protocol version this implementation speaks.
pub const PROTOCOL_VERSION_MAX: u32 = 1;

/// Flags: mask of the header version field.
pub const FLAG_VERSION_MASK: u32 = 0xff;
/// Flags: this message is a reply.
pub const FLAG_REPLY: u32 = 1 << 8;
/// Flags: the sender wants a reply even for an acknowledgement-only request.
pub const FLAG_NEED_REPLY: u32 = 1 << 9;
/// Flags: this reply reports a failure; its payload is a [`StatusReply`].
pub const FLAG_ERROR: u32 = 1 << 10;
const FLAGS_KNOWN: u32 = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY | FLAG_ERROR;

/// Feature: regions may be set with posted (unacknowledged) writes.
pub const F_POSTED_WRITES: u64 = 1 << 0;
/// Feature: FAST_MMIO regions (write-only regions whose writes only ring doorbells).
pub const F_FAST_MMIO: u64 = 1 << 1;
/// Feature: guest memory table ([`Request::SetMemTable`]).
pub const F_MEM_TABLE: u64 = 1 << 2;
/// Feature: doorbell eventfds with ioeventfd semantics.
pub const F_DOORBELL: u64 = 1 << 3;
/// Feature: interrupt eventfds with irqfd semantics.
pub const F_IRQ: u64 = 1 << 4;
/// Feature (reserved): direct-mapped (mmap) regions.
pub const F_DIRECT_MAP: u64 = 1 << 5;
/// Feature: per-vCPU `user_data` tokens ([`SetRegion::vcpu_tokens`]), so a
/// backend learns which vCPU made an access without any change to the
/// 32-byte ioregionfd command.
pub const F_VCPU_TOKENS: u64 = 1 << 6;
/// Every feature this implementation can negotiate today.
pub const FEATURES_SUPPORTED: u64 =
    F_POSTED_WRITES | F_FAST_MMIO | F_MEM_TABLE | F_DOORBELL | F_IRQ | F_VCPU_TOKENS;

/// Errors from decoding control messages.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// unsupported header version {0}
    #[error("unsupported header version {0}")]
    BadVersion(u32),
    /// reserved header flag bits {0:#x} set
    #[error("reserved header flag bits {0:#x} set")]
    ReservedFlags(u32),
    /// payload of {0} bytes exceeds the limit
    #[error("payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    PayloadTooLarge(u32),
    /// unknown request code {0}
    #[error("unknown request code {0}")]
    UnknownRequest(u32),
    /// payload of {got} bytes where {expected} are required
    #[error("payload of {got} bytes where {expected} are required")]
    PayloadSize {
        /// Bytes the request requires.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// reserved field or flag bits set: {0}
    #[error("reserved field or flag bits set: {0}")]
    Reserved(&'static str),
    /// name is not NUL-padded UTF-8
    #[error("name is not NUL-padded UTF-8")]
    BadName,
    /// name longer than {0} bytes
    #[error("name longer than {0} bytes")]
    NameTooLong(usize),
    /// invalid access-size mask {0:#x}
    #[error("invalid access-size mask {0:#x}")]
    AccessSizes(u8),
    /// unknown status code {0}
    #[error("unknown status code {0}")]
    UnknownStatus(u32),
    /// no common protocol version: ours {our_min}..={our_max}, peer {peer_min}..={peer_max}
    #[error(
        "no common protocol version: ours {our_min}..={our_max}, peer {peer_min}..={peer_max}"
    )]
    NoCommonVersion {
        /// Our oldest version.
        our_min: u32,
        /// Our newest version.
        our_max: u32,
        /// The peer's oldest version.
        peer_min: u32,
        /// The peer's newest version.
        peer_max: u32,
    },
    /// version range {0}..={1} is empty
    #[error("version range {0}..={1} is empty")]
    EmptyVersionRange(u32, u32),
    /// invalid memory table: {0}
    #[error("invalid memory table: {0}")]
    MemTable(&'static str),
    /// invalid doorbell: {0}
    #[error("invalid doorbell: {0}")]
    Doorbell(&'static str),
}

/// Request codes. Code 11 is reserved for a later protocol feature and is
/// answered with [`Status::Unsupported`]; codes 8, 9, 10, 12 and 13 need
/// their feature negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Request {
    /// Version and feature negotiation; payload [`Hello`] both ways.
    Hello = 1,
    /// Device identity; no payload, reply [`DeviceInfo`].
    GetDeviceInfo = 2,
    /// One region's description; payload [`RegionIndex`], reply [`RegionInfo`].
    GetRegionInfo = 3,
    /// Place a region and hand over its data socket; payload [`SetRegion`], one fd.
    SetRegion = 4,
    /// Take a placed region down; payload [`SetRegion`] matching exactly, no fd.
    RemoveRegion = 5,
    /// Reset the device to its power-on state; no payload.
    Reset = 6,
    /// Acknowledge, then exit cleanly; no payload.
    Shutdown = 7,
    /// Guest memory table: payload [`MemTable`], one memfd per entry (needs [`F_MEM_TABLE`]).
    SetMemTable = 8,
    /// A doorbell's eventfd: payload [`ObjectIndex`], one eventfd (needs [`F_DOORBELL`]).
    SetDoorbell = 9,
    /// An interrupt line's eventfd: payload [`SetIrq`], one eventfd, or two with
    /// [`IRQ_RESAMPLE`] (needs [`F_IRQ`]).
    SetIrq = 10,
    /// Reserved: direct-mapped (mmap) region.
    SetDirectMap = 11,
    /// One doorbell's description: payload [`ObjectIndex`], reply [`DoorbellInfo`].
    GetDoorbellInfo = 12,
    /// One interrupt line's description: payload [`ObjectIndex`], reply [`IrqInfo`].
    GetIrqInfo = 13,
}

impl Request {
    /// The request for a wire code.
    pub fn from_u32(code: u32) -> Result<Self, Error> {
        Ok(match code {
            1 => Request::Hello,
            2 => Request::GetDeviceInfo,
            3 => Request::GetRegionInfo,
            4 => Request::SetRegion,
            5 => Request::RemoveRegion,
            6 => Request::Reset,
            7 => Request::Shutdown,
            8 => Request::SetMemTable,
            9 => Request::SetDoorbell,
            10 => Request::SetIrq,
            11 => Request::SetDirectMap,
            12 => Request::GetDoorbellInfo,
            13 => Request::GetIrqInfo,
            other => return Err(Error::UnknownRequest(other)),
        })
    }

    /// Fewest and most fds the request carries in this protocol version.
    pub fn fd_range(self) -> (usize, usize) {
        match self {
            Request::SetRegion | Request::SetDoorbell => (1, 1),
            Request::SetIrq => (1, 2),
            Request::SetMemTable => (1, MAX_FDS),
            _ => (0, 0),
        }
    }

    /// Payload size the request carries in this protocol version; `None`
    /// when it varies (the payload's decoder checks it).
    pub fn payload_size(self) -> Option<usize> {
        match self {
            Request::Hello => Some(Hello::SIZE),
            Request::GetRegionInfo | Request::GetDoorbellInfo | Request::GetIrqInfo => {
                Some(RegionIndex::SIZE)
            }
            Request::SetDoorbell => Some(ObjectIndex::SIZE),
            Request::SetIrq => Some(SetIrq::SIZE),
            Request::SetRegion | Request::RemoveRegion => Some(SetRegion::SIZE),
            Request::SetMemTable => None,
            _ => Some(0),
        }
    }

    /// The feature a peer must have negotiated to send this request.
    pub fn feature(self) -> Option<u64> {
        match self {
            Request::SetMemTable => Some(F_MEM_TABLE),
            Request::SetDoorbell | Request::GetDoorbellInfo => Some(F_DOORBELL),
            Request::SetIrq | Request::GetIrqInfo => Some(F_IRQ),
            Request::SetDirectMap => Some(F_DIRECT_MAP),
            _ => None,
        }
    }
}

/// Result codes carried by [`StatusReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// Header version not supported; the connection is closed.
    BadVersion = 1,
    /// Payload size above [`MAX_PAYLOAD`]; the connection is closed.
    PayloadTooLarge = 2,
    /// Unknown request code.
    UnknownRequest = 3,
    /// Wrong number of fds for the request.
    BadFdCount = 4,
    /// Payload size or layout wrong for the request.
    BadPayload = 5,
    /// Request before a successful [`Request::Hello`].
    NotNegotiated = 6,
    /// No protocol version in common; the connection is closed.
    NoCommonVersion = 7,
    /// Region index out of range.
    BadRegionIndex = 8,
    /// Region already placed.
    RegionBusy = 9,
    /// Removal does not match a placed region exactly.
    NoSuchRegion = 10,
    /// Request or option not supported (not negotiated, not capable, or reserved).
    Unsupported = 11,
    /// Reserved flag bits set in the header; the connection is closed.
    ReservedFlags = 12,
    /// The device failed to carry out the request.
    DeviceError = 13,
    /// A request arrived as a reply, or a reply as a request.
    UnexpectedReply = 14,
    /// A file descriptor of the wrong kind (a data socket must be a stream socket).
    BadFd = 15,
}

impl Status {
    /// The status for a wire code.
    pub fn from_u32(code: u32) -> Result<Self, Error> {
        Ok(match code {
            0 => Status::Ok,
            1 => Status::BadVersion,
            2 => Status::PayloadTooLarge,
            3 => Status::UnknownRequest,
            4 => Status::BadFdCount,
            5 => Status::BadPayload,
            6 => Status::NotNegotiated,
            7 => Status::NoCommonVersion,
            8 => Status::BadRegionIndex,
            9 => Status::RegionBusy,
            10 => Status::NoSuchRegion,
            11 => Status::Unsupported,
            12 => Status::ReservedFlags,
            13 => Status::DeviceError,
            14 => Status::UnexpectedReply,
            15 => Status::BadFd,
            other => return Err(Error::UnknownStatus(other)),
        })
    }

    /// The status a peer reports for a decode error of a request.
    pub fn for_error(e: &Error) -> Self {
        match e {
            Error::BadVersion(_) => Status::BadVersion,
            Error::ReservedFlags(_) => Status::ReservedFlags,
            Error::PayloadTooLarge(_) => Status::PayloadTooLarge,
            Error::UnknownRequest(_) => Status::UnknownRequest,
            Error::NoCommonVersion { .. } | Error::EmptyVersionRange(..) => Status::NoCommonVersion,
            _ => Status::BadPayload,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Status::Ok => "ok",
            Status::BadVersion => "unsupported header version",
            Status::PayloadTooLarge => "payload too large",
            Status::UnknownRequest => "unknown request",
            Status::BadFdCount => "wrong number of file descriptors",
            Status::BadPayload => "malformed payload",
            Status::NotNegotiated => "version not negotiated yet",
            Status::NoCommonVersion => "no common protocol version",
            Status::BadRegionIndex => "region index out of range",
            Status::RegionBusy => "region already set",
            Status::NoSuchRegion => "no region matches exactly",
            Status::Unsupported => "not supported",
            Status::ReservedFlags => "reserved flag bits set",
            Status::DeviceError => "device error",
            Status::UnexpectedReply => "unexpected reply",
            Status::BadFd => "file descriptor of the wrong kind",
        };
        f.write_str(s)
    }
}

/// The fixed message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request code (raw, so an unknown one can still be answered).
    pub request: u32,
    /// Version (bits 0..=7) and `FLAG_*` bits.
    pub flags: u32,
    /// Payload size in bytes.
    pub size: u32,
}

impl Header {
    /// A request header with the current header version.
    pub fn request(request: Request, size: usize, need_reply: bool) -> Self {
        Header {
            request: request as u32,
            flags: HEADER_VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 },
            size: size as u32,
        }
    }

    /// A reply header to a request code.
    pub fn reply(request: u32, size: usize, error: bool) -> Self {
        Header {
            request,
            flags: HEADER_VERSION | FLAG_REPLY | if error { FLAG_ERROR } else { 0 },
            size: size as u32,
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    /// Decodes a header and checks version, reserved flags and the payload bound.
    /// Any error here means framing cannot be trusted.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<Self, Error> {
        let h = Header {
            request: le_u32(b, 0),
            flags: le_u32(b, 4),
            size: le_u32(b, 8),
        };
        let version = h.flags & FLAG_VERSION_MASK;
        if version != HEADER_VERSION {
            return Err(Error::BadVersion(version));
        }
        if h.flags & !FLAGS_KNOWN != 0 {
            return Err(Error::ReservedFlags(h.flags & !FLAGS_KNOWN));
        }
        if h.size > MAX_PAYLOAD {
            return Err(Error::PayloadTooLarge(h.size));
        }
        Ok(h)
    }

    /// The REPLY bit.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// The NEED_REPLY bit.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// The ERROR bit.
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }
}

/// A fixed-layout payload.
pub trait Payload: Sized {
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Encodes into exactly [`Self::SIZE`] bytes.
    fn encode(&self) -> Vec<u8>;
    /// Decodes from exactly [`Self::SIZE`] bytes.
    fn decode(b: &[u8]) -> Result<Self, Error>;
}

fn check_size(b: &[u8], expected: usize) -> Result<(), Error> {
    if b.len() != expected {
        return Err(Error::PayloadSize {
            expected,
            got: b.len(),
        });
    }
    Ok(())
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn encode_name(name: &str, width: usize, out: &mut Vec<u8>) {
    let bytes = name.as_bytes();
    let n = bytes.len().min(width);
    out.extend_from_slice(&bytes[..n]);
    out.resize(out.len() + (width - n), 0);
}

fn decode_name(b: &[u8]) -> Result<String, Error> {
    let end = b.iter().position(|&x| x == 0).unwrap_or(b.len());
    if b[end..].iter().any(|&x| x != 0) {
        return Err(Error::BadName);
    }
    std::str::from_utf8(&b[..end])
        .map(str::to_owned)
        .map_err(|_| Error::BadName)
}

/// Checks that a name fits a fixed-width field.
pub fn check_name(name: &str, width: usize) -> Result<(), Error> {
    if name.len() > width || name.contains('\0') {
        return Err(Error::NameTooLong(width));
    }
    Ok(())
}

/// [`Request::Hello`] payload, sent by the frontend and answered by the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the sender speaks.
    pub min_version: u32,
    /// Newest protocol version the sender speaks.
    pub max_version: u32,
    /// `F_*` feature bits the sender offers.
    pub features: u64,
}

/// The outcome of version and feature negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The protocol version both sides use.
    pub version: u32,
    /// Features both sides offered.
    pub features: u64,
}

impl Hello {
    /// What this implementation offers.
    pub fn ours(features: u64) -> Self {
        Hello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            features,
        }
    }

    /// Negotiates with a peer: the highest version in both ranges (the lower
    /// of the two maxima) and the intersection of the features.
    pub fn negotiate(&self, peer: &Hello) -> Result<Negotiated, Error> {
        if peer.min_version > peer.max_version {
            return Err(Error::EmptyVersionRange(peer.min_version, peer.max_version));
        }
        let version = self.max_version.min(peer.max_version);
        if version < self.min_version.max(peer.min_version) {
            return Err(Error::NoCommonVersion {
                our_min: self.min_version,
                our_max: self.max_version,
                peer_min: peer.min_version,
                peer_max: peer.max_version,
            });
        }
        Ok(Negotiated {
            version,
            features: self.features & peer.features,
        })
    }
}

impl Payload for Hello {
    const SIZE: usize = 16;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.min_version.to_le_bytes());
        v.extend_from_slice(&self.max_version.to_le_bytes());
        v.extend_from_slice(&self.features.to_le_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        Ok(Hello {
            min_version: le_u32(b, 0),
            max_version: le_u32(b, 4),
            features: le_u64(b, 8),
        })
    }
}

/// Device kinds reported in [`DeviceInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceKind(pub u32);

impl DeviceKind {
    /// Anything not listed.
    pub const OTHER: DeviceKind = DeviceKind(0);
    /// A 16550-compatible UART.
    pub const UART: DeviceKind = DeviceKind(1);
    /// The `outboard-scratch` test device.
    pub const SCRATCH: DeviceKind = DeviceKind(2);
    /// Base of virtio devices: `VIRTIO_BASE + virtio device id`.
    pub const VIRTIO_BASE: u32 = 0x1000;
}

/// Width of [`DeviceInfo::name`] on the wire.
pub const DEVICE_NAME_LEN: usize = 64;
/// Width of [`RegionInfo::name`] on the wire.
pub const REGION_NAME_LEN: usize = 32;

/// Reply to [`Request::GetDeviceInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// What the device is.
    pub kind: DeviceKind,
    /// Number of regions, indexed `0..num_regions`.
    pub num_regions: u32,
    /// Number of doorbells, indexed `0..num_doorbells` (zero unless [`F_DOORBELL`]).
    pub num_doorbells: u32,
    /// Number of interrupt lines, indexed `0..num_irqs` (zero unless [`F_IRQ`]).
    pub num_irqs: u32,
    /// Human-readable name, at most [`DEVICE_NAME_LEN`] bytes.
    pub name: String,
}

impl Payload for DeviceInfo {
    const SIZE: usize = 16 + DEVICE_NAME_LEN;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.kind.0.to_le_bytes());
        v.extend_from_slice(&self.num_regions.to_le_bytes());
        v.extend_from_slice(&self.num_doorbells.to_le_bytes());
        v.extend_from_slice(&self.num_irqs.to_le_bytes());
        encode_name(&self.name, DEVICE_NAME_LEN, &mut v);
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        Ok(DeviceInfo {
            kind: DeviceKind(le_u32(b, 0)),
            num_regions: le_u32(b, 4),
            num_doorbells: le_u32(b, 8),
            num_irqs: le_u32(b, 12),
            name: decode_name(&b[16..])?,
        })
    }
}

/// [`Request::GetRegionInfo`] payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionIndex {
    /// Region index.
    pub index: u32,
}

impl Payload for RegionIndex {
    const SIZE: usize = 8;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&[0u8; 4]);
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        if le_u32(b, 4) != 0 {
            return Err(Error::Reserved("region index"));
        }
        Ok(RegionIndex {
            index: le_u32(b, 0),
        })
    }
}

/// Region flag: port I/O space (clear: MMIO).
pub const REGION_PIO: u32 = 1 << 0;
/// Region flag: the guest may read.
pub const REGION_READ: u32 = 1 << 1;
/// Region flag: the guest may write.
pub const REGION_WRITE: u32 = 1 << 2;
/// Region flag: the device accepts posted writes.
pub const REGION_POSTED_WRITES: u32 = 1 << 3;
/// Region flag: a FAST_MMIO sizeless doorbell region (write-only, data ignored).
pub const REGION_FAST_MMIO: u32 = 1 << 4;
/// Region flag: `preferred_addr` is meaningful.
pub const REGION_PREFERRED_ADDR: u32 = 1 << 5;
const REGION_FLAGS_KNOWN: u32 = REGION_PIO
    | REGION_READ
    | REGION_WRITE
    | REGION_POSTED_WRITES
    | REGION_FAST_MMIO
    | REGION_PREFERRED_ADDR;

/// Reply to [`Request::GetRegionInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// `REGION_*` flags.
    pub flags: u32,
    /// Size in bytes (nonzero).
    pub size: u64,
    /// Guest address the device would like (a UART at 0x3f8), if `REGION_PREFERRED_ADDR`.
    pub preferred_addr: u64,
    /// Allowed access sizes: bit n set = `1 << n` bytes allowed (bits 0..=3).
    pub access_sizes: u8,
    /// Human-readable name, at most [`REGION_NAME_LEN`] bytes.
    pub name: String,
}

impl RegionInfo {
    /// True for port I/O regions.
    pub fn is_pio(&self) -> bool {
        self.flags & REGION_PIO != 0
    }
}

impl Payload for RegionInfo {
    const SIZE: usize = 32 + REGION_NAME_LEN;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.preferred_addr.to_le_bytes());
        v.push(self.access_sizes);
        v.extend_from_slice(&[0u8; 7]);
        encode_name(&self.name, REGION_NAME_LEN, &mut v);
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        let flags = le_u32(b, 4);
        if flags & !REGION_FLAGS_KNOWN != 0 || b[25..32].iter().any(|&x| x != 0) {
            return Err(Error::Reserved("region info"));
        }
        let access_sizes = b[24];
        if access_sizes == 0 || access_sizes & !0x0f != 0 {
            return Err(Error::AccessSizes(access_sizes));
        }
        Ok(RegionInfo {
            index: le_u32(b, 0),
            flags,
            size: le_u64(b, 8),
            preferred_addr: le_u64(b, 16),
            access_sizes,
            name: decode_name(&b[32..])?,
        })
    }
}

/// Set-region flag: writes to this region are posted (sent without the resp bit).
pub const SET_REGION_POSTED: u32 = 1 << 0;
/// Set-region flags bits 16..=31: number of per-vCPU tokens (needs [`F_VCPU_TOKENS`]).
pub const SET_REGION_VCPUS_SHIFT: u32 = 16;
const SET_REGION_FLAGS_KNOWN: u32 = SET_REGION_POSTED | (0xffff << SET_REGION_VCPUS_SHIFT);

/// [`Request::SetRegion`] and [`Request::RemoveRegion`] payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetRegion {
    /// Region index.
    pub index: u32,
    /// `SET_REGION_*` flags.
    pub flags: u32,
    /// Guest address the frontend placed the region at.
    pub guest_addr: u64,
    /// Token that every command for this region carries.
    pub user_data: u64,
}

impl SetRegion {
    /// True when writes are posted.
    pub fn posted(&self) -> bool {
        self.flags & SET_REGION_POSTED != 0
    }

    /// Number `n` of per-vCPU tokens: the region answers to `user_data`
    /// (an access by no particular vCPU) and to `user_data + 1 + i` for an
    /// access by vCPU `i < n`.
    pub fn vcpu_tokens(&self) -> u32 {
        self.flags >> SET_REGION_VCPUS_SHIFT
    }
}

impl Payload for SetRegion {
    const SIZE: usize = 24;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.guest_addr.to_le_bytes());
        v.extend_from_slice(&self.user_data.to_le_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        let flags = le_u32(b, 4);
        if flags & !SET_REGION_FLAGS_KNOWN != 0 {
            return Err(Error::Reserved("set region flags"));
        }
        Ok(SetRegion {
            index: le_u32(b, 0),
            flags,
            guest_addr: le_u64(b, 8),
            user_data: le_u64(b, 16),
        })
    }
}

/// Payload of an acknowledgement (status [`Status::Ok`]) or of any reply with
/// [`FLAG_ERROR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusReply {
    /// The result.
    pub status: Status,
}

impl Payload for StatusReply {
    const SIZE: usize = 8;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&(self.status as u32).to_le_bytes());
        v.extend_from_slice(&[0u8; 4]);
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        if le_u32(b, 4) != 0 {
            return Err(Error::Reserved("status"));
        }
        Ok(StatusReply {
            status: Status::from_u32(le_u32(b, 0))?,
        })
    }
}

/// [`Request::SetDoorbell`], [`Request::GetDoorbellInfo`] and [`Request::GetIrqInfo`] payload.
pub type ObjectIndex = RegionIndex;

/// One entry of a [`MemTable`]: a memfd mapping of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest-physical address of the first byte.
    pub guest_addr: u64,
    /// Size in bytes (nonzero).
    pub size: u64,
    /// Offset of the first byte in the entry's fd.
    pub fd_offset: u64,
}

/// Most entries in one [`MemTable`] (one fd each).
pub const MAX_MEM_REGIONS: usize = MAX_FDS;

/// [`Request::SetMemTable`] payload: `count` (u32), reserved (u32, zero), then
/// `count` entries of 24 bytes (`guest_addr`, `size`, `fd_offset`, each u64).
/// The message carries one fd per entry, in entry order. Entries are sorted
/// by `guest_addr` and do not overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemTable {
    /// The guest RAM regions.
    pub regions: Vec<MemRegion>,
}

impl MemTable {
    /// Header bytes before the entries.
    pub const HEADER: usize = 8;
    /// Bytes per entry.
    pub const ENTRY: usize = 24;

    /// Encodes the table.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::HEADER + Self::ENTRY * self.regions.len());
        v.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        v.extend_from_slice(&[0u8; 4]);
        for r in &self.regions {
            v.extend_from_slice(&r.guest_addr.to_le_bytes());
            v.extend_from_slice(&r.size.to_le_bytes());
            v.extend_from_slice(&r.fd_offset.to_le_bytes());
        }
        v
    }

    /// Decodes a table and checks its shape: size matches `count`, `count` is
    /// 1..=[`MAX_MEM_REGIONS`], sizes are nonzero, entries are sorted, do not
    /// overlap and do not wrap.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        if b.len() < Self::HEADER {
            return Err(Error::PayloadSize {
                expected: Self::HEADER,
                got: b.len(),
            });
        }
        let count = le_u32(b, 0) as usize;
        if le_u32(b, 4) != 0 {
            return Err(Error::Reserved("memory table"));
        }
        if count == 0 || count > MAX_MEM_REGIONS {
            return Err(Error::MemTable("entry count out of range"));
        }
        check_size(b, Self::HEADER + Self::ENTRY * count)?;
        let mut regions: Vec<MemRegion> = Vec::with_capacity(count);
        for i in 0..count {
            let at = Self::HEADER + Self::ENTRY * i;
            let r = MemRegion {
                guest_addr: le_u64(b, at),
                size: le_u64(b, at + 8),
                fd_offset: le_u64(b, at + 16),
            };
            r.size
                .checked_sub(1)
                .and_then(|s| r.guest_addr.checked_add(s))
                .ok_or(Error::MemTable("empty or wrapping entry"))?;
            r.fd_offset
                .checked_add(r.size)
                .ok_or(Error::MemTable("fd offset wraps"))?;
            if let Some(prev) = regions.last() {
                if prev.guest_addr + (prev.size - 1) >= r.guest_addr {
                    return Err(Error::MemTable("entries unsorted or overlapping"));
                }
            }
            regions.push(r);
        }
        Ok(MemTable { regions })
    }
}

/// Doorbell flag: the doorbell fires only when the written value equals `datamatch`.
pub const DOORBELL_DATAMATCH: u32 = 1 << 0;

/// Reply to [`Request::GetDoorbellInfo`]: a write the frontend turns into an
/// eventfd signal instead of a data command (ioeventfd semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoorbellInfo {
    /// Doorbell index.
    pub index: u32,
    /// Region the doorbell lives in.
    pub region: u32,
    /// Offset of the doorbell in the region.
    pub offset: u64,
    /// Access size that matches: 1, 2, 4 or 8; 0 matches any size and
    /// ignores the data (a FAST_MMIO-style doorbell).
    pub size: u32,
    /// `DOORBELL_*` flags.
    pub flags: u32,
    /// Value a write must carry when [`DOORBELL_DATAMATCH`] is set.
    pub datamatch: u64,
}

impl Payload for DoorbellInfo {
    const SIZE: usize = 32;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.region.to_le_bytes());
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.datamatch.to_le_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        let d = DoorbellInfo {
            index: le_u32(b, 0),
            region: le_u32(b, 4),
            offset: le_u64(b, 8),
            size: le_u32(b, 16),
            flags: le_u32(b, 20),
            datamatch: le_u64(b, 24),
        };
        if d.flags & !DOORBELL_DATAMATCH != 0 {
            return Err(Error::Reserved("doorbell flags"));
        }
        if !matches!(d.size, 0 | 1 | 2 | 4 | 8) {
            return Err(Error::Doorbell("size is not 0, 1, 2, 4 or 8"));
        }
        if d.size == 0 && d.flags & DOORBELL_DATAMATCH != 0 {
            return Err(Error::Doorbell("a sizeless doorbell cannot match data"));
        }
        Ok(d)
    }
}

/// Interrupt flag: a level-triggered line, resampled after the guest's EOI.
pub const IRQ_LEVEL: u32 = 1 << 0;

/// Reply to [`Request::GetIrqInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// Line index.
    pub index: u32,
    /// `IRQ_*` flags.
    pub flags: u32,
}

impl Payload for IrqInfo {
    const SIZE: usize = 8;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        let flags = le_u32(b, 4);
        if flags & !IRQ_LEVEL != 0 {
            return Err(Error::Reserved("irq flags"));
        }
        Ok(IrqInfo {
            index: le_u32(b, 0),
            flags,
        })
    }
}

/// Set-irq flag: a second fd follows, the resample eventfd (level lines).
pub const IRQ_RESAMPLE: u32 = 1 << 0;

/// [`Request::SetIrq`] payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetIrq {
    /// Line index.
    pub index: u32,
    /// `IRQ_RESAMPLE` or zero.
    pub flags: u32,
}

impl Payload for SetIrq {
    const SIZE: usize = 8;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        let flags = le_u32(b, 4);
        if flags & !IRQ_RESAMPLE != 0 {
            return Err(Error::Reserved("set irq flags"));
        }
        Ok(SetIrq {
            index: le_u32(b, 0),
            flags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_when_valid_then_identical() {
        let h = Header::request(Request::SetRegion, SetRegion::SIZE, true);
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        assert!(h.need_reply() && !h.is_reply() && !h.is_error());
        let r = Header::reply(3, 8, true);
        assert!(r.is_reply() && r.is_error());
    }

    #[test]
    fn header_when_bad_version_then_error() {
        let mut h = Header::request(Request::Reset, 0, true);
        h.flags = (h.flags & !FLAG_VERSION_MASK) | 2;
        assert_eq!(Header::decode(&h.encode()), Err(Error::BadVersion(2)));
    }

    #[test]
    fn header_when_reserved_flags_then_error() {
        let mut h = Header::request(Request::Reset, 0, true);
        h.flags |= 1 << 20;
        assert_eq!(
            Header::decode(&h.encode()),
            Err(Error::ReservedFlags(1 << 20))
        );
    }

    #[test]
    fn header_when_payload_too_large_then_error() {
        let h = Header::request(Request::Reset, MAX_PAYLOAD as usize + 1, true);
        assert_eq!(
            Header::decode(&h.encode()),
            Err(Error::PayloadTooLarge(MAX_PAYLOAD + 1))
        );
    }

    #[test]
    fn request_when_unknown_code_then_error() {
        assert_eq!(Request::from_u32(0), Err(Error::UnknownRequest(0)));
        assert_eq!(Request::from_u32(99), Err(Error::UnknownRequest(99)));
        assert_eq!(Request::from_u32(4), Ok(Request::SetRegion));
        assert_eq!(Request::SetRegion.fd_range(), (1, 1));
        assert_eq!(Request::SetIrq.fd_range(), (1, 2));
        assert_eq!(Request::SetMemTable.payload_size(), None);
    }

    #[test]
    fn status_when_unknown_code_then_error() {
        assert_eq!(Status::from_u32(500), Err(Error::UnknownStatus(500)));
        for code in 0..=15 {
            let s = Status::from_u32(code).map(|s| s as u32);
            assert_eq!(s, Ok(code));
        }
    }

    #[test]
    fn payload_when_wrong_size_then_error() {
        assert_eq!(
            Hello::decode(&[0u8; 15]),
            Err(Error::PayloadSize {
                expected: 16,
                got: 15
            })
        );
        assert!(matches!(
            SetRegion::decode(&[0u8; 25]),
            Err(Error::PayloadSize { .. })
        ));
    }

    #[test]
    fn hello_negotiate_when_overlap_then_lower_max_wins() {
        let ours = Hello {
            min_version: 1,
            max_version: 3,
            features: 0b111,
        };
        let peer = Hello {
            min_version: 2,
            max_version: 5,
            features: 0b101,
        };
        assert_eq!(
            ours.negotiate(&peer),
            Ok(Negotiated {
                version: 3,
                features: 0b101
            })
        );
        assert_eq!(Hello::decode(&ours.encode()), Ok(ours));
    }

    #[test]
    fn hello_negotiate_when_disjoint_then_no_common_version() {
        let ours = Hello::ours(0);
        let peer = Hello {
            min_version: 2,
            max_version: 2,
            features: 0,
        };
        assert!(matches!(
            ours.negotiate(&peer),
            Err(Error::NoCommonVersion { .. })
        ));
        let empty = Hello {
            min_version: 3,
            max_version: 1,
            features: 0,
        };
        assert_eq!(ours.negotiate(&empty), Err(Error::EmptyVersionRange(3, 1)));
    }

    #[test]
    fn device_info_roundtrip_when_name_fits_then_identical() {
        let d = DeviceInfo {
            kind: DeviceKind::UART,
            num_regions: 1,
            num_doorbells: 2,
            num_irqs: 1,
            name: "uart".into(),
        };
        assert_eq!(DeviceInfo::decode(&d.encode()), Ok(d));
    }

    #[test]
    fn name_when_not_utf8_or_not_padded_then_error() {
        let mut b = DeviceInfo {
            kind: DeviceKind::OTHER,
            num_regions: 0,
            num_doorbells: 0,
            num_irqs: 0,
            name: "ab".into(),
        }
        .encode();
        b[16] = 0xff;
        assert_eq!(DeviceInfo::decode(&b), Err(Error::BadName));
        b[16] = b'a';
        b[20] = b'x';
        assert_eq!(DeviceInfo::decode(&b), Err(Error::BadName));
        assert_eq!(check_name(&"x".repeat(65), 64), Err(Error::NameTooLong(64)));
        let mut r = [0u8; 8];
        r[4] = 1;
        assert_eq!(
            RegionIndex::decode(&r),
            Err(Error::Reserved("region index"))
        );
    }

    #[test]
    fn region_info_when_bad_fields_then_error() {
        let r = RegionInfo {
            index: 0,
            flags: REGION_READ | REGION_WRITE,
            size: 8,
            preferred_addr: 0,
            access_sizes: 1,
            name: "regs".into(),
        };
        assert_eq!(RegionInfo::decode(&r.encode()), Ok(r.clone()));
        let mut b = r.encode();
        b[24] = 0;
        assert_eq!(RegionInfo::decode(&b), Err(Error::AccessSizes(0)));
        b[24] = 0x10;
        assert_eq!(RegionInfo::decode(&b), Err(Error::AccessSizes(0x10)));
        let mut b = r.encode();
        b[6] = 1;
        assert_eq!(RegionInfo::decode(&b), Err(Error::Reserved("region info")));
    }

    #[test]
    fn mem_table_when_valid_then_roundtrip_and_bad_shapes_rejected() {
        let t = MemTable {
            regions: vec![
                MemRegion {
                    guest_addr: 0,
                    size: 0x1000,
                    fd_offset: 0,
                },
                MemRegion {
                    guest_addr: 0x10_0000,
                    size: 0x2000,
                    fd_offset: 0x1000,
                },
            ],
        };
        assert_eq!(MemTable::decode(&t.encode()), Ok(t.clone()));
        let mut b = t.encode();
        b.pop();
        assert!(matches!(
            MemTable::decode(&b),
            Err(Error::PayloadSize { .. })
        ));
        assert!(matches!(
            MemTable::decode(&[0u8; 4]),
            Err(Error::PayloadSize { .. })
        ));
        let mut b = t.encode();
        b[0] = 0;
        assert_eq!(
            MemTable::decode(&b[..8]),
            Err(Error::MemTable("entry count out of range"))
        );
        let mut b = t.encode();
        b[4] = 1;
        assert_eq!(MemTable::decode(&b), Err(Error::Reserved("memory table")));
        let overlap = MemTable {
            regions: vec![
                MemRegion {
                    guest_addr: 0,
                    size: 0x2000,
                    fd_offset: 0,
                },
                MemRegion {
                    guest_addr: 0x1000,
                    size: 0x1000,
                    fd_offset: 0,
                },
            ],
        };
        assert_eq!(
            MemTable::decode(&overlap.encode()),
            Err(Error::MemTable("entries unsorted or overlapping"))
        );
        let empty = MemTable {
            regions: vec![MemRegion {
                guest_addr: 0,
                size: 0,
                fd_offset: 0,
            }],
        };
        assert_eq!(
            MemTable::decode(&empty.encode()),
            Err(Error::MemTable("empty or wrapping entry"))
        );
        let wrap = MemTable {
            regions: vec![MemRegion {
                guest_addr: 0,
                size: 8,
                fd_offset: u64::MAX,
            }],
        };
        assert_eq!(
            MemTable::decode(&wrap.encode()),
            Err(Error::MemTable("fd offset wraps"))
        );
    }

    #[test]
    fn doorbell_info_when_bad_size_or_flags_then_error() {
        let d = DoorbellInfo {
            index: 1,
            region: 0,
            offset: 0x50,
            size: 4,
            flags: DOORBELL_DATAMATCH,
            datamatch: 3,
        };
        assert_eq!(DoorbellInfo::decode(&d.encode()), Ok(d));
        let bad = DoorbellInfo { size: 3, ..d };
        assert_eq!(
            DoorbellInfo::decode(&bad.encode()),
            Err(Error::Doorbell("size is not 0, 1, 2, 4 or 8"))
        );
        let sizeless = DoorbellInfo { size: 0, ..d };
        assert_eq!(
            DoorbellInfo::decode(&sizeless.encode()),
            Err(Error::Doorbell("a sizeless doorbell cannot match data"))
        );
        let flags = DoorbellInfo { flags: 2, ..d };
        assert_eq!(
            DoorbellInfo::decode(&flags.encode()),
            Err(Error::Reserved("doorbell flags"))
        );
    }

    #[test]
    fn irq_payloads_when_reserved_flags_then_error() {
        let i = IrqInfo {
            index: 0,
            flags: IRQ_LEVEL,
        };
        assert_eq!(IrqInfo::decode(&i.encode()), Ok(i));
        assert_eq!(
            IrqInfo::decode(&IrqInfo { index: 0, flags: 2 }.encode()),
            Err(Error::Reserved("irq flags"))
        );
        let s = SetIrq {
            index: 1,
            flags: IRQ_RESAMPLE,
        };
        assert_eq!(SetIrq::decode(&s.encode()), Ok(s));
        assert_eq!(
            SetIrq::decode(&SetIrq { index: 1, flags: 4 }.encode()),
            Err(Error::Reserved("set irq flags"))
        );
    }

    #[test]
    fn set_region_when_reserved_flags_then_error() {
        let s = SetRegion {
            index: 1,
            flags: SET_REGION_POSTED,
            guest_addr: 0x1000,
            user_data: 42,
        };
        assert_eq!(SetRegion::decode(&s.encode()), Ok(s));
        let mut b = s.encode();
        b[4] = 2;
        assert_eq!(
            SetRegion::decode(&b),
            Err(Error::Reserved("set region flags"))
        );
    }

    #[test]
    fn status_reply_when_reserved_nonzero_then_error() {
        let s = StatusReply {
            status: Status::RegionBusy,
        };
        assert_eq!(StatusReply::decode(&s.encode()), Ok(s));
        let mut b = s.encode();
        b[7] = 1;
        assert_eq!(StatusReply::decode(&b), Err(Error::Reserved("status")));
        assert_eq!(
            Status::for_error(&Error::PayloadSize {
                expected: 1,
                got: 2
            }),
            Status::BadPayload
        );
    }
}
