//! Properties of the Outboard wire decoders, checked by the fuzz targets.
//!
//! Each `fuzz_targets/<name>.rs` binary feeds libFuzzer's inputs to the
//! function of the same name here. Every function panics (a libFuzzer crash)
//! when a property fails, not only when the decoder itself panics:
//!
//! * **Canonical round trip.** The decoders are strict, so an accepted input
//!   is the one encoding of its value: `encode(decode(b)) == b`, and
//!   `decode(encode(v)) == v`.
//! * **Limits.** An accepted value respects the spec's bounds (sizes, flag
//!   masks, entry counts, names).
//! * **Errors name the input.** A rejection reports what is really in the
//!   bytes (the offending byte, code, size or flag bits), so the message a
//!   peer logs can be trusted.
//!
//! [`seeds`] generates valid encodings for each target; the committed seed
//! corpora under `seeds/` are its output (checked by this crate's tests).

#![deny(missing_docs)]

mod control;
mod data;
mod host_stream;
mod ring;
mod seeds;
mod state;

pub use control::{
    control_header, device_info, doorbell_info, hello, irq_info, mem_table, region_index,
    region_info, set_cmd_ring, set_irq, set_region, status_reply,
};
pub use data::{ioregionfd_cmd, ioregionfd_resp};
pub use host_stream::host_stream;
pub use ring::cmd_ring;
pub use seeds::seeds;
pub use state::state_area;

/// A property: panics when the input breaks it.
pub type Property = fn(&[u8]);

/// Every fuzz target with its property function.
pub const TARGETS: &[(&str, Property)] = &[
    ("ioregionfd_cmd", ioregionfd_cmd),
    ("ioregionfd_resp", ioregionfd_resp),
    ("control_header", control_header),
    ("hello", hello),
    ("device_info", device_info),
    ("region_index", region_index),
    ("region_info", region_info),
    ("set_region", set_region),
    ("status_reply", status_reply),
    ("doorbell_info", doorbell_info),
    ("irq_info", irq_info),
    ("set_irq", set_irq),
    ("mem_table", mem_table),
    ("state_area", state_area),
    ("host_stream", host_stream),
    ("set_cmd_ring", set_cmd_ring),
    ("cmd_ring", cmd_ring),
];

#[cfg(test)]
mod tests;
