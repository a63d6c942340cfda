//! The socket-driven test guest: a line script of guest accesses.
//!
//! Where no real vCPU runs, `outboard run` reads these commands (from
//! `--script FILE` or standard input) and performs them through the same
//! [`Bus`](crate::Bus) a vCPU would use. Numbers are decimal or `0x` hex;
//! `#` starts a comment.
//!
//! ```text
//! read   mmio|pio ADDR SIZE            print the value read
//! write  mmio|pio ADDR SIZE VALUE
//! expect mmio|pio ADDR SIZE VALUE      fail the script unless the read returns VALUE
//! puts   mmio|pio ADDR TEXT...         1-byte writes of TEXT and a newline (a UART's THR)
//! repeat COUNT write mmio|pio ADDR SIZE VALUE
//! reset  DEVICE
//! place  DEVICE INDEX [ADDR]
//! remove DEVICE INDEX ADDR
//! upgrade DEVICE [PROGRAM]             live upgrade: the same or another backend binary
//! kill   DEVICE                        SIGKILL the device's backend (try a restart policy)
//! devices                              print the device and region map
//! ```

use std::io::{BufRead, Write};

use thiserror::Error;

use outboard_frontend::{AccessError, Frontend, Space};

use outboard_protocol::AccessSize;

/// Why a script line failed.
#[derive(Debug, Error)]
pub enum Error {
    /// line {line}: {msg}
    #[error("line {line}: {msg}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// line {line}: access failed
    #[error("line {line}: access failed")]
    Access {
        /// 1-based line number.
        line: usize,
        /// Why.
        #[source]
        source: AccessError,
    },
    /// line {line}: expected {expected:#x}, read {got:#x}
    #[error("line {line}: expected {expected:#x}, read {got:#x}")]
    Mismatch {
        /// 1-based line number.
        line: usize,
        /// Value the script expected.
        expected: u64,
        /// Value read.
        got: u64,
    },
    /// line {line}: device operation failed
    #[error("line {line}: device operation failed")]
    Device {
        /// 1-based line number.
        line: usize,
        /// Why.
        #[source]
        source: outboard_frontend::Error,
    },
    /// cannot read or write the script streams
    #[error("cannot read or write the script streams")]
    Io(#[source] std::io::Error),
}

/// Parses a decimal or `0x` hex number.
pub fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok(),
        None => s.replace('_', "").parse().ok(),
    }
}

/// Prints the device and region map.
pub fn print_map(fe: &Frontend, out: &mut dyn Write) -> std::io::Result<()> {
    for d in fe.devices() {
        let state = match d.failure() {
            Some(why) => format!("FAILED: {why}"),
            None => "ok".to_owned(),
        };
        let pid = d.pid().map(|p| format!(" pid {p}")).unwrap_or_default();
        writeln!(out, "{} ({}{pid}): {state}", d.name(), d.info().name)?;
        for r in d.regions() {
            match d.placed(r.index) {
                Some(p) => writeln!(
                    out,
                    "  region {} {:<8} {} {:#x}+{:#x}{}",
                    r.index,
                    r.name,
                    p.space(),
                    p.addr,
                    r.size,
                    if p.posted { " posted" } else { "" }
                )?,
                None => writeln!(out, "  region {} {:<8} unplaced", r.index, r.name)?,
            }
        }
    }
    Ok(())
}

struct Line<'a> {
    no: usize,
    words: Vec<&'a str>,
}

impl<'a> Line<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Syntax {
            line: self.no,
            msg: msg.into(),
        }
    }

    fn word(&self, i: usize, what: &str) -> Result<&'a str, Error> {
        self.words
            .get(i)
            .copied()
            .ok_or_else(|| self.err(format!("missing {what}")))
    }

    fn num(&self, i: usize, what: &str) -> Result<u64, Error> {
        let w = self.word(i, what)?;
        parse_number(w).ok_or_else(|| self.err(format!("{what} {w:?} is not a number")))
    }

    fn space(&self, i: usize) -> Result<Space, Error> {
        match self.word(i, "address space")? {
            "mmio" => Ok(Space::Mmio),
            "pio" => Ok(Space::Pio),
            other => Err(self.err(format!("address space {other:?} is not mmio or pio"))),
        }
    }

    fn size(&self, i: usize) -> Result<AccessSize, Error> {
        let n = self.num(i, "size")?;
        AccessSize::from_bytes(n).map_err(|e| self.err(e.to_string()))
    }
}

/// Runs a script; returns the number of commands performed.
pub fn run(fe: &mut Frontend, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<u64, Error> {
    let mut done = 0;
    for (i, text) in input.lines().enumerate() {
        let text = text.map_err(Error::Io)?;
        let content = text.split('#').next().unwrap_or("");
        let line = Line {
            no: i + 1,
            words: content.split_whitespace().collect(),
        };
        if line.words.is_empty() {
            continue;
        }
        step(fe, &line, out)?;
        done += 1;
    }
    Ok(done)
}

fn step(fe: &mut Frontend, l: &Line<'_>, out: &mut dyn Write) -> Result<(), Error> {
    let access = |source| Error::Access { line: l.no, source };
    let device = |source| Error::Device { line: l.no, source };
    match l.words[0] {
        "read" | "expect" => {
            let (space, addr, size) = (l.space(1)?, l.num(2, "address")?, l.size(3)?);
            let v = fe.bus(space).try_read(addr, size).map_err(access)?;
            if l.words[0] == "expect" {
                let want = l.num(4, "value")?;
                if v != want {
                    return Err(Error::Mismatch {
                        line: l.no,
                        expected: want,
                        got: v,
                    });
                }
            } else {
                writeln!(out, "{space} {addr:#x} = {v:#x}").map_err(Error::Io)?;
            }
        }
        "write" => {
            let (space, addr, size, v) = (
                l.space(1)?,
                l.num(2, "address")?,
                l.size(3)?,
                l.num(4, "value")?,
            );
            fe.bus(space).try_write(addr, size, v).map_err(access)?;
        }
        "repeat" => {
            let count = l.num(1, "count")?;
            if l.word(2, "write")? != "write" {
                return Err(l.err("only `repeat COUNT write ...` is supported"));
            }
            let (space, addr, size, v) = (
                l.space(3)?,
                l.num(4, "address")?,
                l.size(5)?,
                l.num(6, "value")?,
            );
            for _ in 0..count {
                fe.bus(space).try_write(addr, size, v).map_err(access)?;
            }
        }
        "puts" => {
            let (space, addr) = (l.space(1)?, l.num(2, "address")?);
            let text = l.words[3..].join(" ");
            for b in text.bytes().chain(std::iter::once(b'\n')) {
                fe.bus(space)
                    .try_write(addr, AccessSize::B1, u64::from(b))
                    .map_err(access)?;
            }
        }
        "reset" => fe.reset(l.word(1, "device")?).map_err(device)?,
        "place" => {
            let name = l.word(1, "device")?;
            let index = u32::try_from(l.num(2, "index")?).map_err(|_| l.err("index too large"))?;
            let addr = if l.words.len() > 3 {
                Some(l.num(3, "address")?)
            } else {
                None
            };
            let at = fe.set_region(name, index, addr).map_err(device)?;
            writeln!(out, "{name} region {index} placed at {at:#x}").map_err(Error::Io)?;
        }
        "remove" => {
            let name = l.word(1, "device")?;
            let index = u32::try_from(l.num(2, "index")?).map_err(|_| l.err("index too large"))?;
            fe.remove_region(name, index, l.num(3, "address")?)
                .map_err(device)?;
        }
        "upgrade" => {
            let name = l.word(1, "device")?;
            let program = l.words.get(2).copied();
            let held = fe.upgrade(name, program).map_err(device)?;
            writeln!(
                out,
                "{name} upgraded; accesses held {} us",
                held.as_micros()
            )
            .map_err(Error::Io)?;
        }
        "kill" => {
            let name = l.word(1, "device")?;
            let pid = fe
                .device(name)
                .map_err(device)?
                .pid()
                .ok_or_else(|| l.err(format!("device {name} has no process of ours")))?;
            let pid = libc::pid_t::try_from(pid).map_err(|_| l.err("pid out of range"))?;
            // SAFETY: kill sends a signal to the backend this frontend
            // spawned (its serving process); nothing else is touched.
            if unsafe { libc::kill(pid, libc::SIGKILL) } < 0 {
                return Err(l.err(format!("kill {pid}: {}", std::io::Error::last_os_error())));
            }
        }
        "devices" => print_map(fe, out).map_err(Error::Io)?,
        other => return Err(l.err(format!("unknown command {other:?}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_number_when_hex_or_decimal_then_value() {
        assert_eq!(parse_number("0x3f8"), Some(0x3f8));
        assert_eq!(parse_number("10_000"), Some(10_000));
        assert_eq!(parse_number("0xzz"), None);
        assert_eq!(parse_number("-1"), None);
    }

    #[test]
    fn run_when_bad_line_then_syntax_error_with_line_number() {
        let mut fe = Frontend::new(crate::Options::default());
        let mut out = Vec::new();
        let err = run(
            &mut fe,
            &mut "# comment\n\nread dma 0 4\n".as_bytes(),
            &mut out,
        );
        assert!(matches!(err, Err(Error::Syntax { line: 3, .. })), "{err:?}");
        let err = run(&mut fe, &mut "read mmio 0x1000 3\n".as_bytes(), &mut out);
        assert!(matches!(err, Err(Error::Syntax { line: 1, .. })), "{err:?}");
        let err = run(&mut fe, &mut "read mmio 0x1000 4\n".as_bytes(), &mut out);
        assert!(
            matches!(
                err,
                Err(Error::Access {
                    line: 1,
                    source: AccessError::Unmapped(0x1000)
                })
            ),
            "{err:?}"
        );
    }

    /// docs/devices.md documents the script language; every command it
    /// lists must be one the runner knows.
    #[test]
    fn docs_when_listing_commands_then_every_one_is_known() {
        let doc = include_str!("../../../docs/devices.md");
        let block = doc
            .split("## The test-guest script language")
            .nth(1)
            .and_then(|s| s.split("```text").nth(1))
            .and_then(|s| s.split("```").next())
            .unwrap_or_else(|| panic!("script block missing from docs/devices.md"));
        let words: Vec<&str> = block
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(
            words,
            [
                "read", "write", "expect", "puts", "repeat", "reset", "place", "remove", "upgrade",
                "kill", "devices"
            ]
        );
        let mut fe = Frontend::new(crate::Options::default());
        for w in words {
            let mut out = Vec::new();
            let r = run(&mut fe, &mut format!("{w}\n").as_bytes(), &mut out);
            if let Err(Error::Syntax { msg, .. }) = &r {
                assert!(!msg.contains("unknown command"), "{w}: {msg}");
            }
        }
    }
}
