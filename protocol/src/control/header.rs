//! The fixed message header, request codes and status codes.

use super::{
    le_u32, Error, Hello, ObjectIndex, Payload, RegionIndex, SetCmdRing, SetIrq, SetRegion,
    FLAGS_KNOWN, FLAG_ERROR, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_MASK, F_CMD_RING,
    F_DIRECT_MAP, F_DOORBELL, F_IRQ, F_MEM_TABLE, F_STATE, HEADER_SIZE, HEADER_VERSION, MAX_FDS,
    MAX_PAYLOAD,
};
#[cfg(doc)]
use super::{DeviceInfo, DoorbellInfo, IrqInfo, MemTable, RegionInfo, StatusReply, IRQ_RESAMPLE};

/// Request codes. Code 11 is reserved for a later protocol feature and is
/// answered with [`Status::Unsupported`]; codes 8, 9, 10, 12 and 13 need
/// their feature negotiated, as do 14, 15 and 16 ([`F_STATE`]) and 17
/// ([`F_CMD_RING`]).
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
    /// The state area: no payload, one memfd sealed against shrinking, 4 KiB
    /// to 16 MiB (needs [`F_STATE`]; see [`crate::state`]).
    SetStateArea = 14,
    /// Restore the device from the state area's newest record; no payload
    /// (needs [`F_STATE`]).
    RestoreState = 15,
    /// Pause the device (no more doorbells, device events or queue work),
    /// commit its state to the state area and acknowledge; from then on the
    /// backend serves control requests only (needs [`F_STATE`]).
    SaveState = 16,
    /// Move a placed region's data commands to a shared-memory ring:
    /// payload [`SetCmdRing`], three fds (the ring's memfd, the `kick` and
    /// the `notify` eventfd) (needs [`F_CMD_RING`]).
    SetCmdRing = 17,
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
            14 => Request::SetStateArea,
            15 => Request::RestoreState,
            16 => Request::SaveState,
            17 => Request::SetCmdRing,
            other => return Err(Error::UnknownRequest(other)),
        })
    }

    /// Fewest and most fds the request carries in this protocol version.
    pub fn fd_range(self) -> (usize, usize) {
        match self {
            Request::SetRegion | Request::SetDoorbell | Request::SetStateArea => (1, 1),
            Request::SetIrq => (1, 2),
            Request::SetCmdRing => (3, 3),
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
            Request::SetCmdRing => Some(SetCmdRing::SIZE),
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
            Request::SetStateArea | Request::RestoreState | Request::SaveState => Some(F_STATE),
            Request::SetCmdRing => Some(F_CMD_RING),
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
}
