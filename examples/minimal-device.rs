//! A complete Outboard backend in a few dozen lines: a "mailbox" device with
//! one 16-byte MMIO region.
//!
//! | offset | access | meaning                               |
//! |--------|--------|---------------------------------------|
//! | 0x0    | RW, 4  | the mailbox value                     |
//! | 0x4    | RO, 4  | how many times the mailbox was written |
//!
//! Try it:
//!
//! ```text
//! cargo run --example minimal-device -- --socket /tmp/mailbox.sock &
//! printf 'write mmio 0xd0000000 4 42\nread mmio 0xd0000004 4\n' \
//!     | cargo run --bin outboard -- run --connect /tmp/mailbox.sock
//! ```

use std::process::ExitCode;

use outboard::{Access, AccessSize, Device, DeviceDescription, Region};

#[derive(Default)]
struct Mailbox {
    value: u32,
    writes: u32,
}

impl Device for Mailbox {
    fn describe(&self) -> DeviceDescription {
        DeviceDescription::new("mailbox")
            .region(Region::mmio("mailbox", 16).access_sizes(&[AccessSize::B4]))
    }

    fn read(&mut self, access: Access) -> u64 {
        match access.offset {
            0 => u64::from(self.value),
            4 => u64::from(self.writes),
            _ => 0,
        }
    }

    fn write(&mut self, access: Access, value: u64) {
        if access.offset == 0 {
            self.value = value as u32;
            self.writes += 1;
        }
    }

    fn reset(&mut self) {
        *self = Mailbox::default();
    }
}

/// No options beyond the ones every backend has.
#[derive(clap::Args)]
struct Options {}

fn main() -> ExitCode {
    outboard::run("mailbox", std::env::args_os(), |_: Options| {
        Ok::<_, std::convert::Infallible>(Mailbox::default())
    })
}
