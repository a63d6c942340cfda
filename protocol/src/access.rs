//! What one guest access is, independent of how it travels: the address
//! space a region lives in and the access context shared by the frontend's
//! bus devices and the backend's device models.

use crate::ioregionfd::AccessSize;

/// Which guest address space a region lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// Memory-mapped I/O.
    Mmio,
    /// x86 port I/O.
    Pio,
}

impl std::fmt::Display for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Space::Mmio => "mmio",
            Space::Pio => "pio",
        })
    }
}

/// One guest access: which region, where in it, how wide, and which vCPU
/// made it.
///
/// The same struct reaches a backend's device model (filled from the
/// ioregionfd command and its `user_data` token) and a frontend bus device
/// (filled by the bus, which knows the offset but not the region: a device
/// that serves several regions substitutes its own index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access {
    /// Region index within the device.
    pub region: u32,
    /// Offset from the start of the region.
    pub offset: u64,
    /// Access width.
    pub size: AccessSize,
    /// The vCPU that made the access, when known.
    pub vcpu: Option<u32>,
}

impl Access {
    /// An access of `size` at `offset` in region `region`, by no particular vCPU.
    pub fn new(region: u32, offset: u64, size: AccessSize) -> Self {
        Access {
            region,
            offset,
            size,
            vcpu: None,
        }
    }

    /// The same access, made by vCPU `vcpu`.
    pub fn by(mut self, vcpu: Option<u32>) -> Self {
        self.vcpu = vcpu;
        self
    }

    /// The same access, in region `region`.
    pub fn in_region(mut self, region: u32) -> Self {
        self.region = region;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_when_built_then_fields_follow_the_builder() {
        let a = Access::new(0, 8, AccessSize::B4).by(Some(3)).in_region(2);
        assert_eq!(
            a,
            Access {
                region: 2,
                offset: 8,
                size: AccessSize::B4,
                vcpu: Some(3)
            }
        );
        assert_eq!(Space::Pio.to_string(), "pio");
    }
}
