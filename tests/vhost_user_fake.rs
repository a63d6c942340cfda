//! A scripted vhost-user backend inside the test process, for what no
//! backend installed here offers: the inflight region (INFLIGHT_SHMFD;
//! qemu-storage-daemon stopped offering it in QEMU 6.0). It answers the
//! requests Outboard's frontend sends (features, protocol features
//! REPLY_ACK | MQ | INFLIGHT_SHMFD, one queue, GET_INFLIGHT_FD with a
//! region the test provides) and records each one with the fd it carried.
//! It serves no ring itself: the test plays the device in guest memory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

// vhost-user request codes.
pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const GET_INFLIGHT_FD: u32 = 31;
pub const SET_INFLIGHT_FD: u32 = 32;

const NEED_REPLY: u32 = 0x8;
const REPLY: u32 = 0x4 | 0x1;
const REPLY_ACK: u64 = 1 << 3;
/// VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES.
const FEATURES: u64 = (1 << 32) | (1 << 30);
/// MQ | REPLY_ACK | INFLIGHT_SHMFD.
const PROTOCOL: u64 = 1 | REPLY_ACK | (1 << 12);
/// Size of the inflight region the fake hands out.
pub const REGION: u64 = 4096;

/// One request the frontend sent.
#[derive(Debug)]
pub struct Msg {
    pub request: u32,
    pub payload: Vec<u8>,
    pub fd: Option<File>,
}

impl Msg {
    /// The payload's `n`th little-endian u64.
    pub fn u64_at(&self, n: usize) -> u64 {
        u64::from_le_bytes(self.payload[8 * n..8 * n + 8].try_into().unwrap())
    }

    /// A vring state's `num` (SET_VRING_BASE, SET_VRING_NUM).
    pub fn num(&self) -> u32 {
        u32::from_le_bytes(self.payload[4..8].try_into().unwrap())
    }

    /// (device, inode) of the fd it carried.
    pub fn inode(&self) -> (u64, u64) {
        let m = self.fd.as_ref().expect("an fd").metadata().unwrap();
        (m.dev(), m.ino())
    }
}

/// (device, inode) of `f`.
pub fn inode_of(f: &impl AsRawFd) -> (u64, u64) {
    let m = std::fs::metadata(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
    (m.dev(), m.ino())
}

/// A fake backend serving one frontend connection.
pub struct Fake {
    log: Arc<Mutex<Vec<Msg>>>,
    conn: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    /// Listens at `path` and serves the first frontend that connects;
    /// GET_INFLIGHT_FD hands out `region`.
    pub fn start(path: &Path, region: File) -> Fake {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let conn = Arc::new(Mutex::new(None));
        let (l, c) = (Arc::clone(&log), Arc::clone(&conn));
        let path = path.to_path_buf();
        let thread = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let _ = std::fs::remove_file(&path);
            *c.lock().unwrap() = Some(s.try_clone().unwrap());
            serve(s, &l, &region);
        });
        Fake {
            log,
            conn,
            thread: Some(thread),
        }
    }

    /// True once a `request` arrived.
    pub fn got(&self, request: u32) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.request == request)
    }

    /// Runs `f` on the messages so far.
    pub fn with_log<T>(&self, f: impl FnOnce(&[Msg]) -> T) -> T {
        f(&self.log.lock().unwrap())
    }

    /// The backend dies: its connection closes. Returns what it received.
    pub fn kill(mut self) -> Vec<Msg> {
        if let Some(s) = self.conn.lock().unwrap().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(s) = self.conn.lock().unwrap().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn serve(mut s: UnixStream, log: &Mutex<Vec<Msg>>, region: &File) {
    let mut acked = false;
    loop {
        let mut h = [0u8; 12];
        let Ok((n, fd)) = s.recv_with_fd(&mut h) else {
            return;
        };
        if n == 0 {
            return;
        }
        if n < h.len() && s.read_exact(&mut h[n..]).is_err() {
            return;
        }
        let word = |i: usize| u32::from_le_bytes(h[4 * i..4 * i + 4].try_into().unwrap());
        let (request, flags, size) = (word(0), word(1), word(2) as usize);
        let mut payload = vec![0u8; size];
        if s.read_exact(&mut payload).is_err() {
            return;
        }
        let msg = Msg {
            request,
            payload,
            fd,
        };
        let reply: Option<(Vec<u8>, Option<&File>)> = match request {
            GET_FEATURES => Some((FEATURES.to_le_bytes().to_vec(), None)),
            GET_PROTOCOL_FEATURES => Some((PROTOCOL.to_le_bytes().to_vec(), None)),
            GET_QUEUE_NUM => Some((1u64.to_le_bytes().to_vec(), None)),
            GET_VRING_BASE => Some((msg.payload.clone(), None)),
            GET_INFLIGHT_FD => {
                let mut p = msg.payload.clone();
                p[0..8].copy_from_slice(&REGION.to_le_bytes());
                p[8..16].copy_from_slice(&0u64.to_le_bytes());
                Some((p, Some(region)))
            }
            _ => {
                if request == SET_PROTOCOL_FEATURES {
                    acked = msg.u64_at(0) & REPLY_ACK != 0;
                }
                (acked && flags & NEED_REPLY != 0).then(|| (0u64.to_le_bytes().to_vec(), None))
            }
        };
        log.lock().unwrap().push(msg);
        if let Some((body, fd)) = reply {
            let mut m: Vec<u8> = [request, REPLY, body.len() as u32]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            m.extend_from_slice(&body);
            let fds: Vec<_> = fd.iter().map(|f| f.as_raw_fd()).collect();
            if s.send_with_fds(&[&m[..]], &fds).is_err() {
                return;
            }
        }
    }
}
