//! Outboard's vhost-user backends survive their frontends: one backend
//! process serves frontend after frontend (Outboard's own frontend and a
//! raw vhost-user frontend), and with INFLIGHT_SHMFD a session handed an
//! inflight area with a head still in flight serves that head first and
//! exactly once, whatever SET_VRING_BASE says.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use outboard_testkit::guest::{blk, BlkClient};
use outboard_tests::{guest, outboard_vhost_user, random_io, temp_image, HANG_GUARD};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryMmap, MmapRegion, VolatileMemory as _,
};
use vmm_sys_util::eventfd::EventFd;

const T: Duration = Duration::from_secs(10);

#[test]
fn outboard_blk_over_vhost_user_when_frontends_come_one_after_another_then_each_is_served() {
    let sectors = 2048;
    let image = temp_image("vu-again", sectors);
    // Confined: every session after the first runs under the seccomp
    // allowlist installed before the first.
    let (mut b, sock) = outboard_vhost_user(
        "outboard-virtio-blk",
        &[
            "--path",
            image.to_str().unwrap(),
            "--num-queues",
            "2",
            "--sandbox",
        ],
    );
    for round in 0..3u64 {
        let mut g = guest(T);
        g.attach_vhost("ob", &sock, "blk");
        let d = g.driver("ob", blk::F_FLUSH);
        let mut c = BlkClient::new(d, &mut g.alloc, 4096).unwrap();
        assert_eq!(c.capacity().unwrap(), sectors, "round {round}");
        random_io(&mut c, &image, sectors, 0x5eed_0000 + round);
        // The frontend goes away; the backend waits for the next one.
        drop(c);
        drop(g);
        assert!(b.0.try_wait().unwrap().is_none(), "round {round}: exited");
    }
    let _ = std::fs::remove_file(&image);
}

/// Guest memory shared with the backend, and where things are in it.
const MEM: u64 = 1 << 20;
/// The frontend's (made-up) address of guest memory, as SET_MEM_TABLE says.
const VA: u64 = 0x7000_0000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const QUEUE_SIZE: u16 = 16;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// A raw vhost-user frontend on one blk queue.
struct Raw {
    fe: Frontend,
    mem: GuestMemoryMmap<()>,
    memfd: File,
    kick: EventFd,
    call: EventFd,
}

fn memfd(name: &std::ffi::CStr, size: u64, seal: bool) -> File {
    let flags = libc::MFD_CLOEXEC | if seal { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: memfd_create just returned this fd to us.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size).unwrap();
    f
}

impl Raw {
    /// Connects and negotiates INFLIGHT_SHMFD (the guest memory is new).
    fn connect(sock: &Path) -> Raw {
        let memfd = memfd(c"vu-reconnect-ram", MEM, false);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM as usize,
            Some(FileOffset::new(memfd.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        Raw::connect_with(sock, mem, memfd)
    }

    /// Connects with the guest memory of an earlier session.
    fn connect_with(sock: &Path, mem: GuestMemoryMmap<()>, memfd: File) -> Raw {
        let deadline = Instant::now() + HANG_GUARD;
        let mut fe = loop {
            match Frontend::connect(sock, 1) {
                Ok(fe) => break fe,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("connect: {e}"),
            }
        };
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let pf = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_ne!(offered & pf, 0);
        fe.set_features(VIRTIO_F_VERSION_1 | pf).unwrap();
        let protocol = fe.get_protocol_features().unwrap();
        assert!(
            protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            "INFLIGHT_SHMFD offered: {protocol:?}"
        );
        fe.set_protocol_features(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            .unwrap();
        Raw {
            fe,
            mem,
            memfd,
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(0).unwrap(),
        }
    }

    /// Hands over the inflight area, then starts queue 0 at `base` (the
    /// order QEMU's vhost-user-blk uses).
    fn start(&mut self, area: &File, d: &VhostUserInflight, base: u16) {
        self.fe.set_inflight_fd(d, area.as_raw_fd()).unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM,
            userspace_addr: VA,
            mmap_offset: 0,
            mmap_handle: self.memfd.as_raw_fd(),
        };
        self.fe.set_mem_table(&[region]).unwrap();
        self.fe.set_vring_num(0, QUEUE_SIZE).unwrap();
        self.fe.set_vring_base(0, base).unwrap();
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: VA + DESC,
            used_ring_addr: VA + USED,
            avail_ring_addr: VA + AVAIL,
            log_addr: None,
        };
        self.fe.set_vring_addr(0, &config).unwrap();
        self.fe.set_vring_call(0, &self.call).unwrap();
        self.fe.set_vring_kick(0, &self.kick).unwrap();
        self.fe.set_vring_enable(0, true).unwrap();
    }

    /// Writes descriptor `i`.
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(DESC + 16 * u64::from(i)))
            .unwrap();
    }

    /// A blk request at heads `head`, `head + 1`, `head + 2`: `kind` (0 read,
    /// 1 write) of 512 bytes at `sector`, data buffer filled with `fill`.
    fn request(&self, head: u16, kind: u32, sector: u64, fill: u8) {
        let hdr = 0x10000 + 0x100 * u64::from(head);
        let data = 0x20000 + 0x1000 * u64::from(head);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem
            .write_slice(&[fill; 512], GuestAddress(data))
            .unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(status(head)))
            .unwrap();
        let data_flags = if kind == 0 { VRING_DESC_F_WRITE } else { 0 };
        self.desc(head, hdr, 16, VRING_DESC_F_NEXT, head + 1);
        self.desc(
            head + 1,
            data,
            512,
            data_flags | VRING_DESC_F_NEXT,
            head + 2,
        );
        self.desc(head + 2, status(head), 1, VRING_DESC_F_WRITE, 0);
    }

    /// Makes `head` available at ring index `pos` (and the index `pos + 1`).
    fn publish(&self, pos: u16, head: u16) {
        let at = AVAIL + 4 + 2 * u64::from(pos % QUEUE_SIZE);
        self.mem
            .write_obj(head.to_le_bytes(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_obj((pos + 1).to_le_bytes(), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        u16::from_le_bytes(self.mem.read_obj(GuestAddress(USED + 2)).unwrap())
    }

    fn used_id(&self, pos: u16) -> u32 {
        let at = USED + 4 + 8 * u64::from(pos % QUEUE_SIZE);
        u32::from_le_bytes(self.mem.read_obj(GuestAddress(at)).unwrap())
    }

    /// Waits until the used index reaches `idx` (the hang guard bounds it).
    fn wait_used(&self, idx: u16) {
        let deadline = Instant::now() + HANG_GUARD;
        while self.used_idx() < idx {
            assert!(
                Instant::now() < deadline,
                "used index stuck at {}",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn status(head: u16) -> u64 {
    0x30000 + u64::from(head)
}

/// The inflight area's fields, as the specification lays them out.
struct Area(MmapRegion<()>);

impl Area {
    fn map(f: &File, size: u64) -> Area {
        Area(
            MmapRegion::from_file(FileOffset::new(f.try_clone().unwrap(), 0), size as usize)
                .unwrap(),
        )
    }
    fn u16_at(&self, off: usize) -> u16 {
        self.0
            .as_volatile_slice()
            .load::<u16>(off, std::sync::atomic::Ordering::Acquire)
            .unwrap()
    }
    fn inflight(&self, head: u16) -> u8 {
        self.0
            .as_volatile_slice()
            .load::<u8>(
                16 + 16 * usize::from(head),
                std::sync::atomic::Ordering::Acquire,
            )
            .unwrap()
    }
    /// Marks `head` in flight with `counter`, as a backend that popped it
    /// and died would have left it.
    fn mark(&self, head: u16, counter: u64) {
        let s = self.0.as_volatile_slice();
        let e = 16 + 16 * usize::from(head);
        s.store(counter, e + 8, std::sync::atomic::Ordering::Release)
            .unwrap();
        s.store(1u8, e, std::sync::atomic::Ordering::Release)
            .unwrap();
    }
}

#[test]
fn vhost_user_when_next_session_gets_an_area_with_a_head_in_flight_then_served_first_and_once() {
    let sectors = 64;
    let image = temp_image("vu-inflight", sectors);
    // Confined: making the inflight memfd, sealing and mapping it, and the
    // second session are all inside the seccomp allowlist.
    let (mut b, sock) = outboard_vhost_user(
        "outboard-virtio-blk",
        &[
            "--path",
            image.to_str().unwrap(),
            "--num-queues",
            "1",
            "--sandbox",
        ],
    );

    // Session 1: a new area from GET_INFLIGHT_FD, one write served.
    let mut s1 = Raw::connect(&sock);
    let asked = VhostUserInflight::new(0, 0, 1, QUEUE_SIZE);
    let (d, area_fd) = s1.fe.get_inflight_fd(&asked).unwrap();
    assert_eq!(
        (d.num_queues, d.queue_size, d.mmap_offset),
        (1, QUEUE_SIZE, 0)
    );
    assert!(d.mmap_size >= 16 + 16 * u64::from(QUEUE_SIZE));
    // SAFETY: F_GET_SEALS reads the seals of a valid fd.
    let seals = unsafe { libc::fcntl(area_fd.as_raw_fd(), libc::F_GET_SEALS) };
    assert_ne!(seals & libc::F_SEAL_SHRINK, 0, "sealed: {seals:#x}");
    let area = Area::map(&area_fd, d.mmap_size);
    assert_eq!(area.u16_at(8), 0, "a new area is zeroed (version 0)");
    s1.start(&area_fd, &d, 0);
    s1.request(0, 1, 0, 0xa1);
    s1.publish(0, 0);
    s1.kick.write(1).unwrap();
    s1.wait_used(1);
    assert_eq!(s1.used_id(0), 0);
    assert_eq!(s1.mem.read_obj::<u8>(GuestAddress(status(0))).unwrap(), 0);
    // The backend recorded it: version 1, used index 1, nothing in flight.
    assert_eq!(
        (area.u16_at(8), area.u16_at(10), area.u16_at(14)),
        (1, QUEUE_SIZE, 1)
    );
    assert_eq!(area.inflight(0), 0);

    // The state a backend leaves when it dies after popping the next
    // request (a write of 0xb2 to sector 8, heads 3..=5) and before
    // completing it: available at ring index 1, in flight in the area, not
    // on the used ring.
    let Raw {
        fe,
        mem,
        memfd,
        kick,
        call,
    } = s1;
    drop((fe, kick, call));
    let mut s2 = Raw::connect_with(&sock, mem, memfd);
    s2.request(3, 1, 8, 0xb2);
    s2.publish(1, 3);
    area.mark(3, 1);

    // Session 2, same backend process: the frontend's SET_VRING_BASE says
    // the request was taken already (2, as a stale GET_VRING_BASE would);
    // the area says it is in flight. Nobody kicks: the backend serves it on
    // its own when the vring starts.
    s2.start(&area_fd, &d, 2);
    s2.wait_used(2);
    assert_eq!(s2.used_id(1), 3, "the head in flight, resubmitted");
    assert_eq!(s2.mem.read_obj::<u8>(GuestAddress(status(3))).unwrap(), 0);
    let file = std::fs::read(&image).unwrap();
    assert!(file[8 * 512..9 * 512].iter().all(|&x| x == 0xb2), "written");
    assert_eq!(area.inflight(3), 0, "cleared once used");
    // The next request (a read of sector 8, heads 6..=8) comes after it,
    // and nothing was completed twice: two more used entries, not three.
    s2.request(6, 0, 8, 0);
    s2.publish(2, 6);
    s2.kick.write(1).unwrap();
    s2.wait_used(3);
    assert_eq!(s2.used_id(2), 6);
    let mut got = [0u8; 512];
    s2.mem
        .read_slice(&mut got, GuestAddress(0x20000 + 0x1000 * 6))
        .unwrap();
    assert!(got.iter().all(|&x| x == 0xb2), "read back");
    assert_eq!(s2.used_idx(), 3, "each request completed once");
    assert_eq!(area.u16_at(14), 3);
    assert!(b.0.try_wait().unwrap().is_none(), "still running");
    let _ = std::fs::remove_file(&image);
}
