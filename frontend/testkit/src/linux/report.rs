//! What a guest run reports and what the host checks afterwards.
//!
//! `/init` prints `OUTBOARD-CHECK <device> <check> PASS|FAIL <detail>` per
//! check, `OUTBOARD-EXPECT <device> pattern <seed> <offset> <length>` or
//! `... zero <offset> <length>` for every range it wrote, and
//! `OUTBOARD-BENCH <device> <test> <bytes> <ns>` per measurement. Kernel
//! messages can share the console, so a marker is found anywhere in a line.
//! The host fills each image with a background pattern before the run
//! ([`fill_image`]) and afterwards compares every byte with the background
//! overlaid by the guest's expectations ([`verify_image`]): a write that
//! landed anywhere else shows up too.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use super::{pattern_fill, Error};

/// The outcome of one guest boot.
#[derive(Debug, Clone)]
pub struct Run {
    /// Everything the guest printed on its serial console.
    pub serial: String,
    /// QEMU's stderr.
    pub stderr: String,
    /// QEMU's exit status, None when it was killed at the deadline.
    pub status: Option<String>,
    /// True when QEMU was killed at the deadline.
    pub timed_out: bool,
    /// From QEMU's start to its exit.
    pub elapsed: Duration,
}

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The device's name (as given on the kernel command line).
    pub device: String,
    /// The check.
    pub name: String,
    /// PASS.
    pub passed: bool,
    /// What the guest said about it.
    pub detail: String,
}

/// A range of a device the guest wrote and the host must find in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The pattern of `seed`.
    Pattern {
        /// Its seed.
        seed: u64,
        /// Byte offset.
        off: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Zeros.
    Zero {
        /// Byte offset.
        off: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// One benchmark measurement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchSample {
    /// The device's name.
    pub device: String,
    /// The test (`dd-read-1M`, ...).
    pub test: String,
    /// Bytes moved.
    pub bytes: u64,
    /// Nanoseconds it took (guest clock).
    pub ns: u64,
}

/// The words after `OUTBOARD-<kind> ` in every line that has that marker.
fn marked<'a>(text: &'a str, kind: &'a str) -> impl Iterator<Item = Vec<&'a str>> + 'a {
    let marker = format!("OUTBOARD-{kind} ");
    text.lines().filter_map(move |l| {
        let at = l.find(&marker)?;
        Some(l[at + marker.len()..].split_whitespace().collect())
    })
}

impl Run {
    /// Every check line, in order.
    pub fn checks(&self) -> Vec<Check> {
        marked(&self.serial, "CHECK")
            .filter(|w| w.len() >= 3)
            .map(|w| Check {
                device: w[0].to_owned(),
                name: w[1].to_owned(),
                passed: w[2] == "PASS",
                detail: w[3..].join(" "),
            })
            .collect()
    }

    /// The check `name` of `device`, if the guest reported it.
    pub fn check(&self, device: &str, name: &str) -> Option<Check> {
        self.checks()
            .into_iter()
            .find(|c| c.device == device && c.name == name)
    }

    /// The ranges the guest wrote on `device`, in order.
    pub fn expectations(&self, device: &str) -> Vec<Expect> {
        let n = |s: &str| s.parse::<u64>().ok();
        marked(&self.serial, "EXPECT")
            .filter(|w| w.first() == Some(&device))
            .filter_map(|w| match w.get(1..) {
                Some(["pattern", seed, off, len]) => Some(Expect::Pattern {
                    seed: n(seed)?,
                    off: n(off)?,
                    len: n(len)?,
                }),
                Some(["zero", off, len]) => Some(Expect::Zero {
                    off: n(off)?,
                    len: n(len)?,
                }),
                _ => None,
            })
            .collect()
    }

    /// Every benchmark measurement.
    pub fn bench(&self) -> Vec<BenchSample> {
        marked(&self.serial, "BENCH")
            .filter_map(|w| match w.as_slice() {
                [device, test, bytes, ns] => Some(BenchSample {
                    device: (*device).to_owned(),
                    test: (*test).to_owned(),
                    bytes: bytes.parse().ok()?,
                    ns: ns.parse().ok()?,
                }),
                _ => None,
            })
            .collect()
    }

    /// The guest got to the end of `/init`.
    pub fn done(&self) -> bool {
        self.serial.lines().any(|l| l.contains("OUTBOARD-DONE"))
    }
}

const CHUNK: usize = 1 << 20;

/// Creates `path` as `size` bytes of the pattern of `seed`.
pub fn fill_image(path: &Path, size: u64, seed: u64) -> Result<(), Error> {
    let mut f = File::create(path).map_err(Error::io("cannot create", path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        pattern_fill(seed, off, &mut buf[..n]);
        f.write_all(&buf[..n])
            .map_err(Error::io("cannot write", path))?;
        off += n as u64;
    }
    f.sync_all().map_err(Error::io("cannot sync", path))
}

/// Compares the image at `path` with `size` bytes of the background pattern
/// of `seed` overlaid, in order, by `expects`. Returns one line per
/// mismatching 1 MiB chunk (at most 8); empty when the image is as expected.
pub fn verify_image(
    path: &Path,
    size: u64,
    seed: u64,
    expects: &[Expect],
) -> Result<Vec<String>, Error> {
    let mut f = File::open(path).map_err(Error::io("cannot open", path))?;
    let actual_size = f.metadata().map_err(Error::io("cannot stat", path))?.len();
    let mut problems = Vec::new();
    if actual_size != size {
        problems.push(format!("the image is {actual_size} bytes, not {size}"));
    }
    let mut want = vec![0u8; CHUNK];
    let mut got = vec![0u8; CHUNK];
    let mut off = 0;
    while off < size.min(actual_size) && problems.len() < 8 {
        let n = (size.min(actual_size) - off).min(CHUNK as u64) as usize;
        pattern_fill(seed, off, &mut want[..n]);
        for e in expects {
            overlay(e, off, &mut want[..n]);
        }
        f.read_exact(&mut got[..n])
            .map_err(Error::io("cannot read", path))?;
        if got[..n] == want[..n] {
            off += n as u64;
            continue;
        }
        if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
            let what = describe(expects, off + i as u64);
            problems.push(format!(
                "byte {} (in {what}) is {:#04x}, expected {:#04x}",
                off + i as u64,
                got[i],
                want[i]
            ));
        }
        off += n as u64;
    }
    Ok(problems)
}

/// Writes what `e` puts into the chunk that starts at `chunk_off`.
fn overlay(e: &Expect, chunk_off: u64, chunk: &mut [u8]) {
    let (off, len) = match *e {
        Expect::Pattern { off, len, .. } | Expect::Zero { off, len } => (off, len),
    };
    let start = off.max(chunk_off);
    let end = (off + len).min(chunk_off + chunk.len() as u64);
    if start >= end {
        return;
    }
    let range = (start - chunk_off) as usize..(end - chunk_off) as usize;
    match *e {
        Expect::Zero { .. } => chunk[range].fill(0),
        Expect::Pattern { seed, .. } => {
            // the pattern is position-based: fill from the aligned word before `start`
            let aligned = start & !7;
            let lead = (start - aligned) as usize;
            let mut tmp = vec![0u8; range.len() + lead];
            pattern_fill(seed, aligned, &mut tmp);
            chunk[range].copy_from_slice(&tmp[lead..]);
        }
    }
}

fn describe(expects: &[Expect], at: u64) -> String {
    expects
        .iter()
        .rev()
        .find(|e| match **e {
            Expect::Pattern { off, len, .. } | Expect::Zero { off, len } => {
                at >= off && at < off + len
            }
        })
        .map(|e| format!("{e:?}"))
        .unwrap_or_else(|| "the untouched background".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(serial: &str) -> Run {
        Run {
            serial: serial.to_owned(),
            stderr: String::new(),
            status: Some("exit status: 0".into()),
            timed_out: false,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn run_when_lines_mix_with_kernel_messages_then_markers_are_found() {
        let r = run("[ 1.0] virtio_blk virtio0: [vda]\n\
             OUTBOARD-CHECK ob probe PASS disk=vda queues=2\n\
             [ 2.0] x OUTBOARD-CHECK ob queues FAIL (status 1) queues=1\n\
             OUTBOARD-EXPECT ob pattern 7 0 4096\n\
             OUTBOARD-EXPECT ob zero 8192 512\n\
             OUTBOARD-EXPECT qsd zero 0 512\n\
             OUTBOARD-BENCH ob dd-read-1M 1048576 2000\n\
             OUTBOARD-DONE\n");
        let checks = r.checks();
        assert_eq!(checks.len(), 2);
        assert!(checks[0].passed && checks[0].detail == "disk=vda queues=2");
        assert!(!checks[1].passed && checks[1].name == "queues");
        assert_eq!(
            r.expectations("ob"),
            vec![
                Expect::Pattern {
                    seed: 7,
                    off: 0,
                    len: 4096
                },
                Expect::Zero {
                    off: 8192,
                    len: 512
                }
            ]
        );
        assert_eq!(r.bench()[0].ns, 2000);
        assert!(r.done());
        assert!(r.check("ob", "probe").is_some_and(|c| c.passed));
    }

    #[test]
    fn verify_image_when_guest_ranges_overlay_the_background_then_only_strays_are_reported() {
        let dir = std::env::temp_dir().join(format!("outboard-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let img = dir.join("img");
        let size = 3 * CHUNK as u64 + 4096;
        fill_image(&img, size, 5).unwrap_or_else(|e| panic!("{e}"));
        let expects = [
            Expect::Pattern {
                seed: 9,
                off: 1000,
                len: 2 * CHUNK as u64,
            },
            Expect::Zero {
                off: 3 * CHUNK as u64,
                len: 512,
            },
        ];
        // write what the guest would have written
        let mut data = std::fs::read(&img).unwrap_or_else(|e| panic!("{e}"));
        for e in &expects {
            let mut chunk = data[..].to_vec();
            overlay(e, 0, &mut chunk);
            data = chunk;
        }
        std::fs::write(&img, &data).unwrap_or_else(|e| panic!("{e}"));
        let ok = verify_image(&img, size, 5, &expects).unwrap_or_else(|e| panic!("{e}"));
        assert!(ok.is_empty(), "{ok:?}");
        // a stray write in the background is found
        data[3 * CHUNK + 1024] ^= 1;
        std::fs::write(&img, &data).unwrap_or_else(|e| panic!("{e}"));
        let problems = verify_image(&img, size, 5, &expects).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("background"), "{problems:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
