//! The command line every backend shares, and the `main` that runs one.
//!
//! ```text
//! outboard-foo --control-fd N      # spawned by a frontend, control socket inherited
//! outboard-foo --socket PATH       # listen at PATH, serve the first frontend that connects
//!              [--log-level LEVEL] [device options...]
//! outboard-virtio-foo --vhost-user PATH   # virtio devices (run_virtio) only, with the
//!                                         # vhost-user feature: serve over vhost-user,
//!                                         # one frontend after another
//! ```
//!
//! Exactly one of the transport options must be given. This module needs
//! the `cli` feature (on by default); a program with its own command line
//! builds a [`Backend`] from any connected control socket instead.
//!
//! Exit status: 0 after SHUTDOWN or when the frontend closes the control
//! socket; 1 when the backend cannot start (bad options, bad fd, cannot
//! listen); 2 on a protocol violation. The reason is printed on stderr. A
//! `--vhost-user` backend keeps serving one frontend after another and
//! does not exit when one leaves (a refused message ends that frontend's
//! session only, reported on stderr); see `outboard::vhost_user`.

use std::ffi::OsString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Args, Parser};
use log::info;
use outboard_protocol::error_chain;
use thiserror::Error;

use crate::device::Device;
use crate::runtime::{self, Backend};
use crate::sandbox::{self, Policy};
use crate::virtio::{VirtioDevice, VirtioMmio};

/// Exit status after a clean shutdown.
pub const EXIT_OK: u8 = 0;
/// Exit status when the backend cannot start.
pub const EXIT_SETUP: u8 = 1;
/// Exit status after a protocol violation or I/O failure while serving.
pub const EXIT_PROTOCOL: u8 = 2;

/// Options shared by every backend.
// Exactly one transport option is required: a group the parser adds, so
// that `run_virtio` can add `--vhost-user` to it.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Serve the control socket inherited as this fd (set by a spawning frontend).
    #[arg(long, value_name = "N")]
    pub control_fd: Option<RawFd>,
    /// Listen on this Unix socket path and serve the first frontend that connects.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Log level: off, error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    pub log_level: log::LevelFilter,
    /// Confine the process once set up (namespaces, empty root, no
    /// capabilities, seccomp). The default with --control-fd.
    #[arg(long, overrides_with = "no_sandbox")]
    pub sandbox: bool,
    /// Do not confine the process (for debugging). The default when not
    /// spawned by a frontend.
    #[arg(long, overrides_with = "sandbox")]
    pub no_sandbox: bool,
}

impl BackendArgs {
    /// Whether to confine the process: `--sandbox` or `--no-sandbox` if
    /// given, else yes for a spawned backend (`--control-fd`) and no for
    /// one started by hand.
    pub fn sandboxed(&self) -> bool {
        if self.sandbox || self.no_sandbox {
            return self.sandbox;
        }
        self.control_fd.is_some()
    }
}

/// The option [`run_virtio`] adds (with the `vhost-user` feature).
#[cfg(feature = "vhost-user")]
#[derive(Debug, Clone, Args)]
pub struct VhostUserArgs {
    /// Serve the device over vhost-user on this socket path instead of
    /// ioregionfd, to one frontend after another (a frontend that
    /// disconnects can connect again).
    #[arg(long, value_name = "PATH")]
    pub vhost_user: Option<PathBuf>,
}

/// The transport options of a plain device.
const PLAIN_TRANSPORTS: &[&str] = &["control_fd", "socket"];
/// The transport options of a virtio device.
#[cfg(feature = "vhost-user")]
const VIRTIO_TRANSPORTS: &[&str] = &["control_fd", "socket", "vhost_user"];

#[derive(Debug, Parser)]
struct Cli<A: Args> {
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    device: A,
}

#[cfg(feature = "vhost-user")]
#[derive(Debug, Parser)]
struct VirtioCli<A: Args> {
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    vhost: VhostUserArgs,
    #[command(flatten)]
    device: A,
}

/// Errors that stop a backend from starting.
#[derive(Debug, Error)]
pub enum Error {
    /// fd {0} is not an open stream socket
    #[error("fd {0} is not an open stream socket")]
    BadControlFd(RawFd),
    /// cannot listen on {0}
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] io::Error),
    /// {0} exists and is not a socket
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// cannot accept a frontend connection
    #[error("cannot accept a frontend connection")]
    Accept(#[source] io::Error),
    /// cannot set up the device
    #[error("cannot set up the device")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// cannot start the event loop
    #[error("cannot start the event loop")]
    Runtime(#[source] runtime::Error),
    /// cannot confine the backend
    #[error("cannot confine the backend")]
    Sandbox(#[source] sandbox::Error),
}

/// Obtains the control socket the options name: the inherited fd, or the
/// first connection on a listening socket. Returns the socket path to remove
/// at exit, if any.
pub fn connect(args: &BackendArgs) -> Result<(UnixStream, Option<PathBuf>), Error> {
    if let Some(fd) = args.control_fd {
        return Ok((take_control_fd(fd)?, None));
    }
    let Some(path) = args.socket.clone() else {
        return Err(Error::BadControlFd(-1));
    };
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(&path);
        }
        Ok(_) => return Err(Error::NotASocket(path)),
        Err(_) => {}
    }
    let listener = UnixListener::bind(&path).map_err(|e| Error::Listen(path.clone(), e))?;
    info!("listening on {}", path.display());
    let (sock, _) = listener.accept().map_err(Error::Accept)?;
    info!("frontend connected");
    Ok((sock, Some(path)))
}

fn take_control_fd(fd: RawFd) -> Result<UnixStream, Error> {
    // SAFETY: F_GETFD only queries the descriptor table; an invalid fd yields -1.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::BadControlFd(fd));
    }
    // SAFETY: the fd is open (checked above) and was handed to this process on
    // its command line for exactly this purpose; it is taken once, here, so
    // nothing else in the process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if !runtime::is_stream_socket(&owned) {
        // Hand it back untouched rather than closing a descriptor we do not understand.
        std::mem::forget(owned);
        return Err(Error::BadControlFd(fd));
    }
    // SAFETY: F_SETFD with FD_CLOEXEC on a descriptor we own; no memory is touched.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(UnixStream::from(owned))
}

fn init_logging(program: &str, level: log::LevelFilter) {
    let program = program.to_owned();
    let _ = env_logger::Builder::new()
        .filter_level(level)
        .format(move |buf, record| {
            use std::io::Write;
            writeln!(
                buf,
                "{program}: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .try_init();
}

/// Parses the shared and device options from `args` (the first item is the
/// program name), builds the device with `make`, and serves it until the
/// frontend leaves. Returns the process exit status; see the module docs.
pub fn run<A, D, F, E>(program: &str, args: impl IntoIterator<Item = OsString>, make: F) -> ExitCode
where
    A: Args,
    D: Device,
    F: FnOnce(A) -> Result<D, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cli = match parse_or_exit::<Cli<A>>(program, args, PLAIN_TRANSPORTS) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(program, cli.backend.log_level);
    let device = make(cli.device).map_err(|e| Error::Device(e.into()));
    finish(program, &cli.backend, device)
}

/// Like [`run`] for a virtio device: served through the virtio-mmio
/// transport over ioregionfd, or (with the `vhost-user` feature) over
/// vhost-user with `--vhost-user PATH`. The device logic is the same
/// either way.
#[cfg(feature = "vhost-user")]
pub fn run_virtio<A, V, F, E>(
    program: &str,
    args: impl IntoIterator<Item = OsString>,
    make: F,
) -> ExitCode
where
    A: Args,
    V: VirtioDevice + Send + Sync + 'static,
    F: FnOnce(A) -> Result<V, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cli = match parse_or_exit::<VirtioCli<A>>(program, args, VIRTIO_TRANSPORTS) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(program, cli.backend.log_level);
    let device = make(cli.device).map_err(|e| Error::Device(e.into()));
    match (&cli.vhost.vhost_user, device) {
        (Some(path), Ok(device)) => {
            // After confinement the backend accepts frontends and the
            // vhost-user backend crate its (already waiting) internal
            // connections; GET_INFLIGHT_FD makes a sealed memfd.
            let mut syscalls = device.syscalls().to_vec();
            syscalls.extend([
                libc::SYS_accept4,
                libc::SYS_memfd_create,
                libc::SYS_ftruncate,
            ]);
            let confined = cli
                .backend
                .sandboxed()
                .then_some(move || confine(program, Policy { syscalls }));
            serve_vhost_user(program, device, path, confined)
        }
        (_, device) => finish(program, &cli.backend, device.map(VirtioMmio::new)),
    }
}

/// Serves `device` over vhost-user, one frontend after another (confined
/// by `confine` when given). Returns only when it cannot go on: exit status
/// 1 when it could not start, 2 when a later step failed, 0 when a confined
/// backend has served all the sessions it can.
#[cfg(feature = "vhost-user")]
fn serve_vhost_user<V: VirtioDevice + Send + Sync + 'static>(
    program: &str,
    device: V,
    path: &std::path::Path,
    confine: Option<impl FnOnce() -> Result<(), Error>>,
) -> ExitCode {
    let served = match confine {
        Some(confine) => crate::vhost_user::serve_confined(device, path, confine),
        None => crate::vhost_user::serve(device, path),
    };
    match served {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e @ (crate::vhost_user::Error::Setup(_) | crate::vhost_user::Error::Confine(_))) => {
            eprintln!("{program}: error: {}", error_chain(&e));
            ExitCode::from(EXIT_SETUP)
        }
        Err(e) => {
            eprintln!("{program}: error: {}", error_chain(&e));
            ExitCode::from(EXIT_PROTOCOL)
        }
    }
}

/// Like [`run`] for a virtio device, served through the virtio-mmio
/// transport over ioregionfd (this build has no vhost-user feature).
#[cfg(not(feature = "vhost-user"))]
pub fn run_virtio<A, V, F, E>(
    program: &str,
    args: impl IntoIterator<Item = OsString>,
    make: F,
) -> ExitCode
where
    A: Args,
    V: VirtioDevice,
    F: FnOnce(A) -> Result<V, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    run(program, args, |a| make(a).map(VirtioMmio::new))
}

/// The command line of `program`: `P`'s options with exactly one of
/// `transports` required, and `--version` (which prints `PROGRAM VERSION`,
/// the version of this framework).
fn command<P: Parser>(program: &str, transports: &[&'static str]) -> clap::Command {
    P::command()
        .name(program.to_owned())
        .version(env!("CARGO_PKG_VERSION"))
        .group(
            ArgGroup::new("transport")
                .args(transports.iter().copied())
                .required(true),
        )
}

fn parse<P: Parser>(
    program: &str,
    args: impl IntoIterator<Item = OsString>,
    transports: &[&'static str],
) -> Result<P, clap::Error> {
    command::<P>(program, transports)
        .try_get_matches_from(args)
        .and_then(|m| P::from_arg_matches(&m))
}

fn parse_or_exit<P: Parser>(
    program: &str,
    args: impl IntoIterator<Item = OsString>,
    transports: &[&'static str],
) -> Result<P, ExitCode> {
    parse(program, args, transports).map_err(|e| parse_failed(program, &e))
}

/// Reports a command line `clap` did not accept, as docs/protocol.md
/// section 2.3 says: `--help` and `--version` print to stdout and exit 0;
/// a usage error prints `PROGRAM: error: MESSAGE` and a hint on stderr and
/// exits 1 (a start-up failure, never mistaken for a protocol one).
pub fn parse_failed(program: &str, e: &clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::from(EXIT_OK);
    }
    eprintln!("{program}: error: {}", usage_message(e));
    eprintln!("Try '{program} --help' for more information.");
    ExitCode::from(EXIT_SETUP)
}

/// The message of a usage error on one line: clap's text up to its first
/// blank line (before any tip or usage), without the `error: ` prefix.
fn usage_message(e: &clap::Error) -> String {
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // clap's text is the whole help.
        return "a subcommand is required".to_owned();
    }
    let text = e.render().to_string();
    let words: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let joined = words.join(" ");
    joined.strip_prefix("error: ").unwrap_or(&joined).to_owned()
}

fn finish<D: Device>(program: &str, args: &BackendArgs, device: Result<D, Error>) -> ExitCode {
    match serve(program, args, || device) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(Served::Setup(e)) => {
            eprintln!("{program}: error: {}", error_chain(&e));
            ExitCode::from(EXIT_SETUP)
        }
        Err(Served::Runtime(e)) => {
            eprintln!("{program}: error: {}", error_chain(&e));
            ExitCode::from(EXIT_PROTOCOL)
        }
    }
}

enum Served {
    Setup(Error),
    Runtime(runtime::Error),
}

fn serve<D: Device>(
    program: &str,
    args: &BackendArgs,
    make: impl FnOnce() -> Result<D, Error>,
) -> Result<(), Served> {
    let device = make().map_err(Served::Setup)?;
    let (control, mut path) = connect(args).map_err(Served::Setup)?;
    let sandboxed = args.sandboxed();
    if sandboxed {
        // The confined process can no longer name the path: remove it now
        // (the one frontend it serves is connected already).
        if let Some(p) = path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
    let result = Backend::new(device, control)
        .map_err(|e| Served::Setup(Error::Runtime(e)))
        .and_then(|mut b| {
            if sandboxed {
                confine(program, Policy::with_syscalls(b.device().syscalls()))
                    .map_err(Served::Setup)?;
            }
            b.run().map_err(Served::Runtime)
        });
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// Confines the process (see [`crate::sandbox`]) and logs what applied.
pub fn confine(program: &str, policy: Policy) -> Result<(), Error> {
    let report = sandbox::confine(program, &policy).map_err(Error::Sandbox)?;
    report.log();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    #[derive(Debug, Args)]
    struct Opts {
        /// A device option.
        #[arg(long)]
        output: Option<String>,
    }

    fn plain(args: &[&str]) -> Result<Cli<Opts>, ErrorKind> {
        let args = std::iter::once("dev")
            .chain(args.iter().copied())
            .map(OsString::from);
        parse::<Cli<Opts>>("dev", args, PLAIN_TRANSPORTS).map_err(|e| e.kind())
    }

    #[test]
    fn parse_when_one_transport_then_options_taken() {
        let c = plain(&["--control-fd", "3", "--output", "x", "--log-level", "info"])
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(c.backend.control_fd, Some(3));
        assert_eq!(c.backend.log_level, log::LevelFilter::Info);
        assert_eq!(c.device.output.as_deref(), Some("x"));
        let c = plain(&["--socket", "/tmp/s"]).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(c.backend.socket, Some(PathBuf::from("/tmp/s")));
    }

    #[test]
    fn parse_when_no_or_two_transports_then_usage_error() {
        assert_eq!(plain(&[]).err(), Some(ErrorKind::MissingRequiredArgument));
        assert_eq!(
            plain(&["--control-fd", "3", "--socket", "/tmp/s"]).err(),
            Some(ErrorKind::ArgumentConflict)
        );
    }

    #[test]
    fn usage_message_when_clap_error_then_one_line_without_prefix() {
        let e = command::<Cli<Opts>>("dev", PLAIN_TRANSPORTS)
            .try_get_matches_from(["dev", "--bogus"])
            .err()
            .unwrap_or_else(|| panic!("accepted --bogus"));
        assert_eq!(usage_message(&e), "unexpected argument '--bogus' found");
        let e = command::<Cli<Opts>>("dev", PLAIN_TRANSPORTS)
            .try_get_matches_from(["dev"])
            .err()
            .unwrap_or_else(|| panic!("accepted no transport"));
        let m = usage_message(&e);
        assert!(
            m.starts_with("the following required arguments were not provided: "),
            "{m}"
        );
        assert!(!m.contains('\n') && m.contains("--control-fd"), "{m}");
    }

    #[test]
    fn parse_when_version_then_displayed_with_program_name() {
        let e = plain(&["--version"]).err();
        assert_eq!(e, Some(ErrorKind::DisplayVersion));
        let v = command::<Cli<Opts>>("dev", PLAIN_TRANSPORTS).render_version();
        assert_eq!(v.trim_end(), format!("dev {}", env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn parse_when_plain_device_given_vhost_user_then_unknown_and_not_in_help() {
        assert_eq!(
            plain(&["--vhost-user", "/tmp/v"]).err(),
            Some(ErrorKind::UnknownArgument)
        );
        let help = command::<Cli<Opts>>("dev", PLAIN_TRANSPORTS)
            .render_long_help()
            .to_string();
        assert!(!help.contains("--vhost-user"), "{help}");
        assert!(help.contains("--control-fd") && help.contains("--output"));
    }

    #[cfg(feature = "vhost-user")]
    #[test]
    fn parse_when_virtio_device_then_vhost_user_is_a_third_transport() {
        let virtio = |args: &[&str]| {
            let args = std::iter::once("dev")
                .chain(args.iter().copied())
                .map(OsString::from);
            parse::<VirtioCli<Opts>>("dev", args, VIRTIO_TRANSPORTS).map_err(|e| e.kind())
        };
        let c = virtio(&["--vhost-user", "/tmp/v"]).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(c.vhost.vhost_user, Some(PathBuf::from("/tmp/v")));
        assert_eq!(
            virtio(&["--vhost-user", "/tmp/v", "--socket", "/tmp/s"]).err(),
            Some(ErrorKind::ArgumentConflict)
        );
        assert_eq!(virtio(&[]).err(), Some(ErrorKind::MissingRequiredArgument));
    }
}
