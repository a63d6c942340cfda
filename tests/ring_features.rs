//! Ring features on both transports, driven by the test guest's driver:
//! indirect descriptors (a request with the device's maximum number of
//! segments on every queue size from 16 to 1024), EVENT_IDX notification
//! and interrupt suppression, virtio-blk's queues served in parallel, and a
//! vhost-user frontend that acks a feature nobody offered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outboard_frontend::AccessSize;
use outboard_testkit::guest::{
    blk, Buffer, DriverOptions, VirtioMmioDriver, F_EVENT_IDX, F_INDIRECT_DESC,
};
use outboard_tests::{
    alive, guest, outboard_vhost_user, signal, temp_image, Guest, Rand, Reaped, HANG_GUARD,
};
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(10);
const RINGS: u64 = F_INDIRECT_DESC | F_EVENT_IDX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Ioregionfd,
    VhostUser,
}

/// A guest with one Outboard virtio device on `transport`, named "dev".
struct Rig {
    g: Guest,
    pid: u32,
    _vhost: Option<Reaped>,
}

fn rig(transport: Transport, program: &str, args: &[&str], kind: &str) -> Rig {
    let mut g = guest(T);
    match transport {
        Transport::Ioregionfd => {
            g.attach("dev", program, args);
            let pid = g.fe.device("dev").unwrap().pid().unwrap();
            Rig {
                g,
                pid,
                _vhost: None,
            }
        }
        Transport::VhostUser => {
            let (proc, sock) = outboard_vhost_user(program, args);
            g.attach_vhost("dev", &sock, kind);
            Rig {
                g,
                pid: proc.0.id(),
                _vhost: Some(proc),
            }
        }
    }
}

struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn blk_rig(transport: Transport, tag: &str, sectors: u64, extra: &[&str]) -> (Rig, Image) {
    let image = Image(temp_image(&format!("{tag}-{transport:?}"), sectors));
    let path = image.0.to_str().unwrap().to_owned();
    let mut args = vec!["--path", path.as_str()];
    args.extend_from_slice(extra);
    (rig(transport, "outboard-virtio-blk", &args, "blk"), image)
}

/// Writes a virtio-blk request header at `at`.
fn header(d: &VirtioMmioDriver, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    d.ram().memory().write_slice(&h, GuestAddress(at)).unwrap();
}

fn status(d: &VirtioMmioDriver, at: u64) -> u8 {
    d.ram().memory().read_obj(GuestAddress(at)).unwrap()
}

/// For every queue size from 16 to 1024: writes, then reads back, one
/// request with the maximum number of 512-byte segments the device
/// advertises (seg_max, from configuration space), each segment on a page
/// of its own so none can merge. With indirect descriptors on every size;
/// with direct chains on the sizes that can hold them. Checks the data in
/// guest memory and in the backing file.
fn max_segments_round_trip(transport: Transport) {
    let sectors = 8192;
    let (mut r, image) = blk_rig(transport, "ring-maxseg", sectors, &[]);
    let probe =
        r.g.driver_with("dev", DriverOptions::new(RINGS, 16).queues(1));
    let seg_max = probe.config(12, AccessSize::B4).unwrap() as usize;
    assert!(seg_max >= 1, "seg_max {seg_max}");
    drop(probe);
    let hdr = r.g.alloc.alloc(16, 16).unwrap();
    let st = r.g.alloc.alloc(1, 1).unwrap();
    let out: Vec<u64> = (0..seg_max)
        .map(|_| r.g.alloc.alloc(0x2000, 0x1000).unwrap())
        .collect();
    let back: Vec<u64> = (0..seg_max)
        .map(|_| r.g.alloc.alloc(0x2000, 0x1000).unwrap())
        .collect();
    let mut rounds = 0;
    for (n, size) in [16u16, 32, 64, 128, 256, 512, 1024].into_iter().enumerate() {
        for indirect in [true, false] {
            if !indirect && usize::from(size) < seg_max + 2 {
                continue;
            }
            let mut d =
                r.g.driver_with("dev", DriverOptions::new(RINGS, size).queues(1));
            assert_eq!(d.queue_size(0), Some(size), "the driver's queue size");
            assert_ne!(d.features() & F_INDIRECT_DESC, 0, "indirect negotiated");
            d.set_use_indirect(indirect);
            let sector = (n as u64 * 2 + u64::from(indirect)) * seg_max as u64;
            let ram = std::sync::Arc::clone(d.ram());
            let mem = ram.memory();
            let mut expected = Vec::new();
            for (i, &at) in out.iter().enumerate() {
                let seg: Vec<u8> = (0..512)
                    .map(|b| (b as u8) ^ (i as u8) ^ (size as u8) ^ u8::from(indirect))
                    .collect();
                mem.write_slice(&seg, GuestAddress(at)).unwrap();
                expected.extend_from_slice(&seg);
            }
            let chain = |bufs: &[u64], device_writes: bool| {
                let mut c = vec![Buffer::readable(hdr, 16)];
                c.extend(bufs.iter().map(|&a| Buffer {
                    addr: a,
                    len: 512,
                    device_writes,
                }));
                c.push(Buffer::writable(st, 1));
                c
            };
            header(&d, hdr, blk::T_OUT, sector);
            d.request(0, &chain(&out, false)).unwrap();
            assert_eq!(status(&d, st), blk::S_OK, "write, queue {size}");
            header(&d, hdr, blk::T_IN, sector);
            let len = d.request(0, &chain(&back, true)).unwrap();
            assert_eq!(len as usize, seg_max * 512 + 1, "read length, queue {size}");
            assert_eq!(status(&d, st), blk::S_OK, "read, queue {size}");
            let mut got = Vec::new();
            for &at in &back {
                let mut seg = [0u8; 512];
                mem.read_slice(&mut seg, GuestAddress(at)).unwrap();
                got.extend_from_slice(&seg);
            }
            assert!(
                got == expected,
                "read back, queue {size} indirect {indirect}"
            );
            let file = std::fs::read(&image.0).unwrap();
            let at = (sector * 512) as usize;
            assert!(
                file[at..at + expected.len()] == expected[..],
                "backing file, queue {size} indirect {indirect}"
            );
            rounds += 1;
        }
    }
    assert_eq!(rounds, 7 + 4, "every size indirect, 128..1024 direct too");
}

#[test]
fn blk_when_max_segment_request_on_every_queue_size_over_ioregionfd_then_round_trips() {
    max_segments_round_trip(Transport::Ioregionfd);
}

#[test]
fn blk_when_max_segment_request_on_every_queue_size_over_vhost_user_then_round_trips() {
    max_segments_round_trip(Transport::VhostUser);
}

/// Polls until chain `head` is used, without sleeping on the interrupt.
fn poll_done(d: &mut VirtioMmioDriver, head: u16) -> u32 {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(len) = d.poll(0, head).unwrap() {
            return len;
        }
        assert!(Instant::now() < deadline, "chain {head} never used");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// EVENT_IDX on virtio-rng: with `used_event` far ahead the device raises
/// no interrupt for 50 requests the driver polls for; with `used_event`
/// set as the driver sleeps it raises exactly one for the next request.
/// Every completed drain publishes `avail_event`.
fn used_event_suppresses_interrupts(transport: Transport) {
    let mut r = rig(transport, "outboard-virtio-rng", &[], "rng");
    let mut d =
        r.g.driver_with("dev", DriverOptions::new(RINGS, 64).queues(1));
    assert_eq!(d.features() & RINGS, RINGS, "both ring features negotiated");
    let buf = r.g.alloc.alloc(64, 16).unwrap();
    let before = d.interrupts();
    for _ in 0..50 {
        d.set_used_event(0, d.avail_idx(0).unwrap().wrapping_add(1000))
            .unwrap();
        let head = d.submit(0, &[Buffer::writable(buf, 64)]).unwrap();
        d.notify(0).unwrap();
        assert_eq!(poll_done(&mut d, head), 64);
        assert_eq!(
            d.avail_event(0).unwrap(),
            d.avail_idx(0).unwrap(),
            "the device published avail_event after draining"
        );
    }
    if transport == Transport::Ioregionfd {
        // The transport latches InterruptStatus as it raises the line.
        assert_eq!(
            d.reg(0x60).unwrap() & 1,
            0,
            "no used-buffer interrupt latched"
        );
    }
    // used_event = the used index the next request makes: one interrupt.
    d.set_used_event(0, d.avail_idx(0).unwrap()).unwrap();
    let len = d.request(0, &[Buffer::writable(buf, 64)]).unwrap();
    assert_eq!(len, 64);
    assert_eq!(
        d.wait_interrupt_beyond(before, HANG_GUARD),
        Some(before + 1),
        "one interrupt for 51 requests"
    );
}

#[test]
fn event_idx_when_used_event_ahead_over_ioregionfd_then_no_interrupt_until_reached() {
    used_event_suppresses_interrupts(Transport::Ioregionfd);
}

#[test]
fn event_idx_when_used_event_ahead_over_vhost_user_then_no_interrupt_until_reached() {
    used_event_suppresses_interrupts(Transport::VhostUser);
}

/// Waits until every thread of `pid` is stopped (SIGSTOP takes effect
/// asynchronously, thread by thread).
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
            .all(|stat| {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                state.starts_with('T') || state.starts_with('t')
            });
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} never stopped");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// EVENT_IDX on virtio-rng with the backend stopped: the first chain is
/// notified, the second is not (the device has not moved avail_event past
/// the first), and the one pass the backend makes when it resumes serves
/// both.
fn avail_event_suppresses_notifications(transport: Transport) {
    let mut r = rig(transport, "outboard-virtio-rng", &[], "rng");
    let mut d =
        r.g.driver_with("dev", DriverOptions::new(F_EVENT_IDX, 64).queues(1));
    let a = r.g.alloc.alloc(64, 16).unwrap();
    let b = r.g.alloc.alloc(64, 16).unwrap();
    assert_eq!(d.request(0, &[Buffer::writable(a, 64)]).unwrap(), 64);
    let warm = d.notifications();
    signal(r.pid, libc::SIGSTOP);
    wait_stopped(r.pid);
    let h1 = d.submit(0, &[Buffer::writable(a, 64)]).unwrap();
    d.notify(0).unwrap();
    let h2 = d.submit(0, &[Buffer::writable(b, 64)]).unwrap();
    d.notify(0).unwrap();
    signal(r.pid, libc::SIGCONT);
    let n = d.notifications();
    assert_eq!(n.sent, warm.sent + 1, "only the first chain is notified");
    assert_eq!(
        n.suppressed,
        warm.suppressed + 1,
        "the second is suppressed"
    );
    assert_eq!(d.wait(0, h1).unwrap(), 64);
    assert_eq!(d.wait(0, h2).unwrap(), 64);
    assert!(alive(r.pid));
    assert_eq!(d.avail_event(0).unwrap(), d.avail_idx(0).unwrap());
}

#[test]
fn event_idx_when_backend_stopped_over_ioregionfd_then_second_notify_suppressed() {
    avail_event_suppresses_notifications(Transport::Ioregionfd);
}

#[test]
fn event_idx_when_backend_stopped_over_vhost_user_then_second_notify_suppressed() {
    avail_event_suppresses_notifications(Transport::VhostUser);
}

/// Names of the threads of process `pid`.
fn threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect()
}

/// virtio-blk with 4 queues, the driver using 2 at queue depth 8 each:
/// 400 random 4 KiB writes and reads spread over both queues, in flight at
/// once, checked against a model and the file; the backend serves the
/// queues on threads of their own.
fn two_queues_in_parallel(transport: Transport) {
    let sectors = 4096;
    let (mut r, image) = blk_rig(transport, "ring-mq", sectors, &["--num-queues", "4"]);
    let mut d =
        r.g.driver_with("dev", DriverOptions::new(RINGS | (1 << 12), 64).queues(2));
    assert_eq!(d.num_queues(), 2);
    let num_queues = d.config(34, AccessSize::B2).unwrap();
    assert_eq!(num_queues, 4, "num_queues in configuration space");
    assert_ne!(d.features() & (1 << 12), 0, "VIRTIO_BLK_F_MQ");
    struct Slot {
        hdr: u64,
        data: u64,
        st: u64,
    }
    const QD: usize = 8;
    let slots: Vec<Slot> = (0..2 * QD)
        .map(|_| Slot {
            hdr: r.g.alloc.alloc(16, 16).unwrap(),
            data: r.g.alloc.alloc(4096, 4096).unwrap(),
            st: r.g.alloc.alloc(1, 1).unwrap(),
        })
        .collect();
    let mut model = vec![0u8; (sectors * 512) as usize];
    let mut rand = Rand(0x5eed);
    let ram = std::sync::Arc::clone(d.ram());
    let mem = ram.memory();
    for _ in 0..25 {
        // Each slot a distinct 4 KiB block, so requests in flight together
        // never overlap and the model is exact whatever order they run in.
        let mut blocks: Vec<u64> = Vec::new();
        while blocks.len() < slots.len() {
            let b = rand.next_u64() % (sectors / 8);
            if !blocks.contains(&b) {
                blocks.push(b);
            }
        }
        let mut heads = Vec::new();
        let mut reads = Vec::new();
        for (i, s) in slots.iter().enumerate() {
            let q = i % 2;
            let sector = blocks[i] * 8;
            let write = rand.next_u64().is_multiple_of(2);
            header(
                &d,
                s.hdr,
                if write { blk::T_OUT } else { blk::T_IN },
                sector,
            );
            if write {
                let data: Vec<u8> = (0..4096).map(|_| rand.next_u64() as u8).collect();
                mem.write_slice(&data, GuestAddress(s.data)).unwrap();
                let at = (sector * 512) as usize;
                model[at..at + 4096].copy_from_slice(&data);
            } else {
                reads.push((i, sector));
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
            heads.push((q, d.submit(q, &bufs).unwrap()));
        }
        d.notify(0).unwrap();
        d.notify(1).unwrap();
        for (q, h) in heads {
            d.wait(q, h).unwrap();
        }
        for s in &slots {
            assert_eq!(status(&d, s.st), blk::S_OK);
        }
        for (i, sector) in reads {
            let mut got = vec![0u8; 4096];
            mem.read_slice(&mut got, GuestAddress(slots[i].data))
                .unwrap();
            let at = (sector * 512) as usize;
            assert!(got[..] == model[at..at + 4096], "read at sector {sector}");
        }
    }
    assert!(
        std::fs::read(&image.0).unwrap() == model,
        "file matches the model"
    );
    let names = threads(r.pid);
    match transport {
        Transport::Ioregionfd => {
            for q in ["virtio-blk-q0", "virtio-blk-q1"] {
                assert!(names.iter().any(|n| n == q), "thread {q} in {names:?}");
            }
        }
        // vhost-user-backend: one worker thread per queue beside main.
        Transport::VhostUser => assert!(names.len() > 4, "threads {names:?}"),
    }
}

#[test]
fn blk_when_two_queues_loaded_at_once_over_ioregionfd_then_served_in_parallel() {
    two_queues_in_parallel(Transport::Ioregionfd);
}

#[test]
fn blk_when_two_queues_loaded_at_once_over_vhost_user_then_served_in_parallel() {
    two_queues_in_parallel(Transport::VhostUser);
}

#[test]
fn vhost_user_when_frontend_acks_unoffered_feature_then_clear_error_and_next_frontend_served() {
    use vhost::vhost_user::Frontend;
    use vhost::VhostBackend;

    let (mut b, sock, log) = outboard_tests::outboard_vhost_user_logged("outboard-virtio-rng", &[]);
    let connect = || {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            match Frontend::connect(&sock, 1) {
                Ok(fe) => break fe,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("connect: {e}"),
            }
        }
    };
    let fe = connect();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_ne!(offered & RINGS, 0, "ring features offered");
    let unoffered = 1u64 << 40;
    assert_eq!(offered & unoffered, 0);
    // The backend refuses the request; without REPLY_ACK this frontend
    // sees the refusal as the connection closing.
    let _ = fe.set_features(offered | unoffered);
    let _ = fe.get_features();
    let err = outboard_tests::wait_for_text(&log, "offered");
    assert!(
        err.contains("SET_FEATURES") && err.contains("error:"),
        "clear error on stderr: {err}"
    );
    // That session is over; the backend serves the next frontend.
    drop(fe);
    let fe = connect();
    fe.set_owner().unwrap();
    assert_eq!(fe.get_features().unwrap(), offered);
    assert!(b.0.try_wait().unwrap().is_none(), "still running");
}
