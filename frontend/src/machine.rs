//! The frontend proper: attached backends, their placed regions and the two buses.
//!
//! [`Frontend::attach`] starts (or connects to) a backend, negotiates, reads
//! its device and region descriptions, chooses a guest address for every
//! region (the configuration's, else the backend's preferred one, else the
//! next free slot of the address space), checks all of them for overlaps
//! before touching anything, and only then sends SET_REGION with a fresh
//! data socket per region and maps each region on its bus.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use log::info;
use outboard_protocol::control::{
    DeviceInfo, DoorbellInfo, RegionInfo, SetRegion, DOORBELL_DATAMATCH, F_DOORBELL, F_FAST_MMIO,
    F_IRQ, F_MEM_TABLE, F_POSTED_WRITES, F_VCPU_TOKENS, IRQ_LEVEL, REGION_FAST_MMIO,
    REGION_POSTED_WRITES, REGION_PREFERRED_ADDR, REGION_READ, REGION_WRITE, SET_REGION_POSTED,
    SET_REGION_VCPUS_SHIFT,
};
use outboard_protocol::AccessSize;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{self, Connection, Launcher, Source};
use crate::bus::{Bus, BusError, Space};
use crate::irq::{self, InterruptSink, IrqLine};
use crate::memory::GuestRam;
use crate::remote::{DoorbellMatch, Health, Permissions, RemoteRegion};
use crate::vhost_user::{self, VhostUserDevice, VirtioType};

/// Most regions (and most doorbells, and most interrupt lines) the frontend
/// accepts from one backend.
pub const MAX_REGIONS: u32 = 256;
/// First MMIO address handed out when neither config nor backend chooses one.
pub const MMIO_POOL_START: u64 = 0xd000_0000;
/// First port handed out when neither config nor backend chooses one.
pub const PIO_POOL_START: u64 = 0x1000;
const PIO_LIMIT: u64 = 0x1_0000;

/// Errors from attaching, configuring or removing devices.
#[derive(Debug, Error)]
pub enum Error {
    /// device {name}: backend failed
    #[error("device {name}: backend failed")]
    Backend {
        /// Device name.
        name: String,
        /// What went wrong.
        #[source]
        source: backend::Error,
    },
    /// device {name}: region {index} cannot be placed
    #[error("device {name}: region {index} cannot be placed")]
    Placement {
        /// Device name.
        name: String,
        /// Region index.
        index: u32,
        /// Why.
        #[source]
        source: BusError,
    },
    /// device {name}: region {index} needs an address (port I/O regions are not allocated automatically beyond 0xffff)
    #[error("device {name}: region {index} needs an address")]
    NoAddress {
        /// Device name.
        name: String,
        /// Region index.
        index: u32,
    },
    /// device {name}: backend offers {count} regions, doorbells or interrupt lines, more than the limit
    #[error("device {name}: backend offers {count} regions, doorbells or interrupt lines, more than {MAX_REGIONS}")]
    TooManyRegions {
        /// Device name.
        name: String,
        /// Regions offered.
        count: u32,
    },
    /// device {name}: the configuration names region {index}, which the backend does not have
    #[error(
        "device {name}: the configuration names region {index}, which the backend does not have"
    )]
    NoSuchRegion {
        /// Device name.
        name: String,
        /// Region index.
        index: u32,
    },
    /// device {name}: region {index} is not placed at {addr:#x}
    #[error("device {name}: region {index} is not placed at {addr:#x}")]
    NotPlaced {
        /// Device name.
        name: String,
        /// Region index.
        index: u32,
        /// Address given.
        addr: u64,
    },
    /// device {0} has failed
    #[error("device {0} has failed")]
    Failed(String),
    /// no device {0}
    #[error("no device {0}")]
    UnknownDevice(String),
    /// a device is already called {0}
    #[error("a device is already called {0}")]
    DuplicateName(String),
    /// cannot create a data socket
    #[error("cannot create a data socket")]
    DataSocket(#[source] std::io::Error),
    /// cannot create a doorbell eventfd
    #[error("cannot create a doorbell eventfd")]
    Doorbell(#[source] std::io::Error),
    /// device {name}: doorbell {index} names region {region}, which the backend does not have
    #[error(
        "device {name}: doorbell {index} names region {region}, which the backend does not have"
    )]
    DoorbellRegion {
        /// Device name.
        name: String,
        /// Doorbell index.
        index: u32,
        /// Region named.
        region: u32,
    },
    /// cannot deliver interrupts
    #[error("cannot deliver interrupts")]
    Interrupts(#[source] irq::Error),
    /// device {name}: vhost-user backend failed
    #[error("device {name}: vhost-user backend failed")]
    VhostUser {
        /// Device name.
        name: String,
        /// What went wrong.
        #[source]
        source: vhost_user::Error,
    },
    /// device {0} is a vhost-user device: regions are not negotiable
    #[error("device {0} is a vhost-user device: regions are not negotiable")]
    NotOutboard(String),
}

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
        }
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
    /// vCPUs whose accesses carry their own token ([`F_VCPU_TOKENS`]).
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

/// A placed region of an attached device.
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
        if self.info.is_pio() {
            Space::Pio
        } else {
            Space::Mmio
        }
    }
}

/// A doorbell of an attached device and the eventfd that rings it.
#[derive(Debug, Clone)]
pub struct AttachedDoorbell {
    /// The backend's description.
    pub info: DoorbellInfo,
    /// The eventfd handed to the backend.
    pub eventfd: Arc<EventFd>,
}

impl AttachedDoorbell {
    fn matcher(&self) -> DoorbellMatch {
        DoorbellMatch {
            offset: self.info.offset,
            size: AccessSize::from_bytes(u64::from(self.info.size)).ok(),
            datamatch: (self.info.flags & DOORBELL_DATAMATCH != 0).then_some(self.info.datamatch),
            eventfd: Arc::clone(&self.eventfd),
        }
    }
}

/// An attached device.
#[derive(Debug)]
pub struct Attached {
    name: String,
    info: DeviceInfo,
    regions: Vec<RegionInfo>,
    placed: Vec<Option<PlacedRegion>>,
    health: Arc<Health>,
    conn: Option<Connection>,
    posted_writes: bool,
    doorbells: Vec<AttachedDoorbell>,
    irqs: Vec<IrqLine>,
    vhost: Option<Arc<VhostUserDevice>>,
}

impl Attached {
    /// Name given in the spec.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend's device description.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Every region the backend offers.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// Region `index` if it is placed.
    pub fn placed(&self, index: u32) -> Option<&PlacedRegion> {
        self.placed.get(index as usize).and_then(Option::as_ref)
    }

    /// True once the device has failed.
    pub fn is_failed(&self) -> bool {
        self.health.is_failed()
    }

    /// Why the device failed, if it has.
    pub fn failure(&self) -> Option<String> {
        self.health.reason()
    }

    /// The device's doorbells, indexed as the backend declared them.
    pub fn doorbells(&self) -> &[AttachedDoorbell] {
        &self.doorbells
    }

    /// Interrupt line `index`, if the backend declared it.
    pub fn irq(&self, index: u32) -> Option<&IrqLine> {
        self.irqs.get(index as usize)
    }

    /// The spawned backend's pid.
    pub fn pid(&self) -> Option<u32> {
        self.conn.as_ref().and_then(Connection::pid)
    }

    /// The vhost-user device, if this is one.
    pub fn vhost_user(&self) -> Option<&Arc<VhostUserDevice>> {
        self.vhost.as_ref()
    }

    fn conn(&self) -> Result<&Connection, Error> {
        if self.health.is_failed() {
            return Err(Error::Failed(self.name.clone()));
        }
        if self.vhost.is_some() {
            return Err(Error::NotOutboard(self.name.clone()));
        }
        self.conn
            .as_ref()
            .ok_or_else(|| Error::Failed(self.name.clone()))
    }

    /// Wraps a backend error; anything but a refusal (a transport or
    /// protocol failure) also marks the device failed.
    fn backend_err(&self, source: backend::Error) -> Error {
        if !matches!(source, backend::Error::Refused { .. }) {
            self.health.fail(&source);
        }
        Error::Backend {
            name: self.name.clone(),
            source,
        }
    }
}

/// The frontend: attached devices and the MMIO and PIO buses.
#[derive(Debug)]
pub struct Frontend {
    options: Options,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    devices: Vec<Attached>,
    next_user_data: u64,
    ram: Option<Arc<GuestRam>>,
    sink: Option<InterruptSink>,
}

impl Frontend {
    /// A frontend with no devices.
    pub fn new(options: Options) -> Self {
        Frontend {
            options,
            mmio: Arc::new(Bus::new(Space::Mmio)),
            pio: Arc::new(Bus::new(Space::Pio)),
            devices: Vec::new(),
            next_user_data: 1,
            ram: None,
            sink: None,
        }
    }

    /// Guest RAM, once set.
    pub fn memory(&self) -> Option<&Arc<GuestRam>> {
        self.ram.as_ref()
    }

    /// Makes `ram` the guest RAM and sends its memory table to every working
    /// backend that negotiated it (and, later, to every backend attached).
    pub fn set_memory(&mut self, ram: GuestRam) -> Result<(), Error> {
        let ram = Arc::new(ram);
        self.ram = Some(Arc::clone(&ram));
        // Every working backend gets the table even if an earlier one fails;
        // the first failure is reported.
        let mut first_error = None;
        for dev in &self.devices {
            if dev.is_failed() {
                continue;
            }
            if let Some(v) = &dev.vhost {
                if let Err(source) = v.set_memory(&ram) {
                    first_error.get_or_insert(Error::VhostUser {
                        name: dev.name.clone(),
                        source,
                    });
                }
                continue;
            }
            let result = dev.conn().and_then(|conn| {
                if conn.negotiated().features & F_MEM_TABLE == 0 {
                    return Ok(());
                }
                let (table, fds) = ram.table();
                conn.set_mem_table(&table, &fds)
                    .map_err(|e| dev.backend_err(e))
            });
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Takes device `name`'s interrupt line `line` away from the socket-mode
    /// sink (a KVM irqchip consumes it instead).
    pub fn release_irq(&self, name: &str, line: u32) {
        if let Some(sink) = &self.sink {
            sink.remove_line(name, line);
        }
    }

    /// The interrupt sink (socket mode), created with the first interrupt line.
    pub fn interrupt_sink(&mut self) -> Result<&InterruptSink, Error> {
        self.sink_mut().map(|s| &*s)
    }

    fn sink_mut(&mut self) -> Result<&mut InterruptSink, Error> {
        if self.sink.is_none() {
            self.sink = Some(InterruptSink::new().map_err(Error::Interrupts)?);
        }
        self.sink
            .as_mut()
            .ok_or(Error::Interrupts(irq::Error::Create(
                std::io::Error::other("interrupt sink missing"),
            )))
    }

    /// Sends memory, doorbells and interrupts to a freshly attached backend.
    fn connect_resources(&mut self, dev: &mut Attached) -> Result<(), Error> {
        let name = dev.name.clone();
        let be = |source| Error::Backend {
            name: name.clone(),
            source,
        };
        let features = dev.conn()?.negotiated().features;
        if features & F_MEM_TABLE != 0 {
            if let Some(ram) = &self.ram {
                let (table, fds) = ram.table();
                dev.conn()?.set_mem_table(&table, &fds).map_err(be)?;
            }
        }
        if dev.info.num_doorbells > MAX_REGIONS || dev.info.num_irqs > MAX_REGIONS {
            return Err(Error::TooManyRegions {
                name: name.clone(),
                count: dev.info.num_doorbells.max(dev.info.num_irqs),
            });
        }
        if features & F_DOORBELL != 0 {
            for i in 0..dev.info.num_doorbells {
                let info = dev.conn()?.doorbell_info(i).map_err(be)?;
                if info.region >= dev.info.num_regions {
                    return Err(Error::DoorbellRegion {
                        name: name.clone(),
                        index: i,
                        region: info.region,
                    });
                }
                let efd =
                    EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::Doorbell)?;
                dev.conn()?
                    .set_doorbell(i, std::os::fd::AsRawFd::as_raw_fd(&efd))
                    .map_err(be)?;
                dev.doorbells.push(AttachedDoorbell {
                    info,
                    eventfd: Arc::new(efd),
                });
            }
        }
        if features & F_IRQ != 0 {
            for i in 0..dev.info.num_irqs {
                let info = dev.conn()?.irq_info(i).map_err(be)?;
                let line = self
                    .sink_mut()?
                    .add_line(&name, i, info.flags & IRQ_LEVEL != 0)
                    .map_err(Error::Interrupts)?;
                dev.conn()?
                    .set_irq(
                        i,
                        std::os::fd::AsRawFd::as_raw_fd(line.eventfd()),
                        line.resample_eventfd().map(std::os::fd::AsRawFd::as_raw_fd),
                    )
                    .map_err(be)?;
                dev.irqs.push(line);
            }
        }
        Ok(())
    }

    /// The MMIO bus.
    pub fn mmio(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// The port I/O bus.
    pub fn pio(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The bus of `space`.
    pub fn bus(&self, space: Space) -> &Arc<Bus> {
        match space {
            Space::Mmio => &self.mmio,
            Space::Pio => &self.pio,
        }
    }

    /// Every attached device.
    pub fn devices(&self) -> &[Attached] {
        &self.devices
    }

    /// The device called `name`.
    pub fn device(&self, name: &str) -> Result<&Attached, Error> {
        self.devices
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| Error::UnknownDevice(name.to_owned()))
    }

    fn device_index(&self, name: &str) -> Result<usize, Error> {
        self.devices
            .iter()
            .position(|d| d.name == name)
            .ok_or_else(|| Error::UnknownDevice(name.to_owned()))
    }

    /// Starts or connects to a backend, negotiates, and places its regions.
    /// On any error the backend is shut down and nothing stays mapped.
    pub fn attach(&mut self, spec: &DeviceSpec) -> Result<&Attached, Error> {
        if self.devices.iter().any(|d| d.name == spec.name) {
            return Err(Error::DuplicateName(spec.name.clone()));
        }
        let name = spec.name.clone();
        let be = |source| Error::Backend {
            name: name.clone(),
            source,
        };
        let timeout = self.options.timeout;
        let conn = match &spec.source {
            Source::Spawn { program, args } => {
                let cmd = self.options.launcher.command(program, args).map_err(be)?;
                Connection::spawn(cmd, self.options.launcher.quiet_stdout, timeout).map_err(be)?
            }
            Source::Connect { socket } => Connection::connect(socket, timeout).map_err(be)?,
            Source::VhostUser { socket, device } => {
                return self.attach_vhost_user(spec, socket, device);
            }
        };
        let info = conn.device_info().map_err(be)?;
        if info.num_regions > MAX_REGIONS {
            return Err(Error::TooManyRegions {
                name,
                count: info.num_regions,
            });
        }
        let regions = (0..info.num_regions)
            .map(|i| conn.region_info(i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(be)?;
        if let Some(p) = spec.regions.iter().find(|p| p.index >= info.num_regions) {
            return Err(Error::NoSuchRegion {
                name,
                index: p.index,
            });
        }
        info!(
            "attached {} ({}): {} kind {} with {} regions",
            spec.name,
            conn.label(),
            info.name,
            info.kind.0,
            regions.len()
        );
        let mut dev = Attached {
            name: spec.name.clone(),
            info,
            placed: regions.iter().map(|_| None).collect(),
            regions,
            health: Health::new(&spec.name),
            conn: Some(conn),
            posted_writes: spec.posted_writes,
            doorbells: Vec::new(),
            irqs: Vec::new(),
            vhost: None,
        };
        if let Err(e) = self.connect_resources(&mut dev) {
            if let Some(sink) = &self.sink {
                sink.remove_device(&dev.name);
            }
            return Err(e);
        }
        let plan = self.plan(&spec.regions, &dev)?;
        let posted_ok = dev
            .conn
            .as_ref()
            .is_some_and(|c| c.negotiated().features & F_POSTED_WRITES != 0)
            && spec.posted_writes;
        for (index, addr) in plan {
            if let Err(e) = self.place(&mut dev, index, addr, posted_ok) {
                self.unmap_all(&mut dev);
                return Err(e);
            }
        }
        self.devices.push(dev);
        let idx = self.devices.len() - 1;
        Ok(&self.devices[idx])
    }

    /// Attaches a vhost-user backend behind a frontend-implemented virtio-mmio region.
    fn attach_vhost_user(
        &mut self,
        spec: &DeviceSpec,
        socket: &std::path::Path,
        device: &str,
    ) -> Result<&Attached, Error> {
        let name = spec.name.clone();
        let vu = |source| Error::VhostUser {
            name: name.clone(),
            source,
        };
        let ty = VirtioType::parse(device).map_err(vu)?;
        let health = Health::new(&name);
        let line = self
            .sink_mut()?
            .add_line(&name, 0, false)
            .map_err(Error::Interrupts)?;
        let ram = self.ram.clone();
        let connected = VhostUserDevice::connect(
            &name,
            socket,
            ty,
            ram.as_deref(),
            line.clone(),
            Arc::clone(&health),
            self.options.timeout,
        );
        let vdev = match connected {
            Ok(d) => Arc::new(d),
            Err(e) => {
                if let Some(sink) = &self.sink {
                    sink.remove_device(&name);
                }
                return Err(vu(e));
            }
        };
        let region = RegionInfo {
            index: 0,
            flags: REGION_READ | REGION_WRITE,
            size: outboard_protocol::virtio_mmio::MMIO_SIZE,
            preferred_addr: 0,
            access_sizes: 0x0f,
            name: "virtio-mmio".into(),
        };
        let mut dev = Attached {
            name: name.clone(),
            info: DeviceInfo {
                kind: outboard_protocol::control::DeviceKind(
                    outboard_protocol::control::DeviceKind::VIRTIO_BASE + ty.id,
                ),
                num_regions: 1,
                num_doorbells: 0,
                num_irqs: 1,
                name: format!("vhost-user-{device}"),
            },
            regions: vec![region.clone()],
            placed: vec![None],
            health,
            conn: None,
            posted_writes: false,
            doorbells: Vec::new(),
            irqs: vec![line],
            vhost: Some(Arc::clone(&vdev)),
        };
        let result = self.plan(&spec.regions, &dev).and_then(|plan| {
            let Some(&(_, addr)) = plan.first() else {
                return Ok(());
            };
            self.mmio
                .insert(addr, region.size, vdev.clone())
                .map_err(|source| Error::Placement {
                    name: name.clone(),
                    index: 0,
                    source,
                })?;
            info!(
                "{name}: vhost-user {device} at mmio {addr:#x}+{:#x}",
                region.size
            );
            dev.placed[0] = Some(PlacedRegion {
                info: region.clone(),
                addr,
                user_data: 0,
                posted: false,
                vcpu_tokens: 0,
            });
            Ok(())
        });
        if let Err(e) = result {
            if let Some(sink) = &self.sink {
                sink.remove_device(&name);
            }
            return Err(e);
        }
        self.devices.push(dev);
        let idx = self.devices.len() - 1;
        Ok(&self.devices[idx])
    }

    /// Chooses an address for every region to place, checking for overlaps
    /// with the buses and among the regions themselves.
    fn plan(&self, placements: &[Placement], dev: &Attached) -> Result<Vec<(u32, u64)>, Error> {
        let mut plan: Vec<(u32, u64)> = Vec::new();
        let scratch_mmio = Bus::new(Space::Mmio);
        let scratch_pio = Bus::new(Space::Pio);
        let dummy: Arc<dyn crate::bus::BusDevice> = Arc::new(Unused);
        for info in &dev.regions {
            let placement = placements.iter().find(|p| p.index == info.index);
            if placement.is_some_and(|p| p.skip) {
                continue;
            }
            let space = if info.is_pio() {
                Space::Pio
            } else {
                Space::Mmio
            };
            let (bus, scratch) = match space {
                Space::Mmio => (&self.mmio, &scratch_mmio),
                Space::Pio => (&self.pio, &scratch_pio),
            };
            let wanted = placement.and_then(|p| p.addr).or_else(|| {
                (info.flags & REGION_PREFERRED_ADDR != 0).then_some(info.preferred_addr)
            });
            let addr = match wanted {
                Some(a) => a,
                None => {
                    self.allocate(space, info.size, scratch)
                        .ok_or_else(|| Error::NoAddress {
                            name: dev.name.clone(),
                            index: info.index,
                        })?
                }
            };
            let placement_err = |source| Error::Placement {
                name: dev.name.clone(),
                index: info.index,
                source,
            };
            bus.check_free(addr, info.size).map_err(placement_err)?;
            scratch
                .insert(addr, info.size, Arc::clone(&dummy))
                .map_err(placement_err)?;
            plan.push((info.index, addr));
        }
        Ok(plan)
    }

    /// The lowest free, size-aligned slot of the space's pool.
    fn allocate(&self, space: Space, size: u64, pending: &Bus) -> Option<u64> {
        let (start, limit, min_align) = match space {
            Space::Mmio => (MMIO_POOL_START, u64::MAX, 0x1000),
            Space::Pio => (PIO_POOL_START, PIO_LIMIT, 1),
        };
        let align = size.checked_next_power_of_two()?.max(min_align);
        let align_up = |a: u64| a.checked_add(align - 1).map(|a| a & !(align - 1));
        let mut addr = align_up(start)?;
        while addr.checked_add(size)? <= limit {
            let conflict = self
                .bus(space)
                .check_free(addr, size)
                .and_then(|()| pending.check_free(addr, size));
            match conflict {
                Ok(()) => return Some(addr),
                // Skip past the range in the way rather than stepping through it.
                Err(BusError::Overlap {
                    other_base,
                    other_len,
                    ..
                }) => addr = align_up(other_base.checked_add(other_len)?)?,
                Err(_) => return None,
            }
        }
        None
    }

    fn place(
        &mut self,
        dev: &mut Attached,
        index: u32,
        addr: u64,
        posted_ok: bool,
    ) -> Result<(), Error> {
        let info = dev.regions[index as usize].clone();
        let posted = posted_ok && info.flags & REGION_POSTED_WRITES != 0;
        let vcpu_tokens = if dev.conn()?.negotiated().features & F_VCPU_TOKENS != 0 {
            self.options.vcpu_tokens.min(0xffff)
        } else {
            0
        };
        let user_data = self.next_user_data;
        self.next_user_data += 1 + u64::from(vcpu_tokens);
        let set = SetRegion {
            index,
            flags: (if posted { SET_REGION_POSTED } else { 0 })
                | (vcpu_tokens << SET_REGION_VCPUS_SHIFT),
            guest_addr: addr,
            user_data,
        };
        let (ours, theirs) = UnixStream::pair().map_err(Error::DataSocket)?;
        dev.conn()?
            .set_region(&set, theirs.as_raw_fd())
            .map_err(|e| dev.backend_err(e))?;
        // Our copy of the backend's end must go, or a dead backend would never read as EOF.
        drop(theirs);
        let perms = Permissions {
            read: info.flags & REGION_READ != 0,
            write: info.flags & REGION_WRITE != 0,
            sizes: info.access_sizes,
        };
        let remote = RemoteRegion::new(
            ours,
            user_data,
            posted,
            perms,
            Arc::clone(&dev.health),
            self.options.timeout,
        )
        .map_err(Error::DataSocket)?
        .with_vcpu_tokens(vcpu_tokens)
        .with_doorbells(
            dev.doorbells
                .iter()
                .filter(|d| d.info.region == index)
                .map(AttachedDoorbell::matcher)
                .collect(),
            info.flags & REGION_FAST_MMIO != 0
                && dev.conn()?.negotiated().features & F_FAST_MMIO != 0,
        );
        let placed = PlacedRegion {
            info,
            addr,
            user_data,
            posted,
            vcpu_tokens,
        };
        self.bus(placed.space())
            .insert(addr, placed.info.size, Arc::new(remote))
            .map_err(|source| Error::Placement {
                name: dev.name.clone(),
                index,
                source,
            })?;
        info!(
            "{}: region {index} ({}) at {} {addr:#x}+{:#x}{}",
            dev.name,
            placed.info.name,
            placed.space(),
            placed.info.size,
            if posted { ", posted writes" } else { "" }
        );
        dev.placed[index as usize] = Some(placed);
        Ok(())
    }

    fn unmap_all(&self, dev: &mut Attached) {
        for p in dev.placed.iter_mut().filter_map(Option::take) {
            let _ = self.bus(p.space()).remove(p.addr, p.info.size);
        }
    }

    /// Places region `index` of device `name` at `addr` (or automatically).
    pub fn set_region(&mut self, name: &str, index: u32, addr: Option<u64>) -> Result<u64, Error> {
        let i = self.device_index(name)?;
        let mut dev = self.devices.remove(i);
        let result = self.set_region_of(&mut dev, index, addr);
        self.devices.insert(i, dev);
        result
    }

    fn set_region_of(
        &mut self,
        dev: &mut Attached,
        index: u32,
        addr: Option<u64>,
    ) -> Result<u64, Error> {
        if index as usize >= dev.regions.len() {
            return Err(Error::NoSuchRegion {
                name: dev.name.clone(),
                index,
            });
        }
        // Place only region `index`: at `addr`, or wherever placement would put it.
        let placements: Vec<Placement> = dev
            .regions
            .iter()
            .map(|r| Placement {
                index: r.index,
                addr: if r.index == index { addr } else { None },
                skip: r.index != index,
            })
            .collect();
        let plan = self.plan(&placements, dev)?;
        let posted_ok =
            dev.posted_writes && dev.conn()?.negotiated().features & F_POSTED_WRITES != 0;
        let addr = plan.first().map(|&(_, a)| a).ok_or(Error::NoSuchRegion {
            name: dev.name.clone(),
            index,
        })?;
        self.place(dev, index, addr, posted_ok)?;
        Ok(addr)
    }

    /// Removes region `index` of device `name`, which must be placed exactly at `addr`.
    pub fn remove_region(&mut self, name: &str, index: u32, addr: u64) -> Result<(), Error> {
        let i = self.device_index(name)?;
        let dev = &mut self.devices[i];
        let placed = match dev.placed(index) {
            Some(p) if p.addr == addr => p.clone(),
            _ => {
                return Err(Error::NotPlaced {
                    name: name.to_owned(),
                    index,
                    addr,
                })
            }
        };
        let set = SetRegion {
            index,
            flags: (if placed.posted { SET_REGION_POSTED } else { 0 })
                | (placed.vcpu_tokens << SET_REGION_VCPUS_SHIFT),
            guest_addr: placed.addr,
            user_data: placed.user_data,
        };
        // Unmap first so no new access can start, then tell the backend.
        let bus = match placed.space() {
            Space::Mmio => &self.mmio,
            Space::Pio => &self.pio,
        };
        let remote = bus
            .remove(placed.addr, placed.info.size)
            .map_err(|source| Error::Placement {
                name: name.to_owned(),
                index,
                source,
            })?;
        dev.placed[index as usize] = None;
        let conn = dev.conn()?;
        conn.remove_region(&set).map_err(|e| dev.backend_err(e))?;
        // Close our end of the data socket only once the backend has let go of
        // the region, so the backend never sees EOF on a region still placed.
        drop(remote);
        info!("{name}: region {index} removed from {addr:#x}");
        Ok(())
    }

    /// Resets device `name`.
    pub fn reset(&self, name: &str) -> Result<(), Error> {
        let dev = self.device(name)?;
        if let Some(v) = &dev.vhost {
            return v.reset().map_err(|source| Error::VhostUser {
                name: name.to_owned(),
                source,
            });
        }
        dev.conn()?.reset().map_err(|e| dev.backend_err(e))
    }

    /// Unmaps device `name` and shuts its backend down; returns a spawned
    /// backend's exit status.
    pub fn detach(&mut self, name: &str) -> Result<Option<ExitStatus>, Error> {
        let i = self.device_index(name)?;
        let mut dev = self.devices.remove(i);
        self.unmap_all(&mut dev);
        if let Some(sink) = &self.sink {
            sink.remove_device(&dev.name);
        }
        let grace = self.options.timeout;
        Ok(dev.conn.take().and_then(|c| c.shutdown(grace)))
    }

    /// Shuts every backend down, returning each device's name and a spawned
    /// backend's exit status.
    pub fn shutdown(&mut self) -> Vec<(String, Option<ExitStatus>)> {
        let names: Vec<String> = self.devices.iter().map(|d| d.name.clone()).collect();
        names
            .into_iter()
            .map(|n| {
                let status = self.detach(&n).ok().flatten();
                (n, status)
            })
            .collect()
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Placeholder device for the planning bus; never accessed.
struct Unused;

impl crate::bus::BusDevice for Unused {
    fn read(
        &self,
        _: u64,
        _: outboard_protocol::AccessSize,
    ) -> Result<u64, crate::bus::AccessError> {
        Err(crate::bus::AccessError::Denied)
    }
    fn write(
        &self,
        _: u64,
        _: outboard_protocol::AccessSize,
        _: u64,
    ) -> Result<(), crate::bus::AccessError> {
        Err(crate::bus::AccessError::Denied)
    }
}
