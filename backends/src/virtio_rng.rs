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
