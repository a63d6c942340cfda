//! Virtio devices in their own processes, driven by the test guest's
//! virtio-mmio driver through the frontend's bus and shared guest RAM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::time::Duration;

use outboard_frontend::guest::{
    blk, rng_read, BlkClient, Buffer, GuestAllocator, VirtioMmioDriver,
};
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{DeviceSpec, Frontend};
use outboard_tests::frontend;

const T: Duration = Duration::from_secs(10);
const RAM: u64 = 32 << 20;

struct Guest {
    fe: Frontend,
    alloc: GuestAllocator,
}

fn guest() -> Guest {
    let mut fe = frontend(T);
    fe.set_memory(GuestRam::new(&[(0, RAM)]).unwrap()).unwrap();
    Guest {
        fe,
        alloc: GuestAllocator::new(0x1000, RAM - 0x1000),
    }
}

impl Guest {
    fn attach(&mut self, name: &str, program: &str, args: &[&str]) {
        self.fe
            .attach(&DeviceSpec::spawn(name, program, args))
            .unwrap();
    }

    fn driver(&mut self, name: &str, wanted: u64) -> VirtioMmioDriver {
        let d = self.fe.device(name).unwrap();
        let base = d.placed(0).unwrap().addr;
        let irq = d.irq(0).unwrap().clone();
        VirtioMmioDriver::init(
            self.fe.mmio().clone(),
            base,
            self.fe.memory().unwrap().clone(),
            irq,
            &mut self.alloc,
            wanted,
            256,
        )
        .unwrap()
    }
}

fn temp_image(tag: &str, sectors: u64) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("outboard-{tag}-{}.img", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(sectors * 512).unwrap();
    p
}

#[test]
fn rng_when_buffers_offered_then_filled_with_random_bytes() {
    let mut g = guest();
    g.attach("rng", "outboard-virtio-rng", &[]);
    let mut d = g.driver("rng", 0);
    assert_eq!(d.device_id(), 4);
    let buf = g.alloc.alloc(4096, 8).unwrap();
    for len in [1u32, 64, 4096] {
        let bytes = rng_read(&mut d, buf, len).unwrap();
        assert_eq!(bytes.len(), len as usize);
        if len >= 64 {
            assert!(bytes.iter().any(|&b| b != 0), "{len} random bytes all zero");
        }
    }
    let a = rng_read(&mut d, buf, 64).unwrap();
    let b = rng_read(&mut d, buf, 64).unwrap();
    assert_ne!(a, b);
}

#[test]
fn blk_when_basic_requests_then_served() {
    let img = temp_image("basic", 2048);
    let mut g = guest();
    g.attach(
        "blk",
        "outboard-virtio-blk",
        &["--path", img.to_str().unwrap(), "--serial", "disk-7"],
    );
    let d = g.driver("blk", blk::F_FLUSH);
    assert_eq!(d.device_id(), 2);
    let mut c = BlkClient::new(d, &mut g.alloc, 1 << 20).unwrap();
    assert_eq!(c.capacity().unwrap(), 2048);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(c.write(8, &data).unwrap(), blk::S_OK);
    let mut back = vec![0u8; 4096];
    assert_eq!(c.read(8, &mut back).unwrap(), blk::S_OK);
    assert_eq!(back, data);
    let mut on_disk = vec![0u8; 4096];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut on_disk, 8 * 512)
        .unwrap();
    assert_eq!(on_disk, data);
    assert_eq!(c.flush().unwrap(), blk::S_OK);
    assert_eq!(c.get_id().unwrap(), (blk::S_OK, "disk-7".to_owned()));
    let _ = std::fs::remove_file(&img);
}
