//! Vetting the data socket of a SET_REGION (docs/protocol.md section 5.4):
//! it must be a connected Unix stream socket whose peer is not a socket
//! this backend holds itself.
//!
//! The last rule matters because a backend that held both ends of its
//! control connection (or of a data socket) would never see EOF on it.
//! Linux tells a Unix socket's peer only through `NETLINK_SOCK_DIAG`
//! (`unix_diag` with `UDIAG_SHOW_PEER`), which answers by inode. The
//! netlink socket is created once, at setup ([`Vetter::new`] runs in
//! `Backend::new`), and kept: a confined backend may run in a new network
//! namespace under a seccomp filter that forbids `socket()`, and a netlink
//! socket keeps querying the namespace it was created in, where the
//! frontend's sockets live.
//!
//! Without `unix_diag` (the module is missing, or a socket lives in a
//! network namespace the netlink socket cannot see), the peer is unknown:
//! the other rules still apply, a socket that is one of ours (same inode)
//! is still refused, and the first such failure is logged once.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use log::warn;
use thiserror::Error;

/// `SOCK_DIAG_BY_FAMILY` from linux/sock_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `UDIAG_SHOW_PEER` from linux/unix_diag.h.
const UDIAG_SHOW_PEER: u32 = 0x4;
/// `UNIX_DIAG_PEER` attribute type from linux/unix_diag.h.
const UNIX_DIAG_PEER: u16 = 2;
/// `NLMSG_ERROR` from linux/netlink.h.
const NLMSG_ERROR: u16 = 2;
/// netlink header + `struct unix_diag_req`.
const REQ_LEN: usize = 16 + 24;
/// netlink header + `struct unix_diag_msg`: where the attributes start.
const ATTRS_AT: usize = 16 + 16;

/// Why a data socket was refused (status `BadFd`).
#[derive(Debug, Error)]
pub enum Error {
    /// data socket is not a Unix-domain socket
    #[error("data socket is not a Unix-domain socket")]
    NotUnix,
    /// data socket is not a stream socket
    #[error("data socket is not a stream socket")]
    NotStream,
    /// data socket is listening
    #[error("data socket is listening")]
    Listening,
    /// data socket is not connected
    #[error("data socket is not connected")]
    NotConnected,
    /// data socket is, or is connected to, a socket this backend holds
    #[error("data socket is, or is connected to, a socket this backend holds")]
    OwnSocket,
    /// cannot inspect the data socket
    #[error("cannot inspect the data socket")]
    Inspect(#[source] io::Error),
}

/// A socket by inode, with its peer's inode when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    ino: u64,
    peer: Option<u64>,
}

impl Identity {
    /// True if `other` is this socket or its peer.
    fn touches(&self, other: &Identity) -> bool {
        self.ino == other.ino
            || other.peer == Some(self.ino)
            || self.peer.is_some_and(|p| p == other.ino)
    }
}

/// Checks data sockets against the control socket and each other.
#[derive(Debug)]
pub(crate) struct Vetter {
    diag: Option<OwnedFd>,
    seq: u32,
    warned: bool,
    control: Option<Identity>,
}

impl Vetter {
    /// Creates the netlink socket (at setup: see the module docs).
    pub(crate) fn new() -> Self {
        // SAFETY: socket() takes plain integers; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        let diag = if fd >= 0 {
            // SAFETY: socket() just returned this fd; nothing else owns it.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        } else {
            warn!(
                "no sock_diag netlink socket ({}): data sockets' peers cannot be checked",
                io::Error::last_os_error()
            );
            None
        };
        Vetter {
            warned: diag.is_none(),
            diag,
            seq: 0,
            control: None,
        }
    }

    /// Records the control socket, whose peer no data socket may be.
    pub(crate) fn set_control(&mut self, control: BorrowedFd<'_>) {
        match inode(control) {
            Ok(ino) => {
                let peer = self.peer_of(ino);
                self.control = Some(Identity { ino, peer });
            }
            Err(e) => warn!("cannot inspect the control socket: {e}"),
        }
    }

    /// Accepts `fd` as a data socket if it is a connected Unix stream
    /// socket, not listening, and neither one of `held` nor the control
    /// socket nor connected to one of them.
    pub(crate) fn vet(
        &mut self,
        fd: BorrowedFd<'_>,
        held: impl IntoIterator<Item = Identity>,
    ) -> Result<Identity, Error> {
        if sockopt(fd, libc::SO_DOMAIN)? != libc::AF_UNIX {
            return Err(Error::NotUnix);
        }
        if sockopt(fd, libc::SO_TYPE)? != libc::SOCK_STREAM {
            return Err(Error::NotStream);
        }
        if sockopt(fd, libc::SO_ACCEPTCONN)? != 0 {
            return Err(Error::Listening);
        }
        connected(fd)?;
        let ino = inode(fd).map_err(Error::Inspect)?;
        let id = Identity {
            ino,
            peer: self.peer_of(ino),
        };
        if self.control.into_iter().chain(held).any(|o| id.touches(&o)) {
            return Err(Error::OwnSocket);
        }
        Ok(id)
    }

    /// The peer inode of the Unix socket `ino`; `None`, logged once, when
    /// sock_diag cannot tell.
    fn peer_of(&mut self, ino: u64) -> Option<u64> {
        let diag = self.diag.as_ref()?;
        self.seq = self.seq.wrapping_add(1);
        match query_peer(diag, ino, self.seq) {
            Ok(p) => p,
            Err(e) => {
                if !self.warned {
                    self.warned = true;
                    warn!("cannot tell a Unix socket's peer (unix_diag: {e}); such data sockets are checked without it");
                }
                None
            }
        }
    }
}

/// An int socket option.
fn sockopt(fd: BorrowedFd<'_>, opt: libc::c_int) -> Result<libc::c_int, Error> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live locals of the sizes passed; the fd
    // stays open for the borrow.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Error::Inspect(io::Error::last_os_error()));
    }
    Ok(v)
}

/// Ok if the socket has a peer (`getpeername` succeeds).
fn connected(fd: BorrowedFd<'_>) -> Result<(), Error> {
    let mut addr = MaybeUninit::<libc::sockaddr_un>::zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a live buffer of `len` bytes the kernel may fill;
    // the fd stays open for the borrow.
    let rc = unsafe { libc::getpeername(fd.as_raw_fd(), addr.as_mut_ptr().cast(), &mut len) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOTCONN) => Err(Error::NotConnected),
        _ => Err(Error::Inspect(e)),
    }
}

/// The inode of `fd` (`fstat`).
fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    super::resources::identity(&fd).map(|(_, ino)| ino)
}

/// Asks sock_diag for the peer of Unix socket `ino`: `Ok(None)` when it has
/// none.
fn query_peer(diag: &OwnedFd, ino: u64, seq: u32) -> io::Result<Option<u64>> {
    let ino32 = u32::try_from(ino).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let mut req = [0u8; REQ_LEN];
    req[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    // struct unix_diag_req: family, protocol, pad, states, ino, show, cookie.
    req[16] = libc::AF_UNIX as u8;
    req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
    req[24..28].copy_from_slice(&ino32.to_ne_bytes());
    req[28..32].copy_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    // No cookie to check (INET_DIAG_NOCOOKIE).
    req[32..40].copy_from_slice(&[0xff; 8]);
    // SAFETY: `req` is a live buffer of the length passed; the fd is open.
    let n = unsafe {
        libc::send(
            diag.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // The kernel answers within send(); anything else queued is stale.
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: `buf` is a live, writable buffer of the length passed.
        let n = unsafe {
            libc::recv(
                diag.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(answer) = parse_reply(&buf[..n as usize], seq, ino32) {
            return answer;
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The answer in one netlink datagram to request `seq` about `ino`, or
/// `None` if the datagram is about something else.
fn parse_reply(msg: &[u8], seq: u32, ino: u32) -> Option<io::Result<Option<u64>>> {
    let len = (u32_at(msg, 0)? as usize).min(msg.len());
    if u32_at(msg, 8)? != seq {
        return None;
    }
    let msg = &msg[..len];
    match u16_at(msg, 4)? {
        NLMSG_ERROR => {
            let err = u32_at(msg, 16)? as i32;
            Some(Err(io::Error::from_raw_os_error(-err)))
        }
        SOCK_DIAG_BY_FAMILY if u32_at(msg, 20)? == ino => {
            let mut at = ATTRS_AT;
            while let (Some(rlen), Some(rtype)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
                if rlen < 4 {
                    break;
                }
                if rtype == UNIX_DIAG_PEER {
                    return Some(Ok(u32_at(msg, at + 4).map(u64::from)));
                }
                at += (usize::from(rlen) + 3) & !3;
            }
            Some(Ok(None))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

    #[test]
    fn vet_when_socket_is_ours_or_wrong_kind_then_refused_and_a_fresh_pair_accepted() {
        let (control, frontend_end) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let mut v = Vetter::new();
        v.set_control(control.as_fd());
        let refused = |v: &mut Vetter, fd: BorrowedFd<'_>| v.vet(fd, []).err();
        assert!(matches!(
            refused(&mut v, frontend_end.as_fd()),
            Some(Error::OwnSocket)
        ));
        assert!(matches!(
            refused(&mut v, control.as_fd()),
            Some(Error::OwnSocket)
        ));
        let (dgram, _d) = UnixDatagram::pair().unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            refused(&mut v, dgram.as_fd()),
            Some(Error::NotStream)
        ));
        let dir = std::env::temp_dir().join(format!("outboard-vet-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let l = UnixListener::bind(&dir).unwrap_or_else(|e| panic!("{e}"));
        let _ = std::fs::remove_file(&dir);
        assert!(matches!(refused(&mut v, l.as_fd()), Some(Error::Listening)));
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let held = v.vet(a.as_fd(), []).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            v.vet(b.as_fd(), [held]).err(),
            Some(Error::OwnSocket)
        ));
    }
}
