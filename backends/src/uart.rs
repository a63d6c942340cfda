//! `outboard-uart`: a 16550A UART (vm-superio's `Serial`) on one PIO region.
//!
//! The region is 8 ports wide, accepts 1-byte accesses only, prefers PIO
//! 0x3f8 (COM1) and accepts posted writes: the guest's transmit writes never
//! wait for the backend. Guest output goes to this process's stdout or to a
//! file (`--output PATH`). Guest input comes from a Unix socket
//! (`--input-socket PATH`, one client at a time) or from standard input
//! (`--input stdin`); bytes enter the receive FIFO only while it has room,
//! and reading resumes when the guest drains it. The UART raises its one
//! edge-triggered interrupt line (index 0) on the 16550's interrupt
//! conditions; until the frontend connects the line, raises are dropped.
//! The UART never needs guest memory, so it never gets any.

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use log::{error, warn};
use outboard::state::{read_blob, DeviceState, Error as StateError, Writer};
use outboard::{
    Access, AccessSize, Device, DeviceDescription, DeviceKind, EventOps, Interrupt, InterruptLine,
    Region,
};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::input::{self, Input};
use crate::Output;

/// The conventional COM1 base port.
pub const COM1: u64 = 0x3f8;
/// Offset of the receive buffer / transmit holding register.
const RBR: u8 = 0;
/// Bytes taken from the input per event (the 16550's FIFO size).
const CHUNK: usize = 64;

/// Where guest input comes from, besides `--input-socket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputKind {
    /// No input.
    None,
    /// This process's standard input.
    Stdin,
}

/// `outboard-uart`: a 16550A UART on one PIO region.
#[derive(Debug, clap::Args)]
pub struct UartArgs {
    /// Where the guest's output goes: "stdout" or a file path (appended to).
    #[arg(long, value_name = "stdout|PATH", default_value = "stdout")]
    pub output: String,
    /// Read guest input from standard input ("stdin") or not at all ("none").
    #[arg(long, value_enum, default_value = "none")]
    pub input: InputKind,
    /// Listen on this Unix socket; bytes a client sends become guest input.
    #[arg(long, value_name = "PATH", conflicts_with = "input")]
    pub input_socket: Option<PathBuf>,
}

/// The UART's interrupt line as vm-superio's trigger: whatever line the
/// frontend connected, or nothing yet.
#[derive(Debug, Clone, Default)]
pub struct IrqLine(Arc<Mutex<Option<InterruptLine>>>);

impl IrqLine {
    fn connect(&self, line: InterruptLine) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(line);
    }
}

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        match &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(line) => line.trigger(),
            None => Ok(()),
        }
    }
}

type Uart16550 = Serial<IrqLine, NoEvents, Output>;

/// The UART device model.
pub struct Uart {
    serial: Option<Uart16550>,
    irq: IrqLine,
    input: Input,
    /// Counts accesses, resets, input and restores: every one may change
    /// the registers or the FIFO ([`Device::state_generation`]).
    generation: u64,
}

/// Format version of the UART's saved state: the 16550's nine registers
/// and the receive FIFO (vm-superio's `SerialState`).
pub const STATE_VERSION: u32 = 1;

impl std::fmt::Debug for Uart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uart")
            .field("input", &self.input)
            .finish_non_exhaustive()
    }
}

impl Uart {
    /// A UART writing the guest's output to `out`, with guest input from `input`.
    pub fn new(out: Output, input: Input) -> Self {
        let irq = IrqLine::default();
        Uart {
            serial: Some(Serial::new(irq.clone(), out)),
            irq,
            input,
            generation: 0,
        }
    }

    /// A UART configured from the command line.
    pub fn from_args(args: UartArgs) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let out = crate::open_output(&args.output)?;
        let input = match (&args.input_socket, args.input) {
            (Some(path), _) => Input::socket(path)?,
            (None, InputKind::Stdin) => Input::stdin()?,
            (None, InputKind::None) => Input::none(),
        };
        Ok(Uart::new(out, input))
    }

    /// Room left in the receive FIFO.
    fn room(&self) -> usize {
        self.serial.as_ref().map_or(0, Serial::fifo_capacity)
    }
}

impl Device for Uart {
    fn syscalls(&self) -> &'static [i64] {
        // Accepting a client on the input socket.
        &[libc::SYS_accept4]
    }

    fn describe(&self) -> DeviceDescription {
        DeviceDescription::new("uart-16550a")
            .kind(DeviceKind::UART)
            .region(
                Region::pio("com", 8)
                    .access_sizes(&[AccessSize::B1])
                    .posted_writes()
                    .preferred_addr(COM1),
            )
            .interrupt(Interrupt { level: false })
    }

    fn read(&mut self, access: Access) -> u64 {
        self.generation += 1;
        let Some(s) = self.serial.as_mut() else {
            return u64::MAX;
        };
        let offset = access.offset as u8;
        let value = s.read(offset);
        if offset == RBR && self.input.is_paused() && self.room() > 0 {
            // The guest made room in the FIFO: take input again.
            self.input.resume();
        }
        u64::from(value)
    }

    fn write(&mut self, access: Access, value: u64) {
        self.generation += 1;
        let offset = access.offset;
        if let Some(s) = self.serial.as_mut() {
            if let Err(e) = s.write(offset as u8, value as u8) {
                error!("uart write at offset {offset}: {e}");
            }
        }
    }

    fn reset(&mut self) {
        self.generation += 1;
        if let Some(old) = self.serial.take() {
            self.serial = Some(Serial::new(self.irq.clone(), old.into_writer()));
        }
        // The FIFO is empty again.
        self.input.resume();
    }

    fn init(&mut self, ops: &EventOps) -> io::Result<()> {
        self.input.init(ops)
    }

    fn handle_event(&mut self, id: u32, _ops: &EventOps) {
        let mut buf = [0u8; CHUNK];
        let room = self.room().min(CHUNK);
        let n = self.input.on_event(id, &mut buf[..room]);
        if n > 0 {
            self.generation += 1;
            if let Some(s) = self.serial.as_mut() {
                if let Err(e) = s.enqueue_raw_bytes(&buf[..n]) {
                    warn!("uart input: {e}");
                }
            }
        }
        if id != input::LISTENER && self.room() == 0 {
            self.input.pause();
        }
    }

    fn connect_interrupt(&mut self, index: usize, line: InterruptLine) {
        if index == 0 {
            self.irq.connect(line);
        }
    }

    fn save(&self) -> Option<DeviceState> {
        let st = self.serial.as_ref()?.state();
        let mut w = Writer::default();
        w.u8(st.baud_divisor_low)
            .u8(st.baud_divisor_high)
            .u8(st.interrupt_enable)
            .u8(st.interrupt_identification)
            .u8(st.line_control)
            .u8(st.line_status)
            .u8(st.modem_control)
            .u8(st.modem_status)
            .u8(st.scratch)
            .blob(&st.in_buffer);
        Some(DeviceState::new(STATE_VERSION, w.bytes))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        let mut r = state.reader(STATE_VERSION)?;
        let mut b = || r.u8().map_err(StateError::Area);
        let st = SerialState {
            baud_divisor_low: b()?,
            baud_divisor_high: b()?,
            interrupt_enable: b()?,
            interrupt_identification: b()?,
            line_control: b()?,
            line_status: b()?,
            modem_control: b()?,
            modem_status: b()?,
            scratch: b()?,
            in_buffer: read_blob(&mut r)?.to_vec(),
        };
        r.end().map_err(StateError::Area)?;
        if st.in_buffer.len() > CHUNK {
            return Err(StateError::Invalid("receive FIFO over 64 bytes"));
        }
        let Some(old) = self.serial.take() else {
            return Err(StateError::Invalid("the UART is gone"));
        };
        let out = old.into_writer();
        // from_state raises the interrupt the restored registers call for.
        let serial = match Serial::from_state(&st, self.irq.clone(), NoEvents, out) {
            Ok(s) => s,
            Err(e) => {
                warn!("uart restore: {e}");
                return Err(StateError::Invalid("receive FIFO over 64 bytes"));
            }
        };
        self.serial = Some(serial);
        if self.room() == 0 {
            self.input.pause();
        }
        self.generation += 1;
        Ok(())
    }

    fn state_generation(&self) -> u64 {
        self.generation
    }
}

/// `main` of `outboard-uart`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    outboard::run("outboard-uart", args, Uart::from_args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{CLIENT, LISTENER};
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::eventfd::EventFd;

    const IER: u64 = 1;
    const LSR: u64 = 5;

    use crate::SharedOutput as Shared;

    fn at(offset: u64) -> Access {
        Access::new(0, offset, AccessSize::B1)
    }

    /// A UART with socket input, a connected client and an interrupt line.
    fn with_client(name: &str) -> (Uart, UnixStream, EventFd) {
        let path = crate::input::tests::temp_socket(name);
        let input = Input::socket(&path).unwrap_or_else(|e| panic!("{e}"));
        let mut u = Uart::new(Box::new(Shared::default()), input);
        u.init(&EventOps::detached())
            .unwrap_or_else(|e| panic!("{e}"));
        let client = UnixStream::connect(&path).unwrap_or_else(|e| panic!("{e}"));
        u.handle_event(LISTENER, &EventOps::detached());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap_or_else(|e| panic!("{e}"));
        let line = irq.try_clone().unwrap_or_else(|e| panic!("{e}"));
        u.connect_interrupt(0, InterruptLine::new(line));
        (u, client, irq)
    }

    #[test]
    fn write_thr_when_bytes_then_output_and_reset_keeps_writer() {
        let out = Shared::default();
        let mut u = Uart::new(Box::new(out.clone()), Input::none());
        for b in b"hi" {
            u.write(at(0), u64::from(*b));
        }
        u.write(at(7), 0x5a);
        assert_eq!(u.read(at(7)), 0x5a, "scratch register");
        u.reset();
        assert_eq!(u.read(at(7)), 0, "reset clears scratch");
        u.write(at(0), u64::from(b'!'));
        assert_eq!(&*out.0.lock().unwrap_or_else(|p| p.into_inner()), b"hi!");
    }

    #[test]
    fn describe_when_asked_then_one_edge_line_and_no_memory() {
        let u = Uart::new(Box::new(Shared::default()), Input::none());
        let d = u.describe();
        assert_eq!(d.interrupts, vec![Interrupt { level: false }]);
        assert!(!d.needs_memory);
        assert!(d.validate().is_ok());
    }

    #[test]
    fn input_when_client_sends_then_guest_reads_it_and_interrupt_raised() {
        let (mut u, mut client, irq) = with_client("uart-rx");
        u.write(at(IER), 1);
        client.write_all(b"ok").unwrap_or_else(|e| panic!("{e}"));
        u.handle_event(CLIENT, &EventOps::detached());
        assert!(irq.read().unwrap_or(0) >= 1, "received-data interrupt");
        assert_eq!(u.read(at(LSR)) & 1, 1, "data ready");
        assert_eq!(u.read(at(0)), u64::from(b'o'));
        assert_eq!(u.read(at(0)), u64::from(b'k'));
        assert_eq!(u.read(at(LSR)) & 1, 0);
    }

    #[test]
    fn input_when_fifo_full_then_paused_until_guest_drains_it() {
        let (mut u, mut client, _irq) = with_client("uart-full");
        let sent: Vec<u8> = (0..100u8).collect();
        client.write_all(&sent).unwrap_or_else(|e| panic!("{e}"));
        u.handle_event(CLIENT, &EventOps::detached());
        assert_eq!(u.room(), 0);
        assert!(u.input.is_paused(), "no room: stop reading");
        u.handle_event(CLIENT, &EventOps::detached());
        let mut got = Vec::new();
        while got.len() < sent.len() {
            assert_eq!(u.read(at(LSR)) & 1, 1, "after {} bytes", got.len());
            got.push(u.read(at(0)) as u8);
            assert!(!u.input.is_paused(), "a drained byte resumes reading");
            u.handle_event(CLIENT, &EventOps::detached());
        }
        assert_eq!(got, sent, "nothing lost, nothing reordered");
    }

    #[test]
    fn interrupt_when_no_line_connected_then_dropped_silently() {
        let mut u = Uart::new(Box::new(Shared::default()), Input::none());
        u.write(at(IER), 2);
        u.write(at(0), u64::from(b'x'));
        assert_eq!(u.read(at(7)), 0, "still serving");
    }
}
