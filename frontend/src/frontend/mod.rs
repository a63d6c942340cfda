//! The convenience layer: a [`Frontend`] that owns a bus per address space,
//! the default address [`Allocator`], guest RAM, the socket-mode interrupt
//! sink and an optional [`Registrar`], and attaches devices by name.
//!
//! Everything it does goes through the public handshake
//! ([`crate::device::RemoteDevice`]); a VMM with its own bus, memory and
//! interrupt routing uses that directly instead.
//!
//! [`Frontend::attach`] starts (or connects to) a backend, negotiates,
//! connects memory, doorbells and interrupt lines, chooses a guest address
//! for every region (the spec's, else the backend's preferred one, else the
//! allocator's), checks all of them for overlaps before touching anything,
//! and only then places each region and maps it on its bus.

use std::os::fd::AsRawFd;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use log::info;
use outboard_protocol::control::IRQ_LEVEL;
use outboard_protocol::Space;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::allocator::{self, Allocator};
use crate::attached::{Attached, DeviceSpec, OutboardDevice};
use crate::backend::Error as BackendError;
use crate::bus::{Bus, BusError};
use crate::device::{self, DeviceOptions, RemoteDevice};
use crate::host_stream::HostStream;
use crate::irq::{self, InterruptSink, IrqLine};
use crate::launch::{Launcher, Prepared, Source};
use crate::memory::GuestRam;
use crate::registrar::Registrar;

mod placement;
mod regions;
#[cfg(feature = "vhost-user")]
mod vhost;

pub use crate::attached::Options;

/// Errors from attaching, configuring or removing devices.
#[derive(Debug, Error)]
pub enum Error {
    /// device {0}: a host stream needs a backend the frontend spawns
    #[error("device {0}: a host stream needs a backend the frontend spawns")]
    HostStreamNotSpawned(String),
    /// device {0} is not a spawned Outboard backend: it cannot be upgraded
    #[error("device {0} is not a spawned Outboard backend: it cannot be upgraded")]
    NotUpgradable(String),
    /// device {name}
    #[error("device {name}")]
    Device {
        /// Device name.
        name: String,
        /// What went wrong.
        #[source]
        source: device::Error,
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
    /// device {name}: region {index} gets no address
    #[error("device {name}: region {index} gets no address")]
    NoAddress {
        /// Device name.
        name: String,
        /// Region index.
        index: u32,
        /// Why.
        #[source]
        source: allocator::Error,
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
    /// no device {0}
    #[error("no device {0}")]
    UnknownDevice(String),
    /// a device is already called {0}
    #[error("a device is already called {0}")]
    DuplicateName(String),
    /// cannot create an eventfd
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// cannot deliver interrupts
    #[error("cannot deliver interrupts")]
    Interrupts(#[source] irq::Error),
    /// device {0} has no interrupt line {1}
    #[error("device {0} has no interrupt line {1}")]
    NoIrq(String, u32),
    /// no registrar: interrupt routing needs one
    #[error("no registrar: interrupt routing needs one")]
    NoRegistrar,
    /// the registrar refused
    #[error("the registrar refused")]
    Registrar(#[source] std::io::Error),
    /// device {name}: vhost-user backend failed
    #[cfg(feature = "vhost-user")]
    #[error("device {name}: vhost-user backend failed")]
    VhostUser {
        /// Device name.
        name: String,
        /// What went wrong.
        #[source]
        source: crate::vhost_user::Error,
    },
    /// device {0}: vhost-user support is not built in (cargo feature `vhost-user`)
    #[error("device {0}: vhost-user support is not built in (cargo feature `vhost-user`)")]
    NoVhostUser(String),
    /// device {0} is a vhost-user device: regions are not negotiable
    #[error("device {0} is a vhost-user device: regions are not negotiable")]
    NotOutboard(String),
}

/// The frontend: attached devices, the MMIO and PIO buses, the allocator.
pub struct Frontend {
    pub(crate) options: Options,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) allocator: Allocator,
    pub(crate) devices: Vec<Attached>,
    pub(crate) ram: Option<Arc<GuestRam>>,
    pub(crate) sink: Option<InterruptSink>,
    pub(crate) registrar: Option<Arc<dyn Registrar>>,
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("devices", &self.devices.len())
            .field("mmio", &self.mmio)
            .field("pio", &self.pio)
            .finish_non_exhaustive()
    }
}

/// Starts `program` with `args` through `launcher`; with a host stream,
/// each start gets a fresh socket of it as `--host-stream-fd N`.
fn spawner(
    launcher: Launcher,
    program: String,
    args: Vec<String>,
    host: Option<Arc<HostStream>>,
) -> device::Spawner {
    Box::new(move || {
        let mut command = launcher.command(&program, &args)?;
        let Some(host) = &host else {
            return Ok(Prepared::from(command));
        };
        let end = host.new_end().map_err(BackendError::HostStream)?;
        command
            .arg("--host-stream-fd")
            .arg(end.as_raw_fd().to_string());
        Ok(Prepared {
            command,
            inherit: vec![end],
        })
    })
}

pub(crate) fn dev_err(name: &str) -> impl Fn(device::Error) -> Error + '_ {
    move |source| Error::Device {
        name: name.to_owned(),
        source,
    }
}

impl Frontend {
    /// A frontend with no devices.
    pub fn new(options: Options) -> Self {
        Frontend {
            options,
            mmio: Arc::new(Bus::new(Space::Mmio)),
            pio: Arc::new(Bus::new(Space::Pio)),
            allocator: Allocator::new(),
            devices: Vec::new(),
            ram: None,
            sink: None,
            registrar: None,
        }
    }

    /// Guest RAM, once set.
    pub fn memory(&self) -> Option<&Arc<GuestRam>> {
        self.ram.as_ref()
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
            .find(|d| d.name() == name)
            .ok_or_else(|| Error::UnknownDevice(name.to_owned()))
    }

    pub(crate) fn device_index(&self, name: &str) -> Result<usize, Error> {
        self.devices
            .iter()
            .position(|d| d.name() == name)
            .ok_or_else(|| Error::UnknownDevice(name.to_owned()))
    }

    /// Makes `ram` the guest RAM and sends its memory table to every working
    /// backend that wants memory (and, later, to every backend attached).
    /// Every backend gets the table even if an earlier one fails; the first
    /// failure is reported.
    pub fn set_memory(&mut self, ram: GuestRam) -> Result<(), Error> {
        let ram = Arc::new(ram);
        self.ram = Some(Arc::clone(&ram));
        let mut first_error = None;
        for dev in self.devices.iter().filter(|d| !d.is_failed()) {
            let result = match dev {
                Attached::Outboard(d) => d
                    .remote
                    .set_memory(ram.memory())
                    .map_err(dev_err(d.remote.name())),
                #[cfg(feature = "vhost-user")]
                Attached::VhostUser(v) => {
                    v.device
                        .set_memory(&ram)
                        .map_err(|source| Error::VhostUser {
                            name: v.device.name().to_owned(),
                            source,
                        })
                }
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The interrupt sink (socket mode), created with the first interrupt line.
    pub fn interrupt_sink(&mut self) -> Result<&InterruptSink, Error> {
        self.sink_mut().map(|s| &*s)
    }

    pub(crate) fn sink_mut(&mut self) -> Result<&mut InterruptSink, Error> {
        if self.sink.is_none() {
            self.sink = Some(InterruptSink::new().map_err(Error::Interrupts)?);
        }
        match self.sink.as_mut() {
            Some(s) => Ok(s),
            None => Err(Error::Interrupts(irq::Error::Create(
                std::io::Error::other("interrupt sink missing"),
            ))),
        }
    }

    /// Makes `registrar` consume doorbells (and routed interrupt lines) from
    /// now on: every doorbell of every placed region is registered at once,
    /// and placement, removal, attach and detach keep it in sync.
    pub fn set_registrar(&mut self, registrar: Arc<dyn Registrar>) -> Result<(), Error> {
        for dev in &self.devices {
            match dev {
                Attached::Outboard(d) => d
                    .remote
                    .register_all(registrar.as_ref())
                    .map_err(dev_err(d.remote.name()))?,
                #[cfg(feature = "vhost-user")]
                Attached::VhostUser(v) => {
                    if let Some(p) = &v.placed {
                        v.device
                            .register_kicks(registrar.as_ref(), p.addr, true)
                            .map_err(Error::Registrar)?;
                    }
                }
            }
        }
        self.registrar = Some(registrar);
        Ok(())
    }

    /// The registrar, if one is set.
    pub fn registrar(&self) -> Option<&Arc<dyn Registrar>> {
        self.registrar.as_ref()
    }

    /// Routes device `name`'s interrupt line `line` to interrupt `gsi`
    /// through the registrar (KVM_IRQFD); the socket-mode sink stops
    /// watching the line.
    pub fn route_irq(&mut self, name: &str, line: u32, gsi: u32) -> Result<(), Error> {
        let reg = self.registrar.clone().ok_or(Error::NoRegistrar)?;
        let irq = self
            .device(name)?
            .irq(line)
            .cloned()
            .ok_or_else(|| Error::NoIrq(name.to_owned(), line))?;
        if let Some(sink) = &self.sink {
            sink.remove_line(name, line);
        }
        reg.register_irqfd(gsi, irq.eventfd(), irq.resample_eventfd())
            .map_err(Error::Registrar)?;
        info!("{name}: interrupt line {line} is GSI {gsi}");
        Ok(())
    }

    fn device_options(&self, spec: &DeviceSpec) -> DeviceOptions {
        DeviceOptions {
            timeout: self.options.timeout,
            posted_writes: spec.posted_writes,
            vcpu_tokens: self.options.vcpu_tokens,
            restart: spec.restart,
            cmd_ring: spec.cmd_ring,
        }
    }

    /// Live upgrade of device `name`: replaces its running backend with
    /// `program` (a name or path, with the device's arguments) or, when
    /// `None`, the same program, under the running guest; no access is
    /// lost (see [`crate::device::Link::upgrade`]). Returns how long the
    /// device's accesses were held. Only spawned Outboard backends can be
    /// upgraded.
    pub fn upgrade(&self, name: &str, program: Option<&str>) -> Result<Duration, Error> {
        // Without the vhost-user feature Outboard devices are all there is.
        #[allow(irrefutable_let_patterns)]
        let Attached::Outboard(d) = self.device(name)?
        else {
            return Err(Error::NotUpgradable(name.to_owned()));
        };
        let Some(args) = d.args.clone() else {
            return Err(Error::NotUpgradable(name.to_owned()));
        };
        let spawner: Option<device::Spawner> = program.map(|p| {
            spawner(
                self.options.launcher.clone(),
                p.to_owned(),
                args,
                d.host_stream.clone(),
            )
        });
        d.remote
            .link()
            .upgrade(spawner)
            .map_err(|e| dev_err(name)(device::Error::Backend(e)))
    }

    /// Starts or connects to a backend, negotiates, connects its resources
    /// and places its regions. On any error the backend is shut down and
    /// nothing stays mapped.
    pub fn attach(&mut self, spec: &DeviceSpec) -> Result<&Attached, Error> {
        if self.devices.iter().any(|d| d.name() == spec.name) {
            return Err(Error::DuplicateName(spec.name.clone()));
        }
        let name = spec.name.as_str();
        if spec.host_stream.is_some() && !matches!(spec.source, Source::Spawn { .. }) {
            return Err(Error::HostStreamNotSpawned(name.to_owned()));
        }
        let options = self.device_options(spec);
        let mut spawn_args = None;
        let mut host_stream = None;
        let remote = match &spec.source {
            Source::Spawn { program, args } => {
                let mut args = args.clone();
                if !spec.sandbox {
                    args.push("--no-sandbox".to_owned());
                }
                let quiet = self.options.launcher.quiet_stdout;
                let launcher = self.options.launcher.clone();
                let program = program.clone();
                spawn_args = Some(args.clone());
                if let Some(path) = &spec.host_stream {
                    let hs = HostStream::listen(path, name).map_err(|e| {
                        dev_err(name)(device::Error::Backend(BackendError::HostStream(e)))
                    })?;
                    host_stream = Some(Arc::new(hs));
                }
                // The same program with the same arguments, each time the
                // device's backend is (re)started.
                let spawner = spawner(launcher, program, args, host_stream.clone());
                RemoteDevice::spawn_restartable(name, spawner, quiet, options)
                    .map_err(dev_err(name))?
            }
            Source::Connect { socket } => {
                RemoteDevice::connect(name, socket, options).map_err(dev_err(name))?
            }
            #[cfg(feature = "vhost-user")]
            Source::VhostUser { socket, device } => {
                return self.attach_vhost_user(spec, socket, device);
            }
            #[cfg(not(feature = "vhost-user"))]
            Source::VhostUser { .. } => return Err(Error::NoVhostUser(spec.name.clone())),
        };
        if let Some(p) = spec
            .regions
            .iter()
            .find(|p| p.index >= remote.info().num_regions)
        {
            return Err(Error::NoSuchRegion {
                name: name.to_owned(),
                index: p.index,
            });
        }
        let mut dev = OutboardDevice {
            remote,
            irqs: Vec::new(),
            args: spawn_args,
            host_stream,
        };
        let result = self
            .connect_resources(&mut dev)
            .and_then(|()| self.plan(name, &spec.regions, &dev.remote))
            .and_then(|plan| {
                for (index, addr) in plan {
                    self.place_region(&mut dev.remote, index, addr)?;
                }
                Ok(())
            });
        if let Err(e) = result {
            self.unmap_all(&mut dev.remote);
            if let Some(sink) = &self.sink {
                sink.remove_device(name);
            }
            return Err(e);
        }
        self.devices.push(Attached::Outboard(dev));
        let idx = self.devices.len() - 1;
        Ok(&self.devices[idx])
    }

    /// Sends memory, doorbells and interrupts to a freshly attached backend.
    fn connect_resources(&mut self, dev: &mut OutboardDevice) -> Result<(), Error> {
        let name = dev.remote.name().to_owned();
        if let Some(ram) = &self.ram {
            dev.remote
                .set_memory(ram.memory())
                .map_err(dev_err(&name))?;
        }
        for i in 0..dev.remote.doorbells().len() as u32 {
            let efd = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd)?;
            dev.remote
                .connect_doorbell(i, Arc::new(efd))
                .map_err(dev_err(&name))?;
        }
        let levels: Vec<bool> = dev
            .remote
            .irqs()
            .iter()
            .map(|i| i.flags & IRQ_LEVEL != 0)
            .collect();
        for (i, level) in levels.into_iter().enumerate() {
            let line: IrqLine = self
                .sink_mut()?
                .add_line(&name, i as u32, level)
                .map_err(Error::Interrupts)?;
            dev.remote
                .connect_irq(i as u32, line.eventfd(), line.resample_eventfd())
                .map_err(dev_err(&name))?;
            dev.irqs.push(line);
        }
        Ok(())
    }

    /// Resets device `name`.
    pub fn reset(&self, name: &str) -> Result<(), Error> {
        match self.device(name)? {
            Attached::Outboard(d) => d.remote.reset().map_err(dev_err(name)),
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(v) => v.device.reset().map_err(|source| Error::VhostUser {
                name: name.to_owned(),
                source,
            }),
        }
    }

    /// Returns once every device has served every access made so far
    /// (posted writes included); a VMM calls it when its guest stops.
    pub fn quiesce(&self) {
        self.mmio.quiesce();
        self.pio.quiesce();
    }

    /// Unmaps device `name` and shuts its backend down; returns a spawned
    /// backend's exit status.
    pub fn detach(&mut self, name: &str) -> Result<Option<ExitStatus>, Error> {
        let i = self.device_index(name)?;
        let dev = self.devices.remove(i);
        if let Some(sink) = &self.sink {
            sink.remove_device(name);
        }
        match dev {
            Attached::Outboard(mut d) => {
                self.unmap_all(&mut d.remote);
                Ok(d.remote.shutdown(self.options.timeout))
            }
            #[cfg(feature = "vhost-user")]
            Attached::VhostUser(v) => {
                self.unmap_vhost_user(&v);
                Ok(None)
            }
        }
    }

    /// Shuts every backend down, returning each device's name and a spawned
    /// backend's exit status.
    pub fn shutdown(&mut self) -> Vec<(String, Option<ExitStatus>)> {
        let names: Vec<String> = self.devices.iter().map(|d| d.name().to_owned()).collect();
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
