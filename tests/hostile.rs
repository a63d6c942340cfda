//! Hostile frontends (issue 11): a real backend process must neither hang
//! on fds its frontend manipulated nor outlive a frontend that has gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Child;

use outboard::cli::{EXIT_OK, EXIT_PROTOCOL};
use outboard_backends::scratch::{REG_ID, REG_IRQ_RAISE};
use outboard_protocol::channel::Channel;
use outboard_protocol::control::{Payload, Request, SetIrq, SetRegion, Status};
use outboard_protocol::ioregionfd::{Cmd, Resp, CMD_SIZE, RESP_SIZE};
use outboard_protocol::AccessSize;
use outboard_tests::{
    call, connect, error_status, hello, spawn_listening, stderr_of, wait_exit, HANG_GUARD,
};

/// A scratch backend, killed if a test fails before it exits.
struct Peer {
    child: Option<Child>,
    ch: Option<Channel>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Peer {
    fn start() -> Peer {
        let (child, path) = spawn_listening("outboard-scratch", &[]);
        let ch = connect(&path);
        hello(&ch);
        Peer {
            child: Some(child),
            ch: Some(ch),
        }
    }

    fn call(&self, req: Request, payload: &[u8], fds: &[i32]) -> Option<Status> {
        error_status(&call(self.ch.as_ref().unwrap(), req, payload, fds))
    }

    /// Places region 0 (the registers) on a fresh data socket with token 1.
    fn place_regs(&self) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let set = SetRegion {
            index: 0,
            flags: 0,
            guest_addr: 0x1000,
            user_data: 1,
        };
        let st = self.call(Request::SetRegion, &set.encode(), &[theirs.as_raw_fd()]);
        assert_eq!(st, None);
        // Hang detector only: a stuck backend fails the test instead of hanging it.
        ours.set_read_timeout(Some(HANG_GUARD)).unwrap();
        ours
    }

    /// Closes the control connection, waits for the exit; status and stderr.
    fn close_and_wait(&mut self) -> (Option<i32>, String) {
        drop(self.ch.take());
        let mut child = self.child.take().unwrap();
        let status = wait_exit(&mut child);
        (status.code(), stderr_of(&mut child))
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: eventfd just returned this fd; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn set_blocking(fd: &OwnedFd) {
    // SAFETY: F_GETFL/F_SETFL only touch the file status flags of our fd.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        assert!(flags >= 0);
        assert_eq!(
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK),
            0
        );
    }
}

fn round_trip(data: &mut UnixStream, cmd: Cmd) -> u64 {
    data.write_all(&cmd.encode()).unwrap();
    let mut r = [0u8; RESP_SIZE];
    data.read_exact(&mut r).unwrap();
    Resp::decode(&r).unwrap().data
}

#[test]
fn interrupt_when_frontend_made_eventfd_blocking_and_full_then_backend_serves_on_and_exits_at_eof()
{
    let mut p = Peer::start();
    let line = eventfd();
    let set = SetIrq { index: 0, flags: 0 };
    assert_eq!(
        p.call(Request::SetIrq, &set.encode(), &[line.as_raw_fd()]),
        None
    );
    // The backend made it non-blocking; the file description is shared.
    set_blocking(&line);
    let full = (u64::MAX - 1).to_ne_bytes();
    // SAFETY: `full` is a live 8-byte buffer; the fd is open.
    let n = unsafe { libc::write(line.as_raw_fd(), full.as_ptr().cast(), 8) };
    assert_eq!(n, 8);
    let mut data = p.place_regs();
    round_trip(
        &mut data,
        Cmd::write(1, REG_IRQ_RAISE, AccessSize::B8, 1, false),
    );
    let id = round_trip(&mut data, Cmd::read(1, REG_ID, AccessSize::B8));
    assert_eq!(id, outboard_backends::scratch::ID, "still serving");
    drop(data);
    let (code, err) = p.close_and_wait();
    assert_eq!(code, Some(i32::from(EXIT_OK)), "stderr: {err}");
}

#[test]
fn backend_when_loop_stuck_and_frontend_closes_control_then_exits_with_status_2() {
    let mut p = Peer::start();
    let data = p.place_regs();
    // Queue reads and never read a response: the backend's blocking write of
    // responses fills our receive buffer and its loop stops there.
    data.set_nonblocking(true).unwrap();
    let cmds: Vec<u8> = (0..1024)
        .flat_map(|_| Cmd::read(1, REG_ID, AccessSize::B8).encode())
        .collect();
    assert_eq!(cmds.len(), 1024 * CMD_SIZE);
    loop {
        match (&data).write(&cmds) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        let mut pfd = libc::pollfd {
            fd: data.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one live pollfd, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, 500) };
        if n == 0 {
            break; // the backend has stopped reading commands: it is stuck
        }
    }
    let (code, err) = p.close_and_wait();
    assert_eq!(code, Some(i32::from(EXIT_PROTOCOL)), "stderr: {err}");
    assert!(
        err.contains("the frontend closed the control connection"),
        "stderr: {err}"
    );
    drop(data);
}

#[test]
fn set_region_when_fd_is_own_control_end_listening_unconnected_or_tcp_then_bad_fd_and_backend_serves_on(
) {
    let mut p = Peer::start();
    let set = SetRegion {
        index: 0,
        flags: 0,
        guest_addr: 0x1000,
        user_data: 1,
    };
    let control_end = p.ch.as_ref().unwrap().as_raw_fd();
    let dir = outboard_tests::socket_path("hostile-listen");
    let listening = std::os::unix::net::UnixListener::bind(&dir).unwrap();
    // SAFETY: socket() takes plain integers; the result is checked.
    let unconnected = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    assert!(unconnected >= 0);
    // SAFETY: socket() just returned this fd; nothing else owns it.
    let unconnected = unsafe { OwnedFd::from_raw_fd(unconnected) };
    let tcp_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpStream::connect(tcp_listener.local_addr().unwrap()).unwrap();
    let cases = [
        ("the frontend's end of the control socket", control_end),
        ("a listening socket", listening.as_raw_fd()),
        ("an unconnected socket", unconnected.as_raw_fd()),
        ("a connected TCP socket", tcp.as_raw_fd()),
    ];
    for (what, fd) in cases {
        assert_eq!(
            p.call(Request::SetRegion, &set.encode(), &[fd]),
            Some(Status::BadFd),
            "{what}"
        );
    }
    let mut data = p.place_regs();
    let aux = SetRegion {
        index: 1,
        user_data: 100,
        ..set
    };
    assert_eq!(
        p.call(Request::SetRegion, &aux.encode(), &[data.as_raw_fd()]),
        Some(Status::BadFd),
        "the frontend's end of region 0's data socket"
    );
    let id = round_trip(&mut data, Cmd::read(1, REG_ID, AccessSize::B8));
    assert_eq!(id, outboard_backends::scratch::ID, "still serving");
    drop(data);
    let (code, err) = p.close_and_wait();
    assert_eq!(code, Some(i32::from(EXIT_OK)), "stderr: {err}");
    let _ = std::fs::remove_file(dir);
}
