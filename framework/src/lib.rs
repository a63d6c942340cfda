//! Outboard backend runtime: write a device model, get an out-of-process
//! device that any Outboard frontend can drive.
//!
//! A backend is one process serving one [`Device`]. The frontend (the VMM
//! side) connects to it over a Unix control socket, negotiates the protocol,
//! reads the device's [`Region`]s, places them in guest address space and
//! hands over one ioregionfd data socket per region. From then on every guest
//! access arrives as a 32-byte command (see [`outboard_protocol::ioregionfd`])
//! and the runtime calls [`Device::read`] or [`Device::write`] with an
//! [`Access`]: the region index, the offset inside it, the width and the vCPU.
//!
//! A complete backend:
//!
//! ```no_run
//! use outboard::{Access, Device, DeviceDescription, Region};
//!
//! struct Latch(u64);
//!
//! impl Device for Latch {
//!     fn describe(&self) -> DeviceDescription {
//!         DeviceDescription::new("latch").region(Region::mmio("latch", 8))
//!     }
//!     fn read(&mut self, _: Access) -> u64 { self.0 }
//!     fn write(&mut self, _: Access, v: u64) { self.0 = v }
//!     fn reset(&mut self) { self.0 = 0 }
//! }
//!
//! #[derive(clap::Args)]
//! struct NoOptions {}
//!
//! fn main() -> std::process::ExitCode {
//!     outboard::run("latch", std::env::args_os(), |_: NoOptions| {
//!         Ok::<_, std::io::Error>(Latch(0))
//!     })
//! }
//! ```
//!
//! The runtime ([`runtime::Backend`]) is one epoll loop over the control
//! socket, every data socket, doorbell and resample eventfds and the
//! device's own fds (registered through [`EventOps`]). It drains each
//! readable data socket in batches, serves commands in order, and answers
//! only commands with the resp bit, so posted writes cost the guest no
//! round trip. Guest memory reaches only devices that declare
//! [`DeviceDescription::needs_memory`].

//! Cargo features: `cli` (default) provides `outboard::run` and
//! `outboard::run_virtio` with the shared command line (clap, env_logger);
//! `vhost-user` lets `run_virtio` serve over vhost-user as well (the
//! `vhost_user` module); `in-process` provides the in-process adapter.

#![deny(missing_docs)]

#[cfg(feature = "cli")]
pub mod cli;
pub mod device;
pub mod events;
#[cfg(feature = "in-process")]
pub mod inprocess;
pub mod runtime;
pub mod sandbox;
pub mod state;
#[cfg(feature = "vhost-user")]
pub mod vhost_user;
pub mod virtio;

#[cfg(feature = "cli")]
pub use cli::{run, run_virtio, BackendArgs};
pub use device::{
    Device, DeviceDescription, Doorbell, GuestMemory, Interrupt, InterruptLine, Region,
};
pub use events::EventOps;
pub use outboard_protocol::control::DeviceKind;
pub use outboard_protocol::{Access, AccessSize, Space};
