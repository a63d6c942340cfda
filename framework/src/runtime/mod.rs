//! The backend runtime: one epoll set over the control socket, every
//! region's data socket, doorbell and resample eventfds and the device's own
//! fds, serving one [`Device`] to one frontend.
//!
//! * `control.rs`: the request state machine.
//! * `data.rs`: data sockets, command batching, decoding and dispatch;
//!   `placement.rs`: placing and removing regions, `user_data` tokens;
//!   `ring.rs`: shared-memory command rings and the loop's spin budget.
//! * `resources.rs`: the memory table, doorbell and interrupt fds;
//!   `sockcheck.rs`: which fds a SET_REGION may hand over as data sockets.
//! * `event_loop.rs`: [`Backend::run`] and [`Backend::process_ready`].
//! * `peer.rs`: the peer watch, which ends the process once the frontend
//!   is gone even if the loop is stuck (only under [`Backend::run`]).
//!
//! The loop ends with `Ok` when the frontend closes the control socket or
//! sends SHUTDOWN, and with an [`Error`](enum@Error) on a protocol violation: a header
//! that loses framing, a malformed data command, or a command whose
//! `user_data` names no region of its socket.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;

use log::warn;
use outboard_protocol::channel::Channel;
use outboard_protocol::control::{
    DeviceKind, Negotiated, FEATURES_SUPPORTED, F_DOORBELL, F_IRQ, F_MEM_TABLE, F_STATE,
};
use thiserror::Error;

use crate::device::{DescriptionError, Device, DeviceDescription};
use crate::events::{token, Epoll, EventOps};

mod control;
mod data;
mod event_loop;
mod peer;
mod placement;
mod resources;
mod ring;
mod sockcheck;

#[cfg(test)]
mod testutil;

pub use control::Error as ControlError;
pub use data::{Error as DataError, BATCH_BYTES};
pub(crate) use peer::pidfd_open;
pub use peer::{Error as WatchError, GRACE};
#[cfg(feature = "cli")]
pub(crate) use resources::is_stream_socket;
pub(crate) use resources::shrink_sealed;
pub use sockcheck::Error as DataSocketError;

/// Errors that stop the backend from starting or end its event loop.
#[derive(Debug, Error)]
pub enum Error {
    /// cannot create the event loop
    #[error("cannot create the event loop")]
    Epoll(#[source] io::Error),
    /// the control channel failed or was violated
    #[error(transparent)]
    Control(#[from] ControlError),
    /// a data socket failed or was violated
    #[error(transparent)]
    Data(#[from] DataError),
    /// the device description is invalid
    #[error("the device description is invalid")]
    Description(#[source] DescriptionError),
    /// the device cannot start
    #[error("the device cannot start")]
    DeviceInit(#[source] io::Error),
    /// cannot watch the frontend
    #[error("cannot watch the frontend")]
    Watch(#[source] WatchError),
}

/// Whether the backend goes on serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Flow {
    /// Keep serving.
    Continue,
    /// The frontend sent SHUTDOWN or closed the control socket: done.
    Exit,
}

/// The runtime serving one [`Device`] to one frontend.
#[derive(Debug)]
pub struct Backend<D: Device> {
    device: D,
    name: String,
    kind: DeviceKind,
    /// Features offered in HELLO.
    features: u64,
    control: Channel,
    epoll: Epoll,
    ops: EventOps,
    negotiated: Option<Negotiated>,
    data: data::DataPlane,
    resources: resources::Resources,
    /// Taken out while [`Backend::run`] runs its thread.
    watch: Option<peer::PeerWatch>,
    /// The state area, once SET_STATE_AREA gave one.
    state: Option<crate::state::Keeper>,
    /// After SAVE_STATE: only the control socket is served.
    paused: bool,
}

impl<D: Device> Backend<D> {
    /// Prepares to serve `device` on a connected control socket: checks its
    /// description, gives it guest memory if it needs it, and lets it
    /// register its own fds ([`Device::init`]).
    pub fn new(mut device: D, control: UnixStream) -> Result<Self, Error> {
        let desc = device.describe();
        desc.validate().map_err(Error::Description)?;
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        // At setup, before any confinement: the thread starts in `run`.
        let watch = peer::PeerWatch::new(control.as_fd()).map_err(Error::Watch)?;
        let mut features = offered_features(&desc);
        if device.save().is_none() {
            // Nothing to keep: a restart is a fresh instance.
            features &= !F_STATE;
        }
        let resources = resources::Resources::new(desc.doorbells, desc.interrupts);
        if desc.needs_memory {
            device.set_memory(resources.memory().clone());
        }
        epoll
            .add(control.as_raw_fd(), token::CONTROL)
            .map_err(Error::Epoll)?;
        let ops = epoll.ops();
        device.init(&ops).map_err(Error::DeviceInit)?;
        let mut data = data::DataPlane::new(desc.regions);
        data.vetter.set_control(control.as_fd());
        Ok(Backend {
            device,
            name: desc.name,
            kind: desc.kind,
            features,
            control: Channel::new(control),
            epoll,
            ops,
            negotiated: None,
            data,
            resources,
            watch: Some(watch),
            state: None,
            paused: false,
        })
    }

    /// The device being served.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device being served, mutably (between iterations of the loop).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The features this backend offers in HELLO.
    pub fn offered_features(&self) -> u64 {
        self.features
    }

    /// The negotiated protocol version and features, once HELLO succeeded.
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.negotiated
    }
}

/// The features offered for a device: least privilege, so a device gets
/// only the kinds of resources its description asks for. Guest RAM only if
/// it needs memory (the UART never gets it), doorbell eventfds only if it
/// has doorbells, interrupt eventfds only if it has interrupt lines.
fn offered_features(desc: &DeviceDescription) -> u64 {
    let mut features = FEATURES_SUPPORTED;
    if !desc.needs_memory {
        features &= !F_MEM_TABLE;
    }
    if desc.doorbells.is_empty() {
        features &= !F_DOORBELL;
    }
    if desc.interrupts.is_empty() {
        features &= !F_IRQ;
    }
    features
}

impl<D: Device> Drop for Backend<D> {
    fn drop(&mut self) {
        let rejected = self.data.rejected();
        if rejected > 0 {
            warn!(
                "{rejected} guest accesses were rejected (outside a region, wrong size or direction)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Doorbell, Interrupt, Region};

    #[test]
    fn offered_features_when_device_lacks_memory_doorbells_or_lines_then_those_not_offered() {
        let bare = DeviceDescription::new("bare").region(Region::mmio("r", 8));
        assert_eq!(
            offered_features(&bare),
            FEATURES_SUPPORTED & !(F_MEM_TABLE | F_DOORBELL | F_IRQ)
        );
        let full = DeviceDescription::new("full")
            .region(Region::mmio("r", 8))
            .doorbell(Doorbell {
                region: 0,
                offset: 0,
                size: None,
                datamatch: None,
            })
            .interrupt(Interrupt { level: false })
            .needs_memory();
        assert_eq!(offered_features(&full), FEATURES_SUPPORTED);
    }
}
