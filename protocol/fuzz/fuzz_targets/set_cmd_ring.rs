#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outboard_protocol_fuzz::set_cmd_ring(data));
