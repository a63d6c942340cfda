//! Outboard's frontend reconnecting to a restarted vhost-user backend
//! (issue 12, item 5), with qemu-storage-daemon and `outboard-virtio-blk
//! --vhost-user` SIGKILLed and started again on the same socket path while
//! the test guest's driver does random 4 KiB virtio-blk I/O:
//!
//! * between bursts (every ring settled when the loss is noticed), five
//!   times: the device resumes, serves what the driver queued while the
//!   backend was down, every request completes once and the image matches
//!   the model;
//! * under a load of 16 requests in flight, five times: each kill ends in
//!   one of the two documented outcomes (docs/architecture.md, "Restart:
//!   reconnecting a vhost-user backend"): the device resumes with every
//!   request completed once, or (neither backend keeps an inflight region)
//!   it fails cleanly with DEVICE_NEEDS_RESET and nothing completed twice;
//!   a kill with requests surely in flight fails cleanly;
//! * a scripted backend that offers INFLIGHT_SHMFD: the device resumes with
//!   chains in flight, on the same region and the same eventfds;
//! * a configuration read waits for the reconnection; a restarted backend
//!   that cannot resume the device, and one that never comes back, fail it
//!   cleanly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outboard_frontend::{AccessSize, DeviceSpec, RestartPolicy};
use outboard_testkit::guest::{
    blk, status, Buffer, DriverOptions, VirtioMmioDriver, F_EVENT_IDX, F_INDIRECT_DESC,
};
use outboard_tests::{bin, guest, socket_path, temp_image, Guest, Rand, Reaped, HANG_GUARD};
use vm_memory::{Bytes, GuestAddress};

mod vhost_user_fake;

const T: Duration = Duration::from_secs(10);
/// Requests the driver keeps in flight.
const QD: usize = 16;
/// Backend kills per load.
const KILLS: u64 = 5;
/// Requests per load.
const REQUESTS: u64 = 3000;
const SECTORS: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Qsd,
    Outboard,
}

/// Starts a vhost-user virtio-blk backend of `kind` for `image`, listening
/// at `sock` (a qemu-storage-daemon export, or `outboard-virtio-blk
/// --vhost-user` with `extra` arguments).
fn start(kind: Kind, image: &Path, sock: &Path, extra: &[&str]) -> Reaped {
    let mut cmd = match kind {
        Kind::Qsd => {
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=disk0,filename={}",
                    image.display()
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
                    sock.display()
                ));
            c
        }
        Kind::Outboard => {
            let mut c = Command::new(bin("outboard-virtio-blk"));
            c.arg("--vhost-user").arg(sock).arg("--path").arg(image);
            c
        }
    };
    let child = cmd
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the vhost-user backend (qemu-storage-daemon: package qemu-utils)");
    Reaped(child)
}

/// SIGKILLs `backend` and waits until it is gone.
fn kill(backend: &mut Reaped) {
    backend.0.kill().unwrap();
    backend.0.wait().unwrap();
}

/// Waits (up to the hang guard) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG_GUARD;
    while !cond() {
        assert!(Instant::now() < deadline, "hang guard: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until `path` exists (the backend listens there).
fn wait_for_socket(path: &Path) {
    wait_until("backend socket", || path.exists());
}

/// A guest with the vhost-user blk backend at `sock` attached as "dev"
/// under `policy`, initialized by the driver with the ring features.
fn attach(g: &mut Guest, sock: &Path, policy: RestartPolicy) -> VirtioMmioDriver {
    g.fe.attach(&DeviceSpec::vhost_user("dev", sock, "blk").restart(policy))
        .expect("attach vhost-user");
    let mut d = g.driver_with(
        "dev",
        DriverOptions::new(blk::F_FLUSH | F_INDIRECT_DESC | F_EVENT_IDX, 128),
    );
    d.set_timeout(HANG_GUARD);
    d
}

/// Guest memory of one request: header, 4 KiB of data, status byte.
struct Slot {
    hdr: u64,
    data: u64,
    st: u64,
}

fn slots(g: &mut Guest) -> Vec<Slot> {
    (0..QD)
        .map(|_| Slot {
            hdr: g.alloc.alloc(16, 16).unwrap(),
            data: g.alloc.alloc(4096, 4096).unwrap(),
            st: g.alloc.alloc(1, 1).unwrap(),
        })
        .collect()
}

/// Writes a request header (and a status byte the device must overwrite).
fn prepare(d: &VirtioMmioDriver, s: &Slot, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    let mem = d.ram().memory();
    mem.write_slice(&h, GuestAddress(s.hdr)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(s.st)).unwrap();
}

/// One request in flight.
struct Req {
    slot: usize,
    head: u16,
    block: u64,
    write: bool,
}

/// The device failed (DEVICE_NEEDS_RESET) with these blocks still being
/// written: their contents may be old or new.
#[derive(Debug)]
struct Failed {
    uncertain: Vec<u64>,
}

/// Random 4 KiB reads and writes, up to [`QD`] in flight, each on a block
/// no other request in flight touches (so the model is exact whatever order
/// they complete in). Every completion must carry status OK and every read
/// the model's data; the driver itself refuses a chain used twice.
struct Load {
    slots: Vec<Slot>,
    free: Vec<usize>,
    busy: HashSet<u64>,
    inflight: VecDeque<Req>,
    rand: Rand,
    /// The image as the completed writes left it.
    model: Vec<u8>,
    done: u64,
}

impl Load {
    fn new(g: &mut Guest, seed: u64) -> Self {
        let slots = slots(g);
        Load {
            free: (0..slots.len()).collect(),
            slots,
            busy: HashSet::new(),
            inflight: VecDeque::new(),
            rand: Rand(seed),
            model: vec![0u8; (SECTORS * 512) as usize],
            done: 0,
        }
    }

    /// Makes requests available until [`QD`] are in flight or `left`
    /// more have been made (returns how many), then notifies.
    fn fill(&mut self, d: &mut VirtioMmioDriver, left: u64) -> u64 {
        let mem = std::sync::Arc::clone(d.ram());
        let mem = mem.memory();
        let mut made = 0;
        while made < left {
            let Some(slot) = self.free.pop() else { break };
            let block = loop {
                let b = self.rand.next_u64() % (SECTORS / 8);
                if !self.busy.contains(&b) {
                    break b;
                }
            };
            let write = self.rand.next_u64().is_multiple_of(2);
            let s = &self.slots[slot];
            prepare(d, s, if write { blk::T_OUT } else { blk::T_IN }, block * 8);
            if write {
                let data: Vec<u8> = (0..4096).map(|_| self.rand.next_u64() as u8).collect();
                mem.write_slice(&data, GuestAddress(s.data)).unwrap();
                let at = (block * 4096) as usize;
                self.model[at..at + 4096].copy_from_slice(&data);
            }
            let bufs = [
                Buffer::readable(s.hdr, 16),
                Buffer {
                    addr: s.data,
                    len: 4096,
                    device_writes: !write,
                },
                Buffer::writable(s.st, 1),
            ];
            let head = d.submit(0, &bufs).unwrap();
            self.inflight.push_back(Req {
                slot,
                head,
                block,
                write,
            });
            self.busy.insert(block);
            made += 1;
        }
        d.notify(0).unwrap();
        made
    }

    /// Waits for the oldest request, then collects every other one done.
    fn reap(&mut self, d: &mut VirtioMmioDriver) -> Result<(), Failed> {
        let oldest = self.inflight.front().expect("a request in flight").head;
        match d.wait(0, oldest) {
            Ok(_) => {}
            Err(outboard_testkit::guest::Error::NeedsReset(_)) => {
                let uncertain = self
                    .inflight
                    .iter()
                    .filter(|r| r.write)
                    .map(|r| r.block)
                    .collect();
                return Err(Failed { uncertain });
            }
            Err(e) => panic!(
                "request {}: {e}; available {} used {}",
                self.done,
                d.avail_idx(0).unwrap(),
                d.used_idx(0).unwrap()
            ),
        }
        let req = self.inflight.pop_front().expect("in flight");
        self.finish(d, req);
        let mut i = 0;
        while i < self.inflight.len() {
            if d.poll(0, self.inflight[i].head).unwrap().is_some() {
                let req = self.inflight.remove(i).expect("in flight");
                self.finish(d, req);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    fn finish(&mut self, d: &VirtioMmioDriver, req: Req) {
        let mem = d.ram().memory();
        let s = &self.slots[req.slot];
        let st: u8 = mem.read_obj(GuestAddress(s.st)).unwrap();
        assert_eq!(st, blk::S_OK, "status of a request on block {}", req.block);
        if !req.write {
            let mut got = vec![0u8; 4096];
            mem.read_slice(&mut got, GuestAddress(s.data)).unwrap();
            let at = (req.block * 4096) as usize;
            assert!(
                got[..] == self.model[at..at + 4096],
                "read of block {}",
                req.block
            );
        }
        self.busy.remove(&req.block);
        self.free.push(req.slot);
        self.done += 1;
    }

    /// Runs `total` more requests with [`QD`] in flight, publishing the
    /// completions so far in `completed`.
    fn run(
        &mut self,
        d: &mut VirtioMmioDriver,
        total: u64,
        completed: &AtomicU64,
    ) -> Result<(), Failed> {
        let end = self.done + total;
        let mut left = total;
        while self.done < end {
            left -= self.fill(d, left);
            self.reap(d)?;
            completed.store(self.done, Ordering::Release);
        }
        Ok(())
    }

    /// Flushes, then checks that the device used exactly the chains the
    /// driver made available and that the image file is the model.
    fn verify(&self, d: &mut VirtioMmioDriver, image: &Path) {
        let s = &self.slots[0];
        prepare(d, s, blk::T_FLUSH, 0);
        d.request(0, &[Buffer::readable(s.hdr, 16), Buffer::writable(s.st, 1)])
            .unwrap();
        let st: u8 = d.ram().memory().read_obj(GuestAddress(s.st)).unwrap();
        assert_eq!(st, blk::S_OK, "flush");
        assert_eq!(
            d.used_idx(0).unwrap(),
            d.avail_idx(0).unwrap(),
            "every chain used exactly once"
        );
        assert!(
            std::fs::read(image).unwrap() == self.model,
            "the image matches the model"
        );
    }

    /// After a clean failure: no chain was used more often than made
    /// available, and every block but the uncertain ones is the model's.
    fn verify_failed(&self, d: &VirtioMmioDriver, image: &Path, failed: &Failed) {
        let outstanding = d.avail_idx(0).unwrap().wrapping_sub(d.used_idx(0).unwrap());
        assert!(
            usize::from(outstanding) <= QD,
            "{outstanding} chains outstanding"
        );
        let file = std::fs::read(image).unwrap();
        for block in 0..SECTORS / 8 {
            if failed.uncertain.contains(&block) {
                continue;
            }
            let at = (block * 4096) as usize;
            assert!(
                file[at..at + 4096] == self.model[at..at + 4096],
                "block {block} after the failure"
            );
        }
    }
}

/// The reason and guest-visible state of the documented clean failure: the
/// backend was lost with chains in flight and keeps no inflight region.
fn assert_failed_cleanly(g: &Guest, d: &VirtioMmioDriver) {
    let dev = g.fe.device("dev").unwrap();
    assert!(!dev.vhost_user().unwrap().keeps_inflight());
    let why = dev.failure().expect("failed");
    assert!(
        why.contains("in flight") && why.contains("INFLIGHT_SHMFD"),
        "{why}"
    );
    assert_ne!(d.status().unwrap() & status::NEEDS_RESET, 0);
}

/// [`REQUESTS`] requests with [`QD`] in flight; the backend is SIGKILLed up
/// to [`KILLS`] times at evenly spread points of the load and started
/// again on the same socket path each time. Each kill ends in one of the
/// two documented outcomes: the device resumes (the backend keeps an
/// inflight region, or every ring was settled when the loss was noticed)
/// and every request completes once; or it fails cleanly, and nothing
/// completed twice or wrongly before.
fn kill_under_load(kind: Kind, tag: &str, seed: u64) {
    let image = temp_image(tag, SECTORS);
    let sock = socket_path(tag);
    let mut backend = start(kind, &image, &sock, &[]);
    let mut g = guest(T);
    let mut d = attach(&mut g, &sock, RestartPolicy::on_failure());
    let vu = std::sync::Arc::clone(g.fe.device("dev").unwrap().vhost_user().unwrap());
    let mut load = Load::new(&mut g, seed);
    let completed = AtomicU64::new(0);
    let (outcome, load) = std::thread::scope(|s| {
        let loader = s.spawn(|| {
            let r = load.run(&mut d, REQUESTS, &completed);
            (r, load)
        });
        for k in 1..=KILLS {
            let at = k * REQUESTS / (KILLS + 1);
            wait_until("load progress", || {
                completed.load(Ordering::Acquire) >= at || loader.is_finished()
            });
            if loader.is_finished() {
                break;
            }
            kill(&mut backend);
            backend = start(kind, &image, &sock, &[]);
            wait_until("reconnected or failed", || {
                vu.reconnects() >= k as u32 || vu.health().is_failed()
            });
            if vu.health().is_failed() {
                break;
            }
        }
        match loader.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });
    match outcome {
        Ok(()) => {
            let dev = g.fe.device("dev").unwrap();
            assert!(!dev.is_failed(), "{:?}", dev.failure());
            assert_eq!(vu.reconnects(), KILLS as u32, "one reconnection per kill");
            load.verify(&mut d, &image);
            println!("{kind:?}: resumed after each of {KILLS} kills");
        }
        Err(failed) => {
            assert_failed_cleanly(&g, &d);
            load.verify_failed(&d, &image, &failed);
            println!(
                "{kind:?}: resumed {} times, then failed cleanly: {}",
                vu.reconnects(),
                vu.health().reason().unwrap_or_default()
            );
        }
    }
    drop(backend);
    let _ = std::fs::remove_file(&image);
}

/// [`KILLS`] rounds of: 200 requests with [`QD`] in flight until all are
/// done, a SIGKILL, [`QD`] more requests made available while nothing
/// serves the device, the backend started again on the same socket path.
/// Every ring is settled when the loss is noticed, so the device resumes
/// every time and serves what was queued meanwhile.
fn kill_between_bursts(kind: Kind, tag: &str, seed: u64) {
    let image = temp_image(tag, SECTORS);
    let sock = socket_path(tag);
    let mut backend = start(kind, &image, &sock, &[]);
    let mut g = guest(T);
    let mut d = attach(&mut g, &sock, RestartPolicy::on_failure());
    let vu = std::sync::Arc::clone(g.fe.device("dev").unwrap().vhost_user().unwrap());
    let mut load = Load::new(&mut g, seed);
    let completed = AtomicU64::new(0);
    for k in 1..=KILLS as u32 {
        load.run(&mut d, 200, &completed).unwrap();
        kill(&mut backend);
        wait_until("the loss noticed", || vu.is_reconnecting());
        assert_eq!(load.fill(&mut d, QD as u64), QD as u64);
        backend = start(kind, &image, &sock, &[]);
        while !load.inflight.is_empty() {
            load.reap(&mut d).unwrap();
        }
        assert_eq!(vu.reconnects(), k);
    }
    assert!(!vu.health().is_failed());
    load.verify(&mut d, &image);
    drop(backend);
    let _ = std::fs::remove_file(&image);
}

#[test]
fn qemu_storage_daemon_when_killed_under_load_then_each_request_completes_once_or_device_fails_cleanly(
) {
    kill_under_load(Kind::Qsd, "vur-qsd", 0x0bad_cafe);
}

#[test]
fn outboard_blk_over_vhost_user_when_killed_under_load_then_each_request_completes_once_or_device_fails_cleanly(
) {
    kill_under_load(Kind::Outboard, "vur-ob", 0x5eed_f00d);
}

#[test]
fn qemu_storage_daemon_when_killed_5_times_between_bursts_then_resumes_and_serves_what_was_queued()
{
    kill_between_bursts(Kind::Qsd, "vur-qsd-b", 0x1234);
}

#[test]
fn outboard_blk_over_vhost_user_when_killed_5_times_between_bursts_then_resumes_and_serves_what_was_queued(
) {
    kill_between_bursts(Kind::Outboard, "vur-ob-b", 0x4321);
}

#[test]
fn qemu_storage_daemon_when_killed_with_requests_in_flight_then_device_needs_reset_with_reason() {
    let image = temp_image("vur-inflight", SECTORS);
    let sock = socket_path("vur-inflight");
    let mut backend = start(Kind::Qsd, &image, &sock, &[]);
    let mut g = guest(T);
    let mut d = attach(&mut g, &sock, RestartPolicy::on_failure());
    let mut load = Load::new(&mut g, 0xfeed);
    load.run(&mut d, 100, &AtomicU64::new(0)).unwrap();
    // Stopped, the daemon takes none of the next requests: they are surely
    // in flight when it dies.
    outboard_tests::signal(backend.0.id(), libc::SIGSTOP);
    assert_eq!(load.fill(&mut d, QD as u64), QD as u64);
    kill(&mut backend);
    let _backend = start(Kind::Qsd, &image, &sock, &[]);
    let failed = load.reap(&mut d).expect_err("the device cannot resume");
    assert_failed_cleanly(&g, &d);
    assert_eq!(
        g.fe.device("dev")
            .unwrap()
            .vhost_user()
            .unwrap()
            .reconnects(),
        0
    );
    load.verify_failed(&d, &image, &failed);
    let _ = std::fs::remove_file(&image);
}

#[test]
fn configuration_read_when_backend_is_down_then_waits_and_reads_the_restarted_one() {
    let image = temp_image("vur-cfg", SECTORS);
    let sock = socket_path("vur-cfg");
    let mut backend = start(Kind::Qsd, &image, &sock, &[]);
    let mut g = guest(T);
    let d = attach(&mut g, &sock, RestartPolicy::on_failure());
    assert_eq!(d.config(0, AccessSize::B8).unwrap(), SECTORS);
    kill(&mut backend);
    let vu = std::sync::Arc::clone(g.fe.device("dev").unwrap().vhost_user().unwrap());
    wait_until("reconnecting", || vu.is_reconnecting());
    // The transport's own registers answer meanwhile, without a failure.
    assert_eq!(d.status().unwrap() & status::NEEDS_RESET, 0);
    std::thread::scope(|s| {
        // The reader starts while nothing listens: it waits for the backend
        // started next.
        let reader = s.spawn(|| d.config(0, AccessSize::B8));
        backend = start(Kind::Qsd, &image, &sock, &[]);
        assert_eq!(reader.join().unwrap().unwrap(), SECTORS, "capacity");
    });
    assert_eq!(vu.reconnects(), 1);
    assert!(!vu.health().is_failed());
    drop(backend);
    let _ = std::fs::remove_file(&image);
}

#[test]
fn vhost_user_when_restarted_backend_has_other_queues_then_device_needs_reset_with_reason() {
    let image = temp_image("vur-changed", SECTORS);
    let sock = socket_path("vur-changed");
    let mut backend = start(Kind::Outboard, &image, &sock, &[]);
    let mut g = guest(T);
    let mut d = attach(&mut g, &sock, RestartPolicy::on_failure());
    let vu = std::sync::Arc::clone(g.fe.device("dev").unwrap().vhost_user().unwrap());
    let mut load = Load::new(&mut g, 7);
    load.run(&mut d, 64, &AtomicU64::new(0)).unwrap();
    kill(&mut backend);
    wait_until("the loss noticed", || vu.is_reconnecting());
    // The same disk, but with two queues: the driver's one queue cannot be
    // resumed on a device whose layout changed.
    let _backend = start(Kind::Outboard, &image, &sock, &["--num-queues", "2"]);
    let s = &load.slots[0];
    prepare(&d, s, blk::T_FLUSH, 0);
    let err = d
        .request(0, &[Buffer::readable(s.hdr, 16), Buffer::writable(s.st, 1)])
        .expect_err("the device cannot resume");
    assert!(
        matches!(err, outboard_testkit::guest::Error::NeedsReset(_)),
        "{err:?}"
    );
    let dev = g.fe.device("dev").unwrap();
    let why = dev.failure().expect("failed");
    assert!(
        why.contains("cannot resume") && why.contains("queues"),
        "{why}"
    );
    assert_ne!(d.status().unwrap() & status::NEEDS_RESET, 0);
    let _ = std::fs::remove_file(&image);
}

#[test]
fn vhost_user_when_backend_never_returns_then_gives_up_at_the_limit_and_needs_reset() {
    let image = temp_image("vur-gone", SECTORS);
    let sock = socket_path("vur-gone");
    let mut backend = start(Kind::Qsd, &image, &sock, &[]);
    wait_for_socket(&sock);
    // A short timeout: each attempt waits that long for the socket.
    let mut g = guest(Duration::from_millis(500));
    let policy = RestartPolicy {
        limit: 2,
        ..RestartPolicy::on_failure()
    };
    let mut d = attach(&mut g, &sock, policy);
    let vu = std::sync::Arc::clone(g.fe.device("dev").unwrap().vhost_user().unwrap());
    let mut load = Load::new(&mut g, 9);
    load.run(&mut d, 64, &AtomicU64::new(0)).unwrap();
    kill(&mut backend);
    let _ = std::fs::remove_file(&sock);
    wait_until("the loss noticed", || vu.is_reconnecting());
    let s = &load.slots[0];
    prepare(&d, s, blk::T_FLUSH, 0);
    let err = d
        .request(0, &[Buffer::readable(s.hdr, 16), Buffer::writable(s.st, 1)])
        .expect_err("nothing serves the device");
    assert!(
        matches!(err, outboard_testkit::guest::Error::NeedsReset(_)),
        "{err:?}"
    );
    let why = g.fe.device("dev").unwrap().failure().expect("failed");
    assert!(
        why.contains("gave up reconnecting after 2 attempts") && why.contains("cannot connect"),
        "{why}"
    );
    let _ = std::fs::remove_file(&image);
}

/// Plays the device for chain `head` of the queue whose used ring is at
/// `used`: appends it to the used ring and raises the interrupt line.
fn complete(g: &Guest, used: u64, size: u16, head: u16) {
    let mem = g.fe.memory().unwrap().memory();
    let idx: u16 = mem.load(GuestAddress(used + 2), Ordering::Acquire).unwrap();
    let at = used + 4 + 8 * u64::from(idx % size);
    mem.write_obj(u32::from(head), GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.store(
        idx.wrapping_add(1),
        GuestAddress(used + 2),
        Ordering::Release,
    )
    .unwrap();
    let irq = g.fe.device("dev").unwrap().irq(0).unwrap().clone();
    irq.eventfd().write(1).unwrap();
}

/// Reads (and so empties) an eventfd the fake received; 0 when it was empty.
fn drain(f: &std::fs::File) -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match (&*f).read(&mut b) {
        Ok(8) => u64::from_le_bytes(b),
        _ => 0,
    }
}

#[test]
fn vhost_user_when_backend_keeps_an_inflight_region_then_resumes_with_chains_in_flight_on_the_same_region_and_eventfds(
) {
    use vhost_user_fake::*;
    let sock = socket_path("vur-fake");
    let region_path =
        std::env::temp_dir().join(format!("outboard-vur-region-{}", std::process::id()));
    let region = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&region_path)
        .unwrap();
    region.set_len(REGION).unwrap();
    let _ = std::fs::remove_file(&region_path);
    let first = Fake::start(&sock, region.try_clone().unwrap());
    let mut g = guest(T);
    g.fe.attach(&DeviceSpec::vhost_user("dev", &sock, "blk").restart(RestartPolicy::on_failure()))
        .unwrap();
    let vu = std::sync::Arc::clone(g.fe.device("dev").unwrap().vhost_user().unwrap());
    let mut d = g.driver_with("dev", DriverOptions::new(0, 16));
    d.set_timeout(HANG_GUARD);
    wait_until("the queue enabled", || first.got(SET_VRING_ENABLE));
    assert!(vu.keeps_inflight());
    let used = first.with_log(|log| {
        log.iter()
            .find(|m| m.request == SET_VRING_ADDR)
            .unwrap()
            .u64_at(2)
    });
    // Three chains in flight; the device completes the second one only.
    let buf = g.alloc.alloc(64, 8).unwrap();
    let heads: Vec<u16> = (0..3)
        .map(|i| d.submit(0, &[Buffer::writable(buf + 16 * i, 16)]).unwrap())
        .collect();
    d.notify(0).unwrap();
    complete(&g, used, 16, heads[1]);
    d.wait(0, heads[1]).unwrap();
    first.with_log(|log| {
        let kick = log.iter().find(|m| m.request == SET_VRING_KICK).unwrap();
        assert!(
            drain(kick.fd.as_ref().unwrap()) >= 1,
            "the driver's notification"
        );
    });
    let interrupts = d.interrupts();
    let log = first.kill();
    let requests: Vec<u32> = log.iter().map(|m| m.request).collect();
    let at = |r: u32| requests.iter().position(|&x| x == r).unwrap();
    assert!(at(SET_FEATURES) < at(GET_INFLIGHT_FD) && at(GET_INFLIGHT_FD) < at(SET_INFLIGHT_FD));
    assert!(at(SET_INFLIGHT_FD) < at(SET_VRING_KICK));
    let set = &log[at(SET_INFLIGHT_FD)];
    assert_eq!(
        set.inode(),
        inode_of(&region),
        "the region the backend handed out"
    );
    assert_eq!(set.u64_at(0), REGION);

    // The backend restarts with chains 0 and 2 in flight: the device resumes.
    let second = Fake::start(&sock, region.try_clone().unwrap());
    wait_until("reconnected", || vu.reconnects() == 1);
    second.with_log(|log| {
        let requests: Vec<u32> = log.iter().map(|m| m.request).collect();
        assert_eq!(
            requests,
            [
                GET_FEATURES,
                GET_PROTOCOL_FEATURES,
                SET_PROTOCOL_FEATURES,
                GET_QUEUE_NUM,
                SET_OWNER,
                SET_MEM_TABLE,
                SET_FEATURES,
                SET_INFLIGHT_FD,
                SET_VRING_NUM,
                SET_VRING_BASE,
                SET_VRING_ADDR,
                SET_VRING_CALL,
                SET_VRING_KICK,
                SET_VRING_ENABLE,
            ],
            "no second GET_INFLIGHT_FD"
        );
        let m = |r: u32| log.iter().find(|m| m.request == r).unwrap();
        assert_eq!(
            m(SET_INFLIGHT_FD).inode(),
            inode_of(&region),
            "the same region"
        );
        assert_eq!(m(SET_VRING_BASE).num(), 1, "resumes at the used index");
        assert_eq!(m(SET_VRING_ADDR).u64_at(2), used);
        // The same kick eventfd: the frontend kicked it once after
        // reconnecting, and a write to the frontend's arrives here.
        let kick = m(SET_VRING_KICK).fd.as_ref().unwrap();
        wait_until("the kick after reconnecting", || drain(kick) >= 1);
        vu.kick_eventfd(0).unwrap().write(5).unwrap();
        assert_eq!(drain(kick), 5, "the frontend's kick eventfd");
        // An interrupt for completions the old backend may not have
        // announced, then the same call eventfd: the device's interrupt line.
        wait_until("the interrupt after reconnecting", || {
            d.interrupts() > interrupts
        });
        let before = d.interrupts();
        let call = m(SET_VRING_CALL).fd.as_ref().unwrap();
        std::io::Write::write_all(&mut &*call, &1u64.to_le_bytes()).unwrap();
        wait_until("the interrupt", || d.interrupts() > before);
    });
    // The new backend resubmits chains 0 and 2 from the region.
    complete(&g, used, 16, heads[2]);
    complete(&g, used, 16, heads[0]);
    d.wait(0, heads[0]).unwrap();
    d.wait(0, heads[2]).unwrap();
    assert_eq!(d.used_idx(0).unwrap(), d.avail_idx(0).unwrap());
    assert!(!vu.health().is_failed());
    drop(second);
}
