//! Outboard frontend: the VMM side of out-of-process devices.
//!
//! Two layers, both public:
//!
//! * **The handshake**, for a VMM that keeps its own bus, memory, allocator
//!   and interrupt routing ([`device::RemoteDevice`]): connect to or spawn a
//!   backend and negotiate; read each region's [`RegionConstraint`]; assign
//!   addresses with the VMM's allocator (or [`allocator::Allocator`], on
//!   vm-allocator); hand over guest memory (any file-backed vm-memory
//!   `GuestMemoryMmap`), doorbell and interrupt eventfds; place each region
//!   and put the returned [`RemoteRegion`] on the VMM's own bus. A
//!   [`Registrar`] (KVM's, or the VMM's) hears about every doorbell as
//!   regions are placed, moved and removed.
//! * **The convenience [`Frontend`]**, built on the handshake: a [`Bus`] per
//!   address space, the default allocator, memfd guest RAM, a socket-mode
//!   interrupt sink, devices by name (Outboard backends and, with the
//!   `vhost-user` feature, standard vhost-user backends behind the
//!   frontend's virtio-mmio transport).
//!
//! ```text
//!  vCPU exit / test guest ──► Bus (MMIO | PIO) ──► RemoteRegion ══ data socket ══► backend process
//!  (or the VMM's own bus)        O(log n)          (BusDevice)       ioregionfd      epoll loop ─► Device
//!  RemoteDevice ─────────────── control socket (negotiate, SET_REGION + fd, memory, eventfds) ──┘
//!  doorbells ─► eventfd (or KVM ioeventfd via the Registrar) ─► backend;  backend ─► irq eventfd
//! ```
//!
//! Failure semantics: a backend that dies, hangs past the timeout or answers
//! garbage makes its access complete anyway (reads are all-ones, as a PCI
//! master abort), the device is marked failed once with one logged error,
//! and later accesses to it fail fast. Other devices are unaffected.
//!
//! Cargo features: `kvm` (the KVM [`kvm::Machine`] and its registrar),
//! `vhost-user` (attach vhost-user backends), `vm-device` (rust-vmm
//! `DeviceMmio`/`DevicePio` for remote regions).

#![deny(missing_docs)]

pub mod allocator;
pub mod attached;
pub mod backend;
pub mod bus;
pub mod device;
pub mod frontend;
pub mod health;
pub mod host_stream;
pub mod irq;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod launch;
pub mod memory;
pub mod registrar;
pub mod remote;
pub mod restart;
pub mod stderr;
#[cfg(feature = "vhost-user")]
pub mod vhost_user;
#[cfg(feature = "vm-device")]
pub mod vmdevice;

pub use allocator::{Allocator, RegionConstraint};
pub use attached::{Attached, DeviceSpec, Options, Placement};
pub use bus::{AccessError, Bus, BusDevice};
pub use device::{DeviceOptions, PlacedRegion, RemoteDevice};
pub use frontend::{Error, Frontend};
pub use outboard_protocol::{error_chain, Access, AccessSize, Space};
pub use registrar::{IoEvent, Registrar};
pub use remote::RemoteRegion;
pub use restart::{RestartMode, RestartPolicy};
