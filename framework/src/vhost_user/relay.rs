//! The validating front door between the frontend and vhost-user-backend.
//!
//! Outboard accepts the frontend's connection itself and hands the crate
//! the other end of an internal connection. The relay moves the byte
//! stream between the two, for one session:
//!
//! - frontend to crate, message by message: it receives each message with
//!   its own `recvmsg` and a control buffer large enough for every fd one
//!   call can carry (and refuses on `MSG_CTRUNC`), checks it against
//!   `super::rules`, makes kick, call and error eventfds nonblocking, and
//!   sends header, payload and fds on in one `sendmsg`. A refused message
//!   never reaches the crate: the relay hangs up both connections and the
//!   session ends with the refusal as its error.
//! - GET_INFLIGHT_FD and SET_INFLIGHT_FD never reach the crate (it answers
//!   them with an error): the relay answers them itself (`super::inflight`).
//!   A new kick fd (SET_VRING_KICK) is signalled once before the crate gets
//!   it, so a vring that restarts serves what the driver made available
//!   while no backend was listening (nobody kicks for it again).
//! - crate to frontend: replies, message by message and byte for byte (they
//!   carry no fds for the requests the rules allow). The relay's own reply
//!   to GET_INFLIGHT_FD goes out after the crate's replies to every request
//!   before it, so replies stay in request order.
//!
//! Kicks and calls are eventfds shared directly between the frontend and
//! the crate's vring threads, so the relay is not on the data path; it
//! sees only the control messages.
//!
//! A supervisor thread watches the frontend's connection: once it is closed
//! (by the frontend or by the relay), the session gets [`GRACE`] to wind
//! down (its vring threads stopped) and the process is then ended with
//! [`EXIT_STUCK`], whatever the crate's threads are doing (a vring thread
//! stuck in a blocking read keeps vhost-user-backend from ever returning,
//! and a stuck thread cannot be stopped any other way).

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, info, warn};
use thiserror::Error;

use super::inflight::{self, Description, Tracking, DESCRIPTION_SIZE};
use super::rules::{self, Header, Refusal, HEADER_SIZE, MAX_FDS, MAX_PAYLOAD};

/// How long a session may take to wind down once the frontend's
/// connection is closed.
pub const GRACE: Duration = Duration::from_secs(1);

/// The exit status when the process is ended after [`GRACE`] (the
/// framework's status 2, "protocol violation or I/O failure while serving").
pub const EXIT_STUCK: i32 = 2;

/// The most fds one `recvmsg` can return (the kernel's SCM_MAX_FD).
const SCM_MAX_FD: usize = 253;
/// Control buffer in `u64`s (for alignment): CMSG_SPACE(253 * 4) = 1032
/// bytes on 64-bit Linux, rounded up generously.
const CMSG_WORDS: usize = 160;
/// VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD.
const INFLIGHT_SHMFD: u64 = 1 << 12;
/// Header flags of a reply: version 1 and REPLY.
const REPLY_FLAGS: u32 = 0x1 | 0x4;
/// The largest reply the crate sends for the requests the rules allow (a
/// config read); anything larger ends the session.
const MAX_REPLY: usize = MAX_PAYLOAD;

/// Errors relaying.
#[derive(Debug, Error)]
pub enum Error {
    /// a frontend message was refused
    #[error("refused a frontend message")]
    Refused(#[source] Refusal),
    /// the frontend's inflight area cannot be used
    #[error("cannot use the frontend's inflight area")]
    Inflight(#[source] inflight::Error),
    /// the frontend hung up inside a message
    #[error("the frontend hung up inside a message")]
    Truncated,
    /// the session ended while a reply was due
    #[error("the session ended before vhost-user-backend answered")]
    Closed,
    /// receiving from the frontend failed
    #[error("cannot receive from the frontend")]
    Receive(#[source] io::Error),
    /// passing a message on failed
    #[error("cannot pass a message to vhost-user-backend")]
    Send(#[source] io::Error),
    /// answering the frontend failed
    #[error("cannot answer the frontend")]
    Reply(#[source] io::Error),
    /// making an eventfd nonblocking failed
    #[error("cannot make an eventfd nonblocking")]
    Nonblocking(#[source] io::Error),
    /// duplicating a socket failed
    #[error("cannot duplicate the relay's sockets")]
    Clone(#[source] io::Error),
    /// starting a relay thread failed
    #[error("cannot start the relay thread")]
    Spawn(#[source] io::Error),
    /// a relay thread panicked
    #[error("the relay thread panicked")]
    Panicked,
}

/// The frontend's write side, shared by the thread that copies the crate's
/// replies and the relay's own replies.
#[derive(Debug)]
struct Out {
    sock: Mutex<UnixStream>,
    counts: Mutex<Counts>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Counts {
    /// Replies of the crate written out whole.
    forwarded: u64,
    /// The crate or the session is gone: no more replies come.
    closed: bool,
}

impl Out {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn close(&self) {
        self.counts().closed = true;
        self.changed.notify_all();
    }

    /// Sends a reply of the relay's own once the crate's first `due`
    /// replies are out.
    fn reply_after(&self, due: u64, bytes: &[u8], fds: &[RawFd]) -> Result<(), Error> {
        let mut c = self.counts();
        while c.forwarded < due && !c.closed {
            c = self.changed.wait(c).unwrap_or_else(PoisonError::into_inner);
        }
        if c.forwarded < due {
            return Err(Error::Closed);
        }
        drop(c);
        let sock = self.sock.lock().unwrap_or_else(PoisonError::into_inner);
        send_all(sock.as_fd(), bytes, fds).map_err(Error::Reply)
    }
}

/// What the relay needs to answer the inflight requests.
#[derive(Debug, Clone)]
pub(super) struct Inflight {
    /// The session's tracking state.
    pub tracking: Arc<Tracking>,
    /// The device's queues.
    pub max_queues: u16,
}

/// A running relay (one session).
#[derive(Debug)]
pub(super) struct Relay {
    inbound: Option<JoinHandle<Result<(), Error>>>,
    armed: Arc<AtomicBool>,
    frontend: UnixStream,
    out: Arc<Out>,
}

impl Relay {
    /// Starts relaying between `frontend` and `backend` (the crate's end);
    /// `program` names the process in the supervisor's message.
    pub fn start(
        frontend: UnixStream,
        backend: UnixStream,
        program: String,
        inflight: Inflight,
    ) -> Result<Self, Error> {
        let verdict: Arc<Mutex<Option<String>>> = Arc::default();
        let armed = Arc::new(AtomicBool::new(true));
        let a = Arc::clone(&armed);
        let watched = frontend.try_clone().map_err(Error::Clone)?;
        let ours = frontend.try_clone().map_err(Error::Clone)?;
        let out = Arc::new(Out {
            sock: Mutex::new(frontend.try_clone().map_err(Error::Clone)?),
            counts: Mutex::default(),
            changed: Condvar::new(),
        });
        let back_in = backend.try_clone().map_err(Error::Clone)?;
        let v = Arc::clone(&verdict);
        thread::Builder::new()
            .name("vu-supervisor".into())
            .spawn(move || supervise(&watched, &program, &v, &a))
            .map_err(Error::Spawn)?;
        let o = Arc::clone(&out);
        thread::Builder::new()
            .name("vu-replies".into())
            .spawn(move || replies(back_in, &o))
            .map_err(Error::Spawn)?;
        let o = Arc::clone(&out);
        let inbound = thread::Builder::new()
            .name("vu-relay".into())
            .spawn(move || {
                let result = requests(&frontend, &backend, &o, &inflight);
                if let Err(e) = &result {
                    *verdict.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(outboard_protocol::error_chain(e));
                }
                // Either way the session is over: the crate sees EOF, the
                // frontend a hang-up, the supervisor a closed connection.
                let _ = backend.shutdown(Shutdown::Both);
                let _ = frontend.shutdown(Shutdown::Both);
                result
            })
            .map_err(Error::Spawn)?;
        Ok(Relay {
            inbound: Some(inbound),
            armed,
            frontend: ours,
            out,
        })
    }

    /// Ends the relay (the crate is done with the session: the frontend
    /// is hung up on if it is still there) and returns its error (a
    /// refusal), which is the session's.
    pub fn finish(&mut self) -> Result<(), Error> {
        let _ = self.frontend.shutdown(Shutdown::Both);
        self.out.close();
        match self.inbound.take() {
            Some(h) => h.join().map_err(|_| Error::Panicked)?,
            None => Ok(()),
        }
    }

    /// Tells the supervisor the session has wound down: it no longer ends
    /// the process.
    pub fn disarm(self) {
        self.armed.store(false, Ordering::SeqCst);
    }
}

/// Passes the frontend's messages on until it hangs up or one is refused;
/// answers the inflight requests itself.
fn requests(
    frontend: &UnixStream,
    backend: &UnixStream,
    out: &Out,
    inflight: &Inflight,
) -> Result<(), Error> {
    let mut buf = [0u8; HEADER_SIZE + MAX_PAYLOAD];
    // Replies the crate owes for the requests passed on so far.
    let mut due = 0u64;
    let mut negotiated = false;
    // With REPLY_ACK, a request flagged NEED_REPLY is answered too: by the
    // crate for what it is passed, by the relay for what it keeps.
    let mut reply_ack = false;
    loop {
        let mut fds = Vec::new();
        let (head, body) = buf.split_at_mut(HEADER_SIZE);
        if !recv_exact(frontend.as_fd(), head, &mut fds, true)? {
            return Ok(());
        }
        let mut raw = [0u8; HEADER_SIZE];
        raw.copy_from_slice(head);
        let header = Header::decode(&raw);
        let rule = rules::check(&header, fds.len()).map_err(Error::Refused)?;
        let size = header.size as usize;
        let payload = body.get_mut(..size).ok_or(Error::Truncated)?;
        recv_exact(frontend.as_fd(), payload, &mut fds, false)?;
        rules::check_fds(&rule, fds.len()).map_err(Error::Refused)?;
        rules::check_min_fds(&rule, fds.len()).map_err(Error::Refused)?;
        debug!(
            "vhost-user relay: {} ({} bytes, {} fds)",
            rule.name,
            size,
            fds.len()
        );
        match header.request {
            rules::GET_INFLIGHT_FD | rules::SET_INFLIGHT_FD if !negotiated => {
                return Err(Error::Refused(Refusal::NotNegotiated(rule.name)));
            }
            rules::GET_INFLIGHT_FD => {
                get_inflight_fd(payload, inflight, out, due)?;
                continue;
            }
            rules::SET_INFLIGHT_FD => {
                set_inflight_fd(payload, fds, inflight)?;
                if reply_ack && header.flags & NEED_REPLY != 0 {
                    let mut msg = Vec::with_capacity(HEADER_SIZE + 8);
                    for w in [rules::SET_INFLIGHT_FD, REPLY_FLAGS, 8] {
                        msg.extend_from_slice(&w.to_le_bytes());
                    }
                    msg.extend_from_slice(&0u64.to_le_bytes());
                    out.reply_after(due, &msg, &[])?;
                }
                continue;
            }
            rules::SET_PROTOCOL_FEATURES => {
                negotiated = u64_at(payload) & INFLIGHT_SHMFD != 0;
                reply_ack = u64_at(payload) & REPLY_ACK != 0;
            }
            _ => {}
        }
        if rule.eventfd {
            // A hostile frontend can clear O_NONBLOCK again on its copy
            // (the open file description is shared). A vring thread may
            // then block reading a replaced kick fd, stalling that thread's
            // queues of this device only; the requests still reach the
            // crate, and the supervisor still ends the process once the
            // frontend hangs up and the thread cannot be stopped.
            for fd in &fds {
                set_nonblocking(fd.as_fd()).map_err(Error::Nonblocking)?;
            }
        }
        if header.request == rules::SET_VRING_KICK {
            // A restarting vring serves what is already available. (The
            // eventfd is nonblocking now; a frontend that clears that
            // again and fills the counter blocks this thread, which the
            // supervisor covers like a stuck vring thread.)
            if let Some(fd) = fds.first() {
                kick(fd.as_fd());
            }
            let index = payload.first().copied().unwrap_or(0);
            inflight.tracking.starting(usize::from(index));
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        send_all(backend.as_fd(), &buf[..HEADER_SIZE + size], &raw).map_err(Error::Send)?;
        if rule.replies || (reply_ack && header.flags & NEED_REPLY != 0) {
            due += 1;
        }
    }
}

/// Header flag: the frontend wants an acknowledgement (with REPLY_ACK).
const NEED_REPLY: u32 = 1 << 3;
/// Protocol feature bit: REPLY_ACK.
const REPLY_ACK: u64 = 1 << 3;

/// The first 8 bytes of `payload` (the rules checked its size), little-endian.
fn u64_at(payload: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    let n = payload.len().min(8);
    w[..n].copy_from_slice(&payload[..n]);
    u64::from_le_bytes(w)
}

/// The inflight description in a payload the rules sized.
fn description(payload: &[u8]) -> Description {
    let mut b = [0u8; DESCRIPTION_SIZE];
    let n = payload.len().min(DESCRIPTION_SIZE);
    b[..n].copy_from_slice(&payload[..n]);
    Description::decode(&b)
}

/// GET_INFLIGHT_FD: a new zeroed area, or (when the frontend's shape is
/// out of range or the memfd cannot be made) a zero size, which tells the
/// frontend to go on without one.
fn get_inflight_fd(payload: &[u8], inflight: &Inflight, out: &Out, due: u64) -> Result<(), Error> {
    let asked = description(payload);
    let (reply, file) = match inflight::allocate(&asked, inflight.max_queues) {
        Ok((d, f)) => (d, Some(f)),
        Err(e) => {
            warn!(
                "vhost-user: no inflight area: {}",
                outboard_protocol::error_chain(&e)
            );
            (
                Description {
                    mmap_size: 0,
                    mmap_offset: 0,
                    ..asked
                },
                None,
            )
        }
    };
    let mut msg = Vec::with_capacity(HEADER_SIZE + DESCRIPTION_SIZE);
    for w in [rules::GET_INFLIGHT_FD, REPLY_FLAGS, DESCRIPTION_SIZE as u32] {
        msg.extend_from_slice(&w.to_le_bytes());
    }
    msg.extend_from_slice(&reply.encode());
    let fds: Vec<RawFd> = file.iter().map(AsRawFd::as_raw_fd).collect();
    out.reply_after(due, &msg, &fds)
}

/// SET_INFLIGHT_FD: maps the area and has every queue log to it from its
/// next start.
fn set_inflight_fd(
    payload: &[u8],
    mut fds: Vec<OwnedFd>,
    inflight: &Inflight,
) -> Result<(), Error> {
    let d = description(payload);
    let fd = fds.pop().ok_or(Error::Refused(Refusal::MissingFds {
        request: "SET_INFLIGHT_FD",
        got: 0,
        min: 1,
    }))?;
    let area = inflight::Area::map(&d, std::fs::File::from(fd), inflight.max_queues)
        .map_err(Error::Inflight)?;
    info!(
        "vhost-user: inflight area for {} queues of {}",
        d.num_queues, d.queue_size
    );
    inflight.tracking.install(&area);
    Ok(())
}

/// Signals an eventfd once (a full counter, EAGAIN, is as good).
fn kick(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to an fd we borrow.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// Copies the crate's replies to the frontend, whole messages at a time,
/// counting them; when the crate hangs up, hangs up on the frontend too
/// (which ends [`requests`]).
fn replies(mut backend: UnixStream, out: &Out) {
    let mut buf = vec![0u8; HEADER_SIZE + MAX_REPLY];
    loop {
        let (head, body) = buf.split_at_mut(HEADER_SIZE);
        if backend.read_exact(head).is_err() {
            break;
        }
        let size = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
        let Some(payload) = body.get_mut(..size) else {
            warn!("vhost-user: a {size}-byte reply from vhost-user-backend");
            break;
        };
        if backend.read_exact(payload).is_err() {
            break;
        }
        let written = {
            let mut sock = out.sock.lock().unwrap_or_else(PoisonError::into_inner);
            sock.write_all(&buf[..HEADER_SIZE + size])
        };
        if written.is_err() {
            break;
        }
        out.counts().forwarded += 1;
        out.changed.notify_all();
    }
    out.close();
    let sock = out.sock.lock().unwrap_or_else(PoisonError::into_inner);
    let _ = sock.shutdown(Shutdown::Both);
    let _ = backend.shutdown(Shutdown::Both);
}

/// Ends the process [`GRACE`] after the frontend's connection is closed,
/// unless the session has wound down by then (`armed` cleared).
fn supervise(
    frontend: &UnixStream,
    program: &str,
    verdict: &Mutex<Option<String>>,
    armed: &AtomicBool,
) {
    let mut p = libc::pollfd {
        fd: frontend.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd for the duration of the call and
        // `frontend` keeps its fd open.
        let rc = unsafe { libc::poll(&mut p, 1, -1) };
        if rc > 0 {
            break;
        }
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    thread::sleep(GRACE);
    if !armed.load(Ordering::SeqCst) {
        return;
    }
    let reason = verdict
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .map(|v| format!("{v}; "))
        .unwrap_or_default();
    eprintln!(
        "{program}: error: {reason}the vhost-user frontend disconnected but the device did not stop within {} ms",
        GRACE.as_millis()
    );
    std::process::exit(EXIT_STUCK);
}

/// Fills `buf` from `sock`, collecting every fd that arrives. Returns false
/// on EOF before the first byte when `eof_ok`.
fn recv_exact(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    eof_ok: bool,
) -> Result<bool, Error> {
    let mut done = 0;
    while done < buf.len() {
        let n = recv_some(sock, &mut buf[done..], fds)?;
        if n == 0 {
            return if done == 0 && eof_ok {
                Ok(false)
            } else {
                Err(Error::Truncated)
            };
        }
        done += n;
        if fds.len() > MAX_FDS {
            // Refused by the caller's check; no need to read on.
            break;
        }
    }
    Ok(true)
}

/// One `recvmsg` into `buf`; the fds that came with it are appended to
/// `fds` (owned, so closed if the message is refused).
fn recv_some(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize, Error> {
    let mut control = [0u64; CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct of integers and pointers, for
    // which all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; CMSG_WORDS]>() as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (covering `buf`) and `control`, all
        // alive and exclusively borrowed for the call; the kernel writes
        // within the lengths given.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(Error::Receive(e));
        }
    };
    let mut foreign = false;
    // SAFETY: `msg` was filled by recvmsg; msg_control/msg_controllen
    // describe `control`, which is still alive.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return headers inside `control`
        // (or null), aligned for cmsghdr.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a length.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (h.cmsg_len as usize).saturating_sub(head) / size_of::<RawFd>();
            // SAFETY: `c` is a valid header inside `control`.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count.min(SCM_MAX_FD) {
                // SAFETY: the kernel wrote `count` fds after the header,
                // within `control` (cmsg_len never exceeds the buffer it was
                // given); they may be unaligned, hence read_unaligned.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: SCM_RIGHTS just installed `raw` in this process;
                // nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        } else {
            foreign = true;
        }
        // SAFETY: as for CMSG_FIRSTHDR; `c` is a header inside `control`.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(Error::Refused(Refusal::Truncated));
    }
    if foreign {
        return Err(Error::Refused(Refusal::Ancillary));
    }
    Ok(n)
}

/// Sends `bytes` on `sock`, with `fds` attached to the first byte.
fn send_all(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    // CMSG_SPACE(MAX_FDS * 4) bytes, in u64s for alignment.
    let mut control = [0u64; 8];
    let mut sent = 0;
    let mut fds = fds;
    while sent < bytes.len() {
        let rest = &bytes[sent..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr().cast_mut().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: as in recv_some, all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let len = std::mem::size_of_val(fds);
            // SAFETY: CMSG_SPACE and CMSG_LEN only compute lengths.
            let (space, cmsg_len) =
                unsafe { (libc::CMSG_SPACE(len as u32), libc::CMSG_LEN(len as u32)) };
            if space as usize > size_of::<[u64; 8]>() || fds.len() > MAX_FDS {
                return Err(io::Error::from_raw_os_error(libc::E2BIG));
            }
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `control`, at least `space`
            // bytes, so the first header fits and is aligned.
            let c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            if c.is_null() {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            // SAFETY: `c` points at a cmsghdr inside `control`, and its data
            // (`len` bytes) fits within `space`.
            unsafe {
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = cmsg_len as _;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    data.add(i).write_unaligned(*fd);
                }
            }
        }
        // SAFETY: `msg` points at `iov` (over `bytes`, only read) and
        // `control`, both alive for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
        fds = &[];
    }
    Ok(())
}

/// Sets O_NONBLOCK on `fd`'s open file description.
fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL only reads the flags of an fd we borrow.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL only changes the flags of an fd we borrow.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn header(request: u32, size: u32) -> Vec<u8> {
        [request, 1, size]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    #[test]
    fn recv_when_more_fds_than_the_crate_takes_then_all_seen() {
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let e = EventFd::new(0).unwrap_or_else(|e| panic!("{e}"));
        let raw = [e.as_raw_fd(); 40];
        // Sent in one go, the way a hostile frontend would.
        let mut msg = header(1, 12);
        msg.extend(header(1, 0));
        send_raw(&a, &msg, &raw);
        let mut fds = Vec::new();
        let mut buf = [0u8; HEADER_SIZE];
        assert!(recv_exact(b.as_fd(), &mut buf, &mut fds, true).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(fds.len(), 40);
    }

    #[test]
    fn relay_when_kick_then_nonblocking_and_forwarded_with_its_fd() {
        let (fe, ours) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (to_crate, crate_end) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let e = EventFd::new(0).unwrap_or_else(|e| panic!("{e}"));
        let mut msg = header(rules::SET_VRING_KICK, 8);
        msg.extend(0u64.to_le_bytes());
        send_raw(&fe, &msg, &[e.as_raw_fd()]);
        drop(fe);
        relay_alone(&ours, &to_crate).unwrap_or_else(|e| panic!("{e}"));
        let mut fds = Vec::new();
        let mut buf = [0u8; HEADER_SIZE + 8];
        assert!(recv_exact(crate_end.as_fd(), &mut buf, &mut fds, true)
            .unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(buf.to_vec(), msg);
        assert_eq!(fds.len(), 1);
        // SAFETY: F_GETFL reads flags of a valid fd.
        let flags = unsafe { libc::fcntl(e.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(
            flags & libc::O_NONBLOCK,
            0,
            "shared description made nonblocking"
        );
    }

    #[test]
    fn relay_when_33_fds_then_refused_and_nothing_forwarded() {
        let (fe, ours) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (to_crate, mut crate_end) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let e = EventFd::new(0).unwrap_or_else(|e| panic!("{e}"));
        let mut msg = header(5, 12);
        msg.extend(header(1, 0));
        send_raw(&fe, &msg, &[e.as_raw_fd(); 33]);
        let Err(err) = relay_alone(&ours, &to_crate) else {
            panic!("accepted")
        };
        assert!(
            outboard_protocol::error_chain(&err).contains("33 fds"),
            "{err}"
        );
        drop(to_crate);
        let mut rest = Vec::new();
        crate_end
            .read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(rest.is_empty());
    }

    #[test]
    fn relay_when_backend_req_fd_then_passed_on_blocking_as_it_is() {
        let (fe, ours) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (to_crate, crate_end) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (channel, _peer) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let msg = header(21, 0);
        send_raw(&fe, &msg, &[channel.as_raw_fd()]);
        drop(fe);
        relay_alone(&ours, &to_crate).unwrap_or_else(|e| panic!("{e}"));
        let mut fds = Vec::new();
        let mut buf = [0u8; HEADER_SIZE];
        assert!(recv_exact(crate_end.as_fd(), &mut buf, &mut fds, true)
            .unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(buf.to_vec(), msg);
        assert_eq!(fds.len(), 1, "the backend's channel reaches the crate");
        // SAFETY: F_GETFL reads flags of a valid fd.
        let flags = unsafe { libc::fcntl(channel.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "not an eventfd: left alone");
    }

    /// Runs [`requests`] for a device of one queue; replies go nowhere.
    fn relay_alone(frontend: &UnixStream, backend: &UnixStream) -> Result<(), Error> {
        let (sink, _peer) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let out = Out {
            sock: Mutex::new(sink),
            counts: Mutex::default(),
            changed: Condvar::new(),
        };
        let inflight = Inflight {
            tracking: Arc::new(Tracking::new(1)),
            max_queues: 1,
        };
        requests(frontend, backend, &out, &inflight)
    }

    #[test]
    fn relay_when_get_inflight_fd_then_answered_here_with_a_sealed_memfd() {
        let (fe, ours) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (to_crate, mut crate_end) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (sink, mut frontend_view) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let mut features = header(rules::SET_PROTOCOL_FEATURES, 8);
        features.extend(INFLIGHT_SHMFD.to_le_bytes());
        send_raw(&fe, &features, &[]);
        let mut get = header(rules::GET_INFLIGHT_FD, 24);
        get.extend([0u8; 16]);
        get.extend(1u16.to_le_bytes());
        get.extend(64u16.to_le_bytes());
        get.extend([0u8; 4]);
        send_raw(&fe, &get, &[]);
        drop(fe);
        let out = Out {
            sock: Mutex::new(sink),
            counts: Mutex::default(),
            changed: Condvar::new(),
        };
        let inflight = Inflight {
            tracking: Arc::new(Tracking::new(1)),
            max_queues: 1,
        };
        requests(&ours, &to_crate, &out, &inflight).unwrap_or_else(|e| panic!("{e}"));
        drop(to_crate);
        let mut passed = Vec::new();
        crate_end
            .read_to_end(&mut passed)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            passed, features,
            "only SET_PROTOCOL_FEATURES reaches the crate"
        );
        let mut fds = Vec::new();
        let mut reply = [0u8; HEADER_SIZE + DESCRIPTION_SIZE];
        assert!(
            recv_exact(frontend_view.as_fd(), &mut reply, &mut fds, true)
                .unwrap_or_else(|e| panic!("{e}"))
        );
        assert_eq!(&reply[..12], &[31, 0, 0, 0, 5, 0, 0, 0, 24, 0, 0, 0]);
        let mut d = [0u8; DESCRIPTION_SIZE];
        d.copy_from_slice(&reply[12..]);
        let d = Description::decode(&d);
        assert_eq!((d.mmap_size, d.num_queues, d.queue_size), (1088, 1, 64));
        assert_eq!(fds.len(), 1);
        let _ = frontend_view.set_nonblocking(true);
        assert!(frontend_view.read(&mut [0u8; 1]).is_err(), "nothing else");
    }

    #[test]
    fn relay_when_inflight_request_without_the_feature_then_refused() {
        let (fe, ours) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (to_crate, _crate_end) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let mut get = header(rules::GET_INFLIGHT_FD, 24);
        get.extend([0u8; 24]);
        send_raw(&fe, &get, &[]);
        let Err(err) = relay_alone(&ours, &to_crate) else {
            panic!("accepted")
        };
        assert!(
            matches!(
                err,
                Error::Refused(Refusal::NotNegotiated("GET_INFLIGHT_FD"))
            ),
            "{err}"
        );
    }

    fn send_raw(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let n = s
            .send_with_fds(&[bytes], fds)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, bytes.len());
    }
}
