//! The UART as a user types at it: input on its socket reaches the guest's
//! receive register and raises the UART's interrupt line; the UART never
//! maps guest RAM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::{Duration, Instant};

use outboard_frontend::{AccessSize, DeviceSpec};
use outboard_tests::{connect_stream, guest, socket_path, HANG_GUARD};

const T: Duration = Duration::from_secs(10);
const COM1: u64 = 0x3f8;
const IER: u64 = COM1 + 1;
const LSR: u64 = COM1 + 5;

#[test]
fn uart_when_input_typed_then_guest_reads_it_and_takes_the_interrupt() {
    let mut g = guest(T);
    let input = socket_path("uart-input");
    let input_arg = input.to_str().unwrap().to_owned();
    g.fe.attach(&DeviceSpec::spawn(
        "com1",
        "outboard-uart",
        &["--input-socket", &input_arg, "--output", "/dev/null"],
    ))
    .unwrap();
    let irq = g.fe.device("com1").unwrap().irq(0).unwrap().clone();
    let pio = g.fe.pio().clone();
    // The guest's driver enables the received-data interrupt (IER bit 0).
    pio.try_write(IER, AccessSize::B1, 1).unwrap();
    assert_eq!(pio.try_read(IER, AccessSize::B1).unwrap(), 1);
    let before = irq.count();
    let mut client = connect_stream(&input);
    client.write_all(b"typed at the host\n").unwrap();
    assert!(
        irq.wait_beyond(before, HANG_GUARD).is_some(),
        "the UART raised its interrupt for the input"
    );
    let mut line = Vec::new();
    let deadline = Instant::now() + HANG_GUARD;
    while line.last() != Some(&b'\n') {
        assert!(Instant::now() < deadline, "got {line:?}");
        if pio.try_read(LSR, AccessSize::B1).unwrap() & 1 == 1 {
            line.push(pio.try_read(COM1, AccessSize::B1).unwrap() as u8);
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(line, b"typed at the host\n");
}

#[test]
fn uart_when_guest_ram_exists_then_the_uart_never_maps_it() {
    let mut g = guest(T);
    g.attach("com1", "outboard-uart", &["--output", "/dev/null"]);
    g.attach("scratch", "outboard-scratch", &[]);
    let maps = |name: &str| {
        let pid = g.fe.device(name).unwrap().pid().unwrap();
        std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap()
    };
    assert!(
        maps("scratch").contains("outboard-guest-ram"),
        "scratch asked for guest memory and has it"
    );
    assert!(
        !maps("com1").contains("outboard-guest-ram"),
        "the UART does not need guest memory and holds no mapping of it"
    );
}
