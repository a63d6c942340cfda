//! Moving regions of attached devices at run time: place one region, remove
//! one exactly (a region moves by removal and re-placement).

use outboard_protocol::Space;

use super::{dev_err, Error, Frontend};
use crate::attached::Placement;

impl Frontend {
    /// Places region `index` of device `name` at `addr` (or automatically);
    /// returns the address. The registrar, if any, learns its doorbells.
    pub fn set_region(&mut self, name: &str, index: u32, addr: Option<u64>) -> Result<u64, Error> {
        let i = self.device_index(name)?;
        let mut attached = self.devices.remove(i);
        let result = (|| {
            let dev = attached
                .outboard_mut()
                .ok_or_else(|| Error::NotOutboard(name.to_owned()))?;
            if index >= dev.remote.info().num_regions {
                return Err(Error::NoSuchRegion {
                    name: name.to_owned(),
                    index,
                });
            }
            // Place only region `index`: at `addr`, or wherever placement would put it.
            let placements: Vec<Placement> = (0..dev.remote.info().num_regions)
                .map(|r| Placement {
                    index: r,
                    addr: if r == index { addr } else { None },
                    skip: r != index,
                })
                .collect();
            let plan = self.plan(name, &placements, &dev.remote)?;
            let &(_, at) = plan.first().ok_or(Error::NoSuchRegion {
                name: name.to_owned(),
                index,
            })?;
            self.place_region(&mut dev.remote, index, at)?;
            Ok(at)
        })();
        self.devices.insert(i, attached);
        result
    }

    /// Removes region `index` of device `name`, which must be placed exactly
    /// at `addr`: off the bus first (no new access can start), then the
    /// registrar and the backend; the data socket closes last, so the
    /// backend never sees EOF on a region it still has placed.
    pub fn remove_region(&mut self, name: &str, index: u32, addr: u64) -> Result<(), Error> {
        let i = self.device_index(name)?;
        let registrar = self.registrar.clone();
        let (space, size) = {
            let dev = self.devices[i]
                .remote()
                .ok_or_else(|| Error::NotOutboard(name.to_owned()))?;
            match dev.placed(index) {
                Some(p) if p.addr == addr => (p.space(), p.info.size),
                _ => {
                    return Err(dev_err(name)(crate::device::Error::NotPlaced {
                        index,
                        addr,
                    }));
                }
            }
        };
        let bus = match space {
            Space::Mmio => &self.mmio,
            Space::Pio => &self.pio,
        };
        let region = bus.remove(addr, size).map_err(|source| Error::Placement {
            name: name.to_owned(),
            index,
            source,
        })?;
        self.allocator.free(space, addr, size);
        let dev = self.devices[i]
            .outboard_mut()
            .ok_or_else(|| Error::NotOutboard(name.to_owned()))?;
        let result = dev
            .remote
            .remove(index, addr, registrar.as_deref())
            .map_err(dev_err(name));
        drop(region);
        result
    }
}
