//! A region's data channel as the frontend drives it: the data socket,
//! and the command ring once one is set up (docs/protocol.md sections 7
//! and 7.11). One deadline bounds each access as a whole on either.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use outboard_protocol::ioregionfd::{Cmd, Resp, RESP_SIZE};
use outboard_protocol::wait::{self, Deadline};

use super::ring;
use crate::bus::AccessError;

/// A region's data channel: its socket and, once set up, its command ring
/// (which then carries every command; the socket stays for the backend's
/// hang-up and for fallback).
#[derive(Debug)]
pub(crate) struct Transport {
    pub(super) sock: UnixStream,
    pub(super) ring: Option<ring::RingLink>,
}

impl Transport {
    pub(super) fn new(sock: UnixStream) -> Self {
        Transport { sock, ring: None }
    }

    /// Sends `cmd` and waits for its answer if it asks for one, within
    /// `timeout` for the whole access, on the ring if there is one.
    pub(super) fn exchange(&mut self, cmd: &Cmd, timeout: Duration) -> Result<u64, AccessError> {
        match &mut self.ring {
            Some(r) => r.exchange(cmd, &self.sock, timeout),
            None => exchange(&self.sock, cmd, timeout),
        }
    }

    /// True when commands travel on a ring.
    pub(crate) fn on_ring(&self) -> bool {
        self.ring.is_some()
    }
}

/// Sends `cmd` and reads its response, all within one `timeout` for the
/// access as a whole: a backend that trickles bytes cannot stretch it.
///
/// The common case costs what it did before deadlines: one `send` (that
/// does not wait) and one `read` that blocks under the socket's
/// SO_RCVTIMEO. Only a send that has to wait or a partial response falls
/// back to `poll` with the time left.
fn exchange(sock: &UnixStream, cmd: &Cmd, timeout: Duration) -> Result<u64, AccessError> {
    // Instant::now() is a vDSO call, not a syscall.
    let deadline = Deadline::after(Some(timeout));
    let waited = send_all(sock, &cmd.encode(), &deadline)?;
    if !cmd.resp {
        return Ok(0);
    }
    let mut buf = [0u8; RESP_SIZE];
    let mut got = 0;
    if !waited {
        // The send took no time: SO_RCVTIMEO (the timeout) ends with the deadline.
        got = loop {
            match (&*sock).read(&mut buf) {
                Ok(0) => return Err(AccessError::BackendGone),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(access_error(wait::Error::Io(e))),
            }
        };
    }
    while got < RESP_SIZE {
        match wait::recv_some(sock.as_fd(), &mut buf[got..], &deadline) {
            Ok(0) if got == 0 => return Err(AccessError::BackendGone),
            Ok(0) => return Err(AccessError::ShortResponse(got)),
            Ok(n) => got += n,
            Err(e) => return Err(access_error(e)),
        }
    }
    Resp::decode(&buf)
        .map(|r| r.data)
        .map_err(AccessError::Garbled)
}

pub(crate) fn access_error(e: wait::Error) -> AccessError {
    match e {
        wait::Error::Timeout => AccessError::Timeout,
        wait::Error::Io(e) => match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AccessError::Timeout,
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => AccessError::BackendGone,
            _ => AccessError::Io(e),
        },
    }
}

/// Writes all of `buf` by `deadline`, without raising SIGPIPE if the
/// backend is gone. Returns true if it had to wait for buffer space.
pub(super) fn send_all(
    sock: &UnixStream,
    buf: &[u8],
    deadline: &Deadline,
) -> Result<bool, AccessError> {
    let first = wait::try_send(sock.as_fd(), buf).map_err(access_error)?;
    let mut rest = &buf[first.unwrap_or(0)..];
    let waited = !rest.is_empty();
    while !rest.is_empty() {
        let n = wait::send_some(sock.as_fd(), rest, deadline).map_err(access_error)?;
        rest = &rest[n..];
    }
    Ok(waited)
}
