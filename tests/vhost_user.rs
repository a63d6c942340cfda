//! vhost-user interop: the frontend drives third-party vhost-user backends
//! (qemu-storage-daemon, vhost-device-rng) and Outboard's own backends served
//! with `--vhost-user`, through the same test guest driver as every other
//! virtio device.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outboard_frontend::backend::Source;
use outboard_frontend::guest::{blk, rng_read, BlkClient, GuestAllocator, VirtioMmioDriver};
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{DeviceSpec, Frontend};
use outboard_tests::{bin, frontend, socket_path};

const T: Duration = Duration::from_secs(10);
const RAM: u64 = 32 << 20;

/// A child process killed when the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn temp_image(tag: &str, sectors: u64) -> PathBuf {
    let p = std::env::temp_dir().join(format!("outboard-vu-{tag}-{}.img", std::process::id()));
    std::fs::File::create(&p)
        .unwrap()
        .set_len(sectors * 512)
        .unwrap();
    p
}

fn qemu_storage_daemon(image: &Path) -> (Reaped, PathBuf) {
    let sock = socket_path("qsd");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk0,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (package qemu-utils) must be installed");
    (Reaped(child), sock)
}

fn outboard_vhost_user(program: &str, args: &[&str]) -> (Reaped, PathBuf) {
    let sock = socket_path(program);
    let child = Command::new(bin(program))
        .arg("--vhost-user")
        .arg(&sock)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    (Reaped(child), sock)
}

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
    fn attach_vhost(&mut self, name: &str, socket: &Path, device: &str) {
        let spec = DeviceSpec {
            source: Source::VhostUser {
                socket: socket.to_path_buf(),
                device: device.to_owned(),
            },
            ..DeviceSpec::connect(name, socket)
        };
        self.fe.attach(&spec).unwrap();
    }

    fn driver(&mut self, name: &str, wanted: u64) -> VirtioMmioDriver {
        let d = self.fe.device(name).unwrap();
        VirtioMmioDriver::init(
            self.fe.mmio().clone(),
            d.placed(0).unwrap().addr,
            self.fe.memory().unwrap().clone(),
            d.irq(0).unwrap().clone(),
            &mut self.alloc,
            wanted,
            256,
        )
        .unwrap()
    }
}

struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// 1,000 random 4 KiB reads and writes, checked against a model and the image.
fn random_io(c: &mut BlkClient, image: &Path, sectors: u64, seed: u64) {
    let mut model = std::fs::read(image).unwrap();
    let mut r = Rand(seed);
    for _ in 0..1000 {
        let sector = (r.next() % (sectors / 8)) * 8;
        let at = (sector * 512) as usize;
        if r.next().is_multiple_of(2) {
            let data: Vec<u8> = (0..4096).map(|_| r.next() as u8).collect();
            assert_eq!(c.write(sector, &data).unwrap(), blk::S_OK);
            model[at..at + 4096].copy_from_slice(&data);
        } else {
            let mut buf = vec![0u8; 4096];
            assert_eq!(c.read(sector, &mut buf).unwrap(), blk::S_OK);
            assert!(buf == model[at..at + 4096], "read at sector {sector}");
        }
    }
    assert_eq!(c.flush().unwrap(), blk::S_OK);
    let mut on_disk = vec![0u8; model.len()];
    std::fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut on_disk, 0)
        .unwrap();
    assert!(on_disk == model, "image matches the model");
}

#[test]
fn qemu_storage_daemon_when_1000_random_4k_ios_then_image_matches() {
    let sectors = 8192;
    let image = temp_image("qsd", sectors);
    let (_qsd, sock) = qemu_storage_daemon(&image);
    let mut g = guest();
    g.attach_vhost("qsd", &sock, "blk");
    let d = g.driver("qsd", blk::F_FLUSH);
    assert_eq!(d.device_id(), 2);
    let mut c = BlkClient::new(d, &mut g.alloc, 4096).unwrap();
    assert_eq!(
        c.capacity().unwrap(),
        sectors,
        "capacity through GET_CONFIG"
    );
    random_io(&mut c, &image, sectors, 0x1234_5678);
    let _ = std::fs::remove_file(&image);
}

#[test]
fn outboard_blk_over_vhost_user_when_1000_random_4k_ios_then_image_matches() {
    let sectors = 8192;
    let image = temp_image("ob", sectors);
    let (_b, sock) =
        outboard_vhost_user("outboard-virtio-blk", &["--path", image.to_str().unwrap()]);
    let mut g = guest();
    g.attach_vhost("ob", &sock, "blk");
    let d = g.driver("ob", blk::F_FLUSH);
    let mut c = BlkClient::new(d, &mut g.alloc, 4096).unwrap();
    assert_eq!(c.capacity().unwrap(), sectors);
    random_io(&mut c, &image, sectors, 0x8765_4321);
    assert_eq!(
        c.get_id().unwrap(),
        (blk::S_OK, "outboard-virtio-blk".to_owned())
    );
    let _ = std::fs::remove_file(&image);
}

#[test]
fn outboard_rng_over_vhost_user_when_read_then_random_bytes() {
    let (_b, sock) = outboard_vhost_user("outboard-virtio-rng", &[]);
    let mut g = guest();
    g.attach_vhost("rng", &sock, "rng");
    let mut d = g.driver("rng", 0);
    let buf = g.alloc.alloc(4096, 16).unwrap();
    let a = rng_read(&mut d, buf, 4096).unwrap();
    assert_eq!(a.len(), 4096);
    assert!(a.iter().any(|&b| b != 0));
}
