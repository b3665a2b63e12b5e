//! envd's RPC contracts: E2B's `process.Process` and `filesystem.Filesystem` Connect services,
//! generated at build time from `proto/*.proto` (through `proto/descriptor.bin`).
// The whole crate is generated code; the workspace's lints are for hand-written code.
#![allow(
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]

connectrpc::include_generated!();
