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

mod header;
mod payload;
mod resources;

pub use header::{Header, Request, Status};
pub use payload::{
    check_name, DeviceInfo, DeviceKind, Hello, Negotiated, Payload, RegionIndex, RegionInfo,
    SetRegion, StatusReply, DEVICE_NAME_LEN, REGION_FAST_MMIO, REGION_NAME_LEN, REGION_PIO,
    REGION_POSTED_WRITES, REGION_PREFERRED_ADDR, REGION_READ, REGION_WRITE, SET_REGION_POSTED,
    SET_REGION_VCPUS_SHIFT,
};
pub use resources::{
    DoorbellInfo, IrqInfo, MemRegion, MemTable, ObjectIndex, SetCmdRing, SetIrq,
    DOORBELL_DATAMATCH, IRQ_LEVEL, IRQ_RESAMPLE, MAX_MEM_REGIONS,
};

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
/// Feature: the state area and state transfer (SET_STATE_AREA,
/// RESTORE_STATE, SAVE_STATE), for restarts and live upgrades.
pub const F_STATE: u64 = 1 << 7;
/// Feature: shared-memory command rings ([`Request::SetCmdRing`]): a
/// region's data commands travel through a ring in a memfd instead of its
/// data socket (see [`crate::ring`]).
pub const F_CMD_RING: u64 = 1 << 8;
/// Every feature this implementation can negotiate today.
pub const FEATURES_SUPPORTED: u64 = F_POSTED_WRITES
    | F_FAST_MMIO
    | F_MEM_TABLE
    | F_DOORBELL
    | F_IRQ
    | F_VCPU_TOKENS
    | F_STATE
    | F_CMD_RING;

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
