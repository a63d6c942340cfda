//! Attaching standard vhost-user backends through the convenience frontend.

use std::path::Path;
use std::sync::Arc;

use log::info;
use outboard_protocol::control::{DeviceInfo, DeviceKind, RegionInfo, REGION_READ, REGION_WRITE};
use outboard_protocol::Space;

use super::{Error, Frontend};
use crate::attached::{Attached, DeviceSpec, VhostUserAttached};
use crate::device::PlacedRegion;
use crate::health::Health;
use crate::vhost_user::{ConnectOptions, VhostUserDevice, VirtioType, MMIO_SIZE};

impl Frontend {
    /// Attaches a vhost-user backend behind a frontend-implemented
    /// virtio-mmio region.
    pub(super) fn attach_vhost_user(
        &mut self,
        spec: &DeviceSpec,
        socket: &Path,
        device: &str,
    ) -> Result<&Attached, Error> {
        let name = spec.name.clone();
        let vu = |source| Error::VhostUser {
            name: name.clone(),
            source,
        };
        let ty = VirtioType::parse(device).map_err(vu)?;
        let line = self
            .sink_mut()?
            .add_line(&name, 0, false)
            .map_err(Error::Interrupts)?;
        let connected = VhostUserDevice::connect(
            &name,
            socket,
            ty,
            self.ram.clone(),
            line.clone(),
            Health::new(&name),
            ConnectOptions {
                timeout: self.options.timeout,
                restart: spec.restart,
            },
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
            size: MMIO_SIZE,
            preferred_addr: 0,
            access_sizes: 0x0f,
            name: "virtio-mmio".into(),
        };
        let mut dev = VhostUserAttached {
            info: DeviceInfo {
                kind: DeviceKind(DeviceKind::VIRTIO_BASE + ty.id),
                num_regions: 1,
                num_doorbells: 0,
                num_irqs: 1,
                name: format!("vhost-user-{device}"),
            },
            regions: vec![region.clone()],
            placed: None,
            irq: line,
            device: Arc::clone(&vdev),
        };
        if let Err(e) = self.place_vhost_user(spec, &mut dev, &region) {
            if let Some(sink) = &self.sink {
                sink.remove_device(&name);
            }
            return Err(e);
        }
        self.devices.push(Attached::VhostUser(dev));
        let idx = self.devices.len() - 1;
        Ok(&self.devices[idx])
    }

    fn place_vhost_user(
        &mut self,
        spec: &DeviceSpec,
        dev: &mut VhostUserAttached,
        region: &RegionInfo,
    ) -> Result<(), Error> {
        let name = spec.name.as_str();
        let placement = spec.regions.iter().find(|p| p.index == 0);
        if placement.is_some_and(|p| p.skip) {
            return Ok(());
        }
        let addr = match placement.and_then(|p| p.addr) {
            Some(a) => a,
            None => {
                let align =
                    crate::allocator::RegionConstraint::natural_align(Space::Mmio, MMIO_SIZE);
                self.allocator
                    .allocate(Space::Mmio, MMIO_SIZE, align)
                    .map_err(|source| Error::NoAddress {
                        name: name.to_owned(),
                        index: 0,
                        source,
                    })?
            }
        };
        let placement_err = |source| Error::Placement {
            name: name.to_owned(),
            index: 0,
            source,
        };
        self.mmio
            .insert(
                addr,
                MMIO_SIZE,
                Arc::clone(&dev.device) as Arc<dyn crate::BusDevice>,
            )
            .map_err(placement_err)?;
        let _ = self.allocator.reserve(Space::Mmio, addr, MMIO_SIZE);
        if let Some(reg) = &self.registrar {
            if let Err(e) = dev.device.register_kicks(reg.as_ref(), addr, true) {
                let _ = self.mmio.remove(addr, MMIO_SIZE);
                self.allocator.free(Space::Mmio, addr, MMIO_SIZE);
                return Err(Error::Registrar(e));
            }
        }
        info!("{name}: vhost-user device at mmio {addr:#x}+{MMIO_SIZE:#x}");
        dev.placed = Some(PlacedRegion {
            info: region.clone(),
            addr,
            user_data: 0,
            posted: false,
            vcpu_tokens: 0,
        });
        Ok(())
    }

    /// Takes a vhost-user device off the bus and out of the registrar.
    pub(super) fn unmap_vhost_user(&mut self, v: &VhostUserAttached) {
        if let Some(p) = &v.placed {
            if let Some(reg) = &self.registrar {
                let _ = v.device.register_kicks(reg.as_ref(), p.addr, false);
            }
            let _ = self.mmio.remove(p.addr, MMIO_SIZE);
            self.allocator.free(Space::Mmio, p.addr, MMIO_SIZE);
        }
    }
}
