//! Device clients over the driver: virtio-blk requests and virtio-rng reads.

use outboard_protocol::AccessSize;
use vm_memory::{Bytes, GuestAddress};

use super::{Buffer, Error, GuestAllocator, VirtioMmioDriver};

/// Block requests through a [`VirtioMmioDriver`] bound to a virtio-blk device.
#[derive(Debug)]
pub struct BlkClient {
    /// The driver.
    pub driver: VirtioMmioDriver,
    header: u64,
    status: u64,
    data: u64,
    data_size: u32,
}

/// virtio-blk request types.
pub mod blk {
    /// Read.
    pub const T_IN: u32 = 0;
    /// Write.
    pub const T_OUT: u32 = 1;
    /// Flush.
    pub const T_FLUSH: u32 = 4;
    /// Device ID string.
    pub const T_GET_ID: u32 = 8;
    /// Discard.
    pub const T_DISCARD: u32 = 11;
    /// Write zeroes.
    pub const T_WRITE_ZEROES: u32 = 13;
    /// Status: success.
    pub const S_OK: u8 = 0;
    /// Status: I/O error.
    pub const S_IOERR: u8 = 1;
    /// Status: unsupported request.
    pub const S_UNSUPP: u8 = 2;
    /// Feature: read-only.
    pub const F_RO: u64 = 1 << 5;
    /// Feature: flush.
    pub const F_FLUSH: u64 = 1 << 9;
    /// Feature: discard.
    pub const F_DISCARD: u64 = 1 << 13;
    /// Feature: write zeroes.
    pub const F_WRITE_ZEROES: u64 = 1 << 14;
}

impl BlkClient {
    /// Wraps a driver; header, status and a data buffer of `data_size`
    /// bytes come from `alloc`.
    pub fn new(
        driver: VirtioMmioDriver,
        alloc: &mut GuestAllocator,
        data_size: u32,
    ) -> Result<Self, Error> {
        Ok(BlkClient {
            driver,
            header: alloc.alloc(16, 16)?,
            status: alloc.alloc(1, 1)?,
            data: alloc.alloc(u64::from(data_size), 4096)?,
            data_size,
        })
    }

    /// Capacity in sectors, from configuration space.
    pub fn capacity(&self) -> Result<u64, Error> {
        self.driver.config(0, AccessSize::B8)
    }

    /// Sends one request; `data` is (length, device writes); returns the status byte.
    pub fn raw(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> Result<u8, Error> {
        let mem = self.driver.ram().memory();
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(self.header))
            .map_err(Error::Memory)?;
        mem.write_obj(0xffu8, GuestAddress(self.status))
            .map_err(Error::Memory)?;
        let mut bufs = vec![Buffer::readable(self.header, 16)];
        if let Some((len, writes)) = data {
            bufs.push(Buffer {
                addr: self.data,
                len,
                device_writes: writes,
            });
        }
        bufs.push(Buffer::writable(self.status, 1));
        self.driver.request(0, &bufs)?;
        self.driver
            .ram()
            .memory()
            .read_obj(GuestAddress(self.status))
            .map_err(Error::Memory)
    }

    /// Reads `buf.len()` bytes (a multiple of 512) at `sector`; returns the status.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<u8, Error> {
        let len = self.len(buf.len())?;
        let s = self.raw(blk::T_IN, sector, Some((len, true)))?;
        self.driver
            .ram()
            .memory()
            .read_slice(buf, GuestAddress(self.data))
            .map_err(Error::Memory)?;
        Ok(s)
    }

    /// Writes `buf` at `sector`; returns the status.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<u8, Error> {
        let len = self.len(buf.len())?;
        self.driver
            .ram()
            .memory()
            .write_slice(buf, GuestAddress(self.data))
            .map_err(Error::Memory)?;
        self.raw(blk::T_OUT, sector, Some((len, false)))
    }

    /// Sends a discard or write-zeroes request with one 16-byte segment
    /// (`sector` u64, `num_sectors` u32, flags u32); returns the status.
    pub fn segment(&mut self, kind: u32, segment: &[u8; 16]) -> Result<u8, Error> {
        self.driver
            .ram()
            .memory()
            .write_slice(segment, GuestAddress(self.data))
            .map_err(Error::Memory)?;
        self.raw(kind, 0, Some((16, false)))
    }

    /// Flushes; returns the status.
    pub fn flush(&mut self) -> Result<u8, Error> {
        self.raw(blk::T_FLUSH, 0, None)
    }

    /// The device ID string; returns (status, id).
    pub fn get_id(&mut self) -> Result<(u8, String), Error> {
        let s = self.raw(blk::T_GET_ID, 0, Some((20, true)))?;
        let mut id = [0u8; 20];
        self.driver
            .ram()
            .memory()
            .read_slice(&mut id, GuestAddress(self.data))
            .map_err(Error::Memory)?;
        let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
        Ok((s, String::from_utf8_lossy(&id[..end]).into_owned()))
    }

    fn len(&self, n: usize) -> Result<u32, Error> {
        u32::try_from(n)
            .ok()
            .filter(|&l| l <= self.data_size)
            .ok_or(Error::OutOfMemory)
    }
}

/// Reads random bytes through a driver bound to a virtio-rng device.
pub fn rng_read(driver: &mut VirtioMmioDriver, buf_addr: u64, len: u32) -> Result<Vec<u8>, Error> {
    let got = driver.request(0, &[Buffer::writable(buf_addr, len)])?;
    let mut out = vec![0u8; got.min(len) as usize];
    driver
        .ram()
        .memory()
        .read_slice(&mut out, GuestAddress(buf_addr))
        .map_err(Error::Memory)?;
    Ok(out)
}
