//! Host streams: a device's byte stream to and from the host (a console's
//! terminal) carried between the frontend and the backend over one
//! `SOCK_SEQPACKET` socket, framed so that neither direction loses or
//! repeats a byte when the backend is replaced (docs/protocol.md,
//! section 11).
//!
//! The frontend owns the host end (the terminal a user connects to), so it
//! outlives every backend instance; each instance gets a fresh socket as
//! `--host-stream-fd N`. Every message is one datagram: a 24-byte header in
//! host byte order, then at most [`MAX_PAYLOAD`] payload bytes.
//!
//! ```text
//! 0   kind    u32   1 OUT, 2 ACK, 3 IN
//! 4   flags   u32   OUT: bit 0 LAST, bit 1 FRESH; 0 otherwise
//! 8   a       u64   OUT: chain sequence number; ACK: bytes delivered; IN: stream offset
//! 16  b       u64   OUT: offset of the payload within the chain's bytes; 0 otherwise
//! 24  payload       OUT and IN only
//! ```
//!
//! * OUT (backend → frontend): bytes of the device's output. Output is cut
//!   into *chains* (one virtio transmit buffer each), numbered in the order
//!   the device completes them; each chain is sent as one or more OUT
//!   messages, the last flagged LAST, before the device completes it. A
//!   replaced backend sends the chains it serves again with the same
//!   numbers and offsets, and the frontend drops what it already passed on.
//!   FRESH marks the first OUT of an instance that restored no state: the
//!   frontend then takes its numbering as the new one.
//! * ACK (backend → frontend): the device has delivered the first `a`
//!   bytes of the input stream to the guest (they are in buffers the guest
//!   owns); the frontend may forget them.
//! * IN (frontend → backend): input bytes starting at stream offset `a`.
//!   After a replacement the frontend sends again every byte not yet
//!   acknowledged; the device drops the bytes it already has.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

/// Bytes before a message's payload.
pub const HEADER_LEN: usize = 24;
/// Largest payload of one message.
pub const MAX_PAYLOAD: usize = 4096;
/// Largest message.
pub const MAX_MESSAGE: usize = HEADER_LEN + MAX_PAYLOAD;

/// Kind of an OUT message.
pub const KIND_OUT: u32 = 1;
/// Kind of an ACK message.
pub const KIND_ACK: u32 = 2;
/// Kind of an IN message.
pub const KIND_IN: u32 = 3;
/// OUT flag: the last message of its chain.
pub const FLAG_LAST: u32 = 1;
/// OUT flag: the sender restored no state; its chain numbers start anew.
pub const FLAG_FRESH: u32 = 2;

/// Why a message cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// message of {0} bytes is shorter than its 24-byte header
    #[error("message of {0} bytes is shorter than its 24-byte header")]
    Short(usize),
    /// message of {0} bytes is longer than 4120 bytes
    #[error("message of {0} bytes is longer than 4120 bytes")]
    Long(usize),
    /// unknown message kind {0}
    #[error("unknown message kind {0}")]
    Kind(u32),
    /// flags {flags:#x} are not defined for kind {kind}
    #[error("flags {flags:#x} are not defined for kind {kind}")]
    Flags {
        /// The message kind.
        kind: u32,
        /// The flags it carried.
        flags: u32,
    },
    /// an ACK carries a payload or a nonzero reserved field
    #[error("an ACK carries a payload or a nonzero reserved field")]
    AckBody,
    /// an IN message has a nonzero reserved field
    #[error("an IN message has a nonzero reserved field")]
    InReserved,
    /// the payload ends beyond offset 2^64
    #[error("the payload ends beyond offset 2^64")]
    Overflow,
}

/// One decoded message; payloads borrow from the received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// Device output: bytes `offset..` of chain `seq`.
    Out {
        /// Chain sequence number.
        seq: u64,
        /// Offset of `data` within the chain's bytes.
        offset: u64,
        /// The chain's last message.
        last: bool,
        /// The sender restored no state (see the module docs).
        fresh: bool,
        /// The bytes.
        data: &'a [u8],
    },
    /// The first `delivered` input bytes are in the guest's buffers.
    Ack {
        /// Input bytes delivered so far.
        delivered: u64,
    },
    /// Input bytes starting at stream offset `offset`.
    In {
        /// Stream offset of `data[0]`.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

impl<'a> Message<'a> {
    /// Decodes one datagram, checking every field.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, Error> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::Short(bytes.len()));
        }
        if bytes.len() > MAX_MESSAGE {
            return Err(Error::Long(bytes.len()));
        }
        let (kind, flags) = (u32_at(bytes, 0), u32_at(bytes, 4));
        let (a, b) = (u64_at(bytes, 8), u64_at(bytes, 16));
        let data = &bytes[HEADER_LEN..];
        let allowed = match kind {
            KIND_OUT => FLAG_LAST | FLAG_FRESH,
            KIND_ACK | KIND_IN => 0,
            other => return Err(Error::Kind(other)),
        };
        if flags & !allowed != 0 {
            return Err(Error::Flags { kind, flags });
        }
        let ends = |offset: u64| offset.checked_add(data.len() as u64).ok_or(Error::Overflow);
        match kind {
            KIND_OUT => {
                ends(b)?;
                Ok(Message::Out {
                    seq: a,
                    offset: b,
                    last: flags & FLAG_LAST != 0,
                    fresh: flags & FLAG_FRESH != 0,
                    data,
                })
            }
            KIND_ACK if b != 0 || !data.is_empty() => Err(Error::AckBody),
            KIND_ACK => Ok(Message::Ack { delivered: a }),
            _ if b != 0 => Err(Error::InReserved),
            _ => {
                ends(a)?;
                Ok(Message::In { offset: a, data })
            }
        }
    }

    /// Appends the encoded message to `out` (cleared first). Payloads
    /// longer than [`MAX_PAYLOAD`] are the caller's bug: they are cut.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, flags, a, b, data): (u32, u32, u64, u64, &[u8]) = match *self {
            Message::Out {
                seq,
                offset,
                last,
                fresh,
                data,
            } => {
                let flags = if last { FLAG_LAST } else { 0 } | if fresh { FLAG_FRESH } else { 0 };
                (KIND_OUT, flags, seq, offset, data)
            }
            Message::Ack { delivered } => (KIND_ACK, 0, delivered, 0, &[]),
            Message::In { offset, data } => (KIND_IN, 0, offset, 0, data),
        };
        let data = &data[..data.len().min(MAX_PAYLOAD)];
        out.clear();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&a.to_ne_bytes());
        out.extend_from_slice(&b.to_ne_bytes());
        out.extend_from_slice(data);
    }
}

/// A new close-on-exec `SOCK_SEQPACKET` socket pair: one end for the
/// frontend, one for a backend instance (section 11.1).
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two new descriptors into the array on success.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one encoded message without waiting. `Ok(false)`: the peer's
/// queue is full (try again when the socket is writable). A closed peer
/// is an error (`EPIPE`), never a `SIGPIPE`.
pub fn send(fd: BorrowedFd<'_>, message: &[u8]) -> io::Result<bool> {
    loop {
        // SAFETY: send reads `message.len()` bytes from a live buffer.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(false),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// What one [`recv`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// One datagram of this many bytes (its own length, which may exceed
    /// the buffer).
    Message(usize),
    /// Nothing waits.
    Empty,
    /// The peer closed its end and everything it sent has been read.
    Closed,
}

/// Receives one datagram into `buf` (which should hold [`MAX_MESSAGE`]` +
/// 1` bytes) without waiting. The length returned is the datagram's own
/// (`MSG_TRUNC`), so a caller decoding `buf[..len.min(buf.len())]` sees an
/// oversized datagram refused as too long, never a cut one taken as
/// whole. `ECONNRESET`, reported once when the peer closed with messages
/// of ours unread, is read past: what the peer sent before is still
/// delivered (section 11.1).
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    loop {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n > 0 {
            return Ok(Received::Message(n as usize));
        }
        if n == 0 {
            // A zero-length datagram is as malformed as a short one; end
            // of stream is no data and a hung-up peer.
            return Ok(if peer_gone(fd) {
                Received::Closed
            } else {
                Received::Message(0)
            });
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(Received::Empty),
            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionReset => continue,
            _ => return Err(e),
        }
    }
}

fn peer_gone(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one live pollfd; timeout 0.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message<'_>) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        assert_eq!(Message::decode(&buf), Ok(m));
    }

    #[test]
    fn message_when_encoded_then_decodes_to_itself() {
        round_trip(Message::Out {
            seq: 7,
            offset: 4096,
            last: true,
            fresh: false,
            data: b"hello",
        });
        round_trip(Message::Out {
            seq: 0,
            offset: 0,
            last: false,
            fresh: true,
            data: &[],
        });
        round_trip(Message::Ack { delivered: 1 << 40 });
        round_trip(Message::In {
            offset: 3,
            data: &[0xff; MAX_PAYLOAD],
        });
    }

    #[test]
    fn decode_when_malformed_then_each_refused_with_its_reason() {
        let mut buf = Vec::new();
        Message::Ack { delivered: 1 }.encode(&mut buf);
        assert_eq!(Message::decode(&buf[..23]), Err(Error::Short(23)));
        let long = vec![0u8; MAX_MESSAGE + 1];
        assert_eq!(Message::decode(&long), Err(Error::Long(MAX_MESSAGE + 1)));
        let mut k = buf.clone();
        k[0] = 9;
        assert_eq!(Message::decode(&k), Err(Error::Kind(9)));
        let mut f = buf.clone();
        f[4] = 1;
        assert_eq!(
            Message::decode(&f),
            Err(Error::Flags {
                kind: KIND_ACK,
                flags: 1
            })
        );
        let mut body = buf.clone();
        body.push(0);
        assert_eq!(Message::decode(&body), Err(Error::AckBody));
        Message::In {
            offset: u64::MAX,
            data: b"xy",
        }
        .encode(&mut buf);
        assert_eq!(Message::decode(&buf), Err(Error::Overflow));
        buf[16] = 1;
        assert_eq!(Message::decode(&buf), Err(Error::InReserved));
        Message::Out {
            seq: 1,
            offset: 0,
            last: false,
            fresh: false,
            data: &[],
        }
        .encode(&mut buf);
        buf[4] = 4;
        assert_eq!(
            Message::decode(&buf),
            Err(Error::Flags {
                kind: KIND_OUT,
                flags: 4
            })
        );
    }

    #[test]
    fn socket_when_peer_dies_with_input_unread_then_its_messages_still_arrive_then_closed() {
        use std::os::fd::AsFd;
        let (a, b) = pair().unwrap_or_else(|e| panic!("{e}"));
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        assert_eq!(recv(b.as_fd(), &mut buf).ok(), Some(Received::Empty));
        let mut m = Vec::new();
        Message::Ack { delivered: 5 }.encode(&mut m);
        assert_eq!(send(a.as_fd(), &m).ok(), Some(true));
        assert_eq!(send(b.as_fd(), &m).ok(), Some(true), "left unread by a");
        drop(a);
        assert_eq!(
            recv(b.as_fd(), &mut buf).ok(),
            Some(Received::Message(HEADER_LEN))
        );
        assert_eq!(recv(b.as_fd(), &mut buf).ok(), Some(Received::Closed));
        assert!(send(b.as_fd(), &m).is_err(), "EPIPE, not SIGPIPE");
    }
}
