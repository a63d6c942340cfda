//! `outboard-virtio-blk`: a file-backed virtio block device (virtio device ID 2).
//!
//! One request queue. Requests: read (IN), write (OUT), flush, get-id,
//! discard and write-zeroes (hole punching and zero ranges on the backing
//! file). The capacity is the backing file's size in 512-byte sectors
//! (rounded down). `--read-only` offers VIRTIO_BLK_F_RO and fails writes.
//!
//! Every request is checked before the file is touched: a request past the
//! capacity, with a data length that is not a whole number of sectors, or
//! whose header cannot be read completes with VIRTIO_BLK_S_IOERR; an unknown
//! type with VIRTIO_BLK_S_UNSUPP. A chain without a writable status byte
//! cannot be answered and sets DEVICE_NEEDS_RESET (see `outboard::virtio`).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;

use log::warn;
use outboard::virtio::{drain_queue, Chain, Memory, QueueError, VirtioDevice};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;

/// Sector size of the virtio block protocol.
pub const SECTOR: u64 = 512;
/// Largest number of segments per request the device accepts.
const SEG_MAX: u32 = 128;
/// Bytes moved between the file and guest memory per step of a request, so
/// that a guest cannot make the backend allocate what its chain claims.
const CHUNK: usize = 256 * 1024;
/// Largest discard or write-zeroes request, in sectors.
const MAX_DISCARD_SECTORS: u32 = 1 << 22;

/// `outboard-virtio-blk`: a file-backed virtio block device.
#[derive(Debug, clap::Args)]
pub struct BlkArgs {
    /// Backing file (its size, rounded down to 512 bytes, is the capacity).
    #[arg(long, value_name = "PATH")]
    pub path: PathBuf,
    /// Offer a read-only device; writes fail with an I/O error.
    #[arg(long)]
    pub read_only: bool,
    /// Device ID string returned by GET_ID (at most 20 bytes).
    #[arg(long, default_value = "outboard-virtio-blk")]
    pub serial: String,
    /// Do not offer discard and write-zeroes.
    #[arg(long)]
    pub no_discard: bool,
}

/// The block device logic.
#[derive(Debug)]
pub struct Blk {
    file: File,
    capacity: u64,
    read_only: bool,
    discard: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    buf: Vec<u8>,
}

impl Blk {
    /// Opens the backing file.
    pub fn open(args: &BlkArgs) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!args.read_only)
            .open(&args.path)?;
        let capacity = file.metadata()?.len() / SECTOR;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = args.serial.len().min(id.len());
        id[..n].copy_from_slice(&args.serial.as_bytes()[..n]);
        Ok(Blk {
            file,
            capacity,
            read_only: args.read_only,
            discard: !args.no_discard && !args.read_only,
            id,
            buf: Vec::new(),
        })
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        if self.discard {
            c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&1u32.to_le_bytes());
            c[44..48].copy_from_slice(&1u32.to_le_bytes());
            c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[52..56].copy_from_slice(&1u32.to_le_bytes());
        }
        c
    }

    /// Byte offset of `sectors` sectors at `sector`, if inside the capacity.
    fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let start = sector.checked_mul(SECTOR)?;
        let end = start.checked_add(bytes)?;
        (bytes.is_multiple_of(SECTOR) && end <= self.capacity * SECTOR).then_some(start)
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
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                let Some(mut offset) = self.range(sector, len as u64) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                while writer.available_bytes() > 0 {
                    let n = writer.available_bytes().min(CHUNK);
                    self.buf.resize(n, 0);
                    if let Err(e) = self.file.read_exact_at(&mut self.buf, offset) {
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
                let Some(mut offset) = self.range(sector, len as u64) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                while reader.available_bytes() > 0 {
                    let n = reader.available_bytes().min(CHUNK);
                    self.buf.resize(n, 0);
                    if reader.read_exact(&mut self.buf).is_err() {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    if let Err(e) = self.file.write_all_at(&self.buf, offset) {
                        warn!("write at sector {sector}: {e}");
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    offset += n as u64;
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    warn!("flush: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(self.id.len());
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if self.discard => {
                (self.discard_or_zero(kind, reader), 0)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    fn discard_or_zero(&mut self, kind: u32, reader: &mut virtio_queue::Reader<'_>) -> u32 {
        while reader.available_bytes() > 0 {
            let Ok(seg) = reader.read_obj::<[u8; 16]>() else {
                return VIRTIO_BLK_S_IOERR;
            };
            let sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            if sectors > MAX_DISCARD_SECTORS {
                return VIRTIO_BLK_S_IOERR;
            }
            let bytes = u64::from(sectors) * SECTOR;
            let Some(offset) = self.range(sector, bytes) else {
                return VIRTIO_BLK_S_IOERR;
            };
            let mode = if kind == VIRTIO_BLK_T_DISCARD {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            // SAFETY: fallocate only takes integers; the range was checked
            // against the file's capacity above.
            let rc = unsafe {
                libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, bytes as i64)
            };
            if rc != 0 {
                warn!(
                    "{}: {}",
                    if kind == VIRTIO_BLK_T_DISCARD {
                        "discard"
                    } else {
                        "write zeroes"
                    },
                    io::Error::last_os_error()
                );
                return VIRTIO_BLK_S_IOERR;
            }
        }
        VIRTIO_BLK_S_OK
    }
}

impl VirtioDevice for Blk {
    fn name(&self) -> &str {
        "virtio-blk"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256]
    }

    fn features(&self) -> u64 {
        let mut f =
            (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.discard {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn reset(&mut self) {}

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError> {
        drain_queue(queue, mem, |chain| self.serve(chain, mem))
    }
}

/// `main` of `outboard-virtio-blk`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    outboard::run_virtio("outboard-virtio-blk", args, |a: BlkArgs| Blk::open(&a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x8000;
    const DATA: u64 = 0x9000;
    const STATUS: u64 = 0xa000;

    /// A backing file of 4 sectors, byte `i` holding `i / 512` (the sector number).
    struct Image(PathBuf);

    impl Image {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("outboard-blk-{name}-{}", std::process::id()));
            let bytes: Vec<u8> = (0..4 * SECTOR).map(|i| (i / SECTOR) as u8).collect();
            std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{e}"));
            Image(p)
        }
        fn open(&self, read_only: bool) -> Blk {
            Blk::open(&BlkArgs {
                path: self.0.clone(),
                read_only,
                serial: "disk-7".into(),
                no_discard: false,
            })
            .unwrap_or_else(|e| panic!("{e}"))
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn memory() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    /// Serves one request of `kind` at `sector` with `len` data bytes
    /// (`data_flags`: 0 for a buffer the device reads, WRITE for one it
    /// fills); returns the status byte and the used length.
    fn request(
        blk: &mut Blk,
        mem: &Memory,
        kind: u32,
        sector: u64,
        len: u32,
        data_flags: u32,
    ) -> (u8, u32) {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR))
            .unwrap_or_else(|e| panic!("{e}"));
        let mock = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        let chain = [
            desc(HDR, 16, VRING_DESC_F_NEXT, 1),
            desc(DATA, len, data_flags | VRING_DESC_F_NEXT, 2),
            desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
        ];
        mock.add_desc_chains(&chain, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut q: Queue = mock.create_queue().unwrap_or_else(|e| panic!("{e}"));
        assert!(blk
            .process_queue(0, &mut q, mem)
            .unwrap_or_else(|e| panic!("{e}")));
        let status: u8 = mem
            .read_obj(GuestAddress(STATUS))
            .unwrap_or_else(|e| panic!("{e}"));
        let used_len: u32 = mem
            .read_obj(GuestAddress(mock.used_addr().0 + 8))
            .unwrap_or_else(|e| panic!("{e}"));
        (status, used_len)
    }

    #[test]
    fn read_when_inside_capacity_then_sector_data_and_ok() {
        let img = Image::new("read");
        let mut blk = img.open(false);
        let mem = memory();
        let (status, used) = request(&mut blk, &mem, VIRTIO_BLK_T_IN, 2, 512, VRING_DESC_F_WRITE);
        assert_eq!(u32::from(status), VIRTIO_BLK_S_OK);
        assert_eq!(used, 513, "data and status");
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, [2u8; 512]);
    }

    #[test]
    fn write_when_read_only_or_past_capacity_then_ioerr_and_file_untouched() {
        let img = Image::new("write");
        let mem = memory();
        mem.write_slice(&[0xee; 512], GuestAddress(DATA))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut ro = img.open(true);
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let (status, _) = request(&mut ro, &mem, VIRTIO_BLK_T_OUT, 0, 512, 0);
        assert_eq!(u32::from(status), VIRTIO_BLK_S_IOERR);
        let mut rw = img.open(false);
        let (status, _) = request(&mut rw, &mem, VIRTIO_BLK_T_OUT, 4, 512, 0);
        assert_eq!(u32::from(status), VIRTIO_BLK_S_IOERR, "past the end");
        let (status, _) = request(&mut rw, &mem, VIRTIO_BLK_T_OUT, 1, 512, 0);
        assert_eq!(u32::from(status), VIRTIO_BLK_S_OK);
        let file = std::fs::read(&img.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&file[512..1024], &[0xee; 512][..]);
        assert_eq!(file[0], 0);
    }

    #[test]
    fn get_id_and_unknown_type_when_requested_then_serial_and_unsupp() {
        let img = Image::new("id");
        let mut blk = img.open(false);
        let mem = memory();
        let (status, used) = request(
            &mut blk,
            &mem,
            VIRTIO_BLK_T_GET_ID,
            0,
            20,
            VRING_DESC_F_WRITE,
        );
        assert_eq!(u32::from(status), VIRTIO_BLK_S_OK);
        assert_eq!(used, 21);
        let mut id = [0u8; 6];
        mem.read_slice(&mut id, GuestAddress(DATA))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&id, b"disk-7");
        let (status, _) = request(&mut blk, &mem, 99, 0, 8, VRING_DESC_F_WRITE);
        assert_eq!(u32::from(status), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn config_when_read_then_capacity_in_sectors() {
        let img = Image::new("config");
        let blk = img.open(false);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 4);
        let mut past = [0xffu8; 4];
        blk.read_config(200, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn chain_when_no_writable_status_then_queue_error() {
        let img = Image::new("nostatus");
        let mut blk = img.open(false);
        let mem = memory();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        mock.add_desc_chains(&[desc(HDR, 16, 0, 0)], 0)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut q: Queue = mock.create_queue().unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            blk.process_queue(0, &mut q, &mem),
            Err(QueueError::Chain("no writable status byte"))
        ));
    }
}
