//! Serving virtio-blk requests: the backing file shared by every queue
//! ([`Disk`]) and one queue's server ([`BlkQueue`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use log::warn;
use outboard::virtio::{drain_queue, Chain, Memory, QueueError, QueueWorker};
use virtio_bindings::virtio_blk::*;
use virtio_queue::Queue;

use super::{CHUNK, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR};

/// The backing file and what the device offers, shared by every queue.
#[derive(Debug)]
pub(super) struct Disk {
    pub(super) file: File,
    pub(super) capacity: u64,
    pub(super) read_only: bool,
    pub(super) discard: bool,
    /// Physical block size as a power of two of logical blocks.
    pub(super) physical_block_exp: u8,
    pub(super) id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

/// One request queue's server: the shared disk and a bounce buffer.
#[derive(Debug)]
pub(super) struct BlkQueue {
    disk: Arc<Disk>,
    buf: Vec<u8>,
}

impl Disk {
    /// Byte offset of `bytes` bytes at `sector`, if inside the capacity.
    pub(super) fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let start = sector.checked_mul(SECTOR)?;
        let end = start.checked_add(bytes)?;
        (bytes.is_multiple_of(SECTOR) && end <= self.capacity * SECTOR).then_some(start)
    }

    /// fallocate(`mode`) over `bytes` at `offset`.
    fn fallocate(&self, mode: i32, offset: u64, bytes: u64) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(bytes)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only takes integers and our own open fd; the
        // range was checked against the file's capacity by the caller.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Makes `bytes` at `offset` read as zeroes: a zero range (or a hole
    /// when `unmap`), falling back to a hole and then to writing zeroes on
    /// file systems without them (tmpfs has no zero range).
    fn zero(&self, offset: u64, bytes: u64, unmap: bool, buf: &mut Vec<u8>) -> io::Result<()> {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | keep;
        let first = if unmap {
            punch
        } else {
            libc::FALLOC_FL_ZERO_RANGE | keep
        };
        match self.fallocate(first, offset, bytes) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            other => return other,
        }
        match self.fallocate(punch, offset, bytes) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            other => return other,
        }
        buf.clear();
        buf.resize(CHUNK, 0);
        let mut done = 0;
        while done < bytes {
            let n = (bytes - done).min(CHUNK as u64) as usize;
            self.file.write_all_at(&buf[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl BlkQueue {
    pub(super) fn new(disk: Arc<Disk>) -> Self {
        BlkQueue {
            disk,
            buf: Vec::new(),
        }
    }

    /// Serves one request; returns the bytes written into the chain.
    fn serve(&mut self, chain: Chain<'_>, mem: &Memory) -> Result<u32, QueueError> {
        let mut reader = chain.clone().reader(mem).map_err(QueueError::Buffers)?;
        let mut writer = chain.writer(mem).map_err(QueueError::Buffers)?;
        let avail = writer.available_bytes();
        if avail == 0 {
            return Err(QueueError::Chain("no writable status byte"));
        }
        let mut status_writer = writer.split_at(avail - 1).map_err(QueueError::Buffers)?;
        let (status, data_len) = match reader.read_obj::<[u8; 16]>() {
            Ok(h) => {
                let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                let sector =
                    u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
                self.request(kind, sector, &mut reader, &mut writer)
            }
            Err(_) => (VIRTIO_BLK_S_IOERR, 0),
        };
        status_writer
            .write_all(&[status as u8])
            .map_err(QueueError::Memory)?;
        Ok(u32::try_from(data_len + 1).unwrap_or(u32::MAX))
    }

    /// Carries out a request: (status, bytes written to the guest before the status).
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> (u32, usize) {
        let disk = &*self.disk;
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                let Some(mut offset) = disk.range(sector, len as u64) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                while writer.available_bytes() > 0 {
                    let n = writer.available_bytes().min(CHUNK);
                    self.buf.resize(n, 0);
                    if let Err(e) = disk.file.read_exact_at(&mut self.buf, offset) {
                        warn!("read at sector {sector}: {e}");
                        return (VIRTIO_BLK_S_IOERR, writer.bytes_written());
                    }
                    if writer.write_all(&self.buf).is_err() {
                        return (VIRTIO_BLK_S_IOERR, writer.bytes_written());
                    }
                    offset += n as u64;
                }
                (VIRTIO_BLK_S_OK, len)
            }
            VIRTIO_BLK_T_OUT => {
                let len = reader.available_bytes();
                let Some(mut offset) = disk.range(sector, len as u64) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                if disk.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                while reader.available_bytes() > 0 {
                    let n = reader.available_bytes().min(CHUNK);
                    self.buf.resize(n, 0);
                    if reader.read_exact(&mut self.buf).is_err() {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    if let Err(e) = disk.file.write_all_at(&self.buf, offset) {
                        warn!("write at sector {sector}: {e}");
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    offset += n as u64;
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => match disk.file.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    warn!("flush: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(disk.id.len());
                match writer.write_all(&disk.id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if disk.discard => {
                (self.discard_or_zero(kind, reader), 0)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Serves the ranges of a discard or write-zeroes request: each is
    /// checked (size, capacity, flags) before any is applied.
    fn discard_or_zero(&mut self, kind: u32, reader: &mut virtio_queue::Reader<'_>) -> u32 {
        let n = reader.available_bytes() / 16;
        if n == 0 || !reader.available_bytes().is_multiple_of(16) || n > MAX_DISCARD_SEG as usize {
            return VIRTIO_BLK_S_IOERR;
        }
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            let Ok(seg) = reader.read_obj::<[u8; 16]>() else {
                return VIRTIO_BLK_S_IOERR;
            };
            let sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                || (kind == VIRTIO_BLK_T_DISCARD && unmap)
            {
                return VIRTIO_BLK_S_UNSUPP;
            }
            if sectors > MAX_DISCARD_SECTORS {
                return VIRTIO_BLK_S_IOERR;
            }
            let bytes = u64::from(sectors) * SECTOR;
            let Some(offset) = self.disk.range(sector, bytes) else {
                return VIRTIO_BLK_S_IOERR;
            };
            ranges.push((offset, bytes, unmap));
        }
        for (offset, bytes, unmap) in ranges {
            let result = if kind == VIRTIO_BLK_T_DISCARD {
                // A discarded range reads back as zeroes on this device.
                self.disk.zero(offset, bytes, true, &mut self.buf)
            } else {
                self.disk.zero(offset, bytes, unmap, &mut self.buf)
            };
            if let Err(e) = result {
                let what = if kind == VIRTIO_BLK_T_DISCARD {
                    "discard"
                } else {
                    "write zeroes"
                };
                warn!("{what} of {bytes} bytes at {offset}: {e}");
                return VIRTIO_BLK_S_IOERR;
            }
        }
        VIRTIO_BLK_S_OK
    }
}

impl QueueWorker for BlkQueue {
    fn process(&mut self, queue: &mut Queue, mem: &Memory) -> Result<bool, QueueError> {
        drain_queue(queue, mem, |chain| self.serve(chain, mem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, sectors: u64) -> (Disk, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("outboard-blkreq-{name}-{}", std::process::id()));
        std::fs::write(&p, vec![0xee; (sectors * SECTOR) as usize])
            .unwrap_or_else(|e| panic!("{e}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("{e}"));
        let d = Disk {
            file,
            capacity: sectors,
            read_only: false,
            discard: true,
            physical_block_exp: 3,
            id: [0; VIRTIO_BLK_ID_BYTES as usize],
        };
        (d, p)
    }

    #[test]
    fn range_when_past_capacity_overflowing_or_partial_sector_then_none() {
        let (d, p) = disk("range", 8);
        assert_eq!(d.range(2, 1024), Some(1024));
        assert_eq!(d.range(7, 512), Some(7 * 512));
        assert_eq!(d.range(7, 1024), None, "past the end");
        assert_eq!(d.range(0, 100), None, "not whole sectors");
        assert_eq!(d.range(u64::MAX, 512), None, "overflow");
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn zero_when_unmap_or_not_then_range_reads_zero_and_rest_untouched() {
        let (d, p) = disk("zero", 64);
        let mut buf = Vec::new();
        d.zero(8 * SECTOR, 8 * SECTOR, false, &mut buf)
            .unwrap_or_else(|e| panic!("{e}"));
        d.zero(32 * SECTOR, 16 * SECTOR, true, &mut buf)
            .unwrap_or_else(|e| panic!("{e}"));
        let f = std::fs::read(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.len(), 64 * 512, "size kept");
        let s = SECTOR as usize;
        assert!(f[..8 * s].iter().all(|&b| b == 0xee));
        assert!(f[8 * s..16 * s].iter().all(|&b| b == 0));
        assert!(f[16 * s..32 * s].iter().all(|&b| b == 0xee));
        assert!(f[32 * s..48 * s].iter().all(|&b| b == 0));
        assert!(f[48 * s..].iter().all(|&b| b == 0xee));
        let _ = std::fs::remove_file(p);
    }
}
