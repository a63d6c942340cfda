//! Host streams, the frontend's side (docs/protocol.md, section 11): the
//! frontend owns a device's terminal, so that a console session outlives
//! the backend serving it.
//!
//! [`HostStream::listen`] listens on a Unix socket path; one client at a
//! time (a new one replaces the old) reads the device's output and writes
//! its input. Each backend instance gets a fresh `SOCK_SEQPACKET` socket
//! ([`HostStream::new_end`], passed as `--host-stream-fd N`), and a relay
//! thread moves bytes between the client and the backend:
//!
//! * Output arrives numbered by chain and offset; the relay passes each
//!   byte on once, dropping what a replaced backend sends again.
//! * Input is kept until the backend acknowledges it as delivered to the
//!   guest; when an instance's socket ends, everything not acknowledged is
//!   sent again to the next instance, which drops what it already has.
//!
//! Ends are used in the order they were made: a newer instance's output
//! waits until the older instance's socket has been read to its end, so
//! output keeps its order across a live upgrade (the old instance runs
//! until the new one has taken over).
//!
//! Bounds: at most [`INPUT_WINDOW`] bytes of input are unacknowledged (the
//! client is not read beyond that); output waits in at most
//! [`OUTPUT_BACKLOG`] bytes (beyond that the relay stops reading the
//! backend, which then stops completing transmit buffers; with no client
//! connected, output beyond the backlog is dropped and counted instead).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{info, warn};
use outboard_protocol::host_stream;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Input bytes the client may have sent that no backend has acknowledged.
pub const INPUT_WINDOW: usize = 64 << 10;
/// Output bytes waiting for the client.
pub const OUTPUT_BACKLOG: usize = 64 << 10;

mod relay;
use relay::Relay;

/// Why a host stream cannot be set up.
#[derive(Debug, Error)]
pub enum Error {
    /// cannot listen on {0}
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] io::Error),
    /// {0} exists and is not a socket
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// cannot make a host stream socket
    #[error("cannot make a host stream socket")]
    Socket(#[source] io::Error),
    /// cannot start the relay thread
    #[error("cannot start the relay thread")]
    Thread(#[source] io::Error),
}

/// Byte counts of one host stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Output bytes passed to a client.
    pub output: u64,
    /// Output bytes dropped as sent again by a replaced backend.
    pub repeated: u64,
    /// Output bytes dropped because no client was connected.
    pub dropped: u64,
    /// Input bytes the device acknowledged as delivered.
    pub input: u64,
    /// Backend sockets read to their end.
    pub ends: u64,
}

#[derive(Default)]
struct Counters {
    output: AtomicU64,
    repeated: AtomicU64,
    dropped: AtomicU64,
    input: AtomicU64,
    ends: AtomicU64,
}

enum Command {
    End(OwnedFd),
    Stop,
}

struct Shared {
    wake: EventFd,
    commands: Mutex<Vec<Command>>,
    counters: Counters,
}

/// A device's host stream: the listening socket and the relay thread.
pub struct HostStream {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl std::fmt::Debug for HostStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStream")
            .field("path", &self.path)
            .field("stats", &self.stats())
            .finish()
    }
}

impl HostStream {
    /// Listens on `path` (replacing a stale socket there) and starts the
    /// relay; `name` names the thread and the log lines.
    pub fn listen(path: &Path, name: &str) -> Result<Self, Error> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                let _ = std::fs::remove_file(path);
            }
            Ok(_) => return Err(Error::NotASocket(path.to_path_buf())),
            Err(_) => {}
        }
        let listener =
            UnixListener::bind(path).map_err(|e| Error::Listen(path.to_path_buf(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Listen(path.to_path_buf(), e))?;
        let shared = Arc::new(Shared {
            wake: EventFd::new(EFD_NONBLOCK).map_err(Error::Socket)?,
            commands: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        let mut relay = Relay::new(listener, Arc::clone(&shared), name.to_owned());
        let thread = std::thread::Builder::new()
            .name(format!("outboard-host-{name}"))
            .spawn(move || relay.run())
            .map_err(Error::Thread)?;
        info!("{name}: host stream on {}", path.display());
        Ok(HostStream {
            shared,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }

    /// Where clients connect.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new socket for the next backend instance: the relay keeps one end
    /// (used once every older end is read to its end), the caller passes
    /// the returned one to the backend.
    pub fn new_end(&self) -> Result<OwnedFd, Error> {
        let (ours, theirs) = host_stream::pair().map_err(Error::Socket)?;
        self.command(Command::End(ours));
        Ok(theirs)
    }

    /// Byte counts so far.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            output: c.output.load(Ordering::Relaxed),
            repeated: c.repeated.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            input: c.input.load(Ordering::Relaxed),
            ends: c.ends.load(Ordering::Relaxed),
        }
    }

    fn command(&self, c: Command) {
        self.shared
            .commands
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(c);
        if let Err(e) = self.shared.wake.write(1) {
            warn!("host stream: cannot wake the relay: {e}");
        }
    }
}

impl Drop for HostStream {
    fn drop(&mut self) {
        self.command(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboard_protocol::host_stream::{Message, MAX_MESSAGE};
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ob-hs-{tag}-{}.sock", std::process::id()))
    }

    fn send(fd: &OwnedFd, m: Message<'_>) {
        let mut v = Vec::new();
        m.encode(&mut v);
        // SAFETY: (test) send from a live buffer.
        let r = unsafe { libc::send(fd.as_raw_fd(), v.as_ptr().cast(), v.len(), 0) };
        assert_eq!(r as usize, v.len());
    }

    fn recv(fd: &OwnedFd) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        // SAFETY: (test) recv into a live buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(n >= 0);
        buf.truncate(n as usize);
        buf
    }

    fn read_exactly(c: &mut UnixStream, n: usize) -> Vec<u8> {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut v = vec![0u8; n];
        c.read_exact(&mut v).unwrap();
        v
    }

    fn out(seq: u64, offset: u64, last: bool, fresh: bool, data: &[u8]) -> Message<'_> {
        Message::Out {
            seq,
            offset,
            last,
            fresh,
            data,
        }
    }

    #[test]
    fn relay_when_backend_repeats_output_then_client_gets_each_byte_once() {
        let path = temp_path("out");
        let hs = HostStream::listen(&path, "t-out").unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let first = hs.new_end().unwrap();
        send(&first, out(0, 0, true, true, b"ab"));
        send(&first, out(1, 0, false, false, b"cd"));
        drop(first);
        // The next instance serves chain 1 again, then chain 2.
        let second = hs.new_end().unwrap();
        send(&second, out(1, 0, false, false, b"cd"));
        send(&second, out(1, 2, true, false, b"e"));
        send(&second, out(2, 0, true, false, b"f"));
        assert_eq!(read_exactly(&mut client, 6), b"abcdef");
        let deadline = Instant::now() + Duration::from_secs(10);
        while hs.stats().repeated != 2 {
            assert!(Instant::now() < deadline, "{:?}", hs.stats());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn relay_when_backend_dies_with_input_unread_then_its_output_still_arrives() {
        let path = temp_path("reset");
        let hs = HostStream::listen(&path, "t-reset").unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let end = hs.new_end().unwrap();
        send(&end, out(0, 0, true, true, b"before"));
        client.write_all(b"typed").unwrap();
        // The input reaches the backend's socket, unread...
        let deadline = Instant::now() + Duration::from_secs(10);
        while !readable(&end) {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        send(&end, out(1, 0, true, false, b" death"));
        // ...and the backend dies: the relay's socket is reset first.
        drop(end);
        assert_eq!(read_exactly(&mut client, 12), b"before death");
    }

    fn readable(fd: &OwnedFd) -> bool {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: (test) one live pollfd.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn relay_when_backend_lies_then_logged_and_later_output_still_passed_on() {
        let path = temp_path("lies");
        let hs = HostStream::listen(&path, "t-lies").unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let end = hs.new_end().unwrap();
        // Garbage, an oversized datagram, input sent the wrong way and an
        // acknowledgement of bytes never sent.
        for junk in [vec![0u8; 3], vec![9u8; 24], vec![0u8; MAX_MESSAGE + 100]] {
            // SAFETY: (test) send from a live buffer.
            let r = unsafe { libc::send(end.as_raw_fd(), junk.as_ptr().cast(), junk.len(), 0) };
            assert_eq!(r as usize, junk.len());
        }
        send(
            &end,
            Message::In {
                offset: 0,
                data: b"x",
            },
        );
        send(&end, Message::Ack { delivered: 1 << 40 });
        send(&end, out(0, 0, true, true, b"still here"));
        assert_eq!(read_exactly(&mut client, 10), b"still here");
        // Input typed afterwards is still relayed, numbered after the lie.
        client.write_all(b"ok").unwrap();
        let got = recv(&end);
        let Ok(Message::In { data, .. }) = Message::decode(&got) else {
            panic!("no input");
        };
        assert_eq!(data, b"ok");
    }

    #[test]
    fn relay_when_end_closes_then_unacknowledged_input_goes_to_the_next() {
        let path = temp_path("in");
        let hs = HostStream::listen(&path, "t-in").unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let first = hs.new_end().unwrap();
        client.write_all(b"hello").unwrap();
        assert_eq!(
            Message::decode(&recv(&first)).unwrap(),
            Message::In {
                offset: 0,
                data: b"hello"
            }
        );
        send(&first, Message::Ack { delivered: 2 });
        drop(first);
        let second = hs.new_end().unwrap();
        assert_eq!(
            Message::decode(&recv(&second)).unwrap(),
            Message::In {
                offset: 2,
                data: b"llo"
            }
        );
        assert_eq!(hs.stats().input, 2);
        drop(hs);
        assert!(!path.exists(), "the socket goes with the stream");
    }
}
