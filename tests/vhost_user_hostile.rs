//! A hostile vhost-user frontend against Outboard's backends served with
//! `--vhost-user`: the byte stream is written by hand, so it can do what the
//! vhost crate's frontend never would (too many fds, replacing a running
//! vring's kick fd, clearing O_NONBLOCK on a shared eventfd). The backend
//! keeps listening: whatever one frontend did, the next one is served,
//! unless a vring thread is stuck for good (then the process ends).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use outboard_tests::{outboard_vhost_user_logged, wait_exit, wait_for_text, Reaped, HANG_GUARD};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// The frontend's (made-up) address of guest memory, as SET_MEM_TABLE says.
const VA: u64 = 0x7000_0000;
const MEM: u64 = 1 << 20;

/// A backend started with `program --vhost-user SOCK`, stderr in a file.
struct Backend {
    process: Reaped,
    sock: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

/// `program --vhost-user SOCK` and a first frontend connected to it.
fn backend(program: &str) -> (Backend, UnixStream) {
    let (process, sock, stderr) = outboard_vhost_user_logged(program, &[]);
    let s = connect(&sock);
    s.set_read_timeout(Some(HANG_GUARD / 2)).unwrap();
    (
        Backend {
            process,
            sock,
            stderr,
        },
        s,
    )
}

impl Backend {
    /// A new frontend is served: GET_FEATURES is answered, and the process
    /// is still running.
    fn serves_the_next_frontend(&mut self) {
        let mut s = connect(&self.sock);
        s.set_read_timeout(Some(HANG_GUARD / 2)).unwrap();
        assert_ne!(features(&mut s), 0, "the next frontend is served");
        assert!(
            self.process.0.try_wait().unwrap().is_none(),
            "still running"
        );
    }
}

fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn message(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m: Vec<u8> = [request, 1, payload.len() as u32]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    m.extend_from_slice(payload);
    m
}

fn send(s: &UnixStream, request: u32, payload: &[u8], fds: &[RawFd]) {
    let m = message(request, payload);
    assert_eq!(s.send_with_fds(&[&m[..]], fds).unwrap(), m.len());
}

/// Reads one reply: its request code and payload.
fn reply(s: &mut UnixStream) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 12];
    s.read_exact(&mut h)?;
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    let mut payload = vec![0u8; word(8) as usize];
    s.read_exact(&mut payload)?;
    Ok((word(0), payload))
}

fn u64s(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index, num].iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// What the stream holds until the backend hangs up, and the error if it
/// did not (the read timed out).
fn rest(s: &mut UnixStream) -> (Vec<u8>, Option<io::Error>) {
    let mut buf = Vec::new();
    let e = s.read_to_end(&mut buf).err();
    (buf, e)
}

fn features(s: &mut UnixStream) -> u64 {
    send(s, GET_FEATURES, &[], &[]);
    let (code, p) = reply(s).expect("GET_FEATURES answered");
    assert_eq!(code, GET_FEATURES);
    u64::from_le_bytes(p[..8].try_into().unwrap())
}

fn memfd() -> OwnedFd {
    // SAFETY: a NUL-terminated name and plain flags.
    let fd = unsafe { libc::memfd_create(c"vu-hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: memfd_create just returned this fd to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on an fd we own.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), MEM as libc::off_t) };
    assert_eq!(rc, 0);
    fd
}

/// Sets up queue 0 (empty rings in a memfd) with `kick` and `call`; the
/// vring thread then polls `kick`.
fn start_queue(s: &mut UnixStream, mem: &OwnedFd, kick: &EventFd, call: &EventFd) {
    let offered = features(s);
    send(s, SET_OWNER, &[], &[]);
    send(s, SET_FEATURES, &u64s(&[offered & !PROTOCOL_FEATURES]), &[]);
    let mut table = vec![1u8, 0, 0, 0, 0, 0, 0, 0];
    table.extend(u64s(&[0, MEM, VA, 0]));
    send(s, SET_MEM_TABLE, &table, &[mem.as_raw_fd()]);
    send(s, SET_VRING_NUM, &vring_state(0, 16), &[]);
    let mut addr = vring_state(0, 0);
    addr.extend(u64s(&[VA, VA + 0x2000, VA + 0x1000, 0]));
    send(s, SET_VRING_ADDR, &addr, &[]);
    send(s, SET_VRING_BASE, &vring_state(0, 0), &[]);
    send(s, SET_VRING_CALL, &u64s(&[0]), &[call.as_raw_fd()]);
    send(s, SET_VRING_KICK, &u64s(&[0]), &[kick.as_raw_fd()]);
    // A reply means everything before it was handled.
    features(s);
}

/// More fds than the vhost crate's 32-entry control buffer: the crate loses
/// the header and runs the payload as a request of its own.
fn too_many_fds(count: usize) {
    let (mut b, mut s) = backend("outboard-virtio-rng");
    let e = EventFd::new(0).unwrap();
    // A GET_FEATURES whose 12-byte payload is another GET_FEATURES header.
    let smuggled = message(GET_FEATURES, &[]);
    send(&s, GET_FEATURES, &smuggled, &vec![e.as_raw_fd(); count]);
    let (answered, error) = rest(&mut s);
    assert!(
        answered.is_empty(),
        "the backend answered a smuggled request: {answered:?}"
    );
    assert!(error.is_none(), "the backend did not hang up: {error:?}");
    let err = wait_for_text(&b.stderr, &format!("{count} fds"));
    assert!(err.contains("refused a frontend message"), "{err}");
    b.serves_the_next_frontend();
}

#[test]
fn vhost_user_when_33_fds_then_refused_the_payload_never_runs_and_the_next_frontend_served() {
    too_many_fds(33);
}

#[test]
fn vhost_user_when_40_fds_then_refused_the_payload_never_runs_and_the_next_frontend_served() {
    too_many_fds(40);
}

#[test]
fn vhost_user_when_kick_replaced_and_old_one_rung_then_still_serving_and_the_next_frontend_served()
{
    let (mut b, mut s) = backend("outboard-virtio-rng");
    let mem = memfd();
    let (kick, call, kick2) = (
        EventFd::new(0).unwrap(),
        EventFd::new(0).unwrap(),
        EventFd::new(0).unwrap(),
    );
    start_queue(&mut s, &mem, &kick, &call);
    send(&s, SET_VRING_KICK, &u64s(&[0]), &[kick2.as_raw_fd()]);
    features(&mut s);
    // The old kick fd is still in the vring thread's epoll set; ringing it
    // makes the thread read the new one, which holds nothing.
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    send(&s, GET_VRING_BASE, &vring_state(0, 0), &[]);
    let (code, p) = reply(&mut s).expect("GET_VRING_BASE answered (no hang)");
    assert_eq!((code, p), (GET_VRING_BASE, vring_state(0, 0)));
    drop(s);
    b.serves_the_next_frontend();
}

#[test]
fn vhost_user_when_frontend_leaves_while_a_vring_thread_is_stuck_then_process_exits() {
    let (mut b, mut s) = backend("outboard-virtio-rng");
    let mem = memfd();
    let (kick, call, kick2) = (
        EventFd::new(0).unwrap(),
        EventFd::new(0).unwrap(),
        EventFd::new(0).unwrap(),
    );
    start_queue(&mut s, &mem, &kick, &call);
    send(&s, SET_VRING_KICK, &u64s(&[0]), &[kick2.as_raw_fd()]);
    features(&mut s);
    // The description is shared: clearing O_NONBLOCK here clears it for
    // the backend too, so the vring thread blocks reading kick2.
    // SAFETY: F_SETFL on an fd we own.
    let rc = unsafe { libc::fcntl(kick2.as_raw_fd(), libc::F_SETFL, 0) };
    assert_eq!(rc, 0);
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    // The stuck thread cannot be stopped, so the session cannot end: the
    // process does.
    let status = wait_exit(&mut b.process.0);
    let err = std::fs::read_to_string(&b.stderr).unwrap_or_default();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("did not stop"), "{err}");
}
