//! The sockets vhost-user sessions need.
//!
//! [`Frontends`] binds the frontends' path and keeps listening on it for as
//! long as the backend serves: each accepted connection is one session.
//! [`Links`] gives each session the internal connection the relay uses to
//! reach vhost-user-backend. The crate serves only a connection it accepts
//! itself (`VhostUserDaemon::start` takes a `Listener`; its request handler
//! is private) or one it connects to by path, so a link is a listening
//! socket with the relay's end already connected and waiting in its
//! backlog: the crate only has to `accept`, which opens no file and creates
//! no socket. The listening socket is bound in a fresh private (0700)
//! directory, and the name and directory are removed again as soon as the
//! relay's end is connected, so no other user can reach it and nothing is
//! left on disk.
//!
//! An unconfined backend makes a link per session. A confined one can no
//! longer create or connect sockets, so it makes [`CONFINED_SESSIONS`]
//! links before confinement, all queued on one listening socket (the
//! kernel hands queued connections to `accept` in the order they were
//! made, which is the order the relay's ends are used in), and stops
//! serving once they are used up.

use std::collections::VecDeque;
use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;
use vhost::vhost_user::Listener;

/// Sessions a confined backend can serve: the internal connections it
/// makes before confinement (one fd each while unused).
pub const CONFINED_SESSIONS: usize = 256;

/// Errors setting up the sessions' sockets.
#[derive(Debug, Error)]
pub enum Error {
    /// the path exists and is not a socket
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// cannot listen on the path
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] io::Error),
    /// cannot accept a frontend
    #[error("cannot accept a vhost-user frontend")]
    Accept(#[source] io::Error),
    /// cannot make the private directory
    #[error("cannot make a private directory for the internal socket")]
    TempDir(#[source] io::Error),
    /// cannot make the internal connection
    #[error("cannot connect the relay to vhost-user-backend")]
    Internal(#[source] io::Error),
}

/// The frontends' listening socket.
#[derive(Debug)]
pub(super) struct Frontends {
    listener: UnixListener,
    path: PathBuf,
}

impl Frontends {
    /// Listens on `path`, replacing a stale socket there.
    pub fn bind(path: &Path) -> Result<Self, Error> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                let _ = std::fs::remove_file(path);
            }
            Ok(_) => return Err(Error::NotASocket(path.to_path_buf())),
            Err(_) => {}
        }
        let listener =
            UnixListener::bind(path).map_err(|e| Error::Listen(path.to_path_buf(), e))?;
        Ok(Frontends {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The next frontend.
    pub fn accept(&self) -> Result<UnixStream, Error> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => return Ok(stream),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Accept(e)),
            }
        }
    }
}

impl Drop for Frontends {
    /// Removes the path (a confined process cannot: the socket file then
    /// outlives it, and the next backend on the path replaces it).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where sessions get their internal connection.
pub(super) struct Links {
    /// The crate's listening socket (the current link's, or the pool's).
    listener: Option<Listener>,
    /// The relay's ends queued on `listener`, for a confined backend.
    pool: Option<VecDeque<UnixStream>>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("pool", &self.pool.as_ref().map(VecDeque::len))
            .finish_non_exhaustive()
    }
}

impl Links {
    /// A link made for each session (the process can make sockets).
    pub fn per_session() -> Self {
        Links {
            listener: None,
            pool: None,
        }
    }

    /// `count` links made now, before confinement (fewer when the
    /// kernel's listen backlog, `net.core.somaxconn`, is smaller: a
    /// connection past it would wait).
    pub fn pool(count: usize) -> Result<Self, Error> {
        let count = count.min(somaxconn());
        let dir = PrivateDir::new()?;
        let path = dir.0.join("s");
        let listener = UnixListener::bind(&path).map_err(Error::Internal)?;
        let listener = listen(listener, count)?;
        let relays = (0..count)
            .map(|_| UnixStream::connect(&path).map_err(Error::Internal))
            .collect::<Result<VecDeque<_>, _>>()?;
        // The connections wait in the backlog; the name is no longer needed.
        let _ = std::fs::remove_file(&path);
        drop(dir);
        Ok(Links {
            listener: Some(Listener::from(listener)),
            pool: Some(relays),
        })
    }

    /// The next session's link: the crate's listener, with the relay's end
    /// waiting in its backlog. None once a pool is used up.
    pub fn next(&mut self) -> Result<Option<(&mut Listener, UnixStream)>, Error> {
        let relay = match &mut self.pool {
            Some(pool) => match pool.pop_front() {
                Some(relay) => relay,
                None => return Ok(None),
            },
            None => {
                let (listener, relay) = link()?;
                self.listener = Some(listener);
                relay
            }
        };
        Ok(self.listener.as_mut().map(|l| (l, relay)))
    }
}

/// One internal connection: a nameless listener and the relay's end.
fn link() -> Result<(Listener, UnixStream), Error> {
    let dir = PrivateDir::new()?;
    let path = dir.0.join("s");
    let listener = UnixListener::bind(&path).map_err(Error::Internal)?;
    let relay = UnixStream::connect(&path).map_err(Error::Internal)?;
    let _ = std::fs::remove_file(&path);
    drop(dir);
    Ok((Listener::from(listener), relay))
}

/// The kernel's cap on listen backlogs (128 when it cannot be read).
fn somaxconn() -> usize {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(128)
}

/// `listener` with a backlog of at least `count` (std listens with 128).
fn listen(listener: UnixListener, count: usize) -> Result<UnixListener, Error> {
    use std::os::fd::AsRawFd;
    let backlog = libc::c_int::try_from(count).unwrap_or(libc::c_int::MAX);
    // SAFETY: listen() on a socket fd we own; no memory is passed.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } < 0 {
        return Err(Error::Internal(io::Error::last_os_error()));
    }
    Ok(listener)
}

/// A directory only this user can enter, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> Result<Self, Error> {
        let mut template = std::env::temp_dir().into_os_string();
        template.push("/outboard-vu-XXXXXX");
        let template = CString::new(template.as_bytes())
            .map_err(|e| Error::TempDir(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let mut bytes = template.into_bytes_with_nul();
        // SAFETY: `bytes` is a NUL-terminated template ending in XXXXXX,
        // which mkdtemp rewrites in place without changing its length.
        let p = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(Error::TempDir(io::Error::last_os_error()));
        }
        bytes.pop();
        Ok(PrivateDir(PathBuf::from(OsString::from_vec(bytes))))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
