//! Planning and placing regions: addresses from the spec, the backend's
//! preference or the allocator, checked as a whole before anything is
//! placed.

use outboard_protocol::Space;

use super::{dev_err, Error, Frontend};
use crate::allocator;
use crate::attached::Placement;
use crate::bus::BusError;
use crate::device::RemoteDevice;

impl Frontend {
    /// Chooses an address for every region to place and checks the whole
    /// plan for overlaps (with the buses and within itself) before anything
    /// is placed. Addresses come from the placement, else the backend's
    /// preference, else the allocator.
    pub(crate) fn plan(
        &mut self,
        name: &str,
        placements: &[Placement],
        dev: &RemoteDevice,
    ) -> Result<Vec<(u32, u64)>, Error> {
        let mut plan: Vec<(u32, u64)> = Vec::new();
        let mut reserved: Vec<(Space, u64, u64)> = Vec::new();
        let result = (|| {
            for c in dev.constraints() {
                let placement = placements.iter().find(|p| p.index == c.index);
                if placement.is_some_and(|p| p.skip) {
                    continue;
                }
                let wanted = placement.and_then(|p| p.addr).or(c.preferred);
                let no_address = |source| Error::NoAddress {
                    name: name.to_owned(),
                    index: c.index,
                    source,
                };
                let addr = match wanted {
                    Some(a) => a,
                    None => {
                        let a = self
                            .allocate_free(c.space, c.size, c.align)
                            .map_err(no_address)?;
                        reserved.push((c.space, a, c.size));
                        a
                    }
                };
                let placement_err = |source| Error::Placement {
                    name: name.to_owned(),
                    index: c.index,
                    source,
                };
                self.bus(c.space)
                    .check_free(addr, c.size)
                    .map_err(placement_err)?;
                let end = addr.saturating_add(c.size);
                if let Some(&(_, b, l)) = plan_ranges(&plan, dev)
                    .iter()
                    .find(|&&(s, b, l)| s == c.space && addr < b.saturating_add(l) && b < end)
                {
                    return Err(placement_err(BusError::Overlap {
                        space: c.space,
                        base: addr,
                        len: c.size,
                        other_base: b,
                        other_len: l,
                    }));
                }
                if wanted.is_some()
                    && self
                        .allocator
                        .reserve(c.space, addr, c.size)
                        .map_err(no_address)?
                {
                    reserved.push((c.space, addr, c.size));
                }
                plan.push((c.index, addr));
            }
            Ok(())
        })();
        // The placements reserve again as they map; the plan only checks.
        for (space, addr, size) in reserved {
            self.allocator.free(space, addr, size);
        }
        result.map(|()| plan)
    }

    /// An allocator address that is also free on the bus (a range placed
    /// outside the allocator's knowledge is skipped).
    fn allocate_free(
        &mut self,
        space: Space,
        size: u64,
        align: u64,
    ) -> Result<u64, allocator::Error> {
        let mut taken = Vec::new();
        let found = loop {
            match self.allocator.allocate(space, size, align) {
                Ok(a) if self.bus(space).check_free(a, size).is_ok() => break Ok(a),
                Ok(a) => taken.push(a),
                Err(e) => break Err(e),
            }
        };
        for a in taken {
            self.allocator.free(space, a, size);
        }
        found
    }

    /// Places one planned region: SET_REGION, then the bus and the allocator.
    pub(crate) fn place_region(
        &mut self,
        dev: &mut RemoteDevice,
        index: u32,
        addr: u64,
    ) -> Result<(), Error> {
        let name = dev.name().to_owned();
        let registrar = self.registrar.clone();
        let region = dev
            .place(index, addr, registrar.as_deref())
            .map_err(dev_err(&name))?;
        let size = region_size(dev, index);
        let space = region_space(dev, index);
        if let Err(source) = self.bus(space).insert(addr, size, region) {
            let _ = dev.remove(index, addr, registrar.as_deref());
            return Err(Error::Placement {
                name,
                index,
                source,
            });
        }
        let _ = self.allocator.reserve(space, addr, size);
        Ok(())
    }

    /// Takes every placed region of `dev` off its bus and out of the allocator.
    pub(crate) fn unmap_all(&mut self, dev: &mut RemoteDevice) {
        let registrar = self.registrar.clone();
        for p in dev.unplace_all(registrar.as_deref()) {
            let _ = self.bus(p.space()).remove(p.addr, p.info.size);
            self.allocator.free(p.space(), p.addr, p.info.size);
        }
    }
}

fn region_size(dev: &RemoteDevice, index: u32) -> u64 {
    dev.regions().get(index as usize).map_or(1, |r| r.size)
}

fn region_space(dev: &RemoteDevice, index: u32) -> Space {
    match dev.regions().get(index as usize) {
        Some(r) if r.is_pio() => Space::Pio,
        _ => Space::Mmio,
    }
}

/// `(space, base, size)` of every region already in `plan`.
fn plan_ranges(plan: &[(u32, u64)], dev: &RemoteDevice) -> Vec<(Space, u64, u64)> {
    plan.iter()
        .map(|&(i, a)| (region_space(dev, i), a, region_size(dev, i)))
        .collect()
}
