//! The handshake's plain types: per-device options, placed regions and
//! declared doorbells.

use std::sync::Arc;
use std::time::Duration;

use outboard_protocol::control::{
    DoorbellInfo, RegionInfo, SetRegion, DOORBELL_DATAMATCH, SET_REGION_POSTED,
    SET_REGION_VCPUS_SHIFT,
};
use outboard_protocol::{AccessSize, Space};
use vmm_sys_util::eventfd::EventFd;

use crate::registrar::IoEvent;

/// Per-device settings.
#[derive(Debug, Clone, Copy)]
pub struct DeviceOptions {
    /// Longest wait for a reply (control or data).
    pub timeout: Duration,
    /// Post writes where the region and the backend allow it.
    pub posted_writes: bool,
    /// vCPUs whose accesses carry their own token ([`F_VCPU_TOKENS`](outboard_protocol::control::F_VCPU_TOKENS)).
    pub vcpu_tokens: u32,
    /// What happens when the backend dies (only spawned backends restart).
    pub restart: crate::restart::RestartPolicy,
    /// Entries of each region's command ring where the backend offers one
    /// (0: data sockets only).
    pub cmd_ring: u32,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            timeout: Duration::from_secs(1),
            posted_writes: true,
            vcpu_tokens: 8,
            restart: crate::restart::RestartPolicy::default(),
            cmd_ring: outboard_protocol::ring::DEFAULT_ENTRIES,
        }
    }
}

/// Where a region is placed.
#[derive(Debug, Clone)]
pub struct PlacedRegion {
    /// The backend's description.
    pub info: RegionInfo,
    /// Guest address.
    pub addr: u64,
    /// Token carried by every command for this region.
    pub user_data: u64,
    /// Writes are posted.
    pub posted: bool,
    /// Per-vCPU tokens after `user_data` (0: none).
    pub vcpu_tokens: u32,
}

impl PlacedRegion {
    /// The region's address space.
    pub fn space(&self) -> Space {
        space_of(&self.info)
    }

    pub(crate) fn set_region(&self) -> SetRegion {
        SetRegion {
            index: self.info.index,
            flags: (if self.posted { SET_REGION_POSTED } else { 0 })
                | (self.vcpu_tokens << SET_REGION_VCPUS_SHIFT),
            guest_addr: self.addr,
            user_data: self.user_data,
        }
    }
}

pub(crate) fn space_of(info: &RegionInfo) -> Space {
    if info.is_pio() {
        Space::Pio
    } else {
        Space::Mmio
    }
}

/// A doorbell the backend declared and the eventfd connected to it.
#[derive(Debug, Clone)]
pub struct AttachedDoorbell {
    /// The backend's description.
    pub info: DoorbellInfo,
    /// The eventfd handed to the backend, once connected.
    pub eventfd: Option<Arc<EventFd>>,
}

impl AttachedDoorbell {
    pub(crate) fn size(&self) -> Option<AccessSize> {
        AccessSize::from_bytes(u64::from(self.info.size)).ok()
    }

    pub(crate) fn datamatch(&self) -> Option<u64> {
        (self.info.flags & DOORBELL_DATAMATCH != 0).then_some(self.info.datamatch)
    }

    /// The doorbell at its guest address when its region is at `base`.
    pub fn io_event(&self, space: Space, base: u64) -> IoEvent {
        IoEvent {
            space,
            addr: base.wrapping_add(self.info.offset),
            size: self.size(),
            datamatch: self.datamatch(),
        }
    }
}
