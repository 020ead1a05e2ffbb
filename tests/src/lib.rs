//! Test tooling for sluice: a legacy-server emulator, a raw HTTP/1.x client
//! and a load generator of POS terminals.
//!
//! * [`emulator`]: an emulated fragile IIS backend ([`emulator::Emulator`],
//!   [`emulator::EmulatorThread`]) that counts how many requests are inside
//!   it at once and can lock up, cold-start, and inject faults.
//! * [`client`]: a tiny HTTP/1.x client ([`client::Conn`]) that shows exactly
//!   what goes over one connection.
//! * [`terminals`]: a load generator ([`terminals::run`]) of POS terminals
//!   that detects responses delivered to the wrong client.
//! * [`sys`]: process limits (open files) for large runs.
//!
//! All network traffic of this crate goes to the addresses it is given; tests
//! use `127.0.0.1` only, with ports picked by the OS.

pub mod client;
pub mod emulator;
pub mod sys;
pub mod terminals;
mod wire;

pub use sys::raise_fd_limit;
