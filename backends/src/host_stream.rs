//! The backend's end of a host stream (docs/protocol.md, section 11): the
//! `SOCK_SEQPACKET` socket a frontend passes as `--host-stream-fd N`, over
//! which a device's output leaves and its input arrives as framed
//! messages ([`outboard_protocol::host_stream`]). Nonblocking throughout:
//! a full socket is reported, never waited on.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use outboard_protocol::host_stream::{self, Message, MAX_MESSAGE};
use thiserror::Error;

/// Why a host stream cannot be taken or used.
#[derive(Debug, Error)]
pub enum Error {
    /// fd {0} is not an open SOCK_SEQPACKET Unix socket
    #[error("fd {0} is not an open SOCK_SEQPACKET Unix socket")]
    NotSeqpacket(RawFd),
    /// cannot set up the host stream
    #[error("cannot set up the host stream")]
    Setup(#[source] io::Error),
}

pub use outboard_protocol::host_stream::Received;

/// The socket.
#[derive(Debug)]
pub struct HostStream {
    sock: OwnedFd,
    /// A second descriptor of the same socket, watched for room to write
    /// while the first is watched for input (epoll takes each fd once).
    room: OwnedFd,
    scratch: Vec<u8>,
}

fn sock_type(fd: BorrowedFd<'_>) -> Option<(i32, i32)> {
    let get = |opt| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, a live
        // c_int, and fails cleanly on a descriptor that is not a socket.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    Some((get(libc::SO_DOMAIN)?, get(libc::SO_TYPE)?))
}

impl HostStream {
    /// Takes fd `fd`, handed over on the command line: it must be an open
    /// `SOCK_SEQPACKET` Unix socket. It is made close-on-exec and nonblocking.
    pub fn take(fd: RawFd) -> Result<Self, Error> {
        // SAFETY: F_GETFD only queries the descriptor table; an invalid fd yields -1.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(Error::NotSeqpacket(fd));
        }
        // SAFETY: the fd is open (checked above); it was handed to this
        // process on its command line for exactly this purpose and is taken
        // once, here, so nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if sock_type(owned.as_fd()) != Some((libc::AF_UNIX, libc::SOCK_SEQPACKET)) {
            // Hand it back untouched rather than closing what we do not understand.
            std::mem::forget(owned);
            return Err(Error::NotSeqpacket(fd));
        }
        Self::from_owned(owned)
    }

    /// Wraps a socket this process created (tests, a frontend in-process).
    pub fn from_owned(sock: OwnedFd) -> Result<Self, Error> {
        let raw = sock.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own changes only its flags; no
        // memory is touched.
        let set = |cmd: libc::c_int, arg: libc::c_int| unsafe { libc::fcntl(raw, cmd, arg) } >= 0;
        // SAFETY: as above, a query.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        if flags < 0
            || !set(libc::F_SETFL, flags | libc::O_NONBLOCK)
            || !set(libc::F_SETFD, libc::FD_CLOEXEC)
        {
            return Err(Error::Setup(io::Error::last_os_error()));
        }
        let room = sock.try_clone().map_err(Error::Setup)?;
        Ok(HostStream {
            sock,
            room,
            scratch: Vec::with_capacity(MAX_MESSAGE),
        })
    }

    /// The descriptor to watch for input.
    pub fn input_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// The descriptor to watch for room to write.
    pub fn room_fd(&self) -> BorrowedFd<'_> {
        self.room.as_fd()
    }

    /// Sends one message. `Ok(false)`: the socket is full (try again when
    /// [`HostStream::room_fd`] is writable).
    pub fn send(&mut self, m: &Message<'_>) -> io::Result<bool> {
        m.encode(&mut self.scratch);
        host_stream::send(self.sock.as_fd(), &self.scratch)
    }

    /// Receives one datagram into `buf` ([`host_stream::recv`]).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        host_stream::recv(self.sock.as_fd(), buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboard_protocol::host_stream::Message;

    fn pair() -> (OwnedFd, OwnedFd) {
        host_stream::pair().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn take_when_not_seqpacket_then_refused_and_fd_left_open() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let fd = a.as_raw_fd();
        assert!(matches!(HostStream::take(fd), Err(Error::NotSeqpacket(_))));
        // SAFETY: F_GETFD only queries the table.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0, "still open");
        assert!(matches!(HostStream::take(-1), Err(Error::NotSeqpacket(-1))));
    }

    #[test]
    fn stream_when_messages_sent_then_received_whole_until_peer_closes() {
        let (a, b) = pair();
        let mut ours = HostStream::from_owned(a).unwrap_or_else(|e| panic!("{e}"));
        let theirs = HostStream::from_owned(b).unwrap_or_else(|e| panic!("{e}"));
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        assert_eq!(theirs.recv(&mut buf).ok(), Some(Received::Empty));
        assert!(ours
            .send(&Message::Ack { delivered: 5 })
            .unwrap_or_else(|e| panic!("{e}")));
        let Ok(Received::Message(n)) = theirs.recv(&mut buf) else {
            panic!("no message");
        };
        assert_eq!(
            Message::decode(&buf[..n]),
            Ok(Message::Ack { delivered: 5 })
        );
        // Fill the socket: a full one reports false instead of blocking.
        let data = [0u8; 4096];
        let mut sent = 0;
        while ours
            .send(&Message::In {
                offset: sent,
                data: &data,
            })
            .unwrap_or_else(|e| panic!("{e}"))
        {
            sent += 1;
        }
        assert!(sent > 0);
        drop(theirs);
        assert!(ours.send(&Message::Ack { delivered: 1 }).is_err(), "EPIPE");
    }
}
