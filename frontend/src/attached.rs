//! What the convenience [`crate::Frontend`] attaches: [`DeviceSpec`]s in,
//! [`Attached`] devices out.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outboard_protocol::control::{DeviceInfo, RegionInfo};

use crate::device::{AttachedDoorbell, PlacedRegion, RemoteDevice};
use crate::irq::IrqLine;
use crate::launch::{Launcher, Source};
use crate::restart::RestartPolicy;
#[cfg(feature = "vhost-user")]
use crate::vhost_user::VhostUserDevice;

/// Where one region goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Region index.
    pub index: u32,
    /// Guest address; `None` = the backend's preferred address or the next free one.
    pub addr: Option<u64>,
    /// Leave the region unplaced.
    pub skip: bool,
}

/// How to attach one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Name, unique within the frontend.
    pub name: String,
    /// Which backend.
    pub source: Source,
    /// Placements for some or all regions; unlisted regions are placed automatically.
    pub regions: Vec<Placement>,
    /// Use posted writes where the region and the backend allow them.
    pub posted_writes: bool,
    /// Confine a spawned backend (the default). `false` passes
    /// `--no-sandbox`, for debugging; see docs/security.md.
    pub sandbox: bool,
    /// What happens when the backend dies (default: the device fails).
    pub restart: RestartPolicy,
    /// The frontend owns the device's host stream and listens for its
    /// client here (a console's terminal; spawned backends only, passed
    /// as `--host-stream-fd N`; see [`crate::host_stream`]). It survives
    /// restarts and live upgrades with no byte lost or repeated.
    pub host_stream: Option<PathBuf>,
    /// Entries of each region's command ring, where the backend offers
    /// [`F_CMD_RING`](outboard_protocol::control::F_CMD_RING) (default
    /// [`DEFAULT_ENTRIES`](outboard_protocol::ring::DEFAULT_ENTRIES)); 0
    /// keeps every command on the data sockets. See docs/protocol.md 7.11.
    pub cmd_ring: u32,
}

impl DeviceSpec {
    /// A device spawned from `program` with default placement and posted writes.
    pub fn spawn(name: &str, program: &str, args: &[&str]) -> Self {
        DeviceSpec {
            name: name.to_owned(),
            source: Source::Spawn {
                program: program.to_owned(),
                args: args.iter().map(|s| (*s).to_owned()).collect(),
            },
            regions: Vec::new(),
            posted_writes: true,
            sandbox: true,
            restart: RestartPolicy::default(),
            host_stream: None,
            cmd_ring: outboard_protocol::ring::DEFAULT_ENTRIES,
        }
    }

    /// A device reached at a listening socket, with default placement and posted writes.
    pub fn connect(name: &str, socket: impl Into<PathBuf>) -> Self {
        DeviceSpec {
            name: name.to_owned(),
            source: Source::Connect {
                socket: socket.into(),
            },
            regions: Vec::new(),
            posted_writes: true,
            sandbox: true,
            restart: RestartPolicy::default(),
            host_stream: None,
            cmd_ring: outboard_protocol::ring::DEFAULT_ENTRIES,
        }
    }

    /// A standard vhost-user backend at `socket` implementing virtio `device`
    /// (`blk`, `rng`, `console` or a numeric device ID).
    pub fn vhost_user(name: &str, socket: impl Into<PathBuf>, device: &str) -> Self {
        DeviceSpec {
            name: name.to_owned(),
            source: Source::VhostUser {
                socket: socket.into(),
                device: device.to_owned(),
            },
            regions: Vec::new(),
            posted_writes: false,
            sandbox: true,
            restart: RestartPolicy::default(),
            host_stream: None,
            cmd_ring: outboard_protocol::ring::DEFAULT_ENTRIES,
        }
    }

    /// Sets the command ring's entries (0: data sockets only; see
    /// [`DeviceSpec::cmd_ring`]).
    pub fn cmd_ring(mut self, entries: u32) -> Self {
        self.cmd_ring = entries;
        self
    }

    /// Runs a spawned backend unconfined (`--no-sandbox`), for debugging.
    pub fn without_sandbox(mut self) -> Self {
        self.sandbox = false;
        self
    }

    /// Relays the device's host stream to clients of the socket at `path`
    /// (see [`DeviceSpec::host_stream`]).
    pub fn host_stream(mut self, path: impl Into<PathBuf>) -> Self {
        self.host_stream = Some(path.into());
        self
    }

    /// Replaces a dead backend as `policy` says (see [`crate::restart`]).
    pub fn restart(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// Places region `index` at `addr`.
    pub fn place(mut self, index: u32, addr: u64) -> Self {
        self.regions.retain(|p| p.index != index);
        self.regions.push(Placement {
            index,
            addr: Some(addr),
            skip: false,
        });
        self
    }
}

/// Frontend-wide settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest wait for any one reply from a backend (control or data).
    pub timeout: Duration,
    /// How backend programs are found.
    pub launcher: Launcher,
    /// vCPUs whose accesses carry their own token.
    pub vcpu_tokens: u32,
}

/// vCPUs that get a token by default.
pub const DEFAULT_VCPU_TOKENS: u32 = 8;

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(1),
            launcher: Launcher::beside_current_exe(),
            vcpu_tokens: DEFAULT_VCPU_TOKENS,
        }
    }
}

/// An Outboard backend attached through the frontend: the handshake's
/// [`RemoteDevice`] plus the interrupt lines the frontend made for it.
#[derive(Debug)]
pub struct OutboardDevice {
    pub(crate) remote: RemoteDevice,
    pub(crate) irqs: Vec<IrqLine>,
    /// A spawned backend's arguments, for a live upgrade to another binary.
    pub(crate) args: Option<Vec<String>>,
    /// The device's host stream, when the frontend owns one.
    pub(crate) host_stream: Option<Arc<crate::host_stream::HostStream>>,
}

/// A vhost-user backend behind the frontend's virtio-mmio transport.
#[cfg(feature = "vhost-user")]
#[derive(Debug)]
pub struct VhostUserAttached {
    pub(crate) info: DeviceInfo,
    pub(crate) regions: Vec<RegionInfo>,
    pub(crate) placed: Option<PlacedRegion>,
    pub(crate) irq: IrqLine,
    pub(crate) device: Arc<VhostUserDevice>,
}

/// An attached device.
#[derive(Debug)]
pub enum Attached {
    /// An Outboard backend (ioregionfd data path).
    Outboard(OutboardDevice),
    /// A standard vhost-user backend.
    #[cfg(feature = "vhost-user")]
    VhostUser(VhostUserAttached),
}

impl Attached {
    /// The device's host stream, when the frontend owns one
    /// ([`DeviceSpec::host_stream`]).
    pub fn host_stream(&self) -> Option<&Arc<crate::host_stream::HostStream>> {
        match self {
            Attached::Outboard(d) => d.host_stream.as_ref(),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(_) => None,
        }
    }

    /// Name given in the spec.
    pub fn name(&self) -> &str {
        match self {
            Attached::Outboard(d) => d.remote.name(),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(v) => v.device.name(),
        }
    }

    /// The backend's device description.
    pub fn info(&self) -> &DeviceInfo {
        match self {
            Attached::Outboard(d) => d.remote.info(),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(v) => &v.info,
        }
    }

    /// Every region the backend offers.
    pub fn regions(&self) -> &[RegionInfo] {
        match self {
            Attached::Outboard(d) => d.remote.regions(),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(v) => &v.regions,
        }
    }

    /// Region `index` if it is placed.
    pub fn placed(&self, index: u32) -> Option<&PlacedRegion> {
        match self {
            Attached::Outboard(d) => d.remote.placed(index),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(v) => v.placed.as_ref().filter(|_| index == 0),
        }
    }

    /// True once the device has failed.
    pub fn is_failed(&self) -> bool {
        self.failure().is_some()
    }

    /// Why the device failed, if it has.
    pub fn failure(&self) -> Option<String> {
        match self {
            Attached::Outboard(d) => d.remote.health().reason(),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(v) => v.device.health().reason(),
        }
    }

    /// The device's doorbells, indexed as the backend declared them.
    pub fn doorbells(&self) -> &[AttachedDoorbell] {
        match self {
            Attached::Outboard(d) => d.remote.doorbells(),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(_) => &[],
        }
    }

    /// Interrupt line `index`, if the backend declared it.
    pub fn irq(&self, index: u32) -> Option<&IrqLine> {
        match self {
            Attached::Outboard(d) => d.irqs.get(index as usize),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(v) => (index == 0).then_some(&v.irq),
        }
    }

    /// True when placed region `index` carries its commands on a command
    /// ring (docs/protocol.md section 7.11) rather than its data socket.
    pub fn on_ring(&self, index: u32) -> bool {
        match self {
            Attached::Outboard(d) => d.remote.on_ring(index),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(_) => false,
        }
    }

    /// The spawned backend's pid.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Attached::Outboard(d) => d.remote.pid(),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(_) => None,
        }
    }

    pub(crate) fn outboard_mut(&mut self) -> Option<&mut OutboardDevice> {
        match self {
            Attached::Outboard(d) => Some(d),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(_) => None,
        }
    }

    /// The Outboard handshake of this device, if it is an Outboard backend.
    pub fn remote(&self) -> Option<&RemoteDevice> {
        match self {
            Attached::Outboard(d) => Some(&d.remote),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(_) => None,
        }
    }

    /// The vhost-user device, if this is one.
    #[cfg(feature = "vhost-user")]
    pub fn vhost_user(&self) -> Option<&Arc<VhostUserDevice>> {
        match self {
            Attached::VhostUser(v) => Some(&v.device),
            Attached::Outboard(_) => None,
        }
    }
}
