//! `outboard-virtio-rng`: a virtio entropy device (virtio device ID 4).
//!
//! One request queue; every buffer the driver makes available is filled
//! with bytes from the OS random source (`/dev/urandom`), as many as its
//! writable descriptors hold.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::process::ExitCode;

use outboard::virtio::{drain_queue, Memory, QueueError, VirtioDevice};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;

/// `outboard-virtio-rng`: a virtio entropy device (no device options).
#[derive(Debug, clap::Args)]
pub struct RngArgs {}

/// The entropy device logic.
#[derive(Debug)]
pub struct Rng {
    source: File,
    buf: Vec<u8>,
}

/// Largest request size served from one read of the random source.
const CHUNK: usize = 64 * 1024;

impl Rng {
    /// Opens the OS random source.
    pub fn new() -> io::Result<Self> {
        Ok(Rng {
            source: File::open("/dev/urandom")?,
            buf: vec![0; CHUNK],
        })
    }
}

impl VirtioDevice for Rng {
    fn name(&self) -> &str {
        "virtio-rng"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn reset(&mut self) {}

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError> {
        let (source, buf) = (&mut self.source, &mut self.buf);
        drain_queue(queue, mem, |chain| {
            let mut writer = chain.writer(mem).map_err(QueueError::Buffers)?;
            let mut written = 0usize;
            while writer.available_bytes() > 0 {
                let n = writer.available_bytes().min(buf.len());
                source
                    .read_exact(&mut buf[..n])
                    .map_err(QueueError::Backend)?;
                io::Write::write_all(&mut writer, &buf[..n]).map_err(QueueError::Memory)?;
                written += n;
            }
            Ok(u32::try_from(written).unwrap_or(u32::MAX))
        })
    }
}

/// `main` of `outboard-virtio-rng`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    outboard::run_virtio("outboard-virtio-rng", args, |_: RngArgs| Rng::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn process_queue_when_buffer_available_then_filled_with_random_bytes() {
        let mem =
            Memory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap_or_else(|e| panic!("{e}"));
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let d = RawDescriptor::from(Descriptor::new(0x8000, 64, VRING_DESC_F_WRITE as u16, 0));
        mock.add_desc_chains(&[d], 0)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut q: Queue = mock.create_queue().unwrap_or_else(|e| panic!("{e}"));
        let mut rng = Rng::new().unwrap_or_else(|e| panic!("{e}"));
        assert!(rng
            .process_queue(0, &mut q, &mem)
            .unwrap_or_else(|e| panic!("{e}")));
        let used_len: u32 = mem
            .read_obj(GuestAddress(mock.used_addr().0 + 8))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(used_len, 64);
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(got, [0u8; 64], "64 random bytes are not all zero");
        assert!(
            !rng.process_queue(0, &mut q, &mem).unwrap_or(true),
            "nothing left"
        );
    }
}
