//! Outboard frontend: the VMM side of out-of-process devices.
//!
//! A [`Frontend`] starts one backend process per device (or connects to one
//! that is already listening), negotiates with it over a Unix control socket,
//! places each of its regions in guest address space and hands the backend
//! one ioregionfd data socket per region. Guest accesses then go through a
//! [`Bus`] (one per address space, MMIO and PIO), which finds the region in
//! O(log n) and forwards the access as a 32-byte command.
//!
//! ```text
//!  vCPU / test guest ──► Bus (MMIO | PIO) ──► RemoteRegion ══ data socket ══► backend process
//!                                                             (ioregionfd)     epoll loop ─► Device
//!  Frontend::attach ───────────── control socket (negotiate, SET_REGION + fd) ──┘
//! ```
//!
//! Failure semantics: a backend that dies, hangs past the timeout or answers
//! garbage makes its access complete anyway (reads are all-ones, as a PCI
//! master abort), the device is marked failed once with one logged error,
//! and later accesses to it fail fast. Other devices are unaffected.

#![deny(missing_docs)]

pub mod backend;
pub mod bus;
pub mod config;
pub mod guest;
pub mod irq;
pub mod kvm;
pub mod machine;
pub mod memory;
pub mod remote;
pub mod script;
pub mod vhost_user;

pub use bus::{AccessError, Bus, BusDevice, Space};
pub use machine::{Attached, DeviceSpec, Frontend, Options, Placement};
pub use outboard_protocol::AccessSize;
