//! Fuzz harnesses for tern, shared by the cargo-fuzz targets (one per
//! module, see `fuzz_targets/`) and by `tests/fuzz_regressions.rs` in the
//! main crate, which includes this file with `#[path]` and replays the kept
//! inputs through exactly the same code.
//!
//! Every harness takes raw bytes and decodes them with [`input::Input`]
//! (no `arbitrary` crate: the main crate's tests must compile this file with
//! the main crate's dependencies only). Each one checks more than "does not
//! panic": the invariants are written next to the calls.
//!
//! Modules are named with explicit `#[path]`s so that the same declarations
//! work from `fuzz/src/lib.rs` and when this file is included elsewhere.

#[path = "input.rs"]
pub mod input;

#[path = "invitation.rs"]
pub mod invitation;

#[path = "relay_request.rs"]
pub mod relay_request;

#[path = "relay_response.rs"]
pub mod relay_response;

#[path = "ratchet.rs"]
pub mod ratchet;

#[path = "store.rs"]
pub mod store;

#[path = "file.rs"]
pub mod file;

#[path = "receipt.rs"]
pub mod receipt;

/// A harness: bytes in, a panic if something is wrong.
pub type Harness = fn(&[u8]);

/// Every target, by the name of its `fuzz_targets/*.rs` file and of its
/// directory under `tests/fuzz-corpus/`.
pub const TARGETS: [(&str, Harness); 7] = [
    ("invitation", invitation::run),
    ("relay_request", relay_request::run),
    ("relay_response", relay_response::run),
    ("ratchet", ratchet::run),
    ("store", store::run),
    ("file", file::run),
    ("receipt", receipt::run),
];
