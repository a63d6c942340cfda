//! Outboard's device backends, one binary each (`outboard-uart`,
//! `outboard-scratch`, `outboard-virtio-blk`, `outboard-virtio-rng`,
//! `outboard-virtio-console`). Each module holds a device model and the `main` of its
//! binary; the binaries are thin wrappers so that the `outboard` CLI can also
//! start a built-in backend when its binary is not installed beside it.

#![deny(missing_docs)]

use std::ffi::OsString;
use std::process::ExitCode;

pub mod host_stream;
pub mod input;
pub mod scratch;
pub mod uart;
pub mod virtio_blk;
pub mod virtio_console;
pub mod virtio_rng;

/// Where a device's output goes, as backends' `--output stdout|PATH` options say.
pub type Output = Box<dyn std::io::Write + Send + Sync>;

/// Opens `--output`: `stdout`, or a file opened for appending (created if missing).
pub fn open_output(spec: &str) -> std::io::Result<Output> {
    if spec == "stdout" {
        return Ok(Box::new(std::io::stdout()));
    }
    Ok(Box::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec)?,
    ))
}

/// `main` of a backend binary: takes its arguments, returns its exit status.
pub type BackendMain = fn(Vec<OsString>) -> ExitCode;

/// Every backend in this crate, by binary name.
pub const BUILTIN: &[(&str, BackendMain)] = &[
    ("outboard-uart", |a| uart::main(a)),
    ("outboard-scratch", |a| scratch::main(a)),
    ("outboard-virtio-blk", |a| virtio_blk::main(a)),
    ("outboard-virtio-rng", |a| virtio_rng::main(a)),
    ("outboard-virtio-console", |a| virtio_console::main(a)),
];

/// The `main` of the built-in backend named `name`, if there is one.
pub fn builtin(name: &str) -> Option<BackendMain> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
}

/// A writer that keeps what it is given, for the devices' unit tests.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct SharedOutput(pub(crate) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for SharedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
