//! The data channel: ioregionfd commands and responses.
//!
//! Every guest access to a region travels as one 32-byte [`Cmd`] on the
//! region's data socket, laid out byte for byte as `struct ioregionfd_cmd` of
//! the KVM ioregionfd RFC (v3):
//!
//! ```text
//! byte  0      cmd            0 = read, 1 = write
//! byte  1      bits 0..=3     size exponent: access size = 1 << exp (0..=3)
//!              bit  4         resp: the sender waits for a response
//!              bits 5..=7     reserved, zero
//! bytes 2..8   padding        zero
//! bytes 8..16  user_data      opaque token given when the region was set
//! bytes 16..24 offset         from the start of the region
//! bytes 24..32 data           value written (writes), zero for reads
//! ```
//!
//! A [`Resp`] is 32 bytes too: the value read in bytes `0..8`, then 24 bytes of
//! zero padding. Integers are in host byte order, as the kernel would write
//! them; frontend and backend always run on the same host.
//!
//! Decoding is strict: an unknown command, a size exponent above 3, a read
//! without the resp bit, or a nonzero reserved bit or padding byte is a typed
//! [`Error`](enum@Error), so a backend never guesses what a malformed command meant.

use thiserror::Error;

/// Size in bytes of one encoded [`Cmd`].
pub const CMD_SIZE: usize = 32;
/// Size in bytes of one encoded [`Resp`].
pub const RESP_SIZE: usize = 32;

/// Wire value of a read command.
pub const CMD_READ: u8 = 0;
/// Wire value of a write command.
pub const CMD_WRITE: u8 = 1;

const SIZE_EXP_MASK: u8 = 0x0f;
const RESP_BIT: u8 = 0x10;
const RESERVED_BITS: u8 = 0xe0;
const MAX_SIZE_EXP: u8 = 3;

/// Errors from decoding a data-channel command or response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Error {
    /// unknown command {0}
    #[error("unknown command {0}")]
    UnknownCommand(u8),
    /// size exponent {0} exceeds 3
    #[error("size exponent {0} exceeds 3")]
    SizeExponent(u8),
    /// reserved bits {0:#04x} set in the size byte
    #[error("reserved bits {0:#04x} set in the size byte")]
    ReservedBits(u8),
    /// nonzero padding byte at offset {0}
    #[error("nonzero padding byte at offset {0}")]
    Padding(usize),
    /// read command without the resp bit
    #[error("read command without the resp bit")]
    ReadWithoutResp,
    /// access size {0} is not 1, 2, 4 or 8
    #[error("access size {0} is not 1, 2, 4 or 8")]
    AccessSize(u64),
}

/// Width of one access: 1, 2, 4 or 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccessSize {
    /// One byte.
    B1,
    /// Two bytes.
    B2,
    /// Four bytes.
    B4,
    /// Eight bytes.
    B8,
}

impl AccessSize {
    /// Every access size, smallest first.
    pub const ALL: [AccessSize; 4] = [
        AccessSize::B1,
        AccessSize::B2,
        AccessSize::B4,
        AccessSize::B8,
    ];

    /// The access size for a width in bytes.
    pub fn from_bytes(bytes: u64) -> Result<Self, Error> {
        match bytes {
            1 => Ok(AccessSize::B1),
            2 => Ok(AccessSize::B2),
            4 => Ok(AccessSize::B4),
            8 => Ok(AccessSize::B8),
            other => Err(Error::AccessSize(other)),
        }
    }

    /// The access size for a wire size exponent (0..=3).
    pub fn from_exponent(exp: u8) -> Result<Self, Error> {
        match exp {
            0 => Ok(AccessSize::B1),
            1 => Ok(AccessSize::B2),
            2 => Ok(AccessSize::B4),
            3 => Ok(AccessSize::B8),
            other => Err(Error::SizeExponent(other)),
        }
    }

    /// The wire size exponent.
    pub fn exponent(self) -> u8 {
        match self {
            AccessSize::B1 => 0,
            AccessSize::B2 => 1,
            AccessSize::B4 => 2,
            AccessSize::B8 => 3,
        }
    }

    /// Width in bytes.
    pub fn bytes(self) -> u64 {
        1 << self.exponent()
    }

    /// Bit of this size in an access-size mask (bit `exponent`).
    pub fn mask_bit(self) -> u8 {
        1 << self.exponent()
    }

    /// The value truncated to this width.
    pub fn truncate(self, value: u64) -> u64 {
        match self {
            AccessSize::B8 => value,
            _ => value & ((1u64 << (8 * self.bytes())) - 1),
        }
    }

    /// All-ones at this width: what a read of a failed device returns.
    pub fn all_ones(self) -> u64 {
        self.truncate(u64::MAX)
    }
}

/// Direction of an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The guest reads; the response carries the value.
    Read,
    /// The guest writes `data`.
    Write,
}

/// One guest access as carried on a data socket (`struct ioregionfd_cmd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmd {
    /// Read or write.
    pub op: Op,
    /// Access width.
    pub size: AccessSize,
    /// The sender waits for a [`Resp`]. Always set for reads; clear for posted writes.
    pub resp: bool,
    /// The region's token, chosen by the frontend when it set the region.
    pub user_data: u64,
    /// Offset of the access from the start of the region.
    pub offset: u64,
    /// Value written; zero for reads.
    pub data: u64,
}

impl Cmd {
    /// A read of `size` bytes at `offset`.
    pub fn read(user_data: u64, offset: u64, size: AccessSize) -> Self {
        Cmd {
            op: Op::Read,
            size,
            resp: true,
            user_data,
            offset,
            data: 0,
        }
    }

    /// A write of `data` (truncated to `size`) at `offset`; `posted` clears the resp bit.
    pub fn write(user_data: u64, offset: u64, size: AccessSize, data: u64, posted: bool) -> Self {
        Cmd {
            op: Op::Write,
            size,
            resp: !posted,
            user_data,
            offset,
            data: size.truncate(data),
        }
    }

    /// Encodes the command into its 32-byte wire form.
    pub fn encode(&self) -> [u8; CMD_SIZE] {
        let mut b = [0u8; CMD_SIZE];
        b[0] = match self.op {
            Op::Read => CMD_READ,
            Op::Write => CMD_WRITE,
        };
        b[1] = self.size.exponent() | if self.resp { RESP_BIT } else { 0 };
        b[8..16].copy_from_slice(&self.user_data.to_ne_bytes());
        b[16..24].copy_from_slice(&self.offset.to_ne_bytes());
        b[24..32].copy_from_slice(&self.data.to_ne_bytes());
        b
    }

    /// Decodes a 32-byte wire command, rejecting anything malformed.
    pub fn decode(b: &[u8; CMD_SIZE]) -> Result<Self, Error> {
        let op = match b[0] {
            CMD_READ => Op::Read,
            CMD_WRITE => Op::Write,
            other => return Err(Error::UnknownCommand(other)),
        };
        let reserved = b[1] & RESERVED_BITS;
        if reserved != 0 {
            return Err(Error::ReservedBits(reserved));
        }
        let exp = b[1] & SIZE_EXP_MASK;
        if exp > MAX_SIZE_EXP {
            return Err(Error::SizeExponent(exp));
        }
        let size = AccessSize::from_exponent(exp)?;
        if let Some(i) = b[2..8].iter().position(|&x| x != 0) {
            return Err(Error::Padding(2 + i));
        }
        let resp = b[1] & RESP_BIT != 0;
        if op == Op::Read && !resp {
            return Err(Error::ReadWithoutResp);
        }
        Ok(Cmd {
            op,
            size,
            resp,
            user_data: u64_at(b, 8),
            offset: u64_at(b, 16),
            data: u64_at(b, 24),
        })
    }
}

/// The answer to a command with the resp bit (`struct ioregionfd_resp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resp {
    /// Value read; zero for writes.
    pub data: u64,
}

impl Resp {
    /// Encodes the response into its 32-byte wire form.
    pub fn encode(&self) -> [u8; RESP_SIZE] {
        let mut b = [0u8; RESP_SIZE];
        b[0..8].copy_from_slice(&self.data.to_ne_bytes());
        b
    }

    /// Decodes a 32-byte wire response; nonzero padding means the stream is garbled.
    pub fn decode(b: &[u8; RESP_SIZE]) -> Result<Self, Error> {
        if let Some(i) = b[8..].iter().position(|&x| x != 0) {
            return Err(Error::Padding(8 + i));
        }
        Ok(Resp { data: u64_at(b, 0) })
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmd_roundtrip_when_valid_then_identical() {
        for size in AccessSize::ALL {
            for posted in [false, true] {
                let c = Cmd::write(0xdead_beef, 0x40, size, 0x1122_3344_5566_7788, posted);
                assert_eq!(Cmd::decode(&c.encode()), Ok(c));
                assert_eq!(c.data, size.truncate(0x1122_3344_5566_7788));
            }
            let r = Cmd::read(7, 8, size);
            assert_eq!(Cmd::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn cmd_layout_when_encoded_then_matches_rfc() {
        let b = Cmd::write(
            0x0102_0304_0506_0708,
            0x10,
            AccessSize::B4,
            0xaabb_ccdd,
            false,
        )
        .encode();
        assert_eq!(b[0], 1);
        assert_eq!(b[1], 0x10 | 2);
        assert_eq!(&b[2..8], &[0; 6]);
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_ne_bytes());
        assert_eq!(&b[16..24], &0x10u64.to_ne_bytes());
        assert_eq!(&b[24..32], &0xaabb_ccddu64.to_ne_bytes());
        let p = Cmd::write(1, 0, AccessSize::B1, 0, true).encode();
        assert_eq!(p[1], 0, "posted write has no resp bit");
    }

    #[test]
    fn decode_when_unknown_cmd_then_error() {
        let mut b = Cmd::read(0, 0, AccessSize::B1).encode();
        b[0] = 2;
        assert_eq!(Cmd::decode(&b), Err(Error::UnknownCommand(2)));
    }

    #[test]
    fn decode_when_size_exponent_above_3_then_error() {
        let mut b = Cmd::read(0, 0, AccessSize::B1).encode();
        b[1] = RESP_BIT | 4;
        assert_eq!(Cmd::decode(&b), Err(Error::SizeExponent(4)));
        b[1] = RESP_BIT | 0x0f;
        assert_eq!(Cmd::decode(&b), Err(Error::SizeExponent(15)));
    }

    #[test]
    fn decode_when_reserved_bits_then_error() {
        let mut b = Cmd::read(0, 0, AccessSize::B1).encode();
        b[1] |= 0x40;
        assert_eq!(Cmd::decode(&b), Err(Error::ReservedBits(0x40)));
    }

    #[test]
    fn decode_when_padding_nonzero_then_error() {
        for at in 2..8 {
            let mut b = Cmd::read(0, 0, AccessSize::B8).encode();
            b[at] = 1;
            assert_eq!(Cmd::decode(&b), Err(Error::Padding(at)));
        }
    }

    #[test]
    fn decode_when_read_without_resp_then_error() {
        let mut b = Cmd::read(0, 0, AccessSize::B2).encode();
        b[1] &= !RESP_BIT;
        assert_eq!(Cmd::decode(&b), Err(Error::ReadWithoutResp));
    }

    #[test]
    fn resp_when_padding_nonzero_then_garbled() {
        let mut b = Resp { data: 5 }.encode();
        assert_eq!(Resp::decode(&b), Ok(Resp { data: 5 }));
        b[31] = 9;
        assert_eq!(Resp::decode(&b), Err(Error::Padding(31)));
    }

    #[test]
    fn access_size_when_bytes_invalid_then_error() {
        assert_eq!(AccessSize::from_bytes(3), Err(Error::AccessSize(3)));
        assert_eq!(AccessSize::from_bytes(8), Ok(AccessSize::B8));
        assert_eq!(AccessSize::B2.all_ones(), 0xffff);
        assert_eq!(AccessSize::B8.all_ones(), u64::MAX);
        assert_eq!(AccessSize::B4.mask_bit(), 4);
    }
}
