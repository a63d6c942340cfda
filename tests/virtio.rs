//! Virtio devices in their own processes, driven by the test guest's
//! virtio-mmio driver through the frontend's bus and shared guest RAM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::time::Duration;

use outboard_frontend::AccessSize;
use outboard_testkit::guest::{
    blk, rng_read, BlkClient, Buffer, VirtioMmioDriver, F_EVENT_IDX, F_INDIRECT_DESC,
};
use outboard_tests::{alive, guest, random_io, signal, socket_path, temp_image, Guest, HANG_GUARD};
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(10);
const RAM: u64 = outboard_tests::GUEST_RAM;

#[test]
fn rng_when_buffers_offered_then_filled_with_random_bytes() {
    let mut g = guest(T);
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
    let mut g = guest(T);
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

#[test]
fn blk_when_1000_random_4k_reads_and_writes_then_file_matches_byte_for_byte() {
    const SECTORS: u64 = 8192; // 4 MiB
    let img = temp_image("random", SECTORS);
    let mut g = guest(T);
    g.attach(
        "blk",
        "outboard-virtio-blk",
        &["--path", img.to_str().unwrap()],
    );
    let d = g.driver("blk", blk::F_FLUSH);
    let mut c = BlkClient::new(d, &mut g.alloc, 4096).unwrap();
    let (reads, writes) = random_io(&mut c, &img, SECTORS, 0x9e37_79b9_7f4a_7c15);
    assert!(reads > 400 && writes > 400);
    let _ = std::fs::remove_file(&img);
}

#[test]
fn blk_when_request_past_capacity_or_not_whole_sectors_then_ioerr() {
    let img = temp_image("bounds", 64);
    let mut g = guest(T);
    g.attach(
        "blk",
        "outboard-virtio-blk",
        &["--path", img.to_str().unwrap()],
    );
    let d = g.driver("blk", blk::F_FLUSH);
    let mut c = BlkClient::new(d, &mut g.alloc, 8192).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        c.read(64, &mut buf[..512]).unwrap(),
        blk::S_IOERR,
        "first sector past the end"
    );
    assert_eq!(
        c.read(60, &mut buf).unwrap(),
        blk::S_IOERR,
        "straddles the end"
    );
    assert_eq!(
        c.write(u64::MAX / 512, &buf[..512]).unwrap(),
        blk::S_IOERR,
        "offset overflows"
    );
    assert_eq!(
        c.raw(blk::T_IN, 0, Some((100, true))).unwrap(),
        blk::S_IOERR,
        "not whole sectors"
    );
    assert_eq!(c.raw(99, 0, None).unwrap(), blk::S_UNSUPP);
    assert_eq!(
        c.read(56, &mut buf).unwrap(),
        blk::S_OK,
        "the last 4 KiB are fine"
    );
    let _ = std::fs::remove_file(&img);
}

#[test]
fn blk_when_read_only_then_writes_fail_and_reads_work() {
    let img = temp_image("ro", 64);
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&[0xab; 512], 0)
        .unwrap();
    let mut g = guest(T);
    g.attach(
        "blk",
        "outboard-virtio-blk",
        &["--path", img.to_str().unwrap(), "--read-only"],
    );
    let d = g.driver("blk", blk::F_FLUSH | blk::F_RO);
    assert_ne!(d.features() & blk::F_RO, 0, "read-only is offered");
    let mut c = BlkClient::new(d, &mut g.alloc, 4096).unwrap();
    assert_eq!(c.write(0, &[0u8; 512]).unwrap(), blk::S_IOERR);
    let mut buf = [0u8; 512];
    assert_eq!(c.read(0, &mut buf).unwrap(), blk::S_OK);
    assert_eq!(buf, [0xab; 512], "the write did not reach the file");
    let _ = std::fs::remove_file(&img);
}

#[test]
fn blk_when_discard_and_write_zeroes_then_ranges_read_as_zero() {
    let img = temp_image("discard", 64);
    let mut g = guest(T);
    g.attach(
        "blk",
        "outboard-virtio-blk",
        &["--path", img.to_str().unwrap()],
    );
    let d = g.driver("blk", blk::F_DISCARD | blk::F_WRITE_ZEROES);
    assert_eq!(d.features() & blk::F_DISCARD, blk::F_DISCARD);
    let mut c = BlkClient::new(d, &mut g.alloc, 8192).unwrap();
    assert_eq!(c.write(0, &[0x5a; 8192]).unwrap(), blk::S_OK);
    let seg = |sector: u64, n: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s
    };
    // One segment per request: sectors 0..8 discarded, 8..16 zeroed.
    for (kind, sector) in [(blk::T_DISCARD, 0), (blk::T_WRITE_ZEROES, 8)] {
        assert_eq!(c.segment(kind, &seg(sector, 8)).unwrap(), blk::S_OK);
    }
    let mut back = vec![0u8; 8192];
    assert_eq!(c.read(0, &mut back).unwrap(), blk::S_OK);
    assert!(back.iter().all(|&b| b == 0));
    assert_eq!(
        c.segment(blk::T_DISCARD, &seg(60, 8)).unwrap(),
        blk::S_IOERR,
        "past the end"
    );
    // Flags: UNMAP (bit 0) is for write-zeroes only; other bits are unknown.
    assert_eq!(c.write(16, &[0x5a; 4096]).unwrap(), blk::S_OK);
    let flagged = |sector: u64, flags: u32| {
        let mut s = seg(sector, 8);
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    for (kind, flags, want) in [
        (blk::T_DISCARD, 1, blk::S_UNSUPP),
        (blk::T_DISCARD, 2, blk::S_UNSUPP),
        (blk::T_WRITE_ZEROES, 4, blk::S_UNSUPP),
        (blk::T_WRITE_ZEROES, 1, blk::S_OK),
    ] {
        assert_eq!(
            c.segment(kind, &flagged(16, flags)).unwrap(),
            want,
            "kind {kind} flags {flags}"
        );
    }
    let mut back = vec![0u8; 4096];
    assert_eq!(c.read(16, &mut back).unwrap(), blk::S_OK);
    assert!(
        back.iter().all(|&b| b == 0),
        "write-zeroes with UNMAP zeroed"
    );
    let _ = std::fs::remove_file(&img);
}

#[test]
fn blk_when_reset_and_reinitialized_then_data_intact() {
    let img = temp_image("reset", 256);
    let mut g = guest(T);
    g.attach(
        "blk",
        "outboard-virtio-blk",
        &["--path", img.to_str().unwrap()],
    );
    let d = g.driver("blk", blk::F_FLUSH);
    let mut c = BlkClient::new(d, &mut g.alloc, 4096).unwrap();
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 256) as u8 ^ 0x3c).collect();
    assert_eq!(c.write(16, &data).unwrap(), blk::S_OK);
    c.driver.reset().unwrap();
    assert_eq!(c.driver.status().unwrap(), 0, "reset reads back as 0");
    let d = g.driver("blk", blk::F_FLUSH);
    let mut c = BlkClient::new(d, &mut g.alloc, 4096).unwrap();
    let mut back = vec![0u8; 4096];
    assert_eq!(c.read(16, &mut back).unwrap(), blk::S_OK);
    assert_eq!(back, data);
    let _ = std::fs::remove_file(&img);
}

#[test]
fn console_when_guest_writes_and_client_types_then_both_directions_arrive() {
    let out = std::env::temp_dir().join(format!("outboard-console-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let input = socket_path("console-in");
    let mut g = guest(T);
    g.attach(
        "con",
        "outboard-virtio-console",
        &[
            "--output",
            out.to_str().unwrap(),
            "--input-socket",
            input.to_str().unwrap(),
        ],
    );
    let mut d = g.driver("con", F_INDIRECT_DESC | F_EVENT_IDX);
    assert_eq!(
        d.features() & (F_INDIRECT_DESC | F_EVENT_IDX),
        F_INDIRECT_DESC | F_EVENT_IDX,
        "ring features negotiated"
    );
    assert_eq!((d.device_id(), d.num_queues()), (3, 2));
    let mem = g.fe.memory().unwrap().clone();
    // Receive buffers first, as a driver posts them at start-up.
    let rx = g.alloc.alloc(4 * 64, 64).unwrap();
    let heads: Vec<u16> = (0..4)
        .map(|i| d.submit(0, &[Buffer::writable(rx + 64 * i, 64)]).unwrap())
        .collect();
    d.notify(0).unwrap();
    // Output.
    let tx = g.alloc.alloc(64, 8).unwrap();
    let text = b"hello from the guest\n";
    mem.memory().write_slice(text, GuestAddress(tx)).unwrap();
    d.request(1, &[Buffer::readable(tx, text.len() as u32)])
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), text);
    // Input.
    let mut client = outboard_tests::connect_stream(&input);
    std::io::Write::write_all(&mut client, b"ping\n").unwrap();
    let mut got = Vec::new();
    for &h in &heads {
        let n = d.wait(0, h).unwrap();
        let mut buf = vec![0u8; n as usize];
        let i = heads.iter().position(|&x| x == h).unwrap() as u64;
        mem.memory()
            .read_slice(&mut buf, GuestAddress(rx + 64 * i))
            .unwrap();
        got.extend(buf);
        if got.len() >= 5 {
            break;
        }
    }
    assert_eq!(got, b"ping\n");
    let _ = std::fs::remove_file(&out);
}

#[test]
fn notifies_when_rung_while_backend_stopped_then_coalesced_and_every_request_completed() {
    let mut g = guest(T);
    g.attach("rng", "outboard-virtio-rng", &[]);
    let mut d = g.driver("rng", 0);
    let pid = g.fe.device("rng").unwrap().pid().unwrap();
    let irq = g.fe.device("rng").unwrap().irq(0).unwrap().clone();
    let buf = g.alloc.alloc(32 * 16, 16).unwrap();
    signal(pid, libc::SIGSTOP);
    let heads: Vec<u16> = (0..32)
        .map(|i| {
            let h = d.submit(0, &[Buffer::writable(buf + 16 * i, 16)]).unwrap();
            d.notify(0).unwrap();
            h
        })
        .collect();
    signal(pid, libc::SIGCONT);
    for h in heads {
        assert_eq!(d.wait(0, h).unwrap(), 16);
    }
    // The driver may reap completions from the used ring before the sink
    // has counted the interrupt that announced them.
    assert!(
        irq.wait_beyond(0, HANG_GUARD).is_some(),
        "no interrupt at all"
    );
}

#[test]
fn interrupts_when_10000_requests_then_every_completion_signalled() {
    let mut g = guest(T);
    g.attach("rng", "outboard-virtio-rng", &[]);
    let mut d = g.driver("rng", 0);
    let irq = g.fe.device("rng").unwrap().irq(0).unwrap().clone();
    let buf = g.alloc.alloc(16, 16).unwrap();
    let before = irq.count();
    for _ in 0..10_000 {
        // Each wait sleeps on the interrupt line until the completion arrives.
        assert_eq!(d.request(0, &[Buffer::writable(buf, 16)]).unwrap(), 16);
    }
    // The driver may reap the last completion from the used ring before the
    // sink has counted its interrupt: wait for the count, then check it exactly.
    let counted = irq
        .wait_beyond(before + 9_999, HANG_GUARD)
        .unwrap_or(irq.count());
    assert_eq!(counted - before, 10_000, "one interrupt per completion");
}

fn expect_needs_reset(g: &mut Guest, d: &mut VirtioMmioDriver, name: &str, head: u16) {
    d.set_timeout(HANG_GUARD);
    match d.wait(0, head) {
        Err(outboard_testkit::guest::Error::NeedsReset(s)) => assert_ne!(s & 0x40, 0),
        other => panic!("expected DEVICE_NEEDS_RESET, got {other:?}"),
    }
    let dev = g.fe.device(name).unwrap();
    assert!(
        !dev.is_failed(),
        "the transport is fine; only the device state is bad"
    );
    assert!(alive(dev.pid().unwrap()), "backend alive");
}

#[test]
fn chain_when_buffer_outside_guest_memory_then_needs_reset_and_reset_recovers() {
    let mut g = guest(T);
    g.attach("rng", "outboard-virtio-rng", &[]);
    let mut d = g.driver("rng", 0);
    for addr in [RAM + 0x1000, RAM - 8, u64::MAX - 15] {
        let head = d.submit(0, &[Buffer::writable(addr, 16)]).unwrap();
        d.notify(0).unwrap();
        expect_needs_reset(&mut g, &mut d, "rng", head);
        d.reset().unwrap();
        d = g.driver("rng", 0);
    }
    let buf = g.alloc.alloc(16, 16).unwrap();
    assert_eq!(
        rng_read(&mut d, buf, 16).unwrap().len(),
        16,
        "works again after reset"
    );
}

#[test]
fn chain_when_descriptor_loops_then_needs_reset() {
    let img = temp_image("loop", 64);
    let mut g = guest(T);
    g.attach(
        "blk",
        "outboard-virtio-blk",
        &["--path", img.to_str().unwrap()],
    );
    let mut d = g.driver("blk", 0);
    let hdr = g.alloc.alloc(16, 16).unwrap();
    let head = d.submit(0, &[Buffer::readable(hdr, 16)]).unwrap();
    // Make the descriptor its own successor before the device looks.
    let at = d.descriptor_address(0, head).unwrap();
    let mem = g.fe.memory().unwrap().clone();
    mem.memory().write_obj(1u16, GuestAddress(at + 12)).unwrap();
    mem.memory().write_obj(head, GuestAddress(at + 14)).unwrap();
    d.notify(0).unwrap();
    expect_needs_reset(&mut g, &mut d, "blk", head);
    let _ = std::fs::remove_file(&img);
}

#[test]
fn chain_when_wrong_direction_then_ioerr_or_needs_reset() {
    let img = temp_image("direction", 64);
    let mut g = guest(T);
    g.attach(
        "blk",
        "outboard-virtio-blk",
        &["--path", img.to_str().unwrap()],
    );
    let mut d = g.driver("blk", 0);
    let hdr = g.alloc.alloc(16, 16).unwrap();
    let status = g.alloc.alloc(1, 1).unwrap();
    let mem = g.fe.memory().unwrap().clone();
    // Header in a device-writable buffer: unreadable, but a status byte exists.
    mem.memory()
        .write_obj(0xffu8, GuestAddress(status))
        .unwrap();
    d.request(0, &[Buffer::writable(hdr, 16), Buffer::writable(status, 1)])
        .unwrap();
    assert_eq!(
        mem.memory().read_obj::<u8>(GuestAddress(status)).unwrap(),
        blk::S_IOERR
    );
    // Nothing writable at all: no way to answer.
    let head = d.submit(0, &[Buffer::readable(hdr, 16)]).unwrap();
    d.notify(0).unwrap();
    expect_needs_reset(&mut g, &mut d, "blk", head);
    let _ = std::fs::remove_file(&img);
}

#[test]
fn memory_table_when_extended_while_idle_then_device_uses_new_mapping() {
    let mut g = guest(T);
    g.attach("rng", "outboard-virtio-rng", &[]);
    let mut d = g.driver("rng", 0);
    let buf = g.alloc.alloc(64, 16).unwrap();
    assert_eq!(rng_read(&mut d, buf, 64).unwrap().len(), 64);
    // Hotplug: keep the RAM (and the queues in it), add a region at 4 GiB.
    let bigger =
        g.fe.memory()
            .unwrap()
            .extend(&[(1 << 32, 1 << 20)])
            .unwrap();
    g.fe.set_memory(bigger).unwrap();
    d.set_ram(g.fe.memory().unwrap().clone());
    let high = rng_read(&mut d, (1 << 32) + 0x800, 4096).unwrap();
    assert_eq!(high.len(), 4096);
    assert!(high.iter().any(|&b| b != 0));
    assert_eq!(
        rng_read(&mut d, buf, 64).unwrap().len(),
        64,
        "old RAM still works"
    );
}

#[test]
fn blk_when_one_request_moves_a_megabyte_then_streamed_in_chunks_intact() {
    let img = temp_image("big", 4096);
    let mut g = guest(T);
    g.attach(
        "blk",
        "outboard-virtio-blk",
        &["--path", img.to_str().unwrap()],
    );
    let d = g.driver("blk", 0);
    let mut c = BlkClient::new(d, &mut g.alloc, 1 << 20).unwrap();
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i / 4096 + i) as u8).collect();
    assert_eq!(c.write(100, &data).unwrap(), blk::S_OK);
    let mut back = vec![0u8; 1 << 20];
    assert_eq!(c.read(100, &mut back).unwrap(), blk::S_OK);
    assert!(back == data, "1 MiB round trip");
    let _ = std::fs::remove_file(&img);
}

#[test]
fn console_when_input_outruns_the_guest_then_backpressure_and_no_byte_lost() {
    let input = socket_path("console-flood");
    let mut g = guest(T);
    g.attach(
        "con",
        "outboard-virtio-console",
        &[
            "--output",
            "/dev/null",
            "--input-socket",
            input.to_str().unwrap(),
        ],
    );
    let mut d = g.driver("con", F_INDIRECT_DESC | F_EVENT_IDX);
    assert_eq!(
        d.features() & (F_INDIRECT_DESC | F_EVENT_IDX),
        F_INDIRECT_DESC | F_EVENT_IDX,
        "ring features negotiated"
    );
    let total: usize = 3 << 20; // three times what the backend buffers
    let mut client = outboard_tests::connect_stream(&input);
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        std::io::Write::write_all(&mut client, &data).unwrap();
    });
    // Let the backend fill up and stop reading before the guest offers buffers.
    std::thread::sleep(Duration::from_millis(200));
    let mem = g.fe.memory().unwrap().clone();
    let rx = g.alloc.alloc(16 * 65536, 4096).unwrap();
    let mut got: Vec<u8> = Vec::with_capacity(total);
    let mut heads: std::collections::VecDeque<(u16, u64)> = (0..16u64)
        .map(|i| {
            (
                d.submit(0, &[Buffer::writable(rx + i * 65536, 65536)])
                    .unwrap(),
                i,
            )
        })
        .collect();
    d.notify(0).unwrap();
    while got.len() < total {
        let (h, i) = heads.pop_front().unwrap();
        let n = d
            .wait(0, h)
            .unwrap_or_else(|e| panic!("{e} after {} bytes", got.len()));
        let mut buf = vec![0u8; n as usize];
        mem.memory()
            .read_slice(&mut buf, GuestAddress(rx + i * 65536))
            .unwrap();
        got.extend(buf);
        heads.push_back((
            d.submit(0, &[Buffer::writable(rx + i * 65536, 65536)])
                .unwrap(),
            i,
        ));
        d.notify(0).unwrap();
    }
    writer.join().unwrap();
    assert_eq!(got.len(), total);
    assert!(
        got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8),
        "bytes in order"
    );
}

#[test]
fn features_ok_when_driver_asks_for_unoffered_feature_then_refused() {
    let mut g = guest(T);
    g.attach("rng", "outboard-virtio-rng", &[]);
    let base = g.fe.device("rng").unwrap().placed(0).unwrap().addr;
    let bus = g.fe.mmio().clone();
    let w = |off: u64, v: u64| bus.try_write(base + off, AccessSize::B4, v).unwrap();
    let r = |off: u64| bus.try_read(base + off, AccessSize::B4).unwrap();
    assert_eq!(r(0x000), 0x7472_6976, "magic");
    for (features_hi, accepted) in [(1u64 << 28, false), (0, false), (1, true)] {
        w(0x070, 0);
        w(0x070, 1 | 2);
        w(0x024, 1);
        // VERSION_1 is bit 32; bit 60 is offered by no device here.
        w(0x020, features_hi);
        w(0x070, 1 | 2 | 8);
        assert_eq!(
            r(0x070) & 8 != 0,
            accepted,
            "high feature word {features_hi:#x}"
        );
    }
}
