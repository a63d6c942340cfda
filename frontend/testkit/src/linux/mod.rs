//! A real Linux guest under QEMU, driving vhost-user devices with Linux's own
//! virtio drivers.
//!
//! The guest is an unmodified Debian kernel (`linux-image-amd64`'s
//! dependency) and a tiny initramfs: busybox (`busybox-static`), the virtio
//! modules it needs (from the kernel package, with their dependencies),
//! `/bin/obio` (built from `linux-guest/obio.c` with `gcc -static`: O_DIRECT
//! requests with a chosen segment count, a deterministic data pattern,
//! BLKZEROOUT, Linux AIO) and `/init` (`linux-guest/init`, a busybox shell
//! script that runs the checks or the benchmark the kernel command line asks
//! for and prints one `OUTBOARD-...` line per result on the serial console).
//!
//! * [`packages`]: Debian packages fetched with `apt-get download` and
//!   unpacked with `dpkg-deb -x` into a cache (nothing is installed);
//! * [`initramfs`]: the initramfs, built once per set of inputs and cached;
//! * [`qemu`]: finding `qemu-system-x86_64` and running a guest with a list
//!   of vhost-user devices under a deadline;
//! * [`report`]: the guest's result lines and the host-side image checks.
//!
//! The cache lives in `$OUTBOARD_LINUX_GUEST_CACHE`, else
//! `$HOME/.cache/outboard/linux-guest`; a second run neither downloads nor
//! rebuilds anything. When a tool or package is missing the functions return
//! [`Error::Unavailable`], which a test turns into "skipped".

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

pub mod initramfs;
pub mod packages;
pub mod qemu;
pub mod report;

pub use initramfs::{prepare, Guest};
pub use qemu::{Machine, Qemu, VhostDevice};
pub use report::{Check, Expect, Run};

/// The guest's `/init` script.
pub const INIT_SCRIPT: &str = include_str!("../../linux-guest/init");
/// The source of the guest's `/bin/obio` helper.
pub const OBIO_SOURCE: &str = include_str!("../../linux-guest/obio.c");

/// Errors preparing or running the Linux guest.
#[derive(Debug, Error)]
pub enum Error {
    /// A tool or package is not available here: callers skip rather than fail.
    #[error("{0}")]
    Unavailable(String),
    /// A file system operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A command could not be started.
    #[error("cannot run {command}")]
    Spawn {
        /// The command.
        command: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command} failed ({status}): {output}")]
    Command {
        /// The command.
        command: String,
        /// How it ended.
        status: String,
        /// The end of what it printed.
        output: String,
    },
    /// A command printed something this module does not understand.
    #[error("unexpected output from {command}: {output}")]
    Unexpected {
        /// The command.
        command: String,
        /// What it printed.
        output: String,
    },
    /// Waiting for something took longer than its deadline.
    #[error("{what} did not happen within {after:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline.
        after: Duration,
    },
}

impl Error {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
        move |source| Error::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The cache directory: `$OUTBOARD_LINUX_GUEST_CACHE`, else
/// `$HOME/.cache/outboard/linux-guest`.
pub fn cache_dir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os("OUTBOARD_LINUX_GUEST_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| {
        Error::Unavailable("neither OUTBOARD_LINUX_GUEST_CACHE nor HOME is set".into())
    })?;
    Ok(Path::new(&home).join(".cache/outboard/linux-guest"))
}

/// The guest's data pattern: the 8-byte little-endian word at byte offset
/// `off` (a multiple of 8) for `seed`, as `obio` computes it.
pub fn pattern_word(seed: u64, off: u64) -> u64 {
    let mut z = seed.wrapping_add((off >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern of `seed` as found at byte offset `off`
/// (both multiples of 8; a shorter tail is filled with the word's first bytes).
pub fn pattern_fill(seed: u64, off: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let w = pattern_word(seed, off + 8 * i as u64).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// A 64-bit FNV-1a hash, stable across Rust versions (cache keys).
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Runs `cmd` to completion; its stdout on success, [`Error::Command`] otherwise.
pub(crate) fn output(cmd: &mut std::process::Command) -> Result<String, Error> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::Unavailable(format!("{command}: command not found"))
        } else {
            Error::Spawn {
                command: command.clone(),
                source,
            }
        }
    })?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        let tail: String = text
            .chars()
            .rev()
            .take(600)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(Error::Command {
            command,
            status: out.status.to_string(),
            output: tail.trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_when_computed_then_matches_obio_first_words() {
        // `obio pattern 1 0 16 | xxd` on the host: e505 0b10 1d16 9256 c15c 0289 ec2d 0a91
        let mut buf = [0u8; 16];
        pattern_fill(1, 0, &mut buf);
        assert_eq!(
            buf,
            [
                0xe5, 0x05, 0x0b, 0x10, 0x1d, 0x16, 0x92, 0x56, 0xc1, 0x5c, 0x02, 0x89, 0xec, 0x2d,
                0x0a, 0x91
            ]
        );
    }

    #[test]
    fn pattern_when_filled_at_an_offset_then_equals_the_same_range_of_a_longer_fill() {
        let mut long = vec![0u8; 4096];
        pattern_fill(9, 0, &mut long);
        let mut part = vec![0u8; 1024];
        pattern_fill(9, 1024, &mut part);
        assert_eq!(&long[1024..2048], &part[..]);
    }

    #[test]
    fn fnv1a_when_parts_move_then_the_hash_changes() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }
}
