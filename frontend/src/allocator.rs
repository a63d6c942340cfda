//! Guest address allocation for device regions, on vm-allocator.
//!
//! A VMM with its own allocator asks each device for its
//! [`RegionConstraint`]s and assigns addresses itself; [`Allocator`] is the
//! default one the convenience [`crate::Frontend`] uses. It keeps one
//! vm-allocator `AddressAllocator` per address space for the pool that
//! automatic placement draws from (MMIO from [`MMIO_POOL_START`], ports from
//! [`PIO_POOL_START`] to 0xffff). Addresses chosen by the configuration or
//! preferred by the device are reserved in the pool when they fall inside
//! it, so automatic placement never hands them out twice; overlap with
//! ranges outside the pool is the bus's check.

use outboard_protocol::Space;
use thiserror::Error;
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

/// First MMIO address handed out when neither config nor backend chooses one.
pub const MMIO_POOL_START: u64 = 0xd000_0000;
/// First port handed out when neither config nor backend chooses one.
pub const PIO_POOL_START: u64 = 0x1000;
/// Last port of the PIO space.
pub const PIO_LAST: u64 = 0xffff;

/// Errors allocating or releasing guest addresses.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    /// no free {space} range of {size:#x} bytes aligned to {align:#x}
    #[error("no free {space} range of {size:#x} bytes aligned to {align:#x}")]
    Exhausted {
        /// Address space.
        space: Space,
        /// Bytes wanted.
        size: u64,
        /// Alignment wanted.
        align: u64,
    },
    /// {space} range {addr:#x}+{size:#x} is taken or invalid
    #[error("{space} range {addr:#x}+{size:#x} is taken or invalid")]
    Unavailable {
        /// Address space.
        space: Space,
        /// Address asked for.
        addr: u64,
        /// Bytes asked for.
        size: u64,
    },
}

/// What a region needs from the VMM's address allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionConstraint {
    /// Region index within the device.
    pub index: u32,
    /// Address space.
    pub space: Space,
    /// Size in bytes.
    pub size: u64,
    /// Required alignment of the base address (a power of two).
    pub align: u64,
    /// Where the device would like to be, if anywhere.
    pub preferred: Option<u64>,
}

impl RegionConstraint {
    /// The alignment Outboard uses for a region of `size` bytes: its size
    /// rounded up to a power of two, at least a page for MMIO.
    pub fn natural_align(space: Space, size: u64) -> u64 {
        let min = match space {
            Space::Mmio => 0x1000,
            Space::Pio => 1,
        };
        size.checked_next_power_of_two().unwrap_or(1 << 63).max(min)
    }
}

/// The default address allocator: one pool per address space.
#[derive(Debug)]
pub struct Allocator {
    mmio: AddressAllocator,
    pio: AddressAllocator,
}

impl Default for Allocator {
    fn default() -> Self {
        Self::new()
    }
}

fn pool(base: u64, last: u64) -> AddressAllocator {
    match AddressAllocator::new(base, last - base + 1) {
        Ok(a) => a,
        // Both pools are fixed, valid, non-empty ranges.
        Err(_) => unreachable_pool(),
    }
}

#[cold]
fn unreachable_pool() -> AddressAllocator {
    std::process::abort()
}

impl Allocator {
    /// Pools `MMIO_POOL_START..2^64-1` and `PIO_POOL_START..=0xffff`.
    pub fn new() -> Self {
        Allocator {
            mmio: pool(MMIO_POOL_START, u64::MAX - 1),
            pio: pool(PIO_POOL_START, PIO_LAST),
        }
    }

    fn pool(&mut self, space: Space) -> &mut AddressAllocator {
        match space {
            Space::Mmio => &mut self.mmio,
            Space::Pio => &mut self.pio,
        }
    }

    /// The lowest free, aligned range of `size` bytes in the pool.
    pub fn allocate(&mut self, space: Space, size: u64, align: u64) -> Result<u64, Error> {
        self.pool(space)
            .allocate(size, align, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|_| Error::Exhausted { space, size, align })
    }

    /// Reserves exactly `addr..addr+size` where it overlaps the pool (so
    /// automatic placement skips it). Returns whether anything was reserved;
    /// a range entirely outside the pool is the caller's to check.
    pub fn reserve(&mut self, space: Space, addr: u64, size: u64) -> Result<bool, Error> {
        let unavailable = Error::Unavailable { space, addr, size };
        let last = size
            .checked_sub(1)
            .and_then(|s| addr.checked_add(s))
            .ok_or(unavailable.clone())?;
        let pool = self.pool(space);
        if last < pool.base() || addr > pool.end() {
            return Ok(false);
        }
        if addr < pool.base() || last > pool.end() {
            // Straddles the pool's edge: refuse rather than reserve half.
            return Err(unavailable);
        }
        pool.allocate(size, 1, AllocPolicy::ExactMatch(addr))
            .map(|_| true)
            .map_err(|_| unavailable)
    }

    /// Gives back a range obtained from [`Allocator::allocate`] or reserved
    /// by [`Allocator::reserve`]; ranges outside the pool are ignored.
    pub fn free(&mut self, space: Space, addr: u64, size: u64) {
        let pool = self.pool(space);
        let Some(last) = size.checked_sub(1).and_then(|s| addr.checked_add(s)) else {
            return;
        };
        if addr < pool.base() || last > pool.end() {
            return;
        }
        if let Ok(r) = RangeInclusive::new(addr, last) {
            let _ = pool.free(&r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_when_ranges_taken_then_next_aligned_slot() {
        let mut a = Allocator::new();
        assert_eq!(a.allocate(Space::Mmio, 0x1000, 0x1000), Ok(MMIO_POOL_START));
        assert_eq!(
            a.allocate(Space::Mmio, 0x100, 0x1000),
            Ok(MMIO_POOL_START + 0x1000)
        );
        assert_eq!(
            a.reserve(Space::Mmio, MMIO_POOL_START + 0x2000, 0x10),
            Ok(true)
        );
        assert_eq!(
            a.allocate(Space::Mmio, 0x2000, 0x2000),
            Ok(MMIO_POOL_START + 0x4000)
        );
        a.free(Space::Mmio, MMIO_POOL_START, 0x1000);
        assert_eq!(a.allocate(Space::Mmio, 0x1000, 0x1000), Ok(MMIO_POOL_START));
    }

    #[test]
    fn reserve_when_taken_or_straddling_then_refused_outside_pool_ignored() {
        let mut a = Allocator::new();
        assert_eq!(a.reserve(Space::Pio, 0x3f8, 8), Ok(false), "below the pool");
        assert_eq!(a.reserve(Space::Pio, 0x1000, 8), Ok(true));
        assert!(a.reserve(Space::Pio, 0x1004, 8).is_err(), "overlap");
        assert!(a.reserve(Space::Pio, 0xff8, 0x10).is_err(), "straddles");
        assert!(a.reserve(Space::Pio, 0xfffe, 4).is_err(), "past the end");
        assert!(a.reserve(Space::Pio, u64::MAX, 2).is_err(), "wraps");
        a.free(Space::Pio, 0x1000, 8);
        assert_eq!(a.reserve(Space::Pio, 0x1004, 8), Ok(true));
    }

    #[test]
    fn allocate_when_pio_exhausted_then_error() {
        let mut a = Allocator::new();
        assert_eq!(a.allocate(Space::Pio, 0xf000, 1), Ok(0x1000));
        assert!(matches!(
            a.allocate(Space::Pio, 8, 8),
            Err(Error::Exhausted { .. })
        ));
        assert_eq!(RegionConstraint::natural_align(Space::Mmio, 0x10), 0x1000);
        assert_eq!(RegionConstraint::natural_align(Space::Pio, 6), 8);
    }
}
