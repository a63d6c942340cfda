//! Host input for a device model: a Unix socket that one client at a time
//! connects to (a new client replaces the old one), or this process's
//! standard input. The device reads only while it has room: it calls
//! [`Input::pause`] when its buffer is full and [`Input::resume`] when the
//! guest has drained it, which stop and restart watching the source
//! through the device's [`EventOps`].

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::{info, warn};
use outboard::EventOps;
use thiserror::Error;

/// Event id of the listening socket.
pub const LISTENER: u32 = 0;
/// Event id of the connected client.
pub const CLIENT: u32 = 1;
/// Event id of standard input.
pub const STDIN: u32 = 2;

/// Why an input source cannot be opened.
#[derive(Debug, Error)]
pub enum Error {
    /// cannot listen for input on {0}
    #[error("cannot listen for input on {0}")]
    Listen(PathBuf, #[source] io::Error),
    /// {0} exists and is not a socket
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// cannot duplicate standard input
    #[error("cannot duplicate standard input")]
    Stdin(#[source] io::Error),
}

/// One input source with its pause state.
#[derive(Debug)]
pub struct Input {
    listener: Option<UnixListener>,
    path: Option<PathBuf>,
    client: Option<UnixStream>,
    stdin: Option<File>,
    paused: bool,
    ops: EventOps,
}

impl Input {
    /// No input at all.
    pub fn none() -> Self {
        Input::from_parts(None, None, None)
    }

    fn from_parts(
        listener: Option<UnixListener>,
        path: Option<PathBuf>,
        stdin: Option<File>,
    ) -> Self {
        Input {
            listener,
            path,
            client: None,
            stdin,
            paused: false,
            ops: EventOps::detached(),
        }
    }

    /// Listens on `path` (replacing a stale socket there); the socket is
    /// removed again when the input is dropped.
    pub fn socket(path: &Path) -> Result<Self, Error> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                let _ = std::fs::remove_file(path);
            }
            Ok(_) => return Err(Error::NotASocket(path.to_path_buf())),
            Err(_) => {}
        }
        let listen = |e| Error::Listen(path.to_path_buf(), e);
        let l = UnixListener::bind(path).map_err(listen)?;
        l.set_nonblocking(true).map_err(listen)?;
        info!("input on {}", path.display());
        Ok(Input::from_parts(Some(l), Some(path.to_path_buf()), None))
    }

    /// This process's standard input (read unbuffered, so that readiness
    /// and data agree).
    pub fn stdin() -> Result<Self, Error> {
        let fd = io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(Error::Stdin)?;
        Ok(Input::from_parts(None, None, Some(File::from(fd))))
    }

    /// Starts watching through `ops`: the listener and a client already
    /// connected (unless paused), or standard input. Called again with the
    /// ops of a new loop (a vhost-user backend's next session), it watches
    /// the same sources there. Standard input that cannot be watched (a
    /// regular file or `/dev/null`, as a spawning frontend passes) is
    /// dropped with a warning, never an error.
    pub fn init(&mut self, ops: &EventOps) -> io::Result<()> {
        self.ops = ops.clone();
        if let Some(l) = &self.listener {
            ops.add(l, LISTENER)?;
        }
        if let (Some(c), false) = (&self.client, self.paused) {
            if let Err(e) = ops.add(c, CLIENT) {
                warn!("input: cannot watch the client: {e}");
            }
        }
        if let Some(f) = &self.stdin {
            if let Err(e) = ops.add(f, STDIN) {
                warn!("standard input cannot be watched ({e}); no input from it");
                self.stdin = None;
            }
        }
        Ok(())
    }

    /// True while reading is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Handles event `id`: accepts a client, or reads at most `buf.len()`
    /// bytes from the client or standard input. An empty `buf` (no room)
    /// pauses reading instead. Returns the number of bytes read; end of
    /// input or an error closes the source.
    pub fn on_event(&mut self, id: u32, buf: &mut [u8]) -> usize {
        match id {
            LISTENER => {
                self.accept();
                0
            }
            _ if self.paused => 0,
            _ if buf.is_empty() => {
                self.pause();
                0
            }
            CLIENT => {
                let got = match self.client.as_mut() {
                    Some(c) => c.read(buf),
                    None => return 0,
                };
                self.settle(got, "client")
            }
            STDIN => {
                let got = match self.stdin.as_mut() {
                    Some(f) => f.read(buf),
                    None => return 0,
                };
                self.settle(got, "standard input")
            }
            _ => 0,
        }
    }

    /// Stops watching the source until [`Input::resume`].
    pub fn pause(&mut self) {
        if !self.paused {
            self.unwatch();
            self.paused = true;
        }
    }

    /// Watches the source again after [`Input::pause`].
    pub fn resume(&mut self) {
        if std::mem::take(&mut self.paused) {
            self.watch();
        }
    }

    fn watch(&self) {
        let r = match (&self.client, &self.stdin) {
            (Some(c), _) => self.ops.add(c, CLIENT),
            (None, Some(f)) => self.ops.add(f, STDIN),
            (None, None) => Ok(()),
        };
        if let Err(e) = r {
            warn!("input: cannot watch the source: {e}");
        }
    }

    fn unwatch(&self) {
        // A source that already left the set (closed) makes this fail; fine.
        if let Some(c) = &self.client {
            let _ = self.ops.remove(c, CLIENT);
        }
        if let Some(f) = &self.stdin {
            let _ = self.ops.remove(f, STDIN);
        }
    }

    fn accept(&mut self) {
        let Some(l) = &self.listener else {
            return;
        };
        match l.accept() {
            Ok((c, _)) => {
                if let Err(e) = c.set_nonblocking(true) {
                    warn!("input: {e}");
                    return;
                }
                info!("input client connected");
                if let Some(old) = self.client.take() {
                    if !self.paused {
                        let _ = self.ops.remove(&old, CLIENT);
                    }
                }
                self.client = Some(c);
                if !self.paused {
                    self.watch();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => warn!("input: {e}"),
        }
    }

    /// The outcome of a read: bytes, or the source closes.
    fn settle(&mut self, got: io::Result<usize>, what: &str) -> usize {
        match got {
            Ok(0) => {
                info!("input: {what} closed");
                self.close();
                0
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                warn!("input: {what}: {e}");
                self.close();
                0
            }
        }
    }

    fn close(&mut self) {
        self.unwatch();
        if self.client.take().is_none() {
            self.stdin = None;
        }
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn temp_socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("outboard-{name}-{}.sock", std::process::id()))
    }

    #[test]
    fn socket_when_client_sends_then_read_and_eof_closes_it() {
        let path = temp_socket("input-eof");
        let mut input = Input::socket(&path).unwrap_or_else(|e| panic!("{e}"));
        input
            .init(&EventOps::detached())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut c = UnixStream::connect(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(input.on_event(LISTENER, &mut []), 0);
        c.write_all(b"abc").unwrap_or_else(|e| panic!("{e}"));
        let mut buf = [0u8; 2];
        assert_eq!(input.on_event(CLIENT, &mut buf), 2);
        assert_eq!(&buf, b"ab");
        drop(c);
        assert_eq!(input.on_event(CLIENT, &mut buf), 1);
        assert_eq!(input.on_event(CLIENT, &mut buf), 0, "end of input");
        assert!(input.client.is_none());
        drop(input);
        assert!(!path.exists(), "socket removed");
    }

    #[test]
    fn on_event_when_no_room_then_paused_until_resumed() {
        let path = temp_socket("input-pause");
        let mut input = Input::socket(&path).unwrap_or_else(|e| panic!("{e}"));
        let mut c = UnixStream::connect(&path).unwrap_or_else(|e| panic!("{e}"));
        input.on_event(LISTENER, &mut []);
        c.write_all(b"xy").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(input.on_event(CLIENT, &mut []), 0);
        assert!(input.is_paused());
        let mut buf = [0u8; 8];
        assert_eq!(
            input.on_event(CLIENT, &mut buf),
            0,
            "a late event while paused"
        );
        input.resume();
        assert_eq!(input.on_event(CLIENT, &mut buf), 2);
    }

    #[test]
    fn socket_when_path_is_a_regular_file_then_refused() {
        let path = temp_socket("input-file");
        std::fs::write(&path, b"").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(Input::socket(&path), Err(Error::NotASocket(_))));
        let _ = std::fs::remove_file(&path);
    }
}
