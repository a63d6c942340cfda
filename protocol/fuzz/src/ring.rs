//! The command ring (docs/protocol.md 7.11) under a hostile peer: whatever
//! the other side writes into the shared area, the checked accessors only
//! ever hand out indices within the spec's bounds, and nothing panics.

use std::sync::atomic::{AtomicU32, Ordering};

use outboard_protocol::ring::{Ring, HEADER_SIZE};
use outboard_protocol::{AccessSize, Cmd};

/// Offsets a hostile peer writes to (tail, fe_waiting, head, be_sleeping,
/// resp_seq and the two halves of resp_data).
const FIELDS: [usize; 7] = [64, 68, 128, 132, 136, 144, 148];

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    for (k, x) in w.iter_mut().enumerate() {
        *x = b.get(i + k).copied().unwrap_or(0);
    }
    u32::from_le_bytes(w)
}

/// The first byte picks the ring's size (8 << (b % 10)); the rest is a
/// script of 5-byte steps: one byte says what to do, four give a value.
/// Steps either write a value into a shared field, as the peer may at any
/// time, or make an honest call of either half, and each call's result is
/// checked against the invariants of docs/protocol.md 7.11.
pub fn cmd_ring(data: &[u8]) {
    let Some((&first, script)) = data.split_first() else {
        return;
    };
    let entries = 8u32 << (first % 10);
    let Ok((front, fd)) = Ring::create(entries) else {
        return;
    };
    let Ok(back) = Ring::open(&fd, entries) else {
        panic!("a fresh ring must open");
    };
    // A second view of the area, as the peer's own mapping.
    let len = HEADER_SIZE;
    // SAFETY: a fresh shared mapping of the first page of an open memfd at
    // least HEADER_SIZE long; the kernel picks the address.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            0,
        )
    };
    assert_ne!(raw, libc::MAP_FAILED, "map the ring's header");
    let peer = |off: usize| -> &AtomicU32 {
        // SAFETY: `off` is one of FIELDS: 4-aligned and inside the mapped
        // header, which stays mapped until the munmap below, after the
        // last use of this closure.
        unsafe { &*raw.cast::<u8>().add(off).cast::<AtomicU32>() }
    };
    let (mut head, mut tail, mut seen, mut last) = (0u32, 0u32, 0u32, 0u32);
    for step in script.chunks(5) {
        let op = step[0];
        let v = u32_at(step, 1);
        match op % 8 {
            0 => {
                peer(FIELDS[(v as usize) % FIELDS.len()]).store(v.rotate_left(7), Ordering::SeqCst)
            }
            1 => {
                // Backend: how far it may read.
                if let Ok(t) = back.published(head) {
                    assert!(t.wrapping_sub(head) <= entries, "tail {t} head {head}");
                    // Every position up to it can be taken and decoded (or refused).
                    let mut p = head;
                    while p != t {
                        let _ = Cmd::decode(&back.take(p));
                        p = p.wrapping_add(1);
                    }
                    head = t;
                }
            }
            2 => {
                // Frontend: publish an honest command if there is room.
                if tail.wrapping_sub(seen) < entries {
                    front.put(
                        tail,
                        &Cmd::read(1, u64::from(v % 64), AccessSize::B4).encode(),
                    );
                    tail = tail.wrapping_add(1);
                    let _ = front.publish(tail);
                }
            }
            3 => {
                // Frontend: how far the backend says it consumed.
                if let Ok(h) = front.consumed(seen, tail) {
                    assert!(h.wrapping_sub(seen) <= tail.wrapping_sub(seen), "head {h}");
                    seen = h;
                }
            }
            4 => {
                // Frontend: the answer to the last command, if any.
                let pos = tail.wrapping_sub(1);
                match front.response(pos, last) {
                    Ok(Some(_)) => {
                        assert_eq!(peer(136).load(Ordering::SeqCst), pos.wrapping_add(1));
                        last = pos.wrapping_add(1);
                    }
                    Ok(None) => assert_eq!(peer(136).load(Ordering::SeqCst), last),
                    Err(_) => {}
                }
            }
            5 => {
                // Backend: complete honestly up to its head, answering `v`.
                let _ = back.complete(head, Some((head.wrapping_sub(1), u64::from(v))));
            }
            6 => {
                let _ = back.take(v);
            }
            _ => {
                front.set_frontend_waiting(v & 1 == 1);
                back.set_backend_sleeping(v & 2 == 2);
            }
        }
    }
    // SAFETY: the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(raw, len) };
}
