//! Where backend programs come from: [`Source`] names a backend, [`Launcher`]
//! finds its program (beside the frontend binary, in `PATH`, or as a
//! built-in of a multi-call program).

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use log::debug;

use crate::backend::Error;

/// Where a backend comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Spawn this program (a path, or a name looked up by [`Launcher`]) with these arguments.
    Spawn {
        /// Program path or name.
        program: String,
        /// Arguments after the ones the frontend adds.
        args: Vec<String>,
    },
    /// Connect to a backend listening on this Unix socket path.
    Connect {
        /// Socket path.
        socket: PathBuf,
    },
    /// Connect to a standard vhost-user backend; the frontend implements the
    /// virtio-mmio transport for it.
    VhostUser {
        /// The backend's socket path.
        socket: PathBuf,
        /// Virtio device type: `blk`, `rng`, `console` or a numeric ID.
        device: String,
    },
}

/// A backend command ready to spawn, with the descriptors it inherits
/// beyond the protocol's own (a host stream's socket, say). They keep their
/// numbers in the child; the command's arguments name them.
#[derive(Debug)]
pub struct Prepared {
    /// The command.
    pub command: Command,
    /// Descriptors the child inherits (closed in the frontend once spawned).
    pub inherit: Vec<OwnedFd>,
}

impl From<Command> for Prepared {
    fn from(command: Command) -> Self {
        Prepared {
            command,
            inherit: Vec::new(),
        }
    }
}

/// Finds backend programs.
#[derive(Debug, Clone, Default)]
pub struct Launcher {
    /// Directories searched first, in order, for a program given by name.
    pub search_dirs: Vec<PathBuf>,
    /// A program that can run built-in backends as `EXE PREFIX... NAME ARGS...`,
    /// used when a named backend is not found but is in `names`.
    pub builtin: Option<Builtin>,
    /// Where spawned backends' stdout goes (inherited when `None`).
    pub quiet_stdout: bool,
}

/// A multi-call program that can run backends by name.
#[derive(Debug, Clone)]
pub struct Builtin {
    /// The program.
    pub exe: PathBuf,
    /// Arguments before the backend name.
    pub prefix: Vec<OsString>,
    /// Backend names it can run.
    pub names: Vec<String>,
}

impl Launcher {
    /// Searches beside the running executable (and its parent directory, where
    /// test executables live below the binaries).
    pub fn beside_current_exe() -> Self {
        let mut search_dirs = Vec::new();
        if let Ok(exe) = std::env::current_exe() {
            if let Some(dir) = exe.parent() {
                search_dirs.push(dir.to_path_buf());
                if let Some(up) = dir.parent() {
                    search_dirs.push(up.to_path_buf());
                }
            }
        }
        Launcher {
            search_dirs,
            builtin: None,
            quiet_stdout: false,
        }
    }

    /// The command that starts `program` with `args`.
    pub fn command(&self, program: &str, args: &[String]) -> Result<Command, Error> {
        if program.contains('/') {
            let mut c = Command::new(program);
            c.args(args);
            return Ok(c);
        }
        let path_dirs = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        let found = self
            .search_dirs
            .iter()
            .chain(path_dirs.iter())
            .map(|d| d.join(program))
            .find(|p| is_executable(p));
        if let Some(path) = found {
            let mut c = Command::new(path);
            c.args(args);
            return Ok(c);
        }
        match &self.builtin {
            Some(b) if b.names.iter().any(|n| n == program) => {
                debug!("{program} not installed; running the built-in copy");
                let mut c = Command::new(&b.exe);
                c.args(&b.prefix).arg(program).args(args);
                Ok(c)
            }
            _ => Err(Error::NotFound(program.to_owned())),
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A command for the launcher thread and where its result goes.
type Launch = (
    Command,
    std::sync::mpsc::Sender<std::io::Result<std::process::Child>>,
);

/// Spawns `cmd` from one thread that lives as long as the process.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits,
/// not the process: a backend spawned from a short-lived thread (a test
/// thread, a thread doing a live upgrade) would be killed when that thread
/// ends. Forking from a thread that never exits ties every backend to
/// the frontend process itself.
pub(crate) fn spawn_from_launcher_thread(cmd: Command) -> std::io::Result<std::process::Child> {
    static LAUNCHER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Launch>>> =
        std::sync::OnceLock::new();
    let launcher = LAUNCHER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Launch>();
        let started = std::thread::Builder::new()
            .name("outboard-launcher".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = started {
            log::warn!("no launcher thread ({e}); backends are spawned from the calling thread");
        }
        std::sync::Mutex::new(tx)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let sent = launcher
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((cmd, tx));
    match sent {
        Ok(()) => rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the launcher thread is gone"))),
        // No launcher thread: the command comes back with the error.
        Err(std::sync::mpsc::SendError((mut cmd, _))) => cmd.spawn(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_when_not_found_then_builtin_or_error() {
        let mut l = Launcher {
            search_dirs: vec![PathBuf::from("/nonexistent")],
            builtin: None,
            quiet_stdout: false,
        };
        assert!(matches!(
            l.command("outboard-no-such-backend", &[]),
            Err(Error::NotFound(_))
        ));
        l.builtin = Some(Builtin {
            exe: PathBuf::from("/bin/multi"),
            prefix: vec!["backend".into()],
            names: vec!["outboard-no-such-backend".into()],
        });
        let c = l
            .command("outboard-no-such-backend", &["--x".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.get_program(), "/bin/multi");
        let args: Vec<_> = c.get_args().collect();
        assert_eq!(args, ["backend", "outboard-no-such-backend", "--x"]);
    }

    #[test]
    fn command_when_path_given_then_used_as_is() {
        let l = Launcher::default();
        let c = l
            .command("/usr/bin/env", &["a".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.get_program(), "/usr/bin/env");
    }
}
