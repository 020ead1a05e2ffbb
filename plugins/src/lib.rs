//! Pure admission policy for sluice.
//!
//! Everything in this crate is deterministic bookkeeping: no I/O, no threads, no clock reads.
//! Time is always passed in as a [`std::time::Instant`] argument, so every policy can be driven
//! step by step from unit tests and property tests with synthetic instants.
//!
//! The proxy crate wraps these types in a mutex, turns their decisions into waiting, permits
//! and HTTP responses, and owns all the timers.
//!
//! - [`adaptive`]: a concurrency limit learned from the backend's latency and failures, under the
//!   operator's ceiling (latency-driven ramp, optional gradient, collapse on a stalled backend).
//! - [`body_pace`]: by when a client must have sent more of a request body (start, rate, total).
//! - [`calibrate`]: the steps, stopping rule and proposal of `sluice calibrate`.
//! - [`lease`]: one instance's side of a backend cap shared by several instances through leases
//!   (local cap from the grant, fallback to the safe share, bounded shrinking, the report).
//! - [`pool`]: the admission pool, a set of backends each with a concurrency limit that can change
//!   at runtime, and one bounded FIFO wait queue in front of them.

#![forbid(unsafe_code)]

pub mod adaptive;
pub mod body_pace;
pub mod calibrate;
pub mod health;
pub mod lease;
pub mod pool;
pub mod slow_start;
pub mod token_bucket;

pub use pool::{
    Acquire, AdmissionPool, BackendId, BackendSnapshot, BackendState, Grant, PoolSnapshot,
    QueueFull, Ticket,
};
