//! Framed control messages over a Unix stream socket, with SCM_RIGHTS fds.
//!
//! [`Channel`] sends a header, payload and fds in one `sendmsg`, and receives
//! them back with every framing bound checked: the header must decode (see
//! [`Header::decode`]), the payload must arrive whole, and at most
//! [`MAX_FDS`] fds may ride on a message. Received fds are owned
//! ([`OwnedFd`]) from the moment they arrive, so a rejected message never
//! leaks one.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libc::{c_void, iovec};
use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::control::{self, Header, Payload, Status, StatusReply, HEADER_SIZE, MAX_FDS};
use crate::wait::{self, Deadline};

/// Errors from sending or receiving control messages.
#[derive(Debug, Error)]
pub enum Error {
    /// peer closed the connection
    #[error("peer closed the connection")]
    Closed,
    /// connection closed in the middle of a message
    #[error("connection closed in the middle of a message")]
    Truncated,
    /// timed out waiting for the peer
    #[error("timed out waiting for the peer")]
    Timeout,
    /// message carries more than the maximum number of fds
    #[error("message carries more than {MAX_FDS} fds")]
    TooManyFds,
    /// malformed header for request code {request}
    #[error("malformed header (request code {request})")]
    Header {
        /// Raw request code of the rejected header.
        request: u32,
        /// What was wrong.
        #[source]
        source: control::Error,
    },
    /// socket I/O failed
    #[error("control socket I/O failed")]
    Io(#[source] io::Error),
}

impl Error {
    fn from_io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout,
            io::ErrorKind::UnexpectedEof => Error::Truncated,
            _ => Error::Io(e),
        }
    }

    fn from_wait(e: wait::Error) -> Self {
        match e {
            wait::Error::Timeout => Error::Timeout,
            wait::Error::Io(e) => Error::from_io(e),
        }
    }
}

/// One received control message.
#[derive(Debug)]
pub struct Message {
    /// The decoded header.
    pub header: Header,
    /// Exactly `header.size` payload bytes.
    pub payload: Vec<u8>,
    /// File descriptors that came with the message.
    pub fds: Vec<OwnedFd>,
}

/// A control connection.
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
    timeout: Option<Duration>,
}

impl Channel {
    /// Wraps a connected stream socket.
    pub fn new(sock: UnixStream) -> Self {
        Channel {
            sock,
            timeout: None,
        }
    }

    /// The underlying socket.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Bounds every send and every receive of a whole message; `None`
    /// waits forever. The bound holds per message, not per `read`: a peer
    /// that trickles bytes cannot stretch it.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        // The first transfer of a message blocks under these; the rest wait
        // with `poll` for what is left of the message's deadline.
        self.sock.set_read_timeout(timeout).map_err(Error::Io)?;
        self.sock.set_write_timeout(timeout).map_err(Error::Io)?;
        self.timeout = timeout;
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes by `deadline`; EOF is [`Error::Truncated`].
    fn read_full(&self, mut buf: &mut [u8], deadline: &Deadline) -> Result<(), Error> {
        while !buf.is_empty() {
            let n = wait::recv_some(self.sock.as_fd(), buf, deadline).map_err(Error::from_wait)?;
            if n == 0 {
                return Err(Error::Truncated);
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    /// Sends a header (its `size` is set from `payload`), payload and fds.
    pub fn send(&self, header: Header, payload: &[u8], fds: &[RawFd]) -> Result<(), Error> {
        if fds.len() > MAX_FDS {
            return Err(Error::TooManyFds);
        }
        let header = Header {
            size: payload.len() as u32,
            ..header
        };
        let mut buf = Vec::with_capacity(HEADER_SIZE + payload.len());
        buf.extend_from_slice(&header.encode());
        buf.extend_from_slice(payload);
        self.send_raw(&buf, fds)
    }

    /// Sends raw bytes with fds attached to the first byte; for tests that
    /// need to put malformed messages on the wire.
    pub fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) -> Result<(), Error> {
        let deadline = Deadline::after(self.timeout);
        // Blocks at most the timeout (SO_SNDTIMEO); the rest shares the deadline.
        let sent = self
            .sock
            .send_with_fds(&[bytes], fds)
            .map_err(|e| Error::from_io(io::Error::from_raw_os_error(e.errno())))?;
        let mut rest = &bytes[sent..];
        while !rest.is_empty() {
            let n =
                wait::send_some(self.sock.as_fd(), rest, &deadline).map_err(Error::from_wait)?;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Sends a successful reply carrying `payload`.
    pub fn reply<P: Payload>(&self, request: u32, payload: &P) -> Result<(), Error> {
        self.send(
            Header::reply(request, P::SIZE, false),
            &payload.encode(),
            &[],
        )
    }

    /// Sends an acknowledgement ([`Status::Ok`]).
    pub fn ack(&self, request: u32) -> Result<(), Error> {
        self.reply(request, &StatusReply { status: Status::Ok })
    }

    /// Sends an error reply.
    pub fn reply_error(&self, request: u32, status: Status) -> Result<(), Error> {
        let payload = StatusReply { status }.encode();
        self.send(Header::reply(request, payload.len(), true), &payload, &[])
    }

    /// Receives one message, checking every framing bound, within one
    /// timeout for the whole message.
    pub fn recv(&self) -> Result<Message, Error> {
        let deadline = Deadline::after(self.timeout);
        let mut hdr = [0u8; HEADER_SIZE];
        let mut raw_fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [iovec {
            iov_base: hdr.as_mut_ptr() as *mut c_void,
            iov_len: hdr.len(),
        }];
        // SAFETY: the single iovec points at `hdr`, a live, writable 12-byte
        // buffer that outlives the call, and `iov_len` is exactly its length.
        // It blocks at most the timeout (SO_RCVTIMEO); later reads wait only
        // for what is left of `deadline`.
        let res = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw_fds) };
        let (got, nfds) = match res {
            Ok(r) => r,
            Err(e) if e.errno() == libc::ENOBUFS => return Err(Error::TooManyFds),
            Err(e) => return Err(Error::from_io(io::Error::from_raw_os_error(e.errno()))),
        };
        let fds: Vec<OwnedFd> = raw_fds[..nfds]
            .iter()
            .map(|&fd| {
                // SAFETY: F_SETFD only changes this descriptor's flags. The fd
                // came without close-on-exec; set it so a later exec in this
                // process does not leak it.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                // SAFETY: recvmsg just installed this descriptor in our table
                // and nothing else refers to it, so we are its only owner.
                unsafe { OwnedFd::from_raw_fd(fd) }
            })
            .collect();
        if got == 0 {
            return Err(Error::Closed);
        }
        if got < HEADER_SIZE {
            self.read_full(&mut hdr[got..], &deadline)?;
        }
        let header = Header::decode(&hdr).map_err(|source| Error::Header {
            request: u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]),
            source,
        })?;
        let mut payload = vec![0u8; header.size as usize];
        self.read_full(&mut payload, &deadline)?;
        Ok(Message {
            header,
            payload,
            fds,
        })
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Request, SetRegion};

    fn pair() -> (Channel, Channel) {
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        (Channel::new(a), Channel::new(b))
    }

    #[test]
    fn recv_when_message_with_fd_then_fd_owned() {
        let (a, b) = pair();
        let (x, _y) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        let p = SetRegion {
            index: 0,
            flags: 0,
            guest_addr: 1,
            user_data: 2,
        };
        a.send(
            Header::request(Request::SetRegion, 0, true),
            &p.encode(),
            &[x.as_raw_fd()],
        )
        .unwrap_or_else(|e| panic!("send: {e}"));
        let m = b.recv().unwrap_or_else(|e| panic!("recv: {e}"));
        assert_eq!(m.header.request, Request::SetRegion as u32);
        assert_eq!(m.fds.len(), 1);
        assert_eq!(SetRegion::decode(&m.payload), Ok(p));
    }

    #[test]
    fn recv_when_peer_closed_then_closed() {
        let (a, b) = pair();
        drop(a);
        assert!(matches!(b.recv(), Err(Error::Closed)));
    }

    #[test]
    fn recv_when_header_cut_short_then_truncated() {
        let (a, b) = pair();
        a.send_raw(&[1, 0, 0], &[])
            .unwrap_or_else(|e| panic!("{e}"));
        drop(a);
        assert!(matches!(b.recv(), Err(Error::Truncated)));
    }

    #[test]
    fn recv_when_payload_cut_short_then_truncated() {
        let (a, b) = pair();
        let mut h = Header::request(Request::Hello, 16, true).encode().to_vec();
        h.extend_from_slice(&[0u8; 4]);
        a.send_raw(&h, &[]).unwrap_or_else(|e| panic!("{e}"));
        drop(a);
        assert!(matches!(b.recv(), Err(Error::Truncated)));
    }

    #[test]
    fn recv_when_too_many_fds_then_error() {
        let (a, b) = pair();
        let (x, _y) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        let fds = vec![x.as_raw_fd(); MAX_FDS + 1];
        assert!(matches!(
            a.send(Header::request(Request::Reset, 0, true), &[], &fds),
            Err(Error::TooManyFds)
        ));
        let h = Header::request(Request::Reset, 0, true).encode();
        a.sock
            .send_with_fds(&[&h[..]], &fds)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(b.recv(), Err(Error::TooManyFds)));
    }

    #[test]
    fn recv_when_bad_header_then_header_error_with_code() {
        let (a, b) = pair();
        let mut h = Header::request(Request::Reset, 0, true);
        h.flags = 7;
        a.send_raw(&h.encode(), &[])
            .unwrap_or_else(|e| panic!("{e}"));
        match b.recv() {
            Err(Error::Header { request, source }) => {
                assert_eq!(request, Request::Reset as u32);
                assert_eq!(source, control::Error::BadVersion(7));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn recv_when_timeout_set_and_silent_peer_then_timeout() {
        let (_a, mut b) = pair();
        b.set_timeout(Some(Duration::from_millis(20)))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(b.recv(), Err(Error::Timeout)));
    }

    /// Plays a peer that sends `bytes` one at a time, `gap` apart.
    fn trickle(a: Channel, bytes: Vec<u8>, gap: Duration) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            for b in bytes {
                std::thread::sleep(gap);
                if a.send_raw(&[b], &[]).is_err() {
                    return;
                }
            }
        })
    }

    #[test]
    fn recv_when_peer_trickles_bytes_slower_than_the_timeout_then_timeout_for_the_whole_message() {
        let timeout = Duration::from_millis(100);
        let (a, mut b) = pair();
        b.set_timeout(Some(timeout))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut msg = Header::request(Request::Hello, 16, true).encode().to_vec();
        msg.extend_from_slice(&[0u8; 16]);
        let peer = trickle(a, msg, timeout * 8 / 10);
        let start = std::time::Instant::now();
        let r = b.recv();
        let took = start.elapsed();
        assert!(matches!(r, Err(Error::Timeout)), "got {r:?}");
        // Hang detector only: per-read timeouts took 28 x 0.8 x the timeout.
        assert!(took < timeout * 5, "took {took:?}");
        drop(b);
        let _ = peer.join();
    }
}
