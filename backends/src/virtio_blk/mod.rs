//! `outboard-virtio-blk`: a file-backed virtio block device (virtio device ID 2).
//!
//! Requests: read (IN), write (OUT), flush, get-id, discard and
//! write-zeroes (hole punching and zero ranges on the backing file). The
//! capacity is the backing file's size in 512-byte sectors (rounded down).
//! `--read-only` offers VIRTIO_BLK_F_RO and fails writes.
//!
//! Limits, as a production device states them (configuration space):
//! seg_max 126 data segments per request (a full request, header and status
//! included, is 128 descriptors: it fits QEMU's default 128-entry vhost-user
//! ring even without indirect descriptors, and any ring from 16 to 1024
//! entries with them, which both transports offer), size_max 1 MiB per
//! segment, 512-byte logical blocks with the backing file's block size as
//! the physical block (topology), discard and write-zeroes up to 2 GiB and
//! 32 ranges per request, write-zeroes with the unmap flag.
//!
//! Multiple queues (VIRTIO_BLK_F_MQ, `--num-queues N`, default 16, enough
//! for QEMU's default of one queue per vCPU in VMs of up to 16 vCPUs):
//! every queue is served on a thread of its own, in parallel
//! ([`outboard::virtio::QueueWorker`]), sharing the backing file through
//! positional reads and writes.
//!
//! Every request is checked before the file is touched: a request past the
//! capacity, with a data length that is not a whole number of sectors, or
//! whose header cannot be read completes with VIRTIO_BLK_S_IOERR; an unknown
//! type with VIRTIO_BLK_S_UNSUPP. A chain without a writable status byte
//! cannot be answered and sets DEVICE_NEEDS_RESET (see `outboard::virtio`).

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use outboard::virtio::{Memory, QueueError, QueueWorker, VirtioDevice};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;

mod requests;

use requests::{BlkQueue, Disk};

/// Sector size of the virtio block protocol.
pub const SECTOR: u64 = 512;
/// Largest number of data segments per request the device advertises.
pub const SEG_MAX: u32 = 126;
/// Largest segment the device advertises, in bytes.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest queue the driver may choose.
pub const QUEUE_SIZE_MAX: u16 = 1024;
/// Default number of request queues.
pub const DEFAULT_NUM_QUEUES: u16 = 16;
/// Largest number of request queues.
pub const MAX_NUM_QUEUES: u16 = 64;
/// Bytes moved between the file and guest memory per step of a request, so
/// that a guest cannot make the backend allocate what its chain claims.
const CHUNK: usize = 256 * 1024;
/// Largest discard or write-zeroes range, in sectors (2 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Largest number of ranges in one discard or write-zeroes request.
const MAX_DISCARD_SEG: u32 = 32;
/// Size of the configuration space this device fills (through write_zeroes_may_unmap).
const CONFIG_SIZE: usize = 60;

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
    /// Request queues, each served on its own thread (1 to 64).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_NUM_QUEUES,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_NUM_QUEUES)))]
    pub num_queues: u16,
}

/// The block device logic.
#[derive(Debug)]
pub struct Blk {
    disk: Arc<Disk>,
    num_queues: u16,
    /// Serves queues in the event loop (one queue, or one ready queue).
    inline: BlkQueue,
}

impl Blk {
    /// Opens the backing file.
    pub fn open(args: &BlkArgs) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!args.read_only)
            .open(&args.path)?;
        let meta = file.metadata()?;
        let capacity = meta.len() / SECTOR;
        let physical = meta.blksize().clamp(SECTOR, 1 << 16);
        let physical_block_exp = (physical / SECTOR).ilog2() as u8;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = args.serial.len().min(id.len());
        id[..n].copy_from_slice(&args.serial.as_bytes()[..n]);
        let disk = Arc::new(Disk {
            file,
            capacity,
            read_only: args.read_only,
            discard: !args.no_discard && !args.read_only,
            physical_block_exp,
            id,
        });
        Ok(Blk {
            inline: BlkQueue::new(Arc::clone(&disk)),
            disk,
            num_queues: args.num_queues.clamp(1, MAX_NUM_QUEUES),
        })
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let d = &self.disk;
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&d.capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        // Topology: physical block exponent, alignment offset 0, minimum
        // I/O one physical block (in logical blocks), no optimal size.
        c[24] = d.physical_block_exp;
        let min_io = 1u16 << d.physical_block_exp;
        c[26..28].copy_from_slice(&min_io.to_le_bytes());
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        if d.discard {
            c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
            c[44..48].copy_from_slice(&u32::from(min_io).to_le_bytes());
            c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
            c[56] = 1;
        }
        c
    }
}

impl VirtioDevice for Blk {
    fn syscalls(&self) -> &'static [i64] {
        // Reads and writes at offsets, flush, discard and write-zeroes.
        &[
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_fallocate,
        ]
    }

    fn name(&self) -> &str {
        "virtio-blk"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE_MAX; usize::from(self.num_queues)]
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_MQ);
        if self.disk.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.disk.discard {
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

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn reset(&mut self) {}

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError> {
        self.inline.process(queue, mem)
    }

    fn queue_worker(&mut self, _index: usize) -> Option<Box<dyn QueueWorker>> {
        (self.num_queues > 1)
            .then(|| Box::new(BlkQueue::new(Arc::clone(&self.disk))) as Box<dyn QueueWorker>)
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
                num_queues: 1,
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
