//! Outboard's test kit (not published): what stands in for a guest where no
//! guest kernel runs.
//!
//! * [`guest`]: the socket-mode test guest's virtio-mmio driver, which talks
//!   to a device only through a [`outboard_frontend::Bus`] and guest RAM, as a
//!   kernel would;
//! * [`loader`]: the flat 32-bit guest loader for KVM (GDT, registers, the
//!   exit port) and the guest programs assembled from `guests/*.S`;
//! * [`linux`]: a real Linux guest (Debian's kernel, busybox) under QEMU,
//!   whose own virtio drivers drive vhost-user devices.

#![deny(missing_docs)]

pub mod guest;
pub mod linux;
pub mod loader;
