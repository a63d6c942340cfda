//! Outboard wire formats.
//!
//! Outboard runs each emulated device in its own process. A frontend (the
//! VMM side) and a backend (the device process) talk over two kinds of
//! channel, both defined here and nowhere else:
//!
//! * [`ioregionfd`]: one data socket per region. Every guest access is a
//!   32-byte command laid out exactly as the KVM ioregionfd RFC's
//!   `struct ioregionfd_cmd`; reads and non-posted writes are answered with a
//!   32-byte `struct ioregionfd_resp`. A backend that speaks this channel
//!   would work unchanged if the kernel wrote the commands.
//! * [`control`] and [`channel`]: one Unix stream socket per backend that
//!   negotiates the protocol version and features, describes the device and
//!   its regions, and hands over fds (data sockets today; memory, doorbell
//!   and interrupt fds in later protocol features) with SCM_RIGHTS.
//!
//! This crate holds formats and framing only: no policy, no device logic.
//! `docs/protocol.md` in the repository is the normative specification.

#![deny(missing_docs)]

pub mod access;
pub mod channel;
pub mod control;
pub mod host_stream;
pub mod ioregionfd;
pub mod ring;
pub mod state;
pub mod wait;

pub use access::{Access, Space};
pub use ioregionfd::{AccessSize, Cmd, Op, Resp};

/// Formats an error with its chain of causes: `a: b: c`. Every Outboard
/// program prints its errors this way.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
