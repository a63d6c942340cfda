//! The sockets a vhost-user session needs, all made before confinement.
//!
//! [`accept_first`] binds the frontend's path and takes the first frontend
//! that connects. [`Link::new`] makes the internal connection the relay
//! uses to reach vhost-user-backend. The crate serves only a connection it
//! accepts itself (`VhostUserDaemon::start` takes a `Listener`; its request
//! handler is private) or one it connects to by path, so the link is a
//! listening socket with the relay's end already connected and waiting in
//! its backlog: after confinement the crate only has to `accept`, which
//! opens no file and creates no socket. The listening socket is bound in a
//! fresh private (0700) directory, and the name and directory are removed
//! again as soon as the relay's end is connected, so no other user can
//! reach it and nothing is left on disk.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;
use vhost::vhost_user::Listener;

/// Errors setting up the session's sockets.
#[derive(Debug, Error)]
pub enum Error {
    /// the path exists and is not a socket
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// cannot listen on the path
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] io::Error),
    /// cannot accept the frontend
    #[error("cannot accept the vhost-user frontend")]
    Accept(#[source] io::Error),
    /// cannot make the private directory
    #[error("cannot make a private directory for the internal socket")]
    TempDir(#[source] io::Error),
    /// cannot make the internal connection
    #[error("cannot connect the relay to vhost-user-backend")]
    Internal(#[source] io::Error),
}

/// Listens on `path` (replacing a stale socket there), accepts the first
/// frontend, then removes `path` and stops listening: later frontends find
/// nothing there.
pub(super) fn accept_first(path: &Path) -> Result<UnixStream, Error> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => return Err(Error::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::Listen(path.to_path_buf(), e))?;
    let accepted = loop {
        match listener.accept() {
            Ok((stream, _)) => break Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(Error::Accept(e)),
        }
    };
    let _ = std::fs::remove_file(path);
    accepted
}

/// The internal connection: the crate accepts `listener`, whose backlog
/// holds `relay`'s connection.
pub(super) struct Link {
    /// For `VhostUserDaemon::start` (nameless: dropping it unlinks nothing).
    pub listener: Listener,
    /// The relay's end.
    pub relay: UnixStream,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Makes the internal connection (before confinement).
    pub fn new() -> Result<Self, Error> {
        let dir = PrivateDir::new()?;
        let path = dir.0.join("s");
        let listener = UnixListener::bind(&path).map_err(Error::Internal)?;
        let relay = UnixStream::connect(&path).map_err(Error::Internal)?;
        // The connection waits in the backlog; the name is no longer needed.
        let _ = std::fs::remove_file(&path);
        drop(dir);
        Ok(Link {
            listener: Listener::from(listener),
            relay,
        })
    }
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
