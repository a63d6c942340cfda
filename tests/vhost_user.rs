//! vhost-user interop: the frontend drives third-party vhost-user backends
//! (qemu-storage-daemon, vhost-device-rng) and Outboard's own backends served
//! with `--vhost-user`, through the same test guest driver as every other
//! virtio device.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use outboard_frontend::DeviceSpec;
use outboard_testkit::guest::{blk, rng_read, BlkClient, F_EVENT_IDX, F_INDIRECT_DESC};
use outboard_tests::{guest, outboard_vhost_user, random_io, socket_path, temp_image, Reaped};

const T: Duration = Duration::from_secs(10);

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

#[test]
fn qemu_storage_daemon_when_1000_random_4k_ios_then_image_matches() {
    let sectors = 8192;
    let image = temp_image("vu-qsd", sectors);
    let (_qsd, sock) = qemu_storage_daemon(&image);
    let mut g = guest(T);
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
    let image = temp_image("vu-ob", sectors);
    // Confined, as a vhost-user backend started by hand can be.
    let (b, sock) = outboard_vhost_user(
        "outboard-virtio-blk",
        &["--path", image.to_str().unwrap(), "--sandbox"],
    );
    let mut g = guest(T);
    g.attach_vhost("ob", &sock, "blk");
    let status = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", b.0.id())).unwrap();
    let backend = status
        .split_whitespace()
        .next()
        .expect("the confined backend");
    let status = std::fs::read_to_string(format!("/proc/{backend}/status")).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
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
    let (_b, sock) = outboard_vhost_user("outboard-virtio-rng", &["--sandbox"]);
    let mut g = guest(T);
    g.attach_vhost("rng", &sock, "rng");
    let mut d = g.driver("rng", 0);
    let buf = g.alloc.alloc(4096, 16).unwrap();
    let a = rng_read(&mut d, buf, 4096).unwrap();
    assert_eq!(a.len(), 4096);
    assert!(a.iter().any(|&b| b != 0));
}

#[test]
fn outboard_console_over_vhost_user_when_both_directions_then_arrive() {
    use outboard_testkit::guest::Buffer;
    use vm_memory::{Bytes, GuestAddress};
    let out = std::env::temp_dir().join(format!("outboard-vu-console-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let input = socket_path("vu-console-in");
    let (_b, sock) = outboard_vhost_user(
        "outboard-virtio-console",
        &[
            "--output",
            out.to_str().unwrap(),
            "--input-socket",
            input.to_str().unwrap(),
            "--sandbox",
        ],
    );
    let mut g = guest(T);
    g.attach_vhost("con", &sock, "console");
    let mut d = g.driver("con", F_INDIRECT_DESC | F_EVENT_IDX);
    assert_eq!(
        d.features() & (F_INDIRECT_DESC | F_EVENT_IDX),
        F_INDIRECT_DESC | F_EVENT_IDX,
        "ring features negotiated"
    );
    assert_eq!(d.num_queues(), 2);
    let mem = g.fe.memory().unwrap().clone();
    let rx = g.alloc.alloc(64, 64).unwrap();
    let head = d.submit(0, &[Buffer::writable(rx, 64)]).unwrap();
    d.notify(0).unwrap();
    let tx = g.alloc.alloc(64, 8).unwrap();
    mem.memory()
        .write_slice(b"over vhost-user\n", GuestAddress(tx))
        .unwrap();
    d.request(1, &[Buffer::readable(tx, 16)]).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"over vhost-user\n");
    let mut client = outboard_tests::connect_stream(&input);
    std::io::Write::write_all(&mut client, b"pong\n").unwrap();
    let n = d.wait(0, head).unwrap();
    let mut buf = vec![0u8; n as usize];
    mem.memory().read_slice(&mut buf, GuestAddress(rx)).unwrap();
    assert_eq!(buf, b"pong\n");
    let _ = std::fs::remove_file(&out);
}

#[test]
fn vhost_user_backend_killed_mid_io_then_reported_and_others_keep_running() {
    let sectors = 2048;
    let image = temp_image("vu-kill", sectors);
    let (mut qsd, sock) = qemu_storage_daemon(&image);
    let mut g = guest(T);
    g.attach_vhost("qsd", &sock, "blk");
    g.fe.attach(&DeviceSpec::spawn("rng", "outboard-virtio-rng", &[]))
        .unwrap();
    let d = g.driver("qsd", 0);
    let mut c = BlkClient::new(d, &mut g.alloc, 4096).unwrap();
    c.driver.set_timeout(outboard_tests::HANG_GUARD);
    let mut rng = g.driver("rng", 0);
    let rng_buf = g.alloc.alloc(64, 8).unwrap();
    assert_eq!(c.write(0, &[7u8; 4096]).unwrap(), blk::S_OK);
    // Kill the backend while requests keep coming.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        let _ = qsd.0.kill();
        let _ = qsd.0.wait();
    });
    let mut outcome = Ok(());
    for i in 0..100_000u64 {
        match c.write((i % 256) * 8, &[i as u8; 4096]) {
            Ok(s) => assert_eq!(s, blk::S_OK),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    killer.join().unwrap();
    let err = outcome.expect_err("I/O must fail once the backend is dead");
    assert!(
        matches!(
            err,
            outboard_testkit::guest::Error::NeedsReset(_) | outboard_testkit::guest::Error::Timeout
        ),
        "{err:?}"
    );
    let dev = g.fe.device("qsd").unwrap();
    assert!(dev.is_failed(), "the frontend reports the dead backend");
    assert!(
        dev.failure().unwrap().contains("hung up") || dev.failure().unwrap().contains("vhost-user")
    );
    assert_ne!(
        c.driver.status().unwrap() & 0x40,
        0,
        "the guest sees DEVICE_NEEDS_RESET"
    );
    // The other device is unaffected.
    assert_eq!(rng_read(&mut rng, rng_buf, 64).unwrap().len(), 64);
    let _ = std::fs::remove_file(&image);
}

/// The `vhost-device-rng` binary `.ci/run` installs, if present.
fn vhost_device_rng() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OUTBOARD_VHOST_DEVICE_RNG") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".cache/outboard/bin/vhost-device-rng");
    p.exists().then_some(p)
}

/// Without vhost-device-rng a developer's run skips (saying so); CI
/// (`OUTBOARD_REQUIRE_TOOLS=1`) fails instead.
fn skip() {
    assert!(
        std::env::var_os("OUTBOARD_REQUIRE_TOOLS").is_none(),
        "vhost-device-rng is required (set OUTBOARD_VHOST_DEVICE_RNG)"
    );
    println!("skipped: vhost-device-rng not installed (.ci/run installs it)");
}

/// Starts vhost-device-rng; it listens on `<path>0`.
fn start_vhost_device_rng(program: &Path) -> (Reaped, PathBuf) {
    let base = socket_path("vdr");
    let child = Command::new(program)
        .arg("--socket-path")
        .arg(&base)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut sock = base.into_os_string();
    sock.push("0");
    (Reaped(child), PathBuf::from(sock))
}

#[test]
fn vhost_device_rng_when_read_then_random_bytes() {
    let Some(program) = vhost_device_rng() else {
        return skip();
    };
    let (_rng, sock) = start_vhost_device_rng(&program);
    let mut g = guest(T);
    g.attach_vhost("vdr", &sock, "rng");
    let mut d = g.driver("vdr", 0);
    assert_eq!(d.device_id(), 4);
    let buf = g.alloc.alloc(4096, 16).unwrap();
    for len in [16u32, 512, 4096] {
        let bytes = rng_read(&mut d, buf, len).unwrap();
        assert_eq!(bytes.len(), len as usize);
        assert!(bytes.iter().any(|&b| b != 0));
    }
}

#[test]
fn one_vm_when_mixing_ioregionfd_and_vhost_user_devices_then_all_verified_concurrently() {
    let Some(rng_program) = vhost_device_rng() else {
        return skip();
    };
    let sectors = 4096;
    let local_img = temp_image("vu-mix-local", sectors);
    let qsd_img = temp_image("vu-mix-qsd", sectors);
    let uart_log = std::env::temp_dir().join(format!("outboard-vu-mix-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&uart_log);
    let (_qsd, qsd_sock) = qemu_storage_daemon(&qsd_img);
    let (_vdr, vdr_sock) = start_vhost_device_rng(&rng_program);
    let mut g = guest(T);
    g.fe.attach(&DeviceSpec::spawn(
        "com1",
        "outboard-uart",
        &["--output", uart_log.to_str().unwrap()],
    ))
    .unwrap();
    g.fe.attach(&DeviceSpec::spawn(
        "disk0",
        "outboard-virtio-blk",
        &["--path", local_img.to_str().unwrap()],
    ))
    .unwrap();
    g.attach_vhost("disk1", &qsd_sock, "blk");
    g.attach_vhost("rng", &vdr_sock, "rng");
    let d0 = g.driver("disk0", blk::F_FLUSH);
    let mut disk0 = BlkClient::new(d0, &mut g.alloc, 4096).unwrap();
    let d1 = g.driver("disk1", blk::F_FLUSH);
    let mut disk1 = BlkClient::new(d1, &mut g.alloc, 4096).unwrap();
    let mut rng = g.driver("rng", 0);
    let rng_buf = g.alloc.alloc(64, 16).unwrap();
    let pio = g.fe.pio().clone();
    let (li, qi) = (local_img.clone(), qsd_img.clone());
    std::thread::scope(|s| {
        s.spawn(move || random_io(&mut disk0, &li, sectors, 11));
        s.spawn(move || random_io(&mut disk1, &qi, sectors, 22));
        s.spawn(move || {
            for _ in 0..300 {
                let b = rng_read(&mut rng, rng_buf, 64).unwrap();
                assert_eq!(b.len(), 64);
            }
        });
        s.spawn(move || {
            for i in 0..200 {
                for b in format!("line {i}\n").bytes() {
                    pio.try_write(0x3f8, outboard_frontend::AccessSize::B1, u64::from(b))
                        .unwrap();
                }
            }
            // An ordered read: every posted byte before it has been written out.
            pio.try_read(0x3fd, outboard_frontend::AccessSize::B1)
                .unwrap();
        });
    });
    let expected: String = (0..200).map(|i| format!("line {i}\n")).collect();
    assert_eq!(std::fs::read_to_string(&uart_log).unwrap(), expected);
    for name in ["com1", "disk0", "disk1", "rng"] {
        assert!(!g.fe.device(name).unwrap().is_failed(), "{name}");
    }
    for p in [&local_img, &qsd_img, &uart_log] {
        let _ = std::fs::remove_file(p);
    }
}
