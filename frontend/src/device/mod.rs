//! The resource handshake with one Outboard backend, for VMMs that keep
//! their own bus, memory, allocator and interrupt routing.
//!
//! The flow follows rust-vmm's vm-device resources model:
//!
//! 1. **Connect and negotiate**: [`RemoteDevice::spawn`] or
//!    [`RemoteDevice::connect`] (HELLO, GET_DEVICE_INFO and every region,
//!    doorbell and interrupt description).
//! 2. **Constraints**: [`RemoteDevice::constraints`] says what each region
//!    needs (space, size, alignment, preferred address).
//! 3. **Allocation** is the VMM's: its own allocator, or
//!    [`crate::allocator::Allocator`].
//! 4. **Resources**: guest memory ([`RemoteDevice::set_memory`], any
//!    file-backed `GuestMemoryMmap`), doorbell eventfds
//!    ([`RemoteDevice::connect_doorbell`]) and interrupt eventfds
//!    ([`RemoteDevice::connect_irq`]), the VMM's own or fresh ones.
//! 5. **Assignment**: [`RemoteDevice::place`] sends SET_REGION with a fresh
//!    data socket and returns the [`RemoteRegion`] to put on the VMM's bus;
//!    [`RemoteDevice::remove`] takes it back (exact match). Both tell an
//!    optional [`Registrar`] so in-kernel doorbells follow the region.
//!
//! A transport or protocol failure marks the device failed (one logged
//! error, later accesses fail fast); a refused request fails only itself.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use log::info;
use outboard_protocol::control::{
    DeviceInfo, IrqInfo, MemTable, RegionInfo, F_DOORBELL, F_FAST_MMIO, F_IRQ, F_MEM_TABLE,
    F_POSTED_WRITES, F_VCPU_TOKENS, REGION_FAST_MMIO, REGION_POSTED_WRITES, REGION_PREFERRED_ADDR,
    REGION_READ, REGION_WRITE,
};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::allocator::RegionConstraint;
use crate::backend::{self, Connection};
use crate::health::Health;
use crate::memory;
use crate::registrar::Registrar;
use crate::remote::{DoorbellMatch, Permissions, RemoteRegion};

pub mod link;
mod types;

pub use link::{Link, Spawner};

use types::space_of;
pub use types::{AttachedDoorbell, DeviceOptions, PlacedRegion};

/// Most regions, doorbells or interrupt lines accepted from one backend.
pub const MAX_OBJECTS: u32 = 256;

/// Errors of the handshake with one backend.
#[derive(Debug, Error)]
pub enum Error {
    /// backend failed
    #[error("backend failed")]
    Backend(#[source] backend::Error),
    /// backend offers {0} regions, doorbells or interrupt lines, more than 256
    #[error("backend offers {0} regions, doorbells or interrupt lines, more than {MAX_OBJECTS}")]
    TooMany(u32),
    /// no region {0}
    #[error("no region {0}")]
    NoSuchRegion(u32),
    /// no doorbell {0}
    #[error("no doorbell {0}")]
    NoSuchDoorbell(u32),
    /// no interrupt line {0}
    #[error("no interrupt line {0}")]
    NoSuchIrq(u32),
    /// doorbell {index} names region {region}, which the backend does not have
    #[error("doorbell {index} names region {region}, which the backend does not have")]
    DoorbellRegion {
        /// Doorbell index.
        index: u32,
        /// Region named.
        region: u32,
    },
    /// region {index} is not placed at {addr:#x}
    #[error("region {index} is not placed at {addr:#x}")]
    NotPlaced {
        /// Region index.
        index: u32,
        /// Address given.
        addr: u64,
    },
    /// region {index} does not fit at {addr:#x}
    #[error("region {index} does not fit at {addr:#x}")]
    BadAddress {
        /// Region index.
        index: u32,
        /// Address given.
        addr: u64,
    },
    /// the device has failed
    #[error("the device has failed")]
    Failed,
    /// cannot create a data socket
    #[error("cannot create a data socket")]
    DataSocket(#[source] std::io::Error),
    /// the registrar refused a doorbell
    #[error("the registrar refused a doorbell")]
    Registrar(#[source] std::io::Error),
    /// cannot set up restarts
    #[error("cannot set up restarts")]
    StateArea(#[source] std::io::Error),
    /// guest memory cannot be shared
    #[error("guest memory cannot be shared")]
    Memory(#[source] memory::Error),
}

/// One negotiated Outboard backend.
#[derive(Debug)]
pub struct RemoteDevice {
    link: Arc<Link>,
    info: DeviceInfo,
    regions: Vec<RegionInfo>,
    doorbells: Vec<AttachedDoorbell>,
    irqs: Vec<IrqInfo>,
    placed: Vec<Option<PlacedRegion>>,
    health: Arc<Health>,
    options: DeviceOptions,
    next_user_data: u64,
}

impl RemoteDevice {
    /// Spawns `cmd` as the backend of device `name` and runs the handshake.
    pub fn spawn(
        name: &str,
        cmd: Command,
        quiet_stdout: bool,
        options: DeviceOptions,
    ) -> Result<Self, Error> {
        let conn = Connection::spawn(cmd, quiet_stdout, options.timeout).map_err(Error::Backend)?;
        Self::describe(name, conn, options)
    }

    /// Spawns the command `spawner` builds and runs the handshake; under
    /// an `on-failure` restart policy ([`DeviceOptions::restart`]) a dead
    /// backend is replaced by spawning it again (see [`link`]).
    pub fn spawn_restartable(
        name: &str,
        spawner: Spawner,
        quiet_stdout: bool,
        options: DeviceOptions,
    ) -> Result<Self, Error> {
        let cmd = spawner().map_err(Error::Backend)?;
        let conn = Connection::spawn(cmd, quiet_stdout, options.timeout).map_err(Error::Backend)?;
        Self::describe_with(name, conn, options, Some(spawner), quiet_stdout)
    }

    /// Connects to a backend listening at `path` and runs the handshake.
    pub fn connect(name: &str, path: &Path, options: DeviceOptions) -> Result<Self, Error> {
        let conn = Connection::connect(path, options.timeout).map_err(Error::Backend)?;
        Self::describe(name, conn, options)
    }

    /// Reads every description from a negotiated connection.
    pub fn describe(name: &str, conn: Connection, options: DeviceOptions) -> Result<Self, Error> {
        Self::describe_with(name, conn, options, None, false)
    }

    fn describe_with(
        name: &str,
        conn: Connection,
        options: DeviceOptions,
        spawner: Option<Spawner>,
        quiet: bool,
    ) -> Result<Self, Error> {
        let be = Error::Backend;
        let info = conn.device_info().map_err(be)?;
        let features = conn.negotiated().features;
        let count = info.num_regions.max(info.num_doorbells).max(info.num_irqs);
        if count > MAX_OBJECTS {
            return Err(Error::TooMany(count));
        }
        let regions = (0..info.num_regions)
            .map(|i| conn.region_info(i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(be)?;
        let mut doorbells = Vec::new();
        if features & F_DOORBELL != 0 {
            for index in 0..info.num_doorbells {
                let d = conn.doorbell_info(index).map_err(be)?;
                if d.region >= info.num_regions {
                    return Err(Error::DoorbellRegion {
                        index,
                        region: d.region,
                    });
                }
                doorbells.push(AttachedDoorbell {
                    info: d,
                    eventfd: None,
                });
            }
        }
        let irqs = if features & F_IRQ != 0 {
            (0..info.num_irqs)
                .map(|i| conn.irq_info(i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(be)?
        } else {
            Vec::new()
        };
        info!(
            "attached {name} ({}): {} kind {} with {} regions",
            conn.label(),
            info.name,
            info.kind.0,
            regions.len()
        );
        let health = Health::new(name);
        let link = Link::new(
            conn,
            spawner,
            quiet,
            options.restart,
            options.timeout,
            Arc::clone(&health),
            info.clone(),
            regions.clone(),
        );
        // The state area goes first: the backend keeps its state from the
        // start, so a restart at any moment finds a record.
        if let Some(area) = link.make_state_area().map_err(Error::StateArea)? {
            link.conn().set_state_area(area.0).map_err(be)?;
        }
        link.watch().map_err(Error::StateArea)?;
        Ok(RemoteDevice {
            link,
            placed: regions.iter().map(|_| None).collect(),
            info,
            regions,
            doorbells,
            irqs,
            health,
            options,
            next_user_data: 1,
        })
    }

    /// The device's name (as given to the handshake).
    pub fn name(&self) -> &str {
        self.health.name()
    }

    /// The backend's device description.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Every region the backend offers.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// Every doorbell the backend declared (empty unless negotiated).
    pub fn doorbells(&self) -> &[AttachedDoorbell] {
        &self.doorbells
    }

    /// Every interrupt line the backend declared (empty unless negotiated).
    pub fn irqs(&self) -> &[IrqInfo] {
        &self.irqs
    }

    /// True when placed region `index` carries its commands on a command
    /// ring (docs/protocol.md section 7.11) rather than its data socket.
    pub fn on_ring(&self, index: u32) -> bool {
        self.link.region(index).is_some_and(|r| r.on_ring())
    }

    /// Region `index` if it is placed.
    pub fn placed(&self, index: u32) -> Option<&PlacedRegion> {
        self.placed.get(index as usize).and_then(Option::as_ref)
    }

    /// The device's shared health.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The spawned backend's pid.
    pub fn pid(&self) -> Option<u32> {
        self.link.conn().pid()
    }

    /// Negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.link.conn().negotiated().features
    }

    /// The device's link: its current connection and restart state.
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// True when the backend wants guest memory (negotiated F_MEM_TABLE).
    pub fn wants_memory(&self) -> bool {
        self.features() & F_MEM_TABLE != 0
    }

    /// What each region needs from the VMM's allocator.
    pub fn constraints(&self) -> Vec<RegionConstraint> {
        self.regions
            .iter()
            .map(|r| RegionConstraint {
                index: r.index,
                space: space_of(r),
                size: r.size,
                align: RegionConstraint::natural_align(space_of(r), r.size),
                preferred: (r.flags & REGION_PREFERRED_ADDR != 0).then_some(r.preferred_addr),
            })
            .collect()
    }

    fn live(&self) -> Result<Arc<Connection>, Error> {
        if self.health.is_failed() {
            return Err(Error::Failed);
        }
        Ok(self.link.conn())
    }

    /// Wraps a backend error; anything but a refusal also fails the device.
    fn failed(&self, e: backend::Error) -> Error {
        if !matches!(e, backend::Error::Refused { .. }) {
            self.health.fail_ended(&e, self.link.conn().end_reason());
        }
        Error::Backend(e)
    }

    /// Sends a memory table and its fds, if the backend wants memory.
    pub fn set_memory_table(&self, table: &MemTable, fds: &[RawFd]) -> Result<(), Error> {
        if !self.wants_memory() {
            return Ok(());
        }
        self.live()?
            .set_mem_table(table, fds)
            .map_err(|e| self.failed(e))?;
        self.link.remember_mem(table, fds);
        Ok(())
    }

    /// Shares any file-backed guest memory, if the backend wants memory.
    pub fn set_memory<B: vm_memory::bitmap::Bitmap>(
        &self,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<(), Error> {
        if !self.wants_memory() {
            return Ok(());
        }
        let (table, fds) = memory::memory_table(mem).map_err(Error::Memory)?;
        self.set_memory_table(&table, &fds)
    }

    /// Hands doorbell `index` its eventfd. Connect doorbells before placing
    /// their region: the region's doorbell matching is fixed at placement.
    pub fn connect_doorbell(&mut self, index: u32, fd: Arc<EventFd>) -> Result<(), Error> {
        if index as usize >= self.doorbells.len() {
            return Err(Error::NoSuchDoorbell(index));
        }
        self.live()?
            .set_doorbell(index, fd.as_raw_fd())
            .map_err(|e| self.failed(e))?;
        self.link.remember_doorbell(index, &fd);
        self.doorbells[index as usize].eventfd = Some(fd);
        Ok(())
    }

    /// Hands interrupt line `index` its eventfd and, for a level line, its
    /// resample eventfd.
    pub fn connect_irq(
        &self,
        index: u32,
        fd: &EventFd,
        resample: Option<&EventFd>,
    ) -> Result<(), Error> {
        if index as usize >= self.irqs.len() {
            return Err(Error::NoSuchIrq(index));
        }
        self.live()?
            .set_irq(index, fd.as_raw_fd(), resample.map(AsRawFd::as_raw_fd))
            .map_err(|e| self.failed(e))?;
        self.link.remember_irq(index, fd, resample);
        Ok(())
    }

    /// Places region `index` at `addr`: SET_REGION with a fresh data socket.
    /// Returns the bus device for the VMM's bus; `registrar` (if any) learns
    /// the region's doorbells at their new addresses.
    pub fn place(
        &mut self,
        index: u32,
        addr: u64,
        registrar: Option<&dyn Registrar>,
    ) -> Result<Arc<RemoteRegion>, Error> {
        let info = self
            .regions
            .get(index as usize)
            .cloned()
            .ok_or(Error::NoSuchRegion(index))?;
        // A second placement of a placed region is the backend's to refuse
        // (RegionBusy): its placement table is the one that counts.
        if addr.checked_add(info.size - 1).is_none() {
            return Err(Error::BadAddress { index, addr });
        }
        let features = self.live()?.negotiated().features;
        let posted = self.options.posted_writes
            && features & F_POSTED_WRITES != 0
            && info.flags & REGION_POSTED_WRITES != 0;
        let vcpu_tokens = if features & F_VCPU_TOKENS != 0 {
            self.options.vcpu_tokens.min(0xffff)
        } else {
            0
        };
        let placed = PlacedRegion {
            info,
            addr,
            user_data: self.next_user_data,
            posted,
            vcpu_tokens,
        };
        let (ours, theirs) = UnixStream::pair().map_err(Error::DataSocket)?;
        self.live()?
            .set_region(&placed.set_region(), theirs.as_raw_fd())
            .map_err(|e| self.failed(e))?;
        // Our copy of the backend's end must go, or a dead backend would never read as EOF.
        drop(theirs);
        self.next_user_data += 1 + u64::from(vcpu_tokens);
        let region = match self.region_device(&placed, ours, features) {
            Ok(r) => r,
            Err(e) => {
                let _ = self.link.conn().remove_region(&placed.set_region());
                return Err(e);
            }
        };
        let region = Arc::new(region);
        let ring = region.start_ring();
        if let Some(reg) = registrar {
            if let Err(e) = self.register(reg, &placed, true) {
                let _ = self.link.conn().remove_region(&placed.set_region());
                return Err(e);
            }
        }
        self.link.remember_region(placed.set_region(), &region);
        info!(
            "{}: region {index} ({}) at {} {addr:#x}+{:#x}{}{}",
            self.name(),
            placed.info.name,
            placed.space(),
            placed.info.size,
            if posted { ", posted writes" } else { "" },
            if ring { ", command ring" } else { "" }
        );
        self.placed[index as usize] = Some(placed);
        Ok(region)
    }

    fn region_device(
        &self,
        placed: &PlacedRegion,
        sock: UnixStream,
        features: u64,
    ) -> Result<RemoteRegion, Error> {
        let info = &placed.info;
        let perms = Permissions {
            read: info.flags & REGION_READ != 0,
            write: info.flags & REGION_WRITE != 0,
            sizes: info.access_sizes,
        };
        let doorbells = self
            .doorbells
            .iter()
            .filter(|d| d.info.region == info.index)
            .filter_map(|d| {
                Some(DoorbellMatch {
                    offset: d.info.offset,
                    size: d.size(),
                    datamatch: d.datamatch(),
                    eventfd: Arc::clone(d.eventfd.as_ref()?),
                })
            })
            .collect();
        let fast_mmio = info.flags & REGION_FAST_MMIO != 0 && features & F_FAST_MMIO != 0;
        Ok(RemoteRegion::new(
            sock,
            info.index,
            placed.user_data,
            perms,
            Arc::clone(&self.health),
            self.options.timeout,
        )
        .map_err(Error::DataSocket)?
        .with_posted_writes(placed.posted)
        .with_vcpu_tokens(placed.vcpu_tokens)
        .with_doorbells(doorbells, fast_mmio)
        .with_control(Arc::downgrade(&self.link.conn()))
        .with_link(&self.link)
        .with_cmd_ring(self.options.cmd_ring))
    }

    /// Registers (or unregisters) the connected doorbells of a placed region.
    fn register(
        &self,
        registrar: &dyn Registrar,
        placed: &PlacedRegion,
        on: bool,
    ) -> Result<(), Error> {
        let mut done = Vec::new();
        for d in self
            .doorbells
            .iter()
            .filter(|d| d.info.region == placed.info.index)
        {
            let Some(fd) = &d.eventfd else { continue };
            let ev = d.io_event(placed.space(), placed.addr);
            let r = if on {
                registrar.register_ioevent(&ev, fd)
            } else {
                registrar.unregister_ioevent(&ev, fd)
            };
            match r {
                Ok(()) => done.push((ev, fd)),
                Err(e) if on => {
                    for (ev, fd) in done {
                        let _ = registrar.unregister_ioevent(&ev, fd);
                    }
                    return Err(Error::Registrar(e));
                }
                Err(e) => log::warn!("{}: unregistering a doorbell: {e}", self.name()),
            }
        }
        Ok(())
    }

    /// Registers the doorbells of every placed region with `registrar`
    /// (for a registrar that arrives after placement).
    pub fn register_all(&self, registrar: &dyn Registrar) -> Result<(), Error> {
        for p in self.placed.iter().flatten() {
            self.register(registrar, p, true)?;
        }
        Ok(())
    }

    /// Removes region `index`, which must be placed exactly at `addr`. Take
    /// the region off the VMM's bus first so no access can start; drop the
    /// [`RemoteRegion`] after this returns, so the backend never sees EOF on
    /// a region it still has placed.
    pub fn remove(
        &mut self,
        index: u32,
        addr: u64,
        registrar: Option<&dyn Registrar>,
    ) -> Result<(), Error> {
        let placed = match self.placed(index) {
            Some(p) if p.addr == addr => p.clone(),
            _ => return Err(Error::NotPlaced { index, addr }),
        };
        if let Some(reg) = registrar {
            self.register(reg, &placed, false)?;
        }
        self.placed[index as usize] = None;
        self.link.forget_region(index);
        self.live()?
            .remove_region(&placed.set_region())
            .map_err(|e| self.failed(e))?;
        info!("{}: region {index} removed from {addr:#x}", self.name());
        Ok(())
    }

    /// Unregisters every placed region's doorbells and forgets the
    /// placements (the device is going away).
    pub fn unplace_all(&mut self, registrar: Option<&dyn Registrar>) -> Vec<PlacedRegion> {
        let placed: Vec<PlacedRegion> = self.placed.iter_mut().filter_map(Option::take).collect();
        if let Some(reg) = registrar {
            for p in &placed {
                let _ = self.register(reg, p, false);
            }
        }
        placed
    }

    /// Resets the device.
    pub fn reset(&self) -> Result<(), Error> {
        self.live()?.reset().map_err(|e| self.failed(e))
    }

    /// Returns once the backend has served every access sent before the call.
    pub fn barrier(&self) -> Result<(), Error> {
        self.live()?.barrier().map_err(|e| self.failed(e))
    }

    /// Asks the backend to exit and returns a spawned backend's exit status
    /// (killed after `grace`).
    pub fn shutdown(&self, grace: Duration) -> Option<ExitStatus> {
        self.link.close();
        self.link.conn().shutdown(grace)
    }
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
        // No restart for a device that is going away.
        self.link.close();
    }
}
